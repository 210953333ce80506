/*
 * targets.c -- rdmaps' performance targets, checked against this run's rows
 * (each ratio is taken between two measurements of the same run): latency
 * and bandwidth against raw verbs, the fold thread against a one-thread
 * STREAM triad, torn-read retries with a writer flat out. A target whose
 * rows were not measured is SKIP; the fold targets are INFO inside the VM
 * (they are defined natively: emulation slows vector code unevenly).
 */
#include <stdio.h>
#include <string.h>

#include "bench.h"

#define SZ_64 64u
#define SZ_4M (4u << 20)

static int missed;

static void verdict(const char *name, const struct bench_row *a, const struct bench_row *b,
		    double measured, double limit, bool upper, bool info_only, const char *how)
{
	const char *st;
	char lim[24];

	if (!a || !b) {
		st = "SKIP";
		measured = 0;
	} else if (upper ? measured <= limit : measured >= limit) {
		st = info_only ? "INFO" : "PASS";
	} else {
		st = info_only ? "INFO" : "MISS";
		if (!info_only)
			missed++;
	}
	snprintf(lim, sizeof(lim), "%s %.2f", upper ? "<=" : ">=", limit);
	if (!a || !b)
		printf("%-52s %9s %9s  %-4s  (not measured: %s)\n", name, "-", lim, st, how);
	else
		printf("%-52s %9.3f %9s  %-4s  %s\n", name, measured, lim, st, how);
	report_target(name, measured, limit, upper, st, how);
}

static double ratio(double a, double b)
{
	return b > 0 ? a / b : 0;
}

/*
 * A 64 B latency target: from the paired rows when there are any (raw and
 * rdmaps ops interleaved: robust against a VM that swings 2x), else from the
 * separate lat rows. Both ratios are printed.
 */
static void lat_target(const char *name, const char *op, const char *raw, double limit)
{
	/* the rdmaps row of a pair carries its raw twin's p50 and the ratio */
	const struct bench_row *pa = report_find_vs("paired", op, raw, SZ_64);
	const struct bench_row *la = report_find("lat", op, SZ_64);
	const struct bench_row *lb = report_find("lat", raw, SZ_64);
	char how[160];

	if (pa) {
		snprintf(how, sizeof(how), "paired %s vs %s 64 B; separate lat rows: %s", op, raw,
			 la && lb ? "" : "-");
		if (la && lb)
			snprintf(how + strlen(how), sizeof(how) - strlen(how), "%.3f",
				 ratio(la->p50, lb->p50));
		verdict(name, pa, pa, pa->ratio, limit, true, false, how);
	} else {
		snprintf(how, sizeof(how), "lat %s vs lat %s 64 B (no paired rows)", op, raw);
		verdict(name, la, lb, la && lb ? ratio(la->p50, lb->p50) : 0, limit, true, false, how);
	}
}

/* The 4 MiB bandwidth target: from the paired bw rows when there are any
 * (slices of raw READs and pulls alternating), else the separate bw rows. */
static void bw_target(const char *name, double limit)
{
	const struct bench_row *pa = report_find_vs("paired-bw", "pull", "raw-read-bw", SZ_4M);
	const struct bench_row *a = report_find("bw", "pull", SZ_4M);
	const struct bench_row *b = report_find("bw", "raw-read-bw", SZ_4M);
	char how[160];

	if (pa) {
		snprintf(how, sizeof(how), "paired-bw pull vs raw-read-bw 4 MiB; separate bw rows: ");
		if (a && b)
			snprintf(how + strlen(how), sizeof(how) - strlen(how), "%.3f",
				 ratio(a->gb_s, b->gb_s));
		else
			snprintf(how + strlen(how), sizeof(how) - strlen(how), "-");
		verdict(name, pa, pa, pa->ratio, limit, false, false, how);
	} else {
		verdict(name, a, b, a && b ? ratio(a->gb_s, b->gb_s) : 0, limit, false, false,
			"bw pull 4 MiB vs bw raw-read-bw 4 MiB (no paired rows)");
	}
}

