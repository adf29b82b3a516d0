"""Fixtures shared by the end-to-end tests of more than one file."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.hosts import TwoHosts, can_make_namespaces


@pytest.fixture
def two(guest) -> Iterator[TwoHosts]:  # noqa: ANN001 - tests/conftest.py's fixture (builds the guest)
    """Two pyxend "hosts" in network namespaces joined by a veth pair
    (tests/e2e/hosts.py), removed afterwards."""
    why = can_make_namespaces()
    if why:
        pytest.skip(f"SKIPPED LOUDLY: two hosts in network namespaces: {why}")
    t = TwoHosts()
    try:
        yield t
    finally:
        t.close()
