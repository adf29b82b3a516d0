"""The XenStore daemon: request handlers, connections, domains, and a unix-socket server.

Layers, from the wire in:

* `Connection.feed(bytes) -> bytes` is the whole protocol for one client:
  it frames the input (wire.Parser), runs each request through `process`
  and returns the bytes to send back (replies, and watch events fired by any
  client).  It never raises on input.  A transport only moves bytes: the
  unix socket below, or a guest's shared ring (struct
  xenstore_domain_interface) driven by another module.  Events that other
  clients' requests fire for this connection are queued; the transport
  collects them with `take_output()` after `on_output` tells it to.
* `process` looks the type up in `HANDLERS` -- one `do_<op>` function per
  message type, as in xenstored -- checks privilege and the transaction id,
  and turns an `XsError` into an XS_ERROR reply carrying the error's name.
* `Xenstored` owns the `Store` (tree.py), the connections and the
  introduced domains.  The toolstack calls `introduce`/`release` directly or
  sends INTRODUCE/RELEASE over the socket; `on_introduce`/`on_release` tell
  a ring transport to attach or detach.
* `XenstoreServer` serves the unix socket with one selector thread; every
  socket client is dom0 and privileged, as xenstored's socket clients are.

Watches are indexed by path (`Xenstored._watch_index`): a change looks up its
node and ancestors, so firing costs what fires, not the number of watches.
Each connection's output queue is bounded (its memory quota, PRIV_OUTPUT_MAX
for dom0), merges duplicate events through a set, and tells its transport
when to stop reading it (`can_read`: xenstored's outstanding and memory
quotas).  Transports take output in chunks and never block on a client.

Locking: `Xenstored.lock` (re-entrant) serialises everything that touches
the store, the connections or the domains.  `Connection.feed`, the
`Xenstored` API and the handlers take it; tree.py and wire.py take none.

Persistence: the tree, the domains and their connections' watches are
saved to the state file (JSON, atomically) after changes, at most
`flush_delay` seconds late, and on `close()`; they are loaded at start.
Socket clients and transactions do not survive a restart.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pyxen.xenstore import wire
from pyxen.xenstore.tree import (
    DOM0,
    DOMID_SELF,
    XENSTORE_PAYLOAD_MAX,
    Caller,
    Change,
    Match,
    Quotas,
    Store,
    Transaction,
    Watch,
    XsError,
    format_perms,
    load_json,
    parse_perms,
    save_json,
    watch_permitted,
)
from pyxen.xenstore.wire import Message, Op

log = logging.getLogger("pyxen.xenstore")

SERVER_FEATURES = (wire.XENSTORE_SERVER_FEATURE_ERROR | wire.XENSTORE_SERVER_FEATURE_WATCHDEPTH
                   | wire.XENSTORE_SERVER_FEATURE_DOMID_ANY)
DOMID_FIRST_RESERVED = 0x7FF0


# ---------------------------------------------------------------------------
# small parsers with C's semantics


def atoi(s: str) -> int:
    """C atoi: optional blanks and sign, then digits up to the first non-digit; 0 if none."""
    m = re.match(r"\s*([+-]?\d+)", s)
    if not m:
        return 0
    v = int(m.group(1))
    return max(-(1 << 31), min(v, (1 << 31) - 1))


def parse_domid(s: str) -> int:
    """xenstored's parse_domid: strtoul(s, &end, 10), the whole string, at most 65535; else EINVAL."""
    if s == "":
        return 0
    m = re.fullmatch(r"\s*([+-]?)(\d+)", s)
    if not m:
        raise XsError("EINVAL", f"bad domid {s!r}")
    v = int(m.group(2))
    if m.group(1) == "-" and v:
        v = (1 << 64) - v
    if v > 65535:
        raise XsError("EINVAL", f"bad domid {s!r}")
    return v


def _watch_paths(path: str) -> Iterator[str]:
    """The watch paths a change at `path` can fire: the path and its ancestors
    ("/a/b", "/a", "/"); for "@x/<domid>", itself and "@x"."""
    yield path
    if path.startswith("@"):
        i = path.find("/")
        if i > 0:
            yield path[:i]
        return
    while path != "/":
        i = path.rfind("/")
        path = path[:i] if i > 0 else "/"
        yield path


# ---------------------------------------------------------------------------
# domains and connections


@dataclass(eq=False)
class Domain:
    """An introduced domain (xenstored's struct domain)."""

    domid: int
    port: int = 0                 # its xenstore event channel (INTRODUCE's <evtchn>)
    gfn: int = 0                  # its ring page (INTRODUCE's <gfn>)
    target: int | None = None     # SET_TARGET
    shutdown: bool = False        # @releaseDomain already fired for a shutdown
    features: int = SERVER_FEATURES
    conn: Connection | None = None


class _Cause:
    """A request of an unprivileged connection.  It is "outstanding" (xenstored's
    ACC_OUTST) from when its reply is queued until the reply and every watch
    event it fired for that same connection have left the queue (sent or
    dropped), as in core.c send_reply/free_buffered_data."""

    __slots__ = ("conn", "events", "reply_queued")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.events = 0
        self.reply_queued = False

    def left(self, reply: bool) -> None:
        """Its reply (or one of its events) left the queue."""
        if reply:
            self.reply_queued = False
        else:
            self.events -= 1
        if not self.reply_queued and self.events == 0:
            self.conn.outstanding -= 1


def _event_header(length: int) -> bytes:
    """struct xsd_sockmsg of a WATCH_EVENT (req_id 0, tx_id 0) with a payload of `length`."""
    return wire.HEADER.pack(Op.WATCH_EVENT, 0, 0, length)


