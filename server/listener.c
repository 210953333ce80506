/*
 * listener.c -- rdma_cm listener and connection life cycle: check the hello
 * (version, token, limits), build the worker's private resources (PD, CQ,
 * QP, staging ring), accept, hand it to a fold thread, and free it all when
 * the worker goes away, whatever state it was in.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/eventfd.h>
#include <sys/random.h>

#include "error.h"
#include "log.h"
#include "server.h"

#define SQ_DEPTH 64u
#define CTRL_RECVS 8u /* control requests a worker may have in flight (it uses 1) */

uint8_t *srv_conn_reply_buf(struct srv_conn *c, unsigned i)
{
	return c->bufs + (size_t)(c->recv_depth + i) * RDMAPS_MSG_MAX;
}

uint8_t *srv_conn_credit_buf(struct srv_conn *c)
{
	return srv_conn_reply_buf(c, SRV_REPLY_BUFS);
}

static void conn_free(struct srv_conn *c)
{
	if (!c)
		return;
	/* registrations first: a window bound to the QP holds a reference on
	 * it, and rxe's destroy_qp waits for that forever */
	srv_reg_conn_free(c);
	if (c->qp)
		rdma_destroy_qp(c->id);
	/* its late flushes may still be in the CQ: they match no tag now
	 * (detached), and the CQ keeps room for them (cq.c) */
	if (c->scq)
		srv_cq_release(c->scq, c->cq_need);
	free(c->early);
	free(c->tensor_mr);
	free(c->member_of);
	free(c->group_hdr);
	free(c->group_len);
	if (c->bufs_mr) {
		atomic_fetch_sub(&c->srv->reg_bytes, c->bufs_mr->length);
		ibv_dereg_mr(c->bufs_mr);
	}
	free(c->staging);
	atomic_fetch_sub(&c->srv->staging_used, c->staging_bytes);
	free(c->bufs);
	srv_reg_conn_free_pd(c);
	free(c);
}

static void reject(struct srv *s, struct rdma_cm_id *id, int err, const char *why)
{
	struct rdmaps_wire_reject rj = { .magic = RDMAPS_PROTO_MAGIC, .err = err };
	char addr[INET6_ADDRSTRLEN] = "?";
	struct sockaddr *sa = rdma_get_peer_addr(id);

	if (sa && sa->sa_family == AF_INET)
		inet_ntop(AF_INET, &((struct sockaddr_in *)sa)->sin_addr, addr, sizeof(addr));
	/* a worker failing over asks each server of its rank in turn, and
	 * one waiting on a silent primary asks the others (client look-around):
	 * those refusals are the protocol at work, not news for an operator */
	if (err == RDMAPS_ENOENT)
		log_info("rejected worker %s: %s", addr, why);
	else
		log_warn("rejected worker %s: %s", addr, why);
	atomic_fetch_add(&s->rejected, 1);
	rdma_reject(id, &rj, sizeof(rj));
}

/* Random and never 0; a worker that knows it can learn what the connection
 * folded and have it closed, so it must not be guessed (a counter mixed in
 * keeps ids apart should the kernel have no entropy to give yet). */
static uint64_t new_conn_id(void)
{
	static _Atomic uint64_t n;
	uint64_t id = 0;

	if (getrandom(&id, sizeof(id), GRND_NONBLOCK) != sizeof(id))
		id = rdmaps__now_ns() * 0x9e3779b97f4a7c15ull;
	id ^= atomic_fetch_add(&n, 1) * 0xbf58476d1ce4e5b9ull;
	return id ? id : 1;
}

/*
 * The slots a new worker's ring gets within the server-wide staging budget:
 * --slots while it lasts, then what is left, down to SRV_MIN_SLOTS (a ring
 * of fewer would serialise each push on its credit); 0 when not even that
 * fits, and the worker is refused. Listener thread only.
 */
#define SRV_MIN_SLOTS 2u
static uint32_t ring_slots(const struct srv *s)
{
	uint64_t used = atomic_load(&s->staging_used);
	uint64_t left = s->cfg.staging_budget > used ? s->cfg.staging_budget - used : 0;
	uint64_t n;

	if (srv_ring_bytes(&s->cfg, s->cfg.slots) <= left)
		return s->cfg.slots;
	n = (left & ~(uint64_t)4095) / srv_slot_bytes(&s->cfg);
	return n >= SRV_MIN_SLOTS ? (uint32_t)n : 0;
}

