/*
 * mm.c - map all of RAM and hand out pages.
 *
 * At entry the builder's page tables map VIRT_BASE + pfn*4K -> mfn(pfn)
 * for a prefix of our pfns (image, p2m, start_info, ring pages, the page
 * tables themselves read-only, boot stack, plus some slack).  We extend
 * that to every pfn, obeying the PV rules:
 *   - page-table frames must never be mapped writable: a new table frame
 *     is zeroed, then its own mapping is made read-only with
 *     update_va_mapping, and only then hooked into its parent;
 *   - page tables are only ever changed through mmu_update (entries we
 *     write refer to our own frames, as machine addresses).
 * New table frames come from memory that is already mapped, lowest pfn
 * first; mapping proceeds upwards 2 MiB at a time, so the mapped region
 * always stays ahead of the frames we need for tables.
 */
#include "mm.h"
#include "hypercall.h"
#include "events.h"

unsigned long *phys_to_machine;
unsigned long nr_pages;
const unsigned long *machine_to_phys = (const unsigned long *)MACH2PHYS_VIRT_START;
unsigned long m2p_max_mfn = ~0UL;

static uint64_t *l4_table;          /* start_info->pt_base */
static unsigned long first_free_pfn;
static unsigned long pt_first_pfn, pt_end_pfn;   /* builder's table frames */

/* Allocator: one bit per pfn, 1 = in use. */
static uint64_t page_bitmap[(MAX_PFNS + 63) / 64];
static unsigned long free_count;
static unsigned long search_hint;

#define L4_IDX(va) (((va) >> 39) & 511)
#define L3_IDX(va) (((va) >> 30) & 511)
#define L2_IDX(va) (((va) >> 21) & 511)
#define L1_IDX(va) (((va) >> 12) & 511)

static inline int pte_present(uint64_t e) { return (e & _PAGE_PRESENT) != 0; }

/* Page-table frames are our own pfns, so they live in the linear map. */
static inline uint64_t *entry_table(uint64_t e)
{
    return mfn_to_virt((e & PTE_ADDR_MASK) >> PAGE_SHIFT);
}

/* ---------------------------------------------------------------- */
/* Batched mmu_update.  Every hypercall is a VM exit (tens of microseconds
 * on some hosts), so mapping RAM queues several whole L1s per call. */

#define MMU_BATCH      2048
#define L1_BATCH_COST  (2 + 512)    /* RO flip + hook + a full L1 */
static struct mmu_update mmu_batch[MMU_BATCH];
static unsigned int mmu_count;
static unsigned long mmu_calls;

static void mmu_flush(void)
{
    unsigned int done = 0;
    long rc;

    if (!mmu_count)
        return;
    rc = HYPERVISOR_mmu_update(mmu_batch, mmu_count, &done, DOMID_SELF);
    mmu_calls++;
    if (rc < 0)
        panic("mm: mmu_update rc=%ld, %u of %u done (ptr=0x%lx val=0x%lx)\n",
              rc, done, mmu_count,
              (unsigned long)mmu_batch[done < mmu_count ? done : 0].ptr,
              (unsigned long)mmu_batch[done < mmu_count ? done : 0].val);
    mmu_count = 0;
}

static void mmu_queue(uint64_t pte_maddr, uint64_t val)
{
    if (mmu_count == MMU_BATCH)
        panic("mm: mmu batch overflow\n");
    mmu_batch[mmu_count].ptr = pte_maddr | MMU_NORMAL_PT_UPDATE;
    mmu_batch[mmu_count].val = val;
    mmu_count++;
}

/* ---------------------------------------------------------------- */
/* Building page tables at boot */

static unsigned long pt_alloc_pfn;      /* next pfn to use for a new table */
static unsigned long mapped_limit_pfn;  /* all pfns below are mapped (flushed) */
static unsigned long queued_limit_pfn;  /* ... once the queued batch is flushed */

static void map_flush(void)
{
    mmu_flush();
    if (queued_limit_pfn > mapped_limit_pfn)
        mapped_limit_pfn = queued_limit_pfn;
}

/*
 * Turn a free, mapped pfn into an (empty) page-table frame hooked in at
 * parent_entry (machine address of the parent's entry).  Queued in order:
 * our mapping of the frame becomes read-only (no writable mapping may
 * exist when it turns into a page table), then the parent entry is set,
 * which makes the hypervisor validate it as a (still empty) table.
 */
