/*
 * Least privilege and bad input, driven by a raw verbs client that speaks
 * the wire protocol by hand: it cannot write the model or another worker's
 * ring with real or forged rkeys; malformed control messages and staged
 * slots are refused and counted; a wrong token or version is rejected; and
 * through all of it the server keeps serving a well-behaved worker.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "checksum.h"
#include "chunk.h"
#include "half.h"
#include "harness.h"
#include "rawclient.h"
#include "verbs.h" /* rdmaps__now_ns */

static struct th_server srv;

static void stop_server(void)
{
	th_server_stop(&srv);
}

static void assert_model(rdmaps_client *c, rdmaps_tensor *t, uint64_t len, float want)
{
	static float v[4096];
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	for (uint64_t i = 0; i < len; i++)
		cr_assert_eq(v[i], want, "model[%lu] = %f, want %f", i, v[i], want);
}

static void raw_open(struct raw *r)
{
	struct rdmaps_wire_hello h = raw_hello(TH_TOKEN);
	int rc = raw_connect(r, srv.addr, srv.port, &h, sizeof(h));
	cr_assert_eq(rc, 0, "raw connect: %s", rdmaps_strerror(rc));
}

/* A write that must be refused by the remote NIC, on a fresh connection. */
static void assert_write_refused(uint64_t addr, uint32_t rkey, const char *what)
{
	struct raw r;
	raw_open(&r);
	memset(r.buf + RAW_DATA_OFF, 0x7f, 64);
	int st = raw_rdma(&r, IBV_WR_RDMA_WRITE, addr, rkey, 64, 0);
	cr_assert_neq(st, IBV_WC_SUCCESS, "%s: RDMA WRITE was allowed", what);
	printf("isolation: %s -> %s\n", what, ibv_wc_status_str((enum ibv_wc_status)st));
	raw_close(&r);
}

/*
 * The isolation checks, against a server started with --registration mode:
 * shared (one PD, the ring through a type-2 window bound to its QP) or
 * per-worker (a PD per connection). shared_want: what the server must
 * report it runs, so a silent fallback fails the test.
 */
static void isolation(const char *mode, uint64_t shared_want)
{
	struct rdmaps_msg_tensor_reply rep;
	struct rdmaps_server_stats st;
	struct raw a, b;
	rdmaps_client *good;
	rdmaps_tensor *t;
	uint64_t ring_a, ring_b;

	th_server_start(&srv, "--chunk-elems", "1024", "--registration", mode, NULL);
	good = th_connect(&srv);
	t = th_declare(good, "model", 2048, 5.0f, 1.0f);
	cr_assert_eq(rdmaps_server_stats(good, &st), 0);
	cr_assert_eq(st.shared_devices, shared_want, "--registration %s: %lu devices shared", mode,
		     (unsigned long)st.shared_devices);
	cr_assert_eq(st.memory_windows, shared_want, "one window per connection when shared");

	raw_open(&a);
	cr_assert_eq(raw_declare(&a, "model", 2048, &rep), 0);
	/* positive controls: the raw client can READ the model and WRITE its own
	 * ring, up to its last byte */
	ring_a = (uint64_t)a.w.slot_count * a.w.slot_size;
	cr_assert_eq(raw_rdma(&a, IBV_WR_RDMA_READ, rep.remote_addr, rep.rkey, 256, 0), IBV_WC_SUCCESS);
	cr_assert_eq(raw_rdma(&a, IBV_WR_RDMA_WRITE, a.w.staging_addr, a.w.staging_rkey, 64, 0),
		     IBV_WC_SUCCESS, "own staging ring must be writable");
	cr_assert_eq(raw_rdma(&a, IBV_WR_RDMA_WRITE, a.w.staging_addr + ring_a - 64, a.w.staging_rkey,
			      64, 0),
		     IBV_WC_SUCCESS, "the end of its own ring must be writable");
	raw_open(&b);
	ring_b = (uint64_t)b.w.slot_count * b.w.slot_size;

	assert_write_refused(rep.remote_addr, rep.rkey, "write model with its read rkey");
	assert_write_refused(rep.remote_addr + 64, rep.rkey, "write model data with its read rkey");
	assert_write_refused(b.w.staging_addr, b.w.staging_rkey, "write another worker's ring");
	assert_write_refused(b.w.staging_addr + ring_b - 64, b.w.staging_rkey,
			     "write the end of another worker's ring");
	assert_write_refused(rep.remote_addr, a.w.staging_rkey, "write model with own ring's rkey");
	{
		/* a's own QP: b's key on b's ring, b's key on a's ring, and a's
		 * key just past a's ring (each refusal breaks that QP: fresh ones) */
		struct raw x;
		raw_open(&x);
		memset(x.buf + RAW_DATA_OFF, 0x7f, 64);
		int st1 = raw_rdma(&x, IBV_WR_RDMA_WRITE, x.w.staging_addr, b.w.staging_rkey, 64, 0);
		cr_assert_neq(st1, IBV_WC_SUCCESS, "another worker's ring rkey on its own ring");
		raw_close(&x);
		raw_open(&x);
		uint64_t ring_x = (uint64_t)x.w.slot_count * x.w.slot_size;
		int st2 = raw_rdma(&x, IBV_WR_RDMA_WRITE, x.w.staging_addr + ring_x - 32,
				   x.w.staging_rkey, 64, 0);
		cr_assert_neq(st2, IBV_WC_SUCCESS, "a write across the end of its own ring");
		raw_close(&x);
		raw_open(&x);
		int st3 = raw_rdma(&x, IBV_WR_RDMA_WRITE, x.w.staging_addr + ring_x, x.w.staging_rkey,
				   64, 0);
		cr_assert_neq(st3, IBV_WC_SUCCESS, "a write just past its own ring");
		raw_close(&x);
		raw_open(&x);
		int st4 = raw_atomic(&x, rep.remote_addr + 64, rep.rkey);
		cr_assert_neq(st4, IBV_WC_SUCCESS, "an atomic on the model with its read rkey");
		raw_close(&x);
		printf("isolation (%s): foreign rkey %s, across the end %s, past the end %s, atomic %s\n",
		       mode, ibv_wc_status_str((enum ibv_wc_status)st1),
		       ibv_wc_status_str((enum ibv_wc_status)st2),
		       ibv_wc_status_str((enum ibv_wc_status)st3),
		       ibv_wc_status_str((enum ibv_wc_status)st4));
	}
	const uint32_t forged[] = { rep.rkey + 1, rep.rkey - 1, rep.rkey ^ 0x100, b.w.staging_rkey + 1,
				    b.w.staging_rkey - 1, b.w.staging_rkey ^ 0xff,
				    b.w.staging_rkey ^ 0x100, a.w.staging_rkey - 1, 0 };
	for (unsigned i = 0; i < sizeof(forged) / sizeof(forged[0]); i++) {
		char what[64];
		snprintf(what, sizeof(what), "forged rkey %#x on the model", forged[i]);
		assert_write_refused(rep.remote_addr, forged[i], what);
		snprintf(what, sizeof(what), "forged rkey %#x on another ring", forged[i]);
		assert_write_refused(b.w.staging_addr, forged[i], what);
	}
	/* b was never written to by anyone: its ring still works for b */
	cr_assert_eq(raw_rdma(&b, IBV_WR_RDMA_WRITE, b.w.staging_addr, b.w.staging_rkey, 64, 0),
		     IBV_WC_SUCCESS, "the attacked worker's own ring must still be writable");
	raw_close(&a);
	raw_close(&b);

	/* model untouched; the well-behaved worker carries on */
	assert_model(good, t, 2048, 5.0f);
	static float g[2048];
	for (int i = 0; i < 2048; i++)
		g[i] = 1.0f;
	cr_assert_eq(rdmaps_push(good, t, g, RDMAPS_PUSH_FOLDED), 0);
	assert_model(good, t, 2048, 4.0f);
	rdmaps_close(good);
}

