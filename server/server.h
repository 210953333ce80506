/*
 * server.h -- rdmaps-server internals shared by its files. Not installed.
 *
 * Threads: one listener (rdma_cm events: accept, disconnect) and K fold
 * threads. Each connection belongs to exactly one fold thread, which polls
 * its completion queue, folds its staged gradients and answers its control
 * messages. Chunks are guarded by their seqlock version (CAS even->odd), so
 * two fold threads folding the same chunk serialise on that word alone.
 */
#ifndef RDMAPS_SERVER_H
#define RDMAPS_SERVER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "chunk.h"
#include "config.h"
#include "log.h"
#include "protocol.h"
#include "verbs.h"

struct srv_optimizer;

/* registration.c: one PD per device with memory windows, or a PD per worker */
enum srv_reg_mode { SRV_REG_AUTO, SRV_REG_SHARED, SRV_REG_PER_WORKER };

struct srv_config {
	const char *listen_addr; /* NULL/"0.0.0.0": every RDMA device */
	const char *port;
	uint8_t token[RDMAPS_TOKEN_MAX];
	uint16_t token_len;
	unsigned fold_threads;
	bool pin;               /* pin fold thread i to CPU i % ncpu */
	uint32_t chunk_elems;
	uint32_t slots;         /* staging slots per worker */
	uint32_t max_workers;
	uint64_t staging_budget; /* bytes of staging rings, all workers together */
	uint32_t max_tensors;
	uint64_t max_tensor_bytes;
	uint64_t max_total_bytes;
	uint64_t two_copies_min; /* ASP dense tensors this big keep two copies (0: none) */
	unsigned spin_us;       /* busy-poll this long before sleeping */
	unsigned server_id;
	unsigned evict_ms;      /* BSP/SSP: evict a member that stalls a clock this long */
	const char *ckpt_dir;   /* checkpoints: written here, restored from here at start */
	unsigned ckpt_every_s;  /* periodic checkpoint (0: only on request and at exit) */
	uint32_t max_inline;    /* inline send bytes asked of each QP (0: never inline) */
	enum srv_reg_mode registration; /* registration.c: how workers reach memory */
	/* replica.c: each part on `replicas` servers, this one and its
	 * replicas - 1 successors in the cluster's list (1: no backups) */
	unsigned replicas;
	const struct rdmaps__server_addr *servers; /* the cluster's list (replicas > 1) */
	uint32_t nservers;
	uint8_t peer_token[RDMAPS_TOKEN_MAX]; /* servers' own: replica connections */
	uint16_t peer_token_len;
	/* authority.c: who may fold this rank's pushes, from etcd (NULL:
	 * nobody asked, this server folds from the start) */
	const char *etcd;        /* endpoints, "http://host:port,..." */
	const char *etcd_prefix; /* the cluster's keys (default "/rdmaps") */
	unsigned lease_s;        /* the lease's TTL, as asked of etcd */
	int ack_timeout_ms;      /* of the connections to backups (0: rdma_cm's) */
	unsigned beat_ms;        /* replicas > 1: a holder's beat (0: none; authority.c) */
};

/*
 * A replica record (RDMAPS_SLOT_REPLICA) of a chunk of count values, after
 * its slot header: the chunk as it is in memory (header, then count
 * floats), its optimizer state from state_off (count * spp floats, spp the
 * optimizer's state per value, at most SRV_REPLICA_STATE_MAX), its fold
 * count (u64) at steps_off; bytes in all. A small chunk's record is small:
 * a 64 B push sends a record of about 100 B. Both ends compute it from the
 * record's count and the tensor's optimizer; a replica connection's slot
 * holds the largest (a whole chunk, two state floats per value).
 */
#define SRV_REPLICA_STATE_MAX 2u /* Adam's two moments */
struct srv_replica_layout {
	size_t state_off, steps_off, bytes;
};
static inline struct srv_replica_layout srv_replica_layout(uint32_t count, uint32_t spp)
{
	struct srv_replica_layout l;

	l.state_off = rdmaps__round_up(RDMAPS_CHUNK_HDR + (size_t)count * sizeof(float), 8);
	l.steps_off = l.state_off + (size_t)count * spp * sizeof(float);
	l.steps_off = rdmaps__round_up(l.steps_off, 8);
	l.bytes = l.steps_off + sizeof(uint64_t);
	return l;
}

/* A replica connection's ring: a batch's records (at most
 * SRV_REPL_RING - 2 chunks, replica.c) and their accounts fit in it */
#define SRV_REPL_RING 64u

/*
 * A backup applies its primaries' records lazily (docs/durability.md,
 * "Replicated shards"): what a push's acknowledgement waits for is the
 * backup's NIC, never its fold thread, so a record does not wake that
 * thread. A sleeping fold thread with replica connections wakes every
 * SRV_REPL_APPLY_MS, or at once for a record the primary marks solicited:
 * one posted with its ring half full (it needs the credit), an open, or
 * a part being handed back (it waits for everything applied).
 */
#define SRV_REPL_APPLY_MS 10

/* Our own mark, in a fold thread's copy of a slot header (group_hdr),
 * never on the wire: the slot was refused, so its whole group will be */
#define SLOT_REFUSED 0x8000u
_Static_assert(!(RDMAPS_SLOT_FLAGS_KNOWN & SLOT_REFUSED), "refused mark is a wire flag");

/* Bytes of payload a staging slot holds after its header: one chunk. */
static inline size_t srv_slot_payload(const struct srv_config *cfg)
{
	return (size_t)cfg->chunk_elems * sizeof(float);
}

/* One staging slot: its header and a chunk's floats. */
static inline size_t srv_slot_bytes(const struct srv_config *cfg)
{
	return RDMAPS_SLOT_HDR + srv_slot_payload(cfg);
}

/* A ring of n slots as allocated (aligned_alloc wants whole pages), which
 * the staging budget counts. */
static inline size_t srv_ring_bytes(const struct srv_config *cfg, uint32_t n)
{
	return rdmaps__round_up((size_t)n * srv_slot_bytes(cfg), 4096);
}

/*
 * Where a chunk's floats start within a 64 B line: after its 24 B header.
 * Arrays a fold streams beside them (optimizer state, BSP sums, the fold
 * thread's copies of gradients) start at the same offset, so that one
 * scalar head aligns them all for the vector loop (srv_chunk_opt).
 */
