/*
 * Compressed pushes end to end against a real rdmaps-server: each format
 * folds what its scalar reference says, bit for bit; error feedback sends
 * everything in the end; a gradient a format cannot carry is refused on
 * the worker and changes nothing; a malformed compressed slot from a
 * raw-verbs peer is dropped whole, counted, and the server serves on.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gradfmt.h"
#include "half.h"
#include "harness.h"
#include "rawclient.h"

static struct th_server srv;

static void stop_server(void)
{
	th_server_stop(&srv);
}

#define CHUNK 1024
#define LEN (3 * CHUNK + 200) /* three full chunks and a partial one */

static float model[LEN], grad[LEN], want[LEN];

/* A gradient whose magnitudes are all distinct (top-k has one answer),
 * of both signs, some past bf16's and fp16's precision. */
static void make_grad(unsigned seed)
{
	for (uint64_t i = 0; i < LEN; i++) {
		float m = 0.001f * (float)((i * 7919u + seed * 104729u) % 100003u + 1) + 1e-7f * (float)i;
		grad[i] = (i * 31u + seed) % 3 ? m : -m;
	}
}

static rdmaps_tensor *declare_zero(rdmaps_client *c, const char *name)
{
	return th_declare(c, name, LEN, 0.0f, 1.0f); /* SGD lr 1: model = -sum */
}

static void pull_model(rdmaps_client *c, rdmaps_tensor *t)
{
	cr_assert_eq(rdmaps_flush(c, 30000), 0);
	cr_assert_eq(rdmaps_pull(c, t, model, 0), 0);
}

static void assert_model(const char *what)
{
	for (uint64_t i = 0; i < LEN; i++)
		cr_assert_eq(model[i], want[i], "%s: model[%lu] = %.9g, want %.9g", what,
			     (unsigned long)i, model[i], want[i]);
}

Test(wire, half_formats_fold_the_rounded_gradient, .fini = stop_server, .timeout = 300)
{
	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	rdmaps_client *c = th_connect(&srv);
	rdmaps_tensor *tb = declare_zero(c, "bf16"), *th = declare_zero(c, "fp16");
	float wb[LEN] = { 0 }, wh[LEN] = { 0 };
	struct rdmaps_client_stats s0, s1;

	cr_assert_eq(rdmaps_set_push_format(c, tb, RDMAPS_FMT_BF16, 0), 0);
	cr_assert_eq(rdmaps_set_push_format(c, th, RDMAPS_FMT_FP16, 0), 0);
	cr_assert_eq(rdmaps_push_format(tb), RDMAPS_FMT_BF16);
	for (unsigned r = 0; r < 3; r++) {
		make_grad(r);
		rdmaps_client_stats(c, &s0);
		cr_assert_eq(rdmaps_push(c, tb, grad, 0), 0);
		rdmaps_client_stats(c, &s1);
		/* half the bytes of float32 */
		cr_assert_eq(s1.push_bytes - s0.push_bytes, (uint64_t)LEN * 2);
		cr_assert_eq(rdmaps_push(c, th, grad, r == 2 ? RDMAPS_PUSH_FOLDED : 0), 0);
		for (uint64_t i = 0; i < LEN; i++) {
			wb[i] -= rdmaps__bf16_to_f32(rdmaps__f32_to_bf16(grad[i]));
			wh[i] -= rdmaps__f16_to_f32(rdmaps__f32_to_f16(grad[i]));
		}
	}
	pull_model(c, tb);
	memcpy(want, wb, sizeof(want));
	assert_model("bf16");
	pull_model(c, th);
	memcpy(want, wh, sizeof(want));
	assert_model("fp16");
	/* the rounding really happened: fp16 keeps more than bf16 */
	cr_assert_neq(memcmp(wb, wh, sizeof(wb)), 0);
	rdmaps_close(c);
}

