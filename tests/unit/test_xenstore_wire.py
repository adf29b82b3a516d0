"""XenStore wire framing and the request handlers, through Connection.feed; parser fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.xenstore import wire
from pyxen.xenstore.server import Connection, Xenstored, atoi, parse_domid
from pyxen.xenstore.tree import XENSTORE_PAYLOAD_MAX, XsError, guest
from pyxen.xenstore.wire import HEADER, Message, Op, Parser, join


def test_numbers_match_xs_wire_h() -> None:
    assert HEADER.size == 16
    assert (Op.CONTROL, Op.DIRECTORY, Op.READ, Op.GET_PERMS, Op.WATCH, Op.UNWATCH) == (0, 1, 2, 3, 4, 5)
    assert (Op.TRANSACTION_START, Op.TRANSACTION_END, Op.INTRODUCE, Op.RELEASE) == (6, 7, 8, 9)
    assert (Op.GET_DOMAIN_PATH, Op.WRITE, Op.MKDIR, Op.RM, Op.SET_PERMS) == (10, 11, 12, 13, 14)
    assert (Op.WATCH_EVENT, Op.ERROR, Op.IS_DOMAIN_INTRODUCED, Op.RESUME, Op.SET_TARGET) == (
        15, 16, 17, 18, 19)
    assert (Op.RESET_WATCHES, Op.DIRECTORY_PART, Op.GET_FEATURE, Op.SET_QUOTA, Op.INVALID) == (
        21, 22, 23, 26, 0xFFFF)
    assert wire.XS_DEBUG == Op.CONTROL and wire.XENSTORE_PAYLOAD_MAX == 4096
    assert wire.RING_EVTCHN_PORT == 2 * 1024 + 7 * 4


def decode_all(data: bytes) -> list[Message]:
    p = Parser()
    msgs = p.feed(data)
    assert p.pending == 0 and not p.error
    return msgs


class Client:
    """Speaks the wire protocol to one Connection, byte by byte like a transport would."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.req_id = 0
        self.events: list[tuple[str, str]] = []

    def call(self, op: int, payload: bytes, tx: int = 0) -> Message:
        self.req_id += 1
        out = decode_all(self.conn.feed(wire.encode(op, payload, self.req_id, tx)))
        replies = [m for m in out if m.type != Op.WATCH_EVENT]
        for m in out:
            if m.type == Op.WATCH_EVENT:
                path, token = m.strings()
                self.events.append((path, token))
        assert len(replies) == 1, out
        assert replies[0].req_id == self.req_id and replies[0].tx_id == tx
        return replies[0]

    def ok(self, op: int, *strings: str, value: bytes = b"", tx: int = 0) -> bytes:
        r = self.call(op, join(*strings) + value, tx)
        assert r.type == op, r
        return r.payload

    def error(self, op: int, *strings: str, value: bytes = b"", tx: int = 0) -> str:
        r = self.call(op, join(*strings) + value, tx)
        assert r.type == Op.ERROR, r
        return r.payload[:-1].decode()

    def pull_events(self) -> list[tuple[str, str]]:
        for m in decode_all(self.conn.take_output()):
            assert m.type == Op.WATCH_EVENT
            path, token = m.strings()
            self.events.append((path, token))
        ev, self.events = self.events, []
        return ev


@pytest.fixture
def xsd() -> Xenstored:
    return Xenstored()


@pytest.fixture
def dom0(xsd: Xenstored) -> Client:
    return Client(xsd.connect())


# -- framing


def test_parser_reassembles_any_split() -> None:
    data = b"".join(wire.encode(Op.READ, join(f"/p{i}"), i) for i in range(5))
    for cut in range(len(data) + 1):
        p = Parser()
        msgs = p.feed(data[:cut]) + p.feed(data[cut:])
        assert [m.req_id for m in msgs] == list(range(5))
    p = Parser()
    msgs = [m for b in data for m in p.feed(bytes([b]))]
    assert [m.payload for m in msgs] == [join(f"/p{i}") for i in range(5)]


def test_oversized_length_closes(xsd: Xenstored, dom0: Client) -> None:
    conn = dom0.conn
    out = conn.feed(struct.pack("<IIII", Op.READ, 1, 0, XENSTORE_PAYLOAD_MAX + 1))
    assert out == b"" and conn.closed and conn.error == wire.XENSTORE_ERROR_PROTO
    assert conn not in xsd.connections
    assert conn.feed(wire.encode(Op.READ, join("/"))) == b""
    # exactly the maximum is fine
    c2 = xsd.connect()
    (r,) = decode_all(c2.feed(wire.encode(Op.WRITE, join("/big") + b"x" * (XENSTORE_PAYLOAD_MAX - 5))))
    assert r.type == Op.WRITE


