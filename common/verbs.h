/*
 * verbs.h -- libibverbs / librdmacm helpers both sides share, and the one
 * place their errno-style failures become rdmaps_err values.
 */
#ifndef RDMAPS_COMMON_VERBS_H
#define RDMAPS_COMMON_VERBS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

static inline uint64_t rdmaps__now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * Register memory; on failure log why and, when the cause is the locked
 * memory limit, say exactly what to raise. Returns 0 or a negative rdmaps_err.
 */
int rdmaps__reg_mr(struct ibv_pd *pd, void *addr, size_t len, int access, struct ibv_mr **out);

/*
 * Check RLIMIT_MEMLOCK against `need` bytes. Returns 0 when enough (or
 * unlimited, or CAP_IPC_LOCK makes it moot), else RDMAPS_EMEMLOCK after
 * logging the current limit and how to raise it.
 */
int rdmaps__memlock_check(size_t need, const char *who);

/* Describe the current RLIMIT_MEMLOCK in buf ("unlimited" or "64 KiB"). */
void rdmaps__memlock_describe(char *buf, size_t len);

/*
 * Wait up to timeout_ms for the next event on ch. If it is not `want`,
 * ack it and return an error (RDMAPS_EREJECTED for a reject, with the reject
 * private data's error in *reject_err if non-NULL). On success the caller
 * owns *ev and must rdma_ack_cm_event() it.
 */
int rdmaps__cm_wait(struct rdma_event_channel *ch, enum rdma_cm_event_type want, int timeout_ms,
		    struct rdma_cm_event **ev, int *reject_err);

/*
 * Before rdma_connect: the connection's transport ACK timeout at least ms
 * (the verbs exponent: 4.096 us << n); 0 leaves rdma_cm's (on RoCE about
 * 2 s, so a silent peer is given up after 7 of them, about 15 s). Thread:
 * the id's owner. Logs and goes on with rdma_cm's if it is refused.
 */
void rdmaps__cm_ack_timeout(struct rdma_cm_id *id, int ms);

/*
 * Resolve id (its events on ch) to host:port from local address src (NULL
 * or "": the route's), address then route, each within timeout_ms. Binding
 * src picks the device, and on rxe it is what makes the traffic leave
 * through that device instead of a local shortcut. 0, RDMAPS_ECONNECT
 * (host unknown), RDMAPS_ENODEV (src unknown), or what rdma_cm said.
 */
int rdmaps__cm_resolve(struct rdma_event_channel *ch, struct rdma_cm_id *id, const char *host,
		       const char *port, const char *src, int timeout_ms);

/* "RDMA_CM_EVENT_x" text for logs. */
const char *rdmaps__cm_event_str(enum rdma_cm_event_type t);

/*
 * Chunks one pull READ may cover on device v (at least 1, at most
 * RDMAPS_READ_SPAN): each chunk takes two scatter entries (its header to
 * scratch, its floats to the caller), so the device's READ scatter limit
 * bounds it. A QP that pulls asks for 2 x this many send SGEs.
 */
#define RDMAPS_READ_SPAN 8u
unsigned rdmaps__read_span(struct ibv_context *v);

/* Whether a device of these attributes has type-2 memory windows, which
 * the server's shared registration needs (bound to one QP each). */
static inline bool rdmaps__has_mw2(const struct ibv_device_attr *da)
{
	return da->max_mw > 0 &&
	       (da->device_cap_flags & (IBV_DEVICE_MEM_WINDOW_TYPE_2A | IBV_DEVICE_MEM_WINDOW_TYPE_2B));
}

/* Convert a failed work completion into an rdmaps_err. */
int rdmaps__wc_err(const struct ibv_wc *wc);

#endif
