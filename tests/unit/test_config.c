/*
 * The cluster description: INI file, RDMAPS_* variables and launcher
 * variables, with their precedence. Criterion runs each test in its own
 * process, so setenv() here does not leak between tests.
 */
#include <criterion/criterion.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "placement.h"

static struct rdmaps__config cfg;
static char err[256];

static const char *write_ini(const char *text)
{
	static char path[64];
	snprintf(path, sizeof(path), "/tmp/rdmaps-cfg-XXXXXX");
	int fd = mkstemp(path);
	cr_assert_geq(fd, 0);
	cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	close(fd);
	return path;
}

Test(config, ini_file)
{
	const char *p = write_ini("[cluster]\nservers = 10.0.0.1:7000, 10.0.0.2 10.0.0.3:7002\n"
				  "port = 7471\ntoken = s3cret\ntimeout_ms = 1234\n[worker]\n"
				  "device = mlx5_0:1\ngid_index = 3\n");
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
	unlink(p);
	cr_assert_eq(cfg.nservers, 3);
	cr_assert_str_eq(cfg.servers[0].host, "10.0.0.1");
	cr_assert_str_eq(cfg.servers[0].port, "7000");
	cr_assert_str_eq(cfg.servers[1].port, "", "no port: the cluster default");
	cr_assert_str_eq(cfg.port, "7471");
	cr_assert_str_eq(cfg.token, "s3cret");
	cr_assert_eq(cfg.timeout_ms, 1234);
	cr_assert_str_eq(cfg.device, "mlx5_0:1");
	cr_assert_eq(cfg.gid_index, 3);
}

Test(config, env_overrides_file_and_errors_are_clear)
{
	const char *p = write_ini("servers = a, b\ntoken = fromfile\n");
	setenv("RDMAPS_TOKEN", "fromenv", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
	cr_assert_str_eq(cfg.token, "fromenv");
	cr_assert_eq(cfg.nservers, 2);
	setenv("RDMAPS_GID_INDEX", "x", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), RDMAPS_EINVAL);
	cr_assert_not_null(strstr(err, "RDMAPS_GID_INDEX"), "%s", err);
	unsetenv("RDMAPS_GID_INDEX");
	unlink(p);
	p = write_ini("[cluster]\nbogus = 1\n");
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), RDMAPS_EINVAL);
	cr_assert_not_null(strstr(err, "unknown key 'bogus'"), "%s", err);
	unlink(p);
	cr_assert_eq(rdmaps__config_load(&cfg, "/nonexistent.ini", err, sizeof(err)), RDMAPS_EINVAL);
	cr_assert_not_null(strstr(err, "cannot open"), "%s", err);
}

/* The tuning keys of a worker: default, from the file, the variable over
 * the file, and a value out of range refused naming the variable. */
Test(config, tuning_keys_defaults_and_bounds)
{
	static const struct {
		const char *key, *var, *file_val, *env_val, *bad;
		int def, file_want, env_want;
		size_t off;
	} k[] = {
		/* waiters sleep after 50 us unless told; -1 never sleeps */
		{ "spin_us", "RDMAPS_SPIN_US", "200", "-1", "-2", 50, 200, -1,
		  offsetof(struct rdmaps__config, spin_us) },
		/* a snapshot after two torn READs; 0 would never READ the model */
		{ "snapshot_after", "RDMAPS_SNAPSHOT_AFTER", "5", "1", "0", 2, 5, 1,
		  offsetof(struct rdmaps__config, snapshot_after) },
		/* one copy of each part unless told; at most a primary and three backups */
		{ "replicas", "RDMAPS_REPLICAS", "2", "3", "5", 1, 2, 3,
		  offsetof(struct rdmaps__config, replicas) },
	};

	for (size_t i = 0; i < sizeof(k) / sizeof(k[0]); i++) {
		char ini[96];
		const char *p;
		int got;
		snprintf(ini, sizeof(ini), "servers = a\n%s = %s\n", k[i].key, k[i].file_val);
		p = write_ini(ini);
		cr_assert_eq(rdmaps__config_load(&cfg, NULL, err, sizeof(err)), 0, "%s", err);
		memcpy(&got, (const char *)&cfg + k[i].off, sizeof(got));
		cr_assert_eq(got, k[i].def, "%s default", k[i].key);
		cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
		memcpy(&got, (const char *)&cfg + k[i].off, sizeof(got));
		cr_assert_eq(got, k[i].file_want, "%s from the file", k[i].key);
		setenv(k[i].var, k[i].env_val, 1);
		cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
		memcpy(&got, (const char *)&cfg + k[i].off, sizeof(got));
		cr_assert_eq(got, k[i].env_want, "%s: the variable over the file", k[i].var);
		setenv(k[i].var, k[i].bad, 1);
		cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), RDMAPS_EINVAL, "%s=%s",
			     k[i].var, k[i].bad);
		cr_assert_not_null(strstr(err, k[i].var), "%s", err);
		unsetenv(k[i].var);
		unlink(p);
	}
}

