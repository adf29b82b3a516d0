"""The domain process: one per domain, forked from the zygote.

It owns the domain's KVM VM, vCPU threads and backends, so a fault here
never reaches the daemon or another domain.  It talks to the daemon over
one connection (commands in, state and log events out) and serves console
attaches on its own socket (``domain-N.sock``; a client first sends one JSON
line of options, then raw bytes): output is appended to the
console log, kept in a scrollback buffer that a new attach replays, and
streamed to every attached client; client bytes go to the console ring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import kvm
from ..abi import XenError
from ..backends.blkback import BlkBack
from ..backends.console import ConsoleLog
from ..backends.netback import NetBack, NetError, link_up, make_tap
from ..backends.xsring import XenstoreRing
from ..domctl import CreateError, create_domain
from ..hv.domain import Domain, DomainSpec
from ..ratelimit import ConsoleLimiter, Limits, PrintkRatelimit
from ..storage import BlockImage, ImageError
from ..xenstore.client import XsClient
from . import paths
from .directory import ProcessDirectory
from .proto import Conn, ProtocolError, peer_allowed, peer_cred
from .xsdomain import HELLO, MAGIC

SCROLLBACK = 64 << 10
CLIENT_BACKLOG = 1 << 20


def background_priority() -> None:
    """Every thread of this process (and those it starts later, which inherit
    it) to SCHED_IDLE and nice 19: it runs only on CPU time nobody else
    wants.  For a process that has nothing left to do but exit; best effort
    (a kernel without SCHED_IDLE, no permission: as before)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [threading.get_native_id()]
    for tid in tids:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


