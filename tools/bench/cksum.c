/*
 * cksum.c -- checksum throughput: XXH3-64 as rdmaps uses it (common/
 * checksum.h) against CRC32C, the usual alternative, computed with the
 * SSE4.2 crc32 instruction when the CPU has it (chosen at run time: the
 * build stays baseline x86-64). Two CRC32C variants: one dependent chain
 * (the simple loop most code uses) and three interleaved chains combined by
 * a table (the fast way). A byte-table CRC32C is the portable fallback.
 * And xxh3-server: the same XXH3 as the fold thread computes it
 * (server/checksum.c, its loop picked at run time for this CPU).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "checksum.h"
#include "chunk.h"
#include "server.h"

#define CRC32C_POLY 0x82f63b78u /* reflected Castagnoli */
#define CRC3_BLOCK 1024u        /* bytes per chain per round */

static uint32_t crc_tab[256];
static uint32_t shift_tab[4][256]; /* register advanced over CRC3_BLOCK zero bytes */

static void crc_init(void)
{
	uint32_t basis[32];

	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? (c >> 1) ^ CRC32C_POLY : c >> 1;
		crc_tab[i] = c;
	}
	/* zero bytes move the register linearly: tabulate it per byte lane */
	for (int bit = 0; bit < 32; bit++) {
		uint32_t r = 1u << bit;
		for (unsigned i = 0; i < CRC3_BLOCK; i++)
			r = crc_tab[r & 0xff] ^ (r >> 8);
		basis[bit] = r;
	}
	for (int lane = 0; lane < 4; lane++)
		for (uint32_t b = 0; b < 256; b++) {
			uint32_t v = 0;
			for (int j = 0; j < 8; j++)
				if (b & (1u << j))
					v ^= basis[lane * 8 + j];
			shift_tab[lane][b] = v;
		}
}

static uint32_t crc_shift(uint32_t r)
{
	return shift_tab[0][r & 0xff] ^ shift_tab[1][(r >> 8) & 0xff] ^
	       shift_tab[2][(r >> 16) & 0xff] ^ shift_tab[3][r >> 24];
}

static uint32_t crc32c_sw(const void *buf, size_t n)
{
	const uint8_t *p = buf;
	uint32_t c = ~0u;

	while (n--)
		c = crc_tab[(c ^ *p++) & 0xff] ^ (c >> 8);
	return ~c;
}

