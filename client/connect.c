/*
 * connect.c -- connecting to one server or a cluster, closing, and the
 * registered regions a connection carves its buffers from. Shaped like
 * rdma-core's rdma_client.c: resolve, build, connect, and one goto ladder
 * that unwinds in reverse. Finding a rank's server again once a connection
 * broke is failover.c's.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "client.h"
#include "error.h"
#include "log.h"

#define CTL_SEND_OFF 0u
#define CTL_RECV_OFF RDMAPS_MSG_MAX
#define CTL_HDR_OFF ((size_t)CTL_RECV_OFF + (size_t)CL_RECVS * RDMAPS_MSG_MAX)
#define CTL_SCRATCH_OFF (CTL_HDR_OFF + (size_t)RDMAPS_MAX_SLOTS * RDMAPS_SLOT_HDR)
#define CTL_SCRATCH_STRIDE ((size_t)CL_SCRATCH_LEAD + CL_SCRATCH)
#define CTL_INDEX_OFF (CTL_SCRATCH_OFF + (size_t)CL_READ_SLOTS * CTL_SCRATCH_STRIDE)
#define CTL_SNAP_OFF (CTL_INDEX_OFF + 2 * (size_t)CL_WINDOWS * CL_INDEX_WORDS * sizeof(uint64_t))
#define CTL_LEN (CTL_SNAP_OFF + 64u)
_Static_assert(sizeof(struct rdmaps_msg_snapshot) <= 64u, "snapshot request buffer");
_Static_assert(CTL_INDEX_OFF % sizeof(uint64_t) == 0, "index area alignment");

uint8_t *cl_send_buf(struct cl_conn *k)
{
	return k->ctl + CTL_SEND_OFF;
}

uint8_t *cl_snap_buf(struct cl_conn *k)
{
	return k->ctl + CTL_SNAP_OFF;
}

uint8_t *cl_recv_buf(struct cl_conn *k, uint32_t i)
{
	return k->ctl + CTL_RECV_OFF + (size_t)i * RDMAPS_MSG_MAX;
}

uint8_t *cl_slot_hdr(struct cl_conn *k, uint32_t slot)
{
	return k->ctl + CTL_HDR_OFF + (size_t)slot * RDMAPS_SLOT_HDR;
}

int cl_post_recv(struct cl_conn *k, uint32_t i)
{
	struct ibv_sge sge = { .addr = (uintptr_t)cl_recv_buf(k, i), .length = RDMAPS_MSG_MAX,
			       .lkey = k->ctl_mr->lkey };
	struct ibv_recv_wr wr = { .wr_id = WR_ID(WR_RECV, k->idx, i), .sg_list = &sge, .num_sge = 1 };
	struct ibv_recv_wr *bad;
	int rc = ibv_post_recv(k->qp, &wr, &bad);

	return rc ? rdmaps__from_errno(rc) : 0;
}

void cl_fail(struct cl_conn *k, int err, const char *why)
{
	if (k->broken)
		return;
	k->broken = err;
	if (!k->c->broken)
		k->c->broken = err;
	log_warn("connection to server %s lost: %s", k->name, why);
	/* staged slots the server never confirmed: the reconnect asks which of
	 * them folded (resume.c). A connection that breaks before the last one
	 * was settled has posted nothing of its own yet. */
	if (k->credit && k->conn_id && !k->resume_id) {
		k->resume_id = k->conn_id;
		k->resume_known = cl_folded_seq(k);
		k->resume_next = k->next_seq;
		k->resume_dropped = __atomic_load_n(&k->credit->dropped, __ATOMIC_ACQUIRE);
		/* refusals this connection's credit showed that no flush has
		 * reported yet: the new connection's credit counts from 0, so
		 * they must be kept here or they are never reported */
		if (k->resume_dropped != k->dropped_seen)
			k->c->dropped_unseen = true;
	}
	/* slots waiting for a snapshot have no request to flush */
	cl_snap_fail(k, err);
	/* error state flushes every outstanding request, so waits end */
	if (k->qp) {
		struct ibv_qp_attr a = { .qp_state = IBV_QPS_ERR };
		ibv_modify_qp(k->qp, &a, IBV_QP_STATE);
	}
}

