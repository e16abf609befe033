"""The nodes of a pair fetch their packages from each other first
(``packages: {from_peers: true}``), and serve them to each other alone.

Real etcd (TLS, unless marked ``lab``), real agents, a real aiohttp file server as the
origin, started and stopped by the test. Node b installs from node a while the origin
is gone; a peer whose archive no longer has the right bytes (its file on disk damaged)
is refused by the sha256 check and the origin used; and a's server answers b's agent
certificate alone: no certificate, another CA's, another node's or another component's
is refused, and nothing but the version the site names is served."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hapair.shared import pki
from hapair.workshop_agent.package_peers import PeerTls
from tests.integration.test_packages import app, events, files_of, package_on, runs
from tests.support.cluster import Cluster, until
from tests.support.package_lab import build, package, serving, sha256

pytestmark = pytest.mark.e2e

NODES = ("a", "b")
ADDRESS = {"a": "127.0.73.1", "b": "127.0.73.2"}
PORT = 7401


def site(c: Cluster, pkg: dict[str, Any], from_peers: bool = True) -> dict[str, Any]:
    nodes = [{"name": n, "address": ADDRESS[n]} for n in NODES]
    return c.site(
        [
            {
                "name": "p",
                "nodes": nodes,
                "services": [app(c, pkg)],
                "packages": {"from_peers": from_peers, "peer_port": PORT},
            }
        ]
    )


async def sources(c: Cluster, version: str) -> dict[str, str]:
    """Where each node's ``package installed`` event says its file came from."""
    return {
        e["node"]: e["details"]["source"]
        for e in await c.events("package installed")
        if e["details"].get("version") == version
    }


def shared_file(c: Cluster, node: str, pkg: dict[str, Any]) -> Path:
    """The archive ``node`` keeps for its peers."""
    return c.tmp / f"state-{node}" / "packages" / ".shared" / "app" / f"1.0-{pkg['sha256'][:12]}"


async def a_holds(c: Cluster, pkg: dict[str, Any]) -> None:
    """The site applied with ``pkg``; a started, once it holds it."""
    await c.apply(site(c, pkg))
    c.start("a")
    await package_on(c, "a", "app", "1.0", "installed")


async def test_b_fetches_from_a_while_the_origin_is_gone(cluster: Cluster) -> None:
    files = files_of(cluster)
    v1 = build(files, "app", "1.0", {"data": os.urandom(3 << 20)})
    async with serving(files) as origin:
        pkg = package(v1, f"{origin.url}/{v1.name}", "1.0")
        await a_holds(cluster, pkg)
    # The origin is stopped: whatever b gets, it gets from a.
    assert [r for n, r in origin.requests if n == v1.name] == [None]
    assert sha256(shared_file(cluster, "a", pkg)) == pkg["sha256"]
    cluster.start("b")
    got = await package_on(cluster, "b", "app", "1.0", "installed")
    assert got.detail is None and got.installed == [f"1.0-{pkg['sha256'][:12]}"]
    await runs(cluster, "b", "1.0")
    assert await sources(cluster, "1.0") == {"a": "origin", "b": "a"}
    assert await events(cluster, "package installed", "1.0") == {("a", "app"), ("b", "app")}
    assert "package served to a peer" in cluster.log("a")


async def test_a_new_version_crosses_the_origins_link_once(cluster: Cluster) -> None:
    files = files_of(cluster)
    v1 = build(files, "app", "1.0")
    await cluster.apply(site(cluster, package(v1, v1.as_uri(), "1.0")))
    for node in NODES:
        cluster.start(node)
    for node in NODES:
        await package_on(cluster, node, "app", "1.0", "installed")
    v2 = build(files, "app", "2.0", {"data": os.urandom(1 << 20)})
    async with serving(files) as origin:
        origin.delay_s = 1.0  # a's download takes a while: b sees it under way
        await cluster.apply(site(cluster, package(v2, f"{origin.url}/{v2.name}", "2.0")))
        for node in NODES:
            await package_on(cluster, node, "app", "2.0", "installed")
    # a, first in the pair, fetched it; b waited for a and took it from there.
    assert [r for n, r in origin.requests if n == v2.name] == [None]
    assert await sources(cluster, "2.0") == {"a": "origin", "b": "a"}
    assert "package: waiting for a peer that fetches it first" in cluster.log("b")


