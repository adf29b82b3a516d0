"""The netif protocol (io/netif.h, io/ring.h), free of I/O.

What a network backend needs to know about the wire and nothing else, so
that every rule a hostile frontend can test is a pure function here:

* the layouts: ``netif_tx_request`` (12 bytes: gref, offset, flags, id,
  size), ``netif_tx_response`` (id, status), ``netif_rx_request`` (id, gref),
  ``netif_rx_response`` (id, offset, flags, status) and the 8-byte
  ``netif_extra_info`` that takes a whole ring slot on either ring;
* :class:`BackRing`, the backend's end of a one-page shared ring (the slot is
  the union of request and response: 12 bytes on TX, 8 on RX, 256 entries);
* :func:`parse_tx`: one packet's slot chain with Linux netback's answers
  (``xenvif_tx_build_gops``/``xenvif_get_extras``/``xenvif_count_requests``):
  a packet of more than ``XEN_NETIF_NR_SLOTS_MIN`` (18) follow-on slots, a
  slot bigger than what is left of the frame, or a first slot shorter than an
  Ethernet header is *dropped* (every slot answered ``XEN_NETIF_RSP_ERROR``,
  the ring carries on); a chain of 20 or more follow-on slots, a slot that
  crosses its page, a chain that runs past what the frontend has queued, a bad
  extra type or a bad GSO descriptor is *fatal* (Linux's
  ``xenvif_fatal_tx_err``: the vif is disconnected);
* the RX plan (:func:`rx_plan`): how a frame is cut into the frontend's
  posted pages and which response (and GSO extra) each slot gets
  (``xenvif_rx_skb``: data slots from offset 0, the extra right after the
  first data slot, ``more_data`` on all but the last);
* checksum/GSO state both ways through a TAP's ``virtio_net_hdr``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ..hv import atomic

PAGE = 4096
ETH_HLEN = 14

# --- netif.h ------------------------------------------------------------------------------
NETTXF_CSUM_BLANK = 1 << 0
NETTXF_DATA_VALIDATED = 1 << 1
NETTXF_MORE_DATA = 1 << 2
NETTXF_EXTRA_INFO = 1 << 3

NETRXF_DATA_VALIDATED = 1 << 0
NETRXF_CSUM_BLANK = 1 << 1
NETRXF_MORE_DATA = 1 << 2
NETRXF_EXTRA_INFO = 1 << 3
NETRXF_GSO_PREFIX = 1 << 4

EXTRA_TYPE_NONE, EXTRA_TYPE_GSO, EXTRA_TYPE_MCAST_ADD, EXTRA_TYPE_MCAST_DEL = 0, 1, 2, 3
EXTRA_TYPE_HASH, EXTRA_TYPE_MAX = 4, 5
EXTRA_FLAG_MORE = 1 << 0

GSO_TYPE_NONE, GSO_TYPE_TCPV4, GSO_TYPE_TCPV6 = 0, 1, 2

RSP_DROPPED, RSP_ERROR, RSP_OKAY, RSP_NULL = -2, -1, 0, 1

#: follow-on slots a packet may use (XEN_NETIF_NR_SLOTS_MIN, Linux's XEN_NETBK_LEGACY_SLOTS_MAX):
#: more are dropped ...
NR_SLOTS_MIN = 18
#: ... and this many are malice: the vif is disconnected (Linux's fatal_skb_slots default)
FATAL_SKB_SLOTS = 20

SRING_HDR = struct.Struct("<IIII48x")  # req_prod, req_event, rsp_prod, rsp_event, pad
TX_REQ = struct.Struct("<IHHHH")  # gref, offset, flags, id, size
TX_RSP = struct.Struct("<Hh")  # id, status
RX_REQ = struct.Struct("<HxxI")  # id, (pad), gref
RX_RSP = struct.Struct("<HHHh")  # id, offset, flags, status
EXTRA_HDR = struct.Struct("<BB")  # type, flags
EXTRA_GSO = struct.Struct("<BBHBxH")  # type, flags, gso.size, gso.type, pad, gso.features
TX_SLOT = max(TX_REQ.size, TX_RSP.size)
RX_SLOT = max(RX_REQ.size, RX_RSP.size)
assert SRING_HDR.size == 64 and TX_SLOT == 12 and RX_SLOT == 8 and EXTRA_GSO.size == 8

# --- virtio_net.h (the TAP's IFF_VNET_HDR header) -----------------------------------------
VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6 = 0, 1, 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

STATE_UNKNOWN, STATE_INITIALISING, STATE_INITWAIT, STATE_INITIALISED = 0, 1, 2, 3
STATE_CONNECTED, STATE_CLOSING, STATE_CLOSED = 4, 5, 6


def ring_entries(slot_size: int, pages: int = 1) -> int:
    """__RING_SIZE: the largest power of two of slots that fits after the header."""
    n = (pages * PAGE - SRING_HDR.size) // slot_size
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


TX_RING_SIZE = ring_entries(TX_SLOT)
RX_RING_SIZE = ring_entries(RX_SLOT)


class ProtocolError(Exception):
    """The frontend broke the protocol: the backend disconnects the vif."""


class BackRing:
    """The backend's end of a shared ring at ``buf`` (one page), ring.h's
    ``BACK_RING``.  The indexes are shared with a guest running on another
    CPU: read and written with single 32-bit atomic loads and stores."""

    def __init__(self, buf: memoryview, slot_size: int) -> None:
        self.buf = buf
        self.slot = slot_size
        self.n = ring_entries(slot_size, len(buf) // PAGE)
        self.addr = atomic.view_address(buf)
        self.rsp_prod_pvt = atomic.load32(self.addr + 8)
        self.req_cons = self.rsp_prod_pvt  # nothing outstanding at attach

    def unconsumed(self) -> int:
        """Requests queued and not taken (XEN_RING_NR_UNCONSUMED_REQUESTS);
        a producer more than a ring ahead is a ProtocolError (netback's
        "Impossible number of requests")."""
        req_prod = atomic.load32(self.addr)
        n = (req_prod - self.req_cons) & 0xFFFFFFFF
        if n > self.n:
            raise ProtocolError(f"request producer {req_prod} ran {n} entries ahead of consumer "
                                f"{self.req_cons} (ring of {self.n})")
        room = self.n - ((self.req_cons - self.rsp_prod_pvt) & 0xFFFFFFFF)
        return min(n, max(room, 0))

    def _off(self, idx: int) -> int:
        return SRING_HDR.size + (idx % self.n) * self.slot

    def request(self, i: int = 0) -> bytes:
        """A copy of the request ``i`` slots after the consumer (RING_COPY_REQUEST:
        the guest may rewrite the slot after we looked; we only use the copy)."""
        off = self._off((self.req_cons + i) & 0xFFFFFFFF)
        return bytes(self.buf[off:off + self.slot])

    def consume(self, n: int) -> None:
        self.req_cons = (self.req_cons + n) & 0xFFFFFFFF

    def put_response(self, raw: bytes, at: int = 0) -> None:
        """Write a response (or, for an extra slot, only its first bytes at
        offset ``at``) into the next response slot and advance."""
        off = self._off(self.rsp_prod_pvt)
        self.buf[off + at:off + at + len(raw)] = raw
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & 0xFFFFFFFF

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish, and say whether the
        frontend asked (rsp_event) to be told."""
        old = atomic.load32(self.addr + 8)
        new = self.rsp_prod_pvt
        atomic.store32(self.addr + 8, new)
        rsp_event = atomic.load32(self.addr + 12)
        return ((new - rsp_event) & 0xFFFFFFFF) < ((new - old) & 0xFFFFFFFF)

    def set_req_event(self, value: int) -> None:
        atomic.store32(self.addr + 4, value & 0xFFFFFFFF)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: re-arm req_event, then look again."""
        if self.unconsumed():
            return True
        self.set_req_event(self.req_cons + 1)
        return self.unconsumed() > 0


# --- TX ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TxRequest:
    gref: int
    offset: int
    flags: int
    id: int
    size: int

    @classmethod
    def unpack(cls, raw: bytes) -> TxRequest:
        return cls(*TX_REQ.unpack_from(raw))

    def pack(self) -> bytes:
        return TX_REQ.pack(self.gref, self.offset, self.flags, self.id, self.size)


@dataclass(frozen=True)
class ExtraInfo:
    type: int
    flags: int
    gso_size: int = 0
    gso_type: int = 0
    gso_features: int = 0

    @classmethod
    def unpack(cls, raw: bytes) -> ExtraInfo:
        t, f, size, gtype, feat = EXTRA_GSO.unpack_from(raw)
        return cls(t, f, size, gtype, feat)

    def pack(self) -> bytes:
        return EXTRA_GSO.pack(self.type, self.flags, self.gso_size, self.gso_type, self.gso_features)


@dataclass
class TxPacket:
    """One packet's slot chain as taken off the TX ring.

    ``slots`` ring slots were consumed (data and extra).  ``data`` are the
    data slots, first to last, each with the bytes *it* carries (the first
    slot's ``size`` on the ring is the whole frame's length; here it is what
    is left of it after the follow-on slots, as netback computes it).  A
    ``drop`` packet is answered RSP_ERROR in every slot; a ``fatal`` one means
    the vif must be disconnected (no answer).  ``control`` packets (multicast
    extras) carry no frame and are answered RSP_OKAY."""

    slots: int
    first: TxRequest | None = None
    data: list[TxRequest] = field(default_factory=list)
    extras: dict[int, ExtraInfo] = field(default_factory=dict)
    extra_count: int = 0
    length: int = 0  # the frame's length, as the first slot said
    drop: str = ""
    fatal: str = ""
    control: bool = False

    @property
    def gso(self) -> ExtraInfo | None:
        return self.extras.get(EXTRA_TYPE_GSO)

    def responses(self, status: int) -> list[tuple[int | None, int]]:
        """(id, status) for each slot consumed, in ring order: the first slot,
        RSP_NULL for each extra (id left as the slot has it: None), then each
        follow-on slot (make_tx_response / xenvif_tx_err)."""
        out: list[tuple[int | None, int]] = []
        if self.first is None:
            return out
        out.append((self.first.id, status))
        out += [(None, RSP_NULL)] * self.extra_count
        out += [(t.id, status) for t in self.data[1:]]
        return out


def parse_tx(slot: Callable[[int], bytes], avail: int) -> TxPacket | None:
    """Take one packet's chain off the TX ring: ``slot(i)`` is a copy of the
    request ``i`` slots past the consumer, ``avail`` how many are queued.
    None when nothing is queued.  Linux netback's rules (see the module doc)."""
    if avail <= 0:
        return None
    first = TxRequest.unpack(slot(0))
    pkt = TxPacket(slots=1, first=first, length=first.size)
    i = 1
    if first.flags & NETTXF_EXTRA_INFO:
        while True:
            if i >= avail:
                pkt.fatal = "missing extra info"
                return pkt
            e = ExtraInfo.unpack(slot(i))
            i += 1
            pkt.extra_count += 1
            if e.type == EXTRA_TYPE_NONE or e.type >= EXTRA_TYPE_MAX:
                pkt.slots, pkt.fatal = i, f"invalid extra type {e.type}"
                return pkt
            pkt.extras[e.type] = e
            if not e.flags & EXTRA_FLAG_MORE:
                break
    pkt.slots = i
    if EXTRA_TYPE_MCAST_ADD in pkt.extras or EXTRA_TYPE_MCAST_DEL in pkt.extras:
        pkt.control = True  # a multicast filter change: answered at once, no frame
        pkt.data = [first]
        return pkt
    # xenvif_count_requests: the follow-on slots, the first's size shrinking to its own
    remaining = first.size
    frags: list[TxRequest] = []
    if first.flags & NETTXF_MORE_DATA:
        work = avail - i
        n = 0
        while True:
            if n >= work:
                pkt.slots, pkt.fatal = i + n, f"asked for {n + 1} slots but only {work} are queued"
                return pkt
            if n >= FATAL_SKB_SLOTS:
                pkt.slots, pkt.fatal = i + n, f"malicious frontend using {n} slots (threshold " \
                                               f"{FATAL_SKB_SLOTS})"
                return pkt
            if not pkt.drop and n >= NR_SLOTS_MIN:
                pkt.drop = f"too many slots ({n + 1}) exceeding limit ({NR_SLOTS_MIN})"
            t = TxRequest.unpack(slot(i + n))
            if not pkt.drop and t.size > remaining:
                pkt.drop = f"slot size {t.size} > remaining size {remaining}"
            remaining = (remaining - t.size) & 0xFFFF  # netback's u16 first->size
            n += 1
            if t.offset + t.size > PAGE:
                pkt.slots, pkt.fatal = i + n, f"slot crosses a page: offset {t.offset}, size {t.size}"
                return pkt
            frags.append(t)
            if not t.flags & NETTXF_MORE_DATA:
                break
        i += n
    pkt.slots = i
    head = TxRequest(first.gref, first.offset, first.flags, first.id, remaining)
    pkt.data = [head, *frags]
    if pkt.drop:
        return pkt
    if remaining < ETH_HLEN:
        pkt.drop = f"bad packet size: {remaining}"
        return pkt
    if first.offset + remaining > PAGE:
        pkt.fatal = f"first slot crosses a page: offset {first.offset}, size {remaining}"
        return pkt
    gso = pkt.gso
    if gso is not None:
        if gso.gso_size == 0:
            pkt.fatal = "GSO size must not be zero"
        elif gso.gso_type not in (GSO_TYPE_TCPV4, GSO_TYPE_TCPV6):
            pkt.fatal = f"bad GSO type {gso.gso_type}"
    return pkt


