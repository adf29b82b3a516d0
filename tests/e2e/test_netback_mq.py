"""netback's multi-queue vifs (issue 10: ``multi-queue-max-queues``,
``queue-N/`` keys; io/netif.h "Multiple transmit and receive queues").

Two kinds of test, as tests/e2e/test_netback.py:

* a frontend played by the test (its rings, grants, channels and xenstore
  nodes written as Linux's netfront writes them for Q queues): one queue keeps
  its keys flat, two have them under ``queue-0/`` and ``queue-1/``, each
  queue moves frames on its own rings and TAP queue fd, and a frontend asking
  for 0 or more queues than offered, or missing a queue's key, is refused with
  Xen's ``error`` node and Closing;
* Debian's Linux with ``xen_netfront.max_queues=2``: it connects with two
  queues (``queue-0/``, ``queue-1/`` in xenstore, ``tx-0 tx-1`` in its sysfs),
  pings the host and runs ``iperf3 -P 2``.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_until
from tests.e2e.test_migrate import lan  # noqa: F401 - fixture
from tests.e2e.test_netback import (  # noqa: F401 - fixtures
    HOST_IP,
    NET,
    _diag,
    _frame,
    _guest_up,
    _iperf_json,
    _ns,
    _wait,
    in_netns,
    iperf3,
    net_initrd,
    netns,
    nshost,
    path,
    played_netback,
)
from tests.e2e.test_unmodified_guests import INIT_MARKER, VMLINUZ, Shell

RING_PFN = 420  # queue i: TX ring at RING_PFN + 2i, RX ring at RING_PFN + 2i + 1
DATA_PFN = 500
TAPNAME = "vifM.0"


class MqFront:
    """A netfront with ``nq`` queues, in Python: for each queue its two rings
    (grants 1+2i and 2+2i) and a channel (two when ``split``)."""

    def __init__(self, d: object, xs: object, nq: int, split: tuple[int, ...] = ()) -> None:
        from pyxen.backends import netif as N
        self.N, self.d, self.xs, self.nq = N, d, xs, nq
        d.gnttab.setup(1)  # type: ignore[attr-defined]
        self.ram = d.machine.ram  # type: ignore[attr-defined]
        self.fe = f"/local/domain/{d.domid}/device/vif/0"  # type: ignore[attr-defined]
        self.be = f"/local/domain/0/backend/vif/{d.domid}/0"  # type: ignore[attr-defined]
        self.ports: list[tuple[int, int]] = []
        for i in range(nq):
            for pfn in (RING_PFN + 2 * i, RING_PFN + 2 * i + 1):
                self.ram[pfn * 4096:pfn * 4096 + 4096] = bytes(4096)
                struct.pack_into("<IIII", self.ram, pfn * 4096, 0, 1, 0, 1)  # SHARED_RING_INIT
            self.grant(1 + 2 * i, RING_PFN + 2 * i)
            self.grant(2 + 2 * i, RING_PFN + 2 * i + 1)
            tx = d.evtchn.alloc_unbound(0)  # type: ignore[attr-defined]
            rx = d.evtchn.alloc_unbound(0) if i in split else tx  # type: ignore[attr-defined]
            self.ports.append((tx, rx))
        self.tx_prod = [0] * nq
        self.tx_cons = [0] * nq
        self.rx_prod = [0] * nq
        self.rx_cons = [0] * nq

    def grant(self, ref: int, pfn: int, readonly: bool = False) -> None:
        from pyxen.hv import gnttab as G
        from pyxen.hv import machine as M
        off = self.d.machine.xenheap_offset(M.XH_GRANT) + ref * 8  # type: ignore[attr-defined]
        flags = G.GTF_permit_access | (G.GTF_readonly if readonly else 0)
        struct.pack_into("<HHI", self.ram, off, flags, 0, M.MFN_BASE + pfn)

    def keys(self, num_queues: str | None = None, flat: bool | None = None) -> dict[str, str]:
        """The nodes Linux's netfront writes (talk_to_netback,
        write_queue_xenstore_keys): one queue flat, more under queue-N."""
        flat = self.nq == 1 if flat is None else flat
        out = {"request-rx-copy": "1", "feature-rx-notify": "1", "feature-sg": "1"}
        if num_queues is not None:
            out["multi-queue-num-queues"] = num_queues
        for i, (tx, rx) in enumerate(self.ports):
            base = "" if flat else f"queue-{i}/"
            out[f"{base}tx-ring-ref"] = str(1 + 2 * i)
            out[f"{base}rx-ring-ref"] = str(2 + 2 * i)
            if tx == rx:
                out[f"{base}event-channel"] = str(tx)
            else:
                out[f"{base}event-channel-tx"], out[f"{base}event-channel-rx"] = str(tx), str(rx)
        return out

    def connect(self, keys: dict[str, str], want: str = "4") -> None:
        for k, v in {**keys, "state": "4"}.items():
            self.xs.write(f"{self.fe}/{k}", v)  # type: ignore[attr-defined]
        _wait(lambda: self.xs.read(f"{self.be}/state") == want, f"backend state {want}")  # type: ignore

    def _store(self, pfn: int, value: int) -> None:
        from pyxen.hv import atomic
        atomic.store32(atomic.address_of(self.ram) + pfn * 4096, value)

    def tx(self, q: int, *reqs: bytes) -> None:
        pfn = RING_PFN + 2 * q
        for raw in reqs:
            off = pfn * 4096 + 64 + (self.tx_prod[q] % 256) * 12
            self.ram[off:off + 12] = raw
            self.tx_prod[q] += 1
        self._store(pfn, self.tx_prod[q])
        self.d.evtchn.send(self.ports[q][0])  # type: ignore[attr-defined]

    def post_rx(self, q: int, *bufs: tuple[int, int]) -> None:
        pfn = RING_PFN + 2 * q + 1
        for rid, gref in bufs:
            off = pfn * 4096 + 64 + (self.rx_prod[q] % 256) * 8
            self.ram[off:off + 8] = self.N.RX_REQ.pack(rid, gref)
            self.rx_prod[q] += 1
        self._store(pfn, self.rx_prod[q])
        self.d.evtchn.send(self.ports[q][1])  # type: ignore[attr-defined]

    def responses(self, q: int, rx: bool) -> list[bytes]:
        """The responses the backend published on queue q's ring since the last look."""
        pfn, size = RING_PFN + 2 * q + int(rx), 8 if rx else 12
        cons = (self.rx_cons if rx else self.tx_cons)
        prod = struct.unpack_from("<I", self.ram, pfn * 4096 + 8)[0]
        out = []
        while cons[q] != prod:
            off = pfn * 4096 + 64 + (cons[q] % 256) * size
            out.append(bytes(self.ram[off:off + size]))
            cons[q] += 1
        return out


