"""qcow2 disk images: sparse allocation, refcounts, backing chains, compression, LUKS, snapshots.

Format facts from QEMU's docs/interop/qcow2.txt; structures live in
:mod:`pyxen.storage.qcow2_format`, LUKS in :mod:`pyxen.storage.luks`.

Locking.  One lock (``_cv``, a condition over a Lock) guards all metadata:
the L1 table, the L2 cache, refcount blocks, the refcount table, the snapshot
list and the header.  Reads and in-place writes of clusters whose refcount is
exactly one (the COPIED flag) look the mapping up under the lock and then do
their data I/O outside it with os.preadv/os.pwritev straight into the
caller's buffer; ``_inflight`` counts them.  Operations that change what a
mapped cluster means (snapshots, flush releasing freed clusters) wait for
``_inflight`` to drain first.  Allocating writes (first write to a cluster,
copy-on-write) hold the lock through their data write, so two writers never
allocate the same guest cluster twice.

Crash safety.  Metadata changes are made in memory and written by
``flush()`` in this order, with an fdatasync after each step that wrote
anything:

1. data clusters and freshly allocated clusters no one points to yet
   (new L1 copies, snapshot tables) — they were written when allocated;
2. refcount blocks, with every refcount at max(on-disk, new): increments
   land, decrements wait;
3. the refcount table (in place, or a new table and then the header);
4. L2 tables;
5. the L1 table (a moved L1 first, then the header) and the header;
6. refcount blocks with their final values (the decrements).

So at every instant the on-disk refcounts are at least what the on-disk
tables need: a crash can leak clusters (``qemu-img check -r leaks``) but an
L2 entry never points at unwritten data or at a cluster with refcount 0.
Clusters freed since the last flush are not reused until that flush has
finished.
"""

from __future__ import annotations

import copy
import mmap
import os
import struct
import threading
import time
import zlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, field

from pyxen.storage import BlockImage, ImageError, luks
from pyxen.storage.qcow2_format import (
    CRYPT_AES,
    CRYPT_LUKS,
    CRYPT_NONE,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L1E_RESERVED,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED,
    MAGIC,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    RT_OFFSET_MASK,
    RT_RESERVED,
    FormatError,
    Header,
    SnapshotEntry,
    be64_table,
    decode_refblock,
    encode_refblock,
    pack_be64,
    parse_snapshot_table,
)

__all__ = ["Qcow2Image", "create_qcow2", "CheckResult", "SnapshotInfo", "open_backing"]

# guest cluster kinds
UNALLOC, NORMAL, ZERO, COMPRESSED = 0, 1, 2, 3
MAX_L1_BYTES = 32 << 20
MAX_RT_BYTES = 8 << 20
MAX_CHAIN = 32
SUPPORTED_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT
ZEROS_CHUNK = bytes(1 << 16)

BackingOpener = Callable[[str, "str | None"], BlockImage]


@dataclass
class SnapshotInfo:
    id: str
    name: str
    date: float
    vm_state_size: int
    disk_size: int | None


@dataclass
class CheckResult:
    corruptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.corruptions and not self.leaks


