/*
 * protocol.h -- the rdmaps wire protocol (RDMAPS_PROTO_VERSION). Every structure that
 * crosses the network is here, little-endian, fixed size, naturally aligned.
 * docs/protocol.md describes the same thing in prose; keep them together.
 *
 * Three channels share one RC queue pair per worker:
 *  1. connect private data (hello / welcome / reject) through rdma_cm;
 *  2. control messages: SEND/RECV, one request outstanding per worker,
 *     at most RDMAPS_MSG_MAX bytes each way;
 *  3. data: RDMA READ of model chunks (chunk.h), RDMA WRITE-with-immediate
 *     of gradients into the worker's staging slots, and the server's RDMA
 *     WRITE of the credit word back into the worker.
 */
#ifndef RDMAPS_COMMON_PROTOCOL_H
#define RDMAPS_COMMON_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

#include "rdmaps.h"

#define RDMAPS_PROTO_MAGIC 0x53504452u /* "RDPS" little-endian */
#define RDMAPS_PROTO_VERSION 14u /* 14: REPLICAS_REPLY's backups of parts taken over (docs/protocol.md) */
#define RDMAPS_DEFAULT_PORT "7471"
#define RDMAPS_TOKEN_MAX 32u
#define RDMAPS_MSG_MAX 4096u
#define RDMAPS_SLOT_HDR 24u
/* staging slots per worker: the server offers at most this many, and a
 * worker keeps a header per slot in its registered control region */
#define RDMAPS_MAX_SLOTS 256u

/* ---- connect private data --------------------------------------------- */

/* Client -> server in the connect request: 56 bytes, the IB CM maximum. */
struct rdmaps_wire_hello {
	uint32_t magic;
	uint16_t version;
	uint16_t token_len;
	uint64_t credit_addr; /* worker's credit word (struct rdmaps_wire_credit) */
	uint32_t credit_rkey;
	uint16_t flags;       /* RDMAPS_HELLO_* */
	uint16_t rank;        /* with a flag: the rank it is about (below) */
	uint8_t token[RDMAPS_TOKEN_MAX];
};
/*
 * The connecting process is the server of rank `rank`, which keeps its
 * backup copies on this one (docs/durability.md, "Replicated shards"): its
 * token is the servers' own (peer_token), never the workers', and the
 * connection may only open replicas (REPLICA_OPEN) and write into them.
 */
#define RDMAPS_HELLO_REPLICA 1u
/*
 * A worker that wants rank `rank`'s part: this server's own rank, or one
 * it took over from its replica when that rank's primary died
 * (docs/durability.md, "Failover"). Refused with RDMAPS_ENOENT where
 * that rank is not served now. Without the flag: this server's own part.
 */
#define RDMAPS_HELLO_RANK 2u
_Static_assert(sizeof(struct rdmaps_wire_hello) == 56, "hello must fit IB CM private data");

/* Server -> client in the accept. */
struct rdmaps_wire_welcome {
	uint32_t magic;
	uint16_t version;
	uint16_t replicas;     /* copies of each part: where a worker may fail over to */
	uint64_t staging_addr; /* this worker's ring; its rkey works on this QP only */
	uint32_t staging_rkey;
	uint32_t slot_count;
	uint32_t slot_size;    /* RDMAPS_SLOT_HDR + chunk_elems * 4 */
	uint32_t chunk_elems;
	uint32_t recv_depth;   /* receives the server keeps posted */
	uint32_t server_id;
	/*
	 * Random per server process, never 0. A worker that reconnects and finds
	 * another one knows the server restarted: what it folded after its last
	 * checkpoint (restored_seq; 0: none, it started empty) is gone.
	 */
	uint64_t instance;
	uint64_t restored_seq;
	/* This connection, random, never 0: after a failure the worker names
	 * it in RDMAPS_MSG_RESUME to learn what the server folded of it. */
	uint64_t conn_id;
};
_Static_assert(sizeof(struct rdmaps_wire_welcome) == 64, "welcome size (REP data: 196 at most)");

