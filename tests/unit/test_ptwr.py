"""Writable page tables: the pure decoding, arithmetic and sub-word rules
(pyxen/hv/ptwr.py), checked against byte strings assembled with GNU as, and
the single-entry FrameTable update they feed (``FrameTable.ptwr_update``)."""

from __future__ import annotations

import pytest

pytest.importorskip("iced_x86", reason="iced-x86 (the project's x86 decoder) is not installed")

from pyxen.abi import XenError  # noqa: E402
from pyxen.hv import ptwr  # noqa: E402
from pyxen.hv.ptwr import CF, ZF, NotMine, combine, emulate  # noqa: E402

RIP = 0xFFFFFFFF80001000
TABLE_VA = 0xFFFFFFFF80200000  # a read-only mapping of an L1
PTE_A = 0x0000000123456067      # frame 0x123456, P|RW|U|A|D
PTE_B = 0x8000000000ABC025      # NX, frame 0xabc, P|U|A


def regs(**kw: int) -> dict[str, int]:
    r = {n: 0 for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9",
                        "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")}
    r["rip"] = RIP
    r["rflags"] = 0x202
    r["rdi"] = TABLE_VA + 8 * 5
    r.update(kw)
    return r


def run(code: str, r: dict[str, int], old: int, cr2: int | None = None) -> ptwr.Emulated:
    seen: list[int] = []

    def entry_at(a: int) -> int:
        seen.append(a)
        return old
    res = emulate(bytes.fromhex(code), r["rip"], r, r["rdi"] if cr2 is None else cr2, entry_at)
    assert len(seen) <= 1
    return res


def test_mov_qword_register() -> None:
    res = run("488907", regs(rax=PTE_B), PTE_A)        # mov %rax,(%rdi)
    assert res.entry == PTE_B and res.old == PTE_A
    assert res.regs == {"rip": RIP + 3}
    assert res.addr == TABLE_VA + 40


def test_mov_immediate_zero_clears() -> None:
    res = run("48c70700000000", regs(), PTE_A)         # movq $0,(%rdi)
    assert res.entry == 0 and res.regs["rip"] == RIP + 7


def test_low_half_write_keeps_high_half() -> None:
    # movl %eax,(%rdi): the low 4 bytes change, Xen combines with the rest
    res = run("8907", regs(rax=0xFFFFFFFF00ABC025), PTE_B)
    assert res.entry == (PTE_B & ~0xFFFFFFFF) | 0x00ABC025


def test_high_half_write_keeps_low_half() -> None:
    # movl %edx,4(%rdi), rdi 8-aligned: the high half
    r = regs(rdx=0x80000000)
    res = run("895704", r, PTE_A, cr2=r["rdi"] + 4)
    assert res.addr == r["rdi"] + 4
    assert res.entry == (0x80000000 << 32) | (PTE_A & 0xFFFFFFFF)


def test_combine_and_extract() -> None:
    assert combine(0x1122334455667788, 4, 4, 0xAABBCCDD) == 0xAABBCCDD55667788
    assert combine(0x1122334455667788, 1, 1, 0xFF) == 0x112233445566FF88
    assert combine(0x1122334455667788, 0, 8, 0) == 0
    assert ptwr.extract(0x1122334455667788, 6, 2) == 0x1122


def test_xchg_returns_old_entry() -> None:
    res = run("488707", regs(rax=0), PTE_A)             # xchg %rax,(%rdi)
    assert res.entry == 0 and res.regs["rax"] == PTE_A


def test_lock_andb_clears_rw() -> None:
    res = run("f08027fd", regs(), PTE_A)                # lock andb $0xfd,(%rdi)
    assert res.entry == PTE_A & ~2
    assert res.regs["rip"] == RIP + 4
    assert not res.regs["rflags"] & (CF | ZF)


def test_lock_andq_sign_extended_imm() -> None:
    res = run("f0488327fd", regs(), PTE_B)              # lock andq $-3,(%rdi)
    assert res.entry == PTE_B & ~2


def test_lock_btr_immediate_sets_cf_from_old_bit() -> None:
    res = run("f0480fba3705", regs(), PTE_A)            # lock btrq $5,(%rdi)  (accessed)
    assert res.entry == PTE_A & ~0x20
    assert res.regs["rflags"] & CF
    res = run("f0480fba3705", regs(), PTE_A & ~0x20)
    assert res.entry == PTE_A & ~0x20 and not res.regs["rflags"] & CF


def test_btr_register_offset_addresses_other_qword() -> None:
    # lock btr %rcx,(%rdi) with rcx = 64 + 5: bit 5 of the next qword
    r = regs(rcx=69)
    res = run("f0480fb30f", r, PTE_A, cr2=r["rdi"] + 8)
    assert res.addr == r["rdi"] + 8
    assert res.entry == PTE_A & ~0x20


def test_cmpxchg_success_and_failure() -> None:
    ok = run("f0480fb137", regs(rax=PTE_A, rsi=PTE_B), PTE_A)   # lock cmpxchg %rsi,(%rdi)
    assert ok.entry == PTE_B and ok.regs["rflags"] & ZF and "rax" not in ok.regs
    bad = run("f0480fb137", regs(rax=PTE_B, rsi=0), PTE_A)
    assert bad.entry is None and bad.regs["rax"] == PTE_A
    assert not bad.regs["rflags"] & ZF and bad.regs["rip"] == RIP + 5


def test_or_bts_xor_add_sub() -> None:
    assert run("f048830f02", regs(), PTE_B).entry == PTE_B | 2          # lock orq $2
    assert run("f0480fab0f", regs(rcx=1), PTE_B).entry == PTE_B | 2      # lock bts %rcx
    assert run("f0483107", regs(rax=1), PTE_B).entry == PTE_B ^ 1        # lock xor %rax
    assert run("48010f", regs(rcx=0x1000), PTE_B).entry == PTE_B + 0x1000  # add %rcx
    assert run("48290f", regs(rcx=0x1000), PTE_B).entry == PTE_B - 0x1000  # sub %rcx


