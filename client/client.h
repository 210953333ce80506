/*
 * client.h -- librdmaps internals. Not installed.
 *
 * One client = one RC QP to one server. Everything it sends is signaled so
 * the send-queue budget is exact; every buffer the NIC touches is carved out
 * of regions registered at connect, so pull and push allocate nothing.
 */
#ifndef RDMAPS_CLIENT_H
#define RDMAPS_CLIENT_H

#include <stdbool.h>
#include <stdint.h>

#include "chunk.h"
#include "protocol.h"
#include "rdmaps.h"
#include "verbs.h"

#define CL_MAX_OPS 64u
#define CL_READ_SLOTS 32u   /* READs in flight per client */
#define CL_RECVS 4u         /* control replies (one request at a time) */
#define CL_SQ_DEPTH 128u
#define CL_SCRATCH 192u     /* chunk header + padding + trailer of one READ */
#define CL_MAX_TRIES 100000u /* re-reads of one chunk before RDMAPS_ETORN */

/* wr_id layout: kind in the top byte, index below */
enum { WR_READ = 1, WR_PUSH = 2, WR_CTRL_SEND = 3, WR_RECV = 4 };
#define WR_ID(kind, idx) (((uint64_t)(kind) << 56) | (uint64_t)(idx))
#define WR_KIND(id) ((unsigned)((id) >> 56))
#define WR_IDX(id) ((uint32_t)(id))

struct rdmaps_mr {
	rdmaps_client *c;
	struct ibv_mr *mr;
	uint8_t *addr;
	size_t len;
	rdmaps_mr *prev, *next;
};

struct rdmaps_tensor {
	rdmaps_client *c;
	uint32_t id;
	uint64_t length;
	uint64_t raddr;
	uint32_t rkey;
	uint32_t chunk_elems, nchunks;
	size_t stride;
	char name[RDMAPS_NAME_MAX + 1];
	rdmaps_tensor *next;
};

enum op_kind { OP_FREE = 0, OP_PULL, OP_PUSH };

struct rdmaps_op {
	rdmaps_client *c;
	enum op_kind kind;
	unsigned flags;
	bool assign;          /* push of initial values (creator only) */
	int status;           /* RDMAPS_EAGAIN while pending */
	rdmaps_tensor *t;
	float *buf;           /* pull destination or push source */
	struct ibv_mr *mr;    /* caller's registration covering buf, or NULL: bounce */
	uint32_t next_chunk;  /* next chunk to post */
	uint32_t done_chunks;
	uint32_t inflight;
	uint64_t last_seq;    /* push: seq of its last slot */
	uint64_t ticket;      /* push: order among pushes (groups must not interleave) */
};

struct read_slot {
	uint32_t op, chunk, tries;
	uint8_t *scratch;     /* CL_SCRATCH bytes in the control region */
	float *bounce;        /* chunk_elems floats in the data region */
};

struct rdmaps_client {
	struct rdma_event_channel *ch;
	struct rdma_cm_id *id;
	struct ibv_pd *pd;
	struct ibv_cq *cq;
	struct ibv_qp *qp;
	int timeout_ms;

	/* from the server's welcome */
	uint64_t staging_addr;
	uint32_t staging_rkey, slots, slot_size, chunk_elems;

	/* credit word: the only memory the server may write (its own page) */
	struct rdmaps_wire_credit *credit;
	struct ibv_mr *credit_mr;

	/* control region: send buffer | recv buffers | slot headers | read scratch */
	uint8_t *ctl;
	struct ibv_mr *ctl_mr;
	/* data region: push bounce (slots chunks) | read bounce (CL_READ_SLOTS chunks) */
	uint8_t *data;
	struct ibv_mr *data_mr;

	uint32_t sq_outstanding;
	uint64_t next_seq;      /* seq of the next staged slot */
	uint64_t push_tickets, push_serving; /* only the oldest push posts slots */
	uint32_t dropped_seen;
	uint32_t req_id;
	bool reply_ready;
	uint8_t reply[RDMAPS_MSG_MAX];
	uint32_t reply_len;
	int broken;             /* 0 or why the connection is unusable */

	struct read_slot rs[CL_READ_SLOTS];
	uint32_t rs_free[CL_READ_SLOTS];
	uint32_t nrs_free;

	struct rdmaps_op ops[CL_MAX_OPS];
	rdmaps_mr *mrs;
	rdmaps_tensor *tensors;
	struct rdmaps_client_stats stats;
	uint64_t last_cm_check;
};

/* ops.c */
void cl_progress(rdmaps_client *c);
int cl_op_start(rdmaps_client *c, enum op_kind kind, rdmaps_tensor *t, float *buf,
		unsigned flags, bool assign, rdmaps_op **out);
int cl_op_wait(rdmaps_op *op, int timeout_ms);
uint64_t cl_folded_seq(const rdmaps_client *c);

/* control.c */
int cl_rpc(rdmaps_client *c, void *msg, uint32_t len, uint16_t want_type, void *reply,
	   uint32_t reply_len);

/* connect.c */
uint8_t *cl_send_buf(rdmaps_client *c);
uint8_t *cl_recv_buf(rdmaps_client *c, uint32_t i);
int cl_post_recv(rdmaps_client *c, uint32_t i);
void cl_fail(rdmaps_client *c, int err, const char *why);
/* Look for an rdma_cm disconnect without blocking (rate-limited). */
void cl_check_cm(rdmaps_client *c);

#endif
