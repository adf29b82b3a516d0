/*
 * echo: a console input test.  Prints "echo: ready", then echoes every
 * input line back as "echo: <line>" (a line ends at \r or \n; empty lines
 * are ignored, so \r\n counts once).  The line "quit" prints "echo: bye"
 * and powers off.
 *
 * Waiting for input: console.c's event handler moves received bytes into
 * its buffer, and console_read() takes them without blocking.  Between
 * reads we block the vCPU until the next event (the console port, or
 * anything else).  The check-then-block is done with events masked and
 * SCHEDOP_block re-enables them atomically, so input arriving between
 * the empty read and the block still wakes us.
 */
#include "app.h"

const char app_name[] = "echo";

#define LINE_MAX 200

static size_t wait_for_input(char *buf, size_t len)
{
    for (;;) {
        size_t n;

        irq_disable();
        n = console_read(buf, len);
        if (!n && !READ_ONCE(this_vcpu()->evtchn_upcall_pending))
            HYPERVISOR_sched_op(SCHEDOP_block, NULL);  /* unmasks events */
        irq_enable();                                   /* runs any pending upcall */
        if (n)
            return n;
    }
}

int app_main(const char *cmdline)
{
    char line[LINE_MAX + 1];
    size_t used = 0;
    char buf[64];

    (void)cmdline;
    printk("echo: ready\n");
    for (;;) {
        size_t n = wait_for_input(buf, sizeof(buf));

        for (size_t i = 0; i < n; i++) {
            char c = buf[i];

            if (c != '\r' && c != '\n') {
                if (used < LINE_MAX)
                    line[used++] = c;
                continue;
            }
            if (!used)
                continue;
            line[used] = '\0';
            used = 0;
            if (strcmp(line, "quit") == 0) {
                printk("echo: bye\n");
                poweroff();
            }
            printk("echo: %s\n", line);
        }
    }
}
