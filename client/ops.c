/*
 * ops.c -- pull and push over every server holding a part of the tensor.
 *
 * A pull posts one RDMA READ per run of up to read_span consecutive chunks
 * (reads.c posts them, scattering each header into scratch and the floats
 * straight into the caller's buffer, and checks each chunk, re-reading the
 * torn ones alone); a pull of a 16-bit copy reads runs of its chunks the
 * same way. A tensor kept in two copies first READs the index words of its
 * chunks (CL_INDEX_WORDS at a time), each naming the copy no fold is
 * writing (docs/design.md). A compressed push sends the chunks its
 * tensor's encoder wrote (compress.c). A push writes one staging slot per
 * chunk with WRITE-with-immediate, header and payload gathered from two SGEs,
 * never copied when the caller registered the gradient. Posting walks all
 * parts before anything is waited on, so the servers work in parallel. Work
 * requests live on the stack; nothing here allocates.
 */
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <arpa/inet.h>

#include "client.h"
#include "error.h"
#include "half.h"
#include "log.h"

uint64_t cl_folded_seq(const struct cl_conn *k)
{
	/* written by the server's NIC: read it fresh, with acquire */
	return __atomic_load_n(&k->credit->folded_seq, __ATOMIC_ACQUIRE);
}

/* The caller's registration covering [p, p+len), if any. */
rdmaps_mr *cl_find_mr(rdmaps_client *c, const void *p, size_t len)
{
	const uint8_t *b = p;

	for (rdmaps_mr *m = c->mrs; m; m = m->next)
		if (b >= m->addr && b + len <= m->addr + m->len)
			return m;
	return NULL;
}

void cl_op_finish(rdmaps_op *op, int status)
{
	if (op->status == RDMAPS_EAGAIN)
		op->status = status;
}

uint32_t cl_op_index(const rdmaps_op *op)
{
	return (uint32_t)(op - op->c->ops);
}

static int post_push(struct cl_conn *k, rdmaps_op *op, uint32_t p, uint32_t local)
{
	rdmaps_tensor *t = op->t;
	const struct cl_part *pt = &t->part[p];
	uint64_t seq = k->next_seq;
	uint32_t slot = (uint32_t)((seq - 1) % k->slots);
	uint32_t chunk = pt->first + local;
	uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems, chunk);
	const float *src = op->buf + (size_t)chunk * t->chunk_elems;
	/* a compressed push sends its chunk as encoded when it was posted */
	const struct cl_wire *w = op->wire ? t->wire : NULL;
	struct rdmaps_slot_hdr *h = (struct rdmaps_slot_hdr *)cl_slot_hdr(k, slot);
	struct ibv_sge sge[2] = {
		{ .addr = (uintptr_t)h, .length = RDMAPS_SLOT_HDR, .lkey = k->ctl_mr->lkey },
		w ? (struct ibv_sge){ .addr = (uintptr_t)(w->buf + (size_t)chunk * w->stride),
				      .length = w->len[chunk],
				      .lkey = w->mr->mr[k->pd_idx]->lkey }
		  : (struct ibv_sge){ .addr = (uintptr_t)src,
				      .length = count * (uint32_t)sizeof(float),
				      .lkey = op->mr ? op->mr->mr[k->pd_idx]->lkey
						     : k->data_mr->lkey },
	};
	struct ibv_send_wr wr = {
		.wr_id = WR_ID(WR_PUSH, k->idx, cl_op_index(op)),
		.sg_list = sge,
		.num_sge = 2,
		.opcode = IBV_WR_RDMA_WRITE_WITH_IMM,
		.send_flags = IBV_SEND_SIGNALED,
		.imm_data = htonl(rdmaps__imm_make(slot, seq)),
		.wr.rdma = { .remote_addr = k->staging_addr + (uint64_t)slot * k->slot_size,
			     .rkey = k->staging_rkey },
	}, *bad;
	int rc;

	if (RDMAPS_SLOT_HDR + sge[1].length <= k->max_inline) {
		/* small: inline, copied at post time; no registration needed */
		wr.send_flags |= IBV_SEND_INLINE;
	} else if (!op->mr && !w) {
		/* unregistered gradient: stage through this slot's bounce chunk,
		 * free because the server consumed the slot's previous use */
		float *b = (float *)(k->data + (size_t)slot * k->chunk_elems * sizeof(float));
		memcpy(b, src, (size_t)count * sizeof(float));
		sge[1].addr = (uintptr_t)b;
		op->c->stats.bounce_copies++;
	}
	*h = (struct rdmaps_slot_hdr){
		.seq = (uint32_t)seq,
		.tensor_id = (uint16_t)pt->tensor_id,
		.chunk = local,
		.count = count,
		.flags = (op->assign ? RDMAPS_SLOT_ASSIGN : 0u) |
			 (op->flags & RDMAPS_PUSH_FOLDED ? RDMAPS_SLOT_ACK : 0u) |
			 /* a group ends with the part or when it fills the ring */
			 (local + 1 == pt->nchunks || (local + 1) % k->slots == 0 ? RDMAPS_SLOT_LAST
										   : 0u) |
			 (local + 1 == pt->nchunks ? RDMAPS_SLOT_END : 0u) |
			 (w ? w->fmt << RDMAPS_SLOT_FMT_SHIFT : 0u),
		.clock = op->clock,
		.scale = op->scale,
	};
	rc = ibv_post_send(k->qp, &wr, &bad);
	if (rc)
		return rdmaps__from_errno(rc);
	k->sq_outstanding++;
	k->next_seq++;
	if (!op->assign)
		op->c->stats.push_bytes += sge[1].length;
	op->last_seq[k->idx] = seq;
	if (!op->seq0[k->idx]) {
		op->seq0[k->idx] = seq;
		op->local0[k->idx] = local;
	}
	return 0;
}

