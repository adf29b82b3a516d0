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

from .api import Host, PyxenError, config_to_request, disk_to_dict
from .xlcfg import ConfigError, load_domain_config, parse_disk_spec, vdev_to_devid

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
    return int(a.domain) if a.domain.isdigit() else a.domain


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
    devid = int(dev) if dev.isdigit() else vdev_to_devid(dev)
    h.block_detach(_dom(a), devid)
    return 0


def cmd_block_list(h: Host, a: argparse.Namespace) -> int:
    print(f"{'Vdev':<8}{'BE':>4}{'handle':>8}{'state':>7}  {'format':<8}{'mode':<6}target")
    for d in h.block_list(_dom(a)):
        print(f"{d.get('vdev', ''):<8}{0:>4}{d['devid']:>8}{d.get('state', 0):>7}  "
              f"{d.get('format', ''):<8}{'w' if d.get('readwrite', True) else 'r':<6}{d.get('target', '')}")
    return 0


def cmd_info(h: Host, a: argparse.Namespace) -> int:
    for k, v in h.info().items():
        print(f"{k}: {v}")
    return 0


def cmd_dmesg(h: Host, a: argparse.Namespace) -> int:
    for line in h.dmesg(clear=a.clear):
        print(line)
    return 0


def cmd_daemon(h: Host, a: argparse.Namespace) -> int:
    if a.action == "stop":
        h.quit()
    else:
        print(f"pyxend running, run dir {h.run_dir}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyxen", description="pyxen: Xen (x86_64 PV) on KVM, xl-style")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    c = sub.add_parser("create", help="create a domain from an xl.cfg file")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    c.add_argument("-c", dest="console", action="store_true", help="attach to the console")
    c.add_argument("-p", dest="paused", action="store_true", help="leave the domain paused")
    c.add_argument("-q", dest="quiet", action="store_true")
    c.set_defaults(fn=cmd_create)
    sub.add_parser("list", help="list domains").set_defaults(fn=cmd_list)
    for name, helptext in (("console", "attach to a domain's console (Ctrl-] detaches)"),
                           ("destroy", "destroy a domain now"),
                           ("shutdown", "ask a domain to power off"),
                           ("reboot", "ask a domain to reboot"),
                           ("pause", "pause a domain"), ("unpause", "unpause a domain")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("domain")
        if name in ("shutdown", "reboot", "destroy"):
            s.add_argument("-w", dest="wait", action="store_true", help="wait for it to go away")
        s.set_defaults(fn=cmd_console if name == "console" else cmd_simple(name))
    sub.add_parser("info", help="host and hypervisor information").set_defaults(fn=cmd_info)
    ba = sub.add_parser("block-attach", help="attach a disk to a running domain (xl disk syntax)")
    ba.add_argument("domain")
    ba.add_argument("disk", nargs="+", help="e.g. format=raw,vdev=xvdb,target=/tmp/d.img")
    ba.set_defaults(fn=cmd_block_attach)
    bd = sub.add_parser("block-detach", help="detach a disk (by vdev or device id)")
    bd.add_argument("domain")
    bd.add_argument("device")
    bd.set_defaults(fn=cmd_block_detach)
    bl = sub.add_parser("block-list", help="list a domain's disks")
    bl.add_argument("domain")
    bl.set_defaults(fn=cmd_block_list)
    di = sub.add_parser("domid", help="the ID of the domain with this name")
    di.add_argument("name")
    di.set_defaults(fn=cmd_domid)
    dn = sub.add_parser("domname", help="the name of the domain with this ID")
    dn.add_argument("domid")
    dn.set_defaults(fn=cmd_domname)
    d = sub.add_parser("dmesg", help="the hypervisor log")
    d.add_argument("-c", dest="clear", action="store_true", help="clear after printing")
    d.set_defaults(fn=cmd_dmesg)
    dm = sub.add_parser("daemon", help="daemon control (status, stop)")
    dm.add_argument("action", choices=["status", "stop"])
    dm.set_defaults(fn=cmd_daemon)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if not getattr(a, "fn", None):
        p.print_help()
        return 1
    try:
        with Host(autostart=a.cmd != "daemon" or a.action != "stop") as h:
            return int(a.fn(h, a))
    except PyxenError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
