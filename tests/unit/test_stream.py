"""Xen's migration stream (pyxen/migration/stream.py): layouts as Xen's
specs give them, and every malformed input a clear StreamError."""

from __future__ import annotations

import io
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.migration import stream as s


def _ctx() -> s.VcpuContext:
    return s.VcpuContext(
        fpu=bytes(range(256)) * 2, flags=s.VGCF_in_kernel | s.VGCF_online,
        regs={"rip": 0xFFFFFFFF81000000, "rsp": 0x7000, "rax": 1, "r15": 15, "rdx": 0x33,
              "cs": 0xE033, "ss": 0xE02B, "rflags": 0x202, "saved_upcall_mask": 1},
        trap_ctxt=[(14, 0, 0xE033, 0xFFFFFFFF81001000), (128, 3, 0xE033, 0xFFFFFFFF81002000)],
        gdt_frames=[0x40] + [0] * 15, gdt_ents=16, kernel_ss=0xE02B, kernel_sp=0x8000,
        ctrlreg=[0x80050033, 0, 0, 0x5000, 0x6F0, 0, 0, 0], debugreg=[0] * 6 + [0xFFFF0FF0, 0x400],
        event_callback_eip=0x1111, failsafe_callback_eip=0x2222, syscall_callback_eip=0x3333,
        vm_assist=0x24, fs_base=0x1000, gs_base_kernel=0xFFFF888000000000, gs_base_user=0x2000)


def _stream(page_records: list[bytes] | None = None, *, xl: bool = True) -> bytes:
    body = s.pack_libxl_header() + s.encode_record(s.LibxlRec.LIBXC_CONTEXT, b"")
    body += s.ImageHeader().pack() + s.DomainHeader().pack()
    body += s.encode_record(s.Rec.X86_PV_INFO, s.PvInfo().pack())
    body += s.encode_record(s.Rec.STATIC_DATA_END, b"")
    body += s.encode_record(s.Rec.X86_PV_P2M_FRAMES, s.P2mFrames(0, 1023, [7, 8]).pack())
    for rec in page_records or [s.PageData([(0, s.PageType.NOTAB), (1, s.PageType.L1TAB)],
                                           [b"\x11" * 4096, b"\0" * 4096]).pack()]:
        body += s.encode_record(s.Rec.PAGE_DATA, rec)
    body += s.encode_record(s.Rec.X86_TSC_INFO, s.TscInfo(0, 2_000_000, 123, 1).pack())
    body += s.encode_record(s.Rec.SHARED_INFO, b"\0" * 4096)
    body += s.encode_record(s.Rec.X86_PV_VCPU_BASIC, s.VcpuBlob(0, _ctx().pack()).pack())
    body += s.encode_record(s.Rec.X86_PV_VCPU_EXTENDED, s.VcpuBlob(0, s.ExtVcpuContext().pack()).pack())
    body += s.encode_record(s.Rec.X86_PV_VCPU_MSRS, s.VcpuBlob(0, s.pack_msrs([(0xC0000103, 5)])).pack())
    body += s.encode_record(s.Rec.PYXEN_DOMAIN_STATE, b'{"evtchn": []}')
    body += s.encode_record(s.Rec.END, b"") + s.encode_record(s.LibxlRec.END, b"")
    if xl:
        body = s.XlHeader(s.XL_MANDATORY_FLAG_ALL, 0, b'{"c_info": {"name": "vm1"}}\0').pack() + body
    return body


def test_sizes_match_xen() -> None:
    assert s.VCPU_CONTEXT_SIZE == 5168  # sizeof(vcpu_guest_context_x86_64_t)
    assert len(s.ImageHeader().pack()) == 24 and len(s.DomainHeader().pack()) == 16
    assert len(s.ExtVcpuContext().pack()) == 64  # xen_domctl_ext_vcpucontext on x86_64
    assert len(s.TscInfo().pack()) == 24


def test_image_header_bytes() -> None:
    # marker, "XENF", version 3: big-endian whatever the options say (libxc spec)
    assert s.ImageHeader().pack() == b"\xff" * 8 + b"XENF" + b"\0\0\0\x03" + b"\0" * 8
    assert s.pack_libxl_header() == b"LibxlFmt" + b"\0\0\0\x02" + b"\0" * 4


def test_record_padding() -> None:
    r = s.encode_record(0x80000005, b"abc")
    assert r == struct.pack("<II", 0x80000005, 3) + b"abc" + b"\0" * 5
    assert len(s.encode_record(1, b"x" * 8)) == 16


