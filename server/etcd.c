/*
 * etcd.c -- the little of etcd's v3 API the authority needs (authority.c),
 * as JSON over HTTP/1.0 to etcd's gRPC gateway (POST /v3/...): one request
 * per TCP connection, which the server closes after its answer, so there is
 * no chunked encoding or connection reuse to handle. Nothing here is on a
 * data path: a keep-alive every third of the lease, a few calls per claim.
 * Keys and values travel base64-encoded, 64-bit numbers as JSON strings.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "error.h"
#include "etcd.h"
#include "verbs.h"

int srv_etcd_parse(struct srv_etcd *e, const char *urls, char *err, size_t errlen)
{
	const char *p = urls;

	memset(e, 0, sizeof(*e));
	while (*p) {
		size_t n = strcspn(p, ", ");
		const char *colon;
		struct srv_etcd_ep *ep;
		char one[160];

		if (!n) {
			p++;
			continue;
		}
		if (e->n == SRV_ETCD_MAX_EP || n >= sizeof(one)) {
			snprintf(err, errlen, "etcd: at most %d endpoints, each shorter than %zu bytes",
				 SRV_ETCD_MAX_EP, sizeof(one));
			return RDMAPS_EINVAL;
		}
		memcpy(one, p, n);
		one[n] = '\0';
		p += n;
		const char *h = strncmp(one, "http://", 7) ? one : one + 7;
		if (strstr(one, "://") && h == one) {
			snprintf(err, errlen, "etcd endpoint %s: only http:// is spoken", one);
			return RDMAPS_EINVAL;
		}
		ep = &e->ep[e->n];
		colon = strrchr(h, ':');
		if (!colon || colon == h || !colon[1] || strchr(colon, '/') ||
		    (size_t)(colon - h) >= sizeof(ep->host) || strlen(colon + 1) >= sizeof(ep->port)) {
			snprintf(err, errlen, "etcd endpoint %s: want http://HOST:PORT", one);
			return RDMAPS_EINVAL;
		}
		memcpy(ep->host, h, (size_t)(colon - h));
		snprintf(ep->port, sizeof(ep->port), "%s", colon + 1);
		e->n++;
	}
	if (!e->n) {
		snprintf(err, errlen, "etcd: no endpoint given");
		return RDMAPS_EINVAL;
	}
	return 0;
}

/* A connected TCP socket to ep, or -1; within deadline (monotonic ns). */
static int tcp_connect(const struct srv_etcd_ep *ep, uint64_t deadline)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
	struct addrinfo *ai = NULL;
	int fd = -1;

	if (getaddrinfo(ep->host, ep->port, &hints, &ai) || !ai)
		return -1;
	for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
		fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd < 0)
			continue;
		if (connect(fd, a->ai_addr, a->ai_addrlen) && errno != EINPROGRESS) {
			close(fd);
			fd = -1;
			continue;
		}
		struct pollfd pfd = { .fd = fd, .events = POLLOUT };
		uint64_t now = rdmaps__now_ns();
		int soerr = 0;
		socklen_t sl = sizeof(soerr);
		if (now >= deadline || poll(&pfd, 1, (int)((deadline - now) / 1000000u) + 1) != 1 ||
		    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) || soerr) {
			close(fd);
			fd = -1;
		}
	}
	freeaddrinfo(ai);
	return fd;
}

/* Wait until fd is ready for ev or the deadline passes. */
static bool wait_fd(int fd, short ev, uint64_t deadline)
{
	struct pollfd pfd = { .fd = fd, .events = ev };
	uint64_t now = rdmaps__now_ns();

	return now < deadline && poll(&pfd, 1, (int)((deadline - now) / 1000000u) + 1) == 1;
}

