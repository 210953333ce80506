/*
 * The seqlock + checksum protocol of common/chunk.h, exercised natively with
 * the server's own writer (srv_chunk_apply) and a reader that copies memory
 * in ascending order the way a NIC serves an RDMA READ.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "optimizer.h"
#include "server.h"

static struct srv_store store;
static struct srv_tensor *tensor;

static void make_tensor_copies(uint64_t length, uint32_t chunk_elems, float init,
			       uint64_t two_copies_min)
{
	struct srv_config cfg = { .max_tensors = 4, .chunk_elems = chunk_elems,
				  .max_tensor_bytes = 1ull << 30, .max_total_bytes = 1ull << 30,
				  .two_copies_min = two_copies_min };
	struct rdmaps_msg_declare m = { 0 };
	bool created;

	cr_assert_eq(srv_store_init(&store, &cfg), 0);
	m.length = length;
	m.init_value = init;
	m.hyper.lr = 1.0f;
	strcpy(m.optimizer, "sgd");
	strcpy(m.name, "t");
	cr_assert_eq(srv_store_declare(&store, &m, NULL, &tensor, &created), 0);
	cr_assert(created);
}

static void make_tensor(uint64_t length, uint32_t chunk_elems, float init)
{
	make_tensor_copies(length, chunk_elems, init, 0);
}

static void drop_tensor(void)
{
	srv_store_fini(&store);
}

/* What a reader gets from one READ of chunk i: header, then data. */
static int read_chunk(uint32_t i, float *out)
{
	uint32_t count = rdmaps__chunk_count(tensor->length, tensor->chunk_elems, i);
	const uint8_t *p = srv_chunk(tensor, i);
	struct rdmaps_chunk_hdr h;

	memcpy(&h, p, sizeof(h));
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	memcpy(out, p + RDMAPS_CHUNK_HDR, count * sizeof(float));
	return rdmaps__chunk_consistent(&h, out, count);
}

/* A two-copy reader, as client/ops.c reads: the index word first, then the
 * copy it names; accepted only whole and no older than the index said; a
 * refused READ goes to the other copy. Returns the READs it took. */
static int read_chunk_two(uint32_t i, float *out, uint64_t *version)
{
	uint32_t count = rdmaps__chunk_count(tensor->length, tensor->chunk_elems, i);
	uint64_t word = __atomic_load_n(&tensor->index[i], __ATOMIC_ACQUIRE);
	unsigned copy = (unsigned)(word >> 1) & 1u;

	for (int tries = 1;; tries++, copy ^= 1u) {
		const uint8_t *p = srv_chunk_copy(tensor, i, copy);
		struct rdmaps_chunk_hdr h;
		memcpy(&h, p, sizeof(h));
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
		memcpy(out, p + RDMAPS_CHUNK_HDR, count * sizeof(float));
		if (rdmaps__chunk_consistent(&h, out, count) && h.version >= (word & ~1ull)) {
			*version = h.version;
			return tries;
		}
	}
}

Test(chunk, layout_and_detection, .fini = drop_tensor)
{
	float buf[1000];
	make_tensor(2500, 1024, 3.0f);

	cr_assert_eq(tensor->nchunks, 3);
	cr_assert_eq(rdmaps__chunk_count(2500, 1024, 2), 452);
	for (uint32_t i = 0; i < 3; i++) {
		float tmp[1024];
		cr_assert(read_chunk(i, tmp), "fresh chunk %u consistent", i);
		cr_assert_eq(tmp[0], 3.0f);
	}
	/* a flipped data bit, an odd version, a body from another fold than its
	 * checksum (as a READ racing a fold sees it): all refused */
	uint8_t *p = srv_chunk(tensor, 2);
	struct rdmaps_chunk_hdr *h = (struct rdmaps_chunk_hdr *)p;
	float *d = (float *)(p + RDMAPS_CHUNK_HDR);
	d[17] = 4.0f;
	cr_assert_not(read_chunk(2, buf), "checksum must catch a changed float");
	d[17] = 3.0f;
	cr_assert(read_chunk(2, buf));
	h->version++;
	cr_assert_not(read_chunk(2, buf), "odd version means a fold is writing");
	h->version++;
	cr_assert(read_chunk(2, buf));
	/* half of the body from the next fold, the header still the old one */
	uint64_t old_sum = h->checksum;
	float g[452];
	for (int i = 0; i < 452; i++)
		g[i] = 1.0f;
	srv_chunk_apply(tensor, 2, g, 452, false);
	float next[452];
	memcpy(next, d, sizeof(next));
	srv_chunk_apply(tensor, 2, g, 452, false); /* undo nothing: a third state */
	memcpy(d + 226, next + 226, 226 * sizeof(float)); /* a mixed body */
	uint64_t v = h->version;
	cr_assert_not(read_chunk(2, buf), "a body mixing two folds matches no checksum");
	h->checksum = old_sum;
	cr_assert_not(read_chunk(2, buf), "nor the older checksum");
	cr_assert_eq(h->version, v);
}