/* A free READ slot of k, set up for chunk `local` of part p of op, landing
 * dst_off floats into op's buffer; one copy unless the caller says which. */
uint32_t cl_rs_take(struct cl_conn *k, rdmaps_op *op, uint32_t p, uint32_t local,
		    uint64_t dst_off)
{
	uint32_t s = k->rs_free[--k->nrs_free];

	k->rs[s] = (struct read_slot){ .op = cl_op_index(op), .part = p, .local = local,
				       .next = CL_RS_NONE, .dst_off = dst_off,
				       .scratch = k->rs[s].scratch,
				       .bounce = k->rs[s].bounce };
	return s;
}

/* Post the READ gathered in b (op_post_part); on failure nothing of it
 * counts as posted. */
struct read_batch {
	uint32_t s[RDMAPS_READ_SPAN];
	uint32_t n;
};

static int batch_post(struct cl_conn *k, rdmaps_op *op, uint32_t p, struct read_batch *b)
{
	int rc = 0;

	if (!b->n)
		return 0;
	if ((rc = cl_post_reads(k, op, b->s, b->n))) {
		for (uint32_t i = 0; i < b->n; i++)
			k->rs_free[k->nrs_free++] = b->s[i];
		op->next[p] -= b->n;
		op->unposted += b->n;
		op->inflight -= b->n;
	} else if (op->t->part[p].copy_off && !op->half) {
		/* two float32 copies; a 16-bit copy is one, with no index */
		for (uint32_t i = 0; i < b->n; i++)
			cl_ix_posted(k, op, b->s[i]);
	}
	b->n = 0;
	return rc;
}

