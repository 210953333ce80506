/*
 * responder.c -- the passive side of the raw-verbs baseline: a thread of
 * rdmaps-bench (default) or `rdmaps-bench raw-server` on another host. One
 * connection at a time. Passive modes sleep on the completion channel, so
 * the responder costs no CPU while the client READs or WRITEs on its own;
 * ping-pong modes busy-poll, as perftest's latency tests do on both sides.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>

#include "bench.h"
#include "chunk.h"
#include "raw.h"

struct raw_responder {
	struct rdma_event_channel *ch;
	struct rdma_cm_id *listen;
	pthread_t th;
	bool threaded;
	atomic_bool stop;
};

/* busy-poll this long after work before sleeping: rdmaps-server's default --spin-us */
#define RESP_SPIN_NS 200000u

static atomic_bool g_signalled;

static void on_signal(int sig)
{
	(void)sig;
	atomic_store(&g_signalled, true);
}

static bool stopping(struct raw_responder *r)
{
	return atomic_load_explicit(&r->stop, memory_order_relaxed) ||
	       atomic_load_explicit(&g_signalled, memory_order_relaxed);
}

/* Non-blocking look at the CM channel: true when q's connection is over. */
static bool cm_poll(struct raw_responder *r, struct raw_qp *q)
{
	struct rdma_cm_event *ev;
	bool gone = false;

	/* stop at our own end: a new client's request right behind it is
	 * for responder_main, not to be refused as "busy" */
	while (!gone && !rdma_get_cm_event(r->ch, &ev)) {
		struct rdma_cm_id *id = ev->id;
		enum rdma_cm_event_type t = ev->event;
		if (t == RDMA_CM_EVENT_CONNECT_REQUEST) {
			/* busy: one client at a time */
			rdma_reject(id, NULL, 0);
			rdma_ack_cm_event(ev);
			rdma_destroy_id(id);
			continue;
		}
		if (q && id == q->id &&
		    (t == RDMA_CM_EVENT_DISCONNECTED || t == RDMA_CM_EVENT_DEVICE_REMOVAL ||
		     t == RDMA_CM_EVENT_TIMEWAIT_EXIT))
			gone = true;
		rdma_ack_cm_event(ev);
	}
	return gone;
}

/* Sleep until a completion or a CM event (or 200 ms). */
static void sleep_on_cq(struct raw_responder *r, struct raw_qp *q)
{
	struct pollfd pfd[2] = { { .fd = q->cc->fd, .events = POLLIN },
				 { .fd = r->ch->fd, .events = POLLIN } };
	struct ibv_cq *cq;
	void *ctx;

	poll(pfd, 2, 200);
	while (!ibv_get_cq_event(q->cc, &cq, &ctx))
		ibv_ack_cq_events(cq, 1);
}

static uint8_t next_count(uint8_t c)
{
	return c == 255 ? 1 : (uint8_t)(c + 1);
}

/* Returns why the connection ended (NULL: the client left or we stop). */
static const char *serve(struct raw_responder *r, struct raw_qp *q)
{
	enum raw_mode mode = RAW_PASSIVE;
	uint64_t size = 0;
	uint8_t expect = 1;
	unsigned idle = 0;
	bool armed = false;
	uint64_t last_work = 0;
	struct ibv_wc wc[16];

	while (!stopping(r)) {
		int n = ibv_poll_cq(q->cq, 16, wc);

		for (int i = 0; i < n; i++) {
			if (wc[i].status != IBV_WC_SUCCESS) {
				return ibv_wc_status_str(wc[i].status);
			}
			if (!(wc[i].opcode & IBV_WC_RECV)) {
				q->sq_busy--;
				continue;
			}
			if (raw_post_recv(q, q->buf, q->max_size))
				return "cannot post a receive";
			if (wc[i].opcode == IBV_WC_RECV_RDMA_WITH_IMM) {
				/* RAW_WRITE_IMM: the receive is all it costs;
				 * RAW_WRITE_IMM_PP: answer like a credit write */
				if (mode == RAW_WRITE_IMM_PP) {
					uint64_t *credit = (uint64_t *)(q->ctl + 512);
					(*credit)++;
					if (raw_post(q, IBV_WR_RDMA_WRITE, 0, credit, 8, 0))
						return "cannot post the answer WRITE";
				}
				continue;
			}
			if ((wc[i].wc_flags & IBV_WC_WITH_IMM) && ntohl(wc[i].imm_data) == RAW_IMM_CTL) {
				struct raw_ctl c;
				memcpy(&c, q->buf, sizeof(c));
				if (c.magic != RAW_MAGIC || c.size > q->max_size)
					return "bad control message";
				mode = (enum raw_mode)c.mode;
				size = c.size;
				if (mode == RAW_WRITE_PP && size)
					q->buf[size - 1] = 0;
				*(uint64_t *)(q->ctl + 512) = 0;
				expect = 1;
				if (raw_post(q, IBV_WR_SEND_WITH_IMM, 0, q->ctl, 8, RAW_IMM_ACK))
					return "cannot post the control answer";
				continue;
			}
			/* RAW_SEND_PP: the same bytes go straight back */
			if (raw_post(q, IBV_WR_SEND, 0, q->buf, wc[i].byte_len, 0))
				return "cannot post the SEND answer";
		}
		if (n < 0)
			return "ibv_poll_cq failed";
		if (mode == RAW_WRITE_PP && size &&
		    __atomic_load_n(&q->buf[size - 1], __ATOMIC_ACQUIRE) == expect) {
			if (raw_post(q, IBV_WR_RDMA_WRITE, 0, q->buf, size, 0))
				return "cannot post the ping-pong WRITE";
			expect = next_count(expect);
			continue;
		}
		if (n > 0) {
			idle = 0;
			armed = false;
			if (mode == RAW_WRITE_IMM)
				last_work = rdmaps__now_ns();
			continue;
		}
		if (!q->sq_busy &&
		    (mode == RAW_PASSIVE ||
		     (mode == RAW_WRITE_IMM && rdmaps__now_ns() - last_work > RESP_SPIN_NS))) {
			if (!armed) {
				/* arm, then poll once more: a completion that came
				 * before the arm raises no event */
				ibv_req_notify_cq(q->cq, 0);
				armed = true;
				continue;
			}
			if (cm_poll(r, q))
				return NULL;
			sleep_on_cq(r, q);
			armed = false;
			continue;
		}
		if ((++idle & 4095u) == 0 && cm_poll(r, q))
			return NULL;
		rdmaps__cpu_relax();
	}
	return NULL;
}

