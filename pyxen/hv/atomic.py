"""Atomic operations on memory shared with guests and other processes.

Python cannot issue ``lock``-prefixed instructions, but libatomic (GCC's
runtime for the ``__atomic`` builtins) exports them as functions, which
ctypes can call.  Grant-table flags are changed by the granting guest and by
the mapping domain's process at the same time, and event-channel bits by
several vCPUs: both need real atomics, as Xen uses.

Addresses are host virtual addresses (see :func:`address_of`).
"""

from __future__ import annotations

import ctypes
import mmap

# PyDLL: these calls take nanoseconds, so keep the GIL (a CDLL call releases and
# re-acquires it, and winning it back from busy backend threads costs far more).
_lib = ctypes.PyDLL("libatomic.so.1")
SEQ_CST = 5

_cas2 = _lib.__atomic_compare_exchange_2
_cas2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint16, ctypes.c_int, ctypes.c_int]
_cas2.restype = ctypes.c_bool
_cas4 = _lib.__atomic_compare_exchange_4
_cas4.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_int]
_cas4.restype = ctypes.c_bool
_cas8 = _lib.__atomic_compare_exchange_8
_cas8.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
_cas8.restype = ctypes.c_bool
_load8 = _lib.__atomic_load_8
_load8.argtypes = [ctypes.c_void_p, ctypes.c_int]
_load8.restype = ctypes.c_uint64
_or8 = _lib.__atomic_fetch_or_8
_or8.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
_or8.restype = ctypes.c_uint64
_and8 = _lib.__atomic_fetch_and_8
_and8.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
_and8.restype = ctypes.c_uint64
_and2 = _lib.__atomic_fetch_and_2
_and2.argtypes = [ctypes.c_void_p, ctypes.c_uint16, ctypes.c_int]
_and2.restype = ctypes.c_uint16
_xchg8 = _lib.__atomic_exchange_8
_xchg8.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
_xchg8.restype = ctypes.c_uint64
_store4 = _lib.__atomic_store_4
_store4.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
_store4.restype = None
_load4 = _lib.__atomic_load_4
_load4.argtypes = [ctypes.c_void_p, ctypes.c_int]
_load4.restype = ctypes.c_uint32


def address_of(buf: mmap.mmap | bytearray) -> int:
    """Host address of the start of ``buf`` (the export is released at once)."""
    c = ctypes.c_char.from_buffer(buf)
    a = ctypes.addressof(c)
    del c
    return a


def cas16(addr: int, expected: int, new: int) -> tuple[bool, int]:
    """Compare-and-swap 16 bits; returns (swapped, value seen)."""
    e = ctypes.c_uint16(expected)
    ok = _cas2(addr, ctypes.byref(e), new, SEQ_CST, SEQ_CST)
    return bool(ok), int(e.value)


def cas32(addr: int, expected: int, new: int) -> tuple[bool, int]:
    e = ctypes.c_uint32(expected)
    ok = _cas4(addr, ctypes.byref(e), new, SEQ_CST, SEQ_CST)
    return bool(ok), int(e.value)


def cas64(addr: int, expected: int, new: int) -> tuple[bool, int]:
    e = ctypes.c_uint64(expected)
    ok = _cas8(addr, ctypes.byref(e), new, SEQ_CST, SEQ_CST)
    return bool(ok), int(e.value)


def load64(addr: int) -> int:
    return int(_load8(addr, SEQ_CST))


def load32(addr: int) -> int:
    return int(_load4(addr, SEQ_CST))


def store32(addr: int, value: int) -> None:
    """One 32-bit store.  struct.pack_into writes byte by byte, which another CPU
    reading a ring index can observe half done; shared indexes use this."""
    _store4(addr, value & 0xFFFFFFFF, SEQ_CST)


def view_address(mv: memoryview) -> int:
    """Host address of a writable memoryview's first byte."""
    c = ctypes.c_char.from_buffer(mv)
    a = ctypes.addressof(c)
    del c
    return a


def load_pair(page: memoryview, off: int) -> tuple[int, int]:
    """Two adjacent 32-bit ring indexes (cons, prod) the other side writes,
    each read with one load."""
    a = view_address(page)
    return load32(a + off), load32(a + off + 4)


def store_index(page: memoryview, off: int, value: int) -> None:
    """Publish a ring index with one 32-bit store."""
    store32(view_address(page) + off, value)


def fetch_or64(addr: int, bits: int) -> int:
    return int(_or8(addr, bits, SEQ_CST))


def fetch_and64(addr: int, mask: int) -> int:
    return int(_and8(addr, mask, SEQ_CST))


def fetch_and16(addr: int, mask: int) -> int:
    return int(_and2(addr, mask, SEQ_CST))


def exchange64(addr: int, value: int) -> int:
    return int(_xchg8(addr, value, SEQ_CST))
