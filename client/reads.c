/*
 * reads.c -- the READs of a pull: posting them (a run of float32 chunks per
 * READ, or of 16-bit chunks) and checking what each brought back
 * (version, count, checksum, clock), with a re-read of a torn or stale
 * chunk in the same slot. Two-copy windows are copies.c's; the op
 * machinery is ops.c's. Work requests on the stack; nothing allocates.
 */
#include <string.h>
#include <arpa/inet.h>

#include "client.h"
#include "error.h"
#include "half.h"

struct ibv_sge cl_read_values(const struct cl_conn *k, const rdmaps_op *op,
			      const struct read_slot *rs, uint32_t len)
{
	/* straight into the caller's buffer when it is registered (a 16-bit
	 * pull converted to float never is: it goes through the bounce) */
	bool direct = op->half ? op->half == CL_HALF_RAW && op->mr : op->mr != NULL;
	uintptr_t dst = op->half ? (uintptr_t)((uint16_t *)(void *)op->buf + rs->dst_off)
				 : (uintptr_t)(op->buf + rs->dst_off);

	return (struct ibv_sge){ .addr = direct ? dst : (uintptr_t)rs->bounce,
				 .length = len,
				 .lkey = direct ? op->mr->mr[k->pd_idx]->lkey : k->data_mr->lkey };
}

/*
 * One READ for the chunks of slots s[0..n) (consecutive chunks of one part,
 * from the same copy; n <= k->read_span, and n == 1 for a small float32
 * chunk), of the float32 chunks or of the part's 16-bit copy (op->half).
 * Each chunk's header goes to its slot's scratch and its values straight to
 * the caller (or its bounce; 16-bit values converted there when checked).
 * Between two chunks the READ also brings the pad after the first one's
 * values: it lands in the second's scratch lead. A 16-bit copy is one
 * copy: each chunk is still checked on its own and a torn one read again
 * alone.
 */
int cl_post_reads(struct cl_conn *k, rdmaps_op *op, const uint32_t *s, uint32_t n)
{
	rdmaps_tensor *t = op->t;
	const struct read_slot *rs0 = &k->rs[s[0]];
	const struct cl_part *pt = &t->part[rs0->part];
	const bool half = op->half != CL_HALF_NONE;
	/* the 16-bit copy's headers are read whole: no skip */
	const uint32_t skip = half ? 0 : pt->skip, elem = half ? 2u : (uint32_t)sizeof(float);
	const uint64_t stride = half ? pt->half_stride : t->stride;
	const uint64_t base = half ? pt->half_addr : pt->raddr + rs0->copy * pt->copy_off;
	struct ibv_sge sge[2 * RDMAPS_READ_SPAN];
	struct ibv_send_wr wr = {
		.wr_id = WR_ID(WR_READ, k->idx, s[0]),
		.sg_list = sge,
		.num_sge = (int)(2 * n),
		.opcode = IBV_WR_RDMA_READ,
		.send_flags = IBV_SEND_SIGNALED,
		.wr.rdma = { .remote_addr = base + (uint64_t)rs0->local * stride + skip,
			     .rkey = pt->rkey },
	}, *bad;
	uint32_t pad = 0; /* bytes between the last chunk's values and this header */
	int rc;

	for (uint32_t i = 0; i < n; i++) {
		struct read_slot *rs = &k->rs[s[i]];
		uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems, pt->first + rs->local);
		uint32_t from = i ? 0 : skip; /* header bytes this chunk's READ leaves out */

		sge[2 * i] = (struct ibv_sge){ .addr = (uintptr_t)rs->scratch + from - pad,
					       .length = pad + RDMAPS_CHUNK_HDR - from,
					       .lkey = k->ctl_mr->lkey };
		sge[2 * i + 1] = cl_read_values(k, op, rs, count * elem);
		rs->next = i + 1 < n ? s[i + 1] : CL_RS_NONE;
		pad = (uint32_t)(stride - (RDMAPS_CHUNK_HDR + (uint64_t)count * elem));
	}
	/* a small float32 chunk whole into its scratch (n == 1); 16-bit
	 * values always go where half_done looks for them */
	if (!half && cl_read_whole(sge[1].length / (uint32_t)sizeof(float))) {
		sge[0].length += sge[1].length;
		wr.num_sge = 1;
	}
	rc = ibv_post_send(k->qp, &wr, &bad);
	if (rc)
		return rdmaps__from_errno(rc);
	k->sq_outstanding++;
	op->c->stats.reads++;
	return 0;
}

int cl_post_read(struct cl_conn *k, rdmaps_op *op, uint32_t s)
{
	return cl_post_reads(k, op, &s, 1);
}

/*
 * A READ of slot s brought a torn chunk, or one older than the worker's
 * clock allows: read it again with the same slot, within the op's budget
 * (tries, or the clock's deadline), else finish the op. Two copies: the
 * one read is being rewritten, so two folds came since the index was
 * read; the other holds the newer, and a retry is checked on arrival.
 * True when posted again: the slot stays with the op.
 */
