/*
 * store.c -- the tensor store: declaration, lookup and the chunk layout in
 * memory (common/chunk.h). Declarations take a mutex; folds and one-sided
 * reads never do: tensors are published once, with release ordering, into a
 * fixed array, and never move or disappear while the server runs.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "gradfmt.h"
#include "half.h"
#include "log.h"
#include "optimizer.h"
#include "pages.h"
#include "server.h"

int srv_store_init(struct srv_store *s, const struct srv_config *cfg)
{
	memset(s, 0, sizeof(*s));
	s->tensors = calloc(cfg->max_tensors, sizeof(*s->tensors));
	if (!s->tensors)
		return RDMAPS_ENOMEM;
	s->max = cfg->max_tensors;
	s->max_tensor_bytes = cfg->max_tensor_bytes;
	s->max_total_bytes = cfg->max_total_bytes;
	s->two_copies_min = cfg->two_copies_min;
	s->chunk_elems = cfg->chunk_elems;
	/* a worker's account outlives a few disconnects of every other worker */
	if (srv_resume_init(&s->resume, cfg->max_workers > 64 ? 4 * cfg->max_workers : 256)) {
		free(s->tensors);
		s->tensors = NULL;
		return RDMAPS_ENOMEM;
	}
	pthread_mutex_init(&s->lock, NULL);
	return 0;
}

/*
 * Chunk floats start SRV_LANE_OFF (24) bytes into a 64 B line, after their
 * header. The arrays a fold streams beside them start at that same offset
 * (the optimizer state and BSP's sums here, the fold thread's copies of the
 * gradients in fold.c), so that srv_chunk_opt can align them all at once.
 */
static float *lane_calloc(size_t floats)
{
	size_t bytes = rdmaps__round_up(floats * sizeof(float) + SRV_LANE_OFF, RDMAPS_CHUNK_ALIGN);
	uint8_t *raw = aligned_alloc(RDMAPS_CHUNK_ALIGN, bytes);

	if (!raw)
		return NULL;
	memset(raw, 0, bytes);
	return (float *)(raw + SRV_LANE_OFF);
}

static void lane_free(float *p)
{
	if (p)
		free((uint8_t *)p - SRV_LANE_OFF);
}

/*
 * Tensor memory is what the NIC translates on every READ: in 2 MiB pages a
 * large model needs 512 times fewer translation entries (MTT) than in
 * 4 KiB ones. Transparent huge pages, asked for with madvise before the
 * first touch, wherever the kernel allows them ("always" or "madvise");
 * only for tensors that the 2 MiB rounding wastes at most an eighth of.
 * hugetlbfs would need pages reserved by the administrator: not used.
 *
 * From MAP_MIN up, tensor memory is mapped fresh rather than taken from
 * malloc: its pages are the kernel's zero pages, so a declaration need not
 * clear them again, nor fill them with +0.0, nor hash every chunk
 * (tensor_new, chunks_init): three passes over the tensor in user space on
 * top of the kernel's own clearing. Declaring 64 MiB with two copies took
 * 204 ms natively in a fresh process, now 15-20 ms; a backup opening a
 * replica for its catch-up pays the same (docs/design.md).
 */
#define HUGE_PAGE (2u << 20)
#define MAP_MIN (256u << 10)

static bool thp_usable(void)
{
	static int usable = -1; /* declarations hold the store's lock */

	if (usable < 0)
		usable = rdmaps__thp_size() > 0;
	return usable;
}

/* t->mem for t->mem_len bytes; t->map_len > 0 when mapped (zero pages). */
static void tensor_mem_alloc(struct srv_tensor *t)
{
	size_t len = t->mem_len, huge = rdmaps__round_up(len, HUGE_PAGE);
	uint8_t *p;

	if (len < MAP_MIN) {
		/* page-aligned: registration pins whole pages anyway */
		t->mem = aligned_alloc(4096, rdmaps__round_up(len, 4096));
		if (t->mem)
			memset(t->mem, 0, len);
		return;
	}
	/* THP backs only aligned 2 MiB ranges: mapped an alignment longer,
	 * then trimmed to the boundary */
	const bool thp = len >= HUGE_PAGE && huge - len <= len / 8 && thp_usable();
	const size_t align = thp ? HUGE_PAGE : 4096, want = thp ? huge : rdmaps__round_up(len, 4096);
	p = mmap(NULL, want + align - 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
		 0);
	if (p == MAP_FAILED)
		return;
	size_t head = rdmaps__round_up((uintptr_t)p, align) - (uintptr_t)p;
	if (head)
		munmap(p, head);
	if (align - 4096 - head)
		munmap(p + head + want, align - 4096 - head);
	p += head;
	if (thp && madvise(p, want, MADV_HUGEPAGE))
		log_info("madvise(MADV_HUGEPAGE): %s; tensor memory in small pages", strerror(errno));
	t->mem = p;
	t->map_len = want;
}

