/*
 * server/grad.c: a staged slot's payload is copied out of the staging ring
 * and the copy is checked. Exact copies; NaN and both infinities found at
 * any position (vector bodies, tails, block edges); the sum of squares
 * exact against a double reference and past the clip norm for huge finite
 * values; row ids checked on the copy. And the property the copy exists
 * for: with another thread rewriting the source all the while, an accepted
 * copy never holds a value that the check would have refused.
 */
#include <criterion/criterion.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"

#define N_MAX 5000u /* past two of grad.c's 2048-float blocks */

static float src[N_MAX], dst[N_MAX + 1];

static void fill(size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		src[i] = (float)((int)((i * 2654435761u + seed) % 2001u) - 1000) * 0.125f;
}

/* Lengths that hit every tail of 4/8/16-wide loops and the block edges. */
static const size_t lengths[] = { 0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65,
				  2047, 2048, 2049, 4095, 4096, 4097, N_MAX };

Test(grad, copy_finite_copies_exactly)
{
	for (size_t k = 0; k < sizeof(lengths) / sizeof(lengths[0]); k++) {
		size_t n = lengths[k];
		fill(n, (unsigned)k);
		if (n)
			src[n - 1] = FLT_MAX; /* huge but finite */
		if (n > 2)
			src[1] = 1e-45f; /* denormal */
		memset(dst, 0xa5, sizeof(dst));
		cr_assert(srv_grad_copy_finite(dst, src, n), "n=%zu: finite values refused", n);
		cr_assert_eq(memcmp(dst, src, n * sizeof(float)), 0, "n=%zu: copy differs", n);
		cr_assert_eq(((uint32_t *)dst)[n], 0xa5a5a5a5u, "n=%zu: wrote past the end", n);
	}
}

Test(grad, copy_finite_finds_nan_and_infinities_anywhere)
{
	const float bad[] = { NAN, -NAN, INFINITY, -INFINITY, __builtin_nansf("") };

	for (size_t k = 0; k < sizeof(lengths) / sizeof(lengths[0]); k++) {
		size_t n = lengths[k];
		const size_t at[] = { 0, n / 2, n - 1, 2047, 2048, 4095 };
		for (size_t a = 0; n && a < sizeof(at) / sizeof(at[0]); a++) {
			if (at[a] >= n)
				continue;
			for (size_t b = 0; b < sizeof(bad) / sizeof(bad[0]); b++) {
				fill(n, (unsigned)(k + a));
				src[at[a]] = bad[b];
				cr_assert_not(srv_grad_copy_finite(dst, src, n),
					      "n=%zu: %g at %zu accepted", n, (double)bad[b], at[a]);
				cr_assert_eq(memcmp(dst, src, n * sizeof(float)), 0,
					     "n=%zu: the copy is what was checked", n);
			}
		}
	}
}

Test(grad, copy_sumsq_exact_and_nonfinite)
{
	for (size_t k = 0; k < sizeof(lengths) / sizeof(lengths[0]); k++) {
		size_t n = lengths[k];
		double want = 0.0, got;

		fill(n, 7u * (unsigned)k);
		/* values k/8 with |k| <= 1000: every square and partial sum is
		 * exact in double, whatever the order of the chains */
		for (size_t i = 0; i < n; i++)
			want += (double)src[i] * src[i];
		got = srv_grad_copy_sumsq(dst, src, n);
		cr_assert_eq(got, want, "n=%zu: sum %.17g, want %.17g", n, got, want);
		cr_assert_eq(memcmp(dst, src, n * sizeof(float)), 0, "n=%zu: copy differs", n);
		if (!n)
			continue;
		src[n / 2] = NAN;
		cr_assert(isnan(srv_grad_copy_sumsq(dst, src, n)), "n=%zu: NaN", n);
		src[n / 2] = -INFINITY;
		cr_assert(isinf(srv_grad_copy_sumsq(dst, src, n)), "n=%zu: -inf", n);
		/* huge finite values do not overflow the double sum */
		for (size_t i = 0; i < n; i++)
			src[i] = -FLT_MAX;
		got = srv_grad_copy_sumsq(dst, src, n);
		cr_assert(isfinite(got) && got >= (double)n * FLT_MAX * (double)FLT_MAX * 0.999,
			  "n=%zu: sum of FLT_MAX^2 = %g", n, got);
	}
}

