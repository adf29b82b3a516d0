"""Save a suspended domain into Xen's stream (xl save file, libxl v2, libxc v3).

The domain must be suspended (state shutdown, reason suspend: the guest
called ``SCHEDOP_shutdown(SHUTDOWN_suspend)``) and its vCPU threads stopped.
Each stateful object gives its own state (``VCPU.save_context`` and friends,
``FrameTable.pfinfo``, ``DomainClock.save_state``, ``EventChannels.save_state``,
``GrantTables.save_state``); this module normalises machine frames to pfns
as Xen's ``xg_sr_save_x86_pv.c`` does and writes the records in Xen's order:

    image header, domain header, X86_PV_INFO, STATIC_DATA_END,
    X86_PV_P2M_FRAMES, PAGE_DATA..., X86_TSC_INFO, SHARED_INFO,
    X86_PV_VCPU_{BASIC,EXTENDED,XSAVE,MSRS} per vCPU, PYXEN_DOMAIN_STATE, END
"""

from __future__ import annotations

import array
import errno
import json
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from .. import abi
from ..abi import XenError
from ..hv import machine as M
from ..hv.evtchn import ST_INTERDOMAIN
from . import stream as S

if TYPE_CHECKING:
    from ..hv.domain import Domain

Progress = Callable[[int, int, int], None]  # pages done, pages in all, bytes written


class SaveError(Exception):
    """The domain cannot be saved; the message says why (the domain is not harmed)."""


@dataclass
class SaveStats:
    pages: int = 0  # pages with data
    bytes: int = 0
    seconds: float = 0.0


class _Out:
    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.n = f, 0

    def write(self, b: bytes | memoryview) -> None:
        self.f.write(b)
        self.n += len(b)

    def rec(self, rtype: int, body: bytes = b"") -> None:
        self.write(S.encode_record(rtype, body))


def xl_config(d: Domain) -> dict[str, Any]:
    """The config xl would put in the save file's header (libxl_domain_config as
    JSON: c_info, b_info), with pyxen's DomainSpec under ``pyxen_spec`` so
    that ``pyxen restore`` rebuilds the same domain."""
    import dataclasses
    spec = dataclasses.asdict(d.spec)
    spec["extra"] = {k: v for k, v in (spec.get("extra") or {}).items()
                     if k in ("disks", "actions", "vifs")}
    return {"c_info": {"type": "pv", "name": d.name, "uuid": d.spec.uuid},
            "b_info": {"max_vcpus": len(d.vcpus), "max_memkb": d.max_pages * 4,
                       "target_memkb": d.nr_pages * 4},
            "pyxen_spec": spec}


def _mfn_to_pfn(d: Domain) -> Callable[[int], int | None]:
    free = d.free_pfns
    maxp = d.max_pages

    def conv(mfn: int) -> int | None:
        pfn = mfn - M.MFN_BASE
        if 0 <= pfn < maxp and pfn not in free:
            return pfn
        return None
    return conv


# ---------------------------------------------------------------- asking the guest to suspend
SUSPEND_EVTCHN_NODE = "device/suspend/event-channel"  # docs/misc/xenstore-paths.pandoc
SUSPEND_DOM0_PORT = 0x7F00  # the number our (dom0's) end reports in EVTCHNOP_status


def suspend_evtchn_port(value: str | None) -> int:
    """The port in ``~/device/suspend/event-channel`` as Xen's
    xs_suspend_evtchn_port reads it: -1 (none) when the node is missing or
    empty, else C's atoi (leading blanks, a sign, digits; no digits: 0), so
    a guest that writes nonsense gets what it gets on Xen: a bind to that
    port, which fails the suspend."""
    if not value:
        return -1
    m = re.match(r"[ \t\n\v\f\r]*([+-]?\d+)", value)
    if m is None:
        return 0
    return max(-(1 << 31), min(int(m.group(1)), (1 << 31) - 1))


