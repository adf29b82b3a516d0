/*
 * hostile: a guest that attacks the hypervisor through grant operations on
 * its own page-table and descriptor frames (issue 8, finding 1).  Every
 * check prints one line
 *     "hostile: <name> PASS|FAIL <details>"
 * where PASS means the hypervisor refused (or allowed) as Xen does.
 *
 *   role=local [me=<our domid>] [attack=0]  (default role; me defaults to
 *                                     xenstore's "domid", else 1; attack=0 skips
 *                                     the two copies, which end the run early on
 *                                     a hypervisor that lets them through)
 *       copy_pte_into_own_l1   grant our live L1 to ourselves, GNTTABOP_copy a
 *                              PTE mapping the hypervisor's memory into it:
 *                              GNTST_general_error, the PTE unchanged
 *       copy_into_own_l1_gmfn  the same with the L1 as a local (gmfn) dest
 *       map_rw_l1..l4          writable map of our own L1-L4: GNTST_general_error
 *       map_rw_gdt             writable map of a frame in use as our GDT: refused
 *       map_ro_l1              read-only map of our L1: allowed (as Xen)
 *       pin_while_mapped       a frame writable-mapped through a grant cannot be
 *                              pinned as an L1 (-EINVAL) until unmapped
 *       gdt_while_mapped       nor become a GDT frame (set_gdt -EINVAL)
 *   then "hostile: done pass=<n> fail=<m>" and power off.
 *
 *   role=offer peer=<domid>
 *       grants peer our live L1 (writable), a plain page (writable) and a
 *       frame far outside our RAM, prints
 *       "hostile: offer l1=<ref> page=<ref> far=<ref>", then idles.
 *
 *   role=map
 *       waits for data/hostile/offer = "<dom> <l1 ref> <page ref> <far ref>"
 *       (the test writes it), maps and copies those grants, prints
 *       "hostile: mapped l1_rw=<st> l1_ro=<st> page_rw=<st> far=<st>
 *        beyond=<st> copy_far=<st>", then "hostile: tick <n>" every 200 ms.
 */
#include "app.h"
#include "gnttab.h"
#include "xenbus.h"

const char app_name[] = "hostile";

#define L4_IDX(va) (((va) >> 39) & 511)
#define L3_IDX(va) (((va) >> 30) & 511)
#define L2_IDX(va) (((va) >> 21) & 511)
#define HV_FRAME 0x10000UL          /* the hypervisor area (machine.HV_GPA) */

static unsigned int n_pass, n_fail;

static void report(const char *name, int ok, const char *fmt, ...)
{
    char buf[200];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    printk("hostile: %s %s %s\n", name, ok ? "PASS" : "FAIL", buf);
    if (ok)
        n_pass++;
    else
        n_fail++;
}

static long mmuext1(unsigned int cmd, unsigned long mfn)
{
    struct mmuext_op op;

    memset(&op, 0, sizeof(op));
    op.cmd = cmd;
    op.arg1.mfn = mfn;
    return HYPERVISOR_mmuext_op(&op, 1, NULL, DOMID_SELF);
}

static long set_gdt(unsigned long *frames, unsigned int entries)
{
    return _hypercall2(long, __HYPERVISOR_set_gdt, frames, entries);
}

static long remap(void *va, unsigned long mfn, uint64_t flags)
{
    return HYPERVISOR_update_va_mapping((unsigned long)va, (mfn << PAGE_SHIFT) | flags, UVMF_INVLPG);
}

/* Map dom's ref at va; the status (the mapping is undone when it succeeds
 * and keep is 0). */
static int16_t try_map(domid_t dom, grant_ref_t ref, int readonly, void *va, grant_handle_t *h,
                       int keep)
{
    grant_handle_t handle = 0;
    int16_t st = 0, ust;
    long rc = gnttab_map(dom, ref, readonly, (unsigned long)va, &handle, &st);

    if (rc)
        return (int16_t)rc;
    if (st == GNTST_okay && !keep)
        gnttab_unmap((unsigned long)va, handle, &ust);
    if (h)
        *h = handle;
    return st;
}

