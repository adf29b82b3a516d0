/*
 * hctest: exercises the hypercalls a PV guest uses and checks each result
 * against Xen's documented behaviour (xen/include/public/).  Prints
 * "hctest: <name> OK" or "hctest: <name> FAIL <details>" per check, then
 * "hctest: done" and powers off.  tests/e2e/test_hypercalls.py holds the
 * list of names it expects.
 *
 * VCPUOP_register_vcpu_info runs last: it moves vCPU 0's vcpu_info out of
 * shared_info for good (the kernel follows it through vcpu_info_ptr).
 */
#include "app.h"
#include "gnttab.h"

const char app_name[] = "hctest";

/* ---- ABI bits xen_abi.h does not carry (values from the public headers) ---- */
#define __HYPERVISOR_update_descriptor 10
#define HC_UNKNOWN                     55   /* no such hypercall */

#define XENVER_capabilities         3
#define XENVER_platform_parameters  5
#define XENVER_get_features         6
#define XENVER_pagesize             7

#define XENFEAT_auto_translated_physmap   2
#define XENFEAT_supervisor_mode_kernel    3
#define XENFEAT_mmu_pt_update_preserve_ad 5

#define XENMEM_memory_map   9
#define E820_RAM            1

#define VCPUOP_is_up               3
#define VCPUOP_get_runstate_info   4
#define VCPUOP_register_vcpu_info 10
#define VCPU_SSHOTTMR_future       1
#define RUNSTATE_running           0

#define SCHEDOP_shutdown_code 5

#define EVTCHNSTAT_unbound 1
#define EVTCHNSTAT_virq    4
#define EVTCHNSTAT_ipi     5

#define SEGBASE_FS 0
#define SEGBASE_GS_KERNEL 2
#define SEGBASE_GS_USER_SEL 3

#define VMASST_TYPE_writable_pagetables  2
#define VMASST_TYPE_runstate_update_flag 5

#define XEN_EEXIST 17
#define XEN_ENODEV 19
#define XEN_ETIME  62

#define __HYPERVISOR_set_debugreg 8
#define __HYPERVISOR_get_debugreg 9
#define __HYPERVISOR_physdev_op  33
#define XENVER_commandline        9
#define XENVER_build_id          10
#define XENFEAT_writable_page_tables   0
#define XENFEAT_gnttab_map_avail_bits  7
#define XENFEAT_dom0                  11
#define VCPUOP_initialise              0
#define VCPUOP_up                      1
#define VCPUOP_register_runstate_memory_area 5
#define VCPUOP_register_vcpu_time_memory_area 13
#define RUNSTATE_blocked               2
#define XEN_RUNSTATE_UPDATE            (1ULL << 63)
#define VMASST_TYPE_architectural_iopl 4
#define VMASST_TYPE_m2p_strict        32
#define PHYSDEVOP_irq_status_query     5
#define PHYSDEVOP_set_iopl             6
#define PHYSDEVOP_map_pirq            13
#define XENMEM_increase_reservation    0
#define XENMEM_decrease_reservation    1
#define XENMEM_populate_physmap        6
#define XENMEM_maximum_gpfn           14
#define CALLBACKTYPE_syscall32         7
#define EVTCHNOP_status                5

struct hc_reservation {
    unsigned long *extent_start;
    unsigned long nr_extents;
    unsigned int extent_order, mem_flags;
    domid_t domid;
};
_Static_assert(sizeof(struct hc_reservation) == 32, "xen_memory_reservation");

struct hc_feature_info { uint32_t submap_idx, submap; };

struct hc_e820 { uint64_t addr, size; uint32_t type; } __attribute__((packed));
_Static_assert(sizeof(struct hc_e820) == 20, "e820entry");

struct hc_memory_map { unsigned int nr_entries; void *buffer; };
_Static_assert(sizeof(struct hc_memory_map) == 16, "xen_memory_map");

struct hc_runstate_info { int state; uint64_t state_entry_time; uint64_t time[4]; };
_Static_assert(sizeof(struct hc_runstate_info) == 48, "vcpu_runstate_info");

struct hc_singleshot { uint64_t timeout_abs_ns; uint32_t flags; };
_Static_assert(sizeof(struct hc_singleshot) == 16, "vcpu_set_singleshot_timer");

struct hc_register_vcpu_info { uint64_t mfn; uint32_t offset, rsvd; };
_Static_assert(sizeof(struct hc_register_vcpu_info) == 16, "vcpu_register_vcpu_info");

struct hc_evtchn_status {
    domid_t dom;
    evtchn_port_t port;
    uint32_t status, vcpu;
    union {
        struct { domid_t dom; } unbound;
        struct { domid_t dom; evtchn_port_t port; } interdomain;
        uint32_t pirq, virq;
    } u;
};
_Static_assert(sizeof(struct hc_evtchn_status) == 24, "evtchn_status");

struct hc_bind_ipi { uint32_t vcpu; evtchn_port_t port; };

/* ---- reporting ---- */
static unsigned int n_ok, n_fail;

static void __printf(3, 4) check(const char *name, int ok, const char *fmt, ...)
{
    char details[200];
    va_list ap;

    if (ok) {
        n_ok++;
        printk("hctest: %s OK\n", name);
        return;
    }
    n_fail++;
    va_start(ap, fmt);
    vsnprintf(details, sizeof(details), fmt, ap);
    va_end(ap);
    printk("hctest: %s FAIL %s\n", name, details);
}

static inline long hc_vcpu_op(int cmd, unsigned int vcpu, void *arg)
{
    return HYPERVISOR_vcpu_op(cmd, vcpu, arg);
}

static long evtchn_op(int cmd, void *arg)
{
    return HYPERVISOR_event_channel_op(cmd, arg);
}

static long evtchn_status(evtchn_port_t port, struct hc_evtchn_status *st)
{
    memset(st, 0, sizeof(*st));
    st->dom = DOMID_SELF;
    st->port = port;
    return evtchn_op(EVTCHNOP_status, st);
}

static long evtchn_close(evtchn_port_t port)
{
    struct evtchn_close op = { .port = port };
    return evtchn_op(EVTCHNOP_close, &op);
}

static long evtchn_send(evtchn_port_t port)
{
    struct evtchn_send op = { .port = port };
    return evtchn_op(EVTCHNOP_send, &op);
}

static int port_bit(const volatile unsigned long *bitmap, evtchn_port_t port)
{
    return (bitmap[port / 64] >> (port % 64)) & 1;
}

static void spin_ms(uint64_t ms)
{
    uint64_t end = monotonic_ns() + ms * NSEC_PER_MSEC;
    while (monotonic_ns() < end)
        cpu_relax();
}

/* ---- event counters ---- */
static volatile unsigned long timer_hits;
static evtchn_port_t timer_port;

static void timer_count_handler(evtchn_port_t port, struct pt_regs *regs, void *data)
{
    (void)port; (void)regs; (void)data;
    timer_hits++;
    sched_timer_event();        /* what the kernel's own VIRQ_TIMER handler does */
}

static void count_handler(evtchn_port_t port, struct pt_regs *regs, void *data)
{
    (void)port; (void)regs;
    (*(volatile unsigned long *)data)++;
}

/* ---- probes: one instruction that may fault, and where to resume ---- */
extern char hc_probe_write_insn[], hc_probe_write_recover[];
int hc_probe_write(volatile uint64_t *addr, uint64_t val);   /* 0 ok, 1 faulted */
asm(".pushsection .text\n"
    ".globl hc_probe_write\n"
    ".type hc_probe_write, @function\n"
    "hc_probe_write:\n"
    ".globl hc_probe_write_insn\n"
    "hc_probe_write_insn:\n"
    "    movq %rsi, (%rdi)\n"
    "    xorl %eax, %eax\n"
    "    ret\n"
    ".globl hc_probe_write_recover\n"
    "hc_probe_write_recover:\n"
    "    movl $1, %eax\n"
    "    ret\n"
    ".size hc_probe_write, . - hc_probe_write\n"
    ".popsection\n");

static int probe_fixup(struct pt_regs *regs, unsigned long cr2)
{
    (void)cr2;
    if (regs->rip != (unsigned long)hc_probe_write_insn)
        return 0;
    regs->rip = (unsigned long)hc_probe_write_recover;
    return 1;
}

/*
 * Our own #NM (vector 7) entry.  Frame from the hypervisor: RCX, R11, RIP,
 * CS, RFLAGS, RSP, SS.  Save the caller-saved registers, call hc_nm(),
 * restore, and leave through the iret hypercall like entry.S does.
 */
