/*
 * peer.c -- the connector's side of a primary's backups (replica.h): one
 * thread connects each backup (rdma_cm, blocking, retried every half
 * second) and hands it to its fold thread, watches the connection for its
 * close, and takes a failed one back to tear it down.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "error.h"
#include "log.h"
#include "replica.h"


void srv_peer_teardown(struct srv_peer *p)
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

int srv_peer_post_recv(struct srv_peer *p)
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
	if ((rc = srv_peer_post_recv(p)))
		return rc;

	h.magic = RDMAPS_PROTO_MAGIC;
	h.version = RDMAPS_PROTO_VERSION;
	h.token_len = s->cfg.peer_token_len;
	memcpy(h.token, s->cfg.peer_token, s->cfg.peer_token_len);
	h.credit_addr = (uintptr_t)p->credit;
	h.credit_rkey = p->credit_mr->rkey;
	h.flags = RDMAPS_HELLO_REPLICA;
	h.rank = (uint16_t)p->part; /* whose part it is to hold */
	cp.private_data = &h;
	cp.private_data_len = sizeof(h);
	cp.retry_count = 6; /* as a worker: 7 is "forever" on rxe */
	/* a backup cut off holds the credits that wait for it until its
	 * writes give up: the cluster's ack_timeout_ms, as for workers */
	rdmaps__cm_ack_timeout(p->id, s->cfg.ack_timeout_ms);
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
			atomic_store_explicit(&p->lost, true, memory_order_release);
			srv_fold_wake(p->r->ft);
		}
	}
}

void *srv_peer_connector(void *arg)
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
					srv_peer_teardown(p);
					atomic_store_explicit(&p->state, PEER_DOWN, memory_order_release);
					st = PEER_DOWN;
				}
				if (st == PEER_UP)
					peer_watch(p);
				if (st != PEER_DOWN || now - p->last_try < PEER_RETRY_NS)
					continue;
				/* our rank held elsewhere: what we have of our part
				 * is nobody's copy to keep */
				if (p->part == s->cfg.server_id && atomic_load(&s->deposed))
					continue;
				if (!peer_part_ours(p))
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
					srv_peer_teardown(p);
					continue;
				}
				log_info("backup rank %u connected, for rank %u's part", p->rank, p->part);
				p->failing = 0;
				atomic_store(&p->lost, false);
				atomic_store_explicit(&p->state, PEER_READY, memory_order_release);
				srv_fold_wake(&s->ft[f]);
			}
		}
		usleep(50000);
	}
	return NULL;
}
