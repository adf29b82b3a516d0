"""Boot Debian's cloud kernel (guests/vmlinuz + guests/initrd.img) in this process
to the busybox shell, with the times of each phase; optionally type commands.

    PYTHONPATH=$PWD python3 -m bench.linuxboot [--profile PATH] [--run CMD]...

Used by the ``linux_boot`` and ``linux_guest_*`` benchmarks (bench/benchmarks.py)
and by hand to measure the boot.  Phases (as ``trace.Profile`` names them):
``builder`` (create_domain: unpack the bzImage, build the domain), ``kernel``
(first guest entry to Linux's ``Run /init as init process``), ``userland``
(from there to the busybox prompt); ``cpu_to_init``/``cpu_to_prompt`` are the
domain process's CPU seconds over the last two (guest execution and exits
count, waiting for a CPU does not: steadier than wall time on a loaded
machine).  The domain is created through a private
pyxend, as ``pyxen create -c examples/linux.cfg`` does (Linux needs xenstore),
without a disk."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUESTS = Path(os.environ.get("PYXEN_GUESTS") or ROOT / "guests")
CMDLINE = "console=hvc0 earlyprintk=xen loglevel=8 panic=-1"
INIT_RX = re.compile(rb"Run /init as init process")
PROMPT_RX = re.compile(rb"[/~] # ")


@dataclass
class LinuxBoot:
    """One Linux domain booted by a private pyxend, and its console socket."""

    host: object = None
    run_dir: Path | None = None
    domid: int = -1
    sock: socket.socket | None = None
    t0: float = 0.0  # perf_counter() before the create request
    t_created: float = 0.0  # the daemon answered: domain built (paused), console attached
    t_init: float | None = None  # "Run /init as init process" seen
    t_prompt: float | None = None  # first shell prompt seen
    buf: bytearray = field(default_factory=bytearray)
    pid: int = 0  # the domain process
    # CPU seconds (user + system, all threads) of the domain process at t_created,
    # t_init, t_prompt: guest execution and exits count there (KVM runs the guest
    # in the vCPU thread), waiting for a CPU under load does not
    cpu: list[float] = field(default_factory=list)

    def cpu_now(self) -> float:
        """The domain process's CPU seconds so far (utime + stime), -1 if unknown."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return -1.0

    def _read(self, rx: re.Pattern[bytes], timeout: float, start: int = 0) -> re.Match[bytes]:
        end = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf, start)
            if m:
                return m
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{rx.pattern!r} not seen after {timeout:g} s; console tail:\n"
                                   + bytes(self.buf[-3000:]).decode(errors="replace"))
            assert self.sock is not None
            self.sock.settimeout(min(left, 1.0))
            try:
                b = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not b:
                raise TimeoutError(f"console closed before {rx.pattern!r}; console tail:\n"
                                   + bytes(self.buf[-3000:]).decode(errors="replace"))
            now = time.perf_counter()
            self.buf += b
            if self.t_init is None and INIT_RX.search(self.buf):
                self.t_init = now
                self.cpu.append(self.cpu_now())
            if self.t_init is not None and self.t_prompt is None and PROMPT_RX.search(self.buf):
                self.t_prompt = now
                self.cpu.append(self.cpu_now())

    def wait_prompt(self, timeout: float = 300) -> None:
        self._read(PROMPT_RX, timeout)
        while self.t_prompt is None:
            self._read(PROMPT_RX, timeout, self.buf.rfind(b"Run /init"))

    def run(self, cmd: str, timeout: float = 120) -> str:
        """Type ``cmd`` into the shell; what it printed between two markers."""
        n = len(self.buf)
        assert self.sock is not None
        self.sock.sendall(f'echo "@@""start"; {cmd}; echo "@@""done"\n'.encode())
        self._read(re.compile(rb"^@@done\r?$", re.M), timeout, n)
        out = bytes(self.buf[n:]).decode(errors="replace")
        m = re.search(r"^@@start\r?\n(.*)^@@done\r?$", out, re.M | re.S)
        return m.group(1) if m else out

    def phases(self) -> dict[str, float]:
        """Seconds as the client saw them: create (the daemon's answer: domain
        process forked, bzImage unpacked, domain built), to /init, to the prompt."""
        out = {"create": self.t_created - self.t0}
        if self.t_init is not None:
            out["to_init"] = self.t_init - self.t_created
            if self.t_prompt is not None:
                out["to_prompt"] = self.t_prompt - self.t_init
                out["total"] = self.t_prompt - self.t0
        c = self.cpu
        if len(c) >= 2 and min(c) >= 0:
            out["cpu_to_init"] = c[1] - c[0]
            if len(c) >= 3:
                out["cpu_to_prompt"] = c[2] - c[1]
        return out

    def poweroff(self, timeout: float = 60) -> None:
        """``poweroff`` in the guest: the domain ends cleanly (and writes its profile)."""
        if self.sock is None:
            return
        self.sock.sendall(b"poweroff\n")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            doms = [d for d in self.host.list() if d["domid"] == self.domid]  # type: ignore[attr-defined]
            if not doms or doms[0]["state"] in ("shutdown", "crashed"):
                return
            time.sleep(0.2)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        h = self.host
        if h is not None:
            try:
                h.destroy(self.domid)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - already gone
                pass
            try:
                h.quit()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                pass
            h.close()  # type: ignore[attr-defined]
            self.host = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def boot(initrd: Path | None = None, memory_mib: int = 256, cmdline: str = CMDLINE,
         timeout: float = 300, profile: str | None = None) -> LinuxBoot:
    """Boot to the busybox prompt through a private pyxend, as ``pyxen create -c
    examples/linux.cfg`` does (the caller closes the returned boot).  With
    ``profile`` the domain process writes its exit profile there
    (PYXEN_PROFILE_EXITS) when the domain ends."""
    from pyxen.toolstack.api import Host
    from pyxen.toolstack.xlcfg import load_domain_config
    b = LinuxBoot()
    b.run_dir = Path(f"/tmp/pyxen-bench-{os.getpid()}-{time.monotonic_ns()}")
    saved = os.environ.get("PYXEN_PROFILE_EXITS")
    if profile:
        os.environ["PYXEN_PROFILE_EXITS"] = profile  # the daemon and its domains inherit it
    try:
        b.host = Host(run_dir=b.run_dir)
    finally:
        if saved is None:
            os.environ.pop("PYXEN_PROFILE_EXITS", None)
        else:
            os.environ["PYXEN_PROFILE_EXITS"] = saved
    try:
        cfg, _ = load_domain_config(ROOT / "examples" / "linux.cfg", [
            'name="linux-bench"', f'kernel="{GUESTS / "vmlinuz"}"',
            f'ramdisk="{initrd or GUESTS / "initrd.img"}"', "disk=[]", f"memory={memory_mib}",
            f'extra="{cmdline}"', 'on_crash="destroy"', 'on_reboot="destroy"'])
        b.t0 = time.perf_counter()
        b.domid, b.sock = b.host.create_attached(cfg)  # type: ignore[attr-defined]
        b.t_created = time.perf_counter()
        b.pid = next((int(d.get("pid") or 0) for d in b.host.list()  # type: ignore[attr-defined]
                      if d["domid"] == b.domid), 0)
        b.cpu.append(b.cpu_now())
        b.wait_prompt(timeout)
    except BaseException:
        b.close()
        raise
    return b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--initrd", type=Path)
    ap.add_argument("--run", action="append", default=[], help="a shell command to run after boot")
    ap.add_argument("--profile", help="write the exit profile (trace.Profile) as JSON here")
    a = ap.parse_args()
    b = boot(initrd=a.initrd, profile=a.profile)
    try:
        print(json.dumps({k: round(v, 3) for k, v in b.phases().items()}))
        for cmd in a.run:
            print(b.run(cmd, 600), end="")
        b.poweroff()
    finally:
        b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
