/*
 * hcfuzz: a hostile guest.  Calls every hypercall number 0..63 with garbage
 * (unmapped, hypervisor-range, non-canonical and NULL pointers, huge counts,
 * bad sub-ops, a valid buffer full of random bytes) and checks that a few
 * specific malicious requests get Xen's error codes.  The hypervisor must
 * neither crash nor hang, and must not let us touch anything we don't own.
 *
 * cmdline: seed=S (xorshift seed, default 1), n=K (calls per hypercall,
 * default 48).  grants=1 [ops=N peer=P bystander=B] fuzzes grant_table_op
 * instead, and role=partner is the domain that grants it frames (see
 * "grant-table fuzzing" below and docs/guest.md).
 *
 * Output (exact formats):
 *   hcfuzz: seed=S n=K
 *   hcfuzz: check <name> rc=<rc> OK|FAIL [(expected <e>)]
 *   hcfuzz: hc=<nr> calls=<k> errors=<e> first_rc=<rc>      (one per nr 0..63;
 *           hc=23, iret, is skipped with calls=0 and a "(skipped: iret)" tail)
 *   hcfuzz: survived
 * then poweroff.
 *
 * Rules that keep the fuzzer from shooting itself (not the hypervisor):
 *  - everything runs with events masked, and after each hypercall's batch
 *    all state we could have changed is put back (trap table, callbacks,
 *    kernel stack, TS, segment bases, vm_assist, timers, LDT, the scratch
 *    and buffer mappings, event channels we opened);
 *  - requests that name machine frames use frames we do not own, except
 *    for one scratch PTE we restore afterwards;
 *  - sched_op / sched_op_compat get only SCHEDOP_yield or sub-ops >= 7
 *    (shutdown/block would end or stall the run); vcpu_op never downs us;
 *  - pointers handed to the hypervisor for writing are either garbage or
 *    our own scratch buffer, never live kernel data.
 */
#include "app.h"
#include "gnttab.h"
#include "xenbus.h"

const char app_name[] = "hcfuzz";

extern char hypervisor_callback[], failsafe_callback[], boot_stack_top[];

/* ------------------------------------------------------------ numbers */

#define HC_set_trap_table           0
#define HC_mmu_update               1
#define HC_set_gdt                  2
#define HC_stack_switch             3
#define HC_set_callbacks            4
#define HC_fpu_taskswitch           5
#define HC_sched_op_compat          6
#define HC_set_debugreg             8
#define HC_update_descriptor       10
#define HC_memory_op               12
#define HC_multicall               13
#define HC_update_va_mapping       14
#define HC_set_timer_op            15
#define HC_event_channel_op_compat 16
#define HC_xen_version             17
#define HC_console_io              18
#define HC_vm_assist               21
#define HC_update_va_mapping_otherdomain 22
#define HC_iret                    23
#define HC_vcpu_op                 24
#define HC_set_segment_base        25
#define HC_mmuext_op               26
#define HC_sched_op                29
#define HC_callback_op             30
#define HC_event_channel_op        32

#define E_PERM     1
#define E_NOENT    2
#define E_FAULT   14
#define E_INVAL   22
#define E_NOSYS   38

#define MMU_PT_UPDATE_NO_TRANSLATE 3
#define MMUEXT_NEW_USER_BASEPTR   15
#define MMUEXT_SET_LDT            13
#define EVTCHNOP_bind_vcpu         8
#define EVTCHNOP_reset            10
#define EVTCHNOP_init_control     11
#define EVTCHNOP_reset_cont       14
#define VCPUOP_initialise          0
#define VCPUOP_down                2
#define VCPUOP_is_up               3
#define VCPUOP_register_runstate_memory_area 5
#define VCPUOP_register_vcpu_info 10
#define VCPUOP_send_nmi           11
#define VCPUOP_register_vcpu_time_memory_area 13
#define XENVER_extraversion_      1
#define SCHEDOP_pin_override       7
#define VIRQ_DEBUG_                1
#define VMASST_TYPE_m2p_strict    32
#define DOMID_IO              0x7FF1U
#define DOMID_XEN             0x7FF2U

#define HV_VA        0xffff820000000000UL
#define NONCANON_VA  0x0000800000000000UL

/* ------------------------------------------------------------ raw calls */

/* Any hypercall slot by number (the wrappers need a constant number). */
static long hc_raw(unsigned int nr, unsigned long a1, unsigned long a2, unsigned long a3,
                   unsigned long a4, unsigned long a5)
{
    register unsigned long res asm("rax");
    register unsigned long r1 asm("rdi") = a1;
    register unsigned long r2 asm("rsi") = a2;
    register unsigned long r3 asm("rdx") = a3;
    register unsigned long r4 asm("r10") = a4;
    register unsigned long r5 asm("r8") = a5;
    unsigned long target = (unsigned long)hypercall_page + (unsigned long)nr * HYPERCALL_SLOT_SIZE;

    asm volatile("call *%[t]"
                 : "=r"(res), "+r"(r1), "+r"(r2), "+r"(r3), "+r"(r4), "+r"(r5)
                 : [t] "r"(target)
                 : "memory", "rcx", "r11");
    return (long)res;
}

/* ------------------------------------------------------------ PRNG */

static uint64_t rng;

static uint64_t rnd(void)
{
    /* xorshift64* */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 2685821657736338717ULL;
}

static unsigned long pick(const unsigned long *v, size_t n)
{
    return v[rnd() % n];
}
#define PICK(...) ({ static const unsigned long _v[] = { __VA_ARGS__ }; pick(_v, ARRAY_SIZE(_v)); })

/* ------------------------------------------------------------ our memory */

static unsigned long fuzzbuf;          /* one RW page whose contents are random */
static unsigned long guard;            /* the page after it, unmapped */
static uint64_t fuzzbuf_pte, fuzzbuf_pte_ma, guard_pte;
static unsigned long scratch;          /* a page whose PTE the fuzzer may rewrite */
static uint64_t scratch_pte, scratch_pte_ma;
static unsigned long min_mfn = ~0UL, max_mfn, si_mfn, l4_mfn;
static unsigned long l1_mfn;           /* the L1 table frame mapping `scratch` */

/* Conservative: anything between our lowest and highest frame counts as ours,
 * and so do the Xen-heap frames after shared_info, which include our grant
 * table once the kernel has set it up (GNTTABOP_setup_table). */
#define XENHEAP_SPAN 64
static int maybe_owned(unsigned long mfn)
{
    return (mfn >= min_mfn && mfn <= max_mfn) || (mfn >= si_mfn && mfn < si_mfn + XENHEAP_SPAN);
}

static unsigned long foreign_mfn(void)
{
    unsigned long m;

    for (;;) {
        switch (rnd() % 6) {
        case 0: m = min_mfn - 1 - rnd() % 16; break;           /* just below our RAM */
        case 1: m = max_mfn + 1 + rnd() % 64; break;           /* just above (xenheap) */
        case 2: m = si_mfn + XENHEAP_SPAN + rnd() % 64; break;  /* past the Xen heap */
        case 3: m = rnd() % 0x100000; break;                   /* low machine memory */
        case 4: m = rnd() & 0xFFFFFFFFFUL; break;              /* 36-bit */
        default: m = rnd() >> 12; break;                       /* anything */
        }
        if (!maybe_owned(m))
            return m;
    }
}

static uint64_t foreign_maddr(void)
{
    return (foreign_mfn() << PAGE_SHIFT) | (rnd() & 0xFF8) | (rnd() & 7);
}

/* Pointers the hypervisor cannot read or write (or only partly). */
static unsigned long bad_ptr(void)
{
    switch (rnd() % 14) {
    case 0:  return 0;
    case 1:  return 0xdead0000UL;
    case 2:  return HV_VA + (rnd() & 0xFFFF8);
    case 3:  return NONCANON_VA;
    case 4:  return 0xffff800000000000UL;     /* Xen's reserved slot 256 */
    case 5:  return 0xffff830000000000UL;     /* pyxen's direct map */
    case 6:  return 0x00007ffffffff000UL;
    case 7:  return 0xfffffffffffff000UL;
    case 8:  return 0x7fffffffUL;
    case 9:  return 0xffffffffUL;
    case 10: return guard + (rnd() & 0xFF8);
    case 11: return guard - 8;                /* straddles into the guard page */
    case 12: return 0x8000000000000000UL;
    default: return rnd();
    }
}

/* A pointer for a sanitised structure: usually our random buffer. */
static unsigned long dptr(void)
{
    return rnd() % 3 ? fuzzbuf : bad_ptr();
}

static unsigned long garbage(void)
{
    switch (rnd() % 12) {
    case 0:  return 0;
    case 1:  return 1;
    case 2:  return rnd() % 64;
    case 3:  return 0x7fffffffUL;
    case 4:  return 0xffffffffUL;
    case 5:  return ~0UL;
    case 6:  return 0x8000000000000000UL;
    case 7:  return DOMID_SELF;
    case 8:  return fuzzbuf;
    case 9:  return start_info->pt_base;      /* readable, not writable */
    case 10: return bad_ptr();
    default: return rnd();
    }
}

static void fill_random(void)
{
    uint64_t *p = (uint64_t *)fuzzbuf;

    for (unsigned i = 0; i < PAGE_SIZE / 8; i++)
        p[i] = rnd();
}

static int setup_memory(void)
{
    const uint64_t *pte;
    void *two = alloc_pages(2);
    void *one = alloc_page();

    if (!two || !one)
        return -1;
    for (unsigned long pfn = 0; pfn < nr_pages; pfn++) {
        unsigned long m = pfn_to_mfn(pfn);
        if (m < min_mfn)
            min_mfn = m;
        if (m > max_mfn)
            max_mfn = m;
    }
    si_mfn = start_info->shared_info >> PAGE_SHIFT;
    l4_mfn = virt_to_mfn((void *)start_info->pt_base);

    fuzzbuf = (unsigned long)two;
    guard = fuzzbuf + PAGE_SIZE;
    scratch = (unsigned long)one;
    if (!(pte = mm_lookup_pte(fuzzbuf, &fuzzbuf_pte_ma)))
        return -1;
    fuzzbuf_pte = *pte;
    if (!(pte = mm_lookup_pte(scratch, &scratch_pte_ma)))
        return -1;
    scratch_pte = *pte;
    l1_mfn = scratch_pte_ma >> PAGE_SHIFT;
    guard_pte = 0;
    if (HYPERVISOR_update_va_mapping(guard, 0, UVMF_INVLPG))
        return -1;
    return 0;
}

/* ------------------------------------------------------------ restore */

static int restore_failures;

static void restore_check(const char *what, long rc)
{
    if (rc && restore_failures++ < 20)
        printk("hcfuzz: restore %s failed rc=%ld\n", what, rc);
}

static void restore_callbacks(void)
{
    struct callback_register ev = {
        .type = CALLBACKTYPE_event, .flags = CALLBACKF_mask_events,
        .address = (unsigned long)hypervisor_callback,
    };
    struct callback_register fs = {
        .type = CALLBACKTYPE_failsafe, .flags = CALLBACKF_mask_events,
        .address = (unsigned long)failsafe_callback,
    };

    restore_check("event callback", HYPERVISOR_callback_op(CALLBACKOP_register, &ev));
    restore_check("failsafe callback", HYPERVISOR_callback_op(CALLBACKOP_register, &fs));
}

static void restore_mappings(void)
{
    restore_check("buffer mapping",
                  HYPERVISOR_update_va_mapping(fuzzbuf, fuzzbuf_pte, UVMF_INVLPG));
    restore_check("guard unmapping", HYPERVISOR_update_va_mapping(guard, guard_pte, UVMF_INVLPG));
    restore_check("scratch mapping",
                  HYPERVISOR_update_va_mapping(scratch, scratch_pte, UVMF_INVLPG));
}

static void restore_all(void)
{
    static const unsigned int assists[] = { 0, 1, 3, 4, 5, VMASST_TYPE_m2p_strict };
    struct mmuext_op ldt = { .cmd = MMUEXT_SET_LDT };

    /* NULL clears every vector (Xen), then our real table goes back in. */
    HYPERVISOR_set_trap_table(NULL);
    trap_init();
    restore_callbacks();
    restore_check("stack_switch",
                  HYPERVISOR_stack_switch(FLAT_KERNEL_SS, (unsigned long)boot_stack_top));
    restore_check("fpu_taskswitch", HYPERVISOR_fpu_taskswitch(0));
    for (int which = 0; which < 4; which++)
        HYPERVISOR_set_segment_base(which, 0);
    for (unsigned i = 0; i < ARRAY_SIZE(assists); i++)
        HYPERVISOR_vm_assist(VMASST_CMD_disable, assists[i]);
    hc_raw(HC_set_debugreg, 7, 0, 0, 0, 0);
    for (unsigned long dr = 0; dr < 4; dr++)
        hc_raw(HC_set_debugreg, dr, 0, 0, 0, 0);
    HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL);
    HYPERVISOR_mmuext_op(&ldt, 1, NULL, DOMID_SELF);
    restore_mappings();
    /* Our idle loop thinks some deadline is armed: fire the timer soon so
     * it forgets (sched_timer_event clears it) and re-arms for real. */
    HYPERVISOR_set_timer_op(monotonic_ns() + NSEC_PER_MSEC);
}

/* ------------------------------------------------------------ event channels */

#define MAX_PORT 1024
static uint8_t kernel_port[MAX_PORT];  /* bound before we started: never touch */

static long evtchn_status(uint32_t port, uint32_t *status)
{
    struct { domid_t dom; uint16_t pad; uint32_t port; uint32_t status, vcpu; uint64_t u; } st;
    long rc;

    memset(&st, 0, sizeof(st));
    st.dom = DOMID_SELF;
    st.port = port;
    rc = HYPERVISOR_event_channel_op(EVTCHNOP_status, &st);
    *status = st.status;
    return rc;
}

static void record_kernel_ports(void)
{
    for (uint32_t p = 1; p < MAX_PORT; p++) {
        uint32_t s = 0;
        if (evtchn_status(p, &s) == 0 && s != 0)
            kernel_port[p] = 1;
    }
}

/* Close everything the fuzzer opened; clear stray pending bits. */
static void close_fuzz_ports(void)
{
    struct shared_info *s = HYPERVISOR_shared_info;

    for (uint32_t p = 1; p < MAX_PORT; p++) {
        uint32_t st = 0;
        if (kernel_port[p])
            continue;
        if (evtchn_status(p, &st) == 0 && st != 0) {
            struct evtchn_close c = { .port = p };
            HYPERVISOR_event_channel_op(EVTCHNOP_close, &c);
        }
        /* keep it masked, drop anything pending on it */
        __atomic_or_fetch(&s->evtchn_mask[p / 64], 1UL << (p % 64), __ATOMIC_SEQ_CST);
        __atomic_and_fetch(&s->evtchn_pending[p / 64], ~(1UL << (p % 64)), __ATOMIC_SEQ_CST);
    }
}

static uint32_t fuzz_port(void)
{
    uint32_t p;

    switch (rnd() % 7) {
    case 0:  p = rnd() % 64; break;
    case 1:  p = rnd() % MAX_PORT; break;
    case 2:  p = 0; break;
    case 3:  p = (uint32_t)PICK(4095, 4096, 0x7fffffff, 0xffffffff, 1023); break;
    default: p = (uint32_t)rnd(); break;
    }
    if (p < MAX_PORT && kernel_port[p])
        p = 0x7fffffff;
    return p;
}

/*
 * Fill an event_channel_op argument for `cmd` at `buf` (random first) with
 * fields that never hit the kernel's own ports.  Returns 0 if this cmd must
 * only get an unreadable pointer (reset would close our ports).
 */
