/*
 * hcfuzz: a hostile guest.  Calls every hypercall number 0..63 with garbage
 * (unmapped, hypervisor-range, non-canonical and NULL pointers, huge counts,
 * bad sub-ops, a valid buffer full of random bytes) and checks that a few
 * specific malicious requests get Xen's error codes.  The hypervisor must
 * neither crash nor hang, and must not let us touch anything we don't own.
 *
 * cmdline: seed=S (xorshift seed, default 1), n=K (calls per hypercall,
 * default 48).
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

/* ------------------------------------------------------------ main */

int app_main(const char *cmdline)
{
    unsigned long n = cmdline_get_ulong(cmdline, "n", 48);
    unsigned long flags;

    rng = cmdline_get_ulong(cmdline, "seed", 1);
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
