/*
 * xen_abi.h - the subset of the Xen x86_64 PV guest ABI this kernel uses.
 *
 * Written from scratch for pyxen-guest.  Xen's public headers were used
 * only as the source of facts (numbers, field order, sizes); every layout
 * that matters is pinned with _Static_assert below so a typo shows up at
 * compile time rather than as a mysterious boot failure.
 *
 * This header is also included from assembly (head.S / entry.S), so the
 * C-only parts are guarded by __ASSEMBLER__.
 */
#ifndef PYXEN_XEN_ABI_H
#define PYXEN_XEN_ABI_H

/* ---------------------------------------------------------------- */
/* Hypercall numbers (xen.h).  Slot N lives at hypercall_page + N*32. */
#define __HYPERVISOR_set_trap_table      0
#define __HYPERVISOR_mmu_update          1
#define __HYPERVISOR_set_gdt             2
#define __HYPERVISOR_stack_switch        3
#define __HYPERVISOR_set_callbacks       4
#define __HYPERVISOR_fpu_taskswitch      5
#define __HYPERVISOR_memory_op          12
#define __HYPERVISOR_multicall          13
#define __HYPERVISOR_update_va_mapping  14
#define __HYPERVISOR_set_timer_op       15
#define __HYPERVISOR_xen_version        17
#define __HYPERVISOR_console_io         18
#define __HYPERVISOR_vm_assist          21
#define __HYPERVISOR_iret               23
#define __HYPERVISOR_vcpu_op            24
#define __HYPERVISOR_set_segment_base   25
#define __HYPERVISOR_mmuext_op          26
#define __HYPERVISOR_sched_op           29
#define __HYPERVISOR_callback_op        30
#define __HYPERVISOR_event_channel_op   32

#define HYPERCALL_SLOT_SIZE 32

/* Flat segment selectors (arch-x86/xen-x86_64.h).  The 64-bit PV kernel
 * runs in ring 3, so "kernel" selectors are the ring-3 flat ones. */
#define FLAT_KERNEL_CS   0xe033
#define FLAT_KERNEL_SS   0xe02b
#define FLAT_KERNEL_DS   0x0000

/*
 * Default virtual address of the read-only machine-to-phys table.  The
 * authoritative place is what XENMEM_machphys_mapping reports (pyxen moves
 * it, as a hypervisor may).
 */
#define MACH2PHYS_VIRT_START 0xFFFF800000000000UL

/* memory_op commands (memory.h). */
#define XENMEM_current_reservation  3
#define XENMEM_maximum_reservation  4
#define XENMEM_machphys_mapping    12

/* ELF note types (elfnote.h). */
#define XEN_ELFNOTE_ENTRY           1
#define XEN_ELFNOTE_HYPERCALL_PAGE  2
#define XEN_ELFNOTE_VIRT_BASE       3
#define XEN_ELFNOTE_PADDR_OFFSET    4
#define XEN_ELFNOTE_XEN_VERSION     5
#define XEN_ELFNOTE_GUEST_OS        6
#define XEN_ELFNOTE_GUEST_VERSION   7
#define XEN_ELFNOTE_LOADER          8
#define XEN_ELFNOTE_PAE_MODE        9
#define XEN_ELFNOTE_FEATURES       10

/* Event-channel limits for the 2-level ABI on x86_64: 64 words of 64 bits. */
#define EVTCHN_WORD_BITS   64
#define NR_EVENT_CHANNELS  (EVTCHN_WORD_BITS * EVTCHN_WORD_BITS)

/* VIRQs (xen.h) */
#define VIRQ_TIMER    0
#define VIRQ_DEBUG    1
#define VIRQ_CONSOLE  2

/* mmu_update command encoded in the low bits of req.ptr (xen.h). */
#define MMU_NORMAL_PT_UPDATE       0
#define MMU_MACHPHYS_UPDATE        1
#define MMU_PT_UPDATE_PRESERVE_AD  2

/* mmuext_op commands (xen.h). */
#define MMUEXT_PIN_L1_TABLE      0
#define MMUEXT_PIN_L2_TABLE      1
#define MMUEXT_PIN_L3_TABLE      2
#define MMUEXT_PIN_L4_TABLE      3
#define MMUEXT_UNPIN_TABLE       4
#define MMUEXT_NEW_BASEPTR       5
#define MMUEXT_TLB_FLUSH_LOCAL   6
#define MMUEXT_INVLPG_LOCAL      7

