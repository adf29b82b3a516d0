"""The daemon's own checks of every field of a request.

The config parser (xlcfg) checks what a user writes, but the daemon cannot
trust that its clients used it: anything that reaches the socket may be raw
JSON.  So every request is checked here again, field by field, and turned
into the canonical form the zygote and the domain process rely on (what
``api.config_to_request`` builds).  Whatever is wrong becomes a
:class:`RequestError` whose message names the field, answered as
``{"ok": false, "error": ...}``; nothing a client sends may raise anything
else in the daemon or reach a domain process unchecked.

Paths (kernel, ramdisk, disk targets, passphrase files) must be absolute
strings without NUL, as the CLI sends them (it resolves every path).  The
domain process opens them with the daemon's rights; that is sound because
only the daemon's owner and root may connect (SO_PEERCRED, see daemon.py),
and each of them can open those files anyway: no client can make the daemon
open a file it could not open itself.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import hostmem
from ..abi import MAX_GUEST_CMDLINE
from . import paths
from .xlcfg import check_vif_mode, parse_disk_spec, parse_vif_rate, parse_vif_spec

MAX_DOMID = 0x7FEF  # DOMID_FIRST_RESERVED: 1..0x7FEF-1 are ordinary domains
MAX_VCPUS = 128
PATH_MAX = 4096
ACTION_KEYS = ("on_poweroff", "on_reboot", "on_crash", "on_watchdog", "on_soft_reset", "on_suspend")
ACTIONS = ("destroy", "restart", "rename-restart", "preserve", "coredump-destroy",
           "coredump-restart", "soft-reset")
SPEC_KEYS = {"name", "memory_mib", "maxmem_mib", "vcpus", "maxvcpus", "kernel", "cmdline",
             "ramdisk", "uuid", "extra", "domid"}
EXTRA_KEYS = {"disks", "disk_secrets", "paused", "actions", "vifs"}
VIF_KEYS = {"spec", "devid", "mac", "bridge", "vifname", "ip", "rate", "script", "gatewaydev"}
DISK_KEYS = {"spec", "vdev", "devid", "target", "format", "readwrite"}


class RequestError(ValueError):
    """A field of a request is wrong; the message names it."""


def integer(what: str, v: object, lo: int, hi: int) -> int:
    """An int (JSON number without fraction; not a bool) in lo..hi."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{what} must be an integer, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise RequestError(f"{what} must be from {lo} to {hi}, not {v}")
    return v


def string(what: str, v: object, max_len: int) -> str:
    if not isinstance(v, str):
        raise RequestError(f"{what} must be a string, not {type(v).__name__}")
    if "\0" in v:
        raise RequestError(f"{what} must not contain NUL")
    if len(v.encode("utf-8", "surrogatepass")) > max_len:
        raise RequestError(f"{what} is longer than {max_len} bytes")
    return v


def abs_path(what: str, v: object) -> str:
    """An absolute path (the daemon's and the domain process's working
    directory is not the client's), without NUL, at most PATH_MAX bytes.
    '..' components are legitimate in a path (``/cfgdir/../guest/build``) and
    harmless here: the domain process opens it with the daemon owner's rights,
    which every client that may connect has anyway."""
    s = string(what, v, PATH_MAX)
    if not s.startswith("/"):
        raise RequestError(f"{what} must be an absolute path, not {s!r}")
    return s


def name(v: object) -> str:
    why = paths.domain_name_problem(v)
    if why:
        raise RequestError(f"name {v!r}: {why}")
    assert isinstance(v, str)
    return v


def domid(v: object, what: str = "domid") -> int:
    return integer(what, v, 1, MAX_DOMID - 1)


def domain_ref(v: object) -> int | str:
    """The ``domain`` field of an op: a domid or a domain name."""
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) < 6:
        return integer("domain", int(v), 0, MAX_DOMID - 1)
    if isinstance(v, int) and not isinstance(v, bool):
        return integer("domain", v, 0, MAX_DOMID - 1)
    if isinstance(v, str):
        why = paths.domain_name_problem(v)
        if why:
            raise RequestError(f"domain {v!r}: {why}")
        return v
    raise RequestError(f"domain must be a domid or a name, not {type(v).__name__}")


