"""Sizes a domain cannot have are refused with the setting's name, at every layer.

``memory=500000`` used to reach KVM and come back as ``[Errno 17] ioctl
0x4020ae46: File exists`` (the hypervisor area grew into the grant window's
memory slot), and ``vcpus=2`` was accepted although only vCPU 0 ever runs.
The config loader refuses both with file:line (tests/unit/test_xlcfg.py);
these tests attack the layers below it, which the API reaches without a
config file: the domain builder (``domctl.check_spec``), the machine
(``Machine.__init__``), KVM's memory slots (``VM.set_memory``), and the
daemon's create request.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pyxen import hostmem
from pyxen.domctl import CreateError, create_domain
from pyxen.hostmem import MAX_RAM_MIB
from pyxen.hv.domain import DomainSpec
from pyxen.hv.machine import Machine
from tests.conftest import cli


def _create_error(guest: Path, **kw: object) -> str:
    spec = DomainSpec(name="sz", kernel=str(guest / "hello"), **kw)  # type: ignore[arg-type]
    with pytest.raises(CreateError) as ei:
        create_domain(spec, start=False)
    return str(ei.value)


def test_builder_refuses_memory_beyond_the_host(guest: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec without a config file asks for more memory than the host has."""
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal: 4194304 kB\nMemAvailable: 2097152 kB\n")
    monkeypatch.setattr(hostmem, "MEMINFO", str(fake))
    assert _create_error(guest, memory_mib=4096) == (
        f"memory: 4096 MiB is more than this host has available (2048 MiB MemAvailable in {fake})")


def test_builder_refuses_500000_mib(guest: Path) -> None:
    """The issue's reproducer, against this host's real /proc/meminfo."""
    msg = _create_error(guest, memory_mib=500000)
    assert msg.startswith("memory: 500000 MiB is more than "), msg
    assert "Errno" not in msg


def test_builder_refuses_a_domain_larger_than_the_address_map(
        guest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostmem, "MEMINFO", "/nonexistent")  # as on a host with TiBs free
    assert _create_error(guest, memory_mib=MAX_RAM_MIB + 1) == (
        f"memory: {MAX_RAM_MIB + 1} MiB is more than a pyxen domain can have "
        f"(at most {MAX_RAM_MIB} MiB)")
    assert _create_error(guest, memory_mib=64, maxmem_mib=10 * MAX_RAM_MIB).startswith(
        f"maxmem: {10 * MAX_RAM_MIB} MiB is more than a pyxen domain can have")


@pytest.mark.parametrize("kw, msg", [
    ({"memory_mib": 0}, "memory: must be at least 1, got 0"),
    ({"memory_mib": -64}, "memory: must be at least 1, got -64"),
    ({"memory_mib": "64"}, "memory: expected a whole number, got '64'"),
    ({"memory_mib": 1.5}, "memory: expected a whole number, got 1.5"),
    ({"memory_mib": 16, "maxmem_mib": -1}, "maxmem: must be at least 0, got -1"),
    ({"memory_mib": 16, "vcpus": 2}, "vcpus: only 1 vCPU is supported so far "
                                     "(secondary vCPUs are not implemented), got 2"),
    ({"memory_mib": 16, "maxvcpus": 8}, "maxvcpus: only 1 vCPU is supported so far "
                                        "(secondary vCPUs are not implemented), got 8"),
    ({"memory_mib": 16, "vcpus": 0}, "vcpus: must be at least 1, got 0"),
])
def test_builder_refuses_bad_sizes(guest: Path, kw: dict[str, object], msg: str) -> None:
    assert _create_error(guest, **kw) == msg


def test_machine_refuses_a_size_its_address_map_cannot_hold(kvm_ok: None) -> None:
    """The last guard before KVM: a clear ValueError, not EEXIST from a slot."""
    with pytest.raises(ValueError, match=r"memory must be 1 page\.\.262144 MiB"):
        Machine((MAX_RAM_MIB + 1) * 256, 1)
    with pytest.raises(ValueError, match="memory must be"):
        Machine(0, 1)


def test_kvm_names_overlapping_memory_slots(kvm_ok: None) -> None:
    """VM.set_memory says which slots overlap instead of a bare errno 17."""
    import mmap

    from pyxen.hv.atomic import address_of
    from pyxen.kvm import VM, KvmError
    vm = VM()
    a = mmap.mmap(-1, 2 << 20)
    b = mmap.mmap(-1, 2 << 20)
    try:
        vm.set_memory(0, 0x100000000, 2 << 20, address_of(a))
        with pytest.raises(KvmError) as ei:
            vm.set_memory(1, 0x100100000, 2 << 20, address_of(b))
        assert ei.value.errno == errno.EEXIST
        assert str(ei.value) == (
            "[Errno 17] memory slot 1 at GPA 0x100100000+0x200000 overlaps slot 0 "
            "at GPA 0x100000000+0x200000")
        with pytest.raises(KvmError, match=r"KVM_SET_USER_MEMORY_REGION slot 2 at GPA "
                                           r"0x1001\+0x200000: Invalid argument"):
            vm.set_memory(2, 0x1001, 2 << 20, address_of(b))  # unaligned
    finally:
        vm.close()


def test_api_create_request_without_config_file(host, guest: Path) -> None:
    """The daemon path: a raw create request (no xl.cfg to check it first)."""
    from pyxen.toolstack.api import PyxenError
    for spec, msg in [({"memory_mib": 500000}, "memory: 500000 MiB is more than "),
                      ({"memory_mib": 16, "vcpus": 2}, "vcpus: only 1 vCPU is supported")]:
        req = {"op": "create", "actions": {},
               "spec": {"name": "sz", "kernel": str(guest / "hello"),
                        "cmdline": "", **spec}}
        with pytest.raises(PyxenError) as ei:
            host.create_request(req)
        assert msg in str(ei.value), str(ei.value)
        assert "Errno" not in str(ei.value)


@pytest.mark.parametrize("override, msg", [
    ("memory=500000", "pyxen: <command line>:1: memory: 500000 MiB is more than "),
    ("vcpus=2", "pyxen: <command line>:1: vcpus: only 1 vCPU is supported so far"),
])
def test_cli_refuses_with_one_located_line(host, override: str, msg: str) -> None:
    r = cli(["create", "examples/hello.cfg", override], host.run_dir)
    err = r.stderr.decode()
    assert r.returncode != 0
    assert msg in err, err
    assert "Traceback" not in err and "Errno" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("pyxen:")] == [err.splitlines()[-1]]
