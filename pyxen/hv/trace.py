"""Exit tracing for diagnosing guests pyxen does not run yet (``PYXEN_TRACE_EXITS``).

Off by default, and then it costs nothing: the hooks are installed only when
the environment variable is set when a domain is created.

``PYXEN_TRACE_EXITS=1`` writes to stderr, ``PYXEN_TRACE_EXITS=/path`` appends
to that file (``PYXEN_TRACE_TIME=1`` adds ``t=`` CLOCK_MONOTONIC seconds after
the sequence number, to line a trace up with other processes' stamps, as
bench/migprof.py does).  One line per event::

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

``PYXEN_PROFILE_EXITS=/path`` (independent of the trace) counts instead of
logging: each exit the domain process handles is put under a key (hypercall
by name and sub-op, exception by vector with the decoded instruction, MSR
index, port or CPUID leaf, kicks, MMU helper runs, blocked waits), with its
count and the time spent handling it (``perf_counter_ns`` around the handler,
in the domain process), per *phase* of the boot.  The JSON is written when a
vCPU's run loop ends (and by ``write_profile``); ``bench/exitprof.py``
summarises it.  Phases: ``builder`` from the domain's creation to the first
guest entry, then ``kernel``, then one phase per marker of
``PYXEN_PROFILE_PHASES`` (``name=regex,...``; default
``userland=Run /init as init process,prompt=[/~] # ``: Linux's message before
it executes /init, then the busybox prompt) seen on the console.  The path may
be a directory (one ``d<domid>-<name>.json`` per domain) or contain
``{domid}``.  The extra hook, ``VCPU.__init__``: ``trace.profile_vcpu(self)``,
which wraps the instance's exit handlers; nothing is wrapped when profiling is
off.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from .. import abi

if TYPE_CHECKING:
    from .hypercalls import Hypercalls

_setting = os.environ.get("PYXEN_TRACE_EXITS", "")
ENABLED = bool(_setting) and _setting != "0"
_TIMED = os.environ.get("PYXEN_TRACE_TIME", "") not in ("", "0")
_psetting = os.environ.get("PYXEN_PROFILE_EXITS", "")
PROFILE = bool(_psetting) and _psetting != "0"
DEFAULT_PHASES = "userland=Run /init as init process,prompt=[/~] # "
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
        if _TIMED:
            _out.write(f"d{domid} #{n} t={time.monotonic():.6f} {line}\n")
        else:
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
    """Hook: log every hypercall of this domain (no-op unless enabled); when
    profiling, count and time them too."""
    if PROFILE:
        _profile_table(hc)
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


# ------------------------------------------------------------ the exit profile
class Profile:
    """Counts and handling times of one domain's exits, per boot phase.

    ``stats[phase][key] = [count, total_ns, max_ns]``; ``phases`` lists
    ``(name, start perf_counter_ns, exits at start)`` in order.  Only the
    outermost handler of an exit records (``depth``): a hypercall made through
    ``syscall`` is timed from the syscall exit, under the hypercall's key."""

    def __init__(self, domid: int, name: str, markers: str) -> None:
        self.domid, self.name = domid, name
        self.t0 = time.perf_counter_ns()
        self.wall0 = time.time()
        self.phases: list[tuple[str, int, int, int]] = [("builder", self.t0, 0, 0)]
        self.stats: dict[str, dict[str, list[int]]] = {"builder": {}}
        self.markers = _parse_markers(markers)
        self.tail = ""
        self.depth = 0
        self.key: str | None = None
        self.vcpus: list[Any] = []
        self.decoded: dict[bytes, tuple[str, str]] = {}

    @property
    def phase(self) -> str:
        return self.phases[-1][0]

    def exits(self) -> int:
        return sum(v.n_exits for v in self.vcpus)

    def fast(self) -> int:
        """Instructions the CPL0 #GP fast path answered without an exit (machine.py)."""
        from .emulate import fast_path_count
        try:
            return sum(fast_path_count(v) for v in self.vcpus)
        except (ValueError, KeyError, AttributeError):  # machine closed, or no fast path
            return 0

    def enter_phase(self, name: str) -> None:
        if name != self.phase:
            self.phases.append((name, time.perf_counter_ns(), self.exits(), self.fast()))
            self.stats.setdefault(name, {})

    def record(self, key: str, ns: int) -> None:
        st = self.stats[self.phase]
        e = st.get(key)
        if e is None:
            st[key] = [1, ns, ns]
        else:
            e[0] += 1
            e[1] += ns
            if ns > e[2]:
                e[2] = ns

    def console(self, data: bytes) -> None:
        """Console sink: move to the next phase when its marker shows up."""
        if not self.markers:
            return
        self.tail = (self.tail + data.decode(errors="replace"))[-4096:]
        while self.markers:
            name, rx = self.markers[0]
            m = rx.search(self.tail)
            if m is None:
                return
            self.tail = self.tail[m.end():]
            self.markers.pop(0)
            self.enter_phase(name)

    def to_json(self) -> dict[str, Any]:
        now = time.perf_counter_ns()
        exits_now, fast_now = self.exits(), self.fast()
        out = []
        for i, (name, start, ex0, f0) in enumerate(self.phases):
            end, ex1, f1 = self.phases[i + 1][1:] if i + 1 < len(self.phases) \
                else (now, exits_now, fast_now)
            rows = sorted(((k, c, t, m) for k, (c, t, m) in self.stats.get(name, {}).items()),
                          key=lambda r: -r[2])
            out.append({"phase": name, "start_s": (start - self.t0) / 1e9,
                        "wall_s": (end - start) / 1e9, "exits": ex1 - ex0,
                        "fast_path": f1 - f0,
                        "handled_s": sum(r[2] for r in rows if not r[0].startswith("blocked")) / 1e9,
                        "blocked_s": sum(r[2] for r in rows if r[0].startswith("blocked")) / 1e9,
                        "rows": [{"key": k, "count": c, "total_ms": t / 1e6,
                                  "mean_us": t / c / 1e3, "max_us": m / 1e3}
                                 for k, c, t, m in rows]})
        return {"domid": self.domid, "name": self.name, "created": self.wall0, "phases": out}