static void tensor_free(struct srv_tensor *t)
{
	if (!t)
		return;
	if (t->map_len)
		munmap(t->mem, t->map_len);
	else
		free(t->mem);
	lane_free(t->state);
	free(t->steps);
	lane_free(t->agg);
	free(t->contrib);
	free(t->chunk_clock_done);
	pthread_mutex_destroy(&t->clock_lock);
	free(t);
}

void srv_store_fini(struct srv_store *s)
{
	if (!s->tensors)
		return;
	for (uint32_t i = 0; i < atomic_load(&s->count); i++)
		tensor_free(s->tensors[i]);
	free(s->tensors);
	s->tensors = NULL;
	srv_resume_fini(&s->resume);
	pthread_mutex_destroy(&s->lock);
}

void srv_store_reset(struct srv_store *s)
{
	uint32_t n = atomic_load(&s->count);

	for (uint32_t i = 0; i < n; i++) {
		tensor_free(s->tensors[i]);
		s->tensors[i] = NULL;
	}
	atomic_store(&s->count, 0);
	s->total_bytes = 0;
	srv_resume_clear(&s->resume);
}

struct srv_tensor *srv_store_get(struct srv_store *s, uint32_t id)
{
	/* acquire pairs with the release in publish(): the tensor is complete */
	if (id >= atomic_load_explicit(&s->count, memory_order_acquire))
		return NULL;
	return s->tensors[id];
}

static struct srv_tensor *find_locked(struct srv_store *s, const char *name)
{
	uint32_t n = atomic_load_explicit(&s->count, memory_order_relaxed);

	for (uint32_t i = 0; i < n; i++)
		if (!strcmp(s->tensors[i]->name, name))
			return s->tensors[i];
	return NULL;
}

/*
 * Chunk i holding value in every element: values, checksum, version,
 * 16-bit copy. fill: write the values (not when they are +0.0 already, in
 * fresh pages: chunks_init). sum caches the checksum of the last count it
 * was computed for (every full chunk holds the same bytes): one hash per
 * tensor, not one pass over it.
 */
struct chunk_sum {
	uint32_t count;
	uint64_t sum;
};

static void chunk_init(struct srv_tensor *t, uint32_t i, float value, bool fill,
		       struct chunk_sum *sum)
{
	uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems, i);
	struct rdmaps_chunk_hdr *h = (struct rdmaps_chunk_hdr *)srv_chunk_copy(t, i, 0);
	float *data = (float *)(h + 1);

	if (fill)
		for (uint32_t k = 0; k < count; k++)
			data[k] = value;
	if (sum->count != count) {
		sum->count = count;
		sum->sum = srv_checksum(data, (size_t)count * sizeof(float));
	}
	h->count = count;
	h->checksum = sum->sum;
	/* a tensor waiting for its creator's values reads as "being written" */
	h->version = atomic_load(&t->state_flag) == TENSOR_READY ? 0 : 1;
	srv_half_publish(t, i, h, !(h->version & 1u));
	if (t->index) {
		/* copy 1 holds nothing yet: odd, so a reader sent there retries */
		struct rdmaps_chunk_hdr *h1 = (struct rdmaps_chunk_hdr *)srv_chunk_copy(t, i, 1);
		h1->count = count;
		h1->version = 1;
		t->index[i] = 0;
	}
}

static void chunks_init(struct srv_tensor *t, float value, bool zero)
{
	struct chunk_sum sum = { .count = UINT32_MAX };
	uint32_t bits;

	memcpy(&bits, &value, sizeof(bits)); /* -0.0 has bits: zero pages are not it */
	for (uint32_t i = 0; i < t->nchunks; i++)
		chunk_init(t, i, value, !zero || bits, &sum);
}

