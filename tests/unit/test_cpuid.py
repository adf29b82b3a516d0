"""Xen's PV CPUID policy (pyxen/hv/cpuid.py) against captured and synthetic hosts."""

from __future__ import annotations

import pytest

from pyxen.hv import cpuid as C

# KVM_GET_SUPPORTED_CPUID on the project's AMD EPYC PVM machine (2026-12-07), trimmed to the
# leaves that carry anything
EPYC_PVM = [
    (0x0, 0, (0x1C, 0x68747541, 0x444D4163, 0x69746E65)),
    (0x1, 0, (0xA10F11, 0x20800, 0x81202000, 0x78BFBFF)),
    (0x6, 0, (0x4, 0, 0, 0)),
    (0x7, 0, (0x1, 0x1800002, 0x104, 0x20000000)),
    (0x7, 1, (0, 0, 0, 0)),
    (0xD, 0, (0xE7, 0x980, 0x980, 0)),
    (0xD, 1, (0, 0, 0, 0)),
    (0xD, 2, (0x100, 0x240, 0, 0)),
    (0x80000000, 0, (0x80000021, 0x68747541, 0x444D4163, 0x69746E65)),
    (0x80000001, 0, (0xA10F11, 0x40000000, 0x400393, 0x23D3FBFF)),
    (0x80000007, 0, (0, 0, 0, 0x100)),
    (0x80000008, 0, (0x3030, 0x50020005, 0x7001, 0)),
    (0x8000000A, 0, (1, 2, 3, 4)),
    (0x80000021, 0, (0x204, 0, 0x6, 0)),
    (0x40000000, 0, (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)),
    (0x40000001, 0, (0x1007EFB, 0, 0, 0)),
]

ALL = 0xFFFFFFFF
# a host that has every feature bit: what survives is exactly what Xen lets a PV guest see
EVERYTHING = [
    (0x0, 0, (0xD, 0x756E6547, 0x6C65746E, 0x49656E69)),  # GenuineIntel
    (0x1, 0, (0x906EA, 0x12345678, ALL, ALL)),
    (0x5, 0, (ALL, ALL, ALL, ALL)),
    (0x7, 0, (2, ALL, ALL, ALL)),
    (0x7, 1, (ALL, ALL, ALL, ALL)),
    (0xA, 0, (ALL, ALL, ALL, ALL)),
    (0xD, 0, (ALL, ALL, ALL, ALL)),
    (0xD, 1, (ALL, ALL, ALL, ALL)),
    (0x80000000, 0, (0x80000021, 0, 0, 0)),
    (0x80000001, 0, (0, 0, ALL, ALL)),
    (0x80000008, 0, (0x3030, ALL, 0, 0)),
    (0x40000000, 0, (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)),
]


def policy(host: list[tuple[int, int, C.Leaf]] = EPYC_PVM) -> C.PvCpuidPolicy:
    return C.pv_policy(host, (4, 19), 2_500_000, 0x12345678, -1 & 0xFFFFFFFF, 45)


def bit(p: C.PvCpuidPolicy, leaf: int, sub: int, reg: int, b: int) -> int:
    return p.lookup(leaf, sub)[reg] >> b & 1


def test_xen_signature_replaces_kvm() -> None:
    p = policy()
    a, b, c, d = p.lookup(0x40000000, 0)
    sig = b.to_bytes(4, "little") + c.to_bytes(4, "little") + d.to_bytes(4, "little")
    assert sig == b"XenVMMXenVMM"
    assert a == 0x40000005
    assert all(v != 0x4B4D564B for _, _, _, regs in p.entries() for v in regs)  # no "KVMK"


def test_xen_leaves() -> None:
    p = policy()
    assert p.lookup(0x40000001, 0)[0] == (4 << 16) | 19
    assert p.lookup(0x40000002, 0) == (1, 0x40000000, C.XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD, 0)
    t0 = p.lookup(0x40000003, 0)
    assert t0[2] == 2_500_000 and t0[1] == 0  # tsc_khz, tsc_mode default
    assert t0[0] & C.XEN_CPUID_HOST_TSC_RELIABLE  # the host's invariant TSC
    assert p.lookup(0x40000003, 1)[2:] == (0x12345678, 0xFFFFFFFF)
    assert p.lookup(0x40000003, 2)[0] == 2_500_000
    assert p.lookup(0x40000004, 0) == C.EMPTY  # HVM only
    assert p.lookup(0x40000005, 0)[1] == 45
    assert p.lookup(0x40000006, 0) == C.EMPTY


