"""GNTTABOP_copy: the native batch (gnt.c ``pxc_copy``) against the Python path.

Two in-process domains (built, not started).  The same hostile batches go
through ``GrantTables.copy_batch`` twice from the same starting memory: once
on the native path, once with the native library hidden (``copy_one`` per
op, the reference).  Everything a copy can change must come out identical:
each op's status in the guest's array, both domains' whole memory (RAM,
grant entries and their status bits, page-type words, active grant entries,
the dirty bitmap) and the per-ref use counts; and the statuses must be the
ones Xen gives for the cases we know (a test of the reference too).
"""

from __future__ import annotations

import random
import struct

import pytest

from pyxen import abi
from pyxen.hv import gnttab as G
from pyxen.hv import machine as M
from pyxen.hv.domain import Domain

KVA = 0xFFFFFFFF80000000  # the initial mapping: pfn N at KVA + N * 4096
OPS_PFN = 220  # B's op array lives here (two pages: it straddles)
SRC_PFNS = range(300, 308)  # A's granted pages
TABLE_REFS = 32


def _grant(a: Domain, ref: int, flags: int, domid: int, frame: int) -> None:
    off = a.machine.xenheap_offset(M.XH_GRANT) + ref * 8
    struct.pack_into("<HHI", a.machine.ram, off, flags, domid, frame)


def _page_tables(d: Domain) -> list[int]:
    """Frames of d's L4, L3, L2 and L1 for the initial kernel mapping."""
    v = d.vcpus[0]
    out = [v.kernel_l4]
    table = v.kernel_l4
    for shift in (39, 30, 21):
        e = d.ft.read_entry((table << 12) + ((KVA >> shift) & 511) * 8)
        table = (e & abi.PADDR_MASK) >> 12
        out.append(table)
    return out


def _world(a: Domain, b: Domain) -> None:
    """A grants B a mix of entries; B's page tables and A's are typed."""
    a.gnttab.setup(1)
    for i, pfn in enumerate(SRC_PFNS):
        a.machine.ram[pfn * 4096:(pfn + 1) * 4096] = bytes([(pfn * 7 + j) & 0xFF for j in range(256)]) * 16
        _grant(a, 8 + i, G.GTF_permit_access, b.domid, M.MFN_BASE + pfn)
    _grant(a, 16, G.GTF_permit_access | G.GTF_readonly, b.domid, M.MFN_BASE + 310)
    _grant(a, 17, G.GTF_permit_access, b.domid + 1, M.MFN_BASE + 311)  # someone else's
    _grant(a, 18, 2, b.domid, M.MFN_BASE + 312)  # GTF_accept_transfer
    _grant(a, 19, G.GTF_permit_access, b.domid, M.MFN_BASE + a.nr_pages + 5)  # not RAM
    _grant(a, 20, G.GTF_permit_access, b.domid, 0x1234)  # below RAM
    for i, mfn in enumerate(_page_tables(a)):  # A's page tables, granted writable
        _grant(a, 21 + i, G.GTF_permit_access, b.domid, mfn)
    _grant(a, 25, G.GTF_permit_access | G.GTF_reading, b.domid, M.MFN_BASE + 313)  # forged bit
    # B grants itself one page (a gref naming DOMID_SELF)
    b.gnttab.setup(1)
    _grant(b, 9, G.GTF_permit_access, b.domid, M.MFN_BASE + 330)


