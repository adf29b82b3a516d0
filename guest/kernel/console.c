/*
 * console.c - PV console.
 *
 * The domain builder gives us a shared page (start_info.console.domU.mfn)
 * holding two byte rings, and an event channel to kick the backend.
 * Output: we produce at out[out_prod], the backend consumes at out_cons.
 * Input: the backend produces at in[in_prod], we consume at in_cons.
 * Indices are free-running 32-bit counters; masked by the ring size.
 *
 * Until the ring is mapped (and for fatal messages) everything goes
 * through HYPERVISOR_console_io, which is synchronous.
 */
#include "console.h"
#include "events.h"
#include "hypercall.h"
#include "mm.h"
#include "sched.h"
#include "xtime.h"

static struct xencons_interface *ring;
static evtchn_port_t cons_port;

/* Received characters not yet read by anyone. */
static char inbuf[256];
static unsigned int in_head, in_tail;

void console_io_write(const char *buf, size_t len)
{
    HYPERVISOR_console_io(CONSOLEIO_write, len, buf);
}

int console_ring_ready(void)
{
    return ring != NULL;
}

static void console_event(evtchn_port_t port, struct pt_regs *regs, void *data)
{
    XENCONS_RING_IDX cons, prod;

    (void)port; (void)regs; (void)data;
    /* Output progress needs no action here: writers poll out_cons. */
    cons = READ_ONCE(ring->in_cons);
    prod = READ_ONCE(ring->in_prod);
    rmb();      /* read the bytes only after seeing the producer index */
    if (cons == prod)
        return;
    while (cons != prod) {
        char c = ring->in[cons++ & (XENCONS_IN_SIZE - 1)];
        if (in_head - in_tail < sizeof(inbuf))
            inbuf[in_head++ % sizeof(inbuf)] = c;
    }
    mb();       /* finish reading before releasing the slots */
    WRITE_ONCE(ring->in_cons, cons);
    notify_remote_via_evtchn(cons_port);
}

size_t console_read(char *buf, size_t len)
{
    unsigned long flags = irq_save();
    size_t n = 0;
    while (n < len && in_tail != in_head)
        buf[n++] = inbuf[in_tail++ % sizeof(inbuf)];
    irq_restore(flags);
    return n;
}

void console_init(void)
{
    unsigned long mfn = start_info->console.domU.mfn;
    unsigned long pfn;

    if (!mfn) {
        early_printk("pyxen-guest: no console ring, staying on console_io\n");
        return;
    }
    /* The ring page is one of our own frames inside the boot mapping. */
    pfn = mfn_to_pfn(mfn);
    if (pfn >= start_info->nr_pages || pfn_to_mfn(pfn) != mfn) {
        early_printk("pyxen-guest: console mfn %lx has bad m2p entry %lx\n", mfn, pfn);
        return;
    }
    cons_port = start_info->console.domU.evtchn;
    ring = pfn_to_virt(pfn);
    bind_evtchn(cons_port, console_event, NULL);
}

static inline XENCONS_RING_IDX out_space(void)
{
    XENCONS_RING_IDX cons = READ_ONCE(ring->out_cons);
    XENCONS_RING_IDX prod = READ_ONCE(ring->out_prod);
    return XENCONS_OUT_SIZE - (prod - cons);
}

/* Copy as much as fits; events masked so nested writers can't interleave
 * inside a chunk.  Returns bytes written. */
static size_t ring_put(const char *buf, size_t len)
{
    unsigned long flags = irq_save();
    XENCONS_RING_IDX cons, prod;
    size_t n = 0;

    cons = READ_ONCE(ring->out_cons);
    prod = READ_ONCE(ring->out_prod);
    mb();       /* see the consumer index before reusing its slots */
    if (prod - cons > XENCONS_OUT_SIZE) {
        /* Corrupt indices from the backend: resynchronise, don't overrun. */
        cons = prod - XENCONS_OUT_SIZE;
    }
    while (n < len && prod - cons < XENCONS_OUT_SIZE)
        ring->out[prod++ & (XENCONS_OUT_SIZE - 1)] = buf[n++];
    wmb();      /* data visible before the new producer index */
    WRITE_ONCE(ring->out_prod, prod);
    irq_restore(flags);
    return n;
}

/* Give the backend time to drain: block for an event or a short timeout. */
static void wait_for_backend(void)
{
    hv_wait(monotonic_ns() + NSEC_PER_MSEC);
}

void console_write(const char *buf, size_t len)
{
    uint64_t give_up = 0;

    if (!ring) {
        console_io_write(buf, len);
        return;
    }
    while (len) {
        size_t n = ring_put(buf, len);
        buf += n;
        len -= n;
        notify_remote_via_evtchn(cons_port);
        if (!len)
            break;
        /* Ring full.  Never hang the kernel on a dead backend: after 2 s
         * of no progress, drop the rest of this message. */
        if (n)
            give_up = 0;
        if (!give_up)
            give_up = monotonic_ns() + 2 * NSEC_PER_SEC;
        else if (monotonic_ns() > give_up)
            return;
        wait_for_backend();
    }
}

int console_flush(uint64_t timeout_ns)
{
    uint64_t deadline;

    if (!ring)
        return 1;
    deadline = monotonic_ns() + timeout_ns;
    while (out_space() != XENCONS_OUT_SIZE) {
        if (monotonic_ns() >= deadline)
            return 0;
        notify_remote_via_evtchn(cons_port);
        wait_for_backend();
    }
    return 1;
}
