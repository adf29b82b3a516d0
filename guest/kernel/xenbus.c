/*
 * xenbus.c - XenStore client over the shared ring, and the control/shutdown
 * handler.
 *
 * Ring (io/xs_wire.h): two 1 KiB byte rings with free-running 32-bit
 * indices.  We produce requests at req[req_prod] and the store consumes at
 * req_cons; the store produces replies and watch events at rsp[rsp_prod]
 * and we consume at rsp_cons.  After producing requests we notify the
 * store's event channel, after consuming replies only if the ring was full
 * (as Linux's xb_read); the store notifies us after moving its own.  Messages are
 * a struct xsd_sockmsg header plus up to XENSTORE_PAYLOAD_MAX bytes, so a
 * message may be larger than the ring: both directions stream, and the
 * receiver keeps a partial message across events.
 *
 * Concurrency: the response side is parsed in the store port's event
 * handler (events masked), which completes the one outstanding request or
 * queues watch events.  Requests are serialised by a sleeping lock.
 * Threads wait (never spin) on a small wait list that the handler wakes.
 */
#include "xenbus.h"
#include "events.h"
#include "gnttab.h"
#include "hypercall.h"
#include "mm.h"
#include "sched.h"
#include "xtime.h"

#define PROBE_TIMEOUT_NS (2 * NSEC_PER_SEC)

enum { XB_PROBING, XB_READY, XB_ABSENT, XB_BROKEN };
static volatile int xb_state = XB_ABSENT;
static struct xenstore_domain_interface *ring;
static evtchn_port_t store_port;
static struct thread *xenbus_thread_ptr;

/* ---------------------------------------------------------------- */
/* Waiting: the kernel's wait queue (sched.h); every state change wakes all. */

static struct waitq waiters = { .name = "xenbus" };

/* ---------------------------------------------------------------- */
/* Errors */

static const struct { const char *name; int err; } xs_errors[] = {
    { "EINVAL", XEN_EINVAL }, { "EACCES", XEN_EACCES }, { "EEXIST", XEN_EEXIST },
    { "EISDIR", XEN_EISDIR }, { "ENOENT", XEN_ENOENT }, { "ENOMEM", XEN_ENOMEM },
    { "ENOSPC", XEN_ENOSPC }, { "EIO", XEN_EIO }, { "ENOTEMPTY", XEN_ENOTEMPTY },
    { "ENOSYS", XEN_ENOSYS }, { "EROFS", XEN_EROFS }, { "EBUSY", XEN_EBUSY },
    { "EAGAIN", XEN_EAGAIN }, { "EISCONN", XEN_EISCONN }, { "E2BIG", XEN_E2BIG },
    { "EPERM", XEN_EPERM },
    /* not store errors, but ours */
    { "ENODEV", XEN_ENODEV }, { "ENOBUFS", XEN_ENOBUFS },
};

static int xs_error_to_errno(const char *s)
{
    for (size_t i = 0; i < ARRAY_SIZE(xs_errors); i++)
        if (!strcmp(s, xs_errors[i].name))
            return -xs_errors[i].err;
    printk("xenbus: unknown error string '%.32s'\n", s);
    return -XEN_EINVAL;
}

const char *xenbus_strerror(int err)
{
    if (err < 0)
        err = -err;
    for (size_t i = 0; i < ARRAY_SIZE(xs_errors); i++)
        if (xs_errors[i].err == err)
            return xs_errors[i].name;
    return err ? "E?" : "OK";
}

/* ---------------------------------------------------------------- */
/* Receive side (event handler context, events masked) */

static struct xsd_sockmsg rx_hdr;
static char rx_body[XENSTORE_PAYLOAD_MAX + 1];
static uint32_t rx_got;                 /* header + body bytes so far */

/* The one outstanding request. */
static struct {
    uint32_t req_id;
    int active, done;
    struct xsd_sockmsg hdr;             /* the reply's header */
} pend;

/* Or the outstanding requests of one xenbus_batch(): req_ids first..first+n-1. */
static struct {
    struct xenbus_op *ops;
    uint32_t first;
    int n, got, active;
} batch;

static int xs_error_to_errno(const char *s);

/* A reply to one of the batch's requests (event context): its result in its op. */
static int batch_deliver(void)
{
    uint32_t i = rx_hdr.req_id - batch.first;
    struct xenbus_op *op;

    if (!batch.active || i >= (uint32_t)batch.n)
        return 0;
    op = &batch.ops[i];
    if (op->done)
        return 0;
    if (rx_hdr.type == XS_ERROR) {
        op->rc = xs_error_to_errno(rx_body);
    } else if (rx_hdr.type != op->type) {
        op->rc = -XEN_EIO;
    } else {
        op->rc = 0;
        if (op->type == XS_READ && op->out && op->size) {
            size_t n = MIN((size_t)rx_hdr.len, op->size - 1);
            memcpy(op->out, rx_body, n);
            op->out[n] = '\0';
            op->rc = rx_hdr.len < op->size ? (int)rx_hdr.len : -XEN_ENOBUFS;
        }
    }
    op->done = 1;
    batch.got++;
    return 1;
}
static char reply_buf[XENSTORE_PAYLOAD_MAX + 1];

