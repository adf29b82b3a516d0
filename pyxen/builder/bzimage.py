"""Unpack a Linux bzImage to the ELF ``vmlinux`` inside it, as Xen's builder does.

Distributions ship the kernel as a bzImage (``/boot/vmlinuz-*``): a real-mode
setup block, a decompressor stub, and the compressed ELF ``vmlinux`` as its
"payload".  ``xl`` takes such a file as ``kernel =`` because libxenguest's
bzImage loader (``tools/libs/guest/xg_dom_bzimageloader.c``) finds the payload
through the x86 boot protocol's setup header and decompresses it; the domain
builder then loads the ELF and its Xen notes.  This module does the same in
pure Python, with no KVM and no I/O, so that it is fast to test.

The setup header (Linux ``Documentation/arch/x86/boot.rst``):

* ``0x1f1`` ``setup_sects`` (u8): real-mode setup size in 512-byte sectors, not
  counting the boot sector; 0 means 4;
* ``0x202`` ``"HdrS"`` magic, ``0x206`` protocol ``version`` (u16);
* ``0x248`` ``payload_offset`` and ``0x24c`` ``payload_length`` (u32, protocol
  >= 2.08): where the compressed payload sits, relative to the start of the
  protected-mode code at ``(setup_sects + 1) * 512``.

The payload's format is told by its first bytes, as Xen checks them: gzip
``1f 8b``, bzip2 ``BZh``, lzma (the "alone" format) ``5d 00``, xz
``fd 37 7a 58 5a``, lzo ``89 4c 5a 4f`` (refused: no decoder here), lz4 in the
kernel's legacy framing ``02 21 4c 18``, zstd ``28 b5 2f fd``.  The kernel's
build appends the uncompressed size as a little-endian u32 after every
payload (``size_append``); lz4 needs it, the others use it as a sanity check.

Every input is untrusted: each problem is an :class:`ElfError` naming the
file, and output is capped at :data:`MAX_UNPACKED` (Xen's
``XC_DOM_DECOMPRESS_MAX``), so a decompression bomb costs at most that much.
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

from .elf import ElfError, XenKernel, parse_xen_kernel, read_kernel_file

__all__ = [
    "MAX_UNPACKED",
    "FORMATS",
    "is_bzimage",
    "kernel_elf",
    "load_kernel",
    "unpack_bzimage",
    "unpack_payload",
]

#: The most a payload may unpack to (libxenguest: ``XC_DOM_DECOMPRESS_MAX``, 1 GiB).
MAX_UNPACKED = 1 << 30

_HDR_MAGIC = b"HdrS"
_OFF_SETUP_SECTS = 0x1F1
_OFF_MAGIC = 0x202
_OFF_VERSION = 0x206
_OFF_PAYLOAD = 0x248
_MIN_VERSION = 0x0208  # payload_offset/payload_length appeared in 2.08
_HDR_END = 0x250

#: The kernel's legacy lz4 container (lib/decompress_unlz4.c, ``lz4 -l``).
LZ4_LEGACY_MAGIC = 0x184C2102
#: Each legacy lz4 chunk unpacks to at most this (LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE).
LZ4_LEGACY_CHUNK = 8 << 20

_ELF_MAGIC = b"\x7fELF"

#: (magic, name) in the order libxenguest tries them.
FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00", "lzma"),
    (b"\xfd7zXZ", "xz"),
    (b"\x89LZO", "lzo"),
    (struct.pack("<I", LZ4_LEGACY_MAGIC), "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def is_bzimage(data: bytes) -> bool:
    """Does ``data`` carry an x86 boot-protocol setup header?"""
    return len(data) >= _OFF_MAGIC + 4 and data[_OFF_MAGIC:_OFF_MAGIC + 4] == _HDR_MAGIC


def _size_hint(payload: bytes) -> int | None:
    """The kernel build's appended uncompressed size, if there is room for one."""
    if len(payload) < 8:
        return None
    return int.from_bytes(payload[-4:], "little")


