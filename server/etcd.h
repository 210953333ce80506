/*
 * etcd.h -- a client of etcd's v3 JSON gateway, as much as the authority
 * (authority.c) needs. One caller at a time per struct srv_etcd (it
 * remembers which endpoint answered); blocking, with a deadline.
 */
#ifndef RDMAPS_SERVER_ETCD_H
#define RDMAPS_SERVER_ETCD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SRV_ETCD_MAX_EP 8

struct srv_etcd_ep {
	char host[128];
	char port[16];
};

struct srv_etcd {
	struct srv_etcd_ep ep[SRV_ETCD_MAX_EP];
	unsigned n, cur;
};

/* "http://h1:p1,http://h2:p2" (the scheme may be left out). 0 or
 * RDMAPS_EINVAL with err saying why. */
int srv_etcd_parse(struct srv_etcd *e, const char *urls, char *err, size_t errlen);

/*
 * POST body (JSON) to path ("/v3/kv/txn"...) of the first endpoint that
 * answers within timeout_ms, trying each in turn. 0 with the answer's JSON
 * body in out; else RDMAPS_ECONNECT / RDMAPS_ETIMEDOUT (nobody answered),
 * RDMAPS_EREMOTE (an HTTP error) or RDMAPS_EPROTO, with why saying what.
 */
int srv_etcd_post(struct srv_etcd *e, const char *path, const char *body, char *out,
		  size_t outlen, unsigned timeout_ms, char *why, size_t whylen);

/* Base64 of n bytes into dst (NUL-terminated); its length, 0 if too small. */
size_t srv_b64_encode(const void *src, size_t n, char *dst, size_t dstlen);

/* From the first "key" in a JSON text: a number (etcd quotes 64-bit ones),
 * true, or a base64 string decoded (NUL-terminated). False if absent. */
bool srv_json_u64(const char *js, const char *key, uint64_t *v);
bool srv_json_true(const char *js, const char *key);
bool srv_json_b64(const char *js, const char *key, char *out, size_t outlen);

#endif
