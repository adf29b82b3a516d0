"""Disk images for the block backend: one interface, several formats.

A :class:`BlockImage` is what blkback serves to a guest.  Offsets and lengths
are bytes, always multiples of ``sector_size`` when they come from a guest.
Methods may be called from several threads at once (blkback keeps many
requests in flight); implementations serialise what must be serialised.
``readinto`` and ``write`` take buffers (memoryviews of guest memory) so data
goes straight between the guest's pages and the file, with no bounce copy
where the format allows it.

Formats: ``raw.py`` (files and block devices), ``qcow2.py`` (sparse,
backing chains, compressed clusters, LUKS encryption, snapshots), ``nbd.py``
(a network block device client).  :func:`open_image` picks one from xl's
disk specification.
"""

from __future__ import annotations

import mmap
from abc import ABC, abstractmethod


class ImageError(Exception):
    """A disk image cannot be opened or is corrupt; the message names the file and what."""


class BlockImage(ABC):
    """A virtual disk."""

    size: int  # bytes
    sector_size: int = 512
    readonly: bool = False
    name: str = ""

    @abstractmethod
    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the disk's bytes at ``offset`` (holes read as zeros)."""

    @abstractmethod
    def write(self, offset: int, data: memoryview | bytes) -> None:
        """Write ``data`` at ``offset`` (ImageError if read-only or beyond the end)."""

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable (fdatasync or the format's equivalent)."""

    def readinto_vec(self, offset: int, bufs: list[memoryview]) -> None:
        """Fill ``bufs`` one after the other from ``offset`` (scatter).  Formats
        that can do it in one system call override this."""
        for b in bufs:
            self.readinto(offset, b)
            offset += len(b)

    def write_vec(self, offset: int, bufs: list[memoryview]) -> None:
        """Write ``bufs`` one after the other from ``offset`` (gather)."""
        for b in bufs:
            self.write(offset, b)
            offset += len(b)

    def discard(self, offset: int, length: int) -> None:  # noqa: B027 - optional, default no-op
        """The guest no longer needs these bytes; formats may free space (default: nothing)."""

    @property
    def supports_discard(self) -> bool:
        return False

    def native_target(self) -> tuple[int, int] | None:
        """``(fd, byte offset of the disk's byte 0 in that file)`` when plain
        reads and writes of the whole disk may go straight to ``fd`` (the
        native block data path does them with preadv/pwritev); None when
        every request must come through this object (the default)."""
        return None

    def native_fastmap(self) -> tuple[int, int, int, mmap.mmap] | None:
        """For formats that map guest clusters to places in one file (qcow2):
        ``(fd, cluster_bits, clusters, the fast map)``, see
        :meth:`pyxen.storage.qcow2.Qcow2Image.native_fastmap`.  None (the
        default) when there is no such map."""
        return None

    def close(self) -> None:  # noqa: B027 - optional, default no-op
        """Flush metadata and release the file."""

    def __enter__(self) -> BlockImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