/* Watch events waiting for the xenbus thread: [u32 len][len bytes], wrapped. */
#define EVQ_SIZE 16384
static char evq[EVQ_SIZE];
static uint32_t evq_head, evq_tail;     /* free running; head = producer */
static unsigned long evq_dropped;

static void xb_broken(const char *why)
{
    if (xb_state != XB_BROKEN)
        printk("pyxen-guest: xenbus: protocol error (%s), giving up on the store\n", why);
    xb_state = XB_BROKEN;
    waitq_wake_all(&waiters);
}

static void evq_copy_in(const void *src, uint32_t len)
{
    const char *s = src;
    for (uint32_t i = 0; i < len; i++)
        evq[(evq_head + i) % EVQ_SIZE] = s[i];
    evq_head += len;
}

static void evq_push(const char *body, uint32_t len)
{
    if (EVQ_SIZE - (evq_head - evq_tail) < len + sizeof(uint32_t)) {
        if (!evq_dropped++)
            printk("pyxen-guest: xenbus: watch event queue full, dropping events\n");
        return;
    }
    evq_copy_in(&len, sizeof(len));
    evq_copy_in(body, len);
}

static void xb_deliver(void)
{
    uint32_t len = rx_hdr.len;

    rx_body[len] = '\0';
    if (rx_hdr.type == XS_WATCH_EVENT) {
        evq_push(rx_body, len);
        return;                         /* the caller wakes the waiters */
    }
    if (batch_deliver())
        return;
    if (pend.active && !pend.done && rx_hdr.req_id == pend.req_id) {
        pend.hdr = rx_hdr;
        memcpy(reply_buf, rx_body, len + 1);
        pend.done = 1;
        return;
    }
    printk("pyxen-guest: xenbus: unexpected message type %u req_id %u len %u, dropped\n",
           rx_hdr.type, rx_hdr.req_id, len);
}

static void xb_rx(void)
{
    XENSTORE_RING_IDX cons, prod, start;

    if (!ring || (xb_state != XB_READY && xb_state != XB_PROBING))
        return;
    cons = READ_ONCE(ring->rsp_cons);
    prod = READ_ONCE(ring->rsp_prod);
    rmb();                              /* indices before the bytes */
    if ((XENSTORE_RING_IDX)(prod - cons) > XENSTORE_RING_SIZE) {
        xb_broken("response ring indices");
        return;
    }
    if (cons == prod)
        return;
    start = cons;
    while (cons != prod) {
        XENSTORE_RING_IDX avail = prod - cons;
        uint32_t off = MASK_XENSTORE_IDX(cons);
        uint32_t chunk = MIN(avail, XENSTORE_RING_SIZE - off);
        uint32_t want;
        char *dst;

        if (rx_got < sizeof(rx_hdr)) {
            want = sizeof(rx_hdr) - rx_got;
            dst = (char *)&rx_hdr + rx_got;
        } else {
            want = sizeof(rx_hdr) + rx_hdr.len - rx_got;
            dst = rx_body + (rx_got - sizeof(rx_hdr));
        }
        chunk = MIN(chunk, want);
        memcpy(dst, &ring->rsp[off], chunk);
        cons += chunk;
        rx_got += chunk;
        if (rx_got == sizeof(rx_hdr) && rx_hdr.len > XENSTORE_PAYLOAD_MAX) {
            xb_broken("oversized message");
            return;
        }
        if (rx_got >= sizeof(rx_hdr) && rx_got == sizeof(rx_hdr) + rx_hdr.len) {
            xb_deliver();
            rx_got = 0;
        }
    }
    mb();                               /* done reading before freeing the space */
    WRITE_ONCE(ring->rsp_cons, cons);
    /* The store is told only when it may be waiting for the space: the ring
     * was full when we started (Linux's xb_read).  A relay fills the ring as
     * far as it can, so it has more only then; any other notification is an
     * exit, and a wake-up on the other side, for nothing, and each reply of a
     * restored domain's reconnect would pay one.  The barrier: the store sees
     * the space before we look at its producer. */
    mb();
    if ((XENSTORE_RING_IDX)(READ_ONCE(ring->rsp_prod) - start) >= XENSTORE_RING_SIZE)
        notify_remote_via_evtchn(store_port);
    waitq_wake_all(&waiters);
}

static void xb_event(evtchn_port_t port, struct pt_regs *regs, void *data)
{
    (void)port; (void)regs; (void)data;
    xb_rx();
    waitq_wake_all(&waiters);                     /* replies, watch events, ring space */
}

/* ---------------------------------------------------------------- */
/* Send side and requests (thread context) */

static volatile int req_busy;
static uint32_t next_req_id = 1;
static char tx_buf[sizeof(struct xsd_sockmsg) + XENSTORE_PAYLOAD_MAX];

static int try_lock(void *arg)
{
    (void)arg;
    if (req_busy)
        return 0;
    req_busy = 1;
    return 1;
}

