"""Helpers for the client library's tests: registries (in-process or as processes),
small servers on the fake nodes' addresses, and waiting with deadlines.

No tests here; the other ``test_client_*`` and ``test_proxy*`` modules import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import ClientSession, web

from registry.app import create_app
from registry.appkeys import RegistryConfig
from tests.support.harness import ROOT, free_port, stop_process

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


async def _healthy(url: str) -> bool:
    async with ClientSession() as s, s.get(f"{url}/healthz") as resp:
        return resp.status == 200


@contextlib.asynccontextmanager
async def registry_in_process(etcd_url: str, heartbeat_s: float = 0.5) -> AsyncIterator[str]:
    """A registry app on a free port in this process; yields its URL once in sync."""
    runner = web.AppRunner(
        create_app(etcd_url, RegistryConfig(heartbeat_s=heartbeat_s)),
        access_log=None,
        shutdown_timeout=0.5,
    )
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
        target = target_url.removeprefix("http://").split(",")[0]
        self.target_host, _, port = target.rpartition(":")
        self.target_port = int(port)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
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

    def __init__(self, etcd_url: str) -> None:
        self.etcd_url = etcd_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> RegistryProcess:
        self.proc = await asyncio.create_subprocess_exec(
            str(BIN / "hapair-registry"),
            "--etcd",
            self.etcd_url,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--log-level",
            "warning",
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await until(lambda: _healthy(self.url), f"registry on {self.url}", 15)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is None:
            return
        await stop_process(self.proc)
        self.proc = None


@contextlib.asynccontextmanager
async def registry_processes(etcd_url: str, count: int) -> AsyncIterator[list[RegistryProcess]]:
    procs = [RegistryProcess(etcd_url) for _ in range(count)]
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
