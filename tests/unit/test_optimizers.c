/*
 * Server-side optimizers (server/opt_*.c) against an independent reference.
 *
 * The reference below is written straight from PyTorch's definitions
 * (torch.optim.SGD with momentum/nesterov and dampening=0, Adagrad with
 * lr_decay=0 and initial_accumulator_value=0, Adam, AdamW; amsgrad and
 * maximize off) in double precision, shares no code with the server, and
 * resolves the defaults of client/rdmaps.h by itself.
 *
 * Error bound: every parameter after every step must satisfy
 *     |p_server - p_ref| <= REL_TOL * |p_ref| + ABS_TOL
 * with REL_TOL = 1e-4 and ABS_TOL = 1e-5, parameters started in [-1, 1] and
 * kept below 4 in magnitude by the chosen learning rates (asserted: it is
 * the premise). Why it holds: the server computes in float32, unit roundoff
 * u = 2^-24 ~ 6e-8. Each step rounds the new p once (<= u|p|) and computes
 * the update with a relative error of a few u; the update is a small part
 * of p. No step amplifies an earlier error: the parameter recurrence has
 * derivative 1 - lr*wd*(...) <= 1 in p, and the state recurrences are
 * contractions (mu, beta < 1) or, for Adagrad, sums of positive terms whose
 * relative error stays a few u. So after T = 200 steps, if every rounding
 * went the same way, |err| <= ~T * 2u * max|p| ~ 1e-4, which the relative
 * term covers unless p ends far below its largest value; near a zero
 * crossing the roundings, being independent, add up like a random walk,
 * ~sqrt(T) * u * max|p| ~ 3e-6, which ABS_TOL covers 3 times over. The
 * largest error observed is printed per optimizer: about 1.6e-6, at most
 * ~5% of the bound. The clones of each apply() (default/avx2/avx512f) give
 * the same bits: the loops are element-wise and -std=c17 turns off FMA
 * contraction. A wrong formula (bias correction off by one step, Nesterov
 * without its look-ahead, eps inside the square root, L2 instead of
 * decoupled decay, a wrong default) misses the bound by far within a few
 * steps.
 *
 * The optimizer state is compared too (momentum buffer, Adagrad sum, Adam
 * moments), at the offsets optimizer.h documents: state[j * n + i]. A chunk
 * applied as several runs (optimizer.h: state arrays `stride` apart) must
 * give exactly the bits of one call, as the store cuts chunks that way.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "optimizer.h"
#include "rdmaps.h"
#include "server.h"

#define REL_TOL 1e-4
#define ABS_TOL 1e-5
#define STATE_TOL 1e-4 /* of the largest magnitude the value has had */

static const char *const opt_name[] = {
	[RDMAPS_OPT_SGD] = "sgd",         [RDMAPS_OPT_MOMENTUM] = "momentum",
	[RDMAPS_OPT_NESTEROV] = "nesterov", [RDMAPS_OPT_ADAGRAD] = "adagrad",
	[RDMAPS_OPT_ADAM] = "adam",       [RDMAPS_OPT_ADAMW] = "adamw",
};

/* ---- deterministic random numbers (splitmix64) ---------------------------- */

static uint64_t rng;

static double urand(void) /* [0, 1) */
{
	uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	z ^= z >> 31;
	return (double)(z >> 11) * 0x1p-53;
}

static double nrand(void) /* standard normal, Box-Muller */
{
	double u1 = urand(), u2 = urand();
	return sqrt(-2.0 * log(1.0 - u1)) * cos(2.0 * M_PI * u2);
}

/* ---- the reference: PyTorch's formulas, in double --------------------------- */

struct ref {
	enum rdmaps_optimizer kind;
	double lr, mu, b1, b2, eps, wd;
	size_t n;
	uint64_t t;   /* steps taken, PyTorch's state['step'] */
	double *p;
	double *buf;  /* momentum_buffer | Adagrad state_sum | Adam exp_avg */
	double *sq;   /* Adam exp_avg_sq */
	double *buf_max, *sq_max; /* largest |buf|, |sq| so far, for state_close */
};