@pytest.mark.parametrize("type_", [Op.WATCH_EVENT, Op.ERROR, 20, wire.XS_TYPE_COUNT, 1000, Op.INVALID,
                                   0xFFFFFFFF])
def test_unknown_types_get_enosys(dom0: Client, type_: int) -> None:
    assert dom0.error(type_, "/") == "ENOSYS"


def test_bad_transaction_id(dom0: Client) -> None:
    assert dom0.error(Op.READ, "/", tx=77) == "ENOENT"
    assert dom0.error(Op.TRANSACTION_END, "T", tx=77) == "ENOENT"
    assert dom0.error(Op.TRANSACTION_END, "T") == "ENOENT"
    # WATCH ignores the transaction id
    dom0.ok(Op.WATCH, "/", "t", tx=77)


# -- handlers


def test_basic_requests(dom0: Client) -> None:
    dom0.ok(Op.WRITE, "/a/b", value=b"v\0with nul")
    assert dom0.ok(Op.READ, "/a/b") == b"v\0with nul"
    assert dom0.ok(Op.DIRECTORY, "/a") == b"b\0"
    assert dom0.ok(Op.DIRECTORY, "/a/b") == b""
    assert dom0.ok(Op.GET_PERMS, "/a/b") == b"n0\0"
    dom0.ok(Op.SET_PERMS, "/a/b", "r5", "w6")
    assert dom0.ok(Op.GET_PERMS, "/a/b") == b"r5\0w6\0"
    assert dom0.error(Op.SET_PERMS, "/a/b") == "EINVAL"
    assert dom0.error(Op.SET_PERMS, "/a/b", "x5") == "EINVAL"
    dom0.ok(Op.MKDIR, "/m")
    dom0.ok(Op.RM, "/a")
    assert dom0.error(Op.READ, "/a/b") == "ENOENT"
    assert dom0.error(Op.READ, "/a", "/b") == "EINVAL"         # onearg: exactly one string
    assert dom0.error(Op.WRITE, value=b"no nul") == "EINVAL"
    assert dom0.ok(Op.GET_DOMAIN_PATH, "7") == b"/local/domain/7\0"
    assert dom0.error(Op.GET_DOMAIN_PATH, "70000") == "EINVAL"
    assert dom0.ok(Op.IS_DOMAIN_INTRODUCED, "0") == b"T\0"
    assert dom0.ok(Op.IS_DOMAIN_INTRODUCED, "3") == b"F\0"
    assert dom0.ok(Op.GET_FEATURE) == b"14\0"
    assert dom0.ok(Op.GET_QUOTA, "nodes") == b"1000\0"
    dom0.ok(Op.SET_QUOTA, "nodes", "500")
    assert dom0.ok(Op.GET_QUOTA, "nodes") == b"500\0"
    assert dom0.ok(Op.GET_QUOTA).startswith(b"nodes watches")
    dom0.ok(Op.CONTROL, "check")
    assert b"check" in dom0.ok(Op.CONTROL, "help")
    assert dom0.error(Op.CONTROL, "frobnicate") == "EINVAL"


def test_directory_too_big_e2big_and_directory_part(dom0: Client) -> None:
    names = [f"child-number-{i:04d}" for i in range(300)]          # 18 bytes each: 5700 > 4096
    for n in names:
        dom0.ok(Op.WRITE, f"/big/{n}")
    assert dom0.error(Op.DIRECTORY, "/big") == "E2BIG"
    got: list[str] = []
    off = 0
    gens = set()
    while True:
        r = dom0.ok(Op.DIRECTORY_PART, "/big", str(off))
        gen, _, rest = r.partition(b"\0")
        gens.add(gen)
        if rest == b"\0":
            break
        part = rest[:-1] if rest.endswith(b"\0\0") else rest
        chunk = [s.decode() for s in part.split(b"\0") if s]
        got += chunk
        off += sum(len(c) + 1 for c in chunk)
        if rest.endswith(b"\0\0"):
            break
    assert got == names and len(gens) == 1
    assert dom0.error(Op.DIRECTORY_PART, "/big") == "EINVAL"


