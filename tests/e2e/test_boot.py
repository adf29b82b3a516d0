"""End-to-end: real guests under real KVM, checked by what they print."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli, wait_listed


def test_hello_prints_and_powers_off(run_guest) -> None:
    r = run_guest("hello")
    r.wait_for(r"^Hello from pyxen guest!$")
    assert r.wait_stopped() == "shutdown"
    assert r.domain.info()["shutdown_reason"] == "poweroff"
    assert "pyxen-guest: booting" in r.output


def test_crash_app_reports_registers(run_guest) -> None:
    r = run_guest("crash")
    assert r.wait_stopped() == "crashed"
    assert "crash: about to fault" in r.output
    assert re.search(r"FATAL.*page fault", r.output, re.I)
    assert "0xdead0000" in r.output.lower() or "dead0000" in r.output.lower()
    assert "rip=" in r.domain.crash_info


def test_mmtest_isolation(run_guest) -> None:
    r = run_guest("mmtest")
    r.wait_for("mmtest: done")
    out = r.output
    rc = int(re.search(r"mmtest: foreign map rc=(-?\d+)", out).group(1))
    assert rc in (-1, -22), out  # -EPERM / -EINVAL
    rc = int(re.search(r"mmtest: writable pt rc=(-?\d+)", out).group(1))
    assert rc < 0, out
    assert re.search(r"mmtest: unmapped read faulted cr2=\S+ OK", out), out
    assert "mmtest: remap value OK" in out
    # L1 updates whose re-application pyxen leaves for later (one-vCPU domains):
    # never past a type change, and a #PF they cause never reaches the guest
    assert "mmtest: stale writable after pin OK" in out, out
    assert "mmtest: rw upgrade without flush OK" in out, out
    assert r.wait_stopped() == "shutdown"


#: How far outside the host's bracket a guest sample may lie: the guest
#: extrapolates with its TSC between updates (scale rounding, TSC/host clock
#: pairing), which is good to a few microseconds; a guest clock that is offset
#: or drifts by more than this fails.
TIME_SLACK_NS = 200_000


def test_guest_time_monotonic_and_close_to_host(run_guest) -> None:
    """Guest system time is monotonic and agrees with the host's clock.

    timetest (``mark=1``) sends "timetest: mark" through console_io, reads
    its system time, then sends that reading through console_io.  The
    hypervisor timestamps each console_io call with the host clock as it
    arrives, so the mark's timestamp was taken before the guest's reading
    and the sample line's after it: the reading must lie between the two
    (plus TIME_SLACK_NS).  How long the host takes to answer (a loaded
    machine can take milliseconds) widens the bracket but cannot make a
    correct clock fail; an offset or a drift of the guest's clock shows in
    every sample whose bracket is narrower than it.  (The old check, the
    reading against the sample line's arrival alone, counted the host's
    latency as clock error and failed under load: 2.25 ms against 1 ms.)"""
    from pyxen.hv.domain import Domain
    records: list[tuple[int, bytes]] = []
    orig = Domain.console_io_write

    def hooked(self: Domain, data: bytes) -> None:
        records.append((self.clock.system_time(), data))
        orig(self, data)

    Domain.console_io_write = hooked  # type: ignore[method-assign]
    try:
        r = run_guest("timetest", "secs=2 mark=1")
        r.wait_for("timetest: done", timeout=30)
    finally:
        Domain.console_io_write = orig  # type: ignore[method-assign]
    samples: list[tuple[int, int, int]] = []  # (host before, guest, host after)
    before: int | None = None
    for host_ns, data in records:
        if data == b"timetest: mark\n":
            before = host_ns
            continue
        m = re.search(rb"timetest: sys=(\d+)", data)
        if m and before is not None:
            samples.append((before, int(m.group(1)), host_ns))
            before = None
    assert len(samples) >= 15, r.output
    guest = [g for _, g, _ in samples]
    assert guest == sorted(guest), "guest system time went backwards"
    assert "non-monotonic" not in r.output
    assert guest[-1] - guest[0] >= 1_500_000_000  # the samples span the 2 s
    outside = [(lo, g, hi) for lo, g, hi in samples
               if not lo - TIME_SLACK_NS <= g <= hi + TIME_SLACK_NS]
    assert not outside, ("guest time outside the host's readings before and after it "
                         f"(host before, guest, host after): {outside}")


def _ticks(chunks: list[tuple[float, bytes]]) -> list[tuple[float, int]]:
    out = []
    buf = b""
    for t, c in chunks:
        buf += c
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            m = re.match(rb"tick (\d+)", line)
            if m:
                out.append((t, int(m.group(1))))
    return out


def test_ticker_rate(run_guest) -> None:
    r = run_guest("ticker")
    r.wait_for(r"^tick 1 ")
    time.sleep(2.05)
    ticks = [t for t in _ticks(r.chunks)]
    first = ticks[0][0]
    n = len([t for t, _ in ticks if t - first <= 2.0])
    assert 16 <= n <= 24, f"{n} ticks in 2 s: {ticks}"


def test_ticker_stops_while_paused(run_guest) -> None:
    r = run_guest("ticker")
    r.wait_for(r"^tick 3 ")
    r.domain.pause()
    time.sleep(0.15)
    before = len(_ticks(r.chunks))
    time.sleep(0.8)
    assert len(_ticks(r.chunks)) == before, "ticked while paused"
    assert r.domain.state == "paused"
    r.domain.unpause()
    time.sleep(0.5)
    assert len(_ticks(r.chunks)) >= before + 3


def test_examples_parse() -> None:
    from pyxen.toolstack.xlcfg import load_domain_config
    for cfg in sorted((ROOT / "examples").glob("*.cfg")):
        if cfg.stem in ("linux", "linux-net", "pvgrub", "debian"):  # unmodified guests: parsed in
            continue  # test_unmodified_guests.py and test_netback.py once fetched (docs/guests.md)
        c, warnings = load_domain_config(cfg)
        assert (ROOT / "guest" / "apps" / f"{c.kernel.name}.c").exists(), c.kernel
        assert not warnings, warnings


def test_cli_create_console_hello(guest: Path, tmp_path: Path) -> None:
    rd = Path(f"/tmp/pyxen-cli-{time.monotonic_ns()}")
    try:
        r = cli(["create", "-c", "examples/hello.cfg"], rd)
        assert r.returncode == 0, r.stderr.decode()
        assert b"Hello from pyxen guest!" in r.stdout
        r = cli(["list"], rd)
        assert b"hello" not in r.stdout  # destroyed on poweroff
        r = cli(["dmesg"], rd)
        assert b"poweroff" in r.stdout
    finally:
        cli(["daemon", "stop"], rd)
        shutil.rmtree(rd, ignore_errors=True)


def test_cli_reports_bad_kernel_and_config(guest: Path, tmp_path: Path) -> None:
    rd = Path(f"/tmp/pyxen-cli-{time.monotonic_ns()}")
    notelf = tmp_path / "notelf"
    notelf.write_text("hello\n")
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(f'name = "bad"\nkernel = "{notelf}"\nmemory = 16\n')
    try:
        r = cli(["create", str(cfg)], rd)
        assert r.returncode == 1
        err = r.stderr.decode()
        assert "notelf" in err and "ELF" in err and "Traceback" not in err
        cfg.write_text('name = "bad"\nkernel = "../guest/build/hello"\nmemory = lots\n')
        r = cli(["create", str(cfg)], rd)
        assert r.returncode == 1
        err = r.stderr.decode()
        assert "bad.cfg:3" in err and "memory" in err and "Traceback" not in err
        cfg.write_text('name = "notxen"\nkernel = "/bin/true"\nmemory = 16\n')
        r = cli(["create", str(cfg)], rd)
        assert r.returncode == 1 and b"/bin/true" in r.stderr and b"Traceback" not in r.stderr, r.stderr
        cfg.write_text(f'name = "small"\nkernel = "{ROOT}/guest/build/hello"\nmemory = 16\n')
        r = cli(["create", str(cfg), "memory=16", "vnc=1", "frobnicate=1"], rd)
        assert r.returncode == 0, r.stderr
        assert b"<command line>:2: key 'vnc'" in r.stderr
        assert b"<command line>:3: unknown key 'frobnicate'" in r.stderr
    finally:
        cli(["daemon", "stop"], rd)
        shutil.rmtree(rd, ignore_errors=True)


@pytest.mark.parametrize("order", ["destroy", "crash"])
def test_two_domains_one_goes_away(host, order: str) -> None:
    """Two domains run at once; destroying or crashing one leaves the other ticking."""
    a = host.create(ROOT / "examples/ticker.cfg", ['name="tick-a"'])
    if order == "destroy":
        b = host.create(ROOT / "examples/ticker.cfg", ['name="tick-b"'])
    else:
        b = host.create(ROOT / "examples/crash.cfg", ['name="crasher"', 'on_crash="destroy"'])
    s = host.console_socket(a)
    s.settimeout(5)
    buf = b""
    while buf.count(b"tick") < 3:
        buf += s.recv(4096)
    if order == "destroy":
        host.destroy(b)
    else:
        deadline = time.monotonic() + 10
        while any(d["domid"] == b for d in host.list()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("crashed" in line for line in host.dmesg()), host.dmesg()
    assert [d["domid"] for d in host.list()] == [a]
    n0 = buf.count(b"tick")
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        buf += s.recv(4096)
    assert buf.count(b"tick") >= n0 + 7
    s.close()


def test_adopted_domain_keeps_its_xenstore(host) -> None:
    """After kill -9 of pyxend, the new daemon's xenstored restores the tree and
    the guest's watches from its state file, and the adopted domain process
    relays the guest's xenstore ring again: a shutdown through xenstore works."""
    import os
    import signal

    from pyxen.toolstack.api import Host
    a = host.create(ROOT / "examples/ticker.cfg", ['name="xs-survivor"'])
    time.sleep(1.5)  # the guest's control/shutdown watch is registered and saved
    os.kill(host.info()["daemon_pid"], signal.SIGKILL)
    time.sleep(0.3)
    h2 = Host(run_dir=host.run_dir)
    try:
        wait_listed(h2, lambda ds: any(d["name"] == "xs-survivor" for d in ds), what="adoption")
        time.sleep(0.5)  # the reconnect request reaches the domain process
        assert h2.shutdown(a, timeout=20) == "xenstore", h2.dmesg()
        wait_listed(h2, lambda ds: not any(d["name"] == "xs-survivor" for d in ds), 20, "power-off")
        assert "forcing" not in "\n".join(h2.dmesg())
    finally:
        h2.quit()
        h2.close()


def test_domains_survive_a_daemon_crash(host) -> None:
    """kill -9 of pyxend: the domain keeps running and a new daemon adopts it."""
    import os
    import signal

    from pyxen.toolstack.api import Host
    a = host.create(ROOT / "examples/ticker.cfg", ['name="survivor"'])
    os.kill(host.info()["daemon_pid"], signal.SIGKILL)
    time.sleep(0.3)
    h2 = Host(run_dir=host.run_dir)
    try:
        wait_listed(h2, lambda ds: any(d["name"] == "survivor" for d in ds), what="adoption")
        (d,) = h2.list()
        assert d["domid"] == a
        assert any("adopted domain" in line for line in h2.dmesg())
        s = h2.console_socket(a)
        s.settimeout(5)
        buf = b""
        while buf.count(b"tick") < 3:
            buf += s.recv(4096)
        s.close()
        # a new domain does not take the survivor's ID
        b = h2.create(ROOT / "examples/ticker.cfg", ['name="newcomer"'])
        assert b != a
    finally:
        h2.quit()
        h2.close()
