/*
 * Compressed gradients: the worker's encoders with error feedback
 * (client/compress.c) and the fold thread's decoder (server/decode.c),
 * against reference decoders written the plain way, and every way a
 * payload can be malformed.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>

#include "client.h"
#include "gradfmt.h"
#include "half.h"
#include "server.h"

static uint64_t rng = 0x853c49e6748fea9bull;

static float uniform(void)
{
	rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
	return (float)((rng >> 40) * 0x1p-24) * 2.0f - 1.0f;
}

static void random_grad(float *g, size_t n)
{
	for (size_t i = 0; i < n; i++)
		g[i] = uniform() * (i % 17 == 0 ? 10.0f : 1.0f);
}

/* The reference decoder: the format's definition, read field by field. */
static void ref_decode(unsigned fmt, float *dst, size_t n, const uint8_t *p)
{
	uint32_t k, i;
	float v, scale;

	memset(dst, 0, n * sizeof(float));
	switch (fmt) {
	case RDMAPS__GRAD_F32:
		memcpy(dst, p, 4 * n);
		break;
	case RDMAPS__GRAD_BF16:
	case RDMAPS__GRAD_F16:
		for (size_t j = 0; j < n; j++) {
			uint16_t h;
			memcpy(&h, p + 2 * j, 2);
			dst[j] = fmt == RDMAPS__GRAD_BF16 ? rdmaps__bf16_to_f32(h) : rdmaps__f16_to_f32(h);
		}
		break;
	case RDMAPS__GRAD_TOPK:
		memcpy(&k, p, 4);
		for (uint32_t j = 0; j < k; j++) {
			memcpy(&i, p + 4 + 4 * j, 4);
			memcpy(&v, p + 4 + 4 * k + 4 * j, 4);
			dst[i] = v;
		}
		break;
	case RDMAPS__GRAD_SIGN:
		memcpy(&scale, p, 4);
		for (size_t j = 0; j < n; j++)
			dst[j] = (p[4 + j / 8] >> (j % 8)) & 1 ? -scale : scale;
		break;
	}
}

static size_t encode(unsigned fmt, struct cl_ef *ef, const float *g, size_t k, void *out)
{
	switch (fmt) {
	case RDMAPS__GRAD_TOPK:
		return cl_encode_topk(ef, g, k, out);
	case RDMAPS__GRAD_SIGN:
		return cl_encode_sign(ef, g, out);
	case RDMAPS__GRAD_F32:
		memcpy(out, g, 4 * ef->n);
		return 4 * ef->n;
	default:
		return cl_encode_half(fmt == RDMAPS__GRAD_BF16, g, ef->n, out);
	}
}

Test(compress, every_format_decodes_as_the_reference_decoder_does)
{
	static const size_t sizes[] = { 1, 7, 8, 9, 1000, 4096, 65537 };

	for (unsigned fmt = 0; fmt < RDMAPS__GRADFMT_COUNT; fmt++)
		for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
			size_t n = sizes[s], k = n / 100 + 1, len;
			float *g = malloc(n * 4), *got = malloc(n * 4), *want = malloc(n * 4);
			uint8_t *p = malloc(rdmaps__gradfmt_size(RDMAPS__GRAD_F32, n, 0) + 16);
			struct cl_ef ef;
			const char *why = NULL;
			double ss = -1, ss_want = 0;

			cr_assert_eq(cl_ef_init(&ef, n), 0);
			random_grad(g, n);
			len = encode(fmt, &ef, g, k, p);
			cr_assert_eq(len, rdmaps__gradfmt_size(fmt, n, fmt == RDMAPS__GRAD_TOPK ? k : 0),
				     "fmt %u n %zu", fmt, n);
			ref_decode(fmt, want, n, p);
			cr_assert_eq(srv_grad_decode(fmt, got, n, p, len, &ss, &why), 0, "fmt %u n %zu: %s",
				     fmt, n, why);
			cr_assert_arr_eq(got, want, n * 4, "fmt %u n %zu", fmt, n);
			memset(got, 0xff, n * 4);
			cr_assert_eq(srv_grad_decode(fmt, got, n, p, len, NULL, &why), 0, "%s", why);
			cr_assert_arr_eq(got, want, n * 4, "fmt %u n %zu, no sum", fmt, n);
			for (size_t i = 0; i < n; i++)
				ss_want += (double)want[i] * want[i];
			cr_assert(fabs(ss - ss_want) <= 1e-9 * ss_want, "sumsq %g, want %g", ss, ss_want);
			cl_ef_close(&ef);
			free(g), free(got), free(want), free(p);
		}
}

