"""Raw images (pyxen.storage.raw) and open_image's rules for local files."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from pyxen.storage import ImageError
from pyxen.storage.open import open_image
from pyxen.storage.raw import RawImage
from pyxen.toolstack.xlcfg import parse_disk_spec

MiB = 1 << 20


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(4 * MiB)
    return p


def test_size_and_holes_read_as_zeros(img: Path) -> None:
    with RawImage(img) as d:
        assert d.size == 4 * MiB and d.sector_size == 512 and not d.readonly
        buf = bytearray(b"\xff" * 8192)
        d.readinto(MiB, memoryview(buf))
        assert buf == bytes(8192)


def test_write_read_round_trip_lands_in_the_file(img: Path) -> None:
    data = os.urandom(64 * 1024)
    with RawImage(img) as d:
        d.write(512, data)
        d.write(3 * MiB, memoryview(data)[:4096])
        back = bytearray(len(data))
        d.readinto(512, memoryview(back))
        assert back == data
        d.flush()
    raw = img.read_bytes()
    assert raw[512:512 + len(data)] == data
    assert raw[3 * MiB:3 * MiB + 4096] == data[:4096]
    assert raw[:512] == bytes(512)


def test_readinto_fills_the_callers_buffer_in_place(img: Path) -> None:
    """Reads go straight into guest memory: a slice of a larger buffer, typed views too."""
    with RawImage(img) as d:
        d.write(0, b"\x01\x02\x03\x04" * 1024)
        page = bytearray(3 * 4096)
        d.readinto(0, memoryview(page)[4096:8192])
        assert page[:4096] == bytes(4096) and page[8192:] == bytes(4096)
        assert page[4096:8192] == b"\x01\x02\x03\x04" * 1024
        words = (ctypes.c_uint32 * 1024)()
        d.readinto(0, memoryview(words))
        assert bytes(words) == b"\x01\x02\x03\x04" * 1024
        d.write(4096, memoryview(words))
        assert img.read_bytes()[4096:8192] == bytes(words)


@pytest.mark.parametrize("offset,length", [(4 * MiB - 512, 1024), (4 * MiB, 512), (-512, 512),
                                           (8 * MiB, 512)])
def test_beyond_the_end_is_refused(img: Path, offset: int, length: int) -> None:
    with RawImage(img) as d:
        with pytest.raises(ImageError, match="beyond the end"):
            d.readinto(offset, memoryview(bytearray(length)))
        with pytest.raises(ImageError, match="beyond the end"):
            d.write(offset, bytes(length))
        with pytest.raises(ImageError, match="beyond the end"):
            d.discard(offset, length)
    assert img.stat().st_size == 4 * MiB


def test_last_sector_is_reachable(img: Path) -> None:
    with RawImage(img) as d:
        d.write(4 * MiB - 512, b"z" * 512)
        buf = bytearray(512)
        d.readinto(4 * MiB - 512, memoryview(buf))
        assert buf == b"z" * 512


def test_readonly_refuses_writes_and_discards(img: Path) -> None:
    with RawImage(img, readonly=True) as d:
        assert d.readonly and not d.supports_discard
        with pytest.raises(ImageError, match="read-only"):
            d.write(0, b"x" * 512)
        with pytest.raises(ImageError, match="read-only"):
            d.discard(0, 4096)
        d.flush()  # nothing to make durable, not an error
        buf = bytearray(512)
        d.readinto(0, memoryview(buf))
    assert img.read_bytes() == bytes(4 * MiB)


def test_readonly_opens_a_file_without_write_permission(img: Path) -> None:
    img.chmod(0o444)
    with RawImage(img, readonly=True) as d:
        assert d.size == 4 * MiB


def test_discard_punches_a_hole(tmp_path: Path) -> None:
    p = tmp_path / "dense.img"
    p.write_bytes(os.urandom(2 * MiB))
    with RawImage(p) as d:
        assert d.supports_discard
        before = os.stat(p).st_blocks
        d.discard(MiB // 2, MiB)
        buf = bytearray(MiB)
        d.readinto(MiB // 2, memoryview(buf))
        assert d.size == 2 * MiB
        if d.supports_discard:  # the filesystem could punch: the range reads zeros, space is freed
            assert buf == bytes(MiB)
            assert os.stat(p).st_blocks < before
    assert p.stat().st_size == 2 * MiB  # KEEP_SIZE


def test_zero_length_requests_are_no_ops(img: Path) -> None:
    with RawImage(img) as d:
        d.readinto(4 * MiB, memoryview(bytearray()))
        d.write(0, b"")
        d.discard(0, 0)


def test_concurrent_writers_and_readers(img: Path) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            block = bytes([i + 1]) * 4096
            back = bytearray(4096)
            for k in range(64):
                off = (i * 64 + k) * 4096
                d.write(off, block)
                d.readinto(off, memoryview(back))
                assert back == block
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with RawImage(img) as d:
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors
    raw = img.read_bytes()
    for i in range(8):
        assert raw[i * 64 * 4096:(i + 1) * 64 * 4096] == bytes([i + 1]) * (64 * 4096)


def test_closed_image_refuses_io(img: Path) -> None:
    d = RawImage(img)
    d.close()
    d.close()  # idempotent
    with pytest.raises(ImageError, match="closed"):
        d.readinto(0, memoryview(bytearray(512)))
    with pytest.raises(ImageError, match="closed"):
        d.flush()


def test_open_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="missing.img.*ENOENT"):
        RawImage(tmp_path / "missing.img")
    with pytest.raises(ImageError, match="not a regular file or a block device"):
        RawImage(tmp_path, readonly=True)
    with pytest.raises(ImageError, match="/dev/null: not a regular file or a block device"):
        RawImage("/dev/null")


def test_direct_io_is_optional(img: Path) -> None:
    try:
        d = RawImage(img, direct=True)
    except ImageError as e:  # tmpfs has no O_DIRECT: the message says so
        assert "O_DIRECT" in str(e)
        return
    with d:
        buf = mmap_aligned(4096)
        d.write(0, buf)
        d.readinto(0, buf)


def mmap_aligned(n: int) -> memoryview:
    import mmap
    m = mmap.mmap(-1, n)
    m.write(b"d" * n)
    return memoryview(m)


def test_block_device_size_via_ioctl() -> None:
    dev = Path("/dev/loop0")
    if not dev.exists():
        pytest.skip("no block device to try BLKGETSIZE64 on")
    try:
        d = RawImage(dev, readonly=True)
    except ImageError as e:
        pytest.skip(f"cannot open {dev}: {e}")
    with d:
        assert d.is_block_device and d.size >= 0


# --- open_image ------------------------------------------------------------------------


def test_open_image_raw(img: Path) -> None:
    spec = parse_disk_spec(f"format=raw, vdev=xvda, access=rw, target={img}")
    with open_image(spec) as d:
        assert isinstance(d, RawImage) and not d.readonly and d.size == 4 * MiB
    spec = parse_disk_spec(f"format=raw, vdev=xvdb, access=ro, target={img}")
    with open_image(spec) as d:
        assert d.readonly


def test_open_image_cdrom_is_readonly(img: Path) -> None:
    spec = parse_disk_spec(f"{img},raw,hdc:cdrom,r")
    with open_image(spec) as d:
        assert d.readonly


def test_open_image_errors_name_the_disk(tmp_path: Path, img: Path) -> None:
    with pytest.raises(ImageError, match=r"disk xvda \('.*nope.img'\): no such file"):
        open_image(parse_disk_spec(f"vdev=xvda, target={tmp_path / 'nope.img'}"))
    with pytest.raises(ImageError, match="empty CD-ROM"):
        open_image(parse_disk_spec(",,hdc:cdrom,r"))
    with pytest.raises(ImageError, match="vhd.*not supported"):
        open_image(parse_disk_spec(f"format=vhd, vdev=xvda, target={img}"))
    with pytest.raises(ImageError, match="block scripts"):
        open_image(parse_disk_spec(f"vdev=xvda, script=block-iscsi, target={img}"))
    with pytest.raises(ImageError, match="format=raw"):
        open_image(parse_disk_spec("format=qcow2, vdev=xvda, target=nbd://127.0.0.1:1/x"))
    with pytest.raises(ImageError, match=r"disk xvda \('nbd://127.0.0.1:1/x'\): .*cannot connect"):
        open_image(parse_disk_spec("vdev=xvda, target=nbd://127.0.0.1:1/x"), nbd_timeout=2)


def test_open_image_qcow2_is_lazy_and_gets_its_secret(img: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qcow2 comes from pyxen.storage.qcow2 (imported when needed); the key by vdev, target, then path."""
    calls: list[dict[str, object]] = []

    class FakeQcow2:
        def __init__(self, path: Path, readonly: bool = False, key_secret: bytes | None = None) -> None:
            calls.append({"path": path, "readonly": readonly, "key": key_secret})

    mod = types.ModuleType("pyxen.storage.qcow2")
    mod.Qcow2Image = FakeQcow2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyxen.storage.qcow2", mod)
    spec = parse_disk_spec(f"format=qcow2, vdev=xvdc, access=ro, target={img}")
    open_image(spec)
    open_image(spec, {"xvdc": b"by-vdev", str(img): b"by-target"})
    open_image(spec, {"xvdz": b"other", str(img): b"by-target"})
    assert [c["key"] for c in calls] == [None, b"by-vdev", b"by-target"]
    assert all(c["readonly"] is True and str(c["path"]) == str(img) for c in calls)


def test_open_image_qcow2_made_by_qemu_img(tmp_path: Path) -> None:
    pytest.importorskip("pyxen.storage.qcow2")
    if shutil.which("qemu-img") is None:
        pytest.skip("SKIPPED LOUDLY: qemu-img is not installed (apt-get install qemu-utils)")
    p = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "8M"], check=True, timeout=30)
    with open_image(parse_disk_spec(f"format=qcow2, vdev=xvda, target={p}")) as d:
        assert d.size == 8 * MiB and not d.readonly
        d.write(4096, b"q" * 512)
        d.flush()
        buf = bytearray(512)
        d.readinto(4096, memoryview(buf))
        assert buf == b"q" * 512
