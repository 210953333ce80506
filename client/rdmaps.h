/*
 * rdmaps.h -- the one public header of librdmaps, an RDMA parameter server
 * client.
 *
 * Model: a server holds named float32 tensors in memory registered for remote
 * READ only. A worker pulls a tensor with one-sided RDMA READs (no server CPU)
 * and pushes gradients with RDMA WRITE-with-immediate into a staging ring that
 * only its own connection may write; server threads fold staged gradients into
 * the model through the tensor's optimizer.
 *
 * Conventions (the same everywhere):
 *  - Every function that can fail returns 0 or a negative `enum rdmaps_err`;
 *    rdmaps_strerror() names it. errno is never the error channel.
 *  - Handles are opaque. Each constructor has exactly one destructor that
 *    accepts NULL.
 *  - Thread-safety: an rdmaps_client and everything obtained from it (tensors,
 *    registrations, ops) is used by one thread at a time; use one client per
 *    thread for parallelism. Different clients are fully independent.
 *  - Ownership is stated on each function.
 *
 * SPDX-License-Identifier: BSD-2-Clause
 */
#ifndef RDMAPS_H
#define RDMAPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RDMAPS_VERSION_MAJOR 0
#define RDMAPS_VERSION_MINOR 1
#define RDMAPS_VERSION_PATCH 0

/*
 * One list makes both the enum and rdmaps_strerror(), so they cannot drift.
 * Values are stable: they travel on the wire in error replies.
 */
#define RDMAPS_ERR_MAP(X)                                                      \
	X(INVAL, 1, "invalid argument")                                        \
	X(NOMEM, 2, "out of memory")                                           \
	X(NODEV, 3, "no RDMA device for this address")                        \
	X(MEMLOCK, 4, "memory registration failed: RLIMIT_MEMLOCK too low")   \
	X(CONNECT, 5, "cannot connect to server")                              \
	X(REJECTED, 6, "connection rejected by server")                        \
	X(AUTH, 7, "authentication failed (wrong or missing token)")          \
	X(PROTO, 8, "protocol error (malformed or unexpected message)")        \
	X(VERSION, 9, "unsupported protocol version")                          \
	X(NOENT, 10, "no such tensor")                                         \
	X(EXIST, 11, "tensor exists with a conflicting declaration")           \
	X(RANGE, 12, "size or offset out of range")                            \
	X(TIMEDOUT, 13, "operation timed out")                                 \
	X(AGAIN, 14, "operation still in progress")                            \
	X(TORN, 15, "tensor kept changing during the read (retries exhausted)") \
	X(DISCONNECTED, 16, "connection to server lost")                       \
	X(VERBS, 17, "RDMA verbs call failed")                                 \
	X(BUSY, 18, "too many operations in flight")                           \
	X(LIMIT, 19, "server limit reached")                                   \
	X(NOTREG, 20, "buffer not registered")                                 \
	X(REMOTE, 21, "server reported an error for a staged push")            \
	X(SYS, 22, "system call failed")                                       \
	X(NOTSUP, 23, "not supported")

enum rdmaps_err {
	RDMAPS_OK = 0,
#define RDMAPS__ERR_ENUM(name, val, msg) RDMAPS_E##name = -(val),
	RDMAPS_ERR_MAP(RDMAPS__ERR_ENUM)
#undef RDMAPS__ERR_ENUM
};

/* Static string for any value (unknown values get a generic text). Thread-safe. */
const char *rdmaps_strerror(int err);
/* Symbolic name, e.g. "RDMAPS_ENOENT". Thread-safe. */
const char *rdmaps_err_name(int err);

typedef struct rdmaps_client rdmaps_client;
typedef struct rdmaps_tensor rdmaps_tensor;
typedef struct rdmaps_mr rdmaps_mr;
typedef struct rdmaps_op rdmaps_op;

/* ---- connection ------------------------------------------------------- */

struct rdmaps_connect_opts {
	const char *host;      /* server address or name (required) */
	const char *port;      /* service/port; NULL -> "7471" */
	const char *src_addr;  /* local address to bind (selects the device); may be NULL */
	const char *token;     /* shared secret, at most 32 bytes; NULL -> none */
	int timeout_ms;        /* connect and control-RPC timeout; 0 -> 5000 */
};

/*
 * Connect to one server. On success *out owns the connection; free it with
 * rdmaps_close(). Blocks up to opts->timeout_ms.
 */
int rdmaps_connect(const struct rdmaps_connect_opts *opts, rdmaps_client **out);

