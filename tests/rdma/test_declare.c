/*
 * The declaration life cycle over RDMA: every combination of initial values,
 * consistency model and optimizer folds each push once, as its optimizer
 * says; a push from a worker that is not a member of a BSP tensor's clocks
 * is refused; a creator killed between declare and seal hands its tensor to
 * the next declarer, and such a tensor is never checkpointed as ready; SSP
 * workers rejoining a restarted server go on from the restored clock.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>

#include "harness.h"
#include "rawclient.h"

#define LEN 2500u /* three chunks of 1024; ASP keeps two copies at this size */

static struct th_server srv;
static char dir[64];
static pid_t child;

static void cleanup(void)
{
	if (child > 0) {
		kill(child, SIGKILL);
		waitpid(child, NULL, 0);
		child = 0;
	}
	if (srv.pid)
		th_server_stop(&srv);
	th_rmdir(dir);
}

static const char *const opt_name[] = { "sgd", "momentum", "nesterov", "adagrad", "adam", "adamw" };
static const char *const mode_name[] = { "asp", "bsp", "ssp" };

/*
 * One step of each optimizer from zero state, as rdmaps.h states them with
 * the defaults (m 0.9, eps 1e-10 for Adagrad, 1e-8 for Adam, betas 0.9 and
 * 0.999, bias-corrected): the first step of momentum is plain SGD, Nesterov
 * takes (1 + m) g, Adagrad and Adam take g / (|g| + eps). The optimizers
 * themselves are checked against a double-precision reference in the unit
 * suite; this is about the path, so one step suffices.
 */
static double first_step(int opt, double p, double g, double lr)
{
	switch (opt) {
	case RDMAPS_OPT_SGD:
	case RDMAPS_OPT_MOMENTUM: return p - lr * g;
	case RDMAPS_OPT_NESTEROV: return p - lr * g * 1.9;
	case RDMAPS_OPT_ADAGRAD: return p - lr * g / (fabs(g) + 1e-10);
	default: return p - lr * g / (fabs(g) + 1e-8);
	}
}

static float init_of(uint32_t i)
{
	return 0.25f * (float)(i % 17) - 1.0f;
}

static float grad_of(uint32_t i, int step)
{
	return 0.01f * (float)((i * 7 + (unsigned)step) % 23) - 0.105f; /* never 0 */
}

