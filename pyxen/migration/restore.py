"""Restore a domain from Xen's stream (what ``xl restore`` does, libxc's
``xg_sr_restore.c`` and ``xg_sr_restore_x86_pv.c``).

The config in the xl header gives the domain to build (``read_config``); an
empty :class:`~pyxen.hv.domain.Domain` of that size is made and the records
are applied to it, each checked before use:

* PAGE_DATA: every pfn must be below the domain's maximum; page-table pages
  are localised (pfn -> mfn, a pfn the domain cannot have is an error) and
  written to RAM before the VM first runs, which is what the builder does for
  a fresh domain (a host write of a not-present-to-present entry is seen by
  the guest's first walk: platform-notes.md fact 1).  XTAB pfns stay free.
* At END, as Xen's stream_complete: the pinned tables are pinned (each pin
  validates the whole tree below it with the PV MMU's rules, so a table that
  maps a frame the domain does not own fails here, with the MMU's message),
  each vCPU's state is set and its CR3 takes its type reference, start_info
  gets the new console and xenstore frames and event channels
  (process_start_info), and the clock continues from the save.

Nothing of the saved domain's event channels and grant table is restored:
Xen's restored domain starts with all channels closed and an empty grant
table; the guest rebinds and re-grants when its suspend hypercall returns 0.
The toolstack sets up the console and xenstore channels as for a new domain.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from .. import abi
from ..abi import XenError
from ..hv import machine as M
from . import stream as S

if TYPE_CHECKING:
    from ..hv.domain import Domain, DomainSpec

Progress = Callable[[int, int, int], None]  # pages done, pages in all, bytes read
_ZERO_PAGE = bytes(S.PAGE_SIZE)
_ZEROS = bytes(S.MAX_BATCH_SIZE * S.PAGE_SIZE)  # a record's longest run (memcmp via startswith)
_INVALID_M2P = (1 << 64) - 1  # INVALID_M2P_ENTRY: what a fresh domain's M2P holds
# one literal byte: sre finds it at C speed (memchr), where a character class
# ([^\\x00]) or a repeat (\\x01+) steps byte by byte: 0.2-0.4 ms over a 128 MiB
# domain's 32768 pfns, in the downtime
_ONE = re.compile(b"\\x01")
_NONZERO_TO_ONE = bytes([0] + [1] * 255)
_ZERO_TO_ONE = bytes([1] + [0] * 255)


def _runs(b: bytes, v: int, lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The runs [start, end) of the byte ``v`` (0 or 1) in ``b[lo:hi]``, a
    bytemap of 0s and 1s, found with bytes.find (memchr)."""
    other = v ^ 1
    i = b.find(v, lo, hi)
    while i >= 0:
        j = b.find(other, i, hi)
        if j < 0:
            j = hi
        yield i, j
        i = b.find(v, j, hi)


class PfnSet:
    """The pfns a stream populated: a byte per pfn, so that END finds the free
    pfns and the M2P's runs at C speed (a 512 MiB domain has 131072 pfns)."""

    def __init__(self, n: int) -> None:
        self.b = bytearray(n)

    def __contains__(self, pfn: object) -> bool:
        return isinstance(pfn, int) and 0 <= pfn < len(self.b) and bool(self.b[pfn])

    def add(self, pfn: int) -> None:
        self.b[pfn] = 1

    def add_range(self, start: int, n: int) -> None:
        self.b[start:start + n] = b"\1" * n

    def discard(self, pfn: int) -> None:
        if 0 <= pfn < len(self.b):
            self.b[pfn] = 0

    def __len__(self) -> int:
        return len(self.b) - self.b.count(0)

    def runs(self) -> list[tuple[int, int]]:
        """(first pfn, count) of each run of populated pfns."""
        b = bytes(self.b)
        return [(i, j - i) for i, j in _runs(b, 1, 0, len(b))]

    def missing(self) -> set[int]:
        return {m.start() for m in re.finditer(b"\x00", self.b)}


class RestoreError(Exception):
    """The stream cannot be restored; no domain is left behind."""


