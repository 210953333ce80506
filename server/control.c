/*
 * control.c -- the control plane: declare, lookup, seal, stats. Runs on the
 * connection's fold thread when a SEND arrives. Every field is checked here,
 * where it is received; a bad message gets an error reply and is counted,
 * and nothing else changes.
 */
#include <stdio.h>
#include <string.h>

#include "log.h"
#include "optimizer.h"
#include "server.h"

/* A worker sends one request at a time; a peer that sends more finds its
 * replies beyond the reply buffers dropped, never one overwritten while the
 * NIC still sends it. */
static void reply_send(struct srv_conn *c, const void *msg, uint32_t len)
{
	uint64_t wr_id = SRV_WR(c, SRV_SEND_PLAIN, 0);
	const void *from = msg;
	uint32_t sup;
	const char *why = "send queue full or broken";

	if (len > c->max_inline) {
		unsigned i = 0;
		while (i < SRV_REPLY_BUFS && (c->reply_busy >> i) & 1u)
			i++;
		if (i == SRV_REPLY_BUFS) {
			atomic_fetch_add_explicit(&c->bad_msgs, 1, memory_order_relaxed);
			atomic_fetch_add_explicit(&c->srv->bad_messages, 1, memory_order_relaxed);
			why = "requests beyond the replies in flight";
			goto dropped;
		}
		from = srv_conn_reply_buf(c, i);
		memcpy(srv_conn_reply_buf(c, i), msg, len);
		wr_id = SRV_WR(c, SRV_SEND_REPLY, i);
	}
	if (!srv_conn_post_send(c, from, len, IBV_WR_SEND, 0, 0, wr_id)) {
		if (SRV_WR_KIND(wr_id) == SRV_SEND_REPLY)
			c->reply_busy |= (uint8_t)(1u << SRV_WR_IDX(wr_id));
		return;
	}
dropped:
	if (rdmaps__ratelimit_ok(&c->log_rl, &sup))
		log_warn("worker " SRV_CONN_FMT ": reply dropped (%s); %u more not logged",
			 SRV_CONN_ARGS(c), why, sup);
}

static void reply_status(struct srv_conn *c, uint32_t req_id, int status)
{
	struct rdmaps_msg_status_reply r = { .status = status };

	rdmaps__msg_init(&r.hdr, RDMAPS_MSG_STATUS_REPLY, sizeof(r), req_id);
	reply_send(c, &r, sizeof(r));
}

/* A control message refused: counted, and logged within c's rate limit;
 * the caller replies (with the status, in the reply its request expects). */
static void refused(struct srv_conn *c, int err, const char *why)
{
	uint32_t sup;

	atomic_fetch_add_explicit(&c->bad_msgs, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&c->srv->bad_messages, 1, memory_order_relaxed);
	if (rdmaps__ratelimit_ok(&c->log_rl, &sup))
		log_warn("worker " SRV_CONN_FMT ": control message refused: %s (%s); %u more not "
			 "logged", SRV_CONN_ARGS(c), why, rdmaps_strerror(err), sup);
}

static void bad_message(struct srv_conn *c, uint32_t req_id, int err, const char *why)
{
	refused(c, err, why);
	reply_status(c, req_id, err);
}

static void reply_tensor(struct srv_conn *c, uint32_t req_id, struct srv_tensor *t, bool created)
{
	struct rdmaps_msg_tensor_reply r = { 0 };
	uint64_t clock = 0;
	bool ready = true;
	int rc = srv_reg_expose(c, t);

	/* a worker that can read a BSP/SSP tensor takes part in its clocks */
	if (!rc && atomic_load(&t->state_flag) == TENSOR_READY)
		rc = srv_clock_join(t, c, &clock, &ready);
	if (rc) {
		reply_status(c, req_id, rc);
		return;
	}
	rdmaps__msg_init(&r.hdr, RDMAPS_MSG_TENSOR_REPLY, sizeof(r), req_id);
	r.status = 0;
	r.tensor_id = t->id;
	r.length = t->length;
	r.remote_addr = (uintptr_t)t->mem;
	r.rkey = c->tensor_mr[t->id]->rkey;
	r.chunk_elems = t->chunk_elems;
	r.nchunks = t->nchunks;
	r.created = created;
	r.ready = atomic_load(&t->state_flag) == TENSOR_READY && ready;
	r.cons = t->cons;
	r.clock = clock;
	r.copy_offset = t->copy_off;
	r.index_addr = t->index ? (uintptr_t)t->index : 0;
	r.pull_format = t->pull_fmt;
	r.half_addr = t->pull_fmt ? (uintptr_t)srv_half_chunk(t, 0) : 0;
	r.half_stride = (uint32_t)t->half_stride;
	reply_send(c, &r, sizeof(r));
}

