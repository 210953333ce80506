/*
 * pages.c -- the transparent huge page settings, read from sysfs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pages.h"

#define THP_DIR "/sys/kernel/mm/transparent_hugepage/"

const char *rdmaps__thp_mode(char *buf, size_t len)
{
	char line[128] = "";
	FILE *f = fopen(THP_DIR "enabled", "r");
	char *a, *b;

	buf[0] = '\0';
	if (!f)
		return buf;
	/* "always [madvise] never": the bracketed one is in force */
	if (fgets(line, sizeof(line), f) && (a = strchr(line, '[')) && (b = strchr(a, ']'))) {
		*b = '\0';
		snprintf(buf, len, "%s", a + 1);
	}
	fclose(f);
	return buf;
}

size_t rdmaps__thp_size(void)
{
	char mode[16], line[32] = "";
	FILE *f;

	if (!rdmaps__thp_mode(mode, sizeof(mode))[0] || !strcmp(mode, "never"))
		return 0;
	f = fopen(THP_DIR "hpage_pmd_size", "r");
	if (!f)
		return 0;
	if (!fgets(line, sizeof(line), f))
		line[0] = '\0';
	fclose(f);
	return (size_t)strtoull(line, NULL, 10);
}
