/*
 * blk.c - blkback's data path: the shared ring (io/ring.h) and the plain
 * READ/WRITE/INDIRECT requests (io/blkif.h) of a raw image or of a qcow2
 * image's already-allocated clusters, straight between the image file and
 * the guest's granted pages (reads copy from a read-only mapping of the
 * file, writes are pwritev; no bounce buffer), with grants held per request
 * or, when both ends negotiated feature-persistent, across requests.
 *
 * Python (pyxen/backends/blkback.py) owns everything else and is handed
 * the request, unchanged, whenever this code is not sure: unknown or
 * special operations (discard, flush, barrier), any grant, segment or range
 * check that fails (Python re-checks, logs the reason and answers
 * BLKIF_RSP_ERROR), a qcow2 cluster that is not in the fast map (allocation,
 * backing file, compression, encryption), an I/O error.  Those requests
 * stay "in flight" until Python answers through pxb_respond().
 *
 * Ordering: a FLUSH or BARRIER stops the ring until everything taken before
 * it has been answered (by this code or by Python), is then handed to
 * Python (which makes the data durable), and the ring resumes only when
 * Python has answered it.  Nothing is reordered across it.
 *
 * Threads: NW workers.  Each takes one request off the ring under d->m and
 * serves it unlocked; a worker that finds the ring empty becomes the
 * poller (there is at most one): it spins for poll_ns, then re-arms
 * req_event (RING_FINAL_CHECK_FOR_REQUESTS) and sleeps on kick_fd, which
 * Python writes when the guest sends on the event channel.  A worker that
 * takes a large read while more requests are waiting wakes another worker,
 * so big copies run in parallel while small requests stay on one warm thread
 * (and writes on one: buffered writes to a file serialise on its inode).
 *
 * Responses are pushed one by one (a polling guest sees each at once);
 * the ring's event suppression (rsp_event) decides when the guest needs an
 * event, and then this code tells Python through up_fd (PXB_UP_NOTIFY).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "native.h"

#define SECTOR 512
#define REQ_SIZE 112
#define HDR_SIZE 64
#define OP_READ 0
#define OP_WRITE 1
#define OP_WRITE_BARRIER 2
#define OP_FLUSH_DISKCACHE 3
#define OP_INDIRECT 6
#define RSP_OKAY 0
#define MAX_SEGMENTS 11
#define SEGS_PER_INDIRECT_PAGE 512
#define MAX_INDIRECT_SEGMENTS 256
#define MAX_WORKERS 8
#define LARGE_BYTES (64 * 1024)
#define COPY_CHUNK (64 * 1024)

#define PXB_UP_NOTIFY 1u
#define PXB_UP_SLOW 2u
#define PXB_UP_PROTO 4u

/* fast-map entry bits (qcow2): host offset | R | W; 0 = ask Python */
#define FM_R 1ull
#define FM_W 2ull
#define FM_OFF_MASK (~0x1FFull)

enum { ST_REQS, ST_READS, ST_WRITES, ST_READ_BYTES, ST_WRITE_BYTES, ST_SLOW, ST_NOTIFIES,
       ST_KICKS, ST_POLL_HITS, ST_SLEEPS, ST_NSTATS };

struct pxb {
    struct pxg *g;
    uint8_t *map;               /* the image file mapped read-only (reads are copies), or NULL */
    uint64_t map_len;
    uint8_t *sring;
    uint32_t n;                 /* ring entries, a power of two */
    uint16_t me;                /* the backend's domid, as grants name it */
    int fd;
    uint64_t base;              /* raw: byte offset of sector 0 in the file */
    uint64_t sectors;
    int readonly;
    uint64_t *fmap;             /* NULL: raw (sector -> base + offset) */
    uint32_t cbits;
    uint64_t nclusters;
    int all_slow;               /* every request goes to Python (e.g. NBD) */
    int kick_fd, up_fd;
    uint64_t poll_ns;