/* ---- a slot's payload, through a tensor of the store ---------------------- */

static struct srv_store store;

static void store_fini(void)
{
	srv_store_fini(&store);
}

static struct srv_tensor *declare(const char *name, uint64_t length, float clip, uint32_t row_dim)
{
	struct srv_config cfg = { .max_tensors = 4, .chunk_elems = 4096,
				  .max_tensor_bytes = 1ull << 30, .max_total_bytes = 1ull << 30 };
	struct rdmaps_msg_declare m = { 0 };
	struct srv_tensor *t;
	bool created;

	if (!store.tensors)
		cr_assert_eq(srv_store_init(&store, &cfg), 0);
	m.length = length;
	m.hyper.lr = 1.0f;
	m.cons.clip_norm = clip;
	m.cons.row_dim = row_dim;
	strcpy(m.optimizer, "sgd");
	strcpy(m.name, name);
	cr_assert_eq(srv_store_declare(&store, &m, NULL, &t, &created), 0);
	return t;
}

Test(grad, slot_take_dense, .fini = store_fini)
{
	struct srv_tensor *plain = declare("plain", 4096, 0.0f, 0);
	struct srv_tensor *clipped = declare("clipped", 4096, 10.0f, 0);
	struct rdmaps_slot_hdr h = { .count = 4096, .scale = 1.0f };
	const char *why = NULL;
	double ss = -1.0;

	for (size_t i = 0; i < 4096; i++)
		src[i] = 0.5f;
	cr_assert_eq(srv_slot_take(plain, &h, dst, src, sizeof(src), &ss, &why), 0);
	cr_assert_eq(ss, 0.0, "no clip norm: no sum");
	cr_assert_eq(memcmp(dst, src, 4096 * sizeof(float)), 0);
	cr_assert_eq(srv_slot_take(clipped, &h, dst, src, sizeof(src), &ss, &why), 0);
	cr_assert_eq(ss, 4096 * 0.25);
	/* past the clip norm: accepted, the sum says by how much to scale */
	src[100] = 1e30f;
	cr_assert_eq(srv_slot_take(clipped, &h, dst, src, sizeof(src), &ss, &why), 0);
	cr_assert_geq(ss, 1e60);
	cr_assert_eq(dst[100], 1e30f);
	src[4095] = NAN;
	cr_assert_eq(srv_slot_take(plain, &h, dst, src, sizeof(src), &ss, &why), RDMAPS_EINVAL);
	cr_assert_str_eq(why, "non-finite gradient");
	cr_assert_eq(srv_slot_take(clipped, &h, dst, src, sizeof(src), &ss, &why), RDMAPS_EINVAL);
}

Test(grad, slot_take_rows, .fini = store_fini)
{
	enum { DIM = 8, ROWS = 3 };
	struct srv_tensor *t = declare("rows", 10 * DIM, 0.0f, DIM); /* 10 rows */
	struct rdmaps_slot_hdr h = { .count = ROWS, .flags = RDMAPS_SLOT_ROWS, .scale = 1.0f };
	uint64_t in[ROWS + ROWS * DIM / 2], out[ROWS + ROWS * DIM / 2 + 1];
	float *v = (float *)(in + ROWS);
	const char *why = NULL;
	size_t n;
	double ss;

	in[0] = 9;
	in[1] = 0;
	in[2] = 4;
	for (int i = 0; i < ROWS * DIM; i++)
		v[i] = (float)i;
	cr_assert_eq(srv_slot_take(t, &h, out, in, sizeof(in), &ss, &why), 0);
	cr_assert_eq(memcmp(out, in, sizeof(in)), 0, "ids and values copied");
	cr_assert_eq(srv_slot_values(t, &h, out, &n), (float *)(out + ROWS));
	cr_assert_eq(n, ROWS * DIM);
	in[1] = 10; /* one past the last row */
	cr_assert_eq(srv_slot_take(t, &h, out, in, sizeof(in), &ss, &why), RDMAPS_ERANGE);
	cr_assert_str_eq(why, "row id out of range");
	in[1] = 1;
	v[ROWS * DIM - 1] = INFINITY;
	cr_assert_eq(srv_slot_take(t, &h, out, in, sizeof(in), &ss, &why), RDMAPS_EINVAL);
}

