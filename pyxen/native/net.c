/*
 * netback's data path (pyxen/backends/netback.py): one round of TX (guest
 * frames off the TX ring into the TAP) or RX (frames from the TAP into the
 * buffers the frontend posted), called by the vif's Python service thread
 * with the GIL released.  Python keeps xenstore, connection, events and the
 * thread; the rules are the same as pyxen/backends/netif.py's (Linux
 * netback's, see docs/netback.md) and the tests run both paths.
 *
 * Facts from Xen's io/netif.h (netif_tx_request 12 bytes: gref, offset,
 * flags, id, size; netif_rx_request: id, pad, gref; netif_rx_response: id,
 * offset, flags, status; netif_extra_info 8 bytes), io/ring.h (indexes,
 * event suppression) and Linux's include/uapi/linux/virtio_net.h.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "native.h"

#define PAGE 4096u
#define ETH_HLEN 14u
#define NSLOTS 256u /* one-page rings: (4096 - 64) / 12 and / 8, rounded down to a power of 2 */
#define HDR 64u

#define TXF_CSUM_BLANK 1u
#define TXF_DATA_VALIDATED 2u
#define TXF_MORE_DATA 4u
#define TXF_EXTRA_INFO 8u
#define RXF_DATA_VALIDATED 1u
#define RXF_CSUM_BLANK 2u
#define RXF_MORE_DATA 4u
#define RXF_EXTRA_INFO 8u
#define EXTRA_GSO 1u
#define EXTRA_MCAST_ADD 2u
#define EXTRA_MCAST_DEL 3u
#define EXTRA_MAX 5u
#define EXTRA_FLAG_MORE 1u
#define GSO_TCPV4 1u
#define GSO_TCPV6 2u
#define RSP_ERROR (-1)
#define RSP_OKAY 0
#define RSP_NULL 1
#define NR_SLOTS_MIN 18
#define FATAL_SKB_SLOTS 20
#define MAX_DATA (1 + FATAL_SKB_SLOTS + 1)

#define VNET_NEEDS_CSUM 1u
#define VNET_DATA_VALID 2u
#define VNET_GSO_TCPV4 1u
#define VNET_GSO_TCPV6 4u
#define VNET_GSO_ECN 0x80u
#define VNET_LEN 10u

/* pxn_*_round result bits */
#define PXN_NOTIFY 1
#define PXN_MORE 2
#define PXN_FATAL 4
#define PXN_STALLED 8
#define PXN_WORK 16     /* the round took requests (pxn_serve's TX polling) */

/* pxn_stats order (netback.py _NATIVE_STATS) */
enum { S_TXP, S_TXB, S_TXDROP, S_TXERR, S_RXP, S_RXB, S_RXDROP, S_RXERR, S_TXEV, S_RXEV, S_N };

#define F_CSUM 1
#define F_IPV6_CSUM 2
#define F_GSO4 4
#define F_GSO6 8
#define F_SG 16

struct pxn {
    struct pxg *g;
    uint8_t *tx, *rx;  /* the shared rings */
    int tap;
    uint16_t me;
    int feat;
    int stop;          /* pxn_stop: pxn_serve returns */
    int tx_noarm;      /* pxn_serve polls the TX ring: an empty round leaves req_event alone */
    uint32_t tx_cons, tx_pvt, rx_cons, rx_pvt;
    uint8_t *txbuf;    /* VNET_LEN + 64 KiB */
    uint8_t *rxbuf;    /* a frame read from the TAP, VNET_LEN first */
    int rx_len;        /* > 0: a frame waits for buffers */
    int rx_ready;      /* ... and rx_prepare made it fit (the fields below) */
    uint8_t rx_fl, rx_gtype;
    uint16_t rx_gsize;
    uint64_t st[S_N];
    char msg[160];
};

struct txreq { uint32_t gref; uint16_t offset, flags, id, size; };

static inline uint32_t rd32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }
static inline void wr32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE); }
static inline uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

#define RXBUF (VNET_LEN + 65536u + 64u)

