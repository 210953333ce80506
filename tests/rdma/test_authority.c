/*
 * The authority (docs/durability.md, "Who is primary"): a server started
 * with --etcd folds only while its claim on its rank stands in etcd, kept
 * by a lease. Cut off from etcd (here: etcd stopped with SIGSTOP, alive but
 * silent, as behind a partition), it stops folding once its lease ends by
 * its own clock, and goes on only after claiming the rank again, in a new
 * epoch. A second server for a rank that is held serves nothing until the
 * holder lets go. A plain server folding the same pushes is the reference.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

#define LEN (3 * 1024 + 10) /* three and a bit chunks */

static struct th_etcd etcd;
static struct th_server srv, second, ref;
static char prefix[64];

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void start_authority(struct th_server *s, const char *addr)
{
	th_server_start_at(s, addr, "--chunk-elems", "1024", "--etcd", etcd.url, "--etcd-prefix",
			   prefix, "--lease-seconds", "1", NULL);
}

static void setup(void)
{
	th_etcd_start(&etcd);
	snprintf(prefix, sizeof(prefix), "/rdmaps-test-%d", (int)getpid());
	start_authority(&srv, th_addr());
	th_server_start(&ref, "--chunk-elems", "1024", NULL);
}

static void teardown(void)
{
	kill(etcd.pid, SIGCONT);
	th_server_stop(&srv);
	th_server_stop(&second);
	th_server_stop(&ref);
	th_etcd_stop(&etcd);
}

static void grad(float *g, int k)
{
	for (int i = 0; i < LEN; i++)
		g[i] = 0.125f * (float)((k + 1) * ((i % 7) - 3)) + 0.001f * (float)(i % 11);
}

static struct rdmaps_server_stats stats(rdmaps_client *c)
{
	struct rdmaps_server_stats st;

	cr_assert_eq(rdmaps_server_stats(c, &st), 0);
	return st;
}

static void assert_same(rdmaps_client *c, rdmaps_tensor *t, rdmaps_client *rc, rdmaps_tensor *rt,
			const char *when)
{
	th_assert_same(c, t, rc, rt, LEN, when);
}

Test(authority, a_primary_cut_off_from_etcd_stops_folding_until_it_claims_again,
     .init = setup, .fini = teardown, .timeout = 180)
{
	static float g[LEN];
	rdmaps_client *c = th_connect(&srv), *rc = th_connect(&ref);
	rdmaps_tensor *t = th_declare(c, "w", LEN, 0.5f, 0.25f);
	rdmaps_tensor *rt = th_declare(rc, "w", LEN, 0.5f, 0.25f);
	rdmaps_op *op;

	/* the declaration was answered: the claim stands, in the first epoch */
	grad(g, 0);
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_push(rc, rt, g, RDMAPS_PUSH_FOLDED), 0);
	struct rdmaps_server_stats st = stats(c);
	cr_assert_eq(st.epoch, 1);
	cr_assert_eq(st.lease_losses, 0);

	/* etcd silent: within its 1 s lease, the server stops folding */
	cr_assert_eq(kill(etcd.pid, SIGSTOP), 0);
	usleep(1200000);
	grad(g, 1);
	cr_assert_eq(rdmaps_push_async(c, t, g, RDMAPS_PUSH_FOLDED, &op), 0);
	cr_assert_eq(rdmaps_wait(op, 2000), RDMAPS_ETIMEDOUT,
		     "a push folded by a server whose lease had ended");
	/* pulls are one-sided and go on: the model is still the first push's */
	assert_same(c, t, rc, rt, "with etcd stopped");

	/* etcd back: the lease it expired is gone, the rank is claimed again
	 * (epoch 2), and the staged push folds, once */
	double t0 = now_s();
	cr_assert_eq(kill(etcd.pid, SIGCONT), 0);
	cr_assert_eq(rdmaps_wait(op, 20000), 0);
	fprintf(stderr, "authority: folding again %.2f s after etcd came back\n", now_s() - t0);
	cr_assert_eq(rdmaps_push(rc, rt, g, RDMAPS_PUSH_FOLDED), 0);
	assert_same(c, t, rc, rt, "after the new claim");
	st = stats(c);
	cr_assert_eq(st.epoch, 2, "epoch %llu after the lease was lost", (unsigned long long)st.epoch);
	cr_assert_geq(st.lease_losses, 1);
	cr_assert_eq(st.folds, stats(rc).folds);
	rdmaps_close(c);
	rdmaps_close(rc);
}

