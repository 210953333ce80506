/*
 * beat.c -- a holder's beats in etcd, and a backup's look for a holder
 * that stopped beating (docs/durability.md, "Who is primary"); the timing
 * arithmetic is in beat.h. Called only from the authority's thread
 * (authority.c), between its other etcd calls.
 *
 * Beats (replicas > 1, beat_ms B > 0): every B a holder writes each
 * primary key it holds again (same value, same lease), in one transaction
 * that succeeds only while its claims stand (each key's revision as it
 * last wrote it). It folds until 3 B after it sent the last beat that
 * succeeded. A backup that has seen a rank's primary key unchanged for
 * 4.5 B by its own clock (B as the holder's key names it: beat=) takes the
 * rank over that key (if it is still unchanged): the holder's last beat
 * was sent before the backup saw it, so the holder stopped folding 1.5 B
 * before (a third of the wait: clock rates may differ by that much). A
 * dead primary is so replaced in 4.5 B, not after its lease, which etcd
 * counts in whole seconds and expires at its next look, every 500 ms. The
 * beat is the key a backup reads anyway: one etcd write per holder every
 * B, no more reads.
 *
 * A loaded etcd (a busy host, a slow disk) answers late, and beats of a
 * fixed period would then pass for a dead holder and flap the rank from
 * server to server. So the period backs off: a holder beats every
 * max(beat_ms, twice its typical etcd call), a power of two times
 * beat_ms up to 1 s, and names that period in its key; a backup waits 4.5
 * of them plus its own slowest recent call (beat.h), and counts no time
 * across a call of its own that failed. Waiting
 * longer is always safe (the holder stopped folding sooner); a holder that
 * shortens its period fences at once by the shorter one, as its write may
 * land unanswered.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "authority.h"
#include "beat.h"
#include "log.h"

/* A holder here beats (replicas > 1, beat_ms > 0); its period now: beat_ms,
 * doubled until it is twice our typical etcd call (see above). 0:
 * no beats. */
uint64_t srv_beat_ns(const struct srv_auth *a)
{
	if (a->s->cfg.replicas < 2)
		return 0;
	return srv_beat_period((uint64_t)a->s->cfg.beat_ms * 1000000ull, a->lat_ns);
}

/* A claim's value, "epoch=E server=S instance=I[ took-over] beat=B", with
 * its beat period now B (ms). */
void srv_claim_format(char *out, size_t outlen, const struct srv_auth *a, uint64_t epoch,
		      unsigned rank, uint64_t beat)
{
	snprintf(out, outlen, "epoch=%" PRIu64 " server=%s instance=%016" PRIx64 "%s beat=%u",
		 epoch, a->primary_name, a->s->instance,
		 rank == a->s->cfg.server_id ? "" : " took-over", (unsigned)(beat / 1000000u));
}

/* Folds may go on until both the lease and the last beat (if we beat)
 * say so; only while our claim stands. */
void srv_fence_publish(struct srv_auth *a)
{
	uint64_t until = a->ka_until;

	if (srv_beat_ns(a) && a->beat_until < until)
		until = a->beat_until;
	if (a->holding)
		atomic_store(&a->s->lease_until, until);
}

/* A primary key of ours: rank r's (base64). */
static const char *held_key(const struct srv_auth *a, unsigned r)
{
	return r == a->s->cfg.server_id ? a->primary_key : a->watch_key[r];
}

/* Our claim's value x and y alike but for the beat period. */
static bool same_claim(const char *x, const char *y)
{
	const char *bx = strstr(x, " beat="), *by = strstr(y, " beat=");

	return bx && by && bx - x == by - y && !strncmp(x, y, (size_t)(bx - x));
}

/*
 * A beat refused: is a key of ours written by someone else (RDMAPS_EBUSY:
 * a backup replaced us), or did an earlier beat of ours go through
 * unanswered (a call timed out after etcd applied it), so that we compared
 * with an old revision? Each key still holding our value (our server and
 * run: nobody else writes it) is still ours, at the revision it has now:
 * RDMAPS_EAGAIN, beat again.
 */
static int beat_refused(struct srv_auth *a, uint64_t held)
{
	char val[320];
	uint64_t mod[64] = { 0 };

	for (unsigned r = 0; r < 64; r++) {
		if (!(held >> r & 1u))
			continue;
		if (srv_auth_range(a, held_key(a, r), &mod[r]))
			return RDMAPS_EAGAIN; /* not known: the next beat asks again (why: range's) */
		/* (the period may differ: an earlier beat's) */
		if (!mod[r] || !srv_json_b64(a->buf, "value", val, sizeof(val)) ||
		    !same_claim(val, a->claim_plain[r]))
			return RDMAPS_EBUSY;
	}
	for (unsigned r = 0; r < 64; r++)
		if (held >> r & 1u)
			a->claim_rev[r] = mod[r];
	log_warn("authority: a beat went through unanswered; beating from revision %" PRIu64,
		 mod[__builtin_ctzll(held)]);
	snprintf(a->why, sizeof(a->why), "a beat refused, our keys still ours");
	return RDMAPS_EAGAIN;
}

/*
 * One beat of every rank held here (see SRV_FENCE_BEATS): one transaction
 * that writes each of our primary keys again, and fails if any of our
 * claims no longer stands (RDMAPS_EBUSY: a backup took that rank over
 * while our beats were late; RDMAPS_EAGAIN: see beat_refused).
 */
