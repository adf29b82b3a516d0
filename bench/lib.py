"""Benchmark harness helpers: the registry, results, targets, the table and JSON.

A benchmark is one function registered with :func:`benchmark`; it gets a
:class:`Context` and returns a :class:`Result` built with :func:`compare`.
It raises :class:`Skip` when a prerequisite is missing and :class:`Failed`
when it ran but could not produce a valid figure (e.g. a checksum mismatch).
Benchmarks never assert: a figure outside its target is reported as FAIL.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BUILD = BENCH / "build"
RESULTS = BENCH / "results"
GUEST = ROOT / "guest"


class Skip(Exception):
    """A prerequisite is missing: the benchmark is reported as skipped."""


class Failed(Exception):
    """The benchmark ran but produced no valid figure; ``details`` go to the JSON."""

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.details = details


# --------------------------------------------------------------------- results
@dataclass(frozen=True)
class Target:
    """``metric op value``; metric is the ratio or pyxen's own figure."""

    metric: Literal["ratio", "pyxen"]
    op: Literal["<=", ">="]
    value: float

    def check(self, pyxen: float | None, ratio: float | None) -> bool | None:
        x = ratio if self.metric == "ratio" else pyxen
        if x is None:
            return None
        return x <= self.value if self.op == "<=" else x >= self.value

    def describe(self, unit: str) -> str:
        op = "≤" if self.op == "<=" else "≥"
        if self.metric == "ratio":
            return f"ratio {op} {self.value:g}"
        return f"{op} {self.value:g} {unit}"


Status = Literal["ok", "skipped", "failed"]


@dataclass
class Result:
    name: str
    status: Status
    unit: str = ""
    pyxen: float | None = None
    baseline: float | None = None
    ratio: float | None = None
    ratio_def: str = ""  # how the ratio is computed, e.g. "pyxen/baseline"
    target: Target | None = None
    passed: bool | None = None
    reason: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def verdict(self) -> str:
        if self.status == "skipped":
            return f"skipped: {self.reason}"
        if self.status == "failed":
            return f"FAILED: {self.reason}"
        if self.passed is None:
            return "-"
        return "PASS" if self.passed else "FAIL"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = None if self.target is None else {
            **asdict(self.target), "text": self.target.describe(self.unit)}
        d["verdict"] = self.verdict()
        return d


def compare(pyxen: float, baseline: float | None, *,
            ratio: Literal["pyxen/baseline", "baseline/pyxen"] = "pyxen/baseline",
            **details: Any) -> Result:
    """The result of a side-by-side measurement, both figures in the benchmark's unit.

    The name, unit and target come from the registry (:func:`run_one` fills them)."""
    r: float | None = None
    if baseline is not None:
        if ratio == "pyxen/baseline":
            r = pyxen / baseline if baseline else None
        else:
            r = baseline / pyxen if pyxen else None
    return Result("", "ok", pyxen=pyxen, baseline=baseline, ratio=r, ratio_def=ratio,
                  details=details)


# --------------------------------------------------------------------- context
@dataclass
class Context:
    """What a benchmark gets: options and helpers for prerequisites."""

    quick: bool = False
    verbose: bool = True
    _guest_built: str | None = None  # None: not tried; "" ok; else why it failed
    _pyxen_ready: bool = False

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"  {msg}", file=sys.stderr, flush=True)

    def require_kvm(self) -> None:
        if not os.path.exists("/dev/kvm"):
            raise Skip("no /dev/kvm")
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise Skip("/dev/kvm not accessible")

    def cc(self, name: str, source: str, flags: Sequence[str] = ("-O2",)) -> Path:
        """Build bench/<source> into bench/build/<name> (if out of date) with cc."""
        compiler = shutil.which("cc")
        if compiler is None:
            raise Skip("no C compiler (cc)")
        src = BENCH / source
        out = BUILD / name
        deps = [src, *self._local_includes(src)]
        stamp = out.with_suffix(".flags")
        cmd = [compiler, *flags, "-Wall", "-Wextra", "-o", str(out), str(src)]
        if (out.exists() and stamp.exists() and stamp.read_text() == " ".join(cmd)
                and all(out.stat().st_mtime >= d.stat().st_mtime for d in deps)):
            return out
        BUILD.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise Failed(f"cc {source} failed: {last_line(p.stderr)}")
        stamp.write_text(" ".join(cmd))
        return out

    @staticmethod
    def _local_includes(src: Path) -> list[Path]:
        out = []
        for line in src.read_text().splitlines():
            s = line.strip()
            if s.startswith("#include \""):
                p = (src.parent / s.split('"')[1]).resolve()
                if p.exists():
                    out.append(p)
        return out

    def guest_app(self, app: str) -> Path:
        """guest/build/<app>, running ``make -C guest`` once if it is missing."""
        path = GUEST / "build" / app
        if path.exists():
            return path
        if self._guest_built is None:
            if not (GUEST / "Makefile").exists():
                self._guest_built = "no guest/Makefile"
            else:
                self.log("guest/build incomplete: running make -C guest")
                p = subprocess.run(["make", "-C", str(GUEST)], capture_output=True, text=True)
                self._guest_built = "" if p.returncode == 0 else \
                    f"make -C guest failed: {last_line(p.stderr or p.stdout)}"
        if self._guest_built:
            raise Skip(self._guest_built)
        if not path.exists():
            raise Skip(f"guest app {app} not built (no guest/build/{app})")
        return path

    def pyxen(self) -> None:
        """Import pyxen and install its kick handler (main thread, once)."""
        if self._pyxen_ready:
            return
        try:
            from pyxen import kvm
        except Exception as e:  # noqa: BLE001 - any import problem is a skip reason
            raise Skip(f"cannot import pyxen: {e!r}") from None
        kvm.install_kick_handler()
        self._pyxen_ready = True


