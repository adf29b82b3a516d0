/*
 * netecho: a tiny IPv4 host on our netfront.  It answers ARP for its
 * address and ICMP echo requests, echoes UDP datagrams sent to its echo
 * port, counts datagrams sent to its sink port, and can send a UDP
 * heartbeat at a fixed rate (issue 11 measures migration downtime with
 * the gaps between heartbeats, as the seed's Quake 3 figure does).
 *
 * cmdline (extra=), all optional but ip:
 *   ip=A.B.C.D       our address (required)
 *   mac=xx:..:xx     our MAC (default: the vif's "mac" node)
 *   vif=N            which device/vif (default: the first)
 *   port=P           UDP echo port (default 7)
 *   sink=P           UDP port whose datagrams are only counted (default 9);
 *                    a datagram "STATS" to it is answered with
 *                    "netecho-stats count=N first_ns=T0 last_ns=T1 ..." (the
 *                    count excludes the STATS datagram), "RESET" zeroes them
 *   hb=A.B.C.D:P     send heartbeats there, from UDP port hb_sport (default 40001)
 *   hb_rate=R        heartbeats per second (default 10, at most 10000)
 *   hb_count=K       stop after K heartbeats (default 0: forever)
 *   quiet=1          no per-heartbeat console lines (default: every 100th)
 *   ping=A.B.C.D     send ICMP echo requests there, ping_count=N of them (default 5)
 *                    10 a second; prints "netecho: ping A.B.C.D: N sent, M answered"
 *   dirty=MiB        a writable working set (issue 11): a thread rewrites that many
 *                    MiB over and over, as dirtier does (every 8-byte word gets a
 *                    fresh counter value each pass, after checking it still holds
 *                    the previous pass's: a lost or mixed-up page prints
 *                    "netecho: dirty FAIL ..."), so one guest both heartbeats and
 *                    dirties memory during a live migration
 *   dirty_rate=R     at most R MiB/s (default 0: as fast as the vCPU goes); the
 *                    thread yields every 64 KiB, so the heartbeat and the echo
 *                    are served on time even at full speed
 *
 * A heartbeat's payload is one text line:
 *   "netecho-hb seq=<N> t_ns=<guest system time> wall=<unix s>.<ns>\n"
 * with N = 1, 2, ... and the guest's clock when it was sent.  A late
 * heartbeat is sent late, and the schedule goes on from it (no burst to
 * catch up); while the vif is not connected (unplugged, or a restored
 * domain reconnecting) the thread waits for it.  So the sequence numbers
 * have no gaps of our making: a receiver sees an outage (a migration's
 * downtime) as a gap in arrival times, and a lost datagram as a missing N.
 *
 * Console lines the tests wait for: "netecho: up ip=... mac=..." once the
 * vif is connected, "netecho: hb N" every 100th heartbeat.
 */
#include "app.h"
#include "netfront.h"
#include "xenbus.h"

const char app_name[] = "netecho";

#define ETH_ARP   0x0806
#define ETH_IPV4  0x0800
#define IPPROTO_ICMP 1
#define IPPROTO_UDP  17

static struct netfront_dev *nf;
static uint8_t my_mac[6];
static uint32_t my_ip;                  /* host byte order */
static unsigned int echo_port = 7, sink_port = 9;
static int quiet;

/* hb */
static uint32_t hb_ip;
static unsigned int hb_port, hb_sport = 40001;
static unsigned long hb_rate = 10, hb_count;

/* ping */
static uint32_t ping_ip;
static unsigned long ping_count = 5;
static volatile unsigned long ping_answered;
#define PING_ID 0x4e45

/* dirty */
static unsigned long dirty_mib, dirty_rate;

/* counters */
static unsigned long arp_replies, icmp_replies, udp_echoes, sink_count, ignored;
static uint64_t sink_first, sink_last;
static uint16_t ip_id;

/* a tiny ARP cache */
#define ARP_N 16
static struct { uint32_t ip; uint8_t mac[6]; int used; } arp_cache[ARP_N];
static unsigned int arp_next;
static struct waitq arp_wq = { .name = "netecho-arp", .poll_when_full = 1 };