struct pxn *pxn_new(struct pxg *g, uint8_t *tx, uint8_t *rx, int tap, uint16_t me, int feat)
{
    struct pxn *n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->txbuf = malloc(VNET_LEN + 65536u + PAGE);
    n->rxbuf = malloc(RXBUF);
    if (!n->txbuf || !n->rxbuf) {
        free(n->txbuf);
        free(n->rxbuf);
        free(n);
        return NULL;
    }
    n->g = g, n->tx = tx, n->rx = rx, n->tap = tap, n->me = me, n->feat = feat;
    n->tx_pvt = n->tx_cons = rd32(tx + 8);  /* nothing outstanding at attach */
    n->rx_pvt = n->rx_cons = rd32(rx + 8);
    return n;
}

void pxn_free(struct pxn *n)
{
    if (!n)
        return;
    free(n->txbuf);
    free(n->rxbuf);
    free(n);
}

void pxn_stats(struct pxn *n, uint64_t *out, int k)
{
    for (int i = 0; i < k && i < S_N; i++)
        out[i] = n->st[i];
}

const char *pxn_msg(struct pxn *n) { return n->msg; }

/* Requests queued and not taken; -1 when the producer ran more than a ring ahead. */
static int unconsumed(uint8_t *ring, uint32_t cons, uint32_t pvt)
{
    uint32_t n = rd32(ring) - cons;
    if (n > NSLOTS)
        return -1;
    uint32_t room = NSLOTS - (cons - pvt);
    return (int)(n < room ? n : room);
}

/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY */
static int push(uint8_t *ring, uint32_t pvt)
{
    uint32_t old = rd32(ring + 8);
    wr32(ring + 8, pvt);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t ev = rd32(ring + 12);
    return (uint32_t)(pvt - ev) < (uint32_t)(pvt - old);
}

static void txslot(struct pxn *n, uint32_t idx, uint8_t out[12])
{
    const uint8_t *s = n->tx + HDR + (idx % NSLOTS) * 12u;
    for (int i = 0; i < 12; i++)  /* a copy: the guest may rewrite the slot meanwhile */
        out[i] = __atomic_load_n(s + i, __ATOMIC_RELAXED);
}

static struct txreq txparse(const uint8_t r[12])
{
    struct txreq t;
    memcpy(&t.gref, r, 4);
    t.offset = get16(r + 4), t.flags = get16(r + 6), t.id = get16(r + 8), t.size = get16(r + 10);
    return t;
}

static void txrsp(struct pxn *n, int id, int16_t st)
{
    uint8_t *s = n->tx + HDR + (n->tx_pvt % NSLOTS) * 12u;
    if (id >= 0)
        memcpy(s, &(uint16_t){(uint16_t)id}, 2);
    memcpy(s + 2, &st, 2);
    n->tx_pvt++;
}

/* A packet's responses in ring order: the first slot, RSP_NULL for each extra
 * (status only), then each follow-on slot. */
static void txrsps(struct pxn *n, const struct txreq *d, int nd, int extras, const int16_t *status)
{
    txrsp(n, d[0].id, status[0]);
    for (int e = 0; e < extras; e++)
        txrsp(n, -1, RSP_NULL);
    for (int k = 1; k < nd; k++)
        txrsp(n, d[k].id, status[k]);
}

/* skb_checksum_setup's search: where a partial TCP/UDP checksum goes. */
static int csum_place(const uint8_t *f, uint32_t len, uint32_t *start, uint32_t *off, int *proto)
{
    uint32_t o = ETH_HLEN, st;
    int p;
    if (len < ETH_HLEN)
        return -1;
    uint16_t et = be16(f + 12);
    if (et == 0x0800) {
        if (len < o + 20 || f[o] >> 4 != 4)
            return -1;
        uint32_t ihl = (f[o] & 0xFu) * 4u;
        if (ihl < 20 || (be16(f + o + 6) & 0x3FFF))
            return -1;
        p = f[o + 9];
        st = o + ihl;
    } else if (et == 0x86DD) {
        if (len < o + 40 || f[o] >> 4 != 6)
            return -1;
        p = f[o + 6];
        st = o + 40;
        for (int i = 0; i < 8 && (p == 0 || p == 43 || p == 60); i++) {
            if (len < st + 8)
                return -1;
            p = f[st];
            st += (f[st + 1] + 1u) * 8u;
        }
    } else {
        return -1;
    }
    uint32_t at = p == 6 ? 16 : p == 17 ? 6 : 0;
    if (!at || len < st + at + 2)
        return -1;
    *start = st, *off = at, *proto = p;
    return 0;
}

