"""How a domain reaches other domains: their memory and their event channels.

Every domain lives in its own process under the toolstack, so "the other
domain" is not an object here but a :class:`Directory` entry:

* :meth:`Directory.peer` gives a :class:`PeerMemory`, the other domain's RAM
  memfd mapped into this process (grant maps and copies read and write it
  directly, checking the granter's grant table in that same memory);
* :meth:`Directory.bind` connects one of our event-channel ports to a port
  the other domain left unbound for us, and returns the function that raises
  the other end.  Delivery never goes through the daemon: across processes
  each direction is an eventfd shared by the two domain processes.

:class:`LocalDirectory` serves domains in the same process (tests, the
in-process API); ``pyxen.toolstack.domproc`` provides the multi-process one.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import abi
from ..abi import XenError
from . import atomic
from . import machine as M

if TYPE_CHECKING:
    from .domain import Domain

PEER_MAGIC = 0x50595850
# peer page: magic u32, grant-table nr_frames u32, nr_pages u64
PEER_HDR = struct.Struct("<IIQ")


class PeerMemory:
    """Another domain's RAM and Xen-heap as this process sees them."""

    def __init__(self, domid: int, buf: mmap.mmap, fd: int, max_pages: int,
                 owned: bool = False) -> None:
        self.domid = domid
        self.buf = buf
        self.fd = fd  # the memfd, for mapping pages into a grant window
        self.max_pages = max_pages
        self.addr = atomic.address_of(buf)
        self._owned = owned
        magic, _, self.nr_pages = PEER_HDR.unpack_from(buf, self.xh(M.XH_PEER))
        if magic != PEER_MAGIC:
            raise XenError(abi.ESRCH, f"domain {domid}: no peer header in its memory")

    def xh(self, index: int) -> int:
        return (self.max_pages + index) << 12

    @property
    def grant_frames(self) -> int:
        return int(PEER_HDR.unpack_from(self.buf, self.xh(M.XH_PEER))[1])

    def grant_entry_offset(self, ref: int) -> int:
        return self.xh(M.XH_GRANT) + ref * 8

    def ram_offset(self, mfn: int) -> int | None:
        """Offset of machine frame ``mfn`` if it is one of the peer's RAM pages."""
        pfn = mfn - M.MFN_BASE
        if 0 <= pfn < self.nr_pages:
            return pfn << 12
        return None

    def mark_dirty(self, pfn: int) -> None:
        """Record in the peer's own dirty bitmap that we wrote its page ``pfn``."""
        atomic.fetch_or64(self.addr + self.xh(M.XH_DIRTY) + (pfn >> 6) * 8, 1 << (pfn & 63))

    def close(self) -> None:
        if self._owned:
            self.buf.close()
            os.close(self.fd)


def write_peer_header(domain: Domain) -> None:
    m = domain.machine
    PEER_HDR.pack_into(m.ram, m.xenheap_offset(M.XH_PEER), PEER_MAGIC, domain.gnttab.nr_frames,
                       domain.nr_pages)


class Directory(ABC):
    """The other domains, as far as this domain's hypervisor needs them."""

    @abstractmethod
    def peer(self, domid: int) -> PeerMemory:
        """The memory of domain ``domid`` (XenError(ESRCH) if there is none)."""

    @abstractmethod
    def bind(self, local: Domain, lport: int, remote_dom: int, remote_port: int) -> Callable[[], None]:
        """Bind ``remote_port`` of ``remote_dom`` (unbound, for us) to our ``lport``;
        returns the function that raises the remote end."""

    @abstractmethod
    def unbind(self, local: Domain, lport: int, remote_dom: int, remote_port: int) -> None:
        """Our end ``lport`` closed: the remote port becomes unbound again."""


class LocalDirectory(Directory):
    """Domains living in this process (tests and in-process use)."""

    def __init__(self) -> None:
        self.domains: dict[int, Domain] = {}
        self.lock = threading.Lock()
        self.peers: dict[int, PeerMemory] = {}

    def register(self, d: Domain) -> None:
        with self.lock:
            self.domains[d.domid] = d

    def forget(self, d: Domain) -> None:
        with self.lock:
            if self.domains.get(d.domid) is d:
                del self.domains[d.domid]
            others = list(self.domains.values())
        for other in others:
            other.peer_gone(d.domid)

    def _get(self, domid: int) -> Domain:
        d = self.domains.get(domid)
        if d is None or d.dying:
            raise XenError(abi.ESRCH, f"no domain {domid}")
        return d

    def peer(self, domid: int) -> PeerMemory:
        d = self._get(domid)
        return PeerMemory(domid, d.machine.ram, d.machine.memfd, d.machine.max_pages)

    def bind(self, local: Domain, lport: int, remote_dom: int, remote_port: int) -> Callable[[], None]:
        remote = self._get(remote_dom)
        remote.evtchn.accept_interdomain(
            remote_port, local.domid, lport,
            lambda: local.raise_port(lport, local.evtchn.notify_vcpu(lport)))
        return lambda: remote.raise_port(remote_port, remote.evtchn.notify_vcpu(remote_port))

    def unbind(self, local: Domain, lport: int, remote_dom: int, remote_port: int) -> None:
        remote = self.domains.get(remote_dom)
        if remote is not None:
            remote.evtchn.remote_closed(remote_port, local.domid)


default_directory = LocalDirectory()
"""Where domains created in this process find each other unless told otherwise."""