/* Post what part p of op may post now on its server; < 0 on failure. */
static int op_post_part(rdmaps_op *op, uint32_t p)
{
	const struct cl_part *pt = &op->t->part[p];
	struct cl_conn *k = &op->c->conn[pt->conn];
	uint32_t me = cl_op_index(op) + 1;
	struct read_batch b = { .n = 0 };
	int rc = 0;

	if (op->kind == OP_PUSH) {
		/* one push group at a time per server, so groups never interleave */
		if (k->push_owner && k->push_owner != me)
			return 0;
		k->push_owner = me;
	}
	/* the batch being gathered holds a send queue entry of its own */
	while (op->next[p] < pt->nchunks && k->sq_outstanding + (b.n > 0) < CL_SQ_DEPTH) {
		if (op->kind == OP_PULL && op->half) {
			/* the 16-bit copy: one copy, no index; a run of chunks per
			 * READ, as float32's (reads.c checks each on its own) */
			if (!k->nrs_free)
				break;
			if (b.n == k->read_span) {
				if ((rc = batch_post(k, op, p, &b)))
					break;
				if (k->sq_outstanding >= CL_SQ_DEPTH)
					break;
			}
			b.s[b.n++] = cl_rs_take(k, op, p, op->next[p],
						(uint64_t)(pt->first + op->next[p]) * op->t->chunk_elems);
		} else if (op->kind == OP_PULL) {
			uint64_t word = 0;
			if (!k->nrs_free)
				break;
			int w = 0;
			if (pt->copy_off) {
				if ((rc = w = cl_ix_ready(k, op, p, &word)) <= 0)
					break;
				rc = 0;
			}
			uint32_t chunk = pt->first + op->next[p];
			bool small = cl_read_whole(
				rdmaps__chunk_count(op->t->length, op->t->chunk_elems, chunk));
			uint32_t copy = (uint32_t)(word >> 1) & 1u;
			/* big consecutive chunks of one copy and window share a READ:
			 * rxe pays per READ about what 4 KiB of data costs */
			if (b.n && (small || b.n == k->read_span || k->rs[b.s[0]].copy != copy ||
				    (w && k->rs[b.s[0]].win != (uint32_t)w - 1u))) {
				if ((rc = batch_post(k, op, p, &b)))
					break;
				if (k->sq_outstanding >= CL_SQ_DEPTH)
					break;
			}
			uint32_t s = cl_rs_take(k, op, p, op->next[p],
						(uint64_t)chunk * op->t->chunk_elems);
			if (w) {
				/* the copy the index names (bit 1), and no older than it */
				k->rs[s].copy = copy;
				k->rs[s].want = word & ~1ull;
				k->rs[s].win = (uint32_t)w - 1;
				k->rs[s].verify = k->win[w - 1].verify;
			}
			b.s[b.n++] = s;
			op->next[p]++;
			op->unposted--;
			op->inflight++;
			if (small && (rc = batch_post(k, op, p, &b)))
				break;
			continue;
		} else {
			/* a slot is free once the server consumed its previous seq */
			if (k->next_seq >= cl_folded_seq(k) + k->slots)
				break;
			if ((rc = post_push(k, op, p, op->next[p])))
				break;
		}
		op->next[p]++;
		op->unposted--;
		op->inflight++;
	}
	if (!rc)
		rc = batch_post(k, op, p, &b);
	if (op->kind == OP_PUSH && op->next[p] == pt->nchunks)
		k->push_owner = 0;
	if (rc)
		cl_fail(k, rc, "ibv_post_send failed");
	return rc;
}

void cl_op_post(rdmaps_op *op)
{
	if (op->kind == OP_PULL_ROWS) {
		int rc = cl_rows_post_pull(op);
		if (rc)
			cl_op_finish(op, rc);
		return;
	}
	if (op->kind == OP_PUSH_ROWS) {
		for (uint32_t p = op->part_lo; p < op->part_hi && op->unposted; p++) {
			int rc = cl_rows_post_push(op, p);
			if (rc) {
				cl_op_finish(op, rc);
				return;
			}
		}
		return;
	}
	for (uint32_t p = op->part_lo; p < op->part_hi && op->unposted; p++) {
		int rc = op_post_part(op, p);
		if (rc) {
			cl_op_finish(op, rc);
			return;
		}
	}
}

