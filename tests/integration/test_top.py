"""``hapair top`` against real registries over a real etcd, and the command itself in a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import subprocess
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from rich.console import Console

from hapair.registry.app import create_app
from hapair.registry.appkeys import CACHE, RegistryConfig
from hapair.registry.console import command
from hapair.registry.console.top.control import Top
from hapair.registry.console.top.feed import Request, SiteFeed
from hapair.registry.console.top.state import Connection
from hapair.shared import keys, records
from hapair.shared.report import SiteReport
from hapair.shared.store import Store
from tests.support.cluster import until
from tests.support.harness import Etcd, etcd_client, free_port, stop_pid
from tests.support.pty_run import spawn_in_pty
from tests.support.site_records import FakeAgent, apply_site
from tests.unit.test_top import HAPAIR, Follow, screen

# The operator top sends admin requests as: the registries accept its token by name.
TOKEN, OPERATOR = "top-secret", "ops-1"


class Registry:
    """A registry in this process on a free port, started and stopped at will."""

    def __init__(self, etcd: Etcd | str) -> None:
        url, tls = etcd_client(etcd)
        tokens = {hashlib.sha256(TOKEN.encode()).hexdigest(): OPERATOR}
        config = RegistryConfig(heartbeat_s=0.5, admin_tokens=tokens)
        self.app = create_app(url, config, tls=tls)
        self.runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=1.0)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.running = False

    async def start(self, wait_synced: bool = True) -> str:
        await self.runner.setup()
        self.running = True
        await web.TCPSite(self.runner, "127.0.0.1", int(self.url.rsplit(":", 1)[1])).start()
        if wait_synced:
            await until(self._synced, 5, f"the registry at {self.url} in step with etcd")
        return self.url

    async def _synced(self) -> bool:
        return self.app[CACHE].synced

    async def stop(self) -> None:
        if self.running:
            self.running = False
            await self.runner.cleanup()


@pytest.fixture
async def registries(etcd: Etcd) -> AsyncIterator[list[Registry]]:
    """Append registries to the list; all are stopped at the end."""
    started: list[Registry] = []
    try:
        yield started
    finally:
        for r in started:
            await r.stop()


async def start_registry(
    registries: list[Registry], etcd: Etcd | str, wait_synced: bool = True
) -> Registry:
    r = Registry(etcd)
    registries.append(r)
    await r.start(wait_synced)
    return r


async def recovering_pair(store: Store) -> int:
    """asm-b took over from asm-a, holding ``worker``: the recovery awaits an operator."""
    await apply_site(store)
    await FakeAgent(store, "asm-a", "asm").up()
    b = await FakeAgent(store, "asm-b", "asm").up()
    epoch = await b.become_active()
    rec = records.Recovery(
        epoch=epoch,
        cause="lease of asm-a expired",
        from_node="asm-a",
        to_node="asm-b",
        held=["worker"],
    )
    await store.put(keys.recovery("asm"), rec.encode())
    return epoch


@contextlib.asynccontextmanager
async def following(top: Top) -> AsyncIterator[Top]:
    task = asyncio.create_task(top.follow())
    try:
        yield top
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def text_of(top: Top) -> str:
    console = Console(record=True, width=80, height=24, file=io.StringIO())
    console.print(top.frame())
    return console.export_text()


async def test_ack_from_the_keys_through_a_real_registry(
    store: Store, etcd: Etcd, registries: list[Registry]
) -> None:
    epoch = await recovering_pair(store)
    url = (await start_registry(registries, etcd)).url
    async with following(Top(SiteFeed([url], tick_s=0.2, token=TOKEN))) as top:

        async def shown() -> bool:
            rep = top.report
            return bool(top.connection.live and rep and rep.workshops[0].pairs[0].recovery)

        await until(shown, 5, "the recovery on the dashboard")
        assert "AWAITING OPERATOR: asm" in text_of(top)
        assert top.press("a") is None
        question = f"recovery of asm at epoch {epoch}: start worker on asm-b? [y/N]"
        assert question in text_of(top)
        request = top.press("y")
        assert request == Request("ack", "asm", {"epoch": epoch})
        assert "sending: ack of asm..." in text_of(top)
        assert await top.send(request)

        kv = await store.get(keys.recovery("asm"))
        assert kv is not None
        done = records.decode(records.Recovery, kv.value, kv.key)
        assert done.state == "acknowledged" and done.acked_by == OPERATOR

        async def acknowledged() -> bool:
            rep = top.report
            rec = rep.workshops[0].pairs[0].recovery if rep else None
            return rec is not None and rec.state == "acknowledged"

        await until(acknowledged, 5, "the acknowledgement on the dashboard")
        text = text_of(top)
        assert f"recovery of asm at epoch {epoch} acknowledged: worker starting on asm-b" in text
        assert "AWAITING OPERATOR" not in text
        assert f"ack pair=asm epoch={epoch} acknowledged by {OPERATOR}" in text

        # A second ack is not even offered; an ack for another epoch is refused.
        top.press("a")
        assert "asm has no recovery awaiting an operator" in text_of(top)
        assert not await top.send(Request("ack", "asm", {"epoch": epoch - 1}))
        assert top.selection.notice is not None
        assert "ack of asm refused (HTTP 409)" in top.selection.notice.text


async def next_state(
    follow: Follow, live: bool, seen: list[Connection] | None = None
) -> tuple[SiteReport | None, Connection]:
    """The feed's next (report, connection) that is ``live`` or not."""
    async with asyncio.timeout(10):
        while True:
            report, conn = await anext(follow)
            if seen is not None:
                seen.append(conn)
            if conn.live == live:
                return report, conn