/*
 * Connect to every server of a cluster (docs/cluster.md). Servers, token,
 * local address and timeout come from opts where set, else from RDMAPS_*
 * variables, else from the INI file (opts->config, else $RDMAPS_CONFIG).
 * A server that is not up yet is retried with back-off until timeout_ms; then
 * the call fails naming it (logged) with RDMAPS_ECONNECT. Tensors are split
 * over the servers by a deterministic placement; pulls and pushes fan out to
 * all of them at once. On success *out owns every connection.
 */
struct rdmaps_cluster_opts {
	const char *config;   /* INI file; NULL: $RDMAPS_CONFIG if set */
	const char *servers;  /* "host[:port],host[:port]..."; NULL: config/env */
	const char *src_addr; /* local address; NULL: config/env (src, device, gid_index) */
	const char *token;    /* NULL: config/env */
	int timeout_ms;       /* per server, retries included; 0: config/env, else 10000 */
};
int rdmaps_connect_cluster(const struct rdmaps_cluster_opts *opts, rdmaps_client **out);

/* Number of servers the client is connected to. */
uint32_t rdmaps_num_servers(const rdmaps_client *c);

/*
 * Rank and size of this process as its launcher set them (Slurm, Open MPI,
 * PMI, torchrun, ps-lite's DMLC_*, or RDMAPS_RANK/RDMAPS_SIZE); -1 when
 * unknown. Returns 0, or RDMAPS_EINVAL for a malformed RDMAPS_* variable.
 */
int rdmaps_launch_info(int *rank, int *size);

/*
 * Failures (docs/durability.md): when a server dies or a link drops, the
 * pulls in flight fail with RDMAPS_EDISCONNECTED, and the next call on the
 * client reconnects (with back-off, up to the connect timeout), re-fetches
 * the catalog of its tensors (new addresses and rkeys) and goes on; a server
 * restarted from a checkpoint has them back. Pushes in flight wait for that
 * reconnect instead, which asks the server what the broken connection
 * folded: a push returns 0 when it is folded (or staged) exactly once,
 * dense ASP pushes posting again what did not fold (resent_slots);
 * RDMAPS_EDISCONNECTED when it was not folded (BSP/SSP, rows, or a server
 * that cannot say); the reconnect's error when the server could not be
 * reached. Slots that never fold are counted in lost_pushes, and the next
 * rdmaps_flush() returns RDMAPS_EDISCONNECTED once for them. A server
 * restarted from a checkpoint older than the connection's end cannot say:
 * its restart (server_restarts) is reported the same way, folded pushes or
 * not, since the model is back at that checkpoint.
 */

/*
 * Close the connection and free every tensor handle, registration and op
 * obtained from it. Outstanding ops are abandoned (their buffers may still be
 * written until this returns, never after). NULL is a no-op.
 */
void rdmaps_close(rdmaps_client *c);

/* ---- tensors ---------------------------------------------------------- */

/*
 * Server-side optimizers; their state (momentum, moments) lives on the server
 * beside the parameters. Hyper-parameters left at 0 take the default noted.
 */
enum rdmaps_optimizer {
	RDMAPS_OPT_SGD = 0,      /* p -= lr * (g + wd * p) */
	RDMAPS_OPT_MOMENTUM = 1, /* v = m * v + g + wd * p; p -= lr * v   (m default 0.9) */
	RDMAPS_OPT_NESTEROV = 2, /* as momentum, p -= lr * (g + m * v) */
	RDMAPS_OPT_ADAGRAD = 3,  /* s += g^2; p -= lr * g / (sqrt(s) + eps)   (eps 1e-10) */
	RDMAPS_OPT_ADAM = 4,     /* bias-corrected moments (b1 0.9, b2 0.999, eps 1e-8); wd as L2 */
	RDMAPS_OPT_ADAMW = 5,    /* Adam with decoupled weight decay: p -= lr * wd * p */
};

