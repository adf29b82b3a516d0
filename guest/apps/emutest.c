/*
 * emutest: the instructions Xen emulates for a PV kernel (which runs at CPL3,
 * so each of them faults into the hypervisor), checked against Xen's
 * behaviour (xen/arch/x86/pv/emul-priv-op.c, emul-inv-op.c, msr.c, cpuid.c).
 * Prints "emutest: <name> OK" / "emutest: <name> FAIL <details>" /
 * "emutest: <name> SKIP <why>" per check, then "emutest: done".
 *
 * A fault the hypervisor injects (#GP, #UD) reaches our own handlers
 * (installed with set_trap_table for vectors 6 and 13), which record the
 * vector and error code and resume at the label after the instruction.
 *
 * Command line: "iopl=N" says the toolstack set the virtual IOPL to N before
 * the domain started (tests/e2e/test_emulation.py runs us both ways).
 */
#include "app.h"

const char app_name[] = "emutest";

#define __HYPERVISOR_physdev_op 33
#define PHYSDEVOP_set_iopl       6
#define XENVER_version           0

#define MSR_APIC_BASE       0x1bUL
#define MSR_IA32_CR_PAT     0x277UL
#define MSR_EFER            0xc0000080UL
#define MSR_GS_BASE         0xc0000101UL
#define MSR_SHADOW_GS_BASE  0xc0000102UL
#define MSR_UNKNOWN         0x12345678UL
#define MSR_PLATFORM_INFO   0xceUL
#define MSR_IA32_FEATURE_CONTROL 0x3aUL
#define MSR_IA32_MISC_ENABLE 0x1a0UL
#define MSR_TSC_AUX         0xc0000103UL
#define MSR_K8_SYSCFG       0xc0010010UL
#define MSR_K8_HWCR         0xc0010015UL
#define MSR_AMD64_DE_CFG    0xc0011029UL
#define XEN_MSR_PAT         0x0000050100070406UL

/* ---- reporting ---- */
static unsigned int n_ok, n_fail;

static void __printf(3, 4) check(const char *name, int ok, const char *fmt, ...)
{
    char details[200];
    va_list ap;

    if (ok) {
        n_ok++;
        printk("emutest: %s OK\n", name);
        return;
    }
    n_fail++;
    va_start(ap, fmt);
    vsnprintf(details, sizeof(details), fmt, ap);
    va_end(ap);
    printk("emutest: %s FAIL %s\n", name, details);
}

/* ---- catching the faults the hypervisor injects ---- */
unsigned long emu_resume;          /* where to continue after a fault (0: fatal) */
static volatile long last_vec = -1;
static volatile unsigned long last_err, last_rip;

void emu_do_trap(struct pt_regs *r);
void emu_do_trap(struct pt_regs *r)
{
    if (!emu_resume)
        fatal_trap(r, 0);
    last_vec = (long)r->vector;
    last_err = r->error_code;
    last_rip = r->rip;
    r->rip = emu_resume;
}

extern char emu_trap_ud[], emu_trap_gp[];
extern char trap_invalid_op[], trap_general_protection[];

asm(".text\n"
    "emu_trap_ud:\n"
    "    popq %rcx\n    popq %r11\n    pushq $0\n    pushq $6\n    jmp emu_common\n"
    "emu_trap_gp:\n"
    "    popq %rcx\n    popq %r11\n    pushq $13\n    jmp emu_common\n"
    "emu_common:\n"
    "    pushq %rax\n pushq %rbx\n pushq %rcx\n pushq %rdx\n pushq %rsi\n pushq %rdi\n"
    "    pushq %rbp\n pushq %r8\n pushq %r9\n pushq %r10\n pushq %r11\n pushq %r12\n"
    "    pushq %r13\n pushq %r14\n pushq %r15\n"
    "    cld\n    movq %rsp, %rdi\n    movq %rsp, %rbx\n    andq $-16, %rsp\n"
    "    call emu_do_trap\n    movq %rbx, %rsp\n"
    "    popq %r15\n popq %r14\n popq %r13\n popq %r12\n popq %r11\n popq %r10\n"
    "    popq %r9\n popq %r8\n popq %rbp\n popq %rdi\n popq %rsi\n popq %rdx\n"
    "    popq %rcx\n popq %rbx\n popq %rax\n"
    "    addq $16, %rsp\n    pushq $0\n"
    "    jmp hypercall_page + 23 * 32\n");

