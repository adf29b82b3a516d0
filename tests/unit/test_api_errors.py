"""What the API says when the daemon it reaches cannot do what was asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyxen.toolstack.api import Host, PyxenError


class _Conn:
    def __init__(self, reply: dict[str, Any]) -> None:
        self.reply = reply

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.reply


def _host(reply: dict[str, Any]) -> Host:
    h = Host.__new__(Host)  # no daemon: only _call is exercised
    h.run_dir = Path("/run/pyxen-test")
    h.answered = True
    h.conn = _Conn(reply)  # type: ignore[assignment]
    return h


def test_an_older_daemon_is_named_with_what_to_do() -> None:
    h = _host({"ok": False, "error": "unknown operation 'save'"})
    with pytest.raises(PyxenError, match=r"unknown operation 'save' \(the pyxend in "
                                         r"/run/pyxen-test predates this pyxen: `pyxen daemon stop`"):
        h._call(op="save")


def test_other_errors_pass_unchanged() -> None:
    h = _host({"ok": False, "error": "no domain 'x'"})
    with pytest.raises(PyxenError, match=r"^no domain 'x'$"):
        h._call(op="destroy", domain="x")
