/*
 * main.c - boot sequence and shutdown.
 *
 * Order matters:
 *   1. console_io line (needs nothing but the hypercall page)
 *   2. stack_switch, trap table      - so faults are reported from here on
 *   3. map shared_info, mask ports, register callbacks
 *   4. console ring                  - printk output goes there from now
 *   5. map all RAM + page allocator, threads, timer
 *   6. start the app thread, unmask events, become the idle thread
 */
#include "kernel.h"
#include "console.h"
#include "events.h"
#include "hypercall.h"
#include "mm.h"
#include "sched.h"
#include "traps.h"
#include "netfront.h"
#include "xenbus.h"
#include "xtime.h"
#include "gnttab.h"

static struct start_info start_info_copy;
struct start_info *start_info = &start_info_copy;
/* The builder's start_info page itself: the toolstack rewrites it on restore. */
static struct start_info *boot_start_info;
const char *kernel_cmdline = "";
unsigned long boot_initial_rsp;         /* written by head.S */
int shared_info_mapped;                 /* vcpu_info (cr2, time) is real */

extern char boot_stack_top[];
extern char hypervisor_callback[], failsafe_callback[];

void __noreturn start_kernel(struct start_info *si);
static void suspend_evtchn_init(void);

void map_shared_info(void)
{
    /* start_info->shared_info is a machine address: map it over our page. */
    long rc = HYPERVISOR_update_va_mapping((unsigned long)&shared_info_page,
                                           start_info->shared_info | _PAGE_PRESENT |
                                           _PAGE_RW | _PAGE_USER,
                                           UVMF_INVLPG);
    if (rc) {
        early_printk("pyxen-guest: mapping shared_info 0x%lx failed rc=%ld\n",
                     start_info->shared_info, rc);
        xen_shutdown(SHUTDOWN_crash);
    }
    shared_info_mapped = 1;
}

static void register_callbacks(void)
{
    struct callback_register event = {
        .type = CALLBACKTYPE_event,
        .flags = CALLBACKF_mask_events,
        .address = (unsigned long)hypervisor_callback,
    };
    struct callback_register failsafe = {
        .type = CALLBACKTYPE_failsafe,
        .flags = CALLBACKF_mask_events,
        .address = (unsigned long)failsafe_callback,
    };
    long rc;

    rc = HYPERVISOR_callback_op(CALLBACKOP_register, &event);
    if (rc)
        panic("callback_op(event) failed rc=%ld\n", rc);
    rc = HYPERVISOR_callback_op(CALLBACKOP_register, &failsafe);
    if (rc)
        early_printk("pyxen-guest: callback_op(failsafe) failed rc=%ld\n", rc);
}

void app_fail(const char *fmt, ...)
{
    char buf[256];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    printk("%s: FAIL %s\n", app_name, buf);
    xen_shutdown(SHUTDOWN_crash);
}

static void main_thread(void *arg)
{
    int rc;

    (void)arg;
    printk("pyxen-guest: starting app %s\n", app_name);
    rc = app_main(kernel_cmdline);
    /* Apps normally power off themselves; this is the fallback. */
    printk("pyxen-guest: app %s returned %d\n", app_name, rc);
    xen_shutdown(rc == 0 ? SHUTDOWN_poweroff : SHUTDOWN_crash);
}