static void install_traps(int ours)
{
    struct trap_info t[3] = {
        { .vector = 6, .flags = 0, .cs = FLAT_KERNEL_CS,
          .address = (unsigned long)(ours ? emu_trap_ud : trap_invalid_op) },
        { .vector = 13, .flags = 0, .cs = FLAT_KERNEL_CS,
          .address = (unsigned long)(ours ? emu_trap_gp : trap_general_protection) },
        { 0, 0, 0, 0 },
    };
    HYPERVISOR_set_trap_table(t);
}

/*
 * Run one instruction (or a short sequence) with "1:" as the place to resume
 * if it faults.  r11 is ours to clobber (the bounce frame's r11 is restored
 * by the handler before it jumps back).
 */
#define ARM() (last_vec = -1)
#define TRY(insn, outs, ins) \
    asm volatile("leaq 1f(%%rip), %%r11\n\tmovq %%r11, emu_resume(%%rip)\n\t" insn "\n1:\n\t" \
                 : outs : ins : "r11", "memory")
#define O(...) __VA_ARGS__
#define I(...) __VA_ARGS__

static int faulted(long vec) { return last_vec == vec; }

/* ---- CPUID ---- */
struct regs4 { uint32_t a, b, c, d; };

static struct regs4 xen_cpuid(uint32_t leaf, uint32_t sub)
{
    struct regs4 r;
    asm volatile("ud2; .ascii \"xen\"; cpuid"
                 : "=a"(r.a), "=b"(r.b), "=c"(r.c), "=d"(r.d) : "a"(leaf), "c"(sub));
    return r;
}

static struct regs4 native_cpuid(uint32_t leaf, uint32_t sub)
{
    struct regs4 r;
    asm volatile("cpuid" : "=a"(r.a), "=b"(r.b), "=c"(r.c), "=d"(r.d) : "a"(leaf), "c"(sub));
    return r;
}

static int is_xen_sig(struct regs4 r)
{
    return r.b == 0x566e6558 && r.c == 0x65584d4d && r.d == 0x4d4d566e;
}

