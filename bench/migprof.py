"""Where a live migration's downtime goes (issue 11): ``netecho`` moved back
and forth between two hosts, each move's timeline on one clock.

    sudo PYTHONPATH=$PWD python3 -m bench.migprof [-n 10] [--memory 128] [--wss 0] [--json FILE]

The hosts are network namespaces of one machine (tests/e2e/hosts.py
``TwoHosts(lan=True)``), so the source's and the destination's domain
processes and the outside's observer all stamp CLOCK_MONOTONIC.  For each
move it lines up, in ms from the source's suspend request: the last
heartbeat the observer got before the gap; the guest suspended (the
source's poll saw SHUTDOWN_suspend); END sent; the destination's END, its
domain built, its xenstore entries written ("start"), READY, the source's
go, the unpause; netback's connect (the frontend's *Connected* seen, keys
read, rings served, *Connected* written); the first heartbeat after the
gap.  The downtime is the gap minus the heartbeat period, as the bench's
``migration_downtime_idle`` row.  A diagnostic, not a benchmark row
(docs/migration.md, "Where the downtime goes")."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .lib import ROOT

PERIOD_MS = 5
HB_PORT = 9000
MAC = "00:16:3e:4d:33:07"

_STAMPS = re.compile(r"migrated (in|out), from [^(]*\(monotonic ([0-9.]+)\): (.*)$")
_NETBACK = re.compile(r"netback \S+: connected, .*\(monotonic ([0-9.]+)\): keys read \+([0-9.]+) ms, "
                      r"rings mapped and served \+([0-9.]+) ms, Connected \+([0-9.]+) ms")


def _timeline(lines: list[str]) -> dict[str, float]:
    """Absolute monotonic stamps from a host's ``pyxen dmesg`` lines."""
    out: dict[str, float] = {}
    for line in lines:
        m = _STAMPS.search(line)
        if m:
            t0 = float(m.group(2))
            side = "dst" if m.group(1) == "in" else "src"
            for part in m.group(3).split(", "):
                name, _, num = part.removesuffix(" ms").rpartition(" ")
                try:
                    out[f"{side}:{name}"] = t0 + float(num) / 1000
                except ValueError:
                    pass
            continue
        m = _NETBACK.search(line)
        if m:
            t0 = float(m.group(1))
            out["nb:frontend connected"] = t0
            out["nb:keys read"] = t0 + float(m.group(2)) / 1000
            out["nb:rings served"] = t0 + float(m.group(3)) / 1000
            out["nb:Connected"] = t0 + float(m.group(4)) / 1000
    return out


def _measure_lock() -> Any:
    """One measurement at a time on this machine (several engineers share
    its two CPUs): an exclusive lock on /tmp/pyxen-migprof.lock, waited for."""
    import fcntl
    f = open("/tmp/pyxen-migprof.lock", "a")  # noqa: SIM115 - held until exit
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _round_marks(stats: dict[str, Any]) -> dict[str, float]:
    """The pre-copy's boundaries (absolute monotonic): log-dirty on, each round's end."""
    out: dict[str, float] = {}
    if stats.get("t_logdirty"):
        out["src:log-dirty on"] = stats["t_logdirty"]
    for r in stats.get("rounds", []):
        if r.get("t_end") and r.get("live", True):
            out[f"src:round {r['round']} end"] = r["t_end"]
    return out


def where(t: float, marks: dict[str, float]) -> str:
    """``t`` placed after the latest of ``marks`` before it (e.g. a gap's start)."""
    before = [(v, k) for k, v in marks.items() if v <= t]
    if not before:
        return "before the pre-copy"
    v, k = max(before)
    return f"+{(t - v) * 1000:.1f} ms after {k}"