def test_watch_events_over_the_wire(xsd: Xenstored, dom0: Client) -> None:
    dom0.ok(Op.WATCH, "/w", "tok")
    assert dom0.pull_events() == [("/w", "tok")]                  # initial event, after the reply
    assert dom0.error(Op.WATCH, "/w", "tok") == "EEXIST"
    other = Client(xsd.connect())
    other.ok(Op.WRITE, "/w/x", value=b"1")
    assert other.pull_events() == []
    assert dom0.pull_events() == [("/w/x", "tok")]
    dom0.ok(Op.UNWATCH, "/w", "tok")
    assert dom0.error(Op.UNWATCH, "/w", "tok") == "ENOENT"
    other.ok(Op.WRITE, "/w/y")
    assert dom0.pull_events() == []
    # depth
    dom0.ok(Op.WATCH, "/d", "t", "0")
    other.ok(Op.WRITE, "/d/e")
    other.ok(Op.WRITE, "/d")
    assert dom0.pull_events() == [("/d", "t"), ("/d", "t")]
    assert dom0.error(Op.WATCH, "/d", "t2", "-1") == "EINVAL"
    # duplicate events still queued are merged (send_event)
    dom0.ok(Op.WATCH, "/dup", "t")
    dom0.pull_events()
    other.ok(Op.WRITE, "/dup", value=b"1")
    other.ok(Op.WRITE, "/dup", value=b"2")
    assert dom0.pull_events() == [("/dup", "t")]
    dom0.ok(Op.RESET_WATCHES)
    other.ok(Op.WRITE, "/dup", value=b"3")
    assert dom0.pull_events() == []


def test_transactions_over_the_wire(xsd: Xenstored, dom0: Client) -> None:
    dom0.ok(Op.WATCH, "/t", "w")
    dom0.pull_events()
    tid = int(dom0.ok(Op.TRANSACTION_START, "")[:-1])
    assert tid == 1
    assert dom0.error(Op.TRANSACTION_START, "", tx=tid) == "EBUSY"
    dom0.ok(Op.WRITE, "/t/x", value=b"1", tx=tid)
    assert dom0.pull_events() == []                              # events wait for the commit
    other = Client(xsd.connect())
    assert other.error(Op.READ, "/t/x") == "ENOENT"
    assert other.error(Op.READ, "/t/x", tx=tid) == "ENOENT"        # ids are per connection
    assert dom0.error(Op.TRANSACTION_END, "X", tx=tid) == "EINVAL"
    dom0.ok(Op.TRANSACTION_END, "T", tx=tid)
    assert dom0.pull_events() == [("/t/x", "w")]
    assert other.ok(Op.READ, "/t/x") == b"1"
    # conflict
    t1 = int(dom0.ok(Op.TRANSACTION_START, "")[:-1])
    assert dom0.ok(Op.READ, "/t/x", tx=t1) == b"1"
    other.ok(Op.WRITE, "/t/x", value=b"2")
    dom0.ok(Op.WRITE, "/t/y", value=b"3", tx=t1)
    assert dom0.error(Op.TRANSACTION_END, "T", tx=t1) == "EAGAIN"
    assert dom0.error(Op.READ, "/t/y", tx=t1) == "ENOENT"          # the transaction is gone
    t2 = int(dom0.ok(Op.TRANSACTION_START, "")[:-1])
    dom0.ok(Op.WRITE, "/t/z", tx=t2)
    dom0.ok(Op.TRANSACTION_END, "F", tx=t2)
    assert other.error(Op.READ, "/t/z") == "ENOENT"