@pytest.fixture
def mq(guest: Path, in_netns: str,  # noqa: F811
       path: str) -> Iterator[tuple[object, object, object, socket.socket]]:  # noqa: F811
    """:func:`played_netback` offering 4 queues on TAP vifM.0: (domain, xs, netback, wire)."""
    _ns_name[:] = [in_netns]
    with played_netback(guest, "netmq", 32, "00:16:3e:00:00:32", TAPNAME, max_queues=4) as played:
        yield played


_ns_name: list[str] = []


def _tap_queues() -> list[str]:
    """The TAP's attached queues as the host sees them (tun sets real_num_tx_queues;
    read through ``ip netns exec``, which mounts the namespace's own /sys)."""
    r = _ns(_ns_name[-1], "ls", f"/sys/class/net/{TAPNAME}/queues")
    assert r.returncode == 0, r.stderr
    return sorted(q for q in r.stdout.split() if q.startswith("tx-"))


def _send_tx(front: MqFront, q: int, fill: int) -> bytes:
    """One 200-byte frame sent on queue q's TX ring (from page DATA_PFN + q, grant 50 + q)."""
    N = front.N
    frame = _frame(200, fill=fill)
    base = (DATA_PFN + q) * 4096
    front.ram[base:base + 200] = frame
    front.grant(50 + q, DATA_PFN + q, readonly=True)
    front.tx(q, N.TxRequest(50 + q, 0, 0, 100 + q, 200).pack())
    return frame


