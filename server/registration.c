/*
 * registration.c -- what a worker's NIC can reach in this server's memory,
 * and how many times each page is registered to make that so.
 *
 * Two schemes, chosen per device (--registration, docs/design.md "Memory
 * and access rights"):
 *
 *  shared      one protection domain per device. Each tensor is registered
 *              once, REMOTE_READ only, on the first lookup from any worker.
 *              Each worker's staging ring is registered with no remote
 *              access at all, and reached through a type-2 memory window
 *              bound to that worker's queue pair with REMOTE_WRITE over
 *              exactly the ring: the NIC refuses the window's rkey on any
 *              other QP, the ring's MR rkey from anyone, and a write past
 *              the window's end. Locked memory is one model plus a ring per
 *              worker, whatever the number of workers.
 *  per-worker  a protection domain per connection, its ring REMOTE_WRITE
 *              and each tensor it reads registered again in it (what every
 *              device can do; W workers pin W copies of the model's pages'
 *              registrations).
 *
 * auto (the default) takes shared where the device has type-2 memory
 * windows (IBV_DEVICE_MEM_WINDOW_TYPE_2A or 2B) and says so in the log
 * either way. Devices are set up by the listener thread on the first
 * connection through them; tensors are registered from the fold threads'
 * control handling, under the device's lock (never on the data path).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "log.h"
#include "optimizer.h"
#include "server.h"

#define MW_ACCESS IBV_ACCESS_REMOTE_WRITE

static const char *mode_name(bool shared)
{
	return shared ? "shared (the model registered once; rings through memory windows)"
		      : "per-worker (a protection domain and registrations per worker)";
}

/* The device's entry, made on first use (listener thread only). */
static struct srv_dev *dev_get(struct srv *s, struct ibv_context *verbs, int *rc)
{
	struct ibv_device_attr da;
	struct srv_dev *d;
	bool mw2;

	for (unsigned i = 0; i < s->nregdev; i++)
		if (s->regdev[i].verbs == verbs)
			return &s->regdev[i];
	if (s->nregdev == SRV_MAX_DEVS) {
		*rc = RDMAPS_ELIMIT;
		return NULL;
	}
	if (ibv_query_device(verbs, &da)) {
		*rc = RDMAPS_EVERBS;
		return NULL;
	}
	mw2 = rdmaps__has_mw2(&da);
	d = &s->regdev[s->nregdev];
	memset(d, 0, sizeof(*d));
	d->verbs = verbs;
	d->shared = s->cfg.registration == SRV_REG_SHARED ||
		    (s->cfg.registration == SRV_REG_AUTO && mw2);
	if (d->shared && !mw2) {
		log_error("device %s has no type-2 memory windows: --registration shared cannot "
			  "keep workers' rings apart on it (use auto or per-worker)",
			  ibv_get_device_name(verbs->device));
		*rc = RDMAPS_ENOTSUP;
		return NULL;
	}
	if (d->shared) {
		d->pd = ibv_alloc_pd(verbs);
		d->tensor_mr = calloc(s->store.max, sizeof(*d->tensor_mr));
		if (!d->pd || !d->tensor_mr) {
			if (d->pd)
				ibv_dealloc_pd(d->pd);
			free(d->tensor_mr);
			*rc = d->pd ? RDMAPS_ENOMEM : RDMAPS_EVERBS;
			return NULL;
		}
	}
	pthread_mutex_init(&d->lock, NULL);
	__atomic_store_n(&s->nregdev, s->nregdev + 1, __ATOMIC_RELEASE);
	if (d->shared || s->cfg.registration == SRV_REG_PER_WORKER)
		log_info("device %s: registration %s", ibv_get_device_name(verbs->device),
			 mode_name(d->shared));
	else
		log_warn("device %s has no type-2 memory windows (max_mw %d): registration %s; locked "
			 "memory grows with workers x model (--registration)",
			 ibv_get_device_name(verbs->device), da.max_mw, mode_name(false));
	return d;
}

