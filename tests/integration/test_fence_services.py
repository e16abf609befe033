"""A fence reaches every process of a service, and no service starts after its term.

Real etcd, real agents, real services and signals: a service whose grandchild leaves
its process group (double fork and ``setsid``) must die with every kind of fence, an
agent frozen between deciding to start a service and forking it must not start it once
it is resumed after the standby took over, and one frozen right after the fork must not
leave a service its watchdog does not know running next to the new active.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import SVC, Cluster, holds, pid_alive, recording_service, until
from tests.support.harness import free_port

pytestmark = pytest.mark.e2e


def escaping_service(name: str, pidfile: Path) -> dict[str, Any]:
    """A service whose grandchild calls ``setsid``: it leaves the service's process group
    (and session) and is reparented, as a daemonising program does."""
    script = (
        f"(setsid sleep 600 & echo $! > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}) & "
        "exec sleep 600"
    )
    return {"name": name, "command": ["sh", "-c", script]}


def site(c: Cluster, net: int, services: list[dict[str, Any]]) -> dict[str, Any]:
    nodes = [{"name": n, "address": f"127.0.{net}.{i + 1}"} for i, n in enumerate("ab")]
    return c.site([{"name": "p", "nodes": nodes, "services": services}])


async def escaped(pidfile: Path) -> int:
    """The grandchild's PID, once it has really left the service's group."""

    async def read() -> int | None:
        try:
            pid = int(await asyncio.to_thread(pidfile.read_text))
        except FileNotFoundError:
            return None
        return pid if os.getpgid(pid) == pid else None  # its own session and group

    return await until(read, 10, f"the escaping grandchild in {pidfile}")


async def dead(pid: int) -> bool:
    return not pid_alive(pid)


def stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"


async def test_a_frozen_agents_watchdog_kills_a_service_that_left_its_group(
    cluster: Cluster,
) -> None:
    pidfile = cluster.tmp / "escaped.pid"
    await cluster.apply(site(cluster, 141, [escaping_service("esc", pidfile)]))
    cluster.start("a")
    await cluster.active("p", node="a", timeout=30)
    grandchild = await escaped(pidfile)
    try:
        cluster.signal("a", signal.SIGSTOP)  # only the watchdog can fence now
        await until(lambda: dead(grandchild), 10, "the escaped grandchild killed")
    finally:
        cluster.signal("a", signal.SIGCONT)
        if pid_alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


async def test_a_fence_kills_a_service_that_left_its_group(cluster: Cluster) -> None:
    """The agent's own fence: etcd stops answering (frozen), the lease is not confirmed
    before the fence point."""
    pidfile = cluster.tmp / "escaped.pid"
    await cluster.apply(site(cluster, 142, [escaping_service("esc", pidfile)]))
    cluster.start("a")
    await cluster.active("p", node="a", timeout=30)
    grandchild = await escaped(pidfile)
    etcd = cluster.etcd.proc
    assert etcd is not None
    os.kill(etcd.pid, signal.SIGSTOP)
    try:
        await until(lambda: dead(grandchild), 10, "the escaped grandchild killed")
        assert "event=fenced" in cluster.log("a")
    finally:
        os.kill(etcd.pid, signal.SIGCONT)
        if pid_alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


async def test_a_stopping_agent_kills_a_service_that_left_its_group(cluster: Cluster) -> None:
    pidfile = cluster.tmp / "escaped.pid"
    await cluster.apply(site(cluster, 143, [escaping_service("esc", pidfile)]))
    agent = cluster.start("a")
    await cluster.active("p", node="a", timeout=30)
    grandchild = await escaped(pidfile)
    try:
        agent.send_signal(signal.SIGTERM)
        await asyncio.to_thread(agent.wait, 20)
        await until(lambda: dead(grandchild), 5, "the escaped grandchild killed")
    finally:
        if pid_alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


async def test_an_agent_frozen_before_it_forks_a_service_does_not_start_it_late(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a decides to start its service, then freezes in the step that forks it (a test
    hook stops it there); its lease expires, b takes over and runs the service; a is
    resumed: it must not start the service."""
    port = free_port()
    svc = recording_service("p-svc", port, cluster.record, critical=True)
    await cluster.apply(site(cluster, 144, [svc]))
    monkeypatch.setenv("HAPAIR_TEST_STOP_BEFORE_FORK", "p-svc")
    a = cluster.start("a")
    monkeypatch.delenv("HAPAIR_TEST_STOP_BEFORE_FORK")
    await until(lambda: asyncio.sleep(0, stopped(a.pid)), 30, "a stopped before its fork")
    cluster.start("b")
    _, epoch = await cluster.active("p", node="b", timeout=30)
    cluster.signal("a", signal.SIGCONT)

    async def a_standby() -> bool:
        st = await cluster.status("a")
        return st is not None and st.role == "standby"

    await until(a_standby, 20, "a back as a standby")

    def forked_on_a() -> list[str]:
        # The agent's own record of each fork: the service's record would be written
        # only once its interpreter runs, and the fence may kill it before that.
        return [
            line
            for line in cluster.log("a").splitlines()
            if 'event="service started"' in line and "service=p-svc" in line
        ]

    await holds(lambda: asyncio.sleep(0, not forked_on_a()), 2, "a forked its service late")
    assert not [r for r in cluster.intervals() if r["node"] == "a"]
    assert await cluster.leader("p") == ("b", epoch)


