"""ELF64 parsing and Xen PV kernel metadata (ELF notes / ``__xen_guest``).

A PV kernel tells the domain builder where it wants to live and how it
wants to be started through *Xen ELF notes* (``xen/include/public/elfnote.h``)
or, in very old kernels, through a ``__xen_guest`` section holding a
``KEY=VALUE,...`` string.  This module turns the bytes of such a kernel
into a :class:`XenKernel`: the segments to copy into guest memory, the
virtual addresses they go to, the entry point, the hypercall page and
the feature flags.

Every input is untrusted: the kernel image comes from the guest owner.
Each problem is reported as an :class:`ElfError` (a :class:`ValueError`)
whose message names the file and says what is wrong, so that the CLI can
print it without a traceback.  The parser never raises anything else for
malformed input (this is fuzz-tested).

Address computation follows Xen's libelf so that a kernel that boots on
real Xen lands at the same addresses here:

* ``virt_base`` defaults to 0 when no ``VIRT_BASE`` is given;
* ``paddr_offset`` defaults to 0 with ELF notes, but to ``virt_base``
  with the legacy ``__xen_guest`` string;
* each ``PT_LOAD`` segment is placed at ``p_paddr + virt_base -
  paddr_offset`` (libelf places segments by *physical* address, not by
  ``p_vaddr``);
* the entry point defaults to ``e_entry``.
"""

from __future__ import annotations

import itertools
import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "PAGE_SIZE",
    "XEN_FEATURE_NAMES",
    "ElfError",
    "Segment",
    "XenKernel",
    "XenNote",
    "load_elf",
    "parse_features",
    "parse_xen_kernel",
]

PAGE_SIZE = 0x1000
_U64 = 1 << 64
_MASK64 = _U64 - 1

# --- ELF constants (System V ABI) -------------------------------------------

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS32 = 1
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_ELFDATA2MSB = 2
_EV_CURRENT = 1
_ET_NAMES = {0: "NONE", 1: "REL (relocatable object)", 2: "EXEC",
             3: "DYN (shared object or PIE)", 4: "CORE (core dump)"}
_ET_EXEC = 2
EM_X86_64 = 62
_EM_NAMES = {
    2: "SPARC", 3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64",
    22: "S390", 40: "ARM", 43: "SPARC V9", 50: "IA-64", 62: "x86_64",
    183: "AArch64", 243: "RISC-V", 258: "LoongArch",
}
_PT_LOAD = 1
_PT_NOTE = 4
_PF_RWX = 0x7
_SHT_NOTE = 7
_SHT_NOBITS = 8

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_NHDR = struct.Struct("<III")

# The 64-bit PV guest may not map anything into Xen's own reserved range
# (xen/include/public/arch-x86/xen-x86_64.h).
_HYPERVISOR_VIRT_START = 0xFFFF800000000000
_HYPERVISOR_VIRT_END = 0xFFFF880000000000
# x86-64 canonical address halves (48-bit virtual addresses).
_LOWER_HALF_END = 0x0000800000000000
_UPPER_HALF_START = 0xFFFF800000000000


class ElfError(ValueError):
    """A kernel image is not something pyxen can boot.

    A ``ValueError`` so that callers that validate user input can catch
    one family; the message always starts with the file's name.
    """


class XenNote(IntEnum):
    """Xen ELF note types (``XEN_ELFNOTE_*`` in ``public/elfnote.h``)."""

    INFO = 0
    ENTRY = 1
    HYPERCALL_PAGE = 2
    VIRT_BASE = 3
    PADDR_OFFSET = 4
    XEN_VERSION = 5
    GUEST_OS = 6
    GUEST_VERSION = 7
    LOADER = 8
    PAE_MODE = 9
    FEATURES = 10
    BSD_SYMTAB = 11
    HV_START_LOW = 12
    L1_MFN_VALID = 13
    SUSPEND_CANCEL = 14
    INIT_P2M = 15
    MOD_START_PFN = 16
    SUPPORTED_FEATURES = 17
    PHYS32_ENTRY = 18
    PHYS32_RELOC = 19


