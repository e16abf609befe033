"""The resolver against real registries over a real etcd, and against a fake registry
that sends garbage."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from hapair.shared import keys
from hapair.shared.client import (
    Endpoint,
    RegistryUnavailable,
    ServiceUnavailable,
    UnknownService,
)
from hapair.shared.store import Store
from tests.support.client_lab import (
    FakeRegistry,
    fast,
    next_of,
    registry_in_process,
    until,
    warnings_of,
)
from tests.support.harness import Etcd, free_port
from tests.support.site_records import FakeAgent, apply_site


async def active_pair(store: Store, port: int = 8080) -> tuple[FakeAgent, FakeAgent]:
    """The test site, asm-a active with mes-api published at ``port``; asm-b up."""
    await apply_site(store)
    a = await FakeAgent(store, "asm-a", "asm").up()
    b = await FakeAgent(store, "asm-b", "asm").up()
    await a.become_active()
    await a.publish("mes-api", port)
    return a, b


async def move(a: FakeAgent, b: FakeAgent, port: int = 8080) -> int:
    """The active crashes; the other takes over and publishes: the new epoch."""
    await a.crash()
    epoch = await b.become_active()
    await b.publish("mes-api", port)
    return epoch


async def test_resolve_answers_200_503_404(etcd: Etcd, store: Store) -> None:
    await apply_site(store)
    async with registry_in_process(etcd) as url, fast(url) as resolver:
        with pytest.raises(ServiceUnavailable, match="pair asm has no active node"):
            await resolver.resolve("mes-api")
        with pytest.raises(UnknownService, match="unknown service 'nope'"):
            await resolver.resolve("nope")

        a = await FakeAgent(store, "asm-a", "asm").up()
        epoch = await a.become_active()

        async def publish_soon() -> None:
            await asyncio.sleep(0.2)
            await a.publish("mes-api", 8080)

        publishing = asyncio.create_task(publish_soon())
        # A long-poll: the answer comes the moment the endpoint is published.
        got = await resolver.resolve("mes-api", wait_s=3.0)
        await publishing
        published = await store.get(keys.endpoint("mes-api"))
        assert published is not None
        assert got == Endpoint(
            "mes-api", "asm", "asm-a", "127.0.0.11", 8080, "http", epoch, published.mod_revision
        )
        assert not got.stale and got.address == "127.0.0.11:8080"
        assert got.url() == "http://127.0.0.11:8080"


@pytest.mark.parametrize("transport", ["sse", "poll"])
async def test_watch_yields_each_new_endpoint_at_once(
    etcd: Etcd, store: Store, transport: Any
) -> None:
    a, b = await active_pair(store)
    async with (
        registry_in_process(etcd) as url,
        fast(url, transport=transport) as resolver,
    ):
        async with contextlib.aclosing(resolver.watch("mes-api")) as endpoints:
            first = await next_of(endpoints)
            assert first.node == "asm-a"
            epoch = await move(a, b)
            loop = asyncio.get_running_loop()
            published = loop.time()
            second = await next_of(endpoints)
            assert (second.node, second.epoch) == ("asm-b", epoch)
            assert second.epoch > first.epoch
            assert loop.time() - published < 1.5  # the figure is measured in bench/
            if transport == "sse":
                # The same epoch at another port (a topology change) is news too. A
                # long-poll only wakes for a higher epoch: it learns this at its next
                # poll, or when a connection to the old port fails (a lookup then).
                await b.publish("mes-api", 8081)
                second = await next_of(endpoints)
                assert (second.port, second.epoch) == (8081, epoch)
        state = resolver.state("mes-api")
        assert state.status == 200 and not state.stale and state.endpoint == second


async def test_unknown_service_fails_watch_at_once(etcd: Etcd, store: Store) -> None:
    await active_pair(store)
    async with registry_in_process(etcd) as url, fast(url) as resolver:
        with pytest.raises(UnknownService):
            await next_of(resolver.watch("nope"))


async def test_last_endpoint_kept_stale_while_no_registry_answers(
    etcd: Etcd, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await active_pair(store)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    resolver = fast(url)
    try:
        async with _registry_on(etcd, port):
            seen = await resolver.resolve("mes-api")
        with pytest.raises(RegistryUnavailable, match="no registry answered"):
            await resolver.resolve("scada")  # never seen: nothing to fall back on
        stale = await resolver.resolve("mes-api")
        assert stale == seen and stale.stale
        assert resolver.current("mes-api") == seen
        assert resolver.state("mes-api").stale
        assert "keeping the last endpoint, marked stale" in caplog.text

        # While following, the stale mark comes and goes with the registries.
        async with resolver.following("mes-api"), _registry_on(etcd, port):
            await until(
                lambda: asyncio.sleep(0, not resolver.state("mes-api").stale), "fresh again"
            )
            epoch = await move(a, b)
            fresh = await resolver.newer("mes-api", seen, 3.0)
            assert fresh is not None and fresh.epoch == epoch and not fresh.stale
    finally:
        await resolver.close()


@contextlib.asynccontextmanager
async def _registry_on(etcd: Etcd, port: int) -> AsyncIterator[None]:
    """An in-process registry on a given port (to bring "the same" registry back)."""
    from hapair.registry.app import create_app
    from hapair.registry.appkeys import RegistryConfig

    runner = web.AppRunner(create_app(etcd.url, RegistryConfig(heartbeat_s=0.5), tls=etcd.tls))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    try:
        await until(lambda: _synced(port), "registry in sync")
        yield
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner.cleanup(), 3.0)


async def _synced(port: int) -> bool:
    from aiohttp import ClientSession

    async with ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
        return r.status == 200


# ---- garbage from a registry --------------------------------------------------------


async def test_garbage_goes_to_the_next_registry(
    etcd: Etcd, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    await active_pair(store)
    async with (
        FakeRegistry() as fake,
        registry_in_process(etcd) as good,
        fast([fake.url, good]) as resolver,
    ):
        fake.answer(500, b"<html>Internal Server Error</html>")
        got = await resolver.resolve("mes-api")
        assert got.node == "asm-a" and not got.stale
        assert any("HTTP 500" in w for w in warnings_of(caplog))
        # The good registry is asked first from now on.
        fake.lookups = 0
        await resolver.resolve("mes-api")
        assert fake.lookups == 0
