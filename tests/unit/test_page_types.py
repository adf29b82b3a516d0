"""The page-type protocol shared by a domain's FrameTable, grant maps/copies in
any process and the native backend threads (issue 8, finding 1): a frame
that is a page table or descriptor page cannot be held writable, and a frame
held writable cannot become one.  Every test here would pass a writable use
of a page table on the code before the fix (there was no shared type state)."""

from __future__ import annotations

import ctypes
import struct
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from pyxen import native
from pyxen.abi import XenError
from pyxen.hv import atomic
from pyxen.hv.interdomain import TW_HOLD, ActiveGrants, TypeWords
from pyxen.hv.mm import PGT_L1, PGT_L2, PGT_SEG, PGT_WRITABLE, FrameTable

BASE, N, REFS = 0x100000, 32, 64


class World:
    """One domain's RAM, type words and active entries, and its FrameTable."""

    def __init__(self) -> None:
        self.mem = bytearray(N * 4096)
        self.tw_buf = (ctypes.c_uint32 * N)()
        self.ae_buf = (ctypes.c_uint64 * REFS)()
        self.types = TypeWords(ctypes.addressof(self.tw_buf), N - 4)  # last 4: "Xen-heap"
        self.active = ActiveGrants(ctypes.addressof(self.ae_buf), REFS, self.types)

        def write(maddr: int, val: int, old: int | None) -> None:
            struct.pack_into("<Q", self.mem, maddr - (BASE << 12), val)

        self.ft = FrameTable(self.mem, BASE, N, write, types=self.types)

    def put(self, mfn: int, idx: int, val: int) -> None:
        struct.pack_into("<Q", self.mem, (mfn - BASE) * 4096 + idx * 8, val)


@pytest.fixture
def w() -> World:
    return World()


def test_pinned_page_table_cannot_be_held_writable(w: World) -> None:
    w.ft.pin(BASE + 3, PGT_L1)
    assert w.types.word(3) == PGT_L1
    assert not w.types.hold(3)
    w.ft.unpin(BASE + 3)
    assert w.types.word(3) == 0
    assert w.types.hold(3)
    assert w.types.word(3) == TW_HOLD


def test_frame_held_writable_cannot_be_pinned_or_used_as_gdt(w: World) -> None:
    assert w.types.hold(5)
    for t in (PGT_L1, PGT_L2, PGT_SEG):
        with pytest.raises(XenError) as e:
            w.ft.get_type(BASE + 5, t)
        assert e.value.errno == 22
    assert w.ft.type_of(BASE + 5) == (0, 0)  # nothing half-done
    w.ft.get_type(BASE + 5, PGT_WRITABLE)  # the owner's own writable use is fine
    w.ft.put_type(BASE + 5)
    w.types.unhold(5)
    w.ft.pin(BASE + 5, PGT_L1)


def test_validation_claims_the_tables_below_and_releases_them(w: World) -> None:
    w.put(BASE + 2, 0, ((BASE + 3) << 12) | 0x7)  # L2[0] -> L1 at frame 3
    w.ft.pin(BASE + 2, PGT_L2)
    assert w.types.word(3) == PGT_L1 and not w.types.hold(3)
    w.ft.unpin(BASE + 2)
    assert w.types.word(2) == 0 and w.types.word(3) == 0


def test_validation_failure_gives_the_claim_back(w: World) -> None:
    w.put(BASE + 4, 0, ((BASE + 9) << 12) | 0x7)
    assert w.types.hold(9)  # the L1 below is held writable by a grant
    with pytest.raises(XenError):
        w.ft.pin(BASE + 4, PGT_L2)
    assert w.types.word(4) == 0  # the L2's claim was undone
    assert w.types.word(9) == TW_HOLD


def test_rw_mapping_in_own_l1_does_not_publish(w: World) -> None:
    w.put(BASE + 6, 0, ((BASE + 7) << 12) | 0x3)  # RW mapping of frame 7
    w.ft.pin(BASE + 6, PGT_L1)
    assert w.ft.type_of(BASE + 7) == (PGT_WRITABLE, 1)
    assert w.types.word(7) == 0 and w.types.hold(7)  # Xen: many writable refs may coexist


def test_frames_outside_ram_never_take_a_page_table_type(w: World) -> None:
    with pytest.raises(XenError):  # shared_info, grant frames: writable Xen-heap pages
        w.ft.pin(BASE + N - 2, PGT_L1)


def test_active_entry_latches_the_frame_and_one_holder(w: World) -> None:
    assert w.active.hold(3, me=7, pfn=10) == 10
    assert w.active.hold(3, me=7, pfn=11) == 10  # the guest changed its entry: still frame 10
    assert w.active.hold(3, me=8, pfn=10) is None  # another domain while held
    assert w.active.holder(3) == (10, 2, 7)
    assert w.types.word(10) == TW_HOLD  # one type hold per active entry
    w.active.unhold(3)
    assert w.types.word(10) == TW_HOLD
    w.active.unhold(3)
    assert w.types.word(10) == 0 and w.active.holder(3) == (0, 0, 0)
    w.active.unhold(3)  # an extra release is harmless
    assert w.types.word(10) == 0


