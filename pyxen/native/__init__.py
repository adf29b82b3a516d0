"""pyxen's native data path (C, loaded with ctypes).

A few loops run once per request or per page and would cost Python tens of
microseconds each: a backend's grant holds and GNTTABOP_copy batches
(``gnt.c``) and blkback's ring
and plain reads and writes (``blk.c``).  They are small C files compiled on
first use into a shared library named after a hash of their text, next to
them (or in ``$XDG_CACHE_HOME/pyxen`` when the package directory is not
writable), so an edited source is rebuilt and a stale library never loads.
There is no Python extension API involved: plain functions, ctypes calls.

Python remains the reference: every caller keeps its pure-Python path, used
when ``PYXEN_NATIVE=0`` or when no C compiler is available (:func:`lib`
returns None and :func:`why_not` says why).  The tests run both.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("native.h", "gnt.c", "blk.c", "evt.c", "net.c")
CFLAGS = ("-O2", "-g", "-Wall", "-Wextra", "-fPIC", "-shared", "-pthread")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_fast: ctypes.PyDLL | None = None
_why = ""
_tried = False

u8p = ctypes.POINTER(ctypes.c_uint8)
vp = ctypes.c_void_p


class PxcSelf(ctypes.Structure):
    """``struct pxc_self`` (native.h): the copying domain's side of GNTTABOP_copy."""

    _fields_ = [("ram", vp), ("nr_pages", ctypes.c_uint64), ("mfn_base", ctypes.c_uint64),
                ("types", vp), ("nr_types", ctypes.c_uint64), ("domid", ctypes.c_uint16)]


class PxcPeer(ctypes.Structure):
    """``struct pxc_peer`` (native.h): a granter as this process sees it."""

    _fields_ = [("mem", vp), ("gt", vp), ("counts", vp), ("types", vp), ("active", vp),
                ("dirty", vp), ("nr_pages", ctypes.c_uint64), ("max_pages", ctypes.c_uint64),
                ("nr_refs", ctypes.c_uint32), ("max_refs", ctypes.c_uint32),
                ("domid", ctypes.c_uint16), ("err", ctypes.c_int16)]


