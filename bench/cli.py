"""``bench/run``: run the benchmarks, print the table, write the JSON results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import benchmarks as _benchmarks  # noqa: F401 - registers the benchmarks
from . import block as _block  # noqa: F401 - registers the block-device benchmarks
from . import interdomain as _interdomain  # noqa: F401 - registers the inter-domain benchmarks
from . import linux as _linux  # noqa: F401 - registers Linux's boot and in-guest benchmarks
from . import migration as _migration  # noqa: F401 - registers the live-migration benchmarks
from . import net as _net  # noqa: F401 - registers the network benchmarks (netecho)
from . import netperf as _netperf  # noqa: F401 - registers the iperf3 TCP stream benchmarks (vs veth)
from .lib import BENCHMARKS, Context, Result, format_table, run_one, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/run",
        description="Run pyxen's benchmarks side by side with their baselines (docs/bench.md).")
    ap.add_argument("--only", metavar="NAME[,NAME]", help="run only these benchmarks")
    ap.add_argument("--quick", action="store_true", help="fewer iterations and rounds")
    ap.add_argument("--json", metavar="PATH", type=Path,
                    help="also write the results to PATH (bench/results/ always gets them)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 if a benchmark misses its target or fails (skips do not count)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)

    if args.list:
        for name, entry in BENCHMARKS.items():
            doc = (entry.fn.__doc__ or "").strip().splitlines()
            print(f"{name:40s} {doc[0] if doc else ''}")
        return 0
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            ap.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")

    ctx = Context(quick=args.quick, verbose=not args.quiet)
    results: list[Result] = []
    for name in names:
        if ctx.verbose:
            print(f"[{name}]", file=sys.stderr, flush=True)
        r = run_one(name, ctx)
        if ctx.verbose:
            print(f"  -> {r.verdict()} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
        results.append(r)

    print(format_table(results))
    paths = write_json(results, args.quick, args.json)
    print(f"\nresults: {', '.join(str(p) for p in paths)}")
    if args.strict and any(r.status == "failed" or r.passed is False for r in results):
        return 1
    return 0