/* Two copies for ASP dense tensors big enough to tear (docs/design.md):
 * BSP/SSP chunks carry clocks clock.c updates in place, and a sparse
 * table's rows are read one by one. */
static bool wants_two_copies(const struct srv_store *s, const struct rdmaps_msg_declare *m)
{
	return s->two_copies_min && m->cons.mode == RDMAPS_ASP && !m->cons.row_dim &&
	       m->length * sizeof(float) >= s->two_copies_min;
}

static int tensor_new(struct srv_store *s, const struct rdmaps_msg_declare *m,
		      const struct srv_optimizer *opt, const void *conn, struct srv_tensor **out)
{
	struct srv_tensor *t = calloc(1, sizeof(*t));
	if (!t)
		return RDMAPS_ENOMEM;
	memcpy(t->name, m->name, sizeof(t->name));
	t->length = m->length;
	t->chunk_elems = m->cons.row_dim ? m->cons.row_dim : s->chunk_elems;
	t->nchunks = rdmaps__chunk_total(t->length, t->chunk_elems);
	t->stride = rdmaps__chunk_stride(t->chunk_elems);
	t->mem_len = (size_t)(t->nchunks - 1) * t->stride +
		     rdmaps__chunk_read_len(rdmaps__chunk_count(t->length, t->chunk_elems,
								 t->nchunks - 1));
	if (wants_two_copies(s, m)) {
		t->copy_off = rdmaps__round_up(t->mem_len, RDMAPS_CHUNK_ALIGN);
		t->mem_len = 2 * t->copy_off + (size_t)t->nchunks * sizeof(uint64_t);
	}
	t->pull_fmt = (m->flags & RDMAPS_DECLARE_PULL_MASK) >> RDMAPS_DECLARE_PULL_SHIFT;
	if (t->pull_fmt) {
		/* after the rest, in the same registration: READ-only as the master */
		t->half_off = rdmaps__round_up(t->mem_len, RDMAPS_CHUNK_ALIGN);
		t->half_stride = rdmaps__round_up(RDMAPS_CHUNK_HDR + (size_t)t->chunk_elems * 2,
						  RDMAPS_CHUNK_ALIGN);
		t->mem_len = t->half_off + (size_t)(t->nchunks - 1) * t->half_stride +
			     RDMAPS_CHUNK_HDR +
			     2 * (size_t)rdmaps__chunk_count(t->length, t->chunk_elems, t->nchunks - 1);
	}
	t->opt = opt;
	t->hyper = m->hyper;
	t->cons = m->cons;
	pthread_mutex_init(&t->clock_lock, NULL);
	if (m->flags & RDMAPS_DECLARE_INIT_DATA) {
		atomic_store(&t->state_flag, TENSOR_INIT);
		atomic_store(&t->creator, conn);
	} else {
		atomic_store(&t->state_flag, TENSOR_READY);
	}
	tensor_mem_alloc(t);
	t->steps = calloc(t->nchunks, sizeof(*t->steps));
	if (opt->state_per_param)
		t->state = lane_calloc(t->length * opt->state_per_param);
	if (t->cons.mode == RDMAPS_BSP) {
		/* BSP sums one clock's pushes per chunk before folding them */
		t->agg = lane_calloc((size_t)t->nchunks * t->chunk_elems);
		t->contrib = calloc(t->nchunks, sizeof(*t->contrib));
		t->chunk_clock_done = calloc(t->nchunks, sizeof(*t->chunk_clock_done));
	}
	if (!t->mem || !t->steps || (opt->state_per_param && !t->state) ||
	    (t->cons.mode == RDMAPS_BSP && (!t->agg || !t->contrib || !t->chunk_clock_done))) {
		tensor_free(t);
		return RDMAPS_ENOMEM;
	}
	if (t->copy_off)
		t->index = (uint64_t *)(t->mem + 2 * t->copy_off);
	chunks_init(t, m->init_value, true); /* tensor_mem_alloc cleared it */
	*out = t;
	return 0;
}

