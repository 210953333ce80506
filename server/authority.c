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
 * One thread, asleep between keep-alives (a third of the TTL apart); it
 * never touches a chunk.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "etcd.h"
#include "server.h"

#define CALL_MS 1000u   /* one etcd call's deadline (at most a third of a lease of 3 s) */
#define RETRY_NS 250000000ull /* a claim of a held rank, or etcd down: try again */

struct srv_auth {
	struct srv *s;
	struct srv_etcd etcd;
	char primary_key[256], epoch_key[256]; /* base64, as the JSON wants them */
	char primary_name[200];
	uint64_t lease_id;    /* 0: none granted */
	uint64_t ttl_ns;      /* as granted */
	bool holding;         /* our claim stands (until the lease is found gone) */
	bool fence_noted;     /* lease_until passed: logged and counted once */
	bool unreachable_noted;
	char held_by[256];    /* the last holder logged, so a wait logs once */
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool stop;
	char buf[16384];      /* answers */
	char why[256];
};

static int call(struct srv_auth *a, const char *path, const char *body)
{
	return srv_etcd_post(&a->etcd, path, body, a->buf, sizeof(a->buf), CALL_MS, a->why,
			     sizeof(a->why));
}

/* etcd's answer without the lease (expired, revoked) names no TTL. */
static int grant(struct srv_auth *a)
{
	char body[64];
	uint64_t id = 0, ttl = 0;
	int rc;

	snprintf(body, sizeof(body), "{\"TTL\":%u}", a->s->cfg.lease_s);
	if ((rc = call(a, "/v3/lease/grant", body)))
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
	if ((rc = call(a, "/v3/lease/keepalive", body)))
		return rc;
	if (!srv_json_u64(a->buf, "TTL", &ttl) || !ttl)
		return RDMAPS_ENOENT;
	uint64_t ttl_ns = ttl * 1000000000ull;
	/* a tenth for rate drift and the fold round in progress, and 50 ms */
	uint64_t margin = ttl_ns / 10 + 50000000ull;
	if (a->holding)
		atomic_store(&a->s->lease_until, sent + ttl_ns - margin);
	a->fence_noted = false;
	return 0;
}

/* The current epoch key: its value and revision (0, 0 when absent). */
static int read_epoch(struct srv_auth *a, uint64_t *epoch, uint64_t *mod)
{
	char body[320], val[32] = "";
	int rc;

	snprintf(body, sizeof(body), "{\"key\":\"%s\"}", a->epoch_key);
	if ((rc = call(a, "/v3/kv/range", body)))
		return rc;
	*epoch = *mod = 0;
	if (!srv_json_u64(a->buf, "mod_revision", mod))
		return 0; /* no kvs: never claimed */
	if (!srv_json_b64(a->buf, "value", val, sizeof(val)) || sscanf(val, "%" SCNu64, epoch) != 1) {
		snprintf(a->why, sizeof(a->why), "epoch key holds '%s'", val);
		return RDMAPS_EPROTO;
	}
	return 0;
}

/*
 * Claim rank r for epoch + 1. 0: ours; RDMAPS_EBUSY: another holds it
 * (a->held_by says who); RDMAPS_EAGAIN: the epoch moved under us.
 */
static int claim(struct srv_auth *a)
{
	struct srv *s = a->s;
	char body[2048], val[256], eval[32], v64[352], e64[48];
	uint64_t epoch, mod;
	int rc;

	if ((rc = read_epoch(a, &epoch, &mod)))
		return rc;
	snprintf(val, sizeof(val), "epoch=%" PRIu64 " server=%s instance=%016" PRIx64, epoch + 1,
		 a->primary_name, s->instance);
	snprintf(eval, sizeof(eval), "%" PRIu64, epoch + 1);
	srv_b64_encode(val, strlen(val), v64, sizeof(v64));
	srv_b64_encode(eval, strlen(eval), e64, sizeof(e64));
	snprintf(body, sizeof(body),
		 "{\"compare\":[{\"target\":\"CREATE\",\"key\":\"%s\",\"create_revision\":\"0\"},"
		 "{\"target\":\"MOD\",\"key\":\"%s\",\"mod_revision\":\"%" PRIu64 "\"}],"
		 "\"success\":[{\"request_put\":{\"key\":\"%s\",\"value\":\"%s\"}},"
		 "{\"request_put\":{\"key\":\"%s\",\"value\":\"%s\",\"lease\":\"%" PRIu64 "\"}}],"
		 "\"failure\":[{\"request_range\":{\"key\":\"%s\"}}]}",
		 a->primary_key, a->epoch_key, mod, a->epoch_key, e64, a->primary_key, v64,
		 a->lease_id, a->primary_key);
	if ((rc = call(a, "/v3/kv/txn", body)))
		return rc;
	if (srv_json_true(a->buf, "succeeded")) {
		atomic_store(&s->epoch, epoch + 1);
		return 0;
	}
	if (srv_json_b64(a->buf, "value", a->why, sizeof(a->why)))
		return RDMAPS_EBUSY; /* why: the holder's value */
	return RDMAPS_EAGAIN;
}

