/*
 * handover.c -- connections joining and leaving a fold thread. The
 * listener owns a connection; the fold thread that polls it learns of it
 * through a small mailbox (a mutex, a condition and the thread's eventfd),
 * used on connect and disconnect only, never on the data path: register
 * (a place in the thread's table and the tag its work requests carry),
 * attach (live: polled, and what completed before handled in order), and
 * detach (what it staged folded, its account settled with the backups, its
 * place freed so late completions match nobody). The listener waits for
 * the answer; the fold thread answers between rounds (fold.c).
 */
#include <stdlib.h>

#include "log.h"
#include "server.h"

/*
 * A connection leaving (its worker closed, or it failed): fold what it
 * staged before it went (conn_wc, broken). Its completions are in the
 * thread's CQs among everyone's: take them all until the CQs are empty.
 */
static void conn_drain(struct srv_conn *c)
{
	struct srv_fold_thread *ft = c->ft;
	uint32_t n = atomic_load_explicit(&ft->ncqs, memory_order_acquire);

	c->broken = true;
	/* a CQ holds at most cap completions: once that many are taken (or
	 * it is empty), every one that was there is, though others go on
	 * pushing */
	for (uint32_t i = 0; i < n; i++) {
		uint32_t taken = 0;
		int k;
		while ((k = srv_cq_poll(ft, &ft->cqs[i])) > 0 && (taken += (uint32_t)k) < ft->cqs[i].cap)
			;
	}
	srv_open_publish(&ft->open);
	if (ft->repl)
		srv_repl_flush(ft);
}

/* Give c a place in the table and its tag; none left leaves wr_tag 0. */
static void place_take(struct srv_fold_thread *ft, struct srv_conn *c)
{
	for (uint32_t k = 0; k < ft->nplaces; k++) {
		uint32_t p = (ft->place_next + k) % ft->nplaces;
		if (ft->place_conn[p])
			continue;
		ft->place_next = p + 1;
		ft->place_conn[p] = c;
		c->place = p;
		/* a generation of 0 is skipped: a tag is never 0, which stands
		 * for a connection not registered */
		if (!++ft->place_gen[p])
			ft->place_gen[p] = 1;
		c->wr_tag = SRV_WR_TAG(p, ft->place_gen[p]);
		return;
	}
}

/* What completed before c was live, in order; a worker's later without a
 * lease (fold_fence lets them go once it is back); a primary's records
 * and opens now, as fold_fence applies them (its lease fences them). */
void srv_conn_early(struct srv_conn *c)
{
	if (!c->nearly || (!c->rstore && !srv_may_fold(c->srv)))
		return;
	for (uint32_t i = 0; i < c->nearly; i++)
		srv_conn_wc(c, &c->early[i]);
	c->nearly = 0;
}

/* Make c live: into the polled set, and what came before, handled now. */
static void conn_live(struct srv_fold_thread *ft, struct srv_conn *c)
{
	if (ft->nconns == ft->cap) {
		uint32_t cap = ft->cap ? ft->cap * 2 : 16;
		struct srv_conn **n = realloc(ft->conns, cap * sizeof(*n));
		if (n) {
			ft->conns = n;
			ft->cap = cap;
		}
	}
	if (ft->nconns == ft->cap) {
		srv_conn_fail(c, "out of memory attaching", IBV_WC_GENERAL_ERR);
		return;
	}
	c->index = ft->nconns;
	ft->conns[ft->nconns++] = c;
	c->live = true;
	srv_conn_early(c);
	srv_open_publish(&ft->open);
	if (ft->repl)
		srv_repl_flush(ft);
	if (!c->broken)
		srv_credit_maybe(c);
}

void srv_fold_mail(struct srv_fold_thread *ft)
{
	pthread_mutex_lock(&ft->mail_lock);
	if (ft->mail_reg) {
		place_take(ft, ft->mail_reg);
		ft->mail_reg = NULL;
	}
	if (ft->mail_add) {
		conn_live(ft, ft->mail_add);
		ft->mail_add = NULL;
	}
	if (ft->mail_del) {
		struct srv_conn *c = ft->mail_del;
		if (c->live && !c->rstore && !srv_may_fold(ft->srv)) {
			/* no lease: what it staged stays unfolded, and its
			 * account (folded_seq) says so: a worker resuming
			 * elsewhere is told exactly what folded */
			c->broken = true;
			log_warn("connection %016llx left while this server held no lease: "
				 "what it staged since is not folded (its account says so)",
				 (unsigned long long)c->conn_id);
		} else if (c->live) {
			conn_drain(c);
		}
		if (c->live) {
			if (ft->repl)
				srv_repl_settle(ft, c); /* its account final */
			ft->conns[c->index] = ft->conns[--ft->nconns];
			ft->conns[c->index]->index = c->index;
			c->live = false;
		}
		/* from here its late completions match no connection */
		if (c->wr_tag && ft->place_conn[c->place] == c)
			ft->place_conn[c->place] = NULL;
		ft->mail_del = NULL;
	}
	ft->mail_done = true;
	atomic_store_explicit(&ft->mail_pending, false, memory_order_release);
	pthread_cond_broadcast(&ft->mail_cond);
	pthread_mutex_unlock(&ft->mail_lock);
}

static void mail_post(struct srv_fold_thread *ft, struct srv_conn *reg, struct srv_conn *add,
		      struct srv_conn *del)
{
	pthread_mutex_lock(&ft->mail_lock);
	ft->mail_reg = reg;
	ft->mail_add = add;
	ft->mail_del = del;
	ft->mail_done = false;
	atomic_store_explicit(&ft->mail_pending, true, memory_order_release);
	srv_fold_wake(ft);
	while (!ft->mail_done)
		pthread_cond_wait(&ft->mail_cond, &ft->mail_lock);
	pthread_mutex_unlock(&ft->mail_lock);
}

void srv_fold_register(struct srv_fold_thread *ft, struct srv_conn *c)
{
	mail_post(ft, c, NULL, NULL);
}

void srv_fold_attach(struct srv_fold_thread *ft, struct srv_conn *c)
{
	mail_post(ft, NULL, c, NULL);
}

void srv_fold_detach(struct srv_fold_thread *ft, struct srv_conn *c)
{
	mail_post(ft, NULL, NULL, c);
}

