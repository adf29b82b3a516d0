"""The guest end of XenStore (the shared ring relay) under hostile guests:
random ring contents and indexes never raise, never overrun, and a guest
whose indexes are impossible is cut off with XENSTORE_ERROR_RINGIDX."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.backends import xsring as X
from pyxen.xenstore.wire import Op, encode


def make() -> tuple[X.XenstoreRing, socket.socket, memoryview, list[int]]:
    a, b = socket.socketpair()
    page = memoryview(bytearray(4096))
    notes: list[int] = []
    ring = X.XenstoreRing(page, a, lambda: notes.append(1))
    b.setblocking(False)
    return ring, b, page, notes


def produce(page: memoryview, data: bytes) -> None:
    prod = struct.unpack_from("<I", page, X.OFF_REQ_PROD)[0]
    for i, c in enumerate(data):
        page[X.OFF_REQ + (prod + i) % X.RING] = c
    struct.pack_into("<I", page, X.OFF_REQ_PROD, (prod + len(data)) & 0xFFFFFFFF)


def test_requests_flow_to_the_daemon_and_replies_back() -> None:
    ring, peer, page, notes = make()
    produce(page, b"hello")
    ring.on_guest_event()
    assert peer.recv(100) == b"hello"
    peer.sendall(b"x" * 1500)  # more than a ring's worth
    assert ring.on_daemon_data()
    cons, prod = struct.unpack_from("<II", page, X.OFF_RSP_CONS)
    assert prod - cons == X.RING and notes
    struct.pack_into("<I", page, X.OFF_RSP_CONS, prod)  # the guest read it all
    ring.on_guest_event()
    cons, prod = struct.unpack_from("<II", page, X.OFF_RSP_CONS)
    assert prod - cons == 1500 - X.RING


def test_impossible_indexes_cut_the_guest_off() -> None:
    ring, peer, page, _ = make()
    struct.pack_into("<II", page, X.OFF_REQ_CONS, 0, 5000)
    ring.on_guest_event()
    assert ring.broken
    assert struct.unpack_from("<I", page, X.OFF_ERROR)[0] == X.XENSTORE_ERROR_RINGIDX


def test_requests_stay_in_the_ring_while_replies_pile_up() -> None:
    ring, peer, page, _ = make()
    ring.to_guest += b"r" * (X.THROTTLE + 1)
    produce(page, b"more")
    ring.on_guest_event()
    assert struct.unpack_from("<I", page, X.OFF_REQ_CONS)[0] == 0  # not taken yet


def test_the_notifying_vcpu_delivers_the_reply_itself() -> None:
    """A request's reply that the daemon sends while the vCPU waits in
    `_await_reply` is in the ring, and the port raised once, when the guest's
    EVTCHNOP_send returns (no hop through the socket's owner)."""
    import threading
    ring, peer, page, notes = make()
    ring.reply_wait = 10.0     # a bound the echo below never comes near

    req = encode(Op.READ, b"domid\0", 7)

    def daemon() -> None:
        peer.setblocking(True)
        assert peer.recv(100) == req
        peer.sendall(b"reply")
    t = threading.Thread(target=daemon)
    t.start()
    produce(page, req)
    ring.on_guest_event()
    t.join()
    cons, prod = struct.unpack_from("<II", page, X.OFF_RSP_CONS)
    assert prod - cons == 5 and bytes(page[X.OFF_RSP:X.OFF_RSP + 5]) == b"reply"
    assert notes == [1]


def test_no_wait_without_a_whole_request_and_none_past_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A notification that only freed reply space does not wait, nor one that
    brought a request's header without its payload (Linux's xenbus notifies
    after each); a daemon that does not answer leaves the reply to the
    socket's owner (nothing in the ring)."""
    ring, peer, page, notes = make()
    waits: list[float] = []
    real = X.select.select

    def counting(r: list[object], w: list[object], x: list[object], t: float) -> object:
        waits.append(t)
        return real(r, w, x, 0)       # the daemon is silent: as if the bound passed
    monkeypatch.setattr(X.select, "select", counting)
    ring.on_guest_event()             # nothing in the ring: no request, no wait
    assert waits == []
    req = encode(Op.WRITE, b"data/k\0value", 9)
    produce(page, req[:16])           # the header alone
    ring.on_guest_event()
    assert waits == []
    produce(page, req[16:])           # its payload: now a whole request
    ring.on_guest_event()
    assert waits and not notes
    produce(page, encode(Op.READ, b"a\0", 10) + req[:20])  # one whole, one begun
    waits.clear()
    ring.on_guest_event()
    assert waits == []
    assert struct.unpack_from("<II", page, X.OFF_RSP_CONS) == (0, 0)
    peer.sendall(b"late")             # the owner's poll delivers it
    assert ring.on_daemon_data() and notes == [1]


U32 = st.integers(0, 2**32 - 1)


@settings(max_examples=200, deadline=None)
@given(st.tuples(U32, U32, U32, U32), st.binary(max_size=2048),
       st.lists(st.binary(max_size=3000), max_size=4))
def test_random_pages_and_replies_never_raise(idx: tuple[int, int, int, int], ring_bytes: bytes,
                                              replies: list[bytes]) -> None:
    ring, peer, page, _ = make()
    page[:len(ring_bytes)] = ring_bytes
    struct.pack_into("<IIII", page, X.OFF_REQ_CONS, *idx)
    ring.on_guest_event()
    for r in replies:
        try:
            peer.sendall(r)
        except BlockingIOError:
            break
        ring.on_daemon_data()
        ring.on_guest_event()
    cons, prod = struct.unpack_from("<II", page, X.OFF_RSP_CONS)
    if prod != idx[3]:  # the relay produced replies: never more than a ring's worth
        assert (prod - cons) & 0xFFFFFFFF <= X.RING
