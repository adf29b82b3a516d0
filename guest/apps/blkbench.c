/*
 * blkbench: throughput and IOPS of a virtual block device.
 *
 *   mode=seqread|seqwrite|randread|randwrite   (default seqread)
 *   bs=<bytes>     I/O size, k/m suffixes are binary (default 1m for seq*, 4k for rand*)
 *   qd=<n>         I/Os in flight (default 32)
 *   secs=<s>       how long to keep submitting (default 3)
 *   mib=<n>        the region used, from sector start= (default: the whole disk)
 *   flush=1        end with a FLUSH_DISKCACHE, counted in the time (writes)
 *   vdev=, and blkfront's persistent= ring_order= indirect= grants= quiet=
 *   coalesce= poll= (blkfront.h): poll=<us> spins that long for a completion
 *                  before sleeping until an event; default 200 when bs < 64k,
 *                  else 0 (small I/Os finish before an event could arrive)
 *
 * All I/Os share one buffer (the contents don't matter).  Sequential modes
 * walk the region and wrap; random ones pick bs-aligned offsets in it.
 * The clock runs from the first submission to the last completion.
 *
 * Output:
 *   blkbench: info sectors=<n> sector-size=<s> features=<list>
 *   blkbench: mode=<m> bs=<b> qd=<q> MBps=<x> IOPS=<y> ios=<n> ns=<t>
 *   blkbench: stats ...
 * MBps is 10^6 bytes per second, with two decimals.  Failures:
 * "blkbench: FAIL <what>" and SHUTDOWN_crash.
 */
#include "app.h"
#include "blkfront.h"

const char app_name[] = "blkbench";

#define MAX_QD   256
#define STALL_NS (60 * NSEC_PER_SEC)
#define DEFAULT_POLL_US 200

static struct blk_io ios[MAX_QD];

