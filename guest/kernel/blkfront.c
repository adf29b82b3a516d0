/*
 * blkfront.c - virtual block device frontend (io/blkif.h over io/ring.h).
 *
 * Threads and contexts:
 *   - The ring (requests, responses, grants, the I/O list) is only touched
 *     with events masked: from threads through irq_save(), and from the
 *     ring's event handler, which consumes responses, completes I/Os and
 *     refills the ring.  Nothing there allocates memory or blocks.
 *   - Each device has a thread ("blkfront") that runs the XenBus state
 *     machine: watch callbacks (in the xenbus thread) only kick it.  It
 *     does all xenbus calls, allocations, ring setup and teardown.
 *   - Apps submit I/Os from their own threads and sleep in waitq_wait(&waiters, ).
 *
 * Requests: an I/O becomes one or more ring requests ("shadows"): up to 11
 * segments directly, or up to max_segs through indirect pages when the
 * backend offers feature-max-indirect-segments.  Each segment is a part of
 * one page, given to the backend either by granting the I/O's own page
 * (writable for reads, read-only for writes; access ended after the
 * response) or, with persistent grants, through a pool of pages granted
 * once (data copied in for writes and out for reads).
 */
#include "blkfront.h"
#include "events.h"
#include "mm.h"
#include "sched.h"
#include "xenbus.h"
#include "xenbus_front.h"
#include "xtime.h"

#define MAX_DEVS            4
#define MAX_RING_ORDER      3           /* 8 pages, 256 entries */
#define MAX_RING_PAGES      (1U << MAX_RING_ORDER)
#define DEFAULT_RING_ORDER  2
#define DEFAULT_INDIRECT    256         /* segments: 1 MiB per ring request */
#define MAX_INDIRECT        1024
#define MAX_IND_PAGES       ((MAX_INDIRECT + BLKIF_SEGS_PER_INDIRECT_FRAME - 1) / \
                             BLKIF_SEGS_PER_INDIRECT_FRAME)
#define DEFAULT_BUDGET      8448        /* grants for data in flight: 32 x (256 + 8) */
#define DEFAULT_POOL        1024        /* persistent pages, unless grants= says */
#define DEFAULT_TIMEOUT     (30 * NSEC_PER_SEC)
#define DRAIN_TIMEOUT       (5 * NSEC_PER_SEC)

_Static_assert(MAX_IND_PAGES <= BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, "indirect pages");

#define SECTOR_SHIFT 9

/* ---------------------------------------------------------------- */
/* Waiting: the kernel's wait queue (sched.h); every state change wakes all. */

static struct waitq waiters = { .name = "blkfront", .poll_when_full = 1 };

/* ---------------------------------------------------------------- */
/* Device state */

struct pgnt {                   /* a persistently granted page */
    void *va;
    grant_ref_t ref;
};

struct seginfo {
    grant_ref_t ref;
    uint16_t off, len;          /* bytes within the page */
    int32_t pg;                 /* persistent pool index, or -1 */
};

struct shadow {
    struct blk_io *io;
    size_t off, len;            /* the part of io->buf this request carries */
    uint8_t op;                 /* operation on the ring (INDIRECT's inner op) */
    uint8_t indirect;
    uint8_t in_use;
    uint8_t nind;
    uint16_t nseg;
    int next_free;
    struct seginfo *seg;        /* [dev->shadow_segs] */
    void *ind_page[MAX_IND_PAGES];      /* our pages (non-persistent) */
    grant_ref_t ind_ref[MAX_IND_PAGES];
    int32_t ind_pg[MAX_IND_PAGES];      /* persistent pool index, or -1 */
};

struct blkfront_dev {
    int used;
    unsigned int devid;
    char name[16];
    char tag[32];               /* "blkfront: <name>": log prefix */
    char node[40];              /* "device/vbd/<devid>" */
    char backend[128];
    domid_t backend_id;
    struct blkfront_opts opts;

    /* state machine (device thread) */
    int fe_state, be_state;
    int gone, closing_by_us, exiting, fatal;
    unsigned int generation;
    struct thread *thread;
    struct xenbus_watch fe_watch, be_watch;
    int be_watch_on, fe_watch_on;
    struct xenbus_front_kick kick;  /* watches and events -> device thread */
    int lock;                   /* sleeping mutex over the state machine */
    int wrote_multi, wrote_single;

    /* ring (events masked) */
    int connected, draining;
    struct blkif_sring *sring;
    unsigned int ring_pages;
    grant_ref_t ring_ref[MAX_RING_PAGES];
    uint32_t req_prod_pvt, rsp_cons, ring_size;
    uint32_t ring_gen;          /* in the upper half of every request id */
    int port;
    struct blkfront_info info;
    int be_persistent;          /* backend's feature-persistent (at talk time) */

    struct shadow *shadow;
    unsigned int nshadow, shadow_segs, shadow_pages, seg_pages;
    struct seginfo *segmem;
    int free_shadow;
    unsigned int inflight_reqs, grants_inflight;

    struct pgnt *pool;
    unsigned int pool_n, pool_pages;
    int32_t *pool_free;
    unsigned int pool_nfree;

    struct blk_io *head, *tail, *cursor;
    volatile unsigned long completions;
    volatile int polling;           /* a thread spins in poll_responses */

    struct blkfront_stats st;
    unsigned int bad_printed;
};

static struct blkfront_dev devs[MAX_DEVS];

static const char *const state_names[] = {
    "Unknown", "Initialising", "InitWait", "Initialised", "Connected", "Closing",
    "Closed", "Reconfiguring", "Reconfigured",
};

const char *xenbus_state_name(int s)
{
    return s >= 0 && (size_t)s < ARRAY_SIZE(state_names) ? state_names[s] : "?";
}

#define dlog(d, ...) do { if (!(d)->opts.quiet) printk(__VA_ARGS__); } while (0)

/* ---------------------------------------------------------------- */
/* vbd numbers (docs/misc/vbd-interface) */

static void disk_letters(unsigned int disk, char *out)
{
    char tmp[8];
    int n = 0;

    /* bijective base 26: a..z, aa..zz, ... */
    disk++;
    while (disk && n < 7) {
        disk--;
        tmp[n++] = (char)('a' + disk % 26);
        disk /= 26;
    }
    while (n)
        *out++ = tmp[--n];
    *out = '\0';
}

void blkfront_devid_name(unsigned int devid, char *buf, size_t size)
{
    char letters[8];
    unsigned int major = devid >> 8, disk, part;
    const char *pfx;

    if (devid & (1U << 28)) {
        pfx = "xvd";
        disk = (devid >> 8) & 0xfffff;
        part = devid & 0xff;
    } else if (major == 202) {
        pfx = "xvd";
        disk = (devid >> 4) & 15;
        part = devid & 15;
    } else if (major == 8) {
        pfx = "sd";
        disk = (devid >> 4) & 15;
        part = devid & 15;
    } else if (major == 3 || major == 22) {
        pfx = "hd";
        disk = ((devid >> 6) & 3) + (major == 22 ? 2 : 0);
        part = devid & 63;
    } else {
        snprintf(buf, size, "vbd%u", devid);
        return;
    }
    disk_letters(disk, letters);
    if (part)
        snprintf(buf, size, "%s%s%u", pfx, letters, part);
    else
        snprintf(buf, size, "%s%s", pfx, letters);
}

int blkfront_parse_vdev(const char *s, unsigned int *devid)
{
    unsigned int disk = 0, part = 0, kind;
    const char *p, *end;

    if (!s || !*s)
        return -XEN_EINVAL;
    if (*s >= '0' && *s <= '9') {
        unsigned long v = simple_strtoul(s, &end, 0);
        if (*end || v > 0xffffffffUL)
            return -XEN_EINVAL;
        *devid = (unsigned int)v;
        return 0;
    }
    if (!strncmp(s, "xvd", 3)) {
        kind = 0;
        p = s + 3;
    } else if (!strncmp(s, "sd", 2)) {
        kind = 1;
        p = s + 2;
    } else if (!strncmp(s, "hd", 2)) {
        kind = 2;
        p = s + 2;
    } else {
        return -XEN_EINVAL;
    }
    if (*p < 'a' || *p > 'z')
        return -XEN_EINVAL;
    /* Bijective base 26: a = 0, z = 25, aa = 26, ... */
    for (; *p >= 'a' && *p <= 'z'; p++) {
        disk = disk * 26 + (unsigned int)(*p - 'a' + 1);
        if (disk > (1U << 20))
            return -XEN_EINVAL;
    }
    disk--;
    if (*p) {
        part = (unsigned int)simple_strtoul(p, &end, 10);
        if (*end || end == p)
            return -XEN_EINVAL;
    }
    switch (kind) {
    case 0:
        if (disk < 16 && part < 16)
            *devid = (202U << 8) | (disk << 4) | part;
        else if (disk < (1U << 20) && part < 256)
            *devid = (1U << 28) | (disk << 8) | part;
        else
            return -XEN_EINVAL;
        return 0;
    case 1:
        if (disk >= 16 || part >= 16)
            return -XEN_EINVAL;
        *devid = (8U << 8) | (disk << 4) | part;
        return 0;
    default:
        if (disk >= 4 || part >= 64)
            return -XEN_EINVAL;
        *devid = ((disk < 2 ? 3U : 22U) << 8) | ((disk & 1) << 6) | part;
        return 0;
    }
}