def test_page_data_word_layout() -> None:
    b = s.PageData([(0x12345, s.PageType.L2TAB_PIN)], [b"\0" * 4096]).pack()
    (w,) = struct.unpack_from("<Q", b, 8)
    assert w == (0xA << 60) | 0x12345  # type in bits 63-60, pfn in 51-0


def test_vcpu_context_roundtrip() -> None:
    c = _ctx()
    b = c.pack()
    c2 = s.VcpuContext.unpack(b)
    assert c2.pack() == b
    assert c2.regs["rip"] == 0xFFFFFFFF81000000 and c2.regs["cs"] == 0xE033
    assert c2.ctrlreg[3] == 0x5000 and c2.gs_base_kernel == 0xFFFF888000000000
    # user_regs start after fpu (512) and flags (8); rip is at +128 in cpu_user_regs
    assert struct.unpack_from("<Q", b, 520 + 128)[0] == 0xFFFFFFFF81000000
    # trap_ctxt[14] at 720 + 14 * 16
    assert struct.unpack_from("<BBHxxxxQ", b, 720 + 14 * 16) == (14, 0, 0xE033, 0xFFFFFFFF81001000)
    # syscall_callback_eip is the third of the three callbacks after debugreg[8]
    assert struct.unpack_from("<Q", b, 5168 - 8 * 5)[0] == 0x3333


def test_whole_stream_roundtrip_and_dump() -> None:
    items = list(s.iter_stream(io.BytesIO(_stream())))
    kinds = [i.kind for i in items]
    assert kinds[:4] == ["xl header", "libxl header", "LIBXC_CONTEXT", "image header"]
    assert kinds[-2:] == ["END", "END"] and "X86_PV_VCPU_BASIC" in kinds
    basic = next(i for i in items if i.kind == "X86_PV_VCPU_BASIC")
    assert s.VcpuContext.unpack(basic.value.context).regs["rsp"] == 0x7000
    text = s.dump_bytes(_stream())
    assert "name 'vm1'" in text and "PAGE_DATA x 1 record(s), 2 pfns 0x0-0x1 (NOTAB 1, L1TAB 1)" in text
    assert "rip 0xffffffff81000000" in text and "0xc0000103=0x5" in text
    # a bare libxl stream and a bare libxc image are read too
    assert [i.kind for i in s.iter_stream(io.BytesIO(_stream(xl=False)))][0] == "libxl header"


@pytest.mark.parametrize("body,msg", [
    (b"\0" * 4, "PAGE_DATA record truncated"),
    (struct.pack("<II", 0, 0), "at least 1 pfn"),
    (struct.pack("<II", 3, 0) + b"\0" * 8, "too short to contain 3 pfns"),
    (struct.pack("<IIQ", 1, 0, 5 << 60), "unknown type 0x5 for pfn 0x0"),
    (struct.pack("<IIQ", 1, 0, 0), r"wrong size: length 16, expected 8 \+ 8 \+ 4096"),
    (struct.pack("<IIQ", 1, 0, 0xF << 60) + b"\0" * 4096, "wrong size"),  # XTAB has no data
])
def test_page_data_rejects(body: bytes, msg: str) -> None:
    with pytest.raises(s.StreamError, match=msg):
        s.PageData.unpack(body)


def test_page_data_pfn_bound() -> None:
    body = s.PageData([(0x1000, s.PageType.XTAB)], []).pack()
    assert s.PageData.unpack(body, max_pfn=0x1000).pfns == [(0x1000, s.PageType.XTAB)]
    with pytest.raises(s.StreamError, match="outside domain maximum"):
        s.PageData.unpack(body, max_pfn=0xFFF)


@pytest.mark.parametrize("rtype,blob,msg", [
    (s.Rec.X86_PV_VCPU_BASIC, b"\0" * 100, "wrong size: expected 5176, got 108"),
    (s.Rec.X86_PV_VCPU_EXTENDED, b"\0" * 129, "too long"),
    (s.Rec.X86_PV_VCPU_XSAVE, b"\0" * 8, "too short"),
    (s.Rec.X86_PV_VCPU_MSRS, b"\0" * 24, "multiple of 16"),
])
def test_vcpu_blob_rejects(rtype: int, blob: bytes, msg: str) -> None:
    with pytest.raises(s.StreamError, match=msg):
        s.VcpuBlob.unpack(rtype, s.VcpuBlob(0, blob).pack())


