/*
 * workload.c -- rdmaps itself under load: W worker threads, each with its own
 * rdmaps_client, run one phase at a time (an op at a size) between two
 * barriers; the main thread merges their histograms into a row.
 *
 *   pull          rdmaps_pull with the torn-read check (version + checksum)
 *   pull-relaxed  rdmaps_pull with RDMAPS_PULL_RELAXED (no check)
 *   push          rdmaps_push: returns when the WRITE is acknowledged (staged)
 *   push-folded   rdmaps_push with RDMAPS_PUSH_FOLDED: returns when the
 *                 server folded it and its credit WRITE came back
 *   pushpull      push-folded then pull: one training step, read-your-writes
 *   pull-vs-writer  (torn) checked pulls while one more client pushes to the
 *                 same tensor as fast as it can
 *
 * Every latency is the caller's blocking time: a full round trip.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chunk.h"
#include "workload.h"

const char *const wl_op_name[] = {
	[WL_PULL] = "pull", [WL_PULL_RELAXED] = "pull-relaxed", [WL_PUSH] = "push",
	[WL_PUSH_FOLDED] = "push-folded", [WL_PUSHPULL] = "pushpull", [WL_TORN] = "pull-vs-writer",
};

bool wl_is_push(enum wl_op op)
{
	return op == WL_PUSH || op == WL_PUSH_FOLDED || op == WL_PUSHPULL;
}

int wl_do_op(struct wl_worker *w, enum wl_op op, rdmaps_tensor *t)
{
	const struct wl_access *a = w->wl->acc;
	int rc;

	switch (op) {
	case WL_PULL:
	case WL_TORN:
		return a->pull(w, t, w->dst[0], 0);
	case WL_PULL_RELAXED: return a->pull(w, t, w->dst[0], RDMAPS_PULL_RELAXED);
	case WL_PUSH: return a->push(w, t, w->grad, 0);
	case WL_PUSH_FOLDED: return a->push(w, t, w->grad, RDMAPS_PUSH_FOLDED);
	case WL_PUSHPULL:
		rc = a->push(w, t, w->grad, RDMAPS_PUSH_FOLDED);
		return rc ? rc : a->pull(w, t, w->dst[0], 0);
	}
	return RDMAPS_EINVAL;
}

static int post(struct wl_worker *w, enum wl_op op, rdmaps_tensor *t, unsigned k, rdmaps_op **out)
{
	const struct wl_access *a = w->wl->acc;

	switch (op) {
	case WL_PULL: return a->pull_async(w, t, w->dst[k], 0, out);
	case WL_PULL_RELAXED: return a->pull_async(w, t, w->dst[k], RDMAPS_PULL_RELAXED, out);
	case WL_PUSH: return a->push_async(w, t, w->grad, 0, out);
	case WL_PUSH_FOLDED: return a->push_async(w, t, w->grad, RDMAPS_PUSH_FOLDED, out);
	default: return RDMAPS_EINVAL;
	}
}

static int warm_up(struct wl_worker *w, enum wl_op op, rdmaps_tensor *t)
{
	const struct bench_opts *o = w->wl->o;
	uint64_t start = rdmaps__now_ns();
	int rc = 0;

	for (uint64_t i = 0; !rc && warm_more(o, i, start, rdmaps__now_ns()); i++)
		rc = wl_do_op(w, op == WL_TORN ? WL_PULL : op, t);
	return rc;
}

/* BSP/SSP phases that push end at one clock for every worker: the first
 * to finish names it (its clock plus the SSP bound and one: nobody is that
 * far ahead; BSP members are within one), the others push until they reach
 * it. */
static bool lockstep_more(struct wl_worker *w, enum wl_op op, rdmaps_tensor *t)
{
	uint64_t mine = rdmaps_tensor_clock(t), stop = 0;

	if (!w->wl->acc->lockstep || !wl_is_push(op))
		return false;
	atomic_compare_exchange_strong(&w->wl->stop_clock, &stop, mine + WL_SSP_STALENESS + 1);
	return mine < atomic_load(&w->wl->stop_clock);
}