# --- the TX rate limit (rate=) --------------------------------------------------------------------
#: a window's credit may grow to this even when the rate gives less, so that a
#: 64 KiB GSO frame always gets through (netback's tx_add_credit: 128 KiB)
MAX_BURST = 131072


class TxCredit:
    """Xen's credit-based TX limiter (netback's ``tx_credit_exceeded`` and
    ``tx_add_credit``): each ``usec`` interval adds ``credit_bytes`` of credit,
    capped at max(MAX_BURST, credit_bytes); a packet bigger than the credit
    left waits until the next window (and everything behind it with it).
    Times are seconds from any monotonic clock, given by the caller."""

    def __init__(self, credit_bytes: int, usec: int, now: float) -> None:
        self.credit_bytes, self.usec = credit_bytes, usec
        self.remaining = credit_bytes
        self.window_start = now
        self.timer: float | None = None  # the window the limiter waits for

    def _add(self) -> None:
        self.remaining = min(self.remaining + self.credit_bytes, max(MAX_BURST, self.credit_bytes))

    def wait(self, size: int, now: float) -> float:
        """0.0: send a packet of ``size`` bytes now (its credit is taken);
        else how long to wait before asking again."""
        if self.timer is not None:
            if now < self.timer:
                return self.timer - now
            self.timer = None
            self._add()  # the timer's callback
        if size > self.remaining:
            next_credit = self.window_start + self.usec / 1e6
            if now >= next_credit:
                self.window_start = now
                self._add()
                # Linux arms its timer at the next_credit it computed before
                # this refill, which is then in the past: the timer fires at
                # once and refills a second time, so packets bigger than the
                # credit pass at up to twice the rate.  The next refill is one
                # interval after this one.
                next_credit = now + self.usec / 1e6
            if size > self.remaining:
                self.timer = self.window_start = next_credit
                return max(next_credit - now, 1e-6)
        self.remaining -= size
        return 0.0


