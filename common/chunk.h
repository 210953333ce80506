/*
 * chunk.h -- layout of a model chunk in server memory, shared by the server
 * (writer) and the client (one-sided reader). See docs/design.md.
 *
 *   +--------------------------------+----------------------+- - - - - - -+
 *   | header (24 B): clock, count,   | data: count floats   | pad to 64 B |
 *   | version, checksum              |                      | (not read)  |
 *   +--------------------------------+----------------------+- - - - - - -+
 *   \_____ one READ (rdmaps__chunk_read_len): BSP/SSP, two copies ______/
 *                          \____ a READ from the checksum on ____/
 *                                 (ASP, one copy: RDMAPS_CHUNK_SKIP)
 *
 * An ASP tensor kept in one copy needs no clock (nothing to wait for), no
 * count (the layout is the catalog's) and no version (the checksum is the
 * guard, below): its pulls READ the checksum and the data only, 16 B less
 * on every READ (a 64 B pull READs 72 B). BSP/SSP pulls need the clock and
 * two-copy pulls the version, so they READ the whole header.
 *
 * Small on purpose: a pull READs the header of every chunk, and for small
 * tensors it is much of the READ (rxe computes its ICRC over every byte in
 * software). Chunks start a multiple of 64 B apart (rdmaps__chunk_stride):
 * every header is 64 B aligned.
 *
 * Writer (fold), holding the chunk by CAS'ing header.version even -> odd:
 *   data...; header.checksum = XXH3(data); header.version = even'.
 * Reader: one READ of header|data; accept iff header.version is even and
 * XXH3(data) == header.checksum. The checksum is what makes a torn body
 * impossible to accept, whatever order the NIC fetches or places the bytes
 * in (the verbs specification promises none): a body mixing two folds
 * matches neither fold's checksum (a 64-bit hash: a 2^-64 accident), and an
 * old checksum read with a new body, or the reverse, is refused the same
 * way. The version only makes the common refusal (a fold in progress)
 * cheap; a pull that skips it (ASP, one copy) refuses the same READs by the
 * checksum alone. Protocols 1 and 2 also had a trailer version; with the
 * checksum checked on every READ it added nothing but bytes.
 */
#ifndef RDMAPS_COMMON_CHUNK_H
#define RDMAPS_COMMON_CHUNK_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "checksum.h"

#define RDMAPS_CHUNK_ALIGN 64u
#define RDMAPS_CHUNK_HDR 24u

struct rdmaps_chunk_hdr {
	uint32_t clock;    /* clock of the last folded update (consistency models) */
	uint32_t count;    /* floats in this chunk */
	uint64_t version;  /* even = stable, odd = a fold is writing */
	uint64_t checksum; /* rdmaps__checksum of the data bytes */
};

_Static_assert(sizeof(struct rdmaps_chunk_hdr) == RDMAPS_CHUNK_HDR, "chunk header size");
/* header bytes an ASP one-copy pull does not READ: all before the checksum */
#define RDMAPS_CHUNK_SKIP 16u
_Static_assert(offsetof(struct rdmaps_chunk_hdr, checksum) == RDMAPS_CHUNK_SKIP, "skip");

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

/* Distance between consecutive full chunks of chunk_elems floats: the next
 * header starts 64 B aligned (the padding is never read). */
static inline size_t rdmaps__chunk_stride(uint32_t chunk_elems)
{
	return rdmaps__round_up(RDMAPS_CHUNK_HDR + (size_t)chunk_elems * sizeof(float),
				RDMAPS_CHUNK_ALIGN);
}

/* Bytes one READ of a chunk of count floats covers: header and data. */
static inline size_t rdmaps__chunk_read_len(uint32_t count)
{
	return RDMAPS_CHUNK_HDR + (size_t)count * sizeof(float);
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
 * The reader's test: 1 if the header and data one READ brought back form a
 * consistent snapshot (see the top of this file). Pure; no allocation.
 */
static inline int rdmaps__chunk_consistent(const struct rdmaps_chunk_hdr *h, const float *data,
					   uint32_t expect_count)
{
	if ((h->version & 1u) || h->count != expect_count)
		return 0;
	return rdmaps__checksum(data, (size_t)expect_count * sizeof(float)) == h->checksum;
}

#endif
