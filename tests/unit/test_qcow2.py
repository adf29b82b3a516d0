"""qcow2: a random-operation model test against a bytearray, corrupt images, snapshots, encryption.

Every test ends with :meth:`Qcow2Image.check`, which recomputes every refcount
from the L1/L2 tables, the snapshots and the metadata and compares it with the
refcount blocks: an image that reads right but leaks or double-counts fails.
"""

from __future__ import annotations

import os
import random
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyxen.storage import ImageError
from pyxen.storage.qcow2 import Qcow2Image, create_qcow2

SIZE = 256 * 1024 + 1536  # not a multiple of the cluster size: the last cluster is partial


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _read_all(img: Qcow2Image) -> bytes:
    buf = bytearray(img.size)
    img.readinto(0, memoryview(buf))
    return bytes(buf)


def _assert_clean(img: Qcow2Image) -> None:
    r = img.check()
    assert r.clean, (r.corruptions[:5], r.leaks[:5])


class Model:
    """The image under test beside a bytearray of what it must read back."""

    def __init__(self, tmp: Path, version: int, cluster_bits: int, backing: bool, refcount_bits: int = 16):
        self.path = str(tmp / "disk.qcow2")
        self.cs = 1 << cluster_bits
        self.version = version
        self.backing_data = b""
        if backing:
            # the backing file is shorter than the disk: the tail reads as zeros
            self.backing_data = _pattern(99, SIZE - 5 * 512)
            (tmp / "base.raw").write_bytes(self.backing_data)
            create_qcow2(self.path, SIZE, cluster_bits=cluster_bits, backing_file="base.raw",
                         backing_format="raw", version=version, refcount_bits=refcount_bits)
        else:
            create_qcow2(self.path, SIZE, cluster_bits=cluster_bits, version=version,
                         refcount_bits=refcount_bits)
        self.data = bytearray(self.backing_data.ljust(SIZE, b"\0"))
        self.img = Qcow2Image(self.path)

    def write(self, off: int, n: int, seed: int) -> None:
        d = _pattern(seed, n)
        self.img.write(off, memoryview(d))
        self.data[off:off + n] = d

    def read(self, off: int, n: int) -> None:
        buf = bytearray(n)
        self.img.readinto(off, memoryview(buf))
        assert buf == self.data[off:off + n], f"read {off:#x}+{n:#x}"

    def discard(self, off: int, n: int) -> None:
        self.img.discard(off, n)
        first = -(-off // self.cs)
        end = (off + n) // self.cs if off + n < SIZE else -(-SIZE // self.cs)
        for g in range(first, end):
            a, b = g * self.cs, min((g + 1) * self.cs, SIZE)
            if self.version == 2 and self.backing_data:
                self.data[a:b] = self.backing_data[a:b].ljust(b - a, b"\0")
            else:
                self.data[a:b] = bytes(b - a)

    def reopen(self) -> None:
        self.img.close()
        self.img = Qcow2Image(self.path)

    def finish(self) -> None:
        assert _read_all(self.img) == self.data
        _assert_clean(self.img)
        self.img.close()


_offsets = st.integers(0, SIZE - 1)
_op = st.one_of(
    st.tuples(st.just("w"), _offsets, st.integers(1, 20000), st.integers(0, 1 << 30)),
    st.tuples(st.just("r"), _offsets, st.integers(1, 20000), st.just(0)),
    st.tuples(st.just("d"), _offsets, st.integers(1, 40000), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
)


@pytest.mark.parametrize("version,cluster_bits,backing,refcount_bits", [
    (3, 9, False, 16), (3, 12, True, 16), (2, 10, True, 16), (2, 9, False, 16), (3, 9, True, 64),
    (3, 11, False, 1),
])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=25))
def test_model(tmp_path: Path, version: int, cluster_bits: int, backing: bool, refcount_bits: int,
               ops: list[tuple[str, int, int, int]]) -> None:
    for f in tmp_path.iterdir():
        f.unlink()
    m = Model(tmp_path, version, cluster_bits, backing, refcount_bits)
    try:
        for kind, off, n, seed in ops:
            n = min(n, SIZE - off)
            if kind == "w":
                m.write(off, n, seed)
            elif kind == "r":
                m.read(off, n)
            elif kind == "d":
                m.discard(off, n)
            elif kind == "reopen":
                m.reopen()
            else:
                m.img.flush()
        m.finish()
    finally:
        m.img.close()


