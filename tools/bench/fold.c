/*
 * fold.c -- how fast a fold thread can apply gradients, against what the
 * memory of this machine can move, beside a float32 STREAM triad a[i] =
 * b[i] + s*c[i] over arrays of the same size, in the same run, on one
 * thread. Everything measured is the server's own code, linked in:
 *  - fold-<opt>[+xxh3]: every optimizer srv_optimizer_find() knows, its
 *    apply() alone chunk by chunk over aligned arrays (and srv_checksum of
 *    each chunk after);
 *  - path-*: the whole per-slot path of the fold thread, through the
 *    functions group_check and group_fold call: a tensor from
 *    srv_store_declare, gradients in a "staging" array laid out as slots
 *    (header, then one chunk), taken a group at a time (srv_slot_take:
 *    copied out of the ring and checked) into a private buffer, folded
 *    (srv_chunk_fold: optimizer, checksum, two copies and open folds where
 *    the tensor has them) and published (srv_open_publish);
 *  - take-*: srv_slot_take's copy-and-check alone;
 *  - path-<opt>-<format>: the whole path for a compressed push
 *    (common/gradfmt.h): srv_grad_decode expands the staged payload into the
 *    private buffer, in place of srv_slot_take, then the same fold. Counted
 *    in bytes of the float32 master touched, as the float32 rows, so the
 *    ratios compare.
 *
 * Bytes are counted the STREAM way (each array read or written once per
 * pass; no write-allocate traffic): triad 12 B per element, SGD 12 B (param
 * read and written, gradient read), plus 8 B per state float for the others.
 * The path rows count the same bytes as their optimizer: the staging read,
 * the private copy and the checksum are the path's overhead. "grad GB/s" is
 * gradient bytes folded per second, the figure a server sizing cares about.
 * Each row reports its best pass (as STREAM does); the note has the median.
 * The path-* and take-* rows alternate their passes with triad passes and
 * take their ratio against those (triad-paired: see struct partner); the
 * other rows against the triad row.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "chunk.h"
#include "gradfmt.h"
#include "half.h"
#include "optimizer.h"
#include "server.h"

#define FOLD_CHUNK 16384u   /* floats: rdmaps-server's default --chunk-elems */
#define FOLD_GROUP 16u      /* slots per push group: rdmaps-server's default --slots */
#define FOLD_MAX_PASSES 4096u

static const char *const opt_names[] = { "sgd", "momentum", "nesterov", "adagrad", "adam", "adamw" };

struct fold_bufs {
	float *a, *b, *c, *state; /* fold: a = param, b = grad, state */
	size_t n;
	uint64_t *pass_ns;
};

/* One timed pass: returns something to sink so nothing is optimised out. */
typedef uint64_t (*pass_fn)(void *ctx, uint64_t step);

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

static uint64_t triad_pass(void *ctx, uint64_t step)
{
	struct fold_bufs *f = ctx;

	(void)step;
	triad(f->a, f->b, f->c, 0.5f, f->n);
	return 0;
}

static uint64_t axpy_pass(void *ctx, uint64_t step)
{
	struct fold_bufs *f = ctx;

	(void)step;
	axpy(f->a, f->b, -1e-3f, f->n);
	return 0;
}

/* An optimizer's apply() alone, a chunk at a time, as the fold thread calls
 * it[, then the chunk's checksum]. */
struct apply_ctx {
	struct fold_bufs *f;
	const struct srv_optimizer *opt;
	const struct rdmaps_wire_hyper *h;
	bool cksum;
};

static uint64_t apply_pass(void *ctx, uint64_t step)
{
	struct apply_ctx *x = ctx;
	struct fold_bufs *f = x->f;
	uint64_t sink = 0;

	for (size_t off = 0; off < f->n; off += FOLD_CHUNK) {
		size_t cnt = f->n - off < FOLD_CHUNK ? f->n - off : FOLD_CHUNK;
		float *state = x->opt->state_per_param ? f->state + off * x->opt->state_per_param
						       : NULL;
		x->opt->apply(f->a + off, state, cnt, f->b + off, cnt, x->h, step);
		if (x->cksum)
			sink ^= srv_checksum(f->a + off, cnt * sizeof(float));
	}
	return sink;
}

/* ---- the server's whole fold path --------------------------------------- */

struct path_ctx {
	struct srv_config cfg;
	struct srv_store store;
	struct srv_tensor *t;
	uint8_t *staging; /* nchunks slots of RDMAPS_SLOT_HDR + FOLD_CHUNK floats */
	uint8_t *stage;   /* the fold thread's own copies: FOLD_GROUP slots, as fold.c lays them */
	struct srv_open_set open;
	bool take_only;
	unsigned fmt;	/* RDMAPS__GRAD_*: how the staged payloads are encoded */
	uint32_t *lens; /* each slot's payload bytes */
};

