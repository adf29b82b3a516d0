"""Pure hypercall policy: set_debugreg/get_debugreg's rules and the feature
submap, checked against the values Xen's sources give (no KVM needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pyxen import abi
from pyxen.hv.hypercalls import get_debugreg, pv_features, set_debugreg

EPERM, EINVAL, ENODEV = -abi.EPERM, -abi.EINVAL, -abi.ENODEV


def _vcpu(cr4: int = 0) -> SimpleNamespace:
    return SimpleNamespace(dr=[0, 0, 0, 0], dr6=0xFFFF0FF0, dr7=0x400, dr7_emul=0, guest_cr4=cr4)


@pytest.mark.parametrize("addr, rc", [
    (0, 0), (0x00007FFFFFFFFFFF, 0), (0xFFFF880000000000, 0), (0xFFFFFFFF80000000, 0),
    (0x0000800000000000, EPERM), (0xFFFF800000000000, EPERM), (0xFFFF87FFFFFFFFFF, EPERM),
])
def test_breakpoint_address(addr: int, rc: int) -> None:
    v = _vcpu()
    assert set_debugreg(v, 2, addr) == rc
    assert get_debugreg(v, 2) == (addr if rc == 0 else 0)


def test_dr6_reserved_bits() -> None:
    v = _vcpu()
    assert set_debugreg(v, 6, 0) == 0
    assert get_debugreg(v, 6) == 0xFFFF0FF0
    assert set_debugreg(v, 6, 0x1000 | 0x4000 | 0x1) == 0
    assert get_debugreg(v, 6) == 0xFFFF4FF1  # bit 12 forced to 0
    assert set_debugreg(v, 6, 1 << 32) == EINVAL


def test_dr7_rules() -> None:
    v = _vcpu()
    assert set_debugreg(v, 7, 0x1) == 0
    assert get_debugreg(v, 7) == 0x401
    assert set_debugreg(v, 7, 0x2000 | 0x2) == EPERM  # GD
    assert set_debugreg(v, 7, 0xC800 | 0x2) == 0  # reserved bits dropped
    assert get_debugreg(v, 7) == 0x402
    assert set_debugreg(v, 7, 1 << 40) == EINVAL
    # an I/O breakpoint (R/W = 10b) needs CR4.DE, and then is emulated
    assert set_debugreg(v, 7, 0x20001) == EPERM
    de = _vcpu(cr4=0x8)
    assert set_debugreg(de, 7, 0x20001) == 0
    assert de.dr7_emul == 0x1 and de.dr7 == 0x20400
    assert get_debugreg(de, 7) == 0x20401


def test_dr4_dr5_alias_without_de() -> None:
    v = _vcpu()
    assert set_debugreg(v, 4, 0) == 0
    assert get_debugreg(v, 4) == 0xFFFF0FF0
    assert set_debugreg(v, 5, 1) == 0
    assert get_debugreg(v, 7) == 0x401
    de = _vcpu(cr4=0x8)
    for reg in (4, 5):
        assert set_debugreg(de, reg, 0) == ENODEV
        assert get_debugreg(de, reg) == ENODEV
    for reg in (8, 15, 0xFFFFFFFF):
        assert set_debugreg(v, reg, 0) == ENODEV
        assert get_debugreg(v, reg) == ENODEV


def test_pv_features() -> None:
    sub = pv_features(0)
    assert sub >> abi.XENFEAT_gnttab_map_avail_bits & 1  # Linux panics without it
    assert sub >> abi.XENFEAT_mmu_pt_update_preserve_ad & 1
    assert sub >> abi.XENFEAT_highmem_assist & 1
    assert sub >> abi.XENFEAT_direct_mapped & 1
    for bit in (abi.XENFEAT_writable_page_tables, abi.XENFEAT_auto_translated_physmap,
                abi.XENFEAT_supervisor_mode_kernel, abi.XENFEAT_dom0,
                abi.XENFEAT_not_direct_mapped, abi.XENFEAT_pae_pgdir_above_4gb):
        assert not sub >> bit & 1, bit
    assert pv_features(1 << abi.VMASST_TYPE_pae_extended_cr3) >> abi.XENFEAT_pae_pgdir_above_4gb & 1


def test_vm_assist_mask_is_xens_pv64() -> None:
    valid = [t for t in range(64) if abi.VMASST_VALID >> t & 1]
    assert valid == [0, 1, 2, 3, 4, 5, 32]
