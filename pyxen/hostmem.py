"""How much memory this host can still give a new domain.

Xen allocates a domain's memory when it creates it and fails the create
if the host does not have it.  pyxen's guest RAM is a memfd that the
kernel fills lazily, so an absurd ``memory=`` would not fail at create
time: it would fail later, or push the host into swap or the OOM killer
when the guest touches its pages.  The toolstack (``toolstack/xlcfg.py``,
with the config key and line) and the domain builder (``domctl.py``, for
callers without a config file) therefore compare the request with the
kernel's own estimate of what can be allocated without swapping,
``MemAvailable`` in /proc/meminfo.
"""

from __future__ import annotations

MEMINFO = "/proc/meminfo"

#: The largest domain (memory or maxmem, MiB) that ``hv/machine.py``'s address
#: map holds.  The hypervisor area grows with RAM (the M2P takes one page per
#: 2 MiB, plus its L1s and one direct-map L2 per GiB) and must end below
#: ``GRANT_GPA``, which leaves it 768 MiB: room for ~380 GiB of RAM.  256 GiB
#: keeps a margin for more Xen-heap frames, and RAM then also ends well inside
#: the direct map's 512 GiB L4 slot.  Above this KVM would refuse the
#: overlapping memory slots with a bare EEXIST, so the config loader, the
#: builder (``domctl.check_spec``) and ``Machine`` check first.  (It lives here,
#: not in machine.py, so that the CLI can check it without importing KVM code.)
MAX_RAM_MIB = 256 << 10


def available_mib(meminfo: str | None = None) -> int | None:
    """``MemAvailable`` in MiB, or None when the kernel does not say."""
    meminfo = meminfo or MEMINFO
    try:
        with open(meminfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    fields = line.split()
                    if len(fields) >= 2 and fields[1].isdigit():
                        return int(fields[1]) // 1024  # reported in kB
                    return None
    except OSError:
        return None
    return None


def too_much(memory_mib: int, meminfo: str | None = None) -> str | None:
    """Why ``memory_mib`` cannot be given to a new domain now, or None."""
    meminfo = meminfo or MEMINFO
    avail = available_mib(meminfo)
    if avail is not None and memory_mib > avail:
        return (f"{memory_mib} MiB is more than this host has available "
                f"({avail} MiB MemAvailable in {meminfo})")
    return None
