/*
 * gnttab.c - grant tables v1: our own table (granting) and mapping or
 * copying other domains' grants.
 *
 * The table frames belong to the hypervisor's grant-table code; setup_table
 * returns their MFNs (for a PV guest the frame list is machine frames) and
 * we map them over pages taken from the allocator, which stay reserved.
 */
#include "gnttab.h"
#include "events.h"
#include "hypercall.h"
#include "mm.h"

#define ENTRIES_PER_FRAME (PAGE_SIZE / sizeof(struct grant_entry_v1))
#define MAX_ENTRIES       (GNTTAB_MAX_FRAMES * ENTRIES_PER_FRAME)

static struct grant_entry_v1 *table;
static unsigned int nr_frames, max_frames;
static unsigned int nr_entries;
/* Frames mapped now: all of them, but for a while after a suspend, when only
 * those that hold a ref ever handed out are (gnttab_resume); the others are
 * mapped when a ref of theirs is first needed (get_free_ref).  hi_ref: the
 * highest ref ever handed out. */
static unsigned int mapped;
static unsigned int hi_ref;
static unsigned long resume_mfns[GNTTAB_MAX_FRAMES];  /* setup_table's frames, for the rest */
static unsigned int resumed_mapped;     /* for gnttab_resume_report */
static int map_rest(void);

/* Free refs: a stack (refs below GNTTAB_NR_RESERVED_ENTRIES never enter it). */
static uint16_t free_refs[MAX_ENTRIES];
static unsigned int nr_free;

static int init_tried;

int gnttab_ready(void)
{
    if (!init_tried)
        gnttab_init();
    return table != NULL;
}

unsigned int gnttab_nr_frames(void) { return table ? nr_frames : 0; }
unsigned int gnttab_max_frames(void) { return max_frames; }
struct grant_entry_v1 *gnttab_table(void) { return table; }

void gnttab_init(void)
{
    struct gnttab_query_size q = { .dom = DOMID_SELF };
    unsigned long frames[GNTTAB_MAX_FRAMES];
    struct gnttab_setup_table st;
    char *va;
    long rc;

    if (init_tried)
        return;
    init_tried = 1;
    rc = HYPERVISOR_grant_table_op(GNTTABOP_query_size, &q, 1);
    if (rc < 0 || q.status != GNTST_okay) {
        printk("pyxen-guest: gnttab: not available (query_size rc=%ld status=%d)\n",
               rc, q.status);
        return;
    }
    max_frames = q.max_nr_frames;
    nr_frames = MIN(q.max_nr_frames, (uint32_t)GNTTAB_MAX_FRAMES);
    if (nr_frames < q.nr_frames)     /* never ask for fewer than we have */
        nr_frames = MIN(q.nr_frames, (uint32_t)GNTTAB_MAX_FRAMES);
    if (!nr_frames) {
        printk("pyxen-guest: gnttab: not available (max_nr_frames=0)\n");
        return;
    }

    memset(frames, 0, sizeof(frames));
    st = (struct gnttab_setup_table){
        .dom = DOMID_SELF, .nr_frames = nr_frames, .frame_list = frames,
    };
    rc = HYPERVISOR_grant_table_op(GNTTABOP_setup_table, &st, 1);
    if (rc < 0 || st.status != GNTST_okay) {
        printk("pyxen-guest: gnttab: setup_table(%u) failed rc=%ld status=%d\n",
               nr_frames, rc, st.status);
        nr_frames = 0;
        return;
    }

    va = alloc_pages(nr_frames);
    if (!va) {
        printk("pyxen-guest: gnttab: no memory for the table mapping\n");
        nr_frames = 0;
        return;
    }
    for (unsigned int i = 0; i < nr_frames; i++) {
        rc = HYPERVISOR_update_va_mapping((unsigned long)va + i * PAGE_SIZE,
                                          (frames[i] << PAGE_SHIFT) | PTE_KERNEL_RW,
                                          UVMF_INVLPG);
        if (rc) {
            /* The pages stay reserved: some may map grant frames now. */
            printk("pyxen-guest: gnttab: mapping frame %u (mfn 0x%lx) failed rc=%ld\n",
                   i, frames[i], rc);
            nr_frames = 0;
            return;
        }
    }

    nr_entries = nr_frames * ENTRIES_PER_FRAME;
    mapped = nr_frames;
    nr_free = 0;
    /* Push high refs first so low refs come out first. */
    for (unsigned int r = nr_entries; r-- > GNTTAB_NR_RESERVED_ENTRIES; )
        free_refs[nr_free++] = (uint16_t)r;
    table = (struct grant_entry_v1 *)va;
    printk("pyxen-guest: gnttab: %u frames (max %u), %u refs, table at %p\n",
           nr_frames, max_frames, nr_entries, (void *)table);
}