@dataclass
class RestoreStats:
    pages: int = 0
    bytes: int = 0
    seconds: float = 0.0
    pinned: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    live: dict[str, Any] = field(default_factory=dict)  # pre-validation during live rounds


def read_config(items: Iterator[S.Item]) -> tuple[dict[str, Any], Iterator[S.Item]]:
    """The xl header's config (JSON) from the first item; the rest follows."""
    first = next(items, None)
    if first is None or not isinstance(first.value, S.XlHeader):
        raise RestoreError("not an xl save file: no xl header (pyxen restore needs the "
                           "domain's config, which xl's header carries)")
    cfg = first.value.config_json()
    if not isinstance(cfg, dict):
        raise RestoreError("the save file's header carries no JSON config")
    return cfg, items


def spec_from_config(cfg: dict[str, Any], domid: int) -> DomainSpec:
    """A DomainSpec from the header's config (pyxen's own, or xl's c_info/b_info)."""
    from ..hv.domain import DomainSpec
    ps = cfg.get("pyxen_spec")
    if isinstance(ps, dict):
        known = {f for f in DomainSpec.__dataclass_fields__}
        kw = {k: v for k, v in ps.items() if k in known}
        kw["domid"] = domid
        try:
            return DomainSpec(**kw)
        except TypeError as e:
            raise RestoreError(f"config in the save file: {e}") from None
    ci, bi = cfg.get("c_info") or {}, cfg.get("b_info") or {}
    try:
        mem = int(bi.get("target_memkb") or bi["max_memkb"]) // 1024
        return DomainSpec(name=str(ci["name"]), memory_mib=mem,
                          maxmem_mib=int(bi.get("max_memkb", mem * 1024)) // 1024,
                          kernel="", vcpus=int(bi.get("max_vcpus", 1)), domid=domid,
                          uuid=str(ci.get("uuid") or DomainSpec.uuid))
    except (KeyError, TypeError, ValueError) as e:
        raise RestoreError(f"config in the save file lacks the domain's name or size ({e})") from None


