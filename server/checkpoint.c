/*
 * checkpoint.c -- durable snapshots of a server's tensors, optimizer state
 * and clocks, and restore at start.
 *
 * File: DIR/ckpt-<seq 16 hex>.rdmaps, written as .tmp, fsync'd, renamed,
 * and the directory fsync'd, so a crash leaves the old file or the new one,
 * never half of one. Layout (little-endian):
 *   header (struct ckpt_hdr), then per tensor: struct ckpt_tensor, per-chunk
 *   fold counts (u64), per-chunk clocks (u64), the floats chunk by chunk,
 *   the optimizer state; then (format 2) the closed connections' accounts
 *   (resume.c: u32 count, then that many struct srv_closed); last, XXH3-64
 *   of every byte before it. Format 1 files (no accounts) still restore.
 * Restore walks the files newest first and takes the first whose length,
 * version and checksum are right, saying why it skipped the others.
 * The caller pauses the fold threads, so the snapshot is one instant: every
 * push acknowledged as folded before it is in it.
 *
 * A backup writes the parts it holds for the server of rank p beside its
 * own, as DIR/replica-<p>/ckpt-*.rdmaps with p's server id: a server
 * started as rank p from that directory restores them. Their primary may
 * still be writing them (one-sided: pausing our fold threads does not stop
 * it), so each chunk is copied until its checksum agrees with its values.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "optimizer.h"
#include "server.h"

#define CKPT_MAGIC "RDPSCKPT"
#define CKPT_VERSION 2u
#define CKPT_VERSION_OLDEST 1u
#define CKPT_KEEP 3 /* newest files kept: a corrupt newest still has a fallback */
#define CKPT_REQUEST_GAP_NS 1000000000ull

struct ckpt_hdr {
	char magic[8];
	uint32_t version;
	uint32_t server_id;
	uint64_t seq;
	uint64_t time;
	uint32_t ntensors;
	uint32_t chunk_elems;
};

struct ckpt_tensor {
	char name[RDMAPS_NAME_MAX + 1];
	char optimizer[RDMAPS_OPT_NAME_MAX];
	uint64_t length;
	uint32_t chunk_elems, nchunks;
	struct rdmaps_wire_hyper hyper;
	struct rdmaps_wire_consistency cons;
	uint64_t clock;
	uint32_t state_per_param;
	uint32_t pull_format; /* 0 (float32) in files of servers without 16-bit pulls */
};

struct writer {
	uint8_t *chunk; /* a replica's chunks are copied here and checked first */
	FILE *f;
	XXH3_state_t *h;
	int err;
};

static void put(struct writer *w, const void *p, size_t n)
{
	if (w->err || !n)
		return;
	if (fwrite(p, 1, n, w->f) != n)
		w->err = errno ? errno : EIO;
	XXH3_64bits_update(w->h, p, n);
}

/* A replica's chunk i as a whole: copied until its header's checksum
 * agrees with its values (its primary's write may be landing), or NULL
 * with w->err set when that does not happen within a second. */
static const struct rdmaps_chunk_hdr *replica_chunk(struct writer *w, struct srv_tensor *t,
						   uint32_t i)
{
	const uint8_t *src = srv_chunk(t, i);
	struct rdmaps_chunk_hdr *h = (void *)w->chunk;

	for (int tries = 0; tries < 1000; tries++) {
		memcpy(h, src, RDMAPS_CHUNK_HDR);
		if (h->count <= t->chunk_elems) {
			memcpy(h + 1, src + RDMAPS_CHUNK_HDR, (size_t)h->count * sizeof(float));
			if (h->count == rdmaps__chunk_count(t->length, t->chunk_elems, i) &&
			    srv_checksum(h + 1, (size_t)h->count * sizeof(float)) == h->checksum)
				return h;
		}
		usleep(1000);
	}
	if (!w->err)
		w->err = EAGAIN;
	return NULL;
}

