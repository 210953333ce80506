/*
 * main.c -- rdmaps-bench: options, subcommands, and the order things run in.
 * Raw baseline and rdmaps alternate size by size, so slow drift of the
 * machine (the VM swings 2x) hits both sides of each ratio alike.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "workload.h"

static const uint64_t sweep[] = { 8, 64, 512, 4 << 10, 32 << 10, 256 << 10, 2 << 20, 4 << 20,
				  16 << 20, 64 << 20 };

static void usage(FILE *f)
{
	fprintf(f,
		"usage: rdmaps-bench lat|bw|torn|fold|wire|scale|all [options]\n"
		"       rdmaps-bench raw-server [--addr ADDR] [--raw-port P]\n"
		"\n"
		"  lat   latency of pull, pull-relaxed, push, push-folded, pushpull (one op in flight\n"
		"        per worker) beside raw-verbs READ / WRITE-ack / WRITE and SEND ping-pongs\n"
		"  bw    throughput with --depth ops in flight, beside raw READ/WRITE bandwidth\n"
		"  torn  torn-read retries of checked pulls while another client pushes flat out\n"
		"  fold  optimizer fold and checksum throughput vs STREAM triad (no RDMA needed)\n"
		"  wire  push in each wire format (f32, bf16, fp16, top-k 1 %%, sign) in turn, then\n"
		"        pull as f32, bf16, fp16: time and bytes against float32's (default 4M)\n"
		"  scale one server, W workers for each W of --scale: connect time, the server's\n"
		"        registered and locked memory, idle 64 B and 64 KiB pulls, and with\n"
		"        min(W, 32) workers pushing flat out: folds/s and loaded pulls\n"
		"  all   lat + bw + torn + fold\n"
		"\n"
		"Connection (lat, bw, torn):\n"
		"  --server ADDR       use a running rdmaps-server (default: start one, stop it after)\n"
		"  --port P            its port (default 7471 with --server, else a free one)\n"
		"  --token T           shared secret (default $RDMAPS_TOKEN; random for a started server)\n"
		"  --src ADDR          local address to bind (default: --addr)\n"
		"  --addr ADDR         where a started server and the raw responder listen\n"
		"                      (default $RDMAPS_RXE_ADDR, then $RDMAPS_TEST_ADDR)\n"
		"  --server-bin PATH   rdmaps-server to start (default: build tree, then PATH)\n"
		"  --server-arg ARG    extra argument for the started server (repeatable)\n"
		"What and how long:\n"
		"  --size LIST         e.g. 8,64,4K,4M,64M or 'sweep' (8 B..64 MiB)\n"
		"                      (default: lat 64; bw 4M; torn and all 64,4M)\n"
		"  --op pull|push|pushpull|all   (default all)\n"
		"  --access A          dense (default), sparse (a fixed random set of 128 B rows\n"
		"                      of a table 4x the op), bsp or ssp (dense BSP/SSP tensors,\n"
		"                      every worker a member); ops an access cannot run are\n"
		"                      listed as not run; no raw ratio or --targets but dense\n"
		"  --workers W         threads, each with its own rdmaps_client (default 1)\n"
		"  --depth D           bw: ops in flight per worker (default 4)\n"
		"  --iters N           measured ops per row, or\n"
		"  --duration S        seconds per row (default 1; at least %u ops)\n"
		"  --warmup N          ops before measuring (default 100, at most 0.5 s)\n"
		"  --unregistered      pull/push unregistered buffers (library bounce copies)\n"
		"  --no-raw            skip the raw-verbs baseline\n"
		"  --no-pair           skip the paired rows (lat: raw and rdmaps ops alternating;\n"
		"                      bw: slices of raw READs and of pulls alternating)\n"
		"  --raw-peer ADDR     raw baseline against `rdmaps-bench raw-server` there\n"
		"  --raw-port P        its port (raw-server: port to listen on)\n"
		"  --raw-depth D       raw bw: work requests in flight (default 16)\n"
		"  --fold-size LIST    fold/checksum array sizes (default 64K,64M)\n"
		"  --scale LIST        scale: rising worker counts (default 1,4,16,64,256; a\n"
		"                      started server gets --max-workers 1100)\n"
		"  --netdev IFACE      wire: also count the bytes IFACE sends per push (its\n"
		"                      tx_bytes; the RoCE netdev, with the server on another host)\n"
		"Output:\n"
		"  --json FILE, --csv FILE   machine-readable results (rows and targets)\n"
		"  --targets           check the targets (latency and bandwidth against raw verbs,\n"
		"                      the fold against STREAM triad, torn reads); exit 1 if one\n"
		"                      is missed\n",
		BENCH_MIN_ITERS);
}

static int parse_size(const char *s, uint64_t *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);

	if (errno || end == s)
		return -1;
	switch (*end) {
	case 'k': case 'K': v <<= 10; end++; break;
	case 'm': case 'M': v <<= 20; end++; break;
	case 'g': case 'G': v <<= 30; end++; break;
	default: break;
	}
	if (!strcmp(end, "iB") || !strcmp(end, "B"))
		end += strlen(end);
	if (*end || v < 4 || v % 4 || v > (1ull << 30))
		return -1;
	*out = v;
	return 0;
}

static int parse_list(const char *arg, uint64_t *out, unsigned *n)
{
	char buf[512], *save = NULL;

	*n = 0;
	if (!strcmp(arg, "sweep")) {
		for (size_t i = 0; i < sizeof(sweep) / sizeof(sweep[0]); i++)
			out[(*n)++] = sweep[i];
		return 0;
	}
	snprintf(buf, sizeof(buf), "%s", arg);
	for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		if (*n == BENCH_MAX_SIZES || parse_size(t, &out[*n])) {
			fprintf(stderr, "rdmaps-bench: bad size '%s' (a multiple of 4 bytes, "
					"4 B..1 GiB, suffix K/M/G)\n", t);
			return -1;
		}
		(*n)++;
	}
	return *n ? 0 : -1;
}

static int parse_args(int argc, char **argv, struct bench_opts *o)
{
	enum { O_SERVER = 256, O_PORT, O_TOKEN, O_SRC, O_ADDR, O_SBIN, O_SARG, O_SIZE, O_OP,
	       O_ACCESS, O_WORKERS, O_DEPTH, O_ITERS, O_DURATION, O_WARMUP, O_UNREG, O_NORAW,
	       O_RAWPEER, O_RAWPORT, O_RAWDEPTH, O_FOLDSIZE, O_JSON, O_CSV, O_TARGETS, O_NOPAIR,
	       O_NETDEV, O_SCALE };
	static const struct option lo[] = {
		{ "server", 1, NULL, O_SERVER }, { "port", 1, NULL, O_PORT },
		{ "token", 1, NULL, O_TOKEN }, { "src", 1, NULL, O_SRC },
		{ "addr", 1, NULL, O_ADDR }, { "server-bin", 1, NULL, O_SBIN },
		{ "server-arg", 1, NULL, O_SARG }, { "size", 1, NULL, O_SIZE },
		{ "op", 1, NULL, O_OP }, { "access", 1, NULL, O_ACCESS },
		{ "workers", 1, NULL, O_WORKERS }, { "depth", 1, NULL, O_DEPTH },
		{ "iters", 1, NULL, O_ITERS }, { "duration", 1, NULL, O_DURATION },
		{ "warmup", 1, NULL, O_WARMUP }, { "unregistered", 0, NULL, O_UNREG },
		{ "no-raw", 0, NULL, O_NORAW }, { "no-pair", 0, NULL, O_NOPAIR }, { "raw-peer", 1, NULL, O_RAWPEER },
		{ "raw-port", 1, NULL, O_RAWPORT }, { "raw-depth", 1, NULL, O_RAWDEPTH },
		{ "fold-size", 1, NULL, O_FOLDSIZE }, { "json", 1, NULL, O_JSON },
		{ "csv", 1, NULL, O_CSV }, { "targets", 0, NULL, O_TARGETS },
		{ "netdev", 1, NULL, O_NETDEV }, { "scale", 1, NULL, O_SCALE },
		{ "help", 0, NULL, 'h' }, { 0 },
	};
	int c;

	while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		char *end = NULL;
		errno = 0;
		switch (c) {
		case O_SERVER: o->server = optarg; break;
		case O_PORT: o->port = optarg; break;
		case O_TOKEN: o->token = optarg; break;
		case O_SRC: o->src = optarg; break;
		case O_ADDR: o->addr = optarg; break;
		case O_SBIN: o->server_bin = optarg; break;
		case O_SARG:
			if (o->nserver_args == BENCH_MAX_SERVER_ARGS)
				return -1;
			o->server_args[o->nserver_args++] = optarg;
			break;
		case O_SIZE:
			if (parse_list(optarg, o->sizes, &o->nsizes))
				return -1;
			break;
		case O_FOLDSIZE:
			if (parse_list(optarg, o->fold_sizes, &o->nfold_sizes))
				return -1;
			break;
		case O_OP:
			o->ops = !strcmp(optarg, "pull")       ? BOP_PULL
				 : !strcmp(optarg, "push")     ? BOP_PUSH
				 : !strcmp(optarg, "pushpull") ? BOP_PUSHPULL
				 : !strcmp(optarg, "all")      ? BOP_ALL
							       : 0;
			if (!o->ops)
				return -1;
			break;
		case O_ACCESS:
			for (o->access = ACCESS_DENSE; o->access < ACCESS_COUNT; o->access++)
				if (!strcmp(optarg, wl_access_modes[o->access].name))
					break;
			if (o->access == ACCESS_COUNT) {
				fprintf(stderr, "rdmaps-bench: --access %s: dense, sparse, bsp or ssp\n",
					optarg);
				return -1;
			}
			break;
		case O_WORKERS: o->workers = (unsigned)strtoul(optarg, &end, 10); break;
		case O_DEPTH: o->depth = (unsigned)strtoul(optarg, &end, 10); break;
		case O_RAWDEPTH: o->raw_depth = (unsigned)strtoul(optarg, &end, 10); break;
		case O_ITERS: o->iters = strtoull(optarg, &end, 10); break;
		case O_WARMUP: o->warmup = strtoull(optarg, &end, 10); break;
		case O_DURATION: o->duration = strtod(optarg, &end); break;
		case O_UNREG: o->unregistered = true; break;
		case O_NORAW: o->no_raw = true; break;
		case O_NOPAIR: o->no_pair = true; break;
		case O_RAWPEER: o->raw_peer = optarg; break;
		case O_RAWPORT: o->raw_port = optarg; break;
		case O_JSON: o->json = optarg; break;
		case O_CSV: o->csv = optarg; break;
		case O_TARGETS: o->targets = true; break;
		case O_NETDEV: o->netdev = optarg; break;
		case O_SCALE: {
			uint64_t v[BENCH_MAX_SIZES];
			unsigned n;
			/* counts, not sizes: parse_list's units would mislead, so digits only */
			char buf[256], *save = NULL;
			snprintf(buf, sizeof(buf), "%s", optarg);
			n = 0;
			for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
				char *e;
				if (n == BENCH_MAX_SIZES || !(v[n] = strtoull(t, &e, 10)) || *e ||
				    v[n] > 1024)
					return -1;
				o->scale[n] = (unsigned)v[n];
				n++;
			}
			o->nscale = n;
			if (!n)
				return -1;
			break;
		}
		case 'h': usage(stdout); exit(0);
		default: return -1;
		}
		if (end && (*end || errno)) {
			fprintf(stderr, "rdmaps-bench: bad number '%s'\n", optarg);
			return -1;
		}
	}
	if (o->workers < 1 || o->workers > 256 || o->depth < 1 || o->depth > 32 ||
	    o->raw_depth < 1 || o->raw_depth > 128 || !(o->duration > 0)) {
		fprintf(stderr, "rdmaps-bench: need 1 <= workers <= 256, 1 <= depth <= 32, "
				"1 <= raw-depth <= 128, duration > 0\n");
		return -1;
	}
	if (o->targets && o->access != ACCESS_DENSE) {
		fprintf(stderr, "rdmaps-bench: --targets are defined on dense tensors only\n");
		return -1;
	}
	return optind == argc ? 0 : -1;
}