static void conn_poll(struct cl_conn *k)
{
	struct ibv_wc wc[16];
	int n;

	if (!k->cq)
		return; /* released, and a reconnect did not make it again */
	/* polled even when broken: flushed requests still return their slots */
	n = ibv_poll_cq(k->cq, 16, wc);
	if (k->snap_s != CL_RS_NONE || k->snap_n)
		cl_snap_kick(k); /* it may have waited for send queue room */

	k->cqes += n > 0 ? (unsigned)n : 0u;
	for (int i = 0; i < n; i++) {
		unsigned kind = WR_KIND(wc[i].wr_id);
		uint32_t idx = WR_IDX(wc[i].wr_id);

		if (kind != WR_RECV)
			k->sq_outstanding--;
		if (wc[i].status != IBV_WC_SUCCESS) {
			int err = rdmaps__wc_err(&wc[i]);
			if (wc[i].status != IBV_WC_WR_FLUSH_ERR)
				log_warn("server %s: work request failed: %s", k->name,
					 ibv_wc_status_str(wc[i].status));
			/* RC: one failure puts the QP in error; the rest flushes */
			cl_fail(k, wc[i].status == IBV_WC_REM_ACCESS_ERR ? RDMAPS_EPROTO
									 : RDMAPS_EDISCONNECTED,
				ibv_wc_status_str(wc[i].status));
			if (kind == WR_READ) {
				for (uint32_t s = idx, nx; s != CL_RS_NONE; s = nx) {
					rdmaps_op *op = &k->c->ops[k->rs[s].op];
					nx = k->rs[s].next;
					op->inflight--;
					cl_op_finish(op, err);
					k->rs_free[k->nrs_free++] = s;
				}
			} else if (kind == WR_PUSH) {
				/* not failed yet: the reconnect learns whether it folded
				 * (resume.c) */
				k->c->ops[idx].inflight--;
			}
			continue;
		}
		switch (kind) {
		case WR_READ: /* every chunk the READ spans; a retry reads one */
			for (uint32_t s = idx, nx; s != CL_RS_NONE; s = nx) {
				nx = k->rs[s].next;
				k->rs[s].next = CL_RS_NONE;
				cl_read_done(k, s);
			}
			break;
		case WR_PUSH: /* one slot: a chunk, or a batch of rows */
			k->c->ops[idx].inflight--;
			k->c->ops[idx].done_chunks++;
			k->c->ops[idx].pdone[k->idx]++;
			break;
		case WR_INDEX:
			cl_ix_complete(k, idx);
			break;
		case WR_RECV: {
			uint16_t type = 0;
			if (!rdmaps__msg_check(cl_recv_buf(k, idx), wc[i].byte_len, &type) &&
			    type == RDMAPS_MSG_SNAPSHOT_REPLY) {
				/* a pull's, not the control call's (snapshot.c) */
				cl_snap_reply(k, cl_recv_buf(k, idx), wc[i].byte_len);
			} else if (wc[i].byte_len <= sizeof(k->reply)) {
				memcpy(k->reply, cl_recv_buf(k, idx), wc[i].byte_len);
				k->reply_len = wc[i].byte_len;
				k->reply_ready = true;
			}
			if (cl_post_recv(k, idx))
				cl_fail(k, RDMAPS_EVERBS, "cannot repost a receive");
			break;
		}
		default:
			break;
		}
	}
}

/* A push with RDMAPS_PUSH_FOLDED is done when every server folded its part. */
static bool push_folded(const rdmaps_op *op)
{
	for (uint32_t p = op->part_lo; p < op->part_hi; p++) {
		const struct cl_conn *k = &op->c->conn[op->t->part[p].conn];
		if (cl_folded_seq(k) <= op->last_seq[k->idx])
			return false;
	}
	return true;
}

/* The op queue entry r stands for, if that op still has work to post. */
static rdmaps_op *postq_op(rdmaps_client *c, uint32_t r)
{
	rdmaps_op *op = &c->ops[c->postq[r].idx];

	if (op->gen != c->postq[r].gen || op->kind == OP_FREE || op->status != RDMAPS_EAGAIN ||
	    !op->unposted)
		return NULL;
	return op;
}

/* Drops queue entries of ops that have nothing left to post, keeping order. */
static void postq_prune(rdmaps_client *c)
{
	uint32_t w = 0;

	for (uint32_t r = 0; r < c->npostq; r++)
		if (postq_op(c, r))
			c->postq[w++] = c->postq[r];
	c->npostq = w;
}

void cl_postq_add(rdmaps_client *c, rdmaps_op *op)
{
	uint32_t idx = cl_op_index(op);

	for (uint32_t r = 0; r < c->npostq; r++)
		if (c->postq[r].idx == idx && c->postq[r].gen == op->gen)
			return; /* already queued */
	/* at most CL_MAX_OPS live ops, so the queue has room for this one
	 * once entries of finished ones are dropped */
	if (c->npostq == CL_MAX_OPS)
		postq_prune(c);
	c->postq[c->npostq].idx = idx;
	c->postq[c->npostq++].gen = op->gen;
}

