/*
 * wire.c -- pushes in each wire format (rdmaps_set_push_format), then pulls
 * as float32 and from each 16-bit copy (pull_format), interleaved: one op of
 * each format in turn, in one thread (worker 0's client), so a VM that
 * slows down for a second slows every format alike. Each format has its own
 * tensor of the same size; the gradient is one registered buffer of varied
 * values (top-k's select and sign's scale see a real spread, not a
 * constant). A push here is rdmaps_push: staged, which for a compressed
 * format includes encoding it on the worker. The ratio of each row is its
 * p50 over float32's; a push's note gives the payload bytes it posted (the
 * client's push_bytes). With --netdev, the bytes that interface sent per
 * push or received per pull too (read outside the timed part: the RoCE
 * packets, headers and all), and a "wire-bytes" row per push format: those
 * bytes over what the format's payload should put on the wire
 * (wire_expect), 1 when the wire carries exactly what the format says.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "workload.h"

struct wire_case {
	const char *op;
	enum rdmaps_format fmt; /* a push's format, or a pull's copy */
	double fraction;
	bool pull;
};

static const struct wire_case push_cases[] = {
	{ "push-f32", RDMAPS_FMT_F32, 0, false },   { "push-bf16", RDMAPS_FMT_BF16, 0, false },
	{ "push-fp16", RDMAPS_FMT_FP16, 0, false }, { "push-topk1%", RDMAPS_FMT_TOPK, 0.01, false },
	{ "push-sign", RDMAPS_FMT_SIGN, 0, false },
};
static const struct wire_case pull_cases[] = {
	{ "pull-f32", RDMAPS_FMT_F32, 0, true },
	{ "pull-bf16", RDMAPS_FMT_BF16, 0, true },
	{ "pull-fp16", RDMAPS_FMT_FP16, 0, true },
};
#define MAX_CASES 5

/* What the interleaved rounds of a set of cases measured, per case. */
struct wire_result {
	struct rdmaps_hist hist[MAX_CASES];
	uint64_t payload[MAX_CASES]; /* push_bytes */
	uint64_t net[MAX_CASES];     /* the netdev's tx (push) or rx (pull) bytes */
	uint64_t rounds, ns;
};

/* A counter of the interface (tx_bytes, rx_bytes), or 0 when there is
 * none to read. */
static uint64_t net_stat(const char *netdev, const char *what)
{
	char path[256], buf[32] = "";
	unsigned long long v = 0;
	FILE *f;

	if (!netdev)
		return 0;
	snprintf(path, sizeof(path), "/sys/class/net/%s/statistics/%s", netdev, what);
	f = fopen(path, "r");
	if (!f)
		return 0;
	if (fgets(buf, sizeof(buf), f))
		v = strtoull(buf, NULL, 10);
	fclose(f);
	return v;
}

/*
 * Bytes a push of `payload` bytes in `slots` equal slots puts on an
 * Ethernet wire as RoCE v2: per slot one WRITE-with-immediate of the 24 B
 * slot header and its share of the payload, cut into packets of the path
 * MTU, each with Ethernet (14), IPv4 (20), UDP (8), BTH (12) headers and an
 * ICRC (4); the first packet of a WRITE carries a RETH (16) and the last
 * the immediate (4). The path MTU is rxe's: the largest IB MTU that fits
 * the netdev's MTU less rxe's headers (kernel 6.1, eth_mtu_int_to_enum).
 */
static double wire_expect(const char *netdev, uint64_t payload, uint64_t slots)
{
	char path[256], buf[32] = "";
	unsigned long mtu = 1500, ib = 256;
	FILE *f;

	snprintf(path, sizeof(path), "/sys/class/net/%s/mtu", netdev);
	if ((f = fopen(path, "r"))) {
		if (fgets(buf, sizeof(buf), f))
			mtu = strtoul(buf, NULL, 10);
		fclose(f);
	}
	for (unsigned long m = 4096; m >= 256; m /= 2)
		if (m + 80 <= mtu) { /* RXE_MAX_HDR_LENGTH */
			ib = m;
			break;
		}
	double per_slot = 24.0 + (double)payload / (double)slots;
	double packets = __builtin_ceil(per_slot / (double)ib);
	return (double)slots * (per_slot + packets * (14 + 20 + 8 + 12 + 4) + 16 + 4);
}