/* The wire carries float32, so a default "0.9" is the float 0.9f. */
static double or_default(float v, float def)
{
	return v != 0.0f ? (double)v : (double)def;
}

static void ref_init(struct ref *r, enum rdmaps_optimizer kind, const struct rdmaps_wire_hyper *h,
		     const float *p0, size_t n)
{
	memset(r, 0, sizeof(*r));
	r->kind = kind;
	r->n = n;
	r->lr = h->lr;
	r->wd = h->weight_decay;
	r->mu = or_default(h->momentum, 0.9f);
	r->b1 = or_default(h->beta1, 0.9f);
	r->b2 = or_default(h->beta2, 0.999f);
	r->eps = or_default(h->eps, kind == RDMAPS_OPT_ADAGRAD ? 1e-10f : 1e-8f);
	r->p = calloc(n, sizeof(double));
	r->buf = calloc(n, sizeof(double));
	r->sq = calloc(n, sizeof(double));
	r->buf_max = calloc(n, sizeof(double));
	r->sq_max = calloc(n, sizeof(double));
	cr_assert(r->p && r->buf && r->sq && r->buf_max && r->sq_max);
	for (size_t i = 0; i < n; i++)
		r->p[i] = p0[i];
}

static void ref_free(struct ref *r)
{
	free(r->p);
	free(r->buf);
	free(r->sq);
	free(r->buf_max);
	free(r->sq_max);
}

static void ref_step(struct ref *r, const float *grad)
{
	r->t++;
	for (size_t i = 0; i < r->n; i++) {
		double g = grad[i], p = r->p[i];

		switch (r->kind) {
		case RDMAPS_OPT_SGD:
			g += r->wd * p;
			p -= r->lr * g;
			break;
		case RDMAPS_OPT_MOMENTUM:
		case RDMAPS_OPT_NESTEROV:
			g += r->wd * p;
			/* PyTorch: buf = clone(d_p) on the first step, else mu*buf + d_p */
			r->buf[i] = r->t == 1 ? g : r->mu * r->buf[i] + g;
			if (r->kind == RDMAPS_OPT_NESTEROV)
				g += r->mu * r->buf[i];
			else
				g = r->buf[i];
			p -= r->lr * g;
			break;
		case RDMAPS_OPT_ADAGRAD:
			g += r->wd * p;
			r->buf[i] += g * g;
			p -= r->lr * g / (sqrt(r->buf[i]) + r->eps);
			break;
		case RDMAPS_OPT_ADAM:
		case RDMAPS_OPT_ADAMW: {
			if (r->kind == RDMAPS_OPT_ADAMW)
				p *= 1.0 - r->lr * r->wd;
			else
				g += r->wd * p;
			r->buf[i] += (g - r->buf[i]) * (1.0 - r->b1); /* exp_avg.lerp_ */
			r->sq[i] = r->sq[i] * r->b2 + (1.0 - r->b2) * g * g;
			double bc1 = 1.0 - pow(r->b1, (double)r->t);
			double bc2 = 1.0 - pow(r->b2, (double)r->t);
			double denom = sqrt(r->sq[i]) / sqrt(bc2) + r->eps;
			p -= r->lr / bc1 * r->buf[i] / denom;
			break;
		}
		}
		r->p[i] = p;
		r->buf_max[i] = fmax(r->buf_max[i], fabs(r->buf[i]));
		r->sq_max[i] = fmax(r->sq_max[i], fabs(r->sq[i]));
	}
}

/* ---- comparison -------------------------------------------------------------- */

static double worst; /* largest |error| / bound seen by the current test */
static double worst_abs, max_param, worst_state;

