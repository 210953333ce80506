/*
 * copies.c -- pulls of tensors the server keeps in two copies.
 *
 * The server folds into the copy readers are not sent to, then moves the
 * chunk's index word on (server/store.c; docs/design.md, "Two copies"). A
 * pull here goes by windows of up to CL_INDEX_WORDS chunks of one part; a
 * connection has one window, owned by one op at a time:
 *
 *   1. READ the window's index words x. Bit 1 of x names the copy to read;
 *      x & ~1 is the version that copy holds at least.
 *   2. READ each chunk from that copy. Count, parity and version are checked
 *      at once; the checksum is only kept.
 *   3. When every chunk of the window is in, READ the index words again: y.
 *      The copy read is written again only by the second fold after x, and
 *      that fold makes the word (x | 1) + 2 before its first store. So
 *      y <= (x | 1) + 1 means it had not begun when the chunk's READ had
 *      finished (that READ completed before this one was posted): the chunk
 *      was stable while it was read, and is accepted without hashing a byte.
 *      Only a chunk whose y is past that gets its checksum computed; if that
 *      fails, the window is read again with a checksum on every chunk, as a
 *      one-copy tensor is.
 *
 * A checked pull thus costs two small READs per window instead of XXH3 over
 * every byte, which leaves the CPU to the NIC (rxe) or to training. Nothing
 * relies on the order in which a NIC fetches or places bytes within or across
 * READs: each step is posted after the completion of the one before. A
 * relaxed pull uses step 1 only, to pick the copy.
 */
#include <string.h>

#include "client.h"
#include "error.h"

static uint32_t op_no(const rdmaps_op *op)
{
	return (uint32_t)(op - op->c->ops) + 1;
}

/* The window's owner, if it is still a pending pull. */
static rdmaps_op *owner(struct cl_conn *k)
{
	rdmaps_op *o;

	if (!k->ix_owner)
		return NULL;
	o = &k->c->ops[k->ix_owner - 1];
	if (o->gen != k->ix_gen || o->kind != OP_PULL || o->status != RDMAPS_EAGAIN)
		return NULL;
	return o;
}

static bool mine(struct cl_conn *k, const rdmaps_op *op, uint32_t s)
{
	const struct read_slot *rs = &k->rs[s];

	return k->ix_owner == op_no(op) && k->ix_gen == op->gen && rs->part == k->ix_part &&
	       rs->local >= k->ix_lo && rs->local - k->ix_lo < k->ix_n;
}

static void window_free(struct cl_conn *k)
{
	k->ix_owner = 0;
	k->ix_phase = IX_IDLE;
}

/* READ the index words of the window into buf (k->ix or k->ix2). */
static int post_index(struct cl_conn *k, const struct cl_part *pt, uint64_t *buf)
{
	struct ibv_sge sge = { .addr = (uintptr_t)buf, .length = k->ix_n * (uint32_t)sizeof(uint64_t),
			       .lkey = k->ctl_mr->lkey };
	struct ibv_send_wr wr = {
		.wr_id = WR_ID(WR_INDEX, k->idx, k->ix_seq + 1),
		.sg_list = &sge,
		.num_sge = 1,
		.opcode = IBV_WR_RDMA_READ,
		.send_flags = IBV_SEND_SIGNALED,
		.wr.rdma = { .remote_addr = pt->index_addr + (uint64_t)k->ix_lo * sizeof(uint64_t),
			     .rkey = pt->rkey },
	}, *bad;
	int rc = ibv_post_send(k->qp, &wr, &bad);

	if (rc)
		return rdmaps__from_errno(rc);
	k->sq_outstanding++;
	k->ix_seq++;
	return 0;
}

/*
 * Before op posts the READ of its next chunk of part p: 1 when the window
 * holds that chunk's index word (k->ix[next - ix_lo]), 0 when op must come
 * back later (an index READ in flight, the previous window not validated
 * yet, or another op's window), < 0 on failure.
 */
