"""Unmodified Xen PV guests (issue 9): Debian's cloud kernel and PV GRUB.

The guests are not in the repository: ``tools/fetch-guests`` downloads them
from the Debian mirror into ``guests/`` (or ``$PYXEN_GUESTS``); ``.ci/run``
runs it.  Without them every test here skips, loudly.

* The builder tests pass today: the real bzImage unpacks to an ELF with Xen
  notes, and both kernels load into a domain (no hypercall page, unmapped
  ramdisk, start_info as Xen's builder writes it).
* The boot tests check what a user would see (busybox prompt and answers;
  GRUB's menu and prompt; Linux booted by GRUB from the disk) through pyxend
  and the console socket.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_until, wait_listed

GUESTS = Path(os.environ.get("PYXEN_GUESTS") or ROOT / "guests")
VMLINUZ = GUESTS / "vmlinuz"
INITRD = GUESTS / "initrd.img"
GRUB_INSTALLED = Path("/usr/lib/grub-xen/grub-x86_64-xen.bin")
GRUB = GRUB_INSTALLED if GRUB_INSTALLED.exists() else GUESTS / "grub-x86_64-xen.bin"
PVGRUB_DISK = GUESTS / "pvgrub-disk.img"
INIT_MARKER = "pyxen-initramfs: ready"


def need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip("SKIPPED LOUDLY: unmodified guests not fetched (run tools/fetch-guests): missing "
                    + ", ".join(missing))


def kernel_release() -> str:
    """The release the kernel reports (``uname -r``), from the package's file name."""
    return os.path.basename(os.path.realpath(VMLINUZ)).removeprefix("vmlinuz-")


# --- the builder (pass today) ------------------------------------------------------


def test_real_vmlinuz_unpacks_to_an_elf_with_xen_notes() -> None:
    need(VMLINUZ)
    from pyxen.builder import bzimage
    from pyxen.builder.elf import XenNote, parse_xen_kernel
    data = VMLINUZ.read_bytes()
    assert bzimage.is_bzimage(data)
    elf, fmt = bzimage.unpack_bzimage(data, str(VMLINUZ))
    assert fmt in {f for _, f in bzimage.FORMATS if f != "lzo"}
    k = parse_xen_kernel(elf, str(VMLINUZ))
    assert k.guest_os == "linux" and k.xen_version == "xen-3.0"
    assert XenNote.ENTRY in k.notes and XenNote.FEATURES in k.notes
    assert "writable_page_tables" in k.features_required


def test_builder_loads_linux_with_its_initramfs(kvm_ok: None) -> None:
    need(VMLINUZ, INITRD)
    from pyxen import abi
    from pyxen.domctl import create_domain
    from pyxen.hv.domain import DomainSpec
    logs: list[str] = []
    d = create_domain(DomainSpec(name="linux-load", memory_mib=256, kernel=str(VMLINUZ),
                                 ramdisk=str(INITRD), cmdline="console=hvc0"),
                      log_sink=logs.append, start=False)
    try:
        si_va = d.vcpus[0].kvm.regs.rsi
        lay_vb = 0xFFFFFFFF80000000
        si = abi.START_INFO.unpack_from(d.machine.ram, si_va - lay_vb)
        magic, nr_pages, _, flags = si[0], si[1], si[2], si[3]
        mod_start, mod_len = si[11], si[12]
        assert magic.rstrip(b"\0") == abi.START_INFO_MAGIC
        assert nr_pages == 256 * 256
        # Linux has XEN_ELFNOTE_MOD_START_PFN: the ramdisk lies past the initial
        # mapping, given by pfn, its length in whole pages (xc_dom_build_image)
        assert flags & abi.SIF_MOD_START_PFN
        size = INITRD.stat().st_size
        assert mod_len == (size + 4095) // 4096 * 4096
        assert bytes(d.machine.ram[mod_start * 4096:mod_start * 4096 + size]) == INITRD.read_bytes()
        assert si[13].rstrip(b"\0") == b"console=hvc0"
        assert any("no hypercall page" in m for m in logs)
        assert not any("writable_page_tables" in m for m in logs), logs  # provided (hv/ptwr.py)
    finally:
        d.destroy()
        d.close()