class _Restorer:
    def __init__(self, d: Domain, progress: Progress | None) -> None:
        self.d = d
        self.progress = progress
        self.max_pfn = d.max_pages - 1
        self.seen = PfnSet(d.max_pages)
        self.xtab: set[int] = set()
        self.pins: dict[int, int] = {}  # pfn -> level (a later round's type wins)
        self.types: dict[int, int] = {}
        self.vcpu: dict[int, dict[int, bytes]] = {}
        self.shared_info: bytes | None = None
        self.tsc: S.TscInfo | None = None
        self.state: dict[str, Any] = {}
        self.stats = RestoreStats()
        self.pv_info = False
        # live migration: the page tables validated while later rounds come in
        # (``_prevalidate``), so that END does not validate every table anew
        self.round_end: Callable[[int], None] | None = None
        self.prevalidated = False
        self.prevalidate_tries = 0
        self.stats_prevalidated = {"tries": 0, "teardowns": 0, "diffs": 0}
        self.prevalidated_at_end = False
        # the populated pfns whose M2P entries are written (``_sync_m2p``): at a
        # live round's end all of them, at END only what changed since
        self.m2p_seen: bytes | None = None

    def pfn_to_mfn(self, pfn: int) -> int | None:
        return pfn + M.MFN_BASE if 0 <= pfn <= self.max_pfn else None

    # ------------------------------------------------------------ live rounds
    # A live stream marks the end of each round (PYXEN_ROUND_END).  At that
    # point the image holds a whole (if fuzzy) copy of the domain: its
    # pinned tables are validated then, while the source still runs, and each
    # page table a later round re-sends is applied entry by entry against the
    # validated state (only the entries that changed take or drop references,
    # as an mmu_update would).  What cannot be applied that way (a table that
    # became data or changed level or pin, an entry the MMU refuses on this
    # fuzzy image) tears the validation down first, while memory still matches
    # it, and END validates everything as a plain restore does.

    def _sync_m2p(self) -> None:
        """The M2P as the pages populated now say: mfn = pfn + MFN_BASE for
        each, INVALID_M2P_ENTRY for a pfn no longer populated (given back:
        XTAB).  Writing it for a 128 MiB domain takes ~0.7 ms, so a live
        stream writes it at each round end, while the source still runs, and
        END (the downtime) writes only the pfns whose state changed since."""
        cur = bytes(self.seen.b)
        old = self.m2p_seen
        m = self.d.machine
        if old is None:
            for start, n in self.seen.runs():
                m.set_m2p_range(start + M.MFN_BASE, start, n)
        elif cur != old:
            changed = (int.from_bytes(cur, "little") ^ int.from_bytes(old, "little")).to_bytes(
                len(cur), "little")
            for a, b in _runs(changed, 1, 0, len(changed)):  # (bytes 0/1: the XOR too)
                for p, q in _runs(cur, 1, a, b):
                    m.set_m2p_range(p + M.MFN_BASE, p, q - p)
                for p, q in _runs(cur, 0, a, b):
                    for pfn in range(p, q):
                        m.set_m2p(pfn + M.MFN_BASE, _INVALID_M2P)
        self.m2p_seen = cur

    def _ft_index(self, pfn: int) -> int:
        return pfn + M.MFN_BASE - self.d.ft.mfn_base

    def _pinned_pfns(self) -> list[int]:
        lo = self._ft_index(0)
        # (a literal byte is searched at C speed, a character class byte by byte:
        # 0.17 ms for a 128 MiB domain, in the downtime)
        pinned = bytes(self.d.ft.pinned[lo:lo + self.d.max_pages]).translate(_NONZERO_TO_ONE)
        return [m.start() for m in _ONE.finditer(pinned)]

    def _free_but_typed(self) -> bool:
        """Does a pfn the stream left unpopulated still hold a type reference
        (from the tables validated during the live rounds)?  A frame with a
        reference has a type (FrameTable keeps count > 0 only with a type set),
        so the free and typed bytemaps are intersected at C speed and only
        the few frames in both are looked at (a pfn by pfn walk of the free
        pfns costs milliseconds in the downtime for a ballooned-down guest)."""
        ft = self.d.ft
        lo, n = self._ft_index(0), self.d.max_pages
        free = int.from_bytes(bytes(self.seen.b).translate(_ZERO_TO_ONE), "little")
        if not free:
            return False
        typed = int.from_bytes(bytes(ft.type[lo:lo + n]).translate(_NONZERO_TO_ONE), "little")
        both = free & typed
        return bool(both) and any(ft.count[lo + m.start()]
                                  for m in _ONE.finditer(both.to_bytes(n, "little")))

    def _prevalidate(self) -> None:
        self.prevalidate_tries += 1
        self.stats_prevalidated["tries"] += 1
        try:
            self.d.ft.restore_pins([(pfn + M.MFN_BASE, lv) for pfn, lv in self.pins.items()])
        except XenError:
            self._teardown()
            return
        self.prevalidated = True

    def _teardown(self) -> None:
        """Unpin everything (each table devalidated from memory that still
        matches its references): back to a frame table with no types."""
        ft = self.d.ft
        for pfn in self._pinned_pfns():
            ft.unpin(pfn + M.MFN_BASE)
        if any(ft.count[self._ft_index(0):self._ft_index(self.d.max_pages)]):
            raise S.StreamError("internal: page-table references left after undoing the "
                                "validation of a live round")
        self.prevalidated = False
        self.stats_prevalidated["teardowns"] += 1

    def _apply_validated(self, pfn: int, t: S.PageType, page: bytes) -> bool | None:
        """A page arriving over the validated image: True if applied here,
        None if it is an ordinary write, False if the validation must go."""
        from ..hv import mm
        ft = self.d.ft
        i = self._ft_index(pfn)
        cur, cnt = ft.type[i], ft.count[i]
        cur_pt = bool(cnt) and mm.PGT_L1 <= cur <= mm.PGT_L4
        if not t.level:
            return False if cur_pt else None
        if not cur_pt:
            # becoming a table while the image still maps it writable (Linux's
            # xen_mm_pin_all before a suspend makes a process's tables read-only
            # and pins them: the L1 that drops the writable mapping may come
            # later in the round): plain data until END pins its tree, which
            # needs that mapping gone by then.  Typed otherwise (GDT): conflict
            return None if not cnt or cur == mm.PGT_WRITABLE else False
        if cur != t.level:
            return False
        old = ft.read_table(pfn + M.MFN_BASE)
        new = struct.unpack("<512Q", page)
        ram = self.d.machine.ram
        base = pfn << 12
        lv = t.level
        for idx in range(512):
            o, n = old[idx], new[idx]
            if o == n or (lv == 4 and mm.XEN_L4_FIRST <= idx <= mm.XEN_L4_LAST):
                continue
            a = ft._adjust(n)  # noqa: SLF001 - the MMU's own entry rules
            if a == o:
                continue
            try:
                if a & 1:
                    ft._get_entry_ref(a, lv)  # noqa: SLF001
            except XenError:
                return False  # entries before this one are applied: memory matches the refs
            struct.pack_into("<Q", ram, base + idx * 8, a)
            ft._put_entry_ref(o, lv)  # noqa: SLF001
        if ft.pinned[i] and not t.pinned:  # unpinned since: drop the pin's reference
            ft.unpin(pfn + M.MFN_BASE)
        # (pinned since: END's restore_pins takes the pin, the table is valid)
        self.stats_prevalidated["diffs"] += 1
        return True

    def page_data(self, body: bytes) -> None:
        """One PAGE_DATA record (checked as Xen's handle_page_data).  Runs of
        ordinary pages at consecutive pfns are copied with one slice each; a
        run of XALLOC pages (Xen's "allocate only": populated, no contents
        sent) or of zero pages is not written into fresh memory, so it is
        never allocated; page tables, and pages over the tables validated
        during a live round, go one by one."""
        ft = self.d.ft
        ftype, fcount = ft.type, ft.count
        pv = self.prevalidated
        base = M.MFN_BASE - ft.mfn_base
        u = S.PageData.uniform_run(body, self.max_pfn)
        if u is not None and u[1] in (S.PageType.NOTAB, S.PageType.XALLOC) and not (
                pv and any(fcount[base + u[0]:base + u[0] + u[2]])):
            # one run of ordinary or XALLOC pages (most records): no entry-by-entry walk
            pfn, t, n = u
            self._run(None if t == S.PageType.XALLOC else memoryview(body), pfn, 8 + 8 * n, n)
            return
        pfns = S.PageData.unpack_header(body, self.max_pfn)
        mv = memoryview(body)
        off = 8 + 8 * len(pfns)
        run_pfn, run_off, run_n, run_zero = -1, 0, 0, False
        notab, xalloc = S.PageType.NOTAB, S.PageType.XALLOC
        for pfn, t in pfns:
            if (t == notab or t == xalloc) and not (
                    pv and fcount[base + pfn] and 1 <= ftype[base + pfn] <= 4):
                zero = t == xalloc
                if run_n and pfn == run_pfn + run_n and zero == run_zero:
                    run_n += 1
                else:
                    self._run(None if run_zero else mv, run_pfn, run_off, run_n)
                    run_pfn, run_off, run_n, run_zero = pfn, off, 1, zero
                if not zero:
                    off += S.PAGE_SIZE
                continue
            self._run(None if run_zero else mv, run_pfn, run_off, run_n)
            run_n = 0
            if t.has_data:
                self._one(pfn, t, bytes(mv[off:off + S.PAGE_SIZE]))
                off += S.PAGE_SIZE
            elif t == xalloc:  # over a validated page table: the slow path with a zero page
                self._one(pfn, notab, _ZERO_PAGE)
            else:
                self._one(pfn, t, None)
        self._run(None if run_zero else mv, run_pfn, run_off, run_n)

    def _run(self, mv: memoryview | None, pfn: int, off: int, n: int) -> None:
        """``n`` ordinary pages from ``pfn``: their data at ``off`` in ``mv``,
        or zeros (``mv`` None: XALLOC)."""
        if not n:
            return
        ram = self.d.machine.ram
        seen, types, pins = self.seen, self.types, self.pins
        data = mv[off:off + n * S.PAGE_SIZE] if mv is not None else None
        if data is None or _ZEROS.startswith(data):
            b = seen.b
            if b.find(1, pfn, pfn + n) >= 0:  # zeros: only over pages written before
                for p in range(pfn, pfn + n):
                    if b[p]:
                        ram[p << 12:(p + 1) << 12] = _ZERO_PAGE
        else:
            ram[pfn << 12:(pfn + n) << 12] = data
        seen.add_range(pfn, n)
        if types:  # the page tables among them are ordinary pages now
            gone = range(pfn, pfn + n) if n <= len(types) + len(pins) else [
                p for p in (*types, *pins) if pfn <= p < pfn + n]
            for p in gone:
                types.pop(p, None)
                pins.pop(p, None)
        if self.xtab:
            self.xtab.difference_update(range(pfn, pfn + n))
        self.stats.pages += n

    def _one(self, pfn: int, t: S.PageType, page: bytes | None) -> None:
        ram = self.d.machine.ram
        if self.prevalidated and t == S.PageType.XTAB and self.d.ft.count[self._ft_index(pfn)]:
            self._teardown()  # a typed frame given back: undo before it goes
        if page is None:
            if t == S.PageType.XTAB:
                self.xtab.add(pfn)
                self.seen.discard(pfn)
                self.types.pop(pfn, None)
                self.pins.pop(pfn, None)
            return
        if t.level:
            page = S.localise_pagetable(page, t.level, self.pfn_to_mfn)
        if self.prevalidated:
            done = self._apply_validated(pfn, t, page)
            if done is False:
                self._teardown()
            elif done:
                self.types[pfn] = t.level
                if t.pinned:
                    self.pins[pfn] = t.level
                else:
                    self.pins.pop(pfn, None)
                self.seen.add(pfn)
                self.xtab.discard(pfn)
                self.stats.pages += 1
                return
        if t.level:
            self.types[pfn] = t.level
            if t.pinned:
                self.pins[pfn] = t.level
            else:
                self.pins.pop(pfn, None)
        else:
            self.types.pop(pfn, None)
            self.pins.pop(pfn, None)
        off = pfn << 12
        if page != _ZERO_PAGE or pfn in self.seen:
            # a fresh domain's RAM reads zeros: a zero page is not written,
            # so it is never allocated (restoring a mostly empty domain
            # takes no more host memory than the domain had in use)
            ram[off:off + S.PAGE_SIZE] = page
        self.seen.add(pfn)
        self.xtab.discard(pfn)
        self.stats.pages += 1

    def item(self, it: S.Item) -> bool:
        """Apply one item; True at the libxc END."""
        v = it.value
        if it.layer != "libxc" or it.rtype is None:
            return False
        if it.rtype == S.Rec.X86_PV_INFO:
            self.pv_info = True
        elif it.rtype == S.Rec.PAGE_DATA:
            if not self.pv_info:
                raise S.StreamError("PAGE_DATA before X86_PV_INFO")
            self.page_data(it.body)
        elif it.rtype in (S.Rec.X86_PV_VCPU_BASIC, S.Rec.X86_PV_VCPU_EXTENDED,
                          S.Rec.X86_PV_VCPU_XSAVE, S.Rec.X86_PV_VCPU_MSRS):
            blob = S.VcpuBlob.unpack(it.rtype, it.body, len(self.d.vcpus))
            if blob.context:
                self.vcpu.setdefault(blob.vcpu_id, {})[it.rtype] = blob.context
        elif it.rtype == S.Rec.SHARED_INFO:
            self.shared_info = v
        elif it.rtype == S.Rec.X86_TSC_INFO:
            self.tsc = v
        elif it.rtype == S.Rec.PYXEN_DOMAIN_STATE:
            if not isinstance(v, dict):
                raise S.StreamError("PYXEN_DOMAIN_STATE is not a JSON object")
            self.state = v
        elif it.rtype == S.Rec.PYXEN_ROUND_END:
            if not self.prevalidated and self.pins and self.prevalidate_tries < 3:
                self._prevalidate()
            self._sync_m2p()  # (before the source hears the round is applied and suspends)
            if self.round_end is not None:
                self.round_end(int(v))
        elif it.rtype == S.Rec.CHECKPOINT:
            raise S.StreamError("a checkpointed (Remus/COLO) stream: not supported")
        elif it.rtype == S.Rec.END:
            return True
        return False

    # ------------------------------------------------------------ at END
    def complete(self) -> None:
        d = self.d
        if not self.pv_info:
            raise S.StreamError("no X86_PV_INFO record")
        if 0 not in self.vcpu or S.Rec.X86_PV_VCPU_BASIC not in self.vcpu[0]:
            raise S.StreamError("no X86_PV_VCPU_BASIC record for vcpu 0")
        if self.shared_info is None:
            raise S.StreamError("no SHARED_INFO record")
        # memory: what the stream did not populate is free, as in the saved domain
        with d.reservation_lock:
            d.free_pfns = self.seen.missing()
        self._sync_m2p()
        # the clock first: vCPU time records are written against it
        sys_ns = self.tsc.nsec if self.tsc is not None else int(
            (self.state.get("clock") or {}).get("system_time_ns", 0))
        d.clock.restore_state(sys_ns)
        d.restore_shared_info(self.shared_info)
        # page tables: pins (each validates its tree; tables pre-validated
        # during the live rounds are pinned already, if they still stand)
        self.prevalidated_at_end = False
        pins = [(pfn + M.MFN_BASE, lv) for pfn, lv in self.pins.items()]
        if self.prevalidated:
            ft = d.ft
            if self._free_but_typed():
                self._teardown()  # a free pfn is still referenced from the live rounds' tables
            else:  # what the stream no longer pins goes; new pins are taken below
                for pfn in set(self._pinned_pfns()) - set(self.pins):
                    ft.unpin(pfn + M.MFN_BASE)
            self.prevalidated_at_end = self.prevalidated
        try:
            try:
                d.ft.restore_pins(pins)
            except XenError:
                if not self.prevalidated:
                    raise
                # a new pin does not validate over the live rounds' state (a
                # frame still typed from them): validate everything anew, as
                # a plain restore does; a real fault fails there too
                self._teardown()
                self.prevalidated_at_end = False
                d.ft.restore_pins(pins)
        except XenError as e:
            raise S.StreamError(f"a pinned page table does not validate: {e.why or e}") from None
        self.stats.pinned = len(self.pins)
        # start_info: new console/xenstore frames and channels, as process_start_info
        ctxs = {vid: S.VcpuContext.unpack(recs[S.Rec.X86_PV_VCPU_BASIC])
                for vid, recs in self.vcpu.items() if S.Rec.X86_PV_VCPU_BASIC in recs}
        si_pfn = ctxs[0].regs.get("rdx", 0)
        ctxs[0].regs["rdx"] = self.start_info(si_pfn)
        d.vm_assist = ctxs[0].vm_assist
        vstate = {int(v.get("id", -1)): v for v in self.state.get("vcpus") or [] if isinstance(v, dict)}
        for vid, c in sorted(ctxs.items()):
            self.vcpu_context(vid, c, vstate.get(vid, {}))

    def start_info(self, pfn: int) -> int:
        d = self.d
        if pfn not in self.seen or pfn in self.types:
            raise S.StreamError(f"start_info pfn {pfn:#x} (vcpu 0's rdx) is not an ordinary "
                                "page of the domain")
        off = pfn << 12
        f = list(abi.START_INFO.unpack_from(d.machine.ram, off))
        if not f[0].startswith(b"xen-"):
            raise S.StreamError(f"start_info at pfn {pfn:#x} has no magic ({f[0][:16]!r})")
        store_pfn, console_pfn = f[4], f[6]
        for name, p in (("store", store_pfn), ("console", console_pfn)):
            if p not in self.seen or p in self.types:
                raise S.StreamError(f"start_info's {name} pfn {p:#x} is not an ordinary page of "
                                    "the domain (the guest must put pfns there before suspending, "
                                    "as Linux's xen_pre_suspend does)")
        console_mfn, store_mfn = console_pfn + M.MFN_BASE, store_pfn + M.MFN_BASE
        console_port = d.evtchn.bind_backend(lambda: d.console.on_event()  # type: ignore[union-attr]
                                             if d.console else None, 1)
        store_port = d.evtchn.bind_backend(lambda: d.xs_ring.on_guest_event()  # type: ignore[union-attr]
                                           if d.xs_ring else None, 2)
        f[1] = d.nr_pages
        f[2] = d.shared_info_mfn << 12
        f[4], f[5], f[6], f[7] = store_mfn, store_port, console_mfn, console_port
        abi.START_INFO.pack_into(d.machine.ram, off, *f)
        d.start_info = {"console_mfn": console_mfn, "console_evtchn": console_port,
                        "store_mfn": store_mfn, "store_evtchn": store_port}
        for mfn in (console_mfn, store_mfn):
            d.ft.hold_writable(mfn)
        return pfn + M.MFN_BASE

    def vcpu_context(self, vid: int, c: S.VcpuContext, extra: dict[str, Any]) -> None:
        d = self.d
        v = d.vcpus[vid]
        recs = self.vcpu[vid]
        for i in (1, 3):
            if c.ctrlreg[i]:
                mfn = self.pfn_to_mfn(c.ctrlreg[i] >> 12)
                if mfn is None or (c.ctrlreg[i] >> 12) not in self.seen:
                    raise S.StreamError(f"vcpu {vid}: cr{i} pfn {c.ctrlreg[i] >> 12:#x} is not the domain's")
                c.ctrlreg[i] = mfn << 12
        if not c.ctrlreg[3]:
            raise S.StreamError(f"vcpu {vid}: no page tables (cr3 0)")
        # as Xen's arch_set_info_guest: every address the guest gave must be canonical
        addrs = {"rip": c.regs.get("rip", 0), "rsp": c.regs.get("rsp", 0), "kernel_sp": c.kernel_sp,
                 "fs_base": c.fs_base, "gs_base_kernel": c.gs_base_kernel,
                 "gs_base_user": c.gs_base_user, "event_callback": c.event_callback_eip,
                 "failsafe_callback": c.failsafe_callback_eip,
                 "syscall_callback": c.syscall_callback_eip}
        addrs.update({f"trap {vec} handler": addr for vec, _f, _cs, addr in c.trap_ctxt})
        for what, a in addrs.items():
            if not _canonical(a):
                raise S.StreamError(f"vcpu {vid}: {what} {a:#x} is not a canonical address")
        gdt = []
        for g in c.gdt_frames[:(c.gdt_ents + 511) // 512]:
            mfn = self.pfn_to_mfn(g)
            if mfn is None or g not in self.seen:
                raise S.StreamError(f"vcpu {vid}: GDT pfn {g:#x} is not the domain's")
            gdt.append(mfn)
        ext = S.ExtVcpuContext.unpack(recs[S.Rec.X86_PV_VCPU_EXTENDED]) \
            if S.Rec.X86_PV_VCPU_EXTENDED in recs else None
        msrs = S.unpack_msrs(recs.get(S.Rec.X86_PV_VCPU_MSRS, b""))
        v.restore_context(c, ext, recs.get(S.Rec.X86_PV_VCPU_XSAVE), msrs)
        try:  # CR3 references, as arch_set_info_guest's get_page_and_type(PGT_root)
            d.ft.get_type(c.ctrlreg[3] >> 12, 4)
            if c.ctrlreg[1]:
                d.ft.get_type(c.ctrlreg[1] >> 12, 4)
            if gdt:
                d.restore_gdt(v, gdt)
        except XenError as e:
            raise S.StreamError(f"vcpu {vid}: {e.why or e}") from None
        v.dr7_emul = int(extra.get("dr7_emul", 0)) & 0xFFFFFFFF
        v.nmi_callback = int(extra.get("nmi_callback", 0)) & (2**64 - 1)
        tsc = extra.get("tsc")
        if isinstance(tsc, int) and 0 < tsc < 1 << 63:
            try:  # the guest's TSC continues too (user space reads it directly)
                v.kvm.set_msrs({0x10: tsc})
            except OSError:
                pass


def _canonical(a: int) -> bool:
    return 0 <= a < 1 << 64 and (a >> 47) in (0, 0x1FFFF)


def restore_into(d: Domain, items: Iterator[S.Item], progress: Progress | None = None,
                 total_pages: int | None = None,
                 stamp: Callable[[str], None] | None = None,
                 round_end: Callable[[int], None] | None = None) -> RestoreStats:
    """Apply the libxc records in ``items`` to the new, not yet started domain ``d``.
    ``stamp``: told "tail" at the first record after the pages (a migration's
    downtime breakdown), "END read" at the END record and "complete" once the
    domain is built."""
    t0 = time.monotonic()
    r = _Restorer(d, progress)
    r.round_end = round_end
    total = total_pages or d.max_pages
    done = False
    last = None
    tail = False
    for it in items:
        last = it
        if stamp and not tail and it.rtype == S.Rec.X86_TSC_INFO and it.layer == "libxc":
            tail = True
            stamp("tail")
        if r.item(it):
            if stamp:
                stamp("END read")
            r.complete()
            done = True
            if stamp:
                stamp("complete")
        if progress and it.rtype == S.Rec.PAGE_DATA:
            progress(min(len(r.seen) + len(r.xtab), total), total, it.offset)
        if done and it.layer == "libxl" and it.rtype == S.LibxlRec.END:
            break
    if not done:
        raise S.StreamError("the stream ended before its END record")
    r.stats.seconds = time.monotonic() - t0
    r.stats.bytes = last.offset if last is not None else 0
    r.stats.state = r.state
    r.stats.live = dict(r.stats_prevalidated, still_valid_at_end=r.prevalidated_at_end)
    return r.stats


def restore_domain(f: IO[bytes], domid: int, name: str = "stream",
                   console_sink: Callable[[bytes], None] | None = None,
                   log_sink: Callable[[str], None] | None = None,
                   on_state: Callable[[Domain], None] | None = None,
                   directory: Any = None, start: bool = True,
                   progress: Progress | None = None,
                   rename: str | None = None,
                   spec: DomainSpec | None = None) -> tuple[Domain, RestoreStats]:
    """Read a save file and build the domain it holds (``domctl.create_domain``'s
    counterpart).  Any error destroys the half-built domain and raises
    RestoreError with the reason.  ``spec``: the domain to build (the
    toolstack's, already checked) instead of the one in the file's header."""
    from ..backends.console import ConsoleBackend
    from ..domctl import CreateError, check_spec
    from ..hv.domain import Domain
    items = S.iter_stream(f, name, decode_pages=False)
    try:
        cfg, items = read_config(items)
        file_spec = spec_from_config(cfg, domid)
        if spec is None:
            spec = file_spec
        elif (spec.memory_mib, spec.maxmem_mib) != (file_spec.memory_mib, file_spec.maxmem_mib):
            raise RestoreError(f"the file holds a domain of {file_spec.memory_mib} MiB "
                               f"(maxmem {file_spec.maxmem_mib}), not {spec.memory_mib}")
        if rename:
            spec.name = rename
        check_spec(spec)
    except (S.StreamError, CreateError) as e:
        raise RestoreError(str(e)) from None
    d = Domain(spec, console_sink, on_state, log_sink, directory)
    try:
        stats = restore_into(d, items, progress)
    except (S.StreamError, XenError, ValueError, TypeError, KeyError, IndexError, OverflowError,
            OSError, struct.error) as e:
        why = e.why if isinstance(e, XenError) else str(e)
        d.destroy()
        d.close()
        raise RestoreError(why) from None
    except BaseException:
        d.destroy()
        d.close()
        raise
    off = d.machine.ram_offset(d.start_info["console_mfn"])
    port = d.start_info["console_evtchn"]
    d.console = ConsoleBackend(d.machine.ram_view[off:off + 4096], d.console_output,
                               lambda: d.raise_port(port, 0))
    d.log(f"restored from {name}: {stats.pages} pages, {stats.pinned} pinned tables, "
          f"saved as domain {stats.state.get('domid', '?')}", always=True)
    if start:
        d.start()
    return d, stats


def restore_file(path: str, domid: int, **kw: Any) -> tuple[Domain, RestoreStats]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise RestoreError(f"cannot open {path}: {e.strerror}") from None
    with f:
        return restore_domain(f, domid, name=path, **kw)

