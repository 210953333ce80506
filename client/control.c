/*
 * control.c -- the worker's side of the control plane: one request at a
 * time over SEND/RECV, replies matched by req_id and checked before use.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "client.h"
#include "error.h"
#include "log.h"

int cl_rpc(rdmaps_client *c, void *msg, uint32_t len, uint16_t want_type, void *reply,
	   uint32_t reply_len)
{
	struct rdmaps_msg_hdr *h = msg;
	struct rdmaps_msg_hdr rh;
	uint64_t deadline = rdmaps__now_ns() + (uint64_t)c->timeout_ms * 1000000u;
	uint16_t type;
	int rc;

	if (c->broken)
		return c->broken;
	h->req_id = ++c->req_id;
	memcpy(cl_send_buf(c), msg, len);
	{
		struct ibv_sge sge = { .addr = (uintptr_t)cl_send_buf(c), .length = len,
				       .lkey = c->ctl_mr->lkey };
		struct ibv_send_wr wr = { .wr_id = WR_ID(WR_CTRL_SEND, 0), .sg_list = &sge,
					  .num_sge = 1, .opcode = IBV_WR_SEND,
					  .send_flags = IBV_SEND_SIGNALED }, *bad;
		while (c->sq_outstanding >= CL_SQ_DEPTH && !c->broken)
			cl_progress(c);
		if ((rc = ibv_post_send(c->qp, &wr, &bad)))
			return rdmaps__from_errno(rc);
		c->sq_outstanding++;
	}
	c->reply_ready = false;
	for (;;) {
		cl_progress(c);
		if (c->broken)
			return c->broken;
		if (c->reply_ready) {
			c->reply_ready = false;
			if ((rc = rdmaps__msg_check(c->reply, c->reply_len, &type)))
				return rc;
			memcpy(&rh, c->reply, sizeof(rh));
			if (rh.req_id != c->req_id)
				continue; /* a stale reply to an abandoned request */
			break;
		}
		cl_check_cm(c);
		if (rdmaps__now_ns() > deadline)
			return RDMAPS_ETIMEDOUT;
	}
	if (type == RDMAPS_MSG_STATUS_REPLY) {
		struct rdmaps_msg_status_reply sr;
		memcpy(&sr, c->reply, sizeof(sr));
		if (sr.status > 0 || sr.status < -1000)
			return RDMAPS_EPROTO;
		if (sr.status || want_type != RDMAPS_MSG_STATUS_REPLY)
			return sr.status ? sr.status : RDMAPS_EPROTO;
		return 0;
	}
	if (type != want_type || c->reply_len != reply_len)
		return RDMAPS_EPROTO;
	memcpy(reply, c->reply, reply_len);
	return 0;
}

static int tensor_from_reply(rdmaps_client *c, const struct rdmaps_msg_tensor_reply *r,
			     const char *name, rdmaps_tensor **out)
{
	rdmaps_tensor *t;

	if (r->status)
		return r->status < 0 ? r->status : RDMAPS_EPROTO;
	if (!r->length || r->chunk_elems != c->chunk_elems ||
	    r->nchunks != rdmaps__chunk_total(r->length, r->chunk_elems))
		return RDMAPS_EPROTO;
	for (t = c->tensors; t; t = t->next)
		if (t->id == r->tensor_id) {
			*out = t;
			return 0;
		}
	t = calloc(1, sizeof(*t));
	if (!t)
		return RDMAPS_ENOMEM;
	t->c = c;
	t->id = r->tensor_id;
	t->length = r->length;
	t->raddr = r->remote_addr;
	t->rkey = r->rkey;
	t->chunk_elems = r->chunk_elems;
	t->nchunks = r->nchunks;
	t->stride = rdmaps__chunk_stride(r->chunk_elems);
	snprintf(t->name, sizeof(t->name), "%s", name);
	t->next = c->tensors;
	c->tensors = t;
	*out = t;
	return 0;
}

static int lookup_once(rdmaps_client *c, const char *name, struct rdmaps_msg_tensor_reply *r)
{
	struct rdmaps_msg_lookup m = { 0 };

	rdmaps__msg_init(&m.hdr, RDMAPS_MSG_LOOKUP, sizeof(m), 0);
	snprintf(m.name, sizeof(m.name), "%s", name);
	return cl_rpc(c, &m, sizeof(m), RDMAPS_MSG_TENSOR_REPLY, r, sizeof(*r));
}