static void param_close(const char *what, size_t step, size_t i, float got, double want)
{
	double err = fabs((double)got - want), bound = REL_TOL * fabs(want) + ABS_TOL;

	if (err > worst_abs)
		worst_abs = err;
	if (fabs(want) > max_param)
		max_param = fabs(want);

	if (!(err <= bound)) /* also catches NaN */
		cr_assert_fail("%s: step %zu, param %zu: server %.9g, reference %.9g, |err| %.3g > %.3g",
			       what, step, i, (double)got, want, err, bound);
	if (err / bound > worst)
		worst = err / bound;
}

/*
 * State: the momentum buffer and Adam's first moment may cancel to near 0,
 * so their error is bounded against the largest magnitude they have had:
 * each step adds about u of it and scales older error by mu or beta1, so the
 * error stays below ~2u / (1 - mu) of it, 1.2e-5 for mu = 0.99. The positive
 * sums (Adagrad's, Adam's v) have a relative error of a few u.
 */
static void state_close(const char *what, size_t i, float got, double want, double max)
{
	double err = fabs((double)got - want), bound = STATE_TOL * max;

	if (err > worst_state * bound)
		worst_state = bound > 0 ? err / bound : worst_state;
	if (!(err <= bound))
		cr_assert_fail("%s: state %zu: server %.9g, reference %.9g, |err| %.3g > %.3g", what, i,
			       (double)got, want, err, bound);
}

/* ---- one optimizer through apply() ----------------------------------------- */

struct setting {
	const char *label;
	struct rdmaps_wire_hyper h;
};

/* Gradients with per-element scales over three decades, and some always 0. */
static void make_grad(float *g, const float *scale, size_t n)
{
	for (size_t i = 0; i < n; i++)
		g[i] = (float)(scale[i] * nrand());
}

static void make_scales(float *scale, size_t n)
{
	for (size_t i = 0; i < n; i++)
		scale[i] = i % 41 == 7 ? 0.0f : (float)pow(10.0, -2.0 + 2.5 * urand());
}

static const struct srv_optimizer *find(enum rdmaps_optimizer kind)
{
	const struct srv_optimizer *o = srv_optimizer_find(opt_name[kind]);
	cr_assert_not_null(o, "optimizer %s registered", opt_name[kind]);
	return o;
}

static void run_apply(enum rdmaps_optimizer kind, const struct setting *s, size_t n, size_t steps)
{
	const struct srv_optimizer *o = find(kind);
	float *p = malloc(n * sizeof(float)), *g = malloc(n * sizeof(float));
	float *scale = malloc(n * sizeof(float));
	float *state = o->state_per_param ? calloc(n * o->state_per_param, sizeof(float)) : NULL;
	char what[128];
	struct ref r;

	cr_assert(p && g && scale && (state || !o->state_per_param));
	snprintf(what, sizeof(what), "%s [%s] n=%zu", o->name, s->label, n);
	cr_assert_eq(o->check(&s->h), 0, "%s: valid hyper-parameters refused", what);
	rng = 0x5eed0000u + n * 131u + (uint64_t)kind;
	for (size_t i = 0; i < n; i++)
		p[i] = (float)(2.0 * urand() - 1.0);
	make_scales(scale, n);
	ref_init(&r, kind, &s->h, p, n);
	for (size_t t = 0; t < steps; t++) {
		make_grad(g, scale, n);
		o->apply(p, state, n, g, n, &s->h, t);
		ref_step(&r, g);
		for (size_t i = 0; i < n; i++)
			param_close(what, t, i, p[i], r.p[i]);
	}
	/* state at the documented offsets: array j of element i is state[j*n + i] */
	for (size_t i = 0; i < n && o->state_per_param; i++) {
		state_close(what, i, state[i], r.buf[i], r.buf_max[i]);
		if (o->state_per_param > 1)
			state_close(what, i, state[n + i], r.sq[i], r.sq_max[i]);
	}
	ref_free(&r);
	free(p);
	free(g);
	free(scale);
	free(state);
}