static int resolve(struct cl_conn *k, const struct rdmaps__server_addr *sa, const char *src,
		   int timeout)
{
	int rc = rdmaps__cm_resolve(k->ch, k->id, sa->host, sa->port, src, timeout);

	if (rc == RDMAPS_ECONNECT)
		log_error("cannot resolve server %s", k->name);
	else if (rc == RDMAPS_ENODEV)
		log_error("cannot resolve local address %s", src);
	return rc;
}

/* The user's registrations on PD slot i, deregistered. */
static void regs_drop(rdmaps_client *c, uint32_t i)
{
	for (rdmaps_mr *m = c->mrs; m; m = m->next)
		if (m->mr[i]) {
			ibv_dereg_mr(m->mr[i]);
			m->mr[i] = NULL;
		}
}

/*
 * One protection domain per device: user buffers are registered once per PD.
 * A device seen for the first time, or back after its removal, gets a PD in
 * a free slot and every registration the user holds is made on it too.
 */
static int pd_for(rdmaps_client *c, struct cl_conn *k)
{
	uint32_t slot = c->npd;
	struct ibv_pd *pd;
	int rc = 0;

	for (uint32_t i = 0; i < c->npd; i++) {
		if (c->pds[i] && c->pds[i]->context == k->id->verbs) {
			k->pd = c->pds[i];
			k->pd_idx = i;
			return 0;
		}
		if (!c->pds[i] && slot == c->npd)
			slot = i;
	}
	if (slot == RDMAPS_MAX_SERVERS)
		return RDMAPS_ELIMIT;
	if (!(pd = ibv_alloc_pd(k->id->verbs)))
		return RDMAPS_EVERBS;
	for (rdmaps_mr *m = c->mrs; m && !rc; m = m->next)
		rc = rdmaps__reg_mr(pd, m->addr, m->len, IBV_ACCESS_LOCAL_WRITE, &m->mr[slot]);
	if (rc) {
		regs_drop(c, slot);
		ibv_dealloc_pd(pd);
		return rc;
	}
	k->pd = c->pds[slot] = pd;
	k->pd_idx = slot;
	if (slot == c->npd)
		c->npd++;
	return 0;
}

/*
 * librdmacm closes its context of a removed device only when it rescans its
 * device list, and rxe cannot finish a removal while any process has the
 * device open. A rescan opens every device present, though, and holds it
 * until it goes; so a client rescans after letting go of a removed device,
 * and from then on after each failed connection attempt too (the device
 * that went may be another one it came to hold that way: with rxe, every
 * host of the test VM sees every other host's device).
 */
void cl_rescan_devices(rdmaps_client *c)
{
	struct ibv_context **devs = rdma_get_devices(NULL);

	if (devs)
		rdma_free_devices(devs);
	c->rescanned = true;
}

/*
 * The device under PD slot i was removed. The kernel ends the removal only
 * once every process has let go of it (rxe cannot take it away from a
 * running process), so once no connection uses it: drop the user's
 * registrations there and the PD, and have librdmacm rescan its device
 * list, which is when it closes its own context of a dead device.
 */
void cl_pd_drop(rdmaps_client *c, uint32_t i)
{
	if (!c->pds[i])
		return; /* dropped already, by another connection through it */
	for (uint32_t j = 0; j < c->nconn; j++)
		if (c->conn[j].pd == c->pds[i])
			return; /* the last connection through it will */
	regs_drop(c, i);
	ibv_dealloc_pd(c->pds[i]);
	c->pds[i] = NULL;
	cl_rescan_devices(c);
	log_info("released a removed RDMA device");
}

