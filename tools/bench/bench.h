/*
 * bench.h -- rdmaps-bench internals: options, result rows, and the entry
 * points of each file. One file per concern:
 *   main.c      options, subcommands, the order things run in
 *   spawn.c     start/stop an rdmaps-server child
 *   workload.c  rdmaps pull/push/push-then-pull: latency, throughput, torn reads
 *   paired.c    raw and rdmaps ops interleaved (robust ratios on a noisy VM)
 *   wire.c      pushes in each wire format, interleaved
 *   scale.c     one server, 1..256+ workers: connect, memory, idle and loaded pulls, folds
 *   clients.c   the workload's connections, tensors and buffers
 *   raw*.c      the raw-verbs baseline (connection, client loops, responder)
 *   fold.c      optimizer fold and the fold thread's whole path vs STREAM triad (native)
 *   cksum.c     checksum throughput: XXH3 vs CRC32C
 *   report.c    rows -> table, JSON, CSV
 *   targets.c   the performance targets, PASS/MISS
 * Nothing measured allocates: buffers, histograms and rows are made before
 * a measured loop starts.
 */
#ifndef RDMAPS_BENCH_H
#define RDMAPS_BENCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "histogram.h"
#include "rdmaps.h"
#include "verbs.h" /* rdmaps__now_ns */

#define BENCH_MAX_SIZES 32
#define BENCH_MAX_SERVER_ARGS 16
#define BENCH_MIN_ITERS 3u       /* duration mode: at least this many samples */
#define BENCH_WARMUP_MAX_NS 500000000ull /* warm-up gives up after 0.5 s */

/* which rdmaps operations to run (--op) */
enum {
	BOP_PULL = 1u << 0,     /* pull and pull-relaxed */
	BOP_PUSH = 1u << 1,     /* push (staged) and push-folded */
	BOP_PUSHPULL = 1u << 2, /* push-folded then pull */
	BOP_ALL = BOP_PULL | BOP_PUSH | BOP_PUSHPULL,
};

/* which parts a run includes (the subcommand picks them) */
enum {
	PART_LAT = 1u << 0,
	PART_BW = 1u << 1,
	PART_TORN = 1u << 2,
	PART_FOLD = 1u << 3,
	PART_WIRE = 1u << 4,
	PART_SCALE = 1u << 5,
};

/*
 * Access pattern of the rdmaps workload (struct wl_access in workload.h):
 * dense ASP tensors, sparse row tables (pull/push a fixed random set of
 * rows), or dense BSP / SSP tensors (every worker a member).
 */
enum bench_access { ACCESS_DENSE = 0, ACCESS_SPARSE, ACCESS_BSP, ACCESS_SSP, ACCESS_COUNT };

struct bench_opts {
	const char *cmd;
	unsigned parts;
	/* connection */
	const char *server, *port, *src, *token;
	const char *addr;            /* where a spawned server listens */
	const char *server_bin;      /* --server-bin, else next to us or PATH */
	const char *server_args[BENCH_MAX_SERVER_ARGS];
	unsigned nserver_args;
	/* what and how long */
	uint64_t sizes[BENCH_MAX_SIZES];
	unsigned nsizes;
	uint64_t iters;              /* > 0: exactly this many measured ops */
	double duration;             /* else: seconds per measurement */
	uint64_t warmup;
	unsigned workers, depth;
	unsigned ops;                /* BOP_* */
	enum bench_access access;
	bool unregistered;           /* pull/push through the library's bounce buffers */
	/* raw baseline */
	bool no_raw, no_pair;
	const char *raw_peer, *raw_port; /* a --raw-server elsewhere; NULL: in-process */
	unsigned raw_depth;
	/* fold / checksum */
	uint64_t fold_sizes[BENCH_MAX_SIZES];
	unsigned nfold_sizes;
	/* output */
	const char *json, *csv;
	bool targets;
	bool in_vm;
	const char *netdev;          /* wire: count this interface's tx_bytes per push */
	unsigned scale[BENCH_MAX_SIZES]; /* scale: worker counts, rising */
	unsigned nscale;
	char cmdline[1024];
};

/* ---- one line of results ------------------------------------------------ */

enum rtt_kind { RTT_NONE = 0, RTT_FULL, RTT_HALF };

struct bench_row {
	char group[12];          /* lat, bw, torn, fold, cksum */
	char op[32];
	uint64_t size;           /* bytes per op (fold: bytes of gradient per pass) */
	unsigned workers, depth;
	uint64_t ops;
	double seconds;          /* wall time of the measured part */
	bool has_lat;
	double p50, p90, p99, p999, max, min, mean; /* microseconds */
	enum rtt_kind rtt;
	double ops_s, gb_s;      /* throughput, GB = 1e9 bytes */
	double traffic_gb_s;     /* fold/triad: memory traffic */
	char base_op[32];        /* what the ratio is against */
	double base_val;         /* its p50 (us) or GB/s */
	double ratio;            /* rdmaps / raw; 0 = none */
	double retries_frac;     /* torn: pull_retries / pulls */
	char note[96];
};

/* ---- report.c ------------------------------------------------------------ */
void report_init(const struct bench_opts *o);
/* Fill the latency fields of r from h (ns). */
void report_lat(struct bench_row *r, const struct rdmaps_hist *h);
/* Append (copied) and print the row; sections print their own header once. */
void report_add(const struct bench_row *r);
const struct bench_row *report_find(const char *group, const char *op, uint64_t size);
/* As report_find, for the row compared with `vs` (paired rows share an op). */
const struct bench_row *report_find_vs(const char *group, const char *op, const char *vs,
				       uint64_t size);
