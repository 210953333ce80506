/*
 * checksum.c -- the chunk checksum as the fold thread computes it: XXH3-64,
 * the same function as rdmaps__checksum (common/checksum.h), which the
 * client checks pulls with, with its long-input loop compiled three times
 * (SSE2, AVX2, AVX-512) and picked at run time, as xxHash's own
 * xxh_x86dispatch.c does it. Every variant gives the same 64 bits: xxHash
 * defines the hash, not the instructions (tests/unit/test_grad.c compares
 * them over many lengths).
 *
 * Why: the fold's whole path per slot is a copy and check of the staged
 * gradient (memory speed), the optimizer (memory speed) and this hash,
 * which is pure computation over the chunk just written (in cache). With
 * the baseline's SSE2 loop (~30 GB/s) the hash alone took 40 % of an SGD
 * fold's time; AVX-512 runs it at ~70 GB/s on the same core. The build
 * stays baseline x86-64 (the VM's emulated CPU has no AVX-512).
 */
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#include <immintrin.h>
#define CKSUM_DISPATCH 1
#define XXH_X86DISPATCH /* accumulators aligned for AVX-512 */
#define XXH_DISPATCH_AVX2 1
#define XXH_DISPATCH_AVX512 1
#define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
#define XXH_TARGET_AVX512 __attribute__((__target__("avx512f")))
#endif
/* before anything includes xxhash.h (server.h does, through chunk.h) */
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <stdatomic.h>

#include "server.h"

#if CKSUM_DISPATCH
typedef uint64_t (*hash_long_fn)(const void *, size_t);

__attribute__((noinline)) static uint64_t hash_long_sse2(const void *p, size_t len)
{
	return XXH3_hashLong_64b_internal(p, len, XXH3_kSecret, sizeof(XXH3_kSecret),
					  XXH3_accumulate_512, XXH3_scrambleAcc);
}

__attribute__((noinline)) XXH_TARGET_AVX2 static uint64_t hash_long_avx2(const void *p, size_t len)
{
	return XXH3_hashLong_64b_internal(p, len, XXH3_kSecret, sizeof(XXH3_kSecret),
					  XXH3_accumulate_512_avx2, XXH3_scrambleAcc_avx2);
}

__attribute__((noinline)) XXH_TARGET_AVX512 static uint64_t hash_long_avx512(const void *p,
									      size_t len)
{
	return XXH3_hashLong_64b_internal(p, len, XXH3_kSecret, sizeof(XXH3_kSecret),
					  XXH3_accumulate_512_avx512, XXH3_scrambleAcc_avx512);
}

/*
 * Picked on first use and kept in a pointer, as xxh_x86dispatch.c does, not
 * by an ifunc: the loader runs an ifunc resolver before anything is set up,
 * and a sanitizer or coverage build instruments the resolver, which then
 * crashes the program before main (seen with clang's libFuzzer build).
 * Threads racing on the first call all store the same pointer.
 */
static uint64_t hash_long_first(const void *p, size_t len);
static _Atomic(hash_long_fn) hash_long = hash_long_first;

static uint64_t hash_long_first(const void *p, size_t len)
{
	hash_long_fn f = hash_long_sse2;

	__builtin_cpu_init();
	if (__builtin_cpu_supports("avx512f"))
		f = hash_long_avx512;
	else if (__builtin_cpu_supports("avx2"))
		f = hash_long_avx2;
	atomic_store_explicit(&hash_long, f, memory_order_relaxed);
	return f(p, len);
}

uint64_t srv_checksum(const void *p, size_t len)
{
	/* up to 240 bytes XXH3 has no vector loop: the one-shot as is */
	if (len <= XXH3_MIDSIZE_MAX)
		return XXH3_64bits(p, len);
	return atomic_load_explicit(&hash_long, memory_order_relaxed)(p, len);
}

uint64_t srv_checksum_variant(const void *p, size_t len, unsigned variant)
{
	__builtin_cpu_init();
	if (len > XXH3_MIDSIZE_MAX && variant == 0)
		return hash_long_sse2(p, len);
	if (len > XXH3_MIDSIZE_MAX && variant == 1 && __builtin_cpu_supports("avx2"))
		return hash_long_avx2(p, len);
	if (len > XXH3_MIDSIZE_MAX && variant == 2 && __builtin_cpu_supports("avx512f"))
		return hash_long_avx512(p, len);
	return XXH3_64bits(p, len);
}
#else
uint64_t srv_checksum(const void *p, size_t len)
{
	return XXH3_64bits(p, len);
}

uint64_t srv_checksum_variant(const void *p, size_t len, unsigned variant)
{
	(void)variant;
	return XXH3_64bits(p, len);
}
#endif
