/*
 * backup.c -- the backup's side of a replicated part (docs/durability.md,
 * "Replicated shards"): what a primary's records on its replica connection
 * do to the replica store of that primary.
 *
 * The primary writes its records into the connection's ring as a worker
 * writes pushes (WRITE with immediate, in seq order), a batch of folds as
 * one push group: a REPLICA record per chunk the batch changed, then the
 * ACCOUNTS of the workers whose pushes those folds finished, last. The
 * fold thread applies a group only once its last record is in (fold.c,
 * as for any push group), and then all of it. So the replica is always the
 * primary's state at the end of some batch, with the accounts that go
 * with it: a primary that dies while writing a batch leaves a group with
 * no last record, never applied, and a worker resuming on the backup is
 * told exactly what its folds are (none of that batch), so it posts those
 * pushes again and each is folded once. Writing the chunks in place
 * (as this server did before) could leave some of a batch's chunks in and
 * its accounts out: the pushes posted again were then folded twice.
 *
 * The cost is a copy of each record by this thread, in the ring it landed
 * in: no fold, no optimizer, a memcpy of the chunk, its state and its fold
 * count.
 */
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "log.h"
#include "optimizer.h"
#include "server.h"

int srv_backup_check(struct srv_conn *c, const struct rdmaps_slot_hdr *h, uint32_t len,
		     const char **why)
{
	const uint16_t kind = h->flags & (RDMAPS_SLOT_REPLICA | RDMAPS_SLOT_ACCOUNTS);

	if ((h->flags & ~(RDMAPS_SLOT_REPLICA | RDMAPS_SLOT_ACCOUNTS | RDMAPS_SLOT_LAST)) ||
	    (kind != RDMAPS_SLOT_REPLICA && kind != RDMAPS_SLOT_ACCOUNTS)) {
		*why = "not a replica record (a push on a replica connection?)";
		return RDMAPS_EPROTO;
	}
	if (kind == RDMAPS_SLOT_ACCOUNTS) {
		if ((size_t)h->count * sizeof(struct rdmaps_replica_account) > len) {
			*why = "accounts longer than their record";
			return RDMAPS_ERANGE;
		}
		return 0;
	}
	/* only tensors its primary opened are in its replica store */
	struct srv_tensor *t = srv_store_get(c->rstore, h->tensor_id);
	if (!t) {
		*why = "a record of a tensor never opened";
		return RDMAPS_ENOENT;
	}
	if (h->chunk >= t->nchunks ||
	    h->count != rdmaps__chunk_count(t->length, t->chunk_elems, h->chunk) ||
	    len < srv_replica_layout(h->count, t->opt->state_per_param).bytes) {
		*why = "a record's chunk, count or length out of range";
		return RDMAPS_ERANGE;
	}
	return 0;
}

static void apply(struct srv_conn *c, const struct rdmaps_slot_hdr *h, const uint8_t *payload)
{
	struct srv_store *st = c->rstore;

	if (h->flags & RDMAPS_SLOT_REPLICA) {
		struct srv_tensor *t = srv_store_get(st, h->tensor_id);
		struct srv_replica_layout l = srv_replica_layout(h->count, t->opt->state_per_param);
		srv_chunk_replica_apply(t, h->chunk, payload, h->count, &l);
		return;
	}
	/* a place is the primary's fold thread's table slot for one of its
	 * connections: the newest account of whoever holds it now */
	for (uint32_t k = 0; k < h->count; k++) {
		struct rdmaps_replica_account a;
		memcpy(&a, payload + (size_t)k * sizeof(a), sizeof(a));
		if (a.place < st->naccounts)
			st->accounts[a.place] = (struct srv_closed){ .conn_id = a.conn_id,
								     .folded_seq = a.folded_seq,
								     .dropped = a.dropped };
	}
}

void srv_backup_group(struct srv_conn *c)
{
	bool refused = false;

	for (uint64_t seq = c->group_seq; seq < c->next_seq; seq++)
		refused |= (c->group_hdr[(seq - 1) % c->slots].flags & SLOT_REFUSED) != 0;
	for (uint64_t seq = c->group_seq; seq < c->next_seq && !refused; seq++)
		apply(c, &c->group_hdr[(seq - 1) % c->slots], srv_slot_staged(c, seq));
	c->group_seq = c->next_seq;
	srv_conn_credit(c, c->next_seq, false);
}

static struct srv_store *repl_store_make(struct srv *s, unsigned p)
{
	struct srv_config c = s->cfg;

	/* one copy, whatever --two-copies-from: nobody pulls a backup, and a
	 * chunk's write lands where its header says */
	c.two_copies_min = 0;
	struct srv_store *st = calloc(1, sizeof(*st));
	if (st && !srv_store_init(st, &c)) {
		st->replica = true;
		st->naccounts = c.max_workers;
		st->accounts = calloc(c.max_workers, sizeof(struct srv_closed));
	}
	if (st && !st->accounts) {
		if (st->replica)
			srv_store_fini(st);
		free(st);
		return NULL;
	}
	if (st)
		log_info("backing up the parts of server rank %u", p);
	/* REPLICAS reads the table from fold threads */
	__atomic_store_n(&s->replica[p], st, __ATOMIC_RELEASE);
	return st;
}

struct srv_store *srv_repl_store(struct srv *s, unsigned p)
{
	struct srv_store *st = __atomic_load_n(&s->replica[p], __ATOMIC_ACQUIRE);

	if (st)
		return st;
	/* the listener makes it, or the authority (a part restored from a
	 * checkpoint): one of them */
	pthread_mutex_lock(&s->conns_lock);
	st = s->replica[p] ? s->replica[p] : repl_store_make(s, p);
	pthread_mutex_unlock(&s->conns_lock);
	return st;
}

void srv_repl_accounts_to_records(struct srv_store *st)
{
	srv_resume_clear(&st->resume);
	for (uint32_t i = 0; i < st->naccounts; i++)
		if (st->accounts[i].conn_id)
			srv_resume_record(&st->resume, &st->accounts[i]);
}
