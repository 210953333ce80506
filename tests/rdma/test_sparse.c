/*
 * Sparse tables: workers pull and push only the rows they name, rows that
 * overlap between workers, on one server and across three; one worker
 * through the asynchronous forms. The expected
 * table is computed in the test from the same random draws.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

#define ROWS 1000
#define DIM 16
#define W 3
#define STEPS 40
#define BATCH 25

static struct th_server srv[3];
static int nsrv;
static char servers[512];
static const char *host[5];

static void stop_all(void)
{
	for (int i = 0; i < nsrv; i++)
		th_server_stop(&srv[i]);
}

static void start(int n)
{
	size_t len = 0;

	nsrv = n;
	th_hosts(host, 5);
	for (int i = 0; i < n; i++) {
		th_server_start_at(&srv[i], n == 1 ? th_addr() : host[i], "--chunk-elems", "1024",
				   "--fold-threads", "2", NULL);
		len += (size_t)snprintf(servers + len, sizeof(servers) - len, "%s%s:%s", i ? "," : "",
					srv[i].addr, srv[i].port);
	}
}

/* the rows worker w touches at step k: overlapping, some twice in a batch */
static uint64_t row_of(int w, int k, int j)
{
	uint64_t x = (uint64_t)(w * 7919 + k * 104729 + j * 1299709) * 2654435761u;
	return (x >> 7) % (j % 5 == 0 ? 50 : ROWS); /* every fifth in a hot set of 50 */
}

struct warg {
	int w, rc;
	char what[160];
};

static int connect_any(int w, rdmaps_client **c)
{
	return th_connect_cluster(servers, nsrv == 1 ? th_addr() : host[3 + w % 2], c);
}

/* A pulled row is whole: all its elements moved together. */
static int rows_whole(const float *v, const uint64_t *rows, struct warg *a)
{
	for (int j = 0; j < BATCH; j++)
		for (int e = 2; e < DIM; e++)
			if (v[j * DIM + e] != v[j * DIM + e % 2]) {
				snprintf(a->what, sizeof(a->what), "row %lu torn", (unsigned long)rows[j]);
				return RDMAPS_EPROTO;
			}
	return 0;
}

static void fill_step(int w, int k, uint64_t *rows, float *g)
{
	for (int j = 0; j < BATCH; j++) {
		rows[j] = row_of(w, k, j);
		for (int e = 0; e < DIM; e++) /* -1 per touch on element e of the row */
			g[j * DIM + e] = -(float)(1 + e % 2);
	}
}

/* The asynchronous forms: a pull, then two steps' pushes in flight at once
 * (each with its own rows and gradient, untouched until it completes). */
static int async_steps(rdmaps_client *c, rdmaps_tensor *t, struct warg *a)
{
	static uint64_t rows[2][BATCH];
	static float g[2][BATCH * DIM], v[BATCH * DIM];
	rdmaps_op *op[2];
	int rc = 0;

	for (int k = 0; k < STEPS && !rc; k += 2) {
		fill_step(a->w, k, rows[0], g[0]);
		fill_step(a->w, k + 1, rows[1], g[1]);
		if ((rc = rdmaps_pull_rows_async(c, t, rows[0], BATCH, v, 0, &op[0])) ||
		    (rc = rdmaps_wait(op[0], 30000)) || (rc = rows_whole(v, rows[0], a)))
			break;
		if ((rc = rdmaps_push_rows_async(c, t, rows[0], BATCH, g[0], 0, &op[0])))
			break;
		if ((rc = rdmaps_push_rows_async(c, t, rows[1], BATCH, g[1], 0, &op[1]))) {
			rdmaps_wait(op[0], 30000);
			break;
		}
		rc = rdmaps_wait(op[0], 30000);
		int rc2 = rdmaps_wait(op[1], 30000);
		rc = rc ? rc : rc2;
	}
	/* flags that do not fit the op are refused, and nothing is posted */
	if (!rc && rdmaps_pull_rows_async(c, t, rows[0], BATCH, v, RDMAPS_PUSH_FOLDED, &op[0]) !=
			   RDMAPS_EINVAL)
		rc = RDMAPS_EPROTO;
	return rc;
}