/*
 * Wire formats: fewer bytes on the wire for a bandwidth-bound model.
 * Pushes (rdmaps_set_push_format): the server decodes each push (refusing
 * any that is malformed, whole) and folds it into its float32 master as it
 * folds a float32 push; the optimizer is unchanged (docs/protocol.md,
 * "Gradient formats"). Pulls (rdmaps_tensor_desc.pull_format): BF16 and
 * FP16 only, from a 16-bit copy the server keeps beside the master.
 *  RDMAPS_FMT_F32   float32, the default.
 *  RDMAPS_FMT_BF16  bfloat16: half the bytes, float32's range, 8 bits of
 *                   mantissa; rounded to nearest even.
 *  RDMAPS_FMT_FP16  IEEE binary16: half the bytes, 11 bits of mantissa,
 *                   values up to 65504 (a push past that is refused).
 *  RDMAPS_FMT_TOPK  per chunk, the ceil(fraction x count) values of the
 *                   largest magnitude and their indices, 8 bytes each.
 *  RDMAPS_FMT_SIGN  per chunk, one bit per element and one scale (the
 *                   mean magnitude, EF-signSGD): about 1/32 of the bytes.
 * TOPK and SIGN keep error feedback on the worker: what a push did not
 * send is added to the tensor's next push, so nothing is lost, only
 * delayed. The values match common/gradfmt.h's.
 */
enum rdmaps_format {
	RDMAPS_FMT_F32 = 0,
	RDMAPS_FMT_BF16 = 1,
	RDMAPS_FMT_FP16 = 2,
	RDMAPS_FMT_TOPK = 3,
	RDMAPS_FMT_SIGN = 4,
};

#define RDMAPS_NAME_MAX 63

struct rdmaps_tensor_desc {
	const char *name;           /* 1..RDMAPS_NAME_MAX bytes, unique per server */
	uint64_t length;            /* number of float32 elements (> 0) */
	const float *init;          /* initial values (length elements) or NULL */
	float init_value;           /* used when init is NULL */
	enum rdmaps_optimizer optimizer;
	float lr;                   /* learning rate */
	float momentum;             /* MOMENTUM, NESTEROV */
	float beta1, beta2, eps;    /* ADAM, ADAMW (eps also ADAGRAD) */
	float weight_decay;         /* all optimizers; 0 = none */

	/*
	 * Consistency (docs/consistency.md). Every push of a BSP/SSP tensor is
	 * one clock of this worker for it; the handle counts them
	 * (rdmaps_tensor_clock). ASP (the default): pulls see whatever is
	 * folded. BSP: a pull at clock c sees exactly every member's pushes of
	 * clocks < c, aggregated once per clock (sum, or mean with
	 * aggregate_mean). SSP: a pull at clock c sees at least every push of
	 * clocks < c - staleness; pushes fold as they come.
	 */
	enum rdmaps_consistency {
		RDMAPS_ASP = 0,
		RDMAPS_BSP = 1,
		RDMAPS_SSP = 2,
	} consistency;
	uint32_t staleness;         /* SSP bound s */
	uint32_t workers;           /* BSP/SSP: members to wait for before clock 0 ends */
	int aggregate_mean;         /* BSP: apply the mean instead of the sum */
	float clip_norm;            /* > 0: scale each push so its L2 norm is at most this */

	/*
	 * > 0: a sparse table of length / row_dim rows (an embedding). Rows are
	 * pulled and pushed by id (rdmaps_pull_rows / rdmaps_push_rows), each
	 * row guarded on its own against torn reads. row_dim must divide
	 * length and fit the server's chunk size. Row pushes need ASP.
	 */
	uint32_t row_dim;

	/*
	 * The format pulls READ: RDMAPS_FMT_F32 (default), or RDMAPS_FMT_BF16 /
	 * RDMAPS_FMT_FP16: the server keeps the float32 master and the
	 * optimizer state, and publishes a 16-bit copy of each chunk with every
	 * fold, never torn as the master; a pull READs half the bytes and
	 * rdmaps_pull converts them to float (rdmaps_pull_half keeps them as
	 * they are). Part of the declaration (another format is a conflict).
	 * Dense tensors only.
	 */
	enum rdmaps_format pull_format;
};

/*
 * Declare a tensor, or attach to it if it exists with the same length and
 * optimizer settings (idempotent: every worker may declare the same tensor).
 * Initial values of the first declaration win. A conflicting declaration
 * returns RDMAPS_EEXIST. *out is owned by the client (freed by rdmaps_close).
 */
int rdmaps_declare(rdmaps_client *c, const struct rdmaps_tensor_desc *desc,
		   rdmaps_tensor **out);

/* Attach to an existing tensor by name; RDMAPS_ENOENT if unknown. */
int rdmaps_lookup(rdmaps_client *c, const char *name, rdmaps_tensor **out);