Test(chunk, sgd_fold_exact, .fini = drop_tensor)
{
	float g[1000], out[1000];
	make_tensor(1000, 1024, 10.0f);
	for (int i = 0; i < 1000; i++)
		g[i] = (float)(i % 7) - 3.0f;
	srv_chunk_apply(tensor, 0, g, 1000, false);
	srv_chunk_apply(tensor, 0, g, 1000, false);
	cr_assert(read_chunk(0, out));
	for (int i = 0; i < 1000; i++)
		cr_assert_eq(out[i], 10.0f - 2.0f * g[i], "element %d: %f", i, out[i]);
	cr_assert_eq(tensor->steps[0], 2);
}

static _Atomic int stop_writer;

static void *writer(void *arg)
{
	static float g[4096];
	(void)arg;
	for (int i = 0; i < 4096; i++)
		g[i] = -1.0f; /* lr 1: every fold adds exactly 1 to every element */
	while (!atomic_load(&stop_writer))
		for (uint32_t c = 0; c < tensor->nchunks; c++)
			srv_chunk_apply(tensor, c, g,
					rdmaps__chunk_count(tensor->length, tensor->chunk_elems, c),
					false);
	return NULL;
}

Test(chunk, concurrent_reader_never_accepts_torn_chunk, .fini = drop_tensor, .timeout = 120)
{
	static float buf[4096];
	pthread_t w;
	long accepted = 0, refused = 0, torn_seen = 0;

	make_tensor(4 * 4096, 4096, 0.0f);
	atomic_store(&stop_writer, 0);
	pthread_create(&w, NULL, writer, NULL);
	for (int iter = 0; iter < 20000; iter++) {
		uint32_t c = (uint32_t)iter % tensor->nchunks;
		int ok = read_chunk(c, buf);
		int uniform = 1;
		for (int k = 1; k < 4096; k++)
			if (buf[k] != buf[0])
				uniform = 0;
		if (!uniform)
			torn_seen++;
		if (ok) {
			accepted++;
			cr_assert(uniform, "accepted a torn chunk at iteration %d", iter);
		} else {
			refused++;
		}
	}
	atomic_store(&stop_writer, 1);
	pthread_join(w, NULL);
	printf("chunk race: %ld accepted, %ld refused, %ld torn copies seen\n", accepted, refused,
	       torn_seen);
	cr_assert_gt(accepted, 0);
	/* every torn copy the reader saw was one it refused */
	cr_assert(torn_seen == 0 || refused >= torn_seen, "torn %ld, refused %ld", torn_seen, refused);
}

Test(chunk, two_copies_fold_into_the_other_copy, .fini = drop_tensor)
{
	float g[1000], out[1000];
	uint64_t v;

	make_tensor_copies(1000, 1024, 10.0f, 4000);
	cr_assert_not_null(tensor->index, "two copies");
	cr_assert_eq(tensor->index[0], 0);
	for (int i = 0; i < 1000; i++)
		g[i] = (float)(i % 7) - 3.0f;
	for (int f = 1; f <= 3; f++) {
		const uint8_t *before = srv_chunk(tensor, 0);
		srv_chunk_apply(tensor, 0, g, 1000, false);
		cr_assert_eq(tensor->index[0], 2u * f, "index after fold %d", f);
		cr_assert_neq(srv_chunk(tensor, 0), before, "fold %d must flip the copy", f);
		cr_assert_eq(read_chunk_two(0, out, &v), 1);
		cr_assert_eq(v, 2u * f);
		for (int i = 0; i < 1000; i++)
			cr_assert_eq(out[i], 10.0f - (float)f * g[i], "fold %d [%d]: %f", f, i, out[i]);
		/* the copy just left still holds the fold before, whole */
		const struct rdmaps_chunk_hdr *old = (const void *)before;
		cr_assert(rdmaps__chunk_consistent(old, (const float *)(old + 1), 1000) || f == 1,
			  "fold %d: the previous copy must stay whole", f);
	}
	cr_assert_eq(tensor->steps[0], 3);
	/* a small tensor keeps one copy */
	drop_tensor();
	make_tensor_copies(999, 1024, 0.0f, 4000);
	cr_assert_null(tensor->index, "one copy");
	cr_assert_eq(tensor->copy_off, 0);
}

