/*
 * hypercall.h - calling into the hypervisor through the hypercall page.
 *
 * The hypervisor writes a small stub into each 32-byte slot of
 * hypercall_page (ELF note HYPERCALL_PAGE).  We simply `call` the slot.
 *
 * Register convention (x86_64 PV): args in rdi, rsi, rdx, r10, r8 (r10,
 * not rcx, because the stub uses syscall which eats rcx/r11); result in
 * rax.  A debug Xen deliberately scribbles on *all* argument registers,
 * used or not, so every macro below declares all five as in/out operands
 * and rcx/r11 as clobbered.  "memory" because most hypercalls read or
 * write guest memory through the pointers we pass.
 */
#ifndef PYXEN_HYPERCALL_H
#define PYXEN_HYPERCALL_H

#include "xen_abi.h"

extern char hypercall_page[4096];

#define _hypercall5(type, nr, a1, a2, a3, a4, a5)                          \
({                                                                         \
    register unsigned long __res asm("rax");                               \
    register unsigned long __a1 asm("rdi") = (unsigned long)(a1);          \
    register unsigned long __a2 asm("rsi") = (unsigned long)(a2);          \
    register unsigned long __a3 asm("rdx") = (unsigned long)(a3);          \
    register unsigned long __a4 asm("r10") = (unsigned long)(a4);          \
    register unsigned long __a5 asm("r8")  = (unsigned long)(a5);          \
    asm volatile("call hypercall_page+%c[off]"                             \
                 : "=r"(__res), "+r"(__a1), "+r"(__a2), "+r"(__a3),        \
                   "+r"(__a4), "+r"(__a5)                                  \
                 : [off] "i"((nr) * HYPERCALL_SLOT_SIZE)                   \
                 : "memory", "rcx", "r11");                                \
    (type)__res;                                                           \
})

#define _hypercall0(type, nr)                  _hypercall5(type, nr, 0, 0, 0, 0, 0)
#define _hypercall1(type, nr, a1)              _hypercall5(type, nr, a1, 0, 0, 0, 0)
#define _hypercall2(type, nr, a1, a2)          _hypercall5(type, nr, a1, a2, 0, 0, 0)
#define _hypercall3(type, nr, a1, a2, a3)      _hypercall5(type, nr, a1, a2, a3, 0, 0)
#define _hypercall4(type, nr, a1, a2, a3, a4)  _hypercall5(type, nr, a1, a2, a3, a4, 0)

static inline long HYPERVISOR_set_trap_table(const struct trap_info *t)
{ return _hypercall1(long, __HYPERVISOR_set_trap_table, t); }

static inline long HYPERVISOR_mmu_update(struct mmu_update *req, unsigned int count,
                                         unsigned int *done, domid_t dom)
{ return _hypercall4(long, __HYPERVISOR_mmu_update, req, count, done, dom); }

static inline long HYPERVISOR_mmuext_op(struct mmuext_op *op, unsigned int count,
                                        unsigned int *done, domid_t dom)
{ return _hypercall4(long, __HYPERVISOR_mmuext_op, op, count, done, dom); }

static inline long HYPERVISOR_stack_switch(unsigned long ss, unsigned long sp)
{ return _hypercall2(long, __HYPERVISOR_stack_switch, ss, sp); }

static inline long HYPERVISOR_set_callbacks(unsigned long event, unsigned long failsafe,
                                            unsigned long syscall)
{ return _hypercall3(long, __HYPERVISOR_set_callbacks, event, failsafe, syscall); }

static inline long HYPERVISOR_fpu_taskswitch(int set)
{ return _hypercall1(long, __HYPERVISOR_fpu_taskswitch, set); }

static inline long HYPERVISOR_memory_op(unsigned int cmd, void *arg)
{ return _hypercall2(long, __HYPERVISOR_memory_op, cmd, arg); }

static inline long HYPERVISOR_multicall(struct multicall_entry *calls, unsigned int n)
{ return _hypercall2(long, __HYPERVISOR_multicall, calls, n); }

static inline long HYPERVISOR_update_va_mapping(unsigned long va, uint64_t pte,
                                                unsigned long flags)
{ return _hypercall3(long, __HYPERVISOR_update_va_mapping, va, pte, flags); }

/* One-shot timer at an absolute system time (ns); 0 cancels. */
static inline long HYPERVISOR_set_timer_op(uint64_t deadline_ns)
{ return _hypercall1(long, __HYPERVISOR_set_timer_op, deadline_ns); }

static inline long HYPERVISOR_xen_version(int cmd, void *arg)
{ return _hypercall2(long, __HYPERVISOR_xen_version, cmd, arg); }

static inline long HYPERVISOR_console_io(int cmd, unsigned long len, const char *buf)
{ return _hypercall3(long, __HYPERVISOR_console_io, cmd, len, buf); }

static inline long HYPERVISOR_vm_assist(unsigned int cmd, unsigned int type)
{ return _hypercall2(long, __HYPERVISOR_vm_assist, cmd, type); }

static inline long HYPERVISOR_vcpu_op(int cmd, unsigned int vcpu, void *arg)
{ return _hypercall3(long, __HYPERVISOR_vcpu_op, cmd, vcpu, arg); }

static inline long HYPERVISOR_set_segment_base(int which, unsigned long base)
{ return _hypercall2(long, __HYPERVISOR_set_segment_base, which, base); }

static inline long HYPERVISOR_sched_op(int cmd, void *arg)
{ return _hypercall2(long, __HYPERVISOR_sched_op, cmd, arg); }

static inline long HYPERVISOR_callback_op(int cmd, const void *arg)
{ return _hypercall2(long, __HYPERVISOR_callback_op, cmd, arg); }

static inline long HYPERVISOR_event_channel_op(int cmd, void *arg)
{ return _hypercall2(long, __HYPERVISOR_event_channel_op, cmd, arg); }

/*
 * There is deliberately no C wrapper for __HYPERVISOR_iret: it never
 * returns to its caller and needs a precise stack layout, so it is only
 * used from the exception/event exit path in entry.S.
 */

#endif /* PYXEN_HYPERCALL_H */
