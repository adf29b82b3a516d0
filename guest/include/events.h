/*
 * events.h - shared_info, event channels and the virtual "interrupt flag".
 *
 * A PV guest can't cli/sti.  Instead vcpu_info.evtchn_upcall_mask is the
 * interrupt-disable flag: while it is non-zero the hypervisor won't start
 * an event upcall.  Re-enabling must then check evtchn_upcall_pending,
 * because an event that arrived while masked raised no upcall.
 */
#ifndef PYXEN_EVENTS_H
#define PYXEN_EVENTS_H

#include "kernel.h"

#include "traps.h"

/*
 * A page-aligned page inside our own image (.bss) whose mapping we replace
 * with the hypervisor's shared_info frame at boot.  Declared as a page-sized
 * object so every access is a plain absolute address.
 */
union shared_info_page {
    struct shared_info s;
    char pad[PAGE_SIZE];
};
extern union shared_info_page shared_info_page;
#define HYPERVISOR_shared_info (&shared_info_page.s)

/* vCPU 0's vcpu_info: in shared_info, unless moved with
 * VCPUOP_register_vcpu_info (the mover updates this with events masked). */
extern struct vcpu_info *vcpu_info_ptr;

static inline struct vcpu_info *this_vcpu(void)
{
    return vcpu_info_ptr;
}

/* Run the event dispatch loop synchronously (events must be masked). */
void evtchn_do_upcall(struct pt_regs *regs);

/* Mask events; returns the previous mask so it can be restored. */
static inline unsigned long irq_save(void)
{
    struct vcpu_info *v = this_vcpu();
    unsigned long old = READ_ONCE(v->evtchn_upcall_mask);
    WRITE_ONCE(v->evtchn_upcall_mask, 1);
    barrier();
    return old;
}

void irq_deliver_pending(void);

static inline void irq_restore(unsigned long flags)
{
    struct vcpu_info *v = this_vcpu();
    barrier();
    WRITE_ONCE(v->evtchn_upcall_mask, (uint8_t)flags);
    barrier();
    /* Events that arrived while masked did not cause an upcall. */
    if (!flags && READ_ONCE(v->evtchn_upcall_pending))
        irq_deliver_pending();
}

static inline void irq_disable(void) { (void)irq_save(); }
static inline void irq_enable(void)  { irq_restore(0); }
static inline int irqs_disabled(void)
{
    return READ_ONCE(this_vcpu()->evtchn_upcall_mask) != 0;
}

typedef void (*evtchn_handler_t)(evtchn_port_t port, struct pt_regs *regs, void *data);

void events_resume(void);           /* restored: all channels closed */
void events_init(void);             /* mask every port, clear handlers */
int  bind_evtchn(evtchn_port_t port, evtchn_handler_t h, void *data); /* and unmask */
int  bind_virq(uint32_t virq, evtchn_handler_t h, void *data);       /* -> port or -errno */
void unbind_evtchn(evtchn_port_t port);                               /* mask + close */
void mask_evtchn(evtchn_port_t port);
void unmask_evtchn(evtchn_port_t port);
void clear_evtchn(evtchn_port_t port);
long notify_remote_via_evtchn(evtchn_port_t port);   /* EVTCHNOP_send */

/*
 * Interdomain channels (event_channel.h).  Each returns the local port
 * (>= 0) with handler h installed and the port unmasked, or -errno.
 *   evtchn_alloc_unbound:    a new port that remote_dom may bind to
 *   evtchn_bind_interdomain: connect to remote_dom's unbound port
 *                            remote_port (Xen marks the new local port
 *                            pending once, so h sees one early event)
 * Sending is notify_remote_via_evtchn(); close_evtchn() masks the port,
 * drops its handler and returns EVTCHNOP_close's result (the peer's end
 * goes back to "unbound", as in Xen).
 */
struct evtchn_bind_interdomain {
    domid_t remote_dom;
    evtchn_port_t remote_port;
    evtchn_port_t local_port;     /* OUT */
};
_Static_assert(sizeof(struct evtchn_bind_interdomain) == 12, "evtchn_bind_interdomain size");
_Static_assert(offsetof(struct evtchn_bind_interdomain, remote_port) == 4,
               "evtchn_bind_interdomain.remote_port offset");
_Static_assert(offsetof(struct evtchn_bind_interdomain, local_port) == 8,
               "evtchn_bind_interdomain.local_port offset");
_Static_assert(offsetof(struct evtchn_alloc_unbound, port) == 4,
               "evtchn_alloc_unbound.port offset");

int  evtchn_alloc_unbound(domid_t remote_dom, evtchn_handler_t h, void *data);
int  evtchn_bind_interdomain(domid_t remote_dom, evtchn_port_t remote_port,
                             evtchn_handler_t h, void *data);
long close_evtchn(evtchn_port_t port);

#endif /* PYXEN_EVENTS_H */
