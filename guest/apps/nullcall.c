/* nullcall: cost of the cheapest hypercall (xen_version), cmdline n=N. */
#include "app.h"

const char app_name[] = "nullcall";

int app_main(const char *cmdline)
{
    unsigned long n = cmdline_get_ulong(cmdline, "n", 10000);
    uint64_t t0, total;

    if (!n)
        n = 1;
    t0 = monotonic_ns();
    for (unsigned long i = 0; i < n; i++)
        HYPERVISOR_xen_version(XENVER_version, NULL);
    total = monotonic_ns() - t0;
    printk("nullcall: n=%lu ns=%lu per_call_ns=%lu\n",
           n, (unsigned long)total, (unsigned long)(total / n));
    poweroff();
}