void cl_progress(rdmaps_client *c)
{
	for (uint32_t i = 0; i < c->nconn; i++)
		conn_poll(&c->conn[i]);
	/* post more work, oldest op first */
	if (!c->broken) {
		for (uint32_t r = 0; r < c->npostq; r++) {
			rdmaps_op *op = postq_op(c, r);
			if (op)
				cl_op_post(op);
		}
		postq_prune(c);
	}
	/* settle finished ops */
	for (uint32_t i = 0; i < c->ops_hi; i++) {
		rdmaps_op *op = &c->ops[i];
		if (op->kind == OP_FREE || op->status != RDMAPS_EAGAIN)
			continue;
		if (c->broken) {
			/* a push waits for the reconnect to settle it (resume.c) */
			if (!op->inflight && !cl_op_unsettled(op))
				cl_op_finish(op, c->broken);
			continue;
		}
		if (op->done_chunks < op->total_chunks)
			continue;
		if ((op->kind == OP_PUSH || op->kind == OP_PUSH_ROWS) &&
		    (op->flags & RDMAPS_PUSH_FOLDED) && !push_folded(op))
			continue;
		cl_op_finish(op, 0);
	}
}

/* Per-tensor clipping: one scale for the whole push, so every server's part
 * shrinks alike and the direction of the gradient is kept. */
float cl_clip_scale(const float *g, uint64_t n, float clip)
{
	double s = 0.0;

	for (uint64_t i = 0; i < n; i++)
		s += (double)g[i] * (double)g[i];
	if (!__builtin_isfinite(s) || s <= (double)clip * clip)
		return 1.0f; /* non-finite: the server refuses it and says so */
	return (float)((double)clip / __builtin_sqrt(s));
}

int cl_op_start(rdmaps_client *c, enum op_kind kind, rdmaps_tensor *t, float *buf,
		unsigned flags, bool assign, rdmaps_op **out)
{
	if (!t)
		return RDMAPS_EINVAL;
	return cl_op_start_parts(c, kind, t, buf, flags, assign, 0, t->nparts, out);
}

/* Take a free op and set it up; nothing is posted yet. */
int cl_op_alloc(rdmaps_client *c, enum op_kind kind, rdmaps_tensor *t, float *buf,
		unsigned flags, bool assign, uint32_t lo, uint32_t hi, rdmaps_op **out)
{
	size_t bytes;

	if (!c || !t || !buf || !out || t->c != c || lo >= hi || hi > t->nparts)
		return RDMAPS_EINVAL;
	if (c->broken) {
		int rc = cl_reconnect(c);
		if (rc)
			return rc;
	}
	if (flags & ~(unsigned)(RDMAPS_PULL_RELAXED | RDMAPS_PUSH_FOLDED))
		return RDMAPS_EINVAL;
	if (kind == OP_PUSH && !assign && t->cons.mode == RDMAPS_BSP && t->bsp_pushed) {
		/* the server aggregates one clock at a time: a second push before
		 * the pull that sees the first clock complete would land in it */
		log_error("tensor '%s': BSP push of clock %llu refused: pull first (one push per "
			  "clock)", t->name, (unsigned long long)t->clock);
		return RDMAPS_EINVAL;
	}
	bytes = (size_t)t->length * sizeof(float);
	for (uint32_t i = 0; i < CL_MAX_OPS; i++) {
		rdmaps_op *op = &c->ops[i];
		if (op->kind != OP_FREE)
			continue;
		op->kind = kind;
		op->gen++;
		if (i >= c->ops_hi)
			c->ops_hi = i + 1;
		op->flags = flags;
		op->assign = assign;
		op->wire = false;
		/* a tensor with a 16-bit copy is pulled from it, into floats */
		op->half = kind == OP_PULL && t->pull_fmt ? CL_HALF_FLOAT : CL_HALF_NONE;
		op->status = RDMAPS_EAGAIN;
		op->t = t;
		op->buf = buf;
		op->mr = op->half ? NULL : cl_find_mr(c, buf, bytes);
		op->part_lo = lo;
		op->part_hi = hi;
		op->clock = 0;
		op->scale = 1.0f;
		op->min_clock = 0;
		if (kind == OP_PUSH && !assign) {
			if (t->cons.mode != RDMAPS_ASP)
				op->clock = (uint32_t)t->clock++;
			t->bsp_pushed = t->cons.mode == RDMAPS_BSP;
			if (t->cons.clip_norm > 0.0f)
				op->scale = cl_clip_scale(buf, t->length, t->cons.clip_norm);
		} else if (kind == OP_PULL && !(flags & RDMAPS_PULL_RELAXED)) {
			if (t->cons.mode == RDMAPS_BSP)
				op->min_clock = t->clock;
			else if (t->cons.mode == RDMAPS_SSP && t->clock > t->cons.staleness)
				op->min_clock = t->clock - t->cons.staleness;
			op->deadline = rdmaps__now_ns() + (uint64_t)c->timeout_ms * 1000000u;
		}
		op->total_chunks = 0;
		for (uint32_t p = lo; p < hi; p++)
			op->total_chunks += t->part[p].nchunks;
		op->done_chunks = op->inflight = 0;
		op->unposted = op->total_chunks;
		op->rows = NULL;
		op->nrows = op->row_next = 0;
		memset(op->next, 0, sizeof(op->next[0]) * t->nparts);
		memset(op->last_seq, 0, sizeof(op->last_seq[0]) * c->nconn);
		memset(op->seq0, 0, sizeof(op->seq0[0]) * c->nconn);
		memset(op->local0, 0, sizeof(op->local0[0]) * c->nconn);
		memset(op->pdone, 0, sizeof(op->pdone[0]) * c->nconn);
		if (kind == OP_PULL || kind == OP_PULL_ROWS)
			c->stats.pulls++;
		else
			c->stats.pushes++;
		cl_postq_add(c, op);
		*out = op;
		return 0;
	}
	return RDMAPS_EBUSY;
}

