/*
 * checksum.h -- the checksum that guards one-sided reads of model chunks.
 *
 * XXH3-64 from Debian's libxxhash: on the fold side it costs less than
 * CRC32C (about 1.5x faster natively, and far less under qemu TCG, which
 * emulates the crc32 instruction slowly). See docs/design.md for numbers
 * from `rdmaps-bench fold`.
 */
#ifndef RDMAPS_COMMON_CHECKSUM_H
#define RDMAPS_COMMON_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

/* Pure function of the bytes; thread-safe; no allocation. */
static inline uint64_t rdmaps__checksum(const void *p, size_t len)
{
	return XXH3_64bits(p, len);
}

#endif