def _tx_rsps(front: MqFront, q: int, want: int) -> list[tuple[int, int]]:
    """(id, status) of the next ``want`` TX responses on queue q."""
    got: list[bytes] = []

    def enough() -> bool:
        got.extend(front.responses(q, rx=False))
        return len(got) >= want
    _wait(enough, f"{want} TX responses on queue {q}")
    return [front.N.TX_RSP.unpack(r[:4]) for r in got]


def _recv_fill(wire: socket.socket, fills: set[int]) -> set[int]:
    """Frames of _send_tx seen on the wire, by their fill byte."""
    got: set[int] = set()
    end = time.monotonic() + 5
    while got != fills and time.monotonic() < end:
        f = wire.recv(70000)
        if len(f) == 200 and f[12:14] == b"\x88\xb5":
            got.add(f[14])
    return got


def test_mq_advertised_and_one_queue_stays_flat(mq) -> None:  # noqa: ANN001
    """multi-queue-max-queues is what the vif offers; a frontend that takes 1
    (multi-queue-num-queues=1) keeps its keys flat, as Linux's netfront."""
    from pyxen.backends import netif as N
    d, xs, nb, wire = mq
    assert xs.read("/local/domain/0/backend/vif/32/0/multi-queue-max-queues") == "4"
    front = MqFront(d, xs, 1)
    front.connect(front.keys(num_queues="1"))
    assert nb.queues == [] and nb.stats["queues"] == 1
    assert _tap_queues() == ["tx-0"]
    _send_tx(front, 0, 7)
    assert _tx_rsps(front, 0, 1) == [(100, N.RSP_OKAY)]
    assert _recv_fill(wire, {7}) == {7}
    assert nb.stats["tx_packets"] == 1


def test_mq_two_queues_under_queue_n(mq, path: str) -> None:  # noqa: ANN001, F811
    """Q=2: keys under queue-0/ and queue-1/ (queue 1 with split channels);
    each queue has its rings, a TAP queue fd (the TAP shows tx-0 and tx-1),
    its own counters, and its own credit when rate= is set; frames sent on
    either queue reach the host, and the host's flows come in on both."""
    from pyxen.backends import netif as N
    d, xs, nb, wire = mq
    if path == "python":  # a high rate= (a rate-limited vif runs the Python path): each queue its own credit
        xs.write("/local/domain/0/backend/vif/32/0/rate", "100000000,50000")
    front = MqFront(d, xs, 2, split=(1,))
    front.connect(front.keys(num_queues="2"))
    assert len(nb.queues) == 1 and nb.stats["queues"] == 2
    q1 = nb.queues[0]
    assert (q1.tx_port, q1.rx_port) == front.ports[1] and q1.tx_port != q1.rx_port
    if path == "python":
        assert nb.credit is not None and q1.credit is not None and nb.credit is not q1.credit
    assert [nb.dev is not None, q1.dev is not None] == [path == "native"] * 2
    _wait(lambda: _tap_queues() == ["tx-0", "tx-1"], "the TAP's second queue")
    for q in (0, 1):
        _send_tx(front, q, 10 + q)
    for q in (0, 1):
        assert _tx_rsps(front, q, 1) == [(100 + q, N.RSP_OKAY)]
    assert _recv_fill(wire, {10, 11}) == {10, 11}
    assert [s["tx_packets"] for s in nb.queue_stats] == [1, 1]
    assert nb.stats["tx_packets"] == 2
    # RX: 32 UDP flows from the host; tun spreads them over its queues by flow hash
    nbuf = 40
    for q in (0, 1):
        bufs = []
        for j in range(nbuf):
            ref = 100 + q * nbuf + j
            front.grant(ref, DATA_PFN + 10 + q * nbuf + j)
            bufs.append((j, ref))
        front.post_rx(q, *bufs)
    for port in range(32):
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + 18, 0, 0x4000, 64, 17, 0, bytes([10, 9, 0, 1]),
                         bytes([10, 9, 0, 2]))
        udp = struct.pack("!HHHH", 40000 + port, 7, 8 + 18, 0) + b"m" * 18
        wire.send(b"\x00\x16\x3e\x00\x00\x32" + b"\xfe\xff\xff\xff\xff\xff" + b"\x08\x00" + ip + udp)
    got = [0, 0]

    def all_in() -> bool:
        for q in (0, 1):
            got[q] += len(front.responses(q, rx=True))
        return sum(got) >= 32
    _wait(all_in, "32 frames in the RX rings")
    assert got[0] > 0 and got[1] > 0, got  # 32 flows all hashed to one queue: a 2^-31 chance
    rxs = [s["rx_packets"] for s in nb.queue_stats]
    assert rxs == got, (rxs, got)


