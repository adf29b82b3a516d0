"""xenstored against a guest that floods it with watch events (issue 8, finding 3),
in-process: the work one commit costs, what one connection may queue, and
transports that never wait for a client that does not read.  No wall-clock
assertions: work is counted (watch matches, events queued, merged, dropped)."""

from __future__ import annotations

import contextlib
import socket
import struct
from pathlib import Path

import pytest

from pyxen.backends import xsring as X
from pyxen.xenstore import server as S
from pyxen.xenstore import wire
from pyxen.xenstore.server import Connection, Xenstored, XenstoreServer
from pyxen.xenstore.tree import Watch
from pyxen.xenstore.wire import Op, Parser, join

N_NODES, N_WATCHES = 400, 126           # the finding's commit


def flooder(x: Xenstored, domid: int = 5, watches: int = N_WATCHES) -> Connection:
    x.write(f"/local/domain/{domid}", "")
    x.set_perms(f"/local/domain/{domid}", [f"n{domid}"])
    g = x.introduce(domid, 1, 1)
    for i in range(watches):
        assert g.request(Op.WATCH, join("data", f"t{i}")).type == Op.WATCH
    g.take_output()
    return g


def commit_nodes(g: Connection, n: int, long: bool = False) -> wire.Message:
    """One transaction writing n nodes below data (spread over directories if
    long, so that no child list reaches the node-size quota)."""
    tx = int(g.request(Op.TRANSACTION_START, b"\0").payload.rstrip(b"\0"))
    for i in range(n):
        path = f"data/d{i // 40}/a-much-longer-node-name-{i}" if long else f"data/n{i}"
        r = g.request(Op.WRITE, join(path) + b"v", tx)
        assert r.type == Op.WRITE, r
    return g.request(Op.TRANSACTION_END, join("T"), tx)


