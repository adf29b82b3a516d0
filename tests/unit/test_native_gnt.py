"""Backend grant holds in the native library (pyxen/native/gnt.c), on a grant
table and "RAM" made here: the checks a grant map makes (granted to us,
permit_access, not read-only for writes, a frame of the guest), the status
bits set while held and dropped with the last hold, all-or-nothing batches."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator

import pytest

from pyxen import native
from pyxen.hv import gnttab as G

MFN_BASE, PAGES, REFS = 0x100000, 64, 256


class Table:
    def __init__(self) -> None:
        lib = native.fast()
        if lib is None:
            pytest.skip(f"native library unavailable: {native.why_not()}")
        self.lib = lib
        self.gt = (ctypes.c_uint8 * (REFS * 8))()
        self.ram = (ctypes.c_uint8 * (PAGES * 4096))()
        self.dirty = (ctypes.c_uint64 * 1)()
        self.types = (ctypes.c_uint32 * PAGES)()
        self.active = (ctypes.c_uint64 * REFS)()
        self.g = lib.pxg_new(ctypes.addressof(self.gt), REFS, ctypes.addressof(self.ram), PAGES,
                             MFN_BASE, ctypes.addressof(self.dirty), ctypes.addressof(self.types),
                             PAGES, ctypes.addressof(self.active))

    def grant(self, ref: int, pfn: int, domid: int = 0, readonly: bool = False) -> None:
        flags = G.GTF_permit_access | (G.GTF_readonly if readonly else 0)
        struct.pack_into("<HHI", self.gt, ref * 8, flags, domid, MFN_BASE + pfn)

    def flags(self, ref: int) -> int:
        return int(struct.unpack_from("<H", self.gt, ref * 8)[0])

    def acquire(self, ref: int, write: bool) -> int:
        return int(self.lib.pxg_acquire(self.g, ref, 0, int(write)))


@pytest.fixture
def t() -> Iterator[Table]:
    tab = Table()
    yield tab
    tab.lib.pxg_free(tab.g)


def test_hold_sets_and_last_release_clears_status_bits(t: Table) -> None:
    t.grant(5, 3)
    assert t.acquire(5, write=False) == 3 * 4096
    assert t.flags(5) == G.GTF_permit_access | G.GTF_reading
    assert t.acquire(5, write=True) == 3 * 4096
    assert t.flags(5) & G.GTF_writing
    assert t.lib.pxg_holds(t.g, 5) == 2
    t.lib.pxg_release(t.g, 5)
    assert t.flags(5) & (G.GTF_reading | G.GTF_writing)  # still held once
    t.lib.pxg_release(t.g, 5)
    assert t.flags(5) == G.GTF_permit_access
    t.lib.pxg_release(t.g, 5)  # an extra release changes nothing
    assert t.lib.pxg_holds(t.g, 5) == 0


def test_refusals(t: Table) -> None:
    t.grant(1, 1, domid=7)
    t.grant(2, 2, readonly=True)
    t.grant(3, PAGES + 5)  # not a page of the guest
    assert t.acquire(1, False) == G._PXG_E_PERM
    assert t.acquire(2, True) == G._PXG_E_RDONLY
    assert t.acquire(2, False) == 2 * 4096
    assert t.acquire(3, False) == G._PXG_E_FRAME
    assert t.flags(3) == G.GTF_permit_access  # refused: no bits left behind
    assert t.acquire(REFS, False) == G._PXG_E_RANGE
    assert t.acquire(9, False) == G._PXG_E_PERM  # never granted
    struct.pack_into("<HHI", t.gt, 10 * 8, 2, 0, MFN_BASE)  # GTF_accept_transfer, not access
    assert t.acquire(10, False) == G._PXG_E_PERM


def test_batches_are_all_or_nothing(t: Table) -> None:
    for r in range(4):
        t.grant(r + 20, r)
    refs = (ctypes.c_uint32 * 5)(20, 21, 22, 99, 23)
    offs = (ctypes.c_uint64 * 5)()
    got = t.lib.pxg_acquire_many(t.g, refs, 5, 0, 0, offs)
    assert got == 3  # 99 was never granted
    assert all(t.flags(r) == G.GTF_permit_access for r in (20, 21, 22, 23))
    refs[3] = 23
    assert t.lib.pxg_acquire_many(t.g, refs, 4, 0, 1, offs) == 4
    assert list(offs[:4]) == [0, 4096, 8192, 3 * 4096]
    assert all(t.flags(r) & G.GTF_writing for r in (20, 21, 22, 23))


def test_dirty_marks(t: Table) -> None:
    t.lib.pxg_mark_dirty(t.g, 3)
    t.lib.pxg_mark_dirty(t.g, 63)
    t.lib.pxg_mark_dirty(t.g, PAGES + 1)  # beyond the guest: ignored
    assert t.dirty[0] == (1 << 3) | (1 << 63)
