"""Route and NAT vifs end to end (issue 10: xl's ``script=vif-route`` and
``script=vif-nat``, done by pyxen itself when Xen's scripts are not installed).

Two network namespaces the test creates and deletes: the "host" one, where
pyxend runs (so its domain processes make their TAPs and routes there), and
a "peer" behind it, joined by a veth pair (``up0`` 10.99.0.1/24 on the host,
``peer0`` 10.99.0.2/24 in the peer; the host's default route goes to the
peer, so ``up0`` is the default ``gatewaydev``).  Debian's Linux with its own
xen-netfront is the guest (``guests/initrd-net.img``).

* route: the guest's ``ip=`` address is routed to its vif, which carries the
  host's ``up0`` address; the guest pings the host and the host the guest,
  and the guest reaches the peer (which routes the guest's network back to
  the host) through the host's forwarding;
* nat: the guest has vif-nat's address ``10.0.D.1``, the peer has no route
  to it at all: the guest's ping and an HTTP request reach the peer only
  because the host masquerades them, and the peer sees the host's address;
* after the domain is destroyed (or the vif detached) no route, no address
  and no nftables table of ours is left.

Skips loudly without KVM, the fetched guests, root, ``ip`` or pyroute2.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.test_netback import _boot, _diag, _ns, _run, netns, nshost  # noqa: F401
from tests.e2e.test_unmodified_guests import GUESTS, VMLINUZ, Shell, need

HOST_UP, PEER = "10.99.0.1", "10.99.0.2"
BUSYBOX = GUESTS / "busybox" / "bin" / "busybox"


@pytest.fixture
def initrd_net() -> Path:
    p = GUESTS / "initrd-net.img"
    need(VMLINUZ, p)
    return p


@pytest.fixture
def peer(netns: str) -> Iterator[str]:  # noqa: F811
    """The namespace behind the host: a veth pair, the host's default route through it."""
    name = f"pyxpeer{os.getpid()}"
    _run("ip", "netns", "add", name)
    try:
        for cmd in (["ip", "-n", netns, "link", "add", "up0", "type", "veth", "peer", "name", "peer0",
                     "netns", name],
                    ["ip", "-n", netns, "addr", "add", f"{HOST_UP}/24", "dev", "up0"],
                    ["ip", "-n", netns, "link", "set", "up0", "up"],
                    ["ip", "-n", netns, "route", "add", "default", "via", PEER],
                    ["ip", "-n", name, "link", "set", "lo", "up"],
                    ["ip", "-n", name, "addr", "add", f"{PEER}/24", "dev", "peer0"],
                    ["ip", "-n", name, "link", "set", "peer0", "up"]):
            _run(*cmd)
        yield name
    finally:
        _run("ip", "netns", "del", name, check=False)


def _routes(ns: str) -> str:
    return _ns(ns, "ip", "-4", "route", "show", "table", "all").stdout


def _nft_tables(ns: str) -> list[str]:
    """pyxen's own view (pyroute2's nfnetlink; the host may have no ``nft``)."""
    r = _ns(ns, sys.executable, "-c", "from pyxen.backends.vifmode import nft_tables; print(nft_tables())")
    assert r.returncode == 0, r.stderr
    return eval(r.stdout)  # noqa: S307 (a list of names printed by the line above)


def _settled(ns: str, domid: int, *gone: str) -> str:
    """The host's routes once the domain's process has finished its teardown
    (destroy answers first, then the process closes its vifs): a bounded wait
    for its TAPs and the strings ``gone`` to leave the links and routes."""
    vif = f"vif{domid}."
    for _ in range(300):
        out = _routes(ns)
        if vif not in _ns(ns, "ip", "-o", "link").stdout and not any(g in out for g in gone) \
                and not re.search(r"dev if\d+ ", out):  # (a TAP being unregistered)
            break
        time.sleep(0.1)
    return out


def _in_echos(ns: str) -> int:
    """ICMP echo requests the namespace has received (/proc/net/snmp's Icmp InEchos)."""
    snmp = _ns(ns, "cat", "/proc/net/snmp").stdout
    lines = [ln.split() for ln in snmp.splitlines() if ln.startswith("Icmp:")]
    return int(lines[1][lines[0].index("InEchos")])


def _ping(sh: Shell, addr: str) -> str:
    return sh.run(f"ping -c 3 -W 5 {addr}", timeout=60)


PINGED = r"3 packets transmitted, [123] packets received"

# a web server for the peer: answers each GET with the address the request came from
PEER_HTTP = textwrap.dedent("""
    import http.server
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("seen-from-" + self.client_address[0] + "\\n").encode()
            print(self.client_address[0], flush=True)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    srv = http.server.HTTPServer(("0.0.0.0", 7777), H)
    print("ready", flush=True)
    srv.serve_forever()
""")


