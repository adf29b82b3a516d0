"""netback: the host side of a virtual network interface (xen-netback's job).

One :class:`NetBack` per vif, living in the domain's own process (as
blkback), so it reaches the guest's granted pages directly.  Its host end is
a TAP device (``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``) named ``vifD.N`` as
Xen's, attached to a Linux bridge (bridge mode: the bridge is created when
missing, everything is brought up, through netlink with ``pyroute2``; at a
migration's commitment the prepared TAP is brought up by one ioctl).  The
TAP's ``virtio_net_hdr`` carries checksum and GSO state both ways, so a
64 KiB TCP segment crosses as one frame and nothing is segmented or
checksummed in software.

Protocol (io/netif.h, see :mod:`.netif`): the XenbusState handshake (the
toolstack writes both directories in Initialising; we advertise our
features and go InitWait; the frontend writes ``tx-ring-ref``,
``rx-ring-ref``, ``event-channel`` or ``event-channel-tx``/``-rx`` (split),
``request-rx-copy``, its features, and goes Connected -- Linux's netfront
skips Initialised; we map both rings and go Connected).  Multi-queue:
we offer ``multi-queue-max-queues`` = min(8, host CPUs); a frontend that
takes one queue keeps its keys flat, one that takes Q > 1 has each queue's
under ``queue-N/``; each queue has its own rings, channels, TAP queue fd
(the TAP is ``IFF_MULTI_QUEUE``), service thread, counters and credit
(:class:`_Queue`); 0 or more queues than offered is refused.

Data path (one service thread per queue, all per-packet work in
:meth:`NetBack._tx_packet` and :meth:`NetBack._rx_frame`, every guest page
touched through :class:`GrantCopier` so that a native batch copy can replace
it): TX takes each packet's slot chain off the ring (Linux netback's checks:
:func:`netif.parse_tx`), copies the granted bytes out and writes the frame to
the TAP; RX reads a frame from the TAP when the frontend has posted enough
buffers and copies it into them (``feature-rx-copy``, the only mode Linux's
netfront speaks).  Responses are batched with event suppression on both
rings; when the frontend is short of RX buffers we set ``req_event`` to what
the next frame needs and stop reading the TAP until it posts them.

A frontend that breaks the protocol (an index running ahead, a slot chain
of 21+ follow-on slots, a slot crossing its page, a bad extra) is
disconnected (Linux's ``xenvif_fatal_tx_err``); a packet with too many slots
or bad sizes is answered ``XEN_NETIF_RSP_ERROR``; a bad grant fails its
slot.  Nothing a frontend does raises out of here.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import select
import socket
import struct
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import native
from ..abi import XenError
from ..hv import gnttab
from ..xenstore.client import XsClient, XsError
from . import netif as N
from . import vifmode

if TYPE_CHECKING:
    from ..hv.domain import Domain

BACKEND_DOMID = 0
#: packets taken from each side per round before looking at the other side
BUDGET = 64
#: without feature-rx-notify the frontend never tells us it posted RX buffers: poll
RX_POLL_S = 0.01
#: the C service loop (pxn_serve) gives the thread back to Python this often (ms)
SERVE_MS = 20
#: RX interrupt coalescing in the C loop: hold an owed RX event this long (µs) while
#: frames keep coming (at most 8 frames; never when the ring is out of buffers); 0: off
RX_COALESCE_US = int(os.environ.get("PYXEN_NET_RX_COALESCE_US", "150"))
#: NAPI-style TX polling in the C loop: after the TX ring empties, look at it every
#: 30 µs for this long (µs) before asking the frontend for events again, so that a
#: guest sending steadily needs no EVTCHNOP_send (an exit, ~65-120 µs) per batch; 0:
#: off.  1000 rather than 200: a TCP stream's TX pauses (ACKs, iperf3's writes) are
#: often longer than 200 µs, and each re-arm cost the guest a notify (docs/netback.md)
TX_POLL_US = int(os.environ.get("PYXEN_NET_TX_POLL_US", "1000"))
#: TX completion coalescing in the C loop: hold an owed TX event this long (µs), or
#: until an RX event goes (one upcall for both) or half the ring is unreaped; 0: off
TX_COALESCE_US = int(os.environ.get("PYXEN_NET_TX_COALESCE_US", "150"))
TAP_READ = 65536 + N.VNET_HDR.size + 64

#: serve connected rings with the C data path (pyxen/native/net.c) when it loads
NATIVE = os.environ.get("PYXEN_NATIVE", "1") != "0"
_NATIVE_STATS = ("tx_packets", "tx_bytes", "tx_dropped", "tx_errors", "rx_packets", "rx_bytes",
                 "rx_dropped", "rx_errors", "tx_events", "rx_events")  # net.c's pxn_stats order
_PXN_NOTIFY, _PXN_MORE, _PXN_FATAL, _PXN_STALLED = 1, 2, 4, 8
# net.c's pxn_new feature bits
_F_CSUM, _F_IPV6_CSUM, _F_GSO4, _F_GSO6, _F_SG = 1, 2, 4, 8, 16
_declared: set[int] = set()


def _native_lib(anyway: bool = False) -> ctypes.CDLL | None:
    """The native library with net.c's functions declared (GIL-releasing calls);
    None when it does not load or NATIVE is off (``anyway``: whatever NATIVE says)."""
    lib = native.lib() if NATIVE or anyway else None
    if lib is None:
        return None
    if id(lib) not in _declared:
        vp = ctypes.c_void_p
        lib.pxn_new.argtypes = [vp, vp, vp, ctypes.c_int, ctypes.c_uint16, ctypes.c_int]
        lib.pxn_new.restype = vp
        lib.pxn_free.argtypes = [vp]
        lib.pxn_free.restype = None
        lib.pxn_tx_round.argtypes = [vp, ctypes.c_int]
        lib.pxn_tx_round.restype = ctypes.c_int
        lib.pxn_rx_round.argtypes = [vp, ctypes.c_int]
        lib.pxn_rx_round.restype = ctypes.c_int
        lib.pxn_msg.argtypes = [vp]
        lib.pxn_msg.restype = ctypes.c_char_p
        lib.pxn_stats.argtypes = [vp, ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
        lib.pxn_stats.restype = None
        lib.pxn_stop.argtypes = [vp]
        lib.pxn_stop.restype = None
        ci = ctypes.c_int
        lib.pxn_serve.argtypes = [vp, ci, ci, ci, ci, ci, ci, ci, ci, ci]
        lib.pxn_serve.restype = ci
        _declared.add(id(lib))
    return lib


# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0002, 0x1000, 0x4000, 0x0100
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
#: the MAC of the host end, as Linux's netback gives its vifs (never the bridge's own)
HOST_MAC = "fe:ff:ff:ff:ff:ff"


class NetError(Exception):
    """The host side of a vif cannot be set up (no TAP, no bridge)."""


def open_tap(name: str) -> int:
    """A TAP device ``name`` with a virtio_net_hdr in front of each frame; its fd.
    Always ``IFF_MULTI_QUEUE`` (a TAP's queue mode is fixed when it is made,
    and how many queues the frontend takes is known only at connect): this fd
    is its first queue, and calling this again with the same name attaches
    one more (a multi-queue vif's queue N, :class:`_Queue`)."""
    if len(name.encode()) > 15:
        raise NetError(f"interface name {name!r} is longer than 15 bytes")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise NetError(f"cannot open /dev/net/tun: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", N.VNET_HDR.size))
    except OSError as e:
        os.close(fd)
        raise NetError(f"cannot create TAP {name}: {e.strerror}") from None
    return fd


