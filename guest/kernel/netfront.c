/*
 * netfront.c - virtual network interface frontend (io/netif.h over
 * io/ring.h), single-slot frames, one queue, one event channel.
 *
 * Threads and contexts:
 *   - The rings are touched only with events masked (irq_save()), from the
 *     threads that send and receive.  The event handler does nothing but
 *     count and wake them: frames are taken off the RX ring by the thread
 *     that asked for one, in its own context.
 *   - A device thread ("netfront") runs the XenBus state machine; watch
 *     callbacks only kick it.  It does all xenbus calls, grants and ring
 *     setup/teardown.
 *
 * Event suppression follows io/ring.h: requests are pushed with
 * RING_PUSH_REQUESTS_AND_CHECK_NOTIFY (the backend's req_event says whether
 * it sleeps), and a receiver that finds the RX ring empty sets rsp_event to
 * one past what it consumed, then looks again before it sleeps
 * (RING_FINAL_CHECK_FOR_RESPONSES).  TX responses are collected lazily when
 * a buffer is needed; only a sender that runs out of buffers asks for a TX
 * event.
 */
#include "netfront.h"
#include "blkfront.h"           /* enum xenbus_state, xenbus_state_name */
#include "events.h"
#include "hypercall.h"
#include "mm.h"
#include "sched.h"
#include "xenbus.h"
#include "xenbus_front.h"
#include "xtime.h"

#define NTX 128U                /* TX buffers (pages) = TX requests in flight */
#define NRX 128U                /* RX buffers posted to the backend */
#define RX_PUSH_BATCH 32U       /* reposted buffers published together while busy */

_Static_assert(NTX <= NET_TX_RING_SIZE && NRX <= NET_RX_RING_SIZE, "buffers fit the rings");

static struct waitq waiters = { .name = "netfront", .poll_when_full = 1 };

struct buf {
    void *va;
    grant_ref_t ref;
    int granted;
};

struct netfront_dev {
    int used;
    unsigned int devid;
    char tag[24];               /* "netfront: vif<devid>": log prefix */
    char node[40];              /* "device/vif/<devid>" */
    char backend[128];
    domid_t backend_id;
    uint8_t mac[6];

    /* state machine (device thread) */
    int fe_state, be_state;
    int fatal, gone;
    struct thread *thread;
    struct xenbus_watch fe_watch, be_watch;
    int be_watch_on;
    struct xenbus_front_kick kick;  /* watches and events -> device thread */

    volatile int resumed;       /* restored elsewhere (netfront_resume): reconnect at once */
    volatile int reconnecting;  /* from netfront_resume to fast_reconnect's end */
    int early;                  /* our keys published, the backend not yet seen Connected */

    /* rings (events masked) */
    volatile int connected;     /* both ends Connected (or early): the rings may be used */
    struct netif_tx_sring *tx;
    struct netif_rx_sring *rx;
    grant_ref_t tx_ref, rx_ref;
    int port;
    uint32_t tx_prod_pvt, tx_cons;
    uint32_t rx_prod_pvt, rx_cons;
    struct buf txb[NTX], rxb[NRX];
    uint16_t tx_free[NTX];
    unsigned int ntx_free;
    uint8_t tx_busy[NTX];       /* on the ring, no response yet */
    uint8_t rx_posted[NRX];     /* on the ring, no response yet */
    int rx_skip;                /* dropping the rest of a multi-slot frame */

    struct netfront_stats st;
    unsigned int bad_printed;
};

#define MAX_DEVS 2
static struct netfront_dev devs[MAX_DEVS];

/* ---------------------------------------------------------------- */

int netfront_parse_mac(const char *s, uint8_t mac[6])
{
    for (int i = 0; i < 6; i++) {
        unsigned int v = 0;
        for (int k = 0; k < 2; k++) {
            char c = *s++;
            v <<= 4;
            if (c >= '0' && c <= '9')
                v |= (unsigned int)(c - '0');
            else if (c >= 'a' && c <= 'f')
                v |= (unsigned int)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                v |= (unsigned int)(c - 'A' + 10);
            else
                return -XEN_EINVAL;
        }
        mac[i] = (uint8_t)v;
        if (i < 5 && *s++ != ':')
            return -XEN_EINVAL;
    }
    return *s ? -XEN_EINVAL : 0;
}

static void bad(struct netfront_dev *d, const char *fmt, ...) __printf(2, 3);
static void bad(struct netfront_dev *d, const char *fmt, ...)
{
    va_list ap;

    d->st.rx_errors++;
    if (d->bad_printed >= 10)
        return;
    d->bad_printed++;
    va_start(ap, fmt);
    printk("netfront: vif%u: ", d->devid);
    vprintk(fmt, ap);
    va_end(ap);
}

/* ---------------------------------------------------------------- */
/* Rings (events masked) */

/* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY on either ring (they share the header layout). */
static void push_ring(struct netfront_dev *d, volatile uint32_t *req_prod,
                      volatile uint32_t *req_event, uint32_t newp)
{
    uint32_t old = *req_prod;

    wmb();
    *req_prod = newp;
    mb();
    if ((uint32_t)(newp - *req_event) < (uint32_t)(newp - old)) {
        d->st.notifies++;
        notify_remote_via_evtchn((evtchn_port_t)d->port);
    }
}

