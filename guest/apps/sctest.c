/*
 * sctest: hypercalls made with `syscall` from the guest kernel, the way
 * Linux (since the XSA-466 rework) and guests without a hypercall page make
 * them, checked against the same calls through the hypercall page.  Xen's
 * lstar_enter: from guest kernel mode `syscall` is a hypercall (number in
 * rax, arguments in rdi, rsi, rdx, r10, r8; rcx and r11 clobbered) followed
 * by event delivery; from guest user mode it is bounced to the registered
 * syscall callback with DF clear.
 *
 * Prints "sctest: <name> OK" or "sctest: <name> FAIL <details>" per check,
 * then "sctest: done ok=N fail=M", and ends with VCPUOP_down of its only
 * vCPU (made with `syscall`), which on Xen powers the domain off.
 * tests/e2e/test_syscall_path.py holds the list of names.
 */
#include "app.h"

const char app_name[] = "sctest";

#define HC_UNKNOWN            55
#define __HYPERVISOR_iret     23
#define __HYPERVISOR_vcpu_op  24
#define XENVER_pagesize        7
#define MMUEXT_NEW_USER_BASEPTR 15
#define VCPUOP_down            2
#define FLAT_USER_CS          0xe033
#define FLAT_USER_SS          0xe02b
#define X86_EFLAGS_DF         0x400UL
#define HC_MAGIC1             0x1111222233334444UL
#define HC_MAGIC2             0x5555666677778888UL

static unsigned int n_ok, n_fail;

static void __printf(3, 4) check(const char *name, int ok, const char *fmt, ...)
{
    char buf[256];
    va_list ap;

    if (ok) {
        n_ok++;
        printk("sctest: %s OK\n", name);
        return;
    }
    n_fail++;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    printk("sctest: %s FAIL %s\n", name, buf);
}

/* A hypercall made with `syscall` instead of the hypercall page. */
#define sc_hypercall5(nr, a1, a2, a3, a4, a5)                              \
({                                                                         \
    register unsigned long __res asm("rax") = (unsigned long)(nr);         \
    register unsigned long __a1 asm("rdi") = (unsigned long)(a1);          \
    register unsigned long __a2 asm("rsi") = (unsigned long)(a2);          \
    register unsigned long __a3 asm("rdx") = (unsigned long)(a3);          \
    register unsigned long __a4 asm("r10") = (unsigned long)(a4);          \
    register unsigned long __a5 asm("r8")  = (unsigned long)(a5);          \
    asm volatile("syscall"                                                 \
                 : "+r"(__res), "+r"(__a1), "+r"(__a2), "+r"(__a3),        \
                   "+r"(__a4), "+r"(__a5)                                  \
                 :                                                         \
                 : "memory", "rcx", "r11");                                \
    (long)__res;                                                           \
})
#define sc_hypercall2(nr, a1, a2)      sc_hypercall5(nr, a1, a2, 0, 0, 0)
#define sc_hypercall3(nr, a1, a2, a3)  sc_hypercall5(nr, a1, a2, a3, 0, 0)

static long sc_uvm(unsigned long va, uint64_t pte, unsigned long flags)
{
    return sc_hypercall3(__HYPERVISOR_update_va_mapping, va, pte, flags);
}

static void test_basic(void)
{
    long page = HYPERVISOR_xen_version(XENVER_version, NULL);
    long sc = sc_hypercall2(__HYPERVISOR_xen_version, XENVER_version, 0);
    long ps = sc_hypercall2(__HYPERVISOR_xen_version, XENVER_pagesize, 0);
    long un = sc_hypercall2(HC_UNKNOWN, 0, 0);

    check("syscall.xen_version", sc == page && sc > 0 && ps == 4096,
          "syscall=0x%lx page=0x%lx pagesize=%ld", sc, page, ps);
    check("syscall.unknown_enosys", un == -XEN_ENOSYS, "rc=%ld", un);
}