/* ---------------------------------------------------------------- */
/* Grants we could not end yet */

/* End access to ref now if the backend is done with it, else later. */
static void end_or_defer(struct blkfront_dev *d, grant_ref_t ref, int count_busy)
{
    if (gnttab_end_access(ref) == -XEN_EBUSY) {
        if (count_busy)
            d->st.grant_busy++;
        xenbus_front_defer_end(ref, NULL);
    }
}

/*
 * The grants of a request that got no answer when its ring went away.  A
 * backend may still hold that request (taken off the ring but not started:
 * nothing marks the grant in use yet), so the ref must not come back into
 * use right away for another page granted to the same domain.  Revoke it,
 * then take it again at once (the free list is LIFO and events are masked)
 * and park it, granted read-only to nobody (DOMID_INVALID), for
 * QUARANTINE_NS; a late access through it fails cleanly.
 */
#define QUARANTINE_MAX  2048
#define QUARANTINE_NS   (30 * NSEC_PER_SEC)
#define DOMID_INVALID_BLK 0x7FF4U
static struct { grant_ref_t ref; uint64_t until; } quarantine[QUARANTINE_MAX];
static unsigned int nquarantine;

/* A page nobody uses, named by parked grants. */
static char park_page[PAGE_SIZE] __aligned(PAGE_SIZE);

/* ref was just freed (events masked): take it again and park it. */
static void park_freed(void)
{
    int r;

    if (nquarantine >= QUARANTINE_MAX)
        return;
    r = gnttab_grant_access(DOMID_INVALID_BLK, virt_to_mfn(park_page), 1);
    if (r < 0)
        return;
    /* r is the ref just freed (LIFO); if not, another one is parked: harmless. */
    quarantine[nquarantine].ref = (grant_ref_t)r;
    quarantine[nquarantine].until = monotonic_ns() + QUARANTINE_NS;
    nquarantine++;
}

static void quarantine_ref(grant_ref_t ref)
{
    unsigned long flags = irq_save();

    if (gnttab_end_access(ref) == -XEN_EBUSY)
        xenbus_front_defer_end(ref, NULL);           /* still in use: it can't be reused anyway */
    else
        park_freed();
    irq_restore(flags);
}

/* Thread context: release parked refs whose time is up. */
static void release_quarantine(void)
{
    uint64_t now = monotonic_ns();
    unsigned int i = 0;

    while (i < nquarantine) {
        unsigned long flags = irq_save();
        if (quarantine[i].until > now) {
            irq_restore(flags);
            i++;
            continue;
        }
        if (gnttab_end_access(quarantine[i].ref) == -XEN_EBUSY)
            xenbus_front_defer_end(quarantine[i].ref, NULL);
        quarantine[i] = quarantine[--nquarantine];
        irq_restore(flags);
    }
}

/* ---------------------------------------------------------------- */
/* I/O list and completion (events masked) */

static int fully_issued(const struct blk_io *io)
{
    if (io->len && io->op != BLKIF_OP_DISCARD)
        return io->issued >= io->len;
    return io->sent;
}

static void io_unlink(struct blkfront_dev *d, struct blk_io *io)
{
    if (io->prev)
        io->prev->next = io->next;
    else
        d->head = io->next;
    if (io->next)
        io->next->prev = io->prev;
    else
        d->tail = io->prev;
    if (d->cursor == io)
        d->cursor = io->next;
    io->prev = io->next = NULL;
}

static void io_finish(struct blkfront_dev *d, struct blk_io *io, int status)
{
    if (status && !io->status)
        io->status = status;
    io_unlink(d, io);
    io->done_ns = monotonic_ns();
    wmb();
    io->complete = 1;
    d->completions++;
    if (io->done)
        io->done(io);
}

static void io_maybe_finish(struct blkfront_dev *d, struct blk_io *io)
{
    if (!io->outstanding && fully_issued(io))
        io_finish(d, io, 0);
}

/* Fail every I/O that is not on the ring (all of them after a teardown). */
static void fail_all(struct blkfront_dev *d, int status)
{
    struct blk_io *io = d->head, *next;

    for (; io; io = next) {
        next = io->next;
        if (!io->outstanding)
            io_finish(d, io, status);
    }
}

static void put_shadow(struct blkfront_dev *d, struct shadow *sh)
{
    sh->in_use = 0;
    sh->io = NULL;
    sh->next_free = d->free_shadow;
    d->free_shadow = (int)(sh - d->shadow);
    d->inflight_reqs--;
}

static void pool_put(struct blkfront_dev *d, int32_t pg)
{
    d->pool_free[d->pool_nfree++] = pg;
}

/*
 * Give back what a request held.  copy_out: a successful read whose data
 * sits in persistent pages.  lost: 1 = never sent (undo), 2 = the ring
 * went away without an answer (grants quarantined).
 */
static void release_shadow(struct blkfront_dev *d, struct shadow *sh, int copy_out, int lost)
{
    char *user = (char *)sh->io->buf + sh->off;

    for (unsigned int i = 0; i < sh->nseg; i++) {
        struct seginfo *s = &sh->seg[i];
        if (s->pg >= 0) {
            if (copy_out) {
                memcpy(user, (char *)d->pool[s->pg].va + s->off, s->len);
                d->st.copies++;
            }
            pool_put(d, s->pg);
        } else {
            if (lost == 2)
                quarantine_ref(s->ref);
            else
                end_or_defer(d, s->ref, !lost);
            d->grants_inflight--;
        }
        user += s->len;
    }
    for (unsigned int i = 0; i < sh->nind; i++) {
        if (sh->ind_pg[i] >= 0) {
            pool_put(d, sh->ind_pg[i]);
        } else {
            if (lost == 2)
                quarantine_ref(sh->ind_ref[i]);
            else
                end_or_defer(d, sh->ind_ref[i], !lost);
            d->grants_inflight--;
        }
    }
    sh->nseg = 0;
    sh->nind = 0;
}

static void bad_response(struct blkfront_dev *d, const char *fmt, ...) __printf(2, 3);
static void bad_response(struct blkfront_dev *d, const char *fmt, ...)
{
    char buf[160];
    va_list ap;

    d->st.protocol_errors++;
    if (d->bad_printed++ >= 8)
        return;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    printk("blkfront: %s: backend protocol error: %s\n", d->name, buf);
}

static void complete_response(struct blkfront_dev *d, const struct blkif_response *rsp)
{
    struct shadow *sh;
    struct blk_io *io;
    uint8_t want_op;
    int16_t status = rsp->status;
    int err = 0;

    if ((rsp->id >> 32) != d->ring_gen || (uint32_t)rsp->id >= d->nshadow ||
        !d->shadow[(uint32_t)rsp->id].in_use) {
        bad_response(d, "response id 0x%lx is not a request in flight", (unsigned long)rsp->id);
        return;
    }
    sh = &d->shadow[(uint32_t)rsp->id];
    io = sh->io;
    /* For an indirect request the operation is "copied from request"
     * (BLKIF_OP_INDIRECT) by the letter of blkif.h; Linux's blkback answers
     * with the inner operation.  Either is fine. */
    want_op = sh->indirect ? BLKIF_OP_INDIRECT : sh->op;
    if (rsp->operation != want_op && !(sh->indirect && rsp->operation == sh->op))
        bad_response(d, "response to id 0x%lx has operation %u, request had %u",
                     (unsigned long)rsp->id, rsp->operation, want_op);
    if (status != BLKIF_RSP_OKAY) {
        if (status != BLKIF_RSP_ERROR && status != BLKIF_RSP_EOPNOTSUPP)
            bad_response(d, "response to id 0x%lx has status %d", (unsigned long)rsp->id, status);
        err = status == BLKIF_RSP_EOPNOTSUPP ? -XEN_EOPNOTSUPP : -XEN_EIO;
        if (!io->rsp_status)
            io->rsp_status = status;
        if (!io->status)
            io->status = err;
    }
    release_shadow(d, sh, !err && sh->op == BLKIF_OP_READ, 0);
    put_shadow(d, sh);
    io->outstanding--;
    d->st.responses++;
    io_maybe_finish(d, io);
}

/* RING_FINAL_CHECK_FOR_RESPONSES loop.  Events masked.  A poller passes
 * arm=0: it consumes what is there and leaves rsp_event alone, so the
 * backend sends no event while we are looking anyway (every event is a trip
 * through the hypervisor); it arms before it sleeps. */
