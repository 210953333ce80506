/*
 * workload.h -- the rdmaps side of rdmaps-bench, shared by workload.c (the
 * phases W worker threads run), paired.c (raw and rdmaps ops interleaved)
 * and clients.c (connections, tensors, buffers). Private to tools/bench.
 */
#ifndef RDMAPS_BENCH_WORKLOAD_H
#define RDMAPS_BENCH_WORKLOAD_H

#include <pthread.h>
#include <stdatomic.h>

#include "bench.h"
#include "rdmaps.h"

#define WL_MAX_DEPTH 32u
#define WL_WRITER_DEPTH 4u
#define WL_TIMEOUT_MS 60000
#define WL_TORN_MIN_S 3.0 /* torn-read phases run at least this long */
/* ...and, up to WL_TORN_MAX_S, at least this many pulls: a rate under 1 %
 * means little from 39 pulls (a 4 MiB pull takes ~80 ms in the VM) */
#define WL_TORN_MIN_OPS 300u
#define WL_TORN_MAX_S 30.0

enum wl_op { WL_PULL, WL_PULL_RELAXED, WL_PUSH, WL_PUSH_FOLDED, WL_PUSHPULL, WL_TORN };

extern const char *const wl_op_name[];

struct wl;
struct wl_worker;

/*
 * How an op touches the tensor (--access). describe() shapes the tensor of
 * a size; the hooks do one op; async hooks may be NULL (no async form: the
 * bw rows are skipped, and so is the torn writer, which pushes async).
 * only_ops: the ops this access can run (1u << enum wl_op); the others are
 * skipped with a printed reason.
 */
struct wl_access {
	const char *name;
	void (*describe)(const struct wl *wl, uint64_t size, struct rdmaps_tensor_desc *d);
	int (*pull)(struct wl_worker *w, rdmaps_tensor *t, float *dst, unsigned flags);
	int (*push)(struct wl_worker *w, rdmaps_tensor *t, const float *g, unsigned flags);
	int (*pull_async)(struct wl_worker *w, rdmaps_tensor *t, float *dst, unsigned flags,
			  rdmaps_op **op);
	int (*push_async)(struct wl_worker *w, rdmaps_tensor *t, const float *g, unsigned flags,
			  rdmaps_op **op);
	unsigned only_ops;
	const char *why_not; /* printed for a skipped op */
	/* BSP/SSP: a worker's pull can wait for the others' pushes, so a phase
	 * that pushes ends at one clock for all (never with one worker waiting
	 * for another that stopped: it would be evicted after --evict-ms) */
	bool lockstep;
};

/* sparse: rows of WL_ROW_DIM floats; an op of S bytes names S / row bytes
 * (at least one) distinct random rows of a table WL_ROW_SPREAD times that,
 * WL_ROW_MIN_TABLE rows at least */
#define WL_ROW_DIM 32u
#define WL_ROW_SPREAD 4u
#define WL_ROW_MIN_TABLE 64u
size_t wl_rows_per_op(uint64_t size);
size_t wl_rows_table(uint64_t size);
/* ssp: the staleness bound of its tensors */
#define WL_SSP_STALENESS 2u

extern const struct wl_access wl_access_modes[];

struct wl_worker {
	struct wl *wl;
	unsigned idx;
	bool writer; /* torn: the extra client that pushes */
	pthread_t th;
	rdmaps_client *c;
	rdmaps_tensor *t[BENCH_MAX_SIZES];
	float *grad, *dst[WL_MAX_DEPTH];
	rdmaps_mr *mr[WL_MAX_DEPTH + 1];
	unsigned ndst;
	struct rdmaps_hist hist;
	uint64_t n, t0, t1;
	int err;
	struct rdmaps_client_stats s0, s1;
};

struct wl {
	const struct bench_opts *o;
	const struct wl_access *acc;
	unsigned nw; /* workers, plus the writer when torn reads are measured */
	struct wl_worker *w;
	bool threads_up;
	pthread_barrier_t bar;
	/* the phase every thread runs next */
	enum wl_op op;
	unsigned si, depth;
	bool quit;
	atomic_uint pullers_left;
	_Atomic uint64_t stop_clock; /* lockstep: every worker pushes until this clock */
	uint64_t *rows[BENCH_MAX_SIZES]; /* sparse: the rows an op names, per size */
	size_t nrows[BENCH_MAX_SIZES];
	struct rdmaps_hist merged, pair_raw;
};

bool wl_is_push(enum wl_op op);
/* One blocking op of worker w (a pull, a push, or both for pushpull). */
int wl_do_op(struct wl_worker *w, enum wl_op op, rdmaps_tensor *t);
/* Ops of worker w, depth in flight through the async API, until l says
 * stop (those in flight then finish and count too; a counted loop posts
 * exactly what it wants); latencies into w->hist, w->t1 = the last
 * completion. */
int wl_async_stream(struct wl_worker *w, enum wl_op op, rdmaps_tensor *t, unsigned depth,
		    struct bench_loop *l);
/* A worker thread: runs each phase main publishes, between two barriers. */
void *wl_worker_main(void *arg);

#endif
