/*
 * protocol.c -- checks for everything that arrives from the network. They
 * are pure functions so the unit tests and the fuzzer drive them directly.
 */
#include "protocol.h"

#include <string.h>

int rdmaps__hello_check(const void *buf, size_t len)
{
	struct rdmaps_wire_hello h;

	/* rdma_cm may pad private data; a shorter one is not ours */
	if (!buf || len < sizeof(h))
		return RDMAPS_EPROTO;
	memcpy(&h, buf, sizeof(h));
	if (h.magic != RDMAPS_PROTO_MAGIC)
		return RDMAPS_EPROTO;
	if (h.version != RDMAPS_PROTO_VERSION)
		return RDMAPS_EVERSION;
	if (h.token_len > RDMAPS_TOKEN_MAX)
		return RDMAPS_EPROTO;
	return 0;
}

static size_t msg_size(uint16_t type)
{
	switch (type) {
	case RDMAPS_MSG_DECLARE:
		return sizeof(struct rdmaps_msg_declare);
	case RDMAPS_MSG_LOOKUP:
		return sizeof(struct rdmaps_msg_lookup);
	case RDMAPS_MSG_STATS:
		return sizeof(struct rdmaps_msg_hdr);
	case RDMAPS_MSG_SEAL:
		return sizeof(struct rdmaps_msg_seal);
	case RDMAPS_MSG_CHECKPOINT:
		return sizeof(struct rdmaps_msg_hdr);
	case RDMAPS_MSG_CATALOG:
	case RDMAPS_MSG_CHUNKS:
	case RDMAPS_MSG_WORKERS:
		return sizeof(struct rdmaps_msg_page);
	case RDMAPS_MSG_RESUME:
		return sizeof(struct rdmaps_msg_resume);
	case RDMAPS_MSG_RESUME_REPLY:
		return sizeof(struct rdmaps_msg_resume_reply);
	case RDMAPS_MSG_SNAPSHOT:
		return sizeof(struct rdmaps_msg_snapshot);
	case RDMAPS_MSG_SNAPSHOT_REPLY:
		return sizeof(struct rdmaps_msg_snapshot_reply);
	case RDMAPS_MSG_REPLICA_OPEN:
		return sizeof(struct rdmaps_msg_declare);
	case RDMAPS_MSG_REPLICA_REPLY:
		return sizeof(struct rdmaps_msg_replica_reply);
	case RDMAPS_MSG_REPLICAS:
		return sizeof(struct rdmaps_msg_hdr);
	case RDMAPS_MSG_REPLICAS_REPLY:
		return sizeof(struct rdmaps_msg_replicas_reply);
	case RDMAPS_MSG_CATALOG_REPLY:
		return sizeof(struct rdmaps_msg_catalog_reply);
	case RDMAPS_MSG_CHUNKS_REPLY:
		return sizeof(struct rdmaps_msg_chunks_reply);
	case RDMAPS_MSG_WORKERS_REPLY:
		return sizeof(struct rdmaps_msg_workers_reply);
	case RDMAPS_MSG_TENSOR_REPLY:
		return sizeof(struct rdmaps_msg_tensor_reply);
	case RDMAPS_MSG_STATS_REPLY:
		return sizeof(struct rdmaps_msg_stats_reply);
	case RDMAPS_MSG_STATUS_REPLY:
		return sizeof(struct rdmaps_msg_status_reply);
	default:
		return 0;
	}
}

int rdmaps__msg_check(const void *buf, size_t len, uint16_t *type_out)
{
	struct rdmaps_msg_hdr h;
	size_t want;

	if (!buf || len < sizeof(h) || len > RDMAPS_MSG_MAX)
		return RDMAPS_EPROTO;
	memcpy(&h, buf, sizeof(h));
	if (h.magic != RDMAPS_PROTO_MAGIC)
		return RDMAPS_EPROTO;
	if (h.version != RDMAPS_PROTO_VERSION)
		return RDMAPS_EVERSION;
	want = msg_size(h.type);
	/* exact sizes: a message is either what its type says or refused */
	if (!want || h.length != len || len != want)
		return RDMAPS_EPROTO;
	if (type_out)
		*type_out = h.type;
	return 0;
}

int rdmaps__name_check(const char *name, size_t field)
{
	size_t n = strnlen(name, field);

	if (n == 0 || n == field)
		return RDMAPS_EINVAL;
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)name[i] < 0x21 || (unsigned char)name[i] > 0x7e)
			return RDMAPS_EINVAL;
	return 0;
}

void rdmaps__msg_init(struct rdmaps_msg_hdr *h, uint16_t type, uint32_t length, uint32_t req_id)
{
	h->magic = RDMAPS_PROTO_MAGIC;
	h->version = RDMAPS_PROTO_VERSION;
	h->type = type;
	h->length = length;
	h->req_id = req_id;
}

int rdmaps__token_equal(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
	/* touch every byte of the longest possible token whatever the inputs,
	 * so timing reveals nothing about how much of a guess was right */
	unsigned diff = (unsigned)(alen ^ blen);

	for (size_t i = 0; i < RDMAPS_TOKEN_MAX; i++) {
		uint8_t x = i < alen ? a[i] : 0;
		uint8_t y = i < blen ? b[i] : 0;
		diff |= (unsigned)(x ^ y);
	}
	return diff == 0;
}