Test(security, model_and_other_rings_are_not_writable, .fini = stop_server, .timeout = 400)
{
	isolation("shared", 1);
}

Test(security, model_and_other_rings_are_not_writable_per_worker, .fini = stop_server,
     .timeout = 400)
{
	isolation("per-worker", 0);
}

/*
 * What 9 workers reading one 16 MiB tensor cost the server in registered
 * (pinned) memory, per scheme: shared registers the tensor once, so the
 * eight after the first add only their rings; per-worker registers it for
 * each of them. Both counted by the server and read from its VmPin.
 */
static void memory_per_worker(const char *mode, bool shared)
{
	enum { N = 9, LEN = 4u << 20 }; /* floats: 16 MiB */
	rdmaps_client *c[N];
	struct rdmaps_server_stats one = { 0 }, all;
	uint64_t pin_one = 0, pin_all, model = (uint64_t)LEN * 4, per_conn;

	th_server_start(&srv, "--registration", mode, "--two-copies-from", "0", NULL);
	for (int i = 0; i < N; i++) {
		c[i] = th_connect(&srv);
		rdmaps_tensor *t = th_declare(c[i], "big", LEN, 0.5f, 1.0f);
		(void)t;
		if (i == 0) {
			cr_assert_eq(rdmaps_server_stats(c[0], &one), 0);
			pin_one = th_server_pinned_kib(&srv) * 1024;
		}
	}
	cr_assert_eq(rdmaps_server_stats(c[0], &all), 0);
	pin_all = th_server_pinned_kib(&srv) * 1024;
	per_conn = (all.registered_bytes - one.registered_bytes) / (N - 1);
	printf("registration %s: %d workers of a %llu MiB tensor: registered %llu -> %llu MiB, "
	       "VmPin %llu -> %llu MiB, %llu MRs, %llu windows\n",
	       mode, N, (unsigned long long)(model >> 20),
	       (unsigned long long)(one.registered_bytes >> 20),
	       (unsigned long long)(all.registered_bytes >> 20), (unsigned long long)(pin_one >> 20),
	       (unsigned long long)(pin_all >> 20), (unsigned long long)all.memory_regions,
	       (unsigned long long)all.memory_windows);
	cr_assert_geq(one.registered_bytes, model, "the tensor is registered");
	if (shared) {
		/* a ring (16 slots of 64 KiB) and its buffers: far below the model */
		cr_assert_lt(per_conn, model / 8, "a worker added %llu B of registrations",
			     (unsigned long long)per_conn);
		cr_assert_lt(pin_all - pin_one, (N - 1) * (model / 8), "VmPin grew %llu B",
			     (unsigned long long)(pin_all - pin_one));
		cr_assert_eq(all.memory_windows, N);
	} else {
		cr_assert_geq(per_conn, model, "per worker: the tensor again for each");
		cr_assert_geq(pin_all - pin_one, (N - 1) * model * 9 / 10, "VmPin grew %llu B",
			      (unsigned long long)(pin_all - pin_one));
		cr_assert_eq(all.memory_windows, 0);
	}
	for (int i = 0; i < N; i++)
		rdmaps_close(c[i]);
}

Test(security, shared_registration_pins_the_model_once, .fini = stop_server, .timeout = 300)
{
	memory_per_worker("shared", true);
}

Test(security, per_worker_registration_pins_it_per_worker, .fini = stop_server, .timeout = 300)
{
	memory_per_worker("per-worker", false);
}

static int expect_status(struct raw *r, const void *msg, size_t len)
{
	uint8_t in[RDMAPS_MSG_MAX];
	struct rdmaps_msg_status_reply s;

	cr_assert_eq(raw_send(r, msg, len), IBV_WC_SUCCESS);
	int n = raw_recv(r, in, sizeof(in), 20000);
	cr_assert_eq(n, (int)sizeof(s), "expected a status reply, got %d bytes", n);
	memcpy(&s, in, sizeof(s));
	cr_assert_eq(s.hdr.type, RDMAPS_MSG_STATUS_REPLY);
	return s.status;
}

