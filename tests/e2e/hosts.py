"""Two pyxen "hosts" on one machine, for migration tests and the bench: a
pyxend each, with its own run dir (``--run-dir``/``PYXEN_RUN_DIR``), in
network namespaces of their own joined by a veth pair (10.77.N.1 and
10.77.N.2).  Made and removed by :class:`TwoHosts` (needs root and ``ip``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def can_make_namespaces() -> str | None:
    """Why two hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "no ip(8) (iproute2)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class TwoHosts:
    def __init__(self, tag: str | None = None) -> None:
        from pyxen.toolstack.api import Host
        n = os.getpid() % 200 + 20
        self.tag = tag or f"px{os.getpid()}"
        self.ns = [f"{self.tag}a", f"{self.tag}b"]
        self.ips = [f"10.77.{n}.1", f"10.77.{n}.2"]
        self.dirs = [Path(f"/tmp/pyxen-mig-{self.tag}-{c}") for c in "ab"]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.hosts: list[Any] = []
        self.env = dict(os.environ, PYTHONPATH=str(ROOT) + (
            os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        try:
            for ns in self.ns:
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            va, vb = f"{self.tag}va"[-15:], f"{self.tag}vb"[-15:]
            _ip("link", "add", va, "type", "veth", "peer", "name", vb)
            for ns, dev, addr in zip(self.ns, (va, vb), self.ips, strict=True):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
            for ns, rd in zip(self.ns, self.dirs, strict=True):
                shutil.rmtree(rd, ignore_errors=True)
                rd.mkdir(mode=0o700)
                log = open(rd / "pyxend.log", "ab")  # noqa: SIM115 - the daemon's
                self.procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-m", "pyxen.toolstack.daemon",
                     "--run-dir", str(rd)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    env=self.env, start_new_session=True))
                log.close()
            for rd in self.dirs:
                end = time.monotonic() + 20
                while True:
                    try:
                        self.hosts.append(Host(run_dir=rd, autostart=False))
                        break
                    except Exception:  # noqa: BLE001 - not up yet
                        if time.monotonic() > end:
                            raise
                        time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    @property
    def a(self) -> Any:
        return self.hosts[0]

    @property
    def b(self) -> Any:
        return self.hosts[1]

    def run_in(self, i: int, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """A command in host ``i``'s namespace, with its run dir."""
        env = dict(self.env, PYXEN_RUN_DIR=str(self.dirs[i]))
        return subprocess.Popen(["ip", "netns", "exec", self.ns[i], *argv], env=env, **kw)

    def receiver(self, port: int, **kw: Any) -> subprocess.Popen[bytes]:
        """``pyxen migrate-receive --listen`` on host b; returns once it listens."""
        p = self.run_in(1, [sys.executable, "-m", "pyxen", "migrate-receive", "--listen",
                            f"{self.ips[1]}:{port}"], stderr=subprocess.PIPE, **kw)
        assert p.stderr is not None
        line = p.stderr.readline()
        assert b"listening" in line, line
        return p

    def console(self, i: int, name: str) -> str:
        from pyxen.toolstack import paths
        try:
            return paths.console_log(self.dirs[i], name).read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        for h in self.hosts:
            try:
                h.quit()
            except Exception:  # noqa: BLE001
                pass
            h.close()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        if not os.environ.get("PYXEN_KEEP_RUNDIR"):
            for rd in self.dirs:
                shutil.rmtree(rd, ignore_errors=True)
