"""A registry that lags behind etcd (its connection to etcd held back by a relay, so
that it answers from an old memory and keeps its event streams alive with heartbeats)
beside one that is up to date: a client never goes back to what the lagging one says,
and leaves it for the up-to-date one. Real registry processes over a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import ClientSession

from hapair.shared.client import Backoff, Connection, TcpAdapter
from hapair.shared.store import Store
from tests.integration.test_client_resolver import active_pair
from tests.support.client_lab import (
    FreezableRelay,
    RegistryProcess,
    fast,
    node_servers,
    until,
)
from tests.support.harness import Etcd, free_port
from tests.support.site_records import FakeAgent, apply_site


async def answer(url: str, service: str = "mes-api") -> tuple[int, Any]:
    async with ClientSession() as http, http.get(f"{url}/v1/endpoints/{service}") as resp:
        return resp.status, await resp.json()


@contextlib.asynccontextmanager
async def good_and_lagging(
    etcd: Etcd,
) -> AsyncIterator[tuple[RegistryProcess, RegistryProcess, FreezableRelay]]:
    """Two registry processes; the second reaches etcd through a relay to be frozen."""
    async with FreezableRelay(etcd.url) as relay:
        good, lagging = RegistryProcess(etcd), RegistryProcess(etcd, relay.url)
        try:
            await asyncio.gather(good.start(), lagging.start())
            yield good, lagging, relay
        finally:
            await good.stop()
            await lagging.stop()


async def same_answers(*urls: str) -> bool:
    answers = [await answer(url) for url in urls]
    return all(a == answers[0] for a in answers)


async def test_a_lagging_registry_does_not_take_back_a_republished_endpoint(
    etcd: Etcd, store: Store
) -> None:
    a, _ = await active_pair(store)
    async with good_and_lagging(etcd) as (good, lagging, relay):
        await until(lambda: same_answers(good.url, lagging.url), "both registries in step")
        relay.freeze()
        await a.publish("mes-api", 8081)  # the same epoch, another port
        await until(lambda: _port_is(good.url, 8081), "8081 on the good one")
        assert (await answer(lagging.url))[1]["port"] == 8080  # it lags indeed

        async with fast([good.url, lagging.url]) as resolver:
            assert (await resolver.resolve("mes-api")).port == 8081
            good.kill()
            # Only the lagging registry answers now: what it says is older than what
            # is known, so the client keeps the newer endpoint (unconfirmed: stale).
            endpoint = await resolver.resolve("mes-api")
            assert (endpoint.port, endpoint.stale) == (8081, True)
            assert resolver.current("mes-api") == endpoint


async def _port_is(url: str, port: int) -> bool:
    status, body = await answer(url)
    return status == 200 and body["port"] == port


async def test_a_lagging_registry_503_does_not_overwrite_a_200(etcd: Etcd, store: Store) -> None:
    await apply_site(store)
    a = await FakeAgent(store, "asm-a", "asm").up()
    async with good_and_lagging(etcd) as (good, lagging, relay):
        await until(lambda: same_answers(good.url, lagging.url), "both registries in step")
        relay.freeze()  # the lagging one goes on answering 503: no active node
        await a.become_active()
        await a.publish("mes-api", 8080)
        await until(lambda: _port_is(good.url, 8080), "200 on the good one")
        assert (await answer(lagging.url))[0] == 503

        async with fast([good.url, lagging.url]) as resolver:
            first = await resolver.resolve("mes-api")
            good.kill()
            endpoint = await resolver.resolve("mes-api")
            assert endpoint == first and endpoint.stale
            assert resolver.state("mes-api").status == 200


async def ask(conn: Connection, text: str = "ping") -> str:
    conn.writer.write(text.encode() + b"\n")
    await conn.writer.drain()
    async with asyncio.timeout(3):
        return (await conn.reader.readline()).decode().strip()


async def test_a_client_leaves_the_lagging_registry_it_follows(etcd: Etcd, store: Store) -> None:
    """The registry followed lags (its stream goes on with heartbeats, and no news).
    When the old server stops answering, the client asks the other registry, reaches
    the new server, and follows the up-to-date registry from then on."""
    port = free_port()
    a, b = await active_pair(store, port)
    backoff = Backoff(initial_s=0.02, max_s=0.5)
    async with (
        node_servers(port) as (server_a, _),
        good_and_lagging(etcd) as (good, lagging, relay),
    ):
        await until(lambda: same_answers(good.url, lagging.url), "both registries in step")
        async with (
            fast([lagging.url, good.url]) as resolver,
            TcpAdapter(resolver, "mes-api", deadline_s=10, backoff=backoff) as tcp,
        ):
            assert await tcp.run(ask) == "asm-a ping"
            relay.freeze()
            await a.crash()
            await server_a.stop()
            epoch = await b.become_active()
            await b.publish("mes-api", port)
            started = time.monotonic()
            assert await tcp.run(ask) == "asm-b ping"
            assert time.monotonic() - started < 5.0
            assert (await answer(lagging.url))[1]["node"] == "asm-a"  # still lagging

            # The next move is told by the stream, while the old server still
            # answers: the client follows the up-to-date registry now.
            await server_a.start()
            await a.up()
            await b.crash()
            newer = await a.become_active()
            await a.publish("mes-api", port)

            async def moved() -> bool:
                current = resolver.current("mes-api")
                return current is not None and current.epoch == newer

            await until(moved, "the move told by the stream", deadline_s=3.0)
            assert newer > epoch
            assert await tcp.run(ask) == "asm-a ping"