async def test_follows_the_next_registry_and_says_when_none_answers(
    store: Store, etcd: Etcd, registries: list[Registry]
) -> None:
    await recovering_pair(store)
    dead = f"http://127.0.0.1:{free_port()}"
    no_etcd = await start_registry(registries, f"http://127.0.0.1:{free_port()}", False)
    second = await start_registry(registries, etcd)
    feed = SiteFeed([dead, no_etcd.url, second.url], tick_s=0.2, timeout_s=1.0, retry_s=0.2)
    async with contextlib.aclosing(feed.follow()) as follow:
        tried: list[Connection] = []
        report, conn = await next_state(follow, True, tried)
        # The dead one and the one without etcd were tried first, and said so.
        assert [c.url for c in tried] == [dead, no_etcd.url, second.url]
        assert "cannot reach the registry" in tried[0].error
        assert "not in touch with etcd" in tried[1].error
        assert report is not None and conn.url == second.url

        third = await start_registry(registries, etcd)
        feed.urls.append(third.url)
        lost_at = time.time()
        await second.stop()
        report, conn = await next_state(follow, False)
        assert conn.url == second.url and conn.since is not None and conn.since >= lost_at
        assert report is not None and conn.read_at is not None and conn.read_at < conn.since
        lines = "\n".join(screen(report, conn, now=conn.since + 2))
        assert "DISCONNECTED" in lines and "NOT CURRENT" in lines and "LIVE" not in lines
        assert "AWAITING OPERATOR" in lines  # the last state is still shown, dimmed
        report, conn = await next_state(follow, True)
        assert conn.url == third.url


def test_top_needs_a_registry_and_a_terminal() -> None:
    def top(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "HAPAIR_REGISTRY"}
        return subprocess.run(
            [HAPAIR, "top", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )

    done = top()
    assert done.returncode == command.USAGE
    assert "no registry given: use --registry URL[,URL...] or set HAPAIR_REGISTRY" in done.stderr
    done = top("--registry", "http://127.0.0.1:1")
    assert done.returncode == command.USAGE
    assert "hapair top needs a terminal" in done.stderr


class PtyTop:
    """``hapair top`` in an 80x24 pseudo-terminal; its output is read as it comes."""

    def __init__(self, url: str) -> None:
        env = {"HAPAIR_REGISTRY": url, "HAPAIR_ADMIN_TOKEN": TOKEN}
        self.proc, self.master = spawn_in_pty([HAPAIR, "top"], env, 24, 80)
        self.out = b""
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _read(self) -> None:
        with contextlib.suppress(BlockingIOError):
            try:
                data = os.read(self.master, 65536)
            except OSError:
                data = b""
            if not data:
                asyncio.get_running_loop().remove_reader(self.master)
            self.out += data

    async def shows(self, *texts: str) -> None:
        """Wait until the terminal has been sent each of ``texts`` since the last call."""

        async def seen() -> bool:
            return all(t.encode() in self.out for t in texts)

        await until(seen, 10, f"{texts} on the terminal")
        self.out = b""

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        stop_pid(self.proc)
        os.close(self.master)


async def test_hapair_top_in_a_terminal_acknowledges_a_recovery(
    store: Store, etcd: Etcd, registries: list[Registry]
) -> None:
    epoch = await recovering_pair(store)
    url = (await start_registry(registries, etcd)).url
    top = PtyTop(url)
    try:
        await top.shows("LIVE", "AWAITING OPERATOR")
        os.write(top.master, b"a")
        await top.shows(f"at epoch {epoch}: start worker on asm-b? [y/N]")
        os.write(top.master, b"y")
        await top.shows(f"recovery of asm at epoch {epoch} acknowledged")
        kv = await store.get(keys.recovery("asm"))
        assert kv is not None
        assert records.decode(records.Recovery, kv.value, kv.key).state == "acknowledged"
        os.write(top.master, b"q")
        assert await asyncio.to_thread(top.proc.wait, 5) == 0
    finally:
        top.close()
