"""A node campaigns only if the pair's last active acknowledged it as a member.

An active cut off from etcd keeps its pair on the promises of the peers it knows. A node
added to the pair meanwhile was never asked; the ``held_by`` of the other nodes' status
is all that could stop it, and a view of the nodes that lags the view of the pairs does
not show it. The pair's member set, written by the active in etcd and read from the same
watch as the leader key, does.
"""

from __future__ import annotations

import pytest
from cluster import Cluster, holds, until
from etcd_relay import EtcdRelay
from harness import free_port
from test_etcd_loss import LOST_S, only, service_pids, with_peer_path
from test_failover import pair

pytestmark = pytest.mark.e2e

NODES_LAG_S = 120.0  # longer than the test: c never sees a node status change


async def test_a_node_added_while_the_active_is_cut_off_waits_though_it_sees_no_holder(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a is cut from etcd and holds the pair on b's promise; c is added to the pair
    meanwhile. c's view of the nodes lags its view of the pairs, so it sees a's leader
    key gone but never b's ``held_by``: only the member set can keep it from taking the
    pair while a still runs the service."""
    relay = EtcdRelay(cluster.etcd.url)
    await relay.heal()
    spec = with_peer_path(pair("p", ["a", "b"], 49, free_port(), cluster.record), 49)
    await cluster.apply(cluster.site([spec]))
    cluster.start("a", "--etcd", relay.url)
    _, epoch = await cluster.active("p", node="a", timeout=20)
    cluster.start("b")
    await cluster.standby("b", timeout=20)
    # c's agent runs before c is in the topology: its view of the nodes (a active, b
    # free) is loaded now, and every later change reaches it only after the lag.
    monkeypatch.setenv("HAPAIR_TEST_NODES_LAG_S", str(NODES_LAG_S))
    cluster.start("c")
    monkeypatch.delenv("HAPAIR_TEST_NODES_LAG_S")

    async def c_waits_for_the_topology() -> bool:
        return "is not in the applied topology" in cluster.log("c")

    await until(c_waits_for_the_topology, 20, "c's agent up, waiting for its topology")
    pids = service_pids(cluster, "a")
    await relay.cut()

    async def b_holds() -> bool:
        st = await cluster.status("b")
        return await cluster.leader("p") is None and st is not None and st.held_by == "a"

    await until(b_holds, 10, "a's key expired and b promised a to hold")
    grown = pair("p", ["a", "b", "c"], 49, 0, cluster.record)
    await cluster.apply(cluster.site([{**spec, "nodes": grown["nodes"]}]))
    await until(lambda: cluster.status("c"), 20, "c's agent in the pair")
    # Longer than every wait a node makes before its first campaign.
    await holds(only(cluster, "a", pids), LOST_S, "c campaigned while a held the pair")
    assert "not yet acknowledged as a member of the pair by its active" in cluster.log("c")
    await relay.heal()
    await cluster.active("p", not_epoch=epoch, timeout=30)
    await relay.cut()