@pytest.mark.parametrize("bad", ["zero", "over-max", "not-a-number", "missing-key", "flat-keys"])
def test_mq_bad_queue_requests_are_refused(mq, bad: str) -> None:  # noqa: ANN001
    """0 queues, more than offered, a queue without its rx-ring-ref, or two
    queues with flat keys: Xen's error node and Closing, nothing mapped."""
    d, xs, nb, wire = mq
    front = MqFront(d, xs, 2)
    keys = front.keys(num_queues="2")
    if bad == "zero":
        keys["multi-queue-num-queues"] = "0"
    elif bad == "over-max":
        keys["multi-queue-num-queues"] = "5"
    elif bad == "not-a-number":
        keys["multi-queue-num-queues"] = "two"
    elif bad == "missing-key":
        del keys["queue-1/rx-ring-ref"]
    else:
        keys = front.keys(num_queues="2", flat=True)
    front.connect(keys, want="5")
    err = xs.read("/local/domain/0/backend/vif/32/0/error")
    want = {"zero": "guest requested 0 queues, but valid range is 1 - 4.",
            "over-max": "guest requested 5 queues, but valid range is 1 - 4.",
            "not-a-number": "not a number",
            "missing-key": "queue-1/rx-ring-ref is missing",
            "flat-keys": "queue-0/tx-ring-ref is missing"}[bad]
    assert want in err, err
    assert nb.tx is None and nb.queues == []
    assert _tap_queues() == ["tx-0"]


def test_mq_a_bad_queue_disconnects_the_vif_and_it_reconnects(mq, path: str) -> None:  # noqa: ANN001, F811
    """A protocol error on queue 1 disconnects the whole vif (Linux's
    xenvif_fatal_tx_err); the frontend starts over with 2 queues, then 1."""
    from pyxen.backends import netif as N
    d, xs, nb, wire = mq
    be = "/local/domain/0/backend/vif/32/0"
    front = MqFront(d, xs, 2)
    front.connect(front.keys(num_queues="2"))
    front.grant(60, DATA_PFN, readonly=True)
    front.tx(1, N.TxRequest(60, 4000, 0, 1, 200).pack())  # crosses its page: fatal
    _wait(lambda: xs.read(f"{be}/state") == "5", "backend Closing")
    assert "queue 1" in xs.read(f"{be}/error")
    assert nb.tx is None and nb.queues == []
    _wait(lambda: _tap_queues() == ["tx-0"], "the second TAP queue detached")
    for again in (2, 1):  # Closed, Initialising: netback goes InitWait; then the new keys
        xs.write(f"{front.fe}/state", "6")
        _wait(lambda: xs.read(f"{be}/state") == "6", "backend Closed")
        xs.rm(front.fe + "/queue-0")
        xs.rm(front.fe + "/queue-1")
        xs.write(f"{front.fe}/state", "1")
        _wait(lambda: xs.read(f"{be}/state") == "2", "backend InitWait")
        front = MqFront(d, xs, again)
        front.connect(front.keys(num_queues=str(again)))
        assert nb.stats["queues"] == again
        assert [x.dev is not None for x in [nb, *nb.queues]] == [path == "native"] * again
        _wait(lambda again=again: len(_tap_queues()) == again, f"{again} TAP queues")
        for q in range(again):
            _send_tx(front, q, 20 + q)
        assert _recv_fill(wire, {20 + q for q in range(again)}) == {20 + q for q in range(again)}
        assert xs.read(f"{be}/state") == "4"


