/*
 * authority.c -- who may fold the pushes of rank r: the server holding the
 * etcd key <prefix>/primary/<r>, attached to a lease it keeps alive
 * (docs/durability.md, "Who is primary").
 *
 * A claim is one etcd transaction: if the primary key does not exist and
 * the epoch key <prefix>/epoch/<r> is as just read, write epoch + 1 there
 * and the primary key (with our lease). Two claimants cannot both win: the
 * second's comparison fails. The epoch key has no lease, so epochs only
 * rise, across restarts and claimants.
 *
 * Fencing needs no clock shared with etcd. A keep-alive sent at local time
 * t and answered with TTL means etcd will not expire the lease before TTL
 * after it received the request, which is after t. So this server may fold
 * until t + TTL minus a margin (clock rate drift, and the batch of folds a
 * fold thread may have started just before): s->lease_until. Fold threads
 * compare it with their own clock before every round of polling
 * (fold.c): past it they fold nothing, whatever this thread is doing or
 * whether etcd can be reached. Only after etcd has expired the lease can
 * anyone else's claim succeed.
 *
 * With replicas, a holder also beats, and a backup replaces a holder that
 * stopped (beat.c).
 *
 * One thread, asleep between keep-alives (a third of the TTL apart), or
 * between beats; it never touches a chunk.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "authority.h"
#include "beat.h"
#include "error.h"

#define CALL_MS 1000u   /* one etcd call's deadline (at most a third of a lease of 3 s) */
#define RETRY_NS 250000000ull /* a claim of a held rank, or etcd down: try again */
#define WATCH_NS 100000000ull /* a backup asks whether its primaries hold their ranks */
/* a rank whose own server is in sync is left to it this long (it claims
 * every RETRY_NS): a rank handed back goes where it was handed */
#define OWN_FIRST_NS 1000000000ull
/* ranks dropped (our lease or a claim lost): the listener sends their
 * workers away at its next tick (100 ms); no new claim unfences folds
 * before, so none of theirs is folded under it */
#define DROP_SETTLE_NS 300000000ull


/* "<prefix>/<what>/<rank>", base64 */
static void key64(char *out, size_t outlen, const char *prefix, const char *what, unsigned r)
{
	char key[192];

	snprintf(key, sizeof(key), "%s/%s/%u", prefix, what, r);
	srv_b64_encode(key, strlen(key), out, outlen);
}

int srv_auth_call(struct srv_auth *a, const char *path, const char *body)
{
	uint64_t t0 = rdmaps__now_ns();
	int rc = srv_etcd_post(&a->etcd, path, body, a->buf, sizeof(a->buf), CALL_MS, a->why,
			       sizeof(a->why));
	uint64_t took = rdmaps__now_ns() - t0;

	/* how loaded etcd is: the beat's period and a backup's patience */
	uint64_t halves = (t0 + took - a->slow_at) / SRV_SLOW_HALF_NS;
	a->slow_ns = halves >= 64 ? 0 : a->slow_ns >> halves;
	a->slow_at += halves * SRV_SLOW_HALF_NS;
	if (took > a->slow_ns)
		a->slow_ns = took;
	a->lat_ns = a->lat_ns - a->lat_ns / 8 + took / 8;
	return rc;
}

/* Read one key (base64): 0 with etcd's answer in a->buf; *mod its revision
 * (0: absent). */
int srv_auth_range(struct srv_auth *a, const char *key64, uint64_t *mod)
{
	char body[320];
	int rc;

	snprintf(body, sizeof(body), "{\"key\":\"%s\"}", key64);
	if ((rc = srv_auth_call(a, "/v3/kv/range", body)))
		return rc;
	if (!srv_json_u64(a->buf, "mod_revision", mod))
		*mod = 0; /* no kvs */
	return 0;
}

/* etcd's answer without the lease (expired, revoked) names no TTL. */
static int grant(struct srv_auth *a)
{
	char body[64];
	uint64_t id = 0, ttl = 0;
	int rc;

	snprintf(body, sizeof(body), "{\"TTL\":%u}", a->s->cfg.lease_s);
	if ((rc = srv_auth_call(a, "/v3/lease/grant", body)))
		return rc;
	if (!srv_json_u64(a->buf, "ID", &id) || !srv_json_u64(a->buf, "TTL", &ttl) || !id || !ttl) {
		snprintf(a->why, sizeof(a->why), "lease grant answered %.120s", a->buf);
		return RDMAPS_EPROTO;
	}
	a->lease_id = id;
	a->ttl_ns = ttl * 1000000000ull;
	return 0;
}

