"""Local users against the toolstack (issue 8, finding 6), attacked as a real second user.

Every test here makes real users with ``useradd`` (removed with ``userdel -r``),
starts pyxend as root under ``umask 000`` (the worst umask a first command can
have) and then attacks it the way the finding says:

* another user connects to pyxend.sock, xenstored.sock, xenstored-domain.sock
  and a console socket, with raw bytes (what an attacker would write; no pyxen
  code needed): refused by the run dir's mode, and refused again by SO_PEERCRED
  when the run dir has been opened up;
* the owner's own processes cannot take over a domain: a "register" for an
  existing domid, the domain-process ops (peer, evtchn-bind) and a xenstore
  ring relay claiming a domid are refused unless they come from that domain's
  process;
* name="x/../../..tmp/evil" sent as raw JSON, bypassing the config parser, is
  refused by the daemon and writes nothing outside the run dir;
* a pre-created symlinked or foreign-owned run dir, including the default
  /tmp/pyxen-UID/pyxen of a non-root user, is refused with one line.

On the code before the fix every one of these attacks succeeded.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, wait_listed

SYS_PYTHON = "/usr/bin/python3"  # the test's own python may live in root's 0700 home

# What the attacker runs: raw sockets only.  argv: socket path, hex of the bytes
# to send, mode ("line": read one line, "any": read until the first bytes).
# Prints {"connect": errno} | {"closed": true, "data": hex} | {"data": hex} (answered).
ATTACK = r"""
import json, socket, sys
path, payload, mode = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(path)
except OSError as e:
    print(json.dumps({"connect": e.errno}))
    sys.exit(0)
data = b""
try:
    s.sendall(payload)
    while True:
        b = s.recv(65536)
        if not b:
            print(json.dumps({"closed": True, "data": data.hex()}))
            sys.exit(0)
        data += b
        if mode == "any" or b"\n" in data:
            break
except OSError as e:
    print(json.dumps({"error": e.errno, "data": data.hex()}))
    sys.exit(0)
