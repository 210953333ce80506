/*
 * Checkpoints natively: written, restored bit for bit (data, optimizer
 * state, fold counts, clocks), a corrupt or truncated newest file refused in
 * favour of the previous good one, and only the newest few kept.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "optimizer.h"
#include "server.h"

static char dir[64];
static struct srv_config cfg = { .max_tensors = 8, .chunk_elems = 256,
				 .max_tensor_bytes = 1ull << 30, .max_total_bytes = 1ull << 30 };

static void mkdir_tmp(void)
{
	snprintf(dir, sizeof(dir), "/tmp/rdmaps-ckpt-XXXXXX");
	cr_assert_not_null(mkdtemp(dir));
}

static void rm_tmp(void)
{
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	cr_assert_eq(system(cmd), 0);
}

static struct srv_tensor *declare(struct srv_store *st, const char *name, uint64_t len,
				  const char *opt)
{
	struct rdmaps_msg_declare m = { 0 };
	struct srv_tensor *t;
	bool created;

	m.length = len;
	m.init_value = 1.0f;
	m.hyper.lr = 0.1f;
	snprintf(m.optimizer, sizeof(m.optimizer), "%s", opt);
	snprintf(m.name, sizeof(m.name), "%s", name);
	cr_assert_eq(srv_store_declare(st, &m, NULL, &t, &created), 0);
	return t;
}

static void fold_some(struct srv_tensor *t, int rounds, float base)
{
	static float g[256];
	for (int r = 0; r < rounds; r++)
		for (uint32_t c = 0; c < t->nchunks; c++) {
			uint32_t n = rdmaps__chunk_count(t->length, t->chunk_elems, c);
			for (uint32_t i = 0; i < n; i++)
				g[i] = base + 0.01f * (float)(i % 13) - 0.05f * (float)r;
			srv_chunk_apply(t, c, g, n, false);
		}
}

static void assert_same(struct srv_tensor *a, struct srv_tensor *b)
{
	cr_assert_str_eq(a->name, b->name);
	cr_assert_eq(a->length, b->length);
	cr_assert_eq(a->opt, b->opt);
	for (uint32_t c = 0; c < a->nchunks; c++) {
		const struct rdmaps_chunk_hdr *ha = (const void *)srv_chunk(a, c);
		const struct rdmaps_chunk_hdr *hb = (const void *)srv_chunk(b, c);
		cr_assert_eq(memcmp(ha + 1, hb + 1, ha->count * sizeof(float)), 0, "chunk %u data", c);
		cr_assert_eq(ha->checksum, hb->checksum);
		cr_assert_eq(ha->clock, hb->clock);
		cr_assert_eq(a->steps[c], b->steps[c]);
	}
	if (a->opt->state_per_param)
		cr_assert_eq(memcmp(a->state, b->state, a->length * a->opt->state_per_param * sizeof(float)),
			     0, "optimizer state");
}

static int count_files(void)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;
	while ((e = readdir(d)))
		n += strstr(e->d_name, ".rdmaps") != NULL;
	closedir(d);
	return n;
}

Test(checkpoint, roundtrip_and_fallback, .init = mkdir_tmp, .fini = rm_tmp)
{
	struct srv_store a, b;
	char err[256], path[128];
	uint64_t seq, last;

	cr_assert_eq(srv_store_init(&a, &cfg), 0);
	struct srv_tensor *w = declare(&a, "w", 1000, "adam");
	struct srv_tensor *v = declare(&a, "v", 7, "sgd");
	fold_some(w, 3, 0.5f);
	fold_some(v, 2, -1.0f);
	((struct rdmaps_chunk_hdr *)srv_chunk(w, 1))->clock = 42; /* clocks travel too */
	cr_assert_eq(srv_checkpoint_write(&a, dir, 0, 1, err, sizeof(err)), 0, "%s", err);

	cr_assert_eq(srv_store_init(&b, &cfg), 0);
	cr_assert_eq(srv_checkpoint_restore(&b, dir, 0, &seq, &last), 0);
	cr_assert_eq(seq, 1);
	cr_assert_eq(atomic_load(&b.count), 2);
	assert_same(w, srv_store_get(&b, 0));
	assert_same(v, srv_store_get(&b, 1));
	srv_store_fini(&b);

	/* checkpoint 2 after more folds, then damage it: restore falls back to 1 */
	fold_some(w, 1, 2.0f);
	cr_assert_eq(srv_checkpoint_write(&a, dir, 0, 2, err, sizeof(err)), 0, "%s", err);
	snprintf(path, sizeof(path), "%s/ckpt-%016x.rdmaps", dir, 2);
	FILE *f = fopen(path, "r+b");
	cr_assert_not_null(f);
	fseek(f, 300, SEEK_SET);
	fputc(0x5a ^ fgetc(f), f); /* flip bits in tensor data */
	fclose(f);
	cr_assert_eq(srv_store_init(&b, &cfg), 0);
	cr_assert_eq(srv_checkpoint_restore(&b, dir, 0, &seq, &last), 0);
	cr_assert_eq(seq, 1, "corrupt checkpoint 2 refused, 1 restored");
	cr_assert_neq(memcmp(srv_chunk(w, 0) + 64, srv_chunk(srv_store_get(&b, 0), 0) + 64, 64), 0,
		      "the restored state is checkpoint 1's, older than the live one");
	srv_store_fini(&b);

	/* a truncated newest file too */
	cr_assert_eq(srv_checkpoint_write(&a, dir, 0, 3, err, sizeof(err)), 0, "%s", err);
	snprintf(path, sizeof(path), "%s/ckpt-%016x.rdmaps", dir, 3);
	cr_assert_eq(truncate(path, 100), 0);
	cr_assert_eq(srv_store_init(&b, &cfg), 0);
	cr_assert_eq(srv_checkpoint_restore(&b, dir, 0, &seq, &last), 0);
	cr_assert_eq(seq, 1);
	srv_store_fini(&b);

	/* another chunk size cannot take it: refused, empty store */
	struct srv_config other = cfg;
	other.chunk_elems = 512;
	cr_assert_eq(srv_store_init(&b, &other), 0);
	cr_assert_eq(srv_checkpoint_restore(&b, dir, 0, &seq, &last), 0);
	cr_assert_eq(seq, 0);
	cr_assert_eq(atomic_load(&b.count), 0);
	srv_store_fini(&b);

	/* only the newest three are kept */
	for (uint64_t s = 4; s <= 7; s++)
		cr_assert_eq(srv_checkpoint_write(&a, dir, 0, s, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(count_files(), 3);
	srv_store_fini(&a);
}

Test(checkpoint, empty_dir_and_unwritable_dir, .init = mkdir_tmp, .fini = rm_tmp)
{
	struct srv_store a;
	char err[256];
	uint64_t seq = 9, last = 9;

	cr_assert_eq(srv_store_init(&a, &cfg), 0);
	cr_assert_eq(srv_checkpoint_restore(&a, dir, 0, &seq, &last), 0);
	cr_assert_eq(seq, 0, "nothing to restore");
	cr_assert_eq(last, 0);
	cr_assert_eq(srv_checkpoint_write(&a, "/nonexistent/dir", 0, 1, err, sizeof(err)), RDMAPS_ESYS);
	cr_assert_not_null(strstr(err, "/nonexistent/dir"), "%s", err);
	srv_store_fini(&a);
}

static void junk_file(uint64_t seq, const char *ext)
{
	char path[128];
	snprintf(path, sizeof(path), "%s/ckpt-%016llx.%s", dir, (unsigned long long)seq, ext);
	FILE *f = fopen(path, "wb");
	cr_assert_not_null(f);
	fputs("not a checkpoint", f);
	fclose(f);
}

/*
 * A directory whose files are all refused (junk here; another --chunk-elems
 * or lower limits do the same): nothing is restored, but the next
 * checkpoint is numbered past every file there, so pruning the oldest never
 * takes the one just written.
 */
Test(checkpoint, numbered_past_refused_files, .init = mkdir_tmp, .fini = rm_tmp)
{
	struct srv_store a;
	char err[256], path[128];
	uint64_t seq = 9, last = 0;

	junk_file(5, "rdmaps");
	junk_file(6, "rdmaps");
	junk_file(7, "rdmaps");
	junk_file(9, "tmp"); /* a write cut short: its number is taken too */
	cr_assert_eq(srv_store_init(&a, &cfg), 0);
	cr_assert_eq(srv_checkpoint_restore(&a, dir, 0, &seq, &last), 0);
	cr_assert_eq(seq, 0, "junk is never restored");
	cr_assert_eq(last, 9, "the highest number of any file there");
	declare(&a, "w", 300, "sgd");
	for (uint64_t s = last + 1; s <= last + 3; s++) {
		cr_assert_eq(srv_checkpoint_write(&a, dir, 0, s, err, sizeof(err)), 0, "%s", err);
		snprintf(path, sizeof(path), "%s/ckpt-%016llx.rdmaps", dir, (unsigned long long)s);
		cr_assert_eq(access(path, R_OK), 0, "checkpoint %llu is on disk", (unsigned long long)s);
	}
	cr_assert_eq(count_files(), 3, "the junk was pruned, not the new files");
	srv_store_fini(&a);
	cr_assert_eq(srv_store_init(&a, &cfg), 0);
	cr_assert_eq(srv_checkpoint_restore(&a, dir, 0, &seq, &last), 0);
	cr_assert_eq(seq, 12);
	cr_assert_eq(atomic_load(&a.count), 1);
	srv_store_fini(&a);
}

/* A tensor still waiting for its creator's initial values is left out: a
 * restart would otherwise open it as ready with whatever was staged. */
Test(checkpoint, initialising_tensors_are_left_out, .init = mkdir_tmp, .fini = rm_tmp)
{
	struct rdmaps_msg_declare m = { 0 };
	struct srv_store a;
	struct srv_tensor *t;
	char err[256];
	uint64_t seq, last;
	bool created;
	int creator;

	cr_assert_eq(srv_store_init(&a, &cfg), 0);
	declare(&a, "ready", 300, "sgd");
	m.length = 300;
	m.flags = RDMAPS_DECLARE_INIT_DATA;
	snprintf(m.optimizer, sizeof(m.optimizer), "sgd");
	snprintf(m.name, sizeof(m.name), "init");
	cr_assert_eq(srv_store_declare(&a, &m, &creator, &t, &created), 0);
	cr_assert(created);
	cr_assert_eq(atomic_load(&t->state_flag), TENSOR_INIT);
	cr_assert_eq(srv_checkpoint_write(&a, dir, 0, 1, err, sizeof(err)), 0, "%s", err);
	srv_store_fini(&a);
	cr_assert_eq(srv_store_init(&a, &cfg), 0);
	cr_assert_eq(srv_checkpoint_restore(&a, dir, 0, &seq, &last), 0);
	cr_assert_eq(seq, 1);
	cr_assert_eq(atomic_load(&a.count), 1, "only the ready tensor");
	cr_assert_str_eq(srv_store_get(&a, 0)->name, "ready");
	srv_store_fini(&a);
}

/* Closed connections' accounts travel with the model: a worker can settle
 * its pushes with a server restarted from the checkpoint (resume.c). */
Test(checkpoint, connection_accounts_travel, .init = mkdir_tmp, .fini = rm_tmp)
{
	struct srv_store a;
	struct srv_closed rec;
	char err[256];
	uint64_t seq, last;

	cr_assert_eq(srv_store_init(&a, &cfg), 0);
	declare(&a, "w", 300, "sgd");
	for (uint64_t id = 1; id <= 300; id++) /* past the ring: the oldest go */
		srv_resume_record(&a.resume, &(struct srv_closed){ .conn_id = id * 77,
								   .folded_seq = id + 5,
								   .dropped = (uint32_t)id % 3 });
	cr_assert_eq(srv_checkpoint_write(&a, dir, 0, 1, err, sizeof(err)), 0, "%s", err);
	srv_store_fini(&a);
	cr_assert_eq(srv_store_init(&a, &cfg), 0);
	cr_assert_eq(srv_checkpoint_restore(&a, dir, 0, &seq, &last), 0);
	cr_assert_eq(seq, 1);
	cr_assert(!srv_resume_find(&a.resume, 77, &rec), "the oldest fell out of the ring");
	cr_assert(srv_resume_find(&a.resume, 300 * 77, &rec));
	cr_assert_eq(rec.folded_seq, 305);
	cr_assert_eq(rec.dropped, 0);
	cr_assert(srv_resume_find(&a.resume, 100 * 77, &rec));
	cr_assert_eq(rec.folded_seq, 105);
	cr_assert_eq(rec.dropped, 1);
	/* and the ring goes on where it was: the next record pushes out the oldest */
	srv_resume_record(&a.resume, &(struct srv_closed){ .conn_id = 1, .folded_seq = 2 });
	cr_assert(srv_resume_find(&a.resume, 1, &rec));
	cr_assert(!srv_resume_find(&a.resume, 45 * 77, &rec));
	cr_assert(srv_resume_find(&a.resume, 46 * 77, &rec));
	srv_store_fini(&a);
}
