"""The PV builder's memory layout and initial page tables (pure)."""

from __future__ import annotations

import pytest

from pyxen.builder.pv import PTE_RO, BuildError, build_page_tables, plan_layout

VB = 0xFFFFFFFF80000000


def test_layout_order_and_mapping() -> None:
    lay = plan_layout(VB, VB, VB + 0x35000, 4096)
    assert lay.kernel_pfn == 0 and lay.kernel_pages == 0x35
    assert lay.p2m_pfn == 0x35 and lay.p2m_pages == 8  # 4096 entries * 8 bytes
    assert lay.start_info_pfn == lay.p2m_pfn + lay.p2m_pages
    assert (lay.xenstore_pfn, lay.console_pfn) == (lay.start_info_pfn + 1, lay.start_info_pfn + 2)
    assert lay.pt_pfn == lay.console_pfn + 1
    assert lay.bootstack_pfn == lay.pt_pfn + lay.nr_pt_frames
    # mapped: boot stack + 512 KiB, rounded up to 4 MiB
    assert lay.mapped_pages == 1024
    assert (lay.n_l3, lay.n_l2, lay.n_l1) == (1, 1, 2)
    assert lay.nr_pt_frames == 5


def test_page_tables_map_everything_and_tables_read_only() -> None:
    lay = plan_layout(VB, VB, VB + 0x35000, 4096)
    off = 0x100000
    tables = build_page_tables(lay, off)
    assert len(tables) == lay.nr_pt_frames
    l1_entries = [v for pfn, ents in tables.items() if len(ents) > 2 for _, v in ents]
    assert len(l1_entries) == lay.mapped_pages
    pts = set(range(lay.pt_pfn, lay.pt_pfn + lay.nr_pt_frames))
    for v in l1_entries:
        pfn = (v >> 12) - off
        assert (v & 0xFFF == PTE_RO) == (pfn in pts)


def test_memory_too_small() -> None:
    with pytest.raises(BuildError, match="memory too small"):
        plan_layout(VB, VB, VB + (3 << 20), 256, name="big")


def test_ramdisk_placed_after_kernel() -> None:
    lay = plan_layout(VB, VB, VB + 0x2000, 8192, ramdisk_len=10000)
    assert lay.ramdisk_pfn == 2 and lay.ramdisk_pages == 3
    assert lay.p2m_pfn == 5


def test_layout_grows_tables_for_large_mappings() -> None:
    lay = plan_layout(VB, VB, VB + (40 << 20), 65536)
    assert lay.n_l1 == (lay.mapped_pages + 511) // 512
