/*
 * client.h -- librdmaps internals. Not installed.
 *
 * A client is connected to S servers (S = 1 for rdmaps_connect), one RC QP
 * each (struct cl_conn). A tensor is cut into parts by common/placement.h;
 * each part lives on one server as a tensor of its own. Everything a QP
 * sends is signaled so its send-queue budget is exact; every buffer the NIC
 * touches is carved out of regions registered at connect, so pull and push
 * allocate nothing.
 */
#ifndef RDMAPS_CLIENT_H
#define RDMAPS_CLIENT_H

#include <stdbool.h>
#include <stdint.h>

#include "chunk.h"
#include "config.h"
#include "protocol.h"
#include "rdmaps.h"
#include "verbs.h"

#define CL_MAX_OPS ((uint32_t)RDMAPS_MAX_OPS)
#define CL_READ_SLOTS 32u   /* READs in flight per server */
#define CL_RECVS 4u         /* control replies (one request at a time) */
#define CL_SQ_DEPTH 128u
#define CL_PROBE_NS 1000000000ull /* liveness probe while waiting on a silent server */
/* per READ slot: a small chunk's whole READ lands here (one SGE; rxe pays
 * per SGE, so scattering costs more than copying ~200 B), a big one's
 * header */
#define CL_SCRATCH 256u
/* room before each scratch: a READ that spans chunks lands the pad between
 * one chunk's floats and the next chunk's header there (< RDMAPS_CHUNK_ALIGN) */
#define CL_SCRATCH_LEAD 64u
#define CL_INLINE 256u     /* inline data asked of the QP (small pushes) */
_Static_assert(CL_SCRATCH >= RDMAPS_CHUNK_HDR, "read scratch too small");
#define CL_MAX_TRIES 100000u /* re-reads of one chunk before RDMAPS_ETORN */
/* index words one READ brings (two-copy tensors): chunks whose copy is known */
#define CL_INDEX_WORDS 512u
#define CL_WINDOWS 2u /* one bit of an index READ's wr_id (copies.c) */

/* wr_id: kind (8 bits) | server (16 bits) | index (32 bits) */
enum { WR_READ = 1, WR_PUSH = 2, WR_CTRL_SEND = 3, WR_RECV = 4, WR_PROBE = 5, WR_INDEX = 6 };
#define WR_ID(kind, conn, idx) \
	(((uint64_t)(kind) << 56) | ((uint64_t)(conn) << 32) | (uint64_t)(uint32_t)(idx))
#define WR_KIND(id) ((unsigned)((id) >> 56))
#define WR_CONN(id) ((uint32_t)(((id) >> 32) & 0xffffu))
#define WR_IDX(id) ((uint32_t)(id))

struct rdmaps_mr {
	rdmaps_client *c;
	struct ibv_mr *mr[RDMAPS_MAX_SERVERS]; /* one per distinct PD (device) */
	uint8_t *addr;
	size_t len;
	rdmaps_mr *prev, *next;
};

/* The run of chunks of a tensor that one server holds. */
struct cl_part {
	uint32_t conn;      /* server index */
	uint32_t tensor_id; /* the part's id on that server */
	uint32_t first, nchunks;
	uint64_t raddr;
	uint32_t rkey;
	uint64_t copy_off;   /* two copies: copy 1 is this far from copy 0; 0: one copy */
	uint32_t skip;       /* header bytes its READs leave out (chunk.h) */
	uint64_t index_addr; /* two copies: the server's index, a u64 per chunk */
	unsigned pull_fmt;   /* RDMAPS_FMT_BF16/FP16: the 16-bit copy; else 0 */
	uint64_t half_addr;  /* its chunk 0 header */
	uint32_t half_stride;
};

struct rdmaps_tensor {
	rdmaps_client *c;
	uint64_t length;
	uint32_t chunk_elems, nchunks;
	size_t stride;
	char name[RDMAPS_NAME_MAX + 1];
	rdmaps_tensor *next;
	struct rdmaps_wire_consistency cons;
	uint64_t clock;       /* this worker's pushes so far (BSP/SSP) */
	bool bsp_pushed;      /* BSP: pushed since the last checked pull */
	struct cl_wire *wire; /* compressed pushes (compress.c), or NULL: float32 */
	unsigned pull_fmt;    /* as declared: RDMAPS_FMT_F32, BF16 or FP16 */
	uint32_t nparts;
	struct cl_part part[]; /* non-empty parts, in chunk order */
};

