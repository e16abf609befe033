"""Updating a pair: a new package version applied is only installed beside the running
one, and each copy moves to it when it next starts.

Real etcd (TLS), real agents, packages from ``file://`` URLs built by the test; the
packaged program is the recording test server (tests/support/svc.py).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from hapair.shared.records import NodeStatus, ServiceStatus
from tests.support.cluster import Cluster, until
from tests.support.harness import free_port
from tests.support.package_lab import build_server, package, served

pytestmark = pytest.mark.e2e

NODES = {"a": "127.0.73.1", "b": "127.0.73.2"}


def files_of(c: Cluster) -> Path:
    files = c.tmp / "files"
    files.mkdir(exist_ok=True)
    return files


class Pair:
    """A pair of two agents whose services come from one package: ``web`` on the
    active (with an endpoint the client follows), ``warm`` on every node."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.web_port, self.warm_port = free_port(), free_port()

    def site(self, pkg: dict[str, Any]) -> dict[str, Any]:
        # The cluster checks from web's records that no two nodes ever ran it at once;
        # warm's are apart: it runs on both nodes at once, by design.
        web = served(
            "web",
            self.web_port,
            pkg,
            self.c.record,
            endpoint={"port": self.web_port, "protocol": "http"},
        )
        warm = served("warm", self.warm_port, pkg, self.c.tmp / "record-warm", placement="all")
        nodes = [{"name": n, "address": a} for n, a in NODES.items()]
        return self.c.site([{"name": "p", "nodes": nodes, "services": [web, warm]}])

    async def apply(self, archive: Path, version: str) -> str:
        """Apply the site with ``archive`` as version ``version``; its directory name."""
        pkg = package(archive, archive.as_uri(), version)
        await self.c.apply(self.site(pkg))
        return f"{version}-{pkg['sha256'][:12]}"


async def service(c: Cluster, node: str, name: str) -> ServiceStatus | None:
    status = await c.status(node)
    return next((s for s in status.services if s.name == name), None) if status else None


async def runs_on(c: Cluster, node: str, name: str, version: str, timeout: float = 30) -> int:
    """Wait until ``name`` runs (healthy) on ``node`` from ``version``; its pid."""

    async def running() -> int | None:
        s = await service(c, node, name)
        ok = s is not None and s.state == "running" and s.package == version
        return s.pid if ok and s is not None else None

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
    assert await runs_on(cluster, "b", "warm", v2) != warm_b
    s = await service(cluster, "a", "warm")
    assert s is not None and (s.pid, s.package) == (warm_a, v1)
