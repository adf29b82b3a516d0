/*
 * xtime.h - system time (ns since domain boot) and wallclock from the
 * hypervisor's per-vCPU time record in shared_info.
 */
#ifndef PYXEN_XTIME_H
#define PYXEN_XTIME_H

#include "kernel.h"

uint64_t monotonic_ns(void);            /* Xen system time, ns */
void wallclock(uint64_t *sec, uint32_t *nsec); /* Unix time, now */
void wallclock_base(uint64_t *sec, uint32_t *nsec); /* Unix time at system time 0 */
void time_init(void);
void time_resume(void);

#endif /* PYXEN_XTIME_H */
