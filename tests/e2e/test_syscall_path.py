"""End-to-end: hypercalls made with `syscall` instead of the hypercall page.

The `sctest` guest makes hypercalls the way Linux does since the XSA-466
rework (and guests without a hypercall page, such as PV GRUB): `syscall` from
guest kernel mode, number in rax.  It checks that each gives what the
hypercall-port path gives, including update_va_mapping and mmu_update followed
by an immediate read through the new mapping (the queued PTE write and flush
must be applied before the guest resumes), the iret hypercall, event delivery
right after the hypercall, SCHEDOP_block, and a `syscall` from guest user mode
bounced to the syscall callback with DF clear.  It ends with VCPUOP_down of its
only vCPU, which powers the domain off as on Xen.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GuestRun

CHECKS = [
    "syscall.xen_version", "syscall.unknown_enosys",
    "syscall.update_va_mapping_immediate", "syscall.update_va_mapping_tlb_flush",
    "syscall.update_va_mapping_same_as_page",
    "syscall.mmu_update_immediate", "syscall.multicall", "syscall.iret",
    "syscall.iret_in_syscall",
    "syscall.event_delivery", "syscall.is_up_beyond_max", "syscall.is_up_regs",
    "syscall.is_up_event", "syscall.sched_block",
    "syscall.from_user_bounce", "syscall.from_user_df",
]


def _results(output: str) -> dict[str, str]:
    res = {}
    for m in re.finditer(r"^sctest: (\S+) (OK|FAIL.*)$", output, re.M):
        assert m.group(1) not in res, f"{m.group(1)} printed twice"
        res[m.group(1)] = m.group(2)
    return res


@pytest.fixture(scope="module")
def sctest(guest: Path) -> Iterator[GuestRun]:
    r = GuestRun(guest / "sctest", name="sctest")
    try:
        r.wait_for(r"^sctest: done", timeout=30)
        r.wait_stopped(10)
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("name", CHECKS)
def test_syscall_hypercall(sctest: GuestRun, name: str) -> None:
    res = _results(sctest.output)
    assert name in res, f"sctest printed no result for {name}:\n{sctest.output}"
    assert res[name] == "OK", f"{name}: {res[name]}"


def test_sctest_completes(sctest: GuestRun) -> None:
    res = _results(sctest.output)
    assert list(res) == CHECKS, "sctest's checks and this file's list differ"
    assert re.search(r"^sctest: done ok=\d+ fail=0$", sctest.output, re.M)


def test_vcpu_down_of_the_last_vcpu_powers_off(sctest: GuestRun) -> None:
    """Xen's common_vcpu_op: VCPUOP_down of the last vCPU that is up is
    domain_shutdown(SHUTDOWN_poweroff); the guest never runs again."""
    assert sctest.domain.state == "shutdown"
    assert sctest.domain.info()["shutdown_reason"] == "poweroff"
    assert "VCPUOP_down returned" not in sctest.output