# Output bound of a privileged connection (xenstored has none: dom0 is exempt from
# the memory quota).  A dom0 client that stops reading loses watch events past it
# instead of growing the daemon without bound.
PRIV_OUTPUT_MAX = 8 << 20


class Connection:
    """One client: its identity, watches, transactions, input framing and output queue.

    The output queue holds replies and watch events until the transport takes
    them (`take_output`); a watch event already in it is not queued again (a set
    makes that check O(1)), and one past the connection's memory quota is
    dropped, as xenstored's send_event does.  `can_read()` says whether the
    transport should feed it more requests now (xenstored's domain_can_read)."""

    def __init__(self, xsd: Xenstored, caller: Caller,
                 on_output: Callable[[], None] | None = None, name: str = "") -> None:
        self.xsd = xsd
        self.caller = caller
        self.name = name or f"dom{caller.domid}"
        self.on_output = on_output
        self.watches: list[Watch] = []      # in registration order; change via Xenstored.add_watch & co
        self.transactions: dict[int, Transaction] = {}
        self.next_tx_id = 1
        self.parser = wire.Parser()
        self.closed = False
        self.close_reason = ""
        self.error = wire.XENSTORE_ERROR_NONE   # for a ring's "error" field
        # (is_watch_event, encoded message, the request that caused the event)
        self._out: collections.deque[tuple[bool, bytes, _Cause | None]] = collections.deque()
        self._out_bytes = 0
        self._queued_events: set[bytes] = set()   # watch events in _out (not the @ ones)
        self.outstanding = 0                       # requests (_Cause) not done with
        self.events_dropped = 0
        self.at_quota = False       # an event was dropped, and the queue has not half-drained since
        self._after: list[bytes] = []              # events to queue after the current reply

    def __repr__(self) -> str:
        return f"<Connection {self.name} watches={len(self.watches)} tx={len(self.transactions)}>"

    # -- input

    def feed(self, data: bytes, limit: int | None = None) -> bytes:
        """Process bytes from the client; return what to send back (at most about
        `limit` bytes of it, whole messages, if given; the rest stays queued).
        Never raises on input.  When `closed` becomes true the transport should
        drop the client."""
        with self.xsd.lock:
            if self.closed:
                return b""
            for msg in self.parser.feed(data):
                self.process(msg)
            if self.parser.error:
                self.xsd._kill(self, self.parser.error, self.parser.reason)
            self.xsd._after_request()
            return self.take_output(limit)

    def process(self, msg: Message) -> None:
        """Handle one request and queue its reply (process_message)."""
        self.xsd.stats[msg.op_name] += 1
        entry = HANDLERS.get(msg.type)
        self.xsd._firing = None if self.caller.privileged else _Cause(self)
        try:
            if entry is None:
                raise XsError("ENOSYS", msg.op_name)
            handler, flags = entry
            if flags & PRIV and not self.caller.privileged:
                raise XsError("EACCES", "privileged operation")
            tx = None
            if not flags & NOTID and msg.tx_id:
                tx = self.transactions.get(msg.tx_id)
                if tx is None:
                    raise XsError("ENOENT", f"no transaction {msg.tx_id}")
            payload = handler(self, msg, tx)
            if len(payload) > XENSTORE_PAYLOAD_MAX:
                raise XsError("E2BIG", "reply too long")
            self._queue(False, Message(msg.type, msg.req_id, msg.tx_id, payload).encode())
        except XsError as e:
            self.xsd.stats["errors"] += 1
            self._queue(False, Message(Op.ERROR, msg.req_id, msg.tx_id, e.name.encode() + b"\0").encode())
        except Exception:                   # a bug here must not take the daemon down
            log.exception("xenstore: %s from %s failed", msg.op_name, self.name)
            self.xsd.stats["errors"] += 1
            self._queue(False, Message(Op.ERROR, msg.req_id, msg.tx_id, b"EIO\0").encode())
        finally:
            self.xsd._firing = None
        for ev in self._after:    # a watch's first event: send_event(NULL, ...) in xenstored
            self._push_event(ev, ev[wire.HEADER.size:wire.HEADER.size + 1] == b"@", self.output_limit())
        self._after.clear()

    def request(self, type: int, payload: bytes, tx_id: int = 0) -> Message:
        """Run one request in-process and return its reply (for the toolstack and tests).
        Watch events queued meanwhile stay queued."""
        with self.xsd.lock:
            mark = len(self._out)
            self.process(Message(type, 0, tx_id, payload))
            # the one non-event queued since `mark` is the reply (events may come before and after it)
            i = next(i for i in range(mark, len(self._out)) if not self._out[i][0])
            entry = self._out[i]
            del self._out[i]
            self._unqueued(entry)
            self.xsd._after_request()
            data = entry[1]
            hdr = wire.HEADER.unpack_from(data)
            return Message(hdr[0], hdr[1], hdr[2], data[wire.HEADER.size:])

    def can_read(self) -> bool:
        """May the transport feed this connection more requests now?  Not while an
        unprivileged one has `outstanding` requests or queued output at its quota
        (domain_can_read): its transport then leaves the requests where they are
        (the guest's ring) until it has read what is queued for it.  xenstored's
        memory quota counts a domain's nodes and watches too, so a domain that
        overflows its queue is also at quota there; here only the queue counts,
        and a connection that had events dropped counts as at quota until half
        of its queue has been read (`at_quota`)."""
        if self.at_quota:
            return False
        if self.caller.privileged:
            return self._out_bytes < PRIV_OUTPUT_MAX
        q = self.xsd.store.quota(self.caller.domid)
        return not (q.exceeded("outstanding", self.outstanding)
                    or q.exceeded("memory", self._out_bytes))

    # -- output

    def _queue(self, is_event: bool, data: bytes, cause: _Cause | None = None) -> None:
        if not is_event:
            cause = self.xsd._firing
            if cause is not None:
                cause.reply_queued = True
                self.outstanding += 1
        self._out.append((is_event, data, cause))
        self._out_bytes += len(data)

    def _unqueued(self, entry: tuple[bool, bytes, _Cause | None]) -> None:
        """Bookkeeping for an entry that left the queue (sent, or dropped)."""
        is_event, data, cause = entry
        self._out_bytes -= len(data)
        if is_event:
            self._queued_events.discard(data)
        if cause is not None:
            cause.left(not is_event)

    def send_event(self, path: str, token: str, limit: int = 0) -> None:
        """Queue a WATCH_EVENT (send_event): over-long ones and duplicates of one
        still queued are dropped, and so is anything past the connection's memory
        quota (PRIV_OUTPUT_MAX for privileged ones).  O(1).  `limit` is
        `output_limit()` if the caller has it at hand."""
        payload = path.encode("latin-1") + b"\0" + token.encode("latin-1") + b"\0"
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            return
        self._push_event(_event_header(len(payload)) + payload, path.startswith("@"),
                         limit or self.output_limit())

    def _drop_event(self) -> None:
        self.at_quota = True
        self.events_dropped += 1
        self.xsd.stats["events_dropped"] += 1

    def _push_event(self, data: bytes, special: bool, limit: int) -> None:
        """Queue an encoded WATCH_EVENT unless it is a duplicate or over `limit`."""
        if not special and data in self._queued_events:
            self.xsd.stats["events_merged"] += 1
            return
        if self._out_bytes + len(data) >= limit:
            self._drop_event()
            return
        cause = self.xsd._firing
        if cause is not None and cause.conn is not self:
            cause = None        # only events for the requester itself keep its request outstanding
        if cause is not None:
            cause.events += 1
        self._queue(True, data, cause)
        if not special:
            self._queued_events.add(data)
        if self.on_output is not None and len(self._out) == 1:
            self.on_output()        # the transport drains the queue once woken

    def output_limit(self) -> int:
        """Queued output may stay below this many bytes (xenstored's memory quota
        counts as exceeded when reached)."""
        if self.caller.privileged:
            return PRIV_OUTPUT_MAX + 1
        return self.xsd.store.quota(self.caller.domid).get("memory") or (1 << 62)

    def take_output(self, limit: int | None = None) -> bytes:
        """What is queued for the client, removed from the queue: everything, or
        whole messages while fewer than `limit` bytes were taken."""
        with self.xsd.lock:
            if limit is None or limit >= self._out_bytes:
                out = b"".join(d for _, d, _ in self._out)
                for is_event, _, cause in self._out:
                    if cause is not None:
                        cause.left(not is_event)
                self._out.clear()
                self._out_bytes = 0
                self._queued_events.clear()
                self.at_quota = False
                return out
            parts = []
            n = 0
            while self._out and n < limit:
                entry = self._out.popleft()
                self._unqueued(entry)
                parts.append(entry[1])
                n += len(entry[1])
            if self.at_quota and 2 * self._out_bytes < self.output_limit():
                self.at_quota = False
            return b"".join(parts)

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    @property
    def queued_bytes(self) -> int:
        return self._out_bytes

    def reset(self) -> None:
        """Forget watches and transactions (RESET_WATCHES, re-INTRODUCE, release, close)."""
        self.xsd.clear_watches(self)
        self.transactions.clear()

    def close(self) -> None:
        """The transport went away."""
        self.xsd.disconnect(self)


