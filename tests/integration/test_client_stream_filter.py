"""The resolver asks a registry's event stream for the endpoint answers of the services
it follows, and nothing else; following one more, it opens a stream that carries it
too, at once. A service it resolved but does not follow, told by another registry,
does not make it leave the registry it follows. Real registries over a real etcd."""

from __future__ import annotations

import asyncio
import time

import pytest
from yarl import URL

from hapair.shared.store import Store
from tests.integration.test_client_resolver import active_pair, move
from tests.support.client_lab import fast, registry_in_process, until, warnings_of
from tests.support.harness import Etcd
from tests.support.site_records import FakeAgent

Asked = list[tuple[URL, int]]


def streams_asked(asked: Asked) -> list[dict[str, str]]:
    """The queries of the event streams a registry was asked for, heartbeat aside."""
    return [
        {k: v for k, v in url.query.items() if k != "heartbeat_s"}
        for url, _ in asked
        if url.path == "/v1/events"
    ]


def lookups(asked: Asked) -> list[str]:
    return [url.path for url, _ in asked if url.path.startswith("/v1/endpoints/")]


async def paint_pair(store: Store) -> tuple[FakeAgent, FakeAgent]:
    """pnt-a active with scada published; pnt-b up."""
    a = await FakeAgent(store, "pnt-a", "pnt").up()
    b = await FakeAgent(store, "pnt-b", "pnt").up()
    await a.become_active()
    await a.publish("scada", 4840, "opc.tcp")
    return a, b


async def test_the_stream_asks_for_the_services_followed_and_widens_at_once(
    etcd: Etcd, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    await active_pair(store)
    pnt_a, pnt_b = await paint_pair(store)
    asked: Asked = []
    async with (
        registry_in_process(etcd, asked=asked) as url,
        fast(url, transport="sse") as resolver,
        resolver.following("mes-api"),
    ):
        await until(lambda: asyncio.sleep(0, resolver.current("mes-api")), "mes-api followed")
        assert streams_asked(asked) == [{"kinds": "endpoint", "services": "mes-api"}]
        assert resolver.current("scada") is None  # not carried: never heard of

        started = time.monotonic()
        async with resolver.following("scada"):
            await until(lambda: asyncio.sleep(0, resolver.current("scada")), "scada followed")
            assert time.monotonic() - started < 1.0  # at once: no back-off
            await pnt_a.crash()
            epoch = await pnt_b.become_active()
            await pnt_b.publish("scada", 4840, "opc.tcp")

            async def moved() -> bool:
                current = resolver.current("scada")
                return current is not None and current.epoch == epoch

            await until(moved, "scada's move told by the stream")
        # A service no longer followed costs no new stream.
        await asyncio.sleep(0.3)
        assert streams_asked(asked) == [
            {"kinds": "endpoint", "services": "mes-api"},
            {"kinds": "endpoint", "services": "mes-api,scada"},
        ]
    assert lookups(asked) == []  # all of it through the stream
    assert all(status == 200 for _, status in asked)
    assert warnings_of(caplog) == []  # the restart was not taken for a failure


async def test_a_service_resolved_elsewhere_does_not_make_it_leave_its_registry(
    etcd: Etcd, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The followed registry's stream carries mes-api alone: it has nothing to say of
    scada, learnt from the other registry, and is not behind for that."""
    a, b = await active_pair(store)
    await paint_pair(store)
    first: Asked = []
    second: Asked = []
    async with (
        registry_in_process(etcd, asked=first) as one,
        registry_in_process(etcd, asked=second) as other,
        fast([one, other], transport="sse") as resolver,
        resolver.following("mes-api"),
    ):
        await until(lambda: asyncio.sleep(0, resolver.current("mes-api")), "mes-api followed")
        scada = await resolver.resolve("scada", avoid=one)  # news, from the other one
        assert scada.node == "pnt-a" and lookups(second) == ["/v1/endpoints/scada"]
        await asyncio.sleep(4 * resolver.request_timeout_s)
        epoch = await move(a, b)

        async def moved() -> bool:
            current = resolver.current("mes-api")
            return current is not None and current.epoch == epoch

        await until(moved, "mes-api's move told by the stream")
    assert not [w for w in warnings_of(caplog) if "behind" in w]
    assert len(streams_asked(first)) == 1 and streams_asked(second) == []
