/*
 * Settling pushes after a broken connection (client/resume.c), natively:
 * given the server's account, which chunks of each waiting push folded,
 * which post again, and what counts as lost -- across two breaks in a row
 * too, where the second connection's seqs restart at 1 while the part's
 * chunk indices go on.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"

static rdmaps_client c;
static struct cl_conn k;
static rdmaps_tensor *t;

/* One server, a tensor of `chunks` chunks in one part, one push op that has
 * posted all of them on the connection that broke, seqs [seq0, seq0+chunks). */
static rdmaps_op *setup(uint32_t chunks, uint64_t seq0, enum rdmaps_consistency mode)
{
	memset(&c, 0, sizeof(c));
	memset(&k, 0, sizeof(k));
	free(t);
	t = calloc(1, sizeof(*t) + sizeof(t->part[0]));
	cr_assert_not_null(t);
	t->c = &c;
	t->nparts = 1;
	t->part[0] = (struct cl_part){ .conn = 0, .first = 0, .nchunks = chunks };
	t->cons.mode = mode;
	c.conn = &k;
	c.nconn = 1;
	k.c = &c;
	k.idx = 0;
	k.resume_id = 77;
	k.resume_known = seq0; /* no credit said anything of this push */
	k.resume_next = seq0 + chunks;
	rdmaps_op *op = &c.ops[0];
	*op = (rdmaps_op){ .c = &c, .kind = OP_PUSH, .status = RDMAPS_EAGAIN, .t = t,
			   .part_lo = 0, .part_hi = 1, .total_chunks = chunks };
	op->next[0] = chunks;
	op->seq0[0] = seq0;
	op->local0[0] = 0;
	op->pdone[0] = op->done_chunks = chunks / 2; /* the break flushed the rest */
	c.ops_hi = 1;
	return op;
}

Test(resume, a_push_posts_again_what_did_not_fold)
{
	rdmaps_op *op = setup(32, 100, RDMAPS_ASP);

	cl_settle(&c, &k, 108, true, false); /* the first group of 8 folded */
	cr_assert_eq(op->status, RDMAPS_EAGAIN, "still going");
	cr_assert_eq(op->next[0], 8, "the next chunk to post");
	cr_assert_eq(op->unposted, 24);
	cr_assert_eq(op->done_chunks, 8);
	cr_assert_eq(op->pdone[0], 8);
	cr_assert_eq(op->seq0[0], 0, "the new connection starts its own run");
	cr_assert_eq(op->local0[0], 8);
	cr_assert_eq(c.stats.resent_slots, 24);
	cr_assert_eq(c.stats.lost_pushes, 0);
	cr_assert(!c.lost);
	cr_assert_eq(k.resume_id, 0, "settled");
	cr_assert_eq(c.npostq, 1, "queued to post");

	/* posted again on the new connection from seq 1, and it breaks too:
	 * only 4 of those fold. Folded chunks are 8 + 4, not 4 (nor 1 - 8). */
	op->seq0[0] = 1;
	op->next[0] = 32;
	op->unposted = 0;
	k.resume_id = 78;
	k.resume_known = 1;
	k.resume_next = 25;
	cl_settle(&c, &k, 5, true, false);
	cr_assert_eq(op->next[0], 12);
	cr_assert_eq(op->local0[0], 12);
	cr_assert_eq(op->unposted, 20);
	cr_assert_eq(op->done_chunks, 12);
	cr_assert_eq(c.stats.resent_slots, 24 + 20);
	cr_assert_eq(c.stats.lost_pushes, 0);
}

Test(resume, a_push_that_folded_whole_is_done)
{
	rdmaps_op *op = setup(16, 40, RDMAPS_ASP);

	cl_settle(&c, &k, 56, true, false);
	cr_assert_eq(op->status, RDMAPS_EAGAIN, "left for cl_progress to finish");
	cr_assert_eq(op->done_chunks, 16, "every chunk counted done");
	cr_assert_eq(op->unposted, 0);
	cr_assert_eq(op->last_seq[0], 0, "nothing of it on the new connection to wait for");
	cr_assert_eq(c.stats.resent_slots, 0);
	cr_assert_eq(c.stats.lost_pushes, 0);
}

Test(resume, a_clock_push_fails_and_counts_lost)
{
	rdmaps_op *op = setup(16, 40, RDMAPS_BSP);

	cl_settle(&c, &k, 48, true, false); /* half folded, the rest never will */
	cr_assert_eq(op->status, RDMAPS_EDISCONNECTED, "the worker joins the clock anew");
	cr_assert_eq(c.stats.lost_pushes, 8);
	cr_assert_eq(c.stats.resent_slots, 0);
	cr_assert(c.lost, "the next flush says so");
}

Test(resume, an_unknown_account_counts_what_no_credit_confirmed)
{
	rdmaps_op *op = setup(16, 40, RDMAPS_ASP);

	k.resume_known = 44; /* a credit had confirmed 4 */
	cl_settle(&c, &k, k.resume_known, false, true);
	cr_assert_eq(op->status, RDMAPS_EDISCONNECTED, "nothing is posted again unless known");
	cr_assert_eq(c.stats.lost_pushes, 12);
	cr_assert(c.lost);
}

Test(resume, a_restart_with_the_account_loses_nothing)
{
	rdmaps_op *op = setup(16, 40, RDMAPS_ASP);

	cl_settle(&c, &k, 50, true, true);
	cr_assert_eq(op->next[0], 10);
	cr_assert_eq(c.stats.resent_slots, 6);
	cr_assert_eq(c.stats.lost_pushes, 0);
	cr_assert(!c.lost, "the restored checkpoint had this connection's account");
}

/*
 * A refusal the credit showed before the break but no flush reported yet:
 * the new connection's credit counts from 0, so the break itself must keep
 * it for the next flush (RDMAPS_EREMOTE once), or it is never reported.
 */
Test(resume, a_refusal_seen_before_the_break_is_still_reported)
{
	static struct rdmaps_wire_credit credit;

	for (int unreported = 0; unreported < 2; unreported++) {
		memset(&c, 0, sizeof(c));
		memset(&k, 0, sizeof(k));
		k.c = &c;
		k.credit = &credit;
		k.conn_id = 5;
		k.next_seq = 10;
		credit = (struct rdmaps_wire_credit){ .dropped = 3, .folded_seq = 10 };
		k.dropped_seen = unreported ? 2 : 3; /* what flush has reported */
		cl_fail(&k, RDMAPS_EDISCONNECTED, "a test break");
		cr_assert_eq(k.resume_id, 5, "the broken connection is to be settled");
		cr_assert_eq(k.resume_dropped, 3);
		cr_assert_eq(c.dropped_unseen, unreported == 1, "refusal %s",
			     unreported ? "unreported must be kept" : "already reported must not repeat");
	}
}