/* Server -> client in a reject. */
struct rdmaps_wire_reject {
	uint32_t magic;
	int32_t err; /* negative rdmaps_err */
};

/* Written by the server into the worker's credit word after folding. */
struct rdmaps_wire_credit {
	uint32_t dropped;   /* staged slots the server refused so far */
	int32_t last_err;   /* why the last one was refused */
	uint64_t folded_seq; /* every seq below this is consumed (folded or dropped) */
};
_Static_assert(sizeof(struct rdmaps_wire_credit) == 16, "credit size");

/* ---- staging slots ----------------------------------------------------- */

enum rdmaps_slot_flags {
	RDMAPS_SLOT_ASSIGN = 1u << 0, /* initial values from the tensor's creator */
	/*
	 * Last slot of a push group. The server folds a group only when its
	 * last slot has arrived, so a worker that dies mid-push leaves nothing
	 * half-folded. A group holds at most slot_count slots (whole pushes up
	 * to the ring's size are atomic; larger ones are atomic per group).
	 */
	RDMAPS_SLOT_LAST = 1u << 1,
	/* last slot of one push of the tensor's part on this server: the
	 * worker's clock for the tensor ends there (BSP/SSP) */
	RDMAPS_SLOT_END = 1u << 2,
	/* sparse rows: count rows, payload = count u64 row ids (of the part),
	 * then count * row_dim floats */
	RDMAPS_SLOT_ROWS = 1u << 3,
	/* the worker waits for this push to be folded (RDMAPS_PUSH_FOLDED):
	 * write the credit as soon as its group is, not lazily */
	RDMAPS_SLOT_ACK = 1u << 4,
	/*
	 * Replica connections only (RDMAPS_HELLO_REPLICA; docs/durability.md,
	 * "Replicated shards"): the primary's records, in push groups that the
	 * backup applies whole or not at all. REPLICA: chunk `chunk` of the
	 * backup's tensor tensor_id as the primary has it, payload laid out
	 * by srv_replica_layout (count values). ACCOUNTS: count entries of
	 * struct rdmaps_replica_account, the workers' accounts those chunks
	 * go with. Anything else on a replica connection is dropped.
	 */
	RDMAPS_SLOT_REPLICA = 1u << 5,
	RDMAPS_SLOT_ACCOUNTS = 1u << 6,
};
/*
 * Bits 8-11: the payload's gradient format (common/gradfmt.h; 0 = float32,
 * as before). A dense push only: never with ASSIGN or ROWS. A compressed
 * payload's length is the WRITE's own (the receive completion's byte_len
 * less the header), and must be exactly what its format and count say.
 */
#define RDMAPS_SLOT_FMT_SHIFT 8u
#define RDMAPS_SLOT_FMT_MASK (0xfu << RDMAPS_SLOT_FMT_SHIFT)
#define RDMAPS_SLOT_FLAGS_KNOWN                                                                    \
	(RDMAPS_SLOT_ASSIGN | RDMAPS_SLOT_LAST | RDMAPS_SLOT_END | RDMAPS_SLOT_ROWS | RDMAPS_SLOT_ACK | \
	 RDMAPS_SLOT_FMT_MASK)

/* A replica record's payload: server/server.h, srv_replica_layout. */
/* An ACCOUNTS entry: every slot seq below folded_seq of the primary's
 * connection conn_id (in its fold thread's place `place`) is folded or
 * refused, dropped of them refused ("Exactly once"). */
struct rdmaps_replica_account {
	uint64_t conn_id;
	uint64_t folded_seq;
	uint32_t dropped;
	uint32_t place;
};

static inline unsigned rdmaps__slot_fmt(uint16_t flags)
{
	return (flags & RDMAPS_SLOT_FMT_MASK) >> RDMAPS_SLOT_FMT_SHIFT;
}

/*
 * Header at the start of each staging slot; payload (count floats, or
 * count elements in the slot's gradient format) follows.
 * 24 B, no magic: a 64 B push WRITEs 88 B, and rxe pays per byte (a 104 B
 * WRITE-with-immediate took 8-9 % longer than an 88 B one in the VM). The
 * seq is the guard against garbage and replays: the server takes only the
 * exact next one, and the immediate must agree with it.
 */
