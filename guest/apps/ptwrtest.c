/*
 * ptwrtest: writable page tables and exceptions as Xen reports them.
 *
 * With VMASST_TYPE_writable_pagetables the kernel writes its own L1
 * entries through their read-only mappings; the hypervisor emulates each
 * write after validating it as mmu_update would (Xen's ptwr,
 * xen/arch/x86/pv/ro-page-fault.c).  Checked here, each as one
 * "ptwrtest: <name> OK|FAIL" line:
 *   - plain mov (8 bytes), xchg, lock and, lock btr, lock cmpxchg (hit and
 *     miss), 4-byte low and high halves: each takes effect at once (a read
 *     through the mapping sees the new frame; pyxen applies the entry before
 *     the guest runs again, so no flush is needed here, which real Xen
 *     would want);
 *   - clearing present makes the next access fault (#PF, cr2 = the page);
 *   - an entry mapping a frame we do not own, and a writable mapping of a
 *     page table, are refused: the original #PF reaches our handler with
 *     cr2 = the entry's address, and the entry is unchanged;
 *   - L2 and L4 writes are not emulated (#PF);
 *   - the #PF error code has U clear in guest kernel mode (0x3 for a write
 *     to a read-only page, 0x0 for a read of a not-present one);
 *   - `int $n` with no gate or a DPL 0 gate gives #GP with error code
 *     (n << 3) | 2 at the int; with a DPL 3 gate it reaches the handler.
 * The writable_pagetables assist is enabled with HYPERVISOR_vm_assist; the
 * rc is printed (the e2e test may have set the bit from the host where the
 * hypercall still refuses it).
 */
#include "app.h"

const char app_name[] = "ptwrtest";

#ifndef VMASST_TYPE_writable_pagetables
#define VMASST_TYPE_writable_pagetables 2       /* xen.h */
#endif

static unsigned int n_ok, n_fail;

static void __printf(3, 4) check(const char *name, int ok, const char *fmt, ...)
{
    char buf[160];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    printk("ptwrtest: %s %s %s\n", name, ok ? "OK" : "FAIL", buf);
    if (ok)
        n_ok++;
    else
        n_fail++;
}

/*
 * Probes: one faulting instruction each, with a recovery point the #PF hook
 * resumes at.  Return 0 when the access completed, 1 when it faulted.
 */
extern char pt_wr_insn[], pt_wr_rec[], pt_rd_insn[], pt_rd_rec[], pt_w32_insn[];
int pt_write32(volatile uint32_t *p, uint32_t v);
int pt_write(volatile uint64_t *p, uint64_t v);
uint64_t pt_read(const volatile uint64_t *p, int *faulted);
asm(".pushsection .text\n"
    ".globl pt_write\n"
    "pt_write:\n"
    "    xorl %eax, %eax\n"
    ".globl pt_wr_insn\n"
    "pt_wr_insn:\n"
    "    movq %rsi, (%rdi)\n"
    "    ret\n"
    ".globl pt_wr_rec\n"
    "pt_wr_rec:\n"
    "    movl $1, %eax\n"
    "    ret\n"
    ".globl pt_write32\n"
    "pt_write32:\n"
    "    xorl %eax, %eax\n"
    ".globl pt_w32_insn\n"
    "pt_w32_insn:\n"
    "    movl %esi, (%rdi)\n"
    "    ret\n"
    ".globl pt_read\n"
    "pt_read:\n"
    "    movl $0, (%rsi)\n"
    ".globl pt_rd_insn\n"
    "pt_rd_insn:\n"
    "    movq (%rdi), %rax\n"
    "    ret\n"
    ".globl pt_rd_rec\n"
    "pt_rd_rec:\n"
    "    movl $1, (%rsi)\n"
    "    xorl %eax, %eax\n"
    "    ret\n"
    ".popsection\n");

static volatile unsigned long last_cr2, last_err;
static volatile int n_faults;

