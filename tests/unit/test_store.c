/*
 * The declaration life cycle natively: a tensor declared with initial values
 * waits for its creator to seal it; the creator may stage its values again;
 * one whose creator left before sealing goes to the next declaration, with
 * nothing of what the creator staged, and is never compared with the
 * connection that left.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "gradfmt.h"
#include "half.h"
#include "pages.h"
#include "optimizer.h"
#include "server.h"

static struct srv_config cfg = { .max_tensors = 8, .chunk_elems = 256,
				 .max_tensor_bytes = 1ull << 30, .max_total_bytes = 1ull << 30 };

static struct rdmaps_msg_declare decl(bool init_data, float value)
{
	struct rdmaps_msg_declare m = { 0 };

	m.length = 1000;
	m.init_value = value;
	m.flags = init_data ? RDMAPS_DECLARE_INIT_DATA : 0;
	m.hyper.lr = 0.1f;
	snprintf(m.optimizer, sizeof(m.optimizer), "sgd");
	snprintf(m.name, sizeof(m.name), "w");
	return m;
}

/* Every chunk stable (even version, checksum right) and holding value. */
static void assert_open_with(struct srv_tensor *t, float value)
{
	cr_assert_eq(atomic_load(&t->state_flag), TENSOR_READY);
	cr_assert_null(atomic_load(&t->creator));
	for (uint32_t c = 0; c < t->nchunks; c++) {
		const struct rdmaps_chunk_hdr *h = (const void *)srv_chunk(t, c);
		const float *d = (const float *)(h + 1);
		cr_assert_eq(h->version & 1u, 0, "chunk %u stable", c);
		cr_assert(rdmaps__chunk_consistent(h, d, h->count), "chunk %u checksum", c);
		for (uint32_t i = 0; i < h->count; i++)
			cr_assert_eq(d[i], value, "chunk %u [%u] = %g", c, i, (double)d[i]);
	}
}

/* What a creator's ASSIGN slots do: values into every chunk, still odd. */
static void stage(struct srv_tensor *t, float value)
{
	static float v[256];
	for (uint32_t c = 0; c < t->nchunks; c++) {
		uint32_t n = rdmaps__chunk_count(t->length, t->chunk_elems, c);
		for (uint32_t i = 0; i < n; i++)
			v[i] = value;
		srv_chunk_apply(t, c, v, n, true);
	}
}

Test(store, creator_left_before_sealing_hands_over)
{
	struct rdmaps_msg_declare m = decl(true, 0.0f);
	struct srv_store s;
	struct srv_tensor *t, *t2;
	bool created;
	int a, b, c; /* stand-ins for three connections */

	cr_assert_eq(srv_store_init(&s, &cfg), 0);
	cr_assert_eq(srv_store_declare(&s, &m, &a, &t, &created), 0);
	cr_assert(created);
	cr_assert_eq(atomic_load(&t->state_flag), TENSOR_INIT);

	/* its creator again (a retry after an error): stages again */
	cr_assert_eq(srv_store_declare(&s, &m, &a, &t2, &created), 0);
	cr_assert(created && t2 == t);
	/* anyone else waits */
	cr_assert_eq(srv_store_declare(&s, &m, &b, &t2, &created), 0);
	cr_assert(!created);
	cr_assert_eq(atomic_load(&t->creator), &a);

	/* a stages part of its values and dies: b's declaration takes over */
	stage(t, 7.0f);
	srv_store_orphan(&s, &a);
	cr_assert_null(atomic_load(&t->creator), "the dead connection is forgotten");
	cr_assert_eq(atomic_load(&t->state_flag), TENSOR_INIT, "never ready with partial values");
	cr_assert_eq(srv_store_declare(&s, &m, &b, &t2, &created), 0);
	cr_assert(created, "the next declarer initialises it");
	cr_assert_eq(atomic_load(&t->creator), &b);
	for (uint32_t ch = 0; ch < t->nchunks; ch++) {
		const struct rdmaps_chunk_hdr *h = (const void *)srv_chunk(t, ch);
		cr_assert_eq(((const float *)(h + 1))[0], 0.0f, "a's staged values are wiped");
		cr_assert_eq(h->version & 1u, 1u, "still being written");
	}
	stage(t, 2.0f);
	srv_store_seal(t);
	assert_open_with(t, 2.0f);
	/* sealed: a later declaration just attaches */
	cr_assert_eq(srv_store_declare(&s, &m, &c, &t2, &created), 0);
	cr_assert(!created);
	srv_store_fini(&s);
}

