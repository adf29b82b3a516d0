/*
 * pingpong: two domains bounce an event, and data in a granted page,
 * after a libvchan-style handshake over XenStore.
 *
 *   A (role=a [rounds=N] [peer=B])        B (role=b peer=A)
 *   data/pingpong/join = "" (perms: owner A,
 *       everyone else may write), watch it
 *                                         write /local/domain/A/data/pingpong/join
 *                                           = B's domid (retried until allowed)
 *   read B from join
 *   port = alloc_unbound(B)
 *   gref = grant one page to B, rw
 *   one transaction: data/pingpong/{gref,port}
 *       (perms: owner A, everyone may read)
 *                                         watch A's data/pingpong/port, read both
 *                                         bind_interdomain(A, port), map gref
 *                                         page.b_state = 1, notify
 *   round i: ping = 2i+1, data[i%DATA] = ping&0xff, notify
 *                                         check ping and data, pong = ping+1, notify
 *   check pong
 *   ...
 *                                         after the last round: b_state = 2,
 *                                         unmap, notify, close, power off
 *   end access (retried while B still has it mapped), close, power off
 *   (A also checks once, right after B connects, that end access is refused
 *   with EBUSY while B has the page mapped.)
 *
 * wait=block (default): a round waits as any kernel thread does (the event's
 * upcall wakes it; the idle vCPU blocks in SCHEDOP_block).  wait=poll: it
 * waits in SCHEDOP_poll on the masked port instead (no upcall, no iret).
 *
 * Output (both roles):
 *   pingpong: role=<r> peer=<d> connected port=<local port> gref=<g>
 *   pingpong: round N ok                              every 100 rounds
 *   pingpong: done rounds=N rtt_ns=<median> avg_ns=<mean> p99_ns=<p99> min_ns=<min>
 * (A times each round trip; B the interval between pings.)  Any mismatch or
 * timeout prints "pingpong: FAIL ..." and crashes the domain.
 *
 * Without a store (xs=0): A needs peer=B and prints
 * "pingpong: role=a offer port=<p> gref=<g>"; B is then started with
 * "role=b peer=A xs=0 port=<p> gref=<g>".
 */
#include "app.h"
#include "gnttab.h"
#include "xenbus.h"

const char app_name[] = "pingpong";

#define PP_MAGIC        0x474e4950u     /* "PING" */
#define DATA_BYTES      3072
#define MAX_SAMPLES     8192
#define CONNECT_TIMEOUT (120 * NSEC_PER_SEC)
#define ROUND_TIMEOUT   (10 * NSEC_PER_SEC)
#define DEADLINE_GRAIN  (1ull << 30)    /* ~1.07 s */

/*
 * A round's timeout, rounded up to a grain of ~1 s: the kernel re-arms its
 * one-shot timer (a set_timer_op hypercall, one more exit) only when the
 * earliest deadline changes, so a deadline computed afresh each round would
 * add an exit per round to what we measure, the event round trip.
 */
static uint64_t round_deadline(uint64_t from)
{
    return (from + ROUND_TIMEOUT + DEADLINE_GRAIN - 1) & ~(DEADLINE_GRAIN - 1);
}

struct pp_page {
    uint32_t magic;             /* A */
    uint32_t rounds;            /* A */
    uint32_t b_state;           /* B: 1 = connected, 2 = unmapping */
    uint32_t pad;
    uint64_t ping;              /* A -> B */
    uint64_t pong;              /* B -> A */
    uint8_t  data[DATA_BYTES];  /* A writes, B checks */
};
_Static_assert(sizeof(struct pp_page) <= PAGE_SIZE, "pp_page fits a page");

static volatile struct pp_page *page;
static struct thread *waiter;
static evtchn_port_t port;
static uint64_t samples[MAX_SAMPLES];

static void pp_event(evtchn_port_t p, struct pt_regs *regs, void *data)
{
    (void)p; (void)regs; (void)data;
    if (waiter)
        wake_thread(waiter);
}