Test(security, malformed_control_messages_get_errors, .fini = stop_server, .timeout = 300)
{
	struct rdmaps_server_stats before, after;
	struct rdmaps_msg_declare d = { 0 };
	struct rdmaps_msg_lookup l = { 0 };
	struct rdmaps_msg_seal s = { 0 };
	struct rdmaps_msg_tensor_reply rep;
	uint8_t junk[2 * RDMAPS_MSG_MAX];
	rdmaps_client *good;
	rdmaps_tensor *t;
	struct raw r;

	th_server_start(&srv, NULL);
	good = th_connect(&srv);
	t = th_declare(good, "w", 512, 2.0f, 1.0f);
	cr_assert_eq(rdmaps_server_stats(good, &before), 0);
	raw_open(&r);

	memset(junk, 0xab, sizeof(junk));
	cr_assert_eq(expect_status(&r, junk, 8), RDMAPS_EPROTO, "short message");
	cr_assert_eq(expect_status(&r, junk, 200), RDMAPS_EPROTO, "garbage");
	rdmaps__msg_init(&d.hdr, RDMAPS_MSG_DECLARE, sizeof(d), 1);
	d.hdr.version = RDMAPS_PROTO_VERSION + 1;
	cr_assert_eq(expect_status(&r, &d, sizeof(d)), RDMAPS_EVERSION, "wrong protocol version");
	rdmaps__msg_init(&d.hdr, 0x42, sizeof(d), 1);
	cr_assert_eq(expect_status(&r, &d, sizeof(d)), RDMAPS_EPROTO, "unknown type");
	rdmaps__msg_init(&d.hdr, RDMAPS_MSG_TENSOR_REPLY, sizeof(rep), 1);
	cr_assert_eq(expect_status(&r, &d, sizeof(rep)), RDMAPS_EPROTO, "a reply sent as a request");
	rdmaps__msg_init(&d.hdr, RDMAPS_MSG_DECLARE, sizeof(d), 1);
	snprintf(d.optimizer, sizeof(d.optimizer), "sgd");
	snprintf(d.name, sizeof(d.name), "huge");
	d.length = 1ull << 62;
	cr_assert_eq(expect_status(&r, &d, sizeof(d)), RDMAPS_ERANGE, "absurd length");
	d.length = 0;
	cr_assert_eq(expect_status(&r, &d, sizeof(d)), RDMAPS_ERANGE, "zero length");
	d.length = 10;
	snprintf(d.optimizer, sizeof(d.optimizer), "rmsprop9");
	cr_assert_eq(expect_status(&r, &d, sizeof(d)), RDMAPS_EINVAL, "unknown optimizer");
	snprintf(d.optimizer, sizeof(d.optimizer), "sgd");
	memset(d.name, 'x', sizeof(d.name)); /* unterminated */
	cr_assert_eq(expect_status(&r, &d, sizeof(d)), RDMAPS_EINVAL, "unterminated name");
	snprintf(d.name, sizeof(d.name), "w");
	d.length = 513;
	cr_assert_eq(expect_status(&r, &d, sizeof(d)), RDMAPS_EEXIST, "conflicting declaration");
	rdmaps__msg_init(&l.hdr, RDMAPS_MSG_LOOKUP, sizeof(l), 2);
	snprintf(l.name, sizeof(l.name), "missing");
	cr_assert_eq(expect_status(&r, &l, sizeof(l)), RDMAPS_ENOENT, "unknown tensor");
	rdmaps__msg_init(&s.hdr, RDMAPS_MSG_SEAL, sizeof(s), 3);
	s.tensor_id = 12345;
	cr_assert_eq(expect_status(&r, &s, sizeof(s)), RDMAPS_ENOENT, "seal of an unknown tensor id");
	cr_assert_eq(raw_declare(&r, "w", 512, &rep), 0);
	s.tensor_id = rep.tensor_id;
	cr_assert_eq(expect_status(&r, &s, sizeof(s)), RDMAPS_EPROTO, "seal of another's tensor");

	/* an oversized message kills only that connection */
	raw_send(&r, junk, RDMAPS_MSG_MAX + 512);
	raw_close(&r);

	assert_model(good, t, 512, 2.0f);
	cr_assert_eq(rdmaps_server_stats(good, &after), 0);
	cr_assert_geq(after.bad_messages - before.bad_messages, 11, "bad messages counted: %lu",
		      (unsigned long)(after.bad_messages - before.bad_messages));
	rdmaps_close(good);
}

Test(security, bad_and_replayed_slots_are_never_folded, .fini = stop_server, .timeout = 300)
{
	struct rdmaps_msg_tensor_reply rep;
	struct rdmaps_server_stats before, after;
	rdmaps_client *good;
	rdmaps_tensor *t;
	struct raw r;

	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	good = th_connect(&srv);
	t = th_declare(good, "m", 1024, 10.0f, 1.0f);
	cr_assert_eq(rdmaps_server_stats(good, &before), 0);
	raw_open(&r);
	cr_assert_eq(raw_declare(&r, "m", 1024, &rep), 0);

	/* seq 1, valid: folded (10 - 1 = 9) */
	cr_assert_eq(raw_slot(&r, rep.tensor_id, 1, 0, 1024, 1.0f, 0), IBV_WC_SUCCESS);
	/* replay of seq 1, unknown flags (the server's own "refused" mark
	 * among them), a wrong count, an unknown tensor, a gap */
	cr_assert_eq(raw_slot(&r, rep.tensor_id, 1, 0, 1024, 1.0f, 0), IBV_WC_SUCCESS);
	cr_assert_eq(raw_slot(&r, rep.tensor_id, 2, 0, 1024, 1.0f, 0x8080), IBV_WC_SUCCESS);
	cr_assert_eq(raw_slot(&r, rep.tensor_id, 3, 0, 1000, 1.0f, 0), IBV_WC_SUCCESS);
	cr_assert_eq(raw_slot(&r, 999, 4, 0, 1024, 1.0f, 0), IBV_WC_SUCCESS);
	cr_assert_eq(raw_slot(&r, rep.tensor_id, 9, 0, 1024, 1.0f, 0), IBV_WC_SUCCESS);
	/* the next in-order slot is still accepted: 9 - 2 = 7 */
	cr_assert_eq(raw_slot(&r, rep.tensor_id, 5, 0, 1024, 2.0f, 0), IBV_WC_SUCCESS);
	for (int i = 0; i < 200 && __atomic_load_n(&r.credit[1], __ATOMIC_ACQUIRE) < 6; i++)
		usleep(10000);
	cr_assert_eq(r.credit[1], 6, "credit: consumed up to seq 5 (got %lu)", (unsigned long)r.credit[1]);
	raw_close(&r);

	assert_model(good, t, 1024, 7.0f);
	cr_assert_eq(rdmaps_server_stats(good, &after), 0);
	cr_assert_eq(after.folds - before.folds, 2);
	cr_assert_eq(after.dropped - before.dropped, 5);
	rdmaps_close(good);
}