static void consume_responses(struct blkfront_dev *d, int arm)
{
    struct blkif_sring *s = d->sring;

    if (!s)
        return;
    for (;;) {
        uint32_t rp = READ_ONCE(s->rsp_prod);
        rmb();          /* entries up to rp are written before rsp_prod */
        if (rp - d->rsp_cons > d->ring_size) {
            /* Illegal (RING_RESPONSE_PROD_OVERFLOW).  A backend that writes
             * the index non-atomically shows a passing value: count it,
             * then look again for a while before giving up on the ring. */
            const uint32_t *w = (const uint32_t *)s;
            uint32_t bad = rp;
            for (unsigned int i = 0; i < 100000 && rp - d->rsp_cons > d->ring_size; i++) {
                cpu_relax();
                rp = READ_ONCE(s->rsp_prod);
            }
            bad_response(d, "rsp_prod read as %u, %u ahead of rsp_cons %u (ring %u); %s %u",
                         bad, bad - d->rsp_cons, d->rsp_cons, d->ring_size,
                         rp - d->rsp_cons > d->ring_size ? "still" : "then", rp);
            if (rp - d->rsp_cons > d->ring_size) {
                printk("blkfront: %s: ring header req_prod=%u req_event=%u rsp_prod=%u "
                       "rsp_event=%u (ours: req_prod_pvt=%u); ring abandoned\n",
                       d->name, w[0], w[1], w[2], w[3], d->req_prod_pvt);
                return;
            }
            rmb();
        }
        while (d->rsp_cons != rp) {
            struct blkif_response r;
            const volatile struct blkif_response *vr =
                &s->ring[d->rsp_cons & (d->ring_size - 1)].rsp;
            r.id = vr->id;
            r.operation = vr->operation;
            r.status = vr->status;
            d->rsp_cons++;
            complete_response(d, &r);
        }
        if (!arm)
            break;
        /* Ask for an event on the next response (or, coalescing, when three quarters of
         * what is on the ring has been answered: every request there gets its
         * response, so the event always comes), then look once more. */
        {
            uint32_t outstanding = d->req_prod_pvt - d->rsp_cons;
            uint32_t ahead = d->opts.coalesce && outstanding > 2 ? outstanding * 3 / 4 : 1;
            WRITE_ONCE(s->rsp_event, d->rsp_cons + ahead);
        }
        mb();
        if (READ_ONCE(s->rsp_prod) == d->rsp_cons)
            break;
    }
}

static void process_responses(struct blkfront_dev *d)
{
    consume_responses(d, 1);
}

/* Before sleeping for a response: make sure one will send an event (a
 * poller may have left rsp_event behind).  Thread context. */
static void arm_events(struct blkfront_dev *d)
{
    if (d->opts.poll_us) {
        unsigned long flags = irq_save();
        process_responses(d);
        irq_restore(flags);
    }
}

/* ---------------------------------------------------------------- */
/* Building requests (events masked) */

static struct shadow *get_shadow(struct blkfront_dev *d)
{
    struct shadow *sh;

    if (d->free_shadow < 0)
        return NULL;
    sh = &d->shadow[d->free_shadow];
    d->free_shadow = sh->next_free;
    sh->in_use = 1;
    sh->nseg = 0;
    sh->nind = 0;
    d->inflight_reqs++;
    return sh;
}

/* Undo a half-built request (nothing was put on the ring). */
static void unbuild(struct blkfront_dev *d, struct shadow *sh)
{
    release_shadow(d, sh, 0, 1);
    put_shadow(d, sh);
}

#define BUILD_OK     0
#define BUILD_WAIT   1      /* out of resources for now */

static int is_write_op(uint8_t op)
{
    return op == BLKIF_OP_WRITE || op == BLKIF_OP_WRITE_BARRIER;
}

/* Grant one page-part; 0, or BUILD_WAIT / -errno. */
static int grant_seg(struct blkfront_dev *d, struct seginfo *s, const char *user, int writeop)
{
    if (d->info.persistent) {
        int32_t pg;
        if (!d->pool_nfree)
            return BUILD_WAIT;
        pg = d->pool_free[--d->pool_nfree];
        s->pg = pg;
        s->ref = d->pool[pg].ref;
        if (writeop) {
            memcpy((char *)d->pool[pg].va + s->off, user, s->len);
            d->st.copies++;
        }
        return 0;
    } else {
        int ref = gnttab_grant_access(d->backend_id,
                                      virt_to_mfn((const void *)((uintptr_t)user & PAGE_MASK)),
                                      writeop);
        if (ref < 0)
            return ref;
        s->pg = -1;
        s->ref = (grant_ref_t)ref;
        d->grants_inflight++;
        return 0;
    }
}

/* Shadow index, tagged with the ring's generation: a response that
 * belongs to an earlier ring can never complete a request on this one. */
static uint64_t req_id(struct blkfront_dev *d, struct shadow *sh)
{
    return ((uint64_t)d->ring_gen << 32) | (uint32_t)(sh - d->shadow);
}

/* Request slot for the next request (zeroed). */
static union blkif_sring_entry *next_slot(struct blkfront_dev *d)
{
    union blkif_sring_entry *e = &d->sring->ring[d->req_prod_pvt & (d->ring_size - 1)];
    memset(e, 0, sizeof(*e));
    return e;
}

/* Grants for data in flight: grants=, or DEFAULT_BUDGET leaving a quarter
 * of our grant table to everything else. */
static unsigned int data_budget(struct blkfront_dev *d)
{
    unsigned int cap;

    if (d->opts.grant_budget)
        return d->opts.grant_budget;
    cap = gnttab_nr_frames() * 512 * 3 / 4;
    return MIN((unsigned int)DEFAULT_BUDGET, cap);
}

static int build_rw(struct blkfront_dev *d, struct blk_io *io)
{
    struct shadow *sh;
    size_t remaining = io->len - io->issued, chunk = 0;
    uintptr_t addr = (uintptr_t)io->buf + io->issued;
    unsigned int max = d->info.max_segs, nseg = 0, nind = 0, i;
    int barrier = io->op == BLKIF_OP_WRITE_BARRIER;
    int writeop = is_write_op(io->op);
    uint8_t op;
    int indirect, rc;

    if (barrier)
        max = BLKIF_MAX_SEGMENTS_PER_REQUEST;  /* indirect carries only READ/WRITE */
    /* How many segments this request gets. */
    {
        uintptr_t a = addr;
        size_t r = remaining;
        while (r && nseg < max) {
            size_t l = MIN(PAGE_SIZE - (a & (PAGE_SIZE - 1)), r);
            a += l;
            r -= l;
            chunk += l;
            nseg++;
        }
    }
    indirect = nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST;
    if (indirect)
        nind = (nseg + BLKIF_SEGS_PER_INDIRECT_FRAME - 1) / BLKIF_SEGS_PER_INDIRECT_FRAME;

    /* Resources: pool pages or grant budget (always let one through). */
    if (d->info.persistent) {
        if (d->pool_nfree < nseg + nind)
            return BUILD_WAIT;
    } else if (d->grants_inflight + nseg + nind > data_budget(d) && d->inflight_reqs) {
        return BUILD_WAIT;
    }
    sh = get_shadow(d);
    if (!sh)
        return BUILD_WAIT;
    sh->io = io;
    sh->off = io->issued;
    sh->len = chunk;
    op = io->op;
    if (barrier && io->issued + chunk < io->len)
        op = BLKIF_OP_WRITE;            /* leading parts of a split barrier */
    sh->op = op;
    sh->indirect = (uint8_t)indirect;

    for (i = 0; i < nseg; i++) {
        struct seginfo *s = &sh->seg[i];
        size_t off = addr & (PAGE_SIZE - 1);
        size_t l = MIN(PAGE_SIZE - off, remaining);
        remaining -= l;
        s->off = (uint16_t)off;
        s->len = (uint16_t)l;
        rc = grant_seg(d, s, (const char *)addr, writeop);
        if (rc) {
            sh->nseg = (uint16_t)i;
            unbuild(d, sh);
            return rc == BUILD_WAIT ? BUILD_WAIT : (d->inflight_reqs ? BUILD_WAIT : rc);
        }
        sh->nseg = (uint16_t)(i + 1);
        addr += l;
    }

    if (!indirect) {
        struct blkif_request *req = &next_slot(d)->req;
        req->operation = op;
        req->nr_segments = (uint8_t)nseg;
        req->handle = (uint16_t)d->devid;
        req->id = req_id(d, sh);
        req->sector_number = io->sector + (sh->off >> SECTOR_SHIFT);
        for (i = 0; i < nseg; i++) {
            req->seg[i].gref = sh->seg[i].ref;
            req->seg[i].first_sect = (uint8_t)(sh->seg[i].off >> SECTOR_SHIFT);
            req->seg[i].last_sect =
                (uint8_t)((sh->seg[i].off + sh->seg[i].len - 1) >> SECTOR_SHIFT);
        }
    } else {
        struct blkif_request_indirect *req;
        for (i = 0; i < nind; i++) {
            struct blkif_request_segment *page;
            unsigned int first = i * BLKIF_SEGS_PER_INDIRECT_FRAME;
            unsigned int n = MIN(nseg - first, (unsigned int)BLKIF_SEGS_PER_INDIRECT_FRAME);

            if (d->info.persistent) {
                int32_t pg = d->pool_free[--d->pool_nfree];
                sh->ind_pg[i] = pg;
                sh->ind_ref[i] = d->pool[pg].ref;
                page = d->pool[pg].va;
            } else {
                int ref;
                page = sh->ind_page[i];
                /* Filled before it is granted. */
                for (unsigned int k = 0; k < n; k++) {
                    struct seginfo *s = &sh->seg[first + k];
                    page[k].gref = s->ref;
                    page[k].first_sect = (uint8_t)(s->off >> SECTOR_SHIFT);
                    page[k].last_sect = (uint8_t)((s->off + s->len - 1) >> SECTOR_SHIFT);
                }
                ref = gnttab_grant_access(d->backend_id, virt_to_mfn(page), 1);
                if (ref < 0) {
                    sh->nind = (uint8_t)i;
                    unbuild(d, sh);
                    return d->inflight_reqs ? BUILD_WAIT : ref;
                }
                sh->ind_pg[i] = -1;
                sh->ind_ref[i] = (grant_ref_t)ref;
                d->grants_inflight++;
                sh->nind = (uint8_t)(i + 1);
                continue;
            }
            for (unsigned int k = 0; k < n; k++) {
                struct seginfo *s = &sh->seg[first + k];
                page[k].gref = s->ref;
                page[k].first_sect = (uint8_t)(s->off >> SECTOR_SHIFT);
                page[k].last_sect = (uint8_t)((s->off + s->len - 1) >> SECTOR_SHIFT);
            }
            sh->nind = (uint8_t)(i + 1);
        }
        req = (struct blkif_request_indirect *)&next_slot(d)->req;
        req->operation = BLKIF_OP_INDIRECT;
        req->indirect_op = op;
        req->nr_segments = (uint16_t)nseg;
        req->id = req_id(d, sh);
        req->sector_number = io->sector + (sh->off >> SECTOR_SHIFT);
        req->handle = (uint16_t)d->devid;
        for (i = 0; i < nind; i++)
            req->indirect_grefs[i] = sh->ind_ref[i];
        d->st.indirect_requests++;
    }
    d->req_prod_pvt++;
    io->issued += chunk;
    io->outstanding++;
    io->nreqs++;
    d->st.ring_requests++;
    return BUILD_OK;
}