static void put_tensor(struct writer *w, struct srv_tensor *t)
{
	struct ckpt_tensor ct = { 0 };
	uint32_t spp = t->opt->state_per_param;

	memcpy(ct.name, t->name, sizeof(ct.name));
	snprintf(ct.optimizer, sizeof(ct.optimizer), "%s", t->opt->name);
	ct.length = t->length;
	ct.chunk_elems = t->chunk_elems;
	ct.nchunks = t->nchunks;
	ct.hyper = t->hyper;
	ct.cons = t->cons;
	ct.clock = t->clock;
	ct.state_per_param = spp;
	ct.pull_format = t->pull_fmt;
	put(w, &ct, sizeof(ct));
	put(w, t->steps, t->nchunks * sizeof(uint64_t));
	for (uint32_t i = 0; i < t->nchunks; i++) {
		const struct rdmaps_chunk_hdr *h = (const void *)srv_chunk(t, i);
		uint64_t clock = h->clock; /* the file keeps 64-bit clocks */
		put(w, &clock, sizeof(clock));
	}
	for (uint32_t i = 0; i < t->nchunks; i++) {
		const struct rdmaps_chunk_hdr *h = (const void *)srv_chunk(t, i);
		if (w->chunk)
			h = replica_chunk(w, t, i);
		if (h)
			put(w, h + 1, (size_t)h->count * sizeof(float));
	}
	if (spp)
		put(w, t->state, (size_t)t->length * spp * sizeof(float));
}

/* The closed connections' accounts: with the model they describe, a worker
 * can still settle its pushes with a server restarted from this file. */
static void put_accounts(struct writer *w, struct srv_resume *r)
{
	struct srv_closed *rec = calloc(r->cap, sizeof(*rec));
	uint32_t n = rec ? srv_resume_list(r, rec, r->cap) : 0;

	if (!rec && !w->err)
		w->err = ENOMEM;
	put(w, &n, sizeof(n));
	put(w, rec, (size_t)n * sizeof(*rec));
	free(rec);
}

static int fsync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY);
	int rc = fd < 0 ? -1 : fsync(fd);

	if (fd >= 0)
		close(fd);
	return rc;
}

/*
 * One look at dir: the seqs of its ckpt-*.rdmaps files, newest first (at
 * most max), and in *top the highest seq any ckpt-* file is named after,
 * whatever its state (good, refused, a half-written .tmp): the next
 * checkpoint must be numbered past every one of them. Numbered from a
 * refused restore's 0 instead, it would be the oldest file in the
 * directory and the first one pruned, right after it was written.
 */
static int scan_ckpts(const char *dir, uint64_t *seqs, int max, uint64_t *top)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;

	*top = 0;
	if (!d)
		return 0;
	while ((e = readdir(d))) {
		unsigned long long s;
		char tail[16];
		int got = sscanf(e->d_name, "ckpt-%16llx.%15s", &s, tail);
		if (got >= 1 && s > *top)
			*top = s;
		if (got == 2 && !strcmp(tail, "rdmaps") && n < max)
			seqs[n++] = s;
	}
	closedir(d);
	for (int i = 1; i < n; i++) /* a few files: insertion sort, descending */
		for (int j = i; j > 0 && seqs[j] > seqs[j - 1]; j--) {
			uint64_t x = seqs[j];
			seqs[j] = seqs[j - 1];
			seqs[j - 1] = x;
		}
	return n;
}

static void ckpt_path(char *out, size_t len, const char *dir, uint64_t seq, const char *ext)
{
	snprintf(out, len, "%s/ckpt-%016llx.%s", dir, (unsigned long long)seq, ext);
}

