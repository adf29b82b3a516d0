/*
 * blkfront.h - the frontend half of Xen's virtual block device
 * (io/blkif.h, io/ring.h, io/xenbus.h).
 *
 * The toolstack writes device/vbd/<devid>/ (backend, backend-id,
 * virtual-device, state = Initialising) and the backend directory.  The
 * frontend waits for the backend to publish its features (InitWait), then
 * allocates and grants the shared ring (one page, or 2^ring-page-order),
 * allocates an unbound event channel for the backend, publishes ring-ref
 * (or ring-ref0..N-1 and ring-page-order), event-channel, protocol and
 * feature-persistent, and switches to Initialised.  When the backend is
 * Connected it reads sectors, sector-size, info and the feature-* nodes and
 * switches to Connected itself.  A backend that closes, disappears or comes
 * back (InitWait again) tears the ring down and builds a new one; requests
 * that were on the old ring and got no answer are sent again.
 *
 * Everything below the API is the wire format, written from the public
 * headers and pinned with _Static_assert to the x86_64 ABI.
 */
#ifndef PYXEN_BLKFRONT_H
#define PYXEN_BLKFRONT_H

#include "kernel.h"
#include "gnttab.h"

/* ---- io/xenbus.h ---- */
enum xenbus_state {
    XenbusStateUnknown       = 0,
    XenbusStateInitialising  = 1,
    XenbusStateInitWait      = 2,
    XenbusStateInitialised   = 3,
    XenbusStateConnected     = 4,
    XenbusStateClosing       = 5,
    XenbusStateClosed        = 6,
    XenbusStateReconfiguring = 7,
    XenbusStateReconfigured  = 8,
};
const char *xenbus_state_name(int state);

/* ---- io/blkif.h ---- */
#define BLKIF_OP_READ               0
#define BLKIF_OP_WRITE              1
#define BLKIF_OP_WRITE_BARRIER      2
#define BLKIF_OP_FLUSH_DISKCACHE    3
#define BLKIF_OP_RESERVED_1         4
#define BLKIF_OP_DISCARD            5
#define BLKIF_OP_INDIRECT           6

#define BLKIF_MAX_SEGMENTS_PER_REQUEST        11
#define BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST   8
#define BLKIF_DISCARD_SECURE                  (1U << 0)

#define BLKIF_RSP_EOPNOTSUPP  (-2)
#define BLKIF_RSP_ERROR       (-1)
#define BLKIF_RSP_OKAY          0

#define VDISK_CDROM        0x1
#define VDISK_REMOVABLE    0x2
#define VDISK_READONLY     0x4

#define XEN_IO_PROTO_ABI_X86_64 "x86_64-abi"

struct blkif_request_segment {
    grant_ref_t gref;           /* the I/O buffer's frame */
    uint8_t first_sect;         /* first 512-byte sector in the frame (inclusive) */
    uint8_t last_sect;          /* last one (inclusive) */
};

struct blkif_request {
    uint8_t  operation;         /* BLKIF_OP_* */
    uint8_t  nr_segments;
    uint16_t handle;            /* blkif_vdev_t */
    uint64_t id;                /* echoed in the response */
    uint64_t sector_number;     /* 512-byte units */
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};

struct blkif_request_discard {
    uint8_t  operation;         /* BLKIF_OP_DISCARD */
    uint8_t  flag;              /* BLKIF_DISCARD_SECURE or 0 */
    uint16_t handle;
    uint64_t id;
    uint64_t sector_number;
    uint64_t nr_sectors;
};

struct blkif_request_indirect {
    uint8_t  operation;         /* BLKIF_OP_INDIRECT */
    uint8_t  indirect_op;       /* BLKIF_OP_READ or BLKIF_OP_WRITE */
    uint16_t nr_segments;
    uint64_t id;
    uint64_t sector_number;
    uint16_t handle;
    grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
};

struct blkif_response {
    uint64_t id;
    uint8_t  operation;
    int16_t  status;            /* BLKIF_RSP_* */
};

union blkif_sring_entry {
    struct blkif_request req;
    struct blkif_response rsp;
};

/* io/ring.h: indexes, 48 bytes of padding, then the entries. */
struct blkif_sring {
    uint32_t req_prod, req_event;
    uint32_t rsp_prod, rsp_event;
    uint8_t  pvt_pad[4];
    uint8_t  __pad[44];
    union blkif_sring_entry ring[];
};

#define BLKIF_SEGS_PER_INDIRECT_FRAME (PAGE_SIZE / sizeof(struct blkif_request_segment))