# --- checksums and the TAP's virtio_net_hdr ------------------------------------------------------
_IPV6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options: skipped


def l4_checksum_place(frame: bytes | bytearray | memoryview) -> tuple[int, int, int] | None:
    """Where a partial TCP/UDP checksum of ``frame`` goes (skb_checksum_setup):
    (csum_start, csum_offset, l4 protocol), or None when the frame is not plain
    IPv4/IPv6 TCP or UDP (fragments, other protocols, truncated headers)."""
    if len(frame) < ETH_HLEN:
        return None
    etype = int.from_bytes(frame[12:14], "big")
    off = ETH_HLEN
    if etype == 0x0800:
        if len(frame) < off + 20 or frame[off] >> 4 != 4:
            return None
        ihl = (frame[off] & 0xF) * 4
        frag = int.from_bytes(frame[off + 6:off + 8], "big")
        if ihl < 20 or frag & 0x3FFF:  # MF or an offset: a fragment
            return None
        proto = frame[off + 9]
        start = off + ihl
    elif etype == 0x86DD:
        if len(frame) < off + 40 or frame[off] >> 4 != 6:
            return None
        proto = frame[off + 6]
        start = off + 40
        for _ in range(8):
            if proto not in _IPV6_EXT:
                break
            if len(frame) < start + 8:
                return None
            proto, start = frame[start], start + (frame[start + 1] + 1) * 8
    else:
        return None
    if proto == 6:
        place = 16
    elif proto == 17:
        place = 6
    else:
        return None
    if len(frame) < start + place + 2:
        return None
    return start, place, proto


