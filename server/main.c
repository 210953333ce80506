/*
 * main.c -- rdmaps-server: options, limits, signals; the work is in
 * listener.c (connections), fold.c (data path) and store.c (tensors).
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "etcd.h"
#include "log.h"
#include "server.h"

static int stop_fd = -1;

static void on_signal(int sig)
{
	uint64_t one = 1;
	(void)sig;
	if (write(stop_fd, &one, sizeof(one)) < 0) {
		/* nothing useful to do in a signal handler */
	}
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: rdmaps-server [options]\n"
		"  -a, --addr ADDR          address to listen on (default: all RDMA devices)\n"
		"  -p, --port PORT          port (default " RDMAPS_DEFAULT_PORT ")\n"
		"  -t, --token-file FILE    shared secret for workers (or RDMAPS_TOKEN env)\n"
		"  -C, --config FILE        cluster description (docs/cluster.md): listen on the\n"
		"                           address of server number --rank in its server list\n"
		"  -r, --rank N             this server's index (default: from the launcher)\n"
		"  -f, --fold-threads N     fold threads (default 1)\n"
		"      --pin                pin fold thread i to CPU i\n"
		"      --chunk-elems N      floats per chunk (default 16384 = 64 KiB)\n"
		"      --slots N            staging slots per worker (default 16, at most 256)\n"
		"      --max-workers N      (default 256)\n"
		"      --staging-mb N       staging rings of all workers together: each worker\n"
		"                           gets --slots slots while this lasts, then fewer\n"
		"                           (at least 2); past it a worker is refused with\n"
		"                           RDMAPS_ELIMIT (default: max-workers full rings, at\n"
		"                           most a quarter of this machine's memory)\n"
		"      --max-tensors N      (default 1024, at most 65535)\n"
		"      --max-tensor-mb N    largest tensor incl. optimizer state (default 4096)\n"
		"      --max-total-mb N     all tensors together (default 16384)\n"
		"      --two-copies-from B  ASP dense tensors of B bytes or more keep two copies\n"
		"                           of each chunk, so pulls racing folds are not torn\n"
		"                           (default 4096; 0: never; docs/design.md)\n"
		"      --spin-us N          busy-poll this long before sleeping (default 200)\n"
		"      --max-inline B       inline send bytes asked of each queue pair (default\n"
		"                           128; 0: never inline, as on providers without it)\n"
		"      --registration M     how workers reach this server's memory: shared (one\n"
		"                           protection domain per device, each tensor registered\n"
		"                           once, each ring through a memory window bound to its\n"
		"                           worker), per-worker (a PD and registrations per\n"
		"                           worker), or auto (default: shared where the device\n"
		"                           has type-2 memory windows; docs/design.md)\n"
		"      --checkpoint-dir DIR write checkpoints there; restore the newest good one\n"
		"                           at start (docs/durability.md)\n"
		"      --checkpoint-every S also write one every S seconds\n"
		"      --replicas R         keep each part on R servers: this one and the R - 1\n"
		"                           after it in --config's list, written before a push\n"
		"                           is acknowledged folded (default 1, at most 4; one\n"
		"                           fold thread; docs/durability.md)\n"
		"      --peer-token-file F  the servers' own secret for replica connections\n"
		"                           (or RDMAPS_PEER_TOKEN, or peer_token in --config)\n"
		"      --etcd URLS          fold only while this rank is ours in etcd (http://HOST:\n"
		"                           PORT, comma-separated): a claim that raises the rank's\n"
		"                           epoch, kept by a lease; without it, nothing folds\n"
		"                           (or etcd in --config; docs/durability.md)\n"
		"      --etcd-prefix P      the cluster's keys in etcd (default /rdmaps)\n"
		"      --lease-seconds S    the lease (default 2): a server cut off from etcd\n"
		"                           stops folding within S seconds\n"
		"      --evict-ms N         BSP/SSP: evict a worker stalling a clock this long\n"
		"                           while others wait (default 10000)\n"
		"  -v, --verbose            log connections and declarations\n"
		"  -h, --help\n");
}

/*
 * Without --staging-mb: every worker up to --max-workers gets a full ring,
 * unless that is more than a quarter of this machine's memory, which then
 * bounds it (an OOM kill of the server is never the answer to a crowd).
 */
