/*
 * xenbus_front.h - the xenbus plumbing a PV frontend driver needs, shared by
 * blkfront and netfront so the protocol lives in one place: finding the
 * device under device/<class>, reading the backend path and domain from the
 * frontend directory, reading and switching XenbusState nodes, writing keys
 * under a node (in one transaction), watching the backend's state node, and
 * ending ring and buffer grants the backend may still hold (deferred list).
 *
 * The store calls may block: thread context only.  `who` is the
 * driver's log prefix for the device ("blkfront: xvda", "netfront: vif0").
 */
#ifndef PYXEN_XENBUS_FRONT_H
#define PYXEN_XENBUS_FRONT_H

#include "kernel.h"
#include "xenbus.h"
#include "gnttab.h"
#include "sched.h"

/*
 * What a frontend's watches poke: kicks counts the events its device thread
 * has yet to look at, wq (the driver's wait queue) is woken.
 */
struct xenbus_front_kick {
    volatile unsigned long kicks;
    struct waitq *wq;
};
void xenbus_front_kick(struct xenbus_front_kick *k);   /* events masked or not */
/* A watch callback: data is the device's struct xenbus_front_kick. */
void xenbus_front_kick_cb(struct xenbus_watch *w, const char *path, void *data);

/* The device thread's wait: until kicked past seen, or *stop (when given) is set. */
struct xenbus_front_wait {
    struct xenbus_front_kick *kick;
    unsigned long seen;
    const int *stop;
};
int xenbus_front_kicked(void *arg);         /* a waitq_wait condition on a xenbus_front_wait */

/* "<dir>/<key>" read: xenbus_read's result. */
int xenbus_node_read(const char *dir, const char *key, char *buf, size_t size);

/* "<dir>/<key>" written with a printf-formatted value, in transaction t. */
int xenbus_node_printf(xenbus_transaction_t t, const char *dir, const char *key,
                       const char *fmt, ...) __printf(4, 5);

/* "<dir>/state" as a XenbusState number: dflt when it is absent or not a number. */
int xenbus_node_state(const char *dir, int dflt);

/*
 * Write "<node>/state" = state; on success *fe_state = state, on failure the
 * error is logged.  Returns 0 or -errno.  (The caller wakes its waiters.)
 */
int xenbus_front_switch(const char *who, const char *node, int *fe_state, int state);

/*
 * The frontend directory's backend and backend-id.  0, or -errno
 * (-XEN_ENOENT: the device is not there); *changed = 1 when either differs
 * from what *backend / *backend_id held (both then take the new values).
 */
int xenbus_front_read_backend(const char *node, char *backend, size_t size,
                              domid_t *backend_id, int *changed);

/*
 * (Re)watch "<backend>/state" with cb(data); *on tells whether w is
 * registered (an old registration is dropped first).  0 or -errno (logged).
 */
int xenbus_front_watch_backend(const char *who, struct xenbus_watch *w, int *on,
                               const char *backend,
                               xenbus_watch_cb cb, void *data);

/*
 * Pick a device under dir ("device/vbd"): number want, or the lowest when
 * want < 0, once its "backend" key is there.  Waits (watching dir) until
 * deadline: 0 and *devid, -XEN_ENOENT, or the store's error (logged with
 * drv, "blkfront").  w and list (the directory listing) are the caller's.
 */
int xenbus_front_find(const char *drv, const char *dir, long want, unsigned int *devid,
                      uint64_t deadline, struct xenbus_watch *w, char *list, size_t size);

/*
 * The store and the grant table are there: 0, or -XEN_ENODEV / -XEN_ENOSYS
 * (logged as "<drv>: no xenstore, so no <what>").
 */
int xenbus_front_ready(const char *drv, const char *what);

/*
 * Publish a frontend's keys in one transaction: write(t, arg) writes them;
 * its error aborts the transaction, a commit that conflicted (-XEN_EAGAIN)
 * runs it again.  0 or -errno.
 */
int xenbus_front_publish(int (*write)(xenbus_transaction_t t, void *arg), void *arg);

/*
 * Grants a backend still had in use when a frontend let go of them (it may
 * unmap later than we tear down): one list for all frontends.  The ref and
 * the page (or NULL) stay out of use until the access is ended; the device
 * threads retry while xenbus_front_deferred() is non-zero.  Safe with
 * events masked or in an event handler; a full list leaks the entry.
 */
void xenbus_front_defer_end(grant_ref_t ref, void *page);
void xenbus_front_retry_deferred(void);     /* thread context (frees pages) */
unsigned int xenbus_front_deferred(void);

/* End the grants of a ring's pages: each page is freed, or deferred with its ref. */
void xenbus_front_end_ring(void *ring, unsigned int pages, const grant_ref_t *refs);

#endif