print(json.dumps({"data": data.hex()}))
"""

XS_READ = 2
XS_HEADER = struct.Struct("<IIII")  # type, req_id, tx_id, len (xenstore wire)
PXSD_HELLO = struct.Struct("<4sI")  # pyxen's xenstored-domain.sock greeting


def xs_read(path: str) -> bytes:
    body = path.encode() + b"\0"
    return XS_HEADER.pack(XS_READ, 7, 0, len(body)) + body


def jline(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# ---------------------------------------------------------------- users


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("SKIPPED LOUDLY: attacks by a second local user need root (useradd, runuser)")
    for tool in ("useradd", "userdel", "runuser"):
        if shutil.which(tool) is None:
            pytest.skip(f"SKIPPED LOUDLY: {tool} is not installed")


def _procs_of(uid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            for line in (d / "status").read_text().splitlines():
                if line.startswith("Uid:") and int(line.split()[1]) == uid:
                    out.append(int(d.name))
        except (OSError, ValueError):
            continue
    return out


class User:
    """A real local user made for one test module; ``run`` runs a command as it."""

    def __init__(self, role: str) -> None:
        self.name = f"pyx{role}{secrets.token_hex(3)}"
        subprocess.run(["useradd", "-M", "-N", "-s", "/bin/sh", self.name], check=True,
                       capture_output=True)
        pw = pwd.getpwnam(self.name)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid

    def run(self, argv: list[str], env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/", "LANG": "C.UTF-8"}
        envargs = [f"{k}={v}" for k, v in dict(base, **(env or {})).items()]
        return subprocess.run(["runuser", "-u", self.name, "--", "env", "-i", *envargs, *argv],
                              capture_output=True, text=True, timeout=timeout, cwd="/")

    def attack(self, path: Path | str, payload: bytes, mode: str = "line") -> dict[str, Any]:
        r = self.run([SYS_PYTHON, "-c", ATTACK, str(path), payload.hex(), mode])
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    def pyxen(self, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return self.run([SYS_PYTHON, "-m", "pyxen", *args], dict(env, PYTHONPATH=str(ROOT)))

    def remove(self) -> None:
        for pid in _procs_of(self.uid):  # anything a failed attack left running, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(100):
            if not _procs_of(self.uid):
                break
            time.sleep(0.05)
        subprocess.run(["userdel", "-r", self.name], capture_output=True)


@pytest.fixture(scope="module")
def intruder() -> Iterator[User]:
    _need_root()
    u = User("atk")
    try:
        yield u
    finally:
        u.remove()


@pytest.fixture(scope="module")
def victim() -> Iterator[User]:
    _need_root()
    u = User("vic")
    try:
        yield u
    finally:
        u.remove()


# ---------------------------------------------------------------- root's daemon under umask 000


class RootDaemon:
    def __init__(self, host: Any, rd: Path, domid: int) -> None:
        self.host, self.rd, self.domid = host, rd, domid

    @property
    def sockets(self) -> dict[str, Path]:
        return {"pyxend": self.rd / "pyxend.sock", "xenstored": self.rd / "xenstored.sock",
                "xenstored-domain": self.rd / "xenstored-domain.sock",
                "console": self.rd / f"domain-{self.domid}.sock"}


@pytest.fixture
def root_daemon(guest: Path) -> Iterator[RootDaemon]:
    """pyxend started by root from a command run under umask 000, with one
    ticking domain (its console keeps printing, so a console attach that is
    not refused gets bytes)."""
    _need_root()
    from pyxen.toolstack.api import Host
    rd = Path(f"/tmp/pyxen-lu-{os.getpid()}-{secrets.token_hex(4)}")
    old = os.umask(0)
    try:
        h = Host(run_dir=rd)
    finally:
        os.umask(old)
    try:
        domid = h.create(ROOT / "examples" / "ticker.cfg", ['name="lu-victim"'])
        wait_listed(h, lambda ds: any(d["domid"] == domid and d["state"] == "running" for d in ds),
                    what="lu-victim running")
        yield RootDaemon(h, rd, domid)
    finally:
        try:
            h.quit()
        except Exception:  # noqa: BLE001
            pass
        h.close()
        shutil.rmtree(rd, ignore_errors=True)


def _refused(res: dict[str, Any]) -> bool:
    """Refused: the connect failed, or the peer closed (or reset: it closed
    with our request unread) without a byte of answer."""
    closed = res.get("closed") is True or res.get("error") in (errno.ECONNRESET, errno.EPIPE)
    return "connect" in res or (closed and not res.get("data"))


def _attacks(d: RootDaemon) -> dict[str, tuple[Path, bytes, str]]:
    s = d.sockets
    spec = {"name": "evil", "memory_mib": 16, "kernel": str(ROOT / "guest/build/ticker")}
    return {
        "list": (s["pyxend"], jline({"op": "list"}), "line"),
        "create": (s["pyxend"], jline({"op": "create", "spec": spec, "actions": {}}), "line"),
        "destroy": (s["pyxend"], jline({"op": "destroy", "domain": d.domid}), "line"),
        "register": (s["pyxend"], jline({"event": "register", "domid": d.domid, "pid": 1}), "any"),
        "peer": (s["pyxend"], jline({"op": "peer", "domain": d.domid}), "line"),
        "xenstore": (s["xenstored"], xs_read(f"/local/domain/{d.domid}/name"), "any"),
        "xs-ring-relay": (s["xenstored-domain"], PXSD_HELLO.pack(b"PXSD", d.domid)
                          + xs_read(f"/local/domain/{d.domid}/name"), "any"),
        "console": (s["console"], b"{}\n", "any"),
    }


def _closed_unanswered(s: socket.socket) -> bool:
    """The server closed (or reset) the connection without a byte of answer."""
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True
    finally:
        s.close()


def _still_fine(d: RootDaemon) -> None:
    doms = d.host.list()
    assert [x["name"] for x in doms] == ["lu-victim"], doms
    d.host.pause(d.domid)  # its control channel is still the daemon's
    d.host.unpause(d.domid)


# ---------------------------------------------------------------- the attacks


def test_run_dir_and_sockets_are_owner_only_under_umask_000(root_daemon: RootDaemon) -> None:
    """Attacks the umask inheritance: started from umask 000, the run dir was
    0777 and every socket 0777.  Now 0700 / 0600, and so is every file pyxend,
    its zygote and its domain processes create in it."""
    rd = root_daemon.rd
    assert stat.S_IMODE(os.lstat(rd).st_mode) == 0o700
    for name, p in root_daemon.sockets.items():
        assert stat.S_IMODE(os.lstat(p).st_mode) == 0o600, name
    for p in rd.rglob("*"):
        mode = stat.S_IMODE(os.lstat(p).st_mode)
        assert mode & 0o077 == 0, f"{p} is {mode:04o}"
    assert stat.S_IMODE(os.lstat(rd / "console").st_mode) == 0o700


def test_other_user_cannot_reach_any_socket(root_daemon: RootDaemon, intruder: User) -> None:
    """Attacks pyxend, xenstored and a console from another local user with raw
    socket writes: list, create, destroy, register, peer, xenstore read, ring
    relay, console attach.  Every one is refused (the run dir is 0700), and
    the domain is untouched."""
    for what, (path, payload, mode) in _attacks(root_daemon).items():
        res = intruder.attack(path, payload, mode)
        assert _refused(res), f"{what}: {res}"
    _still_fine(root_daemon)


def test_peercred_refuses_other_users_even_through_an_open_run_dir(
        root_daemon: RootDaemon, intruder: User) -> None:
    """The second wall: the run dir and sockets opened to everyone (an admin's
    chmod, a bind mount): every socket still checks the peer's uid with
    SO_PEERCRED and closes the connection unanswered, with a line in dmesg."""
    rd = root_daemon.rd
    os.chmod(rd, 0o755)
    for p in root_daemon.sockets.values():
        os.chmod(p, 0o666)
    try:
        for what, (path, payload, mode) in _attacks(root_daemon).items():
            res = intruder.attack(path, payload, mode)
            assert "connect" not in res, f"{what}: the chmod did not open the way: {res}"
            assert _refused(res), f"{what}: {res}"
        _still_fine(root_daemon)
        log = "\n".join(root_daemon.host.dmesg())
        assert f"refused a connection to pyxend.sock from uid {intruder.uid}" in log, log
    finally:
        os.chmod(rd, 0o700)


def test_other_users_cli_gets_one_line(root_daemon: RootDaemon, intruder: User) -> None:
    """The CLI of another user pointed at root's run dir: one line naming the
    run dir and why, exit status 1, no traceback, nothing started."""
    r = intruder.pyxen(["list"], {"PYXEN_RUN_DIR": str(root_daemon.rd)})
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyxen: "), r.stderr
    assert str(root_daemon.rd) in lines[0] and "Traceback" not in r.stderr


def test_register_takeover_by_another_process_is_refused(root_daemon: RootDaemon) -> None:
    """Attacks the control channel: any process (here even one of the owner's)
    sends {"event":"register","domid":N}.  Only the process the zygote forked
    for domain N may register it; this one is closed, the domain keeps its
    channel (pause/unpause still answered)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(root_daemon.sockets["pyxend"]))
    s.sendall(jline({"event": "register", "domid": root_daemon.domid, "pid": os.getpid(),
                     "sock": str(root_daemon.sockets["console"])}))
    assert _closed_unanswered(s)
    _still_fine(root_daemon)
    assert "refused register" in "\n".join(root_daemon.host.dmesg())