def _random_ops(a: Domain, b: Domain, rng: random.Random, n: int) -> list[bytes]:
    pts_b = _page_tables(b)
    ops = []
    for _ in range(n):
        def side() -> tuple[int, int, bool]:
            k = rng.randrange(10)
            if k < 4:  # a grant of A's
                ref = rng.choice([*range(8, 26), 0, 7, 26, 511, 512, 4096, M.MAX_GRANT_REFS,
                                  0xFFFFFFFF])
                if rng.random() < 0.1:
                    ref |= rng.randrange(1, 1 << 32) << 32  # garbage in the gmfn half
                return ref, rng.choice([a.domid, a.domid, a.domid, 999, abi.DOMID_SELF]), True
            if k < 5:  # B's own grant to itself
                return rng.choice([9, 10]), rng.choice([abi.DOMID_SELF, b.domid]), True
            # a gmfn of B's
            mfn = rng.choice([M.MFN_BASE + 250, M.MFN_BASE + 251, M.MFN_BASE + 330, *pts_b,
                              M.MFN_BASE + b.nr_pages, M.MFN_BASE - 1, 5, b.shared_info_mfn,
                              M.MFN_BASE + OPS_PFN])
            return mfn, rng.choice([abi.DOMID_SELF, abi.DOMID_SELF, b.domid, a.domid]), False
        su, sdom, sref = side()
        du, ddom, dref = side()
        length = rng.choice([0, 1, 8, 100, 4096, 4097, 2048])
        soff = rng.choice([0, 0, 16, 2048, 4095, 4096])
        doff = rng.choice([0, 0, 100, 2048, 4095])
        flags = (G.GNTCOPY_source_gref if sref else 0) | (G.GNTCOPY_dest_gref if dref else 0)
        if rng.random() < 0.05:
            flags |= rng.choice([4, 8, 0x8000])  # unknown flag bits
        ops.append(G.COPY.pack(su, sdom, soff, du, ddom, doff, length, flags, 0x5A5A))
    return ops


def _run(b: Domain, ops: list[bytes], first: int, use_native: bool,
         monkeypatch: pytest.MonkeyPatch) -> None:
    base = OPS_PFN * 4096 + first
    b.machine.ram[base:base + len(ops) * G.COPY.size] = b"".join(ops)
    with monkeypatch.context() as mp:
        if not use_native:
            mp.setattr(G.native, "fast", lambda: None)
        assert b.gnttab.copy_batch(b.vcpus[0], KVA + base, len(ops)) == 0


def _snapshot(a: Domain, b: Domain) -> tuple[bytes, bytes]:
    return bytes(a.machine.ram), bytes(b.machine.ram)


