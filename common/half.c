/*
 * half.c -- the array conversions of half.h, vectorised where the CPU
 * allows, chosen at run time.
 *
 * bf16 is integer work (shifts, adds, a select for NaN), written as plain
 * loops that the compiler vectorises once per ISA (target_clones). fp16
 * rounding is fiddly enough in integers that x86's own conversion
 * instructions (F16C: vcvtps2ph with round-to-nearest-even, vcvtph2ps) do
 * it; they give the bits half.h specifies, NaN payloads included. Both are
 * picked at run time: the build stays baseline x86-64 and qemu's TCG, which
 * lacks some of these, gets the plain loops.
 */
#include "half.h"

#include <stdatomic.h>
#include <stdbool.h>

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#include <cpuid.h>
#include <immintrin.h>
#define HALF_X86 1
/* clones of a static function, called through an exported wrapper in this
 * unit (clang 14 emits a target_clones resolver only where it is called) */
#define HALF_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define HALF_CLONES
#endif

static void f32_to_bf16_c(uint16_t *restrict dst, const float *restrict src, size_t n)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = rdmaps__f32_to_bf16(src[i]);
}

static void f32_to_f16_c(uint16_t *restrict dst, const float *restrict src, size_t n)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = rdmaps__f32_to_f16(src[i]);
}

static void f16_to_f32_c(float *restrict dst, const uint16_t *restrict src, size_t n)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = rdmaps__f16_to_f32(src[i]);
}

/* The same bits as rdmaps__f32_to_bf16, branch-free so that it vectorises. */
HALF_CLONES
static void f32_to_bf16_v(uint16_t *restrict dst, const float *restrict src, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		uint32_t u, r, q;
		memcpy(&u, &src[i], sizeof(u));
		r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
		q = (u >> 16) | 0x0040u;
		dst[i] = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? q : r);
	}
}

HALF_CLONES
static void bf16_to_f32_v(float *restrict dst, const uint16_t *restrict src, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		uint32_t u = (uint32_t)src[i] << 16;
		memcpy(&dst[i], &u, sizeof(u));
	}
}

#if HALF_X86
__attribute__((target("avx,f16c"))) static void f32_to_f16_f16c(uint16_t *restrict dst,
								   const float *restrict src, size_t n)
{
	size_t i = 0;

	for (; i + 8 <= n; i += 8) {
		__m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
		_mm_storeu_si128((__m128i *)(dst + i), h);
	}
	f32_to_f16_c(dst + i, src + i, n - i);
}

__attribute__((target("avx,f16c"))) static void f16_to_f32_f16c(float *restrict dst,
								   const uint16_t *restrict src, size_t n)
{
	size_t i = 0;

	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
	f16_to_f32_c(dst + i, src + i, n - i);
}

/* F16C with the OS saving the AVX registers (what AVX2 support implies). */
static bool have_f16c(void)
{
	unsigned a, b, c, d;

	__builtin_cpu_init();
	return __builtin_cpu_supports("avx2") && __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#endif

/*
 * fp16 path: a pointer set on first use (not an ifunc: a resolver runs
 * before the program is set up, which sanitizer builds do not survive).
 * Threads racing on the first call store the same pointer.
 */
typedef void (*to_f16_fn)(uint16_t *restrict, const float *restrict, size_t);
typedef void (*from_f16_fn)(float *restrict, const uint16_t *restrict, size_t);

static void to_f16_first(uint16_t *restrict dst, const float *restrict src, size_t n);
static void from_f16_first(float *restrict dst, const uint16_t *restrict src, size_t n);
static _Atomic(to_f16_fn) to_f16 = to_f16_first;
static _Atomic(from_f16_fn) from_f16 = from_f16_first;

static void pick_f16(void)
{
	to_f16_fn t = f32_to_f16_c;
	from_f16_fn f = f16_to_f32_c;

#if HALF_X86
	if (have_f16c()) {
		t = f32_to_f16_f16c;
		f = f16_to_f32_f16c;
	}
#endif
	atomic_store_explicit(&to_f16, t, memory_order_relaxed);
	atomic_store_explicit(&from_f16, f, memory_order_relaxed);
}

static void to_f16_first(uint16_t *restrict dst, const float *restrict src, size_t n)
{
	pick_f16();
	atomic_load_explicit(&to_f16, memory_order_relaxed)(dst, src, n);
}

static void from_f16_first(float *restrict dst, const uint16_t *restrict src, size_t n)
{
	pick_f16();
	atomic_load_explicit(&from_f16, memory_order_relaxed)(dst, src, n);
}

void rdmaps__f32_to_bf16_n(uint16_t *restrict dst, const float *restrict src, size_t n)
{
	f32_to_bf16_v(dst, src, n);
}

void rdmaps__bf16_to_f32_n(float *restrict dst, const uint16_t *restrict src, size_t n)
{
	bf16_to_f32_v(dst, src, n);
}

void rdmaps__f32_to_f16_n(uint16_t *restrict dst, const float *restrict src, size_t n)
{
	atomic_load_explicit(&to_f16, memory_order_relaxed)(dst, src, n);
}

void rdmaps__f16_to_f32_n(float *restrict dst, const uint16_t *restrict src, size_t n)
{
	atomic_load_explicit(&from_f16, memory_order_relaxed)(dst, src, n);
}

int rdmaps__half_convert_path(int path, int to_half, int bf16, void *dst, const void *src, size_t n)
{
	if (path == 0) {
		if (bf16 && to_half)
			f32_to_bf16_c(dst, src, n);
		else if (bf16)
			for (size_t i = 0; i < n; i++)
				((float *)dst)[i] = rdmaps__bf16_to_f32(((const uint16_t *)src)[i]);
		else if (to_half)
			f32_to_f16_c(dst, src, n);
		else
			f16_to_f32_c(dst, src, n);
		return 0;
	}
	if (bf16) {
		if (to_half)
			f32_to_bf16_v(dst, src, n);
		else
			bf16_to_f32_v(dst, src, n);
		return 0;
	}
#if HALF_X86
	if (have_f16c()) {
		if (to_half)
			f32_to_f16_f16c(dst, src, n);
		else
			f16_to_f32_f16c(dst, src, n);
		return 0;
	}
#endif
	return -1;
}