@pytest.mark.parametrize("leaf,sub,reg,b,what", [
    (1, 0, 3, 3, "PSE"), (1, 0, 3, 12, "MTRR"), (1, 0, 3, 13, "PGE"), (1, 0, 3, 17, "PSE36"),
    (1, 0, 3, 1, "VME"), (1, 0, 2, 3, "MONITOR"), (1, 0, 2, 5, "VMX"), (1, 0, 2, 17, "PCID"),
    (1, 0, 2, 21, "x2APIC"), (1, 0, 2, 24, "TSC-deadline"), (1, 0, 2, 26, "XSAVE"),
    (1, 0, 2, 27, "OSXSAVE"), (1, 0, 2, 28, "AVX"),
    (7, 0, 1, 0, "FSGSBASE"), (7, 0, 1, 7, "SMEP"), (7, 0, 1, 10, "INVPCID"),
    (7, 0, 1, 20, "SMAP"), (7, 0, 1, 5, "AVX2"), (7, 0, 1, 16, "AVX512F"),
    (7, 0, 2, 2, "UMIP"), (7, 0, 2, 3, "PKU"), (7, 0, 2, 16, "LA57"),
    (0x80000001, 0, 2, 2, "SVM"), (0x80000001, 0, 3, 26, "PDPE1GB"),
])
def test_hidden_from_pv(leaf: int, sub: int, reg: int, b: int, what: str) -> None:
    assert bit(policy(EVERYTHING), leaf, sub, reg, b) == 0, what


@pytest.mark.parametrize("leaf,sub,reg,b,what", [
    (1, 0, 3, 0, "FPU"), (1, 0, 3, 4, "TSC"), (1, 0, 3, 6, "PAE"), (1, 0, 3, 16, "PAT"),
    (1, 0, 3, 25, "SSE"), (1, 0, 3, 26, "SSE2"), (1, 0, 2, 0, "SSE3"), (1, 0, 2, 20, "SSE4.2"),
    (1, 0, 2, 31, "HYPERVISOR"), (7, 0, 1, 3, "BMI1"), (7, 0, 1, 9, "ERMS"),
    (0x80000001, 0, 3, 29, "LM"), (0x80000001, 0, 3, 20, "NX"), (0x80000001, 0, 3, 11, "SYSCALL"),
])
def test_offered_to_pv(leaf: int, sub: int, reg: int, b: int, what: str) -> None:
    assert bit(policy(EVERYTHING), leaf, sub, reg, b) == 1, what


def test_empty_leaves_and_apic_id() -> None:
    p = policy(EVERYTHING)
    assert p.lookup(5, 0) == C.EMPTY  # MONITOR leaf
    assert p.lookup(0xA, 0) == C.EMPTY  # no vPMU
    assert p.lookup(0xD, 0) == C.EMPTY and p.lookup(0xD, 1) == C.EMPTY  # no XSAVE
    assert p.lookup(1, 0)[1] >> 24 == 0  # no APIC ID
    assert p.lookup(7, 0)[0] <= 2
    assert policy().lookup(0x8000000A, 0) == C.EMPTY  # no SVM leaf


def test_epyc_capture() -> None:
    p = policy()
    a, b, c, d = p.lookup(1, 0)
    assert a == 0xA10F11
    assert c == 0x80002000  # CX16 and HYPERVISOR survive; x2APIC and TSC-deadline do not
    assert d & (1 << 3) == 0 and d & (1 << 13) == 0 and d & (1 << 12) == 0
    assert p.lookup(0x80000021, 0)[2] == 0x6  # TSA_SQ_NO TSA_L1_NO


def test_out_of_range_reads_zero() -> None:
    p = policy()
    assert p.lookup(0x1D, 0) == C.EMPTY  # above basic max 0x1c: AMD model, zeros
    assert p.lookup(0x80000022, 0) == C.EMPTY
    assert p.lookup(0x50000000, 0) == C.EMPTY
    assert p.lookup(0xC0000000, 0) == C.EMPTY
    assert p.lookup(7, 5) == C.EMPTY  # indexed leaf, absent subleaf
    assert p.lookup(0x80000001, 7) == p.lookup(0x80000001, 0)  # subleaf ignored


def test_to_kvm_table() -> None:
    p = policy()
    t = C.to_kvm(p)
    ents = {(t.entries[i].function, t.entries[i].index): t.entries[i]  # type: ignore[attr-defined]
            for i in range(t.nent)}  # type: ignore[attr-defined]
    assert ents[(0x40000000, 0)].ebx == 0x566E6558
    assert ents[(0x40000003, 1)].flags == C.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    assert ents[(7, 0)].flags == C.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    assert ents[(1, 0)].flags == 0