Test(store, orphan_opens_with_next_declaration_value)
{
	struct rdmaps_msg_declare m = decl(true, 0.0f), plain = decl(false, 3.0f);
	struct srv_store s;
	struct srv_tensor *t, *t2;
	bool created;
	int a, b;

	cr_assert_eq(srv_store_init(&s, &cfg), 0);
	cr_assert_eq(srv_store_declare(&s, &m, &a, &t, &created), 0);
	stage(t, 9.0f);
	srv_store_orphan(&s, &a);
	/* no initial values to stage: open at once, with its init_value */
	cr_assert_eq(srv_store_declare(&s, &plain, &b, &t2, &created), 0);
	cr_assert(!created && t2 == t);
	assert_open_with(t, 3.0f);
	/* leaving after the seal changes nothing */
	srv_store_orphan(&s, &b);
	assert_open_with(t, 3.0f);
	srv_store_fini(&s);
}

/* The 16-bit copy of chunk c: stable, checksummed, and the master's floats
 * rounded (bf16) -- what a 16-bit pull accepts. */
static void assert_half_matches(struct srv_tensor *t, bool stable)
{
	for (uint32_t c = 0; c < t->nchunks; c++) {
		const struct rdmaps_chunk_hdr *m = (const void *)srv_chunk(t, c);
		const struct rdmaps_chunk_hdr *h = (const void *)srv_half_chunk(t, c);
		const float *md = (const float *)(m + 1);
		const uint16_t *hd = (const uint16_t *)(h + 1);
		cr_assert_eq(h->version & 1u, stable ? 0u : 1u, "copy of chunk %u: version %lu", c,
			     (unsigned long)h->version);
		cr_assert_eq(h->count, m->count);
		cr_assert_eq(h->clock, m->clock);
		cr_assert_eq(rdmaps__checksum(hd, (size_t)h->count * 2), h->checksum, "chunk %u", c);
		for (uint32_t i = 0; i < h->count; i++)
			cr_assert_eq(hd[i], rdmaps__f32_to_bf16(md[i]), "chunk %u [%u]", c, i);
	}
}

Test(store, half_copy_follows_every_publish)
{
	struct rdmaps_msg_declare m = decl(true, 0.0f);
	struct srv_store st;
	struct srv_tensor *t, *again;
	bool created;
	static float g[256];

	cr_assert_eq(srv_store_init(&st, &cfg), 0);
	m.flags |= (uint32_t)RDMAPS__GRAD_BF16 << RDMAPS_DECLARE_PULL_SHIFT;
	cr_assert_eq(srv_store_declare(&st, &m, (void *)1, &t, &created), 0);
	cr_assert(created);
	cr_assert_eq(t->pull_fmt, RDMAPS__GRAD_BF16);
	/* inside the registration, after the master */
	cr_assert_geq(t->half_off, (size_t)t->nchunks * t->stride - t->stride);
	cr_assert_leq(t->half_off + (size_t)(t->nchunks - 1) * t->half_stride + RDMAPS_CHUNK_HDR +
			      2 * rdmaps__chunk_count(t->length, t->chunk_elems, t->nchunks - 1),
		      t->mem_len);
	/* initial values: written, odd until the seal like the master */
	stage(t, 1.0f / 3.0f);
	assert_half_matches(t, false);
	srv_store_seal(t);
	assert_half_matches(t, true);
	/* a fold publishes the copy with the master */
	for (uint32_t i = 0; i < 256; i++)
		g[i] = (float)i * 1e-3f;
	for (uint32_t c = 0; c < t->nchunks; c++)
		srv_chunk_apply(t, c, g, rdmaps__chunk_count(t->length, t->chunk_elems, c), false);
	assert_half_matches(t, true);
	/* the pull format is part of the declaration */
	m.flags = (uint32_t)RDMAPS__GRAD_F16 << RDMAPS_DECLARE_PULL_SHIFT;
	cr_assert_eq(srv_store_declare(&st, &m, (void *)2, &again, &created), RDMAPS_EEXIST);
	m.flags = (uint32_t)RDMAPS__GRAD_TOPK << RDMAPS_DECLARE_PULL_SHIFT;
	snprintf(m.name, sizeof(m.name), "topk");
	cr_assert_eq(srv_store_declare(&st, &m, (void *)2, &again, &created), RDMAPS_EINVAL);
	srv_store_fini(&st);
}