static void run_settings(enum rdmaps_optimizer kind, const struct setting *s, size_t count)
{
	worst = worst_abs = max_param = worst_state = 0.0;
	for (size_t k = 0; k < count; k++) {
		run_apply(kind, &s[k], 333, 200); /* odd n: vector bodies and their tails */
		run_apply(kind, &s[k], 1000, 200);
		for (size_t n = 1; n <= 40; n++) /* every tail length of 4/8/16-wide loops */
			run_apply(kind, &s[k], n, 10);
	}
	printf("%s: worst parameter error %.3f of the bound (%.3g absolute), max |p| %.3g, "
	       "worst state error %.3f of its bound\n",
	       opt_name[kind], worst, worst_abs, max_param, worst_state);
	cr_assert_lt(max_param, 4.0, "the error bound assumes |p| < 4");
}

#define H(...) ((struct rdmaps_wire_hyper){ __VA_ARGS__ })
#define RUN(kind, settings) run_settings(kind, settings, sizeof(settings) / sizeof(settings[0]))

Test(optimizers, sgd_matches_reference)
{
	static const struct setting s[] = {
		{ "lr 0.02", H(.lr = 0.02f) },
		{ "lr 0.01 wd 0.01", H(.lr = 0.01f, .weight_decay = 0.01f) },
		{ "lr 0.01 wd 0.5", H(.lr = 0.01f, .weight_decay = 0.5f) },
	};
	RUN(RDMAPS_OPT_SGD, s);
}

static const struct setting momentum_settings[] = {
	{ "default momentum", H(.lr = 0.002f) },
	{ "m 0.5 wd 0.01", H(.lr = 0.01f, .momentum = 0.5f, .weight_decay = 0.01f) },
	{ "m 0.99 wd 0.001", H(.lr = 0.0002f, .momentum = 0.99f, .weight_decay = 0.001f) },
	{ "m 0.9 wd 0.1", H(.lr = 0.002f, .momentum = 0.9f, .weight_decay = 0.1f) },
};

Test(optimizers, momentum_matches_reference)
{
	RUN(RDMAPS_OPT_MOMENTUM, momentum_settings);
}

Test(optimizers, nesterov_matches_reference)
{
	RUN(RDMAPS_OPT_NESTEROV, momentum_settings);
}

Test(optimizers, adagrad_matches_reference)
{
	static const struct setting s[] = {
		{ "default eps", H(.lr = 0.1f) },
		{ "eps 1e-6 wd 0.01", H(.lr = 0.05f, .eps = 1e-6f, .weight_decay = 0.01f) },
		{ "eps 1e-3 wd 0.2", H(.lr = 0.3f, .eps = 1e-3f, .weight_decay = 0.2f) },
	};
	RUN(RDMAPS_OPT_ADAGRAD, s);
}

static const struct setting adam_settings[] = {
	{ "defaults", H(.lr = 0.001f) },
	{ "defaults lr 0.01 wd 0.01", H(.lr = 0.01f, .weight_decay = 0.01f) },
	{ "b1 0.8 b2 0.99 eps 1e-6 wd 0.1",
	  H(.lr = 0.005f, .beta1 = 0.8f, .beta2 = 0.99f, .eps = 1e-6f, .weight_decay = 0.1f) },
	{ "b1 0.5 b2 0.9999 eps 1e-4", H(.lr = 0.003f, .beta1 = 0.5f, .beta2 = 0.9999f, .eps = 1e-4f) },
};

Test(optimizers, adam_matches_reference)
{
	RUN(RDMAPS_OPT_ADAM, adam_settings);
}

Test(optimizers, adamw_matches_reference)
{
	RUN(RDMAPS_OPT_ADAMW, adam_settings);
}

/* ---- hyper-parameters left at 0 --------------------------------------------- */

