/*
 * blkverify: write patterns to a virtual block device, flush, read them
 * back and compare.
 *
 * Every 512 bytes hold a header (magic, the sector number, the seed and a
 * pass number) followed by a pseudo-random stream derived from them, so a
 * mismatch says what is there instead (another sector's data, an older
 * pass, zeros, garbage).  The region is `mib` MiB from sector `start`.
 *
 *   1. write pass 1 over the whole region: chunks from 1 sector to 44 KiB
 *      (and some of 128/256 KiB), buffers at varying offsets in their
 *      pages, so segments start and end inside pages; `qd` I/Os in flight
 *   2. flush (FLUSH_DISKCACHE, else a barrier, else nothing to do)
 *   3. pass 2 over about half the chunks of a new chunking; flush
 *   4. read everything back (another chunking) and compare
 *   5. barrier: write pass 3, a barrier write of pass 4 and a write of
 *      pass 5 to the same blocks, all in flight at once; pass 5 must win;
 *      then a barrier write of pass 7 alone (several segments, the first
 *      starting inside its page) must read back (without feature-barrier:
 *      a plain write of pass 7)
 *   6. discard (feature-discard): a granularity-aligned range; reading it
 *      must give zeros or the old data (both allowed), counted; then the
 *      range is written with pass 6
 *   7. checks that the backend refuses a read past the end of the disk
 *      (and, on a read-only disk, writes, barrier writes and discards)
 *   8. flush, read everything back again and compare
 * mode=reattach then waits for the disk to be detached (I/O must fail with
 * ENODEV meanwhile) and attached again, and reads everything back.
 * mode=readback does only step 8's reading (what a previous run with the
 * same mib/start/seed left, after its final flush): write, flush, destroy
 * the domain, boot again with mode=readback.
 *
 * Output:
 *   blkverify: info sectors=<n> sector-size=<s> features=<list>
 *   blkverify: <phase> ... (progress)
 *   blkverify: OK bytes=<region bytes>
 * or "blkverify: FAIL <details>" and SHUTDOWN_crash.
 *
 * Options: mib=8 seed=1 start=0 (sector) qd=8 mode=verify|readback|reattach
 * barrier=1 (0: plain writes instead of the barrier checks) vdev=xvda close=1, and blkfront's persistent= ring_order= indirect=
 * grants= timeout= quiet=.
 */
#include "app.h"
#include "blkfront.h"
#include "xenbus.h"

const char app_name[] = "blkverify";

#define MAGIC           0x31564b4c42585950ULL   /* "PYXBLKV1" */
#define MAX_QD          32
#define SLOT_BYTES      (256 * 1024 + PAGE_SIZE)
#define STALL_NS        (60 * NSEC_PER_SEC)
#define MAX_REPORTS     8

struct hdr {
    uint64_t magic;
    uint64_t sector;
    uint64_t seed;
    uint32_t pass;
    uint32_t check;
};

static struct blkfront_dev *dev;
static const struct blkfront_info *info;
static unsigned int ss, spb;          /* sector-size, 512-byte sectors per block */
static uint64_t seed;
static uint64_t rstart, rsecs;        /* region, in 512-byte sectors */
static uint8_t *map;                  /* expected pass per block */
static unsigned long mismatches;
static unsigned int qd;
static int use_barrier = 1;

/* ---- patterns ---- */

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static uint64_t stream_seed(uint64_t sector, uint64_t sd, uint32_t pass)
{
    return mix(sector * 0x9e3779b97f4a7c15ULL ^ mix(sd + 0x1234567ULL) ^ ((uint64_t)pass << 56)) | 1;
}

static uint32_t hdr_check(uint64_t sector, uint64_t sd, uint32_t pass)
{
    return (uint32_t)mix(sector ^ (sd << 7) ^ pass ^ MAGIC);
}

static void fill512(void *p, uint64_t sector, uint32_t pass)
{
    struct hdr *h = p;
    uint64_t *w = p, x = stream_seed(sector, seed, pass);

    for (unsigned int i = sizeof(*h) / 8; i < 512 / 8; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w[i] = x;
    }
    h->magic = MAGIC;
    h->sector = sector;
    h->seed = seed;
    h->pass = pass;
    h->check = hdr_check(sector, seed, pass);
}