/*
 * Refresh the lease; on an answer, the time until which folds may go on.
 * RDMAPS_ENOENT: etcd no longer has it (it expired: someone else may hold
 * the rank now, or may soon).
 */
static int keepalive(struct srv_auth *a)
{
	char body[64];
	uint64_t ttl = 0, sent = rdmaps__now_ns();
	int rc;

	snprintf(body, sizeof(body), "{\"ID\":\"%" PRIu64 "\"}", a->lease_id);
	if ((rc = srv_auth_call(a, "/v3/lease/keepalive", body)))
		return rc;
	if (!srv_json_u64(a->buf, "TTL", &ttl) || !ttl)
		return RDMAPS_ENOENT;
	uint64_t ttl_ns = ttl * 1000000000ull;
	/* a tenth for rate drift and the fold round in progress, and 50 ms */
	uint64_t margin = ttl_ns / 10 + 50000000ull;
	a->ka_until = sent + ttl_ns - margin;
	srv_fence_publish(a);
	a->fence_noted = false;
	return 0;
}

/*
 * An epoch key's value: "E isr=r1,r2 by=host:port" -- the epoch, the
 * backups its primary has recorded as holding everything it acknowledged
 * (replica.c), the only servers that may take the rank over, and that
 * primary: after a restart of the whole cluster, the server whose copy of
 * the part is the newest (claim, watch_ranks).
 */
static void epoch_value(struct srv_auth *a, char *out, size_t len, uint64_t epoch, uint64_t isr,
			unsigned rank)
{
	size_t n = (size_t)snprintf(out, len, "%" PRIu64 " isr=", epoch);

	for (unsigned r = 0; r < 64 && n < len; r++)
		if (isr >> r & 1u)
			n += (size_t)snprintf(out + n, len - n, "%s%u", out[n - 1] == '=' ? "" : ",", r);
	if (n < len)
		snprintf(out + n, len - n, " by=%s%s", a->primary_name,
			 rank == a->s->cfg.server_id ? "" : " took-over");
}

/* Does an epoch key's by= name this server (taking a rank over or not)? */
static bool by_us(const struct srv_auth *a, const char *by)
{
	size_t n = strlen(a->primary_name);

	return !strncmp(by, a->primary_name, n) && (!by[n] || !strcmp(by + n, " took-over"));
}

/* An epoch key (base64 key64): its epoch, in-sync set, revision (all 0
 * when absent) and its primary (by, "" if not named). */
static int read_epoch(struct srv_auth *a, const char *key64, uint64_t *epoch, uint64_t *isr,
		      uint64_t *mod, char *by, size_t bylen)
{
	char val[256] = "";
	const char *l;
	int rc;

	*epoch = *isr = 0;
	by[0] = '\0';
	if ((rc = srv_auth_range(a, key64, mod)) || !*mod)
		return rc; /* or never claimed */
	if (!srv_json_b64(a->buf, "value", val, sizeof(val)) || sscanf(val, "%" SCNu64, epoch) != 1) {
		snprintf(a->why, sizeof(a->why), "epoch key holds '%s'", val);
		return RDMAPS_EPROTO;
	}
	for (l = strstr(val, "isr="); l && *(l += l[0] == 'i' ? 4 : 1);) {
		char *end;
		unsigned long r = strtoul(l, &end, 10);
		if (end == l || r >= 64)
			break;
		*isr |= 1ull << r;
		l = *end == ',' ? end : NULL;
	}
	if ((l = strstr(val, " by=")))
		snprintf(by, bylen, "%s", l + 4);
	return 0;
}

/*
 * Claim rank r for epoch + 1. 0: ours; RDMAPS_EBUSY: another holds it
 * (a->held_by says who); RDMAPS_EAGAIN: the epoch moved under us. held:
 * 0, the primary key must be absent; else its revision: a holder that
 * stopped beating (srv_stale_holder) is replaced, if the key is still so.
 */
