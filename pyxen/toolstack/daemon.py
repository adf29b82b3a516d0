"""pyxend: the host daemon that keeps the domain table.

Started on demand by the CLI or the API.  It allocates domain IDs, asks the
zygote to fork a process per domain, tracks each domain's state from the
events that process sends, applies the config's on_poweroff/on_reboot/
on_crash actions, keeps the hypervisor log (``pyxen dmesg``) and answers the
control socket.  It never runs guest code itself, so a misbehaving domain
cannot take it down.

Who may talk to it (docs/security-notes/local-users.md): the run dir is 0700
and ours (paths.ensure_run_dir), every file and socket in it is created under
umask 077, and every connection to every socket it serves (pyxend.sock,
xenstored.sock, xenstored-domain.sock) is checked with SO_PEERCRED: only the
daemon's owner and root are served.  A domain process is recognised by its
pid, which the zygote reported when it forked it: "register", the domain's
events and the domain-process ops (peer, evtchn-*) are accepted from that
process only.  Every field of every request is checked by validate.py.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..xenstore.server import Xenstored, XenstoreServer
from ..xenstore.tree import XsError
from . import paths, validate
from .proto import Conn, PeerCred, ProtocolError, peer_allowed, peer_cred
from .validate import MAX_DOMID, RequestError
from .xsdomain import DomainSocket, write_domain_layout, write_ring_nodes, write_vbd, write_vif

# ops only a domain process (the one the zygote forked for a domain) may send,
# on a connection of its own; it may send nothing else
DOMAIN_OPS = frozenset({"peer", "evtchn-bind", "evtchn-unbind"})
EPERM, ESRCH = 1, 3


@dataclass
class Record:
    domid: int
    name: str
    spec: dict[str, Any]
    actions: dict[str, str]
    state: str = "creating"
    reason: str | None = None
    pid: int = 0
    sock: str = ""
    conn: Conn | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    created: float = field(default_factory=time.time)
    pending: dict[int, Any] = field(default_factory=dict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    crash: str = ""
    memfd: int = -1
    max_pages: int = 0
    start_info: dict[str, int] = field(default_factory=dict)
    spawned: threading.Event = field(default_factory=threading.Event)  # pid is known
    progress: dict[str, int] = field(default_factory=dict)  # of a save or restore under way
    restore_stats: dict[str, Any] = field(default_factory=dict)
    reserved: threading.Event = field(default_factory=threading.Event)  # an incoming migration's
    busy: str = ""  # a save or migration under way: no second one meanwhile
    prepared: bool = False  # an incoming migration's entries were written at the reservation
    # an incoming migration's "start", sent by the connection's reader at "ready" (its reply's event)
    start_sent: threading.Event | None = None


class Daemon:
    def __init__(self, rundir: Path, memory_mib: int = 0) -> None:
        self.rundir = rundir
        # --memory: the RAM this host has for its domains, as a Xen host has a
        # fixed amount; a create, restore or migration reservation that needs
        # more than is left is refused before anything is built (0: only
        # MemAvailable limits, hostmem.size_problem)
        self.memory_mib = memory_mib
        self.lock = threading.RLock()
        self.domains: dict[int, Record] = {}
        self.dmesg: list[str] = []
        self.ids = itertools.count(1)
        self.zygote: subprocess.Popen[str] | None = None
        self.zlock = threading.Lock()
        self.quit = threading.Event()
        self.start_time = time.time()
        self.reserved: dict[int, float] = {}  # domid -> until when (domains to re-adopt)
        self.last_domid = 0
        self.xsd = Xenstored(rundir / "xenstore.json", flush_delay=0.5)
        self.xs_server: XenstoreServer | None = None
        self.xs_domains: DomainSocket | None = None
        self.refused_at = 0.0  # rate limit of "refused connection" log lines
        self.refused_quiet = 0

    @property
    def xenstore_socket(self) -> Path:
        return self.rundir / "xenstored.sock"

    # ------------------------------------------------------------ log
    def log(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.lock:
            self.dmesg.append(f"[{stamp}] {line}")
            del self.dmesg[:-5000]

    # ------------------------------------------------------------ zygote
    def _zygote(self) -> subprocess.Popen[str]:
        if self.zygote is None or self.zygote.poll() is not None:
            self.zygote = subprocess.Popen(
                [sys.executable, "-m", "pyxen.toolstack.zygote"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=False)
        return self.zygote

    def spawn(self, domid: int, spec: dict[str, Any]) -> int:
        with self.zlock:
            z = self._zygote()
            assert z.stdin and z.stdout
            z.stdin.write(json.dumps({"domid": domid, "spec": spec, "rundir": str(self.rundir)}) + "\n")
            z.stdin.flush()
            reply = json.loads(z.stdout.readline() or "{}")
        if "pid" not in reply:
            raise RuntimeError(f"zygote failed: {reply.get('error', 'no reply')}")
        return int(reply["pid"])

    # ------------------------------------------------------------ domains
    def _find(self, ref: Any) -> Record:
        with self.lock:
            if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
                r = self.domains.get(int(ref))
                if r:
                    return r
            for r in self.domains.values():
                if r.name == ref:
                    return r
        raise LookupError(f"no domain {ref!r}")

    def _alloc_domid(self) -> int:
        """As Xen's domctl: a rover, the next free ID after the last one created,
        so a restarted domain (reboot) gets a new ID."""
        with self.lock:
            now = time.monotonic()
            for i in range(MAX_DOMID - 1):
                d = (self.last_domid + i) % (MAX_DOMID - 1) + 1
                if d not in self.domains and self.reserved.get(d, 0) < now:
                    self.last_domid = d
                    return d
        raise RuntimeError("out of domain IDs")

    def create(self, spec: dict[str, Any], actions: dict[str, str], restore: str | None = None,
               incoming: bool = False) -> Record:
        """Create a domain; with ``restore`` (a save file) the domain process
        restores it from the file instead of building it from a kernel; with
        ``incoming`` (a live migration's reservation stage) it makes the empty
        domain and waits for the stream (``migrate-receive`` hands it the
        connection): this returns once the domain is reserved, and
        ``_finish_incoming`` completes the create when the stream has ended."""
        name = spec["name"]
        with self.lock:
            for r in self.domains.values():
                if r.name == name:
                    raise ValueError(f"domain with name {name!r} already exists (domid {r.domid})")
            short = self._short_of_memory(spec)
            if short:
                raise ValueError(short)
            domid = self._alloc_domid()
            spec = dict(spec, domid=domid)
            spec["extra"] = dict(spec.get("extra") or {}, actions=actions)
            rec = Record(domid, name, spec, actions)
            if restore is not None:  # seen by the domain process only (it drops it)
                spec = dict(spec, extra=dict(spec["extra"], restore=restore))
            if incoming:
                spec = dict(spec, extra=dict(spec["extra"], incoming=True))
            self.domains[domid] = rec
        try:
            rec.pid = self.spawn(domid, spec)
        except Exception:
            with self.lock:
                self.domains.pop(domid, None)
            rec.spawned.set()
            raise
        rec.spawned.set()  # its "register" is believed from this pid only
        if incoming:
            if not rec.reserved.wait(30):
                rec.error = rec.error or "domain process did not reserve the domain in 30 s"
            if rec.error:
                with self.lock:
                    self.domains.pop(domid, None)
                self._kill(rec)
                raise ValueError(rec.error)
            self._prepare_incoming(rec)
            self.log(f"domain {domid} ({name}) reserved for an incoming migration, pid {rec.pid}")
            threading.Thread(target=self._finish_incoming, args=(rec,), daemon=True).start()
            return rec
        if not rec.ready.wait(30):
            rec.error = rec.error or "domain process did not start in 30 s"
        if rec.error:
            with self.lock:
                self.domains.pop(domid, None)
            self._kill(rec)
            raise ValueError(rec.error)
        self._introduce(rec)
        self.request(rec, "start", timeout=30, paused=bool((spec.get("extra") or {}).get("paused")))
        self.log(f"created domain {domid} ({name}), pid {rec.pid}")
        return rec

    def _short_of_memory(self, spec: dict[str, Any]) -> str | None:
        """Why this host (``--memory``) cannot hold the domain ``spec`` next
        to the ones it has, or None.  Each domain counts its maxmem (what it
        may balloon up to), as Xen's reservation of a domain's memory."""
        if not self.memory_mib:
            return None

        def size(s: dict[str, Any]) -> int:
            return max(int(s.get("memory_mib") or 0), int(s.get("maxmem_mib") or 0))
        used = sum(size(r.spec) for r in self.domains.values())
        need = size(spec)
        if used + need <= self.memory_mib:
            return None
        return (f"memory: the domain needs {need} MiB and this host has {self.memory_mib - used} MiB "
                f"free ({self.memory_mib} MiB for domains, pyxend --memory; {used} MiB in use)")

    def _introduce(self, rec: Record) -> None:
        """As libxl: the domain's xenstore entries exist before it runs."""
        domid, spec = rec.domid, rec.spec
        try:
            self.xsd.introduce(domid, rec.start_info.get("store_mfn", 0),
                               rec.start_info.get("store_evtchn", 0))
            self._write_entries(domid, spec, rec.start_info)
        except XsError as e:
            self.log(f"xenstore entries for domain {domid}: {e}")

    def _write_entries(self, domid: int, spec: dict[str, Any], info: dict[str, int]) -> None:
        """The domain's directory as libxl writes it, then its vbd and vif
        nodes (an incoming migration's ``info`` is {} until END: its ring
        nodes follow then, :meth:`_introduce_rings`)."""
        write_domain_layout(self.xsd, domid, spec, info)
        extra = spec.get("extra") or {}
        for disk in extra.get("disks", []):
            write_vbd(self.xsd, domid, disk)
        for vif in extra.get("vifs", []):
            write_vif(self.xsd, domid, vif)

    def _prepare_incoming(self, rec: Record) -> None:
        """At an incoming migration's reservation, what does not depend on
        the stream: the domain's xenstore entries (all but the four nodes
        of its store and console rings, known at END) and its vifs' backends
        made and waiting in InitWait, their TAPs still down ("prestart").
        Then END to the unpause is the rings' nodes, the store's
        introduction and the TAPs brought up, not a dozen round trips.  A
        failure here is only logged: "start" does whatever was not done."""
        domid, spec = rec.domid, rec.spec
        try:
            self._write_entries(domid, spec, {})
        except XsError as e:
            self.log(f"xenstore entries for incoming domain {domid}: {e}")
            return
        rec.prepared = True
        try:
            self.request(rec, "prestart", timeout=30)
        except (RuntimeError, TimeoutError, OSError) as e:
            self.log(f"incoming domain {domid}: backends not made ahead ({e}); at start instead")

    def _introduce_rings(self, rec: Record) -> None:
        """The part of :meth:`_introduce` that needs the stream's start_info
        (:meth:`_prepare_incoming` wrote the rest): the store introduced
        with its ring, the ring nodes written."""
        domid, info = rec.domid, rec.start_info
        try:
            self.xsd.introduce(domid, info.get("store_mfn", 0), info.get("store_evtchn", 0))
            write_ring_nodes(self.xsd, domid, info)
        except XsError as e:
            self.log(f"xenstore entries for domain {domid}: {e}")

    def _start_incoming(self, rec: Record) -> None:
        """An incoming migration's domain process said "ready" (its stream is
        applied): the rings' nodes written and "start" sent from here, the
        connection's reader, in the downtime, rather than after waking
        ``_finish_incoming``'s thread; that thread waits for the reply."""
        self._introduce_rings(rec)
        ev = threading.Event()
        rec.pending[id(ev)] = ev
        with rec.send_lock:
            try:
                rec.conn.send({"op": "start", "id": id(ev), "paused": True})  # type: ignore[union-attr]
            except OSError:
                pass  # the process is gone: _domain_gone answers the waiter
        rec.start_sent = ev

    def _finish_incoming(self, rec: Record) -> None:
        """An incoming migration's domain once its stream ended (the domain
        process's "ready"): its xenstore entries, then "start" paused; the
        domain process unpauses it when the sender says go (commitment).  A
        domain process that exits before (connection cut, bad stream) leaves
        no domain: _domain_gone removed it."""
        rec.ready.wait()
        if rec.error:
            with self.lock:
                if self.domains.get(rec.domid) is rec:
                    self.domains.pop(rec.domid, None)
            self._kill(rec)
            self.log(f"incoming domain {rec.domid} ({rec.name}) failed: {rec.error}")
            return
        try:
            ev = rec.start_sent
            if ev is None:  # (not prepared at the reservation: everything now)
                self._introduce(rec)
                self.request(rec, "start", timeout=30, paused=True)
            else:
                rid = id(ev)
                if not ev.wait(30):
                    rec.pending.pop(rid, None)
                    raise TimeoutError(f"domain {rec.domid} did not answer 'start'")
                reply = rec.pending.pop(rid)
                if not reply.get("ok"):
                    raise RuntimeError(reply.get("error", "failed"))
        except (RuntimeError, TimeoutError, OSError) as e:
            self.log(f"incoming domain {rec.domid} ({rec.name}): start failed: {e}")
            self.destroy(rec)
            return
        self.log(f"incoming domain {rec.domid} ({rec.name}) received, pid {rec.pid}")

    def _kill(self, rec: Record) -> None:
        if rec.pid:
            try:
                os.kill(rec.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def request(self, rec: Record, op: str, timeout: float = 10.0, raw: bool = False,
                **kw: Any) -> dict[str, Any]:
        """Ask the domain process; its reply (``raw``: even a failed one, errno and all)."""
        if rec.conn is None:
            raise RuntimeError(f"domain {rec.domid} is not connected")
        ev = threading.Event()
        rid = id(ev)
        rec.pending[rid] = ev
        with rec.send_lock:
            rec.conn.send(dict(kw, op=op, id=rid))
        if not ev.wait(timeout):
            rec.pending.pop(rid, None)
            raise TimeoutError(f"domain {rec.domid} did not answer {op!r}")
        reply = rec.pending.pop(rid)
        if not reply.get("ok") and not raw:
            raise RuntimeError(reply.get("error", "failed"))
        return dict(reply)

    def forward(self, rec: Record, op: str, **kw: Any) -> dict[str, Any]:
        """A request to a domain process whose reply (errno included) goes back as is."""
        reply = self.request(rec, op, raw=True, **kw)
        reply.pop("reply", None)
        return reply

    def destroy(self, rec: Record) -> None:
        with self.lock:
            self.domains.pop(rec.domid, None)
        try:
            if rec.conn is not None:
                self.request(rec, "destroy", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            self._kill(rec)
        self.log(f"destroyed domain {rec.domid} ({rec.name})")
        self._xs_release(rec.domid)
        self._peer_gone(rec.domid)

    def _xs_rm_vbd(self, domid: int, devid: int) -> None:
        for path in (f"/local/domain/0/backend/vbd/{domid}/{devid}",
                     f"/local/domain/{domid}/device/vbd/{devid}"):
            try:
                self.xsd.rm(path)
            except XsError:
                pass

    def _xs_rm_dev(self, domid: int, kind: str, devid: int) -> None:
        for path in (f"/local/domain/0/backend/{kind}/{domid}/{devid}",
                     f"/local/domain/{domid}/device/{kind}/{devid}"):
            try:
                self.xsd.rm(path)
            except XsError:
                pass

    def _xs_release(self, domid: int) -> None:
        """The domain is gone: release it in xenstored and, as libxl does, remove
        its /local/domain/N and /vm/UUID directories."""
        dp = f"/local/domain/{domid}"
        try:
            vm = self.xsd.read(f"{dp}/vm").decode()
        except XsError:
            vm = ""
        try:
            if domid in self.xsd.domains:
                self.xsd.release(domid)
        except XsError:
            pass
        for path in (dp, vm, f"/local/domain/0/backend/vbd/{domid}", f"/local/domain/0/backend/vif/{domid}"):
            if path.startswith("/"):
                try:
                    self.xsd.rm(path)
                except XsError:
                    pass

    def _drop_nat_tables(self, rec: Record) -> None:
        """A NAT vif's nftables table outlives a domain process that was
        killed before it could undo it (its TAP, routes and proxy_arp go
        with the process): remove it.  A process that exited cleanly has."""
        from ..backends import vifmode
        for vif in (rec.spec.get("extra") or {}).get("vifs", []):
            if vifmode.builtin_mode(str(vif.get("script") or "")) != "nat":
                continue
            name = str(vif.get("vifname") or "") or f"vif{rec.domid}.{vif.get('devid', 0)}"
            try:
                if vifmode.drop_nat_table(name):
                    self.log(f"domain {rec.domid}: removed {name}'s NAT table, which its process "
                             "left behind")
            except Exception as e:  # noqa: BLE001 - pyroute2 missing, netlink refused: said
                self.log(f"domain {rec.domid}: cannot check {name}'s NAT table: {e}")

    def _peer_gone(self, domid: int) -> None:
        """Tell every other domain process that ``domid`` is gone (its event
        channels to us become unbound, its grant mappings died with it)."""
        with self.lock:
            others = [r for r in self.domains.values() if r.conn is not None]
        for r in others:
            try:
                with r.send_lock:
                    r.conn.send({"op": "peer-gone", "domid": domid, "id": 0})  # type: ignore[union-attr]
            except OSError:
                pass

    def _registrant(self, first: dict[str, Any], cred: PeerCred) -> Record | None:
        """The record a "register" may take, or None (logged): a domain being
        created registers from the very process the zygote forked for it
        (SO_PEERCRED pid, not the pid it claims); a domain process of a previous
        daemon ("adopt") registers for a domid no one has."""
        try:
            domid = validate.domid(first.get("domid"))
            sock = validate.path_of_domain_socket(self.rundir, domid, first.get("sock"))
        except RequestError as e:
            self.log(f"refused register from pid {cred.pid}: {e}")
            return None
        rec = self.domains.get(domid)
        if rec is None and first.get("adopt") is True:
            rec = self._adopt(domid, first, cred)
            if rec is None:
                return None
        elif rec is None:
            self.log(f"refused register for domain {domid} from pid {cred.pid}: no such domain")
            return None
        else:
            rec.spawned.wait(30)  # the zygote's reply may come after the child's first words
            if rec.pid != cred.pid or rec.conn is not None:
                self.log(f"refused register for domain {domid} from pid {cred.pid}: "
                         f"not its domain process (pid {rec.pid})")
                return None
        rec.sock = sock
        return rec

    def _domain_events(self, conn: Conn, first: dict[str, Any], cred: PeerCred) -> None:
        """Serve one domain process's connection (runs in its own thread)."""
        rec = self._registrant(first, cred)
        if rec is None:
            conn.close()
            return
        rec.conn = conn
        if first.get("adopt"):  # its xenstore connections died with the previous daemon
            threading.Thread(target=self._reconnect, args=(rec,), daemon=True).start()
        while True:
            try:
                msg = conn.recv()
            except (OSError, ProtocolError):
                msg = None
            if msg is None:
                break
            if "reply" in msg:
                ev = rec.pending.get(msg["reply"]) if isinstance(msg["reply"], int) else None
                if isinstance(ev, threading.Event):
                    rec.pending[msg["reply"]] = msg
                    ev.set()
                continue
            kind = msg.get("event")
            try:
                self._domain_event(rec, kind, msg)
            except (RequestError, TypeError, ValueError) as e:
                self.log(f"domain {rec.domid}: bad {kind!r} event: {e}")
        self._domain_gone(rec)

    def _domain_event(self, rec: Record, kind: object, msg: dict[str, Any]) -> None:
        """One event from a registered domain process, its fields checked."""
        if kind == "ready":
            info = msg.get("start_info") or {}
            if not isinstance(info, dict):
                raise RequestError("start_info must be an object")
            rec.start_info = {str(k): validate.integer(f"start_info {k}", v, 0, (1 << 63) - 1)
                              for k, v in info.items()}
            rec.memfd = validate.integer("memfd", msg.get("memfd", -1), -1, 1 << 20)
            rec.max_pages = validate.integer("max_pages", msg.get("max_pages", 0), 0, 1 << 40)
            rec.state = "running"
            if rec.prepared and rec.start_sent is None and rec.conn is not None:  # incoming
                self._start_incoming(rec)
            rec.ready.set()
        elif kind == "error":
            rec.error = str(msg.get("error"))[:4000]
            rec.ready.set()
            rec.reserved.set()
        elif kind == "reserved":  # an incoming migration's empty domain exists
            rec.memfd = validate.integer("memfd", msg.get("memfd", -1), -1, 1 << 20)
            rec.max_pages = validate.integer("max_pages", msg.get("max_pages", 0), 0, 1 << 40)
            rec.state = "incoming"
            rec.reserved.set()
        elif kind == "progress":  # of a save or restore: for `pyxen save/restore`'s display
            rec.progress = {k: validate.integer(k, msg.get(k, 0), 0, 1 << 62)
                            for k in ("pages", "total", "bytes", "ns")}
        elif kind == "restored":
            rec.restore_stats = {k: validate.integer(k, msg.get(k, 0), 0, 1 << 62)
                                 for k in ("pages", "bytes", "pinned", "ns", "saved_domid")}
        elif kind == "log":
            self.log(str(msg.get("line"))[:4000])
        elif kind == "state":
            was = rec.state
            rec.state = validate.string("state", msg.get("state"), 32)
            reason = msg.get("reason")
            rec.reason = None if reason is None else validate.string("reason", reason, 32)
            rec.crash = str(msg.get("crash") or "")[:8000]
            if was == "shutdown" and rec.state in ("running", "blocked", "paused"):
                # it runs again after a suspend (a checkpoint, a failed save or
                # migration, a suspend that came after its request had timed
                # out): its next shutdown fires @releaseDomain again
                self._xs_resumed(rec.domid)
            if rec.state in ("shutdown", "crashed"):
                try:
                    self.xsd.domain_shutdown(rec.domid)
                except XsError:
                    pass
                threading.Thread(target=self._on_shutdown, args=(rec,), daemon=True).start()

    def _domain_gone(self, rec: Record) -> None:
        """The domain process's connection closed."""
        # the domain process is gone
        for k, v in list(rec.pending.items()):
            if isinstance(v, threading.Event):
                rec.pending[k] = {"ok": True}
                v.set()
        with self.lock:
            still = self.domains.get(rec.domid) is rec
            if still and rec.state != "creating":
                self.domains.pop(rec.domid, None)
                self.log(f"domain {rec.domid} ({rec.name}): domain process exited")
        if still:
            self._xs_release(rec.domid)
            self._peer_gone(rec.domid)
            self._drop_nat_tables(rec)
        if not rec.ready.is_set():
            rec.error = rec.error or "domain process exited during creation"
            rec.ready.set()
        rec.reserved.set()

    def _adopt(self, domid: int, msg: dict[str, Any], cred: PeerCred) -> Record | None:
        """A domain process that outlived a previous daemon registers again.
        Its spec is checked like a create's; its pid is the connection's."""
        try:
            spec = validate.adopted_spec(msg.get("spec"))
            state = validate.string("state", msg.get("state", "running"), 32)
            reason = msg.get("reason")
            reason = None if reason is None else validate.string("reason", reason, 32)
            memfd = validate.integer("memfd", msg.get("memfd", -1), -1, 1 << 20)
            max_pages = validate.integer("max_pages", msg.get("max_pages", 0), 0, 1 << 40)
        except RequestError as e:
            self.log(f"refused adoption of domain {domid} from pid {cred.pid}: {e}")
            return None
        if self.domain_caller(cred) is not None or self._listener_pid(domid) != cred.pid:
            self.log(f"refused adoption of domain {domid} from pid {cred.pid}: it is not the "
                     f"process serving {paths.domain_socket(self.rundir, domid).name}")
            return None
        spec["domid"] = domid
        actions = dict(spec["extra"]["actions"])
        with self.lock:
            if domid in self.domains or any(r.name == spec["name"] for r in self.domains.values()):
                self.log(f"refused adoption of domain {domid} ({spec['name']}) from pid {cred.pid}: "
                         "its domid or name is taken")
                return None
            rec = Record(domid, spec["name"], spec, actions, state=state, reason=reason,
                         pid=cred.pid, memfd=memfd, max_pages=max_pages)
            rec.ready.set()
            rec.spawned.set()
            self.domains[domid] = rec
            self.reserved.pop(domid, None)
        self.log(f"adopted domain {domid} ({rec.name}), pid {cred.pid}")
        if domid not in self.xsd.domains:  # else restored from xenstored's state file,
            try:                           # watches and all: introducing it again would reset it
                self.xsd.introduce(domid)
            except XsError:
                pass
        if rec.state in ("shutdown", "crashed"):
            threading.Thread(target=self._on_shutdown, args=(rec,), daemon=True).start()
        return rec

    def _listener_pid(self, domid: int) -> int | None:
        """The pid of the process listening on domain-N.sock (SO_PEERCRED of a
        client socket names the process that called listen()): a surviving
        domain process is the one that still serves its console."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(2)
            s.connect(str(paths.domain_socket(self.rundir, domid)))
            return peer_cred(s).pid
        except OSError:
            return None
        finally:
            s.close()

    def _reconnect(self, rec: Record) -> None:
        """Tell an adopted domain process to connect its guest's xenstore ring and
        its backends again (xenstored restored the tree and the guest's watches
        from its state file)."""
        try:
            self.request(rec, "reconnect")
            self.log(f"domain {rec.domid}: xenstore reconnected after adoption")
        except (RuntimeError, TimeoutError, OSError) as e:
            self.log(f"domain {rec.domid}: reconnecting after adoption failed: {e}")

    def _reserve_survivors(self) -> None:
        """Domain processes of a previous daemon keep their sockets; keep their
        IDs free for a while so they can register again (see domproc._readopt)."""
        for p in self.rundir.glob("domain-*.sock"):
            try:
                domid = int(p.stem.split("-", 1)[1])
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(0.5)
                s.connect(str(p))
                s.close()
            except (ValueError, OSError):
                continue
            self.reserved[domid] = time.monotonic() + 15

    def _on_shutdown(self, rec: Record) -> None:
        reason = rec.reason or "poweroff"
        key = {"poweroff": "on_poweroff", "reboot": "on_reboot", "crash": "on_crash",
               "watchdog": "on_watchdog", "soft_reset": "on_soft_reset",
               "suspend": "on_suspend"}.get(reason, "on_poweroff")
        if key == "on_suspend":  # a save suspended it: `save` takes it from here
            self.log(f"domain {rec.domid} ({rec.name}) suspended")
            return
        action = rec.actions.get(key, "destroy" if key != "on_reboot" else "restart")
        self.log(f"domain {rec.domid} ({rec.name}) {reason}: {key}={action}")
        if action == "preserve" or key == "on_suspend":
            return
        self.destroy(rec)
        if action in ("restart", "rename-restart", "coredump-restart", "soft-reset"):
            spec = {k: v for k, v in rec.spec.items() if k != "domid"}
            # `create -c` builds a domain paused until its console is attached; the
            # restarted domain has nobody to unpause it (xl: a reboot just runs)
            spec["extra"] = {k: v for k, v in (spec.get("extra") or {}).items() if k != "paused"}
            try:
                self.create(spec, rec.actions)
            except Exception as e:  # noqa: BLE001
                self.log(f"restart of {rec.name} failed: {e}")

    # ------------------------------------------------------------ client requests
    def domain_caller(self, cred: PeerCred) -> Record | None:
        """The domain whose domain process is at the other end of a connection
        (by its SO_PEERCRED pid, which the zygote reported when it forked it, or
        which an adopted process registered from), or None for any other client.
        This is how an op tells "domain N's process asks" from "a client asks"."""
        with self.lock:
            for r in self.domains.values():
                if r.pid and r.pid == cred.pid:
                    return r
        return None

    def handle(self, req: dict[str, Any], cred: PeerCred) -> dict[str, Any]:
        """One client request.  ``cred`` is the connection's SO_PEERCRED: the
        domain-process ops (DOMAIN_OPS) come from a domain process, never from
        anyone else, and a domain process may send nothing else (a compromised
        one must not create, destroy or reconfigure domains)."""
        op = req.get("op")
        if not isinstance(op, str):
            raise RequestError("op must be a string")
        caller = self.domain_caller(cred)
        if op in DOMAIN_OPS and caller is None:
            raise PermissionError(f"operation {op!r} is for domain processes only")
        if caller is not None and op not in DOMAIN_OPS:
            raise PermissionError(f"a domain process (domain {caller.domid}) may not ask for {op!r}")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "version": __version__}
        if op == "create":
            spec, actions = validate.spec(req.get("spec"), req.get("actions"))
            rec = self.create(spec, actions)
            return {"ok": True, "domid": rec.domid, "sock": rec.sock}
        if op == "list":
            with self.lock:
                recs = sorted(self.domains.values(), key=lambda r: r.domid)
            long = validate.boolean("long", req.get("long", False))
            out = []
            for r in recs:
                ent: dict[str, Any] = {"domid": r.domid, "name": r.name, "state": r.state,
                                       "memory": r.spec.get("memory_mib"), "vcpus": r.spec.get("vcpus"),
                                       "reason": r.reason, "pid": r.pid}
                if long and r.conn is not None and r.state not in ("creating",):
                    try:
                        ent["info"] = self.request(r, "info", timeout=2)["info"]
                    except (RuntimeError, TimeoutError, OSError):
                        pass
                out.append(ent)
            return {"ok": True, "domains": out}
        if op == "dmesg":
            with self.lock:
                lines = list(self.dmesg)
            if validate.boolean("clear", req.get("clear", False)):
                with self.lock:
                    self.dmesg.clear()
            return {"ok": True, "lines": lines}
        if op == "info":
            return {"ok": True, "info": self.host_info()}
        if op == "quit":
            self.quit.set()
            return {"ok": True}
        if op == "restore":
            path = validate.abs_path("file", req.get("file"))
            paused = validate.boolean("paused", req.get("paused", False))
            rspec, ractions = self.restore_spec(path, paused)
            rec = self.create(rspec, ractions, restore=path)
            return {"ok": True, "domid": rec.domid, "sock": rec.sock, "name": rec.name,
                    "stats": rec.restore_stats}
        if op == "migrate-incoming":  # migrate-receive: the reservation stage
            rspec, ractions = self.incoming_spec(req.get("config"))
            rec = self.create(rspec, ractions, incoming=True)
            return {"ok": True, "domid": rec.domid, "sock": rec.sock, "name": rec.name}
        try:
            rec = self._find(validate.domain_ref(req.get("domain")))
        except LookupError as e:
            return {"ok": False, "error": str(e), "errno": 3}  # ESRCH
        if op == "migrate":
            return self.migrate(rec, req)
        if op == "destroy":
            self.destroy(rec)
            return {"ok": True}
        if op == "save":
            path = validate.abs_path("file", req.get("file"))
            timeout = req.get("timeout", 10.0)
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
                raise RequestError("timeout must be a number of seconds from 0 to 3600")
            return self.save(rec, path, validate.boolean("checkpoint", req.get("checkpoint", False)),
                             float(timeout))
        if op == "progress":
            return {"ok": True, "progress": dict(rec.progress), "state": rec.state}
        if op == "console":
            return {"ok": True, "sock": rec.sock, "domid": rec.domid, "state": rec.state}
        if op in ("pause", "unpause"):
            self.request(rec, op)
            return {"ok": True}
        if op in ("shutdown", "reboot"):
            timeout = req.get("timeout", 10.0)
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600:
                raise RequestError("timeout must be a number of seconds from 0 to 3600")
            return self.shutdown(rec, op, float(timeout))
        if op == "domain-info":
            return {"ok": True, "info": self.request(rec, "info")["info"], "pid": rec.pid}
        if op == "block-attach":
            disk = validate.disk(req.get("disk"))
            write_vbd(self.xsd, rec.domid, disk)
            try:
                self.request(rec, "block-attach", disk=disk, timeout=30)
            except (RuntimeError, TimeoutError):
                self._xs_rm_vbd(rec.domid, int(disk["devid"]))
                raise
            (rec.spec.setdefault("extra", {}).setdefault("disks", [])).append(disk)
            return {"ok": True}
        if op == "block-detach":
            devid = validate.integer("devid", req.get("devid"), 0, (1 << 31) - 1)
            self.request(rec, "block-detach", devid=devid, timeout=30)
            disks = (rec.spec.get("extra") or {}).get("disks", [])
            disks[:] = [x for x in disks if int(x["devid"]) != devid]
            return {"ok": True}
        if op == "block-list":
            return {"ok": True, "disks": self.request(rec, "block-list")["disks"]}
        if op == "network-attach":
            vif = validate.vif(req.get("vif"))
            vifs = (rec.spec.setdefault("extra", {}).setdefault("vifs", []))
            if any(int(x["devid"]) == vif["devid"] for x in vifs):
                raise RequestError(f"vif {vif['devid']} is already attached")
            write_vif(self.xsd, rec.domid, vif)
            try:
                self.request(rec, "network-attach", vif=vif, timeout=30)
            except (RuntimeError, TimeoutError):
                self._xs_rm_dev(rec.domid, "vif", vif["devid"])
                raise
            vifs.append(vif)
            return {"ok": True, "vif": vif}
        if op == "network-detach":
            devid = validate.integer("devid", req.get("devid"), 0, (1 << 16) - 1)
            self.request(rec, "network-detach", devid=devid, timeout=30)
            vifs = (rec.spec.get("extra") or {}).get("vifs", [])
            vifs[:] = [x for x in vifs if int(x["devid"]) != devid]
            return {"ok": True}
        if op == "network-list":
            return {"ok": True, "vifs": self.request(rec, "network-list")["vifs"]}
        if op == "peer":
            assert caller is not None
            return self._peer_op(req, caller)
        if op in ("evtchn-bind", "evtchn-unbind"):
            assert caller is not None
            validate.port(req.get("port"))
            if req.get("from_dom") != caller.domid:  # a domain binds on its own behalf only
                raise PermissionError(f"domain {caller.domid} may not bind for domain "
                                      f"{req.get('from_dom')!r}")
            if op == "evtchn-bind":
                validate.port(req.get("from_port"), "from_port")
            fwd = "evtchn-accept" if op == "evtchn-bind" else "evtchn-remote-closed"
            return self.forward(rec, fwd, port=req.get("port"), from_dom=req.get("from_dom"),
                                from_port=req.get("from_port"))
        raise ValueError(f"unknown operation {op!r}")

    def _peer_op(self, req: dict[str, Any], asker: Record) -> dict[str, Any]:
        """Where domain ``domain``'s RAM memfd is, for the process of domain
        ``from_dom`` only: the connection must come from the pid we recorded
        for that domain (SO_PEERCRED: ``asker``, found by handle()), and the target's process must consent,
        which it does only if its guest granted ``from_dom`` something
        (directory.ProcessDirectory.consent).  Sizes are the daemon's own
        record of the target (its config), never what any process says."""
        try:
            from_dom = int(req.get("from_dom", -1))
            target = self._find(req.get("domain"))
        except (LookupError, ValueError, TypeError) as e:
            return {"ok": False, "error": f"peer: {e}", "errno": ESRCH}
        if from_dom != asker.domid:
            self.log(f"peer: refused domain {target.domid}'s memory to pid {asker.pid} "
                     f"(domain {asker.domid}'s process, asking as domain {from_dom})")
            return {"ok": False, "error": f"peer: the caller is not domain {from_dom}'s process",
                    "errno": EPERM}
        if target.memfd < 0 or target.conn is None:
            return {"ok": False, "error": f"domain {target.domid} has no memory yet", "errno": ESRCH}
        try:
            consent = self.forward(target, "peer-consent", from_dom=from_dom)
        except (TimeoutError, OSError) as e:
            return {"ok": False, "error": f"peer: domain {target.domid}: {e}", "errno": ESRCH}
        if not consent.get("ok"):
            return {"ok": False, "error": str(consent.get("error", "refused")), "errno": EPERM}
        spec = target.spec
        nr_pages = int(spec.get("memory_mib") or 0) * 256
        max_pages = max(int(spec.get("maxmem_mib") or 0) * 256, nr_pages)
        if max_pages != target.max_pages:  # the process was built for another size: trust neither
            return {"ok": False, "error": f"domain {target.domid}: size mismatch", "errno": ESRCH}
        return {"ok": True, "pid": target.pid, "memfd": target.memfd, "max_pages": max_pages,
                "nr_pages": nr_pages}

    def shutdown(self, rec: Record, how: str, timeout: float) -> dict[str, Any]:
        """As xl: ask the guest through control/shutdown if it advertises support
        (control/feature-poweroff), else, or if it does nothing within
        ``timeout`` seconds, shut it down through the hypervisor."""
        reason = 0 if how == "shutdown" else 1
        word = "poweroff" if how == "shutdown" else "reboot"
        ctl = f"/local/domain/{rec.domid}/control"
        try:
            feature = self.xsd.read(f"{ctl}/feature-{word}") == b"1"
        except XsError:
            feature = False
        if not feature:
            self.request(rec, "shutdown", reason=reason)
            return {"ok": True, "via": "hypercall"}
        self.xsd.write(f"{ctl}/shutdown", word)
        self.log(f"domain {rec.domid} ({rec.name}): asked to {word} through xenstore")

        def fallback() -> None:
            if self.domains.get(rec.domid) is rec and rec.state not in ("shutdown", "crashed"):
                self.log(f"domain {rec.domid} ({rec.name}) ignored control/shutdown for "
                         f"{timeout:g} s: forcing {word}")
                try:
                    self.request(rec, "shutdown", reason=reason)
                except (RuntimeError, TimeoutError, OSError):
                    pass
        t = threading.Timer(timeout, fallback)
        t.daemon = True
        t.start()
        return {"ok": True, "via": "xenstore"}

    def save(self, rec: Record, path: str, checkpoint: bool, timeout: float) -> dict[str, Any]:
        """``xl save [-c]``: suspend the guest as libxl does for a PV domain
        (a signal on its suspend event channel if it advertises one, else
        ``control/shutdown = "suspend"``; the guest answers with
        SCHEDOP_shutdown(SHUTDOWN_suspend)), have the domain process write the
        stream, then destroy the domain, or with ``checkpoint`` let it run on
        (its suspend hypercall returns 1).  A guest that does not suspend
        within ``timeout`` s is an error and keeps running, as with xl ("guest
        didn't acknowledge suspend"); so is a failed save (the domain process
        resumes it, the partial file is removed)."""
        if rec.state not in ("running", "blocked", "paused"):
            raise RuntimeError(f"domain {rec.domid} is {rec.state}: only a running domain can be saved")
        if rec.busy:
            raise RuntimeError(f"domain {rec.domid} is being {rec.busy}")
        rec.progress = {}
        self.log(f"domain {rec.domid} ({rec.name}): saving to {path}")
        # the domain process asks the guest to suspend (its suspend event channel, or
        # control/shutdown) and waits for it: it holds the domain's state
        reply = self.request(rec, "save", timeout=3600 + timeout, raw=True, file=path,
                             checkpoint=checkpoint, suspend_timeout=timeout)
        if reply.get("ok") and "pages" not in reply:  # _domain_gone's answer: the process died
            raise RuntimeError(f"domain {rec.domid}'s process exited during the save")
        if checkpoint or not reply.get("ok"):
            self._xs_resumed(rec.domid)
        if not reply.get("ok"):
            raise RuntimeError(str(reply.get("error", "save failed")))
        self.log(f"domain {rec.domid} ({rec.name}) saved to {path}" + (" (checkpoint)" if checkpoint else ""))
        if not checkpoint:
            self.destroy(rec)
        return {"ok": True, "pages": reply.get("pages"), "bytes": reply.get("bytes"),
                "seconds": reply.get("seconds")}

    def migrate(self, rec: Record, req: dict[str, Any]) -> dict[str, Any]:
        """``xl migrate``: the domain process sends the domain live to a
        receiver (``tcp`` "HOST:PORT", or ``cmd``, an argv such as ``ssh HOST
        pyxen migrate-receive`` whose stdin/stdout carry the stream); the
        domain is destroyed here only once the destination reported it runs
        (commitment).  Any failure before leaves it running: the domain
        process resumed it if it had suspended."""
        if rec.state not in ("running", "blocked", "paused"):
            raise RuntimeError(f"domain {rec.domid} is {rec.state}: only a running domain can be migrated")
        kw: dict[str, Any] = {}
        tcp, cmd = req.get("tcp"), req.get("cmd")
        if (tcp is None) == (cmd is None):
            raise RequestError("migrate needs one of tcp (HOST:PORT) and cmd (argv)")
        if tcp is not None:
            kw["tcp"] = validate.string("tcp", tcp, 300)
        else:
            if not isinstance(cmd, list) or not cmd or len(cmd) > 64:
                raise RequestError("cmd must be a non-empty list of strings")
            kw["cmd"] = [validate.string("cmd", c, 4096) for c in cmd]
        if req.get("key") is not None:
            k = validate.string("key", req.get("key"), 8192)
            if len(k) < 32 or len(k) % 2 or any(c not in "0123456789abcdef" for c in k):
                raise RequestError("key must be at least 16 bytes in lower-case hex")
            kw["key"] = k
        for key, lo, hi in (("min_rate", 1, 1e6), ("max_rate", 1, 1e6), ("max_rounds", 1, 1000),
                            ("few_pages", 0, 1 << 30), ("timeout", 0.1, 3600)):
            v = req.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise RequestError(f"{key} must be a number from {lo:g} to {hi:g}")
            kw["suspend_timeout" if key == "timeout" else key] = v
        with self.lock:
            if rec.busy:
                raise RuntimeError(f"domain {rec.domid} is already being {rec.busy}")
            rec.busy = "migrated"
        try:
            rec.progress = {}
            self.log(f"domain {rec.domid} ({rec.name}): migrating to "
                     + (kw.get("tcp") or " ".join(kw.get("cmd", []))))
            reply = self.request(rec, "migrate", timeout=24 * 3600, raw=True, **kw)
        finally:
            rec.busy = ""
        if reply.get("ok") and "stats" not in reply:  # _domain_gone's answer: the process died
            raise RuntimeError(f"domain {rec.domid}'s process exited during the migration")
        if not reply.get("ok"):
            if reply.get("suspended") and not reply.get("undefined"):
                self._xs_resumed(rec.domid)
            raise RuntimeError(str(reply.get("error", "migration failed")))
        self.log(f"domain {rec.domid} ({rec.name}) migrated: the destination runs it "
                 f"(domain {reply.get('remote_domid')} there)")
        self.destroy(rec)
        return {"ok": True, "stats": reply.get("stats"), "remote_domid": reply.get("remote_domid")}

    def _xs_resumed(self, domid: int) -> None:
        """The domain runs again after a suspend: what libxl's xs_resume_domain
        (XS_RESUME) does, so that its next shutdown fires @releaseDomain again."""
        with self.xsd.lock:
            dom = self.xsd.domains.get(domid)
            if dom is not None:
                dom.shutdown = False

    def restore_spec(self, path: str, paused: bool) -> tuple[dict[str, Any], dict[str, str]]:
        """The domain a save file holds: the config in its xl header, checked as
        a create request's (the file is the user's: nothing in it is trusted)."""
        from ..migration import stream
        try:
            with open(path, "rb") as f:
                hdr = stream.XlHeader.read(stream.Reader(f, path))
        except stream.StreamError as e:
            raise RuntimeError(str(e)) from None
        except OSError as e:
            raise RuntimeError(f"cannot read {path}: {e.strerror}") from None
        return self.incoming_spec(hdr.config_json(), paused, path)

    def incoming_spec(self, cfg: Any, paused: bool = False,
                      where: str = "migration stream") -> tuple[dict[str, Any], dict[str, str]]:
        """The domain an xl header's config describes, checked as a create
        request's (sizes against this host's memory: hostmem.size_problem)."""
        spec = cfg.get("pyxen_spec") if isinstance(cfg, dict) else None
        if not isinstance(spec, dict):
            raise RuntimeError(f"{where}: no pyxen domain config in the xl header")
        spec = {k: v for k, v in spec.items() if k != "domid"}
        extra = dict(spec.get("extra") or {})
        acts = extra.pop("actions", None)
        # the disks and the vifs go with the guest (issue 11: the destination
        # makes each vif's backend on its own bridge, same MAC and devid)
        extra = {k: v for k, v in extra.items() if k in ("disks", "vifs")}
        if paused:
            extra["paused"] = True
        spec["extra"] = extra
        return validate.spec(spec, acts)

    def host_info(self) -> dict[str, Any]:
        from ..hv.hypercalls import XEN_CAPABILITIES, XEN_EXTRA, XEN_MAJOR, XEN_MINOR
        mem_total = mem_free = 0
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                k, v = line.split(":", 1)
                if k == "MemTotal":
                    mem_total = int(v.split()[0]) // 1024
                elif k == "MemAvailable":
                    mem_free = int(v.split()[0]) // 1024
        except OSError:
            pass
        u = platform.uname()
        return {"host": u.node, "release": u.release, "version": u.version, "machine": u.machine,
                "nr_cpus": os.cpu_count(), "total_memory": mem_total, "free_memory": mem_free,
                "xen_major": XEN_MAJOR, "xen_minor": XEN_MINOR, "xen_extra": XEN_EXTRA,
                "xen_version": f"{XEN_MAJOR}.{XEN_MINOR}{XEN_EXTRA}",
                "xen_caps": XEN_CAPABILITIES.strip(), "pyxen_version": __version__,
                "kvm": os.path.exists("/dev/kvm"), "run_dir": str(self.rundir),
                "daemon_pid": os.getpid(), "daemon_uptime_s": round(time.time() - self.start_time, 1),
                "nr_domains": len(self.domains), "xenstore_socket": str(self.xenstore_socket)}

    # ------------------------------------------------------------ who may connect
    def admit(self, sock: socket.socket, where: str) -> PeerCred | None:
        """SO_PEERCRED of a connection just accepted on ``where``; None (and a
        line in dmesg, at most one a second with a count of the rest) when it
        is neither the daemon's owner nor root, whose connection the caller
        then closes unanswered."""
        try:
            cred = peer_cred(sock)
        except OSError:
            return None
        if peer_allowed(cred):
            return cred
        now = time.monotonic()
        with self.lock:
            if now - self.refused_at < 1.0:
                self.refused_quiet += 1
                return None
            quiet, self.refused_quiet, self.refused_at = self.refused_quiet, 0, now
        more = f" ({quiet} more refused before)" if quiet else ""
        self.log(f"refused a connection to {where} from uid {cred.uid} pid {cred.pid}: only uid "
                 f"{os.geteuid()} (the daemon's owner) and root may use pyxen{more}")
        return None

    def _admit_xenstore(self, sock: socket.socket) -> bool:
        return self.admit(sock, "xenstored.sock") is not None

    def _admit_xs_domain(self, sock: socket.socket, domid: int) -> bool:
        """xenstored-domain.sock: a guest's ring relay speaks for domain
        ``domid`` only if it is that domain's process."""
        cred = self.admit(sock, "xenstored-domain.sock")
        if cred is None:
            return False
        rec = self.domains.get(domid)
        if rec is None or not rec.pid or rec.pid != cred.pid:
            self.log(f"refused a xenstore ring relay for domain {domid} from pid {cred.pid}: "
                     "not its domain process")
            return False
        return True

    def _client(self, sock: socket.socket) -> None:
        cred = self.admit(sock, "pyxend.sock")
        if cred is None:
            sock.close()
            return
        conn = Conn(sock)
        try:
            first = conn.recv()
        except (OSError, ProtocolError):
            first = None
        if first is None:
            conn.close()
            return
        if first.get("event") == "register":
            self._domain_events(conn, first, cred)
            return
        req: dict[str, Any] | None = first
        while req is not None:
            try:
                reply = self.handle(req, cred)
            except PermissionError as e:
                self.log(f"refused {req.get('op')!r} from pid {cred.pid}: {e}")
                reply = {"ok": False, "error": str(e), "errno": 1}  # EPERM
            except (ValueError, LookupError, RuntimeError, TimeoutError, KeyError, OSError) as e:
                reply = {"ok": False, "error": str(e)}
            except Exception as e:  # noqa: BLE001 - a request must never kill the daemon's thread
                self.log(f"request {str(req)[:200]} failed: {e!r}")
                reply = {"ok": False, "error": f"internal error: {e!r}"}
            try:
                conn.send(reply)
                req = conn.recv()
            except (OSError, ProtocolError):
                break
        conn.close()

    # ------------------------------------------------------------ main
    def serve(self) -> None:
        path = paths.daemon_socket(self.rundir)
        try:
            os.unlink(path)
        except OSError:
            pass
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600, whatever umask we were given
        try:
            lsock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        lsock.listen(128)
        lsock.settimeout(0.5)
        self._reserve_survivors()
        self.xs_server = XenstoreServer(self.xenstore_socket, xenstored=self.xsd,
                                        accept_filter=self._admit_xenstore).start()
        self.xs_domains = DomainSocket(self.rundir / "xenstored-domain.sock", self.xsd,
                                       authorize=self._admit_xs_domain)
        self._zygote()
        self.log(f"pyxend {__version__} started, pid {os.getpid()}, run dir {self.rundir}")
        while not self.quit.is_set():
            try:
                s, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            s.settimeout(None)
            threading.Thread(target=self._client, args=(s,), daemon=True).start()
        # shutting down: destroy every domain, stop the zygote
        with self.lock:
            recs = list(self.domains.values())
        for r in recs:
            self.destroy(r)
        if self.zygote is not None:
            self.zygote.kill()
        if self.xs_domains is not None:
            self.xs_domains.close()
        if self.xs_server is not None:
            self.xs_server.stop()
        try:
            os.unlink(path)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="pyxend", description="pyxen host daemon")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--memory", type=int, default=0, metavar="MIB",
                    help="RAM this host gives its domains in all (default: no limit but MemAvailable)")
    args = ap.parse_args(argv)
    # everything we, the zygote and the domain processes create (sockets, logs,
    # xenstore.json, console logs) is for the owner only, whatever the umask
    # of the command that started us
    os.umask(0o077)
    try:
        rundir = paths.ensure_run_dir(Path(args.run_dir) if args.run_dir else paths.run_dir())
    except OSError as e:
        print(f"pyxend: {e}", file=sys.stderr)
        sys.exit(1)
    lockfd = os.open(rundir / "pyxend.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    try:
        fcntl.flock(lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print("pyxend: another daemon is running in", rundir, file=sys.stderr)
        sys.exit(0)
    os.fchmod(lockfd, 0o600)
    os.ftruncate(lockfd, 0)
    os.write(lockfd, str(os.getpid()).encode())
    signal.signal(signal.SIGTERM, lambda *_: d.quit.set())
    d = Daemon(rundir, memory_mib=max(0, args.memory))
    d.serve()


if __name__ == "__main__":
    main()
