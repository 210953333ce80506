/*
 * rawverbs.c -- the raw-verbs baselines, client side. What each one is:
 *
 *   raw-read          RDMA READ, wait for its completion: a FULL round trip.
 *                     Same measurement as perftest's ib_read_lat.
 *   raw-write-ack     RDMA WRITE, wait for its completion, which the NIC
 *                     raises on the responder's ACK: a FULL round trip.
 *                     What rdmaps_push (staged) waits for. No perftest twin.
 *   raw-write-imm-ack as above with WRITE-with-immediate (consumes a receive
 *                     at the responder, as rdmaps' staging does).
 *   raw-read-span     a READ of as many bytes as a 1-chunk pull reads, into one
 *                     SGE (separates the cost of the bytes from that of SGEs).
 *   raw-read-chunk    a 1-chunk READ as a large pull posts it: 24 B header
 *                     and the data, scattered over 2 SGEs (a pull of a
 *                     small chunk reads it into one buffer instead).
 *   raw-write-slot    the exact WRITE-with-immediate a 1-chunk push posts:
 *                     24 B slot header + payload from 2 SGEs.
 *   raw-write-pp      WRITE ping-pong: WRITE, the peer sees the last byte
 *                     change and WRITEs back, we see ours change: a FULL
 *                     round trip; ib_write_lat prints HALF of it.
 *   raw-write-imm-pp  a push-folded without rdmaps: WRITE-with-immediate, the
 *                     peer busy-polls its CQ and WRITEs an 8-byte counter
 *                     back (as the fold thread's credit), we poll for it.
 *   raw-send-pp       SEND ping-pong, same shape; ib_send_lat prints HALF.
 *   raw-read-bw       D READs in flight (as ib_read_bw), bytes per second.
 *   raw-write-bw      D WRITEs in flight (as ib_write_bw).
 *
 * Timing brackets post and completion with CLOCK_MONOTONIC (vDSO); every
 * buffer is registered at connect, nothing allocates in a measured loop.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>

#include "bench.h"
#include "chunk.h"
#include "protocol.h"
#include "raw.h"

enum raw_test {
	RT_READ,
	RT_READ_SPAN,
	RT_READ_CHUNK,
	RT_WRITE_ACK,
	RT_WRITE_IMM_ACK,
	RT_WRITE_SLOT,
	RT_WRITE_PP,
	RT_WRITE_IMM_PP,
	RT_SEND_PP,
	RT_READ_BW, /* bandwidth tests from here on */
	RT_WRITE_BW,
};

static const struct {
	const char *name;
	enum raw_mode mode;
	const char *note;
} tests[] = {
	[RT_READ] = { "raw-read", RAW_PASSIVE, "= ib_read_lat (full RTT)" },
	[RT_READ_SPAN] = { "raw-read-span", RAW_PASSIVE,
			   "a pull's bytes (+8 B checksum), 1 SGE: a small ASP pull's READ" },
	[RT_READ_CHUNK] = { "raw-read-chunk", RAW_PASSIVE,
			    "+8 B checksum, 2 SGEs: a big ASP chunk's READ" },
	[RT_WRITE_ACK] = { "raw-write-ack", RAW_PASSIVE, "WRITE until the NIC's ack" },
	[RT_WRITE_IMM_ACK] = { "raw-write-imm-ack", RAW_WRITE_IMM, "WRITE+imm until ack" },
	[RT_WRITE_SLOT] = { "raw-write-slot", RAW_WRITE_IMM, "a push's WRITE+imm: +24 B header, 2 SGEs" },
	[RT_WRITE_PP] = { "raw-write-pp", RAW_WRITE_PP, "ib_write_lat prints half" },
	[RT_WRITE_IMM_PP] = { "raw-write-imm-pp", RAW_WRITE_IMM_PP, "WRITE+imm, peer polls CQ, WRITEs 8 B back" },
	[RT_SEND_PP] = { "raw-send-pp", RAW_SEND_PP, "ib_send_lat prints half" },
	[RT_READ_BW] = { "raw-read-bw", RAW_PASSIVE, "~ ib_read_bw" },
	[RT_WRITE_BW] = { "raw-write-bw", RAW_PASSIVE, "~ ib_write_bw" },
};

