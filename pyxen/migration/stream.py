"""Xen's domain image format, as pyxen writes and reads it.

Three layers, outermost first, each from Xen's own documents:

* xl's save-file header (``tools/xl/xl.h``: ``struct save_file_header``):
  a 32-byte magic, a byte-order word, mandatory and optional flag words
  and the length of the optional data (the domain's config, length first).
  ``xl migrate`` sends no such header; ``xl save`` does.
* libxl's stream, version 2 (``docs/specs/libxl-migration-stream.pandoc``):
  a ``LibxlFmt`` header and records; ``LIBXC_CONTEXT`` hands the stream to
  the libxc layer, whose records follow it in line.
* libxc's stream, version 3 (``docs/specs/libxc-migration-stream.pandoc``,
  ``tools/libs/guest/xg_sr_stream_format.h``): an image header, a domain
  header, then records (``PAGE_DATA``, ``X86_PV_INFO``,
  ``X86_PV_VCPU_BASIC`` ...) up to ``END``.

Every record is ``u32 type, u32 body_length, body, zero padding to 8``.

This module is pure: bytes in, dataclasses out and back. It checks each
record as Xen's restore code does (``xg_sr_restore.c``,
``xg_sr_restore_x86_pv.c``) and raises :class:`StreamError` naming the
record and its offset in the file; nothing a stream says is used before it
has passed those checks. Records of pyxen's own (its event channels,
grants, xenstore and backends, which Xen's stream does not carry because a
Xen guest rebuilds them on resume) are *optional* records (bit 31 set), so
Xen's restore would skip them, as the spec allows.
"""

from __future__ import annotations

import enum
import functools
import io
import json
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# ------------------------------------------------------------------ xl's save-file header
XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
XL_BYTEORDER = 0x01020304
XL_MANDATORY_FLAG_JSON = 1 << 0
XL_MANDATORY_FLAG_STREAMv2 = 1 << 1
XL_MANDATORY_FLAG_ALL = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMv2
_XL_HDR = struct.Struct("<32sIIII")  # magic, byteorder, mandatory, optional, optional_data_len
XL_OPTDATA_MAX = 1 << 24  # a config of 16 MiB is not a config

# ------------------------------------------------------------------ libxl's stream (v2)
LIBXL_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_VERSION = 2
LIBXL_OPT_BIG_ENDIAN = 1 << 0
LIBXL_OPT_LEGACY = 1 << 1
_LIBXL_HDR = struct.Struct(">QII")  # big-endian, whatever the options say


class LibxlRec(enum.IntEnum):
    END = 0
    LIBXC_CONTEXT = 1
    EMULATOR_XENSTORE_DATA = 2
    EMULATOR_CONTEXT = 3
    CHECKPOINT_END = 4
    CHECKPOINT_STATE = 5


# ------------------------------------------------------------------ libxc's stream (v3)
IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46  # "XENF"
IHDR_VERSION = 3
IHDR_OPT_BIG_ENDIAN = 1 << 0
_IHDR = struct.Struct(">QIIHHI")  # marker, id, version, options, res, res: big-endian
_DHDR = struct.Struct("<IHHII")  # type, page_shift, res, xen_major, xen_minor
DHDR_TYPE_X86_PV = 1
DHDR_TYPE_X86_HVM = 2

_RHDR = struct.Struct("<II")
REC_ALIGN = 8
REC_LENGTH_MAX = 128 << 20  # xg_sr_stream_format.h
REC_TYPE_OPTIONAL = 0x80000000


class Rec(enum.IntEnum):
    END = 0x00
    PAGE_DATA = 0x01
    X86_PV_INFO = 0x02
    X86_PV_P2M_FRAMES = 0x03
    X86_PV_VCPU_BASIC = 0x04
    X86_PV_VCPU_EXTENDED = 0x05
    X86_PV_VCPU_XSAVE = 0x06
    SHARED_INFO = 0x07
    X86_TSC_INFO = 0x08
    HVM_CONTEXT = 0x09
    HVM_PARAMS = 0x0A
    TOOLSTACK = 0x0B
    X86_PV_VCPU_MSRS = 0x0C
    VERIFY = 0x0D
    CHECKPOINT = 0x0E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0F
    STATIC_DATA_END = 0x10
    X86_CPUID_POLICY = 0x11
    X86_MSR_POLICY = 0x12
    # pyxen's own, optional (bit 31): Xen's restore skips them. The body is
    # JSON: pyxen's domain state that a Xen guest would rebuild on resume.
    PYXEN_DOMAIN_STATE = 0xF0000001
    # a live round ended (body: u32 round number, u32 0); the receiver
    # validates its page tables then and acknowledges (protocol.py)
    PYXEN_ROUND_END = 0xF0000002


