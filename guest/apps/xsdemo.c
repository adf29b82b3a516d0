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
 */
#include "app.h"
#include "xenbus.h"

const char app_name[] = "xsdemo";

static void fail(const char *what, int rc)
{
    printk("xsdemo: FAIL %s: %s (%d)\n", what, xenbus_strerror(rc), rc);
}

int app_main(const char *cmdline)
{
    static struct xenbus_watch watch;
    char name[128], domid[16], buf[256];
    unsigned long seen = 0;
    int rc;

    (void)cmdline;
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
