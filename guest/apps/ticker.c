/*
 * ticker: a thread printing "tick N t=<system time ms>" every 100 ms.
 * Deadlines are absolute (start + N * 100 ms) so lateness never
 * accumulates.  cmdline: count=K stops after K ticks and powers off
 * (default: forever).  period_ms=P changes the period.  suspend_at=S: after
 * tick S the kernel suspends itself (kernel_suspend, as for control/shutdown
 * = "suspend"), for save/restore tests without a toolstack.
 */
#include "app.h"

const char app_name[] = "ticker";

static unsigned long tick_count;       /* 0 = forever */
static unsigned long suspend_at;       /* 0 = never */
static uint64_t period_ns;
static struct thread *main_t;
static volatile int ticker_done;

static void ticker_thread(void *arg)
{
    uint64_t start = monotonic_ns();

    (void)arg;
    for (unsigned long n = 1; tick_count == 0 || n <= tick_count; n++) {
        sleep_until(start + n * period_ns);
        printk("tick %lu t=%lu\n", n, (unsigned long)(monotonic_ns() / NSEC_PER_MSEC));
        if (n == suspend_at)
            printk("ticker: suspend returned %d\n", kernel_suspend());
    }
    ticker_done = 1;
    wake_thread(main_t);
}

int app_main(const char *cmdline)
{
    tick_count = cmdline_get_ulong(cmdline, "count", 0);
    suspend_at = cmdline_get_ulong(cmdline, "suspend_at", 0);
    period_ns = cmdline_get_ulong(cmdline, "period_ms", 100) * NSEC_PER_MSEC;
    if (!period_ns)
        period_ns = 100 * NSEC_PER_MSEC;
    main_t = current;

    if (!create_thread("ticker", ticker_thread, NULL)) {
        printk("ticker: cannot create thread\n");
        return 1;
    }
    /* Sleep until the ticker thread says it's done (never, by default). */
    while (!ticker_done) {
        block_current();
        if (ticker_done) {
            wake_thread(current);
            break;
        }
        schedule();
    }
    printk("ticker: done, powering off\n");
    poweroff();
}
