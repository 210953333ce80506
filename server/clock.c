/*
 * clock.c -- BSP and SSP: members, clocks, aggregation, eviction.
 *
 * Each chunk header carries a clock the worker checks on its one-sided read
 * (docs/consistency.md):
 *  - SSP: the chunk's clock is the tensor's clock, the minimum over active
 *    members of their completed pushes: every push of a clock below it is
 *    folded. Pushes fold as they arrive (as ASP); a pull at clock c waits
 *    for chunk clock >= c - s.
 *  - BSP: pushes of the pending clock are summed per chunk into `agg`; when
 *    every active member has contributed to a chunk, the optimizer runs
 *    once on the sum (or mean) and the chunk's clock advances. A pull at
 *    clock c waits for chunk clock >= c, and cannot see clock c's pushes,
 *    since they need its own push, which comes after its pull.
 * Members are the workers that declared or looked up the tensor. One that
 * disconnects leaves; one that stalls a clock longer than --evict-ms while
 * others wait is evicted and its later pushes refused. Both are logged and
 * counted, and the clocks waiting for them go on.
 */
#include <string.h>

#include "log.h"
#include "server.h"

static uint64_t min_active_clock(const struct srv_tensor *t, uint64_t mask)
{
	uint64_t m = UINT64_MAX;

	for (unsigned i = 0; i < SRV_MAX_MEMBERS; i++)
		if ((mask >> i) & 1u && t->member[i].clock < m)
			m = t->member[i].clock;
	return m;
}

/* SSP: the tensor's clock moved; tell every chunk (a reader takes any clock
 * it sees as a lower bound, so a plain monotonic store is enough). */
static void ssp_publish(struct srv_tensor *t, uint64_t clock)
{
	t->clock = clock;
	for (uint32_t i = 0; i < t->nchunks; i++) {
		struct rdmaps_chunk_hdr *h = (struct rdmaps_chunk_hdr *)srv_chunk(t, i);
		__atomic_store_n(&h->clock, (uint32_t)clock, __ATOMIC_RELEASE); /* u32 on the wire */
		if (t->pull_fmt) {
			h = (struct rdmaps_chunk_hdr *)srv_half_chunk(t, i);
			__atomic_store_n(&h->clock, (uint32_t)clock, __ATOMIC_RELEASE);
		}
	}
}

/* BSP: fold chunk i's aggregate if every active member contributed. Called
 * with the chunk locked (version odd); returns true when it published. */
static bool bsp_try_complete(struct srv_tensor *t, uint32_t i)
{
	uint64_t active = atomic_load(&t->active_mask);
	uint64_t have = __atomic_load_n(&t->contrib[i], __ATOMIC_RELAXED);
	struct rdmaps_chunk_hdr *h = (struct rdmaps_chunk_hdr *)srv_chunk(t, i);
	float *agg = t->agg + (size_t)i * t->chunk_elems;
	uint32_t n = h->count;

	if (!have || (have & active) != active || t->joined < t->cons.workers)
		return false;
	if (t->cons.mean) {
		float inv = 1.0f / (float)__builtin_popcountll(have);
		for (uint32_t k = 0; k < n; k++)
			agg[k] *= inv;
	}
	/* the odd version (taken by the caller) before any data store */
	__atomic_thread_fence(__ATOMIC_RELEASE);
	srv_chunk_opt(t, i, (float *)(h + 1), agg, n);
	memset(agg, 0, (size_t)n * sizeof(float));
	__atomic_store_n(&t->contrib[i], 0, __ATOMIC_RELAXED);
	h->clock++;
	t->chunk_clock_done[i] = h->clock;
	return true;
}

/* BSP: re-check every chunk after the member set shrank or the gate opened. */
static void bsp_recheck(struct srv_tensor *t)
{
	for (uint32_t i = 0; i < t->nchunks; i++) {
		uint64_t v = srv_chunk_lock(t, i);
		srv_chunk_unlock(t, i, v, bsp_try_complete(t, i));
	}
}

/* BSP: a clock is under way while some chunk holds contributions. */
static bool bsp_busy(const struct srv_tensor *t)
{
	for (uint32_t i = 0; i < t->nchunks; i++)
		if (__atomic_load_n(&t->contrib[i], __ATOMIC_RELAXED))
			return true;
	for (uint32_t i = 1; i < t->nchunks; i++)
		if (t->chunk_clock_done[i] != t->chunk_clock_done[0])
			return true;
	return false;
}

