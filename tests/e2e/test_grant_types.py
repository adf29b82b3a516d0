"""Issue 8, findings 1 and 2: grant operations respect page types, and domains
do not trust each other's memory for bounds.

Each test is an attack that succeeded before the fix:

* a guest granted its own live L1 page table to itself and wrote a PTE mapping
  the hypervisor's memory into it with GNTTABOP_copy (escape to the
  hypervisor); writable maps of page-table and GDT frames went through, and a
  frame writable through a grant could then become a page table;
* blkback read a disk block into a granted page-table frame;
* another domain's process mapped a page-table frame writable;
* a forged peer header (sizes read from the peer's own memory) made the
  mapper's process accept any frame and write out of bounds;
* any client of the daemon got any domain's whole memory.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from pyxen.backends import blkif as B
from pyxen.hv import gnttab as G
from pyxen.hv import machine as M
from pyxen.hv.mm import PGT_L1
from tests.conftest import ROOT, read_until, wait_listed
from tests.e2e.test_blkback import FileImage, NativeFileImage, backend

CHECKS = ["copy_pte_into_own_l1", "copy_into_own_l1_gmfn", "map_rw_l1", "map_rw_l2", "map_rw_l3",
          "map_rw_l4", "map_ro_l1", "map_rw_gdt", "pin_while_mapped", "gdt_while_mapped"]


def test_guest_cannot_write_its_page_tables_or_gdt_through_grants(run_guest: Any) -> None:
    """The hostile app, as a guest under KVM: (a) grants its live L1 to itself
    and GNTTABOP_copy's a PTE mapping the hypervisor area into it (and the same
    with the L1 as a local gmfn destination): GNTST_general_error, PTE
    unchanged; (b) writable maps of its own L1-L4 and of a frame in use as its
    GDT: GNTST_general_error, a read-only map of its L1 allowed (as Xen);
    (c) a frame writable-mapped through a grant cannot be pinned as an L1 or
    loaded as a GDT (-EINVAL) until it is unmapped, then it can."""
    r = run_guest("hostile", "role=local me=1")
    r.wait_for(r"hostile: done pass=\d+ fail=\d+|stopping here", timeout=60)
    out = r.output
    for name in CHECKS:
        assert re.search(rf"^hostile: {name} PASS", out, re.M), f"{name} failed:\n{out}"
    assert "hostile: done pass=10 fail=0" in out, out
    # the attack's own line: the hypervisor said general_error and the PTE held
    m = re.search(r"copy_pte_into_own_l1 PASS ref=\d+ status=-1 pte_before=(\S+) pte_after=(\S+)", out)
    assert m and m.group(1) == m.group(2), out
    assert r.domain.ft.audit([]) is not None  # the type state is still consistent enough to walk


# ---------------------------------------------------------------- blkback

BLK_PATHS = ["python-no-native", "python", "native-io"]


@pytest.fixture(params=BLK_PATHS)
def blk_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    from pyxen import native
    from pyxen.backends import blkback
    if request.param != "python-no-native" and native.lib() is None:
        pytest.skip(f"native library unavailable: {native.why_not()}")
    if request.param == "python-no-native":
        # PYXEN_NATIVE=0: grant holds by GrantTables.host_acquire in Python
        monkeypatch.setattr(native, "fast", lambda: None)
    monkeypatch.setattr(blkback, "NATIVE", request.param == "native-io")
    return str(request.param)


def test_blkback_will_not_read_a_disk_into_a_page_table(guest: Path, tmp_path: Path,
                                                        blk_path: str) -> None:
    """A frontend grants blkback a frame that its domain uses as a pinned L1
    (pinned through the domain's own FrameTable, exactly what MMUEXT_PIN_L1_TABLE
    does) and asks for a READ into it, with disk sectors that are valid-looking
    PTEs: BLKIF_RSP_ERROR and the frame unchanged, on the Python data path
    (with and without the native grant holds) and on the native one.  Once the
    frame is unpinned the same request succeeds; while blkback holds a frame
    for writing (persistent grant), the domain cannot pin it."""
    img = (NativeFileImage if blk_path == "native-io" else FileImage)(tmp_path / "disk.img", 8 << 20)
    os.pwrite(img.fd, struct.pack("<Q", (0x10000 << 12) | 0x67) * 512, 0)
    with backend(guest, img, 23) as (d, _xs, front, _bb):
        front.connect()
        pfn = d.nr_pages - 8  # beyond what the builder maps: no writable mapping
        mfn = M.MFN_BASE + pfn
        junk = struct.pack("<Q", 0x4242424242424242) * 512  # bit 0 clear: not-present entries
        d.machine.ram[pfn * 4096:(pfn + 1) * 4096] = junk
        d.ft.pin(mfn, PGT_L1)
        front.grant(5, pfn)
        front.rw(B.OP_READ, 1, 0, [(5, 0, 7)])
        assert front.responses(1) == [(1, B.OP_READ, B.RSP_ERROR)]
        assert bytes(d.machine.ram[pfn * 4096:(pfn + 1) * 4096]) == junk
        flags = struct.unpack_from("<H", d.machine.ram, d.machine.xenheap_offset(M.XH_GRANT) + 5 * 8)[0]
        assert flags == G.GTF_permit_access  # nothing left held
        d.ft.unpin(mfn)
        front.rw(B.OP_READ, 2, 0, [(5, 0, 7)])
        assert front.responses(1) == [(2, B.OP_READ, B.RSP_OKAY)]
        assert bytes(d.machine.ram[pfn * 4096:pfn * 4096 + 8]) == struct.pack("<Q", (0x10000 << 12) | 0x67)
        # the other order: a backend holding the page for writing keeps it from becoming an L1
        d.machine.ram[pfn * 4096:(pfn + 1) * 4096] = bytes(4096)
        off = d.gnttab.host_acquire(5, 0, True)
        assert off == pfn << 12
        with pytest.raises(Exception, match="writable through a grant"):
            d.ft.pin(mfn, PGT_L1)
        d.gnttab.host_release(5)
        d.ft.pin(mfn, PGT_L1)
        d.ft.unpin(mfn)


# ---------------------------------------------------------------- across processes

def _xs(host: Any) -> Any:
    from pyxen.xenstore.client import XsClient
    return XsClient(str(host.info()["xenstore_socket"]))


def _memfd_of(pid: int) -> int:
    """The domain process's RAM memfd, duplicated into the test (same uid: this
    is what pidfd_getfd lets any process of the user do, see docs/interdomain.md)."""
    from pyxen.toolstack.directory import pidfd_getfd
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:pyxen-ram"):
                return pidfd_getfd(pid, int(fd))
        except OSError:
            continue
    raise AssertionError(f"no RAM memfd in process {pid}")


def _forge_peer_header(pid: int, max_pages: int) -> None:
    """Write the granter's peer header as a compromised guest would if it could
    reach it: before finding 1 was fixed a guest could (a forged PTE maps any
    frame); now no guest path reaches the Xen-heap page, so the test plays the
    guest.  nr_pages and grant_frames are made huge."""
    import mmap
    fd = _memfd_of(pid)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            off = (max_pages + M.XH_PEER) << 12
            magic = struct.unpack_from("<I", m, off)[0]
            assert magic == 0x50595850
            struct.pack_into("<IIQ", m, off, magic, 0xFFFFFFFF, 1 << 40)
    finally:
        os.close(fd)


def test_other_domain_cannot_write_a_page_table_and_forged_sizes_stay_harmless(host: Any) -> None:
    """Two domain processes under pyxend.  The offerer grants the mapper its
    live L1 (writable), a plain page and a frame far outside its RAM.  Before
    the mapper looks, the offerer's peer header is forged (nr_pages 2^40,
    grant_frames 2^32-1).  The mapper (another process): writable map of the L1
    -> GNTST_general_error, read-only map -> okay, the plain page -> okay and
    written, the far frame -> GNTST_bad_page, a ref beyond any table ->
    GNTST_bad_gntref, a copy into the far frame -> GNTST_bad_page; and both
    processes and their vCPUs keep running.  A third domain, granted nothing,
    never gets the offerer's memory: GNTST_general_error for everything."""
    kernel = f'kernel="{ROOT}/guest/build/hostile"'
    mapper = host.create(ROOT / "examples/ticker.cfg", ['name="hostile-map"', kernel, 'extra="role=map"'])
    sm = host.console_socket(mapper)
    read_until(sm, rb"hostile: role=map waiting", timeout=20)
    offer = host.create(ROOT / "examples/ticker.cfg", ['name="hostile-offer"', kernel,
                                                       f'extra="role=offer peer={mapper}"'])
    so = host.console_socket(offer)
    out = read_until(so, rb"hostile: offer l1=\d+ page=\d+ far=\d+", timeout=20)
    m = re.search(rb"hostile: offer l1=(\d+) page=(\d+) far=(\d+)", out)
    assert m
    rec = next(d for d in host.list() if d["domid"] == offer)
    _forge_peer_header(int(rec["pid"]), int(rec["memory"]) * 256)  # ticker.cfg: memory = maxmem
    xs = _xs(host)
    try:
        xs.write(f"/local/domain/{mapper}/data/hostile/offer",
                 f"{offer} {int(m[1])} {int(m[2])} {int(m[3])}")
    finally:
        xs.close()
    out = read_until(sm, rb"hostile: tick 3\b", timeout=30)
    got = re.search(rb"hostile: mapped l1_rw=(-?\d+) l1_ro=(-?\d+) page_rw=(-?\d+) far=(-?\d+) "
                    rb"beyond=(-?\d+) copy_far=(-?\d+)", out)
    assert got, out
    assert [int(x) for x in got.groups()] == [G.GNTST_general_error, G.GNTST_okay, G.GNTST_okay,
                                              G.GNTST_bad_page, G.GNTST_bad_gntref, G.GNTST_bad_page], out
    read_until(so, rb"hostile: page written by the peer", timeout=20)
    # a third domain the offerer granted nothing: its process never gets the
    # offerer's memory (the offerer's process refuses), every op is general_error
    stranger = host.create(ROOT / "examples/ticker.cfg", ['name="hostile-stranger"', kernel,
                                                          'extra="role=map"'])
    ss = host.console_socket(stranger)
    read_until(ss, rb"hostile: role=map waiting", timeout=20)
    xs = _xs(host)
    try:
        xs.write(f"/local/domain/{stranger}/data/hostile/offer",
                 f"{offer} {int(m[1])} {int(m[2])} {int(m[3])}")
    finally:
        xs.close()
    out = read_until(ss, rb"hostile: tick 1\b", timeout=30)
    assert b"mapped l1_rw=-1 l1_ro=-1 page_rw=-1 far=-1 beyond=-1 copy_far=-1" in out, out
    assert any(f"granted domain {stranger} nothing" in line for line in host.dmesg()), host.dmesg()
    states = {d["domid"]: d["state"] for d in host.list()}
    assert all(states.get(x) == "running" for x in (mapper, offer, stranger)), states
    for s in (sm, so, ss):
        s.close()


