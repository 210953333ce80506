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
#include <signal.h>
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
	static float a[LEN], b[LEN];

	cr_assert_eq(rdmaps_pull(c, t, a, 0), 0);
	cr_assert_eq(rdmaps_pull(rc, rt, b, 0), 0);
	for (int i = 0; i < LEN; i++)
		cr_assert_eq(a[i], b[i], "%s: element %d: %g, the reference %g", when, i, a[i], b[i]);
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