Test(authority, a_second_server_for_a_held_rank_serves_nothing_until_it_is_given_back,
     .init = setup, .fini = teardown, .timeout = 180)
{
	static float g[LEN];
	const char *host[2];
	rdmaps_client *c = th_connect(&srv);
	rdmaps_tensor *t = th_declare(c, "w", LEN, 0.5f, 0.25f);
	int status;

	grad(g, 0);
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	rdmaps_close(c);

	/* the same rank again, elsewhere: it waits for the holder */
	th_hosts(host, 2);
	start_authority(&second, host[1]);
	rdmaps_client *c2 = th_connect(&second);
	pid_t killer = fork();
	cr_assert_geq(killer, 0);
	if (killer == 0) {
		usleep(2500000);
		kill(srv.pid, SIGTERM); /* a clean stop gives the lease back */
		_exit(0);
	}
	double t0 = now_s();
	rdmaps_tensor *t2 = th_declare(c2, "w", LEN, 0.5f, 0.25f);
	double waited = now_s() - t0;
	cr_assert_geq(waited, 2.4, "the second server answered after %.2f s, while the first "
		      "still held the rank", waited);
	cr_assert_lt(waited, 8.0, "the second server took %.2f s to claim a rank given back",
		     waited);
	waitpid(killer, NULL, 0);
	cr_assert_eq(waitpid(srv.pid, &status, 0), srv.pid);
	srv.pid = 0;
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "first server: status %d", status);

	cr_assert_eq(rdmaps_push(c2, t2, g, RDMAPS_PUSH_FOLDED), 0);
	struct rdmaps_server_stats st = stats(c2);
	cr_assert_eq(st.epoch, 2);
	cr_assert_eq(st.folds, 4 /* one push of four chunks */, "%llu folds", (unsigned long long)st.folds);
	fprintf(stderr, "authority: the second server took the rank %.2f s after asking\n", waited);
	rdmaps_close(c2);
}

/*
 * Failover: two servers, each the other's backup (replicas 2), under the
 * authority; two workers push, each push acknowledged only once folded
 * (RDMAPS_PUSH_FOLDED); rank 0 is killed -9 midway. Rank 1 takes rank 0's
 * part over from its replica once rank 0's lease has ended, the workers
 * find it there by themselves, and every push returns 0: none is lost or
 * folded twice, so the model is exactly the sum of all of them (gradients
 * and rate are multiples of powers of two: the order of folds cannot
 * change a bit), which a plain server folding the same pushes gives.
 */
#define FLEN (4 * 1024 + 100) /* five chunks: both servers hold some */
#define FPUSHES 24
#define PEER_TOKEN "servers-own-secret-42"

/* fo_n servers on hosts 1..fo_n with --replicas fo_r, the reference
 * server on the next host, the workers on the one after */
static struct th_server pair[3];
static int fo_n = 2, fo_r = 2, fo_lease = 1;
static char fo_servers[192], fo_config[64];
static const char *fo_host[5];
static struct th_proxy fo_proxy; /* rank 0's way to etcd, in the partition test */
static char fo_ckdir[3][128];     /* each server's checkpoints, when a test wants them */

/* Rank i's server (again); rank 0's through the relay when there is one. */
static void start_rank(int i)
{
	char rank[12];

	snprintf(rank, sizeof(rank), "%d", i);
	if (i == 0 && fo_proxy.pid > 0)
		th_server_restart(&pair[i], "--chunk-elems", "1024", "--config", fo_config, "--rank",
				  rank, "--etcd", fo_proxy.url, NULL);
	else if (fo_ckdir[i][0])
		th_server_restart(&pair[i], "--chunk-elems", "1024", "--config", fo_config, "--rank",
				  rank, "--checkpoint-dir", fo_ckdir[i], NULL);
	else
		th_server_restart(&pair[i], "--chunk-elems", "1024", "--config", fo_config, "--rank",
				  rank, NULL);
}