/* AnonHugePages (KiB) of the mapping of this process that holds p, and
 * whether the kernel may back it with huge pages at all (THPeligible). */
static unsigned long long huge_kib_at(const void *p, int *eligible)
{
	char line[256];
	unsigned long long kib = 0, lo, hi;
	bool in = false;
	FILE *f = fopen("/proc/self/smaps", "r");

	*eligible = -1;
	cr_assert_not_null(f);
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%llx-%llx ", &lo, &hi) == 2) {
			if (in)
				break; /* past the mapping */
			in = (uintptr_t)p >= lo && (uintptr_t)p < hi;
		} else if (in) {
			sscanf(line, "AnonHugePages: %llu kB", &kib);
			sscanf(line, "THPeligible: %d", eligible);
		}
	}
	fclose(f);
	return kib;
}

/*
 * A large tensor's memory, the one the NIC translates, may be in transparent
 * huge pages wherever the kernel allows them: with THP "madvise" (Debian's
 * default) only because the store asked for them. Whether a fault then gets
 * a huge page depends on the host's free memory (fragmentation): that is
 * printed, not asserted; the ask, THPeligible, is.
 */
Test(store, large_tensors_ask_for_huge_pages)
{
	struct srv_store s;
	struct srv_tensor *t;
	struct rdmaps_msg_declare m = decl(false, 1.0f);
	char mode[16];
	bool created;
	int eligible;

	rdmaps__thp_mode(mode, sizeof(mode));
	m.length = 8u << 20; /* 32 MiB */
	cr_assert_eq(srv_store_init(&s, &cfg), 0);
	cr_assert_eq(srv_store_declare(&s, &m, NULL, &t, &created), 0);
	unsigned long long kib = huge_kib_at(t->mem, &eligible);
	printf("store: 32 MiB tensor, transparent huge pages %s: eligible %d, %llu KiB of its "
	       "mapping in them\n",
	       mode[0] ? mode : "(none)", eligible, kib);
	if (mode[0] && strcmp(mode, "never")) {
		cr_assert_eq(eligible, 1, "a 32 MiB tensor's mapping not eligible for huge pages");
	} else {
		cr_assert_neq(eligible, 1);
		cr_assert_eq(kib, 0);
	}
	srv_store_fini(&s);
}

/*
 * What a primary writes to its backups for chunk i (replica.c): the chunk
 * as readers see it, header and values, with a stable version (the copy is
 * taken under the chunk's lock, and the lock's odd mark is not sent), its
 * optimizer state, its fold count; one copy and two, initialising and
 * ready. And the lock is let go: the chunk folds again afterwards.
 */
