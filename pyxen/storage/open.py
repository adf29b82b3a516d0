"""From an xl disk specification to an open :class:`BlockImage`.

The rules, in order:

* an empty CD-ROM (no target) has no image: ImageError;
* a ``script=`` (block scripts, ``nbd:``/``iscsi:`` prefixes) is not run by pyxen: ImageError;
* an ``nbd://host[:port]/export`` target (``spec.nbd``) or an
  ``nbd+unix:///export?socket=PATH`` target is an NBD export, served as
  it comes (``format`` must be raw: the server does any format);
* otherwise the target is a local file or block device (``spec.path`` once
  the config loader has resolved it, else the target as written), opened as
  its ``format`` says: ``raw`` → :class:`RawImage`, ``qcow2`` →
  :class:`~pyxen.storage.qcow2.Qcow2Image`.  Nothing is probed: a raw disk
  that happens to hold a qcow2 header stays raw, as xl does (a guest must
  not be able to change how its disk is read by writing a header to it).

``access=ro`` (and every CD-ROM) opens read-only.  An encrypted qcow2
gets its passphrase from ``secrets``, looked up by vdev, then by the
target as written, then by the resolved path.  Every failure is an
:class:`ImageError` whose message names the vdev and the target.
"""

from __future__ import annotations

import os

from pyxen.storage import BlockImage, ImageError
from pyxen.toolstack.xlcfg import DiskFormat, DiskSpec

__all__ = ["open_image"]

#: How long an NBD client waits to connect and for each reply.
NBD_TIMEOUT = 30.0


def _secret(spec: DiskSpec, secrets: dict[str, bytes] | None) -> bytes | None:
    if not secrets:
        return None
    for key in (spec.vdev, spec.target, str(spec.path) if spec.path else None):
        if key is not None and key in secrets:
            return secrets[key]
    return None


def open_image(spec: DiskSpec, secrets: dict[str, bytes] | None = None,
               nbd_timeout: float = NBD_TIMEOUT) -> BlockImage:
    """Open the image behind one ``disk=[...]`` entry (see the module docstring for the rules)."""
    where = f"disk {spec.vdev}"
    target = spec.target
    if target is None or spec.format is DiskFormat.EMPTY:
        raise ImageError(f"{where}: an empty CD-ROM drive has no image to open")
    where = f"disk {spec.vdev} ('{target}')"
    if spec.script is not None:
        raise ImageError(f"{where}: block scripts are not supported by pyxen (script '{spec.script}')")
    readonly = not spec.readwrite
    if spec.nbd is not None or target.startswith("nbd+unix://"):
        if spec.format is not DiskFormat.RAW:
            raise ImageError(f"{where}: an NBD export is served as it is; format '{spec.format.value}' "
                             "cannot be layered on it (use format=raw)")
        from pyxen.storage.nbd import NbdImage
        try:
            if spec.nbd is not None:
                return NbdImage(spec.nbd.host, spec.nbd.port, spec.nbd.export, readonly=readonly,
                                timeout=nbd_timeout)
            return NbdImage.from_uri(target, readonly=readonly, timeout=nbd_timeout)
        except ImageError as e:
            raise ImageError(f"{where}: {e}") from e
    path = spec.path if spec.path is not None else target
    if not os.path.exists(path):
        raise ImageError(f"{where}: no such file: {path}")
    try:
        if spec.format is DiskFormat.RAW:
            from pyxen.storage.raw import RawImage
            return RawImage(path, readonly=readonly)
        if spec.format is DiskFormat.QCOW2:
            from pyxen.storage.qcow2 import Qcow2Image
            return Qcow2Image(path, readonly=readonly, key_secret=_secret(spec, secrets))
    except ImageError as e:
        raise ImageError(f"{where}: {e}") from e
    except OSError as e:
        raise ImageError(f"{where}: {e.strerror or e}: {path}") from e
    raise ImageError(f"{where}: disk format '{spec.format.value}' is not supported by pyxen "
                     "(use raw or qcow2)")