int cl_op_start_parts(rdmaps_client *c, enum op_kind kind, rdmaps_tensor *t, float *buf,
		      unsigned flags, bool assign, uint32_t lo, uint32_t hi, rdmaps_op **out)
{
	int rc = cl_op_alloc(c, kind, t, buf, flags, assign, lo, hi, out);

	if (!rc)
		cl_op_post(*out);
	return rc;
}

static int op_release(rdmaps_op *op)
{
	int st = op->status;

	/* a checked BSP pull saw every clock before its own complete: the
	 * worker may push its next one */
	if (!st && op->kind == OP_PULL && !(op->flags & RDMAPS_PULL_RELAXED))
		op->t->bsp_pushed = false;
	op->kind = OP_FREE;
	/* ops are taken lowest index first: a blocking caller's progress loop
	 * then looks at one op, not CL_MAX_OPS */
	while (op->c->ops_hi && op->c->ops[op->c->ops_hi - 1].kind == OP_FREE)
		op->c->ops_hi--;
	return st;
}

static void check_cms(rdmaps_client *c)
{
	for (uint32_t i = 0; i < c->nconn; i++)
		cl_check_cm(&c->conn[i]);
}

/*
 * A connection broke under a push: once the NIC has given every request
 * back, reconnect, which settles the pushes (resume.c); if no reconnect is
 * possible they fail with its error. Blocks up to the connect timeout.
 * Returns the reconnect's error, or 0 (also when it is not time yet).
 */
static int settle(rdmaps_client *c)
{
	int rc;

	for (uint32_t j = 0; j < c->ops_hi; j++)
		if (c->ops[j].kind != OP_FREE && c->ops[j].inflight)
			return 0;
	if ((rc = cl_reconnect(c)))
		cl_resume_fail(c, rc);
	return rc;
}

/*
 * A waiting caller busy-polls while completions come, and for spin_us
 * (default 50 us; RDMAPS_SPIN_US, -1: never sleep) after the last one; past that it sleeps until a completion event or a
 * timeout of an eighth of the wait so far (at most CL_SLEEP_MAX_NS), then
 * polls again. With more worker threads than cores (many workers on one
 * host, or a VM), pure spinning took the cores the server's fold thread and
 * the NIC's software needed: folds/s fell fivefold from 4 to 32 pushing
 * workers in one VM, and yielding instead of sleeping changed nothing
 * (a yielding thread stays runnable). A completion wakes the sleeper at
 * once; what raises none (a credit the server WRITEs, a fold it reports)
 * is seen within the timeout, which stays a small share of the wait.
 */
