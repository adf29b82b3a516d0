"""bench/migprof.py's reading of ``pyxen dmesg`` lines into one timeline."""

from __future__ import annotations

import pytest

from bench.migprof import _timeline


def test_stamps_of_both_sides_and_netback_on_one_clock() -> None:
    lines = [
        "(d1) migrated out, from the suspend request (monotonic 100.000000): suspend asked 0.0 ms, "
        "suspended 4.0 ms, END sent 5.5 ms, ready 11.0 ms, report 12.0 ms",
        "(d2) migrated in, from the last round's first record (monotonic 100.006000): tail 0.0 ms, "
        "complete 2.0 ms, xenstore entries written 5.5 ms, go 6.0 ms",
        "(d2) netback vif2.0: connected, 1 queue(s), from the frontend's change (monotonic 100.020000): "
        "keys read +1.0 ms, rings mapped and served +2.5 ms, Connected +3.0 ms",
        "(d2) something else entirely",
    ]
    tl = _timeline(lines)
    assert tl["src:suspended"] == pytest.approx(100.004)
    assert tl["src:END sent"] == pytest.approx(100.0055)
    assert tl["dst:xenstore entries written"] == pytest.approx(100.0115)
    assert tl["dst:go"] == pytest.approx(100.012)
    assert tl["nb:frontend connected"] == pytest.approx(100.020)
    assert tl["nb:rings served"] == pytest.approx(100.0225)
    assert tl["nb:Connected"] == pytest.approx(100.023)
    assert len(tl) == 5 + 4 + 4


def test_a_malformed_stamp_is_skipped_not_fatal() -> None:
    tl = _timeline(["(d1) migrated in, from x (monotonic 5.0): tail 0.0 ms, built ? ms, go 1.0 ms"])
    assert tl == {"dst:tail": 5.0, "dst:go": pytest.approx(5.001)}