int srv_checkpoint_write(struct srv_store *st, const char *dir, unsigned server_id, uint64_t seq,
			 char *err, size_t errlen)
{
	char tmp[4096], fin[4096];
	struct writer w = { 0 };
	struct ckpt_hdr h = { .version = CKPT_VERSION, .server_id = server_id, .seq = seq,
			      .time = (uint64_t)time(NULL), .chunk_elems = st->chunk_elems };
	uint32_t n = atomic_load(&st->count);
	uint64_t sum, old[64], top;
	int nold;

	memcpy(h.magic, CKPT_MAGIC, 8);
	if (st->replica &&
	    !(w.chunk = aligned_alloc(64, rdmaps__round_up(RDMAPS_CHUNK_HDR +
							      (size_t)st->chunk_elems * 4, 64)))) {
		snprintf(err, errlen, "out of memory");
		return RDMAPS_ENOMEM;
	}
	/* a tensor still waiting for its creator's values holds nothing worth
	 * keeping, and restored it would open as ready with partial values */
	for (uint32_t i = 0; i < n; i++)
		h.ntensors += atomic_load(&srv_store_get(st, i)->state_flag) == TENSOR_READY;
	ckpt_path(tmp, sizeof(tmp), dir, seq, "tmp");
	ckpt_path(fin, sizeof(fin), dir, seq, "rdmaps");
	w.f = fopen(tmp, "wb");
	w.h = XXH3_createState();
	if (!w.f || !w.h || XXH3_64bits_reset(w.h) != XXH_OK) {
		snprintf(err, errlen, "cannot create %s: %s", tmp, strerror(errno));
		if (w.f)
			fclose(w.f);
		XXH3_freeState(w.h);
		free(w.chunk);
		return RDMAPS_ESYS;
	}
	put(&w, &h, sizeof(h));
	for (uint32_t i = 0; i < n; i++)
		if (atomic_load(&srv_store_get(st, i)->state_flag) == TENSOR_READY)
			put_tensor(&w, srv_store_get(st, i));
	put_accounts(&w, &st->resume);
	sum = XXH3_64bits_digest(w.h);
	if (!w.err && fwrite(&sum, 1, sizeof(sum), w.f) != sizeof(sum))
		w.err = errno ? errno : EIO;
	if (!w.err && (fflush(w.f) || fsync(fileno(w.f))))
		w.err = errno;
	if (fclose(w.f) && !w.err)
		w.err = errno;
	XXH3_freeState(w.h);
	free(w.chunk);
	if (!w.err && rename(tmp, fin))
		w.err = errno;
	if (!w.err && fsync_dir(dir))
		w.err = errno;
	if (w.err) {
		snprintf(err, errlen, "writing %s: %s", tmp, strerror(w.err));
		unlink(tmp);
		return RDMAPS_ESYS;
	}
	/* keep a few: if the newest is ever damaged, an older one still restores */
	nold = scan_ckpts(dir, old, 64, &top);
	for (int i = CKPT_KEEP; i < nold; i++) {
		if (old[i] == seq)
			continue; /* never the one just written, whatever else is there */
		ckpt_path(tmp, sizeof(tmp), dir, old[i], "rdmaps");
		unlink(tmp);
	}
	return 0;
}

/* ---- restore ---------------------------------------------------------- */

struct reader {
	const uint8_t *p, *end;
};

static const void *take(struct reader *r, size_t n)
{
	const uint8_t *q = r->p;

	if ((size_t)(r->end - r->p) < n)
		return NULL;
	r->p += n;
	return q;
}

static int load_file(const char *path, uint8_t **buf, size_t *len, char *why, size_t wlen)
{
	FILE *f = fopen(path, "rb");
	long n;

	if (!f || fseek(f, 0, SEEK_END) || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) {
		snprintf(why, wlen, "cannot read: %s", strerror(errno));
		if (f)
			fclose(f);
		return -1;
	}
	*buf = malloc((size_t)n + 1);
	if (!*buf || fread(*buf, 1, (size_t)n, f) != (size_t)n) {
		snprintf(why, wlen, "cannot read %ld bytes", n);
		fclose(f);
		free(*buf);
		return -1;
	}
	fclose(f);
	*len = (size_t)n;
	return 0;
}

