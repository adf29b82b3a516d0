"""Debian's Linux on pyxen vs QEMU, and OS micro-benchmarks inside it (issue 9).

One pyxen boot and one boot per QEMU accelerator serve all the ``linux_*``
rows of a run (cached here):

* ``linux_boot`` / ``linux_boot_kvm``: seconds from asking for the domain
  (pyxen: the create request to a private pyxend, as ``pyxen create -c``;
  QEMU: starting ``qemu-system-x86_64``) to the busybox prompt, with the same
  guests/vmlinuz and the bench initramfs (guests/initrd.img's contents plus
  bench/c/linux_micro.c built static), against QEMU with ``-accel tcg`` and
  ``-accel kvm`` and the console on a serial port.  Target: ratio ≤ 1
  (issue 9: faster than both);
* ``linux_boot.builder`` / ``.kernel`` / ``.userland``: the phases (pyxen:
  the create request, then to Linux's "Run /init as init process", then to
  the prompt; QEMU tcg: to its first console byte, to "Run /init", to the
  prompt), informative;
* ``linux_guest_getpid`` / ``_fork_exit`` / ``_page_fault``: linux_micro run
  from the guest's shell against the same binary run on the host.

The pyxen boot runs with ``PYXEN_PROFILE_EXITS``; its exit profile (top
rows per phase) is in the ``linux_boot`` row's details.  Without
``qemu-system-x86_64`` (Debian's qemu-system-x86) the QEMU figures are
missing and the rows say so loudly; without tools/fetch-guests every row
skips."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .lib import BUILD, ROOT, Context, Failed, Result, Skip, Target, benchmark, compare, parse_line

GUESTS = Path(os.environ.get("PYXEN_GUESTS") or ROOT / "guests")
PROMPT_RX = re.compile(rb"[/~] # ")
INIT_RX = re.compile(rb"Run /init as init process")
QEMU = "qemu-system-x86_64"
_cache: dict[str, Any] = {}


def _need_guests() -> None:
    missing = [p.name for p in (GUESTS / "vmlinuz", GUESTS / "initrd.img", GUESTS / "busybox")
               if not p.exists()]
    if missing:
        raise Skip(f"SKIPPED LOUDLY: run tools/fetch-guests first (missing {', '.join(missing)})")


def _micro_args(ctx: Context) -> list[str]:
    return ["5000", "50", "2048"] if ctx.quick else ["20000", "200", "8192"]


def bench_initrd(ctx: Context) -> tuple[Path, Path]:
    """bench/build/linux_micro (gcc -static) and an initramfs that holds it."""
    _need_guests()
    if "initrd" in _cache:
        return _cache["initrd"]
    micro = ctx.cc("linux_micro", "c/linux_micro.c", ("-O2", "-static"))
    out = BUILD / "initrd-bench.img"
    p = subprocess.run([str(ROOT / "tools" / "mkinitramfs"), "--guests", str(GUESTS), "-o", str(out),
                        "--add", f"{micro}:/bin/linux_micro"], capture_output=True, text=True,
                       timeout=120)
    if p.returncode != 0:
        raise Failed(f"tools/mkinitramfs failed: {p.stderr.strip()[-300:]}")
    _cache["initrd"] = (micro, out)
    return micro, out


def pyxen_boot(ctx: Context) -> dict[str, Any]:
    """Boot once on pyxen (profiled), run linux_micro in the guest, power off."""
    if "pyxen" in _cache:
        return dict(_cache["pyxen"])
    ctx.require_kvm()
    _micro, initrd = bench_initrd(ctx)
    from . import exitprof, linuxboot
    prof = Path(tempfile.mkdtemp(prefix="pyxen-bench-prof-")) / "linux.json"
    b = linuxboot.boot(initrd=initrd, profile=str(prof), timeout=300)
    try:
        phases = b.phases()
        ctx.log("pyxen: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
        out = b.run("/bin/linux_micro " + " ".join(_micro_args(ctx)), 600)
        micro = parse_line(out, "linux_micro:", "getpid_ns", "fork_exit_us", "page_fault_ns")
        ctx.log(f"pyxen guest: {out.strip()}")
        b.poweroff()
    finally:
        b.close()
    profile: dict[str, Any] = {}
    for _ in range(50):
        if prof.exists():
            break
        time.sleep(0.1)
    if prof.exists():
        data = exitprof.load(prof)
        profile = {ph["phase"]: {k: ph[k] for k in ("wall_s", "exits", "fast_path", "handled_s",
                                                     "blocked_s") if k in ph}
                   | {"top": [(r["key"], r["count"], round(r["total_ms"], 1)) for r in ph["rows"][:8]]}
                   for ph in data["phases"]}
        ctx.log("exit profile:\n" + exitprof.summary(data, top=8, phase="kernel"))
    shutil.rmtree(prof.parent, ignore_errors=True)
    _cache["pyxen"] = {"phases": phases, "micro": micro, "profile": profile}
    return dict(_cache["pyxen"])


def qemu_boot(ctx: Context, accel: str) -> dict[str, float]:
    """Boot the same kernel and initramfs in QEMU (serial console) to the prompt."""
    key = f"qemu-{accel}"
    if key in _cache:
        if isinstance(_cache[key], Exception):
            raise _cache[key]
        return dict(_cache[key])
    _need_guests()
    if shutil.which(QEMU) is None:
        raise Skip(f"SKIPPED LOUDLY: {QEMU} not installed (Debian's qemu-system-x86)")
    if accel == "kvm":
        ctx.require_kvm()
    _micro, initrd = bench_initrd(ctx)
    timeout = (30 if ctx.quick else 120) if accel == "kvm" else (120 if ctx.quick else 300)
    cmd = [QEMU, "-accel", accel, "-m", "256", "-smp", "1", "-nographic", "-no-reboot",
           "-monitor", "none", "-serial", "stdio", "-kernel", str(GUESTS / "vmlinuz"),
           "-initrd", str(initrd), "-append", "console=ttyS0 loglevel=8 panic=-1"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    assert p.stdout is not None
    buf = bytearray()
    t_first = t_init = t_prompt = None
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    try:
        while t_prompt is None and time.perf_counter() - t0 < timeout:
            if not sel.select(timeout=1.0):
                continue
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            now = time.perf_counter()
            t_first = t_first or now
            buf += chunk
            if t_init is None and INIT_RX.search(buf):
                t_init = now
            if t_init is not None and PROMPT_RX.search(buf, buf.find(b"Run /init")):
                t_prompt = now
    finally:
        p.kill()
        p.wait()
        sel.close()
    if t_prompt is None or t_init is None or t_first is None:
        tail = bytes(buf[-300:]).decode(errors="replace").strip().splitlines()
        err = Failed(f"{QEMU} -accel {accel} did not reach the shell in {timeout} s "
                     f"(last console line: {tail[-1][-120:] if tail else 'none'!r})")
        _cache[key] = err
        raise err
    res = {"builder": t_first - t0, "kernel": t_init - t_first, "userland": t_prompt - t_init,
           "total": t_prompt - t0}
    ctx.log(f"qemu {accel}: " + ", ".join(f"{k} {v:.2f} s" for k, v in res.items()))
    _cache[key] = res
    return dict(res)


def _qemu_or_none(ctx: Context, accel: str) -> tuple[dict[str, float] | None, str]:
    try:
        return qemu_boot(ctx, accel), ""
    except (Skip, Failed) as e:
        return None, str(e)


@benchmark("linux_boot", unit="s", target=Target("ratio", "<=", 1.0))
def linux_boot(ctx: Context) -> Result:
    """Debian's Linux to the busybox shell: pyxen vs QEMU -accel tcg (same kernel and initramfs)."""
    px = pyxen_boot(ctx)
    if "total" not in px["phases"]:
        raise Failed("pyxen did not reach the shell")
    q, why = _qemu_or_none(ctx, "tcg")
    r = compare(px["phases"]["total"], q["total"] if q else None, baseline_desc="qemu -accel tcg",
                pyxen_phases=px["phases"], qemu_tcg=q, exit_profile=px["profile"])
    if q is None:
        r.reason = why
        ctx.log(f"LOUDLY: no QEMU tcg figure: {why}")
    return r


