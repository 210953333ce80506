/*
 * fold.c -- fold threads: poll the completion queues of the connections they
 * own, fold staged gradients into the model, answer control messages, write
 * credits back. Busy-poll while there is work (and spin_us after it), then
 * sleep on the completion channel so an idle server burns no CPU (one
 * holding replica connections looks every SRV_REPL_APPLY_MS: server.h).
 *
 * Hot path (poll -> validate slot -> optimizer -> credit): no allocation, no
 * lock, and no syscall beyond what the provider's post_send/post_recv do.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "error.h"
#include "gradfmt.h"
#include "log.h"
#include "server.h"

#define FOLD_BATCH 32

int srv_conn_post_recv(struct srv_conn *c, uint32_t i)
{
	struct ibv_sge sge = {
		.addr = (uintptr_t)(c->bufs + (size_t)i * RDMAPS_MSG_MAX),
		.length = RDMAPS_MSG_MAX,
		.lkey = c->bufs_mr->lkey,
	};
	struct ibv_recv_wr wr = { .wr_id = c->wr_tag | i, .sg_list = &sge, .num_sge = 1 }, *bad;
	int rc = ibv_post_recv(c->qp, &wr, &bad);

	return rc ? rdmaps__from_errno(rc) : 0;
}

int srv_conn_post_send(struct srv_conn *c, const void *buf, uint32_t len, enum ibv_wr_opcode op,
		       uint64_t raddr, uint32_t rkey, uint64_t wr_id)
{
	struct ibv_sge sge = { .addr = (uintptr_t)buf, .length = len, .lkey = c->bufs_mr->lkey };
	struct ibv_send_wr wr = {
		.wr_id = wr_id,
		.sg_list = &sge,
		.num_sge = 1,
		.opcode = op,
		/* every send signaled: sq_outstanding stays exact, and sends are
		 * rare next to the folds that trigger them */
		.send_flags = IBV_SEND_SIGNALED,
	};
	struct ibv_send_wr *bad;
	int rc;

	if (c->broken)
		return RDMAPS_EDISCONNECTED;
	if (c->sq_outstanding >= c->sq_depth)
		return RDMAPS_EBUSY;
	if (len <= c->max_inline)
		wr.send_flags |= IBV_SEND_INLINE;
	if (op == IBV_WR_RDMA_WRITE) {
		wr.wr.rdma.remote_addr = raddr;
		wr.wr.rdma.rkey = rkey;
	}
	rc = ibv_post_send(c->qp, &wr, &bad);
	if (rc)
		return rdmaps__from_errno(rc);
	c->sq_outstanding++;
	return 0;
}

void srv_conn_fail(struct srv_conn *c, const char *why, int status)
{
	if (c->broken)
		return;
	c->broken = true;
	/* flushed work means the QP already went to error, which a worker's
	 * own disconnect does too: with hundreds of workers leaving at the end
	 * of a job that is no warning; the listener logs the departure */
	if (status == IBV_WC_WR_FLUSH_ERR)
		log_info("worker " SRV_CONN_FMT ": queue pair flushed (%s); dropping the connection",
			 SRV_CONN_ARGS(c), why);
	else
		log_warn("worker " SRV_CONN_FMT ": %s (%s); dropping the connection", SRV_CONN_ARGS(c),
			 why, ibv_wc_status_str((enum ibv_wc_status)status));
	/* the listener sees DISCONNECTED and frees everything */
	rdma_disconnect(c->id);
}

/* A send completed (or was flushed): its buffer may be written again. */
static void send_done(struct srv_conn *c, uint64_t wr_id)
{
	c->sq_outstanding--;
	if (SRV_WR_KIND(wr_id) == SRV_SEND_REPLY)
		c->reply_busy &= (uint8_t)~(1u << SRV_WR_IDX(wr_id));
	else if (SRV_WR_KIND(wr_id) == SRV_SEND_CREDIT)
		c->credit_busy = false;
}

static void slot_drop(struct srv_conn *c, int err, const char *why, uint64_t seq)
{
	uint32_t sup;

	c->credit.dropped++;
	c->credit.last_err = err;
	c->credit_dirty = true;
	c->credit_urgent = true;
	atomic_fetch_add_explicit(&c->dropped, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&c->ft->dropped, 1, memory_order_relaxed);
	if (rdmaps__ratelimit_ok(&c->log_rl, &sup))
		log_warn("worker " SRV_CONN_FMT ": staged slot seq %llu dropped: %s; %u more not logged",
			 SRV_CONN_ARGS(c), (unsigned long long)seq, why, sup);
}

