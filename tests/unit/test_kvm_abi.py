"""pyxen.kvm's structure layouts and ioctl numbers against <linux/kvm.h>."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pyxen import kvm

C = r"""
#include <linux/kvm.h>
#include <stdio.h>
#include <stddef.h>
int main(void) {
  printf("Run %zu\nRun.kvm_valid_regs %zu\nRun.s %zu\nRun.exit %zu\n", sizeof(struct kvm_run),
         offsetof(struct kvm_run, kvm_valid_regs), offsetof(struct kvm_run, s), offsetof(struct kvm_run, io));
  printf("Regs %zu\nSregs %zu\nSegment %zu\nDTable %zu\nSyncRegs.sregs %zu\n", sizeof(struct kvm_regs),
         sizeof(struct kvm_sregs), sizeof(struct kvm_segment), sizeof(struct kvm_dtable),
         offsetof(struct kvm_sync_regs, sregs));
  printf("Fpu %zu\nXsave %zu\nCpuidEntry2 %zu\nDirtyLog %zu\n"
         "UserspaceMemoryRegion %zu\nMsrEntry %zu\n",
         sizeof(struct kvm_fpu), sizeof(struct kvm_xsave), sizeof(struct kvm_cpuid_entry2),
         sizeof(struct kvm_dirty_log), sizeof(struct kvm_userspace_memory_region),
         sizeof(struct kvm_msr_entry));
  printf("KVM_RUN %lu\nKVM_GET_REGS %lu\nKVM_SET_REGS %lu\nKVM_GET_SREGS %lu\nKVM_SET_SREGS %lu\n",
         (unsigned long)KVM_RUN, (unsigned long)KVM_GET_REGS, (unsigned long)KVM_SET_REGS,
         (unsigned long)KVM_GET_SREGS, (unsigned long)KVM_SET_SREGS);
  printf("KVM_GET_MSRS %lu\nKVM_SET_MSRS %lu\nKVM_SET_USER_MEMORY_REGION %lu\nKVM_GET_DIRTY_LOG %lu\n",
         (unsigned long)KVM_GET_MSRS, (unsigned long)KVM_SET_MSRS,
         (unsigned long)KVM_SET_USER_MEMORY_REGION, (unsigned long)KVM_GET_DIRTY_LOG);
  printf("KVM_SET_CPUID2 %lu\nKVM_GET_SUPPORTED_CPUID %lu\nKVM_GET_XSAVE %lu\nKVM_SET_XSAVE %lu\n",
         (unsigned long)KVM_SET_CPUID2, (unsigned long)KVM_GET_SUPPORTED_CPUID,
         (unsigned long)KVM_GET_XSAVE, (unsigned long)KVM_SET_XSAVE);
  printf("KVM_GET_FPU %lu\nKVM_GET_TSC_KHZ %lu\nKVM_CREATE_VCPU %lu\nKVM_CREATE_VM %lu\n",
         (unsigned long)KVM_GET_FPU, (unsigned long)KVM_GET_TSC_KHZ, (unsigned long)KVM_CREATE_VCPU,
         (unsigned long)KVM_CREATE_VM);
  printf("KVM_CAP_SYNC_REGS %d\nKVM_CAP_IMMEDIATE_EXIT %d\nKVM_EXIT_IO %d\nKVM_EXIT_SHUTDOWN %d\n",
         KVM_CAP_SYNC_REGS, KVM_CAP_IMMEDIATE_EXIT, KVM_EXIT_IO, KVM_EXIT_SHUTDOWN);
  return 0;
}
"""


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("SKIPPED LOUDLY: no C compiler or <linux/kvm.h>: cannot check KVM layouts")
    d = tmp_path_factory.mktemp("kvmabi")
    (d / "a.c").write_text(C)
    subprocess.run([cc, "-o", str(d / "a"), str(d / "a.c")], check=True)
    out = subprocess.run([str(d / "a")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_struct_sizes(facts: dict[str, int]) -> None:
    for name in ("Run", "Regs", "Sregs", "Segment", "DTable", "Fpu", "Xsave", "CpuidEntry2",
                 "DirtyLog", "UserspaceMemoryRegion", "MsrEntry"):
        assert ctypes.sizeof(getattr(kvm, name)) == facts[name], name
    assert kvm.Run.kvm_valid_regs.offset == facts["Run.kvm_valid_regs"]
    assert kvm.Run.s.offset == facts["Run.s"]
    assert kvm.Run.exit.offset == facts["Run.exit"]
    assert kvm.SyncRegs.sregs.offset == facts["SyncRegs.sregs"]


def test_ioctl_numbers(facts: dict[str, int]) -> None:
    for k, v in facts.items():
        if k.startswith("KVM_") and not k.startswith(("KVM_CAP", "KVM_EXIT")):
            assert getattr(kvm, k) == v, k
    assert kvm.KVM_CAP_SYNC_REGS == facts["KVM_CAP_SYNC_REGS"]
    assert kvm.KVM_CAP_IMMEDIATE_EXIT == facts["KVM_CAP_IMMEDIATE_EXIT"]
    assert kvm.EXIT_IO == facts["KVM_EXIT_IO"]
    assert kvm.EXIT_SHUTDOWN == facts["KVM_EXIT_SHUTDOWN"]
