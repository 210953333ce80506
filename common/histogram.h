/*
 * histogram.h -- log-linear latency histogram (HdrHistogram-style, which
 * Debian 12 does not package). Values are nanoseconds. Buckets are fixed at
 * creation: recording allocates nothing and takes no lock, so it may sit in a
 * measured loop. Relative error per value is below 1/RDMAPS_HIST_SUB (~0.8 %).
 */
#ifndef RDMAPS_COMMON_HISTOGRAM_H
#define RDMAPS_COMMON_HISTOGRAM_H

#include <stdint.h>

#define RDMAPS_HIST_SUB_BITS 7
#define RDMAPS_HIST_SUB (1u << RDMAPS_HIST_SUB_BITS)
#define RDMAPS_HIST_BUCKETS ((64 - RDMAPS_HIST_SUB_BITS + 1) * RDMAPS_HIST_SUB)

struct rdmaps_hist {
	uint64_t count, min, max;
	double sum;
	uint32_t bins[RDMAPS_HIST_BUCKETS];
};

/* The caller owns the struct; not thread-safe (one recorder at a time). */
void rdmaps__hist_reset(struct rdmaps_hist *h);
void rdmaps__hist_record(struct rdmaps_hist *h, uint64_t v);
/* Merge src into dst. */
void rdmaps__hist_merge(struct rdmaps_hist *dst, const struct rdmaps_hist *src);
/* Value at quantile q in [0,1] (upper edge of its bucket, clamped to max). */
uint64_t rdmaps__hist_quantile(const struct rdmaps_hist *h, double q);
double rdmaps__hist_mean(const struct rdmaps_hist *h);

#endif
