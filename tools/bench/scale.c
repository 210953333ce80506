/*
 * scale.c -- one server, many workers: for each W of --scale (default
 * 1,4,16,64,256) the run grows to W worker connections (threads, each its
 * own rdmaps_client, connecting 8 at a time) beside an observer client, and
 * measures
 *   connect   per worker: connect + looking up the model, p50/p99; the
 *             step's wall time;
 *   memory    what the server holds: registered bytes, MRs, windows, rings
 *             (its stats) and, for a server this run started, VmRSS and
 *             VmPin; the ratio of VmPin to model + W rings + 64 MiB;
 *   idle      the observer's 64 B pull and 64 KiB pull with the W workers
 *             connected and idle;
 *   load      min(W, 32) workers pushing 64 KiB gradients into one tensor
 *             flat out: folds/s (the server's count), and the observer's
 *             64 KiB pulls of that tensor meanwhile: p50/p99, torn-read
 *             retries per pull and the most READs one pull needed.
 * The model is 64 MiB in four tensors, which every worker looks up (the
 * server makes a tensor readable to a worker at its lookup).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

#define SC_MAX 1024u
#define SC_THREADS 8u
#define SC_PUSHERS 32u
#define SC_MODEL_TENSORS 4u
#define SC_MODEL_ELEMS (4u << 20) /* 16 MiB each: 64 MiB */
#define SC_HOT_ELEMS 16384u       /* 64 KiB: one chunk at the default size */
#define SC_PROBE_ELEMS 16u        /* 64 B */

struct sc_worker {
	rdmaps_client *c;
	rdmaps_tensor *hot;
	uint64_t connect_ns;
	uint64_t pushes;
	int err;
};

struct sc {
	const struct bench_opts *o;
	const struct bench_target *tg;
	int server_pid; /* 0: not ours, no /proc to read */
	struct sc_worker w[SC_MAX];
	unsigned n;     /* connected so far */
	rdmaps_client *obs;
	rdmaps_tensor *probe, *hot;
	/* a step's share of work, for the threads */
	unsigned from, to;
	volatile bool stop;
};

static const char *model_name(unsigned i)
{
	static const char *const names[SC_MODEL_TENSORS] = { "scale-m0", "scale-m1", "scale-m2",
							     "scale-m3" };
	return names[i];
}

static int sc_connect(const struct bench_target *tg, rdmaps_client **c)
{
	struct rdmaps_connect_opts co = { .host = tg->host, .port = tg->port, .src_addr = tg->src,
					  .token = tg->token, .timeout_ms = 30000 };
	return rdmaps_connect(&co, c);
}

struct sc_share {
	struct sc *s;
	unsigned idx;
};

/* Thread: connect every SC_THREADS-th new worker and look the model up. */
static void *connect_some(void *arg)
{
	struct sc_share *sh = arg;
	struct sc *s = sh->s;

	for (unsigned i = s->from + sh->idx; i < s->to; i += SC_THREADS) {
		struct sc_worker *w = &s->w[i];
		uint64_t t0 = rdmaps__now_ns();
		rdmaps_tensor *t;
		w->err = sc_connect(s->tg, &w->c);
		for (unsigned k = 0; !w->err && k < SC_MODEL_TENSORS; k++)
			w->err = rdmaps_lookup(w->c, model_name(k), &t);
		if (!w->err)
			w->err = rdmaps_lookup(w->c, "scale-hot", &w->hot);
		w->connect_ns = rdmaps__now_ns() - t0;
	}
	return NULL;
}

/* Thread: one pusher, flat out until told to stop. */
static void *push_flat_out(void *arg)
{
	struct sc_share *sh = arg;
	struct sc *s = sh->s;
	struct sc_worker *w = &s->w[sh->idx];
	static _Thread_local float g[SC_HOT_ELEMS]; /* zeros: the model stays put */

	w->pushes = 0;
	while (!s->stop && !w->err) {
		w->err = rdmaps_push(w->c, w->hot, g, 0);
		w->pushes++;
	}
	if (!w->err)
		w->err = rdmaps_flush(w->c, 30000);
	return NULL;
}

