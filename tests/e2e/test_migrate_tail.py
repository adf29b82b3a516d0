"""The destination's END to unpause (issue 11's downtime): what was moved out
of it or made cheaper keeps its result.

* The M2P, written at each live round's end and only patched at END
  (``restore._Restorer._sync_m2p``): a pfn populated in a round and given
  back later reads INVALID_M2P_ENTRY, a pfn given back before a round end
  and populated again in the last round reads its pfn, every other page its
  pfn, and the domain runs on from the result.
* ``domproc.tap_root_qdisc``: a multi-queue TAP gets one root pfifo_fast
  (it then comes up without building 256 queues' qdiscs), and an unknown
  interface is the kernel's error, not a crash.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.e2e.test_migrate import saved_ticker

INVALID_M2P = (1 << 64) - 1


def _m2p(d, mfn: int) -> int:  # noqa: ANN001
    idx = mfn * 8
    pg = d.machine.m2p_page_of[idx >> 12]
    return int(struct.unpack_from("<Q", d.machine.hv, pg * 4096 + (idx & 4095))[0])


def test_m2p_follows_the_rounds_in_process(run_guest) -> None:  # noqa: ANN001
    """A 16 MiB ticker's save restored into a domain of 32 MiB maxmem, with
    live rounds: pfn 5000 (above the ticker's memory, mapped by nothing)
    is populated in round 1 and given back (XTAB) after it; one of the
    ticker's own data pages is given back before round 1 ends and sent again
    in the last round.  After END the M2P says exactly which pfns the
    domain holds, and the ticker, resumed from the result, runs on."""
    from pyxen.hv import machine as M
    from pyxen.hv.domain import Domain
    from pyxen.migration import restore
    from pyxen.migration import stream as S
    raw, tail, pages = saved_ticker(run_guest, 3)
    back = max(p for p, (t, _) in pages.items() if t == S.PageType.NOTAB)
    extra_pfn = 5000

    def page(pfn: int, t: S.PageType, data: bytes | None) -> bytes:
        return S.encode_record(S.Rec.PAGE_DATA, S.PageData([(pfn, t)], [data] if data else []).pack())

    def round_end(n: int) -> bytes:
        return S.encode_record(S.Rec.PYXEN_ROUND_END, struct.pack("<II", n, 0))
    extra = (page(extra_pfn, S.PageType.NOTAB, b"\x5a" * 4096) + page(back, S.PageType.XTAB, None)
             + round_end(1)
             + page(extra_pfn, S.PageType.XTAB, None) + page(back, S.PageType.NOTAB, pages[back][1]))
    cfg, items = restore.read_config(S.iter_stream(io.BytesIO(raw[:tail] + extra + raw[tail:]), "t",
                                                   decode_pages=False))
    spec = restore.spec_from_config(cfg, 11)
    spec.maxmem_mib = 32
    out: list[bytes] = []
    d = Domain(spec, out.append, None, None, None)
    try:
        restore.restore_into(d, items)
        assert _m2p(d, extra_pfn + M.MFN_BASE) == INVALID_M2P
        assert extra_pfn in d.free_pfns
        assert _m2p(d, back + M.MFN_BASE) == back and back not in d.free_pfns
        held = [p for p in range(d.max_pages) if p not in d.free_pfns]
        assert len(held) >= 4096
        assert all(_m2p(d, p + M.MFN_BASE) == p for p in held)
        assert all(_m2p(d, p + M.MFN_BASE) == INVALID_M2P for p in range(4096, d.max_pages)
                   if p in d.free_pfns)
        from pyxen.backends.console import ConsoleBackend
        off = d.machine.ram_offset(d.start_info["console_mfn"])
        port = d.start_info["console_evtchn"]
        d.console = ConsoleBackend(d.machine.ram_view[off:off + 4096], d.console_output,
                                   lambda: d.raise_port(port, 0))
        d.start()
        end = time.monotonic() + 10
        while "ticker: suspend returned 0" not in b"".join(out).decode(errors="replace"):
            assert time.monotonic() < end, b"".join(out).decode(errors="replace")
            time.sleep(0.05)
    finally:
        d.destroy()
        d.close()


_QDISC_PROBE = r"""
import os, socket, subprocess, sys
sys.path.insert(0, sys.argv[1])
from pyxen.backends import netback
from pyxen.toolstack.domproc import tap_root_qdisc
subprocess.run(["ip", "link", "add", "pxq0", "type", "bridge"], check=True)
fd = netback.make_tap(77, 0, "pxq0")
tap_root_qdisc("vif77.0")
print(subprocess.run(["tc", "qdisc", "show", "dev", "vif77.0"], capture_output=True, text=True).stdout)
netback.link_up("vif77.0")
print("UP" if "UP" in subprocess.run(["ip", "link", "show", "vif77.0"], capture_output=True,
                                     text=True).stdout else "DOWN")
try:
    tap_root_qdisc("vif77.0", "no-such-qdisc")
except OSError as e:
    print("kind refused:", e.errno)
try:
    tap_root_qdisc("nosuchif0")
except OSError as e:
    print("no interface:", e.errno)
"""


def test_tap_root_qdisc_single_pfifo_fast() -> None:
    """In a network namespace of its own: the TAP's root qdisc is one
    pfifo_fast (no mq over 256 queues), it comes up, and a bad request is
    the kernel's errno (ENOENT for an unknown qdisc kind, ENODEV for an
    unknown interface), as OSError."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("tc") \
            or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root, unshare, tc (iproute2) and /dev/net/tun")
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", _QDISC_PROBE, str(ROOT)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    qdiscs = [line for line in r.stdout.splitlines() if line.startswith("qdisc ")]
    assert len(qdiscs) == 1 and qdiscs[0].startswith("qdisc pfifo_fast") and " root " in qdiscs[0], r.stdout
    assert "UP" in r.stdout.split()
    assert "kind refused: 2" in r.stdout, r.stdout
    assert "no interface: 19" in r.stdout, r.stdout
