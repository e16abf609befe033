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
