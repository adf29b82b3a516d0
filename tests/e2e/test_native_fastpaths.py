"""The inter-domain fast paths of issue 10 (docs/interdomain.md).

* ``pxc_walk`` (gnt.c), the guest page walk in C that GNTTABOP_copy's op
  array and EVTCHNOP_send's argument go through, gives what the reference
  walk (``FrameTable.translate``) gives, or hands back to it;
* ``pxe_send`` (evt.c): EVTCHNOP_send in C writes the eventfd registered for
  the port and leaves everything else to Python;
* a grant copy whose op array sits in a frame the guest gave back takes the
  Python path and fails as it does there (-EFAULT);
* two domain processes ping-pong with guests waiting in SCHEDOP_poll
  (``pingpong wait=poll``: the sends go through pxe_send, the waits through
  the hub's adaptive polling).
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyxen import abi, native
from pyxen.abi import XenError
from pyxen.hv import atomic
from pyxen.hv import gnttab as G
from pyxen.hv import machine as M
from pyxen.hv.domain import Domain
from pyxen.hv.evtchn import NativeEventHub
from tests.conftest import ROOT, read_until

KVA = 0xFFFFFFFF80000000  # the initial mapping: pfn N at KVA + N * 4096


@pytest.fixture
def dom(guest: Path) -> Iterator[Domain]:
    from pyxen.domctl import create_domain
    from pyxen.hv.domain import DomainSpec
    if native.fast() is None:
        pytest.skip(f"native library not available: {native.why_not()}")
    d = create_domain(DomainSpec(name="fp", memory_mib=16, kernel=str(guest / "hello"), domid=31),
                      start=False)
    yield d
    d.destroy()
    d.close()


def _self(d: Domain) -> native.PxcSelf:
    m = d.machine
    ram = atomic.address_of(m.ram)
    return native.PxcSelf(ram=ram, nr_pages=d.nr_pages, mfn_base=M.MFN_BASE,
                          types=ram + m.xenheap_offset(m.xh.types), nr_types=m.max_pages,
                          domid=d.domid)


def test_c_page_walk_matches_the_reference(dom: Domain) -> None:
    lib = native.fast()
    assert lib is not None
    me = _self(dom)
    l4 = dom.vcpus[0].current_l4
    ram = atomic.address_of(dom.machine.ram)
    pages = (ctypes.c_void_p * 1)()
    pfns = (ctypes.c_uint64 * 5)()
    rng = random.Random(7)
    vas = [KVA + p * 4096 + rng.randrange(4096) for p in rng.sample(range(4096), 200)]
    vas += [0, 4096, 0x00007FFFFFFFF000, 0x0000800000000000, 0xFFFF800000000000,
            M.HYPERVISOR_RANGE[0], KVA - 4096, 0xFFFFFFFFFFFFF000]
    seen_ok = seen_fault = 0
    for va in vas:
        for write in (0, 1):
            ref = dom.ft.translate(l4, va, bool(write))
            r = lib.pxc_walk(ctypes.addressof(me), l4, va, 1, write, ctypes.addressof(pages),
                             ctypes.addressof(pfns))
            if r == 0:
                seen_ok += 1
                assert ref is not None, hex(va)
                assert pages[0] == ram + (ref & ~0xFFF) - (M.MFN_BASE << 12), hex(va)
                assert pfns[4] == (ref >> 12) - M.MFN_BASE
            else:  # C gave up: the reference faults too, or decides on a frame C leaves to it
                seen_fault += 1
                assert ref is None or not 0 <= (ref >> 12) - M.MFN_BASE < dom.nr_pages, hex(va)
    assert seen_ok and seen_fault


def test_send_in_c_writes_the_registered_eventfd_only(dom: Domain) -> None:
    hub = NativeEventHub(dom)
    v = dom.vcpus[0]
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        arg = KVA + 300 * 4096 + 8
        struct.pack_into("<I", dom.machine.ram, 300 * 4096 + 8, 5)
        assert not hub.send(v, arg)  # nothing registered for port 5: Python's
        hub.set_out(5, fd)
        assert hub.send(v, arg)
        assert os.eventfd_read(fd) == 1
        assert not hub.send(v, KVA + 301 * 4096 - 2)  # the argument crosses a page
        assert not hub.send(v, 0x1000)  # not mapped: Python answers -EFAULT
        struct.pack_into("<I", dom.machine.ram, 300 * 4096 + 8, 6)
        assert not hub.send(v, arg)  # another port
        hub.set_out(5, -1)
        struct.pack_into("<I", dom.machine.ram, 300 * 4096 + 8, 5)
        assert not hub.send(v, arg)  # forgotten
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)
    finally:
        os.close(fd)
        native.fast().pxe_free(hub.h)  # type: ignore[union-attr]


def test_copy_with_its_ops_in_a_given_back_frame_takes_the_python_path(dom: Domain) -> None:
    """The C walk does not know the frames the guest gave back: a batch whose
    op array is in one goes to the reference, which faults (-EFAULT)."""
    ops_pfn = 220
    op = G.COPY.pack(M.MFN_BASE + 250, abi.DOMID_SELF, 0, M.MFN_BASE + 251, abi.DOMID_SELF, 0, 64, 0, 0x5A5A)
    dom.machine.ram[ops_pfn * 4096:ops_pfn * 4096 + 40] = op
    assert dom.gnttab.copy_batch(dom.vcpus[0], KVA + ops_pfn * 4096, 1) == 0
    assert struct.unpack_from("<h", dom.machine.ram, ops_pfn * 4096 + 36)[0] == G.GNTST_okay
    dom.free_pfns.add(ops_pfn)
    try:
        with pytest.raises(XenError) as e:
            dom.gnttab.copy_batch(dom.vcpus[0], KVA + ops_pfn * 4096, 1)
        assert e.value.errno == abi.EFAULT
    finally:
        dom.free_pfns.discard(ops_pfn)


def test_pingpong_with_guests_polling(host) -> None:  # noqa: ANN001
    a = host.create(ROOT / "examples/pingpong-a.cfg", ['extra="role=a rounds=300 wait=poll"'])
    sa = host.console_socket(a)
    b = host.create(ROOT / "examples/pingpong-b.cfg", [f'extra="role=b peer={a} rounds=300 wait=poll"'])
    sb = host.console_socket(b)
    out_b = read_until(sb, rb"pingpong: done rounds=300 rtt_ns=\d+", timeout=30)
    out_a = read_until(sa, rb"pingpong: done rounds=300", timeout=30)
    assert b"FAIL" not in out_a + out_b
    assert re.search(rb"pingpong: role=b peer=%d connected port=\d+ gref=\d+" % a, out_b), out_b
    for s in (sa, sb):
        s.close()


def test_a_refusal_stands_until_the_guest_hears_news(guest: Path) -> None:
    """A granter's process that refused us its memory is not asked again for
    ops sent back to back, but is asked again at once after our guest got an
    event (the news that a grant exists comes that way): no timed hold."""
    from pyxen.domctl import create_domain
    from pyxen.hv.domain import DomainSpec
    a = create_domain(DomainSpec(name="gA", memory_mib=16, kernel=str(guest / "hello"), domid=41),
                      start=False)
    b = create_domain(DomainSpec(name="gB", memory_mib=16, kernel=str(guest / "hello"), domid=42),
                      start=False)
    real = b.directory
    try:
        asks: list[int] = []
        refuse = [True]

        class Refusing:
            def peer(self, domid: int, requester: int = -1) -> object:
                asks.append(domid)
                if refuse[0]:
                    raise XenError(abi.EPERM, f"domain {domid} granted {requester} nothing")
                return real.peer(domid, requester)

            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

        b.directory = Refusing()  # type: ignore[assignment]
        for _ in range(5):  # back to back: asked once
            with pytest.raises(XenError):
                b.gnttab._find_peer(a.domid)
        assert asks == [a.domid]
        refuse[0] = False  # A's guest grants us something now...
        with pytest.raises(XenError):
            b.gnttab._find_peer(a.domid)  # ...but our guest has not heard of it
        assert asks == [a.domid]
        b.vcpus[0].stats["events"] += 1  # an event reached our guest (as deliver_event counts)
        assert b.gnttab._find_peer(a.domid).domid == a.domid
        assert asks == [a.domid, a.domid]
    finally:
        b.directory = real
        for d in (b, a):
            d.destroy()
            d.close()


def test_copy_whose_ops_change_under_it_matches_the_reference(
        pair: tuple[Domain, Domain], monkeypatch: pytest.MonkeyPatch) -> None:
    """Op 0 copies over op 1, which then names a granter the native scan never
    saw: C stops there and Python does the rest, so statuses and memory are
    those of the reference (op by op, each op read when it is done, as Xen)."""
    from tests.e2e.test_grant_copy_native import OPS_PFN, _run, _snapshot, _world
    a, b = pair
    _world(a, b)
    S, SELF = G.GNTCOPY_source_gref, abi.DOMID_SELF
    crafted = G.COPY.pack(8, 999, 0, M.MFN_BASE + 251, SELF, 0, 64, S, 0x5A5A)
    b.machine.ram[250 * 4096:250 * 4096 + 40] = crafted
    ops = [G.COPY.pack(M.MFN_BASE + 250, SELF, 0, M.MFN_BASE + OPS_PFN, SELF, 40, 40, 0, 0x5A5A),
           G.COPY.pack(8, a.domid, 0, M.MFN_BASE + 251, SELF, 0, 64, S, 0x5A5A),
           G.COPY.pack(9, a.domid, 0, M.MFN_BASE + 252, SELF, 0, 64, S, 0x5A5A)]
    start = _snapshot(a, b)
    results = []
    for use_native in (True, False):
        a.machine.ram[:] = start[0]
        b.machine.ram[:] = start[1]
        _run(b, ops, 0, use_native, monkeypatch)
        ram = b.machine.ram
        results.append(([struct.unpack_from("<h", ram, OPS_PFN * 4096 + i * 40 + 36)[0]
                         for i in range(3)], _snapshot(a, b)))
    assert results[0][0] == [G.GNTST_okay, G.GNTST_bad_domain, G.GNTST_okay]
    assert results[0] == results[1]


def test_send_in_c_follows_the_port_state(dom: Domain) -> None:
    """The hub learns a port's outbound eventfd after a send in Python on an
    interdomain channel to another process, and forgets it whenever the port
    changes state: after the remote end closed, a send is Python's again and
    is dropped (the port is unbound), as on Xen."""
    import threading
    hub = NativeEventHub(dom)
    ev = dom.evtchn
    ev.hub = hub
    real = dom.directory
    in_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    out_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    class Links:  # the part of ProcessDirectory the hub reads
        lock = threading.Lock()
        links: dict[int, tuple[int, int]] = {}

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    try:
        port = ev.alloc_unbound(5)
        ev.accept_interdomain(port, 5, 7, lambda: os.eventfd_write(out_fd, 1))
        Links.links[port] = (in_fd, out_fd)
        dom.directory = Links()  # type: ignore[assignment]
        v = dom.vcpus[0]
        arg = KVA + 300 * 4096
        struct.pack_into("<I", dom.machine.ram, 300 * 4096, port)
        assert not ev.send_fast(v, arg)  # not learnt yet
        ev.send(port)  # Python's send: writes, and learns the fd
        assert os.eventfd_read(out_fd) == 1
        assert port in ev._out
        assert ev.send_fast(v, arg)  # now C's
        assert os.eventfd_read(out_fd) == 1
        ev.remote_closed(port, 5)  # unbound again
        assert port not in ev._out
        assert not ev.send_fast(v, arg)
        ev.send(port)  # dropped: nobody listening
        with pytest.raises(BlockingIOError):
            os.eventfd_read(out_fd)
    finally:
        dom.directory = real
        ev.hub = None
        native.fast().pxe_free(hub.h)  # type: ignore[union-attr]
        os.close(in_fd)
        os.close(out_fd)