/*
 * update_va_mapping through `syscall`, then an immediate read through the
 * changed mapping: the queued PTE write and its flush must be applied before
 * the guest runs again, or the read sees the old frame.
 */
static void test_update_va_mapping(void)
{
    volatile uint64_t *p1 = alloc_page(), *p2 = alloc_page();
    unsigned long va = (unsigned long)p1, m1, m2;
    unsigned int stale = 0, rounds = 0;
    long rc = 0;

    if (!p1 || !p2) {
        check("syscall.update_va_mapping_immediate", 0, "no memory");
        return;
    }
    m1 = virt_to_mfn((void *)p1);
    m2 = virt_to_mfn((void *)p2);
    p1[0] = HC_MAGIC1;
    p2[0] = HC_MAGIC2;
    for (rounds = 0; rounds < 32 && rc == 0; rounds++) {
        rc = sc_uvm(va, (m2 << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG);
        if (rc == 0 && p1[0] != HC_MAGIC2)
            stale++;
        if (rc == 0)
            rc = sc_uvm(va, (m1 << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG);
        if (rc == 0 && p1[0] != HC_MAGIC1)
            stale++;
    }
    check("syscall.update_va_mapping_immediate", rc == 0 && stale == 0,
          "rc=%ld stale reads=%u in %u rounds", rc, stale, rounds);

    /* a flush that is not INVLPG: UVMF_TLB_FLUSH */
    rc = sc_uvm(va, (m2 << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_TLB_FLUSH);
    uint64_t seen = p1[0];
    long rc2 = sc_uvm(va, (m1 << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_TLB_FLUSH);
    uint64_t back = p1[0];
    check("syscall.update_va_mapping_tlb_flush",
          rc == 0 && rc2 == 0 && seen == HC_MAGIC2 && back == HC_MAGIC1,
          "rc=%ld,%ld seen=0x%lx back=0x%lx", rc, rc2, (unsigned long)seen, (unsigned long)back);

    /* same calls through the hypercall page give the same answers */
    rc = HYPERVISOR_update_va_mapping(va, (m2 << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG);
    seen = p1[0];
    rc2 = HYPERVISOR_update_va_mapping(va, (m1 << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG);
    back = p1[0];
    long bad_sc = sc_uvm(va, ((uint64_t)0xfffffffffUL << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG);
    long bad_pg = HYPERVISOR_update_va_mapping(va, ((uint64_t)0xfffffffffUL << PAGE_SHIFT) |
                                               PTE_KERNEL_RW, UVMF_INVLPG);
    check("syscall.update_va_mapping_same_as_page",
          rc == 0 && rc2 == 0 && seen == HC_MAGIC2 && back == HC_MAGIC1 &&
          bad_sc < 0 && bad_sc == bad_pg && p1[0] == HC_MAGIC1,
          "page rc=%ld,%ld seen=0x%lx back=0x%lx bad frame: syscall=%ld page=%ld",
          rc, rc2, (unsigned long)seen, (unsigned long)back, bad_sc, bad_pg);
    free_pages((void *)p1, 1);
    free_pages((void *)p2, 1);
}

static long sc_invlpg(unsigned long va)
{
    struct mmuext_op op;

    memset(&op, 0, sizeof(op));
    op.cmd = MMUEXT_INVLPG_LOCAL;
    op.arg1.linear_addr = va;
    return sc_hypercall5(__HYPERVISOR_mmuext_op, &op, 1, NULL, DOMID_SELF, 0);
}

static void test_mmu_update(void)
{
    volatile uint64_t *p1 = alloc_page(), *p2 = alloc_page();
    unsigned long va = (unsigned long)p1, m1, m2;
    struct mmu_update req;
    unsigned int done = 0;
    uint64_t maddr = 0, seen = 0, back = 0;
    long rc = -1, rc2 = -1;

    if (!p1 || !p2 || !mm_lookup_pte(va, &maddr)) {
        check("syscall.mmu_update_immediate", 0, "no memory or no pte");
        return;
    }
    m1 = virt_to_mfn((void *)p1);
    m2 = virt_to_mfn((void *)p2);
    p1[0] = HC_MAGIC1;
    p2[0] = HC_MAGIC2;
    req.ptr = maddr | MMU_NORMAL_PT_UPDATE;
    req.val = (m2 << PAGE_SHIFT) | PTE_KERNEL_RW;
    rc = sc_hypercall5(__HYPERVISOR_mmu_update, &req, 1, &done, DOMID_SELF, 0);
    if (rc == 0) {
        rc = sc_invlpg(va);
        seen = p1[0];
        req.val = (m1 << PAGE_SHIFT) | PTE_KERNEL_RW;
        rc2 = sc_hypercall5(__HYPERVISOR_mmu_update, &req, 1, NULL, DOMID_SELF, 0);
        rc2 |= sc_invlpg(va);
        back = p1[0];
    }
    check("syscall.mmu_update_immediate",
          rc == 0 && done == 1 && rc2 == 0 && seen == HC_MAGIC2 && back == HC_MAGIC1,
          "rc=%ld done=%u rc2=%ld seen=0x%lx back=0x%lx", rc, done, rc2,
          (unsigned long)seen, (unsigned long)back);
    free_pages((void *)p1, 1);
    free_pages((void *)p2, 1);
}

static void test_multicall(void)
{
    volatile uint64_t *p1 = alloc_page(), *p2 = alloc_page();
    unsigned long va = (unsigned long)p1, m1, m2;
    struct multicall_entry mc[2];
    uint64_t seen;
    long rc;

    if (!p1 || !p2) {
        check("syscall.multicall", 0, "no memory");
        return;
    }
    m1 = virt_to_mfn((void *)p1);
    m2 = virt_to_mfn((void *)p2);
    p1[0] = HC_MAGIC1;
    p2[0] = HC_MAGIC2;
    memset(mc, 0, sizeof(mc));
    mc[0].op = __HYPERVISOR_update_va_mapping;
    mc[0].args[0] = va;
    mc[0].args[1] = (m2 << PAGE_SHIFT) | PTE_KERNEL_RW;
    mc[0].args[2] = UVMF_INVLPG;
    mc[1].op = __HYPERVISOR_xen_version;
    mc[1].args[0] = XENVER_pagesize;
    mc[0].result = mc[1].result = 0xdeadbeefUL;
    rc = sc_hypercall2(__HYPERVISOR_multicall, mc, 2);
    seen = p1[0];
    sc_uvm(va, (m1 << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG);
    check("syscall.multicall", rc == 0 && mc[0].result == 0 && mc[1].result == 4096 &&
          seen == HC_MAGIC2 && p1[0] == HC_MAGIC1,
          "rc=%ld results=%ld,%ld seen=0x%lx", rc, (long)mc[0].result, (long)mc[1].result,
          (unsigned long)seen);
    free_pages((void *)p1, 1);
    free_pages((void *)p2, 1);
}

/*
 * The iret hypercall with `syscall`, as Linux's xen_iret does: push the flags
 * word, rcx, r11 and rax above the iret frame, eax = __HYPERVISOR_iret,
 * syscall.  Xen restores rax, r11 and rcx from the frame and resumes at the
 * frame's rip with its rsp.
 */
struct iret_result { unsigned long rax, rcx, r11, rsp, rbx, rbp; };
void sc_iret_probe(struct iret_result *out, unsigned long flags);
extern char sc_iret_probe_ret[];
asm(".pushsection .text\n"
    ".globl sc_iret_probe\n"
    ".type sc_iret_probe, @function\n"
    "sc_iret_probe:\n"
    "    pushq %rbx\n"
    "    pushq %rbp\n"
    "    movq %rsp, %rbp\n"
    "    movq $0x0bbbbbbbbbbbbbbb, %rbx\n"
    "    movq %rsp, %rax\n"
    "    pushq $0xe02b\n"                  /* ss */
    "    pushq %rax\n"                     /* rsp after the iret */
    "    pushq $0x202\n"                   /* rflags: IF */
    "    pushq $0xe030\n"                  /* cs: kernel (RPL 0) */
    "    leaq 1f(%rip), %rax\n"
    "    pushq %rax\n"                     /* rip */
    "    pushq %rsi\n"                     /* flags: 0 or VGCF_in_syscall */
    "    movq $0x0ccccccccccccccc, %rcx\n"
    "    pushq %rcx\n"
    "    movq $0x0111111111111111, %r11\n"
    "    pushq %r11\n"
    "    movq $0x0aaaaaaaaaaaaaaa, %rax\n"
    "    pushq %rax\n"
    "    movl $23, %eax\n"
    "    syscall\n"
    "    ud2\n"
    ".globl sc_iret_probe_ret\n"
    "sc_iret_probe_ret:\n"
    "1:  movq %rax, 0(%rdi)\n"
    "    movq %rcx, 8(%rdi)\n"
    "    movq %r11, 16(%rdi)\n"
    "    movq %rsp, 24(%rdi)\n"
    "    movq %rbx, 32(%rdi)\n"
    "    movq %rbp, 40(%rdi)\n"
    "    movq %rbp, %rsp\n"
    "    popq %rbp\n"
    "    popq %rbx\n"
    "    ret\n"
    ".size sc_iret_probe, . - sc_iret_probe\n"
    ".popsection\n");

static void test_iret(void)
{
    struct iret_result r;
    unsigned long flags = irq_save();
    int mask_before = this_vcpu()->evtchn_upcall_mask;

    memset(&r, 0, sizeof(r));
    sc_iret_probe(&r, 0);
    int mask_after = this_vcpu()->evtchn_upcall_mask;
    irq_restore(flags);
    /* rsp: the probe's frame pointer (rbp) is what it pushed as the iret rsp */
    check("syscall.iret",
          r.rax == 0x0aaaaaaaaaaaaaaaUL && r.rcx == 0x0cccccccccccccccUL &&
          r.r11 == 0x0111111111111111UL && r.rbx == 0x0bbbbbbbbbbbbbbbUL &&
          r.rsp == r.rbp && mask_before == 1 && mask_after == 0,
          "rax=0x%lx rcx=0x%lx r11=0x%lx rbx=0x%lx rsp=0x%lx (want 0x%lx) upcall mask %d -> %d",
          r.rax, r.rcx, r.r11, r.rbx, r.rsp, r.rbp, mask_before, mask_after);

    /* VGCF_in_syscall: Xen returns through sysret, rcx = rip and r11 = rflags */
    flags = irq_save();
    memset(&r, 0, sizeof(r));
    sc_iret_probe(&r, VGCF_in_syscall);
    irq_restore(flags);
    check("syscall.iret_in_syscall",
          r.rax == 0x0aaaaaaaaaaaaaaaUL && r.rcx == (unsigned long)sc_iret_probe_ret &&
          (r.r11 & 0x200) && !(r.r11 & 0x3000) && r.rsp == r.rbp,
          "rax=0x%lx rcx=0x%lx (rip 0x%lx) r11=0x%lx", r.rax, r.rcx,
          (unsigned long)sc_iret_probe_ret, r.r11);
}

/* An event made pending by a hypercall is delivered when that hypercall returns. */
static volatile unsigned long ipi_hits;

static void ipi_handler(evtchn_port_t port, struct pt_regs *regs, void *data)
{
    (void)port;
    (void)regs;
    (void)data;
    ipi_hits++;
}

static void test_event_after_syscall(void)
{
    struct evtchn_bind_ipi { uint32_t vcpu; evtchn_port_t port; } ipi = { 0, 0 };
    struct evtchn_send send;
    long rc;
    unsigned long seen;

    rc = sc_hypercall2(__HYPERVISOR_event_channel_op, EVTCHNOP_bind_ipi, &ipi);
    if (rc != 0) {
        check("syscall.event_delivery", 0, "bind_ipi through syscall rc=%ld", rc);
        return;
    }
    bind_evtchn(ipi.port, ipi_handler, NULL);
    ipi_hits = 0;
    send.port = ipi.port;
    rc = sc_hypercall2(__HYPERVISOR_event_channel_op, EVTCHNOP_send, &send);
    seen = ipi_hits;    /* the first instruction after the syscall returned */
    check("syscall.event_delivery", rc == 0 && seen == 1, "send rc=%ld handler ran %lu times",
          rc, seen);
    unbind_evtchn(ipi.port);
}

/*
 * VCPUOP_is_up through `syscall`, as Linux's xen_filter_cpu_maps asks it for
 * each of its NR_CPUS possible CPUs: Xen's do_vcpu_op answers -ENOENT for a
 * vcpuid >= max_vcpus (domain_vcpu() is NULL), whatever the command, and the
 * answer comes back as Xen's sysret returns it: RIP = rcx, RFLAGS = r11 = the
 * caller's flags (arithmetic flags, DF, AC as they were), every other
 * register kept.  pyxen answers this one in the `syscall` stub without an
 * exit where it can (machine.syscall_stub_code), which must not change any of
 * it.  The vCPU count comes from the hypercall page (port path).
 */
struct sc_regs_out { unsigned long rax, rcx, r11, flags, rdi, rsi, rdx, r10, r8, r9, rbx; };

static void sc_is_up_flags(unsigned long vcpuid, unsigned long flags, struct sc_regs_out *o)
{
    register unsigned long rax asm("rax") = __HYPERVISOR_vcpu_op;
    register unsigned long rdi asm("rdi") = 3;          /* VCPUOP_is_up */
    register unsigned long rsi asm("rsi") = vcpuid;
    register unsigned long rdx asm("rdx") = HC_MAGIC1;
    register unsigned long r10 asm("r10") = HC_MAGIC2;
    register unsigned long r8 asm("r8") = HC_MAGIC1 ^ 1;
    register unsigned long r9 asm("r9") = HC_MAGIC2 ^ 1;
    register unsigned long rcx asm("rcx");
    register unsigned long r11 asm("r11");
    unsigned long rbx_out, fl_out;

    asm volatile("pushfq\n\t"
                 "push %[fl]\n\t"
                 "popfq\n\t"
                 "mov $0x1234abcd, %%ebx\n\t"
                 "syscall\n\t"
                 "1: pushfq\n\t"
                 "pop %[flo]\n\t"
                 "mov %%rbx, %[rbxo]\n\t"
                 "popfq\n\t"
                 "lea 1b(%%rip), %[rbxo2]\n\t"
                 : "+r"(rax), "+r"(rdi), "+r"(rsi), "+r"(rdx), "+r"(r10), "+r"(r8), "+r"(r9),
                   "=r"(rcx), "=r"(r11), [flo] "=&r"(fl_out), [rbxo] "=&r"(rbx_out),
                   [rbxo2] "=&r"(o->flags)
                 : [fl] "r"(flags)
                 : "memory", "rbx", "cc");
    /* o->flags held the label's address for a moment: compare rcx with it */
    o->rcx = rcx == o->flags;
    o->rax = rax; o->r11 = r11; o->flags = fl_out; o->rbx = rbx_out;
    o->rdi = rdi; o->rsi = rsi; o->rdx = rdx; o->r10 = r10; o->r8 = r8; o->r9 = r9;
}

static void test_is_up(void)
{
    unsigned int n = 0;
    while (n < 4096 && HYPERVISOR_vcpu_op(3 /* VCPUOP_is_up */, n, NULL) >= 0)
        n++;
    const unsigned long ids[] = { 0, n, n + 1, 8191, 0xffffffffUL, 0x100000000UL + n };
    long port_rc[6], sc_rc[6];
    int ok = n >= 1;
    for (unsigned int i = 0; i < 6; i++) {
        port_rc[i] = HYPERVISOR_vcpu_op(3, (unsigned int)ids[i], NULL);
        sc_rc[i] = sc_hypercall3(__HYPERVISOR_vcpu_op, 3, ids[i], 0);
        ok &= port_rc[i] == sc_rc[i];
    }
    ok &= sc_rc[0] == 1 && sc_rc[1] == -XEN_ENOENT && sc_rc[2] == -XEN_ENOENT &&
          sc_rc[3] == -XEN_ENOENT && sc_rc[4] == -XEN_ENOENT && sc_rc[5] == -XEN_ENOENT;
    check("syscall.is_up_beyond_max", ok,
          "n=%u is_up(0)=%ld/%ld (n)=%ld/%ld (n+1)=%ld (8191)=%ld (~0u)=%ld (2^32+n)=%ld",
          n, port_rc[0], sc_rc[0], port_rc[1], sc_rc[1], sc_rc[2], sc_rc[3], sc_rc[4], sc_rc[5]);

    /* flags and registers, for vcpuids the answer is -ENOENT and 1 */
    const unsigned long fls[] = { 0x202, 0x202 | 0xcd5, 0x202 | 0x800, 0x202 | 0x401,
                                  0x202 | 0x40000 | 0x41, 0x202 | 0x200000 | 0x80 };
    ok = 1;
    char why[160] = "";
    for (unsigned int i = 0; i < 6 && ok; i++) {
        for (unsigned int j = 0; j < 2 && ok; j++) {
            struct sc_regs_out o;
            unsigned long id = j ? 8191 : 0;
            sc_is_up_flags(id, fls[i], &o);
            long want = j ? -XEN_ENOENT : 1;
            ok = (long)o.rax == want && o.rcx && o.flags == fls[i] && o.r11 == fls[i] &&
                 o.rdi == 3 && o.rsi == id && o.rdx == HC_MAGIC1 && o.r10 == HC_MAGIC2 &&
                 o.r8 == (HC_MAGIC1 ^ 1) && o.r9 == (HC_MAGIC2 ^ 1) && o.rbx == 0x1234abcd;
            if (!ok)
                snprintf(why, sizeof(why), "id=%lu flags=0x%lx: rax=%ld rcx_ok=%lu rflags=0x%lx "
                         "r11=0x%lx rdi=%lu rsi=%lu rbx=0x%lx", id, fls[i], (long)o.rax, o.rcx,
                         o.flags, o.r11, o.rdi, o.rsi, o.rbx);
        }
    }
    check("syscall.is_up_regs", ok, "%s", why);
}

/* An upcall pending when is_up (answered or not without an exit) is made is
 * delivered when it returns, as after any hypercall: the event is made
 * pending while masked, then unmasked without a hypercall. */
static void test_is_up_event(void)
{
    struct evtchn_bind_ipi { uint32_t vcpu; evtchn_port_t port; } ipi = { 0, 0 };
    struct evtchn_send send;
    struct vcpu_info *vi = this_vcpu();
    long rc, rc2;
    unsigned long seen_before, seen;

    rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_ipi, &ipi);
    if (rc != 0) {
        check("syscall.is_up_event", 0, "bind_ipi rc=%ld", rc);
        return;
    }
    bind_evtchn(ipi.port, ipi_handler, NULL);
    ipi_hits = 0;
    (void)sc_hypercall3(__HYPERVISOR_vcpu_op, 3, 8191, 0);  /* arms the fast path, if any */
    WRITE_ONCE(vi->evtchn_upcall_mask, 1);
    barrier();
    send.port = ipi.port;
    rc = HYPERVISOR_event_channel_op(EVTCHNOP_send, &send);
    (void)sc_hypercall3(__HYPERVISOR_vcpu_op, 3, 8191, 0);  /* masked: nothing delivered */
    seen_before = ipi_hits;
    barrier();
    WRITE_ONCE(vi->evtchn_upcall_mask, 0);   /* unmask without a hypercall */
    barrier();
    rc2 = sc_hypercall3(__HYPERVISOR_vcpu_op, 3, 8191, 0);
    seen = ipi_hits;    /* the first instruction after the syscall returned */
    check("syscall.is_up_event", rc == 0 && rc2 == -XEN_ENOENT && seen_before == 0 && seen == 1,
          "send rc=%ld is_up rc=%ld handler ran %lu times masked, %lu after", rc, rc2,
          seen_before, seen);
    unbind_evtchn(ipi.port);
}

/* SCHEDOP_block with `syscall`: sleeps until the timer event, which is delivered. */
static void test_block(void)
{
    uint64_t t0 = monotonic_ns(), t1;
    long rc, rc2;

    irq_disable();
    rc = sc_hypercall2(__HYPERVISOR_set_timer_op, t0 + 2 * NSEC_PER_MSEC, 0);
    rc2 = sc_hypercall2(__HYPERVISOR_sched_op, SCHEDOP_block, 0);
    irq_enable();
    t1 = monotonic_ns();
    check("syscall.sched_block", rc == 0 && rc2 == 0 && t1 - t0 >= 2 * NSEC_PER_MSEC,
          "set_timer rc=%ld block rc=%ld slept %lu us", rc, rc2,
          (unsigned long)(t1 - t0) / 1000);
}

/*
 * `syscall` from guest user mode: bounced to the syscall callback in kernel
 * mode on the stack given with stack_switch, frame {RCX, R11, RIP, CS,
 * RFLAGS, RSP, SS}, DF clear in the callback (kept in the saved RFLAGS),
 * events masked (CALLBACKF_mask_events), other registers as user mode left
 * them.  User mode here runs on the kernel's own page tables
 * (MMUEXT_NEW_USER_BASEPTR with the current L4; every kernel page is _PAGE_USER).
 */
unsigned long sc_user_frame[7], sc_user_regs[3], sc_user_saved_sp;
void sc_user_run(unsigned long user_sp);
void sc_syscall_cb(void);
extern char sc_user_syscall_ret[];
asm(".pushsection .text\n"
    ".globl sc_user_run\n"
    ".type sc_user_run, @function\n"
    "sc_user_run:\n"
    "    pushq %rbx\n"
    "    pushq %rbp\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, sc_user_saved_sp(%rip)\n"
    "    pushq $0xe02b\n"                  /* ss */
    "    pushq %rdi\n"                     /* user rsp */
    "    pushq $0x402\n"                   /* rflags: DF set, IF clear (events stay masked) */
    "    pushq $0xe033\n"                  /* cs: RPL 3 = guest user mode */
    "    leaq sc_user_code(%rip), %rax\n"
    "    pushq %rax\n"
    "    pushq $0\n"
    "    jmp hypercall_page + 23 * 32\n"
    "sc_user_code:\n"
    "    movq $0x0123456789, %rax\n"
    "    movq $0x0fedcba987, %rdi\n"
    "    syscall\n"
    ".globl sc_user_syscall_ret\n"
    "sc_user_syscall_ret:\n"
    "    ud2\n"
    ".globl sc_syscall_cb\n"
    "sc_syscall_cb:\n"                      /* guest kernel mode again */
    "    movq %rax, sc_user_regs(%rip)\n"
    "    movq %rdi, sc_user_regs+8(%rip)\n"
    "    pushfq\n"
    "    popq %rax\n"
    "    movq %rax, sc_user_regs+16(%rip)\n"
    "    leaq sc_user_frame(%rip), %rdi\n"
    "    movq %rsp, %rsi\n"
    "    movl $7, %ecx\n"
    "    cld\n"
    "    rep movsq\n"
    "    movq sc_user_saved_sp(%rip), %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbp\n"
    "    popq %rbx\n"
    "    ret\n"
    ".size sc_user_run, . - sc_user_run\n"
    ".popsection\n");

extern char boot_stack_top[];

static void test_user_syscall(void)
{
    char *ustack = alloc_page(), *kstack = alloc_page();
    struct callback_register cb = {
        .type = CALLBACKTYPE_syscall, .flags = CALLBACKF_mask_events,
        .address = (unsigned long)sc_syscall_cb,
    };
    struct mmuext_op op;
    unsigned long flags, l4;
    long rc_cb, rc_ub, rc_ss;

    if (!ustack || !kstack) {
        check("syscall.from_user_bounce", 0, "no memory");
        return;
    }
    l4 = virt_to_mfn((void *)start_info->pt_base);   /* the kernel never switches L4 */
    memset(&op, 0, sizeof(op));
    op.cmd = MMUEXT_NEW_USER_BASEPTR;
    op.arg1.mfn = l4;
    flags = irq_save();
    rc_cb = HYPERVISOR_callback_op(CALLBACKOP_register, &cb);
    rc_ub = HYPERVISOR_mmuext_op(&op, 1, NULL, DOMID_SELF);
    rc_ss = HYPERVISOR_stack_switch(FLAT_KERNEL_SS, (unsigned long)kstack + PAGE_SIZE);
    memset(sc_user_frame, 0, sizeof(sc_user_frame));
    if (rc_cb == 0 && rc_ub == 0 && rc_ss == 0)
        sc_user_run((unsigned long)ustack + PAGE_SIZE - 64);
    int mask_in_cb = this_vcpu()->evtchn_upcall_mask;
    HYPERVISOR_stack_switch(FLAT_KERNEL_SS, (unsigned long)boot_stack_top);
    op.arg1.mfn = 0;
    HYPERVISOR_mmuext_op(&op, 1, NULL, DOMID_SELF);
    irq_restore(flags);

    unsigned long *f = sc_user_frame;   /* rcx, r11, rip, cs, rflags, rsp, ss */
    check("syscall.from_user_bounce",
          rc_cb == 0 && rc_ub == 0 && rc_ss == 0 &&
          f[2] == (unsigned long)sc_user_syscall_ret && f[0] == f[2] &&
          (f[3] & 0xffff) == FLAT_USER_CS && f[5] == (unsigned long)ustack + PAGE_SIZE - 64 &&
          (f[6] & 0xffff) == FLAT_USER_SS &&
          sc_user_regs[0] == 0x0123456789UL && sc_user_regs[1] == 0x0fedcba987UL &&
          mask_in_cb == 1,
          "rc=%ld,%ld,%ld frame rcx=0x%lx r11=0x%lx rip=0x%lx (want 0x%lx) cs=0x%lx rflags=0x%lx "
          "rsp=0x%lx ss=0x%lx rax=0x%lx rdi=0x%lx mask=%d", rc_cb, rc_ub, rc_ss, f[0], f[1],
          f[2], (unsigned long)sc_user_syscall_ret, f[3], f[4], f[5], f[6], sc_user_regs[0],
          sc_user_regs[1], mask_in_cb);
    check("syscall.from_user_df",
          f[2] && (f[4] & X86_EFLAGS_DF) && (f[1] & X86_EFLAGS_DF) &&
          !(sc_user_regs[2] & X86_EFLAGS_DF),
          "saved rflags=0x%lx r11=0x%lx callback rflags=0x%lx", f[4], f[1], sc_user_regs[2]);
    free_pages(kstack, 1);
    free_pages(ustack, 1);
}

int app_main(const char *cmdline)
{
    (void)cmdline;
    printk("sctest: starting\n");
    test_basic();
    test_update_va_mapping();
    test_mmu_update();
    test_multicall();
    test_iret();
    test_event_after_syscall();
    test_is_up();
    test_is_up_event();
    test_block();
    test_user_syscall();
    printk("sctest: done ok=%u fail=%u\n", n_ok, n_fail);
    /* The only vCPU goes down: Xen powers the domain off. */
    long rc = sc_hypercall3(__HYPERVISOR_vcpu_op, VCPUOP_down, 0, 0);
    printk("sctest: VCPUOP_down returned %ld\n", rc);
    poweroff();
}