struct rdmaps_slot_hdr {
	uint32_t seq;       /* low 32 bits of the connection's slot seq (from 1, +1
			     * per slot: exactly-once); the server knows the rest */
	uint16_t tensor_id; /* < 65536: the server caps --max-tensors there */
	uint16_t flags;     /* enum rdmaps_slot_flags */
	uint32_t chunk;
	uint32_t count;
	uint32_t clock;     /* the worker's clock for the tensor (BSP/SSP) */
	float scale;        /* multiply the payload by this (clipping); 1 otherwise */
};
_Static_assert(sizeof(struct rdmaps_slot_hdr) == RDMAPS_SLOT_HDR, "slot header size");

/* Immediate data: slot index in the low 16 bits, low 16 bits of seq above. */
static inline uint32_t rdmaps__imm_make(uint32_t slot, uint64_t seq)
{
	return (slot & 0xffffu) | ((uint32_t)(seq & 0xffffu) << 16);
}

/* ---- control messages -------------------------------------------------- */

enum rdmaps_msg_type {
	RDMAPS_MSG_DECLARE = 1,
	RDMAPS_MSG_LOOKUP = 2,
	RDMAPS_MSG_STATS = 3,
	RDMAPS_MSG_SEAL = 4, /* creator: initial values are staged, open the tensor */
	RDMAPS_MSG_CHECKPOINT = 5, /* write a checkpoint now (status: accepted) */
	RDMAPS_MSG_CATALOG = 6,    /* list tensors, a page at a time */
	RDMAPS_MSG_CHUNKS = 7,     /* versions of one tensor's chunks */
	RDMAPS_MSG_WORKERS = 8,    /* connected workers and their counters */
	RDMAPS_MSG_RESUME = 9,     /* what a closed connection of this worker folded */
	RDMAPS_MSG_SNAPSHOT = 10,  /* copy a chunk whole where the worker can READ it */
	RDMAPS_MSG_REPLICA_OPEN = 11, /* a primary server: open the backup of one of its tensors */
	RDMAPS_MSG_REPLICAS = 12,  /* this server's backups, and whose parts it backs up */
	RDMAPS_MSG_TENSOR_REPLY = 0x81,
	RDMAPS_MSG_STATS_REPLY = 0x83,
	RDMAPS_MSG_STATUS_REPLY = 0x84,
	RDMAPS_MSG_CATALOG_REPLY = 0x86,
	RDMAPS_MSG_CHUNKS_REPLY = 0x87,
	RDMAPS_MSG_WORKERS_REPLY = 0x88,
	RDMAPS_MSG_RESUME_REPLY = 0x89,
	RDMAPS_MSG_SNAPSHOT_REPLY = 0x8a,
	RDMAPS_MSG_REPLICA_REPLY = 0x8b,
	RDMAPS_MSG_REPLICAS_REPLY = 0x8c,
};

struct rdmaps_msg_hdr {
	uint32_t magic;
	uint16_t version;
	uint16_t type;
	uint32_t length; /* whole message, header included */
	uint32_t req_id; /* echoed in the reply */
};

#define RDMAPS_OPT_NAME_MAX 16

struct rdmaps_wire_hyper {
	float lr, momentum, beta1, beta2, eps, weight_decay;
};

/* How a tensor's clocks work; part of its declaration. */
struct rdmaps_wire_consistency {
	uint32_t mode;      /* enum rdmaps_consistency */
	uint32_t staleness;
	uint32_t workers;
	uint32_t mean;
	float clip_norm;
	uint32_t row_dim; /* > 0: a sparse table of rows; its chunks are rows */
};

struct rdmaps_msg_declare {
	struct rdmaps_msg_hdr hdr;
	uint64_t length;
	float init_value;
	uint32_t flags;  /* RDMAPS_DECLARE_INIT_DATA: creator will stage values */
	struct rdmaps_wire_hyper hyper;
	struct rdmaps_wire_consistency cons;
	char optimizer[RDMAPS_OPT_NAME_MAX]; /* NUL-padded */
	char name[RDMAPS_NAME_MAX + 1];      /* NUL-padded */
};
#define RDMAPS_DECLARE_INIT_DATA 1u
/* bits 8-11: the format pulls READ (common/gradfmt.h: F32, BF16 or F16).
 * Not F32: the server keeps a 16-bit copy of every chunk beside the float32
 * master, written at every publish (TENSOR_REPLY's half_addr). */
