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

import ctypes
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
# peer page: magic u32, grant-table nr_frames u32, nr_pages u64.  Written by
# the domain's own hypervisor; readers take only the grant-table size from it
# and clamp it (the sizes that bound memory accesses come from the daemon and
# the memfd itself, see PeerMemory).
PEER_HDR = struct.Struct("<IIQ")

# A page-type word (one u32 per RAM page, XenHeap.types): the low bits hold
# the type the owning domain's FrameTable gave the page when that type is one
# that forbids writes (L1-L4 page table, segment descriptors), the bits above
# count writable holds taken by grant maps, grant copies and host backends.
# The two never coexist: the owner's claim is a CAS from 0, a writable hold a
# CAS that requires the low bits clear.
TW_TYPE_MASK = 0x7
TW_HOLD = 0x8
TW_MAX = 0xFFFFFFFF - TW_HOLD
# An active grant entry (one u64 per grant ref, XenHeap.active), Xen's
# active_grant_entry for writable uses: the frame the writable type hold was
# taken on (latched for as long as the entry is held, as Xen's act->frame),
# how many writable uses hold it, and the domain holding them.
AE_COUNT = 1 << 32
AE_COUNT_MAX = 0xFFFF


class TypeWords:
    """The page-type words of one domain, at host address ``addr``.

    Every change is a compare-and-swap, so the owner's vCPU thread, other
    domains' processes (grant maps and copies through PeerMemory) and native
    backend threads without the GIL (pyxen/native/gnt.c) agree without a lock.
    """

    def __init__(self, addr: int, nr_pages: int) -> None:
        self.addr = addr
        self.nr_pages = nr_pages

    def word(self, pfn: int) -> int:
        return atomic.load32(self.addr + pfn * 4) if 0 <= pfn < self.nr_pages else 0

    def claim(self, pfn: int, t: int) -> bool:
        """The owner's type count goes 0 -> 1 with a type that forbids writes:
        fails if the page is not RAM or a writable hold exists ("bad type")."""
        if not 0 <= pfn < self.nr_pages:
            return False
        ok, _ = atomic.cas32(self.addr + pfn * 4, 0, t & TW_TYPE_MASK)
        return ok

    def unclaim(self, pfn: int) -> None:
        """The owner's count of that type went back to 0."""
        if not 0 <= pfn < self.nr_pages:
            return
        a = self.addr + pfn * 4
        w = atomic.load32(a)
        while w & TW_TYPE_MASK:
            ok, w = atomic.cas32(a, w, w & ~TW_TYPE_MASK)
            if ok:
                return

    def hold(self, pfn: int) -> bool:
        """Take a writable hold: fails while the owner uses the page as a page
        table or descriptor page (Xen's get_page_type(PGT_writable_page))."""
        if not 0 <= pfn < self.nr_pages:
            return False
        a = self.addr + pfn * 4
        w = atomic.load32(a)
        while True:
            if w & TW_TYPE_MASK or w > TW_MAX:
                return False
            ok, w = atomic.cas32(a, w, w + TW_HOLD)
            if ok:
                return True

    def unhold(self, pfn: int) -> None:
        if not 0 <= pfn < self.nr_pages:
            return
        a = self.addr + pfn * 4
        w = atomic.load32(a)
        while w >= TW_HOLD:
            ok, w = atomic.cas32(a, w, w - TW_HOLD)
            if ok:
                return