static int beat_once(struct srv_auth *a)
{
	struct srv *s = a->s;
	size_t n = 0, cap = sizeof(a->body);
	uint64_t sent = rdmaps__now_ns(), held = 0, rev = 0, period = srv_beat_ns(a);
	int rc;

	a->beat_sent = sent;
	for (unsigned r = 0; r < s->cfg.nservers && r < RDMAPS_MAX_SERVERS; r++)
		if (r == s->cfg.server_id ? a->holding : srv_serves(s, r))
			held |= 1ull << r;
	if (period != a->beat_named) {
		/* the period backs off or comes back: our keys name it */
		for (unsigned r = 0; r < 64; r++) {
			if (!(held >> r & 1u))
				continue;
			srv_claim_format(a->claim_plain[r], sizeof(a->claim_plain[r]), a, a->part_epoch[r],
				     r, period);
			srv_b64_encode(a->claim_plain[r], strlen(a->claim_plain[r]), a->claim_val[r],
				       sizeof(a->claim_val[r]));
		}
		if (period < a->beat_named) {
			/* it may land unanswered: backups then wait by it */
			if (a->beat_until > sent + SRV_FENCE_BEATS * period)
				a->beat_until = sent + SRV_FENCE_BEATS * period;
			srv_fence_publish(a);
		}
		log_info("authority: beats every %" PRIu64 " ms (etcd answers in %" PRIu64
			 " ms on average)", period / 1000000u, a->lat_ns / 1000000u);
		a->beat_named = period;
	}
	n += (size_t)snprintf(a->body + n, cap - n, "{\"compare\":[");
	for (unsigned r = 0, k = 0; r < 64; r++)
		if (held >> r & 1u)
			n += (size_t)snprintf(a->body + n, cap - n,
					      "%s{\"target\":\"MOD\",\"key\":\"%s\",\"mod_revision\":\"%" PRIu64
					      "\"}", k++ ? "," : "", held_key(a, r), a->claim_rev[r]);
	n += (size_t)snprintf(a->body + n, cap - n, "],\"success\":[");
	for (unsigned r = 0, k = 0; r < 64; r++)
		if (held >> r & 1u)
			n += (size_t)snprintf(a->body + n, cap - n,
					      "%s{\"request_put\":{\"key\":\"%s\",\"value\":\"%s\",\"lease\":\"%"
					      PRIu64 "\"}}", k++ ? "," : "", held_key(a, r), a->claim_val[r],
					      a->lease_id);
	n += (size_t)snprintf(a->body + n, cap - n, "]}");
	if (n >= cap) {
		snprintf(a->why, sizeof(a->why), "a beat of %zu bytes", n);
		return RDMAPS_EINVAL;
	}
	if ((rc = srv_auth_call(a, "/v3/kv/txn", a->body)))
		return rc;
	if (!srv_json_true(a->buf, "succeeded"))
		return beat_refused(a, held);
	srv_json_u64(a->buf, "revision", &rev); /* the header's: our writes' */
	for (unsigned r = 0; r < 64; r++)
		if (held >> r & 1u)
			a->claim_rev[r] = rev;
	a->beat_until = sent + SRV_FENCE_BEATS * period;
	srv_fence_publish(a);
	return 0;
}

int srv_beat(struct srv_auth *a)
{
	int rc = beat_once(a);

	if (rc == RDMAPS_EAGAIN)
		rc = beat_once(a); /* from the revisions our keys have now */
	a->beat_lost = rc == RDMAPS_EBUSY;
	return rc;
}

/*
 * Between the other etcd calls of a round (each may take a while on a
 * loaded host), beat if the last beat is a period old, so that a slow
 * round does not pass for a dead holder (a backup waits 4.5 beats). False
 * once a beat found a claim of ours replaced (beat_lost: the round ends
 * there).
 */
bool srv_beat_on_time(struct srv_auth *a)
{
	if (a->beat_lost)
		return false;
	/* a beat late: a round slowed down (the period backs off when
	 * etcd is loaded: srv_beat_ns) */
	if (!a->holding || !srv_beat_ns(a) || rdmaps__now_ns() - a->beat_sent < srv_beat_ns(a))
		return true;
	srv_beat(a);
	return !a->beat_lost;
}

/*
 * Has rank p's holder (its primary key is key64p) stopped beating? *held:
 * the key's revision (0: absent, not stale); stale once it has stood still
 * for 4.5 of the holder's beats (its key says beat=; a holder that does
 * not beat, with one copy or beat_ms 0, is replaced only when its lease
 * ends).
 */
bool srv_stale_holder(struct srv_auth *a, unsigned p, const char *key64p, uint64_t *held)
{
	char val[320] = "";
	const char *b;
	unsigned long beat_ms;
	uint64_t now;

	*held = 0;
	if (srv_auth_range(a, key64p, held)) {
		*held = UINT64_MAX; /* not known: as held */
		a->seen_at[p] = 0;  /* and the holder's beats may not land either */
		return false;
	}
	if (!*held || a->s->cfg.replicas < 2 || !srv_json_b64(a->buf, "value", val, sizeof(val)) ||
	    !(b = strstr(val, " beat=")) || !(beat_ms = strtoul(b + 6, NULL, 10)))
		return false;
	now = rdmaps__now_ns();
	if (*held != a->held_seen[p] || !a->seen_at[p]) {
		a->held_seen[p] = *held;
		a->seen_at[p] = now;
		return false;
	}
	/* (our own calls slow: etcd is loaded, the holder's beats may be
	 * late to land) */
	return now - a->seen_at[p] >= srv_beat_stale_ns(beat_ms * 1000000ull, a->slow_ns);
}