Test(chunk, two_copies_reader_never_accepts_torn_or_old, .fini = drop_tensor, .timeout = 120)
{
	static float buf[4096];
	pthread_t w;
	long reads = 0, retries = 0;
	uint64_t last[4] = { 0 };
	float lastval[4] = { 0 };

	make_tensor_copies(4 * 4096, 4096, 0.0f, 4096);
	cr_assert_not_null(tensor->index, "two copies");
	atomic_store(&stop_writer, 0);
	pthread_create(&w, NULL, writer, NULL);
	for (int iter = 0; iter < 20000; iter++) {
		uint32_t c = (uint32_t)iter % tensor->nchunks;
		uint64_t v;
		int tries = read_chunk_two(c, buf, &v);
		reads++;
		retries += tries - 1;
		for (int k = 1; k < 4096; k++)
			cr_assert_eq(buf[k], buf[0], "accepted a torn chunk at iteration %d", iter);
		/* every fold adds 1: the value is the fold count of the data read.
		 * The header's words are read one after another, like a NIC's, so
		 * its version can be older than the data and checksum that follow
		 * (folds in between): the data is never older than its version */
		cr_assert_geq((uint64_t)buf[0] * 2, v, "chunk %u: value %f older than version %llu", c,
			      buf[0], (unsigned long long)v);
		cr_assert_geq(v, last[c], "chunk %u: version went back in time", c);
		cr_assert_geq(buf[0], lastval[c], "chunk %u: value went back in time", c);
		last[c] = v;
		lastval[c] = buf[0];
	}
	atomic_store(&stop_writer, 1);
	pthread_join(w, NULL);
	printf("two-copy chunk race: %ld reads, %ld retried (%.3f %%)\n", reads, retries,
	       100.0 * (double)retries / (double)reads);
	cr_assert_gt(last[0], 0, "the writer must have folded meanwhile");
}

Test(chunk, two_copies_open_folds_publish_once, .fini = drop_tensor)
{
	struct srv_open_set os = { .n = 0 };
	float g[1024], out[1024];
	uint64_t v;

	make_tensor_copies(2 * 1024, 1024, 10.0f, 4000);
	cr_assert_not_null(tensor->index, "two copies");
	for (int i = 0; i < 1024; i++)
		g[i] = (float)(i % 5) - 2.0f;
	/* three folds of chunk 0 and one of chunk 1 in one batch */
	for (int f = 0; f < 3; f++)
		srv_chunk_fold(tensor, 0, g, 1024, &os);
	srv_chunk_fold(tensor, 1, g, 1024, &os);
	cr_assert_eq(os.n, 2, "one open fold per chunk");
	/* until published, readers are sent to the untouched copy: whole, old */
	cr_assert_eq(tensor->index[0], 1, "chunk 0 is being written");
	cr_assert_eq(read_chunk_two(0, out, &v), 1);
	cr_assert_eq(v, 0);
	cr_assert_eq(out[0], 10.0f);
	srv_open_publish(&os);
	cr_assert_eq(os.n, 0);
	/* one new version for three folds; each gradient applied once */
	cr_assert_eq(tensor->index[0], 2);
	cr_assert_eq(tensor->index[1], 2);
	cr_assert_eq(tensor->steps[0], 3);
	cr_assert_eq(read_chunk_two(0, out, &v), 1);
	for (int i = 0; i < 1024; i++)
		cr_assert_eq(out[i], 10.0f - 3.0f * g[i], "[%d] = %f", i, out[i]);
	cr_assert_eq(read_chunk_two(1, out, &v), 1);
	cr_assert_eq(out[7], 10.0f - g[7]);
	/* the same three folds, published at once: the same numbers */
	for (int f = 0; f < 3; f++)
		srv_chunk_fold(tensor, 0, g, 1024, NULL);
	cr_assert_eq(tensor->index[0], 8);
	cr_assert_eq(read_chunk_two(0, out, &v), 1);
	cr_assert_eq(out[3], 10.0f - 6.0f * g[3]);
}