int srv_reg_conn(struct srv *s, struct srv_conn *c, struct ibv_context *verbs)
{
	size_t ring = (size_t)c->slots * c->slot_size;
	int rc = 0;
	struct srv_dev *d = dev_get(s, verbs, &rc);

	if (!d)
		return rc;
	c->dev = d;
	/* a primary replicating into this server writes where no worker may:
	 * its registrations live in a PD of its own, whatever the scheme */
	/* so does a worker of a rank taken over: the model it reads is a
	 * replica store's, whose tensor ids the device's table does not know */
	if (!d->shared || c->rstore || c->store != &s->store) {
		/* a PD of its own: rkeys it learns or forges for other workers'
		 * rings mean nothing on its QP */
		c->pd = ibv_alloc_pd(verbs);
		if (!c->pd)
			return RDMAPS_EVERBS;
		c->own_pd = true;
		rc = rdmaps__reg_mr(c->pd, c->staging, ring,
				    IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE, &c->staging_mr);
		if (!rc)
			atomic_fetch_add(&s->reg_bytes, ring);
		return rc;
	}
	c->pd = d->pd;
	/* no remote access on the MR itself: only the window grants it */
	rc = rdmaps__reg_mr(c->pd, c->staging, ring, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_MW_BIND,
			    &c->staging_mr);
	if (rc)
		return rc;
	atomic_fetch_add(&s->reg_bytes, ring);
	return 0;
}

int srv_reg_window(struct srv *s, struct srv_conn *c)
{
	if (c->own_pd)
		return 0;
	/* after the QP: at a process's exit (kill -9 included) the kernel
	 * frees verbs objects newest first, and rxe's destroy_qp waits forever
	 * for a window still bound to it */
	c->staging_mw = ibv_alloc_mw(c->pd, IBV_MW_TYPE_2);
	if (!c->staging_mw) {
		log_error("ibv_alloc_mw: %s", strerror(errno));
		return RDMAPS_EVERBS;
	}
	atomic_fetch_add(&s->reg_mws, 1);
	/* the key the bind will give it, told to the worker in the welcome */
	c->staging_rkey = ibv_inc_rkey(c->staging_mw->rkey);
	return 0;
}

uint32_t srv_reg_staging_rkey(const struct srv_conn *c)
{
	return c->staging_mw ? c->staging_rkey : c->staging_mr->rkey;
}

int srv_reg_bind(struct srv_conn *c)
{
	struct ibv_send_wr wr = { 0 }, *bad;

	if (!c->staging_mw)
		return 0;
	/* unsignaled: it takes an SQ entry of its own (conn_build asks one more),
	 * and a failure still completes, with an error, and fails the QP */
	wr.wr_id = SRV_WR(c, SRV_SEND_BIND, 0);
	wr.opcode = IBV_WR_BIND_MW;
	wr.bind_mw.mw = c->staging_mw;
	wr.bind_mw.rkey = c->staging_rkey;
	wr.bind_mw.bind_info = (struct ibv_mw_bind_info){
		.mr = c->staging_mr,
		.addr = (uintptr_t)c->staging,
		.length = (size_t)c->slots * c->slot_size,
		.mw_access_flags = MW_ACCESS,
	};
	if (ibv_post_send(c->qp, &wr, &bad)) {
		log_error("binding the staging window: %s", strerror(errno));
		return RDMAPS_EVERBS;
	}
	return 0;
}

int srv_reg_expose(struct srv_conn *c, struct srv_tensor *t)
{
	struct srv_dev *d = c->dev;
	int rc = 0;

	if (c->tensor_mr[t->id])
		return 0;
	if (c->own_pd) {
		rc = rdmaps__reg_mr(c->pd, t->mem, t->mem_len, IBV_ACCESS_REMOTE_READ,
				    &c->tensor_mr[t->id]);
		if (!rc)
			atomic_fetch_add(&c->srv->reg_bytes, t->mem_len);
		return rc;
	}
	pthread_mutex_lock(&d->lock);
	if (!d->tensor_mr[t->id]) {
		rc = rdmaps__reg_mr(d->pd, t->mem, t->mem_len, IBV_ACCESS_REMOTE_READ,
				    &d->tensor_mr[t->id]);
		if (!rc)
			atomic_fetch_add(&c->srv->reg_bytes, t->mem_len);
	}
	pthread_mutex_unlock(&d->lock);
	if (!rc)
		c->tensor_mr[t->id] = d->tensor_mr[t->id]; /* borrowed: the device owns it */
	return rc;
}

int srv_reg_snapshot(struct srv_conn *c, size_t len)
{
	int rc;

	if (c->snap)
		return 0;
	len = rdmaps__round_up(len, 4096);
	/* in c's PD, as its tensors are: with the shared scheme any worker on
	 * the device could READ it with a forged key, as it could the model
	 * it copies; never written remotely */
	c->snap = aligned_alloc(4096, len);
	if (!c->snap)
		return RDMAPS_ENOMEM;
	if ((rc = rdmaps__reg_mr(c->pd, c->snap, len, IBV_ACCESS_REMOTE_READ, &c->snap_mr))) {
		free(c->snap);
		c->snap = NULL;
		return rc;
	}
	atomic_fetch_add(&c->srv->reg_bytes, len);
	return 0;
}

