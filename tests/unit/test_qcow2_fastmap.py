"""The qcow2 fast map that blkback's native path trusts (Qcow2Image.native_fastmap).

A model test: random writes, reads, discards, flushes and snapshots go
through the image while a second writer plays the native path, reading and
writing guest clusters straight at the host offsets the map publishes.  At
every step the map must equal what the L1/L2 tables say now (no stale entry),
what the native side reads must equal the model, and in the end the image
must read back what both wrote and pass the consistency check."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyxen.storage.qcow2 import L1E_OFFSET_MASK, Qcow2Image, create_qcow2

SIZE = 512 * 1024 + 1536


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Native:
    """What blk.c does with the map: per cluster, host offset | 1 (read) | 2 (write)."""

    def __init__(self, img: Qcow2Image) -> None:
        fm = img.native_fastmap()
        assert fm is not None
        self.img = img
        self.fd, self.cbits, self.n, _ = fm
        if img._fm_thread is not None:  # the background publication of what exists
            img._fm_thread.join()
        self.cs = 1 << self.cbits

    def _plan(self, off: int, n: int, need: int) -> list[tuple[int, int, int]] | None:
        assert self.img._fmv is not None
        out = []
        pos = 0
        while pos < n:
            g = (off + pos) >> self.cbits
            a = (off + pos) & (self.cs - 1)
            ln = min(self.cs - a, n - pos)
            e = self.img._fmv[g]
            if not e & need:
                return None
            out.append(((e & ~0x1FF) + a, pos, ln))
            pos += ln
        return out

    def read(self, off: int, n: int) -> bytes | None:
        plan = self._plan(off, n, 1)
        if plan is None:
            return None
        buf = bytearray(n)
        for host, pos, ln in plan:
            buf[pos:pos + ln] = os.pread(self.fd, ln, host)
        return bytes(buf)

    def write(self, off: int, data: bytes) -> bool:
        plan = self._plan(off, len(data), 2)
        if plan is None:
            return False
        for host, pos, ln in plan:
            os.pwrite(self.fd, data[pos:pos + ln], host)
        return True


def _truth_agrees(img: Qcow2Image) -> None:
    """Every published entry is what the tables say now."""
    fmv = img._fmv
    assert fmv is not None
    for l1i in img._fm_seen:
        l1e = img._l1[l1i]
        l2off = l1e & L1E_OFFSET_MASK
        tbl = img._load_l2(l2off) if l2off else None
        first = l1i << img.l2_bits
        for g in range(first, min(first + img.l2_entries, len(fmv))):
            want = img._fm_value(l1e, tbl[g - first]) if tbl is not None else 0
            assert fmv[g] == want, (g, hex(fmv[g]), hex(want))
    # and nothing outside the published ranges
    for g in range(len(fmv)):
        if (g >> img.l2_bits) not in img._fm_seen:
            assert fmv[g] == 0


_offsets = st.integers(0, SIZE - 1)
_op = st.one_of(
    st.tuples(st.just("w"), _offsets, st.integers(1, 20000), st.integers(0, 1 << 30)),
    st.tuples(st.just("nw"), _offsets, st.integers(1, 20000), st.integers(0, 1 << 30)),
    st.tuples(st.just("nr"), _offsets, st.integers(1, 20000), st.just(0)),
    st.tuples(st.just("d"), _offsets, st.integers(1, 40000), st.just(0)),
    st.tuples(st.just("snap"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
)


@pytest.mark.parametrize("cluster_bits,backing", [(9, False), (12, True), (10, False)])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=25))
def test_fast_map_model(tmp_path: Path, cluster_bits: int, backing: bool,
                        ops: list[tuple[str, int, int, int]]) -> None:
    for f in tmp_path.iterdir():
        f.unlink()
    path = str(tmp_path / "d.qcow2")
    data = bytearray(SIZE)
    if backing:
        base = _pattern(7, SIZE)
        (tmp_path / "base.raw").write_bytes(base)
        data[:] = base
        create_qcow2(path, SIZE, cluster_bits=cluster_bits, backing_file="base.raw", backing_format="raw")
    else:
        create_qcow2(path, SIZE, cluster_bits=cluster_bits)
    img = Qcow2Image(path)
    try:
        nat = Native(img)
        snaps = 0
        for kind, off, n, seed in ops:
            n = min(n, SIZE - off)
            if kind == "w":  # through Python (what a slow-path request does), then published
                d = _pattern(seed, n)
                img.write_vec(off, [memoryview(d)])
                data[off:off + n] = d
            elif kind == "nw":  # the native side, only where the map allows
                d = _pattern(seed, n)
                if nat.write(off, d):
                    data[off:off + n] = d
                else:
                    img.write_vec(off, [memoryview(d)])
                    data[off:off + n] = d
            elif kind == "nr":
                got = nat.read(off, n)
                if got is None:
                    buf = bytearray(n)
                    img.readinto_vec(off, [memoryview(buf)])
                    got = bytes(buf)
                assert got == data[off:off + n], f"read {off:#x}+{n:#x}"
            elif kind == "d":
                img.discard(off, n)
                cs = 1 << cluster_bits
                first, end = -(-off // cs), (off + n) // cs if off + n < SIZE else -(-SIZE // cs)
                for g in range(first, end):
                    a, b = g * cs, min((g + 1) * cs, SIZE)
                    data[a:b] = bytes(b - a)  # v3: zero clusters, even over a backing file
            elif kind == "snap":
                img.create_snapshot(f"s{snaps}")
                snaps += 1
            else:
                img.flush()
            _truth_agrees(img)
        buf = bytearray(SIZE)
        img.readinto(0, memoryview(buf))
        assert buf == data
        r = img.check()
        assert r.clean, (r.corruptions[:5], r.leaks[:5])
    finally:
        img.close()


def test_encrypted_images_have_no_fast_map(tmp_path: Path) -> None:
    path = str(tmp_path / "e.qcow2")
    create_qcow2(path, 1 << 20, encrypt_secret=b"pw")
    img = Qcow2Image(path, key_secret=b"pw")
    try:
        assert img.native_fastmap() is None
    finally:
        img.close()


def test_existing_clusters_are_published_in_the_background(tmp_path: Path) -> None:
    path = str(tmp_path / "p.qcow2")
    create_qcow2(path, 4 << 20, cluster_bits=12)
    img = Qcow2Image(path)
    img.write(0, memoryview(b"x" * (3 << 20)))
    img.close()
    img = Qcow2Image(path)
    try:
        nat = Native(img)
        assert nat.read(4096, 8192) == b"x" * 8192  # no request reached Python first
        assert nat.write(4096, b"y" * 4096)
        assert nat.read(3 << 20, 4096) is None  # never written: Python's
    finally:
        img.close()