/* Sleep until cond() (checked with events masked) or the deadline. */
static int wait_until(int (*cond)(uint64_t), uint64_t arg, uint64_t deadline)
{
    int ok;

    for (;;) {
        irq_disable();
        if (cond(arg)) {
            ok = 1;
            break;
        }
        if (monotonic_ns() >= deadline) {
            ok = 0;
            break;
        }
        waiter = current;
        current->wakeup_ns = deadline;
        current->state = T_BLOCKED;
        irq_enable();
        schedule();
    }
    waiter = NULL;
    irq_enable();
    return ok;
}

/*
 * wait=poll: the rounds wait in SCHEDOP_poll on the port, with the port
 * masked and events off (as Linux's xen_poll_irq does), so an event wakes
 * the vCPU without an upcall: no bounce frame and no iret hypercall on the
 * way back, one exit less per half round trip.  Clear the pending bit, look
 * at the condition, then poll: Xen's poll returns at once if the port is
 * pending already, so an event that comes between the look and the poll is
 * not lost.  The timeout is poll's own (absolute system time), so no timer
 * is armed either.
 */
static int use_poll;

static int poll_until(int (*cond)(uint64_t), uint64_t arg, uint64_t deadline)
{
    struct sched_poll sp = { .ports = &port, .nr_ports = 1, .timeout = deadline };
    int ok;

    irq_disable();
    for (;;) {
        if (cond(arg)) {
            ok = 1;
            break;
        }
        if (monotonic_ns() >= deadline) {
            ok = 0;
            break;
        }
        clear_evtchn(port);
        if (cond(arg)) {
            ok = 1;
            break;
        }
        HYPERVISOR_sched_op(SCHEDOP_poll, &sp);
    }
    irq_enable();
    return ok;
}

static int wait_round(int (*cond)(uint64_t), uint64_t arg, uint64_t deadline)
{
    return use_poll ? poll_until(cond, arg, deadline) : wait_until(cond, arg, deadline);
}

static void start_rounds(void)
{
    if (use_poll)
        mask_evtchn(port);  /* no upcalls for it from now on: poll_until takes it */
}

static int b_state_is(uint64_t v) { return READ_ONCE(page->b_state) == v; }
static int pong_is(uint64_t v)    { return READ_ONCE(page->pong) == v; }
static int ping_is(uint64_t v)    { return READ_ONCE(page->ping) >= v; }

/* ---- statistics ---- */

static void sort_u64(uint64_t *a, unsigned long n)
{
    /* Shell sort with Ciura-ish gaps: fine for a few thousand samples. */
    static const unsigned long gaps[] = { 1750, 701, 301, 132, 57, 23, 10, 4, 1 };
    for (size_t g = 0; g < ARRAY_SIZE(gaps); g++) {
        unsigned long gap = gaps[g];
        for (unsigned long i = gap; i < n; i++) {
            uint64_t v = a[i];
            unsigned long j = i;
            for (; j >= gap && a[j - gap] > v; j -= gap)
                a[j] = a[j - gap];
            a[j] = v;
        }
    }
}

static void report(unsigned long rounds, unsigned long nsamples, uint64_t total_ns)
{
    unsigned long n = MIN(nsamples, (unsigned long)MAX_SAMPLES);
    uint64_t med = 0, p99 = 0, mn = 0;

    if (n) {
        sort_u64(samples, n);
        med = samples[n / 2];
        p99 = samples[(n * 99) / 100 < n ? (n * 99) / 100 : n - 1];
        mn = samples[0];
    }
    printk("pingpong: done rounds=%lu rtt_ns=%lu avg_ns=%lu p99_ns=%lu min_ns=%lu\n",
           rounds, (unsigned long)med,
           (unsigned long)(nsamples ? total_ns / nsamples : 0),
           (unsigned long)p99, (unsigned long)mn);
}

/* ---- xenstore helpers ---- */

static void must(int rc, const char *what)
{
    if (rc < 0)
        app_fail("%s: %s (%d)", what, xenbus_strerror(rc), rc);
}

/* ---- role A ---- */