def test_guest_connection_limits(xsd: Xenstored, dom0: Client) -> None:
    dom0.ok(Op.MKDIR, "/local/domain/5")
    dom0.ok(Op.SET_PERMS, "/local/domain/5", "n5")
    g = Client(xsd.introduce(5, 0, 1))
    g.ok(Op.WRITE, "name", value=b"guest")
    assert dom0.ok(Op.READ, "/local/domain/5/name") == b"guest"
    for op, args in [(Op.INTRODUCE, ("6", "0", "1")), (Op.RELEASE, ("6",)), (Op.CONTROL, ("check",)),
                     (Op.IS_DOMAIN_INTRODUCED, ("0",)), (Op.SET_TARGET, ("5", "6")),
                     (Op.GET_QUOTA, ("nodes",)), (Op.RESUME, ("5",))]:
        assert g.error(op, *args) == "EACCES", op
    for i in range(127):
        g.ok(Op.WATCH, f"w{i}", "t")
    assert g.error(Op.WATCH, "w127", "t") == "ENOSPC"             # 128: count + 1 >= quota
    g.pull_events()
    tids = [int(g.ok(Op.TRANSACTION_START, "")[:-1]) for _ in range(9)]
    assert g.error(Op.TRANSACTION_START, "") == "ENOSPC"
    g.ok(Op.TRANSACTION_END, "F", tx=tids[0])
    g.ok(Op.TRANSACTION_START, "")
    # relative watch paths come back relative
    g.ok(Op.RESET_WATCHES)
    g.ok(Op.WATCH, "data", "rel")
    dom0.ok(Op.WRITE, "/local/domain/5/data/k", value=b"v")
    assert g.pull_events() == [("data", "rel"), ("data/k", "rel")]


def test_introduce_release_special_watches(xsd: Xenstored, dom0: Client) -> None:
    dom0.ok(Op.WATCH, "@introduceDomain", "intro")
    dom0.ok(Op.WATCH, "@releaseDomain", "rel")
    dom0.ok(Op.WATCH, "@releaseDomain", "rel1", "1")
    dom0.pull_events()
    dom0.ok(Op.INTRODUCE, "9", "1234", "3")
    assert dom0.pull_events() == [("@introduceDomain", "intro")]
    assert dom0.ok(Op.IS_DOMAIN_INTRODUCED, "9") == b"T\0"
    assert xsd.domains[9].port == 3 and xsd.domains[9].gfn == 1234
    assert dom0.error(Op.INTRODUCE, "9", "0", "0") == "EINVAL"
    assert dom0.error(Op.INTRODUCE, "0", "0", "1") == "EINVAL"
    dom0.ok(Op.WRITE, "/local/domain/9/x")
    dom0.ok(Op.SET_PERMS, "/local/domain/9", "n9")
    g = Client(xsd.domains[9].conn)  # type: ignore[arg-type]
    g.ok(Op.WATCH, "@releaseDomain", "mine")
    g.pull_events()
    dom0.ok(Op.RELEASE, "9")
    assert dom0.pull_events() == [("@releaseDomain", "rel"), ("@releaseDomain/9", "rel1")]
    assert dom0.ok(Op.IS_DOMAIN_INTRODUCED, "9") == b"F\0"
    assert dom0.error(Op.READ, "/local/domain/9") == "ENOENT"        # its nodes go with it
    assert g.conn.closed and g.pull_events() == []
    assert dom0.error(Op.RELEASE, "9") == "ENOENT"
    assert dom0.error(Op.RELEASE, "0") == "EINVAL"


def test_guest_sees_release_of_others_via_domid_any(xsd: Xenstored) -> None:
    g = Client(xsd.introduce(3, 0, 1))
    g.ok(Op.WATCH, "@releaseDomain", "r")
    g.ok(Op.WATCH, "@introduceDomain", "i")      # allowed, but @introduceDomain is dom0's (n0)
    assert g.pull_events() == [("@releaseDomain", "r"), ("@introduceDomain", "i")]
    xsd.introduce(4, 0, 1)
    xsd.release(4)
    assert g.pull_events() == [("@releaseDomain", "r")]


def test_request_helper_and_inprocess_api(xsd: Xenstored) -> None:
    c = xsd.connect()
    c.request(Op.WATCH, join("/api", "t"))
    xsd.write("/api/k", "v")
    assert xsd.read("/api/k") == b"v" and xsd.directory("/api") == ("k",)
    r = c.request(Op.READ, join("/api/k"))
    assert (r.type, r.payload) == (Op.READ, b"v")
    assert [m.strings() for m in decode_all(c.take_output())] == [["/api", "t"], ["/api/k", "t"]]
    with pytest.raises(XsError):
        xsd.read("/nope")
    xsd.set_perms("/api/k", ["n5"])
    xsd.rm("/api")


def test_c_number_parsers() -> None:
    assert (atoi("12abc"), atoi(" -3"), atoi("x"), atoi("")) == (12, -3, 0, 0)
    assert (parse_domid("5"), parse_domid(""), parse_domid("+7"), parse_domid("65535")) == (5, 0, 7, 65535)
    for bad in ("-1", "65536", "5x", " "):
        with pytest.raises(XsError):
            parse_domid(bad)


# -- fuzzing: whatever arrives, an error reply or a close, never an exception