static int conn_build(struct srv *s, struct rdma_cm_id *id, const struct rdmaps_wire_hello *hello,
		      uint32_t slots, struct srv_conn **out)
{
	struct srv_fold_thread *ft = &s->ft[s->next_ft++ % s->cfg.fold_threads];
	struct ibv_qp_init_attr qa = { 0 };
	struct srv_conn *c = calloc(1, sizeof(*c));
	size_t bufs_len;
	int rc = RDMAPS_ENOMEM;

	if (!c)
		return RDMAPS_ENOMEM;
	c->srv = s;
	c->id = id;
	c->ft = ft;
	c->conn_id = new_conn_id();
	c->slots = slots;
	c->slot_size = (uint32_t)srv_slot_bytes(&s->cfg);
	if (hello->flags & RDMAPS_HELLO_REPLICA) /* a record per slot, the largest */
		c->slot_size = (uint32_t)(RDMAPS_SLOT_HDR +
					  srv_replica_layout(s->cfg.chunk_elems, SRV_REPLICA_STATE_MAX).bytes);
	c->recv_depth = c->slots + CTRL_RECVS;
	c->sq_depth = SQ_DEPTH;
	c->next_seq = 1;
	c->group_seq = 1;
	c->credit.folded_seq = 1;
	c->group_hdr = calloc(c->slots, sizeof(*c->group_hdr));
	c->group_len = calloc(c->slots, sizeof(*c->group_len));
	c->credit_addr = hello->credit_addr;
	c->credit_rkey = hello->credit_rkey;
	c->store = &s->store;
	if (hello->flags & RDMAPS_HELLO_REPLICA) {
		c->rstore = s->replica[hello->rank];
		c->replica_of = hello->rank;
	} else if ((hello->flags & RDMAPS_HELLO_RANK) && hello->rank != s->cfg.server_id) {
		c->store = s->replica[hello->rank]; /* taken over: accept() checked */
	} else {
		c->store = srv_own_store(s);
	}
	c->tensor_mr = calloc(s->store.max, sizeof(*c->tensor_mr));
	c->member_of = calloc(s->store.max, sizeof(*c->member_of));
	/* aligned_alloc wants whole pages; the staging budget counts them */
	size_t ring_bytes = rdmaps__round_up((size_t)c->slots * c->slot_size, 4096);
	c->staging = aligned_alloc(4096, ring_bytes);
	if (c->staging) { /* counted only once held: teardown gives back what it took */
		c->staging_bytes = ring_bytes;
		atomic_fetch_add(&s->staging_used, c->staging_bytes);
	}
	/* aligned_alloc wants a whole number of alignments (C17 7.22.3.1;
	 * ASan enforces it) */
	bufs_len = rdmaps__round_up((size_t)(c->recv_depth + SRV_REPLY_BUFS) * RDMAPS_MSG_MAX +
					    RDMAPS_CHUNK_ALIGN,
				    4096);
	c->bufs = aligned_alloc(4096, bufs_len);
	c->bufs_bytes = bufs_len;
	if (!c->tensor_mr || !c->member_of || !c->staging || !c->bufs || !c->group_hdr ||
	    !c->group_len)
		goto fail;
	memset(c->staging, 0, (size_t)c->slots * c->slot_size);

	/* its PD and ring registration: shared or its own (registration.c) */
	if ((rc = srv_reg_conn(s, c, id->verbs)))
		goto fail;
	rc = rdmaps__reg_mr(c->pd, c->bufs, bufs_len, IBV_ACCESS_LOCAL_WRITE, &c->bufs_mr);
	if (rc)
		goto fail;
	atomic_fetch_add(&s->reg_bytes, bufs_len);
	/* what its queues can complete at once: its share of the fold
	 * thread's CQ, and what may come before the listener attaches it */
	c->cq_need = c->recv_depth + c->sq_depth + c->dev->shared;
	c->early = calloc(c->cq_need, sizeof(*c->early));
	c->early_cap = c->cq_need;
	if (!c->early) {
		rc = RDMAPS_ENOMEM;
		goto fail;
	}
	if ((rc = srv_cq_reserve(s, ft, id->verbs, c->rstore != NULL, c->cq_need, &c->scq)))
		goto fail;
	rc = RDMAPS_EVERBS;
	qa.send_cq = qa.recv_cq = c->scq->cq;
	qa.qp_type = IBV_QPT_RC;
	qa.cap.max_send_wr = c->sq_depth + c->dev->shared; /* + the window's bind */
	qa.cap.max_recv_wr = c->recv_depth;
	qa.cap.max_send_sge = 1;
	qa.cap.max_recv_sge = 1;
	qa.cap.max_inline_data = s->cfg.max_inline;
	if (rdma_create_qp(id, c->pd, &qa)) {
		qa.cap.max_inline_data = 0; /* some providers have no inline sends */
		if (!s->cfg.max_inline || rdma_create_qp(id, c->pd, &qa)) {
			log_error("rdma_create_qp: %s", strerror(errno));
			goto fail;
		}
	}
	c->qp = id->qp;
	if ((rc = srv_reg_window(s, c)))
		goto fail;
	/* a provider may grant more than asked (rxe rounds up to its WQE
	 * size); --max-inline is what we use */
	c->max_inline = qa.cap.max_inline_data < s->cfg.max_inline ? qa.cap.max_inline_data
								   : s->cfg.max_inline;
	/* its tag first: every work request carries it */
	srv_fold_register(ft, c);
	if (!c->wr_tag) {
		log_error("fold thread %u: no place left for a connection", ft->idx);
		rc = RDMAPS_ELIMIT;
		goto fail;
	}
	c->registered = true;
	for (uint32_t i = 0; i < c->recv_depth; i++)
		if ((rc = srv_conn_post_recv(c, i)))
			goto fail;
	*out = c;
	return 0;
fail:
	if (c->registered)
		srv_fold_detach(ft, c);
	conn_free(c);
	return rc;
}

