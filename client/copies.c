/*
 * copies.c -- pulls of tensors the server keeps in two copies.
 *
 * The server folds into the copy readers are not sent to, then moves the
 * chunk's index word on (server/store.c; docs/design.md, "Two copies"). A
 * pull here goes by windows of up to CL_INDEX_WORDS chunks of one part; a
 * connection has CL_WINDOWS of them (so a window's READs can start while
 * the one before waits for its validation), each owned by one op:
 *
 *   1. READ the window's index words x. Bit 1 of x names the copy to read;
 *      x & ~1 is the version that copy holds at least.
 *   2. READ each chunk from that copy. Count, parity and version are checked
 *      at once; the checksum is only kept.
 *   3. When every chunk of the window is in, READ the index words again: y.
 *      The copy read is written again only by the second version after x
 *      (a version: one fold, or a fold thread's batch of them), and that
 *      makes the word (x | 1) + 2 before its first store. So
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

/* wr_id index of an index READ: the window's sequence number and the window */
#define IX_WR(seq, w) (((seq) << 1) | (w))

static uint32_t op_no(const rdmaps_op *op)
{
	return (uint32_t)(op - op->c->ops) + 1;
}

/* The window's owner, if it is still a pending pull. */
static rdmaps_op *owner(struct cl_conn *k, const struct cl_window *w)
{
	rdmaps_op *o;

	if (!w->owner)
		return NULL;
	o = &k->c->ops[w->owner - 1];
	if (o->gen != w->gen || o->kind != OP_PULL || o->status != RDMAPS_EAGAIN)
		return NULL;
	return o;
}

/* The window of slot s's READ, if op still owns it. */
static struct cl_window *mine(struct cl_conn *k, const rdmaps_op *op, uint32_t s)
{
	const struct read_slot *rs = &k->rs[s];
	struct cl_window *w = &k->win[rs->win];

	if (w->owner == op_no(op) && w->gen == op->gen && rs->part == w->part &&
	    rs->local >= w->lo && rs->local - w->lo < w->n)
		return w;
	return NULL;
}

static void window_free(struct cl_window *w)
{
	w->owner = 0;
	w->phase = IX_IDLE;
}

/* READ the index words of window w into buf (w->ix or w->ix2). */
static int post_index(struct cl_conn *k, struct cl_window *w, const struct cl_part *pt,
		      uint64_t *buf)
{
	struct ibv_sge sge = { .addr = (uintptr_t)buf, .length = w->n * (uint32_t)sizeof(uint64_t),
			       .lkey = k->ctl_mr->lkey };
	struct ibv_send_wr wr = {
		.wr_id = WR_ID(WR_INDEX, k->idx, IX_WR(w->seq + 1, (uint32_t)(w - k->win))),
		.sg_list = &sge,
		.num_sge = 1,
		.opcode = IBV_WR_RDMA_READ,
		.send_flags = IBV_SEND_SIGNALED,
		.wr.rdma = { .remote_addr = pt->index_addr + (uint64_t)w->lo * sizeof(uint64_t),
			     .rkey = pt->rkey },
	}, *bad;
	int rc = ibv_post_send(k->qp, &wr, &bad);

	if (rc)
		return rdmaps__from_errno(rc);
	k->sq_outstanding++;
	w->seq++;
	return 0;
}

/*
 * Before op posts the READ of its next chunk of part p: the window number
 * + 1 when a window of op holds that chunk's index word (*word), 0 when op
 * must come back later (an index READ in flight, or no window free), < 0 on
 * failure.
 */
int cl_ix_ready(struct cl_conn *k, rdmaps_op *op, uint32_t p, uint64_t *word)
{
	const struct cl_part *pt = &op->t->part[p];
	uint32_t next = op->next[p];
	struct cl_window *free_w = NULL;
	int rc;

	for (uint32_t i = 0; i < CL_WINDOWS; i++) {
		struct cl_window *w = &k->win[i];
		if (w->owner && !owner(k, w))
			window_free(w); /* its owner finished or failed */
		if (!w->owner) {
			if (!free_w)
				free_w = w;
			continue;
		}
		if (w->owner != op_no(op) || w->part != p)
			continue;
		/* one window per op and part: a failed validation sends op->next
		 * back to its start, which must not be behind another window */
		if (w->phase != IX_POST || next < w->lo || next - w->lo >= w->n)
			return 0;
		*word = w->ix[next - w->lo];
		return (int)i + 1;
	}
	if (!free_w || k->sq_outstanding >= CL_SQ_DEPTH)
		return 0;
	free_w->part = p;
	free_w->lo = next;
	free_w->n = pt->nchunks - next < CL_INDEX_WORDS ? pt->nchunks - next : CL_INDEX_WORDS;
	if ((rc = post_index(k, free_w, pt, free_w->ix)))
		return rc;
	free_w->owner = op_no(op);
	free_w->gen = op->gen;
	free_w->pending = free_w->n;
	free_w->done = 0;
	memset(free_w->checked, 0, free_w->n * sizeof(free_w->checked[0]));
	free_w->verify = false;
	free_w->phase = IX_INDEX;
	return 0;
}