static int pf_hook(struct pt_regs *regs, unsigned long cr2)
{
    if (regs->rip == (unsigned long)pt_w32_insn)
        regs->rip = (unsigned long)pt_wr_rec;
    else if (regs->rip == (unsigned long)pt_wr_insn)
        regs->rip = (unsigned long)pt_wr_rec;
    else if (regs->rip == (unsigned long)pt_rd_insn)
        regs->rip = (unsigned long)pt_rd_rec;
    else
        return 0;
    last_cr2 = cr2;
    last_err = regs->error_code;
    n_faults++;
    return 1;
}

/* #GP and software-interrupt handlers of our own (trap table entries). */
extern char pt_gp_handler[], pt_int_handler[], trap_general_protection[], trap_int3[];
volatile uint64_t pt_gp_err, pt_gp_rip, pt_gp_count, pt_int_count;
asm(".pushsection .text\n"
    ".globl pt_gp_handler\n"
    "pt_gp_handler:\n"                  /* RCX, R11, ERR, RIP, CS, RFLAGS, RSP, SS */
    "    pushq %rax\n"
    "    movq 24(%rsp), %rax\n"
    "    movq %rax, pt_gp_err(%rip)\n"
    "    movq 32(%rsp), %rax\n"
    "    movq %rax, pt_gp_rip(%rip)\n"
    "    addq $2, 32(%rsp)\n"           /* resume after the 2-byte int */
    "    incq pt_gp_count(%rip)\n"
    "    popq %rax\n"
    "    popq %rcx\n"
    "    popq %r11\n"
    "    addq $8, %rsp\n"
    "    pushq $0\n"
    "    jmp hypercall_page + 23 * 32\n"
    ".globl pt_int_handler\n"
    "pt_int_handler:\n"                 /* RCX, R11, RIP, CS, RFLAGS, RSP, SS */
    "    incq pt_int_count(%rip)\n"
    "    popq %rcx\n"
    "    popq %r11\n"
    "    pushq $0\n"
    "    jmp hypercall_page + 23 * 32\n"
    ".popsection\n");

#define FRAME(e) ((e) & PTE_ADDR_MASK)
#define MAGIC_P 0x1111222233334444UL
#define MAGIC_Q 0x5555666677778888UL

static volatile uint64_t *pte_rw(const uint64_t *p) { return (volatile uint64_t *)p; }

