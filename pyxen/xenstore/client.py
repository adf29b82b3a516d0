"""A XenStore client for the host side (toolstack and backends), over the
daemon's unix socket, speaking xs_wire like libxenstore.

Requests are synchronous (one reply per request, matched by req_id); watch
events go to callbacks on a dispatcher thread of their own, so a callback may
itself make requests (the reader thread must stay free to read the replies).  Errors come back as
:class:`XsError` carrying xenstored's error name ("ENOENT", "EACCES", ...).

A watch may also have an *inline* callback, run by the reader thread itself
as soon as the event is parsed; its requests are answered by that same thread
reading the socket (:meth:`XsClient._pump`).  That saves two thread wake-ups
per event (reader to dispatcher, and back for each reply), which a loaded
host pays in GIL hand-overs: a migrated guest's netback connects on such an
event, with the network down.  An inline callback must not wait for anything
another client thread holds while it waits for the store (it would wait for
a reply only this thread can read): it returns False instead, and the event
goes to the dispatcher, as do events while earlier ones wait there (the order
of events is kept).
"""

from __future__ import annotations

import functools
import itertools
import queue
import select
import socket
import threading
import time
from collections.abc import Callable

from .tree import XsError
from .wire import HEADER, Op, Parser, encode, join

WatchCallback = Callable[[str, str], None]  # (path, token)
InlineCallback = Callable[[str, str], bool]  # (path, token) -> handled (False: to the dispatcher)


