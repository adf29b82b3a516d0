/*
 * xenbus.h - a XenStore client on the shared ring page (io/xs_wire.h).
 *
 * start_info.store_mfn is a page of ours holding struct
 * xenstore_domain_interface; start_info.store_evtchn is the channel to the
 * store.  Requests go out one at a time (struct xsd_sockmsg header + payload,
 * req_id echoed by the store); replies are matched by req_id, while
 * XS_WATCH_EVENT messages, which may arrive between a request and its reply,
 * are queued for the "xenbus" thread, which runs the watch callbacks.
 *
 * Paths not starting with '/' are relative to /local/domain/<our domid>.
 * Every call may block (it sleeps on the store's event channel) and must be
 * made from a thread, never from an event handler.  Errors come back as
 * -errno: the store's error strings ("ENOENT", ...) map to Xen's errno values;
 * -XEN_ENODEV means there is no store (see xenbus_available()).
 */
#ifndef PYXEN_XENBUS_H
#define PYXEN_XENBUS_H

#include "kernel.h"

/* Xen errno values (errno.h) used by the store's error strings. */
#ifndef XEN_EPERM
#define XEN_EPERM       1
#endif
#ifndef XEN_ENOENT
#define XEN_ENOENT      2
#endif
#define XEN_EIO         5
#define XEN_E2BIG       7
#define XEN_EAGAIN     11
#define XEN_ENOMEM     12
#define XEN_EACCES     13
#ifndef XEN_EBUSY
#define XEN_EBUSY      16
#endif
#ifndef XEN_EEXIST
#define XEN_EEXIST 17
#endif
#define XEN_ENODEV     19
#define XEN_EISDIR     21
#ifndef XEN_EINVAL
#define XEN_EINVAL     22
#endif
#ifndef XEN_ENOSPC
#define XEN_ENOSPC  28
#endif
#define XEN_EROFS      30
#ifndef XEN_ENOSYS
#define XEN_ENOSYS     38
#endif
#define XEN_ENOTEMPTY  39
#define XEN_ENOBUFS   105
#define XEN_EISCONN   106

/* ---- wire protocol (io/xs_wire.h) ---- */
enum xsd_sockmsg_type {
    XS_CONTROL, XS_DIRECTORY, XS_READ, XS_GET_PERMS, XS_WATCH, XS_UNWATCH,
    XS_TRANSACTION_START, XS_TRANSACTION_END, XS_INTRODUCE, XS_RELEASE,
    XS_GET_DOMAIN_PATH, XS_WRITE, XS_MKDIR, XS_RM, XS_SET_PERMS,
    XS_WATCH_EVENT, XS_ERROR, XS_IS_DOMAIN_INTRODUCED, XS_RESUME,
    XS_SET_TARGET, XS_RESET_WATCHES = XS_SET_TARGET + 2, XS_DIRECTORY_PART,
};
_Static_assert(XS_WATCH_EVENT == 15 && XS_ERROR == 16 && XS_DIRECTORY_PART == 22,
               "xsd_sockmsg_type numbering");

struct xsd_sockmsg {
    uint32_t type;      /* XS_* */
    uint32_t req_id;    /* echoed in the reply */
    uint32_t tx_id;     /* transaction, 0 = none */
    uint32_t len;       /* payload bytes that follow */
};
_Static_assert(sizeof(struct xsd_sockmsg) == 16, "xsd_sockmsg size");

#define XENSTORE_RING_SIZE      1024
typedef uint32_t XENSTORE_RING_IDX;
#define MASK_XENSTORE_IDX(i)    ((i) & (XENSTORE_RING_SIZE - 1))

struct xenstore_domain_interface {
    char req[XENSTORE_RING_SIZE];   /* requests to the store */
    char rsp[XENSTORE_RING_SIZE];   /* replies and watch events */
    XENSTORE_RING_IDX req_cons, req_prod;
    XENSTORE_RING_IDX rsp_cons, rsp_prod;
    uint32_t server_features;
    uint32_t connection;
    uint32_t error;
    uint32_t evtchn_port;
};
_Static_assert(offsetof(struct xenstore_domain_interface, rsp) == 1024, "xs rsp");
_Static_assert(offsetof(struct xenstore_domain_interface, req_cons) == 2048, "xs req_cons");
_Static_assert(offsetof(struct xenstore_domain_interface, req_prod) == 2052, "xs req_prod");
_Static_assert(offsetof(struct xenstore_domain_interface, rsp_cons) == 2056, "xs rsp_cons");
_Static_assert(offsetof(struct xenstore_domain_interface, rsp_prod) == 2060, "xs rsp_prod");
_Static_assert(offsetof(struct xenstore_domain_interface, server_features) == 2064, "xs features");
_Static_assert(offsetof(struct xenstore_domain_interface, connection) == 2068, "xs connection");
_Static_assert(offsetof(struct xenstore_domain_interface, error) == 2072, "xs error");

#define XENSTORE_PAYLOAD_MAX    4096
#define XENSTORE_CONNECTED      0