class PageType(enum.IntEnum):
    """XEN_DOMCTL_PFINFO_* >> 28, as the top nibble of a PAGE_DATA pfn word."""

    NOTAB = 0x0
    L1TAB = 0x1
    L2TAB = 0x2
    L3TAB = 0x3
    L4TAB = 0x4
    L1TAB_PIN = 0x9
    L2TAB_PIN = 0xA
    L3TAB_PIN = 0xB
    L4TAB_PIN = 0xC
    BROKEN = 0xD
    XALLOC = 0xE
    XTAB = 0xF

    @property
    def has_data(self) -> bool:
        """NOTAB and the L1-L4 tables (pinned or not) carry a page of data."""
        return self not in (PageType.BROKEN, PageType.XALLOC, PageType.XTAB)

    @property
    def level(self) -> int:
        """1-4 for a page-table page, 0 otherwise."""
        v = int(self) & 0x7 if int(self) <= 0xC else 0
        return v if 1 <= v <= 4 else 0

    @property
    def pinned(self) -> bool:
        return PageType.L1TAB_PIN <= self <= PageType.L4TAB_PIN


PAGE_DATA_PFN_MASK = 0x000FFFFFFFFFFFFF
PAGE_DATA_TYPE_SHIFT = 60
MAX_BATCH_SIZE = 1024  # pages per PAGE_DATA record on save (xg_sr_common.h)


class StreamError(Exception):
    """A stream that cannot be restored: the message names the record and its offset."""


def _rec_name(t: int) -> str:
    try:
        return Rec(t).name
    except ValueError:
        return f"{'optional' if t & REC_TYPE_OPTIONAL else 'mandatory'} record {t:#x}"


# ------------------------------------------------------------------ records: encoding
def encode_record(rtype: int, body: bytes) -> bytes:
    """A record: header, body, zero padding to 8 octets."""
    if len(body) > REC_LENGTH_MAX:
        raise ValueError(f"{_rec_name(rtype)} body of {len(body)} bytes exceeds {REC_LENGTH_MAX}")
    pad = -len(body) % REC_ALIGN
    return _RHDR.pack(rtype, len(body)) + body + b"\0" * pad


@dataclass
class ImageHeader:
    version: int = IHDR_VERSION
    options: int = 0

    def pack(self) -> bytes:
        return _IHDR.pack(IHDR_MARKER, IHDR_ID, self.version, self.options, 0, 0)

    @classmethod
    def unpack(cls, b: bytes) -> ImageHeader:
        marker, ident, version, options, _, _ = _IHDR.unpack(b)
        if marker != IHDR_MARKER:
            raise StreamError(f"not a Xen domain image: marker {marker:#018x} (a legacy image?)")
        if ident != IHDR_ID:
            raise StreamError(f"not a Xen domain image: id {ident:#010x}, expected {IHDR_ID:#x} (XENF)")
        if version not in (2, 3):
            raise StreamError(f"image format version {version} is not supported (2 and 3 are)")
        if options & IHDR_OPT_BIG_ENDIAN:
            raise StreamError("big-endian image: only little-endian x86 images are supported")
        return cls(version, options)


@dataclass
class DomainHeader:
    type: int = DHDR_TYPE_X86_PV
    page_shift: int = PAGE_SHIFT
    xen_major: int = 4
    xen_minor: int = 19

    def pack(self) -> bytes:
        return _DHDR.pack(self.type, self.page_shift, 0, self.xen_major, self.xen_minor)

    @classmethod
    def unpack(cls, b: bytes) -> DomainHeader:
        h = cls(*(lambda t: (t[0], t[1], t[3], t[4]))(_DHDR.unpack(b)))
        if h.type != DHDR_TYPE_X86_PV:
            what = {DHDR_TYPE_X86_HVM: "x86 HVM"}.get(h.type, f"type {h.type:#x}")
            raise StreamError(f"{what} domain image: pyxen restores x86 PV domains only")
        if h.page_shift != PAGE_SHIFT:
            raise StreamError(f"page_shift {h.page_shift}: only 4 KiB pages (12) are supported")
        return h


# PageType by value and the types that carry data: PAGE_DATA headers hold up to
# 1024 entries, a 512 MiB domain's round ~131072 (an enum call each is slow)
_PAGE_TYPES = {int(t): t for t in PageType}


@functools.lru_cache(maxsize=32)
def _run_consts(count: int) -> tuple[int, int]:
    """For :meth:`PageData.uniform_run`: the little-endian integers of
    ``count`` 64-bit words all 1, and of the words 0, 1, ..., count - 1."""
    return (int.from_bytes(struct.pack(f"<{count}Q", *([1] * count)), "little"),
            int.from_bytes(struct.pack(f"<{count}Q", *range(count)), "little"))
_HAS_DATA = frozenset(t for t in PageType if t.has_data)