def _parse_markers(spec: str) -> list[tuple[str, re.Pattern[str]]]:
    out = []
    for item in spec.split(","):
        if "=" in item:
            name, rx = item.split("=", 1)
            try:
                out.append((name.strip(), re.compile(rx)))
            except re.error:
                continue
    return out


_profiles: dict[int, Profile] = {}


def profile_of(domain: Any) -> Profile | None:
    """The profile of ``domain`` (in this process), if profiling is on."""
    return _profiles.get(id(domain))


def _profile_for(domain: Any) -> Profile:
    p = _profiles.get(id(domain))
    if p is None:
        p = Profile(domain.domid, domain.spec.name if hasattr(domain, "spec") else "",
                    os.environ.get("PYXEN_PROFILE_PHASES", DEFAULT_PHASES))
        _profiles[id(domain)] = p
        sinks = getattr(domain, "console_sinks", None)
        if sinks is not None:
            sinks.append(p.console)
    return p


def write_profile(domain: Any, path: str | None = None) -> str | None:
    """Write the domain's profile as JSON (where PYXEN_PROFILE_EXITS says)."""
    p = profile_of(domain)
    if p is None:
        return None
    path = path or _psetting
    if os.path.isdir(path) or path.endswith("/"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, f"d{p.domid}-{p.name or 'domain'}.json")
    else:
        path = path.replace("{domid}", str(p.domid))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(p.to_json(), f, indent=1)
    os.replace(tmp, path)
    return path