static bool same_declaration(const struct srv_tensor *t, const struct rdmaps_msg_declare *m,
			     const struct srv_optimizer *opt)
{
	return t->length == m->length && t->opt == opt &&
	       t->pull_fmt == (m->flags & RDMAPS_DECLARE_PULL_MASK) >> RDMAPS_DECLARE_PULL_SHIFT &&
	       !memcmp(&t->hyper, &m->hyper, sizeof(t->hyper)) &&
	       !memcmp(&t->cons, &m->cons, sizeof(t->cons));
}

void srv_store_settle(struct srv_tensor *t)
{
	for (uint32_t i = 0; i < t->nchunks; i++) {
		struct rdmaps_chunk_hdr *h = (struct rdmaps_chunk_hdr *)srv_chunk(t, i);
		if (h->version & 1u)
			__atomic_store_n(&h->version, h->version + 1, __ATOMIC_RELEASE);
		if (t->pull_fmt) {
			h = (struct rdmaps_chunk_hdr *)srv_half_chunk(t, i);
			if (h->version & 1u)
				__atomic_store_n(&h->version, h->version + 1, __ATOMIC_RELEASE);
		}
	}
}

void srv_store_seal(struct srv_tensor *t)
{
	srv_store_settle(t);
	atomic_store(&t->creator, NULL);
	atomic_store(&t->state_flag, TENSOR_READY);
}

/*
 * A declaration of a tensor that is still initialising (store lock held).
 * Its creator declaring again (a retry after an error) stages its values
 * again. A tensor whose creator left before sealing (srv_store_orphan)
 * goes to this declaration: whatever the creator staged is wiped, then the
 * declarer either stages its own initial values or, with none, the tensor
 * opens at once holding its init_value. Returns true when conn is to stage
 * the values (the reply's `created`).
 */
static bool adopt(struct srv_tensor *t, const struct rdmaps_msg_declare *m, const void *conn)
{
	const void *creator = atomic_load(&t->creator);

	if (atomic_load(&t->state_flag) != TENSOR_INIT || (creator && creator != conn))
		return false;
	if (creator == conn)
		return true;
	chunks_init(t, m->init_value, false);
	if (!(m->flags & RDMAPS_DECLARE_INIT_DATA) || !conn) {
		srv_store_seal(t);
		log_info("tensor '%s': its creator left before sealing; opened with the next "
			 "declaration's value %g", t->name, (double)m->init_value);
		return false;
	}
	atomic_store(&t->creator, conn);
	log_info("tensor '%s': its creator left before sealing; the next declarer initialises it",
		 t->name);
	return true;
}

void srv_store_orphan(struct srv_store *s, const void *conn)
{
	pthread_mutex_lock(&s->lock);
	for (uint32_t i = 0; i < atomic_load(&s->count); i++) {
		struct srv_tensor *t = s->tensors[i];
		if (atomic_load(&t->creator) != conn)
			continue;
		/* never compared with a freed connection again, and never
		 * handed out as ready with partial values */
		atomic_store(&t->creator, NULL);
		log_warn("tensor '%s': its creator left before sealing it; it waits for the next "
			 "declaration", t->name);
	}
	pthread_mutex_unlock(&s->lock);
}

int srv_store_declare(struct srv_store *s, const struct rdmaps_msg_declare *m, const void *conn,
		      struct srv_tensor **out, bool *created)
{
	char optname[RDMAPS_OPT_NAME_MAX + 1];
	const struct srv_optimizer *opt;
	struct srv_tensor *t;
	uint64_t bytes;
	int rc;

