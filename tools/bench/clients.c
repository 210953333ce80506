/*
 * clients.c -- the workload's connections: one rdmaps_client per worker
 * (and one for the torn-read writer), the benchmark tensors declared on
 * each, and registered pull/push buffers, all made before anything is
 * measured. Also the access patterns (struct wl_access).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chunk.h"
#include "workload.h"

static void dense_describe(const struct wl *wl, uint64_t size, struct rdmaps_tensor_desc *d)
{
	(void)wl;
	d->length = size / sizeof(float);
	d->optimizer = RDMAPS_OPT_SGD;
	d->lr = 1e-3f;
	d->init_value = 1.0f;
}

/* BSP / SSP: every benchmark worker a member; clock 0 waits for all of them */
static void bsp_describe(const struct wl *wl, uint64_t size, struct rdmaps_tensor_desc *d)
{
	dense_describe(wl, size, d);
	d->consistency = RDMAPS_BSP;
	d->workers = wl->o->workers;
}

static void ssp_describe(const struct wl *wl, uint64_t size, struct rdmaps_tensor_desc *d)
{
	dense_describe(wl, size, d);
	d->consistency = RDMAPS_SSP;
	d->staleness = WL_SSP_STALENESS;
	d->workers = wl->o->workers;
}

size_t wl_rows_per_op(uint64_t size)
{
	size_t n = size / (WL_ROW_DIM * sizeof(float));
	return n ? n : 1;
}

size_t wl_rows_table(uint64_t size)
{
	size_t table = wl_rows_per_op(size) * WL_ROW_SPREAD;
	return table < WL_ROW_MIN_TABLE ? WL_ROW_MIN_TABLE : table;
}

static void sparse_describe(const struct wl *wl, uint64_t size, struct rdmaps_tensor_desc *d)
{
	dense_describe(wl, size, d);
	d->row_dim = WL_ROW_DIM;
	d->length = wl_rows_table(size) * WL_ROW_DIM;
}

static int dense_pull(struct wl_worker *w, rdmaps_tensor *t, float *dst, unsigned flags)
{
	return rdmaps_pull(w->c, t, dst, flags);
}

static int dense_push(struct wl_worker *w, rdmaps_tensor *t, const float *g, unsigned flags)
{
	return rdmaps_push(w->c, t, g, flags);
}

static int sparse_pull(struct wl_worker *w, rdmaps_tensor *t, float *dst, unsigned flags)
{
	unsigned si = w->wl->si;
	return rdmaps_pull_rows(w->c, t, w->wl->rows[si], w->wl->nrows[si], dst, flags);
}

static int sparse_push(struct wl_worker *w, rdmaps_tensor *t, const float *g, unsigned flags)
{
	unsigned si = w->wl->si;
	return rdmaps_push_rows(w->c, t, w->wl->rows[si], w->wl->nrows[si], g, flags);
}

static int dense_pull_async(struct wl_worker *w, rdmaps_tensor *t, float *dst, unsigned flags,
			    rdmaps_op **op)
{
	return rdmaps_pull_async(w->c, t, dst, flags, op);
}

static int dense_push_async(struct wl_worker *w, rdmaps_tensor *t, const float *g,
			    unsigned flags, rdmaps_op **op)
{
	return rdmaps_push_async(w->c, t, g, flags, op);
}

static int sparse_pull_async(struct wl_worker *w, rdmaps_tensor *t, float *dst, unsigned flags,
			     rdmaps_op **op)
{
	unsigned si = w->wl->si;
	return rdmaps_pull_rows_async(w->c, t, w->wl->rows[si], w->wl->nrows[si], dst, flags, op);
}

static int sparse_push_async(struct wl_worker *w, rdmaps_tensor *t, const float *g,
			     unsigned flags, rdmaps_op **op)
{
	unsigned si = w->wl->si;
	return rdmaps_push_rows_async(w->c, t, w->wl->rows[si], w->wl->nrows[si], g, flags, op);
}

#define OPS(x) (1u << (x))
#define ALL_OPS (OPS(WL_PULL) | OPS(WL_PULL_RELAXED) | OPS(WL_PUSH) | OPS(WL_PUSH_FOLDED) | \
		 OPS(WL_PUSHPULL) | OPS(WL_TORN))

const struct wl_access wl_access_modes[] = {
	[ACCESS_DENSE] = { "dense", dense_describe, dense_pull, dense_push, dense_pull_async,
			   dense_push_async, ALL_OPS, NULL },
	[ACCESS_SPARSE] = { "sparse", sparse_describe, sparse_pull, sparse_push, sparse_pull_async,
			    sparse_push_async, ALL_OPS, NULL },
	/* a BSP member pushes once per clock and pulls in between: only pulls
	 * and whole steps (the torn writer would be a member that never pulls) */
	[ACCESS_BSP] = { "bsp", bsp_describe, dense_pull, dense_push, dense_pull_async, NULL,
			 OPS(WL_PULL) | OPS(WL_PULL_RELAXED) | OPS(WL_PUSHPULL),
			 "a BSP worker pushes once per clock, with a pull in between", true },
	/* pushes alone let the members drift apart without bound, and the next
	 * phase's pulls would wait for the slowest (or evict it) */
	[ACCESS_SSP] = { "ssp", ssp_describe, dense_pull, dense_push, dense_pull_async, NULL,
			 OPS(WL_PULL) | OPS(WL_PULL_RELAXED) | OPS(WL_PUSHPULL),
			 "an SSP phase of pushes alone would leave the members clocks apart", true },
};

