/*
 * replica.c -- a primary's backups (docs/durability.md, "Replicated
 * shards"). With --replicas R, server r keeps a copy of its parts on the
 * R - 1 servers after it in the cluster's list. After a batch of folds is
 * published, every chunk it changed is copied, under the chunk's lock, into
 * a registered bounce slot and written to each backup with one-sided
 * WRITEs (values with their header, optimizer state, fold count): the
 * backup's CPU is not on the path. The writes of one backup go in fold
 * order on one queue pair, so the last one to land is the newest. A push's
 * credit, which is what "folded" means to its worker (RDMAPS_PUSH_FOLDED),
 * waits until every connected, caught-up backup has completed the writes
 * of what it changed, and of the worker's account after them (what a
 * primary restored from the backup answers RESUME with).
 *
 * Threads: a connector thread makes each backup's connection (rdma_cm,
 * blocking, retried) and hands it over (state READY); the fold thread
 * adopts it, writes it every tensor (the catch-up), and from then on owns
 * it (UP) until a write fails (FAILED), when the connector takes it back,
 * tears it down and connects again. A server without backups connected
 * acknowledges as before, and counts those acks (unreplicated_acks).
 *
 * Not here yet (docs/durability.md says what each needs): more than one
 * fold thread (writes of one chunk from two threads would take two queue
 * pairs, which the NIC does not order), failover.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "error.h"
#include "log.h"
#include "optimizer.h"
#include "server.h"

#define PEER_BOUNCE 16u      /* records in flight to one backup, each in a slot of its own */
/* chunks a batch records before they are written early: a group (them,
 * and the accounts after) fits in the backup's ring */
#define REPL_TOUCH_MAX (SRV_REPL_RING / 2)
#define REPL_WAIT_MAX 4096u  /* credits waiting for the backups */
#define PEER_TIMEOUT_MS 5000 /* connect, and a REPLICA_OPEN's answer */
#define PEER_RETRY_NS 500000000ull
#define SETTLE_NS 10000000000ull /* a leaving worker's credits wait this long at most */

enum peer_state { PEER_DOWN, PEER_READY, PEER_UP, PEER_FAILED };

#define WR_CHUNK 1u
#define WR_SEND 2u
#define WR_RECV 3u

/* One of our tensors on a backup: its id there (REPLICA_REPLY). */
enum { PT_CLOSED, PT_QUEUED, PT_ASKED, PT_OPEN };
struct peer_tensor {
	uint32_t id;
	int state;
};

struct srv_peer {
	struct srv *s;
	struct srv_repl *r;
	unsigned rank;
	_Atomic int state; /* enum peer_state: who owns the rest (top of file) */
	struct rdma_event_channel *ch;
	struct rdma_cm_id *id;
	struct ibv_pd *pd;
	struct ibv_cq *cq;
	struct ibv_qp *qp;
	uint8_t *buf; /* a request, a reply, then PEER_BOUNCE slots */
	size_t buf_len;
	struct ibv_mr *mr;
	/* what the backup writes (its credit: how far it applied our
	 * records, as a worker's for its pushes; keepalives): nothing else */
	struct rdmaps_wire_credit *credit;
	struct ibv_mr *credit_mr;
	/* its ring for our records (the welcome), and the next record's seq */
	uint64_t ring_addr;
	uint32_t ring_rkey, ring_slots, ring_slot;
	uint64_t seq;
	bool answered;  /* its answer to the open being asked is in */
	bool in_group;  /* records posted since the last group's end */
	/* under an authority: it began an open while etcd counted it in
	 * sync; nothing is written to it until etcd no longer does, then it
	 * is caught up whole (srv_repl_flush) */
	bool hold;
	struct peer_tensor *pt; /* per tensor id of our store */
	/* chunks written and completed since start, never reset: a credit
	 * waits for this backup to have completed what was posted before it */
	uint64_t posted, completed;
	uint32_t req_id, reply_len;
	struct srv_tensor *asking; /* its REPLICA_OPEN is out */
	uint64_t asked_ns;
	uint32_t opening;          /* tensors queued or asked */
	bool synced;               /* every tensor written since it connected */
	uint64_t sync_from, sync_ns;
	/* places its table of our workers' accounts has (REPLICA_REPLY) */
	uint32_t acct_cap;
	uint64_t last_try; /* connector: last attempt */
	unsigned failing;  /* connector: attempts failed in a row */
	_Atomic bool lost; /* connector -> fold thread: its connection closed */
};