def inet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``: the complemented 16-bit
    one's complement sum."""
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    s = initial + sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def complete_checksum(frame: bytearray, start: int, offset: int) -> bool:
    """Finish a partial checksum (skb_checksum_help): the field at
    ``start+offset`` holds the pseudo-header sum; fold everything from
    ``start`` and store the result.  False when the place is outside the frame."""
    if start + offset + 2 > len(frame) or start < 0:
        return False
    c = inet_checksum(frame[start:])
    if c == 0 and offset == 6:  # UDP: a zero checksum means "none": send 0xffff
        c = 0xFFFF
    frame[start + offset:start + offset + 2] = c.to_bytes(2, "big")
    return True


def tx_vnet_header(pkt: TxPacket, frame: bytes | bytearray | memoryview) -> bytes | None:
    """The virtio_net_hdr that takes a guest's frame into the host's stack
    with its checksum/GSO state (netback: csum_blank -> CHECKSUM_PARTIAL set up
    by checksum_setup; data_validated -> CHECKSUM_UNNECESSARY; the GSO extra).
    None: the frame must be dropped (a partial checksum netback cannot place,
    as its "Can't setup checksum" drop)."""
    flags = pkt.first.flags if pkt.first else 0
    gso = pkt.gso
    hflags = gtype = hdr_len = gsize = cstart = coff = 0
    if flags & NETTXF_CSUM_BLANK or gso is not None:
        place = l4_checksum_place(frame)
        if place is None:
            return None
        cstart, coff, proto = place
        hflags = VIRTIO_NET_HDR_F_NEEDS_CSUM
        if gso is not None:
            if proto != 6:
                return None
            gtype = VIRTIO_NET_HDR_GSO_TCPV4 if gso.gso_type == GSO_TYPE_TCPV4 else VIRTIO_NET_HDR_GSO_TCPV6
            gsize = gso.gso_size
            hdr_len = cstart + (frame[cstart + 12] >> 4) * 4
    elif flags & NETTXF_DATA_VALIDATED:
        hflags = VIRTIO_NET_HDR_F_DATA_VALID
    return VNET_HDR.pack(hflags, gtype, hdr_len, gsize, cstart, coff)