class _RawBacking(BlockImage):
    """A read-only raw file as a backing image."""

    def __init__(self, path: str) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageError(f"{path}: cannot open backing file: {e.strerror}") from e
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        self.readonly = True
        self.name = path

    def readinto(self, offset: int, buf: memoryview) -> None:
        try:
            _pread_full(self._fd, buf, offset)
        except OSError as e:
            raise ImageError(f"{self.name}: I/O error: {e.strerror or e}") from e

    def write(self, offset: int, data: memoryview | bytes) -> None:
        raise ImageError(f"{self.name}: backing file is read-only")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pread_full(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``offset``; bytes past the end of the file read as zeros."""
    done = 0
    n = len(buf)
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            _zero(buf[done:])
            return
        done += got


def _pwrite_full(fd: int, data: memoryview | bytes | bytearray, offset: int) -> None:
    mv = memoryview(data)
    done = 0
    while done < len(mv):
        done += os.pwritev(fd, [mv[done:]], offset + done)


def _zero(buf: memoryview) -> None:
    n = len(buf)
    for i in range(0, n, len(ZEROS_CHUNK)):
        k = min(len(ZEROS_CHUNK), n - i)
        buf[i:i + k] = ZEROS_CHUNK[:k]


def _bytes_view(b: memoryview | bytes | bytearray) -> memoryview:
    mv = memoryview(b)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _probe_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == MAGIC else "raw"
    except OSError as e:
        raise ImageError(f"{path}: cannot open backing file: {e.strerror}") from e


def open_backing(path: str, fmt: str | None, _depth: int = 0) -> BlockImage:
    """The default backing opener: raw or qcow2 (probed when the image names no format), read-only."""
    if fmt is None:
        fmt = _probe_format(path)
    if fmt == "qcow2":
        return Qcow2Image(path, readonly=True, _depth=_depth)
    if fmt == "raw":
        return _RawBacking(path)
    raise ImageError(f"{path}: backing format {fmt!r} is not supported (raw or qcow2)")


class Qcow2Image(BlockImage):
    """A qcow2 image file (version 2 or 3)."""

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False, key_secret: bytes | None = None,
                 backing_opener: BackingOpener | None = None, *, _depth: int = 0,
                 _bootstrap: bool = False) -> None:
        self.path = self.name = os.fspath(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._inflight = 0
        self._fm: mmap.mmap | None = None  # native fast map (native_fastmap)
        self._fmv: memoryview | None = None
        self._fm_seen: set[int] = set()  # L1 indexes whose range is published
        self._fm_stop = False
        self._fm_thread: threading.Thread | None = None
        self._draining = 0
        self.backing: BlockImage | None = None
        self._crypto: luks.SectorCipher | None = None
        self._fd = -1
        try:
            self._fd = os.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise ImageError(f"{self.path}: cannot open: {e.strerror}") from e
        try:
            self._open(readonly, key_secret, backing_opener, _depth, _bootstrap)
        except BaseException:
            self._close_files()
            raise

    # ------------------------------------------------------------------ opening

    def _err(self, what: str) -> ImageError:
        return ImageError(f"{self.path}: {what}")

    def _open(self, readonly: bool, key_secret: bytes | None, opener: BackingOpener | None, depth: int,
              bootstrap: bool) -> None:
        self._file_size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 1 << 21, 0)
        try:
            h = Header.parse(head)
        except FormatError as e:
            raise self._err(str(e)) from None
        self.h = h
        self._disk_h = copy.deepcopy(h)
        self.cbits = h.cluster_bits
        self.cs = 1 << self.cbits
        self.l2_bits = self.cbits - 3
        self.l2_entries = 1 << self.l2_bits
        self.rb_entries = (self.cs * 8) >> h.refcount_order
        self.rc_max = (1 << (1 << h.refcount_order)) - 1
        self.csize_shift = 62 - (self.cbits - 8)
        self.csize_mask = (1 << (self.cbits - 8)) - 1
        self.coff_mask = (1 << self.csize_shift) - 1
        self.size = h.size

        unknown = h.incompatible & ~SUPPORTED_INCOMPAT
        if unknown:
            names = [h.feature_name(0, b) for b in range(64) if unknown >> b & 1]
            raise self._err(f"unsupported incompatible feature(s): {', '.join(names)}")
        if h.incompatible & INCOMPAT_CORRUPT and not readonly:
            raise self._err("image is marked corrupt (corrupt bit set); open it read-only or repair it")
        if h.compression_type != 0:
            raise self._err(f"compression_type {h.compression_type} without the compression type bit")
        if h.crypt_method == CRYPT_AES:
            raise self._err("legacy AES encryption (crypt_method 1) is not supported; use LUKS")

        cs = self.cs
        if h.refcount_table_clusters * cs > MAX_RT_BYTES:
            raise self._err(f"refcount_table_clusters {h.refcount_table_clusters} too large")
        self._check_area("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs)
        need_l1 = _l1_entries(h.size, self.cbits)
        if not bootstrap:
            if h.l1_size < need_l1:
                raise self._err(f"l1_size {h.l1_size} too small for size {h.size} (need {need_l1})")
            if h.l1_size * 8 > MAX_L1_BYTES:
                raise self._err(f"l1_size {h.l1_size} too large")
            self._check_area("L1 table", h.l1_table_offset, h.l1_size * 8)
        self._l1 = be64_table(os.pread(self._fd, h.l1_size * 8, h.l1_table_offset)) if h.l1_size else \
            array("Q")
        for i, l1e in enumerate(self._l1):
            self._check_l1_entry(l1e, f"L1 entry {i}")
        self._rt = be64_table(os.pread(self._fd, h.refcount_table_clusters * cs, h.refcount_table_offset))
        for i, rte in enumerate(self._rt):
            if rte & RT_RESERVED:
                raise self._err(f"refcount table entry {i} ({rte:#x}) has reserved bits set")
            off = rte & RT_OFFSET_MASK
            if off and (off % cs or off + cs > self._file_size):
                raise self._err(f"refcount table entry {i} ({off:#x}) is misaligned or beyond the end of "
                                f"the file")
        self._rb: dict[int, MutableSequence[int]] = {}
        self._rb_dirty: set[int] = set()
        self._rb_committed: dict[int, MutableSequence[int] | None] = {}
        self._rt_dirty: set[int] = set()
        self._rt_moved = False
        self._l1_dirty = False
        self._l1_moved = False
        self._hdr_dirty = False
        self._l2: OrderedDict[int, array[int]] = OrderedDict()
        self._l2_dirty: set[int] = set()
        self._l2_cache_max = max(64, (32 << 20) // cs)
        self._pending_free: set[int] = set()
        self._hint = 0
        self._alloc_end = -(-self._file_size // cs)
        self._comp_next = 0  # byte offset for the next compressed cluster (0: none open)

        self._snapshots: list[SnapshotEntry] = []
        if h.nb_snapshots:
            if h.snapshots_offset == 0 or h.snapshots_offset >= self._file_size:
                raise self._err(f"snapshots_offset {h.snapshots_offset:#x} lies outside the file")
            data = os.pread(self._fd, min(self._file_size - h.snapshots_offset, 64 << 20), h.snapshots_offset)
            try:
                self._snapshots, tlen = parse_snapshot_table(data, h.nb_snapshots, h.version)
            except FormatError as e:
                raise self._err(str(e)) from None
            self._snap_table_len = tlen
            for s in self._snapshots:
                if s.l1_table_offset % cs or s.l1_size * 8 > MAX_L1_BYTES:
                    raise self._err(f"snapshot {s.id!r}: l1_table_offset/l1_size invalid")
                if s.disk_size is not None and (s.disk_size >= 1 << 63 or
                                                _l1_entries(s.disk_size, self.cbits) * 8 > MAX_L1_BYTES):
                    raise self._err(f"snapshot {s.id!r}: disk size {s.disk_size} out of range")
                self._check_area(f"snapshot {s.id!r} L1 table", s.l1_table_offset, s.l1_size * 8)
        else:
            self._snap_table_len = 0

        if h.crypt_method == CRYPT_LUKS and not bootstrap:
            self._open_luks(key_secret)
        elif h.fde_offset or h.fde_length:
            raise self._err("full disk encryption header extension present without LUKS crypt_method")
        self._rebuild_meta()

        if h.backing_file:
            if depth >= MAX_CHAIN:
                raise self._err(f"backing chain deeper than {MAX_CHAIN} (a loop?)")
            bpath = h.backing_file
            if ":" in bpath.split("/", 1)[0] and not os.path.exists(bpath):
                raise self._err(f"backing file {bpath!r} uses a protocol; only plain files are supported")
            if not os.path.isabs(bpath):
                bpath = os.path.join(os.path.dirname(os.path.abspath(self.path)), bpath)
            if opener is not None:
                self.backing = opener(bpath, h.backing_format)
            else:
                self.backing = open_backing(bpath, h.backing_format, depth + 1)

        if not readonly:
            if h.incompatible & INCOMPAT_DIRTY:
                self._repair_refcounts()
            if h.autoclear:
                h.autoclear = 0  # we do not keep bitmaps up to date: say so, as the spec asks
                self._write_header(h)
                os.fdatasync(self._fd)
                self._disk_h = copy.deepcopy(h)

    def _check_area(self, what: str, off: int, length: int) -> None:
        if off % self.cs:
            raise self._err(f"{what} offset {off:#x} is not aligned to a cluster")
        if length and (off == 0 or off + length > self._file_size):
            raise self._err(f"{what} ({off:#x}+{length:#x}) lies outside the file "
                            f"({self._file_size:#x} bytes)")

    def _check_l1_entry(self, e: int, what: str) -> None:
        if e & L1E_RESERVED:
            raise self._err(f"{what} ({e:#x}) has reserved bits set")
        off = e & L1E_OFFSET_MASK
        if off and (off % self.cs or off + self.cs > self._file_size):
            raise self._err(f"{what} points to an L2 table at {off:#x}, misaligned or beyond the end "
                            f"of the file")

    def _open_luks(self, key_secret: bytes | None) -> None:
        h = self.h
        if not h.fde_offset or not h.fde_length:
            raise self._err("LUKS encryption without a full disk encryption header extension")
        self._check_area("LUKS header", h.fde_offset, h.fde_length)
        if key_secret is None:
            raise self._err("image is LUKS encrypted: a passphrase (key_secret) is needed")
        try:
            hdr = luks.LuksHeader.parse(os.pread(self._fd, luks.HEADER_SIZE, h.fde_offset))
            if hdr.payload_offset * luks.SECTOR > h.fde_length:
                raise luks.LuksError("LUKS payload_offset beyond the encryption header length")
            mk = luks.unlock(hdr, lambda o, n: os.pread(self._fd, n, h.fde_offset + o), key_secret)
            if mk is None:
                raise self._err("wrong passphrase: no LUKS key slot opens with it")
            self._crypto = luks.SectorCipher(hdr.cipher_name, hdr.cipher_mode, mk)
        except luks.LuksError as e:
            raise self._err(str(e)) from None

    def _rebuild_meta(self) -> None:
        """Clusters holding metadata; data and L2 pointers into them are corruption."""
        cs = self.cs
        m: set[int] = {0}

        def add(off: int, length: int) -> None:
            m.update(range(off // cs, -(-(off + length) // cs)))

        h = self.h
        add(h.refcount_table_offset, h.refcount_table_clusters * cs)
        for e in self._rt:
            if e & RT_OFFSET_MASK:
                m.add((e & RT_OFFSET_MASK) // cs)
        if h.l1_size:
            add(h.l1_table_offset, h.l1_size * 8)
        if h.nb_snapshots:
            add(h.snapshots_offset, self._snap_table_len)
        for s in self._snapshots:
            add(s.l1_table_offset, s.l1_size * 8)
        if h.fde_offset:
            add(h.fde_offset, h.fde_length)
        self._meta = m

    # ------------------------------------------------------------------ refcounts

    def _rb_for(self, c: int) -> tuple[int, MutableSequence[int]] | None:
        t = c // self.rb_entries
        if t >= len(self._rt):
            return None
        roff = self._rt[t] & RT_OFFSET_MASK
        if not roff:
            return None
        rb = self._rb.get(roff)
        if rb is None:
            data = os.pread(self._fd, self.cs, roff)
            if len(data) != self.cs:
                raise self._err(f"refcount block at {roff:#x} is truncated")
            rb = decode_refblock(data, self.h.refcount_order)
            self._rb[roff] = rb
        return roff, rb

    def _refcount(self, c: int) -> int:
        r = self._rb_for(c)
        return r[1][c % self.rb_entries] if r else 0

    def _set_rc(self, c: int, v: int) -> None:
        r = self._rb_for(c)
        if r is None:
            raise self._err(f"no refcount block covers cluster {c} (refcount table disagrees with tables)")
        roff, rb = r
        if v > self.rc_max:
            raise self._err(f"refcount of cluster {c} would exceed {self.rc_max}")
        if roff not in self._rb_dirty:
            self._rb_dirty.add(roff)
            self._rb_committed.setdefault(roff, copy.copy(rb))
        rb[c % self.rb_entries] = v

    def _incref(self, c: int) -> None:
        self._set_rc(c, self._refcount(c) + 1)
        self._pending_free.discard(c)

    def _decref(self, c: int) -> None:
        rc = self._refcount(c)
        if rc == 0:
            raise self._err(f"refcount of cluster {c} (offset {c * self.cs:#x}) is already 0 but a table "
                            f"references it: refcount blocks disagree with the tables")
        self._set_rc(c, rc - 1)
        if rc == 1:
            self._pending_free.add(c)

    def _crange(self, off: int, length: int) -> range:
        return range(off >> self.cbits, (off + length + self.cs - 1) >> self.cbits)

    def _compressed_span(self, e: int) -> tuple[int, int]:
        coff = e & self.coff_mask
        nsec = ((e >> self.csize_shift) & self.csize_mask) + 1
        return coff, nsec

    def _entry_clusters(self, e: int) -> range:
        """Host clusters an L2 entry holds a reference on."""
        if e & OFLAG_COMPRESSED:
            coff, nsec = self._compressed_span(e)
            return self._crange(coff & ~511, nsec * 512)
        off = e & L2E_OFFSET_MASK
        return range(off >> self.cbits, (off >> self.cbits) + 1) if off else range(0)

    def _new_refblock(self, t: int, c: int) -> None:
        roff = c * self.cs
        rb: MutableSequence[int] = decode_refblock(bytes(self.cs), self.h.refcount_order)
        self._rb[roff] = rb
        self._rb_committed[roff] = None
        self._rb_dirty.add(roff)
        rb[c % self.rb_entries] = 1
        self._rt[t] = roff
        self._rt_dirty.add(t)
        self._meta.add(c)
        self._alloc_end = max(self._alloc_end, c + 1)

    def _grow_rt(self, min_entries: int) -> None:
        cs, E = self.cs, self.rb_entries
        per = cs // 8
        rt = self._rt
        target = max(min_entries, 2 * len(rt), per)
        start = max(self._alloc_end, -(-self._file_size // cs))
        k = -(-target // per)
        while True:
            m = 0
            while True:
                last = start + k + m
                missing = [t for t in range((start // E), (last - 1) // E + 1)
                           if t >= len(rt) or not rt[t] & RT_OFFSET_MASK]
                if len(missing) == m:
                    break
                m = len(missing)
            if (last - 1) // E < k * per:
                break
            k += 1
        if k * cs > MAX_RT_BYTES:
            raise self._err("refcount table would exceed 8 MiB")
        new_rt = array("Q", rt)
        new_rt.extend([0] * (k * per - len(rt)))
        self._rt = new_rt
        for idx, t in enumerate(missing):
            c = start + k + idx
            roff = c * cs
            self._rb[roff] = decode_refblock(bytes(cs), self.h.refcount_order)
            self._rb_committed[roff] = None
            self._rb_dirty.add(roff)
            new_rt[t] = roff
        for c in range(start, last):
            self._set_rc(c, 1)
        old_off, old_n = self.h.refcount_table_offset, self.h.refcount_table_clusters
        self.h.refcount_table_offset = start * cs
        self.h.refcount_table_clusters = k
        self._rt_moved = True
        self._alloc_end = max(self._alloc_end, last)
        for c in range(old_off // cs, old_off // cs + old_n):
            self._decref(c)
        self._rebuild_meta()

    def _alloc(self, n: int) -> int:
        """``n`` contiguous free clusters with refcount 1; their byte offset."""
        E = self.rb_entries
        i = self._hint
        while True:
            j = i
            ok = True
            while j < i + n:
                t = j // E
                if t >= len(self._rt):
                    self._grow_rt(t + 1)
                    continue
                if not self._rt[t] & RT_OFFSET_MASK:
                    self._new_refblock(t, j)
                    ok = False
                    break
                if self._refcount(j) or j in self._pending_free:
                    ok = False
                    break
                if j in self._meta:
                    raise self._err(f"metadata cluster {j} has refcount 0: refcount blocks disagree")
                j += 1
            if ok:
                for k in range(i, i + n):
                    self._set_rc(k, 1)
                if n == 1 or i == self._hint:
                    self._hint = i + n
                self._alloc_end = max(self._alloc_end, i + n)
                return i * self.cs
            i = j + 1

    # ------------------------------------------------------------------ L2 tables

    def _l2_put(self, off: int, tbl: array[int]) -> None:
        self._l2[off] = tbl
        self._l2.move_to_end(off)
        while len(self._l2) > self._l2_cache_max:
            for k in self._l2:
                if k not in self._l2_dirty:
                    del self._l2[k]
                    break
            else:
                break

    def _load_l2(self, off: int, active: bool = True) -> array[int]:
        tbl = self._l2.get(off)
        if tbl is not None:
            self._l2.move_to_end(off)
            return tbl
        if off // self.cs in self._meta:
            raise self._err(f"L2 table at {off:#x} overlaps other metadata")
        data = os.pread(self._fd, self.cs, off)
        if len(data) != self.cs:
            raise self._err(f"L2 table at {off:#x} is truncated")
        tbl = be64_table(data)
        if not active:
            return tbl
        self._validate_l2(off, tbl)
        self._l2_put(off, tbl)
        return tbl

    def _validate_l2(self, off: int, tbl: array[int]) -> None:
        cs, fsize, meta, v3 = self.cs, self._file_size, self._meta, self.h.version >= 3
        for i, e in enumerate(tbl):
            if not e:
                continue
            where = f"L2 table at {off:#x} entry {i} ({e:#x})"
            if e & OFLAG_COMPRESSED:
                if e & OFLAG_COPIED:
                    raise self._err(f"{where}: compressed cluster with the COPIED flag")
                coff, _ = self._compressed_span(e)
                if coff >= fsize:
                    raise self._err(f"{where}: compressed data beyond the end of the file")
                for c in self._entry_clusters(e):
                    if c in meta:
                        raise self._err(f"{where}: compressed data overlaps metadata")
                    if self._refcount(c) == 0:
                        raise self._err(f"{where}: compressed data in cluster {c} whose refcount is 0")
                continue
            if e & L2E_STD_RESERVED:
                raise self._err(f"{where}: reserved bits set")
            if e & OFLAG_ZERO and not v3:
                raise self._err(f"{where}: zero flag in a version 2 image")
            hoff = e & L2E_OFFSET_MASK
            if not hoff:
                if e & OFLAG_COPIED and not e & OFLAG_ZERO:
                    raise self._err(f"{where}: COPIED flag on an unallocated cluster")
                continue
            if hoff % cs:
                raise self._err(f"{where}: data cluster offset misaligned")
            if hoff >= fsize:
                raise self._err(f"{where}: data cluster beyond the end of the file ({fsize:#x} bytes)")
            if hoff // cs in meta:
                raise self._err(f"{where}: data cluster overlaps metadata")
            rc = self._refcount(hoff // cs)
            if rc == 0:
                raise self._err(f"{where}: data cluster has refcount 0 (refcount blocks disagree)")
            if e & OFLAG_COPIED and rc != 1:
                raise self._err(f"{where}: COPIED flag but refcount {rc} (refcount blocks disagree)")

    def _entry(self, gcl: int) -> int:
        l1i = gcl >> self.l2_bits
        if l1i >= len(self._l1):
            return 0
        l2off = self._l1[l1i] & L1E_OFFSET_MASK
        if not l2off:
            return 0
        return self._load_l2(l2off)[gcl & (self.l2_entries - 1)]

    def _kind(self, e: int) -> int:
        if e & OFLAG_COMPRESSED:
            return COMPRESSED
        if e & OFLAG_ZERO and self.h.version >= 3:
            return ZERO
        return NORMAL if e & L2E_OFFSET_MASK else UNALLOC

    def _l2_for_write(self, l1i: int) -> tuple[int, array[int]]:
        if l1i >= len(self._l1):
            raise self._err(f"guest offset beyond the L1 table (index {l1i})")
        e = self._l1[l1i]
        off = e & L1E_OFFSET_MASK
        if not off:
            new = self._alloc(1)
            tbl = array("Q", [0]) * self.l2_entries
            self._l2_put(new, tbl)
            self._l2_dirty.add(new)
            self._l1[l1i] = new | OFLAG_COPIED
            self._l1_dirty = True
            if l1i in self._fm_seen:
                self._fm_fill(l1i)
            return new, tbl
        tbl = self._load_l2(off)
        if e & OFLAG_COPIED:
            return off, tbl
        if self._refcount(off // self.cs) == 1:
            self._l1[l1i] = off | OFLAG_COPIED
            self._l1_dirty = True
            if l1i in self._fm_seen:
                self._fm_fill(l1i)
            return off, tbl
        # shared with a snapshot: copy the table; data refcounts count L1 paths, so they stay
        new = self._alloc(1)
        nt = array("Q", tbl)
        for j, x in enumerate(nt):
            if x and not x & OFLAG_COMPRESSED and x & L2E_OFFSET_MASK:
                if self._refcount((x & L2E_OFFSET_MASK) // self.cs) == 1:
                    nt[j] = x | OFLAG_COPIED
                else:
                    nt[j] = x & ~OFLAG_COPIED
        self._l2_put(new, nt)
        self._l2_dirty.add(new)
        self._l1[l1i] = new | OFLAG_COPIED
        self._l1_dirty = True
        self._decref(off // self.cs)
        if l1i in self._fm_seen:
            self._fm_fill(l1i)
        return new, nt

    # ------------------------------------------------------------------ native fast map

    def native_fastmap(self) -> tuple[int, int, int, mmap.mmap] | None:
        """For blkback's native data path: ``(fd, cluster_bits, clusters,
        table)``, the table (an anonymous mapping) with one 64-bit word per guest cluster: the
        host offset of its data | 1 (may be read in place) | 2 (may be
        written in place), or 0 (ask this object).  Filled an L2 table's
        range at a time as requests reach us (:meth:`_fm_note`), kept exact
        at every change of an L1 or L2 entry (``_fm_set``, ``_fm_fill``,
        ``_fm_reset``).  Writable means plain, allocated and not shared:
        COPIED in both the L1 and the L2 entry.  Clusters are freed only at a
        flush (``_pending_free``), and blkback drains the native path before
        a flush, so a request that read an entry just before it changed still
        lands in a cluster nobody else uses.  None for encrypted images (every
        byte needs the cipher)."""
        if self._crypto is not None or self._fd < 0:
            return None
        with self._cv:
            n = -(-self.size // self.cs)
            if self._fm is None:
                self._fm = mmap.mmap(-1, max(8, n * 8), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                self._fmv = memoryview(self._fm).cast("Q")
                self._fm_seen = set()
                # publish what is allocated already, one L2 range at a time, in
                # the background (a big disk has millions of clusters)
                self._fm_stop = False
                self._fm_thread = threading.Thread(target=self._fm_prefill, daemon=True,
                                                   name=f"qcow2-fastmap-{os.path.basename(self.path)}")
                self._fm_thread.start()
            return self._fd, self.cbits, n, self._fm

    def _fm_prefill(self) -> None:
        for l1i in range(len(self._l1)):
            with self._cv:
                if self._fm_stop or self._fmv is None:
                    return
                if l1i < len(self._l1) and l1i not in self._fm_seen and self._l1[l1i] & L1E_OFFSET_MASK:
                    try:
                        self._fm_fill(l1i)
                    except ImageError:
                        return  # a corrupt table: requests there go the Python way and say so

    def _fm_value(self, l1e: int, e: int) -> int:
        if e & OFLAG_COMPRESSED or (e & OFLAG_ZERO and self.h.version >= 3):
            return 0
        off = e & L2E_OFFSET_MASK
        if not off:
            return 0
        v = off | 1
        if l1e & OFLAG_COPIED and e & OFLAG_COPIED and not self.readonly:
            v |= 2
        return v

    def _fm_fill(self, l1i: int) -> None:
        """Publish the range of L1 entry ``l1i`` (with self._cv held)."""
        fmv = self._fmv
        if fmv is None or l1i >= len(self._l1):
            return
        first = l1i << self.l2_bits
        last = min(first + self.l2_entries, len(fmv))
        l1e = self._l1[l1i]
        l2off = l1e & L1E_OFFSET_MASK
        if not l2off:
            for g in range(first, last):
                fmv[g] = 0
        else:
            tbl = self._load_l2(l2off)
            for g in range(first, last):
                fmv[g] = self._fm_value(l1e, tbl[g - first])
        self._fm_seen.add(l1i)

    def _fm_set(self, gcl: int, e: int) -> None:
        """Guest cluster ``gcl``'s L2 entry is now ``e`` (with self._cv held)."""
        fmv = self._fmv
        if fmv is not None and gcl < len(fmv) and (gcl >> self.l2_bits) in self._fm_seen:
            fmv[gcl] = self._fm_value(self._l1[gcl >> self.l2_bits], e)

    def _fm_reset(self) -> None:
        """Forget everything published (tables rewritten wholesale)."""
        if self._fmv is not None:
            for l1i in self._fm_seen:
                first = l1i << self.l2_bits
                for g in range(first, min(first + self.l2_entries, len(self._fmv))):
                    self._fmv[g] = 0
            self._fm_seen = set()

    def _fm_note(self, offset: int, n: int) -> None:
        """A request for these bytes came to us: publish the ranges it touched."""
        if self._fmv is None or n <= 0:
            return
        with self._cv:
            for l1i in range(offset >> (self.cbits + self.l2_bits),
                             ((offset + n - 1) >> (self.cbits + self.l2_bits)) + 1):
                if l1i not in self._fm_seen:
                    self._fm_fill(l1i)

    # ------------------------------------------------------------------ data I/O

    def _check_range(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise self._err(f"I/O at {offset:#x}+{n:#x} is beyond the end of the disk ({self.size:#x})")

    def _begin_io(self) -> None:
        while self._draining:
            self._cv.wait()

    def _end_io(self) -> None:
        with self._cv:
            self._inflight -= 1
            if not self._inflight:
                self._cv.notify_all()

    def _drain(self) -> None:
        self._draining += 1
        try:
            while self._inflight:
                self._cv.wait()
        finally:
            self._draining -= 1
        self._cv.notify_all()

    def _map(self, offset: int, n: int) -> list[tuple[int, int, int, int]]:
        """(kind, position in the buffer, length, host offset / guest offset / L2 entry) runs."""
        plan: list[tuple[int, int, int, int]] = []
        cs = self.cs
        pos = 0
        while pos < n:
            goff = offset + pos
            gcl = goff >> self.cbits
            a = goff & (cs - 1)
            ln = min(cs - a, n - pos)
            e = self._entry(gcl)
            k = self._kind(e)
            if k == NORMAL:
                arg = (e & L2E_OFFSET_MASK) + a
            elif k == UNALLOC:
                arg = goff
            elif k == COMPRESSED:
                arg = e
            else:
                arg = 0
            if plan and k != COMPRESSED:
                pk, ppos, pln, parg = plan[-1]
                if pk == k and (k == ZERO or parg + pln == arg):
                    plan[-1] = (pk, ppos, pln + ln, parg)
                    pos += ln
                    continue
            plan.append((k, pos, ln, arg))
            pos += ln
        return plan

    def readinto_vec(self, offset: int, bufs: list[memoryview]) -> None:
        """A whole request at once: one cluster walk instead of one per 4 KiB
        segment, at the price of one copy into the segments."""
        if self._fmv is not None:
            self._fm_note(offset, sum(len(b) for b in bufs))
        if len(bufs) == 1:
            return self.readinto(offset, bufs[0])
        tmp = bytearray(sum(len(b) for b in bufs))
        self.readinto(offset, memoryview(tmp))
        pos = 0
        for b in bufs:
            b[:] = tmp[pos:pos + len(b)]
            pos += len(b)

    def write_vec(self, offset: int, bufs: list[memoryview]) -> None:
        try:
            if len(bufs) == 1:
                return self.write(offset, bufs[0])
            self.write(offset, b"".join(bufs))
        finally:
            if self._fmv is not None:
                self._fm_note(offset, sum(len(b) for b in bufs))

    def readinto(self, offset: int, buf: memoryview) -> None:
        try:
            self._readinto(offset, buf)
        except OSError as e:
            raise self._err(f"I/O error: {e.strerror or e}") from e

    def _readinto(self, offset: int, buf: memoryview) -> None:
        mv = _bytes_view(buf)
        n = len(mv)
        self._check_range(offset, n)
        cs = self.cs
        if (offset & (cs - 1)) + n <= cs and self._crypto is None:
            # fast path: one cluster, plain data, the common case for a guest's 4 KiB I/O
            with self._cv:
                if self._draining:
                    self._begin_io()
                e = self._entry(offset >> self.cbits)
                host = e & L2E_OFFSET_MASK
                fast = host != 0 and not e & OFLAG_COMPRESSED and not (e & OFLAG_ZERO and self.h.version >= 3)
                if fast:
                    self._inflight += 1
            if fast:
                try:
                    _pread_full(self._fd, mv, host + (offset & (cs - 1)))
                finally:
                    self._end_io()
                return
        with self._cv:
            self._begin_io()
            plan = self._map(offset, n)
            self._inflight += 1
        try:
            for k, pos, ln, arg in plan:
                sub = mv[pos:pos + ln]
                if k == NORMAL:
                    self._read_host(arg, sub)
                elif k == UNALLOC:
                    self._read_backing(arg, sub)
                elif k == ZERO:
                    _zero(sub)
                else:
                    a = (offset + pos) & (self.cs - 1)
                    sub[:] = self._decompress(arg)[a:a + ln]
        finally:
            self._end_io()

    def _read_host(self, host: int, sub: memoryview) -> None:
        if self._crypto is None:
            _pread_full(self._fd, sub, host)
            return
        start = host & ~511
        end = (host + len(sub) + 511) & ~511
        raw = bytearray(end - start)
        _pread_full(self._fd, memoryview(raw), start)
        plain = self._crypto.decrypt(start // 512, raw)
        sub[:] = plain[host - start:host - start + len(sub)]

    def _write_host(self, host: int, data: memoryview | bytes | bytearray) -> None:
        if self._crypto is not None:
            start = host & ~511
            end = (host + len(data) + 511) & ~511
            if start != host or end != host + len(data):
                raw = bytearray(end - start)
                self._read_host(start, memoryview(raw))
                raw[host - start:host - start + len(data)] = data
                data = raw
                host = start
            data = self._crypto.encrypt(host // 512, data)
        _pwrite_full(self._fd, data, host)
        self._file_size = max(self._file_size, host + len(data))

    def _read_backing(self, goff: int, sub: memoryview) -> None:
        b = self.backing
        if b is None or goff >= b.size:
            _zero(sub)
            return
        part = min(len(sub), b.size - goff)
        b.readinto(goff, sub[:part])
        if part < len(sub):
            _zero(sub[part:])

    def _decompress(self, e: int) -> bytes:
        if self._crypto is not None:
            raise self._err("compressed cluster in an encrypted image")
        coff, nsec = self._compressed_span(e)
        clen = nsec * 512 - (coff & 511)
        raw = os.pread(self._fd, clen, coff)
        try:
            d = zlib.decompressobj(-12)
            out = d.decompress(raw, self.cs)
        except zlib.error as ex:
            raise self._err(f"compressed cluster at {coff:#x} does not decompress: {ex}") from None
        if len(out) != self.cs:
            raise self._err(f"compressed cluster at {coff:#x} decompresses to {len(out)} bytes, "
                            f"not {self.cs}")
        return out

    def _read_cluster(self, e: int, gcl: int, out: memoryview) -> None:
        """A whole guest cluster's current contents (for copy-on-write)."""
        k = self._kind(e)
        if k == NORMAL:
            self._read_host(e & L2E_OFFSET_MASK, out)
        elif k == UNALLOC:
            self._read_backing(gcl << self.cbits, out)
        elif k == ZERO:
            _zero(out)
        else:
            out[:] = self._decompress(e)

    def _release(self, e: int) -> None:
        for c in self._entry_clusters(e):
            self._decref(c)

    def write(self, offset: int, data: memoryview | bytes) -> None:
        try:
            self._write(offset, data)
        except OSError as e:
            raise self._err(f"I/O error: {e.strerror or e}") from e

    def _write(self, offset: int, data: memoryview | bytes) -> None:
        if self.readonly:
            raise self._err("image is read-only")
        mv = _bytes_view(data)
        n = len(mv)
        self._check_range(offset, n)
        cs = self.cs
        direct: list[tuple[int, int, int]] = []
        with self._cv:
            self._begin_io()
            pos = 0
            while pos < n:
                goff = offset + pos
                gcl = goff >> self.cbits
                a = goff & (cs - 1)
                ln = min(cs - a, n - pos)
                e = self._entry(gcl)
                if self._kind(e) == NORMAL and e & OFLAG_COPIED:
                    host = (e & L2E_OFFSET_MASK) + a
                    h0, p0, l0 = direct[-1] if direct else (-1, -1, 0)
                    if h0 + l0 == host and p0 + l0 == pos:
                        direct[-1] = (h0, p0, l0 + ln)
                    else:
                        direct.append((host, pos, ln))
                else:
                    self._cow_write(gcl, a, mv[pos:pos + ln])
                pos += ln
            if direct:
                self._inflight += 1
        if direct:
            try:
                for host, pos, ln in direct:
                    self._write_host(host, mv[pos:pos + ln])
            finally:
                self._end_io()

    def _cow_write(self, gcl: int, a: int, data: memoryview) -> None:
        cs = self.cs
        _, tbl = self._l2_for_write(gcl >> self.l2_bits)
        i = gcl & (self.l2_entries - 1)
        e = tbl[i]
        k = self._kind(e)
        if k == NORMAL:
            host = e & L2E_OFFSET_MASK
            if not e & OFLAG_COPIED and self._refcount(host // cs) == 1:
                tbl[i] = e | OFLAG_COPIED
                self._l2_dirty.add(self._l1[gcl >> self.l2_bits] & L1E_OFFSET_MASK)
                e = tbl[i]
                self._fm_set(gcl, e)
            if e & OFLAG_COPIED:
                self._write_host(host + a, data)
                return
        new = self._alloc(1)
        in_disk = min(cs, self.size - (gcl << self.cbits))
        if a == 0 and len(data) >= in_disk:
            self._write_host(new, data)
            if self._crypto is None and len(data) < cs:
                pass  # tail of the last cluster past the disk's end: never read
        else:
            buf = bytearray(cs)
            self._read_cluster(e, gcl, memoryview(buf))
            buf[a:a + len(data)] = data
            self._write_host(new, buf)
        tbl[i] = new | OFLAG_COPIED
        self._l2_dirty.add(self._l1[gcl >> self.l2_bits] & L1E_OFFSET_MASK)
        self._fm_set(gcl, tbl[i])
        if k in (NORMAL, ZERO, COMPRESSED):
            self._release(e)

    def write_compressed(self, cluster_index: int, data: memoryview | bytes) -> None:
        """Write one whole guest cluster deflate-compressed (stored plainly if it does not shrink)."""
        try:
            self._write_compressed(cluster_index, data)
        except OSError as e:
            raise self._err(f"I/O error: {e.strerror or e}") from e

    def _write_compressed(self, cluster_index: int, data: memoryview | bytes) -> None:
        if self.readonly:
            raise self._err("image is read-only")
        if self._crypto is not None:
            raise self._err("compressed writes to an encrypted image are not supported")
        mv = _bytes_view(data)
        goff = cluster_index << self.cbits
        in_disk = min(self.cs, self.size - goff)
        if cluster_index < 0 or in_disk <= 0 or len(mv) != in_disk:
            raise self._err(f"write_compressed needs one whole cluster within the disk "
                            f"(cluster {cluster_index}, {len(mv)} bytes)")
        plain = bytes(mv) + bytes(self.cs - len(mv))
        c = zlib.compressobj(6, zlib.DEFLATED, -12)
        comp = c.compress(plain) + c.flush()
        if len(comp) >= self.cs - 512:
            self.write(goff, mv)
            return
        with self._cv:
            self._drain()
            _, tbl = self._l2_for_write(cluster_index >> self.l2_bits)
            i = cluster_index & (self.l2_entries - 1)
            old = tbl[i]
            off = self._comp_next
            if not (off and (off & (self.cs - 1)) + len(comp) <= self.cs
                    and self._refcount(off >> self.cbits) and off >> self.cbits not in self._pending_free):
                off = self._alloc(1)
            else:
                self._incref(off >> self.cbits)
            _pwrite_full(self._fd, comp, off)
            self._file_size = max(self._file_size, off + len(comp))
            end = off + len(comp)
            self._comp_next = end if end & (self.cs - 1) else 0
            nsec = ((off & 511) + len(comp) + 511) // 512
            tbl[i] = OFLAG_COMPRESSED | ((nsec - 1) << self.csize_shift) | off
            self._l2_dirty.add(self._l1[cluster_index >> self.l2_bits] & L1E_OFFSET_MASK)
            self._fm_set(cluster_index, tbl[i])
            if old:
                self._release(old)

    @property
    def supports_discard(self) -> bool:
        return not self.readonly

    def discard(self, offset: int, length: int) -> None:
        """Drop whole clusters inside the range (partial clusters are left as they are).

        Dropped clusters read as zeros, except in a version 2 image with a backing
        file, which has no zero flag: there they read the backing file again."""
        try:
            self._discard(offset, length)
        except OSError as e:
            raise self._err(f"I/O error: {e.strerror or e}") from e

    def _discard(self, offset: int, length: int) -> None:
        if self.readonly:
            raise self._err("image is read-only")
        self._check_range(offset, length)
        first = -(-offset // self.cs)
        end = (offset + length) >> self.cbits
        if offset + length == self.size:
            end = -(-self.size // self.cs)
        use_zero = self.backing is not None and self.h.version >= 3
        with self._cv:
            self._begin_io()
            for gcl in range(first, end):
                e = self._entry(gcl)
                k = self._kind(e)
                want = OFLAG_ZERO if use_zero else 0
                if e == want or (k == UNALLOC and not use_zero):
                    continue
                _, tbl = self._l2_for_write(gcl >> self.l2_bits)
                i = gcl & (self.l2_entries - 1)
                e = tbl[i]
                tbl[i] = want
                self._l2_dirty.add(self._l1[gcl >> self.l2_bits] & L1E_OFFSET_MASK)
                self._fm_set(gcl, want)
                self._release(e)

    # ------------------------------------------------------------------ flush

    def flush(self) -> None:
        if self.readonly or self._fd < 0:
            return
        with self._cv:
            self._drain()
            self._draining += 1
            try:
                self._flush_locked()
            except OSError as e:
                raise self._err(f"I/O error: {e.strerror or e}") from e
            finally:
                self._draining -= 1
                self._cv.notify_all()

    def _write_header(self, h: Header) -> None:
        try:
            data = h.pack()
        except FormatError as e:
            raise self._err(str(e)) from None
        _pwrite_full(self._fd, data, 0)

    def _flush_locked(self) -> None:
        fd = self._fd
        os.fdatasync(fd)  # 1: data and fresh clusters
        order = self.h.refcount_order
        decreased: list[int] = []
        if self._rb_dirty:  # 2: refcount blocks, increments only
            for roff in sorted(self._rb_dirty):
                cur = self._rb[roff]
                com = self._rb_committed.get(roff)
                if com is None:
                    vals = cur
                else:
                    vals = array("Q", map(max, cur, com)) if order >= 3 else list(map(max, cur, com))
                    if list(vals) != list(cur):
                        decreased.append(roff)
                _pwrite_full(fd, encode_refblock(vals, order), roff)
            self._file_size = max(self._file_size, max(self._rb_dirty) + self.cs)
            os.fdatasync(fd)
        if self._rt_moved:  # 3: the refcount table
            h = self.h
            data = pack_be64(self._rt)
            _pwrite_full(fd, data + bytes(h.refcount_table_clusters * self.cs - len(data)),
                         h.refcount_table_offset)
            rt_end = h.refcount_table_offset + h.refcount_table_clusters * self.cs
            self._file_size = max(self._file_size, rt_end)
            os.fdatasync(fd)
            dh = self._disk_h
            dh.refcount_table_offset, dh.refcount_table_clusters = h.refcount_table_offset, \
                h.refcount_table_clusters
            self._write_header(dh)
            os.fdatasync(fd)
        elif self._rt_dirty:
            for t in sorted(self._rt_dirty):
                _pwrite_full(fd, struct.pack(">Q", self._rt[t]), self.h.refcount_table_offset + 8 * t)
            os.fdatasync(fd)
        if self._l2_dirty:  # 4: L2 tables
            for off in sorted(self._l2_dirty):
                tbl = self._l2.get(off)
                if tbl is not None and off // self.cs not in self._pending_free:
                    _pwrite_full(fd, pack_be64(tbl), off)
                    self._file_size = max(self._file_size, off + self.cs)
            os.fdatasync(fd)
        if self._l1_dirty or self._l1_moved or self._hdr_dirty:  # 5: L1 and header
            h = self.h
            if h.l1_size:
                _pwrite_full(fd, pack_be64(self._l1), h.l1_table_offset)
            if self._l1_moved:
                os.fdatasync(fd)
            if self._hdr_dirty or self._l1_moved:
                self._write_header(h)
            os.fdatasync(fd)
        if decreased:  # 6: refcount decrements
            for roff in decreased:
                _pwrite_full(fd, encode_refblock(self._rb[roff], order), roff)
            os.fdatasync(fd)
        self._rb_dirty.clear()
        self._rb_committed.clear()
        self._rt_dirty.clear()
        self._l2_dirty.clear()
        self._rt_moved = self._l1_moved = self._l1_dirty = self._hdr_dirty = False
        self._disk_h = copy.deepcopy(self.h)
        for c in self._pending_free:
            if self._refcount(c) == 0:
                self._l2.pop(c * self.cs, None)
                self._hint = min(self._hint, c)
                if self._comp_next >> self.cbits == c:
                    self._comp_next = 0
        self._pending_free.clear()

    def _close_files(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._fm_thread is not None:
            with self._cv:
                self._fm_stop = True
            self._fm_thread.join()
            self._fm_thread = None
        if self._fmv is not None:
            self._fmv.release()
            self._fmv = None
        if self._fm is not None:
            self._fm.close()
            self._fm = None
        try:
            self.flush()
        finally:
            self._close_files()

    # ------------------------------------------------------------------ snapshots

    def snapshots(self) -> list[SnapshotInfo]:
        with self._cv:
            return [SnapshotInfo(s.id, s.name, s.date_sec + s.date_nsec / 1e9, s.vm_state_size, s.disk_size)
                    for s in self._snapshots]

    def _find_snapshot(self, name_or_id: str) -> SnapshotEntry:
        for s in self._snapshots:
            if s.id == name_or_id:
                return s
        for s in self._snapshots:
            if s.name == name_or_id:
                return s
        raise self._err(f"no snapshot {name_or_id!r}")

    def _read_l1(self, off: int, n: int, what: str) -> array[int]:
        tbl = be64_table(os.pread(self._fd, n * 8, off))
        if len(tbl) != n:
            raise self._err(f"{what} is truncated")
        for i, e in enumerate(tbl):
            self._check_l1_entry(e, f"{what} entry {i}")
        return tbl

    def _l1_paths(self, l1: array[int], addend: int) -> None:
        """Add ``addend`` (+1/-1) to every L2 table and data cluster reachable from ``l1``."""
        fn = self._incref if addend > 0 else self._decref
        for e in l1:
            l2off = e & L1E_OFFSET_MASK
            if not l2off:
                continue
            tbl = self._l2.get(l2off)
            if tbl is None:
                tbl = self._load_l2(l2off, active=False)
            for x in tbl:
                if x:
                    for c in self._entry_clusters(x):
                        fn(c)
            fn(l2off // self.cs)

    def _clear_copied(self) -> None:
        """COPIED flags off in the active L1 and its L2 tables (before a snapshot shares them)."""
        self._fm_reset()
        for i, e in enumerate(self._l1):
            l2off = e & L1E_OFFSET_MASK
            if not l2off:
                continue
            if e & OFLAG_COPIED:
                self._l1[i] = e & ~OFLAG_COPIED
                self._l1_dirty = True
            tbl = self._l2.get(l2off)
            if tbl is None:
                tbl = self._load_l2(l2off, active=False)
                self._l2_put(l2off, tbl)
            for j, x in enumerate(tbl):
                if x & OFLAG_COPIED:
                    tbl[j] = x & ~OFLAG_COPIED
                    self._l2_dirty.add(l2off)

    def _fix_copied(self) -> None:
        """Recompute COPIED flags in the active L1 and its L2 tables from the refcounts."""
        self._fm_reset()
        cs = self.cs
        for i, e in enumerate(self._l1):
            l2off = e & L1E_OFFSET_MASK
            if not l2off:
                continue
            want = l2off | (OFLAG_COPIED if self._refcount(l2off // cs) == 1 else 0)
            if want != e:
                self._l1[i] = want
                self._l1_dirty = True
            tbl = self._l2.get(l2off)
            if tbl is None:
                tbl = self._load_l2(l2off, active=False)
                self._l2_put(l2off, tbl)
            for j, x in enumerate(tbl):
                if x and not x & OFLAG_COMPRESSED and x & L2E_OFFSET_MASK:
                    y = x | OFLAG_COPIED if self._refcount((x & L2E_OFFSET_MASK) // cs) == 1 \
                        else x & ~OFLAG_COPIED
                    if y != x:
                        tbl[j] = y
                        self._l2_dirty.add(l2off)

    def _write_snapshot_table(self, snaps: list[SnapshotEntry]) -> None:
        h = self.h
        data = b"".join(s.pack() for s in snaps)
        old_off, old_len = h.snapshots_offset, self._snap_table_len
        if snaps:
            n = -(-len(data) // self.cs)
            off = self._alloc(n)
            _pwrite_full(self._fd, data + bytes(n * self.cs - len(data)), off)
            self._file_size = max(self._file_size, off + n * self.cs)
        else:
            off = 0
        h.snapshots_offset, h.nb_snapshots = off, len(snaps)
        self._snapshots = snaps
        self._snap_table_len = len(data)
        self._hdr_dirty = True
        if old_off and old_len:
            for c in self._crange(old_off, old_len):
                self._decref(c)
        self._rebuild_meta()

    def create_snapshot(self, name: str, snap_id: str | None = None) -> SnapshotInfo:
        """An internal snapshot of the disk as it is now (no VM state)."""
        if self.readonly:
            raise self._err("image is read-only")
        with self._cv:
            self._drain()
            if any(s.name == name for s in self._snapshots):
                raise self._err(f"a snapshot named {name!r} exists already")
            if snap_id is None:
                ids = [int(s.id) for s in self._snapshots if s.id.isdigit()]
                snap_id = str(max(ids, default=0) + 1)
            elif any(s.id == snap_id for s in self._snapshots):
                raise self._err(f"a snapshot with id {snap_id!r} exists already")
            self._flush_locked()
            # COPIED flags off (and durable) before any refcount goes to 2, so that no crash
            # leaves a flag claiming sole ownership of a shared cluster
            self._clear_copied()
            self._flush_locked()
            l1 = array("Q", (e & ~OFLAG_COPIED for e in self._l1))
            n = max(1, -(-len(l1) * 8 // self.cs))
            off = self._alloc(n)
            data = pack_be64(l1)
            _pwrite_full(self._fd, data + bytes(n * self.cs - len(data)), off)
            self._file_size = max(self._file_size, off + n * self.cs)
            self._l1_paths(self._l1, +1)
            now = time.time()
            ent = SnapshotEntry(off, len(l1), snap_id, name, int(now), int(now % 1 * 1e9), 0, 0, self.size)
            self._write_snapshot_table(self._snapshots + [ent])
            self._flush_locked()
            return SnapshotInfo(ent.id, ent.name, now, 0, self.size)

    def delete_snapshot(self, name_or_id: str) -> None:
        if self.readonly:
            raise self._err("image is read-only")
        with self._cv:
            self._drain()
            s = self._find_snapshot(name_or_id)
            self._flush_locked()
            l1 = self._read_l1(s.l1_table_offset, s.l1_size, f"snapshot {s.id!r} L1 table")
            self._write_snapshot_table([x for x in self._snapshots if x is not s])
            self._l1_paths(l1, -1)
            for c in self._crange(s.l1_table_offset, s.l1_size * 8):
                self._decref(c)
            self._rebuild_meta()
            self._flush_locked()  # refcounts drop on disk before any COPIED flag comes back
            self._fix_copied()
            self._flush_locked()

    def apply_snapshot(self, name_or_id: str) -> None:
        """Revert the disk to a snapshot (``qemu-img snapshot -a``)."""
        if self.readonly:
            raise self._err("image is read-only")
        with self._cv:
            self._drain()
            s = self._find_snapshot(name_or_id)
            self._flush_locked()
            sl1 = self._read_l1(s.l1_table_offset, s.l1_size, f"snapshot {s.id!r} L1 table")
            size = s.disk_size if s.disk_size is not None else self.size
            need = _l1_entries(size, self.cbits)
            if len(sl1) < need:
                sl1.extend([0] * (need - len(sl1)))
            self._l1_paths(sl1, +1)
            self._l1_paths(self._l1, -1)
            h = self.h
            old_off, old_n = h.l1_table_offset, h.l1_size
            n = max(1, -(-len(sl1) * 8 // self.cs))
            off = self._alloc(n)
            _pwrite_full(self._fd, bytes(n * self.cs), off)
            self._file_size = max(self._file_size, off + n * self.cs)
            for c in self._crange(old_off, old_n * 8):
                self._decref(c)
            self._fm_reset()
            self._l1 = sl1
            h.l1_table_offset, h.l1_size, h.size = off, len(sl1), size
            self.size = size
            self._l1_moved = True
            self._hdr_dirty = True
            self._rebuild_meta()
            self._flush_locked()
            self._fix_copied()
            self._flush_locked()

    # ------------------------------------------------------------------ consistency

    def _expected_refcounts(self, res: CheckResult) -> Counter[int]:
        """Refcounts recomputed from the header, tables and snapshots (what they should be)."""
        cs, h = self.cs, self.h
        exp: Counter[int] = Counter()

        def inc(off: int, length: int) -> None:
            for c in self._crange(off, length):
                exp[c] += 1

        inc(0, cs)
        inc(h.refcount_table_offset, h.refcount_table_clusters * cs)
        for e in self._rt:
            if e & RT_OFFSET_MASK:
                inc(e & RT_OFFSET_MASK, cs)
        if h.fde_offset:
            inc(h.fde_offset, h.fde_length)
        if h.nb_snapshots:
            inc(h.snapshots_offset, self._snap_table_len)
        l1s: list[tuple[str, array[int], bool]] = [("active L1", self._l1, True)]
        if h.l1_size:
            inc(h.l1_table_offset, h.l1_size * 8)
        for s in self._snapshots:
            inc(s.l1_table_offset, s.l1_size * 8)
            l1s.append((f"snapshot {s.id!r} L1", self._read_l1(s.l1_table_offset, s.l1_size,
                                                               f"snapshot {s.id!r} L1 table"), False))
        for what, l1, active in l1s:
            for i, e in enumerate(l1):
                l2off = e & L1E_OFFSET_MASK
                if not l2off:
                    continue
                inc(l2off, cs)
                tbl = self._l2.get(l2off)
                if tbl is None:
                    tbl = self._load_l2(l2off, active=False)
                if active and bool(e & OFLAG_COPIED) != (self._refcount(l2off // cs) == 1):
                    rc = self._refcount(l2off // cs)
                    res.corruptions.append(f"{what} entry {i}: " + _copied_msg(e, rc))
                for j, x in enumerate(tbl):
                    if not x:
                        continue
                    if not x & OFLAG_COMPRESSED:
                        if x & L2E_STD_RESERVED:
                            res.corruptions.append(f"L2 {l2off:#x} entry {j}: reserved bits set")
                        hoff = x & L2E_OFFSET_MASK
                        if hoff and hoff % cs:
                            res.corruptions.append(f"L2 {l2off:#x} entry {j}: misaligned offset")
                        if active and hoff and bool(x & OFLAG_COPIED) != (self._refcount(hoff // cs) == 1):
                            res.corruptions.append(f"L2 {l2off:#x} entry {j}: "
                                                   + _copied_msg(x, self._refcount(hoff // cs)))
                    for c in self._entry_clusters(x):
                        exp[c] += 1
        return exp

    def check(self) -> CheckResult:
        """Recompute every refcount from the tables and compare with the refcount blocks.

        Also checks COPIED flags in the active tables.  Flushes first."""
        res = CheckResult()
        with self._cv:
            self._drain()
            if not self.readonly:
                self._flush_locked()
            exp = self._expected_refcounts(res)
            clusters = set(exp)
            for t, e in enumerate(self._rt):
                if e & RT_OFFSET_MASK:
                    r = self._rb_for(t * self.rb_entries)
                    assert r is not None
                    base = t * self.rb_entries
                    clusters.update(base + i for i, v in enumerate(r[1]) if v)
            for c in sorted(clusters):
                have, want = self._refcount(c), exp.get(c, 0)
                if have < want:
                    res.corruptions.append(f"cluster {c}: refcount {have}, referenced {want} times")
                elif have > want:
                    res.leaks.append(f"cluster {c}: refcount {have}, referenced {want} times")
        return res

    def _repair_refcounts(self) -> None:
        """The dirty bit is set: rebuild refcounts from the tables, then clear it."""
        res = CheckResult()
        exp = self._expected_refcounts(res)
        clusters = set(exp)
        for t, e in enumerate(self._rt):
            if e & RT_OFFSET_MASK:
                r = self._rb_for(t * self.rb_entries)
                assert r is not None
                clusters.update(t * self.rb_entries + i for i, v in enumerate(r[1]) if v)
        for c in sorted(clusters):
            want = exp.get(c, 0)
            if self._refcount(c) != want:
                if self._rb_for(c) is None:
                    raise self._err("dirty bit set and refcount blocks are missing; run "
                                    "'qemu-img check -r all' first")
                self._set_rc(c, want)
        self._fix_copied()
        self.h.incompatible &= ~INCOMPAT_DIRTY
        self._hdr_dirty = True
        self._flush_locked()


def _copied_msg(e: int, rc: int) -> str:
    if e & OFLAG_COPIED:
        return f"COPIED flag set but refcount {rc}"
    return f"COPIED flag missing with refcount {rc} (harmless: costs a copy on the next write)"


def _l1_entries(size: int, cluster_bits: int) -> int:
    """L1 entries needed to map ``size`` bytes."""
    clusters = (size + (1 << cluster_bits) - 1) >> cluster_bits
    l2_bits = cluster_bits - 3
    return (clusters + (1 << l2_bits) - 1) >> l2_bits


def create_qcow2(path: str | os.PathLike[str], size: int | None = None, cluster_bits: int = 16,
                 backing_file: str | None = None, backing_format: str | None = None,
                 encrypt_secret: bytes | None = None, version: int = 3,
                 refcount_bits: int = 16, luks_iterations: int | None = None,
                 luks_iter_time_ms: int = 1000) -> None:
    """Create an empty qcow2 image (``size`` defaults to the backing file's size)."""
    path = os.fspath(path)
    if version not in (2, 3):
        raise ImageError(f"{path}: version must be 2 or 3")
    if not 9 <= cluster_bits <= 21:
        raise ImageError(f"{path}: cluster_bits {cluster_bits} out of range 9..21")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64) or (version == 2 and refcount_bits != 16):
        raise ImageError(f"{path}: refcount_bits {refcount_bits} invalid for version {version}")
    if encrypt_secret is not None and version != 3:
        raise ImageError(f"{path}: LUKS encryption needs a version 3 image")
    if backing_file is not None:
        bpath = backing_file if os.path.isabs(backing_file) else \
            os.path.join(os.path.dirname(os.path.abspath(path)), backing_file)
        if backing_format is None:
            backing_format = _probe_format(bpath)
        if size is None:
            with open_backing(bpath, backing_format) as b:
                size = b.size
    if size is None or size < 0:
        raise ImageError(f"{path}: a size is needed")
    cs = 1 << cluster_bits
    order = refcount_bits.bit_length() - 1
    h = Header(version, cluster_bits, size, CRYPT_NONE, 0, 0, cs, 1, 0, 0,
               refcount_order=order, header_length=112 if version == 3 else 72,
               backing_file=backing_file, backing_format=backing_format)
    rb: MutableSequence[int] = decode_refblock(bytes(cs), order)
    rb[0] = rb[1] = rb[2] = 1
    try:
        hdr = h.pack()
    except FormatError as e:
        raise ImageError(f"{path}: {e}") from None
    data = bytearray(3 * cs)
    data[:len(hdr)] = hdr
    data[cs:cs + 8] = struct.pack(">Q", 2 * cs)
    data[2 * cs:3 * cs] = encode_refblock(rb, order)
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise ImageError(f"{path}: cannot create: {e.strerror}") from e
    img = Qcow2Image(path, _bootstrap=True, backing_opener=lambda p, f: _RawBacking("/dev/null"))
    try:
        with img._cv:
            l1_size = max(1, _l1_entries(size, cluster_bits))
            n = -(-l1_size * 8 // cs)
            off = img._alloc(n)
            _pwrite_full(img._fd, bytes(n * cs), off)
            img._l1 = array("Q", [0]) * l1_size
            img.h.l1_size, img.h.l1_table_offset = l1_size, off
            if encrypt_secret is not None:
                area, mk = luks.create(encrypt_secret, luks_iterations, luks_iter_time_ms)
                n = -(-len(area) // cs)
                foff = img._alloc(n)
                _pwrite_full(img._fd, area + bytes(n * cs - len(area)), foff)
                img.h.crypt_method = CRYPT_LUKS
                img.h.fde_offset, img.h.fde_length = foff, len(area)
            img._hdr_dirty = True
            img._rebuild_meta()
            img._flush_locked()
    finally:
        img._close_files()