int srv_clock_join(struct srv_tensor *t, struct srv_conn *c, uint64_t *clock, bool *ready)
{
	bool gate_opened = false;
	int rc = 0;

	*ready = true;
	*clock = 0;
	if (t->cons.mode == RDMAPS_ASP)
		return 0;
	pthread_mutex_lock(&t->clock_lock);
	if (c->member_of[t->id]) {
		*clock = t->member[c->member_of[t->id] - 1].clock;
		goto out;
	}
	/* BSP: join only between clocks, so no clock waits for a newcomer
	 * that never saw its beginning */
	if (t->cons.mode == RDMAPS_BSP && t->joined >= t->cons.workers && bsp_busy(t)) {
		*ready = false;
		goto out;
	}
	for (unsigned i = 0; i < SRV_MAX_MEMBERS; i++) {
		struct srv_member *m = &t->member[i];
		if (m->active || m->conn)
			continue;
		*m = (struct srv_member){ .conn = c, .active = true, .last_ns = rdmaps__now_ns() };
		/* at the tensor's clock: 0 when new, or where a restored
		 * checkpoint left it (a first joiner at 0 would hold the clock
		 * back while later joiners wait for it, and time out) */
		m->clock = t->cons.mode == RDMAPS_BSP ? t->chunk_clock_done[0] : t->clock;
		*clock = m->clock;
		c->member_of[t->id] = (uint8_t)(i + 1);
		t->joined++;
		atomic_fetch_or(&t->active_mask, 1ull << i);
		if (t->cons.mode == RDMAPS_SSP && t->joined >= t->cons.workers) {
			uint64_t mc = min_active_clock(t, atomic_load(&t->active_mask));
			if (mc != UINT64_MAX && mc > t->clock)
				ssp_publish(t, mc);
		}
		gate_opened = t->cons.mode == RDMAPS_BSP && t->joined == t->cons.workers;
		log_info("tensor '%s': worker " SRV_CONN_FMT " joined at clock %llu (%u members)",
			 t->name, SRV_CONN_ARGS(c), (unsigned long long)m->clock,
			 __builtin_popcountll(atomic_load(&t->active_mask)));
		goto out;
	}
	rc = RDMAPS_ELIMIT;
out:
	pthread_mutex_unlock(&t->clock_lock);
	/* the last expected member is in: contributions waiting for it may complete */
	if (gate_opened)
		bsp_recheck(t);
	return rc;
}

int srv_clock_check(struct srv_tensor *t, struct srv_conn *c, const struct rdmaps_slot_hdr *h,
		    uint32_t *next_chunk)
{
	unsigned idx = c->member_of[t->id];
	struct srv_member *m;

	if (!idx)
		return RDMAPS_EPROTO;
	m = &t->member[idx - 1];
	if (!((atomic_load(&t->active_mask) >> (idx - 1)) & 1u))
		return RDMAPS_ELIMIT; /* evicted */
	/* one push per clock, covering the part's chunks once, in order:
	 * counting a chunk twice would corrupt the aggregate */
	if (h->clock != (uint32_t)m->clock || h->chunk != *next_chunk)
		return RDMAPS_EPROTO;
	/* BSP aggregates one clock per chunk: a member that already gave this
	 * chunk's pending clock is pushing the next one before its pull (the
	 * library refuses that; a raw client gets here). Its bit is only set
	 * by this thread; another clearing it races only a push that early. */
	if (t->cons.mode == RDMAPS_BSP &&
	    (__atomic_load_n(&t->contrib[h->chunk], __ATOMIC_RELAXED) >> (idx - 1)) & 1u)
		return RDMAPS_EPROTO;
	*next_chunk = (h->flags & RDMAPS_SLOT_END) ? 0 : h->chunk + 1;
	if ((h->flags & RDMAPS_SLOT_END) && h->chunk + 1 != t->nchunks)
		return RDMAPS_EPROTO;
	return 0;
}

static void push_end(struct srv_tensor *t, struct srv_member *m)
{
	pthread_mutex_lock(&t->clock_lock);
	m->clock++;
	m->next_chunk = 0;
	m->last_ns = rdmaps__now_ns();
	if (t->cons.mode == RDMAPS_SSP && t->joined >= t->cons.workers) {
		uint64_t mc = min_active_clock(t, atomic_load(&t->active_mask));
		if (mc != UINT64_MAX && mc > t->clock)
			ssp_publish(t, mc);
	}
	pthread_mutex_unlock(&t->clock_lock);
}

