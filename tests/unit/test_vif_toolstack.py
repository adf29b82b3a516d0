"""vif= in the toolstack (issue 10): the config loader's checks with
file:line errors, devids and MACs as libxl assigns them, the daemon's
validation of what a client sends, and libxl's xenstore nodes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyxen.toolstack import validate
from pyxen.toolstack.api import config_to_request, random_mac, vif_to_dict
from pyxen.toolstack.xlcfg import ConfigError, load_domain_config, parse_vif_rate
from pyxen.toolstack.xsdomain import write_vif
from pyxen.xenstore.server import Xenstored


def cfg(tmp_path: Path, vif: str):  # noqa: ANN201
    p = tmp_path / "d.cfg"
    p.write_text(f'name = "v"\nkernel = "/bin/true"\nmemory = 64\n{vif}\n')
    return load_domain_config(p)


def test_devids_macs_and_defaults(tmp_path: Path) -> None:
    c, _ = cfg(tmp_path, "vif = [ 'mac=00:16:3E:AA:bb:01,bridge=br9', '', 'devid=5,vifname=eth-x' ]")
    assert [v.devid for v in c.vifs] == [0, 1, 5]
    d = [vif_to_dict(v) for v in c.vifs]
    assert d[0]["mac"] == "00:16:3e:aa:bb:01" and d[0]["bridge"] == "br9"
    assert d[1]["bridge"] == "xenbr0"
    assert re.fullmatch(r"00:16:3e:[0-7][0-9a-f](:[0-9a-f]{2}){2}", d[1]["mac"])
    assert d[2]["vifname"] == "eth-x"
    req = config_to_request(c)
    assert [v["devid"] for v in req["spec"]["extra"]["vifs"]] == [0, 1, 5]
    spec, _ = validate.spec(req["spec"], req["actions"])
    assert spec["extra"]["vifs"] == req["spec"]["extra"]["vifs"]


def test_random_macs_are_xen_oui_unicast() -> None:
    for _ in range(200):
        m = random_mac()
        assert m.startswith("00:16:3e:") and int(m.split(":")[3], 16) < 0x80


@pytest.mark.parametrize("vif,what", [
    ("vif = [ 'bridge=a/b' ]", "bad bridge 'a/b'"),
    ("vif = [ 'bridge=averyverylongbridgename' ]", "bad bridge"),
    ("vif = [ 'vifname=has space' ]", "bad vifname"),
    ("vif = [ 'mac=00:16:3e:zz:00:01' ]", "bad MAC address"),
    ("vif = [ 'mac=01:16:3e:00:00:01' ]", "multicast"),
    ("vif = [ 'devid=1', 'devid=1' ]", "devid 1 is used twice"),
    ("vif = [ 'mac=00:16:3e:00:00:01', 'mac=00:16:3e:00:00:01' ]", "MAC 00:16:3e:00:00:01 is used twice"),
])
def test_bad_vif_lines_name_file_line_and_field(tmp_path: Path, vif: str, what: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(tmp_path, vif)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'd.cfg'}:4: vif:"), msg
    assert what in msg


def test_unsupported_options_are_warnings(tmp_path: Path) -> None:
    _, warns = cfg(tmp_path, "vif = [ 'model=e1000,rate=10Mb/s' ]")
    assert any("'model'" in w for w in warns) and not any("'rate'" in w for w in warns)
    # script= is run (docs/netback.md): one that is not installed is an error naming it
    # (vif-route and vif-nat, when not installed, are pyxen's own modes: tests/unit/test_vif_modes.py)
    with pytest.raises(ConfigError, match=r"script 'vif-openvswitch': no such file "
                       r"\(/etc/xen/scripts/vif-openvswitch\)"):
        cfg(tmp_path, "vif = [ 'script=vif-openvswitch' ]")


@pytest.mark.parametrize("rate,want", [
    ("10Mb/s", (62500, 50000)), ("10Mb/s@20ms", (25000, 20000)), ("1MB/s@1s", (10**6, 10**6)),
    ("100KB/s@500us", (50, 500)), ("8b/s@2", (2, 2 * 10**6)),
    ("010Mb/s", (50000, 50000)),  # octal, as strtoull's base 0
    ("1Gb/s@1us", (125, 1))])
def test_rate_as_libxlu(rate: str, want: tuple[int, int]) -> None:
    assert parse_vif_rate(rate) == want


@pytest.mark.parametrize("rate,what", [
    ("", "no rate specified"), ("@20ms", "no rate specified"), ("10Mb", "invalid rate"),
    ("10mb/s", "invalid rate"), ("0Mb/s", "rate overflow"), ("5000000000b/s", "rate overflow"),
    ("10Mb/s@", "invalid replenishment interval"), ("10Mb/s@0ms", "replenishment interval overflow"),
    ("10Mb/s@5000s", "replenishment interval overflow"), ("10Mb/s@20xs", "invalid replenishment")])
def test_bad_rates(rate: str, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        parse_vif_rate(rate)


def test_rate_reaches_the_backend_node() -> None:
    xsd = Xenstored()
    xsd.write("/local/domain/3", "")
    write_vif(xsd, 3, {"devid": 1, "mac": "00:16:3e:01:02:03", "bridge": "xenbr0", "rate": "1Mb/s@20ms"})
    assert xsd.read("/local/domain/0/backend/vif/3/1/rate") == b"2500,20000"


@pytest.mark.parametrize("bad", [
    {"spec": "", "devid": 0, "mac": "nonsense", "bridge": "xenbr0"},
    {"spec": "", "devid": 0, "mac": "00:16:3e:00:00:01", "bridge": "x/y"},
    {"spec": "mac=00:16:3e:00:00:02", "devid": 0, "mac": "00:16:3e:00:00:01", "bridge": "xenbr0"},
    {"spec": "", "devid": -1, "mac": "00:16:3e:00:00:01", "bridge": "xenbr0"},
    {"spec": "", "devid": 0, "mac": "00:16:3e:00:00:01", "bridge": "xenbr0", "evil": 1},
])
def test_daemon_refuses_bad_vifs(bad: dict[str, object]) -> None:
    with pytest.raises(validate.RequestError):
        validate.vif(bad)


def test_xenstore_nodes_as_libxl() -> None:
    xsd = Xenstored()
    xsd.write("/local/domain/7", "")
    write_vif(xsd, 7, {"devid": 0, "mac": "00:16:3e:01:02:03", "bridge": "xenbr0", "ip": "10.0.0.2"})
    be, fe = "/local/domain/0/backend/vif/7/0", "/local/domain/7/device/vif/0"
    want_be = {"frontend": fe, "frontend-id": "7", "online": "1", "state": "1", "handle": "0",
               "mac": "00:16:3e:01:02:03", "bridge": "xenbr0", "ip": "10.0.0.2"}
    for k, v in want_be.items():
        assert xsd.read(f"{be}/{k}") == v.encode(), k
    for k, v in {"backend": be, "backend-id": "0", "state": "1", "handle": "0",
                 "mac": "00:16:3e:01:02:03"}.items():
        assert xsd.read(f"{fe}/{k}") == v.encode(), k