struct repl_wait {
	struct srv_conn *c; /* NULL: its connection left */
	uint64_t seq;
	uint64_t upto[RDMAPS_MAX_REPLICAS - 1]; /* each backup's posted count it waits for */
	bool assigned, urgent;
};

struct repl_touch {
	struct srv_tensor *t;
	uint32_t chunk;
};

struct srv_repl {
	struct srv_fold_thread *ft;
	struct srv_peer peer[RDMAPS_MAX_REPLICAS - 1];
	unsigned npeers;
	struct srv_replica_layout layout;
	size_t slot_bytes;
	struct repl_touch touch[REPL_TOUCH_MAX];
	uint32_t ntouch;
	struct repl_wait wait[REPL_WAIT_MAX]; /* a ring, oldest at head */
	uint32_t head, count;
};

static uint8_t *msg_out(struct srv_peer *p) { return p->buf; }
static uint8_t *msg_in(struct srv_peer *p) { return p->buf + RDMAPS_MSG_MAX; }
static uint8_t *bounce(struct srv_peer *p, uint64_t n)
{
	return p->buf + 2 * RDMAPS_MSG_MAX + (size_t)(n % PEER_BOUNCE) * p->r->slot_bytes;
}

/* ---- the connector's side ---------------------------------------------- */

static void peer_teardown(struct srv_peer *p)
{
	if (p->id && p->qp)
		rdma_disconnect(p->id);
	if (p->qp)
		rdma_destroy_qp(p->id);
	if (p->mr)
		ibv_dereg_mr(p->mr);
	if (p->credit_mr)
		ibv_dereg_mr(p->credit_mr);
	if (p->cq)
		ibv_destroy_cq(p->cq);
	if (p->pd)
		ibv_dealloc_pd(p->pd);
	if (p->id)
		rdma_destroy_id(p->id);
	if (p->ch)
		rdma_destroy_event_channel(p->ch);
	free(p->buf);
	free(p->credit);
	p->qp = NULL;
	p->mr = p->credit_mr = NULL;
	p->cq = NULL;
	p->pd = NULL;
	p->id = NULL;
	p->ch = NULL;
	p->buf = NULL;
	p->credit = NULL;
}

static int post_recv(struct srv_peer *p)
{
	struct ibv_sge sge = { (uintptr_t)msg_in(p), RDMAPS_MSG_MAX, p->mr->lkey };
	struct ibv_recv_wr wr = { .wr_id = WR_RECV, .sg_list = &sge, .num_sge = 1 }, *bad;

	return ibv_post_recv(p->qp, &wr, &bad) ? RDMAPS_EVERBS : 0;
}

/* Resolve, build and connect, as a worker does, with the servers' token
 * and the replica flag; the connector's thread, blocking. */