    pthread_mutex_t m;
    pthread_cond_t cv;          /* workers idle, barrier waiting for inflight == 0 */
    uint32_t req_cons;
    int inflight;               /* taken, not yet answered */
    int barrier;                /* a flush/barrier is waiting or with Python */
    int poller;
    int idle;                   /* workers asleep on cv */
    int stop;
    int broken;                 /* protocol error: stop taking requests */
    uint32_t up_flags;

    pthread_mutex_t pm;         /* persistent grants */
    uint64_t *pcache;           /* per ref, NULL unless persistent */
    uint32_t pcount, pmax;

    pthread_mutex_t rm;         /* responses */
    uint32_t rsp_prod_pvt;

    uint8_t *slowq;             /* n request slots */
    uint32_t sq_head, sq_tail;
    char proto_msg[160];

    int nworkers;
    pthread_t workers[MAX_WORKERS];
    uint64_t st[ST_NSTATS];
};

static inline uint32_t rd32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }
static inline void wr32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE); }
static inline void stat_add(struct pxb *d, int i, uint64_t v) { __atomic_fetch_add(&d->st[i], v, __ATOMIC_RELAXED); }

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void up(struct pxb *d, uint32_t what)
{
    uint64_t one = 1;
    __atomic_fetch_or(&d->up_flags, what, __ATOMIC_SEQ_CST);
    (void)!write(d->up_fd, &one, sizeof(one));
}

/* ------------------------------------------------------------ responses */

static void respond(struct pxb *d, uint64_t id, uint8_t op, int16_t status)
{
    uint8_t *e;
    uint32_t old, newp, ev;
    int notify;

    pthread_mutex_lock(&d->rm);
    e = d->sring + HDR_SIZE + (uint64_t)(d->rsp_prod_pvt & (d->n - 1)) * REQ_SIZE;
    memcpy(e, &id, 8);
    e[8] = op;
    e[9] = 0;
    memcpy(e + 10, &status, 2);
    d->rsp_prod_pvt++;
    /* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY */
    old = rd32(d->sring + 8);
    newp = d->rsp_prod_pvt;
    wr32(d->sring + 8, newp);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    ev = rd32(d->sring + 12);
    notify = (uint32_t)(newp - ev) < (uint32_t)(newp - old);
    pthread_mutex_unlock(&d->rm);
    if (notify) {
        stat_add(d, ST_NOTIFIES, 1);
        up(d, PXB_UP_NOTIFY);
    }
}

static void done_one(struct pxb *d)
{
    pthread_mutex_lock(&d->m);
    d->inflight--;
    if (d->barrier && d->inflight == 0)
        pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->m);
}

/* Python's answer to a request it was handed. */
void pxb_respond(struct pxb *d, uint64_t id, uint8_t op, int16_t status)
{
    respond(d, id, op, status);
    done_one(d);
}

/* ------------------------------------------------------------ the ring */

static uint32_t pending(struct pxb *d)
{
    return rd32(d->sring) - d->req_cons;
}

/* Take the next request into raw[].  Caller holds d->m.  1 taken, 0 none, -1 broken. */
static int take(struct pxb *d, uint8_t *raw)
{
    uint32_t prod = rd32(d->sring);
    uint32_t avail = prod - d->req_cons;
    if (!avail)
        return 0;
    if (avail > d->n) {
        snprintf(d->proto_msg, sizeof(d->proto_msg),
                 "request producer %u ran %u entries ahead of consumer %u (ring of %u)",
                 prod, avail, d->req_cons, d->n);
        return -1;
    }
    /* RING_REQUEST_CONS_OVERFLOW: never more outstanding than the ring holds */
    if ((uint32_t)(d->req_cons - d->rsp_prod_pvt) >= d->n)
        return 0;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    memcpy(raw, d->sring + HDR_SIZE + (uint64_t)(d->req_cons & (d->n - 1)) * REQ_SIZE, REQ_SIZE);
    d->req_cons++;
    stat_add(d, ST_REQS, 1);
    return 1;
}

