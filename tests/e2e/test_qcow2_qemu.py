"""qcow2 interoperability with QEMU's own tools, both ways.

qemu-img (and qemu-io) create, compress, snapshot and check images; pyxen
reads and writes them; ``qemu-img check`` must stay clean and ``qemu-img
convert -O raw`` must give exactly the bytes the test expects.  The same the
other way round for images pyxen creates.  Skips LOUDLY without qemu-utils.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from pyxen.storage.qcow2 import Qcow2Image, create_qcow2

PASS = "correct horse"


@pytest.fixture(scope="module", autouse=True)
def _qemu_img() -> None:
    missing = [t for t in ("qemu-img", "qemu-io") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"SKIPPED LOUDLY: {', '.join(missing)} not installed (apt-get install qemu-utils); "
                    f"qcow2 interoperability with QEMU is NOT tested")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def _ok(*args: str) -> str:
    r = _run(*args)
    assert r.returncode == 0, f"{' '.join(args)}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _enc_opts(path: Path) -> list[str]:
    return ["--object", f"secret,id=sec0,data={PASS}", "--image-opts",
            f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"]


def qemu_check(path: Path, encrypted: bool = False) -> None:
    args = ["qemu-img", "check", "--output=json"]
    args += _enc_opts(path) if encrypted else [str(path)]
    r = _run(*args)
    assert r.returncode == 0, f"qemu-img check {path}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    info = json.loads(r.stdout)
    assert not info.get("corruptions") and not info.get("leaks"), info


def qemu_raw(path: Path, tmp: Path, encrypted: bool = False) -> bytes:
    out = tmp / (path.name + ".raw")
    args = ["qemu-img", "convert", "-O", "raw"]
    args += _enc_opts(path) if encrypted else [str(path)]
    _ok(*args, str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def _read_all(img: Qcow2Image) -> bytes:
    buf = bytearray(img.size)
    img.readinto(0, memoryview(buf))
    return bytes(buf)


def _scribble(img: Qcow2Image, model: bytearray, seed: int, n: int = 40) -> None:
    """Random writes (and a few discards) through pyxen, mirrored in ``model``."""
    r = random.Random(seed)
    cs = img.cs
    for _ in range(n):
        off = r.randrange(0, img.size - 1, 512)
        ln = min(r.randrange(512, 200 * 1024, 512), img.size - off)
        if r.random() < 0.15:
            img.discard(off, ln)
            first, end = -(-off // cs), (off + ln) // cs
            for g in range(first, end):
                a, b = g * cs, min((g + 1) * cs, img.size)
                if img.h.version == 2 and img.backing is not None:
                    continue  # no zero flag in v2: the backing file shows through again
                model[a:b] = bytes(b - a)
            if img.h.version == 2 and img.backing is not None:
                bk = bytearray(img.size)
                img.readinto(0, memoryview(bk))
                model[:] = bk
            continue
        d = r.randbytes(ln)
        img.write(off, d)
        model[off:off + ln] = d


SIZE = 8 << 20


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "cluster_size=4096", "refcount_bits=8",
                                  "cluster_size=2M", "lazy_refcounts=on"])
def test_qemu_created_plain(tmp_path: Path, opts: str) -> None:
    p = tmp_path / "q.qcow2"
    _ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(p), str(SIZE))
    model = bytearray(SIZE)
    with Qcow2Image(str(p)) as img:
        _scribble(img, model, 1)
        assert _read_all(img) == model
    qemu_check(p)
    assert qemu_raw(p, tmp_path) == model
    with Qcow2Image(str(p)) as img:  # again after reopening, on top of what is there
        _scribble(img, model, 2)
    qemu_check(p)
    assert qemu_raw(p, tmp_path) == model


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_qemu_created_with_backing(tmp_path: Path, compat: str) -> None:
    base = tmp_path / "base.raw"
    base_data = random.Random(3).randbytes(SIZE - 3 * 4096)
    base.write_bytes(base_data)
    p = tmp_path / "top.qcow2"
    _ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}", "-b", "base.raw", "-F", "raw",
        str(p), str(SIZE))
    model = bytearray(base_data.ljust(SIZE, b"\0"))
    with Qcow2Image(str(p)) as img:
        assert _read_all(img) == model
        _scribble(img, model, 4)
        assert _read_all(img) == model
    qemu_check(p)
    assert qemu_raw(p, tmp_path) == model
    assert base.read_bytes() == base_data


def test_qemu_created_luks(tmp_path: Path) -> None:
    p = tmp_path / "e.qcow2"
    for _ in range(5):  # qemu's PBKDF2 benchmark fails now and then on short iter-times
        r = _run("qemu-img", "create", "-q", "-f", "qcow2", "--object", f"secret,id=sec0,data={PASS}",
                 "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100", str(p), str(SIZE))
        if r.returncode == 0:
            break
    assert r.returncode == 0, r.stderr
    _ok("qemu-io", "--object", f"secret,id=sec0,data={PASS}", "--image-opts",
        f"driver=qcow2,file.filename={p},encrypt.key-secret=sec0", "-c", "write -P 0x5a 65536 200k")
    model = bytearray(SIZE)
    model[65536:65536 + 200 * 1024] = b"\x5a" * (200 * 1024)
    with Qcow2Image(str(p), key_secret=PASS.encode()) as img:
        assert _read_all(img) == model
        _scribble(img, model, 5, n=15)
    qemu_check(p, encrypted=True)
    assert qemu_raw(p, tmp_path, encrypted=True) == model
    with pytest.raises(Exception, match="wrong passphrase"):
        Qcow2Image(str(p), key_secret=b"not it")


def test_qemu_zero_clusters_and_compression(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    r = random.Random(6)
    data = bytearray()
    for i in range(SIZE // 65536):
        chunk = bytes([i % 256]) * 30000 + r.randbytes(100) if i % 3 else r.randbytes(65536)
        data += chunk.ljust(65536, b"\0")
    src.write_bytes(data)
    p = tmp_path / "c.qcow2"
    _ok("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(p))
    _ok("qemu-io", "-c", "write -z 131072 65536", "-c", "write -z 200000 1000", str(p))
    data[131072:196608] = bytes(65536)
    data[200000:201000] = bytes(1000)
    with Qcow2Image(str(p)) as img:
        assert _read_all(img) == data
        model = bytearray(data)
        _scribble(img, model, 7)  # copy-on-write out of compressed clusters
        assert _read_all(img) == model
    qemu_check(p)
    assert qemu_raw(p, tmp_path) == model


@pytest.mark.parametrize("version", [2, 3])
def test_pyxen_created_plain_and_backing(tmp_path: Path, version: int) -> None:
    p = tmp_path / "p.qcow2"
    create_qcow2(str(p), SIZE, version=version)
    qemu_check(p)
    assert qemu_raw(p, tmp_path) == bytes(SIZE)
    model = bytearray(SIZE)
    with Qcow2Image(str(p)) as img:
        _scribble(img, model, 8)
    qemu_check(p)
    assert qemu_raw(p, tmp_path) == model
    info = json.loads(_ok("qemu-img", "info", "--output=json", str(p)))
    assert info["format-specific"]["data"]["compat"] == ("1.1" if version == 3 else "0.10")

    top = tmp_path / "sub" / "top.qcow2"
    top.parent.mkdir()
    create_qcow2(str(top), backing_file="../p.qcow2", version=version)
    tmodel = bytearray(model)
    with Qcow2Image(str(top)) as img:
        assert img.size == SIZE
        _scribble(img, tmodel, 9)
    qemu_check(top)
    assert qemu_raw(top, tmp_path) == tmodel
    assert qemu_raw(p, tmp_path) == model


def test_pyxen_created_encrypted(tmp_path: Path) -> None:
    p = tmp_path / "e.qcow2"
    create_qcow2(str(p), SIZE, encrypt_secret=PASS.encode(), luks_iterations=2000)
    model = bytearray(SIZE)
    with Qcow2Image(str(p), key_secret=PASS.encode()) as img:
        _scribble(img, model, 10, n=15)
    qemu_check(p, encrypted=True)
    assert qemu_raw(p, tmp_path, encrypted=True) == model
    info = json.loads(_ok("qemu-img", "info", "--output=json", str(p)))
    enc = info["format-specific"]["data"]["encrypt"]
    assert enc["format"] == "luks" and enc["cipher-alg"] == "aes-256" and enc["cipher-mode"] == "xts"
    # and what qemu writes into pyxen's encrypted image, pyxen reads
    _ok("qemu-io", "--object", f"secret,id=sec0,data={PASS}", "--image-opts",
        f"driver=qcow2,file.filename={p},encrypt.key-secret=sec0", "-c", "write -P 0x33 1m 70k")
    model[1 << 20:(1 << 20) + 70 * 1024] = b"\x33" * (70 * 1024)
    with Qcow2Image(str(p), readonly=True, key_secret=PASS.encode()) as img:
        assert _read_all(img) == model


def test_pyxen_compressed_writes(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    create_qcow2(str(p), SIZE)
    model = bytearray(SIZE)
    with Qcow2Image(str(p)) as img:
        for i in range(0, SIZE // 65536, 3):
            d = (bytes([i]) * 1000 + bytes(range(256))) * 60
            d = d[:65536]
            img.write_compressed(i, d)
            model[i * 65536:(i + 1) * 65536] = d
        img.write(3 * 65536 + 5, b"over a compressed cluster")
        model[3 * 65536 + 5:3 * 65536 + 30] = b"over a compressed cluster"
    qemu_check(p)
    assert qemu_raw(p, tmp_path) == model
    info = json.loads(_ok("qemu-img", "check", "--output=json", str(p)))
    assert info.get("compressed-clusters", 0) > 10


def test_refcount_growth_passes_qemu_check(tmp_path: Path) -> None:
    p = tmp_path / "g.qcow2"
    create_qcow2(str(p), 4 << 20, cluster_bits=9, refcount_bits=64)
    data = random.Random(11).randbytes(4 << 20)
    with Qcow2Image(str(p)) as img:
        for off in range(0, 4 << 20, 128 * 1024):
            img.write(off, data[off:off + 128 * 1024])
    qemu_check(p)
    assert qemu_raw(p, tmp_path) == data


def _qemu_snapshots(p: Path) -> list[str]:
    out = _ok("qemu-img", "snapshot", "-l", str(p))
    return [line.split()[1] for line in out.splitlines()[2:] if line.strip()]


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_snapshots_both_ways(tmp_path: Path, compat: str) -> None:
    p = tmp_path / "s.qcow2"
    _ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}", str(p), str(SIZE))
    m0 = bytearray(SIZE)
    with Qcow2Image(str(p)) as img:
        _scribble(img, m0, 12)
    _ok("qemu-img", "snapshot", "-c", "by-qemu", str(p))
    m1 = bytearray(m0)
    with Qcow2Image(str(p)) as img:
        assert [s.name for s in img.snapshots()] == ["by-qemu"]
        _scribble(img, m1, 13)
        img.create_snapshot("by-pyxen")
        m2 = bytearray(m1)
        _scribble(img, m2, 14)
    qemu_check(p)
    assert _qemu_snapshots(p) == ["by-qemu", "by-pyxen"]
    assert qemu_raw(p, tmp_path) == m2
    _ok("qemu-img", "snapshot", "-a", "by-pyxen", str(p))
    qemu_check(p)
    assert qemu_raw(p, tmp_path) == m1
    with Qcow2Image(str(p)) as img:
        assert _read_all(img) == m1
        img.apply_snapshot("by-qemu")
        assert _read_all(img) == m0
        _scribble(img, m0, 15)
    qemu_check(p)
    assert qemu_raw(p, tmp_path) == m0
    _ok("qemu-img", "snapshot", "-d", "by-pyxen", str(p))
    qemu_check(p)
    with Qcow2Image(str(p)) as img:
        assert [s.name for s in img.snapshots()] == ["by-qemu"]
        img.delete_snapshot("by-qemu")
        assert img.check().clean
    qemu_check(p)
    assert _qemu_snapshots(p) == []
    assert qemu_raw(p, tmp_path) == m0
