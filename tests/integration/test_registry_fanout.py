"""News reaches every event stream, written straight to each socket, framed as each
connection needs: chunked over HTTP/1.1, as it is over HTTP/1.0 (and through TLS:
test_registry_tls). A real registry over a real etcd."""

from __future__ import annotations

import asyncio
import json

from aiohttp import ClientSession, ClientTimeout, TCPConnector

from hapair.shared.client.sse import SseParser
from hapair.shared.store import Store
from tests.integration.test_client_resolver import active_pair, move
from tests.support.client_lab import registry_in_process, until
from tests.support.harness import Etcd

STREAMS = 40


def epochs(events: list[tuple[str, str]]) -> set[int]:
    found = (json.loads(data) for kind, data in events if kind == "endpoint")
    return {d["epoch"] for d in found if d.get("service") == "mes-api" and d.get("epoch")}


async def follow(session: ClientSession, url: str, events: list[tuple[str, str]]) -> None:
    parser = SseParser()
    async with session.get(f"{url}/v1/events") as resp:
        async for chunk in resp.content.iter_any():
            events.extend((e.event, e.data) for e in parser.feed(chunk))


async def follow_http10(url: str, body: bytearray) -> None:
    """An HTTP/1.0 client: no chunked encoding, the body ends with the connection."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/events HTTP/1.0\r\nHost: test\r\n\r\n")
    try:
        while chunk := await reader.read(65536):
            body.extend(chunk)
    finally:
        writer.close()


async def test_news_reaches_every_stream_over_http_1_1_and_1_0(etcd: Etcd, store: Store) -> None:
    a, b = await active_pair(store)
    followed: list[list[tuple[str, str]]] = [[] for _ in range(STREAMS)]
    old_client = bytearray()
    timeout = ClientTimeout(total=None, sock_read=None)
    async with (
        registry_in_process(etcd) as url,
        ClientSession(connector=TCPConnector(limit=0), timeout=timeout) as session,
    ):
        tasks = [asyncio.create_task(follow(session, url, events)) for events in followed]
        tasks.append(asyncio.create_task(follow_http10(url, old_client)))
        try:
            await until(
                lambda: asyncio.sleep(0, all(epochs(e) for e in followed) and old_client),
                "every stream started",
            )
            epoch = await move(a, b)
            await until(
                lambda: asyncio.sleep(0, all(epoch in epochs(e) for e in followed)),
                "every HTTP/1.1 stream told of the new epoch",
            )
            await until(
                lambda: asyncio.sleep(0, f'"epoch": {epoch}'.encode() in old_client),
                "the HTTP/1.0 stream told of the new epoch",
            )
            head, _, raw = bytes(old_client).partition(b"\r\n\r\n")
            assert b"chunked" not in head.lower()
            # The body is the events as they are: each one parses, none is framed.
            events = SseParser().feed(raw)
            assert epoch in epochs([(e.event, e.data) for e in events])
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