/* Checks of a slot whose seq is right: 0, or why it must not be folded. */
static int slot_validate(struct srv_conn *c, const struct rdmaps_slot_hdr *h, const char **why)
{
	struct srv_tensor *t = srv_store_get(c->store, h->tensor_id);

	if (!t || !c->tensor_mr[h->tensor_id]) {
		*why = "unknown tensor";
		return RDMAPS_ENOENT;
	}
	if (h->flags & RDMAPS_SLOT_ROWS) {
		/* sparse rows: ids then values; ids are checked when folded */
		if (!t->cons.row_dim || (h->flags & RDMAPS_SLOT_ASSIGN) || !h->count ||
		    (size_t)h->count * (sizeof(uint64_t) + t->cons.row_dim * sizeof(float)) >
			    c->slot_size - RDMAPS_SLOT_HDR) {
			*why = "row count out of range";
			return RDMAPS_ERANGE;
		}
	} else if (h->chunk >= t->nchunks ||
		   h->count != rdmaps__chunk_count(t->length, t->chunk_elems, h->chunk) ||
		   (size_t)h->count * sizeof(float) > c->slot_size - RDMAPS_SLOT_HDR) {
		*why = "chunk or count out of range";
		return RDMAPS_ERANGE;
	}
	if (h->flags & ~RDMAPS_SLOT_FLAGS_KNOWN) {
		*why = "unknown flags";
		return RDMAPS_EPROTO;
	}
	if (rdmaps__slot_fmt(h->flags) &&
	    (rdmaps__slot_fmt(h->flags) >= RDMAPS__GRADFMT_COUNT ||
	     (h->flags & (RDMAPS_SLOT_ROWS | RDMAPS_SLOT_ASSIGN)))) {
		*why = "unknown gradient format, or one on rows or initial values";
		return RDMAPS_EPROTO;
	}
	if ((h->flags & RDMAPS_SLOT_ASSIGN) &&
	    (atomic_load(&t->state_flag) != TENSOR_INIT || atomic_load(&t->creator) != c)) {
		*why = "initial values from a worker that did not create the tensor";
		return RDMAPS_EPROTO;
	}
	if (!(h->flags & RDMAPS_SLOT_ASSIGN) && atomic_load(&t->state_flag) != TENSOR_READY) {
		*why = "push to a tensor still being initialised";
		return RDMAPS_EAGAIN;
	}
	return 0;
}

/* The fold thread's private copy of slot seq's payload (grad.c). */
static void *slot_copy(const struct srv_conn *c, uint64_t seq)
{
	return srv_stage_slot(c->ft->stage, &c->srv->cfg, (uint32_t)((seq - 1) % c->slots));
}

/* Fold the rows of a sparse slot from its private copy, whose ids were
 * checked when it was taken. */
static void rows_fold(struct srv_fold_thread *ft, struct srv_tensor *t,
		      const struct rdmaps_slot_hdr *h, void *p, bool replicate)
{
	const uint64_t *ids = p;
	uint32_t dim = t->cons.row_dim;
	size_t n;
	const float *v = srv_slot_values(t, h, p, &n);

	for (uint32_t k = 0; k < h->count; k++) {
		srv_chunk_apply(t, (uint32_t)ids[k], v + (size_t)k * dim, dim, false);
		if (replicate)
			srv_repl_touch(ft, t, (uint32_t)ids[k]);
	}
}

/*
 * Check the whole group that ends at next_seq - 1 before folding any of it:
 * headers, then each slot's payload, copied out of the staging ring into
 * the fold thread's own memory and checked there (finite values, row ids),
 * clock sequencing, then the clip norm. group_fold folds those copies: the
 * bytes checked are the bytes folded, whatever the worker writes into its
 * ring meanwhile. Returns 0 with *scale set, or why the group is refused.
 */
