"""Fixtures shared by the end-to-end tests of more than one file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture
def pair(guest: Path) -> Iterator[tuple[Any, Any]]:
    """Two domains of the hello guest, built and not started (domids 21 and
    22): a granter and a copier for the native grant-copy tests."""
    from pyxen import native
    from pyxen.domctl import create_domain
    from pyxen.hv.domain import DomainSpec
    if native.fast() is None:
        pytest.skip(f"native library not available: {native.why_not()}")
    a = create_domain(DomainSpec(name="cA", memory_mib=16, kernel=str(guest / "hello"), domid=21),
                      start=False)
    b = create_domain(DomainSpec(name="cB", memory_mib=16, kernel=str(guest / "hello"), domid=22),
                      start=False)
    yield a, b
    for d in (b, a):
        d.destroy()
        d.close()
