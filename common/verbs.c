/*
 * verbs.c -- shared libibverbs / librdmacm helpers.
 */
#include "verbs.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "error.h"
#include "log.h"
#include "protocol.h"

void rdmaps__memlock_describe(char *buf, size_t len)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_MEMLOCK, &rl) != 0)
		snprintf(buf, len, "unknown");
	else if (rl.rlim_cur == RLIM_INFINITY)
		snprintf(buf, len, "unlimited");
	else
		snprintf(buf, len, "%llu KiB", (unsigned long long)rl.rlim_cur / 1024);
}

static void memlock_advice(size_t need, const char *who)
{
	char cur[64];

	rdmaps__memlock_describe(cur, sizeof(cur));
	log_error("%s: registering %zu bytes needs locked memory, but RLIMIT_MEMLOCK is %s. "
		  "Raise it: `ulimit -l unlimited` in the shell, `* - memlock unlimited` in "
		  "/etc/security/limits.conf, LimitMEMLOCK=infinity for a systemd unit, or "
		  "--ulimit memlock=-1 for a container",
		  who, need, cur);
}

int rdmaps__memlock_check(size_t need, const char *who)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_MEMLOCK, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY ||
	    rl.rlim_cur >= need)
		return 0;
	if (geteuid() == 0)
		return 0; /* root usually has CAP_IPC_LOCK, which bypasses the limit */
	memlock_advice(need, who);
	return RDMAPS_EMEMLOCK;
}

int rdmaps__reg_mr(struct ibv_pd *pd, void *addr, size_t len, int access, struct ibv_mr **out)
{
	struct ibv_mr *mr = ibv_reg_mr(pd, addr, len, access);
	int e = errno;

	if (mr) {
		*out = mr;
		return 0;
	}
	if (e == ENOMEM || e == EPERM || e == EAGAIN) {
		memlock_advice(len, "ibv_reg_mr");
		return RDMAPS_EMEMLOCK;
	}
	log_error("ibv_reg_mr(%zu bytes): %s", len, strerror(e));
	return rdmaps__from_errno(e);
}

const char *rdmaps__cm_event_str(enum rdma_cm_event_type t)
{
	return rdma_event_str(t);
}

int rdmaps__cm_wait(struct rdma_event_channel *ch, enum rdma_cm_event_type want, int timeout_ms,
		    struct rdma_cm_event **ev, int *reject_err)
{
	struct pollfd pfd = { .fd = ch->fd, .events = POLLIN };
	struct rdma_cm_event *e;
	int rc;

	/* the channel fd is non-blocking for callers that use this helper */
	rc = poll(&pfd, 1, timeout_ms < 0 ? -1 : timeout_ms);
	if (rc == 0) {
		log_debug("rdma_cm: no %s within %d ms", rdma_event_str(want), timeout_ms);
		return RDMAPS_ETIMEDOUT;
	}
	if (rc < 0)
		return rdmaps__from_errno(errno);
	if (rdma_get_cm_event(ch, &e))
		return rdmaps__from_errno(errno);
	if (e->event == want) {
		*ev = e;
		return 0;
	}
	rc = RDMAPS_ECONNECT;
	if (e->event == RDMA_CM_EVENT_REJECTED) {
		struct rdmaps_wire_reject rj;
		rc = RDMAPS_EREJECTED;
		if (e->param.conn.private_data && e->param.conn.private_data_len >= sizeof(rj)) {
			memcpy(&rj, e->param.conn.private_data, sizeof(rj));
			if (rj.magic == RDMAPS_PROTO_MAGIC && rj.err < 0 && reject_err)
				*reject_err = rj.err;
		}
	} else if (e->event == RDMA_CM_EVENT_ADDR_ERROR || e->event == RDMA_CM_EVENT_ROUTE_ERROR) {
		rc = RDMAPS_ENODEV;
	} else if (e->event == RDMA_CM_EVENT_UNREACHABLE) {
		rc = RDMAPS_ECONNECT;
	}
	log_debug("rdma_cm: wanted %s, got %s (status %d)", rdma_event_str(want),
		  rdma_event_str(e->event), e->status);
	rdma_ack_cm_event(e);
	return rc;
}

void rdmaps__cm_ack_timeout(struct rdma_cm_id *id, int ms)
{
	uint8_t n = 0;

	if (ms <= 0)
		return;
	while (n < 31 && 4.096e-3 * (double)(1u << n) < (double)ms)
		n++;
	if (rdma_set_option(id, RDMA_OPTION_ID, RDMA_OPTION_ID_ACK_TIMEOUT, &n, sizeof(n)))
		log_warn("ack_timeout_ms: rdma_cm does not take it (%s): its own is used",
			 strerror(errno));
}

int rdmaps__cm_resolve(struct rdma_event_channel *ch, struct rdma_cm_id *id, const char *host,
		       const char *port, const char *src, int timeout_ms)
{
	struct rdma_addrinfo hints = { .ai_port_space = RDMA_PS_TCP }, *dst = NULL, *sres = NULL;
	struct rdma_cm_event *ev;
	int rc;

	if (rdma_getaddrinfo(host, port, &hints, &dst))
		return RDMAPS_ECONNECT;
	if (src && *src) {
		struct rdma_addrinfo sh = { .ai_flags = RAI_PASSIVE, .ai_port_space = RDMA_PS_TCP };
		if (rdma_getaddrinfo(src, NULL, &sh, &sres)) {
			rdma_freeaddrinfo(dst);
			return RDMAPS_ENODEV;
		}
	}
	rc = rdma_resolve_addr(id, sres ? sres->ai_src_addr : NULL, dst->ai_dst_addr, timeout_ms);
	rdma_freeaddrinfo(dst);
	if (sres)
		rdma_freeaddrinfo(sres);
	if (rc)
		return rdmaps__from_errno(errno);
	if ((rc = rdmaps__cm_wait(ch, RDMA_CM_EVENT_ADDR_RESOLVED, timeout_ms, &ev, NULL)))
		return rc;
	rdma_ack_cm_event(ev);
	if (rdma_resolve_route(id, timeout_ms))
		return rdmaps__from_errno(errno);
	if ((rc = rdmaps__cm_wait(ch, RDMA_CM_EVENT_ROUTE_RESOLVED, timeout_ms, &ev, NULL)))
		return rc;
	rdma_ack_cm_event(ev);
	return 0;
}

unsigned rdmaps__read_span(struct ibv_context *v)
{
	struct ibv_device_attr da;
	unsigned sge;

	if (ibv_query_device(v, &da))
		return 1;
	/* max_sge_rd is 0 on providers that do not tell it apart from max_sge */
	sge = (unsigned)da.max_sge;
	if (da.max_sge_rd > 0 && (unsigned)da.max_sge_rd < sge)
		sge = (unsigned)da.max_sge_rd;
	sge /= 2;
	return sge < 1 ? 1 : sge > RDMAPS_READ_SPAN ? RDMAPS_READ_SPAN : sge;
}

int rdmaps__wc_err(const struct ibv_wc *wc)
{
	switch (wc->status) {
	case IBV_WC_SUCCESS:
		return 0;
	case IBV_WC_REM_ACCESS_ERR:
	case IBV_WC_REM_INV_REQ_ERR:
	case IBV_WC_REM_OP_ERR:
		return RDMAPS_EPROTO;
	case IBV_WC_RETRY_EXC_ERR:
	case IBV_WC_RNR_RETRY_EXC_ERR:
	case IBV_WC_WR_FLUSH_ERR:
		return RDMAPS_EDISCONNECTED;
	default:
		return RDMAPS_EVERBS;
	}
}
