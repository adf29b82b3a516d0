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
    """Hosts a and b (``ns``, ``ips`` on the migration link, ``dirs``).

    ``lan=True`` adds a third host, the *outside* (namespace ``outside``):
    the client, the observer and the storage server of issue 11.  It has a
    bridge ``lan0`` (``lan_ips[2]``); each host's ``xenbr0`` (made here, so
    netback finds it and only enslaves its TAPs) is joined to it by a veth,
    so a guest's vif is on one L2 segment with the outside whichever host it
    runs on, as two Xen hosts whose bridges share a LAN.  The hosts have
    ``lan_ips[0]``/``[1]`` on their xenbr0 (to reach the storage);
    ``guest_ip`` is free for a guest.  ``memory`` is each daemon's
    ``--memory`` (MiB, 0: none), a list for one each."""

    def __init__(self, tag: str | None = None, lan: bool = False,
                 memory: int | list[int] = 0) -> None:
        from pyxen.toolstack.api import Host
        n = os.getpid() % 200 + 20
        self.tag = tag or f"px{os.getpid()}"
        self.ns = [f"{self.tag}a", f"{self.tag}b"]
        self.ips = [f"10.77.{n}.1", f"10.77.{n}.2"]
        self.outside = f"{self.tag}c"
        self.lan_ips = [f"10.78.{n}.1", f"10.78.{n}.2", f"10.78.{n}.3"]
        self.guest_ip = f"10.78.{n}.10"
        self.lan = lan
        self.dirs = [Path(f"/tmp/pyxen-mig-{self.tag}-{c}") for c in "ab"]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.hosts: list[Any] = []
        self.env = dict(os.environ, PYTHONPATH=str(ROOT) + (
            os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        mem = memory if isinstance(memory, list) else [memory, memory]
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
            if lan:
                self._make_lan()
            for ns, rd, m in zip(self.ns, self.dirs, mem, strict=True):
                shutil.rmtree(rd, ignore_errors=True)
                rd.mkdir(mode=0o700)
                log = open(rd / "pyxend.log", "ab")  # noqa: SIM115 - the daemon's
                self.procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-m", "pyxen.toolstack.daemon",
                     "--run-dir", str(rd), *(["--memory", str(m)] if m else [])],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
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

    def _make_lan(self) -> None:
        out = self.outside
        _ip("netns", "add", out)
        _ip("-n", out, "link", "set", "lo", "up")
        _ip("-n", out, "link", "add", "lan0", "type", "bridge")
        _ip("-n", out, "addr", "add", f"{self.lan_ips[2]}/24", "dev", "lan0")
        _ip("-n", out, "link", "set", "lan0", "up")
        for i, ns in enumerate(self.ns):
            here, there = f"{self.tag}l{i}"[-15:], f"{self.tag}p{i}"[-15:]
            _ip("-n", ns, "link", "add", "xenbr0", "type", "bridge")
            _ip("link", "add", here, "type", "veth", "peer", "name", there)
            _ip("link", "set", here, "netns", ns)
            _ip("link", "set", there, "netns", out)
            _ip("-n", ns, "link", "set", here, "master", "xenbr0")
            _ip("-n", out, "link", "set", there, "master", "lan0")
            _ip("-n", ns, "addr", "add", f"{self.lan_ips[i]}/24", "dev", "xenbr0")
            for n_, dev in ((ns, here), (out, there), (ns, "xenbr0")):
                _ip("-n", n_, "link", "set", dev, "up")

    def lan_port(self, i: int) -> str:
        """The outside's bridge port that leads to host ``i``."""
        return f"{self.tag}p{i}"[-15:]

    def outside_run(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """A command on the outside host (the client, observer, storage)."""
        return subprocess.Popen(["ip", "netns", "exec", self.outside, *argv], env=self.env, **kw)

    def outside_wait_port(self, port: int, timeout: float = 30) -> None:
        """Until something listens on the outside's ``port`` (TCP)."""
        code = (f"import socket,time\nend=time.monotonic()+{timeout}\nwhile True:\n"
                f"  try:\n    socket.create_connection(('{self.lan_ips[2]}',{port}),1).close();break\n"
                f"  except OSError:\n    assert time.monotonic()<end\n    time.sleep(0.05)\n")
        subprocess.run(["ip", "netns", "exec", self.outside, sys.executable, "-c", code],
                       check=True, timeout=timeout + 10, capture_output=True)

    def nbd_server(self, image: Path, port: int = 10809) -> tuple[subprocess.Popen[bytes], str]:
        """Shared storage: ``qemu-nbd`` (or ``nbdkit``) on the outside host
        exporting ``image`` as ``disk`` to several clients at once (the
        source and the destination both hold it open during a migration).
        Returns the server (the caller kills it by its pid) and the URI."""
        addr = self.lan_ips[2]
        if shutil.which("qemu-nbd"):
            argv = ["qemu-nbd", "-f", "raw", "-x", "disk", "-b", addr, "-p", str(port), "-t",
                    "-e", "8", "--cache=none", str(image)]
        else:
            argv = ["nbdkit", "-f", "-i", addr, "-p", str(port), "-e", "disk", "file", str(image)]
        p = self.outside_run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.outside_wait_port(port)
        except BaseException:
            p.kill()
            p.wait(10)
            raise
        return p, f"nbd://{addr}:{port}/disk"

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
        for ns in [*self.ns, *([self.outside] if self.lan else [])]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        if not os.environ.get("PYXEN_KEEP_RUNDIR"):
            for rd in self.dirs:
                shutil.rmtree(rd, ignore_errors=True)


# --- what runs on the outside host and in the guest (issue 11) -------------------------

#: The Linux guest's heartbeat: one UDP datagram every PERIOD_US to IP:PORT,
#: carrying a sequence number and the guest's CLOCK_MONOTONIC (ns).  Deadlines
#: are absolute, so a late send does not shift the rest; after a stall longer
#: than a period it starts again from now rather than sending the missed ones
#: in a burst.  Send errors (the vif reconnecting) are ignored: the observer
#: sees the gap, which is what it measures.  Built static by the host's gcc.
HEARTBEAT_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

static int64_t ns(const struct timespec *t) { return (int64_t)t->tv_sec * 1000000000 + t->tv_nsec; }

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: hbsend IP PORT PERIOD_US\n");
        return 2;
    }
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1)
        return 2;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0)
        return 1;
    int64_t period = atol(argv[3]) * 1000;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    int64_t next = ns(&now);
    for (uint64_t seq = 0;; seq++) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        uint64_t msg[2] = {seq, (uint64_t)ns(&now)};
        sendto(s, msg, sizeof msg, 0, (struct sockaddr *)&a, sizeof a);
        next += period;
        if (ns(&now) > next + period)
            next = ns(&now) + period;
        struct timespec t = {next / 1000000000, next % 1000000000};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
    }
}
"""


def build_heartbeat_sender(outdir: Path) -> Path:
    """``hbsend``, static, for the Linux guest's initramfs (``tools/mkinitramfs
    --add``).  Raises RuntimeError when the host cannot build it."""
    src, out = outdir / "hbsend.c", outdir / "hbsend"
    src.write_text(HEARTBEAT_C)
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no gcc on the host to build the guest's heartbeat sender")
    r = subprocess.run([cc, "-static", "-O2", "-o", str(out), str(src)], capture_output=True,
                       text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"gcc -static hbsend.c failed (is libc6-dev there?): {r.stderr[-500:]}")
    return out


def heartbeat_initrd(outdir: Path, guests: Path) -> Path:
    """Debian's busybox initramfs (xen-netfront included) with ``/bin/hbsend``."""
    hb = build_heartbeat_sender(outdir)
    out = outdir / "initrd-hb.img"
    subprocess.run([sys.executable, str(ROOT / "tools" / "mkinitramfs"), "--guests", str(guests),
                    "-o", str(out), "--add", f"{hb}:/bin/hbsend"], check=True, capture_output=True,
                   timeout=180)
    return out