Benchmark = Callable[[Context], Result]


@dataclass(frozen=True)
class Entry:
    fn: Benchmark
    unit: str
    target: Target | None


BENCHMARKS: dict[str, Entry] = {}


def benchmark(name: str, unit: str, target: Target | None = None) -> Callable[[Benchmark], Benchmark]:
    """Register a benchmark (registration order is the run order).

    ``unit`` is the unit of both figures; ``target`` what pyxen should reach
    (none: the benchmark is informative only)."""
    def register(fn: Benchmark) -> Benchmark:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name} registered twice")
        BENCHMARKS[name] = Entry(fn, unit, target)
        return fn
    return register


def run_one(name: str, ctx: Context) -> Result:
    entry = BENCHMARKS[name]
    t0 = time.monotonic()
    try:
        r = entry.fn(ctx)
    except Skip as e:
        r = Result(name, "skipped", reason=str(e))
    except Failed as e:
        r = Result(name, "failed", reason=str(e), details=e.details)
    except Exception as e:  # noqa: BLE001 - one broken benchmark must not stop the others
        r = Result(name, "failed", reason=f"{type(e).__name__}: {e}",
                   details={"traceback": traceback.format_exc()})
    r.name, r.unit, r.target = name, entry.unit, entry.target
    if r.status == "ok" and entry.target is not None:
        r.passed = entry.target.check(r.pyxen, r.ratio)
    r.seconds = round(time.monotonic() - t0, 3)
    return r


# --------------------------------------------------------------------- helpers
def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else "(no output)"


def run_cmd(cmd: Sequence[object], timeout: float = 120) -> str:
    """Run a helper program; its stdout, or Failed with its last error line."""
    try:
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failed(f"{Path(str(cmd[0])).name} timed out after {timeout:g} s") from None
    if p.returncode != 0:
        raise Failed(f"{Path(str(cmd[0])).name} exited {p.returncode}: "
                     f"{last_line(p.stderr or p.stdout)}")
    return p.stdout


def parse_line(text: str, prefix: str, *keys: str) -> dict[str, str]:
    """``key=value`` pairs of the last line of ``text`` that starts with ``prefix``
    and has all of ``keys``."""
    for line in reversed(text.splitlines()):
        s = line.strip()
        if not s.startswith(prefix):
            continue
        kv = dict(tok.split("=", 1) for tok in s[len(prefix):].split() if "=" in tok)
        if all(k in kv for k in keys):
            return kv
    want = f"'{prefix}' line" + (f" with {', '.join(keys)}" if keys else "")
    raise Failed(f"no {want} in output: {last_line(text)!r}", output=text[-4000:])


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------- output
def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def format_table(results: Sequence[Result]) -> str:
    head = ("benchmark", "pyxen", "baseline", "ratio", "target", "result")
    rows = [head]
    for r in results:
        unit = f" {r.unit}" if r.unit else ""
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        rows.append((r.name,
                     "-" if r.pyxen is None else fmt(r.pyxen) + unit,
                     "-" if r.baseline is None else fmt(r.baseline) + unit,
                     ratio + (f" ({r.ratio_def})" if r.ratio is not None else ""),
                     r.target.describe(r.unit) if r.target else "-",
                     r.verdict()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    lines = []
    for i, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(head[-1]))
    return "\n".join(lines)


def host_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"hostname": socket.gethostname(), "kernel": platform.release(), "cpu": cpu,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "kvm_pvm": os.path.exists("/sys/module/kvm_pvm"),
            "loadavg": os.getloadavg(), "git_commit": commit}


def write_json(results: Sequence[Result], quick: bool, extra_path: Path | None) -> list[Path]:
    now = _dt.datetime.now(_dt.UTC)
    doc = {"timestamp": now.isoformat(timespec="seconds"), "quick": quick, "host": host_info(),
           "results": [r.to_json() for r in results]}
    text = json.dumps(doc, indent=2) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS / f"{now.strftime('%Y%m%dT%H%M%SZ')}.json", RESULTS / "latest.json"]
    if extra_path is not None:
        paths.append(extra_path)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return paths
