/*
 * Consistency models, clipping and non-finite gradients against a real
 * server: BSP exact per clock, SSP never past its bound (checked from what
 * each pull saw), members leaving or evicted without hanging the rest.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

static struct th_server srv;

static void stop_server(void)
{
	th_server_stop(&srv);
}

#define LEN (2 * 1024 + 7) /* three chunks of 1024 */

struct warg {
	int w, rc, clocks, sleep_us, leave_after;
	long stale;
	char what[128];
};

static pthread_barrier_t joined;

static rdmaps_tensor *declare(rdmaps_client *c, const char *name, uint64_t len,
			      enum rdmaps_consistency mode, uint32_t s, uint32_t workers, int mean,
			      int *rc)
{
	struct rdmaps_tensor_desc d = { .name = name, .length = len, .init_value = 0.0f, .lr = 1.0f,
					.consistency = mode, .staleness = s, .workers = workers,
					.aggregate_mean = mean };
	rdmaps_tensor *t = NULL;
	*rc = rdmaps_declare(c, &d, &t);
	return t;
}

/* ---- BSP -------------------------------------------------------------- */

#define BW 3
#define CLOCKS 20

/* worker w's gradient at clock k, element i; lr 1, so the model falls by it */
static float g_of(int w, int k, int i)
{
	return (float)((w + 1) * (k + 1) * (1 + i % 3));
}

static float bsp_expect(int clocks_done, int i, int members, int mean)
{
	double s = 0;
	for (int k = 0; k < clocks_done; k++) {
		double step = 0;
		for (int w = 0; w < members; w++)
			step += g_of(w, k, i);
		s += mean ? step / members : step;
	}
	return (float)-s;
}

static void *bsp_worker(void *p)
{
	struct warg *a = p;
	rdmaps_client *c = NULL;
	rdmaps_tensor *t, *tm = NULL;
	static float v[BW][LEN], g[BW][LEN];

	if ((a->rc = th_connect_token(&srv, TH_TOKEN, &c)))
		return NULL;
	t = declare(c, "bsp", LEN, RDMAPS_BSP, 0, BW, 0, &a->rc);
	if (!a->rc)
		tm = declare(c, "bsp_mean", LEN, RDMAPS_BSP, 0, BW, 1, &a->rc);
	pthread_barrier_wait(&joined);
	for (int k = 0; k < a->clocks && !a->rc; k++) {
		/* a pull at clock k sees exactly clocks 0..k-1 of every member */
		for (int which = 0; which < 2 && !a->rc; which++) {
			rdmaps_tensor *x = which ? tm : t;
			if ((a->rc = rdmaps_pull(c, x, v[a->w], 0)))
				break;
			for (int i = 0; i < LEN; i++)
				if (v[a->w][i] != bsp_expect(k, i, BW, which)) {
					snprintf(a->what, sizeof(a->what),
						 "%s clock %d [%d] = %f, want %f", which ? "mean" : "sum",
						 k, i, v[a->w][i], bsp_expect(k, i, BW, which));
					a->rc = RDMAPS_EPROTO;
					break;
				}
		}
		for (int i = 0; i < LEN; i++)
			g[a->w][i] = g_of(a->w, k, i);
		if (!a->rc && !(a->rc = rdmaps_push(c, t, g[a->w], 0)))
			a->rc = rdmaps_push(c, tm, g[a->w], 0);
		if (!a->rc && rdmaps_tensor_clock(t) != (uint64_t)k + 1)
			a->rc = RDMAPS_EPROTO;
	}
	if (!a->rc)
		a->rc = rdmaps_flush(c, 30000);
	struct rdmaps_client_stats cs;
	rdmaps_client_stats(c, &cs);
	a->stale = (long)cs.stale_retries;
	rdmaps_close(c);
	return NULL;
}