#if defined(__x86_64__)
#define HAVE_CRC_HW 1
static inline __attribute__((target("sse4.2"), always_inline)) uint64_t ld64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(const void *buf, size_t n)
{
	const uint8_t *p = buf;
	uint64_t c = 0xffffffffu;

	for (; n >= 8; n -= 8, p += 8)
		c = __builtin_ia32_crc32di(c, ld64(p));
	while (n--)
		c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
	return ~(uint32_t)c;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_hw3(const void *buf, size_t n)
{
	const uint8_t *p = buf;
	uint64_t a = 0xffffffffu;

	/* three independent chains hide the instruction's 3-cycle latency */
	for (; n >= 3 * CRC3_BLOCK; n -= 3 * CRC3_BLOCK, p += 3 * CRC3_BLOCK) {
		uint64_t b = 0, c = 0;
		for (unsigned i = 0; i < CRC3_BLOCK; i += 8) {
			a = __builtin_ia32_crc32di(a, ld64(p + i));
			b = __builtin_ia32_crc32di(b, ld64(p + CRC3_BLOCK + i));
			c = __builtin_ia32_crc32di(c, ld64(p + 2 * CRC3_BLOCK + i));
		}
		a = crc_shift(crc_shift((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
	}
	for (; n >= 8; n -= 8, p += 8)
		a = __builtin_ia32_crc32di(a, ld64(p));
	while (n--)
		a = __builtin_ia32_crc32qi((uint32_t)a, *p++);
	return ~(uint32_t)a;
}
#else
#define HAVE_CRC_HW 0
#endif

enum ck { CK_XXH3, CK_XXH3_SRV, CK_CRC_HW, CK_CRC_HW3, CK_CRC_SW };
static const char *const ck_name[] = { "xxh3", "xxh3-server", "crc32c-sse42", "crc32c-sse42-x3",
				       "crc32c-sw" };

static uint64_t ck_once(enum ck k, const void *p, size_t n)
{
	switch (k) {
	case CK_XXH3: return rdmaps__checksum(p, n);
	case CK_XXH3_SRV: return srv_checksum(p, n);
#if HAVE_CRC_HW
	case CK_CRC_HW: return crc32c_hw(p, n);
	case CK_CRC_HW3: return crc32c_hw3(p, n);
#endif
	default: return crc32c_sw(p, n);
	}
}

static bool have_hw(void)
{
#if HAVE_CRC_HW
	return __builtin_cpu_supports("sse4.2");
#else
	return false;
#endif
}

/* The implementations must agree before their speed means anything. */
static int self_check(const uint8_t *buf, size_t len)
{
	if (crc32c_sw("123456789", 9) != 0xe3069283u) {
		fprintf(stderr, "rdmaps-bench: cksum: table CRC32C is wrong\n");
		return -1;
	}
	for (size_t n = 0; n < len; n = n * 3 + 7)
		if (srv_checksum(buf + 1, n) != rdmaps__checksum(buf + 1, n)) {
			fprintf(stderr, "rdmaps-bench: cksum: the server's XXH3 disagrees at %zu B\n", n);
			return -1;
		}
	if (!have_hw())
		return 0;
	for (size_t n = 0; n < len; n = n * 3 + 7) {
		uint32_t want = crc32c_sw(buf + 1, n);
		if (ck_once(CK_CRC_HW, buf + 1, n) != want || ck_once(CK_CRC_HW3, buf + 1, n) != want) {
			fprintf(stderr, "rdmaps-bench: cksum: SSE4.2 CRC32C disagrees at %zu B\n", n);
			return -1;
		}
	}
	return 0;
}

/* Best sample (each sample = enough calls to cover >= 1 MiB). */
static void measure(const struct bench_opts *o, enum ck k, const uint8_t *buf, uint64_t size,
		    const struct bench_row *base)
{
	uint64_t reps = size >= (1u << 20) ? 1 : (1u << 20) / size, best = UINT64_MAX;
	struct bench_loop l;
	volatile uint64_t sink = 0;
	uint64_t t0, t1 = rdmaps__now_ns();
	struct bench_row r = { 0 };

	sink ^= ck_once(k, buf, size); /* warm */
	loop_start(&l, o, t1);
	do {
		t0 = rdmaps__now_ns();
		for (uint64_t i = 0; i < reps; i++)
			sink ^= ck_once(k, buf, size);
		t1 = rdmaps__now_ns();
		if (t1 - t0 < best)
			best = t1 - t0;
	} while (loop_more(&l, t1));
	(void)sink;
	snprintf(r.group, sizeof(r.group), "cksum");
	snprintf(r.op, sizeof(r.op), "%s", ck_name[k]);
	r.size = size;
	r.workers = 1;
	r.ops = l.n * reps;
	r.seconds = (double)best / 1e9;
	r.gb_s = (double)(size * reps) / (double)best;
	r.ops_s = (double)reps / r.seconds;
	if (base) {
		snprintf(r.base_op, sizeof(r.base_op), "%s", base->op);
		r.base_val = base->gb_s;
		r.ratio = r.gb_s / base->gb_s;
	}
	snprintf(r.note, sizeof(r.note), "%s",
		 k == CK_XXH3	  ? "what rdmaps uses (the client checks pulls with it)"
		 : k == CK_XXH3_SRV ? "the same bits, as the fold writes it (loop picked at run time)"
		 : k == CK_CRC_HW ? "one crc32 chain (latency-bound)"
		 : k == CK_CRC_HW3 ? "three chains, table combine"
				   : "byte table, no SSE4.2");
	report_add(&r);
}

int cksum_run(const struct bench_opts *o)
{
	uint64_t max = 0;
	uint8_t *buf;

	crc_init();
	for (unsigned i = 0; i < o->nfold_sizes; i++)
		max = o->fold_sizes[i] > max ? o->fold_sizes[i] : max;
	buf = aligned_alloc(4096, rdmaps__round_up(max + 64, 4096));
	if (!buf)
		return -1;
	for (uint64_t i = 0; i < max + 64; i++)
		buf[i] = (uint8_t)(i * 2654435761u >> 13);
	if (self_check(buf, max < 200000 ? max : 200000)) {
		free(buf);
		return -1;
	}
	if (!have_hw())
		printf("# cksum: this CPU has no SSE4.2: CRC32C only by table\n");
	for (unsigned i = 0; i < o->nfold_sizes; i++) {
		uint64_t size = o->fold_sizes[i];
		measure(o, CK_XXH3, buf, size, NULL);
		const struct bench_row *found = report_find("cksum", "xxh3", size);
		struct bench_row copy = found ? *found : (struct bench_row){ 0 };
		const struct bench_row *base = found ? &copy : NULL; /* rows may move */
		measure(o, CK_XXH3_SRV, buf, size, base);
		if (have_hw()) {
			measure(o, CK_CRC_HW, buf, size, base);
			measure(o, CK_CRC_HW3, buf, size, base);
		}
		if (size <= (1u << 20) || !have_hw())
			measure(o, CK_CRC_SW, buf, size, base);
	}
	free(buf);
	return 0;
}
