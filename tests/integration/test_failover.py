"""End to end: real etcd, real agent processes, real services, real signals.

Every test ends by proving, from the services' own record, that no two nodes of the
pair ever ran the service at the same time.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from hapair.shared import keys
from hapair.shared.records import Drained, Paused, Resource, ResourceReport, Switchover, TopologyDoc
from tests.support.cluster import Cluster, holds, pid_alive, recording_service, until
from tests.support.harness import free_port
from tests.support.tls_etcd import ADMIN, TestPki, TlsEtcd

pytestmark = pytest.mark.e2e


def pair(
    name: str,
    nodes: list[str],
    net: int,
    port: int,
    record: Path,
    services: list[dict[str, Any]] | None = None,
    **failover: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "nodes": [{"name": n, "address": f"127.0.{net}.{i + 1}"} for i, n in enumerate(nodes)],
        "failover": failover,
        "services": services
        if services is not None
        else [recording_service(f"{name}-svc", port, record, critical=True)],
    }


async def two_nodes(c: Cluster, net: int, **kw: Any) -> tuple[str, int]:
    await c.apply(c.site([pair("p", ["a", "b"], net, free_port(), c.record, **kw)]))
    c.start("a")
    active = await c.active("p", node="a")
    c.start("b")
    await c.standby("b")
    return active


async def service_pid(c: Cluster, node: str, service: str = "p-svc") -> int:
    async def pid() -> int | None:
        st = await c.status(node)
        svc = next((s for s in st.services if s.name == service), None) if st else None
        return svc.pid if svc is not None and svc.state == "running" else None

    return await until(pid, 10, f"{service} running on {node}")


async def test_main_wins_when_both_start_together(cluster: Cluster) -> None:
    await cluster.apply(cluster.site([pair("p", ["a", "b"], 10, free_port(), cluster.record)]))
    cluster.start("b")  # the secondary even starts first
    cluster.start("a")
    node, epoch = await cluster.active("p")
    assert node == "a"
    endpoint = await until(lambda: cluster.endpoint("p-svc"), 5, "endpoint published")
    assert (endpoint.node, endpoint.host, endpoint.epoch) == ("a", "127.0.10.1", epoch)
    standby = await until(lambda: cluster.status("b"), 5, "status of b")
    assert standby.role == "standby" and standby.epoch is None
    elections = await cluster.events("election")
    assert [e["node"] for e in elections] == ["a"]


@pytest.mark.lab  # the lab mode kept working end to end
async def test_agent_kill9_kills_its_services_and_standby_takes_over(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 11)
    svc = await service_pid(cluster, "a")
    cluster.signal("a", signal.SIGKILL)
    await until(lambda: asyncio.sleep(0, not pid_alive(svc)), 1.0, "service dead with agent")
    node, new_epoch = await cluster.active("p", not_epoch=epoch)
    assert node == "b" and new_epoch > epoch
    endpoint = await until(lambda: cluster.endpoint("p-svc"), 5, "endpoint of b")
    assert (endpoint.node, endpoint.epoch) == ("b", new_epoch)


async def test_server_crash_takeover_after_lease_expiry(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 12)
    crashed_at = time.monotonic()
    for pid in cluster.crash("a"):
        assert not pid_alive(pid)
    node, new_epoch = await cluster.active("p", not_epoch=epoch)
    took = time.monotonic() - crashed_at
    assert node == "b" and new_epoch > epoch
    # The lease (TTL 2 s, renewed every 0.5 s) had to expire first: nobody may take over
    # earlier, and etcd drops it within TTL + its 0.5 s expiry tick.
    assert 1.4 < took < 4.0, took
    endpoint = await until(lambda: cluster.endpoint("p-svc"), 5, "endpoint of b")
    assert endpoint.epoch == new_epoch


async def test_frozen_active_is_fenced_before_the_standby_starts(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 13)
    svc = await service_pid(cluster, "a")
    cluster.signal("a", signal.SIGSTOP)
    node, _ = await cluster.active("p", not_epoch=epoch)
    assert node == "b"
    assert not pid_alive(svc), "the frozen agent's service still ran when b took over"
    # The watchdog, not the frozen agent, stopped it.
    assert "agent did not confirm its lease" in cluster.log("a")
    cluster.signal("a", signal.SIGCONT)
    back = await until(lambda: cluster.status("a"), 10, "a back with a status")
    assert back.role == "standby"
    runs = [r for r in cluster.intervals() if r["node"] == "a"]
    assert len(runs) == 1, "a must not restart its service after waking up"
    assert (await cluster.leader("p")) is not None and (await cluster.leader("p"))[0] == "b"  # type: ignore[index]
    assert "fenced" in cluster.log("a")


async def test_critical_service_exit_moves_the_pair(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 14)
    cluster.kill_service(await service_pid(cluster, "a"))
    node, _ = await cluster.active("p", not_epoch=epoch)
    assert node == "b"
    resign = await until(lambda: cluster.events("resign"), 5, "resign event")
    assert "critical service p-svc" in resign[0]["reason"]
    assert len([r for r in cluster.intervals() if r["node"] == "a"]) == 1  # no restart


async def test_non_critical_service_restarts_in_place_then_moves(cluster: Cluster) -> None:
    svc = recording_service(
        "p-svc",
        free_port(),
        cluster.record,
        restart={"max_restarts": 2, "window_s": 60, "backoff_s": 0.05},
    )
    _, epoch = await two_nodes(cluster, 15, services=[svc])
    for restarts in (1, 2):
        cluster.kill_service(await service_pid(cluster, "a"))

        async def restarted(n: int = restarts) -> bool:
            st = await cluster.status("a")
            s = st.services[0] if st else None
            return s is not None and s.restarts == n and s.state == "running"

        await until(restarted, 10, f"restart {restarts} in place")
        assert await cluster.leader("p") == ("a", epoch)
    cluster.kill_service(await service_pid(cluster, "a"))
    node, _ = await cluster.active("p", not_epoch=epoch)
    assert node == "b"
    resign = await until(lambda: cluster.events("resign"), 5, "resign event")
    assert "service p-svc" in resign[0]["reason"]


@pytest.mark.lab  # the lab mode kept working end to end
async def test_planned_switchover(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 16)
    request = Switchover(by="test")
    await cluster.store.put(keys.switchover("p"), request.encode())
    node, new_epoch = await cluster.active("p", not_epoch=epoch)
    assert node == "b"
    events = await until(lambda: cluster.events("switchover"), 5, "switchover event")
    assert events[0]["details"]["request"] == request.id
    election = [e for e in await cluster.events("election") if e["node"] == "b"]
    assert election[0]["details"]["planned"] is True
    assert await cluster.store.get(keys.switchover("p")) is None
    assert await cluster.store.get(keys.handover("p")) is None
    endpoint = await until(lambda: cluster.endpoint("p-svc"), 5, "endpoint of b")
    assert (endpoint.node, endpoint.epoch) == ("b", new_epoch)


async def test_switchover_to_a_named_secondary_of_three(cluster: Cluster) -> None:
    await cluster.apply(cluster.site([pair("p", ["a", "b", "c"], 17, free_port(), cluster.record)]))
    for n in ("a", "b", "c"):
        cluster.start(n)
    _, epoch = await cluster.active("p", node="a")
    await cluster.standby("c")
    await cluster.store.put(keys.switchover("p"), Switchover(to="c").encode())
    node, _ = await cluster.active("p", not_epoch=epoch)
    assert node == "c"


async def test_switchover_waits_for_a_view_that_has_seen_its_target(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The active's view of the nodes lags its view of the commands (two watches): a
    switchover to a standby that has just come up must not be refused as "down"."""
    await cluster.apply(cluster.site([pair("p", ["a", "b", "c"], 24, free_port(), cluster.record)]))
    monkeypatch.setenv("HAPAIR_TEST_NODES_LAG_S", "1.0")
    cluster.start("a")
    monkeypatch.delenv("HAPAIR_TEST_NODES_LAG_S")
    _, epoch = await cluster.active("p", node="a")
    cluster.start("b")
    await cluster.standby("b")
    cluster.start("c")
    await cluster.standby("c")  # in etcd; the active's view of c is still a second behind
    await cluster.store.put(keys.switchover("p"), Switchover(to="c").encode())
    node, _ = await cluster.active("p", not_epoch=epoch)
    assert node == "c"
    assert await cluster.events("switchover_rejected") == []