Test(consistency, bsp_exact_per_clock, .fini = stop_server, .timeout = 600)
{
	pthread_t th[BW];
	struct warg a[BW];

	th_server_start(&srv, "--chunk-elems", "1024", "--fold-threads", "2", NULL);
	pthread_barrier_init(&joined, NULL, BW);
	for (int w = 0; w < BW; w++) {
		a[w] = (struct warg){ .w = w, .clocks = CLOCKS };
		pthread_create(&th[w], NULL, bsp_worker, &a[w]);
	}
	for (int w = 0; w < BW; w++) {
		pthread_join(th[w], NULL);
		cr_assert_eq(a[w].rc, 0, "worker %d: %s %s", w, rdmaps_strerror(a[w].rc), a[w].what);
		printf("bsp worker %d: %ld stale re-reads while waiting for clocks\n", w, a[w].stale);
	}
	/* after the last clock every pull sees all 20 */
	rdmaps_client *c = th_connect(&srv);
	rdmaps_tensor *t;
	static float v[LEN];
	cr_assert_eq(rdmaps_lookup(c, "bsp", &t), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, RDMAPS_PULL_RELAXED), 0);
	for (int i = 0; i < LEN; i++)
		cr_assert_eq(v[i], bsp_expect(CLOCKS, i, BW, 0));
	rdmaps_close(c);
}

/* ---- SSP -------------------------------------------------------------- */

#define SW 3
#define SSP_S 2
#define SSP_CLOCKS 15

/* element w counts worker w's folded pushes (gradient -1 there, 0 elsewhere) */
static void *ssp_worker(void *p)
{
	struct warg *a = p;
	rdmaps_client *c = NULL;
	rdmaps_tensor *t;
	float v[SW], g[SW] = { 0 };

	if ((a->rc = th_connect_token(&srv, TH_TOKEN, &c)))
		return NULL;
	t = declare(c, "ssp", SW, RDMAPS_SSP, SSP_S, SW, 0, &a->rc);
	pthread_barrier_wait(&joined);
	g[a->w] = -1.0f;
	for (int k = 0; k < SSP_CLOCKS && !a->rc; k++) {
		if ((a->rc = rdmaps_pull(c, t, v, 0)))
			break;
		for (int u = 0; u < SW; u++)
			/* pushes of clocks < k - s are all in: at least k - s of each */
			if (v[u] < (float)(k - SSP_S) || v[u] > (float)SSP_CLOCKS) {
				snprintf(a->what, sizeof(a->what),
					 "clock %d saw %.0f pushes of worker %d (bound %d)", k, v[u], u,
					 k - SSP_S);
				a->rc = RDMAPS_EPROTO;
			}
		if (!a->rc)
			a->rc = rdmaps_push(c, t, g, 0);
		if (a->sleep_us)
			usleep((useconds_t)a->sleep_us);
	}
	if (!a->rc)
		a->rc = rdmaps_flush(c, 30000);
	struct rdmaps_client_stats cs;
	rdmaps_client_stats(c, &cs);
	a->stale = (long)cs.stale_retries;
	rdmaps_close(c);
	return NULL;
}

Test(consistency, ssp_never_breaks_its_bound, .fini = stop_server, .timeout = 600)
{
	pthread_t th[SW];
	struct warg a[SW];

	th_server_start(&srv, NULL);
	pthread_barrier_init(&joined, NULL, SW);
	for (int w = 0; w < SW; w++) {
		/* worker 2 is slow: the others must wait for it at the bound */
		a[w] = (struct warg){ .w = w, .sleep_us = w == 2 ? 30000 : 0 };
		pthread_create(&th[w], NULL, ssp_worker, &a[w]);
	}
	for (int w = 0; w < SW; w++) {
		pthread_join(th[w], NULL);
		cr_assert_eq(a[w].rc, 0, "worker %d: %s %s", w, rdmaps_strerror(a[w].rc), a[w].what);
	}
	printf("ssp: fast workers waited %ld and %ld re-reads for the slow one\n", a[0].stale,
	       a[1].stale);
	cr_assert_gt(a[0].stale + a[1].stale, 0, "the bound must actually have held someone back");
}