/* Returns true when it acked the event itself (the id was refused and destroyed). */
static bool on_connect_request(struct srv *s, struct rdma_cm_event *ev)
{
	struct rdma_cm_id *id = ev->id;
	struct rdmaps_wire_hello hello;
	struct rdmaps_wire_welcome w = { 0 };
	struct rdma_conn_param p = { 0 };
	struct ibv_device_attr da;
	struct srv_conn *c;
	uint32_t slots;
	int rc = rdmaps__hello_check(ev->param.conn.private_data, ev->param.conn.private_data_len);

	if (rc) {
		atomic_fetch_add(&s->bad_messages, 1);
		reject(s, id, rc, rc == RDMAPS_EVERSION ? "protocol version mismatch" : "malformed hello");
		goto destroy;
	}
	memcpy(&hello, ev->param.conn.private_data, sizeof(hello));
	if ((hello.flags & ~(RDMAPS_HELLO_REPLICA | RDMAPS_HELLO_RANK)) ||
	    hello.flags == (RDMAPS_HELLO_REPLICA | RDMAPS_HELLO_RANK)) {
		atomic_fetch_add(&s->bad_messages, 1);
		reject(s, id, RDMAPS_EPROTO, "unknown hello flags");
		goto destroy;
	}
	if (hello.flags & RDMAPS_HELLO_REPLICA) {
		/* another server, to write its backups here: the servers' own
		 * token, never the workers' (a worker knows that one) */
		if (!s->cfg.peer_token_len ||
		    !rdmaps__token_equal(hello.token, hello.token_len, s->cfg.peer_token,
					 s->cfg.peer_token_len)) {
			atomic_fetch_add(&s->auth_failures, 1);
			reject(s, id, RDMAPS_EAUTH,
			       s->cfg.peer_token_len ? "replica connection with a wrong peer token"
						     : "replica connection, and no peer token set here");
			goto destroy;
		}
		/* our own rank's part only while another server holds the
		 * rank: it makes this server the part's backup (re-replication) */
		if (hello.rank >= RDMAPS_MAX_SERVERS ||
		    (hello.rank == s->cfg.server_id && !atomic_load(&s->deposed)) ||
		    !srv_repl_store(s, hello.rank)) {
			atomic_fetch_add(&s->bad_messages, 1);
			reject(s, id, RDMAPS_EINVAL, "replica connection from no other server's rank");
			goto destroy;
		}
		if (srv_serves(s, hello.rank)) {
			/* its parts are served from here now: nobody writes them */
			reject(s, id, RDMAPS_ENOENT, "replica connection from a rank taken over here");
			goto destroy;
		}
	} else if (!rdmaps__token_equal(hello.token, hello.token_len, s->cfg.token, s->cfg.token_len)) {
		atomic_fetch_add(&s->auth_failures, 1);
		reject(s, id, RDMAPS_EAUTH, "wrong or missing token");
		goto destroy;
	} else if ((hello.flags & RDMAPS_HELLO_RANK) && hello.rank != s->cfg.server_id
			   ? !srv_welcomes(s, hello.rank)
			   : atomic_load(&s->deposed)) {
		/* a worker failing over asks each of the rank's servers in turn */
		reject(s, id, RDMAPS_ENOENT, "a worker asked for a rank not served here");
		goto destroy;
	}
	if (s->nconns >= s->cfg.max_workers) {
		reject(s, id, RDMAPS_ELIMIT, "max-workers reached");
		goto destroy;
	}
	/* a replica connection's ring holds a batch of its primary's records,
	 * whatever the workers' budget (a primary is one of a few servers,
	 * not one of many workers) */
	slots = hello.flags & RDMAPS_HELLO_REPLICA ? SRV_REPL_RING : ring_slots(s);
	if (!slots) {
		char why[160];
		snprintf(why, sizeof(why),
			 "the staging budget is spent (%.1f of --staging-mb %llu MiB held by %u workers)",
			 (double)atomic_load(&s->staging_used) / (1 << 20),
			 (unsigned long long)(s->cfg.staging_budget >> 20), s->nconns);
		reject(s, id, RDMAPS_ELIMIT, why);
		goto destroy;
	}
	if (slots < s->cfg.slots)
		log_info("staging budget (--staging-mb) nearly spent: the next worker gets %u of %u slots",
			 slots, s->cfg.slots);
	rc = conn_build(s, id, &hello, slots, &c);
	if (rc) {
		reject(s, id, rc, rdmaps_strerror(rc));
		goto destroy;
	}
	w.magic = RDMAPS_PROTO_MAGIC;
	w.version = RDMAPS_PROTO_VERSION;
	w.staging_addr = (uintptr_t)c->staging;
	w.staging_rkey = srv_reg_staging_rkey(c);
	w.slot_count = c->slots;
	w.slot_size = c->slot_size;
	w.chunk_elems = s->cfg.chunk_elems;
	w.recv_depth = c->recv_depth;
	w.server_id = (hello.flags & RDMAPS_HELLO_RANK) && !(hello.flags & RDMAPS_HELLO_REPLICA)
			      ? hello.rank
			      : s->cfg.server_id;
	w.replicas = (uint16_t)s->cfg.replicas;
	w.instance = s->instance;
	w.restored_seq = atomic_load(&s->restored_seq);
	w.conn_id = c->conn_id;
	p.private_data = &w;
	p.private_data_len = sizeof(w);
	/* workers pull with many READs in flight; grant what the device allows */
	p.responder_resources = 16;
	if (!ibv_query_device(id->verbs, &da) && da.max_qp_rd_atom < 16)
		p.responder_resources = (uint8_t)da.max_qp_rd_atom;
	p.initiator_depth = 0;
	p.rnr_retry_count = 7;
	id->context = c;
	if (rdma_accept(id, &p)) {
		log_error("rdma_accept: %s", strerror(errno));
		id->context = NULL;
		conn_free(c);
		goto destroy;
	}
	{
		struct sockaddr *sa = rdma_get_peer_addr(id);
		if (sa && sa->sa_family == AF_INET)
			inet_ntop(AF_INET, &((struct sockaddr_in *)sa)->sin_addr, c->peer, sizeof(c->peer));
	}
	pthread_mutex_lock(&s->conns_lock);
	/* a part has one writer: the newest primary of it (a failover's, a
	 * reconnect's); an older connection for it, dead or fenced, goes,
	 * applying the whole groups in its ring first */
	for (struct srv_conn *o = s->conns; c->rstore && o; o = o->next)
		if (o->rstore == c->rstore)
			atomic_store(&o->evict, true), atomic_store(&s->evict_req, true);
	c->next = s->conns;
	if (s->conns)
		s->conns->prev = c;
	s->conns = c;
	s->nconns++;
	pthread_mutex_unlock(&s->conns_lock);
	return false;
destroy:
	/* the event must be acked before its id can be destroyed */
	rdma_ack_cm_event(ev);
	rdma_destroy_id(id);
	return true;
}