static void push_tx(struct netfront_dev *d)
{
    push_ring(d, &d->tx->req_prod, &d->tx->req_event, d->tx_prod_pvt);
}

static void push_rx(struct netfront_dev *d)
{
    push_ring(d, &d->rx->req_prod, &d->rx->req_event, d->rx_prod_pvt);
}

static void post_rx(struct netfront_dev *d, uint16_t id)
{
    struct netif_rx_request *req = &d->rx->ring[d->rx_prod_pvt % NET_RX_RING_SIZE].req;

    req->id = id;
    req->pad = 0;
    req->gref = d->rxb[id].ref;
    d->rx_posted[id] = 1;
    d->rx_prod_pvt++;
}

/* Take TX responses: their buffers are free again. */
static void tx_gc(struct netfront_dev *d)
{
    uint32_t prod = READ_ONCE(d->tx->rsp_prod);

    rmb();
    if ((uint32_t)(prod - d->tx_cons) > (uint32_t)(d->tx_prod_pvt - d->tx_cons)) {
        bad(d, "TX response producer %u runs ahead of our requests (%u..%u): ring unusable\n",
            prod, d->tx_cons, d->tx_prod_pvt);
        d->connected = 0;       /* until the backend starts over */
        return;
    }
    while (d->tx_cons != prod) {
        struct netif_tx_response rsp = d->tx->ring[d->tx_cons % NET_TX_RING_SIZE].rsp;
        d->tx_cons++;
        if (rsp.status == NETIF_RSP_NULL)
            continue;           /* an extra's slot: we send none */
        if (rsp.id >= NTX || !d->tx_busy[rsp.id]) {
            bad(d, "TX response for id %u we have not sent\n", rsp.id);
            continue;
        }
        d->tx_busy[rsp.id] = 0;
        d->tx_free[d->ntx_free++] = rsp.id;
        if (rsp.status != NETIF_RSP_OKAY)
            d->st.tx_errors++;
    }
}

static void net_event(evtchn_port_t port, struct pt_regs *regs, void *data)
{
    struct netfront_dev *d = data;

    (void)regs;
    if ((int)port != d->port)
        return;
    d->st.events++;
    waitq_wake_all(&waiters);
}

/* ---------------------------------------------------------------- */
/* Xenstore helpers (device thread) */

/* The backend's key, the frontend's node (helpers in xenbus_front.c). */
#define be_read(d, key, buf, size) xenbus_node_read((d)->backend, key, buf, size)
#define fe_printf(d, t, ...) xenbus_node_printf(t, (d)->node, __VA_ARGS__)

static int read_be_state(struct netfront_dev *d)
{
    return xenbus_node_state(d->backend, XenbusStateUnknown);
}

static int switch_state(struct netfront_dev *d, int state)
{
    int rc = xenbus_front_switch(d->tag, d->node, &d->fe_state, state);

    waitq_wake_all(&waiters);
    return rc;
}

/* ---------------------------------------------------------------- */
/* Setup and teardown (device thread) */

/* End a grant; a page the backend still holds is handed to the deferred list. */
static void end_grant(struct buf *b)
{
    if (!b->granted)
        return;
    if (gnttab_end_access(b->ref) == -XEN_EBUSY) {
        xenbus_front_defer_end(b->ref, b->va);
        b->va = NULL;           /* never reused by us */
    }
    b->granted = 0;
}

/*
 * EVTCHNOP_status: is our port still a channel to the backend's domain?  A
 * restored domain's channels were all closed, and the number may since have
 * been given to another binding, which a close would break.
 */
struct nf_evtchn_status {
    domid_t dom;
    evtchn_port_t port;
    uint32_t status;            /* OUT: EVTCHNSTAT_* */
    uint32_t vcpu;
    union { struct { domid_t dom; } unbound; struct { domid_t dom; evtchn_port_t port; } interdomain;
            uint32_t virq; } u;
};
_Static_assert(sizeof(struct nf_evtchn_status) == 24, "evtchn_status size");
_Static_assert(offsetof(struct nf_evtchn_status, status) == 8, "evtchn_status.status");
_Static_assert(offsetof(struct nf_evtchn_status, u) == 16, "evtchn_status.u");
#define NF_EVTCHNSTAT_unbound     1
#define NF_EVTCHNSTAT_interdomain 2

static int port_still_ours(struct netfront_dev *d)
{
    struct nf_evtchn_status st = { .dom = DOMID_SELF, .port = (evtchn_port_t)d->port };

    if (HYPERVISOR_event_channel_op(EVTCHNOP_status, &st))
        return 0;
    if (st.status == NF_EVTCHNSTAT_unbound)
        return st.u.unbound.dom == d->backend_id;
    if (st.status == NF_EVTCHNSTAT_interdomain)
        return st.u.interdomain.dom == d->backend_id;
    return 0;
}

/*
 * Has our channel been reset under us?  A restored domain starts with every
 * port closed and masked (events_resume), while a port of ours is unmasked
 * from its binding on: a set mask bit, one memory read, says the ring is
 * the old domain's.  Checked before every use of the rings, so nothing is
 * put on a dead ring between the restore and the device thread's reconnect.
 */