def test_builder_loads_pv_grub(kvm_ok: None) -> None:
    need(GRUB)
    from pyxen.domctl import create_domain
    from pyxen.hv.domain import DomainSpec
    d = create_domain(DomainSpec(name="grub-load", memory_mib=64, kernel=str(GRUB)), start=False)
    try:
        r = d.vcpus[0].kvm.regs
        assert r.rip == 0  # GRUB's XEN_ELFNOTE_ENTRY, VIRT_BASE 0
        magic = bytes(d.machine.ram[r.rsi:r.rsi + 32]).rstrip(b"\0")
        assert magic == b"xen-3.0-x86_64"
    finally:
        d.destroy()
        d.close()


def test_unmapped_ramdisk_layout() -> None:
    """Pure: with MOD_START_PFN the ramdisk goes after the mapped area and costs no tables."""
    from pyxen.builder.pv import plan_layout
    vb = 0xFFFFFFFF80000000
    mapped = plan_layout(vb, vb, vb + 0x35000, 65536, 3 << 20)
    unmapped = plan_layout(vb, vb, vb + 0x35000, 65536, 3 << 20, unmapped_ramdisk=True)
    assert not mapped.ramdisk_unmapped and unmapped.ramdisk_unmapped
    assert mapped.ramdisk_pfn == 0x35 and mapped.p2m_pfn == 0x35 + 768
    assert unmapped.p2m_pfn == 0x35 and unmapped.ramdisk_pfn == unmapped.mapped_pages
    assert unmapped.mapped_pages < mapped.mapped_pages


# --- booting (Linux: xfail until the rest of issue 9 lands) --------------------------------


def _create(host: object, cfg: str, overrides: list[str]) -> tuple[int, socket.socket]:
    # on_crash=destroy closes the console at once, so a crash fails fast
    return host.create_attached(ROOT / "examples" / cfg,  # type: ignore[attr-defined]
                                overrides + ['on_crash="destroy"'])


def _shell(s: socket.socket, buf: bytes, cmd: str, answer: str, timeout: float = 60) -> bytes:
    s.sendall(cmd.encode() + b"\n")
    return read_until(s, answer.encode(), timeout, buf)


KMSG = re.compile(r"\[ *\d+\.\d{6}\] [^\n]*\n")


class Shell:
    """Debian's busybox ash on the guest's hvc0, through pyxen's console socket.

    Each command is wrapped in ``echo @@""start<N>`` / ``echo @@""done<N>`` so
    that its output sits between markers the typed command line does not contain
    (the console echoes what we type and ash's line editor redraws long lines and
    asks for the cursor position, ESC[6n)."""

    def __init__(self, sock: socket.socket, buf: bytes = b"") -> None:
        self.s, self.buf, self.n = sock, buf, 0

    def wait_prompt(self, timeout: float) -> None:
        self.buf = read_until(self.s, rb"[/~] # ", timeout, self.buf)

    def run(self, cmd: str, timeout: float = 60) -> str:
        """The output of ``cmd``: what the shell prints between two marker lines
        that only its output, never the echo of what we typed, has alone on a line."""
        self.n += 1
        start = len(self.buf)
        self.s.sendall(f'echo "@@""start{self.n}"; {cmd}; echo "@@""done{self.n}"\n'.encode())
        self.buf = read_until(self.s, rf"^@@done{self.n}\r?$".encode(), timeout, self.buf)
        # the kernel prints to hvc0 too (a loaded machine: "clocksource: Long
        # readout interval"...): a printk line, wherever it lands, is cut out,
        # unless the command reads the kernel log itself
        out = self.buf[start:].decode(errors="replace")
        if "dmesg" not in cmd:
            out = KMSG.sub("", out)
        m = re.search(rf"^@@start{self.n}\r?\n(.*)^@@done{self.n}\r?$", out, re.M | re.S)
        assert m, out
        return m.group(1)


