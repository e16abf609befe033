"""Updating a pair: a new package version applied is only installed beside the running
one; ``hapair rollout`` then moves every copy onto it with one planned switchover, and
rolls back a version that fails its health check.

Real etcd (TLS), real agents, the ``hapair`` command and a registry as processes of
their own, packages from ``file://`` URLs built by the test; the packaged program is the
recording test server (tests/support/svc.py), whose health check fails in a version
built sick. The client that sends a request every few milliseconds is the one of
test_client_e2e.py, through a registry.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hapair.shared import keys
from hapair.shared.records import NodeStatus, RestartRequest, ServiceStatus
from tests.integration.test_cli import HAPAIR, Run, _env
from tests.integration.test_client_e2e import ClientLog, outages
from tests.support.client_lab import RegistryProcess
from tests.support.cluster import PYTHON, Cluster, until
from tests.support.harness import ROOT, default_sigint, free_port, signal_state
from tests.support.package_lab import build_server, package, served

pytestmark = pytest.mark.e2e

NODES = {"a": "127.0.73.1", "b": "127.0.73.2"}
ROLLOUT_S = 180.0


def files_of(c: Cluster) -> Path:
    files = c.tmp / "files"
    files.mkdir(exist_ok=True)
    return files


class Pair:
    """A pair of two agents whose services come from one package: ``web`` on the
    active (with an endpoint the client follows), ``warm`` on every node."""

    def __init__(self, c: Cluster, start_period_s: float = 5.0) -> None:
        self.c = c
        self.start_period_s = start_period_s
        self.web_port, self.warm_port = free_port(), free_port()

    def site(self, pkg: dict[str, Any], web_pkg: dict[str, Any] | None = None) -> dict[str, Any]:
        # The cluster checks from web's records that no two nodes ever ran it at once;
        # warm's are apart: it runs on both nodes at once, by design.
        web = served(
            "web",
            self.web_port,
            web_pkg or pkg,
            self.c.record,
            self.start_period_s,
            endpoint={"port": self.web_port, "protocol": "http"},
        )
        warm = served(
            "warm",
            self.warm_port,
            pkg,
            self.c.tmp / "record-warm",
            self.start_period_s,
            placement="all",
        )
        nodes = [{"name": n, "address": a} for n, a in NODES.items()]
        return self.c.site([{"name": "p", "nodes": nodes, "services": [web, warm]}])

    async def apply(self, archive: Path, version: str, web: Path | None = None) -> str:
        """Apply the site with ``archive`` as version ``version`` (web's from ``web``, if
        given); its directory name."""
        pkg = package(archive, archive.as_uri(), version)
        web_pkg = package(web, web.as_uri(), version) if web is not None else None
        await self.c.apply(self.site(pkg, web_pkg))
        return f"{version}-{pkg['sha256'][:12]}"


async def service(c: Cluster, node: str, name: str) -> ServiceStatus | None:
    status = await c.status(node)
    return next((s for s in status.services if s.name == name), None) if status else None


async def runs_on(
    c: Cluster, node: str, name: str, version: str, timeout: float = 30, not_pid: int = 0
) -> int:
    """Wait until ``name`` runs (healthy) on ``node`` from ``version``, in another process
    than ``not_pid``; its pid."""

    async def running() -> int | None:
        s = await service(c, node, name)
        ok = s is not None and s.state == "running" and s.package == version
        return s.pid if ok and s is not None and s.pid != not_pid else None

    return await until(running, timeout, f"{name} running {version} on {node}")


async def holds(c: Cluster, version: str, timeout: float = 60) -> None:
    """Every node holds ``version`` of both services."""

    async def installed() -> bool:
        for node in NODES:
            status: NodeStatus | None = await c.status(node)
            held = (
                {p.service for p in status.packages if version in p.installed} if status else set()
            )
            if held != {"web", "warm"}:
                return False
        return True

    await until(installed, timeout, f"{version} installed on every node")


async def hapair_long(c: Cluster, *args: str, timeout: float = ROLLOUT_S) -> Run:
    """The ``hapair`` command as an operator, for as long as a rollout may take."""
    proc = await asyncio.create_subprocess_exec(
        HAPAIR,
        *args,
        env=_env(c.etcd),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    result = Run(proc.returncode, out.decode(), err.decode())
    assert "Traceback" not in result.err, result.err
    return result


async def two_nodes_on(c: Cluster, p: Pair, version: str) -> tuple[int, int, int]:
    """Both agents up, ``a`` active; pids of web on a and warm on a and b."""
    c.start("a")
    await c.active("p", node="a", timeout=30)
    c.start("b")
    await c.standby("b", timeout=30)
    return (
        await runs_on(c, "a", "web", version),
        await runs_on(c, "a", "warm", version),
        await runs_on(c, "b", "warm", version),
    )


# ---- a topology change alone restarts nothing -----------------------------------------


async def test_a_new_version_applied_is_installed_but_the_running_copies_keep_theirs(
    cluster: Cluster,
) -> None:
    """The site names a new version: every node installs it, and every running copy
    goes on running the old one, same process; the next start (here, after the process
    died) takes the new one."""
    files, p = files_of(cluster), Pair(cluster)
    v1 = await p.apply(build_server(files, "app", "1.0"), "1.0")
    web, warm_a, warm_b = await two_nodes_on(cluster, p, v1)
    v2 = await p.apply(build_server(files, "app", "2.0"), "2.0")
    await holds(cluster, v2)
    # Installed for a while now: nothing restarted, nothing moved.
    for node, name, pid in (("a", "web", web), ("a", "warm", warm_a), ("b", "warm", warm_b)):
        s = await service(cluster, node, name)
        assert s is not None and (s.pid, s.package, s.state) == (pid, v1, "running"), s
    assert len(await cluster.events("election")) == 1
    # The standby's copy dies: restarted, it runs the declared version.
    os.kill(warm_b, signal.SIGKILL)
    await runs_on(cluster, "b", "warm", v2, not_pid=warm_b)
    s = await service(cluster, "a", "warm")
    assert s is not None and (s.pid, s.package) == (warm_a, v1)


# ---- hapair rollout -------------------------------------------------------------------


async def start_client(
    c: Cluster, registry: RegistryProcess, out: Path
) -> asyncio.subprocess.Process:
    """The e2e test's client process on ``web``: a request every 2 ms, one JSON line each."""
    return await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "tests.integration.test_client_e2e",
        *("--registry", registry.url, "--service", "web", "--out", str(out)),
        cwd=ROOT,
        stderr=(c.tmp / "client.log").open("wb"),
    )