def boolean(what: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise RequestError(f"{what} must be true or false")
    return v


def actions(v: object) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise RequestError("actions must be an object")
    out = {}
    for k, a in v.items():
        if k not in ACTION_KEYS:
            raise RequestError(f"actions: unknown key {k!r}")
        if a not in ACTIONS:
            raise RequestError(f"actions: {k} must be one of {', '.join(ACTIONS)}, not {a!r}")
        out[k] = str(a)
    return out


def disk(v: object) -> dict[str, Any]:
    """One disk (``api.disk_to_dict``): the spec string is parsed again and
    vdev/devid/format/access must agree with it; a local target is an
    absolute normalised path."""
    if not isinstance(v, dict):
        raise RequestError("a disk must be an object")
    unknown = set(v) - DISK_KEYS
    if unknown:
        raise RequestError(f"disk: unknown field {sorted(unknown)[0]!r}")
    spec = string("disk spec", v.get("spec"), PATH_MAX + 256)
    try:
        ds = parse_disk_spec(spec)
    except ValueError as e:
        raise RequestError(f"disk {spec!r}: {e}") from None
    want = {"vdev": ds.vdev, "devid": ds.devid, "format": ds.format.value, "readwrite": ds.readwrite}
    for k, w in want.items():
        if k in v and (v[k] != w or type(v[k]) is not type(w)):
            raise RequestError(f"disk {ds.vdev}: {k} {v[k]!r} does not match its spec ({w!r})")
    target = v.get("target")
    if ds.nbd is not None or ds.target is None:
        if target is not None and target != ds.target:
            raise RequestError(f"disk {ds.vdev}: target {target!r} does not match its spec")
        target = ds.target
    else:
        target = abs_path(f"disk {ds.vdev} target", target)
    return dict(want, spec=spec, target=target)


def vif(v: object) -> dict[str, Any]:
    """One vif (``api.vif_to_dict``): the spec string is parsed again; the
    MAC, bridge and interface name must be well-formed and agree with it."""
    if not isinstance(v, dict):
        raise RequestError("a vif must be an object")
    unknown = set(v) - VIF_KEYS
    if unknown:
        raise RequestError(f"vif: unknown field {sorted(unknown)[0]!r}")
    spec_ = string("vif spec", v.get("spec"), 4096)
    try:
        vs, _ = parse_vif_spec(spec_)
        mac = string("vif mac", v.get("mac"), 17)
        ms, _ = parse_vif_spec(f"mac={mac},bridge={v.get('bridge') or 'xenbr0'}"
                               + (f",vifname={v['vifname']}" if v.get("vifname") else ""))
        gwdev = string("vif gatewaydev", v.get("gatewaydev") or "", 64)
        if "," in gwdev:
            raise ValueError(f"bad gatewaydev {gwdev!r}")
        if gwdev:
            parse_vif_spec(f"gatewaydev={gwdev}")  # an interface name
    except ValueError as e:
        raise RequestError(f"vif {spec_!r}: {e}") from None
    if vs.mac is not None and vs.mac != ms.mac:
        raise RequestError(f"vif {spec_!r}: mac {mac!r} does not match its spec")
    rate = string("vif rate", v.get("rate") or "", 64)
    if rate:
        try:
            parse_vif_rate(rate)
        except ValueError as e:
            raise RequestError(f"vif {spec_!r}: {e}") from None
    script = string("vif script", v.get("script") or "", 4096)
    if script and (not script.startswith("/") or "\0" in script):
        raise RequestError(f"vif {spec_!r}: script {script!r} is not an absolute path")
    devid = integer("vif devid", v.get("devid", 0), 0, (1 << 16) - 1)
    ip = string("vif ip", v.get("ip") or "", 1024)
    try:  # route/NAT mode (Xen's vif-route/vif-nat done by pyxen): its ip= checked as at load
        check_vif_mode(replace(vs, ip=ip, options={**vs.options, "script": script}), devid)
    except ValueError as e:
        raise RequestError(f"vif {spec_!r}: {e}") from None
    return {"spec": spec_, "devid": devid,
            "mac": ms.mac, "bridge": ms.bridge, "vifname": ms.options.get("vifname", ""),
            "ip": ip, "rate": rate, "script": script,
            "gatewaydev": gwdev}


def spec(v: object, acts: object) -> tuple[dict[str, Any], dict[str, str]]:
    """A create request's ``spec`` and ``actions``, checked and canonical."""
    if not isinstance(v, dict):
        raise RequestError("spec must be an object")
    unknown = set(v) - SPEC_KEYS
    if unknown:
        raise RequestError(f"spec: unknown field {sorted(unknown)[0]!r}")
    out: dict[str, Any] = {"name": name(v.get("name"))}
    out["memory_mib"] = integer("memory_mib", v.get("memory_mib"), 1, 1 << 40)
    out["maxmem_mib"] = integer("maxmem_mib", v.get("maxmem_mib") or 0, 0, 1 << 40)
    out["vcpus"] = integer("vcpus", v.get("vcpus", 1), 1, MAX_VCPUS)
    out["maxvcpus"] = integer("maxvcpus", v.get("maxvcpus") or 0, 0, MAX_VCPUS)
    why = hostmem.size_problem(out["memory_mib"], out["maxmem_mib"], out["vcpus"],
                               out["maxvcpus"])
    if why:  # the same rule as the config loader's and the builder's
        raise RequestError(why)
    out["kernel"] = abs_path("kernel", v.get("kernel"))
    cmdline = string("cmdline", v.get("cmdline") or "", MAX_GUEST_CMDLINE - 1)
    out["cmdline"] = cmdline
    rd = v.get("ramdisk")
    out["ramdisk"] = None if rd in (None, "") else abs_path("ramdisk", rd)
    u = v.get("uuid")
    if u is not None:
        try:
            out["uuid"] = str(uuidlib.UUID(string("uuid", u, 64)))
        except ValueError:
            raise RequestError(f"uuid {u!r} is not a UUID") from None
    extra = v.get("extra") or {}
    if not isinstance(extra, dict):
        raise RequestError("spec extra must be an object")
    unknown = set(extra) - EXTRA_KEYS
    if unknown:
        raise RequestError(f"spec extra: unknown field {sorted(unknown)[0]!r}")
    ex: dict[str, Any] = {}
    if "disks" in extra:
        if not isinstance(extra["disks"], list) or len(extra["disks"]) > 64:
            raise RequestError("disks must be a list of at most 64 disks")
        ex["disks"] = [disk(d) for d in extra["disks"]]
        devids = [d["devid"] for d in ex["disks"]]
        if len(set(devids)) != len(devids):
            raise RequestError("two disks have the same device")
    if "vifs" in extra:
        if not isinstance(extra["vifs"], list) or len(extra["vifs"]) > 64:
            raise RequestError("vifs must be a list of at most 64 vifs")
        ex["vifs"] = [vif(x) for x in extra["vifs"]]
        devids = [x["devid"] for x in ex["vifs"]]
        if len(set(devids)) != len(devids):
            raise RequestError("two vifs have the same devid")
    if "disk_secrets" in extra:
        sec = extra["disk_secrets"]
        if not isinstance(sec, dict):
            raise RequestError("disk_secrets must be an object")
        ex["disk_secrets"] = {string("disk_secrets vdev", k, 64): abs_path(f"disk_secrets {k}", p)
                              for k, p in sec.items()}
    if "paused" in extra:
        ex["paused"] = boolean("paused", extra["paused"])
    out["extra"] = ex
    acts = actions(acts if acts is not None else extra.get("actions"))
    return out, acts


def adopted_spec(v: object) -> dict[str, Any]:
    """The spec a domain process of a previous daemon registers with (its own
    DomainSpec, with the actions in extra): the same checks as a create."""
    if not isinstance(v, dict):
        raise RequestError("spec must be an object")
    extra = v.get("extra") or {}
    s, acts = spec(v, extra.get("actions") if isinstance(extra, dict) else None)
    s["extra"]["actions"] = acts
    return s


def port(v: object, what: str = "port") -> int:
    return integer(what, v, 0, (1 << 17) - 1)


def path_of_domain_socket(rd: Path, domid_: int, v: object) -> str:
    """The console socket a domain process says it listens on: it must be the
    one paths.domain_socket names (a client connects to whatever we answer)."""
    want = str(paths.domain_socket(rd, domid_))
    if v not in (None, "", want):
        raise RequestError(f"sock must be {want}")
    return want
