/*
 * Replicated shards (docs/durability.md): two servers with --replicas 2 on
 * hosts 1-2, each the other's backup, a worker on host 3, and a plain
 * server on host 4 folding the same pushes as a reference. A push
 * acknowledged folded is on the backup before the worker hears of it: kill
 * -9 the primary, checkpoint the backup's copy of its parts, start the
 * primary again from that copy, and the model is exactly what the
 * acknowledged pushes made it, optimizer state and step counts included
 * (the next push lands bit for bit where the reference's does).
 */
#include <criterion/criterion.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

#define PEER_TOKEN "servers-own-secret-42"
#define CE 1024
#define LEN (4 * CE + 100) /* five chunks: every server holds some */
#define PUSHES 6

static struct th_server srv[3], ref;
static const char *host[5]; /* servers on 1-3, the reference on 4, the worker on 5 */
static char servers[256], config[64], ckdir[3][128];
static int nsrv;

static void start_server(int i, const char *ckpt_dir)
{
	char rank[4];

	snprintf(rank, sizeof(rank), "%d", i);
	th_server_restart(&srv[i], "--chunk-elems", "1024", "--config", config, "--rank", rank,
			  "--checkpoint-dir", ckpt_dir, NULL);
}

/* n servers, each part on all of them (replicas n), and the reference */
static void start_cluster(int n)
{
	size_t len = 0;
	FILE *f;
	int fd;

	th_hosts(host, 5);
	nsrv = n;
	for (int i = 0; i < n; i++) {
		srv[i].addr = host[i];
		snprintf(srv[i].port, sizeof(srv[i].port), "%u",
			 21000u + ((unsigned)getpid() * 11u + (unsigned)i) % 20000u);
		th_mkdtemp(ckdir[i], sizeof(ckdir[i]), "replica-ckpt");
		len += (size_t)snprintf(servers + len, sizeof(servers) - len, "%s%s:%s", i ? "," : "",
					host[i], srv[i].port);
	}
	snprintf(config, sizeof(config), "/tmp/rdmaps-replicas-XXXXXX");
	fd = mkstemp(config);
	cr_assert_geq(fd, 0);
	f = fdopen(fd, "w");
	fprintf(f, "[cluster]\nservers = %s\ntoken = %s\npeer_token = %s\nreplicas = %d\n", servers,
		TH_TOKEN, PEER_TOKEN, n);
	fclose(f);
	for (int i = 0; i < n; i++)
		start_server(i, ckdir[i]);
	th_server_start_at(&ref, host[3], "--chunk-elems", "1024", NULL);
}

static void start_pair(void)
{
	start_cluster(2);
}

static void start_three(void)
{
	start_cluster(3);
}

/* tc on host 2's switch port (tools/rxe-vm): what reaches the backup */
static void backup_delay(const char *how)
{
	char cmd[160];

	snprintf(cmd, sizeof(cmd), "tc qdisc %s dev ps2-br root%s 2>/dev/null", how[0] ? "replace" : "del",
		 how);
	cr_assert(system(cmd) == 0 || !how[0], "%s (tools/rxe-vm --hosts 5, as root)", cmd);
}

static void stop_pair(void)
{
	backup_delay("");
	for (int i = 0; i < nsrv; i++)
		if (srv[i].pid)
			th_server_stop(&srv[i]);
	th_server_stop(&ref);
	unlink(config);
	for (int i = 0; i < nsrv; i++)
		th_rmdir(ckdir[i]);
}

/* Sum of a stat over the pair, through a client of the cluster. */
static uint64_t pair_stat(rdmaps_client *c, size_t off)
{
	struct rdmaps_server_stats st;

	cr_assert_eq(rdmaps_server_stats(c, &st), 0);
	return *(const uint64_t *)((const char *)&st + off);
}

/* Both servers have their backup connected (each counts its own). */
static void wait_backups(rdmaps_client *c, uint64_t want)
{
	for (int i = 0; i < 200; i++) {
		if (pair_stat(c, offsetof(struct rdmaps_server_stats, backups)) == want)
			return;
		usleep(100000);
	}
	cr_assert_fail("backups connected: %llu, want %llu after 20 s",
		       (unsigned long long)pair_stat(c, offsetof(struct rdmaps_server_stats, backups)),
		       (unsigned long long)want);
}