static int16_t copy8(unsigned long src_mfn, unsigned int dst, domid_t ddom, uint16_t doff, int dref)
{
    struct gnttab_copy op;

    memset(&op, 0, sizeof(op));
    op.source.u.gmfn = src_mfn;
    op.source.domid = DOMID_SELF;
    if (dref)
        op.dest.u.ref = dst;
    else
        op.dest.u.gmfn = dst;
    op.dest.domid = ddom;
    op.dest.offset = doff;
    op.len = 8;
    op.flags = dref ? GNTCOPY_dest_gref : 0;
    if (gnttab_copy(&op, 1))
        return -100;
    return op.status;
}

static unsigned long table_mfn(uint64_t e)
{
    return (e & PTE_ADDR_MASK) >> PAGE_SHIFT;
}

static void end_access(int ref)
{
    if (ref >= 0)
        while (gnttab_end_access((grant_ref_t)ref) == -XEN_EBUSY)
            msleep(1);
}

static int role_local(domid_t me, int attack)
{
    uint64_t *scratch = alloc_page(), *src = alloc_page(), *page = alloc_page();
    uint64_t pte_maddr = 0, before, after, forged;
    const uint64_t *pte;
    void *area = gnttab_alloc_map_area(1);
    unsigned long va, l1, mfn[4], gdt_mfn, page_mfn;
    const uint64_t *l4, *l3, *l2;
    int ref, ro_ok;
    int16_t st;
    long rc, rc2;
    static const char *const names[4] = { "map_rw_l1", "map_rw_l2", "map_rw_l3", "map_rw_l4" };

    if (!scratch || !src || !page || !area || !gnttab_ready())
        app_fail("no memory or no grant table");
    printk("hostile: role=local me=%u\n", me);
    scratch[0] = 0x1234;
    va = (unsigned long)scratch;
    pte = mm_lookup_pte(va, &pte_maddr);
    if (!pte)
        app_fail("no L1 maps %p", scratch);
    l1 = pte_maddr >> PAGE_SHIFT;

    before = READ_ONCE(*pte);
    if (!attack)
        goto maps;
    /* (a) the attack: a PTE mapping the hypervisor's frames, copied into our L1 */
    forged = (HV_FRAME << PAGE_SHIFT) | PTE_KERNEL_RW;
    src[0] = forged;
    ref = gnttab_grant_access(me, l1, 0);
    st = ref < 0 ? -100 : copy8(virt_to_mfn(src), (unsigned int)ref, me, pte_maddr & 0xFFF, 1);
    after = READ_ONCE(*pte);
    end_access(ref);
    report("copy_pte_into_own_l1", ref >= 0 && st == GNTST_general_error && after == before,
           "ref=%d status=%d pte_before=0x%lx pte_after=0x%lx", ref, st, before, after);
    if (after != before) {
        printk("hostile: the PTE was overwritten: stopping here\n");
        poweroff();
    }
    st = copy8(virt_to_mfn(src), (unsigned int)l1, DOMID_SELF, pte_maddr & 0xFFF, 0);
    after = READ_ONCE(*pte);
    report("copy_into_own_l1_gmfn", st == GNTST_general_error && after == before,
           "status=%d pte_after=0x%lx", st, after);
maps:

    /* (b) writable maps of our own page tables are refused, read-only ones allowed */
    l4 = (const uint64_t *)start_info->pt_base;
    mfn[3] = virt_to_mfn(l4);
    mfn[2] = table_mfn(l4[L4_IDX(va)]);
    l3 = mfn_to_virt(mfn[2]);
    mfn[1] = table_mfn(l3[L3_IDX(va)]);
    l2 = mfn_to_virt(mfn[1]);
    mfn[0] = table_mfn(l2[L2_IDX(va)]);
    if (mfn[0] != l1)
        app_fail("page walk disagrees: L1 0x%lx vs 0x%lx", mfn[0], l1);
    for (int lvl = 0; lvl < 4; lvl++) {
        ref = gnttab_grant_access(me, mfn[lvl], 0);
        st = ref < 0 ? -100 : try_map(me, (grant_ref_t)ref, 0, area, NULL, 0);
        end_access(ref);
        report(names[lvl], st == GNTST_general_error, "mfn=0x%lx status=%d", mfn[lvl], st);
    }
    ref = gnttab_grant_access(me, l1, 1);
    ro_ok = 0;
    if (ref >= 0) {
        grant_handle_t h;
        int16_t ust;
        st = try_map(me, (grant_ref_t)ref, 1, area, &h, 1);
        if (st == GNTST_okay) {
            ro_ok = ((const uint64_t *)area)[(pte_maddr & 0xFFF) / 8] == before;
            gnttab_unmap((unsigned long)area, h, &ust);
        }
        end_access(ref);
    } else {
        st = -100;
    }
    report("map_ro_l1", st == GNTST_okay && ro_ok, "status=%d same_pte=%d", st, ro_ok);

    /* a frame in use as our GDT */
    memset(page, 0, PAGE_SIZE);
    gdt_mfn = virt_to_mfn(page);
    rc = remap(page, gdt_mfn, PTE_KERNEL_RO);
    rc2 = rc ? rc : set_gdt(&gdt_mfn, 3);
    if (rc2 == 0) {
        ref = gnttab_grant_access(me, gdt_mfn, 0);
        st = ref < 0 ? -100 : try_map(me, (grant_ref_t)ref, 0, area, NULL, 0);
        end_access(ref);
        set_gdt(&gdt_mfn, 0);
    } else {
        st = -100;
    }
    report("map_rw_gdt", rc2 == 0 && st == GNTST_general_error, "set_gdt rc=%ld status=%d", rc2, st);

    /* (c) writable through a grant: no page-table or descriptor type until unmapped */
    page_mfn = gdt_mfn;          /* still mapped read-only by us: only the grant writes it */
    ref = gnttab_grant_access(me, page_mfn, 0);
    {
        grant_handle_t h = 0;
        int16_t ust = 0;
        long pin_mapped = -1, pin_after = -1;
        st = ref < 0 ? -100 : try_map(me, (grant_ref_t)ref, 0, area, &h, 1);
        if (st == GNTST_okay) {
            pin_mapped = mmuext1(MMUEXT_PIN_L1_TABLE, page_mfn);
            if (pin_mapped == 0)
                mmuext1(MMUEXT_UNPIN_TABLE, page_mfn);
            rc = set_gdt(&page_mfn, 3);
            if (rc == 0)
                set_gdt(&page_mfn, 0);
            gnttab_unmap((unsigned long)area, h, &ust);
            pin_after = mmuext1(MMUEXT_PIN_L1_TABLE, page_mfn);
            if (pin_after == 0)
                mmuext1(MMUEXT_UNPIN_TABLE, page_mfn);
            rc2 = set_gdt(&page_mfn, 3);
            if (rc2 == 0)
                set_gdt(&page_mfn, 0);
        } else {
            rc = rc2 = -1;
        }
        end_access(ref);
        report("pin_while_mapped", st == GNTST_okay && pin_mapped == -XEN_EINVAL && pin_after == 0,
               "map status=%d pin while mapped rc=%ld, after unmap rc=%ld", st, pin_mapped,
               pin_after);
        report("gdt_while_mapped", st == GNTST_okay && rc == -XEN_EINVAL && rc2 == 0,
               "set_gdt while mapped rc=%ld, after unmap rc=%ld", rc, rc2);
    }
    remap(page, gdt_mfn, PTE_KERNEL_RW);
    printk("hostile: done pass=%u fail=%u\n", n_pass, n_fail);
    poweroff();
}