/* One blocking op after another. */
static int run_blocking(struct wl_worker *w, enum wl_op op, rdmaps_tensor *t)
{
	struct bench_loop l;
	uint64_t a, b;
	int rc = warm_up(w, op, t);

	if (rc)
		return rc;
	rdmaps_client_stats(w->c, &w->s0);
	w->t0 = b = rdmaps__now_ns();
	loop_start(&l, w->wl->o, w->t0);
	if (op == WL_TORN && !w->wl->o->iters && w->wl->o->duration < WL_TORN_MIN_S)
		l.deadline = w->t0 + (uint64_t)(WL_TORN_MIN_S * 1e9); /* rare events: look longer */
	do {
		a = rdmaps__now_ns();
		rc = wl_do_op(w, op, t);
		b = rdmaps__now_ns();
		if (rc)
			break;
		rdmaps__hist_record(&w->hist, b - a);
	} while (loop_more(&l, b) ||
		 (op == WL_TORN && !w->wl->o->iters && l.n < WL_TORN_MIN_OPS &&
		  b - w->t0 < (uint64_t)(WL_TORN_MAX_S * 1e9)) ||
		 lockstep_more(w, op, t));
	w->t1 = b;
	w->n = l.n;
	rdmaps_client_stats(w->c, &w->s1);
	return rc;
}

int wl_async_stream(struct wl_worker *w, enum wl_op op, rdmaps_tensor *t, unsigned depth,
		    struct bench_loop *l)
{
	rdmaps_op *ops[WL_MAX_DEPTH] = { 0 };
	uint64_t posted[WL_MAX_DEPTH], nposted = 0;
	unsigned inflight = 0;
	bool more = true;
	int rc = 0;

	if (l->want && depth > l->want)
		depth = (unsigned)l->want;
	for (unsigned k = 0; k < depth; k++) {
		posted[k] = rdmaps__now_ns();
		if ((rc = post(w, op, t, k, &ops[k])))
			return rc;
		inflight++;
		nposted++;
	}
	while (inflight) {
		for (unsigned k = 0; k < depth; k++) {
			if (!ops[k])
				continue;
			int st = rdmaps_test(ops[k]);
			if (st == RDMAPS_EAGAIN)
				continue;
			uint64_t now = rdmaps__now_ns();
			ops[k] = NULL;
			inflight--;
			if (st) {
				rc = st;
				more = false;
				continue;
			}
			rdmaps__hist_record(&w->hist, now - posted[k]);
			w->t1 = now;
			if (more)
				more = loop_more(l, now);
			else
				l->n++;
			if (more && (!l->want || nposted < l->want)) { /* counted: exactly want */
				posted[k] = now;
				if ((rc = post(w, op, t, k, &ops[k]))) {
					more = false;
					continue;
				}
				inflight++;
				nposted++;
			}
		}
	}
	return rc;
}

/* D ops in flight through the async API. */
static int run_async(struct wl_worker *w, enum wl_op op, rdmaps_tensor *t, unsigned depth)
{
	struct bench_loop l;
	int rc = warm_up(w, op, t);

	if (rc)
		return rc;
	rdmaps_client_stats(w->c, &w->s0);
	w->t0 = w->t1 = rdmaps__now_ns();
	loop_start_bw(&l, w->wl->o, w->t0, w->wl->o->sizes[w->wl->si]);
	rc = wl_async_stream(w, op, t, depth, &l);
	w->n = l.n;
	rdmaps_client_stats(w->c, &w->s1);
	return rc;
}

/* Torn reads: push to the pullers' tensor until every puller is done. */
static int run_writer(struct wl_worker *w, rdmaps_tensor *t)
{
	rdmaps_op *ops[WL_WRITER_DEPTH] = { 0 };
	int rc = 0;

	w->t0 = rdmaps__now_ns();
	while (!rc && atomic_load_explicit(&w->wl->pullers_left, memory_order_acquire)) {
		for (unsigned k = 0; k < WL_WRITER_DEPTH && !rc; k++) {
			if (ops[k]) {
				int st = rdmaps_test(ops[k]);
				if (st == RDMAPS_EAGAIN)
					continue;
				ops[k] = NULL;
				if (st)
					rc = st;
				else
					w->n++;
			}
			if (!rc)
				rc = w->wl->acc->push_async(w, t, w->grad, 0, &ops[k]);
		}
	}
	for (unsigned k = 0; k < WL_WRITER_DEPTH; k++)
		if (ops[k] && rdmaps_wait(ops[k], WL_TIMEOUT_MS) == 0)
			w->n++;
	w->t1 = rdmaps__now_ns();
	return rc;
}

