"""blkback against a frontend played by the test itself (so it can misbehave):
the guest's memory, grant table, event channel and xenstore nodes are written
from Python exactly as a blkfront would, and the backend is checked for
correct I/O, flush durability, read-only refusal and every malformed request
a malicious frontend could send."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyxen.backends import blkif as B
from pyxen.backends.blkback import BlkBack
from pyxen.hv import atomic
from pyxen.hv import gnttab as G
from pyxen.hv import machine as M
from pyxen.hv.domain import Domain
from pyxen.storage import BlockImage, ImageError
from pyxen.xenstore.client import XsClient
from pyxen.xenstore.server import XenstoreServer
from pyxen.xenstore.tree import XsError


class FileImage(BlockImage):
    """A plain file (the real formats have their own tests)."""

    def __init__(self, path: Path, size: int, readonly: bool = False) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT)
        os.ftruncate(self.fd, size)
        self.size, self.readonly, self.name = size, readonly, str(path)
        self.flushes = 0

    def readinto(self, offset: int, buf: memoryview) -> None:
        os.preadv(self.fd, [buf], offset)

    def write(self, offset: int, data: memoryview | bytes) -> None:
        if self.readonly:
            raise ImageError("read-only")
        os.pwritev(self.fd, [data], offset)

    def flush(self) -> None:
        self.flushes += 1
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class NativeFileImage(FileImage):
    """The same file, offered to blkback's native data path (as raw images are)."""

    def native_target(self) -> tuple[int, int] | None:
        return (self.fd, 0)


RING_PFN, DATA_PFN = 400, 410  # guest pages the "frontend" uses
# the data paths every test here runs on: blkback in Python only; the native
# ring with every request handed to Python (an image it cannot reach); the
# native ring serving plain I/O itself
PATHS = ["python", "native-ring", "native-io"]


class Front:
    """The frontend's side, in Python."""

    def __init__(self, d: Domain, xs: XsClient, devid: int = 51712) -> None:
        self.d, self.xs, self.devid = d, xs, devid
        d.gnttab.setup(1)
        self.port = d.evtchn.alloc_unbound(0)
        self.ring_off = RING_PFN * 4096
        d.machine.ram[self.ring_off:self.ring_off + 4096] = bytes(4096)
        self.grant(1, RING_PFN)
        self.req_prod = 0
        self.rsp_cons = 0
        self.fe = f"/local/domain/{d.domid}/device/vbd/{devid}"
        self.be = f"/local/domain/0/backend/vbd/{d.domid}/{devid}"

    def grant(self, ref: int, pfn: int, readonly: bool = False, domid: int = 0) -> None:
        off = self.d.machine.xenheap_offset(M.XH_GRANT) + ref * 8
        flags = G.GTF_permit_access | (G.GTF_readonly if readonly else 0)
        struct.pack_into("<HHI", self.d.machine.ram, off, flags, domid, M.MFN_BASE + pfn)

    def connect(self) -> None:
        xs = self.xs
        for k, v in (("ring-ref", "1"), ("event-channel", str(self.port)),
                     ("protocol", "x86_64-abi"), ("state", "3")):
            xs.write(f"{self.fe}/{k}", v)
        wait(lambda: xs.read(f"{self.be}/state") == "4", "backend Connected")

    def push(self, raw: bytes) -> None:
        n = B.ring_entries(1)
        off = self.ring_off + B.SRING_HDR.size + (self.req_prod % n) * B.REQ_SIZE
        self.d.machine.ram[off:off + len(raw)] = raw
        self.req_prod += 1
        # one 32-bit store, as a frontend does (struct.pack_into clears the field
        # first, and the native backend reads it from another thread meanwhile)
        atomic.store32(atomic.address_of(self.d.machine.ram) + self.ring_off, self.req_prod)
        self.d.evtchn.send(self.port)

    def rw(self, op: int, rid: int, sector: int, segs: list[tuple[int, int, int]]) -> None:
        raw = B.REQ_HDR.pack(op, len(segs), 0, rid, sector)
        raw += b"".join(B.SEG.pack(g, f, last) for g, f, last in segs)
        self.push(raw.ljust(B.REQ_SIZE, b"\0"))

    def responses(self, want: int, timeout: float = 5.0) -> list[tuple[int, int, int]]:
        n = B.ring_entries(1)
        out = []
        end = time.monotonic() + timeout
        while len(out) < want:
            prod = struct.unpack_from("<I", self.d.machine.ram, self.ring_off + 8)[0]
            while self.rsp_cons != prod:
                off = self.ring_off + B.SRING_HDR.size + (self.rsp_cons % n) * B.REQ_SIZE
                out.append(B.RSP.unpack_from(self.d.machine.ram, off))
                self.rsp_cons += 1
            if time.monotonic() > end:
                raise AssertionError(f"only {len(out)} of {want} responses")
            time.sleep(0.005)
        return out


