/*
 * blkhost: the host baseline for the block benchmarks (bench/block.py).
 *
 *   blkhost MODE FILE [bs=B] [qd=N] [secs=S] [mib=M] [seed=X] [direct=0|1]
 *   blkhost fill FILE MIB
 *
 * MODE is seqread, seqwrite or randread: the workload of the guest app
 * blkbench (guest/apps/blkbench.c), run on the host against the same file.
 * qd threads each keep one I/O in flight (pread/pwrite of bs bytes, default
 * 1 MiB sequential, 4 KiB random; qd default 32), so qd I/Os are in flight
 * as in blkbench.  Sequential modes hand out consecutive bs blocks of the
 * region (the first mib MiB of the file, default all of it) from one shared
 * counter, wrapping at its end; randread picks bs-aligned blocks with a
 * per-thread xorshift64 (seeded from seed= and the thread number).  Every
 * thread reads into or writes from its own page-aligned buffer.  Threads
 * submit while the clock runs (secs, default 3); the clock runs from the
 * release of all threads to the last completion.  No fsync (blkbench sends
 * no flush either).  direct=1 opens with O_DIRECT.
 *
 * Output (MBps = 10^6 bytes/s, as blkbench prints it):
 *   blkhost: mode=<m> bs=<b> qd=<q> MBps=<x> IOPS=<y> ios=<n> ns=<t>
 *
 * "fill" writes MIB MiB of pseudo-random, non-zero data to FILE (created or
 * truncated to that size) and fdatasyncs it, so that reads hit real data and
 * a qcow2 converted from it has every cluster allocated:
 *   blkhost: fill bytes=<n> ns=<t>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_QD 256

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static unsigned long parse_size(const char *s)
{
    char *end;
    unsigned long v = strtoul(s, &end, 0);
    if (*end == 'k' || *end == 'K')
        v <<= 10;
    else if (*end == 'm' || *end == 'M')
        v <<= 20;
    return v;
}

static int fd, do_write, rnd;
static unsigned long bs, nblocks, seed;
static uint64_t t_end;
static atomic_ulong next_block;
static pthread_barrier_t start_barrier;

struct worker {
    pthread_t thread;
    unsigned long idx;
    unsigned long ios;
    uint64_t bytes, last_ns;
    int err;
    char *buf;
};

static int do_io(struct worker *w, off_t off)
{
    size_t done = 0;
    while (done < bs) {
        ssize_t n = do_write ? pwrite(fd, w->buf + done, bs - done, off + (off_t)done)
                             : pread(fd, w->buf + done, bs - done, off + (off_t)done);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return EIO; /* the file is shorter than the region */
        done += (size_t)n;
    }
    return 0;
}

static void *run(void *arg)
{
    struct worker *w = arg;
    uint64_t rng = 0x2545f4914f6cdd1dULL ^ (seed + 0x9e3779b97f4a7c15ULL * (w->idx + 1));

    pthread_barrier_wait(&start_barrier);
    for (;;) {
        uint64_t now = now_ns();
        unsigned long blk;
        if (now >= t_end)
            break;
        if (rnd) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            blk = (unsigned long)(rng % nblocks);
        } else {
            blk = atomic_fetch_add(&next_block, 1) % nblocks;
        }
        w->err = do_io(w, (off_t)blk * (off_t)bs);
        if (w->err)
            break;
        w->ios++;
        w->bytes += bs;
        w->last_ns = now_ns();
    }
    return NULL;
}

static int fill(const char *path, unsigned long mib)
{
    uint64_t x = 0x9e3779b97f4a7c15ULL, t0;
    size_t chunk = 1 << 20;
    uint64_t *buf = malloc(chunk);
    int f = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (f < 0 || !buf) {
        perror("blkhost: fill");
        return 1;
    }
    t0 = now_ns();
    for (unsigned long m = 0; m < mib; m++) {
        for (size_t i = 0; i < chunk / 8; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf[i] = x | 1; /* never a zero word: every cluster holds data */
        }
        for (size_t done = 0; done < chunk;) {
            ssize_t n = write(f, (char *)buf + done, chunk - done);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                perror("blkhost: fill: write");
                return 1;
            }
            done += (size_t)n;
        }
    }
    if (fdatasync(f) || close(f)) {
        perror("blkhost: fill: fdatasync");
        return 1;
    }
    printf("blkhost: fill bytes=%lu ns=%lu\n", mib << 20, (unsigned long)(now_ns() - t0));
    free(buf);
    return 0;
}