async def test_switchover_to_an_unknown_node_is_refused(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 18)
    request = Switchover(to="zz")
    await cluster.store.put(keys.switchover("p"), request.encode())
    rejected = await until(lambda: cluster.events("switchover_rejected"), 5, "rejection")
    assert rejected[0]["details"]["request"] == request.id
    assert "zz is not a node of pair p" in rejected[0]["reason"]
    assert await cluster.leader("p") == ("a", epoch)
    assert await cluster.store.get(keys.switchover("p")) is None


async def test_pause_blocks_failover_until_resume(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 19)
    await cluster.store.put(keys.paused("p"), Paused(by="test").encode())
    cluster.crash("a")
    # The lease expires within 2.5 s; after that, b must still not take over.
    gone = await until(lambda: _no_leader(cluster), 5, "a's lease expired")
    assert gone
    await holds(lambda: _no_leader(cluster), 2.0, "b took over a paused pair")
    assert "pair paused" in cluster.log("b")
    await cluster.store.delete(keys.paused("p"))
    node, new_epoch = await cluster.active("p", not_epoch=epoch)
    assert node == "b" and new_epoch > epoch


async def _no_leader(c: Cluster) -> bool:
    return await c.leader("p") is None


async def test_drain_moves_the_active_away_and_keeps_the_node_out(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 20)
    await cluster.store.put(keys.drained("a"), Drained(by="test").encode())
    node, epoch2 = await cluster.active("p", not_epoch=epoch)
    assert node == "b"
    cluster.signal("b", signal.SIGTERM)  # b resigns on a clean stop
    gone = await until(lambda: _no_leader(cluster), 5, "b resigned")
    assert gone
    await holds(lambda: _no_leader(cluster), 1.0, "a drained node took over")
    await cluster.store.delete(keys.drained("a"))
    node, _ = await cluster.active("p", not_epoch=epoch2)
    assert node == "a"


