/*
 * fold.c -- how fast a fold thread can apply gradients, against what the
 * memory of this machine can move: every optimizer srv_optimizer_find()
 * knows (the server's own code, linked in), applied chunk by chunk as
 * server/store.c does, beside a float32 STREAM triad a[i] = b[i] + s*c[i]
 * over arrays of the same size, in the same run, on one thread.
 *
 * Bytes are counted the STREAM way (each array read or written once per
 * pass; no write-allocate traffic): triad 12 B per element, SGD 12 B (param
 * read and written, gradient read), plus 8 B per state float for the others.
 * "grad GB/s" is gradient bytes folded per second, the figure a server
 * sizing cares about. Each row reports its best pass (as STREAM does); the
 * note has the median. The check-* rows time the gradient check the server
 * runs before folding (a copy of server/fold.c's loop) and two cheaper forms.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "checksum.h"
#include "chunk.h"
#include "optimizer.h"

#define FOLD_CHUNK 16384u   /* floats: rdmaps-server's default --chunk-elems */
#define FOLD_MAX_PASSES 4096u

static const char *const opt_names[] = { "sgd", "momentum", "nesterov", "adagrad", "adam", "adamw" };

struct fold_bufs {
	float *a, *b, *c, *state; /* fold: a = param, b = grad, state */
	size_t n;
	uint64_t *pass_ns;
};

SRV_VECTOR_CLONES
static void triad(float *restrict a, const float *restrict b, const float *restrict c, float s,
		  size_t n)
{
	for (size_t i = 0; i < n; i++)
		a[i] = b[i] + s * c[i];
}

/* a += s*b: the access pattern of an SGD fold (read p and g, write p) */
SRV_VECTOR_CLONES
static void axpy(float *restrict a, const float *restrict b, float s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		a[i] += s * b[i];
}

/*
 * The finiteness check server/fold.c (group_check) runs over every staged
 * gradient before folding it, copied here to be measured: a sum of squares
 * in double with one accumulator. Strict IEEE order keeps it scalar and
 * bound by the add latency.
 */
static double check_sumsq(const float *g, size_t n)
{
	double s = 0.0;

	for (size_t i = 0; i < n; i++)
		s += (double)g[i] * (double)g[i];
	return s;
}

/* Proposed: the same sum with 8 independent accumulators (vectorises). */
SRV_VECTOR_CLONES
static double check_sumsq8(const float *g, size_t n)
{
	double acc[8] = { 0 };
	size_t i = 0;

	for (; i + 8 <= n; i += 8)
		for (size_t j = 0; j < 8; j++)
			acc[j] += (double)g[i + j] * (double)g[i + j];
	for (; i < n; i++)
		acc[0] += (double)g[i] * (double)g[i];
	return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* Proposed when the tensor has no clip norm: finite or not, from the bits. */
SRV_VECTOR_CLONES
static double check_finite_bits(const float *g, size_t n)
{
	const uint32_t *u = (const uint32_t *)(const void *)g;
	uint32_t bad = 0;

	for (size_t i = 0; i < n; i++)
		bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
	return bad ? __builtin_inf() : 0.0;
}

enum { FP_CKSUM = 1u << 0, FP_CHECK = 1u << 1, FP_COPY = 1u << 2 };

/* One pass over the whole tensor, a chunk at a time, as the fold thread does:
 * [check the gradient,] apply the optimizer[, checksum the chunk]. */
static uint64_t fold_pass(const struct srv_optimizer *opt, struct fold_bufs *f,
			  const struct rdmaps_wire_hyper *h, uint64_t step, unsigned what)
{
	uint64_t sink = 0;

	for (size_t off = 0; off < f->n; off += FOLD_CHUNK) {
		size_t cnt = f->n - off < FOLD_CHUNK ? f->n - off : FOLD_CHUNK;
		float *state = opt->state_per_param ? f->state + off * opt->state_per_param : NULL;
		if ((what & FP_CHECK) && !__builtin_isfinite(check_sumsq(f->b + off, cnt)))
			continue;
		if (what & FP_COPY) /* two copies: start from the other one (c) */
			memcpy(f->a + off, f->c + off, cnt * sizeof(float));
		opt->apply(f->a + off, state, cnt, f->b + off, cnt, h, step);
		if (what & FP_CKSUM)
			sink ^= rdmaps__checksum(f->a + off, cnt * sizeof(float));
	}
	return sink;
}

static int cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
	return a < b ? -1 : a > b;
}

