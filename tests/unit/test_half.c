/*
 * 16-bit floats (common/half.h): both directions, bf16 and fp16, against
 * references computed another way, and every vector path against the
 * scalar one, bit for bit.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <math.h>
#include <stdlib.h>

#include "half.h"

static bool is_nan16(uint16_t h, bool bf16)
{
	return bf16 ? (h & 0x7fffu) > 0x7f80u : (h & 0x7fffu) > 0x7c00u;
}

/*
 * bf16 reference without the bit trick: the two bf16 values around x (by
 * truncation and one step up in magnitude), compared in double; a tie goes
 * to the even one. One step above the largest finite value is 2^128, which
 * stands for Inf.
 */
static uint16_t bf16_ref(float x)
{
	uint32_t u = rdmaps__f32_bits(x);
	uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);
	double ax = fabs((double)x), dlo, dhi;

	if (isnan(x))
		return (uint16_t)(lo | 0x40);
	if (isinf(x))
		return lo;
	dlo = fabs((double)rdmaps__bf16_to_f32(lo));
	dhi = (hi & 0x7fff) == 0x7f80 ? ldexp(1.0, 128) : fabs((double)rdmaps__bf16_to_f32(hi));
	if (ax - dlo < dhi - ax)
		return lo;
	if (ax - dlo > dhi - ax)
		return hi;
	return (lo & 1) ? hi : lo;
}

Test(half, bf16_matches_a_reference_over_a_sweep_of_floats)
{
	/* every exponent and sign, the top mantissa bits stepped, the low 16
	 * bits (what rounding looks at) covering ties, near-ties and the rest */
	static const uint32_t lows[] = { 0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff, 0x4000, 0xc000 };
	unsigned long n = 0;

	for (uint64_t top = 0; top < 0x10000; top++)
		for (size_t k = 0; k < sizeof(lows) / sizeof(lows[0]); k++) {
			float x = rdmaps__bits_f32((uint32_t)(top << 16) | lows[k]);
			uint16_t got = rdmaps__f32_to_bf16(x), want = bf16_ref(x);
			cr_assert_eq(got, want, "bf16(%a) = %#x, want %#x", (double)x, got, want);
			n++;
		}
	cr_assert_eq(n, 0x10000ul * 8);
}

Test(half, bf16_special_values)
{
	cr_assert_eq(rdmaps__f32_to_bf16(0.0f), 0x0000);
	cr_assert_eq(rdmaps__f32_to_bf16(-0.0f), 0x8000);
	cr_assert_eq(rdmaps__f32_to_bf16(INFINITY), 0x7f80);
	cr_assert_eq(rdmaps__f32_to_bf16(-INFINITY), 0xff80);
	cr_assert_eq(rdmaps__f32_to_bf16(1.0f), 0x3f80);
	/* ties: 1 + 2^-8 is half-way between 1 and 1 + 2^-7: to even (1) */
	cr_assert_eq(rdmaps__f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);
	/* 1 + 3 * 2^-8, half-way between two odd/even neighbours: up, to even */
	cr_assert_eq(rdmaps__f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);
	/* the largest float rounds past bf16's largest finite value: Inf */
	cr_assert_eq(rdmaps__f32_to_bf16(rdmaps__bits_f32(0x7f7fffffu)), 0x7f80);
	cr_assert_eq(rdmaps__f32_to_bf16(rdmaps__bits_f32(0x7f7f7fffu)), 0x7f7f);
	/* a float denormal rounds like any value; the smallest goes to zero */
	cr_assert_eq(rdmaps__f32_to_bf16(rdmaps__bits_f32(0x00000001u)), 0x0000);
	cr_assert_eq(rdmaps__f32_to_bf16(rdmaps__bits_f32(0x00018000u)), 0x0002);
	/* NaN: quiet, sign and top payload kept, never Inf */
	cr_assert_eq(rdmaps__f32_to_bf16(rdmaps__bits_f32(0x7f800001u)), 0x7fc0);
	cr_assert_eq(rdmaps__f32_to_bf16(rdmaps__bits_f32(0xff810000u)), 0xffc1);
	cr_assert_eq(rdmaps__f32_to_bf16(rdmaps__bits_f32(0x7fffffffu)), 0x7fff);
}

Test(half, bf16_round_trips_every_value)
{
	for (uint32_t h = 0; h < 0x10000; h++) {
		uint16_t back = rdmaps__f32_to_bf16(rdmaps__bf16_to_f32((uint16_t)h));
		if (is_nan16((uint16_t)h, true))
			cr_assert_eq(back, h | 0x40, "NaN %#x came back as %#x", h, back);
		else
			cr_assert_eq(back, h, "%#x came back as %#x", h, back);
	}
}

