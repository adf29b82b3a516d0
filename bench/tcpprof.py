"""Where a TCP stream's time goes (issue 10): the netperf setup (bench/netperf.py)
with host-side KVM counters and pyxen's exit profile, per MiB transferred.

    sudo PYTHONPATH=$PWD python3 -m bench.tcpprof [--secs 8] [--dirs h2g,g2h,g2g] [--out DIR]
        [--record] [--cycles] [--syms ffffffff81a043a0,...]

For each direction it runs one iperf3 stream and, meanwhile, on guest 0's
domain process: ``perf stat`` of KVM's tracepoints (exits, entries, page
faults, emulated instructions, injected exceptions, the shadow MMU's events;
on PVM only ``kvm_userspace_exit`` counts exits, ``kvm_exit``/``kvm_entry``
/``kvm_page_fault`` never fire) and, with ``--record``, ``perf record -e
kvm:kvm_exit`` (empty on PVM); with ``--cycles`` a ``perf record`` of the
process; the threads' utime/stime/guest_time from /proc; pyxen's exit
profile (``PYXEN_PROFILE_EXITS`` into DIR, one phase per direction, marked
from the guests' consoles; ``python3 -m bench.exitprof DIR/d1-*.json``); the
vifs' counters (``tx_events``/``rx_events``: events netback signalled).
Per MiB the receiver counted (approximately: the rate times the perf
window).  ``--syms`` names guest kernel addresses from guest 0's
/proc/kallsyms.  Env such as ``PYXEN_NET_RX_COALESCE_US`` reaches the
domains.  A diagnostic, not a benchmark row (docs/netback.md, "Where a TCP
stream's time goes")."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from . import netperf
from .lib import Context

EVENTS = ("kvm:kvm_exit,kvm:kvm_entry,kvm:kvm_page_fault,kvm:kvm_emulate_insn,kvm:kvm_inj_exception,"
          "kvm:kvm_cr,kvm:kvm_userspace_exit,kvmmmu:*")


def _session_kvm_pids(sid: int) -> list[int]:
    """Processes of the daemon's session that hold a KVM VM (domain processes)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            st = (d / "stat").read_text()
            fields = st[st.rindex(")") + 2:].split()
            if int(fields[3]) != sid:
                continue
            if any("kvm-vm" in os.readlink(f) for f in (d / "fd").iterdir()):
                out.append(int(d.name))
        except (OSError, ValueError):
            continue
    return sorted(out)


