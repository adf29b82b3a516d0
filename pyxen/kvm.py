"""Thin, typed bindings to Linux KVM (/dev/kvm): the "hardware" under pyxen.

Everything that talks to /dev/kvm lives here and nowhere else.  The rest of
pyxen sees a :class:`VM` (memory slots, dirty log) and :class:`VCPU` objects
(run, registers through KVM_CAP_SYNC_REGS, MSRs, FPU/XSAVE, kicks).

ioctls go through ctypes' libc ``ioctl`` rather than ``fcntl.ioctl``: ctypes
releases the GIL for the duration of the call (so each vCPU thread runs its
guest while the others handle exits) and reports EINTR instead of retrying it,
which is how a kick (immediate_exit + a signal) ends a running KVM_RUN.

The ioctl numbers encode the argument struct sizes; ``tests/unit/test_kvm_abi.py``
compiles a program against <linux/kvm.h> and checks every number and layout
used here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import signal
import threading
from typing import Any

# ---------------------------------------------------------------- ioctl numbers
KVMIO = 0xAE
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# ---------------------------------------------------------------- structures
u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class Regs(ctypes.Structure):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]

    def as_dict(self) -> dict[str, int]:
        return {f[0]: int(getattr(self, f[0])) for f in self._fields_}


class Segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class DTable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [("cs", Segment), ("ds", Segment), ("es", Segment), ("fs", Segment),
                ("gs", Segment), ("ss", Segment), ("tr", Segment), ("ldt", Segment),
                ("gdt", DTable), ("idt", DTable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class VcpuEvents(ctypes.Structure):
    _fields_ = [("raw", u8 * 64)]


class SyncRegs(ctypes.Structure):
    _fields_ = [("regs", Regs), ("sregs", Sregs), ("events", VcpuEvents)]


class IoExit(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class ExitUnion(ctypes.Union):
    _fields_ = [("io", IoExit), ("hw_reason", u64), ("fail_entry_reason", u64),
                ("internal_suberror", u32), ("padding", u8 * 256)]


class RunSyncUnion(ctypes.Union):
    _fields_ = [("regs", SyncRegs), ("padding", u8 * 2048)]


class Run(ctypes.Structure):
    """struct kvm_run, the page shared with the kernel for each vCPU."""

    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8),
                ("padding1", u8 * 6), ("exit_reason", u32),
                ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("exit", ExitUnion),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", RunSyncUnion)]


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class MsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class CpuidEntry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class DirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding", u32), ("dirty_bitmap", u64)]


class ClearDirtyLog(ctypes.Structure):
    """struct kvm_clear_dirty_log: clear (and write-protect again) the pages
    of ``num_pages`` from ``first_page`` whose bits ``dirty_bitmap`` sets."""
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class EnableCap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class Fpu(ctypes.Structure):
    _fields_ = [("fpr", u8 * 128), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", u8 * 256), ("mxcsr", u32), ("pad2", u32)]


class Xsave(ctypes.Structure):
    _fields_ = [("region", u32 * 1024)]


def _msrs_type(n: int) -> type[ctypes.Structure]:
    class Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", MsrEntry * n)]
    return Msrs


def _cpuid_type(n: int) -> type[ctypes.Structure]:
    class Cpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", CpuidEntry2 * n)]
    return Cpuid2


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, ctypes.sizeof(DirtyLog))
KVM_ENABLE_CAP = _iow(0xA3, ctypes.sizeof(EnableCap))
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, ctypes.sizeof(ClearDirtyLog))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(UserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(Regs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(Regs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(Sregs))
KVM_GET_VCPU_EVENTS = _ior(0x9F, ctypes.sizeof(VcpuEvents))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(Sregs))
KVM_GET_MSRS = _iowr(0x88, 8)
KVM_SET_MSRS = _iow(0x89, 8)
KVM_GET_FPU = _ior(0x8C, ctypes.sizeof(Fpu))
KVM_SET_FPU = _iow(0x8D, ctypes.sizeof(Fpu))
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, ctypes.sizeof(Xsave))
KVM_SET_XSAVE = _iow(0xA5, ctypes.sizeof(Xsave))

KVM_CAP_USER_MEMORY = 3
KVM_CAP_SYNC_REGS = 74
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_XSAVE = 55

KVM_SYNC_X86_REGS = 1
KVM_SYNC_X86_SREGS = 2
KVM_SYNC_X86_EVENTS = 4

KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1  # GET_DIRTY_LOG copies, CLEAR_DIRTY_LOG re-protects
KVM_DIRTY_LOG_INITIALLY_SET = 2  # turning the log on protects nothing: every bit starts set

# word indexes into the kvm_run page (see VCPU.q/.d/.w)
Q_VALID, Q_DIRTY = 36, 37  # kvm_valid_regs, kvm_dirty_regs (64-bit words)
Q_RAX, Q_RBX, Q_RCX, Q_RDX, Q_RSI, Q_RDI, Q_RSP, Q_RBP = 38, 39, 40, 41, 42, 43, 44, 45
Q_R8, Q_R9, Q_R10, Q_R11 = 46, 47, 48, 49
Q_RIP, Q_RFLAGS = 54, 55
D_EXIT_REASON = 2  # 32-bit word
W_IO_PORT = 17  # 16-bit word: kvm_run.io.port at byte 34

# exit reasons
EXIT_UNKNOWN = 0
EXIT_EXCEPTION = 1
EXIT_IO = 2
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_INTERNAL_ERROR = 17

EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 5: "HLT", 6: "MMIO", 8: "SHUTDOWN",
              9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR"}

MSR_IA32_TSC = 0x10

KICK_SIGNAL = signal.SIGUSR1

# ---------------------------------------------------------------- libc
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl_int = _libc.ioctl
_pthread_kill = _libc.pthread_kill
_pthread_kill.argtypes = [ctypes.c_ulong, ctypes.c_int]


class KvmError(OSError):
    """A KVM ioctl failed."""


def ioctl(fd: int, req: int, arg: Any = None) -> int:
    """ioctl with a ctypes structure (by reference), an int, or nothing."""
    if arg is None:
        ptr: Any = None
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.byref(arg)
    rc = _ioctl(fd, req, ptr)
    if rc < 0:
        e = ctypes.get_errno()
        raise KvmError(e, f"ioctl {req:#x}: {os.strerror(e)}")
    return int(rc)


def _noop_handler(signum: int, frame: Any) -> None:
    pass


_kick_installed = False


def install_kick_handler() -> None:
    """Make KICK_SIGNAL harmless so it only interrupts KVM_RUN (main thread only)."""
    global _kick_installed
    if not _kick_installed:
        signal.signal(KICK_SIGNAL, _noop_handler)
        _kick_installed = True


# ---------------------------------------------------------------- system
class Kvm:
    """/dev/kvm itself."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(e.errno, f"cannot open {path}: {e.strerror}") from None
        version = ioctl(self.fd, KVM_GET_API_VERSION)
        if version != 12:
            raise KvmError(errno.EINVAL, f"unexpected KVM API version {version}")
        self.vcpu_mmap_size = ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)
        self._cpuid: ctypes.Structure | None = None

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> ctypes.Structure:
        if self._cpuid is None:
            n = 256
            cpuid = _cpuid_type(n)()
            cpuid.nent = n  # type: ignore[attr-defined]
            ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, cpuid)
            self._cpuid = cpuid
        return self._cpuid

    def close(self) -> None:
        os.close(self.fd)


