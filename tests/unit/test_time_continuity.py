"""time.continue_clock: the guest's pvclock never steps back at an update.

With XEN_PVCLOCK_TSC_STABLE_BIT Linux reads vcpu_time_info without a
monotonic clamp, so each new record must start where the previous one reads
at the new TSC stamp; host-clock measurement error is absorbed by stepping
forward or by slowing the clock (a lower mul), never by stepping back."""

from __future__ import annotations

import random

from pyxen.hv.time import RESYNC_NS, SLEW_MAX_PPM, continue_clock, scale_delta, tsc_scale

KHZ = 2_100_000
MUL, SHIFT = tsc_scale(KHZ)


def reading(rec: tuple[int, int, int, int], tsc: int) -> int:
    """What Linux's pvclock_clocksource_read returns from ``rec`` at ``tsc``."""
    tsc0, sys0, mul, shift = rec
    return sys0 + scale_delta(tsc - tsc0, mul, shift)


def test_first_record_takes_the_measurement() -> None:
    assert continue_clock(None, 1000, 5_000, True, MUL, SHIFT, 10**6) == (5_000, MUL)
    assert continue_clock((0, 0, 0, 0), 1000, 5_000, False, MUL, SHIFT, 10**6) == (5_000, MUL)


def test_behind_steps_forward_to_the_host() -> None:
    rec = (1_000_000, 10**9, MUL, SHIFT)
    tsc = rec[0] + 21_000_000  # 10 ms later
    line = reading(rec, tsc)
    assert continue_clock(rec, tsc, line + 7_000, True, MUL, SHIFT, 10**7) == (line + 7_000, MUL)


def test_ahead_is_slowed_not_stepped_back() -> None:
    rec = (1_000_000, 10**9, MUL, SHIFT)
    tsc = rec[0] + 21_000_000
    line = reading(rec, tsc)
    sys_ns, mul = continue_clock(rec, tsc, line - 9_000, True, MUL, SHIFT, 10**7)
    assert sys_ns == line
    assert MUL - MUL * SLEW_MAX_PPM // 10**6 <= mul < MUL


def test_wide_bracket_keeps_the_line() -> None:
    rec = (1_000_000, 10**9, MUL - 5, SHIFT)
    tsc = rec[0] + 21_000_000
    assert continue_clock(rec, tsc, 0 + reading(rec, tsc) - 40_000, False, MUL, SHIFT, 10**7) \
        == (reading(rec, tsc), MUL - 5)


def test_resync_after_restore_or_tsc_going_back() -> None:
    rec = (10**12, 10**9, MUL, SHIFT)
    assert continue_clock(rec, 10**6, 7, True, MUL, SHIFT, 10**7) == (7, MUL)  # a new VM's TSC
    tsc = rec[0] + 2_100_000
    far = reading(rec, tsc) - RESYNC_NS - 1
    assert continue_clock(rec, tsc, far, True, MUL, SHIFT, 10**7) == (far, MUL)


def test_random_measurement_noise_never_steps_back_and_tracks_the_host() -> None:
    """A guest TSC at exactly KHZ, host readings with +-25 us error (a loaded
    host's brackets), some brackets too wide: the guest's clock read just
    before and just after every update never goes back, and stays within
    a small bound of the true time."""
    rng = random.Random(1)
    true_ns = 0
    tsc = 0
    rec: tuple[int, int, int, int] | None = None
    for _ in range(5000):
        step = rng.randrange(1_000_000, 100_000_000)  # 1-100 ms between timer ticks
        true_ns += step
        tsc += step * KHZ // 1_000_000
        narrow = rng.random() > 0.05
        measured = true_ns + rng.randrange(-25_000, 25_001)
        before = reading(rec, tsc) if rec else None
        sys_ns, mul = continue_clock(rec, tsc, measured, narrow, MUL, SHIFT, step)
        rec = (tsc, sys_ns, mul, SHIFT)
        if before is not None:
            assert reading(rec, tsc) >= before
        assert abs(sys_ns - true_ns) < 200_000