static int channel_reset(struct netfront_dev *d)
{
    const unsigned long *mask = HYPERVISOR_shared_info->evtchn_mask;
    unsigned int bits = 8 * sizeof(unsigned long), p = (unsigned int)d->port;

    return d->port < 0 || (READ_ONCE(mask[p / bits]) >> (p % bits)) & 1;
}

/* Events masked: the ring is unusable; let the device thread find out why. */
static void lose_connection(struct netfront_dev *d)
{
    d->connected = 0;
    xenbus_front_kick(&d->kick);
}

/*
 * Take the connection down.  lost: the channel is already gone (a restored
 * domain's channels are all closed, and its port number may since belong to
 * another binding): forget it without closing it.  A restored domain's grant
 * table is a new, empty one, so ending the old grants just frees the refs.
 */
static void teardown(struct netfront_dev *d, int lost)
{
    unsigned long flags = irq_save();

    d->connected = 0;
    d->early = 0;
    if (d->port >= 0) {
        if (!lost && port_still_ours(d))
            close_evtchn((evtchn_port_t)d->port);
        d->port = -1;
    }
    irq_restore(flags);
    if (d->tx)
        xenbus_front_end_ring(d->tx, 1, &d->tx_ref);
    if (d->rx)
        xenbus_front_end_ring(d->rx, 1, &d->rx_ref);
    d->tx = NULL;
    d->rx = NULL;
    for (unsigned int i = 0; i < NTX; i++)
        end_grant(&d->txb[i]);
    for (unsigned int i = 0; i < NRX; i++)
        end_grant(&d->rxb[i]);
    waitq_wake_all(&waiters);
}

static int grant_buf(struct netfront_dev *d, struct buf *b, int readonly)
{
    int r;

    if (!b->va) {
        b->va = alloc_page();
        if (!b->va)
            return -XEN_ENOMEM;
    }
    r = gnttab_grant_page(d->backend_id, b->va, readonly);
    if (r < 0)
        return r;
    b->ref = (grant_ref_t)r;
    b->granted = 1;
    return 0;
}

/*
 * The frontend's keys, then state Connected, in one round trip to the store
 * (xenbus_batch, after the caller's own ops[0..n-1]): the store answers a
 * connection's requests in order, so the backend, which acts when our state
 * node changes, finds every key written by then, as a transaction would
 * give it (a transaction would cost two more round trips: its start, and a
 * commit that the writes cannot share with the start).  ops has room for
 * n + PUBLISH_OPS.  0, or the first failed op's -errno.
 */
#define PUBLISH_OPS 9
static int publish_connected(struct netfront_dev *d, struct xenbus_op *ops, int n)
{
    static const char *const keys[PUBLISH_OPS] = {
        "tx-ring-ref", "rx-ring-ref", "event-channel", "request-rx-copy", "feature-rx-notify",
        "feature-no-csum-offload", "feature-sg", "feature-gso-tcpv4", "state",
    };
    char vals[PUBLISH_OPS][16], paths[PUBLISH_OPS][64];
    int rc;

    snprintf(vals[0], sizeof(vals[0]), "%u", d->tx_ref);
    snprintf(vals[1], sizeof(vals[1]), "%u", d->rx_ref);
    snprintf(vals[2], sizeof(vals[2]), "%d", d->port);
    snprintf(vals[3], sizeof(vals[3]), "1");
    snprintf(vals[4], sizeof(vals[4]), "1");
    snprintf(vals[5], sizeof(vals[5]), "1");
    snprintf(vals[6], sizeof(vals[6]), "0");
    snprintf(vals[7], sizeof(vals[7]), "0");
    snprintf(vals[8], sizeof(vals[8]), "%d", XenbusStateConnected);
    for (int i = 0; i < PUBLISH_OPS; i++) {
        snprintf(paths[i], sizeof(paths[i]), "%s/%s", d->node, keys[i]);
        ops[n + i] = (struct xenbus_op){ .type = XS_WRITE, .path = paths[i], .value = vals[i] };
    }
    xenbus_batch(XBT_NIL, ops, n + PUBLISH_OPS);
    rc = 0;
    for (int i = n; i < n + PUBLISH_OPS && !rc; i++)
        rc = ops[i].rc;
    if (rc)
        return rc;
    d->fe_state = XenbusStateConnected;
    waitq_wake_all(&waiters);
    return 0;
}