class SuspendChannel:
    """dom0's end of the guest's suspend event channel for one save or
    migration, as libxl__domain_suspend_init sets it up before the first
    page (xc_suspend_evtchn_init_exclusive): an interdomain bind to the
    guest's port, then XEN_DOMCTL_subscribe, so that the hypervisor sends on
    it once the guest has suspended (Domain.shutdown).  :func:`suspend_guest`
    signals it to ask for the suspend.  ``fired``: an event came from the
    guest's side (the subscription's, or the guest's own send).

    A failed bind is a failed save, as with libxl ("Suspend event channel
    initialization failed"): the guest advertised a port that is not
    waiting for dom0."""

    def __init__(self, d: Domain, port: int) -> None:
        self.d, self.port = d, port
        self.fired = threading.Event()
        self.late = False  # the request timed out: a suspend after it is undone
        ev = d.evtchn
        with ev.lock:  # our end left bound by an earlier request that timed out: ours again
            ch = ev.ports[port] if 0 < port < len(ev.ports) else None
            stale = (ch is not None and ch.state == ST_INTERDOMAIN and ch.remote_dom == 0
                     and ch.remote_port == SUSPEND_DOM0_PORT)
        if stale:
            ev.remote_closed(port, 0)
        try:
            d.evtchn.accept_interdomain(port, 0, SUSPEND_DOM0_PORT, self._fire)
        except XenError as e:
            raise SaveError(f"suspend event channel initialization failed: port {port} of "
                            f"domain {d.domid}: {e.why or e}") from None
        d.suspend_evtchn = port

    def _fire(self) -> None:
        """The guest's side sent (in its vCPU thread, or the hypervisor's
        finalised suspend)."""
        self.fired.set()
        if self.late and self.d.shutdown_reason == abi.SHUTDOWN_suspend:
            threading.Thread(target=self._resume_late, daemon=True).start()

    def _resume_late(self) -> None:
        """The guest acted on a request we had given up on: it runs on, its
        suspend cancelled (returns 1), as xl resumes a domain whose save failed."""
        try:
            self.d.resume_after_suspend(True)
            self.d.log("the guest suspended after its save or migration had given up: resumed",
                       always=True)
        except XenError:
            pass
        self.release()

    def notify(self) -> None:
        """xenevtchn_notify on our end: the guest's port becomes pending."""
        self.d.raise_port(self.port, self.d.evtchn.notify_vcpu(self.port))

    def release(self) -> None:
        """xc_suspend_evtchn_release: unsubscribed, unbound (the guest's port
        waits for dom0 again, ready for the next save)."""
        d, ev = self.d, self.d.evtchn
        if d.suspend_evtchn == self.port:
            d.suspend_evtchn = 0
        with ev.lock:  # still our channel (the guest may have closed the port and reused it)
            ch = ev.ports[self.port] if 0 < self.port < len(ev.ports) else None
            ours = ch is not None and ch.state == ST_INTERDOMAIN and ch.backend == self._fire
        if ours:
            ev.remote_closed(self.port, 0)


def suspend_guest(d: Domain, timeout: float, chan: SuspendChannel | None,
                  ask_xenstore: Callable[[str], None]) -> str:
    """Ask the guest to suspend, as libxl's domain_suspend_callback_common,
    and wait until it has (SCHEDOP_shutdown(SHUTDOWN_suspend)): by its
    suspend event channel when it advertised one (``chan``), else through
    ``ask_xenstore("suspend")`` (control/shutdown).  The wait sleeps until
    the domain's state changes (the subscription's event, the domain's
    state callback), never a poll: during a migration this is downtime, on
    the same CPUs as the guest.  After ``timeout`` s: SaveError and the
    guest keeps running; the xenstore request is withdrawn
    (``ask_xenstore("")``); an event cannot be, so a suspend that follows
    it is cancelled at once (the guest's hypercall returns 1).  Returns
    "event channel" or "xenstore"."""
    woke = chan.fired if chan is not None else threading.Event()
    prev = d.on_state

    def on_state(dom: Domain) -> None:
        woke.set()
        if prev is not None:
            prev(dom)
    d.on_state = on_state
    try:
        woke.clear()
        if chan is not None:
            chan.notify()
            via = "event channel"
        else:
            ask_xenstore("suspend")
            via = "xenstore"
        end = time.monotonic() + timeout
        while d.shutdown_reason != abi.SHUTDOWN_suspend:
            if d.crashed or d.dying or (d.shutdown_reason is not None):
                raise SaveError(f"domain {d.domid} {d.state} instead of suspending")
            left = end - time.monotonic()
            if left <= 0:
                if chan is not None:
                    chan.late = True
                    if d.shutdown_reason == abi.SHUTDOWN_suspend:  # just now
                        chan.late = False
                        break
                    raise SaveError(f"the guest did not suspend within {timeout:g} s (it was asked "
                                    f"on its suspend event channel, port {chan.port}); it keeps running")
                ask_xenstore("")
                raise SaveError(f"the guest did not suspend within {timeout:g} s (it must act on "
                                "control/shutdown = \"suspend\"); it keeps running")
            woke.wait(min(left, 0.05))
            woke.clear()
    finally:
        d.on_state = prev
    if chan is not None:
        chan.release()
    return via


