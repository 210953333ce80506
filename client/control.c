/*
 * control.c -- the worker's side of the control plane: one request at a
 * time per server over SEND/RECV, replies matched by req_id and checked
 * before use. A tensor's catalog entry (which server holds which chunks, at
 * what address, with what rkey) is built here from the placement and each
 * server's reply, at declaration or lookup.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "client.h"
#include "error.h"
#include "log.h"
#include "placement.h"

int cl_rpc(struct cl_conn *k, void *msg, uint32_t len, uint16_t want_type, void *reply,
	   uint32_t reply_len)
{
	rdmaps_client *c = k->c;
	struct rdmaps_msg_hdr *h = msg;
	struct rdmaps_msg_hdr rh;
	uint64_t deadline;
	uint16_t type;
	int rc;

	if (k->broken && !k->sa.host[0])
		return k->broken;
	if (k->broken && (rc = cl_reconnect(c)))
		return rc;
	deadline = rdmaps__now_ns() + (uint64_t)c->timeout_ms * 1000000u;
	h->req_id = ++k->req_id;
	memcpy(cl_send_buf(k), msg, len);
	{
		struct ibv_sge sge = { .addr = (uintptr_t)cl_send_buf(k), .length = len,
				       .lkey = k->ctl_mr->lkey };
		struct ibv_send_wr wr = { .wr_id = WR_ID(WR_CTRL_SEND, k->idx, 0), .sg_list = &sge,
					  .num_sge = 1, .opcode = IBV_WR_SEND,
					  .send_flags = IBV_SEND_SIGNALED }, *bad;
		while (k->sq_outstanding >= CL_SQ_DEPTH && !k->broken)
			cl_progress(c);
		if ((rc = ibv_post_send(k->qp, &wr, &bad)))
			return rdmaps__from_errno(rc);
		k->sq_outstanding++;
	}
	k->reply_ready = false;
	for (;;) {
		cl_progress(c);
		if (k->broken)
			return k->broken;
		if (k->reply_ready) {
			k->reply_ready = false;
			if ((rc = rdmaps__msg_check(k->reply, k->reply_len, &type)))
				return rc;
			memcpy(&rh, k->reply, sizeof(rh));
			if (rh.req_id != k->req_id)
				continue; /* a stale reply to an abandoned request */
			break;
		}
		cl_check_cm(k);
		if (rdmaps__now_ns() > deadline)
			return RDMAPS_ETIMEDOUT;
	}
	if (type == RDMAPS_MSG_STATUS_REPLY) {
		struct rdmaps_msg_status_reply sr;
		memcpy(&sr, k->reply, sizeof(sr));
		if ((rc = rdmaps__wire_status(sr.status)) || want_type != RDMAPS_MSG_STATUS_REPLY)
			return rc ? rc : RDMAPS_EPROTO;
		return 0;
	}
	if (type != want_type || k->reply_len != reply_len)
		return RDMAPS_EPROTO;
	memcpy(reply, k->reply, reply_len);
	return 0;
}

/* Floats in the run of chunks [first, first+count) of a tensor. */
static uint64_t run_elems(uint64_t length, uint32_t ce, uint32_t first, uint32_t count)
{
	uint64_t end = (uint64_t)(first + count) * ce;
	return (end < length ? end : length) - (uint64_t)first * ce;
}

static rdmaps_tensor *tensor_alloc(rdmaps_client *c, const char *name, uint64_t length,
				   uint32_t ce, const struct rdmaps__range *r, uint32_t nr)
{
	uint32_t nparts = 0;
	rdmaps_tensor *t;

	for (uint32_t k = 0; k < nr; k++)
		nparts += r[k].count > 0;
	t = calloc(1, sizeof(*t) + nparts * sizeof(t->part[0]));
	if (!t)
		return NULL;
	t->c = c;
	t->length = length;
	t->chunk_elems = ce; /* the server's chunk size, or a sparse table's row */
	t->nchunks = rdmaps__chunk_total(length, t->chunk_elems);
	t->stride = rdmaps__chunk_stride(t->chunk_elems);
	snprintf(t->name, sizeof(t->name), "%s", name);
	for (uint32_t k = 0; k < nr; k++)
		if (r[k].count)
			t->part[t->nparts++] = (struct cl_part){
				.conn = r[k].server, .first = r[k].first, .nchunks = r[k].count };
	return t;
}