static int evtchn_sanitise(uint32_t cmd, unsigned long buf)
{
    uint32_t *w = (uint32_t *)buf;
    uint16_t *h = (uint16_t *)buf;

    switch (cmd) {
    case EVTCHNOP_bind_interdomain:            /* remote_dom, remote_port */
        h[0] = rnd() % 2 ? DOMID_SELF : (uint16_t)rnd();
        w[1] = fuzz_port();
        break;
    case EVTCHNOP_bind_virq:                   /* virq, vcpu */
        w[0] = rnd() % 2 ? rnd() % 32 : (uint32_t)rnd();
        w[1] = rnd() % 2 ? 0 : (uint32_t)rnd();
        break;
    case EVTCHNOP_close:
    case EVTCHNOP_send:
    case EVTCHNOP_unmask:
    case 13:                                   /* set_priority: port, priority */
        w[0] = fuzz_port();
        break;
    case EVTCHNOP_status:                      /* dom, port */
        h[0] = rnd() % 2 ? DOMID_SELF : (uint16_t)rnd();
        w[1] = fuzz_port();
        break;
    case EVTCHNOP_alloc_unbound:               /* dom, remote_dom */
        h[0] = rnd() % 2 ? DOMID_SELF : (uint16_t)rnd();
        break;
    case EVTCHNOP_bind_ipi:
        w[0] = rnd() % 2 ? 0 : (uint32_t)rnd();
        break;
    case EVTCHNOP_bind_vcpu:                   /* port, vcpu */
        w[0] = fuzz_port();
        break;
    case EVTCHNOP_init_control:                /* control_gfn: never one of ours */
    case 12:                                   /* expand_array: array_gfn */
        *(uint64_t *)buf = foreign_mfn();
        break;
    case EVTCHNOP_reset:
    case EVTCHNOP_reset_cont:
        return 0;
    }
    return 1;
}

/* ------------------------------------------------------------ accounting */

struct hc_stat {
    unsigned long calls, errors;
    long first_rc;
};
static struct hc_stat st;

static long fz(unsigned int nr, unsigned long a1, unsigned long a2, unsigned long a3,
               unsigned long a4, unsigned long a5)
{
    long rc = hc_raw(nr, a1, a2, a3, a4, a5);

    if (!st.calls)
        st.first_rc = rc;
    st.calls++;
    if (rc < 0)
        st.errors++;
    return rc;
}

/* ------------------------------------------------------------ per-hypercall fuzzers */

static void fuzz_generic(unsigned int nr, unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        fill_random();
        fz(nr, garbage(), garbage(), garbage(), garbage(), garbage());
    }
}

static void fuzz_set_trap_table(unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        fill_random();
        /* garbage pointers, or a table full of random entries */
        fz(HC_set_trap_table, rnd() % 4 ? bad_ptr() : fuzzbuf, garbage(), 0, 0, 0);
        HYPERVISOR_set_trap_table(NULL);
        trap_init();
    }
}

static void fuzz_mmu_update(unsigned long n)
{
    static const unsigned long scratch_cmds[] = { 0, 2, 3, 4, 6, 7 };

    for (unsigned long i = 0; i < n; i++) {
        struct mmu_update *req = (struct mmu_update *)fuzzbuf;
        unsigned long k = 1 + rnd() % 8, count, reqs, done, dom;

        fill_random();
        for (unsigned long j = 0; j < k; j++) {
            unsigned int r = rnd() % 8;
            if (r < 5)
                req[j].ptr = foreign_maddr();
            else if (r < 7)
                req[j].ptr = scratch_pte_ma | pick(scratch_cmds, ARRAY_SIZE(scratch_cmds));
            else
                req[j].ptr = (foreign_mfn() << PAGE_SHIFT) | MMU_MACHPHYS_UPDATE;
            switch (rnd() % 6) {
            case 0:  req[j].val = 0; break;
            case 1:  req[j].val = (foreign_mfn() << PAGE_SHIFT) | (rnd() & 0xFFF); break;
            case 2:  req[j].val = (l4_mfn << PAGE_SHIFT) | PTE_KERNEL_RW; break;   /* PT writable */
            case 3:  req[j].val = (l1_mfn << PAGE_SHIFT) | PTE_KERNEL_RW; break;
            case 4:  req[j].val = scratch_pte | (1UL << 52); break;                 /* reserved bit */
            default: req[j].val = rnd(); break;
            }
        }
        count = rnd() % 4 ? k : PICK(0, 0x7fffffff, 0xffffffff, 0x80000001, 512, 257);
        reqs = rnd() % 5 ? fuzzbuf : bad_ptr();
        done = rnd() % 3 ? 0 : (rnd() % 2 ? fuzzbuf + PAGE_SIZE - 64 : bad_ptr());
        switch (rnd() % 5) {
        case 0:  dom = (uint16_t)rnd(); break;
        case 1:  dom = rnd(); break;
        case 2:  dom = PICK(0, DOMID_IO, DOMID_XEN, 0x7FF3, 0xFFFF); break;
        default: dom = DOMID_SELF; break;
        }
        /* a valid count with a bad pointer for count must fault, not run */
        if (count > 16 && reqs == fuzzbuf && rnd() % 2)
            reqs = bad_ptr();
        fz(HC_mmu_update, reqs, count, done, dom, garbage());
        restore_mappings();
    }
}

static void fuzz_set_gdt(unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        unsigned long *frames = (unsigned long *)fuzzbuf;
        fill_random();
        for (int j = 0; j < 16; j++)
            frames[j] = foreign_mfn();
        fz(HC_set_gdt, dptr(),
           PICK(0, 1, 512, 513, 7168, 7169, 8192, 0xffffffff, 0x100000001UL) ^ (rnd() % 2 ? 0 : rnd() % 7168),
           garbage(), 0, 0);
    }
}

static void fuzz_sched_op(unsigned int nr, unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        unsigned long cmd;
        fill_random();
        switch (rnd() % 5) {
        case 0:  cmd = SCHEDOP_yield; break;
        case 1:  cmd = 7 + rnd() % 8; break;
        case 2:  cmd = PICK(99, 0x7fffffff, 0xffffffff, 0x80000000, 1000); break;
        default: cmd = (rnd() & ~0xffffffffUL) | (7 + rnd() % 0x7ffffff0UL); break;
        }
        fz(nr, cmd, garbage(), garbage(), 0, 0);
    }
}

static void fuzz_update_descriptor(unsigned long n)
{
    for (unsigned long i = 0; i < n; i++)
        fz(HC_update_descriptor, foreign_maddr(), rnd() % 2 ? rnd() : 0, garbage(), 0, 0);
}

static void fuzz_memory_op(unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        unsigned long cmd, arg;
        fill_random();
        cmd = rnd() % 3 ? rnd() % 64 : rnd();
        arg = dptr();
        /* ops that hand memory away or remap frames: only garbage pointers
         * (a Xen would act on a valid buffer) */
        switch (cmd & 0x3f) {
        case 1: case 6: case 7: case 11: case 15: case 23: case 24:
            if (arg == fuzzbuf)
                arg = bad_ptr();
            break;
        }
        if (rnd() % 4 == 0)
            cmd |= (rnd() % 1000) << 6;     /* continuation extent */
        fz(HC_memory_op, cmd, arg, garbage(), 0, 0);
    }
}

static void fuzz_multicall(unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        struct multicall_entry *mc = (struct multicall_entry *)fuzzbuf;
        unsigned long k = 1 + rnd() % 8, cnt, ptr;

        fill_random();
        for (unsigned long j = 0; j < k; j++) {
            unsigned long op = PICK(HC_xen_version, HC_xen_version, 60, 63, 64, 99, 127, 0xdeadbeef,
                                    HC_multicall, HC_iret, HC_sched_op, HC_memory_op,
                                    HC_event_channel_op, HC_vcpu_op, HC_console_io);
            mc[j].op = rnd() % 8 ? op : rnd() | 0x100000000UL;
            for (int a = 0; a < 6; a++)
                mc[j].args[a] = rnd() % 2 ? bad_ptr() : rnd();
            switch (op) {
            case HC_xen_version:
                mc[j].args[0] = rnd() % 12;
                mc[j].args[1] = rnd() % 2 ? fuzzbuf + 2048 : bad_ptr();
                break;
            case HC_sched_op:
                mc[j].args[0] = rnd() % 2 ? SCHEDOP_yield : 7 + rnd() % 100;
                break;
            case HC_memory_op:
                mc[j].args[0] = PICK(XENMEM_current_reservation, XENMEM_maximum_reservation,
                                     XENMEM_machphys_mapping, 60);
                break;
            case HC_event_channel_op:
                mc[j].args[0] = PICK(EVTCHNOP_send, EVTCHNOP_unmask, 99);
                break;
            case HC_vcpu_op:
                mc[j].args[0] = VCPUOP_is_up;
                break;
            case HC_console_io:
                mc[j].args[0] = CONSOLEIO_write;
                mc[j].args[1] = rnd() % 2 ? rnd() : 16;
                mc[j].args[2] = bad_ptr();
                break;
            case HC_multicall:
            case HC_iret:
                break;
            }
        }
        if (rnd() % 4) {
            cnt = rnd() % 2 ? k : PICK(0, 64, 65, 1024, 1025);
            ptr = rnd() % 5 ? fuzzbuf : bad_ptr();
        } else {
            cnt = PICK(0x7fffffff, 0xffffffff, ~0UL, 0x100000001UL);
            ptr = bad_ptr();
        }
        fz(HC_multicall, ptr, cnt, garbage(), 0, 0);
    }
}

static unsigned long uvm_va(void)
{
    switch (rnd() % 8) {
    case 0: case 1: case 2: return scratch;
    case 3: return VIRT_BASE + ((nr_pages + rnd() % 4096) << PAGE_SHIFT);   /* past our RAM */
    case 4: return PICK(HV_VA, NONCANON_VA, 0xffff800000000000UL, 0xffff808000000000UL,
                        0xffff87fffffff000UL, 0xfffffffffffff000UL, 0);
    default: {
        unsigned long p = bad_ptr();
        return p == guard - 8 ? guard : p;
    }
    }
}

static void fuzz_update_va_mapping(unsigned int nr, unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        unsigned long va = uvm_va(), val, flags;
        switch (rnd() % 8) {
        case 0:  val = 0; break;
        case 1:  val = (foreign_mfn() << PAGE_SHIFT) | (rnd() & 0xFFF); break;
        case 2:  val = (l4_mfn << PAGE_SHIFT) | PTE_KERNEL_RW; break;
        case 3:  val = (l4_mfn << PAGE_SHIFT) | PTE_KERNEL_RO; break;
        case 4:  val = scratch_pte | (1UL << (52 + rnd() % 11)); break;
        case 5:  val = scratch_pte | _PAGE_PSE; break;
        default: val = rnd(); break;
        }
        flags = rnd() % 2 ? rnd() % 8 : (rnd() % 2 ? (bad_ptr() & ~7UL) | (1 + rnd() % 2) : rnd());
        if (nr == HC_update_va_mapping_otherdomain)
            fz(nr, va, val, flags, rnd() % 2 ? DOMID_SELF : (uint16_t)rnd(), 0);
        else
            fz(nr, va, val, flags, garbage(), 0);
        restore_mappings();
    }
}

static void fuzz_set_timer_op(unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        uint64_t now = monotonic_ns();
        fz(HC_set_timer_op, PICK(0, 1, 2, 3, 4, 5, 6, 7) == 0 ? 0 :
           (rnd() % 2 ? PICK(1, 0x7fffffffffffffffUL, ~0UL, 0x8000000000000000UL, 0xffffffffUL)
                      : now + (rnd() % 2 ? rnd() % 4000000000UL : rnd())),
           garbage(), 0, 0, 0);
    }
}

static void fuzz_evtchn(unsigned int nr, unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        uint32_t cmd = rnd() % 4 ? rnd() % 16 : (uint32_t)rnd();
        unsigned long arg;

        fill_random();
        if (nr == HC_event_channel_op_compat) {
            /* struct evtchn_op { uint32_t cmd; union {...} u; } with u at +8 */
            *(uint32_t *)fuzzbuf = cmd;
            arg = evtchn_sanitise(cmd, fuzzbuf + 8) ? dptr() : bad_ptr();
            if (arg == fuzzbuf && rnd() % 8 == 0)
                arg = guard - 4;            /* cmd readable, body not */
            fz(nr, arg, garbage(), 0, 0, 0);
        } else {
            arg = evtchn_sanitise(cmd, fuzzbuf) ? dptr() : bad_ptr();
            fz(nr, rnd() % 8 ? cmd : (rnd() & ~0xffffffffUL) | 99, arg, garbage(), 0, 0);
        }
    }
    close_fuzz_ports();
}

static void fuzz_console_io(unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        unsigned long cmd = rnd() % 3 ? rnd() % 3 : rnd(), count, buf;
        char *b = (char *)fuzzbuf;

        fill_random();
        for (int j = 0; j < 32; j++)            /* printable garbage, no newlines */
            b[j] = (char)(0x21 + (unsigned char)b[j] % 0x5e);
        if (cmd == CONSOLEIO_write && rnd() % 2) {
            count = rnd() % 33;
            buf = fuzzbuf;
        } else {
            count = rnd() % 2 ? PICK(0x7fffffff, 0xffffffff, 65536, 65537, 4097, 8192, ~0UL)
                              : rnd() % 4096;
            buf = bad_ptr();
            if (cmd == CONSOLEIO_write && buf == guard - 8 && count > 8)
                count = 8 + rnd() % 64;     /* straddles: must fault, print nothing */
        }
        if (cmd == 1 && rnd() % 2)               /* read into a valid buffer */
            buf = fuzzbuf;
        fz(HC_console_io, cmd, count, buf, garbage(), 0);
    }
    HYPERVISOR_console_io(CONSOLEIO_write, 1, "\n");
}

static void fuzz_vcpu_op(unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        unsigned long cmd = rnd() % 4 ? rnd() % 16 : rnd();
        unsigned long vcpu, arg;

        fill_random();
        switch (rnd() % 5) {
        case 0: case 1: vcpu = 0; break;
        case 2: vcpu = PICK(1, 2, 31, 32, 1000, 0xffffffff, 0x100000001UL); break;
        default: vcpu = rnd(); break;
        }
        arg = dptr();
        if ((uint32_t)vcpu == 0) {
            switch ((uint32_t)cmd) {
            case VCPUOP_down:
                cmd = VCPUOP_is_up;         /* never take ourselves down */
                break;
            case VCPUOP_initialise:
            case VCPUOP_register_runstate_memory_area:
            case VCPUOP_register_vcpu_info:
            case VCPUOP_register_vcpu_time_memory_area:
            case VCPUOP_send_nmi:           /* NULL would really send one */
                do
                    arg = bad_ptr();
                while (!arg);
                break;
            }
        }
        fz(HC_vcpu_op, cmd, vcpu, arg, garbage(), 0);
    }
}

static void fuzz_mmuext_op(unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        struct mmuext_op *op = (struct mmuext_op *)fuzzbuf;
        unsigned long k = 1 + rnd() % 8, count, ptr, done, dom;

        fill_random();
        for (unsigned long j = 0; j < k; j++) {
            unsigned int cmd = rnd() % 8 ? rnd() % 22 : (unsigned int)rnd();
            op[j].cmd = cmd;
            switch (cmd) {
            case MMUEXT_INVLPG_LOCAL: case 9: case 11:      /* linear addresses */
                op[j].arg1.linear_addr = rnd() % 2 ? bad_ptr() : scratch;
                break;
            case MMUEXT_SET_LDT:
                op[j].arg1.linear_addr = garbage();
                break;
            default:                                       /* frames: never ours */
                op[j].arg1.mfn = rnd() % 8 ? foreign_mfn() : 0;
                break;
            }
            switch (cmd) {
            case 8: case 9:                                /* vcpumask pointers */
                op[j].arg2.vcpumask = (const void *)bad_ptr();
                break;
            case 17:                                       /* copy_page: any source */
                op[j].arg2.src_mfn = rnd() % 2 ? foreign_mfn() : l4_mfn;
                break;
            default:
                op[j].arg2.src_mfn = rnd() % 2 ? rnd() % 8192 : rnd();
                break;
            }
        }
        count = rnd() % 4 ? k : PICK(0, 0x7fffffff, 0xffffffff, 0x80000001, 171, 172);
        ptr = rnd() % 5 ? fuzzbuf : bad_ptr();
        if (count > 16 && ptr == fuzzbuf && rnd() % 2)
            ptr = bad_ptr();
        done = rnd() % 3 ? 0 : (rnd() % 2 ? fuzzbuf + PAGE_SIZE - 64 : bad_ptr());
        switch (rnd() % 5) {
        case 0:  dom = (uint16_t)rnd(); break;
        case 1:  dom = rnd(); break;
        case 2:  dom = PICK(0, DOMID_IO, DOMID_XEN, 0x7FF3, 0xFFFF); break;
        default: dom = DOMID_SELF; break;
        }
        fz(HC_mmuext_op, ptr, count, done, dom, garbage());
        restore_mappings();
    }
}

