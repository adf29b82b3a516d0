"""Xen's PV domU MSR policy (pyxen/hv/msr.py), without KVM."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pyxen.hv import cpuid as C
from pyxen.hv import msr as MS
from tests.unit.test_cpuid import EPYC_PVM, EVERYTHING


@dataclass
class Host:
    """A vCPU as the policy sees it."""

    vcpu_id: int = 0
    kernel_mode: bool = True
    fs: int = 0
    gs: int = 0x1000
    gs_user: int = 0x2000
    gs_kernel_saved: int = 0
    tsc: int = 123456789
    efer_: int = 0xD01
    host: dict[int, int] = field(default_factory=lambda: {MS.MSR_IA32_UCODE_REV: 0xA0011D5})
    gp_handler: bool = True
    tsc_aux_hw: int = -1

    def fs_base(self) -> int:
        return self.fs

    def gs_base(self) -> int:
        return self.gs

    def gs_base_user(self) -> int:
        return self.gs_user

    def set_fs_base(self, val: int) -> None:
        self.fs = val

    def set_gs_base(self, val: int) -> None:
        self.gs = val

    def set_gs_shadow(self, val: int) -> None:
        self.gs_user = val

    def rdtsc(self) -> int:
        return self.tsc

    def efer(self) -> int:
        return self.efer_

    def host_rdmsr(self, idx: int) -> int | None:
        return self.host.get(idx)

    def set_tsc_aux(self, val: int) -> None:
        self.tsc_aux_hw = val

    def has_gp_handler(self) -> bool:
        return self.gp_handler


def amd() -> MS.MsrPolicy:
    return MS.MsrPolicy(C.pv_policy(EPYC_PVM, (4, 19), 1000))


def intel() -> MS.MsrPolicy:
    return MS.MsrPolicy(C.pv_policy(EVERYTHING, (4, 19), 1000))


def test_vendor_and_family() -> None:
    p = amd()
    assert p.vendor == MS.VENDOR_AMD and p.family == 0x19
    assert intel().vendor == MS.VENDOR_INTEL


def test_fixed_values() -> None:
    p, h, st = amd(), Host(), MS.VcpuMsrs()
    assert p.read(h, st, MS.MSR_IA32_CR_PAT) == 0x0000050100070406
    assert p.read(h, st, MS.MSR_APIC_BASE) == 0xFEE00900
    assert p.read(Host(vcpu_id=1), st, MS.MSR_APIC_BASE) == 0xFEE00800
    assert p.read(h, st, MS.MSR_EFER) == 0xD01
    assert p.read(Host(efer_=0xD01 | MS.EFER_SVME), st, MS.MSR_EFER) == 0xD01  # SVME hidden
    assert p.read(h, st, MS.MSR_IA32_TSC) == 123456789
    assert p.read(h, st, MS.MSR_INTEL_PLATFORM_INFO) == MS.PLATFORM_INFO_CPUID_FAULTING
    assert p.read(h, st, MS.MSR_IA32_UCODE_REV) == 0xA0011D5
    assert p.read(h, st, MS.MSR_XEN_HYPERCALL_PAGE) == 0
    assert p.read(h, st, MS.MSR_IA32_MCG_CAP) == 2
    assert p.read(h, st, MS.MSR_IA32_MC0_CTL) == (1 << 64) - 1
    assert p.read(h, st, MS.MSR_IA32_MC0_CTL + 1) == 0


def test_amd_boot_msrs() -> None:
    """What Linux reads on an EPYC host: HWCR, DE_CFG (LFENCE serialising), SYSCFG (#GP: domU)."""
    p, h, st = amd(), Host(), MS.VcpuMsrs()
    assert p.read(h, st, MS.MSR_K8_HWCR) == 0
    assert p.read(h, st, MS.MSR_AMD64_DE_CFG) == MS.AMD64_DE_CFG_LFENCE_SERIALISE
    assert p.read(h, st, MS.MSR_K8_SYSCFG) is None
    assert p.read(h, st, MS.MSR_K8_TOP_MEM1) is None
    assert p.read(h, st, MS.MSR_AMD64_NB_CFG) == 0
    assert p.read(h, st, MS.MSR_FAM10H_MMIO_CONF_BASE) is None  # family 0x19
    assert p.read(h, st, MS.MSR_K8_PSTATE_LIMIT) == 0
    assert p.read(h, st, MS.MSR_K7_EVNTSEL0) == 0  # vPMU off
    assert p.read(h, st, MS.MSR_IA32_MISC_ENABLE) is None  # the host has none
    assert p.read(h, st, MS.MSR_IA32_FEATURE_CONTROL) is None  # Intel only
    assert p.write(h, st, MS.MSR_AMD64_DE_CFG, 0x1234)  # dropped
    assert p.read(h, st, MS.MSR_AMD64_DE_CFG) == MS.AMD64_DE_CFG_LFENCE_SERIALISE
    assert p.write(h, st, MS.MSR_K8_HWCR, 0)


def test_intel_msrs() -> None:
    p, st = intel(), MS.VcpuMsrs()
    h = Host(host={MS.MSR_IA32_MISC_ENABLE: MS.MISC_ENABLE_PERF_AVAIL | 1})
    assert p.read(h, st, MS.MSR_IA32_FEATURE_CONTROL) == 1
    v = p.read(h, st, MS.MSR_IA32_MISC_ENABLE)
    assert v == 1 | MS.MISC_ENABLE_BTS_UNAVAIL | MS.MISC_ENABLE_PEBS_UNAVAIL | MS.MISC_ENABLE_XTPR_DISABLE
    assert p.read(h, st, MS.MSR_K8_HWCR) is None
    assert p.read(h, st, 0x186) == 0  # P6 EVNTSEL0: vPMU off
    assert not p.write(h, st, MS.MSR_IA32_UCODE_REV, 1)
    assert p.write(h, st, MS.MSR_IA32_UCODE_REV, 0)  # "write 0, cpuid, read"


def test_unknown_msr_gp_and_fake_read() -> None:
    p, st = amd(), MS.VcpuMsrs()
    assert p.read(Host(), st, 0x12345678) is None
    assert not p.write(Host(), st, 0x12345678, 0)
    # before the guest has a #GP handler, a read of an MSR the host has reads 0 (Xen fakes it)
    h = Host(gp_handler=False, host={0xC0010010: 0x740000})
    assert p.read(h, st, MS.MSR_K8_SYSCFG) == 0
    assert p.read(h, st, 0x12345678) is None  # the host has none: #GP anyway
    assert p.read(Host(gp_handler=False), st, 0x40000001) is None  # never for 0x4000xxxx


def test_segment_bases() -> None:
    p, h, st = amd(), Host(), MS.VcpuMsrs()
    assert p.read(h, st, MS.MSR_GS_BASE) == 0x1000
    assert p.read(h, st, MS.MSR_SHADOW_GS_BASE) == 0x2000
    assert p.write(h, st, MS.MSR_GS_BASE, 0xFFFF888000000000)
    assert h.gs == 0xFFFF888000000000
    assert p.write(h, st, MS.MSR_FS_BASE, 0x7000)
    assert h.fs == 0x7000
    assert p.write(h, st, MS.MSR_SHADOW_GS_BASE, 0x3000)
    assert h.gs_user == 0x3000
    assert not p.write(h, st, MS.MSR_GS_BASE, 0x0000800000000000)  # non-canonical
    assert h.gs == 0xFFFF888000000000


def test_efer_and_pat_writes() -> None:
    p, h, st = amd(), Host(), MS.VcpuMsrs()
    assert p.write(h, st, MS.MSR_EFER, 0xD01)  # Linux writes the current value back
    assert not p.write(h, st, MS.MSR_EFER, 0x501)
    assert not p.write(h, st, MS.MSR_IA32_CR_PAT, MS.XEN_MSR_PAT)  # PAT is read-only for PV
    assert not p.write(h, st, MS.MSR_INTEL_PLATFORM_INFO, 0)


def test_misc_features_enables() -> None:
    p, h, st = amd(), Host(), MS.VcpuMsrs()
    assert p.write(h, st, MS.MSR_INTEL_MISC_FEATURES_ENABLES, 1)
    assert p.read(h, st, MS.MSR_INTEL_MISC_FEATURES_ENABLES) == 1
    assert not p.write(h, st, MS.MSR_INTEL_MISC_FEATURES_ENABLES, 2)


@pytest.mark.parametrize("rdtscp", [False, True])
def test_tsc_aux_follows_cpuid(rdtscp: bool) -> None:
    host = [e for e in EPYC_PVM if e[0] != 0x80000001]
    edx = 0x23D3FBFF | (1 << 27 if rdtscp else 0)
    host.append((0x80000001, 0, (0, 0, 0, edx)))
    p, h, st = MS.MsrPolicy(C.pv_policy(host, (4, 19), 1)), Host(), MS.VcpuMsrs()
    assert p.write(h, st, MS.MSR_TSC_AUX, 5) is rdtscp
    if rdtscp:
        assert p.read(h, st, MS.MSR_TSC_AUX) == 5 and h.tsc_aux_hw == 5
        assert not p.write(h, st, MS.MSR_TSC_AUX, 1 << 32)
    else:
        assert p.read(h, st, MS.MSR_TSC_AUX) is None


def test_write_only_and_readonly() -> None:
    p, h, st = amd(), Host(), MS.VcpuMsrs()
    for idx in (MS.MSR_PRED_CMD, MS.MSR_FLUSH_CMD, MS.MSR_AMD_PATCHLOADER, MS.MSR_IA32_UCODE_WRITE):
        assert p.read(h, st, idx) is None
    assert not p.write(h, st, MS.MSR_AMD_PATCHLOADER, 0)
    assert not p.write(h, st, MS.MSR_ARCH_CAPABILITIES, 0)
    assert not p.write(h, st, MS.MSR_IA32_MCG_CAP, 0)
    assert p.write(h, st, MS.MSR_IA32_MC0_CTL + 1, 7)  # bank 0 status: kept
    assert p.read(h, st, MS.MSR_IA32_MC0_CTL + 1) == 7
