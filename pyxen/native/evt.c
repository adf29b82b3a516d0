/*
 * evt.c - inter-domain event delivery without Python in the way.
 *
 * Each interdomain event channel between two domain processes is an eventfd
 * per direction (pyxen/toolstack/directory.py): the sender's vCPU writes it.
 * Without this file the receiver's Python main loop wakes, then posts the
 * port to the vCPU's inbox and wakes the vCPU thread: two Python thread
 * hand-offs, each waiting for the GIL.  Here:
 *
 * - a vCPU that sleeps (SCHEDOP_block, poll: pxe_wait, GIL released) polls
 *   the domain's inbound eventfds itself (through `epfd_v`, an epoll set of
 *   all of them), so the sender's write wakes it directly: one hand-off;
 * - while no vCPU sleeps, one C thread per domain (the pump, edge-triggered
 *   on the same eventfds through `epfd`) takes each event and kicks the
 *   port's vCPU as pyxen.kvm.VCPU.kick does (kvm_run.immediate_exit = 1 and
 *   the kick signal to its thread), so a running guest exits promptly.
 *
 * Whoever reads an eventfd's count "fires" its port: an atomic OR into the
 * fired bitmap of the vCPU the port is bound to, then a write of that
 * vCPU's wake eventfd if it sleeps, or a kick if it runs (not if it is the
 * vCPU firing).
 *
 * The vCPU thread itself then sets the bits in shared_info and its
 * vcpu_info (pxe_deliver: Xen's evtchn_2l_set_pending, with the same
 * locked operations as pyxen/hv/evtchn.py set_pending_bits), so the
 * hypervisor's bit changes still happen on the notified vCPU's thread and
 * vcpu_info may move (VCPUOP_register_vcpu_info) without telling the pump.
 *
 * Ordering, all sequentially consistent: a vCPU counts itself in
 * `sleepers` (and sets its `waiting`) before it checks its fired ports and
 * polls, and after its sleep it uncounts itself before it sweeps epfd_v;
 * the pump reads `sleepers` after the eventfd became readable and leaves
 * the event to the sleepers if there are any.  So an event is either taken
 * by the pump, or seen readable by a sleeper's poll or by its sweep after
 * the sleep.  Likewise a firer publishes the port before it reads the
 * target's `waiting`, so the target sees the port or gets its eventfd
 * written.  An extra kick only costs one early KVM_RUN exit.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "native.h"

#define PXE_STOP_KEY UINT64_MAX

static void efd_write(int fd)
{
    uint64_t one = 1;
    ssize_t r;
    do
        r = write(fd, &one, sizeof(one));
    while (r < 0 && errno == EINTR);
}

static void efd_drain(int fd)
{
    uint64_t v;
    ssize_t r;
    do
        r = read(fd, &v, sizeof(v));
    while (r < 0 && errno == EINTR);
}

/* Under h->lock, so that once pxe_attach(.., 0, NULL) returned (the vCPU's
 * thread ended) its kvm_run may be unmapped.
 *
 * `word_busy`: ports of the fired port's 64-port word were already waiting
 * for the vCPU.  If the kick that came with them is still pending too
 * (immediate_exit still 1: no KVM_RUN has returned for it yet), that return
 * makes the run loop attend and pxe_deliver take the whole word in one
 * exchange, our port included, so a second kick would only cost the guest
 * one more exit or one more KVM_RUN that ends at once (netback's TX and RX
 * ports usually fire together).  Once a KVM_RUN consumed the pending kick
 * (immediate_exit back to 0), we kick again. */
static void kick(struct pxe_hub *h, struct pxe_vcpu *v, int word_busy)
{
    pthread_mutex_lock(&h->lock);
    if (v->tid && v->immediate_exit) {
        if (word_busy && __atomic_load_n(v->immediate_exit, __ATOMIC_SEQ_CST)) {
            __atomic_fetch_add(&h->kicks_saved, 1, __ATOMIC_RELAXED);
        } else {
            __atomic_store_n(v->immediate_exit, 1, __ATOMIC_SEQ_CST);
            syscall(SYS_tgkill, getpid(), v->tid, PXE_KICK_SIGNAL);
        }
    }
    pthread_mutex_unlock(&h->lock);
}

