/*
 * replica.c -- a primary's backups, the fold thread's side (docs/
 * durability.md, "Replicated shards"). With --replicas R, server r keeps a
 * copy of its parts on the R - 1 servers after it in the cluster's list.
 * After a batch of folds is published, every chunk it changed is copied,
 * under the chunk's lock, into a registered bounce slot and written to
 * each backup's ring as a record (values with their header, optimizer
 * state, fold count), then the accounts of the workers whose pushes the
 * batch finished: one push group, which the backup applies whole or not at
 * all (backup.c). The records of one backup go in fold order on one queue
 * pair. A push's credit, which is what "folded" means to its worker
 * (RDMAPS_PUSH_FOLDED), waits until every backup counted in sync has
 * completed the group it is in; under an authority (authority.c) the
 * backups counted are those etcd records in sync, which alone may take the
 * rank over.
 *
 * Threads: the connector (peer.c) makes each backup's connection and
 * hands it over (state READY); the fold thread adopts it, writes it every
 * tensor (the catch-up), and from then on owns it (UP) until a write fails
 * (FAILED), when the connector takes it back, tears it down and connects
 * again. A server without backups connected acknowledges as before, and
 * counts those acks (unreplicated_acks).
 *
 * Not here yet (docs/durability.md says what each needs): more than one
 * fold thread (writes of one chunk from two threads would take two queue
 * pairs, which the NIC does not order).
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "error.h"
#include "log.h"
#include "optimizer.h"
#include "replica.h"

/* p, a backup on server rank of part's store st; 0 or RDMAPS_ENOMEM. */
static int peer_init(struct srv_repl *r, struct srv_peer *p, unsigned rank, unsigned part,
		     struct srv_store *st)
{
	p->s = r->ft->srv;
	p->r = r;
	p->rank = rank;
	p->part = part;
	p->store = st;
	p->pt = calloc(st->max, sizeof(*p->pt));
	return p->pt ? 0 : RDMAPS_ENOMEM;
}

int srv_repl_start(struct srv *s)
{
	for (unsigned f = 0; f < s->cfg.fold_threads; f++) {
		struct srv_repl *r = calloc(1, sizeof(*r));
		if (!r)
			return RDMAPS_ENOMEM;
		r->ft = &s->ft[f];
		/* a bounce slot holds the largest record: header, payload */
		r->slot_bytes = RDMAPS_SLOT_HDR +
				srv_replica_layout(s->cfg.chunk_elems, SRV_REPLICA_STATE_MAX).bytes;
		r->npeers = s->cfg.replicas - 1;
		for (unsigned k = 0; k < r->npeers; k++)
			if (peer_init(r, &r->peer[k], (s->cfg.server_id + 1 + k) % s->cfg.nservers,
				      s->cfg.server_id, &s->store)) {
				free(r);
				return RDMAPS_ENOMEM;
			}
		s->ft[f].repl = r;
	}
	if (pthread_create(&s->repl_thread, NULL, srv_peer_connector, s))
		return RDMAPS_ESYS;
	s->repl_started = true;
	return 0;
}

void srv_repl_stop(struct srv *s)
{
	if (s->repl_started) {
		atomic_store(&s->stop, true);
		pthread_join(s->repl_thread, NULL);
		s->repl_started = false;
	}
	for (unsigned f = 0; s->ft && f < s->cfg.fold_threads; f++) {
		struct srv_repl *r = s->ft[f].repl;
		for (unsigned k = 0; r && k < r->npeers; k++) {
			srv_peer_teardown(&r->peer[k]);
			free(r->peer[k].pt);
		}
		free(r);
		s->ft[f].repl = NULL;
	}
	for (unsigned p = 0; p < RDMAPS_MAX_SERVERS; p++)
		if (s->replica[p]) {
			srv_store_fini(s->replica[p]);
			free(s->replica[p]->accounts);
			free(s->replica[p]);
			s->replica[p] = NULL;
		}
}

/* ---- the fold thread's side -------------------------------------------- */

/*
 * Records in flight to p and none completed (acknowledged by its NIC) for
 * PEER_SILENT_MS? A backup cut off says nothing; until it is given up,
 * the credits of every push wait for it (it is counted in sync). A live
 * one acknowledges within microseconds, however far behind its fold
 * thread is (that is its ring's credit, peer_room). A clock read per poll
 * while records are in flight.
 */
static bool peer_silent(struct srv_peer *p)
{
	uint64_t now;

	if (p->completed >= p->posted)
		return false;
	now = rdmaps__now_ns();
	if (p->completed != p->quiet_completed) { /* progress: time from here */
		p->quiet_completed = p->completed;
		p->quiet_since = now;
		return false;
	}
	return now - p->quiet_since > PEER_SILENT_MS * 1000000ull;
}