def check_suspended(d: Domain) -> None:
    if d.shutdown_reason != abi.SHUTDOWN_suspend or d.crashed:
        raise SaveError(f"domain {d.domid} is {d.state}, not suspended")
    if not d.wait_stopped(5.0):
        raise SaveError(f"domain {d.domid}: vCPUs did not stop")


def vcpu_records(d: Domain, m2p: Callable[[int], int | None]) -> tuple[list[tuple[int, bytes]], int | None]:
    """The X86_PV_VCPU_* records of the suspended domain, and the start_info
    pfn (vCPU0's rdx).  Built in memory first: a vCPU whose state cannot be
    normalised fails the save before pages are written."""
    vcpu_recs: list[tuple[int, bytes]] = []
    si_pfn = None
    for v in d.vcpus:
        if not v.initialised:
            vcpu_recs.append((S.Rec.X86_PV_VCPU_BASIC, S.VcpuBlob(v.id, b"").pack()))
            continue
        c = v.save_context()
        for i in (1, 3):
            if c.ctrlreg[i]:
                pfn = m2p(c.ctrlreg[i] >> 12)
                if pfn is None:
                    raise SaveError(f"vcpu {v.id}: cr{i} {c.ctrlreg[i]:#x} is not the domain's RAM")
                c.ctrlreg[i] = pfn << 12
        for i, g in enumerate(c.gdt_frames):
            if g:
                pfn = m2p(g)
                if pfn is None:
                    raise SaveError(f"vcpu {v.id}: GDT frame {g:#x} is not the domain's RAM")
                c.gdt_frames[i] = pfn
        if v.id == 0:  # the suspend record (start_info) mfn in rdx, as xg_sr_save_x86_pv.c
            pfn = m2p(c.regs.get("rdx", 0))
            if pfn is None:
                raise SaveError(f"vcpu 0: rdx {c.regs.get('rdx', 0):#x} is not the start_info "
                                "frame (the guest must pass it to SCHEDOP_shutdown(suspend))")
            c.regs["rdx"] = si_pfn = pfn
        vcpu_recs.append((S.Rec.X86_PV_VCPU_BASIC, S.VcpuBlob(v.id, c.pack()).pack()))
        vcpu_recs.append((S.Rec.X86_PV_VCPU_EXTENDED, S.VcpuBlob(v.id, v.save_extended().pack()).pack()))
        vcpu_recs.append((S.Rec.X86_PV_VCPU_XSAVE, S.VcpuBlob(v.id, v.save_xsave()).pack()))
        msrs = v.save_msrs()
        vcpu_recs.append((S.Rec.X86_PV_VCPU_MSRS, S.VcpuBlob(v.id, S.pack_msrs(msrs)).pack()))
    return vcpu_recs, si_pfn


def write_headers(d: Domain, out: _Out, config: dict[str, Any] | None) -> None:
    """xl header (with the config), libxl header, LIBXC_CONTEXT, image and
    domain headers, X86_PV_INFO, STATIC_DATA_END: the part of the stream a
    live migration sends before the first page."""
    cfg = json.dumps(config if config is not None else xl_config(d)).encode() + b"\0"
    out.write(S.XlHeader(S.XL_MANDATORY_FLAG_JSON | S.XL_MANDATORY_FLAG_STREAMv2, 0, cfg).pack())
    write_after_xl_header(d, out)


def write_after_xl_header(d: Domain, out: _Out) -> None:
    out.write(S.pack_libxl_header())
    out.rec(S.LibxlRec.LIBXC_CONTEXT)
    out.write(S.ImageHeader().pack())
    from ..hv.hypercalls import XEN_MAJOR, XEN_MINOR
    out.write(S.DomainHeader(xen_major=XEN_MAJOR, xen_minor=XEN_MINOR).pack())
    out.rec(S.Rec.X86_PV_INFO, S.PvInfo().pack())
    out.rec(S.Rec.STATIC_DATA_END)