static void on_declare(struct srv_conn *c, const struct rdmaps_msg_declare *m)
{
	struct srv_tensor *t;
	bool created = false;
	int rc = srv_store_declare(c->store, m, c, &t, &created);

	if (rc) {
		if (rc == RDMAPS_EINVAL || rc == RDMAPS_ERANGE)
			bad_message(c, m->hdr.req_id, rc, "bad declaration");
		else
			reply_status(c, m->hdr.req_id, rc);
		return;
	}
	if (created && c->ft && c->ft->repl)
		srv_repl_declared(c->ft, c->store, t);
	reply_tensor(c, m->hdr.req_id, t, created);
}

static void on_lookup(struct srv_conn *c, const struct rdmaps_msg_lookup *m)
{
	struct srv_tensor *t;
	int rc;

	if (rdmaps__name_check(m->name, sizeof(m->name))) {
		bad_message(c, m->hdr.req_id, RDMAPS_EINVAL, "bad tensor name");
		return;
	}
	rc = srv_store_lookup(c->store, m->name, &t);
	if (rc)
		reply_status(c, m->hdr.req_id, rc);
	else
		reply_tensor(c, m->hdr.req_id, t, false);
}

static void on_seal(struct srv_conn *c, const struct rdmaps_msg_seal *m)
{
	struct srv_tensor *t = srv_store_get(c->store, m->tensor_id);

	if (!t || !c->tensor_mr[m->tensor_id]) {
		bad_message(c, m->hdr.req_id, RDMAPS_ENOENT, "seal of an unknown tensor");
		return;
	}
	if (atomic_load(&t->creator) != c || atomic_load(&t->state_flag) != TENSOR_INIT ||
	    m->last_seq + 1 != c->next_seq) {
		bad_message(c, m->hdr.req_id, RDMAPS_EPROTO, "seal out of place");
		return;
	}
	/*
	 * The creator takes part in a BSP/SSP tensor's clocks like any worker
	 * that declared it; its declare reply could not join it (the tensor was
	 * initialising), and the library does not look the tensor up again.
	 * It joins before anyone can see the tensor ready, so it is the first
	 * member, at the first clock; once the chunks are settled, since
	 * joining may complete a clock, which locks chunks.
	 */
	srv_store_settle(t);
	uint64_t clock;
	bool ready;
	int rc = srv_clock_join(t, c, &clock, &ready);
	if (rc || !ready || clock) {
		log_warn("tensor '%s': its creator " SRV_CONN_FMT " could not join its clocks (%s)",
			 t->name, SRV_CONN_ARGS(c), rc ? rdmaps_strerror(rc) : "a clock is under way");
		reply_status(c, m->hdr.req_id, rc ? rc : RDMAPS_EPROTO);
		return;
	}
	srv_store_seal(t);
	if (c->ft->repl)
		srv_repl_touch_all(c->ft, t); /* the backups' chunks even too */
	reply_status(c, m->hdr.req_id, 0);
}

/* A worker back after a failure asks what its broken connection folded. */
static void on_resume(struct srv_conn *c, const struct rdmaps_msg_resume *m)
{
	struct rdmaps_msg_resume_reply r = { 0 };
	struct srv_closed rec;

	if (!m->conn_id || m->conn_id == c->conn_id) {
		bad_message(c, m->hdr.req_id, RDMAPS_EINVAL, "resume of no or this connection");
		return;
	}
	rdmaps__msg_init(&r.hdr, RDMAPS_MSG_RESUME_REPLY, sizeof(r), m->hdr.req_id);
	/*
	 * The record first, then the open connections, then the record again:
	 * the listener writes a closing connection's record before it leaves
	 * the list, so a connection that closes between the first two looks
	 * is found by the third, never answered as unknown.
	 */
	if (srv_resume_find(&c->store->resume, m->conn_id, &rec)) {
		r.folded_seq = rec.folded_seq;
		r.dropped = rec.dropped;
	} else if (srv_conn_evict(c->srv, m->conn_id)) {
		/* still open here (the worker saw the failure first): the
		 * listener closes it, which settles its account */
		r.status = RDMAPS_EAGAIN;
	} else if (srv_resume_find(&c->store->resume, m->conn_id, &rec)) {
		r.folded_seq = rec.folded_seq;
		r.dropped = rec.dropped;
	} else {
		r.status = RDMAPS_ENOENT;
	}
	reply_send(c, &r, sizeof(r));
}

