/*
 * libFuzzer target: the fold thread's decoder of compressed gradients
 * (server/decode.c), which reads what a worker wrote into its staging
 * ring. Input: one byte of format, two of element count (little-endian, at
 * most 4096 here), then the payload. Whatever the bytes, the decoder must
 * stay inside its buffers (ASan), and what it accepts must be what the
 * format allows: every value finite, the sum of squares it reports finite.
 */
#include <stdlib.h>
#include <string.h>

#include "gradfmt.h"
#include "server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static float dst[4096];
	const char *why = NULL;
	double ss = 0;
	unsigned fmt;
	size_t n;
	uint8_t *payload;

	if (size < 3)
		return 0;
	fmt = data[0] % (RDMAPS__GRADFMT_COUNT + 1); /* one past: an unknown format */
	n = ((size_t)data[1] | (size_t)data[2] << 8) % 4096 + 1;
	/* a copy of exactly the payload's size, so ASan sees any overread */
	payload = malloc(size - 3 ? size - 3 : 1);
	memcpy(payload, data + 3, size - 3);
	if (srv_grad_decode(fmt, dst, n, payload, size - 3, &ss, &why) == 0) {
		if (!__builtin_isfinite(ss))
			abort();
		for (size_t i = 0; i < n; i++)
			if (!__builtin_isfinite(dst[i]))
				abort();
	} else if (!why) {
		abort();
	}
	free(payload);
	return 0;
}
