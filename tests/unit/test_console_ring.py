"""Console ring index arithmetic (io/console.h), including hostile indexes."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from pyxen.backends.console import (
    OFF_IN_CONS,
    OFF_IN_PROD,
    OFF_OUT,
    OFF_OUT_CONS,
    OFF_OUT_PROD,
    OUT_SIZE,
    ring_consume,
    ring_produce_input,
)


def page() -> memoryview:
    return memoryview(bytearray(4096))


def produce(p: memoryview, data: bytes) -> None:
    prod = struct.unpack_from("<I", p, OFF_OUT_PROD)[0]
    for i, b in enumerate(data):
        p[OFF_OUT + (prod + i) % OUT_SIZE] = b
    struct.pack_into("<I", p, OFF_OUT_PROD, (prod + len(data)) & 0xFFFFFFFF)


def test_consume_wraps() -> None:
    p = page()
    struct.pack_into("<II", p, OFF_OUT_CONS, 0xFFFFFFF0, 0xFFFFFFF0)
    produce(p, b"A" * 100)
    assert ring_consume(p) == b"A" * 100
    assert ring_consume(p) == b""


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_hostile_indexes_never_overrun(cons: int, prod: int) -> None:
    p = page()
    struct.pack_into("<II", p, OFF_OUT_CONS, cons, prod)
    data = ring_consume(p)
    assert len(data) <= OUT_SIZE
    assert struct.unpack_from("<I", p, OFF_OUT_CONS)[0] == prod


def test_input_respects_space() -> None:
    p = page()
    assert ring_produce_input(p, b"x" * 2000) == 1024
    assert ring_produce_input(p, b"y") == 0
    struct.pack_into("<I", p, OFF_IN_CONS, 1000)
    assert ring_produce_input(p, b"z" * 10) == 10
    assert struct.unpack_from("<I", p, OFF_IN_PROD)[0] == 1034