static int group_check(struct srv_conn *c, struct srv_tensor *t, float *scale, const char **why)
{
	/* BSP/SSP: only a member of the tensor's clocks may push to it
	 * (srv_clock_check refuses anyone else), whatever its declare said */
	bool clocked = t->cons.mode != RDMAPS_ASP;
	unsigned midx = clocked ? c->member_of[t->id] : 0;
	uint32_t next_chunk = midx ? t->member[midx - 1].next_chunk : 0;
	double sumsq = 0.0;

	*scale = 1.0f;
	for (uint64_t seq = c->group_seq; seq < c->next_seq; seq++) {
		const struct rdmaps_slot_hdr *h = &c->group_hdr[(seq - 1) % c->slots];
		double ss;
		int rc;

		if ((h->flags & SLOT_REFUSED) || h->tensor_id != t->id) {
			*why = "another slot of its push was refused";
			return RDMAPS_EREMOTE;
		}
		if (!(h->scale > 0.0f && h->scale <= 1.0f) || h->scale != c->group_hdr[(c->group_seq - 1) %
											c->slots].scale) {
			*why = "bad gradient scale";
			return RDMAPS_EPROTO;
		}
		rc = srv_slot_take(t, h, slot_copy(c, seq), srv_slot_staged(c, seq),
				   c->group_len[(seq - 1) % c->slots], &ss, why);
		if (rc) {
			if (rc == RDMAPS_EINVAL)
				atomic_fetch_add_explicit(&c->ft->nonfinite, 1, memory_order_relaxed);
			return rc;
		}
		sumsq += ss * (double)h->scale * (double)h->scale;
		if (clocked && !(h->flags & RDMAPS_SLOT_ASSIGN) &&
		    (rc = srv_clock_check(t, c, h, &next_chunk))) {
			*why = !midx		    ? "push from a worker that is not a member of the "
						      "tensor's clocks"
			       : rc == RDMAPS_ELIMIT ? "worker evicted from this tensor's clocks"
						     : "push out of clock order";
			return rc;
		}
	}
	*scale = c->group_hdr[(c->group_seq - 1) % c->slots].scale;
	/* the worker scales by the whole push's norm; each server still holds
	 * its share to the bound, whatever a worker sends */
	if (t->cons.clip_norm > 0.0f && sumsq > (double)t->cons.clip_norm * t->cons.clip_norm * 1.0002) {
		*scale *= (float)((double)t->cons.clip_norm / __builtin_sqrt(sumsq));
		atomic_fetch_add_explicit(&c->ft->clipped, 1, memory_order_relaxed);
	}
	return 0;
}

/* Fold every slot of the group that ends at next_seq - 1, or none of them,
 * from the copies group_check took and checked. */
static void group_fold(struct srv_conn *c)
{
	if (c->rstore) {
		srv_backup_group(c);
		return;
	}
	const struct rdmaps_slot_hdr *first = &c->group_hdr[(c->group_seq - 1) % c->slots];
	struct srv_tensor *t = !(first->flags & SLOT_REFUSED)
				       ? srv_store_get(c->store, first->tensor_id)
				       : NULL;
	const char *why = "another slot of its push was refused";
	/* every part folded here: ours, and those taken over (replicated to
	 * their old primaries once back: srv_repl_serve_part) */
	const bool replicate = c->ft->repl && !c->rstore;
	float scale = 1.0f;
	int rc = t ? group_check(c, t, &scale, &why) : RDMAPS_EREMOTE;

	for (uint64_t seq = c->group_seq; seq < c->next_seq; seq++) {
		const struct rdmaps_slot_hdr *h = &c->group_hdr[(seq - 1) % c->slots];
		void *g = slot_copy(c, seq);

		if (rc) {
			if (!(h->flags & SLOT_REFUSED))
				slot_drop(c, rc, why, seq);
			continue;
		}
		if (scale != 1.0f) {
			size_t nv;
			float *vals = srv_slot_values(t, h, g, &nv);
			srv_grad_scale(vals, nv, scale);
		}
		if (h->flags & RDMAPS_SLOT_ROWS)
			rows_fold(c->ft, t, h, g, replicate);
		else if (h->flags & RDMAPS_SLOT_ASSIGN)
			srv_chunk_apply(t, h->chunk, g, h->count, true);
		else if (t->cons.mode == RDMAPS_ASP)
			srv_chunk_fold(t, h->chunk, g, h->count, &c->ft->open);
		else
			srv_clock_fold(t, c, h, g);
		if (replicate && !(h->flags & RDMAPS_SLOT_ROWS))
			srv_repl_touch(c->ft, t, h->chunk);
		atomic_fetch_add_explicit(&c->folds, 1, memory_order_relaxed);
		atomic_fetch_add_explicit(&c->ft->folds, 1, memory_order_relaxed);
		/* which formats a tensor's pushes came in (rdmaps-ctl tensors); a
		 * load first: the bit is set once, not written by every fold */
		uint32_t bit = 1u << rdmaps__slot_fmt(h->flags);
		if (!(h->flags & RDMAPS_SLOT_ASSIGN) &&
		    !(atomic_load_explicit(&t->push_formats, memory_order_relaxed) & bit))
			atomic_fetch_or_explicit(&t->push_formats, bit, memory_order_relaxed);
	}
	c->group_seq = c->next_seq;
	if (replicate)
		srv_repl_credit(c->ft, c, c->next_seq, first->flags & RDMAPS_SLOT_ACK);
	else
		srv_conn_credit(c, c->next_seq, first->flags & RDMAPS_SLOT_ACK);
}

