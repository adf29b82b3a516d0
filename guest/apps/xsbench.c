/*
 * xsbench: XenStore request rate from the guest's side (xenbus over the ring).
 *
 *   [n=1000] [rounds=1]
 *   each round: n xenbus_write of data/xsbench/key (values "0".."n-1"), then
 *   n xenbus_read of it (each read checked against the last value written),
 *   one request at a time (request, event, reply), timed with the guest clock:
 *     "xsbench: round R ops=N write_ns=<total> read_ns=<total>
 *      write_per_s=<w> read_per_s=<r>"
 *   then, watch-fire latency: with a watch on data/xsbench/w, n times a
 *   xenbus_write of it and a wait for the watch's event (the time from the
 *   write request to the event's callback: the write's round trip plus the
 *   event's delivery), "xsbench: round R watch_ns=<total> watch_us=<per op>";
 *   then data/xsbench is removed and it prints, with the best round's figures,
 *     "xsbench: done ops=N rounds=R write_per_s=<w> read_per_s=<r>
 *      write_us=<per op> read_us=<per op> watch_us=<per op>"
 *   and powers off.  Failures print "xsbench: FAIL <what>: <ERRNO>" and crash.
 */
#include "app.h"
#include "xenbus.h"

const char app_name[] = "xsbench";

#define KEY "data/xsbench/key"
#define WKEY "data/xsbench/w"

static void __noreturn fail(const char *what, int rc)
{
    printk("xsbench: FAIL %s: %s (%d)\n", what, xenbus_strerror(rc), rc);
    xen_shutdown(SHUTDOWN_crash);
}

static unsigned long per_s(unsigned long n, uint64_t ns)
{
    return (unsigned long)((uint64_t)n * NSEC_PER_SEC / (ns ? ns : 1));
}

int app_main(const char *cmdline)
{
    unsigned long n = cmdline_get_ulong(cmdline, "n", 1000);
    unsigned long rounds = cmdline_get_ulong(cmdline, "rounds", 1);
    uint64_t best_w = ~0ULL, best_r = ~0ULL, best_watch = ~0ULL;
    static struct xenbus_watch watch;
    unsigned long seen;
    char val[32], want[32];
    int rc;

    if (!n || !rounds) {
        printk("xsbench: FAIL n=%lu rounds=%lu\n", n, rounds);
        xen_shutdown(SHUTDOWN_crash);
    }
    if (!xenbus_available()) {
        printk("xsbench: FAIL no xenstore\n");
        xen_shutdown(SHUTDOWN_crash);
    }
    rc = xenbus_write(XBT_NIL, KEY, "start");     /* warm-up: creates the node */
    if (rc)
        fail("write " KEY, rc);
    rc = xenbus_write(XBT_NIL, WKEY, "start");
    if (rc)
        fail("write " WKEY, rc);
    rc = xenbus_watch(&watch, WKEY, NULL, NULL);
    if (rc)
        fail("watch " WKEY, rc);
    seen = 0;                                      /* the watch's first event */
    if (!watch.events && !xenbus_watch_wait(&watch, &seen, monotonic_ns() + 10 * NSEC_PER_SEC))
        fail("first event of " WKEY, -1);
    seen = watch.events;
    printk("xsbench: n=%lu rounds=%lu\n", n, rounds);

    for (unsigned long r = 1; r <= rounds; r++) {
        uint64_t t0, t1, t2, t3, t4;

        t0 = monotonic_ns();
        for (unsigned long i = 0; i < n; i++) {
            snprintf(val, sizeof(val), "%lu", i);
            rc = xenbus_write(XBT_NIL, KEY, val);
            if (rc)
                fail("write " KEY, rc);
        }
        t1 = monotonic_ns();
        snprintf(want, sizeof(want), "%lu", n - 1);
        for (unsigned long i = 0; i < n; i++) {
            rc = xenbus_read(XBT_NIL, KEY, val, sizeof(val));
            if (rc < 0)
                fail("read " KEY, rc);
            if (strcmp(val, want)) {
                printk("xsbench: FAIL read " KEY " = '%s', want '%s'\n", val, want);
                xen_shutdown(SHUTDOWN_crash);
            }
        }
        t2 = monotonic_ns();
        printk("xsbench: round %lu ops=%lu write_ns=%lu read_ns=%lu write_per_s=%lu "
               "read_per_s=%lu\n", r, n, (unsigned long)(t1 - t0), (unsigned long)(t2 - t1),
               per_s(n, t1 - t0), per_s(n, t2 - t1));
        t3 = monotonic_ns();
        for (unsigned long i = 0; i < n; i++) {
            snprintf(val, sizeof(val), "%lu", i);
            rc = xenbus_write(XBT_NIL, WKEY, val);
            if (rc)
                fail("write " WKEY, rc);
            if (watch.events == seen
                && !xenbus_watch_wait(&watch, &seen, monotonic_ns() + 10 * NSEC_PER_SEC))
                fail("no event for " WKEY, -1);
            seen = watch.events;
        }
        t4 = monotonic_ns();
        printk("xsbench: round %lu watch_ns=%lu watch_us=%lu\n", r, (unsigned long)(t4 - t3),
               (unsigned long)((t4 - t3) / n / 1000));
        if (t4 - t3 < best_watch)
            best_watch = t4 - t3;
        if (t1 - t0 < best_w)
            best_w = t1 - t0;
        if (t2 - t1 < best_r)
            best_r = t2 - t1;
    }
    rc = xenbus_unwatch(&watch);
    if (rc)
        fail("unwatch " WKEY, rc);
    rc = xenbus_rm(XBT_NIL, "data/xsbench");
    if (rc)
        fail("rm data/xsbench", rc);
    printk("xsbench: done ops=%lu rounds=%lu write_per_s=%lu read_per_s=%lu write_us=%lu "
           "read_us=%lu watch_us=%lu\n", n, rounds, per_s(n, best_w), per_s(n, best_r),
           (unsigned long)(best_w / n / 1000), (unsigned long)(best_r / n / 1000),
           (unsigned long)(best_watch / n / 1000));
    poweroff();
}
