"""Event channels, Xen's 2-level ABI (event_channel.h).

The domain's ports live in a table here; pending and mask bits live in the
guest's shared_info page, with the per-vCPU selector word and
``evtchn_upcall_pending`` in vcpu_info, exactly as the guest reads them.

Bits in shared_info are changed only by the thread of the vCPU they notify
while that vCPU is stopped (see :meth:`pyxen.hv.vcpu.VCPU.post`), so the
hypervisor's read-modify-writes never race the guest's own locked bit
operations on the same vCPU.

Channels to the host's backends (console now; more later) are
"interdomain" channels whose remote end is a Python callable standing in for
dom0's end.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import abi, kvm, native
from ..abi import EEXIST, EINVAL, ENOSPC, ENOSYS, EPERM, ESRCH, XenError
from . import atomic
from . import machine as M

if TYPE_CHECKING:
    from .domain import Domain
    from .vcpu import VCPU

ST_FREE, ST_UNBOUND, ST_INTERDOMAIN, ST_PIRQ, ST_VIRQ, ST_IPI = 0, 1, 2, 3, 4, 5
ST_RESERVED = 6  # allocated while a bind is in flight (reported as closed)
GLOBAL_VIRQS = {abi.VIRQ_CONSOLE, abi.VIRQ_DOM_EXC, 4, 6, 8, 9, 10, 12}
DOM0 = 0
MAX_PORTS_DEFAULT = 1023  # xl's default max_event_channels


@dataclass
class Channel:
    state: int = ST_FREE
    vcpu: int = 0
    remote_dom: int = 0
    remote_port: int = 0
    virq: int = 0
    backend: Callable[[], None] | None = field(default=None, repr=False)
    backend_local: bool = False  # the other end is a backend in this process (dom0's)


class EventChannels:
    """The port table of one domain."""

    def __init__(self, domain: Domain, max_ports: int = MAX_PORTS_DEFAULT) -> None:
        self.domain = domain
        self.max_ports = min(max_ports, abi.EVTCHN_2L_NR_CHANNELS - 1)
        self.ports: list[Channel] = [Channel()]  # port 0 is never used
        self.virq_ports: dict[tuple[int, int], int] = {}
        self.lock = threading.RLock()
        self.sends = 0
        self.hub: NativeEventHub | None = None
        self._hub_tried = False
        # ports whose sends the hub does in C (send_fast): port -> our dup of
        # the channel's outbound eventfd, dropped when the port changes state
        self._out: dict[int, int] = {}

    def native_hub(self) -> NativeEventHub | None:
        """The domain's native event pump (evt.c), started on first use by the
        multi-process directory; None without the native library or with
        PYXEN_NATIVE_EVENTS=0 (then the main loop delivers, as before)."""
        with self.lock:
            if not self._hub_tried:
                self._hub_tried = True
                if os.environ.get("PYXEN_NATIVE_EVENTS", "1") != "0" and native.lib() is not None:
                    try:
                        self.hub = NativeEventHub(self.domain)
                    except OSError as e:
                        self.domain.log(f"native event delivery unavailable: {e}", always=True)
            return self.hub

    # ------------------------------------------------------------ allocation
    def _alloc(self) -> int:
        for p in range(1, len(self.ports)):
            if self.ports[p].state == ST_FREE:
                return p
        if len(self.ports) > self.max_ports:
            raise XenError(ENOSPC, "no free event channel ports")
        self.ports.append(Channel())
        return len(self.ports) - 1

    def _get(self, port: int) -> Channel:
        if not 0 < port < len(self.ports) or self.ports[port].state == ST_FREE:
            raise XenError(EINVAL, f"port {port} is not bound")
        return self.ports[port]

    def bind_backend(self, notify: Callable[[], None], backend_port: int = 0) -> int:
        """A channel whose other end is a host backend (dom0's end in Xen)."""
        with self.lock:
            p = self._alloc()
            self.ports[p] = Channel(ST_INTERDOMAIN, 0, DOM0, backend_port, backend=notify,
                                    backend_local=True)
            return p

    def alloc_unbound(self, remote_dom: int) -> int:
        """EVTCHNOP_alloc_unbound: as Xen, DOMID_SELF as the remote end is
        stored as the caller's own domid (EVTCHNOP_status reports that)."""
        if remote_dom == abi.DOMID_SELF:
            remote_dom = self.domain.domid
        with self.lock:
            p = self._alloc()
            self.ports[p] = Channel(ST_UNBOUND, 0, remote_dom)
            return p

    def bind_virq(self, virq: int, vcpu: int) -> int:
        if not 0 <= virq < abi.NR_VIRQS:
            raise XenError(EINVAL, f"virq {virq} out of range")
        if virq in GLOBAL_VIRQS and vcpu != 0:
            raise XenError(EINVAL, f"global virq {virq} must bind to vcpu 0")
        if not 0 <= vcpu < len(self.domain.vcpus):
            raise XenError(ENOENT_, f"no vcpu {vcpu}")
        with self.lock:
            if (vcpu, virq) in self.virq_ports:
                raise XenError(EEXIST, f"virq {virq} already bound on vcpu {vcpu}")
            p = self._alloc()
            self.ports[p] = Channel(ST_VIRQ, vcpu, virq=virq)
            self.virq_ports[(vcpu, virq)] = p
            return p

    def bind_ipi(self, vcpu: int) -> int:
        if not 0 <= vcpu < len(self.domain.vcpus):
            raise XenError(ENOENT_, f"no vcpu {vcpu}")
        with self.lock:
            p = self._alloc()
            self.ports[p] = Channel(ST_IPI, vcpu)
            return p

    def close(self, port: int) -> None:
        with self.lock:
            ch = self._get(port)
            if ch.state == ST_VIRQ:
                self.virq_ports.pop((ch.vcpu, ch.virq), None)
            self._forget_out(port)
            self.ports[port] = Channel()
        if ch.state == ST_INTERDOMAIN and not ch.backend_local:
            try:  # the other end becomes unbound again, as in Xen
                self.domain.directory.unbind(self.domain, port, ch.remote_dom, ch.remote_port)
            except XenError:
                pass

    # ------------------------------------------------------------ interdomain
    def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        """EVTCHNOP_bind_interdomain: connect to ``remote_port`` that
        ``remote_dom`` allocated unbound for us."""
        d = self.domain
        if remote_dom == abi.DOMID_SELF:
            remote_dom = d.domid
        with self.lock:
            lport = self._alloc()
            self.ports[lport] = Channel(ST_RESERVED)
        try:
            notify = d.directory.bind(d, lport, remote_dom, remote_port)
        except XenError:
            with self.lock:
                self.ports[lport] = Channel()
            raise
        with self.lock:
            self._forget_out(lport)
            self.ports[lport] = Channel(ST_INTERDOMAIN, 0, remote_dom, remote_port, backend=notify)
        # as Xen's evtchn_bind_interdomain: the new port starts pending, so a
        # notification the other side sent before we bound is not lost
        d.raise_port(lport, 0)
        return lport

    def accept_interdomain(self, port: int, from_dom: int, from_port: int,
                           notify: Callable[[], None]) -> None:
        """The remote side of bind_interdomain, run in the domain that owns ``port``."""
        with self.lock:
            if not 0 < port < len(self.ports):
                raise XenError(EINVAL, f"port {port} out of range")
            ch = self.ports[port]
            if ch.state != ST_UNBOUND or ch.remote_dom not in (from_dom, abi.DOMID_SELF):
                raise XenError(EINVAL, f"port {port} of domain {self.domain.domid} is not "
                                       f"waiting for domain {from_dom}")
            self._forget_out(port)
            self.ports[port] = Channel(ST_INTERDOMAIN, ch.vcpu, from_dom, from_port, backend=notify)
            if self.hub is not None:
                self.hub.bind_vcpu(port, ch.vcpu)

    def remote_closed(self, port: int, from_dom: int) -> None:
        """The other end of an interdomain channel closed: back to unbound."""
        with self.lock:
            if 0 < port < len(self.ports):
                ch = self.ports[port]
                if ch.state == ST_INTERDOMAIN and ch.remote_dom == from_dom:
                    self._forget_out(port)
                    self.ports[port] = Channel(ST_UNBOUND, ch.vcpu, from_dom)

    def peer_gone(self, domid: int) -> None:
        """Domain ``domid`` died: our channels to it become unbound (Xen)."""
        with self.lock:
            for p, ch in enumerate(self.ports):
                if ch.state == ST_INTERDOMAIN and ch.remote_dom == domid and not ch.backend_local:
                    self._forget_out(p)
                    self.ports[p] = Channel(ST_UNBOUND, ch.vcpu, domid)

    def bind_vcpu(self, port: int, vcpu: int) -> None:
        if not 0 <= vcpu < len(self.domain.vcpus):
            raise XenError(ENOENT_, f"no vcpu {vcpu}")
        with self.lock:
            ch = self._get(port)
            if ch.state == ST_VIRQ and ch.virq not in GLOBAL_VIRQS:
                raise XenError(EINVAL, "per-vcpu virq cannot move")
            if ch.state not in (ST_VIRQ, ST_UNBOUND, ST_INTERDOMAIN, ST_PIRQ):
                raise XenError(EINVAL, "channel cannot be rebound")
            ch.vcpu = vcpu
            if self.hub is not None:
                self.hub.bind_vcpu(port, vcpu)

    def status(self, port: int) -> bytes:
        """struct evtchn_status's OUT part: status, vcpu, union (16 bytes)."""
        with self.lock:
            if not 0 < port < len(self.ports):
                raise XenError(EINVAL, f"port {port} out of range")
            ch = self.ports[port]
            if ch.state == ST_RESERVED:
                return struct.pack("<II", ST_FREE, 0) + b"\0" * 8
            u = b"\0" * 8
            if ch.state == ST_UNBOUND:
                u = struct.pack("<H6x", ch.remote_dom)
            elif ch.state == ST_INTERDOMAIN:
                u = struct.pack("<H2xI", ch.remote_dom, ch.remote_port)
            elif ch.state == ST_VIRQ:
                u = struct.pack("<I4x", ch.virq)
            return struct.pack("<II", ch.state, ch.vcpu) + u

    def reset(self) -> None:
        with self.lock:
            for p in range(1, len(self.ports)):
                if self.ports[p].state not in (ST_FREE, ST_RESERVED) and not self.ports[p].backend_local:
                    self.close(p)

    # ------------------------------------------------------------ delivery
    def send_fast(self, v: VCPU, arg: int) -> bool:
        """EVTCHNOP_send of the port at guest address ``arg`` done entirely in
        C (``pxe_send``) when the port is bound to another domain process and
        its eventfd is registered (:meth:`_learn_out`): no Python between the
        exit and the eventfd write.  False: nothing done, :meth:`send` decides
        (every error, every other kind of port).  Frames the guest gave back
        make the C page walk's answer incomplete: then never."""
        hub = self.hub
        if hub is None or not self._out or self.domain.free_pfns:
            return False
        if not hub.send(v, arg):
            return False
        self.sends += 1
        return True

    def _learn_out(self, port: int) -> None:
        """After a send in Python on an interdomain channel to another domain
        process: give the hub a duplicate of the channel's outbound eventfd so
        the next sends are C's.  Read under the directory's lock, which it
        holds while it forgets the channel's eventfds (it closes them after),
        so the number we duplicate is still the channel's."""
        hub = self.hub
        links = getattr(self.domain.directory, "links", None)
        dlock = getattr(self.domain.directory, "lock", None)
        if hub is None or not isinstance(links, dict) or dlock is None:
            return
        with dlock:
            fds = links.get(port)
            if fds is None:
                return
            try:
                fd = os.dup(fds[1])  # (not inheritable)
            except OSError:
                return
        with self.lock:
            ch = self.ports[port] if 0 < port < len(self.ports) else None
            if ch is None or ch.state != ST_INTERDOMAIN or ch.backend_local or port in self._out:
                os.close(fd)
                return
            self._out[port] = fd
            hub.set_out(port, fd)

    def _forget_out(self, port: int) -> None:
        """``port`` changes state: its sends go back to Python (under self.lock)."""
        fd = self._out.pop(port, None)
        if fd is not None:
            if self.hub is not None:
                self.hub.set_out(port, -1)
            os.close(fd)

    def send(self, port: int) -> None:
        ch = self._get(port)
        self.sends += 1
        if ch.state == ST_INTERDOMAIN:
            if ch.backend is not None:
                ch.backend()
                if not ch.backend_local and self.hub is not None and port not in self._out:
                    self._learn_out(port)
            return
        if ch.state == ST_RESERVED:
            raise XenError(EINVAL, f"port {port} is not bound yet")
        if ch.state == ST_IPI:
            self.domain.raise_port(port, ch.vcpu)
            return
        if ch.state == ST_UNBOUND:
            return  # nobody listening: dropped, as in Xen
        raise XenError(EINVAL, f"port {port} cannot be sent on")

    def raise_virq(self, virq: int, vcpu: int = 0) -> bool:
        p = self.virq_ports.get((vcpu, virq))
        if p is None:
            return False
        self.domain.raise_port(p, vcpu)
        return True

    def notify_vcpu(self, port: int) -> int:
        if 0 < port < len(self.ports):
            return self.ports[port].vcpu
        return 0


    # ------------------------------------------------------------ save / restore (migration)
    def save_state(self) -> list[dict[str, int]]:
        """The bound ports, for the stream's PYXEN_DOMAIN_STATE record.  As on
        Xen, a restored domain starts with every channel closed except the
        console's and xenstore's, which the toolstack sets up fresh, and the
        guest binds the rest again (Linux's xen_irq_resume, our kernel's
        resume path): this record says what was bound, for ``stream dump``
        and for a toolstack that wants to check the guest rebuilt it."""
        names = {ST_UNBOUND: "unbound", ST_INTERDOMAIN: "interdomain", ST_PIRQ: "pirq",
                 ST_VIRQ: "virq", ST_IPI: "ipi"}
        out: list[dict[str, int]] = []
        with self.lock:
            for p, ch in enumerate(self.ports):
                if ch.state not in names:
                    continue
                e: dict[str, int | str] = {"port": p, "state": names[ch.state], "vcpu": ch.vcpu}
                if ch.state in (ST_UNBOUND, ST_INTERDOMAIN):
                    e["remote_dom"] = ch.remote_dom
                if ch.state == ST_INTERDOMAIN:
                    e["remote_port"] = ch.remote_port
                    e["host_backend"] = int(ch.backend_local)
                if ch.state == ST_VIRQ:
                    e["virq"] = ch.virq
                out.append(e)  # type: ignore[arg-type]
        return out

ENOENT_ = abi.ENOENT
DEFAULT_POLL_NS = 200_000  # NativeEventHub's poll window bound (PYXEN_EVENT_POLL_US overrides)


class NativeEventHub:
    """Inter-domain events delivered by a C thread (``pyxen/native/evt.c``).

    Without it an event from another domain process wakes this process's
    Python main loop, which posts the port to the vCPU and wakes the vCPU
    thread: two hand-offs through the GIL, 100-200 us each on a loaded
    machine.  With it the pump thread (C, no GIL) takes the event from the
    channel's eventfd, records the port for its vCPU and wakes that vCPU,
    which sleeps in :meth:`wait` (C, GIL released) while blocked, or kicks it
    if it is running.  The vCPU thread sets the pending bits itself
    (:meth:`deliver`, Xen's 2-level set_pending in C), as every other event.
    """

    def __init__(self, domain: Domain) -> None:
        lib, fast = native.lib(), native.fast()
        if lib is None or fast is None:
            raise OSError(native.why_not())
        self._lib, self._fast = lib, fast
        self.domain = domain
        n = len(domain.vcpus)
        self.h = int(fast.pxe_new(n, abi.SI_EVTCHN_PENDING, abi.SI_EVTCHN_MASK, abi.VI_PENDING_SEL,
                                  abi.VI_UPCALL_PENDING) or 0)
        if not self.h:
            raise OSError("pxe_new failed (eventfd, epoll or thread)")
        self._attached = [0] * n
        self._off_ie = kvm.Run.immediate_exit.offset
        m = domain.machine  # the guest's page walk for pxe_send (gnt.c pxc_walk)
        ram = atomic.address_of(m.ram)
        self._me = native.PxcSelf(ram=ram, nr_pages=domain.nr_pages, mfn_base=M.MFN_BASE,
                                  types=ram + m.xenheap_offset(m.xh.types), nr_types=m.max_pages,
                                  domid=domain.domid)
        self._me_addr = ctypes.addressof(self._me)
        # adaptive polling before a blocked vCPU sleeps (evt.c, KVM's halt
        # polling): at most this long, only while its waits end that soon
        us = os.environ.get("PYXEN_EVENT_POLL_US", "")
        fast.pxe_set_poll(self.h, int(us) * 1000 if us.isdigit() else DEFAULT_POLL_NS)
        for v in domain.vcpus:  # running vCPUs can be kicked from now on
            t = v.thread
            if t is not None and t.is_alive() and t.native_id:
                self._attach(v, t.native_id)

    def _attach(self, v: VCPU, tid: int) -> None:
        self._fast.pxe_attach(self.h, v.id, tid,
                              ctypes.addressof(v.kvm.run_struct) + self._off_ie)
        self._attached[v.id] = tid

    def detach(self, v: VCPU) -> None:
        """``v``'s thread ends: no more kicks (its kvm_run may go away after)."""
        self._fast.pxe_attach(self.h, v.id, 0, None)
        self._attached[v.id] = 0

    def watch(self, port: int, fd: int, vcpu: int) -> None:
        """Deliver what arrives on eventfd ``fd`` to ``port`` (bound to ``vcpu``)."""
        r = self._fast.pxe_watch(self.h, port, fd, vcpu)
        if r < 0:
            raise OSError(-r, f"epoll of the eventfd of port {port}")

    def unwatch_close(self, port: int, fd: int) -> None:
        """Stop watching ``port``'s eventfd ``fd`` and close it (the pump may be
        about to read it: it checks, under its lock, that ``fd`` is still ``port``'s)."""
        self._fast.pxe_unwatch(self.h, port, fd)

    def bind_vcpu(self, port: int, vcpu: int) -> None:
        self._fast.pxe_bind_vcpu(self.h, port, vcpu)

    def deliver(self, v: VCPU) -> None:
        """On ``v``'s thread: mark the ports that fired for it pending."""
        tid = threading.get_native_id()
        if self._attached[v.id] != tid:
            self._attach(v, tid)
        si_addr, vi_addr = v._event_addrs()
        self._fast.pxe_deliver(self.h, v.id, si_addr, vi_addr + v.vi_off)

    def wait(self, v: VCPU, timeout_s: float) -> None:
        """On ``v``'s thread, blocked: sleep until a port fires for it,
        :meth:`wake`, a kick or the timeout (GIL released meanwhile)."""
        self._lib.pxe_wait(self.h, v.id, int(timeout_s * 1e9))

    def wake(self, vcpu: int) -> None:
        self._fast.pxe_wake(self.h, vcpu)

    def set_out(self, port: int, fd: int) -> None:
        """Sends on ``port`` write eventfd ``fd`` from C (-1: Python sends)."""
        self._fast.pxe_set_out(self.h, port, fd)

    def send(self, v: VCPU, arg: int) -> bool:
        """EVTCHNOP_send with its argument at guest address ``arg``, in C; False
        if C left it to Python (evt.c pxe_send)."""
        self._me.nr_pages = self.domain.nr_pages
        return self._fast.pxe_send(self.h, self._me_addr, v.current_l4, arg) == 0

    @property
    def events(self) -> int:
        return int(self._fast.pxe_events(self.h))

    def poll_stats(self) -> tuple[int, int]:
        """(waits that polled before sleeping, of which found their event polling)."""
        out = (ctypes.c_uint64 * 2)()
        self._fast.pxe_poll_stats(self.h, out)
        return int(out[0]), int(out[1])


def set_pending_bits(si: memoryview, vi: memoryview, vo: int, port: int, si_addr: int,
                     vi_addr: int) -> bool:
    """Xen's evtchn_2l_set_pending: pending/mask bits in shared_info ``si``, the
    selector and upcall flag in the vCPU's vcpu_info at ``vi[vo:]`` (which may
    have moved out of shared_info with VCPUOP_register_vcpu_info).  Returns
    True if the vCPU must be notified (upcall_pending went 0 -> 1).

    Bits are set with locked read-modify-writes (``hv/atomic``), as Xen's
    ``guest_test_and_set_bit``: the guest clears them with locked
    instructions on its own CPU, and other host threads may set them too.
    ``si_addr``/``vi_addr`` are the views' host addresses (the locked
    operations need them; ``atomic.view_address``)."""
    word, bit = divmod(port, 64)
    old = atomic.fetch_or64(si_addr + abi.SI_EVTCHN_PENDING + word * 8, 1 << bit)
    if old >> bit & 1:
        return False
    moff = abi.SI_EVTCHN_MASK + word * 8
    if int.from_bytes(si[moff:moff + 8], "little") >> bit & 1:
        return False
    return _mark_selector(vi, vo, word, vi_addr)


def _mark_selector(vi: memoryview, vo: int, word: int, vi_addr: int) -> bool:
    old = atomic.fetch_or64(vi_addr + vo + abi.VI_PENDING_SEL, 1 << word)
    if old >> word & 1:
        return False
    if vi[vo + abi.VI_UPCALL_PENDING]:
        return False
    vi[vo + abi.VI_UPCALL_PENDING] = 1  # one byte store
    return True


def unmask_bits(si: memoryview, vi: memoryview, vo: int, port: int, si_addr: int,
                vi_addr: int) -> bool:
    """Xen's evtchn_2l_unmask: clear the mask bit and, only if this call cleared
    it and the port is pending, re-raise it on its vCPU (a guest that cleared
    the bit itself gets nothing re-raised, exactly as on Xen).  Returns True
    if an upcall became pending."""
    word, bit = divmod(port, 64)
    old = atomic.fetch_and64(si_addr + abi.SI_EVTCHN_MASK + word * 8, ~(1 << bit) & (2**64 - 1))
    if not old >> bit & 1:
        return False
    poff = abi.SI_EVTCHN_PENDING + word * 8
    if int.from_bytes(si[poff:poff + 8], "little") >> bit & 1:
        return _mark_selector(vi, vo, word, vi_addr)
    return False


def is_pending(si: memoryview, port: int) -> bool:
    word, bit = divmod(port, 64)
    poff = abi.SI_EVTCHN_PENDING + word * 8
    return bool(int.from_bytes(si[poff:poff + 8], "little") >> bit & 1)


__all__ = ["EventChannels", "Channel", "set_pending_bits", "unmask_bits", "is_pending",
           "ENOSYS", "EPERM", "ESRCH"]
