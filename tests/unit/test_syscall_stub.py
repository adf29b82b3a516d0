"""The `syscall` entry stubs (machine.syscall_stub_code): decoded with iced-x86,
each vCPU's entry reads its own armed word and the shared max_vcpus word, takes
the exit (`out %al,$SYSCALL_PORT`) on every branch that does not answer, and
changes no register but rax (and the flags it restores from r11) before it
either answers or exits.  What the answer is, under real KVM: sctest's
syscall.is_up_* checks (tests/e2e/test_syscall_path.py)."""

from __future__ import annotations

import iced_x86 as ix
import pytest

from pyxen.hv import machine as M


def _decode(cpu: int) -> list[ix.Instruction]:
    off = cpu * M.STUB_ENTRY
    code = M.syscall_stub_code(off, M.STUB_ARMED + 4 * cpu, M.STUB_MAXV)
    assert len(code) <= M.STUB_ENTRY
    return list(ix.Decoder(64, code, ip=M.SYSCALL_STUB_VA + off))


@pytest.mark.parametrize("cpu", [0, 1, M.MAX_VCPUS - 1])
def test_entry_reads_its_own_words(cpu: int) -> None:
    ins = _decode(cpu)
    mems = [i.memory_displacement for i in ins if i.is_ip_rel_memory_operand]
    assert mems == [M.SYSCALL_STUB_VA + M.STUB_ARMED + 4 * cpu, M.SYSCALL_STUB_VA + M.STUB_MAXV]
    assert all(i.code != ix.Code.INVALID for i in ins)


@pytest.mark.parametrize("cpu", [0, 5])
def test_every_branch_out_goes_to_the_exit(cpu: int) -> None:
    ins = _decode(cpu)
    last = ins[-1]
    assert last.mnemonic == ix.Mnemonic.OUT and last.immediate8 == M.SYSCALL_PORT
    jmp_rcx = ins[-2]
    assert jmp_rcx.mnemonic == ix.Mnemonic.JMP and jmp_rcx.op0_register == ix.Register.RCX
    ends = {i.ip for i in ins}
    for i in ins:
        if i.flow_control == ix.FlowControl.CONDITIONAL_BRANCH:
            target = i.near_branch_target
            assert target in ends
    # before the first instruction that writes a register (the answer path), only
    # compares and tests: rax and everything else reach the exit untouched
    first_write = next(n for n, i in enumerate(ins) if i.mnemonic in (ix.Mnemonic.STD, ix.Mnemonic.CLD))
    assert all(i.mnemonic in (ix.Mnemonic.CMP, ix.Mnemonic.TEST, ix.Mnemonic.JNE, ix.Mnemonic.JE,
                              ix.Mnemonic.JB) for i in ins[:first_write - 2])
    # the conditional branches of the checks all land on the exit
    exits = [i.near_branch_target for i in ins[:first_write - 2]
             if i.flow_control == ix.FlowControl.CONDITIONAL_BRANCH]
    assert exits and set(exits) == {last.ip}


def test_checks_the_call_and_the_flags() -> None:
    ins = _decode(0)
    imms = [(i.mnemonic, i.immediate(1)) for i in ins[:12] if i.op_count == 2
            and i.op1_kind in (ix.OpKind.IMMEDIATE8TO64, ix.OpKind.IMMEDIATE8TO32,
                               ix.OpKind.IMMEDIATE32, ix.OpKind.IMMEDIATE8)]
    assert (ix.Mnemonic.CMP, 24) in imms  # __HYPERVISOR_vcpu_op
    assert (ix.Mnemonic.CMP, 3) in imms  # VCPUOP_is_up
    # TF IOPL NT RF VM AC VIF VIP must be clear, IF set
    assert (ix.Mnemonic.TEST, 0x100 | 0x3000 | 0x4000 | 0x10000 | 0x20000 | 0x40000
            | 0x80000 | 0x100000) in imms
    assert (ix.Mnemonic.TEST, 0x200) in imms
    mov = ins[-3]
    assert mov.mnemonic == ix.Mnemonic.MOV and mov.op0_register == ix.Register.RAX
    assert mov.immediate(1) & (2**64 - 1) == 2**64 - 2  # -ENOENT


def test_compat_entry_is_a_bare_out() -> None:
    m_code = bytes([0xE6, M.SYSCALL_PORT])
    for bits in (32, 64):
        i = next(iter(ix.Decoder(bits, m_code)))
        assert i.mnemonic == ix.Mnemonic.OUT and i.immediate8 == M.SYSCALL_PORT