/* Rings, buffers and channel, the RX buffers posted; on failure all undone. */
static int setup_rings(struct netfront_dev *d)
{
    unsigned long flags;
    int rc, port;

    d->tx = alloc_page();
    d->rx = alloc_page();
    if (!d->tx || !d->rx) {
        rc = -XEN_ENOMEM;
        goto fail_tx;
    }
    memset(d->tx, 0, PAGE_SIZE);
    memset(d->rx, 0, PAGE_SIZE);
    /* SHARED_RING_INIT / FRONT_RING_INIT */
    d->tx->req_event = d->tx->rsp_event = 1;
    d->rx->req_event = d->rx->rsp_event = 1;
    d->tx_prod_pvt = d->tx_cons = 0;
    d->rx_prod_pvt = d->rx_cons = 0;
    d->rx_skip = 0;
    rc = gnttab_grant_page(d->backend_id, d->tx, 0);
    if (rc < 0)
        goto fail_tx;
    d->tx_ref = (grant_ref_t)rc;
    rc = gnttab_grant_page(d->backend_id, d->rx, 0);
    if (rc < 0) {
        gnttab_end_access(d->tx_ref);
        goto fail_tx;
    }
    d->rx_ref = (grant_ref_t)rc;
    for (unsigned int i = 0; i < NTX; i++) {
        rc = grant_buf(d, &d->txb[i], 1);
        if (rc)
            goto fail;
        d->tx_free[i] = (uint16_t)(NTX - 1 - i);
        d->tx_busy[i] = 0;
    }
    d->ntx_free = NTX;
    for (unsigned int i = 0; i < NRX; i++) {
        rc = grant_buf(d, &d->rxb[i], 0);
        if (rc)
            goto fail;
    }
    port = evtchn_alloc_unbound(d->backend_id, net_event, d);
    if (port < 0) {
        rc = port;
        goto fail;
    }
    d->port = port;
    /* The RX buffers go on the ring now: the backend takes them when it connects. */
    flags = irq_save();
    for (unsigned int i = 0; i < NRX; i++)
        post_rx(d, (uint16_t)i);
    wmb();
    d->rx->req_prod = d->rx_prod_pvt;
    irq_restore(flags);

    return 0;

fail_tx:
    if (d->tx)
        free_pages(d->tx, 1);
    if (d->rx)
        free_pages(d->rx, 1);
    d->tx = NULL;
    d->rx = NULL;
fail:
    printk("netfront: vif%u: connecting: %s (%d)\n", d->devid, xenbus_strerror(rc), rc);
    teardown(d, 0);
    return rc;
}

/* Rings, buffers and channel; keys and Connected in one round trip. */
static int talk_to_backend(struct netfront_dev *d)
{
    struct xenbus_op ops[PUBLISH_OPS];
    int rc = setup_rings(d);

    if (rc)
        return rc;
    rc = publish_connected(d, ops, 0);
    if (rc) {
        printk("netfront: vif%u: connecting: %s (%d)\n", d->devid, xenbus_strerror(rc), rc);
        teardown(d, 0);
        return rc;
    }
    printk("netfront: vif%u: tx-ring-ref %u rx-ring-ref %u event-channel %d, Connected\n",
           d->devid, d->tx_ref, d->rx_ref, d->port);
    return 0;
}

static int watch_backend(struct netfront_dev *d)
{
    return xenbus_front_watch_backend(d->tag, &d->be_watch, &d->be_watch_on, d->backend,
                                      xenbus_front_kick_cb, &d->kick);
}

/* backend, backend-id and mac from the frontend directory: 0, or -errno
 * (-XEN_ENOENT: the device is not there). */
static int read_frontend(struct netfront_dev *d, int *changed)
{
    char buf[128];
    uint8_t mac[6];
    int rc;

    rc = xenbus_front_read_backend(d->node, d->backend, sizeof(d->backend), &d->backend_id,
                                   changed);
    if (rc < 0)
        return rc;
    rc = xenbus_node_read(d->node, "mac", buf, sizeof(buf));
    if (rc < 0)
        return rc;
    if (netfront_parse_mac(buf, mac)) {
        printk("netfront: vif%u: mac '%s' is not a MAC\n", d->devid, buf);
        return -XEN_EINVAL;
    }
    memcpy(d->mac, mac, 6);
    return 0;
}

/* Our state node as the store has it (the toolstack may have reset it). */
static int read_fe_store_state(struct netfront_dev *d)
{
    return xenbus_node_state(d->node, XenbusStateUnknown);
}

/*
 * This domain was restored (a migration's destination, or pyxen restore):
 * the old rings, grants and channel went with the old domain, and the
 * toolstack wrote our device afresh (a new backend path, our state
 * Initialising, the backend's InitWait written before we were unpaused).
 * The network is down until the backend serves our new rings, so what
 * precedes the write of our state is only what the backend reads when it
 * sees it (netif.h, Linux netfront's talk_to_netback): the rings granted,
 * the channel allocated, the RX buffers posted, the keys.  All of it is
 * ours to make without asking the store, but for the backend's domain (the
 * grants name it): the one we had, which a restore keeps (the toolstack's
 * backends are in domain 0), checked in the same round trip.  So:
 *
 *   1. rings, buffers and channel, granted to the old backend-id, then the
 *      rings are used at once ("early": netif.h lets a frontend queue
 *      requests before the backend connects, which serves them when it maps
 *      the rings: a heartbeat sent now leaves at the backend's connect);
 *   2. one round trip: backend, backend-id and mac read, then the keys and
 *      state Connected written (the store answers in order: a backend woken
 *      by our state finds the keys);
 *   3. off the network's path: the watch moved to the new backend's state
 *      and that state read, in one more round trip.
 *
 * A backend-id that changed (the grants name the wrong domain), a device
 * gone, or a failed write undo it all (our nodes written for a device that
 * is not there are removed).  0, or -errno: the caller then goes the
 * ordinary way (the watches drive it).
 */
