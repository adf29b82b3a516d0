"""The conversation around a migration stream, as xl's (``tools/xl/xl.h``,
``xl_migrate.c``), with one addition for the reservation stage.

    receiver -> sender   banner "xl migration receiver ready, send binary domain data.\\n"
    sender -> receiver   the xl header (magic, flags, the domain's config)
    receiver -> sender   pyxen: "pyxen migration: reserved <domid>\\n" or
                         "pyxen migration: refused: <why>\\n"  (reservation)
    sender -> receiver   the libxl/libxc stream, live rounds then the last, END;
                         each live round ends with a PYXEN_ROUND_END record
    receiver -> sender   pyxen: "pyxen migration: round applied <n>\\n" for each
                         (its page tables validated); the sender suspends the
                         guest only once the last live round is applied
    receiver -> sender   "domain received, ready to unpause\\0"
    sender -> receiver   "domain is yours, you are cleared to unpause\\0"
    receiver -> sender   "my copy unpause results are as follows\\0" + one byte (0: runs)

The sender releases its domain only after the report says 0 (commitment);
anything else before that (the connection cut, a refusal, a bad report)
resumes it.  xl sends the NUL of each fixed message but not the banner's.
"""

from __future__ import annotations

import os
import select
import time

BANNER = b"xl migration receiver ready, send binary domain data.\n"
READY = b"domain received, ready to unpause\0"
GO = b"domain is yours, you are cleared to unpause\0"
REPORT = b"my copy unpause results are as follows\0"
RESERVED = b"pyxen migration: reserved "
APPLIED = b"pyxen migration: round applied "  # + the round number, "\n"
REFUSED = b"pyxen migration: refused: "
MAX_LINE = 4096


class ProtocolError(Exception):
    """The other side said something else, or nothing in time, or went away."""


def read_exact(fd: int, n: int, timeout: float, what: str) -> bytes:
    """``n`` bytes from ``fd`` within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    buf = b""
    while len(buf) < n:
        left = end - time.monotonic()
        if left <= 0:
            raise ProtocolError(f"no {what} within {timeout:g} s")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        try:
            b = os.read(fd, n - len(buf))
        except OSError as e:
            raise ProtocolError(f"reading the {what}: {e.strerror}") from None
        if not b:
            raise ProtocolError(f"the other side closed the connection before the {what}"
                                + (f" (got {buf[:80]!r})" if buf else ""))
        buf += b
    return buf


def expect(fd: int, msg: bytes, timeout: float, what: str) -> None:
    got = read_exact(fd, len(msg), timeout, what)
    if got != msg:
        raise ProtocolError(f"expected the {what} {msg!r}, got {got!r}")


def read_line(fd: int, timeout: float, what: str) -> bytes:
    """One line, read a byte at a time (nothing after it is consumed: the
    rest of the connection belongs to someone else)."""
    out = b""
    while not out.endswith(b"\n"):
        out += read_exact(fd, 1, timeout, what)
        if len(out) > MAX_LINE:
            raise ProtocolError(f"the {what} is longer than {MAX_LINE} bytes")
    return out


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def wait_applied(fd: int, n: int, timeout: float) -> None:
    """Read the receiver's acknowledgements up to the one for round ``n``."""
    while True:
        line = read_line(fd, timeout, f"acknowledgement of round {n}")
        if not line.startswith(APPLIED):
            raise ProtocolError(f"expected a round acknowledgement, got {line[:200]!r}")
        try:
            got = int(line[len(APPLIED):])
        except ValueError:
            raise ProtocolError(f"bad round acknowledgement {line[:200]!r}") from None
        if got >= n:
            return


def parse_reservation(line: bytes) -> int:
    """The domid the receiver reserved; ProtocolError with its reason if it refused."""
    if line.startswith(REFUSED):
        raise ProtocolError("the destination refused the domain: "
                            + line[len(REFUSED):].decode(errors="replace").strip())
    if line.startswith(RESERVED):
        try:
            return int(line[len(RESERVED):].strip())
        except ValueError:
            pass
    raise ProtocolError(f"unexpected answer to the domain's config: {line[:200]!r}")


def read_xl_header(fd: int, timeout: float) -> tuple[object, bytes]:
    """The xl header a sender starts with (its config: what to reserve), read
    exactly (the stream after it is handed on as it is).  (XlHeader, raw)."""
    import io
    import struct

    from . import stream as S
    head = read_exact(fd, 48, timeout, "xl header")
    optlen = struct.unpack_from("<I", head, 44)[0]
    if optlen > S.XL_OPTDATA_MAX:
        raise S.StreamError(f"xl optional data of {optlen} bytes (max {S.XL_OPTDATA_MAX})")
    raw = head + read_exact(fd, optlen, timeout, "xl header's config")
    return S.XlHeader.read(S.Reader(io.BytesIO(raw), "migration stream")), raw


#: A migration connection that goes silent (a cut link: no RST, no FIN) fails
#: after this many seconds instead of blocking until TCP's own ~15 minutes.
DEAD_PEER_S = 5


def tune_socket(sock: object) -> None:
    """Keepalive probes and TCP_USER_TIMEOUT on a migration's TCP socket, so
    that both sides notice a cut link within ~DEAD_PEER_S seconds (the
    sender then resumes its domain, the receiver drops the half-received
    one).  Best effort: a socket without these options is left as it is."""
    import socket as _s
    if not isinstance(sock, _s.socket):
        return
    for level, opt, val in ((_s.SOL_SOCKET, _s.SO_KEEPALIVE, 1),
                            (_s.IPPROTO_TCP, getattr(_s, "TCP_KEEPIDLE", 4), 2),
                            (_s.IPPROTO_TCP, getattr(_s, "TCP_KEEPINTVL", 5), 1),
                            (_s.IPPROTO_TCP, getattr(_s, "TCP_KEEPCNT", 6), DEAD_PEER_S - 2),
                            (_s.IPPROTO_TCP, getattr(_s, "TCP_USER_TIMEOUT", 18), DEAD_PEER_S * 1000)):
        try:
            sock.setsockopt(level, opt, val)
        except OSError:
            pass
