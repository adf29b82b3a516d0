"""The test initramfs's init hands each module the kernel command line's
``MODULE.PARAM[=VALUE]`` words that name it (what kmod's modprobe does and
busybox's insmod does not): its ``modparams`` shell function, run by the
host's /bin/sh on a command line of our own."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from importlib.machinery import SourceFileLoader
from pathlib import Path

from tests.conftest import ROOT


def _modparams(tmp_path: Path, cmdline: str, module: str) -> list[str]:
    loader = SourceFileLoader("mkinitramfs", str(ROOT / "tools" / "mkinitramfs"))
    spec = importlib.util.spec_from_loader("mkinitramfs", loader)
    assert spec is not None
    mk = importlib.util.module_from_spec(spec)
    loader.exec_module(mk)
    m = re.search(r"^modparams\(\) \{\n.*?^\}\n", mk.INIT, re.S | re.M)
    assert m, "init has no modparams function"
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    fn = m.group(0).replace("/proc/cmdline", str(tmp_path / "cmdline"))
    out = subprocess.run(["/bin/sh", "-c", fn + f'modparams "{module}"'], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path)
    return out.stdout.split()


def test_the_module_gets_its_own_words(tmp_path: Path) -> None:
    line = ("console=hvc0 panic=-1 xen_netfront.max_queues=2 root=/dev/x.y=z "
            "xen-blkfront.max_indirect_segments=64 xen_netfront.flag "
            "xen_netfrontx.no=1 .bad=1 xen_netfront.= xen-netfront.a*b=1")
    (tmp_path / "xen-netfront.aXb=1").touch()  # a glob would match this
    # '-' and '_' alike in the module's name; a flag without a value; globs not expanded
    assert _modparams(tmp_path, line, "xen-netfront") == ["max_queues=2", "flag", "a*b=1"]
    assert _modparams(tmp_path, line, "xen_blkfront") == ["max_indirect_segments=64"]
    assert _modparams(tmp_path, line, "xen_netback") == []
    assert _modparams(tmp_path, "", "xen_netfront") == []