static uint64_t *new_table(uint64_t parent_entry_maddr)
{
    unsigned long pfn, mfn;
    uint64_t self_pte;
    void *va;

    if (pt_alloc_pfn >= mapped_limit_pfn)
        map_flush();                    /* may advance mapped_limit_pfn */
    pfn = pt_alloc_pfn++;
    if (pfn >= mapped_limit_pfn)
        panic("mm: no mapped memory left for page tables (pfn %lu)\n", pfn);
    va = pfn_to_virt(pfn);
    mfn = pfn_to_mfn(pfn);
    if (!mm_lookup_pte((unsigned long)va, &self_pte))
        panic("mm: pfn %lu below the mapped limit is not mapped\n", pfn);
    memset(va, 0, PAGE_SIZE);           /* while we can still write it */
    mmu_queue(self_pte, (mfn << PAGE_SHIFT) | PTE_KERNEL_RO);
    mmu_queue(parent_entry_maddr, (mfn << PAGE_SHIFT) | PTE_TABLE);
    return va;
}

/* Return the next-level table under tbl[idx], creating it if needed. */
static uint64_t *get_table(uint64_t *tbl, unsigned int idx)
{
    uint64_t e = READ_ONCE(tbl[idx]);
    uint64_t *t;

    if (pte_present(e))
        return entry_table(e);
    t = new_table(virt_to_maddr(&tbl[idx]));
    map_flush();        /* upper levels are rare; hook at once so reads see it */
    return t;
}

static int pfn_is_boot_pagetable(unsigned long pfn)
{
    return pfn >= pt_first_pfn && pfn < pt_end_pfn;
}

/*
 * Map every pfn, 2 MiB (one L1) at a time, lowest first.  Before each L1
 * the batch is flushed if it couldn't take a whole one more; with nothing
 * queued, everything below the current pfn is known to be mapped.
 */
static unsigned long map_all_ram(void)
{
    unsigned long pfn = 0, added = 0;

    while (pfn < nr_pages) {
        unsigned long va = (unsigned long)pfn_to_virt(pfn);
        uint64_t *l3, *l2, *l1;
        uint64_t l2e;
        int fresh = 0;

        if (mmu_count + L1_BATCH_COST > MMU_BATCH)
            map_flush();
        if (!mmu_count && pfn > mapped_limit_pfn)
            mapped_limit_pfn = pfn;
        l3 = get_table(l4_table, L4_IDX(va));
        l2 = get_table(l3, L3_IDX(va));
        l2e = READ_ONCE(l2[L2_IDX(va)]);
        if (pte_present(l2e) && (l2e & _PAGE_PSE)) {
            /* A 2 MiB superpage from the builder: already mapped. */
            pfn = (pfn | 511) + 1;
            continue;
        }
        if (pte_present(l2e)) {
            l1 = entry_table(l2e);
        } else {
            l1 = new_table(virt_to_maddr(&l2[L2_IDX(va)]));
            fresh = 1;
        }
        for (unsigned int i = L1_IDX(va); i < 512 && pfn < nr_pages; i++, pfn++) {
            unsigned long mfn = pfn_to_mfn(pfn);
            if (!fresh && pte_present(READ_ONCE(l1[i])))
                continue;
            if (mfn == INVALID_MFN || pfn_is_boot_pagetable(pfn))
                continue;
            mmu_queue(virt_to_maddr(&l1[i]), (mfn << PAGE_SHIFT) | PTE_KERNEL_RW);
            added++;
        }
        queued_limit_pfn = pfn;
    }
    map_flush();
    return added;
}

const uint64_t *mm_lookup_pte(unsigned long va, uint64_t *maddr)
{
    uint64_t e;
    const uint64_t *t = l4_table;

    e = READ_ONCE(t[L4_IDX(va)]);
    if (!pte_present(e)) return NULL;
    t = entry_table(e);
    e = READ_ONCE(t[L3_IDX(va)]);
    if (!pte_present(e) || (e & _PAGE_PSE)) return NULL;
    t = entry_table(e);
    e = READ_ONCE(t[L2_IDX(va)]);
    if (!pte_present(e) || (e & _PAGE_PSE)) return NULL;
    t = entry_table(e);
    t = &t[L1_IDX(va)];
    if (maddr)
        *maddr = virt_to_maddr(t);
    return t;
}

/* ---------------------------------------------------------------- */
/* Page allocator */

static inline int page_used(unsigned long pfn)
{
    return (page_bitmap[pfn / 64] >> (pfn % 64)) & 1;
}

static inline void set_used(unsigned long pfn, int used)
{
    if (used)
        page_bitmap[pfn / 64] |= 1UL << (pfn % 64);
    else
        page_bitmap[pfn / 64] &= ~(1UL << (pfn % 64));
}

