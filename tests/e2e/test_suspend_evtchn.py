"""End-to-end: Xen's suspend event channel (docs/misc/xenstore-paths.pandoc,
``~/device/suspend/event-channel``; libxl_dom_suspend.c).  Our guest
allocates a port unbound for dom0 and writes its number there; `pyxen save`
and `pyxen migrate` bind to it and ask for the suspend by signalling it
instead of writing control/shutdown = "suspend" (which stays the way for a
guest that advertises nothing: Linux, or ours with ``suspend-evtchn=0``).
A restored or migrated guest advertises a new port in its new domain; a
port that cannot be bound fails the save (the guest runs on); a suspend
that comes after the request timed out is cancelled at once."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyxen.toolstack.api import PyxenError
from pyxen.xenstore.client import XsClient
from tests.conftest import ROOT, read_until
from tests.e2e.hosts import TwoHosts

TICKER = ROOT / "examples" / "ticker.cfg"
NODE = "device/suspend/event-channel"
VIA_EVTCHN = "suspend asked through the guest's suspend event channel"
VIA_XS = "suspend asked through control/shutdown"
ADVERTISED = re.compile(rb"suspend event channel (\d+)\n")


def console_text(host, dom, pattern: bytes, timeout: float = 10.0) -> str:  # noqa: ANN001
    s = host.console_socket(dom)
    try:
        return read_until(s, pattern, timeout).decode(errors="replace")
    finally:
        s.close()


def node(run_dir: Path, domid: int) -> str | None:
    xs = XsClient(str(run_dir / "xenstored.sock"))
    try:
        return xs.try_read(f"/local/domain/{domid}/{NODE}")
    finally:
        xs.close()


def advertised(host, dom, after: bytes = b"") -> int:  # noqa: ANN001
    """The port the guest's console says it advertised (the last one after ``after``)."""
    text = console_text(host, dom, after + rb"[\s\S]*?suspend event channel \d+\n").encode()
    return int(ADVERTISED.findall(text)[-1])


def dmesg_count(host, what: str) -> int:  # noqa: ANN001
    return sum(what in line for line in host.dmesg())


def test_save_and_restore_use_the_suspend_event_channel(host, tmp_path: Path) -> None:  # noqa: ANN001
    """The node holds the guest's port; two checkpoints in a row go through
    it (the channel is released after each, bound again by the next); the
    saved domain, restored, advertises a port in its new domain and its own
    checkpoint goes through that one."""
    d = host.create(TICKER, ['name="se-tick"', 'extra="period_ms=50"'])
    port = advertised(host, d)
    assert node(host.run_dir, d) == str(port)
    for n in (1, 2):
        host.save(d, tmp_path / f"ck{n}.save", checkpoint=True)
        assert dmesg_count(host, VIA_EVTCHN) == n
    console_text(host, d, rb"suspend cancelled[\s\S]*?suspend cancelled[\s\S]*?^tick \d+ ")
    assert dmesg_count(host, VIA_XS) == 0
    f = tmp_path / "se.save"
    host.save(d, f)
    assert dmesg_count(host, VIA_EVTCHN) == 3
    info = host.restore(f)
    d2 = info["domid"]
    port2 = advertised(host, d2, rb"resumed in a restored domain")
    assert node(host.run_dir, d2) == str(port2)
    host.save(d2, tmp_path / "ck3.save", checkpoint=True)
    assert dmesg_count(host, VIA_EVTCHN) == 4
    console_text(host, d2, rb"suspend cancelled[\s\S]*?^tick \d+ ")
    host.destroy(d2)


def test_xenstore_way_when_nothing_is_advertised(host, tmp_path: Path) -> None:  # noqa: ANN001
    """suspend-evtchn=0: the node stays empty (as libxl makes it) and the
    save asks through control/shutdown, as for Linux."""
    d = host.create(TICKER, ['name="se-xs"', 'extra="period_ms=50 suspend-evtchn=0"'])
    console_text(host, d, rb"xenbus: store ready[\s\S]*?^tick 3 ")
    assert node(host.run_dir, d) == ""
    host.save(d, tmp_path / "ck.save", checkpoint=True)
    assert dmesg_count(host, VIA_XS) == 1 and dmesg_count(host, VIA_EVTCHN) == 0
    text = console_text(host, d, rb"suspend cancelled[\s\S]*?^tick \d+ ")
    assert "suspend event channel" not in text
    host.destroy(d)