/* Hand a taken request to Python (it stays in flight).  Caller holds d->m. */
static void to_python_locked(struct pxb *d, const uint8_t *raw)
{
    memcpy(d->slowq + (uint64_t)(d->sq_tail & (d->n - 1)) * REQ_SIZE, raw, REQ_SIZE);
    d->sq_tail++;
    stat_add(d, ST_SLOW, 1);
}

/* Python takes the next request it was handed: 1 copied into raw, 0 none. */
int pxb_take_slow(struct pxb *d, uint8_t *raw)
{
    int r = 0;
    pthread_mutex_lock(&d->m);
    if (d->sq_head != d->sq_tail) {
        memcpy(raw, d->slowq + (uint64_t)(d->sq_head & (d->n - 1)) * REQ_SIZE, REQ_SIZE);
        d->sq_head++;
        r = 1;
    }
    pthread_mutex_unlock(&d->m);
    return r;
}

uint32_t pxb_take_up(struct pxb *d, char *msg, int msglen)
{
    uint32_t f = __atomic_exchange_n(&d->up_flags, 0, __ATOMIC_SEQ_CST);
    if ((f & PXB_UP_PROTO) && msg && msglen > 0) {
        pthread_mutex_lock(&d->m);
        snprintf(msg, (size_t)msglen, "%s", d->proto_msg);
        pthread_mutex_unlock(&d->m);
    }
    return f;
}

/* ------------------------------------------------------------ reads from the mapped file */

/*
 * Reads copy from a read-only shared mapping of the image file: the page
 * cache without a system call per request (a 4 KiB pread costs ~1 us here, a
 * copy from the mapping less than half).  Writes stay pwritev (a write
 * through a mapping pays a fault per page and turns ENOSPC into SIGBUS).
 * A read beyond the file's end (someone truncated it) or an I/O error raises
 * SIGBUS during the copy: the handler jumps back and the request goes the
 * safe way (Python, preadv).  SIGBUS anywhere else goes to whoever handled
 * it before us (Python's faulthandler, or the default: the process dies).
 */
/* volatile: memcpy is known not to read it, so without it the compiler drops
 * the store before the copy (it did: the fault then found NULL here) */
static __thread sigjmp_buf *volatile copy_jmp;
static struct sigaction old_bus;
static pthread_mutex_t bus_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    sigjmp_buf *volatile j = copy_jmp;
    if (j) {
        copy_jmp = NULL;
        siglongjmp(*j, 1);
    }
    if (old_bus.sa_flags & SA_SIGINFO) {
        old_bus.sa_sigaction(sig, si, uc);
        return;
    }
    if (old_bus.sa_handler != SIG_DFL && old_bus.sa_handler != SIG_IGN) {
        old_bus.sa_handler(sig);
        return;
    }
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS);
}

/* Ours, chaining to whatever was there; again if someone replaced it since
 * (Python's faulthandler enabled later, for instance).  0 when in place. */
static int install_bus(void)
{
    struct sigaction cur, sa;
    int ok = 0;

    pthread_mutex_lock(&bus_lock);
    if (sigaction(SIGBUS, NULL, &cur) == 0) {
        if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus) {
            ok = 1;
        } else {
            memset(&sa, 0, sizeof(sa));
            sa.sa_sigaction = on_sigbus;
            sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
            sigemptyset(&sa.sa_mask);
            old_bus = cur;
            ok = sigaction(SIGBUS, &sa, NULL) == 0;
        }
    }
    pthread_mutex_unlock(&bus_lock);
    return ok ? 0 : -1;
}

