/*
 * log.c -- a small stderr logger. One fprintf per line (stdio locks the
 * stream), so lines from concurrent threads never interleave.
 */
#include "log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static _Atomic int level = -1;

static int parse_level(const char *s, int dflt)
{
	static const char *const names[] = { "error", "warn", "info", "debug" };
	if (!s || !*s)
		return dflt;
	for (int i = 0; i < 4; i++)
		if (!strcmp(s, names[i]))
			return i;
	return dflt;
}

void rdmaps__log_init(enum rdmaps__log_level dflt)
{
	atomic_store(&level, parse_level(getenv("RDMAPS_LOG"), (int)dflt));
}

static int current(void)
{
	int l = atomic_load_explicit(&level, memory_order_relaxed);
	if (l < 0) {
		rdmaps__log_init(RDMAPS_LOG_WARN);
		l = atomic_load(&level);
	}
	return l;
}

int rdmaps__log_enabled(enum rdmaps__log_level lvl)
{
	return (int)lvl <= current();
}

void rdmaps__log(enum rdmaps__log_level lvl, const char *fmt, ...)
{
	static const char *const tags[] = { "error", "warn", "info", "debug" };
	char msg[1024];
	struct timespec ts;
	va_list ap;

	if ((int)lvl > current())
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	clock_gettime(CLOCK_REALTIME, &ts);
	fprintf(stderr, "rdmaps %ld.%03ld %s: %s\n", (long)ts.tv_sec, ts.tv_nsec / 1000000L,
		tags[lvl], msg);
}

bool rdmaps__ratelimit_ok(struct rdmaps__ratelimit *r, uint32_t *suppressed)
{
	struct timespec ts;
	uint64_t now;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	now = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
	if (!r->window_start || now - r->window_start >= RDMAPS_LOG_WINDOW_NS) {
		r->window_start = now;
		r->lines = 0;
	}
	if (r->lines >= RDMAPS_LOG_BURST) {
		r->suppressed++;
		return false;
	}
	r->lines++;
	*suppressed = r->suppressed;
	r->suppressed = 0;
	return true;
}