static void lease_revoke(struct srv_auth *a)
{
	char body[64];

	snprintf(body, sizeof(body), "{\"ID\":\"%" PRIu64 "\"}", a->lease_id);
	if (call(a, "/v3/lease/revoke", body))
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
	while (!a->stop && pthread_cond_timedwait(&a->cond, &a->lock, &ts) == 0)
		;
	go = !a->stop;
	pthread_mutex_unlock(&a->lock);
	return go;
}

/* Not holding: a lease, then the rank. How long to wait before the next step. */
static uint64_t step_claim(struct srv_auth *a)
{
	struct srv *s = a->s;
	int rc;

	if (!a->lease_id && (rc = grant(a)))
		goto unreachable;
	rc = claim(a);
	if (rc == RDMAPS_EBUSY && keepalive(a) == RDMAPS_ENOENT)
		a->lease_id = 0; /* ours ran out while we waited: a new one next time */
	if (rc == RDMAPS_EBUSY) {
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
		int rc = keepalive(a);
		uint64_t now = rdmaps__now_ns();
		if (rc == RDMAPS_ENOENT) {
			/* expired at etcd: not ours any more; claim again (a new epoch) */
			atomic_store(&s->lease_until, 0);
			a->holding = false;
			a->lease_id = 0;
			if (!a->fence_noted)
				atomic_fetch_add(&s->lease_losses, 1);
			log_warn("authority: the lease on rank %u expired (epoch %" PRIu64 "): "
				 "folds stopped; claiming it again",
				 s->cfg.server_id, atomic_load(&s->epoch));
			atomic_store(&s->epoch, 0);
			wait = 0;
			continue;
		}
		if (rc && !a->unreachable_noted) {
			log_warn("authority: etcd: %s; folds stop when the lease of rank %u ends",
				 a->why, s->cfg.server_id);
			a->unreachable_noted = true;
		} else if (!rc && a->unreachable_noted) {
			log_warn("authority: etcd answers again");
			a->unreachable_noted = false;
		}
		if (rc && !a->fence_noted && now >= atomic_load(&s->lease_until)) {
			a->fence_noted = true;
			atomic_fetch_add(&s->lease_losses, 1);
			log_warn("authority: the lease on rank %u ended unrenewed: folds stopped",
				 s->cfg.server_id);
		}
		/* unanswered: try again soon, the lease may still be saved */
		wait = rc ? RETRY_NS : a->ttl_ns / 3;
	}
	if (a->holding || a->lease_id) {
		/* folds are over (the caller joined the fold threads): the rank
		 * is free for a successor at once, not after the lease */
		atomic_store(&s->lease_until, 0);
		lease_revoke(a);
	}
	return NULL;
}

/* "<prefix>/<what>/<rank>", base64 */
static void key64(char *out, size_t outlen, const char *prefix, const char *what, unsigned r)
{
	char key[192];

	snprintf(key, sizeof(key), "%s/%s/%u", prefix, what, r);
	srv_b64_encode(key, strlen(key), out, outlen);
}

int srv_auth_start(struct srv *s)
{
	struct srv_auth *a = calloc(1, sizeof(*a));
	char err[256];
	const char *prefix = s->cfg.etcd_prefix ? s->cfg.etcd_prefix : "/rdmaps";
	int rc;

	if (!a)
		return RDMAPS_ENOMEM;
	if ((rc = srv_etcd_parse(&a->etcd, s->cfg.etcd, err, sizeof(err)))) {
		log_error("%s", err);
		free(a);
		return rc;
	}
	a->s = s;
	key64(a->primary_key, sizeof(a->primary_key), prefix, "primary", s->cfg.server_id);
	key64(a->epoch_key, sizeof(a->epoch_key), prefix, "epoch", s->cfg.server_id);
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
	log_info("authority: claiming rank %u under %s at %s", s->cfg.server_id, prefix, s->cfg.etcd);
	return 0;
}

void srv_auth_stop(struct srv *s)
{
	struct srv_auth *a = s->auth;

	if (!a)
		return;
	pthread_mutex_lock(&a->lock);
	a->stop = true;
	pthread_cond_signal(&a->cond);
	pthread_mutex_unlock(&a->lock);
	pthread_join(a->thread, NULL);
	pthread_mutex_destroy(&a->lock);
	pthread_cond_destroy(&a->cond);
	free(a);
	s->auth = NULL;
}