/* The servers' own token, apart from the workers': from the file, a file
 * it names, or the variable; too long refused. */
Test(config, peer_token_is_its_own)
{
	char ini[160];
	const char *tf = write_ini("from-a-file\n"), *p;

	snprintf(ini, sizeof(ini), "servers = a\ntoken = workers\npeer_token_file = %s\n", tf);
	p = write_ini(ini);
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
	cr_assert_str_eq(cfg.token, "workers");
	cr_assert_str_eq(cfg.peer_token, "from-a-file");
	setenv("RDMAPS_PEER_TOKEN", "from-env", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
	cr_assert_str_eq(cfg.peer_token, "from-env");
	cr_assert_str_eq(cfg.token, "workers", "one does not set the other");
	setenv("RDMAPS_PEER_TOKEN", "0123456789abcdef0123456789abcdefX", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), RDMAPS_EINVAL);
	cr_assert_not_null(strstr(err, "RDMAPS_PEER_TOKEN"), "%s", err);
	unsetenv("RDMAPS_PEER_TOKEN");
	unlink(p);
	unlink(tf);
}

Test(config, authority_keys)
{
	const char *p = write_ini("servers = a\netcd = http://10.0.0.1:2379,http://10.0.0.2:2379\n"
				  "etcd_prefix = /jobs/7\nlease_seconds = 3\n");

	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
	cr_assert_str_eq(cfg.etcd, "http://10.0.0.1:2379,http://10.0.0.2:2379");
	cr_assert_str_eq(cfg.etcd_prefix, "/jobs/7");
	cr_assert_eq(cfg.lease_s, 3);
	unlink(p);
	p = write_ini("servers = a\n");
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
	cr_assert_str_eq(cfg.etcd, "", "no authority unless asked");
	cr_assert_eq(cfg.lease_s, 2);
	setenv("RDMAPS_LEASE_SECONDS", "0", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), RDMAPS_EINVAL);
	unsetenv("RDMAPS_LEASE_SECONDS");
	setenv("RDMAPS_ETCD_PREFIX", "jobs", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), RDMAPS_EINVAL);
	cr_assert_not_null(strstr(err, "etcd_prefix"), "%s", err);
	unsetenv("RDMAPS_ETCD_PREFIX");
	unlink(p);
}

Test(config, ack_timeout)
{
	const char *p = write_ini("servers = a\nack_timeout_ms = 250\n");

	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(cfg.ack_timeout_ms, 250);
	setenv("RDMAPS_ACK_TIMEOUT_MS", "1000", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(cfg.ack_timeout_ms, 1000, "the environment over the file");
	setenv("RDMAPS_ACK_TIMEOUT_MS", "-1", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), RDMAPS_EINVAL);
	unsetenv("RDMAPS_ACK_TIMEOUT_MS");
	unlink(p);
	p = write_ini("servers = a\n");
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(cfg.ack_timeout_ms, 0, "rdma_cm's unless asked");
	unlink(p);
}