def runs_program(pid: int, program: str) -> bool:
    """Whether ``pid`` is alive and runs ``program``, not the exec guard before it (whose
    command line names the program too)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    guarded = any(arg.endswith(b"/exec_guard.py") for arg in argv)
    return pid_alive(pid) and program.encode() in argv and not guarded


def forked_pids(cluster: Cluster, node: str, service: str) -> list[int]:
    """The agent's own record of each fork of ``service`` (logged in the step that forks)."""
    return [
        int(line.split(" pid=", 1)[1].split()[0])
        for line in cluster.log(node).splitlines()
        if 'event="service started"' in line and f"service={service} " in line
    ]


@pytest.mark.parametrize("with_cgroups", [False, True], ids=["process-groups", "cgroups"])
async def test_an_agent_frozen_right_after_it_forks_a_service_leaves_it_to_no_one(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, with_cgroups: bool
) -> None:
    """a forks its service and freezes at once, before it told its watchdog of the new
    process group (a test hook stops it there); with process groups only (as on a host
    without cgroup v2) the watchdog knows nothing else of it. Its lease expires and b
    takes over: a's service must not be running by then, nor ever after."""
    port = free_port()
    svc = recording_service("p-svc", port, cluster.record, critical=True)
    await cluster.apply(site(cluster, 152 if with_cgroups else 151, [svc]))
    if not with_cgroups:
        monkeypatch.setenv("HAPAIR_TEST_NO_CGROUPS", "1")
    monkeypatch.setenv("HAPAIR_TEST_STOP_AFTER_FORK", "p-svc")
    a = cluster.start("a")
    monkeypatch.delenv("HAPAIR_TEST_STOP_AFTER_FORK")
    monkeypatch.delenv("HAPAIR_TEST_NO_CGROUPS", raising=False)
    await until(lambda: asyncio.sleep(0, stopped(a.pid)), 30, "a stopped after its fork")
    if with_cgroups and "fenced by process group only" in cluster.log("a"):
        pytest.skip("no cgroup v2 here")  # the other case is the same test then
    assert ("cgroups turned off" in cluster.log("a")) != with_cgroups
    [forked] = forked_pids(cluster, "a", "p-svc")
    cluster.start("b")
    _, epoch = await cluster.active("p", node="b", timeout=30)
    # b took over once a's lease had expired, so after a's watchdog deadline (the fence
    # point plus half the margin, before the lease can expire). A generous liveness bound
    # for the watchdog to have acted; a's service must not run its program then.
    await until(
        lambda: asyncio.sleep(0, not runs_program(forked, SVC)),
        5,
        f"a's service {forked} not running once b took over",
    )
    cluster.signal("a", signal.SIGCONT)

    async def a_standby() -> bool:
        st = await cluster.status("a")
        return st is not None and st.role == "standby"

    await until(a_standby, 20, "a back as a standby")
    await until(lambda: dead(forked), 10, f"a's forked process {forked} gone")
    assert await cluster.leader("p") == ("b", epoch)
    cluster.assert_no_overlap()  # a's run, if its program ever ran, ended before b's began


async def test_an_escaped_run_is_bounded_by_its_cgroup_in_the_overlap_check(
    cluster: Cluster,
) -> None:
    """The recording service leaves a grandchild in a session of its own (SIGUSR1), then
    the agent freezes and b takes over: the grandchild's record ends where the watchdog
    saw the service's cgroup empty, before b forked its run, and the check holds."""
    port = free_port()
    svc = recording_service("p-svc", port, cluster.record, critical=True)
    await cluster.apply(site(cluster, 149, [svc]))
    cluster.start("a")
    _, epoch = await cluster.active("p", node="a", timeout=30)
    cluster.start("b")
    await cluster.standby("b", timeout=30)
    st = await cluster.status("a")
    pid = next(s.pid for s in st.services if s.name == "p-svc") if st else None
    assert pid is not None
    os.kill(pid, signal.SIGUSR1)

    def escaped_runs() -> list[dict[str, Any]]:
        return [r for r in cluster.intervals() if r.get("escaped")]

    await until(lambda: asyncio.sleep(0, escaped_runs()), 10, "the grandchild's record")
    grandchild = escaped_runs()[0]["pid"]
    cluster.signal("a", signal.SIGSTOP)
    try:
        await until(lambda: dead(grandchild), 10, "the escaped grandchild killed")
        await cluster.active("p", not_epoch=epoch, node="b", timeout=30)
    finally:
        cluster.signal("a", signal.SIGCONT)
    run = escaped_runs()[0]
    assert not run["estimated"], f"the grandchild's end only estimated: {run}"
    assert run["run"] == f"a/{pid}"
    cluster.assert_no_overlap()