/* ---- client API ---- */
typedef uint32_t xenbus_transaction_t;
#define XBT_NIL ((xenbus_transaction_t)0)

/* Boot: bind the store port and start the "xenbus" thread, which probes the
 * store (2 s), writes control/feature-{poweroff,reboot} and watches
 * control/shutdown.  Without a store it prints "pyxen-guest: no xenstore". */
void xenbus_init(void);
void xenbus_resume(void);               /* restored: new channel, watches again */
/* Waits for the probe; 1 if a store answered. */
int  xenbus_available(void);
const char *xenbus_strerror(int err);      /* -XEN_ENOENT -> "ENOENT" */

/* Value (NUL-terminated) into buf; returns its length, -XEN_ENOBUFS if it
 * doesn't fit in size-1 bytes, or -errno. */
int xenbus_read(xenbus_transaction_t t, const char *path, char *buf, size_t size);
int xenbus_read_ulong(xenbus_transaction_t t, const char *path, unsigned long *val);
int xenbus_write(xenbus_transaction_t t, const char *path, const char *value);
int xenbus_printf(xenbus_transaction_t t, const char *path, const char *fmt, ...)
    __printf(3, 4);
int xenbus_mkdir(xenbus_transaction_t t, const char *path);
int xenbus_rm(xenbus_transaction_t t, const char *path);
/* Children of path as NUL-separated names in buf; returns how many. */
int xenbus_directory(xenbus_transaction_t t, const char *path, char *buf, size_t size);
/* Permissions as NUL-separated entries ("b0", "r5", ...: a letter r/w/b/n
 * and a domid; the first is the owner, its letter the default for everyone
 * not listed); returns how many. */
int xenbus_get_perms(xenbus_transaction_t t, const char *path, char *buf, size_t size);
/* perms: n NUL-terminated entries back to back, as above. */
int xenbus_set_perms(xenbus_transaction_t t, const char *path, const char *perms, size_t n);
/* The common case: owner, plus dflt ('r','w','b','n') for everyone else. */
int xenbus_set_perms_owner(xenbus_transaction_t t, const char *path, domid_t owner, char dflt);
int xenbus_get_domain_path(domid_t dom, char *buf, size_t size);
/* Our domid, from the "domid" node the toolstack writes. */
int xenbus_self_domid(domid_t *dom);

/* A transaction; end(t, 0) commits, end(t, 1) aborts.  -XEN_EAGAIN from a
 * commit means another writer got in first: start again from scratch. */
int xenbus_transaction_start(xenbus_transaction_t *t);
int xenbus_transaction_end(xenbus_transaction_t t, int abort);

/*
 * Watches.  The store fires one event when the watch is registered and one
 * for each change of path or anything below it.  cb (may be NULL) runs in
 * the "xenbus" thread with the event's path; it may make xenbus calls.
 * Every event also bumps w->events, for threads that prefer to wait with
 * xenbus_watch_wait().  w must stay alive until xenbus_unwatch().
 */
#define XENBUS_WATCH_PATH_MAX 256
struct xenbus_watch;
typedef void (*xenbus_watch_cb)(struct xenbus_watch *w, const char *path, void *data);
struct xenbus_watch {
    char path[XENBUS_WATCH_PATH_MAX];
    char token[24];
    xenbus_watch_cb cb;
    void *data;
    volatile unsigned long events;  /* events seen so far */
    int registered;
};
int xenbus_watch(struct xenbus_watch *w, const char *path, xenbus_watch_cb cb, void *data);

/* Several requests in one round trip (xenbus.c xenbus_batch): each op's
 * result in op->rc (XS_READ: the value's length, the value in out). */
struct xenbus_op {
    uint32_t type;                  /* XS_READ, XS_WRITE, XS_RM, XS_MKDIR, XS_WATCH,
                                       XS_UNWATCH, XS_TRANSACTION_END */
    const char *path;               /* (XS_TRANSACTION_END: "T" commit, "F" abort) */
    const char *value;              /* XS_WRITE */
    struct xenbus_watch *w;         /* XS_WATCH (cb, data set), XS_UNWATCH */
    char *out;                      /* XS_READ: NUL-terminated, truncated to size */
    size_t size;
    int rc;
    int done;
};
int xenbus_batch(xenbus_transaction_t t, struct xenbus_op *ops, int n);
int xenbus_unwatch(struct xenbus_watch *w);
/* Block until w->events != *seen (then *seen = w->events, returns 1) or
 * the deadline (absolute system time; 0 = none) passes (returns 0). */
int xenbus_watch_wait(struct xenbus_watch *w, unsigned long *seen, uint64_t deadline_ns);

/* Any request: payload of len bytes; reply payload into reply (NUL added,
 * truncated to size-1), its full length in *reply_len.  Returns 0, or
 * -errno for an XS_ERROR reply. */
int xenbus_request(uint32_t type, xenbus_transaction_t t, const void *payload, size_t len,
                   char *reply, size_t size, size_t *reply_len);

#endif /* PYXEN_XENBUS_H */