/* Port `port` fired; `self` is the firing vCPU or UINT32_MAX for the pump. */
static void fire(struct pxe_hub *h, uint32_t port, uint32_t self)
{
    uint32_t vi;
    uint64_t old;
    struct pxe_vcpu *v;
    if (port >= PXE_MAX_PORTS)
        return;
    vi = __atomic_load_n(&h->port_vcpu[port], __ATOMIC_SEQ_CST);
    if (vi >= h->nr_vcpus)
        vi = 0;
    v = &h->vcpus[vi];
    old = __atomic_fetch_or(&v->fired[port / 64], 1ull << (port % 64), __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&h->events, 1, __ATOMIC_RELAXED);
    if (vi == self)
        return;
    if (__atomic_load_n(&v->waiting, __ATOMIC_SEQ_CST)) {
        efd_write(v->wake_fd);
    } else {
        kick(h, v, old != 0);
    }
}

/* Read the eventfd of `key` (fd << 32 | port); if it had a count, fire the
 * port.  An event epoll returned just before pxe_unwatch may name an fd that
 * is closed (or reused) by now: the read happens under h->lock and only if
 * the port is still watched through that fd. */
static void take(struct pxe_hub *h, uint64_t key, uint32_t self)
{
    uint32_t port = (uint32_t)key;
    int fd = (int)(key >> 32);
    uint64_t val = 0;
    ssize_t r = -1;
    if (port >= PXE_MAX_PORTS)
        return;
    pthread_mutex_lock(&h->lock);
    if (h->port_fd[port] == fd + 1)
        do
            r = read(fd, &val, sizeof(val));
        while (r < 0 && errno == EINTR);
    pthread_mutex_unlock(&h->lock);
    if (r == (ssize_t)sizeof(val) && val)
        fire(h, port, self);
}

/* A vCPU after its sleep: take every event that is ready. */
static void sweep(struct pxe_hub *h, uint32_t self)
{
    struct epoll_event evs[32];
    int n;
    do {
        n = epoll_wait(h->epfd_v, evs, 32, 0);
        for (int i = 0; i < n; i++)
            take(h, evs[i].data.u64, self);
    } while (n == 32);
}

static void *pump(void *arg)
{
    struct pxe_hub *h = arg;
    struct epoll_event evs[32];
    sigset_t all;

    /* the kick signal is for vCPU threads; this one never takes signals */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    for (;;) {
        int n = epoll_wait(h->epfd, evs, 32, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        for (int i = 0; i < n; i++) {
            uint64_t key = evs[i].data.u64;
            if (key == PXE_STOP_KEY)
                return NULL;
            if (__atomic_load_n(&h->sleepers, __ATOMIC_SEQ_CST))
                continue;  /* a sleeping vCPU polls it: theirs (see the top) */
            take(h, key, UINT32_MAX);
        }
    }
}

struct pxe_hub *pxe_new(uint32_t nr_vcpus, uint32_t si_pending, uint32_t si_mask,
                        uint32_t vi_sel, uint32_t vi_upcall)
{
    struct pxe_hub *h;
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = PXE_STOP_KEY };

    if (!nr_vcpus || nr_vcpus > PXE_MAX_VCPUS)
        return NULL;
    h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->nr_vcpus = nr_vcpus;
    h->si_pending = si_pending;
    h->si_mask = si_mask;
    h->vi_sel = vi_sel;
    h->vi_upcall = vi_upcall;
    h->epfd = epoll_create1(EPOLL_CLOEXEC);
    h->epfd_v = epoll_create1(EPOLL_CLOEXEC);
    h->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    for (uint32_t i = 0; i < nr_vcpus; i++)
        h->vcpus[i].wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (h->epfd < 0 || h->epfd_v < 0 || h->stop_fd < 0 || epoll_ctl(h->epfd, EPOLL_CTL_ADD, h->stop_fd, &ev) < 0)
        goto fail;
    for (uint32_t i = 0; i < nr_vcpus; i++)
        if (h->vcpus[i].wake_fd < 0)
            goto fail;
    pthread_mutex_init(&h->lock, NULL);
    if (pthread_create(&h->thread, NULL, pump, h) != 0) {
        pthread_mutex_destroy(&h->lock);
        goto fail;
    }
    return h;
fail:
    if (h->epfd >= 0)
        close(h->epfd);
    if (h->epfd_v >= 0)
        close(h->epfd_v);
    if (h->stop_fd >= 0)
        close(h->stop_fd);
    for (uint32_t i = 0; i < nr_vcpus; i++)
        if (h->vcpus[i].wake_fd >= 0)
            close(h->vcpus[i].wake_fd);
    free(h);
    return NULL;
}