def test_vcpu_blob_bounds_and_empty() -> None:
    assert s.VcpuBlob.unpack(s.Rec.X86_PV_VCPU_MSRS, struct.pack("<II", 9, 0)).context == b""
    with pytest.raises(s.StreamError, match=r"vcpu_id \(4\) exceeds domain max \(3\)"):
        s.VcpuBlob.unpack(s.Rec.X86_PV_VCPU_MSRS, s.VcpuBlob(4, b"\0" * 16).pack(), max_vcpus=4)


def test_headers_reject() -> None:
    with pytest.raises(s.StreamError, match="marker"):
        s.ImageHeader.unpack(b"\0" * 24)
    with pytest.raises(s.StreamError, match="version 4"):
        s.ImageHeader.unpack(b"\xff" * 8 + b"XENF" + struct.pack(">IHHI", 4, 0, 0, 0))
    with pytest.raises(s.StreamError, match="big-endian"):
        s.ImageHeader.unpack(b"\xff" * 8 + b"XENF" + struct.pack(">IHHI", 3, 1, 0, 0))
    with pytest.raises(s.StreamError, match="HVM"):
        s.DomainHeader.unpack(s.DomainHeader(type=2).pack())
    with pytest.raises(s.StreamError, match="32-bit"):
        s.PvInfo.unpack(s.PvInfo(4, 3).pack())
    with pytest.raises(s.StreamError, match="combination"):
        s.PvInfo.unpack(s.PvInfo(8, 3).pack())
    with pytest.raises(s.StreamError, match="exceeds start"):
        s.P2mFrames.unpack(struct.pack("<II", 5, 4))


def test_unknown_records() -> None:
    base = _stream(xl=False)
    end = s.encode_record(s.Rec.END, b"") + s.encode_record(s.LibxlRec.END, b"")
    assert base.endswith(end)
    head = base[:-len(end)]
    optional = head + s.encode_record(0x80001234, b"whatever") + end
    assert any(i.kind.startswith("optional") for i in s.iter_stream(io.BytesIO(optional)))
    mandatory = head + s.encode_record(0x77, b"") + end
    with pytest.raises(s.StreamError, match="unrecognised mandatory record type 0x77"):
        list(s.iter_stream(io.BytesIO(mandatory)))
    huge = head + struct.pack("<II", 1, (128 << 20) + 1)
    with pytest.raises(s.StreamError, match="exceeds the maximum"):
        list(s.iter_stream(io.BytesIO(huge)))


def test_every_truncation_is_a_clear_error() -> None:
    full = _stream()
    for cut in range(0, len(full) - 1, 97):
        with pytest.raises(s.StreamError, match="truncated|not an xl|not a libxl|marker"):
            list(s.iter_stream(io.BytesIO(full[:cut]), "f"))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutations_raise_only_stream_errors(data: st.DataObject) -> None:
    """Any byte changed, anywhere: either a stream we can read or a StreamError."""
    b = bytearray(_stream())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    try:
        list(s.iter_stream(io.BytesIO(bytes(b))))
    except s.StreamError:
        pass


def test_normalise_and_localise_pagetables() -> None:
    MFN_BASE = 0x100000
    ptes = [0] * 512
    ptes[0] = ((MFN_BASE + 5) << 12) | 0x67  # present, user, rw, accessed, dirty
    ptes[1] = (0x123 << 12) | 0x2  # not present: left alone
    ptes[256] = ((MFN_BASE + 9) << 12) | 0x63  # Xen's slot in an L4: cleared
    page = struct.pack("<512Q", *ptes)

    def m2p(m: int) -> int | None:
        return m - MFN_BASE if MFN_BASE <= m < MFN_BASE + 64 else None

    def p2m(p: int) -> int | None:
        return p + MFN_BASE if 0 <= p < 64 else None

    norm = struct.unpack("<512Q", s.normalise_pagetable(page, 4, m2p))
    assert norm[0] == (5 << 12) | 0x67 and norm[1] == ptes[1] and norm[256] == 0
    back = struct.unpack("<512Q", s.localise_pagetable(struct.pack("<512Q", *norm), 4, p2m))
    assert back[0] == ptes[0]
    with pytest.raises(s.StreamError, match=r"bad mfn for L1\[0\]"):
        s.normalise_pagetable(struct.pack("<512Q", (7 << 12) | 1, *[0] * 511), 1, m2p)
    with pytest.raises(s.StreamError, match="superpage"):
        s.normalise_pagetable(struct.pack("<512Q", ((MFN_BASE + 1) << 12) | 0x81, *[0] * 511), 2, m2p)
    with pytest.raises(s.StreamError, match=r"L1\[3\] maps pfn 0x40, which the domain does not have"):
        s.localise_pagetable(struct.pack("<512Q", 0, 0, 0, (64 << 12) | 1, *[0] * 508), 1, p2m)


