"""End-to-end: the `emutest` guest executes the instructions Xen emulates for a
PV kernel (forced cpuid, rdmsr/wrmsr, mov to/from CR and DR, in/out under the
virtual IOPL, cli/sti, clts, wbinvd, xsetbv, loads from the fixed M2P address)
and checks each result against Xen's behaviour (pyxen/hv/emulate.py, msr.py,
cpuid.py; docs/emulate.md).  It prints "emutest: <name> OK|FAIL|SKIP".

The guest runs twice: with the virtual IOPL at 0 (port I/O, cli and sti must
#GP) and with the toolstack having set it to 1 before the start, as
PHYSDEVOP_set_iopl would (the guest kernel counts as CPL1, so I/O is allowed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GuestRun

COMMON = [
    "cpuid.forced.signature", "cpuid.forced.version", "cpuid.forced.hypercall_leaf",
    "cpuid.forced.time_leaf", "cpuid.native.signature", "cpuid.native.xen_leaves",
    "cpuid.native.leaf1_matches_forced", "cpuid.pv_masked_leaf1", "cpuid.pv_masked_leaf7",
    "cpuid.svm_hidden",
    "rdmsr.pat", "rdmsr.efer", "rdmsr.apic_base", "rdmsr.unknown_gp", "wrmsr.unknown_gp",
    "wrmsr.efer_same_value", "wrmsr.efer_change_gp", "wrmsr.pat_gp", "rdmsr.platform_info",
    "wrmsr.tsc_aux",
    "wrmsr.gs_base", "wrmsr.gs_base_noncanonical_gp", "wrmsr.shadow_gs_base",
    "mov_from_cr3", "mov_to_cr3_same", "mov_to_cr3_writable_page_gp", "mov_from_cr4",
    "cr0_ts_and_clts", "mov_to_cr0_other_bits_gp", "mov_to_cr0_ts", "mov_cr2",
    "mov_dr0", "mov_dr0_xen_range_gp", "mov_from_dr7", "mov_from_dr6",
    "wbinvd_nop", "hlt_gp", "xsetbv_ud", "plain_ud2_ud",
]
VENDOR_AMD = ["rdmsr.amd_hwcr", "rdmsr.amd_de_cfg", "rdmsr.amd_syscfg_domu_gp"]
VENDOR_INTEL = ["rdmsr.intel_feature_control", "rdmsr.intel_misc_enable"]
IO_DENIED = ["io.in_without_iopl_gp", "io.in_imm8_without_iopl_gp", "io.out_without_iopl_gp",
             "cli_without_iopl_gp",
             "sti_without_iopl_gp"]
IO_ALLOWED = ["io.in_speaker_port", "io.out_dropped", "io.pci_cf8_latch", "io.pci_cfc_all_ones",
              "io.cmos_index_latch", "io.rep_insb", "cli_with_iopl_nop", "sti_with_iopl_nop",
              "io.in_imm8_pit_all_ones", "io.in_imm8_speaker_and_pit", "io.in_imm8_other_port_all_ones",
              "io.in_imm8_run_of_pit_reads"]
M2P = ["m2p_fixed.load64", "m2p_fixed.load32", "m2p_fixed.matches_machphys_mapping"]

ON_PVM = Path("/sys/module/kvm_pvm").exists()
PLATFORM_LIMITS = {
    "cpuid.native.leaf1_matches_forced": (
        "PVM host limit: a plain `cpuid` at CPL3 returns the hardware's leaf 1 with only the "
        "KVM-owned bits (x2APIC, TSC-deadline, HYPERVISOR, CX16) taken from KVM_SET_CPUID2; the "
        "hypervisor leaves 0x4000000x do come from the table (cpuid.native.xen_leaves)"),
}


def _results(output: str) -> dict[str, str]:
    res = {}
    for m in re.finditer(r"^emutest: (\S+) (OK|FAIL.*|SKIP.*)$", output, re.M):
        assert m.group(1) not in res, f"{m.group(1)} printed twice"
        res[m.group(1)] = m.group(2)
    return res


def _run(guest: Path, iopl: int) -> Iterator[GuestRun]:
    r = GuestRun(guest / "emutest", cmdline=f"iopl={iopl}" if iopl else "", name="emutest",
                 start=False)
    try:
        r.domain.vcpus[0].iopl = iopl  # what PHYSDEVOP_set_iopl records
        r.domain.start()
        r.wait_for(r"^emutest: done", timeout=60)
        r.wait_stopped(10)
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module")
def emutest(guest: Path) -> Iterator[GuestRun]:
    yield from _run(guest, 0)


@pytest.fixture(scope="module")
def emutest_iopl(guest: Path) -> Iterator[GuestRun]:
    yield from _run(guest, 1)


def _check(res: dict[str, str], name: str) -> None:
    assert name in res, f"emutest printed no result for {name}"
    if res[name].startswith("SKIP"):
        pytest.skip(f"{name}: {res[name]}")
    if name in PLATFORM_LIMITS and ON_PVM:
        if res[name] == "OK":
            pytest.fail(f"{name} passed: the platform limit is gone, drop it from PLATFORM_LIMITS")
        pytest.xfail(PLATFORM_LIMITS[name])
    assert res[name] == "OK", f"{name}: {res[name]}"


def _vendor_checks(res: dict[str, str]) -> list[str]:
    return VENDOR_AMD if "rdmsr.amd_hwcr" in res else VENDOR_INTEL


@pytest.mark.parametrize("name", COMMON + IO_DENIED + M2P)
def test_emulated(emutest: GuestRun, name: str) -> None:
    _check(_results(emutest.output), name)


def test_emulated_vendor_msrs(emutest: GuestRun) -> None:
    res = _results(emutest.output)
    for name in _vendor_checks(res):
        _check(res, name)


@pytest.mark.parametrize("name", IO_ALLOWED)
def test_emulated_with_iopl(emutest_iopl: GuestRun, name: str) -> None:
    _check(_results(emutest_iopl.output), name)


def test_fast_path_served_the_guest_kernel(emutest_iopl: GuestRun) -> None:
    """The CPL0 #GP fast path (machine.FAST_GP_CODE) answered the iopl run's
    `in $imm8` and cli/sti without an exit, and the checks above hold for them."""
    from pyxen.hv import emulate
    assert emulate.fast_path_count(emutest_iopl.domain.vcpus[0]) >= 5


def test_emutest_completes(emutest: GuestRun, emutest_iopl: GuestRun) -> None:
    for run, io in ((emutest, IO_DENIED), (emutest_iopl, IO_ALLOWED)):
        res = _results(run.output)
        expected = COMMON + _vendor_checks(res) + io + M2P
        got = [n for n in res if n not in ("io.set_iopl", "io.iopl0_again_gp")
               and n not in IO_ALLOWED + IO_DENIED] + [n for n in res if n in io]
        assert sorted(got) == sorted(expected), "emutest's checks and this file's list differ"
        assert run.domain.state == "shutdown"
        assert run.domain.info()["shutdown_reason"] == "poweroff"
        unexpected = {n: v for n, v in res.items()
                      if v.startswith("FAIL") and not (ON_PVM and n in PLATFORM_LIMITS)}
        assert not unexpected, unexpected
        # every emulation went through the hypervisor's emulator, none crashed the domain
        assert run.domain.vcpus[0].stats.get("emulated", 0) >= len(COMMON)
