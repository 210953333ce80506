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

static void dense_describe(struct rdmaps_tensor_desc *d)
{
	d->optimizer = RDMAPS_OPT_SGD;
	d->lr = 1e-3f;
	d->init_value = 1.0f;
}

const struct wl_access wl_access_modes[] = {
	[ACCESS_DENSE] = { "dense", dense_describe, rdmaps_pull, rdmaps_push, rdmaps_pull_async,
			   rdmaps_push_async },
};

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
		struct rdmaps_tensor_desc d = { .name = name, .length = o->sizes[i] / sizeof(float) };
		snprintf(name, sizeof(name), "rdmaps-bench.%s.%llu", wl->acc->name,
			 (unsigned long long)o->sizes[i]);
		wl->acc->describe(&d);
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
	wl->nw = o->workers + ((o->parts & PART_TORN) ? 1 : 0);
	wl->w = calloc(wl->nw, sizeof(*wl->w));
	if (!wl->w) {
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
	free(wl->w);
	free(wl);
}