static uint16_t inet_csum(const uint8_t *d, uint32_t len)
{
    uint64_t s = 0;
    uint32_t i;
    for (i = 0; i + 1 < len; i += 2)
        s += be16(d + i);
    if (len & 1)
        s += (uint32_t)d[len - 1] << 8;
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (uint16_t)~s;
}

/* One TX round: up to budget packets; PXN_* bits. */
int pxn_tx_round(struct pxn *n, int budget)
{
    int sent = 0, res = 0;
    struct txreq d[MAX_DATA];
    while (sent < budget) {
        int avail = unconsumed(n->tx, n->tx_cons, n->tx_pvt);
        if (avail < 0) {
            snprintf(n->msg, sizeof(n->msg), "request producer ran more than a ring ahead of %u", n->tx_cons);
            return res | PXN_FATAL;
        }
        if (avail == 0) {
            if (n->tx_noarm)
                break;  /* pxn_serve arms it once the ring stayed empty for a while */
            wr32(n->tx + 4, n->tx_cons + 1);  /* RING_FINAL_CHECK_FOR_REQUESTS */
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (unconsumed(n->tx, n->tx_cons, n->tx_pvt) != 0)
                continue;
            break;
        }
        uint8_t raw[12];
        txslot(n, n->tx_cons, raw);
        struct txreq first = txparse(raw);
        int i = 1, extras = 0, control = 0;
        const char *drop = NULL;
        uint16_t gso_size = 0;
        uint8_t gso_type = 0;
        int has_gso = 0;
        if (first.flags & TXF_EXTRA_INFO) {
            for (;;) {
                if (i >= avail) {
                    snprintf(n->msg, sizeof(n->msg), "missing extra info");
                    return res | PXN_FATAL;
                }
                txslot(n, n->tx_cons + i, raw);
                i++, extras++;
                uint8_t type = raw[0], fl = raw[1];
                if (type == 0 || type >= EXTRA_MAX) {
                    snprintf(n->msg, sizeof(n->msg), "invalid extra type %u", type);
                    return res | PXN_FATAL;
                }
                if (type == EXTRA_GSO)
                    gso_size = get16(raw + 2), gso_type = raw[4], has_gso = 1;
                if (type == EXTRA_MCAST_ADD || type == EXTRA_MCAST_DEL)
                    control = 1;
                if (!(fl & EXTRA_FLAG_MORE))
                    break;
            }
        }
        int nd = 1;
        uint16_t remaining = first.size;
        if (!control && (first.flags & TXF_MORE_DATA)) {
            int work = avail - i, k = 0;
            for (;;) {
                if (k >= work) {
                    snprintf(n->msg, sizeof(n->msg), "asked for %d slots but only %d are queued", k + 1, work);
                    return res | PXN_FATAL;
                }
                if (k >= FATAL_SKB_SLOTS) {
                    snprintf(n->msg, sizeof(n->msg), "malicious frontend using %d slots", k);
                    return res | PXN_FATAL;
                }
                if (!drop && k >= NR_SLOTS_MIN)
                    drop = "too many slots";
                txslot(n, n->tx_cons + i + k, raw);
                struct txreq t = txparse(raw);
                if (!drop && t.size > remaining)
                    drop = "slot size > remaining";
                remaining = (uint16_t)(remaining - t.size);
                k++;
                if ((uint32_t)t.offset + t.size > PAGE) {
                    snprintf(n->msg, sizeof(n->msg), "slot crosses a page: offset %u, size %u", t.offset, t.size);
                    return res | PXN_FATAL;
                }
                d[nd++] = t;
                if (!(t.flags & TXF_MORE_DATA))
                    break;
            }
            i += k;
        }
        d[0] = first;
        d[0].size = remaining;
        if (!drop && !control) {
            if (remaining < ETH_HLEN) {
                drop = "bad packet size";
            } else if ((uint32_t)first.offset + remaining > PAGE) {
                snprintf(n->msg, sizeof(n->msg), "first slot crosses a page: offset %u, size %u",
                         first.offset, remaining);
                return res | PXN_FATAL;
            } else if (has_gso) {
                if (!gso_size) {
                    snprintf(n->msg, sizeof(n->msg), "GSO size must not be zero");
                    return res | PXN_FATAL;
                }
                if (gso_type != GSO_TCPV4 && gso_type != GSO_TCPV6) {
                    snprintf(n->msg, sizeof(n->msg), "bad GSO type %u", gso_type);
                    return res | PXN_FATAL;
                }
            }
        }
        n->tx_cons += (uint32_t)i;
        sent++;
        int16_t status[MAX_DATA];
        if (drop || control) {
            if (drop)
                n->st[S_TXDROP]++;
            for (int k = 0; k < nd; k++)
                status[k] = drop ? RSP_ERROR : RSP_OKAY;
            txrsps(n, d, nd, extras, status);
            continue;
        }
        /* copy the frame out of the granted pages */
        int bad = 0;
        uint32_t pos = 0;
        uint8_t *frame = n->txbuf + VNET_LEN;
        for (int k = 0; k < nd; k++) {
            if (pos + d[k].size > 65536u) {  /* cannot happen (the sizes add up to a u16), but never overrun */
                status[k] = RSP_ERROR, bad = 1;
                continue;
            }
            int64_t off = pxg_acquire(n->g, d[k].gref, n->me, 0);
            if (off < 0) {
                status[k] = RSP_ERROR, bad = 1;
                continue;
            }
            memcpy(frame + pos, n->g->ram + off + d[k].offset, d[k].size);
            pxg_release(n->g, d[k].gref);
            pos += d[k].size;
            status[k] = RSP_OKAY;
        }
        if (bad) {
            n->st[S_TXERR]++;
        } else {
            uint8_t *h = n->txbuf;
            uint32_t cs = 0, co = 0;
            int proto = 0, ok = 1;
            memset(h, 0, VNET_LEN);
            if ((first.flags & TXF_CSUM_BLANK) || gso_size) {
                if (csum_place(frame, pos, &cs, &co, &proto) != 0 || (gso_size && proto != 6)) {
                    ok = 0;
                } else {
                    h[0] = VNET_NEEDS_CSUM;
                    if (gso_size) {
                        uint16_t hl = (uint16_t)(cs + (frame[cs + 12] >> 4) * 4u);
                        h[1] = gso_type == GSO_TCPV4 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6;
                        memcpy(h + 2, &hl, 2);
                        memcpy(h + 4, &gso_size, 2);
                    }
                    memcpy(h + 6, &(uint16_t){(uint16_t)cs}, 2);
                    memcpy(h + 8, &(uint16_t){(uint16_t)co}, 2);
                }
            } else if (first.flags & TXF_DATA_VALIDATED) {
                h[0] = VNET_DATA_VALID;
            }
            if (!ok) {
                n->st[S_TXDROP]++;  /* "Can't setup checksum": dropped, answered OKAY */
            } else if (write(n->tap, n->txbuf, VNET_LEN + pos) < 0) {
                n->st[S_TXERR]++;
            } else {
                n->st[S_TXP]++;
                n->st[S_TXB] += pos;
            }
        }
        txrsps(n, d, nd, extras, status);
    }
    if (sent && push(n->tx, n->tx_pvt))
        res |= PXN_NOTIFY;
    if (sent >= budget)
        res |= PXN_MORE;
    if (sent)
        res |= PXN_WORK;
    return res;
}