/* Two workers, both members of a two-member BSP tensor; g all -1. */
static void bsp_pair(const char *name, rdmaps_client **a, rdmaps_client **b, rdmaps_tensor **ta,
		     rdmaps_tensor **tb, float *g)
{
	int rc;

	*a = th_connect(&srv);
	*b = th_connect(&srv);
	*ta = declare(*a, name, LEN, RDMAPS_BSP, 0, 2, 0, &rc);
	cr_assert_eq(rc, 0);
	*tb = declare(*b, name, LEN, RDMAPS_BSP, 0, 2, 0, &rc);
	cr_assert_eq(rc, 0);
	for (int i = 0; i < LEN; i++)
		g[i] = -1.0f;
}

/* One clock at a time: a second BSP push before the pull of its clock would
 * land in the previous clock's aggregate. The library refuses it, and
 * changes nothing. (The server's own check: unit test clock.*.) */
Test(consistency, bsp_second_push_before_its_pull_is_refused, .fini = stop_server, .timeout = 120)
{
	rdmaps_client *a, *b;
	rdmaps_tensor *ta, *tb;
	static float v[LEN], g[LEN];

	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	bsp_pair("once", &a, &b, &ta, &tb, g);
	cr_assert_eq(rdmaps_push(a, ta, g, 0), 0, "a: clock 0");
	cr_assert_eq(rdmaps_push(a, ta, g, 0), RDMAPS_EINVAL, "a: clock 1 before its pull");
	cr_assert_eq(rdmaps_tensor_clock(ta), 1, "the refused push took no clock");
	cr_assert_eq(rdmaps_push(b, tb, g, 0), 0, "b: clock 0 completes it");
	cr_assert_eq(rdmaps_pull(a, ta, v, 0), 0);
	for (int i = 0; i < LEN; i++)
		cr_assert_eq(v[i], 2.0f, "[%d] = %f: clock 0 is both pushes, once", i, v[i]);
	cr_assert_eq(rdmaps_push(a, ta, g, 0), 0, "a: clock 1 after its pull");
	rdmaps_close(a);
	rdmaps_close(b);
}

/* ---- members leaving and evicted ------------------------------------- */

static void *leaver(void *p)
{
	struct warg *a = p;
	rdmaps_client *c = NULL;
	rdmaps_tensor *t;
	static float v[4][LEN], g[4][LEN];

	if ((a->rc = th_connect_token(&srv, TH_TOKEN, &c)))
		return NULL;
	t = declare(c, "members", LEN, RDMAPS_BSP, 0, 3, 0, &a->rc);
	pthread_barrier_wait(&joined);
	for (int i = 0; i < LEN; i++)
		g[a->w][i] = -1.0f;
	for (int k = 0; k < a->clocks && !a->rc; k++) {
		if (a->leave_after && k == a->leave_after)
			break; /* close mid-run: the others must not hang */
		if (!(a->rc = rdmaps_pull(c, t, v[a->w], 0)))
			a->rc = rdmaps_push(c, t, g[a->w], 0);
	}
	if (!a->rc && !a->leave_after)
		a->rc = rdmaps_flush(c, 30000);
	rdmaps_close(c);
	return NULL;
}

Test(consistency, bsp_goes_on_when_a_member_leaves, .fini = stop_server, .timeout = 300)
{
	pthread_t th[3];
	struct warg a[3];
	static float v[LEN];

	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	pthread_barrier_init(&joined, NULL, 3);
	for (int w = 0; w < 3; w++) {
		a[w] = (struct warg){ .w = w, .clocks = 8, .leave_after = w == 2 ? 3 : 0 };
		pthread_create(&th[w], NULL, leaver, &a[w]);
	}
	for (int w = 0; w < 3; w++) {
		pthread_join(th[w], NULL);
		cr_assert_eq(a[w].rc, 0, "worker %d: %s", w, rdmaps_strerror(a[w].rc));
	}
	rdmaps_client *c = th_connect(&srv);
	rdmaps_tensor *t;
	cr_assert_eq(rdmaps_lookup(c, "members", &t), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, RDMAPS_PULL_RELAXED), 0);
	/* three members for clocks 0-2, two for clocks 3-7 */
	for (int i = 0; i < LEN; i++)
		cr_assert_eq(v[i], 3.0f * 3 + 2.0f * 5, "[%d] = %f", i, v[i]);
	rdmaps_close(c);
}