def test_refcount_table_grows(tmp_path: Path) -> None:
    """512-byte clusters and 64-bit refcounts: a refcount block covers 64 clusters, the first
    refcount table 4096; filling 4 MiB needs more refcount blocks than that table holds."""
    p = str(tmp_path / "d.qcow2")
    create_qcow2(p, 4 << 20, cluster_bits=9, refcount_bits=64)
    data = _pattern(1, 4 << 20)
    with Qcow2Image(p) as img:
        first_rt = img.h.refcount_table_offset
        for off in range(0, 4 << 20, 64 * 1024):
            img.write(off, data[off:off + 64 * 1024])
        assert img.h.refcount_table_offset != first_rt
        _assert_clean(img)
    with Qcow2Image(p, readonly=True) as img:
        assert _read_all(img) == data
        _assert_clean(img)


def test_backing_chain_relative(tmp_path: Path) -> None:
    base = _pattern(5, 1 << 20)
    (tmp_path / "base.raw").write_bytes(base)
    sub = tmp_path / "sub"
    sub.mkdir()
    create_qcow2(str(tmp_path / "mid.qcow2"), backing_file="base.raw")
    with Qcow2Image(str(tmp_path / "mid.qcow2")) as mid:
        assert mid.size == 1 << 20
        mid.write(4096, b"M" * 100000)
    create_qcow2(str(sub / "top.qcow2"), backing_file="../mid.qcow2", backing_format="qcow2")
    expect = bytearray(base)
    expect[4096:104096] = b"M" * 100000
    with Qcow2Image(str(sub / "top.qcow2")) as top:
        assert _read_all(top) == expect
        top.write(50000, b"T" * 30000)
        expect[50000:80000] = b"T" * 30000
        assert _read_all(top) == expect
        _assert_clean(top)
    with Qcow2Image(str(tmp_path / "mid.qcow2"), readonly=True) as mid:  # the backing file is untouched
        assert _read_all(mid)[50000:80000] == b"M" * 30000


def test_backing_loop_is_refused(tmp_path: Path) -> None:
    create_qcow2(str(tmp_path / "a.qcow2"), 1 << 20)
    create_qcow2(str(tmp_path / "b.qcow2"), 1 << 20, backing_file="a.qcow2", backing_format="qcow2")
    with Qcow2Image(str(tmp_path / "a.qcow2")) as a:  # a now points at b: a loop
        a.h.backing_file, a.h.backing_format = "b.qcow2", "qcow2"
        a._hdr_dirty = True
    with pytest.raises(ImageError, match="deeper than"):
        Qcow2Image(str(tmp_path / "a.qcow2"))


def test_snapshots(tmp_path: Path) -> None:
    p = str(tmp_path / "d.qcow2")
    create_qcow2(p, 1 << 20, cluster_bits=12)
    a, b = _pattern(1, 1 << 20), _pattern(2, 300000)
    with Qcow2Image(p) as img:
        img.write(0, a)
        img.create_snapshot("one")
        img.write(1000, b)
        img.discard(500000, 200000)
        _assert_clean(img)
        after = _read_all(img)
        img.create_snapshot("two")
        assert [s.name for s in img.snapshots()] == ["one", "two"]
        assert [s.id for s in img.snapshots()] == ["1", "2"]
        img.apply_snapshot("one")
        assert _read_all(img) == a
        _assert_clean(img)
        img.write(0, b"x" * 5000)
        img.apply_snapshot("2")
        assert _read_all(img) == after
        img.delete_snapshot("one")
        _assert_clean(img)
        with pytest.raises(ImageError, match="no snapshot"):
            img.apply_snapshot("one")
    with Qcow2Image(p) as img:
        assert [s.name for s in img.snapshots()] == ["two"]
        assert _read_all(img) == after
        img.delete_snapshot("two")
        _assert_clean(img)
        assert img.snapshots() == []


