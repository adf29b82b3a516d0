/*
 * mm.h - pseudo-physical memory, p2m/m2p translation and page allocation.
 *
 * Every pfn of the domain is mapped at VIRT_BASE + pfn * PAGE_SIZE (the
 * image itself starts at pfn 0).  PFNs are the guest's view; MFNs are the
 * real machine frames and must be used in anything handed to the
 * hypervisor (PTEs, shared-page addresses, ...).
 */
#ifndef PYXEN_MM_H
#define PYXEN_MM_H

#include "kernel.h"

/* We can only map what fits between VIRT_BASE and the top of the address
 * space (2 GiB), minus a little slack. */
#define MAX_PFNS  0x7FF00UL

#define INVALID_MFN (~0UL)

extern unsigned long *phys_to_machine;  /* start_info->mfn_list */
extern unsigned long nr_pages;          /* usable pfns (capped at MAX_PFNS) */
extern const unsigned long *machine_to_phys; /* read-only M2P table */
extern unsigned long m2p_max_mfn;

static inline unsigned long pfn_to_mfn(unsigned long pfn) { return phys_to_machine[pfn]; }
static inline unsigned long mfn_to_pfn(unsigned long mfn)
{
    return mfn <= m2p_max_mfn ? machine_to_phys[mfn] : INVALID_MFN;
}
static inline void *pfn_to_virt(unsigned long pfn)
{
    return (void *)(VIRT_BASE + (pfn << PAGE_SHIFT));
}
static inline unsigned long virt_to_pfn(const void *va)
{
    return ((unsigned long)va - VIRT_BASE) >> PAGE_SHIFT;
}
static inline unsigned long virt_to_mfn(const void *va) { return pfn_to_mfn(virt_to_pfn(va)); }
static inline uint64_t virt_to_maddr(const void *va)
{
    return (virt_to_mfn(va) << PAGE_SHIFT) | ((unsigned long)va & (PAGE_SIZE - 1));
}
static inline void *mfn_to_virt(unsigned long mfn) { return pfn_to_virt(mfn_to_pfn(mfn)); }

/* Standard leaf / table entry flags used by this kernel. */
#define PTE_KERNEL_RW   (_PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY)
#define PTE_KERNEL_RO   (_PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED)
#define PTE_TABLE       (_PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED)

/* p2m pointer, nr_pages and the M2P location (XENMEM_machphys_mapping):
 * everything pfn_to_mfn/mfn_to_pfn need.  Called before the console. */
void mm_early_init(void);
/* boot_si: the builder's start_info (its page must not be reused). */
void mm_init(const struct start_info *boot_si);

/* Page allocator over the free pfns; returns page-aligned VAs or NULL. */
void *alloc_pages(unsigned long count);
void *alloc_page(void);
void free_pages(void *va, unsigned long count);
unsigned long mm_free_pages(void);
unsigned long mm_first_free_pfn(void);

/*
 * Find the L1 entry that maps va.  Returns its (read-only) virtual address
 * and stores the entry's machine address in *maddr, or returns NULL if an
 * upper level is missing.
 */
const uint64_t *mm_lookup_pte(unsigned long va, uint64_t *maddr);

#endif /* PYXEN_MM_H */