static void start_failover(void)
{
	FILE *f;
	int fd;
	size_t n = 0;

	if (etcd.pid <= 0)
		th_etcd_start(&etcd);
	snprintf(prefix, sizeof(prefix), "/rdmaps-failover-%d", (int)getpid());
	th_hosts(fo_host, (unsigned)fo_n + 2);
	for (int i = 0; i < fo_n; i++) {
		pair[i].addr = fo_host[i];
		snprintf(pair[i].port, sizeof(pair[i].port), "%u",
			 22000u + ((unsigned)getpid() * 13u + (unsigned)i) % 20000u);
		n += (size_t)snprintf(fo_servers + n, sizeof(fo_servers) - n, "%s%s:%s", i ? "," : "",
				      fo_host[i], pair[i].port);
	}
	snprintf(fo_config, sizeof(fo_config), "/tmp/rdmaps-failover-XXXXXX");
	fd = mkstemp(fo_config);
	cr_assert_geq(fd, 0);
	f = fdopen(fd, "w");
	fprintf(f,
		"[cluster]\nservers = %s\ntoken = %s\npeer_token = %s\nreplicas = %d\netcd = %s\n"
		"etcd_prefix = %s\nlease_seconds = %d\n",
		fo_servers, TH_TOKEN, PEER_TOKEN, fo_r, etcd.url, prefix, fo_lease);
	fclose(f);
	for (int i = 0; i < fo_n; i++)
		start_rank(i);
	th_server_start_at(&ref, fo_host[fo_n], "--chunk-elems", "1024", NULL);
}

static void start_with_checkpoints(void)
{
	for (int i = 0; i < 2; i++)
		th_mkdtemp(fo_ckdir[i], sizeof(fo_ckdir[i]), "ckpt");
	start_failover();
}

static void start_three(void)
{
	fo_n = fo_r = 3;
	start_failover();
}

static void start_partition(void)
{
	/* workers and servers give up on a silent peer after 7 x 268 ms, not
	 * 7 x 2 s: a worker goes to the new primary sooner, and rank 1 writes
	 * off its cut-off backup sooner */
	setenv("RDMAPS_ACK_TIMEOUT_MS", "250", 1);
	th_etcd_start(&etcd);
	th_proxy_start(&fo_proxy, etcd.url);
	start_failover(); /* (etcd already up: it is started once) */
}

static void stop_failover(void)
{
	if (system("command -v rxe-link >/dev/null && rxe-link 1 up >/dev/null 2>&1") != 0)
		fprintf(stderr, "rxe-link 1 up failed\n");
	for (int i = 0; i < fo_n; i++)
		th_server_stop(&pair[i]);
	th_proxy_stop(&fo_proxy); /* after: a stopping server gives its lease back */
	th_server_stop(&ref);
	th_etcd_stop(&etcd);
	unlink(fo_config);
	for (int i = 0; i < 3; i++)
		if (fo_ckdir[i][0])
			th_rmdir(fo_ckdir[i]);
}

static float fo_grad(int w, int k, int i)
{
	return 0.125f * (float)(((w * 5 + k) % 9) - 4) * (float)((i % 5) + 1);
}

struct fo_worker {
	int w, round;
	_Atomic int *gate; /* non-NULL: the pushes past the first third wait for it */
	rdmaps_client *c;
	rdmaps_tensor *t;
	_Atomic int done;   /* pushes returned */
	int rc[FPUSHES];
};

static void *fo_main(void *arg)
{
	struct fo_worker *x = arg;
	static float g[2][FLEN];

	for (int k = 0; k < FPUSHES; k++) {
		while (x->gate && k == FPUSHES / 3 && !atomic_load(x->gate))
			usleep(1000);
		for (int i = 0; i < FLEN; i++)
			g[x->w][i] = fo_grad(x->w, x->round * FPUSHES + k, i);
		x->rc[k] = rdmaps_push(x->c, x->t, g[x->w], RDMAPS_PUSH_FOLDED);
		atomic_fetch_add(&x->done, 1);
	}
	return NULL;
}

/* The reference tensor (on ref, returned; its client in *rc) and two
 * workers' (cluster clients from the workers' host), all declared alike. */
static rdmaps_tensor *fo_start_workers(struct fo_worker *wk, rdmaps_client **rc)
{
	struct rdmaps_tensor_desc d = { .name = "w", .length = FLEN, .init_value = 0.5f,
					.optimizer = RDMAPS_OPT_SGD, .lr = 0.25f };
	rdmaps_tensor *rt;

	*rc = th_connect(&ref);
	cr_assert_eq(rdmaps_declare(*rc, &d, &rt), 0);
	for (int w = 0; w < 2; w++) {
		wk[w].w = w;
		cr_assert_eq(th_connect_cluster(fo_servers, fo_host[fo_n + 1], &wk[w].c), 0);
		cr_assert_eq(rdmaps_declare(wk[w].c, &d, &wk[w].t), 0);
	}
	return rt;
}

