"""The multi-process :class:`~pyxen.hv.interdomain.Directory` of a domain process.

Other domains live in other processes.  The daemon knows where (pid, memfd
number, size) and brokers the *setup* of a connection; the data path never
touches it:

* memory: the peer's memfd is duplicated into this process with
  ``pidfd_getfd(2)`` and mapped, once the daemon has checked that we are the
  asking domain's process and the peer's process has consented (its guest
  granted us something, :meth:`ProcessDirectory.consent`);
* event channels: the accepting side creates two eventfds (one per
  direction) and registers its inbound one with its native event pump
  (``pyxen/native/evt.c``, which marks the port for its vCPU and wakes or
  kicks that vCPU without Python), or, without the native library, with its
  main loop's selector; the binding side duplicates both with
  ``pidfd_getfd`` and does the same.  A send is an ``eventfd_write`` by the
  sender's vCPU thread.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import abi
from ..abi import XenError
from ..hv import machine as M
from ..hv.interdomain import Directory, PeerMemory
from . import paths
from .proto import Conn, ProtocolError

if TYPE_CHECKING:
    from ..hv.domain import Domain
    from ..hv.evtchn import NativeEventHub

_libc = ctypes.CDLL(None, use_errno=True)
SYS_pidfd_getfd = 438


def pidfd_getfd(pid: int, fd: int) -> int:
    """Duplicate file descriptor ``fd`` of process ``pid`` into this process."""
    pidfd = os.pidfd_open(pid)
    try:
        r = int(_libc.syscall(SYS_pidfd_getfd, pidfd, fd, 0))
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"pidfd_getfd({pid}, {fd}): {os.strerror(e)}")
        os.set_inheritable(r, False)
        return r
    finally:
        os.close(pidfd)


class ProcessDirectory(Directory):
    """Other domains reached through the daemon (setup) and shared fds (data)."""

    def __init__(self, rundir: Path, watch: Callable[[int, Callable[[], None]], None],
                 unwatch: Callable[[int], None]) -> None:
        self.rundir = rundir
        self.watch = watch  # register an inbound eventfd with the main loop
        self.unwatch = unwatch
        self.lock = threading.Lock()
        self.links: dict[int, tuple[int, int]] = {}  # our port -> (in_fd, out_fd)
        self.native: dict[int, NativeEventHub] = {}  # our ports the native pump watches

    def _ask(self, **req: Any) -> dict[str, Any]:
        try:
            c = Conn.connect(str(paths.daemon_socket(self.rundir)), timeout=10)
        except OSError:
            raise XenError(abi.ESRCH, "the toolstack daemon is not reachable") from None
        try:
            r = c.call(req)
        except (OSError, ProtocolError):
            raise XenError(abi.ESRCH, "the toolstack daemon went away") from None
        finally:
            c.close()
        if not r.get("ok"):
            raise XenError(int(r.get("errno", abi.ESRCH)), str(r.get("error", "")))
        return r

    # ------------------------------------------------------------ memory
    def peer(self, domid: int, requester: int = -1) -> PeerMemory:
        """Domain ``domid``'s memory, through the daemon, which checks that this
        connection is ``requester``'s process (SO_PEERCRED) and asks the
        granter's process, which consents only if it granted ``requester``
        something (:meth:`consent`).  Sizes come from the daemon's record and
        the memfd itself, never from the peer's memory."""
        r = self._ask(op="peer", domain=domid, from_dom=requester)
        try:
            fd = pidfd_getfd(int(r["pid"]), int(r["memfd"]))
        except OSError as e:
            raise XenError(abi.ESRCH, f"domain {domid}'s memory: {e.strerror}") from None
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & M.RAM_SEALS != M.RAM_SEALS:
                raise XenError(abi.ESRCH, f"domain {domid}'s memory can change size: not mapped")
            size = os.fstat(fd).st_size
            buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, XenError) as e:
            os.close(fd)
            if isinstance(e, XenError):
                raise
            raise XenError(abi.ESRCH, f"domain {domid}'s memory: {e}") from None
        try:
            return PeerMemory(domid, buf, fd, int(r["max_pages"]), owned=True,
                              nr_pages=int(r.get("nr_pages", r["max_pages"])))
        except XenError:
            buf.close()
            os.close(fd)
            raise

    @staticmethod
    def consent(local: Domain, from_dom: int) -> dict[str, int]:
        """The granter's half of :meth:`peer`, run in its process: its memory
        goes only to a domain it has granted something to."""
        if from_dom == local.domid or not local.gnttab.grants_to(from_dom):
            raise XenError(abi.EPERM, f"domain {local.domid} granted domain {from_dom} nothing")
        return {"domid": local.domid}

    # ------------------------------------------------------------ event channels
    def bind(self, local: Domain, lport: int, remote_dom: int, remote_port: int) -> Callable[[], None]:
        if remote_dom == local.domid:  # loopback within the domain
            local.evtchn.accept_interdomain(
                remote_port, local.domid, lport,
                lambda: local.raise_port(lport, local.evtchn.notify_vcpu(lport)))
            return lambda: local.raise_port(remote_port, local.evtchn.notify_vcpu(remote_port))
        r = self._ask(op="evtchn-bind", domain=remote_dom, from_dom=local.domid, from_port=lport,
                      port=remote_port)
        pid = int(r["pid"])
        out_fd = pidfd_getfd(pid, int(r["in_fd"]))  # they read what we write
        in_fd = pidfd_getfd(pid, int(r["out_fd"]))  # we read what they write
        with self.lock:
            self.links[lport] = (in_fd, out_fd)
        self._watch(local, lport, in_fd)
        return lambda: _signal(out_fd)

    def accept(self, local: Domain, port: int, from_dom: int, from_port: int) -> dict[str, int]:
        """The remote half of a bind, run in the accepting domain's process."""
        in_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        out_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            local.evtchn.accept_interdomain(port, from_dom, from_port, lambda: _signal(out_fd))
        except XenError:
            os.close(in_fd)
            os.close(out_fd)
            raise
        with self.lock:
            self.links[port] = (in_fd, out_fd)
        self._watch(local, port, in_fd)
        return {"pid": os.getpid(), "in_fd": in_fd, "out_fd": out_fd}

    def _watch(self, local: Domain, port: int, in_fd: int) -> None:
        """Deliver what arrives on ``in_fd`` to our ``port``: the native pump
        if there is one, else the main loop (then raise_port posts it)."""
        hub = local.evtchn.native_hub()
        if hub is not None:
            try:
                hub.watch(port, in_fd, local.evtchn.notify_vcpu(port))
            except OSError as e:
                local.log(f"native event delivery for port {port}: {e}; the main loop does it")
            else:
                with self.lock:
                    self.native[port] = hub
                return
        self.watch(in_fd, lambda: local.raise_port(port, local.evtchn.notify_vcpu(port)))

    def drop(self, port: int) -> None:
        with self.lock:
            fds = self.links.pop(port, None)
            hub = self.native.pop(port, None)
        if fds:
            if hub is not None:
                hub.unwatch_close(port, fds[0])
            else:
                self.unwatch(fds[0])
                os.close(fds[0])
            os.close(fds[1])

    def unbind(self, local: Domain, lport: int, remote_dom: int, remote_port: int) -> None:
        self.drop(lport)
        if remote_dom == local.domid:
            local.evtchn.remote_closed(remote_port, local.domid)
            return
        try:
            self._ask(op="evtchn-unbind", domain=remote_dom, from_dom=local.domid, port=remote_port)
        except XenError:
            pass


def _signal(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except OSError:
        pass  # the other side is gone: Xen drops events to dead domains too