/*
 * The race a worker can run: it rewrites its slot while the server takes
 * it. A writer thread flips the source between finite values and NaN (and
 * 1e30 for the clip norm) as fast as it can; every take must agree with
 * its own copy: accepted only if the copy is finite (and its sum is the
 * copy's), refused only if the copy holds what was refused.
 */
#define RACE_N 4096u /* one chunk of the store's */
static float race_src[RACE_N], race_dst[RACE_N];
static atomic_bool race_stop;

/* One bad value at a time, held a moment, then put back, at positions
 * spread over the slot: most takes see none, some catch one. */
static void *scribbler(void *arg)
{
	const float v = *(const float *)arg;
	uint32_t b, one;

	memcpy(&b, &v, sizeof(b));
	memcpy(&one, &(float){ 1.0f }, sizeof(one));
	for (uint64_t k = 0; !atomic_load_explicit(&race_stop, memory_order_relaxed); k++) {
		uint32_t *w = (uint32_t *)&race_src[(k * 1031u) % RACE_N];
		__atomic_store_n(w, b, __ATOMIC_RELAXED);
		for (int j = 0; j < 16; j++)
			rdmaps__cpu_relax();
		__atomic_store_n(w, one, __ATOMIC_RELAXED);
	}
	return NULL;
}

static void take_race(float poison, float clip)
{
	struct srv_tensor *t = declare(clip > 0 ? "rc" : "rn", RACE_N, clip, 0);
	struct rdmaps_slot_hdr h = { .count = RACE_N, .scale = 1.0f };
	unsigned accepted = 0, refused = 0;
	pthread_t w;

	for (size_t i = 0; i < RACE_N; i++)
		race_src[i] = 1.0f;
	atomic_store(&race_stop, false);
	cr_assert_eq(pthread_create(&w, NULL, scribbler, &poison), 0);
	for (int it = 0; it < 20000; it++) {
		const char *why;
		double ss = 0.0, want = 0.0;
		bool finite = true;
		int rc = srv_slot_take(t, &h, race_dst, race_src, sizeof(race_src), &ss, &why);

		for (uint32_t i = 0; i < h.count; i++) {
			finite &= isfinite(race_dst[i]);
			want += (double)race_dst[i] * race_dst[i];
		}
		if (rc == 0) {
			accepted++;
			cr_assert(finite, "accepted a copy holding NaN");
			/* the copy's sum (added in another order), not the
			 * source's: a value flipped between them moves it by 1e60 */
			if (clip > 0)
				cr_assert(fabs(ss - want) <= 1e-9 * want,
					  "the sum is not the copy's: %g vs %g", ss, want);
		} else {
			refused++;
			cr_assert_eq(rc, RDMAPS_EINVAL);
			cr_assert_not(finite, "refused a finite copy");
		}
	}
	atomic_store(&race_stop, true);
	pthread_join(w, NULL);
	cr_log_info("take under rewrites (%g): %u accepted, %u refused", (double)poison, accepted,
		    refused);
}

Test(grad, take_checks_its_own_copy_under_rewrites, .fini = store_fini, .timeout = 120)
{
	take_race(NAN, 0.0f);
	take_race(1e30f, 100.0f);
}