static int claim_rank(struct srv_auth *a, const char *primary_key, const char *epoch_key,
		      uint64_t epoch, uint64_t mod, unsigned rank, uint64_t held)
{
	struct srv *s = a->s;
	char body[2048], val[320], eval[256], v64[448], e64[352], held_cmp[512];
	int rc;

	if (!held)
		snprintf(held_cmp, sizeof(held_cmp),
			 "{\"target\":\"CREATE\",\"key\":\"%s\",\"create_revision\":\"0\"}",
			 primary_key);
	else
		snprintf(held_cmp, sizeof(held_cmp),
			 "{\"target\":\"MOD\",\"key\":\"%s\",\"mod_revision\":\"%" PRIu64 "\"}",
			 primary_key, held);

	/* beat=: how soon a backup may replace us once our beats stop (the
	 * period our other keys name, if we hold any) */
	uint64_t period = a->holding && a->beat_named ? a->beat_named : srv_beat_ns(a);
	srv_claim_format(val, sizeof(val), a, epoch + 1, rank, period);
	epoch_value(a, eval, sizeof(eval), epoch + 1, 0, rank);
	srv_b64_encode(val, strlen(val), v64, sizeof(v64));
	srv_b64_encode(eval, strlen(eval), e64, sizeof(e64));
	snprintf(body, sizeof(body),
		 "{\"compare\":[%s,"
		 "{\"target\":\"MOD\",\"key\":\"%s\",\"mod_revision\":\"%" PRIu64 "\"}],"
		 "\"success\":[{\"request_put\":{\"key\":\"%s\",\"value\":\"%s\"}},"
		 "{\"request_put\":{\"key\":\"%s\",\"value\":\"%s\",\"lease\":\"%" PRIu64 "\"}}],"
		 "\"failure\":[{\"request_range\":{\"key\":\"%s\"}}]}",
		 held_cmp, epoch_key, mod, epoch_key, e64, primary_key, v64, a->lease_id,
		 primary_key);
	uint64_t sent = rdmaps__now_ns();
	if ((rc = srv_auth_call(a, "/v3/kv/txn", body)))
		return rc;
	if (srv_json_true(a->buf, "succeeded")) {
		/* the claim counts as a beat: backups time ours from it */
		if (!a->holding || a->beat_until > sent + SRV_FENCE_BEATS * period)
			a->beat_until = sent + SRV_FENCE_BEATS * period;
		if (!a->holding)
			a->beat_named = period;
		uint64_t rev = 0;
		srv_json_u64(a->buf, "revision", &rev); /* the header's: our writes' */
		a->epoch_mod[rank] = rev;
		a->claim_rev[rank] = rev;
		snprintf(a->claim_val[rank], sizeof(a->claim_val[rank]), "%s", v64);
		snprintf(a->claim_plain[rank], sizeof(a->claim_plain[rank]), "%s", val);
		a->part_epoch[rank] = epoch + 1;
		a->isr_recorded[rank] = 0;
		atomic_store(&s->isr_etcd[rank], 0);
		if (rank == s->cfg.server_id)
			atomic_store(&s->epoch, epoch + 1);
		return 0;
	}
	if (srv_json_b64(a->buf, "value", a->why, sizeof(a->why)))
		return RDMAPS_EBUSY; /* why: the holder's value */
	return RDMAPS_EAGAIN;
}

/*
 * Claim our own rank for the epoch after the one etcd has. *back: the
 * epoch names this server in sync and it holds a replica of its own part:
 * while the rank was held elsewhere, this server was caught up as its
 * backup (srv_repl_serve_part there); that copy, not the store it began
 * with, is the part now (the listener's take-over).
 */
static int claim(struct srv_auth *a, bool *back)
{
	struct srv *s = a->s;
	const unsigned me = s->cfg.server_id;
	uint64_t epoch, isr, mod;
	char by[200];
	int rc = read_epoch(a, a->epoch_key, &epoch, &isr, &mod, by, sizeof(by));

	*back = false;
	a->older_copy = false;
	if (rc)
		return rc;
	/* another server took the rank over last, and we were not its backup
	 * in sync: what we have of it is older than that server's; it serves
	 * the rank from its copy (watch_ranks there) and we catch up as its
	 * backup, as after a take-over. (Another server of this rank that
	 * held it, given back, is not that: the part came with it.) */
	if (strstr(by, " took-over") && !by_us(a, by) &&
	    !((isr >> me & 1u) && __atomic_load_n(&s->replica[me], __ATOMIC_ACQUIRE))) {
		snprintf(a->why, sizeof(a->why), "epoch=%" PRIu64 " server=%s, its last primary", epoch,
			 by);
		a->older_copy = true;
		return RDMAPS_EBUSY;
	}
	/* held by a server that stopped beating (our own previous run, or
	 * the server that took the rank over): replaced */
	uint64_t held;
	bool stale = srv_stale_holder(a, me, a->primary_key, &held);
	if ((rc = claim_rank(a, a->primary_key, a->epoch_key, epoch, mod, me, stale ? held : 0)))
		return rc;
	if (stale)
		log_warn("authority: rank %u's holder stopped beating %.2f s ago: replaced",
			 me, (rdmaps__now_ns() - a->seen_at[me]) / 1e9);
	if (isr >> me & 1u) {
		if (__atomic_load_n(&s->replica[me], __ATOMIC_ACQUIRE) && !srv_serves(s, me))
			*back = true;
		else if (!srv_serves(s, me))
			log_warn("authority: epoch %" PRIu64 " of rank %u counted this server in "
				 "sync, but it holds no such copy (restarted since): serving what "
				 "it has", epoch, me);
	}
	return 0;
}