class PxgCopyOp(ctypes.Structure):
    """``struct pxg_copy_op`` (native.h): one backend grant copy."""

    _fields_ = [("ref", ctypes.c_uint32), ("offset", ctypes.c_uint16), ("len", ctypes.c_uint16),
                ("buf", vp), ("to_guest", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


# out[] of pxc_copy (native.h)
PXC_COPIES, PXC_BYTES, PXC_GENERAL_ERRORS, PXC_FIRST_GENERAL_ERROR, PXC_NOUT = range(5)


def _digest() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def _outdirs() -> list[Path]:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyxen"
    return [HERE / "_build", cache]


def build() -> Path:
    """The library for the current sources, compiling it if needed (OSError if impossible)."""
    name = f"libpyxen-{_digest()}.so"
    for d in _outdirs():
        if (d / name).exists():
            return d / name
    cc = os.environ.get("CC", "cc")
    errors = []
    for d in _outdirs():
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=d)
            os.close(fd)
        except OSError as e:
            errors.append(f"{d}: {e}")
            continue
        try:
            srcs = [str(HERE / s) for s in SOURCES if s.endswith(".c")]
            p = subprocess.run([cc, *CFLAGS, "-o", tmp, *srcs], capture_output=True, text=True,
                               timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            os.unlink(tmp)
            raise OSError(f"cannot run the C compiler {cc!r}: {e}") from None
        if p.returncode != 0:
            os.unlink(tmp)
            raise OSError(f"{cc} failed to build {HERE}:\n{p.stderr[-2000:]}")
        os.replace(tmp, d / name)  # atomic: concurrent builders agree
        for old in d.glob("libpyxen-*.so"):  # earlier sources' builds (loaded copies live on)
            if old.name != name:
                with contextlib.suppress(OSError):
                    old.unlink()
        return d / name
    raise OSError("no writable directory for the native library: " + "; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    f = lib.pxg_new
    f.argtypes = [vp, ctypes.c_uint32, vp, ctypes.c_uint64, ctypes.c_uint64, vp, vp,
                  ctypes.c_uint64, vp]
    f.restype = vp
    lib.pxg_free.argtypes = [vp]
    lib.pxg_free.restype = None
    lib.pxg_set_logdirty.argtypes = [vp, ctypes.c_int]
    lib.pxg_set_logdirty.restype = None
    lib.pxg_acquire.argtypes = [vp, ctypes.c_uint32, ctypes.c_uint16, ctypes.c_int]
    lib.pxg_acquire.restype = ctypes.c_int64
    lib.pxg_acquire_many.argtypes = [vp, vp, ctypes.c_int, ctypes.c_uint16, ctypes.c_int, vp]
    lib.pxg_acquire_many.restype = ctypes.c_int
    lib.pxg_mark_dirty.argtypes = [vp, ctypes.c_uint64]
    lib.pxg_mark_dirty.restype = None
    lib.pxg_release.argtypes = [vp, ctypes.c_uint32]
    lib.pxg_release.restype = None
    lib.pxg_holds.argtypes = [vp, ctypes.c_uint32]
    lib.pxg_holds.restype = ctypes.c_uint32
    lib.pxg_copy.argtypes = [vp, vp, ctypes.c_int, ctypes.c_uint16, vp]
    lib.pxg_copy.restype = ctypes.c_int
    lib.pxc_walk.argtypes = [vp, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int,
                             vp, vp]
    lib.pxc_walk.restype = ctypes.c_int
    lib.pxc_scan.argtypes = [vp, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint16, vp,
                             ctypes.c_int, vp, vp]
    lib.pxc_scan.restype = ctypes.c_int
    lib.pxc_copy.argtypes = [vp, vp, ctypes.c_int, vp, ctypes.c_uint32, ctypes.c_uint32, vp]
    lib.pxc_copy.restype = ctypes.c_int
    u32, i32 = ctypes.c_uint32, ctypes.c_int
    lib.pxe_new.argtypes = [u32, u32, u32, u32, u32]
    lib.pxe_new.restype = vp
    lib.pxe_free.argtypes = [vp]
    lib.pxe_free.restype = None
    lib.pxe_attach.argtypes = [vp, u32, i32, vp]
    lib.pxe_attach.restype = None
    lib.pxe_bind_vcpu.argtypes = [vp, u32, u32]
    lib.pxe_bind_vcpu.restype = None
    lib.pxe_watch.argtypes = [vp, u32, i32, u32]
    lib.pxe_watch.restype = i32
    lib.pxe_unwatch.argtypes = [vp, u32, i32]
    lib.pxe_unwatch.restype = i32
    lib.pxe_deliver.argtypes = [vp, u32, vp, vp]
    lib.pxe_deliver.restype = i32
    lib.pxe_wait.argtypes = [vp, u32, ctypes.c_int64]
    lib.pxe_wait.restype = i32
    lib.pxe_wake.argtypes = [vp, u32]
    lib.pxe_wake.restype = None
    lib.pxe_events.argtypes = [vp]
    lib.pxe_events.restype = ctypes.c_uint64
    lib.pxe_set_out.argtypes = [vp, u32, i32]
    lib.pxe_set_out.restype = None
    lib.pxe_send.argtypes = [vp, vp, ctypes.c_uint64, ctypes.c_uint64]
    lib.pxe_send.restype = i32
    lib.pxe_set_poll.argtypes = [vp, ctypes.c_uint64]
    lib.pxe_set_poll.restype = None
    lib.pxe_poll_stats.argtypes = [vp, vp]
    lib.pxe_poll_stats.restype = None
    f = lib.pxb_new
    f.argtypes = [vp, vp, ctypes.c_uint32, ctypes.c_uint16, ctypes.c_int, ctypes.c_uint64,
                  ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    f.restype = vp
    lib.pxb_set_fmap.argtypes = [vp, vp, ctypes.c_uint32, ctypes.c_uint64]
    lib.pxb_set_fmap.restype = None
    lib.pxb_set_persistent.argtypes = [vp, ctypes.c_uint32]
    lib.pxb_set_persistent.restype = ctypes.c_int
    lib.pxb_persistent_count.argtypes = [vp]
    lib.pxb_persistent_count.restype = ctypes.c_uint32
    lib.pxb_map_file.argtypes = [vp, ctypes.c_uint64]
    lib.pxb_map_file.restype = ctypes.c_int
    lib.pxb_set_tuning.argtypes = [vp, ctypes.c_int, ctypes.c_uint64]
    lib.pxb_set_tuning.restype = None
    lib.pxb_start.argtypes = [vp]
    lib.pxb_start.restype = ctypes.c_int
    lib.pxb_stop.argtypes = [vp]
    lib.pxb_stop.restype = None
    lib.pxb_free.argtypes = [vp]
    lib.pxb_free.restype = None
    lib.pxb_respond.argtypes = [vp, ctypes.c_uint64, ctypes.c_uint8, ctypes.c_int16]
    lib.pxb_respond.restype = None
    lib.pxb_take_slow.argtypes = [vp, ctypes.c_char_p]
    lib.pxb_take_slow.restype = ctypes.c_int
    lib.pxb_take_up.argtypes = [vp, ctypes.c_char_p, ctypes.c_int]
    lib.pxb_take_up.restype = ctypes.c_uint32
    lib.pxb_stats.argtypes = [vp, ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
    lib.pxb_stats.restype = None
    lib.pxb_inflight.argtypes = [vp]
    lib.pxb_inflight.restype = ctypes.c_int


def _load() -> None:
    global _lib, _fast, _why, _tried
    _tried = True
    if os.environ.get("PYXEN_NATIVE", "1") == "0":
        _why = "disabled by PYXEN_NATIVE=0"
        return
    try:
        path = build()
        # Two views of one library: CDLL calls drop the GIL (for calls that may
        # block: start, stop), PyDLL calls keep it (nanosecond calls, where
        # winning the GIL back from busy threads would cost more than the call).
        lib = ctypes.CDLL(str(path))
        fast = ctypes.PyDLL(str(path))
    except OSError as e:
        _why = str(e)
        return
    _declare(lib)
    _declare(fast)
    _lib, _fast = lib, fast


def lib() -> ctypes.CDLL | None:
    """The library with GIL-releasing calls, or None (see :func:`why_not`)."""
    with _lock:
        if not _tried:
            _load()
    return _lib


def fast() -> ctypes.PyDLL | None:
    """The same library with calls that keep the GIL (short, non-blocking ones)."""
    lib()
    return _fast


def why_not() -> str:
    """Why :func:`lib` is None ('' when it is loaded)."""
    lib()
    return _why
