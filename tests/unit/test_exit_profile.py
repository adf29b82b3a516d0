"""The exit profile (trace.Profile, bench/exitprof.py) and the #GP fast path's
pure parts (its permission word, its code), without KVM."""

from __future__ import annotations

import iced_x86 as ix

from bench import exitprof
from pyxen.hv import emulate, machine, trace


def test_profile_phases_follow_console_markers() -> None:
    p = trace.Profile(1, "linux", trace.DEFAULT_PHASES)
    p.enter_phase("kernel")
    p.record("#GP cli (kernel)", 1000)
    p.record("#GP cli (kernel)", 3000)
    p.console(b"[ 1.0] Run /init as ")
    assert p.phase == "kernel"  # split across two chunks
    p.console(b"init process\r\n")
    assert p.phase == "userland"
    p.record("hypercall iret", 500)
    p.console(b"~ # ")
    assert p.phase == "prompt"
    j = p.to_json()
    names = [ph["phase"] for ph in j["phases"]]
    assert names == ["builder", "kernel", "userland", "prompt"]
    kernel = j["phases"][1]
    assert kernel["rows"][0] == {"key": "#GP cli (kernel)", "count": 2, "total_ms": 0.004,
                                 "mean_us": 2.0, "max_us": 3.0}
    assert abs(kernel["handled_s"] - 4e-6) < 1e-12
    assert "hypercall iret" in exitprof.summary(j)
    assert "| `#GP cli (kernel)` | 2 |" in exitprof.summary(j, markdown=True)


def test_profile_markers_parse() -> None:
    assert [n for n, _ in trace._parse_markers("a=x,b=[/~] # ,bad,c=(")] == ["a", "b"]


def test_hypercall_keys() -> None:
    assert trace._hc_key(24, (2, 0x10)) == "hypercall vcpu_op VCPUOP_down"
    assert trace._hc_key(1, (0x1000, 1, 0, 0x7FF0)) == "hypercall mmu_update (count 1)"
    assert trace._hc_key(26, (0x1000, 3, 0, 0x7FF0)) == "hypercall mmuext_op (count >1)"


def test_fast_path_word() -> None:
    # enabled: kernel CR3, distinct user tables, IOPL >= 1 (kernel is CPL1)
    assert emulate.fast_path_word(0x100123, 0x100456, 1, False) == 0x100123 << 12
    # IOPL 0, same tables, no tables: never
    assert emulate.fast_path_word(0x100123, 0x100456, 0, False) == machine.FAST_NEVER
    assert emulate.fast_path_word(0x100123, 0x100123, 3, False) == machine.FAST_NEVER
    assert emulate.fast_path_word(0, 0x100456, 3, False) == machine.FAST_NEVER
    # VMASST architectural_iopl: the kernel counts as CPL0
    assert emulate.fast_path_word(0x100123, 0, 0, True) == 0x100123 << 12


def test_fast_gp_code_decodes_as_documented() -> None:
    code = machine.FAST_GP_CODE
    insns = list(ix.Decoder(64, code, ip=0))
    assert all(i.code != ix.Code.INVALID for i in insns)
    text = [ix.Formatter(ix.FormatterSyntax.GAS).format(i).lower() for i in insns]
    assert text[-3:] == ["pop %rax", "push $0xd", "out %al,$0xf1"]  # the slow way, as other vectors
    assert "iretq" in text and "mov %cr3,%rax" in text
    # the per-vCPU word and counter sit at the bottom of the stack, RSP0 - 8192
    frame = 48 + 8  # error code + 5 words pushed by the CPU, then %rax
    assert f"cmp -{8192 - frame - machine.FAST_KCR3:#x}(%rsp),%rax" in text
    assert f"incq -{8192 - frame - machine.FAST_COUNT:#x}(%rsp)" in text
    assert machine.CODE_FAST_GP >= machine.CODE_STUBS + 256 * 8
    assert machine.CODE_FAST_GP + len(code) <= 4096
    assert machine.PC_STACK * 4096 == 0x13000 and machine.PERCPU_VA_PAGES * 4096 == 0x20000
