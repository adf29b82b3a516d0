"""The machine a domain runs on: its KVM VM, its RAM and the hypervisor area.

Address map (guest-physical = "machine" addresses in Xen's terms):

* RAM: a memfd mapped at GPA ``MFN_BASE << 12``.  Frame ``MFN_BASE + pfn`` is
  the domain's pseudo-physical frame ``pfn`` (the p2m is an offset, so MFNs
  never equal PFNs and guests that confuse them fail early, as on Xen).
  After the domain's ``max_pages`` RAM frames come the Xen-heap frames
  (``XH_*``): shared_info, the grant table, a peer header and a dirty bitmap.
* The grant window at ``GRANT_GPA``: pages of other domains mapped through
  grant references appear here (``gnttab.py``).
* The hypervisor area: private memory at ``HV_GPA`` holding the hypervisor's
  page tables, the per-vCPU GDT/TSS/stacks, the IDT, the CPL0 stubs and the
  machine-to-phys table.  No guest frame number ever points here.

Virtual map, in Xen's reserved range (L4 slots 256-271), installed into every
guest L4 that is validated:

* slot 257 ``0xffff808000000000``: read-only M2P table (user readable).  Xen
  puts it at 0xffff800000000000 (slot 256), but on PVM hosts guest mappings
  in L4 slot 256 never resolve (measured: every access faults), so pyxen
  moves it one slot up and reports the place through
  ``XENMEM_machphys_mapping``, which is how PV guests (Linux included) find it.
* slot 260 ``0xffff820000000000``: the hypervisor area (supervisor only)
* slot 262 ``0xffff830000000000``: direct map of RAM (supervisor only); the
  CPL0 MMU helper writes page-table entries through it (platform-notes.md fact 1).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Callable

from .. import abi
from ..hostmem import MAX_RAM_MIB  # the largest RAM this address map holds (why: there)
from ..kvm import VM

MFN_BASE = 0x100000  # RAM starts at GPA 4 GiB
# Xen-heap frames after RAM: shared_info, the grant table, a header other
# processes read (peer page: grant-table size, RAM size), a bitmap in which
# other domains' processes mark pages of this domain they wrote (dirty log),
# then the page-type words and the active grant entries (see XenHeap).  Only
# shared_info and the grant frames are ever the guest's (Domain._owned); the
# rest is the hypervisor's and no guest, grant or copy path can reach it.
XH_SHARED_INFO = 0
XH_GRANT = 1
MAX_GRANT_FRAMES = 32
XH_PEER = XH_GRANT + MAX_GRANT_FRAMES
XH_DIRTY = XH_PEER + 1
MAX_GRANT_REFS = MAX_GRANT_FRAMES * 512
ACTIVE_ENTRY_BYTES = 8


class XenHeap:
    """Where the Xen-heap regions of a domain with ``max_pages`` RAM frames are.

    Computed from ``max_pages`` alone, so that another domain's process that
    knows it (from the daemon, never from the domain's own memory) finds the
    same places:

    * ``dirty``: XH_DIRTY, one bit per RAM page (pages other processes wrote);
    * ``types``: one 32-bit page-type word per RAM page (``interdomain.TypeWords``);
    * ``active``: one 64-bit active entry per grant ref (``interdomain.ActiveGrants``).
    """

    def __init__(self, max_pages: int) -> None:
        self.max_pages = max_pages
        self.dirty_pages = (max_pages + 32767) // 32768  # 1 bit per RAM page
        self.types = XH_DIRTY + self.dirty_pages
        self.type_pages = (max_pages * 4 + 4095) // 4096
        self.active = self.types + self.type_pages
        self.active_pages = MAX_GRANT_REFS * ACTIVE_ENTRY_BYTES // 4096
        self.nr_frames = max_pages + self.active + self.active_pages
        self.ram_bytes = _round_up(self.nr_frames * 4096, 2 << 20)

    def offset(self, index: int) -> int:
        """Offset in the RAM memfd of Xen-heap frame ``index``."""
        return (self.max_pages + index) << 12
HV_GPA = 0x10000000
RAM_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
HV_SLOT, RAM_SLOT, GRANT_SLOT = 1, 0, 2
# Grant mappings of other domains' pages appear in this window of the mapper's
# guest-physical space, one page per mapping (their "machine frames" here).
GRANT_GPA = 0x40000000
GRANT_WINDOW_PAGES = 16384

L4_M2P, L4_HV, L4_DIRECTMAP = 257, 260, 262
M2P_VA = 0xFFFF808000000000
M2P_VA_END = M2P_VA + (abi.MACH2PHYS_VIRT_END - abi.MACH2PHYS_VIRT_START)
HV_VA = 0xFFFF820000000000
DM_VA = 0xFFFF830000000000

# I/O ports: the hypercall page uses HC_PORT (allowed at CPL3 by the TSS bitmap);
# the CPL0 exception stubs and the MMU helper use ports CPL3 cannot reach.
# SYSCALL_PORT is the `syscall` entry stub's: on PVM `syscall` stays at CPL3
# (platform-notes.md fact 5), so the stub runs at CPL3 too and the bitmap opens it.
HC_PORT, TRAP_PORT, HELPER_PORT, SYSCALL_PORT = 0xF0, 0xF1, 0xF2, 0xF3
# The syscall entry stub lives in a user-readable page at the top of the M2P's
# L4 slot (257), so it can run at CPL3 (PVM) or CPL0 (VT-x/AMD-V) alike.
SYSCALL_STUB_VA = 0xFFFF808000000000 + (511 << 30) + (511 << 21) + (511 << 12)

MAX_VCPUS = 16

# The `syscall` entry stub's page (PG_USER_CODE, user-readable, read-only),
# one entry per vCPU (each vCPU's MSR_LSTAR points at its own), so an entry
# knows its vCPU without reading anything the guest controls:
#
#   cmp $24,%rax; jne slow                  # vcpu_op (all 64 bits, as the table)
#   cmp $3,%edi; jne slow                   # VCPUOP_is_up (int cmd)
#   cmpl $0,ARMED_i(%rip); je slow          # this vCPU's word: see below
#   cmp MAXV(%rip),%esi; jb slow            # unsigned vcpuid < max_vcpus: a real vCPU
#   test $0x1f7100,%r11d; jnz slow          # TF IOPL NT RF VM AC VIF VIP all clear
#   test $0x200,%r11d; jz slow              # and IF set (so RFLAGS can be r11 exactly)
#   test $0x400,%r11d; jz 1f; std; jmp 2f   # DF = r11.DF
#   1: cld
#   2: mov %r11d,%eax; shr $11,%eax; and $1,%eax
#      imul $0x7f,%eax,%eax; add $1,%al     # OF = r11.OF (0x7f + 1 overflows)
#      movzbl %r11b,%eax; mov %al,%ah; sahf # SF ZF AF PF CF = r11's
#      mov $-2,%rax; jmp *%rcx              # -ENOENT, back to the return RIP
#   slow: out %al,$SYSCALL_PORT             # everything else: the domain process
#
# That is Xen's answer to VCPUOP_is_up for a vcpuid >= max_vcpus
# (do_vcpu_op: domain_vcpu() is NULL → -ENOENT) returned as its sysret
# returns: RIP = rcx, RFLAGS = r11 (= the saved flags, which pass Xen's
# sanitising unchanged under the conditions tested), r11 and every other
# register as they were.  Linux's xen_filter_cpu_maps asks it for each of
# its NR_CPUS (8192) possible CPUs: 8192 exits of ~70 µs on PVM.  The fast
# path runs only where `syscall` stays at CPL3 (PVM, platform-notes.md fact
# 5; there CS and SS are the guest's and this code runs natively, as the
# guest could run it itself: it has no privilege to misuse).  ARMED_i is
# written by the domain process only (``set_syscall_fast``): nonzero while
# vCPU i is in guest kernel mode, a `syscall` was seen arriving at CPL3, and
# no upcall is pending (Xen delivers a pending event on a hypercall's return;
# the fast path does not, so it stands aside whenever one may be pending).
# The compat entry (CSTAR) is a bare `out`, which decodes the same in 32-bit
# code.
STUB_ENTRY = 0x80  # bytes per vCPU entry
STUB_ARMED, STUB_MAXV, STUB_COMPAT = 0xC00, 0xD00, 0xE00  # offsets in the stub page


def syscall_stub_code(entry_off: int, armed_off: int, maxv_off: int) -> bytes:
    """The `syscall` entry at ``entry_off`` of the stub page (see above)."""
    def disp(target: int, end: int) -> bytes:
        return struct.pack("<i", target - (entry_off + end))
    return (bytes.fromhex("4883f818" "7553" "83ff03" "754e" "833d") + disp(armed_off, 0x12) + b"\x00"
            + bytes.fromhex("7445" "3b35") + disp(maxv_off, 0x1a)
            + bytes.fromhex("723d" "41f7c300711f00" "7534" "41f7c300020000" "742b"
                            "41f7c300040000" "7403" "fd" "eb01" "fc" "4489d8" "c1e80b" "83e001"
                            "6bc07f" "0401" "410fb6c3" "88c4" "9e" "48c7c0feffffff" "ffe1")
            + bytes([0xE6, SYSCALL_PORT]))
# hypervisor area: fixed pages
PG_HV_L3, PG_HV_L2, PG_HV_L1, PG_PERCPU_L1 = 0, 1, 2, 3
PG_M2P_L3, PG_M2P_L2, PG_DM_L3, PG_CODE, PG_IDT, PG_ZERO = 4, 5, 6, 7, 8, 9
PG_USER_L2, PG_USER_L1, PG_USER_CODE = 10, 11, 12
FIXED_PAGES = 13
# per-vCPU virtual slot (32 pages) in the second 2 MiB of the hv area
PERCPU_VA_PAGES = 32
PC_GDT, PC_TSS, PC_STACK, PC_LIST = 0, 16, 19, 21  # page offsets inside a vCPU slot
PC_LIST_PAGES = 8
PC_PHYS_PAGES = 1 + 3 + 2 + PC_LIST_PAGES  # gdt reserved page, tss, stack, list
TSS_LIMIT = 104 + 8192

CODE_HELPER = 0x000
CODE_STUBS = 0x100  # 8 bytes per vector
HELPER_CODE = bytes.fromhex(
    "488b0e" "4883c608" "e312" "488b3e" "488b07" "488907" "4883c608" "48ffc9" "75ee"
    "0f22da" "e6f2")

# The #GP fast path (IDT vector 13): the hottest emulations of a Linux boot,
# answered at CPL0 without leaving the guest (an exit to the domain process
# costs ~50-90 µs here, the stub ~25 µs plus ~0.5-1 µs per emulated
# instruction: docs/guests.md).  It answers exactly what emul-priv-op.c
# answers for a domU in guest kernel mode with enough virtual IOPL, and only
# that:
#   * `cli` (fa) and `sti` (fb): accepted and ignored;
#   * `in $imm8,%al` (e4 ib) from ports 0x40-0x43 and 0x61 (PIT and speaker,
#     no vPIT for a domU: pv_pit_handler gives ~0): AL = 0xff;
# RIP past the instruction, RFLAGS.RF cleared, a per-vCPU counter bumped.  The
# permission is one word per vCPU at the bottom of its hypervisor stack
# (FAST_KCR3): the guest kernel's CR3 when the guest kernel's virtual IOPL
# allows port I/O and its user page tables differ from the kernel's, else 1;
# the stub compares it with CR3 first, so user mode and a stale word never
# match.  The vCPU rewrites it after each hypercall
# (``emulate.refresh_fast_path``).  Coming from CPL3 the frame is at RSP0 -
# 48, so the word is at a fixed distance from RSP.  The RIP is read only when
# canonical (bits 63-47 equal: the sign-extended low half of its upper dword
# is the dword): a #GP's RIP was fetched from unless it is non-canonical (an
# iret there faults on the fetch); a byte after the faulting one is read only
# when it belongs to the instruction (fetched) or lies in a page the
# instruction was fetched from.  Linux's quick_pit_calibrate runs
# pit_verify_msb (`e4 42 e4 42`) up to 50,000 times at boot, so that pair is
# the first thing tested and is answered in one trap: after an
# `in $0x42,%al` the stub also carries out an `in $0x42,%al` that directly
# follows it (not with RFLAGS.TF set): the guest state afterwards is exactly
# that of running them one by one (each sets AL to 0xff and has no other
# effect for a domU).  ~30 emulated instructions for that pair (PVM emulates
# every CPL0 instruction: they were 45 before the pair came first).
# Anything else goes the slow way, exactly as the other vectors:
# `push $13; out %al,$TRAP_PORT`:
#
#   push %rax; testb $3,24(%rsp); jz restore          # from guest CPL3 only
#   mov %cr3,%rax; cmp -8136(%rsp),%rax; jne restore  # FAST_KCR3: kernel, IOPL
#   movswl 20(%rsp),%eax; cmp 20(%rsp),%eax; jne restore  # canonical RIP
#   mov 16(%rsp),%rax; cmpb $0xe4,(%rax); jne not_in  # opcode at the guest RIP
#   cmpb $0x42,1(%rax); jne other_port
#   testb $1,33(%rsp); jnz one                        # TF: this one only
#   add $3,%rax; test $0xffe,%eax; jz one_3           # RIP+2..3 in a fetched page?
#   cmpw $0x42e4,-1(%rax); jne one_3                  # a second in $0x42,%al
#   inc %rax                                          # RIP += 4
# store_ff:
#   mov %rax,16(%rsp); movb $0xff,(%rsp)              # RIP, AL = 0xff
# done:
#   andl $~0x10000,32(%rsp); incq -8128(%rsp)         # RF, FAST_COUNT (traps)
#   pop %rax; add $8,%rsp; iretq                      # drop the error code
# one_3:
#   dec %rax; jmp store_ff                            # RIP += 2
# other_port:
#   movzbl 1(%rax),%eax; cmp $0x61,%al; je one_in
#   and $0xfc,%al; cmp $0x40,%al; jne restore
# one_in:
#   mov 16(%rsp),%rax
# one:
#   add $2,%rax; jmp store_ff
# not_in:
#   cmpb $0xfa,(%rax); je cli_sti; cmpb $0xfb,(%rax); jne restore
# cli_sti:
#   addq $1,16(%rsp); jmp done
# restore:
#   pop %rax; push $13; out %al,$0xf1
CODE_FAST_GP = 0xA00
FAST_GP_CODE = bytes.fromhex(
    "50f6442418030f84990000000f20d8483b842438e0ffff0f85880000000fbf4424143b44"
    "2414757d488b4424108038e47561807801427542f644242101754e4883c003a9fe0f0000"
    "742b668178ffe442752348ffc04889442410c60424ff81642420fffffeff48ff842440e0"
    "ffff584883c40848cf48ffc8ebdb0fb640013c61740624fc3c40751d488b4424104883c0"
    "02ebc28038fa74058038fb7508488344241001ebb9586a0de6f1")
FAST_KCR3, FAST_COUNT = 0, 8  # offsets in the vCPU's lowest stack page (PC_STACK)
FAST_NEVER = 1  # a FAST_KCR3 no CR3 equals: the fast path is off

PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PSE = 1, 2, 4, 0x20, 0x40, 0x80
HV_TABLE = PTE_P | PTE_RW | PTE_A
HV_PAGE = PTE_P | PTE_RW | PTE_A | PTE_D


def hypercall_page() -> bytes:
    """The hypercall page the hypervisor writes into the guest (32-byte slots)."""
    page = bytearray(abi.PAGE_SIZE)
    for nr in range(abi.NR_HYPERCALL_SLOTS):
        off = nr * 32
        if nr == abi.HYPERVISOR_iret:
            # push %rcx; push %r11; push %rax; mov $23,%eax; out %al,$HC_PORT
            code = b"\x51\x41\x53\x50\xb8" + struct.pack("<I", nr) + bytes([0xE6, HC_PORT])
        else:
            # mov $nr,%eax; out %al,$HC_PORT; ret
            code = b"\xb8" + struct.pack("<I", nr) + bytes([0xE6, HC_PORT, 0xC3])
        page[off:off + len(code)] = code
    return bytes(page)


def _gdt_entries(tss_va: int) -> dict[int, int]:
    """Descriptors of Xen's reserved GDT page (index within that page → value)."""
    ents = {
        (abi.HYPERVISOR_CS64 >> 3) - abi.FIRST_RESERVED_GDT_ENTRY: 0x00AF9B000000FFFF,
        (abi.HYPERVISOR_DS >> 3) - abi.FIRST_RESERVED_GDT_ENTRY: 0x00CF93000000FFFF,
        (abi.FLAT_RING3_CS32 >> 3) - abi.FIRST_RESERVED_GDT_ENTRY: 0x00CFFB000000FFFF,
        (abi.FLAT_RING3_DS32 >> 3) - abi.FIRST_RESERVED_GDT_ENTRY: 0x00CFF3000000FFFF,
        (abi.FLAT_RING3_CS64 >> 3) - abi.FIRST_RESERVED_GDT_ENTRY: 0x00AFFB000000FFFF,
    }
    t = (abi.TSS_SELECTOR >> 3) - abi.FIRST_RESERVED_GDT_ENTRY
    lo = (TSS_LIMIT & 0xFFFF) | ((tss_va & 0xFFFFFF) << 16) | (0x8B << 40) \
        | (((TSS_LIMIT >> 16) & 0xF) << 48) | (((tss_va >> 24) & 0xFF) << 56)
    ents[t] = lo
    ents[t + 1] = tss_va >> 32
    return ents


class Machine:
    """RAM, hypervisor area and the KVM VM of one domain."""

    def __init__(self, max_pages: int, nr_vcpus: int) -> None:
        if not 1 <= nr_vcpus <= MAX_VCPUS:
            raise ValueError(f"vcpus must be 1..{MAX_VCPUS}")
        if not 1 <= max_pages <= MAX_RAM_MIB * 256:
            raise ValueError(f"memory must be 1 page..{MAX_RAM_MIB} MiB, got {max_pages} pages")
        self.max_pages = max_pages
        self.xh = XenHeap(max_pages)
        self.dirty_pages = self.xh.dirty_pages
        self.nr_frames = self.xh.nr_frames
        ram_bytes = self.xh.ram_bytes
        self.ram_bytes = ram_bytes
        self.memfd = os.memfd_create("pyxen-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, ram_bytes)
        # Other domain processes map this memfd: its size is fixed for good so
        # that none of them can truncate it under another (SIGBUS), and no
        # further seal (F_SEAL_FUTURE_WRITE would break grant maps) can be added.
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, RAM_SEALS)
        self.ram = mmap.mmap(self.memfd, ram_bytes, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self.ram_view = memoryview(self.ram)
        self.ram_gpa = MFN_BASE << abi.PAGE_SHIFT
        # hypervisor area sizing
        self.m2p_first = (MFN_BASE * 8) >> abi.PAGE_SHIFT  # first M2P page index
        self.m2p_last = ((MFN_BASE + self.nr_frames) * 8 - 1) >> abi.PAGE_SHIFT
        m2p_pages = self.m2p_last - self.m2p_first + 1
        m2p_l1s = (self.m2p_last >> 9) - (self.m2p_first >> 9) + 1
        dm_l2s = ((self.ram_gpa + ram_bytes - 1) >> 30) - (self.ram_gpa >> 30) + 1
        hv_pages = FIXED_PAGES + m2p_pages + m2p_l1s + dm_l2s + MAX_VCPUS * PC_PHYS_PAGES
        self.hv_bytes = _round_up(hv_pages * abi.PAGE_SIZE, 2 << 20)
        self.hv = mmap.mmap(-1, self.hv_bytes, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        self._next_hv_page = FIXED_PAGES
        self.vm = VM()
        self.vm.set_memory(RAM_SLOT, self.ram_gpa, ram_bytes, _addr(self.ram))
        self.vm.set_memory(HV_SLOT, HV_GPA, self.hv_bytes, _addr(self.hv))
        # the grant window: anonymous until a grant is mapped over one of its pages
        self.grant_window = mmap.mmap(-1, GRANT_WINDOW_PAGES * 4096,
                                      mmap.MAP_SHARED | mmap.MAP_ANONYMOUS,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        self.grant_window_addr = _addr(self.grant_window)
        self.vm.set_memory(GRANT_SLOT, GRANT_GPA, GRANT_WINDOW_PAGES * 4096, self.grant_window_addr)
        self._build_hv_area(m2p_pages, dm_l2s)
        self.percpu: list[dict[str, int]] = [self._build_percpu(i) for i in range(nr_vcpus)]

    # ---------------------------------------------------------- addresses
    def ram_offset(self, mfn: int) -> int:
        """Offset into the RAM memfd of machine frame ``mfn`` (no check)."""
        return (mfn - MFN_BASE) << abi.PAGE_SHIFT

    def is_ram_mfn(self, mfn: int) -> bool:
        return MFN_BASE <= mfn < MFN_BASE + self.nr_frames

    @property
    def xenheap_mfn(self) -> int:
        return MFN_BASE + self.max_pages

    def xenheap_offset(self, index: int) -> int:
        """Offset in the RAM memfd of Xen-heap frame ``index`` (XH_*)."""
        return (self.max_pages + index) << abi.PAGE_SHIFT

    def dm_va(self, maddr: int) -> int:
        return DM_VA + maddr

    def hv_va(self, off: int) -> int:
        return HV_VA + off

    def l4_hv_slots(self) -> dict[int, int]:
        """Entries Xen's reserved L4 slots hold in every guest L4."""
        base = HV_GPA
        return {
            L4_M2P: (base + PG_M2P_L3 * 4096) | PTE_P | PTE_US | PTE_A,
            L4_HV: (base + PG_HV_L3 * 4096) | HV_TABLE,
            L4_DIRECTMAP: (base + PG_DM_L3 * 4096) | HV_TABLE,
        }

    # ---------------------------------------------------------- construction
    def _alloc_hv_page(self) -> int:
        p = self._next_hv_page
        self._next_hv_page += 1
        return p

    def _hv_put(self, page: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.hv, page * 4096 + index * 8, value)

    def _build_hv_area(self, m2p_pages: int, dm_l2s: int) -> None:
        hv = self.hv
        base = HV_GPA
        # slot 260: L3[0] -> L2; L2[0] -> L1 (fixed pages, 4K), L2[1] -> per-cpu L1
        self._hv_put(PG_HV_L3, 0, (base + PG_HV_L2 * 4096) | HV_TABLE)
        self._hv_put(PG_HV_L2, 0, (base + PG_HV_L1 * 4096) | HV_TABLE)
        self._hv_put(PG_HV_L2, 1, (base + PG_PERCPU_L1 * 4096) | HV_TABLE)
        for p in range(FIXED_PAGES):
            flags = (PTE_P | PTE_A) if p == PG_ZERO else HV_PAGE
            self._hv_put(PG_HV_L1, p, (base + p * 4096) | flags)
        # code page: MMU helper and one exception stub per vector
        code = PG_CODE * 4096
        hv[code + CODE_HELPER:code + CODE_HELPER + len(HELPER_CODE)] = HELPER_CODE
        idt = PG_IDT * 4096
        hv[code + CODE_FAST_GP:code + CODE_FAST_GP + len(FAST_GP_CODE)] = FAST_GP_CODE
        for v in range(256):
            stub = b"\x68" + struct.pack("<I", v) + bytes([0xE6, TRAP_PORT, 0x90])
            off = code + CODE_STUBS + v * 8
            hv[off:off + 8] = stub
            h = HV_VA + PG_CODE * 4096 + CODE_STUBS + v * 8
            if v == 13:
                h = HV_VA + PG_CODE * 4096 + CODE_FAST_GP
            lo = (h & 0xFFFF) | (abi.HYPERVISOR_CS64 << 16) | (0x8E << 40) | (((h >> 16) & 0xFFFF) << 48)
            struct.pack_into("<QQ", hv, idt + v * 16, lo, h >> 32)
        # the syscall entry stubs (one per vCPU, see syscall_stub_code), user-readable, read-only
        ucode = PG_USER_CODE * 4096
        for cpu in range(MAX_VCPUS):
            entry = syscall_stub_code(cpu * STUB_ENTRY, STUB_ARMED + 4 * cpu, STUB_MAXV)
            hv[ucode + cpu * STUB_ENTRY:ucode + cpu * STUB_ENTRY + len(entry)] = entry
        hv[ucode + STUB_COMPAT:ucode + STUB_COMPAT + 2] = bytes([0xE6, SYSCALL_PORT])
        user_ro = PTE_P | PTE_US | PTE_A
        self._hv_put(PG_M2P_L3, 511, (base + PG_USER_L2 * 4096) | user_ro)
        self._hv_put(PG_USER_L2, 511, (base + PG_USER_L1 * 4096) | user_ro)
        self._hv_put(PG_USER_L1, 511, (base + PG_USER_CODE * 4096) | user_ro)
        # M2P: slot 257, read-only and user-readable
        self._hv_put(PG_M2P_L3, 0, (base + PG_M2P_L2 * 4096) | PTE_P | PTE_US | PTE_A)
        self.m2p_page_of: dict[int, int] = {}
        l1_of: dict[int, int] = {}
        for idx in range(self.m2p_first, self.m2p_last + 1):
            l2i = idx >> 9
            if l2i not in l1_of:
                l1 = self._alloc_hv_page()
                l1_of[l2i] = l1
                self._hv_put(PG_M2P_L2, l2i, (base + l1 * 4096) | PTE_P | PTE_US | PTE_A)
            pg = self._alloc_hv_page()
            self.m2p_page_of[idx] = pg
            hv[pg * 4096:(pg + 1) * 4096] = b"\xff" * 4096  # INVALID_M2P_ENTRY
            self._hv_put(l1_of[l2i], idx & 511, (base + pg * 4096) | PTE_P | PTE_US | PTE_A)
        # direct map of RAM with 2 MiB pages, supervisor only
        first_gb = self.ram_gpa >> 30
        for gb in range(first_gb, first_gb + dm_l2s):
            l2 = self._alloc_hv_page()
            self._hv_put(PG_DM_L3, gb, (base + l2 * 4096) | HV_TABLE)
            for i in range(512):
                gpa = (gb << 30) | (i << 21)
                if self.ram_gpa <= gpa < self.ram_gpa + self.ram_bytes:
                    self._hv_put(l2, i, gpa | HV_PAGE | PTE_PSE)

    def _build_percpu(self, cpu: int) -> dict[str, int]:
        va_page0 = 512 + cpu * PERCPU_VA_PAGES  # page index inside slot 260's first GiB
        base = HV_GPA
        gdt_pg = self._alloc_hv_page()
        tss_pg = [self._alloc_hv_page() for _ in range(3)]
        stack_pg = [self._alloc_hv_page() for _ in range(2)]
        list_pg = [self._alloc_hv_page() for _ in range(PC_LIST_PAGES)]

        def va(p: int) -> int:
            return HV_VA + (va_page0 + p) * 4096

        def map_(p: int, phys_page: int, flags: int = HV_PAGE) -> None:
            self._hv_put(PG_PERCPU_L1, (va_page0 + p) - 512, (base + phys_page * 4096) | flags)

        for p in range(16):
            if p == abi.FIRST_RESERVED_GDT_PAGE:
                map_(p, gdt_pg)
            else:
                map_(p, PG_ZERO, PTE_P | PTE_A)
        for i, pg in enumerate(tss_pg):
            map_(PC_TSS + i, pg)
        for i, pg in enumerate(stack_pg):
            map_(PC_STACK + i, pg)
        for i, pg in enumerate(list_pg):
            map_(PC_LIST + i, pg)
        tss_va = va(PC_TSS)
        for idx, val in _gdt_entries(tss_va).items():
            self._hv_put(gdt_pg, idx, val)
        stack_top = va(PC_STACK + 2)
        struct.pack_into("<QQ", self.hv, stack_pg[0] * 4096 + FAST_KCR3, FAST_NEVER, 0)
        t = tss_pg[0] * 4096
        struct.pack_into("<Q", self.hv, t + 4, stack_top)  # RSP0
        struct.pack_into("<H", self.hv, t + 102, 104)  # I/O bitmap offset
        bitmap = bytearray(b"\xff" * 8193)
        for port in (HC_PORT, SYSCALL_PORT):
            bitmap[port >> 3] &= ~(1 << (port & 7)) & 0xFF
        self.hv[t + 104:t + 104 + 8193] = bytes(bitmap)
        return {"gdt_va": va(0), "tss_va": tss_va, "stack_top": stack_top,
                "list_va": va(PC_LIST), "list_off": list_pg[0] * 4096,
                "list_pages": PC_LIST_PAGES, "stack_off": stack_pg[0] * 4096}

    # ---------------------------------------------------------- M2P
    def set_m2p_range(self, mfn: int, pfn: int, n: int) -> None:
        """M2P[mfn + i] = pfn + i for i < n, a page of the table at a time."""
        while n > 0:
            idx = mfn * 8
            pg = self.m2p_page_of[idx >> 12]
            k = min(n, (4096 - (idx & 4095)) // 8)
            struct.pack_into(f"<{k}Q", self.hv, pg * 4096 + (idx & 4095), *range(pfn, pfn + k))
            mfn += k
            pfn += k
            n -= k

    def set_m2p(self, mfn: int, pfn: int) -> None:
        idx = mfn * 8
        pg = self.m2p_page_of[idx >> 12]
        struct.pack_into("<Q", self.hv, pg * 4096 + (idx & 4095), pfn)

    def map_gdt_frames(self, cpu: int, mfns: list[int], touch: Callable[[int], None]) -> None:
        """Point the first GDT pages of ``cpu`` at the guest's frames (set_gdt),
        the rest at the zero page; ``touch(va)`` queues each changed hv PTE for
        the vCPU to re-write (platform-notes.md fact 1)."""
        va_page0 = 512 + cpu * PERCPU_VA_PAGES
        for p in range(abi.FIRST_RESERVED_GDT_PAGE):
            if p < len(mfns):
                val = (mfns[p] << 12) | HV_PAGE
            else:
                val = (HV_GPA + PG_ZERO * 4096) | PTE_P | PTE_A
            idx = va_page0 + p - 512
            self._hv_put(PG_PERCPU_L1, idx, val)
            touch(HV_VA + PG_PERCPU_L1 * 4096 + idx * 8)

    def syscall_stub_va(self, cpu: int) -> int:
        """vCPU ``cpu``'s `syscall` entry (its MSR_LSTAR)."""
        return SYSCALL_STUB_VA + cpu * STUB_ENTRY

    @property
    def syscall_compat_va(self) -> int:
        """The compat-mode `syscall` entry (MSR_CSTAR): a bare `out`."""
        return SYSCALL_STUB_VA + STUB_COMPAT

    def set_syscall_fast(self, cpu: int, armed: bool, max_vcpus: int) -> None:
        """Arm or disarm vCPU ``cpu``'s `syscall` fast path (is_up beyond max_vcpus)."""
        off = PG_USER_CODE * 4096
        struct.pack_into("<I", self.hv, off + STUB_MAXV, max_vcpus)
        struct.pack_into("<I", self.hv, off + STUB_ARMED + 4 * cpu, 1 if armed else 0)

    @property
    def helper_va(self) -> int:
        return HV_VA + PG_CODE * 4096 + CODE_HELPER

    @property
    def idt_va(self) -> int:
        return HV_VA + PG_IDT * 4096

    def close(self) -> None:
        self.vm.close()
        self.ram_view.release()
        try:
            self.ram.close()
        except BufferError:
            pass
        self.hv.close()
        self.grant_window.close()
        os.close(self.memfd)


def _addr(m: mmap.mmap) -> int:
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a

HYPERVISOR_RANGE = (abi.HYPERVISOR_VIRT_START, abi.HYPERVISOR_VIRT_END)