static float grad(int k, int i)
{
	return 0.125f * (float)((k + 1) * ((i % 7) - 3)) + 0.001f * (float)(i % 13);
}

static rdmaps_tensor *declare(rdmaps_client *c)
{
	struct rdmaps_tensor_desc d = { .name = "w", .length = LEN, .init_value = 0.5f,
					.optimizer = RDMAPS_OPT_ADAM, .lr = 0.01f };
	rdmaps_tensor *t;

	cr_assert_eq(rdmaps_declare(c, &d, &t), 0);
	return t;
}

/* One push of clock k into both, acknowledged once folded. */
static void push_both(rdmaps_client *c, rdmaps_tensor *t, rdmaps_client *rc, rdmaps_tensor *rt,
		      int k)
{
	static float g[LEN];

	for (int i = 0; i < LEN; i++)
		g[i] = grad(k, i);
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0, "push %d", k);
	cr_assert_eq(rdmaps_push(rc, rt, g, RDMAPS_PUSH_FOLDED), 0, "reference push %d", k);
}

static void assert_same(rdmaps_client *c, rdmaps_tensor *t, rdmaps_client *rc, rdmaps_tensor *rt,
			const char *when)
{
	th_assert_same(c, t, rc, rt, LEN, when);
}

/*
 * Rank 0 dies (kill -9); its backup, server 1, checkpoints the copy it
 * holds, and rank 0 starts again from that copy. Returns a new client
 * (c closed first), or c itself with keep (it reconnects by itself).
 */
static rdmaps_client *restore_rank0_from_backup(rdmaps_client *c, bool keep)
{
	char path[256];
	rdmaps_client *b;

	if (!keep)
		rdmaps_close(c);
	th_server_kill9(&srv[0]);
	b = th_connect(&srv[1]);
	cr_assert_eq(rdmaps_checkpoint(b, 10000), 0);
	rdmaps_close(b);
	snprintf(path, sizeof(path), "%s/replica-0", ckdir[1]);
	cr_assert_eq(access(path, R_OK), 0, "the backup wrote rank 0's parts to %s", path);
	start_server(0, path);
	if (!keep)
		cr_assert_eq(th_connect_cluster(servers, host[4], &c), 0);
	return c;
}