struct raw_bench {
	const struct bench_opts *o;
	struct raw_qp *q;            /* NULL after a failed reconnect */
	char peer[256], port[32], src[256];
	uint64_t max;
	struct rdmaps_hist hist;
	/* paired mode: the test one raw_pair_one() runs */
	enum raw_test pair_test;
	uint64_t pair_size;
	uint8_t pair_cnt;
};

/* One completion of a signaled send-queue request; error on failure. */
static int reap_one(struct raw_qp *q, struct ibv_wc *wc)
{
	int n;

	do
		n = ibv_poll_cq(q->cq, 1, wc);
	while (n == 0);
	if (n < 0 || wc->status != IBV_WC_SUCCESS) {
		fprintf(stderr, "rdmaps-bench: raw: %s\n",
			n < 0 ? "poll failed" : ibv_wc_status_str(wc->status));
		return -1;
	}
	if (!(wc->opcode & IBV_WC_RECV))
		q->sq_busy--;
	return 0;
}

/* READ or WRITE[-imm] and wait for its own completion. */
static int one_rdma(struct raw_qp *q, enum ibv_wr_opcode op, uint64_t size)
{
	struct ibv_wc wc;

	if (raw_post(q, op, 0, q->buf, size, 1))
		return -1;
	return reap_one(q, &wc);
}

/* The READ librdmaps posts for an ASP chunk over 256 B: the checksum to
 * scratch (here the receive area), the floats to the destination. */
_Static_assert(RDMAPS_CHUNK_HDR - RDMAPS_CHUNK_SKIP == 8, "the row notes say 8 B");
static int one_read_chunk(struct raw_qp *q, uint64_t size)
{
	struct ibv_sge sge[2] = {
		{ .addr = (uintptr_t)q->rbuf, .length = RDMAPS_CHUNK_HDR - RDMAPS_CHUNK_SKIP,
		  .lkey = q->mr->lkey },
		{ .addr = (uintptr_t)q->buf, .length = (uint32_t)size, .lkey = q->mr->lkey },
	};
	struct ibv_wc wc;

	if (raw_post_sge(q, IBV_WR_RDMA_READ, 0, sge, 2, 0))
		return -1;
	return reap_one(q, &wc);
}

/* The WRITE-with-immediate librdmaps posts for one staging slot. */
static int one_write_slot(struct raw_qp *q, uint64_t size)
{
	struct ibv_sge sge[2] = {
		{ .addr = (uintptr_t)(q->ctl + 256), .length = RDMAPS_SLOT_HDR, .lkey = q->mr->lkey },
		{ .addr = (uintptr_t)q->buf, .length = (uint32_t)size, .lkey = q->mr->lkey },
	};
	struct ibv_wc wc;

	if (raw_post_sge(q, IBV_WR_RDMA_WRITE_WITH_IMM, 0, sge, 2, 1))
		return -1;
	return reap_one(q, &wc);
}

static uint8_t next_count(uint8_t c)
{
	return c == 255 ? 1 : (uint8_t)(c + 1);
}

/* WRITE ping-pong: the last byte carries a counter both ways. */
static int one_write_pp(struct raw_qp *q, uint64_t size, uint8_t *cnt)
{
	volatile uint8_t *flag = &q->rbuf[size - 1];
	struct ibv_wc wc;

	q->buf[size - 1] = *cnt;
	if (raw_post(q, IBV_WR_RDMA_WRITE, 0, q->buf, size, 0))
		return -1;
	while (__atomic_load_n(flag, __ATOMIC_ACQUIRE) != *cnt)
		if (q->sq_busy && ibv_poll_cq(q->cq, 1, &wc) > 0) {
			if (wc.status != IBV_WC_SUCCESS)
				return -1;
			q->sq_busy--;
		}
	*cnt = next_count(*cnt);
	return 0;
}

