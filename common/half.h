/*
 * half.h -- 16-bit floats (bfloat16 and IEEE binary16) to and from float,
 * as the server would publish a half-precision copy of a tensor and a
 * worker would read it back, or the other way round for gradients.
 *
 * One rounding everywhere: float to 16 bits rounds to nearest, ties to
 * even, as IEEE 754's default, on every path (scalar and vector give the
 * same bits; tests/unit/test_half.c checks them against each other and
 * against the compiler's own _Float16 where it has one).
 *  - bf16: float's sign and exponent with 7 mantissa bits. Every float
 *    exponent exists, so nothing overflows: a value rounds to Inf only
 *    from above bf16's largest finite value (as fp32 rounding would).
 *    Denormals round like any other value.
 *  - fp16: 5 exponent bits, largest finite 65504; from 65520 up the
 *    result is Inf (65520 is the tie between 65504 and 2^16, and rounds to
 *    the even side, which is Inf). Below 2^-14 results are fp16 denormals,
 *    correctly rounded; below 2^-25 they round to a signed zero.
 *  - NaN stays NaN, quiet, with its sign and the top of its payload (the
 *    bits that fit), as x86's F16C conversion does; Inf stays Inf.
 * 16 to 32 bits is exact for both; fp16's NaNs come back quiet (as F16C
 * does), bf16 is a shift (a NaN's bits as they were).
 *
 * The array functions pick their vector code at run time (AVX2/AVX-512 for
 * bf16, F16C for fp16, plain C otherwise), so the baseline x86-64 build
 * uses them where the CPU has them and still runs where it does not (qemu
 * TCG). All functions are pure and thread-safe; arrays must not overlap.
 */
#ifndef RDMAPS_HALF_H
#define RDMAPS_HALF_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t rdmaps__f32_bits(float f)
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	return u;
}

static inline float rdmaps__bits_f32(uint32_t u)
{
	float f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

/* float -> bfloat16, round to nearest even; NaN stays a quiet NaN. */
static inline uint16_t rdmaps__f32_to_bf16(float f)
{
	uint32_t u = rdmaps__f32_bits(f);

	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((u >> 16) | 0x0040u);
	/* adding 0x7fff, plus one when the kept part is odd, carries into the
	 * kept part exactly when the dropped part is above half, or half with
	 * an odd kept part; a carry out of the mantissa bumps the exponent,
	 * up to Inf, which is the right rounding too */
	return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float rdmaps__bf16_to_f32(uint16_t h)
{
	return rdmaps__bits_f32((uint32_t)h << 16);
}

/* float -> IEEE binary16, round to nearest even (see the top of the file). */
static inline uint16_t rdmaps__f32_to_f16(float f)
{
	uint32_t u = rdmaps__f32_bits(f);
	uint32_t sign = (u >> 16) & 0x8000u;
	uint32_t a = u & 0x7fffffffu;
	uint32_t o;

	if (a > 0x7f800000u) /* NaN: quiet, the payload's top 9 bits */
		return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
	if (a >= 0x47800000u) /* 2^16 and up, Inf included */
		return (uint16_t)(sign | 0x7c00u);
	if (a < 0x38800000u) {
		/* below 2^-14: an fp16 denormal (or zero). Adding 0.5 makes the
		 * FPU round the value to a multiple of 2^-24 (fp16's denormal
		 * step) to nearest even, which lands in the low mantissa bits */
		float d = rdmaps__bits_f32(a) + 0.5f;
		return (uint16_t)(sign | (rdmaps__f32_bits(d) - 0x3f000000u));
	}
	/* normal: rebias the exponent (127 -> 15), round the 13 bits dropped
	 * as bf16 does; from 65520 the carry reaches exponent 31, Inf */
	o = a - ((127u - 15u) << 23);
	o += 0xfffu + ((o >> 13) & 1u);
	return (uint16_t)(sign | (o >> 13));
}

/* IEEE binary16 -> float, exact (a NaN made quiet). */
static inline float rdmaps__f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
	uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;

	if (e == 0x1f) /* Inf, or NaN made quiet with its payload (as F16C) */
		return rdmaps__bits_f32(sign | 0x7f800000u | (m ? 0x400000u | (m << 13) : 0));
	if (e == 0) /* zero or denormal: m * 2^-24, exact in float */
		return rdmaps__bits_f32(sign | rdmaps__f32_bits((float)m * 0x1p-24f));
	return rdmaps__bits_f32(sign | ((e + 127u - 15u) << 23) | (m << 13));
}

/* Arrays: dst[i] = conversion of src[i] for i < n. Vectorised at run time. */
void rdmaps__f32_to_bf16_n(uint16_t *restrict dst, const float *restrict src, size_t n);
void rdmaps__bf16_to_f32_n(float *restrict dst, const uint16_t *restrict src, size_t n);
void rdmaps__f32_to_f16_n(uint16_t *restrict dst, const float *restrict src, size_t n);
void rdmaps__f16_to_f32_n(float *restrict dst, const uint16_t *restrict src, size_t n);

/*
 * The same with a chosen path, for tests and benchmarks: 0 = plain C, 1 =
 * the vector path the CPU has (AVX2/AVX-512 clones for bf16, F16C for
 * fp16). Returns 0 when done, -1 when the CPU lacks that path.
 */
int rdmaps__half_convert_path(int path, int to_half, int bf16, void *dst, const void *src, size_t n);

#endif