/* 4 ms, not the 1 ms it was: a wait long enough to reach it is seen late
 * by at most an eighth of itself either way, and with 32 workers waiting
 * for credits on one VM's two vCPUs, their wake-ups every millisecond took
 * the CPU the server folds on (folds/s with 32 pushers against 4: 0.53 at
 * 1 ms, 0.81 at 4 ms and at 8 ms, one boot; a lone 4 MiB folded push
 * 2-5 % slower at 8 ms) */
#define CL_SLEEP_MAX_NS 4000000u

struct idle {
	uint64_t cqes;  /* completions seen at the last look */
	uint64_t since; /* when they stopped coming, or 0 */
	unsigned polls;
};

/* Sleep up to ns, or until a CQ that was armed before the last poll raises
 * an event; arm those that are not, so the next call can sleep on them. */
static void sleep_on_cqs(rdmaps_client *c, uint64_t ns)
{
	struct pollfd pf[RDMAPS_MAX_SERVERS];
	struct cl_conn *of[RDMAPS_MAX_SERVERS];
	struct timespec ts = { 0, (long)ns };
	nfds_t n = 0;
	bool fresh = false;

	for (uint32_t i = 0; i < c->nconn && n < RDMAPS_MAX_SERVERS; i++) {
		struct cl_conn *k = &c->conn[i];
		if (!k->cq || !k->cc)
			continue;
		if (!k->armed) {
			/* a completion that came before this raises no event:
			 * the caller polls once more before it sleeps on it */
			if (ibv_req_notify_cq(k->cq, 0))
				continue;
			k->armed = fresh = true;
		}
		pf[n].fd = k->cc->fd;
		pf[n].events = POLLIN;
		of[n++] = k;
	}
	if (fresh)
		return;
	if (ppoll(n ? pf : NULL, n, &ts, NULL) <= 0)
		return;
	for (nfds_t j = 0; j < n; j++) {
		struct ibv_cq *cq;
		void *ctx;
		if (!(pf[j].revents & POLLIN))
			continue;
		while (!ibv_get_cq_event(of[j]->cc, &cq, &ctx)) {
			ibv_ack_cq_events(cq, 1);
			of[j]->armed = false;
		}
	}
}

static void backoff(rdmaps_client *c, struct idle *w)
{
	uint64_t cqes = 0, waited;

	for (uint32_t i = 0; i < c->nconn; i++)
		cqes += c->conn[i].cqes;
	if (cqes != w->cqes) {
		w->cqes = cqes;
		w->since = 0;
		w->polls = 0;
		return;
	}
	/* the clock only every 64 empty polls: spinning stays syscall-free */
	if (!w->since) {
		if ((++w->polls & 63u) == 0)
			w->since = rdmaps__now_ns();
		rdmaps__cpu_relax();
		return;
	}
	waited = rdmaps__now_ns() - w->since;
	if (c->spin_ns < 0 || waited < (uint64_t)c->spin_ns) {
		rdmaps__cpu_relax();
		return;
	}
	/* asleep, the callers' every-1024-rounds look at the connections
	 * would come a second apart: the goodbye of a server this wait is on
	 * (requests or pushes in flight there) is read now; cl_check_cm
	 * looks at most once a millisecond. An idle connection's news waits
	 * for that look, as an op that needs no part of a dead server need
	 * not wait for its reconnect */
	for (uint32_t i = 0; i < c->nconn; i++) {
		struct cl_conn *k = &c->conn[i];
		if (k->sq_outstanding || cl_folded_seq(k) < k->next_seq)
			cl_check_cm(k);
	}
	sleep_on_cqs(c, waited / 8 < CL_SLEEP_MAX_NS ? waited / 8 : CL_SLEEP_MAX_NS);
}

int rdmaps_test(rdmaps_op *op)
{
	if (!op || op->kind == OP_FREE)
		return RDMAPS_EINVAL;
	cl_progress(op->c);
	if (cl_op_unsettled(op)) {
		settle(op->c);
		cl_progress(op->c);
	}
	if (op->status == RDMAPS_EAGAIN || op->inflight)
		return RDMAPS_EAGAIN;
	return op_release(op);
}