Test(security, wrong_token_or_version_is_rejected, .fini = stop_server, .timeout = 120)
{
	rdmaps_client *c = NULL;
	struct rdmaps_server_stats st;
	struct raw r;

	th_server_start(&srv, NULL);
	cr_assert_eq(th_connect_token(&srv, "wrong", &c), RDMAPS_EAUTH);
	cr_assert_null(c);
	cr_assert_eq(th_connect_token(&srv, NULL, &c), RDMAPS_EAUTH, "missing token");
	cr_assert_eq(th_connect_token(&srv, TH_TOKEN "x", &c), RDMAPS_EAUTH, "longer token");
	struct rdmaps_wire_hello h = raw_hello(TH_TOKEN);
	h.version = RDMAPS_PROTO_VERSION + 1;
	cr_assert_eq(raw_connect(&r, srv.addr, srv.port, &h, sizeof(h)), RDMAPS_EVERSION);
	raw_close(&r);
	h = raw_hello(TH_TOKEN);
	/* the CM pads private data to its fixed size: a short hello arrives
	 * with its token zeroed, so it is refused as unauthenticated */
	cr_assert_eq(raw_connect(&r, srv.addr, srv.port, &h, 8), RDMAPS_EAUTH, "short hello");
	raw_close(&r);
	h.magic = 0;
	cr_assert_eq(raw_connect(&r, srv.addr, srv.port, &h, sizeof(h)), RDMAPS_EPROTO, "bad magic");
	raw_close(&r);

	c = th_connect(&srv);
	cr_assert_eq(rdmaps_server_stats(c, &st), 0);
	cr_assert_eq(st.auth_failures, 4);
	cr_assert_eq(st.connections, 1);
	rdmaps_close(c);
}

Test(security, limits_are_clear_errors, .fini = stop_server, .timeout = 120)
{
	rdmaps_client *a, *b, *c = NULL;
	rdmaps_tensor *t;

	th_server_start(&srv, "--max-workers", "2", "--max-tensors", "2", "--max-tensor-mb", "1",
			"--max-total-mb", "2", NULL);
	a = th_connect(&srv);
	b = th_connect(&srv);
	cr_assert_eq(th_connect_token(&srv, TH_TOKEN, &c), RDMAPS_ELIMIT, "third worker");
	cr_assert_null(c);
	/* 1 MiB per tensor, two copies counted (ASP, >= 4 KiB): 300k floats
	 * is over, and so is 150k (600 KB twice); 100k fits */
	cr_assert_eq(rdmaps_declare(a, &(struct rdmaps_tensor_desc){ .name = "big", .length = 300000,
								     .lr = 1.0f }, &t),
		     RDMAPS_ERANGE);
	cr_assert_eq(rdmaps_declare(a, &(struct rdmaps_tensor_desc){ .name = "big2", .length = 150000,
								     .lr = 1.0f }, &t),
		     RDMAPS_ERANGE, "the second copy counts against --max-tensor-mb");
	cr_assert_eq(rdmaps_declare(a, &(struct rdmaps_tensor_desc){ .name = "t1", .length = 100000,
								     .lr = 1.0f }, &t), 0);
	cr_assert_eq(rdmaps_declare(a, &(struct rdmaps_tensor_desc){ .name = "t2", .length = 100000,
								     .lr = 1.0f }, &t), 0);
	cr_assert_eq(rdmaps_declare(a, &(struct rdmaps_tensor_desc){ .name = "t3", .length = 10,
								     .lr = 1.0f }, &t), RDMAPS_ELIMIT,
		     "max-tensors");
	rdmaps_close(b);
	/* a freed worker slot is usable again */
	for (int i = 0; i < 100 && th_connect_token(&srv, TH_TOKEN, &c); i++)
		usleep(20000);
	cr_assert_not_null(c, "a worker slot frees when a worker leaves");
	rdmaps_close(c);
	rdmaps_close(a);
}

/*
 * The server-wide staging budget (--staging-mb): full rings while it lasts,
 * then a smaller ring, then a clear RDMAPS_ELIMIT; a worker leaving gives
 * its ring back. Default chunks: a slot is 24 + 65536 B, a 16-slot ring 257
 * pages; 3 MiB hold two full rings and 15 slots of a third.
 */
Test(security, staging_budget_shrinks_then_refuses, .fini = stop_server, .timeout = 120)
{
	struct rdmaps_server_stats st;
	rdmaps_client *good, *c = NULL;
	rdmaps_tensor *t;
	struct raw a, b, x;
	static float g[40000];

	th_server_start(&srv, "--slots", "16", "--staging-mb", "3", NULL);
	raw_open(&a);
	raw_open(&b);
	cr_assert_eq(a.w.slot_count, 16);
	cr_assert_eq(b.w.slot_count, 16);
	/* the third gets what is left: 15 slots, and works with them */
	good = th_connect(&srv);
	t = th_declare(good, "w", 40000, 0.0f, 1.0f);
	for (int i = 0; i < 40000; i++)
		g[i] = -1.0f;
	for (int k = 0; k < 40; k++) /* 40 pushes of 3 chunks through 15 slots */
		cr_assert_eq(rdmaps_push(good, t, g, 0), 0);
	cr_assert_eq(rdmaps_flush(good, 10000), 0);
	{
		static float v[40000];
		cr_assert_eq(rdmaps_pull(good, t, v, 0), 0);
		for (int i = 0; i < 40000; i++)
			cr_assert_eq(v[i], 40.0f, "w[%d] = %f after 40 pushes on a 15-slot ring", i, v[i]);
	}
	cr_assert_eq(rdmaps_server_stats(good, &st), 0);
	cr_assert_eq(st.staging_budget, 3u << 20);
	cr_assert_eq(st.staging_bytes, 2 * 257 * 4096 + 241 * 4096,
		     "two 16-slot rings and one of 15: %lu bytes", (unsigned long)st.staging_bytes);
	/* nothing left for a fourth: refused with a clear error, others unharmed */
	cr_assert_eq(th_connect_token(&srv, TH_TOKEN, &c), RDMAPS_ELIMIT, "past the staging budget");
	cr_assert_null(c);
	struct rdmaps_wire_hello h = raw_hello(TH_TOKEN);
	cr_assert_eq(raw_connect(&x, srv.addr, srv.port, &h, sizeof(h)), RDMAPS_ELIMIT);
	raw_close(&x);
	cr_assert_eq(raw_rdma(&a, IBV_WR_RDMA_WRITE, a.w.staging_addr, a.w.staging_rkey, 64, 0),
		     IBV_WC_SUCCESS, "a worker inside the budget still writes its ring");
	cr_assert_eq(rdmaps_push(good, t, g, RDMAPS_PUSH_FOLDED), 0);
	/* a worker leaving gives its ring back */
	raw_close(&a);
	for (int i = 0; i < 100 && th_connect_token(&srv, TH_TOKEN, &c); i++)
		usleep(20000);
	cr_assert_not_null(c, "a ring given back is granted again");
	rdmaps_close(c);
	raw_close(&b);
	rdmaps_close(good);
}

