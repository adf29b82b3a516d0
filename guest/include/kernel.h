/*
 * kernel.h - common definitions for pyxen-guest.
 *
 * Only compiler-provided freestanding headers (stdint/stddef/stdarg) are
 * used; everything else (memcpy, printk, ...) is implemented in lib.c and
 * printk.c.
 */
#ifndef PYXEN_KERNEL_H
#define PYXEN_KERNEL_H

#include <stdint.h>
#include <stddef.h>
#include <stdarg.h>
#include "xen_abi.h"

#define VIRT_BASE     0xFFFFFFFF80000000UL
#define PAGE_SHIFT    12
#define PAGE_SIZE     (1UL << PAGE_SHIFT)
#define PAGE_MASK     (~(PAGE_SIZE - 1))

#define NSEC_PER_USEC 1000ULL
#define NSEC_PER_MSEC 1000000ULL
#define NSEC_PER_SEC  1000000000ULL

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b)     ((a) < (b) ? (a) : (b))
#define MAX(a, b)     ((a) > (b) ? (a) : (b))
#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((a) - 1))

#define __noreturn    __attribute__((noreturn))
#define __aligned(n)  __attribute__((aligned(n)))
#define __section(s)  __attribute__((section(s)))
#define __unused      __attribute__((unused))
#define __printf(a, b) __attribute__((format(printf, a, b)))

/* Compiler barrier and the x86 memory barriers (all legal at CPL3). */
#define barrier()     asm volatile("" ::: "memory")
#define mb()          asm volatile("mfence" ::: "memory")
#define rmb()         asm volatile("lfence" ::: "memory")
/* x86 doesn't reorder stores with stores: a compiler barrier suffices. */
#define wmb()         barrier()

#define READ_ONCE(x)     (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    /* lfence keeps rdtsc from being executed ahead of earlier loads. */
    asm volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
    asm volatile("pause" ::: "memory");
}

/* lib.c */
void *memset(void *s, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strncpy_z(char *dst, const char *src, size_t size); /* always NUL-terminates */
unsigned long simple_strtoul(const char *s, const char **end, int base);

/* Command line: "key=value key2=value2 flag" */
const char *cmdline_find(const char *cmdline, const char *key, size_t *len);
int cmdline_get_str(const char *cmdline, const char *key, char *buf, size_t size);
unsigned long cmdline_get_ulong(const char *cmdline, const char *key, unsigned long dflt);

/* printk.c */
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __printf(3, 4);
void printk(const char *fmt, ...) __printf(1, 2);
void vprintk(const char *fmt, va_list ap);
/* Synchronous output straight through HYPERVISOR_console_io. */
void early_printk(const char *fmt, ...) __printf(1, 2);
void __noreturn panic(const char *fmt, ...) __printf(1, 2);

/* main.c */
extern struct start_info *start_info;   /* private copy, valid forever */
extern const char *kernel_cmdline;
extern unsigned long boot_initial_rsp;  /* RSP we were entered with */
extern int shared_info_mapped;          /* set once shared_info is mapped */
void __noreturn xen_shutdown(unsigned int reason);
int kernel_suspend(void);               /* 0: resumed after restore, 1: cancelled */
void map_shared_info(void);
void __noreturn poweroff(void);

/* Each app provides these (in apps/); exactly one app is linked in. */
extern const char app_name[];
int app_main(const char *cmdline);
/* "<app_name>: FAIL <message>" on the console, then SHUTDOWN_crash. */
void __noreturn app_fail(const char *fmt, ...) __printf(1, 2);

/* Linker-script symbols */
extern char _text[], _etext[], _end[], __bss_start[], __bss_end[];

#endif /* PYXEN_KERNEL_H */