/* FLUSH, DISCARD, or a barrier without data: one request, no segments. */
static int build_nodata(struct blkfront_dev *d, struct blk_io *io)
{
    struct shadow *sh = get_shadow(d);
    union blkif_sring_entry *e;

    if (!sh)
        return BUILD_WAIT;
    sh->io = io;
    sh->off = 0;
    sh->len = 0;
    sh->op = io->op;
    sh->indirect = 0;
    e = next_slot(d);
    if (io->op == BLKIF_OP_DISCARD) {
        struct blkif_request_discard *r = (struct blkif_request_discard *)&e->req;
        r->operation = BLKIF_OP_DISCARD;
        r->flag = io->discard_flags & BLKIF_DISCARD_SECURE;
        r->handle = (uint16_t)d->devid;
        r->id = req_id(d, sh);
        r->sector_number = io->sector;
        r->nr_sectors = io->len >> SECTOR_SHIFT;
    } else {
        e->req.operation = io->op;
        e->req.nr_segments = 0;
        e->req.handle = (uint16_t)d->devid;
        e->req.id = req_id(d, sh);
        e->req.sector_number = io->op == BLKIF_OP_FLUSH_DISKCACHE ? 0 : io->sector;
    }
    d->req_prod_pvt++;
    io->sent = 1;
    io->outstanding++;
    io->nreqs++;
    d->st.ring_requests++;
    return BUILD_OK;
}

/* Put as much of the I/O list on the ring as fits.  Events masked. */
static void kick_queue(struct blkfront_dev *d)
{
    struct blk_io *io, *next;
    uint32_t old, newp;
    int pushed = 0;

    if (!d->connected || d->draining || !d->sring)
        return;
    while (d->cursor && fully_issued(d->cursor))
        d->cursor = d->cursor->next;
    for (io = d->cursor; io; io = next) {
        next = io->next;
        if (fully_issued(io))
            continue;
        /* A flush goes out once everything before it has completed. */
        if (io->op == BLKIF_OP_FLUSH_DISKCACHE && io != d->head)
            break;
        while (!fully_issued(io)) {
            int rc;
            if (d->req_prod_pvt - d->rsp_cons >= d->ring_size)
                goto out;
            if (io->len && io->op != BLKIF_OP_DISCARD)
                rc = build_rw(d, io);
            else
                rc = build_nodata(d, io);
            if (rc == BUILD_WAIT)
                goto out;
            if (rc < 0) {
                /* Could not grant anything with nothing in flight: give up
                 * on the rest of this I/O. */
                io->len = io->issued;
                io->sent = 1;
                if (!io->status)
                    io->status = rc;
                io_maybe_finish(d, io);
                break;
            }
            pushed++;
        }
    }
out:
    if (!pushed)
        return;
    /* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY */
    old = d->sring->req_prod;
    newp = d->req_prod_pvt;
    wmb();
    WRITE_ONCE(d->sring->req_prod, newp);
    mb();
    if ((uint32_t)(newp - READ_ONCE(d->sring->req_event)) < (uint32_t)(newp - old)) {
        d->st.notifies++;
        notify_remote_via_evtchn((evtchn_port_t)d->port);
    }
}

static void blk_event(evtchn_port_t port, struct pt_regs *regs, void *data)
{
    struct blkfront_dev *d = data;

    (void)regs;
    if (!d->sring || (int)port != d->port)
        return;
    d->st.events++;
    /* While a thread polls the ring, events stay off: it arms them again
     * before it sleeps (NAPI's rule). */
    consume_responses(d, !d->polling);
    kick_queue(d);
    waitq_wake_all(&waiters);
}

/* ---------------------------------------------------------------- */
/* Memory for shadows and the persistent pool (thread context) */

static void free_shadows(struct blkfront_dev *d)
{
    if (!d->shadow)
        return;
    for (unsigned int i = 0; i < d->nshadow; i++)
        for (unsigned int k = 0; k < MAX_IND_PAGES; k++)
            if (d->shadow[i].ind_page[k])
                free_pages(d->shadow[i].ind_page[k], 1);
    free_pages(d->shadow, d->shadow_pages);
    if (d->segmem)
        free_pages(d->segmem, d->seg_pages);
    d->shadow = NULL;
    d->segmem = NULL;
    d->nshadow = 0;
}

static int alloc_shadows(struct blkfront_dev *d, unsigned int n, unsigned int segs, int ind_pages)
{
    unsigned long spages = (n * sizeof(struct shadow) + PAGE_SIZE - 1) / PAGE_SIZE;
    unsigned long gpages = (n * segs * sizeof(struct seginfo) + PAGE_SIZE - 1) / PAGE_SIZE;
    unsigned int nind = (segs + BLKIF_SEGS_PER_INDIRECT_FRAME - 1) / BLKIF_SEGS_PER_INDIRECT_FRAME;

    free_shadows(d);
    d->shadow = alloc_pages(spages);
    if (!d->shadow)
        return -XEN_ENOMEM;
    d->segmem = alloc_pages(gpages);
    if (!d->segmem) {
        free_pages(d->shadow, spages);
        d->shadow = NULL;
        return -XEN_ENOMEM;
    }
    memset(d->shadow, 0, spages * PAGE_SIZE);
    d->shadow_pages = (unsigned int)spages;
    d->seg_pages = (unsigned int)gpages;
    d->nshadow = n;
    d->shadow_segs = segs;
    for (unsigned int i = 0; i < n; i++) {
        d->shadow[i].seg = d->segmem + (size_t)i * segs;
        d->shadow[i].next_free = i + 1 < n ? (int)(i + 1) : -1;
        if (ind_pages && segs > BLKIF_MAX_SEGMENTS_PER_REQUEST) {
            for (unsigned int k = 0; k < nind; k++) {
                d->shadow[i].ind_page[k] = alloc_page();
                if (!d->shadow[i].ind_page[k]) {
                    free_shadows(d);
                    return -XEN_ENOMEM;
                }
            }
        }
    }
    d->free_shadow = 0;
    d->inflight_reqs = 0;
    d->grants_inflight = 0;
    return 0;
}

/* park: some requests got no answer, so the backend may still name
 * these refs; otherwise they are simply ended. */
static void free_pool(struct blkfront_dev *d, int park)
{
    if (!d->pool)
        return;
    for (unsigned int i = 0; i < d->pool_n; i++) {
        /* The backend may still hold requests naming these refs: park
         * them like the grants of unanswered requests. */
        unsigned long flags = irq_save();
        int busy = gnttab_end_access(d->pool[i].ref) == -XEN_EBUSY;
        if (busy)
            xenbus_front_defer_end(d->pool[i].ref, d->pool[i].va);
        else if (park)
            park_freed();
        irq_restore(flags);
        if (!busy)
            free_pages(d->pool[i].va, 1);
    }
    free_pages(d->pool, d->pool_pages);
    d->pool = NULL;
    d->pool_free = NULL;
    d->pool_n = d->pool_nfree = 0;
    d->st.pgrants = 0;
}

static int alloc_pool(struct blkfront_dev *d, unsigned int cap)
{
    unsigned long bytes = cap * (sizeof(struct pgnt) + sizeof(int32_t));
    unsigned long pages = (bytes + PAGE_SIZE - 1) / PAGE_SIZE;

    d->pool = alloc_pages(pages);
    if (!d->pool)
        return -XEN_ENOMEM;
    d->pool_pages = (unsigned int)pages;
    d->pool_free = (int32_t *)(d->pool + cap);
    d->pool_n = d->pool_nfree = 0;
    for (unsigned int i = 0; i < cap; i++) {
        void *va = alloc_page();
        int ref;
        if (!va)
            break;
        memset(va, 0, PAGE_SIZE);
        /* Writable even for writes: the backend may map it for either (note 8). */
        ref = gnttab_grant_page(d->backend_id, va, 0);
        if (ref < 0) {
            free_pages(va, 1);
            break;
        }
        d->pool[i].va = va;
        d->pool[i].ref = (grant_ref_t)ref;
        d->pool_free[d->pool_nfree++] = (int32_t)i;
        d->pool_n++;
    }
    d->st.pgrants = d->pool_n;
    return (int)d->pool_n;
}