def test_route_mode(nshost: object, netns: str, peer: str, initrd_net: Path) -> None:  # noqa: F811
    guest_ip = "10.33.0.2"
    domid, sh = _boot(nshost, initrd_net, "vroute", [f"script=vif-route,ip={guest_ip}"])
    vif = f"vif{domid}.0"
    # no bridge; the vif has the gateway's address as a /32, the guest's address routed to it
    link = _ns(netns, "ip", "-o", "link", "show", vif).stdout
    assert "master" not in link and ",UP" in link, link
    assert f"inet {HOST_UP}/32" in _ns(netns, "ip", "-o", "-4", "addr", "show", vif).stdout
    assert re.search(rf"^{guest_ip} dev {re.escape(vif)} .*src {HOST_UP} metric 2", _routes(netns), re.M), \
        _routes(netns)
    assert _ns(netns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    assert _ns(netns, "cat", f"/proc/sys/net/ipv4/conf/{vif}/proxy_arp").stdout.strip() == "1"
    assert _ns(netns, "cat", f"/proc/sys/net/ipv4/conf/{vif}/rp_filter").stdout.strip() == "1"
    [listed] = nshost.network_list(domid)  # type: ignore[attr-defined]
    assert listed["bridge"] == "" and listed["vifname"] == vif, listed
    # the guest: its address, the gateway on the link, the default route through it
    sh.run(f"ip addr add {guest_ip}/32 dev eth0; ip link set eth0 up; ip route add {HOST_UP} dev eth0; "
           f"ip route add default via {HOST_UP}")
    out = _ping(sh, HOST_UP)
    assert re.search(PINGED, out), _diag(nshost, netns, sh, out)
    p = _ns(netns, str(BUSYBOX), "ping", "-c", "3", "-W", "5", guest_ip)
    assert p.returncode == 0, p.stdout + p.stderr
    # beyond the host: the peer routes the guest's network back through the host
    _run("ip", "-n", peer, "route", "add", "10.33.0.0/24", "via", HOST_UP)
    out = _ping(sh, PEER)
    assert re.search(PINGED, out), _diag(nshost, netns, sh, out)
    # a source address not routed to the vif is not forwarded (strict rp_filter on the vif),
    # although the peer would answer it (it routes all of 10.33.0.0/24 to the host)
    echos = _in_echos(peer)
    sh.run("ip addr add 10.33.0.77/32 dev eth0")
    out = sh.run(f"ping -c 3 -W 2 -I 10.33.0.77 {PEER}", timeout=60)
    assert "3 packets transmitted, 0 packets received" in out, out
    assert _in_echos(peer) == echos  # never reached the peer
    out = _ping(sh, PEER)  # (and the counter does count)
    assert re.search(PINGED, out) and _in_echos(peer) >= echos + 1, out
    # a hot-plugged second vif in route mode, then detached: its route goes with it
    from pyxen.toolstack.api import vif_to_dict
    from pyxen.toolstack.xlcfg import parse_vif_spec
    nshost.network_attach(domid, vif_to_dict(  # type: ignore[attr-defined]
        parse_vif_spec("script=vif-route,ip=10.34.0.0/24")[0], 1))
    assert re.search(rf"^10\.34\.0\.0/24 dev vif{domid}\.1 ", _routes(netns), re.M), _routes(netns)
    nshost.network_detach(domid, 1)  # type: ignore[attr-defined]
    assert "10.34.0.0" not in _routes(netns)
    nshost.destroy(domid)  # type: ignore[attr-defined]
    left = _settled(netns, domid, guest_ip)
    assert guest_ip not in left and vif not in left, left
    assert vif not in _ns(netns, "ip", "-o", "link").stdout


def test_nat_mode(nshost: object, netns: str, peer: str, initrd_net: Path) -> None:  # noqa: F811
    domid, sh = _boot(nshost, initrd_net, "vnat", ["script=vif-nat,gatewaydev=up0"])
    vif = f"vif{domid}.0"
    guest_ip, router = f"10.{domid >> 8}.{domid & 0xFF}.1", f"10.{domid >> 8}.{domid & 0xFF}.128"
    assert f"inet {router}/32" in _ns(netns, "ip", "-o", "-4", "addr", "show", vif).stdout
    assert re.search(rf"^{guest_ip} dev {re.escape(vif)} .*src {router}", _routes(netns), re.M), \
        _routes(netns)
    assert f"pyxen-{vif}" in _nft_tables(netns)
    # the peer has no route to 10.0.0.0/8: only the host's masquerade brings answers back
    assert "10.0." not in _routes(peer)
    sh.run(f"ip addr add {guest_ip}/32 dev eth0; ip link set eth0 up; ip route add {router} dev eth0; "
           f"ip route add default via {router}")
    out = _ping(sh, router)
    assert re.search(PINGED, out), _diag(nshost, netns, sh, out)
    out = _ping(sh, PEER)
    assert re.search(PINGED, out), _diag(nshost, netns, sh, out)
    srv = subprocess.Popen(["ip", "netns", "exec", peer, sys.executable, "-c", PEER_HTTP],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        # (no -T: Debian 12's busybox-static wget segfaults with it, on the host too)
        out = sh.run(f"for i in 1 2 3; do wget -q -O /tmp/seen http://{PEER}:7777/ && break; done; "
                     "cat /tmp/seen", timeout=60)
        assert f"seen-from-{HOST_UP}" in out, _diag(nshost, netns, sh, out)
    finally:
        srv.kill()
        srv.wait(10)
    seen = srv.stdout.read() if srv.stdout else ""
    assert HOST_UP in seen and guest_ip not in seen, seen
    nshost.destroy(domid)  # type: ignore[attr-defined]
    left = _settled(netns, domid, guest_ip)
    assert guest_ip not in left and vif not in left, left
    assert not [t for t in _nft_tables(netns) if t.startswith("pyxen-")]


def test_route_without_ip_is_refused_at_load(tmp_path: Path) -> None:
    """(No KVM needed.)  The config names the file, the line and the field."""
    from pyxen.toolstack.xlcfg import ConfigError, load_domain_config
    cfg = tmp_path / "r.cfg"
    cfg.write_text((ROOT / "examples" / "linux-net.cfg").read_text()
                   .replace("vif     = [ 'bridge=xenbr0' ]", "vif     = [ 'script=vif-route' ]"))
    with pytest.raises(ConfigError) as e:
        load_domain_config(cfg, ['kernel="/bin/true"', 'ramdisk="/bin/true"'])
    want = rf"{re.escape(str(cfg))}:\d+: vif: 'script=vif-route': ip: route mode"
    assert re.match(want, str(e.value)), e.value


def test_netecho_routed_and_natted(nshost: object, netns: str, peer: str) -> None:  # noqa: F811
    """Our own guest kernel, which has no routing of its own: it ARPs for
    every address, and the vif's proxy_arp answers for what lies beyond the
    host.  A routed netecho pings the peer and the peer's UDP reaches it; a
    NATed one pings the peer, which has no route back to it."""
    from tests.conftest import read_until
    if not (ROOT / "guest" / "build" / "netecho").exists():
        pytest.fail("guest/build/netecho was not built")
    _run("ip", "-n", peer, "route", "add", "10.33.0.0/24", "via", HOST_UP)

    def start(name: str, vif: str, extra: str) -> tuple[int, str]:
        domid, s = nshost.create_attached(ROOT / "examples" / "netecho.cfg", [  # type: ignore[attr-defined]
            f'name="{name}"', f'extra="{extra}"', f"vif=['{vif}']"])
        out = read_until(s, rb"netecho: ping 10\.99\.0\.2: \d+ sent, \d+ answered", 120)
        s.close()
        return domid, out.decode(errors="replace")

    _d1, out = start("ne-route", "script=vif-route,ip=10.33.0.3", f"ip=10.33.0.3 ping={PEER} ping_count=3")
    assert re.search(r"ping 10\.99\.0\.2: 3 sent, [123] answered", out), out
    p = _ns(netns, str(BUSYBOX), "ping", "-c", "3", "-W", "5", "10.33.0.3")
    assert p.returncode == 0, p.stdout + p.stderr
    echo = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); "
            "[s.sendto(b'via-route', ('10.33.0.3', 7)) for _ in range(3)]; print(s.recvfrom(64)[0].decode())")
    r = _ns(peer, sys.executable, "-c", echo)
    assert r.stdout.strip() == "via-route", r.stdout + r.stderr
    _d2, out = start("ne-nat", "script=vif-nat,ip=192.168.50.2",
                     f"ip=192.168.50.2 ping={PEER} ping_count=3")
    assert re.search(r"ping 10\.99\.0\.2: 3 sent, [123] answered", out), out
    assert "192.168." not in _routes(peer)


def test_killed_domain_leaves_no_nat_table(nshost: object, netns: str, peer: str) -> None:  # noqa: F811
    """A NAT vif's masquerade table is the vif's own; a domain process
    killed with SIGKILL cannot undo it, so the daemon removes it when the
    process's connection closes (the TAP, its routes and proxy_arp go with
    the process)."""
    import os
    import signal
    if not (ROOT / "guest" / "build" / "netecho").exists():
        pytest.fail("guest/build/netecho was not built")
    domid, s = nshost.create_attached(ROOT / "examples" / "netecho.cfg", [  # type: ignore[attr-defined]
        'name="ne-killed"', 'extra="ip=192.168.50.2"', "vif=['script=vif-nat,ip=192.168.50.2']"])
    s.close()
    vif = f"vif{domid}.0"
    assert f"pyxen-{vif}" in _nft_tables(netns)
    pid = [int(d["pid"]) for d in nshost.list() if d["domid"] == domid][0]  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if f"pyxen-{vif}" not in _nft_tables(netns):
            break
        time.sleep(0.1)
    assert f"pyxen-{vif}" not in _nft_tables(netns)
    assert not any(d["domid"] == domid for d in nshost.list())  # type: ignore[attr-defined]

