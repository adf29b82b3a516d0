"""Route and NAT modes for vifs: what Xen's ``vif-route`` and ``vif-nat``
hotplug scripts do, done by pyxen itself when they are not installed.

xl chooses a vif's mode by the hotplug script it names (``script=``):
``vif-bridge`` (the default: netback's own bridge mode), ``vif-route`` or
``vif-nat`` (tools/hotplug/Linux in Xen's tree).  pyxen runs a script that is
an executable file, as libxl does; when the script named is Xen's
``vif-route`` or ``vif-nat`` and no such file is installed (the usual case:
pyxen needs none of Xen's tools), the same work is done here through netlink
(``pyroute2``), with no ``ip`` or ``iptables`` command:

* **route** (vif-route): the TAP is in no bridge; it gets the IPv4 address
  of ``gatewaydev`` (the host's interface with the default route when the
  vif does not name one) as a /32 and goes up, and each of the vif's ``ip=``
  addresses or networks gets a host route through it (``ip route add IP dev
  vif src GW metric 2``: metric 2 is vif-route's for ``type_if=vif``).
  ``proxy_arp`` on the vif answers the guest's ARP for any address the host
  can reach; ``net.ipv4.ip_forward`` is turned on so that the guest reaches
  beyond the host.
* **nat** (vif-nat): the guest's address is ``ip=`` or, without one,
  vif-nat's ``10.(domid/256).(domid%256).(devid+1)``; the vif gets the
  "router" address, the guest's with 127 added to its last byte, as a /32;
  the guest's address is routed through the vif (``src`` the router
  address).  vif-nat leaves masquerading to Xen's ``network-nat``; here the
  vif adds it itself: an nftables table of its own (``pyxen-vifD.N``, made
  through pyroute2's nfnetlink) with one ``postrouting`` NAT chain that
  masquerades what the guest sends out of ``gatewaydev``.  vif-nat's DHCP
  part (an entry in the host's dhcpd.conf) is not done: the guest sets its
  address itself.

Both also set ``rp_filter`` = 1 (strict) on the vif, so that the host
forwards only what the guest sends from the addresses routed to it: the
source checks vif-route's ``iptables -s IP`` rules make.  Teardown
(:meth:`VifSetup.undo`, at detach or when the domain ends) deletes the
routes, the address and the nftables table; ``ip_forward`` stays on (other
vifs may need it; Xen's ``network-route`` never turns it off either).

Only the toolstack's configuration (the backend's ``ip``/``gatewaydev``
nodes, which the guest cannot write) decides what is routed: nothing the
guest sends changes the host's routes or rules.  The plan (which addresses,
routes and rule) is pure and unit-tested; :func:`apply` and :func:`undo`
do the netlink work.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

BRIDGE, ROUTE, NAT = "bridge", "route", "nat"
#: Xen's hotplug scripts and the mode each one sets up
XEN_SCRIPTS = {"vif-bridge": BRIDGE, "vif-route": ROUTE, "vif-nat": NAT}
#: vif-route's route metric for a PV vif (``type_if=vif``; 1 is for an emulated NIC's tap)
ROUTE_METRIC = 2
#: /proc/sys of the process's network namespace (the daemon's: domain processes are forked from it)
PROC_SYS = "/proc/sys/net/ipv4"


class VifModeError(Exception):
    """A route or NAT vif that cannot be set up (its words name the vif and what is missing)."""


def builtin_mode(script: str) -> str | None:
    """``route`` or ``nat`` when ``script`` (a path) names Xen's ``vif-route``
    or ``vif-nat`` and no executable file is there: pyxen does the script's
    work.  None: run the script (or, for "", netback's own bridge mode)."""
    mode = XEN_SCRIPTS.get(os.path.basename(script)) if script else None
    if mode in (ROUTE, NAT) and not (os.path.isfile(script) and os.access(script, os.X_OK)):
        return mode
    return None


def parse_ips(ip: str) -> list[ipaddress.IPv4Network]:
    """The vif's ``ip=`` (space-separated addresses or networks) as IPv4
    networks (an address is a /32; host bits are dropped, as routes need).
    Route and NAT modes route IPv4 only, as Xen's scripts (ifconfig, /32)."""
    out = []
    for item in ip.split():
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise VifModeError(f"bad IP address '{item}'") from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise VifModeError(f"'{item}': route and NAT modes route IPv4 only")
        out.append(net)
    return out


def nat_addresses(domid: int, devid: int, ip: str = "") -> tuple[IPv4Address, IPv4Address]:
    """(the guest's address, the vif's "router" address) as vif-nat computes
    them: ``ip=`` (its first entry) or ``10.(domid/256).(domid%256).(devid+1)``,
    and the same with 127 added to the last byte (vif-nat's awk
    ``$4 + 127``).  A last byte above 128 leaves no router address (vif-nat
    would fail there too): VifModeError."""
    if ip.split():
        first = ip.split()[0]
        try:
            guest = ipaddress.ip_interface(first).ip
        except ValueError:
            raise VifModeError(f"bad IP address '{first}'") from None
        if not isinstance(guest, ipaddress.IPv4Address):
            raise VifModeError(f"'{first}': NAT mode routes IPv4 only")
    else:
        if not 0 <= devid <= 127:
            raise VifModeError(f"devid {devid}: vif-nat's address 10.D.D.(devid+1) needs a devid below 128")
        guest = ipaddress.IPv4Address(f"10.{(domid >> 8) & 0xFF}.{domid & 0xFF}.{devid + 1}")
    last = int(guest) & 0xFF
    if last + 127 > 255:
        raise VifModeError(f"guest address {guest}: vif-nat's router address (last byte + 127) "
                           "would be past 255; give ip= an address whose last byte is at most 128")
    return guest, ipaddress.IPv4Address(int(guest) + 127)


@dataclass
class Plan:
    """What a route or NAT vif changes on the host: the vif's address (a
    /32), the routes to the guest through it, and for NAT the masqueraded
    sources and the interface they leave by."""

    mode: str
    vif: str
    address: ipaddress.IPv4Address
    routes: list[ipaddress.IPv4Network]
    gatewaydev: str
    masquerade: list[ipaddress.IPv4Network] = field(default_factory=list)

    @property
    def nft_table(self) -> str:
        """The nftables table of this vif's own (NAT only)."""
        return f"pyxen-{self.vif}"


def plan(mode: str, vif: str, domid: int, devid: int, ip: str, gatewaydev: str,
         gateway_addr: ipaddress.IPv4Address | None) -> Plan:
    """What :func:`apply` will do for a vif (pure).  ``gateway_addr`` is
    ``gatewaydev``'s primary IPv4 address (route mode's vif address)."""
    if mode == ROUTE:
        routes = parse_ips(ip)
        if not routes:
            raise VifModeError(f"{vif}: route mode (vif-route) needs ip= (the guest's addresses to route)")
        if gateway_addr is None:
            raise VifModeError(f"{vif}: gatewaydev {gatewaydev} has no IPv4 address (vif-route: "
                               "'is not up. Bring it up or specify another interface with netdev=')")
        return Plan(ROUTE, vif, gateway_addr, routes, gatewaydev)
    if mode == NAT:
        guest, router = nat_addresses(domid, devid, ip)
        routes = parse_ips(ip) or [ipaddress.IPv4Network(guest)]
        return Plan(NAT, vif, router, routes, gatewaydev, masquerade=list(routes))
    raise VifModeError(f"{vif}: unknown vif mode {mode!r}")


# ------------------------------------------------------------ netlink
def _ipr() -> Any:
    try:
        from pyroute2 import IPRoute  # type: ignore[import-untyped]
    except ImportError:
        raise VifModeError("pyroute2 is needed for vifs (pip install pyroute2)") from None
    return IPRoute()


def default_gatewaydev(ipr: Any) -> str:
    """The interface of the IPv4 default route (vif-route's ``netdev`` when the vif names none)."""
    for r in ipr.get_routes(family=socket.AF_INET, dst_len=0, table=254):
        oif = r.get_attr("RTA_OIF")
        if oif is None:
            for nh in r.get_attr("RTA_MULTIPATH") or []:
                oif = nh.get("oif")
                break
        if oif is not None:
            link = ipr.get_links(oif)
            if link:
                return str(link[0].get_attr("IFLA_IFNAME"))
    raise VifModeError("no gatewaydev given and the host has no IPv4 default route "
                       "(give the vif gatewaydev=IFACE)")


def primary_ipv4(ipr: Any, dev: str) -> ipaddress.IPv4Address | None:
    """``dev``'s primary IPv4 address (vif-common.sh's ``ip_of``), None if none."""
    idx = ipr.link_lookup(ifname=dev)
    if not idx:
        raise VifModeError(f"gatewaydev {dev}: no such interface")
    for a in ipr.get_addr(family=socket.AF_INET, index=idx[0]):
        if a["flags"] & 0x01:  # IFA_F_SECONDARY
            continue
        addr = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
        if addr:
            return ipaddress.IPv4Address(addr)
    return None


def _sysctl(path: str, value: str) -> None:
    with open(os.path.join(PROC_SYS, path), "w") as f:
        f.write(value)


def setup(mode: str, vif: str, domid: int, devid: int, ip: str, gatewaydev: str) -> Plan:
    """Do route or NAT mode's work for the TAP ``vif`` (already made, with its
    host MAC): find ``gatewaydev`` and its address, :func:`plan`, :func:`apply`."""
    with _ipr() as ipr:
        gw = gatewaydev or (default_gatewaydev(ipr) if mode == ROUTE or mode == NAT else "")
        gw_addr = primary_ipv4(ipr, gw) if mode == ROUTE else None
    p = plan(mode, vif, domid, devid, ip, gw, gw_addr)
    apply(p)
    return p


def apply(p: Plan) -> None:
    """Put a plan into effect: the vif's /32 address and up, proxy_arp and
    strict rp_filter on it, ip_forward, the routes, and for NAT the
    masquerade table.  Half-done work is undone on failure."""
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]
    try:
        with _ipr() as ipr:
            idx = ipr.link_lookup(ifname=p.vif)
            if not idx:
                raise VifModeError(f"{p.vif}: no such interface")
            ipr.addr("add", index=idx[0], address=str(p.address), prefixlen=32)
            ipr.link("set", index=idx[0], state="up")
            _sysctl(f"conf/{p.vif}/proxy_arp", "1")
            _sysctl(f"conf/{p.vif}/rp_filter", "1")
            _sysctl("ip_forward", "1")
            # replace, not add: a guest relocated within this host has its
            # routes on the source's vif until that one goes (the same metric:
            # no other route of the host's is touched)
            for net in p.routes:
                ipr.route("replace", dst=str(net.network_address), dst_len=net.prefixlen, oif=idx[0],
                          prefsrc=str(p.address), priority=ROUTE_METRIC)
        if p.masquerade:
            _nft_add(p)
    except NetlinkError as e:
        undo(p)
        raise VifModeError(f"{p.vif}: {p.mode} mode: {e}") from None
    except OSError as e:
        undo(p)
        raise VifModeError(f"{p.vif}: {p.mode} mode: {e}") from None