def one_move(lan: Any, src: int, port: int, dom: int | str, rounds: bool = False,
             policy: dict[str, float] | None = None) -> dict[str, Any]:
    from tests.e2e.hosts import Observer
    hosts = [lan.a, lan.b]
    for h in hosts:
        h.dmesg(clear=True)
    obs = Observer(lan, HB_PORT)
    try:
        time.sleep(0.5)
        dst = 1 - src
        import subprocess
        rx = lan.run_in(dst, [sys.executable, "-m", "pyxen", "migrate-receive", "--listen",
                              f"{lan.ips[dst]}:{port}"], stderr=subprocess.PIPE)
        assert rx.stderr is not None
        line = rx.stderr.readline()
        if b"listening" not in line:
            raise RuntimeError(f"migrate-receive: {line!r}")
        t_req = time.monotonic()
        r = hosts[src].migrate(dom, tcp=f"{lan.ips[dst]}:{port}", timeout=120, **(policy or {}))
        t_ret = time.monotonic()
        rx.wait(30)
        time.sleep(0.5)
        ob = obs.stop()
    finally:
        obs.kill()
    beats = sorted(float(b[2]) for b in ob["beats"])
    tl = _timeline(hosts[src].dmesg() + hosts[dst].dmesg())
    t0 = tl.get("src:suspend asked", t_req)
    # the gap across the move: the largest that starts before migrate returned
    gaps = [(b - a, a, b) for a, b in zip(beats, beats[1:], strict=False) if a < t_ret and b > t_req]
    gap, ga, gb = max(gaps) if gaps else (0.0, t0, t0)
    row = {"downtime_ms": round(gap * 1000 - PERIOD_MS, 2), "t0": t0,
           "stats": r.get("stats", {}).get("commitment")}
    rm = _round_marks(r.get("stats", {}))
    # the largest gap of the whole record (a pre-copy stall may exceed the switch's)
    allg = sorted(((b - a, a) for a, b in zip(beats, beats[1:], strict=False)), reverse=True)[:3]
    row["record_gaps"] = [{"ms": round(g * 1000 - PERIOD_MS, 2), "at_ms": round((a - t0) * 1000, 2),
                           "where": where(a, dict(rm, **{"src:suspend asked": t0}))} for g, a in allg]
    row["beats"] = [(b[0], b[1], b[2]) for b in ob["beats"]]  # seq, guest ns, arrival (--json)
    marks = dict(tl, **{"obs:last beat": ga, "obs:first beat": gb, "migrate returned": t_ret})
    if rounds:
        marks.update(rm)
    row["marks_ms"] = {k: round((v - t0) * 1000, 2) for k, v in sorted(marks.items(), key=lambda kv: kv[1])}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10, help="moves (alternating a->b, b->a)")
    ap.add_argument("--memory", type=int, default=128)
    ap.add_argument("--wss", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--max-rounds", type=int, help="pyxen migrate --max-rounds (default: its default)")
    ap.add_argument("--max-rate", type=float, help="pyxen migrate --max-rate, Mbit/s")
    ap.add_argument("--rounds", action="store_true",
                    help="the pre-copy's rounds in each timeline (log-dirty on, each round's end)")
    a = ap.parse_args(argv)
    lock = _measure_lock()
    print(f"load average at the start: {open('/proc/loadavg').read().split()[0]}")
    sys.path.insert(0, str(ROOT))
    from tests.e2e.hosts import NETECHO_CFG, TwoHosts, netecho_overrides
    lan = TwoHosts(tag=f"pxp{int(time.time()) % 10000}", lan=True)
    rows: list[dict[str, Any]] = []
    try:
        extra = f"hb={lan.lan_ips[2]}:{HB_PORT} hb_rate={1000 // PERIOD_MS} quiet=1"
        if a.wss:
            extra += f" dirty={a.wss}"
        name = "migprof"
        dom, sock = lan.a.create_attached(NETECHO_CFG, netecho_overrides(
            name, MAC, lan.guest_ip, extra, memory=a.memory))
        sock.close()
        end = time.monotonic() + 60
        while "netecho: hb to" not in lan.console(0, name):
            if time.monotonic() > end:
                raise RuntimeError("netecho did not start its heartbeat")
            time.sleep(0.05)
        time.sleep(1.0)
        for i in range(a.n):
            src = i % 2
            pol = {k: v for k, v in (("max_rounds", a.max_rounds), ("max_rate", a.max_rate)) if v is not None}
            row = one_move(lan, src, 9200 + i, name, a.rounds, pol)
            rows.append(row)
            print(f"move {i + 1} {'ab'[src]}->{'ab'[1 - src]}: downtime {row['downtime_ms']:.1f} ms")
            print("    largest gaps of the whole record: " + "; ".join(
                f"{g['ms']:.1f} ms at {g['at_ms']:.1f} ({g['where']})" for g in row["record_gaps"]))
            for k, v in row["marks_ms"].items():
                print(f"    {v:8.2f}  {k}")
            sys.stdout.flush()
    finally:
        lan.close()
    dts = [r["downtime_ms"] for r in rows]
    if dts:
        print(f"downtime: median {statistics.median(dts):.1f} ms, min {min(dts):.1f}, max {max(dts):.1f} "
              f"over {len(dts)} moves")
        rg = [r["record_gaps"][0]["ms"] for r in rows if r["record_gaps"]]
        if rg:
            print(f"largest gap of the whole record: median {statistics.median(rg):.1f} ms, "
                  f"max {max(rg):.1f}")
        keys = sorted({k for r in rows for k in r["marks_ms"]},
                      key=lambda k: statistics.median(r["marks_ms"][k] for r in rows if k in r["marks_ms"]))
        print("median mark (ms from the suspend request):")
        for k in keys:
            vals = [r["marks_ms"][k] for r in rows if k in r["marks_ms"]]
            print(f"    {statistics.median(vals):8.2f}  {k}  (min {min(vals):.2f}, max {max(vals):.2f})")
    print(f"load average at the end: {open('/proc/loadavg').read().split()[0]}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    lock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