_Static_assert(sizeof(struct blkif_request_segment) == 8, "blkif_request_segment size");
_Static_assert(offsetof(struct blkif_request_segment, first_sect) == 4, "seg.first_sect");
_Static_assert(offsetof(struct blkif_request_segment, last_sect) == 5, "seg.last_sect");
_Static_assert(sizeof(struct blkif_request) == 112, "blkif_request size");
_Static_assert(offsetof(struct blkif_request, nr_segments) == 1, "req.nr_segments");
_Static_assert(offsetof(struct blkif_request, handle) == 2, "req.handle");
_Static_assert(offsetof(struct blkif_request, id) == 8, "req.id");
_Static_assert(offsetof(struct blkif_request, sector_number) == 16, "req.sector_number");
_Static_assert(offsetof(struct blkif_request, seg) == 24, "req.seg");
_Static_assert(sizeof(struct blkif_request_discard) == 32, "blkif_request_discard size");
_Static_assert(offsetof(struct blkif_request_discard, flag) == 1, "discard.flag");
_Static_assert(offsetof(struct blkif_request_discard, id) == 8, "discard.id");
_Static_assert(offsetof(struct blkif_request_discard, sector_number) == 16, "discard.sector");
_Static_assert(offsetof(struct blkif_request_discard, nr_sectors) == 24, "discard.nr_sectors");
_Static_assert(sizeof(struct blkif_request_indirect) == 64, "blkif_request_indirect size");
_Static_assert(offsetof(struct blkif_request_indirect, nr_segments) == 2, "ind.nr_segments");
_Static_assert(offsetof(struct blkif_request_indirect, id) == 8, "ind.id");
_Static_assert(offsetof(struct blkif_request_indirect, sector_number) == 16, "ind.sector");
_Static_assert(offsetof(struct blkif_request_indirect, handle) == 24, "ind.handle");
_Static_assert(offsetof(struct blkif_request_indirect, indirect_grefs) == 28, "ind.grefs");
_Static_assert(sizeof(struct blkif_response) == 16, "blkif_response size");
_Static_assert(offsetof(struct blkif_response, operation) == 8, "rsp.operation");
_Static_assert(offsetof(struct blkif_response, status) == 10, "rsp.status");
_Static_assert(sizeof(union blkif_sring_entry) == 112, "blkif ring entry size");
_Static_assert(offsetof(struct blkif_sring, ring) == 64, "blkif_sring header");
_Static_assert(BLKIF_SEGS_PER_INDIRECT_FRAME == 512, "segments per indirect page");

/* Xen errno values used below (besides those in xenbus.h). */
#ifndef XEN_EOPNOTSUPP
#define XEN_EOPNOTSUPP  95
#endif
#ifndef XEN_ETIMEDOUT_BLK
#define XEN_ETIMEDOUT_BLK 110
#endif

/* ---------------------------------------------------------------- */
/* API */

/* What the backend offers (read when it is Connected) and what was
 * negotiated for the current connection. */
struct blkfront_info {
    uint64_t sectors;               /* disk size in 512-byte units */
    unsigned int sector_size;       /* logical block size (bytes) */
    unsigned int physical_sector_size;
    unsigned int info;              /* VDISK_* */
    int readonly;                   /* VDISK_READONLY or mode = "r" */
    int feature_flush, feature_barrier, feature_discard, feature_persistent;
    int discard_secure;
    unsigned int discard_granularity, discard_alignment;   /* bytes */
    unsigned int max_indirect;      /* backend's feature-max-indirect-segments (0 = none) */
    unsigned int max_ring_order;    /* backend's max-ring-page-order */
    /* negotiated */
    unsigned int ring_order, ring_entries;
    unsigned int max_segs;          /* per ring request (11, or indirect) */
    int persistent;                 /* both ends support persistent grants */
};

/* Open options; zero-initialised means the defaults. */
struct blkfront_opts {
    int persistent;                 /* -1 default (0), 0 off, 1 if the backend has it,
                                       2 always (blkif.h allows it) */
    int ring_order;                 /* -1 default (min(backend max, 2)), else wanted order */
    int max_indirect;               /* -1 default (256), 0 = never indirect */
    unsigned int grant_budget;      /* max data grants in flight, 0 = 8448 (at most 3/4
                                       of the grant table); persistent pool pages, 0 = 1024 */
    uint64_t timeout_ns;            /* connect timeout, 0 = 30 s */
    int quiet;                      /* no state-change lines */
    int coalesce;                   /* -1 default (1): ask for an event only when 3/4 of
                                       what is on the ring has been answered, not at
                                       the first response (rsp_event further ahead) */
    unsigned int poll_us;           /* blkfront_wait_any spins this long for a response
                                       before it sleeps until an event (0: never spins) */
};
/* Fill opts from a command line: persistent= ring_order= indirect= grants=
 * timeout= (seconds) quiet= coalesce= poll= (microseconds). */
void blkfront_opts_from_cmdline(struct blkfront_opts *o, const char *cmdline);

struct blkfront_dev;

/*
 * One I/O.  The caller fills op, sector, buf, len (and optionally done,
 * priv) and keeps the struct alive until it completes.
 *   READ, WRITE, WRITE_BARRIER: buf/len in bytes; buf and len must be
 *     multiples of sector-size (buf: within its page; no other alignment
 *     needed), sector aligned to sector-size.  len 0 with WRITE_BARRIER is
 *     a pure barrier.  A request bigger than one ring request can carry is
 *     split; a split barrier sends its leading parts as WRITEs and its last
 *     part as the barrier.
 *   FLUSH_DISKCACHE: no data.  blkfront sends it only once every request
 *     submitted before it has completed (and holds later ones back until
 *     it is on the ring), so an acknowledged flush covers all of them.
 *   DISCARD: len bytes from sector (buf unused).
 * status: 0, -XEN_EIO (BLKIF_RSP_ERROR), -XEN_EOPNOTSUPP, -XEN_ENODEV (the
 * device went away), -XEN_EINVAL (bad arguments), -XEN_EROFS, -XEN_ENOSPC.
 * done() runs in the event handler with events masked: only wake threads.
 */