def test_daemon_hands_a_domain_memory_only_to_a_domain_it_granted(host: Any) -> None:
    """The daemon's `peer` op gave any client the pid and fd number of any
    domain's RAM memfd.  Now it answers only a connection authenticated (by
    SO_PEERCRED) as a domain's own process, and only after the target domain's
    process consents, which it does only to a domain it granted something."""
    d = host.create(ROOT / "examples/ticker.cfg", ['name="peer-target"'])
    from pyxen.toolstack import paths
    from pyxen.toolstack.proto import Conn
    path = paths.daemon_socket(Path(host.run_dir))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    c = Conn(s)
    try:
        # as a plain client, and pretending to be a domain
        for req in ({"op": "peer", "domain": d}, {"op": "peer", "domain": d, "from_dom": 99},
                    {"op": "peer", "domain": d, "from_dom": d}):
            r = c.call(req)
            assert not r.get("ok") and "memfd" not in r and "pid" not in r, r
    finally:
        c.close()


def test_forged_header_in_process_gives_gntst_errors(run_guest: Any) -> None:
    """In-process variant (LocalDirectory): PeerMemory sizes come from the
    Domain, not from the granter's header page, so a forged header cannot make
    ram_offset, grant_entry_offset or mark_dirty reach outside the granter's
    memory; refs are clamped to MAX_GRANT_FRAMES."""
    from pyxen.hv.interdomain import PEER_HDR, PEER_MAGIC, PeerMemory
    r = run_guest("hello", start=False)
    d = r.domain
    m = d.machine
    PEER_HDR.pack_into(m.ram, m.xenheap_offset(M.XH_PEER), PEER_MAGIC, 0xFFFFFFFF, 1 << 40)
    p = PeerMemory(d.domid, m.ram, m.memfd, m.max_pages, nr_pages=d.nr_pages)
    assert p.grant_frames == M.MAX_GRANT_FRAMES
    assert p.ram_offset(M.MFN_BASE + d.nr_pages) is None
    assert p.ram_offset(M.MFN_BASE + (1 << 39)) is None
    p.mark_dirty(1 << 39)  # ignored, no write out of bounds
    with pytest.raises(Exception, match="beyond any grant table"):
        p.grant_entry_offset(M.MAX_GRANT_REFS)
    with pytest.raises(Exception, match="smaller"):
        PeerMemory(d.domid, m.ram, m.memfd, m.max_pages * 4)


