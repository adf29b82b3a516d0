"""bzImage unpacking (pyxen/builder/bzimage.py): payloads built here, each format.

Each test compresses a small ELF the way the kernel's build does (the payload
followed by its uncompressed size as a little-endian u32), wraps it in a
minimal x86 boot-protocol setup header, and checks that the builder gets the
same ELF back, or a one-line ElfError naming the file for a broken image.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
from pathlib import Path

import pytest

from pyxen.builder import bzimage
from pyxen.builder.elf import ElfError

HELLO = Path(__file__).resolve().parents[2] / "guest" / "build" / "hello"


def _fake_elf(size: int = 200_000) -> bytes:
    """An ELF-looking blob: bzimage only checks the magic; the content is
    compressible but not trivially so (a pattern with a counter)."""
    body = b"".join(struct.pack("<I", i * 2654435761 & 0xFFFFFFFF) + b"pyxen" for i in range(size // 9))
    return b"\x7fELF\x02\x01\x01" + body


def _lz4_legacy(data: bytes, chunk: int = bzimage.LZ4_LEGACY_CHUNK, magic_again: bool = False) -> bytes:
    import lz4.block
    out = struct.pack("<I", bzimage.LZ4_LEGACY_MAGIC)
    for i in range(0, len(data), chunk):
        if magic_again and i:
            out += struct.pack("<I", bzimage.LZ4_LEGACY_MAGIC)
        blk = lz4.block.compress(data[i:i + chunk], store_size=False, mode="high_compression")
        out += struct.pack("<I", len(blk)) + blk
    return out


def _zstd(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor(level=19).compress(data)


COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d, 9, mtime=0),
    "bzip2": lambda d: bz2.compress(d, 9),
    "lzma": lambda d: lzma.compress(d, lzma.FORMAT_ALONE),
    # the kernel's xz: CRC32 check and the x86 BCJ filter before LZMA2
    "xz": lambda d: lzma.compress(d, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                                  filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}]),
    "lz4": _lz4_legacy,
    "zstd": _zstd,
}


def wrap(payload: bytes, size: int | None, setup_sects: int = 3, version: int = 0x020F,
         payload_offset: int = 0x1C0) -> bytes:
    """A minimal bzImage: boot sector + setup sectors with the header, then the
    protected-mode part with the payload at ``payload_offset``."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    tail = payload + (struct.pack("<I", size) if size is not None else b"")
    struct.pack_into("<II", setup, 0x248, payload_offset, len(tail))
    pm = bytearray(payload_offset) + tail + bytes(100)
    return bytes(setup) + bytes(pm)


@pytest.mark.parametrize("fmt", sorted(COMPRESSORS))
def test_each_format_unpacks(fmt: str) -> None:
    elf = _fake_elf()
    img = wrap(COMPRESSORS[fmt](elf), len(elf))
    out, got = bzimage.unpack_bzimage(img, "vmlinuz")
    assert got == fmt
    assert out == elf
    assert bzimage.kernel_elf(img) == elf


def test_lz4_several_chunks_and_repeated_magic() -> None:
    elf = _fake_elf(300_000)
    payload = _lz4_legacy(elf, chunk=64 << 10, magic_again=True)
    out, fmt = bzimage.unpack_bzimage(wrap(payload, len(elf)), "vmlinuz")
    assert (fmt, out) == ("lz4", elf)


def test_setup_sects_zero_means_four() -> None:
    elf = _fake_elf(1000)
    img = wrap(gzip.compress(elf), len(elf), setup_sects=4)
    img = img[:0x1F1] + b"\0" + img[0x1F2:]
    assert bzimage.unpack_bzimage(img)[0] == elf


def test_uncompressed_payload_is_returned() -> None:
    elf = _fake_elf(1000)
    assert bzimage.unpack_bzimage(wrap(elf, None))[0] == elf


def test_elf_passes_through() -> None:
    elf = _fake_elf(1000)
    assert bzimage.kernel_elf(elf) is elf
    assert not bzimage.is_bzimage(elf)


@pytest.mark.parametrize("img, msg", [
    (b"\0" * 0x300, "not a bzImage"),
    (wrap(gzip.compress(b"x"), 1, version=0x0207), "older than 2.08"),
    (wrap(b"\x89LZO" + bytes(20), 5), "lzo-compressed"),
    (wrap(b"QQQQQQ" + bytes(20), 5), "unknown compression format"),
    (wrap(gzip.compress(b"not an elf"), 10), "does not unpack to an ELF"),
])
def test_refusals(img: bytes, msg: str) -> None:
    with pytest.raises(ElfError, match=msg) as ei:
        bzimage.unpack_bzimage(img, "vmlinuz")
    assert str(ei.value).startswith("vmlinuz: ")


def test_payload_outside_the_file() -> None:
    img = bytearray(wrap(gzip.compress(_fake_elf(100)), 100))
    struct.pack_into("<I", img, 0x24C, 1 << 30)
    with pytest.raises(ElfError, match="outside the file"):
        bzimage.unpack_bzimage(bytes(img))


@pytest.mark.parametrize("fmt", sorted(COMPRESSORS))
def test_truncated_payload(fmt: str) -> None:
    elf = _fake_elf()
    comp = COMPRESSORS[fmt](elf)
    with pytest.raises(ElfError):
        bzimage.unpack_bzimage(wrap(comp[:len(comp) // 2], len(elf)), "vmlinuz")


@pytest.mark.parametrize("fmt", sorted(COMPRESSORS))
def test_output_cap(fmt: str) -> None:
    """A bomb costs at most the cap (libxenguest's XC_DOM_DECOMPRESS_MAX)."""
    elf = b"\x7fELF" + bytes(2 << 20)
    with pytest.raises(ElfError, match="more than"):
        bzimage.unpack_bzimage(wrap(COMPRESSORS[fmt](elf), len(elf)), "vmlinuz", limit=1 << 20)


def test_size_trailer_mismatch() -> None:
    elf = _fake_elf(1000)
    with pytest.raises(ElfError, match="size trailer"):
        bzimage.unpack_bzimage(wrap(gzip.compress(elf), len(elf) + 1))


def test_lz4_chunk_past_end() -> None:
    elf = _fake_elf(1000)
    payload = bytearray(_lz4_legacy(elf))
    struct.pack_into("<I", payload, 4, 1 << 20)
    with pytest.raises(ElfError, match="runs past the end"):
        bzimage.unpack_bzimage(wrap(bytes(payload), len(elf)))


def test_load_kernel_reads_a_bzimage_of_our_guest(tmp_path: Path) -> None:
    """End to end through the ELF parser: our own hello guest as a bzImage."""
    if not HELLO.exists():
        pytest.skip("guest/build/hello not built (make -C guest)")
    elf = HELLO.read_bytes()
    p = tmp_path / "vmlinuz-hello"
    p.write_bytes(wrap(COMPRESSORS["xz"](elf), len(elf)))
    k = bzimage.load_kernel(p)
    assert k.hypercall_page is not None and k.name == str(p)


def test_load_kernel_errors(tmp_path: Path) -> None:
    with pytest.raises(ElfError, match="not found"):
        bzimage.load_kernel(tmp_path / "missing")
    with pytest.raises(ElfError, match="directory"):
        bzimage.load_kernel(tmp_path)
