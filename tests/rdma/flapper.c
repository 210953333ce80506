/*
 * flapper.c -- a long-lived worker for the link-fault check: for SECONDS it
 * pushes a gradient of -1 (SGD, lr 1: each fold adds 1 to every element)
 * with RDMAPS_PUSH_FOLDED and pulls the tensor back, going on through
 * errors the way a training loop would. A process of its own so that it
 * keeps one verbs state across the fault, as a real worker does.
 *
 * usage: rdmaps-test-flapper SERVER PORT TOKEN SRC TENSOR LENGTH SECONDS [registered]
 *   registered: push and pull through rdmaps_register'ed buffers (zero-copy;
 *   a removed device takes the registrations with it, so they must come back)
 *
 * Prints a line per second ("t=.. ok=.. failed=..") and one per error, then
 * a last line "result ok=N failed=F pushed=P unsure=U reconnects=R
 * restarts=S resent=E lost=L torn=0 value=V". Exit status 0 only when:
 *  - pushes succeeded again after the last error (it recovered by itself),
 *  - every pull was whole: all elements equal (never a torn tensor),
 *  - the final value V is what the pushes explain, exactly once: each of
 *    the P pushes that returned 0 folded once, each that failed with
 *    RDMAPS_EDISCONNECTED never, and each that failed because no reconnect
 *    was possible (U of them: ECONNECT, ETIMEDOUT, ENODEV; outcome
 *    unknown when it failed) at most once: P <= V <= P + U (ok counts
 *    rounds whose push and pull both worked),
 *  - as many reconnects found a restarted server as RDMAPS_FLAPPER_RESTARTS
 *    says (default 0: a cut link must not look like a restart). A server
 *    that stopped by itself wrote a checkpoint of everything it folded, so
 *    the bounds on V hold across such a restart too.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "rdmaps.h"

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	struct rdmaps_connect_opts o = { 0 };
	struct rdmaps_client_stats st;
	rdmaps_client *c;
	rdmaps_tensor *t;
	unsigned long ok = 0, failed = 0, pushed = 0, unsure = 0, ok_since_error = 0, torn = 0;
	float *g, *w;
	uint64_t n;
	int rc;

	if (argc != 8 && !(argc == 9 && !strcmp(argv[8], "registered"))) {
		fprintf(stderr, "usage: %s SERVER PORT TOKEN SRC TENSOR LENGTH SECONDS [registered]\n",
			argv[0]);
		return 2;
	}
	o.host = argv[1];
	o.port = argv[2];
	o.token = argv[3];
	o.src_addr = argv[4];
	o.timeout_ms = 10000; /* reconnect wait, and the stall watchdog */
	struct rdmaps_tensor_desc d = { .name = argv[5], .length = strtoull(argv[6], NULL, 10),
					.lr = 1.0f };
	double secs = atof(argv[7]);
	if ((rc = rdmaps_connect(&o, &c)) || (rc = rdmaps_declare(c, &d, &t))) {
		fprintf(stderr, "flapper: %s\n", rdmaps_strerror(rc));
		rdmaps_close(c);
		return 1;
	}
	n = rdmaps_tensor_length(t);
	g = malloc(n * sizeof(float));
	w = malloc(n * sizeof(float));
	if (!g || !w)
		return 1;
	rdmaps_mr *gm = NULL, *wm = NULL;
	if (argc == 9 && ((rc = rdmaps_register(c, g, n * sizeof(float), &gm)) ||
			  (rc = rdmaps_register(c, w, n * sizeof(float), &wm)))) {
		fprintf(stderr, "flapper: register: %s\n", rdmaps_strerror(rc));
		return 1;
	}
	for (uint64_t i = 0; i < n; i++)
		g[i] = -1.0f;
	printf("ready\n");
	fflush(stdout);

	double start = now_s(), last_print = start;
	while (now_s() - start < secs) {
		const char *what = "push";
		rc = rdmaps_push(c, t, g, RDMAPS_PUSH_FOLDED);
		if (rc) {
			/* EDISCONNECTED: not folded; the others: no reconnect was
			 * possible, so nobody could say yet */
			unsure += rc != RDMAPS_EDISCONNECTED;
		} else {
			pushed++;
			what = "pull";
			rc = rdmaps_pull(c, t, w, 0);
		}
		if (!rc) {
			ok++;
			ok_since_error++;
			for (uint64_t i = 1; i < n; i++)
				if (w[i] != w[0]) {
					torn++;
					printf("torn pull: w[0]=%g w[%llu]=%g\n", w[0], (unsigned long long)i, w[i]);
					break;
				}
		} else {
			failed++;
			ok_since_error = 0;
			printf("t=%.1f %s error: %s\n", now_s() - start, what, rdmaps_strerror(rc));
			fflush(stdout);
			/* ENODEV: the local device is being removed, or not back yet */
			if (rc != RDMAPS_EDISCONNECTED && rc != RDMAPS_ECONNECT && rc != RDMAPS_ETIMEDOUT &&
			    rc != RDMAPS_ENODEV)
				break; /* anything else is a bug, not the fault under test */
		}
		if (now_s() - last_print >= 1.0) {
			last_print = now_s();
			printf("t=%.1f ok=%lu failed=%lu\n", last_print - start, ok, failed);
			fflush(stdout);
		}
	}
	/* the final value, from a pull that must work now that the link is back */
	rdmaps_flush(c, 20000); /* reports lost pushes once; counted as failed already */
	rc = rdmaps_pull(c, t, w, 0);
	rdmaps_client_stats(c, &st);
	printf("result ok=%lu failed=%lu pushed=%lu unsure=%lu reconnects=%llu restarts=%llu "
	       "resent=%llu lost=%llu torn=%lu value=%g%s%s\n",
	       ok, failed, pushed, unsure, (unsigned long long)st.reconnects,
	       (unsigned long long)st.server_restarts, (unsigned long long)st.resent_slots,
	       (unsigned long long)st.lost_pushes, torn, rc ? -1.0 : w[0], rc ? " final pull: " : "",
	       rc ? rdmaps_strerror(rc) : "");
	const char *want = getenv("RDMAPS_FLAPPER_RESTARTS");
	int bad = rc || torn || !ok_since_error || w[0] < (float)pushed ||
		  w[0] > (float)(pushed + unsure) ||
		  st.server_restarts != (want ? strtoull(want, NULL, 10) : 0);
	rdmaps_deregister(gm);
	rdmaps_deregister(wm);
	rdmaps_close(c);
	free(g);
	free(w);
	return bad ? 1 : 0;
}