def test_compressed_roundtrip(tmp_path: Path) -> None:
    p = str(tmp_path / "d.qcow2")
    size = 64 * 4096 + 1000
    create_qcow2(p, size, cluster_bits=12)
    expect = bytearray(size)
    with Qcow2Image(p) as img:
        for i in range(0, 65, 2):
            n = min(4096, size - i * 4096)
            d = (bytes([i]) * 300 + _pattern(i, 40)) * 20
            d = d[:n]
            img.write_compressed(i, d)
            expect[i * 4096:i * 4096 + n] = d
        img.write_compressed(3, _pattern(3, 4096))  # incompressible: stored plainly
        expect[3 * 4096:4 * 4096] = _pattern(3, 4096)
        img.write(4096 * 10 + 100, b"partial")  # copy-on-write out of a compressed cluster
        expect[4096 * 10 + 100:4096 * 10 + 107] = b"partial"
        img.discard(4096 * 20, 4096)
        expect[4096 * 20:4096 * 21] = bytes(4096)
        assert _read_all(img) == expect
        _assert_clean(img)
    with Qcow2Image(p, readonly=True) as img:
        assert _read_all(img) == expect


def test_encrypted_roundtrip(tmp_path: Path) -> None:
    p = str(tmp_path / "e.qcow2")
    create_qcow2(p, 1 << 20, encrypt_secret=b"hunter2", luks_iterations=1000)
    data = _pattern(7, 200000)
    with Qcow2Image(p, key_secret=b"hunter2") as img:
        img.write(12345, data)
        img.create_snapshot("s")
        img.write(12345 + 512, b"y" * 512)  # copy-on-write re-encrypts at the new host offset
        _assert_clean(img)
    raw = Path(p).read_bytes()
    assert data[:4096] not in raw
    with Qcow2Image(p, readonly=True, key_secret=b"hunter2") as img:
        got = _read_all(img)
        assert got[12345:12345 + 512] == data[:512]
        assert got[12345 + 512:12345 + 1024] == b"y" * 512
    with pytest.raises(ImageError, match="wrong passphrase"):
        Qcow2Image(p, key_secret=b"hunter3")
    with pytest.raises(ImageError, match="passphrase"):
        Qcow2Image(p)


def test_threads(tmp_path: Path) -> None:
    p = str(tmp_path / "d.qcow2")
    create_qcow2(p, 8 << 20, cluster_bits=12)
    with Qcow2Image(p) as img:
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                r = random.Random(k)
                base = k * (1 << 20)
                for i in range(60):
                    off = base + r.randrange(0, (1 << 20) - 10000, 512)
                    d = bytes([k + 1]) * r.randrange(512, 10000, 512)
                    img.write(off, d)
                    got = bytearray(len(d))
                    img.readinto(off, memoryview(got))
                    assert got == d
                    if i % 20 == 0:
                        img.flush()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        _assert_clean(img)


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 32])
def test_refcount_widths(tmp_path: Path, refcount_bits: int) -> None:
    p = str(tmp_path / "d.qcow2")
    create_qcow2(p, 1 << 20, cluster_bits=10, refcount_bits=refcount_bits)
    with Qcow2Image(p) as img:
        img.write(0, _pattern(1, 300000))
        if refcount_bits > 1:
            img.create_snapshot("s")
            img.write(0, b"z" * 3000)
        _assert_clean(img)
    with Qcow2Image(p) as img:
        assert _read_all(img)[3000:300000] == _pattern(1, 300000)[3000:]
        _assert_clean(img)