static int peer_connect(struct srv_peer *p)
{
	struct srv *s = p->s;
	const struct rdmaps__server_addr *sa = &s->cfg.servers[p->rank];
	struct ibv_qp_init_attr qa = { 0 };
	struct rdmaps_wire_hello h = { 0 };
	struct rdma_conn_param cp = { 0 };
	struct rdmaps_wire_welcome w;
	struct rdma_cm_event *ev;
	int rc, reject_err = 0;

	p->ch = rdma_create_event_channel();
	if (!p->ch || rdma_create_id(p->ch, &p->id, p, RDMA_PS_TCP))
		return RDMAPS_EVERBS;
	/* from the address we serve on: the device workers reach us by */
	if ((rc = rdmaps__cm_resolve(p->ch, p->id, sa->host, sa->port,
				     s->cfg.listen_addr && strcmp(s->cfg.listen_addr, "0.0.0.0")
					     ? s->cfg.listen_addr
					     : NULL,
				     PEER_TIMEOUT_MS)))
		return rc;

	p->pd = ibv_alloc_pd(p->id->verbs);
	/* a completion per record, a send, a receive */
	p->cq = p->pd ? ibv_create_cq(p->id->verbs, PEER_BOUNCE + 8, NULL, NULL, 0) : NULL;
	if (!p->cq)
		return RDMAPS_EVERBS;
	qa.send_cq = qa.recv_cq = p->cq;
	qa.qp_type = IBV_QPT_RC;
	qa.cap.max_send_wr = PEER_BOUNCE + 2;
	qa.cap.max_recv_wr = 2;
	qa.cap.max_send_sge = qa.cap.max_recv_sge = 1;
	if (rdma_create_qp(p->id, p->pd, &qa))
		return RDMAPS_EVERBS;
	p->qp = p->id->qp;
	p->buf_len = 2 * RDMAPS_MSG_MAX + PEER_BOUNCE * p->r->slot_bytes;
	p->buf = aligned_alloc(4096, rdmaps__round_up(p->buf_len, 4096));
	p->credit = aligned_alloc(64, 64);
	if (!p->buf || !p->credit)
		return RDMAPS_ENOMEM;
	/* the backup's credits count from 1, as a worker's */
	*p->credit = (struct rdmaps_wire_credit){ .folded_seq = 1 };
	p->seq = 1;
	/* the bounce slots and messages: local only; the backup may write
	 * the credit word and nothing else of ours */
	if ((rc = rdmaps__reg_mr(p->pd, p->buf, p->buf_len, IBV_ACCESS_LOCAL_WRITE, &p->mr)) ||
	    (rc = rdmaps__reg_mr(p->pd, p->credit, 64,
				 IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE, &p->credit_mr)))
		return rc;
	if ((rc = post_recv(p)))
		return rc;

	h.magic = RDMAPS_PROTO_MAGIC;
	h.version = RDMAPS_PROTO_VERSION;
	h.token_len = s->cfg.peer_token_len;
	memcpy(h.token, s->cfg.peer_token, s->cfg.peer_token_len);
	h.credit_addr = (uintptr_t)p->credit;
	h.credit_rkey = p->credit_mr->rkey;
	h.flags = RDMAPS_HELLO_REPLICA;
	h.rank = (uint16_t)s->cfg.server_id;
	cp.private_data = &h;
	cp.private_data_len = sizeof(h);
	cp.retry_count = 6; /* as a worker: 7 is "forever" on rxe */
	cp.rnr_retry_count = 7;
	if (rdma_connect(p->id, &cp))
		return rdmaps__from_errno(errno);
	rc = rdmaps__cm_wait(p->ch, RDMA_CM_EVENT_ESTABLISHED, PEER_TIMEOUT_MS, &ev, &reject_err);
	if (rc)
		return rc == RDMAPS_EREJECTED && reject_err ? reject_err : rc;
	rc = ev->param.conn.private_data && ev->param.conn.private_data_len >= sizeof(w)
		     ? 0
		     : RDMAPS_EPROTO;
	if (!rc)
		memcpy(&w, ev->param.conn.private_data, sizeof(w));
	rdma_ack_cm_event(ev);
	if (!rc && (w.magic != RDMAPS_PROTO_MAGIC || w.version != RDMAPS_PROTO_VERSION))
		rc = RDMAPS_EPROTO;
	if (!rc && w.chunk_elems != s->cfg.chunk_elems) {
		log_error("backup rank %u runs --chunk-elems %u, this server %u: not replicating to it",
			  p->rank, w.chunk_elems, s->cfg.chunk_elems);
		rc = RDMAPS_EPROTO;
	}
	/* a batch's records and their accounts must fit its ring */
	if (!rc && (w.slot_size < p->r->slot_bytes || w.slot_count < REPL_TOUCH_MAX + 2)) {
		log_error("backup rank %u offers a ring of %u slots of %u bytes: too small",
			  p->rank, w.slot_count, w.slot_size);
		rc = RDMAPS_EPROTO;
	}
	if (!rc) {
		p->ring_addr = w.staging_addr;
		p->ring_rkey = w.staging_rkey;
		p->ring_slots = w.slot_count;
		p->ring_slot = w.slot_size;
	}
	return rc;
}

/*
 * A backup whose process died has its connection closed by its kernel,
 * which tells ours: the fold thread hears of it now (lost) rather than
 * when a write has exhausted its transport retries, which on rxe took 15 s
 * that every folded push would have waited. A backup whose host or link
 * dies still takes the retries.
 */
static void peer_watch(struct srv_peer *p)
{
	struct pollfd pfd = { .fd = p->ch->fd, .events = POLLIN };
	struct rdma_cm_event *ev;

	while (poll(&pfd, 1, 0) > 0 && !rdma_get_cm_event(p->ch, &ev)) {
		enum rdma_cm_event_type e = ev->event;
		rdma_ack_cm_event(ev);
		if (e == RDMA_CM_EVENT_DISCONNECTED || e == RDMA_CM_EVENT_DEVICE_REMOVAL ||
		    e == RDMA_CM_EVENT_TIMEWAIT_EXIT) {
			uint64_t one = 1;
			atomic_store_explicit(&p->lost, true, memory_order_release);
			if (write(p->r->ft->wake_fd, &one, sizeof(one)) < 0)
				log_warn("fold thread %u: wake-up write failed", p->r->ft->idx);
		}
	}
}