static void test_ptwr(void)
{
    volatile uint64_t *P = alloc_page(), *Q = alloc_page();
    uint64_t ma, pmfn, qmfn, orig, v;
    volatile uint64_t *pte;
    int faulted;

    if (!P || !Q || !mm_lookup_pte((unsigned long)P, &ma)) {
        check("setup", 0, "no scratch pages");
        return;
    }
    pte = pte_rw(mm_lookup_pte((unsigned long)P, &ma));
    P[0] = MAGIC_P;
    Q[0] = MAGIC_Q;
    pmfn = virt_to_mfn((void *)P);
    qmfn = virt_to_mfn((void *)Q);
    orig = *pte;
    check("setup", FRAME(orig) == pmfn << PAGE_SHIFT, "pte=0x%lx", (unsigned long)orig);

    /* plain 8-byte mov */
    n_faults = 0;
    faulted = pt_write(pte, (qmfn << PAGE_SHIFT) | PTE_KERNEL_RW);
    v = pt_read(P, &faulted);
    check("mov", !faulted && n_faults == 0 && v == MAGIC_Q,
          "read 0x%lx faults=%d pte=0x%lx", (unsigned long)v, n_faults, (unsigned long)*pte);

    /* xchg back to P, returning the old entry */
    v = (pmfn << PAGE_SHIFT) | PTE_KERNEL_RW;
    asm volatile("xchgq %0, %1" : "+r"(v), "+m"(*pte) :: "memory");
    check("xchg", FRAME(v) == qmfn << PAGE_SHIFT && P[0] == MAGIC_P,
          "old=0x%lx read=0x%lx", (unsigned long)v, (unsigned long)P[0]);

    /* lock and: clear RW (ptep_set_wrprotect); reads work, writes fault */
    asm volatile("lock andb $0xfd, %0" : "+m"(*(volatile uint8_t *)pte) :: "memory");
    n_faults = 0;
    faulted = pt_write(P, MAGIC_Q);
    check("lock_and", !(*pte & _PAGE_RW) && faulted && last_cr2 == (unsigned long)P &&
          last_err == 0x3 && P[0] == MAGIC_P,
          "pte=0x%lx faulted=%d cr2=0x%lx err=0x%lx", (unsigned long)*pte, faulted,
          (unsigned long)last_cr2, (unsigned long)last_err);
    check("pf_user_bit_kernel_write", faulted && !(last_err & 4), "err=0x%lx",
          (unsigned long)last_err);

    /* lock bts: RW back on */
    asm volatile("lock btsq $1, %0" : "+m"(*pte) :: "memory");
    faulted = pt_write(P, MAGIC_P);
    check("lock_bts", (*pte & _PAGE_RW) && !faulted, "pte=0x%lx", (unsigned long)*pte);

    /* lock btr: test_and_clear_young */
    {
        unsigned char was;
        asm volatile("lock btrq %2, %0\n\tsetc %1" : "+m"(*pte), "=qm"(was)
                     : "Ir"(5L) : "memory", "cc");
        check("lock_btr", was == 1 && !(*pte & _PAGE_ACCESSED), "cf=%u pte=0x%lx", was,
              (unsigned long)*pte);
    }

    /* cmpxchg: a hit swaps to Q, a miss changes nothing and loads rax */
    {
        uint64_t expect = *pte, want = (qmfn << PAGE_SHIFT) | PTE_KERNEL_RW;
        unsigned char ok;
        asm volatile("lock cmpxchgq %3, %1\n\tsetz %2"
                     : "+a"(expect), "+m"(*pte), "=qm"(ok) : "r"(want) : "memory", "cc");
        check("cmpxchg_hit", ok && P[0] == MAGIC_Q, "zf=%u read=0x%lx", ok, (unsigned long)P[0]);
        expect = 0x1234000;     /* wrong */
        asm volatile("lock cmpxchgq %3, %1\n\tsetz %2"
                     : "+a"(expect), "+m"(*pte), "=qm"(ok) : "r"(0UL) : "memory", "cc");
        check("cmpxchg_miss", !ok && FRAME(expect) == qmfn << PAGE_SHIFT && P[0] == MAGIC_Q,
              "zf=%u rax=0x%lx", ok, (unsigned long)expect);
    }

    /* 4-byte halves: low half back to P, then NX in the high half and out again */
    {
        volatile uint32_t *half = (volatile uint32_t *)pte;
        uint32_t lo = (uint32_t)((pmfn << PAGE_SHIFT) | PTE_KERNEL_RW);
        asm volatile("movl %1, %0" : "=m"(half[0]) : "r"(lo) : "memory");
        check("mov32_low", P[0] == MAGIC_P && (uint32_t)*pte == lo, "pte=0x%lx",
              (unsigned long)*pte);
        uint32_t hi = (uint32_t)(*pte >> 32);   /* frame bits 32+ (MFNs may be above 4 GiB) */
        asm volatile("movl %1, %0" : "=m"(half[1]) : "r"(hi | 0x80000000U) : "memory");
        check("mov32_high", (*pte >> 63) == 1 && (uint32_t)*pte == lo && P[0] == MAGIC_P,
              "pte=0x%lx", (unsigned long)*pte);
        asm volatile("movl %1, %0" : "=m"(half[1]) : "r"(hi) : "memory");
        check("mov32_high_clear", (*pte >> 32) == hi && P[0] == MAGIC_P, "pte=0x%lx",
              (unsigned long)*pte);
        /* a high half that makes the entry map a frame we do not own: refused */
        n_faults = 0;
        pt_write32(&half[1], hi + 0x100U);
        check("mov32_high_refused", n_faults == 1 && last_cr2 == (unsigned long)&half[1] &&
              (*pte >> 32) == hi, "faults=%d cr2=0x%lx pte=0x%lx", n_faults,
              (unsigned long)last_cr2, (unsigned long)*pte);
    }

    /* clearing present: the next access faults, with U clear in kernel mode */
    faulted = pt_write(pte, 0);
    n_faults = 0;
    v = pt_read(P, &faulted);
    check("clear_present", !faulted ? 0 : last_cr2 == (unsigned long)P && last_err == 0,
          "faulted=%d cr2=0x%lx err=0x%lx", faulted, (unsigned long)last_cr2,
          (unsigned long)last_err);
    faulted = pt_write(pte, orig);
    check("restore", !faulted && P[0] == MAGIC_P, "pte=0x%lx", (unsigned long)*pte);

    /* refused: a frame we do not own */
    {
        unsigned long foreign = start_info->nr_pages + 0x100000UL + 1000;
        faulted = pt_write(pte, (foreign << PAGE_SHIFT) | PTE_KERNEL_RW);
        check("refuse_foreign", faulted && last_cr2 == (unsigned long)pte && last_err == 0x3 &&
              *pte == orig && P[0] == MAGIC_P, "faulted=%d cr2=0x%lx err=0x%lx pte=0x%lx",
              faulted, (unsigned long)last_cr2, (unsigned long)last_err, (unsigned long)*pte);
    }
    /* refused: a writable mapping of a page table (our own L1) */
    {
        uint64_t l1mfn = ma >> PAGE_SHIFT;
        faulted = pt_write(pte, (l1mfn << PAGE_SHIFT) | PTE_KERNEL_RW);
        check("refuse_writable_pt", faulted && last_cr2 == (unsigned long)pte && *pte == orig,
              "faulted=%d cr2=0x%lx pte=0x%lx", faulted, (unsigned long)last_cr2,
              (unsigned long)*pte);
        /* ...but a read-only one is fine */
        faulted = pt_write(pte, (l1mfn << PAGE_SHIFT) | PTE_KERNEL_RO);
        v = P[0];               /* P now shows the L1 itself: its entry 0 */
        check("map_pt_readonly",
              !faulted && v == *(volatile uint64_t *)((unsigned long)pte & ~0xFFFUL),
              "faulted=%d read=0x%lx", faulted, (unsigned long)v);
        faulted = pt_write(pte, orig);
        check("restore2", !faulted && P[0] == MAGIC_P, "pte=0x%lx", (unsigned long)*pte);
    }

    /* L2 and L4 entries are not writable this way: #PF to us */
    {
        uint64_t *l4 = (uint64_t *)start_info->pt_base;
        unsigned long va = (unsigned long)P;
        uint64_t *l3 = mfn_to_virt(FRAME(l4[(va >> 39) & 511]) >> PAGE_SHIFT);
        uint64_t *l2 = mfn_to_virt(FRAME(l3[(va >> 30) & 511]) >> PAGE_SHIFT);
        volatile uint64_t *l2e = &l2[(va >> 21) & 511], *l4e = &l4[(va >> 39) & 511];
        faulted = pt_write(l2e, *l2e);
        check("l2_not_emulated", faulted && last_cr2 == (unsigned long)l2e && last_err == 0x3,
              "faulted=%d cr2=0x%lx err=0x%lx", faulted, (unsigned long)last_cr2,
              (unsigned long)last_err);
        faulted = pt_write(l4e, *l4e);
        check("l4_not_emulated", faulted && last_cr2 == (unsigned long)l4e && last_err == 0x3,
              "faulted=%d cr2=0x%lx err=0x%lx", faulted, (unsigned long)last_cr2,
              (unsigned long)last_err);
    }
    free_pages((void *)Q, 1);
    free_pages((void *)P, 1);
}

