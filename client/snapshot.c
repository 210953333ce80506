/*
 * snapshot.c -- the bound on a pull's READs. A chunk whose READs tore
 * snap_after times in one pull (a fold landed inside each) is not READ from
 * the model again: the worker asks its server for a snapshot (SNAPSHOT),
 * the server copies the chunk whole under the chunk's lock into a buffer
 * of this connection's, and one READ of that buffer brings it, whole by
 * construction. So a chunk costs at most snap_after + 1 READs and one
 * control round trip, however fast the folds come (docs/design.md, "What a
 * pull returns").
 *
 * One snapshot at a time per connection (the server reuses the buffer):
 * slots wait here, oldest first, each still counted in flight by its op.
 * The request and its READ go out from progress, never waiting; a slot
 * waiting here has no work request posted, so a failed connection gives
 * it back itself (cl_snap_fail). All on the client's own thread.
 */
#include <string.h>

#include "client.h"
#include "error.h"

/* request ids with the top bit: never one of cl_rpc's */
#define SNAP_REQ_BIT 0x80000000u

static int post_request(struct cl_conn *k, uint32_t s)
{
	const struct read_slot *rs = &k->rs[s];
	const rdmaps_op *op = &k->c->ops[rs->op];
	struct rdmaps_msg_snapshot m = { .tensor_id = op->t->part[rs->part].tensor_id,
					 .chunk = rs->local,
					 .half = op->half != 0 };
	struct ibv_sge sge = { .addr = (uintptr_t)cl_snap_buf(k), .length = sizeof(m),
			       .lkey = k->ctl_mr->lkey };
	struct ibv_send_wr wr = { .wr_id = WR_ID(WR_CTRL_SEND, k->idx, 0), .sg_list = &sge,
				  .num_sge = 1, .opcode = IBV_WR_SEND,
				  .send_flags = IBV_SEND_SIGNALED }, *bad;
	int rc;

	k->snap_req = (k->snap_req + 1) | SNAP_REQ_BIT;
	rdmaps__msg_init(&m.hdr, RDMAPS_MSG_SNAPSHOT, sizeof(m), k->snap_req);
	/* its own buffer: a control request of cl_rpc's may be in flight */
	memcpy(cl_snap_buf(k), &m, sizeof(m));
	if (sizeof(m) <= k->max_inline)
		wr.send_flags |= IBV_SEND_INLINE;
	if ((rc = ibv_post_send(k->qp, &wr, &bad)))
		return rdmaps__from_errno(rc);
	k->sq_outstanding++;
	return 0;
}

/* Give slot s back with its op failed (no work request of it is posted). */
static void slot_fail(struct cl_conn *k, uint32_t s, int err)
{
	rdmaps_op *op = &k->c->ops[k->rs[s].op];

	op->inflight--;
	cl_op_finish(op, err);
	k->rs_free[k->nrs_free++] = s;
}

/* The snapshot READ: header to the slot's scratch, values where a READ of
 * the model would have put them (cl_read_done then checks it as any). */
static int post_read(struct cl_conn *k, uint32_t s, uint64_t addr, uint32_t rkey, uint32_t len)
{
	struct read_slot *rs = &k->rs[s];
	rdmaps_op *op = &k->c->ops[rs->op];
	uint32_t vals = len - RDMAPS_CHUNK_HDR;
	struct ibv_sge sge[2] = {
		{ .addr = (uintptr_t)rs->scratch, .length = RDMAPS_CHUNK_HDR,
		  .lkey = k->ctl_mr->lkey },
		cl_read_values(k, op, rs, vals),
	};
	struct ibv_send_wr wr = { .wr_id = WR_ID(WR_READ, k->idx, s), .sg_list = sge,
				  .num_sge = 2, .opcode = IBV_WR_RDMA_READ,
				  .send_flags = IBV_SEND_SIGNALED,
				  .wr.rdma = { .remote_addr = addr, .rkey = rkey } }, *bad;
	int rc;

	if (!op->half && cl_read_whole(vals / (uint32_t)sizeof(float))) {
		/* small: header and floats into the scratch, as cl_post_reads */
		sge[0].length = len;
		wr.num_sge = 1;
	}
	rs->next = CL_RS_NONE;
	if ((rc = ibv_post_send(k->qp, &wr, &bad)))
		return rdmaps__from_errno(rc);
	k->sq_outstanding++;
	k->c->stats.reads++;
	k->c->stats.snapshots++;
	return 0;
}

