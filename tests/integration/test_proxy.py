"""``hapair-proxy`` as a real process between a client and two servers whose endpoint
record moves (real etcd, a real registry)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hapair.shared.store import Store
from tests.integration.test_client_resolver import active_pair
from tests.support.client_lab import BIN, NodeServer, node_servers, registry_in_process, until
from tests.support.harness import ROOT, Etcd, free_port, port_open, stop_process
from tests.support.site_records import FakeAgent


class ProxyProcess:
    def __init__(self, registry: str, log: Path, *extra: str, service: str = "mes-api") -> None:
        self.port = free_port()
        self.args = [
            str(BIN / "hapair-proxy"),
            "--service",
            service,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--registry",
            registry,
            *extra,
        ]
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> ProxyProcess:
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, cwd=ROOT, stdout=out, stderr=out
            )
        await until(lambda: asyncio.to_thread(port_open, "127.0.0.1", self.port), "proxy listening")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        await stop_process(self.proc)
        assert self.proc.returncode == 0, self.log.read_text()
        assert "Traceback" not in self.log.read_text()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def ask(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], text: str = "ping") -> str:
    reader, writer = conn
    writer.write(text.encode() + b"\n")
    await writer.drain()
    async with asyncio.timeout(3):
        return (await reader.readline()).decode().strip()


@contextlib.asynccontextmanager
async def world(
    etcd: Etcd, store: Store, tmp_path: Path, *extra: str
) -> AsyncIterator[tuple[ProxyProcess, FakeAgent, FakeAgent, NodeServer, int]]:
    port = free_port()
    a, b = await active_pair(store, port)
    async with (
        node_servers(port) as (server_a, _),
        registry_in_process(etcd) as url,
        ProxyProcess(url, tmp_path / "proxy.log", *extra) as proxy,
    ):
        yield proxy, a, b, server_a, port


async def test_proxy_sends_new_connections_to_the_valid_server_and_cuts_old_ones(
    etcd: Etcd, store: Store, tmp_path: Path
) -> None:
    async with world(etcd, store, tmp_path) as (proxy, a, b, _, port):
        old = await proxy.connect()
        assert await ask(old) == "asm-a ping"
        assert await ask(old, "again") == "asm-a again"

        await a.crash()
        await b.become_active()
        await b.publish("mes-api", port)
        loop = asyncio.get_running_loop()
        published = loop.time()
        # The connection to the old server is closed at once, not left hanging.
        async with asyncio.timeout(2):
            with contextlib.suppress(ConnectionError):
                assert await old[0].read() == b""
        assert loop.time() - published < 1.5  # at once, well before any timeout
        new = await proxy.connect()
        assert await ask(new) == "asm-b ping"
        new[1].close()
    log = (tmp_path / "proxy.log").read_text()
    assert "event=endpoint" in log and "node=asm-b" in log and "closed=1" in log


async def test_proxy_forwards_bulk_data_both_ways(etcd: Etcd, store: Store, tmp_path: Path) -> None:
    async with world(etcd, store, tmp_path) as (proxy, _, _, _, _):
        reader, writer = await proxy.connect()
        lines = [os.urandom(600).hex().encode() for _ in range(3000)]  # ~3.6 MB

        async def send() -> None:
            for line in lines:
                writer.write(line + b"\n")
                await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(send())
        async with asyncio.timeout(20):
            echoed = [await reader.readline() for _ in lines]
            await sending
            assert await reader.read() == b""  # the half-close went through, and back
        assert echoed == [b"asm-a " + line + b"\n" for line in lines]
        writer.close()


async def test_proxy_closes_a_connection_it_cannot_place(
    etcd: Etcd, store: Store, tmp_path: Path
) -> None:
    async with world(etcd, store, tmp_path, "--deadline", "0.5") as (proxy, a, _, server_a, _):
        await a.crash()  # no active node now: the registry answers 503
        await server_a.stop()  # and the old server is gone with its node
        started = asyncio.get_running_loop().time()
        reader, writer = await proxy.connect()
        async with asyncio.timeout(3):
            assert await reader.read() == b""
        # After its deadline (timers may fire a hair early), not at once and not much later.
        assert 0.45 <= asyncio.get_running_loop().time() - started < 3.0
        writer.close()
    log = (tmp_path / "proxy.log").read_text()
    assert "closing a client connection" in log and "not reached within 0.5 s" in log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--service", "x", "--listen", "nowhere", "--registry", "http://r:1"], "HOST:PORT"),
        (["--service", "x", "--listen", ":1", "--registry", "ftp://r"], "bad registry URL"),
        (["--service", "x", "--listen", ":1", "--registry", ""], "no registry given"),
    ],
)
async def test_proxy_refuses_bad_arguments(args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HAPAIR_REGISTRY"}
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "hapair-proxy"), *args, env=env, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(10):
        _, err = await proc.communicate()
    assert proc.returncode == 2 or (proc.returncode == 1 and "no registry" in message)
    assert message in err.decode()


async def test_proxy_follows_a_service_that_was_unknown_when_it_started(
    etcd: Etcd, store: Store, tmp_path: Path
) -> None:
    """The proxy starts before the site declares its service (the registry answers 404);
    once the service is declared and moves, the connections to the old server are
    still cut at once."""
    port = free_port()
    log = tmp_path / "proxy.log"
    async with (
        node_servers(port),
        registry_in_process(etcd) as url,
        ProxyProcess(url, log) as proxy,
    ):
        await until(
            lambda: asyncio.sleep(0, "does not know this service" in log.read_text()),
            "the proxy told that mes-api is unknown",
        )
        a, b = await active_pair(store, port)
        old = await proxy.connect()
        assert await ask(old) == "asm-a ping"

        await a.crash()
        await b.become_active()
        await b.publish("mes-api", port)
        async with asyncio.timeout(2):
            with contextlib.suppress(ConnectionError):
                assert await old[0].read() == b"", "the old connection must be cut"
        new = await proxy.connect()
        assert await ask(new) == "asm-b ping"
        new[1].close()


async def test_proxy_passes_on_what_the_server_says_first(
    etcd: Etcd, store: Store, tmp_path: Path
) -> None:
    """A protocol where the server speaks first (an SMTP-like banner, sent the moment
    the connection is made, before the proxy has paired it with its client)."""
    port = free_port()
    await active_pair(store, port)

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 asm-a ready\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            while line := await reader.readline():
                writer.write(b"250 " + line)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.11", port)
    try:
        async with (
            registry_in_process(etcd) as url,
            ProxyProcess(url, tmp_path / "proxy.log") as proxy,
        ):
            clients = [await proxy.connect() for _ in range(10)]
            async with asyncio.timeout(3):
                banners = [await reader.readline() for reader, _ in clients]
            assert banners == [b"220 asm-a ready\r\n"] * 10
            reader, writer = clients[0]
            writer.write(b"HELO client\r\n")
            async with asyncio.timeout(3):
                assert await reader.readline() == b"250 HELO client\r\n"
            for _, w in clients:
                w.close()
    finally:
        server.close()
        await server.wait_closed()