def wait(cond, what: str, timeout: float = 5.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except XsError:
            pass
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    from pyxen import native
    from pyxen.backends import blkback
    if request.param != "python" and native.lib() is None:
        pytest.skip(f"native library unavailable: {native.why_not()}")
    monkeypatch.setattr(blkback, "NATIVE", request.param != "python")
    return str(request.param)


@contextlib.contextmanager
def backend(guest: Path, img: BlockImage, domid: int, **kw: object) -> Iterator[tuple[Domain, XsClient, Front,
                                                                                    BlkBack]]:
    """A domain (not running: the test is its frontend), a xenstored, and a
    started BlkBack for ``img``; everything is torn down afterwards."""
    from pyxen.domctl import create_domain
    from pyxen.hv.domain import DomainSpec
    sock = Path(f"/tmp/pyxen-xs-{os.getpid()}-{time.monotonic_ns()}.sock")
    server = XenstoreServer(sock).start()
    xs = XsClient(str(sock))
    d = create_domain(DomainSpec(name=f"blk{domid}", memory_mib=16, kernel=str(guest / "hello"),
                                 domid=domid), start=False)
    front = Front(d, xs)
    for node in (front.fe + "/state", front.be + "/state"):
        xs.write(node, "1")
    bb = BlkBack(d, xs, front.devid, img, vdev="xvda", **kw)  # type: ignore[arg-type]
    try:
        bb.start()
        wait(lambda: xs.read(f"{front.be}/state") == "2", "backend InitWait")
        yield d, xs, front, bb
    finally:
        bb.close()
        d.destroy()
        d.close()
        xs.close()
        server.stop()


@pytest.fixture
def setup(guest: Path, tmp_path: Path, path: str) -> Iterator[tuple[Domain, XsClient, Front, FileImage,
                                                                      BlkBack]]:
    img = (NativeFileImage if path == "native-io" else FileImage)(tmp_path / "disk.img", 8 << 20)
    with backend(guest, img, 21) as (d, xs, front, bb):
        yield d, xs, front, img, bb


def test_handshake_features(setup) -> None:  # noqa: ANN001
    d, xs, front, img, bb = setup
    be = front.be
    assert xs.read(f"{be}/sectors") == str((8 << 20) // 512)
    assert xs.read(f"{be}/sector-size") == "512"
    assert xs.read(f"{be}/feature-flush-cache") == "1"
    assert xs.read(f"{be}/feature-barrier") == "1"
    assert int(xs.read(f"{be}/feature-max-indirect-segments")) >= 11
    front.connect()
    assert bb.ring is not None


def test_write_flush_read_zero_copy(setup) -> None:  # noqa: ANN001
    d, xs, front, img, bb = setup
    front.connect()
    ram = d.machine.ram
    ram[DATA_PFN * 4096:DATA_PFN * 4096 + 4096] = bytes(range(256)) * 16
    front.grant(2, DATA_PFN, readonly=True)  # a WRITE only needs read access
    front.rw(B.OP_WRITE, 7, 100, [(2, 0, 7)])
    front.push(B.REQ_HDR.pack(B.OP_FLUSH_DISKCACHE, 0, 0, 8, 0).ljust(B.REQ_SIZE, b"\0"))
    assert front.responses(2) == [(7, B.OP_WRITE, 0), (8, B.OP_FLUSH_DISKCACHE, 0)]
    assert img.flushes >= 1
    assert os.pread(img.fd, 4096, 100 * 512) == bytes(range(256)) * 16
    # read it back into another page, sectors 2..5 only
    front.grant(3, DATA_PFN + 1)
    front.rw(B.OP_READ, 9, 100, [(3, 2, 5)])
    assert front.responses(1) == [(9, B.OP_READ, 0)]
    got = bytes(ram[(DATA_PFN + 1) * 4096 + 1024:(DATA_PFN + 1) * 4096 + 3072])
    assert got == (bytes(range(256)) * 16)[:2048]
    # status bits were released after each request
    flags = struct.unpack_from("<H", ram, d.machine.xenheap_offset(M.XH_GRANT) + 3 * 8)[0]
    assert flags == G.GTF_permit_access


def test_malicious_requests_get_errors_and_the_ring_survives(setup) -> None:  # noqa: ANN001
    d, xs, front, img, bb = setup
    front.connect()
    front.grant(2, DATA_PFN, readonly=True)
    front.grant(4, DATA_PFN, domid=33)  # granted to someone else
    front.rw(B.OP_READ, 1, 0, [(2, 0, 7)])  # READ needs a writable grant
    front.rw(B.OP_READ, 2, 0, [(4, 0, 7)])  # not granted to the backend
    front.rw(B.OP_READ, 3, 0, [(999, 0, 7)])  # beyond the grant table
    front.rw(B.OP_READ, 4, (8 << 20) // 512, [(2, 0, 0)])  # past the end of the disk
    front.rw(B.OP_READ, 5, 0, [(2, 3, 1)])  # first > last
    front.rw(B.OP_READ, 6, 0, [(2, 0, 9)])  # beyond a page
    raw = B.REQ_HDR.pack(B.OP_READ, 12, 0, 7, 0).ljust(B.REQ_SIZE, b"\0")  # 12 segments
    front.push(raw)
    front.push(struct.pack("<BxxxxxxxQ", 42, 8).ljust(B.REQ_SIZE, b"\0"))  # unknown operation
    rsp = {r[0]: r[2] for r in front.responses(8)}
    assert rsp == {1: -1, 2: -1, 3: -1, 4: -1, 5: -1, 6: -1, 7: -1, 8: -2}
    # and a good request still works
    front.grant(5, DATA_PFN)
    front.rw(B.OP_READ, 9, 0, [(5, 0, 7)])
    assert front.responses(1) == [(9, B.OP_READ, 0)]
    assert bb.stats["errors"] == 8


def test_ring_index_running_ahead_disconnects(setup) -> None:  # noqa: ANN001
    d, xs, front, img, bb = setup
    front.connect()
    struct.pack_into("<I", d.machine.ram, front.ring_off, 1000)  # req_prod far ahead
    d.evtchn.send(front.port)
    wait(lambda: xs.read(f"{front.be}/state") == "5", "backend Closing")
    assert "ran" in xs.read(f"{front.be}/error")


def test_read_only_disk_refuses_writes(guest: Path, tmp_path: Path, path: str) -> None:
    img = (NativeFileImage if path == "native-io" else FileImage)(tmp_path / "ro.img", 1 << 20)
    with backend(guest, img, 22, readonly=True) as (d, xs, front, bb):
        assert xs.read(f"{front.be}/info") == str(B.VDISK_READONLY)
        front.connect()
        front.grant(2, DATA_PFN, readonly=True)
        front.rw(B.OP_WRITE, 1, 0, [(2, 0, 7)])
        assert front.responses(1) == [(1, B.OP_WRITE, -1)]


def test_frontend_closing_and_reconnecting(setup) -> None:  # noqa: ANN001
    d, xs, front, img, bb = setup
    front.connect()
    xs.write(f"{front.fe}/state", "5")
    wait(lambda: xs.read(f"{front.be}/state") == "5", "backend Closing")
    xs.write(f"{front.fe}/state", "6")
    wait(lambda: xs.read(f"{front.be}/state") == "6", "backend Closed")
    flags = struct.unpack_from("<H", d.machine.ram, d.machine.xenheap_offset(M.XH_GRANT) + 8)[0]
    assert flags == G.GTF_permit_access  # the ring page is released
    xs.write(f"{front.fe}/state", "1")
    wait(lambda: xs.read(f"{front.be}/state") == "2", "backend InitWait again")
    front.req_prod = front.rsp_cons = 0
    d.machine.ram[front.ring_off:front.ring_off + 4096] = bytes(4096)
    front.connect()
    front.grant(2, DATA_PFN)
    front.rw(B.OP_READ, 1, 0, [(2, 0, 7)])
    assert front.responses(1) == [(1, B.OP_READ, 0)]


def test_disconnect_while_requests_are_in_flight(setup) -> None:  # noqa: ANN001
    """The frontend closes with requests queued: the backend finishes or drops
    them without touching the unmapped ring, and the grants are all released."""
    d, xs, front, img, bb = setup
    front.connect()
    for i in range(8):
        front.grant(10 + i, DATA_PFN + i)
    for i in range(24):
        front.rw(B.OP_READ, i, i * 8, [(10 + i % 8, 0, 7)])
    xs.write(f"{front.fe}/state", "5")
    wait(lambda: xs.read(f"{front.be}/state") == "5", "backend Closing")
    time.sleep(0.2)
    assert not any("memoryview" in line or "Traceback" in line for line in d.dmesg), d.dmesg
    base = d.machine.xenheap_offset(M.XH_GRANT)
    for ref in [1] + list(range(10, 18)):
        flags = struct.unpack_from("<H", d.machine.ram, base + ref * 8)[0]
        assert flags == G.GTF_permit_access, (ref, flags)


def indirect(front: Front, op: int, rid: int, sector: int, ind_refs: list[int], nseg: int) -> None:
    raw = B.INDIRECT.pack(B.OP_INDIRECT, op, nseg, rid, sector, 0, *(ind_refs + [0] * 8)[:8])
    front.push(raw.ljust(B.REQ_SIZE, b"\0"))


IND_PFN = 440  # the indirect page


def test_indirect_requests_and_bad_segments_inside(setup) -> None:  # noqa: ANN001
    """INDIRECT reads of 16 pages land in the right places; a bad grant or a
    bad sector range inside the indirect page, or too many segments, is an
    error for that request only."""
    d, xs, front, img, bb = setup
    front.connect()
    ram = d.machine.ram
    pattern = bytes((i * 7 + i // 4096) & 0xFF for i in range(16 * 4096))
    os.pwrite(img.fd, pattern, 64 * 512)
    for i in range(16):
        front.grant(20 + i, DATA_PFN + i)
    front.grant(40, IND_PFN, readonly=True)
    ind = IND_PFN * 4096
    for i in range(16):
        B.SEG.pack_into(ram, ind + i * 8, 20 + i, 0, 7)
    indirect(front, B.OP_READ, 1, 64, [40], 16)
    assert front.responses(1) == [(1, B.OP_READ, 0)]
    assert bytes(ram[DATA_PFN * 4096:(DATA_PFN + 16) * 4096]) == pattern
    B.SEG.pack_into(ram, ind + 5 * 8, 999, 0, 7)  # a ref beyond the table
    indirect(front, B.OP_READ, 2, 64, [40], 16)
    B.SEG.pack_into(ram, ind + 5 * 8, 25, 6, 2)  # first > last
    indirect(front, B.OP_READ, 3, 64, [40], 16)
    indirect(front, B.OP_READ, 4, 64, [40], B.MAX_INDIRECT_SEGMENTS + 1)
    indirect(front, B.OP_READ, 5, 64, [41], 16)  # the indirect page is not granted
    assert {r[0]: r[2] for r in front.responses(4)} == {2: -1, 3: -1, 4: -1, 5: -1}
    B.SEG.pack_into(ram, ind + 5 * 8, 25, 0, 7)
    indirect(front, B.OP_READ, 6, 64, [40], 16)
    assert front.responses(1) == [(6, B.OP_READ, 0)]
    base = d.machine.xenheap_offset(M.XH_GRANT)
    for ref in [40] + list(range(20, 36)):  # every hold was dropped
        assert struct.unpack_from("<H", ram, base + ref * 8)[0] & (G.GTF_reading | G.GTF_writing) == 0


def test_many_in_flight_and_nothing_reorders_across_a_flush(setup) -> None:  # noqa: ANN001
    """A ring full of writes, a flush, then reads: every write is answered
    before the flush, the reads see the data, and the image was flushed."""
    d, xs, front, img, bb = setup
    front.connect()
    ram = d.machine.ram
    for i in range(16):
        ram[(DATA_PFN + i) * 4096:(DATA_PFN + i + 1) * 4096] = bytes([i + 1]) * 4096
        front.grant(20 + i, DATA_PFN + i, readonly=True)
    for i in range(24):
        front.rw(B.OP_WRITE, i, i * 8, [(20 + i % 16, 0, 7)])
    front.push(B.REQ_HDR.pack(B.OP_FLUSH_DISKCACHE, 0, 0, 100, 0).ljust(B.REQ_SIZE, b"\0"))
    rsp = front.responses(25)
    assert sorted(r[0] for r in rsp) == list(range(24)) + [100]
    assert rsp[-1] == (100, B.OP_FLUSH_DISKCACHE, 0), rsp[-3:]
    assert all(r[2] == 0 for r in rsp)
    assert img.flushes >= 1
    for i in range(24):
        assert os.pread(img.fd, 4096, i * 8 * 512) == bytes([i % 16 + 1]) * 4096
    front.grant(50, DATA_PFN + 20)
    front.rw(B.OP_READ, 200, 5 * 8, [(50, 0, 7)])
    assert front.responses(1) == [(200, B.OP_READ, 0)]
    assert bytes(ram[(DATA_PFN + 20) * 4096:(DATA_PFN + 21) * 4096]) == bytes([6]) * 4096


def test_native_path_serves_plain_io_itself(setup, path: str) -> None:  # noqa: ANN001
    """With an image it can reach, the native path answers plain reads and
    writes without Python (its counters say so); otherwise Python does."""
    d, xs, front, img, bb = setup
    front.connect()
    front.grant(2, DATA_PFN)
    for i in range(10):
        front.rw(B.OP_READ if i % 2 else B.OP_WRITE, i, i * 8, [(2, 0, 7)])
    assert all(r[2] == 0 for r in front.responses(10))
    st = bb.stats
    assert st["native"] == (path != "python")
    if path == "native-io":
        assert st["native_to_python"] == 0 and st["reads"] == 5 and st["writes"] == 5
    elif path == "native-ring":
        assert st["native_to_python"] == 10


def test_raw_image_truncated_under_a_mapped_read(guest: Path, tmp_path: Path) -> None:
    """The native path reads raw images through a mapping of the file: a read
    past the end of a file someone truncated faults (SIGBUS), which must come
    back as the raw format's answer (zeros), never kill the process."""
    from pyxen import native
    from pyxen.storage.raw import RawImage
    if native.lib() is None:
        pytest.skip(f"native library unavailable: {native.why_not()}")
    p = tmp_path / "raw.img"
    p.write_bytes(b"\x5a" * (4 << 20))
    faulthandler.enable()  # takes SIGBUS over; connecting puts ours back in front of it
    with backend(guest, RawImage(p), 23) as (d, xs, front, bb):
        front.connect()
        assert bb.stats["native"] == 1
        front.grant(2, DATA_PFN)
        front.rw(B.OP_READ, 1, 4096, [(2, 0, 7)])  # 2 MiB in
        assert front.responses(1) == [(1, B.OP_READ, 0)]
        assert bytes(d.machine.ram[DATA_PFN * 4096:(DATA_PFN + 1) * 4096]) == b"\x5a" * 4096
        os.truncate(p, 1 << 20)
        front.rw(B.OP_READ, 2, 4096, [(2, 0, 7)])
        assert front.responses(1) == [(2, B.OP_READ, 0)]
        assert bytes(d.machine.ram[DATA_PFN * 4096:(DATA_PFN + 1) * 4096]) == bytes(4096)
        assert bb.stats["native_to_python"] >= 1


def test_persistent_grants_are_kept_until_the_ring_goes(setup) -> None:  # noqa: ANN001
    """Both ends say feature-persistent: a grant stays held (status bits set)
    between requests and is reused; disconnecting drops every hold."""
    d, xs, front, img, bb = setup
    assert xs.read(f"{front.be}/feature-persistent") == "1"
    xs.write(f"{front.fe}/feature-persistent", "1")
    front.connect()
    ram = d.machine.ram
    base = d.machine.xenheap_offset(M.XH_GRANT)
    for i in range(4):
        front.grant(20 + i, DATA_PFN + i)
    os.pwrite(img.fd, b"\x11" * 4096 * 4, 0)
    for rnd in range(3):
        for i in range(4):
            front.rw(B.OP_READ, rnd * 10 + i, i * 8, [(20 + i, 0, 7)])
        assert all(r[2] == 0 for r in front.responses(4))
    assert bytes(ram[DATA_PFN * 4096:(DATA_PFN + 4) * 4096]) == b"\x11" * 4096 * 4
    assert bb.stats["persistent"] == 1 and bb.stats["persistent_grants"] == 4
    for i in range(4):  # still held after the responses
        assert struct.unpack_from("<H", ram, base + (20 + i) * 8)[0] & G.GTF_reading
    # a read-only grant is held read-only; a READ into it is refused, not written
    front.grant(30, DATA_PFN + 8, readonly=True)
    front.rw(B.OP_WRITE, 50, 64, [(30, 0, 7)])
    front.rw(B.OP_READ, 51, 64, [(30, 0, 7)])
    assert {r[0]: r[2] for r in front.responses(2)} == {50: 0, 51: -1}
    xs.write(f"{front.fe}/state", "5")
    wait(lambda: xs.read(f"{front.be}/state") == "5", "backend Closing")
    for ref in (20, 21, 22, 23, 30):
        flags = struct.unpack_from("<H", ram, base + ref * 8)[0]
        assert flags & (G.GTF_reading | G.GTF_writing) == 0, (ref, flags)
