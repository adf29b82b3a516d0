"""Xen's public ABI: numbers and layouts from xen/include/public/ (x86_64).

Only facts live here: hypercall numbers, sub-op numbers, errno values,
selectors, virtual-address reservations and the byte offsets of the shared
structures.  Offsets are asserted against the sizes the headers state.
"""

from __future__ import annotations

import struct

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# ------------------------------------------------------------- hypercalls (xen.h)
HYPERCALLS = {
    "set_trap_table": 0, "mmu_update": 1, "set_gdt": 2, "stack_switch": 3,
    "set_callbacks": 4, "fpu_taskswitch": 5, "sched_op_compat": 6, "platform_op": 7,
    "set_debugreg": 8, "get_debugreg": 9, "update_descriptor": 10, "memory_op": 12,
    "multicall": 13, "update_va_mapping": 14, "set_timer_op": 15,
    "event_channel_op_compat": 16, "xen_version": 17, "console_io": 18,
    "physdev_op_compat": 19, "grant_table_op": 20, "vm_assist": 21,
    "update_va_mapping_otherdomain": 22, "iret": 23, "vcpu_op": 24,
    "set_segment_base": 25, "mmuext_op": 26, "xsm_op": 27, "nmi_op": 28,
    "sched_op": 29, "callback_op": 30, "xenoprof_op": 31, "event_channel_op": 32,
    "physdev_op": 33, "hvm_op": 34, "sysctl": 35, "domctl": 36, "kexec_op": 37,
    "tmem_op": 38, "argo_op": 39, "xenpmu_op": 40, "dm_op": 41, "hypfs_op": 42,
}
HYPERCALL_NAMES = {v: k for k, v in HYPERCALLS.items()}
HYPERVISOR_iret = 23
NR_HYPERCALL_SLOTS = PAGE_SIZE // 32

# ------------------------------------------------------------- errno (errno.h)
EPERM, ENOENT, ESRCH, EINTR, EIO, ENXIO, E2BIG, ENOEXEC, EBADF = 1, 2, 3, 4, 5, 6, 7, 8, 9
EAGAIN, ENOMEM, EACCES, EFAULT, EBUSY, EEXIST, EXDEV, ENODEV = 11, 12, 13, 14, 16, 17, 18, 19
EINVAL, ENFILE, EMFILE, ENOSPC, EROFS, ERANGE, EDEADLK, ENOSYS = 22, 23, 24, 28, 30, 34, 35, 38
ENOTEMPTY, ENODATA, EOVERFLOW, EALREADY, EISCONN, ETIMEDOUT, EOPNOTSUPP = 39, 61, 75, 114, 106, 110, 95


class XenError(Exception):
    """Raised inside a hypercall handler; becomes ``-errno`` in the guest's rax."""

    def __init__(self, errno: int, why: str = "") -> None:
        super().__init__(errno, why)
        self.errno = errno
        self.why = why


# ------------------------------------------------------------- selectors (xen-x86_64.h)
FLAT_RING3_CS32 = 0xE023
FLAT_RING3_CS64 = 0xE033
FLAT_RING3_DS32 = 0xE02B
FLAT_RING3_DS64 = 0x0000
FLAT_RING3_SS64 = 0xE02B
FLAT_KERNEL_CS = FLAT_RING3_CS64
FLAT_KERNEL_SS = FLAT_RING3_SS64
FLAT_USER_CS = FLAT_RING3_CS64
FLAT_USER_SS = FLAT_RING3_SS64
FIRST_RESERVED_GDT_PAGE = 14
FIRST_RESERVED_GDT_ENTRY = FIRST_RESERVED_GDT_PAGE * 512
# The hypervisor's own ring-0 selectors, as Xen defines them (asm-x86/desc.h).
HYPERVISOR_CS64 = 0xE008
HYPERVISOR_DS = 0xE010
TSS_SELECTOR = 0xE040

HYPERVISOR_VIRT_START = 0xFFFF800000000000
HYPERVISOR_VIRT_END = 0xFFFF880000000000
MACH2PHYS_VIRT_START = 0xFFFF800000000000
MACH2PHYS_VIRT_END = 0xFFFF804000000000
VGCF_in_syscall = 1 << 8