def _drain(feed: Callable[[bytes, int], bytes], more: Callable[[], bool], data: bytes,
           limit: int, err: Callable[[str], ElfError], fmt: str) -> bytes:
    """Run a streaming decompressor with a hard output cap.

    ``feed(chunk, max_length)`` is the decompressor's ``decompress``;
    ``more()`` says whether it still holds output it has not returned.
    """
    out = bytearray()
    chunk = data
    while True:
        piece = feed(chunk, limit - len(out) + 1)
        out += piece
        if len(out) > limit:
            raise err(f"{fmt} payload unpacks to more than {limit} bytes")
        chunk = b""
        if not more() or not piece:
            return bytes(out)


def _gunzip(p: bytes, limit: int, err: Callable[[str], ElfError]) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip container, trailing bytes ignored
    out = bytearray()
    chunk = p
    try:
        # zlib hands back the input it did not get to (unconsumed_tail) when
        # max_length stops it: feed that again until the stream ends.
        while chunk and not d.eof:
            out += d.decompress(chunk, limit - len(out) + 1)
            if len(out) > limit:
                raise err(f"gzip payload unpacks to more than {limit} bytes")
            chunk = d.unconsumed_tail
    except zlib.error as e:
        raise err(f"gzip payload is corrupt: {e}") from None
    if not d.eof:
        raise err("gzip payload is truncated")
    return bytes(out)


def _lzma_like(p: bytes, limit: int, err: Callable[[str], ElfError], fmt: str, form: int) -> bytes:
    d = lzma.LZMADecompressor(form)
    try:
        out = _drain(d.decompress, lambda: not d.eof and not d.needs_input, p, limit, err, fmt)
    except lzma.LZMAError as e:
        raise err(f"{fmt} payload is corrupt: {e}") from None
    if not d.eof and form == lzma.FORMAT_XZ:
        raise err(f"{fmt} payload is truncated")
    return out


def _bunzip2(p: bytes, limit: int, err: Callable[[str], ElfError]) -> bytes:
    d = bz2.BZ2Decompressor()
    try:
        out = _drain(d.decompress, lambda: not d.eof and not d.needs_input, p, limit, err, "bzip2")
    except (OSError, ValueError) as e:
        raise err(f"bzip2 payload is corrupt: {e}") from None
    if not d.eof:
        raise err("bzip2 payload is truncated")
    return out


def _unzstd(p: bytes, limit: int, err: Callable[[str], ElfError]) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise err("zstd payload: the Python package 'zstandard' is not installed") from None
    # A stream reader returns at most what is asked for per read, so the cap
    # holds however well the input compresses.  It would read the kernel's
    # 4-byte size trailer as the start of a second frame: leave it out (the
    # size check after unpacking still compares against it).
    src = io.BytesIO(p[:-4] if len(p) > 8 else p)
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(src) as r:
            while True:
                piece = r.read(1 << 20)
                if not piece:
                    break
                out += piece
                if len(out) > limit:
                    raise err(f"zstd payload unpacks to more than {limit} bytes")
    except zstandard.ZstdError as e:
        raise err(f"zstd payload is corrupt: {e}") from None
    return bytes(out)


def _unlz4_legacy(p: bytes, limit: int, err: Callable[[str], ElfError]) -> bytes:
    """The kernel's legacy lz4 framing, as libxenguest reads it.

    ``magic, (u32 chunk_size, chunk)*, u32 uncompressed_size``: each chunk is a
    raw lz4 block of at most 8 MiB uncompressed; the magic may recur between
    chunks (concatenated streams).  The trailing size says how much to expect.
    """
    try:
        import lz4.block
    except ImportError:
        raise err("lz4 payload: the Python package 'lz4' is not installed") from None
    if len(p) < 12:
        raise err("lz4 payload is too short")
    total = int.from_bytes(p[-4:], "little")
    if total > limit:
        raise err(f"lz4 payload says it unpacks to {total} bytes, more than {limit}")
    pos, end = 4, len(p) - 4
    out = bytearray()
    while pos < end:
        if end - pos < 4:
            raise err("lz4 payload: truncated chunk header")
        size = int.from_bytes(p[pos:pos + 4], "little")
        pos += 4
        if size == LZ4_LEGACY_MAGIC:
            continue
        if size > end - pos:
            raise err(f"lz4 payload: chunk of {size} bytes at offset {pos - 4} runs past the end")
        room = min(LZ4_LEGACY_CHUNK, total - len(out))
        if room <= 0:
            raise err("lz4 payload holds more data than its size trailer says")
        try:
            out += lz4.block.decompress(p[pos:pos + size], uncompressed_size=room)
        except lz4.block.LZ4BlockError as e:
            raise err(f"lz4 payload: chunk at offset {pos - 4} is corrupt: {e}") from None
        pos += size
    if len(out) != total:
        raise err(f"lz4 payload unpacked to {len(out)} bytes, its trailer says {total}")
    return bytes(out)