def _thread_times(pid: int) -> dict[str, tuple[float, float, float]]:
    """(utime, stime, guest_time) in seconds of each thread, by name+tid."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            st = (t / "stat").read_text()
        except OSError:
            continue
        name = st[st.index("(") + 1:st.rindex(")")]
        f = st[st.rindex(")") + 2:].split()
        out[f"{name}/{t.name}"] = (int(f[11]) / hz, int(f[12]) / hz, int(f[40]) / hz)
    return out


def _perf_stat(pid: int, secs: float, out: Path) -> subprocess.Popen[Any]:
    return subprocess.Popen(["perf", "stat", "-x", ",", "-o", str(out), "-e", EVENTS, "-p", str(pid),
                             "--", "sleep", str(secs)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _parse_stat(path: Path) -> dict[str, int]:
    res = {}
    for line in path.read_text().splitlines():
        parts = line.split(",")
        if len(parts) >= 3 and parts[0].strip().isdigit():
            res[parts[2]] = int(parts[0])
    return res


def _exit_reasons(data: Path) -> dict[str, int]:
    p = subprocess.run(["perf", "script", "-i", str(data), "-F", "trace"], capture_output=True, text=True,
                       timeout=300)
    cnt: dict[str, int] = {}
    for line in p.stdout.splitlines():
        m = re.search(r"reason (\S+)", line)
        key = m.group(1) if m else line.strip()[:40]
        m2 = re.search(r"rip 0x([0-9a-f]+)", line)
        if m2:
            key += " rip=" + m2.group(1)
        cnt[key] = cnt.get(key, 0) + 1
    return dict(sorted(cnt.items(), key=lambda kv: -kv[1])[:25])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=int, default=8)
    ap.add_argument("--dirs", default="h2g,g2h,g2g")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--syms", default="", help="guest kernel addresses (hex, comma-separated) to name")
    ap.add_argument("--cycles", action="store_true",
                    help="perf record -e cycles (on PVM the guest shows as pvm_do_event_irqoff)")
    a = ap.parse_args()
    work = Path(a.out or tempfile.mkdtemp(prefix="tcpprof-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PYXEN_PROFILE_EXITS"] = str(work)
    os.environ["PYXEN_PROFILE_PHASES"] = ("userland=Run /init as init process,prompt=[/~] # ,"
                                          "h2g=MARKH2G,g2h=MARKG2H,g2g=MARKG2G,end=MARKEND")
    ctx = Context(quick=True)  # type: ignore[call-arg]
    iperf = netperf._prereqs()
    s = netperf._Setup(ctx, iperf)
    report: dict[str, Any] = {}
    try:
        sid = os.getsid(s.procs[-1].pid)
        pids = _session_kvm_pids(sid)
        print("domain processes:", pids, flush=True)
        for key in a.dirs.split(","):
            for b in s.shells:
                b.run(f"echo MARK''{key.upper()}")
            target = pids[0]
            t0 = _thread_times(target)
            st = _perf_stat(target, a.secs - 1, work / f"{key}.stat")
            rec = None
            if a.record:
                rec = subprocess.Popen(["perf", "record", "-q", "-e", "kvm:kvm_exit", "-p", str(target),
                                        "-o", str(work / f"{key}.data"), "--", "sleep", str(a.secs - 1)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cyc = None
            if a.cycles:
                cyc = subprocess.Popen(["perf", "record", "-q", "-e", "cycles", "-p", str(target),
                                        "-o", str(work / f"{key}.cycles"), "--", "sleep", str(a.secs - 1)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            w0 = time.monotonic()
            if key == "g2g":
                rate = s.guest_client(1, netperf.GUEST_IPS[0], a.secs)
            else:
                rate = s.host_client(netperf.GUEST_IPS[0], a.secs, key == "g2h")
            wall = time.monotonic() - w0
            st.wait(30)
            for pr in (rec, cyc):
                if pr is not None:
                    pr.wait(60)
            t1 = _thread_times(target)
            vif = {}
            for b in s.shells:
                for v in s.host.network_list(b.domid):
                    st_ = v.get("stats") or {}
                    vif[f"d{b.domid}"] = {k: st_.get(k) for k in ("tx_packets", "tx_bytes", "rx_packets",
                                                                  "rx_bytes", "tx_events", "rx_events")}
            counts = _parse_stat(work / f"{key}.stat")
            mib = rate * (a.secs - 1)  # MiB moved during the perf window (approx.)
            threads = {k: tuple(round(x - y, 2) for x, y in zip(t1[k], t0.get(k, (0, 0, 0)), strict=True))
                       for k in t1}
            busy = {k: v for k, v in threads.items() if v[0] + v[1] > 0.05}
            row = {"MiB_s": round(rate, 1), "wall": round(wall, 1),
                   "per_MiB": {k: round(v / mib, 1) for k, v in counts.items() if v},
                   "threads_s(utime,stime,guest)": busy, "vif_totals": vif}
            if rec is not None:
                row["exit_reasons"] = _exit_reasons(work / f"{key}.data")
            report[key] = row
            print(key, json.dumps(row, indent=1), flush=True)
        for b in s.shells:
            b.run("echo MARK''END")
        if a.syms:
            t = " ".join(x.strip().lower().removeprefix("0x") for x in a.syms.split(","))
            prog = ("BEGIN{n=split(a,t,\" \")} "
                    "{for(i=1;i<=n;i++) if ($1<=t[i] && $1>m[i]) {m[i]=$1; b[i]=$3}} "
                    "END{for(i=1;i<=n;i++) print \"SYM\", t[i], m[i], b[i]}")
            out = s.shells[0].run(f"awk -v a='{t}' '{prog}' /proc/kallsyms", 120)
            report["syms"] = [ln for ln in out.splitlines() if ln.startswith("SYM ")]
            print("\n".join(report["syms"]), flush=True)
    finally:
        s.close()
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print("profiles and report in", work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