/* After posting the first READ of chunk rs->local (slot s). */
void cl_ix_posted(struct cl_conn *k, rdmaps_op *op, uint32_t s)
{
	struct cl_window *w = &k->win[k->rs[s].win];

	if (k->rs[s].local + 1 != w->lo + w->n)
		return;
	if (op->flags & RDMAPS_PULL_RELAXED)
		window_free(w); /* nothing to validate */
	else
		w->phase = IX_DRAIN;
}

/*
 * The second index READ is in (step 3): accept every chunk whose copy no
 * fold can have touched, hash the others, and either close the window or
 * read it again with a checksum per chunk.
 */
static void validate(struct cl_window *w, rdmaps_op *op)
{
	const rdmaps_tensor *t = op->t;
	const struct cl_part *pt = &t->part[w->part];

	for (uint32_t j = 0; j < w->n; j++) {
		if (w->checked[j] || w->ix2[j] <= (w->ix[j] | 1u) + 1u)
			continue;
		uint32_t chunk = pt->first + w->lo + j;
		uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems, chunk);
		const float *dst = op->buf + (size_t)chunk * t->chunk_elems;
		if (rdmaps__checksum(dst, (size_t)count * sizeof(float)) == w->sum[j])
			continue; /* a fold came, but this READ was whole anyway */
		/* torn: the whole window again, each chunk checked on arrival */
		op->c->stats.pull_retries++;
		op->done_chunks -= w->done;
		op->next[w->part] = w->lo;
		op->unposted += w->n;
		w->pending = w->n;
		w->done = 0;
		memset(w->checked, 0, w->n * sizeof(w->checked[0]));
		w->verify = true;
		w->phase = IX_POST;
		cl_postq_add(op->c, op); /* it had posted everything once */
		return;
	}
	op->done_chunks += w->n - w->done;
	window_free(w);
}

/* One more chunk of window w is in: after the last, step 3. */
static void chunk_in(struct cl_conn *k, struct cl_window *w, rdmaps_op *op)
{
	int rc;

	if (--w->pending || w->phase != IX_DRAIN)
		return;
	if (w->done == w->n) { /* every chunk was checksummed already */
		window_free(w);
		return;
	}
	/* room: the completion that brought us here freed a send queue entry */
	if ((rc = post_index(k, w, &op->t->part[w->part], w->ix2))) {
		cl_fail(k, rc, "ibv_post_send failed");
		op->status = rc;
		return;
	}
	w->phase = IX_CHECK;
}

/* A chunk READ passed the checks of step 2 (data already in the caller's
 * buffer): keep its checksum for step 3. */
void cl_ix_defer(struct cl_conn *k, rdmaps_op *op, uint32_t s, const struct rdmaps_chunk_hdr *h)
{
	struct cl_window *w = mine(k, op, s);

	if (!w)
		return; /* a failed op's late READ */
	w->sum[k->rs[s].local - w->lo] = h->checksum;
	chunk_in(k, w, op);
}

/* A chunk READ checked by its checksum (a retry, or a window read again):
 * done now. */
void cl_ix_done(struct cl_conn *k, rdmaps_op *op, uint32_t s)
{
	struct cl_window *w = mine(k, op, s);

	op->done_chunks++;
	if (!w)
		return;
	w->checked[k->rs[s].local - w->lo] = true;
	w->done++;
	chunk_in(k, w, op);
}

/* An index READ completed (its wr_id index: IX_WR(seq, window)). */
void cl_ix_complete(struct cl_conn *k, uint32_t id)
{
	struct cl_window *w = &k->win[(id & 1u) % CL_WINDOWS];
	rdmaps_op *op = owner(k, w);

	if ((id >> 1) != (w->seq & 0x7fffffffu) || !op)
		return; /* an older READ, or its op is gone: the next claim frees it */
	if (w->phase == IX_INDEX)
		w->phase = IX_POST;
	else if (w->phase == IX_CHECK)
		validate(w, op);
}
