/*
 * worker.c -- rdmaps-train-worker: one data-parallel worker training the MLP
 * of mlp.h on Fashion-MNIST through an rdmaps server.
 *
 * The whole model is ONE flat tensor (layout in mlp.h): a step is one pull
 * and one push, the READs of its chunks go out together, and a push group up
 * to the server's staging ring is folded atomically, so a pull never mixes
 * half of one worker's update into w1 with none of it into b1. Four tensors
 * (w1, b1, w2, b2) would cost four ops and seven chunk READs a step instead
 * of one op and four.
 *
 * Each step: pull the model (zero copy: the buffer is registered once),
 * compute the gradient of one minibatch of this worker's slice of the
 * training set, push it (zero copy too). The server folds it with SGD.
 * Workers run asynchronously (no barrier): rank 0 also evaluates the model
 * on the test set after each of its epochs, and at the end waits until every
 * worker has finished (a one-float counter tensor that each worker bumps by
 * pushing -1 to an lr = 1 SGD tensor) before reporting final_accuracy.
 *
 * SPDX-License-Identifier: BSD-2-Clause
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "histogram.h"
#include "mlp.h"
#include "mnist.h"
#include "rdmaps.h"

struct opts {
	const char *server, *servers, *config, *port, *src, *token, *data, *name;
	int rank, workers; /* -1 until set: then the launcher's, else 0 and 1 */
	unsigned epochs, batch, hidden;
	float lr, lr_end, target;
	size_t subset, test_subset;
	unsigned long long seed;
	int timeout_ms, wait_s;
	int quiet;
	enum rdmaps_format wire; /* the format of gradient pushes */
	double wire_fraction;    /* top-k */
};

