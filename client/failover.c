/*
 * failover.c -- a worker finding its rank's server again: noticing, while
 * it waits, that a connection is gone (liveness probe, watchdog, the CM's
 * news, and asking the rank's other servers when its own is silent), then
 * reconnecting to its own server or the replica that took the rank over,
 * where RESUME settles what the broken connection left (resume.c). Making
 * and tearing down a connection is connect.c's.
 */
#include <stdlib.h>
#include <time.h>

#include "client.h"
#include "log.h"

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
	cl_conn_forget(t);
	t->broken = 0;
	t->ask_rank = true;
	int rc = cl_conn_attempt(t, &at->sa, k->src, k->token, 200, true);
	cl_conn_release(t);
	free(t);
	log_debug("rank %u (%s): quiet for %.0f ms; asked %s:%s: %s", k->idx, k->name, quiet / 1e6,
		  at->sa.host, at->sa.port, rc ? rdmaps_strerror(rc) : "it serves the rank");
	if (rc)
		return;
	log_warn("rank %u (%s): no progress for %.0f ms, and %s:%s serves the rank now: "
		 "reconnecting there", k->idx, k->name, quiet / 1e6, at->sa.host, at->sa.port);
	cl_fail(k, RDMAPS_EDISCONNECTED, "its rank was taken over");
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
		return cl_conn_open(k, &k->sa, k->src, k->token, timeout_ms);
	for (;;) {
		for (uint32_t n = 0; n < R; n++) {
			uint32_t j = (k->served_by + 1 + n) % R;
			const struct cl_conn *at = &c->conn[(k->idx + j) % c->nconn];
			uint64_t now = rdmaps__now_ns();
			int left = now < deadline ? (int)((deadline - now) / 1000000u) : 1;
			k->ask_rank = j != 0;
			/* a dead host costs a resolve's time, not the whole timeout */
			rc = cl_conn_try(k, &at->sa, k->src, k->token, left < 2000 ? left : 2000);
			if (!rc) {
				if (j != k->served_by)
					log_warn("rank %u (%s): now served by %s:%s", k->idx, k->name,
						 at->sa.host, at->sa.port);
				k->served_by = j;
				return 0;
			}
			cl_conn_release(k);
			if (k->c->rescanned)
				cl_rescan_devices(k->c);
			if (!cl_retryable(rc) && rc != RDMAPS_ENOENT && rc != RDMAPS_EPROTO)
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
		cl_conn_release(k);
		k->dev_gone = false;
		cl_pd_drop(c, k->pd_idx);
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
		cl_conn_release(k);
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
