/*
 * creator.c -- a creator that never seals, for declaration tests: declares
 * a tensor with initial values to come (as the library does), stages one
 * chunk of them, prints "ready", and waits to be killed. A process of its
 * own (not a fork of the test) so it starts with a clean verbs state.
 * usage: rdmaps-test-creator ADDR PORT TOKEN TENSOR LENGTH VALUE
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "rawclient.h"

int main(int argc, char **argv)
{
	struct rdmaps_msg_tensor_reply rep;
	struct raw r;
	int rc;

	if (argc != 7) {
		fprintf(stderr, "usage: %s ADDR PORT TOKEN TENSOR LENGTH VALUE\n", argv[0]);
		return 2;
	}
	struct rdmaps_wire_hello h = raw_hello(argv[3]);
	struct rdmaps_msg_declare m = raw_declare_msg(argv[4], strtoull(argv[5], NULL, 10));
	m.flags = RDMAPS_DECLARE_INIT_DATA;
	rc = raw_connect(&r, argv[1], argv[2], &h, sizeof(h));
	if (!rc)
		rc = raw_request(&r, &m, sizeof(m), &rep);
	if (!rc && !rep.created)
		rc = RDMAPS_EEXIST;
	if (!rc) {
		uint32_t n = m.length < rep.chunk_elems ? (uint32_t)m.length : rep.chunk_elems;
		rc = raw_slot(&r, rep.tensor_id, 1, 0, n, strtof(argv[6], NULL), RDMAPS_SLOT_ASSIGN);
	}
	if (rc) {
		fprintf(stderr, "%s: %s\n", argv[0], rdmaps_strerror(rc));
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	pause();
	return 0;
}
