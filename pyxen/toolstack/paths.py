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
    """Like xl's /var/log/xen/console/guest-NAME.log.  The name is the
    domain's, which a user chose: ``/``, ``%``, NUL and other control
    characters are %-escaped, so the file is always one entry of the console
    directory whatever the name (``x/../../y`` is ``guest-x%2F..%2F..%2Fy.log``)."""
    return rd / "console" / f"guest-{safe_file_part(name)}.log"


def safe_file_part(name: str) -> str:
    """``name`` as one path component: reversible %-escaping of ``%``, ``/``
    and characters below 0x20 or 0x7f (a name the daemon refuses is still
    never a way out of the directory)."""
    return "".join(f"%{ord(c):02X}" if c in "%/" or ord(c) < 0x20 or ord(c) == 0x7F else c
                   for c in name) or "%00"


def daemon_log(rd: Path) -> Path:
    return rd / "pyxend.log"
