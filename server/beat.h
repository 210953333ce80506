/*
 * Beats' timing (authority.c has the protocol): how often a holder beats
 * on an etcd that answers in lat_ns, how long it folds past a beat, and
 * how long a backup waits before it replaces a holder whose key stood
 * still. Pure arithmetic, so that the unit tests hold it to the
 * inequality that makes it safe: a backup never replaces a holder before
 * the holder stopped folding, even with clock rates a third apart.
 * Thread-safe (no state).
 */
#ifndef RDMAPS_SERVER_BEAT_H
#define RDMAPS_SERVER_BEAT_H

#include <stdint.h>

#define SRV_FENCE_BEATS 3u        /* a holder folds 3 beats past its last */
#define SRV_STEAL_HALF_BEATS 9u   /* a backup waits 4.5 beats ... */
#define SRV_SLOW_PATIENCE 1u      /* ... and its slowest recent etcd call */
#define SRV_SLOW_HALF_NS 500000000ull /* "recent": a slow call counts half 0.5 s later */
#define SRV_BEAT_MAX_NS 1000000000ull /* beyond, the lease (3 s) replaces as soon */

/* The period: beat_ns (configured; 0: no beats), doubled until it is at
 * least twice lat_ns, the typical etcd call now (an average), and no more
 * than SRV_BEAT_MAX_NS. Between other calls a holder beats once a period
 * has passed since its last beat went out, so from one beat sent to the
 * next answered a period and two calls pass (fewer than the 3 periods it
 * folds for, and the 4.5 a backup waits). A single slow call is the
 * backup's to absorb (srv_beat_stale_ns), not a reason to beat less. */
static inline uint64_t srv_beat_period(uint64_t beat_ns, uint64_t lat_ns)
{
	uint64_t b = beat_ns;

	while (b && b < 2 * lat_ns && 2 * b <= SRV_BEAT_MAX_NS)
		b *= 2;
	return b;
}

/* How long a backup, whose own recent etcd calls took up to slow_ns (a
 * slow call halves every SRV_SLOW_HALF_NS), waits
 * with a holder's key unchanged before it replaces a holder beating every
 * named_ns (as the key names it). Longer is always safe: the holder
 * stopped folding SRV_FENCE_BEATS periods after its last beat went out. */
static inline uint64_t srv_beat_stale_ns(uint64_t named_ns, uint64_t slow_ns)
{
	return SRV_STEAL_HALF_BEATS * named_ns / 2 + SRV_SLOW_PATIENCE * slow_ns;
}

#endif
