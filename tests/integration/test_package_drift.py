"""A node that does not hold the package version the site names (drifted) is chosen to
become active only when no node that holds it can be; the alarm ``package drift`` says
so in its status, in ``hapair status`` and in events, and clears once it holds it.

Real etcd (TLS), real agents, ``file://`` packages. A node is drifted the way a plant's
secondary is: it was down while the update went out, and the media it would fetch the
new version from is gone by the time it comes back."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from hapair.shared import keys
from hapair.shared.admin import AdminError, request_switchover
from hapair.shared.records import Switchover
from tests.integration.test_cli import hapair
from tests.integration.test_packages import files_of, package_on, running, runs
from tests.support.cluster import Cluster, until
from tests.support.harness import stop_pid
from tests.support.package_lab import build, package

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("quick_download_retries")]


def site(
    c: Cluster, nodes: tuple[str, ...], net: int, archive: Path, version: str
) -> dict[str, Any]:
    """Pair p of ``nodes``; its service runs on the active from ``archive``'s package."""
    ran = c.tmp / "ran"
    ran.mkdir(exist_ok=True)
    app = {
        "name": "app",
        "command": ["{package.dir}/bin/app"],
        "env": {"HAPAIR_RECORD_DIR": str(ran)},
        "package": package(archive, archive.as_uri(), version),
    }
    members = [{"name": n, "address": f"127.0.{net}.{i + 1}"} for i, n in enumerate(nodes)]
    return c.site([{"name": "p", "nodes": members, "services": [app]}])


async def with_v1(c: Cluster, nodes: tuple[str, ...], net: int) -> int:
    """Every node started holding app 1.0, the first one active: its epoch."""
    v1 = build(files_of(c), "app", "1.0")
    await c.apply(site(c, nodes, net, v1, "1.0"))
    for node in nodes:
        c.start(node)
    _, epoch = await c.active("p", node=nodes[0], timeout=60)
    for node in nodes:
        await package_on(c, node, "app", "1.0", "installed")
    await runs(c, nodes[0], "1.0")
    return epoch


async def drift(c: Cluster, nodes: tuple[str, ...], net: int, node: str) -> Path:
    """``node`` down while app 2.0 goes out and the others install it; the file gone,
    then ``node`` back, failing to fetch it: a healthy standby holding 1.0 only. Returns
    where the file was."""
    await asyncio.to_thread(stop_pid, c.agents[node], signal.SIGTERM, 10.0)
    v2 = build(files_of(c), "app", "2.0")
    await c.apply(site(c, nodes, net, v2, "2.0"))
    for other in nodes:
        if other != node:
            await package_on(c, other, "app", "2.0", "installed")
    kept = c.tmp / "media" / v2.name
    kept.parent.mkdir(exist_ok=True)
    shutil.move(v2, kept)
    c.start(node)
    failed = await package_on(c, node, "app", "2.0", "failed", timeout=90)
    assert failed.installed and failed.installed[0].startswith("1.0-"), failed
    await c.standby(node, timeout=30)
    return kept


async def test_a_drifted_node_is_not_chosen_while_an_up_to_date_one_can_be(
    cluster: Cluster,
) -> None:
    """b, second in priority, lacks app 2.0; c holds it. The active crashes: c takes
    over, b never campaigns ahead of it."""
    nodes = ("a", "b", "c")
    epoch = await with_v1(cluster, nodes, 81)
    await drift(cluster, nodes, 81, "b")
    await cluster.standby("c")
    cluster.crash("a")
    node, _ = await cluster.active("p", not_epoch=epoch, timeout=30)
    assert node == "c"
    assert [e["node"] for e in await cluster.events("election")] == ["a", "c"]
    # a may have taken the pair at the start, before any node held app 1.0; since, none.
    assert [e for e in await cluster.events("drifted takeover") if e["epoch"] != epoch] == []
    await runs(cluster, "c", "2.0")


async def test_the_only_standby_drifted_still_takes_over_and_says_so(cluster: Cluster) -> None:
    """No node holding app 2.0 is left: b takes over with the 1.0 it holds, and says so
    in an event and its log."""
    nodes = ("a", "b")
    epoch = await with_v1(cluster, nodes, 82)
    await drift(cluster, nodes, 82, "b")
    cluster.crash("a")
    node, new_epoch = await cluster.active("p", not_epoch=epoch, timeout=30)
    assert node == "b"
    said = await until(lambda: _of(cluster, "drifted takeover", "b"), 10, "b's drifted takeover")
    assert [e["epoch"] for e in said] == [new_epoch]
    assert said[0]["reason"] == "took over without the declared package version: app 2.0"
    await runs(cluster, "b", "1.0")
    assert "took over without the declared package version" in cluster.log("b")