/* WRITE-with-immediate, then wait for the peer's 8-byte answer. */
static int one_write_imm_pp(struct raw_qp *q, uint64_t size, uint64_t *expect)
{
	volatile uint64_t *credit = (volatile uint64_t *)q->rbuf;
	struct ibv_wc wc;

	if (raw_post(q, IBV_WR_RDMA_WRITE_WITH_IMM, 0, q->buf, size, 1))
		return -1;
	++*expect;
	while (__atomic_load_n(credit, __ATOMIC_ACQUIRE) != *expect)
		if (q->sq_busy && ibv_poll_cq(q->cq, 1, &wc) > 0) {
			if (wc.status != IBV_WC_SUCCESS)
				return -1;
			q->sq_busy--;
		}
	return 0;
}

/* SEND ping-pong: until the answer's receive completes. */
static int one_send_pp(struct raw_qp *q, uint64_t size)
{
	struct ibv_wc wc;

	if (raw_post(q, IBV_WR_SEND, 0, q->buf, size, 0))
		return -1;
	for (;;) {
		if (reap_one(q, &wc))
			return -1;
		if (wc.opcode & IBV_WC_RECV)
			return raw_post_recv(q, q->rbuf, q->max_size) ? -1 : 0;
	}
}

static int one_op(struct raw_qp *q, enum raw_test t, uint64_t size, uint8_t *cnt)
{
	switch (t) {
	case RT_READ: return one_rdma(q, IBV_WR_RDMA_READ, size);
	case RT_READ_SPAN:
		return one_rdma(q, IBV_WR_RDMA_READ,
				rdmaps__chunk_read_len((uint32_t)(size / 4)) - RDMAPS_CHUNK_SKIP);
	case RT_READ_CHUNK: return one_read_chunk(q, size);
	case RT_WRITE_SLOT: return one_write_slot(q, size);
	case RT_WRITE_ACK: return one_rdma(q, IBV_WR_RDMA_WRITE, size);
	case RT_WRITE_IMM_ACK: return one_rdma(q, IBV_WR_RDMA_WRITE_WITH_IMM, size);
	case RT_WRITE_PP: return one_write_pp(q, size, cnt);
	case RT_WRITE_IMM_PP: return one_write_imm_pp(q, size, &q->credit_seen);
	case RT_SEND_PP: return one_send_pp(q, size);
	default: return -1;
	}
}

static int run_lat(struct raw_bench *rb, enum raw_test t, uint64_t size, struct bench_row *r)
{
	struct raw_qp *q = rb->q;
	struct bench_loop l;
	uint8_t cnt = 1;
	uint64_t start, t0, t1;

	if (raw_set_mode(q, tests[t].mode, size))
		return -1;
	q->rbuf[size - 1] = 0;
	start = rdmaps__now_ns();
	for (uint64_t i = 0; warm_more(rb->o, i, start, rdmaps__now_ns()); i++)
		if (one_op(q, t, size, &cnt))
			return -1;
	rdmaps__hist_reset(&rb->hist);
	start = t1 = rdmaps__now_ns();
	loop_start(&l, rb->o, start);
	do {
		t0 = rdmaps__now_ns();
		if (one_op(q, t, size, &cnt))
			return -1;
		t1 = rdmaps__now_ns();
		rdmaps__hist_record(&rb->hist, t1 - t0);
	} while (loop_more(&l, t1));
	r->ops = l.n;
	r->seconds = (double)(t1 - start) / 1e9;
	return raw_set_mode(q, RAW_PASSIVE, 0);
}

/*
 * `depth` requests of `size` bytes in flight until l says stop (those still
 * in flight then finish and count too; a counted loop posts exactly what it
 * wants); each one's post to completion latency into h. *end: the last
 * completion.
 */
static int bw_stream(struct raw_qp *q, enum ibv_wr_opcode op, uint64_t size, unsigned depth,
		     struct bench_loop *l, struct rdmaps_hist *h, uint64_t *end)
{
	uint64_t posted_at[RAW_SQ_DEPTH], posted = 0;
	unsigned inflight = 0;
	bool more = true;
	struct ibv_wc wc[16];
	uint64_t now = rdmaps__now_ns();

