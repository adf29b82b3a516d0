/*
 * traps.c - virtual IDT registration and the exception handler.
 *
 * There is no IDT for a PV guest: HYPERVISOR_set_trap_table gives the
 * hypervisor (vector, entry point) pairs and it bounces exceptions to us
 * (see entry.S for the frame).  Except for page faults claimed by an
 * app's fixup hook, every exception is fatal: dump state, crash domain.
 */
#include "traps.h"
#include "console.h"
#include "events.h"
#include "hypercall.h"

/* Stubs in entry.S */
extern char trap_divide_error[], trap_debug[], trap_nmi[], trap_int3[],
    trap_overflow[], trap_bounds[], trap_invalid_op[],
    trap_device_not_available[], trap_double_fault[],
    trap_coproc_seg_overrun[], trap_invalid_tss[],
    trap_segment_not_present[], trap_stack_segment[],
    trap_general_protection[], trap_page_fault[], trap_spurious[],
    trap_coprocessor_error[], trap_alignment_check[],
    trap_machine_check[], trap_simd_error[];

/*
 * DPL 0 everywhere: nobody may raise these with a software `int`.  The
 * page fault entry masks events (TI_MASK_EVENTS) so an event upcall can't
 * sneak in and overwrite vcpu_info.arch.cr2 before we've read it.
 */
#define TRAP(v, fl, fn) { .vector = (v), .flags = (fl), .cs = FLAT_KERNEL_CS, \
                          .address = (unsigned long)(fn) }
static const struct trap_info trap_table[] = {
    TRAP(0, 0, trap_divide_error),
    TRAP(1, 0, trap_debug),
    TRAP(2, 0, trap_nmi),
    TRAP(3, 0, trap_int3),
    TRAP(4, 0, trap_overflow),
    TRAP(5, 0, trap_bounds),
    TRAP(6, 0, trap_invalid_op),
    TRAP(7, 0, trap_device_not_available),
    TRAP(8, 0, trap_double_fault),
    TRAP(9, 0, trap_coproc_seg_overrun),
    TRAP(10, 0, trap_invalid_tss),
    TRAP(11, 0, trap_segment_not_present),
    TRAP(12, 0, trap_stack_segment),
    TRAP(13, 0, trap_general_protection),
    TRAP(14, TI_MASK_EVENTS, trap_page_fault),
    TRAP(15, 0, trap_spurious),
    TRAP(16, 0, trap_coprocessor_error),
    TRAP(17, 0, trap_alignment_check),
    TRAP(18, 0, trap_machine_check),
    TRAP(19, 0, trap_simd_error),
    { 0, 0, 0, 0 }              /* address 0 terminates */
};

static const char *const trap_names[] = {
    "divide error", "debug", "NMI", "breakpoint", "overflow",
    "bound range exceeded", "invalid opcode", "device not available",
    "double fault", "coprocessor segment overrun", "invalid TSS",
    "segment not present", "stack segment fault", "general protection",
    "page fault", "spurious", "x87 FPU error", "alignment check",
    "machine check", "SIMD FP exception",
};

static pf_fixup_t pf_fixup;
static int in_fatal;

void set_pf_fixup(pf_fixup_t hook)
{
    pf_fixup = hook;
}

void trap_init(void)
{
    long rc = HYPERVISOR_set_trap_table(trap_table);
    if (rc)
        early_printk("pyxen-guest: set_trap_table failed rc=%ld\n", rc);
}

static const char *trap_name(uint64_t vec)
{
    if (vec < ARRAY_SIZE(trap_names))
        return trap_names[vec];
    if (vec == TRAP_VEC_FAILSAFE)
        return "failsafe callback";
    return "unknown";
}

/*
 * Fatal output goes through HYPERVISOR_console_io only: it is synchronous
 * and needs no working event/ring machinery.  (pyxen also echoes it onto
 * the domain console, so writing it to the ring too would duplicate it.)
 */
static void __printf(1, 2) fatal_line(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 1)
        n = sizeof(buf) - 1;
    console_io_write(buf, (size_t)n);
}

void fatal_trap(struct pt_regs *r, unsigned long cr2)
{
    /* Stay masked from here on: nothing else should run. */
    this_vcpu()->evtchn_upcall_mask = 1;
    if (in_fatal++) {
        /* Faulted while reporting a fault: just get out. */
        static const char msg[] = "FATAL: recursive fault, crashing\n";
        console_io_write(msg, sizeof(msg) - 1);
        xen_shutdown(SHUTDOWN_crash);
    }

    /* Let earlier ring output reach the console first, to keep the order. */
    console_flush(200 * NSEC_PER_MSEC);
    fatal_line("FATAL: %s (vector %lu) at rip=0x%016lx cr2=0x%016lx err=0x%lx%s\n",
               trap_name(r->vector), r->vector, r->rip, cr2, r->error_code,
               shared_info_mapped || r->vector != 14 ? "" :
               " (cr2 unknown: shared_info not mapped yet)");
    fatal_line("  rax=0x%016lx rbx=0x%016lx rcx=0x%016lx rdx=0x%016lx\n",
               r->rax, r->rbx, r->rcx, r->rdx);
    fatal_line("  rsi=0x%016lx rdi=0x%016lx rbp=0x%016lx rsp=0x%016lx\n",
               r->rsi, r->rdi, r->rbp, r->rsp);
    fatal_line("  r8 =0x%016lx r9 =0x%016lx r10=0x%016lx r11=0x%016lx\n",
               r->r8, r->r9, r->r10, r->r11);
    fatal_line("  r12=0x%016lx r13=0x%016lx r14=0x%016lx r15=0x%016lx\n",
               r->r12, r->r13, r->r14, r->r15);
    fatal_line("  rip=0x%016lx rflags=0x%016lx cs=0x%04lx ss=0x%04lx\n",
               r->rip, r->rflags, r->cs & 0xffff, r->ss & 0xffff);
    fatal_line("FATAL: crashing domain\n");
    xen_shutdown(SHUTDOWN_crash);
}

/* Called from entry.S for vectors 0-19 and the failsafe callback. */
void do_trap(struct pt_regs *regs)
{
    unsigned long cr2 = 0;

    if (regs->vector == 14) {
        /* Read before anything can fault again and overwrite it. */
        cr2 = READ_ONCE(this_vcpu()->arch.cr2);
        if (pf_fixup && !in_fatal && pf_fixup(regs, cr2))
            return;     /* hook fixed up regs; resume via iret */
    }
    fatal_trap(regs, cr2);
}