Test(wire, topk_error_feedback_sends_everything_in_the_end, .fini = stop_server, .timeout = 300)
{
	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	rdmaps_client *c = th_connect(&srv);
	rdmaps_tensor *t = declare_zero(c, "topk");
	static float zero[LEN];
	struct rdmaps_client_stats s0, s1;
	const double frac = 0.1;

	cr_assert_eq(rdmaps_set_push_format(c, t, RDMAPS_FMT_TOPK, frac), 0);
	make_grad(5);
	rdmaps_client_stats(c, &s0);
	cr_assert_eq(rdmaps_push(c, t, grad, RDMAPS_PUSH_FOLDED), 0);
	rdmaps_client_stats(c, &s1);
	/* per chunk ceil(0.1 x count) values, 8 B each, and a count */
	uint64_t k_full = (uint64_t)ceil(frac * CHUNK), k_last = (uint64_t)ceil(frac * 200);
	cr_assert_eq(s1.push_bytes - s0.push_bytes, 3 * (4 + 8 * k_full) + 4 + 8 * k_last);

	/* after one push: exactly the k largest magnitudes of each chunk */
	pull_model(c, t);
	for (uint64_t ch = 0; ch * CHUNK < LEN; ch++) {
		uint64_t lo = ch * CHUNK, n = LEN - lo < CHUNK ? LEN - lo : CHUNK, sent = 0;
		uint64_t k = n == CHUNK ? k_full : k_last;
		for (uint64_t i = lo; i < lo + n; i++) {
			uint64_t above = 0; /* the magnitudes are distinct */
			for (uint64_t j = lo; j < lo + n; j++)
				above += fabsf(grad[j]) > fabsf(grad[i]);
			want[i] = above < k ? -grad[i] : 0.0f;
			sent += above < k;
			cr_assert_eq(model[i], want[i], "chunk %lu: model[%lu] = %g, want %g",
				     (unsigned long)ch, (unsigned long)i, model[i], want[i]);
		}
		cr_assert_eq(sent, k);
	}
	/* zero gradients from now on: the residual goes out, k per chunk per
	 * push, each value once and unchanged, so the model ends at -grad */
	for (int r = 0; r < 10; r++)
		cr_assert_eq(rdmaps_push(c, t, zero, 0), 0);
	pull_model(c, t);
	for (uint64_t i = 0; i < LEN; i++)
		want[i] = -grad[i];
	assert_model("top-k after the residual went out");
	rdmaps_close(c);
}

Test(wire, sign_folds_scale_and_signs_per_chunk, .fini = stop_server, .timeout = 300)
{
	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	rdmaps_client *c = th_connect(&srv);
	rdmaps_tensor *t = declare_zero(c, "sign");
	struct rdmaps_client_stats s0, s1;

	cr_assert_eq(rdmaps_set_push_format(c, t, RDMAPS_FMT_SIGN, 0), 0);
	make_grad(9);
	rdmaps_client_stats(c, &s0);
	cr_assert_eq(rdmaps_push(c, t, grad, RDMAPS_PUSH_FOLDED), 0);
	rdmaps_client_stats(c, &s1);
	cr_assert_eq(s1.push_bytes - s0.push_bytes,
		     3 * rdmaps__gradfmt_size(RDMAPS__GRAD_SIGN, CHUNK, 0) +
			     rdmaps__gradfmt_size(RDMAPS__GRAD_SIGN, 200, 0));
	pull_model(c, t);
	for (uint64_t lo = 0; lo < LEN; lo += CHUNK) {
		uint64_t n = LEN - lo < CHUNK ? LEN - lo : CHUNK;
		/* the mean magnitude, summed in double as the encoder does: eight
		 * chains, combined pairwise (client/compress.c, sum_l1) */
		double c8[8] = { 0 }, l1;
		uint64_t q = 0;
		for (; q + 8 <= n; q += 8)
			for (int j = 0; j < 8; j++)
				c8[j] += fabs((double)grad[lo + q + j]);
		for (; q < n; q++)
			c8[0] += fabs((double)grad[lo + q]);
		l1 = ((c8[0] + c8[1]) + (c8[2] + c8[3])) + ((c8[4] + c8[5]) + (c8[6] + c8[7]));
		float scale = (float)(l1 / (double)n);
		for (uint64_t i = lo; i < lo + n; i++)
			want[i] = grad[i] < 0.0f ? scale : -scale;
	}
	assert_model("sign");
	rdmaps_close(c);
}

