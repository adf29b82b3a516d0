"""Tests for pyxen.builder.elf: ELF64 validation and Xen note decoding.

The ELF images are synthesised here with struct.pack so that every
malformation can be produced on purpose.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyxen.builder.elf import (
    PAGE_SIZE,
    ElfError,
    Segment,
    XenNote,
    load_elf,
    parse_features,
    parse_xen_kernel,
)

VIRT_BASE = 0xFFFFFFFF80000000
PADDR = 0x1000000
TEXT_VA = VIRT_BASE + PADDR  # 0xffffffff81000000
HYPERCALL_VA = TEXT_VA + 0x1000
ENTRY = TEXT_VA + 0x10

PF_X, PF_W, PF_R = 1, 2, 4


# --- a tiny ELF writer ----------------------------------------------------------


def note(ntype: int, desc: bytes, name: bytes = b"Xen\0") -> bytes:
    """One ELF note with 4-byte padding of name and descriptor."""
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def num_note(ntype: int, value: int, size: int = 8) -> bytes:
    return note(ntype, value.to_bytes(size, "little"))


def str_note(ntype: int, text: str) -> bytes:
    return note(ntype, text.encode() + b"\0")


def default_notes(**over: bytes | None) -> bytes:
    """Notes of a typical 64-bit PV Linux; override or drop (None) by name."""
    notes: dict[str, bytes | None] = {
        "GUEST_OS": str_note(XenNote.GUEST_OS, "linux"),
        "GUEST_VERSION": str_note(XenNote.GUEST_VERSION, "2.6"),
        "XEN_VERSION": str_note(XenNote.XEN_VERSION, "xen-3.0"),
        "LOADER": str_note(XenNote.LOADER, "generic"),
        "VIRT_BASE": num_note(XenNote.VIRT_BASE, VIRT_BASE),
        "ENTRY": num_note(XenNote.ENTRY, ENTRY),
        "HYPERCALL_PAGE": num_note(XenNote.HYPERCALL_PAGE, HYPERCALL_VA),
        "FEATURES": str_note(XenNote.FEATURES,
                             "!writable_page_tables|pae_pgdir_above_4gb"),
    }
    notes.update(over)
    return b"".join(v for v in notes.values() if v is not None)


@dataclass
class Seg:
    vaddr: int
    paddr: int
    data: bytes
    memsz: int | None = None
    flags: int = PF_R | PF_X
    ptype: int = 1


@dataclass
class ElfSpec:
    segments: list[Seg] = field(default_factory=lambda: [
        Seg(TEXT_VA, PADDR, b"\x90" * 0x2000, 0x3000)])
    notes: bytes | None = field(default_factory=default_notes)
    notes_in: str = "phdr"  # "phdr", "shdr" or "both"
    note_phdr_offset_zero: bool = False
    xen_guest: bytes | None = None
    entry: int = ENTRY
    e_type: int = 2
    machine: int = 62
    ei_class: int = 2
    ei_data: int = 1
    extra_phdrs: list[tuple[int, int, int, int, int, int, int, int]] = \
        field(default_factory=list)


def build_elf(spec: ElfSpec | None = None) -> bytes:
    """Lay out: ehdr | phdrs | segment data | notes | sections | shdrs."""
    spec = spec or ElfSpec()
    nphdr = len(spec.segments) + len(spec.extra_phdrs)
    note_ph = spec.notes is not None and spec.notes_in in ("phdr", "both")
    note_sh = spec.notes is not None and spec.notes_in in ("shdr", "both")
    if note_ph:
        nphdr += 1
    off = 64 + 56 * nphdr
    body = b""
    phdrs = b""
    for s in spec.segments:
        off_al = (off + 15) & ~15
        body += b"\0" * (off_al - off)
        off = off_al
        memsz = s.memsz if s.memsz is not None else len(s.data)
        phdrs += struct.pack("<IIQQQQQQ", s.ptype, s.flags, off, s.vaddr,
                             s.paddr, len(s.data), memsz, PAGE_SIZE)
        body += s.data
        off += len(s.data)
    for ph in spec.extra_phdrs:
        phdrs += struct.pack("<IIQQQQQQ", *ph)
    note_off = off
    if spec.notes is not None:
        body += spec.notes
        off += len(spec.notes)
        if note_ph:
            p_off = 0 if spec.note_phdr_offset_zero else note_off
            phdrs += struct.pack("<IIQQQQQQ", 4, PF_R, p_off, 0, 0,
                                 len(spec.notes), len(spec.notes), 4)
    # sections: null, [notes], [__xen_guest], .shstrtab
    shstr = b"\0.note.Xen\0__xen_guest\0.shstrtab\0"
    sections: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]
    if note_sh:
        assert spec.notes is not None
        sections.append((1, 7, note_off, len(spec.notes)))
    if spec.xen_guest is not None:
        sections.append((11, 1, off, len(spec.xen_guest)))
        body += spec.xen_guest
        off += len(spec.xen_guest)
    sections.append((23, 3, off, len(shstr)))
    body += shstr
    off += len(shstr)
    shoff = off
    shdrs = b"".join(struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, o, sz,
                                 0, 0, 1, 0)
                     for name, typ, o, sz in sections)
    ident = (b"\x7fELF" + bytes([spec.ei_class, spec.ei_data, 1, 0])
             + b"\0" * 8)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, spec.e_type, spec.machine,
                       1, spec.entry, 64, shoff, 0, 64, 56, nphdr, 64,
                       len(sections), len(sections) - 1)
    return ehdr + phdrs + body + shdrs


def parse(spec: ElfSpec | None = None, name: str = "kernel") -> object:
    return parse_xen_kernel(build_elf(spec), name)


def err(spec: ElfSpec | bytes, name: str = "kernel") -> str:
    data = spec if isinstance(spec, bytes) else build_elf(spec)
    with pytest.raises(ElfError) as ei:
        parse_xen_kernel(data, name)
    msg = str(ei.value)
    assert msg.startswith(f"{name}: ")
    return msg


# --- good kernels ----------------------------------------------------------------


def test_typical_pv_kernel() -> None:
    k = parse_xen_kernel(build_elf(), "vmlinux")
    assert k.name == "vmlinux"
    assert k.entry == ENTRY
    assert k.virt_base == VIRT_BASE
    assert k.paddr_offset == 0
    assert k.hypercall_page == HYPERCALL_VA
    assert k.virt_kstart == TEXT_VA
    assert k.virt_kend == TEXT_VA + 0x3000
    assert k.image_size == 0x3000
    assert k.guest_os == "linux"
    assert k.guest_version == "2.6"
    assert k.loader == "generic"
    assert k.xen_version == "xen-3.0"
    assert k.features_required == {"writable_page_tables"}
    assert k.features_supported == {"writable_page_tables",
                                    "pae_pgdir_above_4gb"}
    assert k.features_required_mask == 1 << 0
    assert k.features_supported_mask == (1 << 0) | (1 << 4)
    assert k.notes_source == "PT_NOTE"
    assert k.notes[XenNote.GUEST_OS] == "linux"
    assert k.notes[XenNote.VIRT_BASE] == VIRT_BASE
    assert len(k.segments) == 1
    seg = k.segments[0]
    assert isinstance(seg, Segment)
    vaddr, memsz, data = seg
    assert (vaddr, memsz) == (TEXT_VA, 0x3000)
    assert data == b"\x90" * 0x2000  # BSS is implied by memsz


def test_four_and_eight_byte_numeric_notes() -> None:
    for size in (4, 8):
        lo_base = 0x400000
        spec = ElfSpec(
            segments=[Seg(lo_base + 0x1000, 0x1000, b"\xcc" * 0x2000)],
            entry=lo_base + 0x1000,
            notes=default_notes(
                VIRT_BASE=num_note(XenNote.VIRT_BASE, lo_base, size),
                ENTRY=num_note(XenNote.ENTRY, lo_base + 0x1004, size),
                HYPERCALL_PAGE=num_note(XenNote.HYPERCALL_PAGE,
                                        lo_base + 0x2000, size)))
        k = parse_xen_kernel(build_elf(spec))
        assert k.virt_base == lo_base
        assert k.entry == lo_base + 0x1004
        assert k.hypercall_page == lo_base + 0x2000


def test_entry_defaults_to_e_entry_and_virt_base_to_zero() -> None:
    spec = ElfSpec(
        segments=[Seg(0x200000, 0x200000, b"\x90" * 0x1000)],
        entry=0x200080,
        notes=default_notes(VIRT_BASE=None, ENTRY=None, HYPERCALL_PAGE=None))
    k = parse_xen_kernel(build_elf(spec))
    assert k.virt_base == 0
    assert k.paddr_offset == 0
    assert k.entry == k.elf_entry == 0x200080
    assert k.hypercall_page is None


def test_segments_are_placed_by_paddr_plus_offset() -> None:
    # libelf places by p_paddr: an explicit PADDR_OFFSET of VIRT_BASE
    # (old kernels wrote p_paddr == p_vaddr) means no relocation.
    spec = ElfSpec(
        segments=[Seg(TEXT_VA, TEXT_VA, b"\x90" * 0x2000)],
        notes=default_notes(
            PADDR_OFFSET=num_note(XenNote.PADDR_OFFSET, VIRT_BASE)))
    k = parse_xen_kernel(build_elf(spec))
    assert k.paddr_offset == VIRT_BASE
    assert k.segments[0].vaddr == TEXT_VA


def test_multiple_segments_and_page_alignment() -> None:
    spec = ElfSpec(segments=[
        Seg(TEXT_VA + 0x10, PADDR + 0x10, b"\x90" * 0x1ff0),
        Seg(TEXT_VA + 0x4000, PADDR + 0x4000, b"d" * 0x100, 0x1801,
            PF_R | PF_W),
    ])
    k = parse_xen_kernel(build_elf(spec))
    assert k.virt_kstart == TEXT_VA
    assert k.virt_kend == TEXT_VA + 0x6000
    assert [s.vaddr for s in k.segments] == [TEXT_VA + 0x10, TEXT_VA + 0x4000]


def test_non_loadable_and_empty_segments_are_ignored() -> None:
    spec = ElfSpec(segments=[
        Seg(TEXT_VA, PADDR, b"\x90" * 0x2000),
        Seg(0, 0, b"", 0),                         # empty
        Seg(TEXT_VA, PADDR, b"\x90" * 0x10, flags=0),  # no permissions
        Seg(TEXT_VA, PADDR, b"x" * 8, ptype=0x6474E551),  # PT_GNU_STACK-ish
    ])
    k = parse_xen_kernel(build_elf(spec))
    assert len(k.segments) == 1


def test_notes_from_sht_note_when_no_pt_note() -> None:
    k = parse_xen_kernel(build_elf(ElfSpec(notes_in="shdr")))
    assert k.notes_source == "SHT_NOTE"
    assert k.hypercall_page == HYPERCALL_VA


def test_pt_note_with_zero_offset_is_skipped() -> None:
    # binutils bug workaround in libelf: fall back to the section.
    k = parse_xen_kernel(build_elf(ElfSpec(notes_in="both",
                                           note_phdr_offset_zero=True)))
    assert k.notes_source == "SHT_NOTE"


def test_non_xen_notes_are_ignored() -> None:
    gnu = note(0x55, b"\x01\x02\x03\x04" * 5, name=b"GNU\0")
    k = parse_xen_kernel(build_elf(ElfSpec(notes=gnu + default_notes())))
    assert 0x55 not in k.notes


def test_unknown_and_special_note_types() -> None:
    extra = (note(0x77, b"\xde\xad\xbe\xef")
             + note(XenNote.L1_MFN_VALID, struct.pack("<QQ", 0xFF0, 0x10))
             + note(XenNote.SUPPORTED_FEATURES,
                    struct.pack("<I", (1 << 8) | (1 << 11)))
             + num_note(XenNote.MOD_START_PFN, 1, 4)
             + num_note(XenNote.SUSPEND_CANCEL, 1, 4)
             + num_note(XenNote.INIT_P2M, 0xFFFFEA0000000000)
             + num_note(XenNote.HV_START_LOW, 0xFFFF800000000000)
             + num_note(XenNote.PHYS32_ENTRY, 0x1000000, 4)
             + str_note(XenNote.PAE_MODE, "yes")
             + str_note(XenNote.BSD_SYMTAB, "yes")
             + note(XenNote.PHYS32_RELOC, b"\0\0\x20\0"))
    k = parse_xen_kernel(build_elf(ElfSpec(notes=default_notes() + extra)))
    assert k.notes[0x77] == b"\xde\xad\xbe\xef"
    assert k.notes[XenNote.L1_MFN_VALID] == ((0xFF0, 0x10),)
    assert k.l1_mfn_valid == ((0xFF0, 0x10),)
    assert {"hvm_callback_vector", "dom0"} <= k.features_supported
    assert k.features_supported_mask & (1 << 11)
    assert k.unmapped_initrd and k.suspend_cancel and k.bsd_symtab
    assert k.init_p2m == 0xFFFFEA0000000000
    assert k.hv_start_low == 0xFFFF800000000000
    assert k.phys32_entry == 0x1000000
    assert k.pae_mode == "yes"
    assert k.notes[XenNote.PHYS32_RELOC] == b"\0\0\x20\0"


def test_unterminated_string_note_is_accepted() -> None:
    notes = default_notes(GUEST_OS=note(XenNote.GUEST_OS, b"linux"))
    k = parse_xen_kernel(build_elf(ElfSpec(notes=notes)))
    assert k.guest_os == "linux"


def test_legacy_xen_guest_section() -> None:
    # Pre-note kernels: p_paddr == p_vaddr, PADDR_OFFSET defaults to
    # VIRT_BASE and HYPERCALL_PAGE is a page number relative to VIRT_BASE.
    legacy = (b"GUEST_OS=linux,GUEST_VER=2.6,XEN_VER=xen-3.0,"
              b"VIRT_BASE=0xffffffff80000000,HYPERCALL_PAGE=0x1001,"
              b"LOADER=generic,FEATURES=writable_descriptor_tables|"
              b"!writable_page_tables\0")
    spec = ElfSpec(segments=[Seg(TEXT_VA, TEXT_VA, b"\x90" * 0x3000)],
                   notes=None, xen_guest=legacy)
    k = parse_xen_kernel(build_elf(spec))
    assert k.notes_source == "__xen_guest"
    assert k.virt_base == VIRT_BASE
    assert k.paddr_offset == VIRT_BASE
    assert k.hypercall_page == VIRT_BASE + (0x1001 << 12) == HYPERCALL_VA
    assert k.segments[0].vaddr == TEXT_VA
    assert k.entry == ENTRY
    assert k.features_required == {"writable_page_tables"}
    assert "writable_descriptor_tables" in k.features_supported
    assert k.notes == {}


def test_legacy_virt_entry_and_paddr_offset() -> None:
    legacy = (b"GUEST_OS=linux,XEN_VER=xen-3.0,VIRT_BASE=0xffffffff80000000,"
              b"ELF_PADDR_OFFSET=0,VIRT_ENTRY=0xffffffff81000020,PAE=yes,"
              b"BSD_SYMTAB")
    spec = ElfSpec(segments=[Seg(TEXT_VA, PADDR, b"\x90" * 0x1000)],
                   notes=None, xen_guest=legacy)
    k = parse_xen_kernel(build_elf(spec))
    assert k.paddr_offset == 0
    assert k.entry == TEXT_VA + 0x20
    assert k.bsd_symtab
    assert k.pae_mode == "yes"


def test_parse_features() -> None:
    sup, req = parse_features("!writable_page_tables|pae_pgdir_above_4gb|"
                              "no_such_thing||dom0")
    assert req == {"writable_page_tables"}
    assert sup == {"writable_page_tables", "pae_pgdir_above_4gb", "dom0"}
    with pytest.raises(ValueError, match="no_such_thing"):
        parse_features("!no_such_thing")


# --- errors ----------------------------------------------------------------------


def test_bad_magic() -> None:
    assert err(b"#!/bin/sh\n", "hello") == "hello: not an ELF file (bad magic)"
    assert err(b"", "hello") == "hello: not an ELF file (bad magic)"


def test_truncated_header() -> None:
    assert "truncated ELF header" in err(build_elf()[:40])


def test_wrong_machine() -> None:
    msg = err(ElfSpec(machine=3), "foo.elf")
    assert msg == "foo.elf: ELF for machine 3 (i386), pyxen needs x86_64"
    assert "machine 183 (AArch64)" in err(ElfSpec(machine=183))
    assert "machine 9999 (unknown)" in err(ElfSpec(machine=9999))


def test_wrong_class_and_endianness() -> None:
    assert "32-bit" in err(ElfSpec(ei_class=1))
    assert "bad ELF class" in err(ElfSpec(ei_class=7))
    assert "big-endian" in err(ElfSpec(ei_data=2))
    assert "data encoding" in err(ElfSpec(ei_data=0))


def test_wrong_type() -> None:
    assert "DYN" in err(ElfSpec(e_type=3))
    assert "REL" in err(ElfSpec(e_type=1))


def test_program_headers_out_of_bounds() -> None:
    data = bytearray(build_elf())
    struct.pack_into("<Q", data, 32, len(data) - 10)  # e_phoff
    assert "program header table" in err(bytes(data))


def test_no_program_headers() -> None:
    data = bytearray(build_elf())
    struct.pack_into("<H", data, 56, 0)  # e_phnum
    assert "no program headers" in err(bytes(data))


def test_bad_phentsize() -> None:
    data = bytearray(build_elf())
    struct.pack_into("<H", data, 54, 32)
    assert "entry size" in err(bytes(data))


def test_segment_past_end_of_file() -> None:
    data = bytearray(build_elf())
    struct.pack_into("<Q", data, 64 + 32, 0x10000000)  # p_filesz of seg 0
    struct.pack_into("<Q", data, 64 + 40, 0x10000000)  # p_memsz
    assert "extends past the end of the file" in err(bytes(data))


def test_filesz_larger_than_memsz() -> None:
    spec = ElfSpec(segments=[Seg(TEXT_VA, PADDR, b"\x90" * 0x2000, 0x1000)])
    assert "exceeds memory size" in err(spec)


def test_overlapping_segments() -> None:
    spec = ElfSpec(segments=[
        Seg(TEXT_VA, PADDR, b"\x90" * 0x2000),
        Seg(TEXT_VA + 0x1000, PADDR + 0x1000, b"\x90" * 0x2000)])
    assert "overlap" in err(spec)


def test_wrapping_segment() -> None:
    spec = ElfSpec(segments=[
        Seg(TEXT_VA, PADDR, b"\x90" * 0x1000),
        Seg(0xFFFFFFFFFFFFF000, 0xFFFFFFFFFFFFF000, b"", 0x2000)])
    assert "wraps" in err(spec)


def test_non_canonical_and_xen_hole() -> None:
    spec = ElfSpec(segments=[Seg(0x0000900000000000, 0x0000900000000000,
                                 b"\x90" * 0x1000)],
                   entry=0x0000900000000000,
                   notes=default_notes(VIRT_BASE=None, ENTRY=None,
                                       HYPERCALL_PAGE=None))
    assert "canonical" in err(spec)
    spec = ElfSpec(segments=[Seg(0xFFFF800000100000, 0xFFFF800000100000,
                                 b"\x90" * 0x1000)],
                   entry=0xFFFF800000100000,
                   notes=default_notes(VIRT_BASE=None, ENTRY=None,
                                       HYPERCALL_PAGE=None))
    assert "reserved for Xen" in err(spec)


def test_no_loadable_segments() -> None:
    spec = ElfSpec(segments=[Seg(TEXT_VA, PADDR, b"x" * 16, ptype=6)])
    assert "no loadable" in err(spec)


def test_no_xen_notes() -> None:
    msg = err(ElfSpec(notes=None))
    assert msg == ("kernel: kernel has no Xen ELF notes (XEN_ELFNOTE_*) and no "
                   "__xen_guest section: not a Xen PV kernel")
    gnu_only = note(1, b"\0" * 16, name=b"GNU\0")
    assert "not a Xen PV kernel" in err(ElfSpec(notes=gnu_only))


def test_entry_outside_image() -> None:
    notes = default_notes(ENTRY=num_note(XenNote.ENTRY, TEXT_VA + 0x10000))
    assert "entry point 0xffffffff81010000" in err(ElfSpec(notes=notes))


def test_vaddr_mismatch_hint() -> None:
    # p_paddr == p_vaddr but no PADDR_OFFSET note: segments land at
    # p_paddr + VIRT_BASE, which wraps or leaves the entry outside.
    spec = ElfSpec(segments=[Seg(TEXT_VA, TEXT_VA, b"\x90" * 0x1000)])
    msg = err(spec)
    assert "p_paddr=0xffffffff81000000" in msg and "PADDR_OFFSET=0x0" in msg


def test_hypercall_page_checks() -> None:
    notes = default_notes(HYPERCALL_PAGE=num_note(XenNote.HYPERCALL_PAGE,
                                                  HYPERCALL_VA + 8))
    assert "not page aligned" in err(ElfSpec(notes=notes))
    notes = default_notes(HYPERCALL_PAGE=num_note(XenNote.HYPERCALL_PAGE,
                                                  TEXT_VA + 0x3000))
    assert "not inside the loaded image" in err(ElfSpec(notes=notes))


def test_hypercall_page_may_be_in_bss() -> None:
    notes = default_notes(HYPERCALL_PAGE=num_note(XenNote.HYPERCALL_PAGE,
                                                  TEXT_VA + 0x2000))
    k = parse_xen_kernel(build_elf(ElfSpec(notes=notes)))
    assert k.hypercall_page == TEXT_VA + 0x2000


def test_virt_base_above_image() -> None:
    notes = default_notes(VIRT_BASE=num_note(XenNote.VIRT_BASE,
                                             TEXT_VA + 0x1000),
                          PADDR_OFFSET=num_note(XenNote.PADDR_OFFSET,
                                                TEXT_VA + 0x1000))
    spec = ElfSpec(segments=[Seg(TEXT_VA, TEXT_VA, b"\x90" * 0x2000)],
                   notes=notes)
    assert "VIRT_BASE" in err(spec)


def test_paddr_offset_without_virt_base() -> None:
    notes = default_notes(VIRT_BASE=None,
                          PADDR_OFFSET=num_note(XenNote.PADDR_OFFSET, 0))
    assert "PADDR_OFFSET is set but VIRT_BASE is not" in err(
        ElfSpec(notes=notes))


def test_init_p2m_inside_image() -> None:
    notes = default_notes() + num_note(XenNote.INIT_P2M, TEXT_VA)
    assert "INIT_P2M" in err(ElfSpec(notes=notes))


def test_required_unknown_feature() -> None:
    notes = default_notes(FEATURES=str_note(XenNote.FEATURES,
                                            "!writable_page_tables|!warp"))
    assert "unknown Xen feature 'warp'" in err(ElfSpec(notes=notes))
    legacy = b"GUEST_OS=linux,XEN_VER=xen-3.0,FEATURES=!warp"
    spec = ElfSpec(segments=[Seg(0x100000, 0x100000, b"\x90" * 0x1000)],
                   entry=0x100000, notes=None, xen_guest=legacy)
    assert "unknown Xen feature 'warp'" in err(spec)


def test_wrong_xen_version_or_loader() -> None:
    notes = default_notes(XEN_VERSION=str_note(XenNote.XEN_VERSION, "xen-4"))
    assert "xen-3.0" in err(ElfSpec(notes=notes))
    notes = default_notes(GUEST_OS=str_note(XenNote.GUEST_OS, "plan9"),
                          LOADER=str_note(XenNote.LOADER, "elfish"))
    assert "LOADER" in err(ElfSpec(notes=notes))
    notes = default_notes(GUEST_OS=str_note(XenNote.GUEST_OS, "Mini-OS"))
    parse_xen_kernel(build_elf(ElfSpec(notes=notes)))  # generic loader is ok


def test_bad_numeric_note_size() -> None:
    notes = default_notes(ENTRY=note(XenNote.ENTRY, b"\x01\x02\x03"))
    assert "3-byte value" in err(ElfSpec(notes=notes))


def test_bad_special_note_sizes() -> None:
    n = default_notes() + note(XenNote.SUPPORTED_FEATURES, b"\x01\x02")
    assert "SUPPORTED_FEATURES" in err(ElfSpec(notes=n))
    n = default_notes() + note(XenNote.L1_MFN_VALID, b"\0" * 8)
    assert "L1_MFN_VALID" in err(ElfSpec(notes=n))


def test_truncated_note() -> None:
    bad = struct.pack("<III", 4, 0x100, XenNote.ENTRY) + b"Xen\0" + b"\0" * 8
    assert "truncated ELF note" in err(ElfSpec(notes=default_notes() + bad))


def test_legacy_bad_number() -> None:
    legacy = b"GUEST_OS=linux,XEN_VER=xen-3.0,VIRT_BASE=0xzz"
    spec = ElfSpec(notes=None, xen_guest=legacy)
    assert "bad number for VIRT_BASE" in err(spec)


def test_broken_section_table_only_matters_when_needed() -> None:
    data = bytearray(build_elf())
    struct.pack_into("<Q", data, 40, len(data) + 100)  # e_shoff
    parse_xen_kernel(bytes(data))  # notes are in PT_NOTE: fine
    data = bytearray(build_elf(ElfSpec(notes_in="shdr")))
    struct.pack_into("<Q", data, 40, len(data) + 100)
    assert "section header table" in err(bytes(data))


# --- load_elf ------------------------------------------------------------------


def test_load_elf(tmp_path: Path) -> None:
    p = tmp_path / "vmlinux"
    p.write_bytes(build_elf())
    k = load_elf(p)
    assert k.name == str(p)
    assert k.entry == ENTRY
    with pytest.raises(ElfError, match="not found"):
        load_elf(tmp_path / "missing")
    with pytest.raises(ElfError, match="directory"):
        load_elf(tmp_path)
    with pytest.raises(ElfError, match=r"^.*bad magic"):
        (tmp_path / "text").write_text("hello")
        load_elf(tmp_path / "text")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_load_elf_unreadable(tmp_path: Path) -> None:
    p = tmp_path / "secret"
    p.write_bytes(build_elf())
    p.chmod(0)
    with pytest.raises(ElfError, match="cannot read"):
        load_elf(p)


# --- fuzzing -------------------------------------------------------------------

_GOOD = build_elf(ElfSpec(segments=[
    Seg(TEXT_VA, PADDR, b"\x90" * 0x100, 0x2000),
    Seg(TEXT_VA + 0x2000, PADDR + 0x2000, b"d" * 0x40, 0x1000, PF_R | PF_W)],
    notes_in="both"))
_LEGACY = build_elf(ElfSpec(
    segments=[Seg(TEXT_VA, TEXT_VA, b"\x90" * 0x80, 0x3000)], notes=None,
    xen_guest=b"GUEST_OS=linux,XEN_VER=xen-3.0,VIRT_BASE=0xffffffff80000000,"
              b"HYPERCALL_PAGE=0x1001,FEATURES=!writable_page_tables\0"))


def _check_parses_or_elferror(data: bytes) -> None:
    try:
        k = parse_xen_kernel(data, "fuzz")
    except ElfError as e:
        assert str(e).startswith("fuzz: ")
        return
    # Invariants of every successful parse.
    assert k.virt_kstart <= k.entry < k.virt_kend
    assert k.virt_kstart % PAGE_SIZE == 0 and k.virt_kend % PAGE_SIZE == 0
    assert k.virt_base <= k.virt_kstart
    for s in k.segments:
        assert len(s.data) <= s.memsz
        assert k.virt_kstart <= s.vaddr and s.vaddr + s.memsz <= k.virt_kend
    if k.hypercall_page is not None:
        assert k.hypercall_page % PAGE_SIZE == 0


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from([_GOOD, _LEGACY]),
       edits=st.lists(st.tuples(st.integers(min_value=0),
                                st.integers(min_value=0, max_value=255)),
                      min_size=1, max_size=8),
       cut=st.none() | st.integers(min_value=0))
def test_fuzz_mutations(base: bytes, edits: list[tuple[int, int]],
                        cut: int | None) -> None:
    data = bytearray(base)
    for pos, val in edits:
        data[pos % len(data)] = val
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    _check_parses_or_elferror(bytes(data))


@settings(max_examples=200, deadline=None)
@given(field_at=st.sampled_from(
           [24, 32, 40, 54, 56, 58, 60, 62] + list(range(64, 64 + 56 * 3, 8))),
       value=st.sampled_from([0, 1, 0xFFF, 0x1000, 0x7FFFFFFF, 0xFFFFFFFF,
                              2**63, 2**64 - 1, 2**64 - 0x1000]))
def test_fuzz_header_fields(field_at: int, value: int) -> None:
    """Overwrite whole header fields with boundary values."""
    data = bytearray(_GOOD)
    size = 2 if field_at in (54, 56, 58, 60, 62) else 8
    data[field_at:field_at + size] = (value & ((1 << (8 * size)) - 1)
                                      ).to_bytes(size, "little")
    _check_parses_or_elferror(bytes(data))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(blob: bytes) -> None:
    _check_parses_or_elferror(b"\x7fELF\x02\x01\x01" + blob)


# --- the real test guest, when another part of the tree has built it -----------

_HELLO = Path(__file__).resolve().parents[2] / "guest" / "build" / "hello"


@pytest.mark.skipif(not _HELLO.exists(), reason="guest/build/hello not built")
def test_hello_guest() -> None:
    k = load_elf(_HELLO)
    assert k.virt_kstart <= k.entry < k.virt_kend
    assert k.virt_base <= k.virt_kstart
    assert k.hypercall_page is not None
    assert k.hypercall_page % PAGE_SIZE == 0
    assert k.virt_kstart <= k.hypercall_page < k.virt_kend
    assert k.segments


@pytest.mark.parametrize("virt_base", ["4194304", "0x400000", "020000000"])
def test_legacy_number_bases(virt_base: str) -> None:
    legacy = (f"GUEST_OS=linux,XEN_VER=xen-3.0,VIRT_BASE={virt_base},"
              "HYPERCALL_PAGE=1").encode()
    spec = ElfSpec(segments=[Seg(0x400000, 0x400000, b"\x90" * 0x2000)],
                   entry=0x400000, notes=None, xen_guest=legacy)
    k = parse_xen_kernel(build_elf(spec))
    assert k.virt_base == 0x400000
    assert k.hypercall_page == 0x401000


def test_bss_only_segment_offset_is_ignored() -> None:
    spec = ElfSpec(
        segments=[Seg(TEXT_VA, PADDR, b"\x90" * 0x2000),
                  Seg(TEXT_VA + 0x2000, PADDR + 0x2000, b"", 0x4000,
                      PF_R | PF_W)],
        extra_phdrs=[])
    data = bytearray(build_elf(spec))
    struct.pack_into("<Q", data, 64 + 56 + 8, 0xFFFFFFFF)  # seg 1 p_offset
    k = parse_xen_kernel(bytes(data))
    assert k.segments[1] == Segment(TEXT_VA + 0x2000, 0x4000, b"")
    assert k.virt_kend == TEXT_VA + 0x6000