static void fuzz_callback_op(unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        struct callback_register *cb = (struct callback_register *)fuzzbuf;
        fill_random();
        cb->type = rnd() % 2 ? rnd() % 8 : (uint16_t)rnd();
        cb->address = rnd() % 2 ? bad_ptr() : rnd();
        fz(HC_callback_op, rnd() % 4 ? rnd() % 2 : rnd(), dptr(), garbage(), 0, 0);
        restore_callbacks();
    }
}

static void fuzz_stateful(unsigned int nr, unsigned long n)
{
    /* stack_switch, set_callbacks, fpu_taskswitch, vm_assist,
     * set_segment_base, set_debugreg: anything goes, restored afterwards */
    for (unsigned long i = 0; i < n; i++) {
        unsigned long a1 = garbage(), a2 = garbage();
        if (nr == HC_set_segment_base && rnd() % 2)
            a1 = rnd() % 6;
        if (nr == HC_vm_assist && rnd() % 2)
            a2 = rnd() % 64;
        if (nr == HC_set_debugreg) {
            /* never a watchpoint on memory we touch: only garbage values */
            a1 = rnd() % 2 ? rnd() % 8 : a1;
            a2 = rnd() % 2 ? bad_ptr() : rnd();
        }
        fz(nr, a1, a2, garbage(), garbage(), garbage());
        if (nr == HC_set_callbacks)
            restore_callbacks();
    }
}

static void fuzz_one(unsigned int nr, unsigned long n)
{
    switch (nr) {
    case HC_set_trap_table:   fuzz_set_trap_table(n); break;
    case HC_mmu_update:       fuzz_mmu_update(n); break;
    case HC_set_gdt:          fuzz_set_gdt(n); break;
    case HC_stack_switch:
    case HC_set_callbacks:
    case HC_fpu_taskswitch:
    case HC_set_debugreg:
    case HC_vm_assist:
    case HC_set_segment_base: fuzz_stateful(nr, n); break;
    case HC_sched_op_compat:
    case HC_sched_op:         fuzz_sched_op(nr, n); break;
    case HC_update_descriptor: fuzz_update_descriptor(n); break;
    case HC_memory_op:        fuzz_memory_op(n); break;
    case HC_multicall:        fuzz_multicall(n); break;
    case HC_update_va_mapping:
    case HC_update_va_mapping_otherdomain: fuzz_update_va_mapping(nr, n); break;
    case HC_set_timer_op:     fuzz_set_timer_op(n); break;
    case HC_event_channel_op_compat:
    case HC_event_channel_op: fuzz_evtchn(nr, n); break;
    case HC_console_io:       fuzz_console_io(n); break;
    case HC_vcpu_op:          fuzz_vcpu_op(n); break;
    case HC_mmuext_op:        fuzz_mmuext_op(n); break;
    case HC_callback_op:      fuzz_callback_op(n); break;
    default:                  fuzz_generic(nr, n); break;
    }
}

/* ------------------------------------------------------------ checks */

static int checks_failed;

static void check(const char *name, long rc, long want1, long want2)
{
    int ok = rc == want1 || rc == want2;

    if (!ok)
        checks_failed++;
    if (ok)
        printk("hcfuzz: check %s rc=%ld OK\n", name, rc);
    else if (want1 == want2)
        printk("hcfuzz: check %s rc=%ld FAIL (expected %ld)\n", name, rc, want1);
    else
        printk("hcfuzz: check %s rc=%ld FAIL (expected %ld or %ld)\n", name, rc, want1, want2);
}

static long mmu1(uint64_t ptr, uint64_t val)
{
    struct mmu_update req = { .ptr = ptr, .val = val };
    return HYPERVISOR_mmu_update(&req, 1, NULL, DOMID_SELF);
}

static long mmuext1(unsigned int cmd, unsigned long arg1)
{
    struct mmuext_op op = { .cmd = cmd, .arg1.mfn = arg1 };
    return HYPERVISOR_mmuext_op(&op, 1, NULL, DOMID_SELF);
}

static void run_checks(void)
{
    unsigned long nonexist = max_mfn + 0x100000UL;     /* no such machine frame */
    unsigned long heap = si_mfn + 1;                   /* exists, not ours */
    const uint64_t *l4 = (const uint64_t *)start_info->pt_base;
    long rc;

    /* -------- memory management */
    rc = mmu1(scratch_pte_ma, (nonexist << PAGE_SHIFT) | PTE_KERNEL_RW);
    check("mmu_update_map_foreign_frame", rc, -E_PERM, -E_PERM);
    restore_mappings();

    rc = mmu1(heap << PAGE_SHIFT, 0);
    check("mmu_update_pt_not_owned", rc, -E_INVAL, -E_INVAL);

    rc = mmu1((heap << PAGE_SHIFT) | MMU_MACHPHYS_UPDATE, 0);
    check("mmu_update_machphys_not_owned", rc, -E_INVAL, -E_INVAL);

    rc = mmu1(scratch_pte_ma | 4, scratch_pte);
    check("mmu_update_bad_cmd", rc, -E_NOSYS, -E_NOSYS);
    restore_mappings();

    rc = mmu1((l4_mfn << PAGE_SHIFT) + 260 * 8, l4[260]);
    check("mmu_update_xen_l4_slot", rc, -E_INVAL, -E_INVAL);

    rc = HYPERVISOR_mmu_update((struct mmu_update *)0xdead0000UL, 1, NULL, DOMID_SELF);
    check("mmu_update_unmapped_reqs", rc, -E_FAULT, -E_FAULT);

    rc = HYPERVISOR_update_va_mapping(HV_VA, scratch_pte, UVMF_INVLPG);
    check("update_va_mapping_hv_range", rc, -E_INVAL, -E_INVAL);

    rc = HYPERVISOR_update_va_mapping(0xdead0000UL, scratch_pte, UVMF_INVLPG);
    check("update_va_mapping_no_l1", rc, -E_INVAL, -E_INVAL);

    rc = HYPERVISOR_update_va_mapping(start_info->pt_base,
                                      (l4_mfn << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG);
    check("update_va_mapping_l4_writable", rc, -E_INVAL, -E_INVAL);
    if (rc == 0)
        HYPERVISOR_update_va_mapping(start_info->pt_base,
                                     (l4_mfn << PAGE_SHIFT) | PTE_KERNEL_RO, UVMF_INVLPG);

    rc = HYPERVISOR_update_va_mapping(scratch, scratch_pte | 0x10 /* PCD */, UVMF_INVLPG);
    check("update_va_mapping_cache_attrs", rc, -E_INVAL, -E_INVAL);
    restore_mappings();

    /* bits 52-61 are the guest's (Xen's _PAGE_AVAIL_HIGH) */
    rc = HYPERVISOR_update_va_mapping(scratch, scratch_pte | (1UL << 52), UVMF_INVLPG);
    check("update_va_mapping_avail_high_bit", rc, 0, 0);
    restore_mappings();

    rc = mmuext1(MMUEXT_PIN_L1_TABLE, heap);
    check("mmuext_pin_not_owned", rc, -E_INVAL, -E_PERM);

    rc = mmuext1(MMUEXT_PIN_L4_TABLE, l4_mfn);
    check("mmuext_pin_l4_already_pinned", rc, -E_INVAL, -E_INVAL);

    rc = mmuext1(MMUEXT_PIN_L1_TABLE, scratch_pte >> PAGE_SHIFT & 0xFFFFFFFFFFUL);
    check("mmuext_pin_writable_page", rc, -E_INVAL, -E_INVAL);

    rc = mmuext1(MMUEXT_NEW_BASEPTR, heap);
    check("mmuext_new_baseptr_not_owned", rc, -E_INVAL, -E_INVAL);

    rc = mmuext1(99, 0);
    check("mmuext_unknown_cmd", rc, -E_NOSYS, -E_NOSYS);

    rc = HYPERVISOR_mmuext_op((struct mmuext_op *)NONCANON_VA, 1, NULL, DOMID_SELF);
    check("mmuext_noncanonical_ops", rc, -E_FAULT, -E_FAULT);

    {
        unsigned long frame = heap;
        rc = _hypercall2(long, HC_set_gdt, &frame, 1);
        check("set_gdt_not_owned", rc, -E_INVAL, -E_INVAL);
        rc = _hypercall2(long, HC_set_gdt, &frame, 7169);
        check("set_gdt_too_many", rc, -E_INVAL, -E_INVAL);
    }

    rc = _hypercall2(long, HC_update_descriptor, heap << PAGE_SHIFT, 0);
    check("update_descriptor_not_owned", rc, -E_INVAL, -E_INVAL);

    if (l4[1] == 0) {
        rc = _hypercall2(long, HC_update_descriptor, (l4_mfn << PAGE_SHIFT) + 8, 0);
        check("update_descriptor_on_pt", rc, -E_INVAL, -E_INVAL);
    }

    /* -------- console, version, unknown */
    rc = HYPERVISOR_console_io(CONSOLEIO_write, 16, (const char *)HV_VA);
    check("console_io_hv_ptr", rc, -E_FAULT, -E_FAULT);
    rc = HYPERVISOR_console_io(CONSOLEIO_write, 16, (const char *)NONCANON_VA);
    check("console_io_noncanonical_ptr", rc, -E_FAULT, -E_FAULT);
    rc = HYPERVISOR_console_io(99, 0, NULL);
    check("console_io_unknown_cmd", rc, -E_NOSYS, -E_NOSYS);

    rc = hc_raw(60, 0, 0, 0, 0, 0);
    check("hypercall_60", rc, -E_NOSYS, -E_NOSYS);
    rc = hc_raw(127, 0, 0, 0, 0, 0);
    check("hypercall_127", rc, -E_NOSYS, -E_NOSYS);

    rc = HYPERVISOR_xen_version(99, NULL);
    check("xen_version_unknown_cmd", rc, -E_NOSYS, -E_NOSYS);
    rc = HYPERVISOR_xen_version(XENVER_extraversion_, (void *)HV_VA);
    check("xen_version_hv_ptr", rc, -E_FAULT, -E_FAULT);

    rc = HYPERVISOR_set_trap_table((const struct trap_info *)HV_VA);
    check("set_trap_table_hv_ptr", rc, -E_FAULT, -E_FAULT);
    trap_init();

    rc = HYPERVISOR_memory_op(60, (void *)fuzzbuf);
    check("memory_op_unknown_cmd", rc, -E_NOSYS, -E_NOSYS);

    rc = HYPERVISOR_set_segment_base(0, NONCANON_VA);
    check("set_segment_base_noncanonical", rc, -E_INVAL, -E_INVAL);
    HYPERVISOR_set_segment_base(0, 0);

    rc = HYPERVISOR_vm_assist(VMASST_CMD_enable, 63);
    check("vm_assist_bad_type", rc, -E_INVAL, -E_INVAL);

    {
        struct callback_register cb = { .type = 99, .address = (unsigned long)hypervisor_callback };
        rc = HYPERVISOR_callback_op(CALLBACKOP_register, &cb);
        check("callback_op_bad_type", rc, -E_NOSYS, -E_NOSYS);
        cb.type = CALLBACKTYPE_event;
        cb.flags = CALLBACKF_mask_events;
        cb.address = NONCANON_VA;
        rc = HYPERVISOR_callback_op(CALLBACKOP_register, &cb);
        check("callback_op_noncanonical", rc, -E_INVAL, -E_INVAL);
        restore_callbacks();
        {
            uint16_t type = CALLBACKTYPE_event;     /* struct callback_unregister */
            rc = HYPERVISOR_callback_op(CALLBACKOP_unregister, &type);
            check("callback_op_unregister_event", rc, -E_INVAL, -E_INVAL);
        }
        restore_callbacks();
    }

    /* -------- scheduling, vcpus */
    rc = HYPERVISOR_sched_op(99, NULL);
    check("sched_op_unknown_cmd", rc, -E_NOSYS, -E_NOSYS);
    rc = HYPERVISOR_sched_op(SCHEDOP_pin_override, NULL);
    check("sched_op_pin_override", rc, -E_PERM, -E_PERM);

    rc = HYPERVISOR_vcpu_op(VCPUOP_is_up, 1000, NULL);
    check("vcpu_op_bad_vcpu", rc, -E_NOENT, -E_NOENT);
    rc = HYPERVISOR_vcpu_op(99, 0, NULL);
    check("vcpu_op_unknown_cmd", rc, -E_NOSYS, -E_NOSYS);
    /* vcpuid is an unsigned int in Xen's prototype: 1<<32 is vcpu 0 */
    rc = _hypercall3(long, HC_vcpu_op, VCPUOP_is_up, 0x100000000UL, NULL);
    check("vcpu_op_vcpuid_truncated", rc, 1, 1);

    /* -------- multicall */
    {
        struct multicall_entry mc[2];
        memset(mc, 0, sizeof(mc));
        mc[0].op = 60;
        mc[1].op = HC_xen_version;
        mc[1].args[0] = XENVER_version;
        rc = HYPERVISOR_multicall(mc, 2);
        check("multicall_rc", rc, 0, 0);
        check("multicall_entry_unknown_op", (long)mc[0].result, -E_NOSYS, -E_NOSYS);
        check("multicall_entry_xen_version", (long)mc[1].result > 0 ? 1 : (long)mc[1].result, 1, 1);
    }

    /* -------- event channels */
    {
        struct evtchn_bind_virq bv = { .virq = 999, .vcpu = 0 };
        struct evtchn_alloc_unbound au = { .dom = DOMID_SELF, .remote_dom = DOMID_SELF };
        struct evtchn_send snd;
        struct evtchn_close cl;

        rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_virq, &bv);
        check("evtchn_bind_virq_999", rc, -E_INVAL, -E_INVAL);
        bv.virq = VIRQ_TIMER;
        bv.vcpu = 7;
        rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_virq, &bv);
        check("evtchn_bind_virq_bad_vcpu", rc, -E_NOENT, -E_NOENT);
        bv.virq = VIRQ_CONSOLE;
        bv.vcpu = 1;
        rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_virq, &bv);
        check("evtchn_bind_global_virq_vcpu1", rc, -E_INVAL, -E_INVAL);

        snd.port = 100000;
        rc = HYPERVISOR_event_channel_op(EVTCHNOP_send, &snd);
        check("evtchn_send_bad_port", rc, -E_INVAL, -E_INVAL);

        rc = HYPERVISOR_event_channel_op(EVTCHNOP_alloc_unbound, &au);
        if (rc == 0) {
            snd.port = au.port;
            rc = HYPERVISOR_event_channel_op(EVTCHNOP_send, &snd);
            check("evtchn_send_unbound_state", rc, 0, 0);       /* Xen drops it */
            cl.port = au.port;
            HYPERVISOR_event_channel_op(EVTCHNOP_close, &cl);
            rc = HYPERVISOR_event_channel_op(EVTCHNOP_send, &snd);
            check("evtchn_send_closed_port", rc, -E_INVAL, -E_INVAL);
            rc = HYPERVISOR_event_channel_op(EVTCHNOP_close, &cl);
            check("evtchn_close_closed_port", rc, -E_INVAL, -E_INVAL);
        } else {
            check("evtchn_alloc_unbound", rc, 0, 0);
        }

        bv.virq = VIRQ_DEBUG_;
        bv.vcpu = 0;
        rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_virq, &bv);
        if (rc == 0) {
            snd.port = bv.port;
            rc = HYPERVISOR_event_channel_op(EVTCHNOP_send, &snd);
            check("evtchn_send_virq_port", rc, -E_INVAL, -E_INVAL);
            cl.port = bv.port;
            HYPERVISOR_event_channel_op(EVTCHNOP_close, &cl);
            close_fuzz_ports();
        } else {
            check("evtchn_bind_virq_debug", rc, 0, 0);
        }

        rc = HYPERVISOR_event_channel_op(99, &snd);
        check("evtchn_unknown_cmd", rc, -E_NOSYS, -E_NOSYS);
    }
}


/* ------------------------------------------------------------ page-table fuzzing */