/* 0, or -1 if the mapping faulted (nothing to trust in dst). */
static int copy_from_map(struct iovec *iov, int cnt, const uint8_t *from)
{
    sigjmp_buf jb;
    const uint8_t *volatile vsrc = from;    /* nothing live in registers across sigsetjmp */
    const uint8_t *src;

    if (sigsetjmp(jb, 0))
        return -1;
    src = vsrc;
    copy_jmp = &jb;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    for (int i = 0; i < cnt; i++) {
        /* in pieces: glibc copies a whole MiB with non-temporal stores or
         * rep movsb, 10-15 % slower here than 64 KiB at a time */
        for (uint64_t done = 0; done < iov[i].iov_len; done += COPY_CHUNK) {
            uint64_t l = iov[i].iov_len - done < COPY_CHUNK ? iov[i].iov_len - done : COPY_CHUNK;
            memcpy((uint8_t *)iov[i].iov_base + done, src + done, l);
        }
        src += iov[i].iov_len;
    }
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    copy_jmp = NULL;
    return 0;
}

static uint64_t iov_bytes(const struct iovec *iov, int cnt)
{
    uint64_t n = 0;
    for (int i = 0; i < cnt; i++)
        n += iov[i].iov_len;
    return n;
}

/* ------------------------------------------------------------ fast requests */

struct seg {
    uint32_t gref;
    uint8_t first, last;
};

struct fast {
    int nseg;
    int nrel;                   /* refs[0..nrel) to release after the I/O */
    struct seg seg[MAX_INDIRECT_SEGMENTS];
    uint32_t refs[MAX_INDIRECT_SEGMENTS];
    uint64_t offs[MAX_INDIRECT_SEGMENTS];
    struct iovec iov[MAX_INDIRECT_SEGMENTS];
};

static int load_segments(struct pxb *d, const uint8_t *raw, struct fast *f, uint8_t *op)
{
    if (raw[0] == OP_READ || raw[0] == OP_WRITE) {
        int n = raw[1];
        if (n < 1 || n > MAX_SEGMENTS)
            return -1;
        for (int i = 0; i < n; i++) {
            const uint8_t *s = raw + 24 + 8 * i;
            memcpy(&f->seg[i].gref, s, 4);
            f->seg[i].first = s[4];
            f->seg[i].last = s[5];
        }
        f->nseg = n;
        *op = raw[0];
        return 0;
    }
    if (raw[0] == OP_INDIRECT) {
        uint16_t n;
        int pages, got = 0;
        memcpy(&n, raw + 2, 2);
        if ((raw[1] != OP_READ && raw[1] != OP_WRITE) || n < 1 || n > MAX_INDIRECT_SEGMENTS)
            return -1;
        pages = (n + SEGS_PER_INDIRECT_PAGE - 1) / SEGS_PER_INDIRECT_PAGE;
        for (int p = 0; p < pages; p++) {
            uint32_t ref;
            int64_t off;
            int k = n - got < SEGS_PER_INDIRECT_PAGE ? n - got : SEGS_PER_INDIRECT_PAGE;
            memcpy(&ref, raw + 28 + 4 * p, 4);
            off = pxg_acquire(d->g, ref, d->me, 0);
            if (off < 0)
                return -1;
            for (int i = 0; i < k; i++) {
                const uint8_t *s = d->g->ram + off + 8 * i;
                memcpy(&f->seg[got + i].gref, s, 4);
                f->seg[got + i].first = __atomic_load_n(s + 4, __ATOMIC_RELAXED);
                f->seg[got + i].last = __atomic_load_n(s + 5, __ATOMIC_RELAXED);
            }
            pxg_release(d->g, ref);
            got += k;
        }
        f->nseg = n;
        *op = raw[1];
        return 0;
    }
    return -1;
}

static int io_full(struct pxb *d, int write, struct iovec *iov, int cnt, uint64_t pos, int zero_tail)
{
    int fd = d->fd;
    if (!write && d->map && pos + iov_bytes(iov, cnt) <= d->map_len)
        return copy_from_map(iov, cnt, d->map + pos);
    while (cnt > 0) {
        ssize_t r = write ? pwritev(fd, iov, cnt, (off_t)pos) : preadv(fd, iov, cnt, (off_t)pos);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0) {
            if (write || !zero_tail)
                return -1;
            for (int i = 0; i < cnt; i++)   /* a raw file shrunk under us: zeros, as raw.py */
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        pos += (uint64_t)r;
        while (cnt > 0 && (size_t)r >= iov->iov_len) {
            r -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0 && r) {
            iov->iov_base = (uint8_t *)iov->iov_base + r;
            iov->iov_len -= (size_t)r;
        }
    }
    return 0;
}