/*
 * Write the in-sync set the fold thread published for rank r's part into
 * r's epoch key, if the key is still as we left it: if not, someone else's
 * claim moved the epoch and the rank is no longer ours (RDMAPS_EBUSY).
 */
static int record_isr(struct srv_auth *a, unsigned r, uint64_t isr)
{
	struct srv *s = a->s;
	char body[1536], eval[256], e64[352];
	const char *key = r == s->cfg.server_id ? a->epoch_key : a->watch_epoch[r];
	uint64_t rev = 0;
	int rc;

	epoch_value(a, eval, sizeof(eval), a->part_epoch[r], isr, r);
	srv_b64_encode(eval, strlen(eval), e64, sizeof(e64));
	snprintf(body, sizeof(body),
		 "{\"compare\":[{\"target\":\"MOD\",\"key\":\"%s\",\"mod_revision\":\"%" PRIu64
		 "\"}],\"success\":[{\"request_put\":{\"key\":\"%s\",\"value\":\"%s\"}}]}",
		 key, a->epoch_mod[r], key, e64);
	if ((rc = srv_auth_call(a, "/v3/kv/txn", body)))
		return rc;
	if (!srv_json_true(a->buf, "succeeded"))
		return RDMAPS_EBUSY;
	srv_json_u64(a->buf, "revision", &rev);
	a->epoch_mod[r] = rev;
	a->isr_recorded[r] = isr;
	/* credits count on exactly these backups from here */
	atomic_store(&s->isr_etcd[r], isr);
	log_info("authority: rank %u in sync: %s", r, eval);
	return 0;
}

static void lease_revoke(struct srv_auth *a)
{
	char body[64];

	snprintf(body, sizeof(body), "{\"ID\":\"%" PRIu64 "\"}", a->lease_id);
	/* (already ended at etcd: nothing to give back) */
	if (srv_auth_call(a, "/v3/lease/revoke", body) && !strstr(a->why, "lease not found"))
		log_warn("authority: cannot give rank %u back (%s); it is free once the lease "
			 "ends, in %" PRIu64 " s at most",
			 a->s->cfg.server_id, a->why, (uint64_t)(a->ttl_ns / 1000000000u));
	a->lease_id = 0;
}

/* Sleep until ns from now, or until told to stop; false then. */
static bool nap(struct srv_auth *a, uint64_t ns)
{
	struct timespec ts;
	bool go;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	ns += (uint64_t)ts.tv_nsec;
	ts.tv_sec += (time_t)(ns / 1000000000ull);
	ts.tv_nsec = (long)(ns % 1000000000ull);
	pthread_mutex_lock(&a->lock);
	while (!a->stop && !a->poked && pthread_cond_timedwait(&a->cond, &a->lock, &ts) == 0)
		;
	a->poked = false;
	go = !a->stop;
	pthread_mutex_unlock(&a->lock);
	return go;
}

/* Wake the thread from its nap, with *flag set (poked, or stop). */
static void wake(struct srv_auth *a, bool *flag)
{
	pthread_mutex_lock(&a->lock);
	*flag = true;
	pthread_cond_signal(&a->cond);
	pthread_mutex_unlock(&a->lock);
}

void srv_auth_poke(struct srv *s)
{
	if (s->auth)
		wake(s->auth, &s->auth->poked);
}

/*
 * Between the other etcd calls of a round, what keeps our claims: a beat
 * once a period has passed (srv_beat_on_time), and the lease's keep-alive
 * once a third of it has (a round of a dozen calls on a loaded etcd may
 * take longer than a lease of 1 s). False once either found our claims
 * gone (beat_lost, ka_lost): the round ends there.
 */
static bool on_time(struct srv_auth *a)
{
	if (!srv_beat_on_time(a) || a->ka_lost)
		return false;
	uint64_t now = rdmaps__now_ns();
	if (a->holding && a->lease_id && now - a->last_ka >= a->ttl_ns / 3) {
		a->last_ka = now;
		a->ka_lost = keepalive(a) == RDMAPS_ENOENT;
	}
	return !a->ka_lost;
}