static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static int parse_ip(const char *s, const char **end, uint32_t *ip)
{
    uint32_t v = 0;

    for (int i = 0; i < 4; i++) {
        const char *e;
        unsigned long b = simple_strtoul(s, &e, 10);
        if (e == s || b > 255)
            return -1;
        v = v << 8 | (uint32_t)b;
        s = e;
        if (i < 3) {
            if (*s != '.')
                return -1;
            s++;
        }
    }
    *ip = v;
    if (end)
        *end = s;
    return 0;
}

/* RFC 1071: the one's complement of the one's complement sum. */
static uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t n)
{
    while (n > 1) {
        sum += get16(p);
        p += 2;
        n -= 2;
    }
    if (n)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

static uint16_t csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static void arp_learn(uint32_t ip, const uint8_t *mac)
{
    unsigned long flags = irq_save();
    int slot = -1;

    for (int i = 0; i < ARP_N; i++)
        if (arp_cache[i].used && arp_cache[i].ip == ip)
            slot = i;
    if (slot < 0)
        slot = (int)(arp_next++ % ARP_N);
    arp_cache[slot].ip = ip;
    memcpy(arp_cache[slot].mac, mac, 6);
    arp_cache[slot].used = 1;
    irq_restore(flags);
    waitq_wake_all(&arp_wq);
}

static int arp_lookup(uint32_t ip, uint8_t *mac)
{
    for (int i = 0; i < ARP_N; i++)
        if (arp_cache[i].used && arp_cache[i].ip == ip) {
            memcpy(mac, arp_cache[i].mac, 6);
            return 1;
        }
    return 0;
}

static void send_frame(const uint8_t *f, size_t len)
{
    int rc = netfront_xmit(nf, f, len, monotonic_ns() + 100 * NSEC_PER_MSEC);
    if (rc && rc != -XEN_ENODEV)
        printk("netecho: xmit: %d\n", rc);
}

/* An ARP packet (op 1 request, 2 reply) to dst_mac (broadcast for a request). */
static void send_arp(uint16_t op, const uint8_t *dst_mac, const uint8_t *tha, uint32_t tpa)
{
    uint8_t f[60];

    memset(f, 0, sizeof(f));
    memcpy(f, dst_mac, 6);
    memcpy(f + 6, my_mac, 6);
    put16(f + 12, ETH_ARP);
    put16(f + 14, 1);               /* Ethernet */
    put16(f + 16, ETH_IPV4);
    f[18] = 6;
    f[19] = 4;
    put16(f + 20, op);
    memcpy(f + 22, my_mac, 6);
    put32(f + 28, my_ip);
    memcpy(f + 32, tha, 6);
    put32(f + 38, tpa);
    send_frame(f, sizeof(f));       /* padded to Ethernet's minimum */
}

static const uint8_t bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
static const uint8_t zero_mac[6];

static void handle_arp(const uint8_t *f, size_t len)
{
    const uint8_t *a = f + 14;
    uint32_t spa, tpa;

    if (len < 14 + 28 || get16(a) != 1 || get16(a + 2) != ETH_IPV4 || a[4] != 6 || a[5] != 4)
        return;
    spa = get32(a + 14);
    tpa = get32(a + 24);
    if (spa)
        arp_learn(spa, a + 8);
    if (get16(a + 6) == 1 && tpa == my_ip) {
        send_arp(2, a + 8, a + 8, spa);
        arp_replies++;
    }
}

/* Build an IPv4 header at f+14 for a payload of plen bytes (proto); returns the total frame length. */
static size_t ip_header(uint8_t *f, const uint8_t *dst_mac, uint32_t dst, uint8_t proto, size_t plen)
{
    uint8_t *ip = f + 14;

    memcpy(f, dst_mac, 6);
    memcpy(f + 6, my_mac, 6);
    put16(f + 12, ETH_IPV4);
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, (uint16_t)(20 + plen));
    put16(ip + 4, ip_id++);
    put16(ip + 6, 0x4000);          /* don't fragment */
    ip[8] = 64;
    ip[9] = proto;
    put16(ip + 10, 0);
    put32(ip + 12, my_ip);
    put32(ip + 16, dst);
    put16(ip + 10, csum_fold(csum_add(0, ip, 20)));
    return 14 + 20 + plen;
}

