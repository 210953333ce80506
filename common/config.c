/*
 * config.c -- cluster description from launcher variables, an INI file
 * (parsed by Debian's libinih) and RDMAPS_* variables.
 */
#include "config.h"

#include <errno.h>
#include <ifaddrs.h>
#include <ini.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bounded copy that always terminates (over-long values are cut). */
static void copy(char *dst, size_t len, const char *src)
{
	size_t n = src ? strnlen(src, len - 1) : 0;

	memcpy(dst, src ? src : "", n);
	dst[n] = '\0';
}

static int parse_int(const char *s, int lo, int hi, int *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		return -1;
	*out = (int)v;
	return 0;
}

int rdmaps__config_set_servers(struct rdmaps__config *cfg, const char *list, char *err,
			       size_t errlen)
{
	char buf[4096], *save = NULL, *tok;

	copy(buf, sizeof(buf), list);
	cfg->nservers = 0;
	for (tok = strtok_r(buf, ", \t\n", &save); tok; tok = strtok_r(NULL, ", \t\n", &save)) {
		struct rdmaps__server_addr *s;
		char *colon = strrchr(tok, ':');

		if (cfg->nservers == RDMAPS_MAX_SERVERS) {
			snprintf(err, errlen, "more than %d servers", RDMAPS_MAX_SERVERS);
			return RDMAPS_EINVAL;
		}
		s = &cfg->servers[cfg->nservers++];
		if (colon) {
			*colon = '\0';
			copy(s->port, sizeof(s->port), colon + 1);
		} else {
			s->port[0] = '\0'; /* the cluster's default port */
		}
		if (!*tok || strlen(tok) >= sizeof(s->host)) {
			snprintf(err, errlen, "bad server address '%s'", tok);
			return RDMAPS_EINVAL;
		}
		copy(s->host, sizeof(s->host), tok);
	}
	return 0;
}

/* A token from a file (one line; its newline dropped) into dst. */
static int read_token_file(char *dst, const char *path, char *err, size_t errlen)
{
	char buf[RDMAPS_TOKEN_MAX + 2];
	FILE *f = fopen(path, "r");
	size_t n;

	if (!f) {
		snprintf(err, errlen, "cannot read token file %s: %s", path, strerror(errno));
		return RDMAPS_EINVAL;
	}
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
		n--;
	if (n > RDMAPS_TOKEN_MAX) {
		snprintf(err, errlen, "token in %s is longer than %u bytes", path, RDMAPS_TOKEN_MAX);
		return RDMAPS_EINVAL;
	}
	buf[n] = '\0';
	copy(dst, RDMAPS_TOKEN_MAX + 1, buf);
	return 0;
}

struct ini_ctx {
	struct rdmaps__config *cfg;
	char *err;
	size_t errlen;
	int rc;
};

