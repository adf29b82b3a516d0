"""Where the toolstack keeps its sockets, logs and state, and who may use them.

The run dir is the toolstack's trust boundary, as /var/run/xenstored and
/var/log/xen are Xen's: whoever can reach the sockets in it can create and
destroy domains and read every console.  Xen answers with "root only"; pyxen
answers with "the daemon's owner (and root) only".  So the run dir is
mode 0700, owned by the user who runs the toolstack, and not a symlink, and
every directory above it is one that only root or that user can change
(like OpenSSH's ``StrictModes`` check of a home directory).  A run dir that
breaks these rules is refused, never repaired: it may be another user's
trap (a pre-created ``/tmp/pyxen-UID`` with a symlink in it).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

NAME_MAX_CHARS = 64  # a bound for domain names (xl has none; file names do)
NAME_MAX_BYTES = 128  # "guest-NAME.log" must fit a file name (255 bytes)


class RunDirError(PermissionError):
    """The run dir (or a directory above it) is not safe for this user; the
    message names it and says why, in one line."""


def run_dir() -> Path:
    """``$PYXEN_RUN_DIR``, else /run/pyxen for root, else $XDG_RUNTIME_DIR/pyxen
    (a per-user 0700 tmpfs made by the login manager), else /tmp/pyxen-UID/pyxen,
    whose every component :func:`ensure_run_dir` creates and checks itself."""
    env = os.environ.get("PYXEN_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/pyxen")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "pyxen"
    return Path(f"/tmp/pyxen-{os.geteuid()}") / "pyxen"


def _check_owned_dir(p: Path, st: os.stat_result) -> None:
    """The run dir itself (or a directory we created for it): ours, 0700, real."""
    if stat.S_ISLNK(st.st_mode):
        raise RunDirError(f"run dir {p} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"run dir {p} is not a directory")
    if st.st_uid != os.geteuid():
        raise RunDirError(f"run dir {p} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}); "
                          "refusing to use it")
    if st.st_mode & 0o077:
        raise RunDirError(f"run dir {p} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0700 "
                          f"(chmod 700 {p})")


def _check_ancestors(p: Path) -> None:
    """Every directory above ``p`` (following symlinks, each checked too) must be
    owned by root or by us, and writable by others only if sticky (as /tmp):
    else its owner could rename our run dir away and put their own in its place."""
    me = os.geteuid()
    todo = list(p.parent.parts[1:])
    cur = Path("/")
    hops = 0
    while True:
        st = os.stat(cur)
        if st.st_uid not in (0, me) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise RunDirError(f"run dir {p}: {cur} above it can be changed by uid {st.st_uid} or "
                              f"others (mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it")
        if not todo:
            return
        part = todo.pop(0)
        if part == "..":
            cur = cur.parent
            continue
        nxt = cur / part
        try:
            lst = os.lstat(nxt)
        except FileNotFoundError:
            return  # created by ensure_run_dir, which checks what it makes
        if stat.S_ISLNK(lst.st_mode):
            hops += 1
            if lst.st_uid not in (0, me) or hops > 40:
                raise RunDirError(f"run dir {p}: {nxt} above it is a symlink owned by uid "
                                  f"{lst.st_uid}; refusing to use it")
            target = Path(os.readlink(nxt))
            if target.is_absolute():
                cur = Path("/")
            todo = [x for x in target.parts if x != "/"] + todo
            continue
        cur = nxt


def check_run_dir(p: Path) -> None:
    """Raise :class:`RunDirError` unless ``p`` exists and is safe for us to use;
    ``FileNotFoundError`` if it does not exist."""
    p = Path(os.path.abspath(p))
    _check_ancestors(p)
    _check_owned_dir(p, os.lstat(p))


def ensure_run_dir(p: Path) -> Path:
    """Create the run dir (and any missing directory above it) 0700 and owned by
    us, or check the existing one; raise :class:`RunDirError` when it is not
    safe.  Under any umask: the modes are set explicitly."""
    p = Path(os.path.abspath(p))
    _check_ancestors(p)
    missing = []
    q = p
    while not os.path.lexists(q):
        missing.append(q)
        q = q.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass  # raced with another command of ours; checked below like any other
        else:
            os.chmod(d, 0o700)  # mkdir's mode is cut by the umask, never widened
        _check_owned_dir(d, os.lstat(d))
    _check_owned_dir(p, os.lstat(p))
    return p


def daemon_socket(rd: Path | None = None) -> Path:
    return (rd or run_dir()) / "pyxend.sock"


def domain_socket(rd: Path, domid: int) -> Path:
    return rd / f"domain-{int(domid)}.sock"


def domain_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a domain, or None.  xl itself only requires a
    non-empty, unique name; its console daemon then builds ``guest-NAME.log``
    from it, so pyxen adds what keeps that a single, valid file name: printable
    (no control characters, no NUL), no '/', at most NAME_MAX_CHARS characters.
    Spaces and '~' are fine (real configs use them).  An all-digit name would be
    taken for a domid, and Domain-0 is the control domain."""
    if not isinstance(name, str):
        return "a domain name must be a string"
    if not name:
        return "a domain name must not be empty"
    if len(name) > NAME_MAX_CHARS or len(name.encode("utf-8", "replace")) > NAME_MAX_BYTES:
        return f"a domain name has at most {NAME_MAX_CHARS} characters"
    if not name.isprintable():
        return "a domain name must be printable (no control characters)"
    if "/" in name:
        return "a domain name must not contain '/'"
    if name.isdigit():
        return "an all-digit domain name would be taken for a domain id"
    if name == "Domain-0":
        return "'Domain-0' is reserved for the control domain"
    return None


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
    out = "".join(f"%{ord(c):02X}" if c in "%/" or ord(c) < 0x20 or ord(c) == 0x7F else c
                  for c in name) or "%00"
    while len(out.encode()) > 200:  # a component stays under NAME_MAX (255) with its prefix
        out = out[:-1]
    return out


def daemon_log(rd: Path) -> Path:
    return rd / "pyxend.log"