static int fast_reconnect(struct netfront_dev *d)
{
    char paths[3][64], bes_path[160], be[128], beid[16], mac[24], bes[16];
    struct xenbus_op ops[PUBLISH_OPS + 3];
    uint8_t m[6];
    int rc, n, state, changed, watch;
    unsigned long flags;

    teardown(d, 1);
    d->fe_state = XenbusStateInitialising;
    d->fatal = 0;
    d->early = 0;
    rc = setup_rings(d);
    if (rc) {
        d->fatal = 1;
        return 0;               /* (setup_rings said why) */
    }
    flags = irq_save();
    d->early = 1;
    d->connected = 1;           /* queue on the new rings from now on */
    irq_restore(flags);
    waitq_wake_all(&waiters);

    snprintf(paths[0], sizeof(paths[0]), "%s/backend", d->node);
    snprintf(paths[1], sizeof(paths[1]), "%s/backend-id", d->node);
    snprintf(paths[2], sizeof(paths[2]), "%s/mac", d->node);
    be[0] = beid[0] = mac[0] = '\0';
    ops[0] = (struct xenbus_op){ .type = XS_READ, .path = paths[0], .out = be, .size = sizeof(be) };
    ops[1] = (struct xenbus_op){ .type = XS_READ, .path = paths[1], .out = beid, .size = sizeof(beid) };
    ops[2] = (struct xenbus_op){ .type = XS_READ, .path = paths[2], .out = mac, .size = sizeof(mac) };
    rc = publish_connected(d, ops, 3);
    if (ops[0].rc == -XEN_ENOENT) {
        /* no device (any more): what we just wrote made nodes of it */
        xenbus_rm(XBT_NIL, d->node);
        rc = -XEN_ENOENT;
    } else if (!rc && (netfront_parse_mac(mac, m) || !be[0] || !beid[0])) {
        rc = -XEN_EINVAL;
    } else if (!rc && (domid_t)simple_strtoul(beid, NULL, 10) != d->backend_id) {
        rc = -XEN_EAGAIN;       /* granted to the wrong domain: the ordinary way */
    }
    if (rc) {
        printk("netfront: vif%u: connecting: %s (%d)\n", d->devid, xenbus_strerror(rc), rc);
        teardown(d, 0);
        d->fe_state = XenbusStateInitialising;
        return rc;
    }
    /* A sender woken by the early connection (a heartbeat that came due
     * while we were away) queues now, while the backend reads our keys,
     * rather than after our next round trip. */
    schedule();
    memcpy(d->mac, m, 6);
    changed = strcmp(be, d->backend) != 0;
    strncpy_z(d->backend, be, sizeof(d->backend));

    snprintf(bes_path, sizeof(bes_path), "%s/state", d->backend);
    n = 0;
    if (changed || !d->be_watch_on) {
        if (d->be_watch_on)
            ops[n++] = (struct xenbus_op){ .type = XS_UNWATCH, .w = &d->be_watch };
        d->be_watch.cb = xenbus_front_kick_cb;
        d->be_watch.data = &d->kick;
        ops[n++] = (struct xenbus_op){ .type = XS_WATCH, .path = bes_path, .w = &d->be_watch };
        d->be_watch_on = 0;
    }
    watch = n;
    ops[n++] = (struct xenbus_op){ .type = XS_READ, .path = bes_path, .out = bes, .size = sizeof(bes) };
    xenbus_batch(XBT_NIL, ops, n);
    if (watch && !ops[watch - 1].rc)
        d->be_watch_on = 1;
    printk("netfront: vif%u: tx-ring-ref %u rx-ring-ref %u event-channel %d, Connected (resumed)\n",
           d->devid, d->tx_ref, d->rx_ref, d->port);
    state = ops[watch].rc >= 0 ? (int)simple_strtoul(bes, NULL, 10) : XenbusStateUnknown;
    if (state != d->be_state) {
        printk("netfront: vif%u: backend %s (frontend %s)\n", d->devid, xenbus_state_name(state),
               xenbus_state_name(XenbusStateConnected));
        d->be_state = state;
    }
    return 0;
}