def test_fs_segment_and_sib() -> None:
    r = regs(rax=PTE_B, rdi=0x200)
    res = emulate(bytes.fromhex("64488907"), RIP, r, TABLE_VA + 0x200,
                  lambda a: PTE_A, fs_base=TABLE_VA)       # mov %rax,%fs:(%rdi)
    assert res.addr == TABLE_VA + 0x200 and res.entry == PTE_B
    r = regs(rax=PTE_B, rdi=TABLE_VA, rcx=3)
    res = emulate(bytes.fromhex("488944cf08"), RIP, r, TABLE_VA + 32,
                  lambda a: PTE_A)                         # mov %rax,8(%rdi,%rcx,8)
    assert res.addr == TABLE_VA + 32


def test_high_byte_register_store() -> None:
    r = regs(rax=0x0F00)
    res = run("886701", r, PTE_A, cr2=r["rdi"] + 1)     # mov %ah,1(%rdi)
    assert res.entry == (PTE_A & ~0xFF00) | 0x0F00


@pytest.mark.parametrize("code,why", [
    ("488b07", "a load"),                 # mov (%rdi),%rax
    ("f00fc70f", "cmpxchg8b"),
    ("f348ab", "rep stos"),
    ("0f0b", "ud2"),
    ("48", "truncated"),
])
def test_not_mine(code: str, why: str) -> None:
    with pytest.raises(NotMine):
        run(code, regs(), PTE_A)


def test_store_outside_faulting_page_or_misaligned() -> None:
    with pytest.raises(NotMine):
        run("488907", regs(rdi=TABLE_VA + 0x1000), PTE_A, cr2=TABLE_VA)   # other page
    with pytest.raises(NotMine):
        run("488907", regs(rdi=TABLE_VA + 4), PTE_A)                     # misaligned qword


def test_flags() -> None:
    assert ptwr.flags_sub(1, 2, 8) & CF
    assert ptwr.flags_sub(5, 5, 4) & ZF
    assert ptwr.flags_add(0xFF, 1, 1) & (CF | ZF) == CF | ZF
    assert ptwr.flags_logic(0, 8) & ZF


# ---------------------------------------------------------------- FrameTable
def test_ptwr_update_validates_like_mmu_update() -> None:
    from pyxen.hv.mm import PGT_L1, FrameTable

    base, n = 0x100, 16
    mem = bytearray(n * 4096)
    writes: list[tuple[int, int, int | None]] = []

    def write_entry(maddr: int, val: int, old: int | None) -> None:
        off = maddr - (base << 12)
        mem[off:off + 8] = val.to_bytes(8, "little")
        writes.append((maddr, val, old))

    ft = FrameTable(mem, base, n, write_entry)
    l1 = base + 1
    ft.pin(l1, PGT_L1)
    ma = (l1 << 12) + 8 * 3
    data = base + 5
    # map a frame we own read/write: a writable reference is taken
    assert ft.ptwr_update(ma, (data << 12) | 0x3, 0)
    assert ft.read_entry(ma) == (data << 12) | 0x7   # user bit forced
    assert ft.type_of(data) == (6, 1)
    # a stale expectation writes nothing
    assert not ft.ptwr_update(ma, 0, 0)
    assert ft.read_entry(ma) == (data << 12) | 0x7
    # a frame we do not own: EPERM, nothing changes
    with pytest.raises(XenError):
        ft.ptwr_update(ma, ((base + n + 7) << 12) | 0x1, (data << 12) | 0x7)
    # a writable mapping of the page table itself: refused
    with pytest.raises(XenError):
        ft.ptwr_update(ma, (l1 << 12) | 0x3, (data << 12) | 0x7)
    assert ft.read_entry(ma) == (data << 12) | 0x7
    # clearing drops the writable reference
    assert ft.ptwr_update(ma, 0, (data << 12) | 0x7)
    assert ft.type_of(data) == (0, 0)
    assert ft.audit([]) == []
    # only validated L1s
    with pytest.raises(XenError):
        ft.ptwr_update(((base + 9) << 12), 0, 0)


def test_random_bytes_never_raise_anything_but_not_mine() -> None:
    """A guest controls the instruction bytes and registers: the emulation
    either succeeds or says NotMine, never another Python exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    names = list(regs())

    @settings(max_examples=3000, deadline=None)
    @given(st.binary(min_size=0, max_size=15),
           st.lists(st.integers(0, (1 << 64) - 1), min_size=len(names), max_size=len(names)),
           st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
    def fuzz(code: bytes, vals: list[int], cr2: int, old: int) -> None:
        r = dict(zip(names, vals, strict=True))
        try:
            res = emulate(code, r["rip"], r, cr2, lambda a: old, r["r8"], r["r9"])
        except NotMine:
            return
        assert res.entry is None or 0 <= res.entry < 1 << 64
        assert all(0 <= v < 1 << 64 for v in res.regs.values())

    fuzz()
    # and prefixed forms of the instructions it does emulate
    for prefix in ("", "66", "67", "f0", "64", "65", "2e", "f2", "f3", "4c", "41"):
        for body in ("488907", "8907", "f0480fb137", "480fb30f", "f0480fba3705", "887f01",
                     "48a3" + "00" * 8, "c60700", "66c7070000"):
            r = regs()
            try:
                emulate(bytes.fromhex(prefix + body), RIP, r, r["rdi"], lambda a: PTE_A)
            except NotMine:
                pass
