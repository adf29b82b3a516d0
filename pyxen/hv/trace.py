"""Exit tracing for diagnosing guests pyxen does not run yet (``PYXEN_TRACE_EXITS``).

Off by default, and then it costs nothing: the hooks are installed only when
the environment variable is set when a domain is created.

``PYXEN_TRACE_EXITS=1`` writes to stderr, ``PYXEN_TRACE_EXITS=/path`` appends
to that file.  One line per event::

    d1 v0 hc   5 memory_op(XENMEM_memory_map, 0xffffffff82a03e40, ...) = 0
    d1 v0 hc   6 vcpu_op(VCPUOP_register_runstate_memory_area, 0x0, ...) = -38 ENOSYS
    d1 v0 trap #GP err=0x0 rip=0xffffffff8304e1d5 (kernel) 0f 30 ...

The first number is the sequence number of the event in the domain, so two
runs can be compared line by line.  Used to write docs/guests.md's table of
what Linux asks of the hypervisor at boot.

Hooks (each one line, so the hot paths are untouched when tracing is off):

* ``Hypercalls.__init__``: ``trace.wrap_table(self)``, which replaces each
  handler by a logging wrapper and fills the unimplemented numbers below 64
  with one that logs and answers -ENOSYS, exactly what the table's absence of
  an entry answers;
* ``VCPU.exception``: ``trace.trap(self, vec, err, rip, cs)`` before the
  exception is handled.
"""

from __future__ import annotations

import errno as _errno
import os
import sys
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from .. import abi

if TYPE_CHECKING:
    from .hypercalls import Hypercalls

_setting = os.environ.get("PYXEN_TRACE_EXITS", "")
ENABLED = bool(_setting) and _setting != "0"
_lock = threading.Lock()
_out: IO[str] | None = None
_seq: dict[int, int] = {}

#: Sub-operation names of the hypercalls whose first argument is a command
#: (xen/include/public/*.h), for the trace only.
SUBOPS: dict[str, dict[int, str]] = {
    "xen_version": {0: "XENVER_version", 1: "XENVER_extraversion", 2: "XENVER_compile_info",
                    3: "XENVER_capabilities", 4: "XENVER_changeset",
                    5: "XENVER_platform_parameters", 6: "XENVER_get_features",
                    7: "XENVER_pagesize", 8: "XENVER_guest_handle", 9: "XENVER_commandline",
                    10: "XENVER_build_id"},
    "memory_op": {0: "XENMEM_increase_reservation", 1: "XENMEM_decrease_reservation",
                  2: "XENMEM_maximum_ram_page", 3: "XENMEM_current_reservation",
                  4: "XENMEM_maximum_reservation", 5: "XENMEM_machphys_mfn_list",
                  6: "XENMEM_populate_physmap", 7: "XENMEM_add_to_physmap",
                  9: "XENMEM_memory_map", 10: "XENMEM_machine_memory_map",
                  11: "XENMEM_exchange", 12: "XENMEM_machphys_mapping",
                  13: "XENMEM_set_memory_map", 14: "XENMEM_maximum_gpfn",
                  15: "XENMEM_remove_from_physmap", 16: "XENMEM_set_pod_target",
                  17: "XENMEM_get_pod_target", 23: "XENMEM_add_to_physmap_batch",
                  24: "XENMEM_claim_pages", 25: "XENMEM_machphys_compat_mfn_list",
                  26: "XENMEM_get_vnumainfo", 27: "XENMEM_reserved_device_memory_map",
                  28: "XENMEM_acquire_resource"},
    "vcpu_op": {0: "VCPUOP_initialise", 1: "VCPUOP_up", 2: "VCPUOP_down", 3: "VCPUOP_is_up",
                4: "VCPUOP_get_runstate_info", 5: "VCPUOP_register_runstate_memory_area",
                6: "VCPUOP_set_periodic_timer", 7: "VCPUOP_stop_periodic_timer",
                8: "VCPUOP_set_singleshot_timer", 9: "VCPUOP_stop_singleshot_timer",
                10: "VCPUOP_register_vcpu_info", 11: "VCPUOP_send_nmi",
                12: "VCPUOP_get_physid", 13: "VCPUOP_register_vcpu_time_memory_area",
                14: "VCPUOP_register_runstate_phys_area", 15: "VCPUOP_register_vcpu_time_phys_area"},
    "sched_op": {0: "SCHEDOP_yield", 1: "SCHEDOP_block", 2: "SCHEDOP_shutdown",
                 3: "SCHEDOP_poll", 4: "SCHEDOP_remote_shutdown", 5: "SCHEDOP_shutdown_code",
                 6: "SCHEDOP_watchdog", 7: "SCHEDOP_pin_override"},
    "event_channel_op": {0: "EVTCHNOP_bind_interdomain", 1: "EVTCHNOP_bind_virq",
                         2: "EVTCHNOP_bind_pirq", 3: "EVTCHNOP_close", 4: "EVTCHNOP_send",
                         5: "EVTCHNOP_status", 6: "EVTCHNOP_alloc_unbound",
                         7: "EVTCHNOP_bind_ipi", 8: "EVTCHNOP_bind_vcpu", 9: "EVTCHNOP_unmask",
                         10: "EVTCHNOP_reset", 11: "EVTCHNOP_init_control",
                         12: "EVTCHNOP_expand_array", 13: "EVTCHNOP_set_priority",
                         14: "EVTCHNOP_reset_cont"},
    "physdev_op": {5: "PHYSDEVOP_irq_status_query", 6: "PHYSDEVOP_set_iopl",
                   7: "PHYSDEVOP_set_iobitmap", 12: "PHYSDEVOP_eoi", 13: "PHYSDEVOP_map_pirq",
                   14: "PHYSDEVOP_unmap_pirq", 17: "PHYSDEVOP_pirq_eoi_gmfn_v1",
                   21: "PHYSDEVOP_setup_gsi", 23: "PHYSDEVOP_get_free_pirq",
                   25: "PHYSDEVOP_pci_device_add", 28: "PHYSDEVOP_pirq_eoi_gmfn_v2"},
    "grant_table_op": {0: "GNTTABOP_map_grant_ref", 1: "GNTTABOP_unmap_grant_ref",
                       2: "GNTTABOP_setup_table", 3: "GNTTABOP_dump_table",
                       4: "GNTTABOP_transfer", 5: "GNTTABOP_copy", 6: "GNTTABOP_query_size",
                       7: "GNTTABOP_unmap_and_replace", 8: "GNTTABOP_set_version",
                       9: "GNTTABOP_get_status_frames", 10: "GNTTABOP_get_version",
                       11: "GNTTABOP_swap_grant_ref", 12: "GNTTABOP_cache_flush"},
    "callback_op": {0: "CALLBACKOP_register", 1: "CALLBACKOP_unregister"},
    "hvm_op": {0: "HVMOP_set_param", 1: "HVMOP_get_param"},
    "vm_assist": {0: "VMASST_CMD_enable", 1: "VMASST_CMD_disable"},
    "console_io": {0: "CONSOLEIO_write", 1: "CONSOLEIO_read"},
    "platform_op": {},
}