static const char *env_addr(void)
{
	const char *a = getenv("RDMAPS_RXE_ADDR");

	if (!a || !*a)
		a = getenv("RDMAPS_TEST_ADDR");
	return a && *a ? a : NULL;
}

/* The RDMA parts: server, raw responder, raw and rdmaps, size by size. */
static int run_rdma(struct bench_opts *o, const char *argv0)
{
	struct bench_server srv = { 0 };
	struct bench_target tg = { 0 };
	struct raw_responder *resp = NULL;
	struct raw_bench *raw = NULL;
	struct wl *wl = NULL;
	char raw_port[16] = "";
	const char *local = o->src ? o->src : o->addr;
	int rc = -1;

	if (!o->server && !o->addr) {
		fprintf(stderr, "rdmaps-bench: no RDMA address: give --server, or --addr (or set "
				"RDMAPS_RXE_ADDR; inside tools/rxe-vm it is set)\n");
		return -1;
	}
	if (o->server) {
		tg = (struct bench_target){ .host = o->server, .port = o->port ? o->port : "7471",
					    .src = o->src,
					    .token = o->token ? o->token : getenv("RDMAPS_TOKEN") };
	} else {
		if (server_spawn(o, argv0, &srv))
			return -1;
		tg = (struct bench_target){ .host = o->addr, .port = srv.port, .src = local,
					    .token = srv.token };
	}
	if (o->parts & PART_SCALE) {
		rc = scale_run(o, &tg, o->server ? 0 : srv.pid);
		goto out;
	}
	if (!o->no_raw && (o->parts & (PART_LAT | PART_BW))) {
		const char *peer = o->raw_peer;
		if (!peer) {
			if (!local) {
				fprintf(stderr, "rdmaps-bench: no local RDMA address for the raw "
						"responder (--src or --addr): raw baseline skipped\n");
				goto skip_raw;
			}
			if (o->server)
				fprintf(stderr, "rdmaps-bench: note: the raw baseline runs against a "
						"responder in this process; for the server's path run "
						"`rdmaps-bench raw-server` there and pass --raw-peer\n");
			if (raw_responder_start(local, o->raw_port, &resp, raw_port, sizeof(raw_port)))
				goto out;
			peer = local;
		} else {
			snprintf(raw_port, sizeof(raw_port), "%s", o->raw_port ? o->raw_port : "7472");
		}
		if (raw_open(o, peer, raw_port, local, &raw))
			goto out;
	}
skip_raw:
	if (wl_open(o, &tg, &wl))
		goto out;
	rc = 0;
	for (unsigned part = PART_LAT; part <= PART_BW; part <<= 1) {
		if (!(o->parts & part))
			continue;
		for (unsigned i = 0; i < o->nsizes; i++) {
			if (raw)
				rc |= raw_measure(raw, part, o->sizes[i]);
			rc |= wl_measure(wl, part, i);
		}
	}
	if ((o->parts & PART_LAT) && raw && !o->no_pair && o->access == ACCESS_DENSE)
		for (unsigned i = 0; i < o->nsizes; i++)
			rc |= wl_paired(wl, raw, i);
	if ((o->parts & PART_BW) && raw && !o->no_pair && o->access == ACCESS_DENSE)
		for (unsigned i = 0; i < o->nsizes; i++)
			rc |= wl_paired_bw(wl, raw, i);
	if (o->parts & PART_TORN)
		for (unsigned i = 0; i < o->nsizes; i++)
			rc |= wl_measure(wl, PART_TORN, i);
	if ((o->parts & PART_WIRE) && o->access == ACCESS_DENSE)
		for (unsigned i = 0; i < o->nsizes; i++)
			rc |= wl_wire(wl, i);
out:
	wl_close(wl);
	raw_close(raw);
	raw_responder_stop(resp);
	server_stop(&srv);
	return rc ? -1 : 0;
}