# --- Debian's Linux, with xen_netfront.max_queues=2 -------------------------------------------------
@pytest.fixture
def two_queues_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    """netback offers at least 2 queues whatever this host's CPU count (pyxend
    and its domain processes inherit the environment); the guest's
    max_queues=2 then decides (netfront takes min(max_queues, the offer))."""
    monkeypatch.setenv("PYXEN_NET_MAX_QUEUES", "4")


def _boot_mq(host: object, initrd: Path, name: str = "netmq", mac: str = "",
             memory: int = 384) -> tuple[int, Shell]:
    """Debian's kernel with ``xen_netfront.max_queues=2`` on its command line
    (one vCPU), booted to its shell with its vif's 2 queues up.  The test
    initramfs's init passes the command line's ``xen_netfront.*`` words to
    busybox's insmod (tools/mkinitramfs), so the module comes up with
    max_queues=2 and netfront's first handshake takes 2 queues."""
    vif = f"vif=['mac={mac},bridge=xenbr0']" if mac else "vif=['bridge=xenbr0']"
    domid, s = host.create_attached(ROOT / "examples" / "linux-net.cfg", [  # type: ignore[attr-defined]
        f'name="{name}"', f'kernel="{VMLINUZ}"', f'ramdisk="{initrd}"', vif,
        f"memory={memory}", 'on_crash="destroy"', 'extra="console=hvc0 panic=-1 xen_netfront.max_queues=2"'])
    sh = Shell(s)
    sh.buf = read_until(s, re.escape(INIT_MARKER).encode(), 300)
    assert "pyxen-initramfs: xen-netfront: max_queues=2" in sh.buf.decode(errors="replace"), sh.buf[-2000:]
    sh.wait_prompt(120)
    assert "xen_netfront.max_queues=2" in sh.run("cat /proc/cmdline")
    # right from boot: the module's parameter, and the 2 queues once the vif connects
    p = "/sys/module/xen_netfront/parameters/max_queues"
    assert sh.run(f"cat {p}").split()[-1:] == ["2"], "insmod did not get the command line's max_queues"
    sh.run("for i in $(seq 1 150); do ls /sys/class/net/eth0/queues/tx-1 >/dev/null 2>&1 && break; "
           "sleep 0.2; done", timeout=60)
    return domid, sh


