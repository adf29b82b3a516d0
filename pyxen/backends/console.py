"""Console backend (xenconsoled's job) over Xen's console ring (io/console.h).

struct xencons_interface { char in[1024]; char out[2048];
                           XENCONS_RING_IDX in_cons, in_prod, out_cons, out_prod; }

The guest produces into ``out`` and notifies the console event channel; the
backend consumes, hands the bytes to the domain's console sinks (log file,
attached terminals) and notifies back so a guest waiting for space wakes.
Input goes the other way through ``in``.  Ring indexes are free-running
32-bit counters; a guest that writes nonsense indexes gets its output
clamped to the ring size, never a crash.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

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