MMUEXT = {0: "PIN_L1_TABLE", 1: "PIN_L2_TABLE", 2: "PIN_L3_TABLE", 3: "PIN_L4_TABLE",
          4: "UNPIN_TABLE", 5: "NEW_BASEPTR", 6: "TLB_FLUSH_LOCAL", 7: "INVLPG_LOCAL",
          8: "TLB_FLUSH_MULTI", 9: "INVLPG_MULTI", 10: "TLB_FLUSH_ALL", 11: "INVLPG_ALL",
          12: "FLUSH_CACHE", 13: "SET_LDT", 15: "NEW_USER_BASEPTR", 16: "CLEAR_PAGE",
          17: "COPY_PAGE", 18: "MARK_SUPER", 19: "UNMARK_SUPER", 20: "FLUSH_CACHE_GLOBAL"}


def _hc_key(nr: int, args: tuple[int, ...], v: Any = None) -> str:
    name = abi.HYPERCALL_NAMES.get(nr, f"hypercall_{nr}")
    if name in ("mmu_update", "mmuext_op") and len(args) > 1:
        n = "1" if args[1] == 1 else ">1"
        if name == "mmuext_op" and v is not None:
            try:  # the first operation's command (struct mmuext_op.cmd)
                cmd = int.from_bytes(v.copy_from_guest(args[0], 4), "little")
                return f"hypercall mmuext_op MMUEXT_{MMUEXT.get(cmd, cmd)} (count {n})"
            except Exception:  # noqa: BLE001 -- profiling never changes what the guest sees
                pass
        return f"hypercall {name} (count {n})"
    sub = SUBOPS.get(name)
    if sub is not None and args:
        return f"hypercall {name} {sub.get(args[0], args[0])}"
    return f"hypercall {name}"


def _profile_table(hc: Hypercalls) -> None:
    prof = _profile_for(hc.domain)
    perf = time.perf_counter_ns
    for nr in list(hc.table):
        fn = hc.table[nr]

        def timed(v: Any, *args: int, _fn: Any = fn, _nr: int = nr) -> Any:
            if prof.depth:
                if prof.key is None:
                    prof.key = _hc_key(_nr, args, v)
                return _fn(v, *args)
            prof.depth = 1
            t = perf()
            try:
                return _fn(v, *args)
            finally:
                prof.record(_hc_key(_nr, args, v) + " (port)", perf() - t)
                prof.depth = 0
        hc.table[nr] = timed


MSR_NAMES = {0x10: "TSC", 0x1B: "APIC_BASE", 0x3A: "FEATURE_CONTROL", 0x3B: "TSC_ADJUST",
             0x48: "SPEC_CTRL", 0x8B: "UCODE_REV", 0xCE: "PLATFORM_INFO", 0x10A: "ARCH_CAPABILITIES",
             0x140: "MISC_FEATURES_ENABLES", 0x179: "MCG_CAP", 0x1A0: "MISC_ENABLE", 0x277: "PAT",
             0xC0000080: "EFER", 0xC0000100: "FS_BASE", 0xC0000101: "GS_BASE",
             0xC0000102: "SHADOW_GS_BASE", 0xC0000103: "TSC_AUX", 0xC0010015: "K8_HWCR",
             0xC0011029: "AMD64_DE_CFG", 0xC001001F: "AMD64_NB_CFG"}


def _classify_exception(prof: Profile, v: Any) -> str:
    """The key of the exception the CPL0 stub reported: vector, mode and, for
    #GP/#UD, the decoded instruction with its MSR / port / leaf."""
    r = v.kvm.regs
    stack_va0 = v.percpu["stack_top"] - 2 * 4096
    off = v.percpu["stack_off"] + (r.rsp - stack_va0)
    hv = v.machine.hv
    vec = int.from_bytes(hv[off:off + 8], "little") & 0xFF
    p = off + 8
    err = None
    if vec in (8, 10, 11, 12, 13, 14, 17, 21, 29, 30):
        err = int.from_bytes(hv[p:p + 8], "little")
        p += 8
    rip = int.from_bytes(hv[p:p + 8], "little")
    mode = "kernel" if v.kernel_mode else "user"
    name = _EXC.get(vec, f"vector {vec}")
    if vec == 14:
        return f"{name} ({mode}, err={(err or 0) & 0x1F:#x})"
    if vec not in (6, 13):
        return f"{name} ({mode})"
    try:
        code = v.copy_from_guest(rip, 15)
    except Exception:  # noqa: BLE001 -- profiling never changes what the guest sees
        try:
            code = v.copy_from_guest(rip, 4096 - (rip & 4095))
        except Exception:  # noqa: BLE001
            return f"{name} ({mode}) unreadable rip"
    dec = prof.decoded.get(code)
    if dec is None:
        dec = prof.decoded[code] = _decode_for_profile(code, rip)
    text, extra = dec
    if extra == "msr":
        idx = r.rcx & 0xFFFFFFFF
        text += f" {idx:#x}" + (f" ({MSR_NAMES[idx]})" if idx in MSR_NAMES else "")
    elif extra == "port":
        text += f" port {r.rdx & 0xFFFF:#x}"
    elif extra == "leaf":
        text += f" leaf {r.rax & 0xFFFFFFFF:#x}"
    return f"{name} {text} ({mode})" + (f" err={err:#x}" if err else "")