def undo(p: Plan) -> list[str]:
    """Remove what :func:`apply` added (each step on its own: a TAP already
    gone took its address and routes with it).  What could not be removed, in words."""
    from pyroute2.netlink.exceptions import NetlinkError
    left: list[str] = []
    if p.masquerade:
        try:
            _nft_del(p)
        except (NetlinkError, OSError) as e:
            if getattr(e, "code", 0) != 2:  # ENOENT: never made
                left.append(f"nftables table {p.nft_table}: {e}")
    try:
        with _ipr() as ipr:
            idx = ipr.link_lookup(ifname=p.vif)
            if not idx:
                return left
            for net in p.routes:
                try:
                    ipr.route("del", dst=str(net.network_address), dst_len=net.prefixlen, oif=idx[0],
                              priority=ROUTE_METRIC)
                except NetlinkError as e:
                    if e.code not in (3, 2):  # ESRCH/ENOENT: not there
                        left.append(f"route {net}: {e}")
            try:
                ipr.addr("del", index=idx[0], address=str(p.address), prefixlen=32)
            except NetlinkError as e:
                if e.code not in (99, 2):  # EADDRNOTAVAIL: not there
                    left.append(f"address {p.address}: {e}")
    except (NetlinkError, OSError) as e:
        left.append(str(e))
    return left