enum op_kind { OP_FREE = 0, OP_PULL, OP_PUSH, OP_PULL_ROWS, OP_PUSH_ROWS };

struct rdmaps_op {
	rdmaps_client *c;
	enum op_kind kind;
	unsigned flags;
	bool assign;          /* push of initial values (creator only) */
	bool wire;            /* push: sends t->wire's encoded chunks */
	/* pull of a tensor with a 16-bit copy: READs that copy, then converts
	 * into buf (CL_HALF_FLOAT) or keeps its values (CL_HALF_RAW: buf holds
	 * uint16_t); 0: the float32 chunks */
	enum { CL_HALF_NONE = 0, CL_HALF_FLOAT, CL_HALF_RAW } half;
	int status;           /* RDMAPS_EAGAIN while pending */
	uint32_t gen;         /* bumped on every allocation of this slot */
	rdmaps_tensor *t;
	float *buf;           /* pull destination or push source */
	rdmaps_mr *mr;        /* caller's registration covering buf, or NULL: bounce */
	uint32_t part_lo, part_hi; /* the parts it covers: [lo, hi) */
	uint32_t clock;       /* push: the worker's clock it carries */
	float scale;          /* push: clip factor for the whole push */
	uint64_t min_clock;   /* pull: chunk clock it must see (BSP/SSP) */
	uint64_t deadline;    /* pull: give up waiting for min_clock */
	uint32_t total_chunks;
	uint32_t done_chunks;
	uint32_t inflight;
	uint32_t unposted;    /* chunks not yet posted, all its parts */
	uint32_t next[RDMAPS_MAX_SERVERS];     /* per part: next local chunk (rows: row index) */
	uint64_t last_seq[RDMAPS_MAX_SERVERS]; /* push, per server: seq of its last slot */
	/* push, per server: the seq of the first slot of its part posted on the
	 * current connection (0: none yet) and that slot's index in the part
	 * (the ones before it are known folded), and its slots whose WRITE
	 * completed. A part's slots take consecutive seqs on a connection, so
	 * a broken connection's account (resume.c) says which of them folded. */
	uint64_t seq0[RDMAPS_MAX_SERVERS];
	uint32_t local0[RDMAPS_MAX_SERVERS];
	uint32_t pdone[RDMAPS_MAX_SERVERS];
	/* sparse rows */
	const uint64_t *rows;
	size_t nrows, row_next;                 /* pull: next row to post */
	uint32_t rows_left[RDMAPS_MAX_SERVERS]; /* push: rows of part p not yet staged */
	uint32_t pslots[RDMAPS_MAX_SERVERS];    /* push: slots staged for part p */
};

#define CL_RS_NONE UINT32_MAX
struct read_slot {
	uint32_t op, part, local, tries;
	uint32_t next;        /* the next chunk's slot in the same READ, or CL_RS_NONE */
	uint32_t copy;        /* two copies: which one this READ targets */
	uint32_t win;         /* two copies: the index window it belongs to */
	uint64_t want;        /* two copies: the version the index promised, at least */
	bool verify;          /* two copies: checksum this READ now (a retry, or a
			       * window that failed validation), not at window end */
	bool snapped;         /* a snapshot was asked for it (snapshot.c): no second */
	uint64_t dst_off;     /* float offset in the op's buffer */
	uint8_t *scratch;     /* CL_SCRATCH bytes in the control region, after
			       * CL_SCRATCH_LEAD bytes of its own */
	float *bounce;        /* chunk_elems floats in the data region */
};

/* A two-copy pull's window (copies.c): one op owns it for chunks
 * [lo, lo + n) of one part. */
struct cl_window {
	uint64_t *ix;          /* index words read before the chunks (registered) */
	uint64_t *ix2;         /* the same words read again after them (registered) */
	uint64_t sum[CL_INDEX_WORDS];   /* each chunk's checksum, as its READ saw it */
	bool checked[CL_INDEX_WORDS];   /* chunk already checksummed (and counted done) */
	uint32_t owner;        /* op index + 1, or 0 */
	uint32_t gen;          /* that op's gen: a finished owner frees the window */
	uint32_t part, lo, n;
	uint32_t pending;      /* chunks of the window not yet read */
	uint32_t done;         /* chunks of the window already counted done */
	uint32_t seq;          /* bumped per index READ: only the latest counts */
	enum { IX_IDLE, IX_INDEX, IX_POST, IX_DRAIN, IX_CHECK } phase;
	bool verify;           /* this window checks each chunk by checksum */
};