/*
 * Pending pushes per worker: the server's ring (--slots) makes pushes past
 * it wait, in order; the client's own bound (RDMAPS_MAX_OPS in flight) is a
 * clear RDMAPS_EBUSY that posts nothing. Either way, no push is lost or
 * folded twice.
 */
#define PEND_LEN 4096

Test(security, pending_pushes_past_the_limit_are_busy, .fini = stop_server, .timeout = 120)
{
	static float g[PEND_LEN], v[PEND_LEN];
	static rdmaps_op *op[RDMAPS_MAX_OPS + 1];
	struct rdmaps_client_stats cs;
	rdmaps_client *c;
	rdmaps_tensor *t;

	th_server_start(&srv, "--slots", "4", NULL);
	c = th_connect(&srv);
	t = th_declare(c, "pending", PEND_LEN, 0.0f, 1.0f);
	for (int i = 0; i < PEND_LEN; i++)
		g[i] = -1.0f;
	for (int i = 0; i < RDMAPS_MAX_OPS; i++)
		cr_assert_eq(rdmaps_push_async(c, t, g, 0, &op[i]), 0, "push %d", i);
	cr_assert_eq(rdmaps_push_async(c, t, g, 0, &op[RDMAPS_MAX_OPS]), RDMAPS_EBUSY,
		     "one op past RDMAPS_MAX_OPS");
	cr_assert_eq(rdmaps_pull_async(c, t, v, 0, &op[RDMAPS_MAX_OPS]), RDMAPS_EBUSY,
		     "a pull needs an op too");
	for (int i = 0; i < RDMAPS_MAX_OPS; i++)
		cr_assert_eq(rdmaps_wait(op[i], 20000), 0, "push %d", i);
	cr_assert_eq(rdmaps_flush(c, 20000), 0);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	for (int i = 0; i < PEND_LEN; i++)
		cr_assert_eq(v[i], (float)RDMAPS_MAX_OPS, "[%d] = %f: the refused push changed it", i,
			     v[i]);
	rdmaps_client_stats(c, &cs);
	cr_assert_eq(cs.pushes, RDMAPS_MAX_OPS, "the refused push is not counted");
	rdmaps_close(c);
}

/*
 * A worker owns its staging ring, so it can rewrite a slot with a plain
 * RDMA WRITE after the WRITE-with-immediate that announced it, while the
 * server checks and folds that slot's group. Whatever the timing, the
 * server must fold only values it checked. A group of REW_SLOTS slots (the
 * whole ring) makes the window between the check of a slot and its fold
 * wide: the server checks every slot of a group before folding any. Each
 * round rewrites the first, middle or last slot of a group right behind
 * its last slot, after a delay from a sweep, with NaN (no clip norm) or
 * 1e30 (under a clip norm). A rewrite that lands before the check gets the
 * group refused; one that lands after must change nothing.
 */
#define REW_CHUNK 4096u            /* floats per chunk and per slot */
#define REW_SLOTS 128u             /* the ring, and one push group */
#define REW_LEN (REW_CHUNK * REW_SLOTS)
#define REW_POISON 256u            /* floats rewritten at the start of a slot */
#define REW_POISON_OFF (RAW_DATA_OFF + 96u * 1024u)
#define REW_CLIP 1024.0f           /* above a clean push's norm: sqrt(REW_LEN) = 724 */

static const unsigned rew_delays_us[] = { 0, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000 };

static void rew_slot_hdr(struct raw *r, uint32_t tensor, uint64_t seq, uint32_t chunk, bool last)
{
	struct rdmaps_slot_hdr h = { .seq = (uint32_t)seq, .tensor_id = (uint16_t)tensor,
				     .chunk = chunk, .count = REW_CHUNK,
				     .flags = last ? RDMAPS_SLOT_LAST | RDMAPS_SLOT_END | RDMAPS_SLOT_ACK
						   : 0,
				     .scale = 1.0f };
	memcpy(r->buf + RAW_DATA_OFF, &h, sizeof(h));
}

static uint64_t rew_slot_addr(const struct raw *r, uint64_t seq)
{
	return r->w.staging_addr + (uint64_t)((seq - 1) % r->w.slot_count) * r->w.slot_size;
}

/* One push group of every chunk (value 1), its slot `target` rewritten
 * delay_us after the last slot was posted; returns once it is consumed. */
static void rew_round(struct raw *r, uint32_t tensor, uint64_t *seq, uint32_t target,
		      unsigned delay_us)
{
	const uint64_t first = *seq;
	const uint32_t len = RDMAPS_SLOT_HDR + REW_CHUNK * (uint32_t)sizeof(float);

	for (uint32_t k = 0; k < REW_SLOTS; k++, (*seq)++) {
		uint32_t slot = (uint32_t)((*seq - 1) % r->w.slot_count);
		bool last = k + 1 == REW_SLOTS;

		rew_slot_hdr(r, tensor, *seq, k, last);
		cr_assert_eq(raw_post(r, 2, IBV_WR_RDMA_WRITE_WITH_IMM, RAW_DATA_OFF,
				      rew_slot_addr(r, *seq), r->w.staging_rkey, len,
				      rdmaps__imm_make(slot, *seq)), 0);
		if (last) {
			uint64_t until = rdmaps__now_ns() + delay_us * 1000ull;
			while (rdmaps__now_ns() < until)
				;
			/* a plain WRITE into its own ring: nothing tells the server */
			cr_assert_eq(raw_post(r, 3, IBV_WR_RDMA_WRITE, REW_POISON_OFF,
					      rew_slot_addr(r, first + target) + RDMAPS_SLOT_HDR,
					      r->w.staging_rkey, REW_POISON * sizeof(float), 0), 0);
		}
		cr_assert_eq(raw_wait(r, 2), IBV_WC_SUCCESS, "slot seq %lu", (unsigned long)*seq);
		if (last)
			cr_assert_eq(raw_wait(r, 3), IBV_WC_SUCCESS, "rewrite");
	}
	/* the last slot asks for its credit at once: the group is consumed */
	for (int i = 0; i < 3000 && __atomic_load_n(&r->credit[1], __ATOMIC_ACQUIRE) < *seq; i++)
		usleep(1000);
	cr_assert_eq(r->credit[1], *seq, "group up to seq %lu consumed (credit %lu)",
		     (unsigned long)(*seq - 1), (unsigned long)r->credit[1]);
}

