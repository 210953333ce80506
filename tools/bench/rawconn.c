/*
 * rawconn.c -- connection set-up of the raw-verbs baseline, both sides, and
 * its small control exchange. Mirrors client/connect.c and server/listener.c
 * on purpose: the baseline must differ from rdmaps only in what it posts.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>

#include "chunk.h"
#include "raw.h"

#define RAW_TIMEOUT_MS 20000

static int cm_expect(struct rdma_event_channel *ch, enum rdma_cm_event_type want,
		     struct rdma_cm_event **ev)
{
	int rc = rdmaps__cm_wait(ch, want, RAW_TIMEOUT_MS, ev, NULL);

	if (rc)
		fprintf(stderr, "rdmaps-bench: raw: waiting for %s: %s\n", rdma_event_str(want),
			rdmaps_strerror(rc));
	return rc;
}

static unsigned rd_atom(struct ibv_context *v, bool initiator)
{
	struct ibv_device_attr da;
	unsigned d = 16; /* what librdmaps asks for and rdmaps-server grants */

	if (!ibv_query_device(v, &da)) {
		unsigned m = (unsigned)(initiator ? da.max_qp_init_rd_atom : da.max_qp_rd_atom);
		if (m < d)
			d = m;
	}
	return d;
}

static int alloc_mem(struct raw_qp *q, size_t len, int access)
{
	q->mem_len = rdmaps__round_up(len, 4096);
	q->mem = aligned_alloc(4096, q->mem_len);
	if (!q->mem)
		return RDMAPS_ENOMEM;
	memset(q->mem, 0, q->mem_len);
	return rdmaps__reg_mr(q->pd, q->mem, q->mem_len, access, &q->mr);
}

static int make_qp(struct raw_qp *q, unsigned recvs)
{
	struct ibv_qp_init_attr qa = { 0 };

	q->cq = ibv_create_cq(q->id->verbs, (int)(RAW_SQ_DEPTH + recvs), q, q->cc, 0);
	if (!q->cq)
		return RDMAPS_EVERBS;
	qa.send_cq = qa.recv_cq = q->cq;
	qa.qp_type = IBV_QPT_RC;
	qa.cap.max_send_wr = RAW_SQ_DEPTH;
	qa.cap.max_recv_wr = recvs;
	/* as librdmaps: a chunk header and its floats per chunk a READ spans */
	qa.cap.max_send_sge = 2 * rdmaps__read_span(q->id->verbs);
	qa.cap.max_recv_sge = 1;
	if (rdma_create_qp(q->id, q->pd, &qa)) {
		fprintf(stderr, "rdmaps-bench: raw: rdma_create_qp: %s\n", strerror(errno));
		return RDMAPS_EVERBS;
	}
	q->qp = q->id->qp;
	for (unsigned i = 0; i < recvs; i++)
		if (raw_post_recv(q, q->rbuf, q->max_size))
			return RDMAPS_EVERBS;
	return 0;
}

int raw_post_recv(struct raw_qp *q, uint8_t *at, size_t len)
{
	struct ibv_sge sge = { .addr = (uintptr_t)at, .length = (uint32_t)len, .lkey = q->mr->lkey };
	struct ibv_recv_wr wr = { .wr_id = 0, .sg_list = &sge, .num_sge = 1 }, *bad;

	return ibv_post_recv(q->qp, &wr, &bad);
}

int raw_post_sge(struct raw_qp *q, enum ibv_wr_opcode op, uint64_t wr_id, struct ibv_sge *sge,
		 int nsge, uint32_t imm_host)
{
	struct ibv_send_wr wr = {
		.wr_id = wr_id,
		.sg_list = sge,
		.num_sge = nsge,
		.opcode = op,
		.send_flags = IBV_SEND_SIGNALED,
		.imm_data = htonl(imm_host),
		.wr.rdma = { .remote_addr = q->raddr, .rkey = q->rkey },
	}, *bad;
	int rc = ibv_post_send(q->qp, &wr, &bad);

	if (!rc)
		q->sq_busy++;
	return rc;
}

int raw_post(struct raw_qp *q, enum ibv_wr_opcode op, uint64_t wr_id, const void *local,
	     size_t len, uint32_t imm_host)
{
	struct ibv_sge sge = { .addr = (uintptr_t)local, .length = (uint32_t)len,
			       .lkey = q->mr->lkey };

	return raw_post_sge(q, op, wr_id, &sge, 1, imm_host);
}

