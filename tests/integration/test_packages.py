"""Every node of a pair installs the software the site file names, by itself, in the
background (the active keeps its lease throughout), and says in its node status and in
events what it holds and why not.

Real etcd (TLS), real agents, a real aiohttp file server started by the test and
``file://`` URLs; the packaged program itself records which version it runs. A bad
hash, a 404, a transfer the server cuts short and a full disk (a small tmpfs as one
node's state directory) each leave the version installed before in place, running, and
reported."""

from __future__ import annotations

import asyncio
import os
import signal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from hapair.shared import pki
from hapair.shared.records import PackageStatus
from tests.integration.test_cli import hapair
from tests.support.cluster import Cluster, pid_alive, until
from tests.support.harness import stop_pid
from tests.support.package_lab import build, package, serving, sha256, small_disk
from tests.support.tls_etcd import TlsEtcd

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("quick_download_retries")]

NODES = ("a", "b")


def site(c: Cluster, services: list[dict[str, Any]]) -> dict[str, Any]:
    nodes = [{"name": n, "address": f"127.0.71.{i + 1}"} for i, n in enumerate(NODES)]
    return c.site([{"name": "p", "nodes": nodes, "services": services}])


def app(c: Cluster, pkg: dict[str, Any]) -> dict[str, Any]:
    """On every node, run from its package; it writes its version to ran/NODE.running."""
    ran = c.tmp / "ran"
    ran.mkdir(exist_ok=True)
    return {
        "name": "app",
        "placement": "all",
        "command": ["{package.dir}/bin/app"],
        "env": {"HAPAIR_RECORD_DIR": str(ran)},
        "package": pkg,
    }


async def package_on(
    c: Cluster, node: str, service: str, version: str, state: str, timeout: float = 60.0
) -> PackageStatus:
    """``node``'s published status of ``service``'s package, once it says ``state``."""

    async def published() -> PackageStatus | None:
        status = await c.status(node)
        for p in status.packages if status is not None else []:
            if p.service == service and p.version == version and p.state == state:
                return p
        return None

    return await until(published, timeout, f"{service} {version} {state} on {node}")


def files_of(c: Cluster) -> Path:
    """Where the test's package files are made (and served from)."""
    files = c.tmp / "files"
    files.mkdir(exist_ok=True)
    return files


def running(c: Cluster, node: str) -> str | None:
    """The version of the packaged program that last started on ``node``."""
    path = c.tmp / "ran" / f"{node}.running"
    return path.read_text().strip() if path.exists() else None


async def runs(c: Cluster, node: str, version: str) -> None:
    async def started() -> bool:
        return running(c, node) == version

    await until(started, 30, f"app {version} running from its package on {node}")


async def events(c: Cluster, kind: str, version: str) -> set[tuple[str, str]]:
    return {
        (e["node"], e["details"]["service"])
        for e in await c.events(kind)
        if e["details"].get("version") == version
    }


async def test_both_nodes_install_from_https_and_file_urls_and_run_from_the_package(
    cluster: Cluster,
) -> None:
    files = files_of(cluster)
    # Large enough that hashing and unpacking take a while: the active keeps its lease.
    v1 = build(files, "app", "1.0", {"data": os.urandom(40 << 20)})
    tool = files / "tool"
    tool.write_text("#!/bin/sh\nexec sleep 600\n")
    # Over HTTPS, its certificate from the site CA: the agents check it against the CA
    # they were given for etcd.
    assert isinstance(cluster.etcd, TlsEtcd)
    tls = cluster.etcd.pki.files("files", pki.Kind.REGISTRY)
    async with serving(files, tls) as server:
        services = [
            app(cluster, package(v1, f"{server.url}/{v1.name}", "1.0")),
            {
                "name": "tool",
                "placement": "all",
                "command": ["{package.dir}/tool"],
                "package": package(tool, tool.as_uri(), "7"),
            },
        ]
        await cluster.apply(site(cluster, services))
        for node in NODES:
            cluster.start(node)
        for node in NODES:
            for name, version in (("app", "1.0"), ("tool", "7")):
                got = await package_on(cluster, node, name, version, "installed")
                assert len(got.installed) == 1 and got.detail is None
    # Each node fetched the archive itself, from the one origin, once.
    assert [r for n, r in server.requests if n == v1.name] == [None, None]
    for node in NODES:
        await runs(cluster, node, "1.0")
    assert await events(cluster, "package installed", "1.0") == {("a", "app"), ("b", "app")}
    assert await events(cluster, "package installed", "7") == {("a", "tool"), ("b", "tool")}
    await cluster.standby("b", timeout=30)
    # Installing in the background never made the active miss its fence point.
    assert await cluster.events("fence") == []
    assert len(await cluster.events("election")) == 1


async def with_v1(c: Cluster) -> dict[str, list[str]]:
    """Both agents started with app 1.0 (file://) installed and running: what each holds."""
    v1 = build(files_of(c), "app", "1.0")
    await c.apply(site(c, [app(c, package(v1, v1.as_uri(), "1.0"))]))
    for node in NODES:
        c.start(node)
    old = {}
    for node in NODES:
        old[node] = (await package_on(c, node, "app", "1.0", "installed")).installed
        await runs(c, node, "1.0")
    return old


