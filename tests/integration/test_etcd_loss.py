"""The coordinator lost: a three-member etcd, real agents, members killed with SIGKILL.

A lost etcd member or a new etcd leader must not move the pair. With etcd gone for
longer than the fence point, the active keeps its services only on the promises of
every other node over the peer path; missing one, it fences as usual. Every test ends
by proving from the services' own records that no two nodes ran the service at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hapair.shared import keys
from hapair.shared.records import Switchover
from tests.integration.test_failover import pair
from tests.support.cluster import Cluster, descendants, holds, pid_alive, until
from tests.support.etcd_relay import EtcdRelay, reading_relay
from tests.support.harness import EtcdCluster, free_port
from tests.support.tls_etcd import TestPki

pytestmark = pytest.mark.e2e

LOST_S = 6.0  # etcd gone for three lease TTLs: far past every fence point


@pytest.fixture
def etcd3(test_pki: TestPki) -> Iterator[EtcdCluster]:
    """Three members over TLS with client certificates, from the session's PKI."""
    members = EtcdCluster(pki=test_pki).start()
    try:
        yield members
    finally:
        members.cleanup()


@pytest.fixture
async def c3(etcd3: EtcdCluster, tmp_path: Path) -> AsyncIterator[Cluster]:
    # Cluster uses its url, tls, pki and client_args, which an EtcdCluster has.
    c = Cluster(etcd3, tmp_path)  # type: ignore[arg-type]
    try:
        yield c
    finally:
        await c.stop_all()
    c.assert_no_overlap()


def with_peer_path(spec: dict[str, Any], net: int, key: Path | None = None) -> dict[str, Any]:
    """The pair's nodes talk over a peer path, authenticated with ``key`` if given."""
    spec["network"] = {
        "probe_interval_s": 0.2,
        "isolation_after_s": 1.0,
        "peer_port": free_port(f"127.0.{net}.1"),
        **({"peer_key_file": str(key)} if key is not None else {}),
    }
    return spec


def service_pids(c: Cluster, node: str) -> set[int]:
    """The test services running under ``node``'s agent, read from /proc, not etcd."""
    out = set()
    for pid in descendants(c.agents[node].pid):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"svc.py" in cmdline and pid_alive(pid):
                out.add(pid)
    return out


async def started(c: Cluster, nodes: list[str], net: int, peer_path: bool = True) -> set[int]:
    spec = pair("p", nodes, net, free_port(), c.record)
    await c.apply(c.site([with_peer_path(spec, net) if peer_path else spec]))
    c.start(nodes[0])
    await c.active("p", node=nodes[0], timeout=20)
    for n in nodes[1:]:
        c.start(n)
        await c.standby(n, timeout=20)
    pids = service_pids(c, nodes[0])
    assert len(pids) == 1
    return pids


async def a_behind_a_relay(
    c: Cluster,
    nodes: list[str],
    net: int,
    b_too: bool = False,
    key: Path | None = None,
    reading: bool = False,
) -> tuple[EtcdRelay, dict[str, Any], int]:
    """Pair p with a peer path (authenticated with ``key`` if given): a active, reaching
    etcd through a relay the test may cut (b too with ``b_too``), and b a standby. The
    relay (one that reads the gRPC frames with ``reading``), the pair's spec and a's
    epoch."""
    relay = reading_relay(c.etcd) if reading else EtcdRelay(c.etcd.url)
    await relay.heal()
    spec = with_peer_path(pair("p", nodes, net, free_port(), c.record), net, key)
    await c.apply(c.site([spec]))
    c.start("a", "--etcd", relay.url)
    _, epoch = await c.active("p", node="a", timeout=20)
    c.start("b", *(["--etcd", relay.url] if b_too else []))
    await c.standby("b", timeout=20)
    return relay, spec, epoch


def only(c: Cluster, node: str, pids: set[int]) -> Callable[[], Any]:
    async def same() -> bool:
        others = [n for n in c.agents if n != node]
        return service_pids(c, node) == pids and not any(service_pids(c, n) for n in others)

    return same


async def a_keeps_the_pair_until_healed(
    c: Cluster, relay: EtcdRelay, pids: set[int], epoch: int, what: str, says: str = ""
) -> None:
    """a, cut off, runs the service alone for ``LOST_S`` (``what`` names the failure) and
    the log of ``says`` (``node: line``) shows why; then a's link to etcd heals, its lease
    is gone, and the pair is elected again."""
    await holds(only(c, "a", pids), LOST_S, what)
    if says:
        node, line = says.split(": ", 1)
        assert line in c.log(node)
    await relay.heal()
    await c.active("p", not_epoch=epoch, timeout=30)
    await relay.cut()


async def test_one_member_lost_changes_nothing(etcd3: EtcdCluster, c3: Cluster) -> None:
    pids = await started(c3, ["a", "b"], 41)
    lead = await c3.leader("p")
    follower = next(i for i in range(3) if i != etcd3.leader())
    etcd3.stop(follower)
    await holds(only(c3, "a", pids), LOST_S / 2, "the pair changed after one member was lost")
    assert await c3.leader("p") == lead
    etcd3.restart(follower)


async def test_etcd_leader_lost_changes_nothing(etcd3: EtcdCluster, c3: Cluster) -> None:
    pids = await started(c3, ["a", "b"], 42)
    lead = await c3.leader("p")
    etcd3.stop(etcd3.leader())
    await holds(only(c3, "a", pids), LOST_S / 2, "the pair changed after the etcd leader died")
    assert await c3.leader("p") == lead