int raw_client_connect(const char *host, const char *port, const char *src, size_t max_size,
		       struct raw_qp **out)
{
	struct rdma_addrinfo hints = { .ai_port_space = RDMA_PS_TCP }, *dst = NULL, *sa = NULL;
	struct rdma_addrinfo sh = { .ai_flags = RAI_PASSIVE, .ai_port_space = RDMA_PS_TCP };
	struct rdma_conn_param p = { 0 };
	struct raw_hello h = { .magic = RAW_MAGIC };
	struct raw_welcome w;
	struct rdma_cm_event *ev;
	struct raw_qp *q = calloc(1, sizeof(*q));
	int rc = RDMAPS_EVERBS;

	if (!q)
		return RDMAPS_ENOMEM;
	/* slack: a chunk's READ and a staging slot's WRITE carry 64-128 B more */
	q->max_size = rdmaps__round_up(max_size, 64) + RAW_SLACK;
	q->ch = rdma_create_event_channel();
	if (!q->ch)
		goto fail;
	fcntl(q->ch->fd, F_SETFL, fcntl(q->ch->fd, F_GETFL) | O_NONBLOCK);
	if (rdma_create_id(q->ch, &q->id, q, RDMA_PS_TCP))
		goto fail;
	rc = RDMAPS_ECONNECT;
	if (rdma_getaddrinfo(host, port, &hints, &dst) ||
	    (src && rdma_getaddrinfo(src, NULL, &sh, &sa))) {
		fprintf(stderr, "rdmaps-bench: raw: cannot resolve %s / %s\n", host, src ? src : "-");
		goto fail;
	}
	if (rdma_resolve_addr(q->id, sa ? sa->ai_src_addr : NULL, dst->ai_dst_addr, 5000) ||
	    cm_expect(q->ch, RDMA_CM_EVENT_ADDR_RESOLVED, &ev))
		goto fail;
	rdma_ack_cm_event(ev);
	if (rdma_resolve_route(q->id, 5000) || cm_expect(q->ch, RDMA_CM_EVENT_ROUTE_RESOLVED, &ev))
		goto fail;
	rdma_ack_cm_event(ev);
	rc = RDMAPS_EVERBS;
	q->pd = ibv_alloc_pd(q->id->verbs);
	if (!q->pd)
		goto fail;
	if ((rc = alloc_mem(q, 2 * q->max_size + RAW_CTL_BYTES,
			    IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE)))
		goto fail;
	q->buf = q->mem;
	q->rbuf = q->mem + q->max_size;
	q->ctl = q->mem + 2 * q->max_size;
	if ((rc = make_qp(q, RAW_CLIENT_RECVS)))
		goto fail;
	h.max_size = q->max_size;
	h.recv_addr = (uintptr_t)q->rbuf;
	h.recv_rkey = q->mr->rkey;
	p.private_data = &h;
	p.private_data_len = sizeof(h);
	p.initiator_depth = (uint8_t)rd_atom(q->id->verbs, true);
	p.responder_resources = 0;
	p.retry_count = 7;
	p.rnr_retry_count = 7;
	q->initiator_depth = p.initiator_depth;
	rc = RDMAPS_ECONNECT;
	if (rdma_connect(q->id, &p) || cm_expect(q->ch, RDMA_CM_EVENT_ESTABLISHED, &ev))
		goto fail;
	if (!ev->param.conn.private_data || ev->param.conn.private_data_len < sizeof(w)) {
		rdma_ack_cm_event(ev);
		rc = RDMAPS_EPROTO;
		goto fail;
	}
	memcpy(&w, ev->param.conn.private_data, sizeof(w));
	rdma_ack_cm_event(ev);
	if (w.magic != RAW_MAGIC) {
		rc = RDMAPS_EPROTO;
		goto fail;
	}
	q->raddr = w.addr;
	q->rkey = w.rkey;
	raw_after_established(q);
	rdma_freeaddrinfo(dst);
	if (sa)
		rdma_freeaddrinfo(sa);
	*out = q;
	return 0;
fail:
	if (dst)
		rdma_freeaddrinfo(dst);
	if (sa)
		rdma_freeaddrinfo(sa);
	raw_qp_free(q);
	return rc;
}