void pxe_free(struct pxe_hub *h)
{
    if (!h)
        return;
    efd_write(h->stop_fd);
    pthread_join(h->thread, NULL);
    close(h->epfd);
    close(h->epfd_v);
    close(h->stop_fd);
    for (uint32_t i = 0; i < h->nr_vcpus; i++)
        close(h->vcpus[i].wake_fd);
    pthread_mutex_destroy(&h->lock);
    free(h);
}

void pxe_attach(struct pxe_hub *h, uint32_t vcpu, int tid, uint8_t *immediate_exit)
{
    if (vcpu >= h->nr_vcpus)
        return;
    pthread_mutex_lock(&h->lock);
    h->vcpus[vcpu].immediate_exit = immediate_exit;
    h->vcpus[vcpu].tid = tid;
    pthread_mutex_unlock(&h->lock);
}

void pxe_bind_vcpu(struct pxe_hub *h, uint32_t port, uint32_t vcpu)
{
    if (port < PXE_MAX_PORTS)
        __atomic_store_n(&h->port_vcpu[port], vcpu < h->nr_vcpus ? vcpu : 0, __ATOMIC_SEQ_CST);
}

int pxe_watch(struct pxe_hub *h, uint32_t port, int fd, uint32_t vcpu)
{
    uint64_t key = ((uint64_t)(uint32_t)fd << 32) | port;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLET, .data.u64 = key };
    struct epoll_event ev_v = { .events = EPOLLIN, .data.u64 = key };
    int e;
    if (port >= PXE_MAX_PORTS || fd < 0)
        return -EINVAL;
    pxe_bind_vcpu(h, port, vcpu);
    pthread_mutex_lock(&h->lock);
    h->port_fd[port] = fd + 1;
    pthread_mutex_unlock(&h->lock);
    if (epoll_ctl(h->epfd_v, EPOLL_CTL_ADD, fd, &ev_v) < 0) {
        e = errno;
        goto undo;
    }
    if (epoll_ctl(h->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        e = errno;
        epoll_ctl(h->epfd_v, EPOLL_CTL_DEL, fd, NULL);
        goto undo;
    }
    return 0;
undo:
    pthread_mutex_lock(&h->lock);
    h->port_fd[port] = 0;
    pthread_mutex_unlock(&h->lock);
    return -e;
}

/* Stop watching `port`'s eventfd and close it (under h->lock: see take). */
int pxe_unwatch(struct pxe_hub *h, uint32_t port, int fd)
{
    int r = 0;
    if (port >= PXE_MAX_PORTS)
        return -EINVAL;
    pthread_mutex_lock(&h->lock);
    if (h->port_fd[port] == fd + 1)
        h->port_fd[port] = 0;
    if (epoll_ctl(h->epfd, EPOLL_CTL_DEL, fd, NULL) < 0)
        r = -errno;
    if (epoll_ctl(h->epfd_v, EPOLL_CTL_DEL, fd, NULL) < 0)
        r = -errno;
    close(fd);
    pthread_mutex_unlock(&h->lock);
    return r;
}

/* Xen's evtchn_2l_set_pending on this vCPU's shared_info / vcpu_info: 1 if
 * the vCPU must be notified (evtchn_upcall_pending went 0 -> 1). */
static int set_pending(const struct pxe_hub *h, uint8_t *si, uint8_t *vi, uint32_t port)
{
    uint64_t word = port / 64, bit = 1ull << (port % 64), old;
    uint64_t *pending = (uint64_t *)(si + h->si_pending) + word;
    uint64_t *mask = (uint64_t *)(si + h->si_mask) + word;
    uint64_t *sel = (uint64_t *)(vi + h->vi_sel);
    uint8_t *upcall = vi + h->vi_upcall;

    old = __atomic_fetch_or(pending, bit, __ATOMIC_SEQ_CST);
    if (old & bit)
        return 0;
    if (__atomic_load_n(mask, __ATOMIC_SEQ_CST) & bit)
        return 0;
    old = __atomic_fetch_or(sel, 1ull << word, __ATOMIC_SEQ_CST);
    if (old & (1ull << word))
        return 0;
    if (__atomic_load_n(upcall, __ATOMIC_SEQ_CST))
        return 0;
    __atomic_store_n(upcall, 1, __ATOMIC_SEQ_CST);
    return 1;
}

