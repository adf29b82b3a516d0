"""Grant tables and inter-domain event channels between two domains in one
process (the hypervisor side; the guests are built but not started)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyxen import abi
from pyxen.hv import gnttab as G
from pyxen.hv import machine as M
from pyxen.hv.domain import Domain


@pytest.fixture
def pair(guest: Path) -> Iterator[tuple[Domain, Domain]]:
    from pyxen.domctl import create_domain
    from pyxen.hv.domain import DomainSpec
    a = create_domain(DomainSpec(name="gA", memory_mib=16, kernel=str(guest / "hello"), domid=11),
                      start=False)
    b = create_domain(DomainSpec(name="gB", memory_mib=16, kernel=str(guest / "hello"), domid=12),
                      start=False)
    yield a, b
    for d in (b, a):
        d.destroy()
        d.close()


def grant(a: Domain, ref: int, flags: int, domid: int, pfn: int) -> None:
    off = a.machine.xenheap_offset(M.XH_GRANT) + ref * 8
    struct.pack_into("<HHI", a.machine.ram, off, flags, domid, M.MFN_BASE + pfn)


def entry_flags(a: Domain, ref: int) -> int:
    return int(struct.unpack_from("<H", a.machine.ram, a.machine.xenheap_offset(M.XH_GRANT) + ref * 8)[0])


def free_va(d: Domain) -> int:
    """A VA in d's initial mapping whose PTE a grant map may replace (page 200)."""
    return 0xFFFFFFFF80000000 + 200 * 4096


def test_map_read_write_unmap(pair: tuple[Domain, Domain]) -> None:
    a, b = pair
    assert a.gnttab.setup(1) == [a.machine.xenheap_mfn + M.XH_GRANT]
    a.machine.ram[300 * 4096:300 * 4096 + 5] = b"hello"
    grant(a, 5, G.GTF_permit_access, b.domid, 300)
    vb = b.vcpus[0]
    status, handle, bus = b.gnttab.map(vb, free_va(b), G.GNTMAP_host_map, 5, a.domid)
    assert status == G.GNTST_okay
    assert entry_flags(a, 5) == G.GTF_permit_access | G.GTF_reading | G.GTF_writing
    slot = (bus >> 12) - (M.GRANT_GPA >> 12)
    win = b.machine.grant_window
    assert win[slot * 4096:slot * 4096 + 5] == b"hello"
    win[slot * 4096:slot * 4096 + 5] = b"HELLO"
    assert a.machine.ram[300 * 4096:300 * 4096 + 5] == b"HELLO"
    # the guest's PTE for host_addr now maps the window frame, read-write
    pte = b.ft.read_entry(b.ft.l1_entry_for(vb.kernel_l4, free_va(b)))
    assert (pte & abi.PADDR_MASK) == bus and pte & 2
    # B cannot make another mapping of that frame itself
    with pytest.raises(abi.XenError) as ei:
        b.ft.mod_entry(b.ft.l1_entry_for(vb.kernel_l4, free_va(b) + 4096), bus | 7)
    assert ei.value.errno == abi.EPERM
    assert b.gnttab.unmap(vb, free_va(b), 0, handle) == G.GNTST_okay
    assert entry_flags(a, 5) == G.GTF_permit_access
    assert b.ft.read_entry(b.ft.l1_entry_for(vb.kernel_l4, free_va(b))) == 0
    assert 300 in a.read_dirty()
    assert b.ft.audit([vb.kernel_l4]) == []
    assert b.gnttab.unmap(vb, free_va(b), 0, handle) == G.GNTST_bad_handle


def test_grant_checks(pair: tuple[Domain, Domain]) -> None:
    a, b = pair
    a.gnttab.setup(1)
    vb = b.vcpus[0]
    va = free_va(b)
    grant(a, 1, G.GTF_permit_access, 99, 300)  # for another domain
    grant(a, 2, G.GTF_permit_access | G.GTF_readonly, b.domid, 301)
    grant(a, 3, 0, b.domid, 302)  # revoked
    grant(a, 4, G.GTF_permit_access, b.domid, 100000)  # not a frame of A's
    # Xen's _set_status_v1: not granted to us / write-map of a read-only grant /
    # revoked are all GNTST_general_error
    assert b.gnttab.map(vb, va, G.GNTMAP_host_map, 1, a.domid)[0] == G.GNTST_general_error
    assert b.gnttab.map(vb, va, G.GNTMAP_host_map, 2, a.domid)[0] == G.GNTST_general_error
    assert b.gnttab.map(vb, va, G.GNTMAP_host_map, 3, a.domid)[0] == G.GNTST_general_error
    assert b.gnttab.map(vb, va, G.GNTMAP_host_map, 4, a.domid)[0] == G.GNTST_bad_page
    assert b.gnttab.map(vb, va, G.GNTMAP_host_map, 600, a.domid)[0] == G.GNTST_bad_gntref
    assert b.gnttab.map(vb, va, G.GNTMAP_host_map, 2, 77)[0] == G.GNTST_bad_domain
    st, h, _ = b.gnttab.map(vb, va + 5, G.GNTMAP_host_map | G.GNTMAP_readonly, 2, a.domid)
    assert st == G.GNTST_okay
    assert entry_flags(a, 2) == G.GTF_permit_access | G.GTF_readonly | G.GTF_reading
    assert not b.ft.read_entry(b.ft.l1_entry_for(vb.kernel_l4, va)) & 2
    assert b.gnttab.unmap(vb, va, 0, h) == G.GNTST_okay
    for ref in (1, 3, 4):  # failed maps leave no status bits behind
        assert not entry_flags(a, ref) & (G.GTF_reading | G.GTF_writing)


