/*
 * replica.h -- a primary's backups, shared by the fold thread's side
 * (replica.c: records, credits, catch-up) and the connector's
 * (peer.c: connecting, watching, tearing down). Private to those two.
 */
#ifndef RDMAPS_SERVER_REPLICA_H
#define RDMAPS_SERVER_REPLICA_H

#include "server.h"

#define PEER_BOUNCE 16u      /* records in flight to one backup, each in a slot of its own */
/* chunks a batch records before they are written early: a group (them,
 * and the accounts after) fits in the backup's ring */
#define REPL_TOUCH_MAX (SRV_REPL_RING / 2)
#define REPL_WAIT_MAX 4096u  /* credits waiting for the backups */
#define PEER_TIMEOUT_MS 5000 /* connect, and a REPLICA_OPEN's answer */
/* records written and none acknowledged by the backup's NIC for this long:
 * it is given up (and struck off the in-sync set) without waiting for the
 * transport's retries (ack_timeout_ms x 7: 15 s with rdma_cm's) */
#define PEER_SILENT_MS 1000
#define PEER_RETRY_NS 500000000ull
#define SETTLE_NS 10000000000ull /* a leaving worker's credits wait this long at most */
/* backups of parts taken over here (their old primaries), beyond our own */
#define REPL_PART_PEERS 4u
#define REPL_PEERS (RDMAPS_MAX_REPLICAS - 1 + REPL_PART_PEERS)

enum peer_state { PEER_DOWN, PEER_READY, PEER_UP, PEER_FAILED };

#define WR_CHUNK 1u
#define WR_SEND 2u
#define WR_RECV 3u

/* One of our tensors on a backup: its id there (REPLICA_REPLY). */
enum { PT_CLOSED, PT_QUEUED, PT_ASKED, PT_OPEN };
struct peer_tensor {
	uint32_t id;
	int state;
	/* opened at its declaration, before any fold of it: the backup
	 * stays in sync meanwhile (srv_repl_declared) */
	bool eager;
};

struct srv_peer {
	struct srv *s;
	struct srv_repl *r;
	unsigned rank; /* the server it is */
	/* the rank whose part it backs up (our own, or one taken over here:
	 * then rank == part), and the store that part is in; the fold thread
	 * alone changes store, on move_to from the listener (our rank's part
	 * back here in its replica: srv_repl_serve_part) */
	unsigned part;
	struct srv_store *store;
	_Atomic(struct srv_store *) move_to;
	_Atomic int state; /* enum peer_state: who owns the rest (top of file) */
	struct rdma_event_channel *ch;
	struct rdma_cm_id *id;
	struct ibv_pd *pd;
	struct ibv_cq *cq;
	struct ibv_qp *qp;
	uint8_t *buf; /* a request, a reply, then PEER_BOUNCE slots */
	size_t buf_len;
	struct ibv_mr *mr;
	/* what the backup writes (its credit: how far it applied our
	 * records, as a worker's for its pushes; keepalives): nothing else */
	struct rdmaps_wire_credit *credit;
	struct ibv_mr *credit_mr;
	/* its ring for our records (the welcome), and the next record's seq */
	uint64_t ring_addr;
	uint32_t ring_rkey, ring_slots, ring_slot;
	uint64_t seq;
	bool answered;  /* its answer to the open being asked is in */
	bool in_group;  /* records posted since the last group's end */
	/* under an authority: it began an open while etcd counted it in
	 * sync; nothing is written to it until etcd no longer does, then it
	 * is caught up whole (srv_repl_flush) */
	bool hold;
	struct peer_tensor *pt; /* per tensor id of our store */
	/* chunks written and completed since start, never reset: a credit
	 * waits for this backup to have completed what was posted before it */
	uint64_t posted, completed;
	/* completed as last seen moving, and when (or when the first record
	 * went out to an idle backup): peer_silent */
	uint64_t quiet_completed, quiet_since;
	uint32_t req_id, reply_len;
	struct srv_tensor *asking; /* its REPLICA_OPEN is out */
	uint64_t asked_ns;
	uint32_t opening;          /* tensors queued or asked */
	uint32_t eager;            /* of which opened at their declaration */
	bool synced;               /* every tensor written since it connected */
	uint64_t sync_from, sync_ns, open_ns; /* the catch-up: from, started, first open answered */
	/* places its table of our workers' accounts has (REPLICA_REPLY) */
	uint32_t acct_cap;
	uint64_t last_try; /* connector: last attempt */
	unsigned failing;  /* connector: attempts failed in a row */
	_Atomic bool lost; /* connector -> fold thread: its connection closed */
};

struct repl_wait {
	struct srv_conn *c; /* NULL: its connection left */
	uint64_t seq;
	const struct srv_store *store;   /* the part it is of: its backups count */
	uint64_t upto[REPL_PEERS]; /* each backup's posted count it waits for */
	bool assigned, urgent;
};

struct repl_touch {
	struct srv_tensor *t;
	uint32_t chunk;
};

struct srv_repl {
	struct srv_fold_thread *ft;
	/* our own backups first; peers are added (the listener: release),
	 * never removed while running */
	struct srv_peer peer[REPL_PEERS];
	_Atomic unsigned npeers;
	size_t slot_bytes;
	struct repl_touch touch[REPL_TOUCH_MAX];
	uint32_t ntouch;
	struct repl_wait wait[REPL_WAIT_MAX]; /* a ring, oldest at head */
	uint32_t head, count;
};

static inline uint8_t *msg_out(struct srv_peer *p) { return p->buf; }
static inline uint8_t *msg_in(struct srv_peer *p) { return p->buf + RDMAPS_MSG_MAX; }
static inline uint8_t *bounce(struct srv_peer *p, uint64_t n)
{
	return p->buf + 2 * RDMAPS_MSG_MAX + (size_t)(n % PEER_BOUNCE) * p->r->slot_bytes;
}

/* The next record p will apply: its credit, which it writes. */
static inline uint64_t peer_applied(const struct srv_peer *p)
{
	return __atomic_load_n(&p->credit->folded_seq, __ATOMIC_ACQUIRE);
}

/* Is p's part ours to replicate: our own rank's, or one served here (not
 * one handed back, or lost with our lease)? */
static inline bool peer_part_ours(const struct srv_peer *p)
{
	return p->part == p->s->cfg.server_id || srv_serves(p->s, p->part);
}

/* ---- peer.c: the connector's side ---- */
/* Everything of p's connection let go of (the connector's, or at stop). */
void srv_peer_teardown(struct srv_peer *p);
/* A receive for the backup's next answer. */
int srv_peer_post_recv(struct srv_peer *p);
/* The connector thread (arg: the server): connects each backup that is
 * down, every PEER_RETRY_NS, and hands it to its fold thread (READY). */
void *srv_peer_connector(void *arg);

#endif
