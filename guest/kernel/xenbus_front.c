/*
 * xenbus_front.c - frontend-side xenbus plumbing shared by blkfront and
 * netfront (see xenbus_front.h): one copy of the device lookup, the
 * backend/backend-id read, the XenbusState reads and switch, the backend
 * state watch, the keys' transaction, and the grants a backend still held
 * at teardown, so both drivers follow the protocol the same way.
 */
#include "xenbus_front.h"
#include "events.h"
#include "mm.h"
#include "blkfront.h"           /* xenbus_state_name, enum xenbus_state */
#include "sched.h"
#include "xtime.h"

void xenbus_front_kick(struct xenbus_front_kick *k)
{
    k->kicks++;
    waitq_wake_all(k->wq);
}

void xenbus_front_kick_cb(struct xenbus_watch *w, const char *path, void *data)
{
    (void)w; (void)path;
    xenbus_front_kick(data);
}

int xenbus_front_kicked(void *arg)
{
    const struct xenbus_front_wait *w = arg;

    return w->kick->kicks != w->seen || (w->stop && READ_ONCE(*w->stop));
}

int xenbus_node_read(const char *dir, const char *key, char *buf, size_t size)
{
    char path[192];

    snprintf(path, sizeof(path), "%s/%s", dir, key);
    return xenbus_read(XBT_NIL, path, buf, size);
}

int xenbus_node_printf(xenbus_transaction_t t, const char *dir, const char *key,
                       const char *fmt, ...)
{
    char path[192], val[64];
    va_list ap;

    snprintf(path, sizeof(path), "%s/%s", dir, key);
    va_start(ap, fmt);
    vsnprintf(val, sizeof(val), fmt, ap);
    va_end(ap);
    return xenbus_write(t, path, val);
}

int xenbus_node_state(const char *dir, int dflt)
{
    char buf[16];
    const char *end;
    unsigned long v;

    if (!dir[0] || xenbus_node_read(dir, "state", buf, sizeof(buf)) <= 0)
        return dflt;
    v = simple_strtoul(buf, &end, 10);
    return end == buf ? dflt : (int)v;
}

int xenbus_front_switch(const char *who, const char *node, int *fe_state, int state)
{
    int rc = xenbus_node_printf(XBT_NIL, node, "state", "%d", state);

    if (rc)
        printk("%s: writing state %s: %s\n", who, xenbus_state_name(state),
               xenbus_strerror(rc));
    else
        *fe_state = state;
    return rc;
}

int xenbus_front_read_backend(const char *node, char *backend, size_t size,
                              domid_t *backend_id, int *changed)
{
    char buf[128];
    unsigned long id;
    int rc;

    *changed = 0;
    rc = xenbus_node_read(node, "backend", buf, sizeof(buf));
    if (rc < 0)
        return rc;
    {
        char path[96];
        snprintf(path, sizeof(path), "%s/backend-id", node);
        rc = xenbus_read_ulong(XBT_NIL, path, &id);
    }
    if (rc < 0)
        return rc;
    if (strcmp(buf, backend) || (domid_t)id != *backend_id) {
        strncpy_z(backend, buf, size);
        *backend_id = (domid_t)id;
        *changed = 1;
    }
    return 0;
}

int xenbus_front_watch_backend(const char *who, struct xenbus_watch *w, int *on,
                               const char *backend, xenbus_watch_cb cb, void *data)
{
    char path[192];
    int rc;

    if (*on) {
        xenbus_unwatch(w);
        *on = 0;
    }
    snprintf(path, sizeof(path), "%s/state", backend);
    rc = xenbus_watch(w, path, cb, data);
    if (rc)
        printk("%s: watch %s: %s\n", who, path, xenbus_strerror(rc));
    else
        *on = 1;
    return rc;
}