/* Fold what it staged, free it, and only then count it gone: a worker
 * that saw the connection count drop can read what it pushed. */
static void conn_teardown(struct srv *s, struct srv_conn *c)
{
	struct rdma_cm_id *id = c->id;
	bool counted = c->attached;

	if (c->registered)
		srv_fold_detach(c->ft, c); /* folds what it staged, if it was attached */
	/* after detach nobody folds for it: its account is final, its clocks
	 * can stop waiting, and tensors it never sealed go to the next declarer */
	if (c->attached)
		srv_resume_record(&c->store->resume,
				  &(struct srv_closed){ .conn_id = c->conn_id,
							.folded_seq = c->credit.folded_seq,
							.dropped = c->credit.dropped });
	srv_clock_leave(c);
	srv_store_orphan(c->store, c);
	pthread_mutex_lock(&s->conns_lock);
	if (c->prev)
		c->prev->next = c->next;
	else
		s->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	s->nconns--;
	pthread_mutex_unlock(&s->conns_lock);
	conn_free(c);
	rdma_destroy_id(id);
	if (counted)
		atomic_fetch_add(&s->disconnects, 1);
}

bool srv_conn_evict(struct srv *s, uint64_t conn_id)
{
	bool found = false;

	pthread_mutex_lock(&s->conns_lock);
	for (struct srv_conn *c = s->conns; c && !found; c = c->next)
		if (c->conn_id == conn_id) {
			atomic_store(&c->evict, true);
			found = true;
		}
	pthread_mutex_unlock(&s->conns_lock);
	if (found)
		atomic_store(&s->evict_req, true);
	return found;
}

