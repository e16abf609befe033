"""The registry over a prefix larger than one gRPC answer may be (4 MiB by default)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hapair.registry.app import create_app
from hapair.registry.appkeys import CACHE, STORE
from hapair.shared import keys, records
from hapair.shared.store import Store
from hapair.shared.txn import Op
from hapair.shared.view import RECENT_EVENTS
from tests.integration.test_registry import until
from tests.support.site_records import FakeAgent, apply_site
from tests.unit.test_registry import get

EVENTS = 10_000
REASON = "x" * 480  # an operator's reason: events run to about 600 bytes each
LOAD_WITHIN_S = 60.0  # a generous liveness deadline on a loaded machine


async def fill(store: Store, count: int) -> int:
    """``count`` audit events, a hundred per transaction; their total size in bytes."""
    size, start = 0, time.time_ns() - count * 1000
    for first in range(0, count, 100):
        puts = []
        for i in range(first, min(first + 100, count)):
            key = keys.event(start + i * 1000, "asm-a")
            value = records.Event(kind="switchover", pair="asm", reason=REASON).encode()
            size += len(key) + len(value)
            puts.append(Op.put(key, value))
        await store.txn([], puts)
    return size


async def answers(c: TestClient[Any, Any], path: str, check: Callable[[Any], bool]) -> Any:
    async def probe() -> Any:
        status, body = await get(c, path)
        return body if status == 200 and check(body) else None

    return await until(probe, f"{path} to answer as expected", LOAD_WITHIN_S)


@pytest.fixture
async def big(store: Store) -> AsyncIterator[FakeAgent]:
    assert await fill(store, EVENTS) > 4 * 1024 * 1024
    await apply_site(store)
    a = await FakeAgent(store, "asm-a", "asm").up()
    await a.become_active()
    await a.publish("mes-api", 8080)
    yield a


async def test_registry_loads_and_follows_a_prefix_over_4_mib(
    etcd: Any, store: Store, big: FakeAgent
) -> None:
    app = create_app(etcd.url, tls=etcd.tls)
    async with TestClient(TestServer(app)) as c:
        await answers(c, "/healthz", lambda body: body["status"] == "ok")
        assert (await get(c, "/v1/endpoints/mes-api"))[1]["epoch"] == big.epoch
        # The registry keeps the newest events only, not ten thousand.
        cache = app[CACHE]
        assert len(cache.view.events) == RECENT_EVENTS
        assert sum(k.startswith(keys.EVENTS_PREFIX) for k in cache.mirror.items) == RECENT_EVENTS

        # A broken watch resumes without reading everything again, and new events and
        # moves still come through.
        b = await FakeAgent(store, "asm-b", "asm").up()
        await big.crash()
        app[STORE].failover("test: the watch breaks")
        epoch = await b.become_active()
        await b.publish("mes-api", 8080)
        await answers(c, "/v1/endpoints/mes-api", lambda body: body["epoch"] == epoch)
        event = records.Event(kind="elected", pair="asm", node="asm-b", epoch=epoch)
        await store.put(keys.event(time.time_ns(), "asm-b"), event.encode())
        site = await answers(c, "/v1/site", lambda site: site["events"][-1]["kind"] == "elected")
        assert [e["kind"] for e in site["events"]] == ["switchover"] * (RECENT_EVENTS - 1) + [
            "elected"
        ]
