/*
 * gnttab.h - grant tables, version 1 (grant_table.h).
 *
 * The grant table is an array of grant_entry_v1 in frames the hypervisor
 * owns and shares with us: GNTTABOP_setup_table hands back their machine
 * frame numbers and we map them over pages we reserve.  Granting is pure
 * memory writes into that table (domid and frame first, a write barrier,
 * then the flags that make the entry live); the hypervisor sets
 * GTF_reading/GTF_writing in our entry while another domain has the frame
 * mapped or is copying it.
 *
 * Mapping someone else's grant: gnttab_map() with GNTMAP_host_map and a
 * page-aligned VA whose PTE the hypervisor writes (gnttab_alloc_map_area()
 * gives such VAs: pages we own, with their mapping removed).
 */
#ifndef PYXEN_GNTTAB_H
#define PYXEN_GNTTAB_H

#include "kernel.h"
#include "hypercall.h"

#ifndef __HYPERVISOR_grant_table_op
#define __HYPERVISOR_grant_table_op 20
#endif

typedef uint32_t grant_ref_t;
typedef uint32_t grant_handle_t;

/* grant_entry_v1.flags */
#define GTF_invalid          (0U << 0)
#define GTF_permit_access    (1U << 0)
#define GTF_accept_transfer  (2U << 0)
#define GTF_type_mask        (3U << 0)
#define GTF_readonly         (1U << 2)
#define GTF_reading          (1U << 3)
#define GTF_writing          (1U << 4)

#ifndef XEN_ENOSPC
#define XEN_ENOSPC  28
#endif

#define GNTTAB_NR_RESERVED_ENTRIES 8    /* 0 = console, 1 = xenstore (toolstack's) */

/* GNTTABOP_* */
#define GNTTABOP_map_grant_ref    0
#define GNTTABOP_unmap_grant_ref  1
#define GNTTABOP_setup_table      2
#define GNTTABOP_copy             5
#define GNTTABOP_query_size       6
#define GNTTABOP_get_version     10

/* gnttab_map_grant_ref.flags */
#define GNTMAP_device_map       (1U << 0)
#define GNTMAP_host_map         (1U << 1)
#define GNTMAP_readonly         (1U << 2)
#define GNTMAP_application_map  (1U << 3)
#define GNTMAP_contains_pte     (1U << 4)

/* gnttab_copy.flags */
#define GNTCOPY_source_gref     (1U << 0)
#define GNTCOPY_dest_gref       (1U << 1)

/* Status codes (the "status" OUT fields; the hypercall's own rc is separate). */
#define GNTST_okay               0
#define GNTST_general_error     (-1)
#define GNTST_bad_domain        (-2)
#define GNTST_bad_gntref        (-3)
#define GNTST_bad_handle        (-4)
#define GNTST_bad_virt_addr     (-5)
#define GNTST_bad_dev_addr      (-6)
#define GNTST_no_device_space   (-7)
#define GNTST_permission_denied (-8)
#define GNTST_bad_page          (-9)
#define GNTST_bad_copy_arg     (-10)
#define GNTST_address_too_big  (-11)
#define GNTST_eagain           (-12)
#define GNTST_no_space         (-13)

struct grant_entry_v1 {
    uint16_t flags;
    domid_t  domid;
    uint32_t frame;
};

struct gnttab_map_grant_ref {
    uint64_t host_addr;
    uint32_t flags;
    grant_ref_t ref;
    domid_t  dom;
    int16_t  status;            /* OUT */
    grant_handle_t handle;      /* OUT */
    uint64_t dev_bus_addr;      /* OUT */
};

struct gnttab_unmap_grant_ref {
    uint64_t host_addr;
    uint64_t dev_bus_addr;
    grant_handle_t handle;
    int16_t  status;            /* OUT */
};

struct gnttab_setup_table {
    domid_t  dom;
    uint32_t nr_frames;
    int16_t  status;            /* OUT */
    unsigned long *frame_list;  /* OUT: xen_pfn_t[nr_frames] */
};

struct gnttab_copy_ptr {
    union {
        grant_ref_t ref;
        unsigned long gmfn;     /* xen_pfn_t */
    } u;
    domid_t  domid;
    uint16_t offset;
};

struct gnttab_copy {
    struct gnttab_copy_ptr source, dest;
    uint16_t len;
    uint16_t flags;             /* GNTCOPY_* */
    int16_t  status;            /* OUT */
};

struct gnttab_query_size {
    domid_t  dom;
    uint32_t nr_frames;         /* OUT */
    uint32_t max_nr_frames;     /* OUT */
    int16_t  status;            /* OUT */
};

struct gnttab_get_version {
    domid_t  dom;
    uint16_t pad;
    uint32_t version;           /* OUT */
};

