/*
 * head.S - ELF notes for the domain builder, the entry point, the
 * hypercall page and the boot stack.
 *
 * Entry state (Xen x86_64 PV): ring 3, CS=FLAT_KERNEL_CS, RSI = virtual
 * address of start_info, RSP = a tiny builder-provided stack, events
 * masked.  Our image is mapped at VIRT_BASE with pfn 0 at VIRT_BASE.
 */
#include "xen_abi.h"

#define VIRT_BASE_ADDR  0xFFFFFFFF80000000

/*
 * One Xen ELF note: namesz=4 ("Xen\0"), descsz, type, name, desc, each
 * padded to 4 bytes.  Numeric descriptors are 8-byte quads; Xen accepts
 * any of 1/2/4/8 bytes.
 */
#define XEN_NOTE(type, directive, value)                \
    .balign 4;                                          \
    .long 4;                                            \
    .long 2f - 1f;                                      \
    .long type;                                         \
    .asciz "Xen";                                       \
    .balign 4;                                          \
1:  directive value;                                    \
2:  .balign 4

    .section .note.Xen, "a", @note
    XEN_NOTE(XEN_ELFNOTE_GUEST_OS,       .asciz, "pyxen-guest")
    XEN_NOTE(XEN_ELFNOTE_GUEST_VERSION,  .asciz, "0.1")
    XEN_NOTE(XEN_ELFNOTE_XEN_VERSION,    .asciz, "xen-3.0")
    XEN_NOTE(XEN_ELFNOTE_VIRT_BASE,      .quad,  VIRT_BASE_ADDR)
    /* paddr = p_paddr - PADDR_OFFSET; our p_paddr == p_vaddr, so the
     * image starts at pseudo-physical address 0 (pfn 0). */
    XEN_NOTE(XEN_ELFNOTE_PADDR_OFFSET,   .quad,  VIRT_BASE_ADDR)
    XEN_NOTE(XEN_ELFNOTE_ENTRY,          .quad,  _start)
    XEN_NOTE(XEN_ELFNOTE_HYPERCALL_PAGE, .quad,  hypercall_page)
    XEN_NOTE(XEN_ELFNOTE_LOADER,         .asciz, "generic")
    /* "!feature" would mean *required*; we require nothing optional
     * (page tables are updated through hypercalls, never written). */
    XEN_NOTE(XEN_ELFNOTE_FEATURES,       .asciz, "")
    XEN_NOTE(XEN_ELFNOTE_PAE_MODE,       .asciz, "yes")

/* ------------------------------------------------------------------ */
    .section .text.head, "ax"
    .code64
    .globl _start
    .type _start, @function
_start:
    cld
    /* Keep start_info and the builder's RSP; we still need them. */
    movq %rsi, %r12
    movq %rsp, %r13

    /* Zero .bss ourselves instead of trusting the loader to have done it
     * (nothing in .bss is live yet: we are still on the builder's stack). */
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb

    movq %r13, boot_initial_rsp(%rip)
    /* Leave the builder's stack at once; it sits in memory we free later. */
    leaq boot_stack_top(%rip), %rsp
    xorl %ebp, %ebp
    movq %r12, %rdi
    call start_kernel
    /* start_kernel never returns; there is no hlt at CPL3, so spin. */
1:  pause
    jmp 1b
    .size _start, . - _start

/* ------------------------------------------------------------------ */
/*
 * The hypervisor overwrites this page with 128 32-byte stubs at load time.
 * Filled with int3 so a call into an unfilled page faults loudly.
 */
    .section .text.hypercall_page, "ax"
    .balign 4096
    .globl hypercall_page
    .type hypercall_page, @function
hypercall_page:
    .fill 4096, 1, 0xcc
    .size hypercall_page, 4096

/* ------------------------------------------------------------------ */
    .section .bss.stack, "aw", @nobits
    .balign 4096
    .globl boot_stack, boot_stack_top
boot_stack:
    .skip 16384
boot_stack_top:

    .section .note.GNU-stack, "", @progbits