void start_kernel(struct start_info *si)
{
    static const char hello[] = "pyxen-guest: booting\n";
    long ver;
    uint64_t wsec;
    uint32_t wnsec;

    /* Keep our own copy: the builder's page is ordinary memory to it. */
    memcpy(&start_info_copy, si, sizeof(start_info_copy));
    boot_start_info = si;
    start_info_copy.cmd_line[MAX_GUEST_CMDLINE - 1] = '\0';
    kernel_cmdline = (const char *)start_info_copy.cmd_line;

    console_io_write(hello, sizeof(hello) - 1);
    if (memcmp(si->magic, "xen-3.0-x86_64", 14) != 0)
        early_printk("pyxen-guest: warning: unexpected start_info magic '%.32s'\n",
                     si->magic);

    /* Tell the hypervisor our kernel stack (used on user->kernel switches). */
    HYPERVISOR_stack_switch(FLAT_KERNEL_SS, (unsigned long)boot_stack_top);
    trap_init();
    map_shared_info();
    events_init();
    register_callbacks();
    mm_early_init();
    console_init();

    ver = HYPERVISOR_xen_version(XENVER_version, NULL);
    printk("pyxen-guest: Xen %ld.%ld, app=%s\n", ver >> 16, ver & 0xffff, app_name);
    printk("pyxen-guest: start_info magic=%.32s nr_pages=%lu shared_info=0x%lx "
           "pt_base=0x%lx nr_pt_frames=%lu mfn_list=0x%lx flags=0x%x\n",
           si->magic, si->nr_pages, si->shared_info, si->pt_base,
           si->nr_pt_frames, si->mfn_list, si->flags);
    printk("pyxen-guest: console mfn=0x%lx evtchn=%u store mfn=0x%lx evtchn=%u\n",
           si->console.domU.mfn, si->console.domU.evtchn, si->store_mfn,
           si->store_evtchn);
    printk("pyxen-guest: m2p at %p (max mfn 0x%lx)\n", (void *)machine_to_phys, m2p_max_mfn);
    printk("pyxen-guest: cmdline \"%s\"\n", kernel_cmdline);

    mm_init(si);
    sched_init();
    time_init();

    wallclock(&wsec, &wnsec);
    printk("pyxen-guest: system time %lu ns, wallclock %lu.%09u\n",
           (unsigned long)monotonic_ns(), (unsigned long)wsec, wnsec);

    if (!create_thread("main", main_thread, NULL))
        panic("cannot create main thread\n");
    /* The xenbus thread (store probe, control/shutdown).  The grant table
     * is set up on first use (gnttab_ready()). */
    xenbus_init();
    suspend_evtchn_init();

    irq_enable();
    idle_loop();
}

void xen_shutdown(unsigned int reason)
{
    struct sched_shutdown op = { .reason = reason };
    long rc;

    /* Let the backend drain the ring first, or the last lines are lost. */
    console_flush(NSEC_PER_SEC);
    rc = HYPERVISOR_sched_op(SCHEDOP_shutdown, &op);

    /* Should be unreachable.  Park quietly: no ports, no timer. */
    early_printk("pyxen-guest: SCHEDOP_shutdown(%u) returned %ld\n", reason, rc);
    irq_disable();
    events_init();
    HYPERVISOR_set_timer_op(0);
    for (;;) {
        WRITE_ONCE(this_vcpu()->evtchn_upcall_pending, 0);
        HYPERVISOR_sched_op(SCHEDOP_block, NULL);
    }
}

void poweroff(void)
{
    xen_shutdown(SHUTDOWN_poweroff);
}

/*
 * Suspend and resume (control/shutdown = "suspend", xenbus.c), in the order
 * of Linux's xen_suspend/do_suspend and Mini-OS's kernel_suspend:
 *
 *   pre-suspend: events off; the console and xenstore frames in start_info
 *   become pfns (the toolstack turns them back into the new domain's
 *   frames); the grant table and shared_info are unmapped, because a saved
 *   page table may map only the domain's own RAM;
 *   SCHEDOP_shutdown(SHUTDOWN_suspend) with the start_info frame in rdx;
 *   post-suspend: it returned 1 (cancelled: a checkpoint, or the save
 *   failed) and everything is as it was: the frames go back, shared_info and
 *   the grant table are mapped again.  It returned 0: this is a restored
 *   domain, whose event channels are all closed and whose console and
 *   xenstore come with new channels in start_info: the timer VIRQ, the
 *   console and xenstore are bound again, the grant table set up again.
 */
static void unmap_shared_info(void)
{
    unsigned long va = (unsigned long)&shared_info_page;

    shared_info_mapped = 0;
    if (HYPERVISOR_update_va_mapping(va, (virt_to_mfn(&shared_info_page) << PAGE_SHIFT) |
                                     PTE_KERNEL_RW, UVMF_INVLPG))
        early_printk("pyxen-guest: unmapping shared_info failed\n");
}