/* Number of float32 elements of a tensor. */
uint64_t rdmaps_tensor_length(const rdmaps_tensor *t);
/* This worker's clock for t: its completed pushes (BSP/SSP), else 0. */
uint64_t rdmaps_tensor_clock(const rdmaps_tensor *t);
/* Elements of t held by server index `server` (placement; 0 if none). */
uint64_t rdmaps_tensor_server_elems(const rdmaps_tensor *t, uint32_t server);

/* ---- zero-copy registration ------------------------------------------ */

/*
 * Register [buf, buf+len) once with the NIC so pulls land in it and pushes
 * send from it without copies. Unregistered buffers still work through an
 * internal bounce buffer (one extra copy). The buffer must outlive the
 * registration; free the registration (rdmaps_deregister) before the memory.
 * A registration follows the devices the client uses: made on a device that
 * comes into use later, dropped from one that is removed, and made again
 * when it is back (docs/durability.md); the handle stays the same.
 */
int rdmaps_register(rdmaps_client *c, void *buf, size_t len, rdmaps_mr **out);
/* NULL is a no-op. Must not be called while an op uses the buffer. */
void rdmaps_deregister(rdmaps_mr *mr);

/* ---- pull and push ---------------------------------------------------- */

enum rdmaps_flags {
	/* pull: skip the torn-read check (Hogwild-style training). */
	RDMAPS_PULL_RELAXED = 1u << 0,
	/* push: complete only once the server has folded the gradient. */
	RDMAPS_PUSH_FOLDED = 1u << 1,
};

/*
 * Pull the whole tensor into dst (length floats). Blocking. Never returns a
 * torn chunk: every chunk is checked (version + checksum) and re-read while
 * it races a fold, up to a retry budget (RDMAPS_ETORN past it). A BSP pull
 * is one state across all chunks and servers; an ASP/SSP pull of several
 * chunks may hold chunks from before and after a push (docs/design.md,
 * "What a pull returns").
 */
int rdmaps_pull(rdmaps_client *c, rdmaps_tensor *t, float *dst, unsigned flags);

/*
 * A tensor declared with a 16-bit pull format: pull its 16-bit copy as it
 * is, length values (bfloat16 or IEEE half, as declared) into dst. Same
 * guarantees and flags as rdmaps_pull; RDMAPS_EINVAL for a float32 tensor.
 * Zero-copy when dst is registered (length * 2 bytes).
 */
int rdmaps_pull_half(rdmaps_client *c, rdmaps_tensor *t, uint16_t *dst, unsigned flags);
int rdmaps_pull_half_async(rdmaps_client *c, rdmaps_tensor *t, uint16_t *dst, unsigned flags,
			   rdmaps_op **op);
/* t's pull format (declared). */
enum rdmaps_format rdmaps_pull_format(const rdmaps_tensor *t);

/*
 * Push a gradient (length floats) for the tensor. Blocking. Returns once the
 * gradient is staged in server memory (the RDMA WRITE is acknowledged), or,
 * with RDMAPS_PUSH_FOLDED, once the server has folded it into the model:
 * exactly once, across a broken connection too. If a connection breaks
 * under it, the push waits for the reconnect (up to the connect timeout),
 * learns what the server folded, and posts again what did not fold (dense
 * ASP); RDMAPS_EDISCONNECTED means it was not folded (docs/durability.md,
 * "Exactly once").
 * The gradient buffer may be reused as soon as this returns. A BSP tensor
 * takes one push per clock: a second push before a (checked) pull of the
 * worker's clock returns RDMAPS_EINVAL and changes nothing.
 */
int rdmaps_push(rdmaps_client *c, rdmaps_tensor *t, const float *grad, unsigned flags);

/*
 * Asynchronous forms: post, then rdmaps_test()/rdmaps_wait(). The buffer
 * must stay untouched until the op completes. *op is owned by the client and
 * released by the rdmaps_test()/rdmaps_wait() call that reports completion.
 * A client has at most RDMAPS_MAX_OPS ops in flight (pulls and pushes, rows
 * too); one more returns RDMAPS_EBUSY and posts nothing. Pushes beyond the
 * server's staging ring (its --slots) are not an error: they wait, in
 * order, for the ring's credits.
 */
#define RDMAPS_MAX_OPS 64
int rdmaps_pull_async(rdmaps_client *c, rdmaps_tensor *t, float *dst, unsigned flags,
		      rdmaps_op **op);
int rdmaps_push_async(rdmaps_client *c, rdmaps_tensor *t, const float *grad,
		      unsigned flags, rdmaps_op **op);

/* Progress without blocking: RDMAPS_EAGAIN while pending, else the result.
 * (After a connection broke under a push, the call that reconnects blocks
 * up to the connect timeout.) */
