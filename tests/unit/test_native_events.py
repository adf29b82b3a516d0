"""The native event pump (pyxen/native/evt.c), without KVM.

The pump takes events from eventfds and hands each port to its vCPU: a
sleeping vCPU (pxe_wait) wakes, a running one is kicked (immediate_exit and
the kick signal).  pxe_deliver then sets Xen's 2-level bits; it must set
exactly what the Python reference (evtchn.set_pending_bits) sets.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from pyxen import abi, native
from pyxen.hv import atomic
from pyxen.hv.evtchn import set_pending_bits


@pytest.fixture
def lib() -> ctypes.PyDLL:
    f = native.fast()
    if f is None:
        pytest.skip(f"native library not available: {native.why_not()}")
    return f


@pytest.fixture
def hub(lib: ctypes.PyDLL) -> Iterator[int]:
    h = lib.pxe_new(2, abi.SI_EVTCHN_PENDING, abi.SI_EVTCHN_MASK, abi.VI_PENDING_SEL,
                    abi.VI_UPCALL_PENDING)
    assert h
    yield h
    lib.pxe_free(h)


def _pages() -> tuple[bytearray, bytearray, int, int]:
    si, vi = bytearray(4096), bytearray(4096)
    return si, vi, atomic.address_of(si), atomic.address_of(vi)


def _until(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.001)
    return False


def test_deliver_matches_python_set_pending(lib: ctypes.PyDLL, hub: int) -> None:
    """Random pending/mask/selector states: the C bits equal the Python ones."""
    rng = random.Random(5)
    for _ in range(300):
        port = rng.choice([1, 2, 63, 64, 65, 200, 1023, rng.randrange(1, 4096)])
        word, bit = divmod(port, 64)
        init_pending = rng.getrandbits(64) & rng.choice([0, 1 << bit, ~(1 << bit) & (2**64 - 1)])
        init_mask = rng.choice([0, 1 << bit])
        init_sel = rng.choice([0, 1 << word, 1 << ((word + 1) % 64)])
        init_up = rng.choice([0, 1])
        states = []
        for use_c in (False, True):
            si, vi, sa, va = _pages()
            off_p = abi.SI_EVTCHN_PENDING + word * 8
            off_m = abi.SI_EVTCHN_MASK + word * 8
            si[off_p:off_p + 8] = init_pending.to_bytes(8, "little")
            si[off_m:off_m + 8] = init_mask.to_bytes(8, "little")
            vi[abi.VI_PENDING_SEL:abi.VI_PENDING_SEL + 8] = init_sel.to_bytes(8, "little")
            vi[abi.VI_UPCALL_PENDING] = init_up
            if use_c:
                fd = os.eventfd(0, os.EFD_NONBLOCK)
                try:
                    assert lib.pxe_watch(hub, port, fd, 1) == 0
                    os.eventfd_write(fd, 1)
                    assert _until(lambda sa=sa, va=va: lib.pxe_deliver(hub, 1, sa, va) > 0)
                finally:
                    assert lib.pxe_unwatch(hub, port, fd) == 0  # closes fd
            else:
                set_pending_bits(memoryview(si), memoryview(vi), 0, port, sa, va)
            states.append((bytes(si), bytes(vi)))
        assert states[0] == states[1], port


def test_port_goes_to_its_vcpu_and_wakes_the_sleeper(lib: ctypes.PyDLL, hub: int) -> None:
    slow = native.lib()
    assert slow is not None
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert lib.pxe_watch(hub, 7, fd, 0) == 0
        lib.pxe_bind_vcpu(hub, 7, 1)  # EVTCHNOP_bind_vcpu moved it to vCPU 1
        woke: list[int] = []
        t = threading.Thread(target=lambda: woke.append(slow.pxe_wait(hub, 1, int(30e9))))
        t.start()
        time.sleep(0.05)  # (the test passes either way: the pump writes the eventfd or
        os.eventfd_write(fd, 1)  # pxe_wait sees the port before it sleeps)
        t.join(20)
        assert woke == [1]
        si, vi, sa, va = _pages()
        assert lib.pxe_deliver(hub, 0, sa, va) == 0  # nothing for vCPU 0
        assert lib.pxe_deliver(hub, 1, sa, va) == 1
        assert si[abi.SI_EVTCHN_PENDING] == 1 << 7 and vi[abi.VI_UPCALL_PENDING] == 1
        assert lib.pxe_events(hub) == 1
        # pxe_wake ends a sleep with nothing fired; a timeout ends one too
        lib.pxe_wake(hub, 0)
        assert slow.pxe_wait(hub, 0, int(30e9)) == 0
        assert slow.pxe_wait(hub, 0, int(1e6)) == 0
    finally:
        lib.pxe_unwatch(hub, 7, fd)  # closes it


def test_running_vcpu_is_kicked(lib: ctypes.PyDLL, hub: int) -> None:
    """Not sleeping in pxe_wait: immediate_exit is set and the thread gets the
    kick signal (which ends a KVM_RUN)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    got: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    ie = (ctypes.c_uint8 * 1)()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        lib.pxe_attach(hub, 0, threading.get_native_id(), ctypes.addressof(ie))
        assert lib.pxe_watch(hub, 3, fd, 0) == 0
        os.eventfd_write(fd, 1)
        assert _until(lambda: ie[0] == 1 and bool(got))
    finally:
        lib.pxe_attach(hub, 0, 0, None)
        signal.signal(signal.SIGUSR1, old)
        lib.pxe_unwatch(hub, 3, fd)  # closes it