# ---------------------------------------------------------------- corrupt images


def _image(tmp_path: Path, write: bool = True) -> str:
    p = str(tmp_path / "c.qcow2")
    create_qcow2(p, 1 << 20, cluster_bits=12)
    if write:
        with Qcow2Image(p) as img:
            img.write(0, _pattern(1, 20000))
    return p


def _poke(p: str, off: int, data: bytes) -> None:
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, data, off)
    finally:
        os.close(fd)


@pytest.mark.parametrize("off,data,match", [
    (0, b"QFI\xfc", "magic"),
    (4, struct.pack(">I", 4), "version 4"),
    (20, struct.pack(">I", 30), "cluster_bits 30"),
    (20, struct.pack(">I", 8), "cluster_bits 8"),
    (24, struct.pack(">Q", 1 << 63), "size"),
    (32, struct.pack(">I", 1), "legacy AES"),
    (32, struct.pack(">I", 7), "crypt_method"),
    (36, struct.pack(">I", 0), "l1_size 0 too small"),
    (40, struct.pack(">Q", 4096 + 8), "l1_table_offset"),
    (40, struct.pack(">Q", 1 << 40), "L1 table"),
    (48, struct.pack(">Q", 1 << 40), "refcount table"),
    (56, struct.pack(">I", 0), "refcount_table_clusters is 0"),
    (60, struct.pack(">I", 5), "snapshots_offset"),
    (60, struct.pack(">I", 70000), "nb_snapshots 70000"),
    (72, struct.pack(">Q", 1 << 4), "extended L2 entries"),
    (72, struct.pack(">Q", 1 << 9), "unsupported incompatible feature.*bit 9"),
    (72, struct.pack(">Q", 1 << 2), "external data file"),
    (96, struct.pack(">I", 7), "refcount_order 7"),
    (100, struct.pack(">I", 107), "header_length 107"),
    (112, struct.pack(">II", 0x1234, 0x10000), "header extension"),
])
def test_corrupt_header(tmp_path: Path, off: int, data: bytes, match: str) -> None:
    p = _image(tmp_path)
    _poke(p, off, data)
    with pytest.raises(ImageError, match=match) as ei:
        Qcow2Image(p)
    assert p in str(ei.value)


def test_truncated_file(tmp_path: Path) -> None:
    p = str(tmp_path / "t.qcow2")
    Path(p).write_bytes(b"QFI\xfb\0\0")
    with pytest.raises(ImageError, match="too short"):
        Qcow2Image(p)


def test_corrupt_bit_allows_read_only(tmp_path: Path) -> None:
    p = _image(tmp_path)
    _poke(p, 72, struct.pack(">Q", 2))
    with pytest.raises(ImageError, match="corrupt"):
        Qcow2Image(p)
    with Qcow2Image(p, readonly=True) as img:
        assert _read_all(img)[:20000] == _pattern(1, 20000)


def test_dirty_bit_repairs_refcounts(tmp_path: Path) -> None:
    p = _image(tmp_path)
    with Qcow2Image(p) as img:
        rb = img._rt[0]
        data_cluster = (img._entry(1) & ((1 << 56) - 512)) // 4096
    _poke(p, rb + 2 * data_cluster, struct.pack(">H", 0))  # forget the refcount of a data cluster
    _poke(p, rb + 2 * 200, struct.pack(">H", 3))  # and invent one for a cluster no one uses
    with Qcow2Image(p, readonly=True) as img:
        r = img.check()
        assert r.corruptions and r.leaks
    _poke(p, 72, struct.pack(">Q", 1))  # the dirty bit: refcounts are not to be trusted
    with Qcow2Image(p) as img:
        assert not img.h.incompatible & 1
        _assert_clean(img)
        assert _read_all(img)[:20000] == _pattern(1, 20000)


