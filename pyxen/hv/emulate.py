"""The instructions Xen emulates for PV guests.

A PV kernel runs at CPL3, so privileged instructions fault: #GP for ``rdmsr``,
``mov %cr3``, ``in``/``out`` without an open I/O bitmap, ``cli``...; #UD for
``ud2``.  Xen decodes the faulting instruction and carries it out on the
guest's behalf (``xen/arch/x86/pv/emul-priv-op.c``, ``emul-inv-op.c``); this
module does the same with the iced-x86 decoder.

It is split in two:

* pure functions (``emulate_invalid_op``, ``emulate_priv_op``,
  ``emulate_m2p_read``) that take the instruction bytes, a register dict and
  an ``Effects`` object and return a ``Result``: done (registers updated, RIP
  past the instruction), a fault to inject, or "not emulated" (the original
  fault is bounced to the guest as before).  They know nothing of KVM and are
  unit-tested with byte strings;
* ``VcpuEffects`` and ``handle_exception``/``handle_m2p_fault``: the glue to a
  live ``VCPU`` (its registers, its MSR and CPUID policies, the MMU).

Rules that come from Xen's source, not from the SDM:

* privileged instructions count as ring 0 only in guest kernel mode; from
  guest user mode they fault as on hardware (#GP(0));
* ``in``/``out``/``ins``/``outs`` need the virtual IOPL (PHYSDEVOP_set_iopl):
  the guest kernel counts as CPL1 (CPL0 with VMASST architectural_iopl), user
  as CPL3.  A domU has no devices: reads give all ones, writes are dropped,
  except the PCI conf1 address latch (0xcf8, 32-bit), the CMOS index (0x70)
  and the data port of config space (0xcfc-0xcff), which reads all ones;
* ``cli``/``sti`` with enough IOPL are accepted and do *nothing* (Xen
  deliberately leaves the event mask alone: a later ``popf`` could not undo
  it); without IOPL they #GP;
* ``wbinvd`` is ignored, ``clts`` is fpu_taskswitch(0), ``mov %cr0`` may
  change only TS, ``hlt``, ``swapgs``, ``lmsw``, ``smsw``, ``invlpg`` and
  everything else are not emulated: the #GP reaches the guest;
* the #GP path runs only for error code 0 (an ``int $n`` through a gate the
  guest may not use has a selector error code and is handled elsewhere).
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import iced_x86 as ix

from .. import abi
from ..abi import XenError
from . import cpuid as C
from . import msr as MS
from .machine import FAST_COUNT, FAST_KCR3, FAST_NEVER

if TYPE_CHECKING:
    from .domain import Domain
    from .vcpu import VCPU

M64 = (1 << 64) - 1
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
HIGH8 = {ix.Register.AH, ix.Register.CH, ix.Register.DH, ix.Register.BH}
FORCED_PREFIX = b"\x0f\x0bxen"
X86_EFLAGS_RF, X86_EFLAGS_DF = 0x10000, 0x400
X86_CR0_TS = 0x8
X86_CR4_TSD, X86_CR4_DE, X86_CR4_OSXSAVE = 0x4, 0x8, 0x40000
PFEC_WRITE, PFEC_USER = 0x2, 0x4
MAX_INSN = 15
MAX_REPS = 4096  # one exit's worth of rep ins/outs; the guest re-executes for the rest

Mn = ix.Mnemonic


@dataclass
class Result:
    """What to do after an emulation attempt."""

    action: str  # "done" (regs updated), "fault" (inject vec/err), "none" (not emulated)
    vec: int = 0
    err: int | None = None
    cr2: int = 0  # for an injected #PF

    @staticmethod
    def done() -> Result:
        return Result("done")

    @staticmethod
    def none() -> Result:
        return Result("none")

    @staticmethod
    def gp0() -> Result:
        return Result("fault", 13, 0)

    @staticmethod
    def ud() -> Result:
        return Result("fault", 6, None)


class MemFault(Exception):
    """A guest memory access by an emulated instruction faulted."""

    def __init__(self, addr: int, write: bool) -> None:
        super().__init__(f"{addr:#x}")
        self.addr = addr
        self.write = write


class Effects(Protocol):
    """The vCPU state an emulated instruction reads and changes."""

    kernel_mode: bool

    def iopl_ok(self) -> bool: ...
    def cpuid(self, leaf: int, subleaf: int) -> C.Leaf: ...
    def cpuid_faulting(self) -> bool: ...
    def rdmsr(self, idx: int) -> int | None: ...
    def wrmsr(self, idx: int, val: int) -> bool: ...
    def read_cr(self, n: int) -> int | None: ...
    def write_cr(self, n: int, val: int) -> bool: ...
    def read_dr(self, n: int) -> int | None: ...
    def write_dr(self, n: int, val: int) -> bool: ...
    def xsetbv(self, idx: int, val: int) -> bool: ...
    def io_read(self, port: int, size: int) -> int: ...
    def io_write(self, port: int, size: int, val: int) -> None: ...
    def rdtsc(self) -> int: ...
    def tsc_aux(self) -> int: ...
    def seg_base(self, seg: int) -> int: ...  # an iced Register (FS, GS, others 0)
    def read_mem(self, va: int, n: int) -> bytes: ...  # raises MemFault
    def write_mem(self, va: int, data: bytes) -> None: ...  # raises MemFault


# ------------------------------------------------------------ registers
def _gpr_name(reg: Any) -> str:
    return GPRS[ix.RegisterExt.number(ix.RegisterExt.full_register(reg))]


def get_reg(regs: dict[str, int], reg: Any) -> int:
    val = regs[_gpr_name(reg)]
    size = ix.RegisterExt.size(reg)
    if reg in HIGH8:
        return (val >> 8) & 0xFF
    return val & ((1 << (8 * size)) - 1)


def set_reg(regs: dict[str, int], reg: Any, value: int) -> None:
    """Write a GPR the way the CPU does: 32-bit writes zero-extend, 8/16-bit merge."""
    name = _gpr_name(reg)
    size = ix.RegisterExt.size(reg)
    old = regs[name]
    if size == 8:
        regs[name] = value & M64
    elif size == 4:
        regs[name] = value & 0xFFFFFFFF
    elif size == 2:
        regs[name] = (old & ~0xFFFF & M64) | (value & 0xFFFF)
    elif reg in HIGH8:
        regs[name] = (old & ~0xFF00 & M64) | ((value & 0xFF) << 8)
    else:
        regs[name] = (old & ~0xFF & M64) | (value & 0xFF)


def _decode(code: bytes, rip: int) -> ix.Instruction | None:
    ins = ix.Decoder(64, code, ip=rip).decode()
    if ins.code == ix.Code.INVALID:
        return None
    return ins


def _finish(regs: dict[str, int], next_ip: int) -> Result:
    regs["rip"] = next_ip & M64
    regs["rflags"] &= ~X86_EFLAGS_RF
    return Result.done()


# ------------------------------------------------------------ #UD: forced emulation
def emulate_invalid_op(code: bytes, regs: dict[str, int], fx: Effects) -> Result:
    """emulate_forced_invalid_op: ``ud2; .ascii "xen"; cpuid`` runs the CPUID
    policy (from user mode too, unless the guest turned CPUID faulting on)."""
    if code[:5] != FORCED_PREFIX or code[5:7] != b"\x0f\xa2":
        return Result.none()
    if fx.cpuid_faulting() and not fx.kernel_mode:
        regs["rip"] = (regs["rip"] + 5) & M64
        return Result("fault", 13, 0)
    a, b, c, d = fx.cpuid(regs["rax"] & 0xFFFFFFFF, regs["rcx"] & 0xFFFFFFFF)
    regs["rax"], regs["rbx"], regs["rcx"], regs["rdx"] = a, b, c, d
    return _finish(regs, regs["rip"] + 7)


# ------------------------------------------------------------ #GP: privileged ops
def emulate_priv_op(code: bytes, regs: dict[str, int], fx: Effects) -> Result:
    """pv_emulate_privileged_op for the faulting instruction at regs['rip']."""
    ins = _decode(code, regs["rip"])
    if ins is None:
        return Result.none()
    m = ins.mnemonic
    handler = _PRIV.get(m)
    if handler is None:
        return Result.none()
    return handler(ins, regs, fx)


def _ring0(fx: Effects) -> bool:
    return fx.kernel_mode


def _op_cpuid(ins: ix.Instruction, regs: dict[str, int], fx: Effects) -> Result:
    a, b, c, d = fx.cpuid(regs["rax"] & 0xFFFFFFFF, regs["rcx"] & 0xFFFFFFFF)
    regs["rax"], regs["rbx"], regs["rcx"], regs["rdx"] = a, b, c, d
    return _finish(regs, ins.next_ip)


def _op_rdtsc(ins: ix.Instruction, regs: dict[str, int], fx: Effects) -> Result:
    cr4 = fx.read_cr(4) or 0
    if cr4 & X86_CR4_TSD and not _ring0(fx):
        return Result.gp0()
    t = fx.rdtsc()
    regs["rax"], regs["rdx"] = t & 0xFFFFFFFF, (t >> 32) & 0xFFFFFFFF
    if ins.mnemonic == Mn.RDTSCP:
        regs["rcx"] = fx.tsc_aux() & 0xFFFFFFFF
    return _finish(regs, ins.next_ip)


def _op_msr(ins: ix.Instruction, regs: dict[str, int], fx: Effects) -> Result:
    if not _ring0(fx):
        return Result.gp0()
    idx = regs["rcx"] & 0xFFFFFFFF
    if ins.mnemonic == Mn.RDMSR:
        val = fx.rdmsr(idx)
        if val is None:
            return Result.gp0()
        regs["rax"], regs["rdx"] = val & 0xFFFFFFFF, (val >> 32) & 0xFFFFFFFF
    else:
        val = ((regs["rdx"] & 0xFFFFFFFF) << 32) | (regs["rax"] & 0xFFFFFFFF)
        if not fx.wrmsr(idx, val):
            return Result.gp0()
    return _finish(regs, ins.next_ip)


def _op_mov_crdr(ins: ix.Instruction, regs: dict[str, int], fx: Effects) -> Result:
    r0, r1 = ins.op0_register, ins.op1_register
    is_cr = ix.RegisterExt.is_cr(r0) or ix.RegisterExt.is_cr(r1)
    is_dr = ix.RegisterExt.is_dr(r0) or ix.RegisterExt.is_dr(r1)
    if not (is_cr or is_dr):
        return Result.none()
    if not _ring0(fx):
        return Result.gp0()
    to_special = ix.RegisterExt.is_cr(r0) or ix.RegisterExt.is_dr(r0)
    special, gpr = (r0, r1) if to_special else (r1, r0)
    n = ix.RegisterExt.number(special)
    if is_dr:
        if n >= 8:
            return Result.ud()
        if n in (4, 5):
            if (fx.read_cr(4) or 0) & X86_CR4_DE:
                return Result.ud()
            n += 2
        if to_special:
            if not fx.write_dr(n, get_reg(regs, gpr)):
                return Result.gp0()
        else:
            v = fx.read_dr(n)
            if v is None:
                return Result.gp0()
            set_reg(regs, gpr, v)
        return _finish(regs, ins.next_ip)
    if to_special:
        if not fx.write_cr(n, get_reg(regs, gpr)):
            return Result.none()  # Xen: unhandleable, the #GP stands
    else:
        v = fx.read_cr(n)
        if v is None:
            return Result.none()
        set_reg(regs, gpr, v)
    return _finish(regs, ins.next_ip)


def _op_clts(ins: ix.Instruction, regs: dict[str, int], fx: Effects) -> Result:
    if not _ring0(fx):
        return Result.gp0()
    cr0 = fx.read_cr(0) or 0
    if not fx.write_cr(0, cr0 & ~X86_CR0_TS):
        return Result.none()
    return _finish(regs, ins.next_ip)


def _op_wbinvd(ins: ix.Instruction, regs: dict[str, int], fx: Effects) -> Result:
    if not _ring0(fx):
        return Result.gp0()
    return _finish(regs, ins.next_ip)  # a domU without cache-flush permission: ignored


def _op_xsetbv(ins: ix.Instruction, regs: dict[str, int], fx: Effects) -> Result:
    if not (fx.read_cr(4) or 0) & X86_CR4_OSXSAVE:
        return Result.ud()
    if not _ring0(fx):
        return Result.gp0()
    val = ((regs["rdx"] & 0xFFFFFFFF) << 32) | (regs["rax"] & 0xFFFFFFFF)
    if not fx.xsetbv(regs["rcx"] & 0xFFFFFFFF, val):
        return Result.gp0()
    return _finish(regs, ins.next_ip)


def _op_cli_sti(ins: ix.Instruction, regs: dict[str, int], fx: Effects) -> Result:
    if not fx.iopl_ok():
        return Result.none()
    return _finish(regs, ins.next_ip)  # Xen accepts and ignores them


def _port(ins: ix.Instruction, regs: dict[str, int], op: int) -> int:
    if ins.op_kind(op) == ix.OpKind.IMMEDIATE8:
        return ins.immediate8
    return regs["rdx"] & 0xFFFF


def _op_in_out(ins: ix.Instruction, regs: dict[str, int], fx: Effects) -> Result:
    if not fx.iopl_ok():
        return Result.gp0()  # guest_io_okay: no I/O bitmap for a domU either
    if ins.mnemonic == Mn.IN:
        size = ix.RegisterExt.size(ins.op0_register)
        val = fx.io_read(_port(ins, regs, 1), size)
        set_reg(regs, ins.op0_register, val)
    else:
        size = ix.RegisterExt.size(ins.op1_register)
        fx.io_write(_port(ins, regs, 0), size, get_reg(regs, ins.op1_register))
    return _finish(regs, ins.next_ip)


def _op_string_io(ins: ix.Instruction, regs: dict[str, int], fx: Effects) -> Result:
    if not fx.iopl_ok():
        return Result.gp0()
    size = {Mn.INSB: 1, Mn.INSW: 2, Mn.INSD: 4, Mn.OUTSB: 1, Mn.OUTSW: 2, Mn.OUTSD: 4}[ins.mnemonic]
    port = regs["rdx"] & 0xFFFF
    rep = ins.has_rep_prefix or ins.has_repne_prefix
    count = regs["rcx"] if rep else 1
    step = -size if regs["rflags"] & X86_EFLAGS_DF else size
    is_in = ins.mnemonic in (Mn.INSB, Mn.INSW, Mn.INSD)
    n = 0
    while n < min(count, MAX_REPS):
        try:
            if is_in:
                val = fx.io_read(port, size)
                fx.write_mem(regs["rdi"], val.to_bytes(size, "little"))
                regs["rdi"] = (regs["rdi"] + step) & M64
            else:
                seg = ins.memory_segment
                va = (fx.seg_base(seg) + regs["rsi"]) & M64
                data = fx.read_mem(va, size)
                fx.io_write(port, size, int.from_bytes(data, "little"))
                regs["rsi"] = (regs["rsi"] + step) & M64
        except MemFault as e:
            if rep:
                regs["rcx"] = (count - n) & M64
            return Result("fault", 14, (PFEC_WRITE if e.write else 0)
                          | (0 if fx.kernel_mode else PFEC_USER), e.addr)
        n += 1
    if rep:
        regs["rcx"] = (count - n) & M64
        if regs["rcx"]:
            regs["rflags"] &= ~X86_EFLAGS_RF
            return Result.done()  # RIP unchanged: the rest on re-execution
    return _finish(regs, ins.next_ip)


_PRIV = {
    Mn.CPUID: _op_cpuid, Mn.RDTSC: _op_rdtsc, Mn.RDTSCP: _op_rdtsc,
    Mn.RDMSR: _op_msr, Mn.WRMSR: _op_msr, Mn.MOV: _op_mov_crdr, Mn.CLTS: _op_clts,
    Mn.WBINVD: _op_wbinvd, Mn.WBNOINVD: _op_wbinvd, Mn.XSETBV: _op_xsetbv,
    Mn.CLI: _op_cli_sti, Mn.STI: _op_cli_sti, Mn.IN: _op_in_out, Mn.OUT: _op_in_out,
    Mn.INSB: _op_string_io, Mn.INSW: _op_string_io, Mn.INSD: _op_string_io,
    Mn.OUTSB: _op_string_io, Mn.OUTSW: _op_string_io, Mn.OUTSD: _op_string_io,
}


# ------------------------------------------------------------ #PF: reads of the fixed-address M2P
M2P_START, M2P_END = abi.MACH2PHYS_VIRT_START, abi.MACH2PHYS_VIRT_END
_LOADS = {Mn.MOV, Mn.MOVZX, Mn.MOVSX, Mn.MOVSXD}


def effective_address(ins: ix.Instruction, regs: dict[str, int], fx: Effects) -> int:
    if ins.is_ip_rel_memory_operand:
        ea = ins.ip_rel_memory_address
    else:
        ea = ins.memory_displacement
        if ins.memory_base != ix.Register.NONE:
            ea += get_reg(regs, ins.memory_base)
        if ins.memory_index != ix.Register.NONE:
            ea += get_reg(regs, ins.memory_index) * ins.memory_index_scale
    return (ea + fx.seg_base(ins.memory_segment)) & M64


def emulate_m2p_read(code: bytes, regs: dict[str, int], fx: Effects, cr2: int,
                     m2p_read: object) -> Result:
    """A load from Xen's fixed M2P address (0xffff800000000000, which these
    hosts cannot map: platform-notes.md) done by hand: ``mov``/``movzx``/
    ``movsx`` into a register, the bytes from pyxen's M2P table.
    ``m2p_read(offset, n)`` returns the bytes or None where Xen has no M2P
    page mapped (the #PF then stands)."""
    if not M2P_START <= cr2 < M2P_END:
        return Result.none()
    ins = _decode(code, regs["rip"])
    if ins is None or ins.mnemonic not in _LOADS or ins.op_count != 2 \
            or ins.op0_kind != ix.OpKind.REGISTER or ins.op1_kind != ix.OpKind.MEMORY \
            or not ix.RegisterExt.is_gpr(ins.op0_register):
        return Result.none()
    size = ix.MemorySizeExt.size(ins.memory_size)
    ea = effective_address(ins, regs, fx)
    if not (ea <= cr2 < ea + size and M2P_START <= ea and ea + size <= M2P_END):
        return Result.none()
    data = m2p_read(ea - M2P_START, size)  # type: ignore[operator]
    if data is None:
        return Result.none()
    val = int.from_bytes(data, "little")
    if ins.mnemonic in (Mn.MOVSX, Mn.MOVSXD) and val >> (8 * size - 1):
        val -= 1 << (8 * size)
    set_reg(regs, ins.op0_register, val)
    return _finish(regs, ins.next_ip)


# ------------------------------------------------------------ the live vCPU
class _DomainIo:
    """Per-domain I/O port state Xen keeps for a PV domU (currd->arch.pci_cf8,
    cmos_idx)."""

    def __init__(self) -> None:
        self.pci_cf8 = 0
        self.cmos_idx = 0


_domain_io: weakref.WeakKeyDictionary[Domain, _DomainIo] = weakref.WeakKeyDictionary()


def domain_io(d: Domain) -> _DomainIo:
    st = _domain_io.get(d)
    if st is None:
        st = _domain_io[d] = _DomainIo()
    return st


def guest_io_read(io: _DomainIo, port: int, size: int) -> int:
    """guest_io_read for a domU without I/O ports: all ones, except the latches."""
    data, shift = 0, 0
    while size:
        sub, n = 0xFFFFFFFF, 1
        if port == 0xCF8 and size == 4:
            return io.pci_cf8
        if port == 0x70:
            sub = io.cmos_idx & 0x7F
        elif (port & 0xFFFC) == 0xCFC:
            n = min(size, 4 - (port & 3))
            n = 2 if n == 3 else n
        data |= (sub & ((1 << (8 * n)) - 1)) << shift
        shift += 8 * n
        port += n
        size -= n
    return data


def guest_io_write(io: _DomainIo, port: int, size: int, val: int) -> None:
    """guest_io_write for a domU: only the CF8 and CMOS index latches keep anything."""
    if port == 0xCF8 and size == 4:
        io.pci_cf8 = val & 0xFFFFFFFF
        return
    while size:
        n = 1
        if port == 0x70:
            io.cmos_idx = val & 0xFF
        elif (port & 0xFFFC) == 0xCFC:
            n = min(size, 4 - (port & 3))
            n = 2 if n == 3 else n
        port += n
        size -= n
        val >>= 8 * n


class VcpuEffects:
    """``Effects`` and ``MsrHost`` for a running VCPU: what the emulated
    instruction does to the vCPU, its domain and the MMU."""

    def __init__(self, v: VCPU) -> None:
        self.v = v
        self.kernel_mode = v.kernel_mode
        self.vcpu_id = v.id

    # -- modes
    def iopl_ok(self) -> bool:
        arch_iopl = self.v.domain.vm_assist >> abi.VMASST_TYPE_architectural_iopl & 1
        cpl = (0 if arch_iopl else 1) if self.kernel_mode else 3
        return cpl <= int(getattr(self.v, "iopl", 0))

    def cpuid(self, leaf: int, subleaf: int) -> C.Leaf:
        return self.v.cpuid_policy.lookup(leaf, subleaf)

    def cpuid_faulting(self) -> bool:
        return bool(self.v.msrs.misc_features_enables & MS.MISC_FEATURES_CPUID_FAULTING)

    # -- MSRs
    def rdmsr(self, idx: int) -> int | None:
        return self.v.msr_policy.read(self, self.v.msrs, idx)

    def wrmsr(self, idx: int, val: int) -> bool:
        return self.v.msr_policy.write(self, self.v.msrs, idx, val)

    def fs_base(self) -> int:
        return int(self.v.kvm.sregs.fs.base)

    def gs_base(self) -> int:
        return int(self.v.kvm.sregs.gs.base)

    def gs_base_user(self) -> int:
        return self.v.gs_base_user if self.v.kernel_mode else int(self.v.kvm.sregs.gs.base)

    def set_fs_base(self, val: int) -> None:
        self.v.kvm.sregs.fs.base = val
        self.v.kvm.mark_sregs_dirty()

    def set_gs_base(self, val: int) -> None:
        self.v.kvm.sregs.gs.base = val  # the base in effect now (set_segment_base's GS_KERNEL)
        self.v.kvm.mark_sregs_dirty()

    def set_gs_shadow(self, val: int) -> None:
        if self.v.kernel_mode:
            self.v.gs_base_user = val
        else:
            self.v.gs_base_kernel = val

    def rdtsc(self) -> int:
        from .. import kvm
        return self.v.kvm.get_msrs([kvm.MSR_IA32_TSC])[0]

    def tsc_aux(self) -> int:
        return self.v.msrs.tsc_aux

    def efer(self) -> int:
        return int(self.v.kvm.sregs.efer)

    def host_rdmsr(self, idx: int) -> int | None:
        try:
            return self.v.kvm.get_msrs([idx])[0]
        except OSError:
            return None

    def set_tsc_aux(self, val: int) -> None:
        try:
            self.v.kvm.set_msrs({MS.MSR_TSC_AUX: val})
        except OSError:
            pass  # rdtscp then shows the old value; the MSR itself reads back right

    def has_gp_handler(self) -> bool:
        ent = self.v.trap_table.get(13)
        return bool(ent and ent[2])

    # -- control and debug registers
    def read_cr(self, n: int) -> int | None:
        v = self.v
        s = v.kvm.sregs
        if n == 0:
            return (int(s.cr0) & ~X86_CR0_TS) | (X86_CR0_TS if v.virtual_ts else 0)
        if n == 2:
            return int(struct.unpack_from("<Q", v.vi_buf, v.vi_off + abi.VI_CR2)[0])
        if n == 3:
            return v.kernel_l4 << 12 if v.kernel_mode else v.user_l4 << 12
        if n == 4:
            return v.guest_cr4
        return None

    def write_cr(self, n: int, val: int) -> bool:
        v = self.v
        s = v.kvm.sregs
        if n == 0:
            if (val ^ int(s.cr0)) & ~X86_CR0_TS & M64:
                return False
            v.virtual_ts = bool(val & X86_CR0_TS)
            s.cr0 = (int(s.cr0) & ~X86_CR0_TS) | (val & X86_CR0_TS)
            v.kvm.mark_sregs_dirty()
            return True
        if n == 2:
            struct.pack_into("<Q", v.vi_buf, v.vi_off + abi.VI_CR2, val & M64)
            return True
        if n == 3:
            return self._new_guest_cr3(val >> 12)
        if n == 4:
            v.guest_cr4 = fixup_guest_cr4(v.cpuid_policy, val)
            return True
        return False

    def _new_guest_cr3(self, mfn: int) -> bool:
        """new_guest_cr3, as MMUEXT_NEW_BASEPTR does it (the guest kernel's base pointer)."""
        from .mm import PGT_L4
        v = self.v
        ft = v.domain.ft
        if not v.kernel_mode or not ft.owns(mfn):
            return False
        try:
            if mfn != v.kernel_l4:
                ft.get_type(mfn, PGT_L4)
                old, v.kernel_l4 = v.kernel_l4, mfn
                if old:
                    ft.put_type(old)
        except XenError:
            return False
        v.kvm.sregs.cr3 = mfn << 12
        v.kvm.mark_sregs_dirty()
        refresh_fast_path(v)
        v.flush_requested = True
        v.attention = True
        return True

    def read_dr(self, n: int) -> int | None:
        # one set of debug registers for `mov %drN` and the set/get_debugreg
        # hypercalls, with Xen's rules (x86emul_read_dr/write_dr call the same)
        from .hypercalls import get_debugreg
        r = get_debugreg(self.v, n)
        return None if r < 0 else r

    def write_dr(self, n: int, val: int) -> bool:
        from .hypercalls import set_debugreg
        return set_debugreg(self.v, n, val) == 0

    def xsetbv(self, idx: int, val: int) -> bool:
        return False  # XSAVE is not offered (cpuid.py): never reached with OSXSAVE clear

    # -- I/O and memory
    def io_read(self, port: int, size: int) -> int:
        return guest_io_read(domain_io(self.v.domain), port, size)

    def io_write(self, port: int, size: int, val: int) -> None:
        guest_io_write(domain_io(self.v.domain), port, size, val)

    def seg_base(self, seg: int) -> int:
        if seg == ix.Register.FS:
            return self.fs_base()
        if seg == ix.Register.GS:
            return self.gs_base()
        return 0

    def read_mem(self, va: int, n: int) -> bytes:
        try:
            return self.v.copy_from_guest(va, n)
        except XenError:
            raise MemFault(va, False) from None

    def write_mem(self, va: int, data: bytes) -> None:
        try:
            self.v.copy_to_guest(va, data)
        except XenError:
            raise MemFault(va, True) from None


def fast_path_word(kernel_l4: int, user_l4: int, iopl: int, arch_iopl: bool) -> int:
    """The #GP fast path's permission word (machine.FAST_GP_CODE): the guest
    kernel's CR3 when its port I/O and cli/sti are allowed (virtual IOPL at
    least its CPL: 1, or 0 with VMASST architectural_iopl) and its user page
    tables are distinct, so that matching CR3 means guest kernel mode; else a
    value no CR3 has."""
    if not kernel_l4 or kernel_l4 == user_l4 or iopl < (0 if arch_iopl else 1):
        return FAST_NEVER
    return kernel_l4 << 12


def refresh_fast_path(v: VCPU) -> None:
    """Rewrite the vCPU's fast-path word after anything that may change the
    kernel or user base pointer, the virtual IOPL or VM assists (hypercalls,
    an emulated CR3 write).  Called after every hypercall, so it returns at
    once when none of its inputs changed (~0.3 µs).  Also arms or disarms the
    `syscall` stub's is_up fast path (machine.syscall_stub_code): armed in
    guest kernel mode with no upcall pending, where `syscall` arrives at CPL3."""
    arm = v.kernel_mode and v.syscall_cpl3 and not v.vi_buf[v.vi_off + abi.VI_UPCALL_PENDING]
    if arm != v.syscall_fast_armed:
        v.syscall_fast_armed = arm
        v.machine.set_syscall_fast(v.id, arm, len(v.domain.vcpus))
    key = (v.kernel_l4, v.user_l4, v.iopl, v.domain.vm_assist)
    if key == v.__dict__.get("_fast_key"):
        return
    v.__dict__["_fast_key"] = key
    w = fast_path_word(key[0], key[1], key[2],
                       bool(key[3] >> abi.VMASST_TYPE_architectural_iopl & 1))
    struct.pack_into("<Q", v.machine.hv, v.percpu["stack_off"] + FAST_KCR3, w)


def syscall_fast_off(v: VCPU) -> None:
    """Disarm the `syscall` stub's fast path (guest user mode, or an upcall
    may be pending: machine.syscall_stub_code)."""
    if v.syscall_fast_armed:
        v.syscall_fast_armed = False
        v.machine.set_syscall_fast(v.id, False, len(v.domain.vcpus))


def fast_path_count(v: VCPU) -> int:
    """#GP traps the fast path answered on this vCPU without an exit."""
    return int(struct.unpack_from("<Q", v.machine.hv, v.percpu["stack_off"] + FAST_COUNT)[0])


def fixup_guest_cr4(policy: C.PvCpuidPolicy, cr4: int) -> int:
    """pv_fixup_guest_cr4: the guest chooses TSD/DE/FSGSBASE/OSXSAVE within its
    CPUID policy and sees Xen's PAE|MCE|OSFXSR|OSXMMEXCPT choice for the rest
    (pyxen runs with PAE|OSFXSR|OSXMMEXCPT)."""
    drop = 0
    if not policy.has(1, 0, 3, 4):
        drop |= X86_CR4_TSD
    if not policy.has(1, 0, 3, 2):
        drop |= X86_CR4_DE
    if not policy.has(7, 0, 1, 0):
        drop |= 0x10000  # FSGSBASE
    if not policy.has(1, 0, 2, 26):
        drop |= X86_CR4_OSXSAVE
    guest_mask = X86_CR4_TSD | X86_CR4_DE | 0x10000 | X86_CR4_OSXSAVE
    return ((cr4 & ~drop) & guest_mask) | HOST_CR4_VISIBLE


HOST_CR4_VISIBLE = 0x20 | 0x200 | 0x400  # PAE OSFXSR OSXMMEXCPT


# ------------------------------------------------------------ entry points from VCPU.exception
def _fetch(v: VCPU, rip: int) -> bytes | None:
    n = MAX_INSN
    while n > 0:
        try:
            return v.copy_from_guest(rip, n)
        except XenError:
            # the instruction may end before an unmapped page: read up to the boundary
            k = 4096 - (rip & 4095)
            if k >= n:
                return None
            n = k
    return None


def _regs_of(v: VCPU) -> dict[str, int]:
    r = v.kvm.regs
    d = {name: int(getattr(r, name)) for name in GPRS}
    d["rip"], d["rflags"] = int(r.rip), int(r.rflags)
    return d


def _apply(v: VCPU, before: dict[str, int], after: dict[str, int]) -> None:
    r = v.kvm.regs
    for k, val in after.items():
        if before[k] != val:
            setattr(r, k, val)
    v.kvm.mark_regs_dirty()


def _inject(v: VCPU, res: Result) -> None:
    if res.vec == 14:
        struct.pack_into("<Q", v.vi_buf, v.vi_off + abi.VI_CR2, res.cr2 & M64)
    v.bounce_trap(res.vec, res.err)


def handle_exception(v: VCPU, vec: int, err: int | None) -> bool:
    """#UD or #GP from the guest at kvm.regs.rip: emulate if Xen would.
    True if handled (emulated, or Xen's fault injected); False: bounce as before."""
    if vec == 13 and err != 0:
        return False
    code = _fetch(v, int(v.kvm.regs.rip))
    if not code:
        return False
    regs = _regs_of(v)
    before = dict(regs)
    fx = VcpuEffects(v)
    try:
        res = emulate_invalid_op(code, regs, fx) if vec == 6 else emulate_priv_op(code, regs, fx)
    except Exception as e:  # noqa: BLE001 - never a hypervisor exception from guest input
        v.domain.log(f"emulation at {before['rip']:#x} failed: {e!r}")
        return False  # the guest gets its original fault
    if res.action == "none":
        return False
    _apply(v, before, regs)
    if res.action == "fault":
        _inject(v, res)
    v.stats["emulated"] = v.stats.get("emulated", 0) + 1
    return True


def m2p_reader(v: VCPU):  # type: ignore[no-untyped-def]
    m = v.machine

    def read(off: int, n: int) -> bytes | None:
        out = b""
        while n > 0:
            page = m.m2p_page_of.get(off >> 12)
            if page is None:
                return None
            k = min(n, 4096 - (off & 4095))
            base = page * 4096 + (off & 4095)
            out += bytes(m.hv[base:base + k])
            off += k
            n -= k
        return out
    return read


def handle_m2p_fault(v: VCPU, cr2: int) -> bool:
    """#PF from guest kernel mode at Xen's fixed M2P address: serve the load."""
    if not (M2P_START <= cr2 < M2P_END) or not v.kernel_mode:
        return False
    code = _fetch(v, int(v.kvm.regs.rip))
    if not code:
        return False
    regs = _regs_of(v)
    before = dict(regs)
    try:
        res = emulate_m2p_read(code, regs, VcpuEffects(v), cr2, m2p_reader(v))
    except Exception as e:  # noqa: BLE001 - never a hypervisor exception from guest input
        v.domain.log(f"M2P load emulation at {before['rip']:#x} failed: {e!r}")
        return False
    if res.action != "done":
        return False
    _apply(v, before, regs)
    return True
