/*
 * sched.h - cooperative kernel threads.
 *
 * Threads switch only in schedule(); event handlers never switch, they
 * just make threads runnable.  The boot context becomes the idle thread,
 * which is the only place the vCPU blocks in the hypervisor.
 */
#ifndef PYXEN_SCHED_H
#define PYXEN_SCHED_H

#include "kernel.h"

#define THREAD_STACK_PAGES 4        /* 16 KiB */

enum thread_state { T_FREE = 0, T_RUNNABLE, T_BLOCKED, T_DEAD };

struct thread {
    const char *name;
    unsigned long sp;               /* saved RSP while switched out */
    void *stack;                    /* base of stack pages (NULL for idle) */
    enum thread_state state;
    uint64_t wakeup_ns;             /* absolute system time, 0 = none */
    void (*fn)(void *);
    void *arg;
    int id;
};

extern struct thread *current;

void sched_init(void);
struct thread *create_thread(const char *name, void (*fn)(void *), void *arg);
void schedule(void);
void __noreturn thread_exit(void);
void __noreturn idle_loop(void);

/* Mark the current thread blocked; it stops running at the next schedule(). */
void block_current(void);
void wake_thread(struct thread *t);

void msleep(uint64_t ms);
void sleep_until(uint64_t deadline_ns);  /* absolute system time */

/* Timer plumbing (used by time.c / console.c). */
void sched_timer_resume(void);           /* re-arm after a restore */
void sched_timer_event(void);            /* called from the VIRQ_TIMER handler */
uint64_t sched_next_deadline(void);      /* earliest sleeper, 0 = none */

/*
 * Wait for "something": any event or the deadline, whichever is first.
 * Usable from any thread; if events are masked it degrades to a yield.
 */
void hv_wait(uint64_t deadline_ns);

/*
 * A wait queue: threads park in it while their condition is false; whoever
 * may have made a condition true wakes them all and each re-checks its own.
 * The idle thread never blocks: it waits in place with hv_wait.  When every
 * slot is taken, the waiter polls every millisecond if poll_when_full, else
 * the kernel panics (the queue was sized for the driver's threads).
 */
#define WAITQ_SLOTS 32
struct waitq {
    const char *name;
    int poll_when_full;
    struct thread *w[WAITQ_SLOTS];
};
void waitq_wake_all(struct waitq *q);
/* cond is checked with events masked.  deadline 0 = none.  1 = cond true. */
int waitq_wait(struct waitq *q, int (*cond)(void *), void *arg, uint64_t deadline);

#endif /* PYXEN_SCHED_H */