static void test_cpuid(void)
{
    struct regs4 f = xen_cpuid(0x40000000, 0), n, f1, n1, f7;
    long ver = HYPERVISOR_xen_version(XENVER_version, NULL);

    check("cpuid.forced.signature", is_xen_sig(f) && f.a == 0x40000005,
          "eax=%x ebx=%x ecx=%x edx=%x", f.a, f.b, f.c, f.d);
    f = xen_cpuid(0x40000001, 0);
    check("cpuid.forced.version", (long)f.a == ver, "eax=%x xen_version=%lx", f.a, ver);
    f = xen_cpuid(0x40000002, 0);
    check("cpuid.forced.hypercall_leaf", f.a == 1 && f.b == 0x40000000 && (f.c & 1),
          "eax=%x ebx=%x ecx=%x", f.a, f.b, f.c);
    f = xen_cpuid(0x40000003, 0);
    check("cpuid.forced.time_leaf", f.c != 0, "tsc_khz=%u", f.c);
    n = native_cpuid(0x40000000, 0);
    check("cpuid.native.signature", is_xen_sig(n), "eax=%x ebx=%x ecx=%x edx=%x",
          n.a, n.b, n.c, n.d);
    for (uint32_t leaf = 0x40000001; leaf <= 0x40000005; leaf++) {
        f = xen_cpuid(leaf, 0);
        n = native_cpuid(leaf, 0);
        if (f.a != n.a || f.b != n.b || f.c != n.c || f.d != n.d)
            break;
    }
    check("cpuid.native.xen_leaves", f.a == n.a && f.b == n.b && f.c == n.c && f.d == n.d,
          "forced %x/%x/%x/%x native %x/%x/%x/%x", f.a, f.b, f.c, f.d, n.a, n.b, n.c, n.d);
    f1 = xen_cpuid(1, 0);
    n1 = native_cpuid(1, 0);
    check("cpuid.native.leaf1_matches_forced", f1.a == n1.a && f1.c == n1.c && f1.d == n1.d,
          "forced %x/%x/%x native %x/%x/%x", f1.a, f1.c, f1.d, n1.a, n1.c, n1.d);
    /* edx: PSE(3) MTRR(12) PGE(13); ecx: MONITOR(3) VMX(5) PCID(17) X2APIC(21)
     * TSC_DEADLINE(24) XSAVE(26), HYPERVISOR(31) set */
    check("cpuid.pv_masked_leaf1",
          !(f1.d & ((1u << 3) | (1u << 12) | (1u << 13))) &&
          !(f1.c & ((1u << 3) | (1u << 5) | (1u << 17) | (1u << 21) | (1u << 24) | (1u << 26))) &&
          (f1.c >> 31) == 1, "ecx=%x edx=%x", f1.c, f1.d);
    f7 = xen_cpuid(7, 0);
    /* ebx: FSGSBASE(0) SMEP(7) INVPCID(10) SMAP(20); ecx: UMIP(2) PKU(3) LA57(16) */
    check("cpuid.pv_masked_leaf7",
          !(f7.b & ((1u << 0) | (1u << 7) | (1u << 10) | (1u << 20))) &&
          !(f7.c & ((1u << 2) | (1u << 3) | (1u << 16))), "ebx=%x ecx=%x", f7.b, f7.c);
    f = xen_cpuid(0x80000001, 0);
    check("cpuid.svm_hidden", !(f.c & (1u << 2)), "ecx=%x", f.c);
}

/* ---- MSRs ---- */
static unsigned long rdmsr_try(unsigned long msr)
{
    uint32_t lo = 0, hi = 0;
    ARM();
    TRY("rdmsr", O("=a"(lo), "=d"(hi)), I("c"(msr)));
    return ((unsigned long)hi << 32) | lo;
}

static void wrmsr_try(unsigned long msr, unsigned long val)
{
    ARM();
    TRY("wrmsr", O(), I("c"(msr), "a"((uint32_t)val), "d"((uint32_t)(val >> 32))));
}

static int is_amd(void)
{
    struct regs4 r = xen_cpuid(0, 0);
    return r.b == 0x68747541 && r.d == 0x69746e65 && r.c == 0x444d4163;  /* AuthenticAMD */
}

static unsigned long gs_probe_value = 0x5a5a12345678a5a5UL;

