/*
 * harness.h -- RDMA test fixtures: a real rdmaps-server child per test, on
 * the address of the RDMA device the suite was given (RDMAPS_TEST_ADDR, or
 * RDMAPS_RXE_ADDR inside tools/rxe-vm). No address is a failure, not a skip.
 */
#ifndef RDMAPS_TEST_HARNESS_H
#define RDMAPS_TEST_HARNESS_H

#include <sys/types.h>

#include "rdmaps.h"

#define TH_TOKEN "test-token-0123456789"

struct th_server {
	pid_t pid;
	char port[16];
	const char *addr;
};

/* The device address to use; fails the test when none is configured. */
const char *th_addr(void);
/* Start rdmaps-server with extra NULL-terminated args; waits until it serves. */
void th_server_start(struct th_server *s, ...);
/* The same on a given address (cluster tests: one server per host). */
void th_server_start_at(struct th_server *s, const char *addr, ...);
/*
 * Addresses of the test "hosts": RDMAPS_HOSTS (tools/rxe-vm --hosts N gives
 * each its own rxe device), else the single test address n times (servers
 * then differ by port only). Returns how many were filled (n).
 */
unsigned th_hosts(const char **out, unsigned n);
/* SIGTERM, wait; asserts the server was still alive and exits cleanly. */
void th_server_stop(struct th_server *s);
int th_server_alive(const struct th_server *s);
/* The server's pinned memory (VmPin of /proc/PID/status), in KiB. */
unsigned long long th_server_pinned_kib(const struct th_server *s);
/* kill -9, as a crash would. */
void th_server_kill9(struct th_server *s);
/* SIGSTOP, returning once every thread of it has stopped: kill() returns
 * before a thread spinning on another vCPU is stopped, which under TCG can
 * take long enough for it to fold what the test posts next. */
void th_server_freeze(struct th_server *s);
/* Start again on the same address and port, with these args. */
void th_server_restart(struct th_server *s, ...);
/* Connect a librdmaps client with the test token (asserts success). */
rdmaps_client *th_connect(const struct th_server *s);
int th_connect_token(const struct th_server *s, const char *token, rdmaps_client **out);
/* Connect to every server of "host:port,..." from address src (NULL: any),
 * with the test token; returns 0 or the rdmaps_err. */
int th_connect_cluster(const char *servers, const char *src, rdmaps_client **out);
/*
 * Start tests/rdma/pusher.c with these NULL-terminated arguments and wait
 * until it says it is ready (asserts it does); returns its pid.
 */
pid_t th_pusher(const char *arg, ...);
/*
 * Start tests/rdma/creator.c (ADDR PORT TOKEN TENSOR LENGTH VALUE): a raw
 * peer that declares TENSOR with initial values to come, stages VALUE into
 * its first chunk and never seals; returns once it has, with its pid.
 */
pid_t th_creator(const char *arg, ...);
/* A fresh directory /tmp/rdmaps-WHAT-XXXXXX into dir (asserts it was made);
 * th_rmdir removes it and empties dir (nothing to do when dir is ""). */
void th_mkdtemp(char *dir, size_t len, const char *what);
void th_rmdir(char *dir);
/*
 * An etcd of its own (Debian's etcd-server: /usr/bin/etcd) on 127.0.0.1,
 * ports per test process, data in a fresh directory; th_etcd_start waits
 * until it takes connections. url: what --etcd wants.
 */
struct th_etcd {
	pid_t pid;
	char url[64];
	char dir[128];
};
void th_etcd_start(struct th_etcd *e);
void th_etcd_stop(struct th_etcd *e);

/*
 * A TCP relay to etcd in a process of its own: a server given its url
 * reaches etcd only through it, so SIGSTOP on pid cuts that server off
 * from etcd alone (everything in the VM talks over loopback, which no
 * rxe-link cuts), and SIGCONT heals it. One connection at a time: the
 * servers' etcd calls are one request per connection.
 */
struct th_proxy {
	pid_t pid;
	char url[64];
};
void th_proxy_start(struct th_proxy *p, const char *etcd_url);
void th_proxy_stop(struct th_proxy *p);

/* Pull t through c and rt through rc (len floats each) and assert they
 * are equal bit for bit; when says at which step, in the message. */
void th_assert_same(rdmaps_client *c, rdmaps_tensor *t, rdmaps_client *rc, rdmaps_tensor *rt,
		    size_t len, const char *when);

/* Declare a float tensor initialised to value (asserts success). */
rdmaps_tensor *th_declare(rdmaps_client *c, const char *name, uint64_t len, float value, float lr);

#endif
