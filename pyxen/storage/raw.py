"""Raw disk images: a regular file or a block device, byte for byte.

The guest's sector N is the file's bytes ``N*512 .. N*512+511``; nothing is
stored besides the data, so a raw image is what ``qemu-img convert -O raw``
writes and what ``dd`` reads.

Every transfer is one positioned system call (``preadv``/``pwritev``) on a
descriptor opened once, straight between the file and the caller's buffer
(a memoryview of guest memory), so there is no bounce copy and no shared
file position: calls from several threads need no lock.  ``flush`` is
``fdatasync``; ``discard`` punches a hole (``fallocate(PUNCH_HOLE |
KEEP_SIZE)``) so a sparse file stays sparse.

The size is fixed when the image is opened (``st_size`` of a file,
``BLKGETSIZE64`` of a block device).  A file that someone else truncates
afterwards reads as zeros past its new end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import threading
from pathlib import Path
from typing import Self

from pyxen.storage import BlockImage, ImageError

__all__ = ["RawImage"]

#: ``_IOR(0x12, 114, size_t)``: a block device's size in bytes (linux/fs.h).
BLKGETSIZE64 = 0x80081272
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc: ctypes.CDLL | None = None
_libc_lock = threading.Lock()


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """libc ``fallocate(2)``: ``os.posix_fallocate`` cannot punch holes."""
    global _libc
    with _libc_lock:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _errname(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"{name} ({e.strerror})"


def _bytes_view(buf: memoryview | bytes | bytearray) -> memoryview:
    """A flat unsigned-byte view of ``buf`` (guest memory may come typed or shaped)."""
    m = memoryview(buf)
    if m.format != "B" or m.ndim != 1:
        m = m.cast("B")
    return m


class RawImage(BlockImage):
    """A raw image file or block device.

    ``readonly`` opens the file ``O_RDONLY`` and refuses writes and discards
    with :class:`ImageError`.  ``direct`` opens with ``O_DIRECT`` (bypassing
    the host page cache): buffers, offsets and lengths must then be aligned
    to the device's logical block size, which guest pages and sectors are on
    512-byte-sector disks; filesystems without ``O_DIRECT`` (tmpfs) refuse
    to open.
    """

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False, direct: bool = False) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.readonly = readonly
        self.direct = direct
        self._punch_ok = True
        self._closed = False
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self._fd = os.open(self.path, flags)
        except OSError as e:
            how = "read-only" if readonly else "read-write"
            if direct and e.errno == errno.EINVAL:
                raise ImageError(f"{self.name}: cannot open with O_DIRECT (the filesystem does not "
                                 "support it)") from e
            raise ImageError(f"{self.name}: cannot open {how}: {_errname(e)}") from e
        try:
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode):
                self.is_block_device = False
                self.size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                self.is_block_device = True
                self.size = self._blockdev_size()
            else:
                raise ImageError(f"{self.name}: not a regular file or a block device")
        except BaseException:
            os.close(self._fd)
            raise

    def _blockdev_size(self) -> int:
        try:
            out = fcntl.ioctl(self._fd, BLKGETSIZE64, b"\0" * 8)
            size: int = struct.unpack("=Q", out)[0]
            return size
        except OSError:
            return os.lseek(self._fd, 0, os.SEEK_END)

    def __enter__(self) -> Self:
        return self

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"RawImage({self.name!r}, {self.size} bytes, {mode})"

    # --- checks ---------------------------------------------------------------------

    def _check(self, what: str, offset: int, length: int) -> None:
        if self._closed:
            raise ImageError(f"{self.name}: {what} on a closed image")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(f"{self.name}: {what} of {length} bytes at {offset} is beyond the end of "
                             f"the disk ({self.size} bytes)")

    def _check_writable(self, what: str) -> None:
        if self.readonly:
            raise ImageError(f"{self.name}: {what} refused: the disk is read-only")

    # --- I/O ------------------------------------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        view = _bytes_view(buf)
        n = len(view)
        self._check("read", offset, n)
        done = 0
        while done < n:
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except InterruptedError:
                continue
            except OSError as e:
                raise ImageError(f"{self.name}: read of {n} bytes at {offset} failed: {_errname(e)}") from e
            if got == 0:  # the file shrank under us: past its end reads as a hole
                view[done:] = bytes(n - done)
                return
            done += got

    def readinto_vec(self, offset: int, bufs: list[memoryview]) -> None:
        """One ``preadv`` for all of ``bufs`` (a blkif request's segments)."""
        views = [_bytes_view(b) for b in bufs]
        n = sum(len(v) for v in views)
        self._check("read", offset, n)
        try:
            got = os.preadv(self._fd, views, offset)
        except InterruptedError:
            got = 0
        except OSError as e:
            raise ImageError(f"{self.name}: read of {n} bytes at {offset} failed: {_errname(e)}") from e
        if got < n:  # short: finish buffer by buffer
            super().readinto_vec(offset, views) if got == 0 else self._finish(offset, views, got, True)

    def write_vec(self, offset: int, bufs: list[memoryview]) -> None:
        """One ``pwritev`` for all of ``bufs``."""
        views = [_bytes_view(b) for b in bufs]
        n = sum(len(v) for v in views)
        self._check_writable("write")
        self._check("write", offset, n)
        try:
            done = os.pwritev(self._fd, views, offset)
        except InterruptedError:
            done = 0
        except OSError as e:
            raise ImageError(f"{self.name}: write of {n} bytes at {offset} failed: {_errname(e)}") from e
        if done < n:
            self._finish(offset, views, done, False)

    def _finish(self, offset: int, views: list[memoryview], done: int, read: bool) -> None:
        for v in views:
            if done >= len(v):
                done -= len(v)
                offset += len(v)
                continue
            (self.readinto if read else self.write)(offset + done, v[done:])
            offset += len(v)
            done = 0

    def write(self, offset: int, data: memoryview | bytes) -> None:
        self._check_writable("write")
        view = _bytes_view(data)
        n = len(view)
        self._check("write", offset, n)
        done = 0
        while done < n:
            try:
                done += os.pwritev(self._fd, [view[done:]], offset + done)
            except InterruptedError:
                continue
            except OSError as e:
                raise ImageError(f"{self.name}: write of {n} bytes at {offset} failed: {_errname(e)}") from e

    def flush(self) -> None:
        if self._closed:
            raise ImageError(f"{self.name}: flush on a closed image")
        if self.readonly:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise ImageError(f"{self.name}: fdatasync failed: {_errname(e)}") from e

    @property
    def supports_discard(self) -> bool:
        return not self.readonly and self._punch_ok

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole (reads then return zeros); a filesystem that cannot is left alone.

        Discard is a hint, so ``EOPNOTSUPP`` only turns it off for this image.
        """
        self._check_writable("discard")
        self._check("discard", offset, length)
        if length == 0 or not self._punch_ok:
            return
        try:
            _fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                self._punch_ok = False
                return
            raise ImageError(f"{self.name}: discard of {length} bytes at {offset} failed: "
                             f"{_errname(e)}") from e

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._fd)

    def native_target(self) -> tuple[int, int] | None:
        return None if self._closed else (self._fd, 0)

    def fileno(self) -> int:
        return self._fd