	if (depth > RAW_SQ_DEPTH)
		depth = RAW_SQ_DEPTH;
	if (l->want && depth > l->want)
		depth = (unsigned)l->want;
	for (unsigned k = 0; k < depth; k++) {
		posted_at[k] = rdmaps__now_ns();
		if (raw_post(q, op, k, q->buf, size, 0))
			return -1;
		inflight++;
		posted++;
	}
	while (inflight) {
		int n = ibv_poll_cq(q->cq, 16, wc);
		if (n < 0)
			return -1;
		if (!n)
			continue;
		now = rdmaps__now_ns();
		for (int i = 0; i < n; i++) {
			unsigned k = (unsigned)wc[i].wr_id;
			if (wc[i].status != IBV_WC_SUCCESS) {
				fprintf(stderr, "rdmaps-bench: raw: %s\n", ibv_wc_status_str(wc[i].status));
				return -1;
			}
			q->sq_busy--;
			inflight--;
			rdmaps__hist_record(h, now - posted_at[k]);
			if (more)
				more = loop_more(l, now);
			else
				l->n++;
			if (more && (!l->want || posted < l->want)) { /* counted: exactly want */
				posted_at[k] = now;
				if (raw_post(q, op, k, q->buf, size, 0))
					return -1;
				inflight++;
				posted++;
			}
		}
	}
	*end = now;
	return 0;
}

/* D requests in flight; each one's latency is post to completion. */
static int run_bw(struct raw_bench *rb, enum raw_test t, uint64_t size, struct bench_row *r)
{
	enum ibv_wr_opcode op = t == RT_READ_BW ? IBV_WR_RDMA_READ : IBV_WR_RDMA_WRITE;
	struct bench_loop l;
	uint64_t start, end;

	start = rdmaps__now_ns();
	for (uint64_t i = 0; warm_more(rb->o, i, start, rdmaps__now_ns()); i++)
		if (one_rdma(rb->q, op, size))
			return -1;
	rdmaps__hist_reset(&rb->hist);
	start = rdmaps__now_ns();
	loop_start_bw(&l, rb->o, start, size);
	if (bw_stream(rb->q, op, size, rb->o->raw_depth, &l, &rb->hist, &end))
		return -1;
	r->ops = l.n;
	r->seconds = (double)(end - start) / 1e9;
	return 0;
}

/* A failed test leaves the QP in an unknown state: start a fresh one. */
static void reconnect(struct raw_bench *rb)
{
	int rc;

	raw_qp_free(rb->q);
	rb->q = NULL;
	rc = raw_client_connect(rb->peer, rb->port, rb->src[0] ? rb->src : NULL, rb->max, &rb->q);
	if (rc)
		fprintf(stderr, "rdmaps-bench: raw baseline: reconnect failed: %s\n",
			rdmaps_strerror(rc));
}

static int measure(struct raw_bench *rb, enum raw_test t, uint64_t size, unsigned depth,
		   const char *group)
{
	struct bench_row r = { 0 };
	bool bw = t == RT_READ_BW || t == RT_WRITE_BW;
	int rc;

	if (!rb->q)
		return -1;
	rc = bw ? run_bw(rb, t, size, &r) : run_lat(rb, t, size, &r);

	if (rc) {
		fprintf(stderr, "rdmaps-bench: %s at %llu B failed; reconnecting the raw baseline\n",
			tests[t].name, (unsigned long long)size);
		reconnect(rb);
		return -1;
	}
	snprintf(r.group, sizeof(r.group), "%s", group);
	snprintf(r.op, sizeof(r.op), "%s", tests[t].name);
	r.size = size;
	r.workers = 1;
	r.depth = depth;
	report_lat(&r, &rb->hist);
	r.rtt = bw ? RTT_NONE : RTT_FULL;
	r.ops_s = r.seconds > 0 ? (double)r.ops / r.seconds : 0;
	r.gb_s = r.ops_s * (double)size / 1e9;
	if (t == RT_WRITE_PP || t == RT_SEND_PP)
		snprintf(r.note, sizeof(r.note), "half p50 %.2f us; %s", r.p50 / 2, tests[t].note);
	else
		snprintf(r.note, sizeof(r.note), "%s", tests[t].note);
	report_add(&r);
	return 0;
}

int raw_open(const struct bench_opts *o, const char *peer, const char *port, const char *src,
	     struct raw_bench **out)
{
	struct raw_bench *rb = calloc(1, sizeof(*rb));
	uint64_t max = 0;
	int rc;

