/*
 * xsdemo: XenStore from the guest's side.
 *   1. read name and domid from our own directory (relative paths)
 *   2. write data/xsdemo/hello = "world" and read it back
 *   3. watch data/xsdemo/cmd: print every value it takes; "quit" ends it
 *
 * Output:
 *   xsdemo: name=<n> domid=<d>
 *   xsdemo: hello=world OK
 *   xsdemo: ready                 (the watch is registered)
 *   xsdemo: cmd=<value>           (each watch event on an existing node)
 *   xsdemo: bye                   (cmd = quit; then power off)
 * Failures print "xsdemo: FAIL <what>: <ERRNO>".
 *
 * Optional, before the watch (cmdline):
 *   big=1    values of 0..1900 bytes and a 150-entry directory (messages
 *            larger than the 1 KiB ring, split and wrapped), read back, and
 *            a 4000-byte value (over the node-size quota):
 *            "xsdemo: big OK sizes=<n> dir=<entries> oversize=<ERRNO or OK>"
 *   bench=N  N writes then N reads of data/xsdemo/bench:
 *            "xsdemo: bench ops=N write_ns=<per op> read_ns=<per op>
 *             write_per_s=<w> read_per_s=<r>"
 */
#include "app.h"
#include "xenbus.h"

const char app_name[] = "xsdemo";

static void fail(const char *what, int rc)
{
    printk("xsdemo: FAIL %s: %s (%d)\n", what, xenbus_strerror(rc), rc);
}

#define DIR_ENTRIES 150          /* "entry-NNN\0" x 150 = a 1500-byte reply */
static char big_val[4001], big_back[4100];

static void big_test(void)
{
    static const size_t sizes[] = { 0, 1, 15, 16, 17, 1000, 1007, 1008, 1023, 1024,
                                    1025, 1500, 1900 };
    char name[48], *dir;
    const char *oversize;
    int rc, n;

    for (size_t i = 0; i < ARRAY_SIZE(sizes); i++) {
        size_t len = sizes[i];
        for (size_t j = 0; j < len; j++)
            big_val[j] = (char)('a' + (j * 7 + i) % 26);
        big_val[len] = '\0';
        rc = xenbus_write(XBT_NIL, "data/xsdemo/big", big_val);
        if (rc) {
            fail("write data/xsdemo/big", rc);
            return;
        }
        rc = xenbus_read(XBT_NIL, "data/xsdemo/big", big_back, sizeof(big_back));
        if (rc < 0 || (size_t)rc != len || memcmp(big_val, big_back, len)) {
            printk("xsdemo: FAIL big value of %lu bytes read back as rc=%d\n",
                   (unsigned long)len, rc);
            return;
        }
    }
    /* A node over the node-size quota (2048 in xenstored): an error, not a hang. */
    memset(big_val, 'z', 4000);
    big_val[4000] = '\0';
    rc = xenbus_write(XBT_NIL, "data/xsdemo/big", big_val);
    oversize = rc ? xenbus_strerror(rc) : "OK";
    for (int i = 0; i < DIR_ENTRIES; i++) {
        snprintf(name, sizeof(name), "data/xsdemo/dir/entry-%03d", i);
        rc = xenbus_write(XBT_NIL, name, "x");
        if (rc) {
            fail("write data/xsdemo/dir/...", rc);
            return;
        }
    }
    dir = alloc_pages(2);
    if (!dir)
        return;
    n = xenbus_directory(XBT_NIL, "data/xsdemo/dir", dir, 2 * PAGE_SIZE);
    if (n != DIR_ENTRIES) {
        printk("xsdemo: FAIL directory of %d entries gave %d\n", DIR_ENTRIES, n);
        free_pages(dir, 2);
        return;
    }
    for (const char *p = dir; n--; p += strlen(p) + 1) {
        if (strncmp(p, "entry-", 6)) {
            printk("xsdemo: FAIL directory entry '%s'\n", p);
            free_pages(dir, 2);
            return;
        }
    }
    free_pages(dir, 2);
    rc = xenbus_rm(XBT_NIL, "data/xsdemo/dir");
    if (!rc)
        rc = xenbus_rm(XBT_NIL, "data/xsdemo/big");
    if (rc) {
        fail("rm", rc);
        return;
    }
    printk("xsdemo: big OK sizes=%lu dir=%d oversize=%s\n", (unsigned long)ARRAY_SIZE(sizes),
           DIR_ENTRIES, oversize);
}