# ---------------------------------------------------------------------------
# the daemon


class Xenstored:
    """The daemon's state: the store, connections, introduced domains, persistence."""

    def __init__(self, state_file: str | os.PathLike[str] | None = None, quotas: Quotas | None = None,
                 flush_delay: float = 0.0) -> None:
        self.lock = threading.RLock()
        self._save_lock = threading.Lock()
        self.state_file = Path(state_file) if state_file else None
        self.flush_delay = flush_delay
        self.connections: list[Connection] = []
        self.domains: dict[int, Domain] = {0: Domain(0)}
        self.stats: collections.Counter[str] = collections.Counter()
        self.on_introduce: Callable[[Domain], None] | None = None
        self.on_release: Callable[[Domain], None] | None = None
        self.on_flush_scheduled: Callable[[], None] | None = None  # the server loop's wake-up
        self.dirty = False
        self._flush_at: float | None = None
        # watch path -> {(connection, token): (registration number, watch)}: firing
        # looks up the changed node and its ancestors only, not every watch
        self._watch_index: dict[str, dict[tuple[Connection, str], tuple[int, Watch]]] = {}
        self._watch_seq = 0
        self._firing: _Cause | None = None      # the unprivileged request being processed
        self.store = Store(quotas)
        if self.state_file:
            self._load()

    # -- connections

    def connect(self, caller: Caller = DOM0, on_output: Callable[[], None] | None = None,
                name: str = "") -> Connection:
        """A new client connection (socket clients are dom0: `DOM0`)."""
        with self.lock:
            conn = Connection(self, caller, on_output, name)
            self.connections.append(conn)
            return conn

    def disconnect(self, conn: Connection) -> None:
        with self.lock:
            conn.reset()
            conn.take_output()
            conn.closed = True
            if conn in self.connections:
                self.connections.remove(conn)
            for dom in self.domains.values():
                if dom.conn is conn:
                    dom.conn = None

    def _kill(self, conn: Connection, error: int, reason: str) -> None:
        """A protocol violation: drop everything of the connection (ignore_connection)."""
        log.warning("xenstore: dropping %s: %s", conn.name, reason)
        self.stats["killed"] += 1
        conn.error = error
        conn.close_reason = reason
        conn.take_output()
        self.disconnect(conn)

    # -- watches

    def add_watch(self, conn: Connection, watch: Watch) -> None:
        self._watch_seq += 1
        self._watch_index.setdefault(watch.node, {})[(conn, watch.token)] = (self._watch_seq, watch)
        conn.watches.append(watch)

    def find_watch(self, conn: Connection, node: str, token: str) -> Watch | None:
        """The connection's watch on `node` with `token`, from the index (O(1))."""
        entry = self._watch_index.get(node, {}).get((conn, token))
        return entry[1] if entry is not None else None

    def remove_watch(self, conn: Connection, watch: Watch) -> None:
        for i, w in enumerate(conn.watches):
            if w is watch:
                del conn.watches[i]
                break
        at = self._watch_index.get(watch.node)
        if at is not None:
            at.pop((conn, watch.token), None)
            if not at:
                del self._watch_index[watch.node]

    def clear_watches(self, conn: Connection) -> None:
        """Drop all of a connection's watches (linear: a dom0 client may hold thousands)."""
        for w in conn.watches:
            at = self._watch_index.get(w.node)
            if at is not None:
                at.pop((conn, w.token), None)
                if not at:
                    del self._watch_index[w.node]
        conn.watches.clear()

    # -- firing watches

    def fire(self, changes: Iterable[Change]) -> None:
        """Queue a WATCH_EVENT for every watch that each change fires (fire_watches).

        xenstored walks every watch of every connection for each change; here the
        watches are indexed by path, so a change costs a look-up for the node and
        each of its ancestors, plus one step per watch that fires.  Events go out
        in registration order, as the walk would send them."""
        changes = list(changes)
        if not changes:
            return
        self.dirty = True
        index = self._watch_index
        if not index:
            return
        self.stats["changes_fired"] += len(changes)
        for change in changes:
            hits: list[tuple[int, Connection, Watch]] = []
            for node in _watch_paths(change.path):
                at = index.get(node)
                if at is None:
                    continue
                for (conn, _), (seq, w) in at.items():
                    hits.append((seq, conn, w))
            if not hits:
                continue
            self.stats["watches_matched"] += len(hits)
            if len(hits) > 1:
                hits.sort(key=lambda h: h[0])
            subtree = change.match is Match.SUBTREE
            path = change.path
            pathb = path.encode("latin-1")
            special = path.startswith("@")
            limits: dict[Connection, int] = {}   # 0: may not see the change
            for _, conn, w in hits:
                limit = limits.get(conn)
                if limit is None:
                    limit = limits[conn] = (conn.output_limit() if not conn.closed and
                                            watch_permitted(conn.caller, change) else 0)
                # a subtree change fires every watch without a depth on it or above it
                if not limit or not ((subtree and w.depth < 0) or w.fires_for(change)):
                    continue
                size = len(pathb) - w.prefix_len + len(w.token) + 2   # tokens are latin-1
                if size > XENSTORE_PAYLOAD_MAX:
                    continue
                if conn._out_bytes + wire.HEADER.size + size >= limit:
                    conn._drop_event()      # before encoding it: a flood past quota stays cheap
                    continue
                conn._push_event(_event_header(size) + pathb[w.prefix_len:] + b"\0"
                                 + w.token.encode("latin-1") + b"\0", special, limit)

    # -- domains (the toolstack's API; INTRODUCE/RELEASE/... come here too)

    def introduce(self, domid: int, gfn: int = 0, port: int = 0) -> Connection:
        """Start talking to a domain: its connection, @introduceDomain.  Introducing it
        again resets its connection (watches, transactions) and updates the port."""
        with self.lock:
            if not 0 < domid < DOMID_FIRST_RESERVED:
                raise XsError("EINVAL", f"cannot introduce domain {domid}")
            dom = self.domains.get(domid)
            fresh = dom is None
            if dom is None:
                dom = self.domains[domid] = Domain(domid)
            dom.gfn, dom.port = gfn, port
            if dom.conn is None:
                dom.conn = self.connect(self._caller_for(dom), name=f"dom{domid}")
            else:
                dom.conn.reset()
            if fresh:
                self.fire(self.store.special_changes("@introduceDomain", domid))
            self.dirty = True
            if self.on_introduce is not None:
                self.on_introduce(dom)
            return dom.conn

    def release(self, domid: int) -> None:
        """Stop talking to a domain: drop its connection without telling it, delete the
        nodes it owns and its permission entries, fire @releaseDomain."""
        with self.lock:
            dom = self.domains.get(domid)
            if domid == 0 or dom is None:
                raise XsError("ENOENT" if dom is None else "EINVAL", f"domain {domid}")
            if dom.conn is not None:
                self.clear_watches(dom.conn)    # no events to the departing domain
                self.disconnect(dom.conn)
            del self.domains[domid]
            self.fire(self.store.remove_domain(domid))
            self.fire(self.store.special_changes("@releaseDomain", domid))
            self.dirty = True
            if self.on_release is not None:
                self.on_release(dom)

    def domain_shutdown(self, domid: int) -> None:
        """The domain shut down (but is not gone): fire @releaseDomain once, as xenstored does."""
        with self.lock:
            dom = self.domains.get(domid)
            if dom is None or dom.shutdown:
                return
            dom.shutdown = True
            self.fire(self.store.special_changes("@releaseDomain", domid))

    def is_introduced(self, domid: int) -> bool:
        return domid == DOMID_SELF or domid in self.domains

    def set_target(self, domid: int, target: int) -> None:
        with self.lock:
            dom, tdom = self._connected(domid), self._connected(target)
            dom.target = tdom.domid
            if dom.conn is not None:
                dom.conn.caller = self._caller_for(dom)

    def _connected(self, domid: int) -> Domain:
        dom = self.domains.get(domid)
        if dom is None:
            raise XsError("ENOENT", f"domain {domid}")
        if dom.conn is None and domid != 0:
            raise XsError("EINVAL", f"domain {domid} has no connection")
        return dom

    @staticmethod
    def _caller_for(dom: Domain) -> Caller:
        return Caller(dom.domid, dom.domid == 0, dom.target)

    # -- in-process convenience for the toolstack (as dom0, watches fire)

    def read(self, path: str, caller: Caller = DOM0) -> bytes:
        with self.lock:
            return self.store.read(caller, path)

    def write(self, path: str, value: bytes | str, caller: Caller = DOM0) -> None:
        with self.lock:
            self.fire(self.store.write(caller, path, value.encode() if isinstance(value, str) else value))
            self._after_request()

    def mkdir(self, path: str, caller: Caller = DOM0) -> None:
        with self.lock:
            self.fire(self.store.mkdir(caller, path))
            self._after_request()

    def rm(self, path: str, caller: Caller = DOM0) -> None:
        with self.lock:
            self.fire(self.store.rm(caller, path))
            self._after_request()

    def set_perms(self, path: str, perms: Iterable[str], caller: Caller = DOM0) -> None:
        with self.lock:
            self.fire(self.store.set_perms(caller, path, parse_perms(perms)))
            self._after_request()

    def directory(self, path: str, caller: Caller = DOM0) -> tuple[str, ...]:
        with self.lock:
            return self.store.directory(caller, path)

    # -- persistence

    def _after_request(self) -> None:
        if not self.dirty or self.state_file is None:
            return
        if self.flush_delay <= 0:
            self.flush()
        elif self._flush_at is None:
            self._flush_at = time.monotonic() + self.flush_delay
            if self.on_flush_scheduled is not None:
                # the socket loop may be asleep with no timeout (this request came
                # from a guest ring, on another thread): it must look again
                self.on_flush_scheduled()

    def flush_timeout(self) -> float | None:
        """Seconds until a delayed save is due (for a server loop's select), or None."""
        if self._flush_at is None:
            return None
        return max(0.0, self._flush_at - time.monotonic())

    def flush(self) -> None:
        """Save the state file now if anything changed.  The tree is serialised
        under the lock, but written and fsync'd outside it: a slow disk must not
        stall every xenstore client."""
        with self.lock:
            self._flush_at = None
            if not self.dirty or self.state_file is None:
                return
            text = json.dumps(self.to_json(), separators=(",", ":"))
            self.dirty = False
            self.stats["saves"] += 1
        with self._save_lock:
            save_json(self.state_file, text)

    def to_json(self) -> dict[str, Any]:
        d = self.store.to_json()
        d["domains"] = [{"domid": dom.domid, "port": dom.port, "gfn": dom.gfn, "target": dom.target,
                         "shutdown": dom.shutdown,
                         "watches": [[w.node, w.token, w.depth, w.prefix_len]
                                     for w in (dom.conn.watches if dom.conn else [])]}
                        for dom in self.domains.values() if dom.domid != 0]
        return d

    def _load(self) -> None:
        assert self.state_file is not None
        data = load_json(self.state_file)
        if data is None:
            return
        self.store = Store.from_json(data)
        for d in data.get("domains", []):
            dom = Domain(int(d["domid"]), int(d["port"]), int(d["gfn"]), d.get("target"),
                         bool(d.get("shutdown")))
            self.domains[dom.domid] = dom
            dom.conn = self.connect(self._caller_for(dom), name=f"dom{dom.domid}")
            for n, t, dp, pl in d["watches"]:
                self.add_watch(dom.conn, Watch(str(n), str(t), int(dp), int(pl)))

    def close(self) -> None:
        self.flush()


