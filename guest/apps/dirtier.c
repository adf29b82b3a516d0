/*
 * dirtier: keep rewriting a block of memory (a workload for live
 * migration).  cmdline: mib=N (default 8), loops=K (default 0 = forever).
 * Every 8-byte word gets a fresh value from a running 64-bit counter each
 * pass, so every page is dirtied every pass.  Each pass first checks that
 * the buffer still holds what the previous pass wrote (a save/restore or a
 * migration that lost or mixed up a page shows as "dirtier: FAIL").
 * tick_ms=P: also print "tick N t=<system time ms>" every P ms while it
 * works (a heartbeat whose largest gap, seen from the host, measures a
 * migration's downtime); ticks late by more than a period are skipped,
 * never printed in a burst.
 */
#include "app.h"

const char app_name[] = "dirtier";

static uint64_t tick_ns, next_tick;
static unsigned long tick_no;

static void maybe_tick(void)
{
    uint64_t now;

    if (!tick_ns)
        return;
    now = monotonic_ns();
    if (now < next_tick)
        return;
    printk("tick %lu t=%lu\n", ++tick_no, (unsigned long)(now / 1000000));
    next_tick += tick_ns;
    if (next_tick <= now)
        next_tick = now + tick_ns;
}

int app_main(const char *cmdline)
{
    unsigned long mib = cmdline_get_ulong(cmdline, "mib", 8);
    unsigned long loops = cmdline_get_ulong(cmdline, "loops", 0);
    unsigned long pages = mib * 256;
    unsigned long words = pages * (PAGE_SIZE / sizeof(uint64_t));
    volatile uint64_t *mem;
    uint64_t counter = 0;

    tick_ns = cmdline_get_ulong(cmdline, "tick_ms", 0) * 1000000ULL;
    next_tick = monotonic_ns();

    mem = alloc_pages(pages);
    if (!mib || !mem) {
        printk("dirtier: cannot allocate %lu MiB (%lu pages free)\n", mib, mm_free_pages());
        return 1;
    }
    printk("dirtier: mib=%lu loops=%lu buffer=%p\n", mib, loops, (void *)mem);

    for (unsigned long pass = 1; loops == 0 || pass <= loops; pass++) {
        uint64_t t0 = monotonic_ns(), t1;
        uint64_t first = counter - words + 1;
        if (pass > 1) {
            for (unsigned long i = 0; i < words; i++) {
                if (!(i & 0x3fff))
                    maybe_tick();
                if (mem[i] != first + i) {
                    printk("dirtier: FAIL word %lu (page %lu) holds %lu, expected %lu\n", i,
                           i / (PAGE_SIZE / sizeof(uint64_t)), (unsigned long)mem[i],
                           (unsigned long)(first + i));
                    return 1;
                }
            }
        }
        for (unsigned long i = 0; i < words; i++) {
            if (!(i & 0x3fff))
                maybe_tick();
            mem[i] = ++counter;
        }
        t1 = monotonic_ns();
        printk("dirtier: pass %lu done ns=%lu\n", pass, (unsigned long)(t1 - t0));
        schedule();     /* let other threads (and a suspend) get a look in */
    }
    printk("dirtier: done\n");
    poweroff();
}
