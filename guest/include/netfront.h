/*
 * netfront.h - the frontend half of Xen's virtual network interface
 * (io/netif.h over io/ring.h, io/xenbus.h).
 *
 * The toolstack writes device/vif/<devid>/ (backend, backend-id, handle,
 * mac, state = Initialising) and the backend directory.  When the backend
 * is in InitWait the frontend grants one TX and one RX ring page and a pool
 * of buffer pages, allocates one event channel (no split channels, one
 * queue), writes tx-ring-ref, rx-ring-ref, event-channel, request-rx-copy=1,
 * feature-rx-notify=1 and feature-no-csum-offload=1 (so every frame it
 * receives carries complete checksums) in one transaction and switches to
 * Connected, as Linux's xen-netfront does.  It posts its RX buffers at
 * once.  Frames are single-slot (no feature-sg, no GSO): at most one page.
 * A backend that closes or starts over (InitWait again) tears the rings
 * down; a new connection is built when it is back.
 *
 * Buffers are granted once per connection (TX read-only, RX writable) and
 * reused: a TX request's id is its buffer's index, an RX request's id
 * likewise, so a response names the page it is about.
 */
#ifndef PYXEN_NETFRONT_H
#define PYXEN_NETFRONT_H

#include "kernel.h"
#include "gnttab.h"

/* ---- io/netif.h ---- */
#define NETTXF_csum_blank       (1U << 0)
#define NETTXF_data_validated   (1U << 1)
#define NETTXF_more_data        (1U << 2)
#define NETTXF_extra_info       (1U << 3)

#define NETRXF_data_validated   (1U << 0)
#define NETRXF_csum_blank       (1U << 1)
#define NETRXF_more_data        (1U << 2)
#define NETRXF_extra_info       (1U << 3)

#define NETIF_RSP_DROPPED       (-2)
#define NETIF_RSP_ERROR         (-1)
#define NETIF_RSP_OKAY            0
#define NETIF_RSP_NULL            1

struct netif_tx_request {
    grant_ref_t gref;
    uint16_t offset;
    uint16_t flags;             /* NETTXF_* */
    uint16_t id;
    uint16_t size;              /* the whole packet's size (first slot) */
};

struct netif_tx_response {
    uint16_t id;
    int16_t  status;            /* NETIF_RSP_* */
};

struct netif_rx_request {
    uint16_t id;
    uint16_t pad;
    grant_ref_t gref;
};

struct netif_rx_response {
    uint16_t id;
    uint16_t offset;
    uint16_t flags;             /* NETRXF_* */
    int16_t  status;            /* bytes (> 0) or NETIF_RSP_* (< 0) */
};

union netif_tx_sring_entry {
    struct netif_tx_request req;
    struct netif_tx_response rsp;
};

union netif_rx_sring_entry {
    struct netif_rx_request req;
    struct netif_rx_response rsp;
};

/* io/ring.h: indexes, 48 bytes of padding, then the entries. */
struct netif_tx_sring {
    uint32_t req_prod, req_event;
    uint32_t rsp_prod, rsp_event;
    uint8_t  pad[48];
    union netif_tx_sring_entry ring[];
};

struct netif_rx_sring {
    uint32_t req_prod, req_event;
    uint32_t rsp_prod, rsp_event;
    uint8_t  pad[48];
    union netif_rx_sring_entry ring[];
};

/* __RING_SIZE of one page: (4096 - 64) / 12 = 336 -> 256, (4096 - 64) / 8 = 504 -> 256 */
#define NET_TX_RING_SIZE 256U
#define NET_RX_RING_SIZE 256U