void srv_stats_collect(struct srv *s, struct rdmaps_server_stats *out)
{
	memset(out, 0, sizeof(*out));
	out->connections = atomic_load(&s->connections) - atomic_load(&s->disconnects);
	out->tensors = atomic_load(&srv_own_store(s)->count);
	out->bad_messages = atomic_load(&s->bad_messages);
	out->auth_failures = atomic_load(&s->auth_failures);
	out->disconnects = atomic_load(&s->disconnects);
	out->evictions = atomic_load(&s->evictions);
	out->checkpoints = atomic_load(&s->checkpoints);
	out->checkpoint_failures = atomic_load(&s->checkpoint_failures);
	out->restored_seq = atomic_load(&s->restored_seq);
	out->snapshots = atomic_load(&s->snapshots);
	out->backups = atomic_load(&s->backups_up);
	out->replicated_chunks = atomic_load(&s->replicated_chunks);
	out->backup_failures = atomic_load(&s->backup_failures);
	out->unreplicated_acks = atomic_load(&s->unreplicated_acks);
	out->epoch = atomic_load(&s->epoch);
	out->lease_losses = atomic_load(&s->lease_losses);
	out->failovers = atomic_load(&s->failovers);
	out->handbacks = atomic_load(&s->handbacks);
	srv_reg_stats(s, out);
	for (unsigned i = 0; s->ft && i < s->cfg.fold_threads; i++) {
		out->folds += atomic_load(&s->ft[i].folds);
		out->dropped += atomic_load(&s->ft[i].dropped);
		out->nonfinite += atomic_load(&s->ft[i].nonfinite);
		out->clipped += atomic_load(&s->ft[i].clipped);
		out->completion_queues += atomic_load(&s->ft[i].ncqs);
	}
}

static void on_catalog(struct srv_conn *c, const struct rdmaps_msg_page *m)
{
	static _Thread_local struct rdmaps_msg_catalog_reply r;
	struct srv_store *st = c->store;
	uint32_t n = atomic_load(&st->count);

	memset(&r, 0, sizeof(r));
	rdmaps__msg_init(&r.hdr, RDMAPS_MSG_CATALOG_REPLY, sizeof(r), m->hdr.req_id);
	r.total = n;
	for (uint32_t i = m->start; i < n && r.count < RDMAPS_CATALOG_PAGE; i++) {
		struct srv_tensor *t = srv_store_get(st, i);
		struct rdmaps_wire_tensor_info *e = &r.t[r.count++];
		e->id = t->id;
		e->nchunks = t->nchunks;
		e->length = t->length;
		e->clock = t->cons.mode == RDMAPS_BSP ? t->chunk_clock_done[0] : t->clock;
		for (uint32_t k = 0; k < t->nchunks; k++)
			e->folds += __atomic_load_n(&t->steps[k], __ATOMIC_RELAXED);
		e->mode = (uint8_t)t->cons.mode;
		e->pull_format = (uint8_t)t->pull_fmt;
		e->push_formats = (uint16_t)atomic_load_explicit(&t->push_formats, memory_order_relaxed);
		e->row_dim = t->cons.row_dim;
		snprintf(e->optimizer, sizeof(e->optimizer), "%s", t->opt->name);
		memcpy(e->name, t->name, sizeof(e->name));
	}
	reply_send(c, &r, sizeof(r));
}

static void on_chunks(struct srv_conn *c, const struct rdmaps_msg_page *m)
{
	static _Thread_local struct rdmaps_msg_chunks_reply r;
	struct srv_tensor *t = srv_store_get(c->store, m->id);

	if (!t) {
		bad_message(c, m->hdr.req_id, RDMAPS_ENOENT, "chunks of an unknown tensor");
		return;
	}
	memset(&r, 0, sizeof(r));
	rdmaps__msg_init(&r.hdr, RDMAPS_MSG_CHUNKS_REPLY, sizeof(r), m->hdr.req_id);
	r.total = t->nchunks;
	for (uint32_t i = m->start; i < t->nchunks && r.count < RDMAPS_CHUNKS_PAGE; i++) {
		r.version[r.count++] = srv_chunk_version(t, i);
	}
	reply_send(c, &r, sizeof(r));
}

