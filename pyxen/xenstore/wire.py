"""The XenStore wire protocol (xen/include/public/io/xs_wire.h): framing only.

A message is a `struct xsd_sockmsg` header, four uint32s in the host's byte
order (little-endian on x86_64) -- type, req_id, tx_id, len -- followed by
`len` bytes of payload, at most XENSTORE_PAYLOAD_MAX (4096).  The same
framing is used on the unix socket and on a guest's shared ring.

`Parser` is incremental: feed it bytes as they arrive from any transport and
it returns the complete messages.  It never raises on input.  An unknown
type is not its business (the daemon answers ENOSYS, as xenstored does); a
length over the maximum makes the stream unrecoverable, so the parser stops
and sets `error` (XENSTORE_ERROR_PROTO), and the transport closes the
connection -- xenstored's `ignore_connection`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<IIII")
assert HEADER.size == 16        # sizeof(struct xsd_sockmsg)

XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_RING_SIZE = 1024

# struct xenstore_domain_interface: req[1024], rsp[1024], then these u32s
RING_REQ_OFF, RING_RSP_OFF = 0, 1024
RING_REQ_CONS, RING_REQ_PROD, RING_RSP_CONS, RING_RSP_PROD = 2048, 2052, 2056, 2060
RING_SERVER_FEATURES, RING_CONNECTION, RING_ERROR, RING_EVTCHN_PORT = 2064, 2068, 2072, 2076

XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_SERVER_FEATURE_WATCHDEPTH = 4
XENSTORE_SERVER_FEATURE_DOMID_ANY = 8
XENSTORE_CONNECTED, XENSTORE_RECONNECT = 0, 1
XENSTORE_ERROR_NONE, XENSTORE_ERROR_COMM, XENSTORE_ERROR_RINGIDX, XENSTORE_ERROR_PROTO = 0, 1, 2, 3


class Op(enum.IntEnum):
    """enum xsd_sockmsg_type."""

    CONTROL = 0            # XS_DEBUG is the same number
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26
    INVALID = 0xFFFF


XS_DEBUG = Op.CONTROL
XS_TYPE_COUNT = 27


@dataclass(frozen=True, slots=True)
class Message:
    type: int            # an Op, or any number a peer sent
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    def strings(self) -> list[str]:
        """The nul-terminated strings of the payload (get_strings): anything after the
        last nul is dropped.  Latin-1, so every byte maps to one character and back."""
        parts = self.payload.split(b"\0")
        return [p.decode("latin-1") for p in parts[:-1]]

    def onearg(self) -> str | None:
        """The payload as one string if it is exactly one, nul-terminated (onearg)."""
        p = self.payload
        if not p or p.find(b"\0") != len(p) - 1:
            return None
        return p[:-1].decode("latin-1")

    @property
    def op_name(self) -> str:
        try:
            return Op(self.type).name
        except ValueError:
            return f"type {self.type}"


def encode(type: int, payload: bytes, req_id: int = 0, tx_id: int = 0) -> bytes:
    return Message(type, req_id, tx_id, payload).encode()


def join(*strings: str) -> bytes:
    """Strings as a payload, each nul-terminated (latin-1)."""
    return b"".join(s.encode("latin-1") + b"\0" for s in strings)


class Parser:
    """Turns a byte stream into `Message`s.  After a fatal framing error, `error`
    holds an XENSTORE_ERROR_* code and `reason` says why; all further input is ignored."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.error = XENSTORE_ERROR_NONE
        self.reason = ""

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        if self.error:
            return []
        self._buf += data
        out: list[Message] = []
        off = 0
        buf = self._buf
        while len(buf) - off >= HEADER.size:
            type_, req_id, tx_id, length = HEADER.unpack_from(buf, off)
            if length > XENSTORE_PAYLOAD_MAX:
                self.error = XENSTORE_ERROR_PROTO
                self.reason = f"payload length {length} > {XENSTORE_PAYLOAD_MAX}"
                self._buf = bytearray()
                return out
            end = off + HEADER.size + length
            if end > len(buf):
                break
            out.append(Message(type_, req_id, tx_id, bytes(buf[off + HEADER.size:end])))
            off = end
        if off:
            del buf[:off]
        return out
