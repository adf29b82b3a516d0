"""qcow2 on-disk structures: constants, the header and its extensions, snapshot table entries.

Facts from QEMU's docs/interop/qcow2.txt.  Everything here is pure parsing and
packing (bytes in, dataclasses out, and back); :mod:`pyxen.storage.qcow2`
does the I/O.  Parsers raise :class:`FormatError` with the name of the bad
field; the image layer prefixes the file name.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import MutableSequence
from dataclasses import dataclass, field

MAGIC = b"QFI\xfb"

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FDE = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_RAW_DATA = 1 << 1

FEATURE_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps",
    (2, 1): "raw external data",
}

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

# table entries
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED = 0x3F000000000001FE
RT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
RT_RESERVED = 0x1FF
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's limit: 2 MiB clusters
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
V2_HEADER = 72
V3_HEADER = 104

_H72 = struct.Struct(">4sIQIIQIIQQIIQ")
_H104 = struct.Struct(">QQQII")
assert _H72.size == 72 and _H72.size + _H104.size == 104
_SNAP = struct.Struct(">QIHHIIQII")
assert _SNAP.size == 40


class FormatError(Exception):
    """A qcow2 structure is malformed; the message names the field."""


def be64_table(data: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian 64-bit entries as a native array (L1, L2, refcount tables)."""
    a = array("Q")
    a.frombytes(bytes(data))
    a.byteswap()
    return a


def pack_be64(a: array[int] | list[int]) -> bytes:
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


_RC_CODES = {3: "B", 4: "H", 5: "I", 6: "Q"}


def decode_refblock(data: bytes, order: int) -> MutableSequence[int]:
    """Refcount block entries (``1 << order`` bits each, big-endian; sub-byte: bit 0 is the LSB)."""
    if order >= 3:
        a = array(_RC_CODES[order])
        assert a.itemsize == 1 << (order - 3)
        a.frombytes(data)
        if a.itemsize > 1:
            a.byteswap()
        return a
    bits = 1 << order
    per = 8 // bits
    mask = (1 << bits) - 1
    return [(byte >> (i * bits)) & mask for byte in data for i in range(per)]