/* A folded push of clock k into both, and how long the cluster's took. */
static double timed_push(rdmaps_client *c, rdmaps_tensor *t, rdmaps_client *rc,
			 rdmaps_tensor *rt, int k)
{
	struct timespec a, b;

	clock_gettime(CLOCK_MONOTONIC, &a);
	push_both(c, t, rc, rt, k);
	clock_gettime(CLOCK_MONOTONIC, &b);
	return (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9;
}

Test(replicas, acknowledged_pushes_survive_a_killed_primary, .init = start_pair,
     .fini = stop_pair, .timeout = 240)
{
	rdmaps_client *c, *rc = th_connect(&ref);
	rdmaps_tensor *t, *rt;
	double s;

	cr_assert_eq(th_connect_cluster(servers, host[4], &c), 0);
	wait_backups(c, 2);
	t = declare(c);
	rt = declare(rc);
	cr_assert_gt(rdmaps_tensor_server_elems(t, 0), 0, "server 0 holds part of it");
	for (int k = 0; k < PUSHES; k++)
		push_both(c, t, rc, rt, k);
	assert_same(c, t, rc, rt, "before the kill");
	cr_assert_geq(pair_stat(c, offsetof(struct rdmaps_server_stats, replicated_chunks)),
		      (uint64_t)PUSHES * 5, "every folded chunk written to a backup");
	cr_assert_eq(pair_stat(c, offsetof(struct rdmaps_server_stats, unreplicated_acks)), 0);

	/* rank 0 again, from its backup's copy, and the worker still there:
	 * nothing acknowledged is lost, and the worker's account came along,
	 * so it settles its pushes with no error (without the account, its
	 * next flush would say that pushes may have been lost) */
	c = restore_rank0_from_backup(c, true);
	{
		static float v[LEN];
		struct rdmaps_client_stats cs;
		int prc = rdmaps_pull(c, t, v, 0);
		if (prc) /* the pull that finds the connection broken */
			prc = rdmaps_pull(c, t, v, 0);
		cr_assert_eq(prc, 0, "pull after the restore: %s", rdmaps_strerror(prc));
		cr_assert_eq(rdmaps_flush(c, 20000), 0, "the worker settled by its account");
		rdmaps_client_stats(c, &cs);
		cr_assert_eq(cs.server_restarts, 1);
		cr_assert_eq(cs.lost_pushes, 0);
	}
	assert_same(c, t, rc, rt, "restored from the backup");
	/* and its Adam moments and step counts came along: the next push
	 * lands exactly where the reference's does. Server 1 lost its own
	 * backup (rank 0) meanwhile: it acknowledges without waiting for the
	 * transport's retries to give up on it. */
	s = timed_push(c, t, rc, rt, PUSHES);
	printf("first folded push after the backup's death: %.3f s\n", s);
	cr_assert_lt(s, 5.0, "a dead backup held a folded push %.1f s", s);
	assert_same(c, t, rc, rt, "one push after the restore");
	rdmaps_close(c);
	rdmaps_close(rc);
}

/* A tensor of one chunk that lands on server 0 alone, and the same on the
 * reference: server 1 is only its backup. */
#define LEN1 1000
static rdmaps_tensor *declare_on_rank0(rdmaps_client *c, rdmaps_client *rc, rdmaps_tensor **rt,
				       char *name, int from)
{
	struct rdmaps_tensor_desc d = { .length = LEN1, .init_value = -0.25f,
					.optimizer = RDMAPS_OPT_MOMENTUM, .lr = 0.05f,
					.momentum = 0.9f };
	rdmaps_tensor *t;

	for (int i = from; i < from + 64; i++) {
		snprintf(name, 16, "x%d", i);
		d.name = name;
		cr_assert_eq(rdmaps_declare(c, &d, &t), 0);
		if (rdmaps_tensor_server_elems(t, 0) == LEN1) {
			cr_assert_eq(rdmaps_declare(rc, &d, rt), 0);
			return t;
		}
	}
	cr_assert_fail("no name of 64 placed on server 0");
	return NULL;
}

static void push1(rdmaps_client *c, rdmaps_tensor *t, rdmaps_client *rc, rdmaps_tensor *rt, int k)
{
	float g[LEN1];

	for (int i = 0; i < LEN1; i++)
		g[i] = grad(k, i);
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0, "push %d", k);
	cr_assert_eq(rdmaps_push(rc, rt, g, RDMAPS_PUSH_FOLDED), 0, "reference push %d", k);
}

static void assert_same1(rdmaps_client *c, const char *name, rdmaps_client *rc,
			 rdmaps_tensor *rt)
{
	rdmaps_tensor *t;

	cr_assert_eq(rdmaps_lookup(c, name, &t), 0);
	th_assert_same(c, t, rc, rt, LEN1, name);
}

/*
 * A backup killed: pushes go on with no error, acknowledged without it
 * (and counted so). Restarted with nothing of rank 0's, it is written
 * every part again (the catch-up): a tensor pushed only while it was
 * down (x) as well as one pushed after (y), so that it is again a copy
 * rank 0 can be restored from exactly.
 */
Test(replicas, a_restarted_backup_catches_up, .init = start_pair, .fini = stop_pair,
     .timeout = 240)
{
	rdmaps_client *c, *rc = th_connect(&ref);
	rdmaps_tensor *x, *y, *rx, *ry;
	char nx[16], ny[16];
	int k = 0;

	cr_assert_eq(th_connect_cluster(servers, host[4], &c), 0);
	wait_backups(c, 2);
	x = declare_on_rank0(c, rc, &rx, nx, 0);
	y = declare_on_rank0(c, rc, &ry, ny, 100);
	for (; k < 2; k++) {
		push1(c, x, rc, rx, k);
		push1(c, y, rc, ry, k);
	}
	th_server_kill9(&srv[1]);
	for (; k < 5; k++) { /* server 0 alone: no error */
		push1(c, x, rc, rx, k);
		push1(c, y, rc, ry, k);
	}
	rdmaps_close(c);
	start_server(1, ckdir[1]);
	cr_assert_eq(th_connect_cluster(servers, host[4], &c), 0);
	cr_assert_gt(pair_stat(c, offsetof(struct rdmaps_server_stats, unreplicated_acks)), 0,
		     "acknowledged without a backup, and counted");
	wait_backups(c, 2);
	cr_assert_eq(rdmaps_lookup(c, ny, &y), 0);
	for (; k < 7; k++)
		push1(c, y, rc, ry, k);

	c = restore_rank0_from_backup(c, false);
	assert_same1(c, nx, rc, rx);
	assert_same1(c, ny, rc, ry);
	rdmaps_close(c);
	rdmaps_close(rc);
}

