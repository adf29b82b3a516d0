"""A host backend's grant copy (``GrantTables.host_copy``, what netback uses):
native (gnt.c ``pxg_copy``) and Python give the same statuses and bytes, and
the statuses are Xen's.  One in-process domain, built, not started; its
grant entries are written directly, granted to dom0 (the backend)."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyxen import native
from pyxen.hv import gnttab as G
from pyxen.hv import machine as M
from pyxen.hv.domain import Domain

DOM0 = 0


@pytest.fixture
def dom(guest: Path) -> Iterator[Domain]:
    from pyxen.domctl import create_domain
    from pyxen.hv.domain import DomainSpec
    d = create_domain(DomainSpec(name="hc", memory_mib=16, kernel=str(guest / "hello"), domid=31),
                      start=False)
    yield d
    d.destroy()
    d.close()


def _grant(d: Domain, ref: int, flags: int, domid: int, frame: int) -> None:
    struct.pack_into("<HHI", d.machine.ram, d.machine.xenheap_offset(M.XH_GRANT) + ref * 8,
                     flags, domid, frame)


def _world(d: Domain) -> int:
    """Grants to dom0; returns the frame of the guest's L4 (a page table)."""
    d.gnttab.setup(1)
    for i in range(4):
        pfn = 400 + i
        d.machine.ram[pfn * 4096:(pfn + 1) * 4096] = bytes([(pfn + j) & 0xFF for j in range(256)]) * 16
        _grant(d, 10 + i, G.GTF_permit_access, DOM0, M.MFN_BASE + pfn)
    _grant(d, 14, G.GTF_permit_access | G.GTF_readonly, DOM0, M.MFN_BASE + 410)
    _grant(d, 15, G.GTF_permit_access, 5, M.MFN_BASE + 411)  # for someone else
    _grant(d, 16, G.GTF_permit_access, DOM0, M.MFN_BASE + d.nr_pages + 3)  # not RAM
    l4 = d.vcpus[0].kernel_l4
    _grant(d, 17, G.GTF_permit_access, DOM0, l4)
    return l4


def _ops(bufs: ctypes.Array[ctypes.c_char]) -> list[tuple[int, int, int, int, bool]]:
    b = ctypes.addressof(bufs)
    return [
        (10, 0, 4096, b, False),           # guest -> host, a whole page
        (11, 100, 50, b + 4096, False),
        (12, 0, 64, b + 8192, True),       # host -> guest
        (14, 0, 8, b + 8192, False),       # read-only grant, read: fine
        (14, 0, 8, b + 8192, True),        # ... written: general_error
        (15, 0, 8, b, False),              # not ours: general_error
        (16, 0, 8, b, False),              # not RAM: bad_page
        (17, 0, 8, b + 8192, True),        # into a page table: general_error
        (17, 0, 8, b + 13312, False),      # reading one is fine
        (M.MAX_GRANT_REFS, 0, 8, b, False),  # beyond any table: bad_gntref
        (13, 4000, 200, b, False),         # beyond the page: bad_copy_arg
        (13, 4000, 96, b + 12288, True),   # the end of a page
    ]


WANT = [G.GNTST_okay, G.GNTST_okay, G.GNTST_okay, G.GNTST_okay, G.GNTST_general_error,
        G.GNTST_general_error, G.GNTST_bad_page, G.GNTST_general_error, G.GNTST_okay,
        G.GNTST_bad_gntref, G.GNTST_bad_copy_arg, G.GNTST_okay]


def test_host_copy_native_and_python_agree(dom: Domain, monkeypatch: pytest.MonkeyPatch) -> None:
    if native.lib() is None:
        pytest.skip(f"native library not available: {native.why_not()}")
    _world(dom)
    start = bytes(dom.machine.ram)
    results = []
    for use_native in (False, True):  # Python first: host_release follows host_grants' choice
        dom.machine.ram[:] = start
        bufs = ctypes.create_string_buffer(4 * 4096)
        bufs[8192:8192 + 64] = bytes(range(64))
        bufs[12288:12288 + 96] = b"\xAB" * 96
        with monkeypatch.context() as mp:
            if not use_native:
                mp.setattr(dom.gnttab, "host_grants", lambda: None)
            st = dom.gnttab.host_copy(_ops(bufs), DOM0)
        results.append((st, bytes(bufs), bytes(dom.machine.ram)))
    assert results[1][0] == WANT
    assert results[0][:2] == results[1][:2]
    x, y = results[0][2], results[1][2]
    if x != y:
        diff = next(i for i in range(len(x)) if x[i] != y[i])
        pytest.fail(f"guest memory differs first at {diff:#x} (page {diff >> 12}, "
                    f"xenheap from page {dom.machine.max_pages})")
    st, host, ram = results[0]
    assert host[:4096] == ram[400 * 4096:401 * 4096]
    assert host[4096:4146] == ram[401 * 4096 + 100:401 * 4096 + 150]
    assert ram[402 * 4096:402 * 4096 + 64] == bytes(range(64))
    assert ram[403 * 4096 + 4000:403 * 4096 + 4096] == b"\xAB" * 96
    # every hold given back: no status bits, no writable holds left
    for ref in range(10, 18):
        flags = struct.unpack_from("<H", ram, dom.machine.xenheap_offset(M.XH_GRANT) + ref * 8)[0]
        assert not flags & (G.GTF_reading | G.GTF_writing), ref
    if dom.gnttab._pxg is not None:
        assert all(native.fast().pxg_holds(dom.gnttab._pxg, r) == 0 for r in range(10, 18))  # type: ignore[union-attr]


def test_host_copy_marks_dirty_while_logging(dom: Domain) -> None:
    _world(dom)
    dom.set_dirty_logging(True)
    try:
        dom.read_dirty()
        buf = ctypes.create_string_buffer(64)
        assert dom.gnttab.host_copy([(12, 0, 64, ctypes.addressof(buf), True)], DOM0) == [G.GNTST_okay]
        assert 402 in dom.read_dirty()
    finally:
        dom.set_dirty_logging(False)
