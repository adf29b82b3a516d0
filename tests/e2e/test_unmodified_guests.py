"""Unmodified Xen PV guests (issue 9): Debian's cloud kernel and PV GRUB.

The guests are not in the repository: ``tools/fetch-guests`` downloads them
from the Debian mirror into ``guests/`` (or ``$PYXEN_GUESTS``); ``.ci/run``
runs it.  Without them every test here skips, loudly.

* The builder tests pass today: the real bzImage unpacks to an ELF with Xen
  notes, and both kernels load into a domain (no hypercall page, unmapped
  ramdisk, start_info as Xen's builder writes it).
* The boot tests check what a user would see (busybox prompt and answers;
  GRUB's menu and prompt) and are ``xfail(strict=False)`` with the reason each
  stops today (docs/guests.md), so they start passing as the missing pieces
  of issue 9 land.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_until

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
        assert any("writable_page_tables" in m for m in logs), logs
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


@pytest.mark.xfail(strict=False, reason=(
    "issue 9: Linux crashes at its first privileged instruction, wrmsr MSR_GS_BASE in startup_xen "
    "(#GP, no trap table yet); after that (measured with stand-ins) it needs XENFEAT_gnttab_map_avail_bits, "
    "forced-emulation cpuid, PHYSDEVOP_set_iopl, VCPUOP_register_runstate_memory_area (else BUG), "
    "mov from CR4/CR0, rdmsr, writable page tables: docs/guests.md"))
def test_linux_boots_to_a_busybox_shell(host: object, tmp_path: Path) -> None:
    need(VMLINUZ, INITRD, GUESTS / "disk.img")
    disk = tmp_path / "disk.img"
    shutil.copyfile(GUESTS / "disk.img", disk)
    domid, s = _create(host, "linux.cfg", [
        f'kernel="{VMLINUZ}"', f'ramdisk="{INITRD}"',
        f"disk=['format=raw,vdev=xvda,access=rw,target={disk}']"])
    try:
        buf = read_until(s, re.escape(INIT_MARKER).encode(), 300)
        buf = read_until(s, rb"# $", 60, buf)
        buf = _shell(s, buf, "uname -r", "\n" + re.escape(kernel_release()), 30)
        buf = _shell(s, buf, "cat /sys/hypervisor/type", r"\nxen\r?\n", 30)
        buf = _shell(s, buf, "dmesg | grep -c 'Booting kernel on Xen'", r"\n1\r?\n", 30)
        _shell(s, buf, "grep -c ^processor /proc/cpuinfo", r"\n1\r?\n", 30)
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
