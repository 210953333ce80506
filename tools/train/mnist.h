/*
 * mnist.h -- load an IDX data set (MNIST, Fashion-MNIST) from its gzip files.
 *
 * IDX is big-endian: a magic (0x00000803 for images, 0x00000801 for labels),
 * the dimensions, then unsigned bytes. Images become floats pixel / 255 in
 * [0, 1]; zeros stay exact zeros (half the pixels of Fashion-MNIST), which
 * the MLP skips. MNIST_MEAN and MNIST_STD are Fashion-MNIST's training-set
 * pixel mean and standard deviation, for the MLP's input standardisation.
 */
#ifndef RDMAPS_TRAIN_MNIST_H
#define RDMAPS_TRAIN_MNIST_H

#include <stddef.h>
#include <stdint.h>

#define MNIST_DEFAULT_DIR "/usr/share/datasets/fashion-mnist"
#define MNIST_MEAN 0.2860f
#define MNIST_STD 0.3530f

struct mnist_set {
	size_t n;        /* samples */
	size_t dim;      /* floats per sample (rows * cols, 784) */
	float *x;        /* n * dim, row-major */
	uint8_t *y;      /* n labels, 0..9 */
};

/*
 * Load "<dir>/<prefix>-images-idx3-ubyte.gz" and the matching labels file
 * (prefix "train" or "t10k"), keeping at most limit samples (0: all).
 * Returns 0, or -1 with a message on stderr. Free with mnist_free().
 */
int mnist_load(const char *dir, const char *prefix, size_t limit, struct mnist_set *out);
void mnist_free(struct mnist_set *s);

#endif