# ------------------------------------------------------------ nftables (nfnetlink through pyroute2)
NFPROTO_IPV4 = 2
NF_ACCEPT = 1
NFT_META_OIFNAME = 7
NFT_PAYLOAD_NETWORK_HEADER = 1
NFT_CMP_EQ = 0
NFT_REG_1 = 1
NAT_POSTROUTING_PRIORITY = 100  # NF_IP_PRI_NAT_SRC, nft's "srcnat"


def _expr(name: str, **kw: Any) -> dict[str, Any]:
    return {"attrs": [("NFTA_EXPR_NAME", name),
                      ("NFTA_EXPR_DATA", {"attrs": [(f"NFTA_{name.upper()}_{k.upper()}", v)
                                                    for k, v in kw.items()]})]}


def masquerade_rule(gatewaydev: str, src: ipaddress.IPv4Network) -> list[dict[str, Any]]:
    """``oifname GATEWAYDEV ip saddr SRC masquerade`` as nftables expressions
    (what ``nft`` would send): the out-interface name (16 bytes, NUL-padded)
    compared, the source address masked to the network and compared, masq."""
    name = gatewaydev.encode().ljust(16, b"\0")
    out = [_expr("meta", key=NFT_META_OIFNAME, dreg=NFT_REG_1),
           _expr("cmp", sreg=NFT_REG_1, op=NFT_CMP_EQ, data={"attrs": [("NFTA_DATA_VALUE", name)]}),
           _expr("payload", dreg=NFT_REG_1, base=NFT_PAYLOAD_NETWORK_HEADER, offset=12, len=4)]
    if src.prefixlen < 32:
        out.append(_expr("bitwise", sreg=NFT_REG_1, dreg=NFT_REG_1, len=4,
                         mask={"attrs": [("NFTA_DATA_VALUE", src.netmask.packed)]},
                         xor={"attrs": [("NFTA_DATA_VALUE", bytes(4))]}))
    out.append(_expr("cmp", sreg=NFT_REG_1, op=NFT_CMP_EQ,
                     data={"attrs": [("NFTA_DATA_VALUE", src.network_address.packed)]}))
    out.append(_expr("masq"))
    return out