/* Run the same gradients through two settings; the results must be identical. */
static void same_result(enum rdmaps_optimizer kind, struct rdmaps_wire_hyper a,
			struct rdmaps_wire_hyper b, bool expect_same)
{
	enum { N = 257, STEPS = 20 };
	const struct srv_optimizer *o = find(kind);
	static float pa[N], pb[N], sa[2 * N], sb[2 * N], g[N];

	cr_assert_eq(o->check(&a), 0);
	cr_assert_eq(o->check(&b), 0);
	rng = 42;
	for (int i = 0; i < N; i++)
		pa[i] = pb[i] = (float)(2.0 * urand() - 1.0);
	memset(sa, 0, sizeof(sa));
	memset(sb, 0, sizeof(sb));
	for (int t = 0; t < STEPS; t++) {
		for (int i = 0; i < N; i++)
			g[i] = (float)nrand();
		o->apply(pa, sa, N, g, N, &a, (uint64_t)t);
		o->apply(pb, sb, N, g, N, &b, (uint64_t)t);
	}
	bool same = !memcmp(pa, pb, sizeof(pa)) && !memcmp(sa, sb, sizeof(sa));
	cr_assert_eq(same, expect_same, "%s: results %s", o->name,
		     expect_same ? "differ from the explicit defaults" : "ignore the hyper-parameter");
}

Test(optimizers, zero_takes_documented_default)
{
	for (int k = RDMAPS_OPT_MOMENTUM; k <= RDMAPS_OPT_NESTEROV; k++) {
		same_result(k, H(.lr = 0.01f), H(.lr = 0.01f, .momentum = 0.9f), true);
		same_result(k, H(.lr = 0.01f), H(.lr = 0.01f, .momentum = 0.8f), false);
	}
	same_result(RDMAPS_OPT_ADAGRAD, H(.lr = 0.1f), H(.lr = 0.1f, .eps = 1e-10f), true);
	same_result(RDMAPS_OPT_ADAGRAD, H(.lr = 0.1f), H(.lr = 0.1f, .eps = 1e-1f), false);
	for (int k = RDMAPS_OPT_ADAM; k <= RDMAPS_OPT_ADAMW; k++) {
		struct rdmaps_wire_hyper def = H(.lr = 0.01f, .weight_decay = 0.01f);
		struct rdmaps_wire_hyper full = H(.lr = 0.01f, .weight_decay = 0.01f, .beta1 = 0.9f,
						  .beta2 = 0.999f, .eps = 1e-8f);
		struct rdmaps_wire_hyper b1 = def, b2 = def, eps = def;

		same_result(k, def, full, true);
		b1.beta1 = 0.9f;   /* each default on its own */
		b2.beta2 = 0.999f;
		eps.eps = 1e-8f;
		same_result(k, def, b1, true);
		same_result(k, def, b2, true);
		same_result(k, def, eps, true);
		b1.beta1 = 0.8f;
		b2.beta2 = 0.99f;
		eps.eps = 1e-2f;
		same_result(k, def, b1, false);
		same_result(k, def, b2, false);
		same_result(k, def, eps, false);
	}
}

/* ---- runs of a chunk -------------------------------------------------------------- */

/*
 * The store applies a chunk as runs (its first floats apart, to align the
 * rest: store.c srv_chunk_opt); each run gets pointers to its first element
 * and the chunk's count as the state stride. Whatever the cuts, the
 * parameters and every state array must be bit-identical to one call.
 */