/* ---------------------------------------------------------------- */
/* XenStore helpers (thread context) */

/* The backend's key, the frontend's node (helpers in xenbus_front.c). */
#define be_read(d, key, buf, size) xenbus_node_read((d)->backend, key, buf, size)
#define fe_printf(d, t, ...) xenbus_node_printf(t, (d)->node, __VA_ARGS__)

static unsigned long be_ulong(struct blkfront_dev *d, const char *key, unsigned long dflt)
{
    char buf[32];
    const char *end;
    unsigned long v;

    if (be_read(d, key, buf, sizeof(buf)) <= 0)
        return dflt;
    v = simple_strtoul(buf, &end, 10);
    return end == buf ? dflt : v;
}

static int read_be_state(struct blkfront_dev *d)
{
    return xenbus_node_state(d->backend, XenbusStateUnknown);
}

static void fe_rm(struct blkfront_dev *d, xenbus_transaction_t t, const char *key)
{
    char path[96];
    snprintf(path, sizeof(path), "%s/%s", d->node, key);
    xenbus_rm(t, path);
}

static int switch_state(struct blkfront_dev *d, int state)
{
    int rc = xenbus_front_switch(d->tag, d->node, &d->fe_state, state);

    waitq_wake_all(&waiters);
    return rc;
}

/* ---------------------------------------------------------------- */
/* Ring setup and teardown (device thread) */

static void free_ring(struct blkfront_dev *d)
{
    xenbus_front_end_ring(d->sring, d->ring_pages, d->ring_ref);
    d->sring = NULL;
    d->ring_pages = 0;
}

/*
 * Take the ring down.  Responses already there are consumed; requests
 * that got none are rewound so they go out again on the next ring.
 */
static void teardown(struct blkfront_dev *d)
{
    unsigned long flags;
    unsigned int lost = 0;

    flags = irq_save();
    if (d->sring)
        process_responses(d);
    d->connected = 0;
    for (unsigned int i = 0; i < d->nshadow; i++) {
        struct shadow *sh = &d->shadow[i];
        struct blk_io *io = sh->io;
        if (!sh->in_use)
            continue;
        if (io->len && io->op != BLKIF_OP_DISCARD) {
            if (sh->off < io->issued)
                io->issued = sh->off;
        } else {
            io->sent = 0;
        }
        io->outstanding--;
        release_shadow(d, sh, 0, 2);
        put_shadow(d, sh);
        lost++;
    }
    d->st.redone += lost;
    d->cursor = d->head;
    if (d->port >= 0) {
        close_evtchn((evtchn_port_t)d->port);
        d->port = -1;
    }
    irq_restore(flags);
    if (d->sring)
        free_ring(d);
    free_pool(d, lost > 0);
    d->info.persistent = 0;
    if (lost)
        dlog(d, "blkfront: %s: %u requests in flight will be sent again\n", d->name, lost);
}

/* The ring's keys (one transaction: xenbus_front_publish). */
static int write_keys(xenbus_transaction_t t, void *arg)
{
    struct blkfront_dev *d = arg;
    unsigned int pages = d->ring_pages;
    int rc;

    if (pages == 1) {
        rc = fe_printf(d, t, "ring-ref", "%u", d->ring_ref[0]);
        if (!rc && d->wrote_multi) {
            fe_rm(d, t, "ring-page-order");
            fe_rm(d, t, "num-ring-pages");
            for (unsigned int i = 0; i < MAX_RING_PAGES; i++) {
                char key[16];
                snprintf(key, sizeof(key), "ring-ref%u", i);
                fe_rm(d, t, key);
            }
        }
    } else {
        rc = fe_printf(d, t, "ring-page-order", "%u", d->info.ring_order);
        if (!rc)
            rc = fe_printf(d, t, "num-ring-pages", "%u", pages);   /* blkif.h note 3 */
        for (unsigned int i = 0; !rc && i < pages; i++) {
            char key[16];
            snprintf(key, sizeof(key), "ring-ref%u", i);
            rc = fe_printf(d, t, key, "%u", d->ring_ref[i]);
        }
        if (!rc && d->wrote_single)
            fe_rm(d, t, "ring-ref");
    }
    if (!rc)
        rc = fe_printf(d, t, "event-channel", "%d", d->port);
    if (!rc)
        rc = fe_printf(d, t, "protocol", "%s", XEN_IO_PROTO_ABI_X86_64);
    if (!rc)
        rc = fe_printf(d, t, "feature-persistent", "%d", d->opts.persistent ? 1 : 0);
    return rc;
}

/* Allocate, grant and publish the ring; switch to Initialised. */
static int talk_to_backend(struct blkfront_dev *d)
{
    unsigned long be_order, be_pages, order;
    unsigned int pages;
    int rc, port;

    be_order = be_ulong(d, "max-ring-page-order", 0);
    be_pages = be_ulong(d, "max-ring-pages", 1);
    if (be_pages > 1) {
        unsigned long o = 0;
        while ((2UL << o) <= be_pages)
            o++;
        be_order = MAX(be_order, o);
    }
    d->info.max_ring_order = (unsigned int)be_order;
    d->be_persistent = be_ulong(d, "feature-persistent", 0) == 1;
    order = d->opts.ring_order >= 0 ? (unsigned long)d->opts.ring_order : DEFAULT_RING_ORDER;
    order = MIN(MIN(order, be_order), (unsigned long)MAX_RING_ORDER);
    pages = 1U << order;

    d->sring = alloc_pages(pages);
    if (!d->sring) {
        printk("blkfront: %s: no memory for a %u-page ring\n", d->name, pages);
        return -XEN_ENOMEM;
    }
    memset(d->sring, 0, pages * PAGE_SIZE);
    /* SHARED_RING_INIT */
    d->sring->req_prod = d->sring->rsp_prod = 0;
    d->sring->req_event = d->sring->rsp_event = 1;
    /* FRONT_RING_INIT: entries rounded down to a power of two */
    d->req_prod_pvt = d->rsp_cons = 0;
    d->ring_gen++;
    {
        uint32_t n = (uint32_t)((pages * PAGE_SIZE - offsetof(struct blkif_sring, ring)) /
                                sizeof(union blkif_sring_entry));
        uint32_t p2 = 1;
        while (p2 * 2 <= n)
            p2 *= 2;
        d->ring_size = p2;
    }
    d->ring_pages = 0;
    for (unsigned int i = 0; i < pages; i++) {
        rc = gnttab_grant_page(d->backend_id, (char *)d->sring + i * PAGE_SIZE, 0);
        if (rc < 0) {
            printk("blkfront: %s: granting ring page %u: %d\n", d->name, i, rc);
            for (unsigned int k = 0; k < d->ring_pages; k++)
                gnttab_end_access(d->ring_ref[k]);
            free_pages(d->sring, pages);
            d->sring = NULL;
            d->ring_pages = 0;
            return rc;
        }
        d->ring_ref[i] = (grant_ref_t)rc;
        d->ring_pages++;
    }
    d->info.ring_order = (unsigned int)order;
    d->info.ring_entries = d->ring_size;

    port = evtchn_alloc_unbound(d->backend_id, blk_event, d);
    if (port < 0) {
        printk("blkfront: %s: alloc_unbound(%u): %d\n", d->name, d->backend_id, port);
        free_ring(d);
        return port;
    }
    d->port = port;

    rc = xenbus_front_publish(write_keys, d);
    if (rc)
        goto fail;
    if (pages == 1)
        d->wrote_single = 1;
    else
        d->wrote_multi = 1;
    rc = switch_state(d, XenbusStateInitialised);
    if (rc)
        goto fail;
    dlog(d, "blkfront: %s: ring %u page%s (%u entries) ref%s %u%s port %d, Initialised\n",
         d->name, pages, pages > 1 ? "s" : "", d->ring_size, pages > 1 ? "s" : "",
         d->ring_ref[0], pages > 1 ? ".." : "", port);
    return 0;
fail:
    printk("blkfront: %s: publishing the ring: %s (%d)\n", d->name, xenbus_strerror(rc), rc);
    teardown(d);
    return rc;
}