/* Over many steps nothing is lost, only delayed: sent + residual = sum. */
static void check_error_feedback(unsigned fmt, size_t n, size_t k)
{
	float *g = malloc(n * 4), *dec = malloc(n * 4);
	double *sum_g = calloc(n, sizeof(double)), *sum_sent = calloc(n, sizeof(double));
	uint8_t *p = malloc(4 * n + 16);
	struct cl_ef ef;
	double worst = 0, scale = 0;

	cr_assert_eq(cl_ef_init(&ef, n), 0);
	for (int step = 0; step < 100; step++) {
		random_grad(g, n);
		encode(fmt, &ef, g, k, p);
		ref_decode(fmt, dec, n, p);
		for (size_t i = 0; i < n; i++) {
			sum_g[i] += g[i];
			sum_sent[i] += dec[i];
		}
	}
	for (size_t i = 0; i < n; i++) {
		double d = fabs(sum_sent[i] + ef.residual[i] - sum_g[i]);
		worst = d > worst ? d : worst;
		scale = fabs(sum_g[i]) > scale ? fabs(sum_g[i]) : scale;
	}
	/* float rounding of 100 additions of values up to 10 */
	cr_assert(worst <= 1e-4 * (scale + 10), "fmt %u: sent + residual off by %g (scale %g)", fmt,
		  worst, scale);
	cl_ef_close(&ef);
	free(g), free(dec), free(sum_g), free(sum_sent), free(p);
}

Test(compress, error_feedback_loses_nothing_over_100_steps)
{
	check_error_feedback(RDMAPS__GRAD_TOPK, 10000, 100); /* 1 % */
	check_error_feedback(RDMAPS__GRAD_TOPK, 333, 1);
	check_error_feedback(RDMAPS__GRAD_SIGN, 10000, 0);
	check_error_feedback(RDMAPS__GRAD_SIGN, 13, 0);
}

static int by_magnitude_desc(const void *a, const void *b)
{
	float x = fabsf(*(const float *)a), y = fabsf(*(const float *)b);
	return x < y ? 1 : x > y ? -1 : 0;
}

Test(compress, top_k_sends_exactly_the_k_largest_magnitudes)
{
	enum { N = 5000 };
	static float g[N], sorted[N];
	static uint8_t p[4 + 8 * N];

	for (size_t k = 0; k <= N; k += k < 10 ? 1 : 997) {
		struct cl_ef ef;
		uint32_t cnt, prev = 0;
		float kth;

		random_grad(g, N);
		/* ties at the cut: many equal magnitudes of both signs */
		for (size_t i = 0; i < N; i += 5)
			g[i] = i % 2 ? 0.5f : -0.5f;
		memcpy(sorted, g, sizeof(g));
		qsort(sorted, N, sizeof(float), by_magnitude_desc);
		cr_assert_eq(cl_ef_init(&ef, N), 0);
		cr_assert_eq(cl_encode_topk(&ef, g, k, p), 4 + 8 * k);
		memcpy(&cnt, p, 4);
		cr_assert_eq(cnt, k);
		kth = k ? fabsf(sorted[k - 1]) : INFINITY;
		for (uint32_t j = 0; j < cnt; j++) {
			uint32_t i;
			float v;
			memcpy(&i, p + 4 + 4 * j, 4);
			memcpy(&v, p + 4 + 4 * k + 4 * j, 4);
			cr_assert(j == 0 || i > prev, "indices ascending");
			prev = i;
			cr_assert_eq(v, g[i], "the value sent is the gradient's");
			cr_assert(fabsf(v) >= kth, "sent %g below the k-th largest %g", v, kth);
			cr_assert_eq(ef.residual[i], 0.0f);
		}
		for (size_t i = 0; i < N; i++)
			cr_assert(ef.residual[i] == 0.0f || fabsf(ef.residual[i]) <= kth,
				  "kept %g above the k-th largest %g", ef.residual[i], kth);
		cl_ef_close(&ef);
	}
}