#define RDMAPS_DECLARE_PULL_SHIFT 8u
#define RDMAPS_DECLARE_PULL_MASK (0xfu << RDMAPS_DECLARE_PULL_SHIFT)

struct rdmaps_msg_lookup {
	struct rdmaps_msg_hdr hdr;
	char name[RDMAPS_NAME_MAX + 1];
};

struct rdmaps_msg_seal {
	struct rdmaps_msg_hdr hdr;
	uint32_t tensor_id;
	uint32_t reserved;
	uint64_t last_seq; /* the creator's last initial-value slot */
};

/* After a reconnect: the connection that broke (its welcome's conn_id). */
struct rdmaps_msg_resume {
	struct rdmaps_msg_hdr hdr;
	uint64_t conn_id;
};

/*
 * status 0: that connection is closed; every slot seq below folded_seq was
 * folded, or refused (dropped counts those), and no seq at or above it ever
 * will be. RDMAPS_EAGAIN: it is still open on the server, which is closing
 * it now: ask again. RDMAPS_ENOENT: unknown to this server (its records
 * are of its latest disconnects, and of its checkpoint's).
 */
struct rdmaps_msg_resume_reply {
	struct rdmaps_msg_hdr hdr;
	int32_t status;
	uint32_t dropped;
	uint64_t folded_seq;
};

struct rdmaps_msg_tensor_reply {
	struct rdmaps_msg_hdr hdr;
	int32_t status;
	uint32_t tensor_id;
	uint64_t length;
	uint64_t remote_addr; /* chunk 0 header */
	uint32_t rkey;        /* READ only, valid on this QP's protection domain */
	uint32_t chunk_elems;
	uint32_t nchunks;
	uint32_t created; /* 1: this worker created it and must seal it */
	uint32_t ready;   /* 0: creator still initialising, or a clock in progress; retry */
	uint32_t pull_format; /* as declared: F32 (0), BF16 (1) or F16 (2) */
	struct rdmaps_wire_consistency cons;
	uint64_t clock;   /* the joining worker's first clock */
	/* two copies (chunk.h): copy 1 is copy_offset bytes after copy 0, and
	 * index_addr holds one u64 per chunk naming the current copy. 0, 0:
	 * one copy. Same rkey. */
	uint64_t copy_offset;
	uint64_t index_addr;
	/* pull_format BF16/F16: the 16-bit copy, chunk i's header (as chunk.h,
	 * count 16-bit values, checksum over their bytes) at half_addr + i *
	 * half_stride; one copy, its header's version the seqlock. Same rkey. */
	uint64_t half_addr;
	uint32_t half_stride;
	uint32_t reserved;
};

/*
 * REPLICA_OPEN is a struct rdmaps_msg_declare (its type aside) of the
 * primary's tensor; the backup declares the same tensor in its store of
 * that primary's replicas (one copy, no 16-bit copy: it is written, not
 * pulled) and answers where the primary WRITEs a chunk (header, then
 * values) after each fold: mem_addr + i * stride; its optimizer state at
 * state_addr + i * chunk_elems * state_per_param * 4 (count * spp floats),
 * and its fold count at steps_addr + 8 * i. The keys work on this QP only,
 * REMOTE_WRITE, in a protection domain of its own.
 */
struct rdmaps_msg_replica_reply {
	struct rdmaps_msg_hdr hdr;
	int32_t status;
	uint32_t tensor_id;   /* what the primary's records name it by */
	uint32_t nchunks;
	uint32_t chunk_elems;
	uint32_t state_per_param;
	/* ACCOUNTS entries name places below this (the backup's table) */
	uint32_t accounts_cap;
};