int kernel_suspend(void)
{
    struct sched_shutdown op = { .reason = SHUTDOWN_suspend };
    struct start_info *si = boot_start_info;
    unsigned long si_mfn = virt_to_mfn(si);
    long rc;

    printk("pyxen-guest: suspending\n");
    console_flush(NSEC_PER_SEC);
    irq_disable();
    si->store_mfn = mfn_to_pfn(si->store_mfn);
    si->console.domU.mfn = mfn_to_pfn(si->console.domU.mfn);
    gnttab_suspend();
    unmap_shared_info();

    rc = _hypercall3(long, __HYPERVISOR_sched_op, SCHEDOP_shutdown, &op, si_mfn);

    if (rc) {                           /* cancelled: the same domain goes on */
        si->store_mfn = pfn_to_mfn(si->store_mfn);
        si->console.domU.mfn = pfn_to_mfn(si->console.domU.mfn);
    }
    start_info_copy.store_mfn = si->store_mfn;
    start_info_copy.store_evtchn = si->store_evtchn;
    start_info_copy.console.domU.mfn = si->console.domU.mfn;
    start_info_copy.console.domU.evtchn = si->console.domU.evtchn;
    start_info_copy.shared_info = si->shared_info;
    map_shared_info();
    if (!rc) {
        events_resume();                /* every channel is closed */
        time_resume();
        console_init();
    }
    gnttab_resume(!rc);
    irq_enable();
    if (!rc) {
        netfront_resume();              /* its thread reconnects as soon as xenbus can */
        xenbus_resume();
    }
    printk("pyxen-guest: %s (suspend returned %ld)\n", rc ? "suspend cancelled, running on"
           : "resumed in a restored domain", rc);
    return (int)rc;
}

/*
 * Xen's suspend event channel (docs/misc/xenstore-paths,
 * ~/device/suspend/event-channel): we allocate a port unbound for dom0 and
 * write its number there; a toolstack that finds it binds to it and asks
 * for the suspend by signalling it (libxl's domain_suspend_callback_common)
 * instead of writing control/shutdown = "suspend", which we keep serving
 * (xenbus.c).  That skips the store's watch event and our two round trips
 * to acknowledge it: the suspend is one event away.  The suspend itself
 * runs in its own thread, never in the event handler.  A restored domain's
 * channels are all closed and its store directory is fresh: the port is
 * allocated and advertised again, a little after the resume so that the
 * drivers' reconnect (the network's downtime) goes first.  The command
 * line flag "suspend-evtchn=0" leaves it out (the control/shutdown way
 * only, as Linux, which offers no such channel).
 */
static evtchn_port_t suspend_port;
static volatile int suspend_asked;
static struct waitq suspend_waiters = { .name = "suspend" };

static void suspend_event(evtchn_port_t port, struct pt_regs *regs, void *data)
{
    (void)port; (void)regs; (void)data;
    suspend_asked = 1;
    waitq_wake_all(&suspend_waiters);
}

static int suspend_was_asked(void *arg)
{
    (void)arg;
    return suspend_asked;
}

static void suspend_evtchn_advertise(void)
{
    int port, rc;

    suspend_port = 0;
    port = evtchn_alloc_unbound(0, suspend_event, NULL);
    if (port < 0) {
        printk("pyxen-guest: suspend event channel: alloc_unbound: %d\n", port);
        return;
    }
    rc = xenbus_printf(XBT_NIL, "device/suspend/event-channel", "%d", port);
    if (rc) {
        printk("pyxen-guest: suspend event channel: write: %s\n", xenbus_strerror(rc));
        close_evtchn((evtchn_port_t)port);
        return;
    }
    suspend_port = (evtchn_port_t)port;
    printk("pyxen-guest: suspend event channel %d\n", port);
}

static void suspend_thread(void *arg)
{
    (void)arg;
    if (!xenbus_available())
        return;
    suspend_evtchn_advertise();
    for (;;) {
        waitq_wait(&suspend_waiters, suspend_was_asked, NULL, 0);
        suspend_asked = 0;
        if (kernel_suspend() == 0) {    /* a restored domain: advertise anew */
            msleep(100);
            suspend_evtchn_advertise();
        }
    }
}

static void suspend_evtchn_init(void)
{
    if (!cmdline_get_ulong(kernel_cmdline, "suspend-evtchn", 1))
        return;
    if (!create_thread("suspend", suspend_thread, NULL))
        printk("pyxen-guest: no suspend thread: no suspend event channel\n");
}
