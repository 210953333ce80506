/*
 * rdmaps-ctl -- look at and steer running rdmaps servers: servers and
 * their counters, tensors, chunk versions, workers, the local device's port
 * and hardware counters, Prometheus text, checkpoints. It speaks the same
 * control protocol as workers (over its own connection, with the token).
 * Exits non-zero, naming the server, when one cannot be reached.
 */
#include <dirent.h>
#include <getopt.h>
#include <infiniband/verbs.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"
#include "log.h"
#include "pages.h"

static const char *const mode_names[] = { "asp", "bsp", "ssp" };
/* gradient formats, by their value on the wire (common/gradfmt.h) */
static const char *const format_names[] = { "f32", "bf16", "fp16", "topk", "sign" };

static void usage(FILE *f)
{
	fprintf(f, "usage: rdmaps-ctl [--servers H[:P],...|--config FILE] [--token T] [--src ADDR]\n"
		   "                  [--timeout MS] COMMAND\n"
		   "commands:\n"
		   "  servers       each server's counters\n"
		   "  tensors       the catalog: tensors, parts, optimizer, clock, folds, the format\n"
		   "                pulls read (f32, bf16, fp16) and the formats pushes came in\n"
		   "                (f32, bf16, fp16, topk, sign)\n"
		   "  chunks NAME   chunk versions of a tensor on each server\n"
		   "  workers       connected workers and their counters, per server\n"
		   "  replicas      each server's epoch, the parts it serves, its backups (each\n"
		   "                one's part, state, records in flight and not yet applied)\n"
		   "                and the servers whose parts it backs up\n"
		   "  device        this host's RDMA devices: the registration scheme a server\n"
		   "                would use on each, port state and hardware counters\n"
		   "  prometheus    servers, workers and device counters as Prometheus text\n"
		   "  checkpoint    ask every server for a checkpoint and wait for it\n"
		   "Servers, token and local address also come from RDMAPS_* and the config file\n"
		   "(docs/cluster.md).\n");
}

/*
 * Every page of a listing from server k (request type with id, replies of
 * rtype into reply, rlen bytes, at most per_page entries each): fn gets
 * each reply with the index of its first entry and how many it holds.
 * Returns 0, or 1 after saying which server failed and why.
 */
static int page_all(struct cl_conn *k, uint16_t type, uint32_t id, uint16_t rtype, void *reply,
		    uint32_t rlen, uint32_t per_page,
		    void (*fn)(void *ctx, const void *reply, uint32_t start, uint32_t n), void *ctx)
{
	const struct rdmaps_msg_page_head *h = reply;

	for (uint32_t start = 0;;) {
		struct rdmaps_msg_page m = { .id = id, .start = start };
		int rc;

		rdmaps__msg_init(&m.hdr, type, sizeof(m), 0);
		if ((rc = cl_rpc(k, &m, sizeof(m), rtype, reply, rlen))) {
			fprintf(stderr, "rdmaps-ctl: server %s: %s\n", k->name, rdmaps_strerror(rc));
			return 1;
		}
		fn(ctx, reply, start, h->count < per_page ? h->count : per_page);
		start += h->count;
		if (!h->count || start >= h->total)
			return 0;
	}
}

static int cmd_servers(rdmaps_client *c)
{
	for (uint32_t i = 0; i < c->nconn; i++) {
		struct rdmaps_server_stats st;
		int rc = cl_server_stats(&c->conn[i], &st);
		if (rc) {
			fprintf(stderr, "rdmaps-ctl: server %s: %s\n", c->conn[i].name, rdmaps_strerror(rc));
			return 1;
		}
		printf("server %u  %s  chunk %u floats, %u staging slots per worker\n", i,
		       c->conn[i].name, c->conn[i].chunk_elems, c->conn[i].slots);
#define PRINT(f) printf("  %-20s %" PRIu64 "\n", #f, (uint64_t)st.f);
		RDMAPS_SERVER_STATS_MAP(PRINT)
#undef PRINT
	}
	return 0;
}