def test_xl_header() -> None:
    h = s.XlHeader(s.XL_MANDATORY_FLAG_ALL, 0, b'{"a": 1}\0')
    b = h.pack()
    assert b[:32] == b"Xen saved domain, xl format\n \0 \r"
    assert struct.unpack_from("<IIII", b, 32) == (0x01020304, 3, 0, 4 + 9)
    r = s.Reader(io.BytesIO(b))
    assert s.XlHeader.read(r).config_json() == {"a": 1}
    bad = bytearray(b)
    struct.pack_into("<I", bad, 36, 0x7)
    with pytest.raises(s.StreamError, match="mandatory flags 0x7"):
        s.XlHeader.read(s.Reader(io.BytesIO(bytes(bad))))


def test_cli_dump(tmp_path: object) -> None:
    import pathlib
    p = pathlib.Path(str(tmp_path)) / "vm.save"
    p.write_bytes(_stream())
    r = subprocess.run([sys.executable, "-m", "pyxen", "stream", "dump", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "libxc X86_PV_INFO guest_width 8, pt_levels 4" in r.stdout
    p.write_bytes(_stream()[:-20])
    r = subprocess.run([sys.executable, "-m", "pyxen", "stream", "dump", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"pyxen: {p}: truncated at offset")


def test_uniform_run_agrees_with_the_entry_by_entry_walk() -> None:
    """PageData.uniform_run is a fast path of unpack_header: whenever it
    answers, unpack_header gives the same pages; it declines (None) anything
    that is not one run of one type, and anything malformed."""
    import random
    PT, S = s.PageType, s.PageData
    rng = random.Random(7)

    def body(words: list[int], ndata: int) -> bytes:
        return struct.pack(f"<II{len(words)}Q", len(words), 0, *words) + bytes(4096 * ndata)

    def word(pfn: int, t: int) -> int:
        return (t << 60) | pfn

    ok = body([word(100 + i, PT.XALLOC) for i in range(1024)], 0)
    assert S.uniform_run(ok, 1 << 20) == (100, PT.XALLOC, 1024)
    data = body([word(7 + i, PT.NOTAB) for i in range(3)], 3)
    assert S.uniform_run(data, 1 << 20) == (7, PT.NOTAB, 3)
    assert S.uniform_run(body([word(9, PT.L1TAB)], 1), 1 << 20) == (9, PT.L1TAB, 1)
    declined = [
        body([word(100, PT.XALLOC), word(102, PT.XALLOC)], 0),        # a hole in the run
        body([word(100, PT.XALLOC), word(101, PT.NOTAB)], 1),         # two types
        body([word(101, PT.XALLOC), word(100, PT.XALLOC)], 0),        # backwards
        body([word((1 << 20) + 1, PT.XALLOC)], 0),                    # beyond max_pfn
        body([word(5 + i, PT.NOTAB) for i in range(4)], 3),           # a page short
        body([word(5, 0x5)], 0),                                      # unknown type
        body([word(s.PAGE_DATA_PFN_MASK, PT.XALLOC), word(0, 0xF)], 0),  # a carry into the type
        struct.pack("<II", 0, 0),                                     # no entries
        struct.pack("<IIQ", 2, 0, word(1, PT.XALLOC)),                # truncated
    ]
    for b in declined:
        assert S.uniform_run(b, 1 << 20) is None
    for _ in range(300):
        n = rng.randint(1, 40)
        start = rng.randint(0, 1 << 20)
        t = rng.choice([PT.NOTAB, PT.XALLOC, PT.L2TAB, PT.XTAB])
        words = [word(start + i, t) for i in range(n)]
        if rng.random() < 0.5:
            words[rng.randrange(n)] ^= 1 << rng.randrange(64)
        ndata = sum(1 for w in words if s._PAGE_TYPES.get(w >> 60, PT.XTAB).has_data)
        b = body(words, ndata)
        u = S.uniform_run(b, 1 << 21)
        if u is None:
            continue
        pfn, t0, count = u
        assert S.unpack_header(b, 1 << 21) == [(pfn + i, t0) for i in range(count)]
