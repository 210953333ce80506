/*
 * optimizer.h -- the interface every optimizer implements. Adding one is a
 * one-file change: write opt_<name>.c ending in SRV_OPTIMIZER(...) and list
 * it in server/meson.build; the linker section below collects it, so no
 * table elsewhere needs editing.
 *
 * Semantics and defaults are those of enum rdmaps_optimizer (client/rdmaps.h)
 * and follow PyTorch's torch.optim definitions; each opt_*.c cites its own.
 *
 * State layout contract (between store.c and every apply()):
 *  - The store keeps state_per_param floats per parameter, zero-filled when
 *    the tensor is declared, on the server only (never registered, never
 *    readable by workers). Each chunk owns a private region of it.
 *  - An optimizer with state_per_param = k keeps k arrays of count floats
 *    back to back per chunk, count being the chunk's element count (the same
 *    on every call for a given chunk; only a tensor's last chunk may be
 *    shorter than the others): array j of element i is the chunk region's
 *    [j * count + i], 0 <= j < k. With k = 0, state may be NULL and must
 *    not be touched.
 *  - apply() may be given a run of n elements of a chunk, not always the
 *    whole of it (store.c applies the first few floats of a chunk apart so
 *    that the rest is vector-aligned): param, grad and state point at the
 *    run's first element, and `stride` is the chunk's count, so array j of
 *    the run's element i is state[j * stride + i]. A whole chunk is a run
 *    with n = stride. Runs of one chunk never overlap, and the result must
 *    not depend on how a chunk is cut into runs (every optimizer here is
 *    element-wise; tests/unit/test_optimizers.c checks the bits).
 *  - Zero-filled state must mean "no history yet" (a zero momentum buffer or
 *    moment is what PyTorch's first step produces anyway).
 *  - `step` is the number of folds applied to this chunk before this one: 0
 *    on the first fold, the same for every run of one fold. Optimizers that
 *    count steps (Adam's bias correction) use step + 1, PyTorch's
 *    `state['step']` after its increment.
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
	/*
	 * 0 or RDMAPS_EINVAL for hyper-parameters this optimizer cannot use:
	 * non-finite or negative lr, eps, weight_decay; momentum or betas
	 * outside [0, 1). A field left at 0 takes the documented default in
	 * apply(). Fields the optimizer does not read are ignored. Called once
	 * per declaration, before the tensor exists.
	 */
	int (*check)(const struct rdmaps_wire_hyper *h);
	/*
	 * Fold n gradient values into the parameters: a run of one chunk whose
	 * state arrays are `stride` floats apart (see the top of this file).
	 * step counts the folds of this chunk before this one. Called with the
	 * chunk held exclusively; it must not allocate, lock or block: it is
	 * the fold hot path.
	 */
	void (*apply)(float *restrict param, float *restrict state, size_t stride,
		      const float *restrict grad, size_t n, const struct rdmaps_wire_hyper *h,
		      uint64_t step);
};

#define SRV_OPTIMIZER(sym)                                                        \
	static const struct srv_optimizer *const srv_opt_reg_##sym                 \
		__attribute__((used, section("rdmaps_opt"), aligned(sizeof(void *)))) = &sym

/* A hyper-parameter that must be finite and >= 0 (lr, weight decay, eps). */
static inline int srv_hyper_nonneg(float x)
{
	return x >= 0.0f && x <= __FLT_MAX__; /* false for NaN and +inf too */
}

/* The checks every optimizer shares: learning rate and weight decay. */
static inline int srv_hyper_check_common(const struct rdmaps_wire_hyper *h)
{
	return srv_hyper_nonneg(h->lr) && srv_hyper_nonneg(h->weight_decay) ? 0 : RDMAPS_EINVAL;
}

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