/*
 * The model the workers pull equals the reference's (rc, rt) once every
 * push of the rounds has been folded there once; each worker lost no
 * push and failed over at least failovers times.
 */
static void fo_check_from(struct fo_worker *wk, rdmaps_client *rc, rdmaps_tensor *rt, int from,
			  int rounds, uint64_t failovers)
{
	static float g[FLEN], a[FLEN], b[FLEN];

	for (int r = from; r < rounds; r++)
		for (int w = 0; w < 2; w++)
			for (int k = 0; k < FPUSHES; k++) {
				for (int i = 0; i < FLEN; i++)
					g[i] = fo_grad(w, r * FPUSHES + k, i);
				cr_assert_eq(rdmaps_push(rc, rt, g, RDMAPS_PUSH_FOLDED), 0);
			}
	cr_assert_eq(rdmaps_pull(wk[0].c, wk[0].t, a, 0), 0);
	cr_assert_eq(rdmaps_pull(rc, rt, b, 0), 0);
	for (int i = 0; i < FLEN; i++)
		cr_assert_eq(a[i], b[i], "element %d: %g, every push once gives %g", i, a[i], b[i]);
	for (int w = 0; w < 2; w++) {
		struct rdmaps_client_stats cs;
		cr_assert_eq(rdmaps_flush(wk[w].c, 20000), 0);
		rdmaps_client_stats(wk[w].c, &cs);
		cr_assert_eq(cs.lost_pushes, 0);
		cr_assert_geq(cs.failovers, failovers, "worker %d: %llu failovers", w,
			      (unsigned long long)cs.failovers);
	}
}

/* The same, every round's pushes from the first. */
static void fo_check(struct fo_worker *wk, rdmaps_client *rc, rdmaps_tensor *rt, int rounds,
		     uint64_t failovers)
{
	fo_check_from(wk, rc, rt, 0, rounds, failovers);
}

Test(authority, a_killed_primary_fails_over_and_no_acknowledged_push_is_lost,
     .init = start_failover, .fini = stop_failover, .timeout = 300)
{
	static struct fo_worker wk[2];
	static float g[FLEN];
	struct rdmaps_tensor_desc d = { .name = "w", .length = FLEN, .init_value = 0.5f,
					.optimizer = RDMAPS_OPT_SGD, .lr = 0.25f };
	rdmaps_client *rc = th_connect(&ref), *probe;
	rdmaps_tensor *rt, *pt;
	pthread_t th[2];
	struct rdmaps_server_stats st;

	cr_assert_eq(rdmaps_declare(rc, &d, &rt), 0);
	/* a third worker, idle until the kill: its push then is folded by
	 * whoever serves rank 0 next (the failover time) */
	cr_assert_eq(th_connect_cluster(fo_servers, fo_host[fo_n + 1], &probe), 0);
	cr_assert_eq(rdmaps_declare(probe, &d, &pt), 0);
	for (int w = 0; w < 2; w++) {
		wk[w].w = w;
		cr_assert_eq(th_connect_cluster(fo_servers, fo_host[fo_n + 1], &wk[w].c), 0);
		cr_assert_eq(rdmaps_declare(wk[w].c, &d, &wk[w].t), 0);
	}
	cr_assert_gt(rdmaps_tensor_server_elems(wk[0].t, 0), 0, "rank 0 holds part of it");
	/* both backups caught up, and recorded in sync in etcd */
	for (int i = 0; i < 200; i++) {
		cr_assert_eq(rdmaps_server_stats(wk[0].c, &st), 0);
		if (st.backups == 2)
			break;
		usleep(100000);
	}
	cr_assert_eq(st.backups, 2, "backups up: %llu", (unsigned long long)st.backups);
	usleep(500000);

	for (int w = 0; w < 2; w++)
		pthread_create(&th[w], NULL, fo_main, &wk[w]);
	while (atomic_load(&wk[0].done) < FPUSHES / 3 || atomic_load(&wk[1].done) < FPUSHES / 3)
		usleep(2000);
	double t_kill = now_s();
	th_server_kill9(&pair[0]);
	for (int i = 0; i < FLEN; i++)
		g[i] = fo_grad(2, 0, i);
	cr_assert_eq(rdmaps_push(probe, pt, g, RDMAPS_PUSH_FOLDED), 0);
	double failover = now_s() - t_kill;
	cr_assert_eq(rdmaps_push(rc, rt, g, RDMAPS_PUSH_FOLDED), 0);
	for (int w = 0; w < 2; w++)
		pthread_join(th[w], NULL);
	fprintf(stderr, "failover: a push into rank 0's part posted at its kill -9 was folded by "
		"its backup %.2f s later\n", failover);

	/* every push returned 0: acknowledged, folded once */
	for (int w = 0; w < 2; w++)
		for (int k = 0; k < FPUSHES; k++)
			cr_assert_eq(wk[w].rc[k], 0, "worker %d push %d: %s", w, k,
				     rdmaps_strerror(wk[w].rc[k]));
	fo_check(wk, rc, rt, 1, 1);
	rdmaps_client *c1 = th_connect(&pair[1]);
	cr_assert_eq(rdmaps_server_stats(c1, &st), 0);
	cr_assert_eq(st.failovers, 1, "rank 1 took rank 0 over once");
	rdmaps_close(c1);
	for (int w = 0; w < 2; w++)
		rdmaps_close(wk[w].c);
	rdmaps_close(probe);
	rdmaps_close(rc);
}

