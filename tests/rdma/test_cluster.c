/*
 * Sharded cluster: 3 servers on hosts 1-3, workers on hosts 4-5 (each host
 * its own rxe device inside tools/rxe-vm --hosts 5). Exact folds and torn-free
 * pulls across shards, BSP pulls whole across shards, balanced placement, a
 * config file, a missing server, and a server that comes up late.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

#define S 3
#define CE 1024 /* floats per chunk on every server */

static struct th_server srv[S];
static const char *host[5];
static char servers[512];

static void stop_all(void)
{
	for (int i = 0; i < S; i++)
		th_server_stop(&srv[i]);
}

static void start_cluster(void)
{
	size_t n = 0;

	th_hosts(host, 5);
	for (int i = 0; i < S; i++) {
		th_server_start_at(&srv[i], host[i], "--chunk-elems", "1024", "--fold-threads", "1",
				   NULL);
		n += (size_t)snprintf(servers + n, sizeof(servers) - n, "%s%s:%s", i ? "," : "",
				      srv[i].addr, srv[i].port);
	}
}

static int worker_connect(int w, rdmaps_client **c)
{
	return th_connect_cluster(servers, host[3 + w % 2], c);
}

/* ---- exactness across shards ------------------------------------------ */

#define W 2
#define ROUNDS 10
#define LEN (10 * CE + 333) /* eleven chunks over three servers */

struct warg {
	int w, rc;
};

static void *exact_worker(void *p)
{
	struct warg *a = p;
	rdmaps_client *c = NULL;
	rdmaps_tensor *t = NULL, *u = NULL;
	struct rdmaps_tensor_desc d = { .name = "sharded", .length = LEN, .init_value = 1.0f, .lr = 1.0f };
	struct rdmaps_tensor_desc e = { .name = "bias", .length = 10, .init_value = 0.0f, .lr = 1.0f };
	static float g[W][LEN];
	float gb[10];

	if ((a->rc = worker_connect(a->w, &c)) || (a->rc = rdmaps_declare(c, &d, &t)) ||
	    (a->rc = rdmaps_declare(c, &e, &u)))
		goto out;
	for (int i = 0; i < LEN; i++)
		g[a->w][i] = -(float)((a->w + 1) * (i % 5));
	for (int i = 0; i < 10; i++)
		gb[i] = -1.0f;
	for (int r = 0; r < ROUNDS && !a->rc; r++)
		if (!(a->rc = rdmaps_push(c, t, g[a->w], 0)))
			a->rc = rdmaps_push(c, u, gb, 0);
	if (!a->rc)
		a->rc = rdmaps_flush(c, 30000);
out:
	rdmaps_close(c);
	return NULL;
}

Test(cluster, exact_folds_across_shards, .init = start_cluster, .fini = stop_all, .timeout = 300)
{
	pthread_t t[W];
	struct warg a[W];
	rdmaps_client *c;
	rdmaps_tensor *tt, *tu;
	static float v[LEN];
	float vb[10];

	for (int w = 0; w < W; w++) {
		a[w] = (struct warg){ .w = w };
		pthread_create(&t[w], NULL, exact_worker, &a[w]);
	}
	for (int w = 0; w < W; w++) {
		pthread_join(t[w], NULL);
		cr_assert_eq(a[w].rc, 0, "worker %d: %s", w, rdmaps_strerror(a[w].rc));
	}
	cr_assert_eq(worker_connect(0, &c), 0);
	cr_assert_eq(rdmaps_num_servers(c), S);
	cr_assert_eq(rdmaps_lookup(c, "sharded", &tt), 0);
	cr_assert_eq(rdmaps_lookup(c, "bias", &tu), 0);
	cr_assert_eq(rdmaps_tensor_length(tt), LEN);
	cr_assert_eq(rdmaps_pull(c, tt, v, 0), 0);
	cr_assert_eq(rdmaps_pull(c, tu, vb, 0), 0);
	for (int i = 0; i < LEN; i++) /* 1 + rounds * (1 + 2) * (i % 5) */
		cr_assert_eq(v[i], 1.0f + ROUNDS * 3.0f * (float)(i % 5), "[%d] = %f", i, v[i]);
	for (int i = 0; i < 10; i++)
		cr_assert_eq(vb[i], (float)(W * ROUNDS));
	for (uint32_t s = 0; s < S; s++)
		cr_assert_gt(rdmaps_tensor_server_elems(tt, s), 0, "server %u holds part of it", s);
	rdmaps_close(c);
}