/*
 * Declare a tensor per case (a pull case with its pull format, a push case
 * with its push format), warm each up, then rounds of one op per case, the
 * order turning every round (no case always follows another), until the
 * loop says stop; rows "wire <op>" with their ratio to cs[0]'s p50.
 */
static int run_cases(struct wl *wl, unsigned si, const struct wire_case *cs, unsigned n,
		     float *buf, struct wire_result *res)
{
	const struct bench_opts *o = wl->o;
	struct wl_worker *w = &wl->w[0];
	uint64_t size = o->sizes[si], start;
	rdmaps_tensor *t[MAX_CASES] = { 0 };
	struct bench_loop l;
	int rc = 0;

	memset(res, 0, sizeof(*res));
	for (unsigned f = 0; f < n && !rc; f++) {
		struct rdmaps_tensor_desc d = { 0 };
		char name[64];
		wl->acc->describe(wl, size, &d);
		snprintf(name, sizeof(name), "bench-wire-%s-%llu", cs[f].op, (unsigned long long)size);
		d.name = name;
		d.pull_format = cs[f].pull ? cs[f].fmt : RDMAPS_FMT_F32;
		rc = rdmaps_declare(w->c, &d, &t[f]);
		if (!rc && !cs[f].pull)
			rc = rdmaps_set_push_format(w->c, t[f], cs[f].fmt, cs[f].fraction);
		rdmaps__hist_reset(&res->hist[f]);
	}
	/* warm-up: each case a few times (registration, first faults) */
	for (uint64_t i = 0; !rc && i < 3; i++)
		for (unsigned f = 0; f < n && !rc; f++)
			rc = cs[f].pull ? rdmaps_pull(w->c, t[f], buf, 0) : rdmaps_push(w->c, t[f], buf, 0);
	if (!rc)
		rc = rdmaps_flush(w->c, WL_TIMEOUT_MS);
	start = rdmaps__now_ns();
	loop_start_bw(&l, o, start, size);
	while (!rc) {
		for (unsigned k = 0; k < n && !rc; k++) {
			unsigned f = (unsigned)((k + l.n) % n);
			const char *dir = cs[f].pull ? "rx_bytes" : "tx_bytes";
			struct rdmaps_client_stats s0, s1;
			rdmaps_client_stats(w->c, &s0);
			uint64_t x0 = net_stat(o->netdev, dir);
			uint64_t a = rdmaps__now_ns();
			rc = cs[f].pull ? rdmaps_pull(w->c, t[f], buf, 0) : rdmaps_push(w->c, t[f], buf, 0);
			uint64_t b = rdmaps__now_ns();
			/* a staged push's WRITEs are acknowledged: they have left */
			res->net[f] += net_stat(o->netdev, dir) - x0;
			rdmaps_client_stats(w->c, &s1);
			rdmaps__hist_record(&res->hist[f], b - a);
			res->payload[f] += s1.push_bytes - s0.push_bytes;
		}
		if (!rc && !loop_more(&l, rdmaps__now_ns()))
			break;
	}
	if (!rc)
		rc = rdmaps_flush(w->c, WL_TIMEOUT_MS);
	if (rc) {
		fprintf(stderr, "rdmaps-bench: wire %s at %llu B: %s\n", cs[0].pull ? "pulls" : "pushes",
			(unsigned long long)size, rdmaps_strerror(rc));
		return -1;
	}
	res->rounds = l.n;
	res->ns = rdmaps__now_ns() - start;
	for (unsigned f = 0; f < n; f++) {
		struct bench_row r = { 0 };
		double per = 1.0 / (double)res->rounds;
		snprintf(r.group, sizeof(r.group), "wire");
		snprintf(r.op, sizeof(r.op), "%s", cs[f].op);
		r.size = size;
		r.workers = r.depth = 1;
		r.ops = res->rounds;
		r.seconds = (double)res->ns / 1e9;
		report_lat(&r, &res->hist[f]);
		if (f) {
			const struct bench_row *b0 = report_find("wire", cs[0].op, size);
			snprintf(r.base_op, sizeof(r.base_op), "%s", cs[0].op);
			r.base_val = b0 ? b0->p50 : 0;
			r.ratio = r.base_val > 0 ? r.p50 / r.base_val : 0;
		}
		if (!cs[f].pull)
			snprintf(r.note, sizeof(r.note), "%.0f payload B/push (%.4f of float32)",
				 (double)res->payload[f] * per,
				 res->payload[0] ? (double)res->payload[f] / (double)res->payload[0] : 0.0);
		if (o->netdev)
			snprintf(r.note + strlen(r.note), sizeof(r.note) - strlen(r.note),
				 "%s%.0f B/op %s %s (%.4f of float32)", r.note[0] ? "; " : "",
				 (double)res->net[f] * per, cs[f].pull ? "received by" : "sent by",
				 o->netdev, res->net[0] ? (double)res->net[f] / (double)res->net[0] : 0.0);
		report_add(&r);
	}
	return 0;
}