/*
 * Re-replication: rank 0's server killed, rank 1 takes its part over;
 * rank 0's server started again finds its rank held, and becomes the
 * backup of its own part there (caught up while pushes go on); in sync,
 * it is given its rank back. Then rank 1's server is killed: rank 0's
 * takes rank 1's part over from its replica. Every acknowledged push of
 * the four rounds is in the model, exactly once.
 */
static void fo_round(struct fo_worker *wk, int round, void (*mid)(void), const char *what)
{
	static _Atomic int gate;
	pthread_t th[2];

	atomic_store(&gate, 0);
	for (int w = 0; w < 2; w++) {
		wk[w].round = round;
		wk[w].gate = &gate;
		atomic_store(&wk[w].done, 0);
		pthread_create(&th[w], NULL, fo_main, &wk[w]);
	}
	/* a third of the pushes, mid() (each push before it acknowledged),
	 * then the rest */
	while (atomic_load(&wk[0].done) < FPUSHES / 3 || atomic_load(&wk[1].done) < FPUSHES / 3)
		usleep(2000);
	mid();
	double t0 = now_s();
	atomic_store(&gate, 1);
	for (int w = 0; w < 2; w++)
		pthread_join(th[w], NULL);
	fprintf(stderr, "round %d: %d pushes of two workers after %s took %.2f s\n", round,
		2 * (FPUSHES - FPUSHES / 3), what, now_s() - t0);
	for (int k = 0; k < FPUSHES; k++)
		for (int w = 0; w < 2; w++)
			cr_assert_eq(wk[w].rc[k], 0, "round %d, worker %d push %d: %s", round, w, k,
				     rdmaps_strerror(wk[w].rc[k]));
}

static void kill_rank0(void) { th_server_kill9(&pair[0]); }

static void restart_rank0(void) { start_rank(0); }

static void kill_rank1(void) { th_server_kill9(&pair[1]); }

static void nothing(void) {}

/* Server s's backups caught up (its own part's and those of parts it took
 * over), waited for up to 20 s. */
static void wait_backups(struct th_server *s, uint64_t want)
{
	rdmaps_client *c = th_connect(s);
	struct rdmaps_server_stats st = { 0 };
	int rc, lost = 0;

	for (int i = 0; i < 200; i++) {
		/* a hand-back in progress sends this connection away (as it
		 * does a worker's, which then resumes on the rank's new
		 * primary): ask again on a new one, a few times at most */
		while ((rc = rdmaps_server_stats(c, &st)) && ++lost <= 3) {
			fprintf(stderr, "stats: %s; connecting again\n", rdmaps_strerror(rc));
			rdmaps_close(c);
			usleep(100000);
			c = th_connect(s);
		}
		cr_assert_eq(rc, 0, "stats: %s", rdmaps_strerror(rc));
		if (st.backups == want)
			break;
		usleep(100000);
	}
	cr_assert_eq(st.backups, want, "backups up: %llu", (unsigned long long)st.backups);
	rdmaps_close(c);
	usleep(500000); /* and recorded in sync in etcd (a tenth of a second) */
}

