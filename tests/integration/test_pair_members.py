"""A node campaigns only if the pair's last active acknowledged it as a member.

An active cut off from etcd keeps its pair on the promises of the peers it knows. A node
added to the pair meanwhile was never asked; the ``held_by`` of the other nodes' status
is all that could stop it, and a view of the nodes that lags the view of the pairs does
not show it. The pair's member set, written by the active in etcd and read from the same
watch as the leader key, does.
"""

from __future__ import annotations

import asyncio

import pytest

from hapair.shared import keys
from hapair.shared.records import Members, decode
from hapair.shared.store import Store
from hapair.workshop_agent.election import Election
from tests.integration.test_etcd_loss import (
    a_behind_a_relay,
    a_keeps_the_pair_until_healed,
    service_pids,
)
from tests.integration.test_failover import pair
from tests.support.cluster import Cluster, until
from tests.support.etcd_relay import EtcdRelay

pytestmark = pytest.mark.e2e

CAMPAIGNED = "c campaigned while a held the pair"
WAITED = "c: not yet acknowledged as a member of the pair by its active"
STALE = ("HAPAIR_TEST_NODES_LAG_S", "HAPAIR_TEST_TOPOLOGY_LAG_S")  # c keeps what it saw first
LAG_S = 120.0  # longer than the test: a lagging view never shows a change made in it


def start_lagging(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, node: str, *views: str
) -> None:
    """Start ``node``'s agent with these views of etcd lagging its view of the pairs."""
    for view in views:
        monkeypatch.setenv(view, str(LAG_S))
    cluster.start(node)
    for view in views:
        monkeypatch.delenv(view)


async def cut_and_expired(cluster: Cluster, relay: EtcdRelay) -> None:
    """Cut a from etcd; return once its key expired and b promised a to hold."""
    await relay.cut()

    async def b_holds() -> bool:
        st = await cluster.status("b")
        return await cluster.leader("p") is None and st is not None and st.held_by == "a"

    await until(b_holds, 10, "a's key expired and b promised a to hold")