/*
 * Frames of our own that become random page tables: pinned at random levels,
 * unpinned, updated, cleared, copied, used as the user L4, mapped RW again.
 * They are never hooked into the live tables, so nothing we run on changes.
 * Afterwards everything is unpinned and every frame must be mappable
 * writable again: a leaked or lost type reference in the hypervisor shows
 * up here (and in the test's frame-table audit).
 */
#define PTF_PAGES 12
static unsigned long ptf_va[PTF_PAGES], ptf_mfn[PTF_PAGES];

static uint64_t ptf_entry(void)
{
    unsigned long mfn;
    uint64_t flags = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED;

    switch (rnd() % 8) {
    case 0: case 1: case 2: mfn = ptf_mfn[rnd() % PTF_PAGES]; break;
    case 3: mfn = pfn_to_mfn(rnd() % nr_pages); break;           /* any frame of ours */
    case 4: mfn = rnd() % 2 ? l1_mfn : l4_mfn; break;            /* live tables */
    case 5: mfn = foreign_mfn(); break;
    default: return rnd() % 4 ? 0 : rnd();
    }
    if (rnd() % 2)
        flags |= _PAGE_RW;
    if (rnd() % 8 == 0)
        flags |= rnd() & 0xFFF;
    if (rnd() % 16 == 0)
        flags |= 1UL << 63;                                     /* NX */
    return (mfn << PAGE_SHIFT) | flags;
}

static void ptf_fill(int k)
{
    static const unsigned int density[] = { 0, 1, 2, 4, 16 };
    uint64_t *t = (uint64_t *)ptf_va[k];
    unsigned int d = density[rnd() % ARRAY_SIZE(density)];

    memset(t, 0, PAGE_SIZE);
    for (unsigned int i = 0; i < d; i++)
        t[rnd() % 512] = ptf_entry();
}

static int ptf_setup(void)
{
    for (int k = 0; k < PTF_PAGES; k++) {
        void *p = alloc_page();
        if (!p)
            return -1;
        ptf_va[k] = (unsigned long)p;
        ptf_mfn[k] = virt_to_mfn(p);
        ptf_fill(k);
        if (HYPERVISOR_update_va_mapping(ptf_va[k], (ptf_mfn[k] << PAGE_SHIFT) | PTE_KERNEL_RO,
                                         UVMF_INVLPG))
            return -1;
    }
    return 0;
}

static void ptf_run(unsigned long n)
{
    unsigned long ops = 0, ok = 0, errors = 0, pins[4] = { 0, 0, 0, 0 };
    long rc;

    for (unsigned long i = 0; i < n; i++) {
        int k = rnd() % PTF_PAGES;
        unsigned long mfn = ptf_mfn[k];

        switch (rnd() % 9) {
        case 0: case 1: {
            unsigned int level = rnd() % 4;
            rc = mmuext1(MMUEXT_PIN_L1_TABLE + level, mfn);
            if (rc == 0)
                pins[level]++;
            break;
        }
        case 2:
            rc = mmuext1(MMUEXT_UNPIN_TABLE, mfn);
            break;
        case 3: case 4: {
            struct mmu_update req[4];
            unsigned int c = 1 + rnd() % 4;
            for (unsigned int j = 0; j < c; j++) {
                req[j].ptr = (ptf_mfn[rnd() % PTF_PAGES] << PAGE_SHIFT) + (rnd() % 512) * 8
                    + (rnd() % 4 ? MMU_NORMAL_PT_UPDATE : MMU_PT_UPDATE_PRESERVE_AD);
                req[j].val = rnd() % 4 ? ptf_entry() : 0;
            }
            rc = HYPERVISOR_mmu_update(req, c, NULL, DOMID_SELF);
            break;
        }
        case 5: {
            int rw = rnd() % 2;
            rc = HYPERVISOR_update_va_mapping(ptf_va[k], (mfn << PAGE_SHIFT) |
                                              (rw ? PTE_KERNEL_RW : PTE_KERNEL_RO), UVMF_INVLPG);
            if (rc == 0 && rw && rnd() % 2)     /* while writable: fresh random contents */
                ptf_fill(k);
            break;
        }
        case 6:
            rc = mmuext1(MMUEXT_NEW_USER_BASEPTR, rnd() % 4 ? mfn : 0);
            break;
        case 7: {
            struct mmuext_op op = { .cmd = rnd() % 2 ? 16 /* CLEAR_PAGE */ : 17 /* COPY_PAGE */,
                                    .arg1.mfn = mfn };
            op.arg2.src_mfn = rnd() % 2 ? ptf_mfn[rnd() % PTF_PAGES] : pfn_to_mfn(rnd() % nr_pages);
            rc = HYPERVISOR_mmuext_op(&op, 1, NULL, DOMID_SELF);
            break;
        }
        default: {
            struct mmuext_op op[4];
            unsigned int c = 1 + rnd() % 4, done = 0;
            for (unsigned int j = 0; j < c; j++) {
                op[j].cmd = rnd() % 3 ? MMUEXT_PIN_L1_TABLE + rnd() % 4 : MMUEXT_UNPIN_TABLE;
                op[j].arg1.mfn = ptf_mfn[rnd() % PTF_PAGES];
                op[j].arg2.src_mfn = 0;
            }
            rc = HYPERVISOR_mmuext_op(op, c, &done, DOMID_SELF);
            if (done > c)
                printk("hcfuzz: ptfuzz done=%u of %u FAIL\n", done, c);
            break;
        }
        }
        ops++;
        if (rc == 0)
            ok++;
        else
            errors++;
    }
    printk("hcfuzz: ptfuzz ops=%lu ok=%lu errors=%lu pins=%lu,%lu,%lu,%lu\n",
           ops, ok, errors, pins[0], pins[1], pins[2], pins[3]);
}

static void ptf_cleanup(void)
{
    int bad = 0;
    long rc;

    mmuext1(MMUEXT_NEW_USER_BASEPTR, 0);
    for (int pass = 0; pass < 2; pass++)
        for (int k = 0; k < PTF_PAGES; k++)
            mmuext1(MMUEXT_UNPIN_TABLE, ptf_mfn[k]);
    for (int k = 0; k < PTF_PAGES; k++) {
        rc = HYPERVISOR_update_va_mapping(ptf_va[k], (ptf_mfn[k] << PAGE_SHIFT) | PTE_KERNEL_RW,
                                          UVMF_INVLPG);
        if (rc) {
            printk("hcfuzz: ptfuzz frame %d mfn=0x%lx still typed rc=%ld FAIL\n", k,
                   ptf_mfn[k], rc);
            bad++;
        } else {
            memset((void *)ptf_va[k], 0, PAGE_SIZE);    /* and really writable */
        }
    }
    printk("hcfuzz: ptfuzz cleanup %s\n", bad ? "FAIL" : "OK");
}

/* ============================================================ grant-table fuzzing
 *
 * grants=1 [ops=N] [peer=P]: random grant_table_op batches against our own
 * grant table and, with peer=P, against a partner domain running
 * `role=partner` (see gp_main).  Every frame we hand out or name is one we
 * know the kind of: ordinary pool pages, canaries (never writable), our live
 * page tables L1..L4 and GDT frame (with a mirror copy of each), shared_info,
 * our grant-table frames, the other Xen-heap frames and frames that are not
 * ours at all.  Xen's rules we hold the hypervisor to (a breach is printed as
 * "hcfuzz: grants FAIL ..." and counted in violations=):
 *   - a writable map of, or a copy into, a page-table or GDT frame fails
 *     (get_page_and_type(PGT_writable_page) refuses those frames);
 *   - a read-only grant is never written, a canary never changes;
 *   - our page tables and GDT hold exactly what they held at the start.
 * Copies into page-table / GDT frames always carry the frame's own contents
 * (from its mirror), so a hypervisor that wrongly lets them through is
 * caught by the status alone and nothing we run on changes.
 */

#define GF_MAX_SENS     40
#define GF_POOL         24
#define GF_POOL_OVER     2      /* pool[2..22]: a grant may be host-mapped over their PTEs */
#define GF_CANARY        4
#define GF_MAPAREA      64
#define GF_MAXLIVE     256
#define GF_OWN_SENS     64      /* own refs 64+2i: frame i rw to us, 65+2i: its mirror ro */
#define GF_OWN_RND     160      /* own refs 160..255: rewritten at random */
#define GF_OWN_RND_N    96
#define GF_OWN_END     (GF_OWN_RND + GF_OWN_RND_N)
#define GP_DESC_REF      8      /* partner: its layout page, ro to the fuzzer */
#define GP_SENS         16      /* partner refs 16+2i: frame i rw, 17+2i: its mirror ro */
#define GP_RND         112      /* partner refs 112..175: rewritten at random */
#define GP_RND_N        64
#define GP_MAGIC        0x5a4e5447u
#define GF_PADDR        0x000ffffffffff000UL
#define GNTTABOP_transfer_        4
#define GNTTABOP_dump_table_      3
#define GNTTABOP_unmap_and_replace_ 7
#define GNTTABOP_set_version_     8
#define GNTTABOP_get_status_frames_ 9
#define GTF_accept_transfer_      2

enum { FK_POOL, FK_CANARY, FK_L1, FK_L2, FK_L3, FK_L4, FK_GDT, FK_SHINFO, FK_GNTTAB,
       FK_XENHEAP, FK_FOREIGN, FK_MIRROR, FK_DESC, FK_GARBAGE, FK_NKINDS };
static const char *const fk_name[FK_NKINDS] = {
    "pool", "canary", "L1", "L2", "L3", "L4", "GDT", "shared_info", "grant-table", "xenheap",
    "foreign", "mirror", "desc", "garbage",
};
static int fk_sensitive(int k) { return k >= FK_L1 && k <= FK_GDT; }

struct gf_frame {
    unsigned long mfn;
    const uint8_t *va;          /* where we read it */
    uint8_t *mirror;            /* its contents at setup */
    unsigned long mirror_mfn;
    uint16_t kind;
    uint16_t avoid_lo, avoid_hi; /* bytes the hypervisor rewrites itself (map-area PTEs) */
    uint8_t reported;
};

/* The partner's descriptor page (granted read-only at GP_DESC_REF). */
struct gp_desc {
    uint32_t magic, nsens, self, beats;
    struct { uint16_t kind, avoid_lo, avoid_hi, pad; } s[GF_MAX_SENS];
};

static struct gf_frame sens[GF_MAX_SENS];
static int nsens;
static uint8_t *pool[GF_POOL], *canary[GF_CANARY];
static unsigned long pool_mfn[GF_POOL], canary_mfn[GF_CANARY];
static uint64_t canary_sum[GF_CANARY];
static unsigned long maparea;
static struct grant_entry_v1 *gt;
static unsigned long gt_mfn[GNTTAB_MAX_FRAMES];
static unsigned int gt_nframes, gt_refs;
static domid_t self_id, peer_id;
static int have_peer;
static struct gp_desc pdesc;
/* what our own random refs (and the partner's, as far as we need) name */
static struct { uint8_t kind, rw; uint16_t idx; } own_rnd[GF_OWN_RND_N];

struct gf_map { uint32_t handle; uint64_t host_addr; };
static struct gf_map live[GF_MAXLIVE];
static int nlive;

enum { OP_MAP, OP_UNMAP, OP_COPY, OP_SETUP, OP_QUERY, OP_GETVER, OP_SETVER, OP_TRANSFER,
       OP_OTHER, OP_NOPS };
static const char *const op_name[OP_NOPS] = {
    "map", "unmap", "copy", "setup_table", "query_size", "get_version", "set_version",
    "transfer", "other",
};
static unsigned long op_count[OP_NOPS], op_calls[OP_NOPS], st_count[OP_NOPS][15];
static unsigned long rc_zero, rc_fault, rc_nosys, rc_inval, rc_other;
static unsigned long violations, entry_writes, gf_batches;

static int own_ram(unsigned long mfn)
{
    unsigned long pfn;

    if (mfn < min_mfn || mfn > max_mfn)     /* the M2P is only mapped where it means something */
        return 0;
    pfn = mfn_to_pfn(mfn);
    return pfn < nr_pages && pfn_to_mfn(pfn) == mfn;
}

static uint64_t sum_page(const void *p)
{
    const uint64_t *q = p;
    uint64_t s = 0x9E3779B97F4A7C15ULL;
    for (unsigned i = 0; i < PAGE_SIZE / 8; i++)
        s = (s ^ q[i]) * 0x100000001B3ULL;
    return s;
}

static void gf_add(unsigned long mfn, int kind, const void *va)
{
    for (int i = 0; i < nsens; i++)
        if (sens[i].mfn == mfn)
            return;
    if (nsens >= GF_MAX_SENS - 1)       /* one slot kept for the GDT */
        return;
    sens[nsens].mfn = mfn;
    sens[nsens].kind = kind;
    sens[nsens].va = va;
    nsens++;
}

/* Our live page tables, L4 down to the L1s, as far as they are our own frames. */
static void gf_walk(void)
{
    const uint64_t *l4 = (const uint64_t *)start_info->pt_base;

    gf_add(virt_to_mfn(l4), FK_L4, l4);
    for (int i4 = 0; i4 < 512; i4++) {
        uint64_t e4 = l4[i4];
        unsigned long m3 = (e4 & GF_PADDR) >> PAGE_SHIFT;
        const uint64_t *l3;
        if (!(e4 & _PAGE_PRESENT) || !own_ram(m3))
            continue;
        l3 = mfn_to_virt(m3);
        gf_add(m3, FK_L3, l3);
        for (int i3 = 0; i3 < 512; i3++) {
            uint64_t e3 = l3[i3];
            unsigned long m2 = (e3 & GF_PADDR) >> PAGE_SHIFT;
            const uint64_t *l2;
            if (!(e3 & _PAGE_PRESENT) || (e3 & _PAGE_PSE) || !own_ram(m2))
                continue;
            l2 = mfn_to_virt(m2);
            gf_add(m2, FK_L2, l2);
            for (int i2 = 0; i2 < 512; i2++) {
                uint64_t e2 = l2[i2];
                unsigned long m1 = (e2 & GF_PADDR) >> PAGE_SHIFT;
                if (!(e2 & _PAGE_PRESENT) || (e2 & _PAGE_PSE) || !own_ram(m1))
                    continue;
                gf_add(m1, FK_L1, mfn_to_virt(m1));
            }
        }
    }
}

/* A GDT frame of our own: one zeroed page, read-only, loaded with set_gdt. */
static int gf_gdt(void)
{
    void *p = alloc_page();
    unsigned long mfn;

    if (!p)
        return -1;
    memset(p, 0, PAGE_SIZE);
    mfn = virt_to_mfn(p);
    if (HYPERVISOR_update_va_mapping((unsigned long)p, (mfn << PAGE_SHIFT) | PTE_KERNEL_RO,
                                     UVMF_INVLPG))
        return -1;
    if (_hypercall2(long, HC_set_gdt, &mfn, 512))
        return -1;
    sens[nsens].mfn = mfn;
    sens[nsens].kind = FK_GDT;
    sens[nsens].va = p;
    nsens++;
    return 0;
}

/* Mirrors of every sensitive frame, and the bytes of each we must not compare. */
static int gf_mirrors(void)
{
    for (int i = 0; i < nsens; i++) {
        sens[i].avoid_lo = sens[i].avoid_hi = 0;
        if (!(sens[i].mirror = alloc_page()))
            return -1;
        sens[i].mirror_mfn = virt_to_mfn(sens[i].mirror);
    }
    if (maparea) {
        /* the map area's PTEs, and those of the pool pages a grant may be
         * mapped over (GF_POOL_OVER..): the hypervisor writes both */
        for (int k = 0; k < GF_MAPAREA + GF_POOL; k++) {
            uint64_t ma;
            unsigned long off, va;
            if (k < GF_MAPAREA)
                va = maparea + (unsigned long)k * PAGE_SIZE;
            else if (k - GF_MAPAREA >= GF_POOL_OVER && k - GF_MAPAREA < GF_POOL - 1)
                va = (unsigned long)pool[k - GF_MAPAREA];
            else
                continue;
            if (!mm_lookup_pte(va, &ma))
                continue;
            off = ma & (PAGE_SIZE - 1);
            for (int i = 0; i < nsens; i++) {
                struct gf_frame *f = &sens[i];
                if (f->mfn != ma >> PAGE_SHIFT)
                    continue;
                if (f->avoid_hi == 0 || off < f->avoid_lo)
                    f->avoid_lo = (uint16_t)off;
                if (off + 8 > f->avoid_hi)
                    f->avoid_hi = (uint16_t)(off + 8);
            }
        }
    }
    for (int i = 0; i < nsens; i++)
        memcpy(sens[i].mirror, sens[i].va, PAGE_SIZE);
    return 0;
}