Test(declare, every_init_consistency_optimizer_folds_once, .fini = cleanup, .timeout = 300)
{
	static float init[LEN], g[LEN], v[LEN], before[LEN];
	struct rdmaps_server_stats st;
	rdmaps_client *c;

	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	c = th_connect(&srv);
	for (uint32_t i = 0; i < LEN; i++)
		init[i] = init_of(i);
	for (int with_init = 0; with_init < 2; with_init++)
		for (int mode = RDMAPS_ASP; mode <= RDMAPS_SSP; mode++)
			for (int opt = RDMAPS_OPT_SGD; opt <= RDMAPS_OPT_ADAMW; opt++) {
				char name[64];
				rdmaps_tensor *t;
				snprintf(name, sizeof(name), "%s-%s-%s", with_init ? "init" : "value",
					 mode_name[mode], opt_name[opt]);
				struct rdmaps_tensor_desc d = {
					.name = name, .length = LEN, .init = with_init ? init : NULL,
					.init_value = 0.5f, .optimizer = (enum rdmaps_optimizer)opt,
					.lr = 0.1f, .consistency = (enum rdmaps_consistency)mode,
					.workers = mode == RDMAPS_ASP ? 0 : 1,
					.staleness = mode == RDMAPS_SSP ? 1 : 0,
				};
				int rc = rdmaps_declare(c, &d, &t);
				cr_assert_eq(rc, 0, "%s: declare: %s", name, rdmaps_strerror(rc));
				cr_assert_eq(rdmaps_pull(c, t, before, 0), 0, "%s: first pull", name);
				for (uint32_t i = 0; i < LEN; i++)
					cr_assert_eq(before[i], with_init ? init[i] : 0.5f, "%s [%u]", name, i);
				for (int step = 0; step < 2; step++) {
					for (uint32_t i = 0; i < LEN; i++)
						g[i] = grad_of(i, step);
					rc = rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED);
					cr_assert_eq(rc, 0, "%s: push %d: %s", name, step, rdmaps_strerror(rc));
					cr_assert(th_server_alive(&srv), "%s: the server died", name);
					rc = rdmaps_pull(c, t, v, 0);
					cr_assert_eq(rc, 0, "%s: pull %d: %s", name, step, rdmaps_strerror(rc));
					for (uint32_t i = 0; i < LEN && step == 0; i++) {
						double want = first_step(opt, before[i], g[i], 0.1);
						cr_assert(fabs(v[i] - want) <= 1e-5 * (fabs(want) + 1.0),
							  "%s [%u] = %.7g after one push, want %.7g", name, i,
							  (double)v[i], want);
					}
					/* the second push moves every element again, by a finite step */
					for (uint32_t i = 0; i < LEN && step == 1; i++)
						cr_assert(isfinite(v[i]) && v[i] != before[i], "%s [%u]", name, i);
					memcpy(before, v, sizeof(v));
				}
				cr_assert_eq(rdmaps_tensor_clock(t), mode == RDMAPS_ASP ? 0u : 2u, "%s", name);
			}
	cr_assert_eq(rdmaps_server_stats(c, &st), 0);
	cr_assert_eq(st.dropped, 0, "no push was refused");
	cr_assert_eq(st.folds, 36u * 2u * 3u + 18u * 3u, "two pushes of three chunks, plus the "
		     "initial values of the 18 tensors declared with them");
	rdmaps_close(c);
}

/* A raw peer whose declaration of a BSP tensor came back "not ready" (a clock
 * is under way) can READ the tensor but is not a member: its push is
 * refused and counted, the server lives, the clock completes without it. */
Test(declare, bsp_push_from_a_non_member_is_refused, .fini = cleanup, .timeout = 300)
{
	static float g[LEN], v[LEN];
	struct rdmaps_server_stats before, after;
	struct rdmaps_msg_tensor_reply rep;
	rdmaps_client *a, *b;
	rdmaps_tensor *ta, *tb;
	struct raw r;
	struct rdmaps_tensor_desc d = { .name = "bsp", .length = LEN, .init_value = 1.0f,
					.lr = 1.0f, .consistency = RDMAPS_BSP, .workers = 2 };

	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	a = th_connect(&srv);
	b = th_connect(&srv);
	cr_assert_eq(rdmaps_declare(a, &d, &ta), 0);
	cr_assert_eq(rdmaps_declare(b, &d, &tb), 0);
	for (uint32_t i = 0; i < LEN; i++)
		g[i] = 0.5f;
	cr_assert_eq(rdmaps_push(a, ta, g, 0), 0); /* clock 0 waits for b */
	cr_assert_eq(rdmaps_flush(a, 10000), 0);

	struct rdmaps_wire_hello h = raw_hello(TH_TOKEN);
	cr_assert_eq(raw_connect(&r, srv.addr, srv.port, &h, sizeof(h)), 0);
	struct rdmaps_msg_declare m = raw_declare_msg("bsp", LEN);
	m.init_value = 1.0f;
	m.cons.mode = RDMAPS_BSP;
	m.cons.workers = 2;
	cr_assert_eq(raw_request(&r, &m, sizeof(m), &rep), 0);
	cr_assert_eq(rep.ready, 0, "a clock is under way: not joined");
	cr_assert_eq(rdmaps_server_stats(a, &before), 0);
	cr_assert_eq(raw_slot(&r, rep.tensor_id, 1, 0, 1024, 100.0f, 0), IBV_WC_SUCCESS);
	for (int i = 0; i < 200; i++) { /* the refusal is counted once the slot is handled */
		cr_assert_eq(rdmaps_server_stats(a, &after), 0);
		if (after.dropped > before.dropped)
			break;
		usleep(10000);
	}
	cr_assert_eq(after.dropped, before.dropped + 1, "the non-member's push is refused");
	cr_assert(th_server_alive(&srv));
	raw_close(&r);

	cr_assert_eq(rdmaps_push(b, tb, g, RDMAPS_PUSH_FOLDED), 0);
	cr_assert_eq(rdmaps_pull(a, ta, v, 0), 0);
	for (uint32_t i = 0; i < LEN; i++)
		cr_assert_eq(v[i], 0.0f, "[%u] = %g: 1 - (0.5 + 0.5), nothing of the raw push", i,
			     (double)v[i]);
	rdmaps_close(a);
	rdmaps_close(b);
}