/* A fold row at the largest size measured, against the triad its ratio is
 * taken against: the triad row of that size, or (path rows) triad passes
 * alternating with its own. */
static void fold_target(const char *name, const char *op, bool info, bool in_vm, const char *what)
{
	const struct bench_row *a = report_find_largest("fold", op);
	char how[160];

	snprintf(how, sizeof(how), "fold %s vs %s at the largest size (STREAM bytes; %s)", op,
		 a && a->base_op[0] ? a->base_op : "triad", what);
	verdict(name, a && a->ratio > 0 ? a : NULL, a, a ? a->ratio : 0, 0.80, false, info || in_vm,
		how);
}

/* A 4 MiB push in a wire format against float32's, from the interleaved
 * wire rows (rdmaps-bench wire). */
static void wire_target(const char *name, const char *op, double limit)
{
	const struct bench_row *a = report_find("wire", op, SZ_4M);

	verdict(name, a, a, a ? a->ratio : 0, limit, true, false,
		"wire rows 4 MiB, interleaved with the float32 row (a push: staged, encoding included)");
}

/* The bytes a format's pushes put on the wire against what its payload
 * should put there as RoCE packets: within 5 %. */
static void wire_bytes_target(const char *fmt)
{
	char name[80], op[32];
	const struct bench_row *a;

	snprintf(op, sizeof(op), "push-%s", fmt);
	snprintf(name, sizeof(name), "4 MiB push, %s: |wire bytes / format's - 1|", fmt);
	a = report_find("wire-bytes", op, SZ_4M);
	verdict(name, a, a, a ? __builtin_fabs(a->ratio - 1.0) : 0, 0.05, true, false,
		"wire-bytes rows 4 MiB (--netdev: tx_bytes of the RoCE netdev)");
}

/* rdmaps-bench scale: a row of the step with W workers (scale.c names them
 * op-wW); size picks the 64 B or 64 KiB pull rows. */
static const struct bench_row *scale_row(const char *op, unsigned W, uint64_t size)
{
	char name[32];

	snprintf(name, sizeof(name), "%s-w%u", op, W);
	return report_find("scale", name, size);
}

static void scale_targets(void)
{
	const struct bench_row *a, *b;
	char how[160];

	a = scale_row("idle-pull", 256, SZ_64);
	b = scale_row("idle-pull", 1, SZ_64);
	verdict("64 B pull p50, 256 workers idle / 1 worker", a, b, a && b ? ratio(a->p50, b->p50) : 0,
		1.10, true, false, "scale idle-pull-w256 vs idle-pull-w1, 64 B, the observer's pulls");
	/* not a target of its own: what idle connections cost the fold
	 * thread's polling, which the pull rows never see (one-sided) */
	a = scale_row("idle-push", 256, SZ_64);
	b = scale_row("idle-push", 1, SZ_64);
	verdict("(info) 64 B push-folded p50, 256 workers idle / 1", a, b,
		a && b ? ratio(a->p50, b->p50) : 0, 1.10, true, true,
		"scale idle-push-w256 vs idle-push-w1: the fold thread's polling");
	a = scale_row("folds", 64, 64u << 10);
	b = scale_row("folds", 4, 64u << 10);
	verdict("aggregate folds/s, 64 workers (32 pushing) / 4", a, b,
		a && b ? ratio(a->ops_s, b->ops_s) : 0, 0.90, false, false,
		"scale folds-w64 vs folds-w4 (the server's fold count; 64 KiB pushes)");
	a = scale_row("loaded-pull", 64, 64u << 10);
	b = scale_row("idle-pull", 64, 64u << 10);
	verdict("64 KiB pull p99, 32 workers pushing / idle", a, b, a && b ? ratio(a->p99, b->p99) : 0,
		3.0, true, false, "scale loaded-pull-w64 vs idle-pull-w64 (that tensor pushed flat out)");
	a = scale_row("loaded-pull", 64, 64u << 10);
	/* the bound by design: a chunk is READ at most snapshot_after (2)
	 * times from the model, then once from a snapshot (snapshot.c); a
	 * two-copy window found torn is READ again once first (copies.c) */
	verdict("most READs one 64 KiB pull needed, 32 pushing", a, a, a ? a->base_val : 0, 4.0,
		true, false, "scale loaded-pull-w64: the client's reads counter; bound snapshot_after + 2");
	a = scale_row("connect", 256, 0);
	snprintf(how, sizeof(how), "scale connect rows: wall time of every step up to 256 workers");
	{
		double total = 0;
		for (unsigned w = 1; w <= 256; w++) {
			const struct bench_row *r = scale_row("connect", w, 0);
			if (r)
				total += r->seconds;
		}
		verdict("seconds to accept 256 workers", a, a, total, 30.0, true, false, how);
	}
	a = scale_row("memory", 256, 64u << 20);
	verdict("server VmPin, 256 workers / (model + 256 rings + 64 MiB)", a && a->ratio > 0 ? a : NULL,
		a, a ? a->ratio : 0, 1.0, true, false,
		"scale memory-w256 (a server this run started; two-copy tensors count twice)");
}