async def stop_client(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            await proc.wait()


async def test_a_rollout_under_a_busy_client_moves_every_copy_with_one_switchover(
    cluster: Cluster,
) -> None:
    files, p = files_of(cluster), Pair(cluster)
    v1 = await p.apply(build_server(files, "app", "1.0"), "1.0")
    await two_nodes_on(cluster, p, v1)
    registry = await RegistryProcess(cluster.etcd, log=cluster.tmp / "registry.log").start()
    out = cluster.tmp / "client.jsonl"
    log = ClientLog(out)
    client = await start_client(cluster, registry, out)
    try:
        await until(lambda: log.served_by("a", 0), 20, "the client served by a")
        v2 = await p.apply(build_server(files, "app", "2.0"), "2.0")
        done = await hapair_long(cluster, "rollout", "p", "--yes")
        assert done.code == 0, done.out + done.err
        await until(lambda: log.served_by("b", 0, 50), 20, "the client served by b")
        assert client.returncode is None, "the client must never need restarting"
        await stop_client(client)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
        await registry.stop()
    # Every step printed with its time, and the outcome.
    steps = [line for line in done.out.splitlines() if " step " in line]
    assert any("restart warm on standby b" in line for line in steps), done.out
    assert any("switch pair p over from a to b" in line for line in steps), done.out
    assert any("restart warm on a, now a standby" in line for line in steps), done.out
    assert "pair p runs the declared versions on every node, active b" in done.out
    # Every copy runs the new version; b is active.
    assert (await cluster.leader("p") or ("", 0))[0] == "b"
    for node, name in (("b", "web"), ("b", "warm"), ("a", "warm")):
        await runs_on(cluster, node, name, v2)
    # The client saw one switchover, and no error besides it.
    requests = log.read()
    assert len(log.pids) == 1
    errors = [r for r in requests if "error" in r]
    assert not errors, errors[:5]
    gaps = outages(requests)
    print("client outage during the rollout (s):", [round(g, 3) for g in gaps])
    # One outage, the switchover's; its deadline is generous for a loaded machine (the
    # figure is bench_rollout's).
    assert len(gaps) == 1 and gaps[0] < 5.0
    assert [e["node"] for e in await cluster.events("election")] == ["a", "b"]
    kinds = [e["kind"] for e in await cluster.events() if e["kind"].startswith("rollout_")]
    assert kinds[0] == "rollout_started" and kinds[-1] == "rollout_done"
    assert "rollout_rolled_back" not in kinds and "rollout_failed" not in kinds


async def test_a_version_that_fails_its_health_check_is_rolled_back_and_the_old_one_serves(
    cluster: Cluster,
) -> None:
    files, p = files_of(cluster), Pair(cluster)
    v1 = await p.apply(build_server(files, "app", "1.0"), "1.0")
    web, warm_a, _ = await two_nodes_on(cluster, p, v1)
    sick = await p.apply(build_server(files, "app", "2.0", sick=True), "2.0")
    done = await hapair_long(cluster, "rollout", "p", "--yes")
    assert done.code == 1, done.out + done.err
    assert "restart warm on standby b failed" in done.err, done.err
    assert "rolled back on b" in done.err, done.err
    # The pair never moved and serves the old version; b's copy is back on it.
    assert (await cluster.leader("p") or ("", 0))[0] == "a"
    assert len(await cluster.events("election")) == 1
    s = await service(cluster, "a", "web")
    assert s is not None and (s.pid, s.package, s.state) == (web, v1, "running"), s
    s = await service(cluster, "a", "warm")
    assert s is not None and (s.pid, s.package) == (warm_a, v1), s
    await runs_on(cluster, "b", "warm", v1)
    await cluster.standby("b", timeout=30)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{NODES['a']}:{p.web_port}/") as resp,
    ):
        assert resp.status == 200 and (await resp.json())["node"] == "a"
    # Kept on the old version: a restart after a failure does not bring the sick one back.
    st = await service(cluster, "b", "warm")
    assert st is not None and st.pid is not None
    os.kill(st.pid, signal.SIGKILL)
    await runs_on(cluster, "b", "warm", v1, not_pid=st.pid)
    kinds = [e["kind"] for e in await cluster.events() if e["kind"].startswith("rollout_")]
    assert kinds[0] == "rollout_started" and kinds[-1] == "rollout_rolled_back"
    answers = [e for e in await cluster.events("rollout_restart") if e["node"] == "b"]
    assert [a["details"]["ok"] for a in answers] == [False, True]
    assert answers[0]["details"]["versions"] == {"web": sick, "warm": sick}
    # b takes over later: its web starts on the old version too, not the sick one.
    moved = await hapair_long(cluster, "switchover", "p", "--to", "b", timeout=60)
    assert moved.code == 0, moved.err
    await runs_on(cluster, "b", "web", v1)


