/*
 * compress.c -- a gradient into fewer bytes (common/gradfmt.h), on the
 * worker, with error feedback for the formats that drop information.
 *
 * Error feedback (as in EF-signSGD and Deep Gradient Compression): the
 * worker keeps a residual, what earlier pushes did not send. Each push
 * compresses residual + gradient, and the part not sent becomes the new
 * residual, so nothing is lost, only delayed: over any number of steps,
 * what was sent plus the residual equals the sum of the gradients (up to
 * float rounding). bf16/fp16 keep no residual: their rounding error is
 * below the gradient's own noise, and the formats are exact for what they
 * hold.
 *
 * Top-k picks the k largest magnitudes without sorting: a radix select on
 * the float bits (magnitude order is integer order of the bits without the
 * sign). The pass that adds the gradient into the residual also counts
 * the top 10 bits of each sum's magnitude (its exponent and 2 bits of
 * mantissa); one more pass gathers, in ascending order, every element of
 * the bucket holding the k-th largest or above, usually a few times k,
 * and the select and the output work on those alone. Only when they are
 * too many for the stack does it fall back to passes over the whole
 * chunk. No allocation after cl_ef_init.
 *
 * Floating-point work is kept to the one add per element that error
 * feedback needs: the checks are integer tests of the bits (no value of
 * 2^127 or more in the residual or the gradient, so their sum is finite),
 * which also run where a CPU is emulated without float hardware (qemu's
 * TCG spends 9 ns per float add, 4 per integer test).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"
#include "gradfmt.h"
#include "half.h"
#include "log.h"

int cl_ef_init(struct cl_ef *ef, size_t n)
{
	ef->n = n;
	ef->residual = calloc(n ? n : 1, sizeof(float));
	return ef->residual ? 0 : RDMAPS_ENOMEM;
}

void cl_ef_close(struct cl_ef *ef)
{
	free(ef->residual);
	ef->residual = NULL;
	ef->n = 0;
}

static uint32_t mag(float f)
{
	return rdmaps__f32_bits(f) & 0x7fffffffu;
}

/* The top bits of a magnitude: the first pass's bucket. */
#define TOP_SHIFT 21
#define TOP_BUCKETS (1u << (31 - TOP_SHIFT))

/*
 * The k-th largest magnitude of a[0..n) (1 <= k <= n) and, in *ties, how
 * many elements of exactly that magnitude the top k holds. hist0 is the
 * first pass's histogram (the top 10 bits of each magnitude), which the
 * caller builds while it writes a: one pass over memory fewer.
 */
static uint32_t kth_largest(const float *a, size_t n, size_t k, const uint32_t *hist0,
			    size_t *ties)
{
	enum { CAND_MAX = 4096 };
	static const unsigned shift[3] = { TOP_SHIFT, 10, 0 };
	static const uint32_t width[3] = { TOP_BUCKETS - 1, 0x7ffu, 0x3ffu };
	uint32_t prefix = 0, mask = 0, cand[CAND_MAX];
	size_t need = k, ncand = 0;

	for (int p = 0; p < 3; p++) {
		uint32_t hist[2048] = { 0 };
		const uint32_t *h = p ? hist : hist0;
		uint32_t b = width[p] + 1;

		if (p && ncand) {
			/* the few in the first pass's bucket: no pass over all n */
			for (size_t c = 0; c < ncand; c++) {
				uint32_t m = cand[c];
				if ((m & mask) == prefix)
					hist[(m >> shift[p]) & width[p]]++;
			}
		} else {
			for (size_t i = 0; p && i < n; i++) {
				uint32_t m = mag(a[i]);
				if ((m & mask) == prefix)
					hist[(m >> shift[p]) & width[p]]++;
			}
		}
		/* from the largest bucket down, to the one holding the k-th */
		while (b-- > 0 && h[b] < need)
			need -= h[b];
		prefix |= b << shift[p];
		mask |= width[p] << shift[p];
		if (!p && h[b] <= CAND_MAX)
			for (size_t i = 0; i < n; i++) {
				uint32_t m = mag(a[i]);
				if ((m >> TOP_SHIFT) == b)
					cand[ncand++] = m;
			}
	}
	*ties = need;
	return prefix;
}

/*
 * Whether residual + g is finite everywhere, by a bound on the bits: no
 * magnitude of 2^127 or more on either side, so that the sum stays below
 * FLT_MAX (a non-finite value would poison the residual for every later
 * push). Integer work only; refuses the few finite sums from 2^127 up,
 * which no gradient reaches.
 */
