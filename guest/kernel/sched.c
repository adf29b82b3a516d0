/*
 * sched.c - cooperative round-robin threads, sleeping and the idle loop.
 *
 * Run-state changes can come from event handlers (timer wakeups), so
 * they are done with events masked.  Only schedule() switches threads;
 * only the idle thread (and hv_wait) blocks the vCPU in the hypervisor.
 */
#include "sched.h"
#include "events.h"
#include "hypercall.h"
#include "mm.h"
#include "xtime.h"

#define MAX_THREADS 32

struct thread *current;
static struct thread threads[MAX_THREADS];
static struct thread *const idle_thread = &threads[0];

extern void switch_to(unsigned long *prev_sp, unsigned long next_sp);
extern char thread_trampoline[];

void sched_init(void)
{
    /* The boot context (on boot_stack) becomes the idle thread. */
    idle_thread->name = "idle";
    idle_thread->state = T_RUNNABLE;
    idle_thread->id = 0;
    current = idle_thread;
}

/* Called on a new thread's stack by entry.S:thread_trampoline. */
void __noreturn thread_entry(struct thread *t);
void thread_entry(struct thread *t)
{
    /* schedule() switched to us with events masked; we run with them on. */
    irq_enable();
    t->fn(t->arg);
    thread_exit();
}

struct thread *create_thread(const char *name, void (*fn)(void *), void *arg)
{
    struct thread *t = NULL;
    unsigned long flags, top, *frame;
    void *stack;

    stack = alloc_pages(THREAD_STACK_PAGES);
    if (!stack)
        return NULL;

    flags = irq_save();
    for (int i = 1; i < MAX_THREADS; i++) {
        if (threads[i].state == T_FREE) {
            t = &threads[i];
            t->id = i;
            t->state = T_BLOCKED;   /* reserved, not yet runnable */
            break;
        }
    }
    irq_restore(flags);
    if (!t) {
        free_pages(stack, THREAD_STACK_PAGES);
        return NULL;
    }

    t->name = name;
    t->fn = fn;
    t->arg = arg;
    t->stack = stack;
    t->wakeup_ns = 0;

    /*
     * Initial frame popped by switch_to: r15 r14 r13 r12 rbx rbp, then the
     * return address.  Placed so that after the `ret` RSP == top, which
     * is 16-byte aligned, as the trampoline's `call` expects.
     */
    top = (unsigned long)stack + THREAD_STACK_PAGES * PAGE_SIZE;
    frame = (unsigned long *)(top - 7 * sizeof(unsigned long));
    frame[0] = 0;                           /* r15 */
    frame[1] = 0;                           /* r14 */
    frame[2] = 0;                           /* r13 */
    frame[3] = (unsigned long)t;            /* r12 -> thread_entry(t) */
    frame[4] = 0;                           /* rbx */
    frame[5] = 0;                           /* rbp */
    frame[6] = (unsigned long)thread_trampoline;
    t->sp = (unsigned long)frame;

    flags = irq_save();
    t->state = T_RUNNABLE;
    irq_restore(flags);
    return t;
}

/* Wake every sleeper whose deadline has passed.  Events must be masked. */
static void wake_expired(uint64_t now)
{
    for (int i = 1; i < MAX_THREADS; i++) {
        struct thread *t = &threads[i];
        if (t->state == T_BLOCKED && t->wakeup_ns && t->wakeup_ns <= now) {
            t->wakeup_ns = 0;
            t->state = T_RUNNABLE;
        }
    }
}

uint64_t sched_next_deadline(void)
{
    uint64_t dl = 0;
    unsigned long flags = irq_save();
    for (int i = 1; i < MAX_THREADS; i++) {
        struct thread *t = &threads[i];
        if (t->state == T_BLOCKED && t->wakeup_ns && (!dl || t->wakeup_ns < dl))
            dl = t->wakeup_ns;
    }
    irq_restore(flags);
    return dl;
}

/*
 * The one-shot timer deadline currently armed in the hypervisor (0 = none
 * or already fired).  Re-arming the same deadline is skipped: each
 * hypercall is a VM exit.
 */
static uint64_t timer_armed;

static void arm_timer(uint64_t deadline)
{
    if (deadline && deadline != timer_armed) {
        timer_armed = deadline;
        HYPERVISOR_set_timer_op(deadline);
    }
}

/* After a restore the hypervisor has no timer for us: arm the next one. */
void sched_timer_resume(void)
{
    timer_armed = 0;
    arm_timer(sched_next_deadline());
}

void sched_timer_event(void)
{
    timer_armed = 0;            /* one-shot: it has fired */
    wake_expired(monotonic_ns());
}

/* Round robin after prev; prev itself last; idle if nobody is runnable. */
static struct thread *pick_next(struct thread *prev)
{
    int start = prev->id;
    for (int n = 1; n <= MAX_THREADS; n++) {
        int i = (start + n) % MAX_THREADS;
        if (i != 0 && threads[i].state == T_RUNNABLE)
            return &threads[i];
    }
    return idle_thread;
}