#define SRV_LANE_OFF (RDMAPS_CHUNK_HDR % RDMAPS_CHUNK_ALIGN)

/*
 * A fold thread's stage (grad.c): its own copies of the payloads of the
 * group being folded, slot i's at srv_stage_slot(); each starts at
 * SRV_LANE_OFF into a line, like the chunk it folds into.
 */
static inline size_t srv_stage_pitch(const struct srv_config *cfg)
{
	return rdmaps__round_up(srv_slot_payload(cfg), RDMAPS_CHUNK_ALIGN);
}

static inline size_t srv_stage_bytes(const struct srv_config *cfg)
{
	return (size_t)cfg->slots * srv_stage_pitch(cfg) + RDMAPS_CHUNK_ALIGN;
}

static inline void *srv_stage_slot(uint8_t *stage, const struct srv_config *cfg, uint32_t i)
{
	return stage + (size_t)i * srv_stage_pitch(cfg) + SRV_LANE_OFF;
}

enum tensor_state { TENSOR_INIT = 0, TENSOR_READY = 1 };

#define SRV_MAX_MEMBERS 64 /* workers per BSP/SSP tensor: a bit each in a mask */

/* A worker taking part in a BSP/SSP tensor's clocks (clock.c). */
struct srv_member {
	const void *conn;
	uint64_t clock;       /* pushes completed (its next push is this clock) */
	uint32_t next_chunk;  /* within the push in progress */
	uint64_t last_ns;     /* last completed push, for eviction */
	bool active;
};

struct srv_tensor {
	uint32_t id;
	char name[RDMAPS_NAME_MAX + 1];
	uint64_t length;
	uint32_t nchunks;
	uint32_t chunk_elems;
	size_t stride;   /* bytes between chunk headers */
	uint8_t *mem;    /* chunk 0 header; registered READ-only per connection */
	size_t mem_len;  /* all of it: the copies and the index */
	size_t map_len;  /* mem mapped for this many bytes (store.c), or 0: malloc'd */
	/*
	 * Two copies (docs/design.md, "Two copies"): a fold writes the copy
	 * readers are not pointed at, then flips index[i]; a READ is torn only
	 * when two folds of its chunk land inside it. copy 1 starts copy_off
	 * bytes after copy 0. index[i] = 2 * folds of chunk i, + 1 while one is
	 * being written; copy (index[i] >> 1) & 1 is current. One copy:
	 * copy_off 0, index NULL, and the chunk header's version is the seqlock.
	 */
	size_t copy_off;
	uint64_t *index;
	/* pull format BF16/F16 (else 0): a 16-bit copy of every chunk, chunk i
	 * at mem + half_off + i * half_stride, written whenever the master's
	 * chunk is published (srv_half_publish), under the master's lock */
	unsigned pull_fmt;
	size_t half_off, half_stride;
	float *state;    /* optimizer state, never registered */
	const struct srv_optimizer *opt;
	struct rdmaps_wire_hyper hyper;
	_Atomic int state_flag;       /* enum tensor_state */
	/* the connection allowed to assign initial values while INIT; NULL
	 * once sealed, or when it left before sealing (srv_store_orphan) */
	_Atomic(const void *) creator;
	uint64_t *steps;              /* folds applied per chunk, under the chunk's seqlock */
	_Atomic uint32_t push_formats; /* bit f: a push in gradient format f was folded */

	/* consistency (clock.c); clock_lock is taken once per push end, never per chunk */
	struct rdmaps_wire_consistency cons;
	pthread_mutex_t clock_lock;
	struct srv_member member[SRV_MAX_MEMBERS];
	_Atomic uint64_t active_mask; /* members whose pushes a clock waits for */
	uint32_t joined;              /* members that ever joined (BSP/SSP start gate) */
	uint64_t clock;               /* SSP: min member clock; BSP: clocks aggregated */
	float *agg;                   /* BSP: gradients of the pending clock, per chunk */
	uint64_t *contrib;            /* BSP: per chunk, members that contributed */
	uint64_t *chunk_clock_done;   /* BSP: per chunk, clocks aggregated */
};

/* A closed connection's account (resume.c). */
struct srv_closed {
	uint64_t conn_id;
	uint64_t folded_seq; /* every seq below was folded or refused; none above ever is */
	uint32_t dropped;    /* slots it refused, of those */
	uint32_t reserved;
};
struct srv_resume {
	pthread_mutex_t lock;
	struct srv_closed *rec; /* a ring of the latest cap */
	uint32_t cap, n, next;
};

struct srv_store {
	pthread_mutex_t lock; /* declare/lookup only; folds never take it */
	struct srv_resume resume; /* closed connections' accounts, kept with the model */
	struct srv_tensor **tensors; /* fixed array of max_tensors, published with release */
	_Atomic uint32_t count;
	uint32_t max;
	uint64_t total_bytes;
	uint64_t max_tensor_bytes, max_total_bytes;
	uint64_t two_copies_min;
	uint32_t chunk_elems;
	bool replica; /* another server's parts, written by it (replica.c) */
	/* a replica restored from our checkpoint of a part we served last:
	 * its records of closed connections are the restored ones */
	bool from_ckpt;
	/* replica: its primary's per-worker accounts, written by the primary
	 * (one per connection place, naccounts of them), made records of
	 * resume at a checkpoint */
	struct srv_closed *accounts;
	uint32_t naccounts;
};

struct srv_fold_thread;
struct srv;

/*
 * What a work request's completion gives back. A fold thread's connections
 * share its completion queues, so every wr_id names its connection: the
 * connection's tag (its place in the thread's table and that place's
 * generation, c->wr_tag), then for a send SRV_WR_SEND, its kind and buffer
 * index (SRV_WR(c, kind, idx)); for a receive its buffer index alone.
 *   bits 0-15 buffer index | 16-23 kind | 24-39 place | 40-55 generation | 63 send
 * A completion whose tag is not its place's current one is of a connection
 * that has gone (a late flush): it is ignored.
 */