static int role_a(unsigned long rounds, unsigned long want_peer, int use_xs)
{
    static struct xenbus_watch join_watch;
    xenbus_transaction_t t;
    unsigned long peer = 0, seen = 0, nsamples = 0;
    uint64_t deadline, total = 0;
    char buf[32];
    domid_t self;
    int gref, rc;

    if (!use_xs) {
        if (!want_peer || want_peer >= DOMID_SELF)
            app_fail("xs=0 needs peer=<domid of B>");
        peer = want_peer;
        goto offer;
    }
    must(xenbus_self_domid(&self), "read domid");

    /* A fresh join node that anyone may write but only we can read. */
    xenbus_rm(XBT_NIL, "data/pingpong");
    for (;;) {
        must(xenbus_transaction_start(&t), "transaction_start");
        rc = xenbus_write(t, "data/pingpong/join", "");
        if (!rc)
            rc = xenbus_set_perms_owner(t, "data/pingpong/join", self, 'w');
        if (rc) {
            xenbus_transaction_end(t, 1);
            must(rc, "create data/pingpong/join");
        }
        rc = xenbus_transaction_end(t, 0);
        if (rc != -XEN_EAGAIN)
            break;
    }
    must(rc, "commit data/pingpong/join");
    must(xenbus_watch(&join_watch, "data/pingpong/join", NULL, NULL), "watch join");
    printk("pingpong: role=a self=%u waiting for a peer on data/pingpong/join\n", self);

    deadline = monotonic_ns() + CONNECT_TIMEOUT;
    for (;;) {
        if (!xenbus_watch_wait(&join_watch, &seen, deadline) && monotonic_ns() >= deadline)
            app_fail("no peer joined in %lu s", (unsigned long)(CONNECT_TIMEOUT / NSEC_PER_SEC));
        rc = xenbus_read(XBT_NIL, "data/pingpong/join", buf, sizeof(buf));
        if (rc > 0) {
            const char *end;
            peer = simple_strtoul(buf, &end, 10);
            if (*end || peer >= DOMID_SELF || peer == self)
                app_fail("bad join value '%s'", buf);
            break;
        }
    }
    xenbus_unwatch(&join_watch);
    if (want_peer && peer != want_peer)
        app_fail("domain %lu joined, expected peer=%lu", peer, want_peer);

offer:
    page = alloc_page();
    if (!page)
        app_fail("no memory");
    memset((void *)page, 0, PAGE_SIZE);
    page->magic = PP_MAGIC;
    page->rounds = (uint32_t)rounds;
    for (unsigned int i = 0; i < DATA_BYTES; i++)
        page->data[i] = (uint8_t)(i * 7 + 3);
    wmb();

    gref = gnttab_grant_page((domid_t)peer, (const void *)page, 0);
    if (gref < 0)
        app_fail("grant_access: %d", gref);
    rc = evtchn_alloc_unbound((domid_t)peer, pp_event, NULL);
    if (rc < 0)
        app_fail("alloc_unbound(%lu): %d", peer, rc);
    port = (evtchn_port_t)rc;
    if (!use_xs) {
        printk("pingpong: role=a offer port=%u gref=%d\n", port, gref);
        goto wait_peer;
    }

    /* Both keys at once, readable by everyone. */
    for (;;) {
        must(xenbus_transaction_start(&t), "transaction_start");
        rc = xenbus_printf(t, "data/pingpong/gref", "%d", gref);
        if (!rc)
            rc = xenbus_set_perms_owner(t, "data/pingpong/gref", self, 'r');
        if (!rc)
            rc = xenbus_printf(t, "data/pingpong/port", "%u", port);
        if (!rc)
            rc = xenbus_set_perms_owner(t, "data/pingpong/port", self, 'r');
        if (rc) {
            xenbus_transaction_end(t, 1);
            must(rc, "write port/gref");
        }
        rc = xenbus_transaction_end(t, 0);
        if (rc != -XEN_EAGAIN)
            break;
    }
    must(rc, "commit port/gref");

wait_peer:
    if (!wait_until(b_state_is, 1, monotonic_ns() + CONNECT_TIMEOUT))
        app_fail("peer %lu did not connect (b_state=%u)", peer, page->b_state);
    printk("pingpong: role=a peer=%lu connected port=%u gref=%d\n", peer, port, gref);
    /* B has it mapped, so the hypervisor holds GTF_reading|GTF_writing. */
    rc = gnttab_end_access((grant_ref_t)gref);
    if (rc != -XEN_EBUSY)
        app_fail("end_access(%d) while the peer has it mapped: %d, want %d (EBUSY)", gref, rc,
             -XEN_EBUSY);

    start_rounds();
    for (unsigned long i = 0; i < rounds; i++) {
        uint64_t seq = 2 * i + 1, t0, dt;

        t0 = monotonic_ns();
        page->data[i % DATA_BYTES] = (uint8_t)seq;
        wmb();
        WRITE_ONCE(page->ping, seq);
        notify_remote_via_evtchn(port);
        if (!wait_round(pong_is, seq + 1, round_deadline(t0)))
            app_fail("round %lu: pong=%lu, want %lu", i + 1, (unsigned long)page->pong,
                 (unsigned long)(seq + 1));
        dt = monotonic_ns() - t0;
        total += dt;
        samples[nsamples++ % MAX_SAMPLES] = dt;
        if ((i + 1) % 100 == 0)
            printk("pingpong: round %lu ok\n", i + 1);
    }

    /* B unmaps first; then the grant can be revoked. */
    if (!wait_round(b_state_is, 2, monotonic_ns() + ROUND_TIMEOUT))
        app_fail("peer did not finish (b_state=%u)", page->b_state);
    deadline = monotonic_ns() + ROUND_TIMEOUT;
    while ((rc = gnttab_end_access((grant_ref_t)gref)) == -XEN_EBUSY) {
        if (monotonic_ns() >= deadline)
            app_fail("end_access(%d): still mapped by the peer", gref);
        msleep(1);
    }
    if (rc)
        app_fail("end_access(%d): %d", gref, rc);
    close_evtchn(port);
    report(rounds, nsamples, total);
    if (use_xs)
        xenbus_rm(XBT_NIL, "data/pingpong");
    poweroff();
}