/*
 * One staged slot announced by a WRITE-with-immediate. Its header is checked
 * now, and copied, since the worker owns that memory and may scribble on it;
 * it is folded with the rest of its group once the group's last slot is in.
 */
static void slot_handle(struct srv_conn *c, uint32_t imm, uint32_t byte_len)
{
	uint32_t slot = imm & 0xffffu;
	struct rdmaps_slot_hdr h;
	const char *why = NULL;
	int rc;

	if (slot >= c->slots) {
		slot_drop(c, RDMAPS_EPROTO, "immediate names no slot", 0);
		return;
	}
	memcpy(&h, c->staging + (size_t)slot * c->slot_size, sizeof(h));
	/* exactly the next seq (the header has its low 32 bits, the immediate
	 * its low 16) in exactly its slot: anything else is a replay, a
	 * duplicate or garbage; never folded, and seq does not move */
	if (h.seq != (uint32_t)c->next_seq || (imm >> 16) != (uint32_t)(c->next_seq & 0xffffu) ||
	    slot != (uint32_t)((c->next_seq - 1) % c->slots)) {
		slot_drop(c, RDMAPS_EPROTO,
			  (int32_t)(h.seq - (uint32_t)c->next_seq) < 0 ? "replayed seq"
								       : "seq out of order",
			  h.seq);
		return;
	}
	c->next_seq++;
	/* the payload's length as the WRITE carried it (below) */
	uint32_t len = byte_len >= RDMAPS_SLOT_HDR && byte_len <= c->slot_size
			       ? byte_len - RDMAPS_SLOT_HDR
			       : 0;
	rc = c->rstore ? srv_backup_check(c, &h, len, &why) : slot_validate(c, &h, &why);
	if (rc) {
		slot_drop(c, rc, why, c->next_seq - 1);
		h.flags |= SLOT_REFUSED; /* the whole group will be refused */
	}
	c->group_hdr[slot] = h;
	/* the payload's length as the WRITE carried it; one longer than its
	 * slot spilled into the next and counts as 0, which no compressed
	 * format's length is: the decoder never reads past the slot */
	c->group_len[slot] = len;
	if (h.flags & RDMAPS_SLOT_LAST) {
		group_fold(c);
	} else if (c->next_seq - c->group_seq >= c->slots) {
		/* a group longer than the ring would overwrite itself: refuse it */
		slot_drop(c, RDMAPS_EPROTO, "push group longer than the staging ring", c->next_seq - 1);
		c->group_hdr[slot].flags |= SLOT_REFUSED;
		group_fold(c);
	}
}

static void credit_flush(struct srv_conn *c)
{
	if (!c->credit_dirty || c->broken)
		return;
	/*
	 * Inline, the NIC copies the 16 bytes at post time, so later updates of
	 * c->credit cannot race the DMA. A QP without inline sends (a provider
	 * with none, or --max-inline 0) sends from the registered credit buffer,
	 * one WRITE at a time: a credit folded meanwhile stays dirty until that
	 * one completes. If the send queue is full the credit stays dirty and
	 * goes out with the next batch.
	 */
	const void *from = &c->credit;
	uint64_t wr_id = SRV_WR(c, SRV_SEND_PLAIN, 0);

	if (sizeof(c->credit) > c->max_inline) {
		if (c->credit_busy)
			return;
		from = memcpy(srv_conn_credit_buf(c), &c->credit, sizeof(c->credit));
		wr_id = SRV_WR(c, SRV_SEND_CREDIT, 0);
	}
	if (srv_conn_post_send(c, from, sizeof(c->credit), IBV_WR_RDMA_WRITE, c->credit_addr,
			       c->credit_rkey, wr_id) == 0) {
		c->credit_busy = SRV_WR_KIND(wr_id) == SRV_SEND_CREDIT;
		c->credit_dirty = false;
		c->credit_urgent = false;
		c->credited_seq = c->credit.folded_seq;
	}
}

/*
 * Credits are written lazily: each one is a WRITE and its ACK, and under
 * rxe every packet costs both sides CPU, so one per push made the plain
 * push slower than a raw WRITE. A credit goes out at once when the worker
 * waits for it (RDMAPS_SLOT_ACK: a folded push) or a slot was dropped;
 * otherwise once a quarter of the ring has been folded since the last one
 * (the worker never runs out of slots while the fold keeps up), and, for
 * whatever is left, when the fold thread goes idle or every 1024 busy
 * rounds (credits_flush_all): rdmaps_flush waits at most that long.
 */
