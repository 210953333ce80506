/*
 * spawn.c -- run rdmaps-server as a child when no --server is given: from
 * --server-bin, else the build tree next to this binary, else PATH. Ready
 * when it prints "serving on"; stopped with SIGTERM.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

/* build/tools/bench/rdmaps-bench -> build/server/rdmaps-server */
static const char *find_server(const struct bench_opts *o, char *buf, size_t len)
{
	char self[PATH_MAX];
	ssize_t n;

	if (o->server_bin)
		return o->server_bin;
	n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n > 0) {
		self[n] = '\0';
		char *slash = strrchr(self, '/');
		if (slash) {
			*slash = '\0';
			snprintf(buf, len, "%s/../../server/rdmaps-server", self);
			if (access(buf, X_OK) == 0)
				return buf;
			snprintf(buf, len, "%s/rdmaps-server", self); /* installed side by side */
			if (access(buf, X_OK) == 0)
				return buf;
		}
	}
	return "rdmaps-server"; /* execvp searches PATH */
}

int server_spawn(const struct bench_opts *o, const char *argv0, struct bench_server *s)
{
	const char *argv[8 + BENCH_MAX_SERVER_ARGS];
	char bin[PATH_MAX + 32], line[1024] = "";
	size_t have = 0;
	int argc = 0, pfd[2];
	uint64_t deadline;

	(void)argv0;
	memset(s, 0, sizeof(*s));
	snprintf(s->port, sizeof(s->port), "%s",
		 o->port ? o->port : "");
	if (!s->port[0])
		snprintf(s->port, sizeof(s->port), "%u", 20000u + (unsigned)getpid() % 30000u);
	if (o->token)
		snprintf(s->token, sizeof(s->token), "%s", o->token);
	else
		snprintf(s->token, sizeof(s->token), "bench-%08lx", (unsigned long)rdmaps__now_ns());
	argv[argc++] = find_server(o, bin, sizeof(bin));
	argv[argc++] = "--addr";
	argv[argc++] = o->addr;
	argv[argc++] = "--port";
	argv[argc++] = s->port;
	for (unsigned i = 0; i < o->nserver_args; i++)
		argv[argc++] = o->server_args[i];
	argv[argc] = NULL;

	if (pipe2(pfd, O_CLOEXEC)) {
		perror("pipe");
		return -1;
	}
	s->pid = fork();
	if (s->pid < 0) {
		perror("fork");
		return -1;
	}
	if (s->pid == 0) {
		dup2(pfd[1], STDOUT_FILENO);
		setenv("RDMAPS_TOKEN", s->token, 1);
		execvp(argv[0], (char *const *)argv);
		fprintf(stderr, "rdmaps-bench: cannot run %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	close(pfd[1]);
	deadline = rdmaps__now_ns() + 60ull * 1000000000ull; /* TCG boots slowly */
	while (!strstr(line, "serving on")) {
		struct pollfd p = { .fd = pfd[0], .events = POLLIN };
		ssize_t n;

		if (rdmaps__now_ns() > deadline || poll(&p, 1, 1000) < 0) {
			fprintf(stderr, "rdmaps-bench: %s did not start in time\n", argv[0]);
			break;
		}
		if (!(p.revents & (POLLIN | POLLHUP)))
			continue;
		n = read(pfd[0], line + have, sizeof(line) - 1 - have);
		if (n <= 0) {
			fprintf(stderr, "rdmaps-bench: %s exited before serving\n", argv[0]);
			break;
		}
		have += (size_t)n;
		line[have] = '\0';
		if (have == sizeof(line) - 1) { /* keep the tail: the line may be late */
			memmove(line, line + have / 2, have - have / 2 + 1);
			have -= have / 2;
		}
	}
	close(pfd[0]);
	if (!strstr(line, "serving on")) {
		server_stop(s);
		return -1;
	}
	fprintf(stderr, "rdmaps-bench: started %s on %s port %s (pid %d)\n", argv[0], o->addr, s->port,
		s->pid);
	return 0;
}

void server_stop(struct bench_server *s)
{
	int status;

	if (s->pid <= 0)
		return;
	kill(s->pid, SIGTERM);
	for (int i = 0; i < 200; i++) {
		struct timespec ts = { 0, 50000000 };
		if (waitpid(s->pid, &status, WNOHANG) == s->pid) {
			s->pid = 0;
			return;
		}
		nanosleep(&ts, NULL);
	}
	fprintf(stderr, "rdmaps-bench: rdmaps-server ignored SIGTERM; killing it\n");
	kill(s->pid, SIGKILL);
	waitpid(s->pid, &status, 0);
	s->pid = 0;
}