static void step(struct netfront_dev *d)
{
    int be, fe, changed, rc, store;

    if (d->resumed) {
        d->resumed = 0;
        rc = fast_reconnect(d);
        d->reconnecting = 0;
        waitq_wake_all(&waiters);
        if (!rc)
            return;
        printk("netfront: vif%u: fast reconnect: %s (%d): the ordinary way\n", d->devid,
               xenbus_strerror(rc), rc);
    }

    rc = read_frontend(d, &changed);
    if (rc == -XEN_ENOENT) {
        if (!d->gone) {
            printk("netfront: vif%u: device removed\n", d->devid);
            teardown(d, 0);
            d->gone = 1;
            d->fe_state = d->be_state = XenbusStateUnknown;
            d->backend[0] = '\0';
            if (d->be_watch_on) {
                xenbus_unwatch(&d->be_watch);
                d->be_watch_on = 0;
            }
        }
        return;
    }
    if (rc < 0)
        return;
    store = read_fe_store_state(d);
    if (d->gone) {
        printk("netfront: vif%u: device is back, backend %s\n", d->devid, d->backend);
        d->gone = 0;
        d->fatal = 0;
        d->fe_state = store;
        changed = 1;
    } else if (store == XenbusStateInitialising && d->fe_state != XenbusStateInitialising &&
               (d->tx || d->connected)) {
        /* The toolstack wrote the device afresh under us: this domain was
         * restored (or the device re-created); the old rings, grants and
         * channel are gone with the old domain. */
        printk("netfront: vif%u: frontend reset to Initialising (restored?): reconnecting\n",
               d->devid);
        teardown(d, 1);
        d->fe_state = XenbusStateInitialising;
        d->fatal = 0;
    }
    if (d->tx && !d->gone && channel_reset(d)) {
        printk("netfront: vif%u: our channel was reset (restored domain): reconnecting\n",
               d->devid);
        teardown(d, 1);
        if (d->fe_state != XenbusStateInitialising && store != XenbusStateInitialising)
            switch_state(d, XenbusStateInitialising);
        d->fe_state = XenbusStateInitialising;
        d->fatal = 0;
    }
    if (changed || !d->be_watch_on) {
        d->be_state = -1;
        watch_backend(d);
    }
    be = read_be_state(d);
    fe = d->fe_state;

    if (be != d->be_state) {
        printk("netfront: vif%u: backend %s (frontend %s)\n", d->devid, xenbus_state_name(be),
               xenbus_state_name(fe));
        d->be_state = be;
    }
    if (d->fatal)
        return;
    switch (be) {
    case XenbusStateInitWait:
    case XenbusStateInitialised:
        if (d->tx && fe == XenbusStateConnected)
            break;              /* published; waiting for the backend */
        if (d->tx)
            teardown(d, 0);
        if (fe != XenbusStateInitialising && fe != XenbusStateUnknown)
            switch_state(d, XenbusStateInitialising);
        if (talk_to_backend(d))
            d->fatal = 1;
        break;
    case XenbusStateConnected:
        if (d->tx && fe == XenbusStateConnected) {
            if (!d->connected || d->early) {
                d->early = 0;
                /* what was queued early is the backend's already; a notify in
                 * case it mapped the rings before the requests were pushed */
                if (d->port >= 0)
                    notify_remote_via_evtchn((evtchn_port_t)d->port);
                d->connected = 1;
                d->st.connects++;
                printk("netfront: vif%u: connected, mac %02x:%02x:%02x:%02x:%02x:%02x\n",
                       d->devid, d->mac[0], d->mac[1], d->mac[2], d->mac[3], d->mac[4],
                       d->mac[5]);
                waitq_wake_all(&waiters);
            }
        }
        break;
    case XenbusStateClosing:
    case XenbusStateClosed:
        /* As xenbus_frontend_closed: Closing (the backend lets go of the rings),
         * the grants ended (or deferred while it still holds them), Closed. */
        d->connected = 0;
        if (fe != XenbusStateClosed && fe != XenbusStateClosing)
            switch_state(d, XenbusStateClosing);
        if (d->tx)
            teardown(d, 0);
        if (fe != XenbusStateClosed)
            switch_state(d, XenbusStateClosed);
        break;
    default:                    /* Unknown (gone), Initialising, ... */
        if (d->tx || d->connected) {
            teardown(d, 0);
            switch_state(d, XenbusStateInitialising);
        }
        break;
    }
}

static void dev_thread(void *arg)
{
    struct netfront_dev *d = arg;
    struct xenbus_front_wait k = { &d->kick, 0, NULL };

    for (;;) {
        waitq_wait(&waiters, xenbus_front_kicked, &k,
                   xenbus_front_deferred() ? monotonic_ns() + 100 * NSEC_PER_MSEC : 0);
        if (k.seen != d->kick.kicks) {
            k.seen = d->kick.kicks;
            step(d);
        }
        if (xenbus_front_deferred())
            xenbus_front_retry_deferred();
    }
}

/* ---------------------------------------------------------------- */
/* API */

static int find_vif(int want, unsigned int *devid, uint64_t deadline)
{
    static struct xenbus_watch vif_watch;
    static char list[512];

    return xenbus_front_find("netfront", "device/vif", want, devid, deadline, &vif_watch, list,
                             sizeof(list));
}

static int is_connected(void *arg)
{
    struct netfront_dev *d = arg;
    return d->connected || d->fatal;
}

static int only_connected(void *arg)
{
    return ((struct netfront_dev *)arg)->connected;
}

static int connected_or_settled(void *arg)
{
    struct netfront_dev *d = arg;
    return d->connected || !d->reconnecting;
}

/* (A device whose connection failed may still come back: only the deadline ends this.) */
int netfront_wait_connected(struct netfront_dev *d, uint64_t deadline_ns)
{
    return waitq_wait(&waiters, only_connected, d, deadline_ns);
}

struct netfront_dev *netfront_open(int want, uint64_t timeout_ns, int *err)
{
    struct netfront_dev *d = NULL;
    uint64_t deadline = monotonic_ns() + (timeout_ns ? timeout_ns : 30 * NSEC_PER_SEC);
    char path[192], buf[128];
    unsigned int devid;
    int rc, changed;

