"""The core stays typed and lint-clean: `ruff check pyxen bench tests` and `mypy pyxen`."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _have(mod: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _have("ruff") and not shutil.which("ruff"), reason="ruff not installed")
def test_ruff() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "pyxen", "bench", "tests"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(not _have("mypy"), reason="mypy not installed")
def test_mypy_core() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "pyxen"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
