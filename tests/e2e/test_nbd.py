"""The NBD client (pyxen.storage.nbd) against real servers, and against a fake one for broken peers.

Real servers: ``qemu-nbd`` (qemu-utils) and ``nbdkit``, started here on
127.0.0.1 ports picked free (or Unix sockets), bounded by timeouts and
killed by PID.  The tests that need one skip LOUDLY when it is missing.

The fake server (a thread speaking scripted bytes) is used only for what
real servers will not do on request: malformed or truncated handshakes,
wrong magics, replies to cookies never sent, structured replies that were
not negotiated, silence, out-of-order replies, and servers without
``NBD_OPT_GO``.  Each must end in ImageError within a bounded time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyxen.storage import ImageError
from pyxen.storage.nbd import (
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Info,
    NbdImage,
    NbdServerError,
    Opt,
    Rep,
    TransmissionFlag,
    parse_nbd_uri,
)
from pyxen.storage.open import open_image
from pyxen.toolstack.xlcfg import parse_disk_spec

MiB = 1 << 20
F = TransmissionFlag


# --- a fake server for the error paths -------------------------------------------------


def _recv(c: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        k = c.recv(n - len(out))
        if not k:
            raise EOFError
        out += k
    return out


class Peer:
    """The server side of one connection, with helpers that speak the protocol."""

    def __init__(self, conn: socket.socket) -> None:
        self.c = conn

    def greet(self, hflags: int = 3) -> int:
        self.c.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, hflags))
        (cflags,) = struct.unpack(">I", _recv(self.c, 4))
        return cflags

    def option(self) -> tuple[int, bytes]:
        magic, opt, n = struct.unpack(">QII", _recv(self.c, 16))
        assert magic == IHAVEOPT
        return opt, _recv(self.c, n)

    def rep(self, opt: int, rep: int, data: bytes = b"") -> None:
        self.c.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rep, len(data)) + data)

    def go_ok(self, size: int = 1 * MiB, flags: int = F.HAS_FLAGS | F.SEND_FLUSH) -> None:
        opt, _ = self.option()
        assert opt == Opt.GO
        self.rep(Opt.GO, Rep.INFO, struct.pack(">HQH", Info.EXPORT, size, flags))
        self.rep(Opt.GO, Rep.ACK)

    def request(self) -> tuple[int, int, int, int, bytes]:
        magic, _flags, cmd, cookie, off, n = struct.unpack(">IHHQQI", _recv(self.c, 28))
        assert magic == REQUEST_MAGIC
        data = _recv(self.c, n) if cmd == Cmd.WRITE else b""
        return cmd, cookie, off, n, data

    def reply(self, cookie: int, err: int = 0, data: bytes = b"", magic: int = SIMPLE_REPLY_MAGIC) -> None:
        self.c.sendall(struct.pack(">IIQ", magic, err, cookie) + data)


class FakeServer:
    """Runs ``script(peer)`` for the first connection on a 127.0.0.1 port, in a thread."""

    def __init__(self, script: Callable[[Peer], None]) -> None:
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.port = self.ls.getsockname()[1]
        self.script = script
        self.conn: socket.socket | None = None
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        self.ls.settimeout(10)
        try:
            self.conn, _ = self.ls.accept()
            self.conn.settimeout(10)
            self.script(Peer(self.conn))
        except (EOFError, OSError):
            pass
        except BaseException as e:  # noqa: BLE001 - a failed assertion in the script
            self.error = e
        finally:  # the script is over: hang up
            if self.conn is not None:
                try:
                    self.conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.t.join(5)
        if self.conn is not None:
            self.conn.close()
        self.ls.close()


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[Peer], None]], FakeServer]]:
    servers: list[FakeServer] = []

    def start(script: Callable[[Peer], None]) -> FakeServer:
        s = FakeServer(script)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()
    for s in servers:
        assert s.error is None, s.error


Fake = Callable[[Callable[[Peer], None]], FakeServer]


def steps(*fns: Callable[[Peer], object]) -> Callable[[Peer], None]:
    """A script that runs ``fns`` one after the other."""
    def script(p: Peer) -> None:
        for fn in fns:
            fn(p)
    return script


def hold(p: Peer) -> None:
    """Keep the connection open (silent) until the client closes it."""
    while p.c.recv(4096):
        pass


def connect(srv: FakeServer, timeout: float = 2.0, export: str = "x") -> NbdImage:
    return NbdImage("127.0.0.1", srv.port, export, timeout=timeout)


def expect_error(srv: FakeServer, match: str, within: float = 5.0, timeout: float = 1.0) -> None:
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=match):
        connect(srv, timeout=timeout)
    assert time.monotonic() - t0 < within


def test_wrong_greeting_magic(fake: Fake) -> None:
    srv = fake(steps(lambda p: p.c.sendall(b"HTTP/1.0 200 OK\r\n\r\n"), hold))
    expect_error(srv, "not an NBD server")


def test_oldstyle_server_is_refused(fake: Fake) -> None:
    srv = fake(steps(lambda p: p.c.sendall(struct.pack(">QQQI", NBDMAGIC, 0x00420281861253, MiB, 1)
                                           + bytes(124)), hold))
    expect_error(srv, "oldstyle")


def test_truncated_handshake(fake: Fake) -> None:
    srv = fake(lambda p: p.c.sendall(struct.pack(">Q", NBDMAGIC) + b"IHAV"))
    expect_error(srv, "closed the connection during the handshake")


def test_silent_server_times_out(fake: Fake) -> None:
    srv = fake(steps(Peer.greet, hold))
    expect_error(srv, "timed out", within=4.0, timeout=1.0)


def test_trickling_server_cannot_stretch_the_handshake(fake: Fake) -> None:
    def script(p: Peer) -> None:
        for b in struct.pack(">QQ", NBDMAGIC, IHAVEOPT):
            p.c.sendall(bytes([b]))
            time.sleep(0.2)

    srv = fake(script)
    expect_error(srv, "timed out", within=3.0, timeout=1.0)


def test_go_unknown_export_names_it(fake: Fake) -> None:
    def script(p: Peer) -> None:
        p.greet()
        opt, data = p.option()
        assert opt == Opt.GO
        (n,) = struct.unpack(">I", data[:4])
        assert data[4:4 + n] == b"x"
        (ninfo,) = struct.unpack(">H", data[4 + n:6 + n])
        assert Info.BLOCK_SIZE in struct.unpack(f">{ninfo}H", data[6 + n:])
        p.rep(Opt.GO, Rep.ERR_UNKNOWN, b"no such export here")
        assert p.option()[0] == Opt.ABORT  # the client aborts softly
        hold(p)

    srv = fake(script)
    expect_error(srv, "no export 'x': no such export here")


def test_go_tls_required(fake: Fake) -> None:
    srv = fake(steps(Peer.greet, Peer.option, lambda p: p.rep(Opt.GO, Rep.ERR_TLS_REQD), hold))
    expect_error(srv, "requires TLS")


def test_go_ack_without_export_info(fake: Fake) -> None:
    srv = fake(steps(Peer.greet, Peer.option, lambda p: p.rep(Opt.GO, Rep.ACK), hold))
    expect_error(srv, "without NBD_INFO_EXPORT")


def test_bad_option_reply_magic(fake: Fake) -> None:
    srv = fake(steps(Peer.greet, Peer.option,
                     lambda p: p.c.sendall(struct.pack(">QIII", 0x1234, Opt.GO, Rep.ACK, 0)), hold))
    expect_error(srv, "bad option reply magic")


def test_huge_option_reply_is_refused(fake: Fake) -> None:
    srv = fake(steps(Peer.greet, Peer.option,
                     lambda p: p.c.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, Opt.GO, Rep.INFO, 1 << 30)),
                     hold))
    expect_error(srv, "too long")


def test_bad_block_size_info(fake: Fake) -> None:
    srv = fake(steps(Peer.greet, Peer.option,
                     lambda p: p.rep(Opt.GO, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, 3, 4096, MiB)),
                     hold))
    expect_error(srv, "NBD_INFO_BLOCK_SIZE")


@pytest.mark.parametrize("hflags", [3, 1, 0])
def test_fallback_to_export_name(fake: Fake, hflags: int) -> None:
    """GO unsupported (or no fixed newstyle at all): NBD_OPT_EXPORT_NAME, with or without the zeroes."""
    seen: dict[str, int] = {}

    def script(p: Peer) -> None:
        seen["cflags"] = p.greet(hflags)
        opt, data = p.option()
        if hflags & 1:
            assert opt == Opt.GO
            p.rep(Opt.GO, Rep.ERR_UNSUP)
            opt, data = p.option()
        assert opt == Opt.EXPORT_NAME and data == b"x"
        p.c.sendall(struct.pack(">QH", 2 * MiB, F.HAS_FLAGS | F.READ_ONLY)
                    + (b"" if hflags & 2 else bytes(124)))
        cmd, cookie, off, n, _ = p.request()
        assert (cmd, off, n) == (Cmd.READ, 4096, 512)
        p.reply(cookie, data=b"r" * 512)
        cmd, *_ = p.request()
        assert cmd == Cmd.DISC
        hold(p)

    srv = fake(script)
    with connect(srv) as d:
        assert isinstance(d, NbdImage)
        assert d.size == 2 * MiB and d.readonly and not d.info.used_go
        buf = bytearray(512)
        d.readinto(4096, memoryview(buf))
        assert buf == b"r" * 512
        with pytest.raises(ImageError, match="read-only.*server exports it read-only"):
            d.write(0, bytes(512))
    assert seen["cflags"] == hflags  # C_FIXED_NEWSTYLE / C_NO_ZEROES only as offered


def test_export_name_unknown_server_hangs_up(fake: Fake) -> None:
    srv = fake(steps(lambda p: p.greet(1), Peer.option, lambda p: p.rep(Opt.GO, Rep.ERR_UNSUP), Peer.option))
    expect_error(srv, "no export 'x'")


def _serving(then: Callable[[Peer], None]) -> Callable[[Peer], None]:
    def script(p: Peer) -> None:
        p.greet()
        p.go_ok()
        then(p)
    return script


@pytest.mark.parametrize("magic,match", [(0xDEADBEEF, "bad reply magic"),
                                         (STRUCTURED_REPLY_MAGIC, "structured reply")])
def test_bad_reply_magic_drops_the_connection(fake: Fake, magic: int, match: str) -> None:
    def then(p: Peer) -> None:
        _, cookie, *_ = p.request()
        p.reply(cookie, magic=magic)
        hold(p)

    srv = fake(_serving(then))
    d = connect(srv)
    with pytest.raises(ImageError, match=match):
        d.readinto(0, memoryview(bytearray(512)))
    assert not d.connected
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=match):  # later calls fail at once, with the cause
        d.write(0, bytes(512))
    assert time.monotonic() - t0 < 0.5
    d.close()


def test_reply_to_an_unknown_cookie(fake: Fake) -> None:
    def then(p: Peer) -> None:
        _, cookie, *_ = p.request()
        p.reply(cookie + 1000)
        hold(p)

    srv = fake(_serving(then))
    with connect(srv) as d:
        with pytest.raises(ImageError, match="cookie"):
            d.flush()


def test_no_reply_times_out(fake: Fake) -> None:
    srv = fake(_serving(hold))
    d = connect(srv, timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="no reply to READ"):
        d.readinto(0, memoryview(bytearray(4096)))
    assert time.monotonic() - t0 < 3.0
    d.close()


def test_truncated_read_payload(fake: Fake) -> None:
    def then(p: Peer) -> None:
        _, cookie, *_ = p.request()
        p.reply(cookie, data=b"half" * 64)

    srv = fake(_serving(then))
    d = connect(srv)
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="closed the connection"):
        d.readinto(0, memoryview(bytearray(4096)))
    assert time.monotonic() - t0 < 3.0
    d.close()


def test_server_error_keeps_the_connection(fake: Fake) -> None:
    def then(p: Peer) -> None:
        _, cookie, *_ = p.request()
        p.reply(cookie, err=28)  # NBD_ENOSPC
        _, cookie, *_ = p.request()
        p.reply(cookie, err=9999)  # not an NBD error: treated as EINVAL
        _, cookie, _, n, _ = p.request()
        p.reply(cookie, data=b"k" * n)
        hold(p)

    srv = fake(_serving(then))
    with connect(srv) as d:
        with pytest.raises(NbdServerError, match="WRITE of 512 bytes at 1024 failed.*ENOSPC") as ei:
            d.write(1024, b"w" * 512)
        assert ei.value.errno == 28 and ei.value.errname == "ENOSPC"
        with pytest.raises(NbdServerError, match="treated as EINVAL") as ei:
            d.readinto(0, memoryview(bytearray(512)))
        assert ei.value.errname == "EINVAL"
        buf = bytearray(512)
        d.readinto(0, memoryview(buf))
        assert buf == b"k" * 512 and d.connected


def test_out_of_order_replies_reach_the_right_callers(fake: Fake) -> None:
    """The server answers 8 reads from 8 threads in reverse order; each buffer gets its own data."""
    def then(p: Peer) -> None:
        reqs = [p.request() for _ in range(8)]
        for _, cookie, off, n, _ in reversed(reqs):
            p.reply(cookie, data=bytes([off // 4096]) * n)
        hold(p)

    srv = fake(_serving(then))
    with connect(srv, timeout=5) as d:
        bufs = [bytearray(4096) for _ in range(8)]
        ts = [threading.Thread(target=d.readinto, args=(i * 4096, memoryview(bufs[i]))) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        assert all(b == bytes([i]) * 4096 for i, b in enumerate(bufs))


def test_no_flush_or_trim_unless_the_server_offers_them(fake: Fake) -> None:
    def script(p: Peer) -> None:
        p.greet()
        p.go_ok(flags=F.HAS_FLAGS)
        cmd, *_ = p.request()  # the only request that arrives is the disconnect
        assert cmd == Cmd.DISC
        hold(p)

    srv = fake(script)
    with connect(srv) as d:
        assert not d.supports_discard
        d.flush()
        d.discard(0, 4096)


def test_shutdown_error_disconnects(fake: Fake) -> None:
    def then(p: Peer) -> None:
        _, cookie, *_ = p.request()
        p.reply(cookie, err=108)  # NBD_ESHUTDOWN
        cmd, *_ = p.request()
        assert cmd == Cmd.DISC
        hold(p)

    srv = fake(_serving(then))
    d = connect(srv)
    with pytest.raises(NbdServerError, match="ESHUTDOWN"):
        d.flush()
    deadline = time.monotonic() + 5
    while d.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not d.connected


def test_beyond_the_end_never_reaches_the_server(fake: Fake) -> None:
    srv = fake(_serving(hold))
    with connect(srv) as d:
        with pytest.raises(ImageError, match="beyond the end"):
            d.readinto(MiB - 512, memoryview(bytearray(1024)))
        with pytest.raises(ImageError, match="beyond the end"):
            d.write(-512, bytes(512))


def test_uri_parsing() -> None:
    assert parse_nbd_uri("nbd://h:1234/a%20b") == ("h", 1234, "a b", None)
    assert parse_nbd_uri("nbd://[::1]/e") == ("::1", 10809, "e", None)
    assert parse_nbd_uri("nbd+unix:///e?socket=/run/s.sock") == (None, 0, "e", "/run/s.sock")
    for bad in ("nbd+unix:///e", "http://h/e", "nbd:///e", "nbd+unix://h/e?socket=/s"):
        with pytest.raises(ValueError):
            parse_nbd_uri(bad)


def test_connection_refused_is_an_image_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match=f"nbd://127.0.0.1:{port}/x: cannot connect: ECONNREFUSED"):
        NbdImage("127.0.0.1", port, "x", timeout=2)


# --- real servers ----------------------------------------------------------------------


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"SKIPPED LOUDLY: {tool} is not installed (apt-get install {package}); the NBD client "
                    f"is not tested against {tool}")


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port: int = s.getsockname()[1]
        return port


class Server:
    """A server process, killed by PID when the test ends."""

    def __init__(self, argv: list[str], port: int | None = None, sock: Path | None = None) -> None:
        self.port = port or 0
        self.sock = sock
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}: {err}")
            try:
                if self.sock is not None:
                    if self.sock.exists():
                        return
                else:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.argv[0]} did not start listening within 15 s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()


Servers = Callable[..., Server]


@pytest.fixture
def servers() -> Iterator[Servers]:
    started: list[Server] = []

    def start(argv: list[str], port: int | None = None, sock: Path | None = None) -> Server:
        for _ in range(3):  # a port picked free may be taken before the server binds it
            try:
                s = Server(argv, port, sock)
            except RuntimeError:
                if sock is not None or port is None:
                    raise
                new = _free_port()
                argv = [str(new) if a == str(port) else a for a in argv]
                port = new
                continue
            started.append(s)
            return s
        raise RuntimeError(f"could not start {argv[0]}")

    yield start
    for s in started:
        s.kill()


def qemu_nbd(servers: Callable[..., Server], image: Path, name: str = "disk", *extra: str) -> Server:
    _need("qemu-nbd", "qemu-utils")
    port = _free_port()
    return servers(["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", name,
                    "--persistent", "--shared=8", *extra, str(image)], port)


def nbdkit(servers: Callable[..., Server], *args: str) -> Server:
    _need("nbdkit", "nbdkit")
    port = _free_port()
    return servers(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port), *args], port)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(16 * MiB)
    return p


def _round_trip(d: NbdImage, size: int) -> dict[int, bytes]:
    written = {}
    for off, n in ((0, 512), (4096, 64 * 1024), (size - 8192, 8192), (MiB + 512, 3 * 512)):
        data = os.urandom(n)
        d.write(off, data)
        written[off] = data
    d.flush()
    for off, data in written.items():
        back = bytearray(len(data))
        d.readinto(off, memoryview(back))
        assert back == data, f"mismatch at {off}"
    return written


def test_qemu_nbd_round_trip_reaches_the_file(servers: Servers, image: Path) -> None:
    srv = qemu_nbd(servers, image)
    with NbdImage("127.0.0.1", srv.port, "disk", timeout=10) as d:
        assert isinstance(d, NbdImage)
        assert d.size == 16 * MiB and not d.readonly and d.info.used_go
        assert d.flags & F.SEND_FLUSH
        written = _round_trip(d, d.size)
    raw = image.read_bytes()
    for off, data in written.items():
        assert raw[off:off + len(data)] == data


def test_qemu_nbd_unix_socket_and_uri(servers: Servers, image: Path, tmp_path: Path) -> None:
    _need("qemu-nbd", "qemu-utils")
    sock = tmp_path / "nbd.sock"
    servers(["qemu-nbd", "-f", "raw", "-k", str(sock), "-x", "vol", "--persistent", str(image)], sock=sock)
    with NbdImage.from_uri(f"nbd+unix:///vol?socket={sock}", timeout=10) as d:
        _round_trip(d, d.size)
    spec = parse_disk_spec(f"format=raw, vdev=xvdb, target=nbd+unix:///vol?socket={sock}")
    with open_image(spec) as d:
        assert isinstance(d, NbdImage) and d.size == 16 * MiB


def test_qemu_nbd_unknown_export(servers: Servers, image: Path) -> None:
    srv = qemu_nbd(servers, image)
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="no export 'nope'"):
        NbdImage("127.0.0.1", srv.port, "nope", timeout=10)
    assert time.monotonic() - t0 < 5


def test_qemu_nbd_read_only_export(servers: Servers, image: Path) -> None:
    image.write_bytes(b"R" * (16 * MiB))
    srv = qemu_nbd(servers, image, "disk", "--read-only")
    with NbdImage("127.0.0.1", srv.port, "disk", timeout=10) as d:
        assert d.readonly and d.flags & F.READ_ONLY and not d.supports_discard
        with pytest.raises(ImageError, match="read-only"):
            d.write(0, bytes(512))
        with pytest.raises(ImageError, match="read-only"):
            d.discard(0, 4096)
        buf = bytearray(4096)
        d.readinto(8192, memoryview(buf))
        assert buf == b"R" * 4096
    assert image.read_bytes() == b"R" * (16 * MiB)


def test_client_side_read_only(servers: Servers, image: Path) -> None:
    srv = qemu_nbd(servers, image)
    spec = parse_disk_spec(f"vdev=xvda, access=ro, target=nbd://127.0.0.1:{srv.port}/disk")
    with open_image(spec) as d:
        assert isinstance(d, NbdImage) and d.readonly and not d.flags & F.READ_ONLY
        with pytest.raises(ImageError, match="read-only"):
            d.write(0, bytes(512))


def test_qemu_nbd_many_threads(servers: Servers, image: Path) -> None:
    srv = qemu_nbd(servers, image)
    errors: list[BaseException] = []

    def worker(d: NbdImage, i: int) -> None:
        try:
            back = bytearray(16 * 1024)
            for k in range(32):
                off = (i * 32 + k) * 16 * 1024
                d.write(off, bytes([i + 1]) * len(back))
                d.readinto(off, memoryview(back))
                assert back == bytes([i + 1]) * len(back)
            d.flush()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with NbdImage("127.0.0.1", srv.port, "disk", timeout=10) as d:
        ts = [threading.Thread(target=worker, args=(d, i)) for i in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not errors, errors[0]
    raw = image.read_bytes()
    for i in range(16):
        assert raw[i * 32 * 16 * 1024:(i + 1) * 32 * 16 * 1024] == bytes([i + 1]) * (32 * 16 * 1024)


def test_nbdkit_memory_round_trip_trim_and_big_requests(servers: Servers) -> None:
    srv = nbdkit(servers, "memory", "64M")
    with NbdImage("127.0.0.1", srv.port, "", timeout=10) as d:
        assert d.size == 64 * MiB and d.supports_discard
        _round_trip(d, d.size)
        d.write(MiB, b"t" * MiB)
        d.discard(MiB, MiB)  # the memory plugin zeroes what is trimmed
        back = bytearray(MiB)
        d.readinto(MiB, memoryview(back))
        assert back == bytes(MiB)
        big = os.urandom(40 * MiB)  # over the 32 MiB payload limit: split and pipelined
        d.write(8 * MiB, big)
        back = bytearray(40 * MiB)
        d.readinto(8 * MiB, memoryview(back))
        assert back == big


def test_nbdkit_file_trim_punches_holes(servers: Servers, tmp_path: Path) -> None:
    p = tmp_path / "dense.img"
    p.write_bytes(os.urandom(8 * MiB))
    srv = nbdkit(servers, "file", f"file={p}")
    with NbdImage("127.0.0.1", srv.port, "", timeout=10) as d:
        assert d.supports_discard
        before = os.stat(p).st_blocks
        d.discard(2 * MiB, 4 * MiB)
        d.flush()
        after = os.stat(p).st_blocks
    assert after < before
    assert p.read_bytes()[2 * MiB:6 * MiB] == bytes(4 * MiB)


def test_nbdkit_read_only(servers: Servers) -> None:
    srv = nbdkit(servers, "-r", "pattern", "1M")
    with NbdImage("127.0.0.1", srv.port, "", timeout=10) as d:
        assert d.readonly
        with pytest.raises(ImageError, match="read-only"):
            d.write(0, bytes(512))
        buf = bytearray(16)
        d.readinto(8, memoryview(buf))
        assert buf == struct.pack(">QQ", 8, 16)  # the pattern plugin: each 8 bytes hold their offset


def test_nbdkit_server_errors(servers: Servers) -> None:
    srv = nbdkit(servers, "--filter=error", "memory", "4M", "error-pwrite=ENOSPC",
                 "error-pwrite-rate=100%")
    with NbdImage("127.0.0.1", srv.port, "", timeout=10) as d:
        with pytest.raises(NbdServerError, match="ENOSPC") as ei:
            d.write(0, b"x" * 4096)
        assert ei.value.errno == 28
        buf = bytearray(4096)
        d.readinto(0, memoryview(buf))  # the connection survives a failed request
        assert buf == bytes(4096)


def test_nbdkit_minimum_block_size_is_honoured(servers: Servers) -> None:
    """The server demands 4 KiB blocks (and errors anything else): 512-byte I/O is widened / RMW'd."""
    srv = nbdkit(servers, "--filter=blocksize-policy", "memory", "4M", "blocksize-minimum=4096",
                 "blocksize-error-policy=error")
    with NbdImage("127.0.0.1", srv.port, "", timeout=10) as d:
        assert d.min_block == 4096
        d.write(0, b"a" * 8192)
        d.write(512, b"b" * 512)
        d.write(4096 - 512, b"c" * 1024)  # straddles two blocks
        buf = bytearray(8192)
        d.readinto(0, memoryview(buf))
        assert buf == b"a" * 512 + b"b" * 512 + b"a" * 2560 + b"c" * 1024 + b"a" * 3584
        small = bytearray(512)
        d.readinto(512, memoryview(small))
        assert small == b"b" * 512