async def test_invalid_topology_in_etcd_changes_nothing(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 21)
    kv = await cluster.store.get(keys.TOPOLOGY)
    assert kv is not None
    doc = TopologyDoc.model_validate_json(kv.value)
    bad = dict(doc.site)
    bad["workshops"][0]["pairs"][0]["failover"]["lease_ttl_s"] = 0.5
    await cluster.store.put(keys.TOPOLOGY, TopologyDoc(site=bad).encode())
    await until(
        lambda: asyncio.sleep(0, "failover.lease_ttl_s" in cluster.log("a")),
        5,
        "the agent names the bad field",
    )
    assert await cluster.leader("p") == ("a", epoch)
    st = await cluster.status("a")
    assert st is not None and st.role == "active"


async def test_agent_waits_for_etcd_at_start(tmp_path: Path, test_pki: TestPki) -> None:
    etcd = TlsEtcd(test_pki.dir, ADMIN)  # not started yet
    c = Cluster(etcd, tmp_path)
    try:
        c.start("a")
        await until(
            lambda: asyncio.sleep(0, "waiting for etcd" in c.log("a")),
            10,
            "the agent says etcd is unreachable",
        )
        assert c.agents["a"].poll() is None
        assert not list(c.record.glob("*.log"))
        etcd.start()
        await c.apply(c.site([pair("p", ["a", "b"], 22, free_port(), c.record)]))
        node, _ = await c.active("p", timeout=15)
        assert node == "a"
    finally:
        await c.stop_all()
        etcd.cleanup()


