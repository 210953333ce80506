/*
 * rawclient.h -- a bare verbs client for tests that must misbehave: forged
 * rkeys, malformed control messages, wrong tokens. It speaks the wire
 * protocol by hand (common/protocol.h), without librdmaps.
 */
#ifndef RDMAPS_TEST_RAWCLIENT_H
#define RDMAPS_TEST_RAWCLIENT_H

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include "protocol.h"

#define RAW_BUF (256u << 10)
#define RAW_SEND_OFF 0u
#define RAW_RECV_OFF 8192u /* 4 receive buffers of RDMAPS_MSG_MAX */
#define RAW_DATA_OFF 32768u /* to RAW_BUF: room for a slot of 64 KiB and more */

struct raw {
	struct rdma_event_channel *ch;
	struct rdma_cm_id *id;
	struct ibv_pd *pd;
	struct ibv_cq *cq;
	struct ibv_mr *mr;
	uint8_t *buf;
	struct rdmaps_wire_welcome w;
	uint64_t *credit;      /* the credit word the server writes (REMOTE_WRITE) */
	struct ibv_mr *credit_mr;
	/* receives that completed while we waited for something else */
	struct ibv_wc early[8];
	int nearly;
};

/* A hello with the test token, ready to tweak. */
struct rdmaps_wire_hello raw_hello(const char *token);
/* Connect; returns 0, or the negative rdmaps_err from the server's reject. */
int raw_connect(struct raw *r, const char *addr, const char *port,
		const struct rdmaps_wire_hello *h, size_t hello_len);
void raw_close(struct raw *r);
/* Post a SEND of len bytes from buf+RAW_SEND_OFF; returns the completion status. */
int raw_send(struct raw *r, const void *msg, size_t len);
/* Wait for one received message; copies it to out, returns its length or -1. */
int raw_recv(struct raw *r, void *out, size_t max, int timeout_ms);
/* An 8-byte fetch-and-add at raddr; the completion status, or -1. */
int raw_atomic(struct raw *r, uint64_t raddr, uint32_t rkey);
/* One RDMA op on [buf+RAW_DATA_OFF, +len); returns the completion status. */
int raw_rdma(struct raw *r, enum ibv_wr_opcode op, uint64_t raddr, uint32_t rkey, uint32_t len,
	     uint32_t imm_host);
/*
 * The same without waiting: post it (signaled) from [buf+off, +len) as
 * wr_id (1 < wr_id < 100), then raw_wait for it. Completions come back in
 * the order posted, so wait for several in that order. Posting returns 0
 * or the errno of ibv_post_send; waiting, the completion status or -1.
 */
int raw_post(struct raw *r, uint64_t wr_id, enum ibv_wr_opcode op, uint32_t off, uint64_t raddr,
	     uint32_t rkey, uint32_t len, uint32_t imm_host);
int raw_wait(struct raw *r, uint64_t wr_id);
/* Declare (or look up) a tensor by hand; fills the reply, returns its status. */
int raw_declare(struct raw *r, const char *name, uint64_t length,
		struct rdmaps_msg_tensor_reply *rep);
/* The declaration raw_declare sends (SGD, lr 1, ASP), ready to tweak. */
struct rdmaps_msg_declare raw_declare_msg(const char *name, uint64_t length);
/* Send a declare or lookup; a tensor reply fills *rep; returns its status. */
int raw_request(struct raw *r, const void *msg, size_t len, struct rdmaps_msg_tensor_reply *rep);
/* Write one slot by hand: header + count floats of value, with LAST and END
 * (and any extra flags); returns the completion status. */
int raw_slot(struct raw *r, uint32_t tensor, uint64_t seq, uint32_t chunk, uint32_t count,
	     float value, uint16_t extra_flags);
/* Look an existing tensor up by name (whatever its declaration); as raw_declare. */
int raw_lookup(struct raw *r, const char *name, struct rdmaps_msg_tensor_reply *rep);

#endif