static void bench(unsigned long n)
{
    char val[32];
    uint64_t t0, t1, t2;
    int rc = 0;

    t0 = monotonic_ns();
    for (unsigned long i = 0; i < n && !rc; i++) {
        snprintf(val, sizeof(val), "%lu", i);
        rc = xenbus_write(XBT_NIL, "data/xsdemo/bench", val);
    }
    t1 = monotonic_ns();
    for (unsigned long i = 0; i < n && rc >= 0; i++)
        rc = xenbus_read(XBT_NIL, "data/xsdemo/bench", val, sizeof(val));
    t2 = monotonic_ns();
    if (rc < 0) {
        fail("bench", rc);
        return;
    }
    printk("xsdemo: bench ops=%lu write_ns=%lu read_ns=%lu write_per_s=%lu read_per_s=%lu\n",
           n, (unsigned long)((t1 - t0) / n), (unsigned long)((t2 - t1) / n),
           (unsigned long)(n * NSEC_PER_SEC / (t1 - t0 ? t1 - t0 : 1)),
           (unsigned long)(n * NSEC_PER_SEC / (t2 - t1 ? t2 - t1 : 1)));
}

int app_main(const char *cmdline)
{
    static struct xenbus_watch watch;
    char name[128], domid[16], buf[256];
    unsigned long seen = 0;
    int rc;

    if (!xenbus_available()) {
        printk("xsdemo: FAIL no xenstore\n");
        return 1;
    }

    rc = xenbus_read(XBT_NIL, "name", name, sizeof(name));
    if (rc < 0) {
        fail("read name", rc);
        strncpy_z(name, "?", sizeof(name));
    }
    rc = xenbus_read(XBT_NIL, "domid", domid, sizeof(domid));
    if (rc < 0) {
        fail("read domid", rc);
        strncpy_z(domid, "?", sizeof(domid));
    }
    printk("xsdemo: name=%s domid=%s\n", name, domid);

    rc = xenbus_write(XBT_NIL, "data/xsdemo/hello", "world");
    if (rc)
        fail("write data/xsdemo/hello", rc);
    rc = xenbus_read(XBT_NIL, "data/xsdemo/hello", buf, sizeof(buf));
    if (rc < 0)
        fail("read data/xsdemo/hello", rc);
    else
        printk("xsdemo: hello=%s %s\n", buf, strcmp(buf, "world") ? "MISMATCH" : "OK");

    if (cmdline_get_ulong(cmdline, "big", 0))
        big_test();
    if (cmdline_get_ulong(cmdline, "bench", 0))
        bench(cmdline_get_ulong(cmdline, "bench", 0));

    rc = xenbus_watch(&watch, "data/xsdemo/cmd", NULL, NULL);
    if (rc) {
        fail("watch data/xsdemo/cmd", rc);
        return 1;
    }
    printk("xsdemo: ready\n");

    for (;;) {
        if (!xenbus_watch_wait(&watch, &seen, 0)) {
            if (!xenbus_available()) {
                printk("xsdemo: FAIL xenstore went away\n");
                return 1;
            }
            continue;
        }
        rc = xenbus_read(XBT_NIL, "data/xsdemo/cmd", buf, sizeof(buf));
        if (rc == -XEN_ENOENT)
            continue;               /* the initial event, or the node was removed */
        if (rc < 0) {
            fail("read data/xsdemo/cmd", rc);
            continue;
        }
        printk("xsdemo: cmd=%s\n", buf);
        if (!strcmp(buf, "quit")) {
            xenbus_unwatch(&watch);
            printk("xsdemo: bye\n");
            poweroff();
        }
    }
}
