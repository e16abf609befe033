"""The watchdog's deadline protocol, on the shared clock (BOOTTIME)."""

from __future__ import annotations

import time
from pathlib import Path

from hapair.shared.clock import boottime


def test_the_deadline_protocol_is_on_boottime() -> None:
    """Agent, session, supervisor, peer path and watchdog count on one clock, the one
    that goes on during a suspend. (A suspend cannot be made in a test here: this
    checks that every fence deadline is read from CLOCK_BOOTTIME.)"""
    import inspect

    from hapair.shared import lease
    from hapair.workshop_agent import probes, supervisor, watchdog
    from hapair.workshop_agent.agent import Agent
    from hapair.workshop_agent.settings import AgentSettings

    assert abs(boottime() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 0.01
    assert inspect.signature(watchdog.serve).parameters["clock"].default is boottime
    assert inspect.signature(lease.Session).parameters["clock"].default is boottime
    assert inspect.signature(supervisor.Supervisor).parameters["clock"].default is boottime
    assert inspect.signature(probes.NetworkProbes).parameters["clock"].default is boottime
    agent = Agent(AgentSettings(node="n", etcd="127.0.0.1:1", state_dir=Path("/nonexistent")))
    assert agent.clock is boottime


def test_the_lease_lines_set_and_clear_the_lease_to_revoke() -> None:
    from hapair.workshop_agent.watchdog import Registered, _apply

    reg = Registered()
    assert _apply(["lease", "1a2b"], reg, 5.0) == 5.0
    assert reg.lease == 0x1A2B
    assert not reg, "a lease alone is nothing to kill at a deadline"
    _apply(["lease", "-"], reg, 5.0)
    assert reg.lease is None
    for bad in (["lease", "zz"], ["lease", ""]):
        try:
            _apply(bad, reg, 5.0)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")
    _apply(["lease"], reg, 5.0)  # wrong arity: ignored
    assert reg.lease is None


def test_the_link_tells_the_watchdog_where_etcd_is_and_each_new_lease_once() -> None:
    from hapair.shared.pki import TlsFiles
    from hapair.workshop_agent.watchdog import WatchdogLink, _target

    tls = TlsFiles(Path("/p/ca.crt"), Path("/p/a.crt"), Path("/p/a.key"))
    link = WatchdogLink((), "https://127.0.0.1:2379", tls)
    args = link._etcd_args
    assert args == [
        "--etcd", "https://127.0.0.1:2379",
        "--etcd-ca", "/p/ca.crt", "--etcd-cert", "/p/a.crt", "--etcd-key", "/p/a.key",
    ]  # fmt: skip
    target = _target(args)
    assert target is not None and target.secure and target.key == Path("/p/a.key")
    assert _target([]) is None, "no etcd given: nothing to revoke, the lease expires"
    assert _target(["--etcd", "https://127.0.0.1:2379"]) is None, "https without a CA"
    assert WatchdogLink()._etcd_args == []

    sent: list[str] = []
    link._send = sent.append  # type: ignore[method-assign]
    link.lease(0x1F)
    link.lease(0x1F)
    link.lease(None)
    assert sent == ["lease 1f", "lease -"]
