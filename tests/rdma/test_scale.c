/*
 * Many workers on one server: 256 connections, each pulling and pushing,
 * the model exactly what the pushes explain, and what the server pins for
 * them: one registration of the model plus a ring and buffers per worker
 * (docs/design.md, "Memory and access rights").
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "harness.h"
#include "pages.h"
#include "verbs.h" /* rdmaps__now_ns */

static struct th_server srv;

static void stop_server(void)
{
	th_server_stop(&srv);
}

enum { W = 256, THREADS = 8, LEN = 2048, CHUNK = 1024, ROUNDS = 2 };

struct share {
	unsigned first, n;
	rdmaps_client *c[W];
	uint64_t connect_ns[W];
	int err;          /* first failure: an rdmaps_err */
	const char *what; /* and where */
};

/* Threads: connect a share of the workers. Criterion asserts belong to the
 * test's own thread, so failures are recorded and asserted there. */
static void *connect_share(void *arg)
{
	struct share *sh = arg;

	for (unsigned i = sh->first; i < sh->first + sh->n && !sh->err; i++) {
		uint64_t t0 = rdmaps__now_ns();
		int rc = th_connect_token(&srv, TH_TOKEN, &sh->c[i]);
		sh->connect_ns[i] = rdmaps__now_ns() - t0;
		if (rc) {
			sh->err = rc;
			sh->what = "connect";
		}
	}
	return NULL;
}

/* Threads: each worker of the share declares the tensor, pushes ROUNDS
 * gradients of ones (folded before the call returns) and pulls. */