async def test_a_node_added_while_the_active_is_cut_off_waits_though_it_sees_no_holder(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a is cut from etcd and holds the pair on b's promise; c is added to the pair
    meanwhile. c's view of the nodes lags its view of the pairs, so it sees a's leader
    key gone but never b's ``held_by``: only the member set can keep it from taking the
    pair while a still runs the service."""
    relay, spec, epoch = await a_behind_a_relay(cluster, ["a", "b"], 49)
    # c's agent runs before c is in the topology: its view of the nodes (a active, b
    # free) is loaded now, and every later change reaches it only after the lag.
    start_lagging(cluster, monkeypatch, "c", "HAPAIR_TEST_NODES_LAG_S")

    async def c_waits_for_the_topology() -> bool:
        return "is not in the applied topology" in cluster.log("c")

    await until(c_waits_for_the_topology, 20, "c's agent up, waiting for its topology")
    pids = service_pids(cluster, "a")
    await cut_and_expired(cluster, relay)
    grown = pair("p", ["a", "b", "c"], 49, 0, cluster.record)
    await cluster.apply(cluster.site([{**spec, "nodes": grown["nodes"]}]))
    await until(lambda: cluster.status("c"), 20, "c's agent in the pair")
    # Longer than every wait a node makes before its first campaign.
    await a_keeps_the_pair_until_healed(cluster, relay, pids, epoch, CAMPAIGNED, WAITED)


async def test_a_node_removed_whose_agent_keeps_the_old_topology_does_not_campaign(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """c is removed from the pair; a takes the new topology in and no longer asks c to
    hold. c's agent keeps the old topology (its view of it lags), and its view of the
    nodes lags too: when a is cut from etcd, c sees a's key gone and nobody holding, yet
    must not campaign while a holds the pair on b's promise."""
    relay, spec, epoch = await a_behind_a_relay(cluster, ["a", "b", "c"], 53)
    start_lagging(cluster, monkeypatch, "c", *STALE)
    await cluster.standby("c", timeout=20)
    shrunk = pair("p", ["a", "b"], 53, 0, cluster.record)
    await cluster.apply(cluster.site([{**spec, "nodes": shrunk["nodes"]}]))

    async def a_took_the_removal_in() -> bool:
        if "topology changed" not in cluster.log("a"):
            return False
        kv = await cluster.store.get(keys.members("p"))
        return kv is None or "c" not in decode(Members, kv.value, kv.key).nodes

    await until(a_took_the_removal_in, 20, "a runs the topology without c")
    pids = service_pids(cluster, "a")
    await cut_and_expired(cluster, relay)
    await a_keeps_the_pair_until_healed(cluster, relay, pids, epoch, CAMPAIGNED, WAITED)


async def test_a_node_added_while_the_active_and_its_peer_are_cut_off_does_not_campaign(
    cluster: Cluster,
) -> None:
    """a and b are both cut from etcd; a holds the pair on b's promise over the peer
    path. b's status goes with its lease, so nothing in etcd says b promised anyone: c,
    added to the pair and started meanwhile, sees no active and nobody holding."""
    relay, spec, epoch = await a_behind_a_relay(cluster, ["a", "b"], 54, b_too=True)
    pids = service_pids(cluster, "a")
    await relay.cut()

    async def nothing_left_in_etcd() -> bool:
        return await cluster.leader("p") is None and await cluster.status("b") is None

    await until(nothing_left_in_etcd, 10, "a's key and b's status expired in etcd")
    grown = pair("p", ["a", "b", "c"], 54, 0, cluster.record)
    await cluster.apply(cluster.site([{**spec, "nodes": grown["nodes"]}]))
    cluster.start("c")
    await until(lambda: cluster.status("c"), 20, "c's agent up")
    # Longer than every wait a fresh agent makes before its first campaign.
    await a_keeps_the_pair_until_healed(cluster, relay, pids, epoch, CAMPAIGNED, WAITED)


async def test_an_active_cut_off_before_etcd_has_its_new_member_set_needs_the_old_members(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """c is removed from the pair; a takes the new topology in (its peer path no longer
    knows c) and is cut from etcd exactly as it sends the member set without c, which
    etcd never gets. etcd still lists c, whose agent keeps the old topology and sees no
    holder: c may campaign, so a must not hold the pair on b's promise alone. It fences
    at its lease's fence point, before its key can expire (the overlap check at the end
    proves no two runs met)."""
    # The relay finds the member set's key in the gRPC frames a sends: it ends a's TLS.
    relay, spec, _ = await a_behind_a_relay(cluster, ["a", "b", "c"], 55, reading=True)
    start_lagging(cluster, monkeypatch, "c", *STALE)
    await cluster.standby("c", timeout=20)
    relay.cut_at(keys.b(keys.members("p")))
    shrunk = pair("p", ["a", "b"], 55, 0, cluster.record)
    await cluster.apply(cluster.site([{**spec, "nodes": shrunk["nodes"]}]))
    await asyncio.wait_for(relay.cut_done.wait(), 20)
    kv = await cluster.store.get(keys.members("p"))
    assert kv is not None and "c" in decode(Members, kv.value, kv.key).nodes

    async def a_fenced() -> bool:
        return not service_pids(cluster, "a")

    # Generous: the lease's fence point is 1.5 s after a's last confirmed keepalive.
    await until(a_fenced, 10, "a fenced: c, still a member in etcd, never promised")
    assert "holding the pair on the peers' promises" not in cluster.log("a")
    await relay.heal()
    # Healed before its lease expired, a may take its own key up again at the same
    # epoch; otherwise b or c is elected. Either way the pair has one active again.
    await cluster.active("p", timeout=30)
    await relay.cut()


async def test_a_campaign_decided_on_an_older_member_set_loses(store: Store) -> None:
    """The member set changed between the decision and the campaign: the campaign loses
    rather than win on the old set; decided on the current one, it wins and records its
    own topology's nodes with the leader key. The active's rewrite is guarded by its
    epoch."""
    old = Election(store, "p", "a")
    first = await old.campaign(await store.grant(60), members=["a", "b"])
    assert first is not None
    kv = await store.get(keys.members("p"))
    assert kv is not None and kv.mod_revision == first
    assert decode(Members, kv.value, kv.key).nodes == ["a", "b"]
    written = await old.write_members(first, ["a", "b", "c"])
    assert written is not None
    await store.delete(keys.leader("p"))
    c = Election(store, "p", "c")
    lease = await store.grant(60)
    assert await c.campaign(lease, members=["a", "b", "c"], members_revision=first) is None
    assert await store.get(keys.leader("p")) is None
    epoch = await c.campaign(lease, members=["a", "b", "c"], members_revision=written[1])
    assert epoch is not None
    kv = await store.get(keys.members("p"))
    assert kv is not None and decode(Members, kv.value, kv.key).nodes == ["a", "b", "c"]
    assert await old.write_members(first, ["a"]) is None, "a stale term rewrote the set"