# ------------------------------------------------------------- sub-ops
CONSOLEIO_write, CONSOLEIO_read = 0, 1
XENVER_version, XENVER_extraversion, XENVER_compile_info, XENVER_capabilities = 0, 1, 2, 3
XENVER_changeset, XENVER_platform_parameters, XENVER_get_features, XENVER_pagesize = 4, 5, 6, 7
XENVER_guest_handle, XENVER_commandline, XENVER_build_id = 8, 9, 10
XENVER_extraversion2, XENVER_capabilities2, XENVER_changeset2, XENVER_commandline2 = 11, 12, 13, 14
SCHEDOP_yield, SCHEDOP_block, SCHEDOP_shutdown, SCHEDOP_poll = 0, 1, 2, 3
SCHEDOP_remote_shutdown, SCHEDOP_shutdown_code, SCHEDOP_watchdog = 4, 5, 6
SHUTDOWN_poweroff, SHUTDOWN_reboot, SHUTDOWN_suspend, SHUTDOWN_crash = 0, 1, 2, 3
SHUTDOWN_watchdog, SHUTDOWN_soft_reset = 4, 5
SHUTDOWN_NAMES = {0: "poweroff", 1: "reboot", 2: "suspend", 3: "crash", 4: "watchdog",
                  5: "soft_reset"}
VCPUOP_initialise, VCPUOP_up, VCPUOP_down, VCPUOP_is_up = 0, 1, 2, 3
VCPUOP_get_runstate_info, VCPUOP_register_runstate_memory_area = 4, 5
VCPUOP_set_periodic_timer, VCPUOP_stop_periodic_timer = 6, 7
VCPUOP_set_singleshot_timer, VCPUOP_stop_singleshot_timer = 8, 9
VCPUOP_register_vcpu_info, VCPUOP_send_nmi, VCPUOP_get_physid = 10, 11, 12
VCPU_SSHOTTMR_future = 1
VCPUOP_register_vcpu_time_memory_area, VCPUOP_register_runstate_phys_area = 13, 14
VCPUOP_register_vcpu_time_phys_area = 15
XEN_RUNSTATE_UPDATE = 1 << 63
RUNSTATE_running, RUNSTATE_runnable, RUNSTATE_blocked, RUNSTATE_offline = 0, 1, 2, 3
CALLBACKOP_register, CALLBACKOP_unregister = 0, 1
CALLBACKTYPE_event, CALLBACKTYPE_failsafe, CALLBACKTYPE_syscall = 0, 1, 2
CALLBACKTYPE_nmi, CALLBACKTYPE_syscall32, CALLBACKTYPE_sysenter = 4, 7, 5
CALLBACKF_mask_events = 1
MMU_NORMAL_PT_UPDATE, MMU_MACHPHYS_UPDATE, MMU_PT_UPDATE_PRESERVE_AD = 0, 1, 2
MMU_PT_UPDATE_NO_TRANSLATE = 3
MMUEXT_PIN_L1_TABLE, MMUEXT_PIN_L2_TABLE, MMUEXT_PIN_L3_TABLE = 0, 1, 2
MMUEXT_PIN_L4_TABLE, MMUEXT_UNPIN_TABLE, MMUEXT_NEW_BASEPTR = 3, 4, 5
MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_INVLPG_LOCAL, MMUEXT_TLB_FLUSH_MULTI = 6, 7, 8
MMUEXT_INVLPG_MULTI, MMUEXT_TLB_FLUSH_ALL, MMUEXT_INVLPG_ALL = 9, 10, 11
MMUEXT_FLUSH_CACHE, MMUEXT_SET_LDT, MMUEXT_NEW_USER_BASEPTR = 12, 13, 15
MMUEXT_CLEAR_PAGE, MMUEXT_COPY_PAGE, MMUEXT_FLUSH_CACHE_GLOBAL = 16, 17, 18
UVMF_NONE, UVMF_TLB_FLUSH, UVMF_INVLPG, UVMF_FLUSHTYPE_MASK = 0, 1, 2, 3
UVMF_ALL = 4
VMASST_CMD_enable, VMASST_CMD_disable = 0, 1
VMASST_TYPE_4gb_segments, VMASST_TYPE_4gb_segments_notify = 0, 1
VMASST_TYPE_writable_pagetables, VMASST_TYPE_pae_extended_cr3 = 2, 3
VMASST_TYPE_architectural_iopl, VMASST_TYPE_runstate_update_flag = 4, 5
VMASST_TYPE_m2p_strict = 32
# PV64_VM_ASSIST_MASK (xen/arch/x86/include/asm/domain.h)
VMASST_VALID = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 32)
SEGBASE_FS, SEGBASE_GS_USER, SEGBASE_GS_KERNEL, SEGBASE_GS_USER_SEL = 0, 1, 2, 3
XENMEM_increase_reservation, XENMEM_decrease_reservation = 0, 1
XENMEM_maximum_ram_page, XENMEM_current_reservation = 2, 3
XENMEM_maximum_reservation, XENMEM_machphys_mfn_list, XENMEM_populate_physmap = 4, 5, 6
XENMEM_memory_map, XENMEM_machine_memory_map, XENMEM_machphys_mapping = 9, 10, 12
XENMEM_maximum_gpfn = 14
DOMID_FIRST_RESERVED = DOMID_SELF = 0x7FF0
DOMID_IO, DOMID_XEN, DOMID_COW, DOMID_INVALID = 0x7FF1, 0x7FF2, 0x7FF3, 0x7FF4
XENFEAT_writable_page_tables, XENFEAT_writable_descriptor_tables = 0, 1
XENFEAT_auto_translated_physmap, XENFEAT_supervisor_mode_kernel = 2, 3
XENFEAT_pae_pgdir_above_4gb, XENFEAT_mmu_pt_update_preserve_ad = 4, 5
XENFEAT_highmem_assist, XENFEAT_gnttab_map_avail_bits = 6, 7
XENFEAT_dom0, XENFEAT_memory_op_vnode_supported = 11, 13
XENFEAT_not_direct_mapped, XENFEAT_direct_mapped = 16, 17
XENFEAT_runstate_phys_area, XENFEAT_vcpu_time_phys_area = 18, 19