extern char hc_nm_entry[];
void hc_nm(void);
asm(".pushsection .text\n"
    ".globl hc_nm_entry\n"
    ".type hc_nm_entry, @function\n"
    "hc_nm_entry:\n"
    "    popq %rcx\n"
    "    popq %r11\n"
    "    pushq %rax\n"
    "    pushq %rcx\n"
    "    pushq %rdx\n"
    "    pushq %rsi\n"
    "    pushq %rdi\n"
    "    pushq %r8\n"
    "    pushq %r9\n"
    "    pushq %r10\n"
    "    pushq %r11\n"
    "    pushq %rbx\n"
    "    movq %rsp, %rbx\n"
    "    andq $-16, %rsp\n"
    "    cld\n"
    "    call hc_nm\n"
    "    movq %rbx, %rsp\n"
    "    popq %rbx\n"
    "    popq %r11\n"
    "    popq %r10\n"
    "    popq %r9\n"
    "    popq %r8\n"
    "    popq %rdi\n"
    "    popq %rsi\n"
    "    popq %rdx\n"
    "    popq %rcx\n"
    "    popq %rax\n"
    "    pushq $0\n"
    "    jmp hypercall_page + 23 * 32\n"
    ".size hc_nm_entry, . - hc_nm_entry\n"
    ".popsection\n");

static volatile unsigned long nm_hits;
static volatile long nm_clts_rc = -1;

void hc_nm(void)
{
    nm_hits++;
    nm_clts_rc = HYPERVISOR_fpu_taskswitch(0);
}

/* ======================================================================= */

static long xen_version_rc;

static void test_xen_version(void)
{
    char extra[16], caps[1024];
    struct hc_feature_info fi = { 0, 0 };
    unsigned long virt_start = 0;
    long rc;

    rc = HYPERVISOR_xen_version(XENVER_version, NULL);
    xen_version_rc = rc;
    check("xen_version.version", rc > 0 && (rc >> 16) >= 3, "rc=0x%lx", rc);

    memset(extra, 0x7f, sizeof(extra));
    rc = HYPERVISOR_xen_version(XENVER_extraversion, extra);
    check("xen_version.extraversion", rc == 0 && strnlen(extra, sizeof(extra)) < sizeof(extra),
          "rc=%ld", rc);

    memset(caps, 0, sizeof(caps));
    rc = HYPERVISOR_xen_version(XENVER_capabilities, caps);
    caps[sizeof(caps) - 1] = '\0';
    check("xen_version.capabilities", rc == 0 && strncmp(caps, "xen-3.0-x86_64", 14) == 0,
          "rc=%ld caps='%.40s'", rc, caps);

    rc = HYPERVISOR_xen_version(XENVER_get_features, &fi);
    check("xen_version.get_features",
          rc == 0 && (fi.submap >> XENFEAT_mmu_pt_update_preserve_ad & 1) &&
          (fi.submap >> XENFEAT_gnttab_map_avail_bits & 1) &&
          !(fi.submap >> XENFEAT_writable_page_tables & 1) &&
          !(fi.submap >> XENFEAT_auto_translated_physmap & 1) &&
          !(fi.submap >> XENFEAT_supervisor_mode_kernel & 1) &&
          !(fi.submap >> XENFEAT_dom0 & 1),
          "rc=%ld submap=0x%x", rc, fi.submap);
    fi.submap_idx = 1;
    fi.submap = 0xdead;
    rc = HYPERVISOR_xen_version(XENVER_get_features, &fi);
    check("xen_version.get_features_submap1", rc == 0 && fi.submap == 0,
          "rc=%ld submap=0x%x", rc, fi.submap);

    rc = HYPERVISOR_xen_version(XENVER_platform_parameters, &virt_start);
    check("xen_version.platform_parameters", rc == 0 && virt_start == 0xffff800000000000UL,
          "rc=%ld virt_start=0x%lx", rc, virt_start);

    rc = HYPERVISOR_xen_version(XENVER_pagesize, NULL);
    check("xen_version.pagesize", rc == 4096, "rc=%ld", rc);

    /* XSM's default policy: an unprivileged domain reads "<denied>" */
    memset(caps, 0x7f, sizeof(caps));
    rc = HYPERVISOR_xen_version(XENVER_commandline, caps);
    check("xen_version.commandline_denied", rc == 0 && strcmp(caps, "<denied>") == 0,
          "rc=%ld cmdline='%.20s'", rc, caps);
    rc = HYPERVISOR_xen_version(XENVER_build_id, caps);
    check("xen_version.build_id_eperm", rc == -XEN_EPERM, "rc=%ld", rc);
}

static void test_multicall(void)
{
    struct multicall_entry mc[3];
    long rc;

    memset(mc, 0, sizeof(mc));
    mc[0].op = __HYPERVISOR_xen_version;
    mc[0].args[0] = XENVER_version;
    mc[1].op = __HYPERVISOR_xen_version;
    mc[1].args[0] = XENVER_pagesize;
    mc[2].op = HC_UNKNOWN;
    for (int i = 0; i < 3; i++)
        mc[i].result = 0xdeadbeefUL;
    rc = HYPERVISOR_multicall(mc, 3);
    check("multicall", rc == 0 && (long)mc[0].result == xen_version_rc &&
          mc[1].result == 4096 && (long)mc[2].result == -XEN_ENOSYS,
          "rc=%ld results=%ld,%ld,%ld", rc, (long)mc[0].result, (long)mc[1].result,
          (long)mc[2].result);
}

static void test_memory_op(void)
{
    domid_t self = DOMID_SELF;
    struct hc_e820 map[4];
    struct hc_memory_map mm = { .nr_entries = 4, .buffer = map };
    struct xen_machphys_mapping mp;
    unsigned long max_mfn = 0, bad = 0;
    long rc;

    rc = HYPERVISOR_memory_op(XENMEM_current_reservation, &self);
    check("memory_op.current_reservation", rc == (long)start_info->nr_pages,
          "rc=%ld nr_pages=%lu", rc, start_info->nr_pages);

    rc = HYPERVISOR_memory_op(XENMEM_maximum_reservation, &self);
    check("memory_op.maximum_reservation", rc >= (long)start_info->nr_pages,
          "rc=%ld nr_pages=%lu", rc, start_info->nr_pages);

    memset(map, 0xff, sizeof(map));
    rc = HYPERVISOR_memory_op(XENMEM_memory_map, &mm);
    check("memory_op.memory_map",
          rc == 0 && mm.nr_entries == 1 && map[0].addr == 0 &&
          map[0].size == start_info->nr_pages * PAGE_SIZE && map[0].type == E820_RAM,
          "rc=%ld nr=%u addr=0x%lx size=0x%lx type=%u", rc, mm.nr_entries,
          (unsigned long)map[0].addr, (unsigned long)map[0].size, map[0].type);

    memset(&mp, 0, sizeof(mp));
    rc = HYPERVISOR_memory_op(XENMEM_machphys_mapping, &mp);
    for (unsigned long pfn = 0; pfn < start_info->nr_pages; pfn++) {
        unsigned long mfn = pfn_to_mfn(pfn);
        if (mfn > max_mfn)
            max_mfn = mfn;
    }
    if (rc == 0 && mp.v_start < mp.v_end && max_mfn <= mp.max_mfn &&
        (mp.max_mfn + 1) * sizeof(unsigned long) <= mp.v_end - mp.v_start) {
        const unsigned long *m2p = (const unsigned long *)mp.v_start;
        for (unsigned long pfn = 0; pfn < start_info->nr_pages; pfn += 97)
            if (m2p[pfn_to_mfn(pfn)] != pfn)
                bad++;
    }
    check("memory_op.machphys_mapping",
          rc == 0 && mp.v_start < mp.v_end && max_mfn <= mp.max_mfn && !bad &&
          (mp.v_start >> 47) == 0x1ffff,
          "rc=%ld v_start=0x%lx v_end=0x%lx max_mfn=0x%lx (ours up to 0x%lx) bad=%lu",
          rc, mp.v_start, mp.v_end, mp.max_mfn, max_mfn, bad);
}

static evtchn_port_t find_timer_port(void)
{
    struct hc_evtchn_status st;

    for (evtchn_port_t p = 1; p < 64; p++)
        if (evtchn_status(p, &st) == 0 && st.status == EVTCHNSTAT_virq && st.u.virq == VIRQ_TIMER)
            return p;
    return 0;
}

