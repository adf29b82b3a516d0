"""The benchmarks.  Each is one function registered with ``@benchmark(name)``.

Every benchmark measures pyxen and its baseline side by side in the same run
(these machines are noisy) and reports both figures and their ratio.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .lib import ROOT, Context, Failed, Result, Skip, Target, benchmark, compare, median, parse_line, run_cmd

GUEST_CFLAGS = ("-O2", "-std=gnu11", "-fno-builtin", "-mno-red-zone", "-mgeneral-regs-only",
                "-fno-stack-protector", "-fno-tree-loop-distribute-patterns",
                "-fno-pie", "-no-pie")
"""The guest Makefile's code-generation flags that matter for cpubench_work.h
(minus the kernel-only ones: -ffreestanding -nostdlib -mcmodel=kernel)."""


# --------------------------------------------------------------------- pyxen in-process
@dataclass
class Boot:
    output: str
    t_create: float  # perf_counter() just before create_domain
    t_first_byte: float | None  # perf_counter() when the first console byte arrived
    t_stopped: float  # perf_counter() once the vCPUs stopped
    state: str


def boot(ctx: Context, kernel: Path, cmdline: str = "", memory_mib: int = 16,
         timeout: float = 120.0, name: str = "bench") -> Boot:
    """Boot ``kernel`` in this process and wait for it to stop; its console output."""
    ctx.require_kvm()
    ctx.pyxen()
    from pyxen.domctl import create_domain
    from pyxen.hv.domain import DomainSpec

    chunks: list[bytes] = []
    first: list[float] = []

    def sink(b: bytes) -> None:
        if not first:
            first.append(time.perf_counter())
        chunks.append(b)

    spec = DomainSpec(name=name, memory_mib=memory_mib, kernel=str(kernel), cmdline=cmdline)
    t0 = time.perf_counter()
    d = create_domain(spec, console_sink=sink)
    try:
        stopped = d.wait_stopped(timeout=timeout)
        t1 = time.perf_counter()
        state = d.state
        crash = d.crash_info
    finally:
        d.destroy()
        d.close()
    out = b"".join(chunks).decode(errors="replace")
    if not stopped:
        raise Failed(f"{kernel.name} did not stop within {timeout:g} s", console=out[-4000:])
    if state == "crashed":
        lines = [x.strip() for x in out.splitlines() if x.strip()]
        why = next((x for x in lines if "FATAL" in x), lines[-1] if lines else "no output")
        raise Failed(f"{kernel.name} crashed: {why}", console=out[-4000:], crash=crash)
    return Boot(out, t0, first[0] if first else None, t1, state)


# --------------------------------------------------------------------- null_hypercall
@benchmark("null_hypercall", unit="µs", target=Target("ratio", "<=", 1.15))
def null_hypercall(ctx: Context) -> Result:
    """Round trip of the cheapest hypercall vs a minimal C hypervisor's port-I/O exit."""
    ctx.require_kvm()
    n = 5000 if ctx.quick else 20000
    rounds = 1 if ctx.quick else 5  # alternating; these machines are noisy
    kvm_null = ctx.cc("kvm_null", "c/kvm_null.c")
    app = ctx.guest_app("nullcall")
    base: list[float] = []
    pyx: list[float] = []
    for _ in range(rounds):
        base.append(float(parse_line(run_cmd([kvm_null, "loop", n]), "kvm_null:")["per_call_ns"]))
        b = boot(ctx, app, f"n={n}", name="bench-nullcall")
        pyx.append(float(parse_line(b.output, "nullcall:", "per_call_ns")["per_call_ns"]))
        ctx.log(f"null_hypercall: baseline {base[-1] / 1e3:.2f} µs, pyxen {pyx[-1] / 1e3:.2f} µs")
    pair_ratios = sorted(p / b for p, b in zip(pyx, base, strict=True))
    return compare(min(pyx) / 1e3, min(base) / 1e3, n=n, pyxen_ns=pyx, baseline_ns=base,
                   median_pair_ratio=round(pair_ratios[len(pair_ratios) // 2], 3),
                   stat="best of each")


# --------------------------------------------------------------------- cpubench
@benchmark("cpubench", unit="s", target=Target("ratio", ">=", 0.95))
def cpubench(ctx: Context) -> Result:
    """The same integer workload in a pyxen guest (CPL3) and natively."""
    ctx.require_kvm()
    native = ctx.cc("native_cpubench", "c/native_cpubench.c", GUEST_CFLAGS)
    app = ctx.guest_app("cpubench")
    want_ns = 0.3e9 if ctx.quick else 1.0e9
    rounds = 2 if ctx.quick else 3
    iters = 1_000_000
    while True:  # calibrate natively: long enough to measure, short enough to wait for
        ns = int(parse_line(run_cmd([native, iters]), "cpubench:")["ns"])
        if ns >= 50e6:
            break
        iters *= 4
    iters = max(1, int(iters * want_ns / ns))
    nat: list[int] = []
    gst: list[int] = []
    wall: list[int] = []  # host view of each guest run, create to stop: a guest clock sanity check
    sums: set[str] = set()
    for _ in range(rounds):
        kv = parse_line(run_cmd([native, iters]), "cpubench:", "result", "ns")
        nat.append(int(kv["ns"]))
        sums.add(f"native {int(kv['result'], 16):x}")
        b = boot(ctx, app, f"iters={iters}", memory_mib=32, name="bench-cpubench")
        wall.append(int((b.t_stopped - b.t_create) * 1e9))
        kv = parse_line(b.output, "cpubench:", "iters", "result", "ns")
        if int(kv["iters"]) != iters:
            raise Failed(f"guest ran iters={kv['iters']}, asked {iters}")
        gst.append(int(kv["ns"]))
        sums.add(f"guest {int(kv['result'], 16):x}")
        ctx.log(f"cpubench: native {nat[-1] / 1e9:.3f} s, guest {gst[-1] / 1e9:.3f} s")
    if len({s.split()[1] for s in sums}) != 1:
        raise Failed(f"checksum mismatch: {', '.join(sorted(sums))}")
    return compare(min(gst) / 1e9, min(nat) / 1e9, ratio="baseline/pyxen", iters=iters, guest_ns=gst,
                   guest_wall_ns=wall,
                   native_ns=nat, checksum=sums.pop().split()[1], stat="best of each")


# --------------------------------------------------------------------- create -> first byte
@benchmark("create_to_first_byte_api_inprocess", unit="ms", target=Target("pyxen", "<=", 20.0))
def create_to_first_byte_api_inprocess(ctx: Context) -> Result:
    """create_domain() to the first console byte (hello, 16 MiB), in this process."""
    ctx.require_kvm()
    app = ctx.guest_app("hello")
    n = 5 if ctx.quick else 10
    base: float | None = None
    base_note = "kvm_null create: open /dev/kvm .. first KVM exit, median"
    try:  # the target is absolute: pyxen's figure is still worth having without the baseline
        kvm_null = ctx.cc("kvm_null", "c/kvm_null.c")
        base = float(parse_line(run_cmd([kvm_null, "create", n]), "kvm_null:")["median_ns"]) / 1e6
    except (Skip, Failed) as e:
        base_note = f"baseline unavailable: {e}"
    boot(ctx, app, name="bench-create-warmup")  # imports, page cache: not what we measure
    samples: list[float] = []
    for i in range(n):
        b = boot(ctx, app, name=f"bench-create-{i}")
        if b.t_first_byte is None:
            raise Failed("hello printed nothing")
        if "Hello from pyxen guest!" not in b.output:
            raise Failed(f"unexpected hello output: {b.output[-80:]!r}")
        samples.append((b.t_first_byte - b.t_create) * 1e3)
    ctx.log(f"create: baseline {base_note if base is None else f'{base:.3f} ms'}, pyxen samples "
            + " ".join(f"{s:.1f}" for s in samples) + " ms")
    return compare(median(samples), base, samples_ms=samples, stat="median", n=n,
                   baseline_desc=base_note)


# --------------------------------------------------------------------- idle memory
CHILD = r"""
import sys, threading
sys.path.insert(0, sys.argv[1])
from pyxen import kvm
from pyxen.domctl import create_domain
from pyxen.hv.domain import DomainSpec
kvm.install_kick_handler()
got = threading.Event()
d = create_domain(DomainSpec(name=sys.argv[3], memory_mib=int(sys.argv[4]), kernel=sys.argv[2],
                             cmdline=sys.argv[5]), console_sink=lambda b: got.set())
print("ready" if got.wait(60) else "silent", flush=True)
d.wait_stopped()
print("stopped", d.state, flush=True)
"""
BARE = "import time; print('ready', flush=True); time.sleep(300)"
IDLE_CMDLINE = "period_ms=1000"  # ticker: one line a second, blocked in between


def _kib(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def domain_memory_kib(pid: int) -> dict[str, int]:
    """PSS of ``pid``, with its guest RAM memfd counted as the pages it holds.

    smaps_rollup's Pss counts the guest RAM pages mapped in this process; the
    memfd's allocated blocks count every page the guest (or builder) touched,
    mapped here or not.  Total = Pss - memfd's mapped Pss + memfd's blocks."""
    proc = Path(f"/proc/{pid}")
    pss = _kib((proc / "smaps_rollup").read_text(), "Pss")
    ram_pss = 0
    in_ram = False
    for line in (proc / "smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
            in_ram = "memfd:pyxen-ram" in line
        elif in_ram and line.startswith("Pss:"):
            ram_pss += int(line.split()[1])
    ram_blocks = 0
    for fd in os.listdir(proc / "fd"):
        try:
            if os.readlink(proc / "fd" / fd).startswith("/memfd:pyxen-ram"):
                ram_blocks += os.stat(proc / "fd" / fd).st_blocks * 512 // 1024
        except OSError:
            continue
    return {"pss": pss, "ram_mapped_pss": ram_pss, "ram_touched": ram_blocks,
            "total": pss - ram_pss + ram_blocks}


def _wait_lines(procs: list[subprocess.Popen[str]], deadline: float) -> dict[int, str]:
    """The first stdout line of each process (or '' on EOF) until ``deadline``."""
    sel = selectors.DefaultSelector()
    for p in procs:
        assert p.stdout is not None
        sel.register(p.stdout, selectors.EVENT_READ, p)
    lines: dict[int, str] = {}
    while len(lines) < len(procs) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            p = key.data
            lines[p.pid] = key.fileobj.readline().strip()  # type: ignore[union-attr]
            sel.unregister(key.fileobj)
    sel.close()
    return lines


def _check_alive(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is not None:
            rest = p.stdout.read().strip() if p.stdout else ""
            raise Failed(f"process {p.pid} exited during the measurement ({rest or p.returncode})")


@benchmark("idle_domain_memory_standalone", unit="MiB")
def idle_domain_memory_standalone(ctx: Context) -> Result:
    """Memory per idle domain, one standalone Python process per domain (no daemon).

    To be replaced by a daemon-based variant (``idle_domain_memory``) once the
    toolstack daemon runs one domain process per domain."""
    ctx.require_kvm()
    ctx.pyxen()
    app = ctx.guest_app("ticker")
    k = 4 if ctx.quick else 10
    settle = 1.0 if ctx.quick else 2.0
    procs: list[subprocess.Popen[str]] = []
    try:
        def spawn(args: list[str]) -> subprocess.Popen[str]:
            p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
            procs.append(p)
            return p

        bare = [spawn(["-c", BARE]) for _ in range(k)]
        doms = [spawn(["-c", CHILD, str(ROOT), str(app), f"bench-idle-{i}", "16", IDLE_CMDLINE])
                for i in range(k)]
        lines = _wait_lines(procs, time.monotonic() + 45)
        bad = [f"{p.pid}: {lines.get(p.pid, 'timeout') or 'exited'}" for p in procs
               if lines.get(p.pid) != "ready"]
        if bad:
            raise Failed(f"{len(bad)}/{len(procs)} processes not ready ({bad[0]})")
        time.sleep(settle)
        _check_alive(procs)
        dom_mem = [domain_memory_kib(p.pid) for p in doms]
        bare_mem = [domain_memory_kib(p.pid) for p in bare]
        _check_alive(procs)
    finally:
        for p in procs:  # exactly the processes started here
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
    pyx = median([m["total"] for m in dom_mem]) / 1024
    base = median([m["total"] for m in bare_mem]) / 1024
    ctx.log(f"idle memory: pyxen {pyx:.1f} MiB/domain, bare python {base:.1f} MiB")
    return compare(pyx, base, k=k, memory_mib=16,
                   guest=f"ticker {IDLE_CMDLINE}", overhead_mib=round(pyx - base, 2),
                   domains_kib=dom_mem, bare_kib=bare_mem, stat="median",
                   baseline_desc="bare python3 sleeping, same run")


# --------------------------------------------------------------------- through the daemon
class _PrivateHost:
    """A pyxend of the benchmark's own in a fresh run dir, stopped afterwards."""

    def __init__(self, ctx: Context) -> None:
        ctx.require_kvm()
        ctx.pyxen()
        from pyxen.toolstack.api import Host
        self.run_dir = Path(f"/tmp/pyxen-bench-{os.getpid()}-{time.monotonic_ns()}")
        self.host = Host(run_dir=self.run_dir)

    def __enter__(self) -> _PrivateHost:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.host.quit()
        finally:
            self.host.close()
            import shutil
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _hello_cfg(ctx: Context, name: str = "bench-hello") -> list[str]:
    return [f'name="{name}"', f'kernel="{ctx.guest_app("hello")}"', "memory=16"]


@benchmark("create_to_first_byte_api", unit="ms", target=Target("pyxen", "<=", 20.0))
def create_to_first_byte_api(ctx: Context) -> Result:
    """Host.create_attached() (the daemon path: parse, daemon, zygote fork, build,
    console attach) to the first console byte of hello, median.  Baseline: the
    same boot in-process (create_domain), i.e. the toolstack's own overhead."""
    n = 5 if ctx.quick else 15
    cfg = ROOT / "examples" / "hello.cfg"
    samples: list[float] = []
    with _PrivateHost(ctx) as ph:
        for i in range(n + 1):
            t0 = time.perf_counter()
            _domid, s = ph.host.create_attached(cfg, _hello_cfg(ctx, f"bench-api-{i}"))
            s.settimeout(10)
            first = s.recv(1)
            t1 = time.perf_counter()
            rest = first
            while True:
                b = s.recv(65536)
                if not b:
                    break
                rest += b
            s.close()
            if b"Hello from pyxen guest!" not in rest:
                raise Failed(f"unexpected hello output {rest[-100:]!r}")
            if i:  # the first run warms the zygote's page cache
                samples.append((t1 - t0) * 1e3)
    inproc = [(b.t_first_byte - b.t_create) * 1e3 for b in
              (boot(ctx, ctx.guest_app("hello"), name=f"bench-ip-{i}") for i in range(5))
              if b.t_first_byte is not None]
    ctx.log("api samples " + " ".join(f"{x:.1f}" for x in samples) + " ms")
    return compare(median(samples), median(inproc), samples_ms=samples, inprocess_ms=inproc,
                   stat="median", n=n, baseline_desc="create_domain() in-process, median of 5")


@benchmark("create_to_first_byte_cli", unit="ms", target=Target("pyxen", "<=", 150.0))
def create_to_first_byte_cli(ctx: Context) -> Result:
    """`pyxen create -c` (a new Python process) to the guest's first console byte
    on its stdout, median, with the daemon already running.  Baseline: starting
    `python3 -c pass`, the floor for any Python command on this machine."""
    n = 3 if ctx.quick else 10
    samples: list[float] = []
    floor: list[float] = []
    with _PrivateHost(ctx) as ph:
        env = dict(os.environ, PYXEN_RUN_DIR=str(ph.run_dir), PYTHONPATH=str(ROOT))
        for i in range(n + 1):
            t0 = time.perf_counter()
            p = subprocess.Popen([sys.executable, "-m", "pyxen", "create", "-q", "-c",
                                  str(ROOT / "examples" / "hello.cfg"), f'name="bench-cli-{i}"'],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
            assert p.stdout is not None
            first = p.stdout.read(1)
            t1 = time.perf_counter()
            out, err = p.communicate(timeout=30)
            if p.returncode != 0 or b"Hello from pyxen guest!" not in first + out:
                raise Failed(f"pyxen create -c failed: {err.decode()[-300:]}")
            if i:
                samples.append((t1 - t0) * 1e3)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            floor.append((time.perf_counter() - t0) * 1e3)
    ctx.log("cli samples " + " ".join(f"{x:.1f}" for x in samples) + " ms")
    return compare(median(samples), median(floor), samples_ms=samples, python_startup_ms=floor,
                   stat="median", n=n, baseline_desc="python3 -c pass, median")


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@benchmark("idle_domains", unit="domains", target=Target("pyxen", ">=", 200.0))
def idle_domains(ctx: Context) -> Result:
    """Start N idle 16 MiB domains through the daemon (ticker with a one-hour
    period: blocked all the time), check they all run at once, and report the
    memory each costs.  Baseline: the guest RAM each was given (16 MiB)."""
    n = 40 if ctx.quick else 200
    cfg = ROOT / "examples" / "ticker.cfg"
    with _PrivateHost(ctx) as ph:
        h = ph.host
        avail0 = _meminfo_kib("MemAvailable")
        t0 = time.perf_counter()
        pids = []
        for i in range(n):
            h.create(cfg, [f'name="idle-{i}"', "memory=16", 'extra="period_ms=3600000"'])
        t_create = time.perf_counter() - t0
        time.sleep(1.0)
        doms = h.list()
        alive = [d for d in doms if d["state"] in ("running", "blocked")]
        pids = [d["pid"] for d in doms]
        pss = []
        for pid in pids:
            try:
                pss.append(domain_memory_kib(pid)["total"])
            except (OSError, KeyError, Failed):
                pass
        avail1 = _meminfo_kib("MemAvailable")
        # every domain still answers: ask one in ten for its info
        answered = sum(1 for d in alive[::10] if h.domain_info(d["domid"]).get("state"))
    per_dom_pss = sum(pss) / max(1, len(pss)) / 1024
    per_dom_host = (avail0 - avail1) / max(1, len(alive)) / 1024
    ctx.log(f"idle: {len(alive)}/{n} alive, created in {t_create:.1f} s, PSS {per_dom_pss:.1f} MiB/domain, "
            f"host MemAvailable drop {per_dom_host:.1f} MiB/domain")
    if answered < len(alive[::10]):
        raise Failed(f"only {answered} of {len(alive[::10])} sampled domains answered")
    return compare(float(len(alive)), None, requested=n, create_seconds=round(t_create, 2),
                   pss_mib_per_domain=round(per_dom_pss, 2),
                   host_mib_per_domain=round(per_dom_host, 2), guest_ram_mib=16)


# --------------------------------------------------------------------- xenstored under attack
from . import xenstore_attack as _xenstore_attack  # noqa: E402,F401 - registers xenstore_read_under_attack