/* ---- torn reads across shards ----------------------------------------- */

static volatile int stop_push;
static long pushes;

static void *pusher(void *p)
{
	int *rc = p;
	rdmaps_client *c;
	rdmaps_tensor *t;
	static float g[6 * CE];

	for (int i = 0; i < 6 * CE; i++)
		g[i] = -1.0f;
	if ((*rc = worker_connect(1, &c)))
		return NULL;
	if (!(*rc = rdmaps_lookup(c, "torn", &t)))
		while (!stop_push && !(*rc = rdmaps_push(c, t, g, 0)))
			pushes++;
	if (!*rc)
		*rc = rdmaps_flush(c, 30000);
	rdmaps_close(c);
	return NULL;
}

/*
 * What a pull of a tensor spread over chunks and servers returns
 * (docs/design.md, "What a pull returns"): BSP is whole-tensor consistent,
 * every element of every chunk on every server at exactly the pull's clock,
 * while the other worker pushes the next clocks as fast as it may.
 */
#define BSP_CLOCKS 12

static float bsp_g(int w, int k, int i)
{
	return (float)((w + 1) * (k + 1)) + 0.25f * (float)(i % 7);
}

static void *bsp_shard_worker(void *p)
{
	struct warg *a = p;
	rdmaps_client *c = NULL;
	rdmaps_tensor *t = NULL;
	struct rdmaps_tensor_desc d = { .name = "bsp", .length = LEN, .lr = 1.0f,
					.consistency = RDMAPS_BSP, .workers = W };
	static float g[W][LEN], v[W][LEN];

	if ((a->rc = worker_connect(a->w, &c)) || (a->rc = rdmaps_declare(c, &d, &t)))
		goto out;
	for (int k = 0; k < BSP_CLOCKS && !a->rc; k++) {
		if ((a->rc = rdmaps_pull(c, t, v[a->w], 0)))
			break;
		for (int i = 0; i < LEN; i++) {
			float want = 0; /* minus every member's gradients of clocks < k, summed */
			for (int j = 0; j < k; j++)
				for (int m = 0; m < W; m++)
					want -= bsp_g(m, j, i);
			if (v[a->w][i] != want) {
				fprintf(stderr, "worker %d clock %d: [%d] = %g, want %g\n", a->w, k, i,
					(double)v[a->w][i], (double)want);
				a->rc = RDMAPS_EPROTO;
				break;
			}
		}
		for (int i = 0; i < LEN; i++)
			g[a->w][i] = bsp_g(a->w, k, i);
		if (!a->rc)
			a->rc = rdmaps_push(c, t, g[a->w], 0);
	}
out:
	rdmaps_close(c);
	return NULL;
}

Test(cluster, bsp_pulls_are_whole_across_shards, .init = start_cluster, .fini = stop_all,
     .timeout = 300)
{
	pthread_t th[W];
	struct warg a[W];

	for (int w = 0; w < W; w++) {
		a[w] = (struct warg){ .w = w };
		cr_assert_eq(pthread_create(&th[w], NULL, bsp_shard_worker, &a[w]), 0);
	}
	for (int w = 0; w < W; w++) {
		pthread_join(th[w], NULL);
		cr_assert_eq(a[w].rc, 0, "worker %d: %s", w, rdmaps_strerror(a[w].rc));
	}
}