int xenbus_front_find(const char *drv, const char *dir, long want, unsigned int *devid,
                      uint64_t deadline, struct xenbus_watch *w, char *list, size_t size)
{
    unsigned long seen = 0;
    int rc, n, watching = 0;

    for (;;) {
        n = xenbus_directory(XBT_NIL, dir, list, size);
        if (n > 0) {
            const char *p = list;
            unsigned long best = ~0UL;
            for (int i = 0; i < n; i++, p += strlen(p) + 1) {
                const char *end;
                unsigned long id = simple_strtoul(p, &end, 10);
                if (*end || end == p)
                    continue;
                if (want >= 0 ? id == (unsigned long)want : id < best)
                    best = id;
            }
            if (best != ~0UL) {
                char path[64];
                /* Wait until "backend" is there too. */
                snprintf(path, sizeof(path), "%s/%lu/backend", dir, best);
                if (xenbus_read(XBT_NIL, path, list, size) > 0) {
                    *devid = (unsigned int)best;
                    rc = 0;
                    break;
                }
            }
        } else if (n < 0 && n != -XEN_ENOENT) {
            printk("%s: listing %s: %s\n", drv, dir, xenbus_strerror(n));
            rc = n;
            break;
        }
        if (monotonic_ns() >= deadline) {
            rc = -XEN_ENOENT;
            break;
        }
        if (!watching) {
            if (xenbus_watch(w, dir, NULL, NULL) == 0)
                watching = 1;
            seen = w->events;
        }
        if (watching)
            xenbus_watch_wait(w, &seen, MIN(deadline, monotonic_ns() + NSEC_PER_SEC));
        else
            msleep(100);
    }
    if (watching)
        xenbus_unwatch(w);
    return rc;
}

int xenbus_front_ready(const char *drv, const char *what)
{
    if (!xenbus_available()) {
        printk("%s: no xenstore, so no %s\n", drv, what);
        return -XEN_ENODEV;
    }
    if (!gnttab_ready()) {
        printk("%s: no grant table\n", drv);
        return -XEN_ENOSYS;
    }
    return 0;
}

int xenbus_front_publish(int (*write)(xenbus_transaction_t t, void *arg), void *arg)
{
    xenbus_transaction_t t;
    int rc;

    do {
        rc = xenbus_transaction_start(&t);
        if (rc)
            return rc;
        rc = write(t, arg);
        if (rc) {
            xenbus_transaction_end(t, 1);
            return rc;
        }
        rc = xenbus_transaction_end(t, 0);
    } while (rc == -XEN_EAGAIN);
    return rc;
}

#define DEFERRED_MAX 5120
static struct { grant_ref_t ref; void *page; } deferred[DEFERRED_MAX];
static unsigned int ndeferred;
static unsigned long deferred_leaked;

void xenbus_front_defer_end(grant_ref_t ref, void *page)
{
    unsigned long flags = irq_save();

    if (ndeferred < DEFERRED_MAX) {
        deferred[ndeferred].ref = ref;
        deferred[ndeferred].page = page;
        ndeferred++;
    } else {
        deferred_leaked++;      /* the ref and the page stay out of use */
    }
    irq_restore(flags);
}

void xenbus_front_retry_deferred(void)
{
    unsigned int i = 0;

    while (i < ndeferred) {
        unsigned long flags = irq_save();
        grant_ref_t ref = deferred[i].ref;
        void *page = deferred[i].page;

        if (gnttab_end_access(ref) == -XEN_EBUSY) {
            irq_restore(flags);
            i++;
            continue;
        }
        deferred[i] = deferred[--ndeferred];
        irq_restore(flags);
        if (page)
            free_pages(page, 1);
    }
}

unsigned int xenbus_front_deferred(void)
{
    return ndeferred;
}

void xenbus_front_end_ring(void *ring, unsigned int pages, const grant_ref_t *refs)
{
    for (unsigned int i = 0; i < pages; i++) {
        void *pg = (char *)ring + i * PAGE_SIZE;
        if (gnttab_end_access(refs[i]) == -XEN_EBUSY)
            xenbus_front_defer_end(refs[i], pg);
        else
            free_pages(pg, 1);
    }
}