int rdmaps_test(rdmaps_op *op);
/* Block until done or timeout_ms (<0: forever). RDMAPS_ETIMEDOUT keeps the op. */
int rdmaps_wait(rdmaps_op *op, int timeout_ms);

/*
 * Sparse tables: pull or push only the rows named. rows[i] < rows of t;
 * dst / grad hold n * row_dim floats, row i at i * row_dim. A pull posts
 * one READ per row, all before waiting (they pipeline: many rows cost about
 * one round trip plus their bytes); a push packs ids and values into
 * staging slots and the server folds only those rows. A row named twice in
 * one push is folded twice. Blocking; flags as for rdmaps_pull/push.
 */
int rdmaps_pull_rows(rdmaps_client *c, rdmaps_tensor *t, const uint64_t *rows, size_t n,
		     float *dst, unsigned flags);
int rdmaps_push_rows(rdmaps_client *c, rdmaps_tensor *t, const uint64_t *rows, size_t n,
		     const float *grad, unsigned flags);
/* Asynchronous forms, as rdmaps_pull_async/push_async: rows and the buffer
 * must both stay untouched until the op completes (a push gathers rows
 * into staging slots as slots free up). */
int rdmaps_pull_rows_async(rdmaps_client *c, rdmaps_tensor *t, const uint64_t *rows, size_t n,
			   float *dst, unsigned flags, rdmaps_op **op);
int rdmaps_push_rows_async(rdmaps_client *c, rdmaps_tensor *t, const uint64_t *rows, size_t n,
			   const float *grad, unsigned flags, rdmaps_op **op);
/* Row length of a sparse table, 0 for a dense tensor. */
uint32_t rdmaps_tensor_row_dim(const rdmaps_tensor *t);

/*
 * Wait until every push posted so far on this client has been folded by the
 * server. RDMAPS_EREMOTE if the server dropped any of them (see stats).
 */
int rdmaps_flush(rdmaps_client *c, int timeout_ms);

/* ---- wire formats of pushes ------------------------------------------- */


/*
 * Set the format of t's dense pushes from now on; initial values and
 * sparse row pushes stay float32. topk_fraction: for RDMAPS_FMT_TOPK, in
 * (0, 0.5]; ignored otherwise. Allocates and registers t's wire buffer (an
 * encoded chunk per chunk) and, for TOPK and SIGN, a residual of length
 * floats, zero; setting a format again starts a new residual. Returns
 * RDMAPS_EINVAL for an unknown format or fraction, RDMAPS_EBUSY while a
 * push of t is in flight, RDMAPS_ENOMEM / RDMAPS_EMEMLOCK.
 * With a format other than F32 a push encodes the gradient when it is
 * posted: the caller may reuse the buffer as soon as rdmaps_push_async
 * returns. A gradient holding NaN or inf (or, for FP16, a value past its
 * range) is refused there with RDMAPS_EINVAL and changes nothing, the
 * residual included. A tensor has one such push in flight at a time: one
 * more before it completes returns RDMAPS_EBUSY and changes nothing.
 * Owned by the client; the client's own thread, as every call on it.
 */
int rdmaps_set_push_format(rdmaps_client *c, rdmaps_tensor *t, enum rdmaps_format fmt,
			   double topk_fraction);
/* t's push format (RDMAPS_FMT_F32 when never set). */
enum rdmaps_format rdmaps_push_format(const rdmaps_tensor *t);

/* ---- statistics ------------------------------------------------------- */

struct rdmaps_client_stats {
	uint64_t pulls, pushes, pull_retries, bounce_copies;
	uint64_t stale_retries; /* chunk re-reads waiting for a BSP/SSP clock */
	uint64_t reconnects;    /* connections re-established after a failure */
	uint64_t lost_pushes;   /* staged slots not known to be folded when a link broke */
	uint64_t reads;         /* pull READs posted: one spans up to 8 consecutive
				 * chunks of a server, index READs not counted */
	uint64_t server_restarts; /* reconnects that found a restarted server: the
				   * model rolled back to its last checkpoint */
	uint64_t resent_slots;  /* staged slots a broken connection did not fold,
				 * posted again after the reconnect (exactly once) */
	uint64_t push_bytes;    /* payload bytes of dense pushes posted, in their
				 * wire format (headers not counted) */
	uint64_t snapshots;     /* chunks a pull READ from a server's snapshot after
				 * its READs of them tore RDMAPS_SNAPSHOT_AFTER times */
	uint64_t failovers;     /* reconnects that found a rank on another server:
				 * its primary died and a backup took it over */
};