static void test_vcpu_op(void)
{
    struct hc_runstate_info rs;
    struct vcpu_set_periodic_timer per = { .period_ns = 10 * NSEC_PER_MSEC };
    struct hc_singleshot ss;
    unsigned long h0, n, h1;
    uint64_t t0, t_fire;
    long rc;

    rc = hc_vcpu_op(VCPUOP_is_up, 0, NULL);
    check("vcpu_op.is_up0", rc == 1, "rc=%ld", rc);
    rc = hc_vcpu_op(VCPUOP_is_up, 5, NULL);
    check("vcpu_op.is_up5_enoent", rc == -XEN_ENOENT, "rc=%ld", rc);

    memset(&rs, 0xff, sizeof(rs));
    rc = hc_vcpu_op(VCPUOP_get_runstate_info, 0, &rs);
    check("vcpu_op.get_runstate_info",
          rc == 0 && rs.state == RUNSTATE_running && rs.time[RUNSTATE_running] > 0 &&
          rs.state_entry_time <= monotonic_ns(),
          "rc=%ld state=%d entry=%lu running=%lu", rc, rs.state,
          (unsigned long)rs.state_entry_time, (unsigned long)rs.time[0]);

    /* Count VIRQ_TIMER events: take over the kernel's timer port handler. */
    timer_port = find_timer_port();
    check("event_channel_op.status_virq", timer_port != 0, "no port reports VIRQ_TIMER");
    if (!timer_port)
        return;
    bind_evtchn(timer_port, timer_count_handler, NULL);

    h0 = timer_hits;
    t0 = monotonic_ns();
    rc = hc_vcpu_op(VCPUOP_set_periodic_timer, 0, &per);
    msleep(100);
    n = timer_hits - h0;
    t_fire = (monotonic_ns() - t0) / (10 * NSEC_PER_MSEC); /* periods elapsed */
    /* ~10 periodic ticks; msleep's own one-shot may add one.  Xen does not
     * catch up missed ticks (vcpu_periodic_timer_work: the next one is
     * now + period), so a host that stalls the vCPU (a loaded machine) sees
     * fewer: at least 3 prove the timer is periodic, and never more than one
     * per period elapsed plus msleep's. */
    check("vcpu_op.set_periodic_timer", rc == 0 && n >= 3 && n <= t_fire + 2,
          "rc=%ld events=%lu in %lu periods", rc, n, (unsigned long)t_fire);

    rc = hc_vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL);
    msleep(5);
    h1 = timer_hits;
    msleep(60);
    n = timer_hits - h1;
    check("vcpu_op.stop_periodic_timer", rc == 0 && n <= 2,
          "rc=%ld events in 60 ms after stop=%lu", rc, n);

    ss.timeout_abs_ns = monotonic_ns() - NSEC_PER_MSEC;
    ss.flags = VCPU_SSHOTTMR_future;
    rc = hc_vcpu_op(VCPUOP_set_singleshot_timer, 0, &ss);
    check("vcpu_op.singleshot_past_etime", rc == -XEN_ETIME, "rc=%ld", rc);

    /* A one-shot 20 ms ahead fires once (we spin, so nothing re-arms it). */
    h0 = timer_hits;
    t0 = monotonic_ns();
    ss.timeout_abs_ns = t0 + 20 * NSEC_PER_MSEC;
    ss.flags = VCPU_SSHOTTMR_future;
    rc = hc_vcpu_op(VCPUOP_set_singleshot_timer, 0, &ss);
    t_fire = 0;
    while (monotonic_ns() < t0 + 300 * NSEC_PER_MSEC) {
        if (timer_hits != h0) {
            t_fire = monotonic_ns();
            break;
        }
        cpu_relax();
    }
    check("vcpu_op.set_singleshot_timer",
          rc == 0 && t_fire && t_fire >= ss.timeout_abs_ns - 500 * NSEC_PER_USEC &&
          t_fire - t0 < 200 * NSEC_PER_MSEC,
          "rc=%ld fired after %lu us", rc, t_fire ? (unsigned long)(t_fire - t0) / 1000 : 0UL);

    h0 = timer_hits;
    ss.timeout_abs_ns = monotonic_ns() + 20 * NSEC_PER_MSEC;
    ss.flags = 0;
    rc = hc_vcpu_op(VCPUOP_set_singleshot_timer, 0, &ss);
    long rc2 = hc_vcpu_op(VCPUOP_stop_singleshot_timer, 0, NULL);
    spin_ms(60);
    check("vcpu_op.stop_singleshot_timer", rc == 0 && rc2 == 0 && timer_hits == h0,
          "rc=%ld/%ld events=%lu", rc, rc2, timer_hits - h0);
}

static void test_sched_op(void)
{
    struct evtchn_alloc_unbound au = { .dom = DOMID_SELF, .remote_dom = 0 };
    struct hc_bind_ipi ipi = { .vcpu = 0 };
    struct sched_poll poll;
    struct sched_shutdown sd = { .reason = SHUTDOWN_poweroff };
    evtchn_port_t port;
    unsigned long flags;
    uint64_t t0, t1;
    long rc;

    rc = HYPERVISOR_sched_op(SCHEDOP_yield, NULL);
    check("sched_op.yield", rc == 0, "rc=%ld", rc);

    rc = evtchn_op(EVTCHNOP_alloc_unbound, &au);
    if (rc == 0) {
        port = au.port;
        flags = irq_save();
        poll.ports = &port;
        poll.nr_ports = 1;
        t0 = monotonic_ns();
        poll.timeout = t0 + 50 * NSEC_PER_MSEC;
        rc = HYPERVISOR_sched_op(SCHEDOP_poll, &poll);
        t1 = monotonic_ns();
        irq_restore(flags);
        check("sched_op.poll_timeout",
              rc == 0 && t1 - t0 >= 49 * NSEC_PER_MSEC && t1 - t0 < 500 * NSEC_PER_MSEC,
              "rc=%ld returned after %lu us", rc, (unsigned long)(t1 - t0) / 1000);
        evtchn_close(port);
    } else {
        check("sched_op.poll_timeout", 0, "alloc_unbound rc=%ld", rc);
    }

    /* A port that is already pending: poll returns at once. */
    rc = evtchn_op(EVTCHNOP_bind_ipi, &ipi);     /* new ports stay masked */
    if (rc == 0) {
        port = ipi.port;
        evtchn_send(port);
        flags = irq_save();
        poll.ports = &port;
        poll.nr_ports = 1;
        t0 = monotonic_ns();
        poll.timeout = t0 + NSEC_PER_SEC;
        rc = HYPERVISOR_sched_op(SCHEDOP_poll, &poll);
        t1 = monotonic_ns();
        irq_restore(flags);
        check("sched_op.poll_pending", rc == 0 && t1 - t0 < 100 * NSEC_PER_MSEC,
              "rc=%ld returned after %lu us", rc, (unsigned long)(t1 - t0) / 1000);
        clear_evtchn(port);
        evtchn_close(port);
    } else {
        check("sched_op.poll_pending", 0, "bind_ipi rc=%ld", rc);
    }

    rc = HYPERVISOR_sched_op(SCHEDOP_shutdown_code, &sd);
    check("sched_op.shutdown_code", rc == 0, "rc=%ld", rc);
}

static void test_event_channels(void)
{
    struct evtchn_alloc_unbound au = { .dom = DOMID_SELF, .remote_dom = 0 };
    struct evtchn_bind_virq bv = { .virq = VIRQ_DEBUG, .vcpu = 0 };
    struct hc_bind_ipi ipi = { .vcpu = 0 };
    struct evtchn_unmask um;
    struct hc_evtchn_status st;
    static volatile unsigned long hits;
    struct shared_info *s = HYPERVISOR_shared_info;
    evtchn_port_t port;
    unsigned long before;
    long rc, rc2;

    rc = evtchn_op(EVTCHNOP_alloc_unbound, &au);
    check("event_channel_op.alloc_unbound", rc == 0 && au.port > 0, "rc=%ld port=%u", rc, au.port);
    if (rc == 0) {
        rc = evtchn_status(au.port, &st);
        check("event_channel_op.status_unbound",
              rc == 0 && st.status == EVTCHNSTAT_unbound && st.u.unbound.dom == 0 && st.vcpu == 0,
              "rc=%ld status=%u vcpu=%u dom=%u", rc, st.status, st.vcpu, st.u.unbound.dom);
        evtchn_close(au.port);
    }

    rc = evtchn_op(EVTCHNOP_bind_virq, &bv);
    port = bv.port;
    rc2 = evtchn_op(EVTCHNOP_bind_virq, &bv);
    check("event_channel_op.bind_virq_twice_eexist", rc == 0 && port > 0 && rc2 == -XEN_EEXIST,
          "first rc=%ld port=%u, second rc=%ld", rc, port, rc2);
    if (rc == 0)
        evtchn_close(port);

    /* An IPI to ourselves runs the handler on the way out of the hypercall. */
    rc = evtchn_op(EVTCHNOP_bind_ipi, &ipi);
    port = ipi.port;
    if (rc == 0) {
        rc = evtchn_status(port, &st);
        check("event_channel_op.status_ipi", rc == 0 && st.status == EVTCHNSTAT_ipi && st.vcpu == 0,
              "rc=%ld status=%u vcpu=%u", rc, st.status, st.vcpu);
        hits = 0;
        bind_evtchn(port, count_handler, (void *)&hits);
        rc = evtchn_send(port);
        check("event_channel_op.bind_ipi_send", rc == 0 && hits == 1,
              "send rc=%ld handler ran %lu times", rc, hits);

        mask_evtchn(port);
        rc = evtchn_close(port);
        rc2 = evtchn_send(port);
        check("event_channel_op.close_then_send_einval", rc == 0 && rc2 == -XEN_EINVAL,
              "close rc=%ld send rc=%ld", rc, rc2);
        unbind_evtchn(port);    /* drops our handler; its close fails harmlessly */
    } else {
        check("event_channel_op.bind_ipi_send", 0, "bind_ipi rc=%ld", rc);
    }

    /* A masked port that becomes pending raises no upcall; EVTCHNOP_unmask
     * (with the mask bit still set, as Xen's evtchn_2l_unmask requires)
     * clears the mask and delivers it. */
    ipi.vcpu = 0;
    rc = evtchn_op(EVTCHNOP_bind_ipi, &ipi);
    port = ipi.port;
    if (rc == 0) {
        hits = 0;
        bind_evtchn(port, count_handler, (void *)&hits);
        mask_evtchn(port);
        rc = evtchn_send(port);
        before = hits;
        int pending = port_bit(s->evtchn_pending, port);
        um.port = port;
        rc2 = evtchn_op(EVTCHNOP_unmask, &um);
        check("event_channel_op.unmask_redelivers",
              rc == 0 && before == 0 && pending && rc2 == 0 && hits == 1 &&
              !port_bit(s->evtchn_mask, port),
              "send rc=%ld hits while masked=%lu pending=%d unmask rc=%ld hits=%lu masked=%d",
              rc, before, pending, rc2, hits, port_bit(s->evtchn_mask, port));
        unbind_evtchn(port);
    } else {
        check("event_channel_op.unmask_redelivers", 0, "bind_ipi rc=%ld", rc);
    }
}