static void xb_unlock(void)
{
    req_busy = 0;
    waitq_wake_all(&waiters);
}

static int not_probing(void *arg)
{
    (void)arg;
    return xb_state != XB_PROBING;
}

static int req_space(void *arg)
{
    (void)arg;
    if (xb_state != XB_READY && xb_state != XB_PROBING)
        return 1;
    return READ_ONCE(ring->req_prod) - READ_ONCE(ring->req_cons) < XENSTORE_RING_SIZE;
}

static int reply_done(void *arg)
{
    (void)arg;
    /* Pick up anything the store produced without (or before) an event. */
    xb_rx();
    return pend.done || (xb_state != XB_READY && xb_state != XB_PROBING);
}

/* Stream len bytes into the request ring.  0, -XEN_EIO or -XEN_ETIMEDOUT. */
#define XEN_ETIMEDOUT 110
static int xb_send(const char *p, size_t len, uint64_t deadline)
{
    while (len) {
        XENSTORE_RING_IDX cons, prod;
        size_t n = 0;

        irq_disable();
        if (xb_state != XB_READY && xb_state != XB_PROBING) {
            irq_enable();
            return -XEN_EIO;
        }
        cons = READ_ONCE(ring->req_cons);
        prod = READ_ONCE(ring->req_prod);
        mb();                           /* see the consumer before reusing slots */
        if ((XENSTORE_RING_IDX)(prod - cons) > XENSTORE_RING_SIZE) {
            xb_broken("request ring indices");
            irq_enable();
            return -XEN_EIO;
        }
        while (n < len && (XENSTORE_RING_IDX)(prod - cons) < XENSTORE_RING_SIZE) {
            uint32_t off = MASK_XENSTORE_IDX(prod);
            size_t chunk = MIN(len - n, (size_t)(XENSTORE_RING_SIZE - off));
            chunk = MIN(chunk, (size_t)(XENSTORE_RING_SIZE - (prod - cons)));
            memcpy(&ring->req[off], p + n, chunk);
            n += chunk;
            prod += (XENSTORE_RING_IDX)chunk;
        }
        wmb();                          /* bytes before the producer index */
        WRITE_ONCE(ring->req_prod, prod);
        irq_enable();
        if (n)
            notify_remote_via_evtchn(store_port);
        p += n;
        len -= n;
        if (len && !waitq_wait(&waiters, req_space, NULL, deadline))
            return -XEN_ETIMEDOUT;
    }
    return 0;
}

struct xb_iov {
    const void *p;
    size_t len;
};

/* Wait until the store can be talked to (the probe's own thread may talk
 * during the probe); 0, or why it never will. */
static int xb_usable(void)
{
    if (current != xenbus_thread_ptr || xb_state != XB_PROBING)
        waitq_wait(&waiters, not_probing, NULL, 0);
    if (xb_state == XB_ABSENT)
        return -XEN_ENODEV;
    if (xb_state == XB_BROKEN)
        return -XEN_EIO;
    return 0;
}

/*
 * One request/reply exchange.  On success the reply payload is in
 * reply_buf (NUL-terminated), its length in *rlen, and the lock is still
 * held: the caller copies what it needs, then xb_unlock().  On error the
 * lock is released.
 */
static int xb_talk(uint32_t type, xenbus_transaction_t t, const struct xb_iov *iov, int niov,
                   size_t *rlen, uint64_t deadline)
{
    struct xsd_sockmsg hdr;
    size_t total = 0;
    int rc;

    rc = xb_usable();
    if (rc)
        return rc;
    for (int i = 0; i < niov; i++)
        total += iov[i].len;
    if (total > XENSTORE_PAYLOAD_MAX)
        return -XEN_E2BIG;

    waitq_wait(&waiters, try_lock, NULL, 0);
    hdr.type = type;
    hdr.req_id = next_req_id++;
    hdr.tx_id = t;
    hdr.len = (uint32_t)total;
    memcpy(tx_buf, &hdr, sizeof(hdr));
    total = sizeof(hdr);
    for (int i = 0; i < niov; i++) {
        memcpy(tx_buf + total, iov[i].p, iov[i].len);
        total += iov[i].len;
    }

    irq_disable();
    pend.req_id = hdr.req_id;
    pend.done = 0;
    pend.active = 1;
    irq_enable();

    rc = xb_send(tx_buf, total, deadline);
    if (!rc && !waitq_wait(&waiters, reply_done, NULL, deadline))
        rc = -XEN_ETIMEDOUT;

    irq_disable();
    pend.active = 0;
    if (!rc && !pend.done)
        rc = -XEN_EIO;                  /* the store went bad meanwhile */
    irq_enable();
    if (rc) {
        xb_unlock();
        return rc;
    }
    if (pend.hdr.type == XS_ERROR) {
        rc = xs_error_to_errno(reply_buf);
        xb_unlock();
        return rc;
    }
    if (pend.hdr.type != type) {
        printk("pyxen-guest: xenbus: reply type %u to request type %u\n", pend.hdr.type, type);
        xb_unlock();
        return -XEN_EIO;
    }
    *rlen = pend.hdr.len;
    return 0;
}