#define SRV_REPLY_BUFS 4u
enum srv_send_kind {
	SRV_SEND_PLAIN = 0,  /* inline, or no data: nothing to give back */
	SRV_SEND_REPLY = 1,  /* a reply buffer */
	SRV_SEND_CREDIT = 2, /* the credit buffer */
	SRV_SEND_BIND = 3,   /* the staging window's bind (unsignaled; errors only) */
};
#define SRV_WR_SEND (1ull << 63)
#define SRV_WR(c, kind, idx) ((c)->wr_tag | SRV_WR_SEND | ((uint64_t)(kind) << 16) | (uint64_t)(idx))
#define SRV_WR_IDX(w) ((uint32_t)((w) & 0xffffu))
#define SRV_WR_KIND(w) ((unsigned)(((w) >> 16) & 0xffu))
#define SRV_WR_PLACE(w) ((uint32_t)(((w) >> 24) & 0xffffu))
#define SRV_WR_TAG(place, gen) (((uint64_t)(place) << 24) | ((uint64_t)((gen) & 0xffffu) << 40))
#define SRV_WR_TAG_MASK SRV_WR_TAG(0xffffu, 0xffffu)

/*
 * A completion queue of a fold thread, shared by its connections on one
 * device: polling costs the same whatever the number of idle connections.
 * Sized from the device's limit; a connection reserves what its queues can
 * complete at once (receives + sends), so the CQ can never overflow.
 */
#define SRV_CQS_MAX 256u
struct srv_cq {
	struct ibv_cq *cq;
	struct ibv_context *verbs;
	uint32_t cap;      /* CQEs */
	uint32_t reserved; /* by its connections (listener-owned) */
	/* replica connections' only: a fold thread waiting for room in its
	 * own backup's ring applies its primaries' records meanwhile
	 * (srv_fold_poll_backups), and nothing else, so two servers that back
	 * each other up never wait for each other */
	bool backups;
};

/* One worker connection. Owned by the listener; polled by one fold thread. */
/* how logs name a worker's connection: its address and queue pair */
#define SRV_CONN_FMT "%s qp %u"
#define SRV_CONN_ARGS(c) (c)->peer, (c)->qp ? (c)->qp->qp_num : 0u

struct srv_conn {
	struct srv *srv;
	struct rdma_cm_id *id;
	struct ibv_pd *pd;     /* its device's (shared), or its own (per-worker) */
	struct srv_dev *dev;   /* the device it came through (registration.c) */
	bool own_pd;           /* per-worker registration: pd and tensor_mr are its own */
	struct srv_cq *scq;    /* its fold thread's CQ it completes on, and its reservation */
	uint32_t cq_need;      /* CQEs reserved there */
	struct ibv_qp *qp;
	struct srv_fold_thread *ft;
	uint32_t index;        /* position in the fold thread's array */
	uint32_t place;        /* in the fold thread's table of tags (srv_fold_register) */
	uint64_t wr_tag;       /* its tag in every wr_id (SRV_WR); 0 until registered */
	bool registered;       /* its fold thread knows its tag (listener-owned flag) */
	bool live;             /* attached: its completions are handled (fold thread) */
	/* completions that came before the listener attached it (a worker may
	 * send as soon as its own side is up): handled at attach, in order */
	struct ibv_wc *early;
	uint32_t nearly, early_cap;
	struct srv_conn *prev, *next; /* listener's list of live connections */
	char peer[48];         /* the worker's address, for logs and rdmaps-ctl */
	uint64_t conn_id;      /* random, never 0: the worker's name for it (RESUME) */
	_Atomic bool evict;    /* its worker reconnected and asks about it: close it */
	bool attached;         /* handed to its fold thread (listener-owned flag) */
	uint32_t sq_depth, sq_outstanding;
	uint32_t max_inline;

	uint8_t *staging;      /* slots * slot_size, REMOTE_WRITE for this QP only */
	struct ibv_mr *staging_mr; /* shared: no remote access; the window grants it */
	struct ibv_mw *staging_mw; /* shared: type 2, bound to this QP over the ring */
	uint32_t staging_rkey;     /* the window's rkey once bound */
	uint32_t slots, slot_size; /* slots: --slots, or fewer within the staging budget */
	size_t staging_bytes, bufs_bytes; /* as allocated: the budget's account */

	/* registered: recv_depth receive buffers, SRV_REPLY_BUFS reply buffers,
	 * then the credit a WRITE that is not inline is sent from. A buffer the
	 * NIC may still be reading is never rewritten: its send's completion
	 * frees it (reply_busy, credit_busy). */
	uint8_t *bufs;
	struct ibv_mr *bufs_mr;
	uint32_t recv_depth;
	uint8_t reply_busy;    /* bit i: reply buffer i is being sent */
	bool credit_busy;
	struct rdmaps__ratelimit log_rl; /* what this worker can make us log */

	/* a chunk copied whole for this worker's pull (SNAPSHOT): READ-only,
	 * made on its first request (registration.c) */
	uint8_t *snap;
	struct ibv_mr *snap_mr;

	struct ibv_mr **tensor_mr; /* per tensor id, set on first use; borrowed from the
				    * device when shared (then not deregistered here) */
	uint8_t *member_of;        /* per tensor id: member index + 1, or 0 */

	uint64_t credit_addr;
	uint32_t credit_rkey;
	uint64_t next_seq;     /* next slot seq we accept */
	uint64_t group_seq;    /* first seq of the push group being staged */
	struct rdmaps_slot_hdr *group_hdr; /* validated headers of that group, per slot */
	uint32_t *group_len;   /* payload bytes each slot's WRITE carried, per slot */
	struct rdmaps_wire_credit credit;
	bool credit_dirty;
	bool credit_urgent;    /* a drop, or a group the worker waits on: write now */
	uint64_t credited_seq; /* folded_seq of the last credit written */
	bool broken;           /* QP failed: waiting for the listener to tear down */
	/* liveness (fold thread): completions seen, and at the last keepalive tick */
	uint64_t cqes, ka_cqes;
	uint32_t ka_stalled;   /* ticks in a row with requests in flight and no completion */
	_Atomic bool established;

	/* per-connection counters, read by stats */
	_Atomic uint64_t folds, dropped, bad_msgs;

	/* a replica connection (RDMAPS_HELLO_REPLICA): the primary of rank
	 * replica_of, whose records (RDMAPS_SLOT_REPLICA, ACCOUNTS) land in its
	 * ring, in a PD of its own, and are applied to rstore a group at a
	 * time (backup.c); NULL for a worker */
	struct srv_store *rstore;
	unsigned replica_of;
	/* the tensors it declares, pulls and pushes: this server's own store,
	 * or the replicas of a rank this server took over (authority.c), whose
	 * folds it does not replicate */
	struct srv_store *store;
};