int raw_accept(struct rdma_cm_id *id, const void *pdata, uint8_t plen, struct raw_qp **out)
{
	struct raw_hello h;
	struct raw_welcome w = { .magic = RAW_MAGIC };
	struct rdma_conn_param p = { 0 };
	struct raw_qp *q;
	int rc = RDMAPS_EVERBS;

	if (!pdata || plen < sizeof(h))
		return RDMAPS_EPROTO;
	memcpy(&h, pdata, sizeof(h));
	if (h.magic != RAW_MAGIC || h.max_size > (1ull << 31))
		return RDMAPS_EPROTO;
	q = calloc(1, sizeof(*q));
	if (!q)
		return RDMAPS_ENOMEM;
	q->id = id;
	q->max_size = h.max_size < RAW_SLACK ? RAW_SLACK : h.max_size;
	q->raddr = h.recv_addr;
	q->rkey = h.recv_rkey;
	q->pd = ibv_alloc_pd(id->verbs);
	q->cc = ibv_create_comp_channel(id->verbs);
	if (!q->pd || !q->cc)
		goto fail;
	fcntl(q->cc->fd, F_SETFL, fcntl(q->cc->fd, F_GETFL) | O_NONBLOCK);
	if ((rc = alloc_mem(q, q->max_size + RAW_CTL_BYTES,
			    IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ |
				    IBV_ACCESS_REMOTE_WRITE)))
		goto fail;
	q->buf = q->rbuf = q->mem;
	q->ctl = q->mem + q->max_size;
	if ((rc = make_qp(q, RAW_RESP_RECVS)))
		goto fail;
	w.addr = (uintptr_t)q->buf;
	w.rkey = q->mr->rkey;
	p.private_data = &w;
	p.private_data_len = sizeof(w);
	p.responder_resources = (uint8_t)rd_atom(id->verbs, false);
	p.initiator_depth = 0;
	p.rnr_retry_count = 7;
	if (rdma_accept(id, &p)) {
		fprintf(stderr, "rdmaps-bench: raw: rdma_accept: %s\n", strerror(errno));
		rc = RDMAPS_EVERBS;
		goto fail;
	}
	*out = q;
	return 0;
fail:
	raw_qp_free(q);
	return rc;
}

void raw_qp_free(struct raw_qp *q)
{
	if (!q)
		return;
	if (q->qp) {
		rdma_disconnect(q->id); /* an error when never connected: harmless */
		rdma_destroy_qp(q->id);
	}
	if (q->cq)
		ibv_destroy_cq(q->cq);
	if (q->cc)
		ibv_destroy_comp_channel(q->cc);
	if (q->mr)
		ibv_dereg_mr(q->mr);
	if (q->pd)
		ibv_dealloc_pd(q->pd);
	if (q->id && q->ch) /* client side: we own id and channel */
		rdma_destroy_id(q->id);
	if (q->ch)
		rdma_destroy_event_channel(q->ch);
	free(q->mem);
	free(q);
}

/*
 * rdma_cm leaves the responder's min_rnr_timer at 0, which the verbs encode
 * as 655.36 ms: one RNR NAK (a WRITE-with-immediate meeting an empty
 * receive queue, which rxe reports now and then) would stall the requester
 * that long. 12 = 0.64 ms, as docs and notes advise. RTS->RTS may set it.
 */
void raw_after_established(struct raw_qp *q)
{
	struct ibv_qp_attr a = { .min_rnr_timer = 12 };

	if (ibv_modify_qp(q->qp, &a, IBV_QP_MIN_RNR_TIMER))
		fprintf(stderr, "rdmaps-bench: raw: cannot set min_rnr_timer: %s\n", strerror(errno));
}

int raw_set_mode(struct raw_qp *q, enum raw_mode mode, uint64_t size)
{
	struct raw_ctl *c = (struct raw_ctl *)q->ctl;
	uint64_t deadline = rdmaps__now_ns() + (uint64_t)RAW_TIMEOUT_MS * 1000000u;
	bool acked = false;
	struct ibv_wc wc[8];

	*c = (struct raw_ctl){ .magic = RAW_MAGIC, .mode = mode, .size = size };
	if (raw_post(q, IBV_WR_SEND_WITH_IMM, 0, c, sizeof(*c), RAW_IMM_CTL))
		return RDMAPS_EVERBS;
	while (!acked || q->sq_busy) {
		int n = ibv_poll_cq(q->cq, 8, wc);
		for (int i = 0; i < n; i++) {
			if (wc[i].status != IBV_WC_SUCCESS) {
				fprintf(stderr, "rdmaps-bench: raw: control: %s\n",
					ibv_wc_status_str(wc[i].status));
				return RDMAPS_EVERBS;
			}
			if (!(wc[i].opcode & IBV_WC_RECV)) {
				q->sq_busy--;
				continue;
			}
			if ((wc[i].wc_flags & IBV_WC_WITH_IMM) && ntohl(wc[i].imm_data) == RAW_IMM_ACK)
				acked = true;
			if (raw_post_recv(q, q->rbuf, q->max_size))
				return RDMAPS_EVERBS;
		}
		if (n < 0 || rdmaps__now_ns() > deadline) {
			fprintf(stderr, "rdmaps-bench: raw: the responder did not answer\n");
			return RDMAPS_ETIMEDOUT;
		}
	}
	/* the responder restarted its counters; so do we (the ack's bytes
	 * landed at the start of the receive area) */
	__atomic_store_n((uint64_t *)q->rbuf, 0, __ATOMIC_RELEASE);
	q->credit_seen = 0;
	return 0;
}