/* One server connection. */
struct cl_conn {
	rdmaps_client *c;
	uint32_t idx;
	char name[RDMAPS_ADDR_MAX + 20]; /* host:port, for messages */
	struct rdma_event_channel *ch;
	struct rdma_cm_id *id;
	struct ibv_pd *pd;    /* shared by connections on the same device */
	uint32_t pd_idx;
	struct ibv_cq *cq;
	struct ibv_comp_channel *cc; /* the CQ's events, for a waiter that sleeps; may be NULL */
	bool armed;                  /* cq asked for an event that has not come yet */
	struct ibv_qp *qp;

	/* from the server's welcome */
	uint64_t staging_addr;
	uint32_t staging_rkey, slots, slot_size, chunk_elems;
	uint64_t instance, restored_seq; /* which run of the server this is */
	/* failover (docs/durability.md): copies of each part the cluster
	 * keeps (the welcome says), so the servers that may take this rank
	 * over; which of them serves it now (0: its own, j: the j-th after
	 * it in the list), and whether the hello asks for the rank */
	uint16_t replicas;
	uint32_t served_by;
	bool ask_rank;
	uint64_t conn_id;       /* this connection, as the server names it */
	/* the connection that broke, until its pushes are settled (resume.c):
	 * its id, the first seq not known folded, its next seq, and the
	 * server's refused-slot count as last seen on it */
	uint64_t resume_id, resume_known, resume_next;
	uint32_t resume_dropped;

	/* credit word: the only memory the server may write (its own page) */
	struct rdmaps_wire_credit *credit;
	struct ibv_mr *credit_mr;
	/* control region: send buffer | recv buffers | slot headers | read scratch */
	uint8_t *ctl;
	struct ibv_mr *ctl_mr;
	/* data region: push bounce (slots chunks) | read bounce (CL_READ_SLOTS chunks) */
	uint8_t *data;
	struct ibv_mr *data_mr;

	uint32_t sq_outstanding;
	uint32_t max_inline;    /* inline data the QP takes: small pushes go inline */
	uint32_t read_span;     /* chunks one pull READ may cover (rdmaps__read_span) */
	uint64_t next_seq;      /* seq of the next staged slot */
	uint32_t push_owner;    /* op index + 1 posting a push group here, or 0 */
	uint32_t dropped_seen;
	uint32_t req_id;
	bool reply_ready;
	uint8_t reply[RDMAPS_MSG_MAX];
	uint32_t reply_len;
	int broken;             /* 0 or why the connection is unusable */
	bool dev_gone;          /* its device was removed: let go of it (cl_reconnect) */
	uint64_t last_cm_check;
	uint64_t last_probe;    /* when the last liveness probe was posted */
	uint64_t cqes;          /* work completions seen: progress, for the watchdog */
	uint64_t stall_cqes;    /* cqes when the current stall began */
	uint64_t stall_since;   /* when no completion came despite requests in flight */
	/* replicas > 1: work here and no progress (completions, credit) since
	 * quiet_since: is the rank served elsewhere now (look_around)? */
	uint64_t quiet_cqes, quiet_seq, quiet_since, last_look;
	uint32_t look_next;     /* which other server of the rank to ask next */
	/* how to connect again after a failure (cl_reconnect) */
	struct rdmaps__server_addr sa;
	char src[RDMAPS_ADDR_MAX];
	char token[RDMAPS_TOKEN_MAX + 1];

	struct read_slot rs[CL_READ_SLOTS];
	uint32_t rs_free[CL_READ_SLOTS];
	uint32_t nrs_free;

	/* index windows (two-copy pulls, copies.c): two, so the next window's
	 * READs start while the last one waits for its validation */
	struct cl_window win[CL_WINDOWS];

	/* snapshots (snapshot.c): read slots waiting for one, oldest first,
	 * and the one being served (asked; or its READ posted) */
	uint32_t snap_q[CL_READ_SLOTS];
	uint32_t snap_n;
	uint32_t snap_s;        /* CL_RS_NONE: none */
	enum { CL_SNAP_IDLE, CL_SNAP_ASKED, CL_SNAP_REPLIED, CL_SNAP_READING } snap_phase;
	uint32_t snap_req;      /* the request id it was asked with */
	uint64_t snap_addr;     /* REPLIED: where to READ it */
	uint32_t snap_rkey, snap_len;
};