	if (rdmaps__name_check(m->name, sizeof(m->name)))
		return RDMAPS_EINVAL;
	memcpy(optname, m->optimizer, RDMAPS_OPT_NAME_MAX);
	optname[RDMAPS_OPT_NAME_MAX] = '\0';
	opt = srv_optimizer_find(optname);
	if (!opt || opt->check(&m->hyper))
		return RDMAPS_EINVAL;
	if (m->length == 0 || m->length > UINT64_MAX / 8)
		return RDMAPS_ERANGE;
	if (m->flags & ~(RDMAPS_DECLARE_INIT_DATA | RDMAPS_DECLARE_PULL_MASK))
		return RDMAPS_EINVAL;
	/* a 16-bit copy: bf16 or fp16, of a dense tensor (rows are pulled one
	 * by one, in float32) */
	if ((m->flags & RDMAPS_DECLARE_PULL_MASK) &&
	    ((m->flags & RDMAPS_DECLARE_PULL_MASK) >> RDMAPS_DECLARE_PULL_SHIFT > RDMAPS__GRAD_F16 ||
	     m->cons.row_dim))
		return RDMAPS_EINVAL;
	if (m->cons.mode > RDMAPS_SSP || m->cons.staleness > 1000000 ||
	    m->cons.workers > SRV_MAX_MEMBERS || m->cons.mean > 1 ||
	    !(m->cons.clip_norm >= 0.0f && m->cons.clip_norm < __builtin_inff()) ||
	    (m->cons.mode != RDMAPS_SSP && m->cons.staleness) ||
	    (m->cons.mode != RDMAPS_BSP && m->cons.mean))
		return RDMAPS_EINVAL;
	/* a sparse table's chunks are its rows: one must fit a staging slot
	 * with its id; row pushes fold as they come (ASP) */
	if (m->cons.row_dim &&
	    (m->cons.row_dim > s->chunk_elems - 2 || m->length % m->cons.row_dim ||
	     m->cons.mode != RDMAPS_ASP))
		return RDMAPS_EINVAL;
	bytes = m->length * sizeof(float) * (1 + opt->state_per_param + wants_two_copies(s, m));
	/* BSP sums a clock in float before the optimizer sees it: count it */
	if (m->cons.mode == RDMAPS_BSP)
		bytes += m->length * sizeof(float);
	if (bytes > s->max_tensor_bytes ||
	    m->length / (m->cons.row_dim ? m->cons.row_dim : s->chunk_elems) >= UINT32_MAX)
		return RDMAPS_ERANGE;

	pthread_mutex_lock(&s->lock);
	t = find_locked(s, m->name);
	if (t) {
		rc = same_declaration(t, m, opt) ? 0 : RDMAPS_EEXIST;
		*created = !rc && adopt(t, m, conn);
		goto out;
	}
	if (atomic_load(&s->count) >= s->max) {
		rc = RDMAPS_ELIMIT;
		goto out;
	}
	if (s->total_bytes + bytes > s->max_total_bytes) {
		rc = RDMAPS_ELIMIT;
		goto out;
	}
	rc = tensor_new(s, m, opt, conn, &t);
	if (rc)
		goto out;
	t->id = atomic_load(&s->count);
	s->tensors[t->id] = t;
	s->total_bytes += bytes;
	atomic_store_explicit(&s->count, t->id + 1, memory_order_release);
	*created = true;
	log_info("tensor %u '%s': %llu floats, %u chunks, optimizer %s", t->id, t->name,
		 (unsigned long long)t->length, t->nchunks, opt->name);
out:
	pthread_mutex_unlock(&s->lock);
	if (!rc)
		*out = t;
	return rc;
}

int srv_store_lookup(struct srv_store *s, const char *name, struct srv_tensor **out)
{
	struct srv_tensor *t;

	pthread_mutex_lock(&s->lock);
	t = find_locked(s, name);
	pthread_mutex_unlock(&s->lock);
	if (!t)
		return RDMAPS_ENOENT;
	*out = t;
	return 0;
}

static float *chunk_state(const struct srv_tensor *t, uint32_t chunk)
{
	return t->state ? t->state + (size_t)chunk * t->chunk_elems * t->opt->state_per_param : NULL;
}

/*
 * A vector loop over a chunk's floats as they lie (24 B into a line) splits
 * every 64 B access over two cache lines: SGD from memory ran at 17 GB/s
 * where aligned arrays gave 25-27. So the first floats up to a line are
 * applied apart (a run of their own: optimizer.h), and the rest of the
 * chunk in one aligned run. The gradient and the state must share the
 * offset (SRV_LANE_OFF): aligning the parameters alone made Adam slower
 * (6.7 against 8.4 GB/s), its moments splitting instead; all aligned, 9.3.
 */
#define OPT_SPLIT_MIN 64u /* floats: below this a second call costs more than it saves */

