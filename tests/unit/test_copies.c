/*
 * client/copies.c, the window of a two-copy pull, driven step by step with
 * a fake queue pair: every work request it posts is captured and "served"
 * by the test from a simulated server index, so each outcome of the
 * validation (no fold, a fold but a whole READ, a torn READ) is forced
 * rather than hoped for under load.
 */
#include <criterion/criterion.h>
#include <string.h>

#include "client.h"

#define NCH 3u
#define CE 16u /* floats per chunk */

static struct ibv_send_wr posted[8];
static struct ibv_sge posted_sge[8];
static int nposted;

static int fake_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad)
{
	(void)qp;
	(void)bad;
	cr_assert_lt(nposted, 8);
	posted[nposted] = *wr;
	posted_sge[nposted] = wr->sg_list[0];
	nposted++;
	return 0;
}

static struct ibv_context ctx;
static struct ibv_qp qp;
static struct ibv_mr mr;
static rdmaps_client cl;
static struct cl_conn *k;
static rdmaps_tensor *t;
static rdmaps_op *op;
static uint64_t server_index[NCH];
static uint64_t ctl_words[2 * CL_WINDOWS * CL_INDEX_WORDS];
static float dst[NCH * CE];

static void setup(void)
{
	static struct cl_conn conn;
	static uint8_t tbuf[sizeof(rdmaps_tensor) + sizeof(struct cl_part)];

	memset(&cl, 0, sizeof(cl));
	memset(&conn, 0, sizeof(conn));
	memset(tbuf, 0, sizeof(tbuf));
	nposted = 0;
	ctx.ops.post_send = fake_post_send;
	qp.context = &ctx;
	k = &conn;
	k->c = &cl;
	k->qp = &qp;
	k->ctl_mr = &mr;
	for (uint32_t w = 0; w < CL_WINDOWS; w++) {
		k->win[w].ix = ctl_words + 2 * w * CL_INDEX_WORDS;
		k->win[w].ix2 = k->win[w].ix + CL_INDEX_WORDS;
	}
	cl.conn = k;
	cl.nconn = 1;
	t = (rdmaps_tensor *)tbuf;
	t->c = &cl;
	t->length = NCH * CE;
	t->chunk_elems = CE;
	t->nchunks = NCH;
	t->nparts = 1;
	t->part[0] = (struct cl_part){ .nchunks = NCH, .copy_off = 4096, .index_addr = 0x10000 };
	op = &cl.ops[0];
	*op = (struct rdmaps_op){ .c = &cl, .kind = OP_PULL, .status = RDMAPS_EAGAIN, .gen = 7, .t = t,
				  .buf = dst, .part_hi = 1, .total_chunks = NCH };
	for (uint32_t i = 0; i < NCH; i++)
		server_index[i] = 4; /* two folds each: copy 0 current */
}

/* Serve the last posted READ of index words from server_index. */
static uint32_t serve_index(void)
{
	const struct ibv_send_wr *w = &posted[nposted - 1];
	const struct ibv_sge *s = &posted_sge[nposted - 1];
	uint32_t first = (uint32_t)((w->wr.rdma.remote_addr - 0x10000) / sizeof(uint64_t));

	cr_assert_eq(w->opcode, IBV_WR_RDMA_READ);
	cr_assert_eq(WR_KIND(w->wr_id), WR_INDEX);
	memcpy((void *)(uintptr_t)s->addr, &server_index[first], s->length);
	return WR_IDX(w->wr_id);
}

/* The chunk READs of the window: each chunk's data and header as read. */
static struct cl_window *W0(void)
{
	return &k->win[0];
}

static void read_chunks(const uint64_t *sums)
{
	for (uint32_t i = 0; i < NCH; i++) {
		uint64_t word = ~0ull;
		cr_assert_eq(cl_ix_ready(k, op, 0, &word), 1, "chunk %u: window 0 ready", i);
		cr_assert_eq(word, server_index[i], "chunk %u: its index word", i);
		uint32_t s = i;
		k->rs[s] = (struct read_slot){ .op = 0, .part = 0, .local = i, .win = 0,
					       .copy = (uint32_t)(word >> 1) & 1u,
					       .want = word & ~1ull };
		op->next[0] = i + 1;
		cl_ix_posted(k, op, s);
		for (uint32_t e = 0; e < CE; e++)
			dst[i * CE + e] = (float)(i + 1);
		struct rdmaps_chunk_hdr h = { .version = 4, .count = CE, .checksum = sums[i] };
		cl_ix_defer(k, op, s, &h);
	}
	op->unposted = 0;
}

static uint64_t sum_of(uint32_t i)
{
	return rdmaps__checksum(&dst[i * CE], CE * sizeof(float));
}

static void start_window(void)
{
	uint64_t word;

	cr_assert_eq(cl_ix_ready(k, op, 0, &word), 0, "the first call posts the index READ");
	cr_assert_eq(nposted, 1);
	cr_assert_eq(posted_sge[0].length, NCH * sizeof(uint64_t));
	cl_ix_complete(k, serve_index());
	cr_assert_eq(W0()->phase, IX_POST);
}

