/*
 * raw.h -- the raw-verbs baseline: one RC QP set up through rdma_cm exactly
 * as librdmaps sets up its own (same resolve with a bound source, same
 * initiator depth / responder resources, retry counts and queue depths), to
 * a responder that is a thread of this process or `rdmaps-bench raw-server`.
 *
 * Memory: the client registers [send area | receive area | control], each
 * area max_size bytes (the largest size asked for, plus RAW_SLACK); the responder registers [buffer | control]. Every
 * receive lands at the start of the receiving side's buffer/receive area.
 *
 * Control: the client SENDs-with-immediate a struct raw_ctl (immediate =
 * RAW_IMM_CTL); the responder switches mode and answers with a SEND-with-
 * immediate RAW_IMM_ACK. Passive modes block the responder on its completion
 * channel (like perftest's idle side); ping-pong modes busy-poll (like both
 * sides of ib_write_lat / ib_send_lat).
 */
#ifndef RDMAPS_BENCH_RAW_H
#define RDMAPS_BENCH_RAW_H

#include <stdbool.h>
#include <stdint.h>

#include "rdmaps.h"
#include "verbs.h"

#define RAW_MAGIC 0x57415242u /* "BRAW" */
#define RAW_SQ_DEPTH 128u     /* as librdmaps (CL_SQ_DEPTH) */
#define RAW_CLIENT_RECVS 16u
#define RAW_RESP_RECVS 128u
#define RAW_CTL_BYTES 4096u
#define RAW_IMM_CTL 0x43544c31u
#define RAW_IMM_ACK 0x41434b31u
#define RAW_SLACK 4096u

enum raw_mode {
	RAW_PASSIVE = 1, /* READ / WRITE targets: the responder sleeps */
	RAW_WRITE_IMM,   /* repost a receive per WRITE-with-immediate; busy-poll
			  * 200 us after each, then sleep (as rdmaps-server) */
	RAW_WRITE_PP,    /* reflect each WRITE (last byte = counter) back */
	RAW_WRITE_IMM_PP, /* answer each WRITE-with-immediate's completion with an
			   * 8-byte WRITE of a counter (rdmaps' fold + credit) */
	RAW_SEND_PP,     /* answer each SEND with a SEND of the same size */
};

/* client -> responder, in the connect request's private data (<= 56 B) */
struct raw_hello {
	uint32_t magic, reserved;
	uint64_t max_size;  /* largest message the client will use */
	uint64_t recv_addr; /* client's receive area (WRITE ping-pong target) */
	uint32_t recv_rkey, pad;
};

/* responder -> client, in the accept's private data */
struct raw_welcome {
	uint32_t magic, rkey;
	uint64_t addr;      /* responder buffer: READ source, WRITE target */
};

struct raw_ctl {
	uint32_t magic, mode;
	uint64_t size;
};

struct raw_qp {
	struct rdma_event_channel *ch;
	struct rdma_cm_id *id;
	struct ibv_pd *pd;
	struct ibv_comp_channel *cc; /* responder: sleeps on it when passive */
	struct ibv_cq *cq;
	struct ibv_qp *qp;
	uint8_t *mem;                /* registered area */
	size_t mem_len, max_size;
	struct ibv_mr *mr;
	uint8_t *buf;                /* client: send area; responder: buffer */
	uint8_t *rbuf;               /* client: receive area; responder: == buf */
	uint8_t *ctl;                /* control message area */
	uint64_t raddr;              /* peer memory this side READs/WRITEs */
	uint32_t rkey;
	unsigned initiator_depth;
	unsigned sq_busy;            /* signaled sends not yet completed */
	uint64_t credit_seen;        /* RAW_WRITE_IMM_PP: answers so far */
};

/* rawconn.c */
int raw_client_connect(const char *host, const char *port, const char *src, size_t max_size,
		       struct raw_qp **out);
/* Build the responder side for a connect request's id and accept it. */
int raw_accept(struct rdma_cm_id *id, const void *pdata, uint8_t plen, struct raw_qp **out);
void raw_qp_free(struct raw_qp *q);
int raw_post_recv(struct raw_qp *q, uint8_t *at, size_t len);
int raw_post(struct raw_qp *q, enum ibv_wr_opcode op, uint64_t wr_id, const void *local,
	     size_t len, uint32_t imm_host);
int raw_post_sge(struct raw_qp *q, enum ibv_wr_opcode op, uint64_t wr_id, struct ibv_sge *sge,
		 int nsge, uint32_t imm_host);
/* After ESTABLISHED: what rdma_cm leaves at a bad value (min_rnr_timer). */
void raw_after_established(struct raw_qp *q);
/* Client: switch the responder's mode and wait for its acknowledgement. */
int raw_set_mode(struct raw_qp *q, enum raw_mode mode, uint64_t size);

#endif