static void print_tensors(void *ctx, const void *reply, uint32_t start, uint32_t n)
{
	const struct rdmaps_msg_catalog_reply *r = reply;
	uint32_t server = *(const uint32_t *)ctx;

	(void)start;
	for (uint32_t k = 0; k < n; k++) {
		struct rdmaps_wire_tensor_info e = r->t[k];
		e.name[RDMAPS_NAME_MAX] = '\0';
		e.optimizer[RDMAPS_OPT_NAME_MAX - 1] = '\0';
		char fmts[64] = "-";
		size_t used = 0;
		for (unsigned f = 0; f < sizeof(format_names) / sizeof(format_names[0]); f++)
			if (e.push_formats & (1u << f))
				used += (size_t)snprintf(fmts + used, sizeof(fmts) - used, "%s%s",
							 used ? "," : "", format_names[f]);
		printf("%-6u %-24s %4u %12" PRIu64 " %8u %-9s %-4s %8" PRIu64 " %10" PRIu64
		       " %-5s %-8s%s\n",
		       server, e.name, e.id, e.length, e.nchunks, e.optimizer,
		       e.mode < 3 ? mode_names[e.mode] : "?", e.clock, e.folds,
		       e.pull_format < 3 ? format_names[e.pull_format] : "?", fmts,
		       e.row_dim ? "  (sparse rows)" : "");
	}
}

static int cmd_tensors(rdmaps_client *c)
{
	static struct rdmaps_msg_catalog_reply r;

	printf("%-6s %-24s %4s %12s %8s %-9s %-4s %8s %10s %-5s %s\n", "server", "tensor", "id",
	       "floats", "chunks", "optimizer", "mode", "clock", "folds", "pull", "pushed as");
	for (uint32_t i = 0; i < c->nconn; i++)
		if (page_all(&c->conn[i], RDMAPS_MSG_CATALOG, 0, RDMAPS_MSG_CATALOG_REPLY, &r,
			     sizeof(r), RDMAPS_CATALOG_PAGE, print_tensors, &i))
			return 1;
	return 0;
}

static void print_chunks(void *ctx, const void *reply, uint32_t start, uint32_t n)
{
	const struct rdmaps_msg_chunks_reply *r = reply;
	uint32_t first = *(const uint32_t *)ctx;

	for (uint32_t k = 0; k < n; k++)
		printf("  chunk %-8u version %" PRIu64 "\n", first + start + k, r->version[k]);
}

static int cmd_chunks(rdmaps_client *c, const char *name)
{
	static struct rdmaps_msg_chunks_reply r;
	rdmaps_tensor *t;
	int rc = rdmaps_lookup(c, name, &t);

	if (rc) {
		fprintf(stderr, "rdmaps-ctl: tensor %s: %s\n", name, rdmaps_strerror(rc));
		return 1;
	}
	for (uint32_t p = 0; p < t->nparts; p++) {
		struct cl_part *pt = &t->part[p];
		printf("server %u (%s): chunks %u..%u, versions (odd = being folded):\n", pt->conn,
		       c->conn[pt->conn].name, pt->first, pt->first + pt->nchunks - 1);
		if (page_all(&c->conn[pt->conn], RDMAPS_MSG_CHUNKS, pt->tensor_id,
			     RDMAPS_MSG_CHUNKS_REPLY, &r, sizeof(r), RDMAPS_CHUNKS_PAGE, print_chunks,
			     &pt->first))
			return 1;
	}
	return 0;
}

struct worker_fn {
	uint32_t server;
	void (*fn)(uint32_t server, const struct rdmaps_wire_worker_info *);
};

static void each_worker(void *ctx, const void *reply, uint32_t start, uint32_t n)
{
	const struct rdmaps_msg_workers_reply *r = reply;
	const struct worker_fn *wf = ctx;

	(void)start;
	for (uint32_t k = 0; k < n; k++) {
		struct rdmaps_wire_worker_info w = r->w[k];
		w.addr[sizeof(w.addr) - 1] = '\0';
		wf->fn(wf->server, &w);
	}
}

static int for_workers(rdmaps_client *c, void (*fn)(uint32_t server, const struct rdmaps_wire_worker_info *))
{
	static struct rdmaps_msg_workers_reply r;

	for (uint32_t i = 0; i < c->nconn; i++) {
		struct worker_fn wf = { .server = i, .fn = fn };
		if (page_all(&c->conn[i], RDMAPS_MSG_WORKERS, 0, RDMAPS_MSG_WORKERS_REPLY, &r,
			     sizeof(r), RDMAPS_WORKERS_PAGE, each_worker, &wf))
			return 1;
	}
	return 0;
}

