"""CPUID as Xen shows it to a 64-bit PV guest.

A PV kernel learns what the CPU can do from CPUID; on Xen it sees the host's
features filtered through Xen's PV default policy (which features a PV guest
may use: ``xen/include/public/arch-x86/cpufeatureset.h``, the upper-case 'A'
attribute), plus the hypervisor leaves 0x40000000-0x40000005 that identify
Xen (``xen/arch/x86/cpuid.c``: cpuid_hypervisor_leaves).  The host's own
hypervisor leaves (KVM's "KVMKVMKVM") must never show through: Linux would
conclude it runs on KVM and use kvmclock, which pyxen does not offer.

Two paths reach the same table (``PvCpuidPolicy``):

* the forced-emulation prefix ``ud2; .ascii "xen"; cpuid`` that Linux's
  ``xen_cpuid`` uses, emulated in ``emulate.py``;
* a plain ``cpuid``, which KVM answers from the table installed with
  ``KVM_SET_CPUID2`` (``to_kvm_entries``).

Beyond Xen's mask, pyxen hides what needs a CR4 bit it does not set (the vCPU
runs with CR4 = PAE|OSFXSR|OSXMMEXCPT, ``VCPU._setup_cpu``): FSGSBASE, and the
whole XSAVE family (XSAVE, AVX and everything built on the AVX state), since
OSXSAVE is off.  This module is pure: it takes the host's leaves as tuples.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass, field

Leaf = tuple[int, int, int, int]  # eax, ebx, ecx, edx
EMPTY: Leaf = (0, 0, 0, 0)

XEN_CPUID_FIRST_LEAF = 0x40000000
XEN_CPUID_MAX_NUM_LEAVES = 5
XEN_CPUID_SIGNATURE = (0x566E6558, 0x65584D4D, 0x4D4D566E)  # "XenVMMXenVMM"
XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD = 1 << 0
XEN_CPUID_HOST_TSC_RELIABLE = 1 << 1
XEN_CPUID_RDTSCP_INSTR_AVAIL = 1 << 2

# Xen's PV default featureset ('A' attribute), per CPUID register.
# Key: (leaf, subleaf, register index 0..3 = eax..edx).
PV_DEFAULT: dict[tuple[int, int, int], int] = {
    (0x1, 0, 3): 0x1FC9CBF5,          # word 0: FPU DE TSC MSR PAE MCE CX8 APIC SEP MCA CMOV PAT
                                      #   CLFLUSH ACPI MMX FXSR SSE SSE2 SS HTT
    (0x1, 0, 2): 0xF6D83203,          # word 1: SSE3 PCLMULQDQ SSSE3 FMA CX16 SSE4_1 SSE4_2 MOVBE
                                      #   POPCNT AESNI XSAVE AVX F16C RDRAND HYPERVISOR
    (0x80000001, 0, 3): 0xEA500800,   # word 2: SYSCALL NX MMXEXT FFXSR RDTSCP LM 3DNOWEXT 3DNOW
    (0x80000001, 0, 2): 0x442109E3,   # word 3: LAHF_LM CMP_LEGACY ABM SSE4A MISALIGNSSE
                                      #   3DNOWPREFETCH XOP FMA4 TBM DBEXT ADDR_MSK_EXT
    (0xD, 1, 0): 0x7,                 # word 4: XSAVEOPT XSAVEC XGETBV1
    (0x7, 0, 1): 0xF1AF0B29,          # word 5: FSGSBASE BMI1 AVX2 BMI2 ERMS RTM AVX512F ... SHA
    (0x7, 0, 2): 0x02405F43,          # word 6: PREFETCHWT1 AVX512_VBMI ... RDPID CLDEMOTE
    (0x80000007, 0, 3): 0x0,          # word 7: nothing by default
    (0x80000008, 0, 1): 0x64001005,   # word 8: CLZERO RSTR_FP_ERR_PTRS IBPB SSB_NO BTC_NO IBPB_RET
    (0x7, 0, 3): 0xAC804410,          # word 9: FSRM MD_CLEAR SERIALIZE AVX512_FP16 IBRSB STIBP
                                      #   ARCH_CAPS SSBD
    (0x7, 1, 0): 0x00801C37,          # word 10: SHA512 SM3 SM4 AVX_VNNI AVX512_BF16 FZRM FSRS ...
    (0x80000021, 0, 0): 0x781C0C65,   # word 11
    (0x7, 1, 1): 0x0,                 # word 12
    (0x7, 2, 3): 0x21,                # word 13: INTEL_PSFD MCDT_NO
    (0x7, 1, 2): 0x0,                 # word 14
    (0x7, 1, 3): 0x4430,              # word 15
    (0x80000021, 0, 2): 0x6,          # word 18: TSA_SQ_NO TSA_L1_NO
}

# Features that need a CR4 bit pyxen's vCPU does not set.  CR4.OSXSAVE is off,
# so XSAVE and every feature whose state lives in XSAVE components goes
# (Xen's gen-cpuid.py dependency tree under XSAVE/AVX); CR4.FSGSBASE is off.
HIDE_NO_CR4: dict[tuple[int, int, int], int] = {
    (0x1, 0, 2): (1 << 12) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29),  # FMA XSAVE OSXSAVE AVX F16C
    (0x7, 0, 1): (1 << 0) | (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27)
    | (1 << 28) | (1 << 30) | (1 << 31),  # FSGSBASE AVX2 AVX512{F,DQ,IFMA,PF,ER,CD,BW,VL}
    (0x7, 0, 2): (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14),
    (0x7, 0, 3): (1 << 2) | (1 << 3) | (1 << 8) | (1 << 23),  # AVX512_4VNNIW 4FMAPS VP2INTERSECT FP16
    (0x7, 1, 0): (1 << 4) | (1 << 5) | (1 << 23),  # AVX_VNNI AVX512_BF16 AVX_IFMA
    (0x7, 1, 3): (1 << 4) | (1 << 5) | (1 << 10),  # AVX_VNNI_INT8 AVX_NE_CONVERT AVX_VNNI_INT16
    (0x80000001, 0, 2): (1 << 11) | (1 << 16),  # XOP FMA4
}

# Leaves a PV guest sees empty whatever the host has (Xen: MONITOR leaf
# without MONITOR, no vPMU leaf, no SVM leaf, no host hypervisor leaves).
EMPTY_LEAVES = {0x5, 0xA, 0x8000000A}

X86_FEATURE_HYPERVISOR = (0x1, 0, 2, 31)
CPUID_1_ECX_OSXSAVE = 1 << 27


@dataclass
class PvCpuidPolicy:
    """The CPUID table of one PV domain: (leaf, subleaf) -> (eax, ebx, ecx, edx)."""

    leaves: dict[tuple[int, int], Leaf] = field(default_factory=dict)
    indexed: set[int] = field(default_factory=set)  # leaves whose subleaf matters
    basic_max: int = 0
    extd_max: int = 0x80000000

    def lookup(self, leaf: int, subleaf: int) -> Leaf:
        """guest_cpuid(): out-of-range leaves read as zeros (the AMD model Xen follows)."""
        leaf &= 0xFFFFFFFF
        subleaf &= 0xFFFFFFFF
        if leaf < 0x40000000:
            if leaf > self.basic_max:
                return EMPTY
        elif leaf < 0x40000200:
            pass  # the hypervisor leaves: present or empty
        elif 0x80000000 <= leaf < 0x80010000:
            if leaf > self.extd_max:
                return EMPTY
        else:
            return EMPTY
        key = (leaf, subleaf if leaf in self.indexed else 0)
        return self.leaves.get(key, EMPTY)

    def has(self, leaf: int, subleaf: int, reg: int, bit: int) -> bool:
        return bool(self.lookup(leaf, subleaf)[reg] >> bit & 1)

    def entries(self) -> list[tuple[int, int, bool, Leaf]]:
        """(leaf, subleaf, subleaf-significant, registers), for KVM_SET_CPUID2."""
        return [(lf, sub, lf in self.indexed, val) for (lf, sub), val in sorted(self.leaves.items())]


def _mask(key: tuple[int, int], regs: Leaf) -> Leaf:
    out = list(regs)
    for r in range(4):
        m = PV_DEFAULT.get((key[0], key[1], r))
        if m is not None:
            out[r] &= m
        h = HIDE_NO_CR4.get((key[0], key[1], r))
        if h is not None:
            out[r] &= ~h & 0xFFFFFFFF
    return out[0], out[1], out[2], out[3]


def xen_leaves(version: tuple[int, int], tsc_khz: int, tsc_mul: int, tsc_shift: int,
               maddr_bits: int, host_rdtscp: bool, tsc_reliable: bool) -> dict[tuple[int, int], Leaf]:
    """Leaves 0x40000000-0x40000005 as cpuid_hypervisor_leaves fills them for a PV domain."""
    base = XEN_CPUID_FIRST_LEAF
    time0 = ((XEN_CPUID_HOST_TSC_RELIABLE if tsc_reliable else 0)
             | (XEN_CPUID_RDTSCP_INSTR_AVAIL if host_rdtscp else 0))
    return {
        (base, 0): (base + XEN_CPUID_MAX_NUM_LEAVES, *XEN_CPUID_SIGNATURE),
        (base + 1, 0): ((version[0] << 16) | version[1], 0, 0, 0),
        # one hypercall page, its MSR at 0x40000000; PV: preserve-A/D feature
        (base + 2, 0): (1, base, XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD, 0),
        # time leaf: subleaf 0 features / tsc_mode 0 (default) / kHz / incarnation 0,
        # subleaf 1 offset 0 and the TSC->ns scale, subleaf 2 the physical kHz
        (base + 3, 0): (time0, 0, tsc_khz & 0xFFFFFFFF, 0),
        (base + 3, 1): (0, 0, tsc_mul & 0xFFFFFFFF, tsc_shift & 0xFFFFFFFF),
        (base + 3, 2): (tsc_khz & 0xFFFFFFFF, 0, 0, 0),
        (base + 4, 0): EMPTY,  # the HVM leaf: nothing for PV
        (base + 5, 0): (0, maddr_bits & 0xFF, 0, 0),  # machine address width
    }


def pv_policy(host: Iterable[tuple[int, int, Leaf]], version: tuple[int, int], tsc_khz: int,
              tsc_mul: int = 0, tsc_shift: int = 0, maddr_bits: int = 36) -> PvCpuidPolicy:
    """Build a PV domain's CPUID from the host's ``(leaf, subleaf, regs)`` list
    (KVM_GET_SUPPORTED_CPUID) the way Xen builds pv_def_cpu_policy."""
    p = PvCpuidPolicy()
    host_l: dict[tuple[int, int], Leaf] = {}
    subleaves: dict[int, set[int]] = {}
    for leaf, sub, regs in host:
        host_l[(leaf, sub)] = regs
        subleaves.setdefault(leaf, set()).add(sub)
    for leaf, subs in subleaves.items():
        if len(subs) > 1 or leaf in (0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18,
                                     0x1D, 0x8000001D):
            p.indexed.add(leaf)
    p.basic_max = host_l.get((0, 0), EMPTY)[0]
    p.extd_max = host_l.get((0x80000000, 0), (0x80000000, 0, 0, 0))[0]
    for (leaf, sub), regs in host_l.items():
        if 0x40000000 <= leaf < 0x50000000:
            continue  # the host's hypervisor (KVM) leaves never show through
        if leaf in EMPTY_LEAVES:
            p.leaves[(leaf, sub)] = EMPTY
            continue
        if leaf == 0xD:
            p.leaves[(leaf, sub)] = EMPTY  # no XSAVE: the leaf is empty (guest_cpuid)
            continue
        a, b, c, d = _mask((leaf, sub), regs)
        if leaf == 0x1:
            b &= 0x00FFFFFF  # no APIC ID (Xen's topology rework TODO: clears it for PV)
            c |= 1 << 31  # HYPERVISOR: a guest always runs under one
        if leaf == 0x7 and sub == 0:
            a = min(a, 2)
        p.leaves[(leaf, sub)] = (a, b, c, d)
    host_rdtscp = bool(host_l.get((0x80000001, 0), EMPTY)[3] >> 27 & 1)
    tsc_reliable = bool(host_l.get((0x80000007, 0), EMPTY)[3] >> 8 & 1)
    p.leaves.update(xen_leaves(version, tsc_khz, tsc_mul, tsc_shift, maddr_bits, host_rdtscp,
                               tsc_reliable))
    p.indexed.add(XEN_CPUID_FIRST_LEAF + 3)
    return p


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


def to_kvm(policy: PvCpuidPolicy) -> ctypes.Structure:
    """The policy as a ``struct kvm_cpuid2`` for KVM_SET_CPUID2."""
    from .. import kvm
    ents = policy.entries()
    table = kvm._cpuid_type(len(ents))()
    table.nent = len(ents)  # type: ignore[attr-defined]
    for i, (leaf, sub, indexed, (a, b, c, d)) in enumerate(ents):
        e = table.entries[i]  # type: ignore[attr-defined]
        e.function, e.index = leaf, sub
        e.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX if indexed else 0
        e.eax, e.ebx, e.ecx, e.edx = a, b, c, d
    return table
