/*
 * cpubench_work.h - the cpubench workload, shared verbatim between the
 * guest app (apps/cpubench.c) and native host builds (tools/cpubench_host.c)
 * so guest and host run exactly the same instructions.
 *
 * Integer only, no libc, deterministic: the checksum depends only on the
 * iteration count.  The mix per iteration: an xorshift64 step, a
 * multiply, a load+store into a 64 KiB table (stays in L1/L2 cache, so it
 * measures the CPU rather than the memory system), and a 64-bit divide
 * every fourth iteration.
 */
#ifndef PYXEN_CPUBENCH_WORK_H
#define PYXEN_CPUBENCH_WORK_H

#include <stdint.h>

#define CPUBENCH_TABLE_WORDS   8192            /* 8192 * 8 bytes = 64 KiB */
#define CPUBENCH_DEFAULT_ITERS 300000000ULL   /* ~0.7 s natively on a 2020s x86 core */

static uint64_t cpubench_table[CPUBENCH_TABLE_WORDS];

static inline uint64_t cpubench_work(uint64_t iterations)
{
    uint64_t x = 0x9E3779B97F4A7C15ULL;     /* xorshift state, never 0 */
    uint64_t acc = 0;
    uint64_t i;

    for (i = 0; i < CPUBENCH_TABLE_WORDS; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        cpubench_table[i] = x;
    }

    for (i = 0; i < iterations; i++) {
        uint64_t idx, t;

        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        idx = (x >> 23) & (CPUBENCH_TABLE_WORDS - 1);
        t = cpubench_table[idx];
        acc += t * 0xFF51AFD7ED558CCDULL;
        acc ^= acc >> 29;
        if ((i & 3) == 0)
            acc += t / ((x & 0xFFFFF) | 1);
        cpubench_table[idx] = t ^ acc;
    }
    return acc ^ x;
}

#endif /* PYXEN_CPUBENCH_WORK_H */