/*
 * A slow backup: every packet to it 100 ms late (netem on its switch
 * port). A folded push into rank 0's part is acknowledged only once the
 * backup has it, so it takes the delay; and once acknowledged, it is in
 * the copy rank 0 is restored from, though rank 0 dies at once.
 */
Test(replicas, acknowledgement_waits_for_a_slow_backup, .init = start_pair, .fini = stop_pair,
     .timeout = 240)
{
	rdmaps_client *c, *rc = th_connect(&ref);
	rdmaps_tensor *x, *rx;
	char nx[16];
	float g[LEN1];
	struct timespec a, b;
	double s;

	cr_assert_eq(th_connect_cluster(servers, host[4], &c), 0);
	wait_backups(c, 2);
	x = declare_on_rank0(c, rc, &rx, nx, 200);
	push1(c, x, rc, rx, 0);
	backup_delay(" netem delay 100ms");
	for (int i = 0; i < LEN1; i++)
		g[i] = grad(1, i);
	cr_assert_eq(rdmaps_push(rc, rx, g, RDMAPS_PUSH_FOLDED), 0);
	clock_gettime(CLOCK_MONOTONIC, &a);
	cr_assert_eq(rdmaps_push(c, x, g, RDMAPS_PUSH_FOLDED), 0);
	clock_gettime(CLOCK_MONOTONIC, &b);
	s = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9;
	printf("folded push with a backup 100 ms away: %.3f s\n", s);
	cr_assert_geq(s, 0.1, "acknowledged in %.3f s: before the backup could have it", s);
	c = restore_rank0_from_backup(c, false); /* kills rank 0 first thing */
	backup_delay("");
	assert_same1(c, nx, rc, rx);
	rdmaps_close(c);
	rdmaps_close(rc);
}

/*
 * Three copies of every part: ranks 0 and 1 killed one after the other,
 * rank 2 holds both their parts (each primary waited for both its
 * backups), and both start again from it, exactly where the reference is.
 */
Test(replicas, three_copies_survive_two_dead_servers, .init = start_three, .fini = stop_pair,
     .timeout = 240)
{
	rdmaps_client *c, *rc = th_connect(&ref), *b;
	rdmaps_tensor *t, *rt;
	char path[2][256];

	cr_assert_eq(th_connect_cluster(servers, host[4], &c), 0);
	wait_backups(c, 6); /* two per server */
	t = declare(c);
	rt = declare(rc);
	for (uint32_t s = 0; s < 3; s++)
		cr_assert_gt(rdmaps_tensor_server_elems(t, s), 0, "server %u holds part of it", s);
	for (int k = 0; k < PUSHES; k++)
		push_both(c, t, rc, rt, k);
	rdmaps_close(c);
	th_server_kill9(&srv[0]);
	th_server_kill9(&srv[1]);
	b = th_connect(&srv[2]);
	cr_assert_eq(rdmaps_checkpoint(b, 10000), 0);
	rdmaps_close(b);
	for (int i = 0; i < 2; i++) {
		snprintf(path[i], sizeof(path[i]), "%s/replica-%d", ckdir[2], i);
		start_server(i, path[i]);
	}
	cr_assert_eq(th_connect_cluster(servers, host[4], &c), 0);
	cr_assert_eq(rdmaps_lookup(c, "w", &t), 0);
	assert_same(c, t, rc, rt, "ranks 0 and 1 restored from rank 2");
	push_both(c, t, rc, rt, PUSHES);
	assert_same(c, t, rc, rt, "one push after");
	rdmaps_close(c);
	rdmaps_close(rc);
}
