"""Mutual authentication of a plain-TCP migration with a pre-shared key.

``xl migrate`` runs its receiver over ssh, which authenticates both ends.
pyxen's ``migrate-receive --listen`` is a plain TCP socket: without a key,
whoever connects first has a domain built from the config they send (disk
and kernel paths on the destination host), and a fake receiver gets the
guest's memory.  With ``--key FILE`` on both sides, each end proves it holds
the key before the xl banner is sent; the stream itself is not encrypted
(use ssh for that, or a private link).

The exchange (one line each, before xl's banner)::

    receiver -> sender   "pyxen migration: auth " Rn "\\n"
    sender   -> receiver "pyxen migration: auth " Sn " " HMAC(k, "sender" Rn Sn) "\\n"
    receiver -> sender   "pyxen migration: auth " HMAC(k, "receiver" Rn Sn) "\\n"
                         (or "pyxen migration: refused: authentication failed\\n")

Rn and Sn are 32 random bytes, everything is lower-case hex, HMAC is
HMAC-SHA256.  Fresh nonces on both sides: a recorded exchange replays to
neither end.  Pure except for the fd I/O done through ``protocol``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
from pathlib import Path

from . import protocol as P

AUTH = b"pyxen migration: auth "
NONCE = 32
KEY_MIN = 16
KEY_MAX = 4096
TIMEOUT_S = 30.0


class AuthError(P.ProtocolError):
    """The other end did not prove it holds the key (or the key file is unusable)."""


def load_key(path: str | Path) -> bytes:
    """The key in ``path``: at least 16 bytes (e.g. ``head -c 32 /dev/urandom``),
    not readable by group or others (a key everybody can read authenticates
    nobody).  Errors name the file."""
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes()[:KEY_MAX + 1]
    except OSError as e:
        raise AuthError(f"migration key {p}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise AuthError(f"migration key {p}: not a regular file")
    if st.st_mode & 0o077:
        raise AuthError(f"migration key {p}: readable or writable by group or others "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    if len(data) < KEY_MIN:
        raise AuthError(f"migration key {p}: {len(data)} bytes, at least {KEY_MIN} needed")
    if len(data) > KEY_MAX:
        raise AuthError(f"migration key {p}: longer than {KEY_MAX} bytes")
    return data


def proof(key: bytes, role: bytes, rn: bytes, sn: bytes) -> bytes:
    return hmac.new(key, role + rn + sn, hashlib.sha256).hexdigest().encode()


def _parse_auth(line: bytes, parts: int, what: str) -> list[bytes]:
    if line.startswith(P.REFUSED):
        raise AuthError("the other side refused: " + line[len(P.REFUSED):].decode(errors="replace").strip())
    if not line.startswith(AUTH):
        raise AuthError(f"expected the {what}, got {line[:120]!r} (is --key given on both sides?)")
    fields = line[len(AUTH):].strip().split(b" ")
    if len(fields) != parts or not all(len(f) == 64 for f in fields):
        raise AuthError(f"malformed {what}")
    try:
        [bytes.fromhex(f.decode()) for f in fields]
    except ValueError:
        raise AuthError(f"malformed {what}") from None
    return fields


def receiver(rfd: int, wfd: int, key: bytes, timeout: float = TIMEOUT_S) -> None:
    """The receiver's half; AuthError (after telling the sender) if the
    sender does not prove it holds ``key``."""
    rn = os.urandom(NONCE).hex().encode()
    P.write_all(wfd, AUTH + rn + b"\n")
    try:
        sn, got = _parse_auth(P.read_line(rfd, timeout, "sender's authentication"), 2,
                              "sender's authentication")
    except P.ProtocolError:
        with contextlib.suppress(OSError):
            P.write_all(wfd, P.REFUSED + b"authentication failed\n")
        raise
    if not hmac.compare_digest(got, proof(key, b"sender", rn, sn)):
        with contextlib.suppress(OSError):
            P.write_all(wfd, P.REFUSED + b"authentication failed\n")
        raise AuthError("the sender does not hold the migration key: refused")
    P.write_all(wfd, AUTH + proof(key, b"receiver", rn, sn) + b"\n")


def sender(rfd: int, wfd: int, key: bytes, timeout: float = TIMEOUT_S) -> None:
    """The sender's half; AuthError if the receiver does not authenticate or
    does not prove it holds ``key`` (nothing of the domain is sent then)."""
    line = P.read_line(rfd, timeout, "receiver's authentication challenge")
    if line == P.BANNER:
        raise AuthError("the receiver does not authenticate (it was started without --key)")
    (rn,) = _parse_auth(line, 1, "receiver's authentication challenge")
    sn = os.urandom(NONCE).hex().encode()
    P.write_all(wfd, AUTH + sn + b" " + proof(key, b"sender", rn, sn) + b"\n")
    (got,) = _parse_auth(P.read_line(rfd, timeout, "receiver's authentication"), 1,
                         "receiver's authentication")
    if not hmac.compare_digest(got, proof(key, b"receiver", rn, sn)):
        raise AuthError("the receiver does not hold the migration key: nothing was sent")