class PageWriter:
    """PAGE_DATA records for a list of pfns, the data straight from guest
    memory in contiguous runs.  ``live``: the guest runs meanwhile, so a page
    table that cannot be normalised now (it maps a frame that is not the
    domain's RAM yet, such as shared_info before the guest's pre-suspend
    unmaps it) is *deferred* to the final round, as Xen's save does when its
    normalise fails with EAGAIN during a live round; otherwise it is an error.
    ``sent_type`` (one byte per pfn, 0xFF: not sent or sent as XTAB) records
    the type each page went with, so that the final round can send again the
    pages whose type changed without their contents changing."""

    UNSENT = 0xFF

    def __init__(self, d: Domain, out: _Out, xalloc_holes: bool = False) -> None:
        self.d, self.out = d, out
        # holes of the RAM memfd: XALLOC (a migration: nothing crosses the wire)
        # or zero pages (a save file, as Xen's, whose restore need not know XALLOC)
        self.xalloc_holes = xalloc_holes
        self.zeros = memoryview(bytes(S.MAX_BATCH_SIZE * S.PAGE_SIZE))
        self.m2p = _mfn_to_pfn(d)
        self.sent_type = bytearray(b"\xff" * d.max_pages)
        self.deferred: set[int] = set()

    def write(self, pfns: list[int], present: bytearray | None = None, live: bool = False,
              progress: Callable[[int], None] | None = None,
              throttle: Callable[[int], None] | None = None,
              before: Callable[[list[int]], None] | None = None) -> int:
        """Send ``pfns`` (sorted); the number of pages sent (with data, or
        XALLOC for a hole).  ``before(batch)`` is called before each batch's
        pages are read (a live round: ``Domain.clear_dirty``, so that the dirty
        log catches what the guest writes from then on)."""
        d, out, ft, m2p = self.d, self.out, self.d.ft, self.m2p
        ram = d.machine.ram_view
        free = d.free_pfns
        sent_type = self.sent_type
        done = 0
        base = M.MFN_BASE - ft.mfn_base
        free_map: bytearray | None = None
        if free:
            free_map = bytearray(d.max_pages)
            for p in free:
                if 0 <= p < d.max_pages:
                    free_map[p] = 1
        for first in range(0, len(pfns), S.MAX_BATCH_SIZE):
            batch = pfns[first:first + S.MAX_BATCH_SIZE]
            if before:
                before(batch)
            a, n = batch[0], len(batch)
            if (batch[-1] - a == n - 1
                    and b"\x01" not in bytes(ft.type[base + a:base + a + n]).translate(_PT_TABLE)
                    and (free_map is None or free_map.find(1, a, a + n) < 0)):
                # the common case: consecutive ordinary pages, sent in runs at C speed
                ndata = self._write_plain(a, n, present)
                done += n
                if throttle:
                    throttle(ndata)
                if progress:
                    progress(min(len(pfns), first + S.MAX_BATCH_SIZE))
                continue
            entries: list[tuple[int, S.PageType]] = []
            chunks: list[bytes | memoryview] = []
            run_start = run_end = -1
            run_hole = False
            npages = ndata = 0
            for pfn in batch:
                if pfn in free:
                    entries.append((pfn, S.PageType.XTAB))
                    sent_type[pfn] = self.UNSENT
                    continue
                t = S.PageType(ft.pfinfo(pfn + M.MFN_BASE))
                if not t.level:
                    npages += 1
                    sent_type[pfn] = t
                    hole = present is not None and not present[pfn]
                    if hole and self.xalloc_holes:
                        # a hole of the RAM memfd: allocated, reads zeros; no data
                        entries.append((pfn, S.PageType.XALLOC))
                        continue
                    entries.append((pfn, t))
                    ndata += 1
                    if run_end == pfn and hole == run_hole:
                        run_end += 1
                    else:
                        if run_start >= 0:
                            chunks.append(self._chunk(run_hole, run_start, run_end))
                        run_start, run_end, run_hole = pfn, pfn + 1, hole
                    continue
                off = pfn << 12
                try:
                    page = S.normalise_pagetable(bytes(ram[off:off + S.PAGE_SIZE]), t.level, m2p)
                except S.StreamError as e:
                    if live:
                        self.deferred.add(pfn)
                        continue
                    raise SaveError(f"page table at pfn {pfn:#x}: {e} (a guest maps Xen-heap "
                                    "frames such as shared_info or its grant table until it "
                                    "unmaps them before suspending, as Linux does)") from None
                if run_start >= 0:
                    chunks.append(self._chunk(run_hole, run_start, run_end))
                    run_start = run_end = -1
                entries.append((pfn, t))
                npages += 1
                ndata += 1
                sent_type[pfn] = t
                chunks.append(page)
            if run_start >= 0:
                chunks.append(self._chunk(run_hole, run_start, run_end))
            if not entries:
                continue
            # the record written piece by piece, the pages straight from guest memory
            # (what PageData.pack would build; its length is a multiple of 8: no padding)
            words = [(pfn & S.PAGE_DATA_PFN_MASK) | (int(t) << S.PAGE_DATA_TYPE_SHIFT) for pfn, t in entries]
            head = struct.pack(f"<II{len(words)}Q", len(words), 0, *words)
            out.write(struct.pack("<II", S.Rec.PAGE_DATA, len(head) + ndata * S.PAGE_SIZE) + head)
            for chunk in chunks:
                out.write(chunk)
            done += npages
            if throttle:
                throttle(ndata)
            if progress:
                progress(min(len(pfns), first + S.MAX_BATCH_SIZE))
        return done

    def _write_plain(self, a: int, n: int, present: bytearray | None) -> int:
        """PAGE_DATA for pfns a..a+n-1, all ordinary: NOTAB with their data, or
        XALLOC (Xen's "allocate only": populated, contents not sent) for the
        holes of the RAM memfd, which read zeros and need not cross the wire.
        The number of pages with data."""
        out = self.out
        words = array.array("Q", range(a, a + n))
        runs: list[tuple[int, int]] = []
        if present is None:
            runs.append((0, n))
        else:
            kinds = bytes(present[a:a + n])
            xalloc = int(S.PageType.XALLOC) << S.PAGE_DATA_TYPE_SHIFT
            for m in re.finditer(b"\x01+|\x00+", kinds):
                if kinds[m.start()] or not self.xalloc_holes:
                    runs.append((m.start(), m.end()))
                else:
                    for i in range(m.start(), m.end()):
                        words[i] |= xalloc
        ndata = sum(e - b for b, e in runs)
        head = struct.pack("<II", n, 0) + words.tobytes()
        out.write(struct.pack("<II", S.Rec.PAGE_DATA, len(head) + ndata * S.PAGE_SIZE) + head)
        for b, e in runs:
            hole = present is not None and not present[a + b]
            out.write(self._chunk(hole, a + b, a + e))
        self.sent_type[a:a + n] = bytes(n)
        return ndata

    def _chunk(self, hole: bool, start: int, end: int) -> memoryview:
        """Pages start..end-1 from guest memory, or zeros for a hole (not read
        through the mapping, which would allocate it)."""
        if hole:
            return self.zeros[:(end - start) << 12]
        return self.d.machine.ram_view[start << 12:end << 12]

    def changed_types(self) -> list[int]:
        """Pfns whose page type now differs from the one they were last sent
        with (a table pinned, unpinned or promoted without a write to it):
        only frames that are or were page tables can differ."""
        d, ft = self.d, self.d.ft
        base = M.MFN_BASE - ft.mfn_base
        n = d.max_pages
        types = bytes(ft.type[base:base + n]).translate(_PT_TABLE)
        sent = self.sent_type.translate(_PT_TABLE)
        cand = {m.start() for m in re.finditer(b"\x01", types)}
        cand.update(m.start() for m in re.finditer(b"\x01", sent))
        free = d.free_pfns
        out = []
        for pfn in sorted(cand):
            if pfn in free:
                continue
            if ft.pfinfo(pfn + M.MFN_BASE) != self.sent_type[pfn]:
                out.append(pfn)
        return out