static void run_phase(struct wl_worker *w)
{
	struct wl *wl = w->wl;
	rdmaps_tensor *t = w->t[wl->si];
	int rc;

	w->n = 0;
	w->err = 0;
	rdmaps__hist_reset(&w->hist);
	if (wl->op == WL_TORN) {
		if (w->writer) {
			rc = run_writer(w, t);
		} else {
			rc = run_blocking(w, WL_TORN, t);
			atomic_fetch_sub_explicit(&wl->pullers_left, 1, memory_order_release);
		}
	} else if (w->writer) {
		return; /* only torn-read phases use the writer */
	} else if (wl->depth > 1) {
		rc = run_async(w, wl->op, t, wl->depth);
	} else {
		rc = run_blocking(w, wl->op, t);
	}
	/* start the next phase quiet: every staged push folded (not timed) */
	if (!rc && (wl_is_push(wl->op) || w->writer))
		rc = rdmaps_flush(w->c, WL_TIMEOUT_MS);
	w->err = rc;
}

void *wl_worker_main(void *arg)
{
	struct wl_worker *w = arg;
	struct wl *wl = w->wl;

	for (;;) {
		pthread_barrier_wait(&wl->bar);
		if (wl->quit)
			return NULL;
		run_phase(w);
		pthread_barrier_wait(&wl->bar);
	}
}

/* The raw row an rdmaps row is compared with: name and value. */
static double baseline(const struct wl *wl, unsigned part, enum wl_op op, uint64_t size,
		       char *name, size_t len)
{
	const char *b = NULL;
	const struct bench_row *r, *r2;

	if (wl->o->access != ACCESS_DENSE)
		return 0; /* the raw rows move the bytes a dense op moves: no like */
	if (part == PART_LAT) {
		switch (op) {
		case WL_PULL:
		case WL_PULL_RELAXED: b = "raw-read"; break;
		case WL_PUSH: b = "raw-write-ack"; break;
		case WL_PUSH_FOLDED: b = "raw-write-pp"; break;
		case WL_PUSHPULL:
			r = report_find("lat", "raw-read", size);
			r2 = report_find("lat", "raw-write-pp", size);
			if (!r || !r2)
				return 0;
			snprintf(name, len, "raw-read+write-pp");
			return r->p50 + r2->p50;
		default: return 0;
		}
		r = report_find("lat", b, size);
		snprintf(name, len, "%s", b);
		return r ? r->p50 : 0;
	}
	if (part == PART_BW) {
		b = op == WL_PULL || op == WL_PULL_RELAXED ? "raw-read-bw" : "raw-write-bw";
		r = report_find("bw", b, size);
		snprintf(name, len, "%s", b);
		return r ? r->gb_s : 0;
	}
	return 0;
}