/* Recreate one tensor from the file, into the (empty) store. */
static int restore_tensor(struct srv_store *st, struct reader *r, char *why, size_t wlen)
{
	const struct ckpt_tensor *ct = take(r, sizeof(*ct));
	struct rdmaps_msg_declare m = { 0 };
	struct srv_tensor *t;
	bool created;
	int rc;

	if (!ct) {
		snprintf(why, wlen, "truncated tensor record");
		return -1;
	}
	memcpy(m.name, ct->name, sizeof(m.name));
	m.name[sizeof(m.name) - 1] = '\0';
	memcpy(m.optimizer, ct->optimizer, sizeof(m.optimizer));
	m.length = ct->length;
	m.hyper = ct->hyper;
	m.cons = ct->cons;
	m.flags = (ct->pull_format & 0xfu) << RDMAPS_DECLARE_PULL_SHIFT;
	if ((rc = srv_store_declare(st, &m, NULL, &t, &created)) || !created ||
	    t->nchunks != ct->nchunks || t->chunk_elems != ct->chunk_elems ||
	    t->opt->state_per_param != ct->state_per_param) {
		snprintf(why, wlen, "tensor '%s' does not fit this server (%s)", m.name,
			 rc ? rdmaps_strerror(rc) : "other chunk size or optimizer");
		return -1;
	}
	const uint64_t *steps = take(r, t->nchunks * sizeof(uint64_t));
	const uint64_t *clocks = take(r, t->nchunks * sizeof(uint64_t));
	if (!steps || !clocks) {
		snprintf(why, wlen, "truncated tensor '%s'", m.name);
		return -1;
	}
	memcpy(t->steps, steps, t->nchunks * sizeof(uint64_t));
	t->clock = ct->clock;
	for (uint32_t i = 0; i < t->nchunks; i++) {
		struct rdmaps_chunk_hdr *h = (struct rdmaps_chunk_hdr *)srv_chunk(t, i);
		const float *d = take(r, (size_t)h->count * sizeof(float));
		if (!d) {
			snprintf(why, wlen, "truncated data of '%s'", m.name);
			return -1;
		}
		memcpy(h + 1, d, (size_t)h->count * sizeof(float));
		h->clock = (uint32_t)clocks[i];
		h->checksum = srv_checksum(h + 1, (size_t)h->count * sizeof(float));
		srv_half_publish(t, i, h, true);
		if (t->chunk_clock_done)
			t->chunk_clock_done[i] = clocks[i];
	}
	if (ct->state_per_param) {
		size_t n = (size_t)t->length * ct->state_per_param * sizeof(float);
		const void *s = take(r, n);
		if (!s) {
			snprintf(why, wlen, "truncated optimizer state of '%s'", m.name);
			return -1;
		}
		memcpy(t->state, s, n);
	}
	return 0;
}

static int restore_accounts(struct srv_store *st, struct reader *r, char *why, size_t wlen)
{
	const uint8_t *p = take(r, sizeof(uint32_t)), *rec = NULL;
	uint32_t n = 0;

	if (p) {
		memcpy(&n, p, sizeof(n)); /* the file promises no alignment */
		rec = take(r, (size_t)n * sizeof(struct srv_closed));
	}
	if (!p || (n && !rec)) {
		snprintf(why, wlen, "truncated connection accounts");
		return -1;
	}
	for (uint32_t i = 0; i < n; i++) {
		struct srv_closed c;
		memcpy(&c, rec + (size_t)i * sizeof(c), sizeof(c));
		srv_resume_record(&st->resume, &c);
	}
	return 0;
}

