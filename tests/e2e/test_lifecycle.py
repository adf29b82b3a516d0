"""End-to-end: domain lifecycle through the daemon (reboot, shutdown, crash,
preserve, name clashes, unknown domains, pause) and `pyxen list`."""

from __future__ import annotations

import re
import time

import pytest

from pyxen.toolstack.api import PyxenError
from tests.conftest import ROOT, cli, read_until, wait_listed

TICKER = ROOT / "examples" / "ticker.cfg"
HELLO = ROOT / "examples" / "hello.cfg"
CRASH = ROOT / "examples" / "crash.cfg"
XL_HEADER = "Name" + " " * 40 + "ID   Mem VCPUs\tState\tTime(s)"  # xl_list.c, verbatim


def by_name(doms: list[dict], name: str) -> list[dict]:
    return [d for d in doms if d["name"] == name]


def read_console(host, dom, pattern: bytes, timeout: float = 10.0) -> bytes:
    s = host.console_socket(dom)
    try:
        return read_until(s, pattern, timeout)
    finally:
        s.close()


def _reboot(host, name: str) -> tuple[dict, dict]:
    """Reboot a ticker; return its list entries before and after the restart."""
    d = host.create(TICKER, [f'name="{name}"'])
    read_console(host, d, rb"^tick 2 ")
    [old] = by_name(host.list(), name)
    host.reboot(d)
    # a restarted domain is a new domain process (new pid), with the same name; it is built
    # paused ("creating", then "paused" until the daemon starts it): wait until it runs
    doms = wait_listed(host, lambda ds: any(x["pid"] != old["pid"]
                                         and x["state"] in ("running", "blocked")
                                         for x in by_name(ds, name)),
                    timeout=15, what=f"a restarted {name}")
    [new] = by_name(doms, name)
    return old, new


def test_reboot_restarts_same_name(host) -> None:
    old, new = _reboot(host, "tick-r")
    assert new["state"] in ("running", "blocked"), new
    read_console(host, new["domid"], rb"^tick 2 ")
    log = host.dmesg()
    assert any("tick-r" in line and "reboot: on_reboot=restart" in line for line in log), log
    assert sum(f"({new['name']})" in line and "created domain" in line for line in log) == 2, log


def test_reboot_gives_new_domid(host) -> None:
    old, new = _reboot(host, "tick-r2")
    assert new["domid"] != old["domid"], (old, new)


def test_shutdown_destroys_ticker(host) -> None:
    d = host.create(TICKER, ['name="tick-s"'])
    read_console(host, d, rb"^tick 1 ")
    host.shutdown(d)
    wait_listed(host, lambda ds: not by_name(ds, "tick-s"), what="tick-s gone")
    assert any("tick-s" in line and "on_poweroff=destroy" in line for line in host.dmesg())


def test_crash_preserved_until_destroyed(host) -> None:
    d = host.create(CRASH)  # on_crash="preserve"
    wait_listed(host, lambda ds: [x["state"] for x in by_name(ds, "crash")] == ["crashed"],
             what="crash in state crashed")
    time.sleep(0.5)
    assert [x["state"] for x in by_name(host.list(), "crash")] == ["crashed"]
    log = "\n".join(host.dmesg())
    assert "domain crashed" in log
    # the hypervisor's dump of the guest's registers at the crash
    assert re.search(rf"\(d{d}\).*rip=[0-9a-f]{{16}}", log), log
    assert re.search(rf"\(d{d}\).*rax=[0-9a-f]{{16}}", log), log
    assert "on_crash=preserve" in log
    # and the guest's own dump is on its console
    out = read_console(host, d, rb"FATAL: crashing domain")
    assert re.search(rb"FATAL: page fault .*cr2=0x0*dead0000", out), out
    host.destroy(d)
    assert not by_name(host.list(), "crash")


def test_guest_console_io_dump_in_dmesg(host) -> None:
    d = host.create(CRASH)
    wait_listed(host, lambda ds: [x["state"] for x in by_name(ds, "crash")] == ["crashed"],
             what="crash in state crashed")
    log = "\n".join(host.dmesg())
    assert re.search(rf"\(d{d}\).*FATAL: page fault", log), log


def test_on_poweroff_preserve_keeps_shutdown_domain(host) -> None:
    d = host.create(HELLO, ['name="hello-keep"', 'on_poweroff="preserve"'])
    wait_listed(host, lambda ds: [x["state"] for x in by_name(ds, "hello-keep")] == ["shutdown"],
             what="hello-keep in state shutdown")
    time.sleep(0.5)
    [rec] = by_name(host.list(), "hello-keep")
    assert rec["state"] == "shutdown" and rec["reason"] == "poweroff" and rec["domid"] == d
    host.destroy("hello-keep")
    assert not by_name(host.list(), "hello-keep")


def test_duplicate_name_refused(host) -> None:
    d = host.create(TICKER, ['name="dup"'])
    with pytest.raises(PyxenError, match=r"dup") as e:
        host.create(TICKER, ['name="dup"'])
    assert "exists" in str(e.value)
    assert [x["domid"] for x in by_name(host.list(), "dup")] == [d]


def test_destroy_unknown_domain(host) -> None:
    with pytest.raises(PyxenError, match=r"no domain 'nosuch'"):
        host.destroy("nosuch")
    with pytest.raises(PyxenError, match=r"4242"):
        host.destroy(4242)
    r = cli(["destroy", "nosuch"], host.run_dir, timeout=30)
    assert r.returncode == 1
    assert b"nosuch" in r.stderr and b"Traceback" not in r.stderr, r.stderr


def test_pause_unpause_in_list(host) -> None:
    d = host.create(TICKER, ['name="tick-p"'])
    host.pause(d)
    wait_listed(host, lambda ds: [x["state"] for x in by_name(ds, "tick-p")] == ["paused"],
             what="tick-p paused")
    r = cli(["list"], host.run_dir, timeout=30)
    assert re.search(rb"^tick-p .*--p---", r.stdout, re.M), r.stdout
    host.unpause(d)
    wait_listed(host, lambda ds: [x["state"] for x in by_name(ds, "tick-p")] in (["running"], ["blocked"]),
             what="tick-p unpaused")
    read_console(host, d, rb"^tick 3 ")


def test_cli_list_rows(host) -> None:
    a = host.create(TICKER, ['name="tick-l"'])
    b = host.create(HELLO, ['name="hello-l"', 'on_poweroff="preserve"'])
    wait_listed(host, lambda ds: [x["state"] for x in by_name(ds, "hello-l")] == ["shutdown"],
             what="hello-l shut down")
    r = cli(["list"], host.run_dir, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert re.match(r"^Name\s+ID\s+Mem\s+VCPUs\s+State\s+Time\(s\)$", lines[0]), lines
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert set(rows) == {"Domain-0", "tick-l", "hello-l"}, lines
    assert rows["Domain-0"][1] == "0"
    assert rows["tick-l"][1:4] == [str(a), "16", "1"] and rows["tick-l"][4] in ("r-----", "-b----")
    assert rows["hello-l"][1:5] == [str(b), "16", "1", "---s--"]


def test_cli_list_header_is_xl(host) -> None:
    r = cli(["list"], host.run_dir, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines()[0] == XL_HEADER