def _l2_offset(p: str) -> tuple[int, int]:
    with Qcow2Image(p, readonly=True) as img:
        return img.h.l1_table_offset, img._l1[0] & ((1 << 56) - 512)


@pytest.mark.parametrize("entry,match", [
    (1 << 40 | 1 << 63, "beyond the end of the file"),
    (3 * 4096 + 512 | 1 << 63, "misaligned"),
    (1 << 57, "reserved bits"),
])
def test_corrupt_l1(tmp_path: Path, entry: int, match: str) -> None:
    p = _image(tmp_path)
    l1, _ = _l2_offset(p)
    _poke(p, l1, struct.pack(">Q", entry))
    with pytest.raises(ImageError, match=match):
        Qcow2Image(p, readonly=True)


def test_corrupt_l2(tmp_path: Path) -> None:
    cases = [
        (1 << 40 | 1 << 63, "beyond the end of the file"),
        (2 * 4096 + 512 | 1 << 63, "reserved bits|misaligned"),
        (4096 | 1 << 63, "overlaps metadata"),  # the refcount table
        (1 << 63, "COPIED flag on an unallocated"),
    ]
    for i, (entry, match) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        p = _image(d)
        _, l2 = _l2_offset(p)
        _poke(p, l2 + 8, struct.pack(">Q", entry))
        with Qcow2Image(p, readonly=True) as img, pytest.raises(ImageError, match=match) as ei:
            img.readinto(0, memoryview(bytearray(4096)))
        assert p in str(ei.value)


def test_refcount_disagrees(tmp_path: Path) -> None:
    """A data cluster whose refcount says free: never read, never allocated over."""
    p = _image(tmp_path)
    _, l2 = _l2_offset(p)
    with Qcow2Image(p, readonly=True) as img:
        data_cluster = (img._load_l2(l2)[0] & ((1 << 56) - 512)) // 4096
        rb = img._rt[0]
    _poke(p, rb + 2 * data_cluster, struct.pack(">H", 0))
    with Qcow2Image(p) as img:
        with pytest.raises(ImageError, match="refcount 0"):
            img.readinto(0, memoryview(bytearray(512)))
        with pytest.raises(ImageError, match="refcount"):
            img.write(0, b"x" * 512)
    _poke(p, rb + 2 * data_cluster, struct.pack(">H", 2))  # COPIED set but refcount 2
    with Qcow2Image(p) as img, pytest.raises(ImageError, match="COPIED flag but refcount 2"):
        img.readinto(0, memoryview(bytearray(512)))


def test_corrupt_compressed_cluster(tmp_path: Path) -> None:
    p = str(tmp_path / "z.qcow2")
    create_qcow2(p, 1 << 20, cluster_bits=12)
    with Qcow2Image(p) as img:
        img.write_compressed(0, b"a" * 4096)
        coff = img._entry(0) & img.coff_mask
    _poke(p, coff, b"\xff" * 16)
    with Qcow2Image(p, readonly=True) as img, pytest.raises(ImageError, match="decompress"):
        img.readinto(0, memoryview(bytearray(4096)))


class _Crash(Exception):
    pass


