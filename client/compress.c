/*
 * compress.c -- a gradient into fewer bytes (common/gradfmt.h), on the
 * worker, with error feedback for the formats that drop information.
 *
 * Error feedback (as in EF-signSGD and Deep Gradient Compression): the
 * worker keeps a residual, what earlier pushes did not send. Each push
 * compresses residual + gradient, and the part not sent becomes the new
 * residual, so nothing is lost, only delayed: over any number of steps,
 * what was sent plus the residual equals the sum of the gradients (up to
 * float rounding). bf16/fp16 keep no residual: their rounding error is
 * below the gradient's own noise, and the formats are exact for what they
 * hold.
 *
 * Top-k picks the k largest magnitudes without sorting: a radix select on
 * the float bits (magnitude order is integer order of the bits without the
 * sign), three passes of an 11-bit histogram on the stack, then one pass
 * that writes indices in ascending order, as the format wants. No
 * allocation after cl_ef_init.
 */
#include <stdlib.h>
#include <string.h>

#include "client.h"
#include "gradfmt.h"
#include "half.h"

int cl_ef_init(struct cl_ef *ef, size_t n)
{
	ef->n = n;
	ef->residual = calloc(n ? n : 1, sizeof(float));
	return ef->residual ? 0 : RDMAPS_ENOMEM;
}

void cl_ef_close(struct cl_ef *ef)
{
	free(ef->residual);
	ef->residual = NULL;
	ef->n = 0;
}

static uint32_t mag(float f)
{
	return rdmaps__f32_bits(f) & 0x7fffffffu;
}

/*
 * The k-th largest magnitude of a[0..n) (1 <= k <= n) and, in *ties, how
 * many elements of exactly that magnitude the top k holds.
 */
static uint32_t kth_largest(const float *a, size_t n, size_t k, size_t *ties)
{
	static const unsigned shift[3] = { 21, 10, 0 };
	static const uint32_t width[3] = { 0x7ffu, 0x7ffu, 0x3ffu };
	uint32_t prefix = 0, mask = 0;
	size_t need = k;

	for (int p = 0; p < 3; p++) {
		uint32_t hist[2048] = { 0 };
		uint32_t b = width[p] + 1;

		for (size_t i = 0; i < n; i++) {
			uint32_t m = mag(a[i]);
			if ((m & mask) == prefix)
				hist[(m >> shift[p]) & width[p]]++;
		}
		/* from the largest bucket down, to the one holding the k-th */
		while (b-- > 0 && hist[b] < need)
			need -= hist[b];
		prefix |= b << shift[p];
		mask |= width[p] << shift[p];
	}
	*ties = need;
	return prefix;
}

/* Whether residual + g is finite everywhere, and its l1 norm: a
 * non-finite value would poison the residual for every later push. */
static bool sum_finite(const float *r, const float *g, size_t n, double *l1)
{
	double s = 0.0;

	for (size_t i = 0; i < n; i++) {
		float a = r[i] + g[i];
		s += a < 0.0f ? -(double)a : (double)a;
	}
	*l1 = s;
	return __builtin_isfinite(s);
}

size_t cl_encode_topk(struct cl_ef *ef, const float *g, size_t k, void *out)
{
	float *r = ef->residual;
	size_t n = ef->n, ties = 0, j = 0;
	uint32_t t = 0, kk;
	uint8_t *idx = (uint8_t *)out + 4, *val;
	double l1;

	if (!sum_finite(r, g, n, &l1))
		return 0;
	if (k > n)
		k = n;
	for (size_t i = 0; i < n; i++)
		r[i] += g[i];
	if (k)
		t = kth_largest(r, n, k, &ties);
	val = idx + 4 * k;
	for (size_t i = 0; i < n && j < k; i++) {
		uint32_t m = mag(r[i]), i32 = (uint32_t)i;
		if (m > t || (m == t && ties && ties--)) {
			memcpy(idx + 4 * j, &i32, 4);
			memcpy(val + 4 * j, &r[i], 4);
			r[i] = 0.0f; /* sent: nothing of it stays behind */
			j++;
		}
	}
	kk = (uint32_t)j;
	memcpy(out, &kk, 4);
	return rdmaps__gradfmt_size(RDMAPS__GRAD_TOPK, n, j);
}

size_t cl_encode_sign(struct cl_ef *ef, const float *g, void *out)
{
	float *r = ef->residual;
	size_t n = ef->n, len = rdmaps__gradfmt_size(RDMAPS__GRAD_SIGN, n, 0);
	uint8_t *bits = (uint8_t *)out + 4;
	double l1;
	float scale;

	if (!sum_finite(r, g, n, &l1))
		return 0;
	for (size_t i = 0; i < n; i++)
		r[i] += g[i];
	/* the mean magnitude: the scale that keeps the l1 norm */
	scale = n ? (float)(l1 / (double)n) : 0.0f;
	memcpy(out, &scale, 4);
	memset(bits, 0, len - 4);
	for (size_t i = 0; i < n; i++) {
		bool neg = r[i] < 0.0f;
		bits[i / 8] |= (uint8_t)(neg << (i % 8));
		r[i] -= neg ? -scale : scale;
	}
	return len;
}

size_t cl_encode_half(bool bf16, const float *g, size_t n, void *out)
{
	size_t len = rdmaps__gradfmt_size(bf16 ? RDMAPS__GRAD_BF16 : RDMAPS__GRAD_F16, n, 0);

	(bf16 ? rdmaps__f32_to_bf16_n : rdmaps__f32_to_f16_n)(out, g, n);
	if (n % 2) /* the padding is zero, as the format says */
		memset((uint16_t *)out + n, 0, 2);
	return len;
}