/* sparse: one fixed set of distinct random rows per size, shared by all */
static int rows_init(struct wl *wl)
{
	const struct bench_opts *o = wl->o;
	uint64_t seed = 0x9e3779b97f4a7c15ull;

	for (unsigned i = 0; i < o->nsizes; i++) {
		size_t n = wl_rows_per_op(o->sizes[i]), table = wl_rows_table(o->sizes[i]);
		uint64_t *perm = malloc(table * sizeof(*perm));
		if (!perm)
			return RDMAPS_ENOMEM;
		for (size_t r = 0; r < table; r++)
			perm[r] = r;
		for (size_t r = 0; r < n; r++) { /* partial Fisher-Yates: n distinct rows */
			seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
			size_t j = r + (size_t)(seed % (table - r));
			uint64_t x = perm[r];
			perm[r] = perm[j];
			perm[j] = x;
		}
		wl->rows[i] = perm;
		wl->nrows[i] = n;
	}
	return 0;
}

static int worker_open(struct wl *wl, struct wl_worker *w, const struct bench_target *tg,
		       uint64_t max_bytes)
{
	const struct bench_opts *o = wl->o;
	struct rdmaps_connect_opts co = { .host = tg->host, .port = tg->port, .src_addr = tg->src,
					  .token = tg->token, .timeout_ms = 20000 };
	size_t len = rdmaps__round_up(max_bytes, 4096);
	int rc = rdmaps_connect(&co, &w->c);

	if (rc) {
		fprintf(stderr, "rdmaps-bench: connect to %s port %s: %s\n", tg->host, tg->port,
			rdmaps_strerror(rc));
		return rc;
	}
	for (unsigned i = 0; i < o->nsizes; i++) {
		char name[RDMAPS_NAME_MAX + 1];
		struct rdmaps_tensor_desc d = { .name = name };
		snprintf(name, sizeof(name), "rdmaps-bench.%s.%llu", wl->acc->name,
			 (unsigned long long)o->sizes[i]);
		wl->acc->describe(wl, o->sizes[i], &d);
		if ((rc = rdmaps_declare(w->c, &d, &w->t[i]))) {
			fprintf(stderr, "rdmaps-bench: declare %s: %s\n", name, rdmaps_strerror(rc));
			return rc;
		}
	}
	w->ndst = (o->parts & PART_BW) && !w->writer ? o->depth : 1;
	w->grad = aligned_alloc(4096, len);
	if (!w->grad)
		return RDMAPS_ENOMEM;
	for (size_t i = 0; i < len / sizeof(float); i++)
		w->grad[i] = 1e-3f;
	for (unsigned k = 0; k < w->ndst; k++) {
		w->dst[k] = aligned_alloc(4096, len);
		if (!w->dst[k])
			return RDMAPS_ENOMEM;
		memset(w->dst[k], 0, len);
	}
	if (o->unregistered)
		return 0;
	if ((rc = rdmaps_register(w->c, w->grad, len, &w->mr[0])))
		return rc;
	for (unsigned k = 0; k < w->ndst; k++)
		if ((rc = rdmaps_register(w->c, w->dst[k], len, &w->mr[k + 1])))
			return rc;
	return 0;
}

int wl_open(const struct bench_opts *o, const struct bench_target *tg, struct wl **out)
{
	struct wl *wl = calloc(1, sizeof(*wl));
	uint64_t max = 0;
	int rc = 0;

	if (!wl)
		return RDMAPS_ENOMEM;
	wl->o = o;
	wl->acc = &wl_access_modes[o->access];
	wl->nw = o->workers +
		 ((o->parts & PART_TORN) && (wl->acc->only_ops & OPS(WL_TORN)) ? 1 : 0);
	wl->w = calloc(wl->nw, sizeof(*wl->w));
	if (!wl->w || (o->access == ACCESS_SPARSE && rows_init(wl))) {
		for (unsigned i = 0; i < BENCH_MAX_SIZES; i++)
			free(wl->rows[i]);
		free(wl->w);
		free(wl);
		return RDMAPS_ENOMEM;
	}
	for (unsigned i = 0; i < o->nsizes; i++)
		max = o->sizes[i] > max ? o->sizes[i] : max;
	for (unsigned i = 0; i < wl->nw && !rc; i++) {
		wl->w[i].wl = wl;
		wl->w[i].idx = i;
		wl->w[i].writer = i >= o->workers;
		rc = worker_open(wl, &wl->w[i], tg, max);
	}
	if (!rc) {
		pthread_barrier_init(&wl->bar, NULL, wl->nw + 1);
		for (unsigned i = 0; i < wl->nw; i++)
			if (pthread_create(&wl->w[i].th, NULL, wl_worker_main, &wl->w[i]))
				abort(); /* half a barrier would hang every phase */
		wl->threads_up = true;
	}
	if (rc) {
		wl_close(wl);
		return rc;
	}
	*out = wl;
	return 0;
}

void wl_close(struct wl *wl)
{
	if (!wl)
		return;
	if (wl->threads_up) {
		wl->quit = true;
		pthread_barrier_wait(&wl->bar);
		for (unsigned i = 0; i < wl->nw; i++)
			pthread_join(wl->w[i].th, NULL);
		pthread_barrier_destroy(&wl->bar);
	}
	for (unsigned i = 0; i < wl->nw; i++) {
		struct wl_worker *w = &wl->w[i];
		rdmaps_close(w->c); /* frees registrations and tensor handles */
		free(w->grad);
		for (unsigned k = 0; k < w->ndst; k++)
			free(w->dst[k]);
	}
	for (unsigned i = 0; i < BENCH_MAX_SIZES; i++)
		free(wl->rows[i]);
	free(wl->w);
	free(wl);
}