/* RING_FINAL_CHECK_FOR_REQUESTS on the TX ring: 1 if requests came meanwhile. */
static int tx_arm(struct pxn *n)
{
    wr32(n->tx + 4, n->tx_cons + 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return unconsumed(n->tx, n->tx_cons, n->tx_pvt) != 0;
}

/* Make a frame just read fit for the frontend; 0 = keep it, -1 = drop it. */
static int rx_prepare(struct pxn *n)
{
    uint8_t *fl = &n->rx_fl, *gtype = &n->rx_gtype;
    uint16_t *gsize = &n->rx_gsize;
    uint8_t *h = n->rxbuf, *f = h + VNET_LEN;
    uint32_t len = (uint32_t)n->rx_len - VNET_LEN;
    uint8_t g = h[1] & (uint8_t)~VNET_GSO_ECN;
    *fl = 0, *gtype = 0, *gsize = 0;
    if ((h[1] & VNET_GSO_ECN) || (g != 0 && g != VNET_GSO_TCPV4 && g != VNET_GSO_TCPV6))
        return -1;
    if (g == VNET_GSO_TCPV4) {
        if (!(n->feat & F_GSO4))
            return -1;
        *gtype = GSO_TCPV4;
    } else if (g == VNET_GSO_TCPV6) {
        if (!(n->feat & F_GSO6))
            return -1;
        *gtype = GSO_TCPV6;
    }
    if (*gtype)
        *gsize = get16(h + 4);
    if (len > PAGE && !(n->feat & F_SG))
        return -1;
    if (h[0] & VNET_NEEDS_CSUM) {
        int v6 = len >= ETH_HLEN && be16(f + 12) == 0x86DD;
        if (!(n->feat & F_CSUM) || (v6 && !(n->feat & F_IPV6_CSUM))) {
            uint16_t st = get16(h + 6), off = get16(h + 8);
            if ((uint32_t)st + off + 2 <= len) {
                uint16_t c = inet_csum(f + st, len - st);
                if (c == 0 && off == 6)
                    c = 0xFFFF;
                f[st + off] = (uint8_t)(c >> 8), f[st + off + 1] = (uint8_t)c;
            }
            *fl = RXF_DATA_VALIDATED;
        } else {
            *fl = RXF_CSUM_BLANK | RXF_DATA_VALIDATED;
        }
    } else if (h[0] & VNET_DATA_VALID) {
        *fl = RXF_DATA_VALIDATED;
    }
    return 0;
}

static void rxrsp(struct pxn *n, const uint8_t r[8])
{
    memcpy(n->rx + HDR + (n->rx_pvt % NSLOTS) * 8u, r, 8);
    n->rx_pvt++;
}

/* One RX round: up to budget frames from the TAP; PXN_* bits. */
int pxn_rx_round(struct pxn *n, int budget)
{
    int done = 0, res = 0;
    while (done < budget) {
        if (n->rx_len <= 0) {
            ssize_t r = read(n->tap, n->rxbuf, RXBUF);
            if (r < 0)
                break;  /* EAGAIN (or the TAP is going) */
            if (r < (ssize_t)(VNET_LEN + ETH_HLEN))
                continue;
            n->rx_len = (int)r;
            n->rx_ready = 0;
        }
        if (!n->rx_ready) {
            if (rx_prepare(n) != 0) {
                n->st[S_RXDROP]++;
                n->rx_len = 0;
                continue;
            }
            n->rx_ready = 1;
        }
        uint8_t fl = n->rx_fl, gtype = n->rx_gtype;
        uint16_t gsize = n->rx_gsize;
        uint32_t len = (uint32_t)n->rx_len - VNET_LEN;
        int need = (int)((len + PAGE - 1) / PAGE) + (gtype ? 1 : 0);
        int avail = unconsumed(n->rx, n->rx_cons, n->rx_pvt);
        if (avail < 0) {
            snprintf(n->msg, sizeof(n->msg), "rx request producer ran more than a ring ahead of %u",
                     n->rx_cons);
            return res | PXN_FATAL;
        }
        if (avail < need) {
            wr32(n->rx + 4, n->rx_cons + (uint32_t)need);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            avail = unconsumed(n->rx, n->rx_cons, n->rx_pvt);
            if (avail < need) {
                res |= PXN_STALLED;
                break;
            }
        }
        const uint8_t *f = n->rxbuf + VNET_LEN;
        uint32_t pos = 0;
        int slot = 0, err = 0;
        while (pos < len || slot == 0 || (gtype && slot == 1)) {
            const uint8_t *q = n->rx + HDR + (n->rx_cons % NSLOTS) * 8u;
            uint16_t id = __atomic_load_n((const uint16_t *)q, __ATOMIC_RELAXED);
            uint32_t gref = __atomic_load_n((const uint32_t *)(q + 4), __ATOMIC_RELAXED);
            n->rx_cons++;
            uint8_t rsp[8];
            if (slot == 1 && gtype) {  /* the GSO extra, right after the first data slot */
                memset(rsp, 0, 8);
                rsp[0] = EXTRA_GSO;
                memcpy(rsp + 2, &gsize, 2);
                rsp[4] = gtype;
                rxrsp(n, rsp);
                slot++;
                continue;
            }
            uint32_t chunk = len - pos < PAGE ? len - pos : PAGE;
            uint16_t flags = pos + chunk < len ? RXF_MORE_DATA : 0;
            if (slot == 0)
                flags |= fl | (gtype ? RXF_EXTRA_INFO : 0);
            int16_t st = (int16_t)chunk;
            int64_t off = pxg_acquire(n->g, gref, n->me, 1);
            if (off < 0) {
                st = RSP_ERROR, err = 1;
            } else {
                memcpy(n->g->ram + off, f + pos, chunk);
                pxg_mark_dirty(n->g, (uint64_t)off >> 12);
                pxg_release(n->g, gref);
            }
            memcpy(rsp, &id, 2);
            memset(rsp + 2, 0, 2);
            memcpy(rsp + 4, &flags, 2);
            memcpy(rsp + 6, &st, 2);
            rxrsp(n, rsp);
            pos += chunk;
            slot++;
        }
        if (err) {
            n->st[S_RXERR]++;
        } else {
            n->st[S_RXP]++;
            n->st[S_RXB] += len;
        }
        n->rx_len = 0;
        n->rx_ready = 0;
        done++;
    }
    if (done && push(n->rx, n->rx_pvt))
        res |= PXN_NOTIFY;
    if (done >= budget)
        res |= PXN_MORE;
    return res;
}

/* Ask pxn_serve to return (the caller then wakes it through its up_fd). */
void pxn_stop(struct pxn *n)
{
    __atomic_store_n(&n->stop, 1, __ATOMIC_SEQ_CST);
}

static void efd_signal(int fd)
{
    uint64_t one = 1;
    ssize_t r;
    do
        r = write(fd, &one, sizeof(one));
    while (r < 0 && errno == EINTR);
}

/* TX polling: how often pxn_serve looks at an unarmed TX ring */
#define TX_POLL_STEP_NS 30000

static int64_t mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/*
 * The vif's service loop in C: sleep on up_fd (the guest's events, posted by
 * Python's evtchn callback) and the TAP, run a TX and an RX round, and signal
 * the guest by writing the eventfd the domain's native event hub (evt.c)
 * watches for that port -- no Python and no GIL per packet or per event.
 *
 * RX interrupt coalescing (coalesce_us > 0): an RX event the frontend asked
 * for (rsp_event crossed: owed from then on, whatever later pushes say) is
 * held while frames keep coming, for at most coalesce_us or 8 frames, and
 * sent at once when the ring runs out of buffers (the frontend must run to
 * post more) or when the frames are small (ACKs: holding them slows the
 * guest's own sending).  Each event costs the guest three exits (a kick, its iret, often
 * a forced callback), ~200 us here, so fewer events leave it more time for
 * the frames themselves.
 *
 * TX completion coalescing (tx_coalesce_us > 0): Linux's netfront asks for
 * an event after every TX response it reaps (rsp_event = rsp_cons + 1), so
 * each TX round would cost the guest an upcall; the owed TX event is held
 * for at most tx_coalesce_us, sent at once together with an RX event (one
 * upcall serves both ports) and when half the ring is outstanding (the
 * frontend may be about to stop its queue).  Netfront also reaps responses
 * on its own at each transmit, so held events delay nothing it waits for
 * in a steady stream.
 *
 * Returns after max_ms (so that Python's locks are released now and then),
 * at pxn_stop, or with PXN_FATAL (the message in pxn_msg).  rx_notify = 0:
 * the frontend never says it posted RX buffers, poll every 10 ms while stalled.
 */
int pxn_serve(struct pxn *n, int up_fd, int tx_efd, int rx_efd, int budget, int rx_notify, int max_ms,
              int coalesce_us, int tx_poll_us, int tx_coalesce_us)
{
    int64_t end = mono_ns() + (int64_t)max_ms * 1000000, owed_at = 0, tx_idle_at = mono_ns(), tx_owed_at = 0;
    int busy = 1, stalled = 0, owed = 0, tx_owed = 0, tx_armed = tx_poll_us <= 0;
    uint64_t owed_frames = 0;
    n->tx_noarm = tx_poll_us > 0;
    while (!__atomic_load_n(&n->stop, __ATOMIC_SEQ_CST)) {
        int64_t now = mono_ns(), left = end - now;
        if (left <= 0)
            break;
        if (!busy && !tx_armed && now - tx_idle_at >= (int64_t)tx_poll_us * 1000) {
            if (tx_arm(n))  /* the TX ring stayed empty: ask for events again */
                busy = 1;
            else
                tx_armed = 1;
        }
        if (!busy) {
            struct pollfd p[2] = { { up_fd, POLLIN, 0 }, { n->tap, POLLIN, 0 } };
            int64_t wait = stalled && !rx_notify ? 10000000 : left;
            if (owed) {
                int64_t hold = owed_at + (int64_t)coalesce_us * 1000 - now;
                wait = hold < wait ? hold : wait;
            }
            if (tx_owed) {
                int64_t hold = tx_owed_at + (int64_t)tx_coalesce_us * 1000 - now;
                wait = hold < wait ? hold : wait;
            }
            if (!tx_armed && wait > TX_POLL_STEP_NS)
                wait = TX_POLL_STEP_NS;  /* polling the TX ring: look again soon */
            if (wait < 0)
                wait = 0;
            struct timespec ts = { (time_t)(wait / 1000000000), (long)(wait % 1000000000) };
            if (ppoll(p, stalled ? 1 : 2, &ts, NULL) < 0 && errno != EINTR)
                break;
        }
        uint64_t v;
        (void)!read(up_fd, &v, sizeof(v));  /* non-blocking: EAGAIN when nothing came */
        if (__atomic_load_n(&n->stop, __ATOMIC_SEQ_CST))
            break;
        int r = pxn_tx_round(n, budget);
        if (r & PXN_FATAL)
            return r;
        if ((r & PXN_NOTIFY) && tx_coalesce_us <= 0) {
            efd_signal(tx_efd);
            n->st[S_TXEV]++;
        } else if ((r & PXN_NOTIFY) && !tx_owed) {
            tx_owed = 1;
            tx_owed_at = mono_ns();
        }
        busy = (r & PXN_MORE) != 0;
        if (r & PXN_WORK) {
            tx_idle_at = mono_ns();
            if (tx_poll_us > 0)
                tx_armed = 0;  /* req_event is behind now: the frontend stops notifying */
        }
        uint64_t before = n->st[S_RXP] + n->st[S_RXERR], bytes_before = n->st[S_RXB];
        r = pxn_rx_round(n, budget);
        if (r & PXN_FATAL)
            return r;
        uint64_t frames = n->st[S_RXP] + n->st[S_RXERR] - before;
        /* small frames (ACKs, requests) are not held: a late ACK slows the guest's
         * own sending more than the event costs */
        int small = frames && (n->st[S_RXB] - bytes_before) < frames * 2048u;
        if ((r & PXN_NOTIFY) && !owed) {
            owed = 1;
            owed_at = mono_ns();
            owed_frames = 0;
        }
        owed_frames += frames;
        stalled = (r & PXN_STALLED) != 0;
        busy = busy || (r & PXN_MORE);
        if (owed && (coalesce_us <= 0 || stalled || small || owed_frames >= 8 ||
                     mono_ns() - owed_at >= (int64_t)coalesce_us * 1000)) {
            efd_signal(rx_efd);
            n->st[S_RXEV]++;
            owed = 0;
            if (tx_owed) {  /* the same upcall serves both */
                efd_signal(tx_efd);
                n->st[S_TXEV]++;
                tx_owed = 0;
            }
        }
        if (tx_owed) {
            /* responses the frontend has not reaped, as far as its rsp_event tells */
            uint32_t unreaped = n->tx_pvt - (rd32(n->tx + 12) - 1u);
            if (unreaped >= NSLOTS / 2 || mono_ns() - tx_owed_at >= (int64_t)tx_coalesce_us * 1000) {
                efd_signal(tx_efd);
                n->st[S_TXEV]++;
                tx_owed = 0;
            }
        }
    }
    if (owed) {
        efd_signal(rx_efd);
        n->st[S_RXEV]++;
    }
    if (tx_owed) {
        efd_signal(tx_efd);
        n->st[S_TXEV]++;
    }
    n->tx_noarm = 0;
    if (!tx_armed && tx_arm(n))
        (void)!write(up_fd, &(uint64_t){1}, 8);  /* requests came: Python calls us straight back */
    return 0;
}