async def test_a_new_active_failing_on_the_new_version_hands_the_pair_back_to_the_old_one(
    cluster: Cluster,
) -> None:
    """warm's new version is healthy, web's fails its health check: the switchover
    happens, web fails on b, and the pair goes back to a, whose web starts on the old
    version (pinned there first), and b's warm goes back to it too."""
    files, p = files_of(cluster), Pair(cluster)
    v1 = await p.apply(build_server(files, "app", "1.0"), "1.0")
    _, warm_a, _ = await two_nodes_on(cluster, p, v1)
    await p.apply(build_server(files, "app", "2.0"), "2.0", build_server(files, "web", "2.0", True))
    done = await hapair_long(cluster, "rollout", "p", "--yes")
    assert done.code == 1, done.out + done.err
    assert "the services on b failed" in done.err, done.err
    assert "pair p is back on a with its old versions; rolled back on b" in done.err, done.err
    assert [e["node"] for e in await cluster.events("election")] == ["a", "b", "a"]
    await runs_on(cluster, "a", "web", v1)
    s = await service(cluster, "a", "warm")
    assert s is not None and (s.pid, s.package) == (warm_a, v1), s
    await runs_on(cluster, "b", "warm", v1)
    kinds = [e["kind"] for e in await cluster.events() if e["kind"].startswith("rollout_")]
    assert kinds[-1] == "rollout_rolled_back"


