"""Route and NAT modes for vifs (issue 10, xl's vif-route / vif-nat): which
script names choose them, the config's checks (file:line errors naming the
field), vif-nat's address rule, the plan of host changes and the nftables
masquerade rule's expressions (pure: no netlink here; tests/e2e/test_vif_modes.py
does the real thing)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from pyxen.backends import vifmode as V
from pyxen.toolstack import validate
from pyxen.toolstack.api import vif_to_dict
from pyxen.toolstack.xlcfg import ConfigError, load_domain_config, parse_vif_spec
from pyxen.toolstack.xsdomain import write_vif
from pyxen.xenstore.server import Xenstored


def cfg(tmp_path: Path, vif: str):  # noqa: ANN201
    p = tmp_path / "d.cfg"
    p.write_text(f'name = "v"\nkernel = "/bin/true"\nmemory = 64\n{vif}\n')
    return load_domain_config(p)


def test_script_names_choose_the_mode(tmp_path: Path) -> None:
    assert V.builtin_mode("/etc/xen/scripts/vif-route") == V.ROUTE
    assert V.builtin_mode("/etc/xen/scripts/vif-nat") == V.NAT
    assert V.builtin_mode("/etc/xen/scripts/vif-bridge") is None  # netback's bridge mode
    assert V.builtin_mode("") is None
    assert V.builtin_mode("/usr/local/bin/my-vif") is None  # a script of the user's: run
    # an installed, executable vif-route is Xen's script: run, as libxl
    s = tmp_path / "vif-route"
    s.write_text("#!/bin/sh\nexit 0\n")
    s.chmod(0o755)
    assert V.builtin_mode(str(s)) is None
    s.chmod(0o644)
    assert V.builtin_mode(str(s)) == V.ROUTE


def test_nat_addresses_as_vif_nat() -> None:
    # vif-nat: ip_from_dom 10.(domid/256).(domid%256).(handle+1), routing_ip: + 127 on the last byte
    assert V.nat_addresses(5, 0) == (IPv4Address("10.0.5.1"), IPv4Address("10.0.5.128"))
    assert V.nat_addresses(258, 3) == (IPv4Address("10.1.2.4"), IPv4Address("10.1.2.131"))
    assert V.nat_addresses(7, 0, "192.168.9.3/24 10.9.9.9") == (IPv4Address("192.168.9.3"),
                                                                 IPv4Address("192.168.9.130"))
    with pytest.raises(V.VifModeError, match="past 255"):
        V.nat_addresses(7, 0, "192.168.9.200")
    with pytest.raises(V.VifModeError, match="below 128"):
        V.nat_addresses(7, 128)
    with pytest.raises(V.VifModeError, match="IPv4 only"):
        V.nat_addresses(7, 0, "fd00::2")


def test_plans() -> None:
    gw = IPv4Address("192.0.2.1")
    p = V.plan(V.ROUTE, "vif4.0", 4, 0, "10.1.0.5 10.2.0.9/24", "eth0", gw)
    assert (p.address, p.routes, p.masquerade, p.gatewaydev) == (
        gw, [IPv4Network("10.1.0.5/32"), IPv4Network("10.2.0.0/24")], [], "eth0")
    with pytest.raises(V.VifModeError, match="needs ip="):
        V.plan(V.ROUTE, "vif4.0", 4, 0, "", "eth0", gw)
    with pytest.raises(V.VifModeError, match="gatewaydev eth0 has no IPv4 address"):
        V.plan(V.ROUTE, "vif4.0", 4, 0, "10.1.0.5", "eth0", None)
    with pytest.raises(V.VifModeError, match="IPv4 only"):
        V.plan(V.ROUTE, "vif4.0", 4, 0, "fd00::5", "eth0", gw)
    p = V.plan(V.NAT, "vif4.1", 4, 1, "", "up0", None)
    assert (p.address, p.routes, p.masquerade, p.nft_table) == (
        IPv4Address("10.0.4.129"), [IPv4Network("10.0.4.2/32")], [IPv4Network("10.0.4.2/32")],
        "pyxen-vif4.1")
    # ip= with more than one entry: the router from the first, every entry routed and masqueraded
    p = V.plan(V.NAT, "vif4.0", 4, 0, "192.168.5.2 192.168.6.0/24", "up0", None)
    assert p.address == IPv4Address("192.168.5.129")
    assert p.routes == p.masquerade == [IPv4Network("192.168.5.2/32"), IPv4Network("192.168.6.0/24")]


def _data(e: dict) -> tuple[str, dict]:
    attrs = dict(e["attrs"])
    return attrs["NFTA_EXPR_NAME"], dict(attrs["NFTA_EXPR_DATA"]["attrs"])


def test_masquerade_rule_expressions() -> None:
    ex = [_data(e) for e in V.masquerade_rule("up0", IPv4Network("10.0.4.0/24"))]
    assert [n for n, _ in ex] == ["meta", "cmp", "payload", "bitwise", "cmp", "masq"]
    assert ex[0][1]["NFTA_META_KEY"] == V.NFT_META_OIFNAME
    assert ex[1][1]["NFTA_CMP_DATA"]["attrs"][0][1] == b"up0" + bytes(13)
    assert ex[2][1]["NFTA_PAYLOAD_OFFSET"] == 12 and ex[2][1]["NFTA_PAYLOAD_LEN"] == 4  # iphdr.saddr
    assert ex[3][1]["NFTA_BITWISE_MASK"]["attrs"][0][1] == bytes([255, 255, 255, 0])
    assert ex[4][1]["NFTA_CMP_DATA"]["attrs"][0][1] == bytes([10, 0, 4, 0])
    # a /32 needs no mask
    assert [n for n, _ in (_data(e) for e in V.masquerade_rule("up0", IPv4Network("10.0.4.2/32")))] == [
        "meta", "cmp", "payload", "cmp", "masq"]


def test_config_modes_and_their_errors(tmp_path: Path) -> None:
    c, warns = cfg(tmp_path, "vif = [ 'script=vif-route,ip=10.3.0.2 10.4.0.0/16,gatewaydev=up0' ]")
    assert warns == []
    d = vif_to_dict(c.vifs[0])
    assert d["script"] == "/etc/xen/scripts/vif-route" and d["gatewaydev"] == "up0"
    assert d["ip"] == "10.3.0.2 10.4.0.0/16"
    assert validate.vif(d) == d
    c, _ = cfg(tmp_path, "vif = [ 'script=vif-nat,netdev=up1' ]")  # netdev: the deprecated alias
    assert vif_to_dict(c.vifs[0])["gatewaydev"] == "up1"
    c, _ = cfg(tmp_path, "vif = [ 'script=/etc/xen/scripts/vif-nat' ]")
    assert vif_to_dict(c.vifs[0])["script"] == "/etc/xen/scripts/vif-nat"
    f = tmp_path / "d.cfg"
    for vif, what in [
        ("'script=vif-route'", "ip: route mode (vif-route) needs ip="),
        ("'script=vif-route,ip=fd00::1'", "ip: 'fd00::1': route and NAT modes route IPv4 only"),
        ("'script=vif-nat,ip=10.0.0.250'", "ip: guest address 10.0.0.250: vif-nat's router address"),
        ("'script=vif-nat,devid=200'", "ip: devid 200"),
        ("'script=vif-route,ip=10.0.0.1,gatewaydev=a/b'", "bad gatewaydev 'a/b'"),
    ]:
        with pytest.raises(ConfigError) as e:
            cfg(tmp_path, f"vif = [ 'bridge=xenbr0',\n {vif} ]")
        msg = str(e.value)  # file:line: vif: 'the line': field: why
        assert msg.startswith(f"{f}:5: vif: {vif}: ") and what in msg, msg


def test_parse_gatewaydev() -> None:
    v, w = parse_vif_spec("gatewaydev=eth1,ip=10.0.0.2")
    assert v.options["gatewaydev"] == "eth1" and w == []
    with pytest.raises(ValueError, match="bad gatewaydev"):
        parse_vif_spec("gatewaydev=way-too-long-a-name")


def test_daemon_checks_modes() -> None:
    base = {"spec": "", "devid": 0, "mac": "00:16:3e:00:00:01", "bridge": "xenbr0",
            "script": "/etc/xen/scripts/vif-route"}
    with pytest.raises(validate.RequestError, match="needs ip="):
        validate.vif(base)
    with pytest.raises(validate.RequestError, match="bad gatewaydev"):
        validate.vif({**base, "ip": "10.0.0.2", "gatewaydev": "x y"})
    with pytest.raises(validate.RequestError, match="bad gatewaydev"):
        validate.vif({**base, "ip": "10.0.0.2", "gatewaydev": "up0,mac=00:16:3e:00:00:09"})
    assert validate.vif({**base, "ip": "10.0.0.2", "gatewaydev": "up0"})["gatewaydev"] == "up0"


def test_gatewaydev_node_as_libxl() -> None:
    xsd = Xenstored()
    xsd.write("/local/domain/3", "")
    write_vif(xsd, 3, {"devid": 0, "mac": "00:16:3e:01:02:03", "bridge": "xenbr0", "ip": "10.0.0.2",
                       "script": "/etc/xen/scripts/vif-route", "gatewaydev": "up0"})
    be = "/local/domain/0/backend/vif/3/0"
    assert xsd.read(f"{be}/gatewaydev") == b"up0"
    assert xsd.read(f"{be}/script") == b"/etc/xen/scripts/vif-route"
    assert xsd.read(f"{be}/ip") == b"10.0.0.2"