def count_fires_for(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = Watch.fires_for

    def counting(self: Watch, change: object) -> bool:
        calls[0] += 1
        return real(self, change)  # type: ignore[arg-type]
    monkeypatch.setattr(Watch, "fires_for", counting)
    return calls


def test_commit_fan_out_is_linear_in_the_watches_that_fire(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attacks: the finding's commit (400 nodes, 126 watches on their parent) while
    the store holds 4000 watches elsewhere (dom0's and another guest's).  Before,
    every change walked every watch of every connection: 401 x 4126 tests, with a
    linear duplicate scan of the output queue for each of the 50 400 events (28 s
    under the lock).  Now a change looks up its own path and ancestors only."""
    x = Xenstored()
    g = flooder(x)
    dom0 = x.connect()
    for i in range(3000):
        dom0.request(Op.WATCH, join(f"/elsewhere/w{i}", "t"))
    other = flooder(x, 6, watches=0)
    for i in range(1000):
        other.request(Op.WATCH, join(f"data/o{i}", "t"))
    dom0.take_output()
    other.take_output()
    calls = count_fires_for(monkeypatch)
    x.stats.clear()
    assert commit_nodes(g, N_NODES).payload == b"OK\0"
    events = N_NODES * N_WATCHES
    # each watch is tested at most once per change that fires it (plain subtree
    # writes to watches without a depth need no test): not once per watch in the store
    assert calls[0] <= events
    assert x.stats["watches_matched"] == events
    msgs = Parser().feed(g.take_output())
    assert len([m for m in msgs if m.type == Op.WATCH_EVENT]) == events
    assert not dom0.has_output and not other.has_output


def test_repeated_commit_merges_with_queued_events_in_constant_work() -> None:
    """Attacks: the same commit again while the first one's events are still queued
    for the flooder; every event is a duplicate of a queued one and is merged
    (send_event's check), through a set rather than a scan of the queue."""
    x = Xenstored()
    g = flooder(x)
    commit_nodes(g, N_NODES)
    queued = g.queued_bytes
    x.stats.clear()
    assert commit_nodes(g, N_NODES).payload == b"OK\0"
    assert x.stats["events_merged"] == N_NODES * N_WATCHES
    assert g.queued_bytes == queued


def test_a_guest_queue_stops_at_its_memory_quota_and_the_guest_is_not_read() -> None:
    """Attacks: a commit of 900 nodes (with longer names) x 126 watches would queue
    about 6 MiB of events for the flooder.  Its queue stops below the memory quota
    (2.5 MiB), the rest is dropped and counted, and while its output is at quota
    or its requests are outstanding, can_read() keeps its transport from feeding
    it more requests (xenstored's domain_can_read) until it has read its events."""
    x = Xenstored()
    g = flooder(x)
    quota = x.store.quotas.memory
    assert commit_nodes(g, 900, long=True).payload == b"OK\0"
    assert g.queued_bytes < quota
    assert g.events_dropped > 0 and x.stats["events_dropped"] == g.events_dropped
    assert not g.can_read()
    g.take_output(64 << 10)
    assert not g.can_read()               # still outstanding: the commit's events are queued
    g.take_output()
    assert g.can_read() and g.outstanding == 0
    # a privileged connection is bounded too (xenstored has no bound for dom0)
    d0 = x.connect()
    assert d0.output_limit() == S.PRIV_OUTPUT_MAX + 1


def test_outstanding_counts_requests_whose_own_events_are_queued() -> None:
    """Xen's `outstanding` quota (20): a request stays outstanding while its reply
    or the watch events it fired for the requester are queued; at 20 the domain
    is not read from."""
    x = Xenstored()
    g = flooder(x, watches=1)
    for i in range(19):
        g.feed(wire.encode(Op.WRITE, join(f"data/k{i}") + b"v", i + 1), limit=0)
    assert g.outstanding == 19 and g.can_read()
    g.feed(wire.encode(Op.WRITE, join("data/k19") + b"v", 20), limit=0)
    assert g.outstanding == 20 and not g.can_read()
    msgs = Parser().feed(g.take_output())
    assert len(msgs) == 40 and g.outstanding == 0 and g.can_read()


class _Sock:
    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(str(path))
        self.p = Parser()
        self.msgs: list[wire.Message] = []

    def call(self, op: int, payload: bytes, req_id: int) -> wire.Message:
        self.s.sendall(wire.encode(op, payload, req_id))
        while True:
            for m in self.msgs:
                if m.req_id == req_id and m.type != Op.WATCH_EVENT:
                    self.msgs.remove(m)
                    return m
            self.msgs = [m for m in self.msgs if m.type != Op.WATCH_EVENT]
            data = self.s.recv(65536)
            assert data
            self.msgs += self.p.feed(data)


def test_a_client_that_stops_reading_stalls_nobody(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Attacks: a dom0 socket client watches / and never reads, while another one
    writes 4000 nodes with long names (each firing an event for it: 500 KiB) and a third keeps reading.
    Everyone else is answered; what waits for the stuck client stays bounded
    (its socket, 64 KiB in the server, and PRIV_OUTPUT_MAX in its queue, past
    which its events are dropped) instead of growing with every write."""
    monkeypatch.setattr(S, "PRIV_OUTPUT_MAX", 64 << 10)
    name = "/flood/" + "n" * 100 + "-{}"
    sock = tmp_path / "xs.sock"
    with XenstoreServer(sock, None, flush_delay=0) as srv:
        stuck = socket.socket(socket.AF_UNIX)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(str(sock))
        stuck.sendall(wire.encode(Op.WATCH, join("/", "stuck"), 1))
        writer, reader = _Sock(sock), _Sock(sock)
        for i in range(4000):
            assert writer.call(Op.WRITE, join(name.format(i)) + b"x" * 40, i).type == Op.WRITE
            if i % 500 == 0:
                assert reader.call(Op.READ, join(name.format(i)), i).payload == b"x" * 40
        conns = [c for c in srv.xsd.connections if any(w.token == "stuck" for w in c.watches)]
        assert len(conns) == 1
        assert conns[0].queued_bytes <= S.PRIV_OUTPUT_MAX
        assert conns[0].events_dropped > 0
        for s in (stuck, writer.s, reader.s):
            s.close()


def test_ring_relay_holds_back_instead_of_failing_a_slow_guest() -> None:
    """Attacks: a guest that does not consume its response ring while xenstored has
    megabytes of events for it.  Before, the relay buffered up to 1 MiB and then
    failed the ring (XENSTORE_ERROR_COMM).  Now it stops reading the daemon's socket
    at THROTTLE (the events wait in xenstored's queue, under the guest's quota),
    and takes no more requests from the guest's ring while the daemon holds its
    requests back."""
    a, b = socket.socketpair()
    b.setblocking(False)
    page = memoryview(bytearray(4096))
    ring = X.XenstoreRing(page, a, lambda: None)
    sent = 0
    while ring.wants_daemon_data and sent < 4 << 20:
        b.sendall(b"e" * 65536)
        sent += 65536
        assert ring.on_daemon_data()
    assert not ring.wants_daemon_data and not ring.broken
    assert len(ring.to_guest) < 2 * X.THROTTLE
    assert struct.unpack_from("<I", page, X.OFF_ERROR)[0] == X.XENSTORE_ERROR_NONE
    # the guest reads its ring: the relay wants more again
    while not ring.wants_daemon_data:
        prod = struct.unpack_from("<I", page, X.OFF_RSP_PROD)[0]
        struct.pack_into("<I", page, X.OFF_RSP_CONS, prod)
        ring.on_guest_event()
    assert not ring.broken
    # requests stay in the guest's ring while THROTTLE bytes wait for the daemon
    ring.to_daemon += b"q" * X.THROTTLE
    prod = struct.unpack_from("<I", page, X.OFF_REQ_PROD)[0]
    page[X.OFF_REQ:X.OFF_REQ + 4] = b"more"
    struct.pack_into("<I", page, X.OFF_REQ_PROD, prod + 4)
    a.setblocking(False)
    ring.lock.acquire()
    ring._take_requests()
    ring.lock.release()
    assert struct.unpack_from("<I", page, X.OFF_REQ_CONS)[0] == 0
    a.close()
    b.close()


def test_the_first_event_of_a_watch_merges_like_any_other() -> None:
    """The set that replaced the scan of the queue also holds a watch's first
    event: a change firing the same path and token while it is queued merges."""
    x = Xenstored()
    c = x.connect()
    c.request(Op.WATCH, join("/dup", "t"))
    x.write("/dup", "1")
    x.write("/dup", "2")
    assert [m.strings() for m in Parser().feed(c.take_output())] == [["/dup", "t"]]
    x.write("/dup", "3")
    assert [m.strings() for m in Parser().feed(c.take_output())] == [["/dup", "t"]]


def test_watches_leave_the_index_with_their_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client with 20 000 watches goes away (RESET_WATCHES, then close): its
    watches leave the index without a quadratic walk (no Watch comparisons), and
    a change under them afterwards tests no watch."""
    x = Xenstored()
    c = x.connect()
    for i in range(20000):
        c.request(Op.WATCH, join(f"/w/{i}", "t"))
    c.take_output()
    compared = [0]
    real_eq = Watch.__eq__

    def counting_eq(self: Watch, other: object) -> bool:
        compared[0] += 1
        return real_eq(self, other)
    monkeypatch.setattr(Watch, "__eq__", counting_eq)
    c.request(Op.RESET_WATCHES, b"")
    assert compared[0] == 0 and not c.watches
    for i in range(100):
        c.request(Op.WATCH, join(f"/w/{i}", "t"))
    c.close()
    calls = count_fires_for(monkeypatch)
    x.stats.clear()
    x.write("/w/5/x", "1")
    assert calls[0] == 0 and x.stats["watches_matched"] == 0 and not x._watch_index


def test_ring_relay_carries_on_from_the_socket_when_the_guest_reads() -> None:
    """What the relay left in the daemon's socket while the guest was behind comes
    out as the guest reads its ring, from its notifications alone, in order."""
    a, b = socket.socketpair()
    b.setblocking(False)
    page = memoryview(bytearray(4096))
    ring = X.XenstoreRing(page, a, lambda: None)
    sent = bytes(i % 251 for i in range(600_000))
    rest = sent[b.send(sent):]
    assert ring.on_daemon_data()
    assert ring.held and not ring.wants_daemon_data      # the owner stops polling here
    got = bytearray()
    for _ in range(100_000):
        if len(got) == len(sent):
            break
        if rest:
            with contextlib.suppress(BlockingIOError):
                rest = rest[b.send(rest):]
        cons, prod = struct.unpack_from("<II", page, X.OFF_RSP_CONS)
        for i in range(cons, prod):
            got.append(page[X.OFF_RSP + i % X.RING])
        struct.pack_into("<I", page, X.OFF_RSP_CONS, prod)
        ring.on_guest_event()
        if not ring.held and not rest and not ring.to_guest and prod == cons:
            assert ring.on_daemon_data()   # the owner polls again once it may
    assert bytes(got) == sent and not ring.broken
    a.close()
    b.close()
