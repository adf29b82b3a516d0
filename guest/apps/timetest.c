/*
 * timetest: sample system time and wallclock every 100 ms for secs=S
 * (default 2) seconds, checking both never go backwards.  Each sample line
 * goes to the console ring AND through HYPERVISOR_console_io, which the
 * hypervisor timestamps on arrival - that lets a host-side test compare
 * our clock against its own precisely.  cmdline out=both|ring|io selects
 * the paths (default both; pyxen echoes console_io onto the console, so
 * with "both" each sample line appears there twice).  With mark=1 (and
 * console_io in use) each sample is preceded by "timetest: mark" through
 * console_io, so the host's arrival timestamps of the mark and of the
 * sample line bracket the instant the sample was taken.
 */
#include "app.h"

const char app_name[] = "timetest";

int app_main(const char *cmdline)
{
    unsigned long secs = cmdline_get_ulong(cmdline, "secs", 2);
    unsigned long samples = secs * 10;
    int mark = cmdline_get_ulong(cmdline, "mark", 0) != 0;
    uint64_t start = monotonic_ns();
    uint64_t prev_sys = 0, prev_wall = 0;
    int bad = 0;
    char out[8] = "both";
    int to_ring, to_io;

    cmdline_get_str(cmdline, "out", out, sizeof(out));
    to_ring = strcmp(out, "io") != 0;
    to_io = strcmp(out, "ring") != 0;

    for (unsigned long k = 1; k <= samples; k++) {
        char line[128];
        uint64_t sys, wsec, wall;
        uint32_t wnsec;
        int n;

        sleep_until(start + k * 100 * NSEC_PER_MSEC);
        if (mark && to_io)
            console_io_write("timetest: mark\n", 15);
        sys = monotonic_ns();
        wallclock(&wsec, &wnsec);
        wall = wsec * NSEC_PER_SEC + wnsec;
        if (sys < prev_sys || wall < prev_wall) {
            printk("timetest: non-monotonic sys=%lu prev_sys=%lu wall=%lu prev_wall=%lu\n",
                   (unsigned long)sys, (unsigned long)prev_sys,
                   (unsigned long)wall, (unsigned long)prev_wall);
            bad++;
        }
        prev_sys = sys;
        prev_wall = wall;

        n = snprintf(line, sizeof(line), "timetest: sys=%lu wall=%lu.%09u\n",
                     (unsigned long)sys, (unsigned long)wsec, wnsec);
        if (n > (int)sizeof(line) - 1)
            n = sizeof(line) - 1;
        if (to_io)
            console_io_write(line, (size_t)n);
        if (to_ring)
            console_write(line, (size_t)n);
    }
    if (bad)
        printk("timetest: %d non-monotonic samples\n", bad);
    printk("timetest: done\n");
    poweroff();
}
