"""The TCP and HTTP adapters follow an endpoint record that moves between two servers
(real etcd, a real registry, real sockets on the nodes' addresses)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from hapair.shared.client import (
    Backoff,
    Connection,
    DeadlineExceeded,
    Endpoint,
    EndpointChanged,
    HttpAdapter,
    Resolver,
    TcpAdapter,
    UnknownService,
)
from hapair.shared.store import Store
from tests.support.client_lab import NodeHttp, NodeServer, node_servers, registry_in_process, until
from tests.support.harness import Etcd, free_port
from tests.support.site_records import FakeAgent, apply_site

FAST_BACKOFF = Backoff(initial_s=0.02, max_s=0.2)


@dataclass
class Site:
    resolver: Resolver
    a: FakeAgent
    b: FakeAgent
    port: int

    async def move(self, port: int | None = None) -> int:
        """asm-a crashes, asm-b takes over and publishes: the new epoch."""
        await self.a.crash()
        epoch = await self.b.become_active()
        await self.b.publish("mes-api", port or self.port)
        return epoch


@contextlib.asynccontextmanager
async def site(etcd: Etcd, store: Store, port: int) -> AsyncIterator[Site]:
    await apply_site(store)
    a = await FakeAgent(store, "asm-a", "asm").up()
    b = await FakeAgent(store, "asm-b", "asm").up()
    await a.become_active()
    await a.publish("mes-api", port)
    async with (
        registry_in_process(etcd) as url,
        Resolver(url, request_timeout_s=0.5, stream_idle_s=2.0) as resolver,
    ):
        yield Site(resolver, a, b, port)


async def ask(conn: Connection, text: str = "ping") -> str:
    conn.writer.write(text.encode() + b"\n")
    await conn.writer.drain()
    return (await conn.reader.readline()).decode().strip()


@pytest.fixture
async def servers() -> AsyncIterator[tuple[int, NodeServer, NodeServer]]:
    port = free_port()
    async with node_servers(port) as (a, b):
        yield port, a, b


# ---- TCP --------------------------------------------------------------------------


async def test_tcp_follows_the_endpoint_and_closes_the_old_connection(
    etcd: Etcd, store: Store, servers: tuple[int, NodeServer, NodeServer]
) -> None:
    port, _, _ = servers
    async with (
        site(etcd, store, port) as s,
        TcpAdapter(s.resolver, "mes-api", deadline_s=3, backoff=FAST_BACKOFF) as tcp,
    ):
        assert await tcp.run(ask) == "asm-a ping"
        old = await tcp.connection()
        assert old.endpoint.node == "asm-a" and tcp.endpoint == old.endpoint
        # A read pending on the old connection when the service moves ends at once.
        pending = asyncio.create_task(old.reader.readline())
        await asyncio.sleep(0.05)
        assert not pending.done()
        epoch = await s.move()
        with pytest.raises(EndpointChanged, match="moved to asm-b"):
            async with asyncio.timeout(2):
                await pending
        assert old.writer.is_closing()
        assert await tcp.run(ask) == "asm-b ping"
        assert tcp.endpoint is not None and tcp.endpoint.epoch == epoch


class FailingOnce(TcpAdapter):
    """Its reaction to the first endpoint it is told of fails (a fault injected into
    the watcher: any error there must not end the following of moves)."""

    failed = False

    async def _moved(self, endpoint: Endpoint) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected fault")
        await super()._moved(endpoint)


async def test_the_watcher_goes_on_after_an_error(
    etcd: Etcd, store: Store, servers: tuple[int, NodeServer, NodeServer]
) -> None:
    port, _, _ = servers
    async with (
        site(etcd, store, port) as s,
        FailingOnce(s.resolver, "mes-api", deadline_s=3, backoff=FAST_BACKOFF) as tcp,
    ):
        old = await tcp.connection()
        await until(lambda: asyncio.sleep(0, tcp.failed), "the injected fault")
        await s.move()
        # The old server still answers: only the watcher can close this connection.
        with pytest.raises(EndpointChanged, match="moved to asm-b"):
            async with asyncio.timeout(3):
                await old.reader.read()
        assert await tcp.run(ask) == "asm-b ping"


async def test_tcp_run_goes_on_through_an_outage(
    etcd: Etcd, store: Store, servers: tuple[int, NodeServer, NodeServer]
) -> None:
    port, server_a, _ = servers
    async with (
        site(etcd, store, port) as s,
        TcpAdapter(s.resolver, "mes-api", deadline_s=5, backoff=FAST_BACKOFF) as tcp,
    ):
        assert await tcp.run(ask) == "asm-a ping"
        await server_a.stop()  # the active dies; its lease has not expired yet

        async def failover_later() -> float:
            await asyncio.sleep(0.4)
            await s.move()
            return time.monotonic()

        moving = asyncio.create_task(failover_later())
        assert await tcp.run(ask) == "asm-b ping"  # waited through, no error
        answered = time.monotonic()
        published = await moving
        assert answered - published < 1.0  # the figure is measured in bench/


class CountingTcp(TcpAdapter):
    """Counts connection attempts and refuses them all."""

    attempts: list[float]

    async def _open(self, endpoint: Endpoint, timeout: float) -> Connection:
        self.attempts.append(time.monotonic())
        raise ConnectionRefusedError(111, "Connection refused")


async def test_deadline_gives_a_clear_error_with_bounded_backoff(etcd: Etcd, store: Store) -> None:
    async with site(etcd, store, free_port()) as s:
        tcp = CountingTcp(
            s.resolver, "mes-api", deadline_s=1.0, backoff=Backoff(initial_s=0.05, max_s=0.2)
        )
        tcp.attempts = []
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            await tcp.connection()
        took = time.monotonic() - started
        await tcp.close()
    assert 0.95 <= took < 3.0
    message = str(caught.value)
    assert message.startswith("mes-api: not reached within 1 s: last tried asm-a at 127.0.0.11:")
    assert "(epoch " in message
    assert "ConnectionRefusedError" in message
    # 0.05 + 0.1 + 0.2 + 0.2 ... shortened by up to half: between 5 and 15 in a second.
    gaps = [b - a for a, b in zip(tcp.attempts, tcp.attempts[1:], strict=False)]
    assert 5 <= len(tcp.attempts) <= 16, tcp.attempts
    # Capped at max_s (0.2 s; a loaded machine adds to each gap), never below half.
    assert max(gaps) < 0.45 and min(gaps[3:]) >= 0.09


async def test_no_endpoint_and_unknown_service(etcd: Etcd, store: Store) -> None:
    await apply_site(store)  # mes-api is declared, nobody is active
    async with (
        registry_in_process(etcd) as url,
        Resolver(url, request_timeout_s=0.5) as resolver,
    ):
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"no endpoint known \(pair asm has no active"):
            async with TcpAdapter(resolver, "mes-api", deadline_s=0.5) as tcp:
                await tcp.connection()
        assert time.monotonic() - started < 1.5
        with pytest.raises(UnknownService):
            async with TcpAdapter(resolver, "nope", deadline_s=5) as tcp:
                await tcp.connection()
        assert time.monotonic() - started < 2.5  # at once, not after the deadline


# ---- HTTP -------------------------------------------------------------------------


@pytest.fixture
async def web_nodes() -> AsyncIterator[tuple[int, NodeHttp, NodeHttp]]:
    port = free_port()
    a = await NodeHttp("asm-a", "127.0.0.11", port).start()
    b = await NodeHttp("asm-b", "127.0.0.12", port).start()
    try:
        yield port, a, b
    finally:
        await a.stop()
        await b.stop()


async def node_of(http: HttpAdapter, path: str = "/", method: str = "GET") -> str:
    async with http.request(method, path) as resp:
        assert resp.status == 200
        node: str = (await resp.json())["node"]
        return node


async def test_http_requests_follow_the_endpoint(
    etcd: Etcd, store: Store, web_nodes: tuple[int, NodeHttp, NodeHttp]
) -> None:
    port, node_a, _ = web_nodes
    async with (
        site(etcd, store, port) as s,
        HttpAdapter(s.resolver, "mes-api", deadline_s=3, backoff=FAST_BACKOFF) as http,
    ):
        assert await node_of(http) == "asm-a"
        # A GET in flight to the old server when the service moves is made again on
        # the new one; a POST is not repeated: the caller is told.
        slow_get = asyncio.create_task(node_of(http, "/?slow=asm-a"))
        slow_post = asyncio.create_task(node_of(http, "/?slow=asm-a", "POST"))
        await until(lambda: asyncio.sleep(0, node_a.hits >= 3), "requests at asm-a")
        started = time.monotonic()
        await s.move()
        async with asyncio.timeout(1.0):
            assert await slow_get == "asm-b"
            with pytest.raises(EndpointChanged):
                await slow_post
        assert time.monotonic() - started < 1.0
        assert await node_of(http, method="POST") == "asm-b"
        assert http.endpoint is not None and http.endpoint.node == "asm-b"


async def test_http_waits_for_the_new_server_then_gives_up_clearly(
    etcd: Etcd, store: Store, web_nodes: tuple[int, NodeHttp, NodeHttp]
) -> None:
    port, node_a, _ = web_nodes
    async with (
        site(etcd, store, port) as s,
        HttpAdapter(s.resolver, "mes-api", deadline_s=0.6, backoff=FAST_BACKOFF) as http,
    ):
        assert await node_of(http) == "asm-a"
        await node_a.stop()
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"last tried asm-a .* ClientConnectorError"):
            await node_of(http)
        assert 0.55 <= time.monotonic() - started < 2.5
        # A POST that cannot connect is safe to repeat: nothing was sent.
        moving = asyncio.create_task(s.move())
        assert await node_of(http, method="POST") == "asm-b"
        await moving


async def test_http_gives_server_errors_to_the_caller(
    etcd: Etcd, store: Store, web_nodes: tuple[int, NodeHttp, NodeHttp]
) -> None:
    port, _, _ = web_nodes
    async with (
        site(etcd, store, port) as s,
        HttpAdapter(s.resolver, "mes-api", scheme="http") as http,
    ):
        # An answer is an answer, whatever its status: no retry, no error.
        async with http.get("/anything") as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.InvalidURL):
            async with http.get("no-slash"):
                pass


async def test_a_post_not_yet_sent_goes_to_the_new_server(
    etcd: Etcd, store: Store, web_nodes: tuple[int, NodeHttp, NodeHttp]
) -> None:
    """A POST still connecting to the old server (its host drops the SYNs: the listen
    queue is full) when the service moves has sent nothing: it goes to the new one."""
    port, node_a, node_b = web_nodes
    await node_a.stop()
    listener = socket.socket()
    listener.bind(("127.0.0.11", port))
    listener.listen(0)
    filling = []
    for _ in range(3):  # the queue full: further connections hang in SYN_SENT
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.11", port))
        filling.append(s)
    try:
        async with (
            site(etcd, store, port) as s,
            HttpAdapter(
                s.resolver, "mes-api", deadline_s=5, connect_timeout_s=3, backoff=FAST_BACKOFF
            ) as http,
        ):
            await until(lambda: asyncio.sleep(0, s.resolver.current("mes-api")), "asm-a known")
            post = asyncio.create_task(node_of(http, method="POST"))
            await asyncio.sleep(0.3)  # well inside its 3 s connection attempt to asm-a
            assert not post.done()
            started = time.monotonic()
            await s.move()
            async with asyncio.timeout(2.0):
                assert await post == "asm-b"
            assert time.monotonic() - started < 1.0
            assert node_b.hits == 1
    finally:
        for sock in (listener, *filling):
            sock.close()