static int build(struct cl_conn *k)
{
	struct ibv_qp_init_attr qa = { 0 };
	int rc;

	if ((rc = pd_for(k->c, k)))
		return rc;
	k->credit = aligned_alloc(4096, 4096);
	k->ctl = aligned_alloc(4096, rdmaps__round_up(CTL_LEN, 4096));
	if (!k->credit || !k->ctl)
		return RDMAPS_ENOMEM;
	memset(k->credit, 0, 4096);
	memset(k->ctl, 0, CTL_LEN);
	/* the credit word is the only remotely writable memory of a worker */
	if ((rc = rdmaps__reg_mr(k->pd, k->credit, sizeof(*k->credit),
				 IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE, &k->credit_mr)))
		return rc;
	if ((rc = rdmaps__reg_mr(k->pd, k->ctl, CTL_LEN, IBV_ACCESS_LOCAL_WRITE, &k->ctl_mr)))
		return rc;
	/* a waiter that has spun long enough sleeps on this (ops.c); without
	 * one it sleeps on a timer */
	k->cc = ibv_create_comp_channel(k->id->verbs);
	if (k->cc)
		fcntl(k->cc->fd, F_SETFL, fcntl(k->cc->fd, F_GETFL) | O_NONBLOCK);
	k->cq = ibv_create_cq(k->id->verbs, (int)(CL_SQ_DEPTH + CL_RECVS), k, k->cc, 0);
	if (!k->cq)
		return RDMAPS_EVERBS;
	qa.send_cq = qa.recv_cq = k->cq;
	qa.qp_type = IBV_QPT_RC;
	qa.cap.max_send_wr = CL_SQ_DEPTH;
	qa.cap.max_recv_wr = CL_RECVS;
	/* a READ: chunk header | floats, per chunk it spans; a WRITE: slot
	 * header | floats */
	k->read_span = rdmaps__read_span(k->id->verbs);
	qa.cap.max_send_sge = 2 * k->read_span;
	qa.cap.max_recv_sge = 1;
	/* small pushes go inline: the provider copies header and floats into
	 * the work request, so no bounce copy and no per-SGE memory lookup */
	qa.cap.max_inline_data = CL_INLINE;
	if (rdma_create_qp(k->id, k->pd, &qa)) {
		qa.cap.max_inline_data = 0; /* some providers have no inline sends */
		if (rdma_create_qp(k->id, k->pd, &qa)) {
			log_error("rdma_create_qp: %s", strerror(errno));
			return rdmaps__from_errno(errno);
		}
	}
	k->qp = k->id->qp;
	k->max_inline = qa.cap.max_inline_data;
	for (uint32_t i = 0; i < CL_RECVS; i++)
		if ((rc = cl_post_recv(k, i)))
			return rc;
	return 0;
}

static int establish(struct cl_conn *k, const char *token, int timeout)
{
	struct rdmaps_wire_hello h = { 0 };
	struct rdmaps_wire_welcome w;
	struct rdma_conn_param p = { 0 };
	struct ibv_device_attr da;
	struct rdma_cm_event *ev;
	int rc, reject_err = 0;
	size_t tlen = token ? strlen(token) : 0;

	if (tlen > RDMAPS_TOKEN_MAX)
		return RDMAPS_EINVAL;
	h.magic = RDMAPS_PROTO_MAGIC;
	h.version = RDMAPS_PROTO_VERSION;
	h.token_len = (uint16_t)tlen;
	memcpy(h.token, token ? token : "", tlen);
	h.credit_addr = (uintptr_t)k->credit;
	h.credit_rkey = k->credit_mr->rkey;
	if (k->ask_rank) {
		h.flags = RDMAPS_HELLO_RANK;
		h.rank = (uint16_t)k->idx;
	}
	p.private_data = &h;
	p.private_data_len = sizeof(h);
	p.initiator_depth = 16;
	if (!ibv_query_device(k->id->verbs, &da) && da.max_qp_init_rd_atom < 16)
		p.initiator_depth = (uint8_t)da.max_qp_init_rd_atom;
	p.responder_resources = 0; /* nobody READs from a worker */
	/*
	 * 6, not the customary 7: rxe counts 7 as "retry forever" (a quirk of
	 * its completer), so a server whose host vanished without a word would
	 * hang every worker for good. 7 tries of the transport timeout rdma_cm
	 * sets on RoCE (about 2 s) end a dead link in about 15 s; the error
	 * then takes the reconnect path. ack_timeout_ms shortens it, at the
	 * cost of giving up on a connection that merely stalled that long.
	 */
	rdmaps__cm_ack_timeout(k->id, k->c->ack_timeout_ms);
	p.retry_count = 6;
	p.rnr_retry_count = 7;
	if (rdma_connect(k->id, &p))
		return rdmaps__from_errno(errno);
	rc = rdmaps__cm_wait(k->ch, RDMA_CM_EVENT_ESTABLISHED, timeout, &ev, &reject_err);
	if (rc == RDMAPS_EREJECTED && reject_err)
		return reject_err; /* the server said why: auth, limit, version */
	if (rc)
		return rc;
	if (!ev->param.conn.private_data || ev->param.conn.private_data_len < sizeof(w)) {
		rdma_ack_cm_event(ev);
		return RDMAPS_EPROTO;
	}
	memcpy(&w, ev->param.conn.private_data, sizeof(w));
	rdma_ack_cm_event(ev);
	if (w.magic != RDMAPS_PROTO_MAGIC)
		return RDMAPS_EPROTO;
	if (w.version != RDMAPS_PROTO_VERSION)
		return RDMAPS_EVERSION;
	if (!w.slot_count || w.slot_count > RDMAPS_MAX_SLOTS || !w.chunk_elems || !w.instance ||
	    !w.conn_id || w.slot_size != RDMAPS_SLOT_HDR + w.chunk_elems * sizeof(float))
		return RDMAPS_EPROTO;
	if (k->ask_rank && w.server_id != k->idx)
		return RDMAPS_EPROTO; /* a server answering for another rank */
	k->instance = w.instance;
	k->replicas = w.replicas;
	k->conn_id = w.conn_id;
	k->restored_seq = w.restored_seq;
	k->staging_addr = w.staging_addr;
	k->staging_rkey = w.staging_rkey;
	k->slots = w.slot_count;
	k->slot_size = w.slot_size;
	k->chunk_elems = w.chunk_elems;
	return 0;
}