static size_t path_slot_size(void)
{
	return RDMAPS_SLOT_HDR + FOLD_CHUNK * sizeof(float);
}

static void path_close(struct path_ctx *p)
{
	if (p->store.tensors)
		srv_store_fini(&p->store);
	free(p->staging);
	free(p->stage);
	free(p->lens);
	memset(p, 0, sizeof(*p));
}

/* One slot's payload of count gradients of 1e-3 in format fmt (top-k: 1 %
 * of the values, every 100th; sign: alternate signs); its length. */
static uint32_t path_payload(unsigned fmt, uint8_t *out, size_t count)
{
	float *g = (float *)out;
	size_t k = count / 100 ? count / 100 : 1;
	float scale = 1e-3f;

	switch (fmt) {
	case RDMAPS__GRAD_BF16:
	case RDMAPS__GRAD_F16:
		for (size_t i = 0; i < count; i++)
			((uint16_t *)out)[i] = fmt == RDMAPS__GRAD_BF16 ? rdmaps__f32_to_bf16(1e-3f)
									: rdmaps__f32_to_f16(1e-3f);
		if (count % 2)
			((uint16_t *)out)[count] = 0;
		break;
	case RDMAPS__GRAD_TOPK:
		memcpy(out, &(uint32_t){ (uint32_t)k }, 4);
		for (size_t j = 0; j < k; j++) {
			memcpy(out + 4 + 4 * j, &(uint32_t){ (uint32_t)(j * 100) }, 4);
			memcpy(out + 4 + 4 * k + 4 * j, &scale, 4);
		}
		break;
	case RDMAPS__GRAD_SIGN:
		memcpy(out, &scale, 4);
		memset(out + 4, 0, rdmaps__gradfmt_size(fmt, count, 0) - 4);
		for (size_t i = 0; i < count; i += 2)
			out[4 + i / 8] |= (uint8_t)(1u << (i % 8));
		break;
	default:
		for (size_t i = 0; i < count; i++)
			g[i] = 1e-3f;
	}
	return (uint32_t)rdmaps__gradfmt_size(fmt, count, k);
}

/* A tensor of n floats as a worker would declare it, and its staged pushes. */
static int path_open(struct path_ctx *p, const char *opt, size_t n, bool two_copies, float clip,
		     const struct rdmaps_wire_hyper *h, unsigned fmt)
{
	struct rdmaps_msg_declare m = { .length = n, .init_value = 1.0f, .hyper = *h };
	size_t slots = (n + FOLD_CHUNK - 1) / FOLD_CHUNK;
	bool created;

	memset(p, 0, sizeof(*p));
	p->cfg = (struct srv_config){ .max_tensors = 1, .chunk_elems = FOLD_CHUNK, .slots = FOLD_GROUP,
				      .max_tensor_bytes = UINT64_MAX, .max_total_bytes = UINT64_MAX,
				      .two_copies_min = two_copies ? 4096 : 0 };
	m.cons.clip_norm = clip;
	snprintf(m.optimizer, sizeof(m.optimizer), "%s", opt);
	snprintf(m.name, sizeof(m.name), "bench");
	if (srv_store_init(&p->store, &p->cfg) ||
	    srv_store_declare(&p->store, &m, NULL, &p->t, &created))
		goto fail;
	p->staging = aligned_alloc(4096, rdmaps__round_up(slots * path_slot_size(), 4096));
	p->stage = aligned_alloc(RDMAPS_CHUNK_ALIGN, srv_stage_bytes(&p->cfg));
	p->lens = calloc(slots, sizeof(uint32_t));
	if (!p->staging || !p->stage || !p->lens)
		goto fail;
	p->fmt = fmt;
	for (size_t s = 0; s < slots; s++)
		p->lens[s] = path_payload(fmt, p->staging + s * path_slot_size() + RDMAPS_SLOT_HDR,
					  rdmaps__chunk_count(n, FOLD_CHUNK, (uint32_t)s));
	return 0;
fail:
	fprintf(stderr, "rdmaps-bench: fold: cannot make a %zu-float %s tensor\n", n, opt);
	path_close(p);
	return -1;
}

/* One push of the whole tensor, group by group, as group_check and
 * group_fold do it (the headers, already validated there, are made here).
 * The fold thread publishes open two-copy folds at the end of a poll batch
 * (up to 32 completions: two such groups); here after each group. */
