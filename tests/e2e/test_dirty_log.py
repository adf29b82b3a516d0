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


def test_manual_protect_mode_keeps_bits_until_cleared(run_guest) -> None:
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 + INITIALLY_SET (a live migration's
    pre-copy): every page starts dirty; reading without protecting leaves the
    bits set; clear_dirty re-protects, after which only new writes show."""
    r = run_guest("dirtier", "mib=4", memory=32)
    r.wait_for(r"dirtier: pass 2 done")
    d = r.domain
    if not d.machine.vm.set_manual_dirty_protect(False):
        import pytest
        pytest.skip("this KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET")
    d.set_dirty_logging(True, all_dirty=True)
    try:
        assert d.dirty_manual
        first = d.read_dirty(protect=False)
        assert len(first) >= d.nr_pages - 64, f"initially set: only {len(first)} of {d.nr_pages}"
        d.pause()
        assert len(d.read_dirty(protect=False)) >= d.nr_pages - 64, "read without protect cleared bits"
        everything = list(range(d.nr_pages))
        for i in range(0, len(everything), 1000):  # batches not aligned to 64, as the sender's
            d.clear_dirty(everything[i:i + 1000])
        assert len(d.read_dirty(protect=False)) <= 2, "bits left after clear_dirty while paused"
        d.unpause()
        time.sleep(0.3)
        dirty = d.read_dirty(protect=False)
        assert len(dirty) >= 1024, f"only {len(dirty)} pages dirty while rewriting 4 MiB"
        assert all(0 <= p < d.nr_pages for p in dirty)
        # protect=True reads and re-protects at once, as outside manual mode
        d.read_dirty()
        d.pause()
        time.sleep(0.1)
        d.read_dirty()
        time.sleep(0.2)
        assert len(d.read_dirty()) <= 2, "pages dirtied while paused"
        d.unpause()
    finally:
        d.set_dirty_logging(False)
    # the next ordinary log is not in manual mode
    d.set_dirty_logging(True)
    try:
        assert not d.dirty_manual
        d.read_dirty()
        time.sleep(0.3)
        assert len(d.read_dirty()) >= 1024
    finally:
        d.set_dirty_logging(False)