static bool read_again(struct cl_conn *k, rdmaps_op *op, uint32_t s, bool stale, bool two)
{
	struct read_slot *rs = &k->rs[s];
	bool again;
	int rc;

	if (stale) {
		k->c->stats.stale_retries++;
		again = rdmaps__now_ns() < op->deadline;
	} else {
		k->c->stats.pull_retries++;
		again = ++rs->tries < CL_MAX_TRIES;
	}
	if (again && op->status == RDMAPS_EAGAIN) {
		if (two) {
			rs->copy ^= 1u;
			rs->verify = true;
		}
		/* torn again and again: a snapshot, not one more race */
		if (!stale && !rs->snapped && rs->tries >= k->c->snap_after) {
			cl_snap_ask(k, s);
			return true;
		}
		rc = cl_post_read(k, op, s);
		if (!rc)
			return true;
		cl_fail(k, rc, "ibv_post_send failed");
		cl_op_finish(op, rc);
	} else {
		cl_op_finish(op, stale ? RDMAPS_ETIMEDOUT : RDMAPS_ETORN);
	}
	return false;
}

/* A READ of the 16-bit copy is in (post_half_read): check it as a float32
 * chunk is checked, over its 2-byte values, then convert or keep them. */
static void half_done(struct cl_conn *k, uint32_t s)
{
	struct read_slot *rs = &k->rs[s];
	rdmaps_op *op = &k->c->ops[rs->op];
	rdmaps_tensor *t = op->t;
	uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems,
					     t->part[rs->part].first + rs->local);
	const struct rdmaps_chunk_hdr *h = (const void *)rs->scratch;
	uint16_t *dst16 = (uint16_t *)(void *)op->buf + rs->dst_off;
	const uint16_t *got = op->half == CL_HALF_RAW && op->mr ? dst16
								 : (const uint16_t *)(void *)rs->bounce;
	bool relaxed = op->flags & RDMAPS_PULL_RELAXED;
	bool whole = relaxed || (!(h->version & 1u) && h->count == count &&
				 rdmaps__checksum(got, (size_t)count * 2) == h->checksum);
	bool stale = whole && !relaxed && h->clock < op->min_clock;

	if (!whole || stale) {
		if (read_again(k, op, s, stale, false))
			return;
	} else {
		if (op->half == CL_HALF_FLOAT)
			(t->pull_fmt == RDMAPS_FMT_BF16 ? rdmaps__bf16_to_f32_n
							: rdmaps__f16_to_f32_n)(op->buf + rs->dst_off,
										got, count);
		else if (got != dst16)
			memcpy(dst16, got, (size_t)count * 2);
		op->done_chunks++;
	}
	op->inflight--;
	k->rs_free[k->nrs_free++] = s;
}

void cl_read_done(struct cl_conn *k, uint32_t s)
{
	struct read_slot *rs = &k->rs[s];
	rdmaps_op *op = &k->c->ops[rs->op];
	rdmaps_tensor *t = op->t;
	uint32_t chunk = t->part[rs->part].first + rs->local;
	uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems, chunk);
	float *dst = op->buf + rs->dst_off;
	bool small = cl_read_whole(count); /* as post_reads chose */
	const float *got = small ? (const float *)(rs->scratch + RDMAPS_CHUNK_HDR)
				 : op->mr ? dst : rs->bounce;
	struct rdmaps_chunk_hdr *h = (void *)rs->scratch;

	cl_snap_read_done(k, s);
	if (op->half) {
		half_done(k, s);
		return;
	}
	bool relaxed = op->flags & RDMAPS_PULL_RELAXED;
	bool two = t->part[rs->part].copy_off != 0;

	if (t->part[rs->part].skip) {
		/* not read (ASP, one copy): nothing to wait for, the layout is
		 * known, and the checksum alone is the guard (chunk.h) */
		h->clock = 0;
		h->count = count;
		h->version = 0;
	}
	/* two copies, first READ of a window's chunk: the checksum waits for
	 * the window's validation (copies.c), which mostly makes it needless */
	bool deferred = two && !relaxed && !rs->verify;
	/* whole (not torn), and fresh enough? With two copies, also no older
	 * than the index promised: a retry's other copy may hold the fold before */
	bool whole = relaxed || (h->version >= rs->want &&
				 (deferred ? !(h->version & 1u) && h->count == count
					   : rdmaps__chunk_consistent(h, got, count)));
	bool stale = whole && !relaxed && h->clock < op->min_clock;

	if (!whole || stale) {
		/* raced a fold, or older than this worker's clock allows */
		if (read_again(k, op, s, stale, two))
			return;
	} else {
		if (got != dst)
			memcpy(dst, got, (size_t)count * sizeof(float));
		if (deferred)
			cl_ix_defer(k, op, s, h);
		else if (two && !relaxed)
			cl_ix_done(k, op, s);
		else
			op->done_chunks++;
	}
	op->inflight--;
	k->rs_free[k->nrs_free++] = s;
}