def test_forged_adoption_is_refused(root_daemon: RootDaemon) -> None:
    """Attacks the daemon-restart path: a process that is no surviving domain
    process registers with "adopt" for a free domid, to plant a domain record
    (and then speak as that domain).  Only the process that serves that
    domid's domain-N.sock may be adopted; this one is closed, nothing appears."""
    spec = {"name": "ghost", "memory_mib": 16, "kernel": str(ROOT / "guest/build/ticker"),
            "extra": {"actions": {}}}
    ghost = root_daemon.domid + 100
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(root_daemon.sockets["pyxend"]))
    s.sendall(jline({"event": "register", "adopt": True, "domid": ghost, "pid": os.getpid(),
                     "spec": spec, "state": "running"}))
    assert _closed_unanswered(s)
    _still_fine(root_daemon)
    assert "refused adoption" in "\n".join(root_daemon.host.dmesg())


def test_domain_process_ops_only_from_domain_processes(root_daemon: RootDaemon) -> None:
    """Attacks the brokering ops: a client that is not a domain process asks for
    a domain's memory ("peer") or binds an event channel in its name; both are
    refused (EPERM), and a xenstore ring relay claiming the domid is closed."""
    from pyxen.toolstack.proto import Conn
    c = Conn.connect(str(root_daemon.sockets["pyxend"]), timeout=10)
    try:
        r = c.call({"op": "peer", "domain": root_daemon.domid})
        assert r.get("ok") is False and r.get("errno") == 1 and "memfd" not in r, r
        r = c.call({"op": "evtchn-bind", "domain": root_daemon.domid, "from_dom": root_daemon.domid,
                    "from_port": 1, "port": 1})
        assert r.get("ok") is False and r.get("errno") == 1, r
    finally:
        c.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(root_daemon.sockets["xenstored-domain"]))
    s.sendall(PXSD_HELLO.pack(b"PXSD", root_daemon.domid) + xs_read("/local/domain/0"))
    assert _closed_unanswered(s)
    _still_fine(root_daemon)


