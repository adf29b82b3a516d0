"""The hypercall table: Xen's numbers, argument registers and error codes.

``dispatch`` is the guest boundary: it reads the number and arguments from
the vCPU's registers, calls one ``do_<name>`` handler, and stores the result
(or ``-errno`` for a :class:`XenError`) in rax.  Handlers read and write
guest memory only through ``VCPU.copy_from_guest``/``copy_to_guest``, which
translate and check every address.  Unknown hypercalls return ``-ENOSYS``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import abi, kvm
from ..abi import EFAULT, EINVAL, ENOSYS, EPERM, ESRCH, XenError
from . import machine as M
from . import trace
from .mm import PGT_L1, PGT_L2, PGT_L3, PGT_L4, PGT_SEG, PGT_WRITABLE

if TYPE_CHECKING:
    from ..kvm import Regs
    from .domain import Domain
    from .vcpu import VCPU

Handler = Callable[["VCPU", int, int, int, int, int], "int | None"]
MASK64 = (1 << 64) - 1
XEN_MAJOR, XEN_MINOR, XEN_EXTRA = 4, 19, ".0-pyxen"
XEN_CAPABILITIES = "xen-3.0-x86_64 "
MEMOP_EXTENT_SHIFT = 6  # memory.h
MEMOP_CMD_MASK = (1 << MEMOP_EXTENT_SHIFT) - 1
DOMU_MAX_ORDER = 9  # Xen's CONFIG_DOMU_MAX_ORDER: 2 MiB extents at most
SCHEDOP_pin_override = 7
U32 = 0xFFFFFFFF


def _u32(buf: bytes, off: int = 0) -> int:
    return int(struct.unpack_from("<I", buf, off)[0])


def _canonical(va: int) -> bool:
    return va < 0x0000800000000000 or va >= 0xFFFF800000000000


def _cstring(s: str, size: int) -> bytes:
    b = s.encode()[:size - 1]
    return b + b"\0" * (size - len(b))


XEN_DENY = b"<denied>"  # xen_deny(): what XSM shows an unprivileged domain

# Debug registers (Xen's asm/debugreg.h, x86-defns.h)
X86_DR6_DEFAULT, X86_DR6_ZEROS = 0xFFFF0FF0, 0x00001000
X86_DR7_DEFAULT, X86_DR7_ZEROS, X86_DR7_RTM = 0x400, 0x0000D000, 0x800
DR_GENERAL_DETECT, DR7_ACTIVE_MASK, DR_IO = 0x2000, 0xFF, 2
X86_CR4_DE = 0x8


def pv_features(vm_assist: int) -> int:
    """XENVER_get_features submap 0 for a 64-bit PV domU, as Xen's kernel.c
    computes it, limited to what pyxen implements: PRESERVE_AD mmu_update,
    MMUEXT_CLEAR/COPY_PAGE (highmem_assist), grant maps that honour the avail
    bits, and direct_mapped (PV is not translated).  Not given: writable page
    tables and auto_translated_physmap (Xen gives them only to translated
    guests), dom0, vnode, the runstate/time phys areas (not implemented)."""
    sub = ((1 << abi.XENFEAT_mmu_pt_update_preserve_ad) | (1 << abi.XENFEAT_highmem_assist)
           | (1 << abi.XENFEAT_gnttab_map_avail_bits) | (1 << abi.XENFEAT_direct_mapped))
    if vm_assist >> abi.VMASST_TYPE_pae_extended_cr3 & 1:
        sub |= 1 << abi.XENFEAT_pae_pgdir_above_4gb
    return sub


def _cr4_de(v: VCPU) -> bool:
    """The guest's virtual CR4.DE (kept by the CR4 emulation, when there is one)."""
    return bool(int(getattr(v, "guest_cr4", 0)) & X86_CR4_DE)


def set_debugreg(v: VCPU, reg: int, value: int) -> int:
    """Xen's set_debugreg (pv/misc-hypercalls.c), for the hypercall and the
    `mov %dr` emulation alike: -EPERM for a breakpoint address inside Xen's
    range or DR7.GD, -EINVAL for upper-half bits in DR6/DR7, -ENODEV for DR4/5
    with CR4.DE and for registers that do not exist.  The values are kept in
    the vCPU (dr[], dr6, dr7, dr7_emul for I/O breakpoints) and read back by
    get_debugreg; pyxen does not load them into the CPU (docs/hv.md)."""
    value &= MASK64
    if 0 <= reg <= 3:
        if not (value < 1 << 47 or value >= abi.HYPERVISOR_VIRT_END):
            return -EPERM
        v.dr[reg] = value
        return 0
    if reg in (4, 6):
        if reg == 4 and _cr4_de(v):
            return -abi.ENODEV
        if value >> 32:
            return -EINVAL
        v.dr6 = (value | X86_DR6_DEFAULT) & ~X86_DR6_ZEROS  # no RTM/BLD in the PV policy
        return 0
    if reg in (5, 7):
        if reg == 5 and _cr4_de(v):
            return -abi.ENODEV
        if value >> 32:
            return -EINVAL
        value = (value & ~(X86_DR7_ZEROS | X86_DR7_RTM)) | X86_DR7_DEFAULT
        if value & DR_GENERAL_DETECT:
            return -EPERM
        io_enable = 0
        if value & DR7_ACTIVE_MASK:
            for i in range(16, 32, 4):
                if (value >> i) & 3 == DR_IO:
                    if not _cr4_de(v):
                        return -EPERM
                    io_enable |= value & (3 << ((i - 16) >> 1))
        v.dr7_emul = io_enable
        v.dr7 = value & ~io_enable
        return 0
    return -abi.ENODEV


def get_debugreg(v: VCPU, reg: int) -> int:
    """Xen's get_debugreg (x86emul_read_dr): the stored values, -ENODEV otherwise."""
    if 0 <= reg <= 3:
        return int(v.dr[reg])
    if reg in (4, 5) and _cr4_de(v):
        return -abi.ENODEV
    if reg in (4, 6):
        return int(v.dr6)
    if reg in (5, 7):
        return int(v.dr7 | v.dr7_emul)
    return -abi.ENODEV