struct rdmaps_client {
	struct cl_conn *conn;
	uint32_t nconn;
	struct ibv_pd *pds[RDMAPS_MAX_SERVERS]; /* NULL: its device was removed */
	uint32_t npd;
	bool rescanned; /* librdmacm may hold other devices: rescan on failures */
	int timeout_ms;
	int ack_timeout_ms; /* 0: rdma_cm's (rdmaps__cm_ack_timeout) */
	int64_t spin_ns; /* a waiter busy-polls this long, then sleeps; < 0: never (ops.c) */
	uint32_t snap_after; /* torn READs of a chunk before a snapshot (snapshot.c) */
	int broken; /* first connection failure, until cl_reconnect mends it */
	bool lost;  /* pushes a failure lost: the next flush says so, once */
	bool dropped_unseen; /* a broken connection's server refused slots: flush says so */

	struct rdmaps_op ops[CL_MAX_OPS];
	uint32_t ops_hi; /* ops at or above this index are free: loops stop here */
	/* ops with work left to post, oldest first: freed READ slots and send
	 * queue room go to the oldest op, so async ops finish in the order they
	 * started and a new one never starves an older one (op index, gen) */
	struct { uint32_t idx, gen; } postq[CL_MAX_OPS];
	uint32_t npostq;
	rdmaps_mr *mrs;
	rdmaps_tensor *tensors;
	struct rdmaps_client_stats stats;
};

/* ops.c */
void cl_progress(rdmaps_client *c);
/* Queue op for posting, oldest first (once; it may be queued already). */
void cl_postq_add(rdmaps_client *c, rdmaps_op *op);
int cl_op_start(rdmaps_client *c, enum op_kind kind, rdmaps_tensor *t, float *buf,
		unsigned flags, bool assign, rdmaps_op **out);
/* The same, for the parts [lo, hi) of t only (initial values of one part). */
int cl_op_start_parts(rdmaps_client *c, enum op_kind kind, rdmaps_tensor *t, float *buf,
		      unsigned flags, bool assign, uint32_t lo, uint32_t hi, rdmaps_op **out);
int cl_op_wait(rdmaps_op *op, int timeout_ms);
uint64_t cl_folded_seq(const struct cl_conn *k);
/* Shared with rows.c: an op's index in the client's table; the caller's
 * registration covering [p, p+len), if any; a free READ slot of k set up
 * for chunk `local` of part p landing dst_off floats into op's buffer, and
 * its READ; a free op set up and not posted; the clipping scale of a whole
 * push; posting what op may post now. All on the client's own thread. */
uint32_t cl_op_index(const rdmaps_op *op);
/* Give op its result, unless it has one already. */
void cl_op_finish(rdmaps_op *op, int status);
rdmaps_mr *cl_find_mr(rdmaps_client *c, const void *p, size_t len);
uint32_t cl_rs_take(struct cl_conn *k, rdmaps_op *op, uint32_t p, uint32_t local,
		    uint64_t dst_off);
int cl_post_read(struct cl_conn *k, rdmaps_op *op, uint32_t s);
int cl_op_alloc(rdmaps_client *c, enum op_kind kind, rdmaps_tensor *t, float *buf,
		unsigned flags, bool assign, uint32_t lo, uint32_t hi, rdmaps_op **out);
float cl_clip_scale(const float *g, uint64_t n, float clip);
void cl_op_post(rdmaps_op *op);

/* reads.c: a pull's READs. One READ for the chunks of slots s[0..n)
 * (consecutive chunks of one part and copy, float32 or of the 16-bit
 * copy), or for slot s alone; 0 or an rdmaps_err, nothing posted.
 * cl_read_done checks what slot s's READ brought, and reads it again or
 * counts it done. */
int cl_post_reads(struct cl_conn *k, rdmaps_op *op, const uint32_t *s, uint32_t n);
/* Where a READ for slot rs puts its len bytes of values: the caller's
 * registered buffer, or the slot's bounce (cl_read_done copies out). */
struct ibv_sge cl_read_values(const struct cl_conn *k, const rdmaps_op *op,
			      const struct read_slot *rs, uint32_t len);
