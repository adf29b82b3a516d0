"""Console backend (xenconsoled's job) over Xen's console ring (io/console.h).

struct xencons_interface { char in[1024]; char out[2048];
                           XENCONS_RING_IDX in_cons, in_prod, out_cons, out_prod; }

The guest produces into ``out`` and notifies the console event channel; the
backend consumes, hands the bytes to the domain's console sinks (log file,
attached terminals) and notifies back so a guest waiting for space wakes.
Input goes the other way through ``in``.  Ring indexes are free-running
32-bit counters; a guest that writes nonsense indexes gets its output
clamped to the ring size, never a crash.

:class:`ConsoleLog` is the domain's log file, ``guest-NAME.log``, rotated at
a size limit so a guest cannot fill the disk however much it prints (the
rate limit, :class:`pyxen.ratelimit.ConsoleLimiter`, bounds how fast).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from ..hv import atomic

IN_SIZE, OUT_SIZE = 1024, 2048
OFF_IN, OFF_OUT = 0, 1024
OFF_IN_CONS, OFF_IN_PROD, OFF_OUT_CONS, OFF_OUT_PROD = 3072, 3076, 3080, 3084


def ring_consume(page: memoryview) -> bytes:
    """Take everything the guest produced in ``out`` and advance out_cons."""
    cons, prod = atomic.load_pair(page, OFF_OUT_CONS)
    avail = (prod - cons) & 0xFFFFFFFF
    if avail == 0:
        return b""
    if avail > OUT_SIZE:  # a confused or malicious guest: take at most one ring
        cons = (prod - OUT_SIZE) & 0xFFFFFFFF
        avail = OUT_SIZE
    start = cons % OUT_SIZE
    first = min(avail, OUT_SIZE - start)
    data = bytes(page[OFF_OUT + start:OFF_OUT + start + first])
    if first < avail:
        data += bytes(page[OFF_OUT:OFF_OUT + avail - first])
    atomic.store_index(page, OFF_OUT_CONS, prod)
    return data


def ring_produce_input(page: memoryview, data: bytes) -> int:
    """Put as much of ``data`` into ``in`` as fits; return how much was written."""
    cons, prod = atomic.load_pair(page, OFF_IN_CONS)
    used = (prod - cons) & 0xFFFFFFFF
    if used > IN_SIZE:
        return 0
    n = min(len(data), IN_SIZE - used)
    for i in range(n):
        page[OFF_IN + (prod + i) % IN_SIZE] = data[i]
    atomic.store_index(page, OFF_IN_PROD, (prod + n) & 0xFFFFFFFF)
    return n


class ConsoleBackend:
    """One domain's console: ring page + event channel, output to sinks."""

    def __init__(self, page: memoryview, output: Callable[[bytes], None],
                 notify_guest: Callable[[], None]) -> None:
        self.page = page
        self.output = output
        self.notify_guest = notify_guest
        self.lock = threading.Lock()
        self.pending_input = bytearray()
        self.bytes_out = 0
        self.bytes_in = 0

    def on_event(self) -> None:
        """The guest notified the console port (runs in its vCPU thread)."""
        with self.lock:
            data = ring_consume(self.page)
            self._push_input()
        if data:
            self.bytes_out += len(data)
            self.output(data)
            self.notify_guest()

    def write_input(self, data: bytes) -> None:
        with self.lock:
            self.pending_input += data
            n = self._push_input()
        if n:
            self.notify_guest()

    def _push_input(self) -> int:
        if not self.pending_input:
            return 0
        n = ring_produce_input(self.page, bytes(self.pending_input))
        del self.pending_input[:n]
        self.bytes_in += n
        return n

    def close(self) -> None:
        try:
            self.page.release()
        except (ValueError, BufferError):
            pass


class ConsoleLog:
    """An append-only log file rotated at ``max_bytes``: ``NAME`` becomes
    ``NAME.1``, ``NAME.1`` becomes ``NAME.2`` ... and ``NAME.<keep>`` is
    deleted, so at most ``max_bytes * (keep + 1)`` bytes are ever on disk.

    No file ever exceeds ``max_bytes``: a write that does not fit is split
    across the rotation.  ``max_bytes == 0`` never rotates; ``keep == 0``
    starts the file afresh instead.  Files are created 0600 (a guest's
    console may carry passwords), an existing one is set 0600, and a
    symlink in the file's place is refused (``O_NOFOLLOW``).  Write errors
    (a full disk, say) are counted and reported once through ``on_error``,
    never raised into the vCPU thread that produced the output.
    """

    def __init__(self, path: Path, max_bytes: int = 0, keep: int = 3,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = max(0, max_bytes)
        self.keep = max(0, keep)
        self.on_error = on_error
        self.fd = -1
        self.size = 0
        self.rotations = 0
        self.errors = 0
        self.failing = False
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            self.size = os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise
        self.fd = fd

    def rotated(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _rotate(self) -> None:
        os.close(self.fd)
        self.fd = -1
        if self.keep:
            for i in range(self.keep - 1, 0, -1):
                try:
                    os.replace(self.rotated(i), self.rotated(i + 1))
                except FileNotFoundError:
                    pass
            os.replace(self.path, self.rotated(1))
        else:
            os.unlink(self.path)
        self.rotations += 1
        self._open()

    def write(self, data: bytes) -> None:
        if self.fd < 0:
            return
        try:
            while data:
                if self.max_bytes and self.size >= self.max_bytes:
                    self._rotate()
                chunk = data[:self.max_bytes - self.size] if self.max_bytes else data
                n = os.write(self.fd, chunk)
                self.size += n
                data = data[n:]
            self.failing = False
        except OSError as e:
            self.errors += 1
            if not self.failing and self.on_error is not None:
                self.on_error(f"console log {self.path}: {e.strerror or e}; "
                              "output not logged until writing works again")
            self.failing = True
            if self.fd < 0:  # failed while rotating: try to carry on with a fresh file
                try:
                    self._open()
                except OSError:
                    pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