def _fuzz_conn() -> tuple[Xenstored, Connection, Connection]:
    xsd = Xenstored()
    xsd.write("/local/domain/5/x", "1")
    xsd.set_perms("/local/domain/5", ["n5"])
    return xsd, xsd.connect(), xsd.introduce(5, 0, 1)


def _check_stream(conn: Connection, chunks: list[bytes]) -> None:
    p = Parser()
    for chunk in chunks:
        out = conn.feed(chunk)
        for m in p.feed(out):
            assert m.type in set(Op) - {Op.INVALID}
            if m.type == Op.ERROR:
                assert m.payload[:-1].decode() in (
                    "EINVAL", "EACCES", "EEXIST", "ENOENT", "ENOSPC", "ENOSYS", "EBUSY", "EAGAIN",
                    "E2BIG", "EPERM", "ENOMEM")
        assert not p.error
        if conn.closed:
            assert conn.error == wire.XENSTORE_ERROR_PROTO
            return


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=10), st.booleans())
def test_fuzz_random_bytes(chunks: list[bytes], as_guest: bool) -> None:
    _, d0, g = _fuzz_conn()
    _check_stream(g if as_guest else d0, chunks)


FUZZ_STRINGS = st.lists(st.sampled_from(["/", "/a", "x", "/local/domain/5/x", "@releaseDomain", "T", "F",
                                         "0", "5", "-1", "r5", "b0", "w", "//", "a/", "", "check",
                                         "4294967295", "nodes"]), max_size=4)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.integers(0, 30), st.sampled_from([0xFFFF, 0xFFFFFFFF])),
                          st.integers(0, 3), FUZZ_STRINGS, st.binary(max_size=6), st.booleans()),
                max_size=20),
       st.booleans(), st.integers(1, 7))
def test_fuzz_wellformed_frames(msgs: list[tuple[int, int, list[str], bytes, bool]], as_guest: bool,
                                split: int) -> None:
    """Valid framing, arbitrary types/transaction ids/arguments: a reply (or error) for each."""
    xsd, d0, g = _fuzz_conn()
    conn = g if as_guest else d0
    data = b""
    for type_, tx, strings, tail, trunc in msgs:
        payload = join(*strings) + tail
        if trunc and payload:
            payload = payload[:-1]
        data += wire.encode(type_, payload, 1, tx)
    chunks = [data[i:i + split * 13] for i in range(0, len(data), split * 13)]
    _check_stream(conn, chunks)
    assert xsd.store.check() == []


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 0xFFFFFFFF), st.binary(max_size=32))
def test_fuzz_headers(type_: int, req: int, tx: int, length: int, body: bytes) -> None:
    """Any header: an oversized length closes the connection, anything else is answered or waits."""
    _, d0, _ = _fuzz_conn()
    out = d0.feed(struct.pack("<IIII", type_, req, tx, length) + body)
    if d0.closed:                                # this header or one in `body` was oversized
        assert out == b"" and (length > XENSTORE_PAYLOAD_MAX or len(body) >= length + 16)
    elif length <= len(body):
        assert Parser().feed(out)[0].req_id == req
    else:
        assert out == b"" and not d0.closed          # truncated: waiting for the rest


def test_truncated_then_completed(dom0: Client) -> None:
    msg = wire.encode(Op.WRITE, join("/trunc") + b"value", 9)
    assert dom0.conn.feed(msg[:10]) == b""
    assert dom0.conn.feed(msg[10:-1]) == b""
    (r,) = decode_all(dom0.conn.feed(msg[-1:]))
    assert (r.type, r.req_id) == (Op.WRITE, 9)


def test_guest_flood_stays_within_quota_and_others_are_served(xsd: Xenstored, dom0: Client) -> None:
    dom0.ok(Op.MKDIR, "/local/domain/8")
    dom0.ok(Op.SET_PERMS, "/local/domain/8", "n8")
    g = Client(xsd.introduce(8, 0, 1))
    errors = set()
    for i in range(1100):
        r = g.call(Op.WRITE, join(f"flood/d{i // 50}/n{i}") + b"x" * 100)   # short child lists
        if r.type == Op.ERROR:
            errors.add(r.payload)
    assert errors == {b"ENOSPC\0"}
    assert xsd.store.node_count(8) == 999
    dom0.ok(Op.WRITE, "/still/fine")
    assert guest(8).home == "/local/domain/8"
