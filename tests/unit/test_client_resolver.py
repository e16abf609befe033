"""The resolver against a fake registry that sends garbage, or none of what it expects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import pytest

from hapair.shared.client import Endpoint
from tests.support.client_lab import FakeRegistry, fast, next_of, until, warnings_of


def endpoint_json(epoch: int, port: Any = 8080, **change: Any) -> dict[str, Any]:
    body = {
        "service": "mes-api",
        "pair": "asm",
        "node": "asm-a" if port == 8080 else "asm-b",
        "host": "127.0.0.11",
        "port": port,
        "protocol": "http",
        "epoch": epoch,
    }
    return {**body, **change}


async def test_garbage_lookups_are_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with FakeRegistry() as fake, fast(fake.url) as resolver:
        fake.answer(200, endpoint_json(10))
        first = await resolver.resolve("mes-api")
        assert first.epoch == 10 and not first.stale
        garbage = [
            (200, endpoint_json(7, port=9999), "epoch 7 (revision 0) is older than epoch 10"),
            (200, b"{not json", "not JSON"),
            (500, {"error": "boom"}, "HTTP 500"),
            (200, endpoint_json(11, port="8080"), "port: Input should be a valid integer"),
            (200, endpoint_json(11, service="other"), "got an endpoint of 'other'"),
            (503, {"no": "reason"}, "HTTP 503 without a reason"),
        ]
        for status, body, problem in garbage:
            caplog.clear()
            fake.answers = []
            fake.answer(status, body)
            got = await resolver.resolve("mes-api")
            # Never returned: the caller keeps the last good one, marked stale.
            assert got == first and got.stale, problem
            assert any(problem in w for w in warnings_of(caplog)), (problem, warnings_of(caplog))
        fake.answers = []
        fake.answer(200, endpoint_json(12, port=8081))
        assert (await resolver.resolve("mes-api")).epoch == 12


def sse(data: Any, kind: str = "endpoint") -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return f"event: {kind}\nid: 1\ndata: {text}\n\n".encode()


async def test_garbage_in_the_event_stream_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    async with FakeRegistry() as fake, fast(fake.url) as resolver:
        fake.answer(503, {"error": "pair asm has no active node"})
        fake.stream = [
            b"retry: 1000\n\n: heartbeat\n\n",
            sse({**endpoint_json(10), "status": 200}),
            sse("{broken"),
            sse({**endpoint_json(11, port=-1), "status": 200}),
            sse({"service": "mes-api", "status": "200"}),
            sse({"topology": "whatever"}, kind="topology"),
            sse({**endpoint_json(12, port=8081), "status": 200}),
        ]
        seen: list[Endpoint] = []
        async with contextlib.aclosing(resolver.watch("mes-api")) as endpoints:
            async for endpoint in endpoints:
                seen.append(endpoint)
                if endpoint.epoch >= 12:
                    break
        assert [(e.epoch, e.port) for e in seen] == [(10, 8080), (12, 8081)]
        problems = " | ".join(warnings_of(caplog))
        assert "Expecting property name" in problems  # the broken JSON
        assert "port: Input should be greater than or equal to 1" in problems
        assert "status: Input should be a valid integer" in problems


async def test_long_poll_garbage_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    async with (
        FakeRegistry() as fake,
        fast(fake.url, transport="poll", poll_wait_s=0.2) as resolver,
    ):
        fake.answer(200, endpoint_json(10))
        fake.answer(200, endpoint_json(9, port=9999))
        fake.answer(500, b"oops")
        fake.answer(200, b"\x00\x01")
        fake.answer(200, endpoint_json(12, port=8081))
        seen: list[int] = []
        async with contextlib.aclosing(resolver.watch("mes-api")) as endpoints:
            async for endpoint in endpoints:
                seen.append(endpoint.epoch)
                if endpoint.epoch >= 12:
                    break
        assert seen == [10, 12]
        problems = " | ".join(warnings_of(caplog))
        assert "epoch 9 (revision 0) is older than epoch 10" in problems
        assert "HTTP 500" in problems
        assert "not JSON" in problems


async def test_falls_back_to_long_poll_where_there_is_no_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "hapair.client")
    async with (
        FakeRegistry(stream=False) as fake,
        fast(fake.url, poll_wait_s=0.2) as resolver,
    ):
        fake.answer(200, endpoint_json(10))
        fake.answer(200, endpoint_json(11, port=8081))
        async with contextlib.aclosing(resolver.watch("mes-api")) as endpoints:
            assert (await next_of(endpoints)).epoch == 10
            assert (await next_of(endpoints)).epoch == 11
        assert "registry has no event stream; long-polling it" in caplog.text
        assert fake.lookups >= 2


async def test_a_stream_that_goes_back_is_left(caplog: pytest.LogCaptureFixture) -> None:
    """An event older than what is known means the registry lags behind etcd: its
    stream is given up (here for itself again, the only one) and nothing goes back."""
    async with FakeRegistry() as fake, fast(fake.url) as resolver:
        fake.answer(200, endpoint_json(10))
        fake.stream = [sse({**endpoint_json(10), "status": 200})]
        async with contextlib.aclosing(resolver.watch("mes-api")) as endpoints:
            assert (await next_of(endpoints)).epoch == 10
            fake.stream = [sse({**endpoint_json(7, port=9999), "status": 200})]
            await until(
                lambda: asyncio.sleep(0, "registry behind" in caplog.text), "the stream left"
            )
            fake.stream = [sse({**endpoint_json(12, port=8081), "status": 200})]
            assert (await next_of(endpoints)).epoch == 12


async def test_a_busy_registry_is_not_taken_for_the_service(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """503 with Retry-After: the registry has too many readers (it says nothing of the
    service); the next registry is asked."""
    async with FakeRegistry() as busy, FakeRegistry() as other, fast([busy.url, other.url]) as r:
        busy.answers.append(
            (503, json.dumps({"error": "too many long-polls open on this registry"}).encode())
        )
        busy.retry_after = True
        other.answer(200, endpoint_json(10))
        got = await r.resolve("mes-api")
        assert got.epoch == 10 and r.state("mes-api").status == 200
        assert any("too many long-polls" in w for w in warnings_of(caplog))


async def test_a_registry_that_takes_no_filter_is_followed_unfiltered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A registry older than stream filters refuses them (400): the resolver follows it
    unfiltered, remembers so, and says it once, at info: it is neither down nor garbage."""
    caplog.set_level(logging.INFO, "hapair.client")
    async with FakeRegistry(filters=False) as old, fast(old.url) as resolver:
        old.answer(200, endpoint_json(10))
        old.stream = [
            sse({"pair": "asm", "active": "asm-a"}, kind="role"),
            sse({**endpoint_json(10), "status": 200}),
            sse({**endpoint_json(11, port=8081), "status": 200}),
        ]
        async with contextlib.aclosing(resolver.watch("mes-api")) as endpoints:
            assert (await next_of(endpoints)).epoch == 10
            assert (await next_of(endpoints)).epoch == 11
            async with resolver.following("scada"):  # carried already: no new stream
                await asyncio.sleep(0.3)
        asked = [{k: v for k, v in q.items() if k != "heartbeat_s"} for q in old.stream_queries]
        assert asked == [{"kinds": "endpoint", "services": "mes-api"}, {}]
        assert warnings_of(caplog) == []
        told = [r for r in caplog.records if "takes no stream filter" in r.getMessage()]
        assert len(told) == 1 and told[0].levelno == logging.INFO


async def test_the_stream_asks_for_the_services_followed() -> None:
    async with FakeRegistry() as fake, fast(fake.url) as resolver:
        fake.answer(200, endpoint_json(10))
        fake.stream = [sse({**endpoint_json(10), "status": 200})]
        async with resolver.following("scada"), resolver.following("mes-api"):
            await until(lambda: asyncio.sleep(0, resolver.current("mes-api")), "followed")
        queries = {q["services"] for q in fake.stream_queries}
        assert queries <= {"scada", "mes-api,scada"} and "mes-api,scada" in queries
        assert all(q["kinds"] == "endpoint" for q in fake.stream_queries)