/*
 * The ranks this server backs up (it holds their replicas): one whose
 * primary key is gone (its lease ended: dead, or cut off and fenced) and
 * whose epoch key names us in sync is claimed for the next epoch, with
 * our lease, and the listener is asked to serve it (srv_take_over). Only
 * while our own claim stands: our lease is what fences those folds too.
 */
static void watch_ranks(struct srv_auth *a)
{
	struct srv *s = a->s;

	for (unsigned p = 0; p < s->cfg.nservers && p < RDMAPS_MAX_SERVERS && on_time(a); p++) {
		uint64_t epoch, isr, mod;
		char by[200];
		if (p == s->cfg.server_id || srv_serves(s, p)) {
			a->absent_since[p] = 0; /* (handed back: its own server first) */
			continue;
		}
		/* no copy of p here: unless we held p last, and a checkpoint of
		 * it is here (a whole cluster restarted). Looked for once: its
		 * directory is only made while a copy is here */
		if (!__atomic_load_n(&s->replica[p], __ATOMIC_ACQUIRE)) {
			if (!a->ckpt_looked[p] && !srv_checkpoint_has_part(s, p))
				a->ckpt_looked[p] = true;
			if (a->ckpt_looked[p])
				continue;
		}
		if (!a->watch_key[p][0]) {
			key64(a->watch_key[p], sizeof(a->watch_key[p]), a->prefix, "primary", p);
			key64(a->watch_epoch[p], sizeof(a->watch_epoch[p]), a->prefix, "epoch", p);
		}
		/* its primary key held (a revision): its primary is there,
		 * unless it stopped beating */
		uint64_t held;
		bool stale = srv_stale_holder(a, p, a->watch_key[p], &held);
		if (held && !stale) {
			a->absent_since[p] = 0;
			continue;
		}
		uint64_t now = rdmaps__now_ns();
		if (!a->absent_since[p])
			a->absent_since[p] = now;
		if (read_epoch(a, a->watch_epoch[p], &epoch, &isr, &mod, by, sizeof(by)) || !epoch)
			continue;
		if ((isr >> p & 1u) && now - a->absent_since[p] < OWN_FIRST_NS)
			continue; /* its own server first */
		bool last = by_us(a, by) && strstr(by, " took-over");
		if (!__atomic_load_n(&s->replica[p], __ATOMIC_ACQUIRE)) {
			a->ckpt_looked[p] = true;
			if (!last || srv_checkpoint_restore_part(s, p))
				continue;
		}
		if (!(isr >> s->cfg.server_id & 1u) && !last) {
			log_info("authority: rank %u has no primary, and its epoch %" PRIu64
				 " does not count this server in sync", p, epoch);
			continue;
		}
		int rc = claim_rank(a, a->watch_key[p], a->watch_epoch[p], epoch, mod, p, held);
		if (rc) {
			log_info("authority: rank %u not claimed (%s): %s", p, rdmaps_strerror(rc), a->why);
			continue;
		}
		log_warn("authority: rank %u's primary is gone (%s): taking its part over from "
			 "the replica here, epoch %" PRIu64, p,
			 held ? "it stopped beating" : "its lease ended", epoch + 1);
		atomic_store(&s->takeover_req[p], true);
		srv_listener_wake(s);
	}
}

/* The in-sync backups of the parts taken over here (their old primaries,
 * caught up: srv_repl_serve_part), into their epoch keys: only a server
 * named there may take such a part back. */
static void record_taken_over(struct srv_auth *a)
{
	struct srv *s = a->s;

	for (unsigned p = 0; p < s->cfg.nservers && p < RDMAPS_MAX_SERVERS && on_time(a); p++) {
		uint64_t live = atomic_load(&s->isr_live[p]);
		if (p == s->cfg.server_id || !srv_serves(s, p) || live == a->isr_recorded[p])
			continue;
		if (record_isr(a, p, live) == RDMAPS_EBUSY) {
			/* someone else's claim moved its epoch: only past our
			 * lease, which fences these folds too */
			log_warn("authority: rank %u's epoch moved past %" PRIu64 " elsewhere", p,
				 a->part_epoch[p]);
			a->isr_recorded[p] = live;
		}
	}
}

/* Let go of rank p's primary key, if it is still the one our claim made
 * (its revision: a backup that replaced us overwrote it, keeping its
 * creation). */