static int get_free_ref(void)
{
    unsigned long flags = irq_save();
    int ref = nr_free ? free_refs[--nr_free] : -XEN_ENOSPC;

    /* Refs come out low first, and those freed go back on top: a ref in a
     * frame not mapped again since the suspend comes out only once every
     * ref below it is in use. */
    if (ref >= 0 && (unsigned int)ref >= mapped * ENTRIES_PER_FRAME && map_rest()) {
        free_refs[nr_free++] = (uint16_t)ref;
        ref = -XEN_ENOSPC;
    }
    if (ref >= 0 && (unsigned int)ref > hi_ref)
        hi_ref = (unsigned int)ref;
    irq_restore(flags);
    return ref;
}

static void put_free_ref(grant_ref_t ref)
{
    unsigned long flags = irq_save();
    free_refs[nr_free++] = (uint16_t)ref;
    irq_restore(flags);
}

int gnttab_grant_access(domid_t domid, unsigned long mfn, int readonly)
{
    struct grant_entry_v1 *e;
    int ref;

    if (!gnttab_ready())
        return -XEN_ENOSYS;
    if (mfn > 0xFFFFFFFFUL)         /* v1 frames are 32 bits */
        return -XEN_EINVAL;
    ref = get_free_ref();
    if (ref < 0)
        return ref;
    e = &table[ref];
    WRITE_ONCE(e->domid, domid);
    WRITE_ONCE(e->frame, (uint32_t)mfn);
    wmb();      /* the entry must be complete before it becomes valid */
    WRITE_ONCE(e->flags, (uint16_t)(GTF_permit_access | (readonly ? GTF_readonly : 0)));
    return ref;
}

int gnttab_grant_page(domid_t domid, const void *va, int readonly)
{
    return gnttab_grant_access(domid, virt_to_mfn(va), readonly);
}

