"""The PV domain builder (libxenguest's xc_dom_* job) for x86_64 guests.

Lays the guest's first pseudo-physical frames out as Xen's builder does:

    kernel image | ramdisk | p2m list | start_info | xenstore | console |
    page tables (L4, L3s, L2s, L1s) | boot stack

all mapped at ``virt_base + pfn * 4096`` by the initial page tables, which
cover at least 512 KiB past the boot stack rounded up to 4 MiB (capped at
the domain's memory).  Page-table frames are mapped read-only.  The L4 is
then pinned, which runs the PV MMU validator over the whole initial tree,
exactly as the toolstack's pin does on Xen.

``plan_layout`` is pure and unit-tested; ``build`` writes the domain's RAM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import abi
from ..hv import machine as M
from ..hv.domain import Domain
from ..hv.mm import PGT_L4
from .elf import XenKernel

PAGE = abi.PAGE_SIZE
PTE_DATA = M.PTE_P | M.PTE_RW | M.PTE_US | M.PTE_A | M.PTE_D
PTE_RO = M.PTE_P | M.PTE_US | M.PTE_A
PTE_TABLE = M.PTE_P | M.PTE_RW | M.PTE_US | M.PTE_A


class BuildError(ValueError):
    """The kernel, ramdisk or memory size cannot make a bootable domain."""


@dataclass(frozen=True)
class Layout:
    virt_base: int
    nr_pages: int
    kernel_pfn: int
    kernel_pages: int
    ramdisk_pfn: int
    ramdisk_pages: int
    p2m_pfn: int
    p2m_pages: int
    start_info_pfn: int
    xenstore_pfn: int
    console_pfn: int
    pt_pfn: int
    nr_pt_frames: int
    n_l3: int
    n_l2: int
    n_l1: int
    bootstack_pfn: int
    mapped_pages: int  # pfns [0, mapped_pages) are mapped
    #: The ramdisk lies past the initial mapping (XEN_ELFNOTE_MOD_START_PFN).
    ramdisk_unmapped: bool = False

    def va(self, pfn: int) -> int:
        return self.virt_base + pfn * PAGE


def _span(lo: int, hi: int, shift: int) -> int:
    """Number of 2^shift-aligned regions that [lo, hi) touches."""
    return ((hi - 1) >> shift) - (lo >> shift) + 1


def plan_layout(virt_base: int, kstart: int, kend: int, nr_pages: int,
                ramdisk_len: int = 0, name: str = "kernel",
                unmapped_ramdisk: bool = False) -> Layout:
    """Place everything as libxenguest does.  ``unmapped_ramdisk`` (the kernel
    has XEN_ELFNOTE_MOD_START_PFN) puts the ramdisk after the initial mapping,
    where it costs no page tables: xc_dom_build_image loads it last."""
    if kstart < virt_base:
        raise BuildError(f"{name}: image starts below its virt_base")
    kernel_pfn = (kstart - virt_base) // PAGE
    kernel_pages = (kend - virt_base + PAGE - 1) // PAGE - kernel_pfn
    nxt = kernel_pfn + kernel_pages
    ramdisk_pfn = nxt
    ramdisk_pages = (ramdisk_len + PAGE - 1) // PAGE
    if not unmapped_ramdisk:
        nxt += ramdisk_pages
    p2m_pfn = nxt
    p2m_pages = (nr_pages * 8 + PAGE - 1) // PAGE
    nxt += p2m_pages
    start_info_pfn, xenstore_pfn, console_pfn = nxt, nxt + 1, nxt + 2
    pt_pfn = nxt + 3
    # the tables must map themselves and the boot stack: iterate to a fixpoint
    n_pt = 1
    while True:
        bootstack = pt_pfn + n_pt
        want = ((bootstack + 1) * PAGE + (512 << 10) + (4 << 20) - 1) // (4 << 20) * (4 << 20)
        mapped = min(want // PAGE, nr_pages)
        lo, hi = virt_base, virt_base + mapped * PAGE
        n_l3, n_l2, n_l1 = _span(lo, hi, 39), _span(lo, hi, 30), _span(lo, hi, 21)
        need = 1 + n_l3 + n_l2 + n_l1
        if need <= n_pt:
            break
        n_pt = need
    if bootstack + 1 > nr_pages or mapped < bootstack + 1:
        raise BuildError(f"{name}: memory too small: the image and boot structures need "
                         f"{(bootstack + 1) * PAGE >> 10} KiB, the domain has {nr_pages * PAGE >> 10} KiB")
    if unmapped_ramdisk:
        ramdisk_pfn = mapped
        if ramdisk_pfn + ramdisk_pages > nr_pages:
            raise BuildError(f"{name}: memory too small: the image, boot structures and ramdisk "
                             f"need {(ramdisk_pfn + ramdisk_pages) * PAGE >> 10} KiB, the domain "
                             f"has {nr_pages * PAGE >> 10} KiB")
    if hi > (1 << 64) or (virt_base >> 47) not in (0, 0x1FFFF):
        raise BuildError(f"{name}: virt_base {virt_base:#x} is not canonical")
    if virt_base < 0xFFFF880000000000 and hi > 0xFFFF800000000000:
        raise BuildError(f"{name}: image overlaps the hypervisor's virtual range")
    return Layout(virt_base, nr_pages, kernel_pfn, kernel_pages, ramdisk_pfn, ramdisk_pages,
                  p2m_pfn, p2m_pages, start_info_pfn, xenstore_pfn, console_pfn, pt_pfn, n_pt,
                  n_l3, n_l2, n_l1, bootstack, mapped, unmapped_ramdisk)


#: Xen features (``public/features.h``) pyxen gives every PV guest today:
#: what hypercalls.py's XENVER_get_features reports, plus the ones a 64-bit PV
#: guest always has on Xen whether or not they are reported.
# writable_page_tables: VMASST_TYPE_writable_pagetables (hv/ptwr.py), which Linux turns on
PROVIDED_FEATURES = frozenset({"mmu_pt_update_preserve_ad", "pae_pgdir_above_4gb", "writable_page_tables"})

#: Features whose absence a kernel survives, and why it does not matter here.
_HARMLESS = {
    "dom0": "pyxen builds only unprivileged domains",
    "linux_rsdp_unrestricted": "only used by a PVH dom0",
    "hvm_callback_vector": "HVM only", "hvm_safe_pvclock": "HVM only", "hvm_pirqs": "HVM only",
    "auto_translated_physmap": "not for PV guests",
}


def feature_report(kernel: XenKernel) -> list[str]:
    """Sentences for the domain log about the kernel's Xen features.

    Xen's toolstack refuses a kernel only when it *requires* a feature it does
    not itself list as supported (xg_dom_core.c xc_dom_parse_image; elf.py
    already checks that); whether the hypervisor provides it shows later, when
    the guest asks (vm_assist, XENVER_get_features).  So pyxen builds the
    domain and says here which required or advertised features it lacks, so
    that a guest that then stops is explained rather than silent.
    """
    out = []
    missing_req = sorted(kernel.features_required - PROVIDED_FEATURES)
    if missing_req:
        out.append(f"{kernel.name}: kernel requires Xen features pyxen does not provide yet: "
                   + ", ".join(missing_req) + " (expect it to stop when it asks for them)")
    missing_opt = sorted(kernel.features_supported - kernel.features_required - PROVIDED_FEATURES
                         - set(_HARMLESS))
    if missing_opt:
        out.append(f"{kernel.name}: kernel can use Xen features pyxen does not offer: "
                   + ", ".join(missing_opt))
    if kernel.hypercall_page is None:
        out.append(f"{kernel.name}: no hypercall page (XEN_ELFNOTE_HYPERCALL_PAGE): the kernel "
                   "makes hypercalls with syscall")
    if kernel.init_p2m is not None:
        out.append(f"{kernel.name}: XEN_ELFNOTE_INIT_P2M {kernel.init_p2m:#x} not honoured yet: "
                   "the p2m list is in the initial mapping (mfn_list in the kernel's range)")
    return out


def build_page_tables(lay: Layout, pfn_to_mfn: int) -> dict[int, list[tuple[int, int]]]:
    """Entries of the initial tables: {pt pfn: [(index, value), ...]}.  ``pfn_to_mfn``
    is the p2m offset (mfn = pfn + offset)."""
    vb = lay.virt_base
    lo, hi = vb, vb + lay.mapped_pages * PAGE
    pfns = iter(range(lay.pt_pfn, lay.pt_pfn + lay.nr_pt_frames))
    l4 = next(pfns)
    tables: dict[int, list[tuple[int, int]]] = {l4: []}
    l3_of: dict[int, int] = {}
    l2_of: dict[int, int] = {}
    l1_of: dict[int, int] = {}
    pt_range = range(lay.pt_pfn, lay.pt_pfn + lay.nr_pt_frames)

    def child(parent: int, idx: int, cache: dict[int, int], key: int) -> int:
        if key not in cache:
            pfn = next(pfns)
            cache[key] = pfn
            tables[pfn] = []
            tables[parent].append((idx, ((pfn + pfn_to_mfn) << 12) | PTE_TABLE))
        return cache[key]

    for va in range(lo, hi, PAGE):
        l3 = child(l4, (va >> 39) & 511, l3_of, va >> 39)
        l2 = child(l3, (va >> 30) & 511, l2_of, va >> 30)
        l1 = child(l2, (va >> 21) & 511, l1_of, va >> 21)
        pfn = (va - vb) // PAGE
        flags = PTE_RO if pfn in pt_range else PTE_DATA
        tables[l1].append(((va >> 12) & 511, ((pfn + pfn_to_mfn) << 12) | flags))
    return tables


@dataclass
class BootInfo:
    layout: Layout
    start_info_va: int
    entry: int
    stack_top: int
    l4_mfn: int
    console_mfn: int
    console_evtchn: int
    store_mfn: int
    store_evtchn: int


def build(domain: Domain, kernel: XenKernel, cmdline: str = "", ramdisk: bytes | None = None,
          console_notify: object = None) -> BootInfo:
    """Load ``kernel`` into ``domain`` and prepare vCPU0 to start it."""
    nr = domain.nr_pages
    if len(cmdline.encode()) >= abi.MAX_GUEST_CMDLINE:
        raise BuildError(f"command line longer than {abi.MAX_GUEST_CMDLINE - 1} bytes")
    for line in feature_report(kernel):
        domain.log(line)
    lay = plan_layout(kernel.virt_base, kernel.virt_kstart, kernel.virt_kend, nr,
                      len(ramdisk or b""), kernel.name,
                      unmapped_ramdisk=kernel.unmapped_initrd and bool(ramdisk))
    ram = domain.machine.ram
    off = M.MFN_BASE  # p2m offset: mfn = pfn + MFN_BASE

    def ram_off(pfn: int) -> int:
        return pfn * PAGE  # RAM memfd starts at pfn 0

    for seg in kernel.segments:
        o = ram_off(0) + seg.vaddr - lay.virt_base
        ram[o:o + len(seg.data)] = seg.data
    # Kernels without XEN_ELFNOTE_HYPERCALL_PAGE (PV GRUB; Linux since the
    # XSA-466 fix) make hypercalls with `syscall` from kernel mode and need no
    # page: libxenguest then writes none (xg_dom_boot.c setup_hypercall_page).
    hp = kernel.hypercall_page
    if hp is not None:
        o = hp - lay.virt_base
        ram[o:o + PAGE] = M.hypercall_page()
    if ramdisk:
        o = ram_off(lay.ramdisk_pfn)
        ram[o:o + len(ramdisk)] = ramdisk
    # p2m list and M2P
    p2m = struct.pack(f"<{nr}Q", *range(off, off + nr))
    o = ram_off(lay.p2m_pfn)
    ram[o:o + len(p2m)] = p2m
    domain.machine.set_m2p_range(off, 0, nr)
    # page tables
    tables = build_page_tables(lay, off)
    for pfn, ents in tables.items():
        base = ram_off(pfn)
        for idx, val in ents:
            struct.pack_into("<Q", ram, base + idx * 8, val)
    l4_mfn = lay.pt_pfn + off
    # event channels for the console and xenstore
    console_port = domain.evtchn.bind_backend(lambda: domain.console.on_event()  # type: ignore[union-attr]
                                              if domain.console else None, 1)
    store_port = domain.evtchn.bind_backend(lambda: domain.xs_ring.on_guest_event()  # type: ignore[union-attr]
                                            if domain.xs_ring else None, 2)
    # start_info
    # With an unmapped ramdisk (XEN_ELFNOTE_MOD_START_PFN) Xen gives its pfn
    # and its length in whole pages, and sets SIF_MOD_START_PFN
    # (xg_dom_core.c xc_dom_build_image).
    if ramdisk and lay.ramdisk_unmapped:
        flags, mod_start, mod_len = abi.SIF_MOD_START_PFN, lay.ramdisk_pfn, lay.ramdisk_pages * PAGE
    elif ramdisk:
        flags, mod_start, mod_len = 0, lay.va(lay.ramdisk_pfn), len(ramdisk)
    else:
        flags, mod_start, mod_len = 0, 0, 0
    si = abi.START_INFO.pack(
        abi.START_INFO_MAGIC.ljust(32, b"\0"), nr, domain.shared_info_mfn << 12, flags,
        lay.xenstore_pfn + off, store_port, lay.console_pfn + off, console_port,
        lay.va(lay.pt_pfn), lay.nr_pt_frames, lay.va(lay.p2m_pfn),
        mod_start, mod_len,
        cmdline.encode().ljust(abi.MAX_GUEST_CMDLINE, b"\0"), lay.p2m_pfn, lay.p2m_pages)
    o = ram_off(lay.start_info_pfn)
    ram[o:o + len(si)] = si
    # validate the initial tables (pin), then vCPU0's CR3 reference
    domain.ft.pin(l4_mfn, PGT_L4)
    domain.ft.get_type(l4_mfn, PGT_L4)
    stack_top = lay.va(lay.bootstack_pfn + 1)
    entry = kernel.entry
    v0 = domain.vcpus[0]
    v0.set_initial_state(entry, stack_top, lay.va(lay.start_info_pfn), l4_mfn)
    info = BootInfo(lay, lay.va(lay.start_info_pfn), entry, stack_top, l4_mfn,
                    lay.console_pfn + off, console_port, lay.xenstore_pfn + off, store_port)
    domain.start_info = {"console_mfn": info.console_mfn, "console_evtchn": console_port,
                         "store_mfn": info.store_mfn, "store_evtchn": store_port}
    # The console and xenstore rings are written by backends in the host for
    # the domain's whole life (what xenconsoled's and xenstored's writable
    # mappings do on Xen): a writable type held for good, so the guest can
    # never turn a ring into a page table the backends would then write.
    for mfn in (info.console_mfn, info.store_mfn):
        domain.ft.hold_writable(mfn)
    return info
