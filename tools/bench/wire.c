/*
 * wire.c -- pushes in each wire format (rdmaps_set_push_format), paired:
 * one push of each format in turn, in one thread (worker 0's client), so a
 * VM that slows down for a second slows every format alike. Each format has
 * its own tensor of the same size; the gradient is the same registered
 * buffer of varied values (top-k's select and sign's scale see a real
 * spread, not a constant). A push here is rdmaps_push: staged, which for a
 * compressed format includes encoding it on the worker. The ratio of each
 * row is its p50 over float32's; the note gives the payload bytes a push
 * posted (the client's push_bytes), the bytes the format should move.
 * With --netdev, the bytes that interface sent per push too (its tx_bytes,
 * read outside the timed part: the RoCE packets, headers and all), and a
 * "wire-bytes" row per format: those bytes over what the format's payload
 * should put on the wire (wire_expect), 1 when the wire carries exactly
 * what the format says.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "workload.h"

struct wire_fmt {
	const char *op;
	enum rdmaps_format fmt;
	double fraction;
};

static const struct wire_fmt fmts[] = {
	{ "push-f32", RDMAPS_FMT_F32, 0 },   { "push-bf16", RDMAPS_FMT_BF16, 0 },
	{ "push-fp16", RDMAPS_FMT_FP16, 0 }, { "push-topk1%", RDMAPS_FMT_TOPK, 0.01 },
	{ "push-sign", RDMAPS_FMT_SIGN, 0 },
};
#define NFMT (sizeof(fmts) / sizeof(fmts[0]))

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

/* Pulls of the same tensor as float32, from a bf16 copy and from an fp16
 * copy, in turn; rows pull-<format> with their ratio to float32's, and with
 * --netdev the bytes received per pull (the READ responses). */
static const struct { const char *op; enum rdmaps_format fmt; } pulls[] = {
	{ "pull-f32", RDMAPS_FMT_F32 }, { "pull-bf16", RDMAPS_FMT_BF16 },
	{ "pull-fp16", RDMAPS_FMT_FP16 },
};
#define NPULL (sizeof(pulls) / sizeof(pulls[0]))

static int wire_pulls(struct wl *wl, unsigned si, float *dst)
{
	const struct bench_opts *o = wl->o;
	struct wl_worker *w = &wl->w[0];
	uint64_t size = o->sizes[si], start, end = 0, rx[NPULL] = { 0 };
	static struct rdmaps_hist hist[NPULL];
	rdmaps_tensor *t[NPULL] = { 0 };
	struct bench_loop l;
	int rc = 0;

	for (unsigned f = 0; f < NPULL && !rc; f++) {
		struct rdmaps_tensor_desc d = { 0 };
		char name[64];
		wl->acc->describe(wl, size, &d);
		snprintf(name, sizeof(name), "bench-wire-pull-%u-%llu", f, (unsigned long long)size);
		d.name = name;
		d.pull_format = pulls[f].fmt;
		rc = rdmaps_declare(w->c, &d, &t[f]);
		rdmaps__hist_reset(&hist[f]);
	}
	for (uint64_t i = 0; !rc && i < 3; i++)
		for (unsigned f = 0; f < NPULL && !rc; f++)
			rc = rdmaps_pull(w->c, t[f], dst, 0);
	start = rdmaps__now_ns();
	loop_start_bw(&l, o, start, size);
	while (!rc) {
		for (unsigned k = 0; k < NPULL && !rc; k++) {
			unsigned f = (unsigned)((k + l.n) % NPULL);
			uint64_t x0 = net_stat(o->netdev, "rx_bytes");
			uint64_t a = rdmaps__now_ns();
			rc = rdmaps_pull(w->c, t[f], dst, 0);
			uint64_t b = rdmaps__now_ns();
			rx[f] += net_stat(o->netdev, "rx_bytes") - x0;
			rdmaps__hist_record(&hist[f], b - a);
		}
		end = rdmaps__now_ns();
		if (!rc && !loop_more(&l, end))
			break;
	}
	if (rc) {
		fprintf(stderr, "rdmaps-bench: wire pulls at %llu B: %s\n", (unsigned long long)size,
			rdmaps_strerror(rc));
		return -1;
	}
	double base = 0;
	for (unsigned f = 0; f < NPULL; f++) {
		struct bench_row r = { 0 };
		snprintf(r.group, sizeof(r.group), "wire");
		snprintf(r.op, sizeof(r.op), "%s", pulls[f].op);
		r.size = size;
		r.workers = r.depth = 1;
		r.ops = l.n;
		r.seconds = (double)(end - start) / 1e9;
		report_lat(&r, &hist[f]);
		if (f == 0) {
			base = r.p50;
		} else {
			snprintf(r.base_op, sizeof(r.base_op), "%s", pulls[0].op);
			r.base_val = base;
			r.ratio = base > 0 ? r.p50 / base : 0;
		}
		if (o->netdev)
			snprintf(r.note, sizeof(r.note), "%.0f B/pull received by %s (%.4f of float32)",
				 (double)rx[f] / (double)l.n, o->netdev,
				 rx[0] ? (double)rx[f] / (double)rx[0] : 0.0);
		report_add(&r);
	}
	return 0;
}

