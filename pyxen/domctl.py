"""Create domains in this process: the toolstack's path into the hypervisor
(Xen's domctl + libxl's domain builder glue).  The daemon's domain processes
and the tests both use :func:`create_domain`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import hostmem
from .backends.console import ConsoleBackend
from .builder import pv
from .builder.bzimage import load_kernel as load_kernel_image
from .builder.elf import ElfError, XenKernel
from .hv.domain import Domain, DomainSpec
from .hv.interdomain import Directory


class CreateError(ValueError):
    """A domain could not be created; the message says why, for the user."""


def load_kernel(path: str) -> XenKernel:
    """An ELF PV kernel or a bzImage (unpacked as xl does), or a CreateError."""
    try:
        return load_kernel_image(path)
    except ElfError as e:
        raise CreateError(str(e)) from None


#: Secondary vCPUs (``VCPUOP_up``) are not implemented yet.
SUPPORTED_VCPUS = hostmem.SUPPORTED_VCPUS


def check_spec(spec: DomainSpec) -> None:
    """Refuse sizes the hypervisor cannot give, each with the setting's name.

    The xl.cfg loader makes the same checks with file and line; this is the
    builder's own guard for callers that pass a spec without a config file
    (the API's raw create request, tests), so that they get a sentence and
    not KVM's errno from deep inside the machine setup."""
    for key, v in (("memory", spec.memory_mib), ("maxmem", spec.maxmem_mib),
                   ("vcpus", spec.vcpus), ("maxvcpus", spec.maxvcpus)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise CreateError(f"{key}: expected a whole number, got {v!r}")
    why = hostmem.size_problem(spec.memory_mib, spec.maxmem_mib, spec.vcpus, spec.maxvcpus)
    if why:
        raise CreateError(why)


def create_domain(spec: DomainSpec, console_sink: Callable[[bytes], None] | None = None,
                  log_sink: Callable[[str], None] | None = None,
                  on_state: Callable[[Domain], None] | None = None,
                  start: bool = True, kernel: XenKernel | None = None,
                  directory: Directory | None = None) -> Domain:
    """Build and (by default) start a PV domain from ``spec``."""
    check_spec(spec)
    k = kernel or load_kernel(spec.kernel)
    ramdisk = None
    if spec.ramdisk:
        try:
            ramdisk = Path(spec.ramdisk).read_bytes()
        except OSError as e:
            raise CreateError(f"cannot read ramdisk {spec.ramdisk}: {e.strerror}") from None
    d = Domain(spec, console_sink, on_state, log_sink, directory)
    try:
        info = pv.build(d, k, spec.cmdline, ramdisk)
    except pv.BuildError as e:
        d.destroy()
        d.close()
        raise CreateError(str(e)) from None
    off = d.machine.ram_offset(info.console_mfn)
    page = d.machine.ram_view[off:off + 4096]
    port = info.console_evtchn
    d.console = ConsoleBackend(page, d.console_output, lambda: d.raise_port(port, 0))
    d.log(f"created: {k.guest_os or 'guest'} kernel {spec.kernel}, {spec.memory_mib} MiB, "
          f"{spec.vcpus} vcpu(s)")
    if start:
        d.start()
    return d
