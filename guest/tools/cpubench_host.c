/*
 * cpubench_host.c - run the cpubench workload natively for comparison.
 * Build: make -C guest host-cpubench; run: guest/build/host/cpubench_host [iters]
 * Prints the same line as the guest app.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "../apps/cpubench_work.h"

int main(int argc, char **argv)
{
    uint64_t iters = argc > 1 ? strtoull(argv[1], NULL, 0) : CPUBENCH_DEFAULT_ITERS;
    struct timespec a, b;
    uint64_t result, ns;

    clock_gettime(CLOCK_MONOTONIC, &a);
    result = cpubench_work(iters);
    clock_gettime(CLOCK_MONOTONIC, &b);
    ns = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000ULL + (uint64_t)(b.tv_nsec - a.tv_nsec);
    printf("cpubench: iters=%llu result=%llx ns=%llu\n",
           (unsigned long long)iters, (unsigned long long)result, (unsigned long long)ns);
    return 0;
}