/* Copy reply_buf out (NUL-terminated, truncated) and unlock. */
static int xb_copy_reply(char *buf, size_t size, size_t rlen)
{
    if (buf && size) {
        size_t n = MIN(rlen, size - 1);
        memcpy(buf, reply_buf, n);
        buf[n] = '\0';
    }
    xb_unlock();
    return (buf && rlen < size) ? 0 : -XEN_ENOBUFS;
}

int xenbus_request(uint32_t type, xenbus_transaction_t t, const void *payload, size_t len,
                   char *reply, size_t size, size_t *reply_len)
{
    struct xb_iov iov = { payload, len };
    size_t rlen = 0;
    int rc = xb_talk(type, t, &iov, 1, &rlen, 0);

    if (rc)
        return rc;
    if (reply_len)
        *reply_len = rlen;
    (void)xb_copy_reply(reply, size, rlen);
    return 0;
}

/* path\0 (+ more) -> "OK" reply */
static int xb_simple(uint32_t type, xenbus_transaction_t t, const struct xb_iov *iov, int n)
{
    size_t rlen;
    int rc = xb_talk(type, t, iov, n, &rlen, 0);

    if (rc)
        return rc;
    xb_unlock();
    return 0;
}

static int batch_done(void *arg)
{
    (void)arg;
    xb_rx();
    return batch.got == batch.n || (xb_state != XB_READY && xb_state != XB_PROBING);
}

static int watch_add(struct xenbus_watch *w);
static void watch_del(struct xenbus_watch *w);
static unsigned long token_seq;

/* One request's bytes at tx_buf + *off: 0, or -XEN_E2BIG if they do not fit. */
static int batch_put(size_t *off, uint32_t type, uint32_t id, xenbus_transaction_t t,
                     const char *a, size_t alen, const char *b, size_t blen)
{
    struct xsd_sockmsg hdr = { type, id, t, (uint32_t)(alen + blen) };

    if (*off + sizeof(hdr) + alen + blen > sizeof(tx_buf))
        return -XEN_E2BIG;
    memcpy(tx_buf + *off, &hdr, sizeof(hdr));
    memcpy(tx_buf + *off + sizeof(hdr), a, alen);
    if (blen)
        memcpy(tx_buf + *off + sizeof(hdr) + alen, b, blen);
    *off += sizeof(hdr) + alen + blen;
    return 0;
}

/*
 * Several requests put on the ring at once, their replies awaited together:
 * one round trip to the store instead of n.  The wire protocol allows it (a
 * connection may have many requests outstanding, each with its req_id, and
 * the store answers them in order), so a write of the state node after the
 * keys is seen after them.  All go in transaction t.  Each op's result is in
 * op->rc (XS_READ: the value's length, the value in op->out); the return is
 * the first op's error, or 0.  XS_WATCH registers op->w on op->path (with
 * op->w->cb/data set by the caller) as xenbus_watch does (op->path NULL:
 * op->w, registered before, is sent again with its path and token, as after
 * a resume); XS_UNWATCH drops
 * op->w (its events stop at once).  XS_TRANSACTION_END commits (op->path
 * "T") or aborts ("F").
 */
