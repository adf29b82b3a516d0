/*
 * gntbench: grant copy throughput (GNTTABOP_copy) between two domains.
 *
 *   role=src peer=<copier> [pages=16]
 *       fills `pages` pages with a known pattern, grants them read-only to
 *       the copier (consecutive refs) and prints
 *         "gntbench: offer peer=<copier> gref=<first ref> pages=<n>"
 *       then holds the grants (sleeping) until destroyed, or for hold_s
 *       seconds (default 600), after which it revokes them and powers off.
 *
 *   role=copy [mib=64] [batch=16] (batch: 1..4096 ops per hypercall)
 *       waits (up to 120 s) for its own XenStore key data/gntbench/offer =
 *       "<src domid> <first ref> <pages>" (the toolstack writes it after
 *       reading the src's offer line), copies one batch as a warm-up and
 *       checks it, then copies `mib` MiB in 4 KiB chunks, `batch` chunks per
 *       GNTTABOP_copy hypercall, cycling over the granted pages into as many
 *       local pages, checks every local page against the pattern, and prints
 *         "gntbench: done bytes=<B> ns=<t> mb_per_s=<x> chunk=4096 batch=<b>
 *          hypercalls=<h> per_call_ns=<t/h> best_call_ns=<min>"
 *       then powers off.
 *
 * Any failure prints "gntbench: FAIL ..." and crashes the domain.
 */
#include "app.h"
#include "gnttab.h"
#include "xenbus.h"

const char app_name[] = "gntbench";

#define MAX_PAGES       256
#define MAX_BATCH       4096
#define CHUNK           PAGE_SIZE
#define OFFER_TIMEOUT   (120 * NSEC_PER_SEC)

static struct gnttab_copy ops[MAX_BATCH];

static inline uint8_t pattern(unsigned long page, unsigned long j)
{
    return (uint8_t)(page * 131 + j * 7 + 3);
}

/* ---- src ---- */

static int role_src(unsigned long peer, unsigned long pages, unsigned long hold_s)
{
    uint8_t *buf;
    int first = -1;

    if (!peer || peer >= DOMID_SELF)
        app_fail("role=src needs peer=<domid of the copier>");
    if (!pages || pages > MAX_PAGES)
        app_fail("pages=%lu (1..%d)", pages, MAX_PAGES);
    if (!gnttab_ready())
        app_fail("no grant table");
    buf = alloc_pages(pages);
    if (!buf)
        app_fail("no memory for %lu pages", pages);
    for (unsigned long p = 0; p < pages; p++)
        for (unsigned long j = 0; j < PAGE_SIZE; j++)
            buf[p * PAGE_SIZE + j] = pattern(p, j);
    wmb();
    for (unsigned long p = 0; p < pages; p++) {
        int ref = gnttab_grant_page((domid_t)peer, buf + p * PAGE_SIZE, 1);
        if (ref < 0)
            app_fail("grant page %lu: %d", p, ref);
        if (p == 0)
            first = ref;
        else if (ref != first + (int)p)
            app_fail("grant refs not consecutive (%d after %d)", ref, first);
    }
    printk("gntbench: offer peer=%lu gref=%d pages=%lu\n", peer, first, pages);

    for (unsigned long s = 0; s < hold_s; s++)
        msleep(1000);
    for (unsigned long p = 0; p < pages; p++)
        while (gnttab_end_access((grant_ref_t)(first + (int)p)) == -XEN_EBUSY)
            msleep(10);
    printk("gntbench: src done\n");
    poweroff();
}

/* ---- copy ---- */

static void fill_batch(unsigned long peer, unsigned long gref, unsigned long pages,
                       uint8_t *dst, unsigned long k0, unsigned int n)
{
    for (unsigned int i = 0; i < n; i++) {
        unsigned long p = (k0 + i) % pages;
        ops[i] = (struct gnttab_copy){
            .source = { .u.ref = (grant_ref_t)(gref + p), .domid = (domid_t)peer, .offset = 0 },
            .dest = { .u.gmfn = virt_to_mfn(dst + p * PAGE_SIZE), .domid = DOMID_SELF,
                      .offset = 0 },
            .len = CHUNK,
            .flags = GNTCOPY_source_gref,
        };
    }
}

static void do_batch(unsigned int n, unsigned long k0)
{
    long rc = gnttab_copy(ops, n);

    if (rc)
        app_fail("GNTTABOP_copy(%u ops) at chunk %lu: rc=%ld", n, k0, rc);
    for (unsigned int i = 0; i < n; i++)
        if (ops[i].status != GNTST_okay)
            app_fail("copy op %u at chunk %lu: status %d (%s)", i, k0, ops[i].status,
                 gnttab_strerror(ops[i].status));
}