static void test_msr(void)
{
    unsigned long v, old_gs, got;

    v = rdmsr_try(MSR_IA32_CR_PAT);
    check("rdmsr.pat", last_vec == -1 && v == XEN_MSR_PAT, "vec=%ld val=%lx", last_vec, v);
    v = rdmsr_try(MSR_EFER);
    check("rdmsr.efer", last_vec == -1 && (v & 0xd01) == 0xd01 && !(v & (1UL << 12)),
          "vec=%ld val=%lx", last_vec, v);
    v = rdmsr_try(MSR_APIC_BASE);
    check("rdmsr.apic_base", last_vec == -1 && v == 0xfee00900UL, "vec=%ld val=%lx", last_vec, v);
    v = rdmsr_try(MSR_UNKNOWN);
    check("rdmsr.unknown_gp", faulted(13) && last_err == 0, "vec=%ld err=%lx", last_vec, last_err);
    wrmsr_try(MSR_UNKNOWN, 1);
    check("wrmsr.unknown_gp", faulted(13) && last_err == 0, "vec=%ld err=%lx", last_vec, last_err);
    v = rdmsr_try(MSR_EFER);
    wrmsr_try(MSR_EFER, v);
    check("wrmsr.efer_same_value", last_vec == -1, "vec=%ld", last_vec);
    wrmsr_try(MSR_EFER, v & ~(1UL << 11));
    check("wrmsr.efer_change_gp", faulted(13), "vec=%ld", last_vec);
    wrmsr_try(MSR_IA32_CR_PAT, 0);
    check("wrmsr.pat_gp", faulted(13), "vec=%ld", last_vec);

    v = rdmsr_try(MSR_PLATFORM_INFO);
    check("rdmsr.platform_info", last_vec == -1 && v == 0x80000000UL, "vec=%ld val=%lx", last_vec, v);
    /* TSC_AUX exists for the guest only if its CPUID shows RDTSCP or RDPID */
    if ((xen_cpuid(0x80000001, 0).d >> 27 & 1) || (xen_cpuid(7, 0).c >> 22 & 1)) {
        wrmsr_try(MSR_TSC_AUX, 0x2a);
        v = rdmsr_try(MSR_TSC_AUX);
        check("wrmsr.tsc_aux", last_vec == -1 && v == 0x2a, "vec=%ld val=%lx", last_vec, v);
        wrmsr_try(MSR_TSC_AUX, 0);
    } else {
        wrmsr_try(MSR_TSC_AUX, 0x2a);
        check("wrmsr.tsc_aux", faulted(13), "no RDTSCP/RDPID in CPUID, vec=%ld", last_vec);
    }
    if (is_amd()) {
        v = rdmsr_try(MSR_K8_HWCR);
        check("rdmsr.amd_hwcr", last_vec == -1 && v == 0, "vec=%ld val=%lx", last_vec, v);
        v = rdmsr_try(MSR_AMD64_DE_CFG);
        check("rdmsr.amd_de_cfg", last_vec == -1 && v == 2, "vec=%ld val=%lx", last_vec, v);
        rdmsr_try(MSR_K8_SYSCFG);
        check("rdmsr.amd_syscfg_domu_gp", faulted(13), "vec=%ld", last_vec);
    } else {
        v = rdmsr_try(MSR_IA32_FEATURE_CONTROL);
        check("rdmsr.intel_feature_control", last_vec == -1 && v == 1, "vec=%ld val=%lx", last_vec, v);
        v = rdmsr_try(MSR_IA32_MISC_ENABLE);
        check("rdmsr.intel_misc_enable", last_vec == -1 && (v & (1UL << 11)) && (v & (1UL << 12)),
              "vec=%ld val=%lx", last_vec, v);
    }

    old_gs = rdmsr_try(MSR_GS_BASE);
    wrmsr_try(MSR_GS_BASE, (unsigned long)&gs_probe_value);
    asm volatile("movq %%gs:0, %0" : "=r"(got));
    v = rdmsr_try(MSR_GS_BASE);
    wrmsr_try(MSR_GS_BASE, old_gs);
    check("wrmsr.gs_base", got == gs_probe_value && v == (unsigned long)&gs_probe_value,
          "gs:0=%lx rdmsr=%lx", got, v);
    wrmsr_try(MSR_GS_BASE, 0x0000900000000000UL);
    check("wrmsr.gs_base_noncanonical_gp", faulted(13), "vec=%ld", last_vec);
    wrmsr_try(MSR_SHADOW_GS_BASE, 0x1234000);
    v = rdmsr_try(MSR_SHADOW_GS_BASE);
    check("wrmsr.shadow_gs_base", v == 0x1234000, "val=%lx", v);
    wrmsr_try(MSR_SHADOW_GS_BASE, 0);
}