static bool peer_up(const struct srv_peer *p);

/* Under an authority (etcd): a backup counts as in sync only once it holds
 * everything and no open is in progress on it (a tensor it does not hold
 * yet makes its copy no state of ours: see hold), but for tensors opened
 * at their declaration and not folded since: it lacks nothing of them. */
static bool peer_in_sync(const struct srv_peer *p)
{
	return peer_up(p) && p->synced && p->opening == p->eager && !p->hold;
}

/*
 * The backups of p's part in sync, as a mask of ranks, for the authority
 * to record in etcd (authority.c): only a backup recorded there may take
 * the part over, so one must be recorded before acknowledgements count on
 * it, and struck off before they go out without it (release).
 */
static void isr_publish(struct srv_peer *p)
{
	struct srv_repl *r = p->r;
	uint64_t mask = 0;

	for (unsigned j = 0; j < r->npeers; j++)
		if (r->peer[j].part == p->part && peer_in_sync(&r->peer[j]))
			mask |= 1ull << r->peer[j].rank;
	if (atomic_exchange(&p->s->isr_live[p->part], mask) != mask && p->s->cfg.etcd)
		srv_auth_poke(p->s);
}

static void peer_fail(struct srv_peer *p, const char *why)
{
	struct srv *s = p->s;

	if (atomic_load_explicit(&p->state, memory_order_relaxed) != PEER_UP)
		return;
	if (p->synced)
		atomic_fetch_sub(&s->backups_up, 1);
	p->synced = false;
	atomic_fetch_add(&s->backup_failures, 1);
	log_warn("backup rank %u lost (%s): pushes are acknowledged without it until it is back",
		 p->rank, why);
	/* from here the connector owns it */
	atomic_store_explicit(&p->state, PEER_FAILED, memory_order_release);
	isr_publish(p);
}

static bool peer_up(const struct srv_peer *p)
{
	return atomic_load_explicit(&p->state, memory_order_relaxed) == PEER_UP;
}

/* Take p's completions; -1 once it has failed. An answer to an open is
 * only noted: its catch-up goes out between groups (srv_repl_poll). */
static int peer_poll(struct srv_peer *p)
{
	struct ibv_wc wc[16];
	int n;

	if (!peer_up(p))
		return -1;
	n = ibv_poll_cq(p->cq, 16, wc);
	if (n < 0) {
		peer_fail(p, "cannot poll its completion queue");
		return -1;
	}
	for (int i = 0; i < n; i++) {
		if (wc[i].status != IBV_WC_SUCCESS) {
			peer_fail(p, ibv_wc_status_str(wc[i].status));
			return -1;
		}
		if (wc[i].wr_id == WR_CHUNK) {
			p->completed++;
		} else if (wc[i].wr_id == WR_RECV) {
			p->reply_len = wc[i].byte_len;
			if (!p->asking) {
				peer_fail(p, "an answer to no request");
				return -1;
			}
			p->answered = true;
		}
	}
	return n;
}

/*
 * Room for one more record to p: a bounce slot (its completion: p's NIC)
 * and a slot of its ring (its credit: p's fold thread applied what came
 * before). Waiting for the ring, this thread applies the records of the
 * primaries it backs up: p may be one, waiting for us. False once p has
 * failed, or its ring stayed full for PEER_TIMEOUT_MS.
 */
static bool peer_room(struct srv_peer *p)
{
	uint64_t since = 0;

	for (;;) {
		if (!peer_up(p))
			return false; /* failed: the connector owns its queue pair now */
		if (atomic_load_explicit(&p->lost, memory_order_acquire)) {
			peer_fail(p, "its connection closed"); /* not 5 s of waiting */
			return false;
		}
		uint64_t applied = peer_applied(p);
		if (p->posted - p->completed < PEER_BOUNCE && p->seq - applied < p->ring_slots)
			return true;
		if (peer_poll(p) < 0)
			return false;
		srv_fold_poll_backups(p->r->ft);
		uint64_t now = rdmaps__now_ns();
		if (!since) {
			since = now;
		} else if (now - since > PEER_TIMEOUT_MS * 1000000ull) {
			peer_fail(p, "its ring stayed full for 5 s");
			return false;
		}
		rdmaps__cpu_relax();
	}
}

/* The record in bounce slot b (header, payload of len bytes) into p's
 * ring, with the next seq; last: the end of a group, which p applies. */
