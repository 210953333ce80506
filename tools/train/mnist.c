/*
 * mnist.c -- gzip IDX reader on zlib's gzread (zlib1g-dev). See mnist.h.
 */
#include "mnist.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

static int read_all(gzFile f, void *buf, size_t len, const char *path)
{
	unsigned char *p = buf;

	while (len) {
		unsigned want = len > (1u << 30) ? 1u << 30 : (unsigned)len;
		int got = gzread(f, p, want);
		if (got <= 0) {
			int zerr;
			const char *msg = gzerror(f, &zerr);
			fprintf(stderr, "mnist: %s: %s\n", path,
				got == 0 ? "file is shorter than its header says" : msg);
			return -1;
		}
		p += got;
		len -= (size_t)got;
	}
	return 0;
}

static uint32_t be32(const unsigned char *b)
{
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

/* Open path, check the magic, read ndim dimensions; returns the open file or NULL. */
static gzFile open_idx(const char *path, uint32_t magic, unsigned ndim, uint32_t *dims)
{
	unsigned char hdr[4 * 4];
	gzFile f = gzopen(path, "rb");

	if (!f) {
		fprintf(stderr, "mnist: cannot open %s (is dataset-fashion-mnist installed? "
				"tools/install-deps train)\n", path);
		return NULL;
	}
	gzbuffer(f, 1u << 17);
	if (read_all(f, hdr, 4 * (1 + ndim), path)) {
		gzclose(f);
		return NULL;
	}
	if (be32(hdr) != magic) {
		fprintf(stderr, "mnist: %s: bad magic 0x%08x (want 0x%08x)\n", path, be32(hdr), magic);
		gzclose(f);
		return NULL;
	}
	for (unsigned i = 0; i < ndim; i++)
		dims[i] = be32(hdr + 4 * (i + 1));
	return f;
}

int mnist_load(const char *dir, const char *prefix, size_t limit, struct mnist_set *out)
{
	char ipath[4096], lpath[4096];
	uint32_t idims[3], ldims[1];
	unsigned char *pix = NULL;
	gzFile fi = NULL, fl = NULL;
	size_t n, dim;

	memset(out, 0, sizeof(*out));
	snprintf(ipath, sizeof(ipath), "%s/%s-images-idx3-ubyte.gz", dir, prefix);
	snprintf(lpath, sizeof(lpath), "%s/%s-labels-idx1-ubyte.gz", dir, prefix);
	if (!(fi = open_idx(ipath, 0x00000803u, 3, idims)) ||
	    !(fl = open_idx(lpath, 0x00000801u, 1, ldims)))
		goto fail;
	if (idims[0] != ldims[0] || !idims[0] || !idims[1] || !idims[2] ||
	    idims[1] > 4096 || idims[2] > 4096) {
		fprintf(stderr, "mnist: %s and %s disagree or have odd sizes\n", ipath, lpath);
		goto fail;
	}
	n = idims[0];
	if (limit && limit < n)
		n = limit;
	dim = (size_t)idims[1] * idims[2];
	pix = malloc(n * dim);
	out->x = malloc(n * dim * sizeof(float));
	out->y = malloc(n);
	if (!pix || !out->x || !out->y) {
		fprintf(stderr, "mnist: out of memory\n");
		goto fail;
	}
	if (read_all(fi, pix, n * dim, ipath) || read_all(fl, out->y, n, lpath))
		goto fail;
	for (size_t i = 0; i < n; i++)
		if (out->y[i] > 9) {
			fprintf(stderr, "mnist: %s: label %u out of range\n", lpath, out->y[i]);
			goto fail;
		}
	for (size_t i = 0; i < n * dim; i++)
		out->x[i] = (float)pix[i] * (1.0f / 255.0f);
	out->n = n;
	out->dim = dim;
	free(pix);
	gzclose(fi);
	gzclose(fl);
	return 0;
fail:
	free(pix);
	mnist_free(out);
	if (fi)
		gzclose(fi);
	if (fl)
		gzclose(fl);
	return -1;
}

void mnist_free(struct mnist_set *s)
{
	free(s->x);
	free(s->y);
	memset(s, 0, sizeof(*s));
}