@dataclass
class PageData:
    """A PAGE_DATA record: (pfn, type) for each page, data for those that carry it."""

    pfns: list[tuple[int, PageType]]
    data: list[bytes]  # one page each, for the entries whose type has_data, in order

    def pack(self) -> bytes:
        if not self.pfns:
            raise ValueError("PAGE_DATA needs at least one pfn")
        words = [(pfn & PAGE_DATA_PFN_MASK) | (int(t) << PAGE_DATA_TYPE_SHIFT) for pfn, t in self.pfns]
        return struct.pack(f"<II{len(words)}Q", len(words), 0, *words) + b"".join(self.data)

    @classmethod
    def unpack(cls, body: bytes, max_pfn: int | None = None) -> PageData:
        """As Xen's handle_page_data: count >= 1, each pfn within the domain,
        each type known, and the length exactly header + pfns + pages."""
        pfns = cls.unpack_header(body, max_pfn)
        off = 8 + 8 * len(pfns)
        n_data = sum(t.has_data for _, t in pfns)
        data = [body[off + i * PAGE_SIZE: off + (i + 1) * PAGE_SIZE] for i in range(n_data)]
        return cls(pfns, data)

    @staticmethod
    def uniform_run(body: bytes, max_pfn: int | None = None) -> tuple[int, PageType, int] | None:
        """(first pfn, type, count) when the record's entries are ``count``
        consecutive pfns of one type (what a sender's runs of ordinary or
        XALLOC pages look like) and every check of :meth:`unpack_header`
        passes; None otherwise (then unpack_header, entry by entry, says what
        is wrong, if anything).  The words are compared as one integer with
        the arithmetic run they must form, at C speed: a 1024-entry record
        in ~15 us where the entry-by-entry walk takes ~220 us, and a 512 MiB
        guest's first round is 128 of them."""
        if len(body) < 16:
            return None
        (count,) = struct.unpack_from("<I", body)
        if count < 1 or len(body) < 8 + 8 * count:
            return None
        (w0,) = struct.unpack_from("<Q", body, 8)
        pfn0 = w0 & PAGE_DATA_PFN_MASK
        last = pfn0 + count - 1
        if last > PAGE_DATA_PFN_MASK or (max_pfn is not None and last > max_pfn):
            return None
        t = _PAGE_TYPES.get(w0 >> PAGE_DATA_TYPE_SHIFT)
        if t is None:
            return None
        if count > 1:
            ones, ramp = _run_consts(count)
            # each word w0 + i < 2**64 (no carry between words), so the
            # integers are equal exactly when every word is
            if int.from_bytes(body[8:8 + 8 * count], "little") != w0 * ones + ramp:
                return None
        if len(body) != 8 + 8 * count + (PAGE_SIZE * count if t in _HAS_DATA else 0):
            return None
        return pfn0, t, count

    @staticmethod
    def unpack_header(body: bytes, max_pfn: int | None = None) -> list[tuple[int, PageType]]:
        """The (pfn, type) list, with all of :meth:`unpack`'s checks; the
        pages follow at 8 + 8 * count (a restore copies them in runs)."""
        if len(body) < 8:
            raise StreamError(f"PAGE_DATA record truncated: length {len(body)}, min 8")
        (count,) = struct.unpack_from("<I", body)
        if count < 1:
            raise StreamError("expected at least 1 pfn in PAGE_DATA record")
        if len(body) < 8 + 8 * count:
            raise StreamError(f"PAGE_DATA record (length {len(body)}) too short to contain "
                              f"{count} pfns worth of information")
        pfns: list[tuple[int, PageType]] = []
        n_data = 0
        types, has_data = _PAGE_TYPES, _HAS_DATA
        limit = (1 << 64) if max_pfn is None else max_pfn
        for i, w in enumerate(struct.unpack_from(f"<{count}Q", body, 8)):
            pfn = w & PAGE_DATA_PFN_MASK
            if pfn > limit:
                raise StreamError(f"pfn {pfn:#x} (index {i}) outside domain maximum {max_pfn:#x}")
            t = types.get(w >> PAGE_DATA_TYPE_SHIFT)
            if t is None:
                raise StreamError(f"unknown type {w >> PAGE_DATA_TYPE_SHIFT:#x} for pfn {pfn:#x} "
                                  f"(index {i})")
            if t in has_data:
                n_data += 1
            pfns.append((pfn, t))
        want = 8 + 8 * count + PAGE_SIZE * n_data
        if len(body) != want:
            raise StreamError(f"PAGE_DATA record wrong size: length {len(body)}, expected "
                              f"8 + {8 * count} + {PAGE_SIZE * n_data}")
        return pfns


@dataclass
class PvInfo:
    guest_width: int = 8
    pt_levels: int = 4

    def pack(self) -> bytes:
        return struct.pack("<BB6x", self.guest_width, self.pt_levels)

    @classmethod
    def unpack(cls, body: bytes) -> PvInfo:
        if len(body) != 8:
            raise StreamError(f"X86_PV_INFO record truncated: length {len(body)}, expected 8")
        w, lv = struct.unpack_from("<BB", body)
        if (w, lv) not in ((8, 4), (4, 3)):
            raise StreamError(f"invalid X86_PV_INFO combination: width {w}, pt_levels {lv}")
        if (w, lv) != (8, 4):
            raise StreamError("a 32-bit PV guest image: pyxen runs 64-bit PV guests only")
        return cls(w, lv)


@dataclass
class P2mFrames:
    start_pfn: int
    end_pfn: int
    pfns: list[int]

    def pack(self) -> bytes:
        return struct.pack(f"<II{len(self.pfns)}Q", self.start_pfn, self.end_pfn, *self.pfns)

    @classmethod
    def unpack(cls, body: bytes) -> P2mFrames:
        if len(body) < 8:
            raise StreamError(f"X86_PV_P2M_FRAMES record truncated: length {len(body)}, min 8")
        s, e = struct.unpack_from("<II", body)
        if e < s:
            raise StreamError(f"end pfn in stream ({e:#x}) exceeds start ({s:#x})")
        per = PAGE_SIZE // 8  # p2m entries per frame, 64-bit guest
        n = e // per - s // per + 1
        if len(body) != 8 + 8 * n:
            raise StreamError(f"X86_PV_P2M_FRAMES record wrong size: start_pfn {s:#x}, end_pfn "
                              f"{e:#x}, length {len(body)}, expected {8 + 8 * n}")
        return cls(s, e, list(struct.unpack_from(f"<{n}Q", body, 8)))