class ActiveGrants:
    """The writable uses of one domain's grant refs (XenHeap.active), shared by
    every process that writes through them.

    The first writable use of a ref takes a writable hold on its frame and
    records frame, count and user; later ones reuse that frame (whatever the
    guest writes into the entry meanwhile) and the last one drops the hold.
    Kept in the granter's memory so that the granter can give back the holds
    of a mapper that died without unmapping (``drop_domain``)."""

    def __init__(self, addr: int, nr_refs: int, types: TypeWords) -> None:
        self.addr = addr
        self.nr_refs = nr_refs
        self.types = types

    def hold(self, ref: int, me: int, pfn: int) -> int | None:
        """One more writable use of ``ref`` by domain ``me``: the pfn to write
        (``pfn`` on the first use), None if the type rules refuse it."""
        if not 0 <= ref < self.nr_refs:
            return None
        a = self.addr + ref * 8
        w = atomic.load64(a)
        while True:
            if w == 0:
                if not self.types.hold(pfn):
                    return None
                ok, w = atomic.cas64(a, 0, pfn | AE_COUNT | (me << 48))
                if ok:
                    return pfn
                self.types.unhold(pfn)
                continue
            if w >> 48 != me or (w >> 32) & 0xFFFF >= AE_COUNT_MAX:
                return None
            ok, w = atomic.cas64(a, w, w + AE_COUNT)
            if ok:
                return w & 0xFFFFFFFF

    def unhold(self, ref: int) -> None:
        if not 0 <= ref < self.nr_refs:
            return
        a = self.addr + ref * 8
        w = atomic.load64(a)
        while (w >> 32) & 0xFFFF:
            last = (w >> 32) & 0xFFFF == 1
            ok, w2 = atomic.cas64(a, w, 0 if last else w - AE_COUNT)
            if ok:
                if last:
                    self.types.unhold(w & 0xFFFFFFFF)
                return
            w = w2

    def holder(self, ref: int) -> tuple[int, int, int]:
        """(pfn, count, domid) of ``ref``'s writable uses (tests, dumps)."""
        w = atomic.load64(self.addr + ref * 8) if 0 <= ref < self.nr_refs else 0
        return w & 0xFFFFFFFF, (w >> 32) & 0xFFFF, w >> 48

    def drop_domain(self, domid: int, nr_refs: int) -> int:
        """Domain ``domid`` is gone: its writable uses went with it."""
        n = 0
        for ref in range(min(nr_refs, self.nr_refs)):
            a = self.addr + ref * 8
            w = atomic.load64(a)
            while w and w >> 48 == domid:
                ok, w = atomic.cas64(a, w, 0)
                if ok:
                    self.types.unhold(w & 0xFFFFFFFF)
                    n += 1
                    break
        return n