/* A tensor whose creator is still staging its initial values: wait. */
static int wait_ready(rdmaps_client *c, const char *name, struct rdmaps_msg_tensor_reply *r)
{
	uint64_t deadline = rdmaps__now_ns() + (uint64_t)c->timeout_ms * 1000000u;
	int rc = 0;

	while (!r->ready) {
		struct timespec ts = { 0, 1000000 };
		if (rdmaps__now_ns() > deadline)
			return RDMAPS_ETIMEDOUT;
		nanosleep(&ts, NULL);
		if ((rc = lookup_once(c, name, r)))
			return rc;
	}
	return 0;
}

static int seal(rdmaps_client *c, rdmaps_tensor *t)
{
	struct rdmaps_msg_seal m = { 0 };
	struct rdmaps_msg_status_reply r;

	rdmaps__msg_init(&m.hdr, RDMAPS_MSG_SEAL, sizeof(m), 0);
	m.tensor_id = t->id;
	m.last_seq = c->next_seq - 1;
	return cl_rpc(c, &m, sizeof(m), RDMAPS_MSG_STATUS_REPLY, &r, sizeof(r));
}

int rdmaps_declare(rdmaps_client *c, const struct rdmaps_tensor_desc *d, rdmaps_tensor **out)
{
	struct rdmaps_msg_declare m = { 0 };
	struct rdmaps_msg_tensor_reply r;
	rdmaps_tensor *t;
	int rc;

	if (!c || !d || !out || !d->name || !d->length)
		return RDMAPS_EINVAL;
	if (strlen(d->name) > RDMAPS_NAME_MAX || rdmaps__name_check(d->name, RDMAPS_NAME_MAX + 1))
		return RDMAPS_EINVAL;
	static const char *const opt_names[] = { "sgd", "momentum", "nesterov", "adagrad", "adam",
						 "adamw" };
	if ((unsigned)d->optimizer >= sizeof(opt_names) / sizeof(opt_names[0]))
		return RDMAPS_EINVAL;
	rdmaps__msg_init(&m.hdr, RDMAPS_MSG_DECLARE, sizeof(m), 0);
	m.length = d->length;
	m.init_value = d->init_value;
	m.flags = d->init ? RDMAPS_DECLARE_INIT_DATA : 0;
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
	if ((rc = cl_rpc(c, &m, sizeof(m), RDMAPS_MSG_TENSOR_REPLY, &r, sizeof(r))))
		return rc;
	if ((rc = tensor_from_reply(c, &r, d->name, &t)))
		return rc;
	if (r.created && d->init) {
		/* we created it: stage the initial values, then open it */
		rdmaps_op *op;
		if ((rc = cl_op_start(c, OP_PUSH, t, (float *)(uintptr_t)d->init, RDMAPS_PUSH_FOLDED,
				      true, &op)))
			return rc;
		if ((rc = cl_op_wait(op, c->timeout_ms)))
			return rc;
		if ((rc = seal(c, t)))
			return rc;
	} else if (!r.ready && (rc = wait_ready(c, d->name, &r))) {
		return rc;
	}
	*out = t;
	return 0;
}

int rdmaps_lookup(rdmaps_client *c, const char *name, rdmaps_tensor **out)
{
	struct rdmaps_msg_tensor_reply r;
	rdmaps_tensor *t;
	int rc;

	if (!c || !name || !out || strlen(name) > RDMAPS_NAME_MAX ||
	    rdmaps__name_check(name, RDMAPS_NAME_MAX + 1))
		return RDMAPS_EINVAL;
	if ((rc = lookup_once(c, name, &r)))
		return rc;
	if ((rc = wait_ready(c, name, &r)))
		return rc;
	if ((rc = tensor_from_reply(c, &r, name, &t)))
		return rc;
	*out = t;
	return 0;
}

int rdmaps_server_stats(rdmaps_client *c, struct rdmaps_server_stats *out)
{
	struct rdmaps_msg_hdr m;
	struct rdmaps_msg_stats_reply r;
	int rc;

	if (!c || !out)
		return RDMAPS_EINVAL;
	rdmaps__msg_init(&m, RDMAPS_MSG_STATS, sizeof(m), 0);
	if ((rc = cl_rpc(c, &m, sizeof(m), RDMAPS_MSG_STATS_REPLY, &r, sizeof(r))))
		return rc;
	*out = r.stats;
	return 0;
}