class XsClient:
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.sock.settimeout(None)
        self.timeout = timeout
        self.ids = itertools.count(1)
        self.lock = threading.Lock()  # one request on the wire at a time
        self.cond = threading.Condition()
        self.replies: dict[int, tuple[int, bytes]] = {}
        self.watches: dict[str, WatchCallback] = {}
        self.inline: dict[str, InlineCallback] = {}  # run by the reader thread (module docstring)
        self.closed = False
        self.events: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self.queued = 0  # events put for the dispatcher and not yet done (reader and dispatcher)
        self.parser = Parser()  # the reader thread's only
        self.reader = threading.Thread(target=self._read_loop, name="xs-client", daemon=True)
        self.reader.start()
        self.dispatcher = threading.Thread(target=self._dispatch_loop, name="xs-watches", daemon=True)
        self.dispatcher.start()

    def _dispatch_loop(self) -> None:
        while True:
            ev = self.events.get()
            if ev is None:
                return
            path, token = ev
            cb = self.watches.get(token)
            if cb is not None:
                try:
                    cb(path, token)
                except Exception:  # noqa: BLE001 - a callback must not stop the others
                    pass
            with self.cond:
                self.queued -= 1

    def _read_loop(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            self._feed(data, True)
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.events.put(None)

    def _feed(self, data: bytes, inline: bool) -> None:
        """Replies to their waiters, watch events to their callbacks (reader
        thread).  ``inline``: an inline callback may run here (not while one
        runs already: its events wait for the dispatcher)."""
        for m in self.parser.feed(data):
            if m.type != Op.WATCH_EVENT:
                with self.cond:
                    self.replies[m.req_id] = (m.type, m.payload)
                    self.cond.notify_all()
                continue
            parts = m.payload.split(b"\0")
            if len(parts) < 2:
                continue
            ev = (parts[0].decode(errors="replace"), parts[1].decode(errors="replace"))
            cb = self.inline.get(ev[1]) if inline else None
            with self.cond:
                if self.queued:
                    cb = None  # earlier events still wait for the dispatcher: after them
            if cb is not None:
                try:
                    if cb(*ev):
                        continue
                except Exception:  # noqa: BLE001 - as the dispatcher: the reader must go on
                    continue
            with self.cond:
                self.queued += 1
            self.events.put(ev)

    def _pump(self, rids: list[int]) -> None:
        """The reader thread, in an inline callback, waiting for replies: it
        reads the socket itself (nobody else does meanwhile)."""
        deadline = time.monotonic() + self.timeout
        while True:
            with self.cond:
                if self.closed or all(r in self.replies for r in rids):
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                return  # (pipeline says EIO)
            try:
                r, _, _ = select.select([self.sock], [], [], left)
                data = self.sock.recv(65536) if r else None
            except (OSError, ValueError):
                data = b""
            if data is None:
                continue
            if not data:  # closed: the read loop finds it so too, and ends
                with self.cond:
                    self.closed = True
                    self.cond.notify_all()
                return
            self._feed(data, False)

    def request(self, op: int, payload: bytes, tx: int = 0) -> bytes:
        r = self.pipeline([(op, payload)], tx)[0]
        if isinstance(r, XsError):
            raise r
        return r

    def pipeline(self, reqs: list[tuple[int, bytes]], tx: int = 0) -> list[bytes | XsError]:
        """Several requests sent at once, then their replies (or each one's
        XsError), in order.  xs_wire lets a client have many requests
        outstanding (each has its req_id) and xenstored answers a
        connection's requests in the order they came, so a backend that
        writes a dozen nodes pays one round trip instead of a dozen (what
        libxenstore's users get from a transaction's batching, without the
        transaction's two extra round trips).  Raises XsError("EIO") only
        if xenstored does not answer at all."""
        rids = [next(self.ids) & 0xFFFFFFFF for _ in reqs]
        data = b"".join(encode(op, payload, rid, tx) for (op, payload), rid in zip(reqs, rids, strict=True))
        with self.lock:
            self.sock.sendall(data)
        wait = self.timeout
        if threading.current_thread() is self.reader:
            self._pump(rids)  # an inline callback's requests: nobody else reads the replies
            wait = 0.0
        out: list[bytes | XsError] = []
        with self.cond:
            for rid in rids:
                if not self.cond.wait_for(functools.partial(self._answered, rid), wait):
                    raise XsError("EIO", "xenstored did not answer")
                if rid not in self.replies:
                    raise XsError("EIO", "connection to xenstored closed")
                typ, payload = self.replies.pop(rid)
                out.append(XsError(payload.rstrip(b"\0").decode() or "EIO", "") if typ == Op.ERROR
                           else payload)
        return out

    def _answered(self, rid: int) -> bool:
        return rid in self.replies or self.closed

    def write_many(self, values: dict[str, str], tx: int = 0,
                   watch: tuple[str, str, WatchCallback] | None = None,
                   inline: InlineCallback | None = None) -> None:
        """Write each path's value, pipelined (:meth:`pipeline`), in the
        dict's order (a watcher of the last one sees the others written),
        and then set ``watch`` (path, token, callback; ``inline``: as
        :meth:`watch`) in the same round trip; the first error is raised
        once all have been answered."""
        reqs = [(int(Op.WRITE), p.encode() + b"\0" + v.encode()) for p, v in values.items()]
        if watch is not None:
            self._set_callbacks(watch[1], watch[2], inline)
            reqs.append((int(Op.WATCH), join(watch[0], watch[1])))
        res = self.pipeline(reqs, tx)
        for r in res:
            if isinstance(r, XsError):
                raise r

    def read_many(self, paths: list[str], tx: int = 0) -> dict[str, str | None]:
        """Each path's value, or None where the read failed (absent: ENOENT,
        or EACCES...), as :meth:`try_read` would answer each, but in one
        pipelined round trip (:meth:`pipeline`); a path given twice is read
        once.  A store that does not answer at all makes every value None,
        as it would make each try_read's."""
        uniq = list(dict.fromkeys(paths))
        try:
            res = self.pipeline([(int(Op.READ), join(p)) for p in uniq], tx)
        except XsError:
            return dict.fromkeys(uniq)
        return {p: (None if isinstance(r, XsError) else r.decode(errors="replace"))
                for p, r in zip(uniq, res, strict=True)}

    # ------------------------------------------------------------ operations
    def read(self, path: str, tx: int = 0) -> str:
        return self.request(Op.READ, join(path), tx).decode(errors="replace")

    def try_read(self, path: str, default: str | None = None) -> str | None:
        try:
            return self.read(path)
        except XsError:
            return default

    def write(self, path: str, value: str | bytes, tx: int = 0) -> None:
        v = value.encode() if isinstance(value, str) else value
        self.request(Op.WRITE, path.encode() + b"\0" + v, tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.request(Op.MKDIR, join(path), tx)

    def rm(self, path: str, tx: int = 0) -> None:
        self.request(Op.RM, join(path), tx)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        data = self.request(Op.DIRECTORY, join(path), tx)
        return [x.decode() for x in data.split(b"\0") if x]

    def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        self.request(Op.SET_PERMS, join(path, *perms), tx)

    def _set_callbacks(self, token: str, cb: WatchCallback, inline: InlineCallback | None) -> None:
        self.watches[token] = cb
        if inline is not None:
            self.inline[token] = inline
        else:
            self.inline.pop(token, None)

    def watch(self, path: str, token: str, cb: WatchCallback, inline: InlineCallback | None = None) -> None:
        """Watch ``path``: ``cb`` runs on the dispatcher thread; ``inline``, if
        given, first tries on the reader thread (module docstring)."""
        self._set_callbacks(token, cb, inline)
        self.request(Op.WATCH, join(path, token))

    def unwatch(self, path: str, token: str) -> None:
        self.watches.pop(token, None)
        self.inline.pop(token, None)
        try:
            self.request(Op.UNWATCH, join(path, token))
        except XsError:
            pass

    def transaction_start(self) -> int:
        return int(self.request(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        self.request(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


__all__ = ["XsClient", "XsError", "HEADER"]
