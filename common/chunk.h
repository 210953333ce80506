/*
 * chunk.h -- layout of a model chunk in server memory, shared by the server
 * (writer) and the client (one-sided reader). See docs/design.md.
 *
 *   +-----------------+---------------------------+-----------------+
 *   | header (64 B)   | data: count floats, padded | trailer (64 B)  |
 *   | version, clock, | to 64 B                    | version copy    |
 *   | count, checksum |                            |                 |
 *   +-----------------+---------------------------+-----------------+
 *
 * Writer (fold), holding the chunk by CAS'ing header.version even -> odd:
 *   trailer.version = odd; data...; header.checksum; header.version = even';
 *   trailer.version = even'.
 * Reader: one READ of header|data|trailer, accept iff header.version is even,
 * equals trailer.version, and checksum(data) == header.checksum. A READ that
 * is placed in ascending address order (rxe, and every HCA we know) cannot see
 * equal even versions around a torn body; the checksum also catches
 * placement in any other order, which the verbs specification permits.
 */
#ifndef RDMAPS_COMMON_CHUNK_H
#define RDMAPS_COMMON_CHUNK_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "checksum.h"

#define RDMAPS_CHUNK_ALIGN 64u
#define RDMAPS_CHUNK_HDR 64u
#define RDMAPS_CHUNK_TRL 64u

struct rdmaps_chunk_hdr {
	uint64_t version;  /* even = stable, odd = a fold is writing */
	uint64_t clock;    /* clock of the last folded update (consistency models) */
	uint64_t checksum; /* rdmaps__checksum of the data bytes */
	uint32_t count;    /* floats in this chunk */
	uint32_t reserved;
	uint8_t pad[32];
};

struct rdmaps_chunk_trl {
	uint64_t version;
	uint8_t pad[56];
};

_Static_assert(sizeof(struct rdmaps_chunk_hdr) == RDMAPS_CHUNK_HDR, "chunk header size");
_Static_assert(sizeof(struct rdmaps_chunk_trl) == RDMAPS_CHUNK_TRL, "chunk trailer size");

/* Polite busy-wait hint for spin loops. */
static inline void rdmaps__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ volatile("yield");
#endif
}

static inline size_t rdmaps__round_up(size_t v, size_t a)
{
	return (v + a - 1) / a * a;
}

/* Bytes of padded data area for count floats. */
static inline size_t rdmaps__chunk_data_span(uint32_t count)
{
	return rdmaps__round_up((size_t)count * sizeof(float), RDMAPS_CHUNK_ALIGN);
}

/* Distance between consecutive full chunks of chunk_elems floats. */
static inline size_t rdmaps__chunk_stride(uint32_t chunk_elems)
{
	return RDMAPS_CHUNK_HDR + rdmaps__chunk_data_span(chunk_elems) + RDMAPS_CHUNK_TRL;
}

/* Bytes one READ of a chunk of count floats covers (header to trailer). */
static inline size_t rdmaps__chunk_read_len(uint32_t count)
{
	return RDMAPS_CHUNK_HDR + rdmaps__chunk_data_span(count) + RDMAPS_CHUNK_TRL;
}

/* Floats in chunk i of a tensor of length elements. */
static inline uint32_t rdmaps__chunk_count(uint64_t length, uint32_t chunk_elems, uint32_t i)
{
	uint64_t start = (uint64_t)i * chunk_elems;
	uint64_t left = length - start;
	return left < chunk_elems ? (uint32_t)left : chunk_elems;
}

static inline uint32_t rdmaps__chunk_total(uint64_t length, uint32_t chunk_elems)
{
	return (uint32_t)((length + chunk_elems - 1) / chunk_elems);
}

/*
 * The reader's test: 1 if the header, data and trailer that one READ
 * brought back form a consistent snapshot. Pure; no allocation.
 */
static inline int rdmaps__chunk_consistent(const struct rdmaps_chunk_hdr *h, const void *trl,
					   const float *data, uint32_t expect_count)
{
	uint64_t tv;

	/* the trailer lands after count floats of padding in the reader's
	 * scratch: 4-byte aligned only, so read its version bytewise */
	memcpy(&tv, (const uint8_t *)trl + offsetof(struct rdmaps_chunk_trl, version), sizeof(tv));
	if ((h->version & 1u) || h->version != tv || h->count != expect_count)
		return 0;
	return rdmaps__checksum(data, (size_t)expect_count * sizeof(float)) == h->checksum;
}

#endif
