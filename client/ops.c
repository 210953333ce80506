/*
 * ops.c -- pull and push. A pull posts one RDMA READ per chunk that scatters
 * header and trailer into scratch and the floats straight into the caller's
 * buffer, then checks each chunk and re-reads the torn ones. A push writes
 * one staging slot per chunk with WRITE-with-immediate: header and payload
 * gathered from two SGEs, never copied when the caller registered the
 * gradient. Work requests live on the stack; nothing here allocates.
 */
#include <string.h>
#include <arpa/inet.h>

#include "client.h"
#include "error.h"
#include "log.h"

static uint8_t *slot_hdr_buf(rdmaps_client *c, uint32_t slot)
{
	return c->ctl + RDMAPS_MSG_MAX + (size_t)CL_RECVS * RDMAPS_MSG_MAX +
	       (size_t)slot * RDMAPS_SLOT_HDR;
}

uint64_t cl_folded_seq(const rdmaps_client *c)
{
	/* written by the server's NIC: read it fresh, with acquire */
	return __atomic_load_n(&c->credit->folded_seq, __ATOMIC_ACQUIRE);
}

/* The caller's registration covering [p, p+len), if any. */
static struct ibv_mr *find_mr(rdmaps_client *c, const void *p, size_t len)
{
	const uint8_t *b = p;

	for (rdmaps_mr *m = c->mrs; m; m = m->next)
		if (b >= m->addr && b + len <= m->addr + m->len)
			return m->mr;
	return NULL;
}

static void op_finish(rdmaps_op *op, int status)
{
	if (op->status == RDMAPS_EAGAIN)
		op->status = status;
}

static int post_read(rdmaps_client *c, rdmaps_op *op, uint32_t slot_idx)
{
	struct read_slot *rs = &c->rs[slot_idx];
	rdmaps_tensor *t = op->t;
	uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems, rs->chunk);
	uint32_t bytes = count * (uint32_t)sizeof(float);
	uint32_t span = (uint32_t)rdmaps__chunk_data_span(count);
	float *dst = op->buf + (size_t)rs->chunk * t->chunk_elems;
	struct ibv_sge sge[3] = {
		{ .addr = (uintptr_t)rs->scratch, .length = RDMAPS_CHUNK_HDR, .lkey = c->ctl_mr->lkey },
		{ .addr = op->mr ? (uintptr_t)dst : (uintptr_t)rs->bounce,
		  .length = bytes,
		  .lkey = op->mr ? op->mr->lkey : c->data_mr->lkey },
		{ .addr = (uintptr_t)(rs->scratch + RDMAPS_CHUNK_HDR),
		  .length = span - bytes + RDMAPS_CHUNK_TRL,
		  .lkey = c->ctl_mr->lkey },
	};
	struct ibv_send_wr wr = {
		.wr_id = WR_ID(WR_READ, slot_idx),
		.sg_list = sge,
		.num_sge = 3,
		.opcode = IBV_WR_RDMA_READ,
		.send_flags = IBV_SEND_SIGNALED,
		.wr.rdma = { .remote_addr = t->raddr + (uint64_t)rs->chunk * t->stride, .rkey = t->rkey },
	}, *bad;
	int rc = ibv_post_send(c->qp, &wr, &bad);

	if (rc)
		return rdmaps__from_errno(rc);
	c->sq_outstanding++;
	return 0;
}

