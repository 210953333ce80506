#include "harness.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

const char *th_addr(void)
{
	const char *a = getenv("RDMAPS_TEST_ADDR");

	if (!a || !*a)
		a = getenv("RDMAPS_RXE_ADDR");
	if (!a || !*a)
		cr_assert_fail("no RDMA address: set RDMAPS_TEST_ADDR to the IP of an RDMA device, "
			       "or run the suite with tools/test-all (which uses tools/rxe-vm)");
	return a;
}

static void server_startv(struct th_server *s, const char *addr, va_list ap, bool keep_port)
{
	static unsigned seq;
	const char *argv[32];
	int argc = 0, pfd[2];
	char line[512] = "";
	size_t have = 0;

	s->addr = addr;
	/* a port per test process and per server in it */
	if (!keep_port)
		snprintf(s->port, sizeof(s->port), "%u",
			 20000u + ((unsigned)getpid() * 7u + seq++) % 30000u);
	/* another build's server (showing that a test fails on the code before
	 * a fix, say): RDMAPS_TEST_SERVER_BIN */
	argv[argc] = getenv("RDMAPS_TEST_SERVER_BIN");
	argv[argc++] = argv[0] && *argv[0] ? argv[0] : RDMAPS_SERVER_BIN;
	argv[argc++] = "--addr";
	argv[argc++] = s->addr;
	argv[argc++] = "--port";
	argv[argc++] = s->port;
	argv[argc++] = "--spin-us";
	argv[argc++] = "50"; /* two vCPUs in the VM: give them back quickly */
	for (const char *a; (a = va_arg(ap, const char *)) && argc < 30;)
		argv[argc++] = a;
	argv[argc] = NULL;

	cr_assert_eq(pipe(pfd), 0);
	s->pid = fork();
	cr_assert_geq(s->pid, 0);
	if (s->pid == 0) {
		dup2(pfd[1], STDOUT_FILENO);
		close(pfd[0]);
		close(pfd[1]);
		setenv("RDMAPS_TOKEN", TH_TOKEN, 1);
		execv(argv[0], (char *const *)argv);
		perror("exec rdmaps-server");
		_exit(127);
	}
	close(pfd[1]);
	/* ready once it prints where it serves */
	for (;;) {
		struct pollfd p = { .fd = pfd[0], .events = POLLIN };
		int rc = poll(&p, 1, 30000);
		cr_assert_gt(rc, 0, "rdmaps-server did not start within 30 s");
		ssize_t n = read(pfd[0], line + have, sizeof(line) - 1 - have);
		cr_assert_gt(n, 0, "rdmaps-server exited before serving: %s", line);
		have += (size_t)n;
		line[have] = '\0';
		if (strstr(line, "serving on"))
			break;
	}
	close(pfd[0]);
}

void th_server_start(struct th_server *s, ...)
{
	va_list ap;
	va_start(ap, s);
	server_startv(s, th_addr(), ap, false);
	va_end(ap);
}

void th_server_start_at(struct th_server *s, const char *addr, ...)
{
	va_list ap;
	va_start(ap, addr);
	server_startv(s, addr, ap, false);
	va_end(ap);
}

void th_server_restart(struct th_server *s, ...)
{
	va_list ap;
	va_start(ap, s);
	server_startv(s, s->addr, ap, true);
	va_end(ap);
}

void th_server_kill9(struct th_server *s)
{
	cr_assert(th_server_alive(s), "rdmaps-server died before the test killed it");
	kill(s->pid, SIGKILL);
	waitpid(s->pid, NULL, 0);
	s->pid = 0;
}

/* Is every thread of pid stopped (state T in /proc/pid/task/<tid>/stat)? */
static bool all_stopped(pid_t pid)
{
	char path[64], buf[512];
	struct dirent *e;
	bool all = true;
	DIR *d;

	snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
	if (!(d = opendir(path)))
		return false;
	while (all && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/proc/%d/task/%.20s/stat", (int)pid, e->d_name);
		FILE *f = fopen(path, "r");
		size_t n = f ? fread(buf, 1, sizeof(buf) - 1, f) : 0;
		if (f)
			fclose(f);
		buf[n] = '\0';
		const char *st = strrchr(buf, ')'); /* the name may hold anything */
		all = st && (st[2] == 'T' || st[2] == 't');
	}
	closedir(d);
	return all;
}

void th_server_freeze(struct th_server *s)
{
	cr_assert_eq(kill(s->pid, SIGSTOP), 0);
	for (int i = 0; i < 2000 && !all_stopped(s->pid); i++)
		usleep(1000);
	cr_assert(all_stopped(s->pid), "rdmaps-server did not stop within 2 s of SIGSTOP");
}

unsigned th_hosts(const char **out, unsigned n)
{
	static char buf[1024];
	const char *env = getenv("RDMAPS_HOSTS");
	unsigned have = 0;
	char *save = NULL;

	if (env && *env) {
		snprintf(buf, sizeof(buf), "%s", env);
		for (char *t = strtok_r(buf, " ", &save); t && have < n; t = strtok_r(NULL, " ", &save))
			out[have++] = t;
	}
	if (have < n) {
		if (have)
			cr_assert_fail("RDMAPS_HOSTS has %u hosts, the test needs %u", have, n);
		printf("note: RDMAPS_HOSTS unset: all %u hosts share %s (servers differ by port)\n", n,
		       th_addr());
		for (; have < n; have++)
			out[have] = th_addr();
	}
	return have;
}

