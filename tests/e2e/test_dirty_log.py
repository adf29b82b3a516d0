"""KVM dirty logging under a guest that rewrites its memory (for migration)."""

from __future__ import annotations

import time


def test_dirty_log_counts_guest_writes_and_stops_when_paused(run_guest) -> None:
    r = run_guest("dirtier", "mib=4", memory=32)
    r.wait_for(r"dirtier: pass 2 done")
    d = r.domain
    d.set_dirty_logging(True)
    d.read_dirty()
    time.sleep(0.3)
    dirty = d.read_dirty()
    assert len(dirty) >= 1024, f"only {len(dirty)} pages dirty while rewriting 4 MiB"
    assert all(0 <= p < d.nr_pages for p in dirty)
    d.pause()
    time.sleep(0.1)
    d.read_dirty()
    time.sleep(0.3)
    assert len(d.read_dirty()) <= 2, "pages dirtied while paused"
    d.unpause()
    d.set_dirty_logging(False)