/*
 * Move the snapshot being served on, or start the oldest waiting one:
 * whatever has to be posted is posted when the send queue has room (else
 * the next progress round tries again, cl_snap_kick).
 */
void cl_snap_kick(struct cl_conn *k)
{
	int rc = 0;

	if (k->broken || k->sq_outstanding >= CL_SQ_DEPTH)
		return;
	if (k->snap_s == CL_RS_NONE && k->snap_n) {
		uint32_t s = k->snap_q[0];
		memmove(k->snap_q, k->snap_q + 1, --k->snap_n * sizeof(k->snap_q[0]));
		k->snap_s = s;
		k->snap_phase = CL_SNAP_ASKED;
		if ((rc = post_request(k, s)))
			goto fail;
	} else if (k->snap_phase == CL_SNAP_REPLIED) {
		if ((rc = post_read(k, k->snap_s, k->snap_addr, k->snap_rkey, k->snap_len)))
			goto fail;
		k->snap_phase = CL_SNAP_READING;
	}
	return;
fail:
	cl_fail(k, rc, "ibv_post_send failed"); /* gives the slot back failed */
}

void cl_snap_ask(struct cl_conn *k, uint32_t s)
{
	k->rs[s].snapped = true;
	k->snap_q[k->snap_n++] = s; /* at most CL_READ_SLOTS: each slot once */
	cl_snap_kick(k);
}

void cl_snap_reply(struct cl_conn *k, const void *msg, uint32_t len)
{
	struct rdmaps_msg_snapshot_reply r;
	uint32_t s = k->snap_s;
	const struct read_slot *rs;
	const rdmaps_op *op;
	uint32_t want;
	int rc;

	if (len != sizeof(r) || s == CL_RS_NONE || k->snap_phase != CL_SNAP_ASKED)
		return; /* not the one asked for (a reply after a reconnect) */
	memcpy(&r, msg, sizeof(r));
	if (r.hdr.req_id != k->snap_req)
		return;
	rs = &k->rs[s];
	op = &k->c->ops[rs->op];
	/* the chunk's header and values, as this slot reads them */
	want = RDMAPS_CHUNK_HDR +
	       rdmaps__chunk_count(op->t->length, op->t->chunk_elems,
				   op->t->part[rs->part].first + rs->local) *
		       (op->half ? 2u : (uint32_t)sizeof(float));
	rc = rdmaps__wire_status(r.status);
	if (!rc && r.len != want)
		rc = RDMAPS_EPROTO; /* not the chunk this slot reads */
	if (rc) {
		k->snap_s = CL_RS_NONE;
		k->snap_phase = CL_SNAP_IDLE;
		slot_fail(k, s, rc);
		cl_snap_kick(k);
		return;
	}
	k->snap_addr = r.addr;
	k->snap_rkey = r.rkey;
	k->snap_len = r.len;
	k->snap_phase = CL_SNAP_REPLIED;
	cl_snap_kick(k);
}

void cl_snap_read_done(struct cl_conn *k, uint32_t s)
{
	if (k->snap_s != s || k->snap_phase != CL_SNAP_READING)
		return;
	k->snap_s = CL_RS_NONE; /* the server's buffer is free for the next */
	k->snap_phase = CL_SNAP_IDLE;
	cl_snap_kick(k);
}

void cl_snap_fail(struct cl_conn *k, int err)
{
	/* a posted snapshot READ comes back flushed, with its slot */
	if (k->snap_s != CL_RS_NONE && k->snap_phase != CL_SNAP_READING)
		slot_fail(k, k->snap_s, err);
	k->snap_s = CL_RS_NONE;
	k->snap_phase = CL_SNAP_IDLE;
	while (k->snap_n)
		slot_fail(k, k->snap_q[--k->snap_n], err);
}

void cl_snap_reset(struct cl_conn *k)
{
	k->snap_s = CL_RS_NONE;
	k->snap_n = 0;
	k->snap_phase = CL_SNAP_IDLE;
}