bool cl_ef_fits(const float *r, const float *g, size_t n)
{
	uint32_t bad = 0;

	for (size_t i = 0; i < n; i++)
		bad |= (uint32_t)((rdmaps__f32_bits(r[i]) & 0x7fffffffu) >= 0x7f000000u) |
		       (uint32_t)((rdmaps__f32_bits(g[i]) & 0x7fffffffu) >= 0x7f000000u);
	return !bad;
}

/*
 * Write the top-k payload's entries from the candidates v[0..n), whose
 * elements are ix[i] (NULL: i), ascending: every magnitude above t, and
 * the first `ties` at t, k at most. What is sent leaves the residual r.
 * Returns how many were written.
 */
static size_t topk_emit(float *r, const float *v, const uint32_t *ix, size_t n, uint32_t t,
			size_t ties, size_t k, uint8_t *idx, uint8_t *val)
{
	size_t j = 0;

	for (size_t i = 0; i < n && j < k; i++) {
		uint32_t m = mag(v[i]), e = ix ? ix[i] : (uint32_t)i;
		if (m > t || (m == t && ties && ties--)) {
			memcpy(idx + 4 * j, &e, 4);
			memcpy(val + 4 * j, &r[e], 4);
			r[e] = 0.0f; /* sent: nothing of it stays behind */
			j++;
		}
	}
	return j;
}

/* cl_encode_topk once cl_ef_fits said yes */
static size_t topk_run(struct cl_ef *ef, const float *g, size_t k, void *out)
{
	enum { GATHER_MAX = 2048 };
	float *r = ef->residual;
	size_t n = ef->n, ties = 0, j = 0, above = 0, ng = 0;
	uint32_t t = 0, b = TOP_BUCKETS, kk, hist0[TOP_BUCKETS], h4[4][TOP_BUCKETS] = { { 0 } };
	uint32_t gi[GATHER_MAX];
	float gv[GATHER_MAX];
	uint8_t *idx = (uint8_t *)out + 4;
	size_t i = 0;

	if (k > n)
		k = n;
	/* the one float pass: four histograms in turn, since gradients crowd
	 * a few buckets and one histogram would make each increment wait for
	 * the last */
	for (; i + 4 <= n; i += 4)
		for (unsigned q = 0; q < 4; q++) {
			r[i + q] += g[i + q];
			h4[q][mag(r[i + q]) >> TOP_SHIFT]++;
		}
	for (; i < n; i++) {
		r[i] += g[i];
		h4[0][mag(r[i]) >> TOP_SHIFT]++;
	}
	for (unsigned q = 0; q < TOP_BUCKETS; q++)
		hist0[q] = h4[0][q] + h4[1][q] + h4[2][q] + h4[3][q];
	if (k) {
		/* the candidates: the whole chunk, or where they fit on the
		 * stack, those in the bucket of the k-th largest or above,
		 * gathered ascending (the rest is below the cut) */
		const float *v = r;
		const uint32_t *ix = NULL;
		size_t nv = n;

		while (b-- > 0 && above + hist0[b] < k)
			above += hist0[b];
		if (above + hist0[b] <= GATHER_MAX) {
			for (i = 0; i < n; i++)
				if ((mag(r[i]) >> TOP_SHIFT) >= b) {
					gi[ng] = (uint32_t)i;
					gv[ng++] = r[i];
				}
			memset(hist0, 0, sizeof(hist0));
			for (i = 0; i < ng; i++)
				hist0[mag(gv[i]) >> TOP_SHIFT]++;
			v = gv;
			ix = gi;
			nv = ng;
		}
		t = kth_largest(v, nv, k, hist0, &ties);
		j = topk_emit(r, v, ix, nv, t, ties, k, idx, idx + 4 * k);
	}
	kk = (uint32_t)j;
	memcpy(out, &kk, 4);
	return rdmaps__gradfmt_size(RDMAPS__GRAD_TOPK, n, j);
}

size_t cl_encode_topk(struct cl_ef *ef, const float *g, size_t k, void *out)
{
	return cl_ef_fits(ef->residual, g, ef->n) ? topk_run(ef, g, k, out) : 0;
}

/* residual += g, and the l1 norm of the sums in double, eight chains (one
 * chain waits on each add's latency). The order of the sums is part of the
 * format's reference (tests/rdma/test_wire.c). */