def test_copy(pair: tuple[Domain, Domain]) -> None:
    a, b = pair
    a.gnttab.setup(1)
    a.machine.ram[310 * 4096 + 16:310 * 4096 + 24] = b"granted!"
    grant(a, 7, G.GTF_permit_access, b.domid, 310)
    dst_mfn = M.MFN_BASE + 250
    raw = G.COPY.pack(7, a.domid, 16, dst_mfn, abi.DOMID_SELF, 100, 8, G.GNTCOPY_source_gref, 0)
    assert b.gnttab.copy_one(raw) == G.GNTST_okay
    assert b.machine.ram[250 * 4096 + 100:250 * 4096 + 108] == b"granted!"
    assert entry_flags(a, 7) == G.GTF_permit_access
    bad = G.COPY.pack(7, a.domid, 4090, dst_mfn, abi.DOMID_SELF, 0, 8, G.GNTCOPY_source_gref, 0)
    assert b.gnttab.copy_one(bad) == G.GNTST_bad_copy_arg
    foreign = G.COPY.pack(M.MFN_BASE + 310, a.domid, 0, dst_mfn, abi.DOMID_SELF, 0, 8, 0, 0)
    assert b.gnttab.copy_one(foreign) == G.GNTST_permission_denied  # a frame, not a grant
    # into A's page through a grant: A's dirty log sees it
    a.read_dirty()
    grant(a, 8, G.GTF_permit_access, b.domid, 311)
    raw = G.COPY.pack(dst_mfn, abi.DOMID_SELF, 100, 8, a.domid, 0, 8, G.GNTCOPY_dest_gref, 0)
    assert b.gnttab.copy_one(raw) == G.GNTST_okay
    assert a.machine.ram[311 * 4096:311 * 4096 + 8] == b"granted!"
    assert 311 in a.read_dirty()


def _pending(d: Domain, port: int) -> bool:
    d.vcpus[0]._drain_inbox()
    word, bit = divmod(port, 64)
    return bool(struct.unpack_from("<Q", d.shared_info, abi.SI_EVTCHN_PENDING + word * 8)[0] >> bit & 1)


def _clear(d: Domain, port: int) -> None:
    word, bit = divmod(port, 64)
    off = abi.SI_EVTCHN_PENDING + word * 8
    v = struct.unpack_from("<Q", d.shared_info, off)[0]
    struct.pack_into("<Q", d.shared_info, off, v & ~(1 << bit))


def test_interdomain_event_channel(pair: tuple[Domain, Domain]) -> None:
    a, b = pair
    pa = a.evtchn.alloc_unbound(b.domid)
    with pytest.raises(abi.XenError):  # not for this domain
        a.evtchn.bind_interdomain(b.domid, 999)
    pb = b.evtchn.bind_interdomain(a.domid, pa)
    assert _pending(b, pb)  # a new binding starts pending (Xen)
    _clear(b, pb)
    st = struct.unpack("<II H2xI", a.evtchn.status(pa))
    assert st[0] == 2 and st[2] == b.domid and st[3] == pb  # interdomain to (B, pb)
    a.evtchn.send(pa)
    assert _pending(b, pb)
    b.evtchn.send(pb)
    assert _pending(a, pa)
    with pytest.raises(abi.XenError):  # already bound
        b.evtchn.bind_interdomain(a.domid, pa)
    b.evtchn.close(pb)
    st = struct.unpack("<II H6x", a.evtchn.status(pa))
    assert st[0] == 1 and st[2] == b.domid  # unbound, waiting for B again
    pb2 = b.evtchn.bind_interdomain(a.domid, pa)
    assert pb2 > 0
    b.destroy()
    st = struct.unpack("<II H6x", a.evtchn.status(pa))
    assert st[0] == 1  # B died: unbound
