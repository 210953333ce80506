/*
 * opt_momentum.c -- SGD with heavy-ball ("momentum") or Nesterov ("nesterov")
 * momentum and L2 weight decay. The two differ only in the step taken, so
 * they share one loop, instantiated twice with a constant flag.
 *
 * torch.optim.SGD with dampening=0, maximize=False
 * (https://pytorch.org/docs/stable/generated/torch.optim.SGD.html):
 *     g_t = g_t + lambda * theta_{t-1}              (weight decay)
 *     b_t = mu * b_{t-1} + g_t                      (b_1 = g_1)
 *     nesterov: g_t = g_t + mu * b_t;  else g_t = b_t
 *     theta_t = theta_{t-1} - gamma * g_t
 * The buffer starts at zero here, so b_1 = mu * 0 + g_1 = g_1 as in PyTorch.
 * In client/rdmaps.h's notation (v = b), Nesterov's "g" is the decayed
 * gradient g + wd * p, as in PyTorch.
 *
 * State: 1 float per parameter, the buffer v (state[i]).
 * Hyper-parameters read: lr, momentum (0 -> 0.9), weight_decay (0 = none).
 */
#include <math.h>
#include <stdbool.h>

#include "optimizer.h"

#define MOMENTUM_DEFAULT 0.9f

static int momentum_check(const struct rdmaps_wire_hyper *h)
{
	if (srv_hyper_check_common(h))
		return RDMAPS_EINVAL;
	if (!(h->momentum >= 0.0f && h->momentum < 1.0f)) /* also refuses NaN */
		return RDMAPS_EINVAL;
	return 0;
}

/* Inlined into each clone below with nesterov a constant: no branch in the loop. */
static inline __attribute__((always_inline)) void
momentum_loop(float *restrict p, float *restrict v, const float *restrict g, size_t n,
	      const struct rdmaps_wire_hyper *h, bool nesterov)
{
	const float lr = h->lr, wd = h->weight_decay;
	const float mu = h->momentum != 0.0f ? h->momentum : MOMENTUM_DEFAULT;

	for (size_t i = 0; i < n; i++) {
		const float d = g[i] + wd * p[i];
		const float b = mu * v[i] + d;

		v[i] = b;
		p[i] -= lr * (nesterov ? d + mu * b : b);
	}
}

SRV_VECTOR_CLONES
static void momentum_apply(float *restrict p, float *restrict state, size_t stride,
			   const float *restrict g, size_t n, const struct rdmaps_wire_hyper *h,
			   uint64_t step)
{
	(void)stride; /* one state array */
	(void)step;
	momentum_loop(p, state, g, n, h, false);
}

SRV_VECTOR_CLONES
static void nesterov_apply(float *restrict p, float *restrict state, size_t stride,
			   const float *restrict g, size_t n, const struct rdmaps_wire_hyper *h,
			   uint64_t step)
{
	(void)stride; /* one state array */
	(void)step;
	momentum_loop(p, state, g, n, h, true);
}

static const struct srv_optimizer momentum = {
	.name = "momentum",
	.state_per_param = 1,
	.check = momentum_check,
	.apply = momentum_apply,
};
SRV_OPTIMIZER(momentum);

static const struct srv_optimizer nesterov = {
	.name = "nesterov",
	.state_per_param = 1,
	.check = momentum_check,
	.apply = nesterov_apply,
};
SRV_OPTIMIZER(nesterov);