#: The observer on the outside host: records each heartbeat's arrival
#: (seq, guest ns, host monotonic s) -- hbsend's binary datagrams or
#: netecho's text line -- and every ARP frame (``garps``: a
#: gratuitous one has sender IP = target IP) seen on the outside bridge's ports, until a line (or EOF) on
#: stdin; then prints one JSON object.
OBSERVER_PY = r"""
import ctypes, json, select, socket, struct, sys, time
ip, port, ports = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
u.bind((ip, port))
arps = {}
for p in ports:
    # ETH_P_ALL: a bridge port's frames reach only the taps of every protocol
    # (the bridge consumes them before protocol handlers see them)
    # (the bridge consumes them before protocol handlers see them); a classic
    # BPF filter keeps only ARP, so the guest's TCP traffic cannot fill the
    # socket's buffer and crowd the ARP frames out
    a = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    prog = [(0x28, 0, 0, 12), (0x15, 0, 1, 0x0806), (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]
    code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code)
    a.setsockopt(socket.SOL_SOCKET, 26, struct.pack("HL", len(prog), ctypes.addressof(buf)))
    a.bind((p, 3))
    arps[a] = p
print("ready", flush=True)
beats, garps = [], []
while True:
    r, _, _ = select.select([u, sys.stdin, *arps], [], [])
    t = time.monotonic()
    if u in r:
        d = u.recv(256)
        if d.startswith(b"netecho-hb "):  # our guest's: "netecho-hb seq=N t_ns=T wall=..."
            kv = dict(w.split(b"=", 1) for w in d.split()[1:] if b"=" in w)
            beats.append((int(kv[b"seq"]), int(kv[b"t_ns"]), t))
        elif len(d) >= 16:  # hbsend's: two little-endian u64, seq and ns
            seq, gns = struct.unpack("<QQ", d[:16])
            beats.append((seq, gns, t))
    for a in arps:
        if a in r:
            f, addr = a.recvfrom(2048)
            if len(f) >= 42 and f[12:14] == b"\x08\x06" and addr[2] != socket.PACKET_OUTGOING:
                garps.append({"port": arps[a], "t": t, "mac": f[22:28].hex(":"),
                              "ip": socket.inet_ntoa(f[28:32]), "target": socket.inet_ntoa(f[38:42]),
                              "op": struct.unpack(">H", f[20:22])[0]})
    if sys.stdin in r:
        break
json.dump({"beats": beats, "garps": garps}, sys.stdout)
"""