int xenbus_batch(xenbus_transaction_t t, struct xenbus_op *ops, int n)
{
    size_t off = 0;
    uint32_t first;
    int rc = 0;

    if (n <= 0)
        return 0;
    rc = xb_usable();
    if (rc)
        return rc;
    waitq_wait(&waiters, try_lock, NULL, 0);
    first = next_req_id;
    next_req_id += (uint32_t)n;
    for (int i = 0; i < n && !rc; i++) {
        struct xenbus_op *op = &ops[i];
        size_t plen = op->path ? strlen(op->path) : 0;
        struct xenbus_watch *w = op->w;

        op->done = 0;
        op->rc = -XEN_EIO;
        switch (op->type) {
        case XS_WRITE:
            rc = batch_put(&off, XS_WRITE, first + (uint32_t)i, t, op->path, plen + 1, op->value,
                           strlen(op->value));
            break;
        case XS_READ:
        case XS_RM:
        case XS_MKDIR:
        case XS_TRANSACTION_END:
            rc = batch_put(&off, op->type, first + (uint32_t)i, t, op->path, plen + 1, NULL, 0);
            break;
        case XS_UNWATCH:
            rc = batch_put(&off, XS_UNWATCH, first + (uint32_t)i, XBT_NIL, w->path,
                           strlen(w->path) + 1, w->token, strlen(w->token) + 1);
            if (!rc) {
                watch_del(w);
                w->registered = 0;
            }
            break;
        case XS_WATCH:
            if (!op->path) {            /* already ours: registered again (a resume) */
                rc = batch_put(&off, XS_WATCH, first + (uint32_t)i, XBT_NIL, w->path,
                               strlen(w->path) + 1, w->token, strlen(w->token) + 1);
                break;
            }
            if (plen >= sizeof(w->path)) {
                rc = -XEN_E2BIG;
                break;
            }
            memcpy(w->path, op->path, plen + 1);
            snprintf(w->token, sizeof(w->token), "pyxen-%lu", ++token_seq);
            w->events = 0;
            w->registered = 0;
            rc = watch_add(w);
            if (!rc)
                rc = batch_put(&off, XS_WATCH, first + (uint32_t)i, XBT_NIL, w->path, plen + 1,
                               w->token, strlen(w->token) + 1);
            if (rc)
                watch_del(w);
            break;
        default:
            rc = -XEN_EINVAL;
            break;
        }
        if (rc) {
            /* nothing was sent: undo the watches added so far */
            for (int k = 0; k < i; k++)
                if (ops[k].type == XS_WATCH && ops[k].path)
                    watch_del(ops[k].w);
            xb_unlock();
            return rc;
        }
    }
    irq_disable();
    batch.ops = ops;
    batch.first = first;
    batch.n = n;
    batch.got = 0;
    batch.active = 1;
    irq_enable();

    rc = xb_send(tx_buf, off, 0);
    if (!rc)
        waitq_wait(&waiters, batch_done, NULL, 0);

    irq_disable();
    batch.active = 0;
    irq_enable();
    for (int i = 0; i < n; i++) {
        struct xenbus_op *op = &ops[i];
        if (!op->done)
            op->rc = rc ? rc : -XEN_EIO;
        if (op->type == XS_WATCH && op->path) {
            if (op->rc)
                watch_del(op->w);
            else
                op->w->registered = 1;
        }
        if (!rc && op->rc < 0)
            rc = op->rc;
    }
    xb_unlock();
    return rc;
}

int xenbus_read(xenbus_transaction_t t, const char *path, char *buf, size_t size)
{
    struct xb_iov iov = { path, strlen(path) + 1 };
    size_t rlen;
    int rc = xb_talk(XS_READ, t, &iov, 1, &rlen, 0);

    if (rc)
        return rc;
    rc = xb_copy_reply(buf, size, rlen);
    return rc ? rc : (int)rlen;
}

int xenbus_read_ulong(xenbus_transaction_t t, const char *path, unsigned long *val)
{
    char buf[32];
    const char *end;
    int rc = xenbus_read(t, path, buf, sizeof(buf));

    if (rc < 0)
        return rc;
    if (!rc)
        return -XEN_EINVAL;
    *val = simple_strtoul(buf, &end, 10);
    return *end ? -XEN_EINVAL : 0;
}

int xenbus_write(xenbus_transaction_t t, const char *path, const char *value)
{
    struct xb_iov iov[2] = { { path, strlen(path) + 1 }, { value, strlen(value) } };
    return xb_simple(XS_WRITE, t, iov, 2);
}

int xenbus_printf(xenbus_transaction_t t, const char *path, const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(buf))
        return -XEN_E2BIG;
    return xenbus_write(t, path, buf);
}

int xenbus_mkdir(xenbus_transaction_t t, const char *path)
{
    struct xb_iov iov = { path, strlen(path) + 1 };
    return xb_simple(XS_MKDIR, t, &iov, 1);
}

int xenbus_rm(xenbus_transaction_t t, const char *path)
{
    struct xb_iov iov = { path, strlen(path) + 1 };
    return xb_simple(XS_RM, t, &iov, 1);
}

static int count_strings(const char *buf, size_t len)
{
    int n = 0;
    for (size_t i = 0; i < len; i++)
        if (!buf[i])
            n++;
    return n;
}

static int xb_list(uint32_t type, xenbus_transaction_t t, const char *path, char *buf,
                   size_t size)
{
    struct xb_iov iov = { path, strlen(path) + 1 };
    size_t rlen;
    int rc = xb_talk(type, t, &iov, 1, &rlen, 0);

    if (rc)
        return rc;
    rc = xb_copy_reply(buf, size, rlen);
    return rc ? rc : count_strings(buf, rlen);
}

int xenbus_directory(xenbus_transaction_t t, const char *path, char *buf, size_t size)
{
    return xb_list(XS_DIRECTORY, t, path, buf, size);
}

int xenbus_get_perms(xenbus_transaction_t t, const char *path, char *buf, size_t size)
{
    return xb_list(XS_GET_PERMS, t, path, buf, size);
}

int xenbus_set_perms(xenbus_transaction_t t, const char *path, const char *perms, size_t n)
{
    size_t len = 0;
    struct xb_iov iov[2];

    for (size_t i = 0; i < n; i++)
        len += strlen(perms + len) + 1;
    iov[0] = (struct xb_iov){ path, strlen(path) + 1 };
    iov[1] = (struct xb_iov){ perms, len };
    return xb_simple(XS_SET_PERMS, t, iov, 2);
}