_system: Kvm | None = None


def system() -> Kvm:
    """The process-wide /dev/kvm handle (opened on first use)."""
    global _system
    if _system is None:
        _system = Kvm()
    return _system


class VM:
    """One KVM virtual machine (one pyxen domain)."""

    def __init__(self, kvm: Kvm | None = None) -> None:
        self.kvm = kvm or system()
        self.fd = ioctl(self.kvm.fd, KVM_CREATE_VM, 0)
        self.slots: dict[int, UserspaceMemoryRegion] = {}
        self.vcpus: list[VCPU] = []

    def set_memory(self, slot: int, gpa: int, size: int, host_addr: int,
                   log_dirty: bool = False) -> None:
        """Map ``size`` bytes at ``host_addr`` into the guest at ``gpa`` (slot ``slot``).

        KVM refuses a slot that overlaps another with a bare EEXIST (and a bad
        range with EINVAL); the caller's layout is wrong then, so the error
        says which slots and ranges are involved."""
        for other, o in self.slots.items():
            if other != slot and gpa < o.guest_phys_addr + o.memory_size \
                    and o.guest_phys_addr < gpa + size:
                raise KvmError(errno.EEXIST, f"memory slot {slot} at GPA {gpa:#x}+{size:#x} "
                               f"overlaps slot {other} at GPA {o.guest_phys_addr:#x}"
                               f"+{o.memory_size:#x}")
        r = UserspaceMemoryRegion(slot=slot, flags=KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0,
                                  guest_phys_addr=gpa, memory_size=size, userspace_addr=host_addr)
        try:
            ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, r)
        except KvmError as e:
            raise KvmError(e.errno, f"KVM_SET_USER_MEMORY_REGION slot {slot} at GPA {gpa:#x}"
                           f"+{size:#x}: {os.strerror(e.errno or 0)}") from None
        self.slots[slot] = r

    def set_dirty_logging(self, slot: int, on: bool) -> None:
        r = self.slots[slot]
        self.set_memory(slot, r.guest_phys_addr, r.memory_size, r.userspace_addr, on)

    def set_manual_dirty_protect(self, on: bool) -> bool:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with KVM_DIRTY_LOG_INITIALLY_SET
        (Linux's Documentation/virt/kvm/api.rst): turning a slot's log on
        then write-protects nothing (every page counts as dirty), and
        :meth:`get_dirty_log` only copies the bitmap: the pages are protected
        again by :meth:`clear_dirty_log`, a chunk at a time, right before they
        are sent.  Without it, turning the log on write-protects the whole
        slot and each read the pages it returns, all at once, under the MMU
        lock, and (PVM: shadow paging) the guest faults them back in.  Takes
        effect for the slots whose log is turned on afterwards.  False when
        this KVM lacks it (``on`` then changes nothing)."""
        want = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
        try:
            have = ioctl(self.fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        except KvmError:
            have = 0
        if have & want != want:
            return False
        cap = EnableCap(cap=KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        cap.args[0] = want if on else 0
        ioctl(self.fd, KVM_ENABLE_CAP, cap)
        return True

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        """KVM_CLEAR_DIRTY_LOG (manual protect mode): clear the bits ``bitmap``
        sets for pages ``first_page``.. (a multiple of 64) and write-protect
        those pages again; ``num_pages`` is a multiple of 64 unless the range
        ends at the slot's end; ``bitmap`` holds at least ``num_pages`` bits."""
        buf = ctypes.create_string_buffer(bytes(bitmap), max(len(bitmap), ((num_pages + 63) // 64) * 8))
        ioctl(self.fd, KVM_CLEAR_DIRTY_LOG, ClearDirtyLog(
            slot=slot, num_pages=num_pages, first_page=first_page,
            dirty_bitmap=ctypes.addressof(buf)))

    def get_dirty_log(self, slot: int) -> bytes:
        """The slot's dirty bitmap since the last call (one bit per 4 KiB page);
        in manual protect mode, the bits set since they were last cleared
        (nothing is cleared or protected)."""
        r = self.slots[slot]
        npages = r.memory_size // 4096
        buf = ctypes.create_string_buffer(((npages + 63) // 64) * 8)
        ioctl(self.fd, KVM_GET_DIRTY_LOG, DirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(buf)))
        return buf.raw

    def create_vcpu(self) -> VCPU:
        v = VCPU(self, len(self.vcpus))
        self.vcpus.append(v)
        return v

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        os.close(self.fd)


class VCPU:
    """One KVM vCPU.  Registers are read and written through the kvm_run page
    (KVM_CAP_SYNC_REGS): ``regs``/``sregs`` are views into it, valid after an
    exit; call :meth:`mark_regs_dirty`/:meth:`mark_sregs_dirty` after changing
    them so the kernel loads them on the next KVM_RUN."""

    def __init__(self, vm: VM, index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = ioctl(vm.fd, KVM_CREATE_VCPU, index)
        self._map = mmap.mmap(self.fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = Run.from_buffer(self._map)
        self.run_addr = ctypes.addressof(self.run_struct)
        # Fast views of the kvm_run page for the exit path: 64-, 32- and 16-bit words.
        # Q_* are indexes into ``q`` (sync regs start at byte 304 = word 38).
        self.q = memoryview(self._map).cast("Q")
        self.d = memoryview(self._map).cast("I")
        self.w = memoryview(self._map).cast("H")
        self.sync = vm.kvm.check_extension(KVM_CAP_SYNC_REGS) & (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS) == 3
        self.thread_id: int | None = None
        if self.sync:
            self.run_struct.kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS
            self.regs: Regs = self.run_struct.s.regs.regs
            self.sregs: Sregs = self.run_struct.s.regs.sregs
        else:  # fall back to explicit GET/SET ioctls around each run
            self.regs = Regs()
            self.sregs = Sregs()
        self._dirty = 0
        self._fresh = False  # regs/sregs reflect the vCPU (only meaningful without sync)
        self.load_state()

    # -- registers -----------------------------------------------------------
    def load_state(self) -> None:
        """Fetch regs/sregs with ioctls (at creation, and without SYNC_REGS)."""
        ioctl(self.fd, KVM_GET_REGS, self.regs)
        ioctl(self.fd, KVM_GET_SREGS, self.sregs)

    def mark_regs_dirty(self) -> None:
        if self.sync:
            self.q[Q_DIRTY] |= KVM_SYNC_X86_REGS
        else:
            self._dirty |= KVM_SYNC_X86_REGS

    def mark_sregs_dirty(self) -> None:
        if self.sync:
            self.q[Q_DIRTY] |= KVM_SYNC_X86_SREGS
        else:
            self._dirty |= KVM_SYNC_X86_SREGS

    def flush_state(self) -> None:
        """Push pending register changes now (needed before MSR/FPU ioctls)."""
        dirty = self._dirty | (self.q[Q_DIRTY] if self.sync else 0)
        if dirty & KVM_SYNC_X86_REGS:
            ioctl(self.fd, KVM_SET_REGS, self.regs)
        if dirty & KVM_SYNC_X86_SREGS:
            ioctl(self.fd, KVM_SET_SREGS, self.sregs)
        self._dirty = 0
        if self.sync:
            self.q[Q_DIRTY] = 0

    def get_msrs(self, indices: list[int]) -> list[int]:
        msrs = _msrs_type(len(indices))()
        msrs.nmsrs = len(indices)  # type: ignore[attr-defined]
        for i, idx in enumerate(indices):
            msrs.entries[i].index = idx  # type: ignore[attr-defined]
        n = ioctl(self.fd, KVM_GET_MSRS, msrs)
        if n != len(indices):
            raise KvmError(errno.EINVAL, f"KVM_GET_MSRS read {n} of {len(indices)}")
        return [int(msrs.entries[i].data) for i in range(len(indices))]  # type: ignore[attr-defined]

    def set_msrs(self, values: dict[int, int]) -> None:
        msrs = _msrs_type(len(values))()
        msrs.nmsrs = len(values)  # type: ignore[attr-defined]
        for i, (idx, val) in enumerate(values.items()):
            msrs.entries[i].index = idx  # type: ignore[attr-defined]
            msrs.entries[i].data = val  # type: ignore[attr-defined]
        n = ioctl(self.fd, KVM_SET_MSRS, msrs)
        if n != len(values):
            raise KvmError(errno.EINVAL, f"KVM_SET_MSRS wrote {n} of {len(values)}")

    def set_cpuid(self, cpuid: ctypes.Structure) -> None:
        ioctl(self.fd, KVM_SET_CPUID2, cpuid)

    def tsc_khz(self) -> int:
        return ioctl(self.fd, KVM_GET_TSC_KHZ)

    def exception_in_flight(self) -> bool:
        """Whether KVM holds an exception it has yet to deliver (struct
        kvm_vcpu_events: exception.injected, byte 0, or exception.pending, byte 3).
        A kick can end KVM_RUN after a fault was raised and before the CPU took
        it; the registers then still show the faulting instruction, and changing
        RIP (an event bounce) would make the fault appear at the new RIP."""
        ev = VcpuEvents()
        ioctl(self.fd, KVM_GET_VCPU_EVENTS, ev)
        return bool(ev.raw[0] or ev.raw[3])

    def get_fpu(self) -> Fpu:
        f = Fpu()
        ioctl(self.fd, KVM_GET_FPU, f)
        return f

    def get_xsave(self) -> bytes:
        x = Xsave()
        ioctl(self.fd, KVM_GET_XSAVE, x)
        return bytes(x)

    def set_xsave(self, data: bytes) -> None:
        x = Xsave.from_buffer_copy(data)
        ioctl(self.fd, KVM_SET_XSAVE, x)

    # -- running -------------------------------------------------------------
    def run(self) -> int:
        """Enter the guest; return the exit reason, or -1 if kicked (EINTR)."""
        if not self.sync and self._dirty:
            self.flush_state()
        rc = _ioctl(self.fd, KVM_RUN, None)
        if rc < 0:
            e = ctypes.get_errno()
            if e == errno.EINTR or e == errno.EAGAIN:
                self.run_struct.immediate_exit = 0
                if not self.sync:
                    self.load_state()
                return -1
            raise KvmError(e, f"KVM_RUN: {os.strerror(e)}")
        if not self.sync:
            self.load_state()
        return int(self.run_struct.exit_reason)

    def bind_thread(self) -> None:
        """Record the calling thread as this vCPU's runner (target of kicks)."""
        self.thread_id = threading.get_ident()

    def kick(self) -> None:
        """Make a running (or about to run) KVM_RUN return promptly with EINTR."""
        self.run_struct.immediate_exit = 1
        tid = self.thread_id
        if tid is not None:
            _pthread_kill(tid, KICK_SIGNAL)

    def io_data(self) -> int:
        """The first byte of an I/O exit's data (the value of %al for `out`)."""
        return self._map[self.run_struct.exit.io.data_offset]

    def close(self) -> None:
        for m in (self.q, self.d, self.w):
            m.release()
        try:
            del self.regs, self.sregs, self.run_struct
        except AttributeError:
            pass
        try:
            self._map.close()
        except BufferError:
            pass
        os.close(self.fd)
