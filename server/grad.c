/*
 * grad.c -- staged gradients, taken out of the worker's reach before they
 * are checked. A slot of the staging ring stays writable by its worker
 * (REMOTE_WRITE on its QP) after the WRITE-with-immediate that announced
 * it, so a check of the ring's bytes proves nothing about the bytes a later
 * read of the ring gets: a worker could slip NaN, or values past the clip
 * norm, in between. So each slot's payload is copied once into memory the
 * fold thread alone owns, the copy is checked, and the fold reads only the
 * copy (docs/design.md, "Push").
 *
 * Each value is read from the ring once, by a volatile vector load, then
 * stored into the copy and tested in the register it was loaded into. The
 * volatile is what makes "read once" true: with ordinary loads a compiler
 * may assume dst[i] == src[i] after the copy and test the ring instead,
 * and clang did exactly that to the earlier plain loop (a memcpy, then the
 * test over the ring: tests/unit/test_grad.c's race caught it in a clang
 * build). A block-wise memcpy, a compiler barrier and a test of the copy
 * was correct but a third slower from memory (take-finite 20.5 -> 12-14
 * GB/s). GCC/clang vector extensions: one 16-byte load per four floats.
 */
#include <string.h>

#include "optimizer.h" /* SRV_VECTOR_CLONES */
#include "server.h"

/*
 * The clones are static and each has a plain exported wrapper: clang 14
 * emits the resolver of a target_clones function only in a unit that calls
 * it, so an exported clone called only from fold.c did not link there.
 */

/*
 * Sixteen-byte vectors, four of them per step: every clone has these
 * natively (SSE2 up). GCC 12 splits wider generic vectors it has no
 * register for through the stack and turns their compares into scalar
 * code: with 64-byte vectors the AVX2 clone took 2 GB/s, in cache, where
 * this takes 80-90 (and 22 GB/s from memory, against 12 before).
 */
typedef float v4f __attribute__((vector_size(16)));
typedef uint32_t v4u __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef float v2f __attribute__((vector_size(8)));
typedef double v2d __attribute__((vector_size(16)));

/* Four floats of the ring, read once (may be unaligned: may_alias, 4-byte
 * aligned type). */
typedef float v4f_u __attribute__((vector_size(16), aligned(4), may_alias));

#define LOAD4_ONCE(p) (*(const volatile v4f_u *)(p))
#define LOAD1_ONCE(p) (*(const volatile float *)(p))

/* Copy four floats read once; or into *bad a lane that is inf or NaN: an
 * all-ones exponent, an integer test, so it vectorises (a float compare
 * would not, without -ffast-math). */
static inline __attribute__((always_inline)) void copy4_finite(float *dst, const float *src,
							       v4i *bad)
{
	const v4u expo = (v4u){ 0 } + 0x7f800000u;
	v4f x = LOAD4_ONCE(src);

	memcpy(dst, &x, sizeof(x));
	*bad |= ((v4u)x & expo) == expo;
}

SRV_VECTOR_CLONES
static bool copy_finite(float *restrict dst, const float *restrict src, size_t n)
{
	/* four accumulators: the ors do not wait on one another */
	v4i b0 = { 0 }, b1 = { 0 }, b2 = { 0 }, b3 = { 0 };
	uint32_t bad = 0;
	size_t i = 0;

	for (; i + 16 <= n; i += 16) {
		copy4_finite(dst + i, src + i, &b0);
		copy4_finite(dst + i + 4, src + i + 4, &b1);
		copy4_finite(dst + i + 8, src + i + 8, &b2);
		copy4_finite(dst + i + 12, src + i + 12, &b3);
	}
	b0 |= b1 | b2 | b3;
	for (int j = 0; j < 4; j++)
		bad |= b0[j] != 0;
	for (; i < n; i++) {
		float x = LOAD1_ONCE(src + i);
		uint32_t b;
		dst[i] = x;
		memcpy(&b, &x, sizeof(b));
		bad |= (b & 0x7f800000u) == 0x7f800000u;
	}
	return !bad;
}

/* Copy four floats read once; add their squares, in double, to *lo, *hi
 * (the halves of the register, not the ring). */
