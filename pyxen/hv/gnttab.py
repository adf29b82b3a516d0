"""Grant tables, version 1 (grant_table.h).

The granter's side is the guest's own business: it fills
``grant_entry_v1 {u16 flags; domid_t domid; u32 frame}`` entries in table
frames the hypervisor gives it (``GNTTABOP_setup_table``; Xen-heap frames
after shared_info).  The hypervisor acts for the *mapping* domain:

* ``map_grant_ref`` checks the granter's entry in the granter's own memory
  (reached through :class:`~pyxen.hv.interdomain.PeerMemory`): type
  ``GTF_permit_access``, granted to us, writable unless we map read-only;
  then sets ``GTF_reading`` (and ``GTF_writing``) with a compare-and-swap,
  as Xen does, so a granter that revokes concurrently either sees the bits
  (and must not reuse the page) or we see the revocation (and fail).  The
  page is mapped into our grant window (one page of our guest-physical
  space per mapping, ``machine.GRANT_GPA``) by mmap'ing the granter's memfd
  there, and with ``GNTMAP_host_map`` the PTE for ``host_addr`` is written
  by the hypervisor (the guest itself can never map those frames).
* ``unmap_grant_ref`` undoes it; the status bits drop when our last mapping
  of that reference goes, and the page is marked dirty in the granter's log.
* ``copy`` copies between our frames and granted frames (either side a
  grant), checking each grant for the duration of the copy.

Page types (Xen's get_page_type(PGT_writable_page)): every write into a
granter's frame (a writable map for as long as it lasts, a copy destination
for the copy, a host backend's write hold) first takes a writable hold on
the frame in the granter's page-type words (``interdomain.TypeWords``),
through the granter's active entry for that ref (``ActiveGrants``).  The hold
fails, with Xen's ``GNTST_general_error``, while the granter uses the frame
as a page table or descriptor page, and while it is held the granter cannot
give the frame such a type (``FrameTable.get_type`` answers ``-EINVAL``).
A read-only map or a copy source takes no type, as in Xen.

When a mapping domain goes away, the granter clears the status bits of
every entry it had granted to that domain (``peer_gone``): its mappings died
with its process.  Status codes are Xen's ``GNTST_*``.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import abi, native
from ..abi import XenError
from . import atomic
from . import machine as M
from .interdomain import PeerMemory, write_peer_header

if TYPE_CHECKING:
    from .domain import Domain
    from .vcpu import VCPU

GNTTABOP_map_grant_ref, GNTTABOP_unmap_grant_ref, GNTTABOP_setup_table = 0, 1, 2
GNTTABOP_dump_table, GNTTABOP_transfer, GNTTABOP_copy, GNTTABOP_query_size = 3, 4, 5, 6
GNTTABOP_unmap_and_replace, GNTTABOP_set_version, GNTTABOP_get_status_frames = 7, 8, 9
GNTTABOP_get_version = 10
GTF_permit_access, GTF_type_mask = 1, 3
GTF_readonly, GTF_reading, GTF_writing = 1 << 2, 1 << 3, 1 << 4
GNTMAP_device_map, GNTMAP_host_map, GNTMAP_readonly = 1, 2, 4
GNTMAP_application_map, GNTMAP_contains_pte = 8, 16
GNTMAP_guest_avail0 = 16  # _GNTMAP_guest_avail0: the first flag bit copied into the PTE
GNTCOPY_source_gref, GNTCOPY_dest_gref = 1, 2
GNTST_okay, GNTST_general_error, GNTST_bad_domain, GNTST_bad_gntref = 0, -1, -2, -3
GNTST_bad_handle, GNTST_bad_virt_addr, GNTST_bad_dev_addr = -4, -5, -6
GNTST_permission_denied, GNTST_bad_page, GNTST_bad_copy_arg = -8, -9, -10
GNTST_eagain, GNTST_no_space = -12, -13

SETUP_TABLE = struct.Struct("<HxxIhxxxxxxQ")  # dom, nr_frames, status, frame_list
QUERY_SIZE = struct.Struct("<HxxIIh2x")  # dom, nr_frames, max_nr_frames, status
MAP_GRANT_REF = struct.Struct("<QIIHhIQ")  # host_addr, flags, ref, dom, status, handle, dev_bus_addr
UNMAP_GRANT_REF = struct.Struct("<QQIh2x")  # host_addr, dev_bus_addr, handle, status
COPY_PTR = struct.Struct("<QHH4x")  # union {ref, gmfn}, domid, offset
COPY = struct.Struct("<QHH4xQHH4xHHh2x")  # source, dest, len, flags, status
assert SETUP_TABLE.size == 24 and QUERY_SIZE.size == 16 and MAP_GRANT_REF.size == 32
assert UNMAP_GRANT_REF.size == 24 and COPY.size == 40
ENTRIES_PER_FRAME = 512
# pyxen/native/native.h: why pxg_acquire refused
_PXG_E_RANGE, _PXG_E_PERM, _PXG_E_RDONLY, _PXG_E_FRAME, _PXG_E_BUSY, _PXG_E_TYPE = -1, -2, -3, -4, -5, -6
DEFAULT_GRANT_FRAMES = 4
# after another domain refused us its memory (it granted us nothing), ops on
# it fail without asking its process again until our guest hears something
# new (GrantTables._news), and at most for this long
REFUSAL_HOLD_S = 0.5

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
MAP_FIXED = 0x10


def _map_fixed(addr: int, prot: int, flags: int, fd: int, offset: int) -> None:
    r = _mmap(addr, 4096, prot, flags | MAP_FIXED, fd, offset)
    if r is None or r == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "mmap of a grant page failed")


@dataclass
class Mapping:
    peer: PeerMemory
    ref: int
    readonly: bool
    slot: int  # page index in our grant window
    host_addr: int  # VA whose PTE we wrote (0: none)
    pte_maddr: int  # machine address of that PTE
    pfn: int  # the granter's page mapped (for a writable map: held writable)


class GrantTables:
    """One domain's grant table (as granter) and maptrack (as mapper)."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.nr_frames = 0
        self.max_frames = M.MAX_GRANT_FRAMES
        self.maptrack: dict[int, Mapping] = {}
        # the in-process backend's uses of our own refs (host_acquire); the
        # uses of a granter's refs by our guest are counted in PeerMemory.counts
        self.active: dict[tuple[int, int], int] = {}
        self.free_slots = list(range(M.GRANT_WINDOW_PAGES - 1, -1, -1))
        self.next_handle = 0
        self.lock = threading.RLock()
        self.peers: dict[int, PeerMemory] = {}
        self.stats = {"maps": 0, "unmaps": 0, "copies": 0, "copy_bytes": 0}
        self._pxg: int | None = None  # native holds (host_grants)
        self._host_wheld: set[int] = set()  # refs the Python host path holds writable
        # peer domid -> (our _news() when it refused us, until when that refusal holds)
        self._refused: dict[int, tuple[int, float]] = {}
        # the native copy's buffers, one set per vCPU (vCPU threads copy at once:
        # between the walk that fills them and pxc_copy, Python may switch threads)
        self._native_copy: dict[int, _NativeCopy] = {}

    # ------------------------------------------------------------ granter side
    def frame_mfns(self) -> list[int]:
        base = self.domain.machine.xenheap_mfn + M.XH_GRANT
        return [base + i for i in range(self.nr_frames)]

    def setup(self, nr: int) -> list[int]:
        if nr > self.max_frames:
            raise XenError(abi.EINVAL, f"{nr} grant frames (max {self.max_frames})")
        with self.lock:
            self.nr_frames = max(self.nr_frames, nr)
            write_peer_header(self.domain)
            return self.frame_mfns()[:nr]

    def owns_frame(self, mfn: int) -> bool:
        first = self.domain.machine.xenheap_mfn + M.XH_GRANT
        return first <= mfn < first + self.nr_frames

    def peer_gone(self, domid: int) -> None:
        """A domain died: its mappings of our grants went with it."""
        m = self.domain.machine
        base = atomic.address_of(m.ram) + m.xenheap_offset(M.XH_GRANT)
        for ref in range(self.nr_frames * ENTRIES_PER_FRAME):
            flags, dom = struct.unpack_from("<HH", m.ram, m.xenheap_offset(M.XH_GRANT) + ref * 8)
            if dom == domid and flags & (GTF_reading | GTF_writing):
                atomic.fetch_and16(base + ref * 8, ~(GTF_reading | GTF_writing) & 0xFFFF)
        # and so did its writable holds on our frames (Xen relinquishes its maps)
        if domid != self.domain.domid:
            own = self._find_peer(self.domain.domid)
            n = own.active.drop_domain(domid, self.nr_frames * ENTRIES_PER_FRAME)
            if n:
                self.domain.log(f"domain {domid} went away holding {n} writable grants: released")
        with self.lock:
            p = self.peers.pop(domid, None)
            kept = sum(1 for mp in self.maptrack.values() if mp.peer is p) if p else 0
        if p is not None:
            if kept:  # its memory stays mapped here until they are unmapped
                self.domain.log(f"domain {domid} went away: {kept} mappings of its pages "
                                "stay until unmapped")
            p.close()

    # ------------------------------------------------------------ mapper side
    def _peer(self, domid: int) -> PeerMemory:
        """Domain ``domid``'s memory (ours for DOMID_SELF).  The caller owns one
        use of it (PeerMemory.use) and must give it back with ``unuse``."""
        while True:
            p = self._find_peer(domid)
            if p.use():
                return p
            with self.lock:  # closed under us (the peer died): forget it, ask again
                if self.peers.get(p.domid) is p:
                    del self.peers[p.domid]

    def _find_peer(self, domid: int) -> PeerMemory:
        d = self.domain
        if domid in (abi.DOMID_SELF, d.domid):
            domid = d.domid
        with self.lock:
            if domid == d.domid and domid not in self.peers:
                self.peers[domid] = PeerMemory(domid, d.machine.ram, d.machine.memfd,
                                               d.machine.max_pages, nr_pages=d.nr_pages)
            p = self.peers.get(domid)
            if p is not None:
                return p
            held = self._refused.get(domid)
            if held is not None and held[0] == self._news() and time.monotonic() < held[1]:
                raise XenError(abi.EPERM, f"domain {domid} granted us nothing (asked just now)")
        try:
            p = d.directory.peer(domid, d.domid)
        except XenError as e:
            if e.errno == abi.EPERM:  # ask again after news, not on every op a guest sends
                with self.lock:
                    self._refused[domid] = (self._news(), time.monotonic() + REFUSAL_HOLD_S)
            raise
        with self.lock:
            q = self.peers.setdefault(domid, p)
        if q is not p:
            p.close()
        return q

    def _news(self) -> int:
        """A count that moves whenever our guest may have learnt something new:
        events delivered to it (upcalls, and events from other domain
        processes, which the native hub counts even when the guest polls),
        and its own sends (a xenstore request is one: the answer may name
        the grant, and a guest that finds an event pending while it unmasks
        runs its handler without an upcall).

        Why this and not a generation of the granter's table: a granter's
        guest grants by writing its table, with no hypercall, so nothing in
        any hypervisor sees the change, and a domain that refused us never gave
        us its memory, so we cannot read its table either.  What we can see is
        the only way a guest learns that a grant now exists: an event (the
        granter's notify, a xenstore reply or watch, a timer after a sleep).  So
        a refusal stands for the ops a guest sends back to back (a batch of
        maps asks once, not 96 times), and the first op after news asks
        again: a retry after the grant, once the guest was told of it, succeeds
        at once.  REFUSAL_HOLD_S still bounds a refusal for a guest that
        learns some other way."""
        d = self.domain
        n = d.evtchn.sends
        for v in d.vcpus:
            n += v.stats["events"]
        hub = d.evtchn.hub
        if hub is not None:
            n += hub.events
        return n

    def _peer_status(self, e: XenError) -> int:
        """A peer we cannot reach: gone (GNTST_bad_domain) or it granted us
        nothing (GNTST_general_error, what its grant entries would say)."""
        return GNTST_general_error if e.errno == abi.EPERM else GNTST_bad_domain

    def grants_to(self, domid: int) -> bool:
        """Has our guest a live grant (GTF_permit_access) for ``domid``?  What a
        domain process asks before letting another one map our memory."""
        m = self.domain.machine
        off = m.xenheap_offset(M.XH_GRANT)
        n = min(self.nr_frames, M.MAX_GRANT_FRAMES) * ENTRIES_PER_FRAME
        words = m.ram_view[off:off + n * 8].cast("I")
        try:
            want = (domid << 16) | GTF_permit_access
            return any(words[2 * i] & ((0xFFFF << 16) | GTF_type_mask) == want for i in range(n))
        finally:
            words.release()

    def _acquire(self, p: PeerMemory, ref: int, readonly: bool, me: int | None = None) -> int:
        """Set GTF_reading/GTF_writing on the granter's entry; return its frame."""
        if not 0 <= ref < p.grant_frames * ENTRIES_PER_FRAME:
            raise _Gnt(GNTST_bad_gntref, f"grant ref {ref} beyond domain {p.domid}'s table")
        off = p.grant_entry_offset(ref)
        addr = p.addr + off
        me = self.domain.domid if me is None else me
        want = GTF_reading | (0 if readonly else GTF_writing)
        word = atomic.load32(addr)
        while True:
            flags, dom = word & 0xFFFF, word >> 16
            # Xen's _set_status_v1: both refusals are GNTST_general_error
            if flags & GTF_type_mask != GTF_permit_access or dom != me:
                raise _Gnt(GNTST_general_error,
                           f"grant ref {ref} of domain {p.domid} is not granted to domain {me}")
            if not readonly and flags & GTF_readonly:
                raise _Gnt(GNTST_general_error, f"attempt to write-map read-only grant ref {ref}")
            ok, word = atomic.cas32(addr, word, word | want)
            if ok:
                break
        frame = int(struct.unpack_from("<I", p.buf, off + 4)[0])
        return frame

    def _hold_writable(self, p: PeerMemory, ref: int, frame: int, me: int | None = None) -> int:
        """A writable use of granted ``frame`` (Xen: get_page_type(PGT_writable_page)):
        the pfn to write (the one the ref's first writable use latched).  Refused
        with GNTST_general_error while the granter uses the frame as a page table
        or descriptor page; GNTST_bad_page if it is not one of its RAM pages."""
        if p.ram_offset(frame) is None:
            raise _Gnt(GNTST_bad_page, f"grant {ref} of domain {p.domid} names frame {frame:#x}")
        pfn = p.active.hold(ref, self.domain.domid if me is None else me, frame - M.MFN_BASE)
        if pfn is None:
            raise _Gnt(GNTST_general_error,
                       f"grant {ref} of domain {p.domid}: frame {frame:#x} is a page table or "
                       "descriptor page (or held writable by another domain): not writable")
        return pfn

    def _count(self, p: PeerMemory, ref: int) -> None:
        """One more use of the status bits ``_acquire`` set on ``ref``."""
        with self.lock:
            p.counts[ref] += 1

    def _release(self, p: PeerMemory, ref: int, readonly: bool) -> None:
        """One use of ``ref`` ends; its status bits drop with the last one."""
        with self.lock:
            n = p.counts[ref] - 1
            p.counts[ref] = max(n, 0)
            if n > 0:
                return
        atomic.fetch_and16(p.addr + p.grant_entry_offset(ref), ~(GTF_reading | GTF_writing) & 0xFFFF)

    def _unhold(self, key: tuple[int, int], entry_addr: int) -> bool:
        """One use of a grant ends; the status bits drop with the last one (True)."""
        with self.lock:
            n = self.active.get(key, 0) - 1
            if n > 0:
                self.active[key] = n
                return False
            self.active.pop(key, None)
        atomic.fetch_and16(entry_addr, ~(GTF_reading | GTF_writing) & 0xFFFF)
        return True

    def map(self, v: VCPU, host_addr: int, flags: int, ref: int, dom: int) -> tuple[int, int, int]:
        """GNTTABOP_map_grant_ref: (status, handle, dev_bus_addr)."""
        d = self.domain
        if not flags & (GNTMAP_host_map | GNTMAP_device_map):
            return GNTST_bad_virt_addr if flags & GNTMAP_host_map else GNTST_general_error, 0, 0
        if flags & GNTMAP_contains_pte:
            return GNTST_general_error, 0, 0  # host_addr as a PTE address: not supported
        readonly = bool(flags & GNTMAP_readonly)
        pte = 0
        if flags & GNTMAP_host_map:
            host_addr &= ~0xFFF  # as Xen: the page that contains host_addr
            try:
                pte = d.ft.l1_entry_for(v.current_l4, host_addr)
            except XenError:
                return GNTST_bad_virt_addr, 0, 0
        try:
            p = self._peer(dom)
        except XenError as e:
            d.log(f"grant map of d{dom} ref {ref}: {e.why}")
            return self._peer_status(e), 0, 0
        try:
            frame = self._acquire(p, ref, readonly)
        except _Gnt as e:
            d.log(f"grant map of d{dom} ref {ref}: {e.why}")
            p.unuse()
            return e.status, 0, 0
        self._count(p, ref)
        off = p.ram_offset(frame)
        if off is None:
            self._release(p, ref, readonly)
            p.unuse()
            return GNTST_bad_page, 0, 0
        pfn = frame - M.MFN_BASE
        if not readonly:
            try:
                pfn = self._hold_writable(p, ref, frame)
            except _Gnt as e:
                d.log(f"grant map of d{dom} ref {ref}: {e.why}")
                self._release(p, ref, readonly)
                p.unuse()
                return e.status, 0, 0
            off = pfn << 12
        with self.lock:
            slot = self.free_slots.pop() if self.free_slots else -1
            handle = self.next_handle
            self.next_handle += 1
        m = d.machine
        prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
        try:
            if slot < 0:
                raise OSError("grant window full")
            _map_fixed(m.grant_window_addr + slot * 4096, prot, mmap.MAP_SHARED, p.fd, off)
        except OSError as e:
            d.log(f"grant map of d{dom} ref {ref}: {e}")
            if slot >= 0:
                with self.lock:
                    self.free_slots.append(slot)
            if not readonly:
                p.active.unhold(ref)
            self._release(p, ref, readonly)
            p.unuse()
            return (GNTST_no_space if slot < 0 else GNTST_general_error), 0, 0
        alias = (M.GRANT_GPA >> 12) + slot
        if pte:
            old = d.ft.read_entry(pte)
            new = (alias << 12) | 0x1 | 0x4 | 0x20 | 0x40 | (0 if readonly else 0x2) | abi._PAGE_NX
            # XENFEAT_gnttab_map_avail_bits: flags bits 16.. go to the PTE's
            # software-available bits 9-11 (Xen's grant_to_pte_flags)
            new |= ((flags >> GNTMAP_guest_avail0) << 9) & 0xE00
            d.ft.replace_raw(pte, new, old)
        with self.lock:
            self.maptrack[handle] = Mapping(p, ref, readonly, slot, host_addr if pte else 0, pte, pfn)
        self.stats["maps"] += 1
        return GNTST_okay, handle, alias << 12

    def unmap(self, v: VCPU, host_addr: int, dev_bus_addr: int, handle: int) -> int:
        d = self.domain
        with self.lock:
            mp = self.maptrack.get(handle)
            if mp is None:
                return GNTST_bad_handle
            if host_addr and host_addr & ~0xFFF != mp.host_addr:
                return GNTST_bad_virt_addr
            del self.maptrack[handle]
        alias = (M.GRANT_GPA >> 12) + mp.slot
        if mp.pte_maddr and host_addr:
            cur = d.ft.read_entry(mp.pte_maddr)
            if (cur & abi.PADDR_MASK) >> 12 == alias and cur & 1:
                d.ft.replace_raw(mp.pte_maddr, 0, cur)
        m = d.machine
        _map_fixed(m.grant_window_addr + mp.slot * 4096, mmap.PROT_READ | mmap.PROT_WRITE,
                   mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, -1, 0)
        with self.lock:
            self.free_slots.append(mp.slot)
        self._drop(mp)
        self.stats["unmaps"] += 1
        return GNTST_okay

    def _drop(self, mp: Mapping) -> None:
        """A mapping is gone from the window: the granter's page is dirty (if it
        was writable) and no longer held; the mapping's use of the peer ends."""
        if not mp.readonly:
            mp.peer.mark_dirty(mp.pfn)
            mp.peer.active.unhold(mp.ref)
        self._release(mp.peer, mp.ref, mp.readonly)
        mp.peer.unuse()

    def copy_one(self, raw: bytes) -> int:
        """One gnttab_copy; returns its status."""
        s_u, s_dom, s_off, d_u, d_dom, d_off, length, flags, _ = COPY.unpack(raw)
        if s_off + length > 4096 or d_off + length > 4096:
            return GNTST_bad_copy_arg
        undo: list[Callable[[], None]] = []
        try:
            try:
                src = self._copy_side(s_u, s_dom, bool(flags & GNTCOPY_source_gref), True, undo)
                dst = self._copy_side(d_u, d_dom, bool(flags & GNTCOPY_dest_gref), False, undo)
            except _Gnt as e:
                if e.status == GNTST_general_error:
                    self.domain.log(f"grant copy: {e.why}")
                return e.status
            sbuf, soff, _ = src
            dbuf, doff, dmark = dst
            dbuf[doff + d_off:doff + d_off + length] = sbuf[soff + s_off:soff + s_off + length]
            dmark()
        finally:
            for f in reversed(undo):
                f()
        self.stats["copies"] += 1
        self.stats["copy_bytes"] += length
        return GNTST_okay

    def copy_batch(self, v: VCPU, uop: int, count: int) -> int:
        """GNTTABOP_copy of ``count`` ops at guest address ``uop``: each op's
        status goes into its struct; the hypercall's result (0, or -EFAULT
        through XenError when an op cannot be read or its status written).

        The ops go to the native library a chunk at a time (``pxc_copy``, one
        call per chunk, the checks of :meth:`copy_one` in C); a chunk that
        needs anything unusual (no native library, dirty logging on, the op
        array not writable guest memory, pages the guest gave back, more than
        a few granters) is done op by op by :meth:`copy_one`, the reference."""
        lib = native.fast()
        done = 0
        while done < count:
            n = min(count - done, COPY_CHUNK)
            a = uop + done * COPY.size
            k = self._copy_native(v, lib, a, n) if lib is not None else 0
            for i in range(k, n):  # what C left: all of it, or from an op that changed under it
                ai = a + i * COPY.size
                status = self.copy_one(v.copy_from_guest(ai, COPY.size))
                v.copy_to_guest(ai + 36, struct.pack("<h", status))
            done += n
        return 0

    def _copy_native(self, v: VCPU, lib: ctypes.PyDLL, uop: int, n: int) -> int:
        """``n`` copy ops at ``uop`` in one native call: how many it did (0 if
        the chunk needs the Python path; fewer than ``n`` if an op named a
        granter the scan had not seen: the guest rewrote the array meanwhile)."""
        d = self.domain
        if d.dirty_logging:  # own pages written go to host_dirty: Python's business
            return 0
        nc = self._native_copy.get(v.id)
        if nc is None:
            nc = self._native_copy[v.id] = _NativeCopy(d)
        # the op array: every page it spans, writable (the statuses go back)
        first = uop & 0xFFF
        npages = (first + n * COPY.size + 4095) >> 12
        if uop + n * COPY.size > 1 << 64 or npages > len(nc.pages):
            return 0
        page0 = uop - first
        nc.me.nr_pages = d.nr_pages
        # the page walk in C (mm.FrameTable.translate costs ~6 us a page);
        # anything unusual there: Python's own walk decides
        if lib.pxc_walk(nc.me_addr, v.current_l4, page0, npages, 1, nc.pages_addr, nc.walked_addr) < 0 \
                or (d.free_pfns and not d.free_pfns.isdisjoint(nc.walked[:5 * npages])):
            if not self._walk_python(v, nc, page0, npages):
                return 0
        me = d.domid
        nd = lib.pxc_scan(nc.pages_addr, first, n, me, nc.domids_addr, len(nc.domids),
                          nc.own_addr, nc.n_own_addr)
        if nd < 0:
            return 0
        if d.free_pfns and nc.n_own.value and not d.free_pfns.isdisjoint(
                u - M.MFN_BASE for u in nc.own[:nc.n_own.value]):
            return 0  # a gmfn the guest gave back: copy_one says bad_page
        used: list[PeerMemory] = []
        out = nc.out
        try:
            for k in range(nd):
                dom = nc.domids[k]
                try:
                    p = self._peer(dom)
                except XenError as e:
                    nc.peers[k] = native.PxcPeer(domid=dom, err=self._peer_status(e))
                    continue
                used.append(p)
                pv = p.native
                if not isinstance(pv, native.PxcPeer):
                    pv = p.native = _pxc_peer(p)
                pv.domid = dom
                pv.nr_refs = p.grant_frames * ENTRIES_PER_FRAME
                nc.peers[k] = pv
            for k in range(native.PXC_NOUT):
                out[k] = 0
            with self.lock:
                did = lib.pxc_copy(nc.me_addr, nc.peers_addr, nd, nc.pages_addr, first, n, nc.out_addr)
        finally:
            for p in used:
                p.unuse()
        self.stats["copies"] += out[native.PXC_COPIES]
        self.stats["copy_bytes"] += out[native.PXC_BYTES]
        if out[native.PXC_GENERAL_ERRORS]:
            d.log(f"grant copy: {out[native.PXC_GENERAL_ERRORS]} of {n} ops refused with "
                  f"GNTST_general_error (the first: op {out[native.PXC_FIRST_GENERAL_ERROR]})")
        return int(did)

    def _walk_python(self, v: VCPU, nc: _NativeCopy, page0: int, npages: int) -> bool:
        """The op array's pages through the reference walk (frames beyond
        nr_pages, the guest's given-back frames); False if one faults."""
        d = self.domain
        ft, l4, ram_end = d.ft, v.current_l4, len(d.machine.ram)
        base = M.MFN_BASE << 12
        for k in range(npages):
            ma = ft.translate(l4, page0 + (k << 12), True)
            if ma is None:
                return False
            off = (ma & ~0xFFF) - base
            if not 0 <= off <= ram_end - 4096:
                return False
            nc.pages[k] = nc.ram + off
        return True

    def _copy_side(self, u: int, dom: int, is_ref: bool, reading: bool,
                   undo: list[Callable[[], None]]) -> tuple[mmap.mmap, int, Callable[[], None]]:
        d = self.domain
        if not is_ref:
            if dom not in (abi.DOMID_SELF, d.domid):
                raise _Gnt(GNTST_permission_denied, "copy from another domain's frame needs a grant")
            if not d.ft.owns(u) or not 0 <= u - M.MFN_BASE < d.nr_pages:
                raise _Gnt(GNTST_bad_page, f"frame {u:#x} is not ours")
            pfn = u - M.MFN_BASE
            if not reading:
                # Xen's __acquire_grant_for_copy: a copy destination, even our
                # own frame, takes a writable type for the copy
                types = self._find_peer(d.domid).types
                if not types.hold(pfn):
                    raise _Gnt(GNTST_general_error,
                               f"copy into frame {u:#x}: a page table or descriptor page")
                undo.append(lambda: types.unhold(pfn))
            return d.machine.ram, d.machine.ram_offset(u), (lambda: d.mark_dirty(u))
        u &= 0xFFFFFFFF  # union { grant_ref_t ref; xen_pfn_t gmfn; }: a ref is its low 32 bits
        try:
            p = self._peer(dom)
        except XenError as e:
            raise _Gnt(self._peer_status(e), e.why) from None
        undo.append(p.unuse)
        frame = self._acquire(p, u, reading)
        self._count(p, u)
        undo.append(lambda: self._release(p, u, reading))
        off = p.ram_offset(frame)
        if off is None:
            raise _Gnt(GNTST_bad_page, f"grant {u} names frame {frame:#x}")
        pfn = frame - M.MFN_BASE
        if not reading:
            pfn = self._hold_writable(p, u, frame)
            undo.append(lambda: p.active.unhold(u))
            off = pfn << 12
        return p.buf, off, (lambda: p.mark_dirty(pfn))

    # ------------------------------------------------------------ host backends
    def host_grants(self) -> int | None:
        """The native library's view of our grant table (``struct pxg *``), made
        on first use; None when the native library is not available.  Holds
        taken here and by the native block data path are counted together."""
        if self._pxg is None and native.fast() is not None:
            lib = native.fast()
            assert lib is not None
            d = self.domain
            m = d.machine
            ram = atomic.address_of(m.ram)
            with self.lock:
                if self._pxg is None:
                    self._pxg = lib.pxg_new(ram + m.xenheap_offset(M.XH_GRANT),
                                            M.MAX_GRANT_FRAMES * ENTRIES_PER_FRAME, ram, d.nr_pages,
                                            M.MFN_BASE, ram + m.xenheap_offset(M.XH_DIRTY),
                                            ram + m.xenheap_offset(m.xh.types), m.max_pages,
                                            ram + m.xenheap_offset(m.xh.active))
                    if not self._pxg:
                        raise MemoryError("native grant table")
                    lib.pxg_set_logdirty(self._pxg, int(d.dirty_logging))
        return self._pxg

    def host_acquire(self, ref: int, backend_domid: int, write: bool) -> int:
        """A backend in this process (acting as ``backend_domid``, dom0 for ours)
        wants to touch the page our guest granted it: validate and mark the
        entry exactly as a mapping would, and return the page's offset in our
        RAM.  Raises XenError(EPERM) if the grant does not allow it."""
        g = self.host_grants()
        if g is not None:
            off = int(native.fast().pxg_acquire(g, ref, backend_domid, int(write)))  # type: ignore[union-attr]
            if off >= 0:
                return off
            raise GrantRefused(_PXG_STATUS.get(off, GNTST_general_error),
                               self._host_refusal(off, ref, backend_domid))
        p = self._find_peer(self.domain.domid)
        try:
            frame = self._acquire(p, ref, not write, me=backend_domid)
        except _Gnt as e:
            raise GrantRefused(e.status, e.why) from None
        with self.lock:
            self.active[(-1, ref)] = self.active.get((-1, ref), 0) + 1
        where = p.ram_offset(frame)
        if where is None:
            self.host_release(ref)
            raise GrantRefused(GNTST_bad_page,
                               f"grant {ref} names frame {frame:#x}, not a page of the guest")
        if write:
            # one writable use per ref while the backend holds it (as gnt.c):
            # released with the ref's last hold
            with self.lock:
                if ref in self._host_wheld:
                    return p.active.holder(ref)[0] << 12
                try:
                    pfn = self._hold_writable(p, ref, frame, me=backend_domid)
                except _Gnt as e:
                    status, why = e.status, e.why
                else:
                    self._host_wheld.add(ref)
                    return pfn << 12
            self.host_release(ref)
            raise GrantRefused(status, why)
        return where

    def host_copy(self, ops: list[tuple[int, int, int, int, bool]], backend_domid: int) -> list[int]:
        """A backend's grant copy (netback's GNTTABOP_copy): each op
        ``(ref, offset, length, host_address, to_guest)`` copies ``length``
        bytes between our guest's granted page ``ref`` (at ``offset``) and host
        memory at ``host_address`` (the caller keeps it alive), into the guest
        if ``to_guest``.  Each grant is checked and held as :meth:`host_acquire`
        does for the copy only.  Returns each op's Xen status (``GNTST_*``).

        Natively one call for the whole list (``pxg_copy``, the GIL released);
        else op by op through host_acquire (the reference)."""
        n = len(ops)
        status = [GNTST_okay] * n
        g = self.host_grants()
        lib = native.lib()
        if g is not None and lib is not None and n:
            arr = (native.PxgCopyOp * n)()
            for i, (ref, off, length, buf, to_guest) in enumerate(ops):
                if not (0 <= off <= 0xFFFF and 0 <= length <= 0xFFFF and 0 <= ref < 1 << 32):
                    status[i] = GNTST_bad_copy_arg
                    arr[i].offset, arr[i].len = 4096, 1  # C says bad_copy_arg too
                    continue
                o = arr[i]
                o.ref, o.offset, o.len, o.buf, o.to_guest = ref, off, length, buf, int(to_guest)
            st = (ctypes.c_int16 * n)()
            lib.pxg_copy(g, arr, n, backend_domid, st)
            return list(st)
        d = self.domain
        ram = atomic.address_of(d.machine.ram)
        for i, (ref, off, length, buf, to_guest) in enumerate(ops):
            if not (0 <= off and 0 <= length and off + length <= 4096 and 0 <= ref < 1 << 32):
                status[i] = GNTST_bad_copy_arg
                continue
            try:
                where = self.host_acquire(ref, backend_domid, to_guest)
            except GrantRefused as e:
                status[i] = e.status
                continue
            try:
                if to_guest:
                    ctypes.memmove(ram + where + off, buf, length)
                    d.mark_dirty(M.MFN_BASE + (where >> 12))
                else:
                    ctypes.memmove(buf, ram + where + off, length)
            finally:
                self.host_release(ref)
        return status

    def _host_refusal(self, code: int, ref: int, me: int) -> str:
        d = self.domain
        if code == _PXG_E_RANGE:
            return f"grant ref {ref} beyond domain {d.domid}'s table"
        if code == _PXG_E_RDONLY:
            return f"attempt to write-map read-only grant ref {ref}"
        if code == _PXG_E_FRAME:
            off = d.machine.xenheap_offset(M.XH_GRANT) + ref * 8 + 4
            frame = struct.unpack_from("<I", d.machine.ram, off)[0]
            return f"grant ref {ref} names frame {frame:#x}, not a page of the guest"
        if code == _PXG_E_BUSY:
            return f"grant ref {ref} is held too many times"
        if code == _PXG_E_TYPE:
            return (f"grant ref {ref}: the frame is a page table or descriptor page (or held "
                    "writable by another domain): not writable")
        return f"grant ref {ref} of domain {d.domid} is not granted to domain {me}"

    def host_release(self, ref: int) -> None:
        if self._pxg is not None:
            native.fast().pxg_release(self._pxg, ref)  # type: ignore[union-attr]
            return
        p = self._find_peer(self.domain.domid)
        with self.lock:  # the last hold and the writable use go together (host_acquire)
            if self._unhold((-1, ref), p.addr + p.grant_entry_offset(ref)) \
                    and ref in self._host_wheld:  # -1: the in-process backend
                self._host_wheld.discard(ref)
                p.active.unhold(ref)

    def release_all(self) -> None:
        """The domain is going away: drop every mapping it holds."""
        with self.lock:
            maps = list(self.maptrack.items())
        for handle, mp in maps:
            with self.lock:
                self.maptrack.pop(handle, None)
            self._drop(mp)
        with self.lock:
            peers, self.peers = self.peers, {}
        for p in peers.values():
            p.close()


    # ------------------------------------------------------------ save / restore (migration)
    def save_state(self) -> dict[str, int]:
        """For PYXEN_DOMAIN_STATE: the table's size and how many of our grants
        other domains still had mapped.  Xen's stream carries no grant table:
        a restored domain gets a fresh one (version 1, entries empty) and the
        guest sets it up again and re-grants what its frontends need (Linux's
        gnttab_resume, blkfront's reconnect); maps of other domains' pages must
        be gone before a save (the page tables could not be normalised)."""
        with self.lock:
            return {"version": 1, "nr_frames": self.nr_frames, "max_frames": self.max_frames,
                    "mappings": len(self.maptrack)}