static int carve(struct cl_conn *k)
{
	size_t chunk = (size_t)k->chunk_elems * sizeof(float);
	size_t len = (k->slots + CL_READ_SLOTS) * chunk;
	int rc;

	k->data = aligned_alloc(4096, rdmaps__round_up(len, 4096));
	if (!k->data)
		return RDMAPS_ENOMEM;
	if ((rc = rdmaps__reg_mr(k->pd, k->data, len, IBV_ACCESS_LOCAL_WRITE, &k->data_mr)))
		return rc;
	for (uint32_t i = 0; i < CL_READ_SLOTS; i++) {
		k->rs[i].scratch = k->ctl + CTL_SCRATCH_OFF + (size_t)i * CTL_SCRATCH_STRIDE +
				   CL_SCRATCH_LEAD;
		k->rs[i].bounce = (float *)(k->data + (k->slots + i) * chunk);
		k->rs_free[i] = CL_READ_SLOTS - 1 - i;
	}
	k->nrs_free = CL_READ_SLOTS;
	cl_snap_reset(k);
	for (uint32_t w = 0; w < CL_WINDOWS; w++) {
		k->win[w].ix = (uint64_t *)(k->ctl + CTL_INDEX_OFF) + 2 * w * CL_INDEX_WORDS;
		k->win[w].ix2 = k->win[w].ix + CL_INDEX_WORDS;
		k->win[w].owner = 0;
		k->win[w].phase = IX_IDLE;
	}
	k->next_seq = 1;
	k->credit->folded_seq = 1;
	k->dropped_seen = 0; /* the new credit counts from 0 */
	return 0;
}

/* Free what one attempt built; the PD stays with the client. */
void cl_conn_release(struct cl_conn *k)
{
	if (k->qp && !k->broken)
		rdma_disconnect(k->id);
	if (k->qp)
		rdma_destroy_qp(k->id);
	if (k->cq)
		ibv_destroy_cq(k->cq); /* every event it raised was acknowledged */
	if (k->cc)
		ibv_destroy_comp_channel(k->cc);
	if (k->data_mr)
		ibv_dereg_mr(k->data_mr);
	if (k->ctl_mr)
		ibv_dereg_mr(k->ctl_mr);
	if (k->credit_mr)
		ibv_dereg_mr(k->credit_mr);
	if (k->id)
		rdma_destroy_id(k->id);
	if (k->ch)
		rdma_destroy_event_channel(k->ch);
	free(k->data);
	free(k->ctl);
	free(k->credit);
	cl_conn_forget(k);
}

/* k holds none of its resources (freed, or a copy's: look_around). */
void cl_conn_forget(struct cl_conn *k)
{
	k->qp = NULL;
	k->cq = NULL;
	k->cc = NULL;
	k->armed = false;
	k->data_mr = k->ctl_mr = k->credit_mr = NULL;
	k->id = NULL;
	k->ch = NULL;
	k->data = k->ctl = NULL;
	k->credit = NULL;
	k->pd = NULL; /* the PD is the client's: released ones no longer use it */
	k->stall_since = 0; /* a new connection starts with a clean watchdog */
}