Test(wire, values_a_format_cannot_carry_are_refused_on_the_worker, .fini = stop_server,
     .timeout = 300)
{
	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	rdmaps_client *c = th_connect(&srv);
	rdmaps_tensor *th = declare_zero(c, "fp16"), *tk = declare_zero(c, "topk");
	static float zero[LEN];
	rdmaps_op *op1, *op2;

	cr_assert_eq(rdmaps_set_push_format(c, th, RDMAPS_FMT_FP16, 0), 0);
	cr_assert_eq(rdmaps_set_push_format(c, tk, RDMAPS_FMT_TOPK, 0.5), 0);
	cr_assert_eq(rdmaps_set_push_format(c, tk, RDMAPS_FMT_TOPK, 0.6), RDMAPS_EINVAL);
	cr_assert_eq(rdmaps_set_push_format(c, tk, (enum rdmaps_format)9, 0), RDMAPS_EINVAL);
	cr_assert_eq(rdmaps_push_format(tk), RDMAPS_FMT_TOPK, "a refused format changes nothing");
	cr_assert_eq(rdmaps_set_push_format(c, tk, RDMAPS_FMT_TOPK, 0.5), 0);
	make_grad(3);
	grad[LEN - 1] = 70000.0f; /* past fp16 */
	cr_assert_eq(rdmaps_push(c, th, grad, 0), RDMAPS_EINVAL);
	/* bf16 carries 70000, not a value that rounds past its largest */
	rdmaps_tensor *tb = declare_zero(c, "bf16");
	cr_assert_eq(rdmaps_set_push_format(c, tb, RDMAPS_FMT_BF16, 0), 0);
	grad[LEN - 1] = 3.4e38f;
	cr_assert_eq(rdmaps_push(c, tb, grad, 0), RDMAPS_EINVAL);
	grad[LEN - 1] = NAN;
	cr_assert_eq(rdmaps_push(c, tk, grad, 0), RDMAPS_EINVAL);
	/* refused pushes changed nothing, the residual included: after a few
	 * pushes at k = half a chunk, everything of one good gradient is in */
	make_grad(3);
	cr_assert_eq(rdmaps_push(c, tk, grad, 0), 0);
	/* one compressed push of a tensor in flight at a time */
	cr_assert_eq(rdmaps_push_async(c, tk, zero, 0, &op1), 0);
	cr_assert_eq(rdmaps_push_async(c, tk, zero, 0, &op2), RDMAPS_EBUSY);
	cr_assert_eq(rdmaps_wait(op1, 30000), 0);
	/* a slot holds 511 top-k values of a 1024-float chunk, not 512: the
	 * last two go out with a third push */
	cr_assert_eq(rdmaps_push(c, tk, zero, 0), 0);
	pull_model(c, tk);
	for (uint64_t i = 0; i < LEN; i++)
		want[i] = -grad[i];
	assert_model("top-k after refused pushes");
	pull_model(c, th);
	memset(want, 0, sizeof(want));
	assert_model("fp16 after a refused push");
	rdmaps_close(c);
}

