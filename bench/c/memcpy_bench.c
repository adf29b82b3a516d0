/*
 * memcpy_bench: the host baseline for grant_copy_throughput.
 *
 *   memcpy_bench MIB [PAGES] [CHUNK] [ROUNDS]
 *
 * The same copy pattern as guest/apps/gntbench.c role=copy, natively: PAGES
 * source pages (default 16, filled with gntbench's pattern) copied CHUNK
 * bytes at a time (default 4096) into PAGES destination pages, cycling
 * over them, MIB MiB in total, with memcpy.  A compiler barrier after each
 * memcpy keeps every copy; the destination is checked afterwards.  ROUNDS
 * rounds (default 3), the best one is reported:
 *   memcpy_bench: bytes=<B> ns=<t> mb_per_s=<x> chunk=<c> pages=<p> rounds=<r>
 * (MB/s = 10^6 bytes per second, as gntbench reports.)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PAGE 4096UL

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint8_t pattern(unsigned long page, unsigned long j)
{
    return (uint8_t)(page * 131 + j * 7 + 3);
}

int main(int argc, char **argv)
{
    unsigned long mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 64;
    unsigned long pages = argc > 2 ? strtoul(argv[2], NULL, 0) : 16;
    unsigned long chunk = argc > 3 ? strtoul(argv[3], NULL, 0) : PAGE;
    unsigned long rounds = argc > 4 ? strtoul(argv[4], NULL, 0) : 3;
    unsigned long per_page, slots, chunks;
    uint64_t best = UINT64_MAX;
    uint8_t *src, *dst;

    if (!mib || !pages || !chunk || chunk > PAGE || PAGE % chunk || !rounds) {
        fprintf(stderr, "usage: memcpy_bench MIB [PAGES] [CHUNK<=4096, divides 4096] [ROUNDS]\n");
        return 2;
    }
    per_page = PAGE / chunk;
    slots = pages * per_page;
    chunks = mib * 1024 * 1024 / chunk;
    if (chunks < slots)
        chunks = slots;
    if (posix_memalign((void **)&src, PAGE, pages * PAGE) ||
        posix_memalign((void **)&dst, PAGE, pages * PAGE)) {
        perror("memcpy_bench: posix_memalign");
        return 1;
    }
    for (unsigned long p = 0; p < pages; p++)
        for (unsigned long j = 0; j < PAGE; j++)
            src[p * PAGE + j] = pattern(p, j);
    memset(dst, 0, pages * PAGE);
    /* warm-up: touch everything once */
    memcpy(dst, src, pages * PAGE);

    for (unsigned long r = 0; r < rounds; r++) {
        uint64_t t0, dt;

        memset(dst, 0, pages * PAGE);
        t0 = now_ns();
        for (unsigned long k = 0; k < chunks; k++) {
            unsigned long off = (k % slots) * chunk;
            memcpy(dst + off, src + off, chunk);
            __asm__ __volatile__("" : : "r"(dst) : "memory");
        }
        dt = now_ns() - t0;
        if (memcmp(src, dst, pages * PAGE)) {
            fprintf(stderr, "memcpy_bench: destination differs from source\n");
            return 1;
        }
        if (dt < best)
            best = dt;
    }
    if (!best)
        best = 1;
    {
        uint64_t bytes = (uint64_t)chunks * chunk;
        printf("memcpy_bench: bytes=%llu ns=%llu mb_per_s=%llu chunk=%lu pages=%lu rounds=%lu\n",
               (unsigned long long)bytes, (unsigned long long)best,
               (unsigned long long)(bytes * 1000 / best), chunk, pages, rounds);
    }
    free(src);
    free(dst);
    return 0;
}