def _counts(d: Domain) -> dict[int, list[int]]:
    return {dom: [i for i, c in enumerate(p.counts) if c] for dom, p in d.gnttab.peers.items()}


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_native_copy_matches_python(pair: tuple[Domain, Domain], seed: int,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    _world(a, b)
    rng = random.Random(seed)
    first = rng.choice([0, 8, 4096 - 40 * 3 - 20])  # aligned, and an array that straddles pages
    n = rng.choice([60, 100, 300])  # 300: more than one native chunk
    ops = _random_ops(a, b, rng, n)
    start = _snapshot(a, b)
    _run(b, ops, first, True, monkeypatch)
    after_native = _snapshot(a, b)
    stats_native = dict(b.gnttab.stats)
    assert _counts(b) == {dom: [] for dom in b.gnttab.peers}
    # back to the start, then the reference
    a.machine.ram[:] = start[0]
    b.machine.ram[:] = start[1]
    b.gnttab.stats = {k: 0 for k in b.gnttab.stats}
    _run(b, ops, first, False, monkeypatch)
    after_python = _snapshot(a, b)
    assert _counts(b) == {dom: [] for dom in b.gnttab.peers}
    base = OPS_PFN * 4096 + first
    st_n = [struct.unpack_from("<h", after_native[1], base + i * 40 + 36)[0] for i in range(n)]
    st_p = [struct.unpack_from("<h", after_python[1], base + i * 40 + 36)[0] for i in range(n)]
    assert st_n == st_p
    assert 0x5A5A not in st_n  # every status was written
    for name, x, y in (("A", after_native[0], after_python[0]), ("B", after_native[1], after_python[1])):
        if x != y:
            diff = next(i for i in range(len(x)) if x[i] != y[i])
            pytest.fail(f"domain {name}'s memory differs first at offset {diff:#x} "
                        f"(page {diff >> 12})")
    assert stats_native["copies"] == b.gnttab.stats["copies"]
    assert stats_native["copy_bytes"] == b.gnttab.stats["copy_bytes"]
    assert {G.GNTST_okay, G.GNTST_bad_copy_arg, G.GNTST_general_error} <= set(st_n)


def test_native_copy_statuses(pair: tuple[Domain, Domain]) -> None:
    """Xen's answer for each case, on the native path."""
    a, b = pair
    _world(a, b)
    pts_b = _page_tables(b)
    dst = M.MFN_BASE + 250
    S, D, SELF = G.GNTCOPY_source_gref, G.GNTCOPY_dest_gref, abi.DOMID_SELF
    cases = [
        (G.COPY.pack(8, a.domid, 0, dst, SELF, 0, 4096, S, 0), G.GNTST_okay),
        (G.COPY.pack(8 | 1 << 40, a.domid, 0, dst, SELF, 0, 64, S, 0), G.GNTST_okay),  # u.ref: low 32 bits
        (G.COPY.pack(8, a.domid, 4000, dst, SELF, 0, 200, S, 0), G.GNTST_bad_copy_arg),
        (G.COPY.pack(600, a.domid, 0, dst, SELF, 0, 8, S, 0), G.GNTST_bad_gntref),
        (G.COPY.pack(17, a.domid, 0, dst, SELF, 0, 8, S, 0), G.GNTST_general_error),  # not ours
        (G.COPY.pack(18, a.domid, 0, dst, SELF, 0, 8, S, 0), G.GNTST_general_error),  # not permit
        (G.COPY.pack(dst, SELF, 0, 16, a.domid, 0, 8, D, 0), G.GNTST_general_error),  # read-only
        (G.COPY.pack(19, a.domid, 0, dst, SELF, 0, 8, S, 0), G.GNTST_bad_page),
        (G.COPY.pack(dst, SELF, 0, 21, a.domid, 0, 8, D, 0), G.GNTST_general_error),  # A's L4
        (G.COPY.pack(dst, SELF, 0, pts_b[3], SELF, 0, 8, 0, 0), G.GNTST_general_error),  # B's L1
        (G.COPY.pack(M.MFN_BASE + 310, a.domid, 0, dst, SELF, 0, 8, 0, 0),
         G.GNTST_permission_denied),
        (G.COPY.pack(M.MFN_BASE + b.nr_pages, SELF, 0, dst, SELF, 0, 8, 0, 0), G.GNTST_bad_page),
        (G.COPY.pack(8, 999, 0, dst, SELF, 0, 8, S, 0), G.GNTST_bad_domain),
        (G.COPY.pack(9, SELF, 0, dst, SELF, 0, 8, S, 0), G.GNTST_okay),  # our own grant
        (G.COPY.pack(dst, SELF, 0, 9, a.domid, 0, 8, D, 0), G.GNTST_okay),  # into A's page
    ]
    a.read_dirty()
    base = OPS_PFN * 4096 + 4096 - 40 * 2 - 4  # straddles two pages
    ram = b.machine.ram
    ram[base:base + 40 * len(cases)] = b"".join(op for op, _ in cases)
    assert b.gnttab.copy_batch(b.vcpus[0], KVA + base, len(cases)) == 0
    got = [struct.unpack_from("<h", ram, base + i * 40 + 36)[0] for i in range(len(cases))]
    assert got == [want for _, want in cases]
    assert ram[250 * 4096:250 * 4096 + 4096] != bytes(4096)
    assert a.machine.ram[301 * 4096:301 * 4096 + 8] == ram[250 * 4096:250 * 4096 + 8]
    assert 301 in a.read_dirty()  # A's page written through its grant: in its dirty log
    for ref in range(8, 26):  # no status bits left behind (25 had a forged GTF_reading)
        flags = struct.unpack_from("<H", a.machine.ram, a.machine.xenheap_offset(M.XH_GRANT) + ref * 8)[0]
        assert not flags & G.GTF_writing, ref
        assert ref == 25 or not flags & G.GTF_reading, ref