/* The backend is Connected: read the disk's properties, switch to Connected. */
static int connect_backend(struct blkfront_dev *d)
{
    struct blkfront_info *in = &d->info;
    char mode[8];
    unsigned int segs, nind;
    int rc, persistent;

    in->sectors = be_ulong(d, "sectors", ~0UL);
    if (in->sectors == ~0UL) {
        printk("blkfront: %s: backend is Connected without 'sectors'\n", d->name);
        return -XEN_EINVAL;
    }
    in->sector_size = (unsigned int)be_ulong(d, "sector-size", 512);
    if (in->sector_size < 512 || in->sector_size > PAGE_SIZE ||
        (in->sector_size & (in->sector_size - 1))) {
        printk("blkfront: %s: unusable sector-size %u\n", d->name, in->sector_size);
        return -XEN_EINVAL;
    }
    in->physical_sector_size = (unsigned int)be_ulong(d, "physical-sector-size", in->sector_size);
    in->info = (unsigned int)be_ulong(d, "info", 0);
    in->readonly = !!(in->info & VDISK_READONLY);
    if (be_read(d, "mode", mode, sizeof(mode)) > 0 && mode[0] == 'r')
        in->readonly = 1;
    in->feature_flush = be_ulong(d, "feature-flush-cache", 0) == 1;
    in->feature_barrier = be_ulong(d, "feature-barrier", 0) == 1;
    in->feature_discard = be_ulong(d, "feature-discard", 0) == 1;
    in->discard_granularity = (unsigned int)be_ulong(d, "discard-granularity", in->sector_size);
    in->discard_alignment = (unsigned int)be_ulong(d, "discard-alignment", 0);
    in->discard_secure = be_ulong(d, "discard-secure", 0) == 1;
    in->feature_persistent = be_ulong(d, "feature-persistent", d->be_persistent) == 1;
    in->max_indirect = (unsigned int)be_ulong(d, "feature-max-indirect-segments", 0);

    segs = BLKIF_MAX_SEGMENTS_PER_REQUEST;
    if (in->max_indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST && d->opts.max_indirect > 0) {
        segs = MIN(in->max_indirect, (unsigned int)d->opts.max_indirect);
        segs = MIN(segs, (unsigned int)MAX_INDIRECT);
        if (segs < BLKIF_MAX_SEGMENTS_PER_REQUEST)
            segs = BLKIF_MAX_SEGMENTS_PER_REQUEST;
    }
    /* persistent=2: reuse a pool of grants even if the backend doesn't map
     * them persistently (blkif.h allows it; it tests the pool). */
    persistent = d->opts.persistent == 2 || (d->opts.persistent && in->feature_persistent);
    nind = segs > BLKIF_MAX_SEGMENTS_PER_REQUEST
         ? (segs + BLKIF_SEGS_PER_INDIRECT_FRAME - 1) / BLKIF_SEGS_PER_INDIRECT_FRAME : 0;

    if (!d->shadow || d->nshadow != d->ring_size || d->shadow_segs != segs ||
        (!persistent && nind && !d->shadow[0].ind_page[0])) {
        rc = alloc_shadows(d, d->ring_size, segs, !persistent);
        if (rc && segs > BLKIF_MAX_SEGMENTS_PER_REQUEST) {
            segs = BLKIF_MAX_SEGMENTS_PER_REQUEST;
            nind = 0;
            rc = alloc_shadows(d, d->ring_size, segs, 0);
        }
        if (rc) {
            printk("blkfront: %s: no memory for %u requests\n", d->name, d->ring_size);
            return rc;
        }
    }
    in->max_segs = segs;

    if (persistent) {
        unsigned int want = d->ring_size * (segs + nind);
        unsigned int cap = d->opts.grant_budget ? d->opts.grant_budget : DEFAULT_POOL;
        if (want < cap)
            cap = want;
        if (cap < segs + nind)
            cap = segs + nind;
        /* Keep at least a quarter of the free memory. */
        if (cap > mm_free_pages() * 3 / 4)
            cap = (unsigned int)(mm_free_pages() * 3 / 4);
        rc = alloc_pool(d, cap);
        if (rc < (int)(segs + nind)) {
            printk("blkfront: %s: only %d persistent grant pages; not using persistent grants\n",
                   d->name, rc);
            free_pool(d, 0);
            persistent = 0;
            if (nind && !d->shadow[0].ind_page[0]) {
                rc = alloc_shadows(d, d->ring_size, segs, 1);
                if (rc) {
                    segs = BLKIF_MAX_SEGMENTS_PER_REQUEST;
                    rc = alloc_shadows(d, d->ring_size, segs, 0);
                    if (rc)
                        return rc;
                    in->max_segs = segs;
                }
            }
        }
    }
    in->persistent = persistent;

    rc = switch_state(d, XenbusStateConnected);
    if (rc)
        return rc;
    d->generation++;
    {
        unsigned long flags = irq_save();
        d->connected = 1;
        d->draining = 0;
        d->cursor = d->head;
        kick_queue(d);
        irq_restore(flags);
    }
    {
        char feat[128];
        blkfront_features(d, feat, sizeof(feat));
        dlog(d, "blkfront: %s: Connected sectors=%lu sector-size=%u info=0x%x %s "
             "segs=%u persistent=%d pool=%u features=%s\n", d->name,
             (unsigned long)in->sectors, in->sector_size, in->info,
             in->readonly ? "ro" : "rw", in->max_segs, in->persistent, d->pool_n, feat);
    }
    waitq_wake_all(&waiters);
    return 0;
}

/* Stop issuing; give the backend up to DRAIN_TIMEOUT to answer what it has. */
static int nothing_in_flight(void *arg)
{
    struct blkfront_dev *d = arg;
    return d->inflight_reqs == 0 || !d->sring;
}

static void drain(struct blkfront_dev *d)
{
    unsigned long flags = irq_save();
    d->draining = 1;
    irq_restore(flags);
    if (d->sring && d->inflight_reqs) {
        arm_events(d);
        waitq_wait(&waiters, nothing_in_flight, d, monotonic_ns() + DRAIN_TIMEOUT);
    }
}

/* ---------------------------------------------------------------- */
/* The state machine (device thread, under dev->lock) */

static int lock_free(void *arg)
{
    return !((struct blkfront_dev *)arg)->lock;
}

static void dev_lock(struct blkfront_dev *d)
{
    while (d->lock)
        waitq_wait(&waiters, lock_free, d, 0);
    d->lock = 1;
}

static void dev_unlock(struct blkfront_dev *d)
{
    d->lock = 0;
    waitq_wake_all(&waiters);
}

static int watch_backend(struct blkfront_dev *d)
{
    return xenbus_front_watch_backend(d->tag, &d->be_watch, &d->be_watch_on, d->backend,
                                      xenbus_front_kick_cb, &d->kick);
}

/* Read backend and backend-id; 0, or -errno (-XEN_ENOENT: no device). */
static int read_frontend(struct blkfront_dev *d, int *changed)
{
    return xenbus_front_read_backend(d->node, d->backend, sizeof(d->backend), &d->backend_id,
                                     changed);
}

static void device_removed(struct blkfront_dev *d)
{
    unsigned long flags;

    dlog(d, "blkfront: %s: device removed\n", d->name);
    teardown(d);
    d->gone = 1;
    d->fe_state = XenbusStateUnknown;
    d->be_state = XenbusStateUnknown;
    if (d->be_watch_on) {
        xenbus_unwatch(&d->be_watch);
        d->be_watch_on = 0;
    }
    d->backend[0] = '\0';
    flags = irq_save();
    fail_all(d, -XEN_ENODEV);
    irq_restore(flags);
    waitq_wake_all(&waiters);
}

static void step(struct blkfront_dev *d)
{
    int rc, changed, be, fe;

    rc = read_frontend(d, &changed);
    if (rc == -XEN_ENOENT) {
        if (!d->gone)
            device_removed(d);
        return;
    }
    if (rc < 0)
        return;
    if (d->gone) {
        d->gone = 0;
        d->fatal = 0;
        d->fe_state = xenbus_node_state(d->node, XenbusStateInitialising);
        dlog(d, "blkfront: %s: device is back, backend %s\n", d->name, d->backend);
        changed = 1;
    }
    if (changed) {
        if (d->sring) {
            dlog(d, "blkfront: %s: backend moved to %s (dom %u)\n", d->name, d->backend,
                 d->backend_id);
            drain(d);
            teardown(d);
            switch_state(d, XenbusStateInitialising);
        }
        d->be_state = -1;
        watch_backend(d);
    }
    if (d->closing_by_us || d->fatal)
        return;

    be = read_be_state(d);
    fe = d->fe_state;
    if (be != d->be_state) {
        dlog(d, "blkfront: %s: backend state %s (frontend %s)\n", d->name,
             xenbus_state_name(be), xenbus_state_name(fe));
        d->be_state = be;
    }
    switch (be) {
    case XenbusStateInitWait:
    case XenbusStateInitialised:
        if (fe == XenbusStateInitialised && d->sring)
            break;                      /* published; waiting for Connected */
        if (fe == XenbusStateConnected || d->sring) {
            /* The backend started over (restarted or re-attached). */
            dlog(d, "blkfront: %s: backend re-initialised, reconnecting\n", d->name);
            drain(d);
            teardown(d);
        }
        if (talk_to_backend(d))
            d->fatal = 1;
        break;
    case XenbusStateConnected:
        if (fe == XenbusStateConnected && d->connected)
            break;
        if (fe != XenbusStateInitialised || !d->sring) {
            if (d->sring)
                teardown(d);
            if (talk_to_backend(d)) {
                d->fatal = 1;
                break;
            }
        }
        if (connect_backend(d)) {
            printk("blkfront: %s: cannot use the backend; closing\n", d->name);
            d->fatal = 1;
            teardown(d);
            switch_state(d, XenbusStateClosed);
        }
        break;
    case XenbusStateClosing:
        if (fe == XenbusStateClosed)
            break;
        dlog(d, "blkfront: %s: backend is closing\n", d->name);
        drain(d);
        teardown(d);
        switch_state(d, XenbusStateClosed);
        break;
    case XenbusStateClosed:
        if (fe == XenbusStateClosed || fe == XenbusStateInitialising)
            break;
        drain(d);
        teardown(d);
        switch_state(d, XenbusStateClosed);
        break;
    default:        /* Unknown (gone), Initialising, Reconfiguring... */
        if (d->sring) {
            dlog(d, "blkfront: %s: backend went away (state %s)\n", d->name,
                 xenbus_state_name(be));
            drain(d);
            teardown(d);
            switch_state(d, XenbusStateInitialising);
        }
        break;
    }
}

