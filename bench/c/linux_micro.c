/*
 * linux_micro: three OS micro-benchmarks, run the same way inside a Linux guest
 * (from the busybox shell of the bench initramfs) and natively on the host.
 *
 *   linux_micro [getpid_n fork_n fault_pages]
 *
 * Prints one line:
 *   linux_micro: getpid_ns=... fork_exit_us=... page_fault_ns=...
 *
 * getpid:     raw syscall(SYS_getpid) round trip (no libc caching), mean of getpid_n;
 * fork+exit:  fork(), the child _exit(0)s, the parent waitpid()s, mean of fork_n;
 * page fault: first write to each page of a fresh anonymous mapping of fault_pages
 *             pages (one demand-zero fault each), mean per page, mapping unmapped after.
 * Built static (bench/benchmarks.py: gcc -static) so that the guest needs no libc.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv)
{
    long n_getpid = argc > 1 ? atol(argv[1]) : 20000;
    long n_fork = argc > 2 ? atol(argv[2]) : 200;
    long pages = argc > 3 ? atol(argv[3]) : 4096;
    volatile long sink = 0;

    double t = now_ns();
    for (long i = 0; i < n_getpid; i++)
        sink += syscall(SYS_getpid);
    double getpid_ns = (now_ns() - t) / n_getpid;

    t = now_ns();
    for (long i = 0; i < n_fork; i++) {
        pid_t p = fork();
        if (p == 0)
            _exit(0);
        if (p < 0) {
            perror("fork");
            return 1;
        }
        waitpid(p, NULL, 0);
    }
    double fork_us = (now_ns() - t) / n_fork / 1e3;

    long psz = sysconf(_SC_PAGESIZE);
    char *m = mmap(NULL, pages * psz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    t = now_ns();
    for (long i = 0; i < pages; i++)
        m[i * psz] = 1;
    double fault_ns = (now_ns() - t) / pages;
    munmap(m, pages * psz);

    printf("linux_micro: getpid_ns=%.0f fork_exit_us=%.1f page_fault_ns=%.0f (n=%ld,%ld,%ld)\n",
           getpid_ns, fork_us, fault_ns, n_getpid, n_fork, pages);
    return (int)(sink & 0);
}