/* Four rounds of pushes from two workers: rank 0's server lost in the
 * first (lose); back in the second (back: the backup of its own part on
 * rank 1, then, and given its rank back); the third on the servers as at
 * the start; rank 1's server killed in the fourth. The model is then what
 * every push explains, once each. */
static void lose_rejoin_and_take_back(void (*lose)(void), void (*back)(void))
{
	static struct fo_worker wk[2];
	rdmaps_client *rc;
	rdmaps_tensor *rt = fo_start_workers(wk, &rc);
	struct rdmaps_server_stats st;
	cr_assert_gt(rdmaps_tensor_server_elems(wk[0].t, 0), 0, "rank 0 holds part of it");
	wait_backups(&pair[0], 1);
	wait_backups(&pair[1], 1);

	fo_round(wk, 0, lose, "rank 0 was lost"); /* rank 1 takes rank 0's part over */
	/* rank 0 back: the backup of both parts, caught up while the pushes
	 * go on, and once in sync given its rank back by rank 1 */
	double t_back = now_s();
	fo_round(wk, 1, back, "rank 0 came back");
	rdmaps_client *c1 = th_connect(&pair[1]);
	for (int i = 0; i < 300; i++) {
		cr_assert_eq(rdmaps_server_stats(c1, &st), 0);
		if (st.handbacks == 1)
			break;
		usleep(100000);
	}
	cr_assert_eq(st.handbacks, 1, "rank 1 gave rank 0 back");
	cr_assert_eq(st.failovers, 1, "rank 1 took rank 0 over once");
	rdmaps_close(c1);
	/* rank 0's server claims it within a quarter of a second, then
	 * takes workers again */
	rdmaps_client *c0 = NULL;
	for (int i = 0; i < 100 && th_connect_token(&pair[0], TH_TOKEN, &c0); i++)
		usleep(100000);
	cr_assert(c0, "rank 0's server takes workers again");
	rdmaps_close(c0);
	fprintf(stderr, "rank 0 back, caught up and given its rank back in %.2f s\n",
		now_s() - t_back);
	/* and each server the other's backup again */
	wait_backups(&pair[0], 1);
	wait_backups(&pair[1], 1);
	/* pushes go to rank 0's own server (the workers were sent there) */
	fo_round(wk, 2, nothing, "rank 0 was given its rank back");
	c0 = th_connect(&pair[0]);
	cr_assert_eq(rdmaps_server_stats(c0, &st), 0);
	rdmaps_close(c0);
	cr_assert_eq(st.failovers, 1, "rank 0 took its own part back from its copy");
	cr_assert_geq(st.folds, (uint64_t)FPUSHES, "rank 0 folds its workers' pushes again");
	fo_round(wk, 3, kill_rank1, "rank 1 was killed"); /* rank 0 serves both parts */

	c0 = th_connect(&pair[0]);
	cr_assert_eq(rdmaps_server_stats(c0, &st), 0);
	cr_assert_eq(st.failovers, 2, "rank 0 took its own part back and rank 1's over");
	rdmaps_close(c0);
	fo_check(wk, rc, rt, 4, 2);
	for (int w = 0; w < 2; w++)
		rdmaps_close(wk[w].c);
	rdmaps_close(rc);
}

Test(authority, a_restarted_primary_catches_up_as_its_parts_backup_and_takes_it_back,
     .init = start_failover, .fini = stop_failover, .timeout = 300)
{
	lose_rejoin_and_take_back(kill_rank0, restart_rank0);
}

/*
 * A partition instead of a kill: rank 0's server, alive, cut from the
 * workers and rank 1 (its RoCE cable pulled: rxe-link) and from etcd (its
 * relay stopped). Its lease ends by its own clock and it folds nothing
 * more; rank 1 takes its part over and the workers go there. Healed, the
 * old primary finds its rank held and becomes the backup of its own part
 * on rank 1, without a restart; rank 1 killed, it takes the part back.
 */
static void cut_rank0(void)
{
	cr_assert_eq(system("rxe-link 1 down"), 0);
	kill(fo_proxy.pid, SIGSTOP);
}

static void heal_rank0(void)
{
	kill(fo_proxy.pid, SIGCONT);
	cr_assert_eq(system("rxe-link 1 up"), 0);
}

Test(authority, a_primary_cut_off_rejoins_as_its_parts_backup_when_healed,
     .init = start_partition, .fini = stop_failover, .timeout = 300)
{
	if (system("command -v rxe-link >/dev/null 2>&1") != 0)
		cr_skip_test("needs tools/rxe-vm --hosts: rxe-link cuts an emulated cable");
	lose_rejoin_and_take_back(cut_rank0, heal_rank0);
}

