"""The ``pyxen`` command: xl's commands over the pyxen daemon.

Kept light on imports (no KVM, no hypervisor modules) so it starts fast.
Every failure a user can cause is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import select
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .api import Host, NotRunning, PyxenError, config_to_request, disk_to_dict, vif_to_dict
from .xlcfg import (
    ConfigError,
    load_domain_config,
    parse_disk_spec,
    parse_vif_spec,
    parse_xl_number,
    vdev_to_devid,
)

DETACH = 0x1D  # Ctrl-]
FLAGS = {"running": "r-----", "blocked": "-b----", "paused": "--p---", "shutdown": "---s--",
         "crashed": "----c-", "dying": "-----d", "creating": "------"}


def _err(msg: str) -> int:
    print(f"pyxen: {msg}", file=sys.stderr)
    return 1


def attach_console(s: socket.socket, out: Any = None) -> int:
    """Relay the console: socket → stdout, stdin → socket; Ctrl-] detaches."""
    out = out or sys.stdout.buffer
    fd_in = sys.stdin.fileno() if sys.stdin and not sys.stdin.closed else -1
    tty = fd_in >= 0 and os.isatty(fd_in)
    old = None
    if tty:
        import termios
        import tty as ttymod
        old = termios.tcgetattr(fd_in)
        ttymod.setraw(fd_in)
    try:
        rset = [s] + ([fd_in] if fd_in >= 0 else [])
        while True:
            r, _, _ = select.select(rset, [], [])
            if s in r:
                data = s.recv(65536)
                if not data:
                    return 0
                out.write(data.replace(b"\n", b"\r\n") if tty else data)
                out.flush()
            if fd_in in r:
                data = os.read(fd_in, 1024)
                if not data:
                    rset.remove(fd_in)
                    continue
                if DETACH in data:
                    s.sendall(data[:data.index(DETACH)])
                    return 0
                s.sendall(data)
    finally:
        if old is not None:
            import termios
            termios.tcsetattr(fd_in, termios.TCSADRAIN, old)
        s.close()


def cmd_create(h: Host, a: argparse.Namespace) -> int:
    if not a.quiet:
        print(f"Parsing config from {a.config}", file=sys.stderr)
    try:
        cfg, warnings = load_domain_config(a.config, a.overrides)
    except ConfigError as e:
        return _err(str(e))
    for w in warnings:
        print(f"pyxen: warning: {w}", file=sys.stderr)
    if a.console and not a.paused:
        _domid, s = h.create_attached(cfg)
        return attach_console(s)
    req = config_to_request(cfg)
    if a.paused:
        req["spec"].setdefault("extra", {})["paused"] = True
    r = h.create_request(req)
    domid = int(r["domid"])
    if a.console:
        return attach_console(h.console_socket(domid))
    return 0


def _dom(a: argparse.Namespace) -> int | str:
    return int(a.domain) if a.domain.isascii() and a.domain.isdigit() else a.domain


def cmd_list(h: Host, a: argparse.Namespace) -> int:
    doms = h.list(long=True)
    info = h.info()
    print("Name                                        ID   Mem VCPUs\tState\tTime(s)")  # xl's
    row = "{:<40} {:>5} {:>5} {:>5}     {:<6}  {:>8.1f}"  # xl's list_domains format
    print(row.format("Domain-0", 0, info["total_memory"], info["nr_cpus"], "r-----",
                     time.process_time()))
    for d in doms:
        inf = d.get("info") or {}
        state = inf.get("state", d["state"])
        cpu = inf.get("cpu_time_ns", 0) / 1e9
        print(row.format(d["name"], d["domid"], d["memory"], d["vcpus"],
                         FLAGS.get(state, "------"), cpu))
    return 0


def cmd_console(h: Host, a: argparse.Namespace) -> int:
    return attach_console(h.console_socket(_dom(a)))


def cmd_simple(op: str) -> Any:
    def run(h: Host, a: argparse.Namespace) -> int:
        dom = _dom(a)
        getattr(h, op)(dom)
        if op in ("shutdown", "reboot", "destroy") and getattr(a, "wait", False):
            deadline = time.monotonic() + 60
            while any(str(d["domid"]) == str(dom) or d["name"] == dom for d in h.list()):
                if time.monotonic() > deadline:
                    return _err(f"domain {dom} did not go away in 60 s")
                time.sleep(0.05)
        return 0
    return run


def cmd_domid(h: Host, a: argparse.Namespace) -> int:
    for d in h.list():
        if d["name"] == a.name:
            print(d["domid"])
            return 0
    return _err(f"no domain named {a.name!r}")


def cmd_domname(h: Host, a: argparse.Namespace) -> int:
    for d in h.list():
        if str(d["domid"]) == a.domid:
            print(d["name"])
            return 0
    return _err(f"no domain {a.domid}")


def cmd_block_attach(h: Host, a: argparse.Namespace) -> int:
    try:
        ds = parse_disk_spec(",".join(a.disk))
    except ValueError as e:
        return _err(f"disk specification: {e}")
    if ds.path is None and ds.nbd is None and ds.target:
        ds = dataclasses.replace(ds, path=Path(ds.target).resolve())
    h.block_attach(_dom(a), disk_to_dict(ds))
    return 0


def cmd_block_detach(h: Host, a: argparse.Namespace) -> int:
    dev = a.device
    try:
        devid = int(dev) if dev.isascii() and dev.isdigit() else vdev_to_devid(dev)
    except ValueError as e:
        return _err(f"device {dev!r}: {e}")
    h.block_detach(_dom(a), devid)
    return 0


def cmd_block_list(h: Host, a: argparse.Namespace) -> int:
    print(f"{'Vdev':<8}{'BE':>4}{'handle':>8}{'state':>7}  {'format':<8}{'mode':<6}target")
    for d in h.block_list(_dom(a)):
        print(f"{d.get('vdev', ''):<8}{0:>4}{d['devid']:>8}{d.get('state', 0):>7}  "
              f"{d.get('format', ''):<8}{'w' if d.get('readwrite', True) else 'r':<6}{d.get('target', '')}")
    return 0


def cmd_network_attach(h: Host, a: argparse.Namespace) -> int:
    try:
        vs, warns = parse_vif_spec(",".join(a.vif))
    except ValueError as e:
        return _err(f"vif specification: {e}")
    for w in warns:
        print(f"warning: {w}", file=sys.stderr)
    if "devid" in vs.options:
        devid = parse_xl_number(vs.options["devid"])
    else:  # as xl: the next free devid
        used = {int(v["devid"]) for v in h.network_list(_dom(a))}
        devid = next(i for i in range(len(used) + 1) if i not in used)
    h.network_attach(_dom(a), vif_to_dict(vs, devid))
    return 0


def cmd_network_detach(h: Host, a: argparse.Namespace) -> int:
    dev = a.device
    for v in h.network_list(_dom(a)):
        if str(v["devid"]) == dev or v["mac"] == dev.lower():
            h.network_detach(_dom(a), int(v["devid"]))
            return 0
    return _err(f"no vif {dev!r} (a devid or a MAC)")


def cmd_network_list(h: Host, a: argparse.Namespace) -> int:
    print(f"{'Idx':>3} {'BE':>3} {'Mac Addr.':<18}{'handle':>6}{'state':>6}  {'vifname':<12}{'bridge':<10}"
          f"{'tx pkts':>9}{'rx pkts':>9}")
    for v in h.network_list(_dom(a)):
        st = v.get("stats") or {}
        print(f"{v['devid']:>3} {0:>3} {v['mac']:<18}{v['devid']:>6}{v.get('state', 0):>6}  "
              f"{v.get('vifname', ''):<12}{v.get('bridge', ''):<10}{st.get('tx_packets', 0):>9}"
              f"{st.get('rx_packets', 0):>9}")
    return 0


def cmd_info(h: Host, a: argparse.Namespace) -> int:
    for k, v in h.info().items():
        print(f"{k}: {v}")
    return 0


def cmd_dmesg(h: Host, a: argparse.Namespace) -> int:
    for line in h.dmesg(clear=a.clear):
        print(line)
    return 0


def cmd_stream(h: Host | None, a: argparse.Namespace) -> int:
    """``pyxen stream dump FILE``: every header and record of a save file or
    migration stream (xl, libxl and libxc layers), without a daemon."""
    from ..migration import stream
    try:
        with open(a.file, "rb") as f:
            stream.dump(f, sys.stdout, name=a.file, verbose=a.verbose)
    except stream.StreamError as e:
        return _err(str(e) if str(e).startswith(a.file) else f"{a.file}: {e}")
    except OSError as e:
        return _err(f"{a.file}: {e.strerror or e}")
    return 0


class _ProgressLine:
    """Pages, MB/s and ETA of a save or restore on a terminal: a thread asks
    the daemon (on a connection of its own) for the domain process's latest
    progress event and rewrites one line of stderr."""

    def __init__(self, host: Host, dom: int | str, what: str) -> None:
        import threading
        self.dom, self.what = dom, what
        self.run_dir = host.run_dir
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.enabled = sys.stderr.isatty()
        if self.enabled:
            self.thread.start()

    @staticmethod
    def line(what: str, p: dict[str, Any]) -> str:
        done, total, nbytes, ns = (int(p.get(k) or 0) for k in ("pages", "total", "bytes", "ns"))
        rate = nbytes / (ns / 1e9) / 1e6 if ns else 0.0
        eta = (total - done) * (ns / 1e9) / done if done else 0.0
        pct = 100 * done // total if total else 0
        return (f"{what}: {done}/{total} pages ({pct}%), {nbytes / 2**20:.1f} MiB, "
                f"{rate:.1f} MB/s, ETA {eta:.1f} s")

    def _main(self) -> None:
        try:
            h = Host(self.run_dir, autostart=False)
        except PyxenError:
            return
        with h:
            while not self.stop.wait(0.2):
                try:
                    p = h.progress(self.dom)
                except PyxenError:
                    continue
                if p:
                    print("\r" + self.line(self.what, p) + "\x1b[K", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.stop.set()
        if self.enabled:
            self.thread.join(1)
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)


def cmd_save(h: Host, a: argparse.Namespace) -> int:
    dom = _dom(a)
    bar = _ProgressLine(h, dom, "saving")
    try:
        r = h.save(dom, a.file, checkpoint=a.checkpoint, timeout=a.timeout)
    finally:
        bar.close()
    secs = float(r.get("seconds") or 0)
    mb = int(r.get("bytes") or 0) / 1e6
    print(f"Saved domain {dom} to {a.file}: {r.get('pages')} pages, {mb:.1f} MB in {secs:.2f} s"
          + (f" ({mb / secs:.1f} MB/s)" if secs else "")
          + ("; the domain runs on" if a.checkpoint else ""), file=sys.stderr)
    return 0


def cmd_restore(h: Host, a: argparse.Namespace) -> int:
    from ..migration import stream
    try:  # the name, for the progress line (the daemon checks the file itself)
        with open(a.file, "rb") as f:
            cfg = stream.XlHeader.read(stream.Reader(f, a.file)).config_json()
        name = str(((cfg or {}).get("c_info") or {}).get("name") or "")
    except (OSError, stream.StreamError, AttributeError):
        name = ""
    bar = _ProgressLine(h, name, "restoring") if name else None
    try:
        r = h.restore(a.file, paused=a.paused)
    finally:
        if bar is not None:
            bar.close()
    secs = int(r.get("ns") or 0) / 1e9
    print(f"Restored domain {r['domid']} ({r.get('name')}) from {a.file}: {r.get('pages')} pages "
          f"in {secs:.2f} s", file=sys.stderr)
    if a.console:
        return attach_console(h.console_socket(r["domid"]))
    return 0


def _migration_key(a: argparse.Namespace, verb: str) -> bytes | None:
    """``--key FILE``'s key (pyxen/migration/auth.py), or None; a bad file is
    a one-line error naming it."""
    if not a.key:
        return None
    from ..migration import auth
    try:
        return auth.load_key(a.key)
    except auth.AuthError as e:
        raise PyxenError(f"{verb}: {e}") from None


def cmd_migrate(h: Host, a: argparse.Namespace) -> int:
    """``pyxen migrate [-s SSH] [--tcp HOST:PORT] DOM [HOST]``: live relocation
    (as ``xl migrate``: ``ssh HOST pyxen migrate-receive`` by default)."""
    import json
    import shlex
    dom = _dom(a)
    policy = {k: v for k, v in (("min_rate", a.min_rate), ("max_rate", a.max_rate),
                                ("max_rounds", a.max_rounds), ("timeout", a.timeout)) if v is not None}
    key = _migration_key(a, "migrate")
    if a.tcp:
        target = {"tcp": a.tcp}
    elif a.host:
        target = {"cmd": shlex.split(a.ssh) + [a.host] + shlex.split(a.receiver)}
    else:
        return _err("migrate: give the destination HOST (or --tcp HOST:PORT)")
    bar = _ProgressLine(h, dom, "migrating")
    try:
        r = h.migrate(dom, tcp=target.get("tcp"), cmd=target.get("cmd"), key=key,  # type: ignore[arg-type]
                      **policy)
    finally:
        bar.close()
    st = r["stats"]
    if a.stats:
        with open(a.stats, "w") as f:
            json.dump(st, f, indent=1)
    rounds = st.get("rounds") or []
    for rd in rounds:
        print(f"round {rd['round']:>2}: {rd['pages']:>7} pages in {rd['seconds']:.3f} s, "
              f"dirtying {rd['dirty_rate']:.0f} pages/s, limit {rd['rate_limit']:.0f} Mbit/s"
              + ("" if rd.get("live", True) else " (stop-and-copy)"), file=sys.stderr)
    print(f"Migrated domain {dom}: {st.get('pages')} pages, {int(st.get('bytes') or 0) / 1e6:.1f} MB "
          f"in {float(st.get('seconds') or 0):.2f} s, {len(rounds)} rounds "
          f"({st.get('stop_reason')}), stop-and-copy {float(st.get('downtime_seconds') or 0) * 1000:.1f} ms; "
          f"domain {r.get('remote_domid')} on the destination", file=sys.stderr)
    # as migrate-receive: the guest is resuming on the destination, maybe on
    # these CPUs; this interpreter's shutdown would compete with it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_migrate_receive(h: Host, a: argparse.Namespace) -> int:
    """``pyxen migrate-receive [--listen ADDR:PORT]``: the destination's side.
    Sends xl's banner, reads the xl header (the domain's config), has the
    daemon reserve the domain (or writes the refusal back), then hands the
    connection to the new domain process, which reads the stream and
    finishes the conversation; this exits with its result."""
    import json
    import socket as _socket

    from ..migration import auth, stream
    from ..migration import protocol as P
    lsock = conn = None
    key = _migration_key(a, "migrate-receive")
    if a.listen:
        host, _, port = a.listen.rpartition(":")
        try:
            lsock = _socket.create_server((host.strip("[]"), int(port)), reuse_port=False)
        except (OSError, ValueError) as e:
            return _err(f"migrate-receive: cannot listen on {a.listen}: {getattr(e, 'strerror', None) or e}")
        print(f"migrate-receive: listening on {a.listen}"
              + ("" if key else " (no --key: whoever connects first is trusted)"),
              file=sys.stderr, flush=True)
        while True:
            conn, peer = lsock.accept()
            P.tune_socket(conn)
            if key is None:
                break
            try:
                auth.receiver(conn.fileno(), conn.fileno(), key)
                break
            except P.ProtocolError as e:  # an impostor does not end the wait for the real sender
                print(f"migrate-receive: {peer[0]}:{peer[1]}: {e}", file=sys.stderr, flush=True)
                conn.close()
        lsock.close()
        rfd = wfd = conn.fileno()
    else:
        rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
        if key is not None:
            try:
                auth.receiver(rfd, wfd, key)
            except P.ProtocolError as e:
                return _err(f"migrate-receive: {e}")
    try:
        P.write_all(wfd, P.BANNER)
        hdr, _raw = P.read_xl_header(rfd, 120)
        cfg = hdr.config_json()  # type: ignore[attr-defined]
        try:
            r = h.migrate_incoming(cfg)
        except PyxenError as e:
            P.write_all(wfd, P.REFUSED + str(e).replace("\n", " ").encode()[:1000] + b"\n")
            return _err(f"migrate-receive: refused: {e}")
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.connect(str(r["sock"]))
        _socket.send_fds(s, [b'{"incoming": true}\n'], [rfd, wfd])
        buf = b""
        while not buf.endswith(b"\n"):
            b = s.recv(4096)
            if not b:
                break
            buf += b
        try:
            res = json.loads(buf or b"{}")
        except ValueError:
            res = {}
        if not res.get("ok"):
            return _err(f"migrate-receive: {res.get('error') or 'the domain process exited'}")
        print(f"migrate-receive: domain {r['domid']} ({r.get('name')}) received and running",
              file=sys.stderr, flush=True)
        # The guest resumes on this host right now, on the same CPUs: an
        # interpreter's orderly shutdown (5-15 ms of CPU tearing down every
        # module) would compete with its first milliseconds, which are the
        # migration's downtime.  Nothing is left to flush or undo.
        if conn is not None:
            conn.close()
        sys.stdout.flush()
        os._exit(0)
    except (P.ProtocolError, stream.StreamError, OSError) as e:
        return _err(f"migrate-receive: {e}")
    finally:
        if conn is not None:
            conn.close()


def cmd_daemon(h: Host, a: argparse.Namespace) -> int:
    if a.action == "stop":
        h.quit()
    else:
        print(f"pyxend running, pid {h.info().get('daemon_pid')}, run dir {h.run_dir}")
    return 0


# (name, help, how to add its arguments, function); each command has a parser of its own,
# parsed with parse_intermixed_args: options and KEY=VALUE in any order, as xl's getopt
_DOMAIN_CMDS = (("console", "attach to a domain's console (Ctrl-] detaches)"),
                ("destroy", "destroy a domain now"),
                ("shutdown", "ask a domain to power off"),
                ("reboot", "ask a domain to reboot"),
                ("pause", "pause a domain"), ("unpause", "unpause a domain"))


def commands() -> dict[str, argparse.ArgumentParser]:
    """One parser per command, so each can be parsed with argparse's
    parse_intermixed_args (which does not support subparsers): options may
    come before, between or after the positional arguments, as with xl
    (``xl create cfg -c key=value``)."""
    cmds: dict[str, argparse.ArgumentParser] = {}

    def new(name: str, helptext: str, fn: Any) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=f"pyxen {name}", description=helptext)
        p.set_defaults(fn=fn, cmd=name)
        cmds[name] = p
        return p

    c = new("create", "create a domain from an xl.cfg file", cmd_create)
    c.add_argument("config")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    c.add_argument("-c", dest="console", action="store_true", help="attach to the console")
    c.add_argument("-p", dest="paused", action="store_true", help="leave the domain paused")
    c.add_argument("-q", dest="quiet", action="store_true")
    new("list", "list domains", cmd_list)
    for name, helptext in _DOMAIN_CMDS:
        s = new(name, helptext, cmd_console if name == "console" else cmd_simple(name))
        s.add_argument("domain")
        if name in ("shutdown", "reboot", "destroy"):
            s.add_argument("-w", dest="wait", action="store_true", help="wait for it to go away")
    new("info", "host and hypervisor information", cmd_info)
    ba = new("block-attach", "attach a disk to a running domain (xl disk syntax)", cmd_block_attach)
    ba.add_argument("domain")
    ba.add_argument("disk", nargs="+", help="e.g. format=raw,vdev=xvdb,target=/tmp/d.img")
    bd = new("block-detach", "detach a disk (by vdev or device id)", cmd_block_detach)
    bd.add_argument("domain")
    bd.add_argument("device")
    bl = new("block-list", "list a domain's disks", cmd_block_list)
    bl.add_argument("domain")
    na = new("network-attach", "attach a vif to a running domain (xl vif syntax)", cmd_network_attach)
    na.add_argument("domain")
    na.add_argument("vif", nargs="*", help="e.g. mac=00:16:3e:01:02:03,bridge=xenbr0")
    nd = new("network-detach", "detach a vif (by devid or MAC)", cmd_network_detach)
    nd.add_argument("domain")
    nd.add_argument("device")
    nl = new("network-list", "list a domain's vifs", cmd_network_list)
    nl.add_argument("domain")
    di = new("domid", "the ID of the domain with this name", cmd_domid)
    di.add_argument("name")
    dn = new("domname", "the name of the domain with this ID", cmd_domname)
    dn.add_argument("domid")
    d = new("dmesg", "the hypervisor log", cmd_dmesg)
    d.add_argument("-c", dest="clear", action="store_true", help="clear after printing")
    sv = new("save", "save a domain to a file (Xen's format) and destroy it; -c: keep it running",
             cmd_save)
    sv.add_argument("domain")
    sv.add_argument("file")
    sv.add_argument("-c", dest="checkpoint", action="store_true",
                    help="checkpoint: leave the domain running after the save")
    sv.add_argument("-t", dest="timeout", type=float, default=10.0,
                    help="seconds the guest has to suspend (default 10)")
    rs = new("restore", "restore a domain from a save file", cmd_restore)
    rs.add_argument("file")
    rs.add_argument("-p", dest="paused", action="store_true", help="leave the domain paused")
    rs.add_argument("-c", dest="console", action="store_true", help="attach to the console")
    mg = new("migrate", "move a running domain to another host, live (as xl migrate)", cmd_migrate)
    mg.add_argument("domain")
    mg.add_argument("host", nargs="?", default=None)
    mg.add_argument("-s", dest="ssh", default="ssh",
                    help="the command that reaches HOST (default ssh): runs SSH HOST pyxen migrate-receive")
    mg.add_argument("--receiver", default="pyxen migrate-receive", help=argparse.SUPPRESS)
    mg.add_argument("--tcp", metavar="HOST:PORT", help="send to pyxen migrate-receive --listen there")
    mg.add_argument("--key", metavar="FILE",
                    help="pre-shared key: both ends prove they hold it (migrate-receive --key)")
    mg.add_argument("--stats", metavar="FILE", help="write the per-round figures (JSON) to FILE")
    mg.add_argument("--min-rate", type=float, help="Mbit/s of the first round (default 1000)")
    mg.add_argument("--max-rate", type=float,
                    help="Mbit/s above which iterating stops; the stop-and-copy rate (default 8000)")
    mg.add_argument("--max-rounds", type=int, help="live rounds at most (default 5, as Xen's stream-v2 save)")
    mg.add_argument("-t", dest="timeout", type=float, help="seconds the guest has to suspend (10)")
    mr = new("migrate-receive", "receive a live migration (stdin/stdout, or --listen)",
             cmd_migrate_receive)
    mr.add_argument("--listen", metavar="ADDR:PORT", help="accept one TCP connection there")
    mr.add_argument("--key", metavar="FILE",
                    help="pre-shared key (chmod 600, >= 16 bytes): only a sender holding it is accepted")
    sd = new("stream", "inspect a save file or migration stream: dump FILE", cmd_stream)
    sd.add_argument("action", choices=["dump"])
    sd.add_argument("file")
    sd.add_argument("-v", dest="verbose", action="store_true", help="one line per PAGE_DATA record")
    dm = new("daemon", "daemon control: status (does not start one), stop", cmd_daemon)
    dm.add_argument("action", choices=["status", "stop"])
    return cmds


def usage(cmds: dict[str, argparse.ArgumentParser]) -> str:
    lines = ["usage: pyxen [-h] COMMAND [ARGS...]   (pyxen COMMAND -h for a command's options)",
             "", "pyxen: Xen (x86_64 PV) on KVM, xl-style", "", "commands:"]
    lines += [f"  {n:<16}{p.description}" for n, p in cmds.items()]
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace | int:
    """The command line, or an exit status (help printed, or a usage error)."""
    cmds = commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(cmds), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 1
    cmd = cmds.get(argv[0])
    if cmd is None:
        return _err(f"unknown command {argv[0]!r} (pyxen -h lists them)")
    try:
        if "--" in argv:  # everything after it is positional (a name starting with '-');
            return cmd.parse_args(argv[1:])  # parse_intermixed_args mishandles it
        return cmd.parse_intermixed_args(argv[1:])
    except SystemExit as e:  # -h, or a usage error argparse has reported in one line
        return int(e.code or 0)


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else list(argv))
    if isinstance(a, int):
        return a
    if a.cmd == "stream":  # reads a file: no daemon
        return int(a.fn(None, a))
    try:
        if a.cmd == "daemon":  # neither status nor stop starts a daemon
            try:
                h = Host(autostart=False)
            except NotRunning as e:
                if a.action == "status":
                    print(e)
                    return 1
                raise
            with h:
                return int(a.fn(h, a))
        with Host() as h:
            return int(a.fn(h, a))
    except PyxenError as e:
        return _err(str(e))
    except PermissionError as e:  # a file or socket of another user: one line, never a traceback
        return _err(f"permission denied: {e.filename or ''} {e.strerror or e}".replace("  ", " "))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