static int run_threads(struct sc *s, unsigned n, void *(*fn)(void *), struct sc_share *sh,
		       pthread_t *th)
{
	for (unsigned i = 0; i < n; i++) {
		sh[i] = (struct sc_share){ .s = s, .idx = i };
		if (pthread_create(&th[i], NULL, fn, &sh[i])) {
			fprintf(stderr, "rdmaps-bench scale: cannot start a thread\n");
			for (unsigned k = 0; k < i; k++)
				pthread_join(th[k], NULL);
			return -1;
		}
	}
	return 0;
}

static void join_threads(unsigned n, pthread_t *th)
{
	for (unsigned i = 0; i < n; i++)
		pthread_join(th[i], NULL);
}

/* VmRSS and VmPin of the server (bytes), when this run started it. */
static void server_mem(int pid, uint64_t *rss, uint64_t *pin)
{
	char path[64], line[256];
	unsigned long long kib;
	FILE *f;

	*rss = *pin = 0;
	if (!pid)
		return;
	snprintf(path, sizeof(path), "/proc/%d/status", pid);
	if (!(f = fopen(path, "r")))
		return;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "VmRSS: %llu kB", &kib) == 1)
			*rss = (uint64_t)kib << 10;
		else if (sscanf(line, "VmPin: %llu kB", &kib) == 1)
			*pin = (uint64_t)kib << 10;
	}
	fclose(f);
}

static void row_init(struct bench_row *r, const char *op, unsigned W, uint64_t size)
{
	memset(r, 0, sizeof(*r));
	snprintf(r->group, sizeof(r->group), "scale");
	snprintf(r->op, sizeof(r->op), "%s-w%u", op, W);
	r->size = size;
	r->workers = W;
	r->depth = 1;
}

/* End of one of the observer's timed loops (started at t0): its ops, time,
 * rate and latency percentiles into r. */
static void timed_done(struct bench_row *r, const struct bench_loop *l, uint64_t t0,
		       const struct rdmaps_hist *h)
{
	r->ops = l->n;
	r->seconds = (rdmaps__now_ns() - t0) / 1e9;
	report_lat(r, h);
	r->ops_s = r->ops / r->seconds;
}

/* The observer's pulls of t for one row's time; the most READs one pull took. */
static int observe_pulls(struct sc *s, rdmaps_tensor *t, uint64_t elems, struct rdmaps_hist *h,
			 struct bench_row *r)
{
	static float v[SC_HOT_ELEMS];
	struct rdmaps_client_stats a, b;
	struct bench_loop l;
	uint64_t t0, t1, most = 0, retries0;
	int rc = 0;

	rdmaps__hist_reset(h);
	rdmaps_client_stats(s->obs, &a);
	retries0 = a.pull_retries;
	loop_start(&l, s->o, rdmaps__now_ns());
	t0 = rdmaps__now_ns();
	do {
		uint64_t s0 = rdmaps__now_ns();
		if ((rc = rdmaps_pull(s->obs, t, v, 0)))
			break;
		t1 = rdmaps__now_ns();
		rdmaps__hist_record(h, t1 - s0);
		rdmaps_client_stats(s->obs, &b);
		if (b.reads - a.reads > most)
			most = b.reads - a.reads;
		a = b;
	} while (loop_more(&l, t1));
	timed_done(r, &l, t0, h);
	r->retries_frac = r->ops ? (double)(a.pull_retries - retries0) / (double)r->ops : 0;
	snprintf(r->note, sizeof(r->note), "most READs in one pull %llu; %.0f B",
		 (unsigned long long)most, (double)elems * 4);
	r->base_val = (double)most; /* targets.c: the READ bound */
	return rc;
}