int xenbus_set_perms_owner(xenbus_transaction_t t, const char *path, domid_t owner, char dflt)
{
    char perm[16];

    if (dflt != 'r' && dflt != 'w' && dflt != 'b' && dflt != 'n')
        return -XEN_EINVAL;
    snprintf(perm, sizeof(perm), "%c%u", dflt, owner);
    return xenbus_set_perms(t, path, perm, 1);
}

int xenbus_get_domain_path(domid_t dom, char *buf, size_t size)
{
    char id[8];
    struct xb_iov iov = { id, 0 };
    size_t rlen;
    int rc;

    snprintf(id, sizeof(id), "%u", dom);
    iov.len = strlen(id) + 1;
    rc = xb_talk(XS_GET_DOMAIN_PATH, XBT_NIL, &iov, 1, &rlen, 0);
    if (rc)
        return rc;
    /* The reply is NUL-terminated on the wire: don't count that. */
    if (rlen && !reply_buf[rlen - 1])
        rlen--;
    rc = xb_copy_reply(buf, size, rlen);
    return rc ? rc : (int)rlen;
}

int xenbus_self_domid(domid_t *dom)
{
    static int cached = -1;
    unsigned long v;
    int rc;

    if (cached >= 0) {
        *dom = (domid_t)cached;
        return 0;
    }
    rc = xenbus_read_ulong(XBT_NIL, "domid", &v);
    if (rc)
        return rc;
    if (v >= DOMID_SELF)
        return -XEN_EINVAL;
    cached = (int)v;
    *dom = (domid_t)v;
    return 0;
}

int xenbus_transaction_start(xenbus_transaction_t *t)
{
    struct xb_iov iov = { "", 1 };
    const char *end;
    size_t rlen;
    unsigned long id;
    int rc = xb_talk(XS_TRANSACTION_START, XBT_NIL, &iov, 1, &rlen, 0);

    if (rc)
        return rc;
    id = simple_strtoul(reply_buf, &end, 10);
    rc = (end == reply_buf || *end || id == 0 || id > 0xFFFFFFFFUL) ? -XEN_EIO : 0;
    xb_unlock();
    if (!rc)
        *t = (xenbus_transaction_t)id;
    return rc;
}

int xenbus_transaction_end(xenbus_transaction_t t, int abort)
{
    struct xb_iov iov = { abort ? "F" : "T", 2 };
    return xb_simple(XS_TRANSACTION_END, t, &iov, 1);
}

/* ---------------------------------------------------------------- */
/* Watches */

#define MAX_WATCHES 32
static struct xenbus_watch *watches[MAX_WATCHES];

static int watch_add(struct xenbus_watch *w)
{
    unsigned long flags = irq_save();
    int rc = -XEN_ENOSPC;

    for (int i = 0; i < MAX_WATCHES; i++) {
        if (watches[i] == w) {
            rc = -XEN_EEXIST;
            break;
        }
    }
    for (int i = 0; rc == -XEN_ENOSPC && i < MAX_WATCHES; i++) {
        if (!watches[i]) {
            watches[i] = w;
            rc = 0;
        }
    }
    irq_restore(flags);
    return rc;
}

static void watch_del(struct xenbus_watch *w)
{
    unsigned long flags = irq_save();
    for (int i = 0; i < MAX_WATCHES; i++)
        if (watches[i] == w)
            watches[i] = NULL;
    irq_restore(flags);
}

static struct xenbus_watch *watch_find(const char *token)
{
    for (int i = 0; i < MAX_WATCHES; i++)
        if (watches[i] && !strcmp(watches[i]->token, token))
            return watches[i];
    return NULL;
}

int xenbus_watch(struct xenbus_watch *w, const char *path, xenbus_watch_cb cb, void *data)
{
    struct xb_iov iov[2];
    size_t plen = strlen(path);
    int rc;

    if (plen >= sizeof(w->path))
        return -XEN_E2BIG;
    memcpy(w->path, path, plen + 1);
    snprintf(w->token, sizeof(w->token), "pyxen-%lu", ++token_seq);
    w->cb = cb;
    w->data = data;
    w->events = 0;
    w->registered = 0;
    /* Registered before asking, so the initial event finds it. */
    rc = watch_add(w);
    if (rc)
        return rc;
    iov[0] = (struct xb_iov){ w->path, plen + 1 };
    iov[1] = (struct xb_iov){ w->token, strlen(w->token) + 1 };
    rc = xb_simple(XS_WATCH, XBT_NIL, iov, 2);
    if (rc) {
        watch_del(w);
        return rc;
    }
    w->registered = 1;
    return 0;
}

int xenbus_unwatch(struct xenbus_watch *w)
{
    struct xb_iov iov[2] = {
        { w->path, strlen(w->path) + 1 }, { w->token, strlen(w->token) + 1 },
    };
    int rc = w->registered ? xb_simple(XS_UNWATCH, XBT_NIL, iov, 2) : 0;

    watch_del(w);
    w->registered = 0;
    return rc;
}

struct watch_wait_arg {
    struct xenbus_watch *w;
    unsigned long seen;
};

static int watch_changed(void *arg)
{
    struct watch_wait_arg *a = arg;
    return a->w->events != a->seen || xb_state != XB_READY;
}

