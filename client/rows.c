/*
 * rows.c -- sparse tables: pulls and pushes of named rows. A pull READs
 * each named row straight into its place in the caller's buffer; a push
 * gathers ids and values of the rows each server holds into its staging
 * slots (one copy: the rows are scattered in both the table and the
 * gradient). The op machinery is ops.c's; nothing here allocates.
 */
#include <string.h>
#include <arpa/inet.h>

#include "client.h"
#include "error.h"

/* The part holding chunk (row) r: parts are consecutive runs in order. */
static uint32_t part_of(const rdmaps_tensor *t, uint64_t r)
{
	uint32_t lo = 0, hi = t->nparts;

	while (hi - lo > 1) {
		uint32_t mid = (lo + hi) / 2;
		if (t->part[mid].first <= r)
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

/* Sparse pull: one READ per named row, straight into its place in dst. */
int cl_rows_post_pull(rdmaps_op *op)
{
	rdmaps_tensor *t = op->t;

	while (op->row_next < op->nrows) {
		uint64_t r = op->rows[op->row_next];
		uint32_t p = part_of(t, r);
		struct cl_conn *k = &op->c->conn[t->part[p].conn];
		int rc;

		if (!k->nrs_free || k->sq_outstanding >= CL_SQ_DEPTH)
			return 0; /* that server is busy: go on when slots return */
		/* sparse tables keep one copy */
		uint32_t s = cl_rs_take(k, op, p, (uint32_t)(r - t->part[p].first),
					(uint64_t)op->row_next * t->chunk_elems);
		if ((rc = cl_post_read(k, op, s))) {
			k->rs_free[k->nrs_free++] = s;
			cl_fail(k, rc, "ibv_post_send failed");
			return rc;
		}
		op->row_next++;
		op->unposted--;
		op->inflight++;
	}
	return 0;
}

/* Sparse push to part p: pack ids and values of its rows into slots. */
int cl_rows_post_push(rdmaps_op *op, uint32_t p)
{
	rdmaps_tensor *t = op->t;
	const struct cl_part *pt = &t->part[p];
	struct cl_conn *k = &op->c->conn[pt->conn];
	uint32_t dim = t->chunk_elems, me = cl_op_index(op) + 1;
	uint32_t per_slot = (k->slot_size - RDMAPS_SLOT_HDR) / (uint32_t)(sizeof(uint64_t) + dim * sizeof(float));

	if (k->push_owner && k->push_owner != me)
		return 0;
	k->push_owner = me;
	while (op->rows_left[p] && k->sq_outstanding < CL_SQ_DEPTH &&
	       k->next_seq < cl_folded_seq(k) + k->slots) {
		uint64_t seq = k->next_seq;
		uint32_t slot = (uint32_t)((seq - 1) % k->slots), n = 0;
		uint8_t *b = k->data + (size_t)slot * k->chunk_elems * sizeof(float);
		uint32_t cap = op->rows_left[p] < per_slot ? op->rows_left[p] : per_slot;
		float *vals = (float *)(b + (size_t)cap * sizeof(uint64_t));
		struct rdmaps_slot_hdr *h = (struct rdmaps_slot_hdr *)cl_slot_hdr(k, slot);
		struct ibv_sge sge[2] = {
			{ .addr = (uintptr_t)h, .length = RDMAPS_SLOT_HDR, .lkey = k->ctl_mr->lkey },
			{ .addr = (uintptr_t)b, .lkey = k->data_mr->lkey },
		};
		struct ibv_send_wr wr = {
			.wr_id = WR_ID(WR_PUSH, k->idx, cl_op_index(op)),
			.sg_list = sge, .num_sge = 2,
			.opcode = IBV_WR_RDMA_WRITE_WITH_IMM, .send_flags = IBV_SEND_SIGNALED,
			.imm_data = htonl(rdmaps__imm_make(slot, seq)),
			.wr.rdma = { .remote_addr = k->staging_addr + (uint64_t)slot * k->slot_size,
				     .rkey = k->staging_rkey },
		}, *bad;
		int rc;

		/* gather this part's rows from the caller's order (one copy: the
		 * rows are scattered in both the table and the gradient) */
		for (size_t j = op->next[p]; j < op->nrows && n < cap; j++) {
			if (part_of(t, op->rows[j]) != p)
				continue;
			((uint64_t *)b)[n] = op->rows[j] - pt->first;
			memcpy(vals + (size_t)n * dim, op->buf + j * dim, dim * sizeof(float));
			op->next[p] = (uint32_t)j + 1;
			n++;
		}
		op->rows_left[p] -= n;
		if (!op->seq0[k->idx]) {
			op->seq0[k->idx] = seq;
			op->local0[k->idx] = op->pslots[p];
		}
		op->pslots[p]++;
		sge[1].length = n * (uint32_t)(sizeof(uint64_t) + dim * sizeof(float));
		*h = (struct rdmaps_slot_hdr){
			.seq = (uint32_t)seq,
			.tensor_id = (uint16_t)pt->tensor_id,
			.count = n,
			.flags = RDMAPS_SLOT_ROWS | (op->flags & RDMAPS_PUSH_FOLDED ? RDMAPS_SLOT_ACK : 0u) |
				 (!op->rows_left[p] || op->pslots[p] % k->slots == 0 ? RDMAPS_SLOT_LAST : 0u) |
				 (!op->rows_left[p] ? RDMAPS_SLOT_END : 0u),
			.scale = op->scale,
		};
		if ((rc = ibv_post_send(k->qp, &wr, &bad))) {
			cl_fail(k, rdmaps__from_errno(rc), "ibv_post_send failed");
			return rdmaps__from_errno(rc);
		}
		op->c->stats.bounce_copies++;
		k->sq_outstanding++;
		k->next_seq++;
		op->last_seq[k->idx] = seq;
		op->unposted--;
		op->inflight++;
	}
	if (!op->rows_left[p])
		k->push_owner = 0;
	return 0;
}

static int rows_start(rdmaps_client *c, enum op_kind kind, rdmaps_tensor *t, const uint64_t *rows,
		      size_t n, float *buf, unsigned flags, rdmaps_op **out)
{
	rdmaps_op *op;
	int rc;

	if (!c || !t || !rows || !n || !buf || t->c != c || !t->cons.row_dim || n > UINT32_MAX)
		return RDMAPS_EINVAL;
	for (size_t j = 0; j < n; j++)
		if (rows[j] >= t->nchunks)
			return RDMAPS_ERANGE;
	/* start as an empty op of the right kind, then size it for the rows */
	if ((rc = cl_op_alloc(c, kind, t, buf, flags, false, 0, t->nparts, &op)))
		return rc;
	if (kind == OP_PUSH_ROWS)
		op->scale = t->cons.clip_norm > 0.0f
				    ? cl_clip_scale(buf, (uint64_t)n * t->chunk_elems, t->cons.clip_norm)
				    : 1.0f;
	op->rows = rows;
	op->nrows = n;
	/* pushed rows are gathered through the bounce buffers; pulled rows go
	 * straight into dst when the caller registered it */
	op->mr = kind == OP_PULL_ROWS ? cl_find_mr(c, buf, n * t->chunk_elems * sizeof(float)) : NULL;
	memset(op->rows_left, 0, sizeof(op->rows_left[0]) * t->nparts);
	memset(op->pslots, 0, sizeof(op->pslots[0]) * t->nparts);
	if (kind == OP_PULL_ROWS) {
		op->total_chunks = (uint32_t)n;
	} else {
		struct cl_conn *k0 = &c->conn[0];
		uint32_t per = (k0->slot_size - RDMAPS_SLOT_HDR) /
			       (uint32_t)(sizeof(uint64_t) + t->chunk_elems * sizeof(float));
		op->total_chunks = 0;
		for (size_t j = 0; j < n; j++)
			op->rows_left[part_of(t, rows[j])]++;
		for (uint32_t p = 0; p < t->nparts; p++)
			op->total_chunks += (op->rows_left[p] + per - 1) / per;
	}
	op->unposted = op->total_chunks;
	cl_op_post(op);
	*out = op;
	return 0;
}

int rdmaps_pull_rows_async(rdmaps_client *c, rdmaps_tensor *t, const uint64_t *rows, size_t n,
			   float *dst, unsigned flags, rdmaps_op **op)
{
	if (flags & RDMAPS_PUSH_FOLDED)
		return RDMAPS_EINVAL;
	return rows_start(c, OP_PULL_ROWS, t, rows, n, dst, flags, op);
}

int rdmaps_push_rows_async(rdmaps_client *c, rdmaps_tensor *t, const uint64_t *rows, size_t n,
			   const float *grad, unsigned flags, rdmaps_op **op)
{
	if (flags & RDMAPS_PULL_RELAXED)
		return RDMAPS_EINVAL;
	/* read only: the op's buffer is a pull destination in the other kind */
	return rows_start(c, OP_PUSH_ROWS, t, rows, n, (float *)(uintptr_t)grad, flags, op);
}

int rdmaps_pull_rows(rdmaps_client *c, rdmaps_tensor *t, const uint64_t *rows, size_t n,
		     float *dst, unsigned flags)
{
	rdmaps_op *op;
	int rc = rdmaps_pull_rows_async(c, t, rows, n, dst, flags, &op);

	return rc ? rc : cl_op_wait(op, -1);
}

int rdmaps_push_rows(rdmaps_client *c, rdmaps_tensor *t, const uint64_t *rows, size_t n,
		     const float *grad, unsigned flags)
{
	rdmaps_op *op;
	int rc = rdmaps_push_rows_async(c, t, rows, n, grad, flags, &op);

	return rc ? rc : cl_op_wait(op, -1);
}

uint32_t rdmaps_tensor_row_dim(const rdmaps_tensor *t)
{
	return t ? t->cons.row_dim : 0;
}