@dataclass
class VcpuBlob:
    """X86_PV_VCPU_BASIC/EXTENDED/XSAVE/MSRS: a vCPU id and a context blob."""

    vcpu_id: int
    context: bytes

    def pack(self) -> bytes:
        return struct.pack("<II", self.vcpu_id, 0) + self.context

    @classmethod
    def unpack(cls, rtype: int, body: bytes, max_vcpus: int | None = None) -> VcpuBlob:
        """As Xen's handle_x86_pv_vcpu_blob (an empty blob is kept; the caller skips it)."""
        name = _rec_name(rtype)
        if len(body) < 8:
            raise StreamError(f"{name} record truncated: length {len(body)}, header size 8")
        (vid,) = struct.unpack_from("<I", body)
        blob = body[8:]
        if not blob:
            return cls(vid, b"")
        if max_vcpus is not None and vid >= max_vcpus:
            raise StreamError(f"{name} record vcpu_id ({vid}) exceeds domain max ({max_vcpus - 1})")
        if rtype == Rec.X86_PV_VCPU_BASIC and len(blob) != VCPU_CONTEXT_SIZE:
            raise StreamError(f"{name} record wrong size: expected {8 + VCPU_CONTEXT_SIZE}, "
                              f"got {len(body)}")
        if rtype == Rec.X86_PV_VCPU_EXTENDED and len(blob) > 128:
            raise StreamError(f"{name} record too long: max {8 + 128}, got {len(body)}")
        if rtype == Rec.X86_PV_VCPU_XSAVE and len(blob) < 16:
            raise StreamError(f"{name} record too short: min {8 + 16}, got {len(body)}")
        if rtype == Rec.X86_PV_VCPU_MSRS and len(blob) % 16:
            raise StreamError(f"{name} record payload size {len(blob)} expected to be a multiple of 16")
        return cls(vid, blob)


@dataclass
class TscInfo:
    mode: int = 0  # XEN_CPUID_TSC_MODE_DEFAULT
    khz: int = 0
    nsec: int = 0
    incarnation: int = 0

    def pack(self) -> bytes:
        return struct.pack("<IIQII", self.mode, self.khz, self.nsec, self.incarnation, 0)

    @classmethod
    def unpack(cls, body: bytes) -> TscInfo:
        if len(body) != 24:
            raise StreamError(f"X86_TSC_INFO record wrong size: length {len(body)}, expected 24")
        mode, khz, nsec, inc, _ = struct.unpack("<IIQII", body)
        return cls(mode, khz, nsec, inc)


# ------------------------------------------------------------------ vCPU context (x86_64)
# struct cpu_user_regs (arch-x86/xen-x86_64.h), in memory order
USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
             "rax", "rcx", "rdx", "rsi", "rdi")
_USER_REGS = struct.Struct("<15QIIQHHB3xQQH6xH6xH6xH6xH6x")
assert _USER_REGS.size == 200
_VGC_TAIL = struct.Struct("<QQ16QQQQ8Q8QQQQQQQQ")  # ldt..gs_base_user
VCPU_CONTEXT_SIZE = 512 + 8 + 200 + 256 * 16 + _VGC_TAIL.size
assert VCPU_CONTEXT_SIZE == 5168  # sizeof(vcpu_guest_context_x86_64_t)
_TRAP_INFO = struct.Struct("<BBHxxxxQ")

VGCF_i387_valid = 1 << 0
VGCF_in_kernel = 1 << 2
VGCF_failsafe_disables_events = 1 << 3
VGCF_syscall_disables_events = 1 << 4
VGCF_online = 1 << 5