@dataclass(frozen=True)
class RxMeta:
    """What a frame read from the TAP tells the frontend besides its bytes."""

    flags: int  # NETRXF_DATA_VALIDATED / NETRXF_CSUM_BLANK
    gso_type: int = GSO_TYPE_NONE
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0


def rx_meta(hdr: bytes) -> RxMeta | None:
    """Read a TAP's virtio_net_hdr: None for GSO kinds netif cannot carry
    (UDP, ECN: they never come, the TAP is not offered them)."""
    hflags, gtype, _hl, gsize, cstart, coff = VNET_HDR.unpack_from(hdr)
    flags = 0
    if hflags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        flags = NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED
    elif hflags & VIRTIO_NET_HDR_F_DATA_VALID:
        flags = NETRXF_DATA_VALIDATED
    g = gtype & ~VIRTIO_NET_HDR_GSO_ECN
    if gtype & VIRTIO_NET_HDR_GSO_ECN or g not in (VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
                                                    VIRTIO_NET_HDR_GSO_TCPV6):
        return None
    xg = {VIRTIO_NET_HDR_GSO_NONE: GSO_TYPE_NONE, VIRTIO_NET_HDR_GSO_TCPV4: GSO_TYPE_TCPV4,
          VIRTIO_NET_HDR_GSO_TCPV6: GSO_TYPE_TCPV6}[g]
    return RxMeta(flags, xg, gsize if xg else 0, cstart, coff)


