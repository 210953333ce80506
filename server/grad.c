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
 * One pass: each value is loaded from the ring once, stored into the copy,
 * and the test reads the copy (dst[i] after dst[i] = src[i]: the compiler
 * forwards the value it stored, or reads the copy again; never the ring).
 * A block-wise memcpy then check was slower: GCC inlines a bounded memcpy
 * as `rep movsq`, 17 GB/s from memory where this loop runs at 40.
 */
#include <string.h>

#include "optimizer.h" /* SRV_VECTOR_CLONES */
#include "server.h"

/*
 * The clones are static and each has a plain exported wrapper: clang 14
 * emits the resolver of a target_clones function only in a unit that calls
 * it, so an exported clone called only from fold.c did not link there.
 */

/* An all-ones exponent is inf or NaN. An integer OR-reduction, so it
 * vectorises (a float compare would not, without -ffast-math). */
SRV_VECTOR_CLONES
static bool copy_finite(float *restrict dst, const float *restrict src, size_t n)
{
	uint32_t bad = 0;

	for (size_t i = 0; i < n; i++) {
		uint32_t b;
		dst[i] = src[i];
		memcpy(&b, &dst[i], sizeof(b));
		bad |= (b & 0x7f800000u) == 0x7f800000u;
	}
	return !bad;
}

/*
 * Sum of squares in double, eight chains so it vectorises (one chain is
 * bound by the add latency: 5-6 GB/s where this runs at memory speed). A
 * non-finite value shows as inf or NaN; a finite float squared cannot
 * overflow a double, nor can 2^32 of them.
 */
SRV_VECTOR_CLONES
static double copy_sumsq(float *restrict dst, const float *restrict src, size_t n)
{
	double s[8] = { 0 };
	size_t i = 0;

	for (; i + 8 <= n; i += 8)
		for (size_t j = 0; j < 8; j++) {
			dst[i + j] = src[i + j];
			s[j] += (double)dst[i + j] * (double)dst[i + j];
		}
	for (; i < n; i++) {
		dst[i] = src[i];
		s[0] += (double)dst[i] * (double)dst[i];
	}
	return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
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
		  const void *src, double *sumsq, const char **why)
{
	size_t n;
	float *vals = srv_slot_values(t, h, dst, &n);
	const float *from = (const float *)((const uint8_t *)src + ((uint8_t *)vals - (uint8_t *)dst));
	double ss;

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
