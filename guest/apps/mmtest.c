/*
 * mmtest: memory-isolation checks against the hypervisor.
 *   1. mmu_update a PTE to map a machine frame we don't own  -> must fail
 *   2. map one of our own page-table frames writable          -> must fail
 *   3. unmap a data page, read it under a #PF fixup hook      -> must fault
 *   4. map it back and read the old value                     -> must match
 *   5. remove a page's only writable mapping with mmu_update (no flush), pin
 *      the page as an L1: a write through the old address must fault and
 *      leave the page as it was (pyxen may leave the re-application of such
 *      an L1 update for later: never past a type change)
 *   6. upgrade a read-only mapping to writable with mmu_update and write at
 *      once, without a flush: the write must succeed with no #PF reaching
 *      the guest (Xen's spurious_page_fault)
 */
#include "app.h"

const char app_name[] = "mmtest";

/*
 * The probe: a single load whose address we know, and a recovery point
 * the fixup hook can resume at.  No stack use between entry and the load,
 * so resuming at mmtest_probe_recover with the faulting RSP just returns.
 */
extern char mmtest_probe_read[], mmtest_probe_recover[];
uint64_t mmtest_probe(const volatile void *addr);
asm(".pushsection .text\n"
    ".globl mmtest_probe\n"
    ".type mmtest_probe, @function\n"
    "mmtest_probe:\n"
    ".globl mmtest_probe_read\n"
    "mmtest_probe_read:\n"
    "    movq (%rdi), %rax\n"
    "    ret\n"
    ".globl mmtest_probe_recover\n"
    "mmtest_probe_recover:\n"
    "    movabsq $0xbadbadbadbadbad0, %rax\n"
    "    ret\n"
    ".size mmtest_probe, . - mmtest_probe\n"
    ".popsection\n");

/* The same for a store of %rsi at (%rdi); the recovery point returns 1. */
extern char mmtest_probe_write_insn[], mmtest_probe_write_recover[];
int mmtest_probe_write(volatile void *addr, uint64_t val);
asm(".pushsection .text\n"
    ".globl mmtest_probe_write\n"
    ".type mmtest_probe_write, @function\n"
    "mmtest_probe_write:\n"
    "    xorl %eax, %eax\n"
    ".globl mmtest_probe_write_insn\n"
    "mmtest_probe_write_insn:\n"
    "    movq %rsi, (%rdi)\n"
    "    ret\n"
    ".globl mmtest_probe_write_recover\n"
    "mmtest_probe_write_recover:\n"
    "    movl $1, %eax\n"
    "    ret\n"
    ".size mmtest_probe_write, . - mmtest_probe_write\n"
    ".popsection\n");

static volatile unsigned long expect_va;
static volatile unsigned long fault_cr2;
static volatile int faulted;

static int probe_fixup(struct pt_regs *regs, unsigned long cr2)
{
    if (regs->rip == (unsigned long)mmtest_probe_write_insn) {
        fault_cr2 = cr2;
        faulted++;
        regs->rip = (unsigned long)mmtest_probe_write_recover;
        return 1;
    }
    if (regs->rip != (unsigned long)mmtest_probe_read)
        return 0;       /* not our probe: let the fatal handler have it */
    fault_cr2 = cr2;
    faulted = 1;
    regs->rip = (unsigned long)mmtest_probe_recover;
    return 1;
}