/* One key of the INI file; see docs/cluster.md. */
int rdmaps__config_set(struct rdmaps__config *cfg, const char *key, const char *val, char *err,
		       size_t errlen)
{
	if (!strcmp(key, "servers"))
		return rdmaps__config_set_servers(cfg, val, err, errlen);
	if (!strcmp(key, "port")) {
		copy(cfg->port, sizeof(cfg->port), val);
		return 0;
	}
	if (!strcmp(key, "token") || !strcmp(key, "peer_token")) {
		if (strlen(val) > RDMAPS_TOKEN_MAX) {
			snprintf(err, errlen, "token longer than %u bytes", RDMAPS_TOKEN_MAX);
			return RDMAPS_EINVAL;
		}
		copy(key[0] == 'p' ? cfg->peer_token : cfg->token, RDMAPS_TOKEN_MAX + 1, val);
		return 0;
	}
	if (!strcmp(key, "token_file"))
		return read_token_file(cfg->token, val, err, errlen);
	if (!strcmp(key, "peer_token_file"))
		return read_token_file(cfg->peer_token, val, err, errlen);
	if (!strcmp(key, "replicas"))
		return parse_int(val, 1, RDMAPS_MAX_REPLICAS, &cfg->replicas) ? RDMAPS_EINVAL : 0;
	if (!strcmp(key, "etcd") || !strcmp(key, "etcd_prefix")) {
		char *dst = key[4] ? cfg->etcd_prefix : cfg->etcd;
		size_t cap = key[4] ? sizeof(cfg->etcd_prefix) : sizeof(cfg->etcd);
		if (strlen(val) >= cap) {
			snprintf(err, errlen, "%s longer than %zu bytes", key, cap - 1);
			return RDMAPS_EINVAL;
		}
		if (key[4] && val[0] != '/') {
			snprintf(err, errlen, "etcd_prefix must start with '/'");
			return RDMAPS_EINVAL;
		}
		copy(dst, cap, val);
		return 0;
	}
	if (!strcmp(key, "lease_seconds"))
		return parse_int(val, 1, 60, &cfg->lease_s) ? RDMAPS_EINVAL : 0;
	if (!strcmp(key, "src")) {
		copy(cfg->src, sizeof(cfg->src), val);
		return 0;
	}
	if (!strcmp(key, "device")) {
		copy(cfg->device, sizeof(cfg->device), val);
		return 0;
	}
	if (!strcmp(key, "gid_index"))
		return parse_int(val, -1, 255, &cfg->gid_index) ? RDMAPS_EINVAL : 0;
	if (!strcmp(key, "timeout_ms"))
		return parse_int(val, 1, 3600000, &cfg->timeout_ms) ? RDMAPS_EINVAL : 0;
	if (!strcmp(key, "beat_ms")) {
		/* 0: no beats; below 20 ms etcd would be written more often
		 * than a failover needs; above a second, the lease is sooner */
		if (parse_int(val, 0, 1000, &cfg->beat_ms) || (cfg->beat_ms && cfg->beat_ms < 20))
			return RDMAPS_EINVAL;
		return 0;
	}
	if (!strcmp(key, "ack_timeout_ms"))
		return parse_int(val, 0, 60000, &cfg->ack_timeout_ms) ? RDMAPS_EINVAL : 0;
	if (!strcmp(key, "spin_us"))
		return parse_int(val, -1, 1000000, &cfg->spin_us) ? RDMAPS_EINVAL : 0;
	if (!strcmp(key, "snapshot_after"))
		return parse_int(val, 1, 1000, &cfg->snapshot_after) ? RDMAPS_EINVAL : 0;
	if (!strcmp(key, "role")) {
		copy(cfg->role, sizeof(cfg->role), val);
		return 0;
	}
	if (!strcmp(key, "rank"))
		return parse_int(val, 0, 1 << 24, &cfg->rank) ? RDMAPS_EINVAL : 0;
	if (!strcmp(key, "size"))
		return parse_int(val, 1, 1 << 24, &cfg->size) ? RDMAPS_EINVAL : 0;
	snprintf(err, errlen, "unknown key '%s'", key);
	return RDMAPS_EINVAL;
}

static int ini_cb(void *user, const char *section, const char *name, const char *value)
{
	struct ini_ctx *x = user;
	char sub[256];

	(void)section; /* [cluster], [server] and [worker] all share one key space */
	if (x->rc)
		return 0;
	if ((x->rc = rdmaps__config_set(x->cfg, name, value, sub, sizeof(sub))))
		snprintf(x->err, x->errlen, "[%s] %s = %s: %s", section, name, value,
			 *sub ? sub : "bad value");
	return x->rc == 0;
}