static void put32(uint8_t *p, uint32_t v)
{
	memcpy(p, &v, 4);
}

static void putf(uint8_t *p, float v)
{
	memcpy(p, &v, 4);
}

static void refused(unsigned fmt, size_t n, const uint8_t *p, size_t len, int code, const char *what)
{
	float dst[64];
	double ss = 0;
	const char *why = NULL;

	cr_assert_eq(srv_grad_decode(fmt, dst, n, p, len, &ss, &why), code, "%s", what);
	cr_assert_not_null(why, "%s: a reason", what);
	/* without the sum of squares (no clip norm): the same checks */
	why = NULL;
	cr_assert_eq(srv_grad_decode(fmt, dst, n, p, len, NULL, &why), code, "%s (no sum)", what);
	cr_assert_not_null(why, "%s: a reason", what);
}

Test(compress, malformed_payloads_are_refused_whole)
{
	uint8_t p[256] = { 0 };

	/* top-k, n = 10 */
	put32(p, 2), put32(p + 4, 3), put32(p + 8, 7), putf(p + 12, 1.0f), putf(p + 16, 2.0f);
	refused(RDMAPS__GRAD_TOPK, 10, p, 19, RDMAPS_EPROTO, "top-k one byte short");
	refused(RDMAPS__GRAD_TOPK, 10, p, 24, RDMAPS_EPROTO, "top-k with bytes to spare");
	refused(RDMAPS__GRAD_TOPK, 10, p, 3, RDMAPS_EPROTO, "top-k without its count");
	put32(p, 11);
	refused(RDMAPS__GRAD_TOPK, 10, p, 4 + 8 * 11, RDMAPS_EPROTO, "top-k with k > n");
	put32(p, 2), put32(p + 8, 10);
	refused(RDMAPS__GRAD_TOPK, 10, p, 20, RDMAPS_ERANGE, "top-k index = n");
	put32(p + 8, 0xffffffffu);
	refused(RDMAPS__GRAD_TOPK, 10, p, 20, RDMAPS_ERANGE, "top-k index 2^32-1");
	put32(p + 8, 3);
	refused(RDMAPS__GRAD_TOPK, 10, p, 20, RDMAPS_EPROTO, "top-k index repeated");
	put32(p + 8, 2);
	refused(RDMAPS__GRAD_TOPK, 10, p, 20, RDMAPS_EPROTO, "top-k indices descending");
	put32(p + 8, 7), putf(p + 16, NAN);
	refused(RDMAPS__GRAD_TOPK, 10, p, 20, RDMAPS_EINVAL, "top-k NaN value");
	putf(p + 16, -INFINITY);
	refused(RDMAPS__GRAD_TOPK, 10, p, 20, RDMAPS_EINVAL, "top-k infinite value");

	/* sign, n = 10: 4 + 2 bytes of bits + 2 of padding */
	memset(p, 0, sizeof(p));
	putf(p, 0.25f);
	refused(RDMAPS__GRAD_SIGN, 10, p, 6, RDMAPS_EPROTO, "sign without its padding");
	refused(RDMAPS__GRAD_SIGN, 10, p, 12, RDMAPS_EPROTO, "sign with bytes to spare");
	p[5] = 0x04; /* element 10: past n */
	refused(RDMAPS__GRAD_SIGN, 10, p, 8, RDMAPS_EPROTO, "sign bit past n");
	p[5] = 0, p[7] = 1;
	refused(RDMAPS__GRAD_SIGN, 10, p, 8, RDMAPS_EPROTO, "sign padding not zero");
	p[7] = 0;
	putf(p, -0.25f);
	refused(RDMAPS__GRAD_SIGN, 10, p, 8, RDMAPS_EINVAL, "sign negative scale");
	putf(p, NAN);
	refused(RDMAPS__GRAD_SIGN, 10, p, 8, RDMAPS_EINVAL, "sign NaN scale");
	putf(p, INFINITY);
	refused(RDMAPS__GRAD_SIGN, 10, p, 8, RDMAPS_EINVAL, "sign infinite scale");

	/* 16-bit floats, n = 5: 10 bytes + 2 of padding */
	memset(p, 0, sizeof(p));
	refused(RDMAPS__GRAD_BF16, 5, p, 10, RDMAPS_EPROTO, "bf16 without padding");
	refused(RDMAPS__GRAD_F16, 5, p, 16, RDMAPS_EPROTO, "fp16 too long");
	p[8] = 0x80, p[9] = 0x7f; /* bf16 +Inf */
	refused(RDMAPS__GRAD_BF16, 5, p, 12, RDMAPS_EINVAL, "bf16 Inf");
	p[8] = 0x01, p[9] = 0x7c; /* fp16 NaN */
	refused(RDMAPS__GRAD_F16, 5, p, 12, RDMAPS_EINVAL, "fp16 NaN");
	p[8] = 0, p[9] = 0, p[10] = 1; /* padding after the 5th value */
	refused(RDMAPS__GRAD_BF16, 5, p, 12, RDMAPS_EPROTO, "bf16 padding not zero");
	refused(RDMAPS__GRAD_F16, 5, p, 12, RDMAPS_EPROTO, "fp16 padding not zero");
	refused(RDMAPS__GRAD_F32, 3, p, 8, RDMAPS_EPROTO, "float32 too short");
	refused(7, 3, p, 12, RDMAPS_EPROTO, "unknown format");
}