/* REPLICAS: a backup of this server's parts, as its primary sees it. */
enum rdmaps_backup_state {
	RDMAPS_BACKUP_DOWN = 0,     /* not connected: being connected to, every 0.5 s */
	RDMAPS_BACKUP_CATCHING_UP = 1, /* connected, being written every tensor */
	RDMAPS_BACKUP_UP = 2,       /* caught up: acknowledgements wait for it */
};
struct rdmaps_wire_backup_info {
	uint32_t rank, state;  /* enum rdmaps_backup_state */
	uint64_t writes;       /* chunks and accounts written to it since start */
	uint64_t in_flight;    /* of those, not yet completed: how far behind it is */
	uint32_t opening;      /* tensors not yet open on it */
	uint32_t part;         /* the rank whose part it backs up (ours, or one taken over) */
	uint64_t behind;       /* records written to it that it has not applied yet */
};
#define RDMAPS_WIRE_BACKUPS 7 /* our own three at most, and four for parts taken over */
/* A primary whose parts this server backs up. */
struct rdmaps_wire_held_info {
	uint32_t primary;      /* its rank */
	uint32_t tensors;
	uint32_t accounts;     /* its workers' accounts held */
	uint32_t reserved;
};
struct rdmaps_msg_replicas_reply {
	struct rdmaps_msg_hdr hdr;
	int32_t status;
	uint32_t server_id;
	uint32_t replicas;     /* copies of each part (1: no backups) */
	uint32_t nbackups, nheld, reserved;
	struct rdmaps_wire_backup_info backup[RDMAPS_WIRE_BACKUPS];
	struct rdmaps_wire_held_info held[64];
	/* the authority (server --etcd): the epoch of this server's claim
	 * on its rank (0: none), the backups etcd records in sync with it,
	 * and the ranks it took over from their replicas (masks of ranks) */
	uint64_t epoch, in_sync, taken_over;
};
_Static_assert(sizeof(struct rdmaps_msg_replicas_reply) <= RDMAPS_MSG_MAX, "replicas reply fits");

/* the map names every field: printing and summing miss none */
#define RDMAPS__STAT_ONE(f) +1
_Static_assert(sizeof(struct rdmaps_server_stats) ==
		       sizeof(uint64_t) * (0 RDMAPS_SERVER_STATS_MAP(RDMAPS__STAT_ONE)),
	       "RDMAPS_SERVER_STATS_MAP lists every field");
#undef RDMAPS__STAT_ONE

struct rdmaps_msg_stats_reply {
	struct rdmaps_msg_hdr hdr;
	int32_t status;
	uint32_t reserved;
	struct rdmaps_server_stats stats;
};

/*
 * A pull whose READs of one chunk kept tearing (a fold landed in each) asks
 * for a snapshot: the server copies the chunk, header and values, under the
 * chunk's lock into a buffer of this connection's that nothing else writes,
 * and the worker READs it there, whole by construction (docs/design.md,
 * "What a pull returns"). One at a time per connection: the next request
 * reuses the buffer. chunk counts within the server's part of the tensor.
 */
struct rdmaps_msg_snapshot {
	struct rdmaps_msg_hdr hdr;
	uint32_t tensor_id;
	uint32_t chunk;
	uint32_t half;     /* 1: the tensor's 16-bit copy of the chunk */
	uint32_t reserved;
};

/* status 0: READ len bytes at addr with rkey (a chunk header, then its
 * values: header.count floats, or 16-bit values with half) */
struct rdmaps_msg_snapshot_reply {
	struct rdmaps_msg_hdr hdr;
	int32_t status;
	uint32_t rkey;
	uint64_t addr;
	uint32_t len;
	uint32_t reserved;
};

/* A status from the wire as an rdmaps_err: 0, a known error, or
 * RDMAPS_EPROTO for a value no server sends. */
static inline int rdmaps__wire_status(int32_t status)
{
	return status > 0 || status < -1000 ? RDMAPS_EPROTO : status;
}

struct rdmaps_msg_status_reply {
	struct rdmaps_msg_hdr hdr;
	int32_t status;
	uint32_t reserved;
};