def _boot_linux(host: object, tmp_path: Path, extra: list[str] | None = None
                ) -> tuple[int, Shell, Path]:
    """Boot Linux to its shell.  Known bug (docs/guests.md): under heavy host load
    about one boot in ten oopsed during the kernel's crypto self-tests (~12.6 s)
    and never reached /init; it has not been reproduced on a quiet machine.  A boot
    that does not reach the shell is retried once, with a warning that carries its
    console, so the bug stays visible without making CI flaky; twice fails."""
    need(VMLINUZ, INITRD, GUESTS / "disk.img")
    disk = tmp_path / "disk.img"
    for attempt in (1, 2):
        shutil.copyfile(GUESTS / "disk.img", disk)
        domid, s = _create(host, "linux.cfg", [
            f'kernel="{VMLINUZ}"', f'ramdisk="{INITRD}"',
            f"disk=['format=raw,vdev=xvda,access=rw,target={disk}']", *(extra or [])])
        sh = Shell(s)
        try:
            sh.buf = read_until(s, re.escape(INIT_MARKER).encode(), 300)
            sh.wait_prompt(120)
            return domid, sh, disk
        except AssertionError as e:
            s.close()
            if attempt == 2:
                raise
            warnings.warn(f"Linux boot {attempt} did not reach the shell (known intermittent "
                          f"bug, docs/guests.md); retrying once. Console tail: {str(e)[-3000:]}",
                          stacklevel=1)
            host.destroy(domid)  # type: ignore[attr-defined]
            wait_listed(host, lambda ds, gone=domid: not [d for d in ds if d["domid"] == gone],
                        what="the failed Linux domain gone")
    raise AssertionError("unreachable")


def test_linux_boots_to_a_busybox_shell(host: object, tmp_path: Path) -> None:
    """Debian's cloud kernel, unmodified, as the packaged bzImage (lz4 payload, no
    hypercall page: every hypercall by syscall), with a busybox initramfs: it
    reaches a shell on hvc0, sees Xen, reads its whole disk through its own
    xen-blkfront and pyxen's blkback with the host's checksum, writes a block
    the host reads back after sync, forks 100 children, and `poweroff` ends the
    domain with reason poweroff."""
    domid, sh, disk = _boot_linux(host, tmp_path, ['on_poweroff="preserve"'])
    try:
        assert sh.run("uname -r").strip() == kernel_release()
        assert sh.run("cat /sys/hypervisor/type").strip() == "xen"
        assert "Booting kernel on Xen" in sh.run("dmesg | grep 'Booting kernel on Xen'")
        assert sh.run("grep -c ^processor /proc/cpuinfo").strip() == "1"
        want = hashlib.md5(disk.read_bytes()).hexdigest()
        got = sh.run("dd if=/dev/xvda bs=1M count=64 2>/dev/null | md5sum", 180).split()
        assert got and got[0] == want, got
        sh.run("echo hello-from-linux-on-pyxen | dd of=/dev/xvda bs=512 seek=100 conv=fsync "
               "2>/dev/null; sync", 60)
        with open(disk, "rb") as f:
            f.seek(100 * 512)
            assert f.read(26) == b"hello-from-linux-on-pyxen\n"
        out = sh.run("i=0; while [ $i -lt 100 ]; do sh -c 'exit 7' & i=$((i+1)); done; "
                     "n=0; for j in $(jobs -p); do wait $j; [ $? = 7 ] && n=$((n+1)); done; "
                     "echo forked=$i exited7=$n", 180)
        assert "forked=100 exited7=100" in out, out
        sh.s.sendall(b"poweroff\n")
        wait_listed(host, lambda ds: any(d["domid"] == domid and d["state"] == "shutdown"
                                         for d in ds), timeout=60, what="Linux powered off")
        [rec] = [d for d in host.list() if d["domid"] == domid]  # type: ignore[attr-defined]
        assert rec["reason"] == "poweroff", rec
    finally:
        sh.s.close()


