/*
 * server/clock.c's BSP checks, natively: a member's push of clock c + 1 to a
 * chunk whose clock c still waits for others is refused, since the chunk's
 * aggregate holds one clock only (the library refuses it first; a raw
 * client reaches this check).
 */
#include <criterion/criterion.h>
#include <string.h>

#include "server.h"

Test(clock, bsp_push_ahead_of_its_clock_is_refused)
{
	struct srv_config cfg = { .max_tensors = 2, .chunk_elems = 64,
				  .max_tensor_bytes = 1 << 20, .max_total_bytes = 1 << 20 };
	struct rdmaps_msg_declare m = { .length = 64, .hyper = { .lr = 1.0f } };
	struct srv_store st;
	struct srv_tensor *t;
	struct srv_conn a = { .peer = "a" }, b = { .peer = "b" };
	uint8_t ma[2] = { 0 }, mb[2] = { 0 };
	float g[64];
	uint64_t clock;
	uint32_t next = 0;
	bool created, ready;

	a.member_of = ma;
	b.member_of = mb;
	for (int i = 0; i < 64; i++)
		g[i] = -1.0f;
	cr_assert_eq(srv_store_init(&st, &cfg), 0);
	strcpy(m.name, "bsp");
	strcpy(m.optimizer, "sgd");
	m.cons.mode = RDMAPS_BSP;
	m.cons.workers = 2;
	cr_assert_eq(srv_store_declare(&st, &m, NULL, &t, &created), 0);
	cr_assert_eq(srv_clock_join(t, &a, &clock, &ready), 0);
	cr_assert_eq(srv_clock_join(t, &b, &clock, &ready), 0);

	struct rdmaps_slot_hdr h = { .count = 64,
				     .flags = RDMAPS_SLOT_LAST | RDMAPS_SLOT_END };
	/* a gives clock 0 */
	cr_assert_eq(srv_clock_check(t, &a, &h, &next), 0);
	srv_clock_fold(t, &a, &h, g);
	/* a again, clock 1, while clock 0 waits for b: refused */
	h.clock = 1;
	next = 0;
	cr_assert_eq(srv_clock_check(t, &a, &h, &next), RDMAPS_EPROTO,
		     "a second clock must not join the first one's aggregate");
	/* b gives clock 0: it completes (two -1 gradients, lr 1: +2) */
	h.clock = 0;
	next = 0;
	cr_assert_eq(srv_clock_check(t, &b, &h, &next), 0);
	srv_clock_fold(t, &b, &h, g);
	const float *d = (const float *)(srv_chunk(t, 0) + RDMAPS_CHUNK_HDR);
	cr_assert_eq(d[0], 2.0f, "clock 0 folded once: %f", d[0]);
	/* now a's clock 1 is in order */
	h.clock = 1;
	next = 0;
	cr_assert_eq(srv_clock_check(t, &a, &h, &next), 0);
	srv_store_fini(&st);
}
