"""Unit tests of the pure limits (pyxen/ratelimit.py) and the rotating
console log (pyxen/backends/console.py: ConsoleLog), with a fake clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyxen.backends.console import ConsoleLog
from pyxen.ratelimit import ConsoleLimiter, Limits, PrintkRatelimit, TokenBucket, parse_size


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_burst_then_rate() -> None:
    c = FakeClock()
    b = TokenBucket(100, 50, c)
    assert b.take(80) == 50  # starts full: the burst, no more
    assert b.take(10) == 0
    c.t += 0.25
    assert b.take(100) == 25  # 100/s for 0.25 s
    c.t += 100
    assert b.take(1000) == 50  # never more than the burst stored
    c.t -= 50  # a clock going backwards earns nothing
    assert b.take(1) == 0


def test_token_bucket_unlimited() -> None:
    b = TokenBucket(0, 0, FakeClock())
    assert b.take(1 << 40) == 1 << 40 and b.take_one()


def test_console_limiter_discards_above_rate_and_says_so_once() -> None:
    c = FakeClock()
    lim = ConsoleLimiter(rate=1000, burst=100, domid=7, clock=c)
    out, notes = lim.filter(b"a" * 60 + b"\n")
    assert out == b"a" * 60 + b"\n" and notes == []
    out, notes = lim.filter(b"b" * 100)
    # 39 bytes fit; the notice starts on its own line
    assert out.startswith(b"b" * 39 + b"\r\n[pyxen: d7 console output above 1000 bytes/s")
    assert out.endswith(b"discarding]\r\n") and len(notes) == 1
    # while discarding: nothing, however much arrives, and no more notices
    for _ in range(1000):
        assert lim.filter(b"x" * 4096) == (b"", [])
    assert lim.dropped == 61 + 1000 * 4096
    # resumes once it earned `resume` bytes (min(burst, rate) = 100 here): 0.1 s
    c.t += 0.05
    assert lim.filter(b"y") == (b"", [])
    c.t += 0.06
    out, notes = lim.filter(b"z\n")
    assert out == b"[pyxen: d7 console output resumed: 4096062 bytes discarded]\r\nz\n"
    assert notes == ["[pyxen: d7 console output resumed: 4096062 bytes discarded]"]
    assert lim.dropped_total == 4096062 and not lim.discarding


def test_console_limiter_bounds_output_whatever_the_chunking() -> None:
    """Over a simulated minute of flooding in odd-sized chunks, what gets out
    (notices included) is about burst + rate * time, never the flood."""
    c = FakeClock()
    lim = ConsoleLimiter(rate=2048, burst=8192, clock=c)
    out = 0
    flood = 0
    for i in range(60000):
        c.t += 0.001
        chunk = b"q" * (1 + i % 3000)
        flood += len(chunk)
        got, _ = lim.filter(chunk)
        out += len(got)
    assert flood > 80_000_000
    notice_room = 2 * 100 * 60  # two notices of < 100 bytes per second at most
    assert out <= 8192 + 2048 * 60 + notice_room, out
    assert out >= 2048 * 30  # and it does not starve a guest forever


def test_console_limiter_unlimited() -> None:
    lim = ConsoleLimiter(rate=0, burst=0)
    assert lim.filter(b"x" * 100000) == (b"x" * 100000, [])


def test_printk_ratelimit_burst_interval_and_count() -> None:
    c = FakeClock()
    rl = PrintkRatelimit(5000, 10, c)
    assert [rl.check() for _ in range(10)] == [(True, 0)] * 10
    assert [rl.check()[0] for _ in range(500)] == [False] * 500
    c.t += 4.9
    assert rl.check() == (False, 0)
    c.t += 0.1  # one message per 5 s, and the count of those suppressed
    assert rl.check() == (True, 501)
    assert rl.check() == (False, 0)
    assert rl.flush() == 1 and rl.flush() == 0  # for lines never suppressed
    assert rl.suppressed_total == 502


def test_domain_log_suppresses_chatter_but_never_crash_reports() -> None:
    """Domain.log's policy without a VM: the Domain methods on a bare object."""
    from pyxen.hv.domain import Domain
    c = FakeClock()
    d = Domain.__new__(Domain)
    d.domid, d.dmesg, d.log_sink = 5, [], None
    d.log_ratelimit = PrintkRatelimit(5000, 3, c)
    for i in range(1000):
        d.log(f"mmu_update #0 failed: {i}")
    d.log("domain crashed: oops", always=True)
    d.log("rip=0000000000000000", always=True)
    assert d.dmesg == ["(d5) mmu_update #0 failed: 0", "(d5) mmu_update #0 failed: 1",
                       "(d5) mmu_update #0 failed: 2", "(d5) printk: 997 messages suppressed.",
                       "(d5) domain crashed: oops", "(d5) rip=0000000000000000"]