/* Where slot seq of c's ring has its payload: memory its writer can still
 * write (a worker's checks copy it first: grad.c). */
static inline const uint8_t *srv_slot_staged(const struct srv_conn *c, uint64_t seq)
{
	return c->staging + (size_t)((seq - 1) % c->slots) * c->slot_size + RDMAPS_SLOT_HDR;
}

struct srv_tensor;
/*
 * Two-copy folds a fold thread has applied but not yet published
 * (store.c): a chunk folded again before srv_open_publish() gets the
 * gradient applied to the same new copy. Owned by one fold thread; a
 * chunk stays "being written" (index odd) until published, so publish
 * before anything waits or anyone is told a push was folded (credits).
 */
#define SRV_OPEN_MAX 16u
struct srv_open {
	struct srv_tensor *t;
	uint32_t chunk, count;
	uint64_t v;  /* the index word the fold took (even) */
	float *data; /* the new copy's floats */
};
struct srv_open_set {
	struct srv_open o[SRV_OPEN_MAX];
	uint32_t n;
};

struct srv_fold_thread {
	struct srv *srv;
	unsigned idx;
	pthread_t thread;
	struct ibv_comp_channel **channels; /* one per device: a CQ needs its own device's */
	int wake_fd;             /* eventfd: mailbox or shutdown */

	pthread_mutex_t mail_lock;
	pthread_cond_t mail_cond;
	_Atomic bool mail_pending;
	struct srv_conn *mail_reg;   /* hand-over from the listener */
	struct srv_conn *mail_add;
	struct srv_conn *mail_del;
	bool mail_done;

	/* shared CQs: [0, ncqs) polled; the listener adds one (release) */
	struct srv_cq cqs[SRV_CQS_MAX];
	_Atomic uint32_t ncqs;
	/* each registered connection by place (fold thread only), and each
	 * place's generation: a late completion of a gone one matches none */
	struct srv_conn **place_conn;
	uint16_t *place_gen;
	uint32_t nplaces, place_next;

	struct srv_conn **conns;     /* owned by this thread alone */
	uint32_t nconns, cap;
	uint64_t last_ka;            /* last keepalive tick */
	uint32_t loops;
	bool fenced;                 /* no lease (authority.c): folding nothing */

	_Atomic uint64_t folds, dropped, sleeps, nonfinite, clipped;
	struct srv_open_set open;    /* published at the end of each connection's batch */
	/* the payloads of the group being folded, copied out of the staging
	 * ring (its worker can still write there): checked and folded from
	 * here. srv_stage_bytes, slot i's at srv_stage_slot (grad.c) */
	uint8_t *stage;
	/* replica.c: this thread's backups and the folds they have yet to
	 * confirm; NULL without backups */
	struct srv_repl *repl;
};

/* A device workers connect through, and what is registered on it once. */
#define SRV_MAX_DEVS 16
struct srv_dev {
	struct ibv_context *verbs;
	bool shared;               /* one PD, the model registered once, rings via MWs */
	struct ibv_pd *pd;         /* shared only */
	struct ibv_mr **tensor_mr; /* shared only: per tensor id, REMOTE_READ, under lock */
	pthread_mutex_t lock;
};

struct srv {
	struct srv_config cfg;
	struct srv_store store;
	struct rdma_event_channel *cm_channel;
	struct rdma_cm_id *listen_id;
	struct srv_fold_thread *ft;
	struct ibv_context **devs;   /* devices served through: own_devs, or rdma_cm's all */
	struct ibv_context *own_devs[2]; /* {listening device, NULL} when bound to an address */
	int ndev;
	_Atomic bool stop;
	int exit_rc;                 /* why srv_run stopped by itself (listener-owned) */
	int stop_fd;                 /* eventfd that wakes the listener */
	int wake_fd;                 /* eventfd: a take-over to serve (cfg.etcd) */
	uint32_t nconns;             /* listener-owned */
	struct srv_conn *conns;      /* listener-owned list */
	uint32_t next_ft;
	_Atomic uint64_t connections, disconnects, auth_failures, bad_messages, rejected, evictions;

	/* checkpoints: the listener writes them with the fold threads parked */
	pthread_mutex_t pause_lock;
	pthread_cond_t pause_cond;
	_Atomic bool pause_req;
	unsigned paused;
	_Atomic bool ckpt_req;
	uint64_t ckpt_seq, last_ckpt_ns;
	uint64_t ckpt_next_ok;       /* a requested checkpoint waits until then */
	uint64_t instance; /* random per process: tells workers this is a restart */
	_Atomic uint64_t checkpoints, checkpoint_failures, restored_seq;
	_Atomic uint64_t snapshots;  /* chunks copied whole for torn pulls (SNAPSHOT) */
	pthread_mutex_t conns_lock;  /* the conns list, for rdmaps-ctl's listing */
	_Atomic bool evict_req;      /* some connection has its evict flag set */
	/* registration.c: devices seen (the listener appends; others read
	 * nregdev with acquire), and what all registrations hold */
	struct srv_dev regdev[SRV_MAX_DEVS];
	unsigned nregdev;
	_Atomic uint64_t reg_bytes, reg_mws;
	/* staging ring bytes held by connections (the listener changes it;
	 * stats read it) against cfg.staging_budget */
	_Atomic uint64_t staging_used;

	/* replica.c. As a backup: the parts of the server of rank p, in
	 * replica[p] (made by the listener on p's first replica connection;
	 * written by p alone, one-sided). As a primary: the thread that
	 * connects this server to its backups. */
	struct srv_store *replica[RDMAPS_MAX_SERVERS];
	pthread_t repl_thread;
	bool repl_started;
	_Atomic uint64_t backups_up, replicated_chunks, backup_failures, unreplicated_acks;