@benchmark("linux_boot_kvm", unit="s", target=Target("ratio", "<=", 1.0))
def linux_boot_kvm(ctx: Context) -> Result:
    """Debian's Linux to the busybox shell: pyxen vs QEMU -accel kvm (same kernel and initramfs)."""
    px = pyxen_boot(ctx)
    q = qemu_boot(ctx, "kvm")  # Failed/Skip: the row says why, loudly
    return compare(px["phases"]["total"], q["total"], baseline_desc="qemu -accel kvm",
                   pyxen_phases=px["phases"], qemu_kvm=q)


def _phase(name: str, pyxen_key: str, doc: str) -> None:
    def fn(ctx: Context) -> Result:
        px = pyxen_boot(ctx)
        if pyxen_key not in px["phases"]:
            raise Failed("pyxen did not reach the shell")
        q, why = _qemu_or_none(ctx, "tcg")
        r = compare(px["phases"][pyxen_key], q[name] if q else None,
                    baseline_desc=f"qemu -accel tcg, {name} phase")
        if q is None:
            r.reason = why
        return r
    fn.__doc__ = doc
    benchmark(f"linux_boot.{name}", unit="s")(fn)


_phase("builder", "create",
       "Boot phase 1: pyxen's create request (fork, unpack, build) vs QEMU to its first byte.")
_phase("kernel", "to_init", "Boot phase 2: to Linux's 'Run /init as init process' (pyxen vs QEMU tcg).")
_phase("userland", "to_prompt",
       "Boot phase 3: /init and busybox init to the shell prompt (pyxen vs QEMU tcg).")


def _host_micro(ctx: Context) -> dict[str, str]:
    if "host_micro" not in _cache:
        micro, _ = bench_initrd(ctx)
        p = subprocess.run([str(micro), *_micro_args(ctx)], capture_output=True, text=True, timeout=300)
        _cache["host_micro"] = parse_line(p.stdout, "linux_micro:", "getpid_ns", "fork_exit_us",
                                          "page_fault_ns")
        ctx.log(f"host: {p.stdout.strip()}")
    return dict(_cache["host_micro"])


def _micro(name: str, key: str, unit: str, doc: str) -> None:
    def fn(ctx: Context) -> Result:
        guest = float(pyxen_boot(ctx)["micro"][key])
        host = float(_host_micro(ctx)[key])
        return compare(guest, host, baseline_desc="the same static binary on the host",
                       args=_micro_args(ctx))
    fn.__doc__ = doc
    benchmark(f"linux_guest_{name}", unit=unit)(fn)


_micro("getpid", "getpid_ns", "ns", "syscall(SYS_getpid) round trip in Linux on pyxen vs on the host.")
_micro("fork_exit", "fork_exit_us", "µs", "fork + child _exit + waitpid in Linux on pyxen vs on the host.")
_micro("page_fault", "page_fault_ns", "ns", "Demand-zero page fault (first write to an anonymous page), "
       "Linux on pyxen vs the host.")
