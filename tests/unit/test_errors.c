#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>

#include "error.h"

Test(errors, every_code_has_text_and_name)
{
	/* walk the public list: each code is negative, unique and described */
	int seen = 0;
#define CHECK(name, val, msg)                                                     \
	cr_assert_eq(RDMAPS_E##name, -(val));                                    \
	cr_assert_str_eq(rdmaps_strerror(RDMAPS_E##name), msg);                  \
	cr_assert_str_eq(rdmaps_err_name(RDMAPS_E##name), "RDMAPS_E" #name);    \
	seen++;
	RDMAPS_ERR_MAP(CHECK)
#undef CHECK
	cr_assert_gt(seen, 10);
	cr_assert_str_eq(rdmaps_strerror(0), "success");
	cr_assert_str_eq(rdmaps_strerror(-9999), "unknown rdmaps error");
}

Test(errors, errno_boundary)
{
	cr_assert_eq(rdmaps__from_errno(ENOMEM), RDMAPS_ENOMEM);
	cr_assert_eq(rdmaps__from_errno(-ENOMEM), RDMAPS_ENOMEM, "negative errno accepted too");
	cr_assert_eq(rdmaps__from_errno(ETIMEDOUT), RDMAPS_ETIMEDOUT);
	cr_assert_eq(rdmaps__from_errno(ECONNREFUSED), RDMAPS_ECONNECT);
	cr_assert_lt(rdmaps__from_errno(EIO), 0);
}
