/*
 * mlp.h -- a one-hidden-layer perceptron (in -> hidden, ReLU -> out, softmax
 * cross-entropy) whose parameters live in ONE flat float array, so a worker
 * pulls and pushes the whole model as one rdmaps tensor. Layout, in order:
 *
 *   w1  in x hidden   (row k holds input k's weights to every hidden unit)
 *   b1  hidden
 *   w2  hidden x out  (row j holds hidden unit j's weights to every class)
 *   b2  out
 *
 * The network sees standardised inputs (x - mean) / std (mlp_dims sets
 * mean 0, std 1; set in_mean/in_std after it). Row-major "input-major"
 * weights make every inner loop an axpy over contiguous floats
 * (y[j] += a * w[k][j]), which GCC vectorises at -O3 without -ffast-math (a
 * dot-product reduction would need reassociation). tools/train/worker.py
 * uses exactly the same layout, standardisation and initialisation.
 */
#ifndef RDMAPS_TRAIN_MLP_H
#define RDMAPS_TRAIN_MLP_H

#include <stddef.h>
#include <stdint.h>

struct mlp {
	unsigned in, hidden, out;
	float in_mean, in_std;
	size_t off_w1, off_b1, off_w2, off_b2;
	size_t n_params;
};

/* Scratch for up to max_batch samples; owned by the caller (mlp_work_free). */
struct mlp_work {
	size_t max_batch;
	float *h;    /* max_batch x hidden: activations */
	float *z;    /* max_batch x out: logits, then probabilities/deltas */
	float *dh;   /* hidden: back-propagated delta of one sample */
	float *b1x;  /* hidden: b1 with the input shift folded in */
};

void mlp_dims(struct mlp *m, unsigned in, unsigned hidden, unsigned out);

/*
 * Deterministic initialisation, identical on every worker (and in
 * worker.py): splitmix64(seed) stream u in [0,1) (24 bits), weights
 * (2u - 1) * limit with He-uniform limit sqrt(6 / in) for w1 and
 * Glorot-uniform sqrt(6 / (hidden + out)) for w2, in layout order; biases 0.
 */
void mlp_init_params(const struct mlp *m, float *params, uint64_t seed);

int mlp_work_alloc(struct mlp_work *w, const struct mlp *m, size_t max_batch);
void mlp_work_free(struct mlp_work *w);

/*
 * Mean-loss gradient of a minibatch: samples idx[0..b) of x (m->in raw
 * floats each) with labels y. Writes every element of grad (m->n_params
 * floats) and returns the mean cross-entropy loss. b <= w->max_batch.
 */
float mlp_gradient(const struct mlp *m, const float *params, const float *x, const uint8_t *y,
		   const uint32_t *idx, size_t b, float *grad, struct mlp_work *w);

/* Number of samples among the n of x that the model classifies correctly. */
size_t mlp_correct(const struct mlp *m, const float *params, const float *x, const uint8_t *y,
		   size_t n, struct mlp_work *w);

#endif