def test_guest_cannot_turn_its_xenstore_or_console_ring_into_a_page_table(run_guest: Any) -> None:
    """The same class of bug beside grants: the console and xenstore backends
    write the guest's ring pages for its whole life (xenstored copies bytes the
    guest chose into the xenstore ring), so a ring pinned as an L1 would take
    forged PTEs.  The guest's attack is: map the ring read-only, fill it with
    a valid L1, MMUEXT_PIN_L1_TABLE.  The test takes those steps through the
    domain's own FrameTable (the guest's own mapping dropped with the
    hypervisor's L1 write, the page zeroed) on a built domain: the pin is
    -EINVAL, because the toolstack holds a writable type on both rings."""
    from pyxen.abi import XenError
    r = run_guest("hello", start=False)
    d = r.domain
    l4 = d.vcpus[0].kernel_l4
    for key in ("store_mfn", "console_mfn"):
        mfn = d.start_info[key]
        pfn = mfn - M.MFN_BASE
        va = 0xFFFFFFFF80000000 + (pfn << 12)  # the builder's mapping of every boot page
        pte = d.ft.l1_entry_for(l4, va)
        old = d.ft.read_entry(pte)
        assert (old & 0x000FFFFFFFFFF000) >> 12 == mfn and old & 2
        d.ft.replace_raw(pte, 0, old)
        d.machine.ram[pfn * 4096:(pfn + 1) * 4096] = bytes(4096)
        with pytest.raises(XenError) as e:
            d.ft.pin(mfn, PGT_L1)
        assert e.value.errno == 22, key
    assert d.ft.audit([l4]) == []