static size_t udp_build(uint8_t *f, const uint8_t *dst_mac, uint32_t dst, uint16_t sport,
                        uint16_t dport, const void *data, size_t n)
{
    uint8_t *u = f + 14 + 20;
    uint8_t pseudo[12];
    uint32_t sum;
    uint16_t c;

    memmove(u + 8, data, n);
    put16(u, sport);
    put16(u + 2, dport);
    put16(u + 4, (uint16_t)(8 + n));
    put16(u + 6, 0);
    put32(pseudo, my_ip);
    put32(pseudo + 4, dst);
    pseudo[8] = 0;
    pseudo[9] = IPPROTO_UDP;
    put16(pseudo + 10, (uint16_t)(8 + n));
    sum = csum_add(csum_add(0, pseudo, 12), u, 8 + n);
    c = csum_fold(sum);
    put16(u + 6, c ? c : 0xffff);
    return ip_header(f, dst_mac, dst, IPPROTO_UDP, 8 + n);
}

static uint8_t txf[NETFRONT_MAX_FRAME + 64];

static void handle_udp(const uint8_t *f, const uint8_t *ip, size_t ihl, size_t iplen)
{
    const uint8_t *u = ip + ihl;
    uint32_t src = get32(ip + 12);
    uint16_t sport, dport, ulen;
    const uint8_t *data;
    size_t n;

    if (iplen < ihl + 8)
        return;
    sport = get16(u);
    dport = get16(u + 2);
    ulen = get16(u + 4);
    if (ulen < 8 || ulen > iplen - ihl)
        return;
    data = u + 8;
    n = ulen - 8u;
    if (dport == echo_port) {
        size_t len;
        memcpy(txf + 14 + 20 + 8, data, n);
        len = udp_build(txf, f + 6, src, dport, sport, txf + 14 + 20 + 8, n);
        send_frame(txf, len);
        udp_echoes++;
    } else if (dport == sink_port) {
        uint64_t now = monotonic_ns();
        if (n >= 5 && !memcmp(data, "STATS", 5)) {
            char msg[256];
            struct netfront_stats st;
            int m;
            netfront_get_stats(nf, &st);
            m = snprintf(msg, sizeof(msg),
                         "netecho-stats count=%lu first_ns=%lu last_ns=%lu rx_packets=%lu "
                         "rx_dropped=%lu rx_errors=%lu tx_packets=%lu tx_errors=%lu events=%lu "
                         "notifies=%lu\n", sink_count, (unsigned long)sink_first,
                         (unsigned long)sink_last, st.rx_packets, st.rx_dropped, st.rx_errors,
                         st.tx_packets, st.tx_errors, st.events, st.notifies);
            printk("%s", msg);
            send_frame(txf, udp_build(txf, f + 6, src, dport, sport, msg, (size_t)m));
        } else if (n >= 5 && !memcmp(data, "RESET", 5)) {
            sink_count = 0;
            sink_first = sink_last = 0;
            send_frame(txf, udp_build(txf, f + 6, src, dport, sport, "netecho-reset\n", 14));
        } else {
            if (!sink_count)
                sink_first = now;
            sink_last = now;
            sink_count++;
        }
    } else {
        ignored++;
    }
}

static void handle_icmp(const uint8_t *f, const uint8_t *ip, size_t ihl, size_t iplen)
{
    const uint8_t *ic = ip + ihl;
    size_t n = iplen - ihl, len;
    uint8_t *o = txf + 14 + 20;

    if (n < 8 || ic[1] != 0)
        return;
    if (csum_fold(csum_add(0, ic, n)) != 0)
        return;                     /* a bad checksum: Linux drops it too */
    if (ic[0] == 0) {               /* an echo reply: one of our pings? */
        if (ping_ip && get32(ip + 12) == ping_ip && get16(ic + 4) == PING_ID)
            ping_answered++;
        return;
    }
    if (ic[0] != 8)
        return;
    memcpy(o, ic, n);
    o[0] = 0;                       /* echo reply */
    put16(o + 2, 0);
    put16(o + 2, csum_fold(csum_add(0, o, n)));
    len = ip_header(txf, f + 6, get32(ip + 12), IPPROTO_ICMP, n);
    send_frame(txf, len);
    icmp_replies++;
}