static void handle_request(struct raw_responder *r, struct rdma_cm_event *ev)
{
	struct rdma_cm_id *id = ev->id;
	struct raw_qp *q = NULL;
	struct rdma_cm_event *est;
	int rc = raw_accept(id, ev->param.conn.private_data, ev->param.conn.private_data_len, &q);

	rdma_ack_cm_event(ev);
	if (rc) {
		fprintf(stderr, "rdmaps-bench: responder: refused a client: %s\n", rdmaps_strerror(rc));
		rdma_reject(id, NULL, 0);
		rdma_destroy_id(id);
		return;
	}
	rc = rdmaps__cm_wait(r->ch, RDMA_CM_EVENT_ESTABLISHED, 20000, &est, NULL);
	if (!rc) {
		rdma_ack_cm_event(est);
		const char *why;
		raw_after_established(q);
		if ((why = serve(r, q)))
			fprintf(stderr, "rdmaps-bench: responder: connection ended: %s\n", why);
	}
	raw_qp_free(q);
	rdma_destroy_id(id);
}

static void *responder_main(void *arg)
{
	struct raw_responder *r = arg;

	while (!stopping(r)) {
		struct pollfd p = { .fd = r->ch->fd, .events = POLLIN };
		struct rdma_cm_event *ev;

		if (poll(&p, 1, 200) <= 0 || rdma_get_cm_event(r->ch, &ev))
			continue;
		if (ev->event == RDMA_CM_EVENT_CONNECT_REQUEST)
			handle_request(r, ev);
		else
			rdma_ack_cm_event(ev);
	}
	return NULL;
}

static int listen_on(struct raw_responder *r, const char *addr, const char *port, char *port_out,
		     size_t port_len)
{
	struct rdma_addrinfo hints = { .ai_flags = RAI_PASSIVE, .ai_port_space = RDMA_PS_TCP }, *ai;

	r->ch = rdma_create_event_channel();
	if (!r->ch)
		return RDMAPS_EVERBS;
	fcntl(r->ch->fd, F_SETFL, fcntl(r->ch->fd, F_GETFL) | O_NONBLOCK);
	if (rdma_create_id(r->ch, &r->listen, r, RDMA_PS_TCP))
		return RDMAPS_EVERBS;
	if (rdma_getaddrinfo(addr, port ? port : "0", &hints, &ai)) {
		fprintf(stderr, "rdmaps-bench: responder: cannot resolve %s\n", addr);
		return RDMAPS_ENODEV;
	}
	if (rdma_bind_addr(r->listen, ai->ai_src_addr) || rdma_listen(r->listen, 8)) {
		fprintf(stderr, "rdmaps-bench: responder: cannot listen on %s: %s\n", addr,
			strerror(errno));
		rdma_freeaddrinfo(ai);
		return RDMAPS_ENODEV;
	}
	rdma_freeaddrinfo(ai);
	snprintf(port_out, port_len, "%u", (unsigned)ntohs(rdma_get_src_port(r->listen)));
	return 0;
}

int raw_responder_start(const char *addr, const char *port, struct raw_responder **out,
			char *port_out, size_t port_len)
{
	struct raw_responder *r = calloc(1, sizeof(*r));
	int rc;

	if (!r)
		return RDMAPS_ENOMEM;
	rc = listen_on(r, addr, port, port_out, port_len);
	if (!rc && pthread_create(&r->th, NULL, responder_main, r))
		rc = RDMAPS_ESYS;
	if (rc) {
		raw_responder_stop(r);
		return rc;
	}
	r->threaded = true;
	*out = r;
	return 0;
}

void raw_responder_stop(struct raw_responder *r)
{
	if (!r)
		return;
	atomic_store(&r->stop, true);
	if (r->threaded)
		pthread_join(r->th, NULL);
	if (r->listen)
		rdma_destroy_id(r->listen);
	if (r->ch)
		rdma_destroy_event_channel(r->ch);
	free(r);
}

int raw_server_main(const char *addr, const char *port)
{
	struct raw_responder r = { 0 };
	char p[16];
	int rc = listen_on(&r, addr, port, p, sizeof(p));

	if (rc) {
		fprintf(stderr, "rdmaps-bench raw-server: %s\n", rdmaps_strerror(rc));
		return 1;
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	printf("rdmaps-bench raw-server: serving on %s port %s\n", addr, p);
	fflush(stdout);
	responder_main(&r);
	rdma_destroy_id(r.listen);
	rdma_destroy_event_channel(r.ch);
	return 0;
}