Test(cluster, pulls_never_torn_across_shards, .init = start_cluster, .fini = stop_all, .timeout = 600)
{
	static float v[6 * CE];
	rdmaps_client *c;
	rdmaps_tensor *t;
	struct rdmaps_tensor_desc d = { .name = "torn", .length = 6 * CE, .lr = 1.0f };
	pthread_t th;
	int prc = 0;

	cr_assert_eq(worker_connect(0, &c), 0);
	cr_assert_eq(rdmaps_declare(c, &d, &t), 0);
	stop_push = 0;
	pushes = 0;
	pthread_create(&th, NULL, pusher, &prc);
	for (int n = 0; n < 2000; n++) {
		cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
		for (int k = 0; k < 6; k++)
			for (int i = 1; i < CE; i++)
				cr_assert_eq(v[k * CE + i], v[k * CE], "pull %d chunk %d torn", n, k);
	}
	stop_push = 1;
	pthread_join(th, NULL);
	cr_assert_eq(prc, 0, "pusher: %s", rdmaps_strerror(prc));
	cr_assert_gt(pushes, 0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	for (int i = 0; i < 6 * CE; i++)
		cr_assert_eq(v[i], (float)pushes, "final [%d] = %f, pushes %ld", i, v[i], pushes);
	rdmaps_close(c);
}

/* ---- placement -------------------------------------------------------- */

Test(cluster, placement_is_balanced_and_real, .init = start_cluster, .fini = stop_all, .timeout = 300)
{
	static const uint64_t lens[] = { 1, 100, CE, 2 * CE + 1, 3 * CE, 7 * CE + 5, 30 * CE + 77 };
	uint64_t per_server[S] = { 0 };
	rdmaps_client *c;
	char name[32];

	cr_assert_eq(worker_connect(0, &c), 0);
	for (unsigned i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		struct rdmaps_tensor_desc d = { .name = name, .length = lens[i], .lr = 1.0f };
		rdmaps_tensor *t;
		uint64_t lo = UINT64_MAX, hi = 0, sum = 0;
		unsigned holders = 0;

		snprintf(name, sizeof(name), "p%u", i);
		cr_assert_eq(rdmaps_declare(c, &d, &t), 0);
		for (uint32_t s = 0; s < S; s++) {
			uint64_t e = rdmaps_tensor_server_elems(t, s);
			lo = e < lo ? e : lo;
			hi = e > hi ? e : hi;
			sum += e;
			holders += e > 0;
			per_server[s] += e;

			/* the server really holds exactly that much under that name */
			struct rdmaps_connect_opts o = { .host = srv[s].addr, .port = srv[s].port,
							 .src_addr = host[3], .token = TH_TOKEN,
							 .timeout_ms = 20000 };
			rdmaps_client *one;
			rdmaps_tensor *part;
			cr_assert_eq(rdmaps_connect(&o, &one), 0);
			int rc = rdmaps_lookup(one, name, &part);
			if (e)
				cr_assert(rc == 0 && rdmaps_tensor_length(part) == e,
					  "%s on server %u: rc %d, want %lu floats", name, s, rc, e);
			else
				cr_assert_eq(rc, RDMAPS_ENOENT, "%s must not be on server %u", name, s);
			rdmaps_close(one);
		}
		cr_assert_eq(sum, lens[i]);
		/* stated bound: shares of one tensor differ by at most one chunk */
		cr_assert_leq(hi - lo, CE, "%s: shares %lu..%lu", name, lo, hi);
		uint64_t chunks = (lens[i] + CE - 1) / CE;
		cr_assert_eq(holders, chunks < S ? chunks : S, "%s spread over %u servers", name, holders);
	}
	printf("placement: per-server floats %lu %lu %lu\n", per_server[0], per_server[1], per_server[2]);
	rdmaps_close(c);
}

/* ---- missing and late servers, config file ------------------------------ */

Test(cluster, missing_server_is_named, .init = start_cluster, .fini = stop_all, .timeout = 120)
{
	char list[600], log[4096] = "";
	int pfd[2], saved;
	rdmaps_client *c = NULL;
	struct rdmaps_cluster_opts o = { .servers = list, .src_addr = host[3], .token = TH_TOKEN,
					 .timeout_ms = 3000 };
	uint64_t t0;

	/* a fourth server on a port where nobody listens */
	snprintf(list, sizeof(list), "%s,%s:19999", servers, host[2]);
	cr_assert_eq(pipe(pfd), 0);
	fcntl(pfd[0], F_SETFL, O_NONBLOCK);
	saved = dup(2);
	dup2(pfd[1], 2);
	t0 = (uint64_t)time(NULL);
	int rc = rdmaps_connect_cluster(&o, &c);
	dup2(saved, 2);
	ssize_t n = read(pfd[0], log, sizeof(log) - 1);
	log[n > 0 ? n : 0] = '\0';
	fprintf(stderr, "%s", log);
	cr_assert_eq(rc, RDMAPS_ECONNECT, "%s", rdmaps_strerror(rc));
	cr_assert_null(c);
	cr_assert_leq((uint64_t)time(NULL) - t0, 10, "gave up in time");
	char want[128];
	snprintf(want, sizeof(want), "%s:19999 not reachable", host[2]);
	cr_assert_not_null(strstr(log, want), "error names the server: %s", log);
}

struct late {
	int rc;
	uint64_t ms;
	const char *config;
};

static void *late_connect(void *p)
{
	struct late *l = p;
	rdmaps_client *c = NULL;
	struct rdmaps_cluster_opts o = { .config = l->config, .src_addr = host[4] };
	struct timespec a, b;

	clock_gettime(CLOCK_MONOTONIC, &a);
	l->rc = rdmaps_connect_cluster(&o, &c);
	clock_gettime(CLOCK_MONOTONIC, &b);
	l->ms = (uint64_t)((b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000);
	if (!l->rc) {
		rdmaps_tensor *t;
		struct rdmaps_tensor_desc d = { .name = "late", .length = 5 * CE, .init_value = 2.0f };
		static float v[5 * CE];
		if (!(l->rc = rdmaps_declare(c, &d, &t)) && !(l->rc = rdmaps_pull(c, t, v, 0)))
			l->rc = v[5 * CE - 1] == 2.0f ? 0 : RDMAPS_EPROTO;
	}
	rdmaps_close(c);
	return NULL;
}

Test(cluster, late_server_is_waited_for_with_config_file, .fini = stop_all, .timeout = 120)
{
	char path[] = "/tmp/rdmaps-cluster-XXXXXX";
	struct late l = { .config = path };
	pthread_t th;
	FILE *f;
	int fd;

	/* servers 0 and 1 now, server 2 a second after the workers start */
	th_hosts(host, 5);
	th_server_start_at(&srv[0], host[0], "--chunk-elems", "1024", NULL);
	th_server_start_at(&srv[1], host[1], "--chunk-elems", "1024", NULL);
	snprintf(srv[2].port, sizeof(srv[2].port), "%u", 20000u + (unsigned)getpid() % 20000u + 7u);
	fd = mkstemp(path);
	cr_assert_geq(fd, 0);
	f = fdopen(fd, "w");
	fprintf(f, "; written by test_cluster.c\n[cluster]\nservers = %s:%s, %s:%s %s:%s\n"
		   "token = %s\ntimeout_ms = 20000\n",
		srv[0].addr, srv[0].port, srv[1].addr, srv[1].port, host[2], srv[2].port, TH_TOKEN);
	fclose(f);
	pthread_create(&th, NULL, late_connect, &l);
	sleep(1);
	/* server 2 reads the same file and finds its address and port by rank */
	th_server_start_at(&srv[2], host[2], "--chunk-elems", "1024", "--config", path, "--rank", "2",
			   NULL);
	pthread_join(th, NULL);
	unlink(path);
	cr_assert_eq(l.rc, 0, "late connect: %s", rdmaps_strerror(l.rc));
	cr_assert_geq(l.ms, 900, "connect waited for the late server (%lu ms)", l.ms);
	printf("late server: connected after %lu ms\n", l.ms);
}
