/*
 * connect.c -- rdmaps_connect / rdmaps_close and the registered regions a
 * client carves its buffers from. Shaped like rdma-core's rdma_client.c:
 * resolve, build, connect, and one goto ladder that unwinds in reverse.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"
#include "error.h"
#include "log.h"

#define CTL_SEND_OFF 0u
#define CTL_RECV_OFF RDMAPS_MSG_MAX

static size_t ctl_hdr_off(void)
{
	return (size_t)CTL_RECV_OFF + (size_t)CL_RECVS * RDMAPS_MSG_MAX;
}

uint8_t *cl_send_buf(rdmaps_client *c)
{
	return c->ctl + CTL_SEND_OFF;
}

uint8_t *cl_recv_buf(rdmaps_client *c, uint32_t i)
{
	return c->ctl + CTL_RECV_OFF + (size_t)i * RDMAPS_MSG_MAX;
}

int cl_post_recv(rdmaps_client *c, uint32_t i)
{
	struct ibv_sge sge = { .addr = (uintptr_t)cl_recv_buf(c, i), .length = RDMAPS_MSG_MAX,
			       .lkey = c->ctl_mr->lkey };
	struct ibv_recv_wr wr = { .wr_id = WR_ID(WR_RECV, i), .sg_list = &sge, .num_sge = 1 }, *bad;
	int rc = ibv_post_recv(c->qp, &wr, &bad);

	return rc ? rdmaps__from_errno(rc) : 0;
}

void cl_fail(rdmaps_client *c, int err, const char *why)
{
	if (c->broken)
		return;
	c->broken = err;
	log_warn("connection to server lost: %s", why);
	/* error state flushes every outstanding request, so waits end */
	if (c->qp) {
		struct ibv_qp_attr a = { .qp_state = IBV_QPS_ERR };
		ibv_modify_qp(c->qp, &a, IBV_QP_STATE);
	}
}

void cl_check_cm(rdmaps_client *c)
{
	struct rdma_cm_event *ev;
	uint64_t now = rdmaps__now_ns();

	/* a syscall, so at most every millisecond, and only while waiting */
	if (now - c->last_cm_check < 1000000u)
		return;
	c->last_cm_check = now;
	if (rdma_get_cm_event(c->ch, &ev))
		return; /* EAGAIN: nothing happened */
	if (ev->event == RDMA_CM_EVENT_DISCONNECTED || ev->event == RDMA_CM_EVENT_DEVICE_REMOVAL)
		cl_fail(c, RDMAPS_EDISCONNECTED, rdma_event_str(ev->event));
	rdma_ack_cm_event(ev);
}

static int resolve(rdmaps_client *c, const struct rdmaps_connect_opts *o, int timeout)
{
	struct rdma_addrinfo hints = { .ai_port_space = RDMA_PS_TCP }, *dst = NULL, *src = NULL;
	struct rdma_cm_event *ev;
	int rc;

	if (rdma_getaddrinfo(o->host, o->port ? o->port : RDMAPS_DEFAULT_PORT, &hints, &dst)) {
		log_error("cannot resolve server %s", o->host);
		return RDMAPS_ECONNECT;
	}
	if (o->src_addr) {
		struct rdma_addrinfo sh = { .ai_flags = RAI_PASSIVE, .ai_port_space = RDMA_PS_TCP };
		if (rdma_getaddrinfo(o->src_addr, NULL, &sh, &src)) {
			log_error("cannot resolve local address %s", o->src_addr);
			rdma_freeaddrinfo(dst);
			return RDMAPS_ENODEV;
		}
	}
	rc = rdma_resolve_addr(c->id, src ? src->ai_src_addr : NULL, dst->ai_dst_addr, timeout);
	rdma_freeaddrinfo(dst);
	if (src)
		rdma_freeaddrinfo(src);
	if (rc)
		return rdmaps__from_errno(errno);
	if ((rc = rdmaps__cm_wait(c->ch, RDMA_CM_EVENT_ADDR_RESOLVED, timeout, &ev, NULL)))
		return rc == RDMAPS_ECONNECT ? RDMAPS_ENODEV : rc;
	rdma_ack_cm_event(ev);
	if (rdma_resolve_route(c->id, timeout))
		return rdmaps__from_errno(errno);
	if ((rc = rdmaps__cm_wait(c->ch, RDMA_CM_EVENT_ROUTE_RESOLVED, timeout, &ev, NULL)))
		return rc;
	rdma_ack_cm_event(ev);
	return 0;
}