/* Rank and size from whichever launcher started us. */
static void from_launcher(struct rdmaps__config *cfg)
{
	static const struct {
		const char *name, *rank, *size;
	} l[] = {
		{ "slurm", "SLURM_PROCID", "SLURM_NTASKS" },
		{ "openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE" },
		{ "pmi", "PMI_RANK", "PMI_SIZE" },
		{ "torchrun", "RANK", "WORLD_SIZE" },
	};
	const char *dmlc = getenv("DMLC_ROLE");

	for (unsigned i = 0; i < sizeof(l) / sizeof(l[0]); i++) {
		const char *r = getenv(l[i].rank), *s = getenv(l[i].size);
		int rank, size;
		if (r && s && !parse_int(r, 0, 1 << 24, &rank) && !parse_int(s, 1, 1 << 24, &size)) {
			cfg->rank = rank;
			cfg->size = size;
			copy(cfg->launcher, sizeof(cfg->launcher), l[i].name);
			break;
		}
	}
	/* torchrun: with no server list, MASTER_ADDR is where the server runs */
	if (getenv("MASTER_ADDR") && !cfg->nservers)
		rdmaps__config_set_servers(cfg, getenv("MASTER_ADDR"), (char[8]){ 0 }, 8);
	/* ps-lite / BytePS: role, and the per-role id and count */
	if (dmlc) {
		const char *id = getenv(!strcmp(dmlc, "server") ? "DMLC_SERVER_ID" : "DMLC_WORKER_ID");
		const char *n = getenv(!strcmp(dmlc, "server") ? "DMLC_NUM_SERVER" : "DMLC_NUM_WORKER");
		int v;
		copy(cfg->role, sizeof(cfg->role), dmlc);
		if (id && !parse_int(id, 0, 1 << 24, &v))
			cfg->rank = v;
		if (n && !parse_int(n, 1, 1 << 24, &v))
			cfg->size = v;
		copy(cfg->launcher, sizeof(cfg->launcher), "dmlc");
	}
}

int rdmaps__config_load(struct rdmaps__config *cfg, const char *path, char *err, size_t errlen)
{
	static const char *const env_keys[][2] = {
		{ "RDMAPS_SERVERS", "servers" }, { "RDMAPS_PORT", "port" },
		{ "RDMAPS_TOKEN", "token" },     { "RDMAPS_TOKEN_FILE", "token_file" },
		{ "RDMAPS_SRC", "src" },         { "RDMAPS_DEVICE", "device" },
		{ "RDMAPS_GID_INDEX", "gid_index" }, { "RDMAPS_TIMEOUT_MS", "timeout_ms" },
		{ "RDMAPS_ACK_TIMEOUT_MS", "ack_timeout_ms" },
		{ "RDMAPS_ROLE", "role" },       { "RDMAPS_RANK", "rank" },
		{ "RDMAPS_SIZE", "size" },       { "RDMAPS_SPIN_US", "spin_us" },
		{ "RDMAPS_SNAPSHOT_AFTER", "snapshot_after" },
		{ "RDMAPS_REPLICAS", "replicas" }, { "RDMAPS_PEER_TOKEN", "peer_token" },
		{ "RDMAPS_PEER_TOKEN_FILE", "peer_token_file" },
		{ "RDMAPS_ETCD", "etcd" }, { "RDMAPS_ETCD_PREFIX", "etcd_prefix" },
		{ "RDMAPS_LEASE_SECONDS", "lease_seconds" }, { "RDMAPS_BEAT_MS", "beat_ms" },
	};
	int rc;

	memset(cfg, 0, sizeof(*cfg));
	copy(cfg->port, sizeof(cfg->port), RDMAPS_DEFAULT_PORT);
	cfg->gid_index = -1;
	cfg->timeout_ms = 10000;
	cfg->spin_us = RDMAPS__SPIN_US;
	cfg->snapshot_after = RDMAPS__SNAPSHOT_AFTER;
	cfg->replicas = 1;
	cfg->lease_s = 2;
	cfg->beat_ms = RDMAPS__BEAT_MS;
	cfg->rank = cfg->size = -1;
	err[0] = '\0';
	from_launcher(cfg);

	if (!path)
		path = getenv("RDMAPS_CONFIG");
	if (path && *path) {
		struct ini_ctx x = { cfg, err, errlen, 0 };
		int line = ini_parse(path, ini_cb, &x);
		if (line == -1) {
			snprintf(err, errlen, "cannot open config file %s", path);
			return RDMAPS_EINVAL;
		}
		if (x.rc)
			return x.rc;
		if (line) {
			snprintf(err, errlen, "%s:%d: syntax error", path, line);
			return RDMAPS_EINVAL;
		}
	}
	for (unsigned i = 0; i < sizeof(env_keys) / sizeof(env_keys[0]); i++) {
		const char *v = getenv(env_keys[i][0]);
		char sub[200] = "";
		if (!v)
			continue;
		if ((rc = rdmaps__config_set(cfg, env_keys[i][1], v, sub, sizeof(sub)))) {
			snprintf(err, errlen, "%s=%s: %s", env_keys[i][0], v, *sub ? sub : "bad value");
			return rc;
		}
	}
	return 0;
}