    rc = xenbus_front_ready("netfront", "network interfaces");
    if (rc)
        goto out;
    rc = find_vif(want, &devid, deadline);
    if (rc) {
        printk("netfront: no virtual network interface under device/vif\n");
        goto out;
    }
    for (int i = 0; i < MAX_DEVS && !d; i++)
        if (!devs[i].used)
            d = &devs[i];
    if (!d) {
        rc = -XEN_ENOSPC;
        goto out;
    }
    memset(d, 0, sizeof(*d));
    d->used = 1;
    d->kick.wq = &waiters;
    d->devid = devid;
    d->port = -1;
    d->be_state = -1;
    snprintf(d->tag, sizeof(d->tag), "netfront: vif%u", devid);
    snprintf(d->node, sizeof(d->node), "device/vif/%u", devid);
    rc = xenbus_front_read_backend(d->node, d->backend, sizeof(d->backend), &d->backend_id,
                                   &changed);
    if (rc < 0)
        goto out_free;
    snprintf(path, sizeof(path), "%s/mac", d->node);
    rc = xenbus_read(XBT_NIL, path, buf, sizeof(buf));
    if (rc < 0 || netfront_parse_mac(buf, d->mac)) {
        printk("netfront: vif%u: no usable mac in %s\n", devid, path);
        rc = rc < 0 ? rc : -XEN_EINVAL;
        goto out_free;
    }
    d->fe_state = xenbus_node_state(d->node, XenbusStateUnknown);
    printk("netfront: vif%u: backend %s (dom %u), mac %02x:%02x:%02x:%02x:%02x:%02x\n", devid,
           d->backend, d->backend_id, d->mac[0], d->mac[1], d->mac[2], d->mac[3], d->mac[4],
           d->mac[5]);
    if (d->fe_state != XenbusStateInitialising)
        switch_state(d, XenbusStateInitialising);   /* a previous user's leftovers */
    rc = xenbus_watch(&d->fe_watch, d->node, xenbus_front_kick_cb, &d->kick);
    if (rc) {
        printk("netfront: vif%u: watch %s: %s\n", devid, d->node, xenbus_strerror(rc));
        goto out_free;
    }
    rc = watch_backend(d);
    if (rc) {
        xenbus_unwatch(&d->fe_watch);
        goto out_free;
    }
    xenbus_front_kick(&d->kick);
    d->thread = create_thread("netfront", dev_thread, d);
    if (!d->thread) {
        rc = -XEN_ENOMEM;
        goto out_free;
    }
    if (!waitq_wait(&waiters, is_connected, d, deadline) || !d->connected) {
        printk("netfront: vif%u: not connected (frontend %s, backend %s)\n", devid,
               xenbus_state_name(d->fe_state), xenbus_state_name(d->be_state));
        rc = -XEN_ENODEV;
        goto out;               /* the device thread stays: the backend may still come */
    }
    if (err)
        *err = 0;
    return d;

out_free:
    if (d->be_watch_on)
        xenbus_unwatch(&d->be_watch);
    d->used = 0;
out:
    if (err)
        *err = rc;
    return NULL;
}

/* The domain was restored (main.c kernel_suspend): each device thread
 * reconnects at once (fast_reconnect) instead of waiting for the watches. */
void netfront_resume(void)
{
    for (int i = 0; i < MAX_DEVS; i++) {
        struct netfront_dev *d = &devs[i];
        if (!d->used || !d->thread || d->gone)
            continue;
        d->reconnecting = 1;
        d->resumed = 1;
        xenbus_front_kick(&d->kick);
    }
}

const uint8_t *netfront_mac(struct netfront_dev *d) { return d->mac; }
int netfront_connected(struct netfront_dev *d) { return d->connected; }

void netfront_get_stats(struct netfront_dev *d, struct netfront_stats *st)
{
    unsigned long flags = irq_save();
    *st = d->st;
    irq_restore(flags);
}

static int tx_room(void *arg)
{
    struct netfront_dev *d = arg;

    if (!d->connected)
        return 1;
    tx_gc(d);
    return d->ntx_free > 0;
}

/* Events masked: are the rings usable?  (A reset channel is found here, see channel_reset.) */
static int rings_usable(struct netfront_dev *d)
{
    if (d->connected && channel_reset(d))
        lose_connection(d);
    return d->connected;
}

int netfront_xmit(struct netfront_dev *d, const void *frame, size_t len, uint64_t deadline_ns)
{
    struct netif_tx_request *req;
    unsigned long flags;
    uint16_t id;

    if (len < 14 || len > PAGE_SIZE)
        return -XEN_EINVAL;
    for (;;) {
        flags = irq_save();
        if (!rings_usable(d)) {
            irq_restore(flags);
            /* A restored domain reconnecting: a frame sent meanwhile (a
             * heartbeat) waits for the new ring, within the caller's deadline,
             * rather than being dropped. */
            if (d->reconnecting && deadline_ns && monotonic_ns() < deadline_ns &&
                waitq_wait(&waiters, connected_or_settled, d, deadline_ns) && d->connected)
                continue;
            return -XEN_ENODEV;
        }
        tx_gc(d);
        if (d->ntx_free)
            break;
        /* Ask for an event at the next response, then look once more. */
        WRITE_ONCE(d->tx->rsp_event, d->tx_cons + 1);
        mb();
        tx_gc(d);
        if (d->ntx_free)
            break;
        d->st.tx_full++;
        irq_restore(flags);
        if (!deadline_ns || monotonic_ns() >= deadline_ns ||
            !waitq_wait(&waiters, tx_room, d, deadline_ns))
            return -XEN_EAGAIN;
    }
    id = d->tx_free[--d->ntx_free];
    d->tx_busy[id] = 1;
    memcpy(d->txb[id].va, frame, len);
    req = &d->tx->ring[d->tx_prod_pvt % NET_TX_RING_SIZE].req;
    req->gref = d->txb[id].ref;
    req->offset = 0;
    req->flags = 0;             /* checksums complete, one slot */
    req->id = id;
    req->size = (uint16_t)len;
    d->tx_prod_pvt++;
    push_tx(d);
    d->st.tx_packets++;
    d->st.tx_bytes += len;
    irq_restore(flags);
    return 0;
}