def set_offload(fd: int, flags: int) -> None:
    """Which checksum/GSO states the host may hand us (what the frontend takes)."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


# linux/sockios.h, linux/if.h: the one link change inside a migration's
# downtime (bringing a prepared TAP up at commitment) is a plain interface
# ioctl made with the GIL held: pyroute2's asyncio round trips each give the
# GIL away and wait up to a switch interval (5 ms) to get it back while other
# threads of the domain process run Python (measured: 5-8 ms alone, 35-230 ms
# beside one or two busy threads).  Everything else uses pyroute2.
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
_IFREQ = 40  # struct ifreq: a 16-byte name and a 24-byte union
_libc_gil: ctypes.PyDLL | None = None
_ctl: socket.socket | None = None  # link_up's socket, kept open (made by tap_prepare)


def _ifreq(name: str, data: bytes = b"") -> bytearray:
    if len(name.encode()) > 15:
        raise NetError(f"interface name {name!r} is longer than 15 bytes")
    return bytearray(struct.pack("16s", name.encode()) + data.ljust(_IFREQ - 16, b"\0"))


def _ctl_socket() -> socket.socket:
    """Any socket reaches the interface ioctls (dev_ioctl); AF_UNIX needs no IP stack."""
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)


def _prepare_link_up() -> None:
    """What :func:`link_up` needs, made ahead: libc through a GIL-keeping
    ctypes.PyDLL and an open socket (making or closing one gives the GIL away)."""
    global _libc_gil, _ctl
    if _libc_gil is None:
        lib = ctypes.PyDLL(None, use_errno=True)
        lib.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p]
        lib.ioctl.restype = ctypes.c_int
        _libc_gil = lib
    if _ctl is None:
        _ctl = _ctl_socket()


def tap_prepare(tap: str, bridge: str | None, mac: str = HOST_MAC) -> None:
    """Everything of bridge mode (Xen's vif-bridge) except bringing the TAP up:
    its MAC, ``bridge`` created when missing and up, the TAP in it, through
    netlink with pyroute2.  A port that is down is disabled in the bridge:
    nothing is forwarded to or from it, the bridge learns nothing through it,
    so a migration's destination can do this at the reservation while the
    source's copy of the guest (its MAC) still runs on the segment;
    :func:`link_up` at commitment is then a single ioctl.  pyroute2's round
    trips each give the GIL away (5-8 ms alone, 35-230 ms beside busy
    threads): fine here, off the downtime.  No bridge: only the MAC
    (route/NAT setups and hotplug scripts configure the rest)."""
    try:
        from pyroute2 import IPRoute  # type: ignore[import-untyped]
        from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]
    except ImportError:
        raise NetError("pyroute2 is needed for vifs (pip install pyroute2)") from None
    _prepare_link_up()
    try:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=tap)
            if not idx:
                raise NetError(f"TAP {tap} vanished")
            ipr.link("set", index=idx[0], address=mac)
            if not bridge:
                return
            br = ipr.link_lookup(ifname=bridge)
            if not br:
                try:
                    ipr.link("add", ifname=bridge, kind="bridge")
                except NetlinkError as e:
                    if e.code != 17:  # EEXIST: another vif made it just now
                        raise
                br = ipr.link_lookup(ifname=bridge)
            ipr.link("set", index=br[0], state="up")
            ipr.link("set", index=idx[0], master=br[0])
    except NetlinkError as e:
        raise NetError(f"bridge {bridge}, TAP {tap}: {e}") from None


def link_up(name: str) -> None:
    """Bring an interface up (a prepared TAP at commitment).  Two ioctls on a
    socket opened ahead, through a ctypes.PyDLL, which keeps the GIL: a few
    microseconds of kernel work, instead of a wait of up to a switch interval
    to get the GIL back after each system call while other threads of the
    process run Python.  The socket belongs to the network namespace it was
    made in: a thread that moved to another one (tests do) gets a new one."""
    global _ctl
    _prepare_link_up()
    assert _libc_gil is not None and _ctl is not None
    buf = ctypes.create_string_buffer(bytes(_ifreq(name)), _IFREQ)
    if _libc_gil.ioctl(_ctl.fileno(), SIOCGIFFLAGS, buf) < 0:
        _ctl.close()
        _ctl = _ctl_socket()
        if _libc_gil.ioctl(_ctl.fileno(), SIOCGIFFLAGS, buf) < 0:
            raise NetError(f"{name}: no such interface: {os.strerror(ctypes.get_errno())}")
    fl = struct.unpack_from("H", buf.raw, 16)[0]
    if fl & IFF_UP:
        return
    struct.pack_into("H", buf, 16, fl | IFF_UP)
    if _libc_gil.ioctl(_ctl.fileno(), SIOCSIFFLAGS, buf) < 0:
        raise NetError(f"{name}: cannot bring it up: {os.strerror(ctypes.get_errno())}")


def bridge_attach(tap: str, bridge: str | None, mac: str = HOST_MAC, up: bool = True) -> None:
    """Bridge mode (Xen's vif-bridge): create ``bridge`` if it is missing, put
    the TAP in it, bring both up (:func:`tap_prepare`, then :func:`link_up`).
    No bridge: the TAP is only brought up (route/NAT setups configure it
    themselves)."""
    tap_prepare(tap, bridge, mac)
    if up:
        link_up(tap)


def vif_name(domid: int, devid: int, ifname: str = "") -> str:
    """The host end's name: the config's ``vifname``, else Xen's ``vifD.N``."""
    return ifname or f"vif{domid}.{devid}"


def make_tap(domid: int, devid: int, bridge: str | None, ifname: str = "", script: str = "") -> int:
    """The host end of a vif made ahead (a migration's reservation, a restore
    while its file is read): the TAP, on its bridge but down (:func:`tap_prepare`;
    with a hotplug script only its MAC: the script runs when Xen runs it, at
    :meth:`NetBack.start`).  Its fd, for ``NetBack(tap=)``."""
    name = vif_name(domid, devid, ifname)
    fd = open_tap(name)
    try:
        tap_prepare(name, None if script else bridge)
    except NetError:
        os.close(fd)
        raise
    return fd


#: libxl's LIBXL_HOTPLUG_TIMEOUT (seconds a hotplug script may take)
HOTPLUG_TIMEOUT = 40


def hotplug_env(script: str, domid: int, devid: int, vif: str, gatewaydev: str = "") -> dict[str, str]:
    """The environment libxl gives a vif hotplug script (libxl_linux.c's
    get_hotplug_env for a PV vif), on top of ours (PATH, and XENSTORED_PATH
    added by the caller so that xenstore-read reaches pyxen's xenstored)."""
    return {"script": script, "XENBUS_TYPE": "vif", "XENBUS_PATH": f"backend/vif/{domid}/{devid}",
            "XENBUS_BASE_PATH": "backend", "netdev": gatewaydev, "vif": vif}


def run_hotplug(script: str, action: str, env: dict[str, str], timeout: float = HOTPLUG_TIMEOUT) -> None:
    """Run a vif hotplug script as libxl does: ``SCRIPT online|offline
    type_if=vif`` with :func:`hotplug_env`'s variables; NetError naming the
    script, the action and what it said when it fails or takes too long."""
    import subprocess
    try:
        p = subprocess.run([script, action, "type_if=vif"], env={**os.environ, **env}, capture_output=True,
                           text=True, errors="replace", timeout=timeout, stdin=subprocess.DEVNULL,
                           close_fds=True)
    except subprocess.TimeoutExpired:
        raise NetError(f"hotplug script {script} {action}: still running after {timeout:g} s") from None
    except OSError as e:
        raise NetError(f"hotplug script {script} {action}: cannot run it: {e.strerror}") from None
    if p.returncode != 0:
        said = (p.stderr.strip() or p.stdout.strip()).splitlines()[-3:]
        how = f"exit status {p.returncode}" if p.returncode > 0 else f"killed by signal {-p.returncode}"
        raise NetError(f"hotplug script {script} {action} failed ({how})"
                       + (": " + " / ".join(said) if said else ""))


class GrantCopier:
    """Moves bytes between host buffers and pages a guest granted to us: the
    one place the data path touches guest memory (``GNTTABOP_copy``'s job;
    a native batch copy can take its place).  Each page is checked in the
    guest's grant table and held only for the copy; pages written are marked
    dirty for live migration."""

    def __init__(self, domain: Domain) -> None:
        self.d = domain

    def read(self, segs: list[tuple[int, int, int]]) -> tuple[bytearray, list[int]]:
        """Copy ``(gref, offset, length)`` segments out, concatenated; and a
        status per segment (0 or RSP_ERROR for a grant we may not read)."""
        d = self.d
        gt, ram = d.gnttab, d.machine.ram_view
        out = bytearray()
        status = []
        for gref, off, n in segs:
            try:
                base = gt.host_acquire(gref, BACKEND_DOMID, False)
            except XenError:
                status.append(N.RSP_ERROR)
                continue
            try:
                out += ram[base + off:base + off + n]
            finally:
                gt.host_release(gref)
            status.append(N.RSP_OKAY)
        return out, status

    def write(self, gref: int, off: int, data: bytes | memoryview) -> int:
        """Copy ``data`` into the granted page at ``off``: RSP_OKAY or RSP_ERROR."""
        d = self.d
        gt = d.gnttab
        try:
            base = gt.host_acquire(gref, BACKEND_DOMID, True)
        except XenError:
            return N.RSP_ERROR
        try:
            d.machine.ram_view[base + off:base + off + len(data)] = data
            d.mark_dirty(d.pfn_to_mfn(base >> 12))
        finally:
            gt.host_release(gref)
        return N.RSP_OKAY


@dataclass
class _Frontend:
    """What the frontend asked for at connect time."""

    sg: bool = False
    gso4: bool = False
    gso6: bool = False
    csum: bool = True
    ipv6_csum: bool = False
    rx_notify: bool = False


class _Fatal(Exception):
    pass


#: a queue's nodes (:func:`netif.read_queue_keys` reads these under its base)
QUEUE_KEY_NODES = ("tx-ring-ref", "rx-ring-ref", "event-channel-tx", "event-channel-rx", "event-channel")
#: the frontend's feature nodes read at connect (absent: "0")
_FE_FEATURES = ("feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-no-csum-offload",
                "feature-ipv6-csum-offload", "feature-rx-notify")


def _parse_rate(v: str | None) -> N.TxCredit | None:
    """The backend's ``rate`` node as libxl writes it ("BYTES,USECS"), read at
    connect as netback's xen_net_read_rate; absent or malformed: no limit.
    Each queue gets its own credit (netback's queue->credit_bytes)."""
    try:
        b, u = (int(x) for x in (v or "").split(","))
    except ValueError:
        return None
    if b <= 0 or u <= 0:
        return None
    return N.TxCredit(b, u, time.monotonic())


def max_queues_default() -> int:
    """The queues a vif offers: Linux netback's default, min(8, host CPUs)
    (its ``xenvif_max_queues``); PYXEN_NET_MAX_QUEUES sets it for the host as
    netback's ``max_queues`` module parameter does."""
    env = os.environ.get("PYXEN_NET_MAX_QUEUES", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return N.default_max_queues(os.cpu_count() or 1)


class NetBack:
    """One virtual network interface of one domain."""

    def __init__(self, domain: Domain, xs: XsClient, devid: int, mac: str, bridge: str | None = "xenbr0",
                 ifname: str = "", script: str = "", tap: int = -1, max_queues: int = 0) -> None:
        """``tap``: the TAP already made by :func:`make_tap` (ours to close).
        ``max_queues``: the queues offered (``multi-queue-max-queues``); 0:
        :func:`max_queues_default`."""
        self.domain = domain
        self.script = script  # script=: a hotplug script does what bridge mode would (vif-bridge's job)
        self.script_online = False
        self.vif_plan: vifmode.Plan | None = None  # route/NAT mode's host changes, while in effect
        self.xs = xs
        self.devid = devid
        self.mac = mac
        self.bridge = bridge
        self.ifname = vif_name(domain.domid, devid, ifname)
        self.fe = f"/local/domain/{domain.domid}/device/vif/{devid}"
        self.be = f"/local/domain/{BACKEND_DOMID}/backend/vif/{domain.domid}/{devid}"
        self.token = f"netback-{domain.domid}-{devid}"
        self.state = N.STATE_INITIALISING
        self.tap = tap
        self.tx: N.BackRing | None = None
        self.rx: N.BackRing | None = None
        self.maps: list[tuple[mmap.mmap, memoryview, int]] = []  # (mapping, view, ref) per ring
        self.tx_port = self.rx_port = 0
        self.fe_feat = _Frontend()
        self.copier = GrantCopier(domain)
        self.lock = threading.RLock()  # state machine
        self.proc_lock = threading.RLock()  # held while the service thread is in the rings
        self.up_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.stop = False
        self.detaching = False
        self.thread: threading.Thread | None = None
        self._pending: tuple[N.RxMeta, bytes] | None = None  # a frame waiting for RX buffers
        self.rx_stalled = False
        self.credit: N.TxCredit | None = None  # rate= (the backend's "rate" node), None: no limit
        #: the TAP's TUNSETOFFLOAD flags: none on a new TAP (the kernel's default) until a connect
        self.offload = 0
        self._tx_wait = 0.0  # the limiter holds TX back this long
        self._stats = dict.fromkeys(_NATIVE_STATS, 0)
        self.dev: int | None = None  # struct pxn *, while the C data path serves the rings
        self.native_why = ""  # why the Python data path serves them, if it does
        self._native_totals = dict.fromkeys(_NATIVE_STATS, 0)  # earlier connections'
        # (port, eventfd) the domain's native event hub watches: net.c signals the guest itself
        self._efds: list[tuple[int, int]] = []
        self.max_queues = max_queues or max_queues_default()
        #: queues 1..Q-1 of a multi-queue connection (this object is queue 0)
        self.queues: list[_Queue] = []
        self._gone_totals = dict.fromkeys(_NATIVE_STATS, 0)  # queues of earlier connections

    def _own_stats(self) -> dict[str, int]:
        """This queue's counters (both data paths, earlier connections included)."""
        out = dict(self._stats)
        for k, v in self._native_stats().items():
            out[k] += v
        return out

    @property
    def stats(self) -> dict[str, int]:
        """Packets and bytes both ways, drops and errors (both data paths), all
        queues summed; ``queues``: how many the connection has (0: none)."""
        out = self._own_stats()
        for st in [q._own_stats() for q in list(self.queues)] + [self._gone_totals]:
            for k, v in st.items():
                out[k] += v
        out["native"] = int(self.dev is not None)
        out["queues"] = (1 + len(self.queues)) if self.tx is not None else 0
        return out

    @property
    def queue_stats(self) -> list[dict[str, int]]:
        """Each connected queue's own counters, queue 0 first."""
        if self.tx is None:
            return []
        return [self._own_stats()] + [q._own_stats() for q in list(self.queues)]

    def _native_stats(self) -> dict[str, int]:
        tot = dict(self._native_totals)
        dev = self.dev
        lib = _native_lib(anyway=True) if dev is not None else None
        if dev is not None and lib is not None:
            arr = (ctypes.c_uint64 * len(_NATIVE_STATS))()
            lib.pxn_stats(dev, arr, len(_NATIVE_STATS))
            for k, v in zip(_NATIVE_STATS, arr, strict=True):
                tot[k] += int(v)
        return tot

    # ------------------------------------------------------------ xenstore
    def start(self, link: bool = True) -> None:
        """Make the TAP and put it on the bridge (unless :func:`make_tap` did,
        then only bring it up: one ioctl), or run the hotplug script; advertise
        our features, go InitWait, watch the frontend.  ``link=False`` leaves
        the TAP down (a migration's destination at the reservation: the
        caller brings it up with :func:`link_up` at the commitment)."""
        try:
            if self.tap < 0:
                self.tap = open_tap(self.ifname)
                tap_prepare(self.ifname, None if self.script else self.bridge)
            if vifmode.builtin_mode(self.script):  # Xen's vif-route/vif-nat, not installed: ours
                self._mode_online()
            elif self.script:
                self._hotplug("online")  # the script does the rest, when Xen runs it
            elif link:
                link_up(self.ifname)
        except NetError:
            if self.tap >= 0:
                os.close(self.tap)
            self.tap = -1
            raise
        xs, be = self.xs, self.be
        vals = {
            "feature-sg": "1", "feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1",
            "feature-ipv6-csum-offload": "1", "feature-rx-copy": "1", "feature-rx-flip": "0",
            "feature-split-event-channels": "1", "multi-queue-max-queues": str(self.max_queues),
            "feature-multicast-control": "0", "feature-ctrl-ring": "0",
            "hotplug-status": "connected", "vifname": self.ifname,
        }
        # one round trip for the features, InitWait and our watch (pipelined:
        # xenstored answers in order, so the frontend that sees InitWait sees
        # them all); a migration's destination does this between END and the unpause
        vals["state"] = str(N.STATE_INITWAIT)
        self.state = N.STATE_INITWAIT
        xs.write_many({f"{be}/{k}": v for k, v in vals.items()},
                      watch=(f"{self.fe}/state", self.token, self._on_frontend),
                      inline=self._on_frontend_inline)
        self.thread = threading.Thread(target=self._service, name=f"netback-{self.devid}", daemon=True)
        self.thread.start()

    def _hotplug(self, action: str) -> None:
        """Run the vif's hotplug script (script=) as libxl runs vif-bridge: on
        failure the backend gets Xen's ``hotplug-error``/``hotplug-status=error``
        nodes and NetError names the script."""
        env = hotplug_env(self.script, self.domain.domid, self.devid, self.ifname,
                          self.xs.try_read(f"{self.be}/gatewaydev") or "")
        try:
            env["XENSTORED_PATH"] = str(self.xs.sock.getpeername())
        except OSError:
            pass
        try:
            run_hotplug(self.script, action, env)
        except NetError as e:
            if action == "online":
                try:
                    self.xs.write(f"{self.be}/hotplug-error", str(e))
                    self.xs.write(f"{self.be}/hotplug-status", "error")
                except XsError:
                    pass
            raise
        self.script_online = action == "online"

    def _mode_online(self) -> None:
        """Route or NAT mode done here (:mod:`.vifmode`), from the backend's
        ``ip`` and ``gatewaydev`` nodes as Xen's scripts read them (the
        toolstack wrote them; the guest cannot); failures as a script's."""
        mode = vifmode.builtin_mode(self.script)
        assert mode is not None
        try:
            self.vif_plan = vifmode.setup(mode, self.ifname, self.domain.domid, self.devid,
                                          self.xs.try_read(f"{self.be}/ip") or "",
                                          self.xs.try_read(f"{self.be}/gatewaydev") or "")
            self.bridge = None  # (network-list: in no bridge)
        except vifmode.VifModeError as e:
            try:
                self.xs.write(f"{self.be}/hotplug-error", str(e))
                self.xs.write(f"{self.be}/hotplug-status", "error")
            except XsError:
                pass
            raise NetError(str(e)) from None

    def reconnect_xenstore(self, xs: XsClient) -> None:
        """A new xenstore connection (the daemon restarted): watch again."""
        with self.lock:
            self.xs = xs
        xs.watch(f"{self.fe}/state", self.token, self._on_frontend, inline=self._on_frontend_inline)

    def _switch(self, state: int) -> None:
        self.state = state
        try:
            self.xs.write(f"{self.be}/state", str(state))
        except XsError:
            pass

    def _fe_state(self, v: str | None = None, read: bool = True) -> int:
        """The frontend's state: ``v`` (already read) or, with ``read``, read now."""
        if read:
            v = self.xs.try_read(f"{self.fe}/state")
        try:
            return int(v) if v is not None else N.STATE_UNKNOWN
        except ValueError:
            return N.STATE_UNKNOWN

    def _connect_paths(self) -> list[str]:
        """Every node :meth:`_connect` may read, so that one pipelined round
        trip fetches them all (absent ones are ENOENT answers in the batch):
        the queue count, each queue's keys both flat and under ``queue-N/``
        for every N we offer (which layout applies is only known from the
        count, read in the same batch), ``request-rx-copy``, the frontend's
        features and the backend's ``rate``.  Reading them one by one cost
        13-14 round trips through the store, the bulk of netback's part of
        a migrated guest's reconnect."""
        fe = self.fe
        bases = N.queue_dirs(fe, 1) + (N.queue_dirs(fe, self.max_queues) if self.max_queues > 1 else [])
        return ([f"{fe}/multi-queue-num-queues"]
                + [f"{b}/{k}" for b in bases for k in QUEUE_KEY_NODES]
                + [f"{fe}/{k}" for k in ("request-rx-copy",) + _FE_FEATURES]
                + [f"{self.be}/rate"])

    def _on_frontend_inline(self, path: str, token: str) -> bool:
        """The frontend's state changed, on the xenstore client's reader thread
        (XsClient's inline callbacks): a migrated guest's connect then costs no
        thread hand-over per round trip.  Only if the state machine is free:
        whoever holds it may be waiting for the store, whose replies this
        thread reads; then the dispatcher runs it (False)."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            self._on_frontend(path, token)
        finally:
            self.lock.release()
        return True

    def _on_frontend(self, path: str, token: str) -> None:
        try:
            self._frontend_changed()
        except Exception as e:  # noqa: BLE001 - report it: a silent watch is a stuck vif
            self.domain.log(f"netback {self.ifname}: frontend change: {e!r}\n{traceback.format_exc()}")

    def _frontend_changed(self) -> None:
        t0 = time.monotonic()  # the watch fired (the connect's line in the log counts from here)
        with self.lock:
            vals: dict[str, str | None] | None = None
            if self.state == N.STATE_INITWAIT:
                # the frontend may be ready: its state and everything the
                # connect reads in one round trip (the store answers in order,
                # so the keys are read after the state, as one by one)
                vals = self.xs.read_many([f"{self.fe}/state"] + self._connect_paths())
                fe = self._fe_state(vals[f"{self.fe}/state"], read=False)
            else:
                fe = self._fe_state()
            if fe in (N.STATE_INITIALISED, N.STATE_CONNECTED) and self.state == N.STATE_INITWAIT:
                try:
                    self._connect(vals, t0)
                except (XenError, XsError, ValueError, OSError, NetError) as e:
                    self._fail(f"cannot connect: {e}")
            elif fe == N.STATE_CLOSING:
                self._disconnect()
                self._switch(N.STATE_CLOSING)
            elif fe == N.STATE_CLOSED:
                self._disconnect()
                self._switch(N.STATE_CLOSED)
                if self.detaching:
                    self._remove_nodes()
            elif fe == N.STATE_INITIALISING and self.state in (N.STATE_CLOSED, N.STATE_CLOSING):
                self._switch(N.STATE_INITWAIT)  # the frontend starts over
            elif fe == N.STATE_INITIALISING and self.state == N.STATE_CONNECTED:
                self._disconnect()
                self._switch(N.STATE_INITWAIT)

    def _fail(self, why: str) -> None:
        self.domain.log(f"netback {self.ifname}: {why}")
        try:
            self.xs.write(f"{self.be}/error", why)
        except XsError:
            pass
        self._disconnect()
        self._switch(N.STATE_CLOSING)

    # ------------------------------------------------------------ connection
    def _connect(self, vals: dict[str, str | None] | None = None, t0: float | None = None) -> None:
        """The frontend is ready: read how many queues it took and each one's
        keys (flat for one queue, under ``queue-N/`` for more: netback's
        connect and connect_data_rings), then attach them all or none.
        ``vals``: the nodes of :meth:`_connect_paths`, already read (else
        they are read here, in one round trip); ``t0``: when the frontend's
        change was seen (monotonic), for the log line that times the connect
        (a migration's downtime includes it)."""
        fe = self.fe
        if t0 is None:
            t0 = time.monotonic()
        if vals is None:
            vals = self.xs.read_many(self._connect_paths())
        t_read = time.monotonic()
        read = vals.get  # a node not in the batch reads as absent, as ENOENT would
        nq = N.queue_count(read(f"{fe}/multi-queue-num-queues"), self.max_queues)
        keys = [N.read_queue_keys(read, base) for base in N.queue_dirs(fe, nq)]
        if (read(f"{fe}/request-rx-copy") or "0") != "1":
            raise ValueError("the frontend does not request rx-copy (page flipping is not supported)")

        def flag(k: str, default: str = "0") -> bool:
            return (read(f"{fe}/{k}") or default) == "1"
        f = _Frontend(sg=flag("feature-sg"), gso4=flag("feature-gso-tcpv4"), gso6=flag("feature-gso-tcpv6"),
                      csum=not flag("feature-no-csum-offload"), ipv6_csum=flag("feature-ipv6-csum-offload"),
                      rx_notify=flag("feature-rx-notify"))
        off_flags = 0
        if f.csum:
            off_flags |= TUN_F_CSUM
            if f.sg and f.gso4:
                off_flags |= TUN_F_TSO4
            if f.sg and f.gso6:
                off_flags |= TUN_F_TSO6
        # the TAP's offloads (whichever queue fd sets them), an ioctl under the
        # kernel's rtnl lock (0.1-0.5 ms, 10 ms seen beside other netdev work):
        # before serving only when the frontend takes less than the TAP gives
        # (a frame it cannot take must not be read first); when it takes more,
        # after Connected (until then the host hands us plain frames, which
        # every frontend takes); not at all when unchanged (our guest's, on
        # the fresh TAP of a migration's destination: none)
        late_offload = not self.offload & ~off_flags
        if not late_offload:
            self._set_offload(off_flags)
        extra: list[_Queue] = []
        try:
            for i in range(1, nq):
                extra.append(_Queue(self, i))
            # each queue its own credit (netback's queue->credit_bytes): rate= is per queue
            rate = read(f"{self.be}/rate")
            self._attach(keys[0], f, _parse_rate(rate), 0)
            try:
                for q, k in zip(extra, keys[1:], strict=True):
                    q._attach(k, f, _parse_rate(rate), q.index)
            except BaseException:
                self._disconnect_rings()
                raise
        except BaseException:
            for q in extra:
                q.shutdown()
            raise
        self.queues = extra
        t_attached = time.monotonic()
        for q in extra:
            assert q.thread is not None
            q.thread.start()
        # serve first, then say Connected (Linux netback's order: connect_data_rings
        # starts the queues' threads before xenbus_switch_state): what the frontend
        # queued before we connected (netif.h allows it) leaves without waiting for
        # the state write's round trip
        self._wake()
        self._switch(N.STATE_CONNECTED)
        t_connected = time.monotonic()
        if late_offload and off_flags != self.offload:
            self._set_offload(off_flags)
        ms = [round((t - t0) * 1e3, 1) for t in (t_read, t_attached, t_connected)]
        self.domain.log(f"netback {self.ifname}: connected, {nq} queue(s), from the frontend's change "
                        f"(monotonic {t0:.6f}): keys read +{ms[0]} ms, rings mapped and served "
                        f"+{ms[1]} ms, Connected +{ms[2]} ms")

    def _set_offload(self, flags: int) -> None:
        set_offload(self.tap, flags)
        self.offload = flags

    def _attach(self, k: N.QueueKeys, f: _Frontend, credit: N.TxCredit | None, index: int) -> None:
        """Map one queue's two rings, accept its channel(s) and hand them to
        this object's data path (the C one unless rate-limited)."""
        d = self.domain
        maps: list[tuple[mmap.mmap, memoryview, int]] = []
        try:
            for ref in (k.tx_ref, k.rx_ref):
                off = d.gnttab.host_acquire(ref, BACKEND_DOMID, True)
                try:
                    m = mmap.mmap(-1, N.PAGE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
                except OSError:
                    d.gnttab.host_release(ref)
                    raise
                maps.append((m, memoryview(m), ref))
                gnttab._map_fixed(gnttab.atomic.address_of(m), mmap.PROT_READ | mmap.PROT_WRITE,
                                  mmap.MAP_SHARED, d.machine.memfd, off)
        except (XenError, OSError):
            self._unmap(maps)
            raise
        bport = 0x9000 + 2 * self.devid + 0x100 * index  # dom0's (notional) end of the channel
        try:
            d.evtchn.accept_interdomain(k.tx_port, BACKEND_DOMID, bport, self._notified)
            if k.rx_port != k.tx_port:
                d.evtchn.accept_interdomain(k.rx_port, BACKEND_DOMID, bport + 1, self._notified)
        except (XenError, OSError):
            d.evtchn.remote_closed(k.tx_port, BACKEND_DOMID)
            self._unmap(maps)
            raise
        with self.proc_lock:
            self.maps = maps
            self.tx = N.BackRing(maps[0][1], N.TX_SLOT)
            self.rx = N.BackRing(maps[1][1], N.RX_SLOT)
            self.tx_port, self.rx_port, self.fe_feat = k.tx_port, k.rx_port, f
            self._pending = None
            self.credit, self._tx_wait = credit, 0.0
            if credit is None:
                self._start_native(f)
            else:
                self.native_why = "rate-limited vifs use the Python data path"

    def _start_native(self, f: _Frontend) -> None:
        """Serve the rings with net.c when the library loads (else Python does)."""
        lib = _native_lib()
        g = self.domain.gnttab.host_grants() if lib is not None else None
        if lib is None or g is None:
            self.native_why = (native.why_not() or "no native grant table") if NATIVE \
                else "disabled (PYXEN_NATIVE=0)"
            return
        feat = (_F_CSUM if f.csum else 0) | (_F_IPV6_CSUM if f.ipv6_csum else 0) | \
            (_F_GSO4 if f.gso4 else 0) | (_F_GSO6 if f.gso6 else 0) | (_F_SG if f.sg else 0)
        dev = lib.pxn_new(g, gnttab.atomic.address_of(self.maps[0][0]),
                          gnttab.atomic.address_of(self.maps[1][0]), self.tap, BACKEND_DOMID, feat)
        if not dev:
            self.native_why = "pxn_new failed"
            return
        self.dev, self.native_why = dev, ""
        self._watch_ports()

    def _watch_ports(self) -> None:
        """Events to the guest without Python: an eventfd per port, watched by the
        domain's native event hub (evt.c), which marks the port pending for its
        vCPU and wakes or kicks it; net.c's service loop writes it.  Without the
        hub (PYXEN_NATIVE_EVENTS=0) Python sends them, round by round."""
        ev = self.domain.evtchn
        hub = ev.native_hub()
        if hub is None:
            return
        try:
            for port in dict.fromkeys((self.tx_port, self.rx_port)):
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                try:
                    hub.watch(port, fd, ev.notify_vcpu(port))
                except OSError:
                    os.close(fd)
                    raise
                self._efds.append((port, fd))
        except OSError as e:
            self.domain.log(f"netback {self.ifname}: events through Python: {e}")
            self._unwatch_ports()

    def _unwatch_ports(self) -> None:
        hub = self.domain.evtchn.hub
        for port, fd in self._efds:
            if hub is not None:
                hub.unwatch_close(port, fd)  # closes fd
            else:
                os.close(fd)
        self._efds = []

    def _unmap(self, maps: list[tuple[mmap.mmap, memoryview, int]]) -> None:
        for m, v, ref in maps:
            v.release()
            m.close()
            self.domain.gnttab.host_release(ref)

    def _disconnect(self) -> None:
        """Every queue off its rings and channels; queues 1.. go (their TAP
        queue fds close, their threads end)."""
        queues, self.queues = self.queues, []
        for q in queues:
            q.shutdown()
            for k, v in q._own_stats().items():
                self._gone_totals[k] += v
        self._disconnect_rings()

    def _disconnect_rings(self) -> None:
        """This queue off its rings and channels (the service thread stays)."""
        if self.tx is None:
            return
        dev, lib = self.dev, _native_lib(anyway=True)
        if dev is not None and lib is not None:
            lib.pxn_stop(dev)  # net.c's service loop returns (and stays out: stop is sticky)
            self._wake()
        with self.proc_lock:  # the service thread is out of the rings
            d = self.domain
            self._unwatch_ports()
            for port in {self.tx_port, self.rx_port}:
                d.evtchn.remote_closed(port, BACKEND_DOMID)
            self.tx = self.rx = None
            maps, self.maps = self.maps, []
            self._pending = None
            dev, lib = self.dev, _native_lib(anyway=True)
            if dev is not None and lib is not None:
                self._native_totals = self._native_stats()
                self.dev = None
                lib.pxn_free(dev)
        self._unmap(maps)

    def _remove_nodes(self) -> None:
        for path in (self.be, self.fe):
            try:
                self.xs.rm(path)
            except XsError:
                pass

    def _notified(self) -> None:
        """The guest sent on one of our channels (runs in its vCPU thread)."""
        self._wake()

    def _wake(self) -> None:
        try:
            os.eventfd_write(self.up_fd, 1)
        except OSError:
            pass

    def _notify(self, port: int) -> None:
        self.domain.raise_port(port, self.domain.evtchn.notify_vcpu(port))

    # ------------------------------------------------------------ the data path
    def _service(self) -> None:
        busy = False
        while not self.stop:
            want = [self.up_fd]
            if self.tap >= 0 and not self.rx_stalled:
                want.append(self.tap)
            timeout = 0.0 if busy else (RX_POLL_S if self.rx_stalled and not self.fe_feat.rx_notify else 1.0)
            if self._tx_wait:
                timeout = min(timeout, self._tx_wait)
            try:
                select.select(want, [], [], timeout)
                os.eventfd_read(self.up_fd)
            except BlockingIOError:
                pass
            except (OSError, ValueError):
                return  # closed
            busy = False
            try:
                with self.proc_lock:
                    if self.tx is None or self.rx is None:
                        self._drain_tap()
                        continue
                    if self.dev is not None and self._efds:
                        self._native_serve(self.dev)
                        busy = not self.stop  # straight back in: the rings may hold work
                    elif self.dev is not None:
                        busy = self._native_round(self.dev)
                    else:
                        busy = self._tx_round(self.tx)
                        busy = self._rx_round(self.rx) or busy
            except (N.ProtocolError, _Fatal) as e:
                with self.lock:
                    self._fail(f"protocol error: {e}")
            except Exception as e:  # noqa: BLE001 - never let a guest kill the backend
                self.domain.log(f"netback {self.ifname}: {e!r}\n{traceback.format_exc()}")

    def _native_serve(self, dev: int) -> None:
        """net.c's own loop (pxn_serve) for up to SERVE_MS, the GIL released: it
        sleeps on our eventfd and the TAP, runs the rounds and signals the guest
        through the hub's eventfds; back here for a fatal error, a stop, or to
        let the control plane take proc_lock."""
        lib = _native_lib(anyway=True)
        assert lib is not None
        tx_fd = self._efds[0][1]
        rx_fd = self._efds[-1][1]
        r = lib.pxn_serve(dev, self.up_fd, tx_fd, rx_fd, BUDGET, int(self.fe_feat.rx_notify), SERVE_MS,
                          RX_COALESCE_US, TX_POLL_US, TX_COALESCE_US)
        if r & _PXN_FATAL:
            raise _Fatal(lib.pxn_msg(dev).decode(errors="replace"))

    def _native_round(self, dev: int) -> bool:
        """One round of each direction in C (net.c), the GIL released."""
        lib = _native_lib(anyway=True)
        assert lib is not None
        r = lib.pxn_tx_round(dev, BUDGET)
        if r & _PXN_FATAL:
            raise _Fatal(lib.pxn_msg(dev).decode(errors="replace"))
        if r & _PXN_NOTIFY:
            self._notify(self.tx_port)
        busy = bool(r & _PXN_MORE)
        r = lib.pxn_rx_round(dev, BUDGET)
        if r & _PXN_FATAL:
            raise _Fatal(lib.pxn_msg(dev).decode(errors="replace"))
        if r & _PXN_NOTIFY:
            self._notify(self.rx_port)
        self.rx_stalled = bool(r & _PXN_STALLED)
        return busy or bool(r & _PXN_MORE)

    def _drain_tap(self) -> None:
        """No frontend: what the host sends is dropped (as a vif with its carrier off)."""
        for _ in range(BUDGET):
            try:
                os.read(self.tap, TAP_READ)
            except OSError:
                return
            self._stats["rx_dropped"] += 1

    def _tx_round(self, ring: N.BackRing) -> bool:
        """Up to BUDGET packets guest -> TAP; True when more are waiting."""
        sent = 0
        self._tx_wait = 0.0
        while sent < BUDGET:
            avail = ring.unconsumed()
            if self.credit is not None and avail:  # credit is taken before the checks, as netback
                wait = self.credit.wait(N.TxRequest.unpack(ring.request(0)).size, time.monotonic())
                if wait:
                    self._tx_wait = wait
                    break
            pkt = N.parse_tx(ring.request, avail)
            if pkt is None:
                if ring.final_check_for_requests():
                    continue
                break
            if pkt.fatal:
                raise _Fatal(pkt.fatal)
            ring.consume(pkt.slots)
            self._tx_packet(ring, pkt)
            sent += 1
        if sent and ring.push_responses():
            self._notify(self.tx_port)
        return sent >= BUDGET

    def _tx_packet(self, ring: N.BackRing, pkt: N.TxPacket) -> None:
        """One packet off the ring: copy it out, hand it to the host, answer each slot."""
        if pkt.drop:
            self._stats["tx_dropped"] += 1
            self.domain.log(f"netback {self.ifname}: tx packet dropped: {pkt.drop}")
            return self._tx_respond(ring, pkt.responses(N.RSP_ERROR))
        if pkt.control:
            return self._tx_respond(ring, pkt.responses(N.RSP_OKAY))
        frame, status = self.copier.read([(t.gref, t.offset, t.size) for t in pkt.data])
        rsps = pkt.responses(N.RSP_OKAY)
        if any(status):
            # as netback's xenvif_tx_check_gop: the failed slots say so, the packet is lost
            self._stats["tx_errors"] += 1
            data_idx = [0] + list(range(1 + pkt.extra_count, len(rsps)))
            for k, st in zip(data_idx, status, strict=True):
                rsps[k] = (rsps[k][0], st)
            return self._tx_respond(ring, rsps)
        hdr = N.tx_vnet_header(pkt, frame)
        if hdr is None:
            self._stats["tx_dropped"] += 1  # "Can't setup checksum": dropped, answered OKAY
        else:
            try:
                os.writev(self.tap, [hdr, frame])
                self._stats["tx_packets"] += 1
                self._stats["tx_bytes"] += len(frame)
            except OSError:
                self._stats["tx_errors"] += 1
        self._tx_respond(ring, rsps)

    @staticmethod
    def _tx_respond(ring: N.BackRing, rsps: list[tuple[int | None, int]]) -> None:
        for rid, st in rsps:
            if rid is None:
                ring.put_response(struct.pack("<h", st), at=2)  # an extra's slot: status only
            else:
                ring.put_response(N.TX_RSP.pack(rid, st))

    def _rx_round(self, ring: N.BackRing) -> bool:
        """Up to BUDGET frames TAP -> guest; True when more may be waiting."""
        done = 0
        self.rx_stalled = False
        while done < BUDGET:
            if self._pending is None:
                try:
                    buf = os.read(self.tap, TAP_READ)
                except BlockingIOError:
                    break
                except OSError:
                    break
                frame = self._rx_prepare(buf)
                if frame is None:
                    continue
                self._pending = frame
            meta, data = self._pending
            need = N.rx_slots_needed(len(data), meta.gso_type != N.GSO_TYPE_NONE)
            if ring.unconsumed() < need:
                ring.set_req_event(ring.req_cons + need)  # tell us when they are there
                if ring.unconsumed() < need:
                    self.rx_stalled = True
                    break
            self._rx_frame(ring, meta, data)
            self._pending = None
            done += 1
        if done and ring.push_responses():
            self._notify(self.rx_port)
        return done >= BUDGET

    def _rx_prepare(self, buf: bytes) -> tuple[N.RxMeta, bytes] | None:
        """A frame read from the TAP, made fit for this frontend (None: dropped)."""
        if len(buf) < N.VNET_HDR.size + N.ETH_HLEN:
            return None
        meta = N.rx_meta(buf[:N.VNET_HDR.size])
        data: bytes | bytearray = buf[N.VNET_HDR.size:]
        f = self.fe_feat
        if meta is None or (meta.gso_type == N.GSO_TYPE_TCPV4 and not f.gso4) \
                or (meta.gso_type == N.GSO_TYPE_TCPV6 and not f.gso6) \
                or (len(data) > N.PAGE and not f.sg):
            self._stats["rx_dropped"] += 1
            return None
        if meta.flags & N.NETRXF_CSUM_BLANK:
            v6 = data[12:14] == b"\x86\xdd"
            if not f.csum or (v6 and not f.ipv6_csum):  # it cannot take a partial checksum
                data = bytearray(data)
                N.complete_checksum(data, meta.csum_start, meta.csum_offset)
                meta = N.RxMeta(N.NETRXF_DATA_VALIDATED, meta.gso_type, meta.gso_size)
        return meta, bytes(data)

    def _rx_frame(self, ring: N.BackRing, meta: N.RxMeta, data: bytes) -> None:
        """One frame into the frontend's posted buffers (its slots are there)."""
        view = memoryview(data)
        err = False
        for slot in N.rx_plan(len(data), meta):
            rid, gref = N.RX_REQ.unpack(ring.request(0))
            ring.consume(1)
            if slot.extra is not None:
                ring.put_response(slot.extra.pack())
                continue
            st = self.copier.write(gref, 0, view[slot.start:slot.start + slot.length])
            if st != N.RSP_OKAY:
                err = True
                ring.put_response(N.RX_RSP.pack(rid, 0, slot.flags, st))
            else:
                ring.put_response(slot.response(rid))
        if err:
            self._stats["rx_errors"] += 1
        else:
            self._stats["rx_packets"] += 1
            self._stats["rx_bytes"] += len(data)

    # ------------------------------------------------------------ lifecycle
    def detach(self, timeout: float = 10.0) -> None:
        """Toolstack-initiated removal: Closing, wait for the frontend to close."""
        with self.lock:
            self.detaching = True
            self._switch(N.STATE_CLOSING)
        end = threading.Event()
        for _ in range(int(timeout * 20)):
            if self._fe_state() in (N.STATE_CLOSED, N.STATE_UNKNOWN, N.STATE_INITIALISING):
                break
            end.wait(0.05)
        with self.lock:
            self._disconnect()
            self._switch(N.STATE_CLOSED)
            self._remove_nodes()
        self.close()

    def close(self) -> None:
        self.stop = True
        self._wake()
        try:
            self.xs.unwatch(f"{self.fe}/state", self.token)
        except XsError:
            pass
        with self.lock:
            self._disconnect()
        if self.thread is not None:
            self.thread.join(5)
        os.close(self.up_fd)
        if self.script_online:  # as libxl when the device goes: SCRIPT offline
            try:
                self._hotplug("offline")
            except NetError as e:
                self.domain.log(f"netback {self.ifname}: {e}", always=True)
            self.script_online = False
        if self.vif_plan is not None:  # route/NAT mode: its routes and nftables table go
            for why in vifmode.undo(self.vif_plan):
                self.domain.log(f"netback {self.ifname}: left behind: {why}", always=True)
            self.vif_plan = None
        if self.tap >= 0:
            os.close(self.tap)  # the TAP goes with its last fd (it was not made persistent)
            self.tap = -1


class _Queue(NetBack):
    """Queue N (N >= 1) of a multi-queue vif: its own rings, channel(s), TAP
    queue fd, service thread, C state, stats and credit -- the same data path
    as queue 0 (the :class:`NetBack` itself), so it is one; the control plane
    (state lock, xenstore, the frontend's features) is the vif's, and a
    protocol error on any queue disconnects the whole vif, as Linux netback's
    xenvif_fatal_tx_err does.  Made at connect, gone at disconnect."""

    def __init__(self, vif: NetBack, index: int) -> None:
        fd = open_tap(vif.ifname)  # one more queue of the vif's multi-queue TAP
        try:
            super().__init__(vif.domain, vif.xs, vif.devid, vif.mac, None, ifname=vif.ifname, tap=fd,
                             max_queues=vif.max_queues)
        except BaseException:
            os.close(fd)
            raise
        self.vif, self.index = vif, index
        self.lock = vif.lock  # the state machine is the vif's
        self._fd_lock = threading.Lock()
        self.thread = threading.Thread(target=self._service, name=f"netback-{vif.devid}-q{index}",
                                       daemon=True)

    def _fail(self, why: str) -> None:
        self.vif._fail(f"queue {self.index}: {why}")

    def _disconnect(self) -> None:
        self._disconnect_rings()

    def _wake(self) -> None:
        with self._fd_lock:
            if self.up_fd >= 0:
                super()._wake()

    def _service(self) -> None:
        try:
            super()._service()
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        """The thread's own fds, closed once it is out of them (the TAP queue
        fd detaches this queue from the TAP: the host stops steering flows here)."""
        with self._fd_lock:
            for fd in (self.up_fd, self.tap):
                if fd >= 0:
                    os.close(fd)
            self.up_fd = self.tap = -1

    def shutdown(self) -> None:
        """Off the rings and channels, and the thread told to end (waited for
        unless it is the caller: a queue's own protocol error ends here)."""
        self._disconnect_rings()
        self.stop = True
        t = self.thread
        if t is None or t.ident is None:  # never started (a connect that failed)
            self._close_fds()
            return
        self._wake()
        if t is not threading.current_thread():
            t.join(5)