/* Every round of the sweep on one tensor, rewriting with `poison`. */
static unsigned rew_sweep(struct raw *r, const char *name, uint64_t *seq, float poison)
{
	struct rdmaps_msg_tensor_reply rep;
	const uint32_t targets[] = { 0, REW_SLOTS / 2, REW_SLOTS - 1 };
	float *p = (float *)(r->buf + REW_POISON_OFF);
	float *g = (float *)(r->buf + RAW_DATA_OFF + RDMAPS_SLOT_HDR);
	unsigned rounds = 0;

	cr_assert_eq(raw_lookup(r, name, &rep), 0, "lookup %s", name);
	for (uint32_t i = 0; i < REW_CHUNK; i++)
		g[i] = 1.0f;
	for (uint32_t i = 0; i < REW_POISON; i++)
		p[i] = poison;
	for (size_t d = 0; d < sizeof(rew_delays_us) / sizeof(rew_delays_us[0]); d++)
		for (size_t k = 0; k < sizeof(targets) / sizeof(targets[0]); k++, rounds++)
			rew_round(r, rep.tensor_id, seq, targets[k], rew_delays_us[d]);
	return rounds;
}

Test(security, slots_rewritten_while_folded_fold_only_checked_values, .fini = stop_server,
     .timeout = 120)
{
	static float v[REW_LEN];
	struct rdmaps_server_stats s0, s1, s2;
	rdmaps_client *good;
	rdmaps_tensor *tn, *tc;
	uint64_t seq = 1;
	unsigned rounds, folded;
	double norm = 0.0;
	struct raw r;
	char slots[16], chunk[16];

	snprintf(slots, sizeof(slots), "%u", REW_SLOTS);
	snprintf(chunk, sizeof(chunk), "%u", REW_CHUNK);
	th_server_start(&srv, "--slots", slots, "--chunk-elems", chunk, NULL);
	good = th_connect(&srv);
	tn = th_declare(good, "rewritten", REW_LEN, 0.0f, 1.0f);
	cr_assert_eq(rdmaps_declare(good, &(struct rdmaps_tensor_desc){ .name = "clipped",
									.length = REW_LEN,
									.lr = 1.0f,
									.clip_norm = REW_CLIP },
				    &tc),
		     0);
	raw_open(&r);
	cr_assert_eq(r.w.slot_count, REW_SLOTS);

	/* NaN: a group is folded from its finite values, or refused */
	cr_assert_eq(rdmaps_server_stats(good, &s0), 0);
	rounds = rew_sweep(&r, "rewritten", &seq, __builtin_nanf(""));
	cr_assert_eq(rdmaps_server_stats(good, &s1), 0);
	cr_assert_eq((s1.folds - s0.folds) % REW_SLOTS, 0, "a group folded in part");
	folded = (unsigned)((s1.folds - s0.folds) / REW_SLOTS);
	printf("rewrite race, NaN: %u groups, %u folded from the checked values, %lu refused as "
	       "non-finite\n",
	       rounds, folded, (unsigned long)(s1.nonfinite - s0.nonfinite));
	cr_assert_eq(s1.nonfinite - s0.nonfinite, rounds - folded, "every refused group is counted");
	cr_assert_eq(rdmaps_pull(good, tn, v, 0), 0);
	for (uint32_t i = 0; i < REW_LEN; i++)
		cr_assert_eq(v[i], -(float)folded, "model[%u] = %f, want %f: folded what was not checked",
			     i, (double)v[i], -(double)folded);

	/* 1e30 under a clip norm: every group moves the model by at most the norm */
	rounds = rew_sweep(&r, "clipped", &seq, 1e30f);
	cr_assert_eq(rdmaps_server_stats(good, &s2), 0);
	cr_assert_eq((s2.folds - s1.folds) % REW_SLOTS, 0, "a group folded in part");
	cr_assert_eq(rdmaps_pull(good, tc, v, 0), 0);
	for (uint32_t i = 0; i < REW_LEN; i++) {
		cr_assert(isfinite(v[i]), "model[%u] = %f", i, (double)v[i]);
		norm += (double)v[i] * v[i];
	}
	norm = sqrt(norm);
	printf("rewrite race, 1e30 under clip norm %g: %u groups, %lu folded, %lu clipped, moved "
	       "%g\n",
	       (double)REW_CLIP, rounds, (unsigned long)((s2.folds - s1.folds) / REW_SLOTS),
	       (unsigned long)(s2.clipped - s1.clipped), norm);
	cr_assert_leq(norm, rounds * (double)REW_CLIP * 1.001, "the clip norm was bypassed");
	raw_close(&r);
	rdmaps_close(good);
}

/* ---- snapshots ------------------------------------------------------- */

/* SNAPSHOT by hand; the reply's status, with the reply in *rep. */
static int raw_snapshot(struct raw *r, uint32_t tensor, uint32_t chunk, uint32_t half,
			struct rdmaps_msg_snapshot_reply *rep)
{
	struct rdmaps_msg_snapshot m = { .tensor_id = tensor, .chunk = chunk, .half = half };
	int n;

	rdmaps__msg_init(&m.hdr, RDMAPS_MSG_SNAPSHOT, sizeof(m), 77);
	cr_assert_eq(raw_send(r, &m, sizeof(m)), IBV_WC_SUCCESS);
	n = raw_recv(r, rep, sizeof(*rep), 5000);
	cr_assert_eq(n, (int)sizeof(*rep), "snapshot reply of %d bytes", n);
	cr_assert_eq(rep->hdr.type, RDMAPS_MSG_SNAPSHOT_REPLY);
	cr_assert_eq(rep->hdr.req_id, 77u);
	return rep->status;
}

