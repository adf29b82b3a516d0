"""pyxen's xenstored driven by Debian's real xenstore-utils clients.

libxenstore's xs_open() tries xs_daemon_socket() first: $XENSTORED_PATH if
set (else $XENSTORED_RUNDIR/socket, /var/run/xenstored/socket), connecting to
it if stat() says it is a socket.  Only if that fails does it try the domain
device, which is again $XENSTORED_PATH if set, else /dev/xen/xenbus.  So
pointing XENSTORED_PATH at our socket is all it takes.

Every client subprocess is bounded by a timeout; only the processes started
here are ever killed.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyxen.xenstore import wire
from pyxen.xenstore.wire import Op, Parser, join
from tests.conftest import ROOT

CLIENTS = ["xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-list", "xenstore-rm",
           "xenstore-chmod", "xenstore-exists", "xenstore-watch"]
TIMEOUT = 10


@pytest.fixture(scope="module", autouse=True)
def clients_installed() -> None:
    missing = [c for c in CLIENTS if shutil.which(c) is None]
    if missing:
        pytest.skip(f"SKIPPED LOUDLY: xenstore-utils is not installed ({', '.join(missing)} missing); "
                    "apt-get install -y xenstore-utils")


class Daemon:
    """`python3 -m pyxen.xenstore.server` on a temporary socket, as a subprocess."""

    def __init__(self, tmp: Path, flush_delay: float = 0.05) -> None:
        self.sock = tmp / "xenstored.sock"
        self.state = tmp / "xenstored.json"
        self.log = tmp / "xenstored.log"
        self.flush_delay = flush_delay
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyxen.xenstore.server", "--socket", str(self.sock),
                 "--state", str(self.state), "--flush-delay", str(self.flush_delay)],
                cwd=ROOT, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"xenstored exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.sock))
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"xenstored did not come up:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        rc = self.proc.returncode
        self.proc = None
        return rc

    def env(self) -> dict[str, str]:
        return dict(os.environ, XENSTORED_PATH=str(self.sock))

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=TIMEOUT,
                           stdin=subprocess.DEVNULL)
        if check:
            assert r.returncode == 0, f"{args}: rc {r.returncode}\n{r.stdout}{r.stderr}"
        return r

    def watch(self, *args: str) -> Watcher:
        return Watcher(subprocess.Popen(["xenstore-watch", *args], env=self.env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL))


class Watcher:
    """A running xenstore-watch: read the lines it prints (it flushes each event)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.buf = b""

    def lines(self, n: int) -> list[str]:
        """The next n lines, or fewer if TIMEOUT passes first."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + TIMEOUT
        while self.buf.count(b"\n") < n and time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                self.buf += chunk
        *done, rest = self.buf.split(b"\n")
        self.buf = b"\n".join(done[n:] + [rest])
        return [d.decode() for d in done[:n]]

    def finish(self) -> str:
        """Wait for a watch that was told how many events to print (-n) to exit; its remaining output."""
        try:
            out, _ = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"xenstore-watch did not finish; got {self.buf!r}") from None
        return (self.buf + out).decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


@pytest.fixture
def xsd(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path).start()
    try:
        yield d
    finally:
        if d.proc is not None:
            d.stop()


def raw_request(sock: Path, op: int, payload: bytes) -> wire.Message:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(str(sock))
        s.sendall(wire.encode(op, payload, 42))
        p = Parser()
        while True:
            msgs = [m for m in p.feed(s.recv(65536)) if m.req_id == 42]
            if msgs:
                return msgs[0]


def test_write_read_exists_list_rm(xsd: Daemon) -> None:
    xsd.run("xenstore-write", "/a/b", "1", "/a/c", "hello world")
    assert xsd.run("xenstore-read", "/a/b", "/a/c").stdout == "1\nhello world\n"
    assert xsd.run("xenstore-exists", "/a/b").returncode == 0
    assert xsd.run("xenstore-exists", "/nope", check=False).returncode == 1
    assert xsd.run("xenstore-list", "/a").stdout == "b\nc\n"
    assert xsd.run("xenstore-list", "-p", "/a").stdout == "/a/b\n/a/c\n"
    r = xsd.run("xenstore-read", "/a/nope", check=False)
    assert r.returncode == 1 and "couldn't read path /a/nope" in r.stderr
    xsd.run("xenstore-rm", "/a/b")
    assert xsd.run("xenstore-list", "/a").stdout == "c\n"
    xsd.run("xenstore-rm", "/a")
    assert xsd.run("xenstore-exists", "/a/c", check=False).returncode == 1
    assert xsd.run("xenstore-rm", "/x/y/z", check=False).returncode == 1     # parent missing: ENOENT
    xsd.run("xenstore-write", "/t/d/e", "")
    xsd.run("xenstore-rm", "-t", "/t/d/e")                                     # tidy: empty parents go too
    assert xsd.run("xenstore-exists", "/t", check=False).returncode == 1


def test_ls_tree_and_permissions(xsd: Daemon) -> None:
    xsd.run("xenstore-write", "/local/domain/3/name", "guest3", "/local/domain/3/memory/target", "16384")
    out = xsd.run("xenstore-ls").stdout
    assert out.splitlines() == [
        'tool = ""', ' xenstored = ""', 'local = ""', ' domain = ""', '  3 = ""', '   name = "guest3"',
        '   memory = ""', '    target = "16384"']
    xsd.run("xenstore-chmod", "/local/domain/3", "n3", "r0")
    xsd.run("xenstore-chmod", "-r", "/local/domain/3/memory", "b3", "r5")
    ls = xsd.run("xenstore-ls", "-p", "/local/domain/3").stdout
    assert "(n0)" in ls.splitlines()[0]                        # name kept its own permissions
    assert ls.splitlines()[1].endswith("(b3,r5)") and ls.splitlines()[2].endswith("(b3,r5)")
    full = xsd.run("xenstore-ls", "-f", "/local").stdout
    assert "/local/domain/3/memory/target = \"16384\"" in full
    r = raw_request(xsd.sock, Op.GET_PERMS, join("/local/domain/3"))
    assert r.payload == b"n3\0r0\0"


def test_ls_uses_directory_part_for_big_directories(xsd: Daemon) -> None:
    names = [f"entry-with-a-long-name-{i:04d}" for i in range(200)]     # 28 bytes each > 4096
    for i in range(0, len(names), 50):
        args = [x for n in names[i:i + 50] for x in (f"/big/{n}", "v")]
        xsd.run("xenstore-write", *args)
    assert raw_request(xsd.sock, Op.DIRECTORY, join("/big")).payload == b"E2BIG\0"
    assert xsd.run("xenstore-list", "/big").stdout.split() == names


def test_watch_prints_initial_event_and_changes(xsd: Daemon) -> None:
    w = xsd.watch("-n", "4", "/w")
    try:
        assert w.lines(1) == ["/w"]                            # the initial event
        xsd.run("xenstore-write", "/w/a", "1")
        xsd.run("xenstore-write", "/elsewhere", "1")
        xsd.run("xenstore-chmod", "/w/a", "r0")                # permission changes fire too
        xsd.run("xenstore-rm", "/w")
        assert w.finish().splitlines() == ["/w/a", "/w/a", "/w"]
    finally:
        w.kill()


def test_watch_special_introduce_release(xsd: Daemon) -> None:
    w = xsd.watch("-n", "3", "@introduceDomain")
    r = xsd.watch("-n", "2", "@releaseDomain")
    try:
        assert w.lines(1) == ["@introduceDomain"]
        assert r.lines(1) == ["@releaseDomain"]
        assert raw_request(xsd.sock, Op.INTRODUCE, join("7", "0", "1")).type == Op.INTRODUCE
        assert raw_request(xsd.sock, Op.IS_DOMAIN_INTRODUCED, join("7")).payload == b"T\0"
        assert raw_request(xsd.sock, Op.INTRODUCE, join("8", "0", "1")).type == Op.INTRODUCE
        assert raw_request(xsd.sock, Op.RELEASE, join("7")).type == Op.RELEASE
        assert w.finish().splitlines() == ["@introduceDomain", "@introduceDomain"]
        assert r.finish().splitlines() == ["@releaseDomain"]
    finally:
        w.kill()
        r.kill()


def test_concurrent_writers_retry_transactions(xsd: Daemon) -> None:
    """xenstore-write runs in a transaction and retries on EAGAIN: 12 at once all land."""
    procs = [subprocess.Popen(["xenstore-write", "/race/shared", str(i), f"/race/own{i}", str(i)],
                              env=xsd.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(12)]
    for p in procs:
        try:
            _, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate(timeout=TIMEOUT)
            raise
        assert p.returncode == 0, err
    names = xsd.run("xenstore-list", "/race").stdout.split()
    assert sorted(names) == sorted(["shared"] + [f"own{i}" for i in range(12)])
    assert int(xsd.run("xenstore-read", "/race/shared").stdout) in range(12)


def test_tree_survives_restart_and_crash(xsd: Daemon) -> None:
    xsd.run("xenstore-write", "/persist/a", "1", "/persist/b", "two words")
    xsd.run("xenstore-chmod", "/persist/a", "n4", "r5")
    assert xsd.stop(signal.SIGTERM) == 0
    assert not xsd.sock.exists()
    xsd.start()
    assert xsd.run("xenstore-read", "/persist/a", "/persist/b").stdout == "1\ntwo words\n"
    assert "(n4,r5)" in xsd.run("xenstore-ls", "-p", "/persist").stdout
    # a crash loses at most the last flush delay (0.05 s) of changes
    xsd.run("xenstore-write", "/persist/c", "after restart")
    time.sleep(0.5)
    xsd.stop(signal.SIGKILL)
    xsd.start()
    assert xsd.run("xenstore-read", "/persist/c").stdout == "after restart\n"
    assert list(xsd.state.parent.glob(".xenstored.json.*")) == []


def test_a_missing_socket_fails_fast(xsd: Daemon, tmp_path: Path) -> None:
    """With XENSTORED_PATH set, libxenstore's fallback (xs_domain_dev) uses the same path, not
    /dev/xen/xenbus: a client pointed at nothing fails at once instead of hanging."""
    env = dict(os.environ, XENSTORED_PATH=str(tmp_path / "absent.sock"))
    r = subprocess.run(["xenstore-read", "/"], env=env, capture_output=True, text=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode != 0