Test(compress, a_non_finite_gradient_leaves_the_residual_as_it_was)
{
	enum { N = 100 };
	float g[N], before[N];
	uint8_t p[4 + 8 * N];
	struct cl_ef ef;

	cr_assert_eq(cl_ef_init(&ef, N), 0);
	random_grad(g, N);
	cr_assert_gt(cl_encode_sign(&ef, g, p), 0);
	memcpy(before, ef.residual, sizeof(before));
	/* NaN, inf, and a finite value whose sum with a residual could
	 * overflow: all refused before anything moves */
	for (int bad = 0; bad < 3; bad++) {
		g[37] = bad == 2 ? 0x1p127f : bad ? INFINITY : NAN;
		cr_assert_eq(cl_encode_sign(&ef, g, p), 0, "sign refuses");
		cr_assert_eq(cl_encode_topk(&ef, g, 5, p), 0, "top-k refuses");
		cr_assert_arr_eq(ef.residual, before, sizeof(before), "residual untouched");
	}
	g[37] = 0x1.fffffep126f; /* the largest that fits */
	cr_assert(cl_ef_fits(ef.residual, g, N));
	g[37] = 0.5f;
	cr_assert_gt(cl_encode_sign(&ef, g, p), 0, "and the next finite one goes");
	for (size_t i = 0; i < N; i++)
		cr_assert(isfinite(ef.residual[i]));
	cl_ef_close(&ef);
}

Test(compress, well_formed_edges_are_accepted)
{
	uint8_t p[64] = { 0 };
	float dst[16];
	double ss = -1;
	const char *why = NULL;

	/* k = 0: all zeros */
	for (size_t i = 0; i < 16; i++)
		dst[i] = 9.0f;
	cr_assert_eq(srv_grad_decode(RDMAPS__GRAD_TOPK, dst, 16, p, 4, &ss, &why), 0, "%s", why);
	for (size_t i = 0; i < 16; i++)
		cr_assert_eq(dst[i], 0.0f);
	cr_assert_eq(ss, 0.0);
	/* sign with a zero scale, and a full last byte (n = 16) */
	p[4] = 0xff, p[5] = 0x80;
	cr_assert_eq(srv_grad_decode(RDMAPS__GRAD_SIGN, dst, 16, p, 8, &ss, &why), 0, "%s", why);
	putf(p, 2.0f);
	cr_assert_eq(srv_grad_decode(RDMAPS__GRAD_SIGN, dst, 16, p, 8, &ss, &why), 0, "%s", why);
	cr_assert_eq(dst[0], -2.0f);
	cr_assert_eq(dst[8], 2.0f);
	cr_assert_eq(dst[15], -2.0f);
	cr_assert_eq(ss, 64.0);
}
