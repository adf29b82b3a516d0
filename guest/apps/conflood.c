/*
 * conflood: a hostile guest that tries to make the host write without end
 * (issue 8, findings 4 and 5).  cmdline:
 *
 *   mode=ring  kib=K    K KiB of console lines through the console ring
 *   mode=io    kib=K    K KiB of lines through HYPERVISOR_console_io, in
 *                       writes of up to 16 KiB (each line also a dmesg line)
 *   mode=mmu   n=N      N failing mmu_updates (a machphys update of a frame
 *                       we do not own): one hypervisor log line each, today
 *   pause_ms=P          after the flood, sleep P ms (default 2000) so the
 *                       console's rate limit earns its budget back, then
 *                       print "conflood: done" and power off
 *
 * Every mode prints "conflood: start <mode>" first, through the ring.
 */
#include "app.h"

const char app_name[] = "conflood";

static char chunk[16384];

/* Fill chunk with whole lines "conflood <tag> <seq>........\n" (64 bytes each). */
static size_t fill_lines(const char *tag, unsigned long *seq)
{
    size_t off = 0;

    while (off + 64 <= sizeof(chunk)) {
        int n = snprintf(chunk + off, 64, "conflood %s %lu ", tag, (*seq)++);
        for (int i = n; i < 63; i++)
            chunk[off + i] = '.';
        chunk[off + 63] = '\n';
        off += 64;
    }
    return off;
}

int app_main(const char *cmdline)
{
    char mode[16] = "ring";
    unsigned long kib = cmdline_get_ulong(cmdline, "kib", 4096);
    unsigned long n = cmdline_get_ulong(cmdline, "n", 20000);
    unsigned long pause_ms = cmdline_get_ulong(cmdline, "pause_ms", 2000);
    unsigned long seq = 0, failed = 0;

    cmdline_get_str(cmdline, "mode", mode, sizeof(mode));
    printk("conflood: start %s\n", mode);

    if (!strcmp(mode, "ring")) {
        unsigned long left = kib << 10;
        while (left) {
            size_t len = fill_lines("ring", &seq);
            if (len > left)
                len = left;
            console_write(chunk, len);
            left -= len;
        }
        printk("\nconflood: wrote %lu KiB to the ring\n", kib);
    } else if (!strcmp(mode, "io")) {
        unsigned long left = kib << 10;
        while (left) {
            size_t len = fill_lines("io", &seq);
            if (len > left)
                len = left;
            HYPERVISOR_console_io(CONSOLEIO_write, len, chunk);
            left -= len;
        }
        printk("\nconflood: wrote %lu KiB through console_io\n", kib);
    } else if (!strcmp(mode, "mmu")) {
        for (unsigned long i = 0; i < n; i++) {
            /* machphys update of a frame far beyond our memory: EINVAL,
             * and a "mmu_update #0 failed" line in the hypervisor log */
            struct mmu_update req = {
                .ptr = ((0xFFFFFFFUL - i) << 12) | MMU_MACHPHYS_UPDATE,
                .val = i,
            };
            if (HYPERVISOR_mmu_update(&req, 1, NULL, DOMID_SELF) < 0)
                failed++;
        }
        printk("conflood: %lu of %lu mmu_updates failed\n", failed, n);
    } else {
        printk("conflood: unknown mode %s\n", mode);
    }

    msleep(pause_ms);
    printk("conflood: done\n");
    poweroff();
}