#: A TCP client on the outside host: sends pseudo-random data to an echo
#: server (the guest's busybox ``nc -l -e cat``) a 16 KiB chunk every 5 ms
#: with at most 256 KiB outstanding, reads the echo back, and keeps SHA-256
#: of both; writes "SENT RECEIVED" to a progress file every 0.1 s; on a line
#: (or EOF) on stdin stops sending, half-closes, reads the rest and prints JSON.
TCP_CLIENT_PY = r"""
import hashlib, json, os, random, select, socket, sys, time
ip, port, progress = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = socket.create_connection((ip, port), 30)
c.setblocking(False)
rnd = random.Random(11)
hs, hr = hashlib.sha256(), hashlib.sha256()
sent = recvd = 0
pending = b""
stopping = False
last = t_prog = time.monotonic()
max_stall = 0.0
while True:
    now = time.monotonic()
    if not stopping and not pending and sent - recvd < (256 << 10):
        pending = rnd.randbytes(16384)
    r, w, _ = select.select([c, *([] if stopping else [sys.stdin])], [c] if pending else [], [], 0.005)
    now = time.monotonic()
    if sys.stdin in r:
        sys.stdin.readline()
        stopping = True
        pending = b""
        c.shutdown(socket.SHUT_WR)
    if c in w and pending:
        try:
            k = c.send(pending)
        except BlockingIOError:
            k = 0
        hs.update(pending[:k])
        sent += k
        pending = pending[k:]
    if c in r:
        try:
            d = c.recv(1 << 16)
        except BlockingIOError:
            d = None
        if d == b"":
            break
        if d:
            max_stall = max(max_stall, now - last)
            last = now
            hr.update(d)
            recvd += len(d)
    if now - t_prog > 0.1:
        t_prog = now
        with open(progress + ".tmp", "w") as f:
            f.write(f"{sent} {recvd}")
        os.replace(progress + ".tmp", progress)
json.dump({"sent": sent, "received": recvd, "sha_sent": hs.hexdigest(), "sha_received": hr.hexdigest(),
           "max_stall_s": max_stall}, sys.stdout)
"""


def downtime_from_beats(beats: list[tuple[int, int, float]], period_s: float) -> dict[str, float]:
    """The seed's measure, from a heartbeat's arrivals: the largest gap
    between two arrivals minus the period; with where it was (host time)
    and how many datagrams were lost (sequence numbers missing)."""
    ts = [t for _, _, t in beats]
    if len(ts) < 2:
        return {"downtime_s": float("nan"), "largest_gap_s": float("nan"), "at": float("nan"),
                "lost": 0.0}
    gaps = [(b - a, a) for a, b in zip(ts, ts[1:], strict=False)]
    g, at = max(gaps)
    seqs = [s for s, _, _ in beats]
    lost = (max(seqs) - min(seqs) + 1) - len(set(seqs))
    return {"downtime_s": max(0.0, g - period_s), "largest_gap_s": g, "at": at, "lost": float(lost)}