int xenbus_watch_wait(struct xenbus_watch *w, unsigned long *seen, uint64_t deadline_ns)
{
    struct watch_wait_arg a = { w, *seen };

    if (!waitq_wait(&waiters, watch_changed, &a, deadline_ns) || w->events == *seen)
        return 0;
    *seen = w->events;
    return 1;
}

static int evq_nonempty(void *arg)
{
    (void)arg;
    return evq_head != evq_tail;
}

static void evq_copy_out(void *dst, uint32_t len)
{
    char *d = dst;
    for (uint32_t i = 0; i < len; i++)
        d[i] = evq[(evq_tail + i) % EVQ_SIZE];
    evq_tail += len;
}

/* Run one queued watch event (xenbus thread). */
static char ev_buf[XENSTORE_PAYLOAD_MAX + 1];

static void run_one_event(void)
{
    struct xenbus_watch *w;
    uint32_t len;
    size_t plen;
    const char *token;

    irq_disable();
    evq_copy_out(&len, sizeof(len));
    evq_copy_out(ev_buf, len);
    irq_enable();
    ev_buf[len] = '\0';
    /* "path\0token\0" */
    plen = strnlen(ev_buf, len);
    if (plen + 1 >= len) {
        printk("pyxen-guest: xenbus: malformed watch event (len %u)\n", len);
        return;
    }
    token = ev_buf + plen + 1;
    w = watch_find(token);
    if (!w)
        return;                         /* unwatched meanwhile */
    w->events++;
    waitq_wake_all(&waiters);
    if (w->cb)
        w->cb(w, ev_buf, w->data);
}

/* ---------------------------------------------------------------- */
/* control/shutdown (docs/misc/xenstore-paths: written by the toolstack,
 * acknowledged by the guest writing "" back) */

static struct xenbus_watch shutdown_watch;

static void shutdown_changed(struct xenbus_watch *w, const char *path, void *data)
{
    char req[32];
    xenbus_transaction_t t;
    int known, rc;

    (void)w; (void)path; (void)data;
    /* Most events find nothing asked (the watch's first event, our own
     * clearing write, a resume's new watch): one plain read says so, where
     * the transaction below costs three round trips that a resumed domain's
     * drivers would wait behind.  A suspend is acknowledged by clearing the
     * node with a plain write: two round trips from the request to the
     * suspend instead of four (a migration's downtime starts there). */
    rc = xenbus_read(XBT_NIL, "control/shutdown", req, sizeof(req));
    if (rc <= 0)
        return;
    if (!strcmp(req, "suspend") && !xenbus_write(XBT_NIL, "control/shutdown", "")) {
        kernel_suspend();               /* returns: cancelled, or resumed after restore */
        return;
    }
again:
    rc = xenbus_transaction_start(&t);
    if (rc) {
        printk("pyxen-guest: control/shutdown: transaction_start: %s\n", xenbus_strerror(rc));
        return;
    }
    rc = xenbus_read(t, "control/shutdown", req, sizeof(req));
    if (rc <= 0) {                      /* missing or empty: nothing asked */
        xenbus_transaction_end(t, 1);
        return;
    }
    known = !strcmp(req, "poweroff") || !strcmp(req, "halt") || !strcmp(req, "reboot") ||
            !strcmp(req, "suspend");
    /* Only acknowledge what we are going to do. */
    if (known)
        xenbus_write(t, "control/shutdown", "");
    rc = xenbus_transaction_end(t, 0);
    if (rc == -XEN_EAGAIN)
        goto again;
    if (!known) {
        printk("pyxen-guest: control/shutdown: ignoring '%s'\n", req);
        return;
    }
    if (!strcmp(req, "suspend")) {
        kernel_suspend();               /* returns: cancelled, or resumed after restore */
        return;
    }
    if (!strcmp(req, "reboot")) {
        printk("pyxen-guest: control/shutdown: reboot\n");
        xen_shutdown(SHUTDOWN_reboot);
    }
    printk("pyxen-guest: control/shutdown: %s, powering off\n", req);
    xen_shutdown(SHUTDOWN_poweroff);
}

/* ---------------------------------------------------------------- */