Test(store, replica_copy_is_the_chunk_its_state_and_fold_count)
{
	struct srv_config c2 = cfg;
	static uint8_t buf[8192];
	static float g[256];
	const size_t state_off = 2048, steps_off = 6144;

	for (int copies = 1; copies <= 2; copies++) {
		struct rdmaps_msg_declare m = decl(true, 0.5f);
		struct srv_store st;
		struct srv_tensor *t;
		bool created;
		c2.two_copies_min = copies == 2 ? 4 : 0;
		cr_assert_eq(srv_store_init(&st, &c2), 0);
		snprintf(m.optimizer, sizeof(m.optimizer), "adam");
		cr_assert_eq(srv_store_declare(&st, &m, (void *)1, &t, &created), 0);
		cr_assert_eq(t->index != NULL, copies == 2);
		/* initialising: odd chunks, copied as they are, never waited on */
		stage(t, 2.0f);
		srv_chunk_replica_copy(t, 0, buf, state_off, steps_off, NULL);
		cr_assert_eq(((const float *)(buf + RDMAPS_CHUNK_HDR))[5], 2.0f);
		srv_store_seal(t);
		for (uint32_t i = 0; i < 256; i++)
			g[i] = 0.25f * (float)(i % 5) - 0.5f;
		for (int f = 0; f < 3; f++)
			for (uint32_t k = 0; k < t->nchunks; k++)
				srv_chunk_apply(t, k, g, rdmaps__chunk_count(t->length, t->chunk_elems, k),
						false);
		for (uint32_t k = 0; k < t->nchunks; k++) {
			const struct rdmaps_chunk_hdr *h = (const void *)buf;
			const uint8_t *cur = srv_chunk(t, k);
			uint32_t n = rdmaps__chunk_count(t->length, t->chunk_elems, k);
			uint64_t steps;
			size_t len = srv_chunk_replica_copy(t, k, buf, state_off, steps_off, NULL);
			cr_assert_eq(len, RDMAPS_CHUNK_HDR + (size_t)n * sizeof(float));
			cr_assert_eq(h->version, srv_chunk_version(t, k), "chunk %u: the version readers see", k);
			cr_assert_eq(h->version & 1u, 0);
			cr_assert_eq(h->count, n);
			cr_assert(rdmaps__chunk_consistent(h, (const float *)(h + 1), n), "chunk %u whole", k);
			cr_assert_eq(memcmp(h + 1, cur + RDMAPS_CHUNK_HDR, (size_t)n * sizeof(float)), 0);
			/* Adam: two arrays of count floats, chunk k's region */
			cr_assert_eq(memcmp(buf + state_off,
					    t->state + (size_t)k * t->chunk_elems * 2, (size_t)n * 2 * 4), 0);
			memcpy(&steps, buf + steps_off, sizeof(steps));
			cr_assert_eq(steps, 3, "chunk %u: three folds", k);
		}
		/* let go: it folds again, and the next copy has it */
		srv_chunk_apply(t, 0, g, t->chunk_elems, false);
		srv_chunk_replica_copy(t, 0, buf, state_off, steps_off, NULL);
		cr_assert_eq(((const struct rdmaps_chunk_hdr *)buf)->version, srv_chunk_version(t, 0));
		srv_store_fini(&st);
	}
}

/* Every chunk of t holding exactly the bits of value, checksums right. */
static void assert_bits(struct srv_tensor *t, float value)
{
	uint32_t want, got;

	memcpy(&want, &value, sizeof(want));
	for (uint32_t c = 0; c < t->nchunks; c++) {
		const struct rdmaps_chunk_hdr *h = (const void *)srv_chunk(t, c);
		const float *d = (const float *)(h + 1);
		cr_assert_eq(h->count, rdmaps__chunk_count(t->length, t->chunk_elems, c));
		cr_assert_eq(h->version & 1u, 0, "chunk %u stable", c);
		cr_assert(rdmaps__chunk_consistent(h, d, h->count), "chunk %u checksum", c);
		for (uint32_t i = 0; i < h->count; i++) {
			memcpy(&got, &d[i], sizeof(got));
			cr_assert_eq(got, want, "chunk %u [%u]: %08x, not %08x", c, i, got, want);
		}
	}
}

/* Large tensors are mapped fresh (zero pages) and initialised without a
 * pass over their values when those are +0.0: whatever the value (-0.0
 * has bits), with a short last chunk and with two copies, every chunk
 * opens holding it, with its own checksum right. */
Test(store, large_tensors_open_holding_their_value)
{
	const float values[] = { 0.0f, -0.0f, 0.25f };
	struct srv_config c = cfg;

	c.two_copies_min = 4096;
	for (unsigned two = 0; two < 2; two++)
		for (unsigned k = 0; k < 3; k++) {
			struct rdmaps_msg_declare m = decl(false, values[k]);
			struct srv_store s;
			struct srv_tensor *t;
			bool created;

			m.length = 100000; /* 390 full chunks of 256 and one of 160 */
			cr_assert_eq(srv_store_init(&s, two ? &c : &cfg), 0);
			cr_assert_eq(srv_store_declare(&s, &m, NULL, &t, &created), 0);
			cr_assert_gt(t->map_len, 0, "mapped, not malloc'd");
			cr_assert_eq(t->copy_off != 0, two == 1);
			assert_bits(t, values[k]);
			srv_store_fini(&s);
		}
}