static void test_foreign_map(void)
{
    void *scratch = alloc_page();
    uint64_t pte_ma, orig;
    const uint64_t *pte;
    struct mmu_update req;
    unsigned long foreign = start_info->nr_pages + 0x100000UL + 1000;
    long rc;
    int own_mfn0 = 0;

    if (!scratch || !(pte = mm_lookup_pte((unsigned long)scratch, &pte_ma))) {
        printk("mmtest: foreign map setup FAIL\n");
        return;
    }
    orig = *pte;

    req.ptr = pte_ma | MMU_NORMAL_PT_UPDATE;
    req.val = (foreign << PAGE_SHIFT) | PTE_KERNEL_RW;
    rc = HYPERVISOR_mmu_update(&req, 1, NULL, DOMID_SELF);
    printk("mmtest: foreign map rc=%ld\n", rc);
    if (rc == 0)
        HYPERVISOR_update_va_mapping((unsigned long)scratch, orig, UVMF_INVLPG);

    /* Machine frame 0 too, unless it happens to be one of ours. */
    for (unsigned long pfn = 0; pfn < nr_pages; pfn++)
        if (pfn_to_mfn(pfn) == 0)
            own_mfn0 = 1;
    if (own_mfn0) {
        printk("mmtest: foreign map mfn=0 skipped (owned)\n");
    } else {
        req.ptr = pte_ma | MMU_NORMAL_PT_UPDATE;
        req.val = PTE_KERNEL_RW;        /* mfn 0 */
        rc = HYPERVISOR_mmu_update(&req, 1, NULL, DOMID_SELF);
        printk("mmtest: foreign map mfn=0 rc=%ld\n", rc);
        if (rc == 0)
            HYPERVISOR_update_va_mapping((unsigned long)scratch, orig, UVMF_INVLPG);
    }
    free_pages(scratch, 1);
}

static void test_writable_pt(void)
{
    unsigned long l4_va = start_info->pt_base;
    unsigned long mfn = virt_to_mfn((void *)l4_va);
    long rc;

    /* Our L4 is mapped read-only; asking for RW must be refused. */
    rc = HYPERVISOR_update_va_mapping(l4_va, (mfn << PAGE_SHIFT) | PTE_KERNEL_RW,
                                      UVMF_INVLPG);
    printk("mmtest: writable pt rc=%ld\n", rc);
    if (rc == 0)
        HYPERVISOR_update_va_mapping(l4_va, (mfn << PAGE_SHIFT) | PTE_KERNEL_RO,
                                     UVMF_INVLPG);
}