/* qcow2: every cluster the request touches must be in the fast map with the
 * access we need; then one vectored call per host-contiguous run. */
static int io_mapped(struct pxb *d, int write, struct iovec *iov, int cnt, uint64_t gpos, uint64_t len)
{
    uint64_t cs = 1ull << d->cbits, need = write ? FM_W : FM_R;
    for (uint64_t c = gpos >> d->cbits; c <= (gpos + len - 1) >> d->cbits; c++) {
        if (c >= d->nclusters)
            return 1;
        uint64_t e = __atomic_load_n(&d->fmap[c], __ATOMIC_ACQUIRE);
        if (!(e & need))
            return 1;
    }
    /* walk the iovecs, cutting at cluster boundaries where the host is discontiguous */
    struct iovec run[MAX_INDIRECT_SEGMENTS * 2];
    int nrun = 0;
    uint64_t run_host = 0, run_len = 0;
    for (int i = 0; i < cnt; i++) {
        uint8_t *p = iov[i].iov_base;
        uint64_t left = iov[i].iov_len;
        while (left) {
            uint64_t e = __atomic_load_n(&d->fmap[gpos >> d->cbits], __ATOMIC_ACQUIRE);
            uint64_t in = cs - (gpos & (cs - 1));
            uint64_t l = left < in ? left : in;
            uint64_t host = (e & FM_OFF_MASK) + (gpos & (cs - 1));
            if (!(e & need))
                return -1;  /* changed under us: Python has it now; report an error */
            if (nrun && run_host + run_len == host && nrun < (int)(sizeof(run) / sizeof(run[0]))) {
                if ((uint8_t *)run[nrun - 1].iov_base + run[nrun - 1].iov_len == p)
                    run[nrun - 1].iov_len += l;
                else {
                    run[nrun].iov_base = p;
                    run[nrun++].iov_len = l;
                }
                run_len += l;
            } else {
                if (nrun && io_full(d, write, run, nrun, run_host, 0))
                    return -1;
                nrun = 0;
                run[nrun].iov_base = p;
                run[nrun++].iov_len = l;
                run_host = host;
                run_len = l;
            }
            p += l;
            left -= l;
            gpos += l;
        }
    }
    if (nrun && io_full(d, write, run, nrun, run_host, 0))
        return -1;
    return 0;
}

/*
 * Persistent grants (feature-persistent, negotiated by both ends): a grant
 * the frontend keeps granted is held across requests, up to pmax of them,
 * and released when the ring goes (pxb_free), as Linux's blkback keeps them
 * mapped.  pcache[ref] = offset | 1 (held) | 2 (held writable).  A request
 * uses a cached hold when it allows the access it needs, and otherwise
 * takes (and afterwards drops) a hold of its own.  Fills f->offs; the refs
 * to release after the I/O are f->refs[0..nrel).  0, or -1 (nothing held).
 */
static int hold_persistent(struct pxb *d, struct fast *f, int need_write)
{
    int nrel = 0;

    pthread_mutex_lock(&d->pm);
    for (int i = 0; i < f->nseg; i++) {
        uint32_t ref = f->seg[i].gref;
        uint64_t e = ref < d->g->max_refs ? d->pcache[ref] : 0;
        int64_t off;

        if ((e & 1) && (!need_write || (e & 2))) {
            f->offs[i] = e & ~0xFFFull;
            continue;
        }
        off = pxg_acquire(d->g, ref, d->me, need_write);
        if (off < 0) {
            pthread_mutex_unlock(&d->pm);
            pxg_release_many(d->g, f->refs, nrel);
            return -1;
        }
        f->offs[i] = (uint64_t)off;
        if (!(e & 1) && d->pcount < d->pmax) {
            d->pcache[ref] = (uint64_t)off | 1 | (need_write ? 2 : 0);
            d->pcount++;
        } else {
            f->refs[nrel++] = ref;
        }
    }
    pthread_mutex_unlock(&d->pm);
    f->nrel = nrel;
    return 0;
}