static int build(rdmaps_client *c)
{
	struct ibv_qp_init_attr qa = { 0 };
	size_t ctl_len = ctl_hdr_off() + (size_t)256 * RDMAPS_SLOT_HDR + CL_READ_SLOTS * CL_SCRATCH;
	int rc;

	c->pd = ibv_alloc_pd(c->id->verbs);
	if (!c->pd)
		return RDMAPS_EVERBS;
	c->credit = aligned_alloc(4096, 4096);
	c->ctl = aligned_alloc(4096, rdmaps__round_up(ctl_len, 4096));
	if (!c->credit || !c->ctl)
		return RDMAPS_ENOMEM;
	memset(c->credit, 0, 4096);
	memset(c->ctl, 0, ctl_len);
	/* the credit page is the only remotely writable memory of a worker */
	if ((rc = rdmaps__reg_mr(c->pd, c->credit, sizeof(*c->credit),
				 IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE, &c->credit_mr)))
		return rc;
	if ((rc = rdmaps__reg_mr(c->pd, c->ctl, ctl_len, IBV_ACCESS_LOCAL_WRITE, &c->ctl_mr)))
		return rc;
	c->cq = ibv_create_cq(c->id->verbs, (int)(CL_SQ_DEPTH + CL_RECVS), c, NULL, 0);
	if (!c->cq)
		return RDMAPS_EVERBS;
	qa.send_cq = qa.recv_cq = c->cq;
	qa.qp_type = IBV_QPT_RC;
	qa.cap.max_send_wr = CL_SQ_DEPTH;
	qa.cap.max_recv_wr = CL_RECVS;
	qa.cap.max_send_sge = 3; /* chunk header | data | trailer */
	qa.cap.max_recv_sge = 1;
	if (rdma_create_qp(c->id, c->pd, &qa)) {
		log_error("rdma_create_qp: %s", strerror(errno));
		return rdmaps__from_errno(errno);
	}
	c->qp = c->id->qp;
	for (uint32_t i = 0; i < CL_RECVS; i++)
		if ((rc = cl_post_recv(c, i)))
			return rc;
	return 0;
}

static int establish(rdmaps_client *c, const struct rdmaps_connect_opts *o, int timeout)
{
	struct rdmaps_wire_hello h = { 0 };
	struct rdmaps_wire_welcome w;
	struct rdma_conn_param p = { 0 };
	struct ibv_device_attr da;
	struct rdma_cm_event *ev;
	int rc, reject_err = 0;
	size_t tlen = o->token ? strlen(o->token) : 0;

	if (tlen > RDMAPS_TOKEN_MAX)
		return RDMAPS_EINVAL;
	h.magic = RDMAPS_PROTO_MAGIC;
	h.version = RDMAPS_PROTO_VERSION;
	h.token_len = (uint16_t)tlen;
	memcpy(h.token, o->token ? o->token : "", tlen);
	h.credit_addr = (uintptr_t)c->credit;
	h.credit_rkey = c->credit_mr->rkey;
	p.private_data = &h;
	p.private_data_len = sizeof(h);
	p.initiator_depth = 16;
	if (!ibv_query_device(c->id->verbs, &da) && da.max_qp_init_rd_atom < 16)
		p.initiator_depth = (uint8_t)da.max_qp_init_rd_atom;
	p.responder_resources = 0; /* nobody READs from a worker */
	p.retry_count = 7;
	p.rnr_retry_count = 7;
	if (rdma_connect(c->id, &p))
		return rdmaps__from_errno(errno);
	rc = rdmaps__cm_wait(c->ch, RDMA_CM_EVENT_ESTABLISHED, timeout, &ev, &reject_err);
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
	if (!w.slot_count || w.slot_count > 256 || !w.chunk_elems ||
	    w.slot_size != RDMAPS_SLOT_HDR + w.chunk_elems * sizeof(float))
		return RDMAPS_EPROTO;
	c->staging_addr = w.staging_addr;
	c->staging_rkey = w.staging_rkey;
	c->slots = w.slot_count;
	c->slot_size = w.slot_size;
	c->chunk_elems = w.chunk_elems;
	return 0;
}

