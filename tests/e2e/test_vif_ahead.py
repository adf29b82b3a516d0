"""The vif's host end made ahead (issue 11: out of a live migration's
downtime): ``netback.make_tap`` leaves the TAP on its bridge but down (a
disabled port: the bridge forwards nothing to or from it), ``link_up``
brings it up (one ioctl pair, the port forwards), a ``script=`` vif gets
only its TAP and MAC (its hotplug script does the rest when it runs).

Each case runs in a fresh network namespace (``ip netns``), in a child
process, so nothing touches the host's links.  Needs root and /dev/net/tun;
no KVM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT

CHILD = r"""
import json, sys
from pyxen.backends import netback as nb
fd = nb.make_tap(7, 0, "brx0")
fd2 = nb.make_tap(7, 1, "brx0", script="/bin/true")
def link(name):
    out = __import__("subprocess").run(["ip", "-j", "-d", "link", "show", name], capture_output=True,
                                       text=True, check=True).stdout
    return json.loads(out)[0]
before, scripted = link("vif7.0"), link("vif7.1")
nb.link_up("vif7.0")
nb.link_up("vif7.0")  # already up: nothing to do
after = link("vif7.0")
try:
    nb.link_up("novif")
    missing = ""
except nb.NetError as e:
    missing = str(e)
print(json.dumps({"before": before, "after": after, "scripted": scripted, "bridge": link("brx0"),
                  "missing": missing}))
"""


@pytest.fixture
def ns() -> Iterator[str]:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("SKIPPED LOUDLY: needs root and /dev/net/tun")
    name = f"pxva{os.getpid() % 10000}{time.monotonic_ns() % 1000}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("SKIPPED LOUDLY: cannot make a network namespace")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_tap_made_ahead_is_a_disabled_port_until_link_up(ns: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CHILD], capture_output=True,
                       text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    before, after, scripted = r["before"], r["after"], r["scripted"]
    # made ahead: the host MAC, a port of the bridge, down, so disabled in the bridge
    assert before["address"] == "fe:ff:ff:ff:ff:ff"
    assert before.get("master") == "brx0"
    assert "UP" not in before["flags"]
    assert before["linkinfo"]["info_slave_kind"] == "bridge"
    assert before["linkinfo"]["info_slave_data"]["state"] == "disabled"
    # the bridge was made and brought up
    assert "UP" in r["bridge"]["flags"]
    # at commitment: up, and the port forwards at once (no STP)
    assert "UP" in after["flags"]
    assert after["linkinfo"]["info_slave_data"]["state"] == "forwarding"
    # script=: the MAC only; the hotplug script attaches it, as vif-bridge does
    assert scripted["address"] == "fe:ff:ff:ff:ff:ff"
    assert "master" not in scripted and "UP" not in scripted["flags"]
    assert "novif" in r["missing"] and "No such device" in r["missing"]
