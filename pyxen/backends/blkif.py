"""The blkif protocol (io/blkif.h, io/ring.h), free of I/O: ring layout,
request parsing with every check a malicious frontend calls for, responses.

Shared ring (ring.h): ``{u32 req_prod, req_event, rsp_prod, rsp_event;
u8 pad[48]; union {request, response} ring[N]}`` where N is the largest power
of two that fits the ring's pages.  Requests are 112 bytes on x86_64.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..hv import atomic

OP_READ, OP_WRITE, OP_WRITE_BARRIER, OP_FLUSH_DISKCACHE = 0, 1, 2, 3
OP_DISCARD, OP_INDIRECT = 5, 6
RSP_OKAY, RSP_ERROR, RSP_EOPNOTSUPP = 0, -1, -2
MAX_SEGMENTS = 11
MAX_INDIRECT_PAGES = 8
SEGS_PER_INDIRECT_PAGE = 512
MAX_INDIRECT_SEGMENTS = 256  # what we advertise (feature-max-indirect-segments)
VDISK_READONLY = 0x4
SECTOR = 512

SRING_HDR = struct.Struct("<IIII48x")
REQ_SIZE = 112
RSP = struct.Struct("<QBxh4x")  # id, operation, status
REQ_HDR = struct.Struct("<BBHxxxxQQ")  # operation, nr_segments, handle, id, sector_number
SEG = struct.Struct("<IBBxx")  # gref, first_sect, last_sect
DISCARD = struct.Struct("<BBHxxxxQQQ")  # op, flag, handle, id, sector_number, nr_sectors
INDIRECT = struct.Struct("<BBHxxxxQQHxx8I")  # op, indirect_op, nr_segments, id, sector, handle, grefs
assert SRING_HDR.size == 64 and RSP.size == 16 and REQ_HDR.size == 24 and SEG.size == 8
assert INDIRECT.size == 60

STATE_UNKNOWN, STATE_INITIALISING, STATE_INITWAIT, STATE_INITIALISED = 0, 1, 2, 3
STATE_CONNECTED, STATE_CLOSING, STATE_CLOSED = 4, 5, 6


def ring_entries(pages: int) -> int:
    n = (pages * 4096 - SRING_HDR.size) // REQ_SIZE
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


class ProtocolError(Exception):
    """The frontend broke the protocol: the backend disconnects."""


@dataclass
class Segment:
    gref: int
    first: int
    last: int

    @property
    def nbytes(self) -> int:
        return (self.last - self.first + 1) * SECTOR


@dataclass
class Request:
    operation: int
    id: int
    sector: int
    handle: int = 0
    segments: list[Segment] | None = None
    nr_sectors: int = 0  # discard
    indirect_op: int = -1
    indirect_grefs: list[int] | None = None
    nr_indirect: int = 0
    error: str = ""  # a per-request error: answer BLKIF_RSP_ERROR, keep the ring

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments or [])


def parse_segments(raw: bytes, n: int) -> tuple[list[Segment], str]:
    segs = []
    for i in range(n):
        gref, first, last = SEG.unpack_from(raw, i * SEG.size)
        if first > last or last > 7:
            return [], f"segment {i}: sectors {first}..{last} outside a page"
        segs.append(Segment(gref, first, last))
    return segs, ""


def parse_request(raw: bytes) -> Request:
    """One ring slot.  Unknown operations and bad segment counts become a
    Request with ``error`` set (answered with an error, the ring survives)."""
    op = raw[0]
    if op in (OP_READ, OP_WRITE, OP_WRITE_BARRIER, OP_FLUSH_DISKCACHE):
        op, nseg, handle, rid, sector = REQ_HDR.unpack_from(raw)
        if op in (OP_READ, OP_WRITE) and not 1 <= nseg <= MAX_SEGMENTS:
            return Request(op, rid, sector, handle, error=f"{nseg} segments")
        if nseg > MAX_SEGMENTS:
            return Request(op, rid, sector, handle, error=f"{nseg} segments")
        segs, err = parse_segments(raw[REQ_HDR.size:], nseg)
        return Request(op, rid, sector, handle, segs, error=err)
    if op == OP_DISCARD:
        op, _flag, handle, rid, sector, nr = DISCARD.unpack_from(raw)
        return Request(op, rid, sector, handle, nr_sectors=nr)
    if op == OP_INDIRECT:
        op, iop, nseg, rid, sector, handle, *grefs = INDIRECT.unpack_from(raw)
        req = Request(op, rid, sector, handle, indirect_op=iop)
        if iop not in (OP_READ, OP_WRITE):
            req.error = f"indirect operation {iop}"
        elif not 1 <= nseg <= MAX_INDIRECT_SEGMENTS:
            req.error = f"{nseg} indirect segments (max {MAX_INDIRECT_SEGMENTS})"
        else:
            pages = (nseg + SEGS_PER_INDIRECT_PAGE - 1) // SEGS_PER_INDIRECT_PAGE
            req.indirect_grefs = list(grefs[:pages])
            req.nr_indirect = nseg
        return req
    rid = struct.unpack_from("<Q", raw, 8)[0]
    return Request(op, rid, 0, error=f"operation {op}")


def check_range(req: Request, sectors: int) -> str:
    """Requests must stay inside the disk."""
    if req.operation == OP_DISCARD:
        end = req.sector + req.nr_sectors
    else:
        end = req.sector + req.nbytes // SECTOR
    if req.sector >= 1 << 63 or end > sectors:
        return f"sectors {req.sector}..{end} beyond the disk ({sectors} sectors)"
    return ""


class BackRing:
    """The backend's view of a shared ring in guest memory (``buf[off:]``)."""

    def __init__(self, buf: memoryview, entries: int) -> None:
        self.buf = buf
        self.n = entries
        # The indexes are shared with a guest running on another CPU: read and
        # written with single 32-bit loads and stores, never byte by byte.
        self.addr = atomic.view_address(buf)
        self.rsp_prod_pvt = atomic.load32(self.addr + 8)
        self.req_cons = self.rsp_prod_pvt  # nothing outstanding at attach

    def pending_requests(self) -> int:
        req_prod = atomic.load32(self.addr)
        n = (req_prod - self.req_cons) & 0xFFFFFFFF
        if n > self.n:
            raise ProtocolError(f"request producer {req_prod} ran {n} entries ahead of consumer "
                                f"{self.req_cons} (ring of {self.n})")
        return n

    def take_request(self) -> bytes:
        i = self.req_cons % self.n
        off = SRING_HDR.size + i * REQ_SIZE
        raw = bytes(self.buf[off:off + REQ_SIZE])
        self.req_cons = (self.req_cons + 1) & 0xFFFFFFFF
        return raw

    def put_response(self, rid: int, op: int, status: int) -> None:
        i = self.rsp_prod_pvt % self.n
        RSP.pack_into(self.buf, SRING_HDR.size + i * REQ_SIZE, rid, op, status)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & 0xFFFFFFFF

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY."""
        old = atomic.load32(self.addr + 8)
        new = self.rsp_prod_pvt
        atomic.store32(self.addr + 8, new)
        rsp_event = atomic.load32(self.addr + 12)
        return ((new - rsp_event) & 0xFFFFFFFF) < ((new - old) & 0xFFFFFFFF)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: re-arm req_event, then look again."""
        if self.pending_requests():
            return True
        atomic.store32(self.addr + 4, (self.req_cons + 1) & 0xFFFFFFFF)
        return self.pending_requests() > 0