/* One request to one endpoint; the body of a 200 answer into out. */
static int post_one(const struct srv_etcd_ep *ep, const char *path, const char *body, char *out,
		    size_t outlen, uint64_t deadline, char *why, size_t whylen)
{
	char head[256];
	size_t blen = strlen(body), got = 0;
	int fd = tcp_connect(ep, deadline);
	int hl;

	if (fd < 0) {
		snprintf(why, whylen, "cannot connect to %s:%s", ep->host, ep->port);
		return RDMAPS_ECONNECT;
	}
	hl = snprintf(head, sizeof(head),
		      "POST %s HTTP/1.0\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
		      "Content-Length: %zu\r\n\r\n",
		      path, ep->host, ep->port, blen);
	for (size_t off = 0, tot = (size_t)hl + blen; off < tot;) {
		const char *from = off < (size_t)hl ? head + off : body + (off - (size_t)hl);
		size_t len = off < (size_t)hl ? (size_t)hl - off : tot - off;
		ssize_t w = send(fd, from, len, MSG_NOSIGNAL);
		if (w > 0) {
			off += (size_t)w;
		} else if (w < 0 && errno == EAGAIN && wait_fd(fd, POLLOUT, deadline)) {
			continue;
		} else {
			close(fd);
			snprintf(why, whylen, "%s:%s: send failed", ep->host, ep->port);
			return RDMAPS_ETIMEDOUT;
		}
	}
	/* HTTP/1.0: the answer ends where the connection does */
	for (;;) {
		ssize_t r = got + 1 < outlen ? recv(fd, out + got, outlen - 1 - got, 0) : 0;
		if (r > 0) {
			got += (size_t)r;
		} else if (r < 0 && errno == EAGAIN && wait_fd(fd, POLLIN, deadline)) {
			continue;
		} else {
			int e = errno;
			close(fd);
			if (r < 0 || got + 1 >= outlen) {
				snprintf(why, whylen, "%s:%s: %s", ep->host, ep->port,
					 r == 0	       ? "answer too long"
					 : e == EAGAIN ? "no answer in time"
						       : strerror(e));
				return RDMAPS_ETIMEDOUT;
			}
			break;
		}
	}
	out[got] = '\0';
	char *sep = strstr(out, "\r\n\r\n");
	if (strncmp(out, "HTTP/1.", 7) || !sep) {
		snprintf(why, whylen, "%s:%s: not an HTTP answer", ep->host, ep->port);
		return RDMAPS_EPROTO;
	}
	if (strncmp(out + 8, " 200", 4)) {
		snprintf(why, whylen, "%s:%s %s: %.*s: %.120s", ep->host, ep->port, path,
			 (int)strcspn(out, "\r"), out, sep + 4);
		return RDMAPS_EREMOTE;
	}
	memmove(out, sep + 4, got - (size_t)(sep + 4 - out) + 1);
	return 0;
}

int srv_etcd_post(struct srv_etcd *e, const char *path, const char *body, char *out,
		  size_t outlen, unsigned timeout_ms, char *why, size_t whylen)
{
	uint64_t deadline = rdmaps__now_ns() + (uint64_t)timeout_ms * 1000000u;
	int rc = RDMAPS_ECONNECT;

	/* the endpoint that answered last first; each of the others once */
	for (unsigned k = 0; k < e->n; k++) {
		unsigned i = (e->cur + k) % e->n;
		uint64_t now = rdmaps__now_ns();
		uint64_t share = now < deadline ? (deadline - now) / (e->n - k) : 0;
		rc = post_one(&e->ep[i], path, body, out, outlen, now + share, why, whylen);
		if (rc != RDMAPS_ECONNECT && rc != RDMAPS_ETIMEDOUT) {
			e->cur = i;
			return rc;
		}
	}
	return rc;
}

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

size_t srv_b64_encode(const void *src, size_t n, char *dst, size_t dstlen)
{
	const uint8_t *s = src;
	size_t o = 0;

	if (dstlen < (n + 2) / 3 * 4 + 1)
		return 0;
	for (size_t i = 0; i < n; i += 3) {
		uint32_t v = (uint32_t)s[i] << 16 | (i + 1 < n ? (uint32_t)s[i + 1] << 8 : 0) |
			     (i + 2 < n ? s[i + 2] : 0);
		dst[o++] = b64[v >> 18];
		dst[o++] = b64[(v >> 12) & 63];
		dst[o++] = i + 1 < n ? b64[(v >> 6) & 63] : '=';
		dst[o++] = i + 2 < n ? b64[v & 63] : '=';
	}
	dst[o] = '\0';
	return o;
}

/* Decode base64 up to its closing quote (or end) into dst; -1 if malformed. */
static long b64_decode(const char *src, char *dst, size_t dstlen)
{
	uint32_t v = 0;
	int bits = 0;
	size_t o = 0;

	for (; *src && *src != '"' && *src != '='; src++) {
		const char *k = strchr(b64, *src);
		if (!k)
			return -1;
		v = v << 6 | (uint32_t)(k - b64);
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			if (o + 1 >= dstlen)
				return -1;
			dst[o++] = (char)(v >> bits & 0xff);
		}
	}
	dst[o] = '\0';
	return (long)o;
}

/* The value of the first "key": in js (its first character), or NULL. */
static const char *json_at(const char *js, const char *key)
{
	size_t kl = strlen(key);

	for (const char *p = strchr(js, '"'); p; p = strchr(p + 1, '"')) {
		if (!strncmp(p + 1, key, kl) && p[kl + 1] == '"') {
			const char *v = p + kl + 2;
			while (*v == ' ')
				v++;
			if (*v != ':')
				continue;
			for (v++; *v == ' '; v++)
				;
			return v;
		}
	}
	return NULL;
}

bool srv_json_u64(const char *js, const char *key, uint64_t *v)
{
	const char *p = json_at(js, key);
	char *end;

	if (!p)
		return false;
	if (*p == '"')
		p++;
	if (*p < '0' || *p > '9')
		return false;
	errno = 0;
	*v = strtoull(p, &end, 10);
	return !errno && end != p;
}

bool srv_json_true(const char *js, const char *key)
{
	const char *p = json_at(js, key);

	return p && !strncmp(p, "true", 4);
}

bool srv_json_b64(const char *js, const char *key, char *out, size_t outlen)
{
	const char *p = json_at(js, key);

	return p && *p == '"' && b64_decode(p + 1, out, outlen) >= 0;
}