static void test_softint(void)
{
    static const struct trap_info mine[] = {
        { .vector = 13, .flags = 0, .cs = FLAT_KERNEL_CS, .address = (unsigned long)pt_gp_handler },
        { .vector = 0x41, .flags = 3, .cs = FLAT_KERNEL_CS, .address = (unsigned long)pt_int_handler },
        { .vector = 0x42, .flags = 0, .cs = FLAT_KERNEL_CS, .address = (unsigned long)pt_int_handler },
        { .vector = 0x80, .flags = 0, .cs = FLAT_KERNEL_CS, .address = (unsigned long)pt_int_handler },
        { .vector = 3, .flags = 0, .cs = FLAT_KERNEL_CS, .address = (unsigned long)pt_int_handler },
        { 0, 0, 0, 0 },
    };
    static const struct trap_info restore[] = {
        { .vector = 13, .flags = 0, .cs = FLAT_KERNEL_CS,
          .address = (unsigned long)trap_general_protection },
        { .vector = 3, .flags = 0, .cs = FLAT_KERNEL_CS, .address = (unsigned long)trap_int3 },
        { 0, 0, 0, 0 },
    };
    extern char pt_int43[], pt_int42[];
    long rc = HYPERVISOR_set_trap_table(mine);

    if (rc) {
        check("softint_setup", 0, "set_trap_table rc=%ld", rc);
        return;
    }
    pt_gp_count = pt_int_count = 0;
    asm volatile(".globl pt_int43\npt_int43: int $0x43" ::: "memory");
    check("int_no_gate_gp", pt_gp_count == 1 && pt_gp_err == ((0x43 << 3) | 2) &&
          pt_gp_rip == (unsigned long)pt_int43 && pt_int_count == 0,
          "gp=%lu err=0x%lx rip=0x%lx", (unsigned long)pt_gp_count, (unsigned long)pt_gp_err,
          (unsigned long)pt_gp_rip);
    asm volatile(".globl pt_int42\npt_int42: int $0x42" ::: "memory");
    check("int_dpl0_gp", pt_gp_count == 2 && pt_gp_err == ((0x42 << 3) | 2) &&
          pt_gp_rip == (unsigned long)pt_int42 && pt_int_count == 0,
          "gp=%lu err=0x%lx", (unsigned long)pt_gp_count, (unsigned long)pt_gp_err);
    asm volatile("int $0x41" ::: "memory");
    check("int_dpl3_delivered", pt_int_count == 1 && pt_gp_count == 2, "int=%lu gp=%lu",
          (unsigned long)pt_int_count, (unsigned long)pt_gp_count);
    /* Xen's int $0x80 gate: delivered whatever DPL the guest gave it */
    asm volatile("int $0x80" ::: "memory");
    check("int80_delivered", pt_int_count == 2 && pt_gp_count == 2, "int=%lu gp=%lu",
          (unsigned long)pt_int_count, (unsigned long)pt_gp_count);
    /* vectors 3 and 4 are DPL 3 in Xen's IDT: int3 and int $3 are #BP traps */
    asm volatile("int3" ::: "memory");
    asm volatile("int $3" ::: "memory");
    check("int3_is_bp", pt_int_count == 4 && pt_gp_count == 2, "int=%lu gp=%lu",
          (unsigned long)pt_int_count, (unsigned long)pt_gp_count);
    HYPERVISOR_set_trap_table(restore);
}