static void test_set_segment_base(void)
{
    static volatile uint64_t fs_var = 0x1122334455667788ULL;
    uint64_t v = 0;
    long rc;

    rc = HYPERVISOR_set_segment_base(SEGBASE_FS, (unsigned long)&fs_var);
    if (rc == 0)
        asm volatile("movq %%fs:0, %0" : "=r"(v) :: "memory");
    HYPERVISOR_set_segment_base(SEGBASE_FS, 0);
    check("set_segment_base.fs", rc == 0 && v == fs_var, "rc=%ld read=0x%lx", rc, (unsigned long)v);

    /* GS_USER_SEL loads the *user* %gs: the kernel's GS base stays */
    long rc2 = -1, rc3 = -1;
    v = 0;
    rc = HYPERVISOR_set_segment_base(SEGBASE_GS_KERNEL, (unsigned long)&fs_var);
    if (rc == 0) {
        rc2 = HYPERVISOR_set_segment_base(SEGBASE_GS_USER_SEL, 0);
        rc3 = HYPERVISOR_set_segment_base(SEGBASE_GS_USER_SEL, 0xe02b);
        asm volatile("movq %%gs:0, %0" : "=r"(v) :: "memory");
    }
    HYPERVISOR_set_segment_base(SEGBASE_GS_KERNEL, 0);
    check("set_segment_base.gs_user_sel", rc == 0 && rc2 == 0 && rc3 == 0 && v == fs_var,
          "rc=%ld,%ld,%ld kernel gs:0 read=0x%lx", rc, rc2, rc3, (unsigned long)v);
}

extern char trap_device_not_available[];

static long set_trap7(void *handler)
{
    struct trap_info t[2];

    memset(t, 0, sizeof(t));
    t[0].vector = 7;
    t[0].flags = TI_MASK_EVENTS;
    t[0].cs = FLAT_KERNEL_CS;
    t[0].address = (unsigned long)handler;
    return HYPERVISOR_set_trap_table(t);
}

/*
 * #NM needs the CPU to honour the CR0.TS the hypervisor sets.  (On PVM
 * hosts guest CPL3 code runs natively and the FPU is not trapped: the
 * hypercalls succeed but no #NM arrives - see the test's xfail.)
 */
static void test_fpu_taskswitch(void)
{
    long rc, rc2;
    unsigned long h;

    rc = HYPERVISOR_fpu_taskswitch(1);
    rc2 = HYPERVISOR_fpu_taskswitch(0);
    check("fpu_taskswitch", rc == 0 && rc2 == 0, "set rc=%ld clear rc=%ld", rc, rc2);

    rc = set_trap7(hc_nm_entry);
    if (rc) {
        check("fpu_taskswitch.nm_x87", 0, "set_trap_table rc=%ld", rc);
        return;
    }
    nm_hits = 0;
    nm_clts_rc = -1;
    rc = HYPERVISOR_fpu_taskswitch(1);
    asm volatile("fnop" ::: "memory");
    check("fpu_taskswitch.nm_x87", rc == 0 && nm_hits == 1 && nm_clts_rc == 0,
          "rc=%ld #NM count=%lu handler's fpu_taskswitch(0) rc=%ld", rc, nm_hits, nm_clts_rc);
    if (nm_hits == 0)
        HYPERVISOR_fpu_taskswitch(0);

    h = nm_hits;
    nm_clts_rc = -1;
    rc = HYPERVISOR_fpu_taskswitch(1);
    {
        /* An SSE instruction that touches no xmm register (make check
         * rejects %xmm in guest images). */
        uint32_t mxcsr;
        asm volatile("stmxcsr %0" : "=m"(mxcsr) :: "memory");
    }
    check("fpu_taskswitch.nm_sse", rc == 0 && nm_hits == h + 1 && nm_clts_rc == 0,
          "rc=%ld #NM count=%lu", rc, nm_hits - h);
    if (nm_hits == h)
        HYPERVISOR_fpu_taskswitch(0);

    h = nm_hits;
    rc = HYPERVISOR_fpu_taskswitch(1);
    rc2 = HYPERVISOR_fpu_taskswitch(0);
    asm volatile("fnop" ::: "memory");
    check("fpu_taskswitch.clear", rc == 0 && rc2 == 0 && nm_hits == h,
          "rc=%ld/%ld #NM count=%lu", rc, rc2, nm_hits - h);

    set_trap7(trap_device_not_available);
}

static inline void load_es(uint16_t sel)
{
    asm volatile("movw %0, %%es" :: "r"(sel) : "memory");
}

static inline uint16_t read_es(void)
{
    uint16_t sel;
    asm volatile("movw %%es, %0" : "=r"(sel));
    return sel;
}

/* LSL: the limit of a descriptor we may see, or 0 if the CPU refuses. */
static inline uint32_t seg_limit(uint32_t sel)
{
    uint32_t lim = 0;
    uint8_t ok;
    asm volatile("lsl %2, %0; setz %1" : "+r"(lim), "=q"(ok) : "r"(sel) : "cc");
    return ok ? lim : 0;
}

static inline long hc_set_gdt(unsigned long *frames, unsigned int entries)
{
    return _hypercall2(long, __HYPERVISOR_set_gdt, frames, entries);
}

static inline long hc_update_descriptor(uint64_t maddr, uint64_t desc)
{
    return _hypercall2(long, __HYPERVISOR_update_descriptor, maddr, desc);
}

#define DESC_FLAT_DATA_DPL3  0x00CFF3000000FFFFULL   /* base 0, 4 GiB, RW, accessed */
#define DESC_SMALL_DATA_DPL3 0x0040F30000000FFFULL   /* base 0, limit 0xfff bytes */

#define DESC_TSS_AVAIL       0x00008B0000000067ULL   /* a system descriptor */

/*
 * Loading a selector needs the CPU to use the GDT the hypervisor built.
 * (On PVM hosts guest CPL3 runs with the host's own GDT - %cs reads 0x33,
 * not 0xe033 - so those two checks are expected to fail there.)
 */
