/*
 * opt_sgd.c -- SGD with (L2) weight decay: p -= lr * (g + wd * p).
 *
 * torch.optim.SGD with momentum=0, dampening=0, nesterov=False,
 * maximize=False (https://pytorch.org/docs/stable/generated/torch.optim.SGD.html):
 *     g_t = g_t + lambda * theta_{t-1};  theta_t = theta_{t-1} - gamma * g_t
 * No state. Hyper-parameters read: lr, weight_decay (0 = none).
 */
#include <math.h>

#include "optimizer.h"

static int sgd_check(const struct rdmaps_wire_hyper *h)
{
	if (srv_hyper_check_common(h))
		return RDMAPS_EINVAL;
	return 0;
}

SRV_VECTOR_CLONES
static void sgd_apply(float *restrict p, float *restrict state, size_t stride,
		      const float *restrict g, size_t n, const struct rdmaps_wire_hyper *h,
		      uint64_t step)
{
	const float lr = h->lr, wd = h->weight_decay;

	(void)state;
	(void)stride;
	(void)step;
	for (size_t i = 0; i < n; i++)
		p[i] -= lr * (g[i] + wd * p[i]);
}

static const struct srv_optimizer sgd = {
	.name = "sgd",
	.state_per_param = 0,
	.check = sgd_check,
	.apply = sgd_apply,
};
SRV_OPTIMIZER(sgd);