#define CREDIT_IDLE_NS 100000u /* idle this long: lazy credits go out */

void srv_credit_maybe(struct srv_conn *c)
{
	uint64_t quarter = c->slots / 4 ? c->slots / 4 : 1;

	if (c->credit_dirty &&
	    (c->credit_urgent || c->credit.folded_seq - c->credited_seq >= quarter))
		credit_flush(c);
}

void srv_conn_credit(struct srv_conn *c, uint64_t seq, bool urgent)
{
	c->credit.folded_seq = seq;
	c->credit_dirty = true;
	if (urgent)
		c->credit_urgent = true;
	/* group_fold's caller sends it (cq_poll); a credit the backups
	 * released later goes from here */
	if (c->ft->repl && c->live && !c->broken)
		srv_credit_maybe(c);
}

static void credits_flush_all(struct srv_fold_thread *ft)
{
	for (uint32_t i = 0; i < ft->nconns; i++)
		credit_flush(ft->conns[i]);
}

/*
 * One completion of connection c. A broken connection (its QP failed, or it
 * is leaving) only has its staged slots folded: a push whose WRITE the
 * worker saw acknowledged has its completion in the CQ ahead of the
 * disconnect, and "staged" must not mean "lost because the worker closed
 * right after" (a BSP member leaving after its last push, say). Each slot
 * is still checked as ever; a group cut short is never folded, so no
 * partial gradient gets in. Nothing more is posted on it.
 */
void srv_conn_wc(struct srv_conn *c, const struct ibv_wc *wc)
{
	uint32_t idx = SRV_WR_IDX(wc->wr_id);

	c->cqes++;
	if (c->broken) {
		if (wc->status == IBV_WC_SUCCESS && !(wc->wr_id & SRV_WR_SEND) &&
		    wc->opcode == IBV_WC_RECV_RDMA_WITH_IMM)
			slot_handle(c, ntohl(wc->imm_data), wc->byte_len);
		return;
	}
	if (wc->status != IBV_WC_SUCCESS) {
		if (wc->wr_id & SRV_WR_SEND)
			send_done(c, wc->wr_id);
		srv_conn_fail(c, "work completion error", wc->status);
		return;
	}
	if (wc->wr_id & SRV_WR_SEND) {
		send_done(c, wc->wr_id);
		return;
	}
	if (wc->opcode == IBV_WC_RECV_RDMA_WITH_IMM)
		slot_handle(c, ntohl(wc->imm_data), wc->byte_len);
	else if (wc->opcode == IBV_WC_RECV)
		srv_control_handle(c, c->bufs + (size_t)idx * RDMAPS_MSG_MAX, wc->byte_len);
	/* every receive is given back at once: WRITE-with-immediate consumes
	 * one too, and rxe NAK-storms when they run out */
	if (!c->broken && srv_conn_post_recv(c, idx))
		srv_conn_fail(c, "cannot repost a receive", IBV_WC_GENERAL_ERR);
}

/* The registered connection a completion is for, or NULL for one gone. */
static struct srv_conn *wc_conn(const struct srv_fold_thread *ft, uint64_t wr_id)
{
	uint32_t place = SRV_WR_PLACE(wr_id);
	struct srv_conn *c = place < ft->nplaces ? ft->place_conn[place] : NULL;

	return c && (wr_id & SRV_WR_TAG_MASK) == c->wr_tag ? c : NULL;
}

/* Poll one shared CQ; returns the number of completions taken. */
int srv_cq_poll(struct srv_fold_thread *ft, struct srv_cq *q)
{
	struct ibv_wc wc[FOLD_BATCH];
	struct srv_conn *touched[FOLD_BATCH];
	uint32_t nt = 0;
	int n = ibv_poll_cq(q->cq, FOLD_BATCH, wc);

	for (int i = 0; i < n; i++) {
		struct srv_conn *c = wc_conn(ft, wc[i].wr_id);
		if (!c)
			continue; /* a late flush of a connection already gone */
		if (!c->live) {
			/* before its attach: kept, in order, for it */
			if (c->nearly < c->early_cap)
				c->early[c->nearly++] = wc[i];
			continue;
		}
		srv_conn_wc(c, &wc[i]);
		if (!nt || touched[nt - 1] != c)
			touched[nt++] = c;
	}
	/* what this batch folded becomes visible before any credit says so,
	 * and goes to the backups (a backups' CQ folds nothing of ours) */
	if (n > 0 && !q->backups) {
		srv_open_publish(&ft->open);
		if (ft->repl)
			srv_repl_flush(ft);
	}
	for (uint32_t i = 0; i < nt; i++)
		if (!touched[i]->broken)
			srv_credit_maybe(touched[i]);
	return n > 0 ? n : 0;
}