/* The observer's 64 B push-folded round trips: what the server's fold
 * thread takes to see a push among W connections (the polling's cost). */
static int observe_pushes(struct sc *s, struct rdmaps_hist *h, struct bench_row *r)
{
	static const float g[SC_PROBE_ELEMS]; /* zeros: the probe stays put */
	struct bench_loop l;
	uint64_t t0, t1;
	int rc = 0;

	rdmaps__hist_reset(h);
	loop_start(&l, s->o, rdmaps__now_ns());
	t0 = rdmaps__now_ns();
	do {
		uint64_t s0 = rdmaps__now_ns();
		if ((rc = rdmaps_push(s->obs, s->probe, g, RDMAPS_PUSH_FOLDED)))
			break;
		t1 = rdmaps__now_ns();
		rdmaps__hist_record(h, t1 - s0);
	} while (loop_more(&l, t1));
	timed_done(r, &l, t0, h);
	snprintf(r->note, sizeof(r->note), "push-folded round trips, the other connections idle");
	return rc;
}

static int step(struct sc *s, unsigned W)
{
	static struct rdmaps_hist h;
	struct sc_share sh[SC_PUSHERS > SC_THREADS ? SC_PUSHERS : SC_THREADS];
	pthread_t th[SC_PUSHERS > SC_THREADS ? SC_PUSHERS : SC_THREADS];
	struct rdmaps_server_stats st0, st1;
	struct bench_row r;
	uint64_t t0, rss, pin, ring;
	unsigned P = W < SC_PUSHERS ? W : SC_PUSHERS;
	int rc = 0;

	/* connect: the workers this step adds */
	s->from = s->n;
	s->to = W;
	t0 = rdmaps__now_ns();
	if (run_threads(s, SC_THREADS, connect_some, sh, th))
		return -1;
	join_threads(SC_THREADS, th);
	row_init(&r, "connect", W, 0);
	r.seconds = (rdmaps__now_ns() - t0) / 1e9;
	rdmaps__hist_reset(&h);
	for (unsigned i = s->from; i < s->to; i++) {
		if (s->w[i].err) {
			fprintf(stderr, "rdmaps-bench scale: worker %u: %s\n", i,
				rdmaps_strerror(s->w[i].err));
			rc = -1;
		}
		rdmaps__hist_record(&h, s->w[i].connect_ns);
	}
	s->n = W;
	if (rc)
		return rc;
	r.ops = W - s->from;
	report_lat(&r, &h);
	snprintf(r.note, sizeof(r.note), "%u new connections in %.2f s (and 5 lookups each)",
		 W - s->from, r.seconds);
	report_add(&r);

	/* memory */
	if ((rc = rdmaps_server_stats(s->obs, &st0)))
		return rc;
	server_mem(s->server_pid, &rss, &pin);
	ring = W ? st0.staging_bytes / (W + 1) : 0;
	row_init(&r, "memory", W, (uint64_t)SC_MODEL_TENSORS * SC_MODEL_ELEMS * 4);
	r.base_val = (double)r.size + (double)W * (double)ring + (64u << 20);
	r.ratio = pin ? (double)pin / r.base_val : 0;
	snprintf(r.note, sizeof(r.note), "pin %.0f rss %.0f reg %.0f MiB; %llu MRs %llu MWs %llu CQs",
		 pin / 1048576.0, rss / 1048576.0, st0.registered_bytes / 1048576.0,
		 (unsigned long long)st0.memory_regions, (unsigned long long)st0.memory_windows,
		 (unsigned long long)st0.completion_queues);
	report_add(&r);

	/* idle: W workers connected, none busy */
	row_init(&r, "idle-pull", W, SC_PROBE_ELEMS * 4);
	rc |= observe_pulls(s, s->probe, SC_PROBE_ELEMS, &h, &r);
	report_add(&r);
	row_init(&r, "idle-pull", W, SC_HOT_ELEMS * 4);
	rc |= observe_pulls(s, s->hot, SC_HOT_ELEMS, &h, &r);
	report_add(&r);
	row_init(&r, "idle-push", W, SC_PROBE_ELEMS * 4);
	rc |= observe_pushes(s, &h, &r);
	report_add(&r);

	/* load: P workers push flat out; the observer pulls that tensor */
	if ((rc |= rdmaps_server_stats(s->obs, &st0)))
		return rc;
	s->stop = false;
	t0 = rdmaps__now_ns();
	if (run_threads(s, P, push_flat_out, sh, th))
		return -1;
	row_init(&r, "loaded-pull", W, SC_HOT_ELEMS * 4);
	r.workers = P;
	rc |= observe_pulls(s, s->hot, SC_HOT_ELEMS, &h, &r);
	s->stop = true;
	join_threads(P, th);
	report_add(&r);
	row_init(&r, "folds", W, SC_HOT_ELEMS * 4);
	r.workers = P;
	r.seconds = (rdmaps__now_ns() - t0) / 1e9;
	if ((rc |= rdmaps_server_stats(s->obs, &st1)))
		return rc;
	for (unsigned i = 0; i < P; i++) {
		r.ops += s->w[i].pushes;
		if (s->w[i].err) {
			fprintf(stderr, "rdmaps-bench scale: pusher %u: %s\n", i,
				rdmaps_strerror(s->w[i].err));
			rc = -1;
		}
	}
	r.ops_s = (double)(st1.folds - st0.folds) / r.seconds;
	r.gb_s = r.ops_s * SC_HOT_ELEMS * 4 / 1e9;
	snprintf(r.note, sizeof(r.note), "%u pushers; %llu pushes, %llu folded", P,
		 (unsigned long long)r.ops, (unsigned long long)(st1.folds - st0.folds));
	report_add(&r);
	return rc;
}