def test_path_traversal_name_refused_by_the_daemon(root_daemon: RootDaemon) -> None:
    """Attacks the file path built from a domain name: name="x/../../../../tmp/..."
    as raw JSON (the config parser never sees it) made the domain process create
    a root-owned file outside the run dir.  The daemon refuses the name itself,
    and no file appears; a NUL or control character is refused the same way."""
    rd = root_daemon.rd
    ups = len(rd.parts) + 1  # console/guest-x, then up to /
    target = Path(f"/tmp/pyxen-evil-{secrets.token_hex(4)}")
    evil = "x/" + "../" * ups + str(target).lstrip("/")
    spec = {"name": evil, "memory_mib": 16, "kernel": str(ROOT / "guest/build/ticker")}
    from pyxen.toolstack.api import PyxenError
    try:
        for name in (evil, "a\0b", "tab\there", "x" * 65, "Domain-0", "42"):
            with pytest.raises(PyxenError, match="name"):
                root_daemon.host.create_request({"op": "create", "spec": dict(spec, name=name),
                                                 "actions": {}})
        for bad in ({"memory_mib": "16"}, {"memory_mib": 1 << 40}, {"vcpus": True},
                    {"kernel": "guest/build/ticker"}, {"ramdisk": "\0"}, {"uuid": "nope"},
                    {"surprise": 1}, {"extra": {"disks": [{"spec": "vdev=xvda,target=/etc/shadow",
                                                           "target": "etc/shadow"}]}}):
            with pytest.raises(PyxenError):
                root_daemon.host.create_request({"op": "create", "spec": dict(spec, name="ok", **bad),
                                                 "actions": {}})
        assert not Path(str(target) + ".log").exists()
        assert not (rd / "console" / "guest-x").exists()
        _still_fine(root_daemon)
    finally:
        Path(str(target) + ".log").unlink(missing_ok=True)


def test_xl_names_with_spaces_and_tilde_work(root_daemon: RootDaemon) -> None:
    """What xl accepts stays accepted: a name with a space and a '~' (through
    the config parser and the daemon) creates a domain, and its console log is
    guest-NAME.log in the run dir, mode 0600."""
    domid = root_daemon.host.create(ROOT / "examples" / "ticker.cfg", ['name="my vm~1"'])
    try:
        names = {d["name"] for d in root_daemon.host.list()}
        assert "my vm~1" in names
        log = root_daemon.rd / "console" / "guest-my vm~1.log"
        assert log.exists() and stat.S_IMODE(log.stat().st_mode) == 0o600
        root_daemon.host.pause("my vm~1")
        root_daemon.host.unpause("my vm~1")
    finally:
        root_daemon.host.destroy(domid)