/* Events masked.  One RX response: > 0 a frame copied, 0 none left, -1 one consumed and dropped. */
static int rx_one(struct netfront_dev *d, void *out, size_t size)
{
    struct netif_rx_response rsp;
    uint32_t prod = READ_ONCE(d->rx->rsp_prod);
    int n = -1;

    rmb();
    if (d->rx_cons == prod)
        return 0;
    if ((uint32_t)(prod - d->rx_cons) > (uint32_t)(d->rx_prod_pvt - d->rx_cons)) {
        bad(d, "RX response producer %u runs ahead of our requests (%u..%u): ring unusable\n",
            prod, d->rx_cons, d->rx_prod_pvt);
        d->connected = 0;       /* until the backend starts over */
        return 0;
    }
    rsp = d->rx->ring[d->rx_cons % NET_RX_RING_SIZE].rsp;
    d->rx_cons++;
    if (d->rx_skip == 2) {
        /* the extra_info slot that followed a first slot: no buffer of ours */
        d->rx_skip = 0;
        return -1;
    }
    if (rsp.id >= NRX || !d->rx_posted[rsp.id]) {
        bad(d, "RX response for id %u we have not posted\n", rsp.id);
        return -1;
    }
    d->rx_posted[rsp.id] = 0;
    if (d->rx_skip) {
        /* the rest of a frame we could not take */
    } else if (rsp.flags & (NETRXF_more_data | NETRXF_extra_info)) {
        bad(d, "multi-slot RX frame (flags %#x): dropped (we offer no feature-sg/gso)\n",
            rsp.flags);
        d->st.rx_dropped++;
    } else if (rsp.status <= 0) {
        d->st.rx_errors++;
    } else if ((unsigned int)rsp.offset + (unsigned int)rsp.status > PAGE_SIZE) {
        bad(d, "RX response offset %u + %d past the page\n", rsp.offset, rsp.status);
    } else {
        n = MIN((int)size, (int)rsp.status);
        memcpy(out, (char *)d->rxb[rsp.id].va + rsp.offset, (size_t)n);
        d->st.rx_packets++;
        d->st.rx_bytes += (unsigned long)rsp.status;
    }
    /* A chain goes on while more_data; an extra_info slot follows the first. */
    if (rsp.flags & NETRXF_extra_info)
        d->rx_skip = 2;
    else if (rsp.flags & NETRXF_more_data)
        d->rx_skip = 1;
    else if (d->rx_skip == 1)
        d->rx_skip = 0;
    post_rx(d, rsp.id);
    return n;
}

static int rx_ready(void *arg)
{
    struct netfront_dev *d = arg;
    return !d->connected || READ_ONCE(d->rx->rsp_prod) != d->rx_cons;
}

int netfront_recv(struct netfront_dev *d, void *buf, size_t size, uint64_t deadline_ns)
{
    unsigned long flags;
    int n;

    for (;;) {
        flags = irq_save();
        if (!rings_usable(d)) {
            irq_restore(flags);
            if (!deadline_ns || monotonic_ns() >= deadline_ns)
                return -XEN_ENODEV;
            /* (only connected ends this wait: a failed device may come back) */
            if (!waitq_wait(&waiters, only_connected, d, deadline_ns))
                return -XEN_ENODEV;
            continue;
        }
        while ((n = rx_one(d, buf, size)) < 0)
            ;
        if (n > 0) {
            /* Buffers go back in batches while frames keep coming: a backend
             * that ran out waits for one notify per batch, not one per frame. */
            if (d->rx_prod_pvt - READ_ONCE(d->rx->req_prod) >= RX_PUSH_BATCH)
                push_rx(d);
            irq_restore(flags);
            return n;
        }
        /* Nothing more for now: every buffer goes back before we sleep. */
        if (d->rx_prod_pvt != READ_ONCE(d->rx->req_prod))
            push_rx(d);
        /* RING_FINAL_CHECK_FOR_RESPONSES: an event for the next one, then look again. */
        WRITE_ONCE(d->rx->rsp_event, d->rx_cons + 1);
        mb();
        if (READ_ONCE(d->rx->rsp_prod) != d->rx_cons) {
            irq_restore(flags);
            continue;
        }
        irq_restore(flags);
        if (!deadline_ns || monotonic_ns() >= deadline_ns)
            return 0;
        waitq_wait(&waiters, rx_ready, d, deadline_ns);
    }
}