void cl_read_done(struct cl_conn *k, uint32_t s);
/* A chunk of count floats is read whole into its slot's scratch, with one
 * SGE, and copied out (rxe pays per SGE more than copying ~200 B costs);
 * such a READ is always alone. */
static inline bool cl_read_whole(uint32_t count)
{
	return rdmaps__chunk_read_len(count) <= CL_SCRATCH;
}

/* snapshot.c: slot s's READs tore snap_after times: queue it for a
 * snapshot (it stays in flight with its op); a SNAPSHOT_REPLY received; a
 * READ of slot s completed (frees the server's buffer if it was the
 * snapshot's); the connection failed (slots waiting are given back failed
 * with err); a fresh connection. */
void cl_snap_ask(struct cl_conn *k, uint32_t s);
/* Post what a snapshot waits to post, when the send queue has room. */
void cl_snap_kick(struct cl_conn *k);
void cl_snap_reply(struct cl_conn *k, const void *msg, uint32_t len);
void cl_snap_read_done(struct cl_conn *k, uint32_t s);
void cl_snap_fail(struct cl_conn *k, int err);
void cl_snap_reset(struct cl_conn *k);

/* rows.c: posting a sparse pull, or part p of a sparse push; < 0 on failure */
int cl_rows_post_pull(rdmaps_op *op);
int cl_rows_post_push(rdmaps_op *op, uint32_t p);

/* resume.c: after a reconnect, settle the pushes of a broken connection
 * (re-post what did not fold, or fail the op); or, when no reconnect was
 * possible, fail every push still waiting with err. */
int cl_resume(rdmaps_client *c, struct cl_conn *k, bool restarted);
/* The settling itself, given the account: every seq of k's broken
 * connection below folded was folded (known: the server said so; else
 * what its credits said). No I/O. */
void cl_settle(rdmaps_client *c, struct cl_conn *k, uint64_t folded, bool known, bool restarted);
void cl_resume_fail(rdmaps_client *c, int err);
/* A push op waiting for its connection to be settled. */
bool cl_op_unsettled(const rdmaps_op *op);
/* The part of op's tensor on server k, or UINT32_MAX. */
uint32_t cl_op_part_on(const rdmaps_op *op, uint32_t k);

/*
 * compress.c: a gradient in fewer bytes (common/gradfmt.h). An error
 * feedback state holds one tensor's residual (what earlier pushes did not
 * send); it belongs to one caller, not thread-safe. The encoders write the
 * payload to out (rdmaps__gradfmt_size bytes at most for their format:
 * TOPK with k, SIGN, BF16/F16 with n) and return its length; they do not
 * allocate. TOPK and SIGN return 0 and change nothing unless cl_ef_fits
 * (a value that is not finite would stay in the residual).
 */
struct cl_ef {
	float *residual; /* n floats, zero to start */
	size_t n;
};
int cl_ef_init(struct cl_ef *ef, size_t n); /* 0 or RDMAPS_ENOMEM */
void cl_ef_close(struct cl_ef *ef);
/* Whether residual r + g is sure to be finite: every magnitude on both
 * sides below 2^127 (an integer test of the bits). */
bool cl_ef_fits(const float *r, const float *g, size_t n);
/* The k largest magnitudes of residual + g (indices ascending); the rest
 * stays in the residual. k above n means n. */
size_t cl_encode_topk(struct cl_ef *ef, const float *g, size_t k, void *out);
/* Signs of residual + g and their mean magnitude (EF-signSGD). */
size_t cl_encode_sign(struct cl_ef *ef, const float *g, void *out);
/* g as bf16 or fp16, rounded to nearest even; no residual. */
size_t cl_encode_half(bool bf16, const float *g, size_t n, void *out);

/*
 * A tensor's compressed pushes (rdmaps_set_push_format): the whole
 * gradient encoded chunk by chunk into one registered buffer, so that a
 * push posted again after a reconnect sends the very bytes it sent before
 * (encoding again would count the residual twice).
 */