/* update_va_mapping flags (xen.h). */
#define UVMF_NONE        0UL
#define UVMF_TLB_FLUSH   1UL
#define UVMF_INVLPG      2UL
#define UVMF_LOCAL       0UL
#define UVMF_ALL         4UL

/* console_io commands (xen.h). */
#define CONSOLEIO_write  0
#define CONSOLEIO_read   1

/* vm_assist (xen.h) */
#define VMASST_CMD_enable   0
#define VMASST_CMD_disable  1

#define DOMID_SELF  0x7FF0U

/* sched_op commands / shutdown reasons (sched.h). */
#define SCHEDOP_yield     0
#define SCHEDOP_block     1
#define SCHEDOP_shutdown  2
#define SCHEDOP_poll      3

#define SHUTDOWN_poweroff  0
#define SHUTDOWN_reboot    1
#define SHUTDOWN_suspend   2
#define SHUTDOWN_crash     3

/* callback_op (callback.h). */
#define CALLBACKOP_register    0
#define CALLBACKOP_unregister  1
#define CALLBACKTYPE_event     0
#define CALLBACKTYPE_failsafe  1
#define CALLBACKTYPE_syscall   2
#define CALLBACKTYPE_nmi       4
#define CALLBACKF_mask_events  (1U << 0)

/* event_channel_op commands (event_channel.h). */
#define EVTCHNOP_bind_interdomain  0
#define EVTCHNOP_bind_virq         1
#define EVTCHNOP_close             3
#define EVTCHNOP_send              4
#define EVTCHNOP_status            5
#define EVTCHNOP_alloc_unbound     6
#define EVTCHNOP_bind_ipi          7
#define EVTCHNOP_unmask            9

/* vcpu_op commands (vcpu.h). */
#define VCPUOP_set_periodic_timer    6
#define VCPUOP_stop_periodic_timer   7
#define VCPUOP_set_singleshot_timer  8
#define VCPUOP_stop_singleshot_timer 9

/* xen_version commands (version.h). */
#define XENVER_version       0
#define XENVER_extraversion  1

/* iret hypercall flags (arch-x86/xen-x86_64.h). */
#define VGCF_in_syscall  (1U << 8)

/* trap_info.flags: bits 0-1 DPL, bit 2 = mask events on entry (arch-x86/xen.h). */
#define TI_DPL_MASK      3
#define TI_MASK_EVENTS   4

/* start_info.flags (xen.h) */
#define SIF_PRIVILEGED     (1U << 0)
#define SIF_INITDOMAIN     (1U << 1)
#define SIF_MOD_START_PFN  (1U << 3)

/* Error codes we care about (errno.h, returned negated). */
#define XEN_EPERM    1
#define XEN_ENOENT   2
#define XEN_EFAULT  14
#define XEN_EBUSY   16
#define XEN_EINVAL  22
#define XEN_ENOSYS  38

/* x86 page-table entry bits. */
#define _PAGE_PRESENT   0x001UL
#define _PAGE_RW        0x002UL
#define _PAGE_USER      0x004UL
#define _PAGE_ACCESSED  0x020UL
#define _PAGE_DIRTY     0x040UL
#define _PAGE_PSE       0x080UL
#define PTE_ADDR_MASK   0x000FFFFFFFFFF000UL

#define X86_EFLAGS_IF   0x200UL

#ifndef __ASSEMBLER__

#include <stdint.h>
#include <stddef.h>

typedef uint32_t evtchn_port_t;
typedef uint16_t domid_t;

/* ---- shared_info and friends (xen.h, arch-x86/xen*.h) ---- */

struct vcpu_time_info {
    uint32_t version;         /* odd while the hypervisor is updating */
    uint32_t pad0;
    uint64_t tsc_timestamp;   /* TSC when system_time was sampled */
    uint64_t system_time;     /* ns since boot at tsc_timestamp */
    uint32_t tsc_to_system_mul; /* 32.32 fixed-point ns per (shifted) tick */
    int8_t   tsc_shift;
    uint8_t  flags;
    uint8_t  pad1[2];
};