void *alloc_pages(unsigned long count)
{
    unsigned long flags, start = 0, run = 0, pfn;
    void *va = NULL;

    if (!count)
        return NULL;
    flags = irq_save();
    for (pfn = search_hint; pfn < nr_pages; pfn++) {
        if (run == 0 && (pfn % 64) == 0 && page_bitmap[pfn / 64] == ~0UL) {
            pfn += 63;              /* skip a fully used word */
            continue;
        }
        if (page_used(pfn)) {
            run = 0;
            continue;
        }
        if (run++ == 0)
            start = pfn;
        if (run == count) {
            for (unsigned long p = start; p < start + count; p++)
                set_used(p, 1);
            free_count -= count;
            if (start == search_hint)
                search_hint = start + count;
            va = pfn_to_virt(start);
            break;
        }
    }
    irq_restore(flags);
    return va;
}

void *alloc_page(void)
{
    return alloc_pages(1);
}

void free_pages(void *va, unsigned long count)
{
    unsigned long pfn = virt_to_pfn(va), flags;

    flags = irq_save();
    for (unsigned long p = pfn; p < pfn + count && p < nr_pages; p++) {
        if (!page_used(p))
            panic("mm: double free of pfn %lu\n", p);
        set_used(p, 0);
        free_count++;
    }
    if (pfn < search_hint)
        search_hint = pfn;
    irq_restore(flags);
}

unsigned long mm_free_pages(void) { return free_count; }
unsigned long mm_first_free_pfn(void) { return first_free_pfn; }

/* ---------------------------------------------------------------- */

void mm_early_init(void)
{
    struct xen_machphys_mapping map;
    long rc;

    phys_to_machine = (unsigned long *)start_info->mfn_list;
    nr_pages = start_info->nr_pages;
    if (nr_pages > MAX_PFNS)
        nr_pages = MAX_PFNS;

    rc = HYPERVISOR_memory_op(XENMEM_machphys_mapping, &map);

    if (rc == 0) {
        machine_to_phys = (const unsigned long *)map.v_start;
        m2p_max_mfn = map.max_mfn;
    }
    /* else: an old hypervisor; keep Xen's fixed address, unbounded. */
}

static unsigned long va_end_pfn(unsigned long va_end)
{
    return (ALIGN_UP(va_end, PAGE_SIZE) - VIRT_BASE) >> PAGE_SHIFT;
}

static void reserve_mfn_page(unsigned long mfn, unsigned long *end)
{
    unsigned long pfn;
    if (!mfn)
        return;
    pfn = mfn_to_pfn(mfn);
    if (pfn < nr_pages && pfn_to_mfn(pfn) == mfn) {
        if (pfn + 1 > *end)
            *end = pfn + 1;
    }
}

void mm_init(const struct start_info *boot_si)
{
    const struct start_info *si = start_info;
    unsigned long end, added;

    if (si->nr_pages > nr_pages)
        printk("mm: %lu pages, only using the first %lu\n", si->nr_pages, nr_pages);
    l4_table = (uint64_t *)si->pt_base;
    pt_first_pfn = virt_to_pfn(l4_table);
    pt_end_pfn = pt_first_pfn + si->nr_pt_frames;

    /*
     * First pfn nobody is using: past the image, the p2m array, start_info,
     * the boot page tables, the builder's boot stack, any module, and the
     * console/xenstore pages - whatever order the builder chose.
     */
    end = va_end_pfn((unsigned long)_end);
    end = MAX(end, va_end_pfn(si->mfn_list + si->nr_pages * sizeof(unsigned long)));
    end = MAX(end, va_end_pfn((unsigned long)boot_si + sizeof(*boot_si)));
    end = MAX(end, pt_end_pfn);
    end = MAX(end, va_end_pfn(boot_initial_rsp));
    if (si->mod_len && !(si->flags & SIF_MOD_START_PFN))
        end = MAX(end, va_end_pfn(si->mod_start + si->mod_len));
    reserve_mfn_page(si->console.domU.mfn, &end);
    reserve_mfn_page(si->store_mfn, &end);
    first_free_pfn = end;
    if (first_free_pfn >= nr_pages)
        panic("mm: no free memory (first free pfn %lu, nr_pages %lu)\n",
              first_free_pfn, nr_pages);

    pt_alloc_pfn = first_free_pfn;
    added = map_all_ram();

    /* Everything past the boot tables we just built is free. */
    for (unsigned long w = 0; w < ARRAY_SIZE(page_bitmap); w++)
        page_bitmap[w] = ~0UL;
    free_count = 0;
    for (unsigned long pfn = pt_alloc_pfn; pfn < nr_pages; pfn++) {
        if (pfn_to_mfn(pfn) == INVALID_MFN)
            continue;
        set_used(pfn, 0);
        free_count++;
    }
    search_hint = pt_alloc_pfn;

    printk("pyxen-guest: mm: %lu pages (%lu MiB), first free pfn %lu, mapped %lu "
           "more pages with %lu new page-table frames in %lu mmu_update calls, "
           "%lu pages free\n",
           nr_pages, nr_pages >> 8, first_free_pfn, added,
           pt_alloc_pfn - first_free_pfn, mmu_calls, free_count);
}