/* Two fold threads that each keep folds open, taking chunks in opposite
 * orders: without the rule "publish before waiting" each would wait for
 * the chunk the other holds open (and the test times out). The timeout is
 * the other tests' 120 s on purpose: with -j2, a 60 s one running beside a
 * 120 s one made Criterion 2.4.1's runner leak 48 bytes (LeakSanitizer in
 * the ASan pass, 9 runs of 10). */
struct opener {
	struct srv_open_set os;
	int first, n;
};

static void *open_folder(void *arg)
{
	struct opener *op = arg;
	static const float g[1024] = { 1.0f };

	for (int i = 0; i < op->n; i++) {
		uint32_t a = (uint32_t)op->first, b = (uint32_t)(1 - op->first);
		srv_chunk_fold(tensor, a, g, 1024, &op->os);
		srv_chunk_fold(tensor, b, g, 1024, &op->os);
		srv_chunk_fold(tensor, a, g, 1024, &op->os);
		srv_open_publish(&op->os);
	}
	return NULL;
}

Test(chunk, two_copies_open_folds_never_deadlock, .fini = drop_tensor, .timeout = 120)
{
	struct opener o[2] = { { .first = 0, .n = 20000 }, { .first = 1, .n = 20000 } };
	pthread_t th[2];
	float out[1024];
	uint64_t v;

	make_tensor_copies(2 * 1024, 1024, 0.0f, 4000);
	for (int i = 0; i < 2; i++)
		pthread_create(&th[i], NULL, open_folder, &o[i]);
	for (int i = 0; i < 2; i++)
		pthread_join(th[i], NULL);
	/* every gradient folded exactly once: 2 threads x 20000 x (2 + 1) */
	cr_assert_eq(tensor->steps[0] + tensor->steps[1], 2u * 20000u * 3u);
	cr_assert_eq(read_chunk_two(0, out, &v), 1);
	cr_assert_eq(out[0], -(float)tensor->steps[0], "chunk 0 [0] = %f after %llu folds", out[0],
		     (unsigned long long)tensor->steps[0]);
	cr_assert_eq(tensor->index[0] & 1u, 0, "nothing left open");
	cr_assert_eq(tensor->index[1] & 1u, 0, "nothing left open");
}

Test(chunk, optimizer_registry)
{
	cr_assert_not_null(srv_optimizer_find("sgd"));
	cr_assert_null(srv_optimizer_find("nope"));
}

/*
 * The fold thread's checksum (server/checksum.c: XXH3 with its long-input
 * loop picked at run time) must be the very bits the client checks pulls
 * with (rdmaps__checksum): every variant this CPU runs, every length up to
 * past a few XXH3 blocks (1 KiB each), odd offsets, random bytes.
 */
Test(chunk, server_checksum_is_the_clients)
{
	static uint8_t buf[8192 + 64];
	static float g[16384], out[16384];
	uint64_t x = 0x9e3779b97f4a7c15ull;

	for (size_t i = 0; i < sizeof(buf); i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		buf[i] = (uint8_t)x;
	}
	for (size_t off = 0; off < 64; off += 13)
		for (size_t len = 0; len <= 8192; len += len < 300 ? 1 : 37) {
			uint64_t want = rdmaps__checksum(buf + off, len);
			cr_assert_eq(srv_checksum(buf + off, len), want, "len %zu off %zu", len, off);
			for (unsigned v = 0; v < 3; v++)
				cr_assert_eq(srv_checksum_variant(buf + off, len, v), want,
					     "variant %u, len %zu off %zu", v, len, off);
		}
	/* a chunk the server folded reads as consistent to the client's test */
	make_tensor(16384, 16384, 1.0f);
	g[7] = 2.0f;
	srv_chunk_apply(tensor, 0, g, 16384, false);
	cr_assert(read_chunk(0, out));
	cr_assert_eq(out[7], -1.0f);
	drop_tensor();
}