static int release_rank(struct srv_auth *a, unsigned p)
{
	char body[1024];
	int rc;

	snprintf(body, sizeof(body),
		 "{\"compare\":[{\"target\":\"MOD\",\"key\":\"%s\",\"mod_revision\":\"%" PRIu64
		 "\"}],\"success\":[{\"request_delete_range\":{\"key\":\"%s\"}}]}",
		 a->watch_key[p], a->claim_rev[p], a->watch_key[p]);
	if ((rc = srv_auth_call(a, "/v3/kv/txn", body)))
		return rc;
	return srv_json_true(a->buf, "succeeded") ? 0 : RDMAPS_EBUSY;
}

/*
 * A rank taken over here goes back to its own server once that one is its
 * backup, recorded in sync in etcd (re-replication): its workers are sent
 * away and refused, the fold threads settle what they folded of it onto
 * that backup, then the primary key is deleted and the rank's own server
 * claims it from the copy it kept (claim, back). Given up after
 * HANDBACK_NS unsettled (its server lagging or gone), and tried again
 * HANDBACK_RETRY_NS later; workers are welcome again meanwhile.
 */
#define HANDBACK_NS 10000000000ull
#define HANDBACK_RETRY_NS 30000000000ull
static void hand_back(struct srv_auth *a)
{
	struct srv *s = a->s;
	uint64_t now = rdmaps__now_ns();

	for (unsigned p = 0; p < s->cfg.nservers && p < RDMAPS_MAX_SERVERS && on_time(a); p++) {
		if (p == s->cfg.server_id || !srv_serves(s, p))
			continue;
		if (!atomic_load(&s->handing_back[p])) {
			if (!(a->isr_recorded[p] >> p & 1u) || now < a->handback_next[p])
				continue;
			log_warn("authority: rank %u's server is its backup, in sync: handing the rank "
				 "back to it", p);
			atomic_store(&s->part_settled[p], false);
			atomic_store(&s->handing_back[p], true);
			a->handback_since[p] = now;
			for (unsigned f = 0; f < s->cfg.fold_threads; f++)
				srv_fold_wake(&s->ft[f]); /* to settle it now */
			continue;
		}
		if (!atomic_load(&s->part_settled[p])) {
			if (now - a->handback_since[p] < HANDBACK_NS)
				continue;
			log_warn("authority: rank %u not settled on its server in %.0f s: keeping it "
				 "here, handing it back again later", p, HANDBACK_NS / 1e9);
			a->handback_next[p] = now + HANDBACK_RETRY_NS;
			atomic_store(&s->handing_back[p], false);
			continue;
		}
		/* nothing of it folds here any more: the key goes, and with it
		 * the rank (its own server claims it within RETRY_NS) */
		atomic_store(&s->took_over[p], false);
		int rc = release_rank(a, p);
		if (rc == RDMAPS_EBUSY)
			log_warn("authority: rank %u's key is no longer our claim", p);
		else if (rc) {
			atomic_store(&s->took_over[p], true); /* etcd away: again next time */
			continue;
		}
		atomic_store(&s->handing_back[p], false);
		atomic_fetch_add(&s->handbacks, 1);
		a->isr_recorded[p] = 0;
		log_warn("authority: rank %u handed back to its server", p);
	}
}

/* Our claims ended: the ranks taken over here end with them (another
 * backup may claim them now); the listener sends their workers away. */
static void drop_taken_over(struct srv_auth *a)
{
	struct srv *s = a->s;

	for (unsigned p = 0; p < s->cfg.nservers && p < RDMAPS_MAX_SERVERS; p++) {
		if (p == s->cfg.server_id || !srv_serves(s, p))
			continue;
		atomic_store(&s->took_over[p], false);
		atomic_store(&s->handing_back[p], false);
		a->isr_recorded[p] = 0;
		a->dropped_at = rdmaps__now_ns();
		log_warn("authority: rank %u, taken over here, is no longer ours", p);
	}
}

/*
 * Our claims are over (why): folds stop at once, the ranks taken over
 * here are dropped (the listener sends their workers away), and our own
 * rank is claimed again, in a new epoch.
 */
static void lose_claims(struct srv_auth *a, const char *why)
{
	struct srv *s = a->s;

	atomic_store(&s->lease_until, 0);
	a->holding = false;
	drop_taken_over(a);
	log_warn("authority: rank %u, epoch %" PRIu64 ": %s; folds stopped, claiming it again",
		 s->cfg.server_id, atomic_load(&s->epoch), why);
	atomic_store(&s->epoch, 0);
}

/* Our lease expired at etcd: not ours any more; claim again (a new epoch). */
static void lease_expired(struct srv_auth *a)
{
	a->lease_id = 0;
	if (!a->fence_noted)
		atomic_fetch_add(&a->s->lease_losses, 1);
	lose_claims(a, "its lease expired");
}

