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

#define VMASST_TYPE_writable_pagetables  2
#define VMASST_TYPE_runstate_update_flag 5

#define XEN_EEXIST 17
#define XEN_ETIME  62

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
          !(fi.submap >> XENFEAT_auto_translated_physmap & 1) &&
          !(fi.submap >> XENFEAT_supervisor_mode_kernel & 1),
          "rc=%ld submap=0x%x", rc, fi.submap);

    rc = HYPERVISOR_xen_version(XENVER_platform_parameters, &virt_start);
    check("xen_version.platform_parameters", rc == 0 && virt_start == 0xffff800000000000UL,
          "rc=%ld virt_start=0x%lx", rc, virt_start);

    rc = HYPERVISOR_xen_version(XENVER_pagesize, NULL);
    check("xen_version.pagesize", rc == 4096, "rc=%ld", rc);
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
    rc = hc_vcpu_op(VCPUOP_set_periodic_timer, 0, &per);
    msleep(100);
    n = timer_hits - h0;
    /* 10 periodic ticks; msleep's own one-shot may add one. */
    check("vcpu_op.set_periodic_timer", rc == 0 && n >= 7 && n <= 13,
          "rc=%ld events in 100 ms=%lu", rc, n);

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
    rc = HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_writable_pagetables);
    check("vm_assist.writable_pagetables_einval", rc == -XEN_EINVAL, "rc=%ld", rc);

    rc = HYPERVISOR_console_io(CONSOLEIO_read, sizeof(buf), buf);
    check("console_io.read", rc == 0, "rc=%ld", rc);

    rc = _hypercall0(long, HC_UNKNOWN);
    check("unknown_hypercall_enosys", rc == -XEN_ENOSYS, "rc=%ld", rc);
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
    test_register_vcpu_info();
    printk("hctest: done ok=%u fail=%u\n", n_ok, n_fail);
    poweroff();
}