static void handle_ipv4(const uint8_t *f, size_t len)
{
    const uint8_t *ip = f + 14;
    size_t ihl, iplen;

    if (len < 14 + 20 || (ip[0] >> 4) != 4)
        return;
    ihl = (size_t)(ip[0] & 15) * 4;
    iplen = get16(ip + 2);
    if (ihl < 20 || iplen < ihl || iplen > len - 14)
        return;
    if (csum_fold(csum_add(0, ip, ihl)) != 0)
        return;
    if (get32(ip + 16) != my_ip)
        return;
    if (get16(ip + 6) & 0x3fff)
        return;                     /* a fragment: we do not reassemble */
    if (ip[9] == IPPROTO_ICMP)
        handle_icmp(f, ip, ihl, iplen);
    else if (ip[9] == IPPROTO_UDP)
        handle_udp(f, ip, ihl, iplen);
    else
        ignored++;
}

/* ---------------------------------------------------------------- heartbeat */

static void resolve(uint32_t ip, uint8_t *mac);

static void hb_thread(void *arg)
{
    uint8_t mac[6], *f;
    uint64_t next, period = NSEC_PER_SEC / hb_rate, t;
    char msg[128];

    (void)arg;
    f = alloc_page();
    if (!f) {
        printk("netecho: hb: no memory\n");
        return;
    }
    resolve(hb_ip, mac);        /* an ARP request every 200 ms until it is answered */
    printk("netecho: hb to %u.%u.%u.%u:%u at %lu/s\n", hb_ip >> 24, (hb_ip >> 16) & 255,
           (hb_ip >> 8) & 255, hb_ip & 255, hb_port, hb_rate);
    next = monotonic_ns();
    for (unsigned long seq = 1; !hb_count || seq <= hb_count; seq++) {
        uint64_t sec;
        uint32_t nsec;
        int m;

        sleep_until(next);
        while (!netfront_connected(nf))         /* (unplugged, or restored and reconnecting) */
            netfront_wait_connected(nf, monotonic_ns() + NSEC_PER_SEC);
        t = monotonic_ns();
        next += period;
        if (next <= t)
            next = t + period;  /* late (suspended, disconnected): no burst to catch up */
        wallclock(&sec, &nsec);
        m = snprintf(msg, sizeof(msg), "netecho-hb seq=%lu t_ns=%lu wall=%lu.%09u\n", seq,
                     (unsigned long)t, (unsigned long)sec, nsec);
        arp_lookup(hb_ip, mac);     /* (a newer answer may have replaced it) */
        send_frame(f, udp_build(f, mac, hb_ip, (uint16_t)hb_sport, (uint16_t)hb_port, msg,
                                (size_t)m));
        if (!quiet && seq % 100 == 0)
            printk("netecho: hb %lu\n", seq);
    }
    printk("netecho: hb done\n");
}

/* ---------------------------------------------------------------- ping */

static void resolve(uint32_t ip, uint8_t *mac)
{
    while (!arp_lookup(ip, mac)) {
        send_arp(1, bcast, zero_mac, ip);
        sleep_until(monotonic_ns() + 200 * NSEC_PER_MSEC);
    }
}

static void ping_thread(void *arg)
{
    uint8_t mac[6], *f = alloc_page();
    uint64_t next;

    (void)arg;
    if (!f) {
        printk("netecho: ping: no memory\n");
        return;
    }
    resolve(ping_ip, mac);
    next = monotonic_ns();
    for (unsigned long seq = 1; seq <= ping_count; seq++) {
        uint8_t *ic = f + 14 + 20;
        sleep_until(next);
        next += 100 * NSEC_PER_MSEC;
        ic[0] = 8;
        ic[1] = 0;
        put16(ic + 2, 0);
        put16(ic + 4, PING_ID);
        put16(ic + 6, (uint16_t)seq);
        for (int i = 0; i < 56; i++)
            ic[8 + i] = (uint8_t)(i + seq);
        put16(ic + 2, csum_fold(csum_add(0, ic, 64)));
        send_frame(f, ip_header(f, mac, ping_ip, IPPROTO_ICMP, 64));
    }
    sleep_until(monotonic_ns() + NSEC_PER_SEC);     /* the last answers */
    printk("netecho: ping %u.%u.%u.%u: %lu sent, %lu answered\n", ping_ip >> 24,
           (ping_ip >> 16) & 255, (ping_ip >> 8) & 255, ping_ip & 255, ping_count, ping_answered);
}