/* Check one file whole before touching the store. */
static int verify(const uint8_t *buf, size_t len, unsigned server_id, uint32_t chunk_elems, char *why,
		  size_t wlen)
{
	struct ckpt_hdr h;
	uint64_t sum;

	if (len < sizeof(h) + sizeof(sum)) {
		snprintf(why, wlen, "truncated (%zu bytes)", len);
		return -1;
	}
	memcpy(&h, buf, sizeof(h));
	memcpy(&sum, buf + len - sizeof(sum), sizeof(sum));
	if (memcmp(h.magic, CKPT_MAGIC, 8)) {
		snprintf(why, wlen, "not an rdmaps checkpoint");
		return -1;
	}
	if (h.version < CKPT_VERSION_OLDEST || h.version > CKPT_VERSION) {
		snprintf(why, wlen, "format version %u, this server reads %u to %u", h.version,
			 CKPT_VERSION_OLDEST, CKPT_VERSION);
		return -1;
	}
	if (XXH3_64bits(buf, len - sizeof(sum)) != sum) {
		snprintf(why, wlen, "checksum mismatch (corrupt or truncated)");
		return -1;
	}
	if (h.server_id != server_id)
		log_warn("checkpoint was written by server %u, restoring into server %u", h.server_id,
			 server_id);
	if (h.chunk_elems != chunk_elems) {
		snprintf(why, wlen, "written with --chunk-elems %u, this server uses %u", h.chunk_elems,
			 chunk_elems);
		return -1;
	}
	return 0;
}

int srv_checkpoint_restore(struct srv_store *st, const char *dir, unsigned server_id,
			   uint64_t *seq_out, uint64_t *last_out)
{
	uint64_t seqs[64];
	int n = scan_ckpts(dir, seqs, 64, last_out);

	*seq_out = 0;
	for (int i = 0; i < n; i++) {
		char path[4096], why[256] = "";
		uint8_t *buf = NULL;
		size_t len = 0;
		struct reader r;
		struct ckpt_hdr h;
		int bad = 0;

		ckpt_path(path, sizeof(path), dir, seqs[i], "rdmaps");
		if (load_file(path, &buf, &len, why, sizeof(why)) ||
		    verify(buf, len, server_id, st->chunk_elems, why, sizeof(why))) {
			log_error("checkpoint %s refused: %s; trying an older one", path, why);
			free(buf);
			continue;
		}
		r.p = buf;
		r.end = buf + len - sizeof(uint64_t);
		memcpy(&h, take(&r, sizeof(h)), sizeof(h));
		for (uint32_t k = 0; k < h.ntensors && !bad; k++)
			bad = restore_tensor(st, &r, why, sizeof(why));
		if (!bad && h.version >= 2)
			bad = restore_accounts(st, &r, why, sizeof(why));
		if (!bad && r.p != r.end) {
			snprintf(why, sizeof(why), "%zu unexpected bytes at the end", (size_t)(r.end - r.p));
			bad = 1;
		}
		free(buf);
		if (bad) {
			/* half restored: start over empty, then try the older file */
			log_error("checkpoint %s refused: %s; trying an older one", path, why);
			srv_store_reset(st);
			continue;
		}
		log_info("restored %u tensors from %s", h.ntensors, path);
		*seq_out = seqs[i];
		return 0;
	}
	if (n)
		log_error("no usable checkpoint in %s: starting empty", dir);
	return 0;
}

/* Where rank p's part is checkpointed here: DIR/replica-<p>. */
static void part_dir(const struct srv *s, unsigned p, char *dir, size_t len)
{
	snprintf(dir, len, "%s/replica-%u", s->cfg.ckpt_dir, p);
}

/* The parts this server backs up, each rank's in a directory of its own,
 * numbered past what is there. */