async def test_restarted_agent_takes_its_pair_back_at_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lease long enough for a restart on a loaded machine: the claim is that a restart
    # within the lease takes the pair back, whatever the time a restart takes here.
    # The watchdog of a's first run dies before it can revoke the dead agent's lease (a
    # test fault): else the term ends with the watchdog, before any restart could come,
    # and b takes over (tests/integration/test_agent_death.py).
    monkeypatch.setenv("HAPAIR_TEST_WATCHDOG_BEFORE_REVOKE", "kill")
    await cluster.apply(
        cluster.site([pair("p", ["a", "b"], 23, free_port(), cluster.record, lease_ttl_s=6.0)])
    )
    cluster.start("a")
    monkeypatch.delenv("HAPAIR_TEST_WATCHDOG_BEFORE_REVOKE")
    _, epoch = await cluster.active("p", node="a")
    cluster.start("b")
    await cluster.standby("b")
    svc = await service_pid(cluster, "a")
    cluster.signal("a", signal.SIGKILL)
    cluster.agents["a"].wait(5)
    await until(lambda: asyncio.sleep(0, not pid_alive(svc)), 1.0, "service dead with agent")
    cluster.start("a")
    node, new_epoch = await cluster.active("p", not_epoch=epoch)
    assert node == "a" and new_epoch > epoch
    # Taken back, not elected after the old lease expired: the reclaim is guarded by the
    # old key's epoch, so it succeeded only while that key (and its lease) still lived.
    reclaims = await cluster.events("reclaim")
    assert [e["details"]["old_epoch"] for e in reclaims] == [epoch]
    elections = [e for e in await cluster.events("election") if e["epoch"] == new_epoch]
    assert elections[0]["reason"] == "took its pair back after an agent restart"


async def test_failed_health_checks_move_a_critical_service(cluster: Cluster) -> None:
    sick = cluster.tmp / "sick-{node.name}"
    svc = recording_service("p-svc", free_port(), cluster.record, critical=True)
    svc["command"] += ["--sick-flag", str(sick)]
    _, epoch = await two_nodes(cluster, 24, services=[svc])
    (cluster.tmp / "sick-a").touch()
    node, _ = await cluster.active("p", not_epoch=epoch)
    assert node == "b"
    resign = await until(lambda: cluster.events("resign"), 5, "resign event")
    assert "failed 2 health checks" in resign[0]["reason"]
    assert "status 500" in resign[0]["reason"]


async def test_service_on_every_node_runs_everywhere_and_publishes_from_the_active(
    cluster: Cluster,
) -> None:
    port = free_port()
    svc = recording_service("p-all", port, cluster.record, placement="all")
    svc["command"] = [a if a != "{epoch}" else "-" for a in svc["command"]]
    _, epoch = await two_nodes(cluster, 25, services=[svc])

    async def running_on(node: str) -> bool:
        st = await cluster.status(node)
        return st is not None and st.services[0].state == "running"

    await until(lambda: running_on("b"), 10, "p-all running on the standby")
    endpoint = await until(lambda: cluster.endpoint("p-all"), 5, "endpoint")
    assert (endpoint.node, endpoint.epoch) == ("a", epoch)
    await cluster.store.put(keys.switchover("p"), Switchover().encode())
    _, new_epoch = await cluster.active("p", not_epoch=epoch)

    async def moved() -> bool:
        e = await cluster.endpoint("p-all")
        return e is not None and (e.node, e.epoch) == ("b", new_epoch)

    await until(moved, 5, "endpoint follows the active")
    # It kept running on both nodes through the switchover: one run per node.
    assert sorted(r["node"] for r in cluster.intervals()) == ["a", "b"]
    cluster.record = cluster.tmp / "none"  # runs on every node overlap by design
    cluster.record.mkdir()


async def test_failback_auto_returns_to_the_main(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 26, failback="auto", failback_after_s=1.0)
    cluster.crash("a")
    _, epoch2 = await cluster.active("p", not_epoch=epoch, node="b")
    cluster.start("a")
    node, _ = await cluster.active("p", not_epoch=epoch2, node="a")
    assert node == "a"
    assert any(e["reason"] == "failback" for e in await cluster.events("switchover"))


async def report(c: Cluster, node: str, ok: bool) -> None:
    lease = await c.store.grant(30)
    await c.store.put(
        keys.report(node, "comm"),
        ResourceReport(
            service="comm", resources={"plc:press-1": Resource(ok=ok, critical=True, grace_s=0.5)}
        ).encode(),
        lease=lease,
    )