/* 1 if p holds exactly (sector, seed, pass). */
static int match512(const void *p, uint64_t sector, uint32_t pass)
{
    const struct hdr *h = p;
    const uint64_t *w = p;
    uint64_t x = stream_seed(sector, seed, pass);

    if (h->magic != MAGIC || h->sector != sector || h->seed != seed || h->pass != pass ||
        h->check != hdr_check(sector, seed, pass))
        return 0;
    for (unsigned int i = sizeof(*h) / 8; i < 512 / 8; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (w[i] != x)
            return 0;
    }
    return 1;
}

static int zero512(const void *p)
{
    const uint64_t *w = p;
    for (unsigned int i = 0; i < 512 / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

static void describe512(const void *p, char *out, size_t size)
{
    const struct hdr *h = p;
    const uint8_t *b = p;

    if (zero512(p))
        snprintf(out, size, "zeros");
    else if (h->magic == MAGIC)
        snprintf(out, size, "sector=%lu seed=%lu pass=%u%s", (unsigned long)h->sector,
                 (unsigned long)h->seed, h->pass,
                 match512(p, h->sector, h->pass) && h->seed == seed ? "" : " (payload differs)");
    else
        snprintf(out, size, "garbage %02x %02x %02x %02x %02x %02x %02x %02x", b[0], b[1], b[2],
                 b[3], b[4], b[5], b[6], b[7]);
}

static unsigned int expected(uint64_t sector)
{
    return map[(sector - rstart) / spb];
}

static void set_expected(uint64_t sector, uint64_t nsec, uint8_t pass)
{
    for (uint64_t s = sector; s < sector + nsec; s += spb)
        map[(s - rstart) / spb] = pass;
}

/* Compare a read buffer with the map; count and report mismatches. */
static void check_read(const char *what, uint64_t sector, const char *buf, size_t len)
{
    for (size_t o = 0; o < len; o += 512) {
        uint64_t s = sector + o / 512;
        unsigned int pass = expected(s);
        if (match512(buf + o, s, pass))
            continue;
        if (mismatches++ < MAX_REPORTS) {
            char d[96];
            describe512(buf + o, d, sizeof(d));
            printk("blkverify: mismatch (%s) sector=%lu expected pass=%u seed=%lu, found %s\n",
                   what, (unsigned long)s, pass, (unsigned long)seed, d);
        }
    }
}

/* ---- chunking ---- */

static uint64_t rng_next(uint64_t *r)
{
    *r ^= *r << 13;
    *r ^= *r >> 7;
    *r ^= *r << 17;
    return *r;
}

struct chunker {
    uint64_t rng, pos, end;     /* sectors */
};

static void chunker_init(struct chunker *c, uint64_t phase)
{
    c->rng = mix(seed * 31 + phase) | 1;
    c->pos = rstart;
    c->end = rstart + rsecs;
}

/* Next chunk: sector, length (bytes), buffer offset in its page. 0 at the end. */
static int chunk_next(struct chunker *c, uint64_t *sector, size_t *len, size_t *bufoff)
{
    static const unsigned int sizes[] = {   /* bytes: 1 sector .. 44 KiB, a few bigger */
        512, 4096, 1536, 45056, 8192, 3584, 12288, 4608, 44544, 1024, 32768, 8704,
        16384, 2560, 40960, 7680, 131072, 512, 20480, 45056, 262144, 6144,
    };
    uint64_t r = rng_next(&c->rng);
    size_t l = sizes[r % ARRAY_SIZE(sizes)];
    size_t maxl = (size_t)(c->end - c->pos) * 512;

    if (c->pos >= c->end)
        return 0;
    l = ALIGN_UP(l, (size_t)ss);
    if (l > maxl)
        l = maxl;
    *sector = c->pos;
    *len = l;
    *bufoff = ((r >> 32) % (PAGE_SIZE / ss)) * ss;
    c->pos += l / 512;
    return 1;
}

/* ---- the I/O engine: qd slots ---- */

struct slot {
    struct blk_io io;
    char *mem;
    int busy;
    const char *what;
    uint32_t pass;              /* writes: what it carries */
};
static struct slot slots[MAX_QD];
static unsigned long seen_completions;
static unsigned long ios_done;

static void reap_slot(struct slot *s)
{
    struct blk_io *io = &s->io;

    if (io->status)
        app_fail("%s %s sector=%lu len=%lu: status %d (blkif %d)", s->what,
             io->op == BLKIF_OP_READ ? "read" : "write", (unsigned long)io->sector,
             (unsigned long)io->len, io->status, io->rsp_status);
    if (io->op == BLKIF_OP_READ)
        check_read(s->what, io->sector, io->buf, io->len);
    s->busy = 0;
    ios_done++;
}

/* Reap everything complete; 1 if something was. */
static int reap(void)
{
    int any = 0;
    for (unsigned int i = 0; i < qd; i++) {
        if (slots[i].busy && slots[i].io.complete) {
            reap_slot(&slots[i]);
            any = 1;
        }
    }
    return any;
}

static void wait_progress(const char *what)
{
    if (reap())
        return;
    if (!blkfront_wait_any(dev, &seen_completions, monotonic_ns() + STALL_NS)) {
        struct blkfront_stats st;
        blkfront_get_stats(dev, &st);
        blkfront_dump(dev);
        app_fail("%s: no completion for %lu s (connected=%d requests=%lu responses=%lu "
             "events=%lu notifies=%lu)", what, (unsigned long)(STALL_NS / NSEC_PER_SEC),
             blkfront_connected(dev), st.ring_requests, st.responses, st.events, st.notifies);
    }
    reap();
}

static struct slot *get_slot(const char *what)
{
    for (;;) {
        for (unsigned int i = 0; i < qd; i++)
            if (!slots[i].busy)
                return &slots[i];
        wait_progress(what);
    }
}

static void drain_all(const char *what)
{
    for (;;) {
        int busy = 0;
        reap();
        for (unsigned int i = 0; i < qd; i++)
            busy |= slots[i].busy;
        if (!busy)
            return;
        wait_progress(what);
    }
}

static void submit(struct slot *s, const char *what, uint8_t op, uint64_t sector, size_t len,
                   size_t bufoff, uint32_t pass)
{
    int rc;

    memset(&s->io, 0, sizeof(s->io));
    s->io.op = op;
    s->io.sector = sector;
    s->io.len = len;
    s->io.buf = s->mem + bufoff;
    s->what = what;
    s->pass = pass;
    if (op != BLKIF_OP_READ)
        for (size_t o = 0; o < len; o += 512)
            fill512((char *)s->io.buf + o, sector + o / 512, pass);
    s->busy = 1;
    rc = blkfront_submit(dev, &s->io);
    if (rc)
        app_fail("%s: submit op=%u sector=%lu len=%lu: %d", what, op, (unsigned long)sector,
             (unsigned long)len, rc);
}

/* ---- phases ---- */

static void write_pass(const char *what, uint64_t phase, uint32_t pass, int half)
{
    struct chunker c;
    uint64_t sector, t0 = monotonic_ns(), bytes = 0;
    unsigned long ios0 = ios_done, n = 0;
    size_t len, off;

    chunker_init(&c, phase);
    while (chunk_next(&c, &sector, &len, &off)) {
        int doit = !half || (rng_next(&c.rng) & 1);
        if (!doit)
            continue;
        set_expected(sector, len / 512, (uint8_t)pass);
        submit(get_slot(what), what, BLKIF_OP_WRITE, sector, len, off, pass);
        bytes += len;
        if (++n % 4096 == 0)
            printk("blkverify: %s pass=%u %lu MiB\n", what, pass, (unsigned long)(bytes >> 20));
    }
    drain_all(what);
    printk("blkverify: %s pass=%u bytes=%lu ios=%lu ns=%lu\n", what, pass, (unsigned long)bytes,
           ios_done - ios0, (unsigned long)(monotonic_ns() - t0));
}

/* Replay of write_pass's map updates without I/O (mode=readback). */
static void plan_pass(uint64_t phase, uint32_t pass, int half)
{
    struct chunker c;
    uint64_t sector;
    size_t len, off;

    chunker_init(&c, phase);
    while (chunk_next(&c, &sector, &len, &off)) {
        int doit = !half || (rng_next(&c.rng) & 1);
        if (doit)
            set_expected(sector, len / 512, (uint8_t)pass);
    }
}

static void verify_pass(const char *what, uint64_t phase)
{
    struct chunker c;
    uint64_t sector, t0 = monotonic_ns(), bytes = 0;
    unsigned long ios0 = ios_done, n = 0;
    size_t len, off;

    mismatches = 0;
    chunker_init(&c, phase);
    while (chunk_next(&c, &sector, &len, &off)) {
        submit(get_slot(what), what, BLKIF_OP_READ, sector, len, off, 0);
        bytes += len;
        if (++n % 4096 == 0)
            printk("blkverify: %s %lu MiB\n", what, (unsigned long)(bytes >> 20));
    }
    drain_all(what);
    if (mismatches)
        app_fail("%s: %lu mismatched sectors of %lu", what, mismatches, (unsigned long)(bytes / 512));
    printk("blkverify: %s bytes=%lu ios=%lu ns=%lu OK\n", what, (unsigned long)bytes,
           ios_done - ios0, (unsigned long)(monotonic_ns() - t0));
}

static void flush(const char *what)
{
    uint64_t t0 = monotonic_ns();
    int rc;

    if (info->feature_flush) {
        rc = blkfront_rw(dev, BLKIF_OP_FLUSH_DISKCACHE, 0, NULL, 0);
        if (rc)
            app_fail("%s: flush: %d", what, rc);
        printk("blkverify: %s flush OK ns=%lu\n", what, (unsigned long)(monotonic_ns() - t0));
    } else if (info->feature_barrier) {
        rc = blkfront_rw(dev, BLKIF_OP_WRITE_BARRIER, rstart, NULL, 0);
        if (rc)
            app_fail("%s: barrier (as flush): %d", what, rc);
        printk("blkverify: %s flush (barrier) OK ns=%lu\n", what,
               (unsigned long)(monotonic_ns() - t0));
    } else {
        printk("blkverify: %s flush skipped (no feature-flush-cache or feature-barrier)\n", what);
    }
}

static void read_check(const char *what, uint64_t sector, uint64_t n, size_t off)
{
    char *buf = slots[0].mem + off;
    int rc;

    mismatches = 0;
    rc = blkfront_rw(dev, BLKIF_OP_READ, sector, buf, n * 512);
    if (rc)
        app_fail("%s: read back sector=%lu: %d", what, (unsigned long)sector, rc);
    check_read(what, sector, buf, n * 512);
}

/*
 * Pass 3 (write), 4 (barrier write), 5 (write) to the same blocks, all in
 * flight: the barrier orders them, so pass 5 wins.  Then pass 7 as a
 * barrier write on its own, from a buffer that starts inside a page (its
 * segments don't start at sector 0 of their pages): its data must land
 * where it belongs.  Without feature-barrier, plain writes of 5 and 7.
 */
static void barrier_test(void)
{
    uint64_t n = MIN((uint64_t)16 * spb, rsecs);
    size_t uoff = ss < PAGE_SIZE ? ss : 0;
    struct slot *a, *b, *c;

    drain_all("barrier");
    if (!info->feature_barrier || !use_barrier) {
        set_expected(rstart, n, 7);
        submit(get_slot("barrier"), "barrier", BLKIF_OP_WRITE, rstart, n * 512, uoff, 7);
        drain_all("barrier");
        printk("blkverify: barrier skipped (%s)\n",
               use_barrier ? "no feature-barrier" : "barrier=0");
        return;
    }
    a = &slots[0];
    b = &slots[1];
    c = &slots[2];
    submit(a, "barrier", BLKIF_OP_WRITE, rstart, n * 512, 0, 3);
    submit(b, "barrier", BLKIF_OP_WRITE_BARRIER, rstart, n * 512, 0, 4);
    submit(c, "barrier", BLKIF_OP_WRITE, rstart, n * 512, 0, 5);
    while (!(a->io.complete && b->io.complete && c->io.complete))
        if (!blkfront_wait_any(dev, &seen_completions, monotonic_ns() + STALL_NS))
            app_fail("barrier: no completion");
    if (b->io.status == -XEN_EOPNOTSUPP) {
        printk("blkverify: barrier EOPNOTSUPP; writing plainly\n");
        a->busy = b->busy = c->busy = 0;
        set_expected(rstart, n, 7);
        submit(a, "barrier", BLKIF_OP_WRITE, rstart, n * 512, uoff, 7);
        drain_all("barrier");
        return;
    }
    reap();
    set_expected(rstart, n, 5);
    read_check("barrier", rstart, n, 0);
    if (mismatches)
        app_fail("barrier: write, barrier write, write to the same %lu sectors: the last did "
             "not win", (unsigned long)n);

    set_expected(rstart, n, 7);
    submit(a, "barrier", BLKIF_OP_WRITE_BARRIER, rstart, n * 512, uoff, 7);
    drain_all("barrier");
    read_check("barrier data", rstart, n, 0);
    if (mismatches)
        app_fail("barrier: a barrier write of %lu sectors (%u segments) did not read back",
             (unsigned long)n, (unsigned int)((uoff + n * 512 + PAGE_SIZE - 1) / PAGE_SIZE));
    printk("blkverify: barrier OK sectors=%lu+%lu\n", (unsigned long)rstart, (unsigned long)n);
}

/* The range rewritten with pass 6 (fixed, so mode=readback can know it). */
static void discard_range(uint64_t *s0, uint64_t *n)
{
    uint64_t mid = rstart + (rsecs / 2) / spb * spb;
    uint64_t len = MIN((uint64_t)2048, (rstart + rsecs - mid)) / spb * spb;   /* <= 1 MiB */
    *s0 = mid;
    *n = len;
}

static void discard_test(void)
{
    uint64_t p0, pn, d0, dn, gran, align, zeros = 0, old = 0;
    char *buf = slots[0].mem;
    int rc;

    discard_range(&p0, &pn);
    if (!pn)
        return;
    drain_all("discard");
    if (info->feature_discard) {
        gran = MAX((uint64_t)info->discard_granularity, (uint64_t)ss) / 512;
        align = (info->discard_alignment / 512) % gran;
        /* First aligned sector >= p0: (s*512 - alignment) % granularity == 0 */
        d0 = p0 + (gran - ((p0 + gran - align) % gran)) % gran;
        dn = d0 < p0 + pn ? (p0 + pn - d0) / gran * gran : 0;
        if (!dn) {
            printk("blkverify: discard skipped (granularity %lu bytes > the %lu-byte range)\n",
                   (unsigned long)(gran * 512), (unsigned long)(pn * 512));
        } else {
            rc = blkfront_rw(dev, BLKIF_OP_DISCARD, d0, NULL, dn * 512);
            if (rc == -XEN_EOPNOTSUPP) {
                printk("blkverify: discard EOPNOTSUPP\n");
            } else if (rc) {
                app_fail("discard sectors=%lu+%lu: %d", (unsigned long)d0, (unsigned long)dn, rc);
            } else {
                for (uint64_t s = d0; s < d0 + dn; ) {
                    uint64_t k = MIN((uint64_t)(SLOT_BYTES - PAGE_SIZE) / 512, d0 + dn - s);
                    rc = blkfront_rw(dev, BLKIF_OP_READ, s, buf, k * 512);
                    if (rc)
                        app_fail("read after discard sector=%lu: %d", (unsigned long)s, rc);
                    for (uint64_t i = 0; i < k; i++) {
                        const char *p = buf + i * 512;
                        if (zero512(p)) {
                            zeros++;
                        } else if (match512(p, s + i, expected(s + i))) {
                            old++;
                        } else {
                            char dsc[96];
                            describe512(p, dsc, sizeof(dsc));
                            app_fail("after discard, sector %lu holds %s (neither zeros nor pass %u)",
                                 (unsigned long)(s + i), dsc, expected(s + i));
                        }
                    }
                    s += k;
                }
                printk("blkverify: discard sectors=%lu+%lu zeros=%lu old=%lu OK\n",
                       (unsigned long)d0, (unsigned long)dn, (unsigned long)zeros,
                       (unsigned long)old);
            }
        }
    } else {
        printk("blkverify: discard skipped (no feature-discard)\n");
    }
    /* Defined contents again. */
    for (uint64_t s = p0; s < p0 + pn; ) {
        uint64_t k = MIN((uint64_t)64 * spb, p0 + pn - s);
        set_expected(s, k, 6);
        submit(get_slot("rewrite"), "rewrite", BLKIF_OP_WRITE, s, k * 512, 0, 6);
        s += k;
    }
    drain_all("rewrite");
}

static void plan_discard(void)
{
    uint64_t p0, pn;
    discard_range(&p0, &pn);
    if (pn)
        set_expected(p0, pn, 6);
}

/* The backend must refuse I/O past the end of the disk. */
static void range_test(void)
{
    struct blk_io io;
    char *buf = slots[0].mem;
    int rc;

    memset(&io, 0, sizeof(io));
    io.op = BLKIF_OP_READ;
    io.flags = BLK_IO_NOCHECK;
    io.sector = info->sectors;          /* the first sector after the end */
    io.buf = buf;
    io.len = ss;
    rc = blkfront_submit(dev, &io);
    if (rc)
        app_fail("past-end read: submit %d", rc);
    if (!blkfront_wait_io(dev, &io, monotonic_ns() + STALL_NS))
        app_fail("past-end read: no response");
    if (io.status == 0)
        app_fail("a read of sector %lu (past the end, sectors=%lu) succeeded",
             (unsigned long)io.sector, (unsigned long)info->sectors);
    printk("blkverify: past-end read refused status=%d OK\n", io.rsp_status);
    if (info->readonly) {
        static const uint8_t ops[] = { BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_DISCARD };
        static const char *const names[] = { "write", "barrier write", "discard" };
        for (size_t i = 0; i < ARRAY_SIZE(ops); i++) {
            memset(&io, 0, sizeof(io));
            io.op = ops[i];
            io.flags = BLK_IO_NOCHECK;
            io.sector = rstart;
            io.buf = ops[i] == BLKIF_OP_DISCARD ? NULL : buf;
            io.len = ss;
            memset(buf, 0xa5, ss);
            rc = blkfront_submit(dev, &io);
            if (rc || !blkfront_wait_io(dev, &io, monotonic_ns() + STALL_NS))
                app_fail("%s to a read-only disk: submit %d / no response", names[i], rc);
            if (io.status == 0)
                app_fail("a %s to a read-only disk succeeded", names[i]);
            printk("blkverify: read-only %s refused status=%d OK\n", names[i], io.rsp_status);
        }
    }
}

/* mode=reattach: after the checks, wait for the disk to be detached and
 * attached again (pyxen block-detach / block-attach), then read back. */
static void reattach(void)
{
    uint64_t dl = monotonic_ns() + 600 * NSEC_PER_SEC;
    unsigned int gen = blkfront_generation(dev);
    struct blk_io io;
    int rc;

    printk("blkverify: waiting for detach\n");
    if (!blkfront_wait_gone(dev, dl))
        app_fail("not detached in 600 s");
    memset(&io, 0, sizeof(io));
    io.op = BLKIF_OP_READ;
    io.sector = rstart;
    io.buf = slots[0].mem;
    io.len = ss;
    rc = blkfront_submit(dev, &io);
    if (rc != -XEN_ENODEV)
        app_fail("a read while detached: %d, want %d (ENODEV)", rc, -XEN_ENODEV);
    printk("blkverify: detached (I/O refused with ENODEV)\n");
    if (!blkfront_wait_connected(dev, dl))
        app_fail("not re-attached in 600 s");
    if (blkfront_generation(dev) == gen)
        app_fail("re-attached without a new ring");
    info = blkfront_get_info(dev);
    printk("blkverify: re-attached sectors=%lu generation=%u\n", (unsigned long)info->sectors,
           blkfront_generation(dev));
    if (info->sectors < rstart + rsecs)
        app_fail("the re-attached disk is smaller (%lu sectors)", (unsigned long)info->sectors);
    verify_pass("reattach verify", 4);
}

int app_main(const char *cmdline)
{
    struct blkfront_opts opts;
    char vdev[32] = "", mode[16] = "verify", feat[128];
    unsigned long mib, blocks;
    int readback, err;

    mib = cmdline_get_ulong(cmdline, "mib", 8);
    seed = cmdline_get_ulong(cmdline, "seed", 1);
    rstart = cmdline_get_ulong(cmdline, "start", 0);
    qd = (unsigned int)cmdline_get_ulong(cmdline, "qd", 8);
    qd = MAX(3U, MIN(qd, (unsigned int)MAX_QD));
    use_barrier = (int)cmdline_get_ulong(cmdline, "barrier", 1);
    cmdline_get_str(cmdline, "vdev", vdev, sizeof(vdev));
    cmdline_get_str(cmdline, "mode", mode, sizeof(mode));
    if (strcmp(mode, "verify") && strcmp(mode, "readback") && strcmp(mode, "reattach"))
        app_fail("mode=verify|readback|reattach, please (got '%s')", mode);
    readback = !strcmp(mode, "readback");
    blkfront_opts_from_cmdline(&opts, cmdline);

    dev = blkfront_open(vdev, &opts, &err);
    if (!dev)
        app_fail("no disk%s%s: %d", vdev[0] ? " " : "", vdev, err);
    info = blkfront_get_info(dev);
    ss = info->sector_size;
    spb = ss / 512;
    blkfront_features(dev, feat, sizeof(feat));
    printk("blkverify: info sectors=%lu sector-size=%u features=%s\n",
           (unsigned long)info->sectors, ss, feat);

    if (rstart % spb)
        app_fail("start=%lu is not a multiple of the sector size", (unsigned long)rstart);
    rsecs = (uint64_t)mib * 2048;
    if (rstart >= info->sectors)
        app_fail("start=%lu is past the end (sectors=%lu)", (unsigned long)rstart,
             (unsigned long)info->sectors);
    if (rsecs > info->sectors - rstart) {
        rsecs = info->sectors - rstart;
        printk("blkverify: the disk has %lu sectors: testing %lu from %lu\n",
               (unsigned long)info->sectors, (unsigned long)rsecs, (unsigned long)rstart);
    }
    rsecs = rsecs / spb * spb;
    if (!rsecs)
        app_fail("nothing to test");
    if (info->readonly && !readback)
        app_fail("%s is read-only: only mode=readback can run", blkfront_name(dev));

    blocks = (unsigned long)(rsecs / spb);
    map = alloc_pages((blocks + PAGE_SIZE - 1) / PAGE_SIZE);
    if (!map)
        app_fail("no memory for a %lu-block map", blocks);
    for (unsigned int i = 0; i < qd; i++) {
        slots[i].mem = alloc_pages(SLOT_BYTES / PAGE_SIZE);
        if (!slots[i].mem)
            app_fail("no memory for %u buffers of %lu KiB", qd, (unsigned long)(SLOT_BYTES >> 10));
    }
    printk("blkverify: mode=%s region sectors=%lu+%lu seed=%lu qd=%u ring=%u segs=%u "
           "persistent=%d\n", mode, (unsigned long)rstart, (unsigned long)rsecs,
           (unsigned long)seed, qd, info->ring_entries, info->max_segs, info->persistent);

    if (readback) {
        memset(map, 1, blocks);
        plan_pass(2, 2, 1);
        set_expected(rstart, MIN((uint64_t)16 * spb, rsecs), 7);
        plan_discard();
        range_test();
        verify_pass("readback", 4);
    } else {
        memset(map, 0, blocks);
        write_pass("write", 1, 1, 0);
        flush("write");
        write_pass("overwrite", 2, 2, 1);
        flush("overwrite");
        verify_pass("verify", 3);
        barrier_test();
        discard_test();
        range_test();
        flush("final");
        verify_pass("final verify", 4);
        if (!strcmp(mode, "reattach"))
            reattach();
    }
    {
        struct blkfront_stats st;
        blkfront_get_stats(dev, &st);
        printk("blkverify: stats ios=%lu ring_requests=%lu indirect=%lu responses=%lu "
               "events=%lu notifies=%lu copies=%lu redone=%lu grant_busy=%lu "
               "protocol_errors=%lu\n", st.ios, st.ring_requests, st.indirect_requests,
               st.responses, st.events, st.notifies, st.copies, st.redone, st.grant_busy,
               st.protocol_errors);
        if (st.protocol_errors)
            app_fail("%lu backend protocol errors", st.protocol_errors);
    }
    printk("blkverify: OK bytes=%lu\n", (unsigned long)(rsecs * 512));
    if (cmdline_get_ulong(cmdline, "close", 1))
        blkfront_close(dev);
    return 0;
}