def _nft() -> Any:
    from pyroute2.nftables.main import NFTables  # type: ignore[import-untyped]
    return NFTables(nfgen_family=NFPROTO_IPV4)


def _nft_add(p: Plan) -> None:
    """The vif's own table: ``table ip pyxen-vifD.N { chain postrouting { type
    nat hook postrouting priority srcnat; policy accept; RULES } }``."""
    nft = _nft()
    try:
        try:  # a table left by a vif of this name whose process was killed: made afresh
            nft.table("del", name=p.nft_table)
        except Exception as e:  # noqa: BLE001 - NetlinkError ENOENT: none (the usual case)
            if getattr(e, "code", 2) != 2:
                raise
        nft.table("add", name=p.nft_table)
        nft.chain("add", table=p.nft_table, name="postrouting", hook="postrouting", type="nat",
                  priority=NAT_POSTROUTING_PRIORITY, policy=NF_ACCEPT)
        for src in p.masquerade:
            nft.rule("add", table=p.nft_table, chain="postrouting",
                     expressions=(masquerade_rule(p.gatewaydev, src),))
    finally:
        nft.close()


def _nft_del(p: Plan) -> None:
    nft = _nft()
    try:
        nft.table("del", name=p.nft_table)
    finally:
        nft.close()


def drop_nat_table(vif: str) -> bool:
    """Delete NAT vif ``vif``'s nftables table if it is still there (its
    domain process died without undoing its plan: SIGKILL); True if one
    was.  The routes and proxy_arp went with the TAP; the table does not."""
    name = f"pyxen-{vif}"
    if name not in nft_tables():
        return False
    nft = _nft()
    try:
        nft.table("del", name=name)
    finally:
        nft.close()
    return True


def nft_tables() -> list[str]:
    """The names of the IPv4 nftables tables of this network namespace (tests, diagnostics)."""
    nft = _nft()
    try:
        return [t.get_attr("NFTA_TABLE_NAME") for t in nft.get_tables()]
    finally:
        nft.close()