Test(half, f16_to_float_is_exact_for_every_value)
{
	for (uint32_t h = 0; h < 0x10000; h++) {
		uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
		float f = rdmaps__f16_to_f32((uint16_t)h);
		double want;

		cr_assert_eq(signbit(f) != 0, (h & 0x8000) != 0, "sign of %#x", h);
		if (e == 0x1f) {
			cr_assert(m ? isnan(f) : isinf(f), "%#x", h);
			if (m)
				cr_assert_eq((rdmaps__f32_bits(f) >> 13) & 0x3ff, m | 0x200, "payload of %#x", h);
			continue;
		}
		want = e ? ldexp(1.0 + m / 1024.0, (int)e - 15) : ldexp(m, -24);
		cr_assert_eq(fabs((double)f), want, "%#x -> %a, want %a", h, (double)f, want);
	}
}

Test(half, f16_round_trips_every_value)
{
	for (uint32_t h = 0; h < 0x10000; h++) {
		uint16_t back = rdmaps__f32_to_f16(rdmaps__f16_to_f32((uint16_t)h));
		if (is_nan16((uint16_t)h, false))
			cr_assert_eq(back, h | 0x200, "NaN %#x came back as %#x", h, back);
		else
			cr_assert_eq(back, h, "%#x came back as %#x", h, back);
	}
}

/*
 * Rounding to fp16 at every place it can go wrong: for each pair of
 * neighbouring fp16 values (denormals, normals, the largest finite and Inf
 * above it), the float tie between them and the floats just around it.
 */
Test(half, f16_rounds_to_nearest_even_between_every_pair)
{
	for (uint32_t h = 0; h < 0x7c00; h++) {
		double a = rdmaps__f16_to_f32((uint16_t)h);
		double b = h + 1 == 0x7c00 ? 65536.0 : rdmaps__f16_to_f32((uint16_t)(h + 1));
		float tie = (float)((a + b) / 2); /* exact: a float has the bits */
		uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;

		cr_assert_eq((double)tie, (a + b) / 2);
		for (int s = 0; s < 2; s++) {
			uint16_t sg = s ? 0x8000 : 0;
			float t = s ? -tie : tie;
			cr_assert_eq(rdmaps__f32_to_f16(t), sg | even, "tie %a", (double)t);
			cr_assert_eq(rdmaps__f32_to_f16(nextafterf(t, 0.0f)), sg | h, "below tie %a",
				     (double)t);
			cr_assert_eq(rdmaps__f32_to_f16(nextafterf(t, s ? -INFINITY : INFINITY)),
				     sg | (h + 1), "above tie %a", (double)t);
			cr_assert_eq(rdmaps__f32_to_f16(s ? -(float)a : (float)a), sg | h);
		}
	}
}

Test(half, f16_special_values)
{
	cr_assert_eq(rdmaps__f32_to_f16(65504.0f), 0x7bff);
	cr_assert_eq(rdmaps__f32_to_f16(65519.99f), 0x7bff);
	cr_assert_eq(rdmaps__f32_to_f16(65520.0f), 0x7c00); /* overflow to Inf */
	cr_assert_eq(rdmaps__f32_to_f16(-1e9f), 0xfc00);
	cr_assert_eq(rdmaps__f32_to_f16(rdmaps__bits_f32(0x7f7fffffu)), 0x7c00);
	cr_assert_eq(rdmaps__f32_to_f16(INFINITY), 0x7c00);
	cr_assert_eq(rdmaps__f32_to_f16(-INFINITY), 0xfc00);
	cr_assert_eq(rdmaps__f32_to_f16(-0.0f), 0x8000);
	cr_assert_eq(rdmaps__f32_to_f16(0x1p-24f), 0x0001);	      /* smallest denormal */
	cr_assert_eq(rdmaps__f32_to_f16(0x1p-25f), 0x0000);	      /* its tie: to even, 0 */
	cr_assert_eq(rdmaps__f32_to_f16(0x1.000002p-25f), 0x0001); /* just above the tie */
	cr_assert_eq(rdmaps__f32_to_f16(-0x1p-26f), 0x8000);
	cr_assert_eq(rdmaps__f32_to_f16(0x1.ff8p-15f), 0x03ff); /* the largest denormal */
	cr_assert_eq(rdmaps__f32_to_f16(0x1.ffcp-15f), 0x0400); /* its tie with 2^-14: up, to even */
	cr_assert_eq(rdmaps__f32_to_f16(rdmaps__bits_f32(0x00000001u)), 0x0000); /* float denormal */
	cr_assert_eq(rdmaps__f32_to_f16(rdmaps__bits_f32(0x7f800001u)), 0x7e00);
	cr_assert_eq(rdmaps__f32_to_f16(rdmaps__bits_f32(0xffc02000u)), 0xfe01);
}