static double add_l1(float *restrict r, const float *restrict g, size_t n)
{
	double s[8] = { 0 };
	size_t i = 0;

	for (; i + 8 <= n; i += 8)
		for (size_t j = 0; j < 8; j++) {
			r[i + j] += g[i + j];
			s[j] += fabs((double)r[i + j]);
		}
	for (; i < n; i++) {
		r[i] += g[i];
		s[0] += fabs((double)r[i]);
	}
	return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* x < 0 for a number (-0 is not), as an integer test of its bits */
static uint32_t below_zero(float x)
{
	uint32_t u = rdmaps__f32_bits(x);

	return (u >> 31) & ((u & 0x7fffffffu) != 0);
}

/* cl_encode_sign once cl_ef_fits said yes */
static size_t sign_run(struct cl_ef *ef, const float *g, void *out)
{
	float *r = ef->residual;
	size_t n = ef->n, len = rdmaps__gradfmt_size(RDMAPS__GRAD_SIGN, n, 0), i = 0;
	uint8_t *bits = (uint8_t *)out + 4;
	/* finite: each sum is below FLT_MAX, and so is n of them in double */
	double l1 = add_l1(r, g, n);
	/* the mean magnitude: the scale that keeps the l1 norm */
	float scale = n ? (float)(l1 / (double)n) : 0.0f;

	uint32_t sbits = rdmaps__f32_bits(scale);

	memcpy(out, &scale, 4);
	memset(bits, 0, len - 4);
	/* the sign bits of the sums, and what is left of each: minus the
	 * scale with the sum's sign, made by bits (a branch on random signs
	 * costs more than the rest of the loop) */
	for (; i + 8 <= n; i += 8) {
		uint32_t b = 0;
		for (unsigned t = 0; t < 8; t++) {
			uint32_t neg = below_zero(r[i + t]);
			b |= neg << t;
			r[i + t] -= rdmaps__bits_f32(sbits ^ (neg << 31));
		}
		bits[i / 8] = (uint8_t)b;
	}
	for (; i < n; i++) {
		uint32_t neg = below_zero(r[i]);
		bits[i / 8] |= (uint8_t)(neg << (i % 8));
		r[i] -= rdmaps__bits_f32(sbits ^ (neg << 31));
	}
	return len;
}

size_t cl_encode_sign(struct cl_ef *ef, const float *g, void *out)
{
	return cl_ef_fits(ef->residual, g, ef->n) ? sign_run(ef, g, out) : 0;
}

size_t cl_encode_half(bool bf16, const float *g, size_t n, void *out)
{
	size_t len = rdmaps__gradfmt_size(bf16 ? RDMAPS__GRAD_BF16 : RDMAPS__GRAD_F16, n, 0);

	(bf16 ? rdmaps__f32_to_bf16_n : rdmaps__f32_to_f16_n)(out, g, n);
	if (n % 2) /* the padding is zero, as the format says */
		memset((uint16_t *)out + n, 0, 2);
	return len;
}

/* ---- a tensor's compressed pushes ----------------------------------------- */

_Static_assert((int)RDMAPS_FMT_BF16 == (int)RDMAPS__GRAD_BF16 &&
		       (int)RDMAPS_FMT_FP16 == (int)RDMAPS__GRAD_F16 &&
		       (int)RDMAPS_FMT_TOPK == (int)RDMAPS__GRAD_TOPK &&
		       (int)RDMAPS_FMT_SIGN == (int)RDMAPS__GRAD_SIGN,
	       "public formats are the wire's");

/* The values a top-k chunk of count elements sends: at least one, and
 * never more than its slot holds (4 + 8k bytes in chunk_elems x 4). */
static size_t topk_k(const rdmaps_tensor *t, double fraction, uint32_t count)
{
	double want = fraction * count; /* in (0, count / 2] */
	size_t k = (size_t)want, cap = ((size_t)t->chunk_elems * 4 - 4) / 8;

	k += (double)k < want; /* rounded up, without libm's ceil */
	k = k ? k : 1;
	k = k < cap ? k : cap;
	return k < count ? k : count;
}

static void wire_free(struct cl_wire *w)
{
	if (!w)
		return;
	rdmaps_deregister(w->mr);
	cl_ef_close(&w->ef);
	free(w->buf);
	free(w->len);
	free(w);
}

void cl_wire_free(rdmaps_tensor *t)
{
	wire_free(t->wire);
	t->wire = NULL;
}

static bool wire_busy(const struct cl_wire *w)
{
	return w && w->op && w->op->gen == w->op_gen && w->op->kind == OP_PUSH &&
	       w->op->status == RDMAPS_EAGAIN;
}

int rdmaps_set_push_format(rdmaps_client *c, rdmaps_tensor *t, enum rdmaps_format fmt,
			   double topk_fraction)
{
	struct cl_wire *w;
	int rc;

	if (!c || !t || t->c != c || (unsigned)fmt >= RDMAPS__GRADFMT_COUNT ||
	    (fmt == RDMAPS_FMT_TOPK && !(topk_fraction > 0.0 && topk_fraction <= 0.5)))
		return RDMAPS_EINVAL;
	if (wire_busy(t->wire))
		return RDMAPS_EBUSY;
	if (fmt == RDMAPS_FMT_F32) {
		cl_wire_free(t);
		return 0;
	}
	/* the new state made whole before the old one goes: a failure here
	 * leaves the tensor's format as it was */
	w = calloc(1, sizeof(*w));
	if (!w)
		return RDMAPS_ENOMEM;
	w->fmt = (unsigned)fmt;
	w->fraction = topk_fraction;
	w->stride = (size_t)t->chunk_elems * sizeof(float);
	/* aligned and whole pages: registered memory of its own */
	w->buf = aligned_alloc(4096, (t->nchunks * w->stride + 4095) & ~(size_t)4095);
	w->len = calloc(t->nchunks, sizeof(*w->len));
	rc = w->buf && w->len ? 0 : RDMAPS_ENOMEM;
	if (!rc && (fmt == RDMAPS_FMT_TOPK || fmt == RDMAPS_FMT_SIGN))
		rc = cl_ef_init(&w->ef, t->length);
	if (!rc)
		rc = rdmaps_register(c, w->buf, t->nchunks * w->stride, &w->mr);
	if (rc) {
		wire_free(w);
		return rc;
	}
	cl_wire_free(t);
	t->wire = w;
	return 0;
}

enum rdmaps_format rdmaps_push_format(const rdmaps_tensor *t)
{
	return t && t->wire ? (enum rdmaps_format)t->wire->fmt : RDMAPS_FMT_F32;
}

int cl_wire_check(const rdmaps_tensor *t, const float *g)
{
	const struct cl_wire *w = t->wire;
	const float *r = w->ef.residual;
	uint32_t bad = 0;

	if (wire_busy(w))
		return RDMAPS_EBUSY;
	/* one pass before anything moves: the residual is only touched once
	 * the whole push is known to encode */
	if (r) {
		bad = !cl_ef_fits(r, g, t->length);
	} else {
		/* what rounds to inf, which the server refuses: fp16 from 65520,
		 * bf16 from halfway past its largest finite value (0x7f7f) */
		uint32_t lim = w->fmt == RDMAPS__GRAD_F16 ? 0x477ff000u : 0x7f7f8000u;
		for (uint64_t i = 0; i < t->length; i++)
			bad |= (rdmaps__f32_bits(g[i]) & 0x7fffffffu) >= lim;
	}
	if (bad) {
		log_error("tensor '%s': push refused: a value its format cannot carry (NaN, inf%s)",
			  t->name, w->fmt == RDMAPS__GRAD_F16	 ? ", or past fp16's 65504"
				   : w->fmt == RDMAPS__GRAD_BF16 ? ", or past bf16's 3.39e38"
								 : ", or 2^127 and past in the gradient or "
								   "the residual");
		return RDMAPS_EINVAL;
	}
	return 0;
}

void cl_wire_encode(rdmaps_tensor *t, const float *g, rdmaps_op *op)
{
	struct cl_wire *w = t->wire;

	for (uint32_t ch = 0; ch < t->nchunks; ch++) {
		uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems, ch);
		size_t off = (size_t)ch * t->chunk_elems, len;
		void *out = w->buf + (size_t)ch * w->stride;
		/* the chunk's own share of the residual */
		struct cl_ef part = { .residual = w->ef.residual ? w->ef.residual + off : NULL,
				      .n = count };

		switch (w->fmt) {
		case RDMAPS__GRAD_TOPK:
			len = topk_run(&part, g + off, topk_k(t, w->fraction, count), out);
			break;
		case RDMAPS__GRAD_SIGN:
			len = sign_run(&part, g + off, out);
			break;
		default:
			len = cl_encode_half(w->fmt == RDMAPS__GRAD_BF16, g + off, count, out);
			break;
		}
		w->len[ch] = (uint32_t)len;
	}
	op->wire = true;
	w->op = op;
	w->op_gen = op->gen;
}
