#include <criterion/criterion.h>
#include <string.h>

#include "protocol.h"

static struct rdmaps_msg_declare good_declare(void)
{
	struct rdmaps_msg_declare m = { 0 };
	rdmaps__msg_init(&m.hdr, RDMAPS_MSG_DECLARE, sizeof(m), 7);
	m.length = 100;
	strcpy(m.optimizer, "sgd");
	strcpy(m.name, "w0");
	return m;
}

Test(protocol, accepts_well_formed)
{
	struct rdmaps_msg_declare m = good_declare();
	uint16_t type = 0;
	cr_assert_eq(rdmaps__msg_check(&m, sizeof(m), &type), 0);
	cr_assert_eq(type, RDMAPS_MSG_DECLARE);
}

Test(protocol, refuses_short_long_and_mislabelled)
{
	struct rdmaps_msg_declare m = good_declare();
	uint8_t big[RDMAPS_MSG_MAX + 8] = { 0 };

	cr_assert_eq(rdmaps__msg_check(&m, 0, NULL), RDMAPS_EPROTO);
	cr_assert_eq(rdmaps__msg_check(&m, 8, NULL), RDMAPS_EPROTO, "shorter than a header");
	cr_assert_eq(rdmaps__msg_check(&m, sizeof(m) - 1, NULL), RDMAPS_EPROTO, "truncated");
	memcpy(big, &m, sizeof(m));
	cr_assert_eq(rdmaps__msg_check(big, sizeof(big), NULL), RDMAPS_EPROTO, "oversized");
	m.hdr.length = sizeof(m) + 4;
	cr_assert_eq(rdmaps__msg_check(&m, sizeof(m), NULL), RDMAPS_EPROTO, "length lies");
	m = good_declare();
	m.hdr.magic ^= 1;
	cr_assert_eq(rdmaps__msg_check(&m, sizeof(m), NULL), RDMAPS_EPROTO, "magic");
	m = good_declare();
	m.hdr.version = 99;
	cr_assert_eq(rdmaps__msg_check(&m, sizeof(m), NULL), RDMAPS_EVERSION);
	m = good_declare();
	m.hdr.type = 0x55;
	cr_assert_eq(rdmaps__msg_check(&m, sizeof(m), NULL), RDMAPS_EPROTO, "unknown type");
	m = good_declare();
	m.hdr.type = RDMAPS_MSG_LOOKUP; /* right header, wrong size for that type */
	cr_assert_eq(rdmaps__msg_check(&m, sizeof(m), NULL), RDMAPS_EPROTO);
}

Test(protocol, names)
{
	char f[8] = "abc";
	cr_assert_eq(rdmaps__name_check(f, sizeof(f)), 0);
	memset(f, 'a', sizeof(f));
	cr_assert_eq(rdmaps__name_check(f, sizeof(f)), RDMAPS_EINVAL, "unterminated");
	f[0] = '\0';
	cr_assert_eq(rdmaps__name_check(f, sizeof(f)), RDMAPS_EINVAL, "empty");
	strcpy(f, "a b");
	cr_assert_eq(rdmaps__name_check(f, sizeof(f)), RDMAPS_EINVAL, "space");
	strcpy(f, "a\x01");
	cr_assert_eq(rdmaps__name_check(f, sizeof(f)), RDMAPS_EINVAL, "control byte");
}

Test(protocol, hello)
{
	struct rdmaps_wire_hello h = { .magic = RDMAPS_PROTO_MAGIC, .version = RDMAPS_PROTO_VERSION };
	cr_assert_eq(rdmaps__hello_check(&h, sizeof(h)), 0);
	cr_assert_eq(rdmaps__hello_check(&h, sizeof(h) - 1), RDMAPS_EPROTO);
	cr_assert_eq(rdmaps__hello_check(NULL, 0), RDMAPS_EPROTO);
	h.token_len = RDMAPS_TOKEN_MAX + 1;
	cr_assert_eq(rdmaps__hello_check(&h, sizeof(h)), RDMAPS_EPROTO);
	h.token_len = 0;
	h.version = RDMAPS_PROTO_VERSION + 1;
	cr_assert_eq(rdmaps__hello_check(&h, sizeof(h)), RDMAPS_EVERSION);
}

Test(protocol, token_compare)
{
	const uint8_t a[] = "secret-token", b[] = "secret-tokem";
	cr_assert(rdmaps__token_equal(a, 12, a, 12));
	cr_assert_not(rdmaps__token_equal(a, 12, b, 12));
	cr_assert_not(rdmaps__token_equal(a, 12, a, 11), "prefix is not enough");
	cr_assert_not(rdmaps__token_equal(a, 0, a, 12), "missing token");
	cr_assert(rdmaps__token_equal(a, 0, b, 0), "no token on both sides");
}

Test(protocol, imm_roundtrip)
{
	uint32_t imm = rdmaps__imm_make(5, 0x12345678abcdull);
	cr_assert_eq(imm & 0xffff, 5);
	cr_assert_eq(imm >> 16, 0xabcd);
}