static void test_gdt(void)
{
    volatile uint64_t *gdt = alloc_page();
    unsigned long mfn, va = (unsigned long)gdt;
    uint64_t ro = 0, rw = 0;
    uint16_t sel;
    uint32_t lim;
    long rc, urc;

    if (!gdt) {
        check("set_gdt", 0, "no memory");
        return;
    }
    mfn = virt_to_mfn((void *)gdt);
    ro = (mfn << PAGE_SHIFT) | PTE_KERNEL_RO;
    rw = (mfn << PAGE_SHIFT) | PTE_KERNEL_RW;

    /* System descriptors are refused (Xen's check_descriptor). */
    memset((void *)gdt, 0, PAGE_SIZE);
    gdt[1] = DESC_TSS_AVAIL;
    rc = HYPERVISOR_update_va_mapping(va, ro, UVMF_INVLPG);
    urc = rc == 0 ? hc_set_gdt(&mfn, 2) : 0;
    if (urc == 0 && rc == 0)
        hc_set_gdt(&mfn, 0);
    check("set_gdt.rejects_system_descriptor", rc == 0 && urc == -XEN_EINVAL,
          "ro remap rc=%ld set_gdt rc=%ld", rc, urc);
    rc = HYPERVISOR_update_va_mapping(va, rw, UVMF_INVLPG);
    if (rc) {
        check("set_gdt", 0, "cannot map the frame writable again: rc=%ld", rc);
        return;
    }

    memset((void *)gdt, 0, PAGE_SIZE);
    gdt[1] = DESC_FLAT_DATA_DPL3;
    /* A descriptor page must have no writable mapping (Xen's PGT_seg_desc_page). */
    rc = HYPERVISOR_update_va_mapping(va, ro, UVMF_INVLPG);
    urc = rc == 0 ? hc_set_gdt(&mfn, 3) : 0;
    check("set_gdt", rc == 0 && urc == 0, "ro remap rc=%ld set_gdt rc=%ld", rc, urc);
    if (rc || urc) {
        check("set_gdt.load_selector", 0, "set_gdt failed");
        check("update_descriptor", 0, "set_gdt failed");
        check("update_descriptor.load_selector", 0, "set_gdt failed");
        goto out;
    }
    load_es(1 << 3 | 3);
    sel = read_es();
    lim = seg_limit(1 << 3 | 3);
    load_es(0);
    check("set_gdt.load_selector", sel == (1 << 3 | 3) && lim == 0xffffffffU,
          "es=0x%x limit=0x%x", sel, lim);

    urc = hc_update_descriptor(((uint64_t)mfn << PAGE_SHIFT) + 2 * 8, DESC_SMALL_DATA_DPL3);
    check("update_descriptor", urc == 0 && gdt[2] == DESC_SMALL_DATA_DPL3,
          "rc=%ld desc=0x%lx", urc, (unsigned long)gdt[2]);
    load_es(2 << 3 | 3);
    sel = read_es();
    lim = seg_limit(2 << 3 | 3);
    load_es(0);
    check("update_descriptor.load_selector", sel == (2 << 3 | 3) && lim == 0xfff,
          "es=0x%x limit=0x%x", sel, lim);

    /* Writable mappings of an in-use descriptor page are refused. */
    urc = HYPERVISOR_update_va_mapping(va, rw, UVMF_INVLPG);
    check("set_gdt.frame_not_writable", urc < 0, "writable remap rc=%ld", urc);
    if (urc == 0)
        HYPERVISOR_update_va_mapping(va, ro, UVMF_INVLPG);

    hc_set_gdt(&mfn, 0);        /* back to no guest GDT */
out:
    rc = HYPERVISOR_update_va_mapping(va, rw, UVMF_INVLPG);
    if (rc == 0)
        free_pages((void *)gdt, 1);
}

static void test_update_va_mapping(void)
{
    volatile uint64_t *p = alloc_page();
    unsigned long mfn, va = (unsigned long)p;
    const uint64_t magic = 0x0123456789abcdefULL;
    int faulted = -1, faulted2 = -1;
    uint64_t seen = 0;
    long rc, rc2 = -1;

    if (!p) {
        check("update_va_mapping.uvmf_all", 0, "no memory");
        return;
    }
    mfn = virt_to_mfn((void *)p);
    p[0] = magic;
    rc = HYPERVISOR_update_va_mapping(va, (mfn << PAGE_SHIFT) | PTE_KERNEL_RO,
                                      UVMF_INVLPG | UVMF_ALL);
    if (rc == 0) {
        seen = p[0];
        set_pf_fixup(probe_fixup);
        faulted = hc_probe_write(p, 1);
        rc2 = HYPERVISOR_update_va_mapping(va, (mfn << PAGE_SHIFT) | PTE_KERNEL_RW,
                                           UVMF_TLB_FLUSH | UVMF_ALL);
        if (rc2 == 0)
            faulted2 = hc_probe_write(p, 2);
        set_pf_fixup(NULL);
    }
    check("update_va_mapping.uvmf_all",
          rc == 0 && seen == magic && faulted == 1 && rc2 == 0 && faulted2 == 0 && p[0] == 2,
          "ro rc=%ld read ok=%d write faulted=%d rw rc=%ld write faulted=%d", rc,
          seen == magic, faulted, rc2, faulted2);
    if (rc2 == 0 || rc != 0)
        free_pages((void *)p, 1);
}

static long mmuext1(unsigned int cmd, unsigned long arg1)
{
    struct mmuext_op op;

    memset(&op, 0, sizeof(op));
    op.cmd = cmd;
    op.arg1.mfn = arg1;
    return HYPERVISOR_mmuext_op(&op, 1, NULL, DOMID_SELF);
}

static void test_mmuext(void)
{
    uint64_t *l1 = alloc_page();
    uint64_t *data = alloc_page();
    unsigned long l1_mfn, data_mfn, l1_va = (unsigned long)l1;
    struct mmu_update req;
    long rc, rc_rw, rc_ro, rc_pin, rc_upd, rc_unpin, rc_back;
    uint64_t e1 = 0;

    if (!l1 || !data) {
        check("mmuext_op.pin_l1", 0, "no memory");
        return;
    }
    l1_mfn = virt_to_mfn(l1);
    data_mfn = virt_to_mfn(data);
    memset(l1, 0, PAGE_SIZE);
    l1[0] = (data_mfn << PAGE_SHIFT) | PTE_KERNEL_RO;
    l1[1] = (data_mfn << PAGE_SHIFT) | PTE_KERNEL_RW;

    /* Still mapped writable by us: it cannot become a page table. */
    rc_rw = mmuext1(MMUEXT_PIN_L1_TABLE, l1_mfn);
    if (rc_rw == 0)
        mmuext1(MMUEXT_UNPIN_TABLE, l1_mfn);

    rc_ro = HYPERVISOR_update_va_mapping(l1_va, (l1_mfn << PAGE_SHIFT) | PTE_KERNEL_RO, UVMF_INVLPG);
    rc_pin = mmuext1(MMUEXT_PIN_L1_TABLE, l1_mfn);
    check("mmuext_op.pin_l1", rc_rw < 0 && rc_ro == 0 && rc_pin == 0,
          "pin while writable rc=%ld, ro remap rc=%ld, pin rc=%ld", rc_rw, rc_ro, rc_pin);

    rc_upd = -1;
    rc = 0;
    if (rc_pin == 0) {
        /* A pinned L1 can't be mapped writable, but takes checked updates. */
        rc = HYPERVISOR_update_va_mapping(l1_va, (l1_mfn << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG);
        if (rc == 0)
            HYPERVISOR_update_va_mapping(l1_va, (l1_mfn << PAGE_SHIFT) | PTE_KERNEL_RO, UVMF_INVLPG);
        req.ptr = ((uint64_t)l1_mfn << PAGE_SHIFT) + 2 * 8;
        req.val = (data_mfn << PAGE_SHIFT) | PTE_KERNEL_RO;
        rc_upd = HYPERVISOR_mmu_update(&req, 1, NULL, DOMID_SELF);
        e1 = READ_ONCE(l1[2]);
    }
    check("mmuext_op.pinned_l1_rules",
          rc < 0 && rc_upd == 0 && (e1 & PTE_ADDR_MASK) == data_mfn << PAGE_SHIFT && (e1 & 1),
          "writable remap rc=%ld mmu_update rc=%ld entry=0x%lx", rc, rc_upd, (unsigned long)e1);

    rc_unpin = rc_pin == 0 ? mmuext1(MMUEXT_UNPIN_TABLE, l1_mfn) : -1;
    rc_back = HYPERVISOR_update_va_mapping(l1_va, (l1_mfn << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG);
    check("mmuext_op.unpin", rc_unpin == 0 && rc_back == 0, "unpin rc=%ld rw remap rc=%ld",
          rc_unpin, rc_back);
    if (rc_back == 0)
        free_pages(l1, 1);
    free_pages(data, 1);

    rc = mmuext1(MMUEXT_TLB_FLUSH_LOCAL, 0);
    check("mmuext_op.tlb_flush_local", rc == 0, "rc=%ld", rc);
    rc = mmuext1(MMUEXT_INVLPG_LOCAL, (unsigned long)&n_ok);
    check("mmuext_op.invlpg_local", rc == 0, "rc=%ld", rc);
}

static void test_misc(void)
{
    char buf[16];
    long rc, rc2;

    rc = HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_runstate_update_flag);
    rc2 = HYPERVISOR_vm_assist(VMASST_CMD_disable, VMASST_TYPE_runstate_update_flag);
    check("vm_assist.valid", rc == 0 && rc2 == 0, "enable rc=%ld disable rc=%ld", rc, rc2);
    /* Xen's PV64_VM_ASSIST_MASK: types 0-5 and m2p_strict; the rest -EINVAL */
    rc = HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_writable_pagetables);
    rc2 = HYPERVISOR_vm_assist(VMASST_CMD_disable, VMASST_TYPE_writable_pagetables);
    check("vm_assist.writable_pagetables", rc == 0 && rc2 == 0, "enable rc=%ld disable rc=%ld",
          rc, rc2);
    long rc3 = HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_architectural_iopl);
    long rc4 = HYPERVISOR_vm_assist(VMASST_CMD_disable, VMASST_TYPE_architectural_iopl);
    rc = HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_m2p_strict);
    rc2 = HYPERVISOR_vm_assist(VMASST_CMD_disable, VMASST_TYPE_m2p_strict);
    check("vm_assist.pv64_types", rc == 0 && rc2 == 0 && rc3 == 0 && rc4 == 0,
          "m2p_strict rc=%ld,%ld architectural_iopl rc=%ld,%ld", rc, rc2, rc3, rc4);
    rc = HYPERVISOR_vm_assist(VMASST_CMD_enable, 6);
    rc2 = HYPERVISOR_vm_assist(VMASST_CMD_enable, 31);
    rc3 = HYPERVISOR_vm_assist(VMASST_CMD_enable, 64);
    check("vm_assist.unknown_type_einval",
          rc == -XEN_EINVAL && rc2 == -XEN_EINVAL && rc3 == -XEN_EINVAL,
          "type 6 rc=%ld type 31 rc=%ld type 64 rc=%ld", rc, rc2, rc3);
    rc = HYPERVISOR_vm_assist(2, VMASST_TYPE_runstate_update_flag);
    check("vm_assist.bad_cmd_enosys", rc == -XEN_ENOSYS, "rc=%ld", rc);

    rc = HYPERVISOR_console_io(CONSOLEIO_read, sizeof(buf), buf);
    check("console_io.read", rc == 0, "rc=%ld", rc);

    rc = _hypercall0(long, HC_UNKNOWN);
    check("unknown_hypercall_enosys", rc == -XEN_ENOSYS, "rc=%ld", rc);
}