/* Write one compressed slot by hand: header, then len payload bytes. */
static int raw_wire_slot(struct raw *r, uint32_t tensor, uint64_t seq, uint32_t count,
			 unsigned fmt, const void *payload, uint32_t len)
{
	struct rdmaps_slot_hdr h = { .seq = (uint32_t)seq, .tensor_id = (uint16_t)tensor,
				     .count = count, .scale = 1.0f,
				     .flags = (uint16_t)(RDMAPS_SLOT_LAST | RDMAPS_SLOT_END |
							 fmt << RDMAPS_SLOT_FMT_SHIFT) };
	uint32_t slot = (uint32_t)((seq - 1) % r->w.slot_count);

	memcpy(r->buf + RAW_DATA_OFF, &h, sizeof(h));
	memcpy(r->buf + RAW_DATA_OFF + RDMAPS_SLOT_HDR, payload, len);
	return raw_rdma(r, IBV_WR_RDMA_WRITE_WITH_IMM,
			r->w.staging_addr + (uint64_t)slot * r->w.slot_size, r->w.staging_rkey,
			RDMAPS_SLOT_HDR + len, rdmaps__imm_make(slot, seq));
}

Test(wire, malformed_compressed_slots_are_dropped_whole, .fini = stop_server, .timeout = 300)
{
	enum { N = 1024 };
	struct rdmaps_server_stats before, after;
	struct rdmaps_msg_tensor_reply rep;
	static uint8_t p[8 + 8 * N];
	uint32_t u, seq = 1;
	float f;
	struct raw r;

	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	rdmaps_client *good = th_connect(&srv);
	rdmaps_tensor *t = th_declare(good, "m", N, 10.0f, 1.0f);
	struct rdmaps_wire_hello hello = raw_hello(TH_TOKEN);
	cr_assert_eq(raw_connect(&r, srv.addr, srv.port, &hello, sizeof(hello)), 0);
	cr_assert_eq(raw_declare(&r, "m", N, &rep), 0);
	cr_assert_eq(rdmaps_server_stats(good, &before), 0);

#define TOPK2(i0, i1, len)                                                                  \
	do {                                                                                \
		u = 2;                                                                      \
		memcpy(p, &u, 4);                                                           \
		u = (i0);                                                                   \
		memcpy(p + 4, &u, 4);                                                       \
		u = (i1);                                                                   \
		memcpy(p + 8, &u, 4);                                                       \
		f = 1.0f;                                                                   \
		memcpy(p + 12, &f, 4);                                                      \
		memcpy(p + 16, &f, 4);                                                      \
		cr_assert_eq(raw_wire_slot(&r, rep.tensor_id, seq++, N, RDMAPS__GRAD_TOPK, p, \
					   (len)),                                          \
			     IBV_WC_SUCCESS);                                               \
	} while (0)
	TOPK2(3, N, 20);  /* index out of range */
	TOPK2(7, 7, 20);  /* repeated */
	TOPK2(9, 8, 20);  /* not ascending */
	TOPK2(1, 2, 28);  /* longer than its count says */
	TOPK2(1, 2, 12);  /* shorter */
	/* sign: a NaN scale; bf16 one byte short; an unknown format */
	f = NAN;
	memcpy(p, &f, 4);
	memset(p + 4, 0, N / 8);
	cr_assert_eq(raw_wire_slot(&r, rep.tensor_id, seq++, N, RDMAPS__GRAD_SIGN, p, 4 + N / 8),
		     IBV_WC_SUCCESS);
	memset(p, 0, 2 * N);
	cr_assert_eq(raw_wire_slot(&r, rep.tensor_id, seq++, N, RDMAPS__GRAD_BF16, p, 2 * N - 2),
		     IBV_WC_SUCCESS);
	cr_assert_eq(raw_wire_slot(&r, rep.tensor_id, seq++, N, 9, p, 2 * N), IBV_WC_SUCCESS);
	/* and a good one after all that: indices 1 and 2 get 10 - 1 */
	TOPK2(1, 2, 20);
#undef TOPK2
	for (int i = 0; i < 300 && __atomic_load_n(&r.credit[1], __ATOMIC_ACQUIRE) < seq; i++)
		usleep(10000);
	cr_assert_eq(r.credit[1], seq, "credit: every slot consumed (got %lu)",
		     (unsigned long)r.credit[1]);
	raw_close(&r);

	cr_assert_eq(rdmaps_pull(good, t, model, 0), 0);
	for (uint64_t i = 0; i < N; i++)
		cr_assert_eq(model[i], i == 1 || i == 2 ? 9.0f : 10.0f, "model[%lu] = %g",
			     (unsigned long)i, model[i]);
	cr_assert_eq(rdmaps_server_stats(good, &after), 0);
	cr_assert_eq(after.folds - before.folds, 1);
	cr_assert_eq(after.dropped - before.dropped, 8);
	rdmaps_close(good);
}