static void dev_thread(void *arg)
{
    struct blkfront_dev *d = arg;
    struct xenbus_front_wait k = { &d->kick, 0, &d->exiting };

    for (;;) {
        uint64_t dl = xenbus_front_deferred() ? monotonic_ns() + 100 * NSEC_PER_MSEC
                    : nquarantine ? monotonic_ns() + NSEC_PER_SEC : 0;
        waitq_wait(&waiters, xenbus_front_kicked, &k, dl);
        if (d->exiting)
            break;
        k.seen = d->kick.kicks;
        dev_lock(d);
        step(d);
        dev_unlock(d);
        if (xenbus_front_deferred())
            xenbus_front_retry_deferred();
        if (nquarantine)
            release_quarantine();
    }
    d->thread = NULL;
    waitq_wake_all(&waiters);
}

/* ---------------------------------------------------------------- */
/* API */

void blkfront_opts_from_cmdline(struct blkfront_opts *o, const char *cmdline)
{
    memset(o, 0, sizeof(*o));
    o->persistent = -1;
    o->ring_order = -1;
    o->max_indirect = -1;
    if (cmdline_find(cmdline, "persistent", NULL))
        o->persistent = (int)cmdline_get_ulong(cmdline, "persistent", 1);
    if (cmdline_find(cmdline, "ring_order", NULL))
        o->ring_order = (int)cmdline_get_ulong(cmdline, "ring_order", 0);
    if (cmdline_find(cmdline, "indirect", NULL))
        o->max_indirect = (int)cmdline_get_ulong(cmdline, "indirect", DEFAULT_INDIRECT);
    o->grant_budget = (unsigned int)cmdline_get_ulong(cmdline, "grants", 0);
    o->timeout_ns = cmdline_get_ulong(cmdline, "timeout", 0) * NSEC_PER_SEC;
    o->quiet = (int)cmdline_get_ulong(cmdline, "quiet", 0);
    o->coalesce = -1;
    if (cmdline_find(cmdline, "coalesce", NULL))
        o->coalesce = (int)cmdline_get_ulong(cmdline, "coalesce", 1);
    o->poll_us = (unsigned int)cmdline_get_ulong(cmdline, "poll", 0);
}

unsigned long blk_cmdline_size(const char *cmdline, const char *key, unsigned long dflt)
{
    char buf[32];
    const char *end;
    unsigned long v;

    if (!cmdline_get_str(cmdline, key, buf, sizeof(buf)) || !buf[0])
        return dflt;
    v = simple_strtoul(buf, &end, 0);
    if (end == buf)
        return dflt;
    switch (*end) {
    case 'k': case 'K': v <<= 10; break;
    case 'm': case 'M': v <<= 20; break;
    case 'g': case 'G': v <<= 30; break;
    default: break;
    }
    return v;
}

/* Pick the device: by number, or the lowest under device/vbd. */
static int find_vbd(const char *vdev, unsigned int *devid, uint64_t deadline)
{
    static struct xenbus_watch vbd_watch;
    static char list[1024];
    unsigned int want = 0;
    int rc;

    if (vdev && *vdev) {
        rc = blkfront_parse_vdev(vdev, &want);
        if (rc) {
            printk("blkfront: cannot parse vdev '%s'\n", vdev);
            return rc;
        }
    }
    return xenbus_front_find("blkfront", "device/vbd", vdev && *vdev ? (long)want : -1, devid,
                             deadline, &vbd_watch, list, sizeof(list));
}

static int open_done(void *arg)
{
    struct blkfront_dev *d = arg;
    return (d->connected && d->fe_state == XenbusStateConnected) || d->fatal;
}

struct blkfront_dev *blkfront_open(const char *vdev, const struct blkfront_opts *opts, int *err)
{
    struct blkfront_dev *d = NULL;
    struct blkfront_opts o;
    unsigned int devid;
    uint64_t deadline;
    int rc, changed;

    if (opts)
        o = *opts;
    else
        blkfront_opts_from_cmdline(&o, NULL);
    /* Persistent grants by default off: on pyxen a backend's per-request
     * grant hold costs a compare-and-swap, while persistent grants cost us a
     * copy of every byte (and cap what is in flight at the pool).  On Xen,
     * where they save the backend a map and unmap per page, persistent=1. */
    if (o.persistent < 0)
        o.persistent = 0;
    if (o.max_indirect < 0)
        o.max_indirect = DEFAULT_INDIRECT;
    /* o.grant_budget stays 0 when not given: see data_budget() */
    if (!o.timeout_ns)
        o.timeout_ns = DEFAULT_TIMEOUT;
    if (o.coalesce < 0)
        o.coalesce = 1;
    deadline = monotonic_ns() + o.timeout_ns;