static void staging_budget_default(struct srv_config *cfg)
{
	uint64_t ring = srv_ring_bytes(cfg, cfg->slots);
	long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
	uint64_t quarter = pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz / 4 : UINT64_MAX;

	if (cfg->staging_budget)
		return;
	cfg->staging_budget = ring * cfg->max_workers;
	if (cfg->staging_budget > quarter)
		cfg->staging_budget = quarter > ring ? quarter : ring;
	log_info("staging budget: %llu MiB (--staging-mb)",
		 (unsigned long long)(cfg->staging_budget >> 20));
}

static int parse_u(const char *s, unsigned long long lo, unsigned long long hi,
		   unsigned long long *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end || end == s || v < lo || v > hi)
		return -1;
	*out = v;
	return 0;
}

/* A token from file, else from the variable env: into dst, *len bytes. */
static int load_token(uint8_t *dst, uint16_t *len, const char *file, const char *env_name)
{
	const char *env = getenv(env_name);
	char buf[RDMAPS_TOKEN_MAX + 2];
	size_t n = 0;

	if (file) {
		FILE *f = fopen(file, "r");
		if (!f) {
			fprintf(stderr, "rdmaps-server: cannot read token file %s: %s\n", file,
				strerror(errno));
			return -1;
		}
		n = fread(buf, 1, sizeof(buf), f);
		fclose(f);
		while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
			n--;
	} else if (env) {
		n = strlen(env);
		if (n <= RDMAPS_TOKEN_MAX)
			memcpy(buf, env, n);
	}
	if (n > RDMAPS_TOKEN_MAX) {
		fprintf(stderr, "rdmaps-server: token in %s longer than %u bytes\n",
			file ? file : env_name, RDMAPS_TOKEN_MAX);
		return -1;
	}
	memcpy(dst, buf, n);
	*len = (uint16_t)n;
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "addr", required_argument, NULL, 'a' },
		{ "port", required_argument, NULL, 'p' },
		{ "token-file", required_argument, NULL, 't' },
		{ "config", required_argument, NULL, 'C' },
		{ "rank", required_argument, NULL, 'r' },
		{ "fold-threads", required_argument, NULL, 'f' },
		{ "pin", no_argument, NULL, 'P' },
		{ "chunk-elems", required_argument, NULL, 'c' },
		{ "slots", required_argument, NULL, 's' },
		{ "max-workers", required_argument, NULL, 'W' },
		{ "staging-mb", required_argument, NULL, 'B' },
		{ "max-tensors", required_argument, NULL, 'T' },
		{ "max-tensor-mb", required_argument, NULL, 'M' },
		{ "max-total-mb", required_argument, NULL, 'G' },
		{ "spin-us", required_argument, NULL, 'S' },
		{ "max-inline", required_argument, NULL, 'I' },
		{ "registration", required_argument, NULL, 'R' },
		{ "two-copies-from", required_argument, NULL, '2' },
		{ "evict-ms", required_argument, NULL, 'E' },
		{ "replicas", required_argument, NULL, 'Q' },
		{ "peer-token-file", required_argument, NULL, 'k' },
		{ "etcd", required_argument, NULL, 'e' },
		{ "etcd-prefix", required_argument, NULL, 'x' },
		{ "lease-seconds", required_argument, NULL, 'l' },
		{ "checkpoint-dir", required_argument, NULL, 'D' },
		{ "checkpoint-every", required_argument, NULL, 'K' },
		{ "verbose", no_argument, NULL, 'v' },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	static struct srv s;
	struct srv_config *cfg = &s.cfg;
	const char *token_file = NULL, *config = NULL, *peer_token_file = NULL;
	static struct rdmaps__server_addr servers[RDMAPS_MAX_SERVERS];
	int replicas = 0;
	int rank = -1;
	static struct rdmaps__config cc;
	unsigned long long v;
	int opt, rc, verbose = 0;

	*cfg = (struct srv_config){
		.port = RDMAPS_DEFAULT_PORT,
		.fold_threads = 1,
		.chunk_elems = 16384,
		.slots = 16,
		.max_workers = 256,
		.max_tensors = 1024,
		.max_tensor_bytes = 4096ull << 20,
		.max_total_bytes = 16384ull << 20,
		.spin_us = 200,
		.two_copies_min = 4096,
		.evict_ms = 10000,
		.max_inline = 128,
		.beat_ms = RDMAPS__BEAT_MS,
	};
	while ((opt = getopt_long(argc, argv, "a:p:t:C:r:f:vh", opts, NULL)) != -1) {
		int bad = 0;
		switch (opt) {
		case 'a': cfg->listen_addr = optarg; break;
		case 'p': cfg->port = optarg; break;
		case 't': token_file = optarg; break;
		case 'C': config = optarg; break;
		case 'r': bad = parse_u(optarg, 0, RDMAPS_MAX_SERVERS - 1, &v); rank = (int)v; break;
		case 'P': cfg->pin = true; break;
		case 'v': verbose = 1; break;
		case 'f': bad = parse_u(optarg, 1, 64, &v); cfg->fold_threads = (unsigned)v; break;
		case 'c': bad = parse_u(optarg, 16, 1u << 20, &v); cfg->chunk_elems = (uint32_t)v; break;
		case 's': bad = parse_u(optarg, 1, RDMAPS_MAX_SLOTS, &v); cfg->slots = (uint32_t)v; break;
		case 'W': bad = parse_u(optarg, 1, 65536, &v); cfg->max_workers = (uint32_t)v; break;
		/* a slot header names its tensor in 16 bits */
		case 'T': bad = parse_u(optarg, 1, 65535, &v); cfg->max_tensors = (uint32_t)v; break;
		case 'M': bad = parse_u(optarg, 1, 1u << 24, &v); cfg->max_tensor_bytes = v << 20; break;
		case 'B': bad = parse_u(optarg, 1, 1u << 24, &v); cfg->staging_budget = v << 20; break;
		case 'G': bad = parse_u(optarg, 1, 1u << 24, &v); cfg->max_total_bytes = v << 20; break;
		case '2': bad = parse_u(optarg, 0, UINT64_MAX, &v); cfg->two_copies_min = v; break;
		case 'S': bad = parse_u(optarg, 0, 1000000, &v); cfg->spin_us = (unsigned)v; break;
		case 'I': bad = parse_u(optarg, 0, 1024, &v); cfg->max_inline = (uint32_t)v; break;
		case 'E': bad = parse_u(optarg, 10, 86400000, &v); cfg->evict_ms = (unsigned)v; break;
		case 'Q': bad = parse_u(optarg, 1, RDMAPS_MAX_REPLICAS, &v); replicas = (int)v; break;
		case 'k': peer_token_file = optarg; break;
		case 'e': cfg->etcd = optarg; break;
		case 'x': cfg->etcd_prefix = optarg; bad = optarg[0] != '/'; break;
		case 'l': bad = parse_u(optarg, 1, 60, &v); cfg->lease_s = (unsigned)v; break;
		case 'R':
			if (!strcmp(optarg, "auto"))
				cfg->registration = SRV_REG_AUTO;
			else if (!strcmp(optarg, "shared"))
				cfg->registration = SRV_REG_SHARED;
			else if (!strcmp(optarg, "per-worker"))
				cfg->registration = SRV_REG_PER_WORKER;
			else
				bad = 1;
			break;
		case 'D': cfg->ckpt_dir = optarg; break;
		case 'K': bad = parse_u(optarg, 1, 86400 * 365, &v); cfg->ckpt_every_s = (unsigned)v; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
		if (bad) {
			const char *name = "?";
			for (const struct option *o = opts; o->name; o++)
				if (o->val == opt)
					name = o->name;
			fprintf(stderr, "rdmaps-server: bad value '%s' for --%s\n", optarg, name);
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "rdmaps-server: unexpected argument '%s'\n", argv[optind]);
		return 2;
	}
	if (cfg->chunk_elems % 16) {
		fprintf(stderr, "rdmaps-server: --chunk-elems must be a multiple of 16\n");
		return 2;
	}
	rdmaps__log_init(verbose ? RDMAPS_LOG_INFO : RDMAPS_LOG_WARN);
	staging_budget_default(cfg);
	if (config || rank >= 0 || getenv("RDMAPS_CONFIG")) {
		/* one description for the whole cluster: find our own entry */
		char err[256];
		if (rdmaps__config_load(&cc, config, err, sizeof(err))) {
			fprintf(stderr, "rdmaps-server: %s\n", err);
			return 2;
		}
		if (rank < 0)
			rank = cc.rank;
		if (rank < 0 || (uint32_t)rank >= cc.nservers) {
			fprintf(stderr, "rdmaps-server: rank %d is not in the server list (%u servers); "
				"pass --rank or launch with a rank variable\n", rank, cc.nservers);
			return 2;
		}
		cfg->listen_addr = cc.servers[rank].host;
		cfg->port = cc.servers[rank].port[0] ? cc.servers[rank].port : cc.port;
		cfg->server_id = (unsigned)rank;
		if (!token_file && cc.token[0])
			setenv("RDMAPS_TOKEN", cc.token, 0);
		if (!replicas)
			replicas = cc.replicas;
		if (!cfg->etcd && cc.etcd[0])
			cfg->etcd = cc.etcd;
		if (!cfg->etcd_prefix && cc.etcd_prefix[0])
			cfg->etcd_prefix = cc.etcd_prefix;
		if (!cfg->lease_s)
			cfg->lease_s = (unsigned)cc.lease_s;
		cfg->ack_timeout_ms = cc.ack_timeout_ms;
		cfg->beat_ms = (unsigned)cc.beat_ms;
		for (uint32_t i = 0; i < cc.nservers; i++) {
			servers[i] = cc.servers[i];
			if (!servers[i].port[0])
				snprintf(servers[i].port, sizeof(servers[i].port), "%s", cc.port);
		}
		cfg->servers = servers;
		cfg->nservers = cc.nservers;
		if (!peer_token_file && cc.peer_token[0]) {
			cfg->peer_token_len = (uint16_t)strlen(cc.peer_token);
			memcpy(cfg->peer_token, cc.peer_token, cfg->peer_token_len);
		}
	}
	/* the file given, else what --config gave, else the variable */
	if ((peer_token_file || !cfg->peer_token_len) &&
	    load_token(cfg->peer_token, &cfg->peer_token_len, peer_token_file, "RDMAPS_PEER_TOKEN"))
		return 2;
	cfg->replicas = replicas ? (unsigned)replicas : 1;
	if (cfg->replicas > 1) {
		const char *why = !cfg->nservers ? "needs the cluster's server list (--config)"
				  : cfg->replicas > cfg->nservers ? "is more than the servers in the list"
				  : !cfg->peer_token_len ? "needs the servers' own token (--peer-token-file, "
							   "RDMAPS_PEER_TOKEN or peer_token)"
				  : cfg->fold_threads > 1 ? "runs with one fold thread for now "
							    "(writes of one chunk must keep their order)"
							  : NULL;
		if (why) {
			fprintf(stderr, "rdmaps-server: --replicas %u %s\n", cfg->replicas, why);
			return 2;
		}
	}
	if (!cfg->etcd && getenv("RDMAPS_ETCD") && *getenv("RDMAPS_ETCD"))
		cfg->etcd = getenv("RDMAPS_ETCD");
	if (!cfg->lease_s)
		cfg->lease_s = 2;
	if (cfg->etcd) {
		struct srv_etcd e;
		char err[256];
		if (srv_etcd_parse(&e, cfg->etcd, err, sizeof(err))) {
			fprintf(stderr, "rdmaps-server: --etcd: %s\n", err);
			return 2;
		}
	}
	if (load_token(cfg->token, &cfg->token_len, token_file, "RDMAPS_TOKEN"))
		return 2;
	if (!cfg->token_len)
		log_warn("no token set (--token-file or RDMAPS_TOKEN): any worker that can reach "
			 "this port may connect");
	/* per worker: its staging ring (plus, registered per worker, each
	 * tensor it reads); fail now, with advice, rather than at the first worker */
	if (rdmaps__memlock_check((size_t)cfg->slots * (cfg->chunk_elems * 4 + 64) + (1u << 20),
				  "rdmaps-server"))
		return 1;
	else {
		char cur[64];
		rdmaps__memlock_describe(cur, sizeof(cur));
		log_info("RLIMIT_MEMLOCK: %s", cur);
	}

	stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	s.stop_fd = stop_fd;
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	signal(SIGPIPE, SIG_IGN);

	if (cfg->ckpt_dir) {
		struct stat sb;
		if (stat(cfg->ckpt_dir, &sb) || !S_ISDIR(sb.st_mode) || access(cfg->ckpt_dir, W_OK)) {
			fprintf(stderr, "rdmaps-server: --checkpoint-dir %s is not a writable directory\n",
				cfg->ckpt_dir);
			return 2;
		}
	}
	rc = srv_store_init(&s.store, cfg);
	if (!rc)
		rc = srv_listen(&s);
	if (!rc)
		rc = srv_run(&s);
	srv_close(&s);
	if (rc) {
		fprintf(stderr, "rdmaps-server: %s\n", rdmaps_strerror(rc));
		return 1;
	}
	return 0;
}