class PeerMemory:
    """Another domain's RAM and Xen-heap as this process sees them.

    Every size that bounds an access comes from outside the peer's memory:
    ``max_pages`` and ``nr_pages`` from the daemon's record of the domain (or
    the Domain object itself in-process), checked against the memfd's real
    size, which the owner sealed (machine.RAM_SEALS) so that it cannot shrink
    under us.  The grant-table size in the peer header is clamped to
    MAX_GRANT_FRAMES, so a forged header can at worst make refs of the
    granter's own table valid or invalid, never reach outside it.
    """

    def __init__(self, domid: int, buf: mmap.mmap, fd: int, max_pages: int,
                 owned: bool = False, nr_pages: int | None = None) -> None:
        self.domid = domid
        self.buf = buf
        self.fd = fd  # the memfd, for mapping pages into a grant window
        self.max_pages = max_pages
        self._owned = owned
        self.layout = M.XenHeap(max_pages)
        if max_pages <= 0 or len(buf) < self.layout.ram_bytes:
            raise XenError(abi.ESRCH, f"domain {domid}: its memory ({len(buf)} bytes) is smaller "
                           f"than {max_pages} pages need")
        self.addr = atomic.address_of(buf)
        self.nr_pages = max_pages if nr_pages is None else max(0, min(nr_pages, max_pages))
        magic = PEER_HDR.unpack_from(buf, self.xh(M.XH_PEER))[0]
        if magic != PEER_MAGIC:
            raise XenError(abi.ESRCH, f"domain {domid}: no peer header in its memory")
        self.types = TypeWords(self.addr + self.xh(self.layout.types), max_pages)
        self.active = ActiveGrants(self.addr + self.xh(self.layout.active), M.MAX_GRANT_REFS,
                                   self.types)
        # This process's uses of each ref's GTF_reading/GTF_writing (grant maps
        # and copies): the bits drop with the last one.  A C array, so that the
        # native copy batch (gnt.c pxc_copy) counts in the same place; changed
        # only under the using GrantTables' lock.
        self.counts = (ctypes.c_uint32 * M.MAX_GRANT_REFS)()
        self.native: object = None  # GrantTables' native view of this peer (PxcPeer)
        # Every access goes through raw addresses (atomics), so the mapping must
        # outlive its users: grant ops and mappings hold a use; close() after
        # the peer died only unmaps once the last use is gone.
        self._lock = threading.Lock()
        self._users = 0
        self._dead = False

    def xh(self, index: int) -> int:
        return (self.max_pages + index) << 12

    @property
    def grant_frames(self) -> int:
        n = int(PEER_HDR.unpack_from(self.buf, self.xh(M.XH_PEER))[1])
        return min(n, M.MAX_GRANT_FRAMES)

    def grant_entry_offset(self, ref: int) -> int:
        """Offset of grant entry ``ref``; callers check ``ref`` against
        grant_frames first, this bound keeps every caller inside the table."""
        if not 0 <= ref < M.MAX_GRANT_REFS:
            raise XenError(abi.EINVAL, f"grant ref {ref} beyond any grant table")
        return self.xh(M.XH_GRANT) + ref * 8

    def ram_offset(self, mfn: int) -> int | None:
        """Offset of machine frame ``mfn`` if it is one of the peer's RAM pages."""
        pfn = mfn - M.MFN_BASE
        if 0 <= pfn < self.nr_pages:
            return pfn << 12
        return None

    def mark_dirty(self, pfn: int) -> None:
        """Record in the peer's own dirty bitmap that we wrote its page ``pfn``."""
        if 0 <= pfn < self.max_pages:
            atomic.fetch_or64(self.addr + self.xh(M.XH_DIRTY) + (pfn >> 6) * 8, 1 << (pfn & 63))

    def use(self) -> bool:
        """Take a use (False once the peer is closed): while held, the memory
        stays mapped, even if the peer dies meanwhile."""
        with self._lock:
            if self._dead:
                return False
            self._users += 1
            return True

    def unuse(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._dead and self._users == 0
        if last:
            self._unmap()

    def close(self) -> None:
        with self._lock:
            self._dead = True
            idle = self._users == 0
        if idle:
            self._unmap()

    def _unmap(self) -> None:
        if self._owned:
            self.buf.close()
            os.close(self.fd)


def domain_types(domain: Domain) -> TypeWords:
    """The type words of a domain of this process (its FrameTable publishes in them)."""
    m = domain.machine
    return TypeWords(atomic.address_of(m.ram) + m.xenheap_offset(m.xh.types), m.max_pages)


def write_peer_header(domain: Domain) -> None:
    m = domain.machine
    PEER_HDR.pack_into(m.ram, m.xenheap_offset(M.XH_PEER), PEER_MAGIC, domain.gnttab.nr_frames,
                       domain.nr_pages)


class Directory(ABC):
    """The other domains, as far as this domain's hypervisor needs them."""

    @abstractmethod
    def peer(self, domid: int, requester: int = -1) -> PeerMemory:
        """The memory of domain ``domid`` for domain ``requester``: XenError(ESRCH)
        if there is none, XenError(EPERM) if ``domid`` granted ``requester``
        nothing (the multi-process directory asks the granter's process)."""

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

    def peer(self, domid: int, requester: int = -1) -> PeerMemory:
        d = self._get(domid)  # one process: no boundary to check
        return PeerMemory(domid, d.machine.ram, d.machine.memfd, d.machine.max_pages,
                          nr_pages=d.nr_pages)

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