/* "f32", "bf16", "fp16", "sign" or "topk:FRACTION"; 0 or -1. */
static int parse_wire(const char *s, struct opts *o)
{
	static const char *const names[] = { "f32", "bf16", "fp16", "topk", "sign" };
	char *end;

	for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		size_t n = strlen(names[i]);
		if (strncmp(s, names[i], n))
			continue;
		o->wire = (enum rdmaps_format)i;
		if (o->wire != RDMAPS_FMT_TOPK)
			return s[n] ? -1 : 0;
		if (s[n] != ':')
			return -1;
		o->wire_fraction = strtod(s + n + 1, &end);
		return !*end && o->wire_fraction > 0 && o->wire_fraction <= 0.5 ? 0 : -1;
	}
	return -1;
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: rdmaps-train-worker {--server ADDR | --servers LIST | --config FILE} [options]\n"
		"  --server ADDR      one rdmaps-server (default $RDMAPS_RXE_ADDR when no cluster\n"
		"                     is described by $RDMAPS_SERVERS or $RDMAPS_CONFIG)\n"
		"  --port P           its port (default 7471)\n"
		"  --servers LIST     several shards: host[:port],host[:port]... (docs/cluster.md)\n"
		"  --config FILE      cluster description (INI, docs/cluster.md)\n"
		"  --src ADDR         local address to connect from (selects the RDMA device)\n"
		"  --token T          shared secret (default $RDMAPS_TOKEN)\n"
		"  --rank R           this worker's rank, 0..W-1; rank 0 evaluates\n"
		"  --workers W        number of workers\n"
		"                     (rank and workers default to the launcher's: Slurm, MPI...)\n"
		"  --epochs E         passes over this worker's slice (default 4)\n"
		"  --batch B          minibatch size (default 64)\n"
		"  --hidden H         hidden units (default 64)\n"
		"  --lr LR            learning rate of one worker's push (default 0.1; see below)\n"
		"  --lr-end F         decay the step linearly to F * LR by the last step (default 0.1)\n"
		"  --subset N         use the first N training samples (default all 60000)\n"
		"  --test-subset N    evaluate on the first N test samples (default all 10000)\n"
		"  --data DIR         IDX .gz files (default " MNIST_DEFAULT_DIR ")\n"
		"  --name NAME        tensor name prefix, one per training run (default fmnist)\n"
		"  --seed S           initialisation and shuffling seed (default 42)\n"
		"  --target ACC       rank 0 exits 1 if the final test accuracy is below ACC\n"
		"  --timeout-ms MS    connect and control timeout (default 20000)\n"
		"  --wait S           rank 0: wait at most S seconds for the others (default 1800)\n"
		"  --quiet            no per-epoch lines (rank 0 still prints the final ones)\n"
		"  --wire FMT         format of gradient pushes: f32 (default), bf16, fp16, sign,\n"
		"                     topk:FRACTION (0 < FRACTION <= 0.5); docs/protocol.md\n"
		"The server's SGD learning rate is LR * min(1, sqrt(2 / W)): see docs/training.md.\n");
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int parse_opts(int argc, char **argv, struct opts *o)
{
	enum { O_SERVER = 256, O_SERVERS, O_CONFIG, O_PORT, O_SRC, O_TOKEN, O_RANK, O_WORKERS, O_EPOCHS, O_BATCH,
	       O_HIDDEN, O_LR, O_LR_END, O_SUBSET, O_TSUBSET, O_DATA, O_NAME, O_SEED, O_TARGET, O_TIMEOUT,
	       O_WAIT, O_QUIET, O_WIRE, O_HELP };
	static const struct option lo[] = {
		{ "server", required_argument, NULL, O_SERVER },
		{ "servers", required_argument, NULL, O_SERVERS },
		{ "config", required_argument, NULL, O_CONFIG },
		{ "port", required_argument, NULL, O_PORT },
		{ "src", required_argument, NULL, O_SRC },
		{ "token", required_argument, NULL, O_TOKEN },
		{ "rank", required_argument, NULL, O_RANK },
		{ "workers", required_argument, NULL, O_WORKERS },
		{ "epochs", required_argument, NULL, O_EPOCHS },
		{ "batch", required_argument, NULL, O_BATCH },
		{ "hidden", required_argument, NULL, O_HIDDEN },
		{ "lr", required_argument, NULL, O_LR },
		{ "lr-end", required_argument, NULL, O_LR_END },
		{ "subset", required_argument, NULL, O_SUBSET },
		{ "test-subset", required_argument, NULL, O_TSUBSET },
		{ "data", required_argument, NULL, O_DATA },
		{ "name", required_argument, NULL, O_NAME },
		{ "seed", required_argument, NULL, O_SEED },
		{ "target", required_argument, NULL, O_TARGET },
		{ "timeout-ms", required_argument, NULL, O_TIMEOUT },
		{ "wait", required_argument, NULL, O_WAIT },
		{ "quiet", no_argument, NULL, O_QUIET },
		{ "wire", required_argument, NULL, O_WIRE },
		{ "help", no_argument, NULL, O_HELP },
		{ 0 },
	};
	int c;

	*o = (struct opts){
		.port = "7471",
		.rank = -1,
		.workers = -1,
		.token = getenv("RDMAPS_TOKEN"),
		.data = MNIST_DEFAULT_DIR,
		.name = "fmnist",
		.epochs = 4,
		.batch = 64,
		.hidden = 64,
		.lr = 0.1f,
		.lr_end = 0.1f,
		.seed = 42,
		.timeout_ms = 20000,
		.wait_s = 1800,
	};
	while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		char *end = NULL;
		unsigned long long v = 0;
		double d = 0;

		errno = 0;
		if (optarg) {
			v = strtoull(optarg, &end, 10);
			d = strtod(optarg, NULL);
		}
		int num_ok = optarg && !errno && end != optarg && !*end;
		switch (c) {
		case O_SERVER: o->server = optarg; continue;
		case O_SERVERS: o->servers = optarg; continue;
		case O_CONFIG: o->config = optarg; continue;
		case O_PORT: o->port = optarg; continue;
		case O_SRC: o->src = optarg; continue;
		case O_TOKEN: o->token = optarg; continue;
		case O_DATA: o->data = optarg; continue;
		case O_NAME: o->name = optarg; continue;
		case O_QUIET: o->quiet = 1; continue;
		case O_WIRE: if (parse_wire(optarg, o)) goto bad; continue;
		case O_LR: o->lr = (float)d; if (!(d > 0 && d < 100)) goto bad; continue;
		case O_LR_END: o->lr_end = (float)d; if (!(d >= 0 && d <= 1)) goto bad; continue;
		case O_TARGET: o->target = (float)d; if (!(d >= 0 && d <= 1)) goto bad; continue;
		case 'h': case O_HELP: usage(stdout); exit(0);
		case '?': usage(stderr); return -1;
		default: break;
		}
		if (!num_ok)
			goto bad;
		switch (c) {
		case O_RANK: o->rank = (int)v; if (v > 4095) goto bad; break;
		case O_WORKERS: o->workers = (int)v; if (!v || v > 4096) goto bad; break;
		case O_EPOCHS: o->epochs = (unsigned)v; if (!v || v > 10000) goto bad; break;
		case O_BATCH: o->batch = (unsigned)v; if (!v || v > 65536) goto bad; break;
		case O_HIDDEN: o->hidden = (unsigned)v; if (!v || v > 65536) goto bad; break;
		case O_SUBSET: o->subset = (size_t)v; break;
		case O_TSUBSET: o->test_subset = (size_t)v; break;
		case O_SEED: o->seed = v; break;
		case O_TIMEOUT: o->timeout_ms = (int)v; if (!v || v > 3600000) goto bad; break;
		case O_WAIT: o->wait_s = (int)v; if (v > 86400) goto bad; break;
		default: goto bad;
		}
		continue;
bad:
		fprintf(stderr, "rdmaps-train-worker: bad value '%s' for --%s\n", optarg ? optarg : "",
			lo[c - O_SERVER].name);
		return -1;
	}
	if (optind < argc) {
		fprintf(stderr, "rdmaps-train-worker: unexpected argument '%s'\n", argv[optind]);
		return -1;
	}
	if (o->server && (o->servers || o->config)) {
		fprintf(stderr, "rdmaps-train-worker: --server or --servers/--config, not both\n");
		return -1;
	}
	if (!o->server && !o->servers && !o->config && !getenv("RDMAPS_SERVERS") &&
	    !getenv("RDMAPS_CONFIG") && !(o->server = getenv("RDMAPS_RXE_ADDR"))) {
		fprintf(stderr, "rdmaps-train-worker: no server: --server, --servers or --config\n");
		return -1;
	}
	/* rank and size from the launcher (Slurm, MPI, torchrun...) unless given */
	int lrank = -1, lsize = -1;
	if (rdmaps_launch_info(&lrank, &lsize))
		fprintf(stderr, "rdmaps-train-worker: ignoring a malformed RDMAPS_RANK/RDMAPS_SIZE\n");
	if (o->workers < 0)
		o->workers = lsize > 0 ? lsize : 1;
	if (o->rank < 0)
		o->rank = lrank >= 0 ? lrank : 0;
	if (o->rank >= o->workers) {
		fprintf(stderr, "rdmaps-train-worker: --rank must be below --workers\n");
		return -1;
	}
	return 0;
}

