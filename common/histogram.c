/*
 * histogram.c -- bucket i covers values with the same top
 * RDMAPS_HIST_SUB_BITS+1 significant bits: exact below 2*SUB, then
 * SUB linear sub-buckets per power of two.
 */
#include "histogram.h"

#include <string.h>

static unsigned bucket_of(uint64_t v)
{
	if (v < 2 * RDMAPS_HIST_SUB)
		return (unsigned)v;
	unsigned msb = 63u - (unsigned)__builtin_clzll(v);
	unsigned shift = msb - RDMAPS_HIST_SUB_BITS;
	/* top bits are 1xxxxxxx: the x's pick the sub-bucket */
	return (shift + 1) * RDMAPS_HIST_SUB + (unsigned)((v >> shift) & (RDMAPS_HIST_SUB - 1));
}

static uint64_t bucket_high(unsigned b)
{
	if (b < 2 * RDMAPS_HIST_SUB)
		return b;
	unsigned shift = b / RDMAPS_HIST_SUB - 1;
	uint64_t sub = b % RDMAPS_HIST_SUB;
	uint64_t low = (RDMAPS_HIST_SUB + sub) << shift;
	return low + ((1ull << shift) - 1);
}

void rdmaps__hist_reset(struct rdmaps_hist *h)
{
	memset(h, 0, sizeof(*h));
	h->min = UINT64_MAX;
}

void rdmaps__hist_record(struct rdmaps_hist *h, uint64_t v)
{
	h->bins[bucket_of(v)]++;
	h->count++;
	h->sum += (double)v;
	if (v < h->min)
		h->min = v;
	if (v > h->max)
		h->max = v;
}

void rdmaps__hist_merge(struct rdmaps_hist *dst, const struct rdmaps_hist *src)
{
	for (unsigned i = 0; i < RDMAPS_HIST_BUCKETS; i++)
		dst->bins[i] += src->bins[i];
	dst->count += src->count;
	dst->sum += src->sum;
	if (src->min < dst->min)
		dst->min = src->min;
	if (src->max > dst->max)
		dst->max = src->max;
}

uint64_t rdmaps__hist_quantile(const struct rdmaps_hist *h, double q)
{
	if (!h->count)
		return 0;
	if (q <= 0)
		return h->min;
	/* rank of the sample at quantile q (nearest-rank definition) */
	uint64_t rank = (uint64_t)(q * (double)h->count + 0.999999);
	uint64_t seen = 0;

	if (rank < 1)
		rank = 1;
	for (unsigned i = 0; i < RDMAPS_HIST_BUCKETS; i++) {
		seen += h->bins[i];
		if (seen >= rank) {
			uint64_t v = bucket_high(i);
			return v > h->max ? h->max : (v < h->min ? h->min : v);
		}
	}
	return h->max;
}

double rdmaps__hist_mean(const struct rdmaps_hist *h)
{
	return h->count ? h->sum / (double)h->count : 0.0;
}
