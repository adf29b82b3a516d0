"""The toolstack's control protocol: one JSON object per line on unix sockets.

Requests carry ``op``; replies carry ``ok`` and either results or ``error``
(a message for the user).  Domain processes use the same framing on their
connection to the daemon (``event`` messages out, ``op`` requests in, replies
matched by ``id``).  Consoles are separate: a client connects to the domain's
own ``domain-N.sock``, sends one JSON line of options, then raw bytes flow.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any, NamedTuple

MAX_LINE = 1 << 20
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class PeerCred(NamedTuple):
    """Who is at the other end of a unix socket, as the kernel recorded it at
    connect() time (SO_PEERCRED): it cannot be forged by what the peer sends."""

    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    return PeerCred(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   _UCRED.size)))


def peer_allowed(cred: PeerCred) -> bool:
    """The toolstack's rule, as Xen's "only root may use xl and xenstored": a
    connection is served only if it comes from the user this process runs as
    (the daemon's owner) or from root."""
    return cred.uid in (0, os.geteuid())


class ProtocolError(Exception):
    pass


class Conn:
    """A JSON-lines connection (buffered reader + sender)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    @classmethod
    def connect(cls, path: str, timeout: float | None = None) -> Conn:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(path)
        s.settimeout(None)
        return cls(s)

    def send(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    def recv(self) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise ProtocolError("control message too long")
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ProtocolError(f"malformed control message: {e}") from None
        if not isinstance(obj, dict):
            raise ProtocolError("control message is not an object")
        return obj

    def call(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.send(obj)
        r = self.recv()
        if r is None:
            raise ProtocolError("connection closed")
        return r

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
