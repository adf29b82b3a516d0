/*
 * pyxen's native data path: the few loops that run per request or per page
 * and would cost Python tens of microseconds each.  Python keeps the control
 * plane (xenstore, connection, errors, formats' metadata); everything here is
 * called through ctypes (pyxen/native/__init__.py).
 *
 * Facts come from Xen's public headers: grant_table.h (grant_entry_v1,
 * GTF_*), io/ring.h (shared ring indexes and event suppression),
 * io/blkif.h (requests, responses, indirect segments).
 */
#ifndef PYXEN_NATIVE_H
#define PYXEN_NATIVE_H

#include <pthread.h>
#include <stdint.h>

/* grant_table.h, v1 */
#define GTF_permit_access 1u
#define GTF_type_mask 3u
#define GTF_readonly (1u << 2)
#define GTF_reading (1u << 3)
#define GTF_writing (1u << 4)

/* pxg_acquire errors (Python turns them into messages that name the ref) */
#define PXG_E_RANGE (-1)    /* ref beyond the table */
#define PXG_E_PERM (-2)     /* not a permit_access entry granted to us */
#define PXG_E_RDONLY (-3)   /* write access to a read-only grant */
#define PXG_E_FRAME (-4)    /* the frame is not one of the guest's RAM pages */
#define PXG_E_BUSY (-5)     /* too many holds on one ref */
#define PXG_E_TYPE (-6)     /* write to a page table / descriptor page (Xen: bad type) */

/* Page-type words (pyxen/hv/interdomain.py TypeWords), one u32 per RAM page:
 * the owner's write-forbidding type in the low bits, writable holds above. */
#define TW_TYPE_MASK 0x7u
#define TW_HOLD 0x8u
#define TW_MAX (0xFFFFFFFFu - TW_HOLD)
/* Active grant entries (interdomain.py ActiveGrants), one u64 per ref:
 * pfn (bits 0-31) | writable uses (32-47) | holder domid (48-63). */
#define AE_COUNT (1ull << 32)
#define AE_COUNT_MAX 0xFFFFu

/* One guest's grant table as a backend in the guest's own process sees it. */
struct pxg {
    uint8_t *gt;             /* grant_entry_v1 array (xenheap) */
    uint32_t max_refs;
    uint8_t *ram;            /* guest RAM, pfn 0 at offset 0 */
    uint64_t nr_pages;
    uint64_t mfn_base;
    uint64_t *dirty;         /* XH_DIRTY bitmap, one bit per pfn */
    volatile int logdirty;   /* set while the toolstack logs dirty pages */
    uint32_t *types;         /* page-type words, one per RAM page */
    uint64_t nr_types;       /* the domain's max_pages */
    uint64_t *active;        /* active grant entries, one per ref */
    pthread_mutex_t lock;
    uint16_t *holds;         /* per ref: how many backend holds */
    uint8_t *wheld;          /* per ref: we hold one writable use (active entry) */
};

struct pxg *pxg_new(uint8_t *gt, uint32_t max_refs, uint8_t *ram, uint64_t nr_pages,
                    uint64_t mfn_base, uint64_t *dirty, uint32_t *types, uint64_t nr_types,
                    uint64_t *active);
void pxg_free(struct pxg *g);
void pxg_set_logdirty(struct pxg *g, int on);
int64_t pxg_acquire(struct pxg *g, uint32_t ref, uint16_t me, int write);
int pxg_acquire_many(struct pxg *g, const uint32_t *refs, int n, uint16_t me, int write,
                     uint64_t *offs);
void pxg_release(struct pxg *g, uint32_t ref);
void pxg_release_many(struct pxg *g, const uint32_t *refs, int n);
uint32_t pxg_holds(struct pxg *g, uint32_t ref);
void pxg_mark_dirty(struct pxg *g, uint64_t pfn);

/* ---- GNTTABOP_copy as one native call (pyxen/hv/gnttab.py GrantTables.copy_batch) ---- */

/* grant_table.h: GNTCOPY_* flags and the GNTST_* status codes a copy can give */
#define GNTCOPY_source_gref 1u
#define GNTCOPY_dest_gref 2u
#define GNTST_okay 0
#define GNTST_general_error (-1)
#define GNTST_bad_gntref (-3)
#define GNTST_permission_denied (-8)
#define GNTST_bad_page (-9)
#define GNTST_bad_copy_arg (-10)
#define DOMID_SELF 0x7FF0u
#define PXC_OP_SIZE 40      /* struct gnttab_copy */
#define PXC_STATUS_OFF 36   /* its int16_t status */

/* The copying domain itself (the gmfn sides of a copy). */
struct pxc_self {
    uint8_t *ram;            /* its RAM, pfn 0 at offset 0 */
    uint64_t nr_pages;       /* frames a gmfn may name: pfn < nr_pages */
    uint64_t mfn_base;
    uint32_t *types;         /* its page-type words */
    uint64_t nr_types;       /* its max_pages */
    uint16_t domid;
};

/* A granter as this process sees it (interdomain.PeerMemory). */
struct pxc_peer {
    uint8_t *mem;            /* its RAM memfd mapping, pfn 0 at offset 0 */
    uint8_t *gt;             /* its grant_entry_v1 array */
    uint32_t *counts;        /* per ref: this process's uses of GTF_reading/writing */
    uint32_t *types;         /* its page-type words */
    uint64_t *active;        /* its active grant entries */
    uint64_t *dirty;         /* its XH_DIRTY bitmap */
    uint64_t nr_pages;       /* RAM pages a grant may name */
    uint64_t max_pages;      /* bound of types[] and dirty[] */
    uint32_t nr_refs;        /* refs of its table (grant frames * 512, clamped) */
    uint32_t max_refs;       /* bound of counts[] and active[] (MAX_GRANT_REFS) */
    uint16_t domid;          /* as the guest names it (DOMID_SELF already resolved) */
    int16_t err;             /* != 0: unreachable, the status of every op naming it */
};