	if (!rb)
		return RDMAPS_ENOMEM;
	for (unsigned i = 0; i < o->nsizes; i++)
		if (o->sizes[i] > max)
			max = o->sizes[i];
	rb->o = o;
	rb->max = max;
	snprintf(rb->peer, sizeof(rb->peer), "%s", peer);
	snprintf(rb->port, sizeof(rb->port), "%s", port);
	snprintf(rb->src, sizeof(rb->src), "%s", src ? src : "");
	rc = raw_client_connect(peer, port, src, max, &rb->q);
	if (rc) {
		fprintf(stderr, "rdmaps-bench: raw baseline: cannot connect to %s port %s: %s\n", peer,
			port, rdmaps_strerror(rc));
		free(rb);
		return rc;
	}
	*out = rb;
	return 0;
}

int raw_measure(struct raw_bench *rb, unsigned part, uint64_t size)
{
	const struct bench_opts *o = rb->o;
	int rc = 0;

	if (!rb->q)
		return -1;
	if (part == PART_LAT) {
		if (o->ops & (BOP_PULL | BOP_PUSHPULL))
			rc |= measure(rb, RT_READ, size, 1, "lat");
		if (o->ops & BOP_PULL) {
			rc |= measure(rb, RT_READ_SPAN, size, 1, "lat");
			rc |= measure(rb, RT_READ_CHUNK, size, 1, "lat");
		}
		if (o->ops & BOP_PUSH) {
			rc |= measure(rb, RT_WRITE_ACK, size, 1, "lat");
			rc |= measure(rb, RT_WRITE_IMM_ACK, size, 1, "lat");
			rc |= measure(rb, RT_WRITE_SLOT, size, 1, "lat");
		}
		if (o->ops & (BOP_PUSH | BOP_PUSHPULL))
			rc |= measure(rb, RT_WRITE_PP, size, 1, "lat");
		if (o->ops & BOP_PUSH)
			rc |= measure(rb, RT_WRITE_IMM_PP, size, 1, "lat");
		if (o->ops & BOP_PUSH)
			rc |= measure(rb, RT_SEND_PP, size, 1, "lat");
	} else if (part == PART_BW) {
		if (o->ops & BOP_PULL)
			rc |= measure(rb, RT_READ_BW, size, o->raw_depth, "bw");
		if (o->ops & BOP_PUSH)
			rc |= measure(rb, RT_WRITE_BW, size, o->raw_depth, "bw");
	}
	return rc ? -1 : 0;
}

int raw_pair_begin(struct raw_bench *rb, const char *test, uint64_t size)
{
	if (!rb->q)
		return -1;
	for (enum raw_test t = RT_READ; t < RT_READ_BW; t++)
		if (!strcmp(tests[t].name, test)) {
			rb->pair_test = t;
			rb->pair_size = size;
			rb->pair_cnt = 1;
			if (raw_set_mode(rb->q, tests[t].mode, size))
				return -1;
			rb->q->rbuf[size - 1] = 0;
			return 0;
		}
	return -1;
}

int raw_pair_one(struct raw_bench *rb)
{
	return one_op(rb->q, rb->pair_test, rb->pair_size, &rb->pair_cnt);
}

int raw_bw_slice(struct raw_bench *rb, uint64_t size, uint64_t ops, unsigned depth,
		 uint64_t *done, uint64_t *ns)
{
	struct bench_loop l = { .want = ops };
	uint64_t start, end;

	if (!rb->q)
		return -1;
	start = rdmaps__now_ns();
	if (bw_stream(rb->q, IBV_WR_RDMA_READ, size, depth, &l, &rb->hist, &end)) {
		reconnect(rb);
		return -1;
	}
	*done = l.n;
	*ns = end - start;
	return 0;
}

int raw_pair_end(struct raw_bench *rb)
{
	if (raw_set_mode(rb->q, RAW_PASSIVE, 0)) {
		reconnect(rb);
		return -1;
	}
	return 0;
}

void raw_close(struct raw_bench *rb)
{
	if (!rb)
		return;
	raw_qp_free(rb->q);
	free(rb);
}
