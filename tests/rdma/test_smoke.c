/*
 * Verbs smoke test: is the RDMA stack under us sound? Two threads, an RC
 * connection through librdmacm, one RDMA WRITE and one RDMA READ, checked
 * byte for byte. Independent of rdmaps' own code.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include "harness.h"
#include "verbs.h"

#define LEN 8192

struct side {
	struct rdma_event_channel *ch;
	struct rdma_cm_id *id, *listen;
	struct ibv_pd *pd;
	struct ibv_cq *cq;
	struct ibv_mr *mr;
	uint8_t *buf;
};

static struct side srv_side;
static char port[16];
static pthread_barrier_t done;

static void setup_qp(struct side *s, struct rdma_cm_id *id, int access)
{
	struct ibv_qp_init_attr qa = { .qp_type = IBV_QPT_RC,
				       .cap = { .max_send_wr = 4, .max_recv_wr = 4,
						.max_send_sge = 1, .max_recv_sge = 1 } };
	s->pd = ibv_alloc_pd(id->verbs);
	cr_assert_not_null(s->pd, "ibv_alloc_pd");
	s->buf = aligned_alloc(4096, LEN);
	s->mr = ibv_reg_mr(s->pd, s->buf, LEN, access);
	cr_assert_not_null(s->mr, "ibv_reg_mr (check RLIMIT_MEMLOCK)");
	s->cq = ibv_create_cq(id->verbs, 8, NULL, NULL, 0);
	cr_assert_not_null(s->cq);
	qa.send_cq = qa.recv_cq = s->cq;
	cr_assert_eq(rdma_create_qp(id, s->pd, &qa), 0, "rdma_create_qp");
}

/* Undo setup_qp and the ids, as a real program would. */
static void side_free(struct side *s)
{
	if (s->id && s->id->qp)
		rdma_destroy_qp(s->id);
	if (s->cq)
		ibv_destroy_cq(s->cq);
	if (s->mr)
		ibv_dereg_mr(s->mr);
	if (s->pd)
		ibv_dealloc_pd(s->pd);
	free(s->buf);
	if (s->id)
		rdma_destroy_id(s->id);
	if (s->listen)
		rdma_destroy_id(s->listen);
	if (s->ch)
		rdma_destroy_event_channel(s->ch);
}

static void *server_thread(void *arg)
{
	struct side *s = &srv_side;
	struct rdma_cm_event *ev;
	struct rdma_conn_param p = { .responder_resources = 1 };
	uint64_t info[2];
	(void)arg;

	cr_assert_eq(rdmaps__cm_wait(s->ch, RDMA_CM_EVENT_CONNECT_REQUEST, 20000, &ev, NULL), 0);
	s->id = ev->id;
	rdma_ack_cm_event(ev);
	setup_qp(s, s->id, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE);
	for (int i = 0; i < LEN; i++)
		s->buf[i] = (uint8_t)(i * 7 + 3);
	info[0] = (uintptr_t)s->buf;
	info[1] = s->mr->rkey;
	p.private_data = info;
	p.private_data_len = sizeof(info);
	cr_assert_eq(rdma_accept(s->id, &p), 0);
	cr_assert_eq(rdmaps__cm_wait(s->ch, RDMA_CM_EVENT_ESTABLISHED, 20000, &ev, NULL), 0);
	rdma_ack_cm_event(ev);
	pthread_barrier_wait(&done); /* client did its READ and WRITE */
	return NULL;
}

static int one_op(struct side *c, enum ibv_wr_opcode op, uint32_t off, uint64_t raddr, uint32_t rkey)
{
	struct ibv_sge sge = { .addr = (uintptr_t)c->buf + off, .length = LEN / 2, .lkey = c->mr->lkey };
	struct ibv_send_wr wr = { .sg_list = &sge, .num_sge = 1, .opcode = op,
				  .send_flags = IBV_SEND_SIGNALED,
				  .wr.rdma = { .remote_addr = raddr, .rkey = rkey } }, *bad;
	struct ibv_wc wc;
	uint64_t end = rdmaps__now_ns() + 20000000000ull;

	cr_assert_eq(ibv_post_send(c->id->qp, &wr, &bad), 0);
	while (ibv_poll_cq(c->cq, 1, &wc) == 0)
		cr_assert_lt(rdmaps__now_ns(), end, "completion timed out");
	return wc.status;
}

