/*
 * pages.h -- what the kernel offers for large tensors: transparent huge
 * pages (the mode and the page size). The server asks for them (store.c),
 * rdmaps-ctl reports them, tests check them against the same reading.
 */
#ifndef RDMAPS_PAGES_H
#define RDMAPS_PAGES_H

#include <stddef.h>

/*
 * The transparent huge page mode in force ("always", "madvise" or "never")
 * into buf (at least 16 bytes); "" when the kernel has no such setting.
 * Returns buf. Reads sysfs: not for hot paths. Thread-safe.
 */
const char *rdmaps__thp_mode(char *buf, size_t len);

/* The size of a transparent huge page in bytes; 0 when there are none
 * (mode "never" or no setting). Thread-safe. */
size_t rdmaps__thp_size(void);

#endif
