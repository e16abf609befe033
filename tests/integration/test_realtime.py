"""The agent's event loop and its watchdog run under real-time scheduling, the watchdog
one priority above; what they start runs as an ordinary process (``priority.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hapair.registry.console.drill_faults import descendants
from hapair.workshop_agent import priority
from tests.integration.test_failover import pair, service_pid
from tests.support.cluster import Cluster, until
from tests.support.harness import free_port

pytestmark = pytest.mark.e2e


def policy(pid: int) -> tuple[int, int]:
    """(scheduling policy with its flags, real-time priority) of ``pid``'s main thread."""
    return os.sched_getscheduler(pid), os.sched_getparam(pid).sched_priority


def watchdog_of(agent: int) -> int | None:
    for pid in descendants(agent):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"hapair.workshop_agent.watchdog" in cmdline:
            return pid
    return None


async def test_the_agent_and_its_watchdog_run_real_time_and_their_services_do_not(
    cluster: Cluster,
) -> None:
    await cluster.apply(cluster.site([pair("p", ["a", "b"], 251, free_port(), cluster.record)]))
    agent = cluster.start("a", "--realtime-priority", "20").pid
    await cluster.active("p", node="a")
    svc = await service_pid(cluster, "a")
    watchdog = await until(lambda: _found(watchdog_of(agent)), 5, "a's watchdog")
    assert policy(agent) == (priority.POLICY, 20)
    assert policy(watchdog) == (priority.POLICY, 21)
    assert policy(svc) == (os.SCHED_OTHER, 0), "a service inherited the real-time policy"
    assert 'event="real-time scheduling" node=a policy=SCHED_RR priority=20' in cluster.log("a")


async def test_off_when_asked_with_a_warning(cluster: Cluster) -> None:
    await cluster.apply(cluster.site([pair("p", ["a", "b"], 252, free_port(), cluster.record)]))
    agent = cluster.start("a", "--realtime-priority", "0").pid
    await cluster.active("p", node="a")
    watchdog = await until(lambda: _found(watchdog_of(agent)), 5, "a's watchdog")
    assert policy(agent) == (os.SCHED_OTHER, 0)
    assert policy(watchdog) == (os.SCHED_OTHER, 0)
    assert "real-time scheduling off" in cluster.log("a")


async def _found(pid: int | None) -> int | None:
    return pid
