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


#: Secondary vCPUs (VCPUOP_up) are not implemented yet: a domain has one.
SUPPORTED_VCPUS = 1


def size_problem(memory_mib: int, maxmem_mib: int, vcpus: int, maxvcpus: int) -> str | None:
    """Why a domain of these sizes cannot be built, as "key: why", or None.

    The one rule for every entry point: the config loader (which adds file and
    line), the daemon's request check (``toolstack/validate.py``) and the
    builder (``domctl.check_spec``).  The values are whole numbers already."""
    for key, v, least in (("memory", memory_mib, 1), ("maxmem", maxmem_mib, 0),
                          ("vcpus", vcpus, 1), ("maxvcpus", maxvcpus, 0)):
        if v < least:
            return f"{key}: must be at least {least}, got {v}"
    why = too_much(memory_mib)
    if why:
        return f"memory: {why}"
    for key, mib in (("memory", memory_mib), ("maxmem", maxmem_mib)):
        if mib > MAX_RAM_MIB:
            return (f"{key}: {mib} MiB is more than a pyxen domain can have "
                    f"(at most {MAX_RAM_MIB} MiB)")
    for key, n in (("vcpus", vcpus), ("maxvcpus", maxvcpus)):
        if n > SUPPORTED_VCPUS:
            return (f"{key}: only {SUPPORTED_VCPUS} vCPU is supported so far "
                    f"(secondary vCPUs are not implemented), got {n}")
    return None