static int role_offer(domid_t peer)
{
    uint64_t *scratch = alloc_page(), *page = alloc_page();
    uint64_t pte_maddr = 0;
    int l1, pg, far;

    if (!scratch || !page || !gnttab_ready())
        app_fail("no memory or no grant table");
    if (!mm_lookup_pte((unsigned long)scratch, &pte_maddr))
        app_fail("no L1");
    for (int i = 0; i < 512; i++)
        page[i] = 0x0FFE00000000000ULL + (uint64_t)i;
    l1 = gnttab_grant_access(peer, pte_maddr >> PAGE_SHIFT, 0);
    pg = gnttab_grant_page(peer, page, 0);
    far = gnttab_grant_access(peer, 0x7FFFFFF0UL, 0);  /* not one of our frames */
    if (l1 < 0 || pg < 0 || far < 0)
        app_fail("grant: %d %d %d", l1, pg, far);
    printk("hostile: offer l1=%d page=%d far=%d\n", l1, pg, far);
    for (unsigned long n = 0;; n++) {
        msleep(200);
        if (page[0] == 0x5A5A5A5A5A5A5A5AULL) {
            printk("hostile: page written by the peer\n");
            page[0] = 0;
        }
    }
}

static unsigned long next_ulong(const char **s)
{
    while (**s == ' ')
        (*s)++;
    return simple_strtoul(*s, s, 10);
}