int wl_wire(struct wl *wl, unsigned si)
{
	const struct bench_opts *o = wl->o;
	uint64_t size = o->sizes[si], n = size / sizeof(float);
	static struct wire_result res; /* histograms: 58 KiB each, not on the stack */
	rdmaps_mr *mr = NULL;
	float *g;
	int rc;

	if (!n)
		return 0;
	if (o->netdev && !net_stat(o->netdev, "tx_bytes")) {
		fprintf(stderr, "rdmaps-bench: --netdev %s: no tx_bytes to read\n", o->netdev);
		return -1;
	}
	g = aligned_alloc(4096, (n * sizeof(float) + 4095) & ~(size_t)4095);
	if (!g)
		return -1;
	/* a spread of magnitudes and signs, as a gradient has */
	for (uint64_t i = 0; i < n; i++)
		g[i] = (float)(1e-3 * sin((double)i * 0.7) * (1.0 + (double)(i * 2654435761u % 1000) / 100.0));
	rc = rdmaps_register(wl->w[0].c, g, n * sizeof(float), &mr);
	if (!rc)
		rc = run_cases(wl, si, push_cases, 5, g, &res);
	/* the server's default chunk: 16384 floats, a slot per chunk */
	for (unsigned f = 0; !rc && o->netdev && f < 5; f++) {
		struct bench_row r = { 0 };
		double got = (double)res.net[f] / (double)res.rounds;
		double want = wire_expect(o->netdev, res.payload[f] / res.rounds, (n + 16383) / 16384);
		snprintf(r.group, sizeof(r.group), "wire-bytes");
		snprintf(r.op, sizeof(r.op), "%s", push_cases[f].op);
		r.size = size;
		r.workers = r.depth = 1;
		r.ops = res.rounds;
		r.seconds = (double)res.ns / 1e9;
		r.ratio = want > 0 ? got / want : 0;
		snprintf(r.base_op, sizeof(r.base_op), "expected");
		r.base_val = want;
		snprintf(r.note, sizeof(r.note), "%s sent %.0f B/push; its format says %.0f", o->netdev,
			 got, want);
		report_add(&r);
	}
	if (!rc)
		rc = run_cases(wl, si, pull_cases, 3, g, &res);
	rdmaps_deregister(mr);
	free(g);
	return rc ? -1 : 0;
}
