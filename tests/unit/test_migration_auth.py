"""The pre-shared-key handshake of plain-TCP migrations (pyxen/migration/auth.py),
both ends run for real over a socketpair in two threads."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from pyxen.migration import auth
from pyxen.migration import protocol as P

KEY = b"k" * 32


Outcome = tuple[BaseException | None, BaseException | None, bytes]


def run_pair(rkey: bytes | None, skey: bytes | None) -> Outcome:
    """Receiver (then the xl banner) and sender on a socketpair: each side's
    exception (or None), and what the sender read after authenticating."""
    a, b = socket.socketpair()
    out: dict[str, object] = {}

    def recv_side() -> None:
        try:
            if rkey is not None:
                auth.receiver(a.fileno(), a.fileno(), rkey, timeout=5)
            P.write_all(a.fileno(), P.BANNER)
            out["r"] = None
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["r"] = e
        finally:
            a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=recv_side)
    t.start()
    got = b""
    try:
        if skey is not None:
            auth.sender(b.fileno(), b.fileno(), skey, timeout=5)
        got = P.read_line(b.fileno(), 5, "banner")
        out["s"] = None
    except BaseException as e:  # noqa: BLE001
        out["s"] = e
    finally:
        b.close()
        t.join(10)
        a.close()
    return out["r"], out["s"], got  # type: ignore[return-value]


def test_both_hold_the_key() -> None:
    r, s, got = run_pair(KEY, KEY)
    assert r is None and s is None
    assert got == P.BANNER


def test_wrong_key_is_refused_on_both_ends() -> None:
    r, s, got = run_pair(KEY, b"x" * 32)
    assert isinstance(r, auth.AuthError) and "does not hold" in str(r)
    assert isinstance(s, auth.AuthError) and "refused" in str(s)
    assert got == b""


def test_sender_without_key_never_gets_the_banner() -> None:
    r, s, got = run_pair(KEY, None)
    assert got.startswith(auth.AUTH) and got != P.BANNER  # the sender reads a challenge, not the banner
    assert isinstance(r, P.ProtocolError)


def test_receiver_without_key_is_refused_by_a_keyed_sender() -> None:
    r, s, _ = run_pair(None, KEY)
    assert isinstance(s, auth.AuthError) and "without --key" in str(s)


def test_impostor_receiver_that_echoes_gets_nothing() -> None:
    """A receiver that does not hold the key cannot compute the proof: the
    sender stops before it sends anything of the domain."""
    a, b = socket.socketpair()

    def fake() -> None:
        P.write_all(a.fileno(), auth.AUTH + b"00" * 32 + b"\n")
        line = P.read_line(a.fileno(), 5, "x")
        P.write_all(a.fileno(), auth.AUTH + line.split()[-1][:64] + b"\n")  # replay the sender's own proof

    t = threading.Thread(target=fake)
    t.start()
    with pytest.raises(auth.AuthError, match="does not hold"):
        auth.sender(b.fileno(), b.fileno(), KEY, timeout=5)
    t.join(5)
    a.close()
    b.close()


@pytest.mark.parametrize("line", [b"garbage\n", auth.AUTH + b"zz" * 32 + b"\n", auth.AUTH + b"00\n",
                                  auth.AUTH + b"00" * 32 + b" 11\n"])
def test_malformed_sender_lines_are_refused(line: bytes) -> None:
    a, b = socket.socketpair()
    err: list[BaseException] = []

    def recv_side() -> None:
        try:
            auth.receiver(a.fileno(), a.fileno(), KEY, timeout=5)
        except P.ProtocolError as e:
            err.append(e)

    t = threading.Thread(target=recv_side)
    t.start()
    P.read_line(b.fileno(), 5, "challenge")
    P.write_all(b.fileno(), line)
    assert P.read_line(b.fileno(), 5, "answer") == P.REFUSED + b"authentication failed\n"
    t.join(5)
    assert err and isinstance(err[0], auth.AuthError)
    a.close()
    b.close()


def test_load_key_checks(tmp_path: Path) -> None:
    k = tmp_path / "key"
    k.write_bytes(os.urandom(32))
    k.chmod(0o600)
    assert len(auth.load_key(k)) == 32
    k.chmod(0o644)
    with pytest.raises(auth.AuthError, match=r"key .*key: readable or writable by group or others"):
        auth.load_key(k)
    k.chmod(0o600)
    k.write_bytes(b"short")
    with pytest.raises(auth.AuthError, match="at least 16"):
        auth.load_key(k)
    with pytest.raises(auth.AuthError, match="missing: No such file"):
        auth.load_key(tmp_path / "missing")
    with pytest.raises(auth.AuthError, match="Is a directory|not a regular file"):
        auth.load_key(tmp_path)