/* ---- 16-bit pulls ------------------------------------------------------- */

static rdmaps_tensor *declare_pull(rdmaps_client *c, const char *name, uint64_t len,
				   const float *init, enum rdmaps_format pf, enum rdmaps_consistency cm)
{
	struct rdmaps_tensor_desc d = { .name = name, .length = len, .init = init,
					.optimizer = RDMAPS_OPT_SGD, .lr = 1.0f, .pull_format = pf,
					.consistency = cm, .workers = cm == RDMAPS_ASP ? 0 : 1 };
	rdmaps_tensor *t = NULL;
	int rc = rdmaps_declare(c, &d, &t);

	cr_assert_eq(rc, 0, "declare %s: %s", name, rdmaps_strerror(rc));
	return t;
}

static uint16_t to_half(enum rdmaps_format pf, float f)
{
	return pf == RDMAPS_FMT_BF16 ? rdmaps__f32_to_bf16(f) : rdmaps__f32_to_f16(f);
}

static float from_half(enum rdmaps_format pf, uint16_t h)
{
	return pf == RDMAPS_FMT_BF16 ? rdmaps__bf16_to_f32(h) : rdmaps__f16_to_f32(h);
}

Test(wire, half_pulls_are_the_master_rounded, .fini = stop_server, .timeout = 300)
{
	static float init[LEN], master[LEN];
	static uint16_t raw[LEN], raw_reg[LEN];
	th_server_start(&srv, "--chunk-elems", "1024", NULL);
	rdmaps_client *c = th_connect(&srv);
	enum rdmaps_format pfs[2] = { RDMAPS_FMT_BF16, RDMAPS_FMT_FP16 };
	struct rdmaps_client_stats s0, s1;
	rdmaps_tensor *t32, *th[2], *bad = NULL;
	rdmaps_mr *mr;

	make_grad(11);
	memcpy(init, grad, sizeof(init));
	t32 = declare_pull(c, "m32", LEN, init, RDMAPS_FMT_F32, RDMAPS_ASP);
	th[0] = declare_pull(c, "mbf16", LEN, init, RDMAPS_FMT_BF16, RDMAPS_ASP);
	th[1] = declare_pull(c, "mfp16", LEN, init, RDMAPS_FMT_FP16, RDMAPS_ASP);
	cr_assert_eq(rdmaps_pull_format(th[0]), RDMAPS_FMT_BF16);
	cr_assert_eq(rdmaps_pull_format(t32), RDMAPS_FMT_F32);
	cr_assert_eq(rdmaps_register(c, raw_reg, sizeof(raw_reg), &mr), 0);
	for (unsigned r = 0; r < 3; r++) {
		if (r) { /* the initial values first, then after folds */
			make_grad(r);
			for (int k = 0; k < 3; k++)
				cr_assert_eq(rdmaps_push(c, k ? th[k - 1] : t32, grad, RDMAPS_PUSH_FOLDED),
					     0);
		}
		cr_assert_eq(rdmaps_pull(c, t32, master, 0), 0);
		for (int k = 0; k < 2; k++) {
			rdmaps_client_stats(c, &s0);
			cr_assert_eq(rdmaps_pull(c, th[k], model, 0), 0);
			rdmaps_client_stats(c, &s1);
			/* runs of consecutive chunks share a READ (8 per READ on
			 * rxe: one here), each still checked on its own */
			cr_assert_lt(s1.reads - s0.reads, 4, "%lu READs for 4 chunks",
				     (unsigned long)(s1.reads - s0.reads));
			cr_assert_eq(rdmaps_pull_half(c, th[k], raw, 0), 0);
			cr_assert_eq(rdmaps_pull_half(c, th[k], raw_reg, 0), 0, "zero-copy");
			for (uint64_t i = 0; i < LEN; i++) {
				uint16_t h = to_half(pfs[k], master[i]);
				cr_assert_eq(raw[i], h, "%s round %u: [%lu] = 0x%04x, want 0x%04x of %.9g",
					     k ? "fp16" : "bf16", r, (unsigned long)i, raw[i], h, master[i]);
				cr_assert_eq(raw_reg[i], h);
				cr_assert_eq(model[i], from_half(pfs[k], h), "%s round %u: float [%lu]",
					     k ? "fp16" : "bf16", r, (unsigned long)i);
			}
		}
	}
	/* the copy really is rounded: not the master itself */
	cr_assert_neq(memcmp(model, master, sizeof(model)), 0);
	/* bad declarations change nothing */
	cr_assert_eq(rdmaps_pull_half(c, t32, raw, 0), RDMAPS_EINVAL);
	struct rdmaps_tensor_desc d = { .name = "mbf16", .length = LEN, .optimizer = RDMAPS_OPT_SGD,
					.lr = 1.0f, .pull_format = RDMAPS_FMT_FP16 };
	cr_assert_eq(rdmaps_declare(c, &d, &bad), RDMAPS_EEXIST, "another pull format");
	d.name = "topk-pulls";
	d.pull_format = RDMAPS_FMT_TOPK;
	cr_assert_eq(rdmaps_declare(c, &d, &bad), RDMAPS_EINVAL);
	d.pull_format = RDMAPS_FMT_BF16;
	d.row_dim = 8;
	cr_assert_eq(rdmaps_declare(c, &d, &bad), RDMAPS_EINVAL, "rows are pulled in float32");
	rdmaps_deregister(mr);
	rdmaps_close(c);
}

