/*
 * resume.c -- what each closed connection folded, for the worker that
 * comes back (docs/durability.md, "Exactly once").
 *
 * A connection that breaks leaves the worker unsure which of its staged
 * pushes were folded: the server folds what reached it (conn_drain), and
 * the credit saying so may never arrive. When a connection is torn down,
 * after its fold thread folded or refused all it staged, its id, the first
 * seq not folded (every seq below was folded or refused, none at or above
 * ever will be) and its count of refused slots are recorded here. The
 * worker, reconnected, asks with RDMAPS_MSG_RESUME and settles its pushes
 * by that seq. Records live in the store, so checkpoints keep them and a
 * server restarted from the checkpoint written at a clean stop still
 * answers for the connections it had.
 *
 * A ring of the latest records: a worker that waits for more than `cap`
 * other disconnects is told "unknown" (RDMAPS_ENOENT). Control path only:
 * one mutex, a linear search.
 */
#include <stdlib.h>
#include <string.h>

#include "server.h"

int srv_resume_init(struct srv_resume *r, uint32_t cap)
{
	memset(r, 0, sizeof(*r));
	r->rec = calloc(cap, sizeof(*r->rec));
	if (!r->rec)
		return RDMAPS_ENOMEM;
	r->cap = cap;
	pthread_mutex_init(&r->lock, NULL);
	return 0;
}

void srv_resume_fini(struct srv_resume *r)
{
	if (!r->rec)
		return;
	free(r->rec);
	r->rec = NULL;
	pthread_mutex_destroy(&r->lock);
}

void srv_resume_clear(struct srv_resume *r)
{
	pthread_mutex_lock(&r->lock);
	memset(r->rec, 0, r->cap * sizeof(*r->rec));
	r->n = r->next = 0;
	pthread_mutex_unlock(&r->lock);
}

void srv_resume_record(struct srv_resume *r, const struct srv_closed *c)
{
	if (!c->conn_id)
		return;
	pthread_mutex_lock(&r->lock);
	r->rec[r->next] = *c;
	r->next = (r->next + 1) % r->cap;
	if (r->n < r->cap)
		r->n++;
	pthread_mutex_unlock(&r->lock);
}

bool srv_resume_find(struct srv_resume *r, uint64_t conn_id, struct srv_closed *out)
{
	bool found = false;

	if (!conn_id)
		return false;
	pthread_mutex_lock(&r->lock);
	for (uint32_t i = 0; i < r->n && !found; i++)
		if (r->rec[i].conn_id == conn_id) {
			*out = r->rec[i];
			found = true;
		}
	pthread_mutex_unlock(&r->lock);
	return found;
}

uint32_t srv_resume_list(struct srv_resume *r, struct srv_closed *out, uint32_t max)
{
	uint32_t n;

	pthread_mutex_lock(&r->lock);
	/* oldest first, so that adding them back in order keeps the ring's order */
	n = r->n < max ? r->n : max;
	for (uint32_t i = 0; i < n; i++)
		out[i] = r->rec[(r->next + r->cap - n + i) % r->cap];
	pthread_mutex_unlock(&r->lock);
	return n;
}
