/*
 * mlp.c -- forward and backward passes of the MLP in mlp.h, in plain loops.
 *
 * Every hot inner loop runs over the hidden units (or the classes) with a
 * scalar from the outer loop: y[j] += a * w[j]. That is an independent
 * multiply-add per element, which -O3 turns into SIMD without any
 * reassociation flags.
 *
 * Standardisation without losing sparsity. The network's input is
 * u_k = (x_k - mean) / std = x_k * s - c  with s = 1 / std, c = mean / std,
 * the same shift c for every pixel. So
 *   h_j = b1_j + sum_k u_k w1_kj = (b1_j - c * sum_k w1_kj) + sum_k x_k s w1_kj
 * and the last sum only needs the non-zero pixels (half of them): the
 * shifted bias is computed once per batch. Likewise the gradient
 *   dL/dw1_kj = sum_s u_sk dh_sj = sum_s x_sk s dh_sj - c * dL/db1_j
 * takes the sparse outer products, then one dense correction per batch.
 * Exactly the model worker.py computes densely with numpy.
 */
#include "mlp.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void mlp_dims(struct mlp *m, unsigned in, unsigned hidden, unsigned out)
{
	m->in = in;
	m->hidden = hidden;
	m->out = out;
	m->in_mean = 0.0f;
	m->in_std = 1.0f;
	m->off_w1 = 0;
	m->off_b1 = m->off_w1 + (size_t)in * hidden;
	m->off_w2 = m->off_b1 + hidden;
	m->off_b2 = m->off_w2 + (size_t)hidden * out;
	m->n_params = m->off_b2 + out;
}

static uint64_t splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void uniform_fill(float *p, size_t n, float limit, uint64_t *state)
{
	for (size_t i = 0; i < n; i++) {
		/* 24 random bits: exact in a float, so worker.py gets the same bits */
		float u = (float)(splitmix64(state) >> 40) * 0x1p-24f;
		p[i] = (2.0f * u - 1.0f) * limit;
	}
}

void mlp_init_params(const struct mlp *m, float *p, uint64_t seed)
{
	uint64_t state = seed;

	uniform_fill(p + m->off_w1, (size_t)m->in * m->hidden, sqrtf(6.0f / (float)m->in), &state);
	memset(p + m->off_b1, 0, m->hidden * sizeof(float));
	uniform_fill(p + m->off_w2, (size_t)m->hidden * m->out,
		     sqrtf(6.0f / (float)(m->hidden + m->out)), &state);
	memset(p + m->off_b2, 0, m->out * sizeof(float));
}

int mlp_work_alloc(struct mlp_work *w, const struct mlp *m, size_t max_batch)
{
	w->max_batch = max_batch;
	w->h = malloc(max_batch * m->hidden * sizeof(float));
	w->z = malloc(max_batch * m->out * sizeof(float));
	w->dh = malloc(m->hidden * sizeof(float));
	w->b1x = malloc(m->hidden * sizeof(float));
	if (!w->h || !w->z || !w->dh || !w->b1x) {
		mlp_work_free(w);
		return -1;
	}
	return 0;
}

void mlp_work_free(struct mlp_work *w)
{
	free(w->h);
	free(w->z);
	free(w->dh);
	free(w->b1x);
	memset(w, 0, sizeof(*w));
}

/* b1x = b1 - c * (column sums of w1): the input shift, folded into the bias. */
static void shifted_bias(const struct mlp *m, const float *restrict p, float *restrict b1x)
{
	const unsigned H = m->hidden;
	const float c = m->in_mean / m->in_std;
	const float *restrict w1 = p + m->off_w1;

	memcpy(b1x, p + m->off_b1, H * sizeof(float));
	if (c == 0.0f)
		return;
	for (unsigned k = 0; k < m->in; k++) {
		const float *restrict row = w1 + (size_t)k * H;
		for (unsigned j = 0; j < H; j++)
			b1x[j] -= c * row[j];
	}
}