def test_linux_netfront_two_queues(two_queues_offered: None, nshost: object, netns: str,  # noqa: F811
                                   net_initrd: Path, iperf3: str) -> None:  # noqa: F811
    """Linux's netfront with max_queues=2 connects with 2 queues (queue-0/ and
    queue-1/ in xenstore, tx-0 tx-1 in the guest and on the TAP), pings the
    host, and iperf3 -P 2 moves data both ways (no speed asserted)."""
    from pyxen.xenstore.client import XsClient
    domid, sh = _boot_mq(nshost, net_initrd)
    queues = sh.run("ls /sys/class/net/eth0/queues")
    assert "tx-0" in queues and "tx-1" in queues and "tx-2" not in queues, queues
    fe = f"/local/domain/{domid}/device/vif/0"
    xs = XsClient(str(nshost.info()["xenstore_socket"]))  # type: ignore[attr-defined]
    try:
        assert xs.read(f"/local/domain/0/backend/vif/{domid}/0/multi-queue-max-queues") == "4"
        assert xs.read(f"{fe}/multi-queue-num-queues") == "2"
        for q in (0, 1):
            for k in ("tx-ring-ref", "rx-ring-ref"):
                assert xs.try_read(f"{fe}/queue-{q}/{k}"), (q, k)
    finally:
        xs.close()
    [listed] = nshost.network_list(domid)  # type: ignore[attr-defined]
    assert listed["stats"]["queues"] == 2, listed
    assert "tx-1" in _ns(netns, "ls", f"/sys/class/net/vif{domid}.0/queues").stdout
    _ns(netns, "ip", "addr", "add", f"{HOST_IP}/24", "dev", "xenbr0")
    _ns(netns, "ip", "link", "set", "xenbr0", "up")
    _guest_up(sh, f"{NET}.41")
    out = sh.run(f"ping -c 3 -W 5 {HOST_IP}", timeout=60)
    assert re.search(r"3 packets transmitted, [123] packets received", out), _diag(nshost, netns, sh, out)
    sh.run("iperf3 -s -D")
    for name, extra in (("host -> guest", []), ("guest -> host (-R)", ["-R"])):
        for _ in range(50):  # the daemon may not listen yet
            r = _ns(netns, iperf3, "-c", f"{NET}.41", "-t", "3", "-P", "2", "--connect-timeout", "5000", "-J",
                    *extra, timeout=120)
            # not listening yet, or still closing the previous test (iperf3's "busy")
            if "Connection refused" not in r.stdout and "server is busy" not in r.stdout:
                break
            time.sleep(0.2)
        rep = _iperf_json(r)
        assert len(rep["end"]["streams"]) == 2, rep["end"]["streams"]
        print(f"iperf3 -P 2 {name}: {rep['end']['sum_received']['bits_per_second'] / 1e6:.0f} Mbit/s")
    [listed] = nshost.network_list(domid)  # type: ignore[attr-defined]
    st = listed["stats"]
    print(f"vif counters: {st}")
    assert st["tx_errors"] == st["rx_errors"] == 0 and st["queues"] == 2, st
    bad = [ln for ln in nshost.dmesg()  # type: ignore[attr-defined]
           if "netback" in ln and ("protocol error" in ln or "Traceback" in ln)]
    assert not bad, bad


def test_linux_two_queues_survive_save_restore(two_queues_offered: None, nshost: object,  # noqa: F811
                                               netns: str, net_initrd: Path, tmp_path: Path) -> None:  # noqa: F811
    """A vif with 2 queues through ``save`` and ``restore``: the restored
    domain's netback advertises again, Linux's netfront reconnects on resume
    with its 2 queues, and the guest pings the host again."""
    from tests.e2e.test_unmodified_guests import Shell as _Shell
    domid, sh = _boot_mq(nshost, net_initrd)
    _ns(netns, "ip", "addr", "add", f"{HOST_IP}/24", "dev", "xenbr0")
    _ns(netns, "ip", "link", "set", "xenbr0", "up")
    try:
        _guest_up(sh, f"{NET}.42")
        out = sh.run(f"ping -c 2 -W 5 {HOST_IP}", timeout=60)
        assert re.search(r"2 packets transmitted, [12] packets received", out), out
        [listed] = nshost.network_list(domid)  # type: ignore[attr-defined]
        assert listed["stats"]["queues"] == 2, listed
        f = tmp_path / "mq.save"
        nshost.save(domid, f, timeout=60)  # type: ignore[attr-defined]
    finally:
        sh.s.close()
    info = nshost.restore(f)  # type: ignore[attr-defined]
    dom = int(info["domid"])
    s = nshost.console_socket(dom)  # type: ignore[attr-defined]
    try:
        sh = _Shell(s)
        sh.s.sendall(b"\n")
        sh.wait_prompt(120)
        end = time.monotonic() + 60
        while True:
            vifs = nshost.network_list(dom)  # type: ignore[attr-defined]
            if vifs and vifs[0]["state"] == 4 and vifs[0]["stats"]["queues"] == 2:
                break
            assert time.monotonic() < end, vifs
            time.sleep(0.2)
        out = sh.run(f"ping -c 3 -W 5 {HOST_IP}", timeout=60)
        assert re.search(r"3 packets transmitted, [123] packets received", out), \
            _diag(nshost, netns, sh, out)
        queues = sh.run("ls /sys/class/net/eth0/queues")
        assert "tx-1" in queues, queues
    finally:
        s.close()
    nshost.destroy(dom)  # type: ignore[attr-defined]


