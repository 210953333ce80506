/*
 * store.c -- the tensor store: declaration, lookup and the chunk layout in
 * memory (common/chunk.h). Declarations take a mutex; folds and one-sided
 * reads never do: tensors are published once, with release ordering, into a
 * fixed array, and never move or disappear while the server runs.
 */
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "optimizer.h"
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
	s->chunk_elems = cfg->chunk_elems;
	pthread_mutex_init(&s->lock, NULL);
	return 0;
}

static void tensor_free(struct srv_tensor *t)
{
	if (!t)
		return;
	free(t->mem);
	free(t->state);
	free(t->steps);
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
	pthread_mutex_destroy(&s->lock);
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

static void chunk_init(struct srv_tensor *t, uint32_t i, float value)
{
	uint32_t count = rdmaps__chunk_count(t->length, t->chunk_elems, i);
	struct rdmaps_chunk_hdr *h = (struct rdmaps_chunk_hdr *)srv_chunk(t, i);
	float *data = (float *)(h + 1);
	struct rdmaps_chunk_trl *tr =
		(struct rdmaps_chunk_trl *)((uint8_t *)data + rdmaps__chunk_data_span(count));

	for (uint32_t k = 0; k < count; k++)
		data[k] = value;
	h->count = count;
	h->checksum = rdmaps__checksum(data, (size_t)count * sizeof(float));
	/* a tensor waiting for its creator's values reads as "being written" */
	h->version = tr->version = atomic_load(&t->state_flag) == TENSOR_READY ? 0 : 1;
}

static int tensor_new(struct srv_store *s, const struct rdmaps_msg_declare *m,
		      const struct srv_optimizer *opt, const void *conn, struct srv_tensor **out)
{
	struct srv_tensor *t = calloc(1, sizeof(*t));
	if (!t)
		return RDMAPS_ENOMEM;
	memcpy(t->name, m->name, sizeof(t->name));
	t->length = m->length;
	t->chunk_elems = s->chunk_elems;
	t->nchunks = rdmaps__chunk_total(t->length, t->chunk_elems);
	t->stride = rdmaps__chunk_stride(t->chunk_elems);
	t->mem_len = (size_t)(t->nchunks - 1) * t->stride +
		     rdmaps__chunk_read_len(rdmaps__chunk_count(t->length, t->chunk_elems,
								 t->nchunks - 1));
	t->opt = opt;
	t->hyper = m->hyper;
	if (m->flags & RDMAPS_DECLARE_INIT_DATA) {
		atomic_store(&t->state_flag, TENSOR_INIT);
		t->creator = conn;
	} else {
		atomic_store(&t->state_flag, TENSOR_READY);
	}
	/* page-aligned: registration pins whole pages anyway */
	t->mem = aligned_alloc(4096, rdmaps__round_up(t->mem_len, 4096));
	t->steps = calloc(t->nchunks, sizeof(*t->steps));
	if (opt->state_per_param)
		t->state = calloc(t->length * opt->state_per_param, sizeof(float));
	if (!t->mem || !t->steps || (opt->state_per_param && !t->state)) {
		tensor_free(t);
		return RDMAPS_ENOMEM;
	}
	memset(t->mem, 0, t->mem_len);
	for (uint32_t i = 0; i < t->nchunks; i++)
		chunk_init(t, i, m->init_value);
	*out = t;
	return 0;
}

static bool same_declaration(const struct srv_tensor *t, const struct rdmaps_msg_declare *m,
			     const struct srv_optimizer *opt)
{
	return t->length == m->length && t->opt == opt &&
	       !memcmp(&t->hyper, &m->hyper, sizeof(t->hyper));
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
	if (m->flags & ~RDMAPS_DECLARE_INIT_DATA)
		return RDMAPS_EINVAL;
	bytes = m->length * sizeof(float) * (1 + opt->state_per_param);
	if (bytes > s->max_tensor_bytes || m->length / s->chunk_elems >= UINT32_MAX)
		return RDMAPS_ERANGE;

	pthread_mutex_lock(&s->lock);
	t = find_locked(s, m->name);
	if (t) {
		rc = same_declaration(t, m, opt) ? 0 : RDMAPS_EEXIST;
		*created = false;
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

void srv_chunk_apply(struct srv_tensor *t, uint32_t chunk, const float *grad, uint32_t count,
		     bool assign, uint32_t clock)
{
	struct rdmaps_chunk_hdr *h = (struct rdmaps_chunk_hdr *)srv_chunk(t, chunk);
	float *data = (float *)(h + 1);
	struct rdmaps_chunk_trl *tr =
		(struct rdmaps_chunk_trl *)((uint8_t *)data + rdmaps__chunk_data_span(count));
	uint64_t v = __atomic_load_n(&h->version, __ATOMIC_RELAXED);

	/*
	 * Take the chunk: even -> odd. Contended only when two fold threads
	 * fold the same chunk at once; the holder finishes in microseconds.
	 * An initialising tensor's chunks start odd and are owned by the
	 * creator's single fold thread, so assign just keeps them odd.
	 */
	if (!assign || (v & 1u) == 0) {
		for (;;) {
			if (!(v & 1u) && __atomic_compare_exchange_n(&h->version, &v, v + 1, true,
								     __ATOMIC_ACQUIRE,
								     __ATOMIC_RELAXED))
				break;
			rdmaps__cpu_relax();
			v = __atomic_load_n(&h->version, __ATOMIC_RELAXED);
		}
		v++;
	}
	/* odd trailer first: a reader that sees the new body sees it odd */
	__atomic_store_n(&tr->version, v, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);

	if (assign)
		memcpy(data, grad, (size_t)count * sizeof(float));
	else
		t->opt->apply(data,
			      t->state ? t->state + (size_t)chunk * t->chunk_elems *
							    t->opt->state_per_param
				       : NULL,
			      grad, count, &t->hyper, t->steps[chunk]);
	if (!assign) /* initial values are not a step: Adam's bias correction counts folds */
		t->steps[chunk]++;
	h->checksum = rdmaps__checksum(data, (size_t)count * sizeof(float));
	h->clock = clock;
	if (assign && atomic_load(&t->state_flag) != TENSOR_READY)
		return; /* stays odd until the creator seals the tensor */
	/* header even before trailer: equal even versions mean a whole body */
	__atomic_store_n(&h->version, v + 1, __ATOMIC_RELEASE);
	__atomic_store_n(&tr->version, v + 1, __ATOMIC_RELEASE);
}