void srv_fold_wake(struct srv_fold_thread *ft)
{
	uint64_t one = 1;

	if (write(ft->wake_fd, &one, sizeof(one)) < 0)
		log_warn("fold thread %u: wake-up write failed", ft->idx);
}

int srv_fold_poll_backups(struct srv_fold_thread *ft)
{
	uint32_t n = atomic_load_explicit(&ft->ncqs, memory_order_acquire);
	int work = 0;

	for (uint32_t i = 0; i < n; i++)
		if (ft->cqs[i].backups)
			work += srv_cq_poll(ft, &ft->cqs[i]);
	return work;
}

/* Poll every CQ of the thread; returns the completions taken. */
static int cqs_poll(struct srv_fold_thread *ft)
{
	uint32_t n = atomic_load_explicit(&ft->ncqs, memory_order_acquire);
	int work = 0;

	for (uint32_t i = 0; i < n; i++)
		work += srv_cq_poll(ft, &ft->cqs[i]);
	if (ft->repl)
		work += srv_repl_poll(ft);
	return work;
}

/*
 * A worker whose host or link died without a word leaves a connection on
 * which nothing ever completes: its staging ring, PD and slot in
 * max-workers would be held for good. Every KEEPALIVE_NS an idle
 * connection gets a zero-length RDMA WRITE to the worker's credit word (no
 * memory is touched, the worker's CPU never sees it); if the worker is gone
 * it fails after the transport's retries and the connection is dropped. A
 * connection with requests in flight and no completion for STALL_TICKS
 * ticks is dropped too: rxe after a link flap can leave a queue pair that
 * never retransmits, and never reports an error either.
 */
#define KEEPALIVE_NS 2000000000ull
#define STALL_TICKS 15u

static void keepalive(struct srv_fold_thread *ft)
{
	for (uint32_t i = 0; i < ft->nconns; i++) {
		struct srv_conn *c = ft->conns[i];
		if (c->broken)
			continue;
		if (!c->sq_outstanding) {
			struct ibv_send_wr wr = { .wr_id = SRV_WR(c, SRV_SEND_PLAIN, 0),
						  .opcode = IBV_WR_RDMA_WRITE,
						  .send_flags = IBV_SEND_SIGNALED };
			struct ibv_send_wr *bad;
			wr.wr.rdma.remote_addr = c->credit_addr;
			wr.wr.rdma.rkey = c->credit_rkey;
			if (ibv_post_send(c->qp, &wr, &bad))
				srv_conn_fail(c, "cannot post a keepalive", IBV_WC_GENERAL_ERR);
			else
				c->sq_outstanding++;
			c->ka_stalled = 0;
		} else if (c->cqes != c->ka_cqes) {
			c->ka_stalled = 0;
		} else if (++c->ka_stalled >= STALL_TICKS) {
			srv_conn_fail(c, "requests stalled", IBV_WC_RETRY_EXC_ERR);
		}
		c->ka_cqes = c->cqes;
	}
}

/* Arm every CQ, check once more (a completion may have slipped in), sleep. */
static void fold_sleep(struct srv_fold_thread *ft)
{
	struct srv *s = ft->srv;
	struct pollfd pfd[1 + 16];
	int n = 0;
	struct ibv_cq *cq;
	void *ctx;
	uint64_t v;

	uint32_t ncqs = atomic_load_explicit(&ft->ncqs, memory_order_acquire);
	bool replicas = false;

	/* a replica CQ only for solicited records (SRV_REPL_APPLY_MS): a
	 * wake-up per record cost the primary's acknowledgement in the VM
	 * (the backup's thread and its rxe work share CPUs), and costs a
	 * backup a context switch per push anywhere */
	for (uint32_t i = 0; i < ncqs; i++) {
		replicas |= ft->cqs[i].backups;
		ibv_req_notify_cq(ft->cqs[i].cq, ft->cqs[i].backups);
	}
	if (cqs_poll(ft) || (ft->repl && srv_repl_pending(ft)))
		return;
	if (atomic_load(&ft->mail_pending) || atomic_load(&s->stop) || atomic_load(&s->pause_req))
		return;
	atomic_fetch_add_explicit(&ft->sleeps, 1, memory_order_relaxed);
	pfd[n++] = (struct pollfd){ .fd = ft->wake_fd, .events = POLLIN };
	for (int d = 0; d < s->ndev && n < 17; d++)
		pfd[n++] = (struct pollfd){ .fd = ft->channels[d]->fd, .events = POLLIN };
	poll(pfd, (nfds_t)n, replicas ? SRV_REPL_APPLY_MS : 1000);
	for (int d = 0; d < s->ndev; d++)
		while (ibv_get_cq_event(ft->channels[d], &cq, &ctx) == 0)
			ibv_ack_cq_events(cq, 1);
	if (pfd[0].revents & POLLIN) {
		ssize_t r = read(ft->wake_fd, &v, sizeof(v));
		(void)r;
	}
}

