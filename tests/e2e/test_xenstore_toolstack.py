"""XenStore as the toolstack uses it: the standard layout seen by Debian's
xenstore-utils, and pyxen shutdown through control/shutdown with xl's
fallback to the hypercall."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import ROOT, cli

needs_utils = pytest.mark.skipif(shutil.which("xenstore-ls") is None,
                                 reason="SKIPPED LOUDLY: xenstore-utils is not installed "
                                        "(apt-get install xenstore-utils)")


def _gone(host, name: str, timeout: float) -> bool:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(d["name"] == name for d in host.list()):
            return True
        time.sleep(0.05)
    return False


@needs_utils
def test_layout_visible_to_xenstore_utils(host) -> None:  # noqa: ANN001
    d = host.create(ROOT / "examples/ticker.cfg", ['name="xs-layout"'])
    r = cli(["info"], host.run_dir)
    sock = next(line.split(": ", 1)[1] for line in r.stdout.decode().splitlines()
                if line.startswith("xenstore_socket: "))
    env = dict(os.environ, XENSTORED_PATH=sock)
    out = subprocess.run(["xenstore-ls", f"/local/domain/{d}"], env=env, capture_output=True,
                         text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert 'name = "xs-layout"' in out.stdout
    assert f'domid = "{d}"' in out.stdout
    assert 'target = "16384"' in out.stdout
    vm = subprocess.run(["xenstore-read", f"/local/domain/{d}/vm"], env=env, capture_output=True,
                        text=True, timeout=10).stdout.strip()
    assert subprocess.run(["xenstore-read", f"{vm}/name"], env=env, capture_output=True, text=True,
                          timeout=10).stdout.strip() == "xs-layout"
    # the guest itself wrote its control features through its ring
    deadline = time.monotonic() + 5
    while subprocess.run(["xenstore-read", f"/local/domain/{d}/control/feature-poweroff"], env=env,
                         capture_output=True, text=True, timeout=10).stdout.strip() != "1":
        assert time.monotonic() < deadline, "the guest never wrote control/feature-poweroff"
        time.sleep(0.1)
    host.destroy(d)
    gone = subprocess.run(["xenstore-ls", f"/local/domain/{d}"], env=env, capture_output=True,
                          text=True, timeout=10)
    assert gone.returncode != 0  # released with the domain


def test_shutdown_through_xenstore(host) -> None:  # noqa: ANN001
    d = host.create(ROOT / "examples/ticker.cfg", ['name="xs-off"'])
    time.sleep(0.5)  # let the guest register its control/shutdown watch
    assert host.shutdown(d, timeout=30) == "xenstore"
    assert _gone(host, "xs-off", 20), "the guest did not power off through xenstore"
    log = "\n".join(host.dmesg())
    assert "asked to poweroff through xenstore" in log
    assert "forcing" not in log


@needs_utils
def test_shutdown_without_pv_control_or_reaction_uses_the_hypercall(host) -> None:  # noqa: ANN001
    """spin never gets to run its xenstore code (it loops with events masked):
    without control/feature-poweroff the toolstack goes straight to the
    hypervisor; with the feature advertised but no reaction, it falls back
    after the timeout, as xl does."""
    spin = [f'kernel="{ROOT}/guest/build/spin"']
    host.create(ROOT / "examples/ticker.cfg", ['name="xs-spin1"', *spin])
    assert host.shutdown("xs-spin1", timeout=1.0) == "hypercall"
    assert _gone(host, "xs-spin1", 5)
    d = host.create(ROOT / "examples/ticker.cfg", ['name="xs-spin2"', *spin])
    sock = host.info()["xenstore_socket"]
    subprocess.run(["xenstore-write", f"/local/domain/{d}/control/feature-poweroff", "1"],
                   env=dict(os.environ, XENSTORED_PATH=sock), check=True, timeout=10)
    t0 = time.monotonic()
    assert host.shutdown("xs-spin2", timeout=1.0) == "xenstore"
    assert _gone(host, "xs-spin2", 6)
    assert time.monotonic() - t0 >= 0.9
    assert any("ignored control/shutdown" in line for line in host.dmesg())