Test(config, beat_ms)
{
	const char *p = write_ini("servers = a\nbeat_ms = 200\n");

	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(cfg.beat_ms, 200);
	setenv("RDMAPS_BEAT_MS", "0", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(cfg.beat_ms, 0, "the environment over the file; 0: no beats");
	setenv("RDMAPS_BEAT_MS", "10", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), RDMAPS_EINVAL,
		     "under 20 ms writes etcd more often than a failover needs");
	setenv("RDMAPS_BEAT_MS", "1001", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), RDMAPS_EINVAL);
	unsetenv("RDMAPS_BEAT_MS");
	unlink(p);
	p = write_ini("servers = a\n");
	cr_assert_eq(rdmaps__config_load(&cfg, p, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(cfg.beat_ms, 100, "beats every 100 ms unless told otherwise");
	unlink(p);
}

Test(config, launchers)
{
	setenv("SLURM_PROCID", "3", 1);
	setenv("SLURM_NTASKS", "8", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, "", err, sizeof(err)), 0);
	cr_assert_eq(cfg.rank, 3);
	cr_assert_eq(cfg.size, 8);
	cr_assert_str_eq(cfg.launcher, "slurm");
	unsetenv("SLURM_PROCID");
	setenv("RANK", "1", 1);
	setenv("WORLD_SIZE", "4", 1);
	setenv("MASTER_ADDR", "10.1.1.1", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, "", err, sizeof(err)), 0);
	cr_assert_eq(cfg.rank, 1);
	cr_assert_str_eq(cfg.launcher, "torchrun");
	cr_assert_eq(cfg.nservers, 1, "MASTER_ADDR stands in for a missing server list");
	cr_assert_str_eq(cfg.servers[0].host, "10.1.1.1");
	setenv("DMLC_ROLE", "server", 1);
	setenv("DMLC_SERVER_ID", "2", 1);
	setenv("DMLC_NUM_SERVER", "3", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, "", err, sizeof(err)), 0);
	cr_assert_str_eq(cfg.role, "server");
	cr_assert_eq(cfg.rank, 2);
	cr_assert_eq(cfg.size, 3);
	setenv("RDMAPS_RANK", "0", 1);
	cr_assert_eq(rdmaps__config_load(&cfg, "", err, sizeof(err)), 0);
	cr_assert_eq(cfg.rank, 0, "RDMAPS_RANK wins over launchers");
}

Test(config, explicit_src_wins)
{
	memset(&cfg, 0, sizeof(cfg));
	cfg.gid_index = -1;
	strcpy(cfg.src, "198.18.1.4");
	strcpy(cfg.device, "nonexistent0");
	char out[64];
	cr_assert_eq(rdmaps__config_local_addr(&cfg, out, sizeof(out), err, sizeof(err)), 0);
	cr_assert_str_eq(out, "198.18.1.4");
	cfg.src[0] = '\0';
	cr_assert_eq(rdmaps__config_local_addr(&cfg, out, sizeof(out), err, sizeof(err)), RDMAPS_ENODEV);
	cr_assert_not_null(strstr(err, "nonexistent0"), "%s", err);
}

Test(placement, deterministic_ranges_balanced_to_one_chunk)
{
	struct rdmaps__range r[7];
	for (uint32_t s = 1; s <= 7; s++)
		for (uint32_t n = 1; n < 100; n++) {
			uint32_t first = 0, lo = UINT32_MAX, hi = 0;
			rdmaps__place("w", n, s, r);
			for (uint32_t k = 0; k < s; k++) {
				cr_assert_eq(r[k].first, first, "parts are consecutive runs");
				first += r[k].count;
				lo = r[k].count < lo ? r[k].count : lo;
				hi = r[k].count > hi ? r[k].count : hi;
				cr_assert_eq(r[k].server, (r[0].server + k) % s);
			}
			cr_assert_eq(first, n);
			cr_assert_leq(hi - lo, 1);
			if (n % s)
				cr_assert_eq(r[s - 1].count, hi, "the part with the short chunk is long");
		}
	/* small tensors land on different servers by name */
	unsigned used[4] = { 0 };
	char name[8];
	for (int i = 0; i < 40; i++) {
		snprintf(name, sizeof(name), "t%d", i);
		rdmaps__place(name, 1, 4, r);
		used[r[0].server]++;
	}
	for (int s = 0; s < 4; s++)
		cr_assert_gt(used[s], 3, "server %d got %u of 40 one-chunk tensors", s, used[s]);
}