/* ---- control and debug registers ---- */
static void test_crdr(void)
{
    unsigned long v = 0, v2 = 0;

    ARM();
    TRY("movq %%cr3, %0", O("=r"(v)), I());
    check("mov_from_cr3", last_vec == -1 && v == virt_to_maddr((void *)start_info->pt_base),
          "vec=%ld cr3=%lx pt_base maddr=%lx", last_vec, v,
          (unsigned long)virt_to_maddr((void *)start_info->pt_base));
    ARM();
    TRY("movq %0, %%cr3", O(), I("r"(v)));
    check("mov_to_cr3_same", last_vec == -1, "vec=%ld", last_vec);
    ARM();
    TRY("movq %0, %%cr3", O(), I("r"(virt_to_maddr(&gs_probe_value) & ~0xfffUL)));
    check("mov_to_cr3_writable_page_gp", faulted(13), "vec=%ld", last_vec);

    ARM();
    TRY("movq %%cr4, %0", O("=r"(v)), I());
    check("mov_from_cr4", last_vec == -1 && v == 0x620, "vec=%ld cr4=%lx", last_vec, v);

    HYPERVISOR_fpu_taskswitch(1);
    ARM();
    TRY("movq %%cr0, %0", O("=r"(v)), I());
    ARM();
    TRY("clts", O(), I());
    TRY("movq %%cr0, %0", O("=r"(v2)), I());
    check("cr0_ts_and_clts", (v & 8) && !(v2 & 8) && last_vec == -1,
          "cr0 before=%lx after clts=%lx vec=%ld", v, v2, last_vec);
    ARM();
    TRY("movq %0, %%cr0", O(), I("r"(v2 & ~1UL)));  /* clearing PE: refused */
    check("mov_to_cr0_other_bits_gp", faulted(13), "vec=%ld", last_vec);
    ARM();
    TRY("movq %0, %%cr0", O(), I("r"(v2 | 8)));
    TRY("movq %%cr0, %0", O("=r"(v)), I());
    HYPERVISOR_fpu_taskswitch(0);
    check("mov_to_cr0_ts", (v & 8) && last_vec == -1, "cr0=%lx vec=%ld", v, last_vec);

    ARM();
    TRY("movq %1, %%cr2\n\tmovq %%cr2, %0", O("=r"(v)), I("r"(0xabcdef000UL)));
    check("mov_cr2", v == 0xabcdef000UL && last_vec == -1, "cr2=%lx vec=%ld", v, last_vec);

    ARM();
    TRY("movq %1, %%dr0\n\tmovq %%dr0, %0", O("=r"(v)), I("r"(0x400000UL)));
    check("mov_dr0", v == 0x400000UL && last_vec == -1, "dr0=%lx vec=%ld", v, last_vec);
    ARM();
    TRY("movq %0, %%dr0", O(), I("r"(0xffff800000001000UL)));
    check("mov_dr0_xen_range_gp", faulted(13), "vec=%ld", last_vec);
    ARM();
    TRY("movq %%dr7, %0", O("=r"(v)), I());
    check("mov_from_dr7", v == 0x400 && last_vec == -1, "dr7=%lx vec=%ld", v, last_vec);
    ARM();
    TRY("movq %%dr6, %0", O("=r"(v)), I());
    check("mov_from_dr6", v == 0xffff0ff0UL && last_vec == -1, "dr6=%lx vec=%ld", v, last_vec);
}

/* ---- misc ---- */
static void test_misc(void)
{
    ARM();
    TRY("wbinvd", O(), I());
    check("wbinvd_nop", last_vec == -1, "vec=%ld", last_vec);
    ARM();
    TRY("hlt", O(), I());
    check("hlt_gp", faulted(13), "vec=%ld", last_vec);
    ARM();
    TRY("xsetbv", O(), I("c"(0), "d"(0), "a"(3)));
    check("xsetbv_ud", faulted(6), "vec=%ld", last_vec);
    ARM();
    TRY("ud2", O(), I());
    check("plain_ud2_ud", faulted(6), "vec=%ld", last_vec);
}

/* ---- port I/O ---- */
static uint8_t inb_try(uint16_t port)
{
    uint8_t v = 0;
    ARM();
    TRY("inb %%dx, %%al", O("=a"(v)), I("d"(port)));
    return v;
}

static uint32_t inl_try(uint16_t port)
{
    uint32_t v = 0;
    ARM();
    TRY("inl %%dx, %%eax", O("=a"(v)), I("d"(port)));
    return v;
}

static void outb_try(uint16_t port, uint8_t v)
{
    ARM();
    TRY("outb %%al, %%dx", O(), I("a"(v), "d"(port)));
}