	/* authority.c (cfg.etcd): folds may go on until lease_until
	 * (monotonic ns; 0: no claim stands), in epoch (0: none) */
	struct srv_auth *auth;
	_Atomic uint64_t lease_until, epoch, lease_losses;
	/* ranks whose primary died, taken over from their replicas here: set
	 * once by the authority thread, never cleared while running */
	_Atomic bool took_over[RDMAPS_MAX_SERVERS];
	_Atomic bool takeover_req[RDMAPS_MAX_SERVERS]; /* claimed: the listener takes it over */
	_Atomic uint64_t failovers; /* ranks taken over */
	/* a rank taken over, being handed back to its own server, caught up
	 * as its backup (authority.c): its workers are sent away and none
	 * taken; settled once the fold threads have nothing of it left that
	 * the backup lacks (replica.c) */
	_Atomic bool handing_back[RDMAPS_MAX_SERVERS], part_settled[RDMAPS_MAX_SERVERS];
	/* listener: a part's workers were sent away; it served the part */
	bool handed_off[RDMAPS_MAX_SERVERS], was_serving[RDMAPS_MAX_SERVERS];
	_Atomic uint64_t handbacks; /* ranks handed back */
	/* the rank is claimed by another server: workers are sent away */
	_Atomic bool deposed;
	bool deposed_done; /* listener: its workers were sent away */
	/* per part this server folds (its own rank's, and each it took
	 * over): backups (a mask of ranks) up and caught up (replica.c
	 * publishes), and those etcd records as in sync (authority.c):
	 * credits count on the latter only */
	_Atomic uint64_t isr_live[RDMAPS_MAX_SERVERS], isr_etcd[RDMAPS_MAX_SERVERS];
};

/* Does this server serve rank p's part to workers as its primary, having
 * taken it over from its replica (another rank's, or its own rank's come
 * back to it from the replica another server kept current meanwhile)? */
static inline bool srv_serves(struct srv *s, unsigned p)
{
	return p < RDMAPS_MAX_SERVERS && atomic_load_explicit(&s->took_over[p], memory_order_acquire);
}

/* Does it take workers for rank p's part (served, not being handed back)? */
static inline bool srv_welcomes(struct srv *s, unsigned p)
{
	return srv_serves(s, p) && !atomic_load_explicit(&s->handing_back[p], memory_order_acquire);
}

/* The store workers of this server's own rank use: its own, or, once the
 * rank came back here from the replica another server kept current while
 * it held the rank (authority.c), that replica. */
static inline struct srv_store *srv_own_store(struct srv *s)
{
	return srv_serves(s, s->cfg.server_id) ? s->replica[s->cfg.server_id] : &s->store;
}

/* ---- authority.c ---- */
/* Listener, at start (cfg.etcd): the thread that claims this rank and
 * keeps its lease; until its claim stands, nothing folds. */
int srv_auth_start(struct srv *s);
/* Shutdown, fold threads joined: the lease given back (the rank is free). */
void srv_auth_stop(struct srv *s);
/* Authority thread: a take-over was asked for (takeover_req); the
 * listener serves it now, not at its next tick. */
void srv_listener_wake(struct srv *s);
/* Any thread: isr_live changed; record it in etcd soon. */
void srv_auth_poke(struct srv *s);
/* Any thread: may this server fold now? False once its lease has ended by
 * its own clock, whether or not etcd was heard from (authority.c). */
static inline bool srv_may_fold(struct srv *s)
{
	return !s->cfg.etcd ||
	       rdmaps__now_ns() < atomic_load_explicit(&s->lease_until, memory_order_acquire);
}

/* ---- store.c ---- */
int srv_store_init(struct srv_store *s, const struct srv_config *cfg);
void srv_store_fini(struct srv_store *s);
/* Drop every tensor (a failed restore starts over). Not while serving. */
void srv_store_reset(struct srv_store *s);
/* Declare or attach; fills *out and *created. Takes the store lock. */
int srv_store_declare(struct srv_store *s, const struct rdmaps_msg_declare *m, const void *conn,
		      struct srv_tensor **out, bool *created);
int srv_store_lookup(struct srv_store *s, const char *name, struct srv_tensor **out);
/* The initial values are in: every chunk stable (they are odd, "being
 * written", while a tensor initialises). Idempotent. */
void srv_store_settle(struct srv_tensor *t);
/* Settled, and the tensor ready for everyone: no creator any more. */
void srv_store_seal(struct srv_tensor *t);
/* conn is gone: tensors it created and never sealed wait for the next
 * declaration to initialise them (listener, after the fold thread let go). */
void srv_store_orphan(struct srv_store *s, const void *conn);
/* Lock-free: the tensor with this id, or NULL. */
struct srv_tensor *srv_store_get(struct srv_store *s, uint32_t id);
static inline uint8_t *srv_chunk_copy(const struct srv_tensor *t, uint32_t i, unsigned copy)
{
	return t->mem + copy * t->copy_off + (size_t)i * t->stride;
}
/* Chunk i as readers see it: with two copies, the one the index names.
 * Stable while folds are paused or the caller holds the chunk. */
static inline uint8_t *srv_chunk(const struct srv_tensor *t, uint32_t i)
{
	if (t->index)
		return srv_chunk_copy(t, i,
				      (unsigned)(__atomic_load_n(&t->index[i], __ATOMIC_ACQUIRE) >> 1) & 1u);
	return srv_chunk_copy(t, i, 0);
}
/* The 16-bit copy of chunk i (pull_fmt set): header, then count values. */
static inline uint8_t *srv_half_chunk(const struct srv_tensor *t, uint32_t i)
{
	return t->mem + t->half_off + (size_t)i * t->half_stride;
}
/*
 * Write the 16-bit copy of chunk i from src, the master's chunk as it is
 * being published (header: count, clock; then its floats): odd version,
 * converted values, checksum, even version. The caller holds the master's
 * chunk (one writer). publish false leaves the version odd (a tensor still
 * initialising: srv_store_settle makes it even). No-op without pull_fmt.
 */
void srv_half_publish(struct srv_tensor *t, uint32_t i, const struct rdmaps_chunk_hdr *src,
		      bool publish);
/* Chunk i's version: 2 x its versions published, odd while one is being
 * written (one copy: one per fold; two: one per fold thread batch). */
static inline uint64_t srv_chunk_version(const struct srv_tensor *t, uint32_t i)
{
	if (t->index)
		return __atomic_load_n(&t->index[i], __ATOMIC_ACQUIRE);
	return __atomic_load_n(&((const struct rdmaps_chunk_hdr *)srv_chunk_copy(t, i, 0))->version,
			       __ATOMIC_ACQUIRE);
}
/* Run t's optimizer over chunk `chunk`'s count floats at data (either copy)
 * with grad (at SRV_LANE_OFF in a line, or anywhere: slower) and count the
 * step. The caller holds the chunk. */