int app_main(const char *cmdline)
{
    struct blkfront_opts opts;
    struct blkfront_dev *dev;
    const struct blkfront_info *info;
    struct blkfront_stats st;
    char mode[16] = "seqread", vdev[32] = "", feat[128];
    unsigned long bs, qd, secs, mib, nblocks, seen = 0, done = 0, inflight = 0;
    uint64_t start, rsecs, pos, rng, t0, t_end, t_last, bytes = 0, ns;
    int rnd, write, err, want_flush;
    void *buf;

    cmdline_get_str(cmdline, "mode", mode, sizeof(mode));
    if (!strcmp(mode, "seqread")) {
        rnd = 0; write = 0;
    } else if (!strcmp(mode, "seqwrite")) {
        rnd = 0; write = 1;
    } else if (!strcmp(mode, "randread")) {
        rnd = 1; write = 0;
    } else if (!strcmp(mode, "randwrite")) {
        rnd = 1; write = 1;
    } else {
        app_fail("mode=seqread|seqwrite|randread|randwrite, please (got '%s')", mode);
    }
    bs = blk_cmdline_size(cmdline, "bs", rnd ? 4096 : 1024 * 1024);
    qd = cmdline_get_ulong(cmdline, "qd", 32);
    qd = MAX(1UL, MIN(qd, (unsigned long)MAX_QD));
    secs = cmdline_get_ulong(cmdline, "secs", 3);
    mib = cmdline_get_ulong(cmdline, "mib", 0);
    start = cmdline_get_ulong(cmdline, "start", 0);
    want_flush = (int)cmdline_get_ulong(cmdline, "flush", 0);
    cmdline_get_str(cmdline, "vdev", vdev, sizeof(vdev));
    blkfront_opts_from_cmdline(&opts, cmdline);
    /* Small I/Os complete sooner than an event can be delivered (each one is a
     * trip through the hypervisor): poll for them unless told otherwise.
     * Big ones leave the CPU to the backend and sleep until an event. */
    if (!cmdline_find(cmdline, "poll", NULL))
        opts.poll_us = bs < 64 * 1024 ? DEFAULT_POLL_US : 0;

    dev = blkfront_open(vdev, &opts, &err);
    if (!dev)
        app_fail("no disk%s%s: %d", vdev[0] ? " " : "", vdev, err);
    info = blkfront_get_info(dev);
    blkfront_features(dev, feat, sizeof(feat));
    printk("blkbench: info sectors=%lu sector-size=%u features=%s\n",
           (unsigned long)info->sectors, info->sector_size, feat);

    if (!bs || bs % info->sector_size || bs % 512)
        app_fail("bs=%lu is not a multiple of the sector size %u", bs, info->sector_size);
    if (start % (info->sector_size / 512) || start >= info->sectors)
        app_fail("bad start=%lu", (unsigned long)start);
    rsecs = info->sectors - start;
    if (mib && (uint64_t)mib * 2048 < rsecs)
        rsecs = (uint64_t)mib * 2048;
    nblocks = (unsigned long)(rsecs * 512 / bs);
    if (!nblocks)
        app_fail("the region (%lu sectors) is smaller than bs=%lu", (unsigned long)rsecs, bs);
    if (write && info->readonly)
        app_fail("%s is read-only", blkfront_name(dev));
    if (want_flush && !info->feature_flush)
        app_fail("flush=1 but the backend has no feature-flush-cache");

    buf = alloc_pages((bs + PAGE_SIZE - 1) / PAGE_SIZE);
    if (!buf)
        app_fail("no memory for a %lu-byte buffer", bs);
    for (unsigned long i = 0; i < bs; i += 8)
        *(uint64_t *)(void *)((char *)buf + i) = i * 0x9e3779b97f4a7c15ULL;

    rng = 0x2545f4914f6cdd1dULL ^ cmdline_get_ulong(cmdline, "seed", 1);
    pos = 0;
    t0 = monotonic_ns();
    t_end = t0 + (uint64_t)secs * NSEC_PER_SEC;
    t_last = t0;

    for (unsigned long i = 0; i < qd; i++)
        ios[i].complete = 1;        /* free */
    for (;;) {
        uint64_t now = monotonic_ns();
        int submitting = now < t_end;

        /* Reap, and refill while the clock runs. */
        for (unsigned long i = 0; i < qd; i++) {
            struct blk_io *io = &ios[i];
            /* Read once: a completion may land (event upcall) at any time. */
            int complete = io->complete;
            unsigned long blk;
            int rc;

            if (complete && io->submit_ns) {
                if (io->status)
                    app_fail("%s sector=%lu len=%lu: status %d (blkif %d)",
                         write ? "write" : "read", (unsigned long)io->sector,
                         (unsigned long)io->len, io->status, io->rsp_status);
                bytes += io->len;
                done++;
                inflight--;
                if (io->done_ns > t_last)
                    t_last = io->done_ns;
                io->submit_ns = 0;
            }
            if (!complete || !submitting)
                continue;
            if (rnd) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                blk = (unsigned long)(rng % nblocks);
            } else {
                blk = (unsigned long)pos;
                pos = pos + 1 < nblocks ? pos + 1 : 0;
            }
            memset(io, 0, sizeof(*io));
            io->op = write ? BLKIF_OP_WRITE : BLKIF_OP_READ;
            io->sector = start + (uint64_t)blk * (bs / 512);
            io->buf = buf;
            io->len = bs;
            rc = blkfront_submit(dev, io);
            if (rc)
                app_fail("submit sector=%lu len=%lu: %d", (unsigned long)io->sector, bs, rc);
            inflight++;
        }
        if (!submitting && !inflight)
            break;
        if (!blkfront_wait_any(dev, &seen, monotonic_ns() + STALL_NS)) {
            blkfront_dump(dev);
            app_fail("no completion for %lu s (%lu in flight, connected=%d)",
                 (unsigned long)(STALL_NS / NSEC_PER_SEC), inflight, blkfront_connected(dev));
        }
    }
    if (want_flush) {
        int rc = blkfront_rw(dev, BLKIF_OP_FLUSH_DISKCACHE, 0, NULL, 0);
        if (rc)
            app_fail("flush: %d", rc);
        t_last = monotonic_ns();
    }
    ns = t_last - t0;
    if (!ns)
        ns = 1;
    {
        uint64_t mbps100 = bytes * 100000ULL / ns;        /* MB/s x 100 */
        uint64_t iops = (uint64_t)done * NSEC_PER_SEC / ns;
        printk("blkbench: mode=%s bs=%lu qd=%lu MBps=%lu.%02lu IOPS=%lu ios=%lu ns=%lu\n",
               mode, bs, qd, (unsigned long)(mbps100 / 100), (unsigned long)(mbps100 % 100),
               (unsigned long)iops, done, (unsigned long)ns);
    }
    blkfront_get_stats(dev, &st);
    printk("blkbench: stats ring_requests=%lu indirect=%lu events=%lu notifies=%lu copies=%lu "
           "segs=%u ring=%u persistent=%d pool=%lu polled=%lu\n", st.ring_requests,
           st.indirect_requests, st.events, st.notifies, st.copies, info->max_segs,
           info->ring_entries, info->persistent, st.pgrants, st.polled);
    if (cmdline_get_ulong(cmdline, "close", 1))
        blkfront_close(dev);
    return 0;
}