/* Take the server's word for one part, after checking it is the part we mean. */
static int part_from_reply(struct cl_part *p, const struct rdmaps_msg_tensor_reply *r,
			   uint64_t want_len, uint32_t ce)
{
	if (r->status)
		return r->status < 0 ? r->status : RDMAPS_EPROTO;
	if (r->length != want_len)
		return RDMAPS_EEXIST; /* same name, another shape */
	if (r->chunk_elems != ce || r->nchunks != p->nchunks || r->cons.mode > RDMAPS_SSP)
		return RDMAPS_EPROTO;
	p->tensor_id = r->tensor_id;
	/* two copies: both inside what the server registered, after copy 0 */
	if ((r->copy_offset || r->index_addr) &&
	    (!r->copy_offset || !r->index_addr || r->cons.mode != RDMAPS_ASP ||
	     r->copy_offset % RDMAPS_CHUNK_ALIGN || r->index_addr % sizeof(uint64_t)))
		return RDMAPS_EPROTO;
	/* a 16-bit copy: its chunks 64 B apart, each holding a full chunk */
	if (r->pull_format > RDMAPS_FMT_FP16 ||
	    (r->pull_format && (!r->half_addr || r->half_addr % RDMAPS_CHUNK_ALIGN ||
				r->half_stride % RDMAPS_CHUNK_ALIGN ||
				r->half_stride < RDMAPS_CHUNK_HDR + 2 * (uint64_t)ce)))
		return RDMAPS_EPROTO;
	p->pull_fmt = r->pull_format;
	p->half_addr = r->half_addr;
	p->half_stride = r->half_stride;
	p->raddr = r->remote_addr;
	p->rkey = r->rkey;
	p->copy_off = r->copy_offset;
	p->index_addr = r->index_addr;
	/* ASP in one copy: READ from the checksum on (chunk.h) */
	p->skip = !p->copy_off && r->cons.mode == RDMAPS_ASP ? RDMAPS_CHUNK_SKIP : 0;
	return 0;
}

static int lookup_once(struct cl_conn *k, const char *name, struct rdmaps_msg_tensor_reply *r)
{
	struct rdmaps_msg_lookup m = { 0 };

	rdmaps__msg_init(&m.hdr, RDMAPS_MSG_LOOKUP, sizeof(m), 0);
	snprintf(m.name, sizeof(m.name), "%s", name);
	return cl_rpc(k, &m, sizeof(m), RDMAPS_MSG_TENSOR_REPLY, r, sizeof(*r));
}

/* A part whose creator is still staging its initial values: wait for it. */
static int wait_ready(struct cl_conn *k, const char *name, struct rdmaps_msg_tensor_reply *r)
{
	uint64_t deadline = rdmaps__now_ns() + (uint64_t)k->c->timeout_ms * 1000000u;
	int rc = 0;

	while (!r->ready) {
		struct timespec ts = { 0, 1000000 };
		if (rdmaps__now_ns() > deadline)
			return RDMAPS_ETIMEDOUT;
		nanosleep(&ts, NULL);
		if ((rc = lookup_once(k, name, r)))
			return rc;
	}
	return 0;
}

static int seal(struct cl_conn *k, uint32_t tensor_id)
{
	struct rdmaps_msg_seal m = { 0 };
	struct rdmaps_msg_status_reply r;

	rdmaps__msg_init(&m.hdr, RDMAPS_MSG_SEAL, sizeof(m), 0);
	m.tensor_id = tensor_id;
	m.last_seq = k->next_seq - 1;
	return cl_rpc(k, &m, sizeof(m), RDMAPS_MSG_STATUS_REPLY, &r, sizeof(r));
}

