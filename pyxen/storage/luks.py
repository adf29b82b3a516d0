"""LUKS1 headers, as qcow2 embeds them for ``encrypt.format=luks``.

The on-disk layout is the standard LUKS1 partition header (cryptsetup's
``docs/on-disk-format.pdf``): 592 bytes of header and 8 key slots, followed
by the key material areas.  A key slot holds the master key, split by the
anti-forensic splitter into ``stripes`` (4000) pieces and encrypted with a key
derived from the passphrase by PBKDF2.  The master key is recognised by its
PBKDF2 digest (``mk_digest``).

Inside qcow2 (docs/interop/qcow2.txt, "Full disk encryption header pointer")
all offsets in this header are relative to the start of the LUKS area in the
qcow2 file; the qcow2 file, not ``payload_offset``, decides where data lives.

This module knows nothing of qcow2: it parses and builds the header, unlocks
the master key, and provides :class:`SectorCipher`, which encrypts 512-byte
sectors with the header's cipher (aes in xts or cbc mode, plain/plain64/essiv
IVs).  Crypto comes from the ``cryptography`` package; PBKDF2 from hashlib.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MAGIC = b"LUKS\xba\xbe"
SECTOR = 512
HEADER_SIZE = 592
NUM_SLOTS = 8
STRIPES = 4000
DIGEST_SIZE = 20
SALT_SIZE = 32
SLOT_ACTIVE = 0x00AC71F3
SLOT_INACTIVE = 0x0000DEAD
ALIGN = 4096  # key material areas start on 4 KiB boundaries, as cryptsetup and QEMU lay them out

_HDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
assert _HDR.size == 208 and _SLOT.size == 48 and _HDR.size + NUM_SLOTS * _SLOT.size == HEADER_SIZE


class LuksError(Exception):
    """The LUKS header is malformed, unsupported, or no key slot opens with the passphrase."""


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("ascii", "replace")


@dataclass
class KeySlot:
    active: int = SLOT_INACTIVE
    iterations: int = 0
    salt: bytes = bytes(SALT_SIZE)
    key_offset: int = 0  # in 512-byte sectors from the start of the LUKS header
    stripes: int = STRIPES

    @property
    def enabled(self) -> bool:
        return self.active == SLOT_ACTIVE


@dataclass
class LuksHeader:
    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int  # sectors
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: str
    slots: list[KeySlot] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes) -> LuksHeader:
        if len(data) < HEADER_SIZE:
            raise LuksError(f"LUKS header truncated ({len(data)} bytes)")
        (magic, version, cname, cmode, hspec, payload, kbytes, digest, dsalt, diter,
         uid) = _HDR.unpack_from(data, 0)
        if magic != MAGIC:
            raise LuksError(f"bad LUKS magic {magic!r}")
        if version != 1:
            raise LuksError(f"LUKS version {version} is not supported (only LUKS1)")
        slots = []
        for i in range(NUM_SLOTS):
            a, it, salt, koff, stripes = _SLOT.unpack_from(data, _HDR.size + i * _SLOT.size)
            slots.append(KeySlot(a, it, salt, koff, stripes))
        h = cls(_cstr(cname), _cstr(cmode), _cstr(hspec), payload, kbytes, digest, dsalt, diter,
                _cstr(uid), slots)
        h.validate()
        return h

    def validate(self) -> None:
        if not 16 <= self.key_bytes <= 128:
            raise LuksError(f"LUKS key_bytes {self.key_bytes} out of range")
        _hash_name(self.hash_spec)
        if self.mk_digest_iter < 1:
            raise LuksError("LUKS mk_digest_iter is 0")
        hdr_sectors = (HEADER_SIZE + SECTOR - 1) // SECTOR
        areas = []
        for i, s in enumerate(self.slots):
            if s.active not in (SLOT_ACTIVE, SLOT_INACTIVE):
                raise LuksError(f"LUKS key slot {i} has a bad state word {s.active:#x}")
            if not s.enabled:
                continue
            if s.stripes != STRIPES:
                raise LuksError(f"LUKS key slot {i} has {s.stripes} stripes (expected {STRIPES})")
            if s.iterations < 1:
                raise LuksError(f"LUKS key slot {i} has 0 iterations")
            n = _material_sectors(self.key_bytes, s.stripes)
            if s.key_offset < hdr_sectors:
                raise LuksError(f"LUKS key slot {i} overlaps the header")
            if s.key_offset + n > self.payload_offset:
                raise LuksError(f"LUKS key slot {i} overlaps the payload")
            areas.append((s.key_offset, s.key_offset + n, i))
        areas.sort()
        for (_, e0, i0), (s1, _, i1) in zip(areas, areas[1:], strict=False):
            if s1 < e0:
                raise LuksError(f"LUKS key slots {i0} and {i1} overlap")

    def pack(self) -> bytes:
        out = bytearray(_HDR.pack(MAGIC, 1, self.cipher_name.encode(), self.cipher_mode.encode(),
                                  self.hash_spec.encode(), self.payload_offset, self.key_bytes,
                                  self.mk_digest, self.mk_digest_salt, self.mk_digest_iter,
                                  self.uuid.encode()))
        for s in self.slots:
            out += _SLOT.pack(s.active, s.iterations, s.salt, s.key_offset, s.stripes)
        return bytes(out)


def _material_sectors(key_bytes: int, stripes: int) -> int:
    return (key_bytes * stripes + SECTOR - 1) // SECTOR


def _hash_name(spec: str) -> str:
    name = spec.lower().replace("-", "")
    if name not in ("sha1", "sha224", "sha256", "sha384", "sha512"):
        raise LuksError(f"LUKS hash {spec!r} is not supported")
    return name


def _xor(a: bytes, b: bytes) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


def _diffuse(buf: bytes, hname: str) -> bytes:
    ds = hashlib.new(hname).digest_size
    out = bytearray()
    for i in range(0, len(buf), ds):
        block = buf[i:i + ds]
        out += hashlib.new(hname, struct.pack(">I", i // ds) + block).digest()[:len(block)]
    return bytes(out)


def af_merge(material: bytes, key_bytes: int, stripes: int, hash_spec: str) -> bytes:
    """Recover the key from ``stripes`` anti-forensic pieces (LUKS1 AF merge)."""
    hname = _hash_name(hash_spec)
    d = bytes(key_bytes)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, material[i * key_bytes:(i + 1) * key_bytes]), hname)
    return _xor(d, material[(stripes - 1) * key_bytes:stripes * key_bytes])


def af_split(key: bytes, stripes: int, hash_spec: str) -> bytes:
    """Split ``key`` into ``stripes`` pieces; all are needed to get it back."""
    hname = _hash_name(hash_spec)
    kb = len(key)
    out = bytearray()
    d = bytes(kb)
    for _ in range(stripes - 1):
        piece = os.urandom(kb)
        out += piece
        d = _diffuse(_xor(d, piece), hname)
    out += _xor(d, key)
    return bytes(out)


class SectorCipher:
    """Encrypts and decrypts whole 512-byte sectors; the IV/tweak comes from the sector number."""

    def __init__(self, cipher_name: str, cipher_mode: str, key: bytes) -> None:
        if cipher_name.lower() != "aes":
            raise LuksError(f"cipher {cipher_name!r} is not supported (only aes)")
        mode, _, ivgen = cipher_mode.lower().partition("-")
        self.key = key
        self.mode = mode
        self.ivgen = ivgen
        self._essiv: Cipher[modes.ECB] | None = None
        if mode == "xts":
            if len(key) not in (32, 64):
                raise LuksError(f"aes-xts needs a 32 or 64 byte key, not {len(key)}")
        elif mode == "cbc":
            if len(key) not in (16, 24, 32):
                raise LuksError(f"aes-cbc needs a 16, 24 or 32 byte key, not {len(key)}")
        else:
            raise LuksError(f"cipher mode {cipher_mode!r} is not supported")
        if ivgen.startswith("essiv:"):
            h = hashlib.new(_hash_name(ivgen[6:]), key).digest()
            self._essiv = Cipher(algorithms.AES(h), modes.ECB())
        elif ivgen not in ("plain", "plain64"):
            raise LuksError(f"IV generator {ivgen!r} is not supported")

    def _iv(self, sector: int) -> bytes:
        if self.ivgen == "plain":
            raw = (sector & 0xFFFFFFFF).to_bytes(16, "little")
        else:
            raw = (sector & 0xFFFFFFFFFFFFFFFF).to_bytes(16, "little")
        if self._essiv is not None:
            enc = self._essiv.encryptor()
            return enc.update(raw) + enc.finalize()
        return raw

    def _run(self, sector: int, data: bytes | bytearray | memoryview, encrypt: bool) -> bytes:
        if len(data) % SECTOR:
            raise LuksError(f"encrypted I/O of {len(data)} bytes is not a whole number of sectors")
        mv = memoryview(data)
        out = bytearray(len(data))
        for i in range(0, len(data), SECTOR):
            iv = self._iv(sector + i // SECTOR)
            if self.mode == "xts":
                c: Cipher[modes.XTS] | Cipher[modes.CBC] = Cipher(algorithms.AES(self.key), modes.XTS(iv))
            else:
                c = Cipher(algorithms.AES(self.key), modes.CBC(iv))
            ctx = c.encryptor() if encrypt else c.decryptor()
            out[i:i + SECTOR] = ctx.update(mv[i:i + SECTOR]) + ctx.finalize()
        return bytes(out)

    def encrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes:
        return self._run(sector, data, True)

    def decrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes:
        return self._run(sector, data, False)


def unlock(hdr: LuksHeader, read: Callable[[int, int], bytes], passphrase: bytes) -> bytes | None:
    """The master key if some active slot opens with ``passphrase``, else None.

    ``read(offset, length)`` returns bytes of the LUKS area (offsets relative to its start)."""
    hname = _hash_name(hdr.hash_spec)
    for s in hdr.slots:
        if not s.enabled:
            continue
        slot_key = hashlib.pbkdf2_hmac(hname, passphrase, s.salt, s.iterations, hdr.key_bytes)
        n = _material_sectors(hdr.key_bytes, s.stripes)
        enc = read(s.key_offset * SECTOR, n * SECTOR)
        if len(enc) != n * SECTOR:
            raise LuksError("LUKS key material truncated")
        material = SectorCipher(hdr.cipher_name, hdr.cipher_mode, slot_key).decrypt(0, enc)
        mk = af_merge(material, hdr.key_bytes, s.stripes, hdr.hash_spec)
        digest = hashlib.pbkdf2_hmac(hname, mk, hdr.mk_digest_salt, hdr.mk_digest_iter, DIGEST_SIZE)
        if digest == hdr.mk_digest:
            return mk
    return None


def iterations_for(hash_spec: str, ms: int) -> int:
    """How many PBKDF2 iterations take about ``ms`` milliseconds here (at least 1000)."""
    hname = _hash_name(hash_spec)
    n = 10000
    t0 = time.perf_counter()
    hashlib.pbkdf2_hmac(hname, b"benchmark", bytes(SALT_SIZE), n, 32)
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(1000, int(n * ms / 1000 / dt))


def create(passphrase: bytes, iterations: int | None = None, iter_time_ms: int = 1000,
           cipher_name: str = "aes", cipher_mode: str = "xts-plain64", hash_spec: str = "sha256",
           key_bytes: int = 64) -> tuple[bytes, bytes]:
    """A new LUKS1 area (header, slot 0 holding a random master key) and the master key.

    The area is ``payload_offset`` sectors long: header, then 8 key material areas, each
    4 KiB aligned; slots 1-7 are laid out but disabled."""
    if iterations is None:
        iterations = iterations_for(hash_spec, iter_time_ms)
    hname = _hash_name(hash_spec)
    while True:
        mk = os.urandom(key_bytes)
        if cipher_mode.startswith("xts") and mk[:key_bytes // 2] == mk[key_bytes // 2:]:
            continue
        break
    mat_bytes = key_bytes * STRIPES
    slot_span = (mat_bytes + ALIGN - 1) // ALIGN * ALIGN
    first = (HEADER_SIZE + ALIGN - 1) // ALIGN * ALIGN
    payload = (first + NUM_SLOTS * slot_span) // SECTOR
    mk_salt = os.urandom(SALT_SIZE)
    mk_iter = max(1000, iterations // 8)
    digest = hashlib.pbkdf2_hmac(hname, mk, mk_salt, mk_iter, DIGEST_SIZE)
    slots = [KeySlot(SLOT_INACTIVE, 0, bytes(SALT_SIZE), (first + i * slot_span) // SECTOR, STRIPES)
             for i in range(NUM_SLOTS)]
    s0 = slots[0]
    s0.active, s0.iterations, s0.salt = SLOT_ACTIVE, iterations, os.urandom(SALT_SIZE)
    hdr = LuksHeader(cipher_name, cipher_mode, hash_spec, payload, key_bytes, digest, mk_salt, mk_iter,
                     str(uuidlib.uuid4()), slots)
    hdr.validate()
    slot_key = hashlib.pbkdf2_hmac(hname, passphrase, s0.salt, iterations, key_bytes)
    material = af_split(mk, STRIPES, hash_spec)
    material += bytes(_material_sectors(key_bytes, STRIPES) * SECTOR - len(material))
    enc = SectorCipher(cipher_name, cipher_mode, slot_key).encrypt(0, material)
    area = bytearray(payload * SECTOR)
    area[:HEADER_SIZE] = hdr.pack()
    area[s0.key_offset * SECTOR:s0.key_offset * SECTOR + len(enc)] = enc
    return bytes(area), mk
