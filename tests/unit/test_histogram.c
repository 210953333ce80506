#include <criterion/criterion.h>
#include <stdlib.h>

#include "histogram.h"

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

Test(histogram, quantiles_match_sorted_samples_within_bucket_error)
{
	static struct rdmaps_hist h;
	enum { N = 100000 };
	uint64_t *v = malloc(N * sizeof(*v));
	uint64_t x = 88172645463325252ull;

	rdmaps__hist_reset(&h);
	for (int i = 0; i < N; i++) {
		/* xorshift: a wide, skewed spread like real latencies */
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		v[i] = 1000 + (x % 1000) * (x % 97 == 0 ? 1000 : 1);
		rdmaps__hist_record(&h, v[i]);
	}
	qsort(v, N, sizeof(*v), cmp_u64);
	const double qs[] = { 0.5, 0.9, 0.99, 0.999 };
	for (unsigned i = 0; i < 4; i++) {
		uint64_t exact = v[(size_t)(qs[i] * N + 0.999999) - 1];
		uint64_t got = rdmaps__hist_quantile(&h, qs[i]);
		cr_assert_geq(got, exact, "q%.3f: %lu < exact %lu", qs[i], got, exact);
		cr_assert_leq((double)got, exact * (1.0 + 1.0 / RDMAPS_HIST_SUB) + 1,
			      "q%.3f: %lu too far above exact %lu", qs[i], got, exact);
	}
	cr_assert_eq(h.count, N);
	cr_assert_eq(rdmaps__hist_quantile(&h, 1.0), v[N - 1]);
	cr_assert_eq(rdmaps__hist_quantile(&h, 0.0), v[0]);
	free(v);
}

Test(histogram, small_values_exact_and_merge)
{
	static struct rdmaps_hist a, b;
	rdmaps__hist_reset(&a);
	rdmaps__hist_reset(&b);
	for (uint64_t i = 1; i <= 100; i++)
		rdmaps__hist_record(i % 2 ? &a : &b, i);
	rdmaps__hist_merge(&a, &b);
	cr_assert_eq(a.count, 100);
	cr_assert_eq(rdmaps__hist_quantile(&a, 0.5), 50);
	cr_assert_eq(rdmaps__hist_quantile(&a, 0.99), 99);
	cr_assert_float_eq(rdmaps__hist_mean(&a), 50.5, 1e-9);
}
