/*
 * optimizer.c -- finds optimizers by name among those the linker gathered
 * into the rdmaps_opt section (see SRV_OPTIMIZER).
 */
#include "optimizer.h"

#include <string.h>

extern const struct srv_optimizer *const __start_rdmaps_opt[];
extern const struct srv_optimizer *const __stop_rdmaps_opt[];

const struct srv_optimizer *srv_optimizer_find(const char *name)
{
	for (const struct srv_optimizer *const *o = __start_rdmaps_opt; o < __stop_rdmaps_opt; o++)
		if (!strcmp((*o)->name, name))
			return *o;
	return NULL;
}