/* Reference loops: what timed_passes runs when it is given no optimizer. */
enum ref_loop { REF_TRIAD, REF_AXPY, REF_SUMSQ, REF_SUMSQ8, REF_FINITE };

static uint64_t ref_pass(enum ref_loop k, struct fold_bufs *f)
{
	double d = 0;

	switch (k) {
	case REF_TRIAD: triad(f->a, f->b, f->c, 0.5f, f->n); break;
	case REF_AXPY: axpy(f->a, f->b, -1e-3f, f->n); break;
	case REF_SUMSQ: d = check_sumsq(f->b, f->n); break;
	case REF_SUMSQ8: d = check_sumsq8(f->b, f->n); break;
	case REF_FINITE: d = check_finite_bits(f->b, f->n); break;
	}
	return (uint64_t)d;
}

/* Time passes of opt (or of the reference loop ref) until the duration is used. */
static unsigned timed_passes(const struct bench_opts *o, struct fold_bufs *f, enum ref_loop ref,
			     const struct srv_optimizer *opt, unsigned what,
			     const struct rdmaps_wire_hyper *h, uint64_t *best, uint64_t *median)
{
	struct bench_loop l;
	uint64_t t0, t1 = rdmaps__now_ns();
	volatile uint64_t sink = 0;

	if (opt)
		fold_pass(opt, f, h, 0, what); /* warm: page faults, caches */
	else
		ref_pass(ref, f);
	loop_start(&l, o, t1);
	do {
		t0 = rdmaps__now_ns();
		if (opt)
			sink ^= fold_pass(opt, f, h, l.n + 1, what);
		else
			sink ^= ref_pass(ref, f);
		t1 = rdmaps__now_ns();
		f->pass_ns[l.n] = t1 - t0;
	} while (loop_more(&l, t1) && l.n < FOLD_MAX_PASSES);
	(void)sink;
	qsort(f->pass_ns, l.n, sizeof(uint64_t), cmp_u64);
	*best = f->pass_ns[0];
	*median = f->pass_ns[l.n / 2];
	return (unsigned)l.n;
}

static void add_row(const char *op, uint64_t bytes, unsigned passes, uint64_t best,
		    uint64_t median, double traffic_per_grad_byte, const struct bench_row *base,
		    const char *extra)
{
	struct bench_row r = { 0 };

	snprintf(r.group, sizeof(r.group), "fold");
	snprintf(r.op, sizeof(r.op), "%s", op);
	r.size = bytes;
	r.workers = 1;
	r.ops = passes;
	r.seconds = (double)best / 1e9;
	r.gb_s = (double)bytes / (double)best;
	r.traffic_gb_s = r.gb_s * traffic_per_grad_byte;
	if (base) {
		snprintf(r.base_op, sizeof(r.base_op), "%s", base->op);
		r.base_val = base->traffic_gb_s;
		r.ratio = r.traffic_gb_s / base->traffic_gb_s;
	}
	snprintf(r.note, sizeof(r.note), "median %.2f GB/s%s%s",
		 (double)bytes / (double)median * traffic_per_grad_byte, extra ? "; " : "",
		 extra ? extra : "");
	report_add(&r);
}

