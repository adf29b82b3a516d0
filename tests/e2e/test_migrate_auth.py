"""End-to-end: a plain-TCP migration with a pre-shared key (``--key``,
pyxen/migration/auth.py).  A sender with the wrong key or none is refused
before anything of the domain moves, the source keeps running and the
listener keeps waiting for the real sender; a keyed sender refuses a
receiver that does not authenticate."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT
from tests.e2e.hosts import TwoHosts

TICKER = ROOT / "examples" / "ticker.cfg"
_port = iter(range(9400 + (time.monotonic_ns() // 1000) % 500, 65000))


def key_file(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    p.chmod(0o600)
    return p


def migrate(two: TwoHosts, dom: int, port: int, key: Path | None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pyxen", "migrate", "--tcp", f"{two.ips[1]}:{port}", str(dom)]
    if key is not None:
        argv[4:4] = ["--key", str(key)]
    return subprocess.run(argv, env=dict(two.env, PYXEN_RUN_DIR=str(two.dirs[0])),
                          capture_output=True, text=True, timeout=120)


def keyed_receiver(two: TwoHosts, port: int, key: Path | None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "pyxen", "migrate-receive", "--listen", f"{two.ips[1]}:{port}"]
    if key is not None:
        argv += ["--key", str(key)]
    p = two.run_in(1, argv, stderr=subprocess.PIPE)
    assert p.stderr is not None
    line = p.stderr.readline()
    assert b"listening" in line, line
    return p


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.kill()
        p.wait()


def test_only_the_key_holder_migrates(two: TwoHosts, tmp_path: Path) -> None:
    good = key_file(tmp_path / "good", os.urandom(32))
    bad = key_file(tmp_path / "bad", os.urandom(32))
    dom = two.a.create(TICKER)
    port = next(_port)
    rx = keyed_receiver(two, port, good)
    try:
        r = migrate(two, dom, port, bad)
        assert r.returncode != 0
        assert "refused: authentication failed" in r.stderr, r.stderr
        assert [d["domid"] for d in two.a.list()] == [dom], "the source keeps its domain"
        assert two.b.list() == [], "nothing was built on the destination"
        r = migrate(two, dom, port, None)
        assert r.returncode != 0 and "asks for the migration key" in r.stderr, r.stderr
        assert rx.poll() is None, "an impostor does not end the listener's wait"
        r = migrate(two, dom, port, good)
        assert r.returncode == 0, r.stderr
        assert rx.wait(60) == 0
        assert rx.stderr is not None
        log = rx.stderr.read().decode()
        assert log.count("does not hold the migration key") + log.count("authentication") >= 2, log
        assert two.a.list() == []
        [d] = [d for d in two.b.list() if d["name"] == "ticker"]
        two.b.destroy(d["domid"])
    finally:
        stop(rx)


def test_keyed_sender_refuses_an_unauthenticated_receiver(two: TwoHosts, tmp_path: Path) -> None:
    key = key_file(tmp_path / "k", os.urandom(32))
    dom = two.a.create(TICKER)
    port = next(_port)
    rx = keyed_receiver(two, port, None)
    try:
        r = migrate(two, dom, port, key)
        assert r.returncode != 0 and "does not authenticate" in r.stderr, r.stderr
        assert [d["domid"] for d in two.a.list()] == [dom]
        assert rx.wait(60) != 0, "the receiver got no domain"
        assert two.b.list() == []
    finally:
        stop(rx)
    two.a.destroy(dom)


def test_bad_key_file_is_a_clear_error(tmp_path: Path) -> None:
    k = tmp_path / "open"
    k.write_bytes(os.urandom(32))
    k.chmod(0o644)
    r = subprocess.run([sys.executable, "-m", "pyxen", "migrate-receive", "--listen", "127.0.0.1:1",
                        "--key", str(k)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"migration key {k}: readable or writable by group or others" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