static void *connector_main(void *arg)
{
	struct srv *s = arg;

	while (!atomic_load(&s->stop)) {
		for (unsigned f = 0; f < s->cfg.fold_threads; f++) {
			struct srv_repl *r = s->ft[f].repl;
			for (unsigned k = 0; k < r->npeers; k++) {
				struct srv_peer *p = &r->peer[k];
				int st = atomic_load_explicit(&p->state, memory_order_acquire);
				uint64_t now = rdmaps__now_ns();
				int rc;
				if (st == PEER_FAILED) {
					peer_teardown(p);
					atomic_store_explicit(&p->state, PEER_DOWN, memory_order_release);
					st = PEER_DOWN;
				}
				if (st == PEER_UP)
					peer_watch(p);
				if (st != PEER_DOWN || now - p->last_try < PEER_RETRY_NS)
					continue;
				p->last_try = now;
				if ((rc = peer_connect(p))) {
					/* the first failure of a run said once: a backup
					 * starting later is the usual case */
					if (!p->failing++ || p->failing % 120 == 0)
						log_info("backup rank %u at %s:%s: not connected (%s); "
							 "retrying every %.1f s", p->rank,
							 s->cfg.servers[p->rank].host,
							 s->cfg.servers[p->rank].port, rdmaps_strerror(rc),
							 PEER_RETRY_NS / 1e9);
					peer_teardown(p);
					continue;
				}
				log_info("backup rank %u connected", p->rank);
				p->failing = 0;
				atomic_store(&p->lost, false);
				atomic_store_explicit(&p->state, PEER_READY, memory_order_release);
				uint64_t one = 1;
				if (write(s->ft[f].wake_fd, &one, sizeof(one)) < 0)
					log_warn("fold thread %u: wake-up write failed", f);
			}
		}
		usleep(50000);
	}
	return NULL;
}

struct srv_store *srv_repl_store(struct srv *s, unsigned p)
{
	struct srv_config c = s->cfg;