/* Paged listings for rdmaps-ctl: the request names where to start. */
struct rdmaps_msg_page {
	struct rdmaps_msg_hdr hdr;
	uint32_t id;    /* CHUNKS: the tensor; otherwise 0 */
	uint32_t start; /* first entry wanted */
};

#define RDMAPS_CATALOG_PAGE 32
struct rdmaps_wire_tensor_info {
	uint32_t id, nchunks;
	uint64_t length;
	uint64_t clock;
	uint64_t folds;    /* sum of per-chunk fold counts */
	uint8_t mode;
	uint8_t pull_format;   /* the format pulls READ */
	uint16_t push_formats; /* bit f: a push in gradient format f was folded */
	uint32_t row_dim;
	char optimizer[RDMAPS_OPT_NAME_MAX];
	char name[RDMAPS_NAME_MAX + 1];
};
struct rdmaps_msg_catalog_reply {
	struct rdmaps_msg_hdr hdr;
	int32_t status;
	uint32_t total, count, reserved;
	struct rdmaps_wire_tensor_info t[RDMAPS_CATALOG_PAGE];
};

#define RDMAPS_CHUNKS_PAGE 400
struct rdmaps_msg_chunks_reply {
	struct rdmaps_msg_hdr hdr;
	int32_t status;
	uint32_t total, count, reserved;
	uint64_t version[RDMAPS_CHUNKS_PAGE];
};

#define RDMAPS_WORKERS_PAGE 36
struct rdmaps_wire_worker_info {
	char addr[48];
	uint64_t folds, dropped, bad_messages, next_seq;
	uint32_t slots;         /* its staging ring's slots (fewer than --slots when
				 * the server's staging budget was short) */
	uint32_t reserved;
	uint64_t memory;        /* server memory it holds: ring, buffers, queues' buffers */
	uint64_t pinned;        /* bytes registered for it alone (per-worker scheme:
				 * with the tensors it reads) */
};
struct rdmaps_msg_workers_reply {
	struct rdmaps_msg_hdr hdr;
	int32_t status;
	uint32_t total, count, reserved;
	struct rdmaps_wire_worker_info w[RDMAPS_WORKERS_PAGE];
};
/* The head every paged reply starts with: one loop can page any listing. */
struct rdmaps_msg_page_head {
	struct rdmaps_msg_hdr hdr;
	int32_t status;
	uint32_t total, count, reserved;
};
#define RDMAPS_PAGE_HEAD_OK(T)                                                                 \
	(offsetof(struct T, total) == offsetof(struct rdmaps_msg_page_head, total) &&         \
	 offsetof(struct T, count) == offsetof(struct rdmaps_msg_page_head, count))
_Static_assert(RDMAPS_PAGE_HEAD_OK(rdmaps_msg_catalog_reply), "catalog reply head");
_Static_assert(RDMAPS_PAGE_HEAD_OK(rdmaps_msg_chunks_reply), "chunks reply head");
_Static_assert(RDMAPS_PAGE_HEAD_OK(rdmaps_msg_workers_reply), "workers reply head");
_Static_assert(sizeof(struct rdmaps_msg_catalog_reply) <= RDMAPS_MSG_MAX, "catalog page fits");
_Static_assert(sizeof(struct rdmaps_msg_chunks_reply) <= RDMAPS_MSG_MAX, "chunks page fits");
_Static_assert(sizeof(struct rdmaps_msg_workers_reply) <= RDMAPS_MSG_MAX, "workers page fits");

/*
 * Validation, done where a message is received. Each returns 0 or a negative
 * rdmaps_err and never reads past len. Pure; thread-safe.
 */
int rdmaps__hello_check(const void *buf, size_t len);
int rdmaps__msg_check(const void *buf, size_t len, uint16_t *type_out);
/* Name fields: NUL-terminated within the field, non-empty, printable. */
int rdmaps__name_check(const char *name, size_t field);
void rdmaps__msg_init(struct rdmaps_msg_hdr *h, uint16_t type, uint32_t length, uint32_t req_id);
/* Constant-time token comparison (length included). */
int rdmaps__token_equal(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen);

#endif