static void on_workers(struct srv_conn *c, const struct rdmaps_msg_page *m)
{
	static _Thread_local struct rdmaps_msg_workers_reply r;
	struct srv *s = c->srv;
	uint32_t i = 0;

	memset(&r, 0, sizeof(r));
	rdmaps__msg_init(&r.hdr, RDMAPS_MSG_WORKERS_REPLY, sizeof(r), m->hdr.req_id);
	pthread_mutex_lock(&s->conns_lock);
	for (struct srv_conn *w = s->conns; w; w = w->next, i++) {
		struct rdmaps_wire_worker_info *e;
		r.total++;
		if (i < m->start || r.count == RDMAPS_WORKERS_PAGE)
			continue;
		e = &r.w[r.count++];
		snprintf(e->addr, sizeof(e->addr), "%s", w->peer);
		e->folds = atomic_load(&w->folds);
		e->dropped = atomic_load(&w->dropped);
		e->bad_messages = atomic_load(&w->bad_msgs);
		e->next_seq = __atomic_load_n(&w->next_seq, __ATOMIC_RELAXED);
		e->slots = w->slots;
		e->memory = w->staging_bytes + w->bufs_bytes;
		e->pinned = srv_reg_conn_pinned(w);
	}
	pthread_mutex_unlock(&s->conns_lock);
	reply_send(c, &r, sizeof(r));
}

/*
 * A pull's READs of this chunk kept tearing: copy it whole, under its lock,
 * into c's snapshot buffer for the worker to READ (protocol.h). Errors go
 * back in a SNAPSHOT_REPLY too: the worker waits for that type alone.
 */
static void on_snapshot(struct srv_conn *c, const struct rdmaps_msg_snapshot *m)
{
	struct rdmaps_msg_snapshot_reply r = { 0 };
	struct srv_tensor *t = srv_store_get(c->store, m->tensor_id);
	const char *why = NULL;
	int rc = 0;

	rdmaps__msg_init(&r.hdr, RDMAPS_MSG_SNAPSHOT_REPLY, sizeof(r), m->hdr.req_id);
	if (!t || !c->tensor_mr[m->tensor_id]) {
		rc = RDMAPS_ENOENT;
		why = "snapshot of an unknown tensor";
	} else if (m->chunk >= t->nchunks || m->half > 1 || (m->half && !t->pull_fmt)) {
		rc = RDMAPS_EINVAL;
		why = "snapshot of no such chunk";
	} else if (atomic_load(&t->state_flag) != TENSOR_READY) {
		rc = RDMAPS_EAGAIN; /* its chunks are being written until sealed */
	} else if (!(rc = srv_reg_snapshot(c, RDMAPS_CHUNK_HDR + (size_t)c->srv->cfg.chunk_elems *
							  sizeof(float)))) {
		/* sized for the server's chunks: every tensor's (rows too) fit */
		r.len = (uint32_t)srv_chunk_snapshot(t, m->chunk, m->half, c->snap, &c->ft->open);
		r.addr = (uintptr_t)c->snap;
		r.rkey = c->snap_mr->rkey;
		atomic_fetch_add_explicit(&c->srv->snapshots, 1, memory_order_relaxed);
	}
	if (why)
		refused(c, rc, why);
	r.status = rc;
	reply_send(c, &r, sizeof(r));
}

/*
 * The primary of c->replica_of opens the backup of one of its tensors:
 * declared here as it was there (in the store of that primary's replicas,
 * ready at once: the primary's records of every chunk come next, into
 * c's ring: backup.c).
 */
static void on_replica_open(struct srv_conn *c, const struct rdmaps_msg_declare *m)
{
	struct rdmaps_msg_replica_reply r = { 0 };
	struct rdmaps_msg_declare d = *m;
	struct srv_tensor *t;
	bool created;
	int rc;

	d.flags &= ~RDMAPS_DECLARE_INIT_DATA;
	rc = srv_store_declare(c->rstore, &d, c, &t, &created);
	if (!rc && t->opt->state_per_param > SRV_REPLICA_STATE_MAX)
		rc = RDMAPS_ENOTSUP; /* its records would not hold the state */
	if (rc) {
		refused(c, rc, "replica open");
		reply_status(c, m->hdr.req_id, rc);
		return;
	}
	rdmaps__msg_init(&r.hdr, RDMAPS_MSG_REPLICA_REPLY, sizeof(r), m->hdr.req_id);
	r.tensor_id = t->id;
	r.nchunks = t->nchunks;
	r.chunk_elems = t->chunk_elems;
	r.state_per_param = t->opt->state_per_param;
	r.accounts_cap = c->rstore->naccounts;
	reply_send(c, &r, sizeof(r));
}

