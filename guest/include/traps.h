/*
 * traps.h - exception/event frames and the page-fault fixup hook.
 */
#ifndef PYXEN_TRAPS_H
#define PYXEN_TRAPS_H

#include "kernel.h"

/*
 * Register frame built by entry.S: GPRs pushed by SAVE_ALL (r15 lowest),
 * then vector and error code (0 if the CPU has none), then the iret frame
 * exactly as the hypervisor's bounce frame left it.  Vector is
 * TRAP_VEC_EVENT / TRAP_VEC_FAILSAFE for the callbacks.
 */
struct pt_regs {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss;
};

#define TRAP_VEC_EVENT     256
#define TRAP_VEC_FAILSAFE  257

/*
 * A page-fault fixup hook may inspect the fault and, to recover, modify
 * regs (typically regs->rip) and return non-zero.  Returning 0 falls
 * through to the fatal handler.
 */
typedef int (*pf_fixup_t)(struct pt_regs *regs, unsigned long cr2);
void set_pf_fixup(pf_fixup_t hook);

void trap_init(void);
void __noreturn fatal_trap(struct pt_regs *regs, unsigned long cr2);

#endif /* PYXEN_TRAPS_H */
