/*
 * entry.S - exception and event-callback entry stubs, the common exit
 * path through the iret hypercall, and the thread context switch.
 *
 * The hypervisor delivers exceptions and events by pushing a "bounce
 * frame" on the current (kernel) stack and jumping to our handler:
 *
 *     low   RCX, R11, [error code], RIP, CS, RFLAGS, RSP, SS   high
 *
 * (rcx/r11 are there because Xen itself entered/leaves via syscall-like
 * paths that clobber them).  Every stub therefore starts with
 * pop %rcx; pop %r11, after which the stack looks like an ordinary CPU
 * exception frame.  We then normalise to: vector, error code, iret frame.
 *
 * We never return with iretq (it can't restore the upcall mask and we are
 * in ring 3): the exit path restores all GPRs, pushes a 0 flags word and
 * jumps to the iret hypercall slot, which pushes rax/r11/rcx itself.
 */
#include "xen_abi.h"

#define IRET_SLOT  (hypercall_page + __HYPERVISOR_iret * HYPERCALL_SLOT_SIZE)

.macro SAVE_ALL
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
.endm

.macro RESTORE_ALL
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
.endm

/* Exception without a CPU error code: push 0 so the frame is uniform. */
.macro TRAP_NOERR vec, name
    .globl \name
    .type \name, @function
\name:
    popq %rcx
    popq %r11
    pushq $0
    pushq $\vec
    jmp trap_common
    .size \name, . - \name
.endm

/* Exception with a CPU error code (8, 10-14, 17): it is already there. */
.macro TRAP_ERR vec, name
    .globl \name
    .type \name, @function
\name:
    popq %rcx
    popq %r11
    pushq $\vec
    jmp trap_common
    .size \name, . - \name
.endm

    .text

TRAP_NOERR  0, trap_divide_error
TRAP_NOERR  1, trap_debug
TRAP_NOERR  2, trap_nmi
TRAP_NOERR  3, trap_int3
TRAP_NOERR  4, trap_overflow
TRAP_NOERR  5, trap_bounds
TRAP_NOERR  6, trap_invalid_op
TRAP_NOERR  7, trap_device_not_available
TRAP_ERR    8, trap_double_fault
TRAP_NOERR  9, trap_coproc_seg_overrun
TRAP_ERR   10, trap_invalid_tss
TRAP_ERR   11, trap_segment_not_present
TRAP_ERR   12, trap_stack_segment
TRAP_ERR   13, trap_general_protection
TRAP_ERR   14, trap_page_fault
TRAP_NOERR 15, trap_spurious
TRAP_NOERR 16, trap_coprocessor_error
TRAP_ERR   17, trap_alignment_check
TRAP_NOERR 18, trap_machine_check
TRAP_NOERR 19, trap_simd_error

/*
 * Common path: save everything, call do_trap(regs) on a 16-byte aligned
 * stack (the bounce frame leaves the alignment unknown), then leave
 * through the iret hypercall.  rbx is callee-saved so it survives the
 * C call and remembers where the frame is.
 */
    .type trap_common, @function
trap_common:
    SAVE_ALL
    cld
    movq %rsp, %rdi
    movq %rsp, %rbx
    andq $-16, %rsp
    call do_trap
    movq %rbx, %rsp
    jmp exit_via_iret
    .size trap_common, . - trap_common

/*
 * Event upcall (CALLBACKTYPE_event).  Same frame without an error code;
 * the hypervisor has already set evtchn_upcall_mask = 1.
 */
    .globl hypervisor_callback
    .type hypervisor_callback, @function
hypervisor_callback:
    popq %rcx
    popq %r11
    pushq $0
    pushq $256                      /* TRAP_VEC_EVENT */
    SAVE_ALL
    cld
    movq %rsp, %rdi
    movq %rsp, %rbx
    andq $-16, %rsp
    call evtchn_do_upcall
    movq %rbx, %rsp
    jmp exit_via_iret
    .size hypervisor_callback, . - hypervisor_callback

/*
 * Failsafe callback: the hypervisor couldn't return to us (e.g. bad
 * segment state on iret).  Frame: RCX, R11, DS, ES, FS, GS, then the iret
 * frame.  This kernel never loads segments, so it's always fatal: drop the
 * selector words and report it like an exception.
 */
    .globl failsafe_callback
    .type failsafe_callback, @function
failsafe_callback:
    popq %rcx
    popq %r11
    addq $32, %rsp                  /* DS, ES, FS, GS */
    pushq $0
    pushq $257                      /* TRAP_VEC_FAILSAFE */
    SAVE_ALL
    cld
    movq %rsp, %rdi
    andq $-16, %rsp
    call do_trap                    /* fatal, does not return */
1:  pause
    jmp 1b
    .size failsafe_callback, . - failsafe_callback

/*
 * Restore GPRs, drop vector/error code so [RIP, CS, RFLAGS, RSP, SS] is at
 * the top, push flags=0 (not in a syscall) and enter the iret hypercall.
 * The hypervisor restores rax/rcx/r11 from what the slot pushes, so they
 * must hold the interrupted values here, and sets evtchn_upcall_mask from
 * !RFLAGS.IF of the frame.
 */
    .type exit_via_iret, @function
exit_via_iret:
    RESTORE_ALL
    addq $16, %rsp
    pushq $0
    jmp IRET_SLOT
    .size exit_via_iret, . - exit_via_iret

/* ------------------------------------------------------------------ */
/*
 * void switch_to(unsigned long *prev_sp, unsigned long next_sp)
 * Save callee-saved registers on the old stack, switch stacks, restore.
 * The SysV ABI makes everything else caller-saved, so this is all a
 * cooperative switch needs.
 */
    .globl switch_to
    .type switch_to, @function
switch_to:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size switch_to, . - switch_to

/*
 * First "return" of a new thread lands here (see create_thread); r12
 * holds the struct thread pointer.  RSP is 16-byte aligned at this point.
 */
    .globl thread_trampoline
    .type thread_trampoline, @function
thread_trampoline:
    movq %r12, %rdi
    call thread_entry               /* never returns */
1:  pause
    jmp 1b
    .size thread_trampoline, . - thread_trampoline

    .section .note.GNU-stack, "", @progbits