void srv_control_handle(struct srv_conn *c, const void *msg, uint32_t len)
{
	struct rdmaps_msg_hdr h = { 0 };
	uint16_t type = 0;
	int rc = rdmaps__msg_check(msg, len, &type);

	if (len >= sizeof(h))
		memcpy(&h, msg, sizeof(h));
	if (rc) {
		bad_message(c, h.req_id, rc, "malformed message");
		return;
	}
	/* a replica connection opens replicas and nothing else; a worker
	 * never opens one */
	if (!c->rstore != (type != RDMAPS_MSG_REPLICA_OPEN)) {
		bad_message(c, h.req_id, RDMAPS_EPROTO,
			    c->rstore ? "a replica connection's request is not REPLICA_OPEN"
				      : "REPLICA_OPEN from a worker");
		return;
	}
	switch (type) {
	case RDMAPS_MSG_REPLICA_OPEN: {
		struct rdmaps_msg_declare m;
		memcpy(&m, msg, sizeof(m));
		on_replica_open(c, &m);
		break;
	}
	case RDMAPS_MSG_DECLARE: {
		struct rdmaps_msg_declare m;
		memcpy(&m, msg, sizeof(m));
		on_declare(c, &m);
		break;
	}
	case RDMAPS_MSG_LOOKUP: {
		struct rdmaps_msg_lookup m;
		memcpy(&m, msg, sizeof(m));
		on_lookup(c, &m);
		break;
	}
	case RDMAPS_MSG_SEAL: {
		struct rdmaps_msg_seal m;
		memcpy(&m, msg, sizeof(m));
		on_seal(c, &m);
		break;
	}
	case RDMAPS_MSG_RESUME: {
		struct rdmaps_msg_resume m;
		memcpy(&m, msg, sizeof(m));
		on_resume(c, &m);
		break;
	}
	case RDMAPS_MSG_SNAPSHOT: {
		struct rdmaps_msg_snapshot m;
		memcpy(&m, msg, sizeof(m));
		on_snapshot(c, &m);
		break;
	}
	case RDMAPS_MSG_STATS: {
		struct rdmaps_msg_stats_reply r = { 0 };
		rdmaps__msg_init(&r.hdr, RDMAPS_MSG_STATS_REPLY, sizeof(r), h.req_id);
		srv_stats_collect(c->srv, &r.stats);
		reply_send(c, &r, sizeof(r));
		break;
	}
	case RDMAPS_MSG_REPLICAS: {
		static _Thread_local struct rdmaps_msg_replicas_reply r;
		memset(&r, 0, sizeof(r));
		rdmaps__msg_init(&r.hdr, RDMAPS_MSG_REPLICAS_REPLY, sizeof(r), h.req_id);
		srv_repl_describe(c->srv, c->ft, &r);
		reply_send(c, &r, sizeof(r));
		break;
	}
	case RDMAPS_MSG_CHECKPOINT:
		if (!c->srv->cfg.ckpt_dir) {
			reply_status(c, h.req_id, RDMAPS_ENOTSUP);
			break;
		}
		/* the listener writes it (fold threads, this one too, are parked);
		 * rdmaps-ctl watches the checkpoint counter for the outcome */
		atomic_store(&c->srv->ckpt_req, true);
		reply_status(c, h.req_id, 0);
		break;
	case RDMAPS_MSG_CATALOG:
	case RDMAPS_MSG_CHUNKS:
	case RDMAPS_MSG_WORKERS: {
		struct rdmaps_msg_page m;
		memcpy(&m, msg, sizeof(m));
		if (type == RDMAPS_MSG_CATALOG)
			on_catalog(c, &m);
		else if (type == RDMAPS_MSG_CHUNKS)
			on_chunks(c, &m);
		else
			on_workers(c, &m);
		break;
	}
	default:
		/* a reply type sent to the server: well-formed, but not a request */
		bad_message(c, h.req_id, RDMAPS_EPROTO, "not a request");
	}
}