async def test_quorum_lost_the_active_holds_on_its_peers_promises(
    etcd3: EtcdCluster, c3: Cluster
) -> None:
    pids = await started(c3, ["a", "b"], 43)
    lead = await c3.leader("p")
    lost = [i for i in range(3) if i != etcd3.leader()]
    for i in lost:
        etcd3.stop(i)
    await holds(only(c3, "a", pids), LOST_S, "the active lost its services without etcd")
    assert "holding the pair on the peers' promises" in c3.log("a")
    for i in lost:
        etcd3.restart(i)

    async def confirmed_again() -> bool:
        return "etcd confirms the lease again" in c3.log("a")

    await until(confirmed_again, 20, "a's lease confirmed once etcd has its quorum back")
    assert await c3.leader("p") == lead, "the pair moved"
    assert service_pids(c3, "a") == pids, "the service was restarted"


async def test_quorum_lost_one_peer_silent_the_active_fences(
    etcd3: EtcdCluster, c3: Cluster
) -> None:
    """c's agent is down: it cannot promise, so a may not count on anyone's promise."""
    pids = await started(c3, ["a", "b", "c"], 44)
    c3.crash("c")
    lost = [i for i in range(3) if i != etcd3.leader()]
    for i in lost:
        etcd3.stop(i)

    async def fenced() -> bool:
        return not service_pids(c3, "a")

    # The lease's own fence point (1.5 s) after the last confirmed keepalive.
    await until(fenced, 4, "a fenced: one peer could not promise")
    assert not any(pid_alive(p) for p in pids)
    assert not service_pids(c3, "b")
    for i in lost:
        etcd3.restart(i)
    await c3.active("p", timeout=30)


async def test_quorum_lost_without_a_peer_path_the_active_fences(
    etcd3: EtcdCluster, c3: Cluster
) -> None:
    await started(c3, ["a", "b"], 45, peer_path=False)
    lost = [i for i in range(3) if i != etcd3.leader()]
    for i in lost:
        etcd3.stop(i)

    async def fenced() -> bool:
        return not service_pids(c3, "a")

    await until(fenced, 4, "a fenced: no peer path, nobody to promise")
    for i in lost:
        etcd3.restart(i)
    await c3.active("p", timeout=30)


async def test_active_cut_from_etcd_holds_while_its_peer_hears_it(cluster: Cluster) -> None:
    """Only a's link to etcd breaks: b sees a's key expire, but promised a not to
    campaign and keeps that promise; a keeps the pair. When a's link comes back its
    lease is gone: it fences, and the pair is elected again without an overlap."""
    relay, _, epoch = await a_behind_a_relay(cluster, ["a", "b"], 46)
    pids = service_pids(cluster, "a")
    await relay.cut()

    async def key_expired() -> bool:
        return await cluster.leader("p") is None

    await until(key_expired, 10, "a's leader key expired in etcd")
    await a_keeps_the_pair_until_healed(
        cluster,
        relay,
        pids,
        epoch,
        "b took over though it promised a to hold",
        "b: not campaigning: a peer holds the pair",
    )


@pytest.mark.long
async def test_a_restarted_standby_keeps_the_promise_its_earlier_run_gave(
    cluster: Cluster,
) -> None:
    """b is active and cut from etcd; a, the main, promised b not to campaign. a's agent
    is killed and started again: the new run knows nothing of that promise, yet must not
    campaign while it could still hold, though a is the main and etcd shows no active.
    A long lease keeps b on its promises for seconds, so a wrong campaign overlaps."""
    ttl = 8.0
    relay = EtcdRelay(cluster.etcd.url)
    await relay.heal()
    spec = with_peer_path(pair("p", ["a", "b"], 47, free_port(), cluster.record), 47)
    spec["failover"] = {"lease_ttl_s": ttl}
    await cluster.apply(cluster.site([spec]))
    cluster.start("a")
    _, epoch = await cluster.active("p", node="a", timeout=20)
    cluster.start("b", "--etcd", relay.url)
    await cluster.standby("b", timeout=20)
    await cluster.store.put(keys.switchover("p"), Switchover(to="b").encode())
    await cluster.active("p", node="b", not_epoch=epoch, timeout=20)
    pids = service_pids(cluster, "b")
    await relay.cut()

    async def key_expired() -> bool:
        return await cluster.leader("p") is None

    await until(key_expired, 3 * ttl, "b's leader key expired in etcd")
    assert "not campaigning: a peer holds the pair" in cluster.log("a")
    cluster.crash("a")
    cluster.start("a")
    await holds(only(cluster, "b", pids), ttl + 2.0, "a campaigned on a promise it forgot")
    await relay.heal()
    await cluster.active("p", not_epoch=epoch, timeout=30)
    await relay.cut()


async def test_a_node_added_while_the_active_is_cut_off_does_not_campaign(
    cluster: Cluster,
) -> None:
    """a is cut from etcd and holds the pair on b's promise. c is added to the pair
    meanwhile: a never sees the topology that lists c, so never asks c to hold. c sees
    no leader key, yet must not campaign while a may still hold the pair."""
    relay, spec, epoch = await a_behind_a_relay(cluster, ["a", "b"], 48)
    pids = service_pids(cluster, "a")
    await relay.cut()

    async def key_expired() -> bool:
        return await cluster.leader("p") is None

    await until(key_expired, 10, "a's leader key expired in etcd")
    grown = pair("p", ["a", "b", "c"], 48, 0, cluster.record)
    await cluster.apply(cluster.site([{**spec, "nodes": grown["nodes"]}]))
    cluster.start("c")
    await until(lambda: cluster.status("c"), 20, "c's agent up")
    # Longer than every wait a fresh agent makes before its first campaign.
    await a_keeps_the_pair_until_healed(
        cluster, relay, pids, epoch, "c campaigned while a held the pair"
    )