static void peer_post(struct srv_peer *p, uint8_t *b, size_t len, bool last)
{
	struct rdmaps_slot_hdr *h = (struct rdmaps_slot_hdr *)b;
	uint32_t slot = (uint32_t)((p->seq - 1) % p->ring_slots);
	struct ibv_sge sge = { (uintptr_t)b, (uint32_t)(RDMAPS_SLOT_HDR + len), p->mr->lkey };
	struct ibv_send_wr wr = { .wr_id = WR_CHUNK, .sg_list = &sge, .num_sge = 1,
				  .opcode = IBV_WR_RDMA_WRITE_WITH_IMM,
				  .send_flags = IBV_SEND_SIGNALED,
				  .imm_data = htonl(rdmaps__imm_make(slot, p->seq)) },
			   *bad;

	/* the backup applies lazily (SRV_REPL_APPLY_MS) unless woken: when
	 * we shall need its ring's credit soon, or everything applied */
	if (p->seq - peer_applied(p) >= p->ring_slots / 2 ||
	    atomic_load_explicit(&p->s->handing_back[p->part], memory_order_relaxed))
		wr.send_flags |= IBV_SEND_SOLICITED;
	h->seq = (uint32_t)p->seq;
	if (last)
		h->flags |= RDMAPS_SLOT_LAST;
	wr.wr.rdma.remote_addr = p->ring_addr + (uint64_t)slot * p->ring_slot;
	wr.wr.rdma.rkey = p->ring_rkey;
	if (ibv_post_send(p->qp, &wr, &bad)) {
		peer_fail(p, "cannot post a record");
		return;
	}
	if (p->completed == p->posted) {
		/* the first record in flight: peer_silent times from here (a
		 * clock read only when the backup had nothing outstanding) */
		p->quiet_completed = p->completed;
		p->quiet_since = rdmaps__now_ns();
	}
	p->seq++;
	p->posted++;
	p->in_group = !last;
}

/* Chunk i of t as it is now (values, state, fold count, under its lock)
 * as a record to p. */
static void peer_post_chunk(struct srv_peer *p, struct srv_tensor *t, uint32_t i)
{
	struct srv_repl *r = p->r;
	uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems, i);
	struct srv_replica_layout l = srv_replica_layout(count, t->opt->state_per_param);
	uint8_t *b;

	if (!peer_room(p))
		return;
	b = bounce(p, p->posted);
	srv_chunk_replica_copy(t, i, b + RDMAPS_SLOT_HDR, l.state_off, l.steps_off, &r->ft->open);
	*(struct rdmaps_slot_hdr *)b = (struct rdmaps_slot_hdr){
		.tensor_id = (uint16_t)p->pt[t->id].id, .flags = RDMAPS_SLOT_REPLICA, .chunk = i,
		.count = count,
	};
	peer_post(p, b, l.bytes, false);
	if (peer_up(p))
		atomic_fetch_add_explicit(&p->s->replicated_chunks, 1, memory_order_relaxed);
}

/* An ACCOUNTS record of n entries from bounce slot b; last ends the group. */
static void peer_post_accounts(struct srv_peer *p, uint8_t *b, uint32_t n, bool last)
{
	*(struct rdmaps_slot_hdr *)b =
		(struct rdmaps_slot_hdr){ .flags = RDMAPS_SLOT_ACCOUNTS, .count = n };
	peer_post(p, b, n * sizeof(struct rdmaps_replica_account), last);
}

/*
 * End p's group: the accounts of the workers whose pushes the records
 * before finished (docs/durability.md, "Exactly once"), every seq of each
 * below the one given folded or refused, as ACCOUNTS records, the last one
 * ending the group (an empty one if the group has records and no account).
 * A primary restored from p's copy, or p taking this rank over, answers
 * their RESUME with them. The accounts: those of the credits waiting to be
 * assigned (the newest of a connection wins), or with all, every worker
 * connection of the thread as it stands (after a catch-up).
 */