void srv_reg_conn_free(struct srv_conn *c)
{
	struct srv *s = c->srv;

	if (c->snap_mr) {
		atomic_fetch_sub(&s->reg_bytes, c->snap_mr->length);
		ibv_dereg_mr(c->snap_mr);
	}
	free(c->snap);

	/* a window must go before the MR it is bound to can be deregistered */
	if (c->staging_mw) {
		ibv_dealloc_mw(c->staging_mw);
		atomic_fetch_sub(&s->reg_mws, 1);
	}
	if (c->own_pd)
		for (uint32_t i = 0; c->tensor_mr && i < s->store.max; i++)
			if (c->tensor_mr[i]) {
				atomic_fetch_sub(&s->reg_bytes, c->tensor_mr[i]->length);
				ibv_dereg_mr(c->tensor_mr[i]);
			}
	if (c->staging_mr) {
		atomic_fetch_sub(&s->reg_bytes, c->staging_mr->length);
		ibv_dereg_mr(c->staging_mr);
	}
}

void srv_reg_conn_free_pd(struct srv_conn *c)
{
	if (c->own_pd && c->pd)
		ibv_dealloc_pd(c->pd);
	c->pd = NULL;
}

void srv_reg_fini(struct srv *s)
{
	for (unsigned i = 0; i < s->nregdev; i++) {
		struct srv_dev *d = &s->regdev[i];
		for (uint32_t k = 0; d->tensor_mr && k < s->store.max; k++)
			if (d->tensor_mr[k]) {
				atomic_fetch_sub(&s->reg_bytes, d->tensor_mr[k]->length);
				ibv_dereg_mr(d->tensor_mr[k]);
			}
		free(d->tensor_mr);
		if (d->pd)
			ibv_dealloc_pd(d->pd);
		pthread_mutex_destroy(&d->lock);
	}
	s->nregdev = 0;
}

/* The process's memory in transparent huge pages (smaps_rollup: the kernel
 * sums it; a stats request is rare, never on the data path). */
static uint64_t anon_huge_bytes(void)
{
	char line[128];
	unsigned long long kib = 0;
	FILE *f = fopen("/proc/self/smaps_rollup", "r");

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "AnonHugePages: %llu kB", &kib) == 1)
			break;
	fclose(f);
	return (uint64_t)kib << 10;
}

uint64_t srv_reg_conn_pinned(const struct srv_conn *c)
{
	uint64_t b = (c->staging_mr ? c->staging_mr->length : 0) + (c->bufs_mr ? c->bufs_mr->length : 0) +
		     (c->snap_mr ? c->snap_mr->length : 0);

	/* tensors registered in its own PD; shared ones belong to the device */
	for (uint32_t i = 0; c->own_pd && c->tensor_mr && i < c->srv->store.max; i++)
		if (c->tensor_mr[i])
			b += c->tensor_mr[i]->length;
	return b;
}

void srv_reg_stats(struct srv *s, struct rdmaps_server_stats *out)
{
	uint64_t mrs = 0, shared = 0;

	pthread_mutex_lock(&s->conns_lock);
	for (struct srv_conn *c = s->conns; c; c = c->next) {
		mrs += (c->staging_mr != NULL) + (c->bufs_mr != NULL) + (c->snap_mr != NULL);
		for (uint32_t i = 0; c->own_pd && c->tensor_mr && i < s->store.max; i++)
			mrs += c->tensor_mr[i] != NULL;
	}
	pthread_mutex_unlock(&s->conns_lock);
	/* the devices' table only grows, from the listener thread */
	for (unsigned i = 0; i < __atomic_load_n(&s->nregdev, __ATOMIC_ACQUIRE); i++) {
		struct srv_dev *d = &s->regdev[i];
		if (!d->shared)
			continue;
		shared++;
		pthread_mutex_lock(&d->lock);
		for (uint32_t k = 0; k < s->store.max; k++)
			mrs += d->tensor_mr[k] != NULL;
		pthread_mutex_unlock(&d->lock);
	}
	out->shared_devices = shared;
	out->memory_regions = mrs;
	out->memory_windows = atomic_load(&s->reg_mws);
	out->registered_bytes = atomic_load(&s->reg_bytes);
	out->staging_bytes = atomic_load(&s->staging_used);
	out->staging_budget = s->cfg.staging_budget;
	out->huge_page_bytes = anon_huge_bytes();
}