def test_linux_reboots_and_obeys_the_host_shutdown(host: object, tmp_path: Path) -> None:
    """`reboot` inside Linux restarts the domain (on_reboot="restart": a new domain
    process that boots Linux again), and `pyxen shutdown` from the host makes
    Linux power off cleanly through control/shutdown in xenstore."""
    domid, sh, _ = _boot_linux(host, tmp_path)
    try:
        [old] = [d for d in host.list() if d["domid"] == domid]  # type: ignore[attr-defined]
        sh.s.sendall(b"reboot\n")
        doms = wait_listed(host, lambda ds: any(d["name"] == "linux" and d["pid"] != old["pid"]
                                                and d["state"] in ("running", "blocked")
                                                for d in ds), timeout=60, what="Linux restarted")
    finally:
        sh.s.close()
    [new] = [d for d in doms if d["name"] == "linux"]
    s = host.console_socket(new["domid"])  # type: ignore[attr-defined]
    try:
        sh = Shell(s)
        sh.s.sendall(b"\n")
        sh.wait_prompt(300)
        assert sh.run("uname -r").strip() == kernel_release()
        via = host.shutdown(new["domid"], timeout=60)  # type: ignore[attr-defined]
        assert via == "xenstore", via
        # Linux's own last words: orderly_poweroff ends in kernel_halt when no power-off
        # handler is registered; on Xen PV both end in SCHEDOP_shutdown(poweroff)
        read_until(s, rb"reboot: (Power down|System halted)", 60, sh.buf)
        wait_listed(host, lambda ds: not [d for d in ds if d["name"] == "linux"], timeout=60,
                    what="Linux gone after pyxen shutdown")
        dmesg = host.dmesg()  # type: ignore[attr-defined]
        assert any(f"domain {new['domid']} (linux) poweroff" in line for line in dmesg), dmesg[-20:]
    finally:
        s.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_pv_grub_shows_its_menu_and_answers_ls(host: object, tmp_path: Path, fmt: str) -> None:
    """Debian's unmodified PV GRUB (grub-x86_64-xen.bin, no hypercall page: every hypercall by
    syscall) reads /boot/grub/grub.cfg from the ext4 filesystem on xvda through pyxen's blkback,
    shows its menu, and answers `ls` at its prompt, on a raw image and on a qcow2 one."""
    need(GRUB, PVGRUB_DISK)
    disk = tmp_path / f"pvgrub-disk.{fmt}"
    if fmt == "raw":
        shutil.copyfile(PVGRUB_DISK, disk)
    else:
        if not shutil.which("qemu-img"):
            pytest.skip("SKIPPED LOUDLY: qemu-img (Debian's qemu-utils) is not installed")
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(PVGRUB_DISK), str(disk)],
                       check=True, capture_output=True, timeout=60)
    domid, s = _create(host, "pvgrub.cfg", [
        f'kernel="{GRUB}"', f"disk=['format={fmt},vdev=xvda,access=rw,target={disk}']"])
    try:
        buf = read_until(s, rb"pyxen test: Debian cloud kernel", 120)
        s.sendall(b"c")  # the menu's "c": a command line
        buf = read_until(s, rb"grub> ", 30, buf)
        s.sendall(b"ls\n")
        buf = read_until(s, rb"\(xen/xvda\)", 30, buf)
        s.sendall(b"cat (xen/xvda)/boot/grub/grub.cfg\n")
        read_until(s, rb"menuentry", 30, buf)
    finally:
        s.close()