int th_server_alive(const struct th_server *s)
{
	return s->pid > 0 && waitpid(s->pid, NULL, WNOHANG) == 0;
}

void th_server_stop(struct th_server *s)
{
	int status = 0;

	if (s->pid <= 0)
		return;
	cr_assert(th_server_alive(s), "rdmaps-server died during the test");
	kill(s->pid, SIGTERM);
	for (int i = 0; i < 200; i++) {
		struct timespec ts = { 0, 50000000 };
		if (waitpid(s->pid, &status, WNOHANG) == s->pid) {
			s->pid = 0;
			cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
				  "rdmaps-server exit status %d", status);
			return;
		}
		nanosleep(&ts, NULL);
	}
	kill(s->pid, SIGKILL);
	waitpid(s->pid, NULL, 0);
	s->pid = 0;
	cr_assert_fail("rdmaps-server ignored SIGTERM for 10 s");
}

int th_connect_token(const struct th_server *s, const char *token, rdmaps_client **out)
{
	struct rdmaps_connect_opts o = {
		.host = s->addr, .port = s->port, .src_addr = s->addr, .token = token,
		.timeout_ms = 20000,
	};
	return rdmaps_connect(&o, out);
}

unsigned long long th_server_pinned_kib(const struct th_server *s)
{
	char path[64], line[256];
	unsigned long long kib = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)s->pid);
	f = fopen(path, "r");
	cr_assert_not_null(f, "%s", path);
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmPin: %llu kB", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

rdmaps_client *th_connect(const struct th_server *s)
{
	rdmaps_client *c = NULL;
	int rc = th_connect_token(s, TH_TOKEN, &c);

	cr_assert_eq(rc, 0, "connect: %s", rdmaps_strerror(rc));
	return c;
}

int th_connect_cluster(const char *servers, const char *src, rdmaps_client **out)
{
	struct rdmaps_cluster_opts o = { .servers = servers, .src_addr = src, .token = TH_TOKEN,
					 .timeout_ms = 20000 };

	return rdmaps_connect_cluster(&o, out);
}

