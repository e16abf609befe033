"""The agent dies, the server lives: its watchdog kills the active's services and, once
they are confirmed gone, revokes the dead agent's lease, so the standby takes over at
once instead of after the lease's expiry. Real etcd (TLS, the agents' own certificates
and roles), real agents, ``kill -9``.

Each test watches the old node's services and the new node's service at once, and ends
by proving from the services' own record that no two runs overlapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.bench_failover import answers
from hapair.registry.console.drill_faults import descendants
from tests.integration.test_database_failover import (
    ADDRESSES,
    _db_cluster,
    endpoint_on,
    more_commits,
    postmaster,
    ready,
    rows_on,
    steady_writer,
)
from tests.integration.test_etcd_loss import service_pids
from tests.integration.test_failover import pair
from tests.integration.test_vip import (
    VIP,
    _a_active_with_the_address,
    _moved,
    _served_by,
    needs_lab,
)
from tests.support.cluster import Cluster, pid_alive, until
from tests.support.harness import Etcd, free_port
from tests.support.pg_harness import needs_postgres
from tests.support.vip_lab import LabSite, VipWatch

pytestmark = pytest.mark.e2e

BEFORE_REVOKE = "HAPAIR_TEST_WATCHDOG_BEFORE_REVOKE"


async def revoke_logged(c: Cluster) -> None:
    """a's watchdog says it revoked the dead agent's lease. It logs that once etcd has
    answered the revoke, which on a loaded machine may come after b saw the revoke and
    took the pair over."""
    await until(
        lambda: asyncio.sleep(0, "its lease revoked, its term ended" in c.log("a")),
        10,
        "a's watchdog saying it revoked the lease",
    )


def watchdog_of(c: Cluster, node: str) -> int:
    """The PID of ``node``'s agent's watchdog (a child of the agent)."""
    for pid in descendants(c.agents[node].pid):
        with contextlib.suppress(OSError):
            if b"hapair.workshop_agent.watchdog" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    raise AssertionError(f"no watchdog under {node}'s agent")


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


async def started(c: Cluster, net: int, **failover: Any) -> tuple[int, int]:
    """Pair p on a (active) and b (healthy standby): the service's port and a's epoch."""
    port = free_port()
    await c.apply(c.site([pair("p", ["a", "b"], net, port, c.record, **failover)]))
    c.start("a")
    _, epoch = await c.active("p", node="a")
    c.start("b")
    await c.standby("b")
    return port, epoch


async def serves_after_its_services_died(
    c: Cluster, old: set[int], host: str, port: int, within: float, what: str
) -> float:
    """Watch the old services and the new one at once until the new one answers, at
    most ``within`` seconds; fail if it ever answers while an old one still runs. The
    new one is read first: an old one alive after that was alive then too."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        serving = await asyncio.to_thread(answers, host, port)
        alive = {pid for pid in old if pid_alive(pid)}
        assert not (serving and alive), f"{host} served while {alive} still ran"
        if serving:
            return time.monotonic() - start
        await asyncio.sleep(0.005)
    raise AssertionError(f"{host}:{port} did not serve within {within} s: {what}")


async def test_a_killed_agent_s_lease_is_revoked_once_its_services_are_dead(
    cluster: Cluster,
) -> None:
    """kill -9 of the active's agent alone, not restarted. A lease of 10 s, renewed every
    2.5 s, cannot expire before 7.5 s after the kill: b serving before that shows the
    term ended by the watchdog, not by the lease's expiry."""
    ttl = 10.0
    port, epoch = await started(cluster, 70, lease_ttl_s=ttl)
    old = service_pids(cluster, "a")
    assert old
    cluster.signal("a", signal.SIGKILL)
    cluster.agents["a"].wait(5)
    await serves_after_its_services_died(
        cluster,
        old,
        "127.0.70.2",
        port,
        ttl - ttl / 4,
        "the term of the dead agent was not ended before its lease could expire",
    )
    node, new_epoch = await cluster.active("p", not_epoch=epoch)
    assert node == "b"
    await revoke_logged(cluster)
    # The revoke took the dead agent's status and endpoints with its key.
    assert await cluster.status("a") is None
    endpoint = await until(lambda: cluster.endpoint("p-svc"), 5, "endpoint of b")
    assert (endpoint.node, endpoint.epoch) == ("b", new_epoch)

    # Restarted in place now, the agent finds nothing of its term left: it joins as
    # standby, and takes nothing back.
    cluster.start("a")
    await cluster.standby("a", timeout=20)
    assert await cluster.leader("p") == ("b", new_epoch)
    assert not await cluster.events("reclaim")
    cluster.assert_no_overlap()