@dataclass
class VcpuContext:
    """``struct vcpu_guest_context`` for a 64-bit guest (arch-x86/xen.h)."""

    fpu: bytes = b"\0" * 512
    flags: int = 0
    regs: dict[str, int] = field(default_factory=dict)  # USER_REGS + rip rflags rsp, error_code...
    trap_ctxt: list[tuple[int, int, int, int]] = field(default_factory=list)  # vector, flags, cs, address
    ldt_base: int = 0
    ldt_ents: int = 0
    gdt_frames: list[int] = field(default_factory=lambda: [0] * 16)
    gdt_ents: int = 0
    kernel_ss: int = 0
    kernel_sp: int = 0
    ctrlreg: list[int] = field(default_factory=lambda: [0] * 8)
    debugreg: list[int] = field(default_factory=lambda: [0] * 8)
    event_callback_eip: int = 0
    failsafe_callback_eip: int = 0
    syscall_callback_eip: int = 0
    vm_assist: int = 0
    fs_base: int = 0
    gs_base_kernel: int = 0
    gs_base_user: int = 0

    def pack(self) -> bytes:
        if len(self.fpu) != 512:
            raise ValueError("fpu context must be 512 bytes")
        r = self.regs
        regs = _USER_REGS.pack(*(r.get(n, 0) for n in USER_REGS), r.get("error_code", 0),
                               r.get("entry_vector", 0), r.get("rip", 0), r.get("cs", 0), 0,
                               r.get("saved_upcall_mask", 0), r.get("rflags", 0), r.get("rsp", 0),
                               r.get("ss", 0), r.get("es", 0), r.get("ds", 0), r.get("fs", 0),
                               r.get("gs", 0))
        traps = bytearray(256 * 16)
        for vec, fl, cs, addr in self.trap_ctxt:
            _TRAP_INFO.pack_into(traps, (vec & 0xFF) * 16, vec, fl, cs, addr)
        tail = _VGC_TAIL.pack(self.ldt_base, self.ldt_ents, *self.gdt_frames, self.gdt_ents,
                              self.kernel_ss, self.kernel_sp, *self.ctrlreg, *self.debugreg,
                              self.event_callback_eip, self.failsafe_callback_eip,
                              self.syscall_callback_eip, self.vm_assist, self.fs_base,
                              self.gs_base_kernel, self.gs_base_user)
        return self.fpu + struct.pack("<Q", self.flags) + regs + bytes(traps) + tail

    @classmethod
    def unpack(cls, b: bytes) -> VcpuContext:
        if len(b) != VCPU_CONTEXT_SIZE:
            raise StreamError(f"vCPU context of {len(b)} bytes, expected {VCPU_CONTEXT_SIZE}")
        (flags,) = struct.unpack_from("<Q", b, 512)
        v = _USER_REGS.unpack_from(b, 520)
        regs = dict(zip(USER_REGS, v[:15], strict=True))
        regs.update(error_code=v[15], entry_vector=v[16], rip=v[17], cs=v[18], saved_upcall_mask=v[20],
                    rflags=v[21], rsp=v[22], ss=v[23], es=v[24], ds=v[25], fs=v[26], gs=v[27])
        # (one iter_unpack, not 256 unpack_from calls: this runs in a migration's downtime)
        traps = [t for t in _TRAP_INFO.iter_unpack(memoryview(b)[720:720 + 4096]) if t[3] or t[2] or t[1]]
        t = _VGC_TAIL.unpack_from(b, 720 + 4096)
        return cls(fpu=b[:512], flags=flags, regs=regs, trap_ctxt=traps, ldt_base=t[0], ldt_ents=t[1],
                   gdt_frames=list(t[2:18]), gdt_ents=t[18], kernel_ss=t[19], kernel_sp=t[20],
                   ctrlreg=list(t[21:29]), debugreg=list(t[29:37]), event_callback_eip=t[37],
                   failsafe_callback_eip=t[38], syscall_callback_eip=t[39], vm_assist=t[40],
                   fs_base=t[41], gs_base_kernel=t[42], gs_base_user=t[43])


@dataclass
class ExtVcpuContext:
    """The head of ``struct xen_domctl_ext_vcpucontext`` (x86): the 32-bit
    syscall and sysenter callbacks, and mcg_cap. Xen's record is at most 128 bytes."""

    syscall32_callback_eip: int = 0
    sysenter_callback_eip: int = 0
    syscall32_callback_cs: int = 0
    sysenter_callback_cs: int = 0
    syscall32_disables_events: int = 0
    sysenter_disables_events: int = 0
    mcg_cap: int = 0
    vcpu: int = 0

    _S = struct.Struct("<IIQQHHBB2xQ24x")  # vcpu, size, ..., union { mcg_cap; hvm_vmce_vcpu (32) }

    def pack(self) -> bytes:
        return self._S.pack(self.vcpu, self._S.size, self.syscall32_callback_eip,
                            self.sysenter_callback_eip, self.syscall32_callback_cs,
                            self.sysenter_callback_cs, self.syscall32_disables_events,
                            self.sysenter_disables_events, self.mcg_cap)

    @classmethod
    def unpack(cls, b: bytes) -> ExtVcpuContext:
        b = b[:cls._S.size].ljust(cls._S.size, b"\0")
        vcpu, _size, s32, se, s32cs, secs, s32d, sed, mcg = cls._S.unpack(b)
        return cls(s32, se, s32cs, secs, s32d, sed, mcg, vcpu)


def unpack_msrs(blob: bytes) -> list[tuple[int, int]]:
    """X86_PV_VCPU_MSRS: xen_domctl_vcpu_msr_t {u32 index, u32 reserved, u64 value}."""
    return [(i, v) for i, _r, v in struct.iter_unpack("<IIQ", blob)]