Test(copies, no_fold_means_no_checksum, .init = setup)
{
	uint64_t bogus[NCH] = { 1, 2, 3 }; /* never looked at when nothing moved */

	start_window();
	read_chunks(bogus);
	cr_assert_eq(W0()->phase, IX_CHECK, "all in: the index is read again");
	cr_assert_eq(nposted, 2);
	server_index[1] = 6; /* one fold: it wrote the other copy, harmless */
	server_index[2] = 5;
	cl_ix_complete(k, serve_index());
	cr_assert_eq(op->done_chunks, NCH, "every chunk accepted");
	cr_assert_eq(W0()->owner, 0, "the window is free again");
	cr_assert_eq(cl.stats.pull_retries, 0);
}

Test(copies, two_folds_and_a_whole_read_is_accepted, .init = setup)
{
	uint64_t sums[NCH];

	start_window();
	for (uint32_t i = 0; i < NCH; i++) {
		for (uint32_t e = 0; e < CE; e++)
			dst[i * CE + e] = (float)(i + 1);
		sums[i] = sum_of(i);
	}
	read_chunks(sums);
	server_index[0] = 7; /* the second fold began on the copy read */
	cl_ix_complete(k, serve_index());
	cr_assert_eq(op->done_chunks, NCH, "its checksum matched: the READ was whole");
	cr_assert_eq(W0()->owner, 0);
}

Test(copies, torn_read_rereads_the_window_checked, .init = setup)
{
	uint64_t sums[NCH] = { 0 };

	start_window();
	for (uint32_t i = 0; i < NCH; i++) {
		for (uint32_t e = 0; e < CE; e++)
			dst[i * CE + e] = (float)(i + 1);
		sums[i] = sum_of(i);
	}
	sums[2] ^= 1; /* chunk 2's body does not match its header: torn */
	read_chunks(sums);
	server_index[2] = 8;
	cl.npostq = 0;
	cl_ix_complete(k, serve_index());
	cr_assert_eq(op->done_chunks, 0, "nothing of the window counted");
	cr_assert_eq(op->next[0], 0, "the window is posted again from its start");
	cr_assert_eq(op->unposted, NCH);
	cr_assert(W0()->verify, "each chunk checked on arrival this time");
	cr_assert_eq(W0()->phase, IX_POST);
	cr_assert_eq(cl.npostq, 1, "the op is back in the post queue");
	cr_assert_eq(cl.stats.pull_retries, 1);
	/* the checked re-reads complete: the window closes without another READ */
	for (uint32_t i = 0; i < NCH; i++) {
		uint64_t word;
		cr_assert_eq(cl_ix_ready(k, op, 0, &word), 1);
		k->rs[i] = (struct read_slot){ .part = 0, .local = i, .win = 0, .verify = true };
		op->next[0] = i + 1;
		cl_ix_posted(k, op, i);
		cl_ix_done(k, op, i);
	}
	cr_assert_eq(op->done_chunks, NCH);
	cr_assert_eq(W0()->owner, 0);
	cr_assert_eq(nposted, 2, "no third index READ: every chunk was checksummed");
}

Test(copies, a_finished_owner_frees_the_window, .init = setup)
{
	uint64_t word;
	rdmaps_op *o2 = &cl.ops[1], *o3 = &cl.ops[2];

	start_window();
	*o2 = *op;
	o2->gen = 9;
	*o3 = *op;
	o3->gen = 11;
	/* a second op takes the other window while the first holds its own */
	cr_assert_eq(cl_ix_ready(k, o2, 0, &word), 0);
	cr_assert_eq(k->win[1].owner, 2, "the second op owns window 1");
	cr_assert_eq(nposted, 2, "with an index READ of its own");
	cr_assert_eq(cl_ix_ready(k, o3, 0, &word), 0);
	cr_assert_eq(nposted, 2, "a third op waits: no window is free");
	op->status = RDMAPS_ETORN; /* the first failed: its window is free again */
	cr_assert_eq(cl_ix_ready(k, o3, 0, &word), 0);
	cr_assert_eq(W0()->owner, 3, "the third op took window 0");
	cr_assert_eq(nposted, 3);
	/* the first op's late index READ changes nothing */
	cl_ix_complete(k, ((W0()->seq - 1) << 1) | 0u);
	cr_assert_eq(W0()->phase, IX_INDEX);
	cl_ix_complete(k, serve_index());
	cr_assert_eq(W0()->phase, IX_POST);
	cr_assert_eq(cl_ix_ready(k, o3, 0, &word), 1, "window 0 serves the third op");
}

Test(copies, the_next_pull_starts_while_one_validates, .init = setup)
{
	uint64_t sums[NCH] = { 0 }, word;
	rdmaps_op *o2 = &cl.ops[1];

	start_window();
	read_chunks(sums);
	cr_assert_eq(W0()->phase, IX_CHECK, "op 1 waits for its second index READ");
	*o2 = *op;
	o2->gen = 9;
	o2->done_chunks = 0;
	cr_assert_eq(cl_ix_ready(k, o2, 0, &word), 0);
	cr_assert_eq(k->win[1].phase, IX_INDEX, "op 2 already reads its index words");
	/* one op never holds two windows of a part: op 1 waits for its own */
	op->next[0] = 0;
	cr_assert_eq(cl_ix_ready(k, op, 0, &word), 0);
	cr_assert_eq(nposted, 3);
}