/* 1: served and answered; 0: Python must take it (nothing was changed). */
static int serve_fast(struct pxb *d, const uint8_t *raw, struct fast *f)
{
    uint8_t op;
    uint64_t id, sector, nsec = 0, pos, len;
    int write, got, rc;

    if (d->all_slow || load_segments(d, raw, f, &op))
        return 0;
    write = op == OP_WRITE;
    if (write && d->readonly)
        return 0;
    memcpy(&id, raw + 8, 8);
    memcpy(&sector, raw + 16, 8);
    for (int i = 0; i < f->nseg; i++) {
        if (f->seg[i].first > f->seg[i].last || f->seg[i].last > 7)
            return 0;
        nsec += (uint64_t)(f->seg[i].last - f->seg[i].first + 1);
        f->refs[i] = f->seg[i].gref;
    }
    if (sector >= (1ull << 63) || sector + nsec > d->sectors)
        return 0;
    /* a read writes into the guest's pages: the grant must allow writing */
    if (d->pcache) {
        if (hold_persistent(d, f, !write))
            return 0;
    } else {
        got = pxg_acquire_many(d->g, f->refs, f->nseg, d->me, !write, f->offs);
        if (got != f->nseg)
            return 0;
        f->nrel = f->nseg;
    }
    for (int i = 0; i < f->nseg; i++) {
        f->iov[i].iov_base = d->g->ram + f->offs[i] + (uint64_t)f->seg[i].first * SECTOR;
        f->iov[i].iov_len = (uint64_t)(f->seg[i].last - f->seg[i].first + 1) * SECTOR;
    }
    pos = sector * SECTOR;
    len = nsec * SECTOR;
    if (d->fmap)
        rc = io_mapped(d, write, f->iov, f->nseg, pos, len);
    else
        rc = io_full(d, write, f->iov, f->nseg, d->base + pos, 1);
    if (rc == 0 && !write && __atomic_load_n(&d->g->logdirty, __ATOMIC_RELAXED))
        for (int i = 0; i < f->nseg; i++)
            pxg_mark_dirty(d->g, f->offs[i] >> 12);
    pxg_release_many(d->g, f->refs, f->nrel);
    if (rc)
        return 0;   /* not in the fast map, or an I/O error: Python redoes it and reports */
    if (write) {
        stat_add(d, ST_WRITES, 1);
        stat_add(d, ST_WRITE_BYTES, len);
    } else {
        stat_add(d, ST_READS, 1);
        stat_add(d, ST_READ_BYTES, len);
    }
    respond(d, id, op, RSP_OKAY);
    return 1;
}

/* ------------------------------------------------------------ workers */