# bytes 1-4 (L1-L4, also with the pin bit 8: 9-12) -> 1, anything else -> 0
_PT_TABLE = bytes(1 if (b & 7) in (1, 2, 3, 4) and b != 0xFF and b < 16 else 0 for b in range(256))


def write_tail(d: Domain, out: _Out, vcpu_recs: list[tuple[int, bytes]]) -> None:
    """After the pages: TSC, shared_info, the vCPUs, pyxen's state, END, libxl END."""
    clock = d.clock.save_state()
    out.rec(S.Rec.X86_TSC_INFO, S.TscInfo(0, d.vcpus[0].tsc_khz, clock["system_time_ns"], 1).pack())
    out.rec(S.Rec.SHARED_INFO, bytes(d.shared_info))
    for rtype, body in vcpu_recs:
        out.rec(rtype, body)
    out.rec(S.Rec.PYXEN_DOMAIN_STATE, json.dumps(domain_state(d, clock)).encode())
    out.rec(S.Rec.END)
    out.rec(S.LibxlRec.END)


def save_domain(d: Domain, f: IO[bytes], config: dict[str, Any] | None = None,
                progress: Progress | None = None) -> SaveStats:
    """Write the whole save file for the suspended domain ``d`` to ``f``.
    Raises SaveError (or StreamError for a page table Xen could not
    normalise either) before anything the guest needs is changed."""
    check_suspended(d)
    t0 = time.monotonic()
    vcpu_recs, si_pfn = vcpu_records(d, _mfn_to_pfn(d))
    out = _Out(f)
    write_headers(d, out, config)
    _write_p2m_frames(d, out, si_pfn)
    total = d.max_pages
    stats = SaveStats()
    pw = PageWriter(d, out)
    present = _present_pages(d.machine.memfd, total)
    stats.pages = pw.write(list(range(total)), present,
                           progress=(lambda n: progress(n, total, out.n)) if progress else None)
    write_tail(d, out, vcpu_recs)
    f.flush()
    stats.bytes = out.n
    stats.seconds = time.monotonic() - t0
    return stats


