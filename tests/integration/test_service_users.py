"""Services run as the users the site file names, never as root unless the node allows
it, with the environment the site file declares and nothing of the agent's own.

Real etcd, real agents and real service processes: the user and groups a service runs
as are read from ``/proc/PID/status`` of the service's own process, its environment
from ``/proc/PID/environ``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hapair.shared.records import ServiceStatus
from hapair.workshop_agent.exec_guard import encode_ids
from hapair.workshop_agent.service_process import EXEC_GUARD, SETPRIV
from tests.support.cluster import Cluster, pid_alive, until
from tests.support.harness import wait_for

pytestmark = pytest.mark.e2e

NOBODY = pwd.getpwnam("nobody")


def site(c: Cluster, services: list[dict[str, Any]]) -> dict[str, Any]:
    nodes = [{"name": n, "address": f"127.0.213.{i + 1}"} for i, n in enumerate("ab")]
    return c.site([{"name": "p", "nodes": nodes, "services": services}])


def ids_of(pid: int, line: str) -> list[int]:
    """The real, effective, saved and file-system ids of ``Uid:`` or ``Gid:``."""
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith(line + ":"):
            return [int(x) for x in text.split()[1:]]
    raise AssertionError(f"no {line} in /proc/{pid}/status")


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(e.split("=", 1) for e in raw.decode().split("\0") if "=" in e)


async def service(c: Cluster, node: str, name: str, state: str) -> ServiceStatus:
    async def found() -> ServiceStatus | None:
        status = await c.status(node)
        for s in status.services if status is not None else []:
            if s.name == name and s.state == state:
                return s
        return None

    return await until(found, 30, f"{name} {state} on {node}")


async def test_a_service_with_user_nobody_runs_as_nobody_with_its_health_command(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The agent's own environment holds its identity and a secret: the service must
    # see neither.
    monkeypatch.setenv("SECRET_X", "s3cr3t-of-the-agent")
    monkeypatch.setenv("HAPAIR_TEST_AGENT_ONLY", "agent-only")
    svc = {
        "name": "asnobody",
        "user": "nobody",
        "command": ["sh", "-c", "exec sleep 600"],
        "env": {"DECLARED": "yes"},
        # Healthy only when the check itself runs as nobody and sees no agent secret.
        "health": {
            "command": ["sh", "-c", f'test "$(id -u)" = {NOBODY.pw_uid} -a -z "$SECRET_X"'],
            "interval_s": 0.2,
            "start_period_s": 30,
        },
    }
    await cluster.apply(site(cluster, [svc]))
    cluster.start("a")
    await cluster.active("p", node="a", timeout=30)
    running = await service(cluster, "a", "asnobody", "running")
    pid = running.pid
    assert pid is not None

    async def execed() -> bool:  # past the guard (which drops to nobody), in its program
        comm = await asyncio.to_thread(Path(f"/proc/{pid}/comm").read_text)
        return comm.strip() == "sleep"

    await until(execed, 10, "the service's own program running")
    assert ids_of(pid, "Uid") == [NOBODY.pw_uid] * 4
    assert ids_of(pid, "Gid") == [NOBODY.pw_gid] * 4
    env = environ(pid)
    assert env["DECLARED"] == "yes"
    assert env["HAPAIR_SERVICE"] == "asnobody" and env["HAPAIR_NODE"] == "a"
    assert "SECRET_X" not in env and "HAPAIR_TEST_AGENT_ONLY" not in env
    assert "PYTHONPATH" not in env  # the agent's own, set by the test cluster
    assert env["PATH"].startswith("/") and env["USER"] == "nobody"
    # The agent's state and the services' output: its user and group only.
    state = cluster.tmp / "state-a"
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (state, state / "logs")}
    assert modes == {state: 0o750, state / "logs": 0o750}
    assert stat.S_IMODE((state / "logs" / "asnobody.log").stat().st_mode) == 0o640


async def test_a_service_that_would_run_as_root_is_refused_and_nothing_started(
    cluster: Cluster,
) -> None:
    cluster.allow_root_services = False
    marks = {n: cluster.tmp / f"{n}.ran" for n in ("implicit", "byname", "bynumber")}
    services = [
        {"name": name, "command": ["sh", "-c", f"touch {mark}; exec sleep 600"], **extra}
        for (name, mark), extra in zip(
            marks.items(), [{}, {"user": "root"}, {"user": "0"}], strict=True
        )
    ]
    await cluster.apply(site(cluster, services))
    cluster.start("a")

    async def leads() -> bool:  # never "active": its services are not running
        return (await cluster.leader("p") or ("", 0))[0] == "a"

    await until(leads, 30, "a leading its pair")
    for name in marks:
        refused = await service(cluster, "a", name, "failed")
        assert refused.pid is None
        detail = refused.detail or ""
        assert "root" in detail and "--allow-root-services" in detail, detail
        assert "HAPAIR_ALLOW_ROOT_SERVICES" in detail, detail

    async def events() -> list[dict[str, Any]] | None:
        found = await cluster.events("service refused")
        return found if len(found) >= len(marks) else None

    refusals = await until(events, 10, "an event for each refused service")
    assert {e["details"]["service"] for e in refusals} == set(marks)
    assert all("--allow-root-services" in e["reason"] for e in refusals)
    assert not any(m.exists() for m in marks.values())
    assert 'event="service started"' not in cluster.log("a")
    assert os.geteuid() == 0  # what this test is about: an agent that runs as root


def test_a_service_that_changed_its_user_still_dies_with_its_agent() -> None:
    """A change of user clears the parent death signal ``setpriv`` set: the guard sets
    it again, so a service running as nobody dies with the agent that started it even
    where no cgroup and no watchdog would reach it."""
    ids = encode_ids(NOBODY.pw_uid, NOBODY.pw_gid, (NOBODY.pw_gid,))
    guard = [SETPRIV, "--pdeathsig", "KILL", "--", sys.executable, "-I", "-S", EXEC_GUARD]
    argv = [*guard, "inf", "-", "-", ids, "--", "/bin/sleep", "600"]
    # The agent, played by a process that starts the service and waits.
    agent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys, time\n"
            f"p = subprocess.Popen({argv!r})\nprint(p.pid, flush=True)\ntime.sleep(600)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert agent.stdout is not None
        pid = int(agent.stdout.readline())
        wait_for(
            lambda: Path(f"/proc/{pid}/comm").read_text().strip() == "sleep",
            10,
            "the service's own program running",
        )
        assert ids_of(pid, "Uid") == [NOBODY.pw_uid] * 4
        agent.kill()
        agent.wait(5)
        wait_for(lambda: not pid_alive(pid), 10, "the service dead with its agent")
    finally:
        agent.kill()
        agent.wait(5)
        with contextlib.suppress(ProcessLookupError, NameError):
            os.kill(pid, signal.SIGKILL)