/* Page tables compare with Accessed/Dirty masked (the MMU may set them). */
static int gf_frame_changed(const struct gf_frame *f, unsigned int *where)
{
    const uint64_t *a = (const uint64_t *)f->va, *b = (const uint64_t *)f->mirror;
    uint64_t mask = f->kind == FK_GDT ? ~0ULL : ~(uint64_t)(_PAGE_ACCESSED | _PAGE_DIRTY);

    for (unsigned int i = 0; i < PAGE_SIZE / 8; i++) {
        if (i * 8 >= f->avoid_lo && i * 8 < f->avoid_hi)
            continue;
        if ((a[i] ^ b[i]) & mask) {
            *where = i * 8;
            return 1;
        }
    }
    return 0;
}

static int gf_check_frames(const char *who)
{
    int bad = 0;
    unsigned int at;

    for (int i = 0; i < nsens; i++) {
        if (!gf_frame_changed(&sens[i], &at))
            continue;
        bad++;
        if (!sens[i].reported++) {
            violations++;
            printk("hcfuzz: %s FAIL %s frame mfn=0x%lx changed at +0x%x: 0x%lx (was 0x%lx)\n",
                   who, fk_name[sens[i].kind], sens[i].mfn, at,
                   (unsigned long)*(const uint64_t *)(sens[i].va + at),
                   (unsigned long)*(const uint64_t *)(sens[i].mirror + at));
        }
    }
    for (int i = 0; i < GF_CANARY; i++) {
        if (canary[i] && sum_page(canary[i]) != canary_sum[i]) {
            bad++;
            violations++;
            printk("hcfuzz: %s FAIL canary page %d mfn=0x%lx changed\n", who, i, canary_mfn[i]);
            canary_sum[i] = sum_page(canary[i]);
        }
    }
    return bad;
}

/* Pool pages (random contents, anything may write them) and canaries. */
static int gf_pages(void)
{
    for (int i = 0; i < GF_POOL; i++) {
        if (!(pool[i] = alloc_page()))
            return -1;
        pool_mfn[i] = virt_to_mfn(pool[i]);
        for (unsigned j = 0; j < PAGE_SIZE / 8; j++)
            ((uint64_t *)pool[i])[j] = rnd();
    }
    for (int i = 0; i < GF_CANARY; i++) {
        if (!(canary[i] = alloc_page()))
            return -1;
        canary_mfn[i] = virt_to_mfn(canary[i]);
        for (unsigned j = 0; j < PAGE_SIZE / 8; j++)
            ((uint64_t *)canary[i])[j] = rnd();
        canary_sum[i] = sum_page(canary[i]);
    }
    return 0;
}

/* Our grant table: the kernel's (all frames it could get), and their MFNs. */
static int gf_table(void)
{
    struct gnttab_setup_table st;
    long rc;

    if (!gnttab_ready())
        return -1;
    gt = gnttab_table();
    gt_nframes = gnttab_nr_frames();
    gt_refs = gt_nframes * (PAGE_SIZE / sizeof(struct grant_entry_v1));
    if (gt_refs < GF_OWN_END)
        return -1;
    memset(&st, 0, sizeof(st));
    st.dom = DOMID_SELF;
    st.nr_frames = gt_nframes;
    st.frame_list = gt_mfn;
    rc = HYPERVISOR_grant_table_op(GNTTABOP_setup_table, &st, 1);
    return rc || st.status ? -1 : 0;
}