def _decode_for_profile(code: bytes, rip: int) -> tuple[str, str]:
    if code.startswith(b"\x0f\x0bxen\x0f\xa2"):
        return "forced cpuid", "leaf"
    try:
        import iced_x86 as ix
        ins = ix.Decoder(64, code, ip=rip).decode()
        if ins.code == ix.Code.INVALID:
            return f"invalid {code[:4].hex()}", ""
        text = ix.Formatter(ix.FormatterSyntax.GAS).format(ins)
        m = ins.mnemonic
        if m in (ix.Mnemonic.RDMSR, ix.Mnemonic.WRMSR):
            return text, "msr"
        if m == ix.Mnemonic.CPUID:
            return text, "leaf"
        if m in (ix.Mnemonic.IN, ix.Mnemonic.OUT, ix.Mnemonic.INSB, ix.Mnemonic.INSW,
                 ix.Mnemonic.INSD, ix.Mnemonic.OUTSB, ix.Mnemonic.OUTSW, ix.Mnemonic.OUTSD) \
                and "dx" in text:
            return text, "port"
        return text, ""
    except Exception:  # noqa: BLE001
        return f"undecodable {code[:4].hex()}", ""


def profile_vcpu(v: Any) -> None:
    """Hook (``VCPU.__init__``): wrap this vCPU's exit handlers to count and time them."""
    if not PROFILE:
        return
    prof = _profile_for(v.domain)
    prof.vcpus.append(v)
    perf = time.perf_counter_ns

    def outer(fn: Callable[..., Any], key_of: Callable[[], str]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            if prof.depth:
                return fn(*args)
            key = key_of()
            prof.depth, prof.key = 1, None
            t = perf()
            try:
                return fn(*args)
            finally:
                prof.record(prof.key or key, perf() - t)
                prof.depth = 0
        return timed

    v.exception = outer(v.exception, lambda: _classify_exception(prof, v))
    v.syscall_entry = outer(v.syscall_entry, lambda: "syscall from kernel: hypercall"
                            if v.kernel_mode else "syscall from user: bounce to the guest kernel")
    v.flush_mmu = outer(v.flush_mmu, lambda: "MMU helper run (queued PTEs, CR3 reload; "
                        "a KVM_RUN of its own, not in the exit count)")
    v._wait_runnable = outer(v._wait_runnable, lambda: "blocked (waiting for an event)")
    v._run_failed = outer(v._run_failed, lambda: "kick (KVM_RUN interrupted)")
    v.user_hypercall = outer(v.user_hypercall, lambda: "hypercall port from user mode (#GP)")
    v.deliver_event = outer(v.deliver_event, lambda: "event delivery (bounce, no exit)")
    run = v.run_loop

    def run_loop() -> Any:
        prof.enter_phase("kernel") if prof.phase == "builder" else None
        try:
            return run()
        finally:
            try:
                write_profile(v.domain)
            except OSError as e:
                print(f"pyxen: cannot write the exit profile: {e}", file=sys.stderr)
    v.run_loop = run_loop