struct ibv_comp_channel *srv_fold_channel(struct srv *s, struct srv_fold_thread *ft,
					  struct ibv_context *ctx)
{
	for (int d = 0; d < s->ndev; d++)
		if (s->devs[d] == ctx)
			return ft->channels[d];
	return NULL;
}

/*
 * No lease (authority.c): nothing is polled, so nothing folds and no
 * credit goes out; completions wait in the CQs and slots in their rings
 * until the lease is back. Mail is still answered and a checkpoint still
 * parks the thread (fold_main). Woken by mail, a stop, or every 5 ms to
 * look at the clock again.
 */
static void fold_fence(struct srv_fold_thread *ft)
{
	struct pollfd pfd = { .fd = ft->wake_fd, .events = POLLIN };
	uint64_t v;

	if (!ft->fenced)
		log_info("fold thread %u: no lease, folding nothing", ft->idx);
	ft->fenced = true;
	/* but the records of the primaries backed up here are applied: they
	 * are their folds, fenced by their leases (and a server whose own
	 * rank is held elsewhere catches up as that rank's backup) */
	if (srv_fold_poll_backups(ft))
		return;
	credits_flush_all(ft); /* what was applied, told to its primary */
	if (poll(&pfd, 1, 5) == 1 && read(ft->wake_fd, &v, sizeof(v)) < 0)
		log_warn("fold thread %u: wake-up read failed", ft->idx);
}

/* The lease is back: what attached meanwhile first, then polling. */
static void fold_unfence(struct srv_fold_thread *ft)
{
	ft->fenced = false;
	log_info("fold thread %u: lease held, folding", ft->idx);
	for (uint32_t i = 0; i < ft->nconns; i++)
		srv_conn_early(ft->conns[i]);
}

/* Parked for a checkpoint: nothing folds until the listener lets go. */
static void fold_park(struct srv_fold_thread *ft)
{
	struct srv *s = ft->srv;

	pthread_mutex_lock(&s->pause_lock);
	s->paused++;
	pthread_cond_broadcast(&s->pause_cond);
	while (atomic_load(&s->pause_req))
		pthread_cond_wait(&s->pause_cond, &s->pause_lock);
	s->paused--;
	pthread_mutex_unlock(&s->pause_lock);
}

void srv_fold_pause(struct srv *s)
{

	pthread_mutex_lock(&s->pause_lock);
	atomic_store(&s->pause_req, true);
	for (unsigned i = 0; i < s->cfg.fold_threads; i++)
		srv_fold_wake(&s->ft[i]);
	while (s->paused < s->cfg.fold_threads)
		pthread_cond_wait(&s->pause_cond, &s->pause_lock);
	pthread_mutex_unlock(&s->pause_lock);
}

void srv_fold_resume(struct srv *s)
{
	pthread_mutex_lock(&s->pause_lock);
	atomic_store(&s->pause_req, false);
	pthread_cond_broadcast(&s->pause_cond);
	pthread_mutex_unlock(&s->pause_lock);
}

