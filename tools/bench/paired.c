/*
 * paired.c -- paired rows: a raw-verbs op and an rdmaps op alternate in one
 * thread (worker 0's client, while the workers wait at their barrier), their
 * order flipping every pair, so a VM that slows down for a second slows
 * both. Against raw-read-chunk / raw-write-slot (the very work requests
 * librdmaps posts) the ratio is the library's own cost.
 */
#include <stdio.h>
#include <string.h>

#include "workload.h"

static int pair_one(struct wl *wl, struct raw_bench *rb, enum wl_op op, rdmaps_tensor *t,
		    uint64_t i)
{
	struct wl_worker *w = &wl->w[0];
	uint64_t a, b, c;
	int rc;

	a = rdmaps__now_ns();
	rc = (i & 1) ? wl_do_op(w, op, t) : raw_pair_one(rb);
	b = rdmaps__now_ns();
	if (!rc)
		rc = (i & 1) ? raw_pair_one(rb) : wl_do_op(w, op, t);
	c = rdmaps__now_ns();
	if (rc)
		return rc;
	rdmaps__hist_record((i & 1) ? &w->hist : &wl->pair_raw, b - a);
	rdmaps__hist_record((i & 1) ? &wl->pair_raw : &w->hist, c - b);
	return 0;
}

static int pair_run(struct wl *wl, struct raw_bench *rb, enum wl_op op, const char *raw_op,
		    unsigned si)
{
	const struct bench_opts *o = wl->o;
	struct wl_worker *w = &wl->w[0];
	rdmaps_tensor *t = w->t[si];
	uint64_t size = o->sizes[si], start, end = 0;
	struct bench_row r = { 0 }, rr = { 0 };
	struct bench_loop l;
	int rc;

	if (raw_pair_begin(rb, raw_op, size))
		return -1;
	start = rdmaps__now_ns();
	rc = 0;
	for (uint64_t i = 0; !rc && warm_more(o, i, start, rdmaps__now_ns()); i++)
		rc = pair_one(wl, rb, op, t, i);
	rdmaps__hist_reset(&w->hist);
	rdmaps__hist_reset(&wl->pair_raw);
	start = rdmaps__now_ns();
	loop_start(&l, o, start);
	while (!rc) {
		rc = pair_one(wl, rb, op, t, l.n);
		end = rdmaps__now_ns();
		if (!rc && !loop_more(&l, end))
			break;
	}
	if (raw_pair_end(rb) && !rc)
		rc = RDMAPS_EVERBS;
	if (!rc && wl_is_push(op))
		rc = rdmaps_flush(w->c, WL_TIMEOUT_MS);
	if (rc) {
		fprintf(stderr, "rdmaps-bench: paired %s/%s at %llu B: %s\n", wl_op_name[op], raw_op,
			(unsigned long long)size, rdmaps_strerror(rc));
		return -1;
	}
	/* raw twin first, as in the lat section */
	snprintf(rr.group, sizeof(rr.group), "paired");
	snprintf(rr.op, sizeof(rr.op), "%s", raw_op);
	rr.size = size;
	rr.workers = rr.depth = 1;
	rr.ops = l.n;
	rr.seconds = (double)(end - start) / 1e9;
	report_lat(&rr, &wl->pair_raw);
	rr.rtt = RTT_FULL;
	snprintf(rr.note, sizeof(rr.note), "interleaved with %s", wl_op_name[op]);
	r = rr;
	snprintf(r.op, sizeof(r.op), "%s", wl_op_name[op]);
	report_lat(&r, &w->hist);
	snprintf(r.base_op, sizeof(r.base_op), "%s", raw_op);
	r.base_val = rr.p50;
	r.ratio = rr.p50 > 0 ? r.p50 / rr.p50 : 0;
	snprintf(r.note, sizeof(r.note), "interleaved with %s", raw_op);
	report_add(&rr);
	report_add(&r);
	return 0;
}

int wl_paired(struct wl *wl, struct raw_bench *rb, unsigned si)
{
	const struct bench_opts *o = wl->o;
	int rc = 0;

	/* the target pairs, then the diagnostic ones: against the very same
	 * work requests librdmaps posts, the ratio is the library's own cost */
	if (o->ops & BOP_PULL) {
		rc |= pair_run(wl, rb, WL_PULL, "raw-read", si);
		rc |= pair_run(wl, rb, WL_PULL_RELAXED, "raw-read", si);
		rc |= pair_run(wl, rb, WL_PULL, "raw-read-span", si);
		rc |= pair_run(wl, rb, WL_PULL, "raw-read-chunk", si);
	}
	if (o->ops & BOP_PUSH) {
		rc |= pair_run(wl, rb, WL_PUSH, "raw-write-ack", si);
		rc |= pair_run(wl, rb, WL_PUSH, "raw-write-slot", si);
	}
	return rc ? -1 : 0;
}