static int carve(rdmaps_client *c)
{
	size_t chunk = (size_t)c->chunk_elems * sizeof(float);
	size_t len = (c->slots + CL_READ_SLOTS) * chunk;
	uint8_t *scratch = c->ctl + ctl_hdr_off() + (size_t)256 * RDMAPS_SLOT_HDR;
	int rc;

	c->data = aligned_alloc(4096, rdmaps__round_up(len, 4096));
	if (!c->data)
		return RDMAPS_ENOMEM;
	if ((rc = rdmaps__reg_mr(c->pd, c->data, len, IBV_ACCESS_LOCAL_WRITE, &c->data_mr)))
		return rc;
	for (uint32_t i = 0; i < CL_READ_SLOTS; i++) {
		c->rs[i].scratch = scratch + (size_t)i * CL_SCRATCH;
		c->rs[i].bounce = (float *)(c->data + (c->slots + i) * chunk);
		c->rs_free[i] = CL_READ_SLOTS - 1 - i;
	}
	c->nrs_free = CL_READ_SLOTS;
	for (uint32_t i = 0; i < CL_MAX_OPS; i++)
		c->ops[i].c = c;
	c->next_seq = 1;
	c->credit->folded_seq = 1;
	return 0;
}

int rdmaps_connect(const struct rdmaps_connect_opts *o, rdmaps_client **out)
{
	rdmaps_client *c;
	int timeout, rc;

	if (!o || !o->host || !out)
		return RDMAPS_EINVAL;
	timeout = o->timeout_ms > 0 ? o->timeout_ms : 5000;
	c = calloc(1, sizeof(*c));
	if (!c)
		return RDMAPS_ENOMEM;
	c->timeout_ms = timeout;
	rc = RDMAPS_EVERBS;
	c->ch = rdma_create_event_channel();
	if (!c->ch)
		goto fail;
	/* events are waited for with poll(); reads must never block */
	fcntl(c->ch->fd, F_SETFL, fcntl(c->ch->fd, F_GETFL) | O_NONBLOCK);
	if (rdma_create_id(c->ch, &c->id, c, RDMA_PS_TCP))
		goto fail;
	if ((rc = resolve(c, o, timeout)))
		goto fail;
	if ((rc = build(c)))
		goto fail;
	if ((rc = establish(c, o, timeout)))
		goto fail;
	if ((rc = carve(c)))
		goto fail;
	*out = c;
	return 0;
fail:
	log_debug("connect to %s failed: %s", o->host, rdmaps_strerror(rc));
	rdmaps_close(c);
	return rc;
}

void rdmaps_close(rdmaps_client *c)
{
	if (!c)
		return;
	if (c->qp && !c->broken)
		rdma_disconnect(c->id);
	while (c->mrs)
		rdmaps_deregister(c->mrs);
	while (c->tensors) {
		rdmaps_tensor *t = c->tensors;
		c->tensors = t->next;
		free(t);
	}
	if (c->qp)
		rdma_destroy_qp(c->id);
	if (c->cq)
		ibv_destroy_cq(c->cq);
	if (c->data_mr)
		ibv_dereg_mr(c->data_mr);
	if (c->ctl_mr)
		ibv_dereg_mr(c->ctl_mr);
	if (c->credit_mr)
		ibv_dereg_mr(c->credit_mr);
	if (c->pd)
		ibv_dealloc_pd(c->pd);
	if (c->id)
		rdma_destroy_id(c->id);
	if (c->ch)
		rdma_destroy_event_channel(c->ch);
	free(c->data);
	free(c->ctl);
	free(c->credit);
	free(c);
}

int rdmaps_register(rdmaps_client *c, void *buf, size_t len, rdmaps_mr **out)
{
	rdmaps_mr *m;
	int rc;

	if (!c || !buf || !len || !out)
		return RDMAPS_EINVAL;
	m = calloc(1, sizeof(*m));
	if (!m)
		return RDMAPS_ENOMEM;
	if ((rc = rdmaps__reg_mr(c->pd, buf, len, IBV_ACCESS_LOCAL_WRITE, &m->mr))) {
		free(m);
		return rc;
	}
	m->c = c;
	m->addr = buf;
	m->len = len;
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
	ibv_dereg_mr(m->mr);
	free(m);
}

void rdmaps_client_stats(const rdmaps_client *c, struct rdmaps_client_stats *out)
{
	*out = c->stats;
}

uint64_t rdmaps_tensor_length(const rdmaps_tensor *t)
{
	return t ? t->length : 0;
}