/* ---- the hypercalls Linux needs at boot (issue 9) ---- */

static struct hc_runstate_info rs_area __attribute__((aligned(64)));

static void test_runstate_area(void)
{
    struct hc_runstate_info info;
    struct { uint64_t addr; } area;
    uint64_t t0, entry0, blocked0;
    long rc, rc2, rc3;

    rc = HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_runstate_update_flag);
    memset(&rs_area, 0xff, sizeof(rs_area));
    t0 = monotonic_ns();
    area.addr = (unsigned long)&rs_area;
    rc2 = hc_vcpu_op(VCPUOP_register_runstate_memory_area, 0, &area);
    check("vcpu_op.register_runstate_memory_area",
          rc == 0 && rc2 == 0 && rs_area.state == RUNSTATE_running &&
          !(rs_area.state_entry_time & XEN_RUNSTATE_UPDATE) && rs_area.state_entry_time <= t0 &&
          rs_area.time[RUNSTATE_running] <= t0,
          "vm_assist rc=%ld register rc=%ld state=%d entry=0x%lx now=0x%lx", rc, rc2,
          rs_area.state, (unsigned long)rs_area.state_entry_time, (unsigned long)t0);

    /* A block: running -> blocked -> running, each change written to the area */
    entry0 = rs_area.state_entry_time;
    blocked0 = rs_area.time[RUNSTATE_blocked];
    unsigned long flags = irq_save();
    rc = HYPERVISOR_set_timer_op(monotonic_ns() + 2 * NSEC_PER_MSEC);
    rc2 = HYPERVISOR_sched_op(SCHEDOP_block, NULL);
    irq_restore(flags);
    rc3 = hc_vcpu_op(VCPUOP_get_runstate_info, 0, &info);
    check("vcpu_op.runstate_area_updated",
          rc == 0 && rc2 == 0 && rc3 == 0 && rs_area.state == RUNSTATE_running &&
          rs_area.state_entry_time > entry0 &&
          !(rs_area.state_entry_time & XEN_RUNSTATE_UPDATE) &&
          rs_area.time[RUNSTATE_blocked] > blocked0 &&
          rs_area.time[RUNSTATE_blocked] == info.time[RUNSTATE_blocked] &&
          rs_area.state_entry_time == info.state_entry_time,
          "rc=%ld,%ld,%ld state=%d entry 0x%lx -> 0x%lx blocked %lu -> %lu (info %lu, entry 0x%lx)",
          rc, rc2, rc3, rs_area.state, (unsigned long)entry0,
          (unsigned long)rs_area.state_entry_time, (unsigned long)blocked0,
          (unsigned long)rs_area.time[RUNSTATE_blocked], (unsigned long)info.time[RUNSTATE_blocked],
          (unsigned long)info.state_entry_time);

    area.addr = 0xffff800000001000UL;
    rc = hc_vcpu_op(VCPUOP_register_runstate_memory_area, 0, &area);
    check("vcpu_op.runstate_area_xen_range_efault", rc == -XEN_EFAULT, "rc=%ld", rc);

    area.addr = 0;
    rc = hc_vcpu_op(VCPUOP_register_runstate_memory_area, 0, &area);
    entry0 = rs_area.state_entry_time;
    flags = irq_save();
    rc2 = HYPERVISOR_set_timer_op(monotonic_ns() + NSEC_PER_MSEC);
    rc3 = HYPERVISOR_sched_op(SCHEDOP_block, NULL);
    irq_restore(flags);
    check("vcpu_op.runstate_area_unregister",
          rc == 0 && rc2 == 0 && rc3 == 0 && rs_area.state_entry_time == entry0,
          "rc=%ld entry 0x%lx -> 0x%lx", rc, (unsigned long)entry0,
          (unsigned long)rs_area.state_entry_time);
    HYPERVISOR_vm_assist(VMASST_CMD_disable, VMASST_TYPE_runstate_update_flag);
}

static struct vcpu_time_info time_area __attribute__((aligned(64)));

static void test_time_area(void)
{
    struct { uint64_t addr; } area = { (unsigned long)&time_area };
    struct vcpu_time_info *vt = &this_vcpu()->time;
    uint64_t t0, t1;
    long rc, rc2;

    memset(&time_area, 0, sizeof(time_area));
    rc = hc_vcpu_op(VCPUOP_register_vcpu_time_memory_area, 0, &area);
    t0 = READ_ONCE(time_area.system_time);
    check("vcpu_op.register_vcpu_time_memory_area",
          rc == 0 && !(time_area.version & 1) && time_area.version != 0 &&
          time_area.tsc_to_system_mul == vt->tsc_to_system_mul &&
          time_area.tsc_shift == vt->tsc_shift && (time_area.flags & 1) && t0 != 0,
          "rc=%ld version=%u mul=%u (vcpu_info %u) shift=%d flags=0x%x system_time=%lu", rc,
          time_area.version, time_area.tsc_to_system_mul, vt->tsc_to_system_mul,
          time_area.tsc_shift, time_area.flags, (unsigned long)t0);
    msleep(20);                 /* timer events refresh the time records */
    t1 = READ_ONCE(time_area.system_time);
    check("vcpu_op.vcpu_time_area_updated", t1 > t0 && !(time_area.version & 1),
          "system_time %lu -> %lu version=%u", (unsigned long)t0, (unsigned long)t1,
          time_area.version);
    area.addr = 0xffff800000002000UL;
    rc = hc_vcpu_op(VCPUOP_register_vcpu_time_memory_area, 0, &area);
    area.addr = 0;
    rc2 = hc_vcpu_op(VCPUOP_register_vcpu_time_memory_area, 0, &area);
    check("vcpu_op.vcpu_time_area_efault_unregister", rc == -XEN_EFAULT && rc2 == 0,
          "xen range rc=%ld unregister rc=%ld", rc, rc2);
}

static long set_dr(int reg, unsigned long v)
{
    return _hypercall2(long, __HYPERVISOR_set_debugreg, reg, v);
}

static long get_dr(int reg)
{
    return _hypercall1(long, __HYPERVISOR_get_debugreg, reg);
}