PVGRUB_CMDLINE_MARK = "pyxen.test=booted-by-pvgrub"


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_pv_grub_boots_linux_from_xvda_to_the_shell(host: object, tmp_path: Path, fmt: str) -> None:
    """PV GRUB boots Linux from xvda to the shell: Debian's grub-x86_64-xen.bin reads grub.cfg
    from the ext4 disk, loads the kernel (the ELF inside Debian's lz4 bzImage, gzip'd: GRUB 2.06
    cannot read lz4, tools/mkpvgrubdisk) and the initramfs from it, builds a new start_info and
    page tables inside its own domain (mmu_update, update_va_mapping, mmuext pin + new_baseptr)
    and jumps; Linux boots from there to the busybox shell, reports the release the bzImage
    carries, sees GRUB's command line in /proc/cmdline and reads the disk GRUB read."""
    need(GRUB, VMLINUZ, INITRD)
    if not shutil.which("mkfs.ext4") and not Path("/sbin/mkfs.ext4").exists():
        pytest.skip("SKIPPED LOUDLY: mkfs.ext4 (Debian's e2fsprogs) is not installed")
    raw = tmp_path / "pvgrub-linux.img"
    subprocess.run([sys.executable, str(ROOT / "tools" / "mkpvgrubdisk"), "--guests", str(GUESTS),
                    "-o", str(raw), "--timeout", "0", "--extra", PVGRUB_CMDLINE_MARK],
                   check=True, capture_output=True, timeout=300)
    disk = raw
    if fmt == "qcow2":
        if not shutil.which("qemu-img"):
            pytest.skip("SKIPPED LOUDLY: qemu-img (Debian's qemu-utils) is not installed")
        disk = tmp_path / "pvgrub-linux.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)],
                       check=True, capture_output=True, timeout=60)
    domid, s = _create(host, "pvgrub.cfg", [
        f'kernel="{GRUB}"', f"disk=['format={fmt},vdev=xvda,access=rw,target={disk}']",
        'on_poweroff="preserve"'])
    sh = Shell(s)
    try:
        sh.buf = read_until(s, rb"pyxen-pvgrub: loading the kernel", 120)
        sh.buf = read_until(s, rb"Booting kernel on Xen", 120, sh.buf)
        sh.buf = read_until(s, re.escape(INIT_MARKER).encode(), 300, sh.buf)
        sh.wait_prompt(120)
        assert sh.run("uname -r").strip() == kernel_release()
        cmdline = sh.run("cat /proc/cmdline").split()
        assert "console=hvc0" in cmdline and PVGRUB_CMDLINE_MARK in cmdline, cmdline
        # the disk GRUB read is Linux's xvda: its grub.cfg, through xen-blkfront
        assert "menuentry" in sh.run("mkdir -p /mnt && mount -t ext4 -o ro /dev/xvda /mnt "
                                     "&& cat /mnt/boot/grub/grub.cfg; umount /mnt", 60)
        sh.s.sendall(b"poweroff\n")
        wait_listed(host, lambda ds: any(d["domid"] == domid and d["state"] == "shutdown"
                                         for d in ds), timeout=60, what="Linux powered off")
    finally:
        s.close()


def test_guests_dir_layout_documented() -> None:
    """tools/fetch-guests leaves what examples/*.cfg and docs/guests.md name."""
    need(GUESTS)
    for name in ("vmlinuz", "initrd.img", "grub-x86_64-xen.bin", "pvgrub-disk.img", "disk.img"):
        assert (GUESTS / name).exists(), name
    # the initramfs is a gzip'd cpio newc archive whose first entry is a directory
    import gzip
    head = gzip.open(INITRD).read(110)
    assert head.startswith(b"070701")
    assert struct.unpack(">I", bytes.fromhex(head[14:22].decode()))[0] & 0o170000 == 0o040000


@pytest.mark.parametrize("cfg", ["linux.cfg", "pvgrub.cfg"])
def test_examples_parse(cfg: str) -> None:
    """The examples load as written (their files come from tools/fetch-guests and,
    for PV GRUB, the grub-xen-host package that .ci/run installs)."""
    need(VMLINUZ, INITRD, PVGRUB_DISK)
    if cfg == "pvgrub.cfg":
        need(GRUB_INSTALLED)
    from pyxen.toolstack.xlcfg import load_domain_config
    c, warnings = load_domain_config(ROOT / "examples" / cfg)
    assert not warnings, warnings
    assert c.kernel.exists() and all(Path(d.path).exists() for d in c.disks)  # type: ignore[arg-type]


def test_debian_example_parses() -> None:
    """examples/debian.cfg loads as written once tools/mkdebian has made its image."""
    image = GUESTS / "debian-bookworm.qcow2"
    if not image.exists():
        pytest.skip(f"SKIPPED LOUDLY: {image} not built (tools/mkdebian; root and network)")
    need(GRUB_INSTALLED)
    from pyxen.toolstack.xlcfg import load_domain_config
    c, warnings = load_domain_config(ROOT / "examples" / "debian.cfg")
    assert not warnings, warnings
    assert c.kernel == GRUB_INSTALLED
    assert [Path(d.path).resolve() for d in c.disks] == [image.resolve()]  # type: ignore[arg-type]
