/*
 * resume.c -- exactly once across a broken connection (docs/durability.md,
 * "Exactly once").
 *
 * When a connection breaks, the worker cannot tell which of its staged
 * slots the server folded: the server folds whatever reached it, and the
 * credit that says so may be lost with the link. So a push whose slots are
 * not all known folded does not fail there: it waits for the reconnect.
 * The new connection asks the server about the old one (RDMAPS_MSG_RESUME)
 * and learns the first seq it never folded. Each waiting push then:
 *  - is done, if every slot of its part folded;
 *  - posts again, on the new connection, the chunks that did not fold (a
 *    dense ASP push: nothing of it folds twice, nothing is lost);
 *  - or fails with RDMAPS_EDISCONNECTED, and nothing of it folded past what
 *    the account says: a BSP/SSP push (the worker left the clock and joins
 *    it again), a row push, initial values, or when the server cannot say
 *    (restarted from an older checkpoint, or the record is gone).
 * Slots that never fold are counted in lost_pushes and reported once by
 * rdmaps_flush. If no reconnect is possible, waiting pushes fail with the
 * reconnect's error, their outcome unknown until a later reconnect settles
 * the account (lost_pushes).
 */
#include <time.h>

#include "client.h"
#include "log.h"

uint32_t cl_op_part_on(const rdmaps_op *op, uint32_t k)
{
	for (uint32_t p = op->part_lo; p < op->part_hi; p++)
		if (op->t->part[p].conn == k)
			return p;
	return UINT32_MAX;
}

static bool is_push(const rdmaps_op *op)
{
	return op->kind == OP_PUSH || op->kind == OP_PUSH_ROWS;
}

bool cl_op_unsettled(const rdmaps_op *op)
{
	return is_push(op) && op->status == RDMAPS_EAGAIN && op->c->broken;
}

/* Ask about k's broken connection until the server knows (it may still be
 * closing it). 0 with *known, or the new connection's failure. */
static int ask(struct cl_conn *k, bool *known, uint64_t *folded, uint32_t *dropped)
{
	uint64_t deadline = rdmaps__now_ns() + (uint64_t)k->c->timeout_ms * 1000000u;
	struct rdmaps_msg_resume m = { .conn_id = k->resume_id };
	struct rdmaps_msg_resume_reply r;
	int rc;

	*known = false;
	for (;;) {
		rdmaps__msg_init(&m.hdr, RDMAPS_MSG_RESUME, sizeof(m), 0);
		if ((rc = cl_rpc(k, &m, sizeof(m), RDMAPS_MSG_RESUME_REPLY, &r, sizeof(r))))
			return rc;
		if (r.status != RDMAPS_EAGAIN || rdmaps__now_ns() > deadline)
			break;
		struct timespec ts = { 0, 10 * 1000000L };
		nanosleep(&ts, NULL);
	}
	if (r.status) {
		log_warn("server %s cannot tell what the broken connection folded (%s): its "
			 "unconfirmed pushes count as lost", k->name,
			 r.status == RDMAPS_ENOENT ? "no record of it: a restart from an older "
						     "checkpoint, or a record long gone"
						   : rdmaps_strerror(r.status));
		return 0;
	}
	if (r.folded_seq < k->resume_known || r.folded_seq > k->resume_next) {
		log_error("server %s: account of the broken connection out of range (folded below "
			  "%llu, %llu sent): taken as unknown", k->name, (unsigned long long)r.folded_seq,
			  (unsigned long long)k->resume_next);
		return 0;
	}
	*known = true;
	*folded = r.folded_seq;
	*dropped = r.dropped;
	return 0;
}

int cl_resume(rdmaps_client *c, struct cl_conn *k, bool restarted)
{
	uint64_t folded = k->resume_known;
	uint32_t dropped = 0;
	bool known = false;
	int rc;

	if (!k->resume_id)
		return 0;
	if ((rc = ask(k, &known, &folded, &dropped)))
		return rc;
	if (known && dropped != k->resume_dropped)
		c->dropped_unseen = true;
	cl_settle(c, k, known ? folded : k->resume_known, known, restarted);
	return 0;
}

void cl_settle(rdmaps_client *c, struct cl_conn *k, uint64_t folded, bool known, bool restarted)
{
	uint64_t lost, resent = 0;

	for (uint32_t i = 0; i < c->ops_hi; i++) {
		rdmaps_op *op = &c->ops[i];
		uint32_t p;
		if (!is_push(op) || op->status != RDMAPS_EAGAIN ||
		    (p = cl_op_part_on(op, k->idx)) == UINT32_MAX)
			continue;
		const struct cl_part *pt = &op->t->part[p];
		bool rows = op->kind == OP_PUSH_ROWS;
		uint32_t posted = rows ? op->pslots[p] : op->next[p];
		/* folded before this connection, then its slots from seq0 on */
		uint32_t consumed = op->local0[k->idx];
		if (op->seq0[k->idx] && folded > op->seq0[k->idx])
			consumed += folded - op->seq0[k->idx] < posted - consumed
					    ? (uint32_t)(folded - op->seq0[k->idx])
					    : posted - consumed;
		/* consumed slots are done whatever completions the break flushed */
		op->done_chunks = op->done_chunks - op->pdone[k->idx] + consumed;
		op->pdone[k->idx] = consumed;
		op->last_seq[k->idx] = 0; /* nothing of it is on the new connection yet */
		if (rows ? !op->rows_left[p] && consumed == posted : consumed == pt->nchunks)
			continue; /* its part folded whole */
		if (known && !rows && !op->assign && op->t->cons.mode == RDMAPS_ASP) {
			/* post again what did not fold, from the group it stopped at */
			op->unposted += posted - consumed;
			op->next[p] = consumed;
			op->seq0[k->idx] = 0; /* the next post starts the new connection's run */
			op->local0[k->idx] = consumed;
			resent += posted - consumed;
			cl_postq_add(c, op);
			continue;
		}
		op->status = RDMAPS_EDISCONNECTED;
	}
	lost = k->resume_next > folded + resent ? k->resume_next - folded - resent : 0;
	c->stats.lost_pushes += lost;
	c->stats.resent_slots += resent;
	if (lost || (restarted && !known))
		c->lost = true;
	if (lost || resent)
		log_warn("server %s: %llu staged slots of the broken connection %s: %llu posted "
			 "again, %llu lost", k->name, (unsigned long long)(k->resume_next - folded),
			 known ? "did not fold" : "not known folded", (unsigned long long)resent,
			 (unsigned long long)lost);
	k->resume_id = 0;
}

void cl_resume_fail(rdmaps_client *c, int err)
{
	for (uint32_t i = 0; i < c->ops_hi; i++)
		if (is_push(&c->ops[i]) && c->ops[i].status == RDMAPS_EAGAIN)
			c->ops[i].status = err;
}
