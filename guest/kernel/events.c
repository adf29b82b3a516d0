/*
 * events.c - 2-level event channels and the upcall dispatcher.
 *
 * Xen marks port P pending by setting bit P in evtchn_pending[], and, if
 * the port is not masked, the corresponding word bit in the vCPU's
 * evtchn_pending_sel and evtchn_upcall_pending = 1, then (if
 * evtchn_upcall_mask == 0) enters our event callback.
 */
#include "events.h"
#include "hypercall.h"
#include "traps.h"

union shared_info_page shared_info_page __aligned(PAGE_SIZE) __section(".bss.page_aligned");
struct vcpu_info *vcpu_info_ptr = &shared_info_page.s.vcpu_info[0];

/* Handlers for the ports we can dispatch; higher ports are masked. */
#define MAX_BOUND_PORTS 1024

static struct {
    evtchn_handler_t fn;
    void *data;
} handlers[MAX_BOUND_PORTS];

static inline void sync_set_bit(unsigned long nr, volatile unsigned long *addr)
{
    asm volatile("lock btsq %1, %0" : "+m"(*addr) : "Ir"(nr) : "memory");
}

static inline void sync_clear_bit(unsigned long nr, volatile unsigned long *addr)
{
    asm volatile("lock btrq %1, %0" : "+m"(*addr) : "Ir"(nr) : "memory");
}

static inline int test_bit(unsigned long nr, const volatile unsigned long *addr)
{
    return (READ_ONCE(addr[nr / 64]) >> (nr % 64)) & 1;
}

static inline volatile unsigned long *word_of(volatile unsigned long *base, evtchn_port_t port)
{
    return &base[port / EVTCHN_WORD_BITS];
}

void mask_evtchn(evtchn_port_t port)
{
    sync_set_bit(port % EVTCHN_WORD_BITS,
                 word_of(HYPERVISOR_shared_info->evtchn_mask, port));
}

void clear_evtchn(evtchn_port_t port)
{
    sync_clear_bit(port % EVTCHN_WORD_BITS,
                   word_of(HYPERVISOR_shared_info->evtchn_pending, port));
}

void unmask_evtchn(evtchn_port_t port)
{
    /*
     * Let the hypervisor clear the mask bit: if the port became pending while
     * masked, EVTCHNOP_unmask raises the upcall that was held back.  (Xen only
     * does so when it is the one clearing the bit, so clearing it here first
     * would lose the event.)
     */
    struct evtchn_unmask op = { .port = port };
    HYPERVISOR_event_channel_op(EVTCHNOP_unmask, &op);
}

long notify_remote_via_evtchn(evtchn_port_t port)
{
    struct evtchn_send op = { .port = port };
    return HYPERVISOR_event_channel_op(EVTCHNOP_send, &op);
}

int bind_evtchn(evtchn_port_t port, evtchn_handler_t h, void *data)
{
    unsigned long flags;

    if (port >= MAX_BOUND_PORTS)
        return -XEN_EINVAL;
    flags = irq_save();
    handlers[port].fn = h;
    handlers[port].data = data;
    irq_restore(flags);
    unmask_evtchn(port);
    return 0;
}

int bind_virq(uint32_t virq, evtchn_handler_t h, void *data)
{
    struct evtchn_bind_virq op = { .virq = virq, .vcpu = 0 };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_virq, &op);
    if (rc < 0)
        return (int)rc;
    rc = bind_evtchn(op.port, h, data);
    if (rc < 0)
        return (int)rc;
    return (int)op.port;
}

void unbind_evtchn(evtchn_port_t port)
{
    (void)close_evtchn(port);
}

int evtchn_alloc_unbound(domid_t remote_dom, evtchn_handler_t h, void *data)
{
    struct evtchn_alloc_unbound op = { .dom = DOMID_SELF, .remote_dom = remote_dom };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_alloc_unbound, &op);

    if (rc < 0)
        return (int)rc;
    rc = bind_evtchn(op.port, h, data);
    if (rc < 0) {
        close_evtchn(op.port);
        return (int)rc;
    }
    return (int)op.port;
}