static void peer_end_group(struct srv_peer *p, bool all)
{
	struct srv_repl *r = p->r;
	const size_t per = (r->slot_bytes - RDMAPS_SLOT_HDR) / sizeof(struct rdmaps_replica_account);
	uint32_t n = 0, total = all ? r->ft->nconns : r->count;
	uint8_t *b = NULL;

	for (uint32_t k = 0; k < total; k++) {
		const struct srv_conn *c;
		uint64_t seq;
		if (all) {
			c = r->ft->conns[k];
			seq = c->group_seq;
			if (c->rstore || c->store != p->store)
				continue;
		} else {
			const struct repl_wait *w = &r->wait[(r->head + k) % REPL_WAIT_MAX];
			if (w->assigned || !w->c || w->store != p->store)
				continue;
			c = w->c;
			seq = w->seq;
		}
		if (c->place >= p->acct_cap)
			continue;
		if (b && n == per) {
			peer_post_accounts(p, b, n, false);
			b = NULL;
			n = 0;
		}
		if (!b) {
			if (!peer_room(p))
				return;
			b = bounce(p, p->posted);
		}
		/* one entry per place in a record: a newer account of the same
		 * connection overwrites the older one */
		struct rdmaps_replica_account *e = (void *)(b + RDMAPS_SLOT_HDR);
		uint32_t at = 0;
		while (at < n && e[at].place != c->place)
			at++;
		e[at] = (struct rdmaps_replica_account){ .conn_id = c->conn_id, .folded_seq = seq,
							 .dropped = c->credit.dropped,
							 .place = c->place };
		n += at == n;
	}
	if (!b && p->in_group) { /* a group with no account */
		if (!peer_room(p))
			return;
		b = bounce(p, p->posted);
	}
	if (b)
		peer_post_accounts(p, b, n, true);
}

/*
 * Opening t's backup on p is asynchronous: REPLICA_OPEN (t's declaration)
 * goes out, and the fold thread goes on folding. Blocking for the answer
 * would deadlock two servers that back each other up and open at once:
 * each one's single fold thread, waiting, is the one that would answer
 * the other. Writes of t's chunks wait (the copy after the open carries
 * them), and so do the credits (open_done moves them past that copy).
 */
static void open_send(struct srv_peer *p, struct srv_tensor *t)
{
	struct rdmaps_msg_declare *m = (void *)msg_out(p);
	struct ibv_sge sge = { (uintptr_t)m, sizeof(*m), p->mr->lkey };
	struct ibv_send_wr wr = { .wr_id = WR_SEND, .sg_list = &sge, .num_sge = 1,
				  .opcode = IBV_WR_SEND,
				  .send_flags = IBV_SEND_SIGNALED | IBV_SEND_SOLICITED },
			   *bad;

	memset(m, 0, sizeof(*m));
	rdmaps__msg_init(&m->hdr, RDMAPS_MSG_REPLICA_OPEN, sizeof(*m), ++p->req_id);
	m->length = t->length;
	m->flags = t->pull_fmt << RDMAPS_DECLARE_PULL_SHIFT;
	m->hyper = t->hyper;
	m->cons = t->cons;
	memcpy(m->optimizer, t->opt->name, strnlen(t->opt->name, RDMAPS_OPT_NAME_MAX));
	memcpy(m->name, t->name, sizeof(m->name));
	p->asking = t;
	p->asked_ns = rdmaps__now_ns();
	if (ibv_post_send(p->qp, &wr, &bad))
		peer_fail(p, "cannot post a replica open");
}

/* The next tensor waiting for its open, if none is being asked. */
static void open_next(struct srv_peer *p)
{
	struct srv_store *st = p->store;
	uint32_t n = atomic_load(&st->count);

	if (p->asking || !p->opening || !peer_up(p) || p->hold)
		return;
	for (uint32_t i = 0; i < n; i++)
		if (p->pt[i].state == PT_QUEUED) {
			p->pt[i].state = PT_ASKED;
			open_send(p, srv_store_get(st, i));
			return;
		}
}

/* t's chunks are to be written to p: now, or after its open. Under an
 * authority, p is no copy of ours meanwhile: it leaves the in-sync set,
 * and if etcd counts it there, nothing goes to it until it no longer does
 * (hold). */
static void open_want(struct srv_peer *p, struct srv_tensor *t)
{
	struct peer_tensor *pt = &p->pt[t->id];

	if (pt->state == PT_CLOSED) {
		pt->state = PT_QUEUED;
		p->opening++;
	} else if (pt->eager) {
		/* opened at its declaration, and folded before the open was
		 * answered: the backup lacks a fold now, as in any open */
		pt->eager = false;
		p->eager--;
	} else {
		return;
	}
	if (p->s->cfg.etcd && (atomic_load(&p->s->isr_etcd[p->part]) >> p->rank & 1u))
		p->hold = true;
	isr_publish(p);
	open_next(p);
}

/* p holds everything: acknowledgements wait for it from now on. */
static void peer_caught_up(struct srv_peer *p)
{
	p->synced = true;
	atomic_fetch_add(&p->s->backups_up, 1);
	isr_publish(p);
	/* the open is the backup allocating the replica: apart, so that the
	 * copy's bandwidth can be told from it */
	log_info("backup rank %u caught up: %llu records in %.1f ms (its first open answered "
		 "after %.1f ms)",
		 p->rank, (unsigned long long)(p->posted - p->sync_from),
		 (double)(rdmaps__now_ns() - p->sync_ns) / 1e6,
		 p->open_ns ? (double)(p->open_ns - p->sync_ns) / 1e6 : 0.0);
}