/* The poller: spin a while, then arm req_event and sleep on kick_fd.  Unlocked. */
static void wait_for_requests(struct pxb *d)
{
    uint64_t end = now_ns() + d->poll_ns;
    struct pollfd pfd = { .fd = d->kick_fd, .events = POLLIN };
    uint64_t junk;
    int more;

    do {
        if (pending(d) || __atomic_load_n(&d->stop, __ATOMIC_RELAXED)) {
            stat_add(d, ST_POLL_HITS, 1);
            return;
        }
        __builtin_ia32_pause();
    } while (now_ns() < end);
    /* RING_FINAL_CHECK_FOR_REQUESTS, with req_cons exact (workers take under d->m) */
    pthread_mutex_lock(&d->m);
    wr32(d->sring + 4, d->req_cons + 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    more = pending(d) != 0;
    pthread_mutex_unlock(&d->m);
    if (more)
        return;
    stat_add(d, ST_SLEEPS, 1);
    if (poll(&pfd, 1, 1000) > 0) {
        (void)!read(d->kick_fd, &junk, sizeof(junk));
        stat_add(d, ST_KICKS, 1);
    }
}

static void barrier_locked(struct pxb *d, const uint8_t *raw)
{
    d->barrier = 1;
    while (d->inflight && !d->stop)
        pthread_cond_wait(&d->cv, &d->m);
    d->inflight++;
    to_python_locked(d, raw);
    pthread_mutex_unlock(&d->m);
    up(d, PXB_UP_SLOW);
    pthread_mutex_lock(&d->m);
    while (d->inflight && !d->stop)
        pthread_cond_wait(&d->cv, &d->m);
    d->barrier = 0;
    pthread_cond_broadcast(&d->cv);
}

static void *worker(void *arg)
{
    struct pxb *d = arg;
    uint8_t raw[REQ_SIZE];
    struct fast *f = malloc(sizeof(*f));

    if (!f)
        return NULL;
    pthread_mutex_lock(&d->m);
    while (!d->stop) {
        int r;
        if (d->barrier || d->broken) {
            d->idle++;
            pthread_cond_wait(&d->cv, &d->m);
            d->idle--;
            continue;
        }
        r = take(d, raw);
        if (r < 0) {
            d->broken = 1;
            pthread_mutex_unlock(&d->m);
            up(d, PXB_UP_PROTO);
            pthread_mutex_lock(&d->m);
            continue;
        }
        if (r == 0) {
            if (d->poller) {
                d->idle++;
                pthread_cond_wait(&d->cv, &d->m);
                d->idle--;
                continue;
            }
            d->poller = 1;
            pthread_mutex_unlock(&d->m);
            wait_for_requests(d);
            pthread_mutex_lock(&d->m);
            d->poller = 0;
            continue;
        }
        if (raw[0] == OP_FLUSH_DISKCACHE || raw[0] == OP_WRITE_BARRIER) {
            barrier_locked(d, raw);
            continue;
        }
        d->inflight++;
        /* A big read: let another worker start on the next request meanwhile.
         * Not for writes: buffered writes to one file serialise on its inode
         * lock, and a second writer only spins on it. */
        if (d->idle && pending(d)) {
            uint16_t nind = 0;
            memcpy(&nind, raw + 2, 2);
            if ((raw[0] == OP_INDIRECT && raw[1] == OP_READ && (uint64_t)nind * 4096 >= LARGE_BYTES)
                || d->all_slow)
                pthread_cond_signal(&d->cv);
        }
        pthread_mutex_unlock(&d->m);
        if (!serve_fast(d, raw, f)) {
            pthread_mutex_lock(&d->m);
            to_python_locked(d, raw);
            pthread_mutex_unlock(&d->m);
            up(d, PXB_UP_SLOW);
            pthread_mutex_lock(&d->m);
            continue;
        }
        pthread_mutex_lock(&d->m);
        d->inflight--;
        if (d->barrier && !d->inflight)
            pthread_cond_broadcast(&d->cv);
    }
    pthread_mutex_unlock(&d->m);
    free(f);
    return NULL;
}

/* ------------------------------------------------------------ lifecycle */

struct pxb *pxb_new(struct pxg *g, uint8_t *sring, uint32_t n, uint16_t me, int fd, uint64_t base,
                    uint64_t sectors, int readonly, int kick_fd, int up_fd)
{
    struct pxb *d;
    if (!n || (n & (n - 1)))
        return NULL;
    d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    d->slowq = calloc(n, REQ_SIZE);
    if (!d->slowq) {
        free(d);
        return NULL;
    }
    d->g = g;
    d->sring = sring;
    d->n = n;
    d->me = me;
    d->fd = fd;
    d->base = base;
    d->sectors = sectors;
    d->readonly = readonly;
    d->all_slow = fd < 0;
    d->kick_fd = kick_fd;
    d->up_fd = up_fd;
    d->poll_ns = 50000;
    d->nworkers = 2;
    /* nothing outstanding at attach (as the Python ring) */
    d->rsp_prod_pvt = rd32(sring + 8);
    d->req_cons = d->rsp_prod_pvt;
    pthread_mutex_init(&d->m, NULL);
    pthread_cond_init(&d->cv, NULL);
    pthread_mutex_init(&d->rm, NULL);
    pthread_mutex_init(&d->pm, NULL);
    return d;
}

void pxb_set_fmap(struct pxb *d, uint64_t *fmap, uint32_t cbits, uint64_t nclusters)
{
    d->fmap = fmap;
    d->cbits = cbits;
    d->nclusters = nclusters;
}

/* Map the image file for reads: len bytes of address space (may run past
 * the file's end: pages there become readable as the file grows).  0 ok. */
int pxb_map_file(struct pxb *d, uint64_t len)
{
    void *m;
    if (d->fd < 0 || !len || install_bus())
        return -1;
    m = mmap(NULL, len, PROT_READ, MAP_SHARED | MAP_NORESERVE, d->fd, 0);
    if (m == MAP_FAILED)
        return -1;
    d->map = m;
    d->map_len = len;
    return 0;
}

/* Persistent grants negotiated: keep up to max holds across requests. 0 ok. */
int pxb_set_persistent(struct pxb *d, uint32_t max)
{
    d->pcache = calloc(d->g->max_refs ? d->g->max_refs : 1, sizeof(uint64_t));
    if (!d->pcache)
        return -1;
    d->pmax = max;
    return 0;
}

uint32_t pxb_persistent_count(struct pxb *d)
{
    uint32_t n;
    pthread_mutex_lock(&d->pm);
    n = d->pcount;
    pthread_mutex_unlock(&d->pm);
    return n;
}

void pxb_set_tuning(struct pxb *d, int nworkers, uint64_t poll_ns)
{
    if (nworkers >= 1 && nworkers <= MAX_WORKERS)
        d->nworkers = nworkers;
    d->poll_ns = poll_ns;
}

int pxb_start(struct pxb *d)
{
    for (int i = 0; i < d->nworkers; i++) {
        if (pthread_create(&d->workers[i], NULL, worker, d)) {
            d->nworkers = i;
            return -1;
        }
    }
    return 0;
}

/* Stop taking requests and join the workers.  Requests Python holds stay in
 * flight: Python answers them (pxb_respond) before pxb_free. */
void pxb_stop(struct pxb *d)
{
    uint64_t one = 1;
    pthread_mutex_lock(&d->m);
    d->stop = 1;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->m);
    (void)!write(d->kick_fd, &one, sizeof(one));
    for (int i = 0; i < d->nworkers; i++)
        pthread_join(d->workers[i], NULL);
    d->nworkers = 0;
}

void pxb_free(struct pxb *d)
{
    if (!d)
        return;
    pthread_mutex_destroy(&d->m);
    pthread_cond_destroy(&d->cv);
    pthread_mutex_destroy(&d->rm);
    if (d->pcache) {    /* the ring is gone: drop the persistent holds */
        for (uint32_t r = 0; r < d->g->max_refs; r++)
            if (d->pcache[r] & 1)
                pxg_release(d->g, r);
        free(d->pcache);
    }
    pthread_mutex_destroy(&d->pm);
    if (d->map)
        munmap(d->map, d->map_len);
    free(d->slowq);
    free(d);
}

void pxb_stats(struct pxb *d, uint64_t *out, int n)
{
    for (int i = 0; i < n && i < ST_NSTATS; i++)
        out[i] = __atomic_load_n(&d->st[i], __ATOMIC_RELAXED);
}

int pxb_inflight(struct pxb *d)
{
    int r;
    pthread_mutex_lock(&d->m);
    r = d->inflight;
    pthread_mutex_unlock(&d->m);
    return r;
}