Test(optimizers, runs_of_a_chunk_give_the_same_bits)
{
	enum { N = 1000, STEPS = 12 };
	static const size_t cuts[][3] = { { 1, 2, N }, { 10, N, N }, { 15, 500, N },
					  { 333, 334, N }, { 0, 999, N }, { 7, 8, 9 } };
	static float pa[N], pb[N], sa[2 * N], sb[2 * N], g[N];

	for (int k = RDMAPS_OPT_SGD; k <= RDMAPS_OPT_ADAMW; k++) {
		const struct srv_optimizer *o = find(k);
		const struct rdmaps_wire_hyper h = H(.lr = 0.01f, .weight_decay = 0.01f);

		for (size_t c = 0; c < sizeof(cuts) / sizeof(cuts[0]); c++) {
			rng = 7 + c;
			for (int i = 0; i < N; i++)
				pa[i] = pb[i] = (float)(2.0 * urand() - 1.0);
			memset(sa, 0, sizeof(sa));
			memset(sb, 0, sizeof(sb));
			for (int t = 0; t < STEPS; t++) {
				size_t from = 0;
				for (int i = 0; i < N; i++)
					g[i] = (float)nrand();
				o->apply(pa, sa, N, g, N, &h, (uint64_t)t);
				for (size_t r = 0; r <= 3; r++) {
					size_t to = r < 3 ? cuts[c][r] : N;
					if (to > from)
						o->apply(pb + from, o->state_per_param ? sb + from : NULL, N,
							 g + from, to - from, &h, (uint64_t)t);
					from = to > from ? to : from;
				}
			}
			cr_assert_eq(memcmp(pa, pb, sizeof(pa)), 0, "%s, cuts %zu %zu %zu: parameters",
				     o->name, cuts[c][0], cuts[c][1], cuts[c][2]);
			cr_assert_eq(memcmp(sa, sb, sizeof(sa)), 0, "%s, cuts %zu %zu %zu: state",
				     o->name, cuts[c][0], cuts[c][1], cuts[c][2]);
		}
	}
}

/* ---- check() -------------------------------------------------------------------- */

Test(optimizers, registry_and_state_sizes)
{
	static const unsigned k[] = { 0, 1, 1, 1, 2, 2 };

	for (int i = RDMAPS_OPT_SGD; i <= RDMAPS_OPT_ADAMW; i++) {
		const struct srv_optimizer *o = find(i);
		cr_assert_str_eq(o->name, opt_name[i]);
		cr_assert_eq(o->state_per_param, k[i], "%s keeps %u floats per parameter", o->name,
			     o->state_per_param);
	}
}

enum field { F_LR, F_MOMENTUM, F_BETA1, F_BETA2, F_EPS, F_WD };

static float *field(struct rdmaps_wire_hyper *h, enum field f)
{
	float *a[] = { &h->lr, &h->momentum, &h->beta1, &h->beta2, &h->eps, &h->weight_decay };
	return a[f];
}

static bool reads(enum rdmaps_optimizer kind, enum field f)
{
	switch (f) {
	case F_LR:
	case F_WD:
		return true;
	case F_MOMENTUM:
		return kind == RDMAPS_OPT_MOMENTUM || kind == RDMAPS_OPT_NESTEROV;
	case F_BETA1:
	case F_BETA2:
		return kind == RDMAPS_OPT_ADAM || kind == RDMAPS_OPT_ADAMW;
	case F_EPS:
		return kind == RDMAPS_OPT_ADAGRAD || kind == RDMAPS_OPT_ADAM ||
		       kind == RDMAPS_OPT_ADAMW;
	}
	return false;
}