def encode_refblock(vals: MutableSequence[int], order: int) -> bytes:
    if order >= 3:
        a = array(_RC_CODES[order], vals)
        if a.itemsize > 1:
            a.byteswap()
        return a.tobytes()
    bits = 1 << order
    per = 8 // bits
    out = bytearray(len(vals) // per)
    for j in range(len(out)):
        v = 0
        for i in range(per):
            v |= vals[j * per + i] << (i * bits)
        out[j] = v
    return bytes(out)


@dataclass
class Header:
    version: int
    cluster_bits: int
    size: int
    crypt_method: int = CRYPT_NONE
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER
    compression_type: int = 0
    extra_fields: bytes = b""  # header bytes past the fields we know, kept verbatim
    backing_file: str | None = None
    backing_format: str | None = None
    fde_offset: int = 0
    fde_length: int = 0
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    other_extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def feature_name(self, kind: int, bit: int) -> str:
        return self.feature_names.get((kind, bit)) or FEATURE_NAMES.get((kind, bit)) or f"bit {bit}"

    @classmethod
    def parse(cls, cluster0: bytes) -> Header:
        """The header from the start of the file (at least the first cluster, or all of a shorter file)."""
        if len(cluster0) < V2_HEADER:
            raise FormatError(f"file too short for a qcow2 header ({len(cluster0)} bytes)")
        (magic, version, bf_off, bf_size, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
         nb_snap, snap_off) = _H72.unpack_from(cluster0, 0)
        if magic != MAGIC:
            raise FormatError(f"not a qcow2 image (magic {magic!r})")
        if version not in (2, 3):
            raise FormatError(f"version {version} is not supported (2 or 3)")
        if not MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS:
            raise FormatError(f"cluster_bits {cbits} out of range {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
        h = cls(version, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap, snap_off)
        cs = 1 << cbits
        if version == 3:
            if len(cluster0) < V3_HEADER:
                raise FormatError("file too short for a version 3 header")
            (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
             h.header_length) = _H104.unpack_from(cluster0, V2_HEADER)
            if h.header_length < V3_HEADER or h.header_length % 8 or h.header_length > cs:
                raise FormatError(f"header_length {h.header_length} invalid")
            if len(cluster0) < h.header_length:
                raise FormatError("file too short for header_length")
            if h.header_length > V3_HEADER:
                h.compression_type = cluster0[V3_HEADER]
                h.extra_fields = bytes(cluster0[V3_HEADER + 1:h.header_length])
            if h.refcount_order > 6:
                raise FormatError(f"refcount_order {h.refcount_order} out of range 0..6")
        else:
            h.header_length = V2_HEADER
        if size >= 1 << 63:
            raise FormatError(f"size {size} out of range")
        if crypt not in (CRYPT_NONE, CRYPT_AES, CRYPT_LUKS):
            raise FormatError(f"crypt_method {crypt} unknown")
        for name, val in (("l1_table_offset", l1_off), ("refcount_table_offset", rt_off),
                          ("snapshots_offset", snap_off)):
            if val % cs:
                raise FormatError(f"{name} {val:#x} is not aligned to a cluster")
        if rt_clusters == 0:
            raise FormatError("refcount_table_clusters is 0")
        if nb_snap > MAX_SNAPSHOTS:
            raise FormatError(f"nb_snapshots {nb_snap} out of range")
        if bf_off:
            if bf_size > MAX_BACKING_NAME:
                raise FormatError(f"backing_file_size {bf_size} exceeds {MAX_BACKING_NAME}")
            if bf_off + bf_size > min(cs, len(cluster0)):
                raise FormatError("backing file name lies outside the first cluster")
            try:
                h.backing_file = bytes(cluster0[bf_off:bf_off + bf_size]).decode()
            except UnicodeDecodeError as e:
                raise FormatError("backing file name is not UTF-8") from e
        h._parse_extensions(cluster0, min(cs, len(cluster0), bf_off or cs))
        return h

    def _parse_extensions(self, data: bytes, end: int) -> None:
        off = self.header_length
        seen: set[int] = set()
        while True:
            if off + 8 > end:
                if off == end:
                    return  # no end marker but the area is used up: tolerate
                raise FormatError("header extensions run past the end of the header area")
            typ, length = struct.unpack_from(">II", data, off)
            if typ == EXT_END:
                return
            off += 8
            if off + length > end:
                raise FormatError(f"header extension {typ:#x} length {length} runs past the header area")
            body = bytes(data[off:off + length])
            if typ in seen and typ in (EXT_BACKING_FORMAT, EXT_FDE, EXT_FEATURE_TABLE, EXT_DATA_FILE):
                raise FormatError(f"header extension {typ:#x} appears twice")
            seen.add(typ)
            if typ == EXT_BACKING_FORMAT:
                self.backing_format = body.decode("ascii", "replace")
            elif typ == EXT_FEATURE_TABLE:
                for i in range(0, length - 47, 48):
                    kind, bit = body[i], body[i + 1]
                    self.feature_names[(kind, bit)] = body[i + 2:i + 48].split(b"\0", 1)[0].decode(
                        "ascii", "replace")
            elif typ == EXT_FDE:
                if length != 16:
                    raise FormatError(f"encryption header extension has length {length} (expected 16)")
                self.fde_offset, self.fde_length = struct.unpack(">QQ", body)
            else:
                self.other_extensions.append((typ, body))
            off += (length + 7) // 8 * 8

    def pack(self) -> bytes:
        """Header, extensions and backing file name: the bytes at the start of cluster 0.

        The feature name table is optional: it is left out when it would not fit."""
        try:
            return self._pack(self.version >= 3)
        except FormatError:
            if self.version < 3:
                raise
            return self._pack(False)

    def _pack(self, feature_table: bool) -> bytes:
        v3 = self.version >= 3
        ext = bytearray()

        def add(typ: int, body: bytes) -> None:
            ext.extend(struct.pack(">II", typ, len(body)))
            ext.extend(body)
            ext.extend(bytes(-len(body) % 8))

        if self.backing_format:
            add(EXT_BACKING_FORMAT, self.backing_format.encode())
        if self.crypt_method == CRYPT_LUKS:
            add(EXT_FDE, struct.pack(">QQ", self.fde_offset, self.fde_length))
        if feature_table:
            names = dict(FEATURE_NAMES)
            names.update(self.feature_names)
            add(EXT_FEATURE_TABLE, b"".join(struct.pack(">BB46s", k, b, n.encode()[:46])
                                            for (k, b), n in sorted(names.items())))
        for typ, body in self.other_extensions:
            add(typ, body)
        ext.extend(bytes(8))
        hlen = self.header_length if v3 else V2_HEADER
        bname = self.backing_file.encode() if self.backing_file else b""
        if len(bname) > MAX_BACKING_NAME:
            raise FormatError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
        bf_off = hlen + len(ext) if bname else 0
        out = bytearray(_H72.pack(MAGIC, self.version, bf_off, len(bname), self.cluster_bits, self.size,
                                  self.crypt_method, self.l1_size, self.l1_table_offset,
                                  self.refcount_table_offset, self.refcount_table_clusters,
                                  self.nb_snapshots, self.snapshots_offset))
        if v3:
            out += _H104.pack(self.incompatible, self.compatible, self.autoclear, self.refcount_order, hlen)
            if hlen > V3_HEADER:
                tail = bytes([self.compression_type]) + self.extra_fields
                out += tail[:hlen - V3_HEADER].ljust(hlen - V3_HEADER, b"\0")
        out += ext
        out += bname
        if len(out) > self.cluster_size:
            raise FormatError("header, extensions and backing file name do not fit in the first cluster")
        return bytes(out)


@dataclass
class SnapshotEntry:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int | None = None
    extra: bytes = b""  # extra data past the fields we know, kept verbatim

    def pack(self) -> bytes:
        ident, name = self.id.encode(), self.name.encode()
        extra = struct.pack(">QQ", self.vm_state_size, self.disk_size or 0) + self.extra
        out = _SNAP.pack(self.l1_table_offset, self.l1_size, len(ident), len(name), self.date_sec,
                         self.date_nsec, self.vm_clock_nsec, min(self.vm_state_size, 0xFFFFFFFF),
                         len(extra)) + extra + ident + name
        return out + bytes(-len(out) % 8)


def parse_snapshot_table(data: bytes, count: int, version: int) -> tuple[list[SnapshotEntry], int]:
    """``count`` snapshot entries from ``data``; also the table's length in bytes."""
    out = []
    off = 0
    for i in range(count):
        if off + _SNAP.size > len(data):
            raise FormatError(f"snapshot table entry {i} runs past the table")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate32,
         extra_size) = _SNAP.unpack_from(data, off)
        off += _SNAP.size
        if off + extra_size + id_len + name_len > len(data):
            raise FormatError(f"snapshot table entry {i} runs past the table")
        extra = data[off:off + extra_size]
        off += extra_size
        ident = data[off:off + id_len].decode("utf-8", "replace")
        off += id_len
        name = data[off:off + name_len].decode("utf-8", "replace")
        off += name_len
        off = (off + 7) // 8 * 8
        vmstate = vmstate32
        disk_size = None
        if len(extra) >= 8:
            vmstate = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        elif version >= 3:
            raise FormatError(f"snapshot {ident!r} has {len(extra)} bytes of extra data (version 3 needs 16)")
        out.append(SnapshotEntry(l1_off, l1_size, ident, name, dsec, dnsec, vmclock, vmstate, disk_size,
                                 bytes(extra[16:])))
    return out, off