static void test_debugreg(void)
{
    long rc, rc2, v;

    rc = set_dr(0, (unsigned long)&n_ok);
    v = get_dr(0);
    check("debugreg.dr0_roundtrip", rc == 0 && v == (long)(unsigned long)&n_ok,
          "set rc=%ld get=0x%lx", rc, v);
    rc = set_dr(1, 0xffff800000000000UL);
    rc2 = set_dr(1, 0x0000800000000000UL);
    check("debugreg.addr_in_xen_range_eperm", rc == -XEN_EPERM && rc2 == -XEN_EPERM,
          "xen range rc=%ld non-canonical rc=%ld", rc, rc2);
    rc = set_dr(7, 0x1);                    /* L0, execute breakpoint */
    v = get_dr(7);
    rc2 = set_dr(7, 0);
    long v0 = get_dr(7);
    check("debugreg.dr7", rc == 0 && v == 0x401 && rc2 == 0 && v0 == 0x400,
          "set rc=%ld get=0x%lx, cleared rc=%ld get=0x%lx", rc, v, rc2, v0);
    rc = set_dr(7, 0x2000);
    check("debugreg.dr7_gd_eperm", rc == -XEN_EPERM, "rc=%ld", rc);
    rc = set_dr(7, 0x100000001UL);
    rc2 = set_dr(6, 0x100000000UL);
    check("debugreg.upper_half_einval", rc == -XEN_EINVAL && rc2 == -XEN_EINVAL,
          "dr7 rc=%ld dr6 rc=%ld", rc, rc2);
    rc = set_dr(7, 0x20001);                /* an I/O breakpoint needs CR4.DE */
    check("debugreg.dr7_io_eperm", rc == -XEN_EPERM, "rc=%ld", rc);
    rc = set_dr(6, 0x1001);
    v = get_dr(6);
    rc2 = set_dr(4, 0);                     /* DR4 aliases DR6 without CR4.DE */
    v0 = get_dr(6);
    check("debugreg.dr6", rc == 0 && v == 0xffff0ff1 && rc2 == 0 && v0 == 0xffff0ff0,
          "set rc=%ld get=0x%lx, via dr4 rc=%ld get=0x%lx", rc, v, rc2, v0);
    rc = set_dr(8, 0);
    rc2 = get_dr(8);
    check("debugreg.bad_reg_enodev", rc == -XEN_ENODEV && rc2 == -XEN_ENODEV,
          "set rc=%ld get rc=%ld", rc, rc2);
    set_dr(0, 0);
}

static long physdev(int cmd, void *arg)
{
    return _hypercall2(long, __HYPERVISOR_physdev_op, cmd, arg);
}

static void test_physdev(void)
{
    uint32_t iopl = 1, irq[2] = { 1, 0 }, big[8] = { 0 };
    long rc, rc2;

    rc = physdev(PHYSDEVOP_set_iopl, &iopl);
    iopl = 0;
    rc2 = physdev(PHYSDEVOP_set_iopl, &iopl);
    check("physdev_op.set_iopl", rc == 0 && rc2 == 0, "iopl 1 rc=%ld, iopl 0 rc=%ld", rc, rc2);
    iopl = 4;
    rc = physdev(PHYSDEVOP_set_iopl, &iopl);
    check("physdev_op.set_iopl_einval", rc == -XEN_EINVAL, "rc=%ld", rc);
    rc = physdev(PHYSDEVOP_irq_status_query, irq);
    check("physdev_op.irq_status_query_einval", rc == -XEN_EINVAL, "rc=%ld", rc);
    rc = physdev(PHYSDEVOP_map_pirq, big);
    check("physdev_op.map_pirq_eperm", rc == -XEN_EPERM, "rc=%ld", rc);
    rc = physdev(99, big);
    check("physdev_op.unknown_enosys", rc == -XEN_ENOSYS, "rc=%ld", rc);
    rc = _hypercall2(long, 40, 0, big);        /* xenpmu_op(XENPMU_mode_get) */
    check("xenpmu_op.eopnotsupp", rc == -95, "rc=%ld", rc);
}

static void test_callbacks(void)
{
    struct callback_register cb = { .type = CALLBACKTYPE_syscall32, .flags = 0,
                                    .address = (unsigned long)&test_callbacks };
    struct { uint16_t type; } un = { CALLBACKTYPE_syscall32 };
    long rc, rc2, rc3, rc4;

    rc = HYPERVISOR_callback_op(CALLBACKOP_register, &cb);
    rc2 = HYPERVISOR_callback_op(CALLBACKOP_unregister, &un);
    check("callback_op.syscall32", rc == 0 && rc2 == -XEN_EINVAL,
          "register rc=%ld unregister rc=%ld", rc, rc2);
    cb.type = CALLBACKTYPE_nmi;
    un.type = CALLBACKTYPE_nmi;
    rc = HYPERVISOR_callback_op(CALLBACKOP_register, &cb);
    rc2 = HYPERVISOR_callback_op(CALLBACKOP_unregister, &un);
    cb.type = 6;
    rc3 = HYPERVISOR_callback_op(CALLBACKOP_register, &cb);
    cb.type = CALLBACKTYPE_syscall32;
    cb.address = 0x0000800000000000UL;
    rc4 = HYPERVISOR_callback_op(CALLBACKOP_register, &cb);
    check("callback_op.nmi_and_errors",
          rc == 0 && rc2 == 0 && rc3 == -XEN_ENOSYS && rc4 == -XEN_EINVAL,
          "nmi register rc=%ld unregister rc=%ld, type 6 rc=%ld, non-canonical rc=%ld",
          rc, rc2, rc3, rc4);
}

static domid_t self_domid = DOMID_SELF;

static void test_alloc_unbound_self(void)
{
    struct evtchn_alloc_unbound au = { .dom = DOMID_SELF, .remote_dom = DOMID_SELF };
    struct hc_evtchn_status st;
    long rc, rc2 = -1;

    rc = evtchn_op(EVTCHNOP_alloc_unbound, &au);
    if (rc == 0)
        rc2 = evtchn_status(au.port, &st);
    check("event_channel_op.alloc_unbound_domid_self",
          rc == 0 && rc2 == 0 && st.status == EVTCHNSTAT_unbound &&
          st.u.unbound.dom != DOMID_SELF && st.u.unbound.dom < DOMID_SELF,
          "rc=%ld status rc=%ld remote dom=0x%x", rc, rc2, rc2 == 0 ? st.u.unbound.dom : 0);
    if (rc == 0 && rc2 == 0)
        self_domid = st.u.unbound.dom;
    if (rc == 0)
        evtchn_close(au.port);
}

static void test_gnttab_avail_bits(void)
{
    char *page = alloc_page();
    void *area = gnttab_alloc_map_area(1);
    uint64_t maddr = 0, pte = 0;
    grant_handle_t handle = 0;
    int16_t status = -1;
    long rc = -1;
    int ref = -1;

    if (!page || !area || self_domid == DOMID_SELF || !gnttab_ready()) {
        check("grant_table_op.map_avail_bits", 0, "no memory, grant table or own domid");
        return;
    }
    ref = gnttab_grant_page(self_domid, page, 0);
    if (ref >= 0) {
        struct gnttab_map_grant_ref op = {
            .host_addr = (unsigned long)area, .dom = self_domid, .ref = (grant_ref_t)ref,
            .flags = GNTMAP_host_map | (5U << 16),   /* avail bits 0 and 2 */
        };
        rc = HYPERVISOR_grant_table_op(GNTTABOP_map_grant_ref, &op, 1);
        status = op.status;
        handle = op.handle;
        const uint64_t *p = mm_lookup_pte((unsigned long)area, &maddr);
        pte = p ? *p : 0;
        if (rc == 0 && status == 0)
            gnttab_unmap((unsigned long)area, handle, &status);
        gnttab_end_access((grant_ref_t)ref);
    }
    check("grant_table_op.map_avail_bits", ref >= 0 && rc == 0 && (pte & 1) &&
          (pte & 0xe00) == 0xa00, "ref=%d rc=%ld status=%d pte=0x%lx", ref, rc, status,
          (unsigned long)pte);
    gnttab_free_map_area(area, 1);
    free_pages(page, 1);
}

static long reservation(int cmd, unsigned long *list, unsigned long n, unsigned int order)
{
    struct hc_reservation r = { .extent_start = list, .nr_extents = n, .extent_order = order,
                                .mem_flags = 0, .domid = DOMID_SELF };
    return HYPERVISOR_memory_op(cmd, &r);
}

