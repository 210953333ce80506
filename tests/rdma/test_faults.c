/*
 * Faults, each ending with a check of what the model must be: a server
 * killed with SIGKILL and restarted from its checkpoint (alone, with its
 * optimizer state checked; and one shard of three, killed while two workers
 * push flat out); a corrupt checkpoint refused for the previous one; a
 * worker killed mid-push across three shards while another pushes.
 * (Links cut and devices removed under load: checks.d/link-fault.)
 * (A worker killed mid-push, one server: datapath.killed_worker_folds_no_partial_push.)
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
#include <time.h>

#include "harness.h"
#include "rawclient.h"

#define LEN (3 * 1024)

static struct th_server srv;
static char dir[64];

static void cleanup(void)
{
	if (srv.pid)
		th_server_stop(&srv);
	th_rmdir(dir);
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void fill(float *g, float v)
{
	for (int i = 0; i < LEN; i++)
		g[i] = v;
}

Test(faults, server_killed_restarts_from_checkpoint, .fini = cleanup, .timeout = 300)
{
	static float g[LEN], v[LEN];
	struct rdmaps_server_stats st;
	struct rdmaps_client_stats cs;
	rdmaps_client *c;
	rdmaps_tensor *t;
	int rc;

	th_mkdtemp(dir, sizeof(dir), "faults");
	th_server_start(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	c = th_connect(&srv);
	struct rdmaps_tensor_desc d = { .name = "durable", .length = LEN, .lr = 1.0f,
					.optimizer = RDMAPS_OPT_MOMENTUM, .momentum = 0.5f };
	cr_assert_eq(rdmaps_declare(c, &d, &t), 0);
	fill(g, -1.0f);
	for (int i = 0; i < 10; i++)
		cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	float at_ckpt = v[0];
	cr_assert_eq(rdmaps_checkpoint(c, 10000), 0);
	/* more folds after the checkpoint: a crash loses these */
	for (int i = 0; i < 5; i++)
		cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	cr_assert_gt(v[0], at_ckpt);

	th_server_kill9(&srv);
	/* the server comes back from its checkpoint ... */
	th_server_restart(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	/* ... the worker's push finds its connection dead, reconnects, and
	 * learns the server restarted without its account: the push fails,
	 * not folded (the new run never saw it) ... */
	rc = rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED);
	cr_assert_eq(rc, RDMAPS_EDISCONNECTED, "push across the restart: %s", rdmaps_strerror(rc));
	/* ... and the worker goes on with the restored model */
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0, "pull after the restart");
	for (int i = 0; i < LEN; i++)
		cr_assert_eq(v[i], at_ckpt, "[%d] = %f: the checkpoint's value is %f", i, v[i], at_ckpt);
	cr_assert_eq(rdmaps_flush(c, 10000), RDMAPS_EDISCONNECTED, "the lost push is reported once");
	cr_assert_eq(rdmaps_flush(c, 10000), 0);
	/* momentum state came back too: the next step uses the saved velocity */
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	/* velocity after 10 steps of g=-1, mu=0.5: 2(1 - 2^-10); one more step */
	float vel = -2.0f * (1.0f - 1.0f / 1024.0f);
	float want = at_ckpt - (0.5f * vel - 1.0f);
	cr_assert_float_eq(v[0], want, 1e-5, "after restart %f, want %f", v[0], want);
	rdmaps_client_stats(c, &cs);
	cr_assert_eq(cs.reconnects, 1);
	cr_assert_eq(cs.server_restarts, 1, "the worker knows the server restarted");
	cr_assert_eq(rdmaps_server_stats(c, &st), 0);
	cr_assert_eq(st.restored_seq, 1);
	rdmaps_close(c);
}

