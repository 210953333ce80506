/*
 * report.c -- result rows: printed as a readable table while the run goes,
 * kept, and written as JSON and/or CSV at the end. Latencies are stored in
 * microseconds, throughput in GB/s (1e9 bytes) and ops/s.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

struct target_rec {
	char name[96], status[8], how[160];
	double measured, limit;
	bool upper;
};

static struct {
	struct bench_row *rows;
	size_t n, cap;
	struct target_rec targets[48];
	unsigned ntargets;
	char last_group[12];
	char started[32];
} R;

const char *fmt_size(uint64_t b, char *buf, size_t len)
{
	static const char *const unit[] = { "B", "KiB", "MiB", "GiB" };
	unsigned u = 0;

	while (u < 3 && b >= 1024 && b % 1024 == 0) {
		b /= 1024;
		u++;
	}
	snprintf(buf, len, "%" PRIu64 " %s", b, unit[u]);
	return buf;
}

void report_init(const struct bench_opts *o)
{
	time_t now = time(NULL);

	(void)o;
	strftime(R.started, sizeof(R.started), "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
}

void report_lat(struct bench_row *r, const struct rdmaps_hist *h)
{
	r->has_lat = h->count > 0;
	r->p50 = (double)rdmaps__hist_quantile(h, 0.50) / 1e3;
	r->p90 = (double)rdmaps__hist_quantile(h, 0.90) / 1e3;
	r->p99 = (double)rdmaps__hist_quantile(h, 0.99) / 1e3;
	r->p999 = (double)rdmaps__hist_quantile(h, 0.999) / 1e3;
	r->max = (double)h->max / 1e3;
	r->min = h->count ? (double)h->min / 1e3 : 0;
	r->mean = rdmaps__hist_mean(h) / 1e3;
}

static const char *rtt_name(enum rtt_kind k)
{
	return k == RTT_FULL ? "full" : k == RTT_HALF ? "half" : "-";
}

static void header(const char *g)
{
	if (!strcmp(g, "lat") || !strcmp(g, "bw") || !strcmp(g, "torn") || !strcmp(g, "paired") ||
	    !strcmp(g, "paired-bw")) {
		if (!strcmp(g, "lat"))
			printf("\n## lat: one blocking op in flight per worker. Every latency below is a FULL\n"
			       "## round trip (the caller's wait), including raw-read (= what ib_read_lat\n"
			       "## prints). ib_write_lat/ib_send_lat print HALF of a ping-pong: compare them\n"
			       "## with the raw-write-pp/raw-send-pp rows' half column. ratio = rdmaps p50 / raw p50.\n");
		else if (!strcmp(g, "paired"))
			printf("\n## paired: one raw op and one rdmaps op alternate in one thread (order\n"
			       "## flips every pair), so both see the same moment of a noisy machine. Full\n"
			       "## round trips; ratio = rdmaps p50 / raw p50. The targets use these rows.\n");
		else if (!strcmp(g, "paired-bw"))
			printf("\n## paired-bw: slices of rdmaps pulls (D in flight) and of raw READs (D =\n"
			       "## the slice's READs, at most --raw-depth) alternate in one thread, order\n"
			       "## flipping every pair; each slice starts empty and ends drained. GB/s =\n"
			       "## a side's bytes / its time. The bandwidth target uses these rows.\n");
		else if (!strcmp(g, "bw"))
			printf("\n## bw: D ops in flight per worker (async API / D outstanding work requests).\n"
			       "## Latency = post to completion. ratio = rdmaps GB/s / raw GB/s (higher is better).\n");
		else
			printf("\n## torn: W pullers (checked pulls) while one more client pushes to the same\n"
			       "## tensor as fast as it can; retries = pull_retries / pulls.\n");
		printf("%-18s %8s %3s %3s %8s %8s %8s %8s %8s %9s %10s %8s %4s  %-16s %7s  %s\n", "op",
		       "size", "W", "D", "ops", "p50us", "p90us", "p99us", "p99.9us", "maxus", "ops/s",
		       "GB/s", "rtt", "vs", "ratio", "note");
	} else if (!strcmp(g, "fold")) {
		printf("\n## fold (native code path, one thread): optimizer apply over 64 KiB chunks vs a\n"
		       "## float32 STREAM triad on arrays of the same size. grad GB/s = gradient bytes\n"
		       "## folded per second; traffic = bytes moved as STREAM counts them.\n");
		printf("%-22s %8s %8s %10s %12s  %-16s %7s  %s\n", "op", "size", "passes", "grad GB/s",
		       "traffic GB/s", "vs", "ratio", "note");
	} else if (!strcmp(g, "cksum")) {
		printf("\n## cksum: checksum throughput over a buffer in cache (one thread)\n");
		printf("%-22s %8s %10s %10s  %-16s %7s  %s\n", "op", "size", "ops", "GB/s", "vs", "ratio",
		       "note");
	}
}

static void print_row(const struct bench_row *r)
{
	char sz[24];

	fmt_size(r->size, sz, sizeof(sz));
	if (!strcmp(r->group, "fold")) {
		printf("%-22s %8s %8" PRIu64 " %10.2f %12.2f  %-16s %7.2f  %s\n", r->op, sz, r->ops,
		       r->gb_s, r->traffic_gb_s, r->base_op[0] ? r->base_op : "-", r->ratio, r->note);
	} else if (!strcmp(r->group, "cksum")) {
		printf("%-22s %8s %10" PRIu64 " %10.2f  %-16s %7.2f  %s\n", r->op, sz, r->ops, r->gb_s,
		       r->base_op[0] ? r->base_op : "-", r->ratio, r->note);
	} else {
		char note[128];
		snprintf(note, sizeof(note), "%s", r->note);
		if (!strcmp(r->group, "torn"))
			snprintf(note, sizeof(note), "retries %.3f%% %s", 100.0 * r->retries_frac, r->note);
		char ops_s[24] = "-", gb_s[24] = "-";
		if (r->ops_s > 0) { /* paired rows share their time: no throughput */
			snprintf(ops_s, sizeof(ops_s), "%.0f", r->ops_s);
			snprintf(gb_s, sizeof(gb_s), "%.4f", r->gb_s);
		}
		if (r->has_lat)
			printf("%-18s %8s %3u %3u %8" PRIu64 " %8.2f %8.2f %8.2f %8.2f %9.1f", r->op, sz,
			       r->workers, r->depth, r->ops, r->p50, r->p90, r->p99, r->p999, r->max);
		else
			printf("%-18s %8s %3u %3u %8" PRIu64 " %8s %8s %8s %8s %9s", r->op, sz, r->workers,
			       r->depth, r->ops, "-", "-", "-", "-", "-");
		printf(" %10s %8s %4s  %-16s %7.3f  %s\n", ops_s, gb_s, rtt_name(r->rtt),
		       r->base_op[0] ? r->base_op : "-", r->ratio, note);
	}
	fflush(stdout);
}