def _crashy_session(p: str, crash_at: int, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a workload that dies at the ``crash_at``-th fdatasync: nothing after it reaches the file."""
    calls = 0
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == crash_at:
            raise _Crash()
        real(fd)

    img = Qcow2Image(p)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    crashed = False
    try:
        img.write(0, _pattern(2, 70000))  # over a shared cluster and into new L2 tables
        img.write(300000, _pattern(3, 9000))
        img.discard(8192, 40960)
        img.flush()
        img.create_snapshot("b")
        img.write(4096 * 100, _pattern(4, 5000))
        img.delete_snapshot("a")
        img.write(0, _pattern(5, 3000))
        img.flush()
    except _Crash:
        crashed = True
    finally:
        monkeypatch.setattr(os, "fdatasync", real)
        img._close_files()  # no flush: the process is gone
    return crashed


def test_crash_at_every_barrier_leaves_no_corruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flush()'s ordering: whatever barrier a crash hits, refcounts cover every table on disk."""
    base = str(tmp_path / "base.qcow2")
    create_qcow2(base, 2 << 20, cluster_bits=12)
    with Qcow2Image(base) as img:
        img.write(0, _pattern(1, 200000))
        img.create_snapshot("a")
    golden = Path(base).read_bytes()
    p = str(tmp_path / "d.qcow2")
    k = 1
    while True:
        Path(p).write_bytes(golden)
        crashed = _crashy_session(p, k, monkeypatch)
        with Qcow2Image(p, readonly=True) as img:
            r = img.check()
            # a crash may leak clusters, or leave a COPIED flag off (a needless copy later): never
            # a refcount below what the tables use, nor a COPIED flag on a shared cluster
            bad = [c for c in r.corruptions if "COPIED flag missing" not in c]
            assert not bad, (k, bad[:5])
            _read_all(img)
        with Qcow2Image(p) as img:  # and the image goes on being usable
            img.write(4096, _pattern(6, 20000))
            assert _read_all(img)[4096:24096] == _pattern(6, 20000)
            assert not [c for c in img.check().corruptions if "COPIED flag missing" not in c]
        if not crashed:
            break
        k += 1
    assert k > 10


def test_fuzzed_metadata_read_write(tmp_path: Path) -> None:
    """Random byte flips in the metadata clusters, then reads, writes, discards and snapshot
    operations: every failure is an ImageError."""
    p = str(tmp_path / "f.qcow2")
    create_qcow2(p, 1 << 20, cluster_bits=12)
    with Qcow2Image(p) as img:
        img.write(0, _pattern(1, 300000))
        img.create_snapshot("s")
        img.write(5000, b"x" * 70000)
        img.write_compressed(100, b"a" * 4096)
        meta = sorted(img._meta | {(e & ((1 << 56) - 512)) // 4096 for e in img._l1 if e})
    orig = Path(p).read_bytes()
    r = random.Random(8)
    for _ in range(150):
        b = bytearray(orig)
        for _ in range(r.randrange(1, 5)):
            pos = r.choice(meta) * 4096 + (r.randrange(256) if r.random() < 0.7 else r.randrange(4096))
            b[pos] = r.randrange(256) if r.random() < 0.5 else b[pos] ^ 1 << r.randrange(8)
        Path(p).write_bytes(b)
        try:
            with Qcow2Image(p, readonly=r.random() < 0.3) as img:
                img.readinto(0, memoryview(bytearray(min(img.size, 1 << 20))))
                if not img.readonly:
                    img.write(r.randrange(0, min(img.size, 1 << 20) - 5000), b"z" * 5000)
                    img.discard(0, min(img.size, 200000))
                    if r.random() < 0.3:
                        img.create_snapshot("t")
                    if r.random() < 0.3 and img.snapshots():
                        img.apply_snapshot(img.snapshots()[0].id)
                    if r.random() < 0.3 and img.snapshots():
                        img.delete_snapshot(img.snapshots()[0].id)
                img.check()
        except ImageError:
            pass


def test_fuzzed_headers_never_crash(tmp_path: Path) -> None:
    """Random byte flips in the first cluster and the tables: ImageError or a consistent image."""
    p = _image(tmp_path)
    orig = Path(p).read_bytes()
    r = random.Random(4)
    for _ in range(300):
        b = bytearray(orig)
        for _ in range(r.randrange(1, 4)):
            pos = r.randrange(0, min(len(b), 5 * 4096))
            b[pos] = r.randrange(256)
        Path(p).write_bytes(b)
        try:
            with Qcow2Image(p, readonly=True) as img:
                img.readinto(0, memoryview(bytearray(min(img.size, 1 << 20))))
                img.check()
        except ImageError:
            pass