void srv_chunk_opt(struct srv_tensor *t, uint32_t chunk, float *data, const float *grad,
		   uint32_t count)
{
	float *state = chunk_state(t, chunk);
	size_t head = (RDMAPS_CHUNK_ALIGN - (uintptr_t)data % RDMAPS_CHUNK_ALIGN) %
		      RDMAPS_CHUNK_ALIGN / sizeof(float);
	const uint64_t step = t->steps[chunk];

	if (count < OPT_SPLIT_MIN)
		head = 0;
	if (head)
		t->opt->apply(data, state, count, grad, head, &t->hyper, step);
	t->opt->apply(data + head, state ? state + head : NULL, count, grad + head, count - head,
		      &t->hyper, step);
	t->steps[chunk] = step + 1;
}

/* even -> odd on a seqlock word; returns the even value taken. Contended
 * only when two fold threads fold the same chunk at once; the holder
 * finishes in microseconds. */
static uint64_t seq_take(uint64_t *word)
{
	uint64_t v = __atomic_load_n(word, __ATOMIC_RELAXED);

	for (;;) {
		if (!(v & 1u) && __atomic_compare_exchange_n(word, &v, v + 1, true, __ATOMIC_ACQUIRE,
							     __ATOMIC_RELAXED))
			return v;
		rdmaps__cpu_relax();
		v = __atomic_load_n(word, __ATOMIC_RELAXED);
	}
}

uint64_t srv_chunk_lock(struct srv_tensor *t, uint32_t chunk)
{
	return seq_take(&((struct rdmaps_chunk_hdr *)srv_chunk(t, chunk))->version);
}

void srv_chunk_unlock(struct srv_tensor *t, uint32_t chunk, uint64_t v, bool changed)
{
	struct rdmaps_chunk_hdr *h = (struct rdmaps_chunk_hdr *)srv_chunk(t, chunk);

	if (!changed) {
		/* nothing a reader could see changed: the old version stays valid */
		__atomic_store_n(&h->version, v, __ATOMIC_RELEASE);
		return;
	}
	h->checksum = srv_checksum(h + 1, (size_t)h->count * sizeof(float));
	srv_half_publish(t, chunk, h, true);
	/* release: the body and its checksum before the even version */
	__atomic_store_n(&h->version, v + 2, __ATOMIC_RELEASE);
}

/*
 * Copy chunk i (or with half its 16-bit copy) whole into dst, holding the
 * chunk's lock unless lock is false (an initialising tensor, whose chunks
 * stay odd and only its creator's fold thread, the caller, writes), and
 * return with it still held: *word and *v are what chunk_let_go gives back.
 * Two copies: the index word is the chunk's lock; one copy: the header's
 * version. The 16-bit copy is written under the same.
 */
static size_t chunk_copy_held(struct srv_tensor *t, uint32_t i, bool half, void *dst, bool lock,
			      struct srv_open_set *os, uint64_t **word, uint64_t *v)
{
	struct rdmaps_chunk_hdr *master = (struct rdmaps_chunk_hdr *)srv_chunk(t, i);
	const struct rdmaps_chunk_hdr *src;
	struct rdmaps_chunk_hdr *out = dst;
	size_t len;

	*word = t->index ? &t->index[i] : &master->version;
	*v = 0;
	if (os)
		srv_open_publish(os);
	if (lock)
		*v = seq_take(*word);
	if (half)
		src = (const struct rdmaps_chunk_hdr *)srv_half_chunk(t, i);
	else if (t->index)
		src = (const struct rdmaps_chunk_hdr *)srv_chunk_copy(t, i, (unsigned)(*v >> 1) & 1u);
	else
		src = master;
	len = RDMAPS_CHUNK_HDR + (size_t)src->count * (half ? 2u : sizeof(float));
	memcpy(dst, src, len);
	if (lock && src == master)
		out->version = *v; /* it holds v + 1 while we have it */
	return len;
}

/* Nothing changed: the old version stays valid for readers. */
static void chunk_let_go(uint64_t *word, uint64_t v)
{
	__atomic_store_n(word, v, __ATOMIC_RELEASE);
}

size_t srv_chunk_snapshot(struct srv_tensor *t, uint32_t i, bool half, void *dst,
			  struct srv_open_set *os)
{
	uint64_t *word, v;
	size_t len = chunk_copy_held(t, i, half, dst, true, os, &word, &v);