static void *work_share(void *arg)
{
	struct share *sh = arg;
	static _Thread_local float g[LEN], v[LEN];
	struct rdmaps_tensor_desc d = { .name = "scale", .length = LEN, .init_value = 0.0f,
					.optimizer = RDMAPS_OPT_SGD, .lr = 1.0f };

	for (int i = 0; i < LEN; i++)
		g[i] = 1.0f;
	for (unsigned i = sh->first; i < sh->first + sh->n && !sh->err; i++) {
		rdmaps_tensor *t = NULL;
		int rc = rdmaps_declare(sh->c[i], &d, &t);
		for (int r = 0; !rc && r < ROUNDS; r++)
			rc = rdmaps_push(sh->c[i], t, g, RDMAPS_PUSH_FOLDED);
		if (!rc)
			rc = rdmaps_pull(sh->c[i], t, v, 0);
		/* every value of one chunk alike (ASP pulls are whole per chunk:
		 * docs/design.md), and within what W * ROUNDS pushes of -1 make */
		for (int k = 0; !rc && k < LEN; k++)
			if (v[k] != v[k - k % CHUNK] || v[k] > -(float)ROUNDS ||
			    v[k] < -(float)(W * ROUNDS))
				rc = RDMAPS_ERANGE;
		if (rc) {
			sh->err = rc;
			sh->what = "declare, push or pull";
		}
	}
	return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static void run(void *(*fn)(void *), struct share *sh)
{
	pthread_t th[THREADS];

	for (int i = 0; i < THREADS; i++)
		cr_assert_eq(pthread_create(&th[i], NULL, fn, &sh[i]), 0);
	for (int i = 0; i < THREADS; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < THREADS; i++)
		cr_assert_eq(sh[i].err, 0, "worker share %d: %s: %s", i, sh[i].what,
			     rdmaps_strerror(sh[i].err));
}

Test(scale, workers_256_push_and_pull_exactly, .fini = stop_server, .timeout = 600)
{
	static struct share sh[THREADS];
	static rdmaps_client *all[W];
	static uint64_t ns[W];
	static float v[LEN];
	struct rdmaps_server_stats st;
	rdmaps_client *obs;
	rdmaps_tensor *t;
	uint64_t t0, took, ring_and_bufs;
	unsigned long long pin;

	th_server_start(&srv, "--chunk-elems", "1024", "--max-workers", "300", "--fold-threads", "2",
			NULL);
	obs = th_connect(&srv);
	t = th_declare(obs, "scale", LEN, 0.0f, 1.0f);

	t0 = rdmaps__now_ns();
	for (unsigned i = 0; i < THREADS; i++)
		sh[i] = (struct share){ .first = i * (W / THREADS), .n = W / THREADS };
	run(connect_share, sh);
	took = rdmaps__now_ns() - t0;
	for (unsigned i = 0; i < W; i++) {
		all[i] = sh[i / (W / THREADS)].c[i];
		ns[i] = sh[i / (W / THREADS)].connect_ns[i];
	}
	qsort(ns, W, sizeof(ns[0]), cmp_u64);
	printf("scale: %d connections in %.1f s, connect p50 %.1f ms p99 %.1f ms\n", W, took / 1e9,
	       ns[W / 2] / 1e6, ns[W * 99 / 100] / 1e6);
	cr_assert_eq(rdmaps_server_stats(obs, &st), 0);
	cr_assert_eq(st.connections, W + 1);

	run(work_share, sh);
	/* exactly what the pushes explain: W * ROUNDS gradients of ones */
	cr_assert_eq(rdmaps_pull(obs, t, v, 0), 0);
	for (int k = 0; k < LEN; k++)
		cr_assert_eq(v[k], -(float)(W * ROUNDS), "scale[%d] = %f, want %d", k, v[k], -W * ROUNDS);

	/* one registration of the model however many workers read it; each
	 * worker adds its ring and buffers, and one window */
	cr_assert_eq(rdmaps_server_stats(obs, &st), 0);
	pin = th_server_pinned_kib(&srv) * 1024;
	ring_and_bufs = st.registered_bytes / (W + 1);
	printf("scale: %d workers: registered %.1f MiB (%.0f KiB per worker), VmPin %.1f MiB, "
	       "%lu MRs, %lu windows, staging %.1f MiB\n",
	       W + 1, st.registered_bytes / 1048576.0, ring_and_bufs / 1024.0, pin / 1048576.0,
	       (unsigned long)st.memory_regions, (unsigned long)st.memory_windows,
	       st.staging_bytes / 1048576.0);
	cr_assert_eq(st.shared_devices, 1);
	cr_assert_eq(st.memory_windows, W + 1);
	/* what the fold threads poll: per thread on the one device a CQ for
	 * each 56 workers (cq.c), 129 workers each, not a CQ per worker */
	cr_assert_eq(st.completion_queues, 2 * 3, "%lu completion queues for %d workers",
		     (unsigned long)st.completion_queues, W + 1);
	/* per worker: its ring and its buffers (2 MRs); plus the model's one;
	 * and a snapshot buffer for each worker whose pull READs tore twice */
	cr_assert_geq(st.memory_regions, 2 * (W + 1) + 1);
	cr_assert_leq(st.memory_regions, 2 * (W + 1) + 1 + st.snapshots);
	/* the rings (counted apart), each worker's message buffers ((16 + 8
	 * receives + 4 replies) x 4 KiB), and the model once: a 2048-float
	 * tensor's memory is well under 64 KiB */
	cr_assert_leq(st.registered_bytes - st.staging_bytes, (W + 1) * (120u << 10) + (64u << 10),
		      "registered beyond rings, buffers and one model: %lu",
		      (unsigned long)(st.registered_bytes - st.staging_bytes));
	cr_assert_leq(pin, st.registered_bytes + (4u << 20), "VmPin beyond what the server registered");

	for (unsigned i = 0; i < W; i++)
		rdmaps_close(all[i]);
	rdmaps_close(obs);
}

/* Threads: each worker of the share looks up the four model tensors, which
 * is when the server makes them readable to it (registration.c). */
static void *lookup_share(void *arg)
{
	struct share *sh = arg;

	for (unsigned i = sh->first; i < sh->first + sh->n && !sh->err; i++)
		for (int k = 0; k < 4 && !sh->err; k++) {
			char name[8];
			rdmaps_tensor *t = NULL;
			snprintf(name, sizeof(name), "m%d", k);
			if ((sh->err = rdmaps_lookup(sh->c[i], name, &t)))
				sh->what = "lookup";
		}
	return NULL;
}

/*
 * What the server pins for a 64 MiB model (four 16 MiB tensors, one copy
 * each) read by 256 workers with default rings: at most the model, the
 * rings and 64 MiB for everything else (each worker's message buffers
 * among it), where a registration per worker would pin 256 models.
 */
Test(scale, workers_256_pin_one_model_plus_their_rings, .fini = stop_server, .timeout = 600)
{
	static struct share sh[THREADS];
	struct rdmaps_server_stats st;
	rdmaps_client *obs;
	unsigned long long pin0, pin, model = 64ull << 20, bound;

	th_server_start(&srv, "--max-workers", "300", "--two-copies-from", "0", NULL);
	obs = th_connect(&srv);
	for (int k = 0; k < 4; k++) {
		char name[8];
		snprintf(name, sizeof(name), "m%d", k);
		th_declare(obs, name, 4u << 20, 0.0f, 1.0f);
	}
	pin0 = th_server_pinned_kib(&srv) * 1024;
	for (unsigned i = 0; i < THREADS; i++)
		sh[i] = (struct share){ .first = i * (W / THREADS), .n = W / THREADS };
	run(connect_share, sh);
	run(lookup_share, sh);
	cr_assert_eq(rdmaps_server_stats(obs, &st), 0);
	pin = th_server_pinned_kib(&srv) * 1024;
	bound = model + st.staging_bytes + (64ull << 20);
	printf("scale: 64 MiB model, %d workers: VmPin %.1f MiB (%.1f with one worker) <= model + "
	       "rings + 64 MiB = %.1f MiB: %s; registered %.1f MiB, rings %.1f MiB, %lu MRs, "
	       "%lu windows\n",
	       W + 1, pin / 1048576.0, pin0 / 1048576.0, bound / 1048576.0,
	       pin <= bound ? "pass" : "MISS", st.registered_bytes / 1048576.0,
	       st.staging_bytes / 1048576.0, (unsigned long)st.memory_regions,
	       (unsigned long)st.memory_windows);
	cr_assert_eq(st.connections, W + 1);
	cr_assert_eq(st.memory_windows, W + 1);
	cr_assert_leq(pin, bound, "locked memory past model + rings + 64 MiB");
	/* 16 MiB tensors ask for transparent huge pages (store.c): where the
	 * kernel allows them most of the model must be in them */
	{
		char mode[16];
		rdmaps__thp_mode(mode, sizeof(mode));
		printf("scale: transparent huge pages %s; server memory in them %.1f MiB\n",
		       mode[0] ? mode : "(none)", st.huge_page_bytes / 1048576.0);
		if (mode[0] && strcmp(mode, "never"))
			cr_assert_geq(st.huge_page_bytes, 48ull << 20,
				      "a 64 MiB model asked for huge pages: %.1f MiB in them",
				      st.huge_page_bytes / 1048576.0);
		else
			cr_assert_eq(st.huge_page_bytes, 0, "no huge pages on this kernel");
	}
	for (unsigned i = 0; i < W; i++)
		rdmaps_close(sh[i / (W / THREADS)].c[i]);
	rdmaps_close(obs);
}

/*
 * Many workers per core only work if a waiting worker leaves the core to
 * others: a flush that waits on a server which folds nothing (stopped)
 * must sleep, not spin, and must still see the folds at once when they
 * come.
 */
Test(scale, a_waiting_worker_sleeps, .fini = stop_server, .timeout = 120)
{
	enum { N = 4096 };
	static float g[N], v[N];
	rdmaps_client *c;
	rdmaps_tensor *t;
	struct timespec c0, c1;
	uint64_t t0, wall;
	double cpu;
	int rc;

	unsetenv("RDMAPS_SPIN_US"); /* the default: sleep after 50 us */
	th_server_start(&srv, NULL);
	c = th_connect(&srv);
	t = th_declare(c, "sleeper", N, 0.0f, 1.0f);
	for (int i = 0; i < N; i++)
		g[i] = 1.0f;
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);

	th_server_freeze(&srv);
	cr_assert_eq(rdmaps_push(c, t, g, 0), 0, "staged while the server is stopped");
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
	t0 = rdmaps__now_ns();
	rc = rdmaps_flush(c, 1500);
	wall = rdmaps__now_ns() - t0;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
	cr_assert_eq(kill(srv.pid, SIGCONT), 0);
	cpu = (double)(c1.tv_sec - c0.tv_sec) + (c1.tv_nsec - c0.tv_nsec) / 1e9;
	cr_assert_eq(rc, RDMAPS_ETIMEDOUT, "flush: %s", rdmaps_strerror(rc));
	cr_assert_geq(wall, 1400000000u);
	/* a spinning wait uses the whole of it */
	cr_assert_leq(cpu, 0.25 * (double)wall / 1e9, "a 1.5 s wait used %.3f s of CPU", cpu);

	cr_assert_eq(rdmaps_flush(c, 10000), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	for (int i = 0; i < N; i++)
		cr_assert_float_eq(v[i], -2.0f, 0.0f, "element %d: %g", i, v[i]);
	rdmaps_close(c);
}
