"""End-to-end: the console, both ways, through the API and the interactive CLI.

The `echo` guest prints "echo: ready" and echoes each input line back as
"echo: <line>"; the line "quit" prints "echo: bye" and powers it off.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, read_until, wait_listed

ECHO_CFG = ROOT / "examples" / "echo.cfg"
DETACH = b"\x1d"  # Ctrl-]


class PtyCli:
    """``python -m pyxen ARGS`` with stdin/stdout/stderr on a pseudo-terminal."""

    def __init__(self, args: list[str], run_dir: os.PathLike[str]) -> None:
        master, slave = os.openpty()
        env = dict(os.environ, PYXEN_RUN_DIR=str(run_dir), PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "pyxen", *args], cwd=ROOT, env=env,
                                     stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.fd = master
        self.out = b""

    def expect(self, pattern: bytes, timeout: float = 10.0) -> bytes:
        rx = re.compile(pattern, re.M)
        end = time.monotonic() + timeout
        while not rx.search(self.out):
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen on the terminal in {timeout}s; "
                                     f"got {self.out!r}")
            r, _, _ = select.select([self.fd], [], [], min(left, 0.2))
            if r:
                try:
                    b = os.read(self.fd, 4096)
                except OSError:  # EIO: every slave fd is closed, the CLI is gone
                    b = b""
                if not b:
                    raise AssertionError(f"terminal closed before {pattern!r}; got {self.out!r}")
                self.out += b
        return self.out

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the CLI to exit by itself, draining the terminal meanwhile."""
        end = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > end:
                raise AssertionError(f"the CLI did not exit in {timeout}s; terminal: {self.out!r}")
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if r:
                try:
                    self.out += os.read(self.fd, 4096)
                except OSError:
                    pass
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.fd)


@pytest.fixture
def pty_cli(host):
    clis: list[PtyCli] = []

    def start(*args: str) -> PtyCli:
        c = PtyCli(list(args), host.run_dir)
        clis.append(c)
        return c

    yield start
    for c in clis:
        c.close()


def test_api_console_roundtrip(host) -> None:
    d = host.create(ECHO_CFG, ['name="echo-api"'])
    s = host.console_socket(d)
    try:
        buf = read_until(s, rb"^echo: ready")
        s.sendall(b"hello\r")
        buf = read_until(s, rb"^echo: hello\r?$", buf=buf)
        s.sendall(b"two\nthree\r\n")  # \n and \r\n end lines as well
        read_until(s, rb"^echo: three", buf=buf)
    finally:
        s.close()


def test_cli_console_detach_leaves_domain_running(host, pty_cli) -> None:
    d = host.create(ECHO_CFG, ['name="echo-cli"'])
    c = pty_cli("console", "echo-cli")
    c.expect(rb"echo: ready")
    c.send(b"hello pty\r")
    c.expect(rb"echo: hello pty")
    c.send(DETACH)
    assert c.wait(10) == 0, c.out
    doms = host.list()
    assert [x["state"] for x in doms if x["domid"] == d] in (["running"], ["blocked"]), doms
    # still alive and listening: a new attach gets an answer
    s = host.console_socket(d)
    try:
        s.sendall(b"after detach\r")
        read_until(s, rb"^echo: after detach")
    finally:
        s.close()


def test_cli_create_console_quit(host, pty_cli) -> None:
    c = pty_cli("create", "-c", "examples/echo.cfg")
    c.expect(rb"echo: ready", timeout=20)
    c.send(b"quit\r")
    c.expect(rb"echo: bye")
    assert c.wait(15) == 0, c.out
    # on_poweroff="destroy": the domain is gone (the CLI left when its console closed)
    wait_listed(host, lambda doms: not any(x["name"] == "echo" for x in doms), timeout=5)
    assert any("echo" in line and "poweroff" in line for line in host.dmesg()), host.dmesg()


def test_scrollback_replayed_to_new_attach(host) -> None:
    d = host.create(ECHO_CFG, ['name="echo-sb"'])
    s = host.console_socket(d)
    try:
        buf = read_until(s, rb"^echo: ready")
        s.sendall(b"before attach\r")
        read_until(s, rb"^echo: before attach", buf=buf)
    finally:
        s.close()
    # A new client gets everything so far without sending a byte.
    s = host.console_socket(d)
    try:
        buf = read_until(s, rb"^echo: before attach", timeout=5)
        assert b"pyxen-guest: booting" in buf
        assert buf.index(b"echo: ready") < buf.index(b"echo: before attach")
    finally:
        s.close()