/* The tensor's pull format: every server's part must have the same. */
static int tensor_pull_fmt(rdmaps_tensor *t)
{
	for (uint32_t p = 1; p < t->nparts; p++)
		if (t->part[p].pull_fmt != t->part[0].pull_fmt)
			return RDMAPS_EPROTO;
	t->pull_fmt = t->nparts ? t->part[0].pull_fmt : 0;
	return 0;
}

static void tensor_keep(rdmaps_client *c, rdmaps_tensor *t)
{
	t->next = c->tensors;
	c->tensors = t;
}

/*
 * Declare part p on its server; stage initial values if we created it.
 * While another worker initialises it, declare again (not LOOKUP) until it
 * is ready: if that creator dies before sealing, the server hands the
 * tensor to the next DECLARE, and a worker that only looked would wait for
 * a creator that is gone.
 */
static int declare_part(rdmaps_tensor *t, uint32_t p, struct rdmaps_msg_declare *m,
			const float *init)
{
	rdmaps_client *c = t->c;
	struct cl_part *pt = &t->part[p];
	struct cl_conn *k = &c->conn[pt->conn];
	uint64_t len = run_elems(t->length, t->chunk_elems, pt->first, pt->nchunks);
	uint64_t deadline = rdmaps__now_ns() + (uint64_t)c->timeout_ms * 1000000u;
	struct rdmaps_msg_tensor_reply r;
	int rc;

	m->length = len;
	for (;;) {
		struct timespec ts = { 0, 1000000 };
		if ((rc = cl_rpc(k, m, sizeof(*m), RDMAPS_MSG_TENSOR_REPLY, &r, sizeof(r))))
			return rc;
		if ((rc = part_from_reply(pt, &r, len, t->chunk_elems)))
			return rc;
		t->cons = r.cons;
		t->clock = r.clock;
		if (r.created && init) {
			rdmaps_op *op;
			if ((rc = cl_op_start_parts(c, OP_PUSH, t, (float *)(uintptr_t)init,
						    RDMAPS_PUSH_FOLDED, true, p, p + 1, &op)))
				return rc;
			if ((rc = cl_op_wait(op, c->timeout_ms)))
				return rc;
			return seal(k, pt->tensor_id);
		}
		if (r.ready)
			return 0;
		if (rdmaps__now_ns() > deadline)
			return RDMAPS_ETIMEDOUT;
		nanosleep(&ts, NULL);
	}
}

int rdmaps_declare(rdmaps_client *c, const struct rdmaps_tensor_desc *d, rdmaps_tensor **out)
{
	static const char *const opt_names[] = { "sgd", "momentum", "nesterov", "adagrad", "adam",
						 "adamw" };
	struct rdmaps__range r[RDMAPS_MAX_SERVERS];
	struct rdmaps_msg_declare m = { 0 };
	rdmaps_tensor *t;
	uint32_t ce;
	int rc = 0;

	if (!c || !d || !out || !d->name || !d->length)
		return RDMAPS_EINVAL;
	if (strlen(d->name) > RDMAPS_NAME_MAX || rdmaps__name_check(d->name, RDMAPS_NAME_MAX + 1))
		return RDMAPS_EINVAL;
	if ((unsigned)d->optimizer >= sizeof(opt_names) / sizeof(opt_names[0]))
		return RDMAPS_EINVAL;
	if (d->length / c->conn[0].chunk_elems >= UINT32_MAX)
		return RDMAPS_ERANGE;
	rdmaps__msg_init(&m.hdr, RDMAPS_MSG_DECLARE, sizeof(m), 0);
	m.init_value = d->init_value;
	m.flags = d->init ? RDMAPS_DECLARE_INIT_DATA : 0;
	if ((unsigned)d->pull_format > RDMAPS_FMT_FP16 || (d->pull_format && d->row_dim))
		return RDMAPS_EINVAL;
	m.flags |= (uint32_t)d->pull_format << RDMAPS_DECLARE_PULL_SHIFT;
	m.hyper = (struct rdmaps_wire_hyper){
		.lr = d->lr,
		.momentum = d->momentum,
		.beta1 = d->beta1,
		.beta2 = d->beta2,
		.eps = d->eps,
		.weight_decay = d->weight_decay,
	};
	snprintf(m.optimizer, sizeof(m.optimizer), "%s", opt_names[d->optimizer]);
	snprintf(m.name, sizeof(m.name), "%s", d->name);
	if ((unsigned)d->consistency > RDMAPS_SSP || d->aggregate_mean < 0 || d->aggregate_mean > 1)
		return RDMAPS_EINVAL;
	m.cons = (struct rdmaps_wire_consistency){
		.mode = (uint32_t)d->consistency,
		.staleness = d->staleness,
		.workers = d->workers,
		.mean = (uint32_t)d->aggregate_mean,
		.clip_norm = d->clip_norm,
	};

	if (d->row_dim && (d->length % d->row_dim || d->row_dim >= c->conn[0].chunk_elems))
		return RDMAPS_EINVAL;
	m.cons.row_dim = d->row_dim;
	ce = d->row_dim ? d->row_dim : c->conn[0].chunk_elems;
	rdmaps__place(d->name, rdmaps__chunk_total(d->length, ce), c->nconn, r);
	t = tensor_alloc(c, d->name, d->length, ce, r, c->nconn);
	if (!t)
		return RDMAPS_ENOMEM;
	for (uint32_t p = 0; p < t->nparts && !rc; p++)
		rc = declare_part(t, p, &m, d->init);
	if (!rc)
		rc = tensor_pull_fmt(t);
	if (rc) {
		free(t);
		return rc;
	}
	tensor_keep(c, t);
	*out = t;
	return 0;
}