async def test_a_watchdog_frozen_before_the_revoke_leaves_the_term_to_the_lease(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog kills the services, then stops itself right before the revoke (a
    test fault): nobody ends the term early, and the standby takes over once the lease
    has expired, as without the revoke."""
    port = free_port()
    await cluster.apply(cluster.site([pair("p", ["a", "b"], 71, port, cluster.record)]))
    monkeypatch.setenv(BEFORE_REVOKE, "stop")
    cluster.start("a")
    monkeypatch.delenv(BEFORE_REVOKE)
    _, epoch = await cluster.active("p", node="a")
    cluster.start("b")
    await cluster.standby("b")
    old = service_pids(cluster, "a")
    watchdog = watchdog_of(cluster, "a")
    try:
        cluster.signal("a", signal.SIGKILL)
        cluster.agents["a"].wait(5)
        await until(lambda: asyncio.sleep(0, state(watchdog) == "T"), 5, "the watchdog frozen")
        assert not any(pid_alive(pid) for pid in old), "frozen before killing the services"
        assert await cluster.leader("p") == ("a", epoch), "the term ended before the revoke"
        await serves_after_its_services_died(
            cluster, old, "127.0.71.2", port, 10.0, "the lease did not expire"
        )
        node, _ = await cluster.active("p", not_epoch=epoch)
        assert node == "b"
        assert state(watchdog) == "T", "the frozen watchdog did not end the term"
        assert "its term ended" not in cluster.log("a")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(watchdog, signal.SIGKILL)
    await until(lambda: asyncio.sleep(0, state(watchdog) in ("gone", "Z")), 5, "watchdog gone")
    cluster.assert_no_overlap()


@pytest.fixture
async def db_pair(etcd: Etcd, store: object) -> AsyncIterator[tuple[Cluster, int]]:
    async for pair_and_port in _db_cluster(etcd, ADDRESSES):
        yield pair_and_port


@needs_postgres
async def test_a_killed_agent_s_primary_is_dead_before_its_sync_standby_promotes(
    db_pair: tuple[Cluster, int],
) -> None:
    """The same with the pair's PostgreSQL: the watchdog kills the primary's postmaster,
    and only the recorded synchronous standby takes over, by its usual rules, with every
    acknowledged commit."""
    c, port = db_pair
    _, epoch = await ready(c, port)
    old = await postmaster(c, "a")
    writer = await steady_writer(port, 200)
    c.signal("a", signal.SIGKILL)
    c.agents["a"].wait(5)

    async def b_primary() -> bool:
        lead = await c.leader("p")
        st = await c.status("b") if lead is not None and lead[1] > epoch else None
        if st is None or st.role != "active":
            return False
        assert not pid_alive(old), "b active while a's primary still ran"
        return True

    await until(b_primary, 30, "b active")
    await revoke_logged(c)
    await endpoint_on(c, "b", epoch)
    await more_commits(writer, 50, 30, "commits on b")
    await writer.stop()
    lost = set(writer.acked) - await rows_on(port, "127.0.0.2")
    assert not lost, f"{len(lost)} acknowledged commits lost"


@needs_lab
async def test_a_killed_agent_s_address_is_off_its_node_before_the_standby_takes_it(
    tmp_path: Path,
) -> None:
    """The pair's virtual IP, in network namespaces: after kill -9 of the active's agent
    its watchdog removes the address and confirms it gone before the revoke; watched on
    both nodes at once, it is never on both."""
    async with LabSite(tmp_path, ["a", "b"]) as site:
        port, epoch = await _a_active_with_the_address(site)
        c = site.cluster
        async with VipWatch(site["a"], site["b"], VIP) as watch:
            c.signal("a", signal.SIGKILL)
            c.agents["a"].wait(5)
            await _moved(site, "b", epoch)
        assert watch.held("a") and watch.held("b")
        assert not watch.overlaps, f"on both nodes at once: {watch.overlaps[:1]}"
        await revoke_logged(c)
        await _served_by(site, port, "b")
    site.cluster.assert_no_overlap()