static int role_map(int hold)
{
    char offer[64];
    const char *s;
    unsigned long dom, l1, pg, far;
    uint64_t *src = alloc_page();
    void *area = gnttab_alloc_map_area(1);
    grant_handle_t h = 0;
    int16_t l1_rw, l1_ro, page_rw, st_far, beyond, copy_far, ust;
    int rc;

    if (!src || !area || !gnttab_ready() || !xenbus_available())
        app_fail("no memory, grant table or xenstore");
    printk("hostile: role=map waiting for data/hostile/offer\n");
    while ((rc = xenbus_read(XBT_NIL, "data/hostile/offer", offer, sizeof(offer))) <= 0) {
        if (rc < 0 && rc != -XEN_ENOENT)
            app_fail("read data/hostile/offer: %d", rc);
        msleep(5);
    }
    s = offer;
    dom = next_ulong(&s);
    l1 = next_ulong(&s);
    pg = next_ulong(&s);
    far = next_ulong(&s);
    l1_rw = try_map((domid_t)dom, (grant_ref_t)l1, 0, area, NULL, 0);
    l1_ro = try_map((domid_t)dom, (grant_ref_t)l1, 1, area, NULL, 0);
    page_rw = try_map((domid_t)dom, (grant_ref_t)pg, 0, area, &h, 1);
    if (page_rw == GNTST_okay) {
        *(volatile uint64_t *)area = 0x5A5A5A5A5A5A5A5AULL;
        gnttab_unmap((unsigned long)area, h, &ust);
    }
    st_far = try_map((domid_t)dom, (grant_ref_t)far, 0, area, NULL, 0);
    beyond = try_map((domid_t)dom, 20000, 0, area, NULL, 0);
    copy_far = copy8(virt_to_mfn(src), (unsigned int)far, (domid_t)dom, 0, 1);
    printk("hostile: mapped l1_rw=%d l1_ro=%d page_rw=%d far=%d beyond=%d copy_far=%d\n",
           l1_rw, l1_ro, page_rw, st_far, beyond, copy_far);
    if (hold) {
        /* keep a writable mapping until data/hostile/unmap appears (the test
         * destroys the granter meanwhile), then unmap it */
        int16_t st = try_map((domid_t)dom, (grant_ref_t)pg, 0, area, &h, 1);
        printk("hostile: holding page status=%d\n", st);
        while ((rc = xenbus_read(XBT_NIL, "data/hostile/unmap", offer, sizeof(offer))) <= 0)
            msleep(5);
        *(volatile uint64_t *)area = 1;     /* the granter's page, still ours to use */
        ust = -100;
        if (st == GNTST_okay)
            gnttab_unmap((unsigned long)area, h, &ust);
        printk("hostile: unmapped status=%d\n", ust);
    }
    for (unsigned long n = 1;; n++) {
        msleep(200);
        printk("hostile: tick %lu\n", n);
    }
}

int app_main(const char *cmdline)
{
    char role[8] = "local";
    domid_t me = 1;

    cmdline_get_str(cmdline, "role", role, sizeof(role));
    if (!strcmp(role, "offer"))
        return role_offer((domid_t)cmdline_get_ulong(cmdline, "peer", 0));
    if (!strcmp(role, "map"))
        return role_map((int)cmdline_get_ulong(cmdline, "hold", 0));
    if (!strcmp(role, "local")) {
        if (cmdline_find(cmdline, "me", NULL))
            me = (domid_t)cmdline_get_ulong(cmdline, "me", 1);
        else if (xenbus_available())
            xenbus_self_domid(&me);
        return role_local(me, (int)cmdline_get_ulong(cmdline, "attack", 1));
    }
    app_fail("role=local, offer or map, please (got '%s')", role);
}
