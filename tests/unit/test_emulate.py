"""The instruction emulator (pyxen/hv/emulate.py) with byte strings: no KVM."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from pyxen.hv import emulate as E
from pyxen.hv.hypercalls import get_debugreg, set_debugreg

RIP = 0xFFFFFFFF80001000
M64 = (1 << 64) - 1


@dataclass
class Fx:
    """Effects of a pretend vCPU."""

    kernel_mode: bool = True
    iopl: int = 0
    cr: dict[int, int] = field(default_factory=lambda: {0: 0x80050033, 2: 0, 3: 0x12345000, 4: 0x620})
    dr: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    dr6: int = 0xFFFF0FF0
    dr7: int = 0x400
    dr7_emul: int = 0
    guest_cr4: int = 0x620
    msrs: dict[int, int] = field(default_factory=lambda: {0x277: 0x0000050100070406})
    io: E._DomainIo = field(default_factory=E._DomainIo)
    mem: dict[int, int] = field(default_factory=dict)
    bad_pages: set[int] = field(default_factory=set)
    faulting: bool = False
    fs: int = 0
    gs: int = 0

    def iopl_ok(self) -> bool:
        return (1 if self.kernel_mode else 3) <= self.iopl

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        return (leaf, subleaf, 0xC, 0xD)

    def cpuid_faulting(self) -> bool:
        return self.faulting

    def rdmsr(self, idx: int) -> int | None:
        return self.msrs.get(idx)

    def wrmsr(self, idx: int, val: int) -> bool:
        if idx not in self.msrs:
            return False
        self.msrs[idx] = val
        return True

    def read_cr(self, n: int) -> int | None:
        return self.cr.get(n)

    def write_cr(self, n: int, val: int) -> bool:
        if n == 0 and (val ^ self.cr[0]) & ~8:
            return False
        if n not in self.cr:
            return False
        self.cr[n] = val
        return True

    def read_dr(self, n: int) -> int | None:
        r = get_debugreg(self, n)  # type: ignore[arg-type]
        return None if r < 0 else r

    def write_dr(self, n: int, val: int) -> bool:
        return set_debugreg(self, n, val) == 0  # type: ignore[arg-type]

    def xsetbv(self, idx: int, val: int) -> bool:
        return idx == 0 and val & 1 == 1

    def io_read(self, port: int, size: int) -> int:
        return E.guest_io_read(self.io, port, size)

    def io_write(self, port: int, size: int, val: int) -> None:
        E.guest_io_write(self.io, port, size, val)

    def rdtsc(self) -> int:
        return 0x1122334455667788

    def tsc_aux(self) -> int:
        return 3

    def seg_base(self, seg: int) -> int:
        import iced_x86 as ix
        return self.fs if seg == ix.Register.FS else self.gs if seg == ix.Register.GS else 0

    def read_mem(self, va: int, n: int) -> bytes:
        if va >> 12 in self.bad_pages:
            raise E.MemFault(va, False)
        return bytes(self.mem.get(va + i, 0) for i in range(n))

    def write_mem(self, va: int, data: bytes) -> None:
        if va >> 12 in self.bad_pages:
            raise E.MemFault(va, True)
        for i, b in enumerate(data):
            self.mem[va + i] = b


def regs(**kw: int) -> dict[str, int]:
    r = {n: 0 for n in E.GPRS}
    r.update(rip=RIP, rflags=0x10202)
    r.update(kw)
    return r


def priv(code: str, fx: Fx | None = None, **kw: int) -> tuple[E.Result, dict[str, int], Fx]:
    fx = fx or Fx()
    r = regs(**kw)
    return E.emulate_priv_op(bytes.fromhex(code) + b"\x90" * 8, r, fx), r, fx


# ------------------------------------------------------------ registers
def test_set_reg_widths() -> None:
    import iced_x86 as ix
    r = regs(rax=0xFFFFFFFFFFFFFFFF)
    E.set_reg(r, ix.Register.EAX, 0x12)
    assert r["rax"] == 0x12  # 32-bit writes zero-extend
    r["rax"] = 0xFFFFFFFFFFFFFFFF
    E.set_reg(r, ix.Register.AX, 0x1234)
    assert r["rax"] == 0xFFFFFFFFFFFF1234
    E.set_reg(r, ix.Register.AH, 0x56)
    assert r["rax"] == 0xFFFFFFFFFFFF5634
    E.set_reg(r, ix.Register.R9L, 0x7)
    assert r["r9"] == 0x7
    assert E.get_reg(r, ix.Register.AH) == 0x56


# ------------------------------------------------------------ forced emulation (#UD)
def test_forced_cpuid() -> None:
    r = regs(rax=0x40000000, rcx=0)
    res = E.emulate_invalid_op(bytes.fromhex("0f0b78656e0fa2") + b"\x90", r, Fx())
    assert res.action == "done"
    assert (r["rax"], r["rbx"], r["rcx"], r["rdx"]) == (0x40000000, 0, 0xC, 0xD)
    assert r["rip"] == RIP + 7
    assert not r["rflags"] & E.X86_EFLAGS_RF


@pytest.mark.parametrize("code", ["0f0b9090909090", "0f0b78656e9090", "0f0b78656e0f31"])
def test_not_forced(code: str) -> None:
    r = regs()
    assert E.emulate_invalid_op(bytes.fromhex(code), r, Fx()).action == "none"
    assert r["rip"] == RIP


def test_forced_cpuid_faulting_user_mode() -> None:
    r = regs()
    res = E.emulate_invalid_op(bytes.fromhex("0f0b78656e0fa2"), r, Fx(kernel_mode=False, faulting=True))
    assert (res.action, res.vec, res.err) == ("fault", 13, 0)
    assert r["rip"] == RIP + 5  # at the cpuid
    r = regs()
    assert E.emulate_invalid_op(bytes.fromhex("0f0b78656e0fa2"), r, Fx(faulting=True)).action == "done"


# ------------------------------------------------------------ #GP: privileged ops
def test_cpuid_and_rdtsc() -> None:
    res, r, _ = priv("0fa2", rax=1, rcx=2)
    assert res.action == "done" and (r["rax"], r["rbx"], r["rip"]) == (1, 2, RIP + 2)
    res, r, _ = priv("0f31")
    assert (r["rax"], r["rdx"]) == (0x55667788, 0x11223344)
    res, r, _ = priv("0f01f9")
    assert r["rcx"] == 3 and r["rip"] == RIP + 3
    fx = Fx(kernel_mode=False)
    fx.cr[4] |= E.X86_CR4_TSD
    assert priv("0f31", fx)[0].vec == 13


def test_rdmsr_wrmsr() -> None:
    res, r, _ = priv("0f32", rcx=0x277, rax=M64, rdx=M64)
    assert res.action == "done" and (r["rax"], r["rdx"]) == (0x00070406, 0x00000501)
    res, r, fx = priv("0f30", rcx=0x277, rax=0xFFFFFFFF00000006, rdx=7)
    assert res.action == "done" and fx.msrs[0x277] == (7 << 32) | 6
    res, r, _ = priv("0f32", rcx=0x1234)
    assert (res.action, res.vec, res.err) == ("fault", 13, 0) and r["rip"] == RIP
    assert priv("0f30", rcx=0x1234)[0].vec == 13
    assert priv("0f32", Fx(kernel_mode=False), rcx=0x277)[0].vec == 13  # not ring 0


def test_mov_cr() -> None:
    res, r, _ = priv("0f20d8")  # mov %cr3,%rax
    assert res.action == "done" and r["rax"] == 0x12345000 and r["rip"] == RIP + 3
    res, r, _ = priv("410f20e1")  # mov %cr4,%r9
    assert r["r9"] == 0x620 and r["rip"] == RIP + 4
    res, r, fx = priv("0f22d0", rax=0xDEAD000)  # mov %rax,%cr2
    assert res.action == "done" and fx.cr[2] == 0xDEAD000
    res, r, fx = priv("0f22c0", rax=0x80050033 | 8)  # set TS only
    assert res.action == "done" and fx.cr[0] & 8
    res, r, fx = priv("0f22c0", rax=0x80050032)  # clear PE: refused, #GP stands
    assert res.action == "none"
    assert priv("0f20c0", rax=0)[1]["rax"] == 0x80050033
    assert priv("440f20c0")[0].action == "none"  # cr8: not emulated
    assert priv("0f20d8", Fx(kernel_mode=False))[0].vec == 13


def test_clts_wbinvd_xsetbv() -> None:
    fx = Fx()
    fx.cr[0] |= 8
    res, r, fx = priv("0f06", fx)
    assert res.action == "done" and not fx.cr[0] & 8 and r["rip"] == RIP + 2
    assert priv("0f06", Fx(kernel_mode=False))[0].vec == 13
    assert priv("0f09")[0].action == "done"
    assert priv("f30f09")[1]["rip"] == RIP + 3  # wbnoinvd
    res = priv("0f01d1")[0]  # xsetbv without CR4.OSXSAVE
    assert (res.vec, res.err) == (6, None)
    fx = Fx()
    fx.cr[4] |= E.X86_CR4_OSXSAVE
    assert priv("0f01d1", fx, rax=3)[0].action == "done"
    assert priv("0f01d1", fx, rax=2)[0].vec == 13


@pytest.mark.parametrize("code,what", [
    ("f4", "hlt"), ("0f01f8", "swapgs"), ("0f01f0", "lmsw"), ("0f01e0", "smsw"),
    ("0f0138", "invlpg"), ("0f00d8", "ltr"), ("0f0b", "ud2"), ("9090", "nop"),
])
def test_not_emulated(code: str, what: str) -> None:
    res, r, _ = priv(code)
    assert res.action == "none", what
    assert r["rip"] == RIP


def test_mov_dr() -> None:
    res, r, fx = priv("0f23c0", rax=0x400000)  # mov %rax,%dr0
    assert res.action == "done" and fx.dr[0] == 0x400000
    assert priv("0f23c0", rax=0xFFFF800000001000)[0].vec == 13  # Xen's range
    assert priv("0f23c0", rax=0x0000800000000000)[0].vec == 13  # non-canonical
    res, r, _ = priv("0f21f8")  # mov %dr7,%rax
    assert r["rax"] == 0x400
    res, r, _ = priv("0f21e0")  # mov %dr4,%rax: DR6 while CR4.DE is clear
    assert r["rax"] == 0xFFFF0FF0
    fx = Fx()
    fx.cr[4] |= E.X86_CR4_DE
    assert priv("0f21e0", fx)[0].vec == 6
    assert priv("0f23f8", rax=1 << 32)[0].vec == 13  # dr7 upper half
    assert priv("0f21c0", Fx(kernel_mode=False))[0].vec == 13


def test_port_io() -> None:
    fx = Fx(iopl=1)
    res, r, _ = priv("e461", fx, rax=0x1234)  # in $0x61,%al
    assert res.action == "done" and r["rax"] == 0x12FF and r["rip"] == RIP + 2
    res, r, _ = priv("66ed", fx, rdx=0x71, rax=M64)  # in %dx,%ax
    assert r["rax"] == 0xFFFFFFFFFFFFFFFF and r["rip"] == RIP + 2
    res, r, _ = priv("ef", fx, rdx=0xCF8, rax=0x80000008)  # out %eax,%dx
    assert fx.io.pci_cf8 == 0x80000008
    res, r, _ = priv("ed", fx, rdx=0xCF8, rax=M64)
    assert r["rax"] == 0x80000008  # 32-bit in zero-extends
    res, r, _ = priv("ed", fx, rdx=0xCFC)
    assert r["rax"] == 0xFFFFFFFF
    priv("e670", fx, rax=0x8F)  # CMOS index
    assert priv("e470", fx)[1]["rax"] == 0x0F
    assert priv("e471", fx)[1]["rax"] == 0xFF
    # without IOPL: #GP(0); user mode needs IOPL 3
    assert priv("e461", Fx(iopl=0))[0].vec == 13
    assert priv("e661", Fx(iopl=0))[0].vec == 13
    assert priv("e461", Fx(iopl=1, kernel_mode=False))[0].vec == 13
    assert priv("e461", Fx(iopl=3, kernel_mode=False))[0].action == "done"


def test_cli_sti() -> None:
    assert priv("fa", Fx(iopl=0))[0].action == "none"  # the #GP stands
    assert priv("fb", Fx(iopl=0))[0].action == "none"
    res, r, _ = priv("fa", Fx(iopl=1))
    assert res.action == "done" and r["rip"] == RIP + 1


def test_rep_ins_outs() -> None:
    fx = Fx(iopl=1)
    res, r, _ = priv("f36c", fx, rdi=0x5000, rcx=3, rdx=0x61)  # rep insb
    assert res.action == "done" and r["rcx"] == 0 and r["rdi"] == 0x5003 and r["rip"] == RIP + 2
    assert [fx.mem[0x5000 + i] for i in range(3)] == [0xFF] * 3
    res, r, _ = priv("f36f", fx, rsi=0x5000, rcx=2, rdx=0x70)  # rep outsd
    assert res.action == "done" and r["rsi"] == 0x5008 and fx.io.cmos_idx == 0
    res, r, _ = priv("6d", fx, rdi=0x5010, rdx=0x80, rflags=0x10602)  # insd, DF=1
    assert r["rdi"] == 0x500C
    fx.bad_pages.add(0x9)
    res, r, _ = priv("f36c", fx, rdi=0x8FFE, rcx=4, rdx=0x61)
    assert (res.action, res.vec, res.err, res.cr2) == ("fault", 14, E.PFEC_WRITE, 0x9000)
    assert r["rcx"] == 2 and r["rdi"] == 0x9000 and r["rip"] == RIP


# ------------------------------------------------------------ the fixed-address M2P
def m2p_table(start_mfn: int, pfns: list[int]) -> object:
    table = bytearray(0x2000 * 8)
    for i, p in enumerate(pfns):
        struct.pack_into("<Q", table, (start_mfn + i) * 8, p)

    def read(off: int, n: int) -> bytes | None:
        if off + n > len(table):
            return None
        return bytes(table[off:off + n])
    return read


def test_m2p_load() -> None:
    rd = m2p_table(0x100, [0x11, 0x22, 0xFFFFFFFFFFFFFFFF])
    base = E.M2P_START
    # mov (%rdx,%rax,8),%rax
    r = regs(rdx=base, rax=0x101)
    res = E.emulate_m2p_read(bytes.fromhex("488b04c2"), r, Fx(), base + 0x808, rd)
    assert res.action == "done" and r["rax"] == 0x22 and r["rip"] == RIP + 4
    # movl 8(%rdx),%ecx
    r = regs(rdx=base + 0x800, rcx=M64)
    res = E.emulate_m2p_read(bytes.fromhex("8b4a08"), r, Fx(), base + 0x808, rd)
    assert r["rcx"] == 0x22
    # movsxd: the INVALID entry stays all ones
    r = regs(rdx=base + 0x810)
    E.emulate_m2p_read(bytes.fromhex("486302"), r, Fx(), base + 0x810, rd)
    assert r["rax"] == M64
    # movzbl
    r = regs(rdx=base + 0x808, rax=M64)
    E.emulate_m2p_read(bytes.fromhex("0fb602"), r, Fx(), base + 0x808, rd)
    assert r["rax"] == 0x22


@pytest.mark.parametrize("code,cr2,kw", [
    ("488b04c2", E.M2P_END + 8, {"rdx": E.M2P_END, "rax": 1}),  # outside the range
    ("488b04c2", E.M2P_START + 0x800, {"rdx": E.M2P_START, "rax": 0x102}),  # CR2 elsewhere
    ("488902", E.M2P_START + 0x800, {"rdx": E.M2P_START + 0x800}),  # a store
    ("48ff02", E.M2P_START + 0x800, {"rdx": E.M2P_START + 0x800}),  # inc mem
    ("488b02", E.M2P_START + 0x100000, {"rdx": E.M2P_START + 0x100000}),  # no M2P page there
])
def test_m2p_not_served(code: str, cr2: int, kw: dict[str, int]) -> None:
    rd = m2p_table(0x100, [1, 2, 3])
    r = regs(**kw)
    assert E.emulate_m2p_read(bytes.fromhex(code), r, Fx(), cr2, rd).action == "none"
    assert r["rip"] == RIP


def test_debugreg_and_cr4_rules() -> None:
    fx = Fx()
    assert fx.write_dr(6, 0xF) and fx.read_dr(6) == 0xFFFF0FFF
    assert fx.write_dr(7, 0x1) and fx.read_dr(7) == 0x401
    assert fx.write_dr(5, 0x1)  # DR5 aliases DR7 while CR4.DE is clear (Xen)
    fx.guest_cr4 |= 0x8
    assert not fx.write_dr(5, 0) and fx.read_dr(4) is None  # with CR4.DE: -ENODEV
    from tests.unit.test_cpuid import EVERYTHING, policy
    p = policy(EVERYTHING)
    # DE and TSD are the guest's; FSGSBASE and OSXSAVE are not offered; PAE etc. are Xen's
    assert E.fixup_guest_cr4(p, 0x8 | 0x4 | 0x10000 | 0x40000 | 0x80) == 0x620 | 0x8 | 0x4