Test(optimizers, check_refuses_bad_hyper_parameters)
{
	/* lr, eps, weight_decay: finite and >= 0; momentum, betas: [0, 1) */
	static const float bad_nonneg[] = { -1e-6f, -1.0f, NAN, -NAN, INFINITY, -INFINITY };
	static const float good_nonneg[] = { 0.0f, 1e-12f, 0.5f, 3.0f };
	static const float bad_unit[] = { 1.0f, 1.5f, -1e-6f, -0.5f, NAN, INFINITY, -INFINITY };
	static const float good_unit[] = { 0.0f, 0.5f, 0.9f, 0.999f, 0.99999994f };

	for (int k = RDMAPS_OPT_SGD; k <= RDMAPS_OPT_ADAMW; k++) {
		const struct srv_optimizer *o = find(k);
		const struct rdmaps_wire_hyper base = H(.lr = 0.01f);

		cr_assert_eq(o->check(&base), 0, "%s: lr only", o->name);
		for (int f = F_LR; f <= F_WD; f++) {
			bool unit = f == F_MOMENTUM || f == F_BETA1 || f == F_BETA2;
			const float *bad = unit ? bad_unit : bad_nonneg;
			const float *good = unit ? good_unit : good_nonneg;
			size_t nbad = unit ? 7 : 6, ngood = unit ? 5 : 4;

			for (size_t i = 0; i < ngood; i++) {
				struct rdmaps_wire_hyper h = base;
				*field(&h, f) = good[i];
				cr_assert_eq(o->check(&h), 0, "%s: field %d = %g refused", o->name, f,
					     (double)good[i]);
			}
			if (!reads(k, f))
				continue; /* fields an optimizer does not read are ignored */
			for (size_t i = 0; i < nbad; i++) {
				struct rdmaps_wire_hyper h = base;
				*field(&h, f) = bad[i];
				cr_assert_eq(o->check(&h), RDMAPS_EINVAL, "%s: field %d = %g accepted",
					     o->name, f, (double)bad[i]);
			}
		}
	}
}

/* ---- through the store: per-chunk state and step counting -------------------- */

static struct srv_store store;

static void store_fini(void)
{
	srv_store_fini(&store);
}

static int declare(struct srv_tensor **t, const char *name, const char *opt,
		   struct rdmaps_wire_hyper h, uint64_t length, float init)
{
	struct rdmaps_msg_declare m = { 0 };
	bool created;

	m.length = length;
	m.init_value = init;
	m.hyper = h;
	snprintf(m.optimizer, sizeof(m.optimizer), "%s", opt);
	snprintf(m.name, sizeof(m.name), "%s", name);
	return srv_store_declare(&store, &m, NULL, t, &created);
}

static void store_init(uint32_t chunk_elems)
{
	struct srv_config cfg = { .max_tensors = 16, .chunk_elems = chunk_elems,
				  .max_tensor_bytes = 1ull << 30, .max_total_bytes = 1ull << 30 };
	cr_assert_eq(srv_store_init(&store, &cfg), 0);
}

Test(optimizers, store_refuses_bad_hyper_parameters, .fini = store_fini)
{
	struct srv_tensor *t;

	store_init(1024);
	cr_assert_eq(declare(&t, "a", "adam", H(.lr = 0.01f, .beta2 = 1.0f), 10, 0), RDMAPS_EINVAL);
	cr_assert_eq(declare(&t, "b", "momentum", H(.lr = 0.01f, .momentum = -0.1f), 10, 0),
		     RDMAPS_EINVAL);
	cr_assert_eq(declare(&t, "c", "sgd", H(.lr = NAN), 10, 0), RDMAPS_EINVAL);
	cr_assert_eq(declare(&t, "d", "adagrad", H(.lr = 0.1f, .eps = -1e-10f), 10, 0),
		     RDMAPS_EINVAL);
	cr_assert_eq(declare(&t, "e", "adamw", H(.lr = 0.1f, .weight_decay = INFINITY), 10, 0),
		     RDMAPS_EINVAL);
	cr_assert_eq(declare(&t, "f", "nesterov", H(.lr = 0.1f), 10, 0), 0);
}

/*
 * A tensor of 5 chunks (256, 256, 256, 256 and an odd 87 elements), each
 * folded a different number of times in interleaved order: each chunk is an
 * optimizer instance of its own, with its own step count (Adam's bias
 * correction) and its own slice of the state.
 */