void report_add(const struct bench_row *r)
{
	if (R.n == R.cap) {
		size_t cap = R.cap ? R.cap * 2 : 64;
		struct bench_row *n = realloc(R.rows, cap * sizeof(*n));
		if (!n) {
			fprintf(stderr, "rdmaps-bench: out of memory keeping results\n");
			return;
		}
		R.rows = n;
		R.cap = cap;
	}
	R.rows[R.n++] = *r;
	if (strcmp(R.last_group, r->group)) {
		/* same-size arrays: a plain copy (GCC 12 under ASan misreads a
		 * snprintf of the array as a NULL argument) */
		memcpy(R.last_group, r->group, sizeof(R.last_group));
		R.last_group[sizeof(R.last_group) - 1] = '\0';
		header(r->group);
	}
	print_row(r);
}

const struct bench_row *report_find(const char *group, const char *op, uint64_t size)
{
	for (size_t i = R.n; i-- > 0;)
		if (!strcmp(R.rows[i].group, group) && !strcmp(R.rows[i].op, op) &&
		    R.rows[i].size == size)
			return &R.rows[i];
	return NULL;
}

const struct bench_row *report_find_vs(const char *group, const char *op, const char *vs,
				       uint64_t size)
{
	for (size_t i = R.n; i-- > 0;)
		if (!strcmp(R.rows[i].group, group) && !strcmp(R.rows[i].op, op) &&
		    !strcmp(R.rows[i].base_op, vs) && R.rows[i].size == size)
			return &R.rows[i];
	return NULL;
}

const struct bench_row *report_find_largest(const char *group, const char *op)
{
	const struct bench_row *best = NULL;

	for (size_t i = 0; i < R.n; i++)
		if (!strcmp(R.rows[i].group, group) && !strcmp(R.rows[i].op, op) &&
		    (!best || R.rows[i].size >= best->size))
			best = &R.rows[i];
	return best;
}

void report_target(const char *name, double measured, double limit, bool upper, const char *status,
		   const char *how)
{
	struct target_rec *t;

	if (R.ntargets == sizeof(R.targets) / sizeof(R.targets[0])) {
		/* never silently: a target missing from the JSON reads as unmeasured */
		fprintf(stderr, "rdmaps-bench: no room for target '%s' in the report\n", name);
		return;
	}
	t = &R.targets[R.ntargets++];
	snprintf(t->name, sizeof(t->name), "%s", name);
	snprintf(t->status, sizeof(t->status), "%s", status);
	snprintf(t->how, sizeof(t->how), "%s", how);
	t->measured = measured;
	t->limit = limit;
	t->upper = upper;
}

/* JSON string body: the texts here are ours, but escape quotes anyway. */
static void json_str(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			fputc('\\', f);
		if ((unsigned char)*s >= 0x20)
			fputc(*s, f);
	}
	fputc('"', f);
}