int rdmaps_lookup(rdmaps_client *c, const char *name, rdmaps_tensor **out)
{
	struct rdmaps_msg_tensor_reply rep[RDMAPS_MAX_SERVERS];
	struct rdmaps__range r[RDMAPS_MAX_SERVERS];
	bool found[RDMAPS_MAX_SERVERS] = { false };
	uint64_t length = 0;
	uint32_t ce = c ? c->conn[0].chunk_elems : 0;
	rdmaps_tensor *t;
	int rc;

	if (!c || !name || !out || strlen(name) > RDMAPS_NAME_MAX ||
	    rdmaps__name_check(name, RDMAPS_NAME_MAX + 1))
		return RDMAPS_EINVAL;
	/* the parts' lengths add up to the tensor's; servers without one say ENOENT */
	for (uint32_t i = 0; i < c->nconn; i++) {
		rc = lookup_once(&c->conn[i], name, &rep[i]);
		if (rc == RDMAPS_ENOENT)
			continue;
		if (rc || (rc = wait_ready(&c->conn[i], name, &rep[i])))
			return rc;
		found[i] = true;
		length += rep[i].length;
		if (rep[i].cons.row_dim)
			ce = rep[i].cons.row_dim;
	}
	if (!length)
		return RDMAPS_ENOENT;
	rdmaps__place(name, rdmaps__chunk_total(length, ce), c->nconn, r);
	t = tensor_alloc(c, name, length, ce, r, c->nconn);
	if (!t)
		return RDMAPS_ENOMEM;
	for (uint32_t p = 0; p < t->nparts; p++) {
		struct cl_part *pt = &t->part[p];
		uint64_t want = run_elems(length, t->chunk_elems, pt->first, pt->nchunks);
		/* a part missing or of the wrong size: declared with another
		 * server count, or only partly declared */
		rc = found[pt->conn] ? part_from_reply(pt, &rep[pt->conn], want, t->chunk_elems)
				     : RDMAPS_ENOENT;
		if (rc) {
			log_warn("tensor %s: part on server %s does not match the placement for %u "
				 "servers", name, c->conn[pt->conn].name, c->nconn);
			free(t);
			return rc == RDMAPS_EEXIST ? RDMAPS_EPROTO : rc;
		}
	}
	t->cons = rep[t->part[0].conn].cons;
	t->clock = rep[t->part[0].conn].clock;
	if ((rc = tensor_pull_fmt(t))) {
		free(t);
		return rc;
	}
	tensor_keep(c, t);
	*out = t;
	return 0;
}

