"""Shared fixtures: KVM availability, the guest build, in-process and daemon runs."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "guest" / "build"
_build_lock = threading.Lock()
_built = False


def kvm_missing() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this machine"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return f"/dev/kvm cannot be opened: {e.strerror}"
    return None


@pytest.fixture(scope="session")
def kvm_ok() -> None:
    why = kvm_missing()
    if why:
        pytest.skip(f"SKIPPED LOUDLY: end-to-end test needs KVM: {why}")
    from pyxen import kvm
    kvm.install_kick_handler()


@pytest.fixture(scope="session")
def guest(kvm_ok: None) -> Path:
    """The guest apps, built from guest/ with the system gcc (incremental)."""
    global _built
    with _build_lock:
        if not _built and os.environ.get("PYXEN_NO_GUEST_BUILD") and (GUEST / "hello").exists():
            _built = True  # a developer iterating on the guest builds it by hand
        if not _built:
            r = subprocess.run(["make", "-C", str(ROOT / "guest"), "-j2"], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.fail(f"guest build failed:\n{r.stdout}\n{r.stderr}")
            _built = True
    return GUEST


class GuestRun:
    """A domain run in this process, with its console output collected."""

    def __init__(self, kernel: str | Path, cmdline: str = "", memory: int = 16,
                 name: str = "test", start: bool = True) -> None:
        from pyxen.domctl import create_domain
        from pyxen.hv.domain import DomainSpec
        self.chunks: list[tuple[float, bytes]] = []
        self.t0 = time.monotonic()
        self.cond = threading.Condition()
        self.domain = create_domain(DomainSpec(name=name, memory_mib=memory, kernel=str(kernel),
                                               cmdline=cmdline), console_sink=self._sink, start=start)

    def _sink(self, b: bytes) -> None:
        with self.cond:
            self.chunks.append((time.monotonic(), b))
            self.cond.notify_all()

    @property
    def output(self) -> str:
        with self.cond:
            return b"".join(c for _, c in self.chunks).decode(errors="replace")

    def lines(self) -> list[str]:
        return self.output.splitlines()

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        end = time.monotonic() + timeout
        rx = re.compile(pattern, re.M)
        with self.cond:
            while True:
                m = rx.search(b"".join(c for _, c in self.chunks).decode(errors="replace"))
                if m:
                    return m
                left = end - time.monotonic()
                if left <= 0 or self.domain.state in ("shutdown", "crashed"):
                    m = rx.search(b"".join(c for _, c in self.chunks).decode(errors="replace"))
                    if m:
                        return m
                    raise AssertionError(f"{pattern!r} not seen in {timeout}s; state "
                                         f"{self.domain.state}; output:\n{self.output}\n"
                                         f"log:\n" + "\n".join(self.domain.dmesg))
                self.cond.wait(min(left, 0.2))

    def wait_stopped(self, timeout: float = 10.0) -> str:
        assert self.domain.wait_stopped(timeout), f"domain still running; output:\n{self.output}"
        return self.domain.state

    def close(self) -> None:
        self.domain.destroy()
        self.domain.close()


@pytest.fixture
def run_guest(guest: Path) -> Iterator[object]:
    runs: list[GuestRun] = []

    def start(app: str | Path, cmdline: str = "", memory: int = 16, **kw: object) -> GuestRun:
        kernel = app if isinstance(app, Path) or "/" in str(app) else guest / str(app)
        r = GuestRun(kernel, cmdline, memory, **kw)  # type: ignore[arg-type]
        runs.append(r)
        return r

    yield start
    for r in runs:
        r.close()


@pytest.fixture
def host(guest: Path, tmp_path: Path) -> Iterator[object]:
    """A pyxend of our own in a temporary run dir (stopped afterwards)."""
    from pyxen.toolstack.api import Host
    rd = Path(f"/tmp/pyxen-test-{os.getpid()}-{time.monotonic_ns()}")
    h = Host(run_dir=rd)
    try:
        yield h
    finally:
        try:
            h.quit()
        except Exception:  # noqa: BLE001
            pass
        h.close()
        import shutil
        for _ in range(50):  # the daemon removes its sockets as it exits
            if not (rd / "pyxend.sock").exists():
                break
            time.sleep(0.05)
        if not os.environ.get("PYXEN_KEEP_RUNDIR"):
            shutil.rmtree(rd, ignore_errors=True)


def wait_listed(host: Any, pred: Any, timeout: float = 10.0, what: str = "condition") -> list[dict]:
    """Poll ``host.list()`` until ``pred(domains)`` holds; the domains then."""
    end = time.monotonic() + timeout
    while True:
        doms = host.list()
        if pred(doms):
            return list(doms)
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached in {timeout}s; domains: {doms}; "
                                 f"log: {host.dmesg()[-10:]}")
        time.sleep(0.05)


def read_until(s: socket.socket, pattern: bytes, timeout: float = 10.0, buf: bytes = b"") -> bytes:
    """Read from a console socket until ``pattern`` (a regex) appears."""
    rx = re.compile(pattern, re.M)
    end = time.monotonic() + timeout
    while not rx.search(buf):
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{pattern!r} not seen in {timeout}s; got {buf!r}")
        s.settimeout(left)
        try:
            b = s.recv(4096)
        except TimeoutError:
            continue
        if not b:
            raise AssertionError(f"console closed before {pattern!r}; got {buf!r}")
        buf += b
    return buf


def cli(args: list[str], run_dir: Path, timeout: float = 30, input: bytes | None = None
        ) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYXEN_RUN_DIR=str(run_dir), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pyxen", *args], cwd=ROOT, env=env,
                          capture_output=True, timeout=timeout, input=input)