Test(faults, corrupt_checkpoint_falls_back, .fini = cleanup, .timeout = 300)
{
	static float g[LEN], v[LEN];
	rdmaps_client *c;
	rdmaps_tensor *t;
	char path[160];

	th_mkdtemp(dir, sizeof(dir), "faults");
	th_server_start(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	c = th_connect(&srv);
	t = th_declare(c, "w", LEN, 0.0f, 1.0f);
	fill(g, -1.0f);
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_checkpoint(c, 10000), 0); /* 1: value 1 */
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_checkpoint(c, 10000), 0); /* 2: value 2 */
	rdmaps_close(c);
	th_server_kill9(&srv);
	/* damage checkpoint 2: the server says so and restores 1 */
	snprintf(path, sizeof(path), "%s/ckpt-%016x.rdmaps", dir, 2);
	FILE *f = fopen(path, "r+b");
	cr_assert_not_null(f);
	fseek(f, -20, SEEK_END);
	fputc('!', f);
	fclose(f);
	th_server_restart(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	c = th_connect(&srv);
	cr_assert_eq(rdmaps_lookup(c, "w", &t), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	cr_assert_eq(v[0], 1.0f, "checkpoint 1 restored, got %f", v[0]);
	rdmaps_close(c);
}

/*
 * A directory whose checkpoints are all refused (junk here): the server
 * starts empty, and what it writes next is numbered past them, so keeping
 * the newest three never prunes the file just written.
 */
Test(faults, checkpoint_after_refused_files_is_kept, .fini = cleanup, .timeout = 300)
{
	static float g[LEN], v[LEN];
	rdmaps_client *c;
	rdmaps_tensor *t;
	char path[160];

	th_mkdtemp(dir, sizeof(dir), "faults");
	for (int seq = 5; seq <= 7; seq++) {
		snprintf(path, sizeof(path), "%s/ckpt-%016x.rdmaps", dir, seq);
		FILE *f = fopen(path, "w");
		cr_assert_not_null(f);
		fputs("junk", f);
		fclose(f);
	}
	th_server_start(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, "--checkpoint-every",
			"1", NULL);
	c = th_connect(&srv);
	t = th_declare(c, "w", LEN, 0.0f, 1.0f);
	fill(g, -1.0f);
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_checkpoint(c, 10000), 0);
	sleep(3); /* and a few periodic ones */
	rdmaps_close(c);
	th_server_kill9(&srv);
	for (int seq = 5; seq <= 7; seq++) {
		snprintf(path, sizeof(path), "%s/ckpt-%016x.rdmaps", dir, seq);
		cr_assert_neq(access(path, F_OK), 0, "junk %d pruned, as the oldest", seq);
	}
	th_server_restart(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	c = th_connect(&srv);
	cr_assert_eq(rdmaps_lookup(c, "w", &t), 0, "a checkpoint written after the junk is there");
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	cr_assert_eq(v[0], 1.0f);
	rdmaps_close(c);
}

/*
 * A clean stop (SIGTERM) checkpoints after every staged push is folded:
 * pushes rdmaps_push returned for (the WRITE acknowledged, not yet folded)
 * are in the model the restarted server has.
 */
Test(faults, clean_stop_keeps_every_staged_push, .fini = cleanup, .timeout = 300)
{
	enum { BIG = 16 * 1024, PUSHES = 12 };
	static float g[BIG], v[BIG];
	rdmaps_client *c;
	rdmaps_tensor *t;

	th_mkdtemp(dir, sizeof(dir), "faults");
	th_server_start(&srv, "--chunk-elems", "1024", "--slots", "64", "--checkpoint-dir", dir, NULL);
	c = th_connect(&srv);
	t = th_declare(c, "w", BIG, 0.0f, 1.0f);
	for (int i = 0; i < BIG; i++)
		g[i] = -1.0f;
	for (int i = 0; i < PUSHES; i++)
		cr_assert_eq(rdmaps_push(c, t, g, 0), 0); /* staged, not waited for */
	th_server_stop(&srv);
	th_server_restart(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	rdmaps_close(c);
	c = th_connect(&srv);
	cr_assert_eq(rdmaps_lookup(c, "w", &t), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	for (int i = 0; i < BIG; i++)
		cr_assert_eq(v[i], (float)PUSHES, "[%d] = %g: every staged push is in", i, (double)v[i]);
	rdmaps_close(c);
}

/* Workers asking for checkpoints without end pause the folds at most about
 * once a second: requests in between make one checkpoint. */
Test(faults, checkpoint_requests_are_rate_limited, .fini = cleanup, .timeout = 300)
{
	struct rdmaps_server_stats st;
	rdmaps_client *c;
	struct raw r;
	uint64_t t0;

	th_mkdtemp(dir, sizeof(dir), "faults");
	th_server_start(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	c = th_connect(&srv);
	th_declare(c, "w", LEN, 0.0f, 1.0f);
	struct rdmaps_wire_hello h = raw_hello(TH_TOKEN);
	cr_assert_eq(raw_connect(&r, srv.addr, srv.port, &h, sizeof(h)), 0);
	t0 = now_ms();
	for (uint32_t i = 0; i < 40; i++) {
		struct rdmaps_msg_hdr m;
		struct rdmaps_msg_status_reply rep;
		rdmaps__msg_init(&m, RDMAPS_MSG_CHECKPOINT, sizeof(m), i + 1);
		cr_assert_eq(raw_send(&r, &m, sizeof(m)), IBV_WC_SUCCESS);
		cr_assert_eq(raw_recv(&r, &rep, sizeof(rep), 10000), (int)sizeof(rep));
		cr_assert_eq(rep.status, 0, "accepted");
		usleep(20000);
	}
	uint64_t took = now_ms() - t0;
	raw_close(&r);
	cr_assert_eq(rdmaps_server_stats(c, &st), 0);
	cr_assert_geq(st.checkpoints, 1);
	cr_assert_leq(st.checkpoints, 2 + took / 1000, "%llu checkpoints for 40 requests in %llu ms",
		      (unsigned long long)st.checkpoints, (unsigned long long)took);
	sleep(2); /* requests after the first checkpoint are served by a later one */
	cr_assert_eq(rdmaps_server_stats(c, &st), 0);
	cr_assert_geq(st.checkpoints, 2, "requests after the first are served");
	printf("checkpoint requests: 40 in %llu ms made %llu checkpoints\n", (unsigned long long)took,
	       (unsigned long long)st.checkpoints);
	rdmaps_close(c);
}

/*
 * Exactly once across a cut link (docs/durability.md). The worker's
 * RDMAPS_PUSH_FOLDED push is staged while the server is stopped (SIGSTOP:
 * its kernel still acknowledges the WRITE), then the worker's link is cut,
 * then the server folds it: the credit saying so cannot arrive, and the
 * worker's connection fails. Reconnected, the worker learns the push
 * folded: it returns 0, the model holds it once, nothing is lost. (Before,
 * the push failed although it was in the model, and a retry folded it
 * twice.)
 */
struct push_arg {
	rdmaps_client *c;
	rdmaps_tensor *t;
	int rc;
};

static void *push_folded_main(void *p)
{
	struct push_arg *a = p;
	static float g[LEN];

	fill(g, -1.0f);
	a->rc = rdmaps_push(a->c, a->t, g, RDMAPS_PUSH_FOLDED);
	return NULL;
}

static void rxe_link(int host, const char *how)
{
	char cmd[64];
	snprintf(cmd, sizeof(cmd), "rxe-link %d %s", host, how);
	cr_assert_eq(system(cmd), 0, "%s", cmd);
}

static void link_up(void)
{
	if (system("rxe-link 2 up >/dev/null 2>&1") != 0)
		fprintf(stderr, "rxe-link 2 up failed\n");
	cleanup();
}

/* A server on host 1 (with --slots slots, unless NULL), the worker a->c on
 * host 2 and an observer on host 3; the test is skipped, saying why, where
 * there are no emulated cables to cut (never in the VM). */
static void cut_link_setup(const char *slots, struct push_arg *a, rdmaps_client **watch)
{
	const char *h[3];
	char servers[64];

	if (system("command -v rxe-link >/dev/null 2>&1") != 0 || !getenv("RDMAPS_HOSTS")) {
		cr_assert_null(getenv("RDMAPS_IN_VM"), "the VM must have its emulated hosts");
		cr_skip_test("needs tools/rxe-vm --hosts 3 or more: rxe-link cuts an emulated cable");
	}
	th_hosts(h, 3);
	/* a NULL slots ends the arguments there */
	th_server_start_at(&srv, h[0], "--chunk-elems", "1024", slots ? "--slots" : NULL, slots,
			   NULL);
	snprintf(servers, sizeof(servers), "%s:%s", srv.addr, srv.port);
	cr_assert_eq(th_connect_cluster(servers, h[1], &a->c), 0);
	cr_assert_eq(th_connect_cluster(servers, h[2], watch), 0);
}

Test(faults, push_folded_across_a_cut_link_counts_once, .fini = link_up, .timeout = 300)
{
	static float v[LEN];
	struct rdmaps_server_stats st;
	struct rdmaps_client_stats cs;
	struct push_arg a = { 0 };
	rdmaps_client *watch;
	pthread_t th;

	cut_link_setup(NULL, &a, &watch);
	a.t = th_declare(a.c, "w", LEN, 0.0f, 1.0f);
	push_folded_main(&a);
	cr_assert_eq(a.rc, 0);

	th_server_freeze(&srv);
	cr_assert_eq(pthread_create(&th, NULL, push_folded_main, &a), 0);
	usleep(500000); /* staged: the server's kernel acknowledged the WRITE */
	rxe_link(2, "down");
	kill(srv.pid, SIGCONT);
	for (int i = 0; i < 500; i++) { /* the server folds it; its credit cannot get out */
		cr_assert_eq(rdmaps_server_stats(watch, &st), 0);
		if (st.folds >= 2u * (LEN / 1024))
			break;
		usleep(10000);
	}
	cr_assert_eq(st.folds, 2u * (LEN / 1024), "the staged push folded on the server");
	sleep(6); /* the worker's connection fails (its probe finds the link dead) */
	rxe_link(2, "up");
	pthread_join(th, NULL);
	cr_assert_eq(a.rc, 0, "the push folded, so it succeeds: %s", rdmaps_strerror(a.rc));
	rdmaps_tensor *wt;
	cr_assert_eq(rdmaps_lookup(watch, "w", &wt), 0);
	cr_assert_eq(rdmaps_pull(watch, wt, v, 0), 0);
	for (int i = 0; i < LEN; i++)
		cr_assert_eq(v[i], 2.0f, "[%d] = %g: two pushes, each folded once", i, (double)v[i]);
	rdmaps_client_stats(a.c, &cs);
	cr_assert_geq(cs.reconnects, 1, "the cut was felt");
	cr_assert_eq(cs.lost_pushes, 0);
	cr_assert_eq(rdmaps_flush(a.c, 10000), 0, "nothing lost to report");
	push_folded_main(&a);
	cr_assert_eq(a.rc, 0);
	cr_assert_eq(rdmaps_pull(watch, wt, v, 0), 0);
	cr_assert_eq(v[0], 3.0f);
	rdmaps_close(a.c);
	rdmaps_close(watch);
}

/*
 * A compressed push wider than the ring (12 chunks, 4 slots) across two
 * link cuts. The worker encodes the push once, when it is posted, and
 * sends those bytes again where a broken connection did not fold them:
 * each chunk must be encoded once (its residual moved once) and folded
 * once. Top-k
 * with a quarter of each chunk and every magnitude equal makes the model
 * say so exactly: ties go to the lower indices and the residual grows
 * where nothing was sent, so push p sends quarter p - 1 of each chunk and
 * after four pushes quarter q holds q + 1.
 */
#define WLEN (12 * 1024)

static void *push_topk_main(void *p)
{
	struct push_arg *a = p;
	static float g[WLEN];

	for (int i = 0; i < WLEN; i++)
		g[i] = -1.0f;
	a->rc = rdmaps_push(a->c, a->t, g, RDMAPS_PUSH_FOLDED);
	return NULL;
}

Test(faults, compressed_push_across_a_cut_link_encodes_each_chunk_once, .fini = link_up,
     .timeout = 300)
{
	static float v[WLEN];
	struct rdmaps_client_stats cs;
	struct push_arg a = { 0 };
	rdmaps_client *watch;
	rdmaps_tensor *wt;
	pthread_t th;

	cut_link_setup("4", &a, &watch);
	a.t = th_declare(a.c, "wk", WLEN, 0.0f, 1.0f);
	cr_assert_eq(rdmaps_set_push_format(a.c, a.t, RDMAPS_FMT_TOPK, 0.25), 0);
	push_topk_main(&a);
	cr_assert_eq(a.rc, 0);

	/* cut 1: the server's kernel takes the first four slots and the
	 * stopped process folds nothing, so the push waits for credits when
	 * the link goes; the server folds those four meanwhile, and the
	 * worker posts the other eight after its reconnect */
	th_server_freeze(&srv);
	cr_assert_eq(pthread_create(&th, NULL, push_topk_main, &a), 0);
	usleep(500000);
	rxe_link(2, "down");
	kill(srv.pid, SIGCONT);
	sleep(6); /* the worker's connection fails (its probe finds the link dead) */
	rxe_link(2, "up");
	pthread_join(th, NULL);
	cr_assert_eq(a.rc, 0, "the push goes on after the reconnect: %s", rdmaps_strerror(a.rc));

	/* cut 2: the link down before the push, so its first four slots are
	 * posted and never arrive: sent again after the reconnect */
	rxe_link(2, "down");
	cr_assert_eq(pthread_create(&th, NULL, push_topk_main, &a), 0);
	sleep(6);
	rxe_link(2, "up");
	pthread_join(th, NULL);
	cr_assert_eq(a.rc, 0, "the push goes on after the reconnect: %s", rdmaps_strerror(a.rc));
	rdmaps_client_stats(a.c, &cs);
	cr_assert_geq(cs.reconnects, 2, "both cuts were felt");
	cr_assert_geq(cs.resent_slots, 1, "the second cut had slots sent again");
	push_topk_main(&a);
	cr_assert_eq(a.rc, 0);

	cr_assert_eq(rdmaps_lookup(watch, "wk", &wt), 0);
	cr_assert_eq(rdmaps_pull(watch, wt, v, 0), 0);
	for (int i = 0; i < WLEN; i++)
		cr_assert_eq(v[i], (float)(i % 1024 / 256 + 1),
			     "[%d] = %g: each chunk encoded once and folded once", i, (double)v[i]);
	rdmaps_close(a.c);
	rdmaps_close(watch);
}

/* ---- one shard of three killed under load ------------------------------ */

#define NS 3
#define NW 2
#define VICTIM 1
#define CLEN (12 * 1024) /* four 1024-float chunks on each server */
#define AFTER 40         /* pushes each worker makes once the shard is back */

enum { LOAD, RESUME, ABORT };

static struct th_server shard[NS];
static char shard_dir[NS][64];
static const char *host[5];
static char servers[512];
static _Atomic int phase;
static float ones[CLEN]; /* the gradient: -1 everywhere (SGD, lr 1: +1 a fold) */

struct load_worker {
	int w, rc;
	const char *what;          /* the step that failed, when rc != 0 */
	pthread_t th;
	_Atomic uint64_t staged;   /* pushes rdmaps_push returned 0 for */
	_Atomic uint64_t confirmed; /* of those, the ones a flush saw folded */
	_Atomic int failed;        /* a call failed: the kill was felt */
	int fail_rc;               /* what the call the kill cut short returned */
	bool fail_in_flush;        /* that call was a flush */
	uint64_t fail_reconnects;  /* reconnects done by then: that call may
				    * have reconnected and settled, if the
				    * shard was back in time */
	int flush_after;           /* first flush after the reconnect */
	struct rdmaps_client_stats st;
};

static void shard_cleanup(void)
{
	atomic_store(&phase, ABORT);
	for (int i = 0; i < NS; i++) {
		if (shard[i].pid)
			th_server_stop(&shard[i]);
		th_rmdir(shard_dir[i]);
	}
}

static void shard_start(int i, bool again)
{
	if (again)
		th_server_restart(&shard[i], "--chunk-elems", "1024", "--fold-threads", "1",
				  "--checkpoint-dir", shard_dir[i], NULL);
	else
		th_server_start_at(&shard[i], host[i], "--chunk-elems", "1024", "--fold-threads", "1",
				   "--checkpoint-dir", shard_dir[i], NULL);
}

/* Three servers on hosts 1-3, each with a checkpoint directory of its own. */
static void shards_up(void)
{
	size_t n = 0;

	th_hosts(host, 5);
	for (int i = 0; i < NS; i++) {
		th_mkdtemp(shard_dir[i], sizeof(shard_dir[i]), "shard");
		shard_start(i, false);
		n += (size_t)snprintf(servers + n, sizeof(servers) - n, "%s%s:%s", i ? "," : "",
				      shard[i].addr, shard[i].port);
	}
}

#define STEP(call, name)             \
	do {                         \
		a->what = name;      \
		if ((a->rc = (call))) \
			goto out;    \
	} while (0)

/*
 * Pushes flat out, flushing every 8th, until a call fails (the kill); then
 * waits for the test to bring the shard back, and checks what a training
 * loop would see: the next call reconnects, the flush after it reports the
 * loss once, and AFTER more pushes fold.
 */
static void *load_main(void *p)
{
	struct load_worker *a = p;
	static float v[NW][CLEN];
	rdmaps_client *c = NULL;
	rdmaps_tensor *t = NULL;

	STEP(th_connect_cluster(servers, host[3 + a->w], &c), "connect");
	STEP(rdmaps_lookup(c, "w", &t), "lookup");
	while (atomic_load(&phase) == LOAD) {
		int rc = rdmaps_push(c, t, ones, 0);
		if (!rc) {
			uint64_t n = atomic_fetch_add(&a->staged, 1) + 1;
			if (n % 8 == 0 && !(rc = rdmaps_flush(c, 20000)))
				atomic_store(&a->confirmed, n);
			a->fail_in_flush = rc != 0;
		}
		if (rc) {
			struct rdmaps_client_stats cs;
			rdmaps_client_stats(c, &cs);
			a->fail_rc = rc;
			a->fail_reconnects = cs.reconnects;
			atomic_store(&a->failed, 1);
			break;
		}
	}
	while (atomic_load(&phase) == LOAD)
		usleep(10000);
	a->what = "aborted";
	if (atomic_load(&phase) != RESUME) {
		a->rc = RDMAPS_ETIMEDOUT; /* the test gave up before the restart */
		goto out;
	}
	STEP(rdmaps_pull(c, t, v[a->w], 0), "pull after the restart");
	a->flush_after = rdmaps_flush(c, 20000);
	STEP(rdmaps_flush(c, 20000), "second flush");
	for (int i = 0; i < AFTER; i++)
		STEP(rdmaps_push(c, t, ones, 0), "push after the restart");
	STEP(rdmaps_flush(c, 20000), "flush after the restart");
	a->what = NULL;
out:
	if (c)
		rdmaps_client_stats(c, &a->st);
	rdmaps_close(c);
	return NULL;
}

static uint64_t total_staged(struct load_worker *w)
{
	uint64_t n = 0;
	for (int i = 0; i < NW; i++)
		n += atomic_load(&w[i].staged);
	return n;
}
static uint64_t total_confirmed(struct load_worker *w)
{
	uint64_t n = 0;
	for (int i = 0; i < NW; i++)
		n += atomic_load(&w[i].confirmed);
	return n;
}

/* Waits up to `s` seconds for cond(w) to hold. */
static bool wait_for(struct load_worker *w, bool (*cond)(struct load_worker *), int s)
{
	for (int i = 0; i < s * 100; i++) {
		if (cond(w))
			return true;
		usleep(10000);
	}
	return cond(w);
}
static bool all_going(struct load_worker *w)
{
	for (int i = 0; i < NW; i++)
		if (atomic_load(&w[i].confirmed) < 16)
			return false;
	return true;
}
static bool all_failed(struct load_worker *w)
{
	for (int i = 0; i < NW; i++)
		if (!atomic_load(&w[i].failed))
			return false;
	return true;
}
/* a push returns (and is counted staged) a little after its WRITEs land:
 * each worker may have one more in the server than it has counted */
static uint64_t ckpt_most;
static bool past_checkpoint(struct load_worker *w)
{
	return total_confirmed(w) > ckpt_most;
}

/* Server i's part of "w", read through a client of its own: every element
 * must hold the same whole number of folds (a push is atomic per server). */
static float part_value(int i)
{
	static float v[CLEN];
	rdmaps_client *c = th_connect(&shard[i]);
	rdmaps_tensor *t;
	uint64_t n;

	cr_assert_eq(rdmaps_lookup(c, "w", &t), 0, "server %d lost the tensor", i);
	n = rdmaps_tensor_length(t);
	cr_assert(n > 0 && n <= CLEN);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	for (uint64_t j = 0; j < n; j++)
		cr_assert_eq(v[j], v[0], "server %d: partial push: [0]=%f [%lu]=%f", i, v[0], j, v[j]);
	rdmaps_close(c);
	return v[0];
}

Test(faults, shard_killed_under_load_restarts_from_checkpoint, .init = shards_up,
     .fini = shard_cleanup, .timeout = 300)
{
	static struct load_worker w[NW];
	struct rdmaps_client_stats cs;
	struct rdmaps_server_stats st;
	rdmaps_client *ctl;
	rdmaps_tensor *t;
	float p[NS], q[NS];

	for (int i = 0; i < CLEN; i++)
		ones[i] = -1.0f;
	cr_assert_eq(th_connect_cluster(servers, host[3], &ctl), 0);
	t = th_declare(ctl, "w", CLEN, 0.0f, 1.0f);
	for (int i = 0; i < NS; i++)
		cr_assert_gt(rdmaps_tensor_server_elems(t, (uint32_t)i), 0, "server %d holds a part", i);

	atomic_store(&phase, LOAD);
	for (int i = 0; i < NW; i++) {
		w[i].w = i;
		cr_assert_eq(pthread_create(&w[i].th, NULL, load_main, &w[i]), 0);
	}
	cr_assert(wait_for(w, all_going, 60), "the workers did not get going");
	/* a checkpoint under load: it holds at least every push confirmed
	 * before it was asked for, and at most those staged when it is done */
	uint64_t ckpt_confirmed = total_confirmed(w);
	cr_assert_eq(rdmaps_checkpoint(ctl, 30000), 0);
	ckpt_most = total_staged(w) + NW;
	/* more folds, which the crash takes back; then the kill, mid-push */
	cr_assert(wait_for(w, past_checkpoint, 30), "no push folded after the checkpoint");
	th_server_kill9(&shard[VICTIM]);
	/* back a moment later: the pushes the kill cut short wait for it, find
	 * it restarted without their account, and fail */
	usleep(1000000);
	shard_start(VICTIM, true);
	cr_assert(wait_for(w, all_failed, 60), "a worker never noticed the dead server");
	uint64_t staged_at_kill = total_staged(w), confirmed_at_kill = total_confirmed(w);
	usleep(500000); /* the survivors fold what was staged on them */
	for (int i = 0; i < NS; i++)
		p[i] = part_value(i);
	printf("shard kill: checkpoint between %lu and %lu pushes, kill at %lu confirmed, %lu staged; "
	       "parts %.0f %.0f %.0f\n", ckpt_confirmed, ckpt_most, confirmed_at_kill, staged_at_kill,
	       p[0], p[1], p[2]);
	for (int i = 0; i < NS; i++) {
		if (i == VICTIM) {
			/* back at its checkpoint, which was taken under load */
			cr_assert(p[i] >= (float)ckpt_confirmed && p[i] <= (float)ckpt_most,
				  "restored part %.0f not within the checkpoint's [%lu, %lu]", p[i],
				  ckpt_confirmed, ckpt_most);
		} else {
			/* untouched: every confirmed push, and each failed one at most once */
			cr_assert(p[i] >= (float)confirmed_at_kill && p[i] <= (float)(staged_at_kill + NW),
				  "surviving part %d = %.0f not within [%lu, %lu]", i, p[i],
				  confirmed_at_kill, staged_at_kill + NW);
			cr_assert_eq(part_value(i), p[i], "surviving part %d still changing", i);
			/* the folds after the checkpoint were really taken back */
			cr_assert_lt(p[VICTIM], p[i]);
		}
	}
	/* the server says which checkpoint it came back from */
	rdmaps_client *one = th_connect(&shard[VICTIM]);
	cr_assert_eq(rdmaps_server_stats(one, &st), 0);
	cr_assert_eq(st.restored_seq, 1);
	rdmaps_close(one);

	/* the workers go on by themselves */
	atomic_store(&phase, RESUME);
	for (int i = 0; i < NW; i++) {
		pthread_join(w[i].th, NULL);
		cr_assert_eq(w[i].rc, 0, "worker %d: %s: %s", i, w[i].what, rdmaps_strerror(w[i].rc));
		/* the loss is reported once, by the first flush after the
		 * reconnect: the one the kill cut short when it reconnected
		 * itself (the shard was back in time), else the next one */
		if (w[i].fail_in_flush && w[i].fail_reconnects)
			cr_assert(w[i].fail_rc == RDMAPS_EDISCONNECTED &&
					  w[i].flush_after == 0,
				  "worker %d: reconnected within the call the kill cut short, "
				  "which returned %s, then the next flush %s", i,
				  rdmaps_strerror(w[i].fail_rc), rdmaps_strerror(w[i].flush_after));
		else
			cr_assert_eq(w[i].flush_after, RDMAPS_EDISCONNECTED,
				     "worker %d: the restart was not reported: %s", i,
				     rdmaps_strerror(w[i].flush_after));
		cr_assert_eq(w[i].st.reconnects, 1, "worker %d reconnected %lu times", i,
			     w[i].st.reconnects);
		cr_assert_eq(w[i].st.server_restarts, 1, "worker %d: restart not recognised", i);
	}
	/* nothing folded twice, nothing lost since: each part moved by exactly
	 * the pushes made after the restart */
	for (int i = 0; i < NS; i++) {
		q[i] = part_value(i);
		cr_assert_eq(q[i], p[i] + NW * AFTER, "part %d: %.0f, want %.0f + %d", i, q[i], p[i],
			     NW * AFTER);
	}
	/* the client that asked for the checkpoint only watched: the call that
	 * finds its connection dead fails, the next reconnects, is told of the
	 * restart, and sees the same parts */
	static float v[CLEN];
	int rc = rdmaps_pull(ctl, t, v, 0);
	if (rc == RDMAPS_EDISCONNECTED)
		rc = rdmaps_pull(ctl, t, v, 0);
	cr_assert_eq(rc, 0, "pull after the restart: %s", rdmaps_strerror(rc));
	rdmaps_client_stats(ctl, &cs);
	cr_assert_eq(cs.server_restarts, 1);
	cr_assert_eq(rdmaps_flush(ctl, 10000), RDMAPS_EDISCONNECTED);
	float total = 0;
	for (int i = 0; i < CLEN; i++)
		total += v[i];
	float want = 0;
	for (int i = 0; i < NS; i++)
		want += q[i] * (float)rdmaps_tensor_server_elems(t, (uint32_t)i);
	cr_assert_eq(total, want, "whole pull sums to %.0f, the parts to %.0f", total, want);
	rdmaps_close(ctl);
}

/* ---- a worker killed mid-push across shards ---------------------------- */

#define SURVIVOR_PUSHES 60

/*
 * A push is all-or-nothing per server: a worker killed in the middle of one
 * leaves each server's part holding whole pushes only, and since a worker
 * stages one push on every server before the next, the parts differ by at
 * most that one push. Meanwhile another worker's pushes all fold, and the
 * servers go on.
 */
Test(faults, shard_worker_killed_mid_push_leaves_whole_parts, .init = shards_up,
     .fini = shard_cleanup, .timeout = 300)
{
	rdmaps_client *ctl;
	float base[NS];

	cr_assert_eq(th_connect_cluster(servers, host[4], &ctl), 0);
	th_declare(ctl, "w", CLEN, 0.0f, 1.0f);
	for (int i = 0; i < NS; i++)
		base[i] = 0.0f;
	for (int round = 0; round < 3; round++) {
		struct timespec ts = { 0, (150 + 90 * round) * 1000000L };
		char count[16];
		int status;
		float p[NS], lo = 1e30f, hi = -1e30f;

		snprintf(count, sizeof(count), "%d", SURVIVOR_PUSHES);
		pid_t victim = th_pusher("--cluster", servers, host[3], TH_TOKEN, "w", "-1", NULL);
		pid_t survivor = th_pusher("--cluster", servers, host[3], TH_TOKEN, "w", count, NULL);
		nanosleep(&ts, NULL);
		kill(victim, SIGKILL);
		waitpid(victim, &status, 0);
		cr_assert(WIFSIGNALED(status), "the victim exited by itself: %d", status);
		waitpid(survivor, &status, 0);
		cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
			  "the other worker's pushes failed: %d", status);
		usleep(300000); /* the servers fold what the victim staged in time */
		for (int i = 0; i < NS; i++) {
			p[i] = part_value(i) - base[i] - SURVIVOR_PUSHES; /* the victim's */
			lo = p[i] < lo ? p[i] : lo;
			hi = p[i] > hi ? p[i] : hi;
			base[i] += p[i] + SURVIVOR_PUSHES;
		}
		printf("shard worker kill, round %d: the victim's whole pushes per server %.0f %.0f %.0f\n",
		       round, p[0], p[1], p[2]);
		cr_assert(lo >= 1.0f, "the victim pushed nothing before it was killed");
		cr_assert(hi - lo <= 1.0f, "parts differ by more than the push in flight: %.0f..%.0f", lo,
			  hi);
	}
	rdmaps_close(ctl);
}