/*
 * Three copies of every part, under etcd: rank 0 killed, one of ranks 1
 * and 2 takes its part over and makes the other its backup at once; then
 * that one is killed too, and the last server serves all three parts
 * from its copies. Ranks 0 and the other one are started again while
 * pushes go on: each catches up as its own part's backup and is given its
 * rank back. Every push of the four rounds is in the model once.
 */
static struct rdmaps_server_stats stats_of(int i)
{
	struct rdmaps_server_stats st;
	rdmaps_client *c = th_connect(&pair[i]);

	cr_assert_eq(rdmaps_server_stats(c, &st), 0);
	rdmaps_close(c);
	return st;
}

static int fo_taker, fo_last; /* who took rank 0 over first; who is left */

static void kill_taker(void) { th_server_kill9(&pair[fo_taker]); }

static void restart_both(void)
{
	start_rank(0);
	start_rank(fo_taker);
}

Test(authority, three_copies_survive_two_kills_and_the_dead_come_back,
     .init = start_three, .fini = stop_failover, .timeout = 300)
{
	static struct fo_worker wk[2];
	rdmaps_client *rc;
	rdmaps_tensor *rt = fo_start_workers(wk, &rc);
	struct rdmaps_server_stats st;

	for (int i = 0; i < 3; i++) {
		cr_assert_gt(rdmaps_tensor_server_elems(wk[0].t, (uint32_t)i), 0, "rank %d holds some", i);
		wait_backups(&pair[i], 2);
	}

	fo_round(wk, 0, kill_rank0, "rank 0 was killed");
	for (int i = 0; i < 100 && !fo_taker; i++) {
		for (int t = 1; t < 3; t++)
			if (stats_of(t).failovers == 1)
				fo_taker = t;
		usleep(100000);
	}
	cr_assert(fo_taker, "rank 1 or 2 took rank 0 over");
	fo_last = 3 - fo_taker;
	/* its backups: the last one for its own part and for rank 0's */
	wait_backups(&pair[fo_taker], 2);
	fo_round(wk, 1, kill_taker, "the server that took rank 0 over was killed");
	st = stats_of(fo_last);
	cr_assert_eq(st.failovers, 2, "rank %d took ranks 0 and %d over", fo_last, fo_taker);

	/* both back while pushes go on: each its own part's backup, then
	 * given its rank back */
	fo_round(wk, 2, restart_both, "ranks 0 and the other were started again");
	for (int i = 0; i < 300; i++) {
		st = stats_of(fo_last);
		if (st.handbacks == 2)
			break;
		usleep(100000);
	}
	cr_assert_eq(st.handbacks, 2, "rank %d gave both ranks back", fo_last);
	for (int i = 0; i < 3; i++) {
		rdmaps_client *c = NULL;
		for (int k = 0; k < 100 && th_connect_token(&pair[i], TH_TOKEN, &c); k++)
			usleep(100000);
		cr_assert(c, "rank %d takes workers", i);
		rdmaps_close(c);
		wait_backups(&pair[i], 2);
	}
	fo_round(wk, 3, nothing, "every rank was back on its server");
	fo_check(wk, rc, rt, 4, 2);
	for (int w = 0; w < 2; w++)
		rdmaps_close(wk[w].c);
	rdmaps_close(rc);
}

/*
 * etcd stalled (SIGSTOP) for 1.2 s while two workers push, as a loaded
 * host or a slow disk stalls it: a dozen beats go unanswered, then land
 * late. The holders pause their folds until a beat lands (no lease is
 * lost: it outlasts the stall); the backups, whose
 * own calls were as slow, wait longer before they count a holder dead
 * (beat.h), and the holders beat less often while etcd is slow. Nobody
 * replaces anybody (leases of 3 s outlast the stall), and every push is
 * in the model once.
 */
static void start_long_lease(void)
{
	fo_lease = 3;
	start_failover();
}

static void stall_etcd(void)
{
	kill(etcd.pid, SIGSTOP);
	usleep(1200000);
	kill(etcd.pid, SIGCONT);
}