void schedule(void)
{
    unsigned long flags = irq_save();
    struct thread *prev = current, *next;

    wake_expired(monotonic_ns());
    next = pick_next(prev);
    if (next != prev) {
        current = next;
        switch_to(&prev->sp, next->sp);
        /* ...back on prev's stack, some time later. */
    }
    irq_restore(flags);
}

void thread_exit(void)
{
    irq_disable();
    current->state = T_DEAD;    /* the idle thread frees the stack */
    schedule();
    for (;;)                    /* not reached: dead threads aren't picked */
        ;
}

void block_current(void)
{
    unsigned long flags = irq_save();
    current->state = T_BLOCKED;
    irq_restore(flags);
}

void wake_thread(struct thread *t)
{
    unsigned long flags = irq_save();
    if (t->state == T_BLOCKED) {
        t->wakeup_ns = 0;
        t->state = T_RUNNABLE;
    }
    irq_restore(flags);
}

void sleep_until(uint64_t deadline_ns)
{
    unsigned long flags;

    if (current == idle_thread) {
        /* Idle must never be descheduled: wait in place instead. */
        while (monotonic_ns() < deadline_ns)
            hv_wait(deadline_ns);
        return;
    }
    flags = irq_save();
    current->wakeup_ns = deadline_ns ? deadline_ns : 1;
    current->state = T_BLOCKED;
    irq_restore(flags);
    schedule();
}

void msleep(uint64_t ms)
{
    sleep_until(monotonic_ns() + ms * NSEC_PER_MSEC);
}

void hv_wait(uint64_t deadline_ns)
{
    uint64_t dl;

    if (irqs_disabled()) {
        /* Blocking would unmask events under our caller's feet. */
        HYPERVISOR_sched_op(SCHEDOP_yield, NULL);
        return;
    }
    irq_disable();
    dl = sched_next_deadline();
    if (!dl || deadline_ns < dl)
        dl = deadline_ns;
    arm_timer(dl);
    /* Block atomically re-enables events; skip it if one is already here. */
    if (!READ_ONCE(this_vcpu()->evtchn_upcall_pending))
        HYPERVISOR_sched_op(SCHEDOP_block, NULL);
    irq_enable();
}

static int others_runnable(void)
{
    for (int i = 1; i < MAX_THREADS; i++)
        if (threads[i].state == T_RUNNABLE)
            return 1;
    return 0;
}

static void reap_dead(void)
{
    for (int i = 1; i < MAX_THREADS; i++) {
        struct thread *t = &threads[i];
        unsigned long flags = irq_save();
        int dead = t->state == T_DEAD && t != current;
        irq_restore(flags);
        if (dead) {
            free_pages(t->stack, THREAD_STACK_PAGES);
            t->stack = NULL;
            t->state = T_FREE;
        }
    }
}

/*
 * The block dance: with events masked, make sure there is really nothing
 * to do, arm the one-shot timer for the earliest sleeper, and only then
 * SCHEDOP_block - which unmasks events atomically, so an event arriving
 * after our checks still wakes us instead of being missed.
 */
void idle_loop(void)
{
    for (;;) {
        uint64_t dl;

        reap_dead();
        irq_disable();
        wake_expired(monotonic_ns());
        if (others_runnable()) {
            irq_enable();
            schedule();
            continue;
        }
        dl = sched_next_deadline();
        arm_timer(dl);
        if (!READ_ONCE(this_vcpu()->evtchn_upcall_pending))
            HYPERVISOR_sched_op(SCHEDOP_block, NULL);
        /* Events are on again; run any upcall the hypervisor left pending. */
        irq_enable();
    }
}

/* ---------------------------------------------------------------- */
/* Wait queues (see sched.h) */

void waitq_wake_all(struct waitq *q)
{
    unsigned long flags = irq_save();
    for (int i = 0; i < WAITQ_SLOTS; i++)
        if (q->w[i])
            wake_thread(q->w[i]);
    irq_restore(flags);
}

int waitq_wait(struct waitq *q, int (*cond)(void *), void *arg, uint64_t deadline)
{
    int slot = -1, ok;

    for (;;) {
        irq_disable();
        if (cond(arg)) {
            ok = 1;
            break;
        }
        if (deadline && monotonic_ns() >= deadline) {
            ok = 0;
            break;
        }
        if (current->id == 0) {
            /* The idle thread must not block: wait in place. */
            irq_enable();
            hv_wait(deadline ? deadline : monotonic_ns() + NSEC_PER_MSEC);
            continue;
        }
        if (slot < 0) {
            for (int i = 0; i < WAITQ_SLOTS && slot < 0; i++)
                if (!q->w[i])
                    slot = i;
            if (slot < 0) {
                if (!q->poll_when_full)
                    panic("%s: too many waiters\n", q->name);
                irq_enable();
                msleep(1);
                continue;
            }
            q->w[slot] = current;
        }
        current->wakeup_ns = deadline;
        current->state = T_BLOCKED;
        irq_enable();
        schedule();
    }
    if (slot >= 0)
        q->w[slot] = NULL;
    irq_enable();
    return ok;
}
