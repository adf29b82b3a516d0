/*
 * time.c - system time and wallclock from shared_info, VIRQ_TIMER.
 *
 * The hypervisor publishes, per vCPU, a (tsc_timestamp, system_time)
 * pair plus a TSC->ns scale.  Between updates we extrapolate with rdtsc
 * (legal at CPL3).  Both records are protected by a version counter that
 * is odd while an update is in progress, seqlock style.
 */
#include "xtime.h"
#include "events.h"
#include "hypercall.h"
#include "sched.h"

/* (delta << shift) * mul >> 32, with a 128-bit product so nothing overflows. */
static inline uint64_t scale_delta(uint64_t delta, uint32_t mul, int8_t shift)
{
    if (shift >= 0)
        delta <<= shift;
    else
        delta >>= -shift;
    return (uint64_t)(((unsigned __int128)delta * mul) >> 32);
}

uint64_t monotonic_ns(void)
{
    const struct vcpu_time_info *t = &this_vcpu()->time;
    uint32_t ver, mul;
    uint64_t tsc_ts, sys, tsc;
    int8_t shift;

    do {
        ver = READ_ONCE(t->version);
        rmb();
        tsc_ts = READ_ONCE(t->tsc_timestamp);
        sys = READ_ONCE(t->system_time);
        mul = READ_ONCE(t->tsc_to_system_mul);
        shift = READ_ONCE(t->tsc_shift);
        tsc = rdtsc();
        rmb();
    } while ((ver & 1) || ver != READ_ONCE(t->version));

    /* A TSC slightly behind the stamp (e.g. after a vCPU move) counts as 0. */
    if ((int64_t)(tsc - tsc_ts) <= 0)
        return sys;
    return sys + scale_delta(tsc - tsc_ts, mul, shift);
}

void wallclock_base(uint64_t *sec, uint32_t *nsec)
{
    const struct shared_info *s = HYPERVISOR_shared_info;
    uint32_t ver;

    do {
        ver = READ_ONCE(s->wc_version);
        rmb();
        *sec = ((uint64_t)READ_ONCE(s->wc_sec_hi) << 32) | READ_ONCE(s->wc_sec);
        *nsec = READ_ONCE(s->wc_nsec);
        rmb();
    } while ((ver & 1) || ver != READ_ONCE(s->wc_version));
}

void wallclock(uint64_t *sec, uint32_t *nsec)
{
    uint64_t bsec, ns;
    uint32_t bnsec;

    wallclock_base(&bsec, &bnsec);
    ns = monotonic_ns() + bnsec;
    *sec = bsec + ns / NSEC_PER_SEC;
    *nsec = (uint32_t)(ns % NSEC_PER_SEC);
}

static void timer_handler(evtchn_port_t port, struct pt_regs *regs, void *data)
{
    (void)port; (void)regs; (void)data;
    sched_timer_event();
}

void time_init(void)
{
    int port;

    /*
     * Xen gives PV vCPUs a 100 Hz periodic VIRQ_TIMER by default; we use
     * only the one-shot timer, so switch the periodic one off (errors are
     * harmless: it just means there was none).
     */
    HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL);

    port = bind_virq(VIRQ_TIMER, timer_handler, NULL);
    if (port < 0)
        panic("time: bind_virq(VIRQ_TIMER) failed: %d\n", port);
    printk("pyxen-guest: timer virq on port %d\n", port);
}

/* A restored domain: VIRQ_TIMER is unbound and no timer is armed. */
void time_resume(void)
{
    int port = bind_virq(VIRQ_TIMER, timer_handler, NULL);

    if (port < 0)
        panic("time: bind_virq(VIRQ_TIMER) after resume failed: %d\n", port);
    sched_timer_resume();
}