#ifdef __FLT16_MAX__
/* The compiler's own conversion (libgcc's or the CPU's) as a second reference. */
Test(half, f16_agrees_with_the_compilers_Float16)
{
	uint64_t s = 0x9e3779b97f4a7c15ull;

	for (unsigned long i = 0; i < (1ul << 22); i++) {
		_Float16 c;
		uint16_t cb, got;
		float x;

		s ^= s << 13, s ^= s >> 7, s ^= s << 17;
		/* exponents near fp16's range more often than not */
		x = rdmaps__bits_f32((i & 1) ? (uint32_t)s : ((uint32_t)s & 0x87ffffffu) + 0x30000000u);
		if (isnan(x))
			continue;
		c = (_Float16)x;
		memcpy(&cb, &c, sizeof(cb));
		got = rdmaps__f32_to_f16(x);
		cr_assert_eq(got, cb, "%a: %#x, the compiler %#x", (double)x, got, cb);
	}
}
#endif

/* Values that exercise every branch: specials, ties, denormals, random. */
static void fill(float *x, size_t n, uint64_t seed)
{
	static const uint32_t special[] = { 0x00000000, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000,
					    0x7f800001, 0xffa00000, 0x7f7fffff, 0x477ff000, 0x477fefff,
					    0x33000000, 0x33000001, 0x00000001, 0x3f808000, 0x3f818000,
					    0x387fe000, 0xc77ff000, 0x7f7f8000 };

	for (size_t i = 0; i < n; i++) {
		seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
		x[i] = rdmaps__bits_f32(i % 5 == 0 ? special[(i / 5) % (sizeof(special) / 4)]
						  : (uint32_t)seed);
	}
}

static void check_paths(bool bf16)
{
	/* odd lengths and offsets: the vector loops' tails and unaligned heads */
	enum { N = 4099 };
	static float src[N + 1], back_c[N + 1], back_v[N + 1];
	static uint16_t h_c[N + 1], h_v[N + 1];

	for (size_t off = 0; off < 2; off++)
		for (size_t n = N - 64; n <= N - off; n += 7) {
			fill(src, N + 1, 0x1234567u + n);
			cr_assert_eq(rdmaps__half_convert_path(0, 1, bf16, h_c, src + off, n), 0);
			if (rdmaps__half_convert_path(1, 1, bf16, h_v, src + off, n) < 0) {
				/* said, not warned: Criterion exits 1 after any warning,
				 * and a sanitizer build has no x86 vector path by design */
				fprintf(stderr, "half: no vector path for %s in this build or on "
						"this CPU: the plain loop alone is checked\n",
					bf16 ? "bf16" : "fp16");
				return;
			}
			cr_assert_arr_eq(h_c, h_v, n * sizeof(uint16_t), "%s n=%zu", bf16 ? "bf16" : "fp16", n);
			/* the dispatching entry point gives the same bits */
			memset(h_v, 0, sizeof(h_v));
			(bf16 ? rdmaps__f32_to_bf16_n : rdmaps__f32_to_f16_n)(h_v, src + off, n);
			cr_assert_arr_eq(h_c, h_v, n * sizeof(uint16_t));
			for (size_t i = 0; i < n; i++)
				cr_assert_eq(h_c[i], bf16 ? rdmaps__f32_to_bf16(src[off + i])
							  : rdmaps__f32_to_f16(src[off + i]));
			/* and back: every 16-bit pattern present, as bits */
			for (size_t i = 0; i < n; i++)
				h_c[i] = (uint16_t)(i * 0x9e37u + n);
			cr_assert_eq(rdmaps__half_convert_path(0, 0, bf16, back_c, h_c, n), 0);
			cr_assert_eq(rdmaps__half_convert_path(1, 0, bf16, back_v, h_c, n), 0);
			cr_assert_arr_eq(back_c, back_v, n * sizeof(float));
			(bf16 ? rdmaps__bf16_to_f32_n : rdmaps__f16_to_f32_n)(back_v, h_c, n);
			cr_assert_arr_eq(back_c, back_v, n * sizeof(float));
		}
}

Test(half, bf16_vector_path_equals_the_scalar_one)
{
	check_paths(true);
}

Test(half, f16_vector_path_equals_the_scalar_one)
{
	check_paths(false);
}
