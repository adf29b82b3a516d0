"""The PV MMU: Xen's page-table validation rules, free of KVM.

A PV guest's page tables hold machine frame numbers and are never written
by the guest directly: every update arrives through ``mmu_update``,
``update_va_mapping`` or ``mmuext_op`` and is checked here first.

State per machine frame, as in Xen's ``struct page_info``:

* a *type* (none, L1-L4 page table, segment descriptor page, writable page)
  with a *type count*: a frame has one type at a time and may change it only
  when its type count is zero.  Mapping a frame writable takes a
  ``writable`` type reference, so a frame that is a page table (type L1-L4)
  can never also be mapped writable, and vice versa;
* *pinned*: the guest asked for the frame to stay validated (holds one type
  reference).

When a frame's type count goes 0 → 1 as an Ln page table it is *validated*:
every present entry must refer to a frame the domain owns and takes a type
reference on it (Ln-1 for n > 1, ``writable`` for RW L1 mappings).  When the
count drops back to 0 the references are released again.  Xen's reserved L4
slots (256-271) are ignored in guest L4s and overwritten with the
hypervisor's own entries.

Writes never happen here: the caller supplies ``write_entry(maddr, value,
old)``, which stores the value and, when the entry it replaces was present
(``old`` has _PAGE_PRESENT, or ``old`` is None for a plain write), records
it so that the vCPU itself re-applies it and reloads CR3 before the guest
runs again (platform-notes.md fact 1).  A not-present entry made present needs no
such step: the shadow MMU has nothing cached for it and walks the table on
the first access.

Grant maps, grant copies and backends in other processes and threads write
frames too: the types that forbid writes (L1-L4, segment descriptors) are
published on their 0 <-> 1 transitions through an injected ``types``
accessor (``interdomain.TypeWords``, shared memory), which is also where a
writable hold taken by one of those writers makes the transition fail.

Errors are Xen's: ``-EPERM`` for an L1 entry mapping a frame the domain does
not own, ``-EINVAL`` for everything else the rules forbid (frames not owned
as page tables or update targets, bad flags, type conflicts: "bad type").
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol

from ..abi import _PAGE_PRESENT, _PAGE_PSE, _PAGE_RW, _PAGE_USER, EINVAL, EPERM, PADDR_MASK, XenError

PGT_NONE, PGT_L1, PGT_L2, PGT_L3, PGT_L4, PGT_SEG, PGT_WRITABLE = 0, 1, 2, 3, 4, 5, 6
TYPE_NAMES = {0: "none", 1: "L1", 2: "L2", 3: "L3", 4: "L4", 5: "seg_desc", 6: "writable"}
XEN_L4_FIRST, XEN_L4_LAST = 256, 271
# Bits a domU may not set, as Xen's l1/l2/l3/l4 disallow masks (x86_64/page.h):
# no cache attributes (PWT, PCD, PAT) without I/O privileges, bit 62 (Xen's
# _PAGE_GNTTAB) in L1s; in L2-L4 no cache attributes, no superpages (PSE), no
# global bit and nothing in bits 52-62.  Bits 52-61 are the guest's own
# (_PAGE_AVAIL_HIGH) in L1 entries; NX is always allowed.
_PAGE_PWT, _PAGE_PCD, _PAGE_PAT, _PAGE_GLOBAL = 0x8, 0x10, 0x80, 0x100
L1_DISALLOW = _PAGE_PWT | _PAGE_PCD | _PAGE_PAT | (1 << 62)
L234_DISALLOW = _PAGE_PWT | _PAGE_PCD | _PAGE_PSE | _PAGE_GLOBAL | (0x7FF << 52)

_ENTRIES = struct.Struct("<512Q")
_ENTRY = struct.Struct("<Q")


class Memory(Protocol):
    def __getitem__(self, i: slice) -> bytes: ...


class TypePublisher(Protocol):
    """Where the owner's page types meet other writers (``interdomain.TypeWords``).

    Frames are indexes from ``mfn_base``.  ``claim`` is called when a frame's
    type count goes 0 -> 1 with a type that forbids writes (L1-L4, segment
    descriptors) and must fail while anyone outside the FrameTable (a grant
    map or copy, a host backend) holds the frame writable; ``unclaim`` when
    that count drops back to 0."""

    def claim(self, pfn: int, t: int) -> bool: ...

    def unclaim(self, pfn: int) -> None: ...


class FrameTable:
    """Type and pin state of one domain's machine frames.

    The per-frame counts live here, in Python, for speed; only the
    transitions of the types that forbid writes are published through
    ``types`` (injected, so this module stays free of shared memory), which
    is how grant maps, grant copies and backends in any process learn that a
    frame is a page table and how a frame they hold writable is kept from
    becoming one."""

    def __init__(self, mem: object, mfn_base: int, nr_frames: int,
                 write_entry: Callable[[int, int, int | None], None],
                 owned: Callable[[int], bool] | None = None,
                 xen_l4_slots: dict[int, int] | None = None,
                 types: TypePublisher | None = None) -> None:
        self.mem = mem  # buffer holding frame mfn_base at offset 0
        self.mfn_base = mfn_base
        self.nr_frames = nr_frames
        self.type = bytearray(nr_frames)
        self.count = [0] * nr_frames
        self.pinned = bytearray(nr_frames)
        self.write_entry = write_entry
        self._owned = owned
        self.xen_l4_slots = xen_l4_slots or {}
        self.types = types
        self.held: dict[int, int] = {}  # frame index -> writable types kept by the hypervisor
        self.stats = {"validated": 0, "devalidated": 0, "updates": 0, "rejected": 0}

    # ------------------------------------------------------------ memory
    def owns(self, mfn: int) -> bool:
        if not self.mfn_base <= mfn < self.mfn_base + self.nr_frames:
            return False
        return self._owned(mfn) if self._owned else True

    def read_entry(self, maddr: int) -> int:
        off = maddr - (self.mfn_base << 12)
        return int(_ENTRY.unpack_from(self.mem, off)[0])  # type: ignore[arg-type]

    def read_table(self, mfn: int) -> tuple[int, ...]:
        return _ENTRIES.unpack_from(self.mem, (mfn - self.mfn_base) << 12)  # type: ignore[arg-type]

    def type_of(self, mfn: int) -> tuple[int, int]:
        i = mfn - self.mfn_base
        return self.type[i], self.count[i]

    # ------------------------------------------------------------ types
    def get_type(self, mfn: int, t: int) -> None:
        if not self.owns(mfn):
            raise XenError(EINVAL, f"frame {mfn:#x} is not owned by the domain")
        i = mfn - self.mfn_base
        c = self.count[i]
        if c == 0:
            published = t != PGT_WRITABLE and self.types is not None
            # Published before validation reads the entries: from here on no
            # grant or backend can start writing the frame.
            if published and not self.types.claim(i, t):  # type: ignore[union-attr]
                raise XenError(EINVAL, f"frame {mfn:#x} is writable through a grant or by "
                               f"a backend (or not RAM), cannot become {TYPE_NAMES[t]}")
            self.type[i] = t
            self.count[i] = 1
            if PGT_L1 <= t <= PGT_L4:
                try:
                    self._validate(mfn, t)
                except XenError:
                    self.type[i] = PGT_NONE
                    self.count[i] = 0
                    if published:
                        self.types.unclaim(i)  # type: ignore[union-attr]
                    raise
        elif self.type[i] == t:
            self.count[i] = c + 1
        else:
            raise XenError(EINVAL, f"frame {mfn:#x} is {TYPE_NAMES[self.type[i]]}, "
                           f"wanted {TYPE_NAMES[t]}")

    def put_type(self, mfn: int) -> None:
        i = mfn - self.mfn_base
        c = self.count[i]
        assert c > 0, f"type count underflow on {mfn:#x}"
        if c == 1:
            t = self.type[i]
            if PGT_L1 <= t <= PGT_L4:
                self._devalidate(mfn, t)
            self.type[i] = PGT_NONE
            self.count[i] = 0
            if t != PGT_WRITABLE and self.types is not None:
                self.types.unclaim(i)
            return
        self.count[i] = c - 1

    # ------------------------------------------------------------ entries
    def _adjust(self, e: int) -> int:
        # x86_64 PV: the guest kernel runs at CPL3, so every mapping is a user one.
        return e | _PAGE_USER if e & _PAGE_PRESENT else e

    def _get_entry_ref(self, e: int, level: int) -> None:
        mfn = (e & PADDR_MASK) >> 12
        if level == 1:
            if e & L1_DISALLOW:
                raise XenError(EINVAL, f"bad L1 flags in {e:#x}")
            if not self.owns(mfn):
                raise XenError(EPERM, f"L1 entry maps frame {mfn:#x} the domain does not own")
            if e & _PAGE_RW:
                self.get_type(mfn, PGT_WRITABLE)
            return
        if e & L234_DISALLOW:
            raise XenError(EINVAL, f"bad L{level} flags in {e:#x}")
        self.get_type(mfn, level - 1)

    def _put_entry_ref(self, e: int, level: int) -> None:
        if not e & _PAGE_PRESENT:
            return
        mfn = (e & PADDR_MASK) >> 12
        if level == 1:
            if e & _PAGE_RW and self.owns(mfn):  # not owned: a grant mapping (no ref)
                self.put_type(mfn)
            return
        self.put_type(mfn)

    def _guest_slots(self, level: int) -> range:
        return range(512)

    def _validate(self, mfn: int, level: int) -> None:
        entries = self.read_table(mfn)
        done: list[int] = []
        base = mfn << 12
        try:
            for idx, e in enumerate(entries):
                if not e & _PAGE_PRESENT:
                    continue
                if level == 4 and XEN_L4_FIRST <= idx <= XEN_L4_LAST:
                    continue
                self._get_entry_ref(e, level)
                done.append(idx)
                a = self._adjust(e)
                if a != e:
                    self.write_entry(base + idx * 8, a, e)
        except XenError:
            for idx in done:
                self._put_entry_ref(entries[idx], level)
            self.stats["rejected"] += 1
            raise
        if level == 4:
            for idx in range(XEN_L4_FIRST, XEN_L4_LAST + 1):
                want = self.xen_l4_slots.get(idx, 0)
                if entries[idx] != want:
                    self.write_entry(base + idx * 8, want, entries[idx])
        self.stats["validated"] += 1

    def _devalidate(self, mfn: int, level: int) -> None:
        for idx, e in enumerate(self.read_table(mfn)):
            if level == 4 and XEN_L4_FIRST <= idx <= XEN_L4_LAST:
                continue
            self._put_entry_ref(e, level)
        self.stats["devalidated"] += 1

    # ------------------------------------------------------------ operations
    def mod_entry(self, maddr: int, val: int) -> bool:
        """MMU_NORMAL_PT_UPDATE: ``*maddr = val``, checked.  Returns True when the
        entry was one of a validated L1 and the entry it replaced mapped nothing
        or a frame the domain owns: the only updates whose re-application by
        the vCPU may wait for the guest's next flush (``VCPU.after_hypercall``;
        they change no frame's type to a page-table type)."""
        if maddr & 7:
            raise XenError(EINVAL, f"misaligned PTE address {maddr:#x}")
        mfn = maddr >> 12
        if not self.owns(mfn):
            raise XenError(EINVAL, f"update of frame {mfn:#x} the domain does not own")
        i = mfn - self.mfn_base
        t = self.type[i]
        self.stats["updates"] += 1
        if self.count[i] and PGT_L1 <= t <= PGT_L4:
            idx = (maddr & 0xFFF) >> 3
            if t == 4 and XEN_L4_FIRST <= idx <= XEN_L4_LAST:
                raise XenError(EINVAL, f"L4 slot {idx} is reserved for the hypervisor")
            old = self.read_entry(maddr)
            new = self._adjust(val)
            if new & _PAGE_PRESENT:
                self._get_entry_ref(new, t)
            self.write_entry(maddr, new, old)
            self._put_entry_ref(old, t)
            return t == PGT_L1 and (not old & _PAGE_PRESENT or self.owns((old & PADDR_MASK) >> 12))
        # not a page table: a plain checked write to a page the guest may write
        self.get_type(mfn, PGT_WRITABLE)
        try:
            self.write_entry(maddr, val, None)
        finally:
            self.put_type(mfn)
        return False

    def ptwr_update(self, maddr: int, val: int, expect: int) -> bool:
        """Writable page tables (Xen's ``ptwr_emulated_update``): the guest kernel
        wrote ``val`` into entry ``maddr`` of a validated L1 through a read-only
        mapping.  The entry is checked exactly as ``mod_entry`` checks it (the
        same ``_get_entry_ref``), written through ``write_entry`` (so the vCPU
        re-applies it) and the old entry's references are dropped.  ``expect``
        is the value the emulated instruction read: if the entry changed since,
        nothing is written and False is returned (Xen's CMPXCHG_FAILED: the
        guest retries).  A refused value raises XenError."""
        mfn = maddr >> 12
        if maddr & 7 or not self.owns(mfn):
            raise XenError(EINVAL, f"ptwr: bad entry address {maddr:#x}")
        i = mfn - self.mfn_base
        if self.type[i] != PGT_L1 or not self.count[i]:
            raise XenError(EINVAL, f"ptwr: frame {mfn:#x} is not a validated L1")
        old = self.read_entry(maddr)
        if old != expect:
            return False
        new = self._adjust(val)
        self.stats["updates"] += 1
        if new & _PAGE_PRESENT:
            self._get_entry_ref(new, PGT_L1)
        self.write_entry(maddr, new, old)
        self._put_entry_ref(old, PGT_L1)
        return True

    def replace_raw(self, maddr: int, new: int, old: int) -> None:
        """The hypervisor's own L1 write (grant mappings): ``new`` is not validated
        and takes no reference; ``old``'s references are dropped."""
        self.write_entry(maddr, new, old)
        self._put_entry_ref(old, 1)

    def hold_writable(self, mfn: int) -> None:
        """A writable type the hypervisor keeps for the domain's life on a frame
        host backends write (the console and xenstore rings): the guest can
        never make it a page table or descriptor page.  Counted by audit."""
        self.get_type(mfn, PGT_WRITABLE)
        i = mfn - self.mfn_base
        self.held[i] = self.held.get(i, 0) + 1

    def pin(self, mfn: int, level: int) -> None:
        if not self.owns(mfn):
            raise XenError(EINVAL, f"pin of frame {mfn:#x} the domain does not own")
        i = mfn - self.mfn_base
        if self.pinned[i]:
            raise XenError(EINVAL, f"frame {mfn:#x} already pinned")
        self.get_type(mfn, level)
        self.pinned[i] = 1

    def unpin(self, mfn: int) -> None:
        if not self.owns(mfn):
            raise XenError(EINVAL, f"unpin of frame {mfn:#x} the domain does not own")
        i = mfn - self.mfn_base
        if not self.pinned[i]:
            raise XenError(EINVAL, f"frame {mfn:#x} is not pinned")
        self.pinned[i] = 0
        self.put_type(mfn)

    def l1_entry_for(self, l4_mfn: int, va: int) -> int:
        """Machine address of the L1 entry mapping ``va`` (for update_va_mapping)."""
        if 0xFFFF800000000000 <= va < 0xFFFF880000000000:
            raise XenError(EINVAL, f"address {va:#x} is in the hypervisor's range")
        table = l4_mfn
        for level, shift in ((4, 39), (3, 30), (2, 21)):
            e = self.read_entry((table << 12) + ((va >> shift) & 511) * 8)
            if not e & _PAGE_PRESENT or e & _PAGE_PSE:
                raise XenError(EINVAL, f"no L1 table maps {va:#x} (L{level} entry {e:#x})")
            table = (e & PADDR_MASK) >> 12
            if not self.owns(table):
                raise XenError(EINVAL, f"page table frame {table:#x} not owned")
        i = table - self.mfn_base
        if self.type[i] != PGT_L1 or not self.count[i]:
            raise XenError(EINVAL, f"frame {table:#x} mapping {va:#x} is not a validated L1")
        return (table << 12) + ((va >> 12) & 511) * 8

    def translate(self, l4_mfn: int, va: int, write: bool) -> int | None:
        """Machine address for a guest access to ``va`` at CPL3, or None (a fault)."""
        if va >= 0x0000800000000000 and va < 0xFFFF800000000000:
            return None  # non-canonical
        table = l4_mfn
        for shift in (39, 30, 21, 12):
            if not self.owns(table):
                return None
            e = self.read_entry((table << 12) + ((va >> shift) & 511) * 8)
            if (e & (_PAGE_PRESENT | _PAGE_USER)) != (_PAGE_PRESENT | _PAGE_USER):
                return None
            if write and not e & _PAGE_RW:
                return None
            table = (e & PADDR_MASK) >> 12
        if not self.owns(table):
            return None
        return (table << 12) | (va & 0xFFF)

    # ------------------------------------------------------------ audit
    def audit(self, roots: list[int]) -> list[str]:
        """Recompute every type count from the pinned frames and ``roots``
        (L4s in CR3s) and report mismatches.  Used by tests."""
        expect = [0] * self.nr_frames
        expect_type = bytearray(self.nr_frames)
        seen: set[int] = set()

        def walk(mfn: int, level: int) -> None:
            if mfn in seen:
                return
            seen.add(mfn)
            for idx, e in enumerate(self.read_table(mfn)):
                if not e & _PAGE_PRESENT or (level == 4 and XEN_L4_FIRST <= idx <= XEN_L4_LAST):
                    continue
                t = (e & PADDR_MASK) >> 12
                j = t - self.mfn_base
                if not 0 <= j < self.nr_frames:
                    continue  # a grant mapping: no reference
                if level == 1:
                    if e & _PAGE_RW:
                        expect[j] += 1
                        expect_type[j] = PGT_WRITABLE
                    continue
                expect[j] += 1
                expect_type[j] = level - 1
                walk(t, level - 1)

        for i in range(self.nr_frames):
            if self.pinned[i]:
                expect[i] += 1
                expect_type[i] = self.type[i]
                walk(i + self.mfn_base, self.type[i])
        for i, n in self.held.items():
            expect[i] += n
            expect_type[i] = PGT_WRITABLE
        for r in roots:
            j = r - self.mfn_base
            expect[j] += 1
            expect_type[j] = PGT_L4
            walk(r, 4)
        problems = []
        for i in range(self.nr_frames):
            if expect[i] != self.count[i] or (expect[i] and expect_type[i] != self.type[i]):
                problems.append(f"frame {i + self.mfn_base:#x}: count {self.count[i]} "
                                f"type {TYPE_NAMES[self.type[i]]}, expected {expect[i]} "
                                f"{TYPE_NAMES[expect_type[i]]}")
        return problems

    # ------------------------------------------------------------ save / restore (migration)
    def pfinfo(self, mfn: int) -> int:
        """The frame's type as Xen's XEN_DOMCTL_getpageframeinfo3 reports it,
        shifted down to a nibble (``XEN_DOMCTL_PFINFO_*`` >> 28): L1-L4 for a
        validated page table, with the pin bit (8) when pinned; 0 (NOTAB) for
        anything else (writable, descriptor and untyped frames alike)."""
        i = mfn - self.mfn_base
        t = self.type[i]
        if not self.count[i] or not PGT_L1 <= t <= PGT_L4:
            return 0
        return t | (8 if self.pinned[i] else 0)

    def restore_pins(self, pins: list[tuple[int, int]]) -> None:
        """Pin the page tables a restored stream marked pinned (Xen's restore
        does MMUEXT_PIN_Ln_TABLE for each, after all pages are in place): each
        pin validates its table and, through it, every table below, with the
        same rules as a guest's own pin.  L4s first, as Xen's pin_pagetables."""
        for mfn, level in sorted(pins, key=lambda p: -p[1]):
            i = mfn - self.mfn_base
            if 0 <= i < self.nr_frames and self.pinned[i]:
                continue
            self.pin(mfn, level)