static int fold_size(const struct bench_opts *o, uint64_t bytes)
{
	struct fold_bufs f = { .n = bytes / sizeof(float) };
	const struct rdmaps_wire_hyper h = { .lr = 1e-3f, .momentum = 0.9f, .beta1 = 0.9f,
					     .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.0f };
	size_t len = rdmaps__round_up(f.n * sizeof(float), 4096);
	uint64_t best, median;
	unsigned passes;
	const struct bench_row *found, *pbase = NULL;
	struct bench_row base = { 0 };
	int rc = -1;

	f.a = aligned_alloc(4096, len);
	f.b = aligned_alloc(4096, len);
	f.c = aligned_alloc(4096, len);
	f.state = aligned_alloc(4096, 2 * len); /* the most any optimizer keeps: 2 per param */
	f.pass_ns = calloc(FOLD_MAX_PASSES, sizeof(uint64_t));
	if (!f.a || !f.b || !f.c || !f.state || !f.pass_ns) {
		fprintf(stderr, "rdmaps-bench: fold: out of memory for %llu B arrays\n",
			(unsigned long long)bytes);
		goto out;
	}
	for (size_t i = 0; i < f.n; i++) {
		f.a[i] = 1.0f;
		f.b[i] = 1e-3f;
		f.c[i] = 2.0f;
	}
	memset(f.state, 0, 2 * len);

	passes = timed_passes(o, &f, REF_TRIAD, NULL, 0, &h, &best, &median);
	add_row("triad", bytes, passes, best, median, 3.0, NULL,
		"STREAM triad a=b+s*c, float32 (the target's reference)");
	/* a copy: later rows may move the report's array */
	if ((found = report_find("fold", "triad", bytes))) {
		base = *found;
		pbase = &base;
	}
	passes = timed_passes(o, &f, REF_AXPY, NULL, 0, &h, &best, &median);
	add_row("axpy", bytes, passes, best, median, 3.0, pbase,
		"a+=s*b: SGD's access pattern, no write-allocate");
	for (size_t k = 0; k < sizeof(opt_names) / sizeof(opt_names[0]); k++) {
		const struct srv_optimizer *opt = srv_optimizer_find(opt_names[k]);
		char name[40];
		double traffic;

		if (!opt) {
			printf("# fold: optimizer '%s' is not implemented in server/ yet: skipped\n",
			       opt_names[k]);
			continue;
		}
		if (opt->check && opt->check(&h)) {
			printf("# fold: optimizer '%s' refuses the benchmark's hyper-parameters: skipped\n",
			       opt_names[k]);
			continue;
		}
		for (size_t i = 0; i < f.n; i++)
			f.a[i] = 1.0f;
		memset(f.state, 0, 2 * len);
		traffic = 3.0 + 2.0 * opt->state_per_param;
		passes = timed_passes(o, &f, REF_TRIAD, opt, 0, &h, &best, &median);
		snprintf(name, sizeof(name), "fold-%s", opt_names[k]);
		add_row(name, bytes, passes, best, median, traffic, pbase, NULL);
		passes = timed_passes(o, &f, REF_TRIAD, opt, FP_CKSUM, &h, &best, &median);
		snprintf(name, sizeof(name), "fold-%s+xxh3", opt_names[k]);
		add_row(name, bytes, passes, best, median, traffic, pbase,
			"apply + checksum per chunk");
		if (strcmp(opt_names[k], "sgd"))
			continue;
		passes = timed_passes(o, &f, REF_TRIAD, opt, FP_CHECK | FP_CKSUM, &h, &best, &median);
		add_row("fold-sgd+check+xxh3", bytes, passes, best, median, traffic, pbase,
			"what server/fold.c does per slot: sum-of-squares check, apply, checksum");
		/* the copy source is one more stream (STREAM counting unchanged):
		 * what two copies cost the fold thread */
		passes = timed_passes(o, &f, REF_TRIAD, opt, FP_COPY | FP_CKSUM, &h, &best, &median);
		add_row("fold-sgd-2copies+xxh3", bytes, passes, best, median, traffic, pbase,
			"two copies (server/store.c): copy the current copy in, apply, checksum");
	}
	/* the gradient check alone: the server's, and two cheaper ways */
	passes = timed_passes(o, &f, REF_SUMSQ, NULL, 0, &h, &best, &median);
	add_row("check-sumsq", bytes, passes, best, median, 1.0, pbase,
		"server/fold.c's finite check (copy): double, 1 accumulator");
	passes = timed_passes(o, &f, REF_SUMSQ8, NULL, 0, &h, &best, &median);
	add_row("check-sumsq-8acc", bytes, passes, best, median, 1.0, pbase,
		"proposed: same sum, 8 accumulators");
	passes = timed_passes(o, &f, REF_FINITE, NULL, 0, &h, &best, &median);
	add_row("check-finite-bits", bytes, passes, best, median, 1.0, pbase,
		"proposed without clip norm: exponent-bit test");
	rc = 0;
out:
	free(f.a);
	free(f.b);
	free(f.c);
	free(f.state);
	free(f.pass_ns);
	return rc;
}

int fold_run(const struct bench_opts *o)
{
	int rc = 0;

	for (unsigned i = 0; i < o->nfold_sizes; i++)
		rc |= fold_size(o, o->fold_sizes[i]);
	return rc ? -1 : 0;
}