/* A creator that dies between declare and seal (tests/rdma/creator.c). */
static pid_t creator_child(const char *name, float staged)
{
	char len[16], value[16];

	snprintf(len, sizeof(len), "%u", LEN);
	snprintf(value, sizeof(value), "%g", (double)staged);
	return th_creator(srv.addr, srv.port, TH_TOKEN, name, len, value, NULL);
}

static void kill_child(void)
{
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	child = 0;
}

static void assert_values(rdmaps_client *c, rdmaps_tensor *t, const float *want, float value)
{
	static float v[LEN];
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	for (uint32_t i = 0; i < LEN; i++)
		cr_assert_eq(v[i], want ? want[i] : value, "[%u] = %g", i, (double)v[i]);
}

Test(declare, creator_killed_before_seal_hands_over, .fini = cleanup, .timeout = 300)
{
	static float init[LEN];
	rdmaps_client *c;
	rdmaps_tensor *t;
	int rc;

	th_mkdtemp(dir, sizeof(dir), "declare");
	th_server_start(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	c = th_connect(&srv);
	for (uint32_t i = 0; i < LEN; i++)
		init[i] = init_of(i);

	/* dead creator, next declarer has initial values: they are the tensor's */
	child = creator_child("handed", 7.0f);
	kill_child();
	struct rdmaps_tensor_desc d = { .name = "handed", .length = LEN, .init = init, .lr = 1.0f };
	rc = rdmaps_declare(c, &d, &t);
	cr_assert_eq(rc, 0, "declare after the creator died: %s", rdmaps_strerror(rc));
	assert_values(c, t, init, 0);

	/* dead creator, next declarer without initial values: its init_value */
	child = creator_child("valued", 7.0f);
	kill_child();
	struct rdmaps_tensor_desc d2 = { .name = "valued", .length = LEN, .init_value = 3.0f,
					 .lr = 1.0f };
	cr_assert_eq(rdmaps_declare(c, &d2, &t), 0);
	assert_values(c, t, NULL, 3.0f);

	/* a creator alive and unsealed at a checkpoint: its tensor is left out */
	child = creator_child("pending", 7.0f);
	cr_assert_eq(rdmaps_checkpoint(c, 10000), 0);
	th_server_kill9(&srv);
	kill_child();
	th_server_restart(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	rdmaps_close(c);
	c = th_connect(&srv);
	cr_assert_eq(rdmaps_lookup(c, "pending", &t), RDMAPS_ENOENT,
		     "an unsealed tensor is never restored as ready");
	cr_assert_eq(rdmaps_lookup(c, "handed", &t), 0);
	assert_values(c, t, init, 0);
	cr_assert_eq(rdmaps_lookup(c, "valued", &t), 0);
	assert_values(c, t, NULL, 3.0f);
	rdmaps_close(c);
}

/* Two SSP workers, a checkpoint, a restart: both rejoin at the restored
 * clock and go on in step (a first rejoiner at 0 stalled the other). */
Test(declare, ssp_workers_rejoin_a_restored_clock, .fini = cleanup, .timeout = 300)
{
	static float g[LEN], v[LEN];
	struct rdmaps_tensor_desc d = { .name = "ssp", .length = LEN, .lr = 1.0f,
					.consistency = RDMAPS_SSP, .staleness = 1, .workers = 2 };
	rdmaps_client *w[2];
	rdmaps_tensor *t[2];
	int rc;

	th_mkdtemp(dir, sizeof(dir), "declare");
	th_server_start(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	for (int k = 0; k < 2; k++) {
		w[k] = th_connect(&srv);
		cr_assert_eq(rdmaps_declare(w[k], &d, &t[k]), 0);
	}
	for (uint32_t i = 0; i < LEN; i++)
		g[i] = -1.0f;
	for (int clock = 0; clock < 5; clock++)
		for (int k = 0; k < 2; k++) {
			cr_assert_eq(rdmaps_push(w[k], t[k], g, RDMAPS_PUSH_FOLDED), 0);
			cr_assert_eq(rdmaps_pull(w[k], t[k], v, 0), 0);
		}
	cr_assert_eq(rdmaps_checkpoint(w[0], 10000), 0);
	th_server_kill9(&srv);
	th_server_restart(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	for (int clock = 0; clock < 5; clock++)
		for (int k = 0; k < 2; k++) {
			rc = rdmaps_pull(w[k], t[k], v, 0);
			/* the first op finds the old connection dead; the next reconnects */
			if (clock == 0 && rc == RDMAPS_EDISCONNECTED)
				rc = rdmaps_pull(w[k], t[k], v, 0);
			cr_assert_eq(rc, 0, "worker %d, clock %d after the restart: %s", k, clock,
				     rdmaps_strerror(rc));
			cr_assert_eq(rdmaps_tensor_clock(t[k]), 5u + (unsigned)clock,
				     "worker %d goes on from the restored clock", k);
			rc = rdmaps_push(w[k], t[k], g, RDMAPS_PUSH_FOLDED);
			cr_assert_eq(rc, 0, "worker %d push: %s", k, rdmaps_strerror(rc));
		}
	cr_assert_eq(rdmaps_flush(w[0], 10000), RDMAPS_EDISCONNECTED, "the restart is reported");
	cr_assert_eq(rdmaps_pull(w[0], t[0], v, 0), 0);
	for (uint32_t i = 0; i < LEN; i++)
		cr_assert_eq(v[i], 20.0f, "[%u] = %g: 10 pushes of 1 before, 10 after", i, (double)v[i]);
	for (int k = 0; k < 2; k++)
		rdmaps_close(w[k]);
}

/* A declarer that arrives while the creator is alive, and is still waiting
 * when the creator dies: the server hands the tensor to its next DECLARE,
 * so the waiting declarer must keep declaring, not only look. */
struct waiter {
	rdmaps_client *c;
	const float *init;
	rdmaps_tensor *t;
	int rc;
};

static void *declare_waiting(void *arg)
{
	struct waiter *w = arg;
	struct rdmaps_tensor_desc d = { .name = "waited", .length = LEN, .init = w->init,
					.lr = 1.0f };

	w->rc = rdmaps_declare(w->c, &d, &w->t);
	return NULL;
}

Test(declare, a_declarer_waiting_when_the_creator_dies_takes_over, .fini = cleanup,
     .timeout = 300)
{
	static float init[LEN];
	struct waiter w = { .init = init };
	pthread_t th;

	th_mkdtemp(dir, sizeof(dir), "declare");
	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	w.c = th_connect(&srv);
	for (uint32_t i = 0; i < LEN; i++)
		init[i] = init_of(i);
	child = creator_child("waited", 7.0f);
	cr_assert_eq(pthread_create(&th, NULL, declare_waiting, &w), 0);
	usleep(500000); /* the declarer is waiting for the live creator */
	kill_child();
	pthread_join(th, NULL);
	cr_assert_eq(w.rc, 0, "declare while the creator died: %s", rdmaps_strerror(w.rc));
	assert_values(w.c, w.t, init, 0);
	rdmaps_close(w.c);
}
