"""Domains: one KVM VM, its memory, vCPUs, event channels, timers and state.

A :class:`Domain` lives in one host process (the domain process); the
toolstack daemon only talks to it.  States follow Xen's: running, blocked,
paused, shutdown (with a reason), crashed, dying.
"""

from __future__ import annotations

import heapq
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import abi, native
from ..abi import XenError
from ..ratelimit import Limits, PrintkRatelimit, suppressed_line
from . import atomic
from . import machine as M
from .evtchn import EventChannels
from .gnttab import GrantTables
from .hypercalls import Hypercalls
from .interdomain import Directory, LocalDirectory, default_directory, domain_types, write_peer_header
from .mm import PGT_SEG, PGT_WRITABLE, FrameTable
from .time import DomainClock
from .vcpu import VCPU

INVALID_M2P_ENTRY = (1 << 64) - 1

if TYPE_CHECKING:
    from ..backends.console import ConsoleBackend
    from ..backends.xsring import XenstoreRing

ConsoleSink = Callable[[bytes], None]
CONSOLE_IO_LINE_MAX = 1024  # a console_io line that never ends is logged in pieces this long


def clear_bitmap(pfns: list[int], npages: int) -> tuple[int, int, bytes] | None:
    """KVM_CLEAR_DIRTY_LOG's arguments for ``pfns`` (sorted) of a slot of
    ``npages``: the first page (a multiple of 64, as KVM requires), the
    number of pages (a multiple of 64 unless the range ends at the slot's
    end) and the bitmap (whole 64-bit words); None when no pfn is in the slot."""
    if not pfns:
        return None
    lo = pfns[0] & ~63
    hi = min(((pfns[-1] >> 6) + 1) << 6, npages)
    if lo >= hi:
        return None
    if pfns[-1] - pfns[0] == len(pfns) - 1:  # a run (round 1, most batches)
        bits = ((1 << len(pfns)) - 1) << (pfns[0] - lo)
    else:
        bits = 0
        for p in pfns:
            bits |= 1 << (p - lo)
    bits &= (1 << (hi - lo)) - 1
    if not bits:
        return None
    return lo, hi - lo, bits.to_bytes(((hi - lo + 63) // 64) * 8, "little")


@dataclass
class DomainSpec:
    """What the builder needs to create a domain (from xl.cfg or the API)."""

    name: str
    memory_mib: int
    kernel: str
    maxmem_mib: int = 0
    vcpus: int = 1
    maxvcpus: int = 0
    cmdline: str = ""
    ramdisk: str | None = None
    domid: int = 1
    uuid: str = "00000000-0000-0000-0000-000000000000"
    extra: dict[str, object] = field(default_factory=dict)


class TimerThread:
    """One thread per domain that wakes vCPUs whose timers expire while they run.

    A blocked vCPU sleeps on its own condition with the deadline as timeout;
    a running one needs a kick at the deadline, which this thread provides."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.heap: list[tuple[int, int, VCPU]] = []
        self.cond = threading.Condition()
        self.seq = 0
        self.stop = False
        self.thread = threading.Thread(target=self._main, name=f"d{domain.domid}-timers",
                                       daemon=True)
        self.thread.start()

    def schedule(self, vcpu: VCPU, deadline: int) -> None:
        if not deadline:
            return
        with self.cond:
            self.seq += 1
            heapq.heappush(self.heap, (deadline, self.seq, vcpu))
            if self.heap[0][2] is vcpu and self.heap[0][0] == deadline:
                self.cond.notify()

    def _main(self) -> None:
        clock = self.domain.clock
        while True:
            with self.cond:
                if self.stop:
                    return
                if not self.heap:
                    self.cond.wait(1.0)
                    continue
                deadline, _, vcpu = self.heap[0]
                now = clock.system_time()
                if deadline > now:
                    self.cond.wait(min((deadline - now) / 1e9, 1.0))
                    continue
                heapq.heappop(self.heap)
            if vcpu.timer_deadline and vcpu.timer_deadline <= deadline or \
                    vcpu.periodic_ns and vcpu.periodic_next <= deadline:
                vcpu.post(VCPU.POST_WAKE)
            if vcpu.periodic_ns:
                self.schedule(vcpu, vcpu.periodic_next if vcpu.periodic_next > deadline
                              else deadline + vcpu.periodic_ns)

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify()


class Domain:
    """A running (or stopped) PV domain."""

    def __init__(self, spec: DomainSpec, console_sink: ConsoleSink | None = None,
                 on_state: Callable[[Domain], None] | None = None,
                 log_sink: Callable[[str], None] | None = None,
                 directory: Directory | None = None) -> None:
        self.spec = spec
        self.domid = spec.domid
        self.name = spec.name
        self.nr_pages = spec.memory_mib * 256
        self.max_pages = max(spec.maxmem_mib, spec.memory_mib) * 256
        self.console_sinks: list[ConsoleSink] = [console_sink] if console_sink else []
        self.log_sink = log_sink
        self.on_state = on_state
        self.dmesg: list[str] = []
        self.log_ratelimit = PrintkRatelimit(Limits.printk_ms, Limits.printk_burst)
        self.console_io_partial = b""
        self.state_lock = threading.RLock()
        self.shutdown_reason: int | None = None
        self.shutdown_code: int | None = None
        self.crashed = False
        self.crash_info = ""
        # XEN_DOMCTL_subscribe's port: the guest's suspend event channel, sent
        # on when the domain has suspended (the toolstack bound its other end)
        self.suspend_evtchn = 0
        self.dying = False
        self.paused = 0
        self.vm_assist = 0  # VMASST_TYPE_* bits the guest enabled (hypercalls.do_vm_assist)
        # RAM frames (pfn < max_pages) that hold no memory: those above the initial
        # allocation, and those given back with XENMEM_decrease_reservation
        self.free_pfns: set[int] = set(range(self.nr_pages, self.max_pages))
        self.reservation_lock = threading.Lock()
        self.pirq_eoi_mfn = 0  # PHYSDEVOP_pirq_eoi_gmfn's page (no pirqs ever raise it)
        self.started = False
        self.create_time = time.time()
        self.dirty_logging = False
        self.dirty_manual = False  # KVM's manual dirty-log protect mode (set_dirty_logging)
        self.host_dirty: set[int] = set()
        self.machine = M.Machine(self.max_pages, max(spec.vcpus, spec.maxvcpus or spec.vcpus))
        ram = self.machine.ram
        si_off = self.machine.ram_offset(self.machine.xenheap_mfn)
        self.shared_info_mfn = self.machine.xenheap_mfn
        self.shared_info = self.machine.ram_view[si_off:si_off + abi.PAGE_SIZE]
        self.mmu_pending: list[int] = []
        self.mmu_lock = threading.Lock()
        self.ft = FrameTable(ram, M.MFN_BASE, self.machine.nr_frames, self._write_entry,
                             self._owned, self.machine.l4_hv_slots(), domain_types(self))
        self.clock = DomainClock()
        self.directory: Directory = directory or default_directory
        self.gnttab = GrantTables(self)
        write_peer_header(self)
        self.evtchn = EventChannels(self)
        self.hypercalls = Hypercalls(self)
        self.timers = TimerThread(self)
        nv = max(spec.vcpus, spec.maxvcpus or spec.vcpus)
        self.vcpus = [VCPU(self, i) for i in range(nv)]
        self.clock.write_wallclock(self.shared_info, 0)
        struct.pack_into("<Q", self.shared_info, abi.SI_ARCH_MAX_PFN, self.nr_pages)
        for v in self.vcpus:
            v.vi_set(abi.VI_UPCALL_MASK, 1)
            v.update_time()
        self.console: ConsoleBackend | None = None  # attached by domctl.create_domain
        self.xs_ring: XenstoreRing | None = None  # attached by the domain process
        if isinstance(self.directory, LocalDirectory):
            self.directory.register(self)
        self.start_info: dict[str, int] = {}

    # ------------------------------------------------------------ memory
    def _owned(self, mfn: int) -> bool:
        pfn = mfn - M.MFN_BASE
        if pfn < self.nr_pages:
            return not self.free_pfns or pfn not in self.free_pfns
        if pfn < self.max_pages:
            return pfn not in self.free_pfns
        return mfn == self.shared_info_mfn or self.gnttab.owns_frame(mfn)

    @property
    def tot_pages(self) -> int:
        """RAM pages the domain holds now (XENMEM_current_reservation)."""
        return self.max_pages - len(self.free_pfns)

    def remove_extent(self, mfn: int, order: int) -> bool:
        """XENMEM_decrease_reservation of one extent (a PV guest names machine
        frames).  As Xen's guest_remove_page the frames must be the domain's;
        unlike Xen, which frees a frame still in use once its last reference
        goes, pyxen refuses a frame that is typed (a page table or descriptor
        page, pinned, mapped writable, a granted or hypervisor-held page), so
        a frame it takes away is unused and its memory can go back to the host
        at once.  Read-only mappings are not counted; they read zeros after."""
        n = 1 << order
        if mfn & (n - 1):
            return False
        pfns = [mfn + i - M.MFN_BASE for i in range(n)]
        ft = self.ft
        with self.reservation_lock:
            for pfn in pfns:
                if not 0 <= pfn < self.max_pages or not self._owned(pfn + M.MFN_BASE):
                    self.log(f"decrease_reservation: frame {pfn + M.MFN_BASE:#x} is not the domain's")
                    return False
                if ft.type_of(pfn + M.MFN_BASE)[1]:
                    self.log(f"decrease_reservation: frame {pfn + M.MFN_BASE:#x} is in use")
                    return False
            for pfn in pfns:
                self.free_pfns.add(pfn)
                self.machine.set_m2p(pfn + M.MFN_BASE, INVALID_M2P_ENTRY)
            self._release_ram(pfns[0], n)
        return True

    def _release_ram(self, pfn: int, n: int) -> None:
        """Give the memory of frames nobody holds back to the host (they read as
        zeros when the domain gets them again, as Xen's scrubbed pages)."""
        off = self.machine.ram_offset(pfn + M.MFN_BASE)
        try:
            self.machine.ram.madvise(mmap.MADV_REMOVE, off, n * abi.PAGE_SIZE)
        except (OSError, AttributeError, ValueError):
            self.machine.ram[off:off + n * abi.PAGE_SIZE] = bytes(n * abi.PAGE_SIZE)

    def add_extent(self, order: int, prefer_pfn: int | None = None) -> int | None:
        """XENMEM_increase_reservation / populate_physmap of one extent: 2**order
        free frames (naturally aligned), the one backing ``prefer_pfn`` if it is
        free; None when the domain is at its maximum.  Returns the first mfn."""
        n = 1 << order
        with self.reservation_lock:
            if len(self.free_pfns) < n:
                return None
            start = None
            if prefer_pfn is not None and 0 <= prefer_pfn < self.max_pages and not prefer_pfn & (n - 1) \
                    and all(prefer_pfn + i in self.free_pfns for i in range(n)):
                start = prefer_pfn
            elif n == 1:
                start = next(iter(self.free_pfns))  # any frame, as Xen's allocator
            else:
                for cand in sorted(self.free_pfns):
                    if not cand & (n - 1) and all(cand + i in self.free_pfns for i in range(n)):
                        start = cand
                        break
            if start is None:
                return None
            for i in range(n):
                self.free_pfns.discard(start + i)
            return start + M.MFN_BASE

    def _write_entry(self, maddr: int, value: int, old: int | None) -> None:
        off = maddr - (M.MFN_BASE << 12)
        struct.pack_into("<Q", self.machine.ram, off, value)
        if self.dirty_logging:
            self.host_dirty.add(maddr >> 12)
        if self.started and (old is None or old & 1):
            with self.mmu_lock:
                self.mmu_pending.append(M.DM_VA + maddr)

    def set_dirty_logging(self, on: bool, all_dirty: bool = False) -> None:
        """Log-dirty mode (for live migration): KVM logs guest writes to RAM;
        writes the hypervisor and backends make are recorded by mark_dirty
        (KVM does not see them, platform-notes.md fact 8).

        ``all_dirty`` (a live migration's pre-copy): where KVM has manual
        protect mode, turning the log on protects nothing and every page
        counts as dirty; :meth:`read_dirty` with ``protect=False`` then
        leaves the pages it returns writable, and :meth:`clear_dirty`
        protects a batch again just before it is sent.  Without it (or
        without that KVM capability) turning the log on write-protects all
        of RAM at once and each :meth:`read_dirty` the pages it returns,
        which on PVM (shadow paging) the guest then faults back in."""
        vm = self.machine.vm
        if on:
            # PYXEN_DIRTY_LOG_MANUAL=0: the whole-slot protect, for comparisons
            manual = (all_dirty and os.environ.get("PYXEN_DIRTY_LOG_MANUAL", "1") != "0"
                      and vm.set_manual_dirty_protect(True))
            if not manual and self.dirty_manual:
                vm.set_manual_dirty_protect(False)
            self.dirty_manual = manual
        vm.set_dirty_logging(M.RAM_SLOT, on)
        self.host_dirty.clear()
        self.dirty_logging = on
        g = self.gnttab._pxg  # the native block path marks what it writes itself
        if g is not None:
            native.fast().pxg_set_logdirty(g, int(on))  # type: ignore[union-attr]

    def read_dirty(self, protect: bool = True) -> set[int]:
        """PFNs written since the last call (guest and host writes), and clear.
        ``protect=False`` in manual protect mode (``set_dirty_logging(True,
        all_dirty=True)``): KVM's bits for the pages returned stay set and
        the pages writable until :meth:`clear_dirty` (a page the caller does
        not clear comes back in the next read); otherwise KVM's log is read
        and cleared at once, its pages write-protected again."""
        vm = self.machine.vm
        bitmap = vm.get_dirty_log(M.RAM_SLOT) if self.dirty_logging else b""
        if bitmap and self.dirty_manual and protect:
            vm.clear_dirty_log(M.RAM_SLOT, 0, vm.slots[M.RAM_SLOT].memory_size >> 12, bitmap)
        pfns: set[int] = set()
        words = struct.unpack(f"<{len(bitmap) // 8}Q", bitmap)
        for wi, w in enumerate(words):
            if w == 0xFFFF_FFFF_FFFF_FFFF and wi * 64 + 64 <= self.nr_pages:
                pfns.update(range(wi * 64, wi * 64 + 64))  # manual mode's initially set log
                continue
            while w:
                low = w & -w
                pfn = wi * 64 + low.bit_length() - 1
                if pfn < self.nr_pages:
                    pfns.add(pfn)
                w ^= low
        # pages other domains' processes wrote (grant copies, unmapped RW grants)
        m = self.machine
        base = atomic.address_of(m.ram) + m.xenheap_offset(M.XH_DIRTY)
        for wi in range((self.nr_pages + 63) // 64):
            w = atomic.exchange64(base + wi * 8, 0) if struct.unpack_from(
                "<Q", m.ram, m.xenheap_offset(M.XH_DIRTY) + wi * 8)[0] else 0
            while w:
                low = w & -w
                pfns.add(wi * 64 + low.bit_length() - 1)
                w ^= low
        host, self.host_dirty = self.host_dirty, set()
        # frames the hypervisor and backends write all the time: always resent
        host.update(self.always_dirty_mfns())
        pfns.update(m - M.MFN_BASE for m in host if 0 <= m - M.MFN_BASE < self.nr_pages)
        return pfns

    def clear_dirty(self, pfns: list[int]) -> None:
        """Manual protect mode: clear KVM's dirty bits of ``pfns`` (sorted) and
        write-protect those pages again, just before the caller reads them
        to send them: a write after this sets the bit again for the next
        round.  Nothing outside that mode (reading the log cleared it)."""
        if not (self.dirty_manual and self.dirty_logging and pfns):
            return
        npages = self.machine.vm.slots[M.RAM_SLOT].memory_size >> 12
        rng = clear_bitmap(pfns, npages)
        if rng is not None:
            self.machine.vm.clear_dirty_log(M.RAM_SLOT, *rng)

    def always_dirty_mfns(self) -> set[int]:
        """Guest frames the host side writes without going through copy_to_guest:
        the console ring (indexes, input) and vcpu_info placed in guest memory
        (event bits, time)."""
        out = set()
        if self.start_info:
            out.add(self.start_info["console_mfn"])
        for v in self.vcpus:
            if v.vi_mfn:
                out.add(v.vi_mfn)
        return out

    def mark_dirty_granted(self, ref: int) -> None:
        """A backend wrote the page our guest granted as ``ref`` (dirty log)."""
        if not self.dirty_logging:
            return
        off = self.machine.xenheap_offset(M.XH_GRANT) + ref * 8 + 4
        self.mark_dirty(struct.unpack_from("<I", self.machine.ram, off)[0])

    def mark_dirty(self, mfn: int) -> None:
        if self.dirty_logging:
            self.host_dirty.add(mfn)

    def pfn_to_mfn(self, pfn: int) -> int:
        return M.MFN_BASE + pfn

    # ------------------------------------------------------------ events
    def raise_port(self, port: int, vcpu_id: int) -> None:
        v = self.vcpus[vcpu_id]
        if v.thread is not None and threading.get_ident() == v.kvm.thread_id:
            v.set_pending(port)
        else:
            v.post(VCPU.POST_PORT, port)

    # ------------------------------------------------------------ console / log
    def console_output(self, data: bytes) -> None:
        for sink in list(self.console_sinks):
            try:
                sink(data)
            except Exception as e:  # noqa: BLE001 - a broken client must not stop the guest
                self.log(f"console sink failed: {e!r}", always=True)
                self.console_sinks.remove(sink)

    def log(self, msg: str, *, always: bool = False) -> None:
        """A line for the hypervisor log (``pyxen dmesg``), as ``(dN) msg``.

        By default a line counts as guest-triggerable chatter (a failing
        hypercall, a blkback request error, the guest's console_io output)
        and goes through the domain's :class:`PrintkRatelimit`, Xen's
        ``printk_ratelimit`` per domain: what is over the limit is dropped
        and counted, and the count is reported as ``printk: N messages
        suppressed.`` before the next line that passes.  ``always`` is for
        the hypervisor's own lifecycle lines and crash reports, which one
        guest's flood must never hide; they report the pending count first
        too, so a suppression is never left unsaid at shutdown."""
        if always:
            lost = self.log_ratelimit.flush()
        else:
            ok, lost = self.log_ratelimit.check()
            if not ok:
                return
        if lost:
            self._log_line(suppressed_line(lost))
        self._log_line(msg)

    def _log_line(self, msg: str) -> None:
        line = f"(d{self.domid}) {msg}"
        self.dmesg.append(line)
        del self.dmesg[:-2000]
        if self.log_sink:
            self.log_sink(line)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.started = True
        self.clock.write_wallclock(self.shared_info, 0)
        for v in self.vcpus:
            v.time_updated_ns = 0  # a new TSC line: a restored domain's record counts another VM's TSC
            v.update_time()
            v.start()

    @property
    def state(self) -> str:
        if self.dying:
            return "dying"
        if self.crashed:
            return "crashed"
        if self.shutdown_reason is not None:
            return "shutdown"
        if self.paused:
            return "paused"
        if all(v.blocked or not v.up for v in self.vcpus):
            return "blocked"
        return "running"

    def state_flags(self) -> str:
        """xl list's State column: r b p s c d."""
        st = self.state
        return "".join(c if st == n else "-" for c, n in (("r", "running"), ("b", "blocked"),
                       ("p", "paused"), ("s", "shutdown"), ("c", "crashed"), ("d", "dying")))

    def _stop_vcpus(self) -> None:
        for v in self.vcpus:
            with v.cond:
                v.stop = True
                v.attention = True
                v.cond.notify_all()
            if threading.get_ident() != v.kvm.thread_id:
                v.kvm.kick()

    def shutdown(self, reason: int) -> None:
        with self.state_lock:
            if self.shutdown_reason is not None or self.crashed:
                return
            self.shutdown_reason = reason
        self.log(f"shutdown: {abi.SHUTDOWN_NAMES.get(reason, reason)}", always=True)
        self._stop_vcpus()
        if reason == abi.SHUTDOWN_suspend and self.suspend_evtchn:
            # Xen's __domain_finalise_shutdown: the subscribed toolstack hears
            # of the suspend on that channel (a port since closed: nobody hears)
            try:
                self.evtchn.send(self.suspend_evtchn)
            except XenError:
                pass
        if self.on_state:
            self.on_state(self)

    def crash(self, why: str, regs: str = "") -> None:
        with self.state_lock:
            if self.crashed or self.shutdown_reason is not None:
                return
            self.crashed = True
            self.shutdown_reason = abi.SHUTDOWN_crash
            self.crash_info = why + ("\n" + regs if regs else "")
        self.log(f"domain crashed: {why}", always=True)
        for line in regs.splitlines():
            self.log(line, always=True)
        self._stop_vcpus()
        if self.on_state:
            self.on_state(self)

    def pause(self) -> None:
        with self.state_lock:
            self.paused += 1
        for v in self.vcpus:
            with v.cond:
                v.paused = self.paused
                v.attention = True
            v.kvm.kick() if threading.get_ident() != v.kvm.thread_id else None
        if self.on_state:
            self.on_state(self)

    def unpause(self) -> None:
        with self.state_lock:
            if self.paused:
                self.paused -= 1
        for v in self.vcpus:
            with v.cond:
                v.paused = self.paused
                v.attention = True
                v.cond.notify_all()
        if self.on_state:
            self.on_state(self)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until every vCPU thread has left the guest."""
        end = None if timeout is None else time.monotonic() + timeout
        for v in self.vcpus:
            if v.thread is None:
                continue
            v.thread.join(None if end is None else max(0.0, end - time.monotonic()))
            if v.thread.is_alive():
                return False
        return True

    def peer_gone(self, domid: int) -> None:
        """Another domain died: unbind our channels to it, clear its grant use."""
        self.evtchn.peer_gone(domid)
        self.gnttab.peer_gone(domid)

    def destroy(self) -> None:
        self.dying = True
        self._stop_vcpus()
        self.timers.close()
        self.wait_stopped(5.0)
        self.gnttab.release_all()
        if isinstance(self.directory, LocalDirectory):
            self.directory.forget(self)
        if self.console is not None:
            self.console.close()

    def close(self) -> None:
        """Release the VM and memory (after destroy)."""
        self.shared_info.release()
        self.machine.close()

    # ------------------------------------------------------------ info
    def info(self) -> dict[str, object]:
        cpu_ns = sum(v.runstate_time[abi.RUNSTATE_running] for v in self.vcpus)
        return {"domid": self.domid, "name": self.name, "state": self.state,
                "flags": self.state_flags(), "memory_mib": self.tot_pages // 256,
                "maxmem_mib": self.max_pages // 256, "vcpus": len(self.vcpus),
                "shutdown_reason": None if self.shutdown_reason is None
                else abi.SHUTDOWN_NAMES.get(self.shutdown_reason, str(self.shutdown_reason)),
                "cpu_time_ns": cpu_ns, "uptime_s": time.time() - self.create_time,
                "stats": {f"vcpu{v.id}": dict(v.stats, exits=v.n_exits, hypercalls=v.n_hypercalls)
                          for v in self.vcpus},
                "hypercalls": {abi.HYPERCALL_NAMES.get(i, str(i)): n
                               for i, n in enumerate(self.hypercalls.counts) if n},
                "event_sends": self.evtchn.sends}

    # ------------------------------------------------------------ hypercall helpers
    def console_io_write(self, data: bytes) -> None:
        """HYPERVISOR_console_io output: the guest's early console.  As Xen, it
        goes to the hypervisor log (``pyxen dmesg``), one line at a time with
        the domain's prefix, rate-limited with the domain's other chatter
        (Xen prints a domU's console_io as guest_printk, which is); pyxen
        also shows it on the domain's console, so early boot messages reach
        the user, where it counts against the console's byte rate limit."""
        self.console_output(data)
        buf = self.console_io_partial + data
        *lines, self.console_io_partial = buf.split(b"\n")
        while len(self.console_io_partial) > CONSOLE_IO_LINE_MAX:  # a line that never ends
            lines.append(self.console_io_partial[:CONSOLE_IO_LINE_MAX])
            self.console_io_partial = self.console_io_partial[CONSOLE_IO_LINE_MAX:]
        for line in lines:
            self.log(line.decode(errors="replace").rstrip("\r"))

    def flush_all_tlbs(self, v: VCPU) -> None:
        v.flush_requested = True
        for o in self.vcpus:
            if o is not v and o.up:
                o.post(VCPU.POST_FLUSH)

    def clear_page(self, mfn: int) -> None:
        self.ft.get_type(mfn, PGT_WRITABLE)
        try:
            off = self.machine.ram_offset(mfn)
            self.machine.ram[off:off + abi.PAGE_SIZE] = bytes(abi.PAGE_SIZE)
            self.mark_dirty(mfn)
        finally:
            self.ft.put_type(mfn)

    def copy_page(self, dst: int, src: int) -> None:
        if not self.ft.owns(src):
            raise XenError(abi.EINVAL, f"copy from frame {src:#x} not owned")
        self.ft.get_type(dst, PGT_WRITABLE)
        try:
            so, do = self.machine.ram_offset(src), self.machine.ram_offset(dst)
            self.machine.ram[do:do + abi.PAGE_SIZE] = self.machine.ram[so:so + abi.PAGE_SIZE]
            self.mark_dirty(dst)
        finally:
            self.ft.put_type(dst)

    def register_vcpu_info(self, caller: VCPU, v: VCPU, arg: int) -> int:
        mfn, offset, _ = struct.unpack("<QII", caller.copy_from_guest(arg, 16))
        if v.vi_buf is not self.shared_info:
            raise XenError(abi.EINVAL, "vcpu_info already registered")
        if offset + abi.VCPU_INFO_SIZE > abi.PAGE_SIZE or offset & 7:
            raise XenError(abi.EINVAL, "vcpu_info crosses a page")
        if not self.ft.owns(mfn) or mfn == self.shared_info_mfn:
            raise XenError(abi.EINVAL, f"frame {mfn:#x} not usable for vcpu_info")
        self.ft.get_type(mfn, PGT_WRITABLE)  # held for the domain's lifetime, as Xen
        base = self.machine.ram_offset(mfn)
        old = bytes(v.vi_buf[v.vi_off:v.vi_off + abi.VCPU_INFO_SIZE])
        v.vi_buf = self.machine.ram_view[base:base + abi.PAGE_SIZE]
        v.vi_off = offset
        v.vi_mfn = mfn
        v.vi_buf[offset:offset + abi.VCPU_INFO_SIZE] = old
        # as Xen: mark every selector bit so the guest rescans after the move
        struct.pack_into("<Q", v.vi_buf, offset + abi.VI_PENDING_SEL, (1 << 64) - 1)
        v.vi_buf[offset + abi.VI_UPCALL_PENDING] = 1
        v.update_time()
        return 0

    def vcpu_updown(self, caller: VCPU, v: VCPU, cmd: int, arg: int) -> int:
        """VCPUOP_initialise/up/down as Xen's common_vcpu_op.  Taking down the
        last vCPU that is up shuts the domain down (poweroff), as Xen does, so a
        guest that offlines its only CPU ends instead of spinning."""
        if cmd == abi.VCPUOP_down:
            if not any(o.up for o in self.vcpus if o is not v):
                self.log(f"vcpu {v.id} went down and no other vCPU is up: powering off")
                self.shutdown(abi.SHUTDOWN_poweroff)
                return 0
            with v.cond:
                if v.up:
                    v.up = False
                    v.attention = True
            if v is caller:
                v._set_runstate(abi.RUNSTATE_offline)
            else:
                v.kvm.kick()
            return 0
        if cmd == abi.VCPUOP_up:
            if not v.initialised:
                raise XenError(abi.EINVAL, f"vcpu {v.id} has no initial state")
            with v.cond:
                v.up = True
                v.attention = True
                v.cond.notify_all()
            return 0
        if v.initialised:
            raise XenError(abi.EEXIST, f"vcpu {v.id} is already initialised")
        raise XenError(abi.ENOSYS, "secondary vCPUs arrive with the SMP issue")

    # ------------------------------------------------------------ descriptor tables
    @staticmethod
    def check_descriptor(desc: int) -> int:
        """Xen's check_descriptor for a 64-bit PV guest: code/data segments are
        forced to DPL 3 with the accessed bit set (so the CPU never writes the
        table); system descriptors are refused."""
        if not desc >> 47 & 1:
            return desc  # not present: anything goes
        if not desc >> 44 & 1:
            raise XenError(abi.EINVAL, f"system descriptor {desc:#x} not allowed")
        return desc | (3 << 45) | (1 << 40)

    def set_gdt(self, v: VCPU, frames_ptr: int, entries: int) -> int:
        if entries > abi.FIRST_RESERVED_GDT_ENTRY:
            raise XenError(abi.EINVAL, f"{entries} GDT entries is too many")
        nframes = (entries + 511) // 512
        frames = list(struct.unpack(f"<{nframes}Q", v.copy_from_guest(frames_ptr, 8 * nframes))) \
            if nframes else []
        taken: list[int] = []
        try:
            for mfn in frames:
                if not self.ft.owns(mfn):
                    raise XenError(abi.EINVAL, f"GDT frame {mfn:#x} not owned")
                off = self.machine.ram_offset(mfn)
                # the type first: once it is held no grant or backend can write
                # the frame between the check and its use
                self.ft.get_type(mfn, PGT_SEG)
                taken.append(mfn)
                descs = struct.unpack_from("<512Q", self.machine.ram, off)
                fixed = [self.check_descriptor(dsc) for dsc in descs]
                if fixed != list(descs):
                    struct.pack_into("<512Q", self.machine.ram, off, *fixed)
                    self.mark_dirty(mfn)
        except XenError:
            for mfn in taken:
                self.ft.put_type(mfn)
            raise
        for mfn in v.gdt_frames:
            self.ft.put_type(mfn)
        v.gdt_frames = taken
        self.machine.map_gdt_frames(v.id, taken, self._hv_touch)
        v.flush_requested = True
        return 0

    def _hv_touch(self, va: int) -> None:
        with self.mmu_lock:
            self.mmu_pending.append(va)

    def update_descriptor(self, maddr: int, desc: int) -> int:
        if maddr & 7:
            raise XenError(abi.EINVAL, "misaligned descriptor address")
        mfn = maddr >> 12
        if not self.ft.owns(mfn):
            raise XenError(abi.EINVAL, f"descriptor frame {mfn:#x} not owned")
        desc = self.check_descriptor(desc)
        t, c = self.ft.type_of(mfn)
        off = maddr - (M.MFN_BASE << 12)
        self.mark_dirty(mfn)
        if c and t == PGT_SEG:
            struct.pack_into("<Q", self.machine.ram, off, desc)
            return 0
        self.ft.get_type(mfn, PGT_WRITABLE)
        try:
            struct.pack_into("<Q", self.machine.ram, off, desc)
        finally:
            self.ft.put_type(mfn)
        return 0

    # ------------------------------------------------------------ save / restore (migration)
    def resume_after_suspend(self, cancelled: bool = True) -> None:
        """Xen's XEN_DOMCTL_resumedomain after a checkpoint or a failed save
        (libxl's cooperative resume): the suspend hypercall returns 1 in vCPU0
        ("cancelled": the guest keeps its event channels, xenstore and grant
        table as they are) and the vCPUs run again.  ``cancelled=False`` (0)
        is what a restored domain sees instead, not used here."""
        with self.state_lock:
            if self.shutdown_reason != abi.SHUTDOWN_suspend or self.crashed or self.dying:
                raise XenError(abi.EINVAL, f"domain {self.domid} is {self.state}, not suspended")
        self.wait_stopped(5.0)
        v0 = self.vcpus[0]
        v0.kvm.regs.rax = 1 if cancelled else 0
        v0.kvm.mark_regs_dirty()
        with self.state_lock:
            self.shutdown_reason = None
            self.shutdown_code = None
        for v in self.vcpus:
            with v.cond:
                v.stop = False
                v.attention = True
            if v.thread is not None and not v.thread.is_alive():
                v.thread = None
                v.start()
        self.log("resumed after suspend" + (" (cancelled)" if cancelled else ""), always=True)
        if self.on_state:
            self.on_state(self)

    def restore_shared_info(self, old: bytes) -> None:
        """The stream's SHARED_INFO, as Xen's restore (handle_shared_info):
        the vcpu_info array and the arch part are kept; every port is
        masked and nothing is pending, because every event channel of the
        saved domain is closed here; the guest unmasks what it binds again."""
        si = self.shared_info
        n = abi.XEN_LEGACY_MAX_VCPUS * abi.VCPU_INFO_SIZE
        si[:n] = old[:n]
        for i in range(abi.XEN_LEGACY_MAX_VCPUS):
            o = i * abi.VCPU_INFO_SIZE
            si[o + abi.VI_UPCALL_PENDING] = 0
            struct.pack_into("<Q", si, o + abi.VI_PENDING_SEL, 0)
        si[abi.SI_EVTCHN_PENDING:abi.SI_EVTCHN_MASK] = bytes(abi.SI_EVTCHN_MASK - abi.SI_EVTCHN_PENDING)
        si[abi.SI_EVTCHN_MASK:abi.SI_WC_VERSION] = b"\xff" * (abi.SI_WC_VERSION - abi.SI_EVTCHN_MASK)
        si[abi.SI_ARCH:abi.PAGE_SIZE] = old[abi.SI_ARCH:abi.PAGE_SIZE]
        struct.pack_into("<Q", si, abi.SI_ARCH_MAX_PFN, self.nr_pages)
        self.clock.write_wallclock(si, 0)

    def restore_gdt(self, v: VCPU, frames: list[int]) -> None:
        """A restored vCPU's GDT (set_gdt's checks, frames given as machine frames)."""
        taken: list[int] = []
        try:
            for mfn in frames:
                if not self.ft.owns(mfn):
                    raise XenError(abi.EINVAL, f"GDT frame {mfn:#x} not owned")
                self.ft.get_type(mfn, PGT_SEG)
                taken.append(mfn)
                off = self.machine.ram_offset(mfn)
                descs = struct.unpack_from("<512Q", self.machine.ram, off)
                struct.pack_into("<512Q", self.machine.ram, off, *[self.check_descriptor(x) for x in descs])
        except XenError:
            for mfn in taken:
                self.ft.put_type(mfn)
            raise
        v.gdt_frames = taken
        self.machine.map_gdt_frames(v.id, taken, self._hv_touch)
