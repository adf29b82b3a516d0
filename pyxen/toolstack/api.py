"""The Python API to a pyxen host: the same operations as the ``pyxen`` CLI.

    from pyxen.toolstack.api import Host
    h = Host()                         # starts pyxend on demand
    domid = h.create("examples/hello.cfg")
    for chunk in h.console(domid):      # bytes until the domain goes away
        ...
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import paths
from .proto import Conn, ProtocolError
from .xlcfg import ConfigError, DiskSpec, DomainConfig, VifSpec, load_domain_config, vif_script_path


class PyxenError(Exception):
    """An operation failed; the message is for the user."""


class NotRunning(PyxenError):
    """No daemon answers in the run dir (and ``autostart`` was off)."""


def config_to_request(cfg: DomainConfig) -> dict[str, Any]:
    """The daemon's create request for a parsed xl.cfg."""
    spec = {"name": cfg.name, "memory_mib": cfg.memory, "maxmem_mib": cfg.maxmem,
            "vcpus": cfg.vcpus, "maxvcpus": cfg.maxvcpus, "kernel": str(cfg.kernel),
            "cmdline": cfg.cmdline, "ramdisk": str(cfg.ramdisk) if cfg.ramdisk else None,
            "uuid": str(cfg.uuid or uuidlib.uuid4())}  # as xl: a fresh UUID unless configured
    actions = {k: getattr(cfg, k).value for k in ("on_poweroff", "on_reboot", "on_crash",
                                                   "on_watchdog")}
    disks = [disk_to_dict(ds) for ds in cfg.disks]
    extra: dict[str, Any] = {}
    if disks:
        extra["disks"] = disks
        secrets = disk_secret_files(cfg)
        if secrets:
            extra["disk_secrets"] = secrets
    if cfg.vifs:
        extra["vifs"] = [vif_to_dict(v) for v in cfg.vifs]
    if extra:
        spec["extra"] = extra
    return {"op": "create", "spec": spec, "actions": actions}


def disk_secret_files(cfg: DomainConfig) -> dict[str, str]:
    """``disk_secrets = ["xvda=/path/to/passphrase"]``: which file holds the
    passphrase of each encrypted disk (read by the domain process only)."""
    out = {}
    for item in cfg.raw.get_string_list("disk_secrets") or []:
        vdev, sep, path = item.partition("=")
        if not sep or not vdev or not path:
            raise PyxenError(f"disk_secrets: {item!r} is not VDEV=FILE")
        p = Path(path)
        if not p.is_absolute() and cfg.source is not None:
            p = Path(cfg.source).parent / p
        out[vdev.strip()] = str(p)
    return out


def disk_to_dict(ds: DiskSpec) -> dict[str, Any]:
    """A parsed disk line for the daemon and the domain process (paths resolved)."""
    return {"spec": ds.spec, "vdev": ds.vdev, "devid": ds.devid,
            "target": str(ds.path) if ds.path else ds.target, "format": ds.format.value,
            "readwrite": ds.readwrite}


def random_mac() -> str:
    """A MAC in Xen's OUI 00:16:3e, as libxl makes one (the top bit of the
    fourth byte clear)."""
    r = os.urandom(3)
    return f"00:16:3e:{r[0] & 0x7F:02x}:{r[1]:02x}:{r[2]:02x}"


def vif_to_dict(v: VifSpec, devid: int | None = None) -> dict[str, Any]:
    """A parsed vif line for the daemon and the domain process: its devid,
    its MAC (generated when the line has none) and bridge (xenbr0 by default)."""
    did = v.devid if devid is None else devid
    return {"spec": v.spec, "devid": int(did or 0), "mac": v.mac or random_mac(),
            "bridge": v.bridge or "xenbr0", "vifname": v.options.get("vifname", ""),
            "ip": v.ip or "", "rate": v.options.get("rate", ""),
            "script": vif_script_path(v.options.get("script", "")),
            "gatewaydev": v.options.get("gatewaydev", v.options.get("netdev", ""))}