def _present_pages(memfd: int, npages: int) -> bytearray:
    """1 for each RAM page the memfd holds data for, 0 for a hole (never
    written, or given back with MADV_REMOVE): holes are sent as zeros (a
    migration: XALLOC) without
    reading them through the mapping, which would allocate them (a shared
    shmem mapping has no zero page), so saving a mostly empty domain does not
    first fill the host's memory with it.  All 1 where SEEK_DATA is missing."""
    size = npages << 12
    out = bytearray(npages)
    off = 0
    try:
        while off < size:
            try:
                start = os.lseek(memfd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after off
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(memfd, start, os.SEEK_HOLE), size)
            first, last = start >> 12, (end + 4095) >> 12
            out[first:last] = b"\1" * (last - first)
            off = end
    except OSError:
        return bytearray(b"\1" * npages)
    return out


def _write_p2m_frames(d: Domain, out: _Out, si_pfn: int | None) -> None:
    """X86_PV_P2M_FRAMES: the frames of the guest's p2m list, from its
    start_info page (first_p2m_pfn, nr_p2m_frames: the builder's mfn_list).
    pyxen's p2m is mfn = pfn + MFN_BASE on every host, so a restore never
    rewrites it; the record is there for Xen's tools and ``stream dump``."""
    if si_pfn is None:
        return
    off = si_pfn << 12
    fields = abi.START_INFO.unpack_from(d.machine.ram, off)
    p2m, n = fields[-2], fields[-1]
    if not n or p2m + n > d.max_pages:
        return
    per = S.PAGE_SIZE // 8
    end = min(d.max_pages, n * per) - 1
    out.rec(S.Rec.X86_PV_P2M_FRAMES, S.P2mFrames(0, end, [p2m + i for i in range(end // per + 1)]).pack())


def domain_state(d: Domain, clock: dict[str, int]) -> dict[str, Any]:
    """PYXEN_DOMAIN_STATE: what pyxen knows that Xen's records do not carry."""
    vcpus = []
    for v in d.vcpus:
        tsc = v.kvm.get_msrs([0x10])[0] if v.initialised else 0
        vcpus.append({"id": v.id, "tsc": tsc, "iopl": v.iopl, "dr7_emul": v.dr7_emul,
                      "nmi_callback": v.nmi_callback, "timer_deadline": v.timer_deadline,
                      "periodic_ns": v.periodic_ns, "vcpu_info_mfn": v.vi_mfn,
                      "runstate_area": v.runstate_area, "time_area": v.time_area})
    free = sorted(d.free_pfns)
    runs: list[list[int]] = []
    for p in free:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    si = {k: (v - M.MFN_BASE if k.endswith("_mfn") else v) for k, v in d.start_info.items()}
    return {"version": 1, "domid": d.domid, "name": d.name, "nr_pages": d.nr_pages,
            "max_pages": d.max_pages, "free_pfns": runs, "vm_assist": d.vm_assist,
            "clock": clock, "start_info": si, "vcpus": vcpus,
            "event_channels": d.evtchn.save_state(), "grant_table": d.gnttab.save_state()}