# ---------------------------------------------------------------------------
# request handlers: do_<op>(conn, msg, tx) -> reply payload, or raise XsError

PRIV = 1        # XS_FLAG_PRIV: privileged connections only
NOTID = 2       # XS_FLAG_NOTID: the transaction id is ignored

OK = b"OK\0"
Handler = Callable[[Connection, Message, "Transaction | None"], bytes]


def _onearg(msg: Message) -> str:
    arg = msg.onearg()
    if arg is None:
        raise XsError("EINVAL", "expected one string")
    return arg


def _store(conn: Connection) -> Store:
    return conn.xsd.store


def do_read(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    return _store(conn).read(conn.caller, _onearg(msg), tx)


def do_write(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    nul = msg.payload.find(b"\0")
    if nul < 0:
        raise XsError("EINVAL", "no path")
    path = msg.payload[:nul].decode("latin-1")
    conn.xsd.fire(_store(conn).write(conn.caller, path, msg.payload[nul + 1:], tx))
    return OK


def do_mkdir(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    conn.xsd.fire(_store(conn).mkdir(conn.caller, _onearg(msg), tx))
    return OK


def do_rm(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    conn.xsd.fire(_store(conn).rm(conn.caller, _onearg(msg), tx))
    return OK


def do_directory(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    return wire.join(*_store(conn).directory(conn.caller, _onearg(msg), tx))


def do_directory_part(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    """<path>|<offset>| -> <gencnt>|<children from byte offset>, "" ending the list (send_directory_part)."""
    strings = msg.strings()
    if len(strings) != 2:
        raise XsError("EINVAL", "expected path and offset")
    gen, children = _store(conn).directory_gen(conn.caller, strings[0], tx)
    off = atoi(strings[1])
    allc = wire.join(*children)
    genb = str(gen).encode() + b"\0"
    if off < 0 or off >= len(allc):
        return genb + b"\0"
    maxlen = XENSTORE_PAYLOAD_MAX - len(genb) - 1
    n = 0
    while True:
        end = allc.find(b"\0", off + n)
        strlen = end - (off + n)
        if n + strlen >= maxlen:
            break
        n += strlen + 1
        if off + n == len(allc):
            break
    data = genb + allc[off:off + n]
    if off + n == len(allc):
        data += b"\0"
    return data


def do_get_perms(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    return format_perms(_store(conn).get_perms(conn.caller, _onearg(msg), tx))


def do_set_perms(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    strings = msg.strings()
    if len(strings) < 2:
        raise XsError("EINVAL", "expected path and permissions")
    store = _store(conn)
    if not conn.caller.privileged and store.quota(conn.caller.domid).exceeded(
            "node-permissions", len(strings) - 1):
        raise XsError("ENOSPC", "too many permissions")
    perms = parse_perms(strings[1:])
    conn.xsd.fire(store.set_perms(conn.caller, strings[0], perms, tx))
    return OK


def do_watch(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    strings = msg.strings()
    depth = -1
    if len(strings) == 3:
        depth = atoi(strings[2])
        if depth < 0:
            raise XsError("EINVAL", "negative depth")
    elif len(strings) != 2:
        raise XsError("EINVAL", "expected path and token")
    path, token = strings[0], strings[1]
    relative = not path.startswith(("/", "@"))
    node = _store(conn).canonicalize(conn.caller, path, allow_special=True)
    if conn.xsd.find_watch(conn, node, token) is not None:
        raise XsError("EEXIST", "watch exists")
    if not conn.caller.privileged and _store(conn).quota(conn.caller.domid).exceeded(
            "watches", len(conn.watches) + 1):
        raise XsError("ENOSPC", "watch quota")
    watch = Watch(node, token, depth, len(conn.caller.home) + 1 if relative else 0)
    conn.xsd.add_watch(conn, watch)
    conn.xsd.dirty = True
    # the initial event, after the reply (do_watch: "we fire once up front")
    conn._after.append(Message(Op.WATCH_EVENT, 0, 0, wire.join(watch.event_path(node), token)).encode())
    return OK


def do_unwatch(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    strings = msg.strings()
    if len(strings) != 2:
        raise XsError("EINVAL", "expected path and token")
    node = _store(conn).canonicalize(conn.caller, strings[0], allow_special=True)
    w = conn.xsd.find_watch(conn, node, strings[1])
    if w is None:
        raise XsError("ENOENT", "no such watch")
    conn.xsd.remove_watch(conn, w)
    conn.xsd.dirty = True
    return OK


def do_reset_watches(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    conn.reset()
    conn.xsd.dirty = True
    return OK


def do_transaction_start(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    if tx is not None:
        raise XsError("EBUSY", "nested transaction")
    if not conn.caller.privileged and _store(conn).quota(conn.caller.domid).exceeded(
            "transactions", len(conn.transactions) + 1):
        raise XsError("ENOSPC", "transaction quota")
    while conn.next_tx_id == 0 or conn.next_tx_id in conn.transactions:
        conn.next_tx_id = (conn.next_tx_id + 1) & 0xFFFFFFFF
    tx_id = conn.next_tx_id
    conn.next_tx_id = (tx_id + 1) & 0xFFFFFFFF
    conn.transactions[tx_id] = _store(conn).transaction_start(conn.caller)
    return f"{tx_id}".encode() + b"\0"


def do_transaction_end(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    arg = msg.onearg()
    if arg not in ("T", "F"):
        raise XsError("EINVAL", "expected T or F")
    if tx is None:
        raise XsError("ENOENT", "no transaction")
    del conn.transactions[msg.tx_id]
    if arg == "T":
        conn.xsd.dirty |= bool(tx.modified)
        conn.xsd.fire(_store(conn).transaction_commit(tx))
    return OK


def do_get_domain_path(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    return f"/local/domain/{parse_domid(_onearg(msg))}".encode() + b"\0"


def do_is_domain_introduced(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    return b"T\0" if conn.xsd.is_introduced(parse_domid(_onearg(msg))) else b"F\0"


def do_introduce(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    strings = msg.strings()
    if len(strings) < 3:
        raise XsError("EINVAL", "expected domid, gfn and port")
    domid = parse_domid(strings[0])
    port = atoi(strings[2])
    if port <= 0:
        raise XsError("EINVAL", "bad port")
    conn.xsd.introduce(domid, atoi(strings[1]), port)
    return OK


def _onearg_domain(conn: Connection, msg: Message) -> Domain:
    domid = parse_domid(_onearg(msg))
    if domid == 0:
        raise XsError("EINVAL", "dom0")
    return conn.xsd._connected(domid)


def do_release(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    conn.xsd.release(_onearg_domain(conn, msg).domid)
    return OK


def do_resume(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    _onearg_domain(conn, msg).shutdown = False
    return OK


def do_set_target(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    strings = msg.strings()
    if len(strings) < 2:
        raise XsError("EINVAL", "expected domid and target")
    conn.xsd.set_target(parse_domid(strings[0]), parse_domid(strings[1]))
    return OK


def do_get_feature(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    strings = msg.strings()
    if not strings:
        dom = conn.xsd.domains.get(conn.caller.domid)
        return f"{dom.features if dom else SERVER_FEATURES}".encode() + b"\0"
    if not conn.caller.privileged:
        raise XsError("EACCES", "privileged operation")
    if len(strings) > 1:
        raise XsError("EINVAL", "too many arguments")
    dom = conn.xsd.domains.get(parse_domid(strings[0]))
    if dom is None:
        raise XsError("ENOENT", "no such domain")
    return f"{dom.features}".encode() + b"\0"


def do_set_feature(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    strings = msg.strings()
    if len(strings) != 2:
        raise XsError("EINVAL", "expected domid and features")
    # features can only change before INTRODUCE, and domains exist here only after it
    raise XsError("EBUSY" if parse_domid(strings[0]) in conn.xsd.domains else "ENOENT", "domain")


def do_get_quota(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    strings = msg.strings()
    store = _store(conn)
    if len(strings) > 2:
        raise XsError("EINVAL", "too many arguments")
    if not strings:
        return " ".join(Quotas.NAMES).encode() + b"\0"
    if len(strings) == 1:
        quotas, name = store.quotas, strings[0]
    else:
        domid = parse_domid(strings[0])
        if domid not in conn.xsd.domains:
            raise XsError("ENOENT", "no such domain")
        quotas, name = store.quota(domid), strings[1]
    if name not in Quotas.NAMES:
        raise XsError("EINVAL", f"unknown quota {name}")
    return f"{quotas.get(name)}".encode() + b"\0"


def do_set_quota(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    strings = msg.strings()
    store = _store(conn)
    if len(strings) not in (2, 3):
        raise XsError("EINVAL", "expected [domid] name value")
    if len(strings) == 2:
        quotas, name, value = store.quotas, strings[0], atoi(strings[1])
    else:
        domid = parse_domid(strings[0])
        if domid not in conn.xsd.domains:
            raise XsError("ENOENT", "no such domain")
        if domid not in store.domain_quotas:
            store.domain_quotas[domid] = replace(store.quotas)
        quotas, name, value = store.domain_quotas[domid], strings[1], atoi(strings[2])
    if name not in Quotas.NAMES or value < 0:
        raise XsError("EINVAL", f"bad quota {name}")
    quotas.set(name, value)
    conn.xsd.dirty = True
    return OK


_CONTROL_HELP = {"check": "", "help": "", "print": "<string>", "quota": "[set <name> <val>|<domid>]"}


def do_control(conn: Connection, msg: Message, tx: Transaction | None) -> bytes:
    """CONTROL <command>|[<parameters>|]: check, help, print, quota (control.c)."""
    strings = msg.strings()
    if not strings or strings[0] not in _CONTROL_HELP:
        raise XsError("EINVAL", "unknown control command")
    cmd, args = strings[0], strings[1:]
    store = _store(conn)
    if cmd == "check":
        if args:
            raise XsError("EINVAL", "check takes no parameters")
        for problem in store.check():
            log.error("xenstore check: %s", problem)
        return OK
    if cmd == "help":
        if args:
            raise XsError("EINVAL", "help takes no parameters")
        return "".join(f"{c}\t{h}\n" for c, h in _CONTROL_HELP.items()).encode() + b"\0"
    if cmd == "print":
        if len(args) != 1:
            raise XsError("EINVAL", "print takes one parameter")
        log.info("xenstore: %s", args[0])
        return OK
    # quota
    if not args:
        return "".join(f"{n:<20}{store.quotas.get(n)}\n" for n in Quotas.NAMES).encode() + b"\0"
    if args[0] == "set" and len(args) == 3:
        if args[1] not in Quotas.NAMES or atoi(args[2]) < 0:
            raise XsError("EINVAL", "bad quota")
        store.quotas.set(args[1], atoi(args[2]))
        conn.xsd.dirty = True
        return OK
    if len(args) == 1:
        domid = parse_domid(args[0])
        if domid not in conn.xsd.domains:
            raise XsError("ENOENT", "no such domain")
        text = f"Domain {domid}:\n" + f"{'nodes':<20}{store.node_count(domid)}\n"
        return text.encode() + b"\0"
    raise XsError("EINVAL", "bad quota command")


HANDLERS: dict[int, tuple[Handler, int]] = {
    Op.CONTROL: (do_control, PRIV),
    Op.DIRECTORY: (do_directory, 0),
    Op.READ: (do_read, 0),
    Op.GET_PERMS: (do_get_perms, 0),
    Op.WATCH: (do_watch, NOTID),
    Op.UNWATCH: (do_unwatch, NOTID),
    Op.TRANSACTION_START: (do_transaction_start, 0),
    Op.TRANSACTION_END: (do_transaction_end, 0),
    Op.INTRODUCE: (do_introduce, PRIV),
    Op.RELEASE: (do_release, PRIV),
    Op.GET_DOMAIN_PATH: (do_get_domain_path, 0),
    Op.WRITE: (do_write, 0),
    Op.MKDIR: (do_mkdir, 0),
    Op.RM: (do_rm, 0),
    Op.SET_PERMS: (do_set_perms, 0),
    Op.IS_DOMAIN_INTRODUCED: (do_is_domain_introduced, PRIV),
    Op.RESUME: (do_resume, PRIV),
    Op.SET_TARGET: (do_set_target, PRIV),
    Op.RESET_WATCHES: (do_reset_watches, 0),
    Op.DIRECTORY_PART: (do_directory_part, 0),
    Op.GET_FEATURE: (do_get_feature, 0),
    Op.SET_FEATURE: (do_set_feature, PRIV),
    Op.GET_QUOTA: (do_get_quota, PRIV),
    Op.SET_QUOTA: (do_set_quota, PRIV),
}


# ---------------------------------------------------------------------------
# the unix-socket server


SOCKET_CHUNK = 64 << 10     # bytes read or taken for a socket client at a time


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    conn: Connection
    out: bytearray = field(default_factory=bytearray)


class XenstoreServer:
    """Serves `Xenstored` on a unix socket, every client as privileged dom0.

    `start()` runs the selector loop in a thread; `serve_forever()` runs it in
    the caller's.  `stop()` ends it, saves the state and removes the socket."""

    def __init__(self, path: str | os.PathLike[str], state_file: str | os.PathLike[str] | None = None,
                 *, xenstored: Xenstored | None = None, flush_delay: float = 0.05,
                 accept_filter: Callable[[socket.socket], bool] | None = None) -> None:
        self.path = Path(path)
        self.accept_filter = accept_filter  # False: close it unserved (pyxend's SO_PEERCRED check)
        self.xsd = xenstored or Xenstored(state_file, flush_delay=flush_delay)
        self._sel = selectors.DefaultSelector()
        self._clients: dict[int, _Client] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.xsd.on_flush_scheduled = self.wake
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saver: threading.Thread | None = None
        self._listener: socket.socket | None = None

    def __enter__(self) -> XenstoreServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def bind(self) -> None:
        if self._listener is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.path))
        os.chmod(self.path, 0o600)
        s.listen(64)
        s.setblocking(False)
        self._listener = s
        self._sel.register(s, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    def start(self) -> XenstoreServer:
        self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="xenstored", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def serve_forever(self) -> None:
        self.bind()
        try:
            while not self._stop.is_set():
                for key, events in self._sel.select(self.xsd.flush_timeout()):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        assert isinstance(key.data, _Client)
                        self._guarded(self._service, key.data, events)
                self._collect_events()
                timeout = self.xsd.flush_timeout()
                if timeout is not None and timeout <= 0 and (
                        self._saver is None or not self._saver.is_alive()):
                    # the fsync happens off this thread: clients are served meanwhile
                    self._saver = threading.Thread(target=self.xsd.flush, name="xenstored-save",
                                                   daemon=True)
                    self._saver.start()
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stop.set()
        self.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.accept_filter is not None and not self.accept_filter(sock):
            sock.close()
            return
        sock.setblocking(False)
        conn = self.xsd.connect(DOM0, on_output=self.wake, name=f"socket{sock.fileno()}")
        client = _Client(sock, conn)
        self._clients[sock.fileno()] = client
        self._sel.register(sock, selectors.EVENT_READ, client)

    def _service(self, c: _Client, events: int) -> None:
        if events & selectors.EVENT_READ:
            try:
                data = c.sock.recv(SOCKET_CHUNK)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._drop(c)
                return
            if data:
                c.conn.feed(data, limit=0)
                if c.conn.closed:
                    self._drop(c)
                    return
        self._send(c)

    def _send(self, c: _Client) -> None:
        """Move what is queued for the client to its socket, never blocking: a client
        that does not read keeps its output in its own buffer and queue (where the
        duplicate check and the output bound apply), and is not read from until it
        catches up; everyone else is served meanwhile."""
        while True:
            if len(c.out) < SOCKET_CHUNK and c.conn.has_output:
                c.out += c.conn.take_output(SOCKET_CHUNK)
            if not c.out:
                break
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(c)
                return
            del c.out[:n]
            if c.out:
                break           # the socket is full
        want = selectors.EVENT_WRITE if c.out else 0
        if len(c.out) < SOCKET_CHUNK and c.conn.can_read():
            want |= selectors.EVENT_READ
        if self._sel.get_key(c.sock).events != want:
            if want:
                self._sel.modify(c.sock, want, c)
            else:   # cannot happen (nothing to send means room to read), but selectors refuse 0
                self._sel.modify(c.sock, selectors.EVENT_READ, c)

    def _guarded(self, fn: Callable[..., None], c: _Client, *args: int) -> None:
        """Serve one client; whatever goes wrong with it drops that client only,
        never the loop that serves everyone (a dead loop would hang every client)."""
        if c.sock.fileno() < 0 or self._clients.get(c.sock.fileno()) is not c:
            return  # dropped earlier in this round
        try:
            fn(c, *args)
        except Exception:  # noqa: BLE001
            log.exception("xenstore: dropping %s after an error", c.conn.name)
            self._drop(c)

    def _collect_events(self) -> None:
        for c in list(self._clients.values()):
            if c.conn.has_output and len(c.out) < SOCKET_CHUNK:
                self._guarded(self._send, c)

    def _drop(self, c: _Client) -> None:
        fd = c.sock.fileno()
        if fd >= 0 and self._clients.get(fd) is c:
            self._clients.pop(fd)
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        c.conn.close()

    def _shutdown(self) -> None:
        for c in list(self._clients.values()):
            self._drop(c)
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.xsd.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m pyxen.xenstore.server",
                                 description="pyxen's XenStore daemon on a unix socket")
    ap.add_argument("--socket", required=True, help="unix socket path (give it to clients as XENSTORED_PATH)")
    ap.add_argument("--state", help="state file: the tree is loaded from it and saved to it")
    ap.add_argument("--flush-delay", type=float, default=0.05,
                    help="save at most this many seconds after a change (0: after every request)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="xenstored: %(message)s", stream=sys.stderr)
    server = XenstoreServer(args.socket, args.state, flush_delay=args.flush_delay)

    def on_signal(signum: int, frame: object) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.bind()
    print(f"xenstored: serving {server.path}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