/* Write grant entry `ref` of our table unless the hypervisor holds it; 1 if written. */
static int gf_grant(unsigned int ref, uint16_t flags, domid_t dom, uint32_t frame)
{
    struct grant_entry_v1 *e = &gt[ref];
    uint16_t old = READ_ONCE(e->flags);

    if (old & (GTF_reading | GTF_writing))
        return 0;
    if (!__atomic_compare_exchange_n(&e->flags, &old, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        return 0;
    WRITE_ONCE(e->domid, dom);
    WRITE_ONCE(e->frame, frame);
    wmb();
    WRITE_ONCE(e->flags, flags);
    entry_writes++;
    return 1;
}

/* The sensitive region: frame i rw to `to`, its mirror ro. */
static void gf_grant_sensitive(unsigned int base, domid_t to)
{
    for (int i = 0; i < nsens; i++) {
        gf_grant(base + 2 * i, GTF_permit_access, to, (uint32_t)sens[i].mfn);
        gf_grant(base + 2 * i + 1, GTF_permit_access | GTF_readonly, to,
                 (uint32_t)sens[i].mirror_mfn);
    }
}

static domid_t bystander_id;

static domid_t gf_dom_garbage(void)
{
    if (bystander_id && rnd() % 4 == 0)
        return bystander_id;
    return rnd() % 8 ? (domid_t)PICK(0, 1, 2, 0x7FF0, DOMID_IO, DOMID_XEN, 0x7FF3, 0xFFFF, 5000)
                      : (domid_t)rnd();
}

/* Re-grant one of our random refs: who, what, how. */
static void gf_regrant(unsigned int base, unsigned int n, domid_t primary, int partner_role)
{
    unsigned int k = rnd() % n, idx = 0;
    uint16_t flags;
    domid_t dom;
    unsigned long frame;
    int kind, rw;

    switch (rnd() % 10) {
    case 0: case 1: case 2: case 3: case 4: dom = primary; break;
    case 5: case 6: dom = have_peer && !partner_role ? peer_id : primary; break;
    case 7: dom = self_id; break;
    default: dom = gf_dom_garbage(); break;
    }
    switch (rnd() % 12) {
    case 0: case 1: case 2: case 3: flags = GTF_permit_access; break;
    case 4: case 5: case 6: flags = GTF_permit_access | GTF_readonly; break;
    case 7: flags = 0; break;
    case 8: flags = GTF_accept_transfer_; break;
    case 9: flags = 3 | (rnd() % 2 ? GTF_readonly : 0); break;
    default: flags = (uint16_t)rnd() & ~(GTF_reading | GTF_writing); break;
    }
    switch (rnd() % 16) {
    case 0: case 1: case 2: case 3: case 4:
        kind = FK_POOL; idx = rnd() % GF_POOL; frame = pool_mfn[idx]; break;
    case 5:
        kind = FK_CANARY; idx = rnd() % GF_CANARY; frame = canary_mfn[idx]; break;
    case 6: case 7: case 8:
        idx = rnd() % nsens; kind = sens[idx].kind; frame = sens[idx].mfn; break;
    case 9:
        kind = FK_SHINFO; frame = si_mfn; break;
    case 10:
        kind = FK_GNTTAB; frame = gt_mfn[rnd() % gt_nframes]; break;
    case 11:
        kind = FK_XENHEAP; frame = si_mfn + 1 + PICK(32, 33, 34, 35, 40, 63); break;
    case 12: case 13:
        kind = FK_FOREIGN; frame = foreign_mfn(); break;
    case 14:
        kind = FK_MIRROR; idx = rnd() % nsens; frame = sens[idx].mirror_mfn; break;
    default:
        kind = FK_GARBAGE; frame = rnd() % 3 ? (uint32_t)rnd() : PICK(0, 1, 0xffffffff, 0x100000);
        if (own_ram(frame))     /* a frame we run on would be ours to wreck: one past our RAM */
            frame = max_mfn + 1 + rnd() % 16;
        break;
    }
    /* never hand out something we could not bear to have written */
    if (kind == FK_CANARY || kind == FK_MIRROR || (partner_role && (fk_sensitive(kind) || kind == FK_SHINFO ||
                                               kind == FK_GNTTAB)))
        flags |= GTF_readonly;
    rw = (flags & GTF_type_mask) == GTF_permit_access && !(flags & GTF_readonly);
    if (gf_grant(base + k, flags, dom, (uint32_t)frame) && !partner_role) {
        own_rnd[k].kind = (uint8_t)kind;
        own_rnd[k].idx = (uint16_t)idx;
        own_rnd[k].rw = (uint8_t)rw;
    }
}

static void gf_violation(const char *what, int partners, int kind, unsigned long ref, long st)
{
    if (violations++ < 24)
        printk("hcfuzz: grants FAIL %s of %s %s frame (ref %lu) status=%ld\n", what,
               partners ? "the partner's" : "our own", fk_name[kind], ref, st);
}

static void gf_count_rc(long rc)
{
    if (rc == 0) rc_zero++;
    else if (rc == -E_FAULT) rc_fault++;
    else if (rc == -E_NOSYS) rc_nosys++;
    else if (rc == -E_INVAL) rc_inval++;
    else rc_other++;
}

static void gf_status(int op, long st)
{
    st_count[op][st <= 0 && st >= -13 ? -st : 14]++;
}

/* What a ref of `dom` names, as far as we know: kind, and for a sensitive
 * frame its index (so a copy into it can carry the frame's own contents). */
static int gf_ref_kind(domid_t dom, uint32_t ref, int *idx)
{
    *idx = -1;
    if (dom == self_id || dom == DOMID_SELF) {
        if (ref >= GF_OWN_SENS && ref < GF_OWN_SENS + 2 * (unsigned)nsens) {
            *idx = (ref - GF_OWN_SENS) / 2;
            return (ref - GF_OWN_SENS) % 2 ? FK_MIRROR : sens[*idx].kind;
        }
        if (ref >= GF_OWN_RND && ref < GF_OWN_END) {
            int k = own_rnd[ref - GF_OWN_RND].kind;
            *idx = own_rnd[ref - GF_OWN_RND].idx;
            return k;
        }
        return FK_GARBAGE;
    }
    if (have_peer && dom == peer_id) {
        if (ref == GP_DESC_REF)
            return FK_DESC;
        if (ref >= GP_SENS && ref < GP_SENS + 2 * pdesc.nsens) {
            *idx = (ref - GP_SENS) / 2;
            return (ref - GP_SENS) % 2 ? FK_MIRROR : pdesc.s[*idx].kind;
        }
        return FK_POOL;     /* the partner's random refs are never writable and sensitive */
    }
    return FK_GARBAGE;
}

/* A ref to name: mostly our own or the partner's interesting ones. */
static void gf_pick_ref(domid_t *dom, uint32_t *ref)
{
    unsigned int r = rnd() % 16;

    if (have_peer && r < 6) {
        *dom = peer_id;
        switch (rnd() % 6) {
        case 0: case 1: *ref = GP_SENS + rnd() % (2 * pdesc.nsens); break;
        case 2: case 3: case 4: *ref = GP_RND + rnd() % GP_RND_N; break;
        default: *ref = PICK(0, 1, GP_DESC_REF, 9, 4096, 16383, 16384, 0xffffffff); break;
        }
        return;
    }
    *dom = rnd() % 8 ? (rnd() % 4 ? self_id : DOMID_SELF) : gf_dom_garbage();
    switch (rnd() % 9) {
    case 0: case 1: case 2: *ref = GF_OWN_SENS + rnd() % (2 * nsens); break;
    case 3: case 4: case 5: *ref = GF_OWN_RND + rnd() % GF_OWN_RND_N; break;
    case 6: *ref = rnd() % GF_OWN_END; break;
    case 7: *ref = rnd() % 2 ? gt_refs - 1 + rnd() % 2 : (uint32_t)rnd(); break;
    default: *ref = PICK(16383, 16384, 0x7fffffff, 0xffffffff); break;
    }
}

static unsigned long gf_host_addr(void)
{
    switch (rnd() % 11) {
    case 0: case 1: case 2: case 3: case 4: case 5:
        return maparea + (rnd() % GF_MAPAREA) * PAGE_SIZE;
    case 6: return maparea + (rnd() % GF_MAPAREA) * PAGE_SIZE + (rnd() & 0xFFF);
    case 7: return 0;
    case 8:     /* over a live PTE of ours (a pool page we only use by frame number) */
        return (unsigned long)pool[GF_POOL_OVER + rnd() % (GF_POOL - 1 - GF_POOL_OVER)];
    default: {
        unsigned long p = bad_ptr();
        /* never a page we run on: the hypervisor would replace its PTE */
        if (p >= VIRT_BASE && p < VIRT_BASE + (nr_pages << PAGE_SHIFT))
            p = 0xdead0000UL;
        return p;
    }
    }
}

/* The batch sits at the end of fuzzbuf, so a count past it runs into the
 * guard page (-EFAULT) instead of into whatever follows. */
static void *gf_batch(size_t size, unsigned int n)
{
    return (void *)(fuzzbuf + PAGE_SIZE - size * n);
}

static unsigned int gf_count(unsigned int n, unsigned long *ptr)
{
    if (rnd() % 64)
        return n;
    if (rnd() % 2) {
        *ptr = bad_ptr();
        return (unsigned int)PICK(1, 2, 0x7fffffff, 0xffffffff, 4096);
    }
    return n + 1 + (unsigned int)(rnd() % 4);         /* past the end: the guard page */
}

static void gf_do_map(void)
{
    unsigned int n = 1 + rnd() % 16, cnt;
    struct gnttab_map_grant_ref *op = gf_batch(sizeof(*op), n);
    int kinds[16];
    unsigned long ptr = (unsigned long)op;
    long rc;

    for (unsigned int i = 0; i < n; i++) {
        int idx;
        memset(&op[i], 0, sizeof(op[i]));
        gf_pick_ref(&op[i].dom, &op[i].ref);
        kinds[i] = gf_ref_kind(op[i].dom, op[i].ref, &idx);
        switch (rnd() % 10) {
        case 0: case 1: case 2: case 3: op[i].flags = GNTMAP_host_map; break;
        case 4: case 5: op[i].flags = GNTMAP_host_map | GNTMAP_readonly; break;
        case 6: op[i].flags = GNTMAP_device_map | (rnd() % 2 ? GNTMAP_readonly : 0); break;
        case 7: op[i].flags = GNTMAP_host_map | GNTMAP_device_map; break;
        case 8: op[i].flags = PICK(0, GNTMAP_contains_pte | GNTMAP_host_map,
                                   GNTMAP_application_map | GNTMAP_host_map, GNTMAP_readonly); break;
        default: op[i].flags = (uint32_t)rnd(); break;
        }
        op[i].host_addr = op[i].flags & GNTMAP_host_map ? gf_host_addr()
                                                        : (rnd() % 2 ? 0 : rnd());
        op[i].status = 0x7777;
    }
    cnt = gf_count(n, &ptr);
    rc = HYPERVISOR_grant_table_op(GNTTABOP_map_grant_ref, (void *)ptr, cnt);
    gf_count_rc(rc);
    op_calls[OP_MAP]++;
    op_count[OP_MAP] += ptr == (unsigned long)op ? MIN(cnt, n) : 1;
    if (ptr != (unsigned long)op)
        return;
    for (unsigned int i = 0; i < n && i < cnt; i++) {
        if (op[i].status == 0x7777)
            continue;                   /* not reached (the call faulted first) */
        gf_status(OP_MAP, op[i].status);
        if (op[i].status != GNTST_okay)
            continue;
        if (!(op[i].flags & GNTMAP_readonly) && fk_sensitive(kinds[i]))
            gf_violation("writable map", op[i].dom == peer_id && have_peer, kinds[i],
                         op[i].ref, op[i].status);
        if (kinds[i] == FK_FOREIGN)
            gf_violation("map", 0, kinds[i], op[i].ref, op[i].status);
        if (kinds[i] == FK_XENHEAP && !(op[i].flags & GNTMAP_readonly))
            gf_violation("writable map", 0, kinds[i], op[i].ref, op[i].status);
        if (kinds[i] == FK_GARBAGE && op[i].dom != self_id && op[i].dom != DOMID_SELF &&
            !(have_peer && op[i].dom == peer_id))
            gf_violation("map of a grant of a domain that does not exist", 0, kinds[i],
                         op[i].ref, op[i].status);
        if (nlive < GF_MAXLIVE) {
            live[nlive].handle = op[i].handle;
            live[nlive].host_addr = op[i].flags & GNTMAP_host_map ? op[i].host_addr : 0;
            nlive++;
        } else {
            struct gnttab_unmap_grant_ref u = { .host_addr = 0, .handle = op[i].handle };
            HYPERVISOR_grant_table_op(GNTTABOP_unmap_grant_ref, &u, 1);
        }
    }
}

static void gf_do_unmap(unsigned int n)
{
    struct gnttab_unmap_grant_ref *op = gf_batch(sizeof(*op), n);
    unsigned long ptr = (unsigned long)op;
    unsigned int cnt;
    int took[32];
    long rc;

    for (unsigned int i = 0; i < n; i++) {
        memset(&op[i], 0, sizeof(op[i]));
        took[i] = -1;
        if (nlive && rnd() % 5) {
            int j = rnd() % nlive;
            took[i] = j;
            op[i].handle = live[j].handle;
            switch (rnd() % 8) {
            case 0: op[i].host_addr = 0; break;
            case 1: op[i].host_addr = gf_host_addr(); break;
            default: op[i].host_addr = live[j].host_addr; break;
            }
            for (unsigned int k = 0; k < i; k++)
                if (took[k] == j)
                    took[i] = -1;       /* the second unmap of a handle: garbage */
        } else {
            op[i].handle = rnd() % 8 ? (uint32_t)PICK(0, 1, 0xffffffff, 0x7fffffff, 255, 256, 65535)
                                      : (uint32_t)rnd();
            op[i].host_addr = gf_host_addr();
        }
        op[i].dev_bus_addr = rnd() % 4 ? 0 : rnd();
        op[i].status = 0x7777;
    }
    cnt = gf_count(n, &ptr);
    rc = HYPERVISOR_grant_table_op(GNTTABOP_unmap_grant_ref, (void *)ptr, cnt);
    gf_count_rc(rc);
    op_calls[OP_UNMAP]++;
    op_count[OP_UNMAP] += ptr == (unsigned long)op ? MIN(cnt, n) : 1;
    if (ptr != (unsigned long)op)
        return;
    /* drop the handles that went, whichever op named them */
    for (unsigned int i = 0; i < n && i < cnt; i++) {
        if (op[i].status != GNTST_okay)
            continue;
        for (int j = 0; j < nlive; j++) {
            if (live[j].handle == op[i].handle) {
                live[j] = live[--nlive];
                break;
            }
        }
    }
    for (unsigned int i = 0; i < n && i < cnt; i++)
        if (op[i].status != 0x7777)
            gf_status(OP_UNMAP, op[i].status);
}

/* One side of a copy: a grant ref of ours or the partner's, or a frame. */
struct gf_side { int kind, idx, is_ref; domid_t dom; uint32_t ref; unsigned long mfn; };

static void gf_side(struct gf_side *s, int dest)
{
    memset(s, 0, sizeof(*s));
    if (rnd() % 2) {
        s->is_ref = 1;
        gf_pick_ref(&s->dom, &s->ref);
        s->kind = gf_ref_kind(s->dom, s->ref, &s->idx);
        return;
    }
    s->dom = rnd() % 8 ? (rnd() % 2 ? DOMID_SELF : self_id)
                       : (have_peer && rnd() % 2 ? peer_id : gf_dom_garbage());
    s->idx = -1;
    switch (rnd() % 10) {
    case 0: case 1: case 2: case 3:
        s->kind = FK_POOL; s->mfn = pool_mfn[rnd() % GF_POOL]; break;
    case 4: case 5:
        s->idx = rnd() % nsens; s->kind = sens[s->idx].kind; s->mfn = sens[s->idx].mfn; break;
    case 6:
        s->kind = FK_SHINFO; s->mfn = si_mfn; break;
    case 7:
        s->kind = FK_GNTTAB; s->mfn = gt_mfn[rnd() % gt_nframes]; break;
    case 8:
        if (rnd() % 2) {
            s->kind = FK_FOREIGN; s->mfn = foreign_mfn();
        } else {
            s->kind = FK_XENHEAP; s->mfn = si_mfn + 1 + PICK(32, 33, 40);
        }
        break;
    default:
        if (dest) {         /* our own frame by number: ours to write */
            s->kind = FK_POOL; s->mfn = pool_mfn[rnd() % GF_POOL];
        } else {            /* any frame of ours is fine to read */
            s->kind = FK_POOL; s->mfn = pfn_to_mfn(rnd() % nr_pages);
        }
        break;
    }
}

static void gf_fill_ptr(struct gnttab_copy_ptr *p, const struct gf_side *s)
{
    p->domid = s->dom;
    if (s->is_ref)
        p->u.ref = s->ref;
    else
        p->u.gmfn = s->mfn;
}

/* Can we bear `dest` being written with arbitrary data if the hypervisor lets it? */
static int gf_dest_harmless(const struct gf_side *d)
{
    if (d->kind == FK_POOL || d->kind == FK_GARBAGE || d->kind == FK_FOREIGN ||
        d->kind == FK_CANARY || d->kind == FK_MIRROR || d->kind == FK_DESC)
        return 1;
    return 0;
}

static void gf_do_copy(void)
{
    unsigned int n = 1 + rnd() % 32, cnt;
    struct gnttab_copy *op = gf_batch(sizeof(*op), n);
    struct gf_side src[32], dst[32];
    unsigned long ptr = (unsigned long)op;
    long rc;

    for (unsigned int i = 0; i < n; i++) {
        unsigned int off, len;
        memset(&op[i], 0, sizeof(op[i]));
        gf_side(&dst[i], 1);
        gf_side(&src[i], 0);
        switch (rnd() % 8) {
        case 0: len = 0; off = rnd() % 4097; break;
        case 1: len = PAGE_SIZE; off = rnd() % 2 ? 0 : 1 + rnd() % 64; break;
        case 2: len = 1 + rnd() % 0xffff; off = rnd() % 0x10000; break;
        case 3: off = PAGE_SIZE - 8 * (1 + rnd() % 4); len = 8 * (1 + rnd() % 8); break;
        default: off = rnd() % PAGE_SIZE; len = 1 + rnd() % (PAGE_SIZE - off); break;
        }
        op[i].len = (uint16_t)len;
        op[i].dest.offset = (uint16_t)off;
        op[i].source.offset = (uint16_t)(rnd() % 4 ? off : rnd() % 0x1100);
        if (!gf_dest_harmless(&dst[i])) {
            /* a page table, GDT, shared_info or grant frame as the destination:
             * the source is the frame's own contents at the same offset */
            int idx = dst[i].idx;
            op[i].source.offset = op[i].dest.offset;
            if (fk_sensitive(dst[i].kind) && idx >= 0 && (dst[i].is_ref ? dst[i].dom != peer_id
                                                                      || !have_peer : 1)) {
                /* ours: from its mirror (by frame or by its mirror grant), never over
                 * the bytes the hypervisor itself rewrites */
                const struct gf_frame *f = &sens[idx];
                if (f->avoid_hi && off < f->avoid_hi && off + len > f->avoid_lo) {
                    op[i].dest.offset = op[i].source.offset = 0;
                    op[i].len = (uint16_t)MIN(len, f->avoid_lo);
                }
                memset(&src[i], 0, sizeof(src[i]));
                src[i].kind = FK_MIRROR;
                if (rnd() % 2) {
                    src[i].dom = DOMID_SELF;
                    src[i].mfn = f->mirror_mfn;
                } else {
                    src[i].is_ref = 1;
                    src[i].dom = self_id;
                    src[i].ref = GF_OWN_SENS + 2 * idx + 1;
                }
            } else if (fk_sensitive(dst[i].kind) && idx >= 0) {
                /* the partner's: from its mirror grant */
                memset(&src[i], 0, sizeof(src[i]));
                src[i].kind = FK_MIRROR;
                src[i].is_ref = 1;
                src[i].dom = peer_id;
                src[i].ref = GP_SENS + 2 * idx + 1;
            } else {
                src[i] = dst[i];        /* onto itself: harmless if allowed */
            }
        }
        gf_fill_ptr(&op[i].source, &src[i]);
        gf_fill_ptr(&op[i].dest, &dst[i]);
        op[i].flags = (src[i].is_ref ? GNTCOPY_source_gref : 0) |
                      (dst[i].is_ref ? GNTCOPY_dest_gref : 0);
        op[i].status = 0x7777;
    }
    cnt = gf_count(n, &ptr);
    rc = HYPERVISOR_grant_table_op(GNTTABOP_copy, (void *)ptr, cnt);
    gf_count_rc(rc);
    op_calls[OP_COPY]++;
    op_count[OP_COPY] += ptr == (unsigned long)op ? MIN(cnt, n) : 1;
    if (ptr != (unsigned long)op)
        return;
    for (unsigned int i = 0; i < n && i < cnt; i++) {
        if (op[i].status == 0x7777)
            continue;
        gf_status(OP_COPY, op[i].status);
        if (op[i].status != GNTST_okay)
            continue;
        if (fk_sensitive(dst[i].kind))
            gf_violation(dst[i].is_ref ? "copy into (by grant)" : "copy into (by frame)",
                         dst[i].is_ref && have_peer && dst[i].dom == peer_id, dst[i].kind,
                         dst[i].is_ref ? dst[i].ref : dst[i].mfn, op[i].status);
        if ((dst[i].kind == FK_FOREIGN || dst[i].kind == FK_XENHEAP) &&
            !(have_peer && dst[i].is_ref && dst[i].dom == peer_id))
            gf_violation("copy into", 0, dst[i].kind,
                         dst[i].is_ref ? dst[i].ref : dst[i].mfn, op[i].status);
        if (src[i].kind == FK_FOREIGN && !(have_peer && src[i].is_ref && src[i].dom == peer_id))
            gf_violation("copy from", 0, src[i].kind,
                         src[i].is_ref ? src[i].ref : src[i].mfn, op[i].status);
        if ((dst[i].kind == FK_CANARY || dst[i].kind == FK_MIRROR || dst[i].kind == FK_DESC) &&
            op[i].len)
            gf_violation("copy into a read-only", dst[i].is_ref && have_peer &&
                         dst[i].dom == peer_id, dst[i].kind,
                         dst[i].is_ref ? dst[i].ref : dst[i].mfn, op[i].status);
    }
}

/* The rest of grant_table_op: setup, query, versions, transfer, unknown. */
static void gf_do_misc(void)
{
    unsigned long buf = fuzzbuf + PAGE_SIZE - 64, ptr;
    unsigned int r = rnd() % 9, op = OP_OTHER;
    unsigned long cmd;
    long rc;

    memset((void *)buf, 0, 64);
    ptr = rnd() % 8 ? buf : bad_ptr();
    switch (r) {
    case 0: {
        struct gnttab_setup_table *s = (void *)(fuzzbuf + PAGE_SIZE - sizeof(*s));
        unsigned long *frames = (unsigned long *)(fuzzbuf + 2048);
        op = OP_SETUP;
        ptr = rnd() % 8 ? (unsigned long)s : bad_ptr();
        s->dom = rnd() % 4 ? DOMID_SELF : (rnd() % 2 ? self_id : gf_dom_garbage());
        s->nr_frames = rnd() % 2 ? gt_nframes : (uint32_t)PICK(0, 1, 31, 32, 33, 64, 0xffffffff);
        s->frame_list = rnd() % 4 ? frames : (unsigned long *)bad_ptr();
        s->status = 0x7777;
        rc = HYPERVISOR_grant_table_op(GNTTABOP_setup_table, (void *)ptr, 1);
        if (ptr == (unsigned long)s && s->status != 0x7777)
            gf_status(op, s->status);
        if (rc == 0 && ptr == (unsigned long)s && s->status == GNTST_okay &&
            s->frame_list == frames) {
            for (unsigned int i = 0; i < MIN(s->nr_frames, gt_nframes); i++)
                if (frames[i] != gt_mfn[i] && violations++ < 24)
                    printk("hcfuzz: grants FAIL setup_table moved frame %u: 0x%lx, was 0x%lx\n",
                           i, frames[i], gt_mfn[i]);
        }
        break;
    }
    case 1: {
        struct gnttab_query_size *q = (void *)(fuzzbuf + PAGE_SIZE - sizeof(*q));
        op = OP_QUERY;
        ptr = rnd() % 8 ? (unsigned long)q : bad_ptr();
        q->dom = rnd() % 4 ? DOMID_SELF : (have_peer && rnd() % 2 ? peer_id : gf_dom_garbage());
        q->status = 0x7777;
        rc = HYPERVISOR_grant_table_op(GNTTABOP_query_size, (void *)ptr, rnd() % 8 ? 1 : 2);
        if (ptr == (unsigned long)q && q->status != 0x7777)
            gf_status(op, q->status);
        break;
    }
    case 2: {
        struct gnttab_get_version *g = (void *)(fuzzbuf + PAGE_SIZE - sizeof(*g));
        op = OP_GETVER;
        ptr = rnd() % 8 ? (unsigned long)g : bad_ptr();
        g->dom = rnd() % 2 ? DOMID_SELF : (have_peer && rnd() % 2 ? peer_id : gf_dom_garbage());
        rc = HYPERVISOR_grant_table_op(GNTTABOP_get_version, (void *)ptr, 1);
        if (rc == 0 && ptr == (unsigned long)g && g->version != 1 && violations++ < 24)
            printk("hcfuzz: grants FAIL get_version says %u\n", g->version);
        break;
    }
    case 3: {
        uint32_t *v = (uint32_t *)(fuzzbuf + PAGE_SIZE - 4);
        op = OP_SETVER;
        ptr = rnd() % 8 ? (unsigned long)v : bad_ptr();
        /* never 2: a Xen would switch and our table would change layout */
        *v = (uint32_t)PICK(1, 1, 0, 3, 0xffffffff, 0x80000001);
        rc = HYPERVISOR_grant_table_op(GNTTABOP_set_version_, (void *)ptr, 1);
        break;
    }
    case 4: {
        /* struct gnttab_transfer { xen_pfn_t mfn; domid_t domid; grant_ref_t ref;
         * int16_t status; }: never a frame of ours (a Xen would take it away) */
        uint64_t *t = (uint64_t *)(fuzzbuf + PAGE_SIZE - 24);
        int kind = FK_FOREIGN, k = -1;
        op = OP_TRANSFER;
        ptr = rnd() % 8 ? (unsigned long)t : bad_ptr();
        switch (rnd() % 6) {
        case 0: t[0] = foreign_mfn(); break;
        case 1: kind = FK_GARBAGE; t[0] = rnd(); break;
        case 2: case 3:         /* our own page tables and GDT: never transferable */
            k = rnd() % nsens; kind = sens[k].kind; t[0] = sens[k].mfn; break;
        case 4:
            kind = rnd() % 2 ? FK_SHINFO : FK_GNTTAB;
            t[0] = kind == FK_SHINFO ? si_mfn : gt_mfn[rnd() % gt_nframes];
            break;
        default:                /* a pool page we could lose (not the first or last) */
            kind = FK_POOL; t[0] = pool_mfn[1 + rnd() % (GF_POOL - 2)]; break;
        }
        t[1] = (rnd() % 2 && have_peer ? peer_id : gf_dom_garbage()) |
               ((uint64_t)(uint32_t)(rnd() % 2 ? GP_RND + rnd() % GP_RND_N : rnd()) << 32);
        t[2] = 0x7777;
        rc = HYPERVISOR_grant_table_op(GNTTABOP_transfer_, (void *)ptr, 1);
        if (rc == 0 && ptr == (unsigned long)t && (int16_t)t[2] != 0x7777) {
            gf_status(op, (int16_t)t[2]);
            if ((int16_t)t[2] == GNTST_okay && kind != FK_POOL)
                gf_violation("transfer", 0, kind, (unsigned long)t[0], 0);
        }
        break;
    }
    default:
        cmd = PICK(GNTTABOP_dump_table_, GNTTABOP_unmap_and_replace_, GNTTABOP_get_status_frames_,
                   11, 12, 13, 99, 0xffffffff, 0x100000000UL | GNTTABOP_copy);
        if (cmd == (0x100000000UL | GNTTABOP_copy) || cmd == GNTTABOP_unmap_and_replace_)
            ptr = bad_ptr();           /* only garbage pointers for ops that act */
        rc = hc_raw(20, cmd, ptr, rnd() % 2 ? 1 : rnd(), 0, 0);
        break;
    }
    gf_count_rc(rc);
    op_calls[op]++;
    op_count[op]++;
}

/* Unmap everything we still hold; then no entry of ours may stay busy. */
static void gf_unmap_all(void)
{
    while (nlive) {
        struct gnttab_unmap_grant_ref u = { .host_addr = live[nlive - 1].host_addr,
                                            .handle = live[nlive - 1].handle };
        long rc = HYPERVISOR_grant_table_op(GNTTABOP_unmap_grant_ref, &u, 1);
        if (rc || u.status)
            printk("hcfuzz: grants FAIL unmap of handle %u at 0x%lx: rc=%ld status=%d\n",
                   u.handle, (unsigned long)u.host_addr, rc, u.status);
        nlive--;
    }
}

static int gf_busy_entries(void)
{
    int busy = 0;
    for (unsigned int r = GF_OWN_SENS; r < GF_OWN_END; r++)
        if ((READ_ONCE(gt[r].flags) & (GTF_reading | GTF_writing)) &&
            !(have_peer && READ_ONCE(gt[r].domid) == peer_id))  /* the partner may hold those */
            busy++;
    return busy;
}

/* Our own domid: from the store, else the entry a copy of ours accepts. */
static int gf_self_id(void)
{
    struct gnttab_copy *c = (struct gnttab_copy *)fuzzbuf;

    if (xenbus_available() && xenbus_self_domid(&self_id) == 0)
        return 0;
    for (unsigned int d = 0; d < 0x7FF0; d++) {
        gf_grant(GF_OWN_RND, GTF_permit_access | GTF_readonly, (domid_t)d,
                 (uint32_t)pool_mfn[0]);
        memset(c, 0, sizeof(*c));
        c->source.u.ref = GF_OWN_RND;
        c->source.domid = DOMID_SELF;
        c->dest.u.gmfn = pool_mfn[1];
        c->dest.domid = DOMID_SELF;
        c->len = 8;
        c->flags = GNTCOPY_source_gref;
        if (HYPERVISOR_grant_table_op(GNTTABOP_copy, c, 1) == 0 && c->status == GNTST_okay) {
            self_id = (domid_t)d;
            gf_grant(GF_OWN_RND, 0, 0, 0);
            return 0;
        }
    }
    return -1;
}

/* Setup shared by the fuzzer and the partner. */
static int gf_setup(int with_maparea)
{
    if (setup_memory())
        return -1;
    if (gf_pages())
        return -2;
    if (with_maparea && !(maparea = (unsigned long)gnttab_alloc_map_area(GF_MAPAREA)))
        return -3;
    if (gf_table())
        return -4;
    if (gf_self_id())
        return -5;
    gf_walk();
    if (gf_gdt())
        printk("hcfuzz: no GDT frame of our own (set_gdt refused)\n");
    if (gf_mirrors())
        return -6;
    return 0;
}

/* ------------------------------------------------------------ grant checks */

static long gmap1(domid_t dom, uint32_t ref, uint32_t flags, unsigned long va, uint32_t *handle)
{
    struct gnttab_map_grant_ref op = { .host_addr = va, .flags = flags, .ref = ref, .dom = dom };
    long rc = HYPERVISOR_grant_table_op(GNTTABOP_map_grant_ref, &op, 1);
    if (rc)
        return rc;
    *handle = op.handle;
    return op.status;
}

static void gunmap1(unsigned long va, uint32_t handle)
{
    struct gnttab_unmap_grant_ref op = { .host_addr = va, .handle = handle };
    HYPERVISOR_grant_table_op(GNTTABOP_unmap_grant_ref, &op, 1);
}

static long gcopy1(int sref, domid_t sdom, unsigned long s, unsigned int soff,
                   int dref, domid_t ddom, unsigned long d, unsigned int doff, unsigned int len)
{
    struct gnttab_copy op;
    long rc;

    memset(&op, 0, sizeof(op));
    if (sref) op.source.u.ref = (uint32_t)s; else op.source.u.gmfn = s;
    if (dref) op.dest.u.ref = (uint32_t)d; else op.dest.u.gmfn = d;
    op.source.domid = sdom;
    op.dest.domid = ddom;
    op.source.offset = (uint16_t)soff;
    op.dest.offset = (uint16_t)doff;
    op.len = (uint16_t)len;
    op.flags = (sref ? GNTCOPY_source_gref : 0) | (dref ? GNTCOPY_dest_gref : 0);
    rc = HYPERVISOR_grant_table_op(GNTTABOP_copy, &op, 1);
    return rc ? rc : op.status;
}

static void gcheck(const char *name, long st, long want1, long want2)
{
    check(name, st, want1, want2);
}

static int gf_find(int kind)
{
    for (int i = 0; i < nsens; i++)
        if (sens[i].kind == kind)
            return i;
    return -1;
}

/* Specific requests with Xen's answers (printed as "hcfuzz: check grant_..."). */
static void gf_checks(void)
{
    int l1 = gf_find(FK_L1), l4 = gf_find(FK_L4), gdt = gf_find(FK_GDT);
    unsigned int scratch_ref = GF_OWN_RND;      /* re-granted by the fuzz loop later */
    uint32_t h;
    long st;
    unsigned int o1;

    if (l1 < 0 || l4 < 0) {
        printk("hcfuzz: grants FAIL no L1 or L4 frame found\n");
        return;
    }
    /* an entry of that L1 the hypervisor does not rewrite itself */
    o1 = sens[l1].avoid_hi && sens[l1].avoid_lo <= 256 ? sens[l1].avoid_hi : 256;
    if (o1 > PAGE_SIZE - 8)
        o1 = 0;
    /* the attack of issue 8: our own live L1, granted to ourselves */
    st = gmap1(self_id, GF_OWN_SENS + 2 * l1, GNTMAP_host_map, maparea, &h);
    gcheck("grant_map_rw_own_l1", st, GNTST_general_error, GNTST_general_error);
    if (st == GNTST_okay)
        gunmap1(maparea, h);
    st = gmap1(self_id, GF_OWN_SENS + 2 * l1, GNTMAP_host_map | GNTMAP_readonly, maparea, &h);
    gcheck("grant_map_ro_own_l1", st, GNTST_okay, GNTST_okay);
    if (st == GNTST_okay)
        gunmap1(maparea, h);
    st = gmap1(self_id, GF_OWN_SENS + 2 * l4, GNTMAP_device_map, 0, &h);
    gcheck("grant_map_rw_own_l4", st, GNTST_general_error, GNTST_general_error);
    if (st == GNTST_okay)
        gunmap1(0, h);
    if (gdt >= 0) {
        st = gmap1(self_id, GF_OWN_SENS + 2 * gdt, GNTMAP_host_map, maparea, &h);
        gcheck("grant_map_rw_own_gdt", st, GNTST_general_error, GNTST_general_error);
        if (st == GNTST_okay)
            gunmap1(maparea, h);
        st = gcopy1(0, DOMID_SELF, sens[gdt].mirror_mfn, 0, 1, self_id, GF_OWN_SENS + 2 * gdt,
                    0, 64);
        gcheck("grant_copy_into_own_gdt", st, GNTST_general_error, GNTST_general_error);
    }
    /* same bytes the entry already holds: nothing changes if it goes through */
    st = gcopy1(0, DOMID_SELF, sens[l1].mirror_mfn, o1, 1, self_id, GF_OWN_SENS + 2 * l1,
                o1, 8);
    gcheck("grant_copy_into_own_l1_by_gref", st, GNTST_general_error, GNTST_general_error);
    st = gcopy1(0, DOMID_SELF, sens[l1].mirror_mfn, o1, 0, DOMID_SELF, sens[l1].mfn, o1, 8);
    gcheck("grant_copy_into_own_l1_by_frame", st, GNTST_general_error, GNTST_general_error);
    st = gcopy1(0, DOMID_SELF, sens[l4].mirror_mfn, 8, 1, self_id, GF_OWN_SENS + 2 * l4, 8, 8);
    gcheck("grant_copy_into_own_l4_by_gref", st, GNTST_general_error, GNTST_general_error);

    /* refusals that do not depend on page types */
    gf_grant(scratch_ref, GTF_permit_access | GTF_readonly, self_id, (uint32_t)pool_mfn[0]);
    st = gmap1(self_id, scratch_ref, GNTMAP_host_map, maparea, &h);
    gcheck("grant_map_rw_readonly_grant", st, GNTST_general_error, GNTST_general_error);
    if (st == GNTST_okay)
        gunmap1(maparea, h);
    st = gcopy1(0, DOMID_SELF, pool_mfn[1], 0, 1, self_id, scratch_ref, 0, 16);
    gcheck("grant_copy_into_readonly_grant", st, GNTST_general_error, GNTST_general_error);
    gf_grant(scratch_ref, GTF_permit_access, (domid_t)(self_id + 1), (uint32_t)pool_mfn[0]);
    st = gmap1(self_id, scratch_ref, GNTMAP_host_map | GNTMAP_readonly, maparea, &h);
    gcheck("grant_map_granted_to_other", st, GNTST_general_error, GNTST_general_error);
    if (st == GNTST_okay)
        gunmap1(maparea, h);
    gf_grant(scratch_ref, 0, self_id, (uint32_t)pool_mfn[0]);
    st = gmap1(self_id, scratch_ref, GNTMAP_host_map | GNTMAP_readonly, maparea, &h);
    gcheck("grant_map_not_granted", st, GNTST_general_error, GNTST_general_error);
    if (st == GNTST_okay)
        gunmap1(maparea, h);
    gf_grant(scratch_ref, GTF_permit_access, self_id, (uint32_t)(max_mfn + 0x1000));
    st = gmap1(self_id, scratch_ref, GNTMAP_host_map | GNTMAP_readonly, maparea, &h);
    gcheck("grant_map_frame_not_ours", st, GNTST_bad_page, GNTST_general_error);
    if (st == GNTST_okay)
        gunmap1(maparea, h);
    gf_grant(scratch_ref, 0, 0, 0);
    st = gmap1(self_id, gt_refs + 5, GNTMAP_host_map | GNTMAP_readonly, maparea, &h);
    gcheck("grant_map_ref_beyond_table", st, GNTST_bad_gntref, GNTST_bad_gntref);
    if (st == GNTST_okay)
        gunmap1(maparea, h);
    {
        struct gnttab_unmap_grant_ref u = { .host_addr = 0, .handle = 0x7ffffff0 };
        long rc = HYPERVISOR_grant_table_op(GNTTABOP_unmap_grant_ref, &u, 1);
        gcheck("grant_unmap_bad_handle", rc ? rc : u.status, GNTST_bad_handle, GNTST_bad_handle);
    }
    st = gcopy1(0, DOMID_SELF, pool_mfn[0], 4000, 0, DOMID_SELF, pool_mfn[1], 0, 200);
    gcheck("grant_copy_past_page_end", st, GNTST_bad_copy_arg, GNTST_bad_copy_arg);
    st = gcopy1(0, DOMID_SELF, canary_mfn[0] + 0x100000, 0, 0, DOMID_SELF, pool_mfn[1], 0, 8);
    if (own_ram(canary_mfn[0] + 0x100000))
        st = GNTST_bad_page;
    gcheck("grant_copy_from_frame_not_ours", st, GNTST_bad_page, GNTST_bad_page);
    if (have_peer) {
        int pl1 = -1;
        for (unsigned int i = 0; i < pdesc.nsens; i++)
            if (pdesc.s[i].kind == FK_L1 && pl1 < 0)
                pl1 = (int)i;
        st = gcopy1(0, peer_id, pool_mfn[0], 0, 0, DOMID_SELF, pool_mfn[1], 0, 8);
        gcheck("grant_copy_peer_frame_without_grant", st, GNTST_permission_denied,
               GNTST_permission_denied);
        if (pl1 >= 0) {
            st = gmap1(peer_id, GP_SENS + 2 * pl1, GNTMAP_host_map, maparea, &h);
            gcheck("grant_map_rw_partner_l1", st, GNTST_general_error, GNTST_general_error);
            if (st == GNTST_okay)
                gunmap1(maparea, h);
            st = gcopy1(1, peer_id, GP_SENS + 2 * pl1 + 1, 512, 1, peer_id, GP_SENS + 2 * pl1,
                        512, 8);
            gcheck("grant_copy_into_partner_l1", st, GNTST_general_error, GNTST_general_error);
        }
    }
}

/* ------------------------------------------------------------ partner and fuzzer mains */

/* Join the partner through its data/gfuzz/join, then read its descriptor
 * page through a grant copy until it says it is ready. */
static int gf_join_peer(void)
{
    char path[64];
    uint64_t deadline = monotonic_ns() + 60 * NSEC_PER_SEC;
    struct gp_desc *d = (struct gp_desc *)pool[GF_POOL - 1];
    int rc;

    if (!xenbus_available()) {
        printk("hcfuzz: peer=%u needs xenstore\n", peer_id);
        return -1;
    }
    snprintf(path, sizeof(path), "/local/domain/%u/data/gfuzz/join", peer_id);
    while ((rc = xenbus_printf(XBT_NIL, path, "%u", self_id)) != 0) {
        if (monotonic_ns() >= deadline) {
            printk("hcfuzz: cannot join the partner at %s: %d\n", path, rc);
            return -1;
        }
        msleep(50);
    }
    for (;;) {
        long st = gcopy1(1, peer_id, GP_DESC_REF, 0, 0, DOMID_SELF, pool_mfn[GF_POOL - 1], 0,
                         sizeof(*d));
        if (st == GNTST_okay && d->magic == GP_MAGIC && d->self == peer_id)
            break;
        if (monotonic_ns() >= deadline) {
            printk("hcfuzz: partner %u never granted its descriptor (status %ld)\n", peer_id, st);
            return -1;
        }
        msleep(20);
    }
    memcpy(&pdesc, d, sizeof(pdesc));
    if (pdesc.nsens > GF_MAX_SENS)
        pdesc.nsens = GF_MAX_SENS;
    printk("hcfuzz: joined partner %u (%u sensitive frames)\n", peer_id, pdesc.nsens);
    return 0;
}

/* Tell the partner we are about to go (join = "done") and wait until it has
 * stopped touching our grants (its data/gfuzz/stopped), so what it does once
 * we are gone is decided by it, not by a race with our power-off. */
static void gf_leave_peer(void)
{
    char path[64], buf[8];
    uint64_t deadline = monotonic_ns() + 30 * NSEC_PER_SEC;

    /* one read-only grant to the partner for sure (the random ones may all be
     * revoked or point elsewhere by now): what it maps and holds across our end */
    gf_grant(GF_OWN_RND, GTF_permit_access | GTF_readonly, (domid_t)peer_id,
             (uint32_t)pool_mfn[0]);
    wmb();
    snprintf(path, sizeof(path), "/local/domain/%u/data/gfuzz/join", peer_id);
    if (xenbus_write(XBT_NIL, path, "done")) {
        printk("hcfuzz: grants FAIL cannot tell the partner we are done\n");
        return;
    }
    snprintf(path, sizeof(path), "/local/domain/%u/data/gfuzz/stopped", peer_id);
    while (xenbus_read(XBT_NIL, path, buf, sizeof(buf)) <= 0) {
        if (monotonic_ns() >= deadline) {
            printk("hcfuzz: grants FAIL the partner never stopped\n");
            return;
        }
        msleep(20);
    }
    printk("hcfuzz: grants partner stopped, leaving\n");
}

static void gf_summary(unsigned long total)
{
    printk("hcfuzz: grants done ops=%lu batches=%lu entries=%lu violations=%lu\n",
           total, gf_batches, entry_writes, violations);
    for (int o = 0; o < OP_NOPS; o++) {
        char line[256];
        int at = snprintf(line, sizeof(line), "hcfuzz: grants op=%s calls=%lu ops=%lu status",
                          op_name[o], op_calls[o], op_count[o]);
        for (int s = 0; s < 15; s++)
            if (st_count[o][s] && at < (int)sizeof(line) - 24)
                at += snprintf(line + at, sizeof(line) - at, " %d:%lu", s == 14 ? 99 : -s,
                               st_count[o][s]);
        printk("%s\n", line);
    }
    printk("hcfuzz: grants rc 0:%lu EFAULT:%lu ENOSYS:%lu EINVAL:%lu other:%lu\n",
           rc_zero, rc_fault, rc_nosys, rc_inval, rc_other);
}

static int gf_main(const char *cmdline)
{
    unsigned long target = cmdline_get_ulong(cmdline, "ops", 100000), total = 0;
    int rc;

    peer_id = (domid_t)cmdline_get_ulong(cmdline, "peer", 0);
    have_peer = peer_id != 0;
    if ((rc = gf_setup(1))) {
        printk("hcfuzz: grants setup FAIL (%d)\n", rc);
        return 1;
    }
    printk("hcfuzz: grants self=%u peer=%u frames: %d sensitive, table %u frames at mfn 0x%lx, "
           "shared_info 0x%lx\n", self_id, have_peer ? peer_id : 0, nsens, gt_nframes, gt_mfn[0],
           si_mfn);
    for (int i = 0; i < nsens; i++)
        if (sens[i].kind != FK_L1 || i < 6)
            printk("hcfuzz: grants frame %d %s mfn=0x%lx\n", i, fk_name[sens[i].kind], sens[i].mfn);
    if (have_peer && gf_join_peer())
        return 1;
    gf_grant_sensitive(GF_OWN_SENS, self_id);
    for (unsigned int k = 0; k < GF_OWN_RND_N; k++)
        gf_regrant(GF_OWN_RND, GF_OWN_RND_N, self_id, 0);
    gf_checks();
    if (gf_check_frames("grants"))
        printk("hcfuzz: grants frames changed by the checks\n");
    printk("hcfuzz: checks done failed=%d\n", checks_failed);

    while (total < target) {
        for (int j = 0; j < 4; j++)
            gf_regrant(GF_OWN_RND, GF_OWN_RND_N, self_id, 0);
        switch (rnd() % 16) {
        case 0: case 1: case 2: case 3: case 4: gf_do_map(); break;
        case 5: case 6: case 7: gf_do_unmap(1 + rnd() % (nlive > 16 ? 24 : 8)); break;
        case 8: case 9: case 10: case 11: case 12: case 13: gf_do_copy(); break;
        default: gf_do_misc(); break;
        }
        if (nlive > GF_MAXLIVE - 32)
            gf_do_unmap(32);
        total = 0;
        for (int o = 0; o < OP_NOPS; o++)
            total += op_count[o];
        if (++gf_batches % 256 == 0) {
            gf_check_frames("grants");
            if (gf_batches % 2048 == 0)
                printk("hcfuzz: grants progress ops=%lu live=%d violations=%lu\n", total, nlive,
                       violations);
        }
    }
    gf_unmap_all();
    gf_check_frames("grants");
    {
        int busy = gf_busy_entries();
        if (busy)
            printk("hcfuzz: grants FAIL %d entries still marked in use after unmapping all\n",
                   busy);
    }
    gf_summary(total);
    {
        int g = gf_find(FK_GDT);
        if (g >= 0 && _hypercall2(long, HC_set_gdt, &sens[g].mfn, 0))
            printk("hcfuzz: grants FAIL cannot unload our GDT\n");
    }
    if (have_peer)
        gf_leave_peer();
    /* still alive and working */
    msleep(20);
    *(volatile uint64_t *)pool[0] = 0x600dcafe;
    if (*(volatile uint64_t *)pool[0] != 0x600dcafe)
        printk("hcfuzz: pool page broken FAIL\n");
    printk("hcfuzz: survived\n");
    poweroff();
}

/* The partner's own pokes at the fuzzer's grants: read-only or writable maps
 * (never written through), unmaps, and copies *out of* them into its pool. */
static struct gf_map plive[32];
static int npl;
static unsigned long p_maps, p_map_ok, p_unmaps, p_unmap_ok, p_copies, p_copy_ok;

static void gp_poke(domid_t fz)
{
    uint32_t ref, h;
    long st;

    ref = rnd() % 4 ? GF_OWN_RND + rnd() % GF_OWN_RND_N
                    : GF_OWN_SENS + rnd() % (GF_OWN_END - GF_OWN_SENS);
    switch (rnd() % 4) {
    case 0: {
        uint32_t flags = (rnd() % 3 ? GNTMAP_host_map : GNTMAP_device_map) |
                         (rnd() % 2 ? GNTMAP_readonly : 0);
        unsigned long va = flags & GNTMAP_host_map ? maparea + (rnd() % GF_MAPAREA) * PAGE_SIZE : 0;
        if (npl >= (int)ARRAY_SIZE(plive))
            break;
        p_maps++;
        if (gmap1(fz, ref, flags, va, &h) == GNTST_okay) {
            p_map_ok++;
            plive[npl].handle = h;
            plive[npl].host_addr = va;
            npl++;
        }
        break;
    }
    case 1: {
        struct gnttab_unmap_grant_ref u;
        int j;
        long rc;
        if (!npl || (npl < 4 && rnd() % 32))  /* keep a few across the fuzzer's end */
            break;
        j = rnd() % npl;
        memset(&u, 0, sizeof(u));
        u.host_addr = plive[j].host_addr;
        u.handle = plive[j].handle;
        rc = HYPERVISOR_grant_table_op(GNTTABOP_unmap_grant_ref, &u, 1);
        p_unmaps++;
        if (rc == 0 && u.status == GNTST_okay)
            p_unmap_ok++;
        else if (p_unmaps - p_unmap_ok <= 4)
            printk("hcfuzz: partner unmap of handle %u: rc=%ld status=%d\n", u.handle, rc,
                   u.status);
        plive[j] = plive[--npl];
        break;
    }
    default: {
        unsigned int off = rnd() % PAGE_SIZE, len = 1 + rnd() % (PAGE_SIZE - off);
        st = gcopy1(1, fz, ref, off, 0, DOMID_SELF, pool_mfn[rnd() % (GF_POOL - 1)], off, len);
        p_copies++;
        if (st == GNTST_okay)
            p_copy_ok++;
        break;
    }
    }
}

/*
 * role=partner: grants the fuzzer (which joins through data/gfuzz/join) its
 * own page tables, GDT, shared_info, grant-table and ordinary frames, keeps
 * rewriting the random ones, and checks once a beat (beat_ms=, default 500)
 * that its page tables, GDT and canaries are exactly what they were.  It
 * also maps (never writing through) and copies out of the fuzzer's grants,
 * and keeps some of those mappings while the fuzzer powers off:
 *   hcfuzz: partner self=<d> waiting ...
 *   hcfuzz: partner fuzzer=<d> granted <n> sensitive frames
 *   hcfuzz: partner beat=<n> regrants=<k> frames=OK|BAD maps=<ok>/<tried>
 *           unmaps=<ok>/<tried> copies=<ok>/<tried>
 *   hcfuzz: partner stopped, holding <n> mappings ...   (the fuzzer said "done")
 *   hcfuzz: partner fuzzer gone, keeping <n> held mappings
 *       or, with unmap_after=1: ... unmapped <k> of <n> held mappings
 * It runs until destroyed (or beats=N).
 */
static int gp_main(const char *cmdline)
{
    static struct xenbus_watch w;
    unsigned long beat_ms = cmdline_get_ulong(cmdline, "beat_ms", 500);
    unsigned long beats = cmdline_get_ulong(cmdline, "beats", 0), seen = 0, fuzzer;
    unsigned long unmap_after = cmdline_get_ulong(cmdline, "unmap_after", 0);
    struct gp_desc *d;
    char buf[32];
    uint64_t next;
    unsigned long pokes = 0;
    const char *end;
    int rc, gone = 0, stopped = 0;

    if ((rc = gf_setup(1))) {
        printk("hcfuzz: partner setup FAIL (%d)\n", rc);
        return 1;
    }
    if (!xenbus_available()) {
        printk("hcfuzz: partner needs xenstore FAIL\n");
        return 1;
    }
    xenbus_rm(XBT_NIL, "data/gfuzz");
    if ((rc = xenbus_write(XBT_NIL, "data/gfuzz/join", "")) ||
        (rc = xenbus_set_perms_owner(XBT_NIL, "data/gfuzz/join", self_id, 'w')) ||
        (rc = xenbus_watch(&w, "data/gfuzz/join", NULL, NULL))) {
        printk("hcfuzz: partner cannot publish data/gfuzz/join: %d FAIL\n", rc);
        return 1;
    }
    printk("hcfuzz: partner self=%u waiting on data/gfuzz/join (%d sensitive frames)\n", self_id,
           nsens);
    for (;;) {
        xenbus_watch_wait(&w, &seen, monotonic_ns() + NSEC_PER_SEC);
        if (xenbus_read(XBT_NIL, "data/gfuzz/join", buf, sizeof(buf)) > 0) {
            fuzzer = simple_strtoul(buf, &end, 10);
            if (!*end && fuzzer && fuzzer < DOMID_SELF && fuzzer != self_id)
                break;
        }
    }
    xenbus_unwatch(&w);

    /* the layout page first (not readable until granted), then everything */
    d = (struct gp_desc *)pool[GF_POOL - 1];
    memset(d, 0, PAGE_SIZE);
    d->magic = GP_MAGIC;
    d->nsens = (uint32_t)nsens;
    d->self = self_id;
    for (int i = 0; i < nsens; i++) {
        d->s[i].kind = sens[i].kind;
        d->s[i].avoid_lo = sens[i].avoid_lo;
        d->s[i].avoid_hi = sens[i].avoid_hi;
    }
    gf_grant_sensitive(GP_SENS, (domid_t)fuzzer);
    for (unsigned int k = 0; k < GP_RND_N; k++)
        gf_regrant(GP_RND, GP_RND_N, (domid_t)fuzzer, 1);
    wmb();
    gf_grant(GP_DESC_REF, GTF_permit_access | GTF_readonly, (domid_t)fuzzer,
             (uint32_t)pool_mfn[GF_POOL - 1]);
    printk("hcfuzz: partner fuzzer=%lu granted %d sensitive frames\n", fuzzer, nsens);

    next = monotonic_ns() + beat_ms * NSEC_PER_MSEC;
    for (unsigned long beat = 1; !beats || beat <= beats; ) {
        gf_regrant(GP_RND, GP_RND_N, (domid_t)fuzzer, 1);
        if (!stopped)
            gp_poke((domid_t)fuzzer);
        msleep(5);
        if (!stopped && !(++pokes % 16) &&
            xenbus_read(XBT_NIL, "data/gfuzz/join", buf, sizeof(buf)) > 0 && !strcmp(buf, "done")) {
            stopped = 1;
            /* hold at least one mapping across the fuzzer's end if we can (it
             * granted us GF_OWN_RND before saying done).  A refusal pyxen got
             * from the fuzzer's process earlier does not stand once we heard
             * news (the xenstore reply just read: gnttab.GrantTables._news),
             * so one pass is enough, as on Xen. */
            for (uint32_t r = GF_OWN_RND; !npl && r < GF_OWN_END; r++) {
                uint32_t h;
                if (gmap1((domid_t)fuzzer, r, GNTMAP_device_map | GNTMAP_readonly, 0, &h) ==
                    GNTST_okay) {
                    plive[npl].handle = h;
                    plive[npl].host_addr = 0;
                    npl++;
                }
            }
            if ((rc = xenbus_write(XBT_NIL, "data/gfuzz/stopped", "1")) ||
                (rc = xenbus_set_perms_owner(XBT_NIL, "data/gfuzz/stopped", self_id, 'r')))
                printk("hcfuzz: partner FAIL cannot write data/gfuzz/stopped: %d\n", rc);
            printk("hcfuzz: partner stopped, holding %d mappings of the fuzzer's grants\n", npl);
        }
        if (monotonic_ns() < next)
            continue;
        next += beat_ms * NSEC_PER_MSEC;
        rc = gf_check_frames("partner");
        if (stopped && !gone && gcopy1(1, (domid_t)fuzzer, GF_OWN_RND, 0, 0, DOMID_SELF, pool_mfn[0], 0, 0)
                     == GNTST_bad_domain) {
            /* the fuzzer is gone: what we still map of it must unmap cleanly */
            int held = npl, ok = 0;
            gone = 1;
            if (!unmap_after) {
                printk("hcfuzz: partner fuzzer gone, keeping %d held mappings\n", npl);
                held = 0;
            }
            while (held && npl) {
                struct gnttab_unmap_grant_ref u;
                long urc;
                memset(&u, 0, sizeof(u));
                u.host_addr = plive[npl - 1].host_addr;
                u.handle = plive[npl - 1].handle;
                urc = HYPERVISOR_grant_table_op(GNTTABOP_unmap_grant_ref, &u, 1);
                if (urc == 0 && u.status == GNTST_okay)
                    ok++;
                else
                    printk("hcfuzz: partner FAIL unmap of the gone fuzzer's handle %u: rc=%ld "
                           "status=%d\n", u.handle, urc, u.status);
                npl--;
            }
            if (held)
                printk("hcfuzz: partner fuzzer gone, unmapped %d of %d held mappings\n", ok,
                       held);
        }
        printk("hcfuzz: partner beat=%lu regrants=%lu frames=%s maps=%lu/%lu unmaps=%lu/%lu "
               "copies=%lu/%lu\n", beat, entry_writes, rc ? "BAD" : "OK", p_map_ok, p_maps,
               p_unmap_ok, p_unmaps, p_copy_ok, p_copies);
        beat++;
    }
    printk("hcfuzz: partner done violations=%lu\n", violations);
    poweroff();
}

/* ------------------------------------------------------------ main */

int app_main(const char *cmdline)
{
    unsigned long n = cmdline_get_ulong(cmdline, "n", 48);
    unsigned long flags;

    char role[16];

    rng = cmdline_get_ulong(cmdline, "seed", 1);
    if (cmdline_get_str(cmdline, "role", role, sizeof(role)) > 0 && !strcmp(role, "partner")) {
        printk("hcfuzz: partner seed=%lu\n", (unsigned long)rng);
        rng = rng * 0x9E3779B97F4A7C15ULL + 0x2545F4914F6CDD1DULL;
        return gp_main(cmdline);
    }
    if (cmdline_get_ulong(cmdline, "grants", 0)) {
        printk("hcfuzz: grants seed=%lu ops=%lu\n", (unsigned long)rng,
               cmdline_get_ulong(cmdline, "ops", 100000));
        rng = rng * 0x9E3779B97F4A7C15ULL + 0x632BE59BD9B4E019ULL;
        bystander_id = (domid_t)cmdline_get_ulong(cmdline, "bystander", 0);
        return gf_main(cmdline);
    }
    printk("hcfuzz: seed=%lu n=%lu\n", (unsigned long)rng, n);
    rng = rng * 0x9E3779B97F4A7C15ULL + 0x632BE59BD9B4E019ULL;
    if (!rng)
        rng = 1;

    if (setup_memory()) {
        printk("hcfuzz: setup FAIL\n");
        return 1;
    }
    record_kernel_ports();

    flags = irq_save();
    run_checks();
    restore_all();
    irq_restore(flags);
    printk("hcfuzz: checks done failed=%d\n", checks_failed);

    for (unsigned int nr = 0; nr < 64; nr++) {
        if (nr == HC_iret) {
            printk("hcfuzz: hc=%u calls=0 errors=0 first_rc=0 (skipped: iret)\n", nr);
            continue;
        }
        memset(&st, 0, sizeof(st));
        if (nr == HC_console_io)
            console_flush(200 * NSEC_PER_MSEC);
        flags = irq_save();
        fuzz_one(nr, n);
        restore_all();
        irq_restore(flags);
        printk("hcfuzz: hc=%u calls=%lu errors=%lu first_rc=%ld\n",
               nr, st.calls, st.errors, st.first_rc);
    }

    if (ptf_setup()) {
        printk("hcfuzz: ptfuzz setup FAIL\n");
    } else {
        flags = irq_save();
        ptf_run(n * 8);
        ptf_cleanup();
        restore_all();
        irq_restore(flags);
    }

    /* Still alive and still working: timers, the console, the MMU. */
    msleep(20);
    {
        volatile uint64_t *p = (volatile uint64_t *)scratch;
        *p = 0x600dcafe;
        if (*p != 0x600dcafe)
            printk("hcfuzz: scratch page broken FAIL\n");
    }
    if (restore_failures)
        printk("hcfuzz: %d restore failures\n", restore_failures);
    printk("hcfuzz: survived\n");
    poweroff();
}