static void xenbus_thread(void *arg)
{
    static const char *const features[] = {
        "control/feature-poweroff", "control/feature-reboot", "control/feature-suspend",
    };
    size_t rlen;
    int rc;

    (void)arg;
    /* The probe: the first request, with a deadline. */
    {
        struct xb_iov iov[2] = {
            { features[0], strlen(features[0]) + 1 }, { "1", 1 },
        };
        rc = xb_talk(XS_WRITE, XBT_NIL, iov, 2, &rlen, monotonic_ns() + PROBE_TIMEOUT_NS);
        if (rc == 0)
            xb_unlock();
    }
    if (rc == -XEN_ETIMEDOUT || rc == -XEN_EIO) {
        mask_evtchn(store_port);
        xb_state = XB_ABSENT;
        waitq_wake_all(&waiters);
        printk("pyxen-guest: no xenstore\n");
        return;
    }
    xb_state = XB_READY;
    waitq_wake_all(&waiters);
    if (rc)
        printk("pyxen-guest: xenbus: %s: %s\n", features[0], xenbus_strerror(rc));
    for (size_t i = 1; i < ARRAY_SIZE(features); i++) {
        rc = xenbus_write(XBT_NIL, features[i], "1");
        if (rc)
            printk("pyxen-guest: xenbus: %s: %s\n", features[i], xenbus_strerror(rc));
    }
    rc = xenbus_watch(&shutdown_watch, "control/shutdown", shutdown_changed, NULL);
    if (rc)
        printk("pyxen-guest: xenbus: watch control/shutdown: %s\n", xenbus_strerror(rc));
    printk("pyxen-guest: xenbus: store ready (port %u), watching control/shutdown\n",
           store_port);

    for (;;) {
        waitq_wait(&waiters, evq_nonempty, NULL, 0);
        run_one_event();
    }
}

static int probe_done(void *arg)
{
    (void)arg;
    return xb_state != XB_PROBING;
}

int xenbus_available(void)
{
    waitq_wait(&waiters, probe_done, NULL, 0);
    return xb_state == XB_READY;
}

void xenbus_init(void)
{
    unsigned long mfn = start_info->store_mfn, pfn;
    evtchn_port_t port = start_info->store_evtchn;

    if (!mfn || !port) {
        printk("pyxen-guest: no xenstore\n");
        return;
    }
    pfn = mfn_to_pfn(mfn);
    if (pfn >= nr_pages || pfn_to_mfn(pfn) != mfn) {
        printk("pyxen-guest: xenstore mfn 0x%lx has bad m2p entry 0x%lx\n", mfn, pfn);
        printk("pyxen-guest: no xenstore\n");
        return;
    }
    ring = pfn_to_virt(pfn);
    store_port = port;
    xb_state = XB_PROBING;
    if (bind_evtchn(store_port, xb_event, NULL) < 0) {
        xb_state = XB_ABSENT;
        printk("pyxen-guest: no xenstore\n");
        return;
    }
    xenbus_thread_ptr = create_thread("xenbus", xenbus_thread, NULL);
    if (!xenbus_thread_ptr) {
        mask_evtchn(store_port);
        xb_state = XB_ABSENT;
        printk("pyxen-guest: no xenstore\n");
    }
}

/*
 * A restored domain (main.c kernel_suspend, in the xenbus thread, with no
 * request outstanding): the store has a new event channel, and the
 * xenstored on the other end knows nothing of our watches, as after Linux's
 * xs_resume: bind the new port, forget any partial message, register every
 * watch again (each fires once, as a new watch does) and write our
 * features again (the new domain's directory is fresh).
 */
void xenbus_resume(void)
{
    static const char *const features[] = {
        "control/feature-poweroff", "control/feature-reboot", "control/feature-suspend",
    };
    static struct xenbus_op ops[MAX_WATCHES + ARRAY_SIZE(features)];
    int rc, n;

    if (xb_state != XB_READY && xb_state != XB_PROBING)
        return;
    store_port = start_info->store_evtchn;
    rx_got = 0;
    if (bind_evtchn(store_port, xb_event, NULL) < 0) {
        xb_broken("cannot bind the store's channel after resume");
        return;
    }
    if (xb_state == XB_PROBING) {
        notify_remote_via_evtchn(store_port);   /* anything already in the ring */
        return;                             /* the probe goes on, on the new port */
    }
    /* Drivers told of the resume (netfront_resume) reconnect first: their
     * round trips are the network's downtime, ours below are not (and their
     * first request tells the store to look at the ring, as this would). */
    schedule();
    notify_remote_via_evtchn(store_port);   /* anything already in the ring */
    /* Every watch and feature in one round trip (xenbus_batch): a migrated
     * domain's drivers wait for these watches' first events to reconnect. */
    n = 0;
    for (int i = 0; i < MAX_WATCHES; i++)
        if (watches[i] && watches[i]->registered)
            ops[n++] = (struct xenbus_op){ .type = XS_WATCH, .w = watches[i] };
    for (size_t i = 0; i < ARRAY_SIZE(features); i++)
        ops[n++] = (struct xenbus_op){ .type = XS_WRITE, .path = features[i], .value = "1" };
    rc = xenbus_batch(XBT_NIL, ops, n);
    if (rc == -XEN_E2BIG) {             /* too many for one message buffer: one at a time */
        for (int i = 0; i < n; i++)
            xenbus_batch(XBT_NIL, &ops[i], 1);
    }
    for (int i = 0; i < n; i++)
        if (ops[i].rc)
            printk("pyxen-guest: xenbus: resume: %s %s: %s\n",
                   ops[i].type == XS_WATCH ? "watch" : "write",
                   ops[i].type == XS_WATCH ? ops[i].w->path : ops[i].path,
                   xenbus_strerror(ops[i].rc));
    printk("pyxen-guest: xenbus: reconnected (port %u)\n", store_port);
    gnttab_resume_report();
}
