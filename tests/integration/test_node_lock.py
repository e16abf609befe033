"""One agent per node: a second agent for a node that has one running is refused,
whatever its state directory, and the first keeps its term."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hapair.shared import keys
from hapair.shared.records import Leader, NodeStatus
from tests.integration.test_etcd_loss import service_pids
from tests.integration.test_failover import pair, two_nodes
from tests.support.cluster import AGENT, ROOT, Cluster, holds, pid_alive, until
from tests.support.harness import free_port, stop_pid
from tests.support.netns import unavailable
from tests.support.vip_lab import LabSite, service

LIVE_S = 10.0  # a lease the test keeps alive itself
NO_LAB = unavailable()


async def second_agent(
    etcd: list[str], state_dir: Path, where: Callable[..., list[str]] = lambda *argv: list(argv)
) -> str:
    """Start another agent for node a, reaching etcd with the options ``etcd``; it must
    exit non-zero. What it said on stderr."""
    argv = [*AGENT, "--node", "a", *etcd, "--state-dir", str(state_dir)]
    second = await asyncio.to_thread(
        subprocess.run,
        where(*argv),
        cwd=ROOT,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        timeout=20,
    )
    assert second.returncode != 0, second.stderr.decode()
    return second.stderr.decode()


@pytest.mark.e2e
async def test_a_second_agent_for_a_node_is_refused_whatever_its_state_dir(
    cluster: Cluster,
) -> None:
    _, epoch = await two_nodes(cluster, 61)
    pids = service_pids(cluster, "a")
    other = cluster.tmp / "another-state-dir"
    refused = await second_agent(cluster.etcd.client_args("a"), other)
    assert f"another hapair-agent runs for node a (pid {cluster.agents['a'].pid}" in refused
    assert await cluster.leader("p") == ("a", epoch), "the first agent lost its term"
    assert service_pids(cluster, "a") == pids, "the first agent's service was restarted"
    assert not await cluster.events("reclaim")


@pytest.mark.e2e
@pytest.mark.skipif(NO_LAB is not None, reason=f"no network namespaces: {NO_LAB}")
async def test_a_second_agent_with_another_machine_lock_is_refused_by_the_live_status(
    tmp_path: Path,
) -> None:
    """Started in another network namespace of the machine, the second agent takes
    another machine lock; the node's live status in etcd, naming an agent of this node
    alive on this machine, refuses it all the same."""
    async with LabSite(tmp_path, ["a", "b"]) as site:
        c = site.cluster
        spec = {"name": "p", "nodes": [site.node_entry("a"), site.node_entry("b")]}
        spec["services"] = [service("p-svc", free_port(), c.record, critical=True)]
        await c.apply(c.site([spec]))
        c.start("a")
        _, epoch = await c.active("p", node="a", timeout=20)
        refused = await second_agent(c.etcd_args("a"), tmp_path / "x", site["client"].argv)
        pid = c.agents["a"].pid
        assert (
            f"another hapair-agent runs for node a (pid {pid}, named by its live status in etcd)"
            in refused
        )
        assert await c.leader("p") == ("a", epoch), "the first agent lost its term"
    c.assert_no_overlap()


@pytest.mark.e2e
async def test_the_leader_key_of_a_run_this_machine_cannot_judge_is_not_taken_back(
    cluster: Cluster,
) -> None:
    """The key names node a on a live lease whose status says another boot: that run
    may be alive (a reboot takes longer than a lease), so a waits for the lease to lapse
    instead of taking the key from it."""
    await cluster.apply(cluster.site([pair("p", ["a", "b"], 62, free_port(), cluster.record)]))
    store = cluster.store
    lease = await store.grant(LIVE_S)
    status = NodeStatus(
        node="a", pair="p", address="127.0.62.1", role="active", pid=1, boot_id="another-boot"
    )
    await store.put(keys.node_status("a"), status.encode(), lease=lease)
    await store.put(keys.leader("p"), Leader(node="a").encode(), lease=lease)
    old = await cluster.leader("p")
    cluster.start("a")

    async def still_old() -> bool:
        await store.keepalive(lease)
        return await cluster.leader("p") == old

    await until(
        lambda: asyncio.sleep(0, "not taking back the leader key" in cluster.log("a")),
        20,
        "a refuses to take the key back",
    )
    await holds(still_old, 3.0, "a took the key of a run it cannot judge")
    assert not await cluster.events("reclaim")
    await store.revoke(lease)
    node, _ = await cluster.active("p", timeout=20)
    assert node == "a"


def own_pid_namespace(*argv: str) -> list[str]:
    """``argv`` as in another container of this machine: the same boot, its own PID
    namespace (it runs as PID 1 there) and its own /run, so its own machine lock."""
    script = 'mkdir -p /run/hapair && mount -t tmpfs container-run /run/hapair && exec "$@"'
    # --kill-child: SIGKILL to the namespace's PID 1 when unshare ends, and with it to
    # everything in the namespace.
    return ["unshare", "--pid", "--kill-child", "--mount-proc", "sh", "-c", script, "sh", *argv]


def no_pid_namespaces() -> str | None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "unshare(1) as root is needed for a PID namespace"
    probe = subprocess.run(own_pid_namespace("true"), capture_output=True, check=False)
    return probe.stderr.decode().strip() or "unshare failed" if probe.returncode else None


NO_PIDNS = no_pid_namespaces()


@pytest.mark.e2e
@pytest.mark.skipif(NO_PIDNS is not None, reason=f"no PID namespaces: {NO_PIDNS}")
async def test_an_agent_in_another_pid_namespace_does_not_take_the_live_runs_key(
    cluster: Cluster,
) -> None:
    """A second agent for node a in another container of the same machine: same boot
    id, but the first agent's PID means nothing in its PID namespace (there it is no
    process at all). It must not take that as the previous run gone and reclaim the
    leader key of the live first agent; it waits for a lease that never lapses."""
    _, epoch = await two_nodes(cluster, 63)
    pids = service_pids(cluster, "a")
    log = (cluster.tmp / "agent-a-container.log").open("ab")
    argv = [*AGENT, "--node", "a", *cluster.etcd.client_args("a")]
    argv += ["--state-dir", str(cluster.tmp / "container-state")]
    second = cluster.spawn(
        "a",
        own_pid_namespace(*argv),
        cwd=ROOT,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    init = 0
    try:
        # The namespace's PID 1 (the agent), seen from here.
        children = Path(f"/proc/{second.pid}/task/{second.pid}/children")
        init = await until(
            lambda: asyncio.sleep(0, int(children.read_text().split()[0])), 5, "PID 1"
        )
        said = cluster.tmp / "agent-a-container.log"

        async def refused_or_taken() -> bool:
            if "not taking back the leader key" in said.read_text() or second.poll() is not None:
                return True
            return await cluster.leader("p") != ("a", epoch)

        await until(refused_or_taken, 20, "the second agent decides on the leader key")
        assert await cluster.leader("p") == ("a", epoch), (
            "the second agent took the live run's key: " + said.read_text()
        )

        async def first_keeps_it() -> bool:
            return await cluster.leader("p") == ("a", epoch) and second.poll() is None

        await holds(first_keeps_it, 3.0, "the second agent took the live run's key")
        assert not await cluster.events("reclaim")
        assert service_pids(cluster, "a") == pids, "the first agent's service was restarted"
    finally:
        stop_pid(second, signal.SIGKILL)
        if init:
            await until(lambda: asyncio.sleep(0, not pid_alive(init)), 10, "the second agent gone")
        log.close()
    assert await cluster.leader("p") == ("a", epoch)
