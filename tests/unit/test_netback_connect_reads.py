"""Netback's connect reads the frontend's nodes in one pipelined round trip
(``XsClient.read_many``): the batch must hold every node the connect's pure
rules (netif.queue_count, read_queue_keys) may ask for, in either layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyxen.backends import netif as N
from pyxen.backends.netback import NetBack, _parse_rate


def _bare(max_queues: int) -> NetBack:
    nb = object.__new__(NetBack)  # only the paths are needed: no domain, no TAP
    nb.fe, nb.be = "/local/domain/3/device/vif/0", "/local/domain/0/backend/vif/3/0"
    nb.max_queues = max_queues
    return nb


class _Recorder:
    """A reader that records each path asked for, answering from ``nodes``."""

    def __init__(self, nodes: dict[str, str]) -> None:
        self.nodes, self.asked = nodes, set[str]()

    def __call__(self, p: str) -> str | None:
        self.asked.add(p)
        return self.nodes.get(p)


FE_NODES = ("multi-queue-num-queues", "request-rx-copy", "feature-sg", "feature-gso-tcpv4",
            "feature-gso-tcpv6", "feature-no-csum-offload", "feature-ipv6-csum-offload",
            "feature-rx-notify")


@pytest.mark.parametrize("max_queues", [1, 2, 8])
def test_the_batch_covers_every_read_of_every_layout(max_queues: int) -> None:
    nb = _bare(max_queues)
    batch = set(nb._connect_paths())
    assert len(batch) == len(nb._connect_paths())
    for nq in range(1, max_queues + 1):
        for base in N.queue_dirs(nb.fe, nq):
            # nothing there, then only the ring refs: every fallback is tried
            for nodes in ({}, {f"{base}/tx-ring-ref": "8", f"{base}/rx-ring-ref": "9"}):
                rec = _Recorder(nodes)
                with pytest.raises(ValueError):
                    N.read_queue_keys(rec, base)
                assert rec.asked <= batch, rec.asked - batch
    for k in FE_NODES:
        assert f"{nb.fe}/{k}" in batch
    assert f"{nb.be}/rate" in batch


def test_parse_rate() -> None:
    c = _parse_rate("1000,20000")
    assert c is not None and (c.credit_bytes, c.usec) == (1000, 20000)
    for bad in (None, "", "x", "1000", "0,5", "5,0", "-1,5", "1,2,3"):
        assert _parse_rate(bad) is None


def test_client_read_many(tmp_path: Path) -> None:
    """One round trip; absent (ENOENT) and forbidden nodes read as None, as
    try_read answers them; a path given twice is read once."""
    from pyxen.xenstore.client import XsClient
    from pyxen.xenstore.server import XenstoreServer
    sock = tmp_path / "xs.sock"
    with XenstoreServer(sock, tmp_path / "state.json", flush_delay=0):
        c = XsClient(str(sock))
        try:
            c.write_many({"/p/a": "1", "/p/b": ""})
            assert c.read_many(["/p/a", "/nope", "/p/b", "/p/a", ""]) == \
                {"/p/a": "1", "/nope": None, "/p/b": "", "": None}
            assert c.read_many([]) == {}
        finally:
            c.close()