# physdev.h
PHYSDEVOP_IRQ_UNMASK_NOTIFY, PHYSDEVOP_irq_status_query, PHYSDEVOP_set_iopl = 4, 5, 6
PHYSDEVOP_set_iobitmap, PHYSDEVOP_apic_read, PHYSDEVOP_apic_write = 7, 8, 9
PHYSDEVOP_alloc_irq_vector, PHYSDEVOP_free_irq_vector, PHYSDEVOP_eoi = 10, 11, 12
PHYSDEVOP_map_pirq, PHYSDEVOP_unmap_pirq, PHYSDEVOP_manage_pci_add = 13, 14, 15
PHYSDEVOP_manage_pci_remove, PHYSDEVOP_pirq_eoi_gmfn_v1, PHYSDEVOP_restore_msi = 16, 17, 19
PHYSDEVOP_manage_pci_add_ext, PHYSDEVOP_setup_gsi, PHYSDEVOP_get_free_pirq = 20, 21, 23
PHYSDEVOP_pci_mmcfg_reserved, PHYSDEVOP_pci_device_add, PHYSDEVOP_pci_device_remove = 24, 25, 26
PHYSDEVOP_restore_msi_ext, PHYSDEVOP_pirq_eoi_gmfn_v2, PHYSDEVOP_dbgp_op = 27, 28, 29
PHYSDEVOP_prepare_msix, PHYSDEVOP_release_msix, PHYSDEVOP_pci_device_reset = 30, 31, 32
IOBMP_BYTES = 8192

# event channels (event_channel.h)
EVTCHNOP_bind_interdomain, EVTCHNOP_bind_virq, EVTCHNOP_bind_pirq, EVTCHNOP_close = 0, 1, 2, 3
EVTCHNOP_send, EVTCHNOP_status, EVTCHNOP_alloc_unbound, EVTCHNOP_bind_ipi = 4, 5, 6, 7
EVTCHNOP_bind_vcpu, EVTCHNOP_unmask, EVTCHNOP_reset = 8, 9, 10
EVTCHNSTAT_closed, EVTCHNSTAT_unbound, EVTCHNSTAT_interdomain = 0, 1, 2
EVTCHNSTAT_pirq, EVTCHNSTAT_virq, EVTCHNSTAT_ipi = 3, 4, 5
VIRQ_TIMER, VIRQ_DEBUG, VIRQ_CONSOLE, VIRQ_DOM_EXC = 0, 1, 2, 3
NR_VIRQS = 24
# 2-level ABI: 64 words of 64 bits
EVTCHN_2L_NR_CHANNELS = 64 * 64