Test(consistency, stalled_member_is_evicted_and_reported, .fini = stop_server, .timeout = 120)
{
	rdmaps_client *a, *b;
	rdmaps_tensor *ta, *tb;
	static float v[LEN], g[LEN];
	struct rdmaps_server_stats st;

	th_server_start(&srv, "--chunk-elems", "1024", "--evict-ms", "1500", NULL);
	bsp_pair("evict", &a, &b, &ta, &tb, g);
	/* a does clock 0; b never pushes: a's pull at clock 1 waits, then b is evicted */
	cr_assert_eq(rdmaps_pull(a, ta, v, 0), 0);
	cr_assert_eq(rdmaps_push(a, ta, g, 0), 0);
	uint64_t t0 = (uint64_t)time(NULL);
	cr_assert_eq(rdmaps_pull(a, ta, v, 0), 0, "the pull must end once b is evicted");
	cr_assert_geq((uint64_t)time(NULL) - t0, 1, "it waited for the eviction");
	for (int i = 0; i < LEN; i++)
		cr_assert_eq(v[i], 1.0f, "only a's push of clock 0: [%d] = %f", i, v[i]);
	cr_assert_eq(rdmaps_server_stats(a, &st), 0);
	cr_assert_eq(st.evictions, 1);
	/* b's late push is refused, and b hears of it */
	cr_assert_eq(rdmaps_push(b, tb, g, 0), 0);
	cr_assert_eq(rdmaps_flush(b, 10000), RDMAPS_EREMOTE);
	cr_assert_eq(rdmaps_pull(a, ta, v, RDMAPS_PULL_RELAXED), 0);
	cr_assert_eq(v[0], 1.0f, "the evicted push changed nothing");
	/* a goes on alone */
	cr_assert_eq(rdmaps_push(a, ta, g, 0), 0);
	cr_assert_eq(rdmaps_pull(a, ta, v, 0), 0);
	cr_assert_eq(v[LEN - 1], 2.0f);
	rdmaps_close(a);
	rdmaps_close(b);
}

/* ---- clipping and non-finite gradients -------------------------------- */

Test(consistency, clip_norm_and_nonfinite, .fini = stop_server, .timeout = 120)
{
	static float v[LEN], g[LEN];
	struct rdmaps_tensor_desc d = { .name = "clip", .length = LEN, .lr = 1.0f, .clip_norm = 2.0f };
	struct rdmaps_server_stats st;
	rdmaps_client *c;
	rdmaps_tensor *t;

	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	c = th_connect(&srv);
	cr_assert_eq(rdmaps_declare(c, &d, &t), 0);
	/* norm 5 (3-4-0...): scaled to norm 2 -> 1.2, 1.6 */
	g[0] = 3.0f;
	g[LEN - 1] = 4.0f;
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	cr_assert_float_eq(v[0], -1.2f, 1e-6, "v[0] = %f", v[0]);
	cr_assert_float_eq(v[LEN - 1], -1.6f, 1e-6, "v[last] = %f", v[LEN - 1]);
	cr_assert_eq(v[1], 0.0f);
	/* under the norm: untouched */
	memset(g, 0, sizeof(g));
	g[5] = 1.0f;
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	cr_assert_eq(v[5], -1.0f);
	/* a NaN or an infinity anywhere: the whole push is refused and counted */
	g[1500] = NAN;
	cr_assert_eq(rdmaps_push(c, t, g, 0), 0);
	cr_assert_eq(rdmaps_flush(c, 10000), RDMAPS_EREMOTE);
	g[1500] = INFINITY;
	cr_assert_eq(rdmaps_push(c, t, g, 0), 0);
	cr_assert_eq(rdmaps_flush(c, 10000), RDMAPS_EREMOTE);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	cr_assert_eq(v[5], -1.0f, "nothing of the refused pushes folded");
	cr_assert_eq(v[1500], 0.0f);
	cr_assert_eq(rdmaps_server_stats(c, &st), 0);
	cr_assert_eq(st.nonfinite, 2);
	rdmaps_close(c);
}