Test(authority, a_stalled_etcd_moves_no_rank, .init = start_long_lease, .fini = stop_failover,
     .timeout = 300)
{
	static struct fo_worker wk[2];
	rdmaps_client *rc;
	rdmaps_tensor *rt = fo_start_workers(wk, &rc);
	uint64_t epoch[2];

	for (int i = 0; i < 2; i++) {
		wait_backups(&pair[i], 1);
		epoch[i] = stats_of(i).epoch;
	}
	fo_round(wk, 0, stall_etcd, "etcd stalled for 1.2 s");
	fo_round(wk, 1, nothing, "etcd answered again");
	for (int i = 0; i < 2; i++) {
		struct rdmaps_server_stats st = stats_of(i);
		cr_assert_eq(st.failovers, 0, "rank %d took no rank over", i);
		/* folds paused at the beats' fence; the lease of 3 s held */
		cr_assert_eq(st.lease_losses, 0, "rank %d lost no lease", i);
		cr_assert_eq(st.epoch, epoch[i], "rank %d still in epoch %llu: %llu", i,
			     (unsigned long long)epoch[i], (unsigned long long)st.epoch);
	}
	fo_check(wk, rc, rt, 2, 0);
	for (int w = 0; w < 2; w++)
		rdmaps_close(wk[w].c);
	rdmaps_close(rc);
}

/*
 * The whole cluster restarted while a rank was taken over: rank 0 killed
 * and taken over by rank 1, which checkpoints both parts (its own, and
 * rank 0's as replica-0) and is then killed too. Started again, rank 0's
 * server finds that its rank's last primary was rank 1, whose copy is
 * newer than its own checkpoint (none), and waits as that part's backup;
 * rank 1 restores both parts from its checkpoints, serves both, and gives
 * rank 0 back once its server is in sync. The model is what every push
 * acknowledged before the checkpoint explains (nothing was pushed after
 * it), and pushes go on.
 */
static void kill_both_and_restart(void)
{
	rdmaps_client *c1 = th_connect(&pair[1]);

	cr_assert_eq(rdmaps_checkpoint(c1, 10000), 0);
	rdmaps_close(c1);
	th_server_kill9(&pair[1]);
	usleep(1500000); /* its lease ends: nothing is held when they start */
	start_rank(0);
	start_rank(1);
}

Test(authority, a_whole_cluster_restart_restores_a_taken_over_part_from_its_last_primary,
     .init = start_with_checkpoints, .fini = stop_failover, .timeout = 300)
{
	static struct fo_worker wk[2];
	rdmaps_client *rc;
	rdmaps_tensor *rt = fo_start_workers(wk, &rc);
	struct rdmaps_server_stats st;

	wait_backups(&pair[0], 1);
	wait_backups(&pair[1], 1);
	fo_round(wk, 0, kill_rank0, "rank 0 was killed");
	/* every push of this round acknowledged, then the checkpoint, then
	 * the whole cluster down and up */
	fo_round(wk, 1, nothing, "rank 1 took rank 0 over");
	fo_check(wk, rc, rt, 2, 1);
	/* a restart from checkpoints is a new start for the workers too
	 * (what they pushed after the last checkpoint is theirs to redo) */
	for (int w = 0; w < 2; w++)
		rdmaps_close(wk[w].c);
	kill_both_and_restart();
	for (int w = 0; w < 2; w++) {
		int e = 1;
		for (int i = 0; i < 100 && e; i++)
			if ((e = th_connect_cluster(fo_servers, fo_host[fo_n + 1], &wk[w].c)))
				usleep(100000);
		cr_assert_eq(e, 0, "worker %d back: %s", w, rdmaps_strerror(e));
		cr_assert_eq(rdmaps_lookup(wk[w].c, "w", &wk[w].t), 0);
	}
	/* rank 0's part as rank 1 checkpointed it, not rank 0's own (none) */
	th_assert_same(wk[0].c, wk[0].t, rc, rt, FLEN, "after the whole cluster restarted");
	fo_round(wk, 2, nothing, "the whole cluster was restarted");
	for (int i = 0; i < 300; i++) {
		st = stats_of(1);
		if (st.handbacks == 1)
			break;
		usleep(100000);
	}
	cr_assert_eq(st.handbacks, 1, "rank 1 served rank 0's part from its checkpoint, then gave it back");
	fo_round(wk, 3, nothing, "rank 0 was given its rank back");
	fo_check_from(wk, rc, rt, 2, 4, 0);
	for (int w = 0; w < 2; w++)
		rdmaps_close(wk[w].c);
	rdmaps_close(rc);
}
