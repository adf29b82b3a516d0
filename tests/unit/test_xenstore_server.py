"""The xenstored socket server in a thread, cross-thread events, and state across restarts."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from pyxen.xenstore import wire
from pyxen.xenstore.server import Xenstored, XenstoreServer
from pyxen.xenstore.tree import guest
from pyxen.xenstore.wire import Message, Op, Parser, join


class SockClient:
    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(5)
        self.s.connect(str(path))
        self.p = Parser()
        self.msgs: list[Message] = []

    def send(self, op: int, payload: bytes, req_id: int = 1, tx: int = 0) -> None:
        self.s.sendall(wire.encode(op, payload, req_id, tx))

    def next(self) -> Message:
        while not self.msgs:
            data = self.s.recv(65536)
            assert data, "server closed the connection"
            self.msgs += self.p.feed(data)
        return self.msgs.pop(0)

    def closed(self) -> bool:
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.s.close()


def test_socket_server_requests_events_and_kill(tmp_path: Path) -> None:
    sock = tmp_path / "xs.sock"
    with XenstoreServer(sock, tmp_path / "state.json", flush_delay=0) as srv:
        a, b = SockClient(sock), SockClient(sock)
        a.send(Op.WATCH, join("/x", "tok"))
        assert a.next().type == Op.WATCH and a.next().strings() == ["/x", "tok"]
        b.send(Op.WRITE, join("/x/y") + b"1", req_id=7)
        r = b.next()
        assert (r.type, r.req_id) == (Op.WRITE, 7)
        assert a.next().strings() == ["/x/y", "tok"]
        srv.xsd.write("/x/z", "from another thread")          # wakes the server loop
        assert a.next().strings() == ["/x/z", "tok"]
        # several requests in one send, replies in order
        b.s.sendall(b"".join(wire.encode(Op.READ, join(p), i) for i, p in enumerate(["/x/y", "/nope"])))
        r0, r1 = b.next(), b.next()
        assert (r0.req_id, r0.payload, r1.req_id, r1.payload) == (0, b"1", 1, b"ENOENT\0")
        b.s.sendall(wire.HEADER.pack(Op.READ, 1, 0, 5000))       # oversized: dropped
        assert b.closed()
        a.send(Op.READ, join("/x/z"))
        assert a.next().payload == b"from another thread"   # others are still served
        a.close()
        b.close()
    assert not sock.exists()
    assert Xenstored(tmp_path / "state.json").read("/x/z") == b"from another thread"


def test_domains_and_their_watches_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    x = Xenstored(state)
    x.mkdir("/local/domain/4")
    x.set_perms("/local/domain/4", ["n4"])
    g = x.introduce(4, gfn=99, port=3)
    g.request(Op.WATCH, join("data", "t"))
    x.store.quotas.nodes = 50
    x.dirty = True
    x.close()
    y = Xenstored(state)
    assert y.is_introduced(4) and y.domains[4].gfn == 99 and y.domains[4].port == 3
    conn = y.domains[4].conn
    assert conn is not None and conn.caller == guest(4)
    y.write("/local/domain/4/data/k", "v")
    assert Parser().feed(conn.take_output())[0].strings() == ["data/k", "t"]
    assert y.store.quotas.nodes == 50
    assert y.read("/local/domain/4/data/k", guest(4)) == b"v"


def test_client_pipeline_and_write_many(tmp_path: Path) -> None:
    """XsClient.pipeline: many requests on the wire at once, the replies (or
    each one's error) in order; write_many raises the first error after all
    were answered, and a watcher of the last path sees the others written."""
    from pyxen.xenstore.client import XsClient
    from pyxen.xenstore.tree import XsError
    sock = tmp_path / "xs.sock"
    with XenstoreServer(sock, tmp_path / "state.json", flush_delay=0):
        c = XsClient(str(sock))
        try:
            c.write_many({"/p/a": "1", "/p/b": "2", "/p/state": "2"})
            assert [c.read(f"/p/{k}") for k in ("a", "b", "state")] == ["1", "2", "2"]
            res = c.pipeline([(Op.READ, join("/p/a")), (Op.READ, join("/nope")), (Op.READ, join("/p/b"))])
            assert res[0] == b"1" and isinstance(res[1], XsError) and res[1].name == "ENOENT"
            assert res[2] == b"2"
            try:
                c.write_many({"/p/c": "3", "": "bad", "/p/d": "4"})
            except XsError as e:
                assert e.name == "EINVAL"
            else:
                raise AssertionError("an invalid path was written")
            assert c.read("/p/d") == "4"        # the ones after the bad one were still sent
        finally:
            c.close()


def test_client_inline_watch_callbacks(tmp_path: Path) -> None:
    """XsClient inline callbacks: run by the reader thread, their own requests
    answered there (no dispatcher, no thread waiting for the reader); one that
    declines (False) goes to the dispatcher's callback, and while that one
    runs, later events of any watch wait behind it (their order kept)."""
    import queue as _queue
    import threading

    from pyxen.xenstore.client import XsClient
    sock = tmp_path / "xs.sock"
    with XenstoreServer(sock, tmp_path / "state.json", flush_delay=0):
        c = XsClient(str(sock))
        try:
            seen: _queue.Queue[tuple[str, str, str]] = _queue.Queue()
            decline = threading.Event()
            release = threading.Event()

            def inline(path: str, token: str) -> bool:
                if decline.is_set():
                    return False
                # requests from the reader thread itself: answered by it
                v = c.read_many(["/w/state", "/w/key"])
                c.write("/w/seen", v["/w/state"] or "")
                seen.put(("inline", threading.current_thread().name, v["/w/key"] or ""))
                return True

            def slow(path: str, token: str) -> None:
                seen.put(("dispatcher", threading.current_thread().name, c.read("/w/state")))
                release.wait(10)

            c.write_many({"/w/key": "k0", "/w/state": "1"})
            c.watch("/w/state", "tok", slow, inline=inline)
            first = seen.get(timeout=10)  # a new watch fires once
            assert first == ("inline", "xs-client", "k0")
            c.write_many({"/w/key": "k1", "/w/state": "4"})
            assert seen.get(timeout=10) == ("inline", "xs-client", "k1")
            assert c.read("/w/seen") == "4"
            decline.set()
            c.write("/w/state", "5")
            assert seen.get(timeout=10) == ("dispatcher", "xs-watches", "5")
            decline.clear()
            c.write("/w/state", "6")  # the dispatcher is still busy: this one queues behind
            assert c.read("/w/state") == "6"  # (the reader is not blocked meanwhile)
            assert seen.empty()
            release.set()
            assert seen.get(timeout=10)[0] == "dispatcher"
            for _ in range(1000):  # the dispatcher done with it
                if not c.queued:
                    break
                time.sleep(0.01)
            c.write("/w/state", "7")  # the dispatcher idle again: inline once more
            assert seen.get(timeout=10)[:2] == ("inline", "xs-client")
            c.unwatch("/w/state", "tok")
            assert "tok" not in c.inline and "tok" not in c.watches
        finally:
            c.close()