def _sregs_pending(v: VCPU) -> bool:
    """Special registers changed since the last KVM_RUN (not yet in KVM)."""
    k = v.kvm
    dirty = k.q[kvm.Q_DIRTY] if k.sync else k._dirty
    return bool(dirty & kvm.KVM_SYNC_X86_SREGS)


class Hypercalls:
    """Per-domain hypercall table."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.table: dict[int, Handler] = {}
        for name, nr in abi.HYPERCALLS.items():
            fn = getattr(self, f"do_{name}", None)
            if fn is not None:
                self.table[nr] = fn
        trace.wrap_table(self)  # PYXEN_TRACE_EXITS: log each hypercall (no-op by default)
        self.counts = [0] * 64

    # ------------------------------------------------------------ entry
    def dispatch(self, v: VCPU, r: Regs) -> None:
        nr = r.rax
        fn = self.table.get(nr)
        if nr < 64:
            self.counts[nr] += 1
        v.n_hypercalls += 1
        if fn is None:
            r.rax = -ENOSYS & MASK64
        else:
            try:
                res = fn(v, r.rdi, r.rsi, r.rdx, r.r10, r.r8)
            except XenError as e:
                res = -e.errno
            if res is None:
                return
            r.rax = res & MASK64
        v.kvm.mark_regs_dirty()

    def call(self, v: VCPU, nr: int, args: tuple[int, ...]) -> int:
        """Run hypercall ``nr`` with explicit args (multicall); returns the result."""
        fn = self.table.get(nr)
        if fn is None or nr == abi.HYPERVISOR_iret:
            return -ENOSYS
        try:
            res = fn(v, *args[:5])
        except XenError as e:
            return -e.errno
        return 0 if res is None else res

    # ------------------------------------------------------------ console, version
    def do_console_io(self, v: VCPU, cmd: int, count: int, buf: int, *_: int) -> int:
        if cmd == abi.CONSOLEIO_write:
            if count > 1 << 16:
                raise XenError(EINVAL, "console_io write too large")
            data = v.copy_from_guest(buf, count)
            self.domain.console_io_write(data)
            return 0
        if cmd == abi.CONSOLEIO_read:
            return 0  # a domU has no hypervisor console to read
        raise XenError(ENOSYS)

    def do_xen_version(self, v: VCPU, cmd: int, arg: int, *_: int) -> int:
        cmd &= U32  # (int cmd, void *arg)
        if cmd == abi.XENVER_version:
            return (XEN_MAJOR << 16) | XEN_MINOR
        if cmd == abi.XENVER_extraversion:
            v.copy_to_guest(arg, _cstring(XEN_EXTRA, 16))
        elif cmd == abi.XENVER_compile_info:
            v.copy_to_guest(arg, _cstring("pyxen", 64) + _cstring("python", 16)
                            + _cstring("pyxen", 32) + _cstring("2026", 32))
        elif cmd == abi.XENVER_capabilities:
            v.copy_to_guest(arg, _cstring(XEN_CAPABILITIES, 1024))
        elif cmd == abi.XENVER_changeset:
            v.copy_to_guest(arg, _cstring("pyxen", 64))
        elif cmd == abi.XENVER_platform_parameters:
            v.copy_to_guest(arg, struct.pack("<Q", abi.HYPERVISOR_VIRT_START))
        elif cmd == abi.XENVER_get_features:
            idx = _u32(v.copy_from_guest(arg, 4))
            sub = pv_features(self.domain.vm_assist) if idx == 0 else 0
            v.copy_to_guest(arg + 4, struct.pack("<I", sub))
        elif cmd == abi.XENVER_pagesize:
            if arg:
                raise XenError(EINVAL, "pagesize takes a NULL argument")
            return abi.PAGE_SIZE
        elif cmd == abi.XENVER_guest_handle:
            import uuid
            v.copy_to_guest(arg, uuid.UUID(self.domain.spec.uuid).bytes)
        elif cmd == abi.XENVER_commandline:
            # XSM denies the hypervisor's command line to an unprivileged domain
            v.copy_to_guest(arg, XEN_DENY + b"\0")
        elif cmd in (abi.XENVER_build_id, abi.XENVER_extraversion2, abi.XENVER_capabilities2,
                     abi.XENVER_changeset2, abi.XENVER_commandline2):
            raise XenError(EPERM, "privileged xen_version sub-op")
        else:
            raise XenError(ENOSYS)
        return 0

    # ------------------------------------------------------------ traps, callbacks
    def do_set_trap_table(self, v: VCPU, ptr: int, *_: int) -> int:
        if ptr == 0:
            v.trap_table.clear()
            return 0
        table: dict[int, tuple[int, int, int]] = {}
        for i in range(256):
            vec, flags, cs, addr = abi.TRAP_INFO.unpack(v.copy_from_guest(ptr + 16 * i, 16))
            if addr == 0:
                break
            table[vec] = (flags, cs, addr)
        v.trap_table.update(table)
        return 0

    def do_set_callbacks(self, v: VCPU, event: int, failsafe: int, syscall: int, *_: int) -> int:
        """Xen's do_set_callbacks: three CALLBACKOP_register calls with no flags
        (so failsafe and syscall stop masking events); a non-canonical address
        is skipped, and the hypercall still returns 0."""
        if _canonical(event):
            v.event_callback = event
        if _canonical(failsafe):
            v.failsafe_callback, v.failsafe_mask_events = failsafe, False
        if _canonical(syscall):
            v.syscall_callback, v.syscall_mask_events = syscall, False
        return 0

    def do_callback_op(self, v: VCPU, cmd: int, arg: int, *_: int) -> int:
        """Xen's pv/callback.c: each type keeps its address and, where Xen has
        one, its CALLBACKF_mask_events flag."""
        cmd &= U32
        if cmd == abi.CALLBACKOP_register:
            typ, flags, addr = abi.CALLBACK_REGISTER.unpack(v.copy_from_guest(arg, 16))
            if not _canonical(addr):
                raise XenError(EINVAL, f"non-canonical callback address {addr:#x}")
            mask = bool(flags & abi.CALLBACKF_mask_events)
            if typ == abi.CALLBACKTYPE_event:
                v.event_callback = addr
            elif typ == abi.CALLBACKTYPE_failsafe:
                v.failsafe_callback = addr
                v.failsafe_mask_events = mask
            elif typ == abi.CALLBACKTYPE_syscall:
                v.syscall_callback, v.syscall_mask_events = addr, mask
            elif typ == abi.CALLBACKTYPE_syscall32:
                v.syscall32_callback, v.syscall32_mask_events = addr, mask
            elif typ == abi.CALLBACKTYPE_sysenter:
                v.sysenter_callback, v.sysenter_mask_events = addr, mask
            elif typ == abi.CALLBACKTYPE_nmi:
                v.nmi_callback = addr  # accepted; pyxen never raises an NMI
            else:
                raise XenError(ENOSYS, f"callback type {typ}")
            return 0
        if cmd == abi.CALLBACKOP_unregister:
            typ = struct.unpack("<H", v.copy_from_guest(arg, 2))[0]
            if typ in (abi.CALLBACKTYPE_event, abi.CALLBACKTYPE_failsafe, abi.CALLBACKTYPE_syscall,
                       abi.CALLBACKTYPE_syscall32, abi.CALLBACKTYPE_sysenter):
                raise XenError(EINVAL, f"callback type {typ} cannot be unregistered")
            if typ == abi.CALLBACKTYPE_nmi:
                v.nmi_callback = 0
                return 0
            raise XenError(ENOSYS, f"callback type {typ}")
        raise XenError(ENOSYS)

    def do_stack_switch(self, v: VCPU, ss: int, sp: int, *_: int) -> int:
        # as Xen's fixup_guest_stack_selector: the guest kernel runs at RPL 3
        v.kernel_ss, v.kernel_sp = (ss & 0xFFFF) | 3, sp
        return 0

    def do_iret(self, v: VCPU, *_: int) -> None:
        v.do_iret()
        return None

    def do_fpu_taskswitch(self, v: VCPU, set_: int, *_: int) -> int:
        s = v.kvm.sregs
        if set_:
            v.virtual_ts = True
            s.cr0 |= 0x8
        else:
            v.virtual_ts = False
            s.cr0 &= ~0x8
        v.kvm.mark_sregs_dirty()
        return 0

    def do_set_segment_base(self, v: VCPU, which: int, base: int, *_: int) -> int:
        s = v.kvm.sregs
        if base >= 0x0000800000000000 and base < 0xFFFF800000000000:
            raise XenError(EINVAL, "non-canonical segment base")
        if which == abi.SEGBASE_FS:
            s.fs.base = base
        elif which == abi.SEGBASE_GS_USER:
            if v.kernel_mode:
                v.gs_base_user = base
            else:
                s.gs.base = base
        elif which == abi.SEGBASE_GS_KERNEL:
            if v.kernel_mode:
                s.gs.base = base
            else:
                v.gs_base_kernel = base
        elif which == abi.SEGBASE_GS_USER_SEL:
            # Xen loads the selector into the *user* %gs (a null one if it
            # faults) and never fails; the user GS base becomes the
            # descriptor's, 0 for the null and flat selectors (descriptors are
            # not consulted on PVM hosts, platform-notes.md).  The guest kernel's
            # own %gs and base are untouched.
            sel = base & 0xFFFF
            v.gs_sel_user = sel | 3 if sel > 3 else sel
            if v.kernel_mode:
                v.gs_base_user = 0
            else:
                s.gs.base = 0
        else:
            raise XenError(EINVAL, f"segment base selector {which}")
        v.kvm.mark_sregs_dirty()
        return 0

    def do_vm_assist(self, v: VCPU, cmd: int, typ: int, *_: int) -> int:
        """Xen's do_vm_assist with the 64-bit PV mask: the enabled bits live in
        ``domain.vm_assist`` (writable page tables and the runstate update flag
        are read from there by the code that honours them)."""
        cmd, typ = cmd & U32, typ & U32
        if typ >= 64 or not (abi.VMASST_VALID >> typ) & 1:
            raise XenError(EINVAL, f"vm_assist type {typ}")
        if cmd == abi.VMASST_CMD_enable:
            self.domain.vm_assist |= 1 << typ
        elif cmd == abi.VMASST_CMD_disable:
            self.domain.vm_assist &= ~(1 << typ)
        else:
            raise XenError(ENOSYS)
        return 0

    # ------------------------------------------------------------ debug registers
    def do_set_debugreg(self, v: VCPU, reg: int, value: int, *_: int) -> int:
        return set_debugreg(v, reg & U32, value)

    def do_get_debugreg(self, v: VCPU, reg: int, *_: int) -> int:
        return get_debugreg(v, reg & U32)

    def do_set_gdt(self, v: VCPU, frames_ptr: int, entries: int, *_: int) -> int:
        return self.domain.set_gdt(v, frames_ptr, entries)

    def do_update_descriptor(self, v: VCPU, maddr: int, desc: int, *_: int) -> int:
        return self.domain.update_descriptor(maddr, desc)

    # ------------------------------------------------------------ MMU
    def _check_foreign(self, foreigndom: int) -> None:
        if foreigndom not in (abi.DOMID_SELF, self.domain.domid):
            raise XenError(EPERM if foreigndom < abi.DOMID_SELF else ESRCH,
                           "foreign page-table updates need privilege")

    def do_mmu_update(self, v: VCPU, reqs: int, count: int, done_ptr: int, foreigndom: int,
                      *_: int) -> int:
        count &= 0x7FFFFFFF
        self._check_foreign(foreigndom & 0xFFFF)
        ft = self.domain.ft
        done = 0
        rc = 0
        # Xen's mmu_update flushes no TLB: the guest flushes when it must.  So in
        # a one-vCPU domain, when every entry was an L1 entry whose old frame is
        # the domain's own, the vCPU's re-application of the entries (the MMU
        # helper) waits for its next flush or other exit (VCPU.after_hypercall)
        defer = len(self.domain.vcpus) == 1
        try:
            while done < count:
                n = min(count - done, 256)
                raw = v.copy_from_guest(reqs + 16 * done, 16 * n)
                for ptr, val in struct.iter_unpack("<QQ", raw):
                    cmd = ptr & 7
                    if cmd in (abi.MMU_NORMAL_PT_UPDATE, abi.MMU_PT_UPDATE_PRESERVE_AD,
                               abi.MMU_PT_UPDATE_NO_TRANSLATE):
                        if not ft.mod_entry(ptr - cmd, val):
                            defer = False
                    elif cmd == abi.MMU_MACHPHYS_UPDATE:
                        mfn = ptr >> 12
                        if not ft.owns(mfn):
                            raise XenError(EINVAL, f"M2P update for frame {mfn:#x} not owned")
                        self.domain.machine.set_m2p(mfn, val)
                    else:
                        raise XenError(ENOSYS, f"mmu_update command {cmd}")
                    done += 1
        except XenError as e:
            rc = -e.errno
            defer = False
            self.domain.log(f"mmu_update #{done} failed: {e.why}")
        v.mmu_defer = defer
        self._report_done(v, done_ptr, done)
        return rc

    @staticmethod
    def _report_done(v: VCPU, done_ptr: int, done: int) -> None:
        """Store the count of requests done; as Xen, a bad pointer is ignored."""
        if done_ptr:
            try:
                v.copy_to_guest(done_ptr, struct.pack("<I", done))
            except XenError:
                pass

    def do_update_va_mapping(self, v: VCPU, va: int, val: int, flags: int, *_: int) -> int:
        ft = self.domain.ft
        try:
            ft.mod_entry(ft.l1_entry_for(v.kernel_l4 if v.kernel_mode else v.user_l4, va), val)
        except XenError as e:
            self.domain.log(f"update_va_mapping {va:#x} failed: {e.why}")
            raise
        if flags & abi.UVMF_ALL:
            self.domain.flush_all_tlbs(v)
        return 0

    def do_mmuext_op(self, v: VCPU, ops: int, count: int, done_ptr: int, foreigndom: int,
                     *_: int) -> int:
        count &= 0x7FFFFFFF
        self._check_foreign(foreigndom & 0xFFFF)
        d = self.domain
        ft = d.ft
        done = 0
        rc = 0
        try:
            while done < count:
                cmd, arg1, arg2 = abi.MMUEXT_OP.unpack(v.copy_from_guest(ops + 24 * done, 24))
                if cmd in (abi.MMUEXT_PIN_L1_TABLE, abi.MMUEXT_PIN_L2_TABLE,
                           abi.MMUEXT_PIN_L3_TABLE, abi.MMUEXT_PIN_L4_TABLE):
                    ft.pin(arg1, cmd + 1)
                elif cmd == abi.MMUEXT_UNPIN_TABLE:
                    ft.unpin(arg1)
                elif cmd == abi.MMUEXT_NEW_BASEPTR:
                    if not v.kernel_mode:
                        raise XenError(EINVAL, "new_baseptr from user mode")
                    if not ft.owns(arg1):
                        raise XenError(EINVAL, f"new_baseptr to frame {arg1:#x} not owned")
                    if arg1 != v.kernel_l4:
                        ft.get_type(arg1, PGT_L4)
                        old, v.kernel_l4 = v.kernel_l4, arg1
                        if old:
                            ft.put_type(old)
                    s = v.kvm.sregs
                    if s.cr3 == arg1 << 12 or _sregs_pending(v):
                        # same CR3: KVM_SET_SREGS would not flush (fact 2); or the
                        # CR3 KVM holds is not known (an earlier change not yet
                        # applied, e.g. two base pointers in one batch): the helper
                        v.kvm.sregs.cr3 = arg1 << 12
                        v.kvm.mark_sregs_dirty()
                        v.flush_requested = True
                    else:
                        # A new CR3 through KVM_SET_SREGS is a full reload (KVM resets
                        # the MMU context and syncs the new root as for `mov %cr3`),
                        # so no helper run: PTE writes still queued run it anyway
                        s.cr3 = arg1 << 12
                        v.kvm.mark_sregs_dirty()
                elif cmd == abi.MMUEXT_NEW_USER_BASEPTR:
                    if arg1 != v.user_l4:
                        if arg1:
                            ft.get_type(arg1, PGT_L4)
                        old, v.user_l4 = v.user_l4, arg1
                        if old:
                            ft.put_type(old)
                elif cmd in (abi.MMUEXT_TLB_FLUSH_LOCAL, abi.MMUEXT_INVLPG_LOCAL):
                    v.flush_requested = True
                elif cmd in (abi.MMUEXT_TLB_FLUSH_MULTI, abi.MMUEXT_INVLPG_MULTI,
                             abi.MMUEXT_TLB_FLUSH_ALL, abi.MMUEXT_INVLPG_ALL):
                    d.flush_all_tlbs(v)
                elif cmd in (abi.MMUEXT_FLUSH_CACHE, abi.MMUEXT_FLUSH_CACHE_GLOBAL):
                    pass
                elif cmd == abi.MMUEXT_SET_LDT:
                    if arg2 != 0:
                        raise XenError(EINVAL, "LDTs are not supported")
                elif cmd == abi.MMUEXT_CLEAR_PAGE:
                    d.clear_page(arg1)
                elif cmd == abi.MMUEXT_COPY_PAGE:
                    d.copy_page(arg1, arg2)
                else:
                    raise XenError(ENOSYS, f"mmuext cmd {cmd}")
                done += 1
        except XenError as e:
            rc = -e.errno
            d.log(f"mmuext_op #{done} failed: {e.why}")
        self._report_done(v, done_ptr, done)
        return rc

    def do_memory_op(self, v: VCPU, cmd: int, arg: int, *_: int) -> int:
        d = self.domain
        start = (cmd & MASK64) >> MEMOP_EXTENT_SHIFT  # a continuation's start extent
        cmd &= MEMOP_CMD_MASK
        if cmd in (abi.XENMEM_increase_reservation, abi.XENMEM_decrease_reservation,
                   abi.XENMEM_populate_physmap):
            return self._reservation(v, cmd, arg, start)
        if cmd in (abi.XENMEM_current_reservation, abi.XENMEM_maximum_reservation,
                   abi.XENMEM_maximum_gpfn):
            domid = struct.unpack("<H", v.copy_from_guest(arg, 2))[0]
            if domid not in (abi.DOMID_SELF, d.domid):
                raise XenError(ESRCH if domid < abi.DOMID_SELF else EPERM)
            if cmd == abi.XENMEM_current_reservation:
                return d.tot_pages
            if cmd == abi.XENMEM_maximum_reservation:
                return d.max_pages
            # a PV guest states nr_pfns in shared_info's arch.max_pfn (Xen's
            # domain_get_maximum_gpfn: (max_pfn ?: 1) - 1)
            max_pfn = struct.unpack_from("<Q", d.shared_info, abi.SI_ARCH_MAX_PFN)[0]
            return (max_pfn or 1) - 1
        if cmd == abi.XENMEM_maximum_ram_page:
            return M.MFN_BASE + d.machine.nr_frames - 1
        if cmd == abi.XENMEM_memory_map:
            nr, buf = abi.MEMORY_MAP.unpack(v.copy_from_guest(arg, 16))
            if nr < 1:
                raise XenError(EINVAL, "memory map buffer too small")
            # as libxl's xc_domain_set_memmap_limit for a PV guest: one RAM
            # entry up to the domain's maximum (the rest is ballooned out)
            v.copy_to_guest(buf, abi.E820_ENTRY.pack(0, d.max_pages * abi.PAGE_SIZE, abi.E820_RAM))
            v.copy_to_guest(arg, struct.pack("<I", 1))
            return 0
        if cmd == abi.XENMEM_machphys_mapping:
            v.copy_to_guest(arg, struct.pack("<QQQ", M.M2P_VA, M.M2P_VA_END,
                                             M.MFN_BASE + d.machine.nr_frames - 1))
            return 0
        raise XenError(ENOSYS, f"memory_op {cmd}")

    def _reservation(self, v: VCPU, cmd: int, arg: int, start: int) -> int:
        """XENMEM_increase_reservation, decrease_reservation and populate_physmap
        for a PV guest (Xen's common/memory.c): each extent of 2**extent_order
        frames is done or the operation stops there; the result is the number of
        extents done (counting from a continuation's start).  Increase writes the
        machine frames it gave into extent_start (if not NULL); populate reads a
        gpfn from each slot, sets M2P[mfn] = gpfn and writes the mfn back;
        decrease reads the machine frames to give back."""
        d = self.domain
        ext, nr, order, _flags, domid = abi.MEMORY_RESERVATION.unpack(v.copy_from_guest(arg, 32))
        if domid not in (abi.DOMID_SELF, d.domid):
            raise XenError(ESRCH if domid >= abi.DOMID_FIRST_RESERVED else EPERM,
                           "reservation of another domain")
        if start >= nr:
            return start
        if order > DOMU_MAX_ORDER:
            return start
        i = start
        try:
            while i < nr:
                slot = ext + 8 * i
                if slot + 8 > 1 << 64:
                    break  # the array runs off the address space: EFAULT on Xen, ends here
                if cmd == abi.XENMEM_decrease_reservation:
                    gmfn = struct.unpack("<Q", v.copy_from_guest(slot, 8))[0]
                    if not d.remove_extent(gmfn, order):
                        break
                elif cmd == abi.XENMEM_populate_physmap:
                    gpfn = struct.unpack("<Q", v.copy_from_guest(slot, 8))[0]
                    if gpfn >> (52 - 12):
                        break
                    mfn = d.add_extent(order, gpfn)
                    if mfn is None:
                        break
                    d.machine.set_m2p_range(mfn, gpfn, 1 << order)
                    v.copy_to_guest(slot, struct.pack("<Q", mfn))
                else:
                    mfn = d.add_extent(order)
                    if mfn is None:
                        break
                    if ext:
                        v.copy_to_guest(slot, struct.pack("<Q", mfn))
                i += 1
        except XenError:
            pass  # a bad slot address ends the operation where it is, as on Xen
        return i

    # ------------------------------------------------------------ physdev
    def do_physdev_op(self, v: VCPU, cmd: int, arg: int, *_: int) -> int:
        """What Xen's do_physdev_op answers an unprivileged PV domU with no
        devices: the virtual IOPL and I/O bitmap are kept; the pirq EOI page is
        accepted; there are no pirqs (-EINVAL); device, MSI and APIC operations
        need privilege (-EPERM); everything else is -ENOSYS."""
        cmd &= U32
        if cmd == abi.PHYSDEVOP_set_iopl:
            iopl = _u32(v.copy_from_guest(arg, 4))
            if iopl > 3:
                raise XenError(EINVAL, f"iopl {iopl}")
            v.iopl = iopl
            return 0
        if cmd == abi.PHYSDEVOP_set_iobitmap:
            bitmap, nr_ports = struct.unpack("<QI", v.copy_from_guest(arg, 12))
            if not (bitmap < 1 << 47 or bitmap >= abi.HYPERVISOR_VIRT_END) or nr_ports > 65536:
                raise XenError(EINVAL, "bad I/O bitmap")
            v.iobmp, v.iobmp_nr = bitmap, nr_ports
            return 0
        if cmd in (abi.PHYSDEVOP_pirq_eoi_gmfn_v1, abi.PHYSDEVOP_pirq_eoi_gmfn_v2):
            gmfn = struct.unpack("<Q", v.copy_from_guest(arg, 8))[0]
            d = self.domain
            if not d.ft.owns(gmfn):
                raise XenError(EINVAL, f"pirq EOI frame {gmfn:#x} not owned")
            if d.pirq_eoi_mfn:
                raise XenError(abi.EBUSY, "pirq EOI map already set")
            d.ft.get_type(gmfn, PGT_WRITABLE)  # held for the domain's life, as Xen's
            d.pirq_eoi_mfn = gmfn
            return 0
        if cmd in (abi.PHYSDEVOP_eoi, abi.PHYSDEVOP_irq_status_query):
            v.copy_from_guest(arg, 4)
            raise XenError(EINVAL, "the domain has no pirqs")
        if cmd == abi.PHYSDEVOP_IRQ_UNMASK_NOTIFY:
            return 0
        if cmd in (abi.PHYSDEVOP_map_pirq, abi.PHYSDEVOP_unmap_pirq, abi.PHYSDEVOP_apic_read,
                   abi.PHYSDEVOP_apic_write, abi.PHYSDEVOP_alloc_irq_vector,
                   abi.PHYSDEVOP_free_irq_vector, abi.PHYSDEVOP_manage_pci_add,
                   abi.PHYSDEVOP_manage_pci_remove, abi.PHYSDEVOP_manage_pci_add_ext,
                   abi.PHYSDEVOP_restore_msi, abi.PHYSDEVOP_restore_msi_ext,
                   abi.PHYSDEVOP_setup_gsi, abi.PHYSDEVOP_pci_mmcfg_reserved,
                   abi.PHYSDEVOP_pci_device_add, abi.PHYSDEVOP_pci_device_remove,
                   abi.PHYSDEVOP_prepare_msix, abi.PHYSDEVOP_release_msix,
                   abi.PHYSDEVOP_pci_device_reset, abi.PHYSDEVOP_dbgp_op):
            raise XenError(EPERM, f"physdev_op {cmd} needs privilege")
        # PHYSDEVOP_get_free_pirq included: pyxen has no pirqs to hand out
        raise XenError(ENOSYS, f"physdev_op {cmd}")

    def do_xenpmu_op(self, v: VCPU, *_: int) -> int:
        """Xen's vPMU is off unless booted with `vpmu=`: every op is -EOPNOTSUPP
        (Linux then says "VPMU disabled by hypervisor")."""
        raise XenError(abi.EOPNOTSUPP, "no virtual PMU")

    # ------------------------------------------------------------ multicall
    def do_multicall(self, v: VCPU, calls: int, n: int, *_: int) -> int:
        try:
            for i in range(n & U32):  # any count, as Xen; a bad entry address ends it with EFAULT
                addr = calls + i * abi.MULTICALL_ENTRY.size
                op, _res, *args = abi.MULTICALL_ENTRY.unpack(
                    v.copy_from_guest(addr, abi.MULTICALL_ENTRY.size))
                res = self.call(v, op, tuple(args)) if op != abi.HYPERCALLS["multicall"] else -EINVAL
                v.copy_to_guest(addr + 8, struct.pack("<q", res))
        finally:
            v.mmu_defer = False  # only a plain mmu_update may leave its entries for later
        return 0

    # ------------------------------------------------------------ scheduling, time
    def do_set_timer_op(self, v: VCPU, timeout: int, *_: int) -> int:
        now = self.domain.clock.system_time()
        if timeout == 0:
            v.timer_deadline = 0
            return 0
        if timeout >= 1 << 63 or (timeout > now and (timeout - now) >> 50):
            # As Xen: a deadline that wrapped negative or lies more than ~13 days
            # ahead is a guest's way of saying "no timer"; fire in 100 ms.
            timeout = now + 100_000_000
        if timeout <= now:
            # Due at once, and the guest's clock says it is not: refresh the
            # vCPU's time record as a fired timer does (check_timers), else a
            # guest clock behind the host's stays behind, and Linux, which
            # re-arms an early timer at >= 100 us, gets VIRQ_TIMER at each
            # re-arm forever (a soft lockup at xen_hypercall_pv+5, seen under load)
            v.timer_deadline = 0
            v.update_time()
            self.domain.evtchn.raise_virq(abi.VIRQ_TIMER, v.id)
            return 0
        v.set_timer(timeout)
        return 0

    def do_sched_op(self, v: VCPU, cmd: int, arg: int, *_: int) -> int:
        d = self.domain
        cmd &= U32  # (int cmd, void *arg)
        if cmd == abi.SCHEDOP_yield:
            return 0
        if cmd == abi.SCHEDOP_block:
            v.kvm.regs.rax = 0
            v.kvm.mark_regs_dirty()
            v.block()
            return 0
        if cmd in (abi.SCHEDOP_shutdown, abi.SCHEDOP_shutdown_code):
            reason = _u32(v.copy_from_guest(arg, 4))
            if reason > abi.SHUTDOWN_soft_reset:
                raise XenError(EINVAL, f"shutdown reason {reason}")
            if cmd == abi.SCHEDOP_shutdown_code:
                d.shutdown_code = reason
                return 0
            v.kvm.regs.rax = 0
            if reason == abi.SHUTDOWN_crash:
                d.crash("the guest reported a crash (SCHEDOP_shutdown, reason crash)",
                        v.register_dump())
            else:
                d.shutdown(reason)
            return 0
        if cmd == abi.SCHEDOP_poll:
            ports_ptr, nr, timeout = struct.unpack("<QI4xQ", v.copy_from_guest(arg, 24))
            if nr > 128:
                raise XenError(EINVAL, "too many ports to poll")
            ports = list(struct.unpack(f"<{nr}I", v.copy_from_guest(ports_ptr, 4 * nr))) if nr else []
            for p in ports:
                if not 0 < p < len(d.evtchn.ports):
                    raise XenError(EINVAL, f"poll on bad port {p}")
            v.kvm.regs.rax = 0
            v.kvm.mark_regs_dirty()
            v.poll_ports = ports
            v.poll_deadline = timeout
            if timeout:
                d.timers.schedule(v, timeout)
            with v.cond:
                v.blocked = True
                v.attention = True
            return 0
        if cmd == abi.SCHEDOP_remote_shutdown:
            domid, reason = struct.unpack("<HxxI", v.copy_from_guest(arg, 8))
            if domid not in (abi.DOMID_SELF, d.domid):
                raise XenError(EPERM, "remote shutdown needs privilege")
            d.shutdown(reason)
            return 0
        if cmd == abi.SCHEDOP_watchdog:
            raise XenError(ENOSYS)
        if cmd == SCHEDOP_pin_override:
            raise XenError(EPERM, "pin_override is for the hardware domain")
        raise XenError(ENOSYS, f"sched_op {cmd}")

    def do_sched_op_compat(self, v: VCPU, cmd: int, arg: int, *_: int) -> int:
        if cmd == abi.SCHEDOP_shutdown:
            if arg == abi.SHUTDOWN_crash:
                self.domain.crash("the guest reported a crash", v.register_dump())
            else:
                self.domain.shutdown(arg)
            return 0
        if cmd in (abi.SCHEDOP_yield, abi.SCHEDOP_block):
            return self.do_sched_op(v, cmd, 0)
        raise XenError(ENOSYS)

    def do_vcpu_op(self, v: VCPU, cmd: int, vcpuid: int, arg: int, *_: int) -> int:
        d = self.domain
        cmd, vcpuid = cmd & U32, vcpuid & U32  # (int cmd, unsigned int vcpuid, ...)
        if not 0 <= vcpuid < len(d.vcpus):
            raise XenError(abi.ENOENT, f"no vcpu {vcpuid}")
        t = d.vcpus[vcpuid]
        if cmd == abi.VCPUOP_is_up:
            return 1 if t.up else 0
        if cmd == abi.VCPUOP_get_runstate_info:
            v.copy_to_guest(arg, t.runstate_info())
            return 0
        if cmd == abi.VCPUOP_register_vcpu_info:
            return d.register_vcpu_info(v, t, arg)
        if cmd == abi.VCPUOP_register_runstate_memory_area:
            # common_vcpu_op: the handle must lie outside Xen's range (guest_handle_okay);
            # it is written now and on every runstate change, faults ignored
            va = struct.unpack("<Q", v.copy_from_guest(arg, 8))[0]
            if not (va < 1 << 47 or va >= abi.HYPERVISOR_VIRT_END):
                raise XenError(EFAULT, f"runstate area {va:#x} in Xen's range")
            t.runstate_area = va
            if va:
                t.update_runstate_area()
            return 0
        if cmd == abi.VCPUOP_register_vcpu_time_memory_area:
            # x86's do_vcpu_op: the same handle check; the record is written now
            # (force_update_vcpu_system_time) and on every time update
            va = struct.unpack("<Q", v.copy_from_guest(arg, 8))[0]
            if not (va < 1 << 47 or va >= abi.HYPERVISOR_VIRT_END):
                raise XenError(EFAULT, f"time area {va:#x} in Xen's range")
            t.time_area = va
            if va and t is v:
                t.update_time()
            elif va:
                t.update_time_area()
            return 0
        if cmd == abi.VCPUOP_send_nmi:
            raise XenError(ENOSYS, "pyxen delivers no NMIs")
        if cmd == abi.VCPUOP_get_physid:
            raise XenError(EINVAL, "get_physid is for the hardware domain's pinned vCPUs")
        if vcpuid != v.id and cmd in (abi.VCPUOP_set_periodic_timer, abi.VCPUOP_stop_periodic_timer,
                                      abi.VCPUOP_set_singleshot_timer,
                                      abi.VCPUOP_stop_singleshot_timer):
            raise XenError(EINVAL, "timers can only be set on the calling vcpu")
        if cmd == abi.VCPUOP_set_periodic_timer:
            period = struct.unpack("<Q", v.copy_from_guest(arg, 8))[0]
            if period < 1_000_000:
                raise XenError(EINVAL, "period below 1 ms")
            v.periodic_ns = period
            v.periodic_next = d.clock.system_time() + period
            d.timers.schedule(v, v.periodic_next)
            return 0
        if cmd == abi.VCPUOP_stop_periodic_timer:
            v.periodic_ns = 0
            return 0
        if cmd == abi.VCPUOP_set_singleshot_timer:
            timeout, flags = struct.unpack("<QI4x", v.copy_from_guest(arg, 16))
            if flags & abi.VCPU_SSHOTTMR_future and timeout < d.clock.system_time():
                raise XenError(62, "timeout in the past")  # -ETIME
            return self.do_set_timer_op(v, timeout)
        if cmd == abi.VCPUOP_stop_singleshot_timer:
            v.timer_deadline = 0
            return 0
        if cmd in (abi.VCPUOP_up, abi.VCPUOP_down, abi.VCPUOP_initialise):
            return d.vcpu_updown(v, t, cmd, arg)
        raise XenError(ENOSYS, f"vcpu_op {cmd}")

    # ------------------------------------------------------------ event channels
    def do_event_channel_op(self, v: VCPU, cmd: int, arg: int, *_: int) -> int:
        d = self.domain
        cmd &= U32  # (int cmd, void *arg)
        ev = d.evtchn
        if cmd == abi.EVTCHNOP_send:
            if not ev.send_fast(v, arg):  # to another domain process: all in C (evtchn.py)
                ev.send(_u32(v.copy_from_guest(arg, 4)))
            return 0
        if cmd == abi.EVTCHNOP_unmask:
            port = _u32(v.copy_from_guest(arg, 4))
            if not 0 < port < len(ev.ports):
                raise XenError(EINVAL, f"port {port}")
            target = d.vcpus[ev.notify_vcpu(port)]
            if target is v:
                v.unmask(port)
            else:
                target.post(v.POST_UNMASK, port)
            return 0
        if cmd == abi.EVTCHNOP_bind_virq:
            virq, vcpu = struct.unpack("<II", v.copy_from_guest(arg, 8))
            port = ev.bind_virq(virq, vcpu)
            v.copy_to_guest(arg + 8, struct.pack("<I", port))
            return 0
        if cmd == abi.EVTCHNOP_bind_ipi:
            vcpu = _u32(v.copy_from_guest(arg, 4))
            v.copy_to_guest(arg + 4, struct.pack("<I", ev.bind_ipi(vcpu)))
            return 0
        if cmd == abi.EVTCHNOP_close:
            ev.close(_u32(v.copy_from_guest(arg, 4)))
            return 0
        if cmd == abi.EVTCHNOP_status:
            dom, port = struct.unpack("<HxxI", v.copy_from_guest(arg, 8))
            if dom not in (abi.DOMID_SELF, d.domid):
                raise XenError(EPERM if dom < abi.DOMID_SELF else ESRCH)
            v.copy_to_guest(arg + 8, ev.status(port))
            return 0
        if cmd == abi.EVTCHNOP_alloc_unbound:
            dom, remote = struct.unpack("<HH", v.copy_from_guest(arg, 4))
            if dom not in (abi.DOMID_SELF, d.domid):
                raise XenError(EPERM, "alloc_unbound for another domain")
            v.copy_to_guest(arg + 4, struct.pack("<I", ev.alloc_unbound(remote)))
            return 0
        if cmd == abi.EVTCHNOP_bind_vcpu:
            port, vcpu = struct.unpack("<II", v.copy_from_guest(arg, 8))
            ev.bind_vcpu(port, vcpu)
            return 0
        if cmd == abi.EVTCHNOP_reset:
            dom = struct.unpack("<H", v.copy_from_guest(arg, 2))[0]
            if dom not in (abi.DOMID_SELF, d.domid):
                raise XenError(EPERM)
            ev.reset()
            return 0
        if cmd == abi.EVTCHNOP_bind_interdomain:
            remote_dom, remote_port = struct.unpack("<HxxI", v.copy_from_guest(arg, 8))
            v.copy_to_guest(arg + 8, struct.pack("<I", ev.bind_interdomain(remote_dom, remote_port)))
            return 0
        raise XenError(ENOSYS, f"event_channel_op {cmd}")

    def do_event_channel_op_compat(self, v: VCPU, arg: int, *_: int) -> int:
        cmd = _u32(v.copy_from_guest(arg, 4))
        return self.do_event_channel_op(v, cmd, arg + 8)

    def do_grant_table_op(self, v: VCPU, cmd: int, uop: int, count: int, *_: int) -> int:
        """grant_table_op(cmd, uop, count): each op's status goes into its struct."""
        from . import gnttab as G
        d = self.domain
        gt = d.gnttab
        cmd &= U32
        count &= U32
        if cmd == G.GNTTABOP_setup_table:
            for i in range(count):
                a = uop + i * G.SETUP_TABLE.size
                dom, nr, _, frames_ptr = G.SETUP_TABLE.unpack(v.copy_from_guest(a, G.SETUP_TABLE.size))
                status = G.GNTST_okay
                if dom not in (abi.DOMID_SELF, d.domid):
                    status = G.GNTST_permission_denied
                elif nr > gt.max_frames:
                    status = G.GNTST_general_error
                else:
                    mfns = gt.setup(nr)
                    if mfns:
                        v.copy_to_guest(frames_ptr, struct.pack(f"<{len(mfns)}Q", *mfns))
                v.copy_to_guest(a + 8, struct.pack("<h", status))
            return 0
        if cmd == G.GNTTABOP_query_size:
            for i in range(count):
                a = uop + i * G.QUERY_SIZE.size
                dom = struct.unpack("<H", v.copy_from_guest(a, 2))[0]
                if dom not in (abi.DOMID_SELF, d.domid):
                    v.copy_to_guest(a + 12, struct.pack("<h", G.GNTST_permission_denied))
                    continue
                v.copy_to_guest(a + 4, struct.pack("<IIh", gt.nr_frames, gt.max_frames, 0))
            return 0
        if cmd == G.GNTTABOP_get_version:
            dom = struct.unpack("<H", v.copy_from_guest(uop, 2))[0]
            if dom not in (abi.DOMID_SELF, d.domid):
                raise XenError(EPERM, "get_version of another domain")
            v.copy_to_guest(uop + 4, struct.pack("<I", 1))
            return 0
        if cmd == G.GNTTABOP_set_version:
            version = struct.unpack("<I", v.copy_from_guest(uop, 4))[0]
            v.copy_to_guest(uop, struct.pack("<I", 1))
            if version != 1:
                raise XenError(EINVAL, "pyxen implements grant table version 1 only")
            return 0
        if cmd == G.GNTTABOP_map_grant_ref:
            for i in range(count):
                a = uop + i * G.MAP_GRANT_REF.size
                host_addr, flags, ref, dom, *_rest = G.MAP_GRANT_REF.unpack(
                    v.copy_from_guest(a, G.MAP_GRANT_REF.size))
                status, handle, bus = gt.map(v, host_addr, flags, ref, dom)
                v.copy_to_guest(a + 18, struct.pack("<hIQ", status, handle, bus))
            return 0
        if cmd == G.GNTTABOP_unmap_grant_ref:
            for i in range(count):
                a = uop + i * G.UNMAP_GRANT_REF.size
                host_addr, bus, handle, _ = G.UNMAP_GRANT_REF.unpack(
                    v.copy_from_guest(a, G.UNMAP_GRANT_REF.size))
                v.copy_to_guest(a + 20, struct.pack("<h", gt.unmap(v, host_addr, bus, handle)))
            return 0
        if cmd == G.GNTTABOP_copy:
            return gt.copy_batch(v, uop, count)
        raise XenError(ENOSYS, f"grant_table_op {cmd}")



__all__ = ["Hypercalls", "PGT_L1", "PGT_L2", "PGT_L3", "PGT_SEG", "PGT_WRITABLE", "EFAULT"]