static void *worker(void *p)
{
	struct warg *a = p;
	struct rdmaps_tensor_desc d = { .name = "emb", .length = ROWS * DIM, .lr = 1.0f,
					.row_dim = DIM, .init_value = 0.5f };
	rdmaps_client *c = NULL;
	rdmaps_tensor *t;
	uint64_t rows[BATCH];
	static float g[W][BATCH * DIM], v[W][BATCH * DIM];

	if ((a->rc = connect_any(a->w, &c)) || (a->rc = rdmaps_declare(c, &d, &t)))
		goto out;
	if (rdmaps_tensor_row_dim(t) != DIM) {
		a->rc = RDMAPS_EPROTO;
		goto out;
	}
	if (a->w == 2)
		a->rc = async_steps(c, t, a);
	for (int k = 0; k < STEPS && !a->rc && a->w != 2; k++) {
		fill_step(a->w, k, rows, g[a->w]);
		if ((a->rc = rdmaps_pull_rows(c, t, rows, BATCH, v[a->w], 0)))
			break;
		if (!(a->rc = rows_whole(v[a->w], rows, a)))
			a->rc = rdmaps_push_rows(c, t, rows, BATCH, g[a->w], 0);
	}
	if (!a->rc)
		a->rc = rdmaps_flush(c, 30000);
out:
	rdmaps_close(c);
	return NULL;
}

static void run(int nservers)
{
	pthread_t th[W];
	struct warg a[W];
	static float want[ROWS * DIM], got[ROWS * DIM];
	uint64_t all[ROWS];
	rdmaps_client *c;
	rdmaps_tensor *t;

	start(nservers);
	for (int i = 0; i < ROWS * DIM; i++)
		want[i] = 0.5f;
	for (int w = 0; w < W; w++)
		for (int k = 0; k < STEPS; k++)
			for (int j = 0; j < BATCH; j++)
				for (int e = 0; e < DIM; e++)
					want[row_of(w, k, j) * DIM + e] += (float)(1 + e % 2);
	for (int w = 0; w < W; w++) {
		a[w] = (struct warg){ .w = w };
		pthread_create(&th[w], NULL, worker, &a[w]);
	}
	for (int w = 0; w < W; w++) {
		pthread_join(th[w], NULL);
		cr_assert_eq(a[w].rc, 0, "worker %d: %s %s", w, rdmaps_strerror(a[w].rc), a[w].what);
	}
	cr_assert_eq(connect_any(0, &c), 0);
	cr_assert_eq(rdmaps_lookup(c, "emb", &t), 0);
	cr_assert_eq(rdmaps_tensor_row_dim(t), DIM);
	/* the whole table by rows (in reverse, to exercise the scatter) and dense */
	for (int r = 0; r < ROWS; r++)
		all[r] = ROWS - 1 - (uint64_t)r;
	cr_assert_eq(rdmaps_pull_rows(c, t, all, ROWS, got, 0), 0);
	for (int r = 0; r < ROWS; r++)
		for (int e = 0; e < DIM; e++)
			cr_assert_eq(got[r * DIM + e], want[(ROWS - 1 - r) * DIM + e], "row %d [%d]: %f vs %f",
				     ROWS - 1 - r, e, got[r * DIM + e], want[(ROWS - 1 - r) * DIM + e]);
	cr_assert_eq(rdmaps_pull(c, t, got, 0), 0);
	cr_assert_eq(memcmp(got, want, sizeof(want)), 0, "dense pull of the table");
	/* bad input: a row past the end changes nothing */
	uint64_t bad = ROWS;
	cr_assert_eq(rdmaps_push_rows(c, t, &bad, 1, got, 0), RDMAPS_ERANGE);
	cr_assert_eq(rdmaps_pull_rows(c, t, &bad, 1, got, 0), RDMAPS_ERANGE);
	rdmaps_close(c);
}

Test(sparse, overlapping_rows_exact_one_server, .fini = stop_all, .timeout = 300)
{
	run(1);
}

Test(sparse, overlapping_rows_exact_three_servers, .fini = stop_all, .timeout = 300)
{
	run(3);
}

Test(sparse, row_declarations_checked, .fini = stop_all, .timeout = 60)
{
	rdmaps_client *c;
	rdmaps_tensor *t;
	struct rdmaps_tensor_desc d = { .name = "bad", .length = 100, .lr = 1.0f, .row_dim = 7 };

	start(1);
	cr_assert_eq(connect_any(0, &c), 0);
	cr_assert_eq(rdmaps_declare(c, &d, &t), RDMAPS_EINVAL, "7 does not divide 100");
	d.row_dim = 10;
	d.consistency = RDMAPS_BSP;
	cr_assert_eq(rdmaps_declare(c, &d, &t), RDMAPS_EINVAL, "row pushes need ASP");
	d.consistency = RDMAPS_ASP;
	cr_assert_eq(rdmaps_declare(c, &d, &t), 0);
	uint64_t r = 3;
	float x[10];
	cr_assert_eq(rdmaps_pull_rows(c, t, &r, 1, x, 0), 0);
	d.name = "dense";
	d.row_dim = 0;
	cr_assert_eq(rdmaps_declare(c, &d, &t), 0);
	cr_assert_eq(rdmaps_pull_rows(c, t, &r, 1, x, 0), RDMAPS_EINVAL, "dense tensors have no rows");
	rdmaps_close(c);
}