async def test_the_drift_alarm_is_shown_refuses_a_switchover_and_clears_after_install(
    cluster: Cluster,
) -> None:
    nodes = ("a", "b")
    await with_v1(cluster, nodes, 83)
    kept = await drift(cluster, nodes, 83, "b")

    async def alarm(node: str) -> list[str]:
        status = await cluster.status(node)
        assert status is not None
        return [p for p in status.problems if p.startswith("package drift")]

    shown = await until(lambda: alarm("b"), 10, "the drift alarm in b's status")
    assert shown[0].startswith("package drift: app 2.0 not installed here (failed: ")
    assert await alarm("a") == []
    started = [e for e in await cluster.events("package drift") if e["node"] == "b"]
    assert started and started[-1]["reason"] == "app 2.0 not installed on this node"
    # hapair status shows it, per node: declared, held and running versions.
    status = await hapair("status", etcd=cluster.etcd)
    assert status.code == 0, status.err
    assert "package drift" in status.out
    assert "app 2.0 failed" in status.out
    # A planned switchover to it is refused (a holds 2.0), targeted or not.
    for to in ("b", None):
        with pytest.raises(AdminError, match="b does not hold the package version"):
            await request_switchover(cluster.store, "p", to, "tester")
    # Written past hapair's check, the request is refused by the active itself.
    request = Switchover(to="b")
    await cluster.store.put(keys.switchover("p"), request.encode())
    refused = await until(
        lambda: cluster.events("switchover_rejected"), 30, "the active refusing the switchover"
    )
    assert refused[0]["details"]["request"] == request.id
    assert "b does not hold the package version the site names (app 2.0)" in refused[0]["reason"]
    assert (await cluster.leader("p") or ("",))[0] == "a"
    assert running(cluster, "a") is not None

    # The media is back, at another place the site file now names: b installs at once.
    moved = cluster.tmp / "media2" / kept.name
    moved.parent.mkdir()
    shutil.copy(kept, moved)
    await cluster.apply(site(cluster, nodes, 83, moved, "2.0"))
    await package_on(cluster, "b", "app", "2.0", "installed", timeout=60)
    await until(lambda: _none(alarm("b")), 10, "the drift alarm gone from b's status")
    cleared = await until(
        lambda: _of(cluster, "package drift cleared", "b"), 10, "the drift cleared event"
    )
    assert cleared[-1]["reason"] == "holds every package version the site names"


async def test_a_switchover_where_every_node_lacks_the_version_waits_for_a_lagging_view(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """app 2.0's media is gone before any node fetched it: every node lacks it, so a
    switchover to c moves the pair to no worse a node. c has just come back, and the
    active's view of the nodes lags its view of the commands: it first sees c down. It
    waits for a view that has seen c, as without packages, then hands over."""
    nodes = ("a", "b", "c")
    v1 = build(files_of(cluster), "app", "1.0")
    await cluster.apply(site(cluster, nodes, 84, v1, "1.0"))
    monkeypatch.setenv("HAPAIR_TEST_NODES_LAG_S", "1.0")
    cluster.start("a")
    monkeypatch.delenv("HAPAIR_TEST_NODES_LAG_S")
    for node in nodes[1:]:
        cluster.start(node)
    _, epoch = await cluster.active("p", node="a", timeout=60)
    for node in nodes:
        await package_on(cluster, node, "app", "1.0", "installed")
    await asyncio.to_thread(stop_pid, cluster.agents["c"], signal.SIGTERM, 10.0)
    v2 = build(files_of(cluster), "app", "2.0")
    declared = site(cluster, nodes, 84, v2, "2.0")
    v2.unlink()
    await cluster.apply(declared)
    for node in nodes[:2]:
        await package_on(cluster, node, "app", "2.0", "failed", timeout=90)
    cluster.start("c")
    await cluster.standby("c", timeout=30)  # in etcd; the active's view of c lags
    await cluster.store.put(keys.switchover("p"), Switchover(to="c").encode())
    node, _ = await cluster.active("p", not_epoch=epoch, timeout=30)
    assert node == "c"
    assert await cluster.events("switchover_rejected") == []
    await runs(cluster, "c", "1.0")


async def _none(found: Any) -> bool:
    return not await found


async def _of(c: Cluster, kind: str, node: str) -> list[dict[str, Any]]:
    return [e for e in await c.events(kind) if e["node"] == node]