struct arch_vcpu_info {
    unsigned long cr2;        /* faulting address of the last #PF */
    unsigned long pad;
};

struct vcpu_info {
    uint8_t  evtchn_upcall_pending;
    uint8_t  evtchn_upcall_mask;     /* our "interrupts disabled" flag */
    uint8_t  pad0[6];
    unsigned long evtchn_pending_sel;
    struct arch_vcpu_info arch;
    struct vcpu_time_info time;
};

#define XEN_LEGACY_MAX_VCPUS 32

struct arch_shared_info {
    unsigned long max_pfn;
    unsigned long pfn_to_mfn_frame_list_list;
    unsigned long nmi_reason;
    unsigned long p2m_cr3;
    unsigned long p2m_vaddr;
    unsigned long p2m_generation;
};

struct shared_info {
    struct vcpu_info vcpu_info[XEN_LEGACY_MAX_VCPUS];
    unsigned long evtchn_pending[EVTCHN_WORD_BITS];
    unsigned long evtchn_mask[EVTCHN_WORD_BITS];
    uint32_t wc_version;      /* odd while the wallclock is being updated */
    uint32_t wc_sec;
    uint32_t wc_nsec;
    uint32_t wc_sec_hi;
    struct arch_shared_info arch;
};

/* ---- start_info (xen.h) ---- */

#define MAX_GUEST_CMDLINE 1024

struct start_info {
    char magic[32];                 /* "xen-3.0-x86_64" */
    unsigned long nr_pages;
    unsigned long shared_info;      /* MACHINE address */
    uint32_t flags;
    unsigned long store_mfn;
    uint32_t store_evtchn;
    union {
        struct {
            unsigned long mfn;      /* MACHINE frame of the console ring */
            uint32_t evtchn;
        } domU;
        struct {
            uint32_t info_off;
            uint32_t info_size;
        } dom0;
    } console;
    unsigned long pt_base;          /* VIRTUAL address of the L4 */
    unsigned long nr_pt_frames;
    unsigned long mfn_list;         /* VIRTUAL address of the p2m array */
    unsigned long mod_start;
    unsigned long mod_len;
    int8_t cmd_line[MAX_GUEST_CMDLINE];
    unsigned long first_p2m_pfn;
    unsigned long nr_p2m_frames;
};

/* ---- hypercall argument structures ---- */

struct trap_info {
    uint8_t  vector;
    uint8_t  flags;           /* TI_DPL_MASK | TI_MASK_EVENTS */
    uint16_t cs;
    unsigned long address;    /* 0 terminates the table */
};

struct mmu_update {
    uint64_t ptr;             /* machine address of PTE | MMU_* command */
    uint64_t val;
};

struct mmuext_op {
    unsigned int cmd;
    union {
        unsigned long mfn;
        unsigned long linear_addr;
    } arg1;
    union {
        unsigned int nr_ents;
        const void *vcpumask;
        unsigned long src_mfn;
    } arg2;
};

struct callback_register {
    uint16_t type;
    uint16_t flags;
    unsigned long address;
};

struct iret_context {
    uint64_t rax, r11, rcx, flags, rip, cs, rflags, rsp, ss;
};

struct evtchn_bind_virq {
    uint32_t virq;
    uint32_t vcpu;
    evtchn_port_t port;       /* OUT */
};

struct evtchn_alloc_unbound {
    domid_t dom, remote_dom;
    evtchn_port_t port;       /* OUT */
};

struct evtchn_send   { evtchn_port_t port; };
struct evtchn_unmask { evtchn_port_t port; };
struct evtchn_close  { evtchn_port_t port; };

struct sched_shutdown {
    unsigned int reason;
};

struct sched_poll {
    evtchn_port_t *ports;
    unsigned int nr_ports;
    uint64_t timeout;
};

struct vcpu_set_periodic_timer {
    uint64_t period_ns;
};

struct xen_machphys_mapping {
    unsigned long v_start, v_end;   /* where the M2P table is mapped */
    unsigned long max_mfn;          /* largest MFN it covers */
};

struct multicall_entry {
    unsigned long op, result;
    unsigned long args[6];
};