int cl_conn_try(struct cl_conn *k, const struct rdmaps__server_addr *sa, const char *src,
		const char *token, int timeout)
{
	return cl_conn_attempt(k, sa, src, token, timeout, false);
}

/* One connect; an ask (look_around) stops once the server accepted,
 * before the staging buffers are made. */
int cl_conn_attempt(struct cl_conn *k, const struct rdmaps__server_addr *sa, const char *src,
		    const char *token, int timeout, bool ask)
{
	int rc = RDMAPS_EVERBS;

	k->ch = rdma_create_event_channel();
	if (!k->ch)
		return rc;
	/* events are waited for with poll(); reads must never block */
	fcntl(k->ch->fd, F_SETFL, fcntl(k->ch->fd, F_GETFL) | O_NONBLOCK);
	if (rdma_create_id(k->ch, &k->id, k, RDMA_PS_TCP))
		return rc;
	/*
	 * Resolution is capped per attempt: a healthy fabric answers in well
	 * under a second, and a request the kernel lost (seen with rxe when an
	 * ARP reply races the request) is better retried from scratch than
	 * waited for until the whole timeout is gone.
	 */
	if ((rc = resolve(k, sa, src, timeout < 1000 ? timeout : 1000))) {
		log_debug("server %s: resolving its address and route: %s", k->name, rdmaps_strerror(rc));
		return rc;
	}
	if ((rc = build(k)) || (rc = establish(k, token, timeout)) || (!ask && (rc = carve(k)))) {
		log_debug("server %s: connecting: %s", k->name, rdmaps_strerror(rc));
		return rc;
	}
	return 0;
}

/* Errors that mean "not up yet" and are worth another try. */
bool cl_retryable(int rc)
{
	return rc == RDMAPS_ECONNECT || rc == RDMAPS_EREJECTED || rc == RDMAPS_ETIMEDOUT ||
	       rc == RDMAPS_ENODEV;
}

int cl_conn_open(struct cl_conn *k, const struct rdmaps__server_addr *sa, const char *src,
		 const char *token, int timeout_ms)
{
	uint64_t deadline = rdmaps__now_ns() + (uint64_t)timeout_ms * 1000000u;
	long backoff_ms = 10;
	int rc;

	for (int attempt = 1;; attempt++) {
		uint64_t now = rdmaps__now_ns();
		int left = now < deadline ? (int)((deadline - now) / 1000000u) : 0;

		rc = cl_conn_try(k, sa, src, token, left > 0 ? left : 1);
		if (!rc)
			return 0;
		cl_conn_release(k);
		if (k->c->rescanned)
			cl_rescan_devices(k->c);
		now = rdmaps__now_ns();
		if (!cl_retryable(rc) || now + (uint64_t)backoff_ms * 1000000u >= deadline) {
			if (cl_retryable(rc))
				log_error("server %s not reachable after %d ms (%d attempts): %s", k->name,
					  timeout_ms, attempt, rdmaps_strerror(rc));
			else
				log_error("server %s: %s", k->name, rdmaps_strerror(rc));
			return rc == RDMAPS_EREJECTED || rc == RDMAPS_ETIMEDOUT ? RDMAPS_ECONNECT : rc;
		}
		log_debug("server %s: %s; retrying in %ld ms", k->name, rdmaps_strerror(rc), backoff_ms);
		struct timespec ts = { backoff_ms / 1000, (backoff_ms % 1000) * 1000000L };
		nanosleep(&ts, NULL);
		backoff_ms = backoff_ms * 2 > 1000 ? 1000 : backoff_ms * 2;
	}
}