static void test_reservation(void)
{
    domid_t self = DOMID_SELF;
    volatile uint64_t *p = alloc_page();
    unsigned long va = (unsigned long)p, pfn, mfn, list[1];
    struct xen_machphys_mapping mp;
    long cur0, cur1, cur2, rc, rc2, rc3, rc4;
    const unsigned long *m2p;

    if (!p || HYPERVISOR_memory_op(XENMEM_machphys_mapping, &mp) != 0) {
        check("memory_op.decrease_reservation", 0, "no memory or no M2P");
        return;
    }
    m2p = (const unsigned long *)mp.v_start;
    pfn = virt_to_pfn((void *)p);
    mfn = pfn_to_mfn(pfn);
    p[0] = 0x1234;
    p[511] = 0x5678;
    cur0 = HYPERVISOR_memory_op(XENMEM_current_reservation, &self);

    /* give the frame back: unmap it first, as a balloon driver does */
    rc = HYPERVISOR_update_va_mapping(va, 0, UVMF_INVLPG);
    list[0] = mfn;
    rc2 = reservation(XENMEM_decrease_reservation, list, 1, 0);
    cur1 = HYPERVISOR_memory_op(XENMEM_current_reservation, &self);
    check("memory_op.decrease_reservation",
          rc == 0 && rc2 == 1 && cur1 == cur0 - 1 && m2p[mfn] == ~0UL,
          "unmap rc=%ld decrease rc=%ld reservation %ld -> %ld m2p=0x%lx", rc, rc2, cur0, cur1,
          m2p[mfn]);
    rc = HYPERVISOR_update_va_mapping(va, (mfn << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG);
    rc2 = reservation(XENMEM_decrease_reservation, list, 1, 0);
    check("memory_op.decreased_frame_gone", rc < 0 && rc2 == 0,
          "map rc=%ld decrease again rc=%ld", rc, rc2);

    /* at the maximum nothing more is given; after the decrease one frame is */
    list[0] = pfn;
    rc = reservation(XENMEM_populate_physmap, list, 1, 0);
    unsigned long nmfn = list[0];
    cur2 = HYPERVISOR_memory_op(XENMEM_current_reservation, &self);
    rc2 = -1;
    if (rc == 1) {
        phys_to_machine[pfn] = nmfn;
        rc2 = HYPERVISOR_update_va_mapping(va, (nmfn << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG);
    }
    check("memory_op.populate_physmap",
          rc == 1 && cur2 == cur0 && rc2 == 0 && m2p[nmfn] == pfn && p[0] == 0 && p[511] == 0,
          "rc=%ld mfn=0x%lx reservation %ld m2p=0x%lx map rc=%ld contents 0x%lx,0x%lx",
          rc, nmfn, cur2, rc == 1 ? m2p[nmfn] : 0, rc2, rc2 == 0 ? (unsigned long)p[0] : 0,
          rc2 == 0 ? (unsigned long)p[511] : 0);
    if (rc2 != 0)
        return;   /* the page stays lost */

    list[0] = 0;
    rc = reservation(XENMEM_increase_reservation, list, 1, 0);
    check("memory_op.increase_at_maximum", cur0 == HYPERVISOR_memory_op(XENMEM_maximum_reservation,
          &self) ? rc == 0 : rc == 1, "rc=%ld", rc);

    /* increase_reservation hands out a frame and says which */
    mfn = nmfn;
    rc = HYPERVISOR_update_va_mapping(va, 0, UVMF_INVLPG);
    list[0] = mfn;
    rc2 = reservation(XENMEM_decrease_reservation, list, 1, 0);
    list[0] = 0;
    rc3 = reservation(XENMEM_increase_reservation, list, 1, 0);
    nmfn = list[0];
    rc4 = -1;
    if (rc3 == 1) {
        struct mmu_update u = { .ptr = (nmfn << PAGE_SHIFT) | MMU_MACHPHYS_UPDATE, .val = pfn };
        phys_to_machine[pfn] = nmfn;
        rc4 = HYPERVISOR_mmu_update(&u, 1, NULL, DOMID_SELF);
        if (rc4 == 0)
            rc4 = HYPERVISOR_update_va_mapping(va, (nmfn << PAGE_SHIFT) | PTE_KERNEL_RW,
                                               UVMF_INVLPG);
    }
    check("memory_op.increase_reservation",
          rc == 0 && rc2 == 1 && rc3 == 1 && rc4 == 0 && m2p[nmfn] == pfn &&
          HYPERVISOR_memory_op(XENMEM_current_reservation, &self) == cur0,
          "unmap rc=%ld decrease rc=%ld increase rc=%ld mfn=0x%lx remap rc=%ld", rc, rc2, rc3,
          nmfn, rc4);

    /* a frame in use as a page table is refused; so is an order above 9 */
    list[0] = virt_to_mfn((void *)start_info->pt_base);
    rc = reservation(XENMEM_decrease_reservation, list, 1, 0);
    list[0] = pfn;
    rc2 = reservation(XENMEM_populate_physmap, list, 1, 10);
    rc3 = reservation(XENMEM_decrease_reservation, list, 1, 0) ;   /* start >= nr: no-op */
    check("memory_op.reservation_refusals", rc == 0 && rc2 == 0,
          "page table rc=%ld order 10 rc=%ld", rc, rc2);
    (void)rc3;

    rc = HYPERVISOR_memory_op(XENMEM_maximum_gpfn, &self);
    check("memory_op.maximum_gpfn", rc == (long)start_info->nr_pages - 1, "rc=%ld nr_pages=%lu",
          rc, start_info->nr_pages);
    if (rc4 == 0)
        free_pages((void *)p, 1);
}

static void test_vcpu_updown(void)
{
    long rc = hc_vcpu_op(VCPUOP_up, 0, NULL);
    long rc2 = hc_vcpu_op(VCPUOP_initialise, 0, NULL);
    long rc3 = hc_vcpu_op(VCPUOP_is_up, 0, NULL);
    check("vcpu_op.up_initialise_vcpu0", rc == 0 && rc2 == -XEN_EEXIST && rc3 == 1,
          "up rc=%ld initialise rc=%ld is_up=%ld", rc, rc2, rc3);
}

static void test_register_vcpu_info(void)
{
    struct shared_info *s = HYPERVISOR_shared_info;
    struct hc_register_vcpu_info r;
    struct hc_bind_ipi ipi = { .vcpu = 0 };
    struct evtchn_unmask um;
    static volatile unsigned long hits;
    char *page = alloc_page();
    struct vcpu_info *nv;
    unsigned long flags, h0;
    uint64_t t0, t1, stamp0;
    evtchn_port_t port;
    long rc, rc2;

    if (!page) {
        check("vcpu_op.register_vcpu_info", 0, "no memory");
        return;
    }
    memset(page, 0, PAGE_SIZE);
    nv = (struct vcpu_info *)(page + 64);
    r.mfn = virt_to_mfn(page);
    r.offset = 64;
    r.rsvd = 0;

    t0 = monotonic_ns();
    flags = irq_save();
    rc = hc_vcpu_op(VCPUOP_register_vcpu_info, 0, &r);
    if (rc == 0) {
        vcpu_info_ptr = nv;     /* from now on the kernel uses the new copy */
        barrier();
    }
    int copied_mask = nv->evtchn_upcall_mask;
    irq_restore(flags);
    check("vcpu_op.register_vcpu_info", rc == 0 && copied_mask == 1,
          "rc=%ld mask in the new copy=%d", rc, copied_mask);
    if (rc != 0)
        return;

    /* Timer events (and the time record) now come through the new copy. */
    h0 = timer_hits;
    stamp0 = READ_ONCE(nv->time.system_time);
    msleep(30);
    t1 = monotonic_ns();
    check("vcpu_op.register_vcpu_info.timer",
          timer_hits > h0 && t1 - t0 >= 30 * NSEC_PER_MSEC && t1 - t0 < 2 * NSEC_PER_SEC &&
          READ_ONCE(nv->time.system_time) >= stamp0 && nv->time.tsc_to_system_mul != 0,
          "timer events=%lu slept %lu us", timer_hits - h0, (unsigned long)(t1 - t0) / 1000);

    rc = evtchn_op(EVTCHNOP_bind_ipi, &ipi);
    port = ipi.port;
    if (rc != 0) {
        check("vcpu_op.register_vcpu_info.ipi", 0, "bind_ipi rc=%ld", rc);
        return;
    }
    hits = 0;
    bind_evtchn(port, count_handler, (void *)&hits);
    rc = evtchn_send(port);
    check("vcpu_op.register_vcpu_info.ipi", rc == 0 && hits == 1,
          "send rc=%ld handler ran %lu times", rc, hits);

    hits = 0;
    mask_evtchn(port);
    rc = evtchn_send(port);
    h0 = hits;
    um.port = port;
    rc2 = evtchn_op(EVTCHNOP_unmask, &um);
    unsigned long got = hits;
    int sel_in_new = (READ_ONCE(nv->evtchn_pending_sel) >> (port / 64)) & 1;
    int still_pending = port_bit(s->evtchn_pending, port);
    check("vcpu_op.register_vcpu_info.unmask",
          rc == 0 && h0 == 0 && rc2 == 0 && got == 1,
          "send rc=%ld unmask rc=%ld handler ran %lu times (port %u still pending=%d, "
          "selector bit in new vcpu_info=%d)", rc, rc2, got, port, still_pending, sel_in_new);
    unbind_evtchn(port);
}

int app_main(const char *cmdline)
{
    (void)cmdline;
    printk("hctest: starting\n");
    test_xen_version();
    test_multicall();
    test_memory_op();
    test_vcpu_op();
    test_sched_op();
    test_event_channels();
    test_set_segment_base();
    test_fpu_taskswitch();
    test_gdt();
    test_update_va_mapping();
    test_mmuext();
    test_misc();
    test_runstate_area();
    test_time_area();
    test_debugreg();
    test_physdev();
    test_callbacks();
    test_alloc_unbound_self();
    test_gnttab_avail_bits();
    test_reservation();
    test_vcpu_updown();
    test_register_vcpu_info();
    printk("hctest: done ok=%u fail=%u\n", n_ok, n_fail);
    poweroff();
}
