/* crash: write to an unmapped address; the kernel's fatal handler must
 * dump state and shut the domain down with SHUTDOWN_crash. */
#include "app.h"

const char app_name[] = "crash";

int app_main(const char *cmdline)
{
    (void)cmdline;
    printk("crash: about to fault\n");
    *(volatile uint64_t *)0xdead0000UL = 0x1234;
    printk("crash: write did NOT fault\n");
    return 1;
}