_STRING_NOTES = frozenset({
    XenNote.INFO, XenNote.XEN_VERSION, XenNote.GUEST_OS,
    XenNote.GUEST_VERSION, XenNote.LOADER, XenNote.PAE_MODE,
    XenNote.FEATURES, XenNote.BSD_SYMTAB,
})
_NUMERIC_NOTES = frozenset({
    XenNote.ENTRY, XenNote.HYPERCALL_PAGE, XenNote.VIRT_BASE,
    XenNote.PADDR_OFFSET, XenNote.HV_START_LOW, XenNote.SUSPEND_CANCEL,
    XenNote.INIT_P2M, XenNote.MOD_START_PFN, XenNote.PHYS32_ENTRY,
})

#: Feature names usable in the FEATURES string, indexed by XENFEAT_* bit
#: number (``public/features.h``).  libelf itself only recognises a
#: subset; we accept every name the public header defines.
XEN_FEATURE_NAMES: dict[str, int] = {
    "writable_page_tables": 0,
    "writable_descriptor_tables": 1,
    "auto_translated_physmap": 2,
    "supervisor_mode_kernel": 3,
    "pae_pgdir_above_4gb": 4,
    "mmu_pt_update_preserve_ad": 5,
    "highmem_assist": 6,
    "gnttab_map_avail_bits": 7,
    "hvm_callback_vector": 8,
    "hvm_safe_pvclock": 9,
    "hvm_pirqs": 10,
    "dom0": 11,
    "grant_map_identity": 12,
    "memory_op_vnode_supported": 13,
    "ARM_SMCCC_supported": 14,
    "linux_rsdp_unrestricted": 15,
    "not_direct_mapped": 16,
    "direct_mapped": 17,
    "runstate_phys_area": 18,
    "vcpu_time_phys_area": 19,
    "dm_msix_all_writes": 20,
}
_FEATURE_BY_BIT = {bit: name for name, bit in XEN_FEATURE_NAMES.items()}

#: A decoded note value: text for string notes, an integer for numeric
#: ones, ``(mask, value)`` pairs for L1_MFN_VALID, raw bytes otherwise.
NoteValue = int | str | bytes | tuple[tuple[int, int], ...]


class Segment(NamedTuple):
    """One ``PT_LOAD`` segment, ready to be copied into the guest.

    ``vaddr`` is where the builder must map it (libelf's rule, see the
    module docstring); bytes from ``len(data)`` up to ``memsz`` are zero
    (BSS).
    """

    vaddr: int
    memsz: int
    data: bytes


@dataclass(frozen=True)
class XenKernel:
    """Everything the PV domain builder needs to know about a kernel.

    All addresses are guest virtual addresses after libelf's relocation
    rule.  ``notes`` keeps every Xen note seen (decoded where the type is
    known, raw bytes otherwise) so later features need not re-parse.
    """

    name: str
    entry: int
    virt_base: int
    paddr_offset: int
    hypercall_page: int | None
    segments: list[Segment]
    virt_kstart: int
    virt_kend: int
    guest_os: str
    guest_version: str
    loader: str
    xen_version: str
    pae_mode: str | None
    features_supported: frozenset[str]
    features_required: frozenset[str]
    features_supported_mask: int
    features_required_mask: int
    notes: dict[int, NoteValue]
    #: Where the metadata came from: "PT_NOTE", "SHT_NOTE" or "__xen_guest".
    notes_source: str
    elf_entry: int
    init_p2m: int | None = None
    hv_start_low: int | None = None
    phys32_entry: int | None = None
    #: MOD_START_PFN: the kernel accepts an initrd outside its mappings.
    unmapped_initrd: bool = False
    suspend_cancel: bool = False
    bsd_symtab: bool = False
    l1_mfn_valid: tuple[tuple[int, int], ...] = field(default=())

    @property
    def image_size(self) -> int:
        """Bytes of virtual address space the loaded image spans."""
        return self.virt_kend - self.virt_kstart


# --- small helpers ------------------------------------------------------------


def _hex(v: int) -> str:
    return f"{v:#x}"


def _page_down(v: int) -> int:
    return v & ~(PAGE_SIZE - 1)


