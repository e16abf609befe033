"""A service whose program could not start before the fence point it was forked with,
while its node kept its term, is started again in that term.

On a loaded machine, or with etcd far away (a keepalive's round trip eats into the
fence point), the exec guard of an active-only service may run after the fence point
the agent passed it at the fork, while the lease was confirmed again meanwhile: the
guard refuses, rightly. The term goes on, so the service must be started again, not
left stopped on an active node.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from hapair.shared.clock import boottime
from tests.integration.test_fence_services import forked_pids, site, stopped
from tests.support.cluster import Cluster, recording_service, until
from tests.support.harness import free_port

pytestmark = pytest.mark.e2e


def guard_until(pid: int) -> float:
    """The fence point the exec guard ``pid`` was given (its first argument)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    at = next(i for i, arg in enumerate(argv) if arg.endswith(b"/exec_guard.py"))
    return float(argv[at + 1])


async def test_a_service_refused_by_its_exec_guard_starts_again_while_the_term_goes_on(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a forks its service and a test hook stops the child (SIGSTOP) before its exec
    guard checks the fence point; the test resumes it once that fence point has passed,
    while a's lease is kept confirmed. The guard refuses; a keeps its term, and its
    service must run again in it."""
    port = free_port()
    svc = recording_service("p-svc", port, cluster.record, critical=True)
    await cluster.apply(site(cluster, 153, [svc]))
    monkeypatch.setenv("HAPAIR_TEST_STOP_GUARD", "p-svc")
    cluster.start("a")
    monkeypatch.delenv("HAPAIR_TEST_STOP_GUARD")
    forks = await until(
        lambda: asyncio.sleep(0, forked_pids(cluster, "a", "p-svc")), 30, "a forked its service"
    )
    child = forks[0]
    await until(lambda: asyncio.sleep(0, stopped(child)), 10, "the forked child stopped")
    fence_point = guard_until(child)
    lead = await cluster.leader("p")
    assert lead is not None and lead[0] == "a"
    await until(
        lambda: asyncio.sleep(0, boottime() > fence_point), 10, "the fork's fence point passed"
    )
    os.kill(child, signal.SIGCONT)
    await until(
        lambda: asyncio.sleep(0, len(forked_pids(cluster, "a", "p-svc")) > 1),
        15,
        "a's service forked again in its term",
    )
    await cluster.active("p", node="a", timeout=15)
    assert await cluster.leader("p") == lead, "a kept its term: nothing fenced it"
    assert "not started before the fence point it was forked with" in cluster.log("a")
    assert "event=fenced" not in cluster.log("a")
    cluster.assert_no_overlap()