class Host:
    """A connection to the local pyxen daemon."""

    def __init__(self, run_dir: str | Path | None = None, autostart: bool = True) -> None:
        self.run_dir = Path(run_dir) if run_dir else paths.run_dir()
        self.answered = False  # has the daemon answered a request on this connection yet?
        self.conn = self._connect(autostart)

    def _connect(self, autostart: bool) -> Conn:
        """Connect to the daemon of the run dir, starting it if ``autostart``.
        The run dir is checked first (ours, 0700, no symlink: paths.py), so that
        no other user's directory or socket ever gets our requests."""
        try:
            if autostart:
                paths.ensure_run_dir(self.run_dir)
            else:
                paths.check_run_dir(self.run_dir)
        except FileNotFoundError:
            raise NotRunning(f"pyxend is not running (no run dir {self.run_dir})") from None
        except OSError as e:
            raise PyxenError(str(e) if isinstance(e, paths.RunDirError)
                             else f"run dir {self.run_dir}: {e.strerror}") from None
        sock = str(paths.daemon_socket(self.run_dir))
        try:
            return Conn.connect(sock, timeout=5)
        except (FileNotFoundError, ConnectionRefusedError):
            if not autostart:
                raise NotRunning(f"pyxend is not running (no daemon on {sock})") from None
        except OSError as e:
            raise PyxenError(f"cannot connect to pyxend at {sock}: {e.strerror}") from None
        try:
            logfd = os.open(paths.daemon_log(self.run_dir),
                            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            os.fchmod(logfd, 0o600)
        except OSError as e:
            raise PyxenError(f"cannot open {paths.daemon_log(self.run_dir)}: {e.strerror}") from None
        log = os.fdopen(logfd, "ab")
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        subprocess.Popen([sys.executable, "-m", "pyxen.toolstack.daemon", "--run-dir", str(self.run_dir)],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                         env=env)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                return Conn.connect(sock, timeout=5)
            except OSError:
                if time.monotonic() > deadline:
                    raise PyxenError(f"pyxend did not start; see {paths.daemon_log(self.run_dir)}") from None
                time.sleep(0.005)

    def _call(self, **req: Any) -> dict[str, Any]:
        try:
            r = self.conn.call(req)
        except (OSError, ProtocolError) as e:
            if not self.answered:  # what SO_PEERCRED refusal looks like from here
                raise PyxenError(f"pyxend in {self.run_dir} closed the connection without an answer "
                                 "(it serves only its owner and root)") from None
            raise PyxenError(f"lost the connection to pyxend: {e}") from None
        self.answered = True
        if not r.get("ok"):
            err = str(r.get("error", "failed"))
            if err.startswith("unknown operation"):  # a daemon started by an older pyxen
                err += (f" (the pyxend in {self.run_dir} predates this pyxen: "
                        "`pyxen daemon stop`, then try again)")
            raise PyxenError(err)
        return r

    # ------------------------------------------------------------ operations
    def create(self, config: str | Path | DomainConfig, overrides: list[str] | None = None) -> int:
        """Create a domain from an xl.cfg file (or a parsed config); returns its domid."""
        if not isinstance(config, DomainConfig):
            try:
                config, _warnings = load_domain_config(config, overrides or [])
            except ConfigError as e:
                raise PyxenError(str(e)) from None
        return int(self._call(**config_to_request(config))["domid"])

    def create_request(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._call(**req)

    def create_attached(self, config: str | Path | DomainConfig,
                        overrides: list[str] | None = None) -> tuple[int, socket.socket]:
        """Create a domain with its console attached from the first byte (``create -c``):
        the domain is built paused, the console attached, then it is unpaused,
        so even a guest that finishes at once loses no output."""
        if not isinstance(config, DomainConfig):
            try:
                config, _warnings = load_domain_config(config, overrides or [])
            except ConfigError as e:
                raise PyxenError(str(e)) from None
        req = config_to_request(config)
        req["spec"].setdefault("extra", {})["paused"] = True
        r = self._call(**req)
        domid = int(r["domid"])
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(r["sock"])
            s.sendall(b'{"unpause":true}\n')
        except OSError as e:
            s.close()
            raise PyxenError(f"cannot attach to the console of domain {domid}: {e.strerror}") from None
        return domid, s

    def destroy(self, dom: int | str) -> None:
        self._call(op="destroy", domain=dom)

    def shutdown(self, dom: int | str, timeout: float = 10.0) -> str:
        """Ask the guest to power off through xenstore (control/shutdown); after
        ``timeout`` s without reaction, or if it has no PV control, force it.
        Returns how it was asked: "xenstore" or "hypercall"."""
        return str(self._call(op="shutdown", domain=dom, timeout=timeout).get("via"))

    def reboot(self, dom: int | str, timeout: float = 10.0) -> str:
        return str(self._call(op="reboot", domain=dom, timeout=timeout).get("via"))

    def block_attach(self, dom: int | str, disk: dict[str, Any]) -> None:
        """Hot-plug a disk (``disk_to_dict`` of a parsed disk line)."""
        self._call(op="block-attach", domain=dom, disk=disk)

    def block_detach(self, dom: int | str, devid: int) -> None:
        self._call(op="block-detach", domain=dom, devid=devid)

    def block_list(self, dom: int | str) -> list[dict[str, Any]]:
        return list(self._call(op="block-list", domain=dom)["disks"])

    def save(self, dom: int | str, file: str | Path, checkpoint: bool = False,
             timeout: float = 10.0) -> dict[str, Any]:
        """``xl save [-c]``: suspend the domain (it must act on control/shutdown
        = "suspend" within ``timeout`` s, or it keeps running and this fails),
        write it to ``file`` in Xen's format, then destroy it, or with
        ``checkpoint`` let it run on.  Returns pages, bytes and seconds."""
        r = self._call(op="save", domain=dom, file=str(Path(file).resolve()), checkpoint=checkpoint,
                       timeout=timeout)
        return {k: r.get(k) for k in ("pages", "bytes", "seconds")}

    def restore(self, file: str | Path, paused: bool = False) -> dict[str, Any]:
        """``xl restore``: a new domain from a save file; its domid, name and
        the restore's figures (pages, bytes, pinned, ns)."""
        r = self._call(op="restore", file=str(Path(file).resolve()), paused=paused)
        return {"domid": int(r["domid"]), "name": r.get("name"), "sock": r.get("sock"),
                **dict(r.get("stats") or {})}

    def migrate(self, dom: int | str, tcp: str | None = None, cmd: list[str] | None = None,
                key: bytes | None = None, **policy: float) -> dict[str, Any]:
        """``xl migrate``: send the domain live to a receiver, either a
        ``pyxen migrate-receive --listen`` at ``tcp`` ("HOST:PORT") or the
        command ``cmd`` (e.g. ``["ssh", HOST, "pyxen", "migrate-receive"]``),
        whose stdin/stdout carry the stream.  ``policy``: min_rate and
        max_rate (Mbit/s), max_rounds, few_pages, timeout (s to suspend).
        ``key``: the pre-shared key of a receiver started with ``--key``
        (pyxen/migration/auth.py: both ends prove they hold it).
        The domain is gone here once the destination runs it; on failure it
        keeps running here.  Returns the stats (per-round figures) and the
        destination's domid."""
        req: dict[str, Any] = {"op": "migrate", "domain": dom, **policy}
        if tcp is not None:
            req["tcp"] = tcp
        if cmd is not None:
            req["cmd"] = list(cmd)
        if key is not None:
            req["key"] = key.hex()
        r = self._call(**req)
        return {"stats": r.get("stats") or {}, "remote_domid": r.get("remote_domid")}

    def migrate_incoming(self, config: Any) -> dict[str, Any]:
        """The reservation stage of ``migrate-receive``: an empty domain for the
        config an incoming stream's xl header carries (or a refusal)."""
        r = self._call(op="migrate-incoming", config=config)
        return {"domid": int(r["domid"]), "sock": r.get("sock"), "name": r.get("name")}

    def progress(self, dom: int | str) -> dict[str, Any]:
        """The latest progress of a save or restore of ``dom`` (pages, total, bytes, ns)."""
        return dict(self._call(op="progress", domain=dom).get("progress") or {})

    def network_attach(self, dom: int | str, vif: dict[str, Any]) -> dict[str, Any]:
        """Hot-plug a vif (``vif_to_dict`` of a parsed vif line); the vif as attached."""
        return dict(self._call(op="network-attach", domain=dom, vif=vif)["vif"])

    def network_detach(self, dom: int | str, devid: int) -> None:
        self._call(op="network-detach", domain=dom, devid=devid)

    def network_list(self, dom: int | str) -> list[dict[str, Any]]:
        return list(self._call(op="network-list", domain=dom)["vifs"])

    def pause(self, dom: int | str) -> None:
        self._call(op="pause", domain=dom)

    def unpause(self, dom: int | str) -> None:
        self._call(op="unpause", domain=dom)

    def info(self) -> dict[str, Any]:
        return dict(self._call(op="info")["info"])

    def domain_info(self, dom: int | str) -> dict[str, Any]:
        return dict(self._call(op="domain-info", domain=dom)["info"])

    def dmesg(self, clear: bool = False) -> list[str]:
        return list(self._call(op="dmesg", clear=clear)["lines"])

    def quit(self, timeout: float = 15.0) -> None:
        """Stop the daemon (destroys every domain) and wait until it is gone,
        so that the next command starts a fresh one instead of reaching the
        old one on its way out."""
        self._call(op="quit")
        sock = paths.daemon_socket(self.run_dir)
        end = time.monotonic() + timeout
        while time.monotonic() < end and sock.exists():
            time.sleep(0.02)

    def console_socket(self, dom: int | str, unpause: bool = False) -> socket.socket:
        """A socket attached to the domain's console: reads give output (the
        scrollback first), writes go to the guest's console input.  With
        ``unpause`` the domain is unpaused once the console is attached."""
        r = self._call(op="console", domain=dom)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(r["sock"])
            s.sendall(b'{"unpause":true}\n' if unpause else b"{}\n")
        except OSError as e:
            s.close()
            raise PyxenError(f"cannot attach to the console of domain {dom}: {e.strerror}") from None
        return s

    def console(self, dom: int | str) -> Iterator[bytes]:
        s = self.console_socket(dom)
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    return
                yield b
        finally:
            s.close()

    def close(self) -> None:
        self.conn.close()

    def list(self, long: bool = False) -> list[dict[str, Any]]:
        return list(self._call(op="list", long=long)["domains"])

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