_EXC = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
        8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
        17: "#AC", 18: "#MC", 19: "#XM"}


def _emit(domid: int, line: str) -> None:
    global _out
    with _lock:
        if _out is None:
            _out = sys.stderr if _setting in ("1", "stderr") else open(_setting, "a", buffering=1)  # noqa: SIM115
        n = _seq.get(domid, 0) + 1
        _seq[domid] = n
        _out.write(f"d{domid} #{n} {line}\n")


def describe_hypercall(nr: int, args: tuple[int, ...]) -> str:
    """``name(SUBOP, 0x..., ...)``: the call as the guest made it."""
    name = abi.HYPERCALL_NAMES.get(nr, f"hypercall_{nr}")
    parts = [f"{a:#x}" for a in args]
    sub = SUBOPS.get(name)
    if sub is not None and args:
        parts[0] = sub.get(args[0], f"{args[0]}")
    if name == "vm_assist" and len(args) > 1:
        parts[1] = f"type={args[1]}"
    return f"{name}({', '.join(parts)})"


def _result(res: object) -> str:
    if res is None:
        return "(no return: context switched)"
    if isinstance(res, int):
        v = res if res < (1 << 63) else res - (1 << 64)
        if -4096 < v < 0:
            return f"{v} {_errno.errorcode.get(-v, '')}"
        return f"{v:#x}" if v > 9 else str(v)
    return repr(res)


def _wrap(hc: Hypercalls, nr: int, fn: Callable[..., Any] | None) -> Callable[..., Any]:
    domid = hc.domain.domid

    def traced(v: Any, *args: int) -> Any:
        desc = describe_hypercall(nr, args)
        if fn is None:
            _emit(domid, f"v{v.id} hc {desc} = -38 ENOSYS (not implemented)")
            raise abi.XenError(_errno.ENOSYS)
        try:
            res = fn(v, *args)
        except abi.XenError as e:
            _emit(domid, f"v{v.id} hc {desc} = -{e.errno} {_errno.errorcode.get(e.errno, '')}"
                  + (f" ({e.why})" if e.why else ""))
            raise
        except BaseException as e:
            _emit(domid, f"v{v.id} hc {desc} raised {type(e).__name__}: {e}")
            raise
        _emit(domid, f"v{v.id} hc {desc} = {_result(res)}")
        return res

    return traced


def wrap_table(hc: Hypercalls) -> None:
    """Hook: log every hypercall of this domain (no-op unless enabled)."""
    if not ENABLED:
        return
    for nr in range(64):
        hc.table[nr] = _wrap(hc, nr, hc.table.get(nr))


def trap(v: Any, vec: int, err: int | None, rip: int, cs: int) -> None:
    """Hook: log an exception the guest raised, with the bytes at its RIP."""
    if not ENABLED:
        return
    try:
        code = v.copy_from_guest(rip, 8).hex(" ")
    except Exception:  # noqa: BLE001 -- tracing must never change what the guest sees
        code = "??"
    mode = "kernel" if v.kernel_mode else "user"
    extra = f" cr2={v.kvm.sregs.cr2:#x}" if vec == 14 else ""
    e = f" err={err:#x}" if err is not None else ""
    _emit(v.domain.domid, f"v{v.id} trap {_EXC.get(vec, vec)}{e}{extra} rip={rip:#x} ({mode}) "
          f"cs={cs:#x} code: {code}")