/*
 * Asynchronous workers: each push is applied on its own, so an epoch of W
 * workers makes as many updates (N / B) as one worker would: no linear
 * scaling with W (that rule is for synchronous, summed gradients). What W
 * adds is staleness: a gradient lands about W - 1 updates after the model
 * it was computed on, and stale steps want to be shorter. Damping by
 * sqrt(2 / W) from three workers on held up best in a simulation of this
 * model (docs/training.md). worker.py uses the same rule.
 */
static float server_lr(float lr, unsigned workers)
{
	return workers <= 2 ? lr : lr * sqrtf(2.0f / (float)workers);
}

static uint64_t splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void shuffle(uint32_t *idx, size_t n, uint64_t seed)
{
	for (size_t i = n; i > 1; i--) {
		size_t j = (size_t)(splitmix64(&seed) % i);
		uint32_t t = idx[i - 1];
		idx[i - 1] = idx[j];
		idx[j] = t;
	}
}

static int fail(const char *what, int rc)
{
	fprintf(stderr, "rdmaps-train-worker: %s: %s (%s)\n", what, rdmaps_strerror(rc),
		rdmaps_err_name(rc));
	return 1;
}

static int connect_retry(const struct opts *o, rdmaps_client **c)
{
	double give_up = now_s() + o->timeout_ms / 1000.0;
	int rc;

	if (!o->server) { /* a cluster: rdmaps_connect_cluster retries by itself */
		struct rdmaps_cluster_opts co = {
			.config = o->config, .servers = o->servers, .src_addr = o->src,
			.token = o->token, .timeout_ms = o->timeout_ms,
		};
		return rdmaps_connect_cluster(&co, c);
	}
	struct rdmaps_connect_opts co = {
		.host = o->server, .port = o->port, .src_addr = o->src, .token = o->token,
		.timeout_ms = o->timeout_ms,
	};
	/* the server may still be starting: retry what a late start looks like */
	while ((rc = rdmaps_connect(&co, c)) == RDMAPS_ECONNECT || rc == RDMAPS_ETIMEDOUT) {
		if (now_s() > give_up)
			break;
		struct timespec ts = { 0, 200 * 1000000 };
		nanosleep(&ts, NULL);
	}
	return rc;
}