/* Not holding: a lease, then the rank. How long to wait before the next step. */
static uint64_t step_claim(struct srv_auth *a)
{
	struct srv *s = a->s;
	int rc;

	bool back = false;
	uint64_t since = rdmaps__now_ns() - a->dropped_at;

	if (a->dropped_at && since < DROP_SETTLE_NS)
		return DROP_SETTLE_NS - since; /* their workers are not gone yet */
	if (!a->lease_id && (rc = grant(a)))
		goto unreachable;
	rc = claim(a, &back);
	if (rc == RDMAPS_EBUSY && keepalive(a) == RDMAPS_ENOENT)
		a->lease_id = 0; /* ours ran out while we waited: a new one next time */
	if (rc == RDMAPS_EBUSY) {
		/* a backup took the rank over (not our own earlier run, or
		 * another server started for it): our workers go there */
		if ((strstr(a->why, " took-over") || a->older_copy) &&
		    !atomic_exchange(&s->deposed, true))
			log_warn("authority: rank %u was taken over [%s]: sending its workers there",
				 s->cfg.server_id, a->why);
		if (strcmp(a->held_by, a->why)) {
			snprintf(a->held_by, sizeof(a->held_by), "%s", a->why);
			log_warn("authority: rank %u is held by [%s]: this server folds nothing "
				 "until that lease ends or is given back",
				 s->cfg.server_id, a->held_by);
		}
		return RETRY_NS;
	}
	if (rc == RDMAPS_EAGAIN)
		return 0;
	if (rc == RDMAPS_EREMOTE && strstr(a->why, "lease not found")) {
		a->lease_id = 0; /* it expired before the claim: a new one */
		return 0;
	}
	if (rc)
		goto unreachable;
	a->holding = true;
	if (back) {
		/* workers stay away (deposed) until the listener serves the
		 * copy: none may reach the store this server began with */
		log_warn("authority: rank %u comes back here, from the copy kept here while "
			 "it was held elsewhere", s->cfg.server_id);
		atomic_store(&s->takeover_req[s->cfg.server_id], true);
		srv_listener_wake(s);
	} else {
		atomic_store(&s->deposed, false);
	}
	a->held_by[0] = '\0';
	a->unreachable_noted = false;
	if ((rc = keepalive(a))) /* the first lease_until, from a fresh send time */
		goto unreachable;
	log_warn("authority: rank %u is ours in epoch %" PRIu64 " (%s, lease %" PRIu64 " s)",
		 s->cfg.server_id, atomic_load(&s->epoch), a->primary_name,
		 (uint64_t)(a->ttl_ns / 1000000000u));
	return a->ttl_ns / 3;
unreachable:
	if (rc == RDMAPS_ENOENT) { /* the fresh lease expired before its keep-alive */
		a->lease_id = 0;
		a->holding = false;
		return 0;
	}
	if (!a->unreachable_noted)
		log_warn("authority: etcd: %s; folds wait for a claim of rank %u", a->why,
			 s->cfg.server_id);
	a->unreachable_noted = true;
	return RETRY_NS;
}