static int connect_cfg(const struct rdmaps__config *cfg, const char *src, const char *token,
		       rdmaps_client **out)
{
	rdmaps_client *c;
	int rc = 0;

	if (!cfg->nservers) {
		log_error("no servers: set RDMAPS_SERVERS, `servers =` in the config file, or "
			  "rdmaps_cluster_opts.servers");
		return RDMAPS_EINVAL;
	}
	c = calloc(1, sizeof(*c));
	if (!c || !(c->conn = calloc(cfg->nservers, sizeof(*c->conn)))) {
		free(c);
		return RDMAPS_ENOMEM;
	}
	c->timeout_ms = cfg->timeout_ms;
	c->ack_timeout_ms = cfg->ack_timeout_ms;
	c->spin_ns = cfg->spin_us < 0 ? -1 : (int64_t)cfg->spin_us * 1000;
	c->snap_after = (uint32_t)cfg->snapshot_after;
	for (uint32_t i = 0; i < CL_MAX_OPS; i++)
		c->ops[i].c = c;
	for (uint32_t i = 0; i < cfg->nservers; i++) {
		struct rdmaps__server_addr sa = cfg->servers[i];
		struct cl_conn *k = &c->conn[i];
		if (!sa.port[0])
			snprintf(sa.port, sizeof(sa.port), "%s", cfg->port);
		k->c = c;
		k->idx = i;
		k->sa = sa;
		snprintf(k->src, sizeof(k->src), "%s", src ? src : "");
		snprintf(k->token, sizeof(k->token), "%s", token ? token : "");
		snprintf(k->name, sizeof(k->name), "%s:%s", sa.host, sa.port);
		c->nconn = i + 1;
		if ((rc = cl_conn_open(k, &sa, src, token, cfg->timeout_ms)))
			break;
		/* placement counts chunks: every server must cut them alike */
		if (k->chunk_elems != c->conn[0].chunk_elems) {
			log_error("server %s uses %u floats per chunk, server %s %u: start every "
				  "server with the same --chunk-elems",
				  k->name, k->chunk_elems, c->conn[0].name, c->conn[0].chunk_elems);
			rc = RDMAPS_EPROTO;
			break;
		}
	}
	if (rc) {
		rdmaps_close(c);
		return rc;
	}
	*out = c;
	return 0;
}

int rdmaps_connect_cluster(const struct rdmaps_cluster_opts *o, rdmaps_client **out)
{
	struct rdmaps__config cfg;
	char err[256], src[RDMAPS_ADDR_MAX];
	int rc;

	if (!out)
		return RDMAPS_EINVAL;
	*out = NULL;
	if ((rc = rdmaps__config_load(&cfg, o ? o->config : NULL, err, sizeof(err)))) {
		log_error("cluster description: %s", err);
		return rc;
	}
	if (o && o->servers && (rc = rdmaps__config_set_servers(&cfg, o->servers, err, sizeof(err)))) {
		log_error("servers: %s", err);
		return rc;
	}
	if (o && o->src_addr)
		snprintf(cfg.src, sizeof(cfg.src), "%s", o->src_addr);
	if (o && o->token)
		snprintf(cfg.token, sizeof(cfg.token), "%s", o->token);
	if (o && o->timeout_ms > 0)
		cfg.timeout_ms = o->timeout_ms;
	if ((rc = rdmaps__config_local_addr(&cfg, src, sizeof(src), err, sizeof(err)))) {
		log_error("local address: %s", err);
		return rc;
	}
	return connect_cfg(&cfg, src, cfg.token, out);
}

int rdmaps_connect(const struct rdmaps_connect_opts *o, rdmaps_client **out)
{
	struct rdmaps__config cfg = { .nservers = 1, .gid_index = -1, .spin_us = RDMAPS__SPIN_US,
				      .snapshot_after = RDMAPS__SNAPSHOT_AFTER };
	const char *spin = getenv("RDMAPS_SPIN_US"), *snap = getenv("RDMAPS_SNAPSHOT_AFTER");
	char err[128] = "";

	if (!o || !o->host || !out)
		return RDMAPS_EINVAL;
	*out = NULL;
	/* the settings of the process's environment a single connection takes
	 * too: how its waits treat the CPU, and its READs' bound (docs/cluster.md) */
	if (spin && rdmaps__config_set(&cfg, "spin_us", spin, err, sizeof(err))) {
		log_error("RDMAPS_SPIN_US=%s: %s", spin, err[0] ? err : "bad value");
		return RDMAPS_EINVAL;
	}
	if (snap && rdmaps__config_set(&cfg, "snapshot_after", snap, err, sizeof(err))) {
		log_error("RDMAPS_SNAPSHOT_AFTER=%s: %s", snap, err[0] ? err : "bad value");
		return RDMAPS_EINVAL;
	}
	if (strlen(o->host) >= sizeof(cfg.servers[0].host) ||
	    (o->token && strlen(o->token) > RDMAPS_TOKEN_MAX))
		return RDMAPS_EINVAL;
	snprintf(cfg.servers[0].host, sizeof(cfg.servers[0].host), "%s", o->host);
	snprintf(cfg.port, sizeof(cfg.port), "%s", o->port ? o->port : RDMAPS_DEFAULT_PORT);
	cfg.timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : 5000;
	return connect_cfg(&cfg, o->src_addr, o->token, out);
}