_Static_assert(sizeof(struct netif_tx_request) == 12, "netif_tx_request size");
_Static_assert(offsetof(struct netif_tx_request, offset) == 4, "tx_req.offset");
_Static_assert(offsetof(struct netif_tx_request, flags) == 6, "tx_req.flags");
_Static_assert(offsetof(struct netif_tx_request, id) == 8, "tx_req.id");
_Static_assert(offsetof(struct netif_tx_request, size) == 10, "tx_req.size");
_Static_assert(sizeof(struct netif_tx_response) == 4, "netif_tx_response size");
_Static_assert(sizeof(struct netif_rx_request) == 8, "netif_rx_request size");
_Static_assert(offsetof(struct netif_rx_request, gref) == 4, "rx_req.gref");
_Static_assert(sizeof(struct netif_rx_response) == 8, "netif_rx_response size");
_Static_assert(offsetof(struct netif_rx_response, status) == 6, "rx_rsp.status");
_Static_assert(sizeof(union netif_tx_sring_entry) == 12, "tx ring entry");
_Static_assert(sizeof(union netif_rx_sring_entry) == 8, "rx ring entry");
_Static_assert(offsetof(struct netif_tx_sring, ring) == 64, "tx sring header");
_Static_assert(offsetof(struct netif_rx_sring, ring) == 64, "rx sring header");
_Static_assert(64 + NET_TX_RING_SIZE * 12 <= PAGE_SIZE && 64 + 2 * NET_TX_RING_SIZE * 12 > PAGE_SIZE,
               "tx ring size is __RING_SIZE");
_Static_assert(64 + NET_RX_RING_SIZE * 8 <= PAGE_SIZE && 64 + 2 * NET_RX_RING_SIZE * 8 > PAGE_SIZE,
               "rx ring size is __RING_SIZE");

/* ---- API ---- */
#define NETFRONT_MAX_FRAME 1514      /* Ethernet header + 1500 (no VLAN, no FCS) */

struct netfront_dev;

struct netfront_stats {
    unsigned long rx_packets, rx_bytes, rx_dropped, rx_errors;
    unsigned long tx_packets, tx_bytes, tx_errors, tx_full;
    unsigned long events, notifies, connects;
};

/*
 * Find device/vif/<devid> (devid < 0: the first one), wait up to timeout_ns
 * for it and for the backend to connect.  NULL on failure (*err = -errno,
 * a console line says why).  A device thread keeps following the backend's
 * state afterwards (reconnects when it starts over).
 */
struct netfront_dev *netfront_open(int devid, uint64_t timeout_ns, int *err);
/* The MAC from the frontend directory's "mac" node. */
const uint8_t *netfront_mac(struct netfront_dev *dev);
int netfront_connected(struct netfront_dev *dev);
/* The domain was restored: every device reconnects at once (main.c). */
void netfront_resume(void);
/* Block until connected (1) or the deadline (absolute system time, 0 = none); a
 * device whose connection failed may come back, so only the deadline ends it. */
int netfront_wait_connected(struct netfront_dev *dev, uint64_t deadline_ns);

/*
 * Send one frame (14..NETFRONT_MAX_FRAME bytes, the Ethernet header first,
 * checksums already filled in).  Copied into a granted buffer, so the
 * caller's memory is free again at return.  Waits for a free TX buffer
 * until deadline (0 = do not wait).  0, -XEN_EAGAIN (no buffer in time),
 * -XEN_ENOTCONN-like -XEN_ENODEV (not connected), -XEN_EINVAL (size).
 */
int netfront_xmit(struct netfront_dev *dev, const void *frame, size_t len, uint64_t deadline_ns);

/*
 * Receive one frame into buf (at most size bytes; a longer frame is cut).
 * Returns its length, 0 at the deadline (absolute; 0 = do not wait), or
 * -XEN_ENODEV while not connected.
 */
int netfront_recv(struct netfront_dev *dev, void *buf, size_t size, uint64_t deadline_ns);

void netfront_get_stats(struct netfront_dev *dev, struct netfront_stats *st);

/* "00:16:3e:01:02:03" -> 6 bytes; 0 or -XEN_EINVAL. */
int netfront_parse_mac(const char *s, uint8_t mac[6]);

#endif /* PYXEN_NETFRONT_H */