static void replicas_checkpoint(struct srv *s)
{
	for (unsigned p = 0; p < RDMAPS_MAX_SERVERS; p++) {
		struct srv_store *st = s->replica[p];
		char dir[4096], err[512];
		uint64_t seqs[1], top;
		if (!st || !atomic_load(&st->count) || (p == s->cfg.server_id && srv_serves(s, p)))
			continue; /* (our own part, come back: written as ours) */
		part_dir(s, p, dir, sizeof(dir));
		if (mkdir(dir, 0700) && errno != EEXIST) {
			log_error("checkpoint of rank %u's backups: cannot make %s: %s", p, dir,
				  strerror(errno));
			atomic_fetch_add(&s->checkpoint_failures, 1);
			continue;
		}
		/* its primary's accounts, as its own closed connections': a
		 * worker of the primary restored from here settles by them
		 * (a rank taken over has its own records since: kept) */
		if (!srv_serves(s, p))
			srv_repl_accounts_to_records(st);
		scan_ckpts(dir, seqs, 1, &top);
		if (srv_checkpoint_write(st, dir, p, top + 1, err, sizeof(err))) {
			log_error("checkpoint of rank %u's backups failed: %s", p, err);
			atomic_fetch_add(&s->checkpoint_failures, 1);
		}
	}
}

bool srv_checkpoint_has_part(struct srv *s, unsigned p)
{
	char dir[4096];
	struct stat sb;

	if (!s->cfg.ckpt_dir)
		return false;
	part_dir(s, p, dir, sizeof(dir));
	return !stat(dir, &sb) && S_ISDIR(sb.st_mode);
}

int srv_checkpoint_restore_part(struct srv *s, unsigned p)
{
	char dir[4096];
	uint64_t seq = 0, last = 0;
	struct srv_store *st;

	if (!srv_checkpoint_has_part(s, p) || !(st = srv_repl_store(s, p)))
		return RDMAPS_ENOENT;
	if (atomic_load(&st->count))
		return 0; /* it is a replica already */
	part_dir(s, p, dir, sizeof(dir));
	srv_checkpoint_restore(st, dir, p, &seq, &last);
	if (!seq)
		return RDMAPS_ENOENT;
	st->from_ckpt = true;
	log_warn("rank %u's part: restored checkpoint %llu of it (%u tensors), this server "
		 "having served it last", p, (unsigned long long)seq, atomic_load(&st->count));
	return 0;
}

void srv_checkpoint_now(struct srv *s, const char *why)
{
	char err[512];
	uint64_t t0 = rdmaps__now_ns();
	/* our rank held elsewhere: what we have of our part is no newer than
	 * what we restored, and must not pass for the newest; the parts we
	 * back up are written all the same */
	const bool own = !atomic_load(&s->deposed);
	int rc = 0;

	if (!s->cfg.ckpt_dir)
		return;
	srv_fold_pause(s);
	if (own)
		rc = srv_checkpoint_write(srv_own_store(s), s->cfg.ckpt_dir, s->cfg.server_id,
					  s->ckpt_seq + 1, err, sizeof(err));
	/* the replicas too, while parked: a rank taken over here is folded
	 * by these threads (others' replicas are written by their primaries,
	 * which no pause stops: each chunk is copied until it checks) */
	if (!rc)
		replicas_checkpoint(s);
	srv_fold_resume(s);
	s->last_ckpt_ns = rdmaps__now_ns();
	/* requests from workers: folds paused at most a tenth of the time,
	 * and at most one checkpoint a second, however many ask */
	s->ckpt_next_ok = s->last_ckpt_ns + 10 * (s->last_ckpt_ns - t0);
	if (s->ckpt_next_ok < s->last_ckpt_ns + CKPT_REQUEST_GAP_NS)
		s->ckpt_next_ok = s->last_ckpt_ns + CKPT_REQUEST_GAP_NS;
	if (rc) {
		atomic_fetch_add(&s->checkpoint_failures, 1);
		log_error("checkpoint (%s) failed: %s", why, err);
		return;
	}
	if (!own)
		return;
	s->ckpt_seq++;
	atomic_fetch_add(&s->checkpoints, 1);
	log_info("checkpoint %llu (%s) written in %.1f ms", (unsigned long long)s->ckpt_seq, why,
		 (double)(s->last_ckpt_ns - t0) / 1e6);
}
