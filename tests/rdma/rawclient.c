#include "rawclient.h"

#include <arpa/inet.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "harness.h"
#include "verbs.h"

struct rdmaps_wire_hello raw_hello(const char *token)
{
	struct rdmaps_wire_hello h = { .magic = RDMAPS_PROTO_MAGIC, .version = RDMAPS_PROTO_VERSION };
	size_t n = token ? strlen(token) : 0;

	h.token_len = (uint16_t)n;
	memcpy(h.token, token ? token : "", n);
	return h;
}

static int post_recv(struct raw *r, unsigned i)
{
	struct ibv_sge sge = { .addr = (uintptr_t)(r->buf + RAW_RECV_OFF + i * RDMAPS_MSG_MAX),
			       .length = RDMAPS_MSG_MAX, .lkey = r->mr->lkey };
	struct ibv_recv_wr wr = { .wr_id = 100 + i, .sg_list = &sge, .num_sge = 1 }, *bad;
	return ibv_post_recv(r->id->qp, &wr, &bad);
}

int raw_connect(struct raw *r, const char *addr, const char *port,
		const struct rdmaps_wire_hello *h, size_t hello_len)
{
	struct rdma_addrinfo hints = { .ai_port_space = RDMA_PS_TCP }, *dst, *src;
	struct rdma_addrinfo sh = { .ai_flags = RAI_PASSIVE, .ai_port_space = RDMA_PS_TCP };
	struct ibv_qp_init_attr qa = { 0 };
	struct rdma_conn_param p = { 0 };
	struct rdma_cm_event *ev;
	int rc, rej = 0;

	memset(r, 0, sizeof(*r));
	r->ch = rdma_create_event_channel();
	if (!r->ch || rdma_create_id(r->ch, &r->id, r, RDMA_PS_TCP))
		return RDMAPS_EVERBS;
	if (rdma_getaddrinfo(addr, port, &hints, &dst) || rdma_getaddrinfo(addr, NULL, &sh, &src))
		return RDMAPS_ECONNECT;
	rc = rdma_resolve_addr(r->id, src->ai_src_addr, dst->ai_dst_addr, 5000);
	rdma_freeaddrinfo(dst);
	rdma_freeaddrinfo(src);
	if (rc || rdmaps__cm_wait(r->ch, RDMA_CM_EVENT_ADDR_RESOLVED, 10000, &ev, NULL))
		return RDMAPS_ECONNECT;
	rdma_ack_cm_event(ev);
	if (rdma_resolve_route(r->id, 5000) ||
	    rdmaps__cm_wait(r->ch, RDMA_CM_EVENT_ROUTE_RESOLVED, 10000, &ev, NULL))
		return RDMAPS_ECONNECT;
	rdma_ack_cm_event(ev);
	r->pd = ibv_alloc_pd(r->id->verbs);
	r->buf = aligned_alloc(4096, RAW_BUF);
	memset(r->buf, 0, RAW_BUF);
	r->mr = ibv_reg_mr(r->pd, r->buf, RAW_BUF, IBV_ACCESS_LOCAL_WRITE);
	r->credit = aligned_alloc(4096, 4096);
	memset(r->credit, 0, 4096);
	r->credit_mr = ibv_reg_mr(r->pd, r->credit, 16, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
	r->cq = ibv_create_cq(r->id->verbs, 64, NULL, NULL, 0);
	qa.send_cq = qa.recv_cq = r->cq;
	qa.qp_type = IBV_QPT_RC;
	qa.cap.max_send_wr = 16;
	qa.cap.max_recv_wr = 4;
	qa.cap.max_send_sge = 1;
	qa.cap.max_recv_sge = 1;
	if (!r->pd || !r->mr || !r->credit_mr || !r->cq || rdma_create_qp(r->id, r->pd, &qa))
		return RDMAPS_EVERBS;
	for (unsigned i = 0; i < 4; i++)
		post_recv(r, i);
	/* hand over our credit word unless the test forged one */
	struct rdmaps_wire_hello hc = *h;
	if (!hc.credit_addr && !hc.credit_rkey) {
		hc.credit_addr = (uintptr_t)r->credit;
		hc.credit_rkey = r->credit_mr->rkey;
	}
	p.private_data = &hc;
	p.private_data_len = (uint8_t)hello_len;
	p.initiator_depth = 1;
	p.retry_count = 7;
	p.rnr_retry_count = 7;
	if (rdma_connect(r->id, &p))
		return RDMAPS_ECONNECT;
	rc = rdmaps__cm_wait(r->ch, RDMA_CM_EVENT_ESTABLISHED, 20000, &ev, &rej);
	if (rc)
		return rej ? rej : rc;
	memcpy(&r->w, ev->param.conn.private_data, sizeof(r->w));
	rdma_ack_cm_event(ev);
	return 0;
}

void raw_close(struct raw *r)
{
	if (r->id && r->id->qp) {
		rdma_disconnect(r->id);
		rdma_destroy_qp(r->id);
	}
	if (r->cq)
		ibv_destroy_cq(r->cq);
	if (r->mr)
		ibv_dereg_mr(r->mr);
	if (r->credit_mr)
		ibv_dereg_mr(r->credit_mr);
	free(r->credit);
	if (r->pd)
		ibv_dealloc_pd(r->pd);
	if (r->id)
		rdma_destroy_id(r->id);
	if (r->ch)
		rdma_destroy_event_channel(r->ch);
	free(r->buf);
	memset(r, 0, sizeof(*r));
}

/* Wait for the completion of wr_id (others are remembered as received). */
static int wait_wc(struct raw *r, uint64_t wr_id, int timeout_ms, struct ibv_wc *out)
{
	uint64_t end = rdmaps__now_ns() + (uint64_t)timeout_ms * 1000000u;
	struct ibv_wc wc;

	/* a reply may complete before the send that asked for it is polled */
	if (wr_id == 100 && r->nearly) {
		*out = r->early[0];
		memmove(r->early, r->early + 1, (size_t)--r->nearly * sizeof(wc));
		return 0;
	}
	while (rdmaps__now_ns() < end) {
		int n = ibv_poll_cq(r->cq, 1, &wc);
		if (n < 0)
			return -1;
		if (n == 0)
			continue;
		if (wc.wr_id == wr_id || (wr_id == 100 && wc.wr_id >= 100) ||
		    wc.status != IBV_WC_SUCCESS) {
			*out = wc;
			return 0;
		}
		if (wc.wr_id >= 100 && r->nearly < 8)
			r->early[r->nearly++] = wc;
	}
	return -1;
}

int raw_send(struct raw *r, const void *msg, size_t len)
{
	struct ibv_sge sge = { .addr = (uintptr_t)(r->buf + RAW_SEND_OFF), .length = (uint32_t)len,
			       .lkey = r->mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 1, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND,
				  .send_flags = IBV_SEND_SIGNALED }, *bad;
	struct ibv_wc wc;

	memcpy(r->buf + RAW_SEND_OFF, msg, len);
	if (ibv_post_send(r->id->qp, &wr, &bad) || wait_wc(r, 1, 20000, &wc))
		return -1;
	return wc.status;
}

int raw_recv(struct raw *r, void *out, size_t max, int timeout_ms)
{
	struct ibv_wc wc;

	if (wait_wc(r, 100, timeout_ms, &wc) || wc.status != IBV_WC_SUCCESS || wc.wr_id < 100)
		return -1;
	memcpy(out, r->buf + RAW_RECV_OFF + (wc.wr_id - 100) * RDMAPS_MSG_MAX,
	       wc.byte_len < max ? wc.byte_len : max);
	post_recv(r, (unsigned)(wc.wr_id - 100));
	return (int)wc.byte_len;
}

int raw_post(struct raw *r, uint64_t wr_id, enum ibv_wr_opcode op, uint32_t off, uint64_t raddr,
	     uint32_t rkey, uint32_t len, uint32_t imm_host)
{
	struct ibv_sge sge = { .addr = (uintptr_t)(r->buf + off), .length = len, .lkey = r->mr->lkey };
	struct ibv_send_wr wr = { .wr_id = wr_id, .sg_list = &sge, .num_sge = 1, .opcode = op,
				  .send_flags = IBV_SEND_SIGNALED, .imm_data = htonl(imm_host),
				  .wr.rdma = { .remote_addr = raddr, .rkey = rkey } }, *bad;

	return ibv_post_send(r->id->qp, &wr, &bad);
}

int raw_wait(struct raw *r, uint64_t wr_id)
{
	struct ibv_wc wc;

	if (wait_wc(r, wr_id, 30000, &wc))
		return -1;
	return wc.status;
}

int raw_rdma(struct raw *r, enum ibv_wr_opcode op, uint64_t raddr, uint32_t rkey, uint32_t len,
	     uint32_t imm_host)
{
	if (raw_post(r, 2, op, RAW_DATA_OFF, raddr, rkey, len, imm_host))
		return -1;
	return raw_wait(r, 2);
}

int raw_atomic(struct raw *r, uint64_t raddr, uint32_t rkey)
{
	struct ibv_sge sge = { .addr = (uintptr_t)(r->buf + RAW_DATA_OFF), .length = 8,
			       .lkey = r->mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 3, .sg_list = &sge, .num_sge = 1,
				  .opcode = IBV_WR_ATOMIC_FETCH_AND_ADD,
				  .send_flags = IBV_SEND_SIGNALED,
				  .wr.atomic = { .remote_addr = raddr, .compare_add = 1, .rkey = rkey } },
			  *bad;

	if (ibv_post_send(r->id->qp, &wr, &bad))
		return -1;
	return raw_wait(r, 3);
}

struct rdmaps_msg_declare raw_declare_msg(const char *name, uint64_t length)
{
	struct rdmaps_msg_declare m = { 0 };

	rdmaps__msg_init(&m.hdr, RDMAPS_MSG_DECLARE, sizeof(m), 42);
	m.length = length;
	m.hyper.lr = 1.0f;
	snprintf(m.optimizer, sizeof(m.optimizer), "sgd");
	snprintf(m.name, sizeof(m.name), "%s", name);
	return m;
}

int raw_request(struct raw *r, const void *msg, size_t len, struct rdmaps_msg_tensor_reply *rep)
{
	uint8_t in[RDMAPS_MSG_MAX];
	int n;

	if (raw_send(r, msg, len) != IBV_WC_SUCCESS)
		return RDMAPS_EVERBS;
	n = raw_recv(r, in, sizeof(in), 20000);
	if (n == (int)sizeof(*rep)) {
		memcpy(rep, in, sizeof(*rep));
		return rep->status;
	}
	if (n == (int)sizeof(struct rdmaps_msg_status_reply)) {
		struct rdmaps_msg_status_reply s;
		memcpy(&s, in, sizeof(s));
		return s.status;
	}
	return RDMAPS_EPROTO;
}

int raw_declare(struct raw *r, const char *name, uint64_t length, struct rdmaps_msg_tensor_reply *rep)
{
	struct rdmaps_msg_declare m = raw_declare_msg(name, length);

	return raw_request(r, &m, sizeof(m), rep);
}

int raw_lookup(struct raw *r, const char *name, struct rdmaps_msg_tensor_reply *rep)
{
	struct rdmaps_msg_lookup m = { 0 };

	rdmaps__msg_init(&m.hdr, RDMAPS_MSG_LOOKUP, sizeof(m), 43);
	snprintf(m.name, sizeof(m.name), "%s", name);
	return raw_request(r, &m, sizeof(m), rep);
}

int raw_slot(struct raw *r, uint32_t tensor, uint64_t seq, uint32_t chunk, uint32_t count,
	     float value, uint16_t extra_flags)
{
	struct rdmaps_slot_hdr h = { .seq = (uint32_t)seq, .tensor_id = (uint16_t)tensor,
				     .chunk = chunk, .count = count,
				     .flags = RDMAPS_SLOT_LAST | RDMAPS_SLOT_END | extra_flags,
				     .scale = 1.0f };
	uint32_t slot = (uint32_t)((seq - 1) % r->w.slot_count);
	float *p = (float *)(r->buf + RAW_DATA_OFF + RDMAPS_SLOT_HDR);

	memcpy(r->buf + RAW_DATA_OFF, &h, sizeof(h));
	for (uint32_t i = 0; i < count; i++)
		p[i] = value;
	return raw_rdma(r, IBV_WR_RDMA_WRITE_WITH_IMM, r->w.staging_addr + (uint64_t)slot * r->w.slot_size,
			r->w.staging_rkey, RDMAPS_SLOT_HDR + count * 4, rdmaps__imm_make(slot, seq));
}