Test(optimizers, chunks_keep_their_own_state_and_steps, .fini = store_fini)
{
	enum { CHUNK = 256, LENGTH = 4 * 256 + 87, NCHUNK = 5 };
	static const unsigned folds[NCHUNK] = { 1, 7, 2, 13, 5 };
	static const struct rdmaps_wire_hyper hyper[] = {
		[RDMAPS_OPT_SGD] = H(.lr = 0.05f, .weight_decay = 0.01f),
		[RDMAPS_OPT_MOMENTUM] = H(.lr = 0.01f, .weight_decay = 0.01f),
		[RDMAPS_OPT_NESTEROV] = H(.lr = 0.01f, .momentum = 0.8f),
		[RDMAPS_OPT_ADAGRAD] = H(.lr = 0.1f, .weight_decay = 0.01f),
		[RDMAPS_OPT_ADAM] = H(.lr = 0.01f, .weight_decay = 0.01f),
		[RDMAPS_OPT_ADAMW] = H(.lr = 0.01f, .beta1 = 0.8f, .weight_decay = 0.1f),
	};
	static float g[CHUNK], out[CHUNK], scale[CHUNK];
	const float init = 0.5f;

	store_init(CHUNK);
	worst = worst_state = 0.0;
	for (int k = RDMAPS_OPT_SGD; k <= RDMAPS_OPT_ADAMW; k++) {
		struct srv_tensor *t;
		struct ref r[NCHUNK];
		unsigned done[NCHUNK] = { 0 };
		char what[64];

		snprintf(what, sizeof(what), "tensor with %s", opt_name[k]);
		cr_assert_eq(declare(&t, opt_name[k], opt_name[k], hyper[k], LENGTH, init), 0);
		cr_assert_eq(t->nchunks, NCHUNK);
		cr_assert_eq(t->opt, find(k));
		rng = 1000 + (uint64_t)k;
		make_scales(scale, CHUNK);
		for (uint32_t c = 0; c < NCHUNK; c++) {
			uint32_t n = rdmaps__chunk_count(LENGTH, CHUNK, c);
			for (uint32_t i = 0; i < n; i++)
				out[i] = init;
			ref_init(&r[c], k, &hyper[k], out, n);
		}
		/* round robin over the chunks that still have folds to do */
		for (bool more = true; more;) {
			more = false;
			for (uint32_t c = 0; c < NCHUNK; c++) {
				uint32_t n = rdmaps__chunk_count(LENGTH, CHUNK, c);
				if (done[c] == folds[c])
					continue;
				make_grad(g, scale, n);
				srv_chunk_apply(t, c, g, n, false);
				ref_step(&r[c], g);
				done[c]++;
				more = true;
			}
		}
		for (uint32_t c = 0; c < NCHUNK; c++) {
			uint32_t n = rdmaps__chunk_count(LENGTH, CHUNK, c);
			const uint8_t *mem = srv_chunk(t, c);
			const float *st = t->state ? t->state + (size_t)c * CHUNK * t->opt->state_per_param
						   : NULL;

			cr_assert_eq(t->steps[c], folds[c], "%s chunk %u: %llu steps", what, c,
				     (unsigned long long)t->steps[c]);
			memcpy(out, mem + RDMAPS_CHUNK_HDR, n * sizeof(float));
			cr_assert(rdmaps__chunk_consistent((const struct rdmaps_chunk_hdr *)mem, out, n),
				  "%s chunk %u readable", what, c);
			for (uint32_t i = 0; i < n; i++)
				param_close(what, folds[c], c * CHUNK + i, out[i], r[c].p[i]);
			/* chunk c's slice: state + c*chunk_elems*k, then state[j*n + i] */
			for (uint32_t i = 0; st && i < n; i++) {
				state_close(what, c * CHUNK + i, st[i], r[c].buf[i],
					    r[c].buf_max[i]);
				if (t->opt->state_per_param > 1)
					state_close(what, c * CHUNK + i, st[n + i], r[c].sq[i],
						    r[c].sq_max[i]);
			}
			ref_free(&r[c]);
		}
	}
	printf("store: worst parameter error %.3f of the bound, worst state error %.3f of its bound\n",
	       worst, worst_state);
}
