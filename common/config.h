/*
 * config.h -- one cluster description for every role (servers, workers,
 * tools), from an INI file and the environment, with rank and size taken
 * from the launcher that started the process. Precedence: explicit values
 * (command line, API options) > RDMAPS_* environment > INI file > launcher
 * variables > defaults. docs/cluster.md documents every key.
 */
#ifndef RDMAPS_COMMON_CONFIG_H
#define RDMAPS_COMMON_CONFIG_H

#include <stdint.h>

#include "protocol.h"

#define RDMAPS_MAX_SERVERS 64
#define RDMAPS_ADDR_MAX 64
#define RDMAPS_MAX_REPLICAS 4 /* copies of a part: its primary and up to three backups */
#define RDMAPS__SPIN_US 50 /* spin_us's default: a 64 B pull on real hardware never sleeps */
#define RDMAPS__SNAPSHOT_AFTER 2 /* snapshot_after's default: 3 READs of a chunk at most */
/* beat_ms's default: 100 ms replaces a dead primary in about half a
 * second; on a loaded etcd the period backs off (server/authority.c) */
#define RDMAPS__BEAT_MS 100

struct rdmaps__server_addr {
	char host[RDMAPS_ADDR_MAX];
	char port[16];
};

struct rdmaps__config {
	struct rdmaps__server_addr servers[RDMAPS_MAX_SERVERS];
	uint32_t nservers;
	char port[16];               /* default port */
	char token[RDMAPS_TOKEN_MAX + 1];
	char peer_token[RDMAPS_TOKEN_MAX + 1]; /* servers' own, for replica connections */
	int replicas;                /* copies of each part (1: no backups) */
	char etcd[256];              /* servers: who is primary, from these etcd endpoints */
	char etcd_prefix[128];       /* the cluster's keys in etcd ("": "/rdmaps") */
	int lease_s;                 /* a primary's lease in etcd, seconds */
	char src[RDMAPS_ADDR_MAX];   /* this process's local address, if chosen */
	char device[64];             /* or: device name (+ ":port") to take it from */
	int gid_index;               /* or: GID index on that device (-1: none) */
	int timeout_ms;              /* connect, with retries, per server */
	int ack_timeout_ms;          /* transport ACK timeout of a connection (0: rdma_cm's) */
	int beat_ms;                 /* replicas > 1: a holder's beat in etcd (0: none) */
	int spin_us;                 /* a waiter busy-polls this long, then sleeps; -1: never */
	int snapshot_after;          /* torn READs of a chunk in one pull before a snapshot */
	int rank, size;              /* from the launcher; -1 when unknown */
	char role[16];               /* "server", "worker" or "" */
	char launcher[16];           /* which variables gave rank/size */
};

/*
 * Load: defaults, then launcher variables, then the INI file at path (NULL:
 * $RDMAPS_CONFIG if set; a missing explicit file is an error), then RDMAPS_*
 * variables. On error *err_msg says what (static or in cfg-owned storage).
 */
int rdmaps__config_load(struct rdmaps__config *cfg, const char *path, char *err, size_t errlen);

/* Set one key as the INI file would (docs/cluster.md); 0 or RDMAPS_EINVAL
 * with err saying why. */
int rdmaps__config_set(struct rdmaps__config *cfg, const char *key, const char *val, char *err,
		       size_t errlen);

/* Parse "h1[:p1],h2[:p2] ..." (commas or spaces) into cfg->servers. */
int rdmaps__config_set_servers(struct rdmaps__config *cfg, const char *list, char *err,
			       size_t errlen);

/*
 * Pick the local address: cfg->src if set, else the IPv4 address of the
 * device's netdev (by GID index when given: a RoCE GID holds the address,
 * as perftest's -x selects it), else empty (the route decides). Reads sysfs.
 */
int rdmaps__config_local_addr(const struct rdmaps__config *cfg, char *out, size_t outlen,
			      char *err, size_t errlen);

#endif