static int write_json(const struct bench_opts *o, const char *path)
{
	FILE *f = fopen(path, "w");
	char host[64] = "";

	if (!f) {
		perror(path);
		return -1;
	}
	gethostname(host, sizeof(host) - 1);
	fprintf(f, "{\n  \"meta\": {\"tool\": \"rdmaps-bench\", \"started\": ");
	json_str(f, R.started);
	fprintf(f, ", \"host\": ");
	json_str(f, host);
	fprintf(f, ", \"in_vm\": %s, \"command\": ", o->in_vm ? "true" : "false");
	json_str(f, o->cmdline);
	fprintf(f, ",\n    \"units\": {\"latency\": \"us\", \"throughput\": \"GB/s (1e9 B)\"}},\n");
	fprintf(f, "  \"rows\": [\n");
	for (size_t i = 0; i < R.n; i++) {
		const struct bench_row *r = &R.rows[i];
		fprintf(f, "    {\"group\": ");
		json_str(f, r->group);
		fprintf(f, ", \"op\": ");
		json_str(f, r->op);
		fprintf(f, ", \"size\": %" PRIu64 ", \"workers\": %u, \"depth\": %u, \"ops\": %" PRIu64
			   ", \"seconds\": %.6f",
			r->size, r->workers, r->depth, r->ops, r->seconds);
		if (r->has_lat)
			fprintf(f, ", \"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, \"p999\": %.3f, "
				   "\"max\": %.3f, \"min\": %.3f, \"mean\": %.3f, \"rtt\": \"%s\"",
				r->p50, r->p90, r->p99, r->p999, r->max, r->min, r->mean, rtt_name(r->rtt));
		fprintf(f, ", \"ops_s\": %.1f, \"gb_s\": %.6f", r->ops_s, r->gb_s);
		if (r->traffic_gb_s > 0)
			fprintf(f, ", \"traffic_gb_s\": %.6f", r->traffic_gb_s);
		if (r->base_op[0]) {
			fprintf(f, ", \"vs\": ");
			json_str(f, r->base_op);
			fprintf(f, ", \"vs_value\": %.6f, \"ratio\": %.4f", r->base_val, r->ratio);
		}
		if (!strcmp(r->group, "torn"))
			fprintf(f, ", \"retries_frac\": %.6f", r->retries_frac);
		fprintf(f, ", \"note\": ");
		json_str(f, r->note);
		fprintf(f, "}%s\n", i + 1 < R.n ? "," : "");
	}
	fprintf(f, "  ],\n  \"targets\": [\n");
	for (unsigned i = 0; i < R.ntargets; i++) {
		const struct target_rec *t = &R.targets[i];
		fprintf(f, "    {\"name\": ");
		json_str(f, t->name);
		fprintf(f, ", \"measured\": %.4f, \"limit\": %.4f, \"kind\": \"%s\", \"status\": \"%s\", "
			   "\"how\": ",
			t->measured, t->limit, t->upper ? "at most" : "at least", t->status);
		json_str(f, t->how);
		fprintf(f, "}%s\n", i + 1 < R.ntargets ? "," : "");
	}
	fprintf(f, "  ]\n}\n");
	return fclose(f) ? -1 : 0;
}

static int write_csv(const char *path)
{
	FILE *f = fopen(path, "w");

	if (!f) {
		perror(path);
		return -1;
	}
	fprintf(f, "group,op,size,workers,depth,ops,seconds,p50_us,p90_us,p99_us,p999_us,max_us,"
		   "mean_us,rtt,ops_s,gb_s,traffic_gb_s,vs,vs_value,ratio,retries_frac,note\n");
	for (size_t i = 0; i < R.n; i++) {
		const struct bench_row *r = &R.rows[i];
		fprintf(f, "%s,%s,%" PRIu64 ",%u,%u,%" PRIu64 ",%.6f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%s,"
			   "%.1f,%.6f,%.6f,%s,%.6f,%.4f,%.6f,\"%s\"\n",
			r->group, r->op, r->size, r->workers, r->depth, r->ops, r->seconds, r->p50, r->p90,
			r->p99, r->p999, r->max, r->mean, rtt_name(r->rtt), r->ops_s, r->gb_s,
			r->traffic_gb_s, r->base_op, r->base_val, r->ratio, r->retries_frac, r->note);
	}
	for (unsigned i = 0; i < R.ntargets; i++) {
		const struct target_rec *t = &R.targets[i];
		char name[sizeof(t->name)];
		/* a bare column, read by field number (tools/bench-compare's awk
		 * -F,): a comma of the target's name becomes a semicolon */
		snprintf(name, sizeof(name), "%s", t->name);
		for (char *p = name; (p = strchr(p, ',')); p++)
			*p = ';';
		/* the same columns: op = status, rtt = kind (max/min), vs = target,
		 * vs_value = limit, ratio = measured, note = the rows it compares */
		fprintf(f, "target,%s,0,0,0,0,0,0,0,0,0,0,0,%s,0,0,0,%s,%.4f,%.4f,0,\"%s\"\n",
			t->status, t->upper ? "max" : "min", name, t->limit, t->measured, t->how);
	}
	return fclose(f) ? -1 : 0;
}

int report_write_files(const struct bench_opts *o)
{
	int rc = 0;

	if (o->json && write_json(o, o->json))
		rc = -1;
	if (o->csv && write_csv(o->csv))
		rc = -1;
	return rc;
}

void report_fini(void)
{
	free(R.rows);
	memset(&R, 0, sizeof(R));
}