/* ---- role B ---- */

static int role_b(unsigned long peer, int use_xs, const char *cmdline)
{
    static struct xenbus_watch port_watch;
    char apath[64], path[128];
    unsigned long seen = 0, rport = 0, gref = 0, rounds, nsamples = 0;
    uint64_t deadline, last = 0, total = 0;
    grant_handle_t handle;
    int16_t status;
    void *area;
    domid_t self;
    long hrc;
    int rc;

    if (!peer || peer >= DOMID_SELF)
        app_fail("role=b needs peer=<domid of A>");
    if (!use_xs) {
        rport = cmdline_get_ulong(cmdline, "port", 0);
        gref = cmdline_get_ulong(cmdline, "gref", 0);
        if (!rport || !gref)
            app_fail("xs=0 needs port=<A's port> gref=<A's gref>");
        goto connect;
    }
    must(xenbus_self_domid(&self), "read domid");
    rc = xenbus_get_domain_path((domid_t)peer, apath, sizeof(apath));
    must(rc, "get_domain_path");

    /* Join: A's node exists once A is up; until then we may not write. */
    snprintf(path, sizeof(path), "%s/data/pingpong/join", apath);
    deadline = monotonic_ns() + CONNECT_TIMEOUT;
    while ((rc = xenbus_printf(XBT_NIL, path, "%u", self)) != 0) {
        if ((rc != -XEN_EACCES && rc != -XEN_ENOENT) || monotonic_ns() >= deadline)
            app_fail("write %s: %s (%d)", path, xenbus_strerror(rc), rc);
        msleep(100);
    }
    printk("pingpong: role=b self=%u joined %s\n", self, path);

    /* Wait for A's port and gref (written together in one transaction). */
    snprintf(path, sizeof(path), "%s/data/pingpong/port", apath);
    must(xenbus_watch(&port_watch, path, NULL, NULL), "watch port");
    for (;;) {
        rc = xenbus_read_ulong(XBT_NIL, path, &rport);
        if (!rc) {
            snprintf(path, sizeof(path), "%s/data/pingpong/gref", apath);
            rc = xenbus_read_ulong(XBT_NIL, path, &gref);
            snprintf(path, sizeof(path), "%s/data/pingpong/port", apath);
            if (!rc)
                break;
        }
        if (rc != -XEN_ENOENT && rc != -XEN_EACCES)
            app_fail("read %s: %s (%d)", path, xenbus_strerror(rc), rc);
        if (monotonic_ns() >= deadline)
            app_fail("A published no port/gref");
        /* Re-poll now and then too, in case an event was filtered. */
        xenbus_watch_wait(&port_watch, &seen, MIN(deadline, monotonic_ns() + NSEC_PER_SEC));
    }
    xenbus_unwatch(&port_watch);

connect:
    rc = evtchn_bind_interdomain((domid_t)peer, (evtchn_port_t)rport, pp_event, NULL);
    if (rc < 0)
        app_fail("bind_interdomain(%lu, %lu): %d", peer, rport, rc);
    port = (evtchn_port_t)rc;

    area = gnttab_alloc_map_area(1);
    if (!area)
        app_fail("no map area");
    hrc = gnttab_map((domid_t)peer, (grant_ref_t)gref, 0, (unsigned long)area, &handle,
                     &status);
    if (hrc || status != GNTST_okay)
        app_fail("map_grant_ref(dom %lu, ref %lu): rc=%ld status=%d (%s)", peer, gref, hrc,
             status, gnttab_strerror(status));
    page = area;
    if (page->magic != PP_MAGIC)
        app_fail("granted page has magic 0x%x", page->magic);
    for (unsigned int i = 0; i < DATA_BYTES; i++)
        if (page->data[i] != (uint8_t)(i * 7 + 3))
            app_fail("granted page data[%u]=0x%x, want 0x%x", i, page->data[i],
                 (uint8_t)(i * 7 + 3));
    rounds = page->rounds;
    WRITE_ONCE(page->b_state, 1);
    notify_remote_via_evtchn(port);
    printk("pingpong: role=b peer=%lu connected port=%u gref=%lu\n", peer, port, gref);

    start_rounds();
    for (unsigned long i = 0; i < rounds; i++) {
        uint64_t seq = 2 * i + 1, ping, now;

        if (!wait_round(ping_is, seq, round_deadline(monotonic_ns())))
            app_fail("round %lu: no ping (ping=%lu)", i + 1, (unsigned long)page->ping);
        now = monotonic_ns();
        rmb();
        ping = READ_ONCE(page->ping);
        if (ping != seq)
            app_fail("round %lu: ping=%lu, want %lu", i + 1, (unsigned long)ping,
                 (unsigned long)seq);
        if (page->data[i % DATA_BYTES] != (uint8_t)seq)
            app_fail("round %lu: data[%lu]=0x%x, want 0x%x", i + 1, i % DATA_BYTES,
                 page->data[i % DATA_BYTES], (uint8_t)seq);
        if (i) {
            total += now - last;
            samples[nsamples++ % MAX_SAMPLES] = now - last;
        }
        last = now;
        WRITE_ONCE(page->pong, seq + 1);
        notify_remote_via_evtchn(port);
        if ((i + 1) % 100 == 0)
            printk("pingpong: round %lu ok\n", i + 1);
    }

    /* Unmap first, then tell A it may revoke the grant. */
    WRITE_ONCE(page->b_state, 2);
    wmb();
    page = NULL;
    hrc = gnttab_unmap((unsigned long)area, handle, &status);
    if (hrc || status != GNTST_okay)
        app_fail("unmap_grant_ref: rc=%ld status=%d (%s)", hrc, status, gnttab_strerror(status));
    notify_remote_via_evtchn(port);
    gnttab_free_map_area(area, 1);
    close_evtchn(port);
    report(rounds, nsamples, total);
    poweroff();
}

int app_main(const char *cmdline)
{
    char role[8] = "";
    unsigned long rounds = cmdline_get_ulong(cmdline, "rounds", 1000);
    unsigned long peer = cmdline_get_ulong(cmdline, "peer", 0);
    int use_xs = cmdline_get_ulong(cmdline, "xs", 1) != 0;

    char wait[8] = "block";

    cmdline_get_str(cmdline, "role", role, sizeof(role));
    cmdline_get_str(cmdline, "wait", wait, sizeof(wait));
    if (!strcmp(wait, "poll"))
        use_poll = 1;
    else if (strcmp(wait, "block"))
        app_fail("wait=block or wait=poll, please (got '%s')", wait);
    if (use_xs && !xenbus_available())
        app_fail("no xenstore");
    if (!gnttab_ready())
        app_fail("no grant table");
    if (!strcmp(role, "a"))
        return role_a(rounds, peer, use_xs);
    if (!strcmp(role, "b"))
        return role_b(peer, use_xs, cmdline);
    app_fail("role=a or role=b, please (got '%s')", role);
}