int app_main(const char *cmdline)
{
    long rc;

    set_pf_fixup(pf_hook);
    /* before anything: a read of an unmapped page from kernel mode: err 0, U clear */
    {
        int faulted;
        pt_read((const volatile uint64_t *)0x1000, &faulted);
        check("pf_user_bit_kernel_read", faulted && last_err == 0 && last_cr2 == 0x1000,
              "faulted=%d err=0x%lx cr2=0x%lx", faulted, (unsigned long)last_err,
              (unsigned long)last_cr2);
    }
    if (strcmp(cmdline, "noassist") == 0) {
        /* without the assist an L1 write is an ordinary #PF (P|W, U clear) */
        uint64_t ma;
        volatile uint64_t *P = alloc_page();
        volatile uint64_t *pte = pte_rw(mm_lookup_pte((unsigned long)P, &ma));
        uint64_t orig = *pte;
        int faulted = pt_write(pte, orig);
        check("noassist_faults", faulted && last_cr2 == (unsigned long)pte && last_err == 0x3,
              "faulted=%d cr2=0x%lx err=0x%lx", faulted, (unsigned long)last_cr2,
              (unsigned long)last_err);
        set_pf_fixup(NULL);
        printk("ptwrtest: done ok=%u fail=%u\n", n_ok, n_fail);
        poweroff();
    }
    rc = HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_writable_pagetables);
    printk("ptwrtest: vm_assist rc=%ld\n", rc);
    test_ptwr();
    test_softint();
    set_pf_fixup(NULL);
    printk("ptwrtest: done ok=%u fail=%u\n", n_ok, n_fail);
    poweroff();
}
