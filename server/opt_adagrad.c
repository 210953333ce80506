/*
 * opt_adagrad.c -- Adagrad with L2 weight decay.
 *
 * torch.optim.Adagrad with lr_decay=0, initial_accumulator_value=0,
 * maximize=False (https://pytorch.org/docs/stable/generated/torch.optim.Adagrad.html):
 *     g_t = g_t + lambda * theta_{t-1}
 *     s_t = s_{t-1} + g_t^2
 *     theta_t = theta_{t-1} - gamma * g_t / (sqrt(s_t) + eps)
 *
 * State: 1 float per parameter, the sum of squares s (state[i]).
 * Hyper-parameters read: lr, eps (0 -> 1e-10), weight_decay (0 = none).
 */
#include <math.h>

#include "optimizer.h"

#define ADAGRAD_EPS_DEFAULT 1e-10f

static int adagrad_check(const struct rdmaps_wire_hyper *h)
{
	if (srv_hyper_check_common(h))
		return RDMAPS_EINVAL;
	if (!srv_hyper_nonneg(h->eps))
		return RDMAPS_EINVAL;
	return 0;
}

SRV_VECTOR_CLONES
static void adagrad_apply(float *restrict p, float *restrict s, size_t stride,
			  const float *restrict g, size_t n, const struct rdmaps_wire_hyper *h,
			  uint64_t step)
{
	const float lr = h->lr, wd = h->weight_decay;
	const float eps = h->eps != 0.0f ? h->eps : ADAGRAD_EPS_DEFAULT;

	(void)stride; /* one state array */
	(void)step;
	for (size_t i = 0; i < n; i++) {
		const float d = g[i] + wd * p[i];
		const float sum = s[i] + d * d;

		s[i] = sum;
		p[i] -= lr * d / (sqrtf(sum) + eps);
	}
}

static const struct srv_optimizer adagrad = {
	.name = "adagrad",
	.state_per_param = 1,
	.check = adagrad_check,
	.apply = adagrad_apply,
};
SRV_OPTIMIZER(adagrad);