	chunk_let_go(word, v);
	return len;
}

size_t srv_chunk_replica_copy(struct srv_tensor *t, uint32_t i, uint8_t *dst, size_t state_off,
			      size_t steps_off, struct srv_open_set *os)
{
	bool ready = atomic_load(&t->state_flag) == TENSOR_READY;
	uint32_t spp = t->opt->state_per_param;
	uint64_t *word, v;
	size_t len = chunk_copy_held(t, i, false, dst, ready, os, &word, &v);
	uint32_t count = ((const struct rdmaps_chunk_hdr *)dst)->count;

	/* the state and fold count the values go with, under the same lock */
	if (spp)
		memcpy(dst + state_off, chunk_state(t, i), (size_t)count * spp * sizeof(float));
	memcpy(dst + steps_off, &t->steps[i], sizeof(uint64_t));
	if (ready)
		chunk_let_go(word, v);
	return len;
}

void srv_chunk_replica_apply(struct srv_tensor *t, uint32_t i, const uint8_t *src,
			     uint32_t count, const struct srv_replica_layout *l)
{
	struct rdmaps_chunk_hdr *h = (struct rdmaps_chunk_hdr *)srv_chunk(t, i);
	const struct rdmaps_chunk_hdr *in = (const struct rdmaps_chunk_hdr *)src;
	uint32_t spp = t->opt->state_per_param;
	uint64_t v = seq_take(&h->version); /* one copy: a replica store's */

	memcpy(h + 1, in + 1, (size_t)count * sizeof(float));
	h->count = count;
	h->clock = in->clock;
	h->checksum = in->checksum; /* the primary's, of these very values */
	if (spp)
		memcpy(chunk_state(t, i), src + l->state_off, (size_t)count * spp * sizeof(float));
	memcpy(&t->steps[i], src + l->steps_off, sizeof(uint64_t));
	srv_half_publish(t, i, h, true);
	__atomic_store_n(&h->version, v + 2, __ATOMIC_RELEASE);
}