static void *fold_main(void *arg)
{
	struct srv_fold_thread *ft = arg;
	const uint64_t spin_ns = (uint64_t)ft->srv->cfg.spin_us * 1000u;
	uint64_t idle_since = 0;

	if (ft->srv->cfg.pin) {
		cpu_set_t set;
		long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
		CPU_ZERO(&set);
		CPU_SET((int)(ft->idx % (unsigned)(ncpu > 0 ? ncpu : 1)), &set);
		if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set))
			log_warn("fold thread %u: cannot pin", ft->idx);
	}
	while (!atomic_load_explicit(&ft->srv->stop, memory_order_relaxed)) {
		int work = 0;

		if (atomic_load_explicit(&ft->mail_pending, memory_order_acquire))
			srv_fold_mail(ft);
		if (atomic_load_explicit(&ft->srv->pause_req, memory_order_relaxed))
			fold_park(ft);
		/* a clock read per round, only under an authority: a fold
		 * started here ends well before etcd could give the rank away */
		if (!srv_may_fold(ft->srv)) {
			fold_fence(ft);
			continue;
		}
		if (ft->fenced)
			fold_unfence(ft);
		work += cqs_poll(ft);
		/* busy: the clock only every 1024 rounds; an idle thread wakes at
		 * least every second (fold_sleep), so no tick is late by more */
		if (work && (++ft->loops & 1023u)) {
			idle_since = 0;
			continue;
		}
		uint64_t now = rdmaps__now_ns();
		if (now - ft->last_ka >= KEEPALIVE_NS) {
			ft->last_ka = now;
			keepalive(ft);
		}
		if (work) {
			credits_flush_all(ft); /* busy for 1024 rounds: lazy credits out */
			idle_since = 0;
			continue;
		}
		if (!idle_since)
			idle_since = now;
		else if (now - idle_since >= CREDIT_IDLE_NS)
			credits_flush_all(ft); /* the pushes stopped: tell what folded */
		if (now - idle_since < spin_ns) {
			rdmaps__cpu_relax();
			continue;
		}
		credits_flush_all(ft);
		fold_sleep(ft);
		idle_since = 0;
	}
	/* answer a hand-over that raced shutdown so the listener never hangs */
	if (atomic_load(&ft->mail_pending))
		srv_fold_mail(ft);
	return NULL;
}

int srv_fold_start(struct srv *s)
{
	s->ft = calloc(s->cfg.fold_threads, sizeof(*s->ft));
	if (!s->ft)
		return RDMAPS_ENOMEM;
	for (unsigned i = 0; i < s->cfg.fold_threads; i++) {
		struct srv_fold_thread *ft = &s->ft[i];
		ft->srv = s;
		ft->idx = i;
		pthread_mutex_init(&ft->mail_lock, NULL);
		pthread_cond_init(&ft->mail_cond, NULL);
		ft->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
		ft->channels = calloc((size_t)s->ndev, sizeof(*ft->channels));
		/* once, here: a group is at most the ring, and the fold path
		 * allocates nothing */
		ft->stage = aligned_alloc(RDMAPS_CHUNK_ALIGN, srv_stage_bytes(&s->cfg));
		/* a place per connection it could ever hold at once (16-bit in
		 * a wr_id, and --max-workers is at most 65536) */
		ft->nplaces = s->cfg.max_workers;
		ft->place_conn = calloc(ft->nplaces, sizeof(*ft->place_conn));
		ft->place_gen = calloc(ft->nplaces, sizeof(*ft->place_gen));
		if (ft->wake_fd < 0 || !ft->channels || !ft->stage || !ft->place_conn ||
		    !ft->place_gen)
			return RDMAPS_ENOMEM;
		for (int d = 0; d < s->ndev; d++) {
			ft->channels[d] = ibv_create_comp_channel(s->devs[d]);
			if (!ft->channels[d]) {
				log_error("fold thread %u: cannot create a completion channel", i);
				return RDMAPS_EVERBS;
			}
			/* drained in a loop after poll(): must not block */
			fcntl(ft->channels[d]->fd, F_SETFL,
			      fcntl(ft->channels[d]->fd, F_GETFL) | O_NONBLOCK);
		}
		if (pthread_create(&ft->thread, NULL, fold_main, ft))
			return RDMAPS_ESYS;
	}
	return 0;
}

void srv_fold_join(struct srv *s)
{

	if (!s->ft)
		return;
	atomic_store(&s->stop, true);
	for (unsigned i = 0; i < s->cfg.fold_threads; i++) {
		struct srv_fold_thread *ft = &s->ft[i];
		if (!ft->thread)
			continue;
		srv_fold_wake(ft);
		pthread_join(ft->thread, NULL);
		ft->thread = 0;
	}
}

void srv_fold_stop(struct srv *s)
{
	if (!s->ft)
		return;
	srv_fold_join(s);
	for (unsigned i = 0; i < s->cfg.fold_threads; i++) {
		struct srv_fold_thread *ft = &s->ft[i];
		srv_cq_fini(ft); /* before the channels their events go to */
		free(ft->place_conn);
		free(ft->place_gen);
		for (int d = 0; ft->channels && d < s->ndev; d++)
			if (ft->channels[d])
				ibv_destroy_comp_channel(ft->channels[d]);
		free(ft->channels);
		if (ft->wake_fd > 0)
			close(ft->wake_fd);
		free(ft->conns);
		free(ft->stage);
		pthread_mutex_destroy(&ft->mail_lock);
		pthread_cond_destroy(&ft->mail_cond);
	}
	free(s->ft);
	s->ft = NULL;
}
