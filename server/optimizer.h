/*
 * optimizer.h -- the interface every optimizer implements. Adding one is a
 * one-file change: write opt_<name>.c ending in SRV_OPTIMIZER(...) and list
 * it in server/meson.build; the linker section below collects it, so no
 * table elsewhere needs editing.
 */
#ifndef RDMAPS_SERVER_OPTIMIZER_H
#define RDMAPS_SERVER_OPTIMIZER_H

#include <stddef.h>
#include <stdint.h>

#include "protocol.h"

struct srv_optimizer {
	const char *name;
	/* floats of state kept per parameter, beside the chunk, never registered */
	unsigned state_per_param;
	/* 0 or RDMAPS_EINVAL for hyper-parameters this optimizer cannot use */
	int (*check)(const struct rdmaps_wire_hyper *h);
	/*
	 * Fold n gradient values into the parameters. step counts the folds of
	 * this chunk before this one. Called with the chunk held exclusively; it
	 * must not allocate, lock or block: it is the fold hot path.
	 */
	void (*apply)(float *restrict param, float *restrict state, const float *restrict grad,
		      size_t n, const struct rdmaps_wire_hyper *h, uint64_t step);
};

#define SRV_OPTIMIZER(sym)                                                        \
	static const struct srv_optimizer *const srv_opt_reg_##sym                 \
		__attribute__((used, section("rdmaps_opt"), aligned(sizeof(void *)))) = &sym

/* The optimizer called name, or NULL. Thread-safe. */
const struct srv_optimizer *srv_optimizer_find(const char *name);

/*
 * Vectorised at run time: one clone per ISA, picked by the loader, so the
 * baseline build still uses AVX2/AVX-512 where the CPU has them.
 */
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define SRV_VECTOR_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define SRV_VECTOR_CLONES
#endif

#endif
