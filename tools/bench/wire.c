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

int wl_wire(struct wl *wl, unsigned si)
{
	const struct bench_opts *o = wl->o;
	struct wl_worker *w = &wl->w[0];
	uint64_t size = o->sizes[si], n = size / sizeof(float), start, end = 0;
	rdmaps_tensor *t[NFMT] = { 0 };
	static struct rdmaps_hist hist[NFMT]; /* 58 KiB each: not on the stack */
	uint64_t bytes[NFMT] = { 0 };
	float *g = NULL;
	rdmaps_mr *mr = NULL;
	struct bench_loop l;
	int rc = 0;

	if (!n)
		return 0;
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
			uint64_t a = rdmaps__now_ns();
			rc = rdmaps_push(w->c, t[f], g, 0);
			uint64_t b = rdmaps__now_ns();
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
			report_add(&r);
		}
	}
	rdmaps_deregister(mr);
	free(g);
	return rc ? -1 : 0;
}