    rc = xenbus_front_ready("blkfront", "block devices");
    if (rc)
        goto out;
    rc = find_vbd(vdev, &devid, deadline);
    if (rc) {
        printk("blkfront: no virtual block device%s%s under device/vbd\n",
               vdev && *vdev ? " " : "", vdev ? vdev : "");
        goto out;
    }
    for (int i = 0; i < MAX_DEVS; i++) {
        if (devs[i].used && devs[i].devid == devid) {
            printk("blkfront: device %u is already open\n", devid);
            rc = -XEN_EBUSY;
            goto out;
        }
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
    d->opts = o;
    d->port = -1;
    d->free_shadow = -1;
    d->be_state = -1;
    blkfront_devid_name(devid, d->name, sizeof(d->name));
    snprintf(d->tag, sizeof(d->tag), "blkfront: %s", d->name);
    snprintf(d->node, sizeof(d->node), "device/vbd/%u", devid);
    rc = read_frontend(d, &changed);
    if (rc) {
        printk("blkfront: %s: reading %s: %s\n", d->name, d->node, xenbus_strerror(rc));
        goto out_free;
    }
    d->fe_state = xenbus_node_state(d->node, XenbusStateUnknown);
    dlog(d, "blkfront: %s: %s, backend %s (dom %u), state %s\n", d->name, d->node,
         d->backend, d->backend_id, xenbus_state_name(d->fe_state));
    if (d->fe_state != XenbusStateInitialising && d->fe_state != XenbusStateClosed)
        switch_state(d, XenbusStateInitialising);   /* a previous user's leftovers */

    rc = xenbus_watch(&d->fe_watch, d->node, xenbus_front_kick_cb, &d->kick);
    if (rc) {
        printk("blkfront: %s: watch %s: %s\n", d->name, d->node, xenbus_strerror(rc));
        goto out_free;
    }
    d->fe_watch_on = 1;
    if (watch_backend(d))
        goto out_unwatch;
    xenbus_front_kick(&d->kick);
    d->thread = create_thread("blkfront", dev_thread, d);
    if (!d->thread) {
        rc = -XEN_ENOMEM;
        goto out_unwatch;
    }
    if (!waitq_wait(&waiters, open_done, d, deadline) || d->fatal) {
        printk("blkfront: %s: not connected after %lu s (frontend %s, backend %s)\n",
               d->name, (unsigned long)(o.timeout_ns / NSEC_PER_SEC),
               xenbus_state_name(d->fe_state), xenbus_state_name(d->be_state));
        rc = -XEN_ETIMEDOUT_BLK;
        /* Leave the device thread running: the backend may still come. */
        goto out;
    }
    if (err)
        *err = 0;
    return d;

out_unwatch:
    if (d->be_watch_on)
        xenbus_unwatch(&d->be_watch);
    if (d->fe_watch_on)
        xenbus_unwatch(&d->fe_watch);
out_free:
    d->used = 0;
out:
    if (err)
        *err = rc;
    return NULL;
}

static int thread_gone(void *arg)
{
    return ((struct blkfront_dev *)arg)->thread == NULL;
}

void blkfront_close(struct blkfront_dev *d)
{
    uint64_t deadline;
    int be;

    if (!d || !d->used)
        return;
    dev_lock(d);
    d->closing_by_us = 1;
    if (!d->gone) {
        drain(d);
        switch_state(d, XenbusStateClosing);
        deadline = monotonic_ns() + DRAIN_TIMEOUT;
        for (;;) {
            be = read_be_state(d);
            if (be >= XenbusStateClosing || be == XenbusStateUnknown ||
                monotonic_ns() >= deadline)
                break;
            msleep(5);
        }
        teardown(d);
        switch_state(d, XenbusStateClosed);
        deadline = monotonic_ns() + DRAIN_TIMEOUT;
        while (read_be_state(d) != XenbusStateClosed && read_be_state(d) != XenbusStateUnknown &&
               monotonic_ns() < deadline)
            msleep(5);
        be = read_be_state(d);
        dlog(d, "blkfront: %s: closed (backend %s)\n", d->name, xenbus_state_name(be));
    }
    {
        unsigned long flags = irq_save();
        fail_all(d, -XEN_ENODEV);
        irq_restore(flags);
    }
    d->exiting = 1;
    dev_unlock(d);
    waitq_wake_all(&waiters);
    if (d->thread)
        waitq_wait(&waiters, thread_gone, d, monotonic_ns() + NSEC_PER_SEC);
    if (d->be_watch_on)
        xenbus_unwatch(&d->be_watch);
    if (d->fe_watch_on)
        xenbus_unwatch(&d->fe_watch);
    d->be_watch_on = d->fe_watch_on = 0;
    xenbus_front_retry_deferred();
    free_shadows(d);
    d->used = 0;
}

const struct blkfront_info *blkfront_get_info(struct blkfront_dev *d) { return &d->info; }
const char *blkfront_name(struct blkfront_dev *d) { return d->name; }
unsigned int blkfront_devid(struct blkfront_dev *d) { return d->devid; }
int blkfront_connected(struct blkfront_dev *d) { return d->connected; }
int blkfront_gone(struct blkfront_dev *d) { return d->gone; }
unsigned int blkfront_generation(struct blkfront_dev *d) { return d->generation; }

void blkfront_features(struct blkfront_dev *d, char *buf, size_t size)
{
    const struct blkfront_info *in = &d->info;
    size_t n = 0;

    buf[0] = '\0';
#define ADD(...) do { if (n < size) n += (size_t)snprintf(buf + n, size - n, __VA_ARGS__); } while (0)
    if (in->feature_flush)
        ADD("%sflush", n ? "," : "");
    if (in->feature_barrier)
        ADD("%sbarrier", n ? "," : "");
    if (in->feature_discard)
        ADD("%sdiscard", n ? "," : "");
    if (in->feature_persistent)
        ADD("%spersistent", n ? "," : "");
    if (in->max_indirect)
        ADD("%sindirect=%u", n ? "," : "", in->max_indirect);
    if (in->max_ring_order)
        ADD("%sring-order=%u", n ? "," : "", in->max_ring_order);
    if (in->readonly)
        ADD("%sreadonly", n ? "," : "");
    if (!n)
        ADD("none");
#undef ADD
}

void blkfront_dump(struct blkfront_dev *d)
{
    unsigned long flags = irq_save();
    const struct blkif_sring *s = d->sring;

    if (s)
        printk("blkfront: %s: ring req_prod=%u req_event=%u rsp_prod=%u rsp_event=%u "
               "ours: req_prod_pvt=%u rsp_cons=%u in flight=%u grants=%u gen=%u port=%d "
               "connected=%d draining=%d fe=%s be=%s\n", d->name,
               READ_ONCE(s->req_prod), READ_ONCE(s->req_event), READ_ONCE(s->rsp_prod),
               READ_ONCE(s->rsp_event), d->req_prod_pvt, d->rsp_cons, d->inflight_reqs,
               d->grants_inflight, d->ring_gen, d->port, d->connected, d->draining,
               xenbus_state_name(d->fe_state), xenbus_state_name(d->be_state));
    else
        printk("blkfront: %s: no ring; fe=%s be=%s gone=%d\n", d->name,
               xenbus_state_name(d->fe_state), xenbus_state_name(d->be_state), d->gone);
    irq_restore(flags);
}

void blkfront_get_stats(struct blkfront_dev *d, struct blkfront_stats *st)
{
    unsigned long flags = irq_save();
    *st = d->st;
    irq_restore(flags);
}

int blkfront_submit(struct blkfront_dev *d, struct blk_io *io)
{
    const struct blkfront_info *in = &d->info;
    unsigned int ss = in->sector_size ? in->sector_size : 512;
    unsigned long flags;
    int data = io->op == BLKIF_OP_READ || io->op == BLKIF_OP_WRITE ||
               io->op == BLKIF_OP_WRITE_BARRIER;

    io->complete = 0;
    io->status = 0;
    io->rsp_status = 0;
    io->issued = 0;
    io->outstanding = 0;
    io->nreqs = 0;
    io->sent = 0;
    io->prev = io->next = NULL;
    if (d->gone || !d->used)
        return -XEN_ENODEV;
    switch (io->op) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
    case BLKIF_OP_WRITE_BARRIER:
    case BLKIF_OP_FLUSH_DISKCACHE:
    case BLKIF_OP_DISCARD:
        break;
    default:
        return -XEN_EINVAL;
    }
    if (data) {
        if (io->len % ss || ((uintptr_t)io->buf & (ss - 1)) || (io->sector & ((ss >> 9) - 1)))
            return -XEN_EINVAL;
        if (io->len && !io->buf)
            return -XEN_EINVAL;
        if (!io->len && io->op != BLKIF_OP_WRITE_BARRIER)
            return -XEN_EINVAL;
    }
    if (io->op == BLKIF_OP_DISCARD && (!io->len || io->len % 512))
        return -XEN_EINVAL;
    if (io->op == BLKIF_OP_FLUSH_DISKCACHE)
        io->len = 0;
    if (io->flags & BLK_IO_NOCHECK)
        goto queue;
    if ((data || io->op == BLKIF_OP_DISCARD) && in->sectors &&
        (io->sector > in->sectors || (io->len >> SECTOR_SHIFT) > in->sectors - io->sector))
        return -XEN_EINVAL;
    if (in->readonly && io->op != BLKIF_OP_READ && io->op != BLKIF_OP_FLUSH_DISKCACHE)
        return -XEN_EROFS;
    if ((io->op == BLKIF_OP_WRITE_BARRIER && !in->feature_barrier) ||
        (io->op == BLKIF_OP_FLUSH_DISKCACHE && !in->feature_flush) ||
        (io->op == BLKIF_OP_DISCARD && !in->feature_discard))
        return -XEN_EOPNOTSUPP;
queue:
    io->submit_ns = monotonic_ns();
    flags = irq_save();
    io->prev = d->tail;
    if (d->tail)
        d->tail->next = io;
    else
        d->head = io;
    d->tail = io;
    if (!d->cursor)
        d->cursor = io;
    d->st.ios++;
    kick_queue(d);
    irq_restore(flags);
    return 0;
}

struct io_wait {
    struct blk_io *io;
};

static int io_complete(void *arg)
{
    return ((struct io_wait *)arg)->io->complete;
}

int blkfront_wait_io(struct blkfront_dev *d, struct blk_io *io, uint64_t deadline_ns)
{
    struct io_wait w = { io };

    if (!io->complete)
        arm_events(d);
    return waitq_wait(&waiters, io_complete, &w, deadline_ns);
}

struct any_wait {
    struct blkfront_dev *d;
    unsigned long seen;
};

static int any_complete(void *arg)
{
    struct any_wait *a = arg;
    return a->d->completions != a->seen;
}

/* Spin up to poll_us for a response on the ring; consume what came.  Saves
 * the event's round trip through the hypervisor when I/Os complete quickly. */
static void poll_responses(struct blkfront_dev *d)
{
    uint64_t end = monotonic_ns() + (uint64_t)d->opts.poll_us * 1000;

    unsigned long flags;

    d->polling++;
    do {
        struct blkif_sring *s = READ_ONCE(d->sring);
        if (s && READ_ONCE(s->rsp_prod) != d->rsp_cons) {
            flags = irq_save();
            d->st.polled++;
            consume_responses(d, 0);
            kick_queue(d);
            irq_restore(flags);
            d->polling--;
            waitq_wake_all(&waiters);
            return;
        }
        cpu_relax();
    } while (monotonic_ns() < end);
    d->polling--;
    /* nothing came: arm rsp_event (and take what raced in) before sleeping */
    arm_events(d);
}

int blkfront_wait_any(struct blkfront_dev *d, unsigned long *seen, uint64_t deadline_ns)
{
    struct any_wait a = { d, *seen };

    if (d->opts.poll_us && d->completions == *seen)
        poll_responses(d);

    if (!waitq_wait(&waiters, any_complete, &a, deadline_ns))
        return 0;
    *seen = d->completions;
    return 1;
}

static int is_connected(void *arg)
{
    return ((struct blkfront_dev *)arg)->connected;
}

int blkfront_wait_connected(struct blkfront_dev *d, uint64_t deadline_ns)
{
    return waitq_wait(&waiters, is_connected, d, deadline_ns) && d->connected;
}

static int is_gone(void *arg)
{
    return ((struct blkfront_dev *)arg)->gone;
}

int blkfront_wait_gone(struct blkfront_dev *d, uint64_t deadline_ns)
{
    return waitq_wait(&waiters, is_gone, d, deadline_ns);
}

int blkfront_rw(struct blkfront_dev *d, uint8_t op, uint64_t sector, void *buf, size_t len)
{
    struct blk_io io;
    int rc;

    memset(&io, 0, sizeof(io));
    io.op = op;
    io.sector = sector;
    io.buf = buf;
    io.len = len;
    rc = blkfront_submit(d, &io);
    if (rc)
        return rc;
    if (!blkfront_wait_io(d, &io, monotonic_ns() + 60 * NSEC_PER_SEC)) {
        /* The I/O is still queued and refers to our stack: it must not
         * complete later.  Pull it out if it is not on the ring. */
        unsigned long flags = irq_save();
        if (!io.complete && !io.outstanding)
            io_unlink(d, &io);
        irq_restore(flags);
        if (!io.complete && io.outstanding)
            panic("blkfront: %s: request on the ring for 60 s\n", d->name);
        return -XEN_ETIMEDOUT_BLK;
    }
    return io.status;
}
