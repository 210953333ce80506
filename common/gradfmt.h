/*
 * gradfmt.h -- the formats a gradient can travel in, fewer bytes than
 * float32: how each lays out its payload, and its size. The worker encodes
 * (client/compress.c, with error feedback where the format drops
 * information), the fold thread decodes into its private float copy
 * (server/decode.c) and folds that as it folds a float32 push.
 *
 * Payloads, n the tensor's (or chunk's) element count, little-endian, every
 * payload padded with zero bytes to a multiple of 4:
 *  F32   n float32, as today.
 *  BF16  n bfloat16 (common/half.h), 2n bytes.
 *  F16   n IEEE binary16, 2n bytes.
 *  TOPK  u32 k; u32 index[k], strictly ascending, each < n; float32
 *        value[k]: 4 + 8k bytes. The other n - k elements are zero.
 *  SIGN  float32 scale (finite, >= 0); then ceil(n/8) bytes of bits, bit
 *        i%8 of byte i/8 set when element i is -scale, clear when +scale;
 *        bits past n are zero (EF-signSGD's sign and mean magnitude).
 * A payload whose length is not exactly its format's size, or that breaks
 * any rule above, is refused whole.
 */
#ifndef RDMAPS_GRADFMT_H
#define RDMAPS_GRADFMT_H

#include <stddef.h>
#include <stdint.h>

enum rdmaps__gradfmt {
	RDMAPS__GRAD_F32 = 0,
	RDMAPS__GRAD_BF16 = 1,
	RDMAPS__GRAD_F16 = 2,
	RDMAPS__GRAD_TOPK = 3,
	RDMAPS__GRAD_SIGN = 4,
};

#define RDMAPS__GRADFMT_COUNT 5

static inline size_t rdmaps__pad4(size_t b)
{
	return (b + 3) & ~(size_t)3;
}

/* Payload bytes of n elements in fmt (k: the values a TOPK payload holds,
 * at most n; ignored otherwise); 0 for an unknown format. */
static inline size_t rdmaps__gradfmt_size(unsigned fmt, size_t n, size_t k)
{
	switch (fmt) {
	case RDMAPS__GRAD_F32:
		return 4 * n;
	case RDMAPS__GRAD_BF16:
	case RDMAPS__GRAD_F16:
		return rdmaps__pad4(2 * n);
	case RDMAPS__GRAD_TOPK:
		return k <= n ? 4 + 8 * k : 0;
	case RDMAPS__GRAD_SIGN:
		return 4 + rdmaps__pad4((n + 7) / 8);
	default:
		return 0;
	}
}

#endif