void srv_half_publish(struct srv_tensor *t, uint32_t i, const struct rdmaps_chunk_hdr *src,
		      bool publish)
{
	struct rdmaps_chunk_hdr *h;
	uint16_t *data;
	uint64_t v;

	if (!t->pull_fmt)
		return;
	h = (struct rdmaps_chunk_hdr *)srv_half_chunk(t, i);
	data = (uint16_t *)(h + 1);
	v = __atomic_load_n(&h->version, __ATOMIC_RELAXED) | 1u;
	/* odd before any data store, as the master's seqlock */
	__atomic_store_n(&h->version, v, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	(t->pull_fmt == RDMAPS__GRAD_BF16 ? rdmaps__f32_to_bf16_n : rdmaps__f32_to_f16_n)(
		data, (const float *)(src + 1), src->count);
	h->count = src->count;
	h->clock = src->clock;
	h->checksum = srv_checksum(data, (size_t)src->count * 2);
	if (publish)
		__atomic_store_n(&h->version, v + 1, __ATOMIC_RELEASE);
}

/*
 * A fold with two copies: the current copy (index even, 2k: copy k & 1) is
 * left alone; the fold starts from a copy of it in the other one, applies
 * the optimizer there, then points the index at it. A READ that picked the
 * current copy is only torn if the next fold after this one lands inside
 * it too. The index is odd meanwhile, which still names the current copy
 * (bit 1), so readers keep reading it.
 *
 * A fold thread keeps such a fold open (struct srv_open_set) until the end
 * of its batch: the same chunk folded again meanwhile gets its gradient
 * applied to the same new copy, with no second copy and checksum, and
 * readers see one new version rather than several. Under a backlog that
 * is what keeps the copy a READ picked from being rewritten by the next
 * fold but one while the READ is on the wire.
 */

/* Never wait for a chunk while holding open ones: the fold thread that has
 * it may be waiting for one of ours. */
static uint64_t take_two(uint64_t *word, struct srv_open_set *os)
{
	uint64_t v = __atomic_load_n(word, __ATOMIC_RELAXED);

	if (os && os->n) {
		while (!(v & 1u))
			if (__atomic_compare_exchange_n(word, &v, v + 1, false, __ATOMIC_ACQUIRE,
							__ATOMIC_RELAXED))
				return v;
		srv_open_publish(os);
	}
	return seq_take(word);
}

static void open_publish_one(const struct srv_open *o)
{
	unsigned cur = (unsigned)(o->v >> 1) & 1u;
	const struct rdmaps_chunk_hdr *src = (const void *)srv_chunk_copy(o->t, o->chunk, cur);
	struct rdmaps_chunk_hdr *dst = (void *)srv_chunk_copy(o->t, o->chunk, cur ^ 1u);

	dst->count = o->count;
	dst->clock = src->clock;
	dst->checksum = srv_checksum(o->data, (size_t)o->count * sizeof(float));
	/* the index is still odd: this fold thread alone holds the chunk */
	srv_half_publish(o->t, o->chunk, dst, true);
	/* release: body and checksum before the even version, and the copy
	 * before the index that names it */
	__atomic_store_n(&dst->version, o->v + 2, __ATOMIC_RELEASE);
	__atomic_store_n(&o->t->index[o->chunk], o->v + 2, __ATOMIC_RELEASE);
}

void srv_open_publish(struct srv_open_set *os)
{
	for (uint32_t i = 0; i < os->n; i++)
		open_publish_one(&os->o[i]);
	os->n = 0;
}

static void chunk_apply_two(struct srv_tensor *t, uint32_t chunk, const float *grad,
			    uint32_t count, struct srv_open_set *os)
{
	struct srv_open one, *o = NULL;

	for (uint32_t i = 0; os && i < os->n && !o; i++)
		if (os->o[i].t == t && os->o[i].chunk == chunk)
			o = &os->o[i];
	if (!o) {
		uint64_t v = take_two(&t->index[chunk], os);
		unsigned cur = (unsigned)(v >> 1) & 1u;
		const struct rdmaps_chunk_hdr *src = (const void *)srv_chunk_copy(t, chunk, cur);
		struct rdmaps_chunk_hdr *dst = (void *)srv_chunk_copy(t, chunk, cur ^ 1u);

		if (os && os->n == SRV_OPEN_MAX)
			srv_open_publish(os);
		o = os ? &os->o[os->n++] : &one;
		*o = (struct srv_open){ .t = t, .chunk = chunk, .count = count, .v = v,
					.data = (float *)(dst + 1) };
		/* odd before any data store: a reader that still has this copy
		 * in flight (from an older index) sees it as being written */
		__atomic_store_n(&dst->version, v + 1, __ATOMIC_RELAXED);
		__atomic_thread_fence(__ATOMIC_RELEASE);
		memcpy(dst + 1, src + 1, (size_t)count * sizeof(float));
	}
	srv_chunk_opt(t, chunk, o->data, grad, count);
	if (o == &one)
		open_publish_one(o);
}

void srv_chunk_fold(struct srv_tensor *t, uint32_t chunk, const float *grad, uint32_t count,
		    struct srv_open_set *os)
{
	if (t->index) {
		chunk_apply_two(t, chunk, grad, count, os);
		return;
	}
	srv_chunk_apply(t, chunk, grad, count, false);
}

void srv_chunk_apply(struct srv_tensor *t, uint32_t chunk, const float *grad, uint32_t count,
		     bool assign)
{
	struct rdmaps_chunk_hdr *h = (struct rdmaps_chunk_hdr *)srv_chunk(t, chunk);
	float *data = (float *)(h + 1);
	uint64_t v;

	if (assign) {
		/* an initialising tensor's chunks stay odd ("being written")
		 * until the creator seals it; only its fold thread writes them */
		memcpy(data, grad, (size_t)count * sizeof(float));
		h->checksum = srv_checksum(data, (size_t)count * sizeof(float));
		srv_half_publish(t, chunk, h, false);
		return;
	}
	if (t->index) {
		chunk_apply_two(t, chunk, grad, count, NULL);
		return;
	}
	v = srv_chunk_lock(t, chunk);
	/* the odd version before any data store (CAS acquire does not order
	 * later stores after it on every architecture) */
	__atomic_thread_fence(__ATOMIC_RELEASE);
	srv_chunk_opt(t, chunk, data, grad, count);
	srv_chunk_unlock(t, chunk, v, true);
}
