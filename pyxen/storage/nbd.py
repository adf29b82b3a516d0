"""A Network Block Device client (the NBD protocol, doc/proto.md of the nbd project).

What is spoken: the *fixed newstyle* handshake (``NBDMAGIC``, ``IHAVEOPT``,
client flags ``FIXED_NEWSTYLE | NO_ZEROES`` as the server offers them), then
``NBD_OPT_GO`` asking for ``NBD_INFO_EXPORT`` and ``NBD_INFO_BLOCK_SIZE``,
falling back to ``NBD_OPT_EXPORT_NAME`` when the server answers GO with
``NBD_REP_ERR_UNSUP`` (or does not offer fixed newstyle at all).  Oldstyle
servers and TLS are refused with a clear :class:`ImageError`.

Transmission uses simple replies only (structured replies are never
negotiated, so a structured reply from the server is a protocol error):
``NBD_CMD_READ``, ``WRITE``, ``FLUSH`` (only if the server set
``NBD_FLAG_SEND_FLUSH``), ``TRIM`` (only with ``NBD_FLAG_SEND_TRIM``) and
``DISC`` on close.

Threads and ordering.  Any number of threads may call ``readinto``/``write``
at once: each request gets a fresh 64-bit cookie, is registered in a table,
and is sent whole (header and payload, gathered by ``sendmsg`` straight from
the caller's buffer) under a send lock.  One reader thread per connection
reads replies in whatever order the server sends them, looks each cookie up
and, for a read, receives the payload straight into the caller's buffer.
Callers wait on their own request with a deadline.

Failure.  A request with no reply within ``timeout`` seconds, a socket error,
EOF or anything that breaks the protocol (bad magic, unknown cookie, a
structured reply) kills the connection: every waiting request and every
later call raise :class:`ImageError` at once; nothing hangs.  Errors the
server reports for one request raise :class:`NbdServerError` (an
``ImageError`` carrying ``errno`` and its name) and leave the connection up,
except ``NBD_ESHUTDOWN``, after which the client disconnects as the spec
requires.  There is no reconnection.

Size constraints.  Because GO asks for ``NBD_INFO_BLOCK_SIZE`` the client
must honour what the server sends: requests are split at the maximum
payload (capped at 32 MiB), and requests not aligned to the minimum block
size are widened (reads) or done as read-modify-write (writes, serialised
by a lock).  With the default minimum block (1) or 512, guest requests are
always aligned.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

from pyxen.storage import BlockImage, ImageError

__all__ = [
    "NbdImage", "NbdServerError", "ExportInfo", "TransmissionFlag", "parse_nbd_uri", "DEFAULT_PORT",
]

DEFAULT_PORT = 10809
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: What a client desiring maximum interoperability sends in one READ/WRITE (2^25).
MAX_PAYLOAD_CAP = 1 << 25
#: Largest option reply we accept: strings are at most 4096 bytes, infos a few.
MAX_OPTION_REPLY = 1 << 16
MAX_NAME = 4096

_OPT_HDR = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REPLY_HDR = struct.Struct(">QIII")  # magic, option, type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8


_REP_ERR = 1 << 31


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR + 1
    ERR_POLICY = _REP_ERR + 2
    ERR_INVALID = _REP_ERR + 3
    ERR_PLATFORM = _REP_ERR + 4
    ERR_TLS_REQD = _REP_ERR + 5
    ERR_UNKNOWN = _REP_ERR + 6
    ERR_SHUTDOWN = _REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
    ERR_TOO_BIG = _REP_ERR + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4


#: The error values the protocol defines (they are Linux's errno numbers).
NBD_ERRORS = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC", 75: "EOVERFLOW",
              95: "ENOTSUP", 108: "ESHUTDOWN"}
NBD_ESHUTDOWN = 108


def error_name(err: int) -> str:
    """``EIO (Input/output error)``; an undefined value is shown as the spec says to treat it."""
    name = NBD_ERRORS.get(err)
    if name is None:
        return f"error {err} (not an NBD error value; treated as EINVAL)"
    return f"{name} ({os.strerror(err)})"


class NbdServerError(ImageError):
    """The server answered one request with an error; ``errno`` is its value, ``errname`` its name."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err
        self.errname = NBD_ERRORS.get(err, "EINVAL")


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake learned about the export."""

    size: int
    flags: TransmissionFlag
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = MAX_PAYLOAD_CAP
    used_go: bool = True
    description: str = ""


def parse_nbd_uri(uri: str) -> tuple[str | None, int, str, str | None]:
    """Split ``nbd://host[:port]/export`` or ``nbd+unix:///export?socket=PATH``.

    Returns ``(host, port, export, socket_path)``; one of host and
    socket_path is None.  The export is the percent-decoded path without
    its leading slash.
    """
    u = urlsplit(uri)
    export = unquote(u.path[1:] if u.path.startswith("/") else u.path)
    if u.scheme == "nbd":
        if not u.hostname:
            raise ValueError(f"bad NBD URI '{uri}': no host")
        try:
            port = u.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"bad NBD URI '{uri}': bad port") from None
        return u.hostname, port, export, None
    if u.scheme == "nbd+unix":
        if u.netloc:
            raise ValueError(f"bad NBD URI '{uri}': nbd+unix:// takes no host (nbd+unix:///export?socket=PATH)")
        sock = parse_qs(u.query).get("socket")
        if not sock:
            raise ValueError(f"bad NBD URI '{uri}': no ?socket=PATH")
        return None, 0, export, sock[0]
    raise ValueError(f"bad NBD URI '{uri}' (use nbd://host:port/export or nbd+unix:///export?socket=PATH)")


# --- wire encoding (no sockets here) ---------------------------------------------------

def encode_option(opt: int, data: bytes = b"") -> bytes:
    return _OPT_HDR.pack(IHAVEOPT, opt, len(data)) + data


def encode_go(export: bytes, infos: Sequence[int] = (Info.EXPORT, Info.BLOCK_SIZE)) -> bytes:
    return (struct.pack(">I", len(export)) + export + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def encode_request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_block_size(data: bytes) -> tuple[int, int, int]:
    """The payload of ``NBD_INFO_BLOCK_SIZE`` (after the type), checked as the spec constrains it."""
    if len(data) != 12:
        raise ValueError(f"NBD_INFO_BLOCK_SIZE has length {len(data) + 2}, not 14")
    lo, pref, hi = struct.unpack(">III", data)
    if not _is_pow2(lo) or lo > 65536:
        raise ValueError(f"minimum block size {lo} is not a power of 2 up to 65536")
    if not _is_pow2(pref) or pref < lo:
        raise ValueError(f"preferred block size {pref} is not a power of 2 >= the minimum {lo}")
    if hi < lo:
        raise ValueError(f"maximum payload {hi} is smaller than the minimum block {lo}")
    return lo, pref, hi


def _errmsg(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip()


# --- the connection ------------------------------------------------------------------

class _Request:
    __slots__ = ("cookie", "cmd", "offset", "length", "buf", "done", "error", "exc")

    def __init__(self, cookie: int, cmd: Cmd, offset: int, length: int, buf: memoryview | None) -> None:
        self.cookie = cookie
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.buf = buf
        self.done = threading.Event()
        self.error = 0
        self.exc: ImageError | None = None


class _Lost(Exception):
    """The peer closed the connection."""


def _bytes_view(buf: memoryview | bytes | bytearray) -> memoryview:
    m = memoryview(buf)
    if m.format != "B" or m.ndim != 1:
        m = m.cast("B")
    return m


class NbdImage(BlockImage):
    """A disk served by an NBD server, over TCP (``host``, ``port``) or a Unix socket (``socket_path``).

    ``timeout`` bounds connecting, the handshake, and the wait for each
    reply; when it expires the connection is given up (see the module
    docstring).  The export is read-only if ``readonly`` or if the server
    says so (``NBD_FLAG_READ_ONLY``).
    """

    def __init__(self, host: str | None = None, port: int = DEFAULT_PORT, export: str = "",
                 readonly: bool = False, timeout: float = 30.0, *, socket_path: str | None = None) -> None:
        if (host is None) == (socket_path is None):
            raise ValueError("give exactly one of host and socket_path")
        self.host = host
        self.port = port
        self.export = export
        self.socket_path = socket_path
        self.timeout = timeout
        if socket_path is not None:
            self.name = f"nbd+unix:///{export}?socket={socket_path}"
        else:
            h = f"[{host}]" if host and ":" in host else host
            self.name = f"nbd://{h}:{port}/{export}"
        self._lock = threading.Lock()  # the cookie table, the dead flag
        self._send_lock = threading.Lock()  # one request on the wire at a time
        self._rmw_lock = threading.Lock()  # unaligned writes
        self._idle = threading.Condition(self._lock)
        self._pending: dict[int, _Request] = {}
        self._cookies = itertools.count(1)
        self._dead: ImageError | None = None
        self._closing = False
        self._sock = self._connect()
        try:
            self.info = self._handshake(time.monotonic() + timeout)
        except BaseException:
            self._sock.close()
            raise
        self.size = self.info.size
        self.flags = self.info.flags
        self.min_block = self.info.min_block
        self.max_payload = min(self.info.max_payload, MAX_PAYLOAD_CAP)
        self.max_payload -= self.max_payload % self.min_block
        self.readonly = readonly or bool(self.flags & TransmissionFlag.READ_ONLY)
        self._sock.settimeout(timeout)
        self._reader = threading.Thread(target=self._read_replies, name=f"nbd-reader {self.name}",
                                        daemon=True)
        self._reader.start()

    @classmethod
    def from_uri(cls, uri: str, readonly: bool = False, timeout: float = 30.0) -> NbdImage:
        try:
            host, port, export, sock = parse_nbd_uri(uri)
        except ValueError as e:
            raise ImageError(str(e)) from None
        return cls(host, port, export, readonly, timeout, socket_path=sock)

    def __enter__(self) -> Self:
        return self

    def __repr__(self) -> str:
        return f"NbdImage({self.name!r}, {self.size} bytes, {'ro' if self.readonly else 'rw'})"

    # --- connecting and the handshake ------------------------------------------------

    def _connect(self) -> socket.socket:
        try:
            if self.socket_path is not None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(self.timeout)
                    s.connect(self.socket_path)
                except BaseException:
                    s.close()
                    raise
            else:
                assert self.host is not None
                s = socket.create_connection((self.host, self.port), timeout=self.timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except TimeoutError:
            raise ImageError(f"{self.name}: cannot connect: no answer in {self.timeout:g} s") from None
        except OSError as e:
            name = errno_mod.errorcode.get(e.errno or 0, "")
            raise ImageError(f"{self.name}: cannot connect: {name} ({e.strerror or e})") from None
        return s

    def _hs_recv(self, n: int, deadline: float, what: str) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ImageError(f"{self.name}: handshake timed out after {self.timeout:g} s "
                                 f"waiting for {what}")
            self._sock.settimeout(left)
            try:
                k = self._sock.recv_into(view[got:])
            except TimeoutError:
                continue
            except OSError as e:
                raise ImageError(f"{self.name}: connection lost during the handshake ({what}): "
                                 f"{e.strerror or e}") from None
            if k == 0:
                raise ImageError(f"{self.name}: the server closed the connection during the handshake "
                                 f"(waiting for {what}, got {got} of {n} bytes)")
            got += k
        return bytes(buf)

    def _hs_send(self, data: bytes, deadline: float) -> None:
        self._sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise ImageError(f"{self.name}: handshake timed out after {self.timeout:g} s sending") from None
        except OSError as e:
            raise ImageError(f"{self.name}: connection lost during the handshake: "
                             f"{e.strerror or e}") from None

    def _handshake(self, deadline: float) -> ExportInfo:
        magic, second = struct.unpack(">QQ", self._hs_recv(16, deadline, "the server greeting"))
        if magic != NBDMAGIC:
            raise ImageError(f"{self.name}: not an NBD server (greeting magic {magic:#018x}, "
                             "expected NBDMAGIC)")
        if second == CLISERV_MAGIC:
            raise ImageError(f"{self.name}: the server uses oldstyle negotiation, which pyxen does not speak "
                             "(it needs newstyle: named exports)")
        if second != IHAVEOPT:
            raise ImageError(f"{self.name}: bad handshake magic {second:#018x} (expected IHAVEOPT)")
        (hflags,) = struct.unpack(">H", self._hs_recv(2, deadline, "the handshake flags"))
        cflags = ClientFlag(0)
        if hflags & HandshakeFlag.FIXED_NEWSTYLE:
            cflags |= ClientFlag.C_FIXED_NEWSTYLE
        if hflags & HandshakeFlag.NO_ZEROES:
            cflags |= ClientFlag.C_NO_ZEROES
        self._hs_send(struct.pack(">I", cflags), deadline)
        name = self.export.encode()
        if len(name) > MAX_NAME:
            raise ImageError(f"{self.name}: export name longer than {MAX_NAME} bytes")
        if hflags & HandshakeFlag.FIXED_NEWSTYLE:
            info = self._opt_go(name, deadline)
            if info is not None:
                return info
        return self._opt_export_name(name, bool(cflags & ClientFlag.C_NO_ZEROES), deadline)

    def _opt_go(self, name: bytes, deadline: float) -> ExportInfo | None:
        """``NBD_OPT_GO``; None if the server does not know it (fall back to EXPORT_NAME)."""
        self._hs_send(encode_option(Opt.GO, encode_go(name)), deadline)
        size: int | None = None
        flags = TransmissionFlag(0)
        lo, pref, hi = 1, 4096, MAX_PAYLOAD_CAP
        desc = ""
        while True:
            magic, opt, rep, length = _OPT_REPLY_HDR.unpack(
                self._hs_recv(_OPT_REPLY_HDR.size, deadline, "a reply to NBD_OPT_GO"))
            if magic != OPT_REPLY_MAGIC:
                raise ImageError(f"{self.name}: bad option reply magic {magic:#x}")
            if opt != Opt.GO:
                raise ImageError(f"{self.name}: option reply for option {opt}, but NBD_OPT_GO was sent")
            if length > MAX_OPTION_REPLY:
                raise ImageError(f"{self.name}: option reply of {length} bytes is too long")
            data = self._hs_recv(length, deadline, "option reply data") if length else b""
            if rep == Rep.INFO:
                if len(data) < 2:
                    raise ImageError(f"{self.name}: NBD_REP_INFO of {len(data)} bytes")
                (itype,) = struct.unpack(">H", data[:2])
                if itype == Info.EXPORT:
                    if len(data) != 12:
                        raise ImageError(f"{self.name}: NBD_INFO_EXPORT has length {len(data)}, not 12")
                    size, f = struct.unpack(">QH", data[2:])
                    flags = TransmissionFlag(f)
                elif itype == Info.BLOCK_SIZE:
                    try:
                        lo, pref, hi = parse_block_size(data[2:])
                    except ValueError as e:
                        raise ImageError(f"{self.name}: bad NBD_INFO_BLOCK_SIZE: {e}") from None
                elif itype == Info.DESCRIPTION:
                    desc = _errmsg(data[2:])
                continue  # other info types are ignored, as the spec says
            if rep == Rep.ACK:
                if size is None:
                    raise ImageError(f"{self.name}: NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
                return ExportInfo(size, flags, lo, pref, hi, True, desc)
            if rep == Rep.ERR_UNSUP:
                return None
            msg = f": {_errmsg(data)}" if data else ""
            if rep == Rep.ERR_UNKNOWN:
                why = f"the server has no export '{self.export}'"
            elif rep == Rep.ERR_TLS_REQD:
                why = "the server requires TLS, which pyxen does not speak"
            elif rep & _REP_ERR:
                try:
                    rname = "NBD_REP_" + Rep(rep).name
                except ValueError:
                    rname = f"error reply {rep:#x}"
                why = f"the server refused NBD_OPT_GO with {rname}"
            else:
                raise ImageError(f"{self.name}: unexpected reply type {rep} to NBD_OPT_GO")
            self._abort(deadline)
            raise ImageError(f"{self.name}: {why}{msg}")

    def _abort(self, deadline: float) -> None:
        """Soft disconnect during option haggling (best effort: the server may just close)."""
        try:
            self._hs_send(encode_option(Opt.ABORT), min(deadline, time.monotonic() + 1))
        except ImageError:
            pass

    def _opt_export_name(self, name: bytes, no_zeroes: bool, deadline: float) -> ExportInfo:
        self._hs_send(encode_option(Opt.EXPORT_NAME, name), deadline)
        try:
            data = self._hs_recv(10, deadline, "the reply to NBD_OPT_EXPORT_NAME")
        except ImageError as e:
            raise ImageError(f"{e} (with NBD_OPT_EXPORT_NAME a server closes the connection when it has "
                             f"no export '{self.export}')") from None
        size, f = struct.unpack(">QH", data)
        if not no_zeroes:
            self._hs_recv(124, deadline, "the 124 reserved zero bytes")
        return ExportInfo(size, TransmissionFlag(f), used_go=False)

    # --- transmission: the reader thread and failure ---------------------------------------

    def _recv_into(self, view: memoryview) -> None:
        """Fill ``view`` from the socket (reader thread only); socket timeouts just mean idle."""
        got = 0
        n = len(view)
        while got < n:
            if self._dead is not None:
                raise _Lost()
            try:
                k = self._sock.recv_into(view[got:])
            except TimeoutError:
                continue  # waiting callers enforce their own deadlines
            if k == 0:
                raise _Lost()
            got += k

    def _read_replies(self) -> None:
        hdr = bytearray(_SIMPLE_REPLY.size)
        hview = memoryview(hdr)
        try:
            while True:
                self._recv_into(hview)
                magic, err, cookie = _SIMPLE_REPLY.unpack(hdr)
                if magic == STRUCTURED_REPLY_MAGIC:
                    raise ImageError("the server sent a structured reply, which was not negotiated")
                if magic != SIMPLE_REPLY_MAGIC:
                    raise ImageError(f"bad reply magic {magic:#010x}")
                with self._lock:
                    req = self._pending.get(cookie)
                if req is None:
                    raise ImageError(f"reply for cookie {cookie}, which no request in flight has")
                if req.cmd == Cmd.READ and err == 0 and req.buf is not None:
                    self._recv_into(req.buf)
                with self._lock:
                    self._pending.pop(cookie, None)
                    if not self._pending:
                        self._idle.notify_all()
                req.error = err
                req.done.set()
        except _Lost:
            if not self._closing:
                self._fail(ImageError(f"{self.name}: the server closed the connection"))
        except ImageError as e:
            self._fail(ImageError(f"{self.name}: protocol error: {e}; connection dropped"))
        except OSError as e:
            self._fail(ImageError(f"{self.name}: connection lost: {e.strerror or e}"))
        finally:
            self._fail(ImageError(f"{self.name}: the connection is closed"))

    def _fail(self, exc: ImageError) -> None:
        """Kill the connection: every request in flight and every later call raise ``exc``."""
        with self._lock:
            if self._dead is not None:
                return
            self._dead = exc
            pending = list(self._pending.values())
            self._pending.clear()
            self._idle.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for req in pending:
            req.exc = exc
            req.done.set()

    def _join_reader(self) -> None:
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=max(1.0, self.timeout))

    # --- transmission: requests ----------------------------------------------------------

    def _send(self, parts: list[memoryview | bytes]) -> None:
        """Send a whole request; a partial one would corrupt the stream, so failure kills it."""
        views = [memoryview(p) for p in parts]
        try:
            while views:
                sent = self._sock.sendmsg(views)
                while sent and views:
                    if sent >= len(views[0]):
                        sent -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
        except TimeoutError:
            self._fail(ImageError(f"{self.name}: the server took no data for {self.timeout:g} s"))
        except OSError as e:
            self._fail(ImageError(f"{self.name}: connection lost: {e.strerror or e}"))

    def _submit(self, cmd: Cmd, offset: int, length: int, buf: memoryview | None = None,
                payload: memoryview | None = None) -> _Request:
        with self._lock:
            if self._dead is not None:
                raise ImageError(str(self._dead))
            cookie = next(self._cookies)
            req = _Request(cookie, cmd, offset, length, buf)
            self._pending[cookie] = req
        hdr = encode_request(cmd, cookie, offset, length)
        with self._send_lock:
            if self._dead is None:
                self._send([hdr, payload] if payload is not None else [hdr])
        return req

    def _wait(self, req: _Request) -> None:
        if not req.done.wait(self.timeout):
            self._fail(ImageError(f"{self.name}: no reply to {req.cmd.name} of {req.length} bytes at "
                                  f"{req.offset} in {self.timeout:g} s; connection dropped"))
            self._join_reader()  # so that no late reply lands in the caller's buffer
        if req.exc is not None:
            raise ImageError(str(req.exc))
        if req.error:
            err = req.error
            what = f"{req.cmd.name} of {req.length} bytes at {req.offset}" if req.length else req.cmd.name
            e = NbdServerError(f"{self.name}: {what} failed on the server: {error_name(err)}", err)
            if err == NBD_ESHUTDOWN:  # the spec: the client MUST then initiate a soft disconnect
                threading.Thread(target=self.close, daemon=True).start()
            raise e

    def _run(self, cmd: Cmd, offset: int, length: int, view: memoryview | None) -> None:
        """One command over ``offset .. offset+length``, split at the maximum payload and pipelined."""
        step = self.max_payload if cmd != Cmd.TRIM else (1 << 30)
        reqs: list[_Request] = []
        first: ImageError | None = None
        pos = 0
        while pos < length:
            n = min(step, length - pos)
            part = view[pos:pos + n] if view is not None else None
            try:
                if cmd == Cmd.READ:
                    reqs.append(self._submit(cmd, offset + pos, n, buf=part))
                else:
                    reqs.append(self._submit(cmd, offset + pos, n, payload=part))
            except ImageError as e:
                first = e
                break
            pos += n
        for r in reqs:  # wait for all, so that no reply arrives after we return
            try:
                self._wait(r)
            except ImageError as e:
                first = first or e
        if first is not None:
            raise first

    # --- BlockImage ------------------------------------------------------------------------

    def _check(self, what: str, offset: int, length: int) -> None:
        if self._dead is not None:
            raise ImageError(str(self._dead))
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(f"{self.name}: {what} of {length} bytes at {offset} is beyond the end of the "
                             f"disk ({self.size} bytes)")

    def _check_writable(self, what: str) -> None:
        if self.readonly:
            why = " (the server exports it read-only)" if self.flags & TransmissionFlag.READ_ONLY else ""
            raise ImageError(f"{self.name}: {what} refused: the disk is read-only{why}")

    def _aligned(self, offset: int, length: int) -> bool:
        return offset % self.min_block == 0 and length % self.min_block == 0

    def _widen(self, offset: int, length: int) -> tuple[int, int]:
        mb = self.min_block
        start = offset - offset % mb
        end = -(-(offset + length) // mb) * mb
        if end > self.size:
            raise ImageError(f"{self.name}: {length} bytes at {offset} reach into the export's last partial "
                             f"block (minimum block {mb}, size {self.size})")
        return start, end

    def readinto(self, offset: int, buf: memoryview) -> None:
        view = _bytes_view(buf)
        self._check("read", offset, len(view))
        if not view:
            return
        if self._aligned(offset, len(view)):
            self._run(Cmd.READ, offset, len(view), view)
            return
        start, end = self._widen(offset, len(view))
        tmp = bytearray(end - start)
        self._run(Cmd.READ, start, end - start, memoryview(tmp))
        view[:] = tmp[offset - start:offset - start + len(view)]

    def write(self, offset: int, data: memoryview | bytes) -> None:
        self._check_writable("write")
        view = _bytes_view(data)
        self._check("write", offset, len(view))
        if not view:
            return
        if self._aligned(offset, len(view)):
            self._run(Cmd.WRITE, offset, len(view), view)
            return
        start, end = self._widen(offset, len(view))
        with self._rmw_lock:
            tmp = bytearray(end - start)
            mb = self.min_block
            self._run(Cmd.READ, start, mb, memoryview(tmp)[:mb])
            if end - mb > start:
                self._run(Cmd.READ, end - mb, mb, memoryview(tmp)[-mb:])
            tmp[offset - start:offset - start + len(view)] = view
            self._run(Cmd.WRITE, start, end - start, memoryview(tmp))

    def flush(self) -> None:
        """``NBD_CMD_FLUSH``; covers every write that has returned.  Without ``SEND_FLUSH``, nothing."""
        if self._dead is not None:
            raise ImageError(str(self._dead))
        if self.readonly or not self.flags & TransmissionFlag.SEND_FLUSH:
            return
        self._wait(self._submit(Cmd.FLUSH, 0, 0))

    @property
    def supports_flush(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_FLUSH)

    @property
    def supports_discard(self) -> bool:
        return not self.readonly and bool(self.flags & TransmissionFlag.SEND_TRIM)

    def discard(self, offset: int, length: int) -> None:
        """``NBD_CMD_TRIM`` of the whole minimum blocks inside the range (a hint: may do nothing)."""
        self._check_writable("discard")
        self._check("discard", offset, length)
        if not self.supports_discard:
            return
        mb = self.min_block
        start = -(-offset // mb) * mb
        end = (offset + length) - (offset + length) % mb
        if end > start:
            self._run(Cmd.TRIM, start, end - start, None)

    @property
    def connected(self) -> bool:
        return self._dead is None

    def close(self) -> None:
        """Wait (bounded) for requests in flight, send ``NBD_CMD_DISC``, and close the socket."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            deadline = time.monotonic() + self.timeout
            while self._pending and self._dead is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
            alive = self._dead is None
        if alive:
            with self._send_lock:
                if self._dead is None:
                    self._send([encode_request(Cmd.DISC, next(self._cookies), 0, 0)])
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._join_reader()
        self._fail(ImageError(f"{self.name}: the disk is closed"))
        self._sock.close()
