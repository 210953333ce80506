/*
 * decode.c -- a compressed gradient (common/gradfmt.h) into the fold
 * thread's private float copy: the "take" of a compressed push. What
 * srv_slot_take does for float32 (copy out of the worker's reach, check),
 * this does while expanding: each byte of the staging ring is read once,
 * into dst or a local, a compiler barrier follows (SRV_FORGET_MEMORY), and
 * what is checked is that copy, so a worker rewriting its slot meanwhile
 * cannot slip a bad index or value past the checks. A payload
 * that breaks a rule is refused whole; the caller folds nothing of it.
 * No allocation; dst is the caller's, n floats.
 */
#include <string.h>

#include "gradfmt.h"
#include "half.h"
#include "optimizer.h" /* SRV_VECTOR_CLONES */
#include "server.h"

/* Sum of squares of a float block in double, eight chains so it
 * vectorises; inf or NaN when a value is not finite. */
SRV_VECTOR_CLONES
static double block_sumsq(const float *x, size_t n)
{
	double s[8] = { 0 };
	size_t i = 0;

	for (; i + 8 <= n; i += 8)
		for (size_t j = 0; j < 8; j++)
			s[j] += (double)x[i + j] * (double)x[i + j];
	for (; i < n; i++)
		s[0] += (double)x[i] * (double)x[i];
	return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* 0 if every value is finite, else inf: an integer OR-reduction of the
 * all-ones exponent test, so it vectorises (as grad.c's copy_finite). */
SRV_VECTOR_CLONES
static double block_finite(const float *x, size_t n)
{
	uint32_t bad = 0;

	for (size_t i = 0; i < n; i++) {
		uint32_t b;
		memcpy(&b, &x[i], sizeof(b));
		bad |= (b & 0x7f800000u) == 0x7f800000u;
	}
	return bad ? __builtin_inf() : 0.0;
}

/* 16-bit floats: converted a block at a time, each block checked (or its
 * squares summed) in dst while it is still in cache: one pass over memory.
 * dst, not src: the worker may rewrite src between two reads. */
static double decode_half(float *restrict dst, size_t n, const uint16_t *src, bool bf16,
			  bool want_sumsq)
{
	enum { BLOCK = 2048 };
	double ss = 0.0;

	for (size_t i = 0; i < n; i += BLOCK) {
		size_t m = n - i < BLOCK ? n - i : BLOCK;
		(bf16 ? rdmaps__bf16_to_f32_n : rdmaps__f16_to_f32_n)(dst + i, src + i, m);
		SRV_FORGET_MEMORY();
		ss += want_sumsq ? block_sumsq(dst + i, m) : block_finite(dst + i, m);
	}
	return ss;
}

static int decode_topk(float *restrict dst, size_t n, const uint8_t *src, size_t len, double *ss,
		       const char **why)
{
	uint32_t k, prev = 0;
	const uint8_t *idx = src + 4, *val;
	double s = 0.0;

	memcpy(&k, src, 4);
	SRV_FORGET_MEMORY();
	if (k > n || len != rdmaps__gradfmt_size(RDMAPS__GRAD_TOPK, n, k)) {
		*why = "top-k payload length disagrees with its count";
		return RDMAPS_EPROTO;
	}
	val = idx + 4 * (size_t)k;
	memset(dst, 0, n * sizeof(float));
	for (uint32_t j = 0; j < k; j++) {
		uint32_t i;
		float v;
		/* each read once, into a local: checked and used as one value */
		memcpy(&i, idx + 4 * (size_t)j, 4);
		memcpy(&v, val + 4 * (size_t)j, 4);
		SRV_FORGET_MEMORY();
		if (i >= n) {
			*why = "top-k index out of range";
			return RDMAPS_ERANGE;
		}
		if (j && i <= prev) {
			*why = "top-k indices not strictly ascending";
			return RDMAPS_EPROTO;
		}
		prev = i;
		dst[i] = v;
		s += (double)v * (double)v;
	}
	*ss = s;
	return 0;
}

/* Eight outputs per byte of bits: each the scale with bit t of the byte
 * as its sign bit, integer work the compiler vectorises. */
SRV_VECTOR_CLONES
static void expand_signs(float *restrict dst, const uint8_t *restrict bits, size_t bytes, float scale)
{
	uint32_t sb;

	memcpy(&sb, &scale, sizeof(sb));
	for (size_t j = 0; j < bytes; j++) {
		uint32_t b = bits[j];
		for (unsigned t = 0; t < 8; t++) {
			uint32_t u = sb | ((b >> t) & 1u) << 31;
			memcpy(&dst[8 * j + t], &u, sizeof(u));
		}
	}
}

static int decode_sign(float *restrict dst, size_t n, const uint8_t *src, size_t len, double *ss,
		       const char **why)
{
	float scale;
	size_t full = n / 8;
	const uint8_t *bits = src + 4;
	uint8_t last;

	if (len != rdmaps__gradfmt_size(RDMAPS__GRAD_SIGN, n, 0)) {
		*why = "sign payload length disagrees with the element count";
		return RDMAPS_EPROTO;
	}
	memcpy(&scale, src, 4);
	SRV_FORGET_MEMORY();
	if (!(scale >= 0.0f && scale <= 3.4028234663852886e38f)) {
		*why = "sign scale not a finite non-negative number";
		return RDMAPS_EINVAL;
	}
	expand_signs(dst, bits, full, scale);
	if (n % 8) {
		last = bits[full]; /* read once */
		SRV_FORGET_MEMORY();
		if (last >> (n % 8)) {
			*why = "sign bits set past the last element";
			return RDMAPS_EPROTO;
		}
		for (unsigned t = 0; t < n % 8; t++)
			dst[8 * full + t] = (last >> t) & 1u ? -scale : scale;
	}
	for (size_t j = full + (n % 8 != 0); j < len - 4; j++)
		if (bits[j]) {
			*why = "sign payload padding not zero";
			return RDMAPS_EPROTO;
		}
	*ss = (double)n * (double)scale * (double)scale;
	return 0;
}

int srv_grad_decode(unsigned fmt, float *restrict dst, size_t n, const void *src, size_t len,
		    double *sumsq, const char **why)
{
	double ss = 0.0;
	int rc = 0;

	switch (fmt) {
	case RDMAPS__GRAD_F32:
		if (len != 4 * n) {
			*why = "payload length disagrees with the element count";
			return RDMAPS_EPROTO;
		}
		if (sumsq)
			ss = srv_grad_copy_sumsq(dst, src, n);
		else
			ss = srv_grad_copy_finite(dst, src, n) ? 0.0 : __builtin_inf();
		break;
	case RDMAPS__GRAD_BF16:
	case RDMAPS__GRAD_F16:
		if (len != rdmaps__gradfmt_size(fmt, n, 0)) {
			*why = "payload length disagrees with the element count";
			return RDMAPS_EPROTO;
		}
		if (n % 2 && ((const uint16_t *)src)[n]) {
			*why = "16-bit payload padding not zero";
			return RDMAPS_EPROTO;
		}
		ss = decode_half(dst, n, src, fmt == RDMAPS__GRAD_BF16, sumsq != NULL);
		break;
	case RDMAPS__GRAD_TOPK:
		if (len < 4) {
			*why = "top-k payload shorter than its count";
			return RDMAPS_EPROTO;
		}
		rc = decode_topk(dst, n, src, len, &ss, why);
		break;
	case RDMAPS__GRAD_SIGN:
		rc = decode_sign(dst, n, src, len, &ss, why);
		break;
	default:
		*why = "unknown gradient format";
		return RDMAPS_EPROTO;
	}
	if (rc)
		return rc;
	if (!__builtin_isfinite(ss)) {
		*why = "non-finite gradient";
		return RDMAPS_EINVAL;
	}
	if (sumsq)
		*sumsq = ss;
	return 0;
}