/* ---- 16-bit copies under a writer flat out ------------------------------- */

#define TORN16_CHUNKS 8
#define TORN16_LEN (TORN16_CHUNKS * CHUNK)
static volatile int torn16_stop;
static long torn16_pushes;

static void *torn16_pusher(void *arg)
{
	static float g[TORN16_LEN];
	int *rc = arg;
	rdmaps_client *c = NULL;
	rdmaps_tensor *t;

	for (int i = 0; i < TORN16_LEN; i++)
		g[i] = -1.0f; /* lr 1: every fold adds exactly 1 to a whole chunk */
	if ((*rc = th_connect_token(&srv, TH_TOKEN, &c)))
		return NULL;
	if (!(*rc = rdmaps_lookup(c, "torn16", &t)))
		while (!torn16_stop && !(*rc = rdmaps_push(c, t, g, 0)))
			torn16_pushes++;
	if (!*rc)
		*rc = rdmaps_flush(c, 30000);
	rdmaps_close(c);
	return NULL;
}

static void half_torn_race(const char *two_copies_from)
{
	static float v[TORN16_LEN], prev[TORN16_CHUNKS];
	static uint16_t raw[TORN16_LEN];
	struct rdmaps_client_stats cs;
	pthread_t pusher;
	int prc = 0;

	memset(prev, 0, sizeof(prev));
	th_server_start(&srv, "--chunk-elems", "1024", "--fold-threads", "2", "--two-copies-from",
			two_copies_from, NULL);
	rdmaps_client *c = th_connect(&srv);
	rdmaps_tensor *t = declare_pull(c, "torn16", TORN16_LEN, NULL, RDMAPS_FMT_BF16, RDMAPS_ASP);
	torn16_stop = 0;
	torn16_pushes = 0;
	pthread_create(&pusher, NULL, torn16_pusher, &prc);
	for (int n = 0; n < 300; n++) {
		cr_assert_eq(rdmaps_pull(c, t, v, 0), 0, "pull %d", n);
		for (int k = 0; k < TORN16_CHUNKS; k++) {
			const float *ch = v + k * CHUNK;
			for (int i = 1; i < CHUNK; i++)
				cr_assert_eq(ch[i], ch[0], "pull %d chunk %d torn: [0]=%g [%d]=%g", n, k,
					     ch[0], i, ch[i]);
			cr_assert_geq(ch[0], prev[k], "pull %d chunk %d went back in time", n, k);
			prev[k] = ch[0];
		}
	}
	torn16_stop = 1;
	pthread_join(pusher, NULL);
	cr_assert_eq(prc, 0, "pusher: %s", rdmaps_strerror(prc));
	rdmaps_client_stats(c, &cs);
	printf("16-bit copy, torn (two copies from %s B): 300 pulls raced %ld pushes; %lu chunk "
	       "re-reads (%.3f%% of chunk reads)\n", two_copies_from, torn16_pushes,
	       (unsigned long)cs.pull_retries, 100.0 * (double)cs.pull_retries / (300 * TORN16_CHUNKS));
	cr_assert_gt(torn16_pushes, 0, "the folds must actually race the pulls");
	/* settled: the master is exactly the pushes, the copy its rounding */
	cr_assert_eq(rdmaps_pull_half(c, t, raw, 0), 0);
	for (int i = 0; i < TORN16_LEN; i++)
		cr_assert_eq(raw[i], rdmaps__f32_to_bf16((float)torn16_pushes), "final [%d] = 0x%04x, "
			     "pushes %ld", i, raw[i], torn16_pushes);
	rdmaps_close(c);
}