/* READ a snapshot and check it is chunk `chunk` of a tensor whose element i
 * holds i % 7 (count values; 16-bit with half) */
static void snapshot_is(struct raw *r, const struct rdmaps_msg_snapshot_reply *rep,
			uint32_t chunk, uint32_t count, bool half)
{
	const struct rdmaps_chunk_hdr *h = (const void *)(r->buf + RAW_DATA_OFF);
	const uint8_t *vals = r->buf + RAW_DATA_OFF + RDMAPS_CHUNK_HDR;

	cr_assert_eq(rep->len, RDMAPS_CHUNK_HDR + count * (half ? 2u : 4u));
	cr_assert_eq(raw_rdma(r, IBV_WR_RDMA_READ, rep->addr, rep->rkey, rep->len, 0), IBV_WC_SUCCESS);
	cr_assert_eq(h->version & 1u, 0u, "a snapshot taken mid-fold");
	cr_assert_eq(h->count, count);
	cr_assert_eq(h->checksum, rdmaps__checksum(vals, rep->len - RDMAPS_CHUNK_HDR),
		     "chunk %u: checksum", chunk);
	for (uint32_t i = 0; i < count; i++) {
		float want = (float)((chunk * 1024u + i) % 7u), got;
		if (half) {
			uint16_t b;
			memcpy(&b, vals + 2 * i, 2);
			got = rdmaps__bf16_to_f32(b);
		} else {
			memcpy(&got, vals + 4 * i, 4);
		}
		cr_assert_eq(got, want, "chunk %u [%u] = %f, want %f", chunk, i, got, want);
	}
}

/*
 * A snapshot is the chunk, whole, in each layout (one copy, two copies,
 * the 16-bit copy); a request for a tensor the connection never looked
 * up, a chunk or copy that does not exist, is refused with a clear status
 * and changes nothing; the snapshot buffer cannot be written remotely.
 */
Test(security, snapshots_are_the_chunk_and_bad_requests_are_refused, .fini = stop_server,
     .timeout = 120)
{
	enum { LEN = 4096 }; /* 4 chunks of 1024 */
	static float g[LEN];
	static const char *const names[] = { "snap-one", "snap-two", "snap-half" };
	struct rdmaps_msg_tensor_reply tr[3];
	struct rdmaps_msg_snapshot_reply rep;
	struct rdmaps_server_stats st0, st1;
	rdmaps_client *c;
	rdmaps_tensor *t[3];
	struct raw r;

	/* tensors of 64 KiB or more keep two copies: 4096 floats of "snap-two" */
	th_server_start(&srv, "--chunk-elems", "1024", "--two-copies-from", "16384", NULL);
	c = th_connect(&srv);
	for (int i = 0; i < LEN; i++)
		g[i] = -(float)(i % 7); /* SGD, lr 1, from 0: element i holds i % 7 */
	for (int k = 0; k < 3; k++) {
		struct rdmaps_tensor_desc d = { .name = names[k], .length = k == 1 ? LEN : 2048,
						.optimizer = RDMAPS_OPT_SGD, .lr = 1.0f,
						.pull_format = k == 2 ? RDMAPS_FMT_BF16 : RDMAPS_FMT_F32 };
		cr_assert_eq(rdmaps_declare(c, &d, &t[k]), 0, "%s", names[k]);
		cr_assert_eq(rdmaps_push(c, t[k], g, RDMAPS_PUSH_FOLDED), 0);
	}
	cr_assert_eq(rdmaps_server_stats(c, &st0), 0);

	raw_open(&r);
	/* not looked up on this connection: unknown to it */
	cr_assert_eq(raw_snapshot(&r, 0, 0, 0, &rep), RDMAPS_ENOENT);
	cr_assert_eq(raw_snapshot(&r, 999, 0, 0, &rep), RDMAPS_ENOENT);
	for (int k = 0; k < 3; k++)
		cr_assert_eq(raw_lookup(&r, names[k], &tr[k]), 0, "%s", names[k]);
	cr_assert_eq(raw_snapshot(&r, tr[0].tensor_id, 2, 0, &rep), RDMAPS_EINVAL, "chunk 2 of 2");
	cr_assert_eq(raw_snapshot(&r, tr[0].tensor_id, 0, 1, &rep), RDMAPS_EINVAL,
		     "a 16-bit copy of a float32-only tensor");
	cr_assert_eq(raw_snapshot(&r, tr[2].tensor_id, 0, 2, &rep), RDMAPS_EINVAL, "half = 2");

	/* each layout, each chunk */
	for (uint32_t ch = 0; ch < 2; ch++) {
		cr_assert_eq(raw_snapshot(&r, tr[0].tensor_id, ch, 0, &rep), 0);
		snapshot_is(&r, &rep, ch, 1024, false);
		cr_assert_eq(raw_snapshot(&r, tr[2].tensor_id, ch, 1, &rep), 0);
		snapshot_is(&r, &rep, ch, 1024, true);
	}
	for (uint32_t ch = 0; ch < 4; ch++) {
		cr_assert_eq(raw_snapshot(&r, tr[1].tensor_id, ch, 0, &rep), 0);
		snapshot_is(&r, &rep, ch, 1024, false);
	}
	cr_assert_eq(rdmaps_server_stats(c, &st1), 0);
	cr_assert_eq(st1.snapshots - st0.snapshots, 8);
	cr_assert_eq(st1.bad_messages - st0.bad_messages, 5, "the refused requests are counted");
	/* the model never moved, and others are served as ever */
	cr_assert_eq(rdmaps_pull(c, t[1], g, 0), 0);
	for (int i = 0; i < LEN; i++)
		cr_assert_eq(g[i], (float)(i % 7));

	/* READ-only: a WRITE with its rkey breaks only this connection */
	cr_assert_neq(raw_rdma(&r, IBV_WR_RDMA_WRITE, rep.addr, rep.rkey, 64, 0), IBV_WC_SUCCESS);
	raw_close(&r);
	cr_assert_eq(rdmaps_pull(c, t[1], g, 0), 0);
	for (int i = 0; i < LEN; i++)
		cr_assert_eq(g[i], (float)(i % 7));
	rdmaps_close(c);
}