#define BLK_IO_NOCHECK  0x1         /* skip the range, read-only and feature checks:
                                       let the backend judge (tests) */
struct blk_io {
    uint8_t  op;                    /* BLKIF_OP_* */
    uint8_t  discard_flags;         /* BLKIF_DISCARD_SECURE */
    uint8_t  flags;                 /* BLK_IO_* */
    uint64_t sector;
    void    *buf;
    size_t   len;
    void   (*done)(struct blk_io *io);
    void    *priv;
    /* results */
    volatile int complete;
    int      status;
    int16_t  rsp_status;            /* first non-OKAY blkif status, else 0 */
    uint64_t submit_ns, done_ns;
    /* blkfront's */
    struct blk_io *prev, *next;     /* the device's list of unfinished I/Os */
    size_t   issued;                /* bytes put on the ring */
    unsigned int outstanding;       /* ring requests in flight */
    unsigned int nreqs;             /* ring requests used in total */
    int      sent;                  /* the data-less request is on the ring */
};

/*
 * Find a virtual block device and connect to it.  vdev: "xvda", "hdb",
 * "sdc", a number ("51712"), or NULL/"" for the first one under
 * device/vbd.  Waits (opts->timeout_ns) for the device to appear and for
 * the backend to connect.  NULL on failure (*err = -errno; a line says why).
 */
struct blkfront_dev *blkfront_open(const char *vdev, const struct blkfront_opts *opts, int *err);
/* Frontend-initiated close: Closing, wait for the backend, Closed. */
void blkfront_close(struct blkfront_dev *dev);

const struct blkfront_info *blkfront_get_info(struct blkfront_dev *dev);
const char *blkfront_name(struct blkfront_dev *dev);     /* "xvda" */
unsigned int blkfront_devid(struct blkfront_dev *dev);
/* 1 while the ring is up; 0 while (re)connecting or after a detach. */
int blkfront_connected(struct blkfront_dev *dev);
/* 1 once the device has been removed (frontend directory gone). */
int blkfront_gone(struct blkfront_dev *dev);
/* How many times the ring has been (re)built. */
unsigned int blkfront_generation(struct blkfront_dev *dev);
/* Features as "flush,barrier,discard,persistent,indirect=N,ring-order=K" ("none"). */
void blkfront_features(struct blkfront_dev *dev, char *buf, size_t size);

/* Queue an I/O (returns 0, or -errno and the I/O is not queued). */
int blkfront_submit(struct blkfront_dev *dev, struct blk_io *io);
/* Wait for io (deadline: absolute system time, 0 = none).  1 = complete. */
int blkfront_wait_io(struct blkfront_dev *dev, struct blk_io *io, uint64_t deadline_ns);
/* Block until some I/O completed since *seen (then *seen is updated, 1) or
 * the deadline passes (0). */
int blkfront_wait_any(struct blkfront_dev *dev, unsigned long *seen, uint64_t deadline_ns);
/* Block until the device is connected (1) or the deadline (0); a removed
 * device that is attached again counts. */
int blkfront_wait_connected(struct blkfront_dev *dev, uint64_t deadline_ns);
/* Block until the device has been removed (1) or the deadline (0). */
int blkfront_wait_gone(struct blkfront_dev *dev, uint64_t deadline_ns);
/* Submit and wait; returns io status (or -XEN_ETIMEDOUT_BLK after 60 s). */
int blkfront_rw(struct blkfront_dev *dev, uint8_t op, uint64_t sector, void *buf, size_t len);

/* Counters, for reports and tests. */
struct blkfront_stats {
    unsigned long ios, ring_requests, indirect_requests, responses;
    unsigned long notifies, events, copies;
    unsigned long redone;           /* requests re-sent after a reconnect */
    unsigned long grant_busy;       /* end_access refused after the response */
    unsigned long protocol_errors;  /* bad response ids/ops/status, ring overruns */
    unsigned long pgrants;          /* persistent grant pages in the pool */
    unsigned long polled;           /* responses found by polling (no event) */
};
void blkfront_get_stats(struct blkfront_dev *dev, struct blkfront_stats *st);
/* One line with the ring's indexes and the connection state (diagnostics). */
void blkfront_dump(struct blkfront_dev *dev);

/* key=<n>[k|m|g] from a command line, binary suffixes (bs=4k = 4096). */
unsigned long blk_cmdline_size(const char *cmdline, const char *key, unsigned long dflt);

/* "xvda" <-> 51712 (docs/misc/vbd-interface). */
int blkfront_parse_vdev(const char *name, unsigned int *devid);
void blkfront_devid_name(unsigned int devid, char *buf, size_t size);

#endif /* PYXEN_BLKFRONT_H */