static void *auth_main(void *arg)
{
	struct srv_auth *a = arg;
	struct srv *s = a->s;
	uint64_t wait = 0;

	while (nap(a, wait)) {
		if (!a->holding) {
			wait = step_claim(a);
			continue;
		}
		uint64_t now = rdmaps__now_ns(), live = atomic_load(&s->isr_live[s->cfg.server_id]);
		int rc = 0;
		/* first what lets folds go on: the beat, then the lease */
		a->beat_lost = a->ka_lost = false;
		if (srv_beat_ns(a))
			rc = srv_beat(a);
		if (!a->beat_lost)
			record_taken_over(a);
		if (a->beat_lost) {
			lose_claims(a, "a backup replaced this server: its beats were late");
			lease_revoke(a); /* our other keys go with it: claimed anew */
			wait = 0;
			continue;
		}
		if (live != a->isr_recorded[s->cfg.server_id] &&
		    record_isr(a, s->cfg.server_id, live) == RDMAPS_EBUSY) {
			lose_claims(a, "its epoch moved on elsewhere"); /* another's claim */
			wait = 0;
			continue;
		}
		now = rdmaps__now_ns(); /* (a keep-alive may have gone out since) */
		if (now - a->last_ka >= a->ttl_ns / 3 || a->unreachable_noted) {
			a->last_ka = now;
			int krc = keepalive(a);
			rc = rc ? rc : krc;
			if (krc == RDMAPS_ENOENT) {
				lease_expired(a);
				wait = 0;
				continue;
			}
		}
		if (rc && !a->unreachable_noted) {
			log_warn("authority: etcd: %s; folds stop when the lease of rank %u ends%s",
				 a->why, s->cfg.server_id,
				 srv_beat_ns(a) ? " (and pause 3 beats after the last one answered)" : "");
			a->unreachable_noted = true;
		} else if (!rc && a->unreachable_noted) {
			log_warn("authority: etcd answers again");
			a->unreachable_noted = false;
			a->beat_paused = false;
		}
		now = rdmaps__now_ns();
		if (rc && !a->fence_noted && now >= a->ka_until) {
			a->fence_noted = true;
			atomic_fetch_add(&s->lease_losses, 1);
			log_warn("authority: the lease on rank %u ended unrenewed: folds stopped",
				 s->cfg.server_id);
		} else if (rc && !a->fence_noted && !a->beat_paused &&
			   now >= atomic_load(&s->lease_until)) {
			/* the beats' fence, not the lease: no lease lost (yet) */
			a->beat_paused = true;
			log_warn("authority: no beat of rank %u answered in 3 beats: folds paused "
				 "until one is (the lease holds %.1f s more)", s->cfg.server_id,
				 (double)(a->ka_until - now) / 1e9);
		}
		if (!rc && s->cfg.replicas > 1) {
			watch_ranks(a);
			hand_back(a);
		}
		if (a->beat_lost) { /* (a beat between their calls) */
			lose_claims(a, "a backup replaced this server: its beats were late");
			lease_revoke(a);
			wait = 0;
			continue;
		}
		if (a->ka_lost) { /* (a keep-alive between their calls) */
			lease_expired(a);
			wait = 0;
			continue;
		}
		/* unanswered: try again soon, the lease may still be saved; a
		 * backup looks at the ranks it backs up every WATCH_NS, or
		 * every beat. A beat after the round, not after the last beat:
		 * a loaded etcd slows the rounds, and so its load. A beat
		 * unanswered is tried again a configured beat later: our keys
		 * may still name that period */
		wait = srv_beat_ns(a) ? (rc ? (uint64_t)s->cfg.beat_ms * 1000000ull : srv_beat_ns(a))
		       : s->cfg.replicas > 1 ? WATCH_NS : rc ? RETRY_NS : a->ttl_ns / 3;
		/* and the next keep-alive on time, whatever the beat's period */
		now = rdmaps__now_ns();
		uint64_t ka_due = a->last_ka + a->ttl_ns / 3, ka_in = ka_due > now ? ka_due - now : 0;
		if (wait > ka_in)
			wait = ka_in;
	}
	if (a->holding || a->lease_id) {
		/* folds are over (the caller joined the fold threads): the rank
		 * is free for a successor at once, not after the lease */
		atomic_store(&s->lease_until, 0);
		lease_revoke(a);
	}
	return NULL;
}

int srv_auth_start(struct srv *s)
{
	struct srv_auth *a = calloc(1, sizeof(*a));
	char err[256];
	int rc;

	if (!a)
		return RDMAPS_ENOMEM;
	if ((rc = srv_etcd_parse(&a->etcd, s->cfg.etcd, err, sizeof(err)))) {
		log_error("%s", err);
		free(a);
		return rc;
	}
	a->s = s;
	a->prefix = s->cfg.etcd_prefix ? s->cfg.etcd_prefix : "/rdmaps";
	key64(a->primary_key, sizeof(a->primary_key), a->prefix, "primary", s->cfg.server_id);
	key64(a->epoch_key, sizeof(a->epoch_key), a->prefix, "epoch", s->cfg.server_id);
	snprintf(a->primary_name, sizeof(a->primary_name), "%s:%s",
		 s->cfg.listen_addr ? s->cfg.listen_addr : "0.0.0.0", s->cfg.port);
	pthread_mutex_init(&a->lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&a->cond, &ca);
	pthread_condattr_destroy(&ca);
	if (pthread_create(&a->thread, NULL, auth_main, a)) {
		free(a);
		return RDMAPS_ESYS;
	}
	s->auth = a;
	log_info("authority: claiming rank %u under %s at %s", s->cfg.server_id, a->prefix,
		 s->cfg.etcd);
	return 0;
}

void srv_auth_stop(struct srv *s)
{
	struct srv_auth *a = s->auth;

	if (!a)
		return;
	wake(a, &a->stop);
	pthread_join(a->thread, NULL);
	pthread_mutex_destroy(&a->lock);
	pthread_cond_destroy(&a->cond);
	free(a);
	s->auth = NULL;
}
