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

static int tw_hold(uint32_t *types, uint64_t nr_types, uint64_t pfn)
{
    uint32_t *a, w;
    if (pfn >= nr_types)
        return 0;
    a = &types[pfn];
    w = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    for (;;) {
        if ((w & TW_TYPE_MASK) || w > TW_MAX)
            return 0;
        if (__atomic_compare_exchange_n(a, &w, w + TW_HOLD, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return 1;
    }
}

static void tw_unhold(uint32_t *types, uint64_t nr_types, uint64_t pfn)
{
    uint32_t *a, w;
    if (pfn >= nr_types)
        return;
    a = &types[pfn];
    w = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while (w >= TW_HOLD)
        if (__atomic_compare_exchange_n(a, &w, w - TW_HOLD, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return;
}

/* One more writable use of ref by domain me: the pfn to write (pfn on the
 * first use, the latched one after), or -1 if the type rules refuse it. */
static int64_t ae_hold(uint64_t *active, uint32_t *types, uint64_t nr_types, uint32_t ref,
                       uint16_t me, uint64_t pfn)
{
    uint64_t *a = &active[ref], w = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    for (;;) {
        if (w == 0) {
            if (!tw_hold(types, nr_types, pfn))
                return -1;
            if (__atomic_compare_exchange_n(a, &w, pfn | AE_COUNT | ((uint64_t)me << 48), 0,
                                            __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                return (int64_t)pfn;
            tw_unhold(types, nr_types, pfn);
            continue;
        }
        if ((w >> 48) != me || ((w >> 32) & 0xFFFF) >= AE_COUNT_MAX)
            return -1;
        if (__atomic_compare_exchange_n(a, &w, w + AE_COUNT, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return (int64_t)(w & 0xFFFFFFFFu);
    }
}

static void ae_unhold(uint64_t *active, uint32_t *types, uint64_t nr_types, uint32_t ref)
{
    uint64_t *a = &active[ref], w = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while ((w >> 32) & 0xFFFF) {
        int last = ((w >> 32) & 0xFFFF) == 1;
        uint64_t seen = w;
        if (__atomic_compare_exchange_n(a, &w, last ? 0 : w - AE_COUNT, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
            if (last)
                tw_unhold(types, nr_types, seen & 0xFFFFFFFFu);
            return;
        }
    }
}

static int64_t active_hold(struct pxg *g, uint32_t ref, uint16_t me, uint64_t pfn)
{
    return ae_hold(g->active, g->types, g->nr_types, ref, me, pfn);
}

static void active_unhold(struct pxg *g, uint32_t ref)
{
    ae_unhold(g->active, g->types, g->nr_types, ref);
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

/*
 * GNTTABOP_copy, a whole batch in one call.
 *
 * The same checks, in the same order, with the same status codes as the
 * Python path (GrantTables.copy_one, the reference): length and offsets
 * within a page (GNTST_bad_copy_arg); for a gmfn side, the copying domain
 * itself (GNTST_permission_denied) and one of its RAM frames
 * (GNTST_bad_page), a destination taking a writable type for the copy
 * (GNTST_general_error while it is a page table or descriptor page); for a
 * grant side, the ref within the granter's table (GNTST_bad_gntref), the
 * entry GTF_permit_access for us and writable when written
 * (GNTST_general_error), GTF_reading (and GTF_writing) set with a
 * compare-and-swap and counted in this process's per-ref uses, the frame one
 * of the granter's RAM pages (GNTST_bad_page), a destination taking the
 * ref's writable use (its active entry, then the frame's type word), and the
 * page it wrote marked in the granter's dirty bitmap.  Everything a side
 * took is given back, in reverse order, before the next op.
 *
 * Called with the GIL held and GrantTables.lock taken, so the per-ref use
 * counts (shared with the Python map/unmap/copy paths) need no lock here;
 * the grant entries, type words and active entries are shared with other
 * processes and are changed with compare-and-swaps only.
 *
 * The op array is read and the status written through `pages`, the host
 * addresses of the guest pages the array spans (Python translated them and
 * checked they are writable): the ops need not be page aligned.
 */
static void ops_rw(uint8_t *const *pages, uint32_t first_off, uint64_t at, void *buf, uint32_t n,
                   int write)
{
    uint8_t *b = buf;
    while (n) {
        uint64_t x = (uint64_t)first_off + at;
        uint32_t in = (uint32_t)(x & 4095), k = 4096 - in;
        uint8_t *p = pages[x >> 12] + in;
        if (k > n)
            k = n;
        if (write)
            memcpy(p, b, k);
        else
            memcpy(b, p, k);
        b += k;
        at += k;
        n -= k;
    }
}

struct copy_op {
    uint64_t s_u;
    uint16_t s_dom, s_off;
    uint32_t pad0;
    uint64_t d_u;
    uint16_t d_dom, d_off;
    uint32_t pad1;
    uint16_t len, flags;
    int16_t status;
    uint16_t pad2;
};
_Static_assert(sizeof(struct copy_op) == PXC_OP_SIZE, "struct gnttab_copy is 40 bytes");

/* Op i of the array: a pointer straight into guest memory when the op lies
 * within one page (the common case), else a copy in `tmp`. */
static struct copy_op *op_at(uint8_t *const *pages, uint32_t first_off, uint32_t i,
                             struct copy_op *tmp)
{
    uint64_t x = (uint64_t)first_off + (uint64_t)i * PXC_OP_SIZE;
    if ((x & 4095) <= 4096 - PXC_OP_SIZE)
        return (struct copy_op *)(pages[x >> 12] + (x & 4095));
    ops_rw(pages, first_off, (uint64_t)i * PXC_OP_SIZE, tmp, sizeof(*tmp), 0);
    return tmp;
}

/*
 * The guest's page walk for the op array (mm.FrameTable.translate, the
 * reference, in C: it costs Python ~6 us a page): for each of `npages`
 * pages from va0, the four levels must be present, user and (for `write`)
 * writable, every table and the page itself one of the domain's RAM frames
 * (pfn < nr_pages).  pages[k] gets the page's host address; pfns[5k..5k+4]
 * the frames walked (Python checks them against the frames the guest gave
 * back).  -1 when anything is unusual (a fault, a frame that is not plain
 * RAM): Python then walks itself and decides.
 */
#define PTE_P 1ull
#define PTE_RW 2ull
#define PTE_U 4ull
#define PTE_ADDR 0x000FFFFFFFFFF000ull
int pxc_walk(const struct pxc_self *self, uint64_t l4, uint64_t va0, uint32_t npages, int write,
             uint8_t **pages, uint64_t *pfns)
{
    static const int shifts[4] = { 39, 30, 21, 12 };
    for (uint32_t k = 0; k < npages; k++) {
        uint64_t va = (va0 & ~4095ull) + ((uint64_t)k << 12), table = l4;
        if (va >= 0x0000800000000000ull && va < 0xFFFF800000000000ull)
            return -1;
        for (int lv = 0; lv < 4; lv++) {
            uint64_t pfn = table - self->mfn_base, e;
            if (table < self->mfn_base || pfn >= self->nr_pages)
                return -1;
            pfns[5 * k + lv] = pfn;
            e = __atomic_load_n((uint64_t *)(self->ram + (pfn << 12)) + ((va >> shifts[lv]) & 511),
                                __ATOMIC_RELAXED);
            if ((e & (PTE_P | PTE_U)) != (PTE_P | PTE_U) || (write && !(e & PTE_RW)))
                return -1;
            table = (e & PTE_ADDR) >> 12;
        }
        if (table < self->mfn_base || table - self->mfn_base >= self->nr_pages)
            return -1;
        pfns[5 * k + 4] = table - self->mfn_base;
        pages[k] = self->ram + ((table - self->mfn_base) << 12);
    }
    return 0;
}

int pxc_scan(uint8_t *const *pages, uint32_t first_off, uint32_t count, uint16_t me,
             uint16_t *domids, int max_domids, uint64_t *own_pfns, uint32_t *n_own)
{
    int nd = 0;
    uint32_t no = 0;
    uint64_t seen[64];  /* own frames already listed (a direct-mapped filter: fewer repeats) */
    memset(seen, 0xFF, sizeof(seen));
    for (uint32_t i = 0; i < count; i++) {
        struct copy_op tmp, o, *op = op_at(pages, first_off, i, &tmp);
        memcpy(&o, op, sizeof(o));
        __asm__ volatile("" : : "r"(&o) : "memory");
        op = &o;
        if ((uint32_t)op->s_off + op->len > 4096 || (uint32_t)op->d_off + op->len > 4096)
            continue;
        for (int side = 0; side < 2; side++) {
            uint16_t dom = side ? op->d_dom : op->s_dom;
            uint64_t u = side ? op->d_u : op->s_u;
            if (op->flags & (side ? GNTCOPY_dest_gref : GNTCOPY_source_gref)) {
                int k;
                if (dom == DOMID_SELF)
                    dom = me;
                for (k = 0; k < nd && domids[k] != dom; k++)
                    ;
                if (k == nd) {
                    if (nd == max_domids)
                        return -1;
                    domids[nd++] = dom;
                }
            } else if (dom == DOMID_SELF || dom == me) {
                if (seen[u & 63] != u) {
                    seen[u & 63] = u;
                    own_pfns[no++] = u;
                }
            }
        }
    }
    *n_own = no;
    return nd;
}

struct side {
    uint8_t *buf;
    const struct pxc_peer *p;
    uint64_t pfn;
    uint32_t ref;
    uint8_t counted, wheld, own_held;
};

static void side_undo(const struct pxc_self *self, struct side *s)
{
    if (s->wheld)
        ae_unhold(s->p->active, s->p->types, s->p->max_pages, s->ref);
    if (s->counted && --s->p->counts[s->ref] == 0) {
        uint16_t *flags = (uint16_t *)(s->p->gt + (uint64_t)s->ref * 8);
        __atomic_fetch_and(flags, (uint16_t)~(GTF_reading | GTF_writing), __ATOMIC_SEQ_CST);
    }
    if (s->own_held)
        tw_unhold(self->types, self->nr_types, s->pfn);
}

static int side_acquire(const struct pxc_self *self, const struct pxc_peer *peers, int n_peers,
                        uint64_t u, uint16_t dom, int is_ref, int reading, struct side *s)
{
    memset(s, 0, sizeof(*s));
    if (!is_ref) {
        uint64_t pfn = u - self->mfn_base;
        if (dom != DOMID_SELF && dom != self->domid)
            return GNTST_permission_denied;
        if (u < self->mfn_base || pfn >= self->nr_pages)
            return GNTST_bad_page;
        if (!reading) {
            if (!tw_hold(self->types, self->nr_types, pfn))
                return GNTST_general_error;
            s->own_held = 1;
        }
        s->pfn = pfn;
        s->buf = self->ram + (pfn << 12);
        return GNTST_okay;
    }
    const struct pxc_peer *p = NULL;
    if (dom == DOMID_SELF)
        dom = self->domid;
    for (int k = 0; k < n_peers; k++)
        if (peers[k].domid == dom)
            p = &peers[k];
    if (!p)  /* the op changed since pxc_scan (the guest wrote the array meanwhile) */
        return PXC_UNKNOWN_PEER;
    if (p->err)
        return p->err;
    uint32_t ref = (uint32_t)u;  /* union { grant_ref_t ref; xen_pfn_t gmfn; } */
    if (ref >= p->nr_refs || ref >= p->max_refs)
        return GNTST_bad_gntref;
    uint32_t *word = (uint32_t *)(p->gt + (uint64_t)ref * 8);
    uint32_t want = GTF_reading | (reading ? 0 : GTF_writing);
    uint32_t w = __atomic_load_n(word, __ATOMIC_SEQ_CST);
    for (;;) {
        uint32_t flags = w & 0xFFFF, edom = w >> 16;
        if ((flags & GTF_type_mask) != GTF_permit_access || edom != self->domid)
            return GNTST_general_error;
        if (!reading && (flags & GTF_readonly))
            return GNTST_general_error;
        if (__atomic_compare_exchange_n(word, &w, w | want, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            break;
    }
    s->p = p;
    s->ref = ref;
    p->counts[ref]++;
    s->counted = 1;
    uint32_t frame = __atomic_load_n(word + 1, __ATOMIC_SEQ_CST);
    uint64_t pfn = (uint64_t)frame - self->mfn_base;
    if ((uint64_t)frame < self->mfn_base || pfn >= p->nr_pages)
        return GNTST_bad_page;
    if (!reading) {
        int64_t r = ae_hold(p->active, p->types, p->max_pages, ref, self->domid, pfn);
        if (r < 0)
            return GNTST_general_error;
        s->wheld = 1;
        pfn = (uint64_t)r;
    }
    s->pfn = pfn;
    s->buf = p->mem + (pfn << 12);
    return GNTST_okay;
}

/*
 * Holds kept across the ops of one batch.  Xen's gnttab_copy keeps a side's
 * buffer (the grant acquired, the page typed) from one op to the next while
 * they name the same grant or frame (gnttab_copy_buf_valid) and releases it
 * when they change or the batch ends.  Here the same holds are kept in a
 * small direct-mapped cache of recent sides, so a batch cycling over a few
 * grants does not pay two compare-and-swaps a side per op: a source grant
 * (GTF_reading set and counted) and an own destination frame (its writable
 * type hold).  A hit does what Xen's cached buffer does: no new checks (the
 * hold keeps the entry's status bit, or the page's writable type, in place:
 * the granter cannot end its grant, nor the guest make the page a page
 * table, while it is held).  Everything is released, as Xen does, before the
 * hypercall returns.  Writable grant sides (rare for a guest: netback's
 * copies into guests are pxg_copy) are taken and released per op.
 */
#define PXC_CACHE 64
struct held {
    struct side s;     /* s.buf == NULL: empty */
    uint64_t key;
};

static uint64_t gref_key(const struct pxc_self *self, uint64_t u, uint16_t dom)
{
    if (dom == DOMID_SELF)
        dom = self->domid;
    return ((uint64_t)dom << 32) | (uint32_t)u;
}

static void held_drop(const struct pxc_self *self, struct held *h)
{
    if (h->s.buf)
        side_undo(self, &h->s);
    h->s.buf = NULL;
}

int pxc_copy(const struct pxc_self *self, const struct pxc_peer *peers, int n_peers,
             uint8_t *const *pages, uint32_t first_off, uint32_t count, uint64_t *out)
{
    struct held src_c[PXC_CACHE], dst_c[PXC_CACHE];
    for (int k = 0; k < PXC_CACHE; k++)
        src_c[k].s.buf = dst_c[k].s.buf = NULL;
    for (uint32_t i = 0; i < count; i++) {
        struct copy_op tmp, o, *op = op_at(pages, first_off, i, &tmp);
        struct side src, dst;
        const struct side *sp = &src, *dp = &dst;
        int16_t st;

        /* read once: the guest's other vCPUs may write the array meanwhile */
        memcpy(&o, op, sizeof(o));
        __asm__ volatile("" : : "r"(&o) : "memory");
        uint16_t len = o.len, s_off = o.s_off, d_off = o.d_off, flags = o.flags;
        uint16_t s_dom = o.s_dom, d_dom = o.d_dom;
        uint64_t s_u = o.s_u, d_u = o.d_u;

        memset(&src, 0, sizeof(src));
        memset(&dst, 0, sizeof(dst));
        if ((uint32_t)s_off + len > 4096 || (uint32_t)d_off + len > 4096) {
            st = GNTST_bad_copy_arg;
        } else {
            st = GNTST_okay;
            if (flags & GNTCOPY_source_gref) {
                uint64_t key = gref_key(self, s_u, s_dom);
                struct held *h = &src_c[(key ^ (key >> 32) * 7) % PXC_CACHE];
                if (h->s.buf && h->key == key) {
                    sp = &h->s;
                } else {
                    st = (int16_t)side_acquire(self, peers, n_peers, s_u, s_dom, 1, 1, &src);
                    if (st == GNTST_okay) {  /* keep it for the next ops */
                        held_drop(self, h);
                        h->s = src;
                        h->key = key;
                        memset(&src, 0, sizeof(src));
                        sp = &h->s;
                    }
                }
            } else {
                st = (int16_t)side_acquire(self, peers, n_peers, s_u, s_dom, 0, 1, &src);
            }
            if (st == GNTST_okay) {
                if (!(flags & GNTCOPY_dest_gref) && (d_dom == DOMID_SELF || d_dom == self->domid)
                    && d_u >= self->mfn_base && d_u - self->mfn_base < self->nr_pages) {
                    struct held *h = &dst_c[d_u % PXC_CACHE];
                    if (h->s.buf && h->key == d_u) {
                        dp = &h->s;
                    } else {
                        st = (int16_t)side_acquire(self, peers, n_peers, d_u, d_dom, 0, 0, &dst);
                        if (st == GNTST_okay) {
                            held_drop(self, h);
                            h->s = dst;
                            h->key = d_u;
                            memset(&dst, 0, sizeof(dst));
                            dp = &h->s;
                        }
                    }
                } else {
                    st = (int16_t)side_acquire(self, peers, n_peers, d_u, d_dom,
                                               !!(flags & GNTCOPY_dest_gref), 0, &dst);
                }
            }
            if (st == PXC_UNKNOWN_PEER) {  /* Python does this op and the rest */
                side_undo(self, &src);
                count = i;
                break;
            }
            if (st == GNTST_okay) {
                memmove(dp->buf + d_off, sp->buf + s_off, len);
                if (dp->p && dp->pfn < dp->p->max_pages)
                    __atomic_fetch_or(&dp->p->dirty[dp->pfn >> 6], 1ull << (dp->pfn & 63),
                                      __ATOMIC_SEQ_CST);
                out[PXC_COPIES]++;
                out[PXC_BYTES] += len;
            }
            side_undo(self, &dst);
            side_undo(self, &src);
        }
        if (st == GNTST_general_error && !out[PXC_GENERAL_ERRORS]++)
            out[PXC_FIRST_GENERAL_ERROR] = i;
        if (op != &tmp)
            __atomic_store_n(&op->status, st, __ATOMIC_RELAXED);
        else
            ops_rw(pages, first_off, (uint64_t)i * PXC_OP_SIZE + PXC_STATUS_OFF, &st, 2, 1);
    }
    for (int k = PXC_CACHE - 1; k >= 0; k--) {
        held_drop(self, &dst_c[k]);
        held_drop(self, &src_c[k]);
    }
    return (int)count;
}

/*
 * A backend's grant copy (netback's GNTTABOP_copy, done in the guest's own
 * process): n ops between the guest's granted pages and host buffers, each
 * checked and held exactly as pxg_acquire does (the backend acting as domain
 * `me`), copied, and released, under one lock hold.  status[i] is Xen's
 * GNTST_* for op i: bad_copy_arg (offset + len beyond the page), bad_gntref
 * (ref beyond the table), general_error (not granted to `me`, read-only for
 * a write into the guest, a page table or descriptor page, too many holds),
 * bad_page (the frame is not the guest's RAM).  A page written is marked in
 * the dirty bitmap while the toolstack logs dirty pages.  Returns how many
 * ops copied.  Takes no Python state: call it without the GIL.
 */
int pxg_copy(struct pxg *g, const struct pxg_copy_op *ops, int n, uint16_t me, int16_t *status)
{
    int done = 0;
    int logdirty = __atomic_load_n(&g->logdirty, __ATOMIC_RELAXED);
    pthread_mutex_lock(&g->lock);
    for (int i = 0; i < n; i++) {
        const struct pxg_copy_op *op = &ops[i];
        int64_t off;
        if ((uint32_t)op->offset + op->len > 4096) {
            status[i] = GNTST_bad_copy_arg;
            continue;
        }
        off = acquire_locked(g, op->ref, me, !!op->to_guest);
        if (off < 0) {
            status[i] = off == PXG_E_RANGE ? GNTST_bad_gntref
                      : off == PXG_E_FRAME ? GNTST_bad_page : GNTST_general_error;
            continue;
        }
        if (op->to_guest)
            memcpy(g->ram + off + op->offset, op->buf, op->len);
        else
            memcpy(op->buf, g->ram + off + op->offset, op->len);
        if (op->to_guest && logdirty)
            pxg_mark_dirty(g, (uint64_t)off >> 12);
        release_locked(g, op->ref);
        status[i] = GNTST_okay;
        done++;
    }
    pthread_mutex_unlock(&g->lock);
    return done;
}