int cl_refresh_parts(rdmaps_client *c, struct cl_conn *k)
{
	for (rdmaps_tensor *t = c->tensors; t; t = t->next)
		for (uint32_t p = 0; p < t->nparts; p++) {
			struct cl_part *pt = &t->part[p];
			struct rdmaps_msg_tensor_reply r;
			uint64_t want;
			int rc;
			if (pt->conn != k->idx)
				continue;
			want = run_elems(t->length, t->chunk_elems, pt->first, pt->nchunks);
			if ((rc = lookup_once(k, t->name, &r)) || (rc = wait_ready(k, t->name, &r)) ||
			    (rc = part_from_reply(pt, &r, want, t->chunk_elems))) {
				log_error("tensor %s: server %s no longer has it (%s): restart it from a "
					  "checkpoint, or declare the tensor again",
					  t->name, k->name, rdmaps_strerror(rc));
				return rc;
			}
			t->clock = r.clock;
		}
	return 0;
}

uint64_t rdmaps_tensor_clock(const rdmaps_tensor *t)
{
	return t ? t->clock : 0;
}

int cl_server_stats(struct cl_conn *k, struct rdmaps_server_stats *out)
{
	struct rdmaps_msg_hdr m;
	struct rdmaps_msg_stats_reply r;
	int rc;

	rdmaps__msg_init(&m, RDMAPS_MSG_STATS, sizeof(m), 0);
	if ((rc = cl_rpc(k, &m, sizeof(m), RDMAPS_MSG_STATS_REPLY, &r, sizeof(r))))
		return rc;
	*out = r.stats;
	return 0;
}

int rdmaps_server_stats(rdmaps_client *c, struct rdmaps_server_stats *out)
{
	struct rdmaps_server_stats st;
	int rc;

	if (!c || !out)
		return RDMAPS_EINVAL;
	memset(out, 0, sizeof(*out));
	/* a cluster answers with the sums over its servers */
	for (uint32_t i = 0; i < c->nconn; i++) {
		if ((rc = cl_server_stats(&c->conn[i], &st)))
			return rc;
		uint64_t restored = out->restored_seq, epoch = out->epoch;
#define SUM(f) out->f += st.f;
		RDMAPS_SERVER_STATS_MAP(SUM)
#undef SUM
		/* the newest restore and epoch, not sums */
		out->restored_seq = restored > st.restored_seq ? restored : st.restored_seq;
		out->epoch = epoch > st.epoch ? epoch : st.epoch;
	}
	return 0;
}

int rdmaps_checkpoint(rdmaps_client *c, int timeout_ms)
{
	uint64_t before[RDMAPS_MAX_SERVERS], fails[RDMAPS_MAX_SERVERS];
	uint64_t deadline;
	int rc;

	if (!c)
		return RDMAPS_EINVAL;
	deadline = rdmaps__now_ns() + (uint64_t)(timeout_ms > 0 ? timeout_ms : c->timeout_ms) * 1000000u;
	for (uint32_t i = 0; i < c->nconn; i++) {
		struct cl_conn *k = &c->conn[i];
		struct rdmaps_server_stats st;
		struct rdmaps_msg_hdr m;
		struct rdmaps_msg_status_reply r;

		if ((rc = cl_server_stats(k, &st)))
			return rc;
		before[i] = st.checkpoints;
		fails[i] = st.checkpoint_failures;
		rdmaps__msg_init(&m, RDMAPS_MSG_CHECKPOINT, sizeof(m), 0);
		if ((rc = cl_rpc(k, &m, sizeof(m), RDMAPS_MSG_STATUS_REPLY, &r, sizeof(r))))
			return rc;
	}
	/* the server writes it from its listener thread: watch its counters */
	for (uint32_t i = 0; i < c->nconn; i++)
		for (;;) {
			struct rdmaps_server_stats st;
			struct timespec ts = { 0, 5000000 };

			if ((rc = cl_server_stats(&c->conn[i], &st)))
				return rc;
			if (st.checkpoint_failures > fails[i])
				return RDMAPS_EREMOTE;
			if (st.checkpoints > before[i])
				break;
			if (rdmaps__now_ns() > deadline)
				return RDMAPS_ETIMEDOUT;
			nanosleep(&ts, NULL);
		}
	return 0;
}
