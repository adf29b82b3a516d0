/*
 * native_cpubench: the cpubench workload run natively, as the baseline of
 * pyxen's cpubench guest.  Same source (guest/apps/cpubench_work.h), same
 * code-generation flags as the guest where they matter (bench/benchmarks.py
 * passes -O2 -mgeneral-regs-only -mno-red-zone -fno-builtin ...), same output
 * line as the guest app:
 *
 *   cpubench: iters=<n> result=<hex checksum> ns=<time of cpubench_work>
 *
 * Usage: native_cpubench ITERS
 * Integer only: -mgeneral-regs-only forbids floating point in this file.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "../../guest/apps/cpubench_work.h"

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: native_cpubench ITERS\n");
        return 2;
    }
    uint64_t iters = strtoull(argv[1], NULL, 0);
    uint64_t t0 = now_ns();
    uint64_t result = cpubench_work(iters);
    uint64_t ns = now_ns() - t0;
    printf("cpubench: iters=%llu result=%llx ns=%llu\n", (unsigned long long)iters,
           (unsigned long long)result, (unsigned long long)ns);
    return 0;
}
