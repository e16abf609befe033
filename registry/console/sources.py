"""Where ``hapair status`` reads the site from: etcd directly, or a registry over HTTP.

Both give a :class:`SiteReport` once (``report``) or as a stream (``follow``) that
yields on every change and at least every ``tick_s`` so ages stay current. While the
source is lost, ``follow`` keeps yielding the last report with a warning and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from ssl import SSLContext
from typing import Protocol

import aiohttp
from pydantic import ValidationError

from hapair.shared import keys
from hapair.shared.mirror import Mirror
from hapair.shared.report import SiteReport
from hapair.shared.store import Change, Store
from hapair.shared.view import SiteView
from hapair.shared.waits import cancelled


class SourceError(Exception):
    """The source could not be read; the message says which and why."""


class Source(Protocol):
    async def report(self) -> SiteReport: ...

    def follow(self, tick_s: float = 1.0) -> AsyncIterator[SiteReport]: ...


async def _wait(event: asyncio.Event, at_most_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(at_most_s):
            await event.wait()


class EtcdSource:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def report(self) -> SiteReport:
        kvs, revision = await self.store.get_prefix(keys.PREFIX + "/")
        return SiteView.from_kvs(kvs, revision).report()

    async def follow(self, tick_s: float = 1.0) -> AsyncIterator[SiteReport]:
        changed = asyncio.Event()

        def on_change(change: Change | None) -> None:
            if change is None or not change.kv.key.startswith(keys.REGISTRIES_PREFIX):
                changed.set()  # registries' heartbeats change nothing shown

        await self.report()  # an unreachable etcd fails here, at once, not in the loop
        mirror = Mirror(self.store, keys.PREFIX + "/", on_change=on_change)
        task = asyncio.create_task(mirror.run())
        view = SiteView()
        try:
            await _wait(mirror.synced, self.store.timeout * 2)
            while True:
                view = SiteView.from_kvs(mirror.items.values(), mirror.revision, previous=view)
                report = view.report()
                if not mirror.synced.is_set():
                    report = report.model_copy(
                        update={
                            "warning": (f"lost etcd ({mirror.error or 'not connected'}); retrying")
                        }
                    )
                yield report
                await _wait(changed, tick_s)
                changed.clear()
        finally:
            await cancelled(task)


class RegistrySource:
    def __init__(self, url: str, timeout_s: float = 3.0, *, ssl: SSLContext | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.ssl: SSLContext | bool = ssl or True  # True: the system's CAs

    async def _get(self, session: aiohttp.ClientSession) -> SiteReport:
        try:
            async with session.get(
                f"{self.url}/v1/site", timeout=self.timeout, ssl=self.ssl
            ) as resp:
                if resp.status != 200:
                    raise SourceError(f"registry at {self.url} answered HTTP {resp.status}")
                return SiteReport.model_validate_json(await resp.read())
        except (aiohttp.ClientError, TimeoutError) as err:
            raise SourceError(
                f"cannot reach the registry at {self.url}: {err or type(err).__name__}"
            ) from None
        except ValidationError:
            raise SourceError(
                f"registry at {self.url} sent a site report this hapair cannot read"
            ) from None

    async def report(self) -> SiteReport:
        async with aiohttp.ClientSession() as session:
            return await self._get(session)

    async def follow(self, tick_s: float = 1.0) -> AsyncIterator[SiteReport]:
        changed = asyncio.Event()
        last: SiteReport | None = None
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(self._stream(session, changed))
            try:
                while True:
                    try:
                        last = await self._get(session)
                    except SourceError as err:
                        if last is None:
                            raise
                        last = last.model_copy(update={"warning": f"{err}; retrying"})
                    yield last
                    await _wait(changed, tick_s)
                    changed.clear()
            finally:
                await cancelled(task)

    async def _stream(self, session: aiohttp.ClientSession, changed: asyncio.Event) -> None:
        """Follow the registry's event stream; any event means: read the site again."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=60)
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(
                    f"{self.url}/v1/events", timeout=timeout, ssl=self.ssl
                ) as resp:
                    async for line in resp.content:
                        if line.startswith(b"event:"):
                            changed.set()
            await asyncio.sleep(1.0)
