"""Where the toolstack keeps its sockets, logs and state."""

from __future__ import annotations

import os
from pathlib import Path


def run_dir() -> Path:
    """``$PYXEN_RUN_DIR``, else /run/pyxen for root, else $XDG_RUNTIME_DIR/pyxen."""
    env = os.environ.get("PYXEN_RUN_DIR")
    if env:
        p = Path(env)
    elif os.geteuid() == 0:
        p = Path("/run/pyxen")
    else:
        p = Path(os.environ.get("XDG_RUNTIME_DIR", f"/tmp/pyxen-{os.getuid()}")) / "pyxen"
    return p


def daemon_socket(rd: Path | None = None) -> Path:
    return (rd or run_dir()) / "pyxend.sock"


def domain_socket(rd: Path, domid: int) -> Path:
    return rd / f"domain-{domid}.sock"


def console_log(rd: Path, name: str) -> Path:
    """Like xl's /var/log/xen/console/guest-NAME.log."""
    return rd / "console" / f"guest-{name}.log"


def daemon_log(rd: Path) -> Path:
    return rd / "pyxend.log"
