"""The zygote: a warm, single-threaded Python process that forks domain processes.

Starting a domain must not pay Python's start-up and import time, so the
daemon starts this process once; it imports everything a domain process
needs and then forks one child per domain (fork is only safe from a process
without threads, which is why the multi-threaded daemon doesn't fork
itself).  Requests and replies are JSON lines on stdin/stdout.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import sys
import time

from .. import kvm, native
from . import domproc  # noqa: F401 - imported to be warm in every child

# What a domain process imports lazily, on its first vif (pyroute2, ~0.3 s: its
# first TAP, or a migration's destination making the TAPs while the guest is
# down), its first qcow2 disk, its first save/restore or live migration
# (~50 ms).  Imported here once, before forking, so no child pays for them.
# None of them starts a thread at import (fork stays safe); a module that is
# missing is skipped (the child reports it where it needs it).
PRELOAD = (
    "pyroute2", "pyroute2.netlink.exceptions",
    "pyxen.storage.qcow2", "pyxen.storage.open", "pyxen.toolstack.xlcfg",
    "pyxen.migration.stream", "pyxen.migration.protocol", "pyxen.migration.auth",
    "pyxen.migration.save", "pyxen.migration.restore", "pyxen.migration.live",
    "subprocess",
)


def preload() -> None:
    """Import `PRELOAD` (in the zygote, before any fork)."""
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    try:  # the name netback's bridge_attach looks up first, resolved once here too
        from pyroute2 import IPRoute  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        pass


def main() -> None:
    os.umask(0o077)  # as the daemon's: console logs and sockets are the owner's only
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    try:  # /dev/kvm and its CPUID table, opened once and inherited by every child
        kvm.system().supported_cpuid()
    except OSError:
        pass  # reported by the child that tries to create a domain
    native.lib()  # the native data path, built (first time) and loaded once for every child
    preload()
    gc.collect()
    gc.freeze()  # keep the collector from touching (and un-sharing) inherited objects
    out = sys.stdout
    for line in sys.stdin:
        try:
            req = json.loads(line)
            domid, spec, rundir = int(req["domid"]), dict(req["spec"]), str(req["rundir"])
        except (ValueError, KeyError, TypeError) as e:
            out.write(json.dumps({"error": f"bad request: {e}"}) + "\n")
            out.flush()
            continue
        if os.environ.get("PYXEN_TRACE_CREATE"):
            print(f"fork {time.monotonic_ns()}", file=sys.stderr)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.close(devnull)
            domproc.domain_main(domid, spec, rundir)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
