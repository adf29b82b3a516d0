"""Pure parts of live migration: Clark et al.'s rate limit (RatePolicy), the
xl conversation's messages, and the downtime computed from heartbeat arrivals."""

from __future__ import annotations

import os

import pytest

from pyxen.migration import protocol as P
from pyxen.migration.live import PAGE_BITS, RatePolicy, Throttle


def test_first_round_at_the_minimum_and_next_at_dirtying_rate_plus_50() -> None:
    p = RatePolicy(min_rate=100, max_rate=500)
    assert p.first() == 100
    # 10000 pages/s = 327.68 Mbit/s, + 50
    assert p.next_rate(10000) == pytest.approx(10000 * PAGE_BITS / 1e6 + 50)
    assert p.next_rate(0) == 100  # never below the minimum


def test_defaults_are_xens_stream_v2_save() -> None:
    # xg_sr_save.c: max_iterations 5 (the first sends every page), dirty_threshold 50
    p = RatePolicy()
    assert (p.max_rounds, p.few_pages) == (5, 50)
    assert p.stop(4, 4096, 1000) is None and "5 rounds" in (p.stop(5, 4096, 1000) or "")


def test_stop_conditions() -> None:
    p = RatePolicy(min_rate=100, max_rate=500, max_rounds=5, few_pages=50)
    assert p.stop(1, 49, 200) and "remain" in p.stop(1, 49, 200)  # type: ignore[operator]
    assert "max" in (p.stop(1, 1000, 501) or "")
    assert "rounds" in (p.stop(5, 1000, 200) or "")
    assert p.stop(2, 1000, 200) is None


def test_throttle_holds_the_rate() -> None:
    import time
    t = Throttle(8 * 4096 * 100 / 1e6)  # 100 pages/s
    t0 = time.monotonic()
    t(10)  # 10 pages at 100 pages/s: ~0.1 s
    assert time.monotonic() - t0 >= 0.09


def test_xl_messages_are_xls() -> None:
    assert P.BANNER == b"xl migration receiver ready, send binary domain data.\n"
    assert P.READY.endswith(b"\0") and P.GO.endswith(b"\0") and P.REPORT.endswith(b"\0")


def test_reservation_answers() -> None:
    assert P.parse_reservation(P.RESERVED + b"7\n") == 7
    with pytest.raises(P.ProtocolError, match="refused the domain: no memory"):
        P.parse_reservation(P.REFUSED + b"no memory\n")
    with pytest.raises(P.ProtocolError, match="unexpected"):
        P.parse_reservation(b"garbage\n")


def test_read_exact_reports_a_closed_peer() -> None:
    r, w = os.pipe()
    os.write(w, b"xl migr")
    os.close(w)
    with pytest.raises(P.ProtocolError, match="closed the connection before the banner"):
        P.expect(r, P.BANNER, 1, "banner")
    os.close(r)


def test_downtime_is_the_largest_gap_minus_the_period() -> None:
    from bench.migration import downtime_ms
    before = {1: 0.00, 2: 0.01, 3: 0.02}
    after = {3: 0.5, 4: 0.10, 5: 0.11}  # tick 3 was seen on the source first
    dt, n = downtime_ms(before, after, 10)
    assert n == 5 and dt == pytest.approx(70.0)


def test_switch_gap_is_the_gap_across_the_move() -> None:
    from bench.migration import switch_gap_ms
    before = {1: 0.00, 2: 0.01, 3: 0.02}
    after = {3: 0.5, 4: 0.06, 5: 0.07}  # the destination's first own heartbeat is 4
    assert switch_gap_ms(before, after, 10) == pytest.approx(30.0)


def test_plot_tool_draws_both_figures(tmp_path) -> None:  # noqa: ANN001
    """tools/plot-migration on a stats file as `pyxen migrate --stats` and the
    bench write it (rounds; heartbeat for --interarrival)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("matplotlib", reason="SKIPPED LOUDLY: matplotlib missing (pip install .[plot])")
    tool = Path(__file__).resolve().parents[2] / "tools" / "plot-migration"
    st = {"rounds": [{"round": 1, "pages": 4096, "seconds": 0.1, "dirty_rate": 900.0,
                      "rate_limit": 1000.0, "bytes": 1, "live": True},
                     {"round": 2, "pages": 300, "seconds": 0.01, "dirty_rate": 800.0,
                      "rate_limit": 1050.0, "bytes": 1, "live": True},
                     {"round": 3, "pages": 20, "seconds": 0.002, "dirty_rate": 0.0,
                      "rate_limit": 8000.0, "bytes": 1, "live": False}],
          "pages": 4416, "downtime_seconds": 0.004, "stop_reason": "few pages",
          "heartbeat": {"period_ms": 5, "arrivals": [[i, i * 0.005 + (0.03 if i > 50 else 0)]
                                                     for i in range(100)], "migrate_s": [0.0, 0.3]}}
    f = tmp_path / "m.json"
    f.write_text(json.dumps(st))
    for args, out in (([], "p.png"), (["--interarrival"], "i.png")):
        r = subprocess.run([sys.executable, str(tool), *args, str(f), str(tmp_path / out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / out).read_bytes()[:4] == b"\x89PNG"


def test_clear_bitmap_aligns_to_64_pages_and_stops_at_the_slot_end() -> None:
    from pyxen.hv.domain import clear_bitmap
    # a run starting mid-word: first page rounded down to 64, whole words of bits
    lo, n, bm = clear_bitmap(list(range(70, 200)), 1000)  # type: ignore[misc]
    assert (lo, n, len(bm)) == (64, 192, 24)
    bits = int.from_bytes(bm, "little")
    assert [i + lo for i in range(n) if bits >> i & 1] == list(range(70, 200))
    # scattered pfns; the range ends at the slot's end (not a multiple of 64)
    lo, n, bm = clear_bitmap([3, 64, 130, 999], 1000)  # type: ignore[misc]
    assert (lo, n, len(bm)) == (0, 1000, 128)
    bits = int.from_bytes(bm, "little")
    assert [i for i in range(n) if bits >> i & 1] == [3, 64, 130, 999]
    # pfns past the slot are dropped; none in it: nothing to clear
    lo, n, bm = clear_bitmap(list(range(990, 1010)), 1000)  # type: ignore[misc]
    assert (lo, n) == (960, 40) and int.from_bytes(bm, "little") == ((1 << 10) - 1) << 30
    assert clear_bitmap([1000, 1001], 1000) is None
    assert clear_bitmap([], 1000) is None
