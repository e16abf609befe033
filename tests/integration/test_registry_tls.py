"""``hapair-registry`` over HTTPS with certificates from ``hapair pki``: lookups,
the clients given the CA, and operators' client certificates on the admin routes."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from hapair.registry.console.top.feed import Request, SiteFeed
from hapair.shared import keys, pki, records
from hapair.shared.client import RegistryUnavailable, Resolver
from hapair.shared.client.registries import registry_ssl
from hapair.shared.store import Store
from tests.integration.test_client_resolver import active_pair, move
from tests.integration.test_proxy import ProxyProcess, ask
from tests.integration.test_registry import closed_by_peer
from tests.support.client_lab import BIN, RegistryProcess, next_of, node_servers, until
from tests.support.harness import Etcd, free_port


@dataclass
class Secure:
    url: str
    pki: Path

    @property
    def ca(self) -> Path:
        return self.pki / pki.CA_CERT

    def ssl(self, name: str | None = None) -> ssl.SSLContext:
        """A client's context trusting the site CA, showing ``name``'s certificate."""
        cert, key = (self.pki / f"{name}.crt", self.pki / f"{name}.key") if name else (None, None)
        context = registry_ssl(self.ca, cert, key)
        assert context is not None
        return context


@pytest.fixture(scope="module")
def site_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    pki.init(directory, "test")
    pki.issue(directory, "registry", "reg-1", ips=["127.0.0.1"])
    pki.issue(directory, "operator", "alice")
    pki.issue(directory, "agent", "asm-a")
    pki.issue(directory, "prometheus", "prom")
    return directory


def _https(site_pki: Path, *more: str) -> tuple[str, ...]:
    """A registry's options to serve HTTPS with the site's registry certificate."""
    return (
        *("--tls-cert", str(site_pki / "reg-1.crt"), "--tls-key", str(site_pki / "reg-1.key")),
        *more,
    )


def _registry(
    etcd: Etcd, site_pki: Path, args: tuple[str, ...], log: Path | None = None
) -> RegistryProcess:
    """A registry process serving HTTPS, its health asked by a client trusting the CA."""
    return RegistryProcess(etcd, args=args, log=log, https=Secure("", site_pki).ssl())


@pytest.fixture
async def secure(etcd: Etcd, store: Store, site_pki: Path, tmp_path: Path) -> AsyncIterator[Secure]:
    """A registry serving HTTPS with the site's registry certificate, taking operators'
    certificates (and no token) on its admin routes."""
    args = _https(site_pki, "--client-ca", str(site_pki / pki.CA_CERT))
    process = _registry(etcd, site_pki, args, tmp_path / "registry.log")
    await process.start()
    try:
        yield Secure(process.url, site_pki)
    finally:
        await process.stop()
        process.assert_no_traceback()


async def test_lookups_over_https_for_clients_given_the_ca(secure: Secure, store: Store) -> None:
    await active_pair(store)
    async with Resolver(secure.url, registry_ca=secure.ca) as resolver:
        assert (await resolver.resolve("mes-api")).node == "asm-a"
    # Without the CA the registry's certificate is not trusted: nothing is asked of it.
    async with Resolver(secure.url, request_timeout_s=2.0) as resolver:
        with pytest.raises(RegistryUnavailable, match="certificate"):
            await resolver.resolve("mes-api")
    env = {**os.environ, "HAPAIR_REGISTRY": secure.url, "HAPAIR_REGISTRY_CA": str(secure.ca)}
    for command in (["resolve", "mes-api"], ["status", "--registry", secure.url]):
        done = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "hapair"), *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert "127.0.0.11" in done.stdout or "asm-a" in done.stdout, done.stdout


async def test_an_operators_client_certificate_is_an_admin_credential(
    secure: Secure, store: Store
) -> None:
    await active_pair(store)
    pause = f"{secure.url}/v1/pairs/asm/pause"
    async with aiohttp.ClientSession() as session:
        async with session.post(pause, json={}, ssl=secure.ssl()) as resp:
            assert resp.status == 401, await resp.text()
        for component in ("asm-a", "prom"):  # an agent's, a scraper's
            async with session.post(pause, json={}, ssl=secure.ssl(component)) as resp:
                assert resp.status == 403, component
                assert "not an operator's" in (await resp.json())["error"]
        # A browser carries the certificate to any page's form: a form is refused.
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        async with session.post(pause, data=b"a=b", headers=form, ssl=secure.ssl("alice")) as r:
            assert r.status == 415
        assert await store.get(keys.paused("asm")) is None
        async with session.post(pause, json={"reason": "x"}, ssl=secure.ssl("alice")) as resp:
            assert resp.status == 200, await resp.text()
    kv = await store.get(keys.paused("asm"))
    assert kv is not None and records.decode(records.Paused, kv.value, kv.key).by == "alice"


async def test_hapair_top_sends_with_the_operators_certificate(
    secure: Secure, store: Store
) -> None:
    await active_pair(store)
    feed = SiteFeed([secure.url], ssl=secure.ssl("alice"))
    ok, said = await feed.send(Request("switchover", "asm", {"to": "asm-b"}))
    assert ok, said
    kv = await store.get(keys.switchover("asm"))
    assert kv is not None and records.decode(records.Switchover, kv.value, kv.key).by == "alice"


async def test_hapair_proxy_follows_an_https_registry(
    secure: Secure, store: Store, tmp_path: Path
) -> None:
    port = free_port()
    await active_pair(store, port)
    async with (
        node_servers(port),
        ProxyProcess(secure.url, tmp_path / "proxy.log", "--registry-ca", str(secure.ca)) as proxy,
    ):
        conn = await proxy.connect()
        assert await ask(conn) == "asm-a ping"
        conn[1].close()


async def test_news_reaches_an_event_stream_over_https(secure: Secure, store: Store) -> None:
    a, b = await active_pair(store)
    async with Resolver(secure.url, registry_ca=secure.ca, transport="sse") as resolver:
        endpoints = resolver.watch("mes-api")
        first = await next_of(endpoints, 10)
        epoch = await move(a, b)
        moved = await next_of(endpoints, 10)
        assert (first.node, moved.node, moved.epoch) == ("asm-a", "asm-b", epoch)
        await endpoints.aclose()


async def test_connections_that_never_finish_the_tls_handshake_are_closed(
    etcd: Etcd, store: Store, site_pki: Path
) -> None:
    """Over HTTPS, a connection that never ends its TLS handshake is closed after the
    header timeout too, however many; lookups answer meanwhile."""
    await active_pair(store)
    process = _registry(etcd, site_pki, _https(site_pki, "--header-timeout", "1"))
    await process.start()
    secure, port = Secure(process.url, site_pki), process.port
    held: list[socket.socket] = []
    try:
        async with aiohttp.ClientSession() as session:

            async def lookup() -> bool:
                try:
                    async with session.get(
                        f"{secure.url}/v1/endpoints/mes-api", ssl=secure.ssl()
                    ) as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await until(lookup, "hapair-registry to answer a lookup over HTTPS", 20)
            for i in range(40):
                sock = socket.create_connection(("127.0.0.1", port))
                # Half of them start a TLS record (a ClientHello's first bytes) and stop.
                sock.sendall(b"\x16\x03\x01\x02\x00" if i % 2 else b"")
                sock.setblocking(False)
                held.append(sock)

            async def all_closed() -> bool:
                assert await lookup(), "a lookup failed while the handshakes were held"
                await asyncio.sleep(0.2)
                return all(closed_by_peer(s) for s in held)

            await until(all_closed, "the registry to close every unfinished handshake", 15)
    finally:
        for sock in held:
            sock.close()
        await process.stop()