int evtchn_bind_interdomain(domid_t remote_dom, evtchn_port_t remote_port,
                            evtchn_handler_t h, void *data)
{
    struct evtchn_bind_interdomain op = {
        .remote_dom = remote_dom, .remote_port = remote_port,
    };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_interdomain, &op);

    if (rc < 0)
        return (int)rc;
    rc = bind_evtchn(op.local_port, h, data);
    if (rc < 0) {
        close_evtchn(op.local_port);
        return (int)rc;
    }
    return (int)op.local_port;
}

long close_evtchn(evtchn_port_t port)
{
    struct evtchn_close op = { .port = port };

    mask_evtchn(port);
    if (port < MAX_BOUND_PORTS) {
        unsigned long flags = irq_save();
        handlers[port].fn = NULL;
        handlers[port].data = NULL;
        irq_restore(flags);
    }
    return HYPERVISOR_event_channel_op(EVTCHNOP_close, &op);
}

/*
 * Start with every port masked and only unmask ports we bind (the same
 * thing Linux does), so a stray pending port can't cause upcall storms.
 */
void events_init(void)
{
    struct shared_info *s = HYPERVISOR_shared_info;
    for (unsigned i = 0; i < EVTCHN_WORD_BITS; i++)
        WRITE_ONCE(s->evtchn_mask[i], ~0UL);
}

/* After a restore every channel is closed: forget the handlers, mask all. */
void events_resume(void)
{
    for (unsigned i = 0; i < MAX_BOUND_PORTS; i++) {
        handlers[i].fn = NULL;
        handlers[i].data = NULL;
    }
    events_init();
}

static void dispatch(evtchn_port_t port, struct pt_regs *regs)
{
    if (port < MAX_BOUND_PORTS && handlers[port].fn) {
        handlers[port].fn(port, regs, handlers[port].data);
    } else {
        /* Nobody wants it: mask so it can't keep firing. */
        mask_evtchn(port);
        printk("events: unexpected event on port %u, masked\n", port);
    }
}

/*
 * The event callback's C half (entry.S:hypervisor_callback), also called
 * directly with events masked by irq_deliver_pending().
 *
 * Clear evtchn_upcall_pending *before* scanning so an event arriving
 * during the scan re-sets it and we go round again instead of losing it.
 */
void evtchn_do_upcall(struct pt_regs *regs)
{
    struct shared_info *s = HYPERVISOR_shared_info;
    struct vcpu_info *v = this_vcpu();

    do {
        unsigned long sel;

        WRITE_ONCE(v->evtchn_upcall_pending, 0);
        barrier();
        sel = __atomic_exchange_n(&v->evtchn_pending_sel, 0UL, __ATOMIC_SEQ_CST);

        while (sel) {
            unsigned int w = (unsigned int)__builtin_ctzl(sel);
            unsigned long pend;

            sel &= sel - 1;
            pend = READ_ONCE(s->evtchn_pending[w]) & ~READ_ONCE(s->evtchn_mask[w]);
            while (pend) {
                unsigned int b = (unsigned int)__builtin_ctzl(pend);
                evtchn_port_t port = w * EVTCHN_WORD_BITS + b;

                pend &= pend - 1;
                /* Clear first: a new event during the handler re-pends it. */
                sync_clear_bit(b, &s->evtchn_pending[w]);
                dispatch(port, regs);
            }
        }
    } while (READ_ONCE(v->evtchn_upcall_pending));
}

/*
 * Called by irq_restore() when it re-enabled events and found an upcall
 * pending: the hypervisor won't start one on its own until it next gets
 * control, so run the dispatcher right here with events masked again.
 */
void irq_deliver_pending(void)
{
    struct vcpu_info *v = this_vcpu();

    while (READ_ONCE(v->evtchn_upcall_pending)) {
        WRITE_ONCE(v->evtchn_upcall_mask, 1);
        barrier();
        evtchn_do_upcall(NULL);
        barrier();
        WRITE_ONCE(v->evtchn_upcall_mask, 0);
        barrier();
    }
}
