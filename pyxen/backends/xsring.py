"""The guest's end of XenStore: its shared ring page (io/xs_wire.h).

struct xenstore_domain_interface { char req[1024]; char rsp[1024];
    XENSTORE_RING_IDX req_cons, req_prod, rsp_cons, rsp_prod;
    uint32_t server_features, connection, error; }

xenstored proper runs in the toolstack daemon.  The domain process relays:
bytes the guest produced in ``req`` go to the daemon's domain socket (which
knows this connection is domain N, unprivileged), and what comes back
(replies and watch events) is copied into ``rsp`` as space allows, with a
notification on the store event channel each time.  Indexes are free-running
32-bit counters; a guest whose indexes claim more than a ring's worth is
marked with ``error`` (XENSTORE_ERROR_RINGIDX) and ignored, as xenstored does.

Both directions are bounded here, so that what a guest does not consume waits
in xenstored's queue for it (where duplicate events merge and its memory quota
drops the excess, as in xenstored) rather than in this process: replies and
events are read from the daemon only while fewer than THROTTLE bytes wait for
the guest (``wants_daemon_data``; the owner of the socket stops polling it
meanwhile), and requests are taken from the guest's ring only while fewer than
THROTTLE bytes wait for the daemon.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from ..hv import atomic

RING = 1024
OFF_REQ, OFF_RSP = 0, 1024
OFF_REQ_CONS, OFF_REQ_PROD, OFF_RSP_CONS, OFF_RSP_PROD = 2048, 2052, 2056, 2060
OFF_FEATURES, OFF_CONNECTION, OFF_ERROR = 2064, 2068, 2072
XENSTORE_CONNECTED = 0
XENSTORE_ERROR_NONE, XENSTORE_ERROR_COMM, XENSTORE_ERROR_RINGIDX = 0, 1, 2
THROTTLE = 64 << 10
# how long the notifying vCPU waits for the daemon's reply to requests it just sent
# (`XenstoreRing._await_reply`); 0 leaves every reply to the socket's owner
REPLY_WAIT = 0.0015
HEADER_SIZE = 16                # struct xsd_sockmsg


def take_requests(page: memoryview) -> bytes | None:
    """Consume what the guest produced; None if its indexes are impossible."""
    cons, prod = atomic.load_pair(page, OFF_REQ_CONS)
    n = (prod - cons) & 0xFFFFFFFF
    if n > RING:
        return None
    out = bytes(page[OFF_REQ + (cons + i) % RING] for i in range(n)) if n < 64 else \
        _ring_read(page, OFF_REQ, cons, n)
    atomic.store_index(page, OFF_REQ_CONS, prod)
    return out


def _ring_read(page: memoryview, base: int, cons: int, n: int) -> bytes:
    start = cons % RING
    first = min(n, RING - start)
    data = bytes(page[base + start:base + start + first])
    if first < n:
        data += bytes(page[base:base + n - first])
    return data


def put_responses(page: memoryview, data: bytes) -> int | None:
    """Copy as much of ``data`` into rsp as fits; None if the indexes are impossible."""
    cons, prod = atomic.load_pair(page, OFF_RSP_CONS)
    used = (prod - cons) & 0xFFFFFFFF
    if used > RING:
        return None
    n = min(len(data), RING - used)
    start = prod % RING
    first = min(n, RING - start)
    page[OFF_RSP + start:OFF_RSP + start + first] = data[:first]
    if first < n:
        page[OFF_RSP:OFF_RSP + n - first] = data[first:n]
    atomic.store_index(page, OFF_RSP_PROD, (prod + n) & 0xFFFFFFFF)
    return n


class XenstoreRing:
    """Relay between one guest's xenstore ring and the daemon's domain socket."""

    def __init__(self, page: memoryview, sock: socket.socket, notify_guest: Callable[[], None]) -> None:
        self.page = page
        self.sock = sock
        self.sock.setblocking(False)
        self.notify_guest = notify_guest
        self.lock = threading.Lock()
        self.to_daemon = bytearray()
        self.to_guest = bytearray()
        self.broken = False
        self.held = False           # the daemon's socket was left unread: the guest is behind
        self.daemon_eof = False
        self.reply_wait = REPLY_WAIT
        self._hdr = bytearray()     # a request header taken in part (`_frame`)
        self._body_left = 0         # payload bytes of the current request not taken yet
        struct.pack_into("<III", page, OFF_FEATURES, 0, XENSTORE_CONNECTED, XENSTORE_ERROR_NONE)

    def _fail(self, why: int) -> None:
        self.broken = True
        struct.pack_into("<I", self.page, OFF_ERROR, why)

    def on_guest_event(self) -> None:
        """The guest notified the store port: new requests or freed response space.
        While more than THROTTLE bytes of replies wait for the guest, its new
        requests stay in its ring (a bound on outstanding requests); its next
        notification, after it read replies, picks them up.  While THROTTLE
        bytes of requests wait for the daemon (which stopped reading them: the
        guest is at its outstanding or memory quota), they stay in the ring too,
        and `flush` picks them up once the daemon took the others."""
        with self.lock:
            if self.broken:
                return
            taken = self._take_requests()
            notify = self._push_guest()
            if self.held and len(self.to_guest) < THROTTLE:
                # the guest made room: carry on from the daemon's socket here, at once,
                # rather than when the socket's owner polls it again
                notify = self._pull_daemon() or notify
            if taken and self._at_boundary() and not notify and self.reply_wait > 0 and not self.held:
                notify = self._await_reply()
        if notify:
            self.notify_guest()

    def _await_reply(self) -> bool:
        """Wait up to `reply_wait` seconds, in the notifying vCPU's thread, for the
        daemon's answer to the requests just sent (whole ones: see `_frame`),
        and put it in the ring (the caller then marks the port pending from its own thread).  A guest that
        sent a request waits for its reply anyway (it has nothing else to do
        until then: Linux's xenbus and ours block on it), and this way the
        reply reaches it without two more thread wake-ups (the socket's owner,
        then the blocked vCPU: ~0.3 ms on a loaded host, several ms when the
        domain process is busy); the vCPU thread sleeping in select() also
        leaves its CPU to the daemon meanwhile.  Past the bound the socket's
        owner delivers the reply as before, so a slow or stalled daemon (a
        guest at its quota) costs its own guest at most `reply_wait` per
        notification and nothing to anyone else.  Called with the ring's lock
        held, and it stays held throughout, so that the socket's owner, woken by the same reply, waits
        for this thread instead of taking the reply and leaving it asleep in
        select() until the bound (it then finds nothing to read)."""
        deadline = time.monotonic() + self.reply_wait
        while not (self.broken or self.daemon_eof) and len(self.to_guest) < THROTTLE:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                r, _, _ = select.select([self.sock], [], [], left)
            except (OSError, ValueError):
                return False
            if not r:
                return False
            if self._pull_daemon():
                return True
        return False

    def _pull_daemon(self) -> bool:
        """Read from the daemon while the guest has room (the socket is
        non-blocking; reading under the lock keeps the bytes in order when the
        vCPU thread and the socket's owner both read), into the ring as it fits.
        True if anything went into the ring.  Sets `daemon_eof` at end of file."""
        pushed = False
        while len(self.to_guest) < THROTTLE:
            try:
                data = self.sock.recv(THROTTLE)
            except BlockingIOError:
                self.held = False
                return pushed
            except OSError:
                data = b""
            if not data:
                self.daemon_eof = True
                self.held = False
                return pushed
            self.to_guest += data
            pushed = self._push_guest() or pushed
        self.held = True
        return pushed

    def _take_requests(self) -> bool:
        """Move the guest's new requests towards the daemon; True if any were taken."""
        if len(self.to_guest) > THROTTLE or len(self.to_daemon) >= THROTTLE:
            return False
        data = take_requests(self.page)
        if data is None:
            self._fail(XENSTORE_ERROR_RINGIDX)
            return False
        self.to_daemon += data
        self._frame(data)
        self._flush_daemon()
        return bool(data)

    def _frame(self, data: bytes) -> None:
        """Follow the xs_wire framing of the guest's request stream (header
        ``type, req_id, tx_id, len``, then ``len`` bytes), so that `_await_reply`
        waits only once a whole request went out: Linux's xenbus writes a
        request's header and its payload as separate chunks, each with its own
        notification, and no reply can come before the payload.  A length that
        xenstored will refuse just keeps the stream "inside a request" (no
        waiting) until the daemon drops the connection."""
        i, n = 0, len(data)
        while i < n:
            if self._body_left:
                k = min(self._body_left, n - i)
                self._body_left -= k
                i += k
                continue
            take = data[i:i + HEADER_SIZE - len(self._hdr)]
            self._hdr += take
            i += len(take)
            if len(self._hdr) == HEADER_SIZE:
                self._body_left = struct.unpack_from("<I", self._hdr, 12)[0]
                self._hdr.clear()

    def _at_boundary(self) -> bool:
        """Do the requests taken so far end with a whole message?"""
        return not self._hdr and not self._body_left

    @property
    def wants_daemon_data(self) -> bool:
        """Should the socket's owner poll it?  Not while THROTTLE bytes wait for the
        guest: the daemon keeps them, and the guest's notifications read on from
        the socket as it makes room (the owner checks again meanwhile)."""
        return len(self.to_guest) < THROTTLE

    def on_daemon_data(self) -> bool:
        """The daemon sent replies or watch events.  False: the socket closed."""
        with self.lock:
            if self.daemon_eof:
                return False
            notify = self._pull_daemon()
        if notify:
            self.notify_guest()
        return not self.daemon_eof

    def flush(self) -> None:
        """Send requests still waiting for the daemon, then take the guest's next ones."""
        with self.lock:
            if self.broken:
                return
            self._flush_daemon()
            self._take_requests()

    def _flush_daemon(self) -> None:
        if not self.to_daemon:
            return
        try:
            n = self.sock.send(self.to_daemon)
        except BlockingIOError:
            n = 0
        except OSError:
            self._fail(XENSTORE_ERROR_COMM)
            return
        del self.to_daemon[:n]

    def _push_guest(self) -> bool:
        if self.broken or not self.to_guest:
            return False
        n = put_responses(self.page, bytes(self.to_guest))
        if n is None:
            self._fail(XENSTORE_ERROR_RINGIDX)
            return False
        del self.to_guest[:n]
        return n > 0

    @property
    def pending(self) -> bool:
        return bool(self.to_daemon or self.to_guest)