int main(int argc, char **argv)
{
	struct bench_opts o = {
		.workers = 1, .depth = 4, .raw_depth = 16, .duration = 1.0, .warmup = 100,
		.ops = BOP_ALL,
	};
	const char *cmd = argc > 1 ? argv[1] : "";
	size_t used = 0;
	int rc = 0, missed = 0;

	for (int i = 0; i < argc && used < sizeof(o.cmdline) - 1; i++)
		used += (size_t)snprintf(o.cmdline + used, sizeof(o.cmdline) - used, "%s%s",
					 i ? " " : "", argv[i]);
	o.cmd = cmd;
	o.parts = !strcmp(cmd, "lat")	? PART_LAT
		  : !strcmp(cmd, "bw")	? PART_BW
		  : !strcmp(cmd, "torn") ? PART_TORN
		  : !strcmp(cmd, "fold") ? PART_FOLD
		  : !strcmp(cmd, "wire") ? PART_WIRE
		  : !strcmp(cmd, "scale") ? PART_SCALE
		  : !strcmp(cmd, "all")	? PART_LAT | PART_BW | PART_TORN | PART_FOLD
					: 0;
	if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help")) {
		usage(stdout);
		return 0;
	}
	if (!o.parts && strcmp(cmd, "raw-server")) {
		usage(stderr);
		return 2;
	}
	optind = 2;
	if (parse_args(argc, argv, &o)) {
		usage(stderr);
		return 2;
	}
	if (!o.addr)
		o.addr = env_addr();
	if (!strcmp(cmd, "raw-server")) {
		if (!o.addr) {
			fprintf(stderr, "rdmaps-bench raw-server: give --addr\n");
			return 2;
		}
		return raw_server_main(o.addr, o.raw_port);
	}
	if (!o.nsizes) {
		o.sizes[o.nsizes++] = (o.parts & ~PART_FOLD) == PART_BW || o.parts == PART_WIRE
					      ? 4u << 20
					      : 64;
		if ((o.parts & PART_TORN) && o.sizes[0] == 64)
			o.sizes[o.nsizes++] = 4u << 20;
	}
	if (!o.nfold_sizes) {
		o.fold_sizes[o.nfold_sizes++] = 64u << 10;
		o.fold_sizes[o.nfold_sizes++] = 64u << 20;
	}
	o.in_vm = getenv("RDMAPS_IN_VM") && !strcmp(getenv("RDMAPS_IN_VM"), "1");

	report_init(&o);
	printf("# %s\n# %s; %s per row%s; %u worker(s); access %s\n", o.cmdline,
	       o.in_vm ? "inside tools/rxe-vm (emulated: compare ratios, not absolutes)"
		       : "native",
	       o.iters ? "fixed count" : "fixed duration", o.iters ? "" : " (>= 3 ops)", o.workers,
	       wl_access_modes[o.access].name);
	if (o.parts & PART_SCALE && !o.nscale) {
		static const unsigned def[] = { 1, 4, 16, 64, 256 };
		for (o.nscale = 0; o.nscale < sizeof(def) / sizeof(def[0]); o.nscale++)
			o.scale[o.nscale] = def[o.nscale];
	}
	/* 256 workers and the observer: past the server's default of 256 */
	if (o.parts & PART_SCALE && !o.server && o.nserver_args + 2 <= BENCH_MAX_SERVER_ARGS) {
		o.server_args[o.nserver_args++] = "--max-workers";
		o.server_args[o.nserver_args++] = "1100";
	}
	if (o.parts & (PART_LAT | PART_BW | PART_TORN | PART_WIRE | PART_SCALE))
		rc |= run_rdma(&o, argv[0]);
	if (o.parts & PART_FOLD) {
		rc |= fold_run(&o);
		rc |= cksum_run(&o);
	}
	if (o.targets)
		missed = targets_eval(&o);
	if (report_write_files(&o))
		rc = -1;
	report_fini();
	if (rc)
		fprintf(stderr, "rdmaps-bench: some measurements failed\n");
	return rc ? 2 : missed ? 1 : 0;
}