def test_limits_from_env() -> None:
    lim, warnings = Limits.from_env({"PYXEN_CONSOLE_RATE": "32K", "PYXEN_CONSOLE_LOG_SIZE": "2M",
                                     "PYXEN_PRINTK_BURST": "5"})
    assert (lim.console_rate, lim.log_size, lim.printk_burst) == (32768, 2 << 20, 5)
    assert lim.console_burst == Limits.console_burst and warnings == []
    lim, warnings = Limits.from_env({"PYXEN_CONSOLE_LOG_KEEP": "lots"})
    assert lim.log_keep == Limits.log_keep
    assert len(warnings) == 1 and "PYXEN_CONSOLE_LOG_KEEP='lots'" in warnings[0]
    assert parse_size("1g") == 1 << 30 and parse_size(" 7 ") == 7
    with pytest.raises(ValueError):
        parse_size("-1")


def test_console_log_rotates_and_keeps_n(tmp_path: Path) -> None:
    p = tmp_path / "guest-x.log"
    log = ConsoleLog(p, max_bytes=100, keep=2)
    for i in range(50):
        log.write(b"%02d" % i + b"-" * 17 + b"\n")  # 20 bytes a line
    log.close()
    files = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    assert set(files) == {"guest-x.log", "guest-x.log.1", "guest-x.log.2"}
    assert all(len(v) == 100 for v in files.values())
    # oldest .2, then .1, then the live file: the last 300 bytes, in order
    text = files["guest-x.log.2"] + files["guest-x.log.1"] + files["guest-x.log"]
    assert text == b"".join(b"%02d" % i + b"-" * 17 + b"\n" for i in range(35, 50))
    assert log.rotations == 9
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in tmp_path.iterdir())


def test_console_log_splits_a_big_write_and_appends_to_existing(tmp_path: Path) -> None:
    p = tmp_path / "guest-y.log"
    p.write_bytes(b"old\n")
    os.chmod(p, 0o644)
    log = ConsoleLog(p, max_bytes=64, keep=1)
    assert p.stat().st_mode & 0o777 == 0o600  # an existing log is made private too
    log.write(bytes(range(256)) * 2)  # 512 bytes in one write
    log.close()
    assert p.stat().st_size <= 64 and (tmp_path / "guest-y.log.1").stat().st_size == 64
    assert not (tmp_path / "guest-y.log.2").exists()
    kept = (tmp_path / "guest-y.log.1").read_bytes() + p.read_bytes()
    assert kept == (b"old\n" + bytes(range(256)) * 2)[-len(kept):]


def test_console_log_refuses_symlink_and_reports_errors_once(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    link = tmp_path / "guest-z.log"
    link.symlink_to(target)
    with pytest.raises(OSError):
        ConsoleLog(link, 100, 1)
    assert target.read_bytes() == b"precious"
    errors: list[str] = []
    log = ConsoleLog(tmp_path / "guest-w.log", 0, 0, on_error=errors.append)
    os.close(log.fd)
    log.fd = os.open("/dev/null", os.O_RDONLY)  # every write now fails (EBADF)
    for _ in range(5):
        log.write(b"x")
    assert len(errors) == 1 and "guest-w.log" in errors[0]
    log.close()


def test_console_log_keep_zero_starts_afresh(tmp_path: Path) -> None:
    p = tmp_path / "guest-k.log"
    log = ConsoleLog(p, max_bytes=10, keep=0)
    log.write(b"0123456789abcdef")
    log.close()
    assert p.read_bytes() == b"abcdef" and [f.name for f in tmp_path.iterdir()] == ["guest-k.log"]


def test_console_io_lines_are_cut_and_limited() -> None:
    """A console_io write of 64 KiB without a newline is 1 KiB log lines,
    which pass the same per-domain limit (no 64 KiB line in dmesg)."""
    from pyxen.hv.domain import CONSOLE_IO_LINE_MAX, Domain
    d = Domain.__new__(Domain)
    d.domid, d.dmesg, d.log_sink, d.console_sinks = 2, [], None, []
    d.console_io_partial = b""
    d.log_ratelimit = PrintkRatelimit(5000, 4, FakeClock())
    d.console_io_write(b"y" * 65536)
    assert [len(x) for x in d.dmesg] == [len("(d2) ") + CONSOLE_IO_LINE_MAX] * 4
    assert d.log_ratelimit.suppressed_total == 65536 // CONSOLE_IO_LINE_MAX - 1 - 4
    assert len(d.console_io_partial) == CONSOLE_IO_LINE_MAX