int gnttab_end_access(grant_ref_t ref)
{
    uint16_t flags, *fp;

    if (!table)
        return -XEN_ENOSYS;
    if (ref < GNTTAB_NR_RESERVED_ENTRIES || ref >= nr_entries || ref >= mapped * ENTRIES_PER_FRAME)
        return -XEN_EINVAL;     /* (never handed out: its frame is not mapped) */
    fp = &table[ref].flags;
    /* Guess the common value rather than load it first (the backend's CPU
     * just had the line): a wrong guess loads the real value for the loop. */
    flags = GTF_permit_access;
    if (__atomic_compare_exchange_n(fp, &flags, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        put_free_ref(ref);
        return 0;
    }
    do {
        /* In use by the grantee (mapped or mid-copy): can't revoke yet. */
        if (flags & (GTF_reading | GTF_writing))
            return -XEN_EBUSY;
    } while (!__atomic_compare_exchange_n(fp, &flags, 0, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    put_free_ref(ref);
    return 0;
}

long gnttab_map(domid_t dom, grant_ref_t ref, int readonly, unsigned long host_addr,
                grant_handle_t *handle, int16_t *status)
{
    struct gnttab_map_grant_ref op = {
        .host_addr = host_addr,
        .flags = GNTMAP_host_map | (readonly ? GNTMAP_readonly : 0),
        .ref = ref,
        .dom = dom,
    };
    long rc = HYPERVISOR_grant_table_op(GNTTABOP_map_grant_ref, &op, 1);

    if (status)
        *status = rc < 0 ? GNTST_general_error : op.status;
    if (handle)
        *handle = op.handle;
    return rc;
}

long gnttab_unmap(unsigned long host_addr, grant_handle_t handle, int16_t *status)
{
    struct gnttab_unmap_grant_ref op = {
        .host_addr = host_addr, .dev_bus_addr = 0, .handle = handle,
    };
    long rc = HYPERVISOR_grant_table_op(GNTTABOP_unmap_grant_ref, &op, 1);

    if (status)
        *status = rc < 0 ? GNTST_general_error : op.status;
    return rc;
}

long gnttab_copy(struct gnttab_copy *ops, unsigned int n)
{
    return HYPERVISOR_grant_table_op(GNTTABOP_copy, ops, n);
}

const char *gnttab_strerror(int16_t status)
{
    static const char *const msgs[] = {
        "okay", "undefined error", "unrecognised domain id",
        "invalid grant reference", "invalid mapping handle",
        "invalid virtual address", "invalid device address",
        "no spare translation slot in the I/O MMU", "permission denied",
        "bad page", "copy arguments cross page boundary",
        "page address size too large", "operation not done; try again",
        "out of space",
    };
    int i = -status;

    return (i >= 0 && (unsigned int)i < ARRAY_SIZE(msgs)) ? msgs[i] : "unknown status";
}

void *gnttab_alloc_map_area(unsigned long n)
{
    char *va = alloc_pages(n);

    if (!va)
        return NULL;
    for (unsigned long i = 0; i < n; i++) {
        long rc = HYPERVISOR_update_va_mapping((unsigned long)va + i * PAGE_SIZE, 0,
                                               UVMF_INVLPG);
        if (rc) {
            printk("gnttab: unmapping map-area page %p failed rc=%ld\n",
                   (void *)(va + i * PAGE_SIZE), rc);
            gnttab_free_map_area(va, i);
            return NULL;
        }
    }
    return va;
}

void gnttab_free_map_area(void *va, unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) {
        unsigned long a = (unsigned long)va + i * PAGE_SIZE;
        long rc = HYPERVISOR_update_va_mapping(
            a, (pfn_to_mfn(virt_to_pfn((void *)a)) << PAGE_SHIFT) | PTE_KERNEL_RW,
            UVMF_INVLPG);
        if (rc) {
            /* Still holds a grant mapping, or worse: keep the page out of use. */
            printk("gnttab: restoring map-area page 0x%lx failed rc=%ld (leaked)\n", a, rc);
            return;
        }
    }
    free_pages(va, n);
}

/*
 * Suspend/resume (main.c kernel_suspend), as Linux's gnttab_suspend and
 * gnttab_resume: the table's frames are Xen's, not the domain's RAM, so they
 * are unmapped before the save (our pages under them come back) and mapped
 * again after.  A restored domain's table is a new, empty one: it is set up
 * again with the same number of frames; grants made before the save are
 * gone with the old table (frontends grant again when they reconnect).
 */
/*
 * The table's mappings of frames [from, to) changed with one multicall (as
 * Linux's xen_mc batches do): one trap into the hypervisor instead of one
 * per frame, which a suspend and a resume both pay while the domain is
 * stopped (a migration's downtime).  mfns[i] is the frame to map at frame
 * i.  Returns the index of the first entry that failed, or -1.
 */
static int remap_frames(const unsigned long *mfns, unsigned int from, unsigned int to)
{
    static struct multicall_entry mc[GNTTAB_MAX_FRAMES];
    char *va = (char *)table;
    unsigned int n = 0;

    for (unsigned int i = from; i < to; i++, n++) {
        mc[n].op = __HYPERVISOR_update_va_mapping;
        mc[n].result = 0;
        mc[n].args[0] = (unsigned long)va + i * PAGE_SIZE;
        mc[n].args[1] = (mfns[i] << PAGE_SHIFT) | PTE_KERNEL_RW;
        mc[n].args[2] = UVMF_INVLPG;
    }
    if (!n)
        return -1;
    if (HYPERVISOR_multicall(mc, n))
        return (int)from;
    for (unsigned int i = 0; i < n; i++)
        if (mc[i].result)
            return (int)(from + i);
    return -1;
}

/* Events masked.  The frames a resume left unmapped: 0, or -1 (the table is then unusable). */
static int map_rest(void)
{
    int bad;

    if (mapped >= nr_frames)
        return 0;
    bad = remap_frames(resume_mfns, mapped, nr_frames);
    if (bad >= 0) {
        early_printk("gnttab: mapping frame %d failed\n", bad);
        return -1;
    }
    mapped = nr_frames;
    return 0;
}

/*
 * Suspend/resume (main.c kernel_suspend), as Linux's gnttab_suspend and
 * gnttab_resume: the table's frames are Xen's, not the domain's RAM, so they
 * are unmapped before the save (our pages under them come back) and mapped
 * again after.  A restored domain's table is a new, empty one: it is set up
 * again with the same number of frames; grants made before the save are
 * gone with the old table (frontends grant again when they reconnect).
 * Only the frames that hold a ref ever handed out are mapped at the resume
 * (usually the first one or two of 32), the others when a ref of theirs is
 * first needed: both the suspend's unmapping and the resume's mapping run
 * while the domain is stopped, a frame's update_va_mapping each.
 */
void gnttab_suspend(void)
{
    unsigned long mfns[GNTTAB_MAX_FRAMES];
    char *va = (char *)table;
    int bad;

    if (!table)
        return;
    for (unsigned int i = 0; i < mapped; i++)
        mfns[i] = pfn_to_mfn(virt_to_pfn(va + i * PAGE_SIZE));
    bad = remap_frames(mfns, 0, mapped);
    if (bad >= 0)
        early_printk("gnttab: suspend: unmapping frame %d failed\n", bad);
}

void gnttab_resume(int restored)
{
    struct gnttab_setup_table st = {
        .dom = DOMID_SELF, .nr_frames = nr_frames, .frame_list = resume_mfns,
    };
    unsigned int need = MIN(nr_frames, hi_ref / ENTRIES_PER_FRAME + 1);
    long rc;
    int bad;

    if (!table)
        return;
    memset(resume_mfns, 0, sizeof(resume_mfns));
    rc = HYPERVISOR_grant_table_op(GNTTABOP_setup_table, &st, 1);
    if (rc < 0 || st.status != GNTST_okay) {
        printk("pyxen-guest: gnttab: resume: setup_table(%u) failed rc=%ld status=%d\n",
               nr_frames, rc, st.status);
        table = NULL;
        return;
    }
    bad = remap_frames(resume_mfns, 0, need);
    if (bad >= 0) {
        printk("pyxen-guest: gnttab: resume: mapping frame %d failed\n", bad);
        table = NULL;
        return;
    }
    mapped = need;
    resumed_mapped = restored ? need : 0;
}

/* The resume's log line, said late (xenbus_resume, after the drivers'
 * reconnect): a console write is an exit and the console backend's work,
 * while the network is still down. */
void gnttab_resume_report(void)
{
    if (resumed_mapped)
        printk("pyxen-guest: gnttab: %u frames set up again, %u mapped (grants before the save "
               "are gone)\n", nr_frames, resumed_mapped);
    resumed_mapped = 0;
}