/* side_acquire: a granter pxc_scan did not see (pxc_copy stops there) */
#define PXC_UNKNOWN_PEER 1
/* out[] of pxc_copy */
enum { PXC_COPIES, PXC_BYTES, PXC_GENERAL_ERRORS, PXC_FIRST_GENERAL_ERROR, PXC_NOUT };

int pxc_walk(const struct pxc_self *self, uint64_t l4, uint64_t va0, uint32_t npages, int write,
             uint8_t **pages, uint64_t *pfns);
int pxc_scan(uint8_t *const *pages, uint32_t first_off, uint32_t count, uint16_t me,
             uint16_t *domids, int max_domids, uint64_t *own_pfns, uint32_t *n_own);
/* Returns how many ops it did: fewer than count if an op named a granter
 * the peers table lacks (Python does that op and the rest). */
int pxc_copy(const struct pxc_self *self, const struct pxc_peer *peers, int n_peers,
             uint8_t *const *pages, uint32_t first_off, uint32_t count, uint64_t *out);

/* A backend's grant copy op (pxg_copy; GrantTables.host_copy). */
struct pxg_copy_op {
    uint32_t ref;
    uint16_t offset, len;    /* within the granted page */
    uint8_t *buf;            /* host buffer */
    uint32_t to_guest;       /* 1: buf -> the guest's page, 0: the guest's page -> buf */
    uint32_t pad;
};

int pxg_copy(struct pxg *g, const struct pxg_copy_op *ops, int n, uint16_t me, int16_t *status);

/* ---- inter-domain event delivery (evt.c; pyxen/hv/evtchn.py NativeEventHub) ---- */

#define PXE_MAX_VCPUS 128
#define PXE_MAX_PORTS 4096           /* EVTCHN_2L_NR_CHANNELS on 64-bit */
#define PXE_KICK_SIGNAL 10           /* SIGUSR1: pyxen.kvm.KICK_SIGNAL */

struct pxe_vcpu {
    uint64_t fired[PXE_MAX_PORTS / 64];  /* ports the pump saw, not yet delivered */
    int wake_fd;                     /* eventfd the vCPU sleeps on in pxe_wait */
    int waiting;                     /* 1 while it does */
    int tid;                         /* its thread (kernel tid), 0: not attached */
    uint8_t *immediate_exit;         /* &kvm_run.immediate_exit */
    uint64_t poll_ns;                /* pxe_wait's adaptive poll before it sleeps */
};

struct pxe_hub {
    int epfd, stop_fd;               /* the pump's epoll (edge-triggered), its stop */
    int epfd_v;                      /* the same eventfds, level-triggered: sleepers poll it */
    int sleepers;                    /* vCPUs in pxe_wait */
    pthread_mutex_t lock;            /* kicks against pxe_attach (a vCPU's tid, kvm_run) */
    pthread_t thread;
    uint32_t nr_vcpus;
    uint32_t si_pending, si_mask;    /* shared_info offsets (abi.SI_EVTCHN_*) */
    uint32_t vi_sel, vi_upcall;      /* vcpu_info offsets (abi.VI_*) */
    uint64_t events;                 /* events the pump took (statistics) */
    uint64_t max_poll_ns;            /* bound of vcpus[].poll_ns, 0: never poll */
    uint64_t polled, poll_hits;      /* waits that polled, and found their event (statistics) */
    uint64_t kicks_saved;            /* fires that found their word's kick outstanding (statistics) */
    uint32_t port_vcpu[PXE_MAX_PORTS];
    int port_fd[PXE_MAX_PORTS];      /* the watched eventfd + 1, 0: none (under lock) */
    int out_fd[PXE_MAX_PORTS];       /* a send's eventfd + 1, 0: Python sends (GIL) */
    struct pxe_vcpu vcpus[PXE_MAX_VCPUS];
};

struct pxe_hub *pxe_new(uint32_t nr_vcpus, uint32_t si_pending, uint32_t si_mask,
                        uint32_t vi_sel, uint32_t vi_upcall);
void pxe_free(struct pxe_hub *h);
void pxe_attach(struct pxe_hub *h, uint32_t vcpu, int tid, uint8_t *immediate_exit);
void pxe_bind_vcpu(struct pxe_hub *h, uint32_t port, uint32_t vcpu);
int pxe_watch(struct pxe_hub *h, uint32_t port, int fd, uint32_t vcpu);
int pxe_unwatch(struct pxe_hub *h, uint32_t port, int fd);
int pxe_deliver(struct pxe_hub *h, uint32_t vcpu, uint8_t *si, uint8_t *vi);
int pxe_wait(struct pxe_hub *h, uint32_t vcpu, int64_t timeout_ns);
void pxe_wake(struct pxe_hub *h, uint32_t vcpu);
uint64_t pxe_events(struct pxe_hub *h);
struct pxc_self;
void pxe_set_out(struct pxe_hub *h, uint32_t port, int fd);
void pxe_set_poll(struct pxe_hub *h, uint64_t max_poll_ns);
void pxe_poll_stats(struct pxe_hub *h, uint64_t *out);
int pxe_send(struct pxe_hub *h, const struct pxc_self *self, uint64_t l4, uint64_t va);

#endif