static void test_unmap_remap(void)
{
    const uint64_t magic = 0x5A5A0123456789A5ULL;
    volatile uint64_t *page = alloc_page();
    unsigned long va = (unsigned long)page;
    unsigned long mfn;
    uint64_t v;
    long rc;

    if (!page) {
        printk("mmtest: unmapped read setup FAIL\n");
        return;
    }
    mfn = virt_to_mfn((void *)va);
    page[0] = magic;

    rc = HYPERVISOR_update_va_mapping(va, 0, UVMF_INVLPG);
    if (rc) {
        printk("mmtest: unmap rc=%ld FAIL\n", rc);
        return;
    }

    expect_va = va;
    faulted = 0;
    set_pf_fixup(probe_fixup);
    v = mmtest_probe(page);
    set_pf_fixup(NULL);
    if (!faulted)
        printk("mmtest: unmapped read did NOT fault FAIL (read 0x%lx)\n", (unsigned long)v);
    else if (fault_cr2 == expect_va)
        printk("mmtest: unmapped read faulted cr2=0x%lx OK\n", fault_cr2);
    else
        printk("mmtest: unmapped read faulted cr2=0x%lx FAIL (expected 0x%lx)\n",
               fault_cr2, expect_va);

    rc = HYPERVISOR_update_va_mapping(va, (mfn << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG);
    if (rc) {
        printk("mmtest: remap rc=%ld FAIL\n", rc);
        return;
    }
    v = page[0];
    if (v == magic)
        printk("mmtest: remap value OK\n");
    else
        printk("mmtest: remap value FAIL got=0x%lx\n", (unsigned long)v);
    free_pages((void *)va, 1);
}

static long pte_update(uint64_t pte_ma, uint64_t val)
{
    struct mmu_update req = { .ptr = pte_ma | MMU_NORMAL_PT_UPDATE, .val = val };
    return HYPERVISOR_mmu_update(&req, 1, NULL, DOMID_SELF);
}

static long mmuext1(unsigned int cmd, unsigned long mfn)
{
    struct mmuext_op op;
    memset(&op, 0, sizeof(op));
    op.cmd = cmd;
    op.arg1.mfn = mfn;
    return HYPERVISOR_mmuext_op(&op, 1, NULL, DOMID_SELF);
}

static void test_stale_writable_then_pin(void)
{
    volatile uint64_t *page = alloc_page();
    unsigned long va = (unsigned long)page, mfn;
    uint64_t pte_ma, orig;
    long rc_unmap, rc_pin, rc_unpin = -1, rc_back = -1;
    int wrote = 0;

    if (!page || !mm_lookup_pte(va, &pte_ma)) {
        printk("mmtest: stale writable setup FAIL\n");
        return;
    }
    mfn = virt_to_mfn((void *)va);
    orig = *mm_lookup_pte(va, &pte_ma);
    memset((void *)page, 0, PAGE_SIZE);            /* an empty L1 is a valid L1 */
    rc_unmap = pte_update(pte_ma, 0);              /* the only writable mapping goes */
    rc_pin = mmuext1(MMUEXT_PIN_L1_TABLE, mfn);    /* ... so it may become an L1 */
    if (rc_unmap == 0 && rc_pin == 0) {
        faulted = 0;
        set_pf_fixup(probe_fixup);
        wrote = !mmtest_probe_write(page, 0x8000000000000067ULL);  /* a PTE, if it lands */
        set_pf_fixup(NULL);
        rc_unpin = mmuext1(MMUEXT_UNPIN_TABLE, mfn);
    }
    if (rc_unmap == 0)
        rc_back = HYPERVISOR_update_va_mapping(va, orig, UVMF_INVLPG);
    int zero = 1;
    if (rc_back == 0)
        for (unsigned int i = 0; i < PAGE_SIZE / 8; i++)
            zero &= page[i] == 0;
    if (rc_unmap == 0 && rc_pin == 0 && !wrote && faulted == 1 && fault_cr2 == va &&
        rc_unpin == 0 && rc_back == 0 && zero)
        printk("mmtest: stale writable after pin OK\n");
    else
        printk("mmtest: stale writable after pin FAIL unmap=%ld pin=%ld wrote=%d faults=%d "
               "cr2=0x%lx unpin=%ld back=%ld zero=%d\n", rc_unmap, rc_pin, wrote, faulted,
               fault_cr2, rc_unpin, rc_back, zero);
    free_pages((void *)va, 1);
}

static void test_rw_upgrade_no_flush(void)
{
    volatile uint64_t *page = alloc_page();
    unsigned long va = (unsigned long)page;
    uint64_t pte_ma, orig, seen;
    long rc_ro, rc_rw;
    int failed;

    if (!page || !mm_lookup_pte(va, &pte_ma)) {
        printk("mmtest: rw upgrade setup FAIL\n");
        return;
    }
    orig = *mm_lookup_pte(va, &pte_ma);
    page[0] = 1;
    rc_ro = HYPERVISOR_update_va_mapping(va, orig & ~(uint64_t)_PAGE_RW, UVMF_INVLPG);
    seen = page[0];                              /* the read-only translation is in use */
    rc_rw = pte_update(pte_ma, orig);            /* writable again, no flush */
    faulted = 0;
    set_pf_fixup(probe_fixup);
    failed = mmtest_probe_write(page, 0x77);
    set_pf_fixup(NULL);
    if (rc_ro == 0 && rc_rw == 0 && seen == 1 && !failed && !faulted && page[0] == 0x77)
        printk("mmtest: rw upgrade without flush OK\n");
    else
        printk("mmtest: rw upgrade without flush FAIL ro=%ld rw=%ld seen=%lu failed=%d "
               "faults=%d value=0x%lx\n", rc_ro, rc_rw, (unsigned long)seen, failed, faulted,
               (unsigned long)page[0]);
    HYPERVISOR_update_va_mapping(va, orig, UVMF_INVLPG);
    free_pages((void *)va, 1);
}

int app_main(const char *cmdline)
{
    (void)cmdline;
    test_foreign_map();
    test_writable_pt();
    test_unmap_remap();
    test_stale_writable_then_pin();
    test_rw_upgrade_no_flush();
    printk("mmtest: done\n");
    poweroff();
}
