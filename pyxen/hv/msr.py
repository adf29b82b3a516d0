"""MSRs as Xen shows them to a 64-bit PV domU.

A PV kernel runs at CPL3 here (and at CPL3 on Xen too), so every ``rdmsr`` and
``wrmsr`` faults with #GP and is emulated.  The rules follow Xen's
``xen/arch/x86/msr.c`` (guest_rdmsr/guest_wrmsr, consulted first) and then
``xen/arch/x86/pv/emul-priv-op.c`` (read_msr/write_msr) for a domU that is not
the hardware domain, not a cpufreq controller, has no vPMU and no
``msr_relaxed``:

* an MSR Xen does not know is #GP, except that a *read* of an MSR the host
  has, made before the guest registered a #GP handler, reads as 0 ("faking
  RDMSR");
* writes Xen tolerates but ignores return success and change nothing.

The policy is pure: the vCPU state it reads and writes (segment bases, TSC,
host MSR values) comes through ``MsrHost``, so it is unit-tested without KVM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .cpuid import PvCpuidPolicy

MSR_IA32_TSC = 0x10
MSR_IA32_PLATFORM_ID = 0x17
MSR_APIC_BASE = 0x1B
MSR_IA32_FEATURE_CONTROL = 0x3A
MSR_SPEC_CTRL = 0x48
MSR_PRED_CMD = 0x49
MSR_IA32_UCODE_WRITE = 0x79
MSR_IA32_UCODE_REV = 0x8B  # AMD: PATCHLEVEL
MSR_INTEL_PLATFORM_INFO = 0xCE
MSR_ARCH_CAPABILITIES = 0x10A
MSR_FLUSH_CMD = 0x10B
MSR_INTEL_MISC_FEATURES_ENABLES = 0x140
MSR_IA32_MCG_CAP, MSR_IA32_MCG_STATUS, MSR_IA32_MCG_CTL = 0x179, 0x17A, 0x17B
MSR_IA32_PERF_STATUS, MSR_IA32_PERF_CTL = 0x198, 0x199
MSR_IA32_THERM_STATUS = 0x19C
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_CR_PAT = 0x277
MSR_IA32_PERF_CAPABILITIES = 0x345
MSR_IA32_MC0_CTL = 0x400
MSR_IA32_XSS = 0xDA0
MSR_EFER = 0xC0000080
MSR_FS_BASE, MSR_GS_BASE, MSR_SHADOW_GS_BASE = 0xC0000100, 0xC0000101, 0xC0000102
MSR_TSC_AUX = 0xC0000103
MSR_K7_EVNTSEL0, MSR_K7_PERFCTR3 = 0xC0010000, 0xC0010007
MSR_K8_SYSCFG = 0xC0010010
MSR_K8_HWCR = 0xC0010015
MSR_K8_TOP_MEM1, MSR_K8_TOP_MEM2 = 0xC001001A, 0xC001001D
MSR_AMD64_NB_CFG = 0xC001001F
MSR_K7_FID_VID_CTL, MSR_K7_FID_VID_STATUS = 0xC0010041, 0xC0010042
MSR_FAM10H_MMIO_CONF_BASE = 0xC0010058
MSR_K8_PSTATE_LIMIT, MSR_K8_PSTATE7 = 0xC0010061, 0xC001006B
MSR_VIRT_SPEC_CTRL = 0xC001011F
MSR_AMD_FAM15H_EVNTSEL0, MSR_AMD_FAM15H_PERFCTR5 = 0xC0010200, 0xC001020B
MSR_AMD64_DE_CFG = 0xC0011029
MSR_AMD_PATCHLOADER = 0xC0010020
MSR_XEN_HYPERCALL_PAGE = 0x40000000

APIC_BASE_BSP, APIC_BASE_ENABLE, APIC_DEFAULT_PHYS_BASE = 0x100, 0x800, 0xFEE00000
AMD64_DE_CFG_LFENCE_SERIALISE = 1 << 1
# XEN_MSR_PAT: WB, WT, UC-, UC, WC, WP, UC, UC (an ABI with PV guests)
XEN_MSR_PAT = 0x0000050100070406
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11
EFER_SVME, EFER_FFXSE, EFER_AIBRSE = 1 << 12, 1 << 14, 1 << 21
EFER_KNOWN_MASK = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE | EFER_SVME | EFER_FFXSE | EFER_AIBRSE
MISC_ENABLE_PERF_AVAIL, MISC_ENABLE_BTS_UNAVAIL = 1 << 7, 1 << 11
MISC_ENABLE_PEBS_UNAVAIL, MISC_ENABLE_MONITOR_ENABLE = 1 << 12, 1 << 18
MISC_ENABLE_XTPR_DISABLE = 1 << 23
PLATFORM_INFO_CPUID_FAULTING = 1 << 31
MISC_FEATURES_CPUID_FAULTING = 1 << 0
GUEST_MC_BANK_NUM = 2  # AMD_GUEST_MCG_CAP
SPEC_CTRL_SSBD = 1 << 2

VENDOR_INTEL, VENDOR_AMD, VENDOR_OTHER = "intel", "amd", "other"


class MsrHost(Protocol):
    """What the policy needs from the vCPU: its live state and the host."""

    vcpu_id: int
    kernel_mode: bool

    def fs_base(self) -> int: ...
    def gs_base(self) -> int: ...  # the GS base in effect now
    def gs_base_user(self) -> int: ...  # the user GS base while in kernel mode (Xen's gs_base_user)
    def set_fs_base(self, val: int) -> None: ...
    def set_gs_base(self, val: int) -> None: ...
    def set_gs_shadow(self, val: int) -> None: ...
    def rdtsc(self) -> int: ...
    def efer(self) -> int: ...
    def host_rdmsr(self, idx: int) -> int | None: ...  # None: the host has no such MSR
    def set_tsc_aux(self, val: int) -> None: ...
    def has_gp_handler(self) -> bool: ...


def canonical(va: int) -> bool:
    return va < 0x0000800000000000 or 0xFFFF800000000000 <= va <= 0xFFFFFFFFFFFFFFFF


def guest_misc_enable(val: int) -> int:
    val &= ~(MISC_ENABLE_PERF_AVAIL | MISC_ENABLE_MONITOR_ENABLE)
    return val | MISC_ENABLE_BTS_UNAVAIL | MISC_ENABLE_PEBS_UNAVAIL | MISC_ENABLE_XTPR_DISABLE


def vendor_of(cpuid: PvCpuidPolicy) -> str:
    _, b, c, d = cpuid.lookup(0, 0)
    sig = b.to_bytes(4, "little") + d.to_bytes(4, "little") + c.to_bytes(4, "little")
    if sig == b"GenuineIntel":
        return VENDOR_INTEL
    if sig in (b"AuthenticAMD", b"HygonGenuine"):
        return VENDOR_AMD
    return VENDOR_OTHER


@dataclass
class VcpuMsrs:
    """Per-vCPU MSR state Xen keeps (struct vcpu_msrs and a few PV fields)."""

    tsc_aux: int = 0
    misc_features_enables: int = 0
    virt_spec_ctrl: int = 0
    spec_ctrl: int = 0
    xss: int = 0
    mci: dict[int, int] = field(default_factory=dict)  # vMCE bank MSRs (status/addr/misc)


class MsrPolicy:
    """rdmsr/wrmsr of a PV domU.  ``read`` returns the value or None for #GP;
    ``write`` returns True when done (or ignored) and False for #GP."""

    def __init__(self, cpuid: PvCpuidPolicy) -> None:
        self.cpuid = cpuid
        self.vendor = vendor_of(cpuid)
        fam = cpuid.lookup(1, 0)[0]
        self.family = ((fam >> 8) & 0xF) + (((fam >> 20) & 0xFF) if (fam >> 8) & 0xF == 0xF else 0)
        self.lm = cpuid.has(0x80000001, 0, 3, 29)
        self.rdtscp = cpuid.has(0x80000001, 0, 3, 27) or cpuid.has(0x7, 0, 2, 22)
        self.ibrs = cpuid.has(0x7, 0, 3, 26) or cpuid.has(0x80000008, 0, 1, 14)
        self.ibpb = cpuid.has(0x7, 0, 3, 26) or cpuid.has(0x80000008, 0, 1, 12)
        self.arch_caps = cpuid.has(0x7, 0, 3, 29)
        self.virt_ssbd = cpuid.has(0x80000008, 0, 1, 25)
        self.xsaves = cpuid.has(0xD, 1, 0, 3)
        self.amd = self.vendor == VENDOR_AMD
        self.intel = self.vendor == VENDOR_INTEL

    # ------------------------------------------------------------ reads
    def read(self, h: MsrHost, st: VcpuMsrs, idx: int) -> int | None:
        val = self._read(h, st, idx & 0xFFFFFFFF)
        if val is None and not h.has_gp_handler() and (idx >> 16) != 0x4000 \
                and h.host_rdmsr(idx) is not None:
            return 0  # Xen fakes the read of a real MSR before a #GP handler exists
        return val

    def _read(self, h: MsrHost, st: VcpuMsrs, idx: int) -> int | None:
        v = self._guest_rdmsr(h, st, idx)
        if v is not _UNHANDLED:
            return v  # type: ignore[return-value]
        # emul-priv-op.c read_msr
        if idx == MSR_APIC_BASE:
            return APIC_BASE_ENABLE | APIC_DEFAULT_PHYS_BASE | (APIC_BASE_BSP if h.vcpu_id == 0 else 0)
        if idx == MSR_FS_BASE:
            return h.fs_base() if self.lm else None
        if idx == MSR_GS_BASE:
            return h.gs_base() if self.lm else None
        if idx == MSR_SHADOW_GS_BASE:
            return h.gs_base_user() if self.lm else None
        if idx == MSR_IA32_TSC:
            return h.rdtsc()
        if idx == MSR_EFER:
            return h.efer() & EFER_KNOWN_MASK & ~(EFER_SVME | EFER_AIBRSE)
        if idx == MSR_IA32_CR_PAT:
            return XEN_MSR_PAT
        if idx in (MSR_K7_FID_VID_CTL, MSR_K7_FID_VID_STATUS) \
                or MSR_K8_PSTATE_LIMIT <= idx <= MSR_K8_PSTATE7:
            return 0 if self.amd else None
        if idx == MSR_FAM10H_MMIO_CONF_BASE:
            return 0 if self.amd and 0x10 <= self.family < 0x17 else None
        if idx == MSR_AMD64_NB_CFG:
            return 0
        if idx == MSR_IA32_MISC_ENABLE:
            host = h.host_rdmsr(idx)
            return None if host is None else guest_misc_enable(host)
        if idx == MSR_IA32_PERF_CAPABILITIES:
            return 0
        if self._is_pmu(idx):
            return 0  # vPMU off: reads give 0 (vpmu_do_rdmsr's nop path)
        return None

    def _is_pmu(self, idx: int) -> bool:
        if self.intel:
            return (0xC1 <= idx <= 0xC8 or 0x186 <= idx <= 0x18D or 0x309 <= idx <= 0x30B
                    or 0x38D <= idx <= 0x390)
        if self.amd:
            return MSR_K7_EVNTSEL0 <= idx <= MSR_K7_PERFCTR3 \
                or MSR_AMD_FAM15H_EVNTSEL0 <= idx <= MSR_AMD_FAM15H_PERFCTR5
        return False

    @staticmethod
    def _is_mce(idx: int) -> bool:
        return (MSR_IA32_MCG_CAP <= idx <= MSR_IA32_MCG_CTL or 0x280 <= idx <= 0x29F
                or 0x400 <= idx <= 0x47F or idx == 0x4D0 or idx in (0, 1))

    def _guest_rdmsr(self, h: MsrHost, st: VcpuMsrs, idx: int) -> int | None | object:
        if idx in (MSR_AMD_PATCHLOADER, MSR_IA32_UCODE_WRITE, MSR_PRED_CMD, MSR_FLUSH_CMD):
            return None  # write-only
        if idx == MSR_IA32_FEATURE_CONTROL:
            return 1 if self.intel else None  # LOCK
        if idx == MSR_IA32_PLATFORM_ID:
            return h.host_rdmsr(idx) if self.intel else None
        if idx == MSR_IA32_UCODE_REV:
            return h.host_rdmsr(idx) if (self.intel or self.amd) else None
        if idx == MSR_SPEC_CTRL:
            return st.spec_ctrl if self.ibrs else None
        if idx == MSR_INTEL_PLATFORM_INFO:
            return PLATFORM_INFO_CPUID_FAULTING  # Xen virtualises CPUID faulting for PV
        if idx == MSR_ARCH_CAPABILITIES:
            if not self.arch_caps:
                return None
            return (h.host_rdmsr(idx) or 0) & 0x400000001D12E173
        if idx == MSR_INTEL_MISC_FEATURES_ENABLES:
            return st.misc_features_enables
        if self._is_mce(idx):
            return self._vmce_read(st, idx)
        if idx in (MSR_IA32_PERF_STATUS, MSR_IA32_PERF_CTL):
            return 0 if self.intel else None
        if idx == MSR_IA32_THERM_STATUS:
            return 0 if self.intel else None
        if idx == MSR_IA32_XSS:
            return st.xss if self.xsaves else None
        if 0x40000000 <= idx <= 0x400002FF:
            return 0 if idx == MSR_XEN_HYPERCALL_PAGE else None
        if idx == MSR_TSC_AUX:
            return st.tsc_aux if self.rdtscp else None
        if idx == MSR_K8_SYSCFG or MSR_K8_TOP_MEM1 <= idx <= MSR_K8_TOP_MEM2 \
                or 0xC0010016 <= idx <= 0xC0010019 or idx in (0xC0010112, 0xC0010113):
            return None if not self.amd else _UNHANDLED  # domU: on to read_msr (#GP there)
        if idx == MSR_K8_HWCR:
            return 0 if self.amd else None
        if idx == MSR_VIRT_SPEC_CTRL:
            return st.virt_spec_ctrl if self.virt_ssbd else None
        if idx == MSR_AMD64_DE_CFG:
            return AMD64_DE_CFG_LFENCE_SERIALISE if self.amd else None
        return _UNHANDLED

    @staticmethod
    def _vmce_read(st: VcpuMsrs, idx: int) -> int:
        if idx == MSR_IA32_MCG_CAP:
            return GUEST_MC_BANK_NUM
        if idx in (MSR_IA32_MCG_STATUS, MSR_IA32_MCG_CTL, 0x4D0, 0, 1) or 0x280 <= idx <= 0x29F:
            return 0
        if (idx - MSR_IA32_MC0_CTL) % 4 == 0:
            return 0xFFFFFFFFFFFFFFFF  # MCi_CTL reads all ones
        bank = (idx - MSR_IA32_MC0_CTL) // 4
        return st.mci.get(idx, 0) if bank < GUEST_MC_BANK_NUM else 0

    # ------------------------------------------------------------ writes
    def write(self, h: MsrHost, st: VcpuMsrs, idx: int, val: int) -> bool:
        idx &= 0xFFFFFFFF
        val &= 0xFFFFFFFFFFFFFFFF
        r = self._guest_wrmsr(h, st, idx, val)
        if r is not None:
            return r
        if idx in (MSR_FS_BASE, MSR_GS_BASE, MSR_SHADOW_GS_BASE):
            if not self.lm or not canonical(val):
                return False
            if idx == MSR_FS_BASE:
                h.set_fs_base(val)
            elif idx == MSR_GS_BASE:
                h.set_gs_base(val)
            else:
                h.set_gs_shadow(val)
            return True
        if idx == MSR_EFER:
            # only a write of the current value (Linux writes it back)
            return val == (h.efer() & EFER_KNOWN_MASK & ~(EFER_SVME | EFER_AIBRSE))
        if idx in (MSR_K7_FID_VID_CTL, MSR_K7_FID_VID_STATUS, MSR_K8_HWCR) \
                or MSR_K8_PSTATE_LIMIT <= idx <= MSR_K8_PSTATE7:
            return self.amd
        if idx == MSR_AMD64_NB_CFG:
            return True
        if idx == MSR_FAM10H_MMIO_CONF_BASE:
            return self.amd and 0x10 <= self.family < 0x17
        if idx == MSR_IA32_MISC_ENABLE:
            return h.host_rdmsr(idx) is not None  # a different value is logged and dropped
        if idx in (0xE7, 0xE8):  # MPERF, APERF
            return self.intel or self.amd
        if idx in (0x19A, 0x1B0):  # THERM_CONTROL, ENERGY_PERF_BIAS
            return self.intel
        if self._is_pmu(idx):
            return True
        return False

    def _guest_wrmsr(self, h: MsrHost, st: VcpuMsrs, idx: int, val: int) -> bool | None:
        if idx in (MSR_IA32_PLATFORM_ID, 0x35, MSR_INTEL_PLATFORM_INFO, MSR_ARCH_CAPABILITIES):
            return False  # read-only
        if idx == MSR_IA32_UCODE_REV:
            return self.intel and val == 0
        if idx in (MSR_AMD_PATCHLOADER, MSR_IA32_UCODE_WRITE):
            return False  # never for PV
        if idx == MSR_SPEC_CTRL:
            if not self.ibrs or val & ~0x7:
                return False
            st.spec_ctrl = val
            return True
        if idx == MSR_PRED_CMD:
            return self.ibpb and not val & ~1
        if idx == MSR_FLUSH_CMD:
            return False
        if idx == MSR_INTEL_MISC_FEATURES_ENABLES:
            if val & ~MISC_FEATURES_CPUID_FAULTING:
                return False
            st.misc_features_enables = val
            return True
        if self._is_mce(idx):
            if idx == MSR_IA32_MCG_CAP:
                return False
            bank = (idx - MSR_IA32_MC0_CTL) // 4
            if 0x400 <= idx <= 0x47F and (idx - MSR_IA32_MC0_CTL) % 4 and bank < GUEST_MC_BANK_NUM:
                st.mci[idx] = val
            return True
        if idx == MSR_IA32_PERF_CTL:
            return self.intel
        if idx == MSR_IA32_XSS:
            if not self.xsaves or val:
                return False
            return True
        if 0x40000000 <= idx <= 0x400002FF:
            # the hypercall-page MSR: Xen writes the page at the frame given; pyxen's PV
            # guests get theirs from the builder, so this write is refused (#GP)
            return False
        if idx == MSR_TSC_AUX:
            if not self.rdtscp or val >> 32:
                return False
            st.tsc_aux = val
            h.set_tsc_aux(val)
            return True
        if idx == MSR_VIRT_SPEC_CTRL:
            if not self.virt_ssbd:
                return False
            st.virt_spec_ctrl = val & SPEC_CTRL_SSBD
            return True
        if idx == MSR_AMD64_DE_CFG:
            return self.amd  # writes dropped
        return None


_UNHANDLED = object()