static void print_worker(uint32_t server, const struct rdmaps_wire_worker_info *w)
{
	printf("%-6u %-16s %12" PRIu64 " %10" PRIu64 " %10" PRIu64 " %12" PRIu64 " %5u %10" PRIu64
	       " %10" PRIu64 "\n",
	       server, w->addr[0] ? w->addr : "?", w->folds, w->dropped, w->bad_messages, w->next_seq,
	       w->slots, w->memory, w->pinned);
}

static int cmd_replicas(rdmaps_client *c)
{
	static const char *const state[] = { "down (connecting)", "catching up", "up" };

	for (uint32_t i = 0; i < c->nconn; i++) {
		static struct rdmaps_msg_replicas_reply r;
		struct rdmaps_msg_hdr m;
		int rc;
		rdmaps__msg_init(&m, RDMAPS_MSG_REPLICAS, sizeof(m), 0);
		if ((rc = cl_rpc(&c->conn[i], &m, sizeof(m), RDMAPS_MSG_REPLICAS_REPLY, &r, sizeof(r)))) {
			fprintf(stderr, "rdmaps-ctl: server %s: %s\n", c->conn[i].name, rdmaps_strerror(rc));
			return 1;
		}
		printf("server %u  %s  rank %u, replicas %u", i, c->conn[i].name, r.server_id,
		       r.replicas);
		if (r.epoch) {
			printf(", epoch %" PRIu64 " in etcd, in sync:", r.epoch);
			for (unsigned k = 0; k < 64; k++)
				if (r.in_sync >> k & 1u)
					printf(" rank %u", k);
			if (!r.in_sync)
				printf(" none");
		}
		printf("\n");
		for (unsigned k = 0; k < 64; k++)
			if (r.taken_over >> k & 1u)
				printf(k == r.server_id
					       ? "  serves rank %u's part from the copy it kept as its "
						 "backup while another server held it\n"
					       : "  serves rank %u's part: taken over from its replica here\n",
				       k);
		for (uint32_t k = 0; k < r.nbackups && k < RDMAPS_WIRE_BACKUPS; k++)
			printf("  backup rank %u of rank %u's part: %s, %" PRIu64 " writes, %" PRIu64
			       " in flight, %" PRIu64 " not applied, %u tensors to open\n",
			       r.backup[k].rank, r.backup[k].part,
			       r.backup[k].state < 3 ? state[r.backup[k].state] : "?",
			       r.backup[k].writes, r.backup[k].in_flight, r.backup[k].behind,
			       r.backup[k].opening);
		for (uint32_t k = 0; k < r.nheld && k < 64; k++)
			printf("  holds rank %u's parts: %u tensors, %u worker accounts\n",
			       r.held[k].primary, r.held[k].tensors, r.held[k].accounts);
	}
	return 0;
}

static int cmd_workers(rdmaps_client *c)
{
	printf("%-6s %-16s %12s %10s %10s %12s %5s %10s %10s\n", "server", "worker", "folds", "dropped",
	       "bad_msgs", "next_seq", "slots", "memory", "pinned");
	return for_workers(c, print_worker);
}

