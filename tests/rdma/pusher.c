/*
 * pusher.c -- a worker process for fault tests: connects, prints "ready",
 * then pushes a gradient of -1 to the named tensor until it is killed.
 * A process of its own (not a fork of the test) so it starts with a clean
 * verbs state, as a real worker would.
 * usage: rdmaps-test-pusher ADDR PORT TOKEN TENSOR [LENGTH [COUNT]]
 *        rdmaps-test-pusher --cluster SERVERS SRC TOKEN TENSOR [COUNT]
 *   with LENGTH: declare the tensor (SGD, lr 1) instead of looking it up;
 *   with COUNT: push that many times, flush, and exit 0;
 *   --cluster: every server of "host:port,host:port...", from address SRC.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rdmaps.h"

int main(int argc, char **argv)
{
	struct rdmaps_connect_opts o = { 0 };
	rdmaps_client *c = NULL;
	rdmaps_tensor *t;
	float *g;
	int rc;

	long count = argc > 6 ? atol(argv[6]) : -1;
	bool cluster = argc > 1 && !strcmp(argv[1], "--cluster");

	if (argc < 5 || argc > 7 || (cluster && argc < 6)) {
		fprintf(stderr, "usage: %s ADDR PORT TOKEN TENSOR [LENGTH [COUNT]]\n"
				"       %s --cluster SERVERS SRC TOKEN TENSOR [COUNT]\n",
			argv[0], argv[0]);
		return 2;
	}
	struct rdmaps_tensor_desc d = { .name = argv[4], .length = 0, .lr = 1.0f };
	if (cluster) {
		struct rdmaps_cluster_opts co = { .servers = argv[2], .src_addr = argv[3],
						  .token = argv[4], .timeout_ms = 20000 };
		d.name = argv[5];
		rc = rdmaps_connect_cluster(&co, &c);
		if (!rc)
			rc = rdmaps_lookup(c, d.name, &t);
	} else {
		o.host = o.src_addr = argv[1];
		o.port = argv[2];
		o.token = argv[3];
		o.timeout_ms = 20000;
		d.length = argc > 5 ? strtoull(argv[5], NULL, 10) : 0;
		rc = rdmaps_connect(&o, &c);
		if (!rc)
			rc = d.length ? rdmaps_declare(c, &d, &t) : rdmaps_lookup(c, d.name, &t);
	}
	if (rc) {
		fprintf(stderr, "pusher: %s\n", rdmaps_strerror(rc));
		rdmaps_close(c);
		return 1;
	}
	g = malloc(rdmaps_tensor_length(t) * sizeof(float));
	for (uint64_t i = 0; i < rdmaps_tensor_length(t); i++)
		g[i] = -1.0f;
	printf("ready\n");
	fflush(stdout);
	while (count-- != 0 && !(rc = rdmaps_push(c, t, g, 0)))
		;
	if (!rc)
		rc = rdmaps_flush(c, 20000);
	if (rc)
		fprintf(stderr, "pusher: %s\n", rdmaps_strerror(rc));
	rdmaps_close(c);
	free(g);
	return rc ? 1 : 0;
}