int main(int argc, char **argv)
{
    static struct worker workers[MAX_QD];
    unsigned long qd = 32, secs = 3, mib = 0, ios = 0;
    uint64_t bytes = 0, t0, t_last, ns, region;
    int direct = 0, flags;
    const char *mode, *path;
    struct stat st;

    if (argc < 3) {
        fprintf(stderr, "usage: blkhost seqread|seqwrite|randread FILE [bs=] [qd=] [secs=] [mib=] "
                        "[seed=] [direct=]\n       blkhost fill FILE MIB\n");
        return 2;
    }
    mode = argv[1];
    path = argv[2];
    if (!strcmp(mode, "fill"))
        return fill(path, argc > 3 ? strtoul(argv[3], NULL, 0) : 64);
    if (!strcmp(mode, "seqread")) {
        do_write = 0; rnd = 0;
    } else if (!strcmp(mode, "seqwrite")) {
        do_write = 1; rnd = 0;
    } else if (!strcmp(mode, "randread")) {
        do_write = 0; rnd = 1;
    } else {
        fprintf(stderr, "blkhost: mode seqread|seqwrite|randread|fill, please (got '%s')\n", mode);
        return 2;
    }
    bs = rnd ? 4096 : 1 << 20;
    for (int i = 3; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "bs=", 3))
            bs = parse_size(a + 3);
        else if (!strncmp(a, "qd=", 3))
            qd = strtoul(a + 3, NULL, 0);
        else if (!strncmp(a, "secs=", 5))
            secs = strtoul(a + 5, NULL, 0);
        else if (!strncmp(a, "mib=", 4))
            mib = strtoul(a + 4, NULL, 0);
        else if (!strncmp(a, "seed=", 5))
            seed = strtoul(a + 5, NULL, 0);
        else if (!strncmp(a, "direct=", 7))
            direct = atoi(a + 7);
        else {
            fprintf(stderr, "blkhost: unknown argument '%s'\n", a);
            return 2;
        }
    }
    if (!qd || qd > MAX_QD || !bs || bs % 512 || !secs) {
        fprintf(stderr, "blkhost: need 1 <= qd <= %d, bs a multiple of 512, secs >= 1\n", MAX_QD);
        return 2;
    }
    flags = (do_write ? O_RDWR : O_RDONLY) | O_CLOEXEC | (direct ? O_DIRECT : 0);
    fd = open(path, flags);
    if (fd < 0 || fstat(fd, &st)) {
        fprintf(stderr, "blkhost: %s: %s\n", path, strerror(errno));
        return 1;
    }
    region = (uint64_t)st.st_size;
    if (mib && (uint64_t)mib << 20 < region)
        region = (uint64_t)mib << 20;
    nblocks = (unsigned long)(region / bs);
    if (!nblocks) {
        fprintf(stderr, "blkhost: the region (%lu bytes) is smaller than bs=%lu\n",
                (unsigned long)region, bs);
        return 1;
    }
    if (pthread_barrier_init(&start_barrier, NULL, (unsigned)qd + 1)) {
        fprintf(stderr, "blkhost: pthread_barrier_init failed\n");
        return 1;
    }
    for (unsigned long i = 0; i < qd; i++) {
        struct worker *w = &workers[i];
        w->idx = i;
        if (posix_memalign((void **)&w->buf, 4096, bs)) {
            fprintf(stderr, "blkhost: no memory for %lu-byte buffers\n", bs);
            return 1;
        }
        for (unsigned long j = 0; j < bs; j += 8)
            *(uint64_t *)(void *)(w->buf + j) = j * 0x9e3779b97f4a7c15ULL + i;
    }
    t_end = UINT64_MAX;
    for (unsigned long i = 0; i < qd; i++) {
        if (pthread_create(&workers[i].thread, NULL, run, &workers[i])) {
            fprintf(stderr, "blkhost: pthread_create failed\n");
            return 1;
        }
    }
    t0 = now_ns();
    t_end = t0 + secs * 1000000000ull;
    pthread_barrier_wait(&start_barrier);
    t_last = t0;
    for (unsigned long i = 0; i < qd; i++) {
        struct worker *w = &workers[i];
        pthread_join(w->thread, NULL);
        if (w->err) {
            fprintf(stderr, "blkhost: %s: %s\n", do_write ? "pwrite" : "pread", strerror(w->err));
            return 1;
        }
        ios += w->ios;
        bytes += w->bytes;
        if (w->last_ns > t_last)
            t_last = w->last_ns;
    }
    ns = t_last - t0;
    if (!ns)
        ns = 1;
    printf("blkhost: mode=%s bs=%lu qd=%lu MBps=%lu.%02lu IOPS=%lu ios=%lu ns=%lu\n", mode, bs, qd,
           (unsigned long)(bytes * 100000ull / ns / 100), (unsigned long)(bytes * 100000ull / ns % 100),
           (unsigned long)((uint64_t)ios * 1000000000ull / ns), ios, (unsigned long)ns);
    close(fd);
    return 0;
}
