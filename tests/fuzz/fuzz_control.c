/*
 * libFuzzer target: everything a peer can send the server before any
 * verbs are involved -- the connect hello, control messages, and what the
 * store does with a declaration, lookup or seal built from them, and the
 * closed-connection accounts a RESUME reads. Built with
 * clang, ASan and UBSan (meson -Dfuzz=true); tools/test-all runs it for a
 * bounded time from the corpus in tests/fuzz/corpus.
 */
#include <stdbool.h>
#include <string.h>

#include "protocol.h"
#include "server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct srv_store st;
	static bool ready;
	struct srv_config cfg = { .max_tensors = 16, .chunk_elems = 64,
				  .max_tensor_bytes = 1u << 20, .max_total_bytes = 4u << 20 };
	struct srv_tensor *t;
	uint16_t type;
	bool created;

	if (!ready) {
		srv_store_init(&st, &cfg);
		ready = true;
	}
	if (atomic_load(&st.count) == st.max)
		srv_store_reset(&st); /* keep room to explore declarations */
	(void)rdmaps__hello_check(data, size);
	if (rdmaps__msg_check(data, size, &type))
		return 0;
	switch (type) {
	case RDMAPS_MSG_DECLARE: {
		struct rdmaps_msg_declare m;
		memcpy(&m, data, sizeof(m));
		if (!srv_store_declare(&st, &m, NULL, &t, &created) &&
		    atomic_load(&t->state_flag) == TENSOR_READY) {
			/* a declared, open tensor is usable: fold into its first chunk
			 * (one still waiting for its creator's values refuses folds in
			 * the server, before they get this far) */
			static float g[64];
			srv_chunk_apply(t, 0, g, rdmaps__chunk_count(t->length, t->chunk_elems, 0), false);
		}
		break;
	}
	case RDMAPS_MSG_LOOKUP: {
		struct rdmaps_msg_lookup m;
		memcpy(&m, data, sizeof(m));
		if (!rdmaps__name_check(m.name, sizeof(m.name)))
			(void)srv_store_lookup(&st, m.name, &t);
		break;
	}
	case RDMAPS_MSG_SEAL: {
		struct rdmaps_msg_seal m;
		memcpy(&m, data, sizeof(m));
		(void)srv_store_get(&st, m.tensor_id);
		break;
	}
	case RDMAPS_MSG_SNAPSHOT: {
		/* what the server checks before it copies a chunk, then the copy */
		static uint8_t buf[RDMAPS_CHUNK_HDR + 64 * sizeof(float)];
		struct rdmaps_msg_snapshot m;
		memcpy(&m, data, sizeof(m));
		t = srv_store_get(&st, m.tensor_id);
		if (t && m.chunk < t->nchunks && m.half <= 1 && (!m.half || t->pull_fmt) &&
		    atomic_load(&t->state_flag) == TENSOR_READY)
			(void)srv_chunk_snapshot(t, m.chunk, m.half, buf, NULL);
		break;
	}
	case RDMAPS_MSG_RESUME: {
		/* the account a peer asks about; every other one asked leaves a
		 * record, so lookups meet full and empty rings alike */
		struct rdmaps_msg_resume m;
		struct srv_closed rec;
		memcpy(&m, data, sizeof(m));
		if (!srv_resume_find(&st.resume, m.conn_id, &rec) && (m.conn_id & 1u))
			srv_resume_record(&st.resume, &(struct srv_closed){ .conn_id = m.conn_id,
									    .folded_seq = m.conn_id >> 1 });
		break;
	}
	default:
		break;
	}
	return 0;
}
