/*
 * gnt.c - a backend's holds on its guest's grants (grant_table.h, v1).
 *
 * A backend living in the guest's own process touches the guest's pages
 * directly; before it does, it checks the guest's grant entry exactly as a
 * grant map would (type GTF_permit_access, granted to the backend's domain,
 * not GTF_readonly when the backend writes) and sets GTF_reading (and
 * GTF_writing) with a compare-and-swap, so that a guest revoking the grant
 * at the same time either sees the bits (and must not reuse the page) or we
 * see the revocation (and fail).  Holds are counted per ref; the bits drop
 * with the last hold.  One mutex per table keeps counts and bits together.
 *
 * A hold for writing also takes a writable use of the ref's active entry,
 * which takes a writable hold on the page's type word (Xen's
 * get_page_type(PGT_writable_page)): refused while the guest uses the page
 * as a page table or descriptor page, and while held the guest cannot give
 * the page such a type.  The protocol is the one of pyxen/hv/interdomain.py
 * (TypeWords, ActiveGrants), with the same compare-and-swaps, since the
 * guest's vCPU thread, other domains' processes and these threads share it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

struct pxg *pxg_new(uint8_t *gt, uint32_t max_refs, uint8_t *ram, uint64_t nr_pages,
                    uint64_t mfn_base, uint64_t *dirty, uint32_t *types, uint64_t nr_types,
                    uint64_t *active)
{
    struct pxg *g;
    if (!types || !active)
        return NULL;
    g = calloc(1, sizeof(*g));
    if (!g)
        return NULL;
    g->holds = calloc(max_refs ? max_refs : 1, sizeof(uint16_t));
    g->wheld = calloc(max_refs ? max_refs : 1, 1);
    if (!g->holds || !g->wheld) {
        free(g->holds);
        free(g->wheld);
        free(g);
        return NULL;
    }
    g->types = types;
    g->nr_types = nr_types;
    g->active = active;
    g->gt = gt;
    g->max_refs = max_refs;
    g->ram = ram;
    g->nr_pages = nr_pages;
    g->mfn_base = mfn_base;
    g->dirty = dirty;
    pthread_mutex_init(&g->lock, NULL);
    return g;
}

void pxg_free(struct pxg *g)
{
    if (!g)
        return;
    pthread_mutex_destroy(&g->lock);
    free(g->holds);
    free(g->wheld);
    free(g);
}

void pxg_set_logdirty(struct pxg *g, int on)
{
    __atomic_store_n(&g->logdirty, on, __ATOMIC_SEQ_CST);
}

static void drop_bits(struct pxg *g, uint32_t ref)
{
    uint16_t *flags = (uint16_t *)(g->gt + (uint64_t)ref * 8);
    __atomic_fetch_and(flags, (uint16_t)~(GTF_reading | GTF_writing), __ATOMIC_SEQ_CST);
}

static int type_hold(struct pxg *g, uint64_t pfn)
{
    uint32_t *a, w;
    if (pfn >= g->nr_types)
        return 0;
    a = &g->types[pfn];
    w = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    for (;;) {
        if ((w & TW_TYPE_MASK) || w > TW_MAX)
            return 0;
        if (__atomic_compare_exchange_n(a, &w, w + TW_HOLD, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return 1;
    }
}

static void type_unhold(struct pxg *g, uint64_t pfn)
{
    uint32_t *a, w;
    if (pfn >= g->nr_types)
        return;
    a = &g->types[pfn];
    w = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while (w >= TW_HOLD)
        if (__atomic_compare_exchange_n(a, &w, w - TW_HOLD, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return;
}

/* One more writable use of ref by domain me: the pfn to write (pfn on the
 * first use, the latched one after), or -1 if the type rules refuse it. */
