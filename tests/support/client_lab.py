"""Helpers for the client library's tests: registries (in-process, as processes, or a
fake one that answers from a script), small servers on the fake nodes' addresses, a
resolver with short timeouts, and waiting with deadlines.

No tests here; the ``test_client_*`` and ``test_proxy*`` modules import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import ClientSession, web
from yarl import URL

from hapair.registry.app import create_app
from hapair.registry.appkeys import RegistryConfig
from hapair.shared import pki
from hapair.shared.client import (
    Endpoint,
    Resolver,
)
from tests.support.harness import ROOT, Etcd, etcd_client, free_port, stop_process

REGISTRY = "reg-1"  # the etcd user of a registry process over TLS


def fast(registries: str | list[str], **options: Any) -> Resolver:
    """A resolver with short timeouts, for tests."""
    return Resolver(registries, request_timeout_s=0.5, stream_idle_s=2.0, **options)


async def next_of(endpoints: AsyncIterator[Endpoint], deadline_s: float = 3.0) -> Endpoint:
    async with asyncio.timeout(deadline_s):
        return await anext(endpoints)


class FakeRegistry:
    """Answers lookups from a script (the last entry repeats) and streams given chunks.
    ``filters=False``: it refuses a stream's filter as a registry older than filters
    does (400: its query model takes no other parameter). The queries of its streams
    are kept in ``stream_queries``."""

    def __init__(self, stream: bool = True, filters: bool = True) -> None:
        self.has_stream = stream
        self.filters = filters
        self.answers: list[tuple[int, bytes]] = []
        self.stream: list[bytes] = []
        self.stream_queries: list[dict[str, str]] = []
        self.lookups = 0
        self.retry_after = False
        self.url = ""
        self._runner: web.AppRunner | None = None

    def answer(self, status: int, body: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers.append((status, raw))

    async def _lookup(self, request: web.Request) -> web.Response:
        self.lookups += 1
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        headers = {"Retry-After": "2"} if self.retry_after else None
        return web.Response(
            status=status, body=body, content_type="application/json", headers=headers
        )

    async def _events(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.stream_queries.append(query)
        unknown = sorted(set(query) - {"heartbeat_s"})
        if unknown and not self.filters:
            problems = [f"{name}: Extra inputs are not permitted" for name in unknown]
            return web.json_response(
                {"error": "invalid query parameter: " + "; ".join(problems), "problems": problems},
                status=400,
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in self.stream:
            await resp.write(chunk)
            await asyncio.sleep(0.02)
        await asyncio.sleep(3600)
        return resp

    async def __aenter__(self) -> FakeRegistry:
        app = web.Application()
        app.router.add_get("/v1/endpoints/{service}", self._lookup)
        if self.has_stream:
            app.router.add_get("/v1/events", self._events)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.getMessage()} {getattr(r, 'fields', {}).get('problem', '')}"
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "hapair.client"
    ]


T = TypeVar("T")
DEADLINE_S = 5.0
BIN = Path(sys.executable).parent


async def until(
    probe: Callable[[], Awaitable[T | None]], what: str, deadline_s: float = DEADLINE_S
) -> T:
    """Await ``probe`` until it returns something truthy; fail naming ``what``."""
    last: object = None
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                try:
                    result = await probe()
                except Exception as err:  # a server may still be starting
                    last = err
                else:
                    if result:
                        return result
                    last = result
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(
            f"timed out after {deadline_s} s waiting for {what} (last: {last!r})"
        ) from None


async def _healthy(url: str, context: ssl.SSLContext | None = None) -> bool:
    async with ClientSession() as s, s.get(f"{url}/healthz", ssl=context or True) as resp:
        return resp.status == 200


@contextlib.asynccontextmanager
async def registry_in_process(
    etcd: Etcd | str, heartbeat_s: float = 0.5, asked: list[tuple[URL, int]] | None = None
) -> AsyncIterator[str]:
    """A registry app on a free port in this process, on ``etcd`` (over TLS with the
    admin's certificate; a URL: the lab mode); yields its URL once in sync. Each
    request it answers, with its status, is added to ``asked`` when given."""
    url, tls = etcd_client(etcd)
    app = create_app(url, RegistryConfig(heartbeat_s=heartbeat_s), tls=tls)
    if asked is not None:

        async def note(request: web.Request, response: web.StreamResponse) -> None:
            if request.path != "/healthz":  # its own start-up probes
                asked.append((request.rel_url, response.status))

        app.on_response_prepare.append(note)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        await until(lambda: _healthy(url), "the registry to sync with etcd")
        yield url
    finally:
        # Bounded: cancelling the registry's etcd watch can hang inside grpc.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner.cleanup(), 3.0)


class FreezableRelay:
    """A TCP relay in front of etcd. Frozen, it holds back everything etcd sends (the
    connections stay open and requests still go through): a registry behind it sees
    no news, as one whose watch stalled would, and answers from an ever older memory."""

    def __init__(self, target_url: str) -> None:
        # Over TLS the bytes pass as they are: the client's handshake is with etcd.
        scheme, _, target = target_url.split(",")[0].rpartition("://")
        self.target_host, _, port = target.rpartition(":")
        self.target_port = int(port)
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FreezableRelay:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.flowing.set()
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        tasks = [
            asyncio.create_task(self._pump(reader, up_writer, None)),
            asyncio.create_task(self._pump(up_reader, writer, self.flowing)),
        ]
        self.tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
                self.tasks.discard(task)
            writer.close()
            up_writer.close()

    @staticmethod
    async def _pump(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, gate: asyncio.Event | None
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if gate is not None:
                    await gate.wait()
                dst.write(data)
                await dst.drain()


class RegistryProcess:
    """``hapair-registry`` as a process of its own, to be killed like a real one."""

    def __init__(
        self,
        etcd: Etcd,
        url: str | None = None,
        args: Sequence[str] = (),
        log: Path | None = None,
        https: ssl.SSLContext | None = None,
    ) -> None:
        """A registry of ``etcd`` (its own certificate over TLS), reaching it at ``url``
        (default: its own; a relay's, say), with more options ``args``, its output
        written to ``log`` (default: nowhere). ``https``: it serves HTTPS (``args`` give
        its --tls-cert and --tls-key), and its health is asked with this client context."""
        self.etcd = etcd
        self.etcd_url = url or etcd.url
        self.args = args
        self.log = log
        self.https = https
        self.port = free_port()
        self.url = f"{'https' if https else 'http'}://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> RegistryProcess:
        with (self.log or Path(os.devnull)).open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                str(BIN / "hapair-registry"),
                *self.etcd.client_args(self.identity()),
                "--etcd",  # wins over the one above
                self.etcd_url,
                "--listen",
                f"127.0.0.1:{self.port}",
                "--log-level",
                "warning",
                *self.args,
                cwd=ROOT,
                stdout=out,
                stderr=out,
            )
        try:
            await until(lambda: _healthy(self.url, self.https), f"registry on {self.url}", 15)
        except BaseException:
            await self.stop()  # it is not left running when it never came up
            raise
        return self

    def identity(self) -> str | None:
        """The registry's etcd user over TLS (issued once), None in the lab mode."""
        if self.etcd.pki is None:
            return None
        self.etcd.pki.files(REGISTRY, pki.Kind.REGISTRY)
        return REGISTRY

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is None:
            return
        await stop_process(self.proc)
        self.proc = None

    def assert_no_traceback(self) -> None:
        """Its log (given one) holds no traceback: nothing failed unhandled in it."""
        text = self.log.read_text() if self.log is not None and self.log.exists() else ""
        assert "Traceback" not in text, text


@contextlib.asynccontextmanager
async def registry_processes(etcd: Etcd, count: int) -> AsyncIterator[list[RegistryProcess]]:
    procs = [RegistryProcess(etcd) for _ in range(count)]
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield procs
    finally:
        for p in procs:
            await p.stop()


class NodeServer:
    """A TCP server on a fake node's address: answers each line with ``NODE LINE``, so
    a test sees which node served it, and can drop every open connection."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name, self.host, self.port = name, host, port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> NodeServer:
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while line := await reader.readline():
                writer.write(self.name.encode() + b" " + line)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()
            await self.server.wait_closed()
            self.server = None


@contextlib.asynccontextmanager
async def node_servers(port: int) -> AsyncIterator[tuple[NodeServer, NodeServer]]:
    """A :class:`NodeServer` on each of asm-a's and asm-b's addresses, at ``port``."""
    a = await NodeServer("asm-a", "127.0.0.11", port).start()
    b = await NodeServer("asm-b", "127.0.0.12", port).start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


class NodeHttp:
    """An HTTP server on a fake node's address that answers ``{"node": NAME}``;
    ``?slow=NAME`` makes that node take two seconds."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name, self.host, self.port = name, host, port
        self.runner: web.AppRunner | None = None
        self.hits = 0

    async def start(self) -> NodeHttp:
        async def hello(request: web.Request) -> web.Response:
            self.hits += 1
            if request.query.get("slow") == self.name:
                await asyncio.sleep(2.0)
            return web.json_response({"node": self.name})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", hello)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def env_with_root() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def elapsed_since(start: float) -> float:
    return time.monotonic() - start


def scrub(records: list[Any]) -> list[str]:
    """The messages and fields of log records, one string each, for assertions."""
    return [f"{r.getMessage()} {getattr(r, 'fields', {})}" for r in records]
