/*
 * cpubench: time a fixed integer workload with the guest clock.
 * cmdline: iters=N (default CPUBENCH_DEFAULT_ITERS).  The workload lives
 * in cpubench_work.h so a host build runs the identical code.
 */
#include "app.h"
#include "cpubench_work.h"

const char app_name[] = "cpubench";

int app_main(const char *cmdline)
{
    uint64_t iters = cmdline_get_ulong(cmdline, "iters", CPUBENCH_DEFAULT_ITERS);
    uint64_t t0, t1, result;

    printk("cpubench: starting iters=%lu\n", (unsigned long)iters);
    t0 = monotonic_ns();
    result = cpubench_work(iters);
    t1 = monotonic_ns();
    printk("cpubench: iters=%lu result=%lx ns=%lu\n",
           (unsigned long)iters, (unsigned long)result, (unsigned long)(t1 - t0));
    poweroff();
}
