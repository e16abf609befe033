"""A node taken out of the topology while its agent runs.

An administrator removes the active from its pair (or the pair from the site) and
applies the topology: the active's agent must step down as on any other reason (its
services stopped first, then its key given away), keep running and wait for a topology
that names it again; the pair's remaining nodes elect among themselves. A removed
standby leaves the active alone.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.test_etcd_loss import service_pids
from tests.integration.test_failover import pair
from tests.support.cluster import Cluster, until
from tests.support.harness import free_port

pytestmark = pytest.mark.e2e

NET = 157


async def three_nodes(cluster: Cluster) -> tuple[dict[str, Any], int]:
    """p with a active, b and c healthy standbys; returns the pair's spec and a's epoch."""
    spec = pair("p", ["a", "b", "c"], NET, free_port(), cluster.record)
    await cluster.apply(cluster.site([spec]))
    cluster.start("a")
    _, epoch = await cluster.active("p", node="a", timeout=20)
    for node in ("b", "c"):
        cluster.start(node)
        await cluster.standby(node, timeout=20)
    assert service_pids(cluster, "a")
    return spec, epoch


def without(spec: dict[str, Any], node: str) -> dict[str, Any]:
    """The pair's spec without ``node``; the others keep their addresses."""
    return {**spec, "nodes": [n for n in spec["nodes"] if n["name"] != node]}


REMOVED = 'reason="node removed from the topology"'


async def a_stepped_down_and_waits(cluster: Cluster) -> None:
    """a's services stopped and its key given away for its removal; its agent still
    runs and says in etcd that the topology does not name it; nothing raised."""

    async def a_down() -> bool:
        return not service_pids(cluster, "a") and REMOVED in cluster.log("a")

    await until(a_down, 20, "a stepped down: its services stopped, its key given away")
    await out_of_topology(cluster, "a")
    log = cluster.log("a")
    assert "Traceback" not in log, log[log.index("Traceback") :]
    assert "agent stopping" not in log


async def out_of_topology(cluster: Cluster, node: str) -> None:
    async def says_so() -> bool:
        st = await cluster.status(node)
        return st is not None and not st.healthy and "not in the applied topology" in st.problems

    await until(says_so, 20, f"{node}'s status: not in the applied topology")
    assert cluster.agents[node].poll() is None, f"{node}'s agent ended"


async def test_an_active_removed_from_its_pair_steps_down_and_the_others_elect(
    cluster: Cluster,
) -> None:
    spec, epoch = await three_nodes(cluster)
    await cluster.apply(cluster.site([without(spec, "a")]))
    await a_stepped_down_and_waits(cluster)
    node, _ = await cluster.active("p", not_epoch=epoch, timeout=20)
    assert node in ("b", "c")
    # Named again, a is a standby of its pair as before.
    await cluster.apply(cluster.site([spec]))
    await cluster.standby("a", timeout=20)
    assert "node back in the topology" in cluster.log("a")


async def test_an_active_whose_pair_is_removed_from_the_site_steps_down(
    cluster: Cluster,
) -> None:
    await three_nodes(cluster)
    other = pair("q", ["d", "e"], NET + 1, free_port(), cluster.record)
    await cluster.apply(cluster.site([other]))
    await a_stepped_down_and_waits(cluster)
    for node in ("b", "c"):
        await out_of_topology(cluster, node)

    # A node whose view had not yet taken the removal in may have campaigned when a
    # gave the key away: it steps down once it has.
    async def nobody_holds() -> bool:
        return await cluster.leader("p") is None

    await until(nobody_holds, 20, "nobody holding the removed pair")


async def test_a_standby_removed_from_the_pair_leaves_the_active_serving(
    cluster: Cluster,
) -> None:
    spec, epoch = await three_nodes(cluster)
    pids = service_pids(cluster, "a")
    await cluster.apply(cluster.site([without(spec, "c")]))

    async def c_left() -> bool:
        return "node removed from the topology" in cluster.log("c")

    await until(c_left, 20, "c took its removal in")
    await out_of_topology(cluster, "c")
    assert "Traceback" not in cluster.log("c")
    assert await cluster.leader("p") == ("a", epoch)
    assert service_pids(cluster, "a") == pids