void srv_clock_fold(struct srv_tensor *t, struct srv_conn *c, const struct rdmaps_slot_hdr *h,
		    const float *grad)
{
	unsigned idx = c->member_of[t->id] - 1;
	struct srv_member *m = &t->member[idx];

	if (t->cons.mode == RDMAPS_SSP) {
		srv_chunk_apply(t, h->chunk, grad, h->count, false);
	} else {
		float *agg = t->agg + (size_t)h->chunk * t->chunk_elems;
		uint64_t v = srv_chunk_lock(t, h->chunk);
		for (uint32_t k = 0; k < h->count; k++)
			agg[k] += grad[k];
		__atomic_fetch_or(&t->contrib[h->chunk], 1ull << idx, __ATOMIC_RELAXED);
		srv_chunk_unlock(t, h->chunk, v, bsp_try_complete(t, h->chunk));
	}
	m->next_chunk = h->chunk + 1;
	if (h->flags & RDMAPS_SLOT_END)
		push_end(t, m);
}

/* Drop member idx from t's clocks (t->clock_lock held). */
static void member_drop(struct srv_tensor *t, unsigned idx)
{
	atomic_fetch_and(&t->active_mask, ~(1ull << idx));
	t->member[idx].active = false;
	if (t->cons.mode == RDMAPS_SSP) {
		uint64_t mc = min_active_clock(t, atomic_load(&t->active_mask));
		if (mc != UINT64_MAX && mc > t->clock)
			ssp_publish(t, mc);
	}
}

void srv_clock_leave(struct srv_conn *c)
{
	uint32_t n = atomic_load(&c->store->count);

	for (uint32_t id = 0; id < n; id++) {
		struct srv_tensor *t;
		unsigned idx = c->member_of[id];
		if (!idx)
			continue;
		t = srv_store_get(c->store, id);
		pthread_mutex_lock(&t->clock_lock);
		member_drop(t, idx - 1);
		t->member[idx - 1].conn = NULL; /* the slot can be reused */
		pthread_mutex_unlock(&t->clock_lock);
		if (t->cons.mode == RDMAPS_BSP)
			bsp_recheck(t);
		log_info("tensor '%s': worker " SRV_CONN_FMT " left", t->name, SRV_CONN_ARGS(c));
	}
}

static void store_tick(struct srv *s, struct srv_store *st)
{
	uint32_t n = atomic_load(&st->count);
	uint64_t now = rdmaps__now_ns(), limit = (uint64_t)s->cfg.evict_ms * 1000000u;

	for (uint32_t id = 0; id < n; id++) {
		struct srv_tensor *t = srv_store_get(st, id);
		bool dropped = false;
		if (!t || t->cons.mode == RDMAPS_ASP)
			continue;
		pthread_mutex_lock(&t->clock_lock);
		uint64_t mask = atomic_load(&t->active_mask), top = 0;
		for (unsigned i = 0; i < SRV_MAX_MEMBERS; i++)
			if ((mask >> i) & 1u && t->member[i].clock > top)
				top = t->member[i].clock;
		/* a member behind the leader, silent for too long, holds everyone */
		for (unsigned i = 0; i < SRV_MAX_MEMBERS; i++) {
			struct srv_member *m = &t->member[i];
			if (!((mask >> i) & 1u) || m->clock >= top || now - m->last_ns < limit)
				continue;
			log_warn("tensor '%s': evicting worker %p: stuck at clock %llu for %u ms while "
				 "others reached %llu",
				 t->name, m->conn, (unsigned long long)m->clock, s->cfg.evict_ms,
				 (unsigned long long)top);
			member_drop(t, i);
			atomic_fetch_add(&s->evictions, 1);
			dropped = true;
		}
		pthread_mutex_unlock(&t->clock_lock);
		if (dropped && t->cons.mode == RDMAPS_BSP)
			bsp_recheck(t);
	}
}

void srv_clock_tick(struct srv *s)
{
	store_tick(s, &s->store);
	/* and the parts taken over here from their replicas (authority.c) */
	for (unsigned p = 0; p < RDMAPS_MAX_SERVERS; p++)
		if (srv_serves(s, p))
			store_tick(s, s->replica[p]);
}