async def test_application_forces_the_switch_to_a_standby_that_reaches_the_plc(
    cluster: Cluster,
) -> None:
    _, epoch = await two_nodes(cluster, 27)
    await report(cluster, "b", ok=True)
    await report(cluster, "a", ok=False)
    node, _ = await cluster.active("p", not_epoch=epoch)
    assert node == "b"
    moves = await until(lambda: cluster.events("switchover"), 5, "switchover event")
    assert moves[0]["reason"] == "plc:press-1 lost on the active"


async def test_nobody_moves_when_no_node_reaches_the_plc(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 28)
    await report(cluster, "b", ok=False)
    await report(cluster, "a", ok=False)

    async def alarm() -> bool:
        st = await cluster.status("a")
        return st is not None and "critical resource plc:press-1 lost" in st.problems

    await until(alarm, 5, "the alarm in a's status")

    async def still_a() -> bool:
        return await cluster.leader("p") == ("a", epoch)

    await holds(still_a, 1.5, "the pair moved though no node reaches the PLC")  # 3 graces


async def test_agents_pick_up_an_applied_topology_without_a_restart(cluster: Cluster) -> None:
    port, extra_port = free_port(), free_port()
    first = pair("p", ["a", "b"], 29, port, cluster.record)
    await cluster.apply(cluster.site([first]))
    cluster.start("a")
    _, epoch = await cluster.active("p", node="a")
    cluster.start("b")
    await cluster.standby("b")
    old_pid = await service_pid(cluster, "a")
    agents = {n: p.pid for n, p in cluster.agents.items()}

    second = pair("p", ["a", "b"], 29, port, cluster.record, lease_ttl_s=3.0)
    extra = recording_service("p-extra", extra_port, cluster.record)
    second["services"] = [
        {**second["services"][0], "env": {"CHANGED": "1"}},  # a changed service restarts
        extra,  # a new one starts
    ]
    await cluster.apply(cluster.site([second]))
    await service_pid(cluster, "a", "p-extra")

    async def restarted() -> bool:
        pid = await service_pid(cluster, "a")
        return pid != old_pid

    await until(restarted, 10, "the changed service restarted with its new spec")
    assert await cluster.leader("p") == ("a", epoch)

    async def b_on_new_lease() -> bool:
        kv = await cluster.store.get(keys.node_status("b"))
        if kv is None:
            return False
        info = await cluster.store.call(lambda: cluster.store.client.get_lease_info(kv.lease))
        return int(info.grantedTTL) == 3

    await until(b_on_new_lease, 10, "the standby's lease granted with the new TTL")
    assert {n: p.pid for n, p in cluster.agents.items()} == agents
    assert all(p.poll() is None for p in cluster.agents.values())


async def test_network_probes_raise_alarms_and_nobody_moves_when_no_node_reaches_targets(
    cluster: Cluster,
) -> None:
    target = await asyncio.start_server(lambda r, w: w.close(), "127.0.30.100", 0)
    port = target.sockets[0].getsockname()[1]
    network = {
        "probe_targets": [f"127.0.30.100:{port}"],
        "probe_interval_s": 0.2,
        "isolation_after_s": 0.6,
        "peer_port": free_port("127.0.30.1"),
    }
    spec = pair("p", ["a", "b"], 30, free_port(), cluster.record)
    spec["network"] = network
    await cluster.apply(cluster.site([spec]))
    cluster.start("a")
    _, epoch = await cluster.active("p", node="a")
    cluster.start("b")
    await cluster.standby("b")

    async def problems(node: str, text: str) -> bool:
        st = await cluster.status(node)
        return st is not None and any(text in p for p in st.problems)

    target.close()
    await target.wait_closed()
    await until(lambda: problems("a", "network isolated"), 10, "a isolated")
    await until(lambda: problems("b", f"probe target 127.0.30.100:{port} lost"), 10, "b alarm")

    async def still_a() -> bool:
        return await cluster.leader("p") == ("a", epoch)

    await holds(still_a, 1.5, "the pair moved though no node reaches the probe target")
    assert await cluster.events("network")