class DomainProcess:
    def __init__(self, domid: int, spec: dict[str, Any], rundir: Path) -> None:
        self.domid = domid
        self.spec = DomainSpec(**spec)
        self.rundir = rundir
        self.lock = threading.Lock()
        self.history = bytearray()
        self.clients: list[socket.socket] = []
        self.greeting: dict[socket.socket, bytes] = {}  # clients yet to send their first line
        self.backlog: dict[socket.socket, bytes] = {}  # output a slow client has not taken yet
        self.limits, self.limit_warnings = Limits.from_env()
        self.limiter = ConsoleLimiter(self.limits.console_rate, self.limits.console_burst, domid)
        # the xenstore socket and its handler while the guest is behind on its ring
        self.xs_paused: tuple[socket.socket, Callable[[object], None]] | None = None
        logp = paths.console_log(rundir, self.spec.name)
        logp.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.logf = ConsoleLog(logp, self.limits.log_size, self.limits.log_keep,
                               on_error=self._log_line)
        self.daemon = Conn.connect(str(paths.daemon_socket(rundir)), timeout=5)
        self.send_lock = threading.Lock()
        self.domain: Domain | None = None
        self.directory = ProcessDirectory(rundir, self._watch_fd, self._unwatch_fd)
        self.disks: dict[int, tuple[dict[str, Any], BlockImage]] = {}  # devid -> (disk, image)
        self.blkbacks: dict[int, BlkBack] = {}
        self.netbacks: dict[int, NetBack] = {}
        # TAPs made ahead (incoming migration, restore): devid -> fd, for _start_netback
        self.early_taps: dict[int, int] = {}
        self.tap_maker: threading.Thread | None = None
        self.xs: XsClient | None = None
        self.daemon_lost = 0.0  # when the daemon connection was lost (0: connected)
        self.sel = selectors.DefaultSelector()
        self.incoming = False  # an incoming migration's domain waits for its stream
        self.started = threading.Event()  # the daemon's "start" came
        # the domain is built: "start" may use it (an incoming migration's daemon
        # says "start" while _migrate_in still builds the domain)
        self.built = threading.Event()
        self.built.set()
        # an incoming migration's timeline after END (logged with its report)
        self.stamps: list[tuple[str, float]] | None = None
        self.out_stamps: list[tuple[str, float]] = []  # an outgoing migration's, from the suspend request
        self.suspend_via = ""  # how the last suspend was asked: "event channel" or "xenstore"

    # ------------------------------------------------------------ events to the daemon
    def event(self, **kw: Any) -> None:
        with self.send_lock:
            try:
                self.daemon.send(kw)
            except OSError:
                pass

    def on_console(self, data: bytes) -> None:
        """Guest console output, from the ring and from console_io alike (in
        the vCPU thread): rate-limited (what is above the rate is dropped
        here, before it costs memory or disk), then to the rotating log, the
        scrollback and every attached client."""
        with self.lock:
            data, notes = self.limiter.filter(data)
            if data:
                self._output(data)
        for note in notes:  # outside self.lock: the log line goes to the daemon
            self._log_line(note.strip("[]"))

    def _log_line(self, line: str) -> None:
        """A console line for the hypervisor log (rate-limited like the
        guest's other chatter)."""
        if self.domain is not None:
            self.domain.log(line)
        else:
            self.on_log(f"(d{self.domid}) {line}")

    def _output(self, data: bytes) -> None:
        """Under self.lock.  The log file rotates underneath; the scrollback
        and the clients' sockets do not depend on it."""
        self.logf.write(data)
        self.history += data
        if len(self.history) > SCROLLBACK:
            del self.history[:-SCROLLBACK]
        dead = [c for c in self.clients if not self._send(c, data)]
        for c in dead:
            self._drop_client(c)

    def _send(self, c: socket.socket, data: bytes) -> bool:
        """Send without ever blocking the vCPU: what a slow client cannot take
        now waits in its queue; a client that falls CLIENT_BACKLOG behind is
        dropped (the log file still has everything).  False: drop it."""
        buf = self.backlog.get(c, b"") + data
        try:
            n = c.send(buf) if buf else 0
        except BlockingIOError:
            n = 0
        except OSError:
            return False
        rest = buf[n:]
        if len(rest) > CLIENT_BACKLOG:
            return False
        if rest:
            self.backlog[c] = rest
        else:
            self.backlog.pop(c, None)
        return True

    def on_state(self, d: Domain) -> None:
        self.event(event="state", state=d.state, reason=d.info()["shutdown_reason"],
                   crash=d.crash_info[:4000])

    def on_log(self, line: str) -> None:
        self.event(event="log", line=line)

    # ------------------------------------------------------------ console clients
    def _drop_client(self, c: socket.socket) -> None:
        self.backlog.pop(c, None)
        if c in self.clients:
            self.clients.remove(c)
        try:
            self.sel.unregister(c)
        except (KeyError, ValueError):
            pass
        c.close()

    def _accept(self, lsock: socket.socket) -> None:
        c, _ = lsock.accept()
        try:  # as the daemon's sockets: its owner and root only (the run dir is 0700 too)
            cred = peer_cred(c)
        except OSError:
            c.close()
            return
        if not peer_allowed(cred):
            self.on_log(f"domain {self.domid}: refused a console connection from uid {cred.uid} "
                        f"pid {cred.pid}")
            c.close()
            return
        c.setblocking(True)
        self.greeting[c] = b""
        self.sel.register(c, selectors.EVENT_READ, self._client_input)

    def _greet(self, c: socket.socket, line: bytes) -> None:
        """The first line a console client sends: a JSON object of options
        (``{"unpause": true}`` lets ``create -c`` start the guest once attached)."""
        try:
            opts = json.loads(line or b"{}")
            if not isinstance(opts, dict):
                raise ValueError
        except ValueError:
            self._drop_client(c)
            return
        with self.lock:
            c.setblocking(False)
            if not self._send(c, bytes(self.history)):
                self._drop_client(c)
                return
            self.clients.append(c)
        if opts.get("unpause") and self.domain is not None and self.domain.paused:
            self.domain.unpause()

    def _client_input(self, c: socket.socket) -> None:
        fds: list[int] = []
        try:
            if c in self.greeting and self.incoming:  # migrate-receive hands over its connection
                data, fds, _flags, _addr = socket.recv_fds(c, 4096, 2)
            else:
                data = c.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if fds:
            self._incoming_client(c, data, fds)
            return
        if not data:
            self.greeting.pop(c, None)
            with self.lock:
                self._drop_client(c)
            return
        if c in self.greeting:
            buf = self.greeting[c] + data
            if b"\n" not in buf:
                if len(buf) > 4096:
                    self.greeting.pop(c)
                    self._drop_client(c)
                else:
                    self.greeting[c] = buf
                return
            line, data = buf.split(b"\n", 1)
            del self.greeting[c]
            self._greet(c, line)
            if not data:
                return
        if self.domain is not None and self.domain.console is not None:
            self.domain.console.write_input(data)

    # ------------------------------------------------------------ commands
    def _command(self, conn_sock: socket.socket) -> None:
        """The daemon's socket is readable.  One read may bring several messages
        (a peer-gone broadcast right before "start", say); all of them are
        handled now, since the socket will not be readable again for the
        ones already in the connection's buffer."""
        while True:
            try:
                msg = self.daemon.recv()
            except (OSError, ProtocolError):
                msg = None
            if msg is None:  # the daemon went away: keep running, domains outlive it
                self.sel.unregister(conn_sock)
                self.daemon.close()
                self.daemon_lost = time.monotonic()
                return
            self._handle(msg)
            if b"\n" not in self.daemon.buf:
                return

    def _handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        rid = msg.get("id")
        d = self.domain
        assert d is not None
        reply: dict[str, Any] = {"reply": rid, "ok": True}
        try:
            if op == "pause":
                d.pause()
            elif op == "unpause":
                d.unpause()
            elif op == "shutdown":
                d.shutdown(int(msg.get("reason", 0)))
            elif op == "info":
                reply["info"] = d.info()
            elif op == "prestart":  # an incoming migration's reservation: the vifs' backends ahead
                for vif in list(self.spec.extra.get("vifs") or []):  # type: ignore[call-overload]
                    if not vif.get("script"):  # (a hotplug script runs at start, as libxl's)
                        self._start_netback(dict(vif), link=False)
            elif op == "start":
                st = self.stamps.append if self.stamps is not None else (lambda _: None)
                st(("start", time.monotonic()))
                if not self.built.wait(60):
                    raise RuntimeError("the domain was not built")
                self._connect_xenstore()
                st(("xenstore ring relayed", time.monotonic()))
                for devid in list(self.disks):
                    self._start_blkback(devid)
                st(("blkbacks", time.monotonic()))
                for vif in list(self.spec.extra.get("vifs") or []):  # type: ignore[call-overload]
                    nb = self.netbacks.get(int(vif["devid"]))
                    if nb is None:
                        self._start_netback(dict(vif))
                        continue
                    try:  # made at the reservation: only its TAP comes up now
                        link_up(nb.ifname)
                    except (NetError, OSError) as e:
                        d.log(f"vif {vif['devid']}: {e}", always=True)
                st(("netbacks", time.monotonic()))
                if not msg.get("paused"):
                    d.unpause()
                self.started.set()
            elif op == "reconnect":  # a new daemon adopted us
                self._reconnect()
            elif op == "block-attach":
                disk = dict(msg["disk"])
                devid = int(disk["devid"])
                if devid in self.disks:
                    raise ValueError(f"device {disk.get('vdev')} ({devid}) is already attached")
                self.disks[devid] = (disk, open_disk(disk))
                self._start_blkback(devid)
            elif op == "block-detach":
                devid = int(msg["devid"])
                bb = self.blkbacks.pop(devid, None)
                if bb is None:
                    raise ValueError(f"no block device {devid}")
                self.disks.pop(devid, None)

                def detach(bb: BlkBack = bb, answer: dict[str, Any] = reply) -> None:
                    # answered once the frontend closed and the nodes are gone (up to
                    # 10 s), so that attaching the same device again can follow at once
                    try:
                        bb.detach()
                    except Exception as e:  # noqa: BLE001
                        answer = {"reply": rid, "ok": False, "error": f"detach: {e}"}
                    self.event(**answer)
                threading.Thread(target=detach, daemon=True).start()
                return  # the thread answers
            elif op == "block-list":
                reply["disks"] = [dict(disk, state=self.blkbacks[devid].state if devid in self.blkbacks
                                       else 0, stats=self.blkbacks[devid].stats
                                       if devid in self.blkbacks else {})
                                  for devid, (disk, _img) in sorted(self.disks.items())]
            elif op == "network-attach":
                vif = dict(msg["vif"])
                if int(vif["devid"]) in self.netbacks:
                    raise ValueError(f"vif {vif['devid']} is already attached")
                self._start_netback(vif, strict=True)
            elif op == "network-detach":
                devid = int(msg["devid"])
                nb = self.netbacks.pop(devid, None)
                if nb is None:
                    raise ValueError(f"no vif {devid}")

                def ndetach(nb: NetBack = nb, answer: dict[str, Any] = reply) -> None:
                    try:  # answered once the frontend closed and the nodes are gone (up to 10 s)
                        nb.detach()
                    except Exception as e:  # noqa: BLE001
                        answer = {"reply": rid, "ok": False, "error": f"detach: {e}"}
                    self.event(**answer)
                threading.Thread(target=ndetach, daemon=True).start()
                return  # the thread answers
            elif op == "network-list":
                reply["vifs"] = [{"devid": devid, "mac": nb.mac, "bridge": nb.bridge or "",
                                  "vifname": nb.ifname, "state": nb.state, "stats": nb.stats}
                                 for devid, nb in sorted(self.netbacks.items())]
            elif op == "evtchn-accept":
                reply.update(self.directory.accept(d, int(msg["port"]), int(msg["from_dom"]),
                                                   int(msg["from_port"])))
            elif op == "peer-consent":
                reply.update(self.directory.consent(d, int(msg["from_dom"])))
            elif op == "evtchn-remote-closed":
                self.directory.drop(int(msg["port"]))
                d.evtchn.remote_closed(int(msg["port"]), int(msg["from_dom"]))
            elif op == "peer-gone":
                gone = int(msg["domid"])
                for port, ch in enumerate(list(d.evtchn.ports)):
                    if ch.remote_dom == gone and not ch.backend_local:
                        self.directory.drop(port)
                d.peer_gone(gone)
            elif op == "migrate":
                threading.Thread(target=self._migrate_out, args=(rid, msg), daemon=True).start()
                return  # the thread answers
            elif op == "save":
                path, checkpoint = str(msg["file"]), bool(msg.get("checkpoint"))
                wait = msg.get("suspend_timeout")  # ask the guest to suspend first (pyxen save)
                threading.Thread(target=self._save, daemon=True, args=(
                    rid, path, checkpoint, None if wait is None else float(wait))).start()
                return  # the thread answers
            elif op == "destroy":
                self.event(**reply)
                self.exit(0)
            else:
                reply = {"reply": rid, "ok": False, "error": f"unknown op {op!r}"}
        except XenError as e:
            reply = {"reply": rid, "ok": False, "error": e.why or str(e), "errno": e.errno}
        except Exception as e:  # noqa: BLE001 - report, never die on a bad request
            reply = {"reply": rid, "ok": False, "error": str(e)}
        self.event(**reply)

    def _progress(self) -> Callable[[int, int, int], None]:
        """A progress callback for save/restore: an event to the daemon at most
        every 100 ms (and at the end), which ``pyxen save/restore`` displays."""
        t0 = time.monotonic_ns()
        last = [0]

        def cb(done: int, total: int, nbytes: int) -> None:
            now = time.monotonic_ns()
            if done < total and now - last[0] < 100_000_000:
                return
            last[0] = now
            self.event(event="progress", pages=done, total=total, bytes=nbytes, ns=now - t0)
        return cb

    def _save(self, rid: object, path: str, checkpoint: bool, suspend_timeout: float | None = None) -> None:
        """Write the suspended domain to ``path`` (a thread: the console and the
        daemon's other requests are served meanwhile).  With ``suspend_timeout``
        the guest is asked to suspend first, as libxl does (its suspend event
        channel if it advertises one, else control/shutdown); one that does
        not within that many seconds keeps running and the save fails
        ("did not suspend within").  On failure the file is
        removed and the domain resumed (its suspend hypercall returns 1), as
        xl does after a failed save; after a checkpoint it is resumed too."""
        from ..migration.save import SaveError, save_domain, suspend_guest
        from ..migration.stream import StreamError
        d = self.domain
        assert d is not None
        if suspend_timeout is not None:
            chan = None
            try:
                chan = self._suspend_channel()
                via = suspend_guest(d, suspend_timeout, chan, self._ask_suspend)
            except Exception as e:  # noqa: BLE001 - the guest runs on; the save fails
                if chan is not None and not chan.late:
                    chan.release()
                why = e.why if isinstance(e, XenError) else str(e)
                self.event(reply=rid, ok=False, error=f"domain {self.domid}: {why}")
                return
            d.log("save: suspend asked through " + ("control/shutdown" if via == "xenstore"
                  else "the guest's suspend event channel"), always=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb", buffering=1 << 20) as f:
                stats = save_domain(d, f, progress=self._progress())
                os.fsync(f.fileno())
        except (SaveError, StreamError, OSError, XenError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            with contextlib.suppress(OSError):
                os.unlink(path)
            try:
                d.resume_after_suspend(True)
                note = "the domain was resumed"
            except XenError as e2:
                note = f"the domain could not be resumed: {e2.why}"
            d.log(f"save to {path} failed: {why}; {note}", always=True)
            self.event(reply=rid, ok=False, error=f"save to {path} failed: {why} ({note})")
            return
        d.log(f"saved to {path}: {stats.pages} pages, {stats.bytes} bytes in {stats.seconds:.3f} s",
              always=True)
        if checkpoint:
            d.resume_after_suspend(True)
        self.event(reply=rid, ok=True, pages=stats.pages, bytes=stats.bytes, seconds=stats.seconds)

    # ------------------------------------------------------------ live migration
    def _suspend_channel(self) -> Any:
        """The guest's suspend event channel bound, if it advertises one
        (libxl__domain_suspend_init, before the first page: the request
        itself is then one event), else None (the control/shutdown way).
        A port that cannot be bound fails the save or migration (SaveError),
        as on Xen."""
        from ..migration import save as SV
        d = self.domain
        assert d is not None
        raw = self._xs().try_read(f"/local/domain/{self.domid}/{SV.SUSPEND_EVTCHN_NODE}")
        port = SV.suspend_evtchn_port(raw)
        return SV.SuspendChannel(d, port) if port >= 0 else None

    def _ask_suspend(self, value: str) -> None:
        """control/shutdown = ``value`` ("suspend", or "" to withdraw the
        request, best effort)."""
        ctl = f"/local/domain/{self.domid}/control/shutdown"
        if value:
            self._xs().write(ctl, value)
        else:
            with contextlib.suppress(Exception):
                self._xs().write(ctl, value)

    def _suspend_for_migration(self, timeout: float, chan: Any = None) -> None:
        """Ask the guest to suspend as a save does (its suspend event channel
        ``chan`` if bound, else control/shutdown = "suspend", libxl's PV
        suspend) and wait until it has (woken by the suspend, no poll)."""
        from ..migration import save as SV
        d = self.domain
        assert d is not None
        self.out_stamps.append(("suspend asked", time.monotonic()))
        try:
            self.suspend_via = SV.suspend_guest(d, timeout, chan, self._ask_suspend)
        except SV.SaveError as e:
            raise RuntimeError(str(e)) from None
        self.out_stamps.append(("suspended", time.monotonic()))

    def _migrate_out(self, rid: object, msg: dict[str, Any]) -> None:
        """``pyxen migrate``: connect, reservation, live rounds, stop-and-copy,
        commitment (pyxen/migration/protocol.py).  Before the destination
        reports the domain running, any failure resumes it here."""
        from ..migration import live
        from ..migration import protocol as P
        from ..migration import save as SV
        from ..migration.stream import StreamError
        d = self.domain
        assert d is not None
        conn: Any = None
        proc: Any = None
        st: live.LiveStats | None = None
        commit: dict[str, float] = {}
        rounds: list[dict[str, Any]] = []
        remote = -1
        chan: Any = None  # the guest's suspend event channel, bound
        go_sent = False  # after "go" a failure leaves the domain's state undefined (xl's failed_badly)
        self.out_stamps = []
        self.go_sent = False
        self.commit_out: dict[str, float] = {}
        try:
            if "tcp" in msg:
                host, _, port = str(msg["tcp"]).rpartition(":")
                conn = socket.create_connection((host.strip("[]"), int(port)), timeout=30)
                conn.settimeout(None)
                P.tune_socket(conn)
                rfd = conn.fileno()
                wfile: Any = conn.makefile("wb", buffering=1 << 20)
            else:
                import subprocess
                proc = subprocess.Popen([str(a) for a in msg["cmd"]], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, bufsize=0)
                assert proc.stdin is not None and proc.stdout is not None
                rfd = proc.stdout.fileno()
                wfile = os.fdopen(os.dup(proc.stdin.fileno()), "wb", buffering=1 << 20)
                proc.stdin.close()
            if msg.get("key"):
                from ..migration import auth
                auth.sender(rfd, wfile.fileno(), bytes.fromhex(str(msg["key"])))
            banner = P.read_line(rfd, 60, "receiver's banner")
            if banner.startswith(b"pyxen migration: auth "):
                raise P.ProtocolError("the receiver asks for the migration key (it was started with --key): "
                                      "give pyxen migrate --key FILE")
            if banner != P.BANNER:
                raise P.ProtocolError(f"expected the receiver's banner {P.BANNER!r}, got {banner[:120]!r}")
            # the xl header first: the destination reserves the domain it describes
            from ..migration import stream as S
            cfg = json.dumps(SV.xl_config(d)).encode() + b"\0"
            wfile.write(S.XlHeader(S.XL_MANDATORY_FLAG_JSON | S.XL_MANDATORY_FLAG_STREAMv2, 0, cfg).pack())
            wfile.flush()
            remote = P.parse_reservation(P.read_line(rfd, 120, "reservation answer"))
            d.log(f"migration: the destination reserved domain {remote}", always=True)
            pol = live.RatePolicy()
            for key in ("min_rate", "max_rate", "max_rounds", "few_pages"):
                if key in msg:
                    setattr(pol, key, type(getattr(pol, key))(msg[key]))
            timeout = float(msg.get("suspend_timeout", 10))
            chan = self._suspend_channel()

            def on_round(r: live.RoundStat) -> None:
                rounds.append(dataclasses.asdict(r))
                self.event(event="progress", pages=r.pages, total=d.max_pages, bytes=r.bytes,
                           ns=int(r.seconds * 1e9))
            gil = contextlib.ExitStack()

            def suspend() -> None:
                gil.enter_context(short_gil_slices())  # until the commitment is over
                self._suspend_for_migration(timeout, chan)
            with gil:
                st = live.send_live(d, wfile, suspend, pol, on_round=on_round, header_sent=True,
                                    wait_applied=lambda n: P.wait_applied(rfd, n, 300))
                self._commit_out(rfd, wfile)
            commit = self.commit_out
            go_sent = self.go_sent
        except (P.ProtocolError, SV.SaveError, StreamError, XenError, OSError, RuntimeError,
                ValueError, KeyError) as e:
            why = e.why if isinstance(e, XenError) else (e.strerror if isinstance(e, OSError) and
                                                        e.strerror else str(e))
            from .. import abi
            go_sent = go_sent or self.go_sent
            if chan is not None and not chan.late:  # (a failure before the suspend)
                chan.release()
            suspended = d.shutdown_reason == abi.SHUTDOWN_suspend
            note = "it keeps running"
            if go_sent and suspended:
                # the destination may run it already: two copies would corrupt
                # its disks, so it is not resumed here (as xl's failed_badly)
                note = (f"the destination was cleared to unpause it (domain {remote} there) but "
                        "its report did not arrive: the domain's state is undefined; it stays "
                        "suspended here: check the destination, then destroy one of the two")
                d.log(f"migration failed during the final handshake: {why}; {note}", always=True)
                self.event(reply=rid, ok=False, suspended=True, undefined=True,
                           error=f"migration failed during the final handshake: {why} ({note})")
                self._close_channel(conn, proc)
                return
            if suspended:
                try:
                    d.resume_after_suspend(True)
                    note = "the domain was resumed"
                except XenError as e2:
                    note = f"the domain could not be resumed: {e2.why}"
            d.log(f"migration failed: {why}; {note}", always=True)
            self.event(reply=rid, ok=False, suspended=suspended,
                       error=f"migration failed: {why} ({note})")
            self._close_channel(conn, proc)
            return
        self._close_channel(conn, proc)
        assert st is not None
        if self.out_stamps:
            t0 = self.out_stamps[0][1]
            d.log(f"migrated out, from the suspend request (monotonic {t0:.6f}): " + ", ".join(
                f"{what} {(t - t0) * 1000:.1f} ms" for what, t in self.out_stamps), always=True)
            d.log("migration: suspend asked through " + ("control/shutdown" if self.suspend_via ==
                  "xenstore" else "the guest's suspend event channel"), always=True)
        stats = st.as_dict()
        stats["rounds"] = rounds
        stats["commitment"] = commit
        d.log(f"migrated: {st.pages} pages in {len(st.rounds)} rounds, {st.bytes} bytes in "
              f"{st.seconds:.3f} s, stop-and-copy {st.downtime_seconds * 1000:.1f} ms "
              f"({st.stop_reason})", always=True)
        self.event(reply=rid, ok=True, stats=stats, remote_domid=remote)

    def _commit_out(self, rfd: int, wfile: Any) -> None:
        """The sender's commitment: the receiver's ready, our go, its report
        (``self.go_sent`` once go went: from then on a failure leaves the
        domain's state undefined)."""
        from ..migration import protocol as P
        t_end = time.monotonic()
        self.out_stamps.append(("END sent", t_end))
        P.expect(rfd, P.READY, 300, "receiver's ready message")
        t_ready = time.monotonic()
        self.out_stamps.append(("ready", t_ready))
        wfile.write(P.GO)
        wfile.flush()
        self.go_sent = True
        P.expect(rfd, P.REPORT, 60, "receiver's unpause report")
        rc = P.read_exact(rfd, 1, 60, "receiver's unpause result")[0]
        self.out_stamps.append(("report", time.monotonic()))
        self.commit_out = {"end_to_ready_ms": (t_ready - t_end) * 1000,
                           "end_to_report_ms": (time.monotonic() - t_end) * 1000}
        if rc:
            raise P.ProtocolError(f"the destination could not unpause the domain ({rc})")
        # committed: the domain runs there and this process only tears down
        # (replies, then the daemon's destroy: KVM and 128+ MiB freed, TAPs
        # removed), which must not compete with the guest's resume there
        # (on the same CPUs when both hosts share a machine)
        background_priority()

    @staticmethod
    def _close_channel(conn: Any, proc: Any) -> None:
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
        if proc is not None:
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
            try:
                proc.wait(10)
            except Exception:  # noqa: BLE001
                proc.kill()

    def _incoming_client(self, c: socket.socket, data: bytes, fds: list[int]) -> None:
        """migrate-receive's connection: a JSON line and the stream's two fds
        (read, write).  One only, and only while the domain waits for it."""
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c)
        self.greeting.pop(c, None)
        if not self.incoming or len(fds) != 2 or not data.startswith(b'{"incoming"'):
            for fd in fds:
                os.close(fd)
            c.close()
            return
        self.incoming = False
        c.setblocking(True)
        threading.Thread(target=self._migrate_in, args=(c, fds[0], fds[1]), daemon=True).start()

    def _migrate_in(self, c: socket.socket, rfd: int, wfd: int) -> None:
        """The receiving side: say the domain is reserved, read the rounds into
        the empty domain (later rounds overwrite), build it at END as a
        restore does, have the daemon write its xenstore entries ("ready";
        it answers "start", paused), tell the sender, unpause on its go and
        report.  Any failure ends this process: the daemon removes the
        domain, and the sender, whose connection closes, resumes its own.

        From END on every millisecond is downtime: the prepared vifs' TAPs get
        their queueing when the stream starts (:func:`tap_root_qdisc`: "start"
        brings each up in 0.1 ms, not 1-5); "ready" goes to the daemon as soon
        as the stream is applied, so that the daemon writes the rings' nodes
        while the console and the vCPU threads are set up here ("start" waits
        for them: ``self.built``); the log line is written while the sender
        answers READY."""
        from ..backends.console import ConsoleBackend
        from ..migration import protocol as P
        from ..migration import restore as R
        from ..migration import stream as S
        d = self.domain
        assert d is not None
        self.built.clear()

        def finish(ok: bool, error: str = "") -> None:
            with contextlib.suppress(OSError):
                c.sendall(json.dumps({"ok": ok, "error": error, "domid": self.domid}).encode() + b"\n")
                c.close()
        try:
            P.write_all(wfd, P.RESERVED + str(self.domid).encode() + b"\n")
            for nb in list(self.netbacks.values()):  # made at the reservation ("prestart")
                try:  # bringing the TAP up at "start" then costs 0.1 ms, not 1-5
                    tap_root_qdisc(nb.ifname)
                except OSError as e:
                    d.log(f"{nb.ifname}: default queueing kept ({e})", always=True)
            rf = os.fdopen(rfd, "rb", buffering=1 << 20)
            stamps: list[tuple[str, float]] = []
            self.stamps = stamps
            gil_old = sys.getswitchinterval()

            def stamp(what: str) -> None:
                stamps.append((what, time.monotonic()))
                if what == "tail":  # the downtime runs from here to the guest's reconnect
                    sys.setswitchinterval(min(gil_old, DOWNTIME_SWITCH_INTERVAL))
            stats = R.restore_into(d, S.iter_stream(rf, "migration stream", decode_pages=False),
                                   self._progress(), stamp=stamp,
                                   round_end=lambda n: P.write_all(wfd, P.APPLIED + b"%d\n" % n))
            self.event(event="ready", domid=self.domid, start_info=d.start_info, **self._memory())
            off = d.machine.ram_offset(d.start_info["console_mfn"])
            port = d.start_info["console_evtchn"]
            d.console = ConsoleBackend(d.machine.ram_view[off:off + 4096], d.console_output,
                                       lambda: d.raise_port(port, 0))
            d.pause()
            d.start()
            self.built.set()
            stamps.append(("built", time.monotonic()))
            if not self.started.wait(60):
                raise RuntimeError("the daemon did not start the domain")
            stamps.append(("xenstore entries written", time.monotonic()))
            P.write_all(wfd, P.READY)
            d.log(f"migrated in: {stats.pages} pages, {stats.pinned} pinned tables, "
                  f"{stats.bytes} bytes, was domain {stats.state.get('domid', '?')}; tables validated "
                  f"during the rounds: {stats.live}", always=True)
            P.expect(rfd, P.GO, 300, "sender's permission to go")
            stamps.append(("go", time.monotonic()))
            d.unpause()
            t_go = time.monotonic()
            P.write_all(wfd, P.REPORT + b"\0")
            # The guest's resume goes first: its drivers reconnect in a few
            # xenstore round trips (the network's downtime), and what is left
            # here (the log lines, the answer to migrate-receive, whose process
            # then exits, the connection's close) would compete with them for
            # the CPUs and the GIL.  Measured: go to netback's connect 14.6 ms
            # with it done at once, 7.5 ms with it after (medians of 18 moves).
            end = t_go + RECONNECT_WAIT
            while time.monotonic() < end and (any(nb.state != 4 for nb in list(self.netbacks.values()))
                                              or any(bb.state != 4 for bb in list(self.blkbacks.values()))):
                time.sleep(0.002)  # (4: XenbusStateConnected)
            t0 = stamps[0][1] if stamps else 0.0
            d.log(f"migrated in, from the last round's first record (monotonic {t0:.6f}): " + ", ".join(
                f"{what} {(t - t0) * 1000:.1f} ms" for what, t in stamps), always=True)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, no domain is left
            why = e.why if isinstance(e, XenError) else str(e)
            self.on_log(f"domain {self.domid}: incoming migration failed: {why}")
            self.event(event="error", error=f"incoming migration failed: {why}")
            finish(False, why)
            self.exit(1)
            return
        finish(True)
        with contextlib.suppress(OSError):
            os.close(wfd)
        # the resume's round trips still run in this process: the default interval back after them
        time.sleep(max(0.0, t_go + 1.0 - time.monotonic()))
        sys.setswitchinterval(gil_old)

    def exit(self, code: int) -> None:
        if self.domain is not None:
            self.domain.destroy()
        for bb in list(self.blkbacks.values()):
            try:
                bb.close()  # flushes: acknowledged data is on disk anyway
            except Exception:  # noqa: BLE001
                pass
        for nb in list(self.netbacks.values()):
            try:
                nb.close()  # the TAP goes with its fd
            except Exception:  # noqa: BLE001
                pass
        for fd in list(self.early_taps.values()):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            os.unlink(paths.domain_socket(self.rundir, self.domid))
        except OSError:
            pass
        os._exit(code)

    # ------------------------------------------------------------ main
    def mark(self, what: str) -> None:
        if os.environ.get("PYXEN_TRACE_CREATE"):
            self.event(event="log", line=f"MARK {what} {time.monotonic_ns()}")

    def run(self) -> None:
        kvm.install_kick_handler()
        sock_path = paths.domain_socket(self.rundir, self.domid)
        try:
            os.unlink(sock_path)
        except OSError:
            pass
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(sock_path))  # under the daemon's umask 077
        os.chmod(sock_path, 0o600)
        lsock.listen(8)
        self.event(event="register", domid=self.domid, pid=os.getpid(), sock=str(sock_path))
        self.mark("registered")
        restore = self.spec.extra.pop("restore", None)  # a save file to restore from
        self.incoming = bool(self.spec.extra.pop("incoming", False))
        try:
            if self.incoming:  # reservation: the empty domain, its memory; the stream comes later
                self.domain = Domain(self.spec, self.on_console, self.on_state, self.on_log,
                                     self.directory)
            elif restore is not None:
                self._make_taps_ahead()  # (in parallel with reading the file)
                self.domain = self._restore(str(restore))
            else:
                self.domain = create_domain(self.spec, console_sink=self.on_console,
                                            log_sink=self.on_log, on_state=self.on_state,
                                            start=False, directory=self.directory)
        except (CreateError, OSError, ValueError) as e:
            self.event(event="error", error=str(e))
            os._exit(1)
        self.mark("created")
        self.domain.log_ratelimit = PrintkRatelimit(self.limits.printk_ms, self.limits.printk_burst)
        for w in self.limit_warnings:
            self.domain.log(f"limits: {w}", always=True)
        try:  # a disk that cannot be opened fails the create, with its name
            disks: list[dict[str, Any]] = list(self.spec.extra.get("disks") or [])  # type: ignore[call-overload]
            secrets: dict[str, str] = dict(self.spec.extra.get("disk_secrets") or {})  # type: ignore[call-overload]
            for disk in disks:
                self.disks[int(disk["devid"])] = (disk, open_disk(disk, secrets))
        except (ImageError, OSError, ValueError, ImportError) as e:
            self.event(event="error", error=str(e))
            os._exit(1)
        if self.incoming:
            self._make_taps_ahead()  # while the stream comes: at commitment only "up" is left
            self.event(event="reserved", domid=self.domid, **self._memory())
            self.sel.register(lsock, selectors.EVENT_READ, self._accept)
            self.sel.register(self.daemon.sock, selectors.EVENT_READ, self._command)
            self._loop()
        # built paused: the daemon writes the domain's xenstore entries, then says "start"
        self.domain.pause()
        self.domain.start()
        self.event(event="ready", domid=self.domid, start_info=self.domain.start_info,
                   **self._memory())
        self.sel.register(lsock, selectors.EVENT_READ, self._accept)
        self.sel.register(self.daemon.sock, selectors.EVENT_READ, self._command)
        self._loop()

    def _loop(self) -> None:
        while True:
            busy = self.backlog or self.xs_paused or (
                self.domain is not None and self.domain.xs_ring is not None and self.domain.xs_ring.to_daemon)
            for key, _ in self.sel.select(timeout=0.02 if busy else 0.25):
                key.data(key.fileobj)
            ring = self.domain.xs_ring if self.domain else None
            if ring is not None and ring.to_daemon:
                ring.flush()
            if self.xs_paused and (ring is None or ring.wants_daemon_data):
                if ring is not None:
                    self.sel.register(self.xs_paused[0], selectors.EVENT_READ, self.xs_paused[1])
                self.xs_paused = None
            if self.backlog:
                with self.lock:
                    for c in [c for c in list(self.backlog) if not self._send(c, b"")]:
                        self._drop_client(c)
            if self.daemon_lost and time.monotonic() - self.daemon_lost > 0.2:
                self._readopt()

    def _restore(self, path: str) -> Domain:
        """``pyxen restore``: the domain from a save file instead of a kernel.
        A bad file is a CreateError with the reason; the half-restored domain
        is gone by then (restore_domain cleans up)."""
        from ..migration.restore import RestoreError, restore_file
        try:
            d, stats = restore_file(path, self.domid, console_sink=self.on_console,
                                    log_sink=self.on_log, on_state=self.on_state, start=False,
                                    directory=self.directory, progress=self._progress(),
                                    spec=self.spec)
        except RestoreError as e:
            raise CreateError(f"restore from {path}: {e}") from None
        saved = stats.state.get("domid")
        self.event(event="restored", pages=stats.pages, bytes=stats.bytes, pinned=stats.pinned,
                   ns=int(stats.seconds * 1e9),
                   saved_domid=saved if isinstance(saved, int) and 0 <= saved < 1 << 16 else 0)
        return d

    def _reconnect(self) -> None:
        """After a daemon restart: relay the guest's xenstore ring to the new
        xenstored, and give the backends a new xenstore connection (their
        watches died with the old one)."""
        if self.xs_paused is not None and self.domain is not None:
            # the old relay socket was not being polled (the guest was behind): drop it
            self.xs_paused[0].close()
            self.xs_paused = None
            self.domain.xs_ring = None
        self._connect_xenstore()
        d = self.domain
        if d is not None:
            d.log("xenstore: " + ("relaying the guest's ring to the new xenstored" if d.xs_ring is not None
                                  else "the new xenstored did not take the guest's ring"), always=True)
        old, self.xs = self.xs, None
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()
        if self.blkbacks:
            xs = self._xs()
            for bb in self.blkbacks.values():
                bb.reconnect_xenstore(xs)
        for nb in self.netbacks.values():
            nb.reconnect_xenstore(self._xs())

    def _xs(self) -> XsClient:
        """Our xenstore connection as the backend domain (dom0 on the host socket)."""
        if self.xs is None:
            self.xs = XsClient(str(self.rundir / "xenstored.sock"))
        return self.xs

    def _start_blkback(self, devid: int) -> None:
        d = self.domain
        assert d is not None
        disk, image = self.disks[devid]
        bb = BlkBack(d, self._xs(), devid, image, params=str(disk.get("target", "")),
                     fmt=str(disk.get("format", "raw")), readonly=not disk.get("readwrite", True),
                     vdev=str(disk.get("vdev", "")))
        bb.start()
        self.blkbacks[devid] = bb

    def _make_taps_ahead(self) -> None:
        """Make the config's vifs' TAPs, on their bridges but down, in a thread
        (:func:`netback.make_tap`): a migration's destination does it at the
        reservation, a restore while reading its file, so that starting the
        netbacks after END is one ioctl per vif (hotplug scripts still run
        then, when Xen's toolstack runs them).  A TAP that cannot be made here
        is tried again, and reported, by :meth:`_start_netback`."""
        vifs = [dict(v) for v in self.spec.extra.get("vifs") or []]  # type: ignore[attr-defined]
        if not vifs:
            return

        def make() -> None:
            for vif in vifs:
                devid = int(vif["devid"])
                try:
                    self.early_taps[devid] = make_tap(
                        self.domid, devid, str(vif.get("bridge") or "xenbr0"),
                        str(vif.get("vifname") or ""), str(vif.get("script") or ""))
                except (NetError, OSError) as e:
                    self.on_log(f"domain {self.domid}: vif {devid}: made at start instead: {e}")
        self.tap_maker = threading.Thread(target=make, name="make-taps", daemon=True)
        self.tap_maker.start()

    def _start_netback(self, vif: dict[str, Any], strict: bool = False, link: bool = True) -> None:
        """The host end of a vif: a TAP on the bridge (in this process's
        network namespace: the daemon's), then the netif handshake.  A vif
        of the config that cannot be set up is logged and left out (the domain
        runs on); a hot-plugged one (``strict``) fails its request.
        ``link=False``: the TAP stays down (a migration's destination before
        the commitment; "start" brings it up)."""
        d = self.domain
        assert d is not None
        devid = int(vif["devid"])
        if self.tap_maker is not None:
            self.tap_maker.join(30)
        nb = NetBack(d, self._xs(), devid, str(vif["mac"]), str(vif.get("bridge") or "xenbr0"),
                     str(vif.get("vifname") or ""), script=str(vif.get("script") or ""),
                     tap=self.early_taps.pop(devid, -1))
        try:
            nb.start(link=link)
        except (NetError, OSError) as e:
            if strict:
                nb.close()
                raise
            d.log(f"vif {devid}: {e}", always=True)
            return
        self.netbacks[devid] = nb

    def _connect_xenstore(self) -> None:
        """Relay the guest's xenstore ring to the daemon's xenstored."""
        d = self.domain
        assert d is not None
        path = self.rundir / "xenstored-domain.sock"
        if d.xs_ring is not None or not path.exists():
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            s.sendall(HELLO.pack(MAGIC, self.domid))
        except OSError:
            s.close()
            return
        off = d.machine.ram_offset(d.start_info["store_mfn"])
        port = d.start_info["store_evtchn"]
        ring = XenstoreRing(d.machine.ram_view[off:off + 4096], s, lambda: d.raise_port(port, 0))

        def readable(_: object) -> None:
            if not ring.on_daemon_data():
                self._unwatch_fd(s.fileno())
                d.xs_ring = None
                s.close()
            elif not ring.wants_daemon_data:  # the guest is behind: xenstored keeps the rest
                self._unwatch_fd(s.fileno())
                self.xs_paused = (s, readable)
        d.xs_ring = ring
        self.sel.register(s, selectors.EVENT_READ, readable)

    def _memory(self) -> dict[str, int]:
        """Where other domain processes find our RAM (pidfd_getfd of this fd)."""
        assert self.domain is not None
        return {"memfd": self.domain.machine.memfd, "max_pages": self.domain.machine.max_pages}

    def _watch_fd(self, fd: int, cb: Callable[[], None]) -> None:
        def ready(_: object) -> None:
            try:
                os.eventfd_read(fd)
            except (BlockingIOError, OSError):
                return
            cb()
        self.sel.register(fd, selectors.EVENT_READ, ready)

    def _unwatch_fd(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _readopt(self) -> None:
        """Register again with a restarted daemon, which adopts this domain."""
        try:
            conn = Conn.connect(str(paths.daemon_socket(self.rundir)), timeout=1)
        except OSError:
            self.daemon_lost = time.monotonic()
            return
        d = self.domain
        assert d is not None
        with self.send_lock:
            self.daemon = conn
        self.daemon_lost = 0.0
        spec = dataclasses.asdict(self.spec)
        self.event(event="register", adopt=True, domid=self.domid, pid=os.getpid(),
                   sock=str(paths.domain_socket(self.rundir, self.domid)), spec=spec,
                   state=d.state, reason=d.info()["shutdown_reason"], **self._memory())
        self.sel.register(conn.sock, selectors.EVENT_READ, self._command)


def tap_root_qdisc(ifname: str, kind: str = "pfifo_fast") -> None:
    """Give the interface ``ifname`` one root qdisc of ``kind`` (rtnetlink's
    RTM_NEWQDISC, as ``tc qdisc replace dev IF root pfifo_fast``).  A TAP
    made with IFF_MULTI_QUEUE has 256 transmit queues, and bringing it up
    with the default queueing builds an ``mq`` qdisc with a pfifo_fast under
    each: ~1 ms of kernel CPU (1-5 ms of wall time on a busy host) in an
    incoming migration's downtime.  One pfifo_fast at the root is what a
    single-queue TAP gets anyway; the queue a packet takes into the TAP is
    still chosen per flow (its queue mapping is set before the qdisc), so
    netback's queues are served as before.  With it, the TAP comes up in
    ~0.1 ms.  Raises OSError (the kernel's errno) on failure."""
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        raise OSError(errno.ENODEV, f"{ifname}: no such interface") from None
    k = kind.encode() + b"\0"
    attr = struct.pack("HH", 4 + len(k), _TCA_KIND) + k
    attr += bytes(-len(attr) % 4)
    body = struct.pack("BBHiIII", socket.AF_UNSPEC, 0, 0, index, 0, _TC_H_ROOT, 0) + attr
    msg = struct.pack("IHHII", 16 + len(body), _RTM_NEWQDISC,
                      _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_REPLACE, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.settimeout(5)
        s.sendto(msg, (0, 0))
        reply = s.recv(4096)
    if len(reply) >= 20 and struct.unpack_from("H", reply, 4)[0] == _NLMSG_ERROR:
        err = struct.unpack_from("i", reply, 16)[0]
        if err:
            raise OSError(-err, f"{ifname}: root qdisc {kind}: {os.strerror(-err)}")


# rtnetlink (linux/netlink.h, linux/rtnetlink.h, linux/pkt_sched.h)
_RTM_NEWQDISC, _NLMSG_ERROR, _TCA_KIND, _TC_H_ROOT = 36, 2, 1, 0xFFFFFFFF
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400


#: How long (s) an incoming migration's domain process waits, after the
#: unpause, for the guest's vifs and disks to reconnect before it does its
#: own remaining work (``DomainProcess._migrate_in``).  Our kernel's netfront
#: takes 5-20 ms; a guest that takes longer (Linux: 0.3-0.7 s) or never
#: reconnects only delays migrate-receive's answer by this much.
RECONNECT_WAIT = 0.25

#: The GIL's switch interval (s) while a migration's downtime runs in this
#: process.  Python's default (5 ms) is how long a thread that gets a reply
#: (the xenstore relay, a backend's xenstore client) may wait for the vCPU
#: thread, busy with the guest's hypercalls, to hand over the GIL: a
#: suspend or a resume is a chain of such round trips, each paying it.
DOWNTIME_SWITCH_INTERVAL = 0.0002


@contextlib.contextmanager
def short_gil_slices() -> Any:
    """The downtime's stretch with :data:`DOWNTIME_SWITCH_INTERVAL`, the
    previous interval back after it."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, DOWNTIME_SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def open_disk(disk: dict[str, Any], secret_files: dict[str, str] | None = None) -> BlockImage:
    """Open a disk of the config (``api.disk_to_dict``) with the storage formats;
    an encrypted one's passphrase comes from the file ``secret_files[vdev]``."""
    from ..storage.open import open_image  # type: ignore[import-not-found,unused-ignore]
    from ..toolstack.xlcfg import parse_disk_spec
    ds = parse_disk_spec(str(disk["spec"]))
    target = str(disk.get("target") or ds.target or "")
    if ds.nbd is None and target:
        ds = dataclasses.replace(ds, target=target, path=Path(target))
    secrets = None
    path = (secret_files or {}).get(ds.vdev)
    if path:
        try:
            secrets = {ds.vdev: Path(path).read_bytes()}  # exactly the bytes, as qemu's secret,file=
        except OSError as e:
            raise ImageError(f"disk {ds.vdev}: cannot read its passphrase file {path}: "
                             f"{e.strerror}") from None
    return open_image(ds, secrets)


def domain_main(domid: int, spec: dict[str, Any], rundir: str) -> None:
    """Entry point in the forked child; never returns."""
    code = 0
    try:
        DomainProcess(domid, spec, Path(rundir)).run()
    except Exception as e:  # noqa: BLE001
        print(f"pyxen domain {domid}: {e!r}", file=sys.stderr)
        code = 1
    finally:
        time.sleep(0)
        os._exit(code)