static int post_push(rdmaps_client *c, rdmaps_op *op, uint32_t chunk)
{
	rdmaps_tensor *t = op->t;
	uint64_t seq = c->next_seq;
	uint32_t slot = (uint32_t)((seq - 1) % c->slots);
	uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems, chunk);
	const float *src = op->buf + (size_t)chunk * t->chunk_elems;
	struct rdmaps_slot_hdr *h = (struct rdmaps_slot_hdr *)slot_hdr_buf(c, slot);
	struct ibv_sge sge[2] = {
		{ .addr = (uintptr_t)h, .length = RDMAPS_SLOT_HDR, .lkey = c->ctl_mr->lkey },
		{ .addr = (uintptr_t)src, .length = count * (uint32_t)sizeof(float),
		  .lkey = op->mr ? op->mr->lkey : c->data_mr->lkey },
	};
	struct ibv_send_wr wr = {
		.wr_id = WR_ID(WR_PUSH, (uint32_t)(op - c->ops)),
		.sg_list = sge,
		.num_sge = 2,
		.opcode = IBV_WR_RDMA_WRITE_WITH_IMM,
		.send_flags = IBV_SEND_SIGNALED,
		.imm_data = htonl(rdmaps__imm_make(slot, seq)),
		.wr.rdma = { .remote_addr = c->staging_addr + (uint64_t)slot * c->slot_size,
			     .rkey = c->staging_rkey },
	}, *bad;
	int rc;

	if (!op->mr) {
		/* unregistered gradient: stage through this slot's bounce chunk,
		 * free because the server consumed the slot's previous use */
		float *b = (float *)(c->data + (size_t)slot * c->chunk_elems * sizeof(float));
		memcpy(b, src, (size_t)count * sizeof(float));
		sge[1].addr = (uintptr_t)b;
		c->stats.bounce_copies++;
	}
	*h = (struct rdmaps_slot_hdr){
		.magic = RDMAPS_SLOT_MAGIC,
		.tensor_id = t->id,
		.seq = seq,
		.chunk = chunk,
		.count = count,
		.flags = (op->assign ? RDMAPS_SLOT_ASSIGN : 0u) |
			 /* a group ends at the push's end or when it fills the ring */
			 (chunk + 1 == t->nchunks || (chunk + 1) % c->slots == 0 ? RDMAPS_SLOT_LAST : 0u),
	};
	rc = ibv_post_send(c->qp, &wr, &bad);
	if (rc)
		return rdmaps__from_errno(rc);
	c->sq_outstanding++;
	c->next_seq++;
	op->last_seq = seq;
	return 0;
}

/* Post as much of op as the send queue, read slots and credits allow. */
static void op_post(rdmaps_client *c, rdmaps_op *op)
{
	rdmaps_tensor *t = op->t;
	int rc = 0;

	while (op->next_chunk < t->nchunks && c->sq_outstanding < CL_SQ_DEPTH) {
		if (op->kind == OP_PULL) {
			if (!c->nrs_free)
				return;
			uint32_t s = c->rs_free[--c->nrs_free];
			c->rs[s] = (struct read_slot){ .op = (uint32_t)(op - c->ops),
						       .chunk = op->next_chunk,
						       .scratch = c->rs[s].scratch,
						       .bounce = c->rs[s].bounce };
			rc = post_read(c, op, s);
			if (rc) {
				c->rs_free[c->nrs_free++] = s;
				break;
			}
		} else {
			/* one push at a time, so groups never interleave; a slot is
			 * free once the server consumed its previous seq */
			if (op->ticket != c->push_serving ||
			    c->next_seq >= cl_folded_seq(c) + c->slots)
				return;
			rc = post_push(c, op, op->next_chunk);
			if (rc)
				break;
		}
		op->next_chunk++;
		op->inflight++;
		if (op->kind == OP_PUSH && op->next_chunk == t->nchunks)
			c->push_serving++;
	}
	if (rc) {
		cl_fail(c, rc, "ibv_post_send failed");
		op_finish(op, rc);
	}
}

static void read_done(rdmaps_client *c, uint32_t s)
{
	struct read_slot *rs = &c->rs[s];
	rdmaps_op *op = &c->ops[rs->op];
	rdmaps_tensor *t = op->t;
	uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems, rs->chunk);
	float *dst = op->buf + (size_t)rs->chunk * t->chunk_elems;
	const float *got = op->mr ? dst : rs->bounce;
	const struct rdmaps_chunk_hdr *h = (const void *)rs->scratch;
	const struct rdmaps_chunk_trl *tr =
		(const void *)(rs->scratch + RDMAPS_CHUNK_HDR +
			       (rdmaps__chunk_data_span(count) - count * sizeof(float)));

	if (!(op->flags & RDMAPS_PULL_RELAXED) && !rdmaps__chunk_consistent(h, tr, got, count)) {
		/* raced a fold: read this chunk again with the same slot */
		c->stats.pull_retries++;
		if (++rs->tries < CL_MAX_TRIES && op->status == RDMAPS_EAGAIN) {
			int rc = post_read(c, op, s);
			if (!rc)
				return;
			cl_fail(c, rc, "ibv_post_send failed");
			op_finish(op, rc);
		} else {
			op_finish(op, RDMAPS_ETORN);
		}
	} else {
		if (!op->mr)
			memcpy(dst, got, (size_t)count * sizeof(float));
		op->done_chunks++;
	}
	op->inflight--;
	c->rs_free[c->nrs_free++] = s;
}

