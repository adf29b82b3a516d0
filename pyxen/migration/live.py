"""Live relocation, the sending side: iterative pre-copy with the dirty log,
Clark et al.'s rate limit, stop-and-copy (NSDI 2005, "Live Migration of
Virtual Machines", section 4; Xen's ``xg_sr_save.c`` send_memory_live).

Round 1 sends every page while the guest runs, with log-dirty mode on; each
next round sends the pages dirtied during the previous one (KVM's dirty log
merged with what the hypervisor and backends wrote: ``Domain.read_dirty``).
Each round is rate limited: round 1 at the minimum rate, each next at the
previous round's dirtying rate plus 50 Mbit/s.  Iterating stops when that
rate would exceed the maximum, when few pages remain dirty, or after a
number of rounds; then the guest is suspended (the caller's ``suspend``:
``control/shutdown = "suspend"`` as for a save) and the last dirty pages,
the deferred page tables and the pages whose type changed go at the maximum
rate with the vCPUs and the rest of save.py's tail.

The pure policy (:class:`RatePolicy`) is separate from the sending and
tested alone.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, TYPE_CHECKING, Any

from ..hv import machine as M
from . import save as SV
from . import stream as S

if TYPE_CHECKING:
    from ..hv.domain import Domain

MBIT = 1_000_000 / 8  # bytes per second in one Mbit/s
PAGE_BITS = S.PAGE_SIZE * 8


@dataclass
class RatePolicy:
    """Clark et al.'s adaptive rate limit.  Rates in Mbit/s.

    The paper starts at 100 Mbit/s and stops at 500 Mbit/s on a gigabit
    LAN; pyxen's defaults are scaled to a host-local link (a veth pair moves
    several Gbit/s), and both are settable (``pyxen migrate --min-rate
    --max-rate``)."""

    min_rate: float = 1000.0
    max_rate: float = 8000.0
    increment: float = 50.0  # the paper's "+ 50 Mbit/s"
    # live rounds before stop-and-copy whatever remains: Xen's save since its
    # stream v2 (xg_sr_save.c: max_iterations 5, the first sending every page),
    # not the legacy 30 (xc_domain_save.c's DEF_MAX_ITERS 29): a working set
    # the guest rewrites faster than a round ends stays dirty however long we
    # iterate, and each round costs the guest a write fault per page of it
    # (PVM: shadow paging) and the host CPU that the heartbeat's path then
    # waits for (docs/migration.md, "Pre-copy stalls")
    max_rounds: int = 5
    few_pages: int = 50  # Xen's threshold: fewer dirty pages than this, stop

    def first(self) -> float:
        return self.min_rate

    def next_rate(self, dirty_pages_per_s: float) -> float:
        """The next round's limit: the dirtying rate just seen + 50 Mbit/s."""
        return max(self.min_rate, dirty_pages_per_s * PAGE_BITS / 1e6 + self.increment)

    def stop(self, round_no: int, dirty: int, next_rate: float) -> str | None:
        """Why iterating stops before round ``round_no`` + 1, or None."""
        if dirty < self.few_pages:
            return f"{dirty} dirty pages remain (< {self.few_pages})"
        if next_rate > self.max_rate:
            return f"the dirtying rate needs {next_rate:.0f} Mbit/s (> max {self.max_rate:.0f})"
        if round_no >= self.max_rounds:
            return f"{round_no} rounds done (the limit)"
        return None


@dataclass
class RoundStat:
    round: int
    pages: int  # sent with data
    seconds: float
    dirty_rate: float  # pages/s dirtied while this round was sent
    rate_limit: float  # Mbit/s this round was held to (0: the final round, at max)
    bytes: int = 0
    live: bool = True
    t_start: float = 0.0  # CLOCK_MONOTONIC when the round began (lines up with traces, migprof)
    t_end: float = 0.0  # ... when its dirty log had been read (the round's boundary)


@dataclass
class LiveStats:
    rounds: list[RoundStat] = field(default_factory=list)
    stop_reason: str = ""
    pages: int = 0
    bytes: int = 0
    seconds: float = 0.0
    suspend_seconds: float = 0.0  # from the suspend request to the guest suspended
    downtime_seconds: float = 0.0  # from the suspend request to END sent (sender's view)
    max_pages: int = 0
    t_logdirty: float = 0.0  # CLOCK_MONOTONIC when log-dirty mode was turned on

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Throttle:
    """Hold a round to ``rate`` Mbit/s: sleep after a batch when ahead."""

    def __init__(self, rate_mbit: float) -> None:
        self.rate = rate_mbit * MBIT
        self.t0 = time.monotonic()
        self.sent = 0

    def __call__(self, npages: int) -> None:
        self.sent += npages * S.PAGE_SIZE
        if self.rate <= 0:
            return
        ahead = self.sent / self.rate - (time.monotonic() - self.t0)
        if ahead > 0.0005:
            time.sleep(ahead)


