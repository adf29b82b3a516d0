/*
 * console.h - the PV console: shared ring + event channel, with
 * HYPERVISOR_console_io as the early/fatal fallback.
 */
#ifndef PYXEN_CONSOLE_H
#define PYXEN_CONSOLE_H

#include "kernel.h"

void console_init(void);                      /* switch printk to the ring */
void console_write(const char *buf, size_t len);
void console_io_write(const char *buf, size_t len); /* always HYPERVISOR_console_io */
int  console_ring_ready(void);
/* Wait (up to timeout_ns) until the backend has consumed all output. */
int  console_flush(uint64_t timeout_ns);
/* Non-blocking read of received input; returns bytes copied. */
size_t console_read(char *buf, size_t len);

#endif /* PYXEN_CONSOLE_H */