/* Each numeric file of a sysfs counters directory, through fn. */
static void sysfs_counters(void (*fn)(const char *dev, const char *port, const char *kind,
				      const char *name, uint64_t v))
{
	DIR *d = opendir("/sys/class/infiniband");
	struct dirent *dev;

	if (!d)
		return;
	while ((dev = readdir(d))) {
		char path[1024];
		DIR *pd;
		struct dirent *port;
		if (dev->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/class/infiniband/%s/ports", dev->d_name);
		if (!(pd = opendir(path)))
			continue;
		while ((port = readdir(pd))) {
			static const char *const kinds[] = { "counters", "hw_counters" };
			if (port->d_name[0] == '.')
				continue;
			for (int k = 0; k < 2; k++) {
				DIR *cd;
				struct dirent *ce;
				snprintf(path, sizeof(path), "/sys/class/infiniband/%s/ports/%s/%s",
					 dev->d_name, port->d_name, kinds[k]);
				if (!(cd = opendir(path)))
					continue;
				while ((ce = readdir(cd))) {
					char f[2048];
					unsigned long long v;
					FILE *fp;
					if (ce->d_name[0] == '.')
						continue;
					snprintf(f, sizeof(f), "%s/%s", path, ce->d_name);
					if ((fp = fopen(f, "r"))) {
						if (fscanf(fp, "%llu", &v) == 1)
							fn(dev->d_name, port->d_name, kinds[k], ce->d_name, v);
						fclose(fp);
					}
				}
				closedir(cd);
			}
		}
		closedir(pd);
	}
	closedir(d);
}

static void print_counter(const char *dev, const char *port, const char *kind, const char *name,
			  uint64_t v)
{
	printf("%s/%s %-11s %-32s %" PRIu64 "\n", dev, port, kind, name, v);
}

static void prom_counter(const char *dev, const char *port, const char *kind, const char *name,
			 uint64_t v)
{
	printf("rdmaps_device_%s{device=\"%s\",port=\"%s\",counter=\"%s\"} %" PRIu64 "\n",
	       kind[0] == 'h' ? "hw_counter" : "counter", dev, port, name, v);
}

static void prom_worker(uint32_t server, const struct rdmaps_wire_worker_info *w)
{
	printf("rdmaps_worker_folds{server=\"%u\",worker=\"%s\"} %" PRIu64 "\n", server, w->addr, w->folds);
	printf("rdmaps_worker_dropped{server=\"%u\",worker=\"%s\"} %" PRIu64 "\n", server, w->addr,
	       w->dropped);
	printf("rdmaps_worker_bad_messages{server=\"%u\",worker=\"%s\"} %" PRIu64 "\n", server, w->addr,
	       w->bad_messages);
	printf("rdmaps_worker_memory_bytes{server=\"%u\",worker=\"%s\"} %" PRIu64 "\n", server, w->addr,
	       w->memory);
	printf("rdmaps_worker_pinned_bytes{server=\"%u\",worker=\"%s\"} %" PRIu64 "\n", server, w->addr,
	       w->pinned);
}

/*
 * What registration scheme a server on each local device would use by
 * default (rdmaps-server --registration auto): shared needs type-2 memory
 * windows. The server's own choice is in `rdmaps-ctl servers`
 * (shared_devices) and its log.
 */
/* Pages a server here would put tensors in (store.c): the NIC needs one
 * translation entry per page. */
static void huge_pages(void)
{
	char mode[16];
	size_t size = rdmaps__thp_size();

	rdmaps__thp_mode(mode, sizeof(mode));
	printf("tensor pages: %zu (transparent huge pages: %s; tensors of 2 MiB or more ask for "
	       "them)\n",
	       size ? size : 4096, mode[0] ? mode : "none");
}

static void device_registration(void)
{
	int n = 0;
	struct ibv_device **list = ibv_get_device_list(&n);

	for (int i = 0; list && i < n; i++) {
		struct ibv_context *ctx = ibv_open_device(list[i]);
		struct ibv_device_attr da;
		bool mw2;
		if (!ctx)
			continue;
		if (!ibv_query_device(ctx, &da)) {
			mw2 = rdmaps__has_mw2(&da);
			printf("%s registration: %s (type-2 memory windows: %s, max_mw %d, max_mr %d)\n",
			       ibv_get_device_name(list[i]), mw2 ? "shared" : "per-worker",
			       mw2 ? "yes" : "no", da.max_mw, da.max_mr);
		}
		ibv_close_device(ctx);
	}
	if (list)
		ibv_free_device_list(list);
	huge_pages();
}

/* A level that goes up and down, not a count since start. */
static bool stat_is_gauge(const char *f)
{
	static const char *const gauges[] = { "connections", "tensors", "restored_seq",
					      "shared_devices", "memory_regions", "memory_windows",
					      "registered_bytes", "staging_bytes", "staging_budget",
					      "huge_page_bytes", "backups", "epoch" };
	for (size_t i = 0; i < sizeof(gauges) / sizeof(gauges[0]); i++)
		if (!strcmp(f, gauges[i]))
			return true;
	return false;
}

static int cmd_prometheus(rdmaps_client *c)
{
#define HELP(f) printf("# TYPE rdmaps_server_" #f " %s\n", stat_is_gauge(#f) ? "gauge" : "counter");
	RDMAPS_SERVER_STATS_MAP(HELP)
#undef HELP
	for (uint32_t i = 0; i < c->nconn; i++) {
		struct rdmaps_server_stats st;
		int rc = cl_server_stats(&c->conn[i], &st);
		if (rc) {
			fprintf(stderr, "rdmaps-ctl: server %s: %s\n", c->conn[i].name, rdmaps_strerror(rc));
			return 1;
		}
#define PROM(f) printf("rdmaps_server_" #f "{server=\"%s\"} %" PRIu64 "\n", c->conn[i].name, (uint64_t)st.f);
		RDMAPS_SERVER_STATS_MAP(PROM)
#undef PROM
	}
	printf("# TYPE rdmaps_worker_folds counter\n# TYPE rdmaps_worker_dropped counter\n"
	       "# TYPE rdmaps_worker_bad_messages counter\n# TYPE rdmaps_worker_memory_bytes gauge\n"
	       "# TYPE rdmaps_worker_pinned_bytes gauge\n");
	if (for_workers(c, prom_worker))
		return 1;
	printf("# TYPE rdmaps_device_counter counter\n# TYPE rdmaps_device_hw_counter counter\n");
	sysfs_counters(prom_counter);
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "servers", required_argument, NULL, 's' }, { "config", required_argument, NULL, 'c' },
		{ "token", required_argument, NULL, 't' },   { "src", required_argument, NULL, 'a' },
		{ "timeout", required_argument, NULL, 'T' }, { "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	struct rdmaps_cluster_opts o = { .timeout_ms = 5000 };
	rdmaps_client *c = NULL;
	const char *cmd;
	int opt, rc;

	while ((opt = getopt_long(argc, argv, "s:c:t:a:T:h", opts, NULL)) != -1) {
		switch (opt) {
		case 's': o.servers = optarg; break;
		case 'c': o.config = optarg; break;
		case 't': o.token = optarg; break;
		case 'a': o.src_addr = optarg; break;
		case 'T': o.timeout_ms = atoi(optarg); break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind >= argc) {
		usage(stderr);
		return 2;
	}
	cmd = argv[optind];
	if (!strcmp(cmd, "device")) { /* local only: no server needed */
		device_registration();
		sysfs_counters(print_counter);
		return 0;
	}
	if (strcmp(cmd, "servers") && strcmp(cmd, "tensors") && strcmp(cmd, "workers") &&
	    strcmp(cmd, "replicas") &&
	    strcmp(cmd, "prometheus") && strcmp(cmd, "checkpoint") &&
	    (strcmp(cmd, "chunks") || optind + 1 >= argc)) {
		fprintf(stderr, "rdmaps-ctl: unknown command or missing argument: %s\n", cmd);
		usage(stderr);
		return 2;
	}
	rdmaps__log_init(RDMAPS_LOG_ERROR);
	if ((rc = rdmaps_connect_cluster(&o, &c))) {
		/* the library logged which server; say what it means here */
		fprintf(stderr, "rdmaps-ctl: cannot reach the cluster: %s\n", rdmaps_strerror(rc));
		return 1;
	}
	if (!strcmp(cmd, "servers"))
		rc = cmd_servers(c);
	else if (!strcmp(cmd, "tensors"))
		rc = cmd_tensors(c);
	else if (!strcmp(cmd, "chunks"))
		rc = cmd_chunks(c, argv[optind + 1]);
	else if (!strcmp(cmd, "replicas"))
		rc = cmd_replicas(c);
	else if (!strcmp(cmd, "workers"))
		rc = cmd_workers(c);
	else if (!strcmp(cmd, "prometheus"))
		rc = cmd_prometheus(c);
	else {
		rc = rdmaps_checkpoint(c, o.timeout_ms > 0 ? o.timeout_ms * 4 : 20000);
		if (rc)
			fprintf(stderr, "rdmaps-ctl: checkpoint: %s\n", rdmaps_strerror(rc));
		else
			printf("checkpoint written on %u server(s)\n", c->nconn);
		rc = rc ? 1 : 0;
	}
	rdmaps_close(c);
	return rc;
}