static void outl_try(uint16_t port, uint32_t v)
{
    ARM();
    TRY("outl %%eax, %%dx", O(), I("a"(v), "d"(port)));
}

static void test_io_denied(void)
{
    uint8_t mask_before = this_vcpu()->evtchn_upcall_mask;

    inb_try(0x61);
    check("io.in_without_iopl_gp", faulted(13) && last_err == 0, "vec=%ld err=%lx", last_vec, last_err);
    {
        /* the immediate form, which Linux's PIT calibration uses (and the CPL0 fast path serves) */
        unsigned long rax = 0x1122334455667788UL;
        ARM();
        TRY("inb $0x42, %%al", O("+a"(rax)), I());
        check("io.in_imm8_without_iopl_gp", faulted(13) && last_err == 0 && rax == 0x1122334455667788UL,
              "vec=%ld err=%lx rax=%lx", last_vec, last_err, rax);
    }
    outb_try(0x80, 0);
    check("io.out_without_iopl_gp", faulted(13), "vec=%ld", last_vec);
    ARM();
    TRY("cli", O(), I());
    check("cli_without_iopl_gp", faulted(13), "vec=%ld", last_vec);
    ARM();
    TRY("sti", O(), I());
    check("sti_without_iopl_gp", faulted(13) && this_vcpu()->evtchn_upcall_mask == mask_before,
          "vec=%ld", last_vec);
}

static void test_io_allowed(void)
{
    uint8_t b, mask_before;
    uint32_t l;
    uint8_t buf[4] = { 0, 0, 0, 0 };
    unsigned long cnt = 4;
    void *dst = buf;

    b = inb_try(0x61);
    check("io.in_speaker_port", last_vec == -1 && b == 0xff, "vec=%ld val=%x", last_vec, b);
    {
        /* `in $imm8,%al` from the PIT (0x40-0x43) and speaker (0x61) ports: a domU has no vPIT,
         * so Xen's pv_pit_handler gives all ones; only AL changes, RIP moves past the 2 bytes */
        unsigned long rax = 0x1122334455667700UL, r2 = 0, r3 = 0, r4 = 0;
        ARM();
        TRY("inb $0x42, %%al", O("+a"(rax)), I());
        check("io.in_imm8_pit_all_ones", last_vec == -1 && rax == 0x11223344556677ffUL,
              "vec=%ld rax=%lx", last_vec, rax);
        ARM();
        TRY("inb $0x61, %%al\n\tmovq %%rax, %%rcx\n\tinb $0x40, %%al\n\tmovq %%rax, %%rdx\n\t"
            "movb $0, %%al\n\tinb $0x43, %%al", O("=a"(r2), "=c"(r3), "=d"(r4)), I("a"(0UL)));
        check("io.in_imm8_speaker_and_pit", last_vec == -1 && (r3 & 0xff) == 0xff && (r4 & 0xff) == 0xff
              && (r2 & 0xff) == 0xff, "vec=%ld %lx %lx %lx", last_vec, r2, r3, r4);
        /* a run of reads, as Linux's pit_verify_msb makes them (the fast path takes the run
         * at once): each reads 0xff, execution continues after the last one */
        rax = 0x1122334455667700UL;
        r3 = 0;
        ARM();
        TRY("inb $0x42, %%al\n\tinb $0x42, %%al\n\tinb $0x42, %%al\n\tmovq $7, %%rcx",
            O("+a"(rax), "+c"(r3)), I());
        check("io.in_imm8_run_of_pit_reads", last_vec == -1 && rax == 0x11223344556677ffUL && r3 == 7,
              "vec=%ld rax=%lx rcx=%lx", last_vec, rax, r3);
        rax = 0x1122334455667700UL;
        ARM();
        TRY("inb $0x71, %%al", O("+a"(rax)), I());
        check("io.in_imm8_other_port_all_ones", last_vec == -1 && rax == 0x11223344556677ffUL,
              "vec=%ld rax=%lx", last_vec, rax);
    }
    outb_try(0x80, 0x55);
    check("io.out_dropped", last_vec == -1, "vec=%ld", last_vec);
    outl_try(0xcf8, 0x80000010);
    l = inl_try(0xcf8);
    check("io.pci_cf8_latch", last_vec == -1 && l == 0x80000010, "vec=%ld val=%x", last_vec, l);
    l = inl_try(0xcfc);
    check("io.pci_cfc_all_ones", last_vec == -1 && l == 0xffffffff, "vec=%ld val=%x", last_vec, l);
    outb_try(0x70, 0x8a);
    b = inb_try(0x70);
    check("io.cmos_index_latch", last_vec == -1 && b == 0x0a, "vec=%ld val=%x", last_vec, b);
    ARM();
    TRY("rep insb", O("+D"(dst), "+c"(cnt)), I("d"(0x61)));
    check("io.rep_insb", last_vec == -1 && cnt == 0 && buf[0] == 0xff && buf[3] == 0xff &&
          dst == buf + 4, "vec=%ld cnt=%lu buf=%x%x%x%x", last_vec, cnt, buf[0], buf[1], buf[2], buf[3]);

    mask_before = this_vcpu()->evtchn_upcall_mask;
    ARM();
    TRY("cli", O(), I());
    check("cli_with_iopl_nop", last_vec == -1 && this_vcpu()->evtchn_upcall_mask == mask_before,
          "vec=%ld mask=%u", last_vec, this_vcpu()->evtchn_upcall_mask);
    ARM();
    TRY("sti", O(), I());
    check("sti_with_iopl_nop", last_vec == -1 && this_vcpu()->evtchn_upcall_mask == mask_before,
          "vec=%ld mask=%u", last_vec, this_vcpu()->evtchn_upcall_mask);
}