/* h = relu(u . w1 + b1) and z = h . w2 + b2 for one sample (b1x: shifted_bias). */
static void forward(const struct mlp *m, const float *restrict p, const float *restrict b1x,
		    const float *restrict x, float *restrict h, float *restrict z)
{
	const unsigned H = m->hidden, O = m->out;
	const float s = 1.0f / m->in_std;
	const float *restrict w1 = p + m->off_w1;
	const float *restrict w2 = p + m->off_w2, *restrict b2 = p + m->off_b2;

	memcpy(h, b1x, H * sizeof(float));
	for (unsigned k = 0; k < m->in; k++) {
		if (x[k] == 0.0f)
			continue; /* a black pixel: its shift is already in b1x */
		const float xk = x[k] * s;
		const float *restrict row = w1 + (size_t)k * H;
		for (unsigned j = 0; j < H; j++)
			h[j] += xk * row[j];
	}
	for (unsigned j = 0; j < H; j++)
		h[j] = h[j] > 0.0f ? h[j] : 0.0f;

	memcpy(z, b2, O * sizeof(float));
	for (unsigned j = 0; j < H; j++) {
		const float hj = h[j];
		if (hj == 0.0f)
			continue;
		const float *restrict row = w2 + (size_t)j * O;
		for (unsigned c = 0; c < O; c++)
			z[c] += hj * row[c];
	}
}

/* Softmax in place (z becomes probabilities); returns -log p[label]. */
static float softmax_xent(float *z, unsigned n, unsigned label)
{
	float mx = z[0], sum = 0.0f;

	for (unsigned c = 1; c < n; c++)
		mx = z[c] > mx ? z[c] : mx;
	for (unsigned c = 0; c < n; c++) {
		z[c] = expf(z[c] - mx);
		sum += z[c];
	}
	for (unsigned c = 0; c < n; c++)
		z[c] /= sum;
	return -logf(z[label] > 1e-30f ? z[label] : 1e-30f);
}

float mlp_gradient(const struct mlp *m, const float *restrict p, const float *x, const uint8_t *y,
		   const uint32_t *idx, size_t b, float *restrict grad, struct mlp_work *w)
{
	const unsigned H = m->hidden, O = m->out;
	const float s = 1.0f / m->in_std, c = m->in_mean / m->in_std;
	const float *restrict w2 = p + m->off_w2;
	float *restrict gw1 = grad + m->off_w1, *restrict gb1 = grad + m->off_b1;
	float *restrict gw2 = grad + m->off_w2, *restrict gb2 = grad + m->off_b2;
	float *restrict dh = w->dh;
	const float inv_b = 1.0f / (float)b;
	double loss = 0.0;

	memset(grad, 0, m->n_params * sizeof(float));
	shifted_bias(m, p, w->b1x);
	for (size_t i = 0; i < b; i++) {
		const float *restrict xs = x + (size_t)idx[i] * m->in;
		const unsigned label = y[idx[i]];
		float *restrict h = w->h + i * H, *restrict z = w->z + i * O;

		forward(m, p, w->b1x, xs, h, z);
		loss += softmax_xent(z, O, label);

		/* dL/dz = (softmax - onehot) / b */
		z[label] -= 1.0f;
		for (unsigned k = 0; k < O; k++) {
			z[k] *= inv_b;
			gb2[k] += z[k];
		}
		/* w2 gradient, and the delta reaching the hidden layer */
		for (unsigned j = 0; j < H; j++) {
			const float hj = h[j];
			const float *restrict row = w2 + (size_t)j * O;
			float *restrict grow = gw2 + (size_t)j * O;
			float d = 0.0f;
			for (unsigned k = 0; k < O; k++) {
				grow[k] += hj * z[k];
				d += row[k] * z[k];
			}
			dh[j] = hj > 0.0f ? d : 0.0f; /* ReLU passes where it was active */
		}
		for (unsigned j = 0; j < H; j++)
			gb1[j] += dh[j];
		/* w1 gradient: outer product of the (sparse, scaled) input and dh */
		for (unsigned k = 0; k < m->in; k++) {
			if (xs[k] == 0.0f)
				continue;
			const float xk = xs[k] * s;
			float *restrict grow = gw1 + (size_t)k * H;
			for (unsigned j = 0; j < H; j++)
				grow[j] += xk * dh[j];
		}
	}
	/* the shift's share of the w1 gradient: -c * dL/db1 on every row */
	if (c != 0.0f)
		for (unsigned k = 0; k < m->in; k++) {
			float *restrict grow = gw1 + (size_t)k * H;
			for (unsigned j = 0; j < H; j++)
				grow[j] -= c * gb1[j];
		}
	return (float)(loss / (double)b);
}

size_t mlp_correct(const struct mlp *m, const float *p, const float *x, const uint8_t *y, size_t n,
		   struct mlp_work *w)
{
	size_t ok = 0;

	shifted_bias(m, p, w->b1x);
	for (size_t i = 0; i < n; i++) {
		const float *z = w->z;
		unsigned best = 0;

		forward(m, p, w->b1x, x + i * m->in, w->h, w->z);
		for (unsigned k = 1; k < m->out; k++)
			if (z[k] > z[best])
				best = k;
		ok += best == y[i];
	}
	return ok;
}