/* p answered the open being asked: every chunk of it written, in groups
 * that fit p's ring, the last with every connected worker's account;
 * every waiting credit behind those writes. Between groups only. */
static void open_done(struct srv_peer *p)
{
	struct srv_repl *r = p->r;
	struct srv_tensor *t = p->asking;
	struct peer_tensor *pt = &p->pt[t->id];
	struct rdmaps_msg_replica_reply rep;
	uint16_t type = 0;
	unsigned j = (unsigned)(p - r->peer);

	p->asking = NULL;
	p->answered = false;
	if (srv_peer_post_recv(p)) {
		peer_fail(p, "cannot post a receive");
		return;
	}
	if (rdmaps__msg_check(msg_in(p), p->reply_len, &type) || type != RDMAPS_MSG_REPLICA_REPLY) {
		/* a status reply: the backup refused it (its limits, a tensor of
		 * that name declared otherwise); it cannot hold our part */
		const struct rdmaps_msg_status_reply *sr = (const void *)msg_in(p);
		log_error("backup rank %u cannot hold tensor '%s' (%s)", p->rank, t->name,
			  type == RDMAPS_MSG_STATUS_REPLY ? rdmaps_strerror(sr->status)
							  : "malformed answer");
		peer_fail(p, "a replica refused");
		return;
	}
	memcpy(&rep, msg_in(p), sizeof(rep));
	if (rep.hdr.req_id != p->req_id || rep.status || rep.nchunks != t->nchunks ||
	    rep.chunk_elems != t->chunk_elems || rep.state_per_param != t->opt->state_per_param ||
	    rep.state_per_param > SRV_REPLICA_STATE_MAX || rep.tensor_id > UINT16_MAX) {
		peer_fail(p, "a replica unlike its tensor");
		return;
	}
	p->acct_cap = rep.accounts_cap;
	if (!p->open_ns)
		p->open_ns = rdmaps__now_ns();
	if (pt->eager)
		p->eager--;
	*pt = (struct peer_tensor){ .id = rep.tensor_id, .state = PT_OPEN };
	if (p->hold) {
		/* nothing goes to it now; peer_resync copies it all later */
		p->opening--;
		return;
	}
	for (uint32_t i = 0; i < t->nchunks && peer_up(p); i++) {
		peer_post_chunk(p, t, i);
		if (p->in_group && (i + 1) % REPL_TOUCH_MAX == 0 && i + 1 < t->nchunks)
			peer_end_group(p, false);
	}
	/* then every connected worker's account, which p may never have had
	 * (the table was unknown before this answer, or p was not caught up) */
	if (peer_up(p))
		peer_end_group(p, true);
	if (!peer_up(p))
		return;
	for (uint32_t k = 0; k < r->count; k++)
		r->wait[(r->head + k) % REPL_WAIT_MAX].upto[j] = p->posted;
	if (!--p->opening && !p->synced)
		peer_caught_up(p);
	else if (!p->opening)
		isr_publish(p);
	open_next(p);
}

/* A backup the connector just connected: every tensor is opened on it and
 * written whole (the catch-up); it counts for credits once that is done. */
static void peer_adopt(struct srv_peer *p)
{
	struct srv_store *st = p->store;
	uint32_t n = atomic_load(&st->count);

	memset(p->pt, 0, st->max * sizeof(*p->pt));
	p->completed = p->posted; /* nothing of an earlier connection is in flight */
	p->asking = NULL;
	p->answered = false;
	p->opening = p->eager = 0;
	p->hold = false;
	p->in_group = false;
	if (p->synced)
		atomic_fetch_sub(&p->s->backups_up, 1);
	p->synced = false;
	p->sync_from = p->posted;
	p->sync_ns = rdmaps__now_ns();
	p->open_ns = 0;
	atomic_store_explicit(&p->state, PEER_UP, memory_order_relaxed);
	isr_publish(p);
	for (uint32_t i = 0; i < n; i++)
		open_want(p, srv_store_get(st, i));
	if (!n)
		peer_caught_up(p);
}

/* A held backup, struck off in etcd: every tensor opened on it again and
 * written whole, on the same connection (its replies name the same ids). */
