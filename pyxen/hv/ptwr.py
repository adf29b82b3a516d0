"""Writable page tables: Xen's ``ptwr`` emulation (xen/arch/x86/pv/ro-page-fault.c).

With ``VMASST_TYPE_writable_pagetables`` a PV kernel may write its L1 page
tables with ordinary instructions through their read-only mappings.  The
write faults (#PF, error code present|write, in guest kernel mode), Xen
decodes the instruction, validates the new entry exactly as ``mmu_update``
would (``get_page_from_l1e``), applies it and resumes the guest after the
instruction.  Only validated L1 frames are writable this way; a write to an
L2-L4, or a new entry that fails validation, leaves the fault alone and the
guest receives the original #PF.

Xen's rules reproduced here:

* only naturally aligned stores of 1, 2, 4 or 8 bytes inside the faulting
  (CR2) page are emulated;
* a store narrower than 8 bytes is combined with the rest of the entry
  (the other half keeps its current value) and the whole 8-byte entry is
  validated (``ptwr_emulated_update``);
* read-modify-write instructions (``xchg``, ``lock and/or/xor/add/sub``,
  ``lock bts/btr/btc``, ``cmpxchg``) read the entry, compute, and update it
  only if it still holds what was read (Xen's emulator turns them into its
  ``cmpxchg`` hook); ``cmpxchg`` whose comparison fails writes nothing and
  loads the accumulator, as the CPU does.

The decoding and the arithmetic are pure functions of (instruction bytes,
registers, current entry) and are unit-tested without KVM; ``handle_fault``
is the glue the vCPU's #PF path calls.  The validated entry is written
through the FrameTable's ``write_entry``, which queues it for the vCPU's
MMU helper (platform-notes.md fact 1): the caller must let the run loop
flush before the guest runs again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import iced_x86 as ix

from .. import abi
from ..abi import XenError

if TYPE_CHECKING:
    from .vcpu import VCPU

PFEC_PRESENT, PFEC_WRITE, PFEC_USER, PFEC_RSVD, PFEC_INSN = 0x1, 0x2, 0x4, 0x8, 0x10
CF, PF, AF, ZF, SF, OF = 0x1, 0x4, 0x10, 0x40, 0x80, 0x800
ARITH_FLAGS = CF | PF | AF | ZF | SF | OF
MASK64 = (1 << 64) - 1

_R = ix.Register
GPR_NAMES = {_R.RAX: "rax", _R.RCX: "rcx", _R.RDX: "rdx", _R.RBX: "rbx", _R.RSP: "rsp",
             _R.RBP: "rbp", _R.RSI: "rsi", _R.RDI: "rdi", _R.R8: "r8", _R.R9: "r9",
             _R.R10: "r10", _R.R11: "r11", _R.R12: "r12", _R.R13: "r13", _R.R14: "r14",
             _R.R15: "r15"}
_HIGH8 = {_R.AH: "rax", _R.CH: "rcx", _R.DH: "rdx", _R.BH: "rbx"}
_M = ix.Mnemonic
_RMW = {_M.AND, _M.OR, _M.XOR, _M.ADD, _M.SUB}
_BITS = {_M.BTS, _M.BTR, _M.BTC}
_ACC = {1: _R.AL, 2: _R.AX, 4: _R.EAX, 8: _R.RAX}


class NotMine(Exception):
    """The faulting instruction is not a page-table write ptwr emulates."""


def read_reg(regs: Mapping[str, int], reg: ix.Register_) -> int:
    """Value of an iced register (any width of a GPR) from a name -> u64 map."""
    if reg in _HIGH8:
        return (regs[_HIGH8[reg]] >> 8) & 0xFF
    if not ix.RegisterExt.is_gpr(reg):
        raise NotMine(f"register {reg} is not a general-purpose register")
    full = GPR_NAMES[ix.RegisterExt.full_register(reg)]
    size = ix.RegisterExt.size(reg)
    return regs[full] & ((1 << (8 * size)) - 1)


def write_reg(regs: Mapping[str, int], reg: ix.Register_, value: int, out: dict[str, int]) -> None:
    """Architectural register write into ``out``: 32-bit writes zero-extend,
    8/16-bit writes keep the other bits."""
    if reg in _HIGH8:
        name = _HIGH8[reg]
        cur = out.get(name, regs[name])
        out[name] = (cur & ~0xFF00) | ((value & 0xFF) << 8)
        return
    name = GPR_NAMES[ix.RegisterExt.full_register(reg)]
    size = ix.RegisterExt.size(reg)
    if size >= 4:
        out[name] = value & ((1 << (8 * size)) - 1)
        return
    cur = out.get(name, regs[name])
    m = (1 << (8 * size)) - 1
    out[name] = (cur & ~m & MASK64) | (value & m)


def _parity(v: int) -> int:
    return PF if bin(v & 0xFF).count("1") % 2 == 0 else 0


def _szp(res: int, size: int) -> int:
    bits = 8 * size
    f = _parity(res)
    if res == 0:
        f |= ZF
    if res >> (bits - 1) & 1:
        f |= SF
    return f


def flags_logic(res: int, size: int) -> int:
    """and/or/xor: CF = OF = 0, SF/ZF/PF from the result (AF undefined: 0)."""
    return _szp(res, size)


def flags_add(a: int, b: int, size: int) -> int:
    bits = 8 * size
    m = (1 << bits) - 1
    res = (a + b) & m
    f = _szp(res, size)
    if a + b > m:
        f |= CF
    if (a ^ b ^ res) & 0x10:
        f |= AF
    if (~(a ^ b) & (a ^ res)) >> (bits - 1) & 1:
        f |= OF
    return f


def flags_sub(a: int, b: int, size: int) -> int:
    """Flags of ``a - b`` (also ``cmp a, b`` and cmpxchg's comparison)."""
    bits = 8 * size
    m = (1 << bits) - 1
    res = (a - b) & m
    f = _szp(res, size)
    if a < b:
        f |= CF
    if (a ^ b ^ res) & 0x10:
        f |= AF
    if ((a ^ b) & (a ^ res)) >> (bits - 1) & 1:
        f |= OF
    return f


@dataclass(frozen=True)
class Decoded:
    """One decoded memory write: the instruction and the linear address and
    size it stores to."""
    insn: ix.Instruction
    addr: int
    size: int

    @property
    def length(self) -> int:
        return int(self.insn.len)


def _mem_operand(insn: ix.Instruction) -> int:
    for i in range(insn.op_count):
        if insn.op_kind(i) == ix.OpKind.MEMORY:
            return i
    raise NotMine("no memory operand")


def decode(code: bytes, rip: int, regs: Mapping[str, int], fs_base: int = 0,
           gs_base: int = 0) -> Decoded:
    """Decode the instruction at ``rip`` and compute the address it writes.
    Raises NotMine for anything ptwr does not emulate."""
    dec = ix.Decoder(64, code, ip=rip)
    insn = dec.decode()
    if insn.code == ix.Code.INVALID:
        raise NotMine("undecodable instruction")
    mn = insn.mnemonic
    if mn not in (_M.MOV, _M.XCHG, _M.CMPXCHG) and mn not in _RMW and mn not in _BITS:
        raise NotMine(f"instruction {mn} is not a page-table write")
    if insn.op_count != 2:
        raise NotMine("unexpected operand count")
    mi = _mem_operand(insn)
    if mi != 0 and mn != _M.XCHG:
        raise NotMine("memory is not the destination")
    size = ix.MemorySizeExt.size(insn.memory_size)
    if size not in (1, 2, 4, 8):
        raise NotMine(f"store of {size} bytes")
    if insn.is_ip_rel_memory_operand:
        addr = insn.ip_rel_memory_address
    else:
        addr = insn.memory_displacement
        narrow = False
        if insn.memory_base != _R.NONE:
            addr += read_reg(regs, insn.memory_base)
            narrow = bool(ix.RegisterExt.is_gpr32(insn.memory_base))
        if insn.memory_index != _R.NONE:
            addr += read_reg(regs, insn.memory_index) * insn.memory_index_scale
            narrow = narrow or bool(ix.RegisterExt.is_gpr32(insn.memory_index))
        addr &= 0xFFFFFFFF if narrow else MASK64
    if mn in _BITS and insn.op_kind(1) == ix.OpKind.REGISTER:
        # bit-string addressing: a register bit offset (signed) selects the operand
        bits = 8 * size
        off = read_reg(regs, insn.op_register(1))
        if off >> (bits - 1) & 1:
            off -= 1 << bits
        addr += (off >> (bits.bit_length() - 1)) * size
        addr &= MASK64
    seg = insn.memory_segment
    if seg == _R.FS:
        addr = (addr + fs_base) & MASK64
    elif seg == _R.GS:
        addr = (addr + gs_base) & MASK64
    return Decoded(insn, addr, size)


def _source(insn: ix.Instruction, regs: Mapping[str, int], size: int) -> int:
    m = (1 << (8 * size)) - 1
    if insn.op_kind(1) == ix.OpKind.REGISTER:
        return read_reg(regs, insn.op_register(1)) & m
    return int(insn.immediate(1)) & m


@dataclass(frozen=True)
class Outcome:
    """What the instruction does: ``new`` is the value stored (None: no store,
    a failed cmpxchg), ``regs`` the registers it changes (rflags included)."""
    new: int | None
    regs: dict[str, int]


def execute(d: Decoded, cur: int, regs: Mapping[str, int]) -> Outcome:
    """Run the decoded instruction against ``cur``, the ``d.size``-byte value in
    memory.  Pure."""
    insn, size = d.insn, d.size
    mn = insn.mnemonic
    m = (1 << (8 * size)) - 1
    cur &= m
    out: dict[str, int] = {}
    rflags = regs["rflags"]
    if mn == _M.MOV:
        return Outcome(_source(insn, regs, size), out)
    if mn == _M.XCHG:
        other = insn.op_register(1 if _mem_operand(insn) == 0 else 0)
        val = read_reg(regs, other)
        write_reg(regs, other, cur, out)
        return Outcome(val & m, out)
    if mn == _M.CMPXCHG:
        acc = _ACC[size]
        a = read_reg(regs, acc)
        out["rflags"] = (rflags & ~ARITH_FLAGS) | flags_sub(a, cur, size)
        if a == cur:
            return Outcome(_source(insn, regs, size), out)
        write_reg(regs, acc, cur, out)
        return Outcome(None, out)
    if mn in _BITS:
        bits = 8 * size
        if insn.op_kind(1) == ix.OpKind.REGISTER:
            bit = read_reg(regs, insn.op_register(1)) % bits
        else:
            bit = int(insn.immediate(1)) % bits
        old = cur >> bit & 1
        out["rflags"] = (rflags & ~CF) | (CF if old else 0)
        if mn == _M.BTS:
            new = cur | (1 << bit)
        elif mn == _M.BTR:
            new = cur & ~(1 << bit)
        else:
            new = cur ^ (1 << bit)
        return Outcome(new & m, out)
    src = _source(insn, regs, size)
    if mn == _M.AND:
        res, f = cur & src, flags_logic(cur & src, size)
    elif mn == _M.OR:
        res, f = cur | src, flags_logic(cur | src, size)
    elif mn == _M.XOR:
        res, f = cur ^ src, flags_logic(cur ^ src, size)
    elif mn == _M.ADD:
        res, f = (cur + src) & m, flags_add(cur, src, size)
    else:  # SUB
        res, f = (cur - src) & m, flags_sub(cur, src, size)
    out["rflags"] = (rflags & ~ARITH_FLAGS) | f
    return Outcome(res, out)


def combine(full: int, addr: int, size: int, val: int) -> int:
    """Xen's sub-word rule: a ``size``-byte store at ``addr`` becomes an
    8-byte entry whose other bytes keep their current value in ``full``."""
    if size == 8:
        return val & MASK64
    shift = (addr & 7) * 8
    m = ((1 << (8 * size)) - 1) << shift
    return (full & ~m & MASK64) | ((val << shift) & m)


def extract(full: int, addr: int, size: int) -> int:
    """The ``size`` bytes at ``addr`` of the 8-byte entry ``full``."""
    return (full >> ((addr & 7) * 8)) & ((1 << (8 * size)) - 1)


@dataclass(frozen=True)
class Emulated:
    """Result of emulating one write to a page-table entry."""
    entry: int | None   # the new 8-byte entry, None if nothing is stored
    regs: dict[str, int]  # changed registers, rip included
    addr: int           # linear address of the store
    old: int            # the 8-byte entry the instruction read


def emulate(code: bytes, rip: int, regs: Mapping[str, int], cr2: int,
            entry_at: Callable[[int], int], fs_base: int = 0, gs_base: int = 0) -> Emulated:
    """Pure ptwr emulation.  ``entry_at(addr)`` gives the current 8-byte entry
    containing linear address ``addr`` (a page offset in the faulting page
    table).  ``Emulated.old`` is that entry as read, for the update's
    compare.  Raises NotMine where Xen's ptwr gives up."""
    d = decode(code, rip, regs, fs_base, gs_base)
    if (d.addr ^ cr2) & ~0xFFF or d.addr & (d.size - 1):
        raise NotMine(f"store at {d.addr:#x} ({d.size} bytes) is not an aligned write "
                      f"in the faulting page {cr2:#x}")
    full = entry_at(d.addr) & MASK64
    o = execute(d, extract(full, d.addr, d.size), regs)
    out = dict(o.regs)
    out["rip"] = (rip + d.length) & MASK64
    entry = None if o.new is None else combine(full, d.addr, d.size, o.new)
    return Emulated(entry, out, d.addr, full)


# ---------------------------------------------------------------- the #PF hook
def _kernel_l1e(v: VCPU, va: int) -> tuple[int, int] | None:
    """(machine address, value) of the L1 entry mapping ``va`` in the guest
    kernel's page tables (Xen's guest_get_eff_kern_l1e), or None."""
    ft = v.domain.ft
    table = v.kernel_l4
    for shift in (39, 30, 21):
        if not ft.owns(table):
            return None
        e = ft.read_entry((table << 12) + ((va >> shift) & 511) * 8)
        if not e & abi._PAGE_PRESENT or e & abi._PAGE_PSE:
            return None
        table = (e & abi.PADDR_MASK) >> 12
    if not ft.owns(table):
        return None
    ma = (table << 12) + ((va >> 12) & 511) * 8
    return ma, ft.read_entry(ma)


def _fetch(v: VCPU, rip: int) -> bytes:
    try:
        return v.copy_from_guest(rip, 15)
    except XenError:
        return v.copy_from_guest(rip, 4096 - (rip & 0xFFF))


def handle_fault(v: VCPU, rip: int, cr2: int, err: int) -> bool:
    """Xen's fixup_page_fault -> pv_ro_page_fault -> ptwr_do_page_fault for a
    64-bit PV guest.  True: the write was emulated (or must be retried) and
    the guest resumes without seeing a fault.  False: not a ptwr write or
    refused; the caller delivers the original #PF."""
    d = v.domain
    if not (getattr(d, "vm_assist", 0) >> abi.VMASST_TYPE_writable_pagetables) & 1:
        return False
    if not v.kernel_mode or err & (PFEC_RSVD | PFEC_INSN) or \
            (err & (PFEC_PRESENT | PFEC_WRITE)) != (PFEC_PRESENT | PFEC_WRITE):
        return False
    ft = d.ft
    try:
        pte = _kernel_l1e(v, cr2)
        if pte is None:
            return False
        _, l1e = pte
        if (l1e & (abi._PAGE_PRESENT | abi._PAGE_RW)) != abi._PAGE_PRESENT:
            return False
        mfn = (l1e & abi.PADDR_MASK) >> 12
        if not ft.owns(mfn):
            return False
        t, count = ft.type_of(mfn)
        if t != 1 or not count:  # only validated L1s: L2-L4 writes fault to the guest
            return False
        kv = v.kvm
        r, s = kv.regs, kv.sregs
        regs = r.as_dict()
        code = _fetch(v, rip)
        table = mfn << 12
        res = emulate(code, rip, regs, cr2, lambda a: ft.read_entry(table | (a & 0xFF8)),
                      s.fs.base, s.gs.base)
        if res.entry is not None and \
                not ft.ptwr_update(table | (res.addr & 0xFF8), res.entry, res.old):
            return True  # the entry changed under us: Xen's RETRY, re-execute
    except (NotMine, XenError) as e:
        why = e.why if isinstance(e, XenError) else str(e)
        d.log(f"ptwr: write at rip {rip:#x} cr2 {cr2:#x} not emulated: {why}")
        return False
    for name, val in res.regs.items():
        setattr(r, name, val & MASK64)
    kv.mark_regs_dirty()
    if d.mmu_pending:
        v.attention = True  # the vCPU applies the entry before the guest runs
    v.stats["ptwr"] = v.stats.get("ptwr", 0) + 1
    return True