static int64_t active_hold(struct pxg *g, uint32_t ref, uint16_t me, uint64_t pfn)
{
    uint64_t *a = &g->active[ref], w = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    for (;;) {
        if (w == 0) {
            if (!type_hold(g, pfn))
                return -1;
            if (__atomic_compare_exchange_n(a, &w, pfn | AE_COUNT | ((uint64_t)me << 48), 0,
                                            __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                return (int64_t)pfn;
            type_unhold(g, pfn);
            continue;
        }
        if ((w >> 48) != me || ((w >> 32) & 0xFFFF) >= AE_COUNT_MAX)
            return -1;
        if (__atomic_compare_exchange_n(a, &w, w + AE_COUNT, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return (int64_t)(w & 0xFFFFFFFFu);
    }
}

static void active_unhold(struct pxg *g, uint32_t ref)
{
    uint64_t *a = &g->active[ref], w = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while ((w >> 32) & 0xFFFF) {
        int last = ((w >> 32) & 0xFFFF) == 1;
        uint64_t seen = w;
        if (__atomic_compare_exchange_n(a, &w, last ? 0 : w - AE_COUNT, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
            if (last)
                type_unhold(g, seen & 0xFFFFFFFFu);
            return;
        }
    }
}

/* Caller holds g->lock. */
static int64_t acquire_locked(struct pxg *g, uint32_t ref, uint16_t me, int write)
{
    uint32_t *word, w, want, frame;
    uint64_t pfn;

    if (ref >= g->max_refs)
        return PXG_E_RANGE;
    if (g->holds[ref] == UINT16_MAX)
        return PXG_E_BUSY;
    word = (uint32_t *)(g->gt + (uint64_t)ref * 8);
    want = GTF_reading | (write ? GTF_writing : 0);
    /* Guess the common entry (permit_access, granted to us, no status bits)
     * instead of loading it first: the line was just written by the guest's
     * CPU, and a load then a CAS would fetch it twice.  A wrong guess only
     * returns the real value into w. */
    w = GTF_permit_access | ((uint32_t)me << 16);
    if (__atomic_compare_exchange_n(word, &w, w | want, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        goto held;
    for (;;) {
        uint32_t flags = w & 0xFFFF, dom = w >> 16;
        if ((flags & GTF_type_mask) != GTF_permit_access || dom != me)
            return PXG_E_PERM;
        if (write && (flags & GTF_readonly))
            return PXG_E_RDONLY;
        if (__atomic_compare_exchange_n(word, &w, w | want, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            break;
    }
held:
    frame = __atomic_load_n(word + 1, __ATOMIC_SEQ_CST);
    pfn = (uint64_t)frame - g->mfn_base;
    if ((uint64_t)frame < g->mfn_base || pfn >= g->nr_pages) {
        if (!g->holds[ref])
            drop_bits(g, ref);
        return PXG_E_FRAME;
    }
    if (write && !g->wheld[ref]) {
        int64_t p = active_hold(g, ref, me, pfn);
        if (p < 0) {
            if (!g->holds[ref])
                drop_bits(g, ref);
            return PXG_E_TYPE;
        }
        g->wheld[ref] = 1;
        pfn = (uint64_t)p;
    } else if (write) {
        /* our writable use latched the frame: write that one */
        pfn = __atomic_load_n(&g->active[ref], __ATOMIC_SEQ_CST) & 0xFFFFFFFFu;
    }
    g->holds[ref]++;
    return (int64_t)(pfn << 12);
}

static void release_locked(struct pxg *g, uint32_t ref)
{
    if (ref >= g->max_refs || !g->holds[ref])
        return;
    if (--g->holds[ref] == 0) {
        if (g->wheld[ref]) {
            g->wheld[ref] = 0;
            active_unhold(g, ref);
        }
        drop_bits(g, ref);
    }
}

int64_t pxg_acquire(struct pxg *g, uint32_t ref, uint16_t me, int write)
{
    int64_t r;
    pthread_mutex_lock(&g->lock);
    r = acquire_locked(g, ref, me, write);
    pthread_mutex_unlock(&g->lock);
    return r;
}

/* All or nothing: the index of the ref that failed (its error in offs[i]) or n. */
int pxg_acquire_many(struct pxg *g, const uint32_t *refs, int n, uint16_t me, int write,
                     uint64_t *offs)
{
    int i;
    pthread_mutex_lock(&g->lock);
    for (i = 0; i < n; i++) {
        int64_t r = acquire_locked(g, refs[i], me, write);
        if (r < 0) {
            for (int k = 0; k < i; k++)
                release_locked(g, refs[k]);
            offs[i] = (uint64_t)r;
            break;
        }
        offs[i] = (uint64_t)r;
    }
    pthread_mutex_unlock(&g->lock);
    return i;
}

void pxg_release(struct pxg *g, uint32_t ref)
{
    pthread_mutex_lock(&g->lock);
    release_locked(g, ref);
    pthread_mutex_unlock(&g->lock);
}

void pxg_release_many(struct pxg *g, const uint32_t *refs, int n)
{
    pthread_mutex_lock(&g->lock);
    for (int i = 0; i < n; i++)
        release_locked(g, refs[i]);
    pthread_mutex_unlock(&g->lock);
}

uint32_t pxg_holds(struct pxg *g, uint32_t ref)
{
    uint32_t h;
    if (ref >= g->max_refs)
        return 0;
    pthread_mutex_lock(&g->lock);
    h = g->holds[ref];
    pthread_mutex_unlock(&g->lock);
    return h;
}

void pxg_mark_dirty(struct pxg *g, uint64_t pfn)
{
    if (g->dirty && pfn < g->nr_pages)
        __atomic_fetch_or(&g->dirty[pfn >> 6], 1ull << (pfn & 63), __ATOMIC_SEQ_CST);
}