# ------------------------------------------------------------- structures
XEN_LEGACY_MAX_VCPUS = 32
VCPU_INFO_SIZE = 64
VI_UPCALL_PENDING = 0
VI_UPCALL_MASK = 1
VI_PENDING_SEL = 8
VI_CR2 = 16
VI_TIME = 32
# vcpu_time_info, relative to its start
VT_VERSION, VT_TSC_TIMESTAMP, VT_SYSTEM_TIME, VT_MUL, VT_SHIFT, VT_FLAGS = 0, 8, 16, 24, 28, 29
VCPU_TIME_INFO = struct.Struct("<IIQQIbB2x")
assert VCPU_TIME_INFO.size == 32
XEN_PVCLOCK_TSC_STABLE_BIT = 1

SI_EVTCHN_PENDING = XEN_LEGACY_MAX_VCPUS * VCPU_INFO_SIZE  # 2048
SI_EVTCHN_MASK = SI_EVTCHN_PENDING + 64 * 8  # 2560
SI_WC_VERSION = SI_EVTCHN_MASK + 64 * 8  # 3072
SI_WC_SEC = SI_WC_VERSION + 4
SI_WC_NSEC = SI_WC_VERSION + 8
SI_WC_SEC_HI = SI_WC_VERSION + 12
SI_ARCH = SI_WC_VERSION + 16  # arch_shared_info: max_pfn, pfn_to_mfn_frame_list_list, nmi_reason...
SI_ARCH_MAX_PFN = SI_ARCH
SI_ARCH_P2M_FLL = SI_ARCH + 8

# start_info (xen.h), x86_64
START_INFO_MAGIC = b"xen-3.0-x86_64"
START_INFO = struct.Struct("<32sQQI4xQI4xQI4xQQQQQ1024sQQ")
assert START_INFO.size == 1168
SIF_PRIVILEGED, SIF_INITDOMAIN, SIF_MULTIBOOT_MOD, SIF_MOD_START_PFN = 1, 2, 4, 8
MAX_GUEST_CMDLINE = 1024

# trap_info {u8 vector; u8 flags; u16 cs; u64 address}
TRAP_INFO = struct.Struct("<BBHxxxxQ")
assert TRAP_INFO.size == 16
# iret_context {rax, r11, rcx, flags, rip, cs, rflags, rsp, ss}
IRET_CONTEXT = struct.Struct("<9Q")
# mmu_update {u64 ptr; u64 val}
MMU_UPDATE = struct.Struct("<QQ")
# mmuext_op {u32 cmd; (pad) union {xen_pfn_t mfn; unsigned long linear_addr} arg1;
#            union {unsigned nr_ents; const void *vcpumask; xen_pfn_t src_mfn} arg2}
MMUEXT_OP = struct.Struct("<I4xQQ")
# multicall_entry {unsigned long op, result; unsigned long args[6]}
MULTICALL_ENTRY = struct.Struct("<QQ6Q")
# callback_register {u16 type; u16 flags; (pad) unsigned long address}
CALLBACK_REGISTER = struct.Struct("<HH4xQ")
# vcpu_runstate_info {int state; u64 state_entry_time; u64 time[4]}
RUNSTATE_INFO = struct.Struct("<i4xQ4Q")
# e820 entry {u64 addr; u64 size; u32 type} packed
E820_ENTRY = struct.Struct("<QQI")
E820_RAM = 1
# xen_memory_map {unsigned int nr_entries; (pad) XEN_GUEST_HANDLE(void) buffer}
MEMORY_MAP = struct.Struct("<I4xQ")
# xen_memory_reservation {handle extent_start; ulong nr_extents; uint extent_order;
#                          uint mem_flags; domid_t domid}
MEMORY_RESERVATION = struct.Struct("<QQIIH6x")

# page-table entry bits
_PAGE_PRESENT, _PAGE_RW, _PAGE_USER, _PAGE_PWT, _PAGE_PCD = 0x1, 0x2, 0x4, 0x8, 0x10
_PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_PSE, _PAGE_GLOBAL = 0x20, 0x40, 0x80, 0x100
_PAGE_NX = 1 << 63
PADDR_MASK = 0x000FFFFFFFFFF000
