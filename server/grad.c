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
 * GB/s). GCC/clang vector extensions: one 64-byte load per sixteen
 * floats, as wide as the clone's ISA allows.
 */
#include <string.h>

#include "optimizer.h" /* SRV_VECTOR_CLONES */
#include "server.h"

/*
 * The clones are static and each has a plain exported wrapper: clang 14
 * emits the resolver of a target_clones function only in a unit that calls
 * it, so an exported clone called only from fold.c did not link there.
 */

typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));

/* Sixteen floats of the ring, read once (may be unaligned: may_alias, 4-byte
 * aligned type). */
typedef float v16f_u __attribute__((vector_size(64), aligned(4), may_alias));

#define LOAD16_ONCE(p) (*(const volatile v16f_u *)(p))
#define LOAD1_ONCE(p) (*(const volatile float *)(p))

/* An all-ones exponent is inf or NaN: an integer test, so it vectorises
 * (a float compare would not, without -ffast-math). */
SRV_VECTOR_CLONES
static bool copy_finite(float *restrict dst, const float *restrict src, size_t n)
{
	const v16u expo = (v16u){ 0 } + 0x7f800000u;
	v16i bad16 = { 0 };
	uint32_t bad = 0;
	size_t i = 0;

	for (; i + 16 <= n; i += 16) {
		v16f x = LOAD16_ONCE(src + i);
		memcpy(dst + i, &x, sizeof(x));
		bad16 |= ((v16u)x & expo) == expo;
	}
	for (; i < n; i++) {
		float x = LOAD1_ONCE(src + i);
		uint32_t b;
		dst[i] = x;
		memcpy(&b, &x, sizeof(b));
		bad |= (b & 0x7f800000u) == 0x7f800000u;
	}
	for (int j = 0; j < 16; j++)
		bad |= bad16[j] != 0;
	return !bad;
}

/*
 * Sum of squares in double, sixteen lanes so the adds do not wait on one
 * another (one chain is bound by the add latency: 5-6 GB/s where this runs
 * at memory speed). A non-finite value shows as inf or NaN; a finite float
 * squared cannot overflow a double, nor can 2^32 of them.
 */
SRV_VECTOR_CLONES
static double copy_sumsq(float *restrict dst, const float *restrict src, size_t n)
{
	v8d lo8 = { 0 }, hi8 = { 0 };
	double s = 0.0;
	size_t i = 0;

	for (; i + 16 <= n; i += 16) {
		v16f x = LOAD16_ONCE(src + i);
		v8f lo, hi;
		v8d a, b;
		memcpy(dst + i, &x, sizeof(x));
		/* the halves of the register, not the ring */
		memcpy(&lo, &x, sizeof(lo));
		memcpy(&hi, (const char *)&x + sizeof(lo), sizeof(hi));
		a = __builtin_convertvector(lo, v8d);
		b = __builtin_convertvector(hi, v8d);
		lo8 += a * a;
		hi8 += b * b;
	}
	for (; i < n; i++) {
		float x = LOAD1_ONCE(src + i);
		dst[i] = x;
		s += (double)x * (double)x;
	}
	for (int j = 0; j < 8; j++)
		s += lo8[j] + hi8[j];
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