static uint64_t path_pass(void *ctx, uint64_t step)
{
	struct path_ctx *p = ctx;
	struct srv_tensor *t = p->t;
	uint64_t sink = 0;

	(void)step;
	for (uint32_t c0 = 0; c0 < t->nchunks; c0 += FOLD_GROUP) {
		uint32_t g = t->nchunks - c0 < FOLD_GROUP ? t->nchunks - c0 : FOLD_GROUP;
		for (uint32_t k = 0; k < g; k++) {
			struct rdmaps_slot_hdr h = {
				.chunk = c0 + k, .scale = 1.0f,
				.count = rdmaps__chunk_count(t->length, t->chunk_elems, c0 + k),
				.flags = (uint16_t)(p->fmt << RDMAPS_SLOT_FMT_SHIFT) };
			const char *why;
			double ss = 0;
			void *dst = srv_stage_slot(p->stage, &p->cfg, k);
			const uint8_t *src = p->staging + (size_t)(c0 + k) * path_slot_size() +
					     RDMAPS_SLOT_HDR;
			/* the fold thread's own take, format and all */
			if (srv_slot_take(t, &h, dst, src, p->lens[c0 + k], &ss, &why))
				return UINT64_MAX; /* the gradients are well formed: never */
			sink += (uint64_t)ss;
		}
		if (p->take_only)
			continue;
		for (uint32_t k = 0; k < g; k++)
			srv_chunk_fold(t, c0 + k, srv_stage_slot(p->stage, &p->cfg, k),
				       rdmaps__chunk_count(t->length, t->chunk_elems, c0 + k), &p->open);
		srv_open_publish(&p->open);
	}
	return sink;
}

/* ---- timing and rows ------------------------------------------------------ */

static int cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
	return a < b ? -1 : a > b;
}

/*
 * Another pass timed in alternation with a row's own, one of each in turn
 * (paired rows): on a shared host the memory bandwidth a thread gets drifts
 * by 30 % within a minute, so a ratio between two rows timed apart says as
 * much about the drift as about the code. Both see the same moments here.
 */
struct partner {
	pass_fn pass;
	void *ctx;
	uint64_t best;
};

/* Time passes until the duration is used; best and median pass (and the
 * partner's best pass). */
static unsigned timed_passes(const struct bench_opts *o, uint64_t *pass_ns, pass_fn pass,
			     void *ctx, struct partner *pt, uint64_t *best, uint64_t *median)
{
	struct bench_loop l;
	uint64_t t0, t1;
	volatile uint64_t sink = 0;

	sink ^= pass(ctx, 0); /* warm: page faults, caches; not part of the duration */
	if (pt) {
		sink ^= pt->pass(pt->ctx, 0);
		pt->best = UINT64_MAX;
	}
	t1 = rdmaps__now_ns();
	loop_start(&l, o, t1);
	do {
		if (pt) {
			t0 = rdmaps__now_ns();
			sink ^= pt->pass(pt->ctx, l.n + 1);
			t1 = rdmaps__now_ns();
			pt->best = t1 - t0 < pt->best ? t1 - t0 : pt->best;
		}
		t0 = rdmaps__now_ns();
		sink ^= pass(ctx, l.n + 1);
		t1 = rdmaps__now_ns();
		pass_ns[l.n] = t1 - t0;
	} while (loop_more(&l, t1) && l.n < FOLD_MAX_PASSES);
	(void)sink;
	qsort(pass_ns, l.n, sizeof(uint64_t), cmp_u64);
	*best = pass_ns[0];
	*median = pass_ns[l.n / 2];
	return (unsigned)l.n;
}

/* A row; its ratio is against base_gb_s (STREAM traffic) of base_op, if any. */
static void add_row(const char *op, uint64_t bytes, unsigned passes, uint64_t best,
		    uint64_t median, double traffic_per_grad_byte, const char *base_op,
		    double base_gb_s, const char *extra)
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
	if (base_op && base_gb_s > 0) {
		snprintf(r.base_op, sizeof(r.base_op), "%s", base_op);
		r.base_val = base_gb_s;
		r.ratio = r.traffic_gb_s / base_gb_s;
	}
	snprintf(r.note, sizeof(r.note), "median %.2f GB/s%s%s",
		 (double)bytes / (double)median * traffic_per_grad_byte, extra ? "; " : "",
		 extra ? extra : "");
	report_add(&r);
}

/* add_row against a row of the report (the triad of this size), if any */
static void add_row_vs(const char *op, uint64_t bytes, unsigned passes, uint64_t best,
		       uint64_t median, double traffic_per_grad_byte, const struct bench_row *base,
		       const char *extra)
{
	add_row(op, bytes, passes, best, median, traffic_per_grad_byte, base ? base->op : NULL,
		base ? base->traffic_gb_s : 0, extra);
}

