"""The toolstack's side of Xen's suspend event channel, without KVM
(pyxen/migration/save.py): reading ``~/device/suspend/event-channel`` as
xs_suspend_evtchn_port does, binding and releasing dom0's end, the
subscription's send on suspend, and suspend_guest's two ways and timeouts
against a stand-in domain."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pyxen import abi
from pyxen.hv import evtchn as E
from pyxen.migration import save as SV


@pytest.mark.parametrize(("value", "port"), [
    (None, -1), ("", -1), ("7", 7), ("  12", 12), ("+3", 3), ("5abc", 5), ("abc", 0),
    (" 0x10", 0), ("-2", -2), ("99999999999", (1 << 31) - 1), ("\n9", 9),
])
def test_port_is_read_as_atoi(value: str | None, port: int) -> None:
    assert SV.suspend_evtchn_port(value) == port


class FakeDomain:
    """What SuspendChannel and suspend_guest use of a Domain.  ``behaviour``:
    what the "guest" does when its port is raised."""

    def __init__(self, behaviour: str = "suspend") -> None:
        self.domid = 5
        self.suspend_evtchn = 0
        self.shutdown_reason: int | None = None
        self.crashed = self.dying = False
        self.state = "running"
        self.on_state: Any = None
        self.raised: list[int] = []
        self.behaviour = behaviour
        self.resumed = 0
        self.logs: list[str] = []
        self.evtchn = E.EventChannels(self)  # type: ignore[arg-type]

    def raise_port(self, port: int, vcpu: int) -> None:
        self.raised.append(port)
        if self.behaviour == "suspend":
            threading.Thread(target=self.shutdown, args=(abi.SHUTDOWN_suspend,)).start()

    def shutdown(self, reason: int) -> None:  # as Domain.shutdown
        self.shutdown_reason = reason
        self.state = "shutdown"
        if reason == abi.SHUTDOWN_suspend and self.suspend_evtchn:
            self.evtchn.send(self.suspend_evtchn)
        if self.on_state:
            self.on_state(self)

    def resume_after_suspend(self, cancelled: bool = True) -> None:
        self.resumed += 1
        self.shutdown_reason = None
        self.state = "running"

    def log(self, line: str, always: bool = False) -> None:
        self.logs.append(line)


def test_bind_subscribe_release() -> None:
    d = FakeDomain()
    port = d.evtchn.alloc_unbound(0)
    ch = SV.SuspendChannel(d, port)  # type: ignore[arg-type]
    assert d.suspend_evtchn == port
    st = d.evtchn.ports[port]
    assert st.state == E.ST_INTERDOMAIN and st.remote_dom == 0 and st.remote_port == SV.SUSPEND_DOM0_PORT
    ch.release()
    st = d.evtchn.ports[port]
    assert st.state == E.ST_UNBOUND and st.remote_dom == 0 and d.suspend_evtchn == 0
    SV.SuspendChannel(d, port).release()  # ready for the next save


@pytest.mark.parametrize("how", ["not allocated", "for another domain", "port 0"])
def test_bind_failure_is_a_save_error(how: str) -> None:
    d = FakeDomain()
    port = {"not allocated": 40, "for another domain": d.evtchn.alloc_unbound(3), "port 0": 0}[how]
    with pytest.raises(SV.SaveError, match="suspend event channel initialization failed"):
        SV.SuspendChannel(d, port)  # type: ignore[arg-type]
    assert d.suspend_evtchn == 0


def test_release_leaves_a_reused_port_alone() -> None:
    """The guest closed its suspend port and a backend took the number: not ours to unbind."""
    d = FakeDomain()
    port = d.evtchn.alloc_unbound(0)
    ch = SV.SuspendChannel(d, port)  # type: ignore[arg-type]
    d.evtchn.ports[port] = E.Channel(E.ST_INTERDOMAIN, 0, 0, 0x8000, backend=lambda: None)
    ch.release()
    assert d.evtchn.ports[port].remote_port == 0x8000


def test_suspend_through_the_channel() -> None:
    d = FakeDomain()
    port = d.evtchn.alloc_unbound(0)
    ch = SV.SuspendChannel(d, port)  # type: ignore[arg-type]
    asked: list[str] = []
    assert SV.suspend_guest(d, 5.0, ch, asked.append) == "event channel"  # type: ignore[arg-type]
    assert d.raised == [port] and asked == [] and ch.fired.is_set()
    assert d.evtchn.ports[port].state == E.ST_UNBOUND and d.on_state is None


def test_suspend_through_xenstore() -> None:
    d = FakeDomain(behaviour="none")
    asked: list[str] = []

    def ask(v: str) -> None:
        asked.append(v)
        threading.Thread(target=d.shutdown, args=(abi.SHUTDOWN_suspend,)).start()
    assert SV.suspend_guest(d, 5.0, None, ask) == "xenstore"  # type: ignore[arg-type]
    assert asked == ["suspend"] and d.raised == []


def test_xenstore_timeout_withdraws_the_request() -> None:
    d = FakeDomain(behaviour="none")
    asked: list[str] = []
    with pytest.raises(SV.SaveError, match="did not suspend within"):
        SV.suspend_guest(d, 0.05, None, asked.append)  # type: ignore[arg-type]
    assert asked == ["suspend", ""]


def test_channel_timeout_then_late_suspend_is_cancelled() -> None:
    d = FakeDomain(behaviour="none")
    port = d.evtchn.alloc_unbound(0)
    ch = SV.SuspendChannel(d, port)  # type: ignore[arg-type]
    with pytest.raises(SV.SaveError, match="did not suspend within"):
        SV.suspend_guest(d, 0.05, ch, lambda v: None)  # type: ignore[arg-type]
    assert ch.late and d.suspend_evtchn == port  # still subscribed: a late suspend is heard
    d.shutdown(abi.SHUTDOWN_suspend)
    for _ in range(200):
        if d.evtchn.ports[port].state == E.ST_UNBOUND:
            break
        threading.Event().wait(0.01)
    assert d.resumed == 1 and d.shutdown_reason is None
    assert d.evtchn.ports[port].state == E.ST_UNBOUND
    SV.SuspendChannel(d, port).release()


def test_stale_binding_is_taken_back() -> None:
    """An earlier request timed out and the guest never suspended: the next
    save binds the same port again."""
    d = FakeDomain(behaviour="none")
    port = d.evtchn.alloc_unbound(0)
    SV.SuspendChannel(d, port)  # type: ignore[arg-type]  # (left bound)
    ch = SV.SuspendChannel(d, port)  # type: ignore[arg-type]
    assert d.evtchn.ports[port].backend == ch._fire


def test_crash_instead_of_suspend() -> None:
    d = FakeDomain(behaviour="none")

    def ask(v: str) -> None:
        def crash() -> None:
            d.crashed = True
            d.shutdown_reason = abi.SHUTDOWN_crash
            d.state = "crashed"
            d.on_state(d)
        threading.Thread(target=crash).start()
    with pytest.raises(SV.SaveError, match="crashed instead of suspending"):
        SV.suspend_guest(d, 5.0, None, ask)  # type: ignore[arg-type]