static void peer_resync(struct srv_peer *p)
{
	struct srv_store *st = p->store;
	uint32_t n = atomic_load(&st->count);

	p->hold = false;
	p->opening = p->eager = 0;
	for (uint32_t i = 0; i < n; i++)
		p->pt[i] = (struct peer_tensor){ .state = PT_CLOSED };
	for (uint32_t i = 0; i < n; i++)
		open_want(p, srv_store_get(st, i));
}

void srv_repl_declared(struct srv_fold_thread *ft, struct srv_store *st, struct srv_tensor *t)
{
	struct srv_repl *r = ft->repl;

	for (unsigned j = 0; r && j < r->npeers; j++) {
		struct srv_peer *p = &r->peer[j];
		/* a backup not up is caught up whole when it is; one held is
		 * copied whole once etcd lets go of it */
		if (p->store != st || !peer_up(p) || p->hold || p->pt[t->id].state != PT_CLOSED)
			continue;
		p->pt[t->id] = (struct peer_tensor){ .state = PT_QUEUED, .eager = true };
		p->opening++;
		p->eager++;
		open_next(p);
	}
}

/* Is t one of st's tensors (the part a peer backs up)? */
static bool in_store(struct srv_store *st, const struct srv_tensor *t)
{
	return t->id < atomic_load_explicit(&st->count, memory_order_acquire) &&
	       srv_store_get(st, t->id) == t;
}

void srv_repl_flush(struct srv_fold_thread *ft)
{
	struct srv_repl *r = ft->repl;

	if (r->ntouch)
		srv_open_publish(&ft->open);
	for (unsigned j = 0; j < r->npeers; j++) {
		struct srv_peer *p = &r->peer[j];
		if (!peer_up(p))
			continue;
		if (p->hold) {
			/* etcd still counts it in sync: not a record until it
			 * does not (and its open in flight is answered); then
			 * everything again */
			if ((atomic_load(&ft->srv->isr_etcd[p->part]) >> p->rank & 1u) || p->asking)
				continue;
			peer_resync(p);
			continue;
		}
		for (uint32_t k = 0; k < r->ntouch && peer_up(p); k++) {
			struct srv_tensor *t = r->touch[k].t;
			if (!in_store(p->store, t))
				continue; /* another part's */
			if (p->pt[t->id].state == PT_OPEN)
				peer_post_chunk(p, t, r->touch[k].chunk);
			else
				open_want(p, t); /* its open writes every chunk */
		}
		/* each worker's account ends the group: its credit waits for
		 * all of it */
		if (peer_up(p) && !p->hold)
			peer_end_group(p, false);
	}
	r->ntouch = 0;
	for (uint32_t k = 0; k < r->count; k++) {
		struct repl_wait *w = &r->wait[(r->head + k) % REPL_WAIT_MAX];
		if (w->assigned)
			continue;
		for (unsigned j = 0; j < r->npeers; j++)
			w->upto[j] = r->peer[j].posted;
		w->assigned = true;
	}
}

void srv_repl_touch(struct srv_fold_thread *ft, struct srv_tensor *t, uint32_t chunk)
{
	struct srv_repl *r = ft->repl;

	/* the same chunk folded again in this batch: one write covers both */
	for (uint32_t k = r->ntouch > 8 ? r->ntouch - 8 : 0; k < r->ntouch; k++)
		if (r->touch[k].t == t && r->touch[k].chunk == chunk)
			return;
	if (r->ntouch == REPL_TOUCH_MAX)
		srv_repl_flush(ft);
	r->touch[r->ntouch++] = (struct repl_touch){ t, chunk };
}

void srv_repl_touch_all(struct srv_fold_thread *ft, struct srv_tensor *t)
{
	for (uint32_t i = 0; i < t->nchunks; i++)
		srv_repl_touch(ft, t, i);
	srv_repl_flush(ft);
}

/* Credits whose writes every backup still up has completed, in order. */
static int release(struct srv_repl *r)
{
	int n = 0;

	/* under an authority, the backups etcd records as in sync: each must
	 * have the writes, up or not (struck off first, it is waited for no
	 * more); without one, those up and caught up */
	const bool recorded = r->ft->srv->cfg.etcd;

	while (r->count) {
		struct repl_wait *w = &r->wait[r->head];
		unsigned up = 0, peers = 0;
		bool done = w->assigned;
		for (unsigned j = 0; done && j < r->npeers; j++) {
			const struct srv_peer *p = &r->peer[j];
			if (p->store != w->store)
				continue; /* another part's backup */
			const uint64_t isr = atomic_load(&r->ft->srv->isr_etcd[p->part]);
			peers++;
			if (recorded && (isr >> p->rank & 1u) && !peer_in_sync(p)) {
				done = false; /* until etcd no longer counts on it */
				break;
			}
			/* a backup still catching up is not one yet */
			if (!peer_up(p) || !p->synced || (recorded && !(isr >> p->rank & 1u)))
				continue;
			up++;
			/* an open in progress: its copy will move upto */
			done = p->completed >= w->upto[j] && !p->opening;
		}
		if (!done)
			break;
		if (w->c) {
			if (up < peers || !peers)
				atomic_fetch_add_explicit(&r->ft->srv->unreplicated_acks, 1,
							  memory_order_relaxed);
			srv_conn_credit(w->c, w->seq, w->urgent);
		}
		r->head = (r->head + 1) % REPL_WAIT_MAX;
		r->count--;
		n++;
	}
	return n;
}