int wl_wire(struct wl *wl, unsigned si)
{
	const struct bench_opts *o = wl->o;
	struct wl_worker *w = &wl->w[0];
	uint64_t size = o->sizes[si], n = size / sizeof(float), start, end = 0;
	rdmaps_tensor *t[NFMT] = { 0 };
	static struct rdmaps_hist hist[NFMT]; /* 58 KiB each: not on the stack */
	uint64_t bytes[NFMT] = { 0 }, wire[NFMT] = { 0 };
	float *g = NULL;
	rdmaps_mr *mr = NULL;
	struct bench_loop l;
	int rc = 0;

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
	rc = rdmaps_register(w->c, g, n * sizeof(float), &mr);
	for (unsigned f = 0; f < NFMT && !rc; f++) {
		struct rdmaps_tensor_desc d = { 0 };
		char name[64];
		wl->acc->describe(wl, size, &d);
		snprintf(name, sizeof(name), "bench-wire-%u-%llu", f, (unsigned long long)size);
		d.name = name;
		rc = rdmaps_declare(w->c, &d, &t[f]);
		if (!rc)
			rc = rdmaps_set_push_format(w->c, t[f], fmts[f].fmt, fmts[f].fraction);
		rdmaps__hist_reset(&hist[f]);
	}
	/* warm-up: each format a few times (registration, first faults) */
	for (uint64_t i = 0; !rc && i < 3; i++)
		for (unsigned f = 0; f < NFMT && !rc; f++)
			rc = rdmaps_push(w->c, t[f], g, 0);
	if (!rc)
		rc = rdmaps_flush(w->c, WL_TIMEOUT_MS);
	start = rdmaps__now_ns();
	loop_start_bw(&l, o, start, size);
	while (!rc) {
		for (unsigned k = 0; k < NFMT && !rc; k++) {
			/* the order turns every round: no format always follows another */
			unsigned f = (unsigned)((k + l.n) % NFMT);
			struct rdmaps_client_stats s0, s1;
			rdmaps_client_stats(w->c, &s0);
			uint64_t x0 = net_stat(o->netdev, "tx_bytes");
			uint64_t a = rdmaps__now_ns();
			rc = rdmaps_push(w->c, t[f], g, 0);
			uint64_t b = rdmaps__now_ns();
			/* staged: the WRITEs are acknowledged, so they have left */
			wire[f] += net_stat(o->netdev, "tx_bytes") - x0;
			rdmaps_client_stats(w->c, &s1);
			rdmaps__hist_record(&hist[f], b - a);
			bytes[f] += s1.push_bytes - s0.push_bytes;
		}
		end = rdmaps__now_ns();
		if (!rc && !loop_more(&l, end))
			break;
	}
	if (!rc)
		rc = rdmaps_flush(w->c, WL_TIMEOUT_MS);
	if (!rc && wire_pulls(wl, si, g))
		rc = -1;
	if (rc) {
		fprintf(stderr, "rdmaps-bench: wire pushes at %llu B: %s\n", (unsigned long long)size,
			rdmaps_strerror(rc));
	} else {
		double base = 0;
		for (unsigned f = 0; f < NFMT; f++) {
			struct bench_row r = { 0 };
			snprintf(r.group, sizeof(r.group), "wire");
			snprintf(r.op, sizeof(r.op), "%s", fmts[f].op);
			r.size = size;
			r.workers = r.depth = 1;
			r.ops = l.n;
			r.seconds = (double)(end - start) / 1e9;
			report_lat(&r, &hist[f]);
			if (f == 0) {
				base = r.p50;
			} else {
				snprintf(r.base_op, sizeof(r.base_op), "%s", fmts[0].op);
				r.base_val = base;
				r.ratio = base > 0 ? r.p50 / base : 0;
			}
			snprintf(r.note, sizeof(r.note), "%.0f payload B/push (%.4f of float32)",
				 (double)bytes[f] / (double)l.n,
				 bytes[0] ? (double)bytes[f] / (double)bytes[0] : 0.0);
			if (o->netdev)
				snprintf(r.note + strlen(r.note), sizeof(r.note) - strlen(r.note),
					 "; %.0f B/push sent by %s", (double)wire[f] / (double)l.n,
					 o->netdev);
			report_add(&r);
		}
		/* the server's default chunk: 16384 floats, a slot per chunk */
		uint64_t slots = (n + 16383) / 16384;
		for (unsigned f = 0; o->netdev && f < NFMT; f++) {
			struct bench_row r = { 0 };
			double got = (double)wire[f] / (double)l.n;
			double want = wire_expect(o->netdev, bytes[f] / l.n, slots);
			snprintf(r.group, sizeof(r.group), "wire-bytes");
			snprintf(r.op, sizeof(r.op), "%s", fmts[f].op);
			r.size = size;
			r.workers = r.depth = 1;
			r.ops = l.n;
			r.seconds = (double)(end - start) / 1e9;
			r.ratio = want > 0 ? got / want : 0;
			snprintf(r.base_op, sizeof(r.base_op), "expected");
			r.base_val = want;
			snprintf(r.note, sizeof(r.note), "%s sent %.0f B/push; its format says %.0f",
				 o->netdev, got, want);
			report_add(&r);
		}
	}
	rdmaps_deregister(mr);
	free(g);
	return rc ? -1 : 0;
}