# copy ops per native call (their array spans at most 41 pages): one call for
# the batches guests send, bounded so a huge count needs no huge buffers
COPY_CHUNK = 4096
_COPY_MAX_PEERS = 8  # granters per chunk on the native path


class _NativeCopy:
    """Buffers of one domain's native copy path, made once (ctypes objects are
    slow to create; a batch only fills them)."""

    def __init__(self, d: Domain) -> None:
        m = d.machine
        self.ram = atomic.address_of(m.ram)
        self.me = native.PxcSelf(ram=self.ram, nr_pages=d.nr_pages, mfn_base=M.MFN_BASE,
                                 types=self.ram + m.xenheap_offset(m.xh.types),
                                 nr_types=m.max_pages, domid=d.domid)
        self.pages = (ctypes.c_void_p * ((COPY_CHUNK * COPY.size + 4095) // 4096 + 1))()
        self.domids = (ctypes.c_uint16 * _COPY_MAX_PEERS)()
        self.walked = (ctypes.c_uint64 * (5 * len(self.pages)))()  # pxc_walk's frames
        self.walked_addr = ctypes.addressof(self.walked)
        self.own = (ctypes.c_uint64 * (2 * COPY_CHUNK))()
        self.n_own = ctypes.c_uint32()
        self.peers = (native.PxcPeer * _COPY_MAX_PEERS)()
        self.out = (ctypes.c_uint64 * native.PXC_NOUT)()
        self.me_addr = ctypes.addressof(self.me)
        self.pages_addr = ctypes.addressof(self.pages)
        self.domids_addr = ctypes.addressof(self.domids)
        self.own_addr = ctypes.addressof(self.own)
        self.n_own_addr = ctypes.addressof(self.n_own)
        self.peers_addr = ctypes.addressof(self.peers)
        self.out_addr = ctypes.addressof(self.out)


def _pxc_peer(p: PeerMemory) -> native.PxcPeer:
    """The native view of a granter (its addresses never change while mapped)."""
    return native.PxcPeer(mem=p.addr, gt=p.addr + p.xh(M.XH_GRANT),
                          counts=ctypes.addressof(p.counts), types=p.types.addr,
                          active=p.active.addr, dirty=p.addr + p.xh(M.XH_DIRTY),
                          nr_pages=p.nr_pages, max_pages=p.max_pages, nr_refs=0,
                          max_refs=M.MAX_GRANT_REFS, domid=p.domid, err=0)


class GrantRefused(XenError):
    """A host backend may not use a grant (``host_acquire``): EPERM, with the
    GNTST_* status Xen would give the copy or map."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(abi.EPERM, why)
        self.status = status


# pxg_acquire's refusals as Xen's copy/map statuses
_PXG_STATUS = {_PXG_E_RANGE: GNTST_bad_gntref, _PXG_E_FRAME: GNTST_bad_page}


class _Gnt(Exception):
    def __init__(self, status: int, why: str = "") -> None:
        super().__init__(status, why)
        self.status = status
        self.why = why