_Static_assert(sizeof(struct grant_entry_v1) == 8, "grant_entry_v1 size");
_Static_assert(offsetof(struct grant_entry_v1, domid) == 2, "grant_entry_v1.domid");
_Static_assert(offsetof(struct grant_entry_v1, frame) == 4, "grant_entry_v1.frame");
_Static_assert(sizeof(struct gnttab_map_grant_ref) == 32, "gnttab_map_grant_ref size");
_Static_assert(offsetof(struct gnttab_map_grant_ref, flags) == 8, "map.flags");
_Static_assert(offsetof(struct gnttab_map_grant_ref, ref) == 12, "map.ref");
_Static_assert(offsetof(struct gnttab_map_grant_ref, dom) == 16, "map.dom");
_Static_assert(offsetof(struct gnttab_map_grant_ref, status) == 18, "map.status");
_Static_assert(offsetof(struct gnttab_map_grant_ref, handle) == 20, "map.handle");
_Static_assert(offsetof(struct gnttab_map_grant_ref, dev_bus_addr) == 24, "map.dev_bus_addr");
_Static_assert(sizeof(struct gnttab_unmap_grant_ref) == 24, "gnttab_unmap_grant_ref size");
_Static_assert(offsetof(struct gnttab_unmap_grant_ref, handle) == 16, "unmap.handle");
_Static_assert(offsetof(struct gnttab_unmap_grant_ref, status) == 20, "unmap.status");
_Static_assert(sizeof(struct gnttab_setup_table) == 24, "gnttab_setup_table size");
_Static_assert(offsetof(struct gnttab_setup_table, nr_frames) == 4, "setup.nr_frames");
_Static_assert(offsetof(struct gnttab_setup_table, status) == 8, "setup.status");
_Static_assert(offsetof(struct gnttab_setup_table, frame_list) == 16, "setup.frame_list");
_Static_assert(sizeof(struct gnttab_copy_ptr) == 16, "gnttab_copy_ptr size");
_Static_assert(offsetof(struct gnttab_copy_ptr, domid) == 8, "copy_ptr.domid");
_Static_assert(offsetof(struct gnttab_copy_ptr, offset) == 10, "copy_ptr.offset");
_Static_assert(sizeof(struct gnttab_copy) == 40, "gnttab_copy size");
_Static_assert(offsetof(struct gnttab_copy, dest) == 16, "copy.dest");
_Static_assert(offsetof(struct gnttab_copy, len) == 32, "copy.len");
_Static_assert(offsetof(struct gnttab_copy, flags) == 34, "copy.flags");
_Static_assert(offsetof(struct gnttab_copy, status) == 36, "copy.status");
_Static_assert(sizeof(struct gnttab_query_size) == 16, "gnttab_query_size size");
_Static_assert(offsetof(struct gnttab_query_size, max_nr_frames) == 8, "query.max_nr_frames");
_Static_assert(offsetof(struct gnttab_query_size, status) == 12, "query.status");
_Static_assert(sizeof(struct gnttab_get_version) == 8, "gnttab_get_version size");

/* The raw hypercall: cmd, an array of count op structs.  Returns 0 or
 * -errno; per-op results are in each op's status field. */
static inline long HYPERVISOR_grant_table_op(unsigned int cmd, void *uop, unsigned int count)
{
    return _hypercall3(long, __HYPERVISOR_grant_table_op, cmd, uop, count);
}

#define GNTTAB_MAX_FRAMES 32    /* 16384 refs: 32 x 1 MiB block requests in flight */

/* query_size + setup_table (up to GNTTAB_MAX_FRAMES frames) + map, once.
 * Done on first use (gnttab_ready() or the first grant), not at boot: a
 * kernel that never grants keeps Xen's default of no table set up, so the
 * frames after shared_info stay the hypervisor's.  Without grant tables it
 * prints one line and granting fails with -XEN_ENOSYS. */
void gnttab_init(void);
void gnttab_suspend(void);              /* unmap the table frames */
void gnttab_resume(int restored);       /* map them again (set up anew if restored) */
void gnttab_resume_report(void);        /* its log line, once the drivers have reconnected */
int  gnttab_ready(void);            /* initialises if needed; 1 = usable */
unsigned int gnttab_nr_frames(void);        /* frames set up (0 = none) */
unsigned int gnttab_max_frames(void);       /* query_size's max_nr_frames */
struct grant_entry_v1 *gnttab_table(void);  /* our mapped table */

/* Grant domid access to machine frame mfn.  Returns the ref (>= 8) or -errno. */
int  gnttab_grant_access(domid_t domid, unsigned long mfn, int readonly);
/* Same for one of our own pages (page-aligned VA in the linear map). */
int  gnttab_grant_page(domid_t domid, const void *va, int readonly);
/* Revoke: 0 and the ref is free again, or -XEN_EBUSY while the grantee
 * still has the frame mapped / is copying (GTF_reading|GTF_writing). */
int  gnttab_end_access(grant_ref_t ref);

/*
 * Map dom's grant ref at host_addr (GNTMAP_host_map, + GNTMAP_readonly).
 * Returns the hypercall's rc; *status gets the op's GNTST_* status and,
 * when that is GNTST_okay, *handle the mapping handle.
 */
long gnttab_map(domid_t dom, grant_ref_t ref, int readonly, unsigned long host_addr,
                grant_handle_t *handle, int16_t *status);
long gnttab_unmap(unsigned long host_addr, grant_handle_t handle, int16_t *status);
/* GNTTABOP_copy over n ops; per-op status in ops[i].status. */
long gnttab_copy(struct gnttab_copy *ops, unsigned int n);
const char *gnttab_strerror(int16_t status);

/* VAs for gnttab_map: n pages we own, with their own mappings removed.
 * Free (after unmapping any grants) with gnttab_free_map_area. */
void *gnttab_alloc_map_area(unsigned long n);
void  gnttab_free_map_area(void *va, unsigned long n);

#endif /* PYXEN_GNTTAB_H */