int cl_op_wait(rdmaps_op *op, int timeout_ms)
{
	rdmaps_client *c;
	uint64_t deadline;
	unsigned spins = 0;
	struct idle idle = { 0 };

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
		if (cl_op_unsettled(op))
			settle(c);
		if ((++spins & 1023u) == 0) {
			check_cms(c);
			if (rdmaps__now_ns() > deadline)
				return RDMAPS_ETIMEDOUT;
		}
		backoff(c, &idle);
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

int rdmaps_pull_half_async(rdmaps_client *c, rdmaps_tensor *t, uint16_t *dst, unsigned flags,
			   rdmaps_op **op)
{
	int rc;

	if ((flags & RDMAPS_PUSH_FOLDED) || !t || !t->pull_fmt || !dst)
		return RDMAPS_EINVAL;
	/* the op holds float *buf: the 16-bit values go where it points */
	if ((rc = cl_op_alloc(c, OP_PULL, t, (float *)(void *)dst, flags, false, 0, t->nparts, op)))
		return rc;
	(*op)->half = CL_HALF_RAW;
	(*op)->mr = cl_find_mr(c, dst, (size_t)t->length * 2);
	cl_op_post(*op);
	return 0;
}

int rdmaps_pull_half(rdmaps_client *c, rdmaps_tensor *t, uint16_t *dst, unsigned flags)
{
	rdmaps_op *op;
	int rc = rdmaps_pull_half_async(c, t, dst, flags, &op);

	return rc ? rc : cl_op_wait(op, -1);
}

enum rdmaps_format rdmaps_pull_format(const rdmaps_tensor *t)
{
	return t ? (enum rdmaps_format)t->pull_fmt : RDMAPS_FMT_F32;
}

int rdmaps_push_async(rdmaps_client *c, rdmaps_tensor *t, const float *grad, unsigned flags,
		      rdmaps_op **op)
{
	int rc;

	if (flags & RDMAPS_PULL_RELAXED)
		return RDMAPS_EINVAL;
	if (t && t->wire && c && grad && op) {
		/* compressed: checked whole, then encoded once the op is taken
		 * (taking it counts a clock), then posted */
		if ((rc = cl_wire_check(t, grad)) ||
		    (rc = cl_op_alloc(c, OP_PUSH, t, (float *)(uintptr_t)grad, flags, false, 0,
				      t->nparts, op)))
			return rc;
		cl_wire_encode(t, grad, *op);
		cl_op_post(*op);
		return 0;
	}
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
	struct idle idle = { 0 };
	int rc = 0;

	if (!c)
		return RDMAPS_EINVAL;
	deadline = timeout_ms < 0 ? UINT64_MAX : rdmaps__now_ns() + (uint64_t)timeout_ms * 1000000u;
	for (;;) {
		bool pending = false;
		cl_progress(c);
		/* a failure: reconnect, settle what it left unsure, wait on */
		if (c->broken && (rc = settle(c)))
			return rc;
		for (uint32_t i = 0; i < CL_MAX_OPS; i++)
			if ((c->ops[i].kind == OP_PUSH || c->ops[i].kind == OP_PUSH_ROWS) && c->ops[i].unposted &&
			    c->ops[i].status == RDMAPS_EAGAIN)
				pending = true;
		for (uint32_t i = 0; i < c->nconn && !pending; i++)
			if (cl_folded_seq(&c->conn[i]) < c->conn[i].next_seq)
				pending = true;
		if (!pending)
			break;
		if ((++spins & 1023u) == 0) {
			check_cms(c);
			if (rdmaps__now_ns() > deadline)
				return RDMAPS_ETIMEDOUT;
		}
		backoff(c, &idle);
	}
	if (c->lost) {
		/* reported once: pushes a failure lost (lost_pushes counts them) */
		c->lost = false;
		return RDMAPS_EDISCONNECTED;
	}
	rc = c->dropped_unseen ? RDMAPS_EREMOTE : 0;
	c->dropped_unseen = false;
	for (uint32_t i = 0; i < c->nconn; i++) {
		struct cl_conn *k = &c->conn[i];
		uint32_t dropped = __atomic_load_n(&k->credit->dropped, __ATOMIC_ACQUIRE);
		if (dropped != k->dropped_seen) {
			k->dropped_seen = dropped;
			rc = RDMAPS_EREMOTE;
		}
	}
	return rc;
}
