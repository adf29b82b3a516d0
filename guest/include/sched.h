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
void sched_timer_event(void);            /* called from the VIRQ_TIMER handler */
uint64_t sched_next_deadline(void);      /* earliest sleeper, 0 = none */

/*
 * Wait for "something": any event or the deadline, whichever is first.
 * Usable from any thread; if events are masked it degrades to a yield.
 */
void hv_wait(uint64_t deadline_ns);

#endif /* PYXEN_SCHED_H */