static pid_t spawnv(const char *bin, const char *arg, va_list ap)
{
	const char *argv[16] = { bin };
	unsigned n = 1;
	int p[2];
	char b;

	for (const char *a = arg; a && n < 15; a = va_arg(ap, const char *))
		argv[n++] = a;
	cr_assert_eq(pipe(p), 0);
	pid_t pid = fork();
	if (pid == 0) {
		dup2(p[1], STDOUT_FILENO);
		close(p[0]);
		close(p[1]);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	close(p[1]);
	cr_assert_eq(read(p[0], &b, 1), 1, "%s could not connect", bin);
	close(p[0]);
	return pid;
}

pid_t th_pusher(const char *arg, ...)
{
	va_list ap;
	pid_t pid;

	va_start(ap, arg);
	pid = spawnv(RDMAPS_PUSHER_BIN, arg, ap);
	va_end(ap);
	return pid;
}

pid_t th_creator(const char *arg, ...)
{
	va_list ap;
	pid_t pid;

	va_start(ap, arg);
	pid = spawnv(RDMAPS_CREATOR_BIN, arg, ap);
	va_end(ap);
	return pid;
}

rdmaps_tensor *th_declare(rdmaps_client *c, const char *name, uint64_t len, float value, float lr)
{
	struct rdmaps_tensor_desc d = { .name = name, .length = len, .init_value = value,
					.optimizer = RDMAPS_OPT_SGD, .lr = lr };
	rdmaps_tensor *t = NULL;
	int rc = rdmaps_declare(c, &d, &t);

	cr_assert_eq(rc, 0, "declare %s: %s", name, rdmaps_strerror(rc));
	return t;
}

void th_mkdtemp(char *dir, size_t len, const char *what)
{
	snprintf(dir, len, "/tmp/rdmaps-%s-XXXXXX", what);
	cr_assert_not_null(mkdtemp(dir), "mkdtemp %s", dir);
}

void th_rmdir(char *dir)
{
	char cmd[256];

	if (!dir[0])
		return;
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", dir);
	dir[0] = '\0';
}

/* etcd on 127.0.0.1:port (peers on port + 1); true once it listens,
 * false if it exited first (its port taken, say: see its log). */
static bool etcd_try(struct th_etcd *e, unsigned port)
{
	char client[64], peer[64], cluster[96], data[160], log[160];

	snprintf(e->url, sizeof(e->url), "http://127.0.0.1:%u", port);
	snprintf(client, sizeof(client), "http://127.0.0.1:%u", port);
	snprintf(peer, sizeof(peer), "http://127.0.0.1:%u", port + 1);
	snprintf(cluster, sizeof(cluster), "t=%s", peer);
	snprintf(data, sizeof(data), "%s/data-%u", e->dir, port);
	snprintf(log, sizeof(log), "%s/etcd-%u.log", e->dir, port);
	e->pid = fork();
	cr_assert_geq(e->pid, 0);
	if (e->pid == 0) {
		FILE *f = freopen(log, "w", stderr);
		(void)f;
		dup2(STDERR_FILENO, STDOUT_FILENO);
		/* short election timeouts: etcd then grants leases of 1 s */
		execl("/usr/bin/etcd", "etcd", "--name", "t", "--data-dir", data,
		      "--listen-client-urls", client, "--advertise-client-urls", client,
		      "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		      "--initial-cluster", cluster, "--heartbeat-interval", "100",
		      "--election-timeout", "500", (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 600; i++) {
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
		int ok = connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
		close(fd);
		if (ok)
			return true;
		if (waitpid(e->pid, NULL, WNOHANG) == e->pid) {
			e->pid = 0;
			return false;
		}
		usleep(50000);
	}
	cr_assert_fail("etcd did not listen within 30 s: see %s", log);
	return false;
}

void th_etcd_start(struct th_etcd *e)
{
	/* above the ports the tests' servers take (20000-50000) */
	unsigned port = 52000u + ((unsigned)getpid() * 2u) % 8000u;

	cr_assert(access("/usr/bin/etcd", X_OK) == 0,
		  "no /usr/bin/etcd: tools/install-deps etcd installs Debian's etcd-server");
	th_mkdtemp(e->dir, sizeof(e->dir), "etcd");
	for (int k = 0; k < 5; k++, port = 52000u + (port - 52000u + 202u) % 8000u)
		if (etcd_try(e, port))
			return;
	cr_assert_fail("etcd exited at start five times: see %s/etcd-*.log", e->dir);
}

void th_etcd_stop(struct th_etcd *e)
{
	if (e->pid > 0) {
		kill(e->pid, SIGCONT); /* a test may have left it stopped */
		kill(e->pid, SIGTERM);
		waitpid(e->pid, NULL, 0);
		e->pid = 0;
	}
	th_rmdir(e->dir);
}

/* Copy what one side sends to the other until either closes. */
static void relay(int a, int b)
{
	struct pollfd pfd[2] = { { .fd = a, .events = POLLIN }, { .fd = b, .events = POLLIN } };
	char buf[16384];

	while (poll(pfd, 2, -1) > 0) {
		for (int i = 0; i < 2; i++) {
			if (!(pfd[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			ssize_t n = read(pfd[i].fd, buf, sizeof(buf));
			if (n <= 0 || write(pfd[1 - i].fd, buf, (size_t)n) != n)
				return;
		}
	}
}

void th_proxy_start(struct th_proxy *p, const char *etcd_url)
{
	struct sockaddr_in l = { .sin_family = AF_INET }, t = { .sin_family = AF_INET };
	socklen_t len = sizeof(l);
	unsigned port = 0;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	cr_assert(sscanf(etcd_url, "http://127.0.0.1:%u", &port) == 1, "etcd at %s", etcd_url);
	t.sin_port = htons((uint16_t)port);
	inet_pton(AF_INET, "127.0.0.1", &t.sin_addr);
	inet_pton(AF_INET, "127.0.0.1", &l.sin_addr);
	cr_assert(fd >= 0 && bind(fd, (struct sockaddr *)&l, sizeof(l)) == 0 && listen(fd, 16) == 0 &&
		  getsockname(fd, (struct sockaddr *)&l, &len) == 0);
	snprintf(p->url, sizeof(p->url), "http://127.0.0.1:%u", ntohs(l.sin_port));
	p->pid = fork();
	cr_assert_geq(p->pid, 0);
	if (p->pid == 0) {
		for (;;) {
			int c = accept(fd, NULL, NULL), e;
			if (c < 0)
				continue;
			e = socket(AF_INET, SOCK_STREAM, 0);
			if (e >= 0 && connect(e, (struct sockaddr *)&t, sizeof(t)) == 0)
				relay(c, e);
			close(c);
			if (e >= 0)
				close(e);
		}
	}
	close(fd);
}

void th_proxy_stop(struct th_proxy *p)
{
	if (p->pid > 0) {
		kill(p->pid, SIGCONT);
		kill(p->pid, SIGKILL);
		waitpid(p->pid, NULL, 0);
		p->pid = 0;
	}
}

void th_assert_same(rdmaps_client *c, rdmaps_tensor *t, rdmaps_client *rc, rdmaps_tensor *rt,
		    size_t len, const char *when)
{
	float *v = calloc(len, sizeof(float)), *r = calloc(len, sizeof(float));

	cr_assert(v && r);
	cr_assert_eq(rdmaps_pull(c, t, v, 0), 0);
	cr_assert_eq(rdmaps_pull(rc, rt, r, 0), 0);
	for (size_t i = 0; i < len; i++)
		cr_assert_eq(v[i], r[i], "%s: [%zu] = %.9g, the reference %.9g", when, i, (double)v[i],
			     (double)r[i]);
	free(v);
	free(r);
}