def test_sleeper_takes_another_vcpus_event_and_kicks_it(lib: ctypes.PyDLL, hub: int) -> None:
    """vCPU 0 sleeps, the port is bound to vCPU 1, which runs: vCPU 0's poll
    takes the event, fires it for vCPU 1 and kicks it; vCPU 0 has nothing."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    slow = native.lib()
    assert slow is not None
    got: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    ie = (ctypes.c_uint8 * 1)()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        lib.pxe_attach(hub, 1, threading.get_native_id(), ctypes.addressof(ie))  # "vCPU 1" runs here
        assert lib.pxe_watch(hub, 9, fd, 1) == 0
        woke: list[int] = []
        t = threading.Thread(target=lambda: woke.append(slow.pxe_wait(hub, 0, int(30e9))))
        t.start()
        time.sleep(0.05)
        os.eventfd_write(fd, 1)
        assert _until(lambda: ie[0] == 1 and bool(got))
        lib.pxe_wake(hub, 0)  # (if the pump took it, vCPU 0 still sleeps)
        t.join(20)
        assert woke == [0]
        si, vi, sa, va = _pages()
        assert lib.pxe_deliver(hub, 1, sa, va) == 1
        assert si[abi.SI_EVTCHN_PENDING + 1] == 1 << 1  # port 9: byte 1, bit 1
    finally:
        lib.pxe_attach(hub, 1, 0, None)
        signal.signal(signal.SIGUSR1, old)
        lib.pxe_unwatch(hub, 9, fd)


def test_poll_window_opens_for_other_domains_events_and_closes_after_long_waits(
        lib: ctypes.PyDLL, hub: int) -> None:
    """Adaptive polling before a sleep (KVM's halt polling): off by default;
    a sleep ended by another domain's event (an inbound eventfd) within the
    bound opens the window (the next wait polls first); timeouts and wakes
    from this process do not; a wait longer than the bound closes it.  No
    timing is asserted: the event is retried until one lands in a sleep."""
    slow = native.lib()
    assert slow is not None
    stats = (ctypes.c_uint64 * 2)()

    def polled() -> int:
        lib.pxe_poll_stats(hub, stats)
        return int(stats[0])

    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert lib.pxe_watch(hub, 9, fd, 0) == 0
        for bound in (0, int(10e9)):
            lib.pxe_set_poll(hub, bound)
            assert slow.pxe_wait(hub, 0, int(2e6)) == 0  # timeouts open nothing
            lib.pxe_wake(hub, 0)
            assert slow.pxe_wait(hub, 0, int(30e9)) == 0  # nor does a wake from this process
            assert slow.pxe_wait(hub, 0, int(2e6)) == 0
            assert polled() == 0
        opened = False
        for _ in range(50):  # an event from "another domain" while vCPU 0 sleeps
            t = threading.Timer(0.02, os.eventfd_write, (fd, 1))
            t.start()
            assert slow.pxe_wait(hub, 0, int(30e9)) == 1
            t.join()
            si, vi, sa, va = _pages()
            assert lib.pxe_deliver(hub, 0, sa, va) == 1
            assert si[abi.SI_EVTCHN_PENDING + 1] == 1 << 1  # port 9: byte 1, bit 1
            n = polled()
            assert slow.pxe_wait(hub, 0, int(2e6)) == 0
            if polled() == n + 1:
                opened = True
                break
        assert opened
        lib.pxe_set_poll(hub, int(1e6))  # now a 20 ms wait is longer than the bound
        assert slow.pxe_wait(hub, 0, int(20e6)) == 0  # polls (window open), sleeps, closes it
        n = polled()
        assert slow.pxe_wait(hub, 0, int(2e6)) == 0
        assert polled() == n
    finally:
        lib.pxe_unwatch(hub, 9, fd)