void cl_progress(rdmaps_client *c)
{
	struct ibv_wc wc[16];
	/* polled even when broken: flushed requests still return their slots */
	int n = ibv_poll_cq(c->cq, 16, wc);

	for (int i = 0; i < n; i++) {
		unsigned kind = WR_KIND(wc[i].wr_id);
		uint32_t idx = WR_IDX(wc[i].wr_id);

		if (kind != WR_RECV)
			c->sq_outstanding--;
		if (wc[i].status != IBV_WC_SUCCESS) {
			int err = rdmaps__wc_err(&wc[i]);
			if (wc[i].status != IBV_WC_WR_FLUSH_ERR)
				log_warn("work request failed: %s",
					 ibv_wc_status_str(wc[i].status));
			/* RC: one failure puts the QP in error; all else flushes */
			cl_fail(c, wc[i].status == IBV_WC_REM_ACCESS_ERR ? RDMAPS_EPROTO
									 : RDMAPS_EDISCONNECTED,
				ibv_wc_status_str(wc[i].status));
			if (kind == WR_READ) {
				rdmaps_op *op = &c->ops[c->rs[idx].op];
				op->inflight--;
				op_finish(op, err);
				c->rs_free[c->nrs_free++] = idx;
			} else if (kind == WR_PUSH) {
				c->ops[idx].inflight--;
				op_finish(&c->ops[idx], err);
			}
			continue;
		}
		switch (kind) {
		case WR_READ:
			read_done(c, idx);
			break;
		case WR_PUSH:
			c->ops[idx].inflight--;
			c->ops[idx].done_chunks++;
			break;
		case WR_RECV:
			if (wc[i].byte_len <= sizeof(c->reply)) {
				memcpy(c->reply, cl_recv_buf(c, idx), wc[i].byte_len);
				c->reply_len = wc[i].byte_len;
				c->reply_ready = true;
			}
			if (cl_post_recv(c, idx))
				cl_fail(c, RDMAPS_EVERBS, "cannot repost a receive");
			break;
		default:
			break;
		}
	}
	/* post more work and settle finished ops */
	for (uint32_t i = 0; i < CL_MAX_OPS; i++) {
		rdmaps_op *op = &c->ops[i];
		if (op->kind == OP_FREE || op->status != RDMAPS_EAGAIN)
			continue;
		if (c->broken) {
			if (!op->inflight)
				op_finish(op, c->broken);
			continue;
		}
		op_post(c, op);
		if (op->done_chunks < op->t->nchunks)
			continue;
		if (op->kind == OP_PUSH && (op->flags & RDMAPS_PUSH_FOLDED) &&
		    cl_folded_seq(c) <= op->last_seq)
			continue;
		op_finish(op, 0);
	}
}

int cl_op_start(rdmaps_client *c, enum op_kind kind, rdmaps_tensor *t, float *buf,
		unsigned flags, bool assign, rdmaps_op **out)
{
	size_t bytes;

	if (!c || !t || !buf || !out || t->c != c)
		return RDMAPS_EINVAL;
	if (c->broken)
		return c->broken;
	if (flags & ~(unsigned)(RDMAPS_PULL_RELAXED | RDMAPS_PUSH_FOLDED))
		return RDMAPS_EINVAL;
	bytes = (size_t)t->length * sizeof(float);
	for (uint32_t i = 0; i < CL_MAX_OPS; i++) {
		rdmaps_op *op = &c->ops[i];
		if (op->kind != OP_FREE)
			continue;
		*op = (struct rdmaps_op){
			.c = c,
			.kind = kind,
			.flags = flags,
			.assign = assign,
			.status = RDMAPS_EAGAIN,
			.t = t,
			.buf = buf,
			.mr = find_mr(c, buf, bytes),
		};
		if (kind == OP_PULL) {
			c->stats.pulls++;
		} else {
			c->stats.pushes++;
			op->ticket = c->push_tickets++;
		}
		op_post(c, op);
		*out = op;
		return 0;
	}
	return RDMAPS_EBUSY;
}