static void test_io(const char *cmdline)
{
    unsigned long preset = cmdline_get_ulong(cmdline, "iopl", 0);
    struct { uint32_t iopl; } op = { 1 };
    long rc;

    if (preset >= 1) {
        test_io_allowed();
        return;
    }
    test_io_denied();
    rc = _hypercall2(long, __HYPERVISOR_physdev_op, PHYSDEVOP_set_iopl, &op);
    if (rc) {
        printk("emutest: io.set_iopl SKIP PHYSDEVOP_set_iopl returned %ld\n", rc);
        return;
    }
    test_io_allowed();
    op.iopl = 0;
    _hypercall2(long, __HYPERVISOR_physdev_op, PHYSDEVOP_set_iopl, &op);
    inb_try(0x61);
    check("io.iopl0_again_gp", faulted(13), "vec=%ld", last_vec);
}

/* ---- the M2P at Xen's fixed address ---- */
#define XEN_M2P_FIXED 0xffff800000000000UL

static void test_m2p(void)
{
    unsigned long mfn = virt_to_mfn(&gs_probe_value);
    unsigned long pfn = virt_to_pfn(&gs_probe_value);
    const volatile unsigned long *fixed = (const volatile unsigned long *)XEN_M2P_FIXED;
    const volatile uint32_t *fixed32 = (const volatile uint32_t *)XEN_M2P_FIXED;
    unsigned long v;
    uint32_t v32;

    ARM();
    emu_resume = 0;  /* a #PF here is fatal: it goes to the kernel's handler anyway */
    v = fixed[mfn];
    check("m2p_fixed.load64", v == pfn, "M2P[%lx]=%lx want %lx", mfn, v, pfn);
    v32 = fixed32[2 * mfn];
    check("m2p_fixed.load32", v32 == (uint32_t)pfn, "got %x want %lx", v32, pfn);
    v = mfn_to_pfn(mfn);
    check("m2p_fixed.matches_machphys_mapping", v == fixed[mfn], "%lx vs %lx", v, fixed[mfn]);
}

int app_main(const char *cmdline)
{
    printk("emutest: start\n");
    install_traps(1);
    test_cpuid();
    test_msr();
    test_crdr();
    test_misc();
    test_io(cmdline);
    emu_resume = 0;
    test_m2p();
    install_traps(0);
    printk("emutest: done ok=%u fail=%u\n", n_ok, n_fail);
    return 0;
}