struct cl_wire {
	unsigned fmt;       /* RDMAPS__GRAD_*, not F32 */
	double fraction;    /* TOPK */
	struct cl_ef ef;    /* TOPK, SIGN: the residual, length floats */
	uint8_t *buf;       /* nchunks x stride bytes */
	size_t stride;      /* chunk_elems x 4: what a slot's payload holds */
	uint32_t *len;      /* per chunk: its encoded payload's bytes */
	rdmaps_mr *mr;
	const rdmaps_op *op; /* the push sending buf, while its gen holds */
	uint32_t op_gen;
};
/* Whether g may be pushed in t's format now: RDMAPS_EBUSY while the last
 * push is in flight, RDMAPS_EINVAL for a value it cannot carry. No change. */
int cl_wire_check(const rdmaps_tensor *t, const float *g);
/* Encode g for op (after cl_wire_check said yes): fills the buffer, moves
 * the residual. */
void cl_wire_encode(rdmaps_tensor *t, const float *g, rdmaps_op *op);
void cl_wire_free(rdmaps_tensor *t);

/* copies.c: pulls of two-copy tensors (docs/design.md, "Two copies") */
int cl_ix_ready(struct cl_conn *k, rdmaps_op *op, uint32_t p, uint64_t *word);
void cl_ix_posted(struct cl_conn *k, rdmaps_op *op, uint32_t s);
void cl_ix_defer(struct cl_conn *k, rdmaps_op *op, uint32_t s, const struct rdmaps_chunk_hdr *h);
void cl_ix_done(struct cl_conn *k, rdmaps_op *op, uint32_t s);
void cl_ix_complete(struct cl_conn *k, uint32_t seq);

/* control.c */
int cl_rpc(struct cl_conn *k, void *msg, uint32_t len, uint16_t want_type, void *reply,
	   uint32_t reply_len);

/* control.c: one server's counters (rdmaps_server_stats sums them). */
int cl_server_stats(struct cl_conn *k, struct rdmaps_server_stats *out);
/* control.c: re-fetch the parts of t held by server k (new address, rkey). */
int cl_refresh_parts(rdmaps_client *c, struct cl_conn *k);

/* connect.c */
uint8_t *cl_send_buf(struct cl_conn *k);
uint8_t *cl_snap_buf(struct cl_conn *k); /* a SNAPSHOT request's own send buffer */
uint8_t *cl_recv_buf(struct cl_conn *k, uint32_t i);
uint8_t *cl_slot_hdr(struct cl_conn *k, uint32_t slot);
int cl_post_recv(struct cl_conn *k, uint32_t i);
void cl_fail(struct cl_conn *k, int err, const char *why);
/* connect.c, shared with failover.c: making and letting go of a connection.
 * What an attempt builds (id, QP, CQ, regions) is k's until cl_conn_release;
 * the PDs and the user's registrations are the client's. All on the
 * client's own thread. */
/* One connect of k to sa, building k's resources; an ask (look_around) stops once the
 * server accepted, before the staging buffers. 0 or an rdmaps_err; k keeps what it built. */
int cl_conn_attempt(struct cl_conn *k, const struct rdmaps__server_addr *sa, const char *src,
		    const char *token, int timeout, bool ask);
/* cl_conn_attempt, not an ask: the whole connection, staging buffers too. */
int cl_conn_try(struct cl_conn *k, const struct rdmaps__server_addr *sa, const char *src,
		const char *token, int timeout);
/* Connect k to sa, with back-off while cl_retryable, until timeout_ms; logs a failure. */
int cl_conn_open(struct cl_conn *k, const struct rdmaps__server_addr *sa, const char *src,
		 const char *token, int timeout_ms);
/* Free what k's attempt built (disconnecting first unless broken); the PD stays the client's. */
void cl_conn_release(struct cl_conn *k);
/* Clear k's resource pointers, freeing nothing: k holds none (freed, or a copy's). */
void cl_conn_forget(struct cl_conn *k);
/* Errors that mean "not up yet" and are worth another try. */
bool cl_retryable(int rc);
/* Have librdmacm rescan its device list (it closes removed devices then); sets c->rescanned. */
void cl_rescan_devices(rdmaps_client *c);
/* The device under PD slot i was removed: once no connection uses it, drop the user's
 * registrations there and the PD, and rescan. */
void cl_pd_drop(rdmaps_client *c, uint32_t i);

/* failover.c: a worker finding its rank's server again. */
/* Connect again every broken connection and refresh the catalog; 0 if none broken. */
int cl_reconnect(rdmaps_client *c);
/* Look for an rdma_cm disconnect without blocking (rate-limited). */
void cl_check_cm(struct cl_conn *k);

#endif