/*
 * Connections whose workers came back on another one (a cut link, a
 * watchdog): closing them now, rather than when the keepalive finds them
 * dead, settles what they folded (the drain in teardown) so the worker's
 * RESUME can be answered in a moment.
 */
static void evict_some(struct srv *s)
{
	struct srv_conn *c = s->conns, *next;

	for (; c; c = next) {
		next = c->next;
		if (!atomic_load(&c->evict))
			continue;
		log_info("connection " SRV_CONN_FMT ": %s; closing it", SRV_CONN_ARGS(c),
			 c->rstore ? "its primary's rank was taken over here"
			 : atomic_load(&s->deposed) && c->store == srv_own_store(s)
				 ? "this rank was taken over elsewhere"
			 : c->store != srv_own_store(s) ? "its rank is being handed back to its server"
				 : "its worker came back on another connection");
		rdma_disconnect(c->id);
		conn_teardown(s, c);
	}
}

/*
 * Rank p's primary is gone and the authority claimed p here (authority.c):
 * its replica's accounts become the records RESUME answers from (workers
 * of p settle by them), workers asking for p are accepted from now on
 * (srv_serves), and p's replica connections are closed: nobody writes the
 * part but this server's folds. And a rank of ours taken over elsewhere,
 * or one taken over here being handed back: its workers are sent away, to
 * find it where it is (next).
 */
/* Mark for eviction the connections on st: the replica connections
 * writing it (replicas), or else the workers using it. Any marked? */
static bool mark_evict(struct srv *s, const struct srv_store *st, bool replicas)
{
	bool any = false;

	pthread_mutex_lock(&s->conns_lock);
	for (struct srv_conn *c = s->conns; c; c = c->next)
		if (replicas ? c->rstore == st : !c->rstore && c->store == st)
			atomic_store(&c->evict, any = true);
	pthread_mutex_unlock(&s->conns_lock);
	return any;
}

void srv_listener_wake(struct srv *s)
{
	uint64_t one = 1;

	if (write(s->wake_fd, &one, sizeof(one)) < 0)
		log_warn("listener: wake-up write failed");
}

static void take_overs(struct srv *s)
{
	bool evict = false;

	for (unsigned p = 0; p < RDMAPS_MAX_SERVERS; p++) {
		struct srv_store *st = s->replica[p];
		if (!atomic_exchange(&s->takeover_req[p], false) || !st)
			continue;
		/* its primary's connection first: leaving, it has its fold
		 * thread apply every whole group still in its ring (backup.c) */
		if (mark_evict(s, st, true))
			evict_some(s);
		if (!st->from_ckpt) /* (restored: its records came with it) */
			srv_repl_accounts_to_records(st);
		st->from_ckpt = false;
		atomic_store(&s->took_over[p], true);
		if (s->cfg.replicas > 1)
			srv_repl_serve_part(s, p);
		atomic_fetch_add(&s->failovers, 1);
		log_warn("serving rank %u's part (%u tensors) from its replica here", p,
			 atomic_load(&st->count));
		if (p == s->cfg.server_id) {
			/* our rank back: its workers are welcome, to this copy */
			atomic_store(&s->deposed, false);
			s->deposed_done = false;
		}
	}
	/* a rank being handed back, or no longer ours (our lease ended): its
	 * workers go, to find it where it is */
	for (unsigned p = 0; p < RDMAPS_MAX_SERVERS; p++) {
		bool serves = srv_serves(s, p);
		bool going = p != s->cfg.server_id &&
			     (atomic_load(&s->handing_back[p]) || (s->was_serving[p] && !serves));
		s->was_serving[p] = serves;
		if (going && !s->handed_off[p] && s->replica[p])
			evict |= mark_evict(s, s->replica[p], false);
		s->handed_off[p] = going;
	}
	if (atomic_load(&s->deposed) && !s->deposed_done)
		evict |= mark_evict(s, srv_own_store(s), false);
	s->deposed_done = atomic_load(&s->deposed);
	if (evict)
		evict_some(s);
}