def _page_up(v: int) -> int:
    return (v + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def _cstr(raw: bytes) -> str:
    """Text up to the first NUL (or all of it when unterminated).

    libelf reads strings up to a NUL even past the descriptor; we stop at
    the descriptor's end, which is the stricter, memory-safe reading.
    """
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    return raw.decode("utf-8", errors="replace")


_LEGACY_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


def _parse_number(text: str) -> int:
    """Parse like C's strtoull(..., 0): 0x hex, leading-0 octal, decimal.

    Unlike strtoull we refuse trailing junk and values that do not fit in
    64 bits: a garbled legacy string should not silently become 0.
    """
    t = text.strip()
    if not _LEGACY_NUMBER.fullmatch(t):
        raise ValueError(t)
    # Python's base 0 rejects C's leading-zero octal, so handle it here.
    octal = len(t) > 1 and t[0] == "0" and t[1] in "01234567"
    v = int(t[1:], 8) if octal else int(t, 0)
    if v > _MASK64:
        raise ValueError(t)
    return v


def parse_features(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """Split a FEATURES string into (supported, required) name sets.

    The syntax (``elfnote.h``) is ``name|!name|...``; a ``!`` marks a
    feature the kernel cannot run without, and required features are also
    supported.  Unknown names are ignored unless required, because an
    unknown *required* feature means the kernel needs something no
    hypervisor we know of provides.  Raises plain ``ValueError`` (the
    caller adds the file name).
    """
    supported: set[str] = set()
    required: set[str] = set()
    for item in text.split("|"):
        item = item.strip()
        if not item:
            continue
        if item.startswith("!"):
            name = item[1:]
            if name not in XEN_FEATURE_NAMES:
                raise ValueError(f"requires unknown Xen feature '{name}'")
            required.add(name)
            supported.add(name)
        elif item in XEN_FEATURE_NAMES:
            supported.add(item)
    return frozenset(supported), frozenset(required)


def _mask_of(names: frozenset[str]) -> int:
    mask = 0
    for n in names:
        mask |= 1 << XEN_FEATURE_NAMES[n]
    return mask


def _names_of(mask: int) -> frozenset[str]:
    return frozenset(n for b, n in _FEATURE_BY_BIT.items() if mask >> b & 1)


# --- raw ELF structure ---------------------------------------------------------


@dataclass(frozen=True)
class _Phdr:
    index: int
    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int


@dataclass(frozen=True)
class _Shdr:
    index: int
    sh_name: int
    sh_type: int
    sh_offset: int
    sh_size: int


class _Elf:
    """Validated view of an ELF64 little-endian x86_64 executable."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.name = name
        self._check_header()
        self.phdrs = self._read_phdrs()
        self._shdrs: list[_Shdr] | None = None

    def err(self, what: str) -> ElfError:
        return ElfError(f"{self.name}: {what}")

    def _check_header(self) -> None:
        d = self.data
        if len(d) < 4 or d[:4] != _ELF_MAGIC:
            raise self.err("not an ELF file (bad magic)")
        if len(d) < 5:
            raise self.err("truncated ELF header")
        if d[4] == _ELFCLASS32:
            raise self.err("32-bit ELF (ELFCLASS32); pyxen needs a 64-bit "
                           "x86_64 PV kernel")
        if d[4] != _ELFCLASS64:
            raise self.err(f"bad ELF class {d[4]}")
        if len(d) < _EHDR.size:
            raise self.err(f"truncated ELF header ({len(d)} bytes, need "
                           f"{_EHDR.size})")
        if d[5] == _ELFDATA2MSB:
            raise self.err("big-endian ELF; pyxen needs a little-endian "
                           "x86_64 kernel")
        if d[5] != _ELFDATA2LSB:
            raise self.err(f"bad ELF data encoding {d[5]}")
        if d[6] != _EV_CURRENT:
            raise self.err(f"unsupported ELF version {d[6]}")
        (_, e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, _,
         _, e_phentsize, e_phnum, e_shentsize, e_shnum,
         e_shstrndx) = _EHDR.unpack_from(d, 0)
        if e_machine != EM_X86_64:
            mname = _EM_NAMES.get(e_machine, "unknown")
            raise self.err(f"ELF for machine {e_machine} ({mname}), pyxen "
                           "needs x86_64")
        if e_version != _EV_CURRENT:
            raise self.err(f"unsupported ELF version {e_version}")
        if e_type != _ET_EXEC:
            tname = _ET_NAMES.get(e_type, f"{e_type}")
            raise self.err(f"ELF type {tname}; a PV kernel must be a "
                           "statically linked executable (ET_EXEC)")
        self.e_entry: int = e_entry
        self.e_phoff: int = e_phoff
        self.e_phnum: int = e_phnum
        self.e_phentsize: int = e_phentsize
        self.e_shoff: int = e_shoff
        self.e_shnum: int = e_shnum
        self.e_shentsize: int = e_shentsize
        self.e_shstrndx: int = e_shstrndx

    def _read_phdrs(self) -> list[_Phdr]:
        if self.e_phnum == 0 or self.e_phoff == 0:
            raise self.err("no program headers (not a loadable executable)")
        if self.e_phentsize != _PHDR.size:
            raise self.err(f"program header entry size {self.e_phentsize}, "
                           f"expected {_PHDR.size}")
        end = self.e_phoff + self.e_phnum * _PHDR.size
        if end > len(self.data):
            raise self.err(f"program header table ({_hex(self.e_phoff)}.."
                           f"{_hex(end)}) extends past the end of the file "
                           f"({_hex(len(self.data))} bytes)")
        out = []
        for i in range(self.e_phnum):
            f = _PHDR.unpack_from(self.data, self.e_phoff + i * _PHDR.size)
            out.append(_Phdr(i, f[0], f[1], f[2], f[3], f[4], f[5], f[6]))
        return out

    @property
    def shdrs(self) -> list[_Shdr]:
        """Section headers, read only when needed.

        Xen ignores a broken section table unless it needs to look for
        SHT_NOTE or ``__xen_guest``, and so do we.
        """
        if self._shdrs is None:
            self._shdrs = self._read_shdrs()
        return self._shdrs

    def _read_shdrs(self) -> list[_Shdr]:
        if self.e_shnum == 0 or self.e_shoff == 0:
            return []
        if self.e_shentsize != _SHDR.size:
            raise self.err(f"section header entry size {self.e_shentsize}, "
                           f"expected {_SHDR.size}")
        end = self.e_shoff + self.e_shnum * _SHDR.size
        if end > len(self.data):
            raise self.err("section header table extends past the end of "
                           "the file")
        out = []
        for i in range(self.e_shnum):
            f = _SHDR.unpack_from(self.data, self.e_shoff + i * _SHDR.size)
            out.append(_Shdr(i, f[0], f[1], f[4], f[5]))
        return out

    def section_bytes(self, sh: _Shdr) -> bytes:
        if sh.sh_type == _SHT_NOBITS:
            return b""
        end = sh.sh_offset + sh.sh_size
        if end > len(self.data):
            raise self.err(f"section {sh.index} ({_hex(sh.sh_offset)}.."
                           f"{_hex(end)}) extends past the end of the file")
        return self.data[sh.sh_offset:end]

    def section_name(self, sh: _Shdr) -> str:
        shdrs = self.shdrs
        if not 0 < self.e_shstrndx < len(shdrs):
            raise self.err(f"section name table index {self.e_shstrndx} "
                           f"out of range ({len(shdrs)} sections)")
        strtab = self.section_bytes(shdrs[self.e_shstrndx])
        if sh.sh_name >= len(strtab):
            raise self.err(f"section {sh.index} name offset out of range")
        return _cstr(strtab[sh.sh_name:])

    def segment_bytes(self, ph: _Phdr) -> bytes:
        if ph.p_filesz == 0:  # pure BSS: p_offset is irrelevant
            return b""
        end = ph.p_offset + ph.p_filesz
        if end > len(self.data):
            raise self.err(f"segment {ph.index} (file {_hex(ph.p_offset)}.."
                           f"{_hex(end)}) extends past the end of the file "
                           f"({_hex(len(self.data))} bytes)")
        return self.data[ph.p_offset:end]


# --- Xen metadata ----------------------------------------------------------------


@dataclass
class _Parms:
    """Mutable accumulator mirroring libelf's ``elf_dom_parms``."""

    notes: dict[int, NoteValue] = field(default_factory=dict)
    virt_base: int | None = None
    paddr_offset: int | None = None
    entry: int | None = None
    hypercall: int | None = None
    guest_os: str = ""
    guest_version: str = ""
    loader: str = ""
    xen_version: str = ""
    pae_mode: str | None = None
    supported: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    supported_mask: int = 0
    init_p2m: int | None = None
    hv_start_low: int | None = None
    phys32_entry: int | None = None
    unmapped_initrd: bool = False
    suspend_cancel: bool = False
    bsd_symtab: bool = False
    l1_mfn_valid: tuple[tuple[int, int], ...] = ()


def _note_name(t: int) -> str:
    try:
        return f"XEN_ELFNOTE_{XenNote(t).name}"
    except ValueError:
        return f"Xen note type {t}"


def _numeric(elf: _Elf, ntype: int, desc: bytes) -> int:
    if len(desc) not in (1, 2, 4, 8):
        raise elf.err(f"{_note_name(ntype)} has a {len(desc)}-byte value; "
                      "numeric Xen notes are 1, 2, 4 or 8 bytes")
    return int.from_bytes(desc, "little")


def _apply_note(elf: _Elf, p: _Parms, ntype: int, desc: bytes) -> None:
    """Decode one "Xen" note into ``p`` (later notes override earlier)."""
    value: NoteValue
    if ntype in _STRING_NOTES:
        text = _cstr(desc)
        value = text
        if ntype == XenNote.GUEST_OS:
            p.guest_os = text
        elif ntype == XenNote.GUEST_VERSION:
            p.guest_version = text
        elif ntype == XenNote.XEN_VERSION:
            p.xen_version = text
        elif ntype == XenNote.LOADER:
            p.loader = text
        elif ntype == XenNote.PAE_MODE:
            p.pae_mode = text
        elif ntype == XenNote.BSD_SYMTAB:
            p.bsd_symtab = text == "yes"
        elif ntype == XenNote.FEATURES:
            try:
                sup, req = parse_features(text)
            except ValueError as e:
                raise elf.err(f"XEN_ELFNOTE_FEATURES: kernel {e}") from None
            p.supported |= sup
            p.required |= req
    elif ntype in _NUMERIC_NOTES:
        num = _numeric(elf, ntype, desc)
        value = num
        if ntype == XenNote.ENTRY:
            p.entry = num
        elif ntype == XenNote.HYPERCALL_PAGE:
            p.hypercall = num
        elif ntype == XenNote.VIRT_BASE:
            p.virt_base = num
        elif ntype == XenNote.PADDR_OFFSET:
            p.paddr_offset = num
        elif ntype == XenNote.HV_START_LOW:
            p.hv_start_low = num
        elif ntype == XenNote.INIT_P2M:
            p.init_p2m = num
        elif ntype == XenNote.MOD_START_PFN:
            p.unmapped_initrd = num != 0
        elif ntype == XenNote.SUSPEND_CANCEL:
            p.suspend_cancel = num != 0
        elif ntype == XenNote.PHYS32_ENTRY:
            p.phys32_entry = num
    elif ntype == XenNote.SUPPORTED_FEATURES:
        # A bitmap of 32-bit words; XENFEAT_NR_SUBMAPS is 1, so only the
        # first word means anything today.
        if len(desc) < 4 or len(desc) % 4:
            raise elf.err("XEN_ELFNOTE_SUPPORTED_FEATURES must be a "
                          f"multiple of 4 bytes, got {len(desc)}")
        num = int.from_bytes(desc[:4], "little")
        value = num
        p.supported_mask |= num
    elif ntype == XenNote.L1_MFN_VALID:
        # (mask, value) pairs of maddr_t (8 bytes on x86_64).
        if len(desc) % 16:
            raise elf.err("XEN_ELFNOTE_L1_MFN_VALID must hold 8-byte "
                          f"mask/value pairs, got {len(desc)} bytes")
        pairs = tuple(struct.iter_unpack("<QQ", desc))
        value = pairs
        p.l1_mfn_valid = pairs
    else:
        value = bytes(desc)
    p.notes[ntype] = value


def _scan_notes(elf: _Elf, region: bytes, where: str, p: _Parms) -> int:
    """Apply every "Xen" note in ``region``; return how many there were."""
    count = 0
    pos = 0
    end = len(region)
    while end - pos >= _NHDR.size:
        namesz, descsz, ntype = _NHDR.unpack_from(region, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + ((namesz + 3) & ~3)
        if name_at + namesz > end or desc_at + descsz > end:
            raise elf.err(f"truncated ELF note at offset {_hex(pos)} in "
                          f"{where}")
        name = region[name_at:name_at + namesz].rstrip(b"\0")
        if name == b"Xen":
            _apply_note(elf, p, ntype, region[desc_at:desc_at + descsz])
            count += 1
        pos = desc_at + ((descsz + 3) & ~3)
    return count


def _parse_legacy(elf: _Elf, text: str, p: _Parms) -> None:
    """Decode a ``__xen_guest`` ``KEY=VALUE,...`` string (pre-note kernels).

    Keys as in libelf: GUEST_OS, GUEST_VER, XEN_VER, LOADER, PAE,
    BSD_SYMTAB, VIRT_BASE, VIRT_ENTRY, ELF_PADDR_OFFSET, HYPERCALL_PAGE
    (a page *number*, relative to VIRT_BASE) and FEATURES.  Note that
    FEATURES may itself contain no commas, so a plain split is exact.
    """
    hypercall_pfn: int | None = None
    for item in text.split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        try:
            if key == "GUEST_OS":
                p.guest_os = value
            elif key == "GUEST_VER":
                p.guest_version = value
            elif key == "XEN_VER":
                p.xen_version = value
            elif key == "LOADER":
                p.loader = value
            elif key == "PAE":
                p.pae_mode = value
            elif key == "BSD_SYMTAB":
                p.bsd_symtab = True
            elif key == "VIRT_BASE":
                p.virt_base = _parse_number(value)
            elif key == "VIRT_ENTRY":
                p.entry = _parse_number(value)
            elif key == "ELF_PADDR_OFFSET":
                p.paddr_offset = _parse_number(value)
            elif key == "HYPERCALL_PAGE":
                hypercall_pfn = _parse_number(value)
            elif key == "FEATURES":
                sup, req = parse_features(value)
                p.supported |= sup
                p.required |= req
        except ValueError as e:
            if key == "FEATURES":
                raise elf.err(f"__xen_guest FEATURES: kernel {e}") from None
            raise elf.err(f"__xen_guest: bad number for {key}: "
                          f"'{value}'") from None
    if hypercall_pfn is not None:
        va = (hypercall_pfn << 12) + (p.virt_base or 0)
        if va > _MASK64:
            raise elf.err("__xen_guest: HYPERCALL_PAGE out of range")
        p.hypercall = va


def _find_metadata(elf: _Elf) -> tuple[_Parms, str]:
    """Collect Xen metadata in libelf's order of preference."""
    p = _Parms()
    found = 0
    for ph in elf.phdrs:
        # Some binutils versions leave p_offset 0 in note segments; libelf
        # skips those, and so do we.
        if ph.p_type != _PT_NOTE or ph.p_offset == 0:
            continue
        found += _scan_notes(elf, elf.segment_bytes(ph),
                             f"PT_NOTE segment {ph.index}", p)
    if found:
        return p, "PT_NOTE"
    p = _Parms()
    for sh in elf.shdrs[1:]:
        if sh.sh_type != _SHT_NOTE:
            continue
        found += _scan_notes(elf, elf.section_bytes(sh),
                             f"SHT_NOTE section {sh.index}", p)
    if found:
        return p, "SHT_NOTE"
    p = _Parms()
    for sh in elf.shdrs[1:]:
        if elf.section_name(sh) == "__xen_guest":
            _parse_legacy(elf, _cstr(elf.section_bytes(sh)), p)
            return p, "__xen_guest"
    raise elf.err("kernel has no Xen ELF notes (XEN_ELFNOTE_*) and no "
                  "__xen_guest section: not a Xen PV kernel")


def _check_identity(elf: _Elf, p: _Parms) -> None:
    """Xen's own acceptance test (libelf ``elf_xen_note_check``)."""
    if not (p.loader.startswith("generic") or p.guest_os.startswith("linux")):
        raise elf.err(
            "Xen loads only kernels whose LOADER is 'generic' or whose "
            f"GUEST_OS is 'linux' (this one has LOADER='{p.loader}', "
            f"GUEST_OS='{p.guest_os}')")
    if not p.xen_version.startswith("xen-3.0"):
        raise elf.err(
            "Xen loads only kernels built for XEN_VERSION 'xen-3.0' (this "
            f"one says '{p.xen_version}')")


def _canonical(lo: int, hi: int) -> bool:
    """Is [lo, hi) entirely inside one canonical x86-64 half?"""
    return hi <= _LOWER_HALF_END or lo >= _UPPER_HALF_START


def _placement_hint(elf: _Elf, virt_offset: int, paddr_offset: int) -> str:
    """Explain libelf's placement rule when it disagrees with p_vaddr.

    The usual cause of a kernel "not fitting" is a linker script whose
    p_paddr is not p_vaddr - VIRT_BASE + PADDR_OFFSET; say so rather than
    leave the user puzzling over a relocated address.
    """
    for ph in elf.phdrs:
        if ph.p_type != _PT_LOAD or not ph.p_flags & _PF_RWX:
            continue
        if (ph.p_paddr + virt_offset) & _MASK64 != ph.p_vaddr:
            return (" (note: Xen loads segments at p_paddr + VIRT_BASE - "
                    f"PADDR_OFFSET; segment {ph.index} has p_paddr="
                    f"{_hex(ph.p_paddr)}, p_vaddr={_hex(ph.p_vaddr)}, "
                    f"PADDR_OFFSET={_hex(paddr_offset)})")
    return ""


def _build_segments(elf: _Elf, virt_offset: int, hint: str) -> list[Segment]:
    segs: list[tuple[int, int, bytes, _Phdr]] = []
    for ph in elf.phdrs:
        if ph.p_type != _PT_LOAD:
            continue
        if ph.p_filesz > ph.p_memsz:
            raise elf.err(f"segment {ph.index}: file size {_hex(ph.p_filesz)}"
                          f" exceeds memory size {_hex(ph.p_memsz)}")
        data = elf.segment_bytes(ph)
        # libelf ignores segments with no R/W/X permission; empty ones
        # contribute nothing to the image either.
        if not ph.p_flags & _PF_RWX or ph.p_memsz == 0:
            continue
        if ph.p_paddr + ph.p_memsz > _U64 or ph.p_vaddr + ph.p_memsz > _U64:
            raise elf.err(f"segment {ph.index}: address range wraps around "
                          "the 64-bit address space")
        va = (ph.p_paddr + virt_offset) & _MASK64
        if va + ph.p_memsz > _U64:
            raise elf.err(f"segment {ph.index}: load address {_hex(va)} + "
                          f"size {_hex(ph.p_memsz)} wraps around")
        segs.append((va, ph.p_memsz, data, ph))
    if not segs:
        raise elf.err("no loadable (PT_LOAD) segments")
    segs.sort(key=lambda s: s[0])
    for (va1, sz1, _, ph1), (va2, _, _, ph2) in itertools.pairwise(segs):
        if va1 + sz1 > va2:
            raise elf.err(f"segments {ph1.index} and {ph2.index} overlap "
                          f"({_hex(va1)}+{_hex(sz1)} > {_hex(va2)})")
    for va, sz, _, ph in segs:
        if not _canonical(va, va + sz):
            raise elf.err(f"segment {ph.index} at {_hex(va)}..{_hex(va + sz)}"
                          f" is not a canonical x86-64 address range{hint}")
        if va < _HYPERVISOR_VIRT_END and va + sz > _HYPERVISOR_VIRT_START:
            raise elf.err(f"segment {ph.index} at {_hex(va)} overlaps the "
                          "range reserved for Xen (0xffff800000000000-"
                          f"0xffff880000000000){hint}")
    return [Segment(va, sz, data) for va, sz, data, _ in segs]


def parse_xen_kernel(data: bytes, name: str = "kernel") -> XenKernel:
    """Validate a PV kernel image and extract its Xen boot metadata.

    ``name`` is only used in error messages (pass the file name the user
    gave).  Raises :class:`ElfError` for anything pyxen cannot boot.
    """
    elf = _Elf(bytes(data), name)
    p, source = _find_metadata(elf)
    _check_identity(elf, p)

    if p.paddr_offset is not None and p.virt_base is None:
        raise elf.err("PADDR_OFFSET is set but VIRT_BASE is not")
    virt_base = p.virt_base if p.virt_base is not None else 0
    if p.paddr_offset is not None:
        paddr_offset = p.paddr_offset
    else:
        paddr_offset = virt_base if source == "__xen_guest" else 0
    virt_offset = (virt_base - paddr_offset) & _MASK64

    hint = _placement_hint(elf, virt_offset, paddr_offset)
    segments = _build_segments(elf, virt_offset, hint)
    lo = segments[0].vaddr
    hi = max(s.vaddr + s.memsz for s in segments)
    kstart = _page_down(lo)
    kend = min(_page_up(hi), _U64)

    if virt_base > kstart:
        raise elf.err(f"VIRT_BASE {_hex(virt_base)} is above the start of "
                      f"the image ({_hex(kstart)}){hint}")

    entry = p.entry if p.entry is not None else elf.e_entry
    if not any(s.vaddr <= entry < s.vaddr + s.memsz for s in segments):
        raise elf.err(f"entry point {_hex(entry)} is not inside any loaded "
                      f"segment (image {_hex(lo)}..{_hex(hi)}){hint}")

    hypercall = p.hypercall
    if hypercall is not None:
        if hypercall % PAGE_SIZE:
            raise elf.err(f"hypercall page {_hex(hypercall)} is not page "
                          "aligned")
        if not any(s.vaddr <= hypercall and hypercall + PAGE_SIZE
                   <= s.vaddr + s.memsz for s in segments):
            raise elf.err(f"hypercall page {_hex(hypercall)} is not inside "
                          f"the loaded image ({_hex(lo)}..{_hex(hi)}){hint}")

    if p.init_p2m is not None and kstart <= p.init_p2m < kend:
        raise elf.err(f"INIT_P2M {_hex(p.init_p2m)} lies inside the kernel "
                      f"image ({_hex(kstart)}..{_hex(kend)})")

    supported = p.supported | _names_of(p.supported_mask)
    return XenKernel(
        name=name,
        entry=entry,
        virt_base=virt_base,
        paddr_offset=paddr_offset,
        hypercall_page=hypercall,
        segments=segments,
        virt_kstart=kstart,
        virt_kend=kend,
        guest_os=p.guest_os,
        guest_version=p.guest_version,
        loader=p.loader,
        xen_version=p.xen_version,
        pae_mode=p.pae_mode,
        features_supported=supported,
        features_required=p.required,
        features_supported_mask=_mask_of(p.supported) | p.supported_mask,
        features_required_mask=_mask_of(p.required),
        notes=dict(p.notes),
        notes_source=source,
        elf_entry=elf.e_entry,
        init_p2m=p.init_p2m,
        hv_start_low=p.hv_start_low,
        phys32_entry=p.phys32_entry,
        unmapped_initrd=p.unmapped_initrd,
        suspend_cancel=p.suspend_cancel,
        bsd_symtab=p.bsd_symtab,
        l1_mfn_valid=p.l1_mfn_valid,
    )


def load_elf(path: str | Path) -> XenKernel:
    """Read a kernel file and parse it; I/O problems become ElfError too.

    The CLI then needs only one ``except ElfError`` to print a one-line
    message for every way a kernel can be unusable.
    """
    return parse_xen_kernel(read_kernel_file(path), str(path))


def read_kernel_file(path: str | Path) -> bytes:
    """A kernel file's bytes; every I/O problem is an ElfError naming the file."""
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise ElfError(f"{path}: is a directory, not a kernel image") from None
    except FileNotFoundError:
        raise ElfError(f"{path}: kernel file not found") from None
    except OSError as e:
        raise ElfError(f"{path}: cannot read kernel: {e.strerror or e}") from None