def test_precreated_run_dirs_are_refused(intruder: User, guest: Path) -> None:
    """Attacks the run dir choice: another user pre-creates the directory the
    victim (root here) will use, as a symlink to a directory of theirs or as a
    directory of their own.  Each is refused with one line naming it, and no
    daemon starts (no socket appears in the attacker's directory)."""
    tag = secrets.token_hex(4)
    trap = Path(f"/tmp/pyxen-lu-trap-{tag}")
    link = Path(f"/tmp/pyxen-lu-link-{tag}")
    r = intruder.run(["sh", "-c", f"umask 000; mkdir -m 777 {trap} && ln -s {trap} {link}"])
    assert r.returncode == 0, r.stderr
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for rd, why in ((link, "symlink"), (trap, f"owned by uid {intruder.uid}")):
            p = subprocess.run([sys.executable, "-m", "pyxen", "list"], capture_output=True, text=True,
                               env=dict(env, PYXEN_RUN_DIR=str(rd)), timeout=60, cwd=ROOT)
            assert p.returncode == 1, p
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and str(rd) in lines[0] and why in lines[0], p.stderr
            assert not list(trap.iterdir()), list(trap.iterdir())
        # a directory of ours that others may enter is refused too (never repaired)
        mine = Path(f"/tmp/pyxen-lu-open-{tag}")
        mine.mkdir(mode=0o755)
        os.chmod(mine, 0o755)
        try:
            p = subprocess.run([sys.executable, "-m", "pyxen", "list"], capture_output=True, text=True,
                               env=dict(env, PYXEN_RUN_DIR=str(mine)), timeout=60, cwd=ROOT)
            assert p.returncode == 1 and "0755" in p.stderr and len(p.stderr.splitlines()) == 1, p
            assert not list(mine.iterdir())
        finally:
            shutil.rmtree(mine, ignore_errors=True)
    finally:
        link.unlink(missing_ok=True)
        shutil.rmtree(trap, ignore_errors=True)


def test_default_tmp_run_dir_trap_is_refused(intruder: User, victim: User) -> None:
    """Attacks the non-root default /tmp/pyxen-UID/pyxen: the attacker creates
    /tmp/pyxen-<victim uid> before the victim's first command, with 'pyxen' a
    symlink into a directory of the attacker's.  The victim's `pyxen list` is
    refused in one line; nothing of the victim's lands in the attacker's
    directory (before the fix, the victim's daemon bound its socket there)."""
    base = Path(f"/tmp/pyxen-{victim.uid}")
    grab = Path(f"/tmp/pyxen-lu-grab-{secrets.token_hex(4)}")
    shutil.rmtree(base, ignore_errors=True)
    r = intruder.run(["sh", "-c", f"umask 000; mkdir -m 777 {base} {grab} && ln -s {grab} {base}/pyxen"])
    assert r.returncode == 0, r.stderr
    try:
        p = victim.pyxen(["list"], {})
        assert p.returncode == 1, p
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pyxen: run dir") and "Traceback" not in p.stderr, \
            p.stderr
        assert not list(grab.iterdir()), list(grab.iterdir())
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(grab, ignore_errors=True)


def test_default_tmp_run_dir_is_made_safe(victim: User) -> None:
    """The victim's own first command makes /tmp/pyxen-UID and its pyxen/ 0700
    and owned by the victim (checked: `daemon status` creates nothing, so use
    the checker directly as the victim)."""
    base = Path(f"/tmp/pyxen-{victim.uid}")
    shutil.rmtree(base, ignore_errors=True)
    snippet = ("import os; from pyxen.toolstack import paths; "
               "print(paths.ensure_run_dir(paths.run_dir()))")
    try:
        r = victim.run([SYS_PYTHON, "-c", snippet], {"PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{base}/pyxen"
        for p in (base, base / "pyxen"):
            st = os.lstat(p)
            assert stat.S_ISDIR(st.st_mode) and st.st_uid == victim.uid
            assert stat.S_IMODE(st.st_mode) == 0o700
    finally:
        shutil.rmtree(base, ignore_errors=True)