async def test_an_interrupted_rollout_says_so_and_frees_its_key(cluster: Cluster) -> None:
    """Ctrl-C while a step runs: the command ends (130), its last event says it was
    interrupted (so no view shows it under way), and its key is free for the next."""
    # The sick version's restart waits out its start period: a long one keeps the step
    # running when the Ctrl-C comes, however late a loaded machine lets the test see it.
    files, p = files_of(cluster), Pair(cluster, start_period_s=120.0)
    v1 = await p.apply(build_server(files, "app", "1.0"), "1.0")
    await two_nodes_on(cluster, p, v1)
    # A version that fails its health check: the standby's restart waits its start period.
    await p.apply(build_server(files, "app", "2.0", sick=True), "2.0")
    proc = await asyncio.create_subprocess_exec(
        HAPAIR,
        *("rollout", "p", "--yes"),
        env=_env(cluster.etcd),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=default_sigint,
    )
    try:

        async def restarting() -> bool:
            steps = await cluster.events("rollout_step")
            return any(e["reason"] == "restart warm on standby b" for e in steps)

        await until(restarting, 30, "the rollout restarting warm on b")
        proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(30):
                out, err = await proc.communicate()
        except TimeoutError:
            state = signal_state(proc.pid)
            proc.kill()
            out, err = await proc.communicate()
            raise AssertionError(
                f"the rollout went on after SIGINT ({state}): {out.decode()} {err.decode()}"
            ) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, (out.decode(), err.decode())
    ended = [e for e in await cluster.events() if e["kind"].startswith("rollout_")][-1]
    assert ended["kind"] == "rollout_failed", ended
    assert ended["reason"].startswith("interrupted at step 2"), ended
    assert await cluster.store.get(keys.rollout("p")) is None


async def test_dry_run_prints_the_plan_and_a_paused_pair_is_refused_changing_nothing(
    cluster: Cluster,
) -> None:
    files, p = files_of(cluster), Pair(cluster)
    v1 = await p.apply(build_server(files, "app", "1.0"), "1.0")
    pids = await two_nodes_on(cluster, p, v1)
    v2 = await p.apply(build_server(files, "app", "2.0"), "2.0")
    await holds(cluster, v2)
    before = await rollout_keys(cluster)

    dry = await hapair_long(cluster, "rollout", "p", "--dry-run", timeout=30)
    assert dry.code == 0, dry.err
    assert "rollout of pair p: a is active" in dry.out and "b takes over" in dry.out
    assert "  2. restart warm on standby b and see them up" in dry.out
    assert "dry run: nothing was changed" in dry.out

    paused = await hapair_long(cluster, "pause", "p", timeout=30)
    assert paused.code == 0, paused.err
    refused = await hapair_long(cluster, "rollout", "p", "--yes", timeout=30)
    assert refused.code == 1
    assert "rollout refused: pair p is paused; resume it first" in refused.err

    # Over HTTP: the same plan, the same refusal.
    registry = await RegistryProcess(
        cluster.etcd, args=("--open-admin",), log=cluster.tmp / "registry.log"
    ).start()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"{registry.url}/v1/pairs/p/rollout"
            async with http.post(url, json={"dry_run": True}) as resp:
                body = await resp.json()
                assert resp.status == 409, body
                assert "pair p is paused" in body["error"]
            resumed = await hapair_long(cluster, "resume", "p", timeout=30)
            assert resumed.code == 0, resumed.err
            async with http.post(url, json={"dry_run": True}) as resp:
                body = await resp.json()
                assert resp.status == 202, body
                assert body["rollout"] is None and body["target"] == "b"
                assert "restart warm on standby b and see them up" in body["steps"]
    finally:
        await registry.stop()

    # Nothing changed: the same processes on the same version, no request, no event.
    after = await two_nodes_pids(cluster)
    assert after == pids
    assert await rollout_keys(cluster) == before == []
    assert [e for e in await cluster.events() if e["kind"].startswith("rollout_")] == []

    # A restart request judged in another term is stale: the node says so, restarts nothing.
    leader = await cluster.leader("p")
    assert leader is not None
    stale = RestartRequest(
        rollout="r0", node="b", epoch=leader[1] - 1, versions={"warm": v2}, restart=["warm"]
    )
    lease = await cluster.store.grant(60)
    await cluster.store.put(keys.restart("p", "b"), stale.encode(), lease=lease)

    async def refused() -> list[dict[str, Any]]:
        return [
            e
            for e in await cluster.events("rollout_restart_refused")
            if e["details"]["request"] == stale.id
        ]

    answer = (await until(refused, 20, "b's answer to a stale restart request"))[0]
    assert answer["node"] == "b" and answer["reason"].startswith("stale: judged at epoch")
    assert await cluster.events("rollout_restart") == []
    assert await two_nodes_pids(cluster) == pids


async def two_nodes_pids(c: Cluster) -> tuple[int | None, ...]:
    found = [await service(c, n, name) for n, name in (("a", "web"), ("a", "warm"), ("b", "warm"))]
    return tuple(s.pid if s else None for s in found)


async def rollout_keys(c: Cluster) -> list[str]:
    kvs, _ = await c.store.get_prefix(f"{keys.PAIRS_PREFIX}p/commands/")
    return sorted(kv.key for kv in kvs if "restart" in kv.key or kv.key.endswith("rollout"))