static void on_event(struct srv *s, struct rdma_cm_event *ev)
{
	struct srv_conn *c = ev->id ? ev->id->context : NULL;
	enum rdma_cm_event_type type = ev->event;

	if (c)
		log_debug("worker " SRV_CONN_FMT ": %s (status %d)", SRV_CONN_ARGS(c), rdma_event_str(type),
			  ev->status);

	switch (type) {
	case RDMA_CM_EVENT_CONNECT_REQUEST:
		if (on_connect_request(s, ev))
			return; /* already acked and destroyed */
		break;
	case RDMA_CM_EVENT_ESTABLISHED:
		if (c && !c->attached) {
			/* rdma_cm leaves the RNR timer at 0, which means 655 ms: a
			 * worker whose WRITE-with-immediate finds no receive posted
			 * would stall that long. 12 (0.64 ms), as the verbs notes
			 * advise for rxe; allowed on an RTS queue pair. */
			struct ibv_qp_attr qa = { .min_rnr_timer = 12 };
			/* the ring's window, bound before the fold thread can send
			 * anything: the worker learns nothing it could push to
			 * before that bind has been done (the SQ keeps order) */
			if (srv_reg_bind(c)) {
				rdma_ack_cm_event(ev);
				rdma_disconnect(c->id);
				conn_teardown(s, c);
				return;
			}
			if (ibv_modify_qp(c->qp, &qa, IBV_QP_MIN_RNR_TIMER))
				log_warn("worker " SRV_CONN_FMT ": cannot set the RNR timer: %s", SRV_CONN_ARGS(c),
					 strerror(errno));
			c->attached = true;
			atomic_fetch_add(&s->connections, 1);
			srv_fold_attach(c->ft, c);
			log_info("worker " SRV_CONN_FMT " connected (%u live)", SRV_CONN_ARGS(c), s->nconns);
		}
		break;
	case RDMA_CM_EVENT_DISCONNECTED:
	case RDMA_CM_EVENT_CONNECT_ERROR:
	case RDMA_CM_EVENT_UNREACHABLE:
	case RDMA_CM_EVENT_REJECTED:
		if (c) {
			log_info("worker " SRV_CONN_FMT " gone (%s); freeing its resources", SRV_CONN_ARGS(c),
				 rdma_event_str(type));
			rdma_ack_cm_event(ev);
			conn_teardown(s, c);
			return;
		}
		break;
	case RDMA_CM_EVENT_DEVICE_REMOVAL:
		/*
		 * Every connection and registration is on the device that went:
		 * stop as on SIGTERM (the shutdown checkpoint included), which
		 * also lets the kernel finish the removal, and exit non-zero so
		 * a supervisor starts it again once the device is back; workers
		 * then reconnect to it by themselves.
		 */
		log_error("RDMA device %s removed: writing a checkpoint and stopping",
			  ev->id && ev->id->verbs ? ibv_get_device_name(ev->id->verbs->device) : "?");
		s->exit_rc = RDMAPS_ENODEV; /* srv_run returns; fold threads stay up
					     * to be parked for that checkpoint */
		break;
	default:
		log_debug("rdma_cm event %s ignored", rdma_event_str(type));
	}
	rdma_ack_cm_event(ev);
}

static int bind_any(struct srv *s)
{
	struct rdma_addrinfo hints = { .ai_flags = RAI_PASSIVE, .ai_port_space = RDMA_PS_TCP };
	struct rdma_addrinfo *res;
	const char *node = s->cfg.listen_addr && *s->cfg.listen_addr ? s->cfg.listen_addr : NULL;
	int rc;

	if (!node)
		node = "0.0.0.0";
	if (rdma_getaddrinfo(node, s->cfg.port, &hints, &res)) {
		log_error("cannot resolve listen address %s:%s", node, s->cfg.port);
		return RDMAPS_ENODEV;
	}
	rc = rdma_bind_addr(s->listen_id, res->ai_src_addr);
	rdma_freeaddrinfo(res);
	if (rc) {
		log_error("cannot bind %s:%s: %s (is there an RDMA device with that address? "
			  "see `ibv_devices` and tools/rxe-setup)",
			  node, s->cfg.port, strerror(errno));
		return rdmaps__from_errno(errno);
	}
	return 0;
}