static int phase(struct wl *wl, unsigned part, enum wl_op op, unsigned si, unsigned depth)
{
	const struct bench_opts *o = wl->o;
	uint64_t size = o->sizes[si], t0 = UINT64_MAX, t1 = 0, ops = 0, pulls = 0, retries = 0;
	uint64_t writes = 0;
	struct bench_row r = { 0 };
	int err = 0;
	bool async_missing = depth > 1 && (wl_is_push(op) ? !wl->acc->push_async
							  : !wl->acc->pull_async);
	/* async pushes cannot stop at one clock together (lockstep_more) */
	bool async_lockstep = depth > 1 && wl_is_push(op) && wl->acc->lockstep;
	const char *why = !(wl->acc->only_ops & (1u << op)) ? wl->acc->why_not
			  : async_missing ? "no async form"
			  : async_lockstep ? "async pushes would leave the members at different clocks"
					   : NULL;

	if (why) {
		printf("# %s %s at %llu B (access %s): not run: %s\n",
		       part == PART_LAT ? "lat" : part == PART_BW ? "bw" : "torn", wl_op_name[op],
		       (unsigned long long)size, wl->acc->name, why);
		return 0;
	}

	wl->op = op;
	wl->si = si;
	wl->depth = depth;
	atomic_store(&wl->stop_clock, 0);
	atomic_store(&wl->pullers_left, o->workers);
	pthread_barrier_wait(&wl->bar); /* go */
	pthread_barrier_wait(&wl->bar); /* all done */

	rdmaps__hist_reset(&wl->merged);
	for (unsigned i = 0; i < wl->nw; i++) {
		struct wl_worker *w = &wl->w[i];
		if (w->err && !err)
			err = w->err;
		if (w->writer) {
			writes += w->n;
			continue;
		}
		rdmaps__hist_merge(&wl->merged, &w->hist);
		ops += w->n;
		t0 = w->t0 < t0 ? w->t0 : t0;
		t1 = w->t1 > t1 ? w->t1 : t1;
		pulls += w->s1.pulls - w->s0.pulls;
		retries += w->s1.pull_retries - w->s0.pull_retries;
	}
	if (err) {
		fprintf(stderr, "rdmaps-bench: %s at %llu B: %s\n", wl_op_name[op],
			(unsigned long long)size, rdmaps_strerror(err));
		return -1;
	}
	snprintf(r.group, sizeof(r.group), "%s",
		 part == PART_LAT ? "lat" : part == PART_BW ? "bw" : "torn");
	if (o->access == ACCESS_DENSE)
		snprintf(r.op, sizeof(r.op), "%s", wl_op_name[op]);
	else
		snprintf(r.op, sizeof(r.op), "%s-%s", wl->acc->name, wl_op_name[op]);
	r.size = size;
	r.workers = o->workers;
	r.depth = depth;
	r.ops = ops;
	r.seconds = t1 > t0 ? (double)(t1 - t0) / 1e9 : 0;
	report_lat(&r, &wl->merged);
	r.rtt = RTT_FULL;
	r.ops_s = r.seconds > 0 ? (double)ops / r.seconds : 0;
	if (o->access == ACCESS_SPARSE) { /* what the op really moves: its rows */
		size = (uint64_t)wl->nrows[si] * WL_ROW_DIM * sizeof(float);
		snprintf(r.note, sizeof(r.note), "%zu rows of %zu B, table of %zu", wl->nrows[si],
			 WL_ROW_DIM * sizeof(float), wl_rows_table(o->sizes[si]));
	} else if (o->access != ACCESS_DENSE) {
		snprintf(r.note, sizeof(r.note), "%s tensor, %u member(s)", wl->acc->name, o->workers);
	}
	r.gb_s = r.ops_s * (double)size * (op == WL_PUSHPULL ? 2 : 1) / 1e9;
	r.base_val = baseline(wl, part, op, size, r.base_op, sizeof(r.base_op));
	if (r.base_val > 0)
		r.ratio = part == PART_BW ? r.gb_s / r.base_val : r.p50 / r.base_val;
	else
		r.base_op[0] = '\0';
	if (op == WL_TORN) {
		/* READs a pull makes: a row each (sparse), else a chunk each at
		 * the server's default chunk size */
		uint32_t chunks = o->access == ACCESS_SPARSE
					  ? (uint32_t)wl->nrows[si]
					  : rdmaps__chunk_total(size / sizeof(float), 16384);
		r.retries_frac = pulls ? (double)retries / (double)pulls : 0;
		snprintf(r.note, sizeof(r.note), "(%llu/%llu), %.3f%% of %s READs (%u/pull); writer %.0f pushes/s",
			 (unsigned long long)retries, (unsigned long long)pulls,
			 pulls ? 100.0 * (double)retries / ((double)pulls * chunks) : 0.0,
			 o->access == ACCESS_SPARSE ? "row" : "chunk", chunks,
			 r.seconds > 0 ? (double)writes / r.seconds : 0);
	} else if (op == WL_PULL && pulls && retries) {
		snprintf(r.note, sizeof(r.note), "%llu torn-read retries", (unsigned long long)retries);
	}
	if (part == PART_LAT && op == WL_PUSH_FOLDED)
		snprintf(r.note + strlen(r.note), sizeof(r.note) - strlen(r.note),
			 "%sWRITE+fold+credit WRITE back", r.note[0] ? "; " : "");
	report_add(&r);
	return 0;
}

int wl_measure(struct wl *wl, unsigned part, unsigned si)
{
	const struct bench_opts *o = wl->o;
	int rc = 0;

	if (part == PART_TORN)
		return phase(wl, part, WL_TORN, si, 1);
	if (o->ops & BOP_PULL) {
		rc |= phase(wl, part, WL_PULL, si, part == PART_BW ? o->depth : 1);
		rc |= phase(wl, part, WL_PULL_RELAXED, si, part == PART_BW ? o->depth : 1);
	}
	if (o->ops & BOP_PUSH) {
		rc |= phase(wl, part, WL_PUSH, si, part == PART_BW ? o->depth : 1);
		rc |= phase(wl, part, WL_PUSH_FOLDED, si, part == PART_BW ? o->depth : 1);
	}
	if ((o->ops & BOP_PUSHPULL) && part == PART_LAT)
		rc |= phase(wl, part, WL_PUSHPULL, si, 1);
	return rc ? -1 : 0;
}

