/*
 * cq.c -- the completion queues a fold thread polls: one per device for all
 * of its connections there (more only when one is full), so that an idle
 * connection costs its fold thread nothing to poll, where a CQ per
 * connection cost an empty ibv_poll_cq per connection per round.
 *
 * The listener makes and sizes them and keeps the reservations; the fold
 * thread only polls, arms and (at shutdown, joined) gives them back. A new
 * CQ is filled in before ncqs is raised (release), so the thread never sees
 * half of one. Which connection a completion is for, the thread learns from
 * its wr_id (SRV_WR, server.h).
 */
#include <errno.h>
#include <string.h>

#include "error.h"
#include "log.h"
#include "server.h"

/*
 * A new CQ is sized for CQ_CONNS connections like the one asking (with
 * the default 16 slots a connection reserves 89 entries; with the eighth
 * kept free a CQ takes 56 of them), so CQ memory grows
 * with the workers, as a CQ per connection did, rather than a fixed large
 * CQ per thread from the first worker on (a NIC pins CQ memory like an
 * MR): 256 default workers on one thread poll five CQs, not 256.
 */
#define CQ_CONNS 64u
#define CQ_CAP_MAX 65536u

int srv_cq_reserve(struct srv *s, struct srv_fold_thread *ft, struct ibv_context *verbs, bool backups,
		   uint32_t need, struct srv_cq **out)
{
	uint32_t n = atomic_load_explicit(&ft->ncqs, memory_order_relaxed);
	struct ibv_device_attr da;
	struct srv_cq *q;
	uint64_t want = (uint64_t)need * CQ_CONNS;
	uint32_t cap = want < CQ_CAP_MAX ? (uint32_t)want : CQ_CAP_MAX;

	for (uint32_t i = 0; i < n; i++) {
		q = &ft->cqs[i];
		/* an eighth kept free: a gone connection's late flushes
		 * may still sit in it when its reservation is given back */
		if (q->verbs == verbs && q->backups == backups &&
		    q->cap - q->cap / 8 - q->reserved >= need) {
			q->reserved += need;
			*out = q;
			return 0;
		}
	}
	if (n == SRV_CQS_MAX) {
		log_error("fold thread %u: %u completion queues, all full", ft->idx, n);
		return RDMAPS_ELIMIT;
	}
	if (!ibv_query_device(verbs, &da) && da.max_cqe > 0 && (uint32_t)da.max_cqe < cap)
		cap = (uint32_t)da.max_cqe;
	if (cap - cap / 8 < need)
		return RDMAPS_ELIMIT;
	q = &ft->cqs[n];
	q->cq = ibv_create_cq(verbs, (int)cap, ft, srv_fold_channel(s, ft, verbs), 0);
	if (!q->cq) {
		log_error("fold thread %u: ibv_create_cq(%u): %s", ft->idx, cap, strerror(errno));
		return RDMAPS_EVERBS;
	}
	q->verbs = verbs;
	q->backups = backups;
	q->cap = cap;
	q->reserved = need;
	atomic_store_explicit(&ft->ncqs, n + 1, memory_order_release);
	log_info("fold thread %u: completion queue %u on %s, %u entries", ft->idx, n,
		 ibv_get_device_name(verbs->device), cap);
	*out = q;
	return 0;
}

void srv_cq_release(struct srv_cq *scq, uint32_t need)
{
	scq->reserved -= need;
}

void srv_cq_fini(struct srv_fold_thread *ft)
{
	uint32_t n = atomic_load(&ft->ncqs);

	for (uint32_t i = 0; i < n; i++)
		if (ft->cqs[i].cq && ibv_destroy_cq(ft->cqs[i].cq))
			log_warn("fold thread %u: a completion queue would not go", ft->idx);
	atomic_store(&ft->ncqs, 0);
}
