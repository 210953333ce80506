/*
 * error.c -- rdmaps_strerror() and the one boundary where errno values from
 * libc, libibverbs and librdmacm become rdmaps error codes.
 */
#include "error.h"

#include <errno.h>

const char *rdmaps_strerror(int err)
{
	switch (err) {
	case RDMAPS_OK:
		return "success";
#define RDMAPS__ERR_STR(name, val, msg) \
	case RDMAPS_E##name:            \
		return msg;
		RDMAPS_ERR_MAP(RDMAPS__ERR_STR)
#undef RDMAPS__ERR_STR
	}
	return "unknown rdmaps error";
}

const char *rdmaps_err_name(int err)
{
	switch (err) {
	case RDMAPS_OK:
		return "RDMAPS_OK";
#define RDMAPS__ERR_NAME(name, val, msg) \
	case RDMAPS_E##name:             \
		return "RDMAPS_E" #name;
		RDMAPS_ERR_MAP(RDMAPS__ERR_NAME)
#undef RDMAPS__ERR_NAME
	}
	return "RDMAPS_E?";
}

int rdmaps__from_errno(int e)
{
	if (e < 0)
		e = -e; /* ibv_post_* return positive errno, rdma_* set errno: accept both */
	switch (e) {
	case 0:
		return RDMAPS_EVERBS; /* a failure reported without a reason */
	case ENOMEM:
		return RDMAPS_ENOMEM;
	case EINVAL:
		return RDMAPS_EINVAL;
	case ENODEV:
	case EADDRNOTAVAIL:
		return RDMAPS_ENODEV;
	case ETIMEDOUT:
		return RDMAPS_ETIMEDOUT;
	case EAGAIN:
		return RDMAPS_EAGAIN;
	case ECONNREFUSED:
	case EHOSTUNREACH:
	case ENETUNREACH:
		return RDMAPS_ECONNECT;
	case ECONNRESET:
	case ENOTCONN:
	case EPIPE:
		return RDMAPS_EDISCONNECTED;
	case ENOSPC:
	case EBUSY:
		return RDMAPS_EBUSY;
	case EOPNOTSUPP:
		return RDMAPS_ENOTSUP;
	default:
		return RDMAPS_ESYS;
	}
}
