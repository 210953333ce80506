/*
 * The data path end to end against a real rdmaps-server: exact folds from
 * several workers, no torn pull under concurrent folds, READs that span
 * chunks, all-or-nothing pushes when a worker is killed mid-push,
 * idempotent declarations, a server that sends nothing inline.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "rawclient.h"
#include "verbs.h" /* RDMAPS_READ_SPAN */

static struct th_server srv;

static void stop_server(void)
{
	th_server_stop(&srv);
}

/* ---- exactness -------------------------------------------------------- */

#define W 3
#define ROUNDS 20
#define BIG (3 * 1024 + 100) /* three full chunks and a partial one */
#define SMALL 16

struct worker_arg {
	int w, rc;
	char where[96];
};

static float grad_of(int w, uint64_t i)
{
	return -(float)(w + 1) * (float)(1 + i % 4);
}

static void *exact_worker(void *p)
{
	struct worker_arg *a = p;
	rdmaps_client *c = NULL;
	rdmaps_tensor *big, *small;
	rdmaps_mr *mr = NULL;
	struct rdmaps_tensor_desc db = { .name = "big", .length = BIG, .init_value = 100.0f, .lr = 0.5f };
	struct rdmaps_tensor_desc ds = { .name = "small", .length = SMALL, .init_value = -1.0f, .lr = 0.5f };
	float *g = malloc(BIG * sizeof(float)), gs[SMALL];
	int rc;

#define TRY(x)                                                                       \
	do {                                                                         \
		if ((rc = (x))) {                                                    \
			snprintf(a->where, sizeof(a->where), "%s", #x);              \
			goto out;                                                    \
		}                                                                    \
	} while (0)
	TRY(th_connect_token(&srv, TH_TOKEN, &c));
	TRY(rdmaps_declare(c, &db, &big));
	TRY(rdmaps_declare(c, &ds, &small));
	for (uint64_t i = 0; i < BIG; i++)
		g[i] = grad_of(a->w, i);
	for (int i = 0; i < SMALL; i++)
		gs[i] = grad_of(a->w, (uint64_t)i);
	if (a->w == 0) /* worker 0 zero-copy, the others through the bounce buffer */
		TRY(rdmaps_register(c, g, BIG * sizeof(float), &mr));
	for (int r = 0; r < ROUNDS; r++) {
		if (a->w == 2) { /* worker 2 uses the asynchronous form */
			rdmaps_op *op1, *op2;
			TRY(rdmaps_push_async(c, big, g, 0, &op1));
			TRY(rdmaps_push_async(c, small, gs, 0, &op2));
			TRY(rdmaps_wait(op1, 30000));
			TRY(rdmaps_wait(op2, 30000));
		} else {
			TRY(rdmaps_push(c, big, g, 0));
			TRY(rdmaps_push(c, small, gs, r == ROUNDS - 1 ? RDMAPS_PUSH_FOLDED : 0));
		}
	}
	TRY(rdmaps_flush(c, 30000));
out:
	a->rc = rc;
	rdmaps_deregister(mr);
	rdmaps_close(c);
	free(g);
	return NULL;
#undef TRY
}

Test(datapath, exact_folds_from_several_workers, .fini = stop_server, .timeout = 300)
{
	pthread_t t[W];
	struct worker_arg a[W];
	rdmaps_client *c;
	rdmaps_tensor *big, *small;
	float *v = malloc(BIG * sizeof(float)), vs[SMALL];
	struct rdmaps_server_stats st;

	th_server_start(&srv, "--chunk-elems", "1024", "--fold-threads", "2", NULL);
	for (int w = 0; w < W; w++) {
		a[w] = (struct worker_arg){ .w = w };
		pthread_create(&t[w], NULL, exact_worker, &a[w]);
	}
	for (int w = 0; w < W; w++) {
		pthread_join(t[w], NULL);
		cr_assert_eq(a[w].rc, 0, "worker %d: %s: %s", w, a[w].where, rdmaps_strerror(a[w].rc));
	}
	c = th_connect(&srv);
	cr_assert_eq(rdmaps_lookup(c, "big", &big), 0);
	cr_assert_eq(rdmaps_lookup(c, "small", &small), 0);
	cr_assert_eq(rdmaps_tensor_length(big), BIG);
	cr_assert_eq(rdmaps_pull(c, big, v, 0), 0);
	cr_assert_eq(rdmaps_pull(c, small, vs, 0), 0);
	/* sum over workers of (w+1) is 6; lr 0.5: exact in float32 */
	for (uint64_t i = 0; i < BIG; i++) {
		float want = 100.0f + 0.5f * ROUNDS * 6.0f * (float)(1 + i % 4);
		cr_assert_eq(v[i], want, "big[%lu] = %f, want %f", i, v[i], want);
	}
	for (int i = 0; i < SMALL; i++) {
		float want = -1.0f + 0.5f * ROUNDS * 6.0f * (float)(1 + i % 4);
		cr_assert_eq(vs[i], want, "small[%d] = %f, want %f", i, vs[i], want);
	}
	cr_assert_eq(rdmaps_server_stats(c, &st), 0);
	cr_assert_eq(st.dropped, 0);
	cr_assert_eq(st.folds, (uint64_t)W * ROUNDS * (4 + 1), "one fold per chunk slot");
	rdmaps_close(c);
	free(v);
}

/* ---- torn reads ------------------------------------------------------- */

#define TORN_CHUNK 1024
#define TORN_CHUNKS 16
#define TORN_LEN (TORN_CHUNK * TORN_CHUNKS)
#define PULLS 4000

static volatile int torn_stop;
static long pushes_done;

static void *torn_pusher(void *p)
{
	rdmaps_client *c;
	rdmaps_tensor *t;
	static float g[TORN_LEN];
	int *rc = p;

	for (int i = 0; i < TORN_LEN; i++)
		g[i] = -1.0f; /* lr 1: every fold adds exactly 1 to a whole chunk */
	if ((*rc = th_connect_token(&srv, TH_TOKEN, &c)))
		return NULL;
	if (!(*rc = rdmaps_lookup(c, "torn", &t)))
		while (!torn_stop && !(*rc = rdmaps_push(c, t, g, 0)))
			pushes_done++;
	if (!*rc)
		*rc = rdmaps_flush(c, 30000);
	rdmaps_close(c);
	return NULL;
}

/* two_copies_from: the server's --two-copies-from; "0" keeps one copy, so
 * the checksum alone stands between the READs and the folds. snap_after:
 * RDMAPS_SNAPSHOT_AFTER for the puller (NULL: the default) */
static void torn_race(const char *two_copies_from, const char *snap_after)
{
	static float v[TORN_LEN], prev[TORN_CHUNKS];
	rdmaps_client *c;
	rdmaps_tensor *t;
	pthread_t pusher;
	int prc = 0;
	struct rdmaps_client_stats cs, cs0;
	struct rdmaps_server_stats ss;
	uint64_t most = 0;

	memset(prev, 0, sizeof(prev));
	if (snap_after)
		setenv("RDMAPS_SNAPSHOT_AFTER", snap_after, 1);
	th_server_start(&srv, "--chunk-elems", "1024", "--fold-threads", "2", "--two-copies-from",
			two_copies_from, NULL);
	c = th_connect(&srv);
	unsetenv("RDMAPS_SNAPSHOT_AFTER"); /* the pusher pulls nothing */
	t = th_declare(c, "torn", TORN_LEN, 0.0f, 1.0f);
	torn_stop = 0;
	pushes_done = 0;
	pthread_create(&pusher, NULL, torn_pusher, &prc);
	for (int n = 0; n < PULLS; n++) {
		rdmaps_client_stats(c, &cs0);
		cr_assert_eq(rdmaps_pull(c, t, v, 0), 0, "pull %d", n);
		rdmaps_client_stats(c, &cs);
		if (cs.reads - cs0.reads > most)
			most = cs.reads - cs0.reads;
		for (int k = 0; k < TORN_CHUNKS; k++) {
			const float *ch = v + k * TORN_CHUNK;
			for (int i = 1; i < TORN_CHUNK; i++)
				cr_assert_eq(ch[i], ch[0], "pull %d chunk %d torn: [0]=%f [%d]=%f", n, k,
					     ch[0], i, ch[i]);
			cr_assert_geq(ch[0], prev[k], "pull %d chunk %d went back in time", n, k);
			prev[k] = ch[0];
		}
	}
	torn_stop = 1;
	pthread_join(pusher, NULL);
	cr_assert_eq(prc, 0, "pusher: %s", rdmaps_strerror(prc));
	rdmaps_client_stats(c, &cs);
	cr_assert_eq(rdmaps_server_stats(c, &ss), 0);
	printf("torn (two copies from %s B, snapshot after %s): %d pulls raced %ld pushes; %lu "
	       "chunk re-reads (%.3f%% of chunk reads), %lu snapshots (server: %lu), at most %lu "
	       "READs in one pull of %d chunks\n",
	       two_copies_from, snap_after ? snap_after : "2", PULLS, pushes_done,
	       (unsigned long)cs.pull_retries,
	       100.0 * (double)cs.pull_retries / (PULLS * TORN_CHUNKS), (unsigned long)cs.snapshots,
	       (unsigned long)ss.snapshots, (unsigned long)most, TORN_CHUNKS);
	cr_assert_gt(pushes_done, 0, "the folds must actually race the pulls");
	cr_assert_eq(cs.snapshots, ss.snapshots, "every snapshot asked was READ");
	if (snap_after) {
		bool one = !strcmp(two_copies_from, "0");
		/* the bound: a chunk is READ at most snap_after times from the
		 * model (here once, within a READ of up to 8 chunks), then once
		 * from its snapshot; two copies: a window whose validation found
		 * a chunk torn is first READ again whole, each chunk then checked
		 * on arrival (copies.c), one READ more per chunk */
		if (one) {
			/* each torn READ went to a snapshot, and no snapshot tore */
			cr_assert_eq(cs.snapshots, cs.pull_retries, "%lu torn READs, %lu snapshots",
				     (unsigned long)cs.pull_retries, (unsigned long)cs.snapshots);
			cr_assert_gt(cs.snapshots, 0, "one copy raced flat out and no READ tore");
		} else {
			/* pull_retries counts the window re-reads too */
			cr_assert_leq(cs.snapshots, cs.pull_retries, "%lu torn READs, %lu snapshots",
				      (unsigned long)cs.pull_retries, (unsigned long)cs.snapshots);
		}
		cr_assert_leq(most, (one ? 2u : 3u) * TORN_CHUNKS, "a pull of %d chunks took %lu READs",
			      TORN_CHUNKS, (unsigned long)most);
	}
	/* and after the dust settles, the model is exactly the number of pushes */
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	for (int i = 0; i < TORN_LEN; i++)
		cr_assert_eq(v[i], (float)pushes_done, "final [%d] = %f, pushes %ld", i, v[i], pushes_done);
	rdmaps_close(c);
}

Test(datapath, pulls_never_see_a_torn_chunk, .fini = stop_server, .timeout = 600)
{
	torn_race("0", NULL);
}

/* Every torn READ goes to a snapshot at once: the snapshots are whole, the
 * pulls bounded, and the model still exactly the pushes. */
Test(datapath, torn_chunks_are_read_from_a_snapshot, .fini = stop_server, .timeout = 600)
{
	torn_race("0", "1");
}

Test(datapath, torn_chunks_are_read_from_a_snapshot_two_copies, .fini = stop_server,
     .timeout = 600)
{
	torn_race("4096", "1");
}

Test(datapath, pulls_never_see_a_torn_chunk_two_copies, .fini = stop_server, .timeout = 600)
{
	torn_race("4096", NULL);
}

/* ---- READs that span chunks ------------------------------------------- */

#define SPAN_CHUNKS 21u /* 20 full chunks of 1024 floats and a partial one */
#define SPAN_LEN (20u * 1024u + 100u)

/* Every float distinct across chunk boundaries, so a READ that put one
 * chunk's pad or header into the floats (or shifted them) is caught. */
static float span_value(uint64_t i)
{
	return (float)(i % 4093u + 1u);
}

static void span_case(const char *two_copies_from)
{
	static float g[SPAN_LEN], v[SPAN_LEN], u[SPAN_LEN];
	struct rdmaps_client_stats s0, s1;
	rdmaps_client *c;
	rdmaps_tensor *t;
	rdmaps_mr *mr;

	th_server_start(&srv, "--chunk-elems", "1024", "--two-copies-from", two_copies_from, NULL);
	c = th_connect(&srv);
	t = th_declare(c, "span", SPAN_LEN, 0.0f, 1.0f);
	for (uint64_t i = 0; i < SPAN_LEN; i++)
		g[i] = -span_value(i);
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_register(c, v, sizeof(v), &mr), 0);
	rdmaps_client_stats(c, &s0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	rdmaps_client_stats(c, &s1);
	/* consecutive chunks share READs (8 per READ on rxe) */
	cr_assert_lt(s1.reads - s0.reads, SPAN_CHUNKS / 2, "%lu READs for %u chunks",
		     (unsigned long)(s1.reads - s0.reads), SPAN_CHUNKS);
	cr_assert_geq(s1.reads - s0.reads, (SPAN_CHUNKS + RDMAPS_READ_SPAN - 1) / RDMAPS_READ_SPAN);
	/* into the caller's registered buffer, and through the bounce buffers */
	cr_assert_eq(rdmaps_pull(c, t, u, 0), 0);
	for (uint64_t i = 0; i < SPAN_LEN; i++) {
		cr_assert_eq(v[i], span_value(i), "registered [%lu] = %f, want %f", i, v[i],
			     span_value(i));
		cr_assert_eq(u[i], span_value(i), "bounced [%lu] = %f, want %f", i, u[i],
			     span_value(i));
	}
	cr_assert_eq(rdmaps_pull(c, t, v, RDMAPS_PULL_RELAXED), 0);
	cr_assert_eq(memcmp(v, u, sizeof(v)), 0, "relaxed pull differs");
	rdmaps_deregister(mr);
	rdmaps_close(c);
}

Test(datapath, reads_span_chunks_one_copy, .fini = stop_server, .timeout = 120)
{
	span_case("0");
}

Test(datapath, reads_span_chunks_two_copies, .fini = stop_server, .timeout = 120)
{
	span_case("4096");
}

/* ---- a worker killed mid-push ---------------------------------------- */

#define KILL_LEN (4 * 1024) /* four chunks: one push group */

Test(datapath, killed_worker_folds_no_partial_push, .fini = stop_server, .timeout = 300)
{
	static float v[KILL_LEN];
	rdmaps_client *c;
	rdmaps_tensor *t;
	struct rdmaps_server_stats st;

	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	c = th_connect(&srv);
	t = th_declare(c, "victim", KILL_LEN, 0.0f, 1.0f);
	for (int round = 0; round < 3; round++) {
		int status;
		struct timespec ts = { 0, (100 + 70 * round) * 1000000L };
		pid_t pid = th_pusher(srv.addr, srv.port, TH_TOKEN, "victim", NULL);
		nanosleep(&ts, NULL);
		kill(pid, SIGKILL);
		waitpid(pid, &status, 0);
		cr_assert(WIFSIGNALED(status), "child exited by itself: %d", status);

		/* every element must hold the same whole number of pushes */
		cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
		for (int i = 0; i < KILL_LEN; i++)
			cr_assert_eq(v[i], v[0], "round %d: partial push folded: [0]=%f [%d]=%f", round,
				     v[0], i, v[i]);
		printf("killed worker round %d: %.0f whole pushes folded\n", round, v[0]);
	}
	/* the server goes on serving */
	static float g[KILL_LEN];
	float before = v[0];
	for (int i = 0; i < KILL_LEN; i++)
		g[i] = -1.0f;
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	cr_assert_eq(v[KILL_LEN - 1], before + 1.0f);
	cr_assert_eq(rdmaps_server_stats(c, &st), 0);
	cr_assert_geq(st.disconnects, 3, "each dead worker noticed and freed");
	cr_assert_eq(st.connections, 1, "only the live worker left");
	rdmaps_close(c);
}

/* ---- a worker closing right after its pushes ------------------------- */

#define CLOSE_LEN (4 * 1024)
#define CLOSE_ROUNDS 20
#define CLOSE_PUSHES 12 /* 48 slots: more than the ring, so some are in flight */

/*
 * rdmaps_push returns once the gradient is staged; a worker that closes
 * right after must not lose it. The server folds what a leaving connection
 * staged before freeing it: without that, the slots still waiting in the CQ
 * when DISCONNECTED arrives were dropped (seen as a BSP member's last clock
 * going missing under ASan timing).
 */
Test(datapath, staged_pushes_survive_an_immediate_close, .fini = stop_server, .timeout = 300)
{
	static float g[CLOSE_LEN], v[CLOSE_LEN];
	struct rdmaps_server_stats st;
	rdmaps_client *obs;
	rdmaps_tensor *t, *to;

	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	obs = th_connect(&srv);
	to = th_declare(obs, "closing", CLOSE_LEN, 0.0f, 1.0f);
	for (int i = 0; i < CLOSE_LEN; i++)
		g[i] = -1.0f;
	for (int r = 1; r <= CLOSE_ROUNDS; r++) {
		rdmaps_client *c = th_connect(&srv);
		cr_assert_eq(rdmaps_lookup(c, "closing", &t), 0);
		for (int k = 0; k < CLOSE_PUSHES; k++)
			cr_assert_eq(rdmaps_push(c, t, g, 0), 0, "round %d push %d", r, k);
		rdmaps_close(c); /* no flush: the pushes were staged, that is enough */
		/* the server has let the connection go (and folded what it held) */
		for (int w = 0; w < 1000; w++) {
			cr_assert_eq(rdmaps_server_stats(obs, &st), 0);
			if (st.connections == 1)
				break;
			usleep(10000);
		}
		cr_assert_eq(st.connections, 1, "round %d: closed worker still connected", r);
		cr_assert_eq(rdmaps_pull(obs, to, v, 0), 0);
		for (int i = 0; i < CLOSE_LEN; i++)
			cr_assert_eq(v[i], (float)(r * CLOSE_PUSHES), "round %d: [%d] = %.0f, want %d", r,
				     i, v[i], r * CLOSE_PUSHES);
	}
	rdmaps_close(obs);
}

/* ---- declarations ----------------------------------------------------- */

Test(datapath, declare_is_idempotent_and_conflicts_are_refused, .fini = stop_server, .timeout = 120)
{
	float init[100], got[100];
	rdmaps_client *a, *b;
	rdmaps_tensor *ta, *tb, *tx;
	struct rdmaps_tensor_desc d = { .name = "emb", .length = 100, .init = init, .lr = 0.1f };

	th_server_start(&srv, NULL);
	for (int i = 0; i < 100; i++)
		init[i] = (float)i * 0.25f;
	a = th_connect(&srv);
	b = th_connect(&srv);
	cr_assert_eq(rdmaps_declare(a, &d, &ta), 0);
	d.init = NULL; /* second declarer: attaches, the first values win */
	d.init_value = 9.0f;
	cr_assert_eq(rdmaps_declare(b, &d, &tb), 0);
	cr_assert_eq(rdmaps_pull(b, tb, got, 0), 0);
	for (int i = 0; i < 100; i++)
		cr_assert_eq(got[i], init[i], "[%d] %f", i, got[i]);
	d.length = 101;
	cr_assert_eq(rdmaps_declare(b, &d, &tx), RDMAPS_EEXIST, "other length");
	d.length = 100;
	d.lr = 0.2f;
	cr_assert_eq(rdmaps_declare(b, &d, &tx), RDMAPS_EEXIST, "other learning rate");
	cr_assert_eq(rdmaps_lookup(b, "nope", &tx), RDMAPS_ENOENT);
	cr_assert_eq(rdmaps_pull(a, ta, got, RDMAPS_PULL_RELAXED), 0, "relaxed pull works too");
	cr_assert_eq(got[99], init[99]);
	rdmaps_close(a);
	rdmaps_close(b);
}

/* ---- a server without inline sends ------------------------------------ */

/*
 * Some providers have no inline sends (or a small limit), and the server
 * then sends every credit and reply from registered memory: --max-inline 0
 * forces that path here. Credits must flow (a 4-slot ring, 40 pushes),
 * replies of every size arrive whole, and a peer sending requests without
 * waiting gets each reply intact or dropped and counted, never one
 * overwritten while the NIC still sends it.
 */
#include "rawclient.h"

Test(datapath, credits_and_replies_without_inline_sends, .fini = stop_server, .timeout = 300)
{
	static float init[BIG], g[BIG], v[BIG];
	struct rdmaps_server_stats before, after;
	rdmaps_client *c;
	rdmaps_tensor *t;
	struct raw r;
	int rc;

	th_server_start(&srv, "--max-inline", "0", "--chunk-elems", "1024", "--slots", "4", NULL);
	c = th_connect(&srv);
	for (uint64_t i = 0; i < BIG; i++) {
		init[i] = (float)(i % 9);
		g[i] = -1.0f;
	}
	struct rdmaps_tensor_desc d = { .name = "w", .length = BIG, .init = init, .lr = 0.5f };
	rc = rdmaps_declare(c, &d, &t);
	cr_assert_eq(rc, 0, "declare (initial values, seal): %s", rdmaps_strerror(rc));
	for (int i = 0; i < 40; i++)
		cr_assert_eq(rdmaps_push(c, t, g, 0), 0, "push %d waits for credits", i);
	cr_assert_eq(rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_flush(c, 10000), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	for (uint64_t i = 0; i < BIG; i++)
		cr_assert_eq(v[i], init[i] + 20.5f, "[%lu] = %g", i, (double)v[i]);
	cr_assert_eq(rdmaps_server_stats(c, &before), 0);

	struct rdmaps_wire_hello h = raw_hello(TH_TOKEN);
	cr_assert_eq(raw_connect(&r, srv.addr, srv.port, &h, sizeof(h)), 0);
	enum { BURST = 12 };
	for (uint32_t i = 0; i < BURST; i++) {
		struct rdmaps_msg_hdr m;
		rdmaps__msg_init(&m, RDMAPS_MSG_STATS, sizeof(m), 1000 + i);
		cr_assert_eq(raw_send(&r, &m, sizeof(m)), IBV_WC_SUCCESS);
	}
	bool seen[BURST] = { false };
	int got = 0;
	for (;;) {
		struct rdmaps_msg_stats_reply rep;
		uint8_t in[RDMAPS_MSG_MAX];
		int n = raw_recv(&r, in, sizeof(in), 2000);
		if (n < 0)
			break;
		cr_assert_eq(n, (int)sizeof(rep));
		memcpy(&rep, in, sizeof(rep));
		cr_assert_eq(rep.hdr.type, RDMAPS_MSG_STATS_REPLY);
		cr_assert(rep.hdr.req_id >= 1000 && rep.hdr.req_id < 1000 + BURST, "req_id %u",
			  rep.hdr.req_id);
		cr_assert(!seen[rep.hdr.req_id - 1000], "reply %u twice", rep.hdr.req_id);
		seen[rep.hdr.req_id - 1000] = true;
		cr_assert_eq(rep.stats.tensors, 1);
		got++;
	}
	raw_close(&r);
	cr_assert_eq(rdmaps_server_stats(c, &after), 0);
	cr_assert_eq(got + (int)(after.bad_messages - before.bad_messages), BURST,
		     "%d replies, %llu dropped and counted", got,
		     (unsigned long long)(after.bad_messages - before.bad_messages));
	cr_assert_geq(got, 1);
	rdmaps_close(c);
}