Test(smoke, rc_read_and_write_byte_exact, .timeout = 120)
{
	const char *addr = th_addr();
	struct rdma_addrinfo hints = { .ai_flags = RAI_PASSIVE, .ai_port_space = RDMA_PS_TCP }, *res;
	struct rdma_addrinfo ch = { .ai_port_space = RDMA_PS_TCP }, *dst;
	struct side cl = { 0 };
	struct rdma_cm_event *ev;
	struct rdma_conn_param p = { .initiator_depth = 1, .retry_count = 7 };
	pthread_t t;
	uint64_t info[2];

	snprintf(port, sizeof(port), "%d", 19000 + getpid() % 1000);
	srv_side.ch = rdma_create_event_channel();
	cr_assert_eq(rdma_create_id(srv_side.ch, &srv_side.listen, NULL, RDMA_PS_TCP), 0);
	cr_assert_eq(rdma_getaddrinfo(addr, port, &hints, &res), 0);
	cr_assert_eq(rdma_bind_addr(srv_side.listen, res->ai_src_addr), 0, "bind %s", addr);
	rdma_freeaddrinfo(res);
	cr_assert_eq(rdma_listen(srv_side.listen, 1), 0);
	cr_assert_not_null(srv_side.listen->verbs, "no RDMA device has address %s", addr);
	printf("smoke: device %s, address %s\n",
	       ibv_get_device_name(srv_side.listen->verbs->device), addr);
	pthread_barrier_init(&done, NULL, 2);
	pthread_create(&t, NULL, server_thread, NULL);

	cl.ch = rdma_create_event_channel();
	cr_assert_eq(rdma_create_id(cl.ch, &cl.id, NULL, RDMA_PS_TCP), 0);
	cr_assert_eq(rdma_getaddrinfo(addr, port, &ch, &dst), 0);
	cr_assert_eq(rdma_getaddrinfo(addr, NULL, &hints, &res), 0);
	cr_assert_eq(rdma_resolve_addr(cl.id, res->ai_src_addr, dst->ai_dst_addr, 5000), 0);
	rdma_freeaddrinfo(res);
	rdma_freeaddrinfo(dst);
	cr_assert_eq(rdmaps__cm_wait(cl.ch, RDMA_CM_EVENT_ADDR_RESOLVED, 10000, &ev, NULL), 0);
	rdma_ack_cm_event(ev);
	cr_assert_eq(rdma_resolve_route(cl.id, 5000), 0);
	cr_assert_eq(rdmaps__cm_wait(cl.ch, RDMA_CM_EVENT_ROUTE_RESOLVED, 10000, &ev, NULL), 0);
	rdma_ack_cm_event(ev);
	setup_qp(&cl, cl.id, IBV_ACCESS_LOCAL_WRITE);
	cr_assert_eq(rdma_connect(cl.id, &p), 0);
	cr_assert_eq(rdmaps__cm_wait(cl.ch, RDMA_CM_EVENT_ESTABLISHED, 20000, &ev, NULL), 0);
	memcpy(info, ev->param.conn.private_data, sizeof(info));
	rdma_ack_cm_event(ev);

	/* READ the server's first half; WRITE our pattern into its second half */
	cr_assert_eq(one_op(&cl, IBV_WR_RDMA_READ, 0, info[0], (uint32_t)info[1]), IBV_WC_SUCCESS);
	for (int i = 0; i < LEN / 2; i++)
		cr_assert_eq(cl.buf[i], (uint8_t)(i * 7 + 3), "READ byte %d", i);
	for (int i = 0; i < LEN / 2; i++)
		cl.buf[LEN / 2 + i] = (uint8_t)(255 - i);
	cr_assert_eq(one_op(&cl, IBV_WR_RDMA_WRITE, LEN / 2, info[0] + LEN / 2, (uint32_t)info[1]),
		     IBV_WC_SUCCESS);
	pthread_barrier_wait(&done);
	pthread_join(t, NULL);
	for (int i = 0; i < LEN / 2; i++)
		cr_assert_eq(srv_side.buf[LEN / 2 + i], (uint8_t)(255 - i), "WRITE byte %d", i);
	rdma_disconnect(cl.id);
	side_free(&cl);
	side_free(&srv_side);
}