static int op_release(rdmaps_op *op)
{
	int st = op->status;

	op->kind = OP_FREE;
	return st;
}

int rdmaps_test(rdmaps_op *op)
{
	if (!op || op->kind == OP_FREE)
		return RDMAPS_EINVAL;
	cl_progress(op->c);
	if (op->status == RDMAPS_EAGAIN || op->inflight)
		return RDMAPS_EAGAIN;
	return op_release(op);
}

int cl_op_wait(rdmaps_op *op, int timeout_ms)
{
	rdmaps_client *c;
	uint64_t deadline;
	unsigned spins = 0;

	if (!op || op->kind == OP_FREE)
		return RDMAPS_EINVAL;
	c = op->c;
	deadline = timeout_ms < 0 ? UINT64_MAX : rdmaps__now_ns() + (uint64_t)timeout_ms * 1000000u;
	for (;;) {
		cl_progress(c);
		/* an op that failed may still have READs landing in its buffer:
		 * it is only over when the NIC is done with it */
		if (op->status != RDMAPS_EAGAIN && !op->inflight)
			return op_release(op);
		if ((++spins & 1023u) == 0) {
			cl_check_cm(c);
			if (rdmaps__now_ns() > deadline)
				return RDMAPS_ETIMEDOUT;
		}
	}
}

int rdmaps_wait(rdmaps_op *op, int timeout_ms)
{
	return cl_op_wait(op, timeout_ms);
}

int rdmaps_pull_async(rdmaps_client *c, rdmaps_tensor *t, float *dst, unsigned flags,
		      rdmaps_op **op)
{
	if (flags & RDMAPS_PUSH_FOLDED)
		return RDMAPS_EINVAL;
	return cl_op_start(c, OP_PULL, t, dst, flags, false, op);
}

int rdmaps_push_async(rdmaps_client *c, rdmaps_tensor *t, const float *grad, unsigned flags,
		      rdmaps_op **op)
{
	if (flags & RDMAPS_PULL_RELAXED)
		return RDMAPS_EINVAL;
	/* the library only reads a push buffer; the cast keeps one op type */
	return cl_op_start(c, OP_PUSH, t, (float *)(uintptr_t)grad, flags, false, op);
}

int rdmaps_pull(rdmaps_client *c, rdmaps_tensor *t, float *dst, unsigned flags)
{
	rdmaps_op *op;
	int rc = rdmaps_pull_async(c, t, dst, flags, &op);

	return rc ? rc : cl_op_wait(op, -1);
}

int rdmaps_push(rdmaps_client *c, rdmaps_tensor *t, const float *grad, unsigned flags)
{
	rdmaps_op *op;
	int rc = rdmaps_push_async(c, t, grad, flags, &op);

	return rc ? rc : cl_op_wait(op, -1);
}

int rdmaps_flush(rdmaps_client *c, int timeout_ms)
{
	uint64_t deadline;
	unsigned spins = 0;

	if (!c)
		return RDMAPS_EINVAL;
	deadline = timeout_ms < 0 ? UINT64_MAX : rdmaps__now_ns() + (uint64_t)timeout_ms * 1000000u;
	for (;;) {
		bool pending = false;
		cl_progress(c);
		for (uint32_t i = 0; i < CL_MAX_OPS; i++)
			if (c->ops[i].kind == OP_PUSH && c->ops[i].next_chunk < c->ops[i].t->nchunks &&
			    c->ops[i].status == RDMAPS_EAGAIN)
				pending = true;
		if (c->broken)
			return c->broken;
		if (!pending && cl_folded_seq(c) >= c->next_seq)
			break;
		if ((++spins & 1023u) == 0) {
			cl_check_cm(c);
			if (rdmaps__now_ns() > deadline)
				return RDMAPS_ETIMEDOUT;
		}
	}
	uint32_t dropped = __atomic_load_n(&c->credit->dropped, __ATOMIC_ACQUIRE);
	if (dropped != c->dropped_seen) {
		c->dropped_seen = dropped;
		return RDMAPS_EREMOTE;
	}
	return 0;
}