void srv_chunk_opt(struct srv_tensor *t, uint32_t chunk, float *data, const float *grad,
		   uint32_t count);
/* Apply a staged slot's payload to chunk `chunk` of t (fold or assign); the
 * chunk's clock field is left alone (clock.c owns it). */
void srv_chunk_apply(struct srv_tensor *t, uint32_t chunk, const float *grad, uint32_t count,
		     bool assign);
/* A fold (never an assign) of an ASP chunk: two-copy chunks stay open in
 * os (NULL: published at once), one-copy ones as srv_chunk_apply. */
void srv_chunk_fold(struct srv_tensor *t, uint32_t chunk, const float *grad, uint32_t count,
		    struct srv_open_set *os);
void srv_open_publish(struct srv_open_set *os);
/*
 * A whole copy of chunk i of t into dst (its header, then its floats, or
 * with half the 16-bit copy's), for a worker whose READs of it kept
 * tearing: taken under the chunk's lock as a fold is, so it waits only for
 * a fold in progress. os: the calling fold thread's open folds, published
 * first (never wait while holding them; NULL: none). Returns the bytes copied (at most
 * RDMAPS_CHUNK_HDR + chunk_elems floats). The tensor must be ready.
 */
size_t srv_chunk_snapshot(struct srv_tensor *t, uint32_t i, bool half, void *dst,
			  struct srv_open_set *os);
/* Take / release a chunk's seqlock: version even -> odd; release publishes
 * (new checksum, version + 2) when changed, else restores the old version. */
uint64_t srv_chunk_lock(struct srv_tensor *t, uint32_t chunk);
void srv_chunk_unlock(struct srv_tensor *t, uint32_t chunk, uint64_t v, bool changed);

/* ---- resume.c ---- */
int srv_resume_init(struct srv_resume *r, uint32_t cap);
void srv_resume_fini(struct srv_resume *r);
void srv_resume_clear(struct srv_resume *r);
/* Record a connection's account once it can fold nothing more. Locks. */
void srv_resume_record(struct srv_resume *r, const struct srv_closed *c);
bool srv_resume_find(struct srv_resume *r, uint64_t conn_id, struct srv_closed *out);
/* Up to max records, oldest first (checkpoints). */
uint32_t srv_resume_list(struct srv_resume *r, struct srv_closed *out, uint32_t max);

/* ---- clock.c: BSP/SSP ---- */
/* Make conn a member of t (declare/lookup). *ready = 0 when it must retry later. */
int srv_clock_join(struct srv_tensor *t, struct srv_conn *c, uint64_t *clock, bool *ready);
/* Checks of one slot against the member's progress (fold time, before folding). */
int srv_clock_check(struct srv_tensor *t, struct srv_conn *c, const struct rdmaps_slot_hdr *h,
		    uint32_t *next_chunk);
/* Fold one slot of a BSP/SSP tensor, advancing the member; payload already scaled. */
void srv_clock_fold(struct srv_tensor *t, struct srv_conn *c, const struct rdmaps_slot_hdr *h,
		    const float *grad);
/* The connection is gone: its clocks stop waiting for it. */
void srv_clock_leave(struct srv_conn *c);
/* Evict members that stall a clock longer than evict_ms (listener, periodic). */
void srv_clock_tick(struct srv *s);

/* ---- checksum.c ---- */
/* XXH3-64 of len bytes: the same bits as rdmaps__checksum (what the client
 * checks), its long-input loop picked at run time for this CPU. */
uint64_t srv_checksum(const void *p, size_t len);
/* The same through one variant (0 SSE2, 1 AVX2, 2 AVX-512; the one-shot
 * when this CPU lacks it): for tests. */
uint64_t srv_checksum_variant(const void *p, size_t len, unsigned variant);

/* ---- grad.c: staged gradients, copied out of the worker's reach ---- */
/* A compiler barrier: the compiler forgets what it knows of memory, so a
 * value read from the staging ring before it is never read from the ring
 * again after it (restrict lets a compiler re-read memory it assumes
 * unchanged; the worker may have changed it). */
#define SRV_FORGET_MEMORY() __asm__ volatile("" ::: "memory")
/* Copy n floats to dst and check the copy in the same pass over src: true
 * if every value is finite. No allocation; dst must not overlap src. */
bool srv_grad_copy_finite(float *restrict dst, const float *restrict src, size_t n);
/* The same, returning the copy's sum of squares in double (inf or NaN if a
 * value is not finite). */
double srv_grad_copy_sumsq(float *restrict dst, const float *restrict src, size_t n);
/* g *= scale: clipping, on the fold thread's copy, never on the ring. */
void srv_grad_scale(float *g, size_t n, float scale);
/* The gradient values of a slot's payload (after the row ids of a sparse
 * slot) and how many. */
float *srv_slot_values(const struct srv_tensor *t, const struct rdmaps_slot_hdr *h, void *payload,
		       size_t *n);
/*
 * Copy the payload of a slot whose header h was validated from src (the
 * staging ring) to dst (srv_slot_payload bytes the caller owns, best at
 * SRV_LANE_OFF into a line: srv_stage_slot), and check the copy: row ids
 * in range, values finite. 0 with *sumsq (of the values, unscaled; 0
 * without a clip norm), or why the slot is refused. Fold from dst
 * afterwards, never from src: the worker may rewrite src. A slot in a
 * compressed format (rdmaps__slot_fmt) is decoded into dst as count
 * floats; len is the payload's length as the WRITE carried it, which must
 * be exactly the format's (float32 payloads are sized by count alone).
 */
int srv_slot_take(const struct srv_tensor *t, const struct rdmaps_slot_hdr *h, void *dst,
		  const void *src, size_t len, double *sumsq, const char **why);

/* ---- decode.c: compressed gradients (common/gradfmt.h) ---- */
/*
 * Decode a payload of len bytes in format fmt (RDMAPS__GRAD_*) for n
 * elements from src (the staging ring) into dst (n floats the caller owns),
 * reading each byte of src once, and check it: its length, its indices (in
 * range, strictly ascending), its scale and values finite. 0 with *sumsq
 * (of the decoded values; sumsq NULL when no clip norm needs it, which
 * saves the sum), or an RDMAPS_E* code and why: the payload is
 * then refused whole and dst holds nothing usable. No allocation;
 * thread-safe for distinct dst.
 */