static void check_pages(const uint8_t *dst, unsigned long from, unsigned long n, const char *when)
{
    for (unsigned long p = from; p < from + n; p++)
        for (unsigned long j = 0; j < PAGE_SIZE; j++)
            if (dst[p * PAGE_SIZE + j] != pattern(p, j))
                app_fail("%s: page %lu byte %lu = 0x%x, want 0x%x", when, p, j,
                     dst[p * PAGE_SIZE + j], pattern(p, j));
}

static int role_copy(unsigned long mib, unsigned long batch)
{
    char offer[64];
    const char *s;
    unsigned long peer, gref, pages, chunks, calls = 0;
    uint64_t deadline, t0, t1, best = ~0ULL;
    uint8_t *dst;
    int rc;

    if (!batch || batch > MAX_BATCH)
        app_fail("batch=%lu (1..%d)", batch, MAX_BATCH);
    if (!xenbus_available())
        app_fail("no xenstore (the offer comes through data/gntbench/offer)");
    deadline = monotonic_ns() + OFFER_TIMEOUT;
    printk("gntbench: role=copy waiting for data/gntbench/offer\n");
    while ((rc = xenbus_read(XBT_NIL, "data/gntbench/offer", offer, sizeof(offer))) <= 0) {
        if ((rc < 0 && rc != -XEN_ENOENT) || monotonic_ns() >= deadline)
            app_fail("read data/gntbench/offer: %s (%d)", rc ? xenbus_strerror(rc) : "empty", rc);
        msleep(5);
    }
    peer = simple_strtoul(offer, &s, 10);
    while (*s == ' ')
        s++;
    gref = simple_strtoul(s, &s, 10);
    while (*s == ' ')
        s++;
    pages = simple_strtoul(s, &s, 10);
    if (!peer || peer >= DOMID_SELF || gref < GNTTAB_NR_RESERVED_ENTRIES || !pages ||
        pages > MAX_PAGES)
        app_fail("bad offer '%s'", offer);
    chunks = mib * (1024 * 1024 / CHUNK);
    if (chunks < pages)
        chunks = pages;
    chunks -= chunks % batch;
    if (!chunks)
        chunks = batch;

    dst = alloc_pages(pages);
    if (!dst)
        app_fail("no memory for %lu pages", pages);

    /* Warm-up: one batch, checked. */
    memset(dst, 0, pages * PAGE_SIZE);
    fill_batch(peer, gref, pages, dst, 0, (unsigned int)MIN(batch, pages));
    do_batch((unsigned int)MIN(batch, pages), 0);
    check_pages(dst, 0, MIN(batch, pages), "warm-up");
    memset(dst, 0, pages * PAGE_SIZE);
    printk("gntbench: role=copy peer=%lu gref=%lu pages=%lu chunks=%lu batch=%lu\n",
           peer, gref, pages, chunks, batch);

    t0 = monotonic_ns();
    for (unsigned long k = 0; k < chunks; k += batch) {
        uint64_t c0 = monotonic_ns(), dt;

        fill_batch(peer, gref, pages, dst, k, (unsigned int)batch);
        do_batch((unsigned int)batch, k);
        dt = monotonic_ns() - c0;
        if (dt < best)
            best = dt;
        calls++;
    }
    t1 = monotonic_ns();
    check_pages(dst, 0, pages, "after the run");
    {
        uint64_t ns = t1 - t0 ? t1 - t0 : 1;
        uint64_t bytes = (uint64_t)chunks * CHUNK;
        /* MB/s = bytes * 1000 / ns (10^6 bytes per second) */
        printk("gntbench: done bytes=%lu ns=%lu mb_per_s=%lu chunk=%lu batch=%lu hypercalls=%lu "
               "per_call_ns=%lu best_call_ns=%lu\n",
               (unsigned long)bytes, (unsigned long)ns, (unsigned long)(bytes * 1000 / ns),
               (unsigned long)CHUNK, batch, calls, (unsigned long)(ns / calls),
               (unsigned long)best);
    }
    poweroff();
}

int app_main(const char *cmdline)
{
    char role[8] = "";

    cmdline_get_str(cmdline, "role", role, sizeof(role));
    if (!strcmp(role, "src"))
        return role_src(cmdline_get_ulong(cmdline, "peer", 0),
                        cmdline_get_ulong(cmdline, "pages", 16),
                        cmdline_get_ulong(cmdline, "hold_s", 600));
    if (!strcmp(role, "copy"))
        return role_copy(cmdline_get_ulong(cmdline, "mib", 64),
                         cmdline_get_ulong(cmdline, "batch", 16));
    app_fail("role=src or role=copy, please (got '%s')", role);
}