/* ---- console ring (io/console.h) ---- */

typedef uint32_t XENCONS_RING_IDX;
#define XENCONS_IN_SIZE   1024
#define XENCONS_OUT_SIZE  2048

struct xencons_interface {
    char in[XENCONS_IN_SIZE];
    char out[XENCONS_OUT_SIZE];
    XENCONS_RING_IDX in_cons, in_prod;
    XENCONS_RING_IDX out_cons, out_prod;
    uint8_t connection;
};

/* ---- layout checks: any mismatch with Xen's ABI fails the build ---- */
#define ABI_SIZE(t, n)       _Static_assert(sizeof(t) == (n), #t " size")
#define ABI_OFF(t, f, n)     _Static_assert(offsetof(t, f) == (n), #t "." #f " offset")

ABI_SIZE(struct vcpu_time_info, 32);
ABI_SIZE(struct arch_vcpu_info, 16);
ABI_SIZE(struct vcpu_info, 64);
ABI_OFF(struct vcpu_info, evtchn_upcall_mask, 1);
ABI_OFF(struct vcpu_info, evtchn_pending_sel, 8);
ABI_OFF(struct vcpu_info, arch, 16);
ABI_OFF(struct vcpu_info, time, 32);
ABI_OFF(struct vcpu_time_info, tsc_timestamp, 8);
ABI_OFF(struct vcpu_time_info, system_time, 16);
ABI_OFF(struct vcpu_time_info, tsc_to_system_mul, 24);
ABI_OFF(struct vcpu_time_info, tsc_shift, 28);
ABI_SIZE(struct shared_info, 3136);
ABI_OFF(struct shared_info, evtchn_pending, 2048);
ABI_OFF(struct shared_info, evtchn_mask, 2560);
ABI_OFF(struct shared_info, wc_version, 3072);
ABI_OFF(struct shared_info, wc_sec, 3076);
ABI_OFF(struct shared_info, wc_nsec, 3080);
ABI_OFF(struct shared_info, wc_sec_hi, 3084);
ABI_OFF(struct shared_info, arch, 3088);
ABI_SIZE(struct start_info, 1168);
ABI_OFF(struct start_info, nr_pages, 32);
ABI_OFF(struct start_info, shared_info, 40);
ABI_OFF(struct start_info, flags, 48);
ABI_OFF(struct start_info, store_mfn, 56);
ABI_OFF(struct start_info, store_evtchn, 64);
ABI_OFF(struct start_info, console.domU.mfn, 72);
ABI_OFF(struct start_info, console.domU.evtchn, 80);
ABI_OFF(struct start_info, pt_base, 88);
ABI_OFF(struct start_info, nr_pt_frames, 96);
ABI_OFF(struct start_info, mfn_list, 104);
ABI_OFF(struct start_info, mod_start, 112);
ABI_OFF(struct start_info, mod_len, 120);
ABI_OFF(struct start_info, cmd_line, 128);
ABI_OFF(struct start_info, first_p2m_pfn, 1152);
ABI_OFF(struct start_info, nr_p2m_frames, 1160);
ABI_SIZE(struct trap_info, 16);
ABI_OFF(struct trap_info, cs, 2);
ABI_OFF(struct trap_info, address, 8);
ABI_SIZE(struct mmu_update, 16);
ABI_SIZE(struct mmuext_op, 24);
ABI_SIZE(struct callback_register, 16);
ABI_OFF(struct callback_register, address, 8);
ABI_SIZE(struct iret_context, 72);
ABI_SIZE(struct evtchn_bind_virq, 12);
ABI_SIZE(struct evtchn_alloc_unbound, 8);
ABI_SIZE(struct sched_poll, 24);
ABI_SIZE(struct multicall_entry, 64);
ABI_SIZE(struct xen_machphys_mapping, 24);
ABI_SIZE(struct xencons_interface, 3092);
ABI_OFF(struct xencons_interface, out, 1024);
ABI_OFF(struct xencons_interface, in_cons, 3072);
ABI_OFF(struct xencons_interface, out_cons, 3080);
ABI_OFF(struct xencons_interface, out_prod, 3084);

#endif /* !__ASSEMBLER__ */
#endif /* PYXEN_XEN_ABI_H */