def test_nbdkit_without_fixed_newstyle_uses_export_name(servers: Servers) -> None:
    srv = nbdkit(servers, "--mask-handshake=0", "memory", "4M")
    with NbdImage("127.0.0.1", srv.port, "", timeout=10) as d:
        assert not d.info.used_go and d.size == 4 * MiB
        _round_trip(d, d.size)


def test_server_killed_before_a_request(servers: Servers) -> None:
    srv = nbdkit(servers, "memory", "4M")
    d = NbdImage("127.0.0.1", srv.port, "", timeout=10)
    d.write(0, b"x" * 4096)
    srv.kill()
    t0 = time.monotonic()
    with pytest.raises(ImageError):
        d.readinto(0, memoryview(bytearray(4096)))
        d.readinto(0, memoryview(bytearray(4096)))  # the first may race the EOF; the second cannot
    assert time.monotonic() - t0 < 3
    d.close()


def test_server_killed_with_requests_in_flight(servers: Servers) -> None:
    """Reads stuck in a slow server fail promptly when it dies: no waiting out the timeout."""
    srv = nbdkit(servers, "--filter=delay", "memory", "4M", "rdelay=30")
    d = NbdImage("127.0.0.1", srv.port, "", timeout=60)
    results: list[BaseException | None] = []

    def reader(i: int) -> None:
        try:
            d.readinto(i * 4096, memoryview(bytearray(4096)))
            results.append(None)
        except BaseException as e:  # noqa: BLE001 - checked below
            results.append(e)

    ts = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    srv.kill()
    for t in ts:
        t.join(10)
    assert time.monotonic() - t0 < 5
    assert len(results) == 4 and all(isinstance(r, ImageError) for r in results), results
    with pytest.raises(ImageError, match="closed the connection"):
        d.flush()
    d.close()
