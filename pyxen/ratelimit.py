"""Rate limits for what a guest can make the host write: console bytes and log lines.

A guest decides how much it prints, both through its console ring and
through ``HYPERVISOR_console_io``, and how many failing hypercalls it makes
(each one a line in the hypervisor log).  Without a bound, one guest fills
the host's disk (the console log lives on tmpfs, i.e. host RAM) and pushes
every other domain's crash report out of ``pyxen dmesg``.  This module holds
the pure parts, with the clock injected so they are unit-tested without
sleeping:

* :class:`TokenBucket`: the token bucket both limits are built on.
* :class:`ConsoleLimiter`: console bytes per domain.  Above the rate, output
  is *discarded*, not queued and not throttled: the ring keeps being
  consumed, so the guest never stalls on its own console and host memory
  stays bounded.  One notice line says that discarding started, one says
  when it resumed and how many bytes were lost.
* :class:`PrintkRatelimit`: Xen's ``printk_ratelimit`` (burst + interval),
  per domain, with Xen's ``printk: N messages suppressed.`` line.
* :class:`Limits`: the settings and their defaults, from the environment of
  whoever started the daemon (as xenconsoled's are its command line).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import ClassVar

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` stored; starts full.

    ``rate <= 0`` means no limit (every request is granted in full)."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = float(max(burst, 0))
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock()

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def refill(self) -> float:
        """Add what the time since the last call earned; the tokens now."""
        now = self.clock()
        if now > self.stamp:  # a clock that goes backwards earns nothing
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens

    def take(self, n: int) -> int:
        """Grant up to ``n`` whole tokens (fewer if the bucket holds fewer)."""
        if self.unlimited:
            return n
        got = min(n, int(self.refill()))
        self.tokens -= got
        return got

    def take_one(self, cost: float = 1.0) -> bool:
        """All or nothing: take ``cost`` tokens if the bucket holds them."""
        if self.unlimited:
            return True
        if self.refill() >= cost:
            self.tokens -= cost
            return True
        return False


class ConsoleLimiter:
    """Console bytes of one domain (ring output and console_io alike).

    :meth:`filter` returns what to write for a chunk the guest produced: the
    part within the rate, plus the notice lines.  Once discarding, output
    resumes only when the bucket has earned ``resume`` bytes again (one
    second's worth, or the whole burst if that is smaller), so a guest
    printing just above the rate costs two notice lines per cycle, not two
    per chunk.  The notices are not charged to the bucket: their number is
    bounded by the cycle, and charging them would let them eat the budget.
    """

    def __init__(self, rate: int, burst: int, domid: int = 0,
                 clock: Clock = time.monotonic) -> None:
        self.bucket = TokenBucket(rate, burst, clock)
        self.domid = domid
        self.resume = max(1, min(burst, rate))
        self.discarding = False
        self.dropped = 0  # bytes lost in the current discarding run
        self.dropped_total = 0
        self.at_line_start = True

    def _line(self, text: str) -> bytes:
        lead = b"" if self.at_line_start else b"\r\n"
        self.at_line_start = True
        return lead + text.encode() + b"\r\n"

    def start_notice(self) -> str:
        return (f"[pyxen: d{self.domid} console output above {int(self.bucket.rate)} bytes/s "
                f"(burst {int(self.bucket.burst)}): discarding]")

    def resume_notice(self) -> str:
        return f"[pyxen: d{self.domid} console output resumed: {self.dropped} bytes discarded]"

    def filter(self, data: bytes) -> tuple[bytes, list[str]]:
        """What to write for ``data``, and the notices written into it (for
        the hypervisor log) when discarding started or ended."""
        if not data or self.bucket.unlimited:
            if data:
                self.at_line_start = data.endswith(b"\n")
            return data, []
        out = b""
        notes = []
        if self.discarding:
            if self.bucket.refill() < self.resume:
                self.dropped += len(data)
                self.dropped_total += len(data)
                return b"", []
            notes.append(self.resume_notice())
            out = self._line(notes[-1])
            self.discarding = False
            self.dropped = 0
        n = self.bucket.take(len(data))
        if n:
            out += data[:n]
            self.at_line_start = data[n - 1:n] == b"\n"
        if n < len(data):
            self.discarding = True
            self.dropped = len(data) - n
            self.dropped_total += len(data) - n
            notes.append(self.start_notice())
            out += self._line(notes[-1])
        return out, notes


class PrintkRatelimit:
    """Xen's ``__printk_ratelimit``: ``burst`` messages at once, then one per
    ``interval_ms``; per domain here (Xen's one bucket is global).

    :meth:`check` says whether a message may be printed and how many were
    suppressed since the last one that was, which the caller reports first
    (Xen's ``printk: N messages suppressed.``).  :meth:`flush` takes that
    count without spending a token, for messages that are never suppressed.
    ``interval_ms <= 0`` means no limit."""

    def __init__(self, interval_ms: int, burst: int, clock: Clock = time.monotonic) -> None:
        self.interval_ms = interval_ms
        self.burst = burst
        rate = 1000.0 / interval_ms if interval_ms > 0 else 0.0
        self.bucket = TokenBucket(rate, max(burst, 1), clock)  # 0 would silence even the first
        self.lock = threading.Lock()
        self.missed = 0
        self.suppressed_total = 0

    def check(self) -> tuple[bool, int]:
        with self.lock:
            if self.bucket.take_one():
                lost, self.missed = self.missed, 0
                return True, lost
            self.missed += 1
            self.suppressed_total += 1
            return False, 0

    def flush(self) -> int:
        with self.lock:
            lost, self.missed = self.missed, 0
            return lost


def suppressed_line(n: int) -> str:
    """Xen's wording (xen/drivers/char/console.c)."""
    return f"printk: {n} messages suppressed."


@dataclass(frozen=True)
class Limits:
    """Per-domain limits, read by each domain process when it starts.

    ========================  ==============================  =========
    variable                  meaning                         default
    ========================  ==============================  =========
    PYXEN_CONSOLE_RATE        console bytes/s (0: no limit)   128K
    PYXEN_CONSOLE_BURST       console bytes at once           1M
    PYXEN_CONSOLE_LOG_SIZE    log file size before rotation   1M
                              (0: never rotate)
    PYXEN_CONSOLE_LOG_KEEP    rotated files kept (.1 .. .N)   3
    PYXEN_PRINTK_RATELIMIT_MS one log line per this many ms   5000
                              after the burst (0: no limit)
    PYXEN_PRINTK_BURST        log lines at once               20
    ========================  ==============================  =========

    Sizes take a K, M or G suffix (powers of 1024)."""

    console_rate: int = 128 << 10
    console_burst: int = 1 << 20
    log_size: int = 1 << 20
    log_keep: int = 3
    printk_ms: int = 5000
    printk_burst: int = 20

    ENV: ClassVar[dict[str, str]] = {
           "console_rate": "PYXEN_CONSOLE_RATE", "console_burst": "PYXEN_CONSOLE_BURST",
           "log_size": "PYXEN_CONSOLE_LOG_SIZE", "log_keep": "PYXEN_CONSOLE_LOG_KEEP",
           "printk_ms": "PYXEN_PRINTK_RATELIMIT_MS", "printk_burst": "PYXEN_PRINTK_BURST"}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> tuple[Limits, list[str]]:
        """The limits, and one warning per variable that was set but unusable
        (that one keeps its default: a typo must not stop domains from starting)."""
        env = os.environ if env is None else env
        values: dict[str, int] = {}
        warnings: list[str] = []
        for f in fields(cls):
            var = cls.ENV[f.name]
            text = env.get(var)
            if text is None or text.strip() == "":
                continue
            try:
                values[f.name] = parse_size(text)
            except ValueError as e:
                warnings.append(f"{var}={text!r}: {e}; using {getattr(cls, f.name)}")
        limits = cls(**values)
        if limits.console_rate and limits.console_burst <= 0:
            warnings.append(f"PYXEN_CONSOLE_BURST={limits.console_burst}: must be positive "
                            f"with a rate; using {cls.console_burst}")
            limits = cls(**dict(values, console_burst=cls.console_burst))
        return limits, warnings


def parse_size(text: str) -> int:
    """A non-negative integer with an optional K/M/G suffix (1024-based)."""
    t = text.strip().upper().removesuffix("B")
    mult = 1
    if t and t[-1] in "KMG":
        mult = 1 << (10 * ("KMG".index(t[-1]) + 1))
        t = t[:-1]
    if not t.isdigit():
        raise ValueError("not a size (digits, optionally followed by K, M or G)")
    return int(t) * mult