int targets_eval(const struct bench_opts *o)
{
	const struct bench_row *a;

	missed = 0;
	printf("\n## targets: each a ratio of two measurements of this run%s\n",
	       o->in_vm ? " (in the VM: only ratios mean anything)" : "");
	printf("%-52s %9s %9s  %-4s  %s\n", "target", "measured", "limit", "", "from rows");

	lat_target("64 B pull p50 / raw READ p50 (full RTT)", "pull", "raw-read", 1.10);
	lat_target("64 B push p50 / raw WRITE-and-ack p50 (full RTT)", "push", "raw-write-ack",
		   1.30);

	bw_target("4 MiB pull GB/s / raw READ GB/s", 0.90);

	fold_target("SGD fold / STREAM triad on one thread (native)", "fold-sgd", false,
		    o->in_vm, "the optimizer's apply() alone");
	/* what the fold thread does per staged slot, through its own functions */
	fold_target("fold path, SGD: take+fold+checksum / triad (native)", "path-sgd", false,
		    o->in_vm, "one copy");
	fold_target("fold path, Adam: take+fold+checksum / triad (native)", "path-adam", false,
		    o->in_vm, "one copy");
	fold_target("(info) fold path, SGD, two copies / triad", "path-sgd-2copies", true,
		    o->in_vm, "ASP from 4 KiB");
	fold_target("(info) fold path, Adam, two copies / triad", "path-adam-2copies", true,
		    o->in_vm, "ASP from 4 KiB");

	wire_target("4 MiB pull, bf16 / float32 time", "pull-bf16", 0.55);
	wire_target("4 MiB push, bf16 / float32 time", "push-bf16", 0.55);
	wire_target("4 MiB push, top-k 1 % / float32 time", "push-topk1%", 0.10);
	wire_target("4 MiB push, sign / float32 time", "push-sign", 0.10);
	wire_bytes_target("f32");
	wire_bytes_target("bf16");
	wire_bytes_target("fp16");
	wire_bytes_target("topk1%");
	wire_bytes_target("sign");
	a = report_find("torn", "pull-vs-writer", SZ_64);
	verdict("torn-read retries / pulls at 64 B (writer flat out)", a, a,
		a ? a->retries_frac : 0, 0.01, true, false, "torn pull-vs-writer 64 B");

	a = report_find("torn", "pull-vs-writer", SZ_4M);
	verdict("torn-read retries / pulls at 4 MiB (writer flat out)", a, a,
		a ? a->retries_frac : 0, 0.01, true, false, "torn pull-vs-writer 4 MiB");

	if (o->parts & PART_SCALE)
		scale_targets();
	printf("## targets: %d missed\n", missed);
	return missed;
}
