/*
 * paired.c -- paired rows: a raw-verbs op and an rdmaps op alternate in one
 * thread (worker 0's client, while the workers wait at their barrier), their
 * order flipping every pair, so a VM that slows down for a second slows
 * both. Against raw-read-chunk / raw-write-slot (the very work requests
 * librdmaps posts) the ratio is the library's own cost. Bandwidth pairs
 * alternate slices of streams instead of single ops (wl_paired_bw).
 */
#include <stdio.h>
#include <stdlib.h>
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

/*
 * Paired bandwidth. A bandwidth row is a stream, so the pair is of slices
 * of the same number of ops: PAIR_BW_SLICE_BYTES worth, within
 * [PAIR_BW_SLICE_OPS, PAIR_BW_SLICE_MAX_OPS]. First rdmaps pulls (--depth
 * in flight), then raw READs of the same size (--raw-depth in flight, at
 * most the slice), order flipping every pair. Each slice starts empty and
 * ends drained on both sides, so filling and draining the pipe costs both
 * the same. The ratio is of the summed bytes over the summed time of each
 * side; the pairs' own ratios give its spread.
 */
#define PAIR_BW_SLICE_OPS 8u
#define PAIR_BW_SLICE_BYTES (32ull << 20)
#define PAIR_BW_SLICE_MAX_OPS 1024u /* small ops: a slice of 32 MiB of 64 B
				     * pulls would take half a minute */
#define PAIR_BW_MIN_PAIRS 3u
#define PAIR_BW_MAX_PAIRS 512u

struct bw_side {
	uint64_t bytes, ns;
};

static int bw_slice(struct wl *wl, struct raw_bench *rb, rdmaps_tensor *t, bool raw,
		    uint64_t size, uint64_t n, struct bw_side *acc, double *gb_s)
{
	struct wl_worker *w = &wl->w[0];
	uint64_t done, ns;
	int rc;

	if (raw) { /* the stream posts at most the n it is asked for */
		if (raw_bw_slice(rb, size, n, wl->o->raw_depth, &done, &ns))
			return RDMAPS_EVERBS;
	} else {
		struct bench_loop l = { .want = n };
		uint64_t t0 = rdmaps__now_ns();
		if ((rc = wl_async_stream(w, WL_PULL, t, wl->o->depth, &l)))
			return rc;
		done = l.n;
		ns = w->t1 - t0;
	}
	acc->bytes += done * size;
	acc->ns += ns;
	*gb_s = ns ? (double)(done * size) / (double)ns : 0;
	return 0;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

int wl_paired_bw(struct wl *wl, struct raw_bench *rb, unsigned si)
{
	const struct bench_opts *o = wl->o;
	struct wl_worker *w = &wl->w[0];
	rdmaps_tensor *t = w->t[si];
	uint64_t size = o->sizes[si];
	uint64_t n = PAIR_BW_SLICE_BYTES / size;
	double pr[PAIR_BW_MAX_PAIRS], want_s = o->duration;
	struct bw_side mine = { 0 }, raw = { 0 }, scratch = { 0 };
	struct bench_row r = { 0 }, rr = { 0 };
	unsigned pairs = 0, want_pairs = PAIR_BW_MIN_PAIRS;
	uint64_t start, end;
	double g0, g1;
	int rc = 0;

	if (!(o->ops & BOP_PULL))
		return 0;
	if (n < PAIR_BW_SLICE_OPS)
		n = PAIR_BW_SLICE_OPS;
	if (n > PAIR_BW_SLICE_MAX_OPS)
		n = PAIR_BW_SLICE_MAX_OPS;
	/* as the separate bw rows, twice over: each side gets half the time */
	if (size >= (1u << 20) && want_s < BENCH_BW_MIN_S)
		want_s = BENCH_BW_MIN_S;
	want_s *= 2;
	if (o->iters && o->iters / n > want_pairs)
		want_pairs = (unsigned)(o->iters / n);
	if (want_pairs > PAIR_BW_MAX_PAIRS)
		want_pairs = PAIR_BW_MAX_PAIRS;
	/* warm-up: a slice of each, not counted */
	if ((rc = bw_slice(wl, rb, t, false, size, n, &scratch, &g0)) ||
	    (rc = bw_slice(wl, rb, t, true, size, n, &scratch, &g1)))
		goto fail;
	rdmaps__hist_reset(&w->hist);
	start = end = rdmaps__now_ns();
	while (pairs < PAIR_BW_MAX_PAIRS &&
	       (pairs < want_pairs || (!o->iters && end - start < (uint64_t)(want_s * 1e9)))) {
		bool raw_first = pairs & 1u;
		double g_mine, g_raw;
		if ((rc = bw_slice(wl, rb, t, raw_first, size, n, raw_first ? &raw : &mine,
				   raw_first ? &g_raw : &g_mine)) ||
		    (rc = bw_slice(wl, rb, t, !raw_first, size, n, raw_first ? &mine : &raw,
				   raw_first ? &g_mine : &g_raw)))
			goto fail;
		pr[pairs++] = g_raw > 0 ? g_mine / g_raw : 0;
		end = rdmaps__now_ns();
	}
	qsort(pr, pairs, sizeof(pr[0]), cmp_double);

	snprintf(rr.group, sizeof(rr.group), "paired-bw");
	snprintf(rr.op, sizeof(rr.op), "raw-read-bw");
	rr.size = size;
	rr.workers = 1;
	rr.depth = o->raw_depth < n ? o->raw_depth : (unsigned)n;
	rr.ops = raw.bytes / size;
	rr.seconds = (double)raw.ns / 1e9;
	rr.ops_s = rr.seconds > 0 ? (double)rr.ops / rr.seconds : 0;
	rr.gb_s = raw.ns ? (double)raw.bytes / (double)raw.ns : 0;
	rr.rtt = RTT_NONE;
	snprintf(rr.note, sizeof(rr.note), "%u slices of %llu READs, interleaved with pull", pairs,
		 (unsigned long long)n);
	snprintf(r.group, sizeof(r.group), "paired-bw");
	snprintf(r.op, sizeof(r.op), "pull");
	r.size = size;
	r.workers = 1;
	r.depth = o->depth;
	r.ops = mine.bytes / size;
	r.seconds = (double)mine.ns / 1e9;
	report_lat(&r, &w->hist);
	r.rtt = RTT_NONE;
	r.ops_s = r.seconds > 0 ? (double)r.ops / r.seconds : 0;
	r.gb_s = mine.ns ? (double)mine.bytes / (double)mine.ns : 0;
	snprintf(r.base_op, sizeof(r.base_op), "raw-read-bw");
	r.base_val = rr.gb_s;
	r.ratio = rr.gb_s > 0 ? r.gb_s / rr.gb_s : 0;
	snprintf(r.note, sizeof(r.note), "%u pairs of %llu ops; pair ratios %.3f/%.3f/%.3f min/med/max",
		 pairs, (unsigned long long)n, pr[0], pr[pairs / 2], pr[pairs - 1]);
	report_add(&rr);
	report_add(&r);
	return 0;
fail:
	fprintf(stderr, "rdmaps-bench: paired bandwidth at %llu B: %s\n", (unsigned long long)size,
		rdmaps_strerror(rc));
	return -1;
}
