"""Xen's time API: system time, per-vCPU vcpu_time_info and the wallclock.

System time is nanoseconds since the domain was created, taken from the
host's CLOCK_MONOTONIC.  The guest extrapolates between updates with its
own TSC: ``system_time + ((tsc - tsc_timestamp) << shift) * mul >> 32``, so
each update records the guest TSC (read from KVM) at the same instant as the
host clock, and the scale factors come from the vCPU's TSC frequency.
"""

from __future__ import annotations

import mmap
import struct
import time

from .. import abi

Buffer = bytearray | memoryview | mmap.mmap


def tsc_scale(tsc_khz: int) -> tuple[int, int]:
    """(tsc_to_system_mul, tsc_shift) for a TSC of ``tsc_khz`` kHz, as Xen's
    ``compute_time_scale``: ns = ((tsc << shift) * mul) >> 32, mul < 2^32."""
    tps = tsc_khz * 1000
    shift = 0
    # normalise so that tps is in [0.5e9, 1e9) scaled by 2^shift
    t = tps
    while t > 2 * 1_000_000_000:
        t >>= 1
        shift -= 1
    while t <= 1_000_000_000:
        t <<= 1
        shift += 1
    mul = (1_000_000_000 << 32) // t
    if mul >= 1 << 32:
        mul = (1 << 32) - 1
    return mul, shift


def scale_delta(delta: int, mul: int, shift: int) -> int:
    if shift >= 0:
        delta <<= shift
    else:
        delta >>= -shift
    return (delta * mul) >> 32


class DomainClock:
    """The domain's time base: boot instant on the host and the wallclock."""

    def __init__(self) -> None:
        self.boot_ns = time.monotonic_ns()
        self.boot_wall_ns = time.time_ns() - 0  # wallclock at system time 0

    def system_time(self) -> int:
        return time.monotonic_ns() - self.boot_ns

    def write_wallclock(self, buf: Buffer, si_off: int) -> None:
        """shared_info wc_* fields (version odd while updating)."""
        wc = self.boot_wall_ns
        ver = struct.unpack_from("<I", buf, si_off + abi.SI_WC_VERSION)[0]
        struct.pack_into("<I", buf, si_off + abi.SI_WC_VERSION, (ver + 1) & 0xFFFFFFFF)
        sec, nsec = divmod(wc, 1_000_000_000)
        struct.pack_into("<III", buf, si_off + abi.SI_WC_SEC, sec & 0xFFFFFFFF, nsec, sec >> 32)
        struct.pack_into("<I", buf, si_off + abi.SI_WC_VERSION, (ver + 2) & 0xFFFFFFFF)


    # ------------------------------------------------------------ save / restore (migration)
    def save_state(self) -> dict[str, int]:
        """The domain's time at the save: its system time and the wallclock."""
        return {"system_time_ns": self.system_time(), "wall_ns": time.time_ns()}

    def restore_state(self, system_time_ns: int) -> None:
        """Continue the saved domain's system time from where it stopped: the
        guest's monotonic clock never goes back, and it does not jump by the
        time the domain spent saved (as a paused domain's).  The wallclock
        base moves so that base + system time is the real time now: wall
        clock time jumps forward by the downtime, as on Xen."""
        now_mono, now_wall = time.monotonic_ns(), time.time_ns()
        self.boot_ns = now_mono - max(0, system_time_ns)
        self.boot_wall_ns = now_wall - max(0, system_time_ns)

SLEW_MAX_PPM = 500  # continue_clock: the fastest a guest clock that is ahead is slowed
RESYNC_NS = 50_000_000  # continue_clock: a gap this wide is no measurement error (restore, bug)


def continue_clock(prev: tuple[int, int, int, int] | None, tsc: int, measured: int, narrow: bool,
                   mul: int, shift: int, interval_ns: int) -> tuple[int, int]:
    """(system_time, tsc_to_system_mul) for a new vcpu_time_info stamped at
    guest TSC ``tsc`` so that the guest's clock never steps back.

    Each update pairs a TSC read with a host clock bracket, which errs by up
    to half the bracket (tens of us on a loaded host, either way).  Taken
    as is, half the updates stepped the guest's clock back by that error
    (measured: up to 10 us, every other tick under load); with
    XEN_PVCLOCK_TSC_STABLE_BIT Linux trusts the record and keeps no
    monotonic clamp, as Xen's records lie on one TSC line.  So the new
    record starts where the previous one (``prev`` = tsc_timestamp,
    system_time, mul, shift) reads at ``tsc``: a guest clock behind the
    host's (``measured``) steps forward to it, one ahead is slowed by up to
    SLEW_MAX_PPM (a lower mul) so that it meets the host's clock over about
    ``interval_ns`` instead of stepping back.  Without a ``narrow`` bracket
    the line is kept unchanged.  Without ``prev``, with a TSC before it, or
    a disagreement wider than RESYNC_NS (a restored domain's record from
    another TSC), the measurement is taken as is."""
    if prev is None or prev[2] == 0 or prev[3] != shift or tsc < prev[0]:
        return measured, mul
    tsc0, sys0, mul0, shift0 = prev
    on_line = sys0 + scale_delta(tsc - tsc0, mul0, shift0)
    ahead = on_line - measured
    if abs(ahead) > RESYNC_NS:
        return measured, mul
    if not narrow:
        return on_line, mul0
    if ahead <= 0:
        return measured, mul
    ppm = min(SLEW_MAX_PPM, ahead * 1_000_000 // max(interval_ns, 1) + 1)
    return on_line, mul - mul * ppm // 1_000_000


def write_vcpu_time(buf: Buffer, off: int, tsc: int, system_ns: int, mul: int, shift: int) -> None:
    """Update a vcpu_time_info at ``off``: version goes odd, fields, then even."""
    ver = struct.unpack_from("<I", buf, off)[0]
    struct.pack_into("<I", buf, off, (ver + 1) | 1)
    struct.pack_into("<QQIbB", buf, off + abi.VT_TSC_TIMESTAMP, tsc, system_ns, mul, shift,
                     abi.XEN_PVCLOCK_TSC_STABLE_BIT)
    struct.pack_into("<I", buf, off, ((ver + 1) | 1) + 1)