static int read_line(const char *path, char *out, size_t len)
{
	FILE *f = fopen(path, "r");
	int ok = f && fgets(out, (int)len, f);

	if (f)
		fclose(f);
	if (!ok)
		return -1;
	out[strcspn(out, "\n")] = '\0';
	return 0;
}

static int netdev_ipv4(const char *netdev, char *out, size_t len)
{
	struct ifaddrs *ifa, *i;
	int rc = -1;

	if (getifaddrs(&ifa))
		return -1;
	for (i = ifa; i; i = i->ifa_next)
		if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET && !strcmp(i->ifa_name, netdev)) {
			inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, out,
				  (socklen_t)len);
			rc = 0;
			break;
		}
	freeifaddrs(ifa);
	return rc;
}

/* The IPv4 address behind GID idx of dev:port, or -1. */
static int gid_ipv4(const char *dev, int port, int idx, char *out, size_t len)
{
	char path[256], gid[64], nd[64];
	unsigned a, b, c2, d;

	snprintf(path, sizeof(path), "/sys/class/infiniband/%s/ports/%d/gids/%d", dev, port, idx);
	if (read_line(path, gid, sizeof(gid)))
		return -1;
	/* a RoCE GID of an IPv4 address is ::ffff:a.b.c.d */
	if (!strncmp(gid, "0000:0000:0000:0000:0000:ffff:", 30) &&
	    sscanf(gid + 30, "%2x%2x:%2x%2x", &a, &b, &c2, &d) == 4) {
		snprintf(out, len, "%u.%u.%u.%u", a, b, c2, d);
		return 0;
	}
	/* InfiniBand: the address is IPoIB's, on the GID's netdev */
	snprintf(path, sizeof(path), "/sys/class/infiniband/%s/ports/%d/gid_attrs/ndevs/%d", dev, port,
		 idx);
	if (!read_line(path, nd, sizeof(nd)) && !netdev_ipv4(nd, out, len))
		return 0;
	return -1;
}

int rdmaps__config_local_addr(const struct rdmaps__config *cfg, char *out, size_t outlen,
			      char *err, size_t errlen)
{
	char dev[64], *colon;
	int port = 1;

	out[0] = '\0';
	if (cfg->src[0]) {
		copy(out, outlen, cfg->src);
		return 0;
	}
	if (!cfg->device[0])
		return 0;
	/* "mlx5_0" or "mlx5_0:1", as NCCL_IB_HCA and perftest's -d/-i name them */
	copy(dev, sizeof(dev), cfg->device);
	if ((colon = strchr(dev, ':'))) {
		*colon = '\0';
		if (parse_int(colon + 1, 1, 255, &port)) {
			snprintf(err, errlen, "bad port in device '%s'", cfg->device);
			return RDMAPS_EINVAL;
		}
	}
	if (cfg->gid_index >= 0) {
		if (!gid_ipv4(dev, port, cfg->gid_index, out, outlen))
			return 0;
		snprintf(err, errlen, "device %s port %d GID index %d has no IPv4 address", dev, port,
			 cfg->gid_index);
		return RDMAPS_ENODEV;
	}
	for (int i = 0; i < 256; i++)
		if (!gid_ipv4(dev, port, i, out, outlen))
			return 0;
	snprintf(err, errlen, "device %s port %d: no GID with an IPv4 address (see `ibv_devinfo -v`)",
		 dev, port);
	return RDMAPS_ENODEV;
}
