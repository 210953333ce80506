/*
 * server/beat.h: a holder's beat period backs off on a slow etcd, a
 * backup waits longer when its own calls are slow, and a backup never
 * replaces a holder before the holder stopped folding, for any period and
 * load.
 */
#include <criterion/criterion.h>

#include "beat.h"

#define MS 1000000ull

Test(beat, period_backs_off_on_a_slow_etcd)
{
	cr_assert_eq(srv_beat_period(100 * MS, 0), 100 * MS, "fast etcd: as configured");
	cr_assert_eq(srv_beat_period(100 * MS, 50 * MS), 100 * MS);
	cr_assert_eq(srv_beat_period(100 * MS, 51 * MS), 200 * MS, "calls over half a beat");
	cr_assert_eq(srv_beat_period(100 * MS, 120 * MS), 400 * MS);
	cr_assert_eq(srv_beat_period(100 * MS, 5000 * MS), 800 * MS, "at most 1 s");
	cr_assert_eq(srv_beat_period(1000 * MS, 5000 * MS), 1000 * MS);
	cr_assert_eq(srv_beat_period(0, 5000 * MS), 0, "no beats stay none");
}

Test(beat, a_backup_waits_longer_when_its_own_calls_are_slow)
{
	cr_assert_eq(srv_beat_stale_ns(100 * MS, 0), 450 * MS);
	cr_assert_eq(srv_beat_stale_ns(100 * MS, 200 * MS), 650 * MS);
}

/* The holder folds until FENCE periods after it sent its last beat; the
 * backup saw that beat no sooner and waits srv_beat_stale_ns by a clock
 * that may run a third slower: the wait, so shortened, still covers the
 * fence, whatever the period and however slow either side's etcd. */
Test(beat, the_steal_comes_after_the_fence)
{
	for (uint64_t b = 20; b <= 1000; b += 10)
		for (uint64_t slow = 0; slow <= 3000; slow += 7) {
			uint64_t p = srv_beat_period(b * MS, slow * MS);
			cr_assert_geq(p, b * MS);
			cr_assert(p >= 2 * slow * MS || 2 * p > SRV_BEAT_MAX_NS, "b %llu slow %llu: %llu",
				  (unsigned long long)b, (unsigned long long)slow,
				  (unsigned long long)p);
			for (uint64_t bslow = 0; bslow <= 3000; bslow += 301)
				cr_assert_geq(srv_beat_stale_ns(p, bslow * MS) * 2 / 3,
					      SRV_FENCE_BEATS * p);
		}
}