/* The most recently added row with this group/op whose size is the largest. */
const struct bench_row *report_find_largest(const char *group, const char *op);
/* Called by targets.c so JSON carries them. */
void report_target(const char *name, double measured, double limit, bool upper, const char *status,
		   const char *how);
int report_write_files(const struct bench_opts *o);
void report_fini(void);
/* "64 B", "4 KiB", "64 MiB" */
const char *fmt_size(uint64_t bytes, char *buf, size_t len);

/* ---- spawn.c ------------------------------------------------------------- */
struct bench_server {
	int pid;
	char port[16];
	char token[40];
};
/* Start rdmaps-server on o->addr; fills s; 0 or -1 (printed). */
int server_spawn(const struct bench_opts *o, const char *argv0, struct bench_server *s);
void server_stop(struct bench_server *s);

/* ---- workload.c ---------------------------------------------------------- */
/* Connection the workload uses (a spawned server or --server). */
struct bench_target {
	const char *host, *port, *src, *token;
};
struct wl;
int wl_open(const struct bench_opts *o, const struct bench_target *t, struct wl **out);
/* One part (PART_LAT, PART_BW or PART_TORN) at o->sizes[si]; rows go to the report. */
int wl_measure(struct wl *w, unsigned part, unsigned si);
/* Paired rows at o->sizes[si]: pull, pull-relaxed, push, each with its raw twin. */
struct raw_bench;
int wl_paired(struct wl *w, struct raw_bench *rb, unsigned si);
/* Paired bandwidth at o->sizes[si]: slices of rdmaps pulls (--depth in
 * flight) and of raw READs alternate, in one thread. */
int wl_paired_bw(struct wl *w, struct raw_bench *rb, unsigned si);
/* Pushes of each wire format at o->sizes[si], interleaved (wire.c). */
int wl_wire(struct wl *w, unsigned si);
void wl_close(struct wl *w);

/* ---- scale.c ------------------------------------------------------------- */
/* The scale steps against t; server_pid: a server this run started (0: none). */
int scale_run(const struct bench_opts *o, const struct bench_target *t, int server_pid);

/* ---- rawverbs.c / responder.c -------------------------------------------- */
/* Connect to the responder at peer:port (bound to src). */
int raw_open(const struct bench_opts *o, const char *peer, const char *port, const char *src,
	     struct raw_bench **out);
/* The raw baselines of one part (PART_LAT or PART_BW) at one size. */
int raw_measure(struct raw_bench *rb, unsigned part, uint64_t size);
void raw_close(struct raw_bench *rb);
/*
 * Paired rows: one raw op of `test` (a raw-* row name), then one rdmaps op,
 * alternately, in one thread, so both see the same moment of a noisy
 * machine. begin switches the responder; one runs a single op; end resets.
 */
int raw_pair_begin(struct raw_bench *rb, const char *test, uint64_t size);
int raw_pair_one(struct raw_bench *rb);
int raw_pair_end(struct raw_bench *rb);
/* Paired bandwidth: READs of size bytes, depth in flight, until ops are done
 * (those in flight then finish: *done may be more); *ns from the first post
 * to the last completion. The raw QP must be in its passive mode. */
int raw_bw_slice(struct raw_bench *rb, uint64_t size, uint64_t ops, unsigned depth,
		 uint64_t *done, uint64_t *ns);
/* In-process responder (a thread) on addr; its port is written to port_out. */
struct raw_responder;
int raw_responder_start(const char *addr, const char *port, struct raw_responder **out,
			char *port_out, size_t port_len);
void raw_responder_stop(struct raw_responder *r);
/* `rdmaps-bench raw-server`: serve raw clients until killed. */
int raw_server_main(const char *addr, const char *port);

/* ---- fold.c / cksum.c ---------------------------------------------------- */
int fold_run(const struct bench_opts *o);
int cksum_run(const struct bench_opts *o);

/* ---- targets.c ----------------------------------------------------------- */
/* Print every target; returns the number missed. */
int targets_eval(const struct bench_opts *o);

/* ---- measured-loop helpers ---------------------------------------------- */

/* How long one measurement runs: a count, or a duration with a floor. */
struct bench_loop {
	uint64_t want;      /* > 0: count mode */
	uint64_t deadline;  /* duration mode: ns */
	uint64_t n;
};

static inline void loop_start(struct bench_loop *l, const struct bench_opts *o, uint64_t now)
{
	l->want = o->iters;
	l->deadline = now + (uint64_t)(o->duration * 1e9);
	l->n = 0;
}

/* Bandwidth rows of big transfers: a 1 s row holds a dozen 4 MiB ops in
 * the VM, and two such rows taken a minute apart differ by 20 %. Both the
 * raw baseline and rdmaps run at least this long from 1 MiB up. */
#define BENCH_BW_MIN_S 3.0
static inline void loop_start_bw(struct bench_loop *l, const struct bench_opts *o, uint64_t now,
				 uint64_t bytes)
{
	loop_start(l, o, now);
	if (!o->iters && bytes >= (1u << 20) && o->duration < BENCH_BW_MIN_S)
		l->deadline = now + (uint64_t)(BENCH_BW_MIN_S * 1e9);
}

/* Count one op that ended at `now`; true while more are wanted. */
static inline bool loop_more(struct bench_loop *l, uint64_t now)
{
	l->n++;
	if (l->want)
		return l->n < l->want;
	return now < l->deadline || l->n < BENCH_MIN_ITERS;
}

/* Warm-up: o->warmup ops, but never longer than BENCH_WARMUP_MAX_NS. */
static inline bool warm_more(const struct bench_opts *o, uint64_t i, uint64_t start, uint64_t now)
{
	return i < o->warmup && now - start < BENCH_WARMUP_MAX_NS;
}

#endif