@pytest.mark.parametrize("value", ["999", "abc", " 0x"])
def test_a_port_that_cannot_be_bound_fails_the_save(host, tmp_path: Path, value: str) -> None:  # noqa: ANN001
    """A node naming a port that is not waiting for dom0 (atoi: "abc" is
    port 0): the save fails as libxl's ("suspend event channel
    initialization failed"), no file, the guest runs on; with its real port
    written back, the save works."""
    d = host.create(TICKER, ['name="se-bad"', 'extra="period_ms=50"'])
    port = advertised(host, d)
    xs = XsClient(str(host.run_dir / "xenstored.sock"))
    try:
        xs.write(f"/local/domain/{d}/{NODE}", value)
        f = tmp_path / "bad.save"
        with pytest.raises(PyxenError, match="suspend event channel initialization failed"):
            host.save(d, f)
        assert not f.exists()
        console_text(host, d, rb"^tick \d+ [\s\S]*?^tick \d+ ")
        [dom] = [x for x in host.list() if x["name"] == "se-bad"]
        assert dom["state"] in ("running", "blocked")
        xs.write(f"/local/domain/{d}/{NODE}", str(port))
    finally:
        xs.close()
    host.save(d, tmp_path / "ck.save", checkpoint=True)
    assert dmesg_count(host, VIA_EVTCHN) == 1
    host.destroy(d)


def test_late_suspend_is_cancelled(host, tmp_path: Path) -> None:  # noqa: ANN001
    """Paused, the guest cannot act on the event before the timeout: the save
    fails and the guest, which suspends once unpaused (an event cannot be
    withdrawn), is resumed at once (its suspend returns 1) and runs on; the
    next save binds the channel again."""
    d = host.create(TICKER, ['name="se-late"', 'extra="period_ms=50"'])
    advertised(host, d)
    host.pause(d)
    f = tmp_path / "late.save"
    with pytest.raises(PyxenError, match="did not suspend within"):
        host.save(d, f, timeout=0.5)
    assert not f.exists()
    host.unpause(d)
    console_text(host, d, rb"suspend cancelled, running on \(suspend returned 1\)[\s\S]*?^tick \d+ ")
    end = time.monotonic() + 10
    while not any(x["name"] == "se-late" and x["state"] in ("running", "blocked") for x in host.list()):
        assert time.monotonic() < end
        time.sleep(0.05)
    # the late suspend told xenstored the domain shut down; running again, its
    # next suspend must fire @releaseDomain again (xenstored fires it once per
    # shutdown): the checkpoint's does
    import threading
    fired = threading.Event()
    xs = XsClient(str(host.run_dir / "xenstored.sock"))
    try:
        xs.watch("@releaseDomain", "late", lambda path, token: fired.set())
        time.sleep(0.5)  # a new watch fires once: let it
        fired.clear()
        host.save(d, tmp_path / "ck.save", checkpoint=True)
        assert fired.wait(5), "the checkpoint's suspend did not fire @releaseDomain"
    finally:
        xs.close()
    assert dmesg_count(host, VIA_EVTCHN) == 1
    console_text(host, d, rb"suspend cancelled[\s\S]*?suspend cancelled[\s\S]*?^tick \d+ ")
    host.destroy(d)


def test_migration_uses_the_suspend_event_channel(two: TwoHosts) -> None:
    """There and back: each source asks through the channel the guest
    advertised in that host's domain."""
    dom = two.a.create(TICKER)
    advertised(two.a, dom)
    hosts = (two.a, two.b)
    for src, dst in ((0, 1), (1, 0)):
        port = 7400 + (time.monotonic_ns() // 1000) % 500
        rx = two.run_in(dst, [sys.executable, "-m", "pyxen", "migrate-receive", "--listen",
                              f"{two.ips[dst]}:{port}"], stderr=subprocess.PIPE)
        assert rx.stderr is not None and b"listening" in rx.stderr.readline()
        r = subprocess.run([sys.executable, "-m", "pyxen", "migrate", "--tcp", f"{two.ips[dst]}:{port}",
                            str(dom)], env=dict(two.env, PYXEN_RUN_DIR=str(two.dirs[src])),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert rx.wait(30) == 0
        assert dmesg_count(hosts[src], "migration: " + VIA_EVTCHN) == 1
        [d] = [x for x in hosts[dst].list() if x["name"] == "ticker"]
        dom = d["domid"]
        advertised(hosts[dst], dom, rb"resumed in a restored domain")
    hosts[0].destroy(dom)
