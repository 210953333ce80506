/*
 * error.h -- internal side of the error convention. The public enum and the
 * X-macro list live in rdmaps.h so users see the same codes the server sends.
 */
#ifndef RDMAPS_COMMON_ERROR_H
#define RDMAPS_COMMON_ERROR_H

#include "rdmaps.h"

/*
 * Convert an errno value (positive or negative, as libibverbs returns or
 * librdmacm leaves in errno) into a negative rdmaps_err. The only place such
 * conversions happen, so every caller agrees on the mapping.
 */
int rdmaps__from_errno(int e);

#endif