def test_active_entry_refused_on_a_page_table(w: World) -> None:
    w.ft.pin(BASE + 12, PGT_L1)
    assert w.active.hold(1, me=2, pfn=12) is None
    assert w.active.holder(1) == (0, 0, 0)
    assert w.active.hold(1, me=2, pfn=N + 100) is None  # not RAM


def test_dead_mapper_holds_are_dropped(w: World) -> None:
    assert w.active.hold(1, me=5, pfn=1) == 1
    assert w.active.hold(2, me=5, pfn=2) == 2
    assert w.active.hold(3, me=6, pfn=3) == 3
    assert w.active.drop_domain(5, REFS) == 2
    assert w.types.word(1) == 0 and w.types.word(2) == 0 and w.types.word(3) == TW_HOLD
    w.ft.pin(BASE + 1, PGT_L1)  # usable as a page table again


def test_hold_count_saturates_instead_of_wrapping(w: World) -> None:
    atomic.store32(ctypes.addressof(w.tw_buf) + 4 * 8, 0xFFFFFFF8)
    assert not w.types.hold(8)
    assert w.types.word(8) == 0xFFFFFFF8


def test_interleaved_owner_and_writer_never_overlap(w: World) -> None:
    """A writer thread holds and releases frame 3 while the owner pins and
    unpins it as an L1; whenever the owner's pin succeeds no write is in
    progress, and whenever a hold succeeds the frame is no page table.  Runs
    until both sides succeeded many times (no time limit: a loaded host only
    makes it take longer); the switch interval is shortened to interleave."""
    stop = threading.Event()
    writing = threading.Event()
    errors: list[str] = []
    holds = [0]

    def writer() -> None:
        while not stop.is_set():
            if w.types.hold(3):
                writing.set()
                if w.ft.type_of(BASE + 3)[0] == PGT_L1:
                    errors.append("held writable while an L1")
                holds[0] += 1
                writing.clear()
                w.types.unhold(3)
            time.sleep(0)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    t = threading.Thread(target=writer)
    t.start()
    pins = 0
    try:
        while pins < 200 or holds[0] < 200:
            try:
                w.ft.pin(BASE + 3, PGT_L1)
            except XenError:
                time.sleep(0)
                continue
            if writing.is_set():
                errors.append("pinned while a write was in progress")
            pins += 1
            w.ft.unpin(BASE + 3)
            time.sleep(0)
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert not errors, errors[:3]
    assert w.types.word(3) == 0


# ---------------------------------------------------------------- native

@pytest.fixture
def nat(w: World) -> Iterator[tuple[World, object, object, ctypes.Array[ctypes.c_uint8]]]:
    lib = native.fast()
    if lib is None:
        pytest.skip(f"native library unavailable: {native.why_not()}")
    gt = (ctypes.c_uint8 * (REFS * 8))()
    dirty = (ctypes.c_uint64 * 1)()
    ram = (ctypes.c_uint8 * (N * 4096))()
    g = lib.pxg_new(ctypes.addressof(gt), REFS, ctypes.addressof(ram), N - 4, BASE,
                    ctypes.addressof(dirty), ctypes.addressof(w.tw_buf), N - 4,
                    ctypes.addressof(w.ae_buf))
    assert g
    yield w, lib, g, gt
    lib.pxg_free(g)


def _grant(gt: ctypes.Array[ctypes.c_uint8], ref: int, pfn: int) -> None:
    struct.pack_into("<HHI", gt, ref * 8, 1, 0, BASE + pfn)


def test_native_write_hold_follows_the_same_protocol(nat) -> None:  # noqa: ANN001
    w, lib, g, gt = nat
    _grant(gt, 2, 5)
    w.ft.pin(BASE + 5, PGT_L1)
    assert lib.pxg_acquire(g, 2, 0, 1) == -6  # PXG_E_TYPE
    assert struct.unpack_from("<H", gt, 16)[0] == 1  # status bits dropped again
    assert lib.pxg_acquire(g, 2, 0, 0) == 5 * 4096  # reading a page table is fine
    lib.pxg_release(g, 2)
    w.ft.unpin(BASE + 5)
    assert lib.pxg_acquire(g, 2, 0, 1) == 5 * 4096
    assert lib.pxg_acquire(g, 2, 0, 1) == 5 * 4096  # one writable use per ref
    assert w.types.word(5) == TW_HOLD and w.active.holder(2) == (5, 1, 0)
    with pytest.raises(XenError):
        w.ft.pin(BASE + 5, PGT_L1)
    lib.pxg_release(g, 2)
    assert w.types.word(5) == TW_HOLD
    lib.pxg_release(g, 2)
    assert w.types.word(5) == 0 and w.active.holder(2) == (0, 0, 0)
    w.ft.pin(BASE + 5, PGT_L1)


def test_native_and_python_holders_share_active_entries(nat) -> None:  # noqa: ANN001
    w, lib, g, gt = nat
    _grant(gt, 4, 6)
    assert w.active.hold(4, me=9, pfn=6) == 6  # another domain maps ref 4 writable
    assert lib.pxg_acquire(g, 4, 0, 1) == -6  # the backend (dom0) cannot share that use
    w.active.unhold(4)
    assert lib.pxg_acquire(g, 4, 0, 1) == 6 * 4096
    lib.pxg_release(g, 4)
    assert w.types.word(6) == 0
