/*
 * mmtest: memory-isolation checks against the hypervisor.
 *   1. mmu_update a PTE to map a machine frame we don't own  -> must fail
 *   2. map one of our own page-table frames writable          -> must fail
 *   3. unmap a data page, read it under a #PF fixup hook      -> must fault
 *   4. map it back and read the old value                     -> must match
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

static volatile unsigned long expect_va;
static volatile unsigned long fault_cr2;
static volatile int faulted;

static int probe_fixup(struct pt_regs *regs, unsigned long cr2)
{
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

int app_main(const char *cmdline)
{
    (void)cmdline;
    test_foreign_map();
    test_writable_pt();
    test_unmap_remap();
    printk("mmtest: done\n");
    poweroff();
}