int srv_grad_decode(unsigned fmt, float *restrict dst, size_t n, const void *src, size_t len,
		    double *sumsq, const char **why);

/* ---- checkpoint.c ---- */
/* Snapshot every tensor into dir as checkpoint seq; folds must be paused. */
int srv_checkpoint_write(struct srv_store *st, const char *dir, unsigned server_id, uint64_t seq,
			 char *err, size_t errlen);
/* Restore the newest good checkpoint of dir into an empty store (*seq 0:
 * none); *last is the highest seq any checkpoint file there is named after,
 * usable or not: the next one written must be numbered past it. */
int srv_checkpoint_restore(struct srv_store *st, const char *dir, unsigned server_id,
			   uint64_t *seq, uint64_t *last);
/* Listener: write one now (fold threads parked meanwhile). */
void srv_checkpoint_now(struct srv *s, const char *why);
/* Is there a checkpoint directory of rank p's part here (replica-<p>)? */
bool srv_checkpoint_has_part(struct srv *s, unsigned p);
/* Authority thread, no copy of p here and this server p's last primary
 * (a whole cluster restarted): p's replica store made and restored from
 * its newest good checkpoint here. 0, or RDMAPS_ENOENT (none usable). */
int srv_checkpoint_restore_part(struct srv *s, unsigned p);

/* ---- fold.c ---- */
/* Park every fold thread / let them go: nothing folds in between. */
void srv_fold_pause(struct srv *s);
void srv_fold_resume(struct srv *s);
int srv_fold_start(struct srv *s);
/* Stop and join the fold threads (their channels stay until srv_fold_stop). */
void srv_fold_join(struct srv *s);
void srv_fold_stop(struct srv *s);
/* ---- handover.c (the mailbox's two sides) ---- */
/*
 * Listener -> fold thread hand-over; each blocks until the thread took it.
 * Register gives a built connection its tag (c->wr_tag) before anything is
 * posted on it; attach makes it live (its completions handled, keepalives,
 * credits); detach folds what it staged if it was live and forgets its tag.
 */
void srv_fold_register(struct srv_fold_thread *ft, struct srv_conn *c);
void srv_fold_attach(struct srv_fold_thread *ft, struct srv_conn *c);
void srv_fold_detach(struct srv_fold_thread *ft, struct srv_conn *c);
/* Fold thread ft only: answer the mailbox (register, attach, detach). */
void srv_fold_mail(struct srv_fold_thread *ft);
/* Fold thread only: handle c's completions kept from before it was live,
 * in order, once it may (a worker's need a lease: fold_fence). */
void srv_conn_early(struct srv_conn *c);

/* ---- fold.c, for handover.c: the fold thread's own ---- */
/* Take q's completions (a batch) and handle each: the count taken. */
int srv_cq_poll(struct srv_fold_thread *ft, struct srv_cq *q);
/* One completion of c: a staged slot, a control message, a send done. */
void srv_conn_wc(struct srv_conn *c, const struct ibv_wc *wc);
/* c broken: logged once, nothing more posted, disconnected (the listener frees it). */
void srv_conn_fail(struct srv_conn *c, const char *why, int status);
/* c's credit out now if it is due (urgent, or a quarter of its ring). */
void srv_credit_maybe(struct srv_conn *c);

/* ---- cq.c ---- */
/*
 * Listener: a completion queue of fold thread ft on device verbs with room
 * for need more completions (made, and published to the thread, when none
 * has it), with need reserved on it. RDMAPS_ELIMIT when ft already has
 * SRV_CQS_MAX; RDMAPS_EVERBS when the device will not make one.
 */
int srv_cq_reserve(struct srv *s, struct srv_fold_thread *ft, struct ibv_context *verbs, bool backups,
		   uint32_t need, struct srv_cq **out);
/* Listener: give a reservation back (its QP is destroyed). */
void srv_cq_release(struct srv_cq *scq, uint32_t need);
/* Shutdown, fold thread joined and every QP gone: destroy ft's CQs. */
void srv_cq_fini(struct srv_fold_thread *ft);

/* The completion channel of fold thread ft for device context ctx. */
struct ibv_comp_channel *srv_fold_channel(struct srv *s, struct srv_fold_thread *ft,
					  struct ibv_context *ctx);

/* ---- control.c ---- */
/* Handle one received control message; replies on the connection. */
void srv_control_handle(struct srv_conn *c, const void *msg, uint32_t len);
/* Post a signaled send; inline when len fits the QP's inline limit, else
 * buf must be in bufs (registered) and stay untouched until the completion
 * of wr_id (SRV_WR) gives it back. */
int srv_conn_post_send(struct srv_conn *c, const void *buf, uint32_t len, enum ibv_wr_opcode op,
		       uint64_t raddr, uint32_t rkey, uint64_t wr_id);
void srv_stats_collect(struct srv *s, struct rdmaps_server_stats *out);

/* ---- registration.c: PDs, MRs and memory windows ---- */
/* Listener thread: c's PD and staging registration on its device (after
 * c->staging, c->slots, c->slot_size are set). */
int srv_reg_conn(struct srv *s, struct srv_conn *c, struct ibv_context *verbs);
/* Listener thread, right after c's QP is created: its staging window
 * (shared; a no-op per-worker). */
int srv_reg_window(struct srv *s, struct srv_conn *c);
/* The rkey the worker writes its ring with (told in the welcome). */
uint32_t srv_reg_staging_rkey(const struct srv_conn *c);
/* Listener thread, QP in RTS, before the fold thread sends anything on it:
 * bind the staging window (shared; a no-op per-worker). */
int srv_reg_bind(struct srv_conn *c);
/* Fold thread (control): make t readable by c; registers it on first need. */
int srv_reg_expose(struct srv_conn *c, struct srv_tensor *t);
/* Fold thread (control): c's snapshot buffer (len bytes), made and
 * registered READ-only on the first SNAPSHOT request; then kept. */
