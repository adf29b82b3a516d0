"""Virtual CPUs: the run loop, the trap path and Xen's bounce frames.

Each vCPU runs in its own host thread.  The guest kernel and its user
space both run at CPL3 with Xen's flat ring-3 selectors; the hypervisor owns
CPL0 (GDT, IDT, TSS and stubs in Xen's reserved virtual range).  Three
kinds of exit reach Python:

* ``out`` to ``HC_PORT`` from the hypercall page: a hypercall, number in
  %eax, arguments in rdi, rsi, rdx, r10, r8, result in rax;
* ``out`` to ``TRAP_PORT`` from a CPL0 exception stub: the stub pushed the
  vector on the hypervisor stack above the CPU's exception frame.  The
  exception is *bounced* to the handler the guest registered with
  ``set_trap_table`` by building Xen's frame on the guest kernel stack;
* a kick (EINTR): something was posted to this vCPU (an event, a timer, a
  pause), handled before the guest runs again.

Page-table changes are applied by the vCPU itself: validated entries are
written to RAM and their addresses queued; before the guest runs again the
CPL0 MMU helper re-writes each queued entry and reloads CR3
(platform-notes.md fact 1).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from .. import abi, kvm
from ..abi import ENOSYS, XenError
from ..migration import stream as mstream
from . import atomic, emulate, ptwr, trace
from . import cpuid as cpuid_mod
from . import machine as M
from . import msr as msr_mod
from .evtchn import set_pending_bits, unmask_bits
from .hypercalls import XEN_MAJOR, XEN_MINOR
from .time import continue_clock, scale_delta, tsc_scale, write_vcpu_time

if TYPE_CHECKING:
    from .domain import Domain

X86_EFLAGS_TF, X86_EFLAGS_IF, X86_EFLAGS_IOPL, X86_EFLAGS_DF = 0x100, 0x200, 0x3000, 0x400
X86_EFLAGS_NT, X86_EFLAGS_RF, X86_EFLAGS_VM, X86_EFLAGS_AC = 0x4000, 0x10000, 0x20000, 0x40000
X86_EFLAGS_ALL = 0x3F7FD5
EXC_HAS_ERRCODE = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}
EXC_NAMES = {0: "#DE divide error", 1: "#DB debug", 2: "NMI", 3: "#BP breakpoint",
             4: "#OF overflow", 5: "#BR bound", 6: "#UD invalid opcode",
             7: "#NM device not available", 8: "#DF double fault", 10: "#TS invalid TSS",
             11: "#NP segment not present", 12: "#SS stack fault",
             13: "#GP general protection", 14: "#PF page fault", 16: "#MF x87 FPU",
             17: "#AC alignment check", 18: "#MC machine check", 19: "#XM SIMD"}
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084


def _seg(selector: int, code: bool, dpl: int) -> kvm.Segment:
    return kvm.Segment(base=0, limit=0xFFFFFFFF, selector=selector, present=1, dpl=dpl, s=1, g=1,
                       type=11 if code else 3, l=1 if code else 0, db=0 if code else 1)


GUEST_CS = _seg(abi.FLAT_KERNEL_CS, True, 3)
GUEST_SS = _seg(abi.FLAT_KERNEL_SS, False, 3)
GUEST_DS = _seg(0, False, 3)
HV_CS = _seg(abi.HYPERVISOR_CS64, True, 0)
HV_SS = _seg(abi.HYPERVISOR_DS, False, 0)


TIME_PAIR_MAX_NS = 50_000  # update_time: the widest host-clock bracket around the guest TSC read


class GuestCrash(Exception):
    """The guest did something that ends the domain (Xen's domain_crash)."""


class VCPU:
    """One virtual CPU of a domain."""

    def __init__(self, domain: Domain, vcpu_id: int) -> None:
        self.domain = domain
        self.id = vcpu_id
        self.machine = domain.machine
        self.kvm = domain.machine.vm.create_vcpu()
        self.percpu = domain.machine.percpu[vcpu_id]
        # Xen PV vCPU state
        self.kernel_mode = True
        self.kernel_l4 = 0  # mfn
        self.user_l4 = 0
        self.kernel_ss = abi.FLAT_KERNEL_SS
        self.kernel_sp = 0
        self.trap_table: dict[int, tuple[int, int, int]] = {}  # vector -> (flags, cs, addr)
        self.event_callback = 0
        self.failsafe_callback = 0
        self.syscall_callback = 0
        self.syscall_mask_events = False
        self.failsafe_mask_events = False
        self.syscall32_callback = 0
        self.syscall32_mask_events = False
        self.sysenter_callback = 0
        self.sysenter_mask_events = False
        self.nmi_callback = 0
        self.fs_base = 0
        self.gs_base_kernel = 0
        self.gs_base_user = 0
        self.gs_sel_user = 0  # SEGBASE_GS_USER_SEL's selector (RPL fixed up as Xen)
        self.virtual_ts = False
        self.iobmp, self.iobmp_nr = 0, 0  # PHYSDEVOP_set_iobitmap (guest VA, ports)
        self.iopl = 0  # PHYSDEVOP_set_iopl's virtual IOPL, 0-3 (the in/out/cli/sti emulator reads it)
        # debug registers as set_debugreg keeps them (Xen's arch.dr[], dr6, dr7, pv.dr7_emul);
        # stored and reported, not loaded into the CPU (docs/hv.md)
        self.dr = [0, 0, 0, 0]
        self.dr6 = 0xFFFF0FF0  # X86_DR6_DEFAULT
        self.dr7 = 0x400  # X86_DR7_DEFAULT
        self.dr7_emul = 0
        self.gdt_frames: list[int] = []  # set_gdt frames (typed seg_desc)
        self.up = vcpu_id == 0
        self.initialised = vcpu_id == 0  # has a register state (VCPUOP_up needs one)
        # vcpu_info location: (buffer, offset); shared_info slot by default
        self.vi_buf: memoryview = domain.shared_info
        self.vi_off = vcpu_id * abi.VCPU_INFO_SIZE
        self._addr_cache: tuple[memoryview, memoryview, int, int] | None = None
        self.vi_mfn = 0  # guest frame holding vcpu_info after register_vcpu_info
        # timers
        self.timer_deadline = 0  # system time ns, 0 = off
        self.periodic_ns = 0
        self.periodic_next = 0
        # scheduling
        self.cond = threading.Condition()
        self.inbox: list[tuple[int, int]] = []  # (kind, arg)
        self.blocked = False
        self.poll_ports: list[int] | None = None
        self.poll_deadline = 0
        self.paused = 0
        self.stop = False
        self.flush_requested = False
        self.attention = True  # the run loop must look at posted work before entering
        self.n_exits = 0
        # KVM_RUN ended early (a kick) since the last check: an exception may be
        # in flight (deliver_event); after a hypercall or trap exit none can be
        self.run_interrupted = True
        self.n_hypercalls = 0
        # the `syscall` stub's is_up fast path (machine.syscall_stub_code): armed
        # by emulate.refresh_fast_path once a `syscall` was seen arriving at CPL3
        self.syscall_cpl3 = False
        self.syscall_fast_armed = False
        # the last hypercall was an mmu_update whose queued entries may wait (after_hypercall)
        self.mmu_defer = False
        self.thread: threading.Thread | None = None
        # runstate
        self.runstate = abi.RUNSTATE_running if self.up else abi.RUNSTATE_offline
        self.runstate_entry = 0
        self.runstate_time = [0, 0, 0, 0]
        self.runstate_area = 0  # guest VA of VCPUOP_register_runstate_memory_area, 0 = none
        self.time_area = 0  # guest VA of VCPUOP_register_vcpu_time_memory_area, 0 = none
        # statistics (pyxen top)
        self.stats = {"exceptions": 0, "events": 0, "kicks": 0, "mmu_flushes": 0}
        self.hc_counts: dict[int, int] = {}
        # time scale
        self.tsc_khz = self.kvm.tsc_khz()
        self.tsc_mul, self.tsc_shift = tsc_scale(self.tsc_khz)
        self.time_lock = threading.Lock()  # update_time's writers (own thread, register_vcpu_info)
        self.time_updated_ns = 0  # host time of the last update_time (0: none yet; the slew's interval)
        # emulated privileged state (emulate.py): PHYSDEVOP_set_iopl's virtual IOPL
        # (0-3), Xen's view of CR4 (pv_fixup_guest_cr4) and the MSRs Xen keeps per
        # vCPU (the debug registers are dr/dr6/dr7 above, shared with set_debugreg)
        self.guest_cr4 = emulate.HOST_CR4_VISIBLE
        self.msrs = msr_mod.VcpuMsrs()
        self._setup_cpu()
        trace.profile_vcpu(self)  # PYXEN_PROFILE_EXITS (no-op by default)

    # ------------------------------------------------------------ CPU state
    def _setup_cpu(self) -> None:
        v = self.kvm
        # Xen's PV CPUID policy, for plain `cpuid` (KVM's table) and for the
        # forced-emulation prefix (emulate.py) alike
        host = kvm.system().supported_cpuid()
        nbits = (M.MFN_BASE + self.machine.nr_frames - 1).bit_length() + 12
        self.cpuid_policy = cpuid_mod.pv_policy(
            [(e.function, e.index, (e.eax, e.ebx, e.ecx, e.edx))
             for e in host.entries[:host.nent]],  # type: ignore[attr-defined]
            (XEN_MAJOR, XEN_MINOR), self.tsc_khz, self.tsc_mul, self.tsc_shift, nbits)
        self.msr_policy = msr_mod.MsrPolicy(self.cpuid_policy)
        v.set_cpuid(cpuid_mod.to_kvm(self.cpuid_policy))
        s = v.sregs
        s.cs = GUEST_CS
        s.ss = GUEST_SS
        s.ds = GUEST_DS
        s.es = GUEST_DS
        s.fs = GUEST_DS
        s.gs = GUEST_DS
        s.tr = kvm.Segment(base=self.percpu["tss_va"], limit=M.TSS_LIMIT,
                           selector=abi.TSS_SELECTOR, type=11, present=1)
        s.ldt = kvm.Segment(selector=0, type=2, present=1, unusable=0, limit=0xFFFF)
        s.gdt.base = self.percpu["gdt_va"]
        s.gdt.limit = 0xFFFF
        s.idt.base = self.machine.idt_va
        s.idt.limit = 256 * 16 - 1
        s.cr0 = 0x80050033  # PG|AM|WP|NE|ET|MP|PE
        s.cr4 = 0x20 | 0x200 | 0x400  # PAE|OSFXSR|OSXMMEXCPT
        s.efer = 0xD01  # NXE|LMA|LME|SCE
        v.mark_sregs_dirty()
        # `syscall` enters the hypervisor's stub, which reports to SYSCALL_PORT;
        # sysret is never used, STAR's upper selector only mirrors Xen's flat ones
        # (each vCPU its own entry, so its fast path knows it).  IF is not masked:
        # on PVM the stub runs at CPL3, where it could not set IF again when its
        # fast path returns straight to the guest; no interrupt is ever injected
        v.set_msrs({MSR_LSTAR: self.machine.syscall_stub_va(self.id),
                    MSR_CSTAR: self.machine.syscall_compat_va,
                    MSR_STAR: (abi.HYPERVISOR_CS64 << 32) | (abi.FLAT_RING3_CS32 << 48),
                    MSR_SYSCALL_MASK: X86_EFLAGS_TF | 0x400 | X86_EFLAGS_NT | X86_EFLAGS_AC})

    def set_initial_state(self, rip: int, rsp: int, rsi: int, l4_mfn: int) -> None:
        r = self.kvm.regs
        ctypes.memset(ctypes.addressof(r), 0, ctypes.sizeof(r))
        r.rip, r.rsp, r.rsi, r.rflags = rip, rsp, rsi, 0x202
        self.kvm.sregs.cr3 = l4_mfn << 12
        self.kernel_l4 = l4_mfn
        self.kvm.mark_regs_dirty()
        self.kvm.mark_sregs_dirty()
        self.kvm.flush_state()

    # ------------------------------------------------------------ vcpu_info
    def vi_get(self, off: int) -> int:
        return self.vi_buf[self.vi_off + off]

    def vi_set(self, off: int, val: int) -> None:
        self.vi_buf[self.vi_off + off] = val

    def update_time(self) -> None:
        """Publish (guest TSC, system time) as one instant.  The TSC comes from
        an ioctl: the host clock is read on both sides of it and the pair kept
        only when the two readings are close (the midpoint then errs by at
        most half the gap); a thread preempted between them (a loaded host)
        would otherwise pair a late clock with an early TSC and run the
        guest's clock ahead by the preemption.  Without a close pair the
        record stays on its previous TSC line; time.continue_clock keeps the
        guest's clock from stepping back at an update.  One writer at a time
        (time_lock): register_vcpu_info may update another vCPU's record."""
        clock = self.domain.clock
        with self.time_lock:
            best: tuple[int, int, int] | None = None
            for _ in range(8):
                t0 = clock.system_time()
                tsc = self.kvm.get_msrs([kvm.MSR_IA32_TSC])[0]
                t1 = clock.system_time()
                if best is None or t1 - t0 < best[1] - best[0]:
                    best = (t0, t1, tsc)
                if t1 - t0 <= TIME_PAIR_MAX_NS:
                    break
            assert best is not None
            t0, t1, tsc = best
            off = self.vi_off + abi.VI_TIME
            _, _, tsc0, sys0, mul0, shift0, _ = abi.VCPU_TIME_INFO.unpack_from(self.vi_buf, off)
            # the first record of this VCPU object starts a new line: a restored
            # domain's saved record counts another VM's TSC
            prev = (tsc0, sys0, mul0, shift0) if self.time_updated_ns else None
            now, mul = continue_clock(prev, tsc, (t0 + t1) // 2,
                                      t1 - t0 <= TIME_PAIR_MAX_NS, self.tsc_mul, self.tsc_shift,
                                      max(t1 - self.time_updated_ns, 1_000_000))
            self.time_updated_ns = t1
            write_vcpu_time(self.vi_buf, off, tsc, now, mul, self.tsc_shift)
            if self.time_area:
                self.update_time_area()

    def update_time_area(self) -> None:
        """Copy vcpu_time_info to the area of VCPUOP_register_vcpu_time_memory_area
        (Linux's vDSO pvclock page) with the version protocol: odd while the
        record is being written, as Xen's write of the guest copy.  Through the
        guest kernel's page tables; a bad address is ignored, as on Xen."""
        off = self.vi_off + abi.VI_TIME
        rec = bytes(self.vi_buf[off:off + abi.VCPU_TIME_INFO.size])
        version = int.from_bytes(rec[:4], "little")
        try:
            self._kernel_write(self.time_area, ((version - 1) & 0xFFFFFFFF | 1).to_bytes(4, "little"))
            self._kernel_write(self.time_area + 4, rec[4:])
            self._kernel_write(self.time_area, rec[:4])
        except XenError:
            pass

    def guest_time_now(self) -> int:
        """What the guest's own clock reads now (for tests and tracing)."""
        off = self.vi_off + abi.VI_TIME
        _, _, tsc0, sys0, mul, shift, _ = abi.VCPU_TIME_INFO.unpack_from(self.vi_buf, off)
        tsc = self.kvm.get_msrs([kvm.MSR_IA32_TSC])[0]
        return int(sys0 + scale_delta(tsc - tsc0, mul, shift))

    # ------------------------------------------------------------ posting work
    POST_PORT, POST_TIMER, POST_WAKE, POST_FLUSH, POST_UNMASK = 0, 1, 2, 3, 4

    def post(self, kind: int, arg: int = 0) -> None:
        """Hand work to this vCPU's thread from any thread; wakes or kicks it."""
        with self.cond:
            self.inbox.append((kind, arg))
            self.attention = True
            if self.blocked or self.paused or not self.up:
                self.cond.notify_all()
                hub = self.domain.evtchn.hub  # a blocked vCPU may sleep in the native pump's wait
                if hub is not None:
                    hub.wake(self.id)
                return
        if threading.get_ident() != self.kvm.thread_id:
            self.stats["kicks"] += 1
            self.kvm.kick()

    def _drain_inbox(self) -> None:
        hub = self.domain.evtchn.hub  # ports another domain process sent us (evt.c)
        if hub is not None and threading.get_ident() == self.kvm.thread_id:
            hub.deliver(self)
        with self.cond:
            items, self.inbox = self.inbox, []
        for kind, arg in items:
            if kind == self.POST_PORT:
                self.set_pending(arg)
            elif kind == self.POST_FLUSH:
                self.flush_requested = True
            elif kind == self.POST_UNMASK:
                self.unmask(arg)

    def _event_addrs(self) -> tuple[int, int]:
        """Host addresses of shared_info and of the page holding our vcpu_info
        (recomputed when VCPUOP_register_vcpu_info moved it)."""
        c = self._addr_cache
        si, vi = self.domain.shared_info, self.vi_buf
        if c is None or c[0] is not si or c[1] is not vi:
            c = (si, vi, atomic.view_address(si), atomic.view_address(vi))
            self._addr_cache = c
        return c[2], c[3]

    def set_pending(self, port: int) -> None:
        """Mark ``port`` pending (vCPU thread only)."""
        si_addr, vi_addr = self._event_addrs()
        set_pending_bits(self.domain.shared_info, self.vi_buf, self.vi_off, port, si_addr, vi_addr)

    def unmask(self, port: int) -> None:
        si_addr, vi_addr = self._event_addrs()
        unmask_bits(self.domain.shared_info, self.vi_buf, self.vi_off, port, si_addr, vi_addr)

    # ------------------------------------------------------------ timers
    def check_timers(self, now: int) -> int:
        """Fire due timers; return the next deadline (0 = none)."""
        nxt = 0
        fired = False
        if self.timer_deadline and now >= self.timer_deadline:
            self.timer_deadline = 0
            self.domain.evtchn.raise_virq(abi.VIRQ_TIMER, self.id)
            fired = True
        if self.periodic_ns and now >= self.periodic_next:
            self.periodic_next = now + self.periodic_ns
            self.domain.evtchn.raise_virq(abi.VIRQ_TIMER, self.id)
            fired = True
        if fired and threading.get_ident() == self.kvm.thread_id:
            self.update_time()  # as Xen does on each timer tick: no drift accumulates
        for d in (self.timer_deadline, self.periodic_next if self.periodic_ns else 0,
                  self.poll_deadline if self.poll_ports is not None else 0):
            if d and (not nxt or d < nxt):
                nxt = d
        return nxt

    def set_timer(self, deadline: int) -> None:
        self.timer_deadline = deadline
        self.domain.timers.schedule(self, deadline)

    # ------------------------------------------------------------ run loop
    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name=f"d{self.domain.domid}v{self.id}",
                                       daemon=True)
        self.thread.start()

    def _thread_main(self) -> None:
        self.kvm.bind_thread()
        try:
            self.run_loop()
        except GuestCrash as e:
            self.domain.crash(str(e), self.register_dump())
        except Exception as e:  # a hypervisor bug: contained to this domain
            self.domain.crash(f"hypervisor error: {e!r}\n{traceback.format_exc()}",
                              self.register_dump())
        finally:
            self.kvm.thread_id = None
            hub = self.domain.evtchn.hub  # the native pump must not kick us any more
            if hub is not None:
                hub.detach(self)

    def _set_runstate(self, st: int) -> None:
        now = self.domain.clock.system_time()
        self.runstate_time[self.runstate] += now - self.runstate_entry
        self.runstate = st
        self.runstate_entry = now
        if self.runstate_area:
            self.update_runstate_area()

    def update_runstate_area(self) -> None:
        """Copy the runstate into the area the guest registered with
        VCPUOP_register_runstate_memory_area, as Xen's update_runstate_area:
        through the guest kernel's page tables (even while user mode runs),
        and with VMASST_TYPE_runstate_update_flag the XEN_RUNSTATE_UPDATE bit
        is set in state_entry_time while the copy is under way, so a reader on
        another vCPU can retry.  A bad address is ignored, as on Xen."""
        va = self.runstate_area
        info = abi.RUNSTATE_INFO.pack(self.runstate, self.runstate_entry, *self.runstate_time)
        flag = self.domain.vm_assist >> abi.VMASST_TYPE_runstate_update_flag & 1
        try:
            if flag:
                self._kernel_write(va + 8, struct.pack("<Q", self.runstate_entry
                                                       | abi.XEN_RUNSTATE_UPDATE))
            self._kernel_write(va, info[:8] + (struct.pack("<Q", self.runstate_entry
                                                           | abi.XEN_RUNSTATE_UPDATE)
                                               if flag else info[8:16]) + info[16:])
            if flag:
                self._kernel_write(va + 8, info[8:16])
        except XenError:
            pass

    def _kernel_write(self, va: int, data: bytes) -> None:
        """Write ``data`` at ``va`` through the guest kernel's page tables (any
        thread: the vCPU's mode is not touched), or EFAULT with nothing written."""
        if va + len(data) > 1 << 64:
            raise XenError(abi.EFAULT, f"guest range at {va:#x} wraps")
        ft = self.domain.ft
        base = M.MFN_BASE << 12
        spans = []
        i = 0
        while i < len(data):
            ma = ft.translate(self.kernel_l4, va + i, True)
            if ma is None:
                raise XenError(abi.EFAULT, f"guest address {va + i:#x} not writable")
            k = min(len(data) - i, 4096 - ((va + i) & 4095))
            spans.append((ma - base, i, k))
            i += k
        ram = self.machine.ram
        for off, i, k in spans:
            ram[off:off + k] = data[i:i + k]
            self.domain.mark_dirty((off >> 12) + M.MFN_BASE)

    def _wait_runnable(self) -> bool:
        """Sleep while paused, offline or blocked.  False if the vCPU must stop."""
        while True:
            if self.stop:
                return False
            now = self.domain.clock.system_time()
            nxt = self.check_timers(now)
            self._drain_inbox()
            with self.cond:
                if self.stop:
                    return False
                if self.paused or not self.up:
                    self.cond.wait(0.5)
                    continue
                if self.blocked:
                    if self._wake_condition():
                        self.blocked = False
                        self.poll_ports = None
                        self._set_runstate(abi.RUNSTATE_running)
                        return True
                    if self.inbox:
                        continue
                    timeout = max(0.0, min((nxt - now) / 1e9 if nxt else 1.0, 1.0))
                    hub = self.domain.evtchn.hub
                    if hub is None:
                        self.cond.wait(timeout)
                        continue
                    self.cond.release()  # the pump wakes us without Python (evt.c)
                    try:
                        hub.wait(self, timeout)
                    finally:
                        self.cond.acquire()
                    continue
                return True

    def _wake_condition(self) -> bool:
        if self.poll_ports is not None:
            si = self.domain.shared_info
            for p in self.poll_ports:
                word, bit = divmod(p, 64)
                off = abi.SI_EVTCHN_PENDING + word * 8
                if int.from_bytes(si[off:off + 8], "little") >> bit & 1:
                    return True
            if self.poll_deadline and self.domain.clock.system_time() >= self.poll_deadline:
                return True
            return False
        return bool(self.vi_get(abi.VI_UPCALL_PENDING))

    def run_loop(self) -> None:
        """The vCPU's life: enter the guest, handle the exit, repeat.

        This is the hot path of every hypercall, so it reads the exit and the
        registers straight from the kvm_run page through memoryviews and
        dispatches inline.  Anything unusual (posted work, blocking, pause,
        MMU flushes) raises ``self.attention`` and is handled off the fast path."""
        v = self.kvm
        if not v.sync:
            return self._run_loop_nosync()
        q, d32, w16 = v.q, v.d, v.w
        fd = v.fd
        enter = kvm._ioctl
        KVM_RUN = kvm.KVM_RUN
        dom = self.domain
        table = dom.hypercalls.table
        counts = dom.hypercalls.counts
        MASK = (1 << 64) - 1
        EXIT_IO, HC, TRAP = kvm.EXIT_IO, M.HC_PORT, M.TRAP_PORT
        Q_RAX, Q_DIRTY, Q_RDI, Q_RSI, Q_RDX, Q_R10, Q_R8 = (kvm.Q_RAX, kvm.Q_DIRTY, kvm.Q_RDI,
                                                            kvm.Q_RSI, kvm.Q_RDX, kvm.Q_R10, kvm.Q_R8)
        while True:
            if self.attention:
                if not self._attend():
                    return
            vi = self.vi_buf
            vo = self.vi_off
            if vi[vo] and not vi[vo + 1]:
                self.deliver_event()
            if enter(fd, KVM_RUN, None) < 0:
                self._run_failed()
                continue
            self.n_exits += 1
            if d32[2] == EXIT_IO:
                port = w16[17]
                if port == HC:
                    if not self.kernel_mode:
                        self.user_hypercall()
                        continue
                    nr = q[Q_RAX]  # all 64 bits, as Xen: 0x100000011 is not xen_version
                    fn = table.get(nr)
                    self.n_hypercalls += 1
                    if nr < 64:
                        counts[nr] += 1
                    if fn is None:
                        q[Q_RAX] = -ENOSYS & MASK
                        q[Q_DIRTY] |= 1
                        continue
                    try:
                        res = fn(self, q[Q_RDI], q[Q_RSI], q[Q_RDX], q[Q_R10], q[Q_R8])
                    except XenError as e:
                        res = -e.errno
                    if res is not None:
                        q[Q_RAX] = res & MASK
                        q[Q_DIRTY] |= 1
                    self.after_hypercall()
                elif port == TRAP:
                    self.exception()
                elif port == M.SYSCALL_PORT:
                    self.syscall_entry()
                else:
                    raise GuestCrash(f"unexpected I/O exit on port {port:#x}")
            else:
                self._other_exit(d32[2])

    def _run_failed(self) -> None:
        e = ctypes.get_errno()
        if e in (errno.EINTR, errno.EAGAIN):
            self.kvm.run_struct.immediate_exit = 0
            self.attention = True
            self.run_interrupted = True
            return
        raise GuestCrash(f"KVM_RUN failed: {os.strerror(e)}")

    def _other_exit(self, reason: int) -> None:
        if reason == kvm.EXIT_SHUTDOWN:
            raise GuestCrash("triple fault (the CPU shut down)")
        if reason == kvm.EXIT_INTR:
            self.run_interrupted = True
            return
        raise GuestCrash(f"unexpected KVM exit {kvm.EXIT_NAMES.get(reason, reason)}")

    def after_hypercall(self) -> None:
        """The one step after every hypercall, whichever way it came in (the
        hypercall page's port or `syscall`): page-table entries the hypercall
        queued and TLB flushes it asked for must be applied by the MMU helper
        before the guest runs again (platform-notes.md fact 1), so the run loop
        is told to attend.  Event delivery follows in the run loop, as Xen's
        test_all_events does after pv_hypercall.  The #GP fast path's
        permission word is rewritten: a base pointer, the virtual IOPL or a VM
        assist may have changed (emulate.refresh_fast_path).

        Except after an mmu_update that changed only L1 entries whose old
        frames are the domain's own, in a one-vCPU domain (``mmu_defer``, set
        by Hypercalls.do_mmu_update): Xen's mmu_update does not flush the TLB
        (the guest flushes when it needs to), so those entries stay queued
        until the next hypercall that is not such an mmu_update, or any other
        exit that attends; the one helper run then applies them all.  Until
        then the guest may still see the old translations, as a TLB may hold
        them on Xen; no frame changes type meanwhile (only L1 entries
        changed), and every other exit runs the helper before the guest
        resumes, so a frame never becomes a page table, descriptor page or
        another domain's while a stale writable translation of it remains.
        A #PF taken meanwhile is retried after the helper run first
        (``exception``): the fault may be the stale translation's, which Xen's
        spurious_page_fault would not deliver either."""
        emulate.refresh_fast_path(self)
        if self.mmu_defer:
            self.mmu_defer = False
            if self.flush_requested:
                self.attention = True
        elif self.domain.mmu_pending or self.flush_requested:
            self.attention = True

    def _attend(self) -> bool:
        """Off the fast path: posted work, blocking, pause, stop, MMU flushes."""
        self.attention = False
        hub = self.domain.evtchn.hub  # a kick from the native pump: ports to mark pending
        if hub is not None:
            hub.deliver(self)
        if self.inbox or self.blocked or self.paused or self.stop or not self.up:
            if not self._wait_runnable():
                return False
            self.check_timers(self.domain.clock.system_time())
        if self.domain.mmu_pending or self.flush_requested:
            self.flush_mmu()
        if self.syscall_fast_armed and self.vi_buf[self.vi_off + abi.VI_UPCALL_PENDING]:
            emulate.syscall_fast_off(self)  # an upcall is pending: hypercalls must exit
        return True

    def _run_loop_nosync(self) -> None:
        """Without KVM_CAP_SYNC_REGS: the same loop through GET/SET ioctls."""
        v = self.kvm
        hypercall = self.domain.hypercalls.dispatch
        while True:
            if self.attention and not self._attend():
                return
            if self.vi_buf[self.vi_off] and not self.vi_buf[self.vi_off + 1]:
                self.deliver_event()
            r = v.run()
            self.n_exits += 1
            if r == -1:
                self.attention = True
                self.run_interrupted = True
            elif r == kvm.EXIT_IO:
                port = v.run_struct.exit.io.port
                if port == M.HC_PORT and not self.kernel_mode:
                    self.user_hypercall()
                elif port == M.HC_PORT:
                    hypercall(self, v.regs)
                    self.after_hypercall()
                elif port == M.TRAP_PORT:
                    self.exception()
                elif port == M.SYSCALL_PORT:
                    self.syscall_entry()
                else:
                    raise GuestCrash(f"unexpected I/O exit on port {port:#x}")
            else:
                self._other_exit(r)

    # ------------------------------------------------------------ MMU helper
    def flush_mmu(self, new_cr3_mfn: int | None = None) -> None:
        """Have the vCPU re-write queued page-table entries and reload CR3."""
        d = self.domain
        with d.mmu_lock:
            addrs = list(d.mmu_pending)
            d.mmu_pending.clear()
        self.flush_requested = False
        cap = self.percpu["list_pages"] * 512 - 1
        cr3 = (new_cr3_mfn << 12) if new_cr3_mfn is not None else self.kvm.sregs.cr3
        hv = self.machine.hv
        lo = self.percpu["list_off"]
        first = True
        while first or addrs:
            first = False
            chunk, addrs = addrs[:cap], addrs[cap:]
            struct.pack_into(f"<Q{len(chunk)}Q", hv, lo, len(chunk), *chunk)
            self._run_helper(cr3)
        self.stats["mmu_flushes"] += 1

    def _run_helper(self, cr3: int) -> None:
        v = self.kvm
        saved_r = kvm.Regs.from_buffer_copy(v.regs)
        saved_s = kvm.Sregs.from_buffer_copy(v.sregs)
        r, s = v.regs, v.sregs
        r.rip = self.machine.helper_va
        r.rsi = self.percpu["list_va"]
        r.rdx = cr3
        r.rsp = self.percpu["stack_top"]
        r.rflags = 0x2
        s.cs = HV_CS
        s.ss = HV_SS
        v.mark_regs_dirty()
        v.mark_sregs_dirty()
        while True:
            rc = v.run()
            if rc != -1:
                break
            # a kick (an event for this vCPU) ended the helper's KVM_RUN: the run
            # loop must still attend to it (hub.deliver), or its ports wait
            self.attention = True
        if rc != kvm.EXIT_IO or v.run_struct.exit.io.port != M.HELPER_PORT:
            raise GuestCrash(f"MMU helper failed: exit {kvm.EXIT_NAMES.get(rc, rc)} "
                             f"rip={v.regs.rip:#x}")
        ctypes.memmove(ctypes.addressof(v.regs), ctypes.addressof(saved_r), ctypes.sizeof(saved_r))
        saved_s.cr3 = cr3
        saved_s.cr2 = v.sregs.cr2
        ctypes.memmove(ctypes.addressof(v.sregs), ctypes.addressof(saved_s), ctypes.sizeof(saved_s))
        v.mark_regs_dirty()
        v.mark_sregs_dirty()

    # ------------------------------------------------------------ guest memory
    @property
    def current_l4(self) -> int:
        return self.kernel_l4 if self.kernel_mode else self.user_l4

    def copy_from_guest(self, va: int, n: int) -> bytes:
        """Read ``n`` bytes at guest virtual ``va`` (as the guest could), or EFAULT."""
        out = bytearray()
        ft = self.domain.ft
        ram = self.machine.ram
        base = M.MFN_BASE << 12
        l4 = self.current_l4
        while n > 0:
            ma = ft.translate(l4, va, False)
            if ma is None:
                raise XenError(abi.EFAULT, f"guest address {va:#x} not readable")
            k = min(n, 4096 - (va & 4095))
            off = ma - base
            out += ram[off:off + k]
            va += k
            n -= k
        return bytes(out)

    def copy_to_guest(self, va: int, data: bytes) -> None:
        ft = self.domain.ft
        ram = self.machine.ram
        base = M.MFN_BASE << 12
        l4 = self.current_l4
        i = 0
        n = len(data)
        # check all pages first so a fault writes nothing
        spans = []
        while i < n:
            ma = ft.translate(l4, va + i, True)
            if ma is None:
                raise XenError(abi.EFAULT, f"guest address {va + i:#x} not writable")
            k = min(n - i, 4096 - ((va + i) & 4095))
            spans.append((ma - base, i, k))
            i += k
        for off, i, k in spans:
            ram[off:off + k] = data[i:i + k]
            self.domain.mark_dirty((off >> 12) + M.MFN_BASE)

    # ------------------------------------------------------------ exceptions
    def exception(self) -> None:
        v = self.kvm
        r = v.regs
        stack_va0 = self.percpu["stack_top"] - 2 * 4096
        off = self.percpu["stack_off"] + (r.rsp - stack_va0)
        hv = self.machine.hv
        vec = struct.unpack_from("<Q", hv, off)[0] & 0xFF
        err = None
        p = off + 8
        if vec in EXC_HAS_ERRCODE:
            err = struct.unpack_from("<Q", hv, p)[0]
            p += 8
        rip, cs, rflags, rsp, ss = struct.unpack_from("<5Q", hv, p)
        trace.trap(self, vec, err, rip, cs)  # PYXEN_TRACE_EXITS (no-op by default)
        self.stats["exceptions"] += 1
        # back to the guest context as the CPU saw it
        r.rip, r.rsp, r.rflags = rip, rsp, rflags
        s = v.sregs
        s.cs = GUEST_CS
        s.ss = GUEST_SS
        v.mark_regs_dirty()
        v.mark_sregs_dirty()
        if cs & 3 != 3:
            raise GuestCrash(f"exception {vec} in hypervisor code at {rip:#x} (err={err})")
        if self.domain.mmu_pending:
            # L1 updates left queued (after_hypercall): apply them now; a #PF
            # may be theirs (a stale translation), so the instruction runs again
            self.flush_mmu()
            if vec == 14:
                return
        if vec == 14 and emulate.handle_m2p_fault(self, s.cr2):
            return  # a load from Xen's fixed M2P address (platform-notes.md)
        if vec == 14:
            if err is not None and ptwr.handle_fault(self, rip, s.cr2, err):
                return  # writable page tables: the write was emulated
            struct.pack_into("<Q", self.vi_buf, self.vi_off + abi.VI_CR2, s.cr2)
        if vec == 7 and self.virtual_ts:
            # lazy FPU switch: the guest asked for #NM with fpu_taskswitch(1)
            self.virtual_ts = False
            s.cr0 &= ~0x8
        if vec in (6, 13) and self._emulate_int(rip, err):
            return
        if vec in (6, 13) and emulate.handle_exception(self, vec, err):
            return  # Xen's emulated privileged/forced-invalid instructions
        self.bounce_trap(vec, err)

    def user_hypercall(self) -> None:
        """Guest user mode reached the hypercall port.  Hypercalls belong to the
        guest kernel (on Xen user mode cannot make them at all), so this is what
        `out` without I/O privilege is on hardware: #GP(0) at the instruction."""
        r = self.kvm.regs
        r.rip = (r.rip - 2) & ((1 << 64) - 1)  # back to the 2-byte `out %al,$imm8`
        self.kvm.mark_regs_dirty()
        self.bounce_trap(13, 0)

    def syscall_entry(self) -> None:
        """The guest executed `syscall` (the CPU left the return RIP in rcx and
        RFLAGS in r11).  As Xen's lstar_enter: from guest kernel mode it is a
        hypercall (number in rax, arguments in rdi, rsi, rdx, r10, r8, as through
        the hypercall page), followed by the same post-hypercall step and event
        delivery as the port path; the return is Xen's sysret, so rcx holds the
        return RIP and r11 the RFLAGS.  From guest user mode it is bounced to the
        registered syscall callback (syscall32 for a 32-bit code segment) in
        kernel mode with DF clear in the callback, or raises #UD at the
        `syscall` where no callback is registered (DF kept)."""
        v = self.kvm
        r, s = v.regs, v.sregs
        compat = s.cs.selector == abi.FLAT_RING3_CS32
        if s.cs.dpl != 3 or s.cs.selector != abi.FLAT_KERNEL_CS:
            s.cs = GUEST_CS
            s.ss = GUEST_SS
            v.mark_sregs_dirty()
        elif not self.syscall_cpl3:
            self.syscall_cpl3 = True  # the stub runs at CPL3 here: its fast path may be armed
        r.rip = r.rcx
        r.rflags = (r.r11 & X86_EFLAGS_ALL & ~(X86_EFLAGS_IOPL | X86_EFLAGS_VM)) | X86_EFLAGS_IF | 0x2
        v.mark_regs_dirty()
        if self.kernel_mode:
            r.r11 = r.rflags  # sysret's view; an iret hypercall replaces it from its frame
            self.domain.hypercalls.dispatch(self, r)
            self.after_hypercall()
            return
        handler = self.syscall32_callback if compat else self.syscall_callback
        if not handler:
            r.rip = (r.rcx - 2) & ((1 << 64) - 1)
            self.bounce_trap(6, None)
            return
        self.bounce(handler, None, self.syscall32_mask_events if compat else self.syscall_mask_events)
        r.rflags &= ~X86_EFLAGS_DF  # the PV ABI's fixed SYSCALL_MASK: DF clear in the callback

    def _emulate_int(self, rip: int, err: int | None) -> bool:
        """Software interrupts as Xen delivers them to a PV kernel.  Here `int $n`
        at CPL3 raises #UD (platform-notes.md fact 4), or #GP through pyxen's
        DPL-0 IDT gates on VT-x; Xen's IDT is DPL 0 too and its #GP handler
        (do_general_protection, permit_softint) decides:

        * `int3` and `int $3`/`int $4`: Xen's gates 3 and 4 are DPL 3, so they
          are #BP/#OF traps whatever DPL the guest gave them;
        * `int $0x80` with a registered handler is delivered whatever its DPL
          (Xen's entry_int80 fast path);
        * `int $n` whose trap-table DPL is at least 1 (guest kernel mode) or 3
          (guest user mode) is delivered to the handler, after the instruction;
        * anything else, including a vector with no gate (DPL 0), is #GP with
          the IDT error code ``(n << 3) | 2`` at the `int` itself."""
        try:
            code = self.copy_from_guest(rip, 2)
        except XenError:
            try:
                code = self.copy_from_guest(rip, 1)
            except XenError:
                return False
        if code[0] == 0xCC:
            self.kvm.regs.rip = rip + 1
            self.kvm.mark_regs_dirty()
            self.bounce_trap(3, None)
            return True
        if code[0] != 0xCD or len(code) < 2:
            return False
        n = code[1]
        if n in (3, 4):
            self.kvm.regs.rip = rip + 2
            self.kvm.mark_regs_dirty()
            self.bounce_trap(n, None)
            return True
        ent = self.trap_table.get(n)
        dpl = ent[0] & 3 if ent is not None else 0
        if n == 0x80 and ent is not None:
            dpl = 3  # Xen's entry_int80: a DPL-3 gate, the guest's DPL is not checked
        if dpl < (1 if self.kernel_mode else 3) or ent is None:
            self.kvm.regs.rip = rip
            self.kvm.mark_regs_dirty()
            self.bounce_trap(13, (n << 3) | 2)
            return True
        if not ent[2]:
            raise GuestCrash(f"int ${n:#x}: trap table entry has no handler address")
        self.kvm.regs.rip = rip + 2
        self.kvm.mark_regs_dirty()
        self.bounce(ent[2], None, bool(ent[0] & 4))
        return True

    def bounce_trap(self, vec: int, err: int | None) -> None:
        """Xen's pv_inject_event for a hardware exception."""
        if vec == 14 and err is not None:
            # The guest kernel runs at CPL3, so the CPU always sets the U bit;
            # Xen reports it as the guest's mode: clear in guest kernel mode.
            err = (err & ~ptwr.PFEC_USER) | (0 if self.kernel_mode else ptwr.PFEC_USER)
        ent = self.trap_table.get(vec)
        if ent is None or not ent[2]:
            raise GuestCrash(f"unhandled {EXC_NAMES.get(vec, f'exception {vec}')}"
                             + (f" err={err:#x}" if err is not None else "")
                             + (f" cr2={self.kvm.sregs.cr2:#x}" if vec == 14 else "")
                             + " (no trap handler registered)")
        self.bounce(ent[2], err, bool(ent[0] & 4))

    def deliver_event(self) -> None:
        if not self.event_callback:
            return
        if M.HYPERVISOR_RANGE[0] <= self.kvm.regs.rip < M.HYPERVISOR_RANGE[1]:
            # A kick stopped the vCPU inside a hypervisor stub (an exception or
            # the syscall stub, before its `out`): the registers are the stub's,
            # not the guest's.  Let the stub finish and exit; the event is
            # delivered on the entry after that, in guest context.
            return
        if self.run_interrupted and self.kvm.exception_in_flight():
            # A kick ended KVM_RUN between a guest fault and its delivery (seen
            # with Linux: a #PF on a PTE write reported at the event callback's
            # first instruction, with the PTE's address in CR2).  The fault goes
            # first; the event follows on a later entry.
            self.stats["events_deferred"] = self.stats.get("events_deferred", 0) + 1
            return
        self.run_interrupted = False  # (the ioctl costs ~9 us on PVM: asked only after a kick)
        self.stats["events"] += 1
        self.bounce(self.event_callback, None, True)

    def bounce(self, handler: int, err: int | None, mask_events: bool) -> None:
        """Xen's create_bounce_frame: push {RCX, R11, [ERR], RIP, CS, RFLAGS,
        RSP, SS} on the guest kernel stack and continue at ``handler``."""
        v = self.kvm
        r = v.regs
        cs = abi.FLAT_KERNEL_CS
        if self.kernel_mode:
            sp = r.rsp
            cs &= ~3  # RPL 0 tells the guest it interrupted kernel context
        else:
            self.toggle_guest_mode()
            sp = self.kernel_sp
        sp &= ~0xF
        if M.HYPERVISOR_RANGE[0] <= sp < M.HYPERVISOR_RANGE[1] + 64:
            raise GuestCrash(f"guest kernel stack {sp:#x} inside the hypervisor's range")
        saved_mask = self.vi_buf[self.vi_off + abi.VI_UPCALL_MASK]
        rflags = (r.rflags & ~(X86_EFLAGS_IF | X86_EFLAGS_IOPL)) | (0 if saved_mask else X86_EFLAGS_IF)
        frame = [r.rcx, r.r11]
        if err is not None:
            frame.append(err & 0xFFFFFFFF)
        frame += [r.rip, cs | (saved_mask << 32), rflags, r.rsp, abi.FLAT_KERNEL_SS]
        sp -= 8 * len(frame)
        try:
            self.copy_to_guest(sp, struct.pack(f"<{len(frame)}Q", *frame))
        except XenError as e:
            raise GuestCrash(f"cannot write exception frame to the guest stack at {sp:#x}: {e.why}") from None
        if mask_events:
            self.vi_buf[self.vi_off + abi.VI_UPCALL_MASK] = 1
        r.rip = handler
        r.rsp = sp
        r.rflags = (r.rflags & ~(X86_EFLAGS_AC | X86_EFLAGS_VM | X86_EFLAGS_RF | X86_EFLAGS_NT
                                 | X86_EFLAGS_TF | X86_EFLAGS_IOPL)) | X86_EFLAGS_IF | 0x2
        s = v.sregs
        if s.cs.selector != abi.FLAT_KERNEL_CS or s.cs.dpl != 3:
            s.cs = GUEST_CS
            s.ss = GUEST_SS
            v.mark_sregs_dirty()
        v.mark_regs_dirty()

    def do_iret(self) -> None:
        v = self.kvm
        r = v.regs
        try:
            raw = self.copy_from_guest(r.rsp, abi.IRET_CONTEXT.size)
        except XenError:
            raise GuestCrash(f"fault reading the iret frame at {r.rsp:#x}") from None
        rax, r11, rcx, flags, rip, cs, rflags, rsp, ss = abi.IRET_CONTEXT.unpack(raw)
        if (cs & 3) == 3 and self.kernel_mode:
            if not self.user_l4:
                raise GuestCrash("guest switching to user mode with no user page tables")
            self.toggle_guest_mode()
        r.rip = rip
        r.rsp = rsp
        r.rflags = (rflags & X86_EFLAGS_ALL & ~(X86_EFLAGS_IOPL | X86_EFLAGS_VM)) | X86_EFLAGS_IF | 0x2
        if not flags & abi.VGCF_in_syscall:
            r.r11 = r11
            r.rcx = rcx
        else:
            # Xen returns through sysret then: rcx = RIP, r11 = RFLAGS (no kernel
            # value is left in them for user mode to see)
            r.rcx = r.rip
            r.r11 = r.rflags
        r.rax = rax
        self.vi_buf[self.vi_off + abi.VI_UPCALL_MASK] = 0 if rflags & X86_EFLAGS_IF else 1
        v.mark_regs_dirty()

    def toggle_guest_mode(self) -> None:
        """Switch between guest kernel and guest user: page tables and GS base."""
        s = self.kvm.sregs
        self.kernel_mode = not self.kernel_mode
        emulate.syscall_fast_off(self)  # re-armed after a hypercall in kernel mode
        l4 = self.current_l4
        if self.kernel_mode:
            self.gs_base_user = s.gs.base
            s.gs.base = self.gs_base_kernel
        else:
            self.gs_base_kernel = s.gs.base
            s.gs.base = self.gs_base_user
        s.cr3 = l4 << 12
        self.kvm.mark_sregs_dirty()

    # ------------------------------------------------------------ diagnostics
    def register_dump(self) -> str:
        try:
            r = self.kvm.regs
            s = self.kvm.sregs
            d = r.as_dict()
            lines = [f"vcpu {self.id} ({'kernel' if self.kernel_mode else 'user'} mode):"]
            names = list(d)
            for i in range(0, len(names), 4):
                lines.append("  " + "  ".join(f"{n:>6}={d[n]:016x}" for n in names[i:i + 4]))
            lines.append(f"      cs={s.cs.selector:04x} ss={s.ss.selector:04x} cr2={s.cr2:016x} "
                         f"cr3={s.cr3:016x} fs={s.fs.base:x} gs={s.gs.base:x}")
            return "\n".join(lines)
        except Exception as e:  # noqa: BLE001 - diagnostics must never fail
            return f"(registers unavailable: {e})"

    def runstate_info(self) -> bytes:
        now = self.domain.clock.system_time()
        t = list(self.runstate_time)
        t[self.runstate] += now - self.runstate_entry
        return abi.RUNSTATE_INFO.pack(self.runstate, self.runstate_entry, *t)

    def block(self) -> None:
        """SCHEDOP_block: enable event delivery, sleep until an event is pending."""
        self.vi_buf[self.vi_off + abi.VI_UPCALL_MASK] = 0
        if self.vi_buf[self.vi_off + abi.VI_UPCALL_PENDING]:
            return
        with self.cond:
            self.blocked = True
            self.attention = True
        self._set_runstate(abi.RUNSTATE_blocked)

    def now_wall(self) -> float:
        return time.time()

    # ------------------------------------------------------------ save / restore (migration)
    def save_context(self) -> mstream.VcpuContext:
        """Xen's arch_get_info_guest for a 64-bit PV vCPU (stopped): a
        ``VcpuContext`` in *machine* frames (the stream's save side normalises
        CR3, the user L4 and the GDT frames to pfns)."""
        r, s = self.kvm.regs, self.kvm.sregs
        regs = {n: int(getattr(r, n)) for n in ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10",
                                               "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi")}
        regs.update(rip=int(r.rip), rsp=int(r.rsp),
                    rflags=(int(r.rflags) & ~X86_EFLAGS_IOPL) | (self.iopl << 12),
                    cs=int(s.cs.selector), ss=int(s.ss.selector), ds=int(s.ds.selector),
                    es=int(s.es.selector), fs=int(s.fs.selector), gs=int(s.gs.selector),
                    saved_upcall_mask=self.vi_get(abi.VI_UPCALL_MASK))
        flags = mstream.VGCF_i387_valid | (mstream.VGCF_online if self.up else 0)
        flags |= mstream.VGCF_in_kernel if self.kernel_mode else 0
        flags |= (mstream.VGCF_failsafe_disables_events if self.failsafe_mask_events else 0)
        flags |= (mstream.VGCF_syscall_disables_events if self.syscall_mask_events else 0)
        if self.kernel_mode:
            gs_kernel, gs_user = int(s.gs.base), self.gs_base_user
        else:
            gs_kernel, gs_user = self.gs_base_kernel, int(s.gs.base)
        ctrl = [0] * 8
        ctrl[0] = (int(s.cr0) & ~0x8) | (0x8 if self.virtual_ts else 0)
        ctrl[1] = self.user_l4 << 12
        ctrl[2] = struct.unpack_from("<Q", self.vi_buf, self.vi_off + abi.VI_CR2)[0]
        ctrl[3] = self.kernel_l4 << 12
        ctrl[4] = self.guest_cr4
        dbg = [*self.dr, 0, 0, self.dr6, self.dr7 | self.dr7_emul]
        xsave = self.kvm.get_xsave()
        return mstream.VcpuContext(
            fpu=xsave[:512], flags=flags, regs=regs,
            trap_ctxt=[(vec, fl, cs, addr) for vec, (fl, cs, addr) in sorted(self.trap_table.items())],
            gdt_frames=(list(self.gdt_frames) + [0] * 16)[:16],
            gdt_ents=min(len(self.gdt_frames) * 512, abi.FIRST_RESERVED_GDT_ENTRY),
            kernel_ss=self.kernel_ss, kernel_sp=self.kernel_sp, ctrlreg=ctrl, debugreg=dbg,
            event_callback_eip=self.event_callback, failsafe_callback_eip=self.failsafe_callback,
            syscall_callback_eip=self.syscall_callback, vm_assist=self.domain.vm_assist,
            fs_base=int(s.fs.base), gs_base_kernel=gs_kernel, gs_base_user=gs_user)


    def save_extended(self) -> mstream.ExtVcpuContext:
        """XEN_DOMCTL_get_ext_vcpucontext: the 32-bit syscall and sysenter callbacks."""
        return mstream.ExtVcpuContext(self.syscall32_callback, self.sysenter_callback,
                              abi.FLAT_RING3_CS32, abi.FLAT_RING3_CS32,
                              int(self.syscall32_mask_events), int(self.sysenter_mask_events), 0, self.id)


    def save_xsave(self) -> bytes:
        """XEN_DOMCTL_getvcpuextstate: u64 xcr0, u64 xcr0_accum, then the XSAVE area."""
        leaf = self.cpuid_policy.lookup(0xD, 0)
        xcr0 = (leaf[0] | leaf[3] << 32) & 0x7 or 0x3  # x87|SSE|AVX as the policy offers
        return struct.pack("<QQ", xcr0, xcr0) + self.kvm.get_xsave()


    def save_msrs(self) -> list[tuple[int, int]]:
        """XEN_DOMCTL_get_vcpu_msrs: the MSRs Xen keeps per vCPU (non-zero ones)."""
        m = self.msrs
        out = [(0x48, m.spec_ctrl), (0x140, m.misc_features_enables), (0xC0000103, m.tsc_aux),
               (0xC001011F, m.virt_spec_ctrl), (0xDA0, m.xss)]
        return [(i, v) for i, v in out if v]


    def restore_context(self, c: mstream.VcpuContext, ext: mstream.ExtVcpuContext | None, xsave: bytes | None,
                              msrs: list[tuple[int, int]]) -> None:
        """Xen's arch_set_info_guest for a vCPU of a domain being restored (not yet
        started).  ``c`` is in machine frames (localised).  Page-table references
        are taken by the caller (migration/restore.py) through the frame table."""
        v = self.kvm
        r, s = v.regs, v.sregs
        g = c.regs
        for n in ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
                  "rdx", "rsi", "rdi", "rip", "rsp"):
            setattr(r, n, g.get(n, 0) & (2**64 - 1))
        self.iopl = (g.get("rflags", 0) & X86_EFLAGS_IOPL) >> 12
        r.rflags = (g.get("rflags", 0) & X86_EFLAGS_ALL & ~(X86_EFLAGS_IOPL | X86_EFLAGS_VM)) \
            | X86_EFLAGS_IF | 0x2
        self.kernel_mode = bool(c.flags & mstream.VGCF_in_kernel)
        emulate.syscall_fast_off(self)
        self.failsafe_mask_events = bool(c.flags & mstream.VGCF_failsafe_disables_events)
        self.syscall_mask_events = bool(c.flags & mstream.VGCF_syscall_disables_events)
        s.cs = GUEST_CS
        s.ss = GUEST_SS
        for name in ("ds", "es", "fs", "gs"):
            sel = g.get(name, 0) & 0xFFFF
            seg = _seg(sel, False, 3)
            setattr(s, name, seg)
        self.kernel_l4 = c.ctrlreg[3] >> 12
        self.user_l4 = c.ctrlreg[1] >> 12
        self.gs_base_kernel, self.gs_base_user = c.gs_base_kernel, c.gs_base_user
        s.fs.base = c.fs_base
        s.gs.base = c.gs_base_kernel if self.kernel_mode else c.gs_base_user
        s.cr3 = self.current_l4 << 12
        self.virtual_ts = bool(c.ctrlreg[0] & 0x8)
        s.cr0 = (s.cr0 & ~0x8) | (0x8 if self.virtual_ts else 0)
        self.guest_cr4 = c.ctrlreg[4] or self.guest_cr4
        struct.pack_into("<Q", self.vi_buf, self.vi_off + abi.VI_CR2, c.ctrlreg[2])
        self.vi_set(abi.VI_UPCALL_MASK, g.get("saved_upcall_mask", 1) & 1)
        self.kernel_ss, self.kernel_sp = c.kernel_ss, c.kernel_sp
        self.trap_table = {vec: (fl, cs, addr) for vec, fl, cs, addr in c.trap_ctxt if addr}
        self.event_callback = c.event_callback_eip
        self.failsafe_callback = c.failsafe_callback_eip
        self.syscall_callback = c.syscall_callback_eip
        self.dr = list(c.debugreg[:4])
        self.dr6 = c.debugreg[6] or 0xFFFF0FF0
        self.dr7 = c.debugreg[7] or 0x400
        if ext is not None:
            self.syscall32_callback = ext.syscall32_callback_eip
            self.sysenter_callback = ext.sysenter_callback_eip
            self.syscall32_mask_events = bool(ext.syscall32_disables_events)
            self.sysenter_mask_events = bool(ext.sysenter_disables_events)
        self.up = bool(c.flags & mstream.VGCF_online)
        self.initialised = True
        self.runstate = abi.RUNSTATE_running if self.up else abi.RUNSTATE_offline
        v.mark_regs_dirty()
        v.mark_sregs_dirty()
        v.flush_state()
        if xsave is not None and len(xsave) >= 16 + 512:
            area = bytearray(xsave[16:16 + 4096].ljust(4096, b"\0"))
            area[:512] = c.fpu
            try:
                v.set_xsave(bytes(area))
            except OSError as e:  # an area this CPU cannot load: the FPU starts clean
                self.domain.log(f"restore: vcpu {self.id}: XSAVE state not loaded ({e})", always=True)
        m = self.msrs
        known = {0x48: "spec_ctrl", 0x140: "misc_features_enables", 0xC0000103: "tsc_aux",
                 0xC001011F: "virt_spec_ctrl", 0xDA0: "xss"}
        for idx, val in msrs:
            if idx in known:
                setattr(m, known[idx], val)



def _unused(*_: Any) -> None:
    pass
