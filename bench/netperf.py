"""TCP stream throughput through netback with iperf3 (issue 10), side by side
with iperf3 between two network namespaces over a veth pair in the same run.

One setup serves every ``net_tcp_*`` row of a run (measured once, cached):

* a network namespace with a pyxend in it (its domain processes make their
  TAPs there, on the bridge ``xenbr0`` netback creates) and two Debian Linux
  guests with their own ``xen-netfront`` (guests/vmlinuz and the test
  initramfs with Debian's iperf3 and its libraries, ``tools/mkinitramfs
  --iperf3``), each running ``iperf3 -s``;
* two more namespaces joined by a veth pair, ``iperf3 -s`` in one of them:
  the baseline, the same host's stack without a hypervisor in the way.

Rows (MiB/s the receiver counted, median of the rounds; the ratio is
pyxen/veth, target ≥ 0.5 in each direction):

* ``net_tcp_host_to_guest``: ``iperf3 -c GUEST`` in the namespace;
* ``net_tcp_guest_to_host``: ``iperf3 -c GUEST -R`` (the guest's server sends);
* ``net_tcp_guest_to_guest``: ``iperf3 -c GUEST_A`` typed into guest B's shell.

The veth figure is taken right after each pyxen figure, in the same
direction (``-R`` for the reverse), so that both see the same load.  Needs
root, ``ip``, pyroute2, the host's ``iperf3`` (Debian's iperf3) and
``tools/fetch-guests``; each missing piece is a loud skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .lib import BUILD, ROOT, Context, Failed, Result, Skip, Target, benchmark, compare, median

GUESTS = Path(os.environ.get("PYXEN_GUESTS") or ROOT / "guests")
NET = "10.78.0"
HOST_IP = f"{NET}.1"
GUEST_IPS = (f"{NET}.21", f"{NET}.22")
VETH_IPS = ("10.78.1.1", "10.78.1.2")
MIB = 1 << 20
_cache: dict[str, Any] = {}


def _ip(*args: str) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise Failed(f"ip {' '.join(args)}: {p.stderr.strip()}")


def _prereqs() -> str:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise Skip("SKIPPED LOUDLY: network namespaces need root and iproute2's ip")
    iperf = shutil.which("iperf3")
    if iperf is None:
        raise Skip("SKIPPED LOUDLY: no iperf3 on the host (apt-get install iperf3)")
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        raise Skip("SKIPPED LOUDLY: pyroute2 is not installed (pip install pyroute2)") from None
    missing = [p.name for p in (GUESTS / "vmlinuz", GUESTS / "busybox", GUESTS / "iperf3" / "usr/bin/iperf3")
               if not p.exists()]
    if missing:
        raise Skip(f"SKIPPED LOUDLY: run tools/fetch-guests first (missing {', '.join(missing)})")
    return iperf


def _iperf_rate(p: subprocess.CompletedProcess[str]) -> float:
    """MiB/s the receiver counted, from ``iperf3 -J``."""
    try:
        rep = json.loads(p.stdout)
    except ValueError:
        raise Failed(f"iperf3 exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}") from None
    if "error" in rep or p.returncode != 0:
        raise Failed(f"iperf3: {rep.get('error') or p.stderr.strip()[-300:]}")
    return float(rep["end"]["sum_received"]["bytes"]) / float(rep["end"]["sum_received"]["seconds"]) / MIB


class _Setup:
    """The namespaces, the pyxend, the two guests and the iperf3 servers."""

    def __init__(self, ctx: Context, iperf: str) -> None:
        self.iperf = iperf
        tag = f"pxnp{os.getpid()}"
        self.ns, self.va, self.vb = tag, f"{tag}va", f"{tag}vb"
        self.made: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.host: Any = None
        self.shells: list[Any] = []
        self.boot_failures: list[str] = []
        self.rd = Path(f"/tmp/pyxen-netperf-{os.getpid()}-{time.monotonic_ns()}")
        try:
            self._start(ctx)
        except BaseException:
            self.close()
            raise

    def _start(self, ctx: Context) -> None:
        from pyxen.toolstack import paths
        from pyxen.toolstack.api import Host

        from . import linuxboot
        initrd = BUILD / "initrd-net.img"
        BUILD.mkdir(parents=True, exist_ok=True)
        p = subprocess.run([sys.executable, str(ROOT / "tools" / "mkinitramfs"), "--guests", str(GUESTS),
                            "--iperf3", "-o", str(initrd)], capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise Failed(f"tools/mkinitramfs --iperf3 failed: {p.stderr.strip()[-300:]}")
        for ns in (self.ns, self.va, self.vb):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # the baseline: veth between two namespaces, an iperf3 server on one end
        _ip("link", "add", self.va, "type", "veth", "peer", "name", self.vb)
        for ns, addr in zip((self.va, self.vb), VETH_IPS, strict=True):
            _ip("link", "set", ns, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns)
            _ip("-n", ns, "link", "set", ns, "up")
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.vb, self.iperf, "-s", "-B", VETH_IPS[1]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # pyxend in its namespace, as tests/e2e/test_netback.py
        paths.ensure_run_dir(self.rd)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = open(self.rd / "pyxend.out", "ab")  # noqa: SIM115 - the daemon's
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "pyxen.toolstack.daemon", "--run-dir",
             str(self.rd)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            start_new_session=True))
        log.close()
        end = time.monotonic() + 30
        while not paths.daemon_socket(self.rd).exists():
            if self.procs[-1].poll() is not None or time.monotonic() > end:
                raise Failed("pyxend did not start: " + (self.rd / "pyxend.out").read_text()[-300:])
            time.sleep(0.05)
        self.host = Host(run_dir=self.rd, autostart=False)
        for i, ip in enumerate(GUEST_IPS):
            for attempt in (1, 2):
                t0 = time.monotonic()
                domid, sock = self.host.create_attached(ROOT / "examples" / "linux-net.cfg", [
                    f'name="netperf{i}-{attempt}"', f'kernel="{GUESTS / "vmlinuz"}"', f'ramdisk="{initrd}"',
                    "vif=['bridge=xenbr0']", "memory=384", f'extra="{linuxboot.CMDLINE}"',
                    'on_crash="destroy"'])
                b = linuxboot.LinuxBoot(sock=sock, domid=domid)
                try:
                    b.wait_prompt(300)
                    break
                except TimeoutError as e:
                    # a boot that dies before the shell (docs/guests.md's known early-boot
                    # oops) is retried once, loudly; twice fails the rows
                    self.boot_failures.append(str(e)[-1500:])
                    ctx.log(f"LOUDLY: guest {i} did not reach its shell (attempt {attempt}): "
                            f"{str(e).strip().splitlines()[-1][-200:]}")
                    if b.sock is not None:
                        b.sock.close()
                    try:
                        self.host.destroy(domid)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
                    if attempt == 2:
                        raise Failed(f"guest {i} did not boot twice", console=str(e)[-3000:]) from None
            self.shells.append(b)
            ctx.log(f"guest {i} (domain {domid}) at its shell in {time.monotonic() - t0:.1f} s")
            b.run(f"dmesg -n 1; ip addr add {ip}/24 dev eth0; ip link set eth0 up; iperf3 -s -D")
        _ip("-n", self.ns, "addr", "add", f"{HOST_IP}/24", "dev", "xenbr0")
        _ip("-n", self.ns, "link", "set", "xenbr0", "up")
        out = self.shells[1].run(f"ping -c 1 -W 5 {GUEST_IPS[0]}; ping -c 1 -W 5 {HOST_IP}", 60)
        if out.count("1 packets received") < 2:
            raise Failed(f"the guests do not reach each other and the host: {out.strip()[-300:]}")

    def host_client(self, server: str, secs: int, reverse: bool, ns: str | None = None) -> float:
        """iperf3 -c from the namespace (pyxen's, or the veth's first end)."""
        cmd = ["ip", "netns", "exec", ns or self.ns, self.iperf, "-c", server, "-t", str(secs), "-J",
               "--connect-timeout", "5000", *(["-R"] if reverse else [])]
        for _ in range(25):
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
            if "Connection refused" not in p.stdout and "server is busy" not in p.stdout:
                break
            time.sleep(0.2)  # the server may not listen yet, or still end the last test
        return _iperf_rate(p)

    def guest_client(self, i: int, server: str, secs: int) -> float:
        """iperf3 -c typed into guest i's shell: MiB/s its server received."""
        out = self.shells[i].run(f"iperf3 -c {server} -t {secs} -J --connect-timeout 5000", secs + 90)
        start = out.find("{")
        return _iperf_rate(subprocess.CompletedProcess([], 0, out[start:] if start >= 0 else out, ""))

    def close(self) -> None:
        for b in self.shells:
            if b.sock is not None:
                b.sock.close()
                b.sock = None
        if self.host is not None:
            for b in self.shells:
                try:
                    self.host.destroy(b.domid)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            try:
                self.host.quit()
            except Exception:  # noqa: BLE001
                pass
            self.host.close()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(self.rd, ignore_errors=True)


