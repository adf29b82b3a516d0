"""The pyxen command line as a newcomer types it (issue 8's rough edges).

* ``pyxen create examples/blkverify.cfg -c 'disk=[...]'`` was refused with
  "unrecognized arguments": xl (GNU getopt) takes options and KEY=VALUE in
  any order, and so must every pyxen command;
* ``pyxen daemon status`` started a daemon instead of saying "not running";
* a run dir the user may not use is one line and exit status 1.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from pyxen.toolstack import cli as pyxen_cli
from tests.conftest import cli, wait_listed


@pytest.mark.parametrize("argv,want", [
    (["create", "examples/hello.cfg", "-c", "name=\"x\""],
     {"config": "examples/hello.cfg", "console": True, "overrides": ['name="x"']}),
    (["create", "a=1", "-p", "cfg", "-q", "b=2"],  # xl: the first non-option is the config
     {"config": "a=1", "paused": True, "quiet": True, "overrides": ["cfg", "b=2"]}),
    (["create", "-c", "cfg", "k=v", "-p"],
     {"config": "cfg", "console": True, "paused": True, "overrides": ["k=v"]}),
    (["destroy", "dom", "-w"], {"domain": "dom", "wait": True}),
    (["shutdown", "-w", "dom"], {"domain": "dom", "wait": True}),
    (["reboot", "dom", "-w"], {"domain": "dom", "wait": True}),
    (["dmesg", "-c"], {"clear": True}),
    (["block-attach", "dom", "format=raw,vdev=xvdb,target=/tmp/x"],
     {"domain": "dom", "disk": ["format=raw,vdev=xvdb,target=/tmp/x"]}),
    (["console", "--", "-odd"], {"domain": "-odd"}),
])
def test_options_anywhere(argv: list[str], want: dict[str, object]) -> None:
    """Every command parses options before, between and after its positional
    arguments (parse_intermixed_args, one parser per command)."""
    a = pyxen_cli.parse(argv)
    assert not isinstance(a, int), argv
    for k, v in want.items():
        assert getattr(a, k) == v, (argv, k, getattr(a, k))


def test_every_command_has_a_parser() -> None:
    for name, p in pyxen_cli.commands().items():
        assert p.prog == f"pyxen {name}"


def test_create_with_options_after_the_config_file(guest: Path) -> None:
    """The README's line with -c and KEY=VALUE after the file: it runs the guest."""
    rd = Path(f"/tmp/pyxen-cli-{os.getpid()}-{time.monotonic_ns()}")
    try:
        r = cli(["create", "examples/hello.cfg", "-c", 'name="hello-after"'], rd)
        assert r.returncode == 0, r.stderr.decode()
        assert b"Hello from pyxen guest!" in r.stdout
        r = cli(["create", "examples/ticker.cfg", 'name="tick-after"', "-p", "-q"], rd)
        assert r.returncode == 0, r.stderr.decode()
        r = cli(["list"], rd)
        assert b"tick-after" in r.stdout and b"--p---" in r.stdout, r.stdout
        r = cli(["destroy", "tick-after", "-w"], rd)
        assert r.returncode == 0, r.stderr.decode()
        assert b"tick-after" not in cli(["list"], rd).stdout
    finally:
        cli(["daemon", "stop"], rd)
        shutil.rmtree(rd, ignore_errors=True)


def test_daemon_status_starts_nothing(tmp_path: Path) -> None:
    """`daemon status` with no daemon says "not running", exits 1, and neither
    creates the run dir nor starts a daemon in an existing one."""
    missing = tmp_path / "nothere"
    r = cli(["daemon", "status"], missing)
    assert r.returncode == 1 and b"not running" in r.stdout, r
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    r = cli(["daemon", "status"], empty)
    assert r.returncode == 1 and b"not running" in r.stdout, r
    assert list(empty.iterdir()) == []
    r = cli(["daemon", "stop"], empty)
    assert r.returncode == 1 and b"not running" in r.stderr and b"Traceback" not in r.stderr
    assert list(empty.iterdir()) == []


def test_daemon_status_when_running(host: object) -> None:
    r = cli(["daemon", "status"], host.run_dir)  # type: ignore[attr-defined]
    assert r.returncode == 0 and b"pyxend running" in r.stdout, r


def test_unusable_run_dir_is_one_line(tmp_path: Path) -> None:
    """A run dir others may enter, or a symlink: one line naming it, exit 1."""
    opened = tmp_path / "opened"
    opened.mkdir()
    os.chmod(opened, 0o755)
    link = tmp_path / "link"
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link.symlink_to(real)
    for rd, why in ((opened, "mode 0755"), (link, "symlink")):
        r = cli(["list"], rd)
        err = r.stderr.decode()
        assert r.returncode == 1 and len(err.splitlines()) == 1, err
        assert err.startswith(f"pyxen: run dir {rd}") and why in err, err
        assert list(rd.iterdir()) == []


def test_bad_name_from_the_api_is_one_line(host: object) -> None:
    """The daemon's own check of a raw request's name, as the CLI user sees it."""
    from pyxen.toolstack.api import PyxenError
    with pytest.raises(PyxenError, match=r"^name 'a/b': a domain name must not contain '/'$"):
        host.create_request({"op": "create", "spec": {"name": "a/b"}})  # type: ignore[attr-defined]
    wait_listed(host, lambda ds: ds == [], what="no domain")