int srv_reg_snapshot(struct srv_conn *c, size_t len);
/* Teardown, after the QP is gone: c's window and registrations, then its PD. */
void srv_reg_conn_free(struct srv_conn *c);
void srv_reg_conn_free_pd(struct srv_conn *c);
/* After every connection and fold thread is gone. */
void srv_reg_fini(struct srv *s);
/* Under conns_lock: bytes registered for c alone (its ring, its buffers,
 * and per-worker the tensors it reads). */
uint64_t srv_reg_conn_pinned(const struct srv_conn *c);
/* Any thread: registration counters for the stats reply. */
void srv_reg_stats(struct srv *s, struct rdmaps_server_stats *out);

/* ---- replica.c: backups of this server's parts (docs/durability.md) ---- */
/*
 * A primary keeps each backup current with one-sided WRITEs: after a batch
 * of folds is published, every chunk it changed (header and values, its
 * optimizer state, its fold count) is copied under the chunk's lock into a
 * registered bounce slot and written to each backup, in fold order on one
 * queue pair per backup. A push's credit (what "folded" means to its
 * worker) waits until every connected backup has completed those writes.
 * Fold thread functions take the thread's srv_repl; none allocates.
 */
/* Listener, at start (replicas > 1): the connector thread and each fold
 * thread's srv_repl. */
int srv_repl_start(struct srv *s);
/* Shutdown, fold threads joined: the connector and every backup connection. */
void srv_repl_stop(struct srv *s);
/* Listener, rank p just taken over from replica[p] (p == our own rank:
 * come back): from now on that store is replicated, to server p (another
 * rank's part: its old primary, which catches up and becomes its backup)
 * or to our own backups (our rank's part, instead of the store we began
 * with). The fold threads pick it up at their next poll. */
void srv_repl_serve_part(struct srv *s, unsigned p);
/* Fold thread: chunk `chunk` of t changed; written to the backups at the
 * next srv_repl_flush (early, with the open folds published, when full). */
void srv_repl_touch(struct srv_fold_thread *ft, struct srv_tensor *t, uint32_t chunk);
/* Fold thread (a worker's declaration on it): t was just created in st;
 * it is opened at once on st's backups that are up, which stay in sync
 * meanwhile, rather than at its first fold. */
void srv_repl_declared(struct srv_fold_thread *ft, struct srv_store *st, struct srv_tensor *t);
/* Fold thread: every chunk of t changed (its creator sealed it). */
void srv_repl_touch_all(struct srv_fold_thread *ft, struct srv_tensor *t);
/* Fold thread: c's slots below seq are folded (or refused); its credit says
 * so once the backups have what those folds changed. urgent: the worker
 * waits (RDMAPS_SLOT_ACK) or a slot was refused. */
void srv_repl_credit(struct srv_fold_thread *ft, struct srv_conn *c, uint64_t seq, bool urgent);
/* Fold thread, open folds published: write what was touched. */
void srv_repl_flush(struct srv_fold_thread *ft);
/* Fold thread: completions of the backups, credits they release, backups
 * newly connected (caught up here) or lost. Returns work done. */
int srv_repl_poll(struct srv_fold_thread *ft);
/* Fold thread: credits still wait for the backups (do not sleep). */
bool srv_repl_pending(const struct srv_fold_thread *ft);
/* Fold thread, c leaving: wait until its credits are settled (or the
 * backups are lost), so its account is final. */
void srv_repl_settle(struct srv_fold_thread *ft, struct srv_conn *c);
/* Fold thread (replica.c calls it): c's folded seq and its credit. */
void srv_conn_credit(struct srv_conn *c, uint64_t seq, bool urgent);
/* Fold thread ft (any, with one fold thread the owner of the backups):
 * what REPLICAS answers. */
void srv_repl_describe(struct srv *s, struct srv_fold_thread *ft,
		       struct rdmaps_msg_replicas_reply *r);
/* Fold thread (replica.c, waiting for room in a backup's ring): apply the
 * records of the primaries this server backs up, and nothing else. */
int srv_fold_poll_backups(struct srv_fold_thread *ft);
/* Any thread: ft out of its sleep (its eventfd), to look at what changed. */
void srv_fold_wake(struct srv_fold_thread *ft);
/* Backup side, listener: a replica store's records of closed connections
 * (what RESUME answers) made its primary's accounts, as the primary last
 * wrote them (a primary restored from it, or this server taking it over). */
void srv_repl_accounts_to_records(struct srv_store *st);
/* Backup side, listener: the store for rank p's replicas (made on first use). */
struct srv_store *srv_repl_store(struct srv *s, unsigned p);
/*
 * Primary side, store.c: a copy of chunk i for a backup, under its lock:
 * header and values at dst, count * state_per_param floats of state at
 * dst + state_off, the fold count (u64) at dst + steps_off. Returns the
 * header and values' bytes. os: the caller's open folds (published first).
 */
size_t srv_chunk_replica_copy(struct srv_tensor *t, uint32_t i, uint8_t *dst, size_t state_off,
			      size_t steps_off, struct srv_open_set *os);
/* Backup side, store.c: chunk i of a replica tensor made what the record
 * at src says (srv_replica_layout; count values), under the chunk's lock. */
void srv_chunk_replica_apply(struct srv_tensor *t, uint32_t i, const uint8_t *src,
			     uint32_t count, const struct srv_replica_layout *l);
/* ---- backup.c: a primary's records on its replica connection c ---- */
/* Fold thread: 0, or why the record (seq right, header h, payload len
 * bytes) must not be applied. */
int srv_backup_check(struct srv_conn *c, const struct rdmaps_slot_hdr *h, uint32_t len,
		     const char **why);
/* Fold thread, a group's last record in: every record of the group
 * applied (none if one was refused), then the primary's credit. */
void srv_backup_group(struct srv_conn *c);

/* ---- listener.c ---- */
int srv_listen(struct srv *s);
int srv_run(struct srv *s);
void srv_close(struct srv *s);
uint8_t *srv_conn_reply_buf(struct srv_conn *c, unsigned i);
/* Any thread: ask the listener to close the connection conn_id (its worker
 * came back on another one); false when no such connection is open. */
bool srv_conn_evict(struct srv *s, uint64_t conn_id);
uint8_t *srv_conn_credit_buf(struct srv_conn *c);
int srv_conn_post_recv(struct srv_conn *c, uint32_t i);

#endif