def test_mapper_outlives_the_granter_it_maps(host: Any) -> None:
    """The mapper holds a writable mapping of a page of another domain, which
    is destroyed; then the mapper writes the page and unmaps it.  The peer's
    memory must stay mapped in the mapper's process until its last mapping is
    gone (the unmap writes the granter's dirty bitmap and grant entry through
    raw addresses): GNTST_okay, and the mapper keeps running."""
    kernel = f'kernel="{ROOT}/guest/build/hostile"'
    mapper = host.create(ROOT / "examples/ticker.cfg", ['name="hostile-hold"', kernel,
                                                        'extra="role=map hold=1"'])
    sm = host.console_socket(mapper)
    read_until(sm, rb"hostile: role=map waiting", timeout=20)
    offer = host.create(ROOT / "examples/ticker.cfg", ['name="hostile-gone"', kernel,
                                                       f'extra="role=offer peer={mapper}"'])
    so = host.console_socket(offer)
    m = re.search(rb"hostile: offer l1=(\d+) page=(\d+) far=(\d+)",
                  read_until(so, rb"hostile: offer l1=\d+ page=\d+ far=\d+", timeout=20))
    assert m
    so.close()
    xs = _xs(host)
    try:
        xs.write(f"/local/domain/{mapper}/data/hostile/offer", f"{offer} {int(m[1])} {int(m[2])} {int(m[3])}")
        read_until(sm, rb"hostile: holding page status=0\b", timeout=30)
        host.destroy(offer)
        wait_listed(host, lambda ds: all(d["domid"] != offer for d in ds), what="granter gone")
        end = time.monotonic() + 30
        while not any(f"domain {offer} went away: 1 mappings" in x for x in host.dmesg()):
            assert time.monotonic() < end, "the mapper never heard that the granter went away"
            time.sleep(0.05)
        xs.write(f"/local/domain/{mapper}/data/hostile/unmap", "1")
    finally:
        xs.close()
    out = read_until(sm, rb"hostile: unmapped status=-?\d+[\s\S]*hostile: tick 2\b", timeout=30)
    assert b"hostile: unmapped status=0" in out, out
    assert any(d["domid"] == mapper and d["state"] == "running" for d in host.list())
    sm.close()
