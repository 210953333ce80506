/*
 * chunk.h -- layout of a model chunk in server memory, shared by the server
 * (writer) and the client (one-sided reader). See docs/design.md.
 *
 *   +----------------+----------------------------+---------------+- - - -+
 *   | header (32 B)  | data: count floats, padded | trailer (8 B) |  pad  |
 *   | version, clock,| to 8 B                     | version copy  | to 64 |
 *   | checksum, count|                            |               |       |
 *   +----------------+----------------------------+---------------+- - - -+
 *   \_______________ one READ (rdmaps__chunk_read_len) ____________/
 *
 * Small on purpose: a pull READs header, data and trailer of every chunk,
 * and for small tensors those bytes are most of the READ (rxe computes its
 * ICRC over every byte in software). Chunks start a multiple of 64 B
 * apart (rdmaps__chunk_stride), so every header is 64 B aligned, the data 32 B.
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
#define RDMAPS_CHUNK_HDR 32u
#define RDMAPS_CHUNK_TRL 8u

struct rdmaps_chunk_hdr {
	uint64_t version;  /* even = stable, odd = a fold is writing */
	uint64_t clock;    /* clock of the last folded update (consistency models) */
	uint64_t checksum; /* rdmaps__checksum of the data bytes */
	uint32_t count;    /* floats in this chunk */
	uint32_t reserved;
};

struct rdmaps_chunk_trl {
	uint64_t version;
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

/* Bytes of data area for count floats: padded to 8 B so the trailer's
 * version word is aligned for the writer's atomic stores. */
static inline size_t rdmaps__chunk_data_span(uint32_t count)
{
	return rdmaps__round_up((size_t)count * sizeof(float), sizeof(uint64_t));
}

/* Distance between consecutive full chunks of chunk_elems floats: the next
 * header starts 64 B aligned (the padding after a trailer is never read). */
static inline size_t rdmaps__chunk_stride(uint32_t chunk_elems)
{
	return rdmaps__round_up(RDMAPS_CHUNK_HDR + rdmaps__chunk_data_span(chunk_elems) +
					RDMAPS_CHUNK_TRL,
				RDMAPS_CHUNK_ALIGN);
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