def boot_net_linux(host: Any, initrd: Path, name: str, mac: str, disk_uri: str | None = None,
                   memory: int = 256) -> tuple[int, Any]:
    """Debian's Linux (examples/linux-net.cfg) with one vif ``mac`` on
    xenbr0 and optionally a disk on ``disk_uri`` (e.g. the outside's NBD
    export), booted to its shell: (domid, the console's Shell)."""
    import re

    from tests.conftest import read_until
    from tests.e2e.test_unmodified_guests import INIT_MARKER, VMLINUZ, Shell
    over = [f'name="{name}"', f'kernel="{VMLINUZ}"', f'ramdisk="{initrd}"',
            f"vif=['mac={mac},bridge=xenbr0']", f"memory={memory}", 'on_crash="destroy"']
    if disk_uri:
        over.append(f"disk=['format=raw,vdev=xvda,access=rw,target={disk_uri}']")
    domid, s = host.create_attached(ROOT / "examples" / "linux-net.cfg", over)
    sh = Shell(s)
    sh.buf = read_until(s, re.escape(INIT_MARKER).encode(), 300)
    sh.wait_prompt(120)
    return domid, sh


def guest_uptime(sh: Any) -> float:
    """Linux's uptime (s) through its console Shell; a kernel message that the
    console interleaves with the output (``[   12.3] ...``) is skipped."""
    import re
    out = sh.run("cat /proc/uptime")
    m = re.search(r"^(\d+\.\d+) \d+\.\d+\r?$", out, re.M)
    assert m, out
    return float(m.group(1))


# --- our own guest on the LAN: netecho (issue 11, item 4) ---------------------------------

NETECHO_CFG = ROOT / "examples" / "netecho.cfg"


def netecho_overrides(name: str, mac: str, ip: str, extra: str = "", memory: int = 32) -> list[str]:
    """examples/netecho.cfg's overrides for a netecho ``name`` at ``ip`` with
    one vif ``mac`` on xenbr0 (the LAN's bridge on each host); ``extra`` is
    more of netecho's options (``hb=``, ``hb_rate=``, ``dirty=``...)."""
    return [f'name="{name}"', f'extra="ip={ip} {extra}"',
            f"vif=['mac={mac},bridge=xenbr0']", f"memory={memory}"]


class Observer:
    """:data:`OBSERVER_PY` on the outside host, listening on ``port`` of
    ``lan_ips[2]`` and watching ARP on both hosts' ports; :meth:`stop` ends it
    and returns what it saw (``beats``: (seq, guest ns, host monotonic s))."""

    def __init__(self, lan: TwoHosts, port: int) -> None:
        self.p: subprocess.Popen[bytes] | None = lan.outside_run(
            [sys.executable, "-c", OBSERVER_PY, lan.lan_ips[2], str(port), lan.lan_port(0),
             lan.lan_port(1)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line.startswith(b"ready"):
            self.kill()
            raise RuntimeError(f"the observer did not start: {line!r}")

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        import json
        p, self.p = self.p, None
        assert p is not None and p.stdin is not None and p.stdout is not None
        try:
            p.stdin.write(b"stop\n")
            p.stdin.close()
        except BrokenPipeError:
            pass
        out = p.stdout.read()
        p.wait(timeout)
        return dict(json.loads(out))

    def kill(self) -> None:
        if self.p is not None:
            self.p.kill()
            self.p.wait(10)
            self.p = None


#: A client on the outside host: ``N`` UDP datagrams to IP:PORT, each waiting
#: up to 1 s for its echo; prints JSON {"sent", "echoed"} (byte-exact echoes).
UDP_PROBE_PY = r"""
import json, os, socket, sys
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
ok = 0
for i in range(n):
    d = b"probe %d " % i + os.urandom(32)
    s.sendto(d, (ip, port))
    try:
        while True:
            got, src = s.recvfrom(2048)
            if got == d and src == (ip, port):
                ok += 1
                break
    except TimeoutError:
        pass
json.dump({"sent": n, "echoed": ok}, sys.stdout)
"""


def outside_udp_echo(lan: TwoHosts, ip: str, port: int = 7, n: int = 5) -> dict[str, int]:
    """UDP echo of ``n`` datagrams from the outside host to ``ip:port``."""
    import json
    p = lan.outside_run([sys.executable, "-c", UDP_PROBE_PY, ip, str(port), str(n)],
                        stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=n * 2 + 30)
    return dict(json.loads(out))


def outside_ping(lan: TwoHosts, ip: str, busybox: Path, n: int = 3) -> str:
    """``busybox ping`` from the outside host (the host may have no ping(8))."""
    p = lan.outside_run([str(busybox), "ping", "-c", str(n), "-W", "5", ip],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=n * 5 + 30)
    return out.decode(errors="replace")
