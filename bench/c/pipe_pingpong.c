/*
 * pipe_pingpong: the host baseline for interdomain_event_rtt.
 *
 *   pipe_pingpong ROUNDS [WARMUP]
 *
 * fork()s a child; parent and child bounce one byte over two pipes ROUNDS
 * times (after WARMUP untimed round trips, default 100).  The parent times
 * each round trip (write, then blocking read of the answer) with
 * CLOCK_MONOTONIC and prints
 *   pipe_pingpong: rounds=N median_ns=<m> p99_ns=<p> avg_ns=<a> min_ns=<min> max_ns=<max>
 * The same statistics as guest/apps/pingpong.c (median = sorted[n/2],
 * p99 = sorted[n*99/100]).
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void xfer(int fd, int out, unsigned char *b)
{
    ssize_t r;

    do
        r = out ? write(fd, b, 1) : read(fd, b, 1);
    while (r < 0 && errno == EINTR);
    if (r != 1) {
        fprintf(stderr, "pipe_pingpong: %s: %s\n", out ? "write" : "read",
                r == 0 ? "EOF" : "error");
        exit(1);
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 2000;
    long warmup = argc > 2 ? atol(argv[2]) : 100;
    int ping[2], pong[2];
    uint64_t *samples, total = 0;
    unsigned char b = 0;
    pid_t pid;
    int status;

    if (rounds <= 0 || warmup < 0) {
        fprintf(stderr, "usage: pipe_pingpong ROUNDS [WARMUP]\n");
        return 2;
    }
    samples = malloc(sizeof(*samples) * (size_t)rounds);
    if (!samples || pipe(ping) || pipe(pong)) {
        perror("pipe_pingpong: setup");
        return 1;
    }
    pid = fork();
    if (pid < 0) {
        perror("pipe_pingpong: fork");
        return 1;
    }
    if (pid == 0) {
        close(ping[1]);
        close(pong[0]);
        for (long i = 0; i < rounds + warmup; i++) {
            xfer(ping[0], 0, &b);
            b++;
            xfer(pong[1], 1, &b);
        }
        _exit(0);
    }
    close(ping[0]);
    close(pong[1]);
    for (long i = 0; i < rounds + warmup; i++) {
        unsigned char want = (unsigned char)(b + 1);
        uint64_t t0 = now_ns(), dt;

        xfer(ping[1], 1, &b);
        xfer(pong[0], 0, &b);
        dt = now_ns() - t0;
        if (b != want) {
            fprintf(stderr, "pipe_pingpong: round %ld: got %u, want %u\n", i, b, want);
            kill(pid, SIGKILL);
            return 1;
        }
        if (i >= warmup) {
            samples[i - warmup] = dt;
            total += dt;
        }
    }
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status)) {
        fprintf(stderr, "pipe_pingpong: child failed\n");
        return 1;
    }
    qsort(samples, (size_t)rounds, sizeof(*samples), cmp_u64);
    printf("pipe_pingpong: rounds=%ld median_ns=%llu p99_ns=%llu avg_ns=%llu min_ns=%llu max_ns=%llu\n",
           rounds, (unsigned long long)samples[rounds / 2],
           (unsigned long long)samples[rounds * 99 / 100],
           (unsigned long long)(total / (uint64_t)rounds), (unsigned long long)samples[0],
           (unsigned long long)samples[rounds - 1]);
    return 0;
}