def _measure(ctx: Context) -> dict[str, Any]:
    """Every direction on pyxen and over the veth pair, alternating (cached)."""
    if "err" in _cache:
        raise _cache["err"]
    if "res" in _cache:
        return dict(_cache["res"])
    iperf = _prereqs()
    ctx.require_kvm()
    secs = 2 if ctx.quick else 5
    rounds = 1 if ctx.quick else 3
    res: dict[str, Any] = {k: {"pyxen": [], "veth": []} for k in ("h2g", "g2h", "g2g")}
    try:
        s = _Setup(ctx, iperf)
    except (Skip, Failed) as e:
        _cache["err"] = e
        raise
    try:
        for r in range(rounds):
            for key, reverse in (("h2g", False), ("g2h", True), ("g2g", False)):
                if key == "g2g":
                    px = s.guest_client(1, GUEST_IPS[0], secs)
                else:
                    px = s.host_client(GUEST_IPS[0], secs, reverse)
                veth = s.host_client(VETH_IPS[1], secs, reverse, ns=s.va)
                res[key]["pyxen"].append(px)
                res[key]["veth"].append(veth)
                ctx.log(f"round {r + 1} {key}: pyxen {px:.1f} MiB/s, veth {veth:.1f} MiB/s")
        vifs = {d: s.host.network_list(b.domid) for d, b in enumerate(s.shells)}
        res["boot_failures"] = s.boot_failures
        res["vif_stats"] = {str(d): [v.get("stats") for v in lst] for d, lst in vifs.items()}
    except Failed as e:
        _cache["err"] = e
        raise
    finally:
        s.close()
    res["seconds_per_stream"] = secs
    _cache["res"] = res
    return dict(res)


def _row(key: str, name: str, doc: str) -> None:
    def fn(ctx: Context) -> Result:
        m = _measure(ctx)
        px, veth = m[key]["pyxen"], m[key]["veth"]
        return compare(median(px), median(veth), baseline_desc="iperf3 between two netns over a veth pair",
                       pyxen_rounds=[round(x, 1) for x in px], veth_rounds=[round(x, 1) for x in veth],
                       seconds_per_stream=m["seconds_per_stream"], vif_stats=m.get("vif_stats"),
                       boot_failures=m.get("boot_failures"))
    fn.__doc__ = doc
    benchmark(name, unit="MiB/s", target=Target("ratio", ">=", 0.5))(fn)


_row("h2g", "net_tcp_host_to_guest", "TCP stream host -> Linux guest (iperf3) vs the same over a veth pair.")
_row("g2h", "net_tcp_guest_to_host",
     "TCP stream Linux guest -> host (iperf3 -R) vs the same over a veth pair.")
_row("g2g", "net_tcp_guest_to_guest",
     "TCP stream Linux guest -> Linux guest on one bridge (iperf3) vs host iperf3 over a veth pair.")
