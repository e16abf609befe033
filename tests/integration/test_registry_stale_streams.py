"""A registry out of touch with etcd (its connection to etcd held back by a relay, as a
stalled member would) tells its event streams that its view is not current, and tells
them again once it is: a short stall ends no stream, so that its clients do not all
reconnect at once. Out of touch for longer than ``--stale-streams``, it ends them, and
refuses new ones. A real registry process over a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout, TCPConnector

from hapair.shared.client import Resolver
from hapair.shared.client.sse import SseParser
from hapair.shared.store import Store
from tests.integration.test_client_resolver import active_pair, move
from tests.support.client_lab import FreezableRelay, RegistryProcess, until
from tests.support.harness import Etcd

STREAMS = 20
STALE_WITHIN_S = 20.0  # generous: the registry's freshness bound is 3 s


@dataclass
class Follower:
    """One event stream, read to its end: every event's kind and data, in order."""

    events: list[tuple[str, Any]] = field(default_factory=list)
    ended: bool = False

    def stale_marks(self) -> list[bool]:
        return [bool(data["stale"]) for kind, data in self.events if kind == "stale"]

    def epochs(self) -> set[int]:
        return {
            data["epoch"]
            for kind, data in self.events
            if kind == "endpoint" and data.get("service") == "mes-api" and data.get("epoch")
        }


async def follow(session: ClientSession, url: str, follower: Follower) -> None:
    parser = SseParser()
    async with session.get(f"{url}/v1/events") as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            for event in parser.feed(chunk):
                follower.events.append((event.event, json.loads(event.data)))
    follower.ended = True


@contextlib.asynccontextmanager
async def streams(url: str) -> AsyncIterator[list[Follower]]:
    followers = [Follower() for _ in range(STREAMS)]
    timeout = ClientTimeout(total=None, sock_read=None)
    async with ClientSession(connector=TCPConnector(limit=0), timeout=timeout) as session:
        tasks = [asyncio.create_task(follow(session, url, f)) for f in followers]
        try:
            await until(
                lambda: asyncio.sleep(0, all(f.epochs() for f in followers)),
                "every stream started with the current state",
            )
            yield followers
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def registry_behind_relay(
    etcd: Etcd, stale_streams_s: float
) -> AsyncIterator[tuple[RegistryProcess, FreezableRelay]]:
    """A registry process reaching etcd through a relay that can be frozen."""
    async with FreezableRelay(etcd.url) as relay:
        args = ["--stale-streams", f"{stale_streams_s:g}"]
        registry = await RegistryProcess(etcd, relay.url, args=args).start()
        try:
            yield registry, relay
        finally:
            await registry.stop()


@contextlib.asynccontextmanager
async def stalled(relay: FreezableRelay) -> AsyncIterator[None]:
    """etcd's answers held back while inside."""
    relay.freeze()
    try:
        yield
    finally:
        relay.thaw()


async def new_stream_refused(url: str) -> bool:
    async with ClientSession() as session, session.get(f"{url}/v1/events") as resp:
        return resp.status == 503


async def test_a_short_stall_marks_the_streams_stale_and_current_again_and_ends_none(
    etcd: Etcd, store: Store
) -> None:
    a, b = await active_pair(store)
    async with (
        registry_behind_relay(etcd, stale_streams_s=60) as (registry, relay),
        streams(registry.url) as followers,
    ):
        async with stalled(relay):
            await until(
                lambda: asyncio.sleep(0, all(f.stale_marks() for f in followers)),
                "every stream told that the registry is not current",
                STALE_WITHIN_S,
            )
            assert await new_stream_refused(registry.url)
        await until(
            lambda: asyncio.sleep(0, all(f.stale_marks()[-1:] == [False] for f in followers)),
            "every stream told that the registry is current again",
            STALE_WITHIN_S,
        )
        assert not any(f.ended for f in followers)
        # The streams go on carrying news.
        epoch = await move(a, b)
        await until(
            lambda: asyncio.sleep(0, all(epoch in f.epochs() for f in followers)),
            "every stream told of the new epoch",
        )
        assert not any(f.ended for f in followers)
        assert all(f.stale_marks() == [True, False] for f in followers)


async def test_a_long_stall_ends_the_streams(etcd: Etcd, store: Store) -> None:
    await active_pair(store)
    async with (
        registry_behind_relay(etcd, stale_streams_s=1) as (registry, relay),
        streams(registry.url) as followers,
        stalled(relay),
    ):
        await until(
            lambda: asyncio.sleep(0, all(f.ended for f in followers)),
            "every stream ended",
            STALE_WITHIN_S,
        )
        # Each was told why before it ended.
        assert all(f.stale_marks() == [True] for f in followers)
        assert await new_stream_refused(registry.url)


async def test_the_client_library_marks_its_endpoint_stale_meanwhile_and_stays(
    etcd: Etcd, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    await active_pair(store)
    async with (
        registry_behind_relay(etcd, stale_streams_s=60) as (registry, relay),
        Resolver(registry.url, request_timeout_s=0.5, transport="sse") as resolver,
        resolver.following("mes-api"),
    ):

        def stale() -> bool | None:
            state = resolver.state("mes-api")
            return None if state.endpoint is None else state.stale

        await until(lambda: asyncio.sleep(0, stale() is False), "the endpoint followed")
        async with stalled(relay):
            await until(
                lambda: asyncio.sleep(0, stale() is True),
                "the endpoint marked stale, as the registry says",
                STALE_WITHIN_S,
            )
        await until(
            lambda: asyncio.sleep(0, stale() is False),
            "the endpoint current again, as the registry says",
            STALE_WITHIN_S,
        )
    # It stayed on its stream all along: it never found the registry unavailable.
    assert "registry unavailable" not in caplog.text