struct rdmaps_server_stats {
	uint64_t connections;    /* currently connected workers */
	uint64_t tensors;
	uint64_t folds;          /* staged slots folded */
	uint64_t dropped;        /* staged slots refused (bad header, replay) */
	uint64_t bad_messages;   /* control messages refused */
	uint64_t auth_failures;
	uint64_t disconnects;
	uint64_t nonfinite;      /* pushes refused for NaN or infinity */
	uint64_t clipped;        /* pushes scaled down to their tensor's clip norm */
	uint64_t evictions;      /* members evicted from a BSP/SSP clock for stalling */
	uint64_t checkpoints;    /* checkpoints written since start */
	uint64_t checkpoint_failures;
	uint64_t restored_seq;   /* checkpoint restored at start (0: none) */
	/* registration (docs/design.md, "Memory and access rights") */
	uint64_t shared_devices;   /* devices where the model is registered once */
	uint64_t memory_regions;   /* MRs the server holds */
	uint64_t memory_windows;   /* staging windows bound to workers' QPs */
	uint64_t registered_bytes; /* bytes under all those MRs (what the NIC pins) */
	uint64_t staging_bytes;    /* workers' staging rings, together */
	uint64_t staging_budget;   /* what they may take (--staging-mb) */
	uint64_t huge_page_bytes;  /* server memory in transparent huge pages (tensors
				    * of 2 MiB or more ask for them) */
	uint64_t completion_queues; /* CQs the fold threads poll: one per thread and
				     * device for each 56 workers (default slots) */
	uint64_t snapshots;         /* chunks copied whole for a pull whose READs of
				     * them kept tearing (RDMAPS_SNAPSHOT_AFTER) */
	/* replicas (cluster key replicas > 1; docs/durability.md) */
	uint64_t backups;           /* backups of this server's parts connected and
				     * caught up: acknowledgements wait for them */
	uint64_t replicated_chunks; /* chunks written to backups */
	uint64_t backup_failures;   /* backups lost (their writes failed, or no answer) */
	uint64_t unreplicated_acks; /* pushes acknowledged folded while a backup was missing */
	/* the authority (server --etcd; docs/durability.md, "Who is primary") */
	uint64_t epoch;             /* the epoch of this server's claim on its rank (0: none,
				     * or no authority); a cluster's: the largest */
	uint64_t lease_losses;      /* times its lease ended unrenewed: folds stopped */
	uint64_t failovers;         /* ranks whose primary died that it took over (its own
				     * among them when it took its rank back from its copy) */
	uint64_t handbacks;         /* ranks taken over and given back to their own server */
};

/*
 * Every field of struct rdmaps_server_stats, in order, for code that prints
 * or sums them (rdmaps-ctl, the Python module): XX(name). A cluster's
 * rdmaps_server_stats sums each over the servers, but restored_seq and
 * epoch, the largest.
 */
#define RDMAPS_SERVER_STATS_MAP(XX)                                                           \
	XX(connections) XX(tensors) XX(folds) XX(dropped) XX(bad_messages) XX(auth_failures)  \
	XX(disconnects) XX(nonfinite) XX(clipped) XX(evictions) XX(checkpoints)               \
	XX(checkpoint_failures) XX(restored_seq) XX(shared_devices) XX(memory_regions)        \
	XX(memory_windows) XX(registered_bytes) XX(staging_bytes) XX(staging_budget)          \
	XX(huge_page_bytes) XX(completion_queues) XX(snapshots) XX(backups)                   \
	XX(replicated_chunks) XX(backup_failures) XX(unreplicated_acks) XX(epoch)             \
	XX(lease_losses) XX(failovers) XX(handbacks)

/*
 * Ask every server to write a checkpoint now (servers started with
 * --checkpoint-dir) and wait until each has. RDMAPS_ENOTSUP from a server
 * without one; RDMAPS_EREMOTE if a server's write failed (its log says why).
 */
int rdmaps_checkpoint(rdmaps_client *c, int timeout_ms);

/* Local counters; never fails. */
void rdmaps_client_stats(const rdmaps_client *c, struct rdmaps_client_stats *out);
/* Ask the server over the control channel. */
int rdmaps_server_stats(rdmaps_client *c, struct rdmaps_server_stats *out);

#ifdef __cplusplus
}
#endif
#endif /* RDMAPS_H */
