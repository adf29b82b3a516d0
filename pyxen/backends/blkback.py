"""blkback: the host side of a virtual block device (xen-blkback's job).

One :class:`BlkBack` per disk, living in the domain's own process, so it
reaches the guest's pages directly: every page it touches is first checked
in the guest's grant table (granted to the backend domain, dom0, writable
when the backend writes into it) and marked in use for the duration, as a
grant map would (``GrantTables.host_acquire``).  Data moves between the
guest's pages and the image with no bounce buffer (``readinto``/``write`` of
memoryviews of guest RAM).

Protocol (io/blkif.h): the XenbusState handshake through xenstore (the
toolstack creates both directories in Initialising; we go InitWait with our
features; the frontend gives ring-ref(s) and event-channel and goes
Initialised; we connect and go Connected; Closing/Closed both ways, and a
frontend that starts over gets a fresh InitWait), a shared ring with event
suppression, requests processed by a pool of threads (many in flight),
responses batched into one notification where the ring allows.  A FLUSH or
BARRIER waits for everything before it, then fdatasyncs, then completes: an
acknowledged flush means durable data, and nothing is reordered across it.

A frontend that breaks the protocol (ring indexes running ahead) is
disconnected; a bad request (bad grant, sectors out of range, too many
segments) gets BLKIF_RSP_ERROR.  Nothing a frontend does raises out of here.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import native
from ..abi import XenError
from ..hv import gnttab
from ..storage import BlockImage, ImageError
from ..xenstore.client import XsClient, XsError
from . import blkif as B

if TYPE_CHECKING:
    from ..hv.domain import Domain

BACKEND_DOMID = 0
MAX_RING_PAGE_ORDER = 2
WORKERS = 8
#: persistent grants kept per ring (Linux's blkback keeps 1056; our blkfront, with
#: persistent=1, grants up to 32 requests of 256 segments)
PERSISTENT_MAX = 8448
#: serve rings with the native data path when the library loads (PYXEN_NATIVE=0: never)
NATIVE = os.environ.get("PYXEN_NATIVE", "1") != "0"
#: native data path tuning (pyxen/native/blk.c): worker threads, and how long
#: the ring's poller spins for the next request before it re-arms req_event
#: and sleeps until the guest's next event.
NATIVE_WORKERS = 2
NATIVE_POLL_NS = 200_000
#: reads copy from a read-only mapping of the image (no system call per request)
NATIVE_MAP_READS = os.environ.get("PYXEN_BLK_MAP_READS", "1") != "0"
# blk.c's pxb_take_up bits and pxb_stats order
_UP_NOTIFY, _UP_SLOW, _UP_PROTO = 1, 2, 4
_NATIVE_STATS = ("ring_requests", "reads", "writes", "read_bytes", "write_bytes", "to_python",
                 "notifies", "kicks", "poll_hits", "sleeps")


class BlkBack:
    """One virtual block device of one domain."""

    def __init__(self, domain: Domain, xs: XsClient, devid: int, image: BlockImage,
                 params: str = "", fmt: str = "raw", readonly: bool = False, vdev: str = "") -> None:
        self.domain = domain
        self.xs = xs
        self.devid = devid
        self.image = image
        self.readonly = readonly or image.readonly
        self.params, self.fmt, self.vdev = params, fmt, vdev
        self.fe = f"/local/domain/{domain.domid}/device/vbd/{devid}"
        self.be = f"/local/domain/{BACKEND_DOMID}/backend/vbd/{domain.domid}/{devid}"
        self.token = f"blkback-{domain.domid}-{devid}"
        self.state = B.STATE_INITIALISING
        self.ring: B.BackRing | None = None
        self.ring_map: mmap.mmap | None = None
        self.ring_view: memoryview | None = None
        self.ring_refs: list[int] = []
        self.port = 0
        self.lock = threading.RLock()  # state machine
        self.ring_lock = threading.Lock()  # responses
        self.proc_lock = threading.RLock()  # held while the service thread reads the ring
        # the service thread sleeps on this eventfd: the guest's event (Python
        # data path) or the native data path's news (notify, requests for us)
        self.up_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # the native path's wakeup
        self.dev: int | None = None  # struct pxb *, while connected natively
        self.native_why = ""  # why this disk runs the Python data path, if it does
        self._msg_buf = ctypes.create_string_buffer(200)  # the service thread's, for pxb_take_up
        self._req_buf = ctypes.create_string_buffer(B.REQ_SIZE)  # and for pxb_take_slow
        self.persistent = False  # feature-persistent negotiated for the current ring
        self._pgrants: dict[int, tuple[int, bool]] = {}  # Python path: ref -> (offset, writable)
        self.stop = False
        self.detaching = False
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=f"blk{devid}")
        self.inflight: set[Future[None]] = set()
        self.thread: threading.Thread | None = None
        self._stats = {"reads": 0, "writes": 0, "flushes": 0, "discards": 0, "errors": 0,
                       "read_bytes": 0, "write_bytes": 0}
        self._native_totals = dict.fromkeys(_NATIVE_STATS, 0)  # earlier connections

    @property
    def stats(self) -> dict[str, int]:
        """Requests served (both data paths) and the native path's own counters."""
        out = dict(self._stats)
        nat = self._native_stats()
        for k in ("reads", "writes", "read_bytes", "write_bytes"):
            out[k] += nat[k]
        out.update({f"native_{k}": v for k, v in nat.items() if k not in out})
        out["native"] = int(self.dev is not None)
        out["persistent"] = int(self.persistent)
        dev, lib = self.dev, native.fast()
        out["persistent_grants"] = len(self._pgrants) + (
            int(lib.pxb_persistent_count(dev)) if dev is not None and lib is not None else 0)
        return out

    def _native_stats(self) -> dict[str, int]:
        tot = dict(self._native_totals)
        dev, lib = self.dev, native.fast()
        if dev is not None and lib is not None:
            arr = (ctypes.c_uint64 * len(_NATIVE_STATS))()
            lib.pxb_stats(dev, arr, len(_NATIVE_STATS))
            for k, v in zip(_NATIVE_STATS, arr, strict=True):
                tot[k] += int(v)
        return tot

    # ------------------------------------------------------------ xenstore
    @property
    def sectors(self) -> int:
        return self.image.size // B.SECTOR

    def start(self) -> None:
        """Advertise the disk and our features, go InitWait, watch the frontend."""
        xs, be = self.xs, self.be
        vals = {
            "sectors": str(self.sectors), "sector-size": str(self.image.sector_size),
            "physical-sector-size": str(self.image.sector_size),
            "info": str(B.VDISK_READONLY if self.readonly else 0),
            "feature-flush-cache": "1", "feature-barrier": "1",
            "feature-persistent": "1",
            "feature-max-indirect-segments": str(B.MAX_INDIRECT_SEGMENTS),
            "max-ring-page-order": str(MAX_RING_PAGE_ORDER),
            "mode": "r" if self.readonly else "w",
        }
        if self.image.supports_discard and not self.readonly:
            vals.update({"feature-discard": "1", "discard-granularity": str(B.SECTOR),
                         "discard-alignment": "0", "discard-secure": "0"})
        for k, v in vals.items():
            xs.write(f"{be}/{k}", v)
        self._switch(B.STATE_INITWAIT)
        xs.watch(f"{self.fe}/state", self.token, self._on_frontend)
        self.thread = threading.Thread(target=self._service, name=f"blkback-{self.devid}", daemon=True)
        self.thread.start()

    def reconnect_xenstore(self, xs: XsClient) -> None:
        """Use a new xenstore connection (the daemon, and xenstored with it, was
        restarted): watch the frontend again; the watch fires at once and the
        state machine picks up from whatever the nodes say now."""
        with self.lock:
            self.xs = xs
        xs.watch(f"{self.fe}/state", self.token, self._on_frontend)

    def _switch(self, state: int) -> None:
        self.state = state
        try:
            self.xs.write(f"{self.be}/state", str(state))
        except XsError:
            pass

    def _fe_state(self) -> int:
        v = self.xs.try_read(f"{self.fe}/state")
        try:
            return int(v) if v is not None else B.STATE_UNKNOWN
        except ValueError:
            return B.STATE_UNKNOWN

    def _on_frontend(self, path: str, token: str) -> None:
        try:
            self._frontend_changed()
        except Exception as e:  # noqa: BLE001 - report it: a silent watch is a stuck disk
            self.domain.log(f"blkback {self.vdev or self.devid}: frontend change: {e!r}\n"
                            f"{traceback.format_exc()}")

    def _frontend_changed(self) -> None:
        with self.lock:
            fe = self._fe_state()
            if fe in (B.STATE_INITIALISED, B.STATE_CONNECTED) and self.state == B.STATE_INITWAIT:
                try:
                    self._connect()
                except (XenError, XsError, ValueError, OSError) as e:
                    self._fail(f"cannot connect: {e}")
            elif fe == B.STATE_CLOSING:
                self._disconnect()
                self._switch(B.STATE_CLOSING)
            elif fe == B.STATE_CLOSED:
                self._disconnect()
                self._switch(B.STATE_CLOSED)
                if self.detaching:
                    self._remove_nodes()
            elif fe == B.STATE_INITIALISING and self.state in (B.STATE_CLOSED, B.STATE_CLOSING):
                self._switch(B.STATE_INITWAIT)  # the frontend starts over
            elif fe == B.STATE_INITIALISING and self.state == B.STATE_CONNECTED:
                self._disconnect()  # it lost its ring (guest restart of the driver)
                self._switch(B.STATE_INITWAIT)

    def _fail(self, why: str) -> None:
        self.domain.log(f"blkback {self.vdev or self.devid}: {why}")
        try:
            self.xs.write(f"{self.be}/error", why)
        except XsError:
            pass
        self._disconnect()
        self._switch(B.STATE_CLOSING)

    # ------------------------------------------------------------ connection
    def _connect(self) -> None:
        xs, fe = self.xs, self.fe
        order_s = xs.try_read(f"{fe}/ring-page-order")
        order = int(order_s) if order_s else 0
        if order > MAX_RING_PAGE_ORDER:
            raise ValueError(f"ring-page-order {order} above {MAX_RING_PAGE_ORDER}")
        npages = 1 << order
        if order_s:
            refs = [int(xs.read(f"{fe}/ring-ref{i}")) for i in range(npages)]
        else:
            refs = [int(xs.read(f"{fe}/ring-ref"))]
        port = int(xs.read(f"{fe}/event-channel"))
        self.persistent = xs.try_read(f"{fe}/feature-persistent") == "1"  # both ends want it
        proto = xs.try_read(f"{fe}/protocol", "x86_64-abi")
        if proto not in ("x86_64-abi", ""):
            raise ValueError(f"protocol {proto!r} not supported")
        d = self.domain
        # the ring pages, contiguous in our address space (they need not be in the guest's)
        m = mmap.mmap(-1, npages * 4096, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        base = gnttab.atomic.address_of(m)
        taken: list[int] = []
        try:
            for i, ref in enumerate(refs):
                off = d.gnttab.host_acquire(ref, BACKEND_DOMID, True)
                taken.append(ref)
                gnttab._map_fixed(base + i * 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED,
                                  d.machine.memfd, off)
        except (XenError, OSError):
            for ref in taken:
                d.gnttab.host_release(ref)
            m.close()
            raise
        self.ring_map, self.ring_refs = m, refs
        self.ring_view = memoryview(m)
        self.ring = B.BackRing(self.ring_view, B.ring_entries(npages))
        self._start_native(base, B.ring_entries(npages))
        d.evtchn.accept_interdomain(port, BACKEND_DOMID, 0x8000 + self.devid, self._notified)
        self.port = port
        self._switch(B.STATE_CONNECTED)
        self._wake()

    def _start_native(self, ring_addr: int, entries: int) -> None:
        """Serve this ring with the native data path when we can (blk.c): it
        takes every request off the ring, serves plain reads and writes of
        the image itself and hands us the rest.  Otherwise the Python path
        below serves everything."""
        lib = native.lib() if NATIVE else None
        g = self.domain.gnttab.host_grants() if lib is not None else None
        if lib is None or g is None:
            self.native_why = (native.why_not() or "no native grant table") if NATIVE \
                else "disabled (PYXEN_NATIVE=0)"
            return
        target = self.image.native_target()
        fmap = self.image.native_fastmap() if target is None else None
        fd, base = target if target is not None else (fmap[0] if fmap else -1, 0)
        dev = lib.pxb_new(g, ring_addr, entries, BACKEND_DOMID, fd, base, self.sectors,
                          int(self.readonly), self.kick_fd, self.up_fd)
        if not dev:
            self.native_why = "pxb_new failed"
            return
        lib.pxb_set_tuning(dev, NATIVE_WORKERS, NATIVE_POLL_NS)
        if self.persistent and lib.pxb_set_persistent(dev, PERSISTENT_MAX) != 0:
            lib.pxb_free(dev)
            self.native_why = "no memory for persistent grants"
            return
        map_len = base + self.image.size
        if fmap is not None:
            _, cbits, clusters, table = fmap
            lib.pxb_set_fmap(dev, gnttab.atomic.address_of(table), cbits, clusters)
            # the file grows as clusters are allocated: reserve room (pages past
            # its end become readable as it grows; a read there is never mapped)
            map_len = os.fstat(fd).st_size + 2 * self.image.size + (1 << 30)
        if fd >= 0 and NATIVE_MAP_READS:
            lib.pxb_map_file(dev, map_len)  # else reads are preadv
        self.dev = dev
        if lib.pxb_start(dev) != 0:
            self._stop_native()
            self.native_why = "cannot start the native workers"
            return
        self.native_why = "" if fd >= 0 else f"{type(self.image).__name__} has no native target"

    def _stop_native(self) -> None:
        """Join the native workers and free the device; requests we were handed
        have been answered (the caller drained our pool)."""
        dev, lib = self.dev, native.lib()
        if dev is None or lib is None:
            return
        lib.pxb_stop(dev)
        self._drain()  # what we were handed is answered through dev: it must live until then
        self._native_totals = self._native_stats()
        self.dev = None
        lib.pxb_free(dev)

    def _disconnect(self) -> None:
        if self.ring is None:
            return
        with self.proc_lock:  # the service thread is not inside the ring any more
            if self.dev is not None:
                self._stop_native()
            self._drain()
            d = self.domain
            d.evtchn.remote_closed(self.port, BACKEND_DOMID)
            with self.ring_lock:
                self.ring = None
        if self.ring_view is not None:
            self.ring_view.release()
            self.ring_view = None
        if self.ring_map is not None:
            self.ring_map.close()
            self.ring_map = None
        for ref in self.ring_refs:
            d.gnttab.host_release(ref)
        self.ring_refs = []
        with self.ring_lock:
            held, self._pgrants = self._pgrants, {}
        for ref in held:  # the persistent grants the Python path kept
            d.gnttab.host_release(ref)

    def _remove_nodes(self) -> None:
        for path in (self.be, self.fe):
            try:
                self.xs.rm(path)
            except XsError:
                pass

    def _notified(self) -> None:
        """The guest sent on our event channel (runs in its vCPU thread)."""
        fd = self.kick_fd if self.dev is not None else self.up_fd
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            pass  # closing

    def _wake(self) -> None:
        try:
            os.eventfd_write(self.up_fd, 1)
        except OSError:
            pass

    # ------------------------------------------------------------ requests
    def _service(self) -> None:
        while not self.stop:
            try:
                select.select([self.up_fd], [], [], 1.0)
                os.eventfd_read(self.up_fd)
            except BlockingIOError:
                pass
            except OSError:
                return  # closed
            with self.lock:
                ring = self.ring
            if ring is None:
                continue
            try:
                with self.proc_lock:  # _disconnect waits for this before unmapping the ring
                    if self.ring is not ring:
                        continue
                    if self.dev is not None:
                        self._native_news(self.dev)
                    else:
                        self._process(ring)
            except B.ProtocolError as e:
                with self.lock:
                    self._fail(f"protocol error: {e}")
            except Exception as e:  # noqa: BLE001 - never let a guest kill the backend
                self.domain.log(f"blkback {self.devid}: {e!r}\n{traceback.format_exc()}")

    def _native_news(self, dev: int) -> None:
        """What the native data path told us: send the guest its event, take
        the requests it handed over, or disconnect a frontend that broke the
        ring protocol."""
        lib = native.fast()
        assert lib is not None
        msg, raw = self._msg_buf, self._req_buf  # this thread's only
        up = lib.pxb_take_up(dev, msg, len(msg))
        if up & _UP_NOTIFY:
            self.domain.raise_port(self.port, self.domain.evtchn.notify_vcpu(self.port))
        if up & _UP_PROTO:
            raise B.ProtocolError(msg.value.decode(errors="replace"))
        while lib.pxb_take_slow(dev, raw):
            self._dispatch(B.parse_request(raw.raw))

    def _process(self, ring: B.BackRing) -> None:
        while True:
            while ring.pending_requests():
                req = B.parse_request(ring.take_request())
                self._dispatch(req)
            if not ring.final_check_for_requests():
                return

    def _dispatch(self, req: B.Request) -> None:
        """Check a request and take its grants *here*, as it leaves the ring (as
        Xen's blkback maps them at dispatch): a frontend cannot revoke and reuse
        a page of a request that is still waiting for a worker."""
        if req.error:
            return self._respond(req, B.RSP_EOPNOTSUPP if req.error.startswith("operation")
                                 else B.RSP_ERROR, req.error)
        if req.operation in (B.OP_FLUSH_DISKCACHE, B.OP_WRITE_BARRIER):
            self._drain()  # nothing reorders across a flush or barrier
            status = B.RSP_OKAY
            if req.segments:  # a barrier may carry data: write it first, in order
                err = B.check_range(req, self.sectors)
                grabbed = None if err or self.readonly else self._grab(req, B.OP_WRITE, req.segments)
                status = B.RSP_ERROR if grabbed is None else \
                    self._transfer(B.OP_WRITE, grabbed, req.sector)
            try:
                self.image.flush()
                self._stats["flushes"] += 1
            except (ImageError, OSError) as e:
                status = B.RSP_ERROR
                self.domain.log(f"blkback {self.devid}: flush failed: {e}")
            return self._respond(req, status)
        op = req.indirect_op if req.operation == B.OP_INDIRECT else req.operation
        if op in (B.OP_WRITE, B.OP_DISCARD) and self.readonly:
            return self._respond(req, B.RSP_ERROR, "write to a read-only disk")
        if req.operation == B.OP_DISCARD:
            return self._submit(req, self._run_discard, req)
        try:
            if req.operation == B.OP_INDIRECT:
                req.segments = self._indirect_segments(req)
        except _BadRequest as e:
            return self._respond(req, B.RSP_ERROR, str(e))
        err = B.check_range(req, self.sectors)
        if err:
            return self._respond(req, B.RSP_ERROR, err)
        grabbed = self._grab(req, op, req.segments or [])
        if grabbed is None:
            return self._respond(req, B.RSP_ERROR)
        self._submit(req, self._run_io, req, op, grabbed)

    def _submit(self, req: B.Request, fn: Callable[..., None], *args: object) -> None:
        fut = self.pool.submit(fn, *args)
        self.inflight.add(fut)
        fut.add_done_callback(self.inflight.discard)

    def _drain(self) -> None:
        for f in list(self.inflight):
            f.result()

    def _run_discard(self, req: B.Request) -> None:
        try:
            err = B.check_range(req, self.sectors)
            if err:
                return self._respond(req, B.RSP_ERROR, err)
            if not self.image.supports_discard:
                return self._respond(req, B.RSP_EOPNOTSUPP)
            self.image.discard(req.sector * B.SECTOR, req.nr_sectors * B.SECTOR)
            self._stats["discards"] += 1
            self._respond(req, B.RSP_OKAY)
        except Exception as e:  # noqa: BLE001
            self._respond(req, B.RSP_ERROR, f"{e!r}")

    def _run_io(self, req: B.Request, op: int, grabbed: _Grabbed) -> None:
        try:
            status = self._transfer(op, grabbed, req.sector)
        except Exception as e:  # noqa: BLE001
            self.domain.log(f"blkback {self.devid}: request {req.id}: {e!r}")
            status = B.RSP_ERROR
        self._respond(req, status)

    def _indirect_segments(self, req: B.Request) -> list[B.Segment]:
        d = self.domain
        raw = b""
        for ref in req.indirect_grefs or []:
            try:
                off = d.gnttab.host_acquire(ref, BACKEND_DOMID, False)
            except XenError as e:
                raise _BadRequest(f"indirect page: {e.why}") from None
            try:
                raw += bytes(d.machine.ram_view[off:off + 4096])
            finally:
                d.gnttab.host_release(ref)
        segs, err = B.parse_segments(raw, req.nr_indirect)
        if err:
            raise _BadRequest(err)
        return segs

    def _grab(self, req: B.Request, op: int, segs: list[B.Segment]) -> _Grabbed | None:
        """Check and hold every segment's grant; views of the guest's pages.
        With persistent grants, a hold is kept across requests (up to
        PERSISTENT_MAX, dropped when the ring goes) and reused while it allows
        the access a request needs."""
        d = self.domain
        ram = d.machine.ram_view
        gt = d.gnttab
        g = _Grabbed([], [], [])
        write = op == B.OP_READ  # a READ writes into the guest's page
        for s in segs:
            cached = self._pgrants.get(s.gref) if self.persistent else None
            if cached is not None and (cached[1] or not write):
                off = cached[0]
            else:
                try:
                    off = gt.host_acquire(s.gref, BACKEND_DOMID, write)
                except XenError as e:
                    self.domain.log(f"blkback {self.devid}: request {req.id}: {e.why}")
                    self._release(g)
                    return None
                with self.ring_lock:
                    keep = self.persistent and cached is None and len(self._pgrants) < PERSISTENT_MAX
                    if keep:
                        self._pgrants[s.gref] = (off, write)
                if not keep:
                    g.refs.append(s.gref)
            g.views.append(ram[off + s.first * B.SECTOR:off + (s.last + 1) * B.SECTOR])
            g.mfns.append(d.pfn_to_mfn(off >> 12))
        return g

    def _release(self, g: _Grabbed) -> None:
        for v in g.views:
            v.release()
        for ref in g.refs:
            self.domain.gnttab.host_release(ref)
        g.views.clear()
        g.refs.clear()

    def _transfer(self, op: int, g: _Grabbed, sector: int) -> int:
        """Move the whole request with one vectored call straight between the
        image and the guest's pages, then let the grants go."""
        d = self.domain
        pos = sector * B.SECTOR
        nbytes = sum(len(v) for v in g.views)
        try:
            if op == B.OP_READ:
                self.image.readinto_vec(pos, g.views)
                for mfn in g.mfns:  # we wrote these guest pages: migration resends them
                    d.mark_dirty(mfn)
                self._stats["read_bytes"] += nbytes
                self._stats["reads"] += 1
            else:
                self.image.write_vec(pos, g.views)
                self._stats["write_bytes"] += nbytes
                self._stats["writes"] += 1
            return B.RSP_OKAY
        except (ImageError, OSError) as e:
            self.domain.log(f"blkback {self.devid}: I/O error at {pos}: {e}")
            return B.RSP_ERROR
        finally:
            self._release(g)

    def _respond(self, req: B.Request, status: int, why: str = "") -> None:
        if status != B.RSP_OKAY:
            self._stats["errors"] += 1
            if why:
                self.domain.log(f"blkback {self.vdev or self.devid}: request {req.id}: {why}")
        op = req.indirect_op if req.operation == B.OP_INDIRECT and req.indirect_op >= 0 \
            else req.operation  # an indirect request is answered with its READ/WRITE (as Linux)
        dev = self.dev
        if dev is not None:  # it came from the native path, which owns the ring's responses
            native.fast().pxb_respond(dev, req.id, op & 0xFF, status)  # type: ignore[union-attr]
            return
        with self.ring_lock:
            ring = self.ring
            if ring is None:
                return
            ring.put_response(req.id, op, status)
            notify = ring.push_responses()
        if notify:
            self.domain.raise_port(self.port, self.domain.evtchn.notify_vcpu(self.port))

    # ------------------------------------------------------------ lifecycle
    def detach(self, timeout: float = 10.0) -> None:
        """Toolstack-initiated removal: Closing, wait for the frontend to close."""
        with self.lock:
            self.detaching = True
            self._switch(B.STATE_CLOSING)
        end = threading.Event()
        for _ in range(int(timeout * 20)):
            if self._fe_state() in (B.STATE_CLOSED, B.STATE_UNKNOWN, B.STATE_INITIALISING):
                break
            end.wait(0.05)
        with self.lock:
            self._disconnect()
            self._switch(B.STATE_CLOSED)
            self._remove_nodes()
        self.close()

    def close(self) -> None:
        self.stop = True
        self._wake()
        try:
            self.xs.unwatch(f"{self.fe}/state", self.token)
        except XsError:
            pass
        with self.lock:
            self._disconnect()
        self.pool.shutdown(wait=True)
        if self.thread is not None:
            self.thread.join(5)
        os.close(self.up_fd)
        os.close(self.kick_fd)
        try:
            self.image.flush()
        except (ImageError, OSError):
            pass
        self.image.close()


class _BadRequest(Exception):
    pass


@dataclass
class _Grabbed:
    """A request's held grants and the guest memory they give access to."""

    refs: list[int]
    views: list[memoryview]
    mfns: list[int]
