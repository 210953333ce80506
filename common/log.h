/*
 * log.h -- one logger for server, library and tools. Level comes from
 * RDMAPS_LOG (error|warn|info|debug; default warn for the library, the
 * server raises it to info). Never used on a hot path except for errors.
 */
#ifndef RDMAPS_COMMON_LOG_H
#define RDMAPS_COMMON_LOG_H

#include <stdbool.h>
#include <stdint.h>

enum rdmaps__log_level { RDMAPS_LOG_ERROR, RDMAPS_LOG_WARN, RDMAPS_LOG_INFO, RDMAPS_LOG_DEBUG };

/* Set the default level; RDMAPS_LOG in the environment still wins. Thread-safe. */
void rdmaps__log_init(enum rdmaps__log_level dflt);
int rdmaps__log_enabled(enum rdmaps__log_level lvl);
void rdmaps__log(enum rdmaps__log_level lvl, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/*
 * A log rate limit for what a peer can make happen at will (bad messages,
 * refused slots): at most `burst` lines per window, the rest counted and
 * named in the next line let through. One per peer; not thread-safe (its
 * owner's thread only). The events themselves are counted elsewhere.
 */
struct rdmaps__ratelimit {
	uint64_t window_start;
	uint32_t lines, suppressed;
};
#define RDMAPS_LOG_BURST 10u
#define RDMAPS_LOG_WINDOW_NS 10000000000ull /* 10 s */
/* True when a line may go out now; *suppressed: lines held back before it. */
bool rdmaps__ratelimit_ok(struct rdmaps__ratelimit *r, uint32_t *suppressed);

#define log_error(...) rdmaps__log(RDMAPS_LOG_ERROR, __VA_ARGS__)
#define log_warn(...) rdmaps__log(RDMAPS_LOG_WARN, __VA_ARGS__)
#define log_info(...) rdmaps__log(RDMAPS_LOG_INFO, __VA_ARGS__)
#define log_debug(...)                                      \
	do {                                                \
		if (rdmaps__log_enabled(RDMAPS_LOG_DEBUG)) \
			rdmaps__log(RDMAPS_LOG_DEBUG, __VA_ARGS__); \
	} while (0)

#endif