/*
 * A part being handed back (authority.c) is settled once nothing of it is
 * left here that its backup, its own server, lacks: no worker of it
 * attached, no credit of it waiting, every record of it written, completed
 * and applied there, and that backup in sync.
 */
static void handback_check(struct srv_repl *r, struct srv_peer *p)
{
	struct srv_fold_thread *ft = r->ft;
	bool settled = peer_in_sync(p) && p->completed == p->posted && !p->in_group &&
		       peer_applied(p) == p->seq;

	for (uint32_t i = 0; settled && i < ft->nconns; i++)
		settled = ft->conns[i]->rstore || ft->conns[i]->store != p->store;
	for (uint32_t k = 0; settled && k < r->count; k++)
		settled = r->wait[(r->head + k) % REPL_WAIT_MAX].store != p->store;
	atomic_store(&p->s->part_settled[p->part], settled);
}

int srv_repl_poll(struct srv_fold_thread *ft)
{
	struct srv_repl *r = ft->repl;
	int work = 0;

	for (unsigned j = 0; j < r->npeers; j++) {
		struct srv_peer *p = &r->peer[j];
		struct srv_store *moved = atomic_exchange(&p->move_to, NULL);
		if (moved) {
			/* our rank's part is served from its replica now: what
			 * the backup holds is of the other store; it connects
			 * again and is caught up from this one */
			peer_fail(p, "this rank's part moved to the copy taken back");
			p->store = moved;
		}
		int st = atomic_load_explicit(&p->state, memory_order_acquire);
		if (st == PEER_READY) {
			peer_adopt(p);
			work++;
		} else if (st == PEER_UP && atomic_load_explicit(&p->lost, memory_order_acquire)) {
			peer_fail(p, "its connection closed");
		} else if (st == PEER_UP && (p->completed < p->posted || p->asking)) {
			if (peer_poll(p) > 0)
				work++;
			if (p->answered) /* between groups: its catch-up now */
				open_done(p);
			else if (p->asking && rdmaps__now_ns() - p->asked_ns >
						      PEER_TIMEOUT_MS * 1000000ull)
				peer_fail(p, "no answer to a replica open");
			else if (peer_silent(p))
				peer_fail(p, "none of its records acknowledged for 1 s");
		}
		/* a part goes back to its own server: the peer that is it */
		if (p->rank == p->part && atomic_load(&p->s->handing_back[p->part]))
			handback_check(r, p);
		else if (peer_up(p) && !peer_part_ours(p))
			peer_fail(p, "its part was handed back");
	}
	return work + release(r);
}

void srv_repl_credit(struct srv_fold_thread *ft, struct srv_conn *c, uint64_t seq, bool urgent)
{
	struct srv_repl *r = ft->repl;

	while (r->count == REPL_WAIT_MAX) {
		/* as many credits waiting as the ring holds: the backups are
		 * far behind; wait for them here */
		srv_repl_flush(ft);
		srv_repl_poll(ft);
	}
	r->wait[(r->head + r->count) % REPL_WAIT_MAX] =
		(struct repl_wait){ .c = c, .store = c->store, .seq = seq, .urgent = urgent };
	r->count++;
}

bool srv_repl_pending(const struct srv_fold_thread *ft)
{
	const struct srv_repl *r = ft->repl;

	if (r->count)
		return true;
	/* an open's answer or writes in flight: polled, not slept on */
	for (unsigned j = 0; j < r->npeers; j++)
		if (peer_up(&r->peer[j]) && (r->peer[j].asking || r->peer[j].opening ||
					     r->peer[j].completed < r->peer[j].posted))
			return true;
	return false;
}

