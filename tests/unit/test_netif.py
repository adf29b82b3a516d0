"""The netif protocol's pure logic (pyxen/backends/netif.py): layouts, ring
index arithmetic and event suppression, TX slot-chain validation with Linux
netback's answers, the RX slot plan, and checksum/GSO through virtio_net_hdr."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.backends import netif as N


def tx(gref: int = 1, offset: int = 0, flags: int = 0, id: int = 0, size: int = 60) -> bytes:
    return N.TxRequest(gref, offset, flags, id, size).pack()


def chain(*reqs: bytes):
    return (lambda i: reqs[i]), len(reqs)


def gso(size: int = 1448, gtype: int = N.GSO_TYPE_TCPV4, flags: int = 0,
        etype: int = N.EXTRA_TYPE_GSO) -> bytes:
    return N.ExtraInfo(etype, flags, size, gtype).pack() + b"\0" * 4


def test_layouts_and_ring_sizes() -> None:
    assert N.TX_REQ.size == 12 and N.TX_RSP.size == 4 and N.RX_REQ.size == 8 and N.RX_RSP.size == 8
    assert N.TX_RING_SIZE == 256 and N.RX_RING_SIZE == 256  # (4096-64)/12 = 336, /8 = 504
    assert N.RX_REQ.pack(7, 0x1234) == b"\x07\x00\x00\x00\x34\x12\x00\x00"  # id, pad, gref
    assert N.ring_entries(12, 2) == 512


def test_single_slot_packet() -> None:
    pkt = N.parse_tx(*chain(tx(id=5, size=60, flags=N.NETTXF_CSUM_BLANK)))
    assert pkt is not None and not pkt.drop and not pkt.fatal
    assert pkt.slots == 1 and pkt.length == 60 and pkt.data[0].size == 60
    assert pkt.responses(N.RSP_OKAY) == [(5, N.RSP_OKAY)]


def test_nothing_queued() -> None:
    assert N.parse_tx(lambda i: b"", 0) is None


def test_chain_sizes_and_extras() -> None:
    reqs = [tx(id=1, size=3000, flags=N.NETTXF_MORE_DATA | N.NETTXF_EXTRA_INFO, offset=100),
            gso(), tx(id=2, size=1000, flags=N.NETTXF_MORE_DATA), tx(id=3, size=500)]
    pkt = N.parse_tx(*chain(*reqs))
    assert pkt is not None and not pkt.drop and not pkt.fatal
    assert pkt.slots == 4 and pkt.extra_count == 1 and pkt.gso is not None
    assert [d.size for d in pkt.data] == [1500, 1000, 500]
    assert pkt.responses(N.RSP_OKAY) == [(1, 0), (None, N.RSP_NULL), (2, 0), (3, 0)]


def _long(n_follow: int) -> list[bytes]:
    total = 100 * (n_follow + 1)
    reqs = [tx(id=0, size=total, flags=N.NETTXF_MORE_DATA)]
    for k in range(n_follow):
        last = k == n_follow - 1
        reqs.append(tx(id=k + 1, size=100, flags=0 if last else N.NETTXF_MORE_DATA))
    return reqs


def test_slot_limits() -> None:
    ok = N.parse_tx(*chain(*_long(N.NR_SLOTS_MIN)))  # 1 + 18 slots: accepted
    assert ok is not None and not ok.drop and not ok.fatal and len(ok.data) == 19
    dropped = N.parse_tx(*chain(*_long(N.NR_SLOTS_MIN + 1)))  # 19 follow-on: dropped
    assert dropped is not None and dropped.drop and not dropped.fatal and dropped.slots == 20
    assert [s for _, s in dropped.responses(N.RSP_ERROR)] == [N.RSP_ERROR] * 20
    dropped20 = N.parse_tx(*chain(*_long(N.FATAL_SKB_SLOTS)))  # 20 follow-on: still a drop
    assert dropped20 is not None and dropped20.drop and not dropped20.fatal
    fatal = N.parse_tx(*chain(*_long(N.FATAL_SKB_SLOTS + 1)))  # the 21st: malice
    assert fatal is not None and fatal.fatal


def test_slot_bigger_than_what_is_left_is_dropped() -> None:
    pkt = N.parse_tx(*chain(tx(id=1, size=100, flags=N.NETTXF_MORE_DATA), tx(id=2, size=200)))
    assert pkt is not None and pkt.drop and not pkt.fatal and pkt.slots == 2
    assert pkt.responses(N.RSP_ERROR) == [(1, -1), (2, -1)]


def test_short_first_slot_is_dropped() -> None:
    pkt = N.parse_tx(*chain(tx(size=13)))
    assert pkt is not None and pkt.drop.startswith("bad packet size")
    pkt = N.parse_tx(*chain(tx(size=100, flags=N.NETTXF_MORE_DATA), tx(size=90)))
    assert pkt is not None and pkt.drop  # the first slot keeps 10 bytes


def test_page_crossing_is_fatal() -> None:
    pkt = N.parse_tx(*chain(tx(offset=4000, size=200)))
    assert pkt is not None and pkt.fatal
    pkt = N.parse_tx(*chain(tx(size=300, flags=N.NETTXF_MORE_DATA), tx(offset=4095, size=2)))
    assert pkt is not None and pkt.fatal


def test_chain_past_the_producer_is_fatal() -> None:
    pkt = N.parse_tx(*chain(tx(size=300, flags=N.NETTXF_MORE_DATA)))
    assert pkt is not None and pkt.fatal.startswith("asked for")
    pkt = N.parse_tx(*chain(tx(size=300, flags=N.NETTXF_EXTRA_INFO)))
    assert pkt is not None and pkt.fatal == "missing extra info"


@pytest.mark.parametrize("extra,why", [
    (gso(etype=0), "invalid extra type 0"), (gso(etype=5), "invalid extra type 5"),
    (gso(size=0), "GSO size must not be zero"), (gso(gtype=3), "bad GSO type 3")])
def test_bad_extras_are_fatal(extra: bytes, why: str) -> None:
    pkt = N.parse_tx(*chain(tx(size=300, flags=N.NETTXF_EXTRA_INFO), extra))
    assert pkt is not None and pkt.fatal == why


def test_multicast_extra_is_a_control_message() -> None:
    pkt = N.parse_tx(*chain(tx(id=9, size=0, flags=N.NETTXF_EXTRA_INFO),
                            gso(etype=N.EXTRA_TYPE_MCAST_ADD)))
    assert pkt is not None and pkt.control and pkt.slots == 2
    assert pkt.responses(N.RSP_OKAY) == [(9, 0), (None, N.RSP_NULL)]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                          st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)), min_size=1, max_size=40),
       st.integers(0, 40))
def test_any_chain_gets_an_answer(slots: list[tuple[int, int, int, int, int]], avail: int) -> None:
    """Whatever a frontend queues: never an exception; a good packet has data
    slots that stay inside their pages and add up to its length; a drop or a
    good packet answers every slot it consumed; consumption stays in the queue."""
    raws = [N.TX_REQ.pack(g, o, f, i, s) for o, f, i, s, g in slots]
    avail = min(avail, len(raws))
    pkt = N.parse_tx(lambda i: raws[i], avail)
    if avail == 0:
        assert pkt is None
        return
    assert pkt is not None
    assert 1 <= pkt.slots <= avail or pkt.fatal
    if pkt.fatal:
        return
    assert len(pkt.responses(N.RSP_OKAY)) == pkt.slots
    if not pkt.drop and not pkt.control:
        assert all(d.offset + d.size <= N.PAGE for d in pkt.data)
        assert sum(d.size for d in pkt.data) == pkt.length
        assert len(pkt.data) <= N.NR_SLOTS_MIN + 1 and pkt.data[0].size >= N.ETH_HLEN


# --- the shared ring ---------------------------------------------------------------------------
def test_ring_indexes_and_event_suppression() -> None:
    page = memoryview(bytearray(4096))
    r = N.BackRing(page, N.TX_SLOT)
    assert r.n == 256 and r.unconsumed() == 0
    assert not r.final_check_for_requests()
    assert struct.unpack_from("<I", page, 4)[0] == 1  # req_event re-armed at req_cons + 1
    for k in range(3):
        page[64 + 12 * k:64 + 12 * k + 12] = tx(id=k)
    struct.pack_into("<I", page, 0, 3)
    assert r.unconsumed() == 3 and N.TxRequest.unpack(r.request(2)).id == 2
    r.consume(3)
    struct.pack_into("<I", page, 12, 1)  # the frontend wants an event at rsp 1
    r.put_response(N.TX_RSP.pack(0, 0))
    assert r.push_responses()
    r.put_response(N.TX_RSP.pack(1, 0))
    assert not r.push_responses()  # rsp_event 1 already passed
    struct.pack_into("<I", page, 0, 3 + 257)
    with pytest.raises(N.ProtocolError):
        r.unconsumed()


def test_ring_wraps_at_2_32() -> None:
    page = memoryview(bytearray(4096))
    struct.pack_into("<IIII", page, 0, 0xFFFFFFFF, 0, 0xFFFFFFFF, 0)
    r = N.BackRing(page, N.RX_SLOT)
    struct.pack_into("<I", page, 0, 2)  # three requests, across the wrap
    assert r.unconsumed() == 3
    r.consume(3)
    assert r.req_cons == 2


# --- RX ---------------------------------------------------------------------------------------
def test_rx_plan_small_and_gso() -> None:
    plan = N.rx_plan(60, N.RxMeta(N.NETRXF_DATA_VALIDATED))
    assert plan == [N.RxSlot(0, 60, N.NETRXF_DATA_VALIDATED)]
    assert plan[0].response(3) == N.RX_RSP.pack(3, 0, N.NETRXF_DATA_VALIDATED, 60)
    meta = N.RxMeta(N.NETRXF_CSUM_BLANK | N.NETRXF_DATA_VALIDATED, N.GSO_TYPE_TCPV4, 1448)
    plan = N.rx_plan(10000, meta)
    assert [(s.start, s.length) for s in plan] == [(0, 4096), (0, 0), (4096, 4096), (8192, 1808)]
    assert plan[0].flags == (meta.flags | N.NETRXF_EXTRA_INFO | N.NETRXF_MORE_DATA)
    assert plan[1].extra == N.ExtraInfo(N.EXTRA_TYPE_GSO, 0, 1448, N.GSO_TYPE_TCPV4)
    assert plan[2].flags == N.NETRXF_MORE_DATA and plan[3].flags == 0
    assert len(plan) == N.rx_slots_needed(10000, True)


@given(st.integers(1, 65550), st.booleans())
def test_rx_plan_covers_the_frame(length: int, with_gso: bool) -> None:
    meta = N.RxMeta(0, N.GSO_TYPE_TCPV6 if with_gso else 0, 1400 if with_gso else 0)
    plan = N.rx_plan(length, meta)
    data = [s for s in plan if s.extra is None]
    assert sum(s.length for s in data) == length and all(0 < s.length <= 4096 for s in data)
    assert len(plan) == N.rx_slots_needed(length, with_gso)
    assert [bool(s.flags & N.NETRXF_MORE_DATA) for s in data] == [True] * (len(data) - 1) + [False]


# --- checksums and virtio_net_hdr ---------------------------------------------------------------
def _ipv4_udp(payload: bytes) -> bytearray:
    eth = b"\x00\x16\x3e\x00\x00\x01" + b"\x00\x16\x3e\x00\x00\x02" + b"\x08\x00"
    udp_len = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    ip = ip[:10] + N.inet_checksum(ip).to_bytes(2, "big") + ip[12:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, udp_len)
    partial = (~N.inet_checksum(pseudo)) & 0xFFFF  # what a CHECKSUM_PARTIAL skb holds
    udp = struct.pack("!HHHH", 1000, 2000, udp_len, partial)
    return bytearray(eth + ip + udp + payload)


def test_checksum_place_and_completion() -> None:
    f = _ipv4_udp(b"hello world")
    assert N.l4_checksum_place(f) == (34, 6, 17)
    assert N.complete_checksum(f, 34, 6)
    pseudo = bytes(f[26:34]) + struct.pack("!BBH", 0, 17, len(f) - 34)
    assert N.inet_checksum(pseudo + bytes(f[34:])) == 0  # the receiver's check passes
    assert N.l4_checksum_place(b"\0" * 12 + b"\x08\x06" + b"\0" * 28) is None  # ARP
    frag = bytearray(f)
    frag[20] |= 0x20  # MF
    assert N.l4_checksum_place(frag) is None


def test_tx_vnet_header() -> None:
    f = _ipv4_udp(b"x" * 20)
    first = N.TxRequest(1, 0, N.NETTXF_CSUM_BLANK | N.NETTXF_DATA_VALIDATED, 0, len(f))
    hdr = N.tx_vnet_header(N.TxPacket(1, first, [first]), f)
    assert hdr == N.VNET_HDR.pack(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6)
    first = N.TxRequest(1, 0, N.NETTXF_DATA_VALIDATED, 0, len(f))
    hdr = N.tx_vnet_header(N.TxPacket(1, first, [first]), f)
    assert hdr == N.VNET_HDR.pack(N.VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0)
    arp = b"\xff" * 12 + b"\x08\x06" + b"\0" * 28
    first = N.TxRequest(1, 0, N.NETTXF_CSUM_BLANK, 0, len(arp))
    assert N.tx_vnet_header(N.TxPacket(1, first, [first]), arp) is None  # netback drops it


def test_rx_meta() -> None:
    m = N.rx_meta(N.VNET_HDR.pack(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, N.VIRTIO_NET_HDR_GSO_TCPV6,
                                  66, 1440, 54, 16))
    assert m == N.RxMeta(N.NETRXF_CSUM_BLANK | N.NETRXF_DATA_VALIDATED, N.GSO_TYPE_TCPV6, 1440, 54, 16)
    assert N.rx_meta(N.VNET_HDR.pack(0, 3, 0, 0, 0, 0)) is None  # UDP GSO: not in netif
    assert N.rx_meta(N.VNET_HDR.pack(0, 0, 0, 0, 0, 0)) == N.RxMeta(0)


# --- the credit limiter -------------------------------------------------------------------------
def test_credit_waits_for_the_next_window() -> None:
    c = N.TxCredit(10000, 20000, now=0.0)  # 10000 bytes per 20 ms
    assert c.wait(6000, 0.0) == 0.0 and c.remaining == 4000
    w = c.wait(6000, 0.001)
    assert w == pytest.approx(0.019)  # blocked until the window at 20 ms
    assert c.wait(100, 0.010) == pytest.approx(0.010)  # everything waits with it
    assert c.wait(6000, 0.020) == 0.0 and c.remaining == 8000  # 4000 + 10000 - 6000
    big = N.TxCredit(1000, 1000, now=0.0)
    assert big.wait(65536, 0.0) > 0  # a 64 KiB frame gets through once credit grows to MAX_BURST
    t, sent = 0.0, False
    for _ in range(200):
        w = big.wait(65536, t)
        if w == 0.0:
            sent = True
            break
        t += w
    assert sent


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200_000), st.integers(100, 100_000),
       st.lists(st.tuples(st.integers(1, 65536), st.integers(0, 50_000)), min_size=1, max_size=100))
def test_credit_never_lets_more_than_burst_plus_rate(credit: int, usec: int,
                                                    pkts: list[tuple[int, int]]) -> None:
    """Over any run, bytes sent by time T <= max(MAX_BURST, credit) + credit
    per elapsed interval (plus the first window): the limiter holds."""
    c = N.TxCredit(credit, usec, now=0.0)
    t, sent = 0.0, 0
    for size, gap_us in pkts:
        t += gap_us / 1e6
        while True:
            w = c.wait(size, t)
            if w == 0.0:
                break
            t += w
        sent += size
        windows = int(t / (usec / 1e6)) + 1
        assert sent <= max(N.MAX_BURST, credit) + credit * windows + credit