async def test_a_peer_that_serves_wrong_bytes_is_refused_and_the_origin_used(
    cluster: Cluster,
) -> None:
    files = files_of(cluster)
    v1 = build(files, "app", "1.0", {"data": os.urandom(1 << 20)})
    async with serving(files) as origin:
        pkg = package(v1, f"{origin.url}/{v1.name}", "1.0")
        await a_holds(cluster, pkg)
        # a's kept archive damaged on its disk: same size, other bytes.
        kept = shared_file(cluster, "a", pkg)
        data = bytearray(await asyncio.to_thread(kept.read_bytes))
        data[len(data) // 2] ^= 0xFF
        await asyncio.to_thread(kept.write_bytes, bytes(data))
        cluster.start("b")
        await package_on(cluster, "b", "app", "1.0", "installed")
        # b asked a first (its status says it holds the version), then the origin.
        assert [r for n, r in origin.requests if n == v1.name] == [None, None]
    assert await sources(cluster, "1.0") == {"a": "origin", "b": "origin"}
    assert "package from a peer refused: its sha256 is not the one" in cluster.log("b")
    assert "package served to a peer" in cluster.log("a")
    await runs(cluster, "b", "1.0")


def bare_client() -> ssl.SSLContext:
    """TLS that shows no certificate (and, as the peers' own, checks none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def ask(
    context: ssl.SSLContext | None, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """GET ``path`` of a's package server: over TLS with ``context``, in clear without."""
    scheme = "http" if context is None else "https"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(
            f"{scheme}://{ADDRESS['a']}:{PORT}{path}",
            ssl=context if context is not None else False,
            headers=headers or {},
        ) as resp,
    ):
        return resp.status, await resp.read()


async def test_only_the_pairs_peers_may_read_and_only_what_the_site_names(
    cluster: Cluster, tmp_path: Path
) -> None:
    v1 = build(files_of(cluster), "app", "1.0", {"data": os.urandom(100_000)})
    pkg = package(v1, v1.as_uri(), "1.0")
    await a_holds(cluster, pkg)
    test_pki = cluster.etcd.pki
    assert test_pki is not None
    path = f"/v1/packages/app/1.0-{pkg['sha256'][:12]}"

    # b, with its agent certificate: the whole archive, and a resumed part of it.
    b = PeerTls.of(test_pki.files("b")).client_context()

    async def served() -> tuple[int, bytes] | None:
        answer = await ask(b, path)
        return answer if answer[0] == 200 else None

    _, body = await until(served, 30, "a serving its package to b")
    assert body == v1.read_bytes()
    assert await ask(b, path, {"Range": "bytes=100-"}) == (206, v1.read_bytes()[100:])
    # Nothing else: no listing, no other version, no way out of the archives.
    for other in (
        "/",
        "/v1/packages/",
        "/v1/packages/app/",
        "/v1/packages/app/0.9-000000000000",
        "/v1/packages/app/..%2F..%2Fapp",
        "/v1/packages/other/1.0",
    ):
        status, _ = await ask(b, other)
        assert status in (404, 405), (other, status)

    # Agent certificates of the site CA that are not a peer's: another node's (not of
    # the pair) and a's own; another component's (the admin's).
    for name in ("z", "a"):
        status, body = await ask(PeerTls.of(test_pki.files(name)).client_context(), path)
        assert status == 403 and b"not a node of pair p besides this one" in body, body
    admin = PeerTls.of(pki.TlsFiles.issued(test_pki.dir, "root")).client_context()
    status, body = await ask(admin, path)
    assert status == 403 and b"no agent certificate of the site CA" in body, body

    # No certificate, or one of another CA (named b): the handshake itself is refused.
    other = tmp_path / "other-ca"
    pki.init(other, "elsewhere")
    pki.issue(other, pki.Kind.AGENT, "b")
    stranger = PeerTls.of(pki.TlsFiles.issued(other, "b")).client_context()
    for context in (bare_client(), stranger):
        with pytest.raises(aiohttp.ClientError):
            await ask(context, path)
    # In clear: not even a TLS handshake.
    with pytest.raises(aiohttp.ClientError):
        await ask(None, path)
    assert "package request refused" in cluster.log("a")


@pytest.mark.lab
async def test_in_the_lab_mode_peers_fetch_in_clear_from_their_addresses_alone(
    cluster: Cluster,
) -> None:
    v1 = build(files_of(cluster), "app", "1.0")
    pkg = package(v1, v1.as_uri(), "1.0")
    await a_holds(cluster, pkg)
    v1.unlink()  # the origin gone: its file removed
    cluster.start("b")
    await package_on(cluster, "b", "app", "1.0", "installed")
    assert await sources(cluster, "1.0") == {"a": "origin", "b": "a"}
    assert "packages served to the pair's peers in clear (lab mode)" in cluster.log("a")
    # From an address that is not a peer's (this test's, 127.0.0.1): refused.
    status, body = await ask(None, f"/v1/packages/app/1.0-{pkg['sha256'][:12]}")
    assert status == 403 and b"127.0.0.1 is not the address of a node of pair p" in body, body