/* The whole-path rows: take-* time srv_slot_take alone. */
static const struct path_spec {
	const char *op, *opt;
	bool two_copies;
	float clip;
	const char *note;
	unsigned fmt; /* RDMAPS__GRAD_*: F32 unless named */
} path_specs[] = {
	{ "path-sgd", "sgd", false, 0.0f, "take + srv_chunk_fold, one copy, groups of 16 slots" },
	{ "path-adam", "adam", false, 0.0f, "take + srv_chunk_fold, one copy, groups of 16 slots" },
	{ "path-sgd-2copies", "sgd", true, 0.0f, "two copies (ASP from 4 KiB): copy, apply, publish" },
	{ "path-adam-2copies", "adam", true, 0.0f, "two copies (ASP from 4 KiB): copy, apply, publish" },
	{ "path-sgd-clip", "sgd", false, 1e30f, "one copy, a clip norm: the take sums squares" },
	{ "take-finite", "sgd", false, 0.0f, "srv_slot_take alone: copy + finite-bit test" },
	{ "take-sumsq", "sgd", false, 1e30f, "srv_slot_take alone, clip norm: copy + sum of squares" },
#define PATH_FMT(o, f, F) \
	{ "path-" o "-" f, o, false, 0.0f, "srv_grad_decode (" f ") + srv_chunk_fold", RDMAPS__GRAD_##F }
	PATH_FMT("sgd", "bf16", BF16), PATH_FMT("sgd", "fp16", F16),
	PATH_FMT("sgd", "topk1", TOPK), PATH_FMT("sgd", "sign", SIGN),
	PATH_FMT("adam", "bf16", BF16), PATH_FMT("adam", "fp16", F16),
	PATH_FMT("adam", "topk1", TOPK), PATH_FMT("adam", "sign", SIGN),
#undef PATH_FMT
};

/* One row of the whole path on a fresh tensor of the row's size, its passes
 * paired with triad passes over f (its ratio is against those). */
static void path_row(const struct bench_opts *o, struct fold_bufs *f, uint64_t bytes,
		     const struct rdmaps_wire_hyper *h, const struct path_spec *ps)
{
	const struct srv_optimizer *so = srv_optimizer_find(ps->opt);
	struct partner triad = { .pass = triad_pass, .ctx = f };
	struct path_ctx p;
	uint64_t best, median;
	unsigned passes;

	if (!so || path_open(&p, ps->opt, f->n, ps->two_copies, ps->clip, h, ps->fmt))
		return;
	p.take_only = !strncmp(ps->op, "take-", 5);
	passes = timed_passes(o, f->pass_ns, path_pass, &p, &triad, &best, &median);
	/* take-*: the copy is read once and written once */
	add_row(ps->op, bytes, passes, best, median,
		p.take_only ? 2.0 : 3.0 + 2.0 * so->state_per_param, "triad-paired",
		(double)bytes * 3.0 / (double)triad.best, ps->note);
	path_close(&p);
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

	passes = timed_passes(o, f.pass_ns, triad_pass, &f, NULL, &best, &median);
	add_row_vs("triad", bytes, passes, best, median, 3.0, NULL,
		"STREAM triad a=b+s*c, float32 (the target's reference)");
	/* a copy: later rows may move the report's array */
	if ((found = report_find("fold", "triad", bytes))) {
		base = *found;
		pbase = &base;
	}
	passes = timed_passes(o, f.pass_ns, axpy_pass, &f, NULL, &best, &median);
	add_row_vs("axpy", bytes, passes, best, median, 3.0, pbase,
		"a+=s*b: SGD's access pattern, no write-allocate");
	for (size_t k = 0; k < sizeof(opt_names) / sizeof(opt_names[0]); k++) {
		struct apply_ctx x = { .f = &f, .opt = srv_optimizer_find(opt_names[k]), .h = &h };
		char name[40];
		double traffic;

		if (!x.opt) {
			printf("# fold: optimizer '%s' is not implemented in server/ yet: skipped\n",
			       opt_names[k]);
			continue;
		}
		if (x.opt->check && x.opt->check(&h)) {
			printf("# fold: optimizer '%s' refuses the benchmark's hyper-parameters: skipped\n",
			       opt_names[k]);
			continue;
		}
		for (size_t i = 0; i < f.n; i++)
			f.a[i] = 1.0f;
		memset(f.state, 0, 2 * len);
		traffic = 3.0 + 2.0 * x.opt->state_per_param;
		passes = timed_passes(o, f.pass_ns, apply_pass, &x, NULL, &best, &median);
		snprintf(name, sizeof(name), "fold-%s", opt_names[k]);
		add_row_vs(name, bytes, passes, best, median, traffic, pbase, NULL);
		x.cksum = true;
		passes = timed_passes(o, f.pass_ns, apply_pass, &x, NULL, &best, &median);
		snprintf(name, sizeof(name), "fold-%s+xxh3", opt_names[k]);
		add_row_vs(name, bytes, passes, best, median, traffic, pbase,
			   "apply, then checksum, per chunk");
	}
	for (size_t k = 0; k < sizeof(path_specs) / sizeof(path_specs[0]); k++)
		path_row(o, &f, bytes, &h, &path_specs[k]);
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
