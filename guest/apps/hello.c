/* hello: the smallest useful app - one line, then power off. */
#include "app.h"

const char app_name[] = "hello";

int app_main(const char *cmdline)
{
    (void)cmdline;
    printk("Hello from pyxen guest!\n");
    printk("hello: powering off\n");
    poweroff();
}