Test(wire, half_pulls_never_see_a_torn_chunk, .fini = stop_server, .timeout = 600)
{
	half_torn_race("0");
}

Test(wire, half_pulls_never_see_a_torn_chunk_two_copies, .fini = stop_server, .timeout = 600)
{
	half_torn_race("4096");
}

Test(wire, half_pulls_wait_for_bsp_clocks_and_survive_a_restart, .fini = stop_server,
     .timeout = 300)
{
	static float v[LEN];
	char dir[64];
	float expect = 0.0f;
	int rc;

	th_mkdtemp(dir, sizeof(dir), "half");
	th_server_start(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	rdmaps_client *c = th_connect(&srv);
	rdmaps_tensor *t = declare_pull(c, "bsp16", LEN, NULL, RDMAPS_FMT_FP16, RDMAPS_BSP);
	make_grad(4);
	for (int r = 0; r < 3; r++) {
		/* a BSP pull after a push sees that clock folded, in the copy too */
		cr_assert_eq(rdmaps_push(c, t, grad, 0), 0);
		cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
		expect -= grad[7];
		cr_assert_eq(v[7], rdmaps__f16_to_f32(rdmaps__f32_to_f16(expect)), "round %d: %g, expect %g",
			     r, v[7], expect);
	}
	cr_assert_eq(rdmaps_checkpoint(c, 10000), 0);
	th_server_kill9(&srv);
	th_server_restart(&srv, "--chunk-elems", "1024", "--checkpoint-dir", dir, NULL);
	/* the restored tensor keeps its pull format, and its copy is written
	 * from the restored master: no pull finds it empty or half made */
	/* the first call after the crash finds the connection lost; the next
	 * reconnects to the restarted server */
	rc = rdmaps_pull(c, t, v, 0);
	if (rc == RDMAPS_EDISCONNECTED)
		rc = rdmaps_pull(c, t, v, 0);
	cr_assert_eq(rc, 0, "pull after the restart: %s", rdmaps_strerror(rc));
	cr_assert_eq(v[7], rdmaps__f16_to_f32(rdmaps__f32_to_f16(expect)));
	cr_assert_eq(rdmaps_pull_format(t), RDMAPS_FMT_FP16);
	rdmaps_close(c);
	th_server_stop(&srv); /* its last checkpoint first, then the directory */
	th_rmdir(dir);
}