def test_linux_two_queues_follow_a_live_migration(two_queues_offered: None, lan: object,  # noqa: F811
                                                  net_initrd: Path) -> None:  # noqa: F811
    """A Linux guest whose vif has 2 queues, live-migrated from host a to
    host b (tests/e2e/test_migrate.py's hosts on one LAN): b's netback
    advertises at start, the guest's netfront reconnects on resume with its 2
    queues, and the guest reaches the outside host again from b."""
    from tests.e2e.test_migrate import _port, running, wait_for
    a, b = lan.a, lan.b  # type: ignore[attr-defined]
    domid, sh = _boot_mq(a, net_initrd, "mqmig", "00:16:3e:4d:11:0a", memory=256)
    try:
        sh.run(f"ip addr add {lan.guest_ip}/24 dev eth0; ip link set eth0 up")  # type: ignore[attr-defined]
        out = sh.run(f"ping -c 2 -W 5 {lan.lan_ips[2]}", 60)  # type: ignore[attr-defined]
        assert re.search(r"[12] packets received", out), out
        assert a.network_list(domid)[0]["stats"]["queues"] == 2
    finally:
        sh.s.close()
    port = next(_port)
    rx = lan.receiver(port)  # type: ignore[attr-defined]
    a.migrate(domid, tcp=f"{lan.ips[1]}:{port}", timeout=60)  # type: ignore[attr-defined]
    assert rx.wait(60) == 0
    [d] = wait_for(lambda: running(b, "mqmig"), what="the guest on b")
    wait_for(lambda: [v for v in b.network_list(d["domid"]) if v["state"] == 4 and v["stats"]["queues"] == 2],
             60, "b's vif connected with 2 queues")
    s = b.console_socket(d["domid"])
    try:
        sh = Shell(s)
        sh.s.sendall(b"\n")
        sh.wait_prompt(60)
        out = sh.run(f"ping -c 3 -W 5 {lan.lan_ips[2]}", 60)  # type: ignore[attr-defined]
        assert re.search(r"3 packets transmitted, [123] packets received", out), out
        assert "tx-1" in sh.run("ls /sys/class/net/eth0/queues")
    finally:
        s.close()
    b.destroy(d["domid"])


def test_mq_hot_unplug_with_two_queues(mq) -> None:  # noqa: ANN001
    """network-detach of a vif connected with 2 queues: both queues off their
    rings, queue 1's thread ended and its TAP fd closed, the TAP gone."""
    import threading
    d, xs, nb, wire = mq
    front = MqFront(d, xs, 2)
    front.connect(front.keys(num_queues="2"))
    q1 = nb.queues[0]
    assert q1.thread is not None and q1.thread.is_alive()
    nb.detach(timeout=0.2)  # the played frontend does not close: netback goes on after the wait
    nb.close = lambda: None  # detach closed it: the fixture must not close its fds again
    assert nb.tx is None and q1.tx is None and nb.queues == [] and nb.stats["queues"] == 0
    assert not q1.thread.is_alive() and q1.tap == -1 and q1.up_fd == -1
    assert not [t for t in threading.enumerate() if t.name.startswith("netback-0-q")]
    assert _ns(_ns_name[-1], "ls", f"/sys/class/net/{TAPNAME}").returncode != 0  # the TAP is gone
