/*
 * connect.c -- connecting to one server or a cluster, closing, and the
 * registered regions a connection carves its buffers from. Shaped like
 * rdma-core's rdma_client.c: resolve, build, connect, and one goto ladder
 * that unwinds in reverse.
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

/*
 * A worker waiting for something only the server can send (a push's credit,
 * a control reply) has nothing of its own on the wire, so a server host that
 * vanished without a word -- power lost, link down -- would leave it waiting
 * forever. Once a second of such waiting, a zero-length RDMA WRITE to its
 * staging ring (it touches no memory and wakes nobody on the server) asks
 * the transport whether the peer is still there; if it is not, the write
 * fails after the retries and the connection takes the failure path.
 */
static void probe(struct cl_conn *k, uint64_t now)
{
	struct ibv_send_wr wr = { .wr_id = WR_ID(WR_PROBE, k->idx, 0), .opcode = IBV_WR_RDMA_WRITE,
				  .send_flags = IBV_SEND_SIGNALED };
	struct ibv_send_wr *bad;

	if (k->broken || !k->qp || k->sq_outstanding || now - k->last_probe < CL_PROBE_NS)
		return;
	wr.wr.rdma.remote_addr = k->staging_addr;
	wr.wr.rdma.rkey = k->staging_rkey;
	k->last_probe = now;
	if (ibv_post_send(k->qp, &wr, &bad))
		cl_fail(k, RDMAPS_EVERBS, "cannot post a liveness probe");
	else
		k->sq_outstanding++;
}

static void cm_events(struct cl_conn *k);
static void look_around(struct cl_conn *k, uint64_t now);

void cl_check_cm(struct cl_conn *k)
{
	uint64_t now = rdmaps__now_ns();

	/* a syscall, so at most every millisecond, and only while waiting */
	if (now - k->last_cm_check < 1000000u)
		return;
	k->last_cm_check = now;
	probe(k, now);
	look_around(k, now);
	/*
	 * Watchdog: requests in flight and not one completion for the whole
	 * timeout. The transport reports a dead peer within seconds (6 retries),
	 * so this only fires when it does not -- seen with rxe after a link
	 * flap: a queue pair left in RTS that never retransmits. Failing the
	 * connection flushes the requests and takes the reconnect path,
	 * instead of a caller blocked for good.
	 */
	if (!k->sq_outstanding || k->cqes != k->stall_cqes || !k->stall_since) {
		k->stall_cqes = k->cqes;
		k->stall_since = now;
	} else if (!k->broken && now - k->stall_since > (uint64_t)k->c->timeout_ms * 1000000u) {
		log_warn("server %s: %u requests without a completion for %d ms", k->name,
			 k->sq_outstanding, k->c->timeout_ms);
		cl_fail(k, RDMAPS_ETIMEDOUT, "requests stalled");
	}
	cm_events(k);
}