/* The vCPU's own thread: mark every port fired for it pending.  Returns how
 * many ports it took. */
int pxe_deliver(struct pxe_hub *h, uint32_t vcpu, uint8_t *si, uint8_t *vi)
{
    struct pxe_vcpu *v;
    int n = 0;
    if (vcpu >= h->nr_vcpus)
        return 0;
    v = &h->vcpus[vcpu];
    for (uint32_t w = 0; w < PXE_MAX_PORTS / 64; w++) {
        uint64_t x;
        if (!__atomic_load_n(&v->fired[w], __ATOMIC_SEQ_CST))
            continue;
        x = __atomic_exchange_n(&v->fired[w], 0, __ATOMIC_SEQ_CST);
        while (x) {
            int b = __builtin_ctzll(x);
            x &= x - 1;
            set_pending(h, si, vi, w * 64 + (uint32_t)b);
            n++;
        }
    }
    return n;
}

static int any_fired(struct pxe_vcpu *v)
{
    for (uint32_t w = 0; w < PXE_MAX_PORTS / 64; w++)
        if (__atomic_load_n(&v->fired[w], __ATOMIC_SEQ_CST))
            return 1;
    return 0;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * Adaptive polling before sleeping, as KVM's halt polling does for a halted
 * vCPU (virt/kvm/kvm_main.c, halt_poll_ns): waking a sleeping thread costs
 * the host scheduler tens of microseconds on a busy machine, more than an
 * event that comes soon takes to come.  So a vCPU whose recent waits ended
 * soon looks for its event (without sleeping) for up to poll_ns first.  The
 * window grows (10 us, then doubling, up to the hub's max_poll_ns) after a
 * wait that slept but ended within the maximum, and drops to nothing after
 * a wait longer than that: an idle vCPU, or one whose events are far apart,
 * never polls, and only a vCPU in a fast exchange (a ring, a ping-pong)
 * spends CPU on it.  Only waits ended by another domain's event (an
 * inbound eventfd) open the window: a vCPU woken from this process (a
 * backend's completion, a timer, xenstore) wakes through its wake_fd from a
 * thread that may need the CPU the poll would take.  What the guest sees is
 * unchanged: it stays blocked until the event, exactly as if the thread had
 * slept.
 */
#define PXE_POLL_START_NS 10000ull

static int ready(struct pxe_vcpu *v, struct pollfd *pfd)
{
    int r;
    if (any_fired(v))
        return 1;
    pfd[0].revents = pfd[1].revents = 0;
    r = poll(pfd, 2, 0);
    return r > 0 || (r < 0 && errno == EINTR);  /* a signal: Python looks, as after a sleep */
}

/* After a wait of `waited` ns that slept (not ended by the poll): open or
 * widen the window if another domain's event ended it within the bound,
 * close it if the wait was longer than the bound. */
static void adapt(struct pxe_hub *h, struct pxe_vcpu *v, uint64_t waited, int interdomain)
{
    uint64_t max = __atomic_load_n(&h->max_poll_ns, __ATOMIC_RELAXED);
    if (!max || waited > max) {
        v->poll_ns = 0;
    } else if (interdomain) {
        uint64_t n = v->poll_ns ? v->poll_ns * 2 : PXE_POLL_START_NS;
        v->poll_ns = n < max ? n : max;
    }
}

/* The vCPU's thread sleeps (GIL released: called through the CDLL view)
 * until an event arrives on any inbound eventfd, a port fires for it,
 * pxe_wake, a signal (a kick), or timeout_ns (< 0: none).  Returns 1 if
 * ports are waiting for pxe_deliver. */
int pxe_wait(struct pxe_hub *h, uint32_t vcpu, int64_t timeout_ns)
{
    struct pxe_vcpu *v;
    struct pollfd pfd[2];
    int ms;
    if (vcpu >= h->nr_vcpus)
        return 0;
    v = &h->vcpus[vcpu];
    __atomic_store_n(&v->waiting, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&h->sleepers, 1, __ATOMIC_SEQ_CST);
    pfd[0].fd = v->wake_fd;
    pfd[1].fd = h->epfd_v;
    pfd[0].events = pfd[1].events = POLLIN;
    if (!any_fired(v)) {
        uint64_t t0 = now_ns(), t, win = v->poll_ns;
        int got = 0;
        if (win && timeout_ns >= 0 && (uint64_t)timeout_ns < win)
            win = (uint64_t)timeout_ns;
        if (win) {
            __atomic_fetch_add(&h->polled, 1, __ATOMIC_RELAXED);
            do
                got = ready(v, pfd);
            while (!got && now_ns() - t0 < win);
            if (got)
                __atomic_fetch_add(&h->poll_hits, 1, __ATOMIC_RELAXED);
        }
        if (!got) {
            int64_t left = timeout_ns;
            if (left >= 0) {
                t = now_ns() - t0;
                left = (uint64_t)left > t ? left - (int64_t)t : 0;
            }
            ms = left < 0 ? -1 : (int)((left + 999999) / 1000000);
            pfd[0].revents = pfd[1].revents = 0;
            (void)poll(pfd, 2, ms);  /* EINTR (a kick): back to Python, which looks again */
            adapt(h, v, now_ns() - t0, (pfd[1].revents & POLLIN) && !(pfd[0].revents & POLLIN));
        }
    }
    __atomic_fetch_sub(&h->sleepers, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&v->waiting, 0, __ATOMIC_SEQ_CST);
    sweep(h, vcpu);
    efd_drain(v->wake_fd);
    return any_fired(v);
}

void pxe_set_poll(struct pxe_hub *h, uint64_t max_poll_ns)
{
    __atomic_store_n(&h->max_poll_ns, max_poll_ns, __ATOMIC_RELAXED);
    if (!max_poll_ns)
        for (uint32_t i = 0; i < h->nr_vcpus; i++)
            h->vcpus[i].poll_ns = 0;
}

void pxe_poll_stats(struct pxe_hub *h, uint64_t *out)
{
    out[0] = __atomic_load_n(&h->polled, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&h->poll_hits, __ATOMIC_RELAXED);
}

void pxe_wake(struct pxe_hub *h, uint32_t vcpu)
{
    if (vcpu < h->nr_vcpus)
        efd_write(h->vcpus[vcpu].wake_fd);
}

uint64_t pxe_events(struct pxe_hub *h)
{
    return __atomic_load_n(&h->events, __ATOMIC_RELAXED);
}

/*
 * EVTCHNOP_send on an interdomain channel to another domain process, the
 * whole hypercall in one call (no Python between the exit and the eventfd
 * write): read the port from the guest's argument (the guest's page walk,
 * pxc_walk, read access), and if it has an outbound eventfd registered
 * (pxe_set_out: only while the port is bound interdomain to another process,
 * pyxen/hv/evtchn.py) write it.  Anything else (a port without one, an
 * argument that crosses a page or does not translate) returns -1 and Python
 * does the hypercall, errors included.  Called with the GIL held (the table
 * changes under the GIL too), so a registered fd is never closed under us.
 */
void pxe_set_out(struct pxe_hub *h, uint32_t port, int fd)
{
    if (port < PXE_MAX_PORTS)
        h->out_fd[port] = fd >= 0 ? fd + 1 : 0;
}

int pxe_send(struct pxe_hub *h, const struct pxc_self *self, uint64_t l4, uint64_t va)
{
    uint8_t *page;
    uint64_t pfns[5];
    uint32_t port;
    int fd;

    if ((va & 4095) > 4096 - sizeof(port))
        return -1;
    if (pxc_walk(self, l4, va, 1, 0, &page, pfns) < 0)
        return -1;
    port = __atomic_load_n((uint32_t *)(page + (va & 4095)), __ATOMIC_RELAXED);
    if (port >= PXE_MAX_PORTS || (fd = h->out_fd[port] - 1) < 0)
        return -1;
    efd_write(fd);
    return 0;
}
