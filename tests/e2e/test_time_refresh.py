"""A timer deadline that is already due refreshes the vCPU's time record.

Linux re-arms a timer that fired early (by its own clock) at >= 100 us ahead
(xen_vcpuop_set_next_event, TIMER_SLOP).  If the guest's clock lags the
host's by more than that, each re-arm is already due by the host's clock;
set_timer_op used to raise VIRQ_TIMER at once without refreshing the
record, so the lag stayed and the guest took timer interrupts back to back
for ever: the full-suite soft lockups at xen_hypercall_pv+5 (in
xen_force_evtchn_callback, registers unchanged across 84 s of reports)."""

from __future__ import annotations

import time

from pyxen import abi
from pyxen.hv.time import scale_delta, write_vcpu_time


def test_due_deadline_refreshes_a_lagging_record(run_guest) -> None:
    g = run_guest("ticker", start=False)  # no vCPU thread: this thread may read the TSC
    d = g.domain
    v = d.vcpus[0]
    while d.clock.system_time() < 400_000_000:  # room for a 300 ms lag
        time.sleep(0.05)
    v.update_time()
    off = v.vi_off + abi.VI_TIME
    _, _, tsc0, sys0, mul, shift, _ = abi.VCPU_TIME_INFO.unpack_from(v.vi_buf, off)
    with v.time_lock:  # the guest's clock 300 ms behind the host's
        write_vcpu_time(v.vi_buf, off, tsc0, sys0 - 300_000_000, mul, shift)
    before = d.clock.system_time()
    assert d.hypercalls.do_set_timer_op(v, before - 1) == 0
    after = d.clock.system_time()
    _, _, tsc1, sys1, _, _, _ = abi.VCPU_TIME_INFO.unpack_from(v.vi_buf, off)
    assert before <= sys1 <= after, (before, sys1, after)
    # the guest's clock, read at the new stamp, is the host's again (not 300 ms behind)
    assert sys1 >= sys0 - 300_000_000 + scale_delta(tsc1 - tsc0, mul, shift) + 250_000_000
