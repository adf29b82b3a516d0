"""Issue 3 end to end through pyxend: two guests ping-pong over an
inter-domain event channel and a granted page, a guest reads and watches
keys written by xenstore-write from the host, and a guest that floods
xenstore past its quota gets Xen's error while everyone else is served."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, read_until

needs_utils = pytest.mark.skipif(shutil.which("xenstore-write") is None,
                                 reason="SKIPPED LOUDLY: xenstore-utils is not installed")


def test_pingpong_between_two_domain_processes(host) -> None:  # noqa: ANN001
    a = host.create(ROOT / "examples/pingpong-a.cfg", ['extra="role=a rounds=300"'])
    sa = host.console_socket(a)
    b = host.create(ROOT / "examples/pingpong-b.cfg", [f'extra="role=b peer={a} rounds=300"'])
    sb = host.console_socket(b)
    out_b = read_until(sb, rb"pingpong: done rounds=300 rtt_ns=\d+", timeout=20)
    out_a = read_until(sa, rb"pingpong: done rounds=300", timeout=20)
    assert b"FAIL" not in out_a + out_b
    assert re.search(rb"pingpong: role=b peer=%d connected port=\d+ gref=\d+" % a, out_b), out_b
    for s in (sa, sb):
        s.close()


@needs_utils
def test_guest_reads_and_watches_host_writes(host) -> None:  # noqa: ANN001
    d = host.create(ROOT / "examples/ticker.cfg", ['name="xsdemo"', f'kernel="{ROOT}/guest/build/xsdemo"'])
    s = host.console_socket(d)
    out = read_until(s, rb"xsdemo: ready", timeout=20)
    assert b"xsdemo: name=xsdemo domid=%d" % d in out
    assert b"xsdemo: hello=world OK" in out
    env = dict(os.environ, XENSTORED_PATH=host.info()["xenstore_socket"])
    path = f"/local/domain/{d}/data/xsdemo/cmd"
    assert subprocess.run(["xenstore-read", f"/local/domain/{d}/data/xsdemo/hello"], env=env,
                          capture_output=True, text=True, timeout=10).stdout.strip() == "world"
    for word in ("alpha", "beta"):
        subprocess.run(["xenstore-write", path, word], env=env, check=True, timeout=10)
        read_until(s, rb"xsdemo: cmd=" + word.encode(), timeout=20)
    subprocess.run(["xenstore-write", path, "quit"], env=env, check=True, timeout=10)
    read_until(s, rb"xsdemo: bye", timeout=20)
    s.close()


def test_guest_past_its_quota_gets_enospc_and_others_are_served(host) -> None:  # noqa: ANN001
    xsdemo = f'kernel="{ROOT}/guest/build/xsdemo"'
    flood = host.create(ROOT / "examples/ticker.cfg", ['name="xs-big"', xsdemo, 'extra="big=1"'])
    other = host.create(ROOT / "examples/ticker.cfg", ['name="xs-other"', xsdemo])
    out = read_until(host.console_socket(flood), rb"xsdemo: big OK .*oversize=\S+", timeout=20)
    assert re.search(rb"oversize=(ENOSPC|E2BIG)", out), out
    read_until(host.console_socket(other), rb"xsdemo: ready", timeout=20)
    assert {d["name"] for d in host.list()} >= {"xs-big", "xs-other"}
