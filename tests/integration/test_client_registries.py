"""Several registries: a client goes on through another when one is killed mid-stream,
and a registry that loses etcd sends its followers elsewhere. Also ``hapair resolve``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any

import pytest
from aiohttp import ClientSession

from hapair.registry.appkeys import RegistryConfig
from hapair.shared.client import RegistryUnavailable, Resolver
from hapair.shared.client.models import STALE_HEADER
from hapair.shared.store import Store
from tests.integration.test_client_resolver import active_pair, move
from tests.support.client_lab import BIN, next_of, registry_in_process, registry_processes, until
from tests.support.harness import Etcd, free_port
from tests.support.site_records import FakeAgent, apply_site
from tests.support.tls_etcd import ADMIN, TestPki, TlsEtcd


@pytest.mark.parametrize("transport", ["sse", "poll"])
async def test_client_goes_on_through_the_other_registry(
    etcd: Etcd, store: Store, transport: Any
) -> None:
    a, b = await active_pair(store)
    async with registry_processes(etcd, 2) as (first, second):
        # Both registries answer the same.
        async with ClientSession() as http:
            answers = []
            for r in (first, second):
                async with http.get(f"{r.url}/v1/endpoints/mes-api") as resp:
                    answers.append((resp.status, await resp.read()))
            assert answers[0] == answers[1] and answers[0][0] == 200
        async with (
            Resolver(
                [first.url, second.url],
                transport=transport,
                request_timeout_s=0.5,
                stream_idle_s=2.0,
            ) as resolver,
            contextlib.aclosing(resolver.watch("mes-api")) as endpoints,
        ):
            seen = await next_of(endpoints)
            assert seen.node == "asm-a"
            await asyncio.sleep(0.1)  # the stream (or long-poll) is open on the first one
            first.kill()
            assert first.proc is not None
            await first.proc.wait()
            epoch = await move(a, b)
            published = time.monotonic()
            moved = await next_of(endpoints)
            assert (moved.node, moved.epoch) == ("asm-b", epoch) and not moved.stale
            assert time.monotonic() - published < 2.5  # the figure is measured in bench/
            assert (await resolver.resolve("mes-api")).epoch == epoch


async def test_registry_that_lost_etcd_sends_followers_elsewhere(
    caplog: pytest.LogCaptureFixture, test_pki: TestPki
) -> None:
    own = TlsEtcd(test_pki.dir, ADMIN).start()  # an etcd of its own, to be stopped
    store = Store(own.url, timeout=2.0, tls=own.tls)
    try:
        await apply_site(store)
        a = await FakeAgent(store, "asm-a", "asm").up()
        await a.become_active()
        await a.publish("mes-api", 8080)
        async with registry_in_process(own) as url, ClientSession() as http:
            async with http.get(f"{url}/v1/events") as stream:
                assert stream.status == 200
                await stream.content.readuntil(b"event: endpoint")
                own.stop()
                # The open stream is told at once that the view is not current, then
                # ends (the registry's stale_streams_s): its followers go elsewhere.
                async with asyncio.timeout(5):
                    await stream.content.readuntil(b"event: stale")
                async with asyncio.timeout(5 + RegistryConfig().stale_streams_s):
                    while await stream.content.readany():
                        pass

            async def refused() -> bool:
                async with http.get(f"{url}/v1/events") as resp:
                    return resp.status == 503 and "not in touch with etcd" in await resp.text()

            await until(refused, "new streams refused")
            # Lookups still answer from memory, saying they may be old news; a
            # long-poll answers at once instead of waiting for news that cannot come.
            started = time.monotonic()
            path = f"{url}/v1/endpoints/mes-api?after_epoch=9999&wait_s=30"
            async with http.get(path) as resp:
                assert resp.status == 200 and resp.headers[STALE_HEADER]
                assert (await resp.json())["node"] == "asm-a"
            assert time.monotonic() - started < 5.0  # at once, not after wait_s=30
            async with Resolver(url, request_timeout_s=0.5) as resolver:
                with pytest.raises(RegistryUnavailable, match="registry lost etcd"):
                    await resolver.resolve("mes-api")
    finally:
        await store.close()
        own.cleanup()


# ---- hapair resolve -------------------------------------------------------------------


async def hapair(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "hapair"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or {k: v for k, v in os.environ.items() if k != "HAPAIR_REGISTRY"},
    )
    async with asyncio.timeout(15):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_hapair_resolve(etcd: Etcd, store: Store) -> None:
    a, b = await active_pair(store)
    async with registry_in_process(etcd) as url:
        assert await hapair("resolve", "mes-api", "--registry", url) == (
            0,
            "127.0.0.11:8080\n",
            "",
        )
        code, out, _ = await hapair(
            "resolve", "mes-api", "--format", "json", env={**os.environ, "HAPAIR_REGISTRY": url}
        )
        assert code == 0 and json.loads(out)["node"] == "asm-a"
        code, _, err = await hapair("resolve", "nope", "--registry", url)
        assert code == 1 and "unknown service 'nope'" in err
        code, _, err = await hapair("resolve", "mes-api", "--registry", "ftp://x")
        assert code == 2 and "bad registry URL" in err
        dead = f"http://127.0.0.1:{free_port()}"
        code, _, err = await hapair("resolve", "mes-api", "--registry", dead)
        assert code == 3 and "no registry answered" in err

        watch = await asyncio.create_subprocess_exec(
            str(BIN / "hapair"),
            "resolve",
            "mes-api",
            "--watch",
            "--format",
            "url",
            "--registry",
            f"{dead},{url}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert watch.stdout is not None
            async with asyncio.timeout(10):
                assert await watch.stdout.readline() == b"http://127.0.0.11:8080\n"
                await move(a, b)
                assert await watch.stdout.readline() == b"http://127.0.0.12:8080\n"
        finally:
            watch.terminate()
            _, err_bytes = await watch.communicate()
        assert "registry unavailable" in err_bytes.decode()  # the dead one, on stderr
        code, _, err = await hapair("resolve", "mes-api", "--registry", url)
        assert code == 0
        await b.crash()
        code, _, err = await hapair("resolve", "mes-api", "--registry", url)
        assert code == 1 and "pair asm has no active node" in err


async def test_heartbeat_period_is_the_clients_choice(etcd: Etcd, store: Store) -> None:
    await active_pair(store)
    async with registry_in_process(etcd, heartbeat_s=60) as url, ClientSession() as http:
        async with http.get(f"{url}/v1/events?heartbeat_s=0.1") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"].startswith("invalid query parameter: heartbeat_s")
        async with http.get(f"{url}/v1/events?heartbeat_s=0.5") as resp:
            started = time.monotonic()
            async with asyncio.timeout(3):
                await resp.content.readuntil(b": heartbeat\n")
            assert time.monotonic() - started < 1.5


class _Subscriber(asyncio.Protocol):
    """A bare event-stream client: notes when ``marker`` arrives."""

    def __init__(self, marker: bytes, arrived: list[float]) -> None:
        self.marker, self.arrived, self.seen = marker, arrived, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"GET /v1/events HTTP/1.1\r\nHost: test\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        self.seen = self.seen[-200:] + data
        if self.marker in self.seen:
            self.arrived.append(time.monotonic())
            self.seen = b""


async def test_a_change_reaches_1000_subscribers(etcd: Etcd, store: Store) -> None:
    a, b = await active_pair(store)
    async with registry_processes(etcd, 1) as (registry,):
        loop = asyncio.get_running_loop()
        arrived: list[float] = []
        marker = b'"port": 8099'
        transports = []
        try:
            for i in range(1000):
                # A thousand clients, on 25 addresses: 40 streams each, within the
                # registry's share per client address.
                transport, _ = await loop.create_connection(
                    lambda: _Subscriber(marker, arrived),
                    "127.0.0.1",
                    registry.port,
                    local_addr=(f"127.0.1.{i % 25 + 1}", 0),
                )
                transports.append(transport)
            await asyncio.sleep(0.5)
            published = time.monotonic()
            await move(a, b, port=8099)
            await until(lambda: asyncio.sleep(0, len(arrived) >= 1000), "all 1,000 subscribers")
            assert len(arrived) == 1000
            assert max(arrived) - published < 2.0  # the figure is measured in bench/
        finally:
            for transport in transports:
                transport.close()