/* ---------------------------------------------------------------- dirty */

/*
 * The writable working set.  Threads here are cooperative: this one calls
 * schedule() after each 64 KiB chunk (schedule() wakes sleepers whose time
 * has come, so the heartbeat thread runs within a chunk's time of its
 * deadline even though the vCPU never idles).  Console lines: "netecho:
 * dirty pass N done ns=T" for passes 1 and 2 and every 100th (a test waits
 * for pass 2: the whole set written and checked once).
 */
static void dirty_thread(void *arg)
{
    unsigned long pages = dirty_mib * 256, chunk_words = 16 * (PAGE_SIZE / sizeof(uint64_t));
    unsigned long words = pages * (PAGE_SIZE / sizeof(uint64_t));
    volatile uint64_t *mem = alloc_pages(pages);
    uint64_t counter = 0;

    (void)arg;
    if (!mem) {
        printk("netecho: dirty: cannot allocate %lu MiB (%lu pages free)\n", dirty_mib,
               mm_free_pages());
        return;
    }
    printk("netecho: dirty mib=%lu rate=%lu MiB/s buffer=%p\n", dirty_mib, dirty_rate, (void *)mem);
    for (unsigned long pass = 1;; pass++) {
        /* the rate's schedule restarts each pass (bytes * 1e9 stays in 64 bits) */
        uint64_t t0 = monotonic_ns(), first = counter - words + 1, done_bytes = 0;

        for (unsigned long c = 0; c < words; c += chunk_words) {
            unsigned long end = c + chunk_words < words ? c + chunk_words : words;
            for (unsigned long i = c; i < end; i++) {
                if (pass > 1 && mem[i] != first + i) {
                    printk("netecho: dirty FAIL word %lu (page %lu) holds %lu, expected %lu\n", i,
                           i / (PAGE_SIZE / sizeof(uint64_t)), (unsigned long)mem[i],
                           (unsigned long)(first + i));
                    return;
                }
                mem[i] = ++counter;
            }
            done_bytes += (end - c) * sizeof(uint64_t);
            if (dirty_rate) {
                /* ahead of R MiB/s: sleep until the schedule catches up */
                uint64_t due = t0 + done_bytes * NSEC_PER_SEC / (dirty_rate << 20);
                if (due > monotonic_ns())
                    sleep_until(due);
                else
                    schedule();
            } else {
                schedule();
            }
        }
        if (pass <= 2 || pass % 100 == 0)
            printk("netecho: dirty pass %lu done ns=%lu\n", pass,
                   (unsigned long)(monotonic_ns() - t0));
    }
}

/* ---------------------------------------------------------------- main */