int scale_run(const struct bench_opts *o, const struct bench_target *tg, int server_pid)
{
	struct sc *s = calloc(1, sizeof(*s));
	struct rdmaps_tensor_desc d = { .optimizer = RDMAPS_OPT_SGD, .lr = 0.01f };
	rdmaps_tensor *t;
	int rc;

	if (!s)
		return -1;
	s->o = o;
	s->tg = tg;
	s->server_pid = server_pid;
	if ((rc = sc_connect(tg, &s->obs))) {
		fprintf(stderr, "rdmaps-bench scale: connect: %s\n", rdmaps_strerror(rc));
		free(s);
		return -1;
	}
	for (unsigned k = 0; !rc && k < SC_MODEL_TENSORS; k++) {
		d.name = model_name(k);
		d.length = SC_MODEL_ELEMS;
		rc = rdmaps_declare(s->obs, &d, &t);
	}
	d.name = "scale-hot";
	d.length = SC_HOT_ELEMS;
	if (!rc)
		rc = rdmaps_declare(s->obs, &d, &s->hot);
	d.name = "scale-probe";
	d.length = SC_PROBE_ELEMS;
	if (!rc)
		rc = rdmaps_declare(s->obs, &d, &s->probe);
	for (unsigned i = 0; !rc && i < o->nscale; i++) {
		if (o->scale[i] > SC_MAX || o->scale[i] < s->n) {
			fprintf(stderr, "rdmaps-bench scale: --scale wants rising counts up to %u\n",
				SC_MAX);
			rc = -1;
			break;
		}
		rc = step(s, o->scale[i]);
	}
	if (rc > 0 || rc < -1)
		fprintf(stderr, "rdmaps-bench scale: %s\n", rdmaps_strerror(rc));
	for (unsigned i = 0; i < s->n; i++)
		if (s->w[i].c)
			rdmaps_close(s->w[i].c);
	rdmaps_close(s->obs);
	free(s);
	return rc ? -1 : 0;
}