void rdmaps_close(rdmaps_client *c)
{
	if (!c)
		return;
	for (rdmaps_tensor *t = c->tensors; t; t = t->next)
		cl_wire_free(t); /* its registration first, with the rest */
	while (c->mrs)
		rdmaps_deregister(c->mrs);
	while (c->tensors) {
		rdmaps_tensor *t = c->tensors;
		c->tensors = t->next;
		free(t);
	}
	for (uint32_t i = 0; i < c->nconn; i++)
		cl_conn_release(&c->conn[i]);
	for (uint32_t i = 0; i < c->npd; i++)
		if (c->pds[i])
			ibv_dealloc_pd(c->pds[i]);
	free(c->conn);
	free(c);
}

int rdmaps_register(rdmaps_client *c, void *buf, size_t len, rdmaps_mr **out)
{
	rdmaps_mr *m;
	int rc = 0;

	if (!c || !buf || !len || !out)
		return RDMAPS_EINVAL;
	m = calloc(1, sizeof(*m));
	if (!m)
		return RDMAPS_ENOMEM;
	m->c = c;
	m->addr = buf;
	m->len = len;
	/* on every device in use; a device that comes later gets it then
	 * (pd_for), one removed has it dropped (cl_pd_drop) */
	for (uint32_t i = 0; i < c->npd && !rc; i++)
		if (c->pds[i])
			rc = rdmaps__reg_mr(c->pds[i], buf, len, IBV_ACCESS_LOCAL_WRITE, &m->mr[i]);
	if (rc) {
		for (uint32_t i = 0; i < c->npd; i++)
			if (m->mr[i])
				ibv_dereg_mr(m->mr[i]);
		free(m);
		return rc;
	}
	m->next = c->mrs;
	if (c->mrs)
		c->mrs->prev = m;
	c->mrs = m;
	*out = m;
	return 0;
}

void rdmaps_deregister(rdmaps_mr *m)
{
	if (!m)
		return;
	if (m->prev)
		m->prev->next = m->next;
	else
		m->c->mrs = m->next;
	if (m->next)
		m->next->prev = m->prev;
	for (uint32_t i = 0; i < RDMAPS_MAX_SERVERS; i++)
		if (m->mr[i])
			ibv_dereg_mr(m->mr[i]);
	free(m);
}

void rdmaps_client_stats(const rdmaps_client *c, struct rdmaps_client_stats *out)
{
	*out = c->stats;
}

uint32_t rdmaps_num_servers(const rdmaps_client *c)
{
	return c ? c->nconn : 0;
}

int rdmaps_launch_info(int *rank, int *size)
{
	struct rdmaps__config cfg;
	char err[256];
	/* launcher and RDMAPS_* variables only: an unset config file is fine */
	int rc = rdmaps__config_load(&cfg, "", err, sizeof(err));

	if (rc)
		log_error("%s", err);
	if (rank)
		*rank = cfg.rank;
	if (size)
		*size = cfg.size;
	return rc;
}

uint64_t rdmaps_tensor_length(const rdmaps_tensor *t)
{
	return t ? t->length : 0;
}

uint64_t rdmaps_tensor_server_elems(const rdmaps_tensor *t, uint32_t server)
{
	uint64_t n = 0;

	for (uint32_t p = 0; t && p < t->nparts; p++) {
		const struct cl_part *pt = &t->part[p];
		if (pt->conn != server)
			continue;
		for (uint32_t i = 0; i < pt->nchunks; i++)
			n += rdmaps__chunk_count(t->length, t->chunk_elems, pt->first + i);
	}
	return n;
}
