"""The PV MMU validator against Xen's rules, on plain memory (no KVM)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.abi import EINVAL, EPERM, XenError
from pyxen.hv.mm import PGT_L1, PGT_L2, PGT_L3, PGT_L4, PGT_NONE, PGT_WRITABLE, FrameTable

BASE = 0x100000
N = 64
P, RW, US = 1, 2, 4


class Mem:
    def __init__(self) -> None:
        self.buf = bytearray(N * 4096)
        self.writes: list[tuple[int, int]] = []
        self.ft = FrameTable(self.buf, BASE, N, self.write, xen_l4_slots={260: 0xABC001})

    def write(self, maddr: int, val: int, old: int | None = None) -> None:
        self.writes.append((maddr, val))
        struct.pack_into("<Q", self.buf, maddr - BASE * 4096, val)

    def put(self, mfn: int, idx: int, val: int) -> None:
        struct.pack_into("<Q", self.buf, (mfn - BASE) * 4096 + idx * 8, val)

    def get(self, mfn: int, idx: int) -> int:
        return int(struct.unpack_from("<Q", self.buf, (mfn - BASE) * 4096 + idx * 8)[0])


def e(mfn: int, flags: int = P | RW | US) -> int:
    return (mfn << 12) | flags


def tree(m: Mem) -> tuple[int, int, int, int]:
    """L4 (BASE) -> L3 (BASE+1) -> L2 (+2) -> L1 (+3) mapping data frame +10 RW."""
    l4, l3, l2, l1 = BASE, BASE + 1, BASE + 2, BASE + 3
    m.put(l4, 0, e(l3))
    m.put(l3, 0, e(l2))
    m.put(l2, 0, e(l1))
    m.put(l1, 0, e(BASE + 10))
    m.put(l1, 1, e(l1, P | US))  # the L1 maps itself read-only: allowed
    return l4, l3, l2, l1


def test_pin_validates_whole_tree_and_unpin_releases() -> None:
    m = Mem()
    l4, l3, l2, l1 = tree(m)
    m.ft.pin(l4, PGT_L4)
    assert m.ft.type_of(l4) == (PGT_L4, 1)
    assert m.ft.type_of(l3) == (PGT_L3, 1)
    assert m.ft.type_of(l2) == (PGT_L2, 1)
    assert m.ft.type_of(l1) == (PGT_L1, 1)
    assert m.ft.type_of(BASE + 10) == (PGT_WRITABLE, 1)
    assert m.get(l4, 260) == 0xABC001  # hypervisor slot installed
    assert m.ft.audit([]) == []
    m.ft.unpin(l4)
    for f in (l4, l3, l2, l1, BASE + 10):
        assert m.ft.type_of(f) == (PGT_NONE, 0)


def test_foreign_frame_cannot_be_mapped() -> None:
    m = Mem()
    l4, l3, l2, l1 = tree(m)
    m.ft.pin(l4, PGT_L4)
    with pytest.raises(XenError) as ei:
        m.ft.mod_entry(l1 * 4096 + 8 * 5, e(BASE + N + 7))
    assert ei.value.errno == EPERM
    with pytest.raises(XenError) as ei:
        m.ft.mod_entry(l1 * 4096 + 8 * 5, e(3))
    assert ei.value.errno == EPERM
    assert m.ft.audit([]) == []


def test_page_table_cannot_be_mapped_writable() -> None:
    m = Mem()
    l4, l3, l2, l1 = tree(m)
    m.ft.pin(l4, PGT_L4)
    with pytest.raises(XenError) as ei:
        m.ft.mod_entry(l1 * 4096 + 8 * 6, e(l2, P | RW | US))
    assert ei.value.errno == EINVAL
    # read-only is fine
    m.ft.mod_entry(l1 * 4096 + 8 * 6, e(l2, P | US))
    assert m.ft.audit([]) == []


def test_writable_frame_cannot_become_page_table() -> None:
    m = Mem()
    l4, l3, l2, l1 = tree(m)
    m.ft.pin(l4, PGT_L4)
    with pytest.raises(XenError) as ei:
        m.ft.pin(BASE + 10, PGT_L1)  # mapped RW by l1[0]
    assert ei.value.errno == EINVAL
    m.ft.mod_entry(l1 * 4096, 0)  # unmap it
    m.ft.pin(BASE + 10, PGT_L1)
    assert m.ft.audit([]) == []


def test_failed_validation_rolls_back() -> None:
    m = Mem()
    l4, l3, l2, l1 = tree(m)
    m.put(l1, 2, e(BASE + N + 1))  # foreign: the whole pin must fail
    with pytest.raises(XenError):
        m.ft.pin(l4, PGT_L4)
    for f in range(BASE, BASE + N):
        assert m.ft.type_of(f) == (PGT_NONE, 0)


def test_reserved_l4_slot_and_superpages_refused() -> None:
    m = Mem()
    l4, l3, l2, l1 = tree(m)
    m.ft.pin(l4, PGT_L4)
    with pytest.raises(XenError) as ei:
        m.ft.mod_entry(l4 * 4096 + 8 * 260, e(l3))
    assert ei.value.errno == EINVAL
    with pytest.raises(XenError) as ei:
        m.ft.mod_entry(l2 * 4096 + 8 * 1, e(BASE + 20, P | RW | US | 0x80))
    assert ei.value.errno == EINVAL


def test_linear_page_table_refused() -> None:
    m = Mem()
    l4, *_ = tree(m)
    m.put(l4, 1, e(l4))  # L4 pointing at itself
    with pytest.raises(XenError):
        m.ft.pin(l4, PGT_L4)


def test_user_bit_forced() -> None:
    m = Mem()
    l4, l3, l2, l1 = tree(m)
    m.ft.pin(l4, PGT_L4)
    m.ft.mod_entry(l1 * 4096 + 8 * 7, e(BASE + 11, P | RW))
    assert m.get(l1, 7) & US


def test_update_va_mapping_lookup() -> None:
    m = Mem()
    l4, l3, l2, l1 = tree(m)
    m.ft.pin(l4, PGT_L4)
    assert m.ft.l1_entry_for(l4, 0x5000) == l1 * 4096 + 5 * 8
    with pytest.raises(XenError):
        m.ft.l1_entry_for(l4, 0x40000000)  # no L2 there
    with pytest.raises(XenError):
        m.ft.l1_entry_for(l4, 0xFFFF820000000000)


def test_translate() -> None:
    m = Mem()
    l4, l3, l2, l1 = tree(m)
    m.ft.pin(l4, PGT_L4)
    assert m.ft.translate(l4, 0x123, True) == (BASE + 10) * 4096 + 0x123
    assert m.ft.translate(l4, 0x1000, True) is None  # read-only
    assert m.ft.translate(l4, 0x1000, False) == l1 * 4096
    assert m.ft.translate(l4, 0x2000, False) is None  # not present


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7), st.integers(0, N + 2),
                          st.sampled_from([0, P, P | US, P | RW | US, P | RW | US | 0x80])),
                max_size=40))
def test_random_updates_keep_counts_consistent(ops: list[tuple[int, int, int, int]]) -> None:
    """Whatever sequence of updates a guest sends, accepted or refused, the
    type counts always equal what the tables actually reference."""
    m = Mem()
    l4, l3, l2, l1 = tree(m)
    m.ft.pin(l4, PGT_L4)
    tables = [l4, l3, l2, l1, BASE + 4, BASE + 5]
    for t, idx, target, flags in ops:
        try:
            if t == 5:
                m.ft.pin(BASE + 4 + idx % 2, 1 + idx % 4)
            else:
                m.ft.mod_entry(tables[t] * 4096 + idx * 8, e(BASE + target, flags) if flags else 0)
        except XenError:
            pass
    assert m.ft.audit([]) == []
