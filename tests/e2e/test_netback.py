"""Virtual network interfaces end to end (issue 10): Debian's Linux, with its
own unmodified ``xen-netfront``, on a vif whose backend is pyxen's netback,
a TAP on a Linux bridge.

Everything happens in a network namespace the test creates and deletes: the
whole pyxend runs in it (``ip netns exec``), so the domain processes it
forks make their TAPs there and the bridge (``xenbr0``, made by netback when
missing) and the host's address live there too.  The initramfs is built
here with ``tools/mkinitramfs`` (it adds xen-netfront.ko, a module in
Debian's cloud kernel).  Skips loudly without KVM, the fetched guests, root,
``ip`` or pyroute2.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_until
from tests.e2e.test_unmodified_guests import GUESTS, INIT_MARKER, INITRD, VMLINUZ, Shell, need

HOST_IP = "10.77.0.1"
NET = "10.77.0"


def _run(*cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture
def netns(kvm_ok: None) -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("SKIPPED LOUDLY: network namespaces need root and iproute2's ip")
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        pytest.skip("SKIPPED LOUDLY: pyroute2 is not installed (pip install pyroute2)")
    name = f"pyxnet{os.getpid()}"
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        _run("ip", "netns", "del", name, check=False)


@pytest.fixture
def nshost(netns: str, tmp_path: Path) -> Iterator[object]:
    """A pyxend started inside the namespace; its domain processes (and TAPs) are there too."""
    from pyxen.toolstack import paths
    from pyxen.toolstack.api import Host
    rd = Path(f"/tmp/pyxen-nettest-{os.getpid()}-{time.monotonic_ns()}")
    paths.ensure_run_dir(rd)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(rd / "pyxend.out", "ab")  # noqa: SIM115
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "pyxen.toolstack.daemon",
                             "--run-dir", str(rd)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            env=env, start_new_session=True)
    log.close()
    end = time.monotonic() + 20
    while not paths.daemon_socket(rd).exists():
        assert proc.poll() is None and time.monotonic() < end, (rd / "pyxend.out").read_text()
        time.sleep(0.05)
    h = Host(run_dir=rd, autostart=False)
    try:
        yield h
    finally:
        try:
            h.quit()
        except Exception:  # noqa: BLE001
            pass
        h.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if not os.environ.get("PYXEN_KEEP_RUNDIR"):
            shutil.rmtree(rd, ignore_errors=True)


@pytest.fixture(scope="module")
def net_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(VMLINUZ, INITRD)
    out = tmp_path_factory.mktemp("initrd") / "initrd-net.img"
    _run(sys.executable, str(ROOT / "tools" / "mkinitramfs"), "--guests", str(GUESTS), "-o", str(out),
         timeout=120)
    return out


def _boot(host: object, initrd: Path, name: str, vifs: list[str], memory: int = 256) -> tuple[int, Shell]:
    vif = "[" + ",".join(f"'{v}'" for v in vifs) + "]"
    domid, s = host.create_attached(ROOT / "examples" / "linux-net.cfg", [  # type: ignore[attr-defined]
        f'name="{name}"', f'kernel="{VMLINUZ}"', f'ramdisk="{initrd}"', f"vif={vif}",
        f"memory={memory}", 'on_crash="destroy"'])
    sh = Shell(s)
    sh.buf = read_until(s, re.escape(INIT_MARKER).encode(), 300)
    sh.wait_prompt(120)
    return domid, sh


def _ns(ns: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return _run("ip", "netns", "exec", ns, *cmd, timeout=timeout, check=False)


def _diag(host: object, ns: str, sh: Shell, out: str) -> str:
    """What to look at when packets do not cross."""
    return "\n".join([out, "--- guest dmesg", sh.run("dmesg | tail -20"), "--- guest /proc/net/dev",
                      sh.run("cat /proc/net/dev"), "--- host links", _ns(ns, "ip", "-s", "link").stdout,
                      "--- pyxen dmesg", *host.dmesg()[-30:]])  # type: ignore[attr-defined]


def _guest_up(sh: Shell, ip: str) -> str:
    link = sh.run("ip link show eth0")
    sh.run(f"ip addr add {ip}/24 dev eth0; ip link set eth0 up")
    return link


def test_linux_netfront_pings_and_serves_http(nshost: object, netns: str, net_initrd: Path) -> None:
    mac = "00:16:3e:4e:54:01"
    domid, sh = _boot(nshost, net_initrd, "net1", [f"mac={mac},bridge=xenbr0"])
    # netback made the bridge and put vif<D>.0 in it
    br = _ns(netns, "ip", "-o", "link", "show", "master", "xenbr0")
    assert f"vif{domid}.0" in br.stdout, br
    _ns(netns, "ip", "addr", "add", f"{HOST_IP}/24", "dev", "xenbr0")
    _ns(netns, "ip", "link", "set", "xenbr0", "up")
    link = _guest_up(sh, f"{NET}.2")
    assert "eth0" in link and mac in link, link
    assert "state DOWN" not in sh.run("ip link show eth0")
    out = sh.run(f"ping -c 3 -W 5 {HOST_IP}", timeout=60)
    assert re.search(r"3 packets transmitted, [123] packets received", out), \
        _diag(nshost, netns, sh, out)
    # the host has no ping of its own here: busybox's (static, fetched with the guests)
    p = _ns(netns, str(GUESTS / "busybox" / "bin" / "busybox"), "ping", "-c", "3", "-W", "5", f"{NET}.2")
    assert p.returncode == 0, p.stdout + p.stderr
    # a file over HTTP: busybox httpd in the guest, curl in the namespace
    size_mib = int(os.environ.get("PYXEN_NET_HTTP_MIB", "16"))
    sh.run(f"mkdir -p /www && dd if=/dev/urandom of=/www/f bs=1M count={size_mib} 2>/dev/null", timeout=120)
    want = sh.run("sha256sum /www/f", timeout=120).split()[0]
    sh.run("httpd -p 80 -h /www")
    t0 = time.monotonic()
    got = subprocess.run(["ip", "netns", "exec", netns, "curl", "-sS", "--max-time", "300",
                          f"http://{NET}.2/f"], capture_output=True, timeout=330)
    secs = time.monotonic() - t0
    assert got.returncode == 0, got.stderr
    body = got.stdout
    assert len(body) == size_mib << 20
    assert hashlib.sha256(body).hexdigest() == want
    print(f"HTTP guest -> host: {size_mib} MiB in {secs:.2f} s ({size_mib / secs:.1f} MiB/s)")
    stats = [ln for ln in nshost.dmesg() if "netback" in ln]  # type: ignore[attr-defined]
    assert not [ln for ln in stats if "protocol error" in ln or "Traceback" in ln], stats


def test_two_guests_on_one_bridge(nshost: object, netns: str, net_initrd: Path) -> None:
    _d1, a = _boot(nshost, net_initrd, "neta", ["bridge=xenbr0"])
    _d2, b = _boot(nshost, net_initrd, "netb", ["bridge=xenbr0"])
    _guest_up(a, f"{NET}.11")
    _guest_up(b, f"{NET}.12")
    out = a.run(f"ping -c 3 -W 5 {NET}.12", timeout=60)
    assert re.search(r"3 packets transmitted, [123] packets received", out), out
    out = b.run(f"ping -c 3 -W 5 {NET}.11", timeout=60)
    assert re.search(r"3 packets transmitted, [123] packets received", out), out
