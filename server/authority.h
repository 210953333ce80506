/*
 * authority.h -- the authority's state (one per server, owned by its
 * thread), shared by authority.c (leases, claims, take-overs) and beat.c
 * (beats, and looking for a holder that stopped). Private to those two:
 * every function here is called from the authority's thread only.
 */
#ifndef RDMAPS_SERVER_AUTHORITY_H
#define RDMAPS_SERVER_AUTHORITY_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "etcd.h"
#include "server.h"

struct srv_auth {
	struct srv *s;
	struct srv_etcd etcd;
	char primary_key[256], epoch_key[256]; /* base64, as the JSON wants them */
	char primary_name[200];
	const char *prefix;   /* the cluster's keys */
	uint64_t lease_id;    /* 0: none granted */
	uint64_t ttl_ns;      /* as granted */
	bool holding;         /* our claim stands (until the lease is found gone) */
	bool fence_noted;     /* the lease passed: logged and counted once */
	bool beat_paused;     /* the beats' fence passed, not the lease: logged once */
	bool older_copy;      /* the rank's last primary was another server (claim) */
	/* a rank's part with no copy here: restored from our checkpoints,
	 * tried, or none there (watch_ranks) */
	bool ckpt_looked[RDMAPS_MAX_SERVERS];
	bool unreachable_noted;
	char held_by[256];    /* the last holder logged, so a wait logs once */
	/* per rank we hold (ours, and those taken over): its epoch, its
	 * epoch key's revision as we last wrote it, and the in-sync backups
	 * that key names */
	uint64_t part_epoch[RDMAPS_MAX_SERVERS], epoch_mod[RDMAPS_MAX_SERVERS];
	uint64_t isr_recorded[RDMAPS_MAX_SERVERS];
	/* per rank we hold: its primary key's revision as we last wrote it
	 * (claim or beat), and its value, base64 */
	uint64_t claim_rev[RDMAPS_MAX_SERVERS];
	char claim_val[RDMAPS_MAX_SERVERS][448], claim_plain[RDMAPS_MAX_SERVERS][320];
	uint64_t handback_since[RDMAPS_MAX_SERVERS], handback_next[RDMAPS_MAX_SERVERS];
	uint64_t absent_since[RDMAPS_MAX_SERVERS]; /* a watched rank's primary key seen gone */
	uint64_t last_ka;     /* when the last keep-alive went out */
	/* folds may go on until the earlier of the two (lease_until) */
	uint64_t ka_until, beat_until;
	uint64_t beat_named;  /* the period our keys name (beat=) */
	uint64_t beat_sent;   /* when the last beat went out */
	bool beat_lost;       /* a beat found a claim of ours replaced */
	bool ka_lost;         /* a keep-alive mid-round found our lease expired */
	/* how etcd answers us: the slowest recent call (halved every
	 * SRV_SLOW_HALF_NS since slow_at), and the typical one (an average
	 * over about 8 calls) */
	uint64_t slow_ns, slow_at, lat_ns;
	uint64_t dropped_at;  /* ranks taken over were dropped (DROP_SETTLE_NS) */
	/* per rank held elsewhere: its primary key's revision as last seen,
	 * and since when (stale_holder) */
	uint64_t held_seen[RDMAPS_MAX_SERVERS], seen_at[RDMAPS_MAX_SERVERS];
	bool poked;           /* the fold thread's in-sync set changed */
	char watch_key[RDMAPS_MAX_SERVERS][256]; /* base64 keys of ranks we back up */
	char watch_epoch[RDMAPS_MAX_SERVERS][256];
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool stop;
	char buf[16384];      /* answers */
	char body[24576];     /* a beat: a compare and a put per rank held */
	char why[256];
};

/* authority.c: one etcd call (its answer in a->buf, an error's text in
 * a->why), timed into a->slow_ns and a->lat_ns; one key read, *mod its
 * revision (0: absent). */
int srv_auth_call(struct srv_auth *a, const char *path, const char *body);
int srv_auth_range(struct srv_auth *a, const char *key64, uint64_t *mod);

/* beat.c */
uint64_t srv_beat_ns(const struct srv_auth *a);
void srv_claim_format(char *out, size_t outlen, const struct srv_auth *a, uint64_t epoch,
		      unsigned rank, uint64_t beat);
void srv_fence_publish(struct srv_auth *a);
/* Beat every rank held here, once more if an earlier beat had gone
 * through unanswered (beat_refused); sets beat_lost when a backup
 * replaced us (RDMAPS_EBUSY). 0 or an rdmaps_err. */
int srv_beat(struct srv_auth *a);
bool srv_beat_on_time(struct srv_auth *a);
bool srv_stale_holder(struct srv_auth *a, unsigned p, const char *key64p, uint64_t *held);

#endif
