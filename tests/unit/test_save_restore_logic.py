"""Save/restore's pure parts (no KVM): the frame table's page types for
PAGE_DATA and the restore's pins, normalise/localise round trips over a
frame table's tables, the clock that continues, the config in the xl header
and the CLI's progress line."""

from __future__ import annotations

import struct
import time

import pytest

from pyxen.abi import XenError
from pyxen.hv.mm import PGT_L1, PGT_L4, PGT_SEG, FrameTable
from pyxen.hv.time import DomainClock
from pyxen.migration import stream as S
from pyxen.migration.restore import RestoreError, spec_from_config
from pyxen.toolstack.cli import _ProgressLine

BASE = 0x100000
N = 32
P, RW, US = 1, 2, 4


class Mem:
    def __init__(self) -> None:
        self.buf = bytearray(N * 4096)
        self.ft = FrameTable(self.buf, BASE, N, self.write, xen_l4_slots={260: 0xABC001})

    def write(self, maddr: int, val: int, old: int | None = None) -> None:
        struct.pack_into("<Q", self.buf, maddr - BASE * 4096, val)

    def put(self, mfn: int, idx: int, val: int) -> None:
        struct.pack_into("<Q", self.buf, (mfn - BASE) * 4096 + idx * 8, val)

    def page(self, mfn: int) -> bytes:
        return bytes(self.buf[(mfn - BASE) * 4096:(mfn - BASE + 1) * 4096])


def tree(m: Mem) -> tuple[int, int, int, int]:
    l4, l3, l2, l1 = BASE, BASE + 1, BASE + 2, BASE + 3
    m.put(l4, 0, (l3 << 12) | P | RW | US)
    m.put(l3, 0, (l2 << 12) | P | RW | US)
    m.put(l2, 0, (l1 << 12) | P | RW | US)
    m.put(l1, 0, ((BASE + 10) << 12) | P | RW | US)
    return l4, l3, l2, l1


def test_pfinfo_reports_xen_page_types() -> None:
    m = Mem()
    l4, l3, l2, l1 = tree(m)
    assert m.ft.pfinfo(l4) == S.PageType.NOTAB  # not validated yet: an ordinary page
    m.ft.pin(l4, PGT_L4)
    assert S.PageType(m.ft.pfinfo(l4)) == S.PageType.L4TAB_PIN
    assert S.PageType(m.ft.pfinfo(l3)) == S.PageType.L3TAB
    assert S.PageType(m.ft.pfinfo(l1)) == S.PageType.L1TAB
    assert m.ft.pfinfo(BASE + 10) == S.PageType.NOTAB  # writable: data
    m.ft.get_type(BASE + 11, PGT_SEG)
    assert m.ft.pfinfo(BASE + 11) == S.PageType.NOTAB  # descriptor pages travel as data


def test_save_then_restore_pins_rebuilds_the_same_types() -> None:
    """Normalise each table as the save does, localise it into a fresh frame
    table as the restore does, pin what was pinned: the same types, counts
    and audit as the original."""
    src = Mem()
    tree(src)
    src.ft.pin(BASE, PGT_L4)
    src.ft.pin(BASE + 3, PGT_L1)  # pinned twice over: by the tree and by itself
    pages = {}
    for i in range(N):
        mfn = BASE + i
        t = S.PageType(src.ft.pfinfo(mfn))
        page = src.page(mfn)
        if t.level:
            page = S.normalise_pagetable(page, t.level, lambda f: f - BASE if 0 <= f - BASE < N else None)
        pages[i] = (t, page)
    dst = Mem()
    pins = []
    for pfn, (t, page) in pages.items():
        if t.level:
            page = S.localise_pagetable(page, t.level, lambda p: p + BASE if p < N else None)
            if t.pinned:
                pins.append((pfn + BASE, t.level))
        dst.buf[pfn * 4096:(pfn + 1) * 4096] = page
    dst.ft.restore_pins(pins)
    for i in range(N):
        assert dst.ft.type_of(BASE + i) == src.ft.type_of(BASE + i), i
        assert dst.ft.pfinfo(BASE + i) == src.ft.pfinfo(BASE + i), i
    assert dst.ft.audit([]) == []


def test_restore_pins_refuses_a_table_mapping_a_foreign_frame() -> None:
    """A pinned L1 whose entry maps a frame outside the domain fails its pin
    with the MMU's EPERM, exactly as a guest's own pin would."""
    m = Mem()
    m.put(BASE + 3, 0, ((BASE + N + 5) << 12) | P | RW | US)
    with pytest.raises(XenError):
        m.ft.restore_pins([(BASE + 3, PGT_L1)])
    assert m.ft.type_of(BASE + 3) == (0, 0)


def test_clock_continues_and_wallclock_is_now() -> None:
    c = DomainClock()
    saved = c.save_state()
    assert saved["system_time_ns"] >= 0
    later = DomainClock()
    time.sleep(0.01)
    later.restore_state(saved["system_time_ns"] + 5_000_000_000)
    st = later.system_time()
    assert st >= saved["system_time_ns"] + 5_000_000_000  # never back, no jump by the downtime
    assert abs((later.boot_wall_ns + st) - time.time_ns()) < 1_000_000_000  # wallclock is real time


def test_spec_from_config_pyxen_and_xl() -> None:
    spec = {"name": "t", "memory_mib": 16, "kernel": "/k", "domid": 3, "bogus": 1}
    s = spec_from_config({"pyxen_spec": spec}, 7)
    assert (s.name, s.memory_mib, s.domid) == ("t", 16, 7)
    s = spec_from_config({"c_info": {"name": "x"}, "b_info": {"max_memkb": 32768, "max_vcpus": 1}}, 2)
    assert (s.name, s.memory_mib, s.maxmem_mib) == ("x", 32, 32)
    with pytest.raises(RestoreError, match="name or size"):
        spec_from_config({"c_info": {}}, 2)


def test_progress_line() -> None:
    line = _ProgressLine.line("saving", {"pages": 1024, "total": 4096, "bytes": 4 << 20,
                                         "ns": 1_000_000_000})
    assert line == "saving: 1024/4096 pages (25%), 4.0 MiB, 4.2 MB/s, ETA 3.0 s"
    assert "0/0 pages" in _ProgressLine.line("restoring", {})
