"""Inter-domain benchmarks (issue 3): event channel round trip, grant copy
throughput and XenStore request rates, all through the toolstack daemon.

Every benchmark here starts a private pyxend (its own run dir), creates its
guests through :class:`pyxen.toolstack.api.Host`, reads their consoles with
deadlines, and on the way out destroys its domains, stops the daemon, waits
for every process it started (daemon, domain processes) to exit -- killing
by pid only those that do not -- and removes the run dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from .lib import Context, Failed, Result, Skip, Target, benchmark, compare, parse_line, run_cmd

# --------------------------------------------------------------------- a private daemon


class _Daemon:
    """A pyxend of our own; every process it started is gone after ``close()``."""

    def __init__(self, ctx: Context) -> None:
        ctx.require_kvm()
        ctx.pyxen()
        from pyxen.toolstack.api import Host, PyxenError
        self.error = PyxenError
        self.run_dir = Path(f"/tmp/pyxen-bench-{os.getpid()}-{time.monotonic_ns()}")
        try:
            self.host = Host(run_dir=self.run_dir)
            self.info = self.host.info()
        except PyxenError as e:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            raise Failed(f"cannot start pyxend: {e}") from None
        self.pids: set[int] = {int(self.info["daemon_pid"])}
        self.domids: list[int] = []
        self.sockets: list[socket.socket] = []

    def __enter__(self) -> _Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, kernel: Path, name: str, extra: str, memory_mib: int = 16) -> tuple[int, socket.socket]:
        """Create a domain with its console attached from the first byte."""
        from pyxen.toolstack.xlcfg import load_domain_config
        cfg_file = self.run_dir / f"{name}.cfg"
        cfg_file.write_text(f'name = "{name}"\nkernel = "{kernel}"\nmemory = {memory_mib}\n'
                            f'extra = "{extra}"\non_poweroff = "destroy"\n')
        cfg, _ = load_domain_config(cfg_file, [])
        return self.create_cfg(cfg, name)

    def create_cfg(self, cfg: Any, name: str) -> tuple[int, socket.socket]:
        """Create a domain from a parsed config, console attached from the first
        byte; it and its process are destroyed on close."""
        try:
            domid, s = self.host.create_attached(cfg)
        except self.error as e:
            raise Failed(f"create {name}: {e}") from None
        self.domids.append(domid)
        self.sockets.append(s)
        with contextlib.suppress(self.error):
            for d in self.host.list():
                if d.get("domid") == domid and d.get("pid"):
                    self.pids.add(int(d["pid"]))
        return domid, s

    def destroy(self, domid: int) -> None:
        with contextlib.suppress(self.error):
            self.host.destroy(domid)

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        for domid in self.domids:
            self.destroy(domid)
        with contextlib.suppress(self.error):
            self.host.quit()
        self.host.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in self.pids):
            time.sleep(0.02)
        for pid in self.pids:  # only the processes this benchmark started, by pid
            if _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Running (not a zombie) and still the process we started."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Console:
    """A domain's console socket, read with deadlines."""

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self.sock = sock
        self.text = ""
        self.eof = False

    def _recv(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0 or self.eof:
            return False
        self.sock.settimeout(left)
        try:
            b = self.sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:
            b = b""
        if not b:
            self.eof = True
            return False
        self.text += b.decode(errors="replace")
        return True

    def wait_for(self, marker: str, deadline: float, fail_marker: str = "") -> str:
        """Read until a line containing ``marker`` arrived; that line."""
        while True:
            for line in self.text.splitlines():
                if marker in line:
                    return line.strip()
                if fail_marker and fail_marker in line:
                    raise self.failed(line.strip())
            if not self._recv(deadline):
                raise self.failed(f"no '{marker}' line "
                                  + ("(console closed)" if self.eof else "(timed out)"))

    def read_to_eof(self, deadline: float) -> str:
        while self._recv(deadline):
            pass
        if not self.eof:
            raise self.failed("timed out waiting for the domain to finish")
        return self.text

    def failed(self, why: str) -> Failed:
        return Failed(f"{self.name}: {why}", console_tail=self.text[-3000:])


# --------------------------------------------------------------------- a xenstore client
XS_READ, XS_WRITE, XS_RM, XS_WATCH_EVENT, XS_ERROR = 2, 11, 13, 15, 16
_HDR = struct.Struct("<IIII")  # struct xsd_sockmsg: type, req_id, tx_id, len (io/xs_wire.h)


class XsError(Exception):
    pass


class XsClient:
    """A minimal XenStore client on the unix socket: one request at a time."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.req_id = 0

    def close(self) -> None:
        self.sock.close()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            b = self.sock.recv(n - len(buf))
            if not b:
                raise XsError("connection closed by xenstored")
            buf += b
        return bytes(buf)

    def request(self, op: int, payload: bytes, tx: int = 0) -> bytes:
        self.req_id = (self.req_id + 1) & 0xFFFFFFFF
        self.sock.sendall(_HDR.pack(op, self.req_id, tx, len(payload)) + payload)
        while True:
            typ, rid, _tx, length = _HDR.unpack(self._recv_exact(_HDR.size))
            body = self._recv_exact(length) if length else b""
            if typ == XS_WATCH_EVENT:
                continue
            if rid != self.req_id:
                raise XsError(f"reply for request {rid}, expected {self.req_id}")
            if typ == XS_ERROR:
                raise XsError(body.rstrip(b"\0").decode(errors="replace"))
            if typ != op:
                raise XsError(f"reply type {typ} to request type {op}")
            return body

    def read(self, path: str) -> bytes:
        return self.request(XS_READ, path.encode() + b"\0")

    def write(self, path: str, value: bytes) -> None:
        self.request(XS_WRITE, path.encode() + b"\0" + value)

    def rm(self, path: str) -> None:
        self.request(XS_RM, path.encode() + b"\0")


def _xs_client(d: _Daemon) -> XsClient:
    path = d.info.get("xenstore_socket")
    if not path:
        raise Skip("pyxend reports no xenstore_socket")
    try:
        return XsClient(str(path))
    except OSError as e:
        raise Failed(f"cannot connect to xenstored at {path}: {e}") from None


# --------------------------------------------------------------------- event round trip
def _pingpong(d: _Daemon, app: Path, rounds: int, tag: str, wait: str = "block") -> dict[str, Any]:
    """One pingpong run (A and B through xenstore); A's and B's figures.
    ``wait``: how the guests wait for an event (guest/apps/pingpong.c):
    "block" (the upcall wakes a sleeping thread) or "poll" (SCHEDOP_poll on
    the masked port: no upcall, no iret)."""
    a_id, a_sock = d.create(app, f"bench-pp-a-{tag}", f"role=a rounds={rounds} wait={wait}")
    b_id, b_sock = d.create(app, f"bench-pp-b-{tag}", f"role=b peer={a_id} wait={wait}")
    a, b = Console("pingpong A", a_sock), Console("pingpong B", b_sock)
    deadline = time.monotonic() + 60 + rounds * 0.01
    line_a = a.wait_for("pingpong: done", deadline, fail_marker="pingpong: FAIL")
    line_b = b.wait_for("pingpong: done", deadline, fail_marker="pingpong: FAIL")
    a.read_to_eof(deadline)
    b.read_to_eof(deadline)
    ka = parse_line(line_a, "pingpong: done", "rounds", "rtt_ns", "p99_ns", "avg_ns", "min_ns")
    kb = parse_line(line_b, "pingpong: done", "rtt_ns", "p99_ns")
    if int(ka["rounds"]) != rounds:
        raise Failed(f"pingpong did {ka['rounds']} rounds, asked for {rounds}", line=line_a)
    return {"domids": [a_id, b_id], "median_us": int(ka["rtt_ns"]) / 1e3,
            "p99_us": int(ka["p99_ns"]) / 1e3, "avg_us": int(ka["avg_ns"]) / 1e3,
            "min_us": int(ka["min_ns"]) / 1e3,
            "b_interval_median_us": int(kb["rtt_ns"]) / 1e3, "b_interval_p99_us": int(kb["p99_ns"]) / 1e3}


def _pipe_pingpong(tool: Path, rounds: int) -> dict[str, float]:
    kv = parse_line(run_cmd([tool, rounds], timeout=60), "pipe_pingpong:", "median_ns", "p99_ns")
    return {"median_us": int(kv["median_ns"]) / 1e3, "p99_us": int(kv["p99_ns"]) / 1e3,
            "avg_us": int(kv["avg_ns"]) / 1e3, "min_us": int(kv["min_ns"]) / 1e3}


@benchmark("interdomain_event_rtt", unit="µs")
def interdomain_event_rtt(ctx: Context) -> Result:
    """Inter-domain event round trip (guest pingpong, median; p99 in details) vs a
    1-byte pipe ping-pong between two host processes (bench/c/pipe_pingpong.c)."""
    ctx.require_kvm()
    app = ctx.guest_app("pingpong")
    tool = ctx.cc("pipe_pingpong", "c/pipe_pingpong.c")
    rounds = 300 if ctx.quick else 2000
    runs = 1 if ctx.quick else 2
    pp: list[dict[str, Any]] = []
    pipe: list[dict[str, float]] = []
    with _Daemon(ctx) as d:
        for i in range(runs):  # alternating, best (lowest median) of each
            pipe.append(_pipe_pingpong(tool, rounds))
            pp.append(_pingpong(d, app, rounds, str(i)))
        pipe.append(_pipe_pingpong(tool, rounds))
    best_pp = min(pp, key=lambda r: r["median_us"])
    best_pipe = min(pipe, key=lambda r: r["median_us"])
    ctx.log(f"event rtt: pingpong median {best_pp['median_us']:.1f} µs p99 {best_pp['p99_us']:.1f} µs; "
            f"pipe median {best_pipe['median_us']:.2f} µs p99 {best_pipe['p99_us']:.2f} µs")
    return compare(best_pp["median_us"], best_pipe["median_us"], stat="median", rounds=rounds,
                   pyxen_p99_us=best_pp["p99_us"], baseline_p99_us=best_pipe["p99_us"],
                   pyxen_runs=pp, baseline_runs=pipe,
                   pyxen_desc="guest pingpong A/B over xenstore: A's round trip (notify, "
                              "B wakes, writes pong, notifies back, A wakes), guest clock",
                   baseline_desc="bench/c/pipe_pingpong.c: fork, 1 byte each way over two pipes")


def _nullcall(d: _Daemon, app: Path, n: int, tag: str) -> float:
    """The cheapest hypercall's round trip (µs) in a domain process, as the
    pingpong guests run (guest/apps/nullcall.c)."""
    _, sock = d.create(app, f"bench-null-{tag}", f"n={n}")
    con = Console("nullcall", sock)
    deadline = time.monotonic() + 60 + n * 1e-3
    line = con.wait_for("nullcall:", deadline, fail_marker="FATAL")
    con.read_to_eof(deadline)
    return int(parse_line(line, "nullcall:", "per_call_ns")["per_call_ns"]) / 1e3


def _rtt_vs_null(ctx: Context, wait: str) -> Result:
    """Pingpong (guests waiting with ``wait``) against the null hypercall, both
    in domain processes under one daemon, alternating, best run of each."""
    ctx.require_kvm()
    pp_app = ctx.guest_app("pingpong")
    null_app = ctx.guest_app("nullcall")
    rounds = 500 if ctx.quick else 2000
    n = 5000 if ctx.quick else 20000
    runs = 2 if ctx.quick else 3
    pp: list[dict[str, Any]] = []
    null: list[float] = []
    with _Daemon(ctx) as d:
        for i in range(runs):  # alternating, best of each (these machines are noisy)
            null.append(_nullcall(d, null_app, n, f"{wait}{i}"))
            pp.append(_pingpong(d, pp_app, rounds, f"{wait}{i}", wait=wait))
    best_pp = min(pp, key=lambda r: r["median_us"])
    best_null = min(null)
    ctx.log(f"event rtt (wait={wait}) {best_pp['median_us']:.1f} µs (min {best_pp['min_us']:.1f}), "
            f"null hypercall {best_null:.1f} µs: {best_pp['median_us'] / best_null:.1f}x")
    how = ("the round's event wakes a sleeping thread through the upcall (the idle vCPU "
           "blocks in SCHEDOP_block; the upcall returns with the iret hypercall)" if wait == "block"
           else "each waits in SCHEDOP_poll on its masked port (no upcall, no iret)")
    return compare(best_pp["median_us"], best_null, stat="median vs best", rounds=rounds,
                   n=n, wait=wait, pyxen_runs=pp, baseline_runs=null,
                   pyxen_desc=f"guest pingpong A/B wait={wait}: A's round trip (notify, B wakes, "
                              f"writes pong, notifies back, A wakes), guest clock, median; {how}",
                   baseline_desc="guest nullcall in a domain process: one null hypercall's "
                                 "round trip, guest clock, best run")


@benchmark("event_rtt_vs_null_hypercall", unit="µs", target=Target("ratio", "<=", 4.0))
def event_rtt_vs_null_hypercall(ctx: Context) -> Result:
    """Inter-domain event round trip (pingpong median, guests waiting as kernel
    threads do: upcall, then iret) as a multiple of the null hypercall, both in
    domain processes under one daemon (issue 10: <= 4).  Four exits each
    round (each way EVTCHNOP_send and the iret from the upcall) plus two
    cross-process wake-ups (docs/interdomain.md)."""
    return _rtt_vs_null(ctx, "block")


@benchmark("event_rtt_poll_vs_null_hypercall", unit="µs", target=Target("ratio", "<=", 4.0))
def event_rtt_poll_vs_null_hypercall(ctx: Context) -> Result:
    """The same round trip with guests that wait for the event in SCHEDOP_poll
    on the masked port (as Linux's xen_poll_irq): no upcall and no iret, so two
    exits each round (the sends) plus the wake-ups (docs/interdomain.md)."""
    return _rtt_vs_null(ctx, "poll")


# --------------------------------------------------------------------- grant copy
GNT_PAGES, GNT_BATCH = 16, 16


def _grant_copy(d: _Daemon, xs: XsClient, app: Path, mib: int, tag: str,
                batch: int = GNT_BATCH) -> dict[str, Any]:
    c_id, c_sock = d.create(app, f"bench-gnt-copy-{tag}", f"role=copy mib={mib} batch={batch}")
    s_id, s_sock = d.create(app, f"bench-gnt-src-{tag}", f"role=src peer={c_id} pages={GNT_PAGES}")
    copier, src = Console("gntbench copy", c_sock), Console("gntbench src", s_sock)
    deadline = time.monotonic() + 60
    offer = parse_line(src.wait_for("gntbench: offer", deadline, fail_marker="gntbench: FAIL"),
                       "gntbench: offer", "peer", "gref", "pages")
    if int(offer["peer"]) != c_id:
        raise Failed(f"src offered to domain {offer['peer']}, expected {c_id}")
    try:
        xs.write(f"/local/domain/{c_id}/data/gntbench/offer",
                 f"{s_id} {offer['gref']} {offer['pages']}".encode())
    except (OSError, XsError) as e:
        raise Failed(f"xenstore write of the offer: {e}") from None
    deadline = time.monotonic() + 60 + mib * 0.1
    line = copier.wait_for("gntbench: done", deadline, fail_marker="gntbench: FAIL")
    copier.read_to_eof(deadline)
    d.destroy(s_id)
    kv = parse_line(line, "gntbench: done", "bytes", "ns", "hypercalls", "per_call_ns", "best_call_ns")
    return {"mb_per_s": int(kv["bytes"]) * 1e3 / int(kv["ns"]), "bytes": int(kv["bytes"]),
            "ns": int(kv["ns"]), "hypercalls": int(kv["hypercalls"]),
            "per_call_us": int(kv["per_call_ns"]) / 1e3, "best_call_us": int(kv["best_call_ns"]) / 1e3,
            "per_op_us": int(kv["ns"]) / 1e3 / (int(kv["hypercalls"]) * batch), "batch": batch}


def _memcpy(tool: Path, mib: int) -> dict[str, Any]:
    kv = parse_line(run_cmd([tool, mib, GNT_PAGES, 4096, 3], timeout=60), "memcpy_bench:",
                    "bytes", "ns")
    return {"mb_per_s": int(kv["bytes"]) * 1e3 / int(kv["ns"]), "bytes": int(kv["bytes"]),
            "ns": int(kv["ns"])}


def _copy_runs(ctx: Context, mib: int, batches: dict[str, int]) -> tuple[list[dict[str, Any]],
                                                                        dict[str, list[dict[str, Any]]]]:
    """memcpy and grant-copy runs side by side (1 in quick mode, else 2): each
    run does memcpy first, then one gntbench copier per ``batches`` entry
    (tag -> ops per hypercall), all on one daemon.  Returns the memcpy runs and
    the grant-copy runs by tag."""
    ctx.require_kvm()
    app = ctx.guest_app("gntbench")
    tool = ctx.cc("memcpy_bench", "c/memcpy_bench.c")
    mc: list[dict[str, Any]] = []
    gc: dict[str, list[dict[str, Any]]] = {tag: [] for tag in batches}
    with _Daemon(ctx) as d:
        xs = _xs_client(d)
        try:
            for i in range(1 if ctx.quick else 2):
                mc.append(_memcpy(tool, mib))
                for tag, batch in batches.items():
                    gc[tag].append(_grant_copy(d, xs, app, mib, f"{tag}{i}", batch=batch))
        finally:
            xs.close()
    return mc, gc


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda r: r["mb_per_s"])


@benchmark("grant_copy_throughput", unit="MB/s")
def grant_copy_throughput(ctx: Context) -> Result:
    """GNTTABOP_copy of 4 KiB chunks from pages another guest granted, 16 ops per
    hypercall (guest gntbench), MB/s vs memcpy of the same chunks (bench/c/memcpy_bench.c)."""
    mib = 64 if ctx.quick else 256
    mc, runs = _copy_runs(ctx, mib, {"": GNT_BATCH})
    gc = runs[""]
    best_gc, best_mc = _best(gc), _best(mc)
    ctx.log(f"grant copy {best_gc['mb_per_s']:.0f} MB/s ({best_gc['per_op_us']:.1f} µs/op), "
            f"memcpy {best_mc['mb_per_s']:.0f} MB/s")
    return compare(best_gc["mb_per_s"], best_mc["mb_per_s"], stat="best", mib=mib, chunk=4096,
                   pages=GNT_PAGES, batch=GNT_BATCH, pyxen_runs=gc, baseline_runs=mc,
                   pyxen_desc="guest gntbench role=copy: GNTTABOP_copy from another domain's "
                              "grants (GNTCOPY_source_gref) into own pages, guest clock",
                   baseline_desc="bench/c/memcpy_bench.c: memcpy of the same 4 KiB chunks over "
                                 "the same 16+16 pages, best of 3")


GNT_MID_BATCH = 256  # ops per hypercall: the figure of earlier sessions, in the details
GNT_BIG_BATCH = 4096  # ops per hypercall: one native call (gnttab.COPY_CHUNK)


@benchmark("grant_copy_batch", unit="MB/s", target=Target("ratio", ">=", 0.5))
def grant_copy_batch(ctx: Context) -> Result:
    """GNTTABOP_copy in big batches (4096 ops of 4 KiB per hypercall, one native
    call): MB/s as a ratio of memcpy of the same chunks (issue 10: >= 0.5).
    Each hypercall costs one exit (~50 µs on PVM, a null hypercall) and then
    runs at about memcpy speed in C (docs/interdomain.md), so the batch size
    decides: 256 ops (1 MiB, ~20 µs of memcpy) stay below the target whatever
    the copy costs; the 256-op figure is in the details."""
    mib = 256 if ctx.quick else 1024
    mc, runs = _copy_runs(ctx, mib, {"big": GNT_BIG_BATCH, "mid": GNT_MID_BATCH})
    gc, mid = runs["big"], runs["mid"]
    best_gc, best_mid, best_mc = _best(gc), _best(mid), _best(mc)
    ctx.log(f"grant copy, {GNT_BIG_BATCH} ops per call: {best_gc['mb_per_s']:.0f} MB/s "
            f"({best_gc['per_call_us']:.1f} µs per call); {GNT_MID_BATCH} ops per call: "
            f"{best_mid['mb_per_s']:.0f} MB/s ({best_mid['per_call_us']:.1f} µs per call); "
            f"memcpy {best_mc['mb_per_s']:.0f} MB/s")
    return compare(best_gc["mb_per_s"], best_mc["mb_per_s"], stat="best", mib=mib, chunk=4096,
                   pages=GNT_PAGES, batch=GNT_BIG_BATCH, pyxen_runs=gc, baseline_runs=mc,
                   batch256_mb_per_s=round(best_mid["mb_per_s"]),
                   batch256_ratio=round(best_mid["mb_per_s"] / best_mc["mb_per_s"], 3),
                   batch256_runs=mid,
                   pyxen_desc=f"guest gntbench role=copy batch={GNT_BIG_BATCH}: GNTTABOP_copy "
                              "from another domain's grants into own pages, guest clock",
                   baseline_desc="bench/c/memcpy_bench.c: memcpy of the same 4 KiB chunks over "
                                 "the same 16+16 pages, best of 3")


# --------------------------------------------------------------------- xenstore
XS_BENCH_DIR = "/pyxen-bench"


def _host_xs_ops(xs: XsClient, n: int) -> dict[str, float]:
    key = f"{XS_BENCH_DIR}/key"
    xs.write(key, b"start")
    t0 = time.perf_counter()
    for i in range(n):
        xs.write(key, str(i).encode())
    t1 = time.perf_counter()
    want = str(n - 1).encode()
    for _ in range(n):
        if xs.read(key) != want:
            raise Failed(f"host read of {key} returned something else than {want!r}")
    t2 = time.perf_counter()
    xs.rm(XS_BENCH_DIR)
    return {"write_per_s": n / (t1 - t0), "read_per_s": n / (t2 - t1),
            "ops_per_s": 2 * n / (t2 - t0)}


def _cli_xs_ops(xs_path: str, n: int) -> dict[str, Any] | None:
    """xenstore-write/-read as subprocesses (one process per op), if installed."""
    w, r = shutil.which("xenstore-write"), shutil.which("xenstore-read")
    if not w or not r:
        return None
    env = dict(os.environ, XENSTORED_PATH=xs_path)
    key = f"{XS_BENCH_DIR}/cli"
    times = []
    for cmd in ([w, key, "v"], [r, key]):
        t0 = time.perf_counter()
        for _ in range(n):
            p = subprocess.run(cmd, env=env, capture_output=True, timeout=10)
            if p.returncode != 0:
                return {"error": f"{Path(cmd[0]).name}: {p.stderr.decode(errors='replace').strip()}"}
        times.append(time.perf_counter() - t0)
    subprocess.run([shutil.which("xenstore-rm") or "true", XS_BENCH_DIR], env=env,
                   capture_output=True, timeout=10)
    return {"n": n, "write_per_s": n / times[0], "read_per_s": n / times[1]}


@benchmark("xenstore_ops", unit="ops/s")
def xenstore_ops(ctx: Context) -> Result:
    """XenStore WRITE+READ requests/s from a guest (xsbench over the ring); the
    baseline column is the same ops from a host client on the unix socket."""
    ctx.require_kvm()
    app = ctx.guest_app("xsbench")
    n_host = 500 if ctx.quick else 3000
    n_guest = 300 if ctx.quick else 2000
    host_runs: list[dict[str, float]] = []
    with _Daemon(ctx) as d:
        xs = _xs_client(d)
        try:
            host_runs.append(_host_xs_ops(xs, n_host))
            domid, sock = d.create(app, "bench-xsbench", f"n={n_guest} rounds=2")
            con = Console("xsbench", sock)
            deadline = time.monotonic() + 60 + n_guest * 2 * 3 * 0.005
            line = con.wait_for("xsbench: done", deadline, fail_marker="xsbench: FAIL")
            con.read_to_eof(deadline)
            host_runs.append(_host_xs_ops(xs, n_host))
        except (OSError, XsError) as e:
            raise Failed(f"host xenstore client: {e}") from None
        finally:
            xs.close()
        cli = _cli_xs_ops(str(d.info["xenstore_socket"]), 10 if ctx.quick else 40)
    kv = parse_line(line, "xsbench: done", "ops", "write_per_s", "read_per_s")
    gw, gr = int(kv["write_per_s"]), int(kv["read_per_s"])
    watch_us = int(kv["watch_us"]) if "watch_us" in kv else None
    guest_ops = 2 / (1 / gw + 1 / gr)  # n writes then n reads: the combined rate
    best_host = max(host_runs, key=lambda r: r["ops_per_s"])
    ctx.log(f"xenstore: guest write {gw}/s read {gr}/s; host client write "
            f"{best_host['write_per_s']:.0f}/s read {best_host['read_per_s']:.0f}/s"
            + (f"; guest watch fire {watch_us} us" if watch_us is not None else "")
            + (f"; xenstore-write {cli['write_per_s']:.0f}/s xenstore-read {cli['read_per_s']:.0f}/s"
               if cli and "error" not in cli else ""))
    return compare(guest_ops, best_host["ops_per_s"], stat="best", guest_domid=domid,
                   guest_ops=int(kv["ops"]), guest_write_per_s=gw, guest_read_per_s=gr,
                   guest_write_us=int(kv.get("write_us", 0)), guest_read_us=int(kv.get("read_us", 0)),
                   guest_watch_us=watch_us,
                   host_ops=n_host, host_write_per_s=round(best_host["write_per_s"]),
                   host_read_per_s=round(best_host["read_per_s"]), host_runs=host_runs,
                   xenstore_utils=cli,
                   pyxen_desc="guest xsbench: n xenbus_write then n xenbus_read of one key "
                              "(then n writes of a watched key, each until its event: "
                              "guest_watch_us), "
                              "over the ring, best of 2 rounds, guest clock",
                   baseline_desc="host Python xs_wire client on xenstored's unix socket, same "
                                 "ops, sequential, best of 2 runs (both are pyxen's xenstored)")
