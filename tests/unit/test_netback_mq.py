"""The pure multi-queue rules of netif (io/netif.h "Multiple transmit and
receive queues", Linux netback's connect/connect_data_rings): how many queues
a frontend may take, where each queue's keys are, and what is refused."""

from __future__ import annotations

import pytest

from pyxen.backends import netif as N


def test_default_max_queues_is_linux_netbacks() -> None:
    # xenvif_max_queues = min(MAX_QUEUES_DEFAULT (8), num_online_cpus())
    assert [N.default_max_queues(c) for c in (0, 1, 2, 8, 64)] == [1, 1, 2, 8, 8]


def test_queue_count() -> None:
    assert N.queue_count(None, 4) == 1  # a frontend that knows nothing of multi-queue
    assert N.queue_count("1", 1) == 1
    assert N.queue_count("4", 4) == 4
    for bad, why in (("0", "guest requested 0 queues, but valid range is 1 - 4."),
                     ("5", "guest requested 5 queues, but valid range is 1 - 4."),
                     ("", "is not a number"), ("x", "is not a number"), ("-1", "is not a number")):
        with pytest.raises(ValueError, match=why.replace(".", r"\.")):
            N.queue_count(bad, 4)


def test_queue_dirs() -> None:
    fe = "/local/domain/3/device/vif/0"
    assert N.queue_dirs(fe, 1) == [fe]
    assert N.queue_dirs(fe, 3) == [f"{fe}/queue-0", f"{fe}/queue-1", f"{fe}/queue-2"]


def _reader(nodes: dict[str, str]):  # noqa: ANN202
    return nodes.get


def test_read_queue_keys_one_and_split_channels() -> None:
    b = "/fe/queue-1"
    one = {f"{b}/tx-ring-ref": "8", f"{b}/rx-ring-ref": "9", f"{b}/event-channel": "12"}
    assert N.read_queue_keys(_reader(one), b) == N.QueueKeys(8, 9, 12, 12)
    split = {**one, f"{b}/event-channel-tx": "13", f"{b}/event-channel-rx": "14"}
    assert N.read_queue_keys(_reader(split), b) == N.QueueKeys(8, 9, 13, 14)  # split is tried first
    # only one of the split pair: netback falls back to event-channel
    half = {**one, f"{b}/event-channel-tx": "13"}
    assert N.read_queue_keys(_reader(half), b) == N.QueueKeys(8, 9, 12, 12)


@pytest.mark.parametrize("drop, why", [("tx-ring-ref", "tx-ring-ref is missing"),
                                       ("rx-ring-ref", "rx-ring-ref is missing"),
                                       ("event-channel", "event-channel: missing")])
def test_read_queue_keys_missing(drop: str, why: str) -> None:
    b = "/fe/queue-0"
    nodes = {f"{b}/tx-ring-ref": "8", f"{b}/rx-ring-ref": "9", f"{b}/event-channel": "12"}
    del nodes[f"{b}/{drop}"]
    with pytest.raises(ValueError, match=why):
        N.read_queue_keys(_reader(nodes), b)


@pytest.mark.parametrize("value", ["", "abc", "-3", "4294967296"])
def test_read_queue_keys_malformed(value: str) -> None:
    b = "/fe"
    nodes = {f"{b}/tx-ring-ref": value, f"{b}/rx-ring-ref": "9", f"{b}/event-channel": "12"}
    with pytest.raises(ValueError, match="tx-ring-ref"):
        N.read_queue_keys(_reader(nodes), b)
