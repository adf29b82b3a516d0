"""XenStore for the domains: their standard layout, and their rings' relay end.

The daemon hosts xenstored (``pyxen.xenstore``): host clients use its unix
socket as dom0; each guest's ring is relayed by its domain process (see
``pyxen.backends.xsring``) to :class:`DomainSocket`, where every connection
starts with ``b"PXSD"`` and the domid, and is then that domain's
(unprivileged) xenstore connection.  Only domain processes can reach that
socket (the run directory is the toolstack's).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..xenstore.server import Connection, Xenstored

HELLO = struct.Struct("<4sI")
MAGIC = b"PXSD"
CHUNK = 64 << 10            # bytes taken from a domain's queue at a time
# bytes of requests read at a time: about one request plus a header (xenstored reads one
# request, then asks domain_can_read again), so a stalled domain overshoots by little
REQUEST_CHUNK = 4096 + 16


#: The nodes of a domain's store and console rings, and the start_info keys
#: they come from: all a restored or migrated domain's layout waits for.
RING_NODES = (("store/port", "store_evtchn"), ("store/ring-ref", "store_mfn"),
              ("console/port", "console_evtchn"), ("console/ring-ref", "console_mfn"))


def write_ring_nodes(xsd: Xenstored, domid: int, info: dict[str, int]) -> None:
    """The ring nodes of :data:`RING_NODES` from ``info`` (start_info)."""
    for path, key in RING_NODES:
        xsd.write(f"/local/domain/{domid}/{path}", str(info.get(key, 0)))


def write_domain_layout(xsd: Xenstored, domid: int, spec: dict[str, Any], info: dict[str, int]) -> None:
    """What libxl writes for a new PV domain, with its permissions: the domain
    can read its own directory and write only where guests write."""
    dp = f"/local/domain/{domid}"
    uuid = str(spec.get("uuid") or "00000000-0000-0000-0000-000000000000")
    vm = f"/vm/{uuid}"
    ro = ["n0", f"r{domid}"]  # owner dom0, the domain may read
    rw = [f"n{domid}"]  # owned by the domain
    mem_kib = int(spec.get("memory_mib", 0)) * 1024
    maxmem_kib = max(int(spec.get("maxmem_mib") or 0) * 1024, mem_kib)
    vcpus = int(spec.get("vcpus", 1))
    maxvcpus = max(int(spec.get("maxvcpus") or 0), vcpus)
    for path in (dp, vm):
        xsd.write(path, "")
        xsd.set_perms(path, ro)
    values = {
        f"{vm}/uuid": uuid, f"{vm}/name": str(spec.get("name", "")),
        f"{vm}/start_time": "0",
        f"{dp}/vm": vm, f"{dp}/name": str(spec.get("name", "")), f"{dp}/domid": str(domid),
        f"{dp}/memory/static-max": str(maxmem_kib), f"{dp}/memory/target": str(mem_kib),
        f"{dp}/memory/videoram": "-1",
        **{f"{dp}/{path}": str(info.get(key, 0)) for path, key in RING_NODES},
        f"{dp}/console/type": "xenconsoled", f"{dp}/console/limit": "1048576",
        f"{dp}/image/os_type": "linux",
    }
    for i in range(maxvcpus):
        values[f"{dp}/cpu/{i}/availability"] = "online" if i < vcpus else "offline"
    for path, value in values.items():
        xsd.write(path, value)
    for sub in ("device", "control", "error", "drivers", "attr", "data", "feature"):
        xsd.write(f"{dp}/{sub}", "")
        xsd.set_perms(f"{dp}/{sub}", rw if sub in ("data", "drivers", "attr", "error", "feature")
                      else ro)
    for node in ("shutdown", "feature-poweroff", "feature-reboot", "feature-suspend", "sysrq"):
        xsd.write(f"{dp}/control/{node}", "")
        xsd.set_perms(f"{dp}/control/{node}", rw)
    # the guest may advertise its suspend event channel here (libxl_create.c)
    xsd.write(f"{dp}/device/suspend/event-channel", "")
    xsd.set_perms(f"{dp}/device/suspend/event-channel", rw)


def _write_device(xsd: Xenstored, domid: int, be: str, be_vals: dict[str, str], fe: str,
                  fe_vals: dict[str, str]) -> None:
    """A split device's two directories as libxl writes them: the backend's
    owned by dom0 and readable by the guest, the frontend's owned by the
    guest and readable by dom0 (its state node too)."""
    xsd.write(be, "")
    xsd.set_perms(be, ["n0", f"r{domid}"])
    for k, v in be_vals.items():
        xsd.write(f"{be}/{k}", v)
    xsd.write(fe, "")
    xsd.set_perms(fe, [f"n{domid}", "r0"])
    for k, v in fe_vals.items():
        xsd.write(f"{fe}/{k}", v)
    xsd.set_perms(f"{fe}/state", [f"n{domid}", "r0"])


def write_vbd(xsd: Xenstored, domid: int, disk: dict[str, Any]) -> None:
    """libxl's nodes for a virtual block device, both ends in Initialising."""
    devid = int(disk["devid"])
    fe = f"/local/domain/{domid}/device/vbd/{devid}"
    be = f"/local/domain/0/backend/vbd/{domid}/{devid}"
    fmt = str(disk.get("format", "raw"))
    rw = bool(disk.get("readwrite", True))
    be_vals = {"frontend": fe, "frontend-id": str(domid), "online": "1", "state": "1",
               "params": str(disk.get("target", "")), "type": "qdisk" if fmt != "raw" else "phy",
               "mode": "w" if rw else "r", "dev": str(disk.get("vdev", "")),
               "device-type": "disk", "removable": "0", "bootable": "1"}
    fe_vals = {"backend": be, "backend-id": "0", "virtual-device": str(devid),
               "device-type": "disk", "state": "1"}
    _write_device(xsd, domid, be, be_vals, fe, fe_vals)


