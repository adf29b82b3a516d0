/*
 * spin: burn the CPU forever at CPL3 without hypercalls, faults or events
 * handled in a loop (a hostile or buggy guest).  The host must still be
 * able to schedule other domains next to it and to destroy it.
 *
 * Output: `spin: spinning`, then nothing.
 */
#include "app.h"

const char app_name[] = "spin";

static volatile unsigned long spin_counter;

int app_main(const char *cmdline)
{
    (void)cmdline;
    printk("spin: spinning\n");
    /* Let the ring backend pick the line up before we stop talking. */
    console_flush(500 * NSEC_PER_MSEC);
    irq_disable();      /* no upcalls either: a pure CPL3 loop */
    for (;;)
        spin_counter++;
}
