/*
 * placement.h -- where the chunks of a tensor live in a cluster of S servers.
 *
 * Ranges, not consistent hashing: a tensor of n chunks is cut into S runs
 * of consecutive chunks whose sizes differ by at most one (n/S or n/S + 1),
 * so every tensor spreads its bytes over all servers within one chunk
 * (the bound tests/rdma/test_cluster.c checks), and a
 * pull or push touches each server with one contiguous run (one registration,
 * sequential reads). The run of part k goes to server (h + k) mod S, with h a
 * hash of the name: tensors smaller than S chunks land on different servers
 * instead of all on server 0. Deterministic: every worker computes the same
 * map from (name, chunk count, S) without asking anyone. Changing S moves
 * data (a restart with the new layout), which is the trade ranges make
 * against consistent hashing; parameter-server jobs fix S at launch.
 */
#ifndef RDMAPS_COMMON_PLACEMENT_H
#define RDMAPS_COMMON_PLACEMENT_H

#include <stdint.h>

struct rdmaps__range {
	uint32_t server; /* index into the cluster's server list */
	uint32_t first;  /* first chunk */
	uint32_t count;  /* chunks (0: this part is empty) */
};

/* FNV-1a of the name: stable across builds and platforms. */
static inline uint32_t rdmaps__name_hash(const char *name)
{
	uint32_t h = 2166136261u;
	for (; *name; name++)
		h = (h ^ (uint8_t)*name) * 16777619u;
	return h;
}

/*
 * Fill out[0..nservers) with the parts of a tensor in chunk order. Pure;
 * thread-safe. nservers must be > 0.
 */
static inline void rdmaps__place(const char *name, uint32_t nchunks, uint32_t nservers,
				 struct rdmaps__range *out)
{
	uint32_t h = rdmaps__name_hash(name) % nservers;
	uint32_t base = nchunks / nservers, extra = nchunks % nservers, first = 0;

	for (uint32_t k = 0; k < nservers; k++) {
		out[k].server = (h + k) % nservers;
		out[k].first = first;
		/* the extra chunks go to the last parts: the part that ends in
		 * the short final chunk is then a long one, so shares in floats
		 * (not just in chunks) differ by at most one chunk */
		out[k].count = base + (k >= nservers - extra);
		first += out[k].count;
	}
}

#endif