static inline __attribute__((always_inline)) void copy4_sumsq(float *dst, const float *src,
							      v2d *lo, v2d *hi)
{
	v4f x = LOAD4_ONCE(src);
	v2f l, h;
	v2d a, b;

	memcpy(dst, &x, sizeof(x));
	memcpy(&l, &x, sizeof(l));
	memcpy(&h, (const char *)&x + sizeof(l), sizeof(h));
	a = __builtin_convertvector(l, v2d);
	b = __builtin_convertvector(h, v2d);
	*lo += a * a;
	*hi += b * b;
}

/*
 * Sum of squares in double, eight lanes so the adds do not wait on one
 * another (one chain is bound by the add latency: 5-6 GB/s where this runs
 * at memory speed). A non-finite value shows as inf or NaN; a finite float
 * squared cannot overflow a double, nor can 2^32 of them.
 */
SRV_VECTOR_CLONES
static double copy_sumsq(float *restrict dst, const float *restrict src, size_t n)
{
	v2d a0 = { 0 }, a1 = { 0 }, a2 = { 0 }, a3 = { 0 };
	double s = 0.0;
	size_t i = 0;

	for (; i + 8 <= n; i += 8) {
		copy4_sumsq(dst + i, src + i, &a0, &a1);
		copy4_sumsq(dst + i + 4, src + i + 4, &a2, &a3);
	}
	a0 += a1 + a2 + a3;
	s = a0[0] + a0[1];
	for (; i < n; i++) {
		float x = LOAD1_ONCE(src + i);
		dst[i] = x;
		s += (double)x * (double)x;
	}
	return s;
}

SRV_VECTOR_CLONES
static void scale_values(float *g, size_t n, float scale)
{
	for (size_t i = 0; i < n; i++)
		g[i] *= scale;
}

bool srv_grad_copy_finite(float *restrict dst, const float *restrict src, size_t n)
{
	return copy_finite(dst, src, n);
}

double srv_grad_copy_sumsq(float *restrict dst, const float *restrict src, size_t n)
{
	return copy_sumsq(dst, src, n);
}

void srv_grad_scale(float *g, size_t n, float scale)
{
	scale_values(g, n, scale);
}

float *srv_slot_values(const struct srv_tensor *t, const struct rdmaps_slot_hdr *h, void *payload,
		       size_t *n)
{
	if (h->flags & RDMAPS_SLOT_ROWS) {
		*n = (size_t)h->count * t->cons.row_dim;
		return (float *)((uint64_t *)payload + h->count);
	}
	*n = h->count;
	return payload;
}

int srv_slot_take(const struct srv_tensor *t, const struct rdmaps_slot_hdr *h, void *dst,
		  const void *src, size_t len, double *sumsq, const char **why)
{
	size_t n;
	float *vals = srv_slot_values(t, h, dst, &n);
	const float *from = (const float *)((const uint8_t *)src + ((uint8_t *)vals - (uint8_t *)dst));
	double ss = 0.0;
	unsigned fmt = rdmaps__slot_fmt(h->flags);
	int rc;

	if (fmt) {
		/* validated: a dense push, never rows or initial values */
		rc = srv_grad_decode(fmt, dst, h->count, src, len,
				     t->cons.clip_norm > 0.0f ? &ss : NULL, why);
		*sumsq = ss;
		return rc;
	}
	if (h->flags & RDMAPS_SLOT_ROWS) {
		const uint64_t *ids = dst;
		memcpy(dst, src, (size_t)h->count * sizeof(uint64_t));
		for (uint32_t k = 0; k < h->count; k++)
			if (ids[k] >= t->nchunks) {
				*why = "row id out of range";
				return RDMAPS_ERANGE;
			}
	}
	if (t->cons.clip_norm > 0.0f)
		ss = srv_grad_copy_sumsq(vals, from, n);
	else
		ss = srv_grad_copy_finite(vals, from, n) ? 0.0 : __builtin_nan("");
	if (!__builtin_isfinite(ss)) {
		*why = "non-finite gradient";
		return RDMAPS_EINVAL;
	}
	*sumsq = ss;
	return 0;
}