def pack_msrs(msrs: list[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack("<IIQ", i, 0, v) for i, v in msrs)


# ------------------------------------------------------------------ page tables
PTE_PRESENT = 1 << 0
PTE_PSE = 1 << 7
PTE_FRAME_MASK = 0x000FFFFFFFFFF000
# Xen's own L4 slots in a 64-bit guest's L4 (HYPERVISOR_VIRT_START..END): cleared
# on save, rebuilt by the restoring hypervisor.
XEN_L4_FIRST, XEN_L4_LAST = 256, 271


def normalise_pagetable(page: bytes, level: int, mfn_to_pfn: Callable[[int], int | None]) -> bytes:
    """Machine frames → pfns in one page-table page, as xg_sr_save_x86_pv.c:
    Xen's L4 slots zeroed, superpages refused, a frame the domain does not
    own is an error."""
    ptes = list(struct.unpack("<512Q", page))
    for i, pte in enumerate(ptes):
        if level == 4 and XEN_L4_FIRST <= i <= XEN_L4_LAST:
            ptes[i] = 0
            continue
        if not pte & PTE_PRESENT:
            continue
        if level > 1 and pte & PTE_PSE:
            raise StreamError(f"cannot migrate superpage (L{level}[{i}]: {pte:#018x})")
        pfn = mfn_to_pfn((pte & PTE_FRAME_MASK) >> PAGE_SHIFT)
        if pfn is None:
            raise StreamError(f"bad mfn for L{level}[{i}] - pte {pte:#018x}")
        ptes[i] = (pte & ~PTE_FRAME_MASK) | (pfn << PAGE_SHIFT)
    return struct.pack("<512Q", *ptes)


def localise_pagetable(page: bytes, level: int, pfn_to_mfn: Callable[[int], int | None]) -> bytes:
    """Pfns → machine frames in a page-table page from a stream. A pfn the
    domain does not have is an error naming the entry (the page is then
    validated again by the MMU when it is pinned or used)."""
    ptes = list(struct.unpack("<512Q", page))
    for i, pte in enumerate(ptes):
        if level == 4 and XEN_L4_FIRST <= i <= XEN_L4_LAST:
            ptes[i] = 0
            continue
        if not pte & PTE_PRESENT:
            continue
        if level > 1 and pte & PTE_PSE:
            raise StreamError(f"superpage in stream (L{level}[{i}]: {pte:#018x})")
        pfn = (pte & PTE_FRAME_MASK) >> PAGE_SHIFT
        mfn = pfn_to_mfn(pfn)
        if mfn is None:
            raise StreamError(f"L{level}[{i}] maps pfn {pfn:#x}, which the domain does not have "
                              f"(pte {pte:#018x})")
        ptes[i] = (pte & ~PTE_FRAME_MASK) | (mfn << PAGE_SHIFT)
    return struct.pack("<512Q", *ptes)


# ------------------------------------------------------------------ xl header
@dataclass
class XlHeader:
    mandatory_flags: int = XL_MANDATORY_FLAG_STREAMv2
    optional_flags: int = 0
    config: bytes = b""  # xl: the domain config (JSON if XL_MANDATORY_FLAG_JSON), NUL-terminated

    def pack(self) -> bytes:
        opt = struct.pack("<I", len(self.config)) + self.config
        return _XL_HDR.pack(XL_MAGIC, XL_BYTEORDER, self.mandatory_flags, self.optional_flags,
                            len(opt)) + opt

    @classmethod
    def read(cls, r: Reader) -> XlHeader:
        magic, order, mand, opt, optlen = _XL_HDR.unpack(r.read(_XL_HDR.size, "xl save-file header"))
        if magic != XL_MAGIC:
            raise StreamError("not an xl save file (bad magic)")
        if order != XL_BYTEORDER:
            raise StreamError(f"xl save file of another byte order ({order:#010x})")
        if mand & ~XL_MANDATORY_FLAG_ALL:
            raise StreamError(f"xl save file needs features this restore lacks "
                              f"(mandatory flags {mand:#x})")
        if not mand & XL_MANDATORY_FLAG_STREAMv2:
            raise StreamError("legacy (v1) xl save file: only stream v2 is supported")
        if optlen > XL_OPTDATA_MAX:
            raise StreamError(f"xl optional data of {optlen} bytes (max {XL_OPTDATA_MAX})")
        optdata = r.read(optlen, "xl optional data")
        config = b""
        if len(optdata) >= 4:
            (clen,) = struct.unpack_from("<I", optdata)
            if clen > len(optdata) - 4:
                raise StreamError(f"xl config length {clen} exceeds the optional data ({optlen - 4})")
            config = optdata[4:4 + clen]
        return cls(mand, opt, config)

    def config_json(self) -> Any:
        """The config as xl writes it (JSON, NUL-terminated), or None."""
        if not self.mandatory_flags & XL_MANDATORY_FLAG_JSON or not self.config:
            return None
        try:
            return json.loads(self.config.rstrip(b"\0").decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StreamError(f"xl config is not JSON: {e}") from None


# ------------------------------------------------------------------ reading
class Reader:
    """Reads exactly what is asked from a binary file, counting the offset for errors."""

    def __init__(self, f: IO[bytes], name: str = "stream") -> None:
        self.f, self.name, self.offset = f, name, 0

    def read(self, n: int, what: str) -> bytes:
        chunks, got = [], 0
        while got < n:
            b = self.f.read(n - got)
            if not b:
                raise StreamError(f"{self.name}: truncated at offset {self.offset + got:#x}: "
                                  f"{what} needs {n} bytes, {got} left")
            chunks.append(b)
            got += len(b)
        self.offset += n
        return b"".join(chunks)

    def peek(self, n: int) -> bytes:
        """The next n bytes without consuming them (file must be seekable or buffered)."""
        peek = getattr(self.f, "peek", None)
        if peek is not None:
            return bytes(peek(n)[:n])
        pos = self.f.tell()
        b = self.f.read(n)
        self.f.seek(pos)
        return b

    def record(self, what: str = "record") -> tuple[int, bytes, int]:
        """(type, body, offset of the header) of the next record, padding checked for length."""
        off = self.offset
        rtype, length = _RHDR.unpack(self.read(_RHDR.size, f"{what} header"))
        if length > REC_LENGTH_MAX:
            raise StreamError(f"{self.name}: offset {off:#x}: {_rec_name(rtype)} length {length} "
                              f"exceeds the maximum {REC_LENGTH_MAX}")
        body = self.read(length, f"{_rec_name(rtype)} body")
        self.read(-length % REC_ALIGN, f"{_rec_name(rtype)} padding")  # ignored, as the spec says
        return rtype, body, off


def read_libxl_header(r: Reader) -> int:
    ident, version, options = _LIBXL_HDR.unpack(r.read(_LIBXL_HDR.size, "libxl header"))
    if ident != LIBXL_IDENT:
        raise StreamError(f"{r.name}: not a libxl stream (ident {ident:#018x})")
    if version != LIBXL_VERSION:
        raise StreamError(f"{r.name}: libxl stream version {version} (only {LIBXL_VERSION} is supported)")
    if options & LIBXL_OPT_BIG_ENDIAN:
        raise StreamError(f"{r.name}: big-endian libxl stream")
    if options & LIBXL_OPT_LEGACY:
        raise StreamError(f"{r.name}: a stream converted from the legacy format is not supported")
    return options


def pack_libxl_header() -> bytes:
    return _LIBXL_HDR.pack(LIBXL_IDENT, LIBXL_VERSION, 0)


@dataclass
class Item:
    """One thing :func:`iter_stream` found: where, which layer, what."""

    offset: int
    layer: str  # "xl", "libxl", "libxc"
    kind: str  # header or record name
    rtype: int | None = None
    body: bytes = b""
    value: Any = None  # the decoded header or record


def _decode_libxc(rtype: int, body: bytes, decode_pages: bool = True) -> Any:
    if rtype == Rec.PAGE_DATA:
        return PageData.unpack(body) if decode_pages else None
    if rtype == Rec.X86_PV_INFO:
        return PvInfo.unpack(body)
    if rtype == Rec.X86_PV_P2M_FRAMES:
        return P2mFrames.unpack(body)
    if rtype in (Rec.X86_PV_VCPU_BASIC, Rec.X86_PV_VCPU_EXTENDED, Rec.X86_PV_VCPU_XSAVE,
                 Rec.X86_PV_VCPU_MSRS):
        return VcpuBlob.unpack(rtype, body)
    if rtype == Rec.X86_TSC_INFO:
        return TscInfo.unpack(body)
    if rtype == Rec.SHARED_INFO:
        if len(body) != PAGE_SIZE:
            raise StreamError(f"SHARED_INFO record wrong size: length {len(body)}, expected {PAGE_SIZE}")
        return body
    if rtype in (Rec.END, Rec.STATIC_DATA_END, Rec.CHECKPOINT, Rec.VERIFY):
        if body:
            raise StreamError(f"{_rec_name(rtype)} record has a body of {len(body)} bytes (must be empty)")
        return None
    if rtype == Rec.PYXEN_DOMAIN_STATE:
        try:
            return json.loads(body.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StreamError(f"PYXEN_DOMAIN_STATE is not JSON: {e}") from None
    if rtype == Rec.PYXEN_ROUND_END:
        if len(body) != 8:
            raise StreamError(f"PYXEN_ROUND_END record of {len(body)} bytes (must be 8)")
        return struct.unpack("<II", body)[0]
    if rtype & REC_TYPE_OPTIONAL:
        return None  # optional and unknown: skipped, as the spec allows
    if rtype in (Rec.HVM_CONTEXT, Rec.HVM_PARAMS):
        raise StreamError(f"{_rec_name(rtype)} record in a PV stream")
    if rtype in {int(r) for r in Rec}:
        return None  # known, not decoded here (policies, dirty pfn lists)
    raise StreamError(f"unrecognised mandatory record type {rtype:#x}")


def iter_libxc(r: Reader, decode_pages: bool = True) -> Iterator[Item]:
    """The libxc layer: image header, domain header, records through END."""
    off = r.offset
    ih = ImageHeader.unpack(r.read(_IHDR.size, "image header"))
    yield Item(off, "libxc", "image header", value=ih)
    off = r.offset
    yield Item(off, "libxc", "domain header", value=DomainHeader.unpack(r.read(_DHDR.size, "domain header")))
    while True:
        rtype, body, off = r.record("libxc record")
        try:
            value = _decode_libxc(rtype, body, decode_pages)
        except StreamError as e:
            raise StreamError(f"{r.name}: offset {off:#x}: {e}") from None
        yield Item(off, "libxc", _rec_name(rtype), rtype, body, value)
        if rtype in (Rec.END, Rec.CHECKPOINT):
            return


def iter_stream(f: IO[bytes], name: str = "stream", decode_pages: bool = True) -> Iterator[Item]:
    """Everything in a save file or migration stream, whichever layer it starts at
    (xl save file, libxl stream, or a bare libxc image).  ``decode_pages=False``:
    PAGE_DATA items carry their body only (a restore parses it itself, without
    splitting it into pages)."""
    r = Reader(f, name)
    head = r.peek(8)
    if head.startswith(XL_MAGIC[:8]):
        off = r.offset
        yield Item(off, "xl", "xl header", value=XlHeader.read(r))
        head = r.peek(8)
    if len(head) == 8 and struct.unpack(">Q", head)[0] == IHDR_MARKER:
        yield from iter_libxc(r, decode_pages)
        return
    off = r.offset
    opts = read_libxl_header(r)
    yield Item(off, "libxl", "libxl header", value=opts)
    while True:
        rtype, body, off = r.record("libxl record")
        try:
            kind = LibxlRec(rtype).name
        except ValueError:
            if not rtype & REC_TYPE_OPTIONAL:
                raise StreamError(f"{name}: offset {off:#x}: unrecognised mandatory libxl record "
                                  f"type {rtype:#x}") from None
            kind = f"optional libxl record {rtype:#x}"
        if rtype in (LibxlRec.END, LibxlRec.LIBXC_CONTEXT, LibxlRec.CHECKPOINT_END) and body:
            raise StreamError(f"{name}: offset {off:#x}: {kind} record has a body of {len(body)} bytes")
        yield Item(off, "libxl", kind, rtype, body)
        if rtype == LibxlRec.LIBXC_CONTEXT:
            yield from iter_libxc(r, decode_pages)
        elif rtype == LibxlRec.END:
            return


# ------------------------------------------------------------------ dump
def _page_summary(run: list[PageData]) -> str:
    types: Counter[str] = Counter()
    lo, hi, n = None, None, 0
    for pd in run:
        for pfn, t in pd.pfns:
            types[t.name] += 1
            lo = pfn if lo is None else min(lo, pfn)
            hi = pfn if hi is None else max(hi, pfn)
            n += 1
    tstr = ", ".join(f"{k} {v}" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))
    return f"{len(run)} record(s), {n} pfns {lo:#x}-{hi:#x} ({tstr})"


def describe(item: Item) -> str:
    """One line about an item, for ``pyxen stream dump``."""
    v = item.value
    if isinstance(v, XlHeader):
        cfg = v.config_json() if v.mandatory_flags & XL_MANDATORY_FLAG_JSON else None
        name = cfg.get("c_info", {}).get("name") if isinstance(cfg, dict) else None
        return (f"mandatory {v.mandatory_flags:#x} optional {v.optional_flags:#x}, config "
                f"{len(v.config)} bytes" + (f" (name {name!r})" if name else ""))
    if isinstance(v, ImageHeader):
        return f"version {v.version}, options {v.options:#x}"
    if isinstance(v, DomainHeader):
        return f"type x86 PV, page_shift {v.page_shift}, saved on Xen {v.xen_major}.{v.xen_minor}"
    if isinstance(v, PvInfo):
        return f"guest_width {v.guest_width}, pt_levels {v.pt_levels}"
    if isinstance(v, P2mFrames):
        return f"pfns {v.start_pfn:#x}-{v.end_pfn:#x} in {len(v.pfns)} frames"
    if isinstance(v, TscInfo):
        return f"mode {v.mode}, {v.khz} kHz, nsec {v.nsec}, incarnation {v.incarnation}"
    if isinstance(v, VcpuBlob):
        if not v.context:
            return f"vcpu {v.vcpu_id}: empty (skipped)"
        extra = ""
        if item.rtype == Rec.X86_PV_VCPU_BASIC:
            c = VcpuContext.unpack(v.context)
            extra = (f": rip {c.regs['rip']:#x} rsp {c.regs['rsp']:#x} cr3 {c.ctrlreg[3]:#x} "
                     f"flags {c.flags:#x}{' kernel' if c.flags & VGCF_in_kernel else ' user'}")
        elif item.rtype == Rec.X86_PV_VCPU_MSRS:
            extra = ": " + ", ".join(f"{i:#x}={val:#x}" for i, val in unpack_msrs(v.context))
        return f"vcpu {v.vcpu_id}, {len(v.context)} bytes{extra}"
    if item.rtype == Rec.PYXEN_DOMAIN_STATE and isinstance(v, dict):
        return "keys: " + ", ".join(sorted(v))
    if item.rtype == Rec.PYXEN_ROUND_END and isinstance(v, int):
        return f"end of live round {v}"
    return f"{len(item.body)} bytes" if item.body else ""


def dump(f: IO[bytes], out: IO[str], name: str = "stream", verbose: bool = False) -> int:
    """Print every header and record; runs of PAGE_DATA collapse to one line
    unless verbose. Returns the number of items."""
    n = 0
    run: list[PageData] = []
    run_off = 0

    def flush() -> None:
        if run:
            print(f"{run_off:#010x} libxc PAGE_DATA x {_page_summary(run)}", file=out)
            run.clear()

    for item in iter_stream(f, name):
        n += 1
        if isinstance(item.value, PageData) and not verbose:
            if not run:
                run_off = item.offset
            run.append(item.value)
            continue
        flush()
        if isinstance(item.value, PageData):
            print(f"{item.offset:#010x} {item.layer} PAGE_DATA {_page_summary([item.value])}", file=out)
            continue
        print(f"{item.offset:#010x} {item.layer} {item.kind} {describe(item)}".rstrip(), file=out)
    flush()
    return n


def dump_bytes(b: bytes, verbose: bool = False) -> str:
    """dump() of an in-memory stream, as text (tests, the REPL)."""
    out = io.StringIO()
    dump(io.BytesIO(b), out, verbose=verbose)
    return out.getvalue()