int app_main(const char *cmdline)
{
    static uint8_t rxf[PAGE_SIZE];
    struct netfront_stats st;
    unsigned long connects;
    uint64_t deadline = 0;
    char buf[64];
    int err, n, mac_given = 0;

    if (cmdline_get_str(cmdline, "ip", buf, sizeof(buf)) <= 0 || parse_ip(buf, NULL, &my_ip))
        app_fail("need ip=A.B.C.D on the command line (got \"%s\")", cmdline);
    echo_port = (unsigned int)cmdline_get_ulong(cmdline, "port", 7);
    sink_port = (unsigned int)cmdline_get_ulong(cmdline, "sink", 9);
    quiet = (int)cmdline_get_ulong(cmdline, "quiet", 0);
    if (cmdline_get_str(cmdline, "hb", buf, sizeof(buf)) > 0) {
        const char *e;
        if (parse_ip(buf, &e, &hb_ip) || *e != ':')
            app_fail("hb=%s: want A.B.C.D:PORT", buf);
        hb_port = (unsigned int)simple_strtoul(e + 1, &e, 10);
        if (*e || !hb_port || hb_port > 65535)
            app_fail("hb=%s: bad port", buf);
        hb_rate = cmdline_get_ulong(cmdline, "hb_rate", 10);
        if (!hb_rate || hb_rate > 10000)
            app_fail("hb_rate=%lu: want 1..10000 per second", hb_rate);
        hb_count = cmdline_get_ulong(cmdline, "hb_count", 0);
        hb_sport = (unsigned int)cmdline_get_ulong(cmdline, "hb_sport", 40001);
    }

    if (cmdline_get_str(cmdline, "ping", buf, sizeof(buf)) > 0) {
        const char *e;
        if (parse_ip(buf, &e, &ping_ip) || *e)
            app_fail("ping=%s: want A.B.C.D", buf);
        ping_count = cmdline_get_ulong(cmdline, "ping_count", 5);
    }
    dirty_mib = cmdline_get_ulong(cmdline, "dirty", 0);
    dirty_rate = cmdline_get_ulong(cmdline, "dirty_rate", 0);
    if (dirty_mib > (1UL << 20) || dirty_rate > (1UL << 30))
        app_fail("dirty=%lu dirty_rate=%lu: out of range", dirty_mib, dirty_rate);

    nf = netfront_open(cmdline_find(cmdline, "vif", NULL) ? (int)cmdline_get_ulong(cmdline, "vif", 0)
                       : -1, 60 * NSEC_PER_SEC, &err);
    if (!nf)
        app_fail("no network interface (%d)", err);
    memcpy(my_mac, netfront_mac(nf), 6);
    if (cmdline_get_str(cmdline, "mac", buf, sizeof(buf)) > 0) {
        if (netfront_parse_mac(buf, my_mac))
            app_fail("mac=%s: want xx:xx:xx:xx:xx:xx", buf);
        mac_given = 1;
    }
    printk("netecho: up ip=%u.%u.%u.%u mac=%02x:%02x:%02x:%02x:%02x:%02x port=%u sink=%u\n",
           my_ip >> 24, (my_ip >> 16) & 255, (my_ip >> 8) & 255, my_ip & 255, my_mac[0],
           my_mac[1], my_mac[2], my_mac[3], my_mac[4], my_mac[5], echo_port, sink_port);
    /* A gratuitous ARP: the bridge learns where we are before anyone asks. */
    send_arp(1, bcast, zero_mac, my_ip);
    if (hb_port && !create_thread("netecho-hb", hb_thread, NULL))
        app_fail("cannot create the heartbeat thread");
    if (ping_ip && !create_thread("netecho-ping", ping_thread, NULL))
        app_fail("cannot create the ping thread");
    if (dirty_mib && !create_thread("netecho-dirty", dirty_thread, NULL))
        app_fail("cannot create the dirtying thread");

    netfront_get_stats(nf, &st);
    connects = st.connects;
    for (;;) {
        /* A deadline that moves once a second, not at every frame: each new
         * one would cost a set_timer_op (an exit) on the way to sleep. */
        if (monotonic_ns() >= deadline)
            deadline = monotonic_ns() + NSEC_PER_SEC;
        n = netfront_recv(nf, rxf, sizeof(rxf), deadline);
        netfront_get_stats(nf, &st);
        if (st.connects != connects && netfront_connected(nf)) {
            /* A new connection (the vif was plugged again, or we were restored
             * elsewhere): its MAC may be new, and the bridge must learn where we are. */
            connects = st.connects;
            if (!mac_given)
                memcpy(my_mac, netfront_mac(nf), 6);
            printk("netecho: reconnected (%lu) mac=%02x:%02x:%02x:%02x:%02x:%02x\n", connects,
                   my_mac[0], my_mac[1], my_mac[2], my_mac[3], my_mac[4], my_mac[5]);
            send_arp(1, bcast, zero_mac, my_ip);
        }
        if (n < 14)
            continue;
        if (memcmp(rxf, my_mac, 6) && memcmp(rxf, bcast, 6))
            continue;
        switch (get16(rxf + 12)) {
        case ETH_ARP:
            handle_arp(rxf, (size_t)n);
            break;
        case ETH_IPV4:
            handle_ipv4(rxf, (size_t)n);
            break;
        default:
            ignored++;
            break;
        }
    }
}