def unpack_payload(payload: bytes, name: str = "kernel", limit: int = MAX_UNPACKED) -> tuple[bytes, str]:
    """Decompress a bzImage payload; return (bytes, format name)."""
    def err(what: str) -> ElfError:
        return ElfError(f"{name}: {what}")

    if payload.startswith(_ELF_MAGIC):
        return payload, "none"
    fmt = next((f for magic, f in FORMATS if payload.startswith(magic)), None)
    if fmt is None:
        raise err(f"bzImage payload in an unknown compression format (starts {payload[:6].hex()})")
    if fmt == "gzip":
        out = _gunzip(payload, limit, err)
    elif fmt == "bzip2":
        out = _bunzip2(payload, limit, err)
    elif fmt == "lzma":
        out = _lzma_like(payload, limit, err, fmt, lzma.FORMAT_ALONE)
    elif fmt == "xz":
        out = _lzma_like(payload, limit, err, fmt, lzma.FORMAT_XZ)
    elif fmt == "lz4":
        out = _unlz4_legacy(payload, limit, err)
    elif fmt == "zstd":
        out = _unzstd(payload, limit, err)
    else:
        raise err(f"bzImage payload is {fmt}-compressed, which pyxen cannot unpack "
                  "(rebuild the kernel with another CONFIG_KERNEL_* compression)")
    hint = _size_hint(payload)
    if fmt != "lz4" and hint is not None and hint != len(out):
        raise err(f"{fmt} payload unpacked to {len(out)} bytes, its size trailer says {hint}")
    return out, fmt


def unpack_bzimage(data: bytes, name: str = "kernel", limit: int = MAX_UNPACKED) -> tuple[bytes, str]:
    """The ELF inside a bzImage, and the payload's compression format."""
    def err(what: str) -> ElfError:
        return ElfError(f"{name}: {what}")

    if not is_bzimage(data):
        raise err("not a bzImage (no 'HdrS' setup header at 0x202)")
    if len(data) < _HDR_END:
        raise err("bzImage setup header is truncated")
    version = struct.unpack_from("<H", data, _OFF_VERSION)[0]
    if version < _MIN_VERSION:
        raise err(f"bzImage boot protocol {version >> 8}.{version & 0xff:02d} is older than 2.08 "
                  "(no payload_offset): cannot find the kernel inside")
    setup_sects = data[_OFF_SETUP_SECTS] or 4
    offset, length = struct.unpack_from("<II", data, _OFF_PAYLOAD)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(data):
        raise err(f"bzImage payload ({start:#x}+{length:#x}) lies outside the file "
                  f"({len(data):#x} bytes)")
    out, fmt = unpack_payload(data[start:start + length], name, limit)
    if not out.startswith(_ELF_MAGIC):
        raise err(f"bzImage payload ({fmt}) does not unpack to an ELF file")
    return out, fmt


def kernel_elf(data: bytes, name: str = "kernel") -> bytes:
    """The ELF image to load: ``data`` itself, or the one inside a bzImage."""
    if data.startswith(_ELF_MAGIC) or not is_bzimage(data):
        return data
    return unpack_bzimage(data, name)[0]


def load_kernel(path: str | Path) -> XenKernel:
    """Read a PV kernel (ELF or bzImage) and parse it; every problem is an ElfError.

    What ``xl`` accepts as ``kernel =``: libxenguest tries the bzImage loader
    before the ELF one, and so do we (a file that is neither gets the ELF
    parser's "not an ELF file" message).
    """
    return parse_xen_kernel(kernel_elf(read_kernel_file(path), str(path)), str(path))