/* The CM's news for an established connection: each of these ends it. */
static void cm_events(struct cl_conn *k)
{
	struct rdma_cm_event *ev;

	if (!k->ch || rdma_get_cm_event(k->ch, &ev))
		return; /* EAGAIN: nothing happened */
	log_debug("server %s: %s", k->name, rdma_event_str(ev->event));
	/* on an established id, each of these ends it: the peer said goodbye,
	 * the CM found it unreachable, the device or the address went away */
	switch (ev->event) {
	case RDMA_CM_EVENT_DEVICE_REMOVAL:
		k->dev_gone = true; /* cl_reconnect lets go of the device */
		/* fall through */
	case RDMA_CM_EVENT_DISCONNECTED:
	case RDMA_CM_EVENT_UNREACHABLE:
	case RDMA_CM_EVENT_CONNECT_ERROR:
	case RDMA_CM_EVENT_ADDR_CHANGE:
		cl_fail(k, RDMAPS_EDISCONNECTED, rdma_event_str(ev->event));
		break;
	default:
		break;
	}
	rdma_ack_cm_event(ev);
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
static void rescan_devices(rdmaps_client *c)
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
static void pd_drop(rdmaps_client *c, uint32_t i)
{
	if (!c->pds[i])
		return; /* dropped already, by another connection through it */
	for (uint32_t j = 0; j < c->nconn; j++)
		if (c->conn[j].pd == c->pds[i])
			return; /* the last connection through it will */
	regs_drop(c, i);
	ibv_dealloc_pd(c->pds[i]);
	c->pds[i] = NULL;
	rescan_devices(c);
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

static void conn_forget(struct cl_conn *k);

/* Free what one attempt built; the PD stays with the client. */
static void conn_release(struct cl_conn *k)
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
	conn_forget(k);
}

/* k holds none of its resources (freed, or a copy's: look_around). */
static void conn_forget(struct cl_conn *k)
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

static int conn_attempt(struct cl_conn *k, const struct rdmaps__server_addr *sa, const char *src,
			const char *token, int timeout, bool ask);

static int conn_try(struct cl_conn *k, const struct rdmaps__server_addr *sa, const char *src,
		    const char *token, int timeout)
{
	return conn_attempt(k, sa, src, token, timeout, false);
}

/*
 * A primary killed outright may tell its workers only a second or more
 * later (seen with rxe: the kernel ends a dead process's connections after
 * tearing down its queue pairs and memory), while a backup takes the rank
 * over well before (server/authority.c, beats). So a worker whose requests
 * to a replicated rank have made no progress (no completion, no credit)
 * for CL_QUIET_NS asks the other servers of the rank's replica set, one
 * every CL_LOOK_NS, whether they serve it: a connect asking for the rank,
 * on a scratch connection closed at once. One that accepts has taken the
 * rank over, so the old primary's claim is over and it folds nothing more:
 * this connection is failed, and the reconnect (RESUME) goes there. A
 * refusal costs that server one rejected connect; a long wait that is
 * merely slow (a BSP round) costs one every CL_LOOK_NS, and every
 * CL_LOOK_SLOW_NS once it has lasted CL_QUIET_LONG_NS.
 */
#define CL_QUIET_NS 250000000ull
#define CL_LOOK_NS 100000000ull
#define CL_QUIET_LONG_NS 3000000000ull
#define CL_LOOK_SLOW_NS 1000000000ull
static void look_around(struct cl_conn *k, uint64_t now)
{
	rdmaps_client *c = k->c;
	uint32_t R = k->replicas < c->nconn ? k->replicas : c->nconn;
	uint64_t folded = cl_folded_seq(k);

	if (R < 2 || k->broken || !k->qp)
		return;
	if (!(k->sq_outstanding || k->next_seq > folded) || k->cqes != k->quiet_cqes ||
	    folded != k->quiet_seq || !k->quiet_since) {
		k->quiet_cqes = k->cqes;
		k->quiet_seq = folded;
		k->quiet_since = now;
		return;
	}
	uint64_t quiet = now - k->quiet_since;
	if (quiet < CL_QUIET_NS ||
	    now - k->last_look < (quiet < CL_QUIET_LONG_NS ? CL_LOOK_NS : CL_LOOK_SLOW_NS))
		return;
	k->last_look = now;
	uint32_t j = (k->served_by + 1 + k->look_next++ % (R - 1)) % R;
	const struct cl_conn *at = &c->conn[(k->idx + j) % c->nconn];
	/* a scratch connection: k's own stays as it is */
	struct cl_conn *t = malloc(sizeof(*t));
	if (!t)
		return;
	*t = *k;
	conn_forget(t);
	t->broken = 0;
	t->ask_rank = true;
	int rc = conn_attempt(t, &at->sa, k->src, k->token, 200, true);
	conn_release(t);
	free(t);
	log_debug("rank %u (%s): quiet for %.0f ms; asked %s:%s: %s", k->idx, k->name, quiet / 1e6,
		  at->sa.host, at->sa.port, rc ? rdmaps_strerror(rc) : "it serves the rank");
	if (rc)
		return;
	log_warn("rank %u (%s): no progress for %.0f ms, and %s:%s serves the rank now: "
		 "reconnecting there", k->idx, k->name, quiet / 1e6, at->sa.host, at->sa.port);
	cl_fail(k, RDMAPS_EDISCONNECTED, "its rank was taken over");
}

/* One connect; an ask (look_around) stops once the server accepted,
 * before the staging buffers are made. */
static int conn_attempt(struct cl_conn *k, const struct rdmaps__server_addr *sa, const char *src,
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
static bool retryable(int rc)
{
	return rc == RDMAPS_ECONNECT || rc == RDMAPS_EREJECTED || rc == RDMAPS_ETIMEDOUT ||
	       rc == RDMAPS_ENODEV;
}

static int conn_open(struct cl_conn *k, const struct rdmaps__server_addr *sa, const char *src,
		     const char *token, int timeout_ms)
{
	uint64_t deadline = rdmaps__now_ns() + (uint64_t)timeout_ms * 1000000u;
	long backoff_ms = 10;
	int rc;

	for (int attempt = 1;; attempt++) {
		uint64_t now = rdmaps__now_ns();
		int left = now < deadline ? (int)((deadline - now) / 1000000u) : 0;

		rc = conn_try(k, sa, src, token, left > 0 ? left : 1);
		if (!rc)
			return 0;
		conn_release(k);
		if (k->c->rescanned)
			rescan_devices(k->c);
		now = rdmaps__now_ns();
		if (!retryable(rc) || now + (uint64_t)backoff_ms * 1000000u >= deadline) {
			if (retryable(rc))
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

/*
 * Reconnect k to its rank: its own server first, then, with replicas R,
 * the R - 1 after it in the list, which may have taken the rank over when
 * its server died (docs/durability.md, "Failover"); the one that served
 * last is tried last: it just failed, and a host cut off costs a
 * resolve's time (2 s) where a live server that does not serve the rank
 * refuses at once (RDMAPS_ENOENT). The round goes on, with back-off,
 * until one takes it or timeout_ms has passed.
 */
static int conn_reopen(struct cl_conn *k, int timeout_ms)
{
	rdmaps_client *c = k->c;
	uint32_t R = k->replicas > 1 ? k->replicas : 1;
	uint64_t deadline = rdmaps__now_ns() + (uint64_t)timeout_ms * 1000000u;
	long backoff_ms = 10;
	int rc = RDMAPS_ECONNECT;

	if (R > c->nconn)
		R = c->nconn;
	if (R == 1)
		return conn_open(k, &k->sa, k->src, k->token, timeout_ms);
	for (;;) {
		for (uint32_t n = 0; n < R; n++) {
			uint32_t j = (k->served_by + 1 + n) % R;
			const struct cl_conn *at = &c->conn[(k->idx + j) % c->nconn];
			uint64_t now = rdmaps__now_ns();
			int left = now < deadline ? (int)((deadline - now) / 1000000u) : 1;
			k->ask_rank = j != 0;
			/* a dead host costs a resolve's time, not the whole timeout */
			rc = conn_try(k, &at->sa, k->src, k->token, left < 2000 ? left : 2000);
			if (!rc) {
				if (j != k->served_by)
					log_warn("rank %u (%s): now served by %s:%s", k->idx, k->name,
						 at->sa.host, at->sa.port);
				k->served_by = j;
				return 0;
			}
			conn_release(k);
			if (k->c->rescanned)
				rescan_devices(k->c);
			if (!retryable(rc) && rc != RDMAPS_ENOENT && rc != RDMAPS_EPROTO)
				return rc;
		}
		if (rdmaps__now_ns() + (uint64_t)backoff_ms * 1000000u >= deadline) {
			log_error("rank %u (%s): none of its %u servers took it within %d ms: %s", k->idx,
				  k->name, R, timeout_ms, rdmaps_strerror(rc));
			return RDMAPS_ECONNECT;
		}
		struct timespec ts = { backoff_ms / 1000, (backoff_ms % 1000) * 1000000L };
		nanosleep(&ts, NULL);
		/* a backup takes the rank over within about STEAL_NS of the
		 * primary's death (server/authority.c): look often enough that
		 * the worker is not what the failover waits for */
		backoff_ms = backoff_ms * 2 > 50 ? 50 : backoff_ms * 2;
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
		if ((rc = conn_open(k, &sa, src, token, cfg->timeout_ms)))
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

/*
 * Waits up to timeout_ms for the port the old connection used to be active.
 * Why before releasing it: destroying a connected id makes the kernel send
 * a disconnect request, and rxe (kernel 6.1) puts its management QP in error
 * for good when such a message is sent while the link is down -- after which
 * the host can make no rdma_cm connection at all until the device is
 * re-created. No new connection can be made over a down port anyway.
 */
static int wait_port(struct cl_conn *k, int timeout_ms)
{
	uint64_t deadline = rdmaps__now_ns() + (uint64_t)timeout_ms * 1000000u;
	struct ibv_port_attr pa;
	bool said = false;

	if (!k->id || !k->id->verbs || !k->id->port_num)
		return 0;
	for (;;) {
		if (ibv_query_port(k->id->verbs, k->id->port_num, &pa))
			return 0; /* cannot tell: let the connection attempt decide */
		if (pa.state == IBV_PORT_ACTIVE)
			return 0;
		if (!said)
			log_warn("server %s: port %u of %s is %s; waiting for it before reconnecting",
				 k->name, k->id->port_num, ibv_get_device_name(k->id->verbs->device),
				 ibv_port_state_str(pa.state));
		said = true;
		if (rdmaps__now_ns() > deadline)
			return RDMAPS_ECONNECT;
		struct timespec ts = { 0, 50 * 1000000L };
		nanosleep(&ts, NULL);
	}
}

int cl_reconnect(rdmaps_client *c)
{
	int rc = 0;

	if (!c->broken)
		return 0;
	/* every op using a broken connection has ended (its requests flushed) */
	for (uint32_t j = 0; j < CL_MAX_OPS; j++)
		if (c->ops[j].kind != OP_FREE && c->ops[j].inflight)
			return RDMAPS_EBUSY;
	/*
	 * A removed device first, on every connection through it (each has its
	 * own DEVICE_REMOVAL to read): the kernel cannot finish the removal,
	 * and so the device cannot come back, until all of them let go.
	 */
	for (uint32_t i = 0; i < c->nconn; i++)
		cm_events(&c->conn[i]);
	for (uint32_t i = 0; i < c->nconn; i++) {
		struct cl_conn *k = &c->conn[i];
		if (!k->dev_gone)
			continue;
		conn_release(k);
		k->dev_gone = false;
		pd_drop(c, k->pd_idx);
	}
	for (uint32_t i = 0; i < c->nconn && !rc; i++) {
		struct cl_conn *k = &c->conn[i];
		if (!k->broken)
			continue;
		if ((rc = wait_port(k, c->timeout_ms))) {
			log_error("server %s not reachable: the local port stayed down for %d ms",
				  k->name, c->timeout_ms);
			break;
		}
		uint64_t was = k->instance;
		uint32_t was_at = k->served_by;
		conn_release(k);
		k->broken = 0;
		k->push_owner = 0;
		k->reply_ready = false;
		k->sq_outstanding = 0;
		if ((rc = conn_reopen(k, c->timeout_ms))) {
			k->broken = rc;
			break;
		}
		/* first the tensors (ids may have changed), then what the broken
		 * connection folded: pushes waiting for it post again on the new one */
		if ((rc = cl_refresh_parts(c, k)) || (rc = cl_resume(c, k, k->instance != was))) {
			cl_fail(k, rc, "cannot find its tensors again");
			break;
		}
		c->stats.reconnects++;
		if (k->served_by != was_at) {
			/* another server, with the part as its replica had it: every
			 * push its primary acknowledged folded is in it */
			c->stats.failovers++;
		} else if (k->instance != was) {
			/* folds after its last checkpoint are gone, unless the
			 * checkpoint still had this connection's account (a clean
			 * stop): cl_resume told the caller what was lost */
			c->stats.server_restarts++;
			if (k->restored_seq)
				log_warn("server %s restarted from its checkpoint %llu: folds after "
					 "that checkpoint are not in the model (this worker's lost "
					 "pushes, if any, are in lost_pushes)",
					 k->name, (unsigned long long)k->restored_seq);
			else
				log_warn("server %s restarted without a checkpoint", k->name);
		}
		log_info("reconnected to server %s", k->name);
	}
	if (!rc)
		c->broken = 0;
	return rc;
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
		conn_release(&c->conn[i]);
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
	 * (pd_for), one removed has it dropped (pd_drop) */
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
