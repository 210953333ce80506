/*
 * opt_sgd.c -- plain SGD: param -= lr * grad.
 */
#include <math.h>

#include "optimizer.h"

static int sgd_check(const struct rdmaps_wire_hyper *h)
{
	return isfinite(h->lr) && h->lr >= 0.0f ? 0 : RDMAPS_EINVAL;
}

SRV_VECTOR_CLONES
static void sgd_apply(float *restrict p, float *restrict state, const float *restrict g, size_t n,
		      const struct rdmaps_wire_hyper *h, uint64_t step)
{
	const float lr = h->lr;

	(void)state;
	(void)step;
	for (size_t i = 0; i < n; i++)
		p[i] -= lr * g[i];
}

static const struct srv_optimizer sgd = {
	.name = "sgd",
	.state_per_param = 0,
	.check = sgd_check,
	.apply = sgd_apply,
};
SRV_OPTIMIZER(sgd);