static void announce(struct srv *s)
{
	const char *node = s->cfg.listen_addr ? s->cfg.listen_addr : "0.0.0.0";

	if (s->listen_id->verbs) {
		printf("rdmaps-server: serving on %s port %s via device %s\n", node, s->cfg.port,
		       ibv_get_device_name(s->listen_id->verbs->device));
	} else {
		printf("rdmaps-server: serving on %s port %s via devices:", node, s->cfg.port);
		for (int d = 0; d < s->ndev; d++)
			printf(" %s", ibv_get_device_name(s->devs[d]->device));
		printf("\n");
	}
	fflush(stdout);
}

int srv_listen(struct srv *s)
{
	uint64_t seq = 0, last = 0;
	int rc;

	/* the instance only has to differ between runs of this server; a clock
	 * and the pid stand in if the kernel has no entropy to give yet */
	if (getrandom(&s->instance, sizeof(s->instance), GRND_NONBLOCK) != sizeof(s->instance))
		s->instance = rdmaps__now_ns() ^ ((uint64_t)getpid() << 32);
	if (!s->instance)
		s->instance = 1;
	pthread_mutex_init(&s->pause_lock, NULL);
	pthread_cond_init(&s->pause_cond, NULL);
	pthread_mutex_init(&s->conns_lock, NULL);
	if (s->cfg.ckpt_dir) {
		srv_checkpoint_restore(&s->store, s->cfg.ckpt_dir, s->cfg.server_id, &seq, &last);
		s->ckpt_seq = last;
		atomic_store(&s->restored_seq, seq);
		s->last_ckpt_ns = rdmaps__now_ns();
		if (seq)
			printf("rdmaps-server: restored checkpoint %llu (%u tensors)\n",
			       (unsigned long long)seq, atomic_load(&s->store.count));
	}

	s->cm_channel = rdma_create_event_channel();
	if (!s->cm_channel || rdma_create_id(s->cm_channel, &s->listen_id, s, RDMA_PS_TCP))
		return RDMAPS_EVERBS;
	if ((rc = bind_any(s)))
		return rc;
	/*
	 * Bound to an address: that one device is all it serves through, and
	 * all it opens. rdma_get_devices() would open every device on the host
	 * and hold it for good, and a device a process holds cannot be removed
	 * (on rxe the removal waits for it), not even another host's NIC that
	 * is none of this server's business.
	 */
	if (s->listen_id->verbs) {
		s->own_devs[0] = s->listen_id->verbs;
		s->devs = s->own_devs;
		s->ndev = 1;
	} else {
		s->devs = rdma_get_devices(&s->ndev);
	}
	if (!s->devs || s->ndev <= 0) {
		log_error("no RDMA device found: load a driver or create a soft-RoCE device "
			  "(tools/rxe-setup add), and check `ibv_devices`");
		return RDMAPS_ENODEV;
	}
	if (rdma_listen(s->listen_id, 64)) {
		log_error("rdma_listen: %s", strerror(errno));
		return rdmaps__from_errno(errno);
	}
	if ((rc = srv_fold_start(s)))
		return rc;
	if (s->cfg.replicas > 1 && (rc = srv_repl_start(s)))
		return rc;
	/* the authority's take-overs are served at once, not at the next tick */
	if (s->cfg.etcd && (s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
		return rdmaps__from_errno(errno);
	if (s->cfg.etcd && (rc = srv_auth_start(s)))
		return rc;
	announce(s);
	return 0;
}

/*
 * A port that comes back may come back with new GID entries; the listening
 * id bound before is re-made so it binds to what the port has now.
 * (On rxe under kernel 6.1 this alone does not make a long-lived process
 * reachable again after a link flap: docs/durability.md.)
 */
static void relisten(struct srv *s)
{
	struct rdma_cm_id *old = s->listen_id;

	if (rdma_create_id(s->cm_channel, &s->listen_id, s, RDMA_PS_TCP)) {
		s->listen_id = old;
		log_error("cannot re-create the listener: %s", strerror(errno));
		return;
	}
	rdma_destroy_id(old); /* frees the port before binding it again */
	if (bind_any(s) || rdma_listen(s->listen_id, 64))
		log_error("cannot listen again after the port came back: %s", strerror(errno));
	else
		log_warn("RDMA port active again: listening anew on %s:%s",
			 s->cfg.listen_addr ? s->cfg.listen_addr : "0.0.0.0", s->cfg.port);
}

/* Device events (port up/down, GID changes): logged; a port back up relistens. */
static void device_events(struct srv *s, int d)
{
	struct ibv_async_event ev;
	bool again = false;

	while (ibv_get_async_event(s->devs[d], &ev) == 0) {
		log_warn("device %s: %s", ibv_get_device_name(s->devs[d]->device),
			 ibv_event_type_str(ev.event_type));
		if (ev.event_type == IBV_EVENT_PORT_ACTIVE || ev.event_type == IBV_EVENT_GID_CHANGE)
			again = true;
		ibv_ack_async_event(&ev);
	}
	if (again)
		relisten(s);
}

int srv_run(struct srv *s)
{
	struct pollfd pfd[3 + 16];
	int n = 3;
	uint64_t v;

	pfd[0] = (struct pollfd){ .fd = s->cm_channel->fd, .events = POLLIN };
	pfd[1] = (struct pollfd){ .fd = s->stop_fd, .events = POLLIN };
	pfd[2] = (struct pollfd){ .fd = s->cfg.etcd ? s->wake_fd : -1, .events = POLLIN };
	for (int d = 0; d < s->ndev && n < 19; d++) {
		/* drained in a loop below: must not block */
		fcntl(s->devs[d]->async_fd, F_SETFL, fcntl(s->devs[d]->async_fd, F_GETFL) | O_NONBLOCK);
		pfd[n++] = (struct pollfd){ .fd = s->devs[d]->async_fd, .events = POLLIN };
	}
	while (!atomic_load(&s->stop) && !s->exit_rc) {
		struct rdma_cm_event *ev;

		if (poll(pfd, (nfds_t)n, 100) < 0 && errno != EINTR)
			return rdmaps__from_errno(errno);
		srv_clock_tick(s);
		if ((pfd[2].revents & POLLIN) && read(s->wake_fd, &v, sizeof(v)) < 0)
			log_warn("listener: wake-up read failed");
		if (s->cfg.etcd)
			take_overs(s);
		if (atomic_exchange(&s->evict_req, false))
			evict_some(s);
		/* requests wait for their turn (srv_checkpoint_now), and many
		 * meanwhile make one checkpoint */
		if (atomic_load(&s->ckpt_req) && rdmaps__now_ns() >= s->ckpt_next_ok &&
		    atomic_exchange(&s->ckpt_req, false))
			srv_checkpoint_now(s, "requested");
		else if (s->cfg.ckpt_every_s &&
			 rdmaps__now_ns() - s->last_ckpt_ns > (uint64_t)s->cfg.ckpt_every_s * 1000000000u)
			srv_checkpoint_now(s, "periodic");
		if (pfd[1].revents & POLLIN)
			break;
		for (int i = 3; i < n; i++)
			if (pfd[i].revents & POLLIN)
				device_events(s, i - 3);
		if (!(pfd[0].revents & POLLIN))
			continue;
		if (rdma_get_cm_event(s->cm_channel, &ev))
			continue;
		on_event(s, ev);
	}
	return s->exit_rc;
}

void srv_close(struct srv *s)
{
	/*
	 * A clean stop leaves a checkpoint of the last state behind, with
	 * everything staged in it: first no worker can stage more (each QP
	 * goes to error), then each connection is handed back by its fold
	 * thread, which folds what the worker staged before it went
	 * (conn_drain), and only then the checkpoint. Then the threads:
	 * their completion channels go last, once no CQ uses them.
	 */
	for (struct srv_conn *c = s->conns; c; c = c->next)
		rdma_disconnect(c->id);
	while (s->conns) {
		if (!s->ft)
			s->conns->attached = s->conns->registered = false; /* no fold thread */
		conn_teardown(s, s->conns);
	}
	if (s->ft && s->cfg.ckpt_dir)
		srv_checkpoint_now(s, "shutdown");
	srv_fold_join(s);
	srv_auth_stop(s); /* no fold after this: the rank is free at once */
	if (s->cfg.etcd && s->wake_fd > 0)
		close(s->wake_fd);
	srv_repl_stop(s); /* its fold threads' backups, and ours of others */
	srv_fold_stop(s);
	srv_reg_fini(s);
	if (s->listen_id)
		rdma_destroy_id(s->listen_id);
	if (s->cm_channel)
		rdma_destroy_event_channel(s->cm_channel);
	if (s->devs && s->devs != s->own_devs)
		rdma_free_devices(s->devs);
	srv_store_fini(&s->store);
}