def send_live(d: Domain, f: IO[bytes], suspend: Callable[[], None],
              policy: RatePolicy | None = None, config: dict[str, Any] | None = None,
              on_round: Callable[[RoundStat], None] | None = None,
              header_sent: bool = False,
              wait_applied: Callable[[int], None] | None = None) -> LiveStats:
    """Send the running domain ``d`` to ``f`` live.  ``suspend`` asks the
    guest to suspend and returns once it has (or raises: the caller then
    resumes nothing, the guest never stopped).  ``header_sent``: the xl
    header (config) went already (a migration sends it first, for the
    destination's reservation).  Each live round ends with a
    PYXEN_ROUND_END record; ``wait_applied(n)`` returns once the receiver
    has applied round ``n`` (validated its page tables), which the sender
    waits for before it suspends the guest, so that the downtime does not
    include the receiver's backlog.  Dirty logging is off again on return."""
    pol = policy or RatePolicy()
    out = SV._Out(f)
    st = LiveStats(max_pages=d.max_pages)
    t0 = time.monotonic()
    if header_sent:
        SV.write_after_xl_header(d, out)
    else:
        SV.write_headers(d, out, config)
    pw = SV.PageWriter(d, out, xalloc_holes=True)
    st.t_logdirty = time.monotonic()
    # manual protect where KVM has it: nothing is write-protected now; each
    # batch is protected again right before it is sent (pw.write's before=)
    d.set_dirty_logging(True, all_dirty=True)
    try:
        d.read_dirty(protect=False)  # start clean: round 1 sends everything anyway
        rate = pol.first()
        pfns = list(range(d.max_pages))
        present: bytearray | None = SV._present_pages(d.machine.memfd, d.max_pages)
        n = 0
        while True:
            n += 1
            r0 = time.monotonic()
            b0 = out.n
            sent = pw.write(pfns, present, live=True, throttle=Throttle(rate), before=d.clear_dirty)
            out.rec(S.Rec.PYXEN_ROUND_END, struct.pack("<II", n, 0))
            f.flush()
            present = None
            dirty = d.read_dirty(protect=False)
            secs = time.monotonic() - r0
            drate = len(dirty) / secs if secs > 0 else 0.0
            rs = RoundStat(n, sent, secs, drate, rate, out.n - b0, t_start=r0, t_end=r0 + secs)
            st.rounds.append(rs)
            if on_round:
                on_round(rs)
            rate = pol.next_rate(drate)
            why = pol.stop(n, len(dirty), rate)
            pfns = sorted(p for p in dirty if p < d.max_pages)
            if why:
                st.stop_reason = why
                break
        # stop-and-copy
        if wait_applied is not None:
            wait_applied(n)
            # what the guest dirtied while we waited goes in the last round
        s0 = time.monotonic()
        suspend()
        st.suspend_seconds = time.monotonic() - s0
        SV.check_suspended(d)
        r0 = time.monotonic()
        b0 = out.n
        vcpu_recs, _si = SV.vcpu_records(d, pw.m2p)
        last = set(pfns) | d.read_dirty(protect=False) | pw.deferred
        last.update(pw.changed_types())
        # pfns ballooned out since they were sent: XTAB, so the destination frees them
        last.update(p for p in d.free_pfns if pw.sent_type[p] != pw.UNSENT)
        pw.deferred = set()
        final = sorted(p for p in last if p < d.max_pages)
        sent = pw.write(final, None, live=False, throttle=Throttle(pol.max_rate))
        SV.write_tail(d, out, vcpu_recs)
        f.flush()
        now = time.monotonic()
        rs = RoundStat(n + 1, sent, now - r0, 0.0, pol.max_rate, out.n - b0, live=False,
                       t_start=r0, t_end=now)
        st.rounds.append(rs)
        if on_round:
            on_round(rs)
        st.downtime_seconds = now - s0
    finally:
        d.set_dirty_logging(False)
    st.pages = sum(r.pages for r in st.rounds)
    st.bytes = out.n
    st.seconds = time.monotonic() - t0
    return st


def mfn_pages(d: Domain) -> int:
    """Pages of RAM the domain has (for messages)."""
    return d.max_pages - len(d.free_pfns)


__all__ = ["RatePolicy", "RoundStat", "LiveStats", "send_live", "M"]