void srv_repl_settle(struct srv_fold_thread *ft, struct srv_conn *c)
{
	struct srv_repl *r = ft->repl;
	uint64_t end = rdmaps__now_ns() + SETTLE_NS;
	bool waiting = true;

	srv_repl_flush(ft);
	while (waiting) {
		srv_repl_poll(ft);
		waiting = false;
		for (uint32_t k = 0; k < r->count && !waiting; k++)
			waiting = r->wait[(r->head + k) % REPL_WAIT_MAX].c == c;
		if (waiting && rdmaps__now_ns() > end) {
			for (unsigned j = 0; j < r->npeers; j++)
				if (peer_up(&r->peer[j]) && r->peer[j].completed < r->peer[j].posted)
					peer_fail(&r->peer[j], "writes not completed in 10 s");
		}
	}
	/* settled; nothing of c's is left to release after it is gone */
	for (uint32_t k = 0; k < r->count; k++)
		if (r->wait[(r->head + k) % REPL_WAIT_MAX].c == c)
			r->wait[(r->head + k) % REPL_WAIT_MAX].c = NULL;
}

void srv_repl_serve_part(struct srv *s, unsigned part)
{
	struct srv_store *st = s->replica[part];

	for (unsigned f = 0; st && f < s->cfg.fold_threads; f++) {
		struct srv_repl *r = s->ft[f].repl;
		unsigned n = atomic_load(&r->npeers);
		if (part == s->cfg.server_id) {
			for (unsigned j = 0; j < n; j++)
				if (r->peer[j].part == part)
					atomic_store(&r->peer[j].move_to, st);
			continue;
		}
		/* the part's copies are on its own server and the R - 1 after
		 * it: each but this one is a backup of it here (its old
		 * primary once it is back, the others at once) */
		for (unsigned i = 0; i < s->cfg.replicas; i++) {
			unsigned rank = (part + i) % s->cfg.nservers, j = 0;
			if (rank == s->cfg.server_id)
				continue;
			while (j < n && !(r->peer[j].part == part && r->peer[j].rank == rank))
				j++;
			if (j < n)
				continue; /* taken over before, and handed back: its peer again */
			if (n == REPL_PEERS) {
				log_warn("rank %u's part has no backup on rank %u: %u backups of parts "
					 "taken over here already", part, rank, REPL_PART_PEERS);
				continue;
			}
			if (peer_init(r, &r->peer[n], rank, part, st)) {
				log_error("rank %u's part has no backup on rank %u: out of memory", part,
					  rank);
				continue;
			}
			atomic_store_explicit(&r->npeers, ++n, memory_order_release);
		}
	}
}

void srv_repl_describe(struct srv *s, struct srv_fold_thread *ft,
		       struct rdmaps_msg_replicas_reply *r)
{
	const struct srv_repl *rp = ft->repl;

	r->server_id = s->cfg.server_id;
	r->replicas = s->cfg.replicas;
	r->epoch = atomic_load(&s->epoch);
	r->in_sync = atomic_load(&s->isr_etcd[s->cfg.server_id]);
	for (unsigned k = 0; k < RDMAPS_MAX_SERVERS; k++)
		if (srv_serves(s, k))
			r->taken_over |= 1ull << k;
	/* with backups there is one fold thread (main.c): this one owns them */
	for (unsigned j = 0; rp && j < rp->npeers && r->nbackups < RDMAPS_WIRE_BACKUPS; j++) {
		const struct srv_peer *p = &rp->peer[j];
		if (!peer_part_ours(p))
			continue;
		struct rdmaps_wire_backup_info *b = &r->backup[r->nbackups++];
		b->rank = p->rank;
		b->part = p->part;
		b->state = !peer_up(p) ? RDMAPS_BACKUP_DOWN
			   : p->synced ? RDMAPS_BACKUP_UP
				       : RDMAPS_BACKUP_CATCHING_UP;
		b->writes = p->posted;
		b->in_flight = peer_up(p) ? p->posted - p->completed : 0;
		/* its credit: the next record it will apply */
		b->behind = peer_up(p) ? p->seq - peer_applied(p) : 0;
		b->opening = peer_up(p) ? p->opening : 0;
	}
	for (unsigned k = 0; k < RDMAPS_MAX_SERVERS && r->nheld < 64; k++) {
		const struct srv_store *st = __atomic_load_n(&s->replica[k], __ATOMIC_ACQUIRE);
		struct rdmaps_wire_held_info *h;
		if (!st || (k == s->cfg.server_id && srv_serves(s, k)))
			continue; /* (our own part, served from it) */
		h = &r->held[r->nheld++];
		h->primary = k;
		h->tensors = atomic_load(&((struct srv_store *)st)->count);
		for (uint32_t i = 0; i < st->naccounts; i++)
			h->accounts += __atomic_load_n(&st->accounts[i].conn_id, __ATOMIC_RELAXED) != 0;
	}
}