	if (s->replica[p])
		return s->replica[p];
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

int srv_repl_start(struct srv *s)
{
	for (unsigned f = 0; f < s->cfg.fold_threads; f++) {
		struct srv_repl *r = calloc(1, sizeof(*r));
		if (!r)
			return RDMAPS_ENOMEM;
		r->ft = &s->ft[f];
		r->layout = srv_replica_layout(s->cfg.chunk_elems);
		r->slot_bytes = RDMAPS_SLOT_HDR + r->layout.bytes; /* a record: header, payload */
		r->npeers = s->cfg.replicas - 1;
		for (unsigned k = 0; k < r->npeers; k++) {
			struct srv_peer *p = &r->peer[k];
			p->s = s;
			p->r = r;
			p->rank = (s->cfg.server_id + 1 + k) % s->cfg.nservers;
			p->pt = calloc(s->store.max, sizeof(*p->pt));
			if (!p->pt) {
				free(r);
				return RDMAPS_ENOMEM;
			}
		}
		s->ft[f].repl = r;
	}
	if (pthread_create(&s->repl_thread, NULL, connector_main, s))
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
			peer_teardown(&r->peer[k]);
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

static bool peer_up(const struct srv_peer *p);

/* Under an authority (etcd): a backup counts as in sync only once it holds
 * everything and no open is in progress on it (a tensor it does not hold
 * yet makes its copy no state of ours: see hold). */
static bool peer_in_sync(const struct srv_peer *p)
{
	return peer_up(p) && p->synced && !p->opening && !p->hold;
}

/*
 * The backups in sync, as a mask of ranks, for the authority to record in
 * etcd (authority.c): only a backup recorded there may take this rank
 * over, so one must be recorded before acknowledgements count on it, and
 * struck off before they go out without it (release).
 */
static void isr_publish(struct srv_repl *r)
{
	uint64_t mask = 0;

	for (unsigned j = 0; j < r->npeers; j++)
		if (peer_in_sync(&r->peer[j]))
			mask |= 1ull << r->peer[j].rank;
	if (atomic_exchange(&r->ft->srv->isr_live, mask) != mask && r->ft->srv->cfg.etcd)
		srv_auth_poke(r->ft->srv);
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
	isr_publish(p->r);
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
		uint64_t applied = __atomic_load_n(&p->credit->folded_seq, __ATOMIC_ACQUIRE);
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

	h->seq = (uint32_t)p->seq;
	if (last)
		h->flags |= RDMAPS_SLOT_LAST;
	wr.wr.rdma.remote_addr = p->ring_addr + (uint64_t)slot * p->ring_slot;
	wr.wr.rdma.rkey = p->ring_rkey;
	if (ibv_post_send(p->qp, &wr, &bad)) {
		peer_fail(p, "cannot post a record");
		return;
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
	uint8_t *b;

	if (!peer_room(p))
		return;
	b = bounce(p, p->posted);
	srv_chunk_replica_copy(t, i, b + RDMAPS_SLOT_HDR, r->layout.state_off, r->layout.steps_off,
			       &r->ft->open);
	*(struct rdmaps_slot_hdr *)b = (struct rdmaps_slot_hdr){
		.tensor_id = (uint16_t)p->pt[t->id].id, .flags = RDMAPS_SLOT_REPLICA, .chunk = i,
		.count = ((const struct rdmaps_chunk_hdr *)(b + RDMAPS_SLOT_HDR))->count,
	};
	peer_post(p, b, r->layout.bytes, false);
	if (peer_up(p))
		atomic_fetch_add_explicit(&p->s->replicated_chunks, 1, memory_order_relaxed);
}

/*
 * End p's group: the accounts of the workers whose pushes the records
 * before finished (docs/durability.md, "Exactly once"), every seq of each
 * below the one given folded or refused, as ACCOUNTS records, the last one
 * ending the group. A primary restored from p's copy, or p taking this
 * rank over, answers their RESUME with them. With a connection's place
 * given, only the newest of its waits counts; all: every connection of
 * the thread, as now (after a catch-up).
 */
static void peer_end_group(struct srv_peer *p, bool all)
{
	struct srv_repl *r = p->r;
	const size_t per = r->layout.bytes / sizeof(struct rdmaps_replica_account);
	uint32_t n = 0, k = 0, total = all ? r->ft->nconns : r->count;
	uint8_t *b = NULL;

	for (;;) {
		const struct srv_conn *c = NULL;
		uint64_t seq = 0;
		if (k < total) {
			if (all) {
				c = r->ft->conns[k];
				seq = c->group_seq;
				if (c->rstore || c->store != &c->srv->store)
					c = NULL;
			} else {
				const struct repl_wait *w = &r->wait[(r->head + k) % REPL_WAIT_MAX];
				if (!w->assigned && w->c) {
					c = w->c;
					seq = w->seq;
				}
			}
			k++;
		}
		bool done = k >= total && !c;
		if (b && (n == per || done)) {
			*(struct rdmaps_slot_hdr *)b = (struct rdmaps_slot_hdr){
				.flags = RDMAPS_SLOT_ACCOUNTS, .count = n,
			};
			peer_post(p, b, n * sizeof(struct rdmaps_replica_account), done);
			b = NULL;
			n = 0;
		}
		if (done) {
			if (p->in_group && peer_room(p)) { /* a group with no account */
				b = bounce(p, p->posted);
				*(struct rdmaps_slot_hdr *)b =
					(struct rdmaps_slot_hdr){ .flags = RDMAPS_SLOT_ACCOUNTS };
				peer_post(p, b, 0, true);
			}
			return;
		}
		if (!c || c->place >= p->acct_cap)
			continue;
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
				  .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED },
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

/* The next tensor waiting for its open, if none is being asked. */
static void open_next(struct srv_peer *p)
{
	struct srv_store *st = &p->s->store;
	uint32_t n = atomic_load(&st->count);

	if (p->asking || !p->opening || !peer_up(p))
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
	if (p->pt[t->id].state != PT_CLOSED)
		return;
	p->pt[t->id].state = PT_QUEUED;
	p->opening++;
	if (p->s->cfg.etcd && (atomic_load(&p->s->isr_etcd) >> p->rank & 1u))
		p->hold = true;
	isr_publish(p->r);
	open_next(p);
}

/* p holds everything: acknowledgements wait for it from now on. */
static void peer_caught_up(struct srv_peer *p)
{
	p->synced = true;
	atomic_fetch_add(&p->s->backups_up, 1);
	isr_publish(p->r);
	log_info("backup rank %u caught up: %llu records in %.1f ms", p->rank,
		 (unsigned long long)(p->posted - p->sync_from),
		 (double)(rdmaps__now_ns() - p->sync_ns) / 1e6);
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
	if (post_recv(p)) {
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
	*pt = (struct peer_tensor){ .id = rep.tensor_id, .state = PT_OPEN };
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
		isr_publish(r);
	open_next(p);
}

/* A backup the connector just connected, or one held while etcd still
 * counted it in sync: every tensor is opened on it and written whole (the
 * catch-up); it counts for credits once that is done. */
static void peer_adopt(struct srv_peer *p)
{
	struct srv_store *st = &p->s->store;
	uint32_t n = atomic_load(&st->count);

	memset(p->pt, 0, st->max * sizeof(*p->pt));
	p->completed = p->posted; /* nothing of an earlier connection is in flight */
	p->asking = NULL;
	p->answered = false;
	p->opening = 0;
	p->hold = false;
	p->in_group = false;
	if (p->synced)
		atomic_fetch_sub(&p->s->backups_up, 1);
	p->synced = false;
	p->sync_from = p->posted;
	p->sync_ns = rdmaps__now_ns();
	atomic_store_explicit(&p->state, PEER_UP, memory_order_relaxed);
	isr_publish(p->r);
	for (uint32_t i = 0; i < n; i++)
		open_want(p, srv_store_get(st, i));
	if (!n)
		peer_caught_up(p);
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
			 * does not; then everything again */
			if (atomic_load(&ft->srv->isr_etcd) >> p->rank & 1u)
				continue;
			peer_adopt(p);
			continue;
		}
		for (uint32_t k = 0; k < r->ntouch && peer_up(p); k++) {
			struct srv_tensor *t = r->touch[k].t;
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
	const uint64_t isr = atomic_load(&r->ft->srv->isr_etcd);

	while (r->count) {
		struct repl_wait *w = &r->wait[r->head];
		unsigned up = 0;
		bool done = w->assigned;
		for (unsigned j = 0; done && j < r->npeers; j++) {
			const struct srv_peer *p = &r->peer[j];
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
			if (up < r->npeers)
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

int srv_repl_poll(struct srv_fold_thread *ft)
{
	struct srv_repl *r = ft->repl;
	int work = 0;

	for (unsigned j = 0; j < r->npeers; j++) {
		struct srv_peer *p = &r->peer[j];
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
		}
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
		(struct repl_wait){ .c = c, .seq = seq, .urgent = urgent };
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

void srv_repl_describe(struct srv *s, struct srv_fold_thread *ft,
		       struct rdmaps_msg_replicas_reply *r)
{
	const struct srv_repl *rp = ft->repl;

	r->server_id = s->cfg.server_id;
	r->replicas = s->cfg.replicas;
	r->epoch = atomic_load(&s->epoch);
	r->in_sync = atomic_load(&s->isr_etcd);
	for (unsigned k = 0; k < RDMAPS_MAX_SERVERS; k++)
		if (srv_serves(s, k))
			r->taken_over |= 1ull << k;
	/* with backups there is one fold thread (main.c): this one owns them */
	for (unsigned j = 0; rp && j < rp->npeers && j < 3; j++) {
		const struct srv_peer *p = &rp->peer[j];
		struct rdmaps_wire_backup_info *b = &r->backup[r->nbackups++];
		b->rank = p->rank;
		b->state = !peer_up(p) ? RDMAPS_BACKUP_DOWN
			   : p->synced ? RDMAPS_BACKUP_UP
				       : RDMAPS_BACKUP_CATCHING_UP;
		b->writes = p->posted;
		b->in_flight = peer_up(p) ? p->posted - p->completed : 0;
		b->opening = peer_up(p) ? p->opening : 0;
	}
	for (unsigned k = 0; k < RDMAPS_MAX_SERVERS && r->nheld < 64; k++) {
		const struct srv_store *st = __atomic_load_n(&s->replica[k], __ATOMIC_ACQUIRE);
		struct rdmaps_wire_held_info *h;
		if (!st)
			continue;
		h = &r->held[r->nheld++];
		h->primary = k;
		h->tensors = atomic_load(&((struct srv_store *)st)->count);
		for (uint32_t i = 0; i < st->naccounts; i++)
			h->accounts += __atomic_load_n(&st->accounts[i].conn_id, __ATOMIC_RELAXED) != 0;
	}
}
