"""Summarise an exit profile written by ``PYXEN_PROFILE_EXITS`` (pyxen/hv/trace.py).

    python3 -m bench.exitprof PROFILE.json [--top N] [--phase NAME] [--markdown]

Per phase: wall time, exits, time spent handling them in the domain process,
time blocked (idle), and the rest (guest execution plus the KVM exit and
entry round trips, which the domain process cannot see); then the top rows by
total handling time: count, total, mean.  Two profiles (before/after) can be
given: each row then shows both counts and totals."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def phase_lines(ph: dict[str, Any], top: int, markdown: bool) -> list[str]:
    rest = ph["wall_s"] - ph["handled_s"] - ph["blocked_s"]
    head = (f"phase {ph['phase']}: {ph['wall_s']:.2f} s wall, {ph['exits']} exits, "
            f"{ph['handled_s']:.2f} s handling, {ph['blocked_s']:.2f} s blocked, "
            f"{rest:.2f} s guest + exit round trips"
            + (f"; {ph['fast_path']} #GP answered by the CPL0 fast path" if ph.get("fast_path") else ""))
    rows = ph["rows"][:top]
    if markdown:
        out = [f"**{head}**", "", "| exit | count | total ms | mean µs |", "| --- | ---: | ---: | ---: |"]
        out += [f"| `{r['key']}` | {r['count']} | {r['total_ms']:.0f} | {r['mean_us']:.0f} |"
                for r in rows]
        return [*out, ""]
    w = max([len(r["key"]) for r in rows] + [4])
    out = [head, f"  {'exit'.ljust(w)}  {'count':>8}  {'total ms':>9}  {'mean µs':>8}"]
    out += [f"  {r['key'].ljust(w)}  {r['count']:>8}  {r['total_ms']:>9.1f}  {r['mean_us']:>8.1f}"
            for r in rows]
    return out


def summary(prof: dict[str, Any], top: int = 15, phase: str | None = None,
            markdown: bool = False) -> str:
    lines = []
    for ph in prof["phases"]:
        if phase and ph["phase"] != phase:
            continue
        lines += phase_lines(ph, top, markdown)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--phase")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    print(summary(load(a.profile), a.top, a.phase, a.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