# --- RX ---------------------------------------------------------------------------------------
def rx_slots_needed(length: int, gso: bool) -> int:
    """xenvif_rx_ring_slots_needed: one per page of data, one for the GSO extra."""
    return max(1, -(-length // PAGE)) + (1 if gso else 0)


@dataclass(frozen=True)
class RxSlot:
    """One RX ring slot of a packet: a data chunk ``frame[start:start+length]``
    copied to offset 0 of the posted page, or (``extra``) the GSO descriptor."""

    start: int = 0
    length: int = 0
    flags: int = 0
    extra: ExtraInfo | None = None

    def response(self, req_id: int) -> bytes:
        if self.extra is not None:
            return self.extra.pack()
        return RX_RSP.pack(req_id, 0, self.flags, self.length)


def rx_plan(length: int, meta: RxMeta) -> list[RxSlot]:
    """The slots a frame of ``length`` bytes takes (xenvif_rx_skb): data from
    offset 0 of each page, ``more_data`` on all but the last data slot, the
    checksum flags and ``extra_info`` on the first, the GSO extra right after it."""
    out: list[RxSlot] = []
    gso = meta.gso_type != GSO_TYPE_NONE
    pos = 0
    while True:
        n = min(PAGE, length - pos)
        flags = NETRXF_MORE_DATA if pos + n < length else 0
        if not out:
            flags |= meta.flags | (NETRXF_EXTRA_INFO if gso else 0)
        out.append(RxSlot(pos, n, flags))
        pos += n
        if len(out) == 1 and gso:
            out.append(RxSlot(extra=ExtraInfo(EXTRA_TYPE_GSO, 0, meta.gso_size, meta.gso_type, 0)))
        if pos >= length:
            return out


# --- multi-queue (netif.h "Multiple transmit and receive queues") -----------------------------
#: Linux netback's default for ``xenvif_max_queues`` is min(8, online CPUs)
MAX_QUEUES_DEFAULT = 8


def default_max_queues(cpus: int) -> int:
    """``multi-queue-max-queues`` to offer: Linux netback's default
    (min(MAX_QUEUES_DEFAULT, num_online_cpus())), at least 1."""
    return max(1, min(MAX_QUEUES_DEFAULT, cpus))


def queue_count(value: str | None, max_queues: int) -> int:
    """How many queues the frontend asked for (``multi-queue-num-queues``;
    absent: 1, as xenbus_read_unsigned's default).  ValueError, with Linux
    netback's words, for 0, more than we offered, or a value that is not a
    number (xenbus_read_unsigned's fallback to 1 would connect a frontend
    whose keys are under queue-N/ with the flat layout: refusing it says why)."""
    if value is None:
        return 1
    if not value.strip().isdigit() or not value.strip().isascii():
        raise ValueError(f"multi-queue-num-queues {value!r} is not a number")
    n = int(value.strip(), 10)
    if n == 0 or n > max_queues:
        raise ValueError(f"guest requested {n} queues, but valid range is 1 - {max_queues}.")
    return n


def queue_dirs(fe: str, queues: int) -> list[str]:
    """Where each queue's keys are (netback's connect_data_rings): the
    frontend's own directory for a single queue, ``queue-N`` below it else."""
    return [fe] if queues == 1 else [f"{fe}/queue-{i}" for i in range(queues)]


@dataclass(frozen=True)
class QueueKeys:
    """One queue's rings and channels as the frontend wrote them."""

    tx_ref: int
    rx_ref: int
    tx_port: int
    rx_port: int  # == tx_port: one channel for both rings


def _xs_uint(v: str, what: str) -> int:
    if not v.strip().isdigit() or not v.strip().isascii():
        raise ValueError(f"{what} {v!r} is not a number")
    n = int(v.strip(), 10)
    if n > 0xFFFFFFFF:
        raise ValueError(f"{what} {v!r} is out of range")
    return n


def read_queue_keys(read: Callable[[str], str | None], base: str) -> QueueKeys:
    """A queue's ``tx-ring-ref``, ``rx-ring-ref`` and ``event-channel-tx``/
    ``-rx`` (split, tried first) or ``event-channel`` under ``base``; ``read``
    returns a node's value or None.  ValueError naming the missing node, as
    netback's ``xenbus_dev_fatal(..., "reading %s/ring-ref")``."""
    tx, rx = read(f"{base}/tx-ring-ref"), read(f"{base}/rx-ring-ref")
    if tx is None or rx is None:
        which = "tx" if tx is None else "rx"
        raise ValueError(f"reading {base}/ring-ref: {base}/{which}-ring-ref is missing")
    etx, erx = read(f"{base}/event-channel-tx"), read(f"{base}/event-channel-rx")
    if etx is not None and erx is not None:
        tp, rp = _xs_uint(etx, f"{base}/event-channel-tx"), _xs_uint(erx, f"{base}/event-channel-rx")
    else:
        ev = read(f"{base}/event-channel")
        if ev is None:
            raise ValueError(f"reading {base}/event-channel: missing")
        tp = rp = _xs_uint(ev, f"{base}/event-channel")
    return QueueKeys(_xs_uint(tx, f"{base}/tx-ring-ref"), _xs_uint(rx, f"{base}/rx-ring-ref"), tp, rp)