static double accuracy(const struct mlp *m, const float *params, const struct mnist_set *test,
		       struct mlp_work *w)
{
	return (double)mlp_correct(m, params, test->x, test->y, test->n, w) / (double)test->n;
}

int main(int argc, char **argv)
{
	static struct rdmaps_hist hist; /* ~30 KiB of fixed buckets: recording never allocates */
	struct opts o;
	struct mnist_set train = { 0 }, test = { 0 };
	struct mlp m;
	struct mlp_work work = { 0 };
	rdmaps_client *c = NULL;
	rdmaps_tensor *tp = NULL, *tdone = NULL;
	rdmaps_mr *mr_p = NULL, *mr_g = NULL, *mr_a = NULL;
	float *params = NULL, *grad = NULL, *aux = NULL, *init = NULL;
	uint32_t *idx = NULL;
	char pname[RDMAPS_NAME_MAX + 1], dname[RDMAPS_NAME_MAX + 1];
	int rc, status = 1;

	if (parse_opts(argc, argv, &o))
		return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	mlp_dims(&m, 784, o.hidden, 10);
	m.in_mean = MNIST_MEAN; /* the network sees (pixel - mean) / std */
	m.in_std = MNIST_STD;
	if (snprintf(pname, sizeof(pname), "%s.mlp784x%ux10", o.name, o.hidden) >= (int)sizeof(pname) ||
	    snprintf(dname, sizeof(dname), "%s.done", o.name) >= (int)sizeof(dname)) {
		fprintf(stderr, "rdmaps-train-worker: --name too long\n");
		return 2;
	}

	/* data: this worker's slice of the (subset of the) training set */
	if (mnist_load(o.data, "train", o.subset, &train))
		return 1;
	if (train.dim != m.in) {
		fprintf(stderr, "rdmaps-train-worker: images have %zu pixels, want %u\n", train.dim, m.in);
		goto out;
	}
	if (o.rank == 0 && mnist_load(o.data, "t10k", o.test_subset, &test))
		goto out;
	size_t lo = train.n * o.rank / o.workers, hi = train.n * (o.rank + 1) / o.workers;
	size_t n_mine = hi - lo;
	if (n_mine < o.batch) {
		fprintf(stderr, "rdmaps-train-worker: slice of %zu samples is smaller than a batch\n",
			n_mine);
		goto out;
	}

	/* buffers the NIC reads and writes: page-aligned, registered once below */
	size_t bytes = (m.n_params * sizeof(float) + 4095) / 4096 * 4096;
	params = aligned_alloc(4096, bytes);
	grad = aligned_alloc(4096, bytes);
	aux = aligned_alloc(4096, 4096); /* the done counter's one float */
	init = malloc(m.n_params * sizeof(float));
	idx = malloc(n_mine * sizeof(*idx));
	if (!params || !grad || !aux || !init || !idx || mlp_work_alloc(&work, &m, o.batch)) {
		fprintf(stderr, "rdmaps-train-worker: out of memory\n");
		goto out;
	}
	for (size_t i = 0; i < n_mine; i++)
		idx[i] = (uint32_t)(lo + i);

	if ((rc = connect_retry(&o, &c))) {
		fail("connect", rc);
		goto out;
	}
	/* every worker declares the same tensor with the same initial values;
	 * the first declaration wins, the others attach */
	mlp_init_params(&m, init, o.seed);
	rdmaps_mr *mr_init = NULL; /* so even the creator's initial push is zero-copy */
	if ((rc = rdmaps_register(c, init, m.n_params * sizeof(float), &mr_init))) {
		fail("register", rc);
		goto out;
	}
	struct rdmaps_tensor_desc dp = {
		.name = pname, .length = m.n_params, .init = init,
		.optimizer = RDMAPS_OPT_SGD, .lr = server_lr(o.lr, (unsigned)o.workers),
	};
	struct rdmaps_tensor_desc dd = {
		.name = dname, .length = 1, .init_value = 0.0f,
		.optimizer = RDMAPS_OPT_SGD, .lr = 1.0f,
	};
	if ((rc = rdmaps_declare(c, &dp, &tp))) {
		fail(rc == RDMAPS_EEXIST ? "declare (a tensor of that name exists with other settings: "
					   "use another --name)" : "declare", rc);
		goto out;
	}
	rdmaps_deregister(mr_init);
	if ((rc = rdmaps_set_push_format(c, tp, o.wire, o.wire_fraction))) {
		fail("set_push_format", rc);
		goto out;
	}
	if ((rc = rdmaps_declare(c, &dd, &tdone))) {
		fail("declare done counter", rc);
		goto out;
	}
	if ((rc = rdmaps_register(c, params, bytes, &mr_p)) ||
	    (rc = rdmaps_register(c, grad, bytes, &mr_g)) ||
	    (rc = rdmaps_register(c, aux, 4096, &mr_a))) {
		fail("register", rc);
		goto out;
	}
	if (!o.quiet || o.rank == 0)
		printf("[w%d] %zu train samples (slice %zu..%zu), %zu params (%.0f KiB), batch %u, "
		       "server lr %.4g, %u epochs, %u server%s\n",
		       o.rank, n_mine, lo, hi, m.n_params, m.n_params * 4 / 1024.0, o.batch,
		       (double)server_lr(o.lr, (unsigned)o.workers), o.epochs, rdmaps_num_servers(c),
		       rdmaps_num_servers(c) == 1 ? "" : "s");

	double t_start = now_s();
	size_t steps = n_mine / o.batch; /* the remainder joins the next shuffle */
	for (unsigned ep = 0; ep < o.epochs; ep++) {
		double t0 = now_s(), loss = 0;

		rdmaps__hist_reset(&hist);
		shuffle(idx, n_mine, o.seed * 1000003u + (unsigned)o.rank * 7919u + ep);
		for (size_t s = 0; s < steps; s++) {
			uint64_t p0 = now_ns();
			if ((rc = rdmaps_pull(c, tp, params, 0))) {
				fail("pull", rc);
				goto out;
			}
			rdmaps__hist_record(&hist, now_ns() - p0);
			loss += mlp_gradient(&m, params, train.x, train.y, idx + s * o.batch, o.batch,
					     grad, &work);
			/* learning-rate schedule: the server's SGD is linear in the
			 * gradient, so scaling what we push scales our step */
			float progress = (float)(ep * steps + s) / (float)(o.epochs * steps);
			float scale = 1.0f - (1.0f - o.lr_end) * progress;
			for (size_t i = 0; i < m.n_params; i++)
				grad[i] *= scale;
			if ((rc = rdmaps_push(c, tp, grad, 0))) {
				fail("push", rc);
				goto out;
			}
		}
		double dt = now_s() - t0;
		char acc[32] = "";
		if (o.rank == 0) {
			if ((rc = rdmaps_pull(c, tp, params, 0))) {
				fail("pull", rc);
				goto out;
			}
			snprintf(acc, sizeof(acc), "  test_acc %.4f", accuracy(&m, params, &test, &work));
		}
		if (!o.quiet)
			printf("[w%d] epoch %u/%u  loss %.4f%s  pulls/s %.1f  pull p50 %.3f ms  "
			       "p99 %.3f ms  (%.1f s)\n",
			       o.rank, ep + 1, o.epochs, loss / (double)steps, acc,
			       (double)steps / dt, rdmaps__hist_quantile(&hist, 0.50) / 1e6,
			       rdmaps__hist_quantile(&hist, 0.99) / 1e6, dt);
	}

	/* tell the others we are done: the counter's SGD with lr 1 adds 1 */
	aux[0] = -1.0f;
	if ((rc = rdmaps_push(c, tdone, aux, RDMAPS_PUSH_FOLDED)) ||
	    (rc = rdmaps_flush(c, o.timeout_ms))) {
		fail("final push", rc);
		goto out;
	}
	struct rdmaps_client_stats cs;
	rdmaps_client_stats(c, &cs);
	if (!o.quiet || o.rank == 0)
		printf("[w%d] done in %.1f s: %llu pulls, %llu pushes, %llu torn-read retries, "
		       "%llu bounce copies, %.1f MB pushed\n", o.rank, now_s() - t_start,
		       (unsigned long long)cs.pulls, (unsigned long long)cs.pushes,
		       (unsigned long long)cs.pull_retries, (unsigned long long)cs.bounce_copies,
		       (double)cs.push_bytes / 1e6);

	if (o.rank == 0) {
		double give_up = now_s() + o.wait_s;
		int announced = 0;
		for (;;) {
			if ((rc = rdmaps_pull(c, tdone, aux, 0))) {
				fail("pull done counter", rc);
				goto out;
			}
			float done = aux[0];
			if (done >= (float)o.workers)
				break;
			if (now_s() > give_up) {
				fprintf(stderr, "[w0] gave up waiting: %.0f of %d workers finished\n",
					(double)done, o.workers);
				goto out;
			}
			if (!announced++ && !o.quiet)
				printf("[w0] waiting for the other workers (%.0f of %d done)\n",
				       (double)done, o.workers);
			struct timespec ts = { 0, 50 * 1000000 };
			nanosleep(&ts, NULL);
		}
		if ((rc = rdmaps_pull(c, tp, params, 0))) {
			fail("pull", rc);
			goto out;
		}
		double a = accuracy(&m, params, &test, &work);
		struct rdmaps_server_stats ss;
		if (!rdmaps_server_stats(c, &ss))
			printf("[w0] server: %llu folds, %llu dropped, %llu tensors\n",
			       (unsigned long long)ss.folds, (unsigned long long)ss.dropped,
			       (unsigned long long)ss.tensors);
		printf("[w0] %d workers, %.1f s\n", o.workers, now_s() - t_start);
		printf("final_accuracy=%.4f\n", a);
		if (o.target > 0 && a < (double)o.target) {
			fprintf(stderr, "[w0] final accuracy %.4f is below the target %.4f\n", a,
				(double)o.target);
			goto out;
		}
	}
	status = 0;
out:
	rdmaps_close(c); /* frees tensors and registrations, before the buffers */
	mlp_work_free(&work);
	free(params);
	free(grad);
	free(aux);
	free(init);
	free(idx);
	mnist_free(&train);
	mnist_free(&test);
	return status;
}