def write_vif(xsd: Xenstored, domid: int, vif: dict[str, Any]) -> None:
    """libxl's nodes for a virtual network interface, both ends in Initialising
    (libxl__device_nic_add: the backend's frontend/online/state/handle/mac/
    bridge/script, the frontend's backend/state/handle/mac)."""
    devid = int(vif["devid"])
    fe = f"/local/domain/{domid}/device/vif/{devid}"
    be = f"/local/domain/0/backend/vif/{domid}/{devid}"
    be_vals = {"frontend": fe, "frontend-id": str(domid), "online": "1", "state": "1",
               "handle": str(devid), "mac": str(vif["mac"]), "bridge": str(vif.get("bridge") or ""),
               "script": str(vif.get("script") or "/etc/xen/scripts/vif-bridge"), "type": "vif"}
    if vif.get("ip"):
        be_vals["ip"] = str(vif["ip"])
    if vif.get("gatewaydev"):  # vif-route/vif-nat's netdev (libxl__device_nic_add)
        be_vals["gatewaydev"] = str(vif["gatewaydev"])
    if vif.get("rate"):  # libxl: "BYTES_PER_INTERVAL,INTERVAL_USECS", netback's credit limiter
        from .xlcfg import parse_vif_rate
        nbytes, usecs = parse_vif_rate(str(vif["rate"]))
        be_vals["rate"] = f"{nbytes},{usecs}"
    fe_vals = {"backend": be, "backend-id": "0", "state": "1", "handle": str(devid),
               "mac": str(vif["mac"])}
    _write_device(xsd, domid, be, be_vals, fe, fe_vals)


class DomainSocket:
    """Serves the domain processes' ring relays."""

    def __init__(self, path: Path, xsd: Xenstored,
                 authorize: Callable[[socket.socket, int], bool] | None = None) -> None:
        self.path = path
        self.xsd = xsd
        self.authorize = authorize  # may this connection speak for this domid? (pyxend: SO_PEERCRED pid)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        os.chmod(path, 0o600)
        self.listener.listen(128)
        self.stop = False
        threading.Thread(target=self._accept_loop, name="xs-domains", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self.stop:
            try:
                s, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s: socket.socket) -> None:
        try:
            s.settimeout(5)
            hello = b""
            while len(hello) < HELLO.size:
                chunk = s.recv(HELLO.size - len(hello))
                if not chunk:
                    return
                hello += chunk
            magic, domid = HELLO.unpack(hello)
            dom = self.xsd.domains.get(domid)
            if magic != MAGIC or dom is None or dom.conn is None or domid == 0:
                return
            if self.authorize is not None and not self.authorize(s, domid):
                return
            conn = dom.conn
            s.setblocking(False)
            self._relay(s, conn)
        except OSError:
            return
        finally:
            s.close()

    def _relay(self, s: socket.socket, conn: Connection) -> None:
        """Move requests from a domain process to `conn` and what is queued for the
        domain back, never blocking on the domain: what the domain does not read
        stays in the connection's queue, where the duplicate check and the memory
        quota apply, and while `conn.can_read()` is false (xenstored's
        domain_can_read: outstanding requests or memory at quota) its requests
        are left unread, so a flooding guest stalls itself, not xenstored."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)

        me = threading.get_ident()

        def on_output() -> None:
            if threading.get_ident() == me:
                return  # our own feed(): the loop takes the output right after it
            try:
                os.write(wake_w, b"x")
            except OSError:
                pass
        conn.on_output = on_output
        out = bytearray()
        try:
            while not conn.closed and not self.stop:
                if len(out) < CHUNK and conn.has_output:
                    out += conn.take_output(CHUNK)
                if out:
                    try:
                        n = s.send(out)
                    except BlockingIOError:
                        n = 0
                    del out[:n]
                    if len(out) < CHUNK and conn.has_output:
                        continue
                readers: list[socket.socket | int] = [wake_r]
                if len(out) < CHUNK and conn.can_read():
                    readers.append(s)
                r, _, _ = select.select(readers, [s] if out else [], [], 1.0)
                if wake_r in r:
                    try:
                        while os.read(wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                if s in r:
                    try:
                        data = s.recv(REQUEST_CHUNK)
                    except BlockingIOError:
                        continue
                    if not data:
                        return
                    conn.feed(data, limit=0)
        finally:
            conn.on_output = None
            os.close(wake_r)
            os.close(wake_w)

    def close(self) -> None:
        self.stop = True
        self.listener.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