int cl_ix_ready(struct cl_conn *k, rdmaps_op *op, uint32_t p)
{
	const struct cl_part *pt = &op->t->part[p];
	uint32_t next = op->next[p];
	int rc;

	if (k->ix_owner && k->ix_owner != op_no(op)) {
		if (owner(k))
			return 0;
		window_free(k); /* its owner finished or failed */
	}
	if (k->ix_owner)
		return k->ix_phase == IX_POST && k->ix_part == p && next >= k->ix_lo &&
		       next - k->ix_lo < k->ix_n;
	if (k->sq_outstanding >= CL_SQ_DEPTH)
		return 0;
	k->ix_part = p;
	k->ix_lo = next;
	k->ix_n = pt->nchunks - next < CL_INDEX_WORDS ? pt->nchunks - next : CL_INDEX_WORDS;
	if ((rc = post_index(k, pt, k->ix)))
		return rc;
	k->ix_owner = op_no(op);
	k->ix_gen = op->gen;
	k->ix_pending = k->ix_n;
	k->ix_done = 0;
	memset(k->ix_checked, 0, k->ix_n * sizeof(k->ix_checked[0]));
	k->ix_verify = false;
	k->ix_phase = IX_INDEX;
	return 0;
}

/* After posting the first READ of chunk rs->local (slot s). */
void cl_ix_posted(struct cl_conn *k, rdmaps_op *op, uint32_t s)
{
	if (k->rs[s].local + 1 != k->ix_lo + k->ix_n)
		return;
	if (op->flags & RDMAPS_PULL_RELAXED)
		window_free(k); /* nothing to validate */
	else
		k->ix_phase = IX_DRAIN;
}

/*
 * The second index READ is in (step 3): accept every chunk whose copy no
 * fold can have touched, hash the others, and either close the window or
 * read it again with a checksum per chunk.
 */
static void validate(struct cl_conn *k, rdmaps_op *op)
{
	const rdmaps_tensor *t = op->t;
	const struct cl_part *pt = &t->part[k->ix_part];

	for (uint32_t j = 0; j < k->ix_n; j++) {
		if (k->ix_checked[j] || k->ix2[j] <= (k->ix[j] | 1u) + 1u)
			continue;
		uint32_t chunk = pt->first + k->ix_lo + j;
		uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems, chunk);
		const float *dst = op->buf + (size_t)chunk * t->chunk_elems;
		if (rdmaps__checksum(dst, (size_t)count * sizeof(float)) == k->ix_sum[j])
			continue; /* a fold came, but this READ was whole anyway */
		/* torn: the whole window again, each chunk checked on arrival */
		k->c->stats.pull_retries++;
		op->done_chunks -= k->ix_done;
		op->next[k->ix_part] = k->ix_lo;
		op->unposted += k->ix_n;
		k->ix_pending = k->ix_n;
		k->ix_done = 0;
		memset(k->ix_checked, 0, k->ix_n * sizeof(k->ix_checked[0]));
		k->ix_verify = true;
		k->ix_phase = IX_POST;
		cl_postq_add(op->c, op); /* it had posted everything once */
		return;
	}
	op->done_chunks += k->ix_n - k->ix_done;
	window_free(k);
}

/* One more chunk of the window is in: after the last, step 3. */
static void chunk_in(struct cl_conn *k, rdmaps_op *op)
{
	int rc;

	if (--k->ix_pending || k->ix_phase != IX_DRAIN)
		return;
	if (k->ix_done == k->ix_n) { /* every chunk was checksummed already */
		window_free(k);
		return;
	}
	/* room: the completion that brought us here freed a send queue entry */
	if ((rc = post_index(k, &op->t->part[k->ix_part], k->ix2))) {
		cl_fail(k, rc, "ibv_post_send failed");
		op->status = rc;
		return;
	}
	k->ix_phase = IX_CHECK;
}

/* A chunk READ passed the checks of step 2 (data already in the caller's
 * buffer): keep its checksum for step 3. */
void cl_ix_defer(struct cl_conn *k, rdmaps_op *op, uint32_t s, const struct rdmaps_chunk_hdr *h)
{
	if (!mine(k, op, s))
		return; /* a failed op's late READ */
	k->ix_sum[k->rs[s].local - k->ix_lo] = h->checksum;
	chunk_in(k, op);
}

/* A chunk READ checked by its checksum (a retry, or a window read again):
 * done now. */
void cl_ix_done(struct cl_conn *k, rdmaps_op *op, uint32_t s)
{
	op->done_chunks++;
	if (!mine(k, op, s))
		return;
	k->ix_checked[k->rs[s].local - k->ix_lo] = true;
	k->ix_done++;
	chunk_in(k, op);
}

/* An index READ completed (seq from its wr_id). */
void cl_ix_complete(struct cl_conn *k, uint32_t seq)
{
	rdmaps_op *op = owner(k);

	if (seq != k->ix_seq || !op)
		return; /* an older READ, or its op is gone: the next claim frees it */
	if (k->ix_phase == IX_INDEX)
		k->ix_phase = IX_POST;
	else if (k->ix_phase == IX_CHECK)
		validate(k, op);
}