/* The credit word's dropped count (struct rdmaps_wire_credit), waited for. */
static uint32_t raw_dropped(struct raw *r, uint32_t want)
{
	struct rdmaps_wire_credit cr;

	for (int i = 0; i < 500; i++) {
		memcpy(&cr, (const void *)r->credit, sizeof(cr));
		if (cr.dropped >= want)
			break;
		usleep(10000);
	}
	return cr.dropped;
}

/*
 * Replica connections (another server writing its backups here): only with
 * the servers' own peer token, never the workers'; such a connection opens
 * replicas and does nothing else, and the only memory it can write is its
 * replicas: the model workers read stays out of its reach, whatever key it
 * uses, and a push on it is dropped.
 */
Test(security, replica_connections_write_their_replicas_only, .fini = stop_server, .timeout = 120)
{
	char dir[128], path[256];
	struct raw w, p;
	struct rdmaps_msg_tensor_reply tr, x;
	struct rdmaps_msg_declare m;
	struct rdmaps_msg_replica_reply rr;
	struct rdmaps_wire_hello h;
	struct rdmaps_server_stats st;
	uint8_t in[RDMAPS_MSG_MAX];
	rdmaps_client *c;
	FILE *f;

	th_mkdtemp(dir, sizeof(dir), "peer");
	snprintf(path, sizeof(path), "%s/peer-token", dir);
	f = fopen(path, "w");
	cr_assert_not_null(f);
	fputs("peer-secret-9\n", f);
	fclose(f);
	th_server_start(&srv, "--peer-token-file", path, NULL);

	h = raw_hello(TH_TOKEN);
	h.flags = RDMAPS_HELLO_REPLICA;
	h.rank = 1;
	cr_assert_eq(raw_connect(&p, srv.addr, srv.port, &h, sizeof(h)), RDMAPS_EAUTH,
		     "the workers' token opens no replica connection");
	raw_close(&p);
	h.flags = 0x80;
	cr_assert_eq(raw_connect(&p, srv.addr, srv.port, &h, sizeof(h)), RDMAPS_EPROTO, "unknown flag");
	raw_close(&p);
	h = raw_hello("peer-secret-9");
	cr_assert_eq(raw_connect(&p, srv.addr, srv.port, &h, sizeof(h)), RDMAPS_EAUTH,
		     "the peer token is no worker's");
	raw_close(&p);
	h.flags = RDMAPS_HELLO_REPLICA;
	h.rank = 0;
	cr_assert_eq(raw_connect(&p, srv.addr, srv.port, &h, sizeof(h)), RDMAPS_EINVAL,
		     "a server is not its own backup");
	raw_close(&p);

	/* a worker with a tensor "w"; it cannot open a replica */
	h = raw_hello(TH_TOKEN);
	cr_assert_eq(raw_connect(&w, srv.addr, srv.port, &h, sizeof(h)), 0);
	cr_assert_eq(raw_declare(&w, "w", 64, &tr), 0);
	m = raw_declare_msg("w", 64);
	m.hdr.type = RDMAPS_MSG_REPLICA_OPEN;
	cr_assert_eq(raw_request(&w, &m, sizeof(m), &x), RDMAPS_EPROTO, "REPLICA_OPEN from a worker");

	/* rank 1's replica connection: no worker request, its own "w" */
	h = raw_hello("peer-secret-9");
	h.flags = RDMAPS_HELLO_REPLICA;
	h.rank = 1;
	cr_assert_eq(raw_connect(&p, srv.addr, srv.port, &h, sizeof(h)), 0);
	m = raw_declare_msg("w", 64);
	cr_assert_eq(raw_request(&p, &m, sizeof(m), &x), RDMAPS_EPROTO, "a DECLARE on it");
	m.hdr.type = RDMAPS_MSG_REPLICA_OPEN;
	cr_assert_eq(raw_send(&p, &m, sizeof(m)), IBV_WC_SUCCESS);
	cr_assert_eq(raw_recv(&p, in, sizeof(in), 20000), (int)sizeof(rr));
	memcpy(&rr, in, sizeof(rr));
	cr_assert_eq(rr.status, 0);
	cr_assert_eq(rr.nchunks, 1);
	/* a push on it is dropped, not folded into the model's tensor 0; so
	 * is a record of a tensor it never opened */
	cr_assert_eq(raw_slot(&p, tr.tensor_id, 1, 0, 64, 5.0f, 0), IBV_WC_SUCCESS);
	cr_assert_eq(raw_dropped(&p, 1), 1, "the push was dropped");
	cr_assert_eq(raw_slot(&p, rr.tensor_id + 5, 2, 0, 64, 5.0f, RDMAPS_SLOT_REPLICA),
		     IBV_WC_SUCCESS);
	cr_assert_eq(raw_dropped(&p, 2), 2, "the record of no replica was dropped");
	/* its ring's key at the model's address, then the model's own key:
	 * each a remote access error (each breaks the QP: connect again) */
	cr_assert_neq(raw_rdma(&p, IBV_WR_RDMA_WRITE, tr.remote_addr + RDMAPS_CHUNK_HDR,
			       p.w.staging_rkey, 64 * sizeof(float), 0),
		      IBV_WC_SUCCESS, "its ring's key on the model");
	raw_close(&p);
	cr_assert_eq(raw_connect(&p, srv.addr, srv.port, &h, sizeof(h)), 0);
	cr_assert_neq(raw_rdma(&p, IBV_WR_RDMA_WRITE, tr.remote_addr + RDMAPS_CHUNK_HDR, tr.rkey,
			       64 * sizeof(float), 0),
		      IBV_WC_SUCCESS, "model key from a replica connection");
	raw_close(&p);

	/* the model is as declared (zeros), and the server serves on */
	cr_assert_eq(raw_rdma(&w, IBV_WR_RDMA_READ, tr.remote_addr, tr.rkey,
			      RDMAPS_CHUNK_HDR + 64 * sizeof(float), 0),
		     IBV_WC_SUCCESS);
	for (int i = 0; i < 64; i++)
		cr_assert_eq(((float *)(w.buf + RAW_DATA_OFF + RDMAPS_CHUNK_HDR))[i], 0.0f, "[%d]", i);
	raw_close(&w);
	c = th_connect(&srv);
	cr_assert_eq(rdmaps_server_stats(c, &st), 0);
	cr_assert_geq(st.bad_messages, 2);
	cr_assert_eq(st.auth_failures, 2);
	rdmaps_close(c);
	th_rmdir(dir);
}
