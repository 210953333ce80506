/*
 * opt_adam.c -- Adam ("adam", weight decay as L2, folded into the gradient)
 * and AdamW ("adamw", decoupled weight decay). Both share one loop,
 * instantiated twice with a constant flag.
 *
 * torch.optim.Adam / torch.optim.AdamW with amsgrad=False, maximize=False
 * (https://pytorch.org/docs/stable/generated/torch.optim.Adam.html,
 *  https://pytorch.org/docs/stable/generated/torch.optim.AdamW.html):
 *     t = step + 1                                   (PyTorch's state['step'])
 *     adam:  g_t = g_t + lambda * theta_{t-1}
 *     adamw: theta_{t-1} = theta_{t-1} * (1 - gamma * lambda)
 *     m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
 *     v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2
 *     theta_t = theta_{t-1} - gamma / (1 - beta1^t) * m_t
 *                             / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)
 * The last line is PyTorch's implementation (torch/optim/adam.py,
 * _single_tensor_adam: step_size = lr / bias_correction1, denom =
 * exp_avg_sq.sqrt() / bias_correction2_sqrt + eps), where eps is added after
 * the bias correction of v, as in the documented algorithm.
 *
 * State: 2 floats per parameter, m (state[i]) then v (state[stride + i]).
 * Hyper-parameters read: lr, beta1 (0 -> 0.9), beta2 (0 -> 0.999),
 * eps (0 -> 1e-8), weight_decay (0 = none).
 */
#include <math.h>
#include <stdbool.h>

#include "optimizer.h"

#define ADAM_BETA1_DEFAULT 0.9f
#define ADAM_BETA2_DEFAULT 0.999f
#define ADAM_EPS_DEFAULT 1e-8f

static bool unit_interval(float x) /* [0, 1), refusing NaN */
{
	return x >= 0.0f && x < 1.0f;
}

static int adam_check(const struct rdmaps_wire_hyper *h)
{
	if (srv_hyper_check_common(h))
		return RDMAPS_EINVAL;
	if (!srv_hyper_nonneg(h->eps))
		return RDMAPS_EINVAL;
	if (!unit_interval(h->beta1) || !unit_interval(h->beta2))
		return RDMAPS_EINVAL;
	return 0;
}

/*
 * Inlined into each clone below with decoupled a constant: no branch in the
 * loop. m and v are separate restrict arrays so the loop vectorises without
 * a run-time overlap check. The per-call scalars (bias corrections) are
 * worked out in double, once per call (a run of a chunk), not per element.
 */
static inline __attribute__((always_inline)) void
adam_loop(float *restrict p, float *restrict m, float *restrict v, const float *restrict g,
	  size_t n, const struct rdmaps_wire_hyper *h, uint64_t step, bool decoupled)
{
	const float b1 = h->beta1 != 0.0f ? h->beta1 : ADAM_BETA1_DEFAULT;
	const float b2 = h->beta2 != 0.0f ? h->beta2 : ADAM_BETA2_DEFAULT;
	const float eps = h->eps != 0.0f ? h->eps : ADAM_EPS_DEFAULT;
	const double t = (double)step + 1.0;
	const double bc1 = 1.0 - pow(b1, t), bc2 = 1.0 - pow(b2, t);
	const float step_size = (float)((double)h->lr / bc1);
	const float inv_bc2_sqrt = (float)(1.0 / sqrt(bc2));
	/*
	 * adam: L2 term added to g; adamw: p -= lr * wd * p first. PyTorch
	 * writes the latter p *= 1 - lr * wd; subtracting the small product
	 * instead avoids rounding 1 - lr * wd to float on every step, a bias
	 * that would compound over the steps.
	 */
	const float l2 = decoupled ? 0.0f : h->weight_decay;
	const float lr_wd = decoupled ? (float)((double)h->lr * h->weight_decay) : 0.0f;
	const float c1 = 1.0f - b1, c2 = 1.0f - b2;

	for (size_t i = 0; i < n; i++) {
		const float d = decoupled ? g[i] : g[i] + l2 * p[i];
		const float mi = b1 * m[i] + c1 * d;
		const float vi = b2 * v[i] + c2 * (d * d);
		const float pi = decoupled ? p[i] - lr_wd * p[i] : p[i];

		m[i] = mi;
		v[i] = vi;
		p[i] = pi - step_size * mi / (sqrtf(vi) * inv_bc2_sqrt + eps);
	}
}

SRV_VECTOR_CLONES
static void adam_apply(float *restrict p, float *restrict state, size_t stride,
		       const float *restrict g, size_t n, const struct rdmaps_wire_hyper *h,
		       uint64_t step)
{
	adam_loop(p, state, state + stride, g, n, h, step, false);
}

SRV_VECTOR_CLONES
static void adamw_apply(float *restrict p, float *restrict state, size_t stride,
			const float *restrict g, size_t n, const struct rdmaps_wire_hyper *h,
			uint64_t step)
{
	adam_loop(p, state, state + stride, g, n, h, step, true);
}

static const struct srv_optimizer adam = {
	.name = "adam",
	.state_per_param = 2,
	.check = adam_check,
	.apply = adam_apply,
};
SRV_OPTIMIZER(adam);

static const struct srv_optimizer adamw = {
	.name = "adamw",
	.state_per_param = 2,
	.check = adam_check,
	.apply = adamw_apply,
};
SRV_OPTIMIZER(adamw);