async def test_a_bad_hash_a_404_and_a_cut_transfer_leave_the_old_version_running(
    cluster: Cluster,
) -> None:
    files = files_of(cluster)
    v2 = build(files, "app", "2.0", {"noise": os.urandom(200_000).hex()})
    async with serving(files) as server:
        old = await with_v1(cluster)
        server.cut[v2.name] = 20_000  # every transfer ends 20 kB in: never whole
        faults = [
            ("2.0-badhash", {**package(v2, v2.as_uri(), "x"), "sha256": "f" * 64}, "sha256"),
            ("2.0-404", package(v2, f"{server.url}/gone.tar.gz", "x"), "HTTP 404"),
            ("2.0-cut", package(v2, f"{server.url}/{v2.name}", "x"), "incomplete"),
        ]
        for version, pkg, says in faults:
            await cluster.apply(site(cluster, [app(cluster, {**pkg, "version": version})]))
            for node in NODES:
                failed = await package_on(cluster, node, "app", version, "failed", timeout=90)
                assert failed.detail is not None and says in failed.detail, failed
                assert failed.installed == old[node]  # the old version, still whole
                assert running(cluster, node) == "1.0"
            assert await events(cluster, "package failed", version) == {
                ("a", "app"),
                ("b", "app"),
            }
    for node in NODES:
        tops = sorted(
            p.name for p in (cluster.tmp / f"state-{node}" / "packages" / "app").iterdir()
        )
        assert tops == old[node]  # nothing half installed beside it


async def test_a_full_disk_on_one_node_leaves_its_old_version_and_says_so(
    cluster: Cluster,
) -> None:
    files = files_of(cluster)
    big = build(files, "app", "2.0", {"noise": os.urandom(3_000_000).hex()})
    with small_disk(cluster.tmp / "state-b", "2m") as mounted:
        if not mounted:
            pytest.skip("this process may not mount a tmpfs (needs CAP_SYS_ADMIN)")
        try:
            old = (await with_v1(cluster))["b"]
            await cluster.apply(site(cluster, [app(cluster, package(big, big.as_uri(), "2.0"))]))
            await package_on(cluster, "a", "app", "2.0", "installed")
            failed = await package_on(cluster, "b", "app", "2.0", "failed")
            assert failed.detail is not None and "no space left on device" in failed.detail
            assert failed.installed == old
            assert await events(cluster, "package failed", "2.0") == {("b", "app")}
        finally:
            for agent in cluster.agents.values():  # before the tmpfs under node b goes
                await asyncio.to_thread(stop_pid, agent, signal.SIGTERM, 10.0)


async def test_package_hash_prints_a_block_validate_accepts_and_bad_ones_are_named(
    tmp_path: Path,
) -> None:
    archive = build(tmp_path, "mes-api", "2.4.1")
    url = f"https://files.plant.example/mes/{archive.name}"
    printed = await hapair("package", "hash", str(archive), "--url", url)
    assert printed.code == 0, printed.err
    block = yaml.safe_load(printed.out)["package"]
    assert block == {"version": "2.4.1", "url": url, "sha256": sha256(archive)}

    def site_with(pkg: dict[str, Any]) -> Path:
        nodes = [{"name": "a", "address": "127.0.0.1"}, {"name": "b", "address": "127.0.0.2"}]
        svc = {"name": "mes-api", "command": ["{package.dir}/bin/app"], "package": pkg}
        path = tmp_path / "site.yaml"
        path.write_text(
            yaml.safe_dump(Cluster.site([{"name": "p", "nodes": nodes, "services": [svc]}]))
        )
        return path

    ok = await hapair("topology", "validate", str(site_with(block)))
    assert ok.code == 0, ok.err
    bad = await hapair(
        "topology",
        "validate",
        str(site_with({**block, "url": "ftp://files/x.tgz", "sha256": "9f2c..."})),
    )
    assert bad.code == 2
    field = "  workshops[0].pairs[0].services[0].package"
    lines = bad.err.splitlines()
    assert any(
        line.startswith(f"{field}.url: url 'ftp://files/x.tgz': scheme 'ftp'") for line in lines
    )
    assert any(
        line.startswith(f"{field}.sha256: sha256 '9f2c...': 64 hexadecimal") for line in lines
    )


async def test_a_service_removed_from_the_site_is_stopped_then_loses_its_versions(
    cluster: Cluster,
) -> None:
    files = files_of(cluster)
    v1 = build(files, "app", "1.0")
    tool = files / "tool"
    tool.write_text("#!/bin/sh\nexec sleep 600\n")
    tool_service = {
        "name": "tool",
        "placement": "all",
        "command": ["{package.dir}/tool"],
        "package": package(tool, tool.as_uri(), "7"),
    }
    app_service = app(cluster, package(v1, v1.as_uri(), "1.0"))
    await cluster.apply(site(cluster, [app_service, tool_service]))
    for node in NODES:
        cluster.start(node)

    async def tool_pid(node: str) -> int | None:
        status = await cluster.status(node)
        found = [s for s in (status.services if status else []) if s.name == "tool"]
        return found[0].pid if found and found[0].state == "running" else None

    pids = {}
    for node in NODES:
        pids[node] = await until(partial(tool_pid, node), 60, f"tool running on {node}")
    await cluster.apply(site(cluster, [app_service]))

    async def removed(where: Path) -> bool:
        return not await asyncio.to_thread(where.exists)

    for node in NODES:
        state = cluster.tmp / f"state-{node}" / "packages"
        await until(partial(removed, state / "tool"), 30, f"tool's versions removed on {node}")
        # Its process was stopped first: it is gone by the time its directory is.
        assert not pid_alive(pids[node])
        assert (state / "app").is_dir()
    for node in NODES:
        await runs(cluster, node, "1.0")
