"""An event stream that asks for what it wants (``?kinds=endpoint&services=mes-api``)
gets that and nothing else of the site, from the state it starts with on; ``stale``
reaches it whatever it asked; a query the registry cannot take is refused naming
what is wrong, and opens no stream. A real registry over a real etcd."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import ClientResponse, ClientSession

from hapair.shared import keys, records
from hapair.shared.client.sse import SseParser
from hapair.shared.store import Store
from tests.integration.test_client_resolver import active_pair, move
from tests.integration.test_registry_stale_streams import (
    STALE_WITHIN_S,
    registry_behind_relay,
    stalled,
)
from tests.support.client_lab import registry_in_process
from tests.support.harness import Etcd
from tests.support.site_records import FakeAgent

ONLY_MES_API = "kinds=endpoint&services=mes-api"
Seen = list[tuple[str, Any]]


async def read_until(
    resp: ClientResponse,
    parser: SseParser,
    seen: Seen,
    done: Callable[[str, Any], bool],
    deadline_s: float = 5.0,
) -> Seen:
    """Events of ``resp`` into ``seen`` up to the first that ``done`` accepts."""
    async with asyncio.timeout(deadline_s):
        async for chunk in resp.content.iter_any():
            for event in parser.feed(chunk):
                seen.append((event.event, json.loads(event.data)))
                if done(*seen[-1]):
                    return seen
    raise AssertionError(f"the stream ended; seen: {seen}")


def endpoint_of(service: str, epoch: int | None = None) -> Callable[[str, Any], bool]:
    def match(kind: str, data: Any) -> bool:
        return (
            kind == "endpoint"
            and data["service"] == service
            and (epoch is None or data.get("epoch") == epoch)
        )

    return match


async def test_a_filtered_stream_gets_only_the_endpoint_answers_it_asked_for(
    etcd: Etcd, store: Store
) -> None:
    a, b = await active_pair(store)
    paint = await FakeAgent(store, "pnt-a", "pnt").up()
    filtered: Seen = []
    everything: Seen = []
    async with (
        registry_in_process(etcd) as url,
        ClientSession() as http,
        http.get(f"{url}/v1/events?{ONLY_MES_API}") as only,
        http.get(f"{url}/v1/events") as every,
    ):
        assert only.status == every.status == 200
        only_parser, every_parser = SseParser(), SseParser()
        await read_until(only, only_parser, filtered, endpoint_of("mes-api"))
        await read_until(every, every_parser, everything, endpoint_of("scada"))
        assert filtered == [("endpoint", filtered[0][1])] and filtered[0][1]["status"] == 200
        assert {k for k, _ in everything} == {"topology", "role", "node", "endpoint"}

        # Another service's pair moves, and the audit trail grows: nothing of it is
        # for the filtered stream. Then mes-api's pair moves: all of that is.
        await paint.become_active()
        await paint.publish("scada", 4840, "opc.tcp")
        await store.put(
            keys.event(time.time_ns(), "pnt-a"),
            records.Event(kind="elected", pair="pnt", node="pnt-a").encode(),
        )
        await read_until(every, every_parser, everything, lambda k, d: k == "event")
        epoch = await move(a, b)
        await read_until(only, only_parser, filtered, endpoint_of("mes-api", epoch))
        await read_until(every, every_parser, everything, endpoint_of("mes-api", epoch))

    assert {(k, d["service"]) for k, d in filtered} == {("endpoint", "mes-api")}
    assert [d["status"] for _, d in filtered][-1] == 200
    assert 503 in [d["status"] for _, d in filtered]  # no endpoint, between the two
    # The unfiltered stream has everything, as before.
    assert {"topology", "role", "node", "endpoint", "event"} <= {k for k, _ in everything}
    assert any(endpoint_of("scada")(k, d) and d["status"] == 200 for k, d in everything)
    assert [(k, d) for k, d in everything if endpoint_of("mes-api")(k, d)] == filtered


async def test_services_alone_restrict_the_endpoint_answers_only(etcd: Etcd, store: Store) -> None:
    await active_pair(store)
    async with (
        registry_in_process(etcd) as url,
        ClientSession() as http,
        http.get(f"{url}/v1/events?services=scada") as resp,
    ):
        seen = await read_until(resp, SseParser(), [], endpoint_of("scada"))
    assert {"topology", "role", "node"} <= {k for k, _ in seen}
    assert [d["service"] for k, d in seen if k == "endpoint"] == ["scada"]


async def test_stale_reaches_a_stream_whatever_it_asked_for(etcd: Etcd, store: Store) -> None:
    await active_pair(store)
    async with (
        registry_behind_relay(etcd, stale_streams_s=60) as (registry, relay),
        ClientSession() as http,
        http.get(f"{registry.url}/v1/events?{ONLY_MES_API}") as only,
        http.get(f"{registry.url}/v1/events?kinds=event") as events,
    ):
        parsers = {only: SseParser(), events: SseParser()}
        seen: dict[ClientResponse, Seen] = {only: [], events: []}
        await read_until(only, parsers[only], seen[only], endpoint_of("mes-api"))
        async with stalled(relay):
            for resp in (only, events):
                await read_until(
                    resp, parsers[resp], seen[resp], lambda k, d: k == "stale", STALE_WITHIN_S
                )
        for resp in (only, events):
            await read_until(
                resp,
                parsers[resp],
                seen[resp],
                lambda k, d: k == "stale" and not d["stale"],
                STALE_WITHIN_S,
            )
    assert [d["stale"] for k, d in seen[events] if k == "stale"] == [True, False]
    assert [d["stale"] for k, d in seen[only] if k == "stale"] == [True, False]
    assert {k for k, _ in seen[events]} == {"stale"}
    assert {k for k, _ in seen[only]} == {"stale", "endpoint"}


BAD_QUERIES = [
    ("kinds=endpoint,roles", "kinds: unknown kind 'roles'"),
    ("kinds=", "kinds: an empty item"),
    ("kinds=endpoint&services=mes-api,,scada", "services: an empty item"),
    ("services=bad%20name", "services: 'bad name' is not a service name"),
    ("services=" + ",".join(f"s{i}" for i in range(101)), "services: 101 names, at most 100"),
    ("kind=endpoint", "kind: Extra inputs are not permitted"),
]


async def test_a_bad_filter_is_refused_naming_the_problem(etcd: Etcd, store: Store) -> None:
    await active_pair(store)
    async with registry_in_process(etcd) as url, ClientSession() as http:
        for query, problem in BAD_QUERIES:
            async with http.get(f"{url}/v1/events?{query}") as resp:
                assert resp.status == 400, query
                assert resp.content_type == "application/json", query  # no stream opened
                body = await resp.json()
            assert body["error"].startswith("invalid query parameter: "), query
            assert problem in body["error"] and problem in body["problems"][0], body
