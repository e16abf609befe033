"""A copy of an etcd prefix in memory, kept current by a watch on the store.

Agents, the comm server, the registry and the console read etcd through such copies:
a decision reads the copy, never etcd, so it costs no round trip and sees one
consistent state; the copy says when it is not current (``synced``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hapair.shared.log import EventLog
from hapair.shared.store import Change, Compacted, Kv, Store, StoreError, bounded

log = EventLog("hapair.store")  # a watch's trouble is logged as the store's


class Mirror:
    """An in-memory copy of everything under a prefix, kept current by a watch.

    ``on_change`` is called (synchronously, on the event loop) for every change after
    the initial load and once with ``None`` after each (re)load and each loss of the
    watch, so callers can rebuild derived state. While etcd is away the copy keeps its
    last content and ``synced`` is False. When the watch breaks, the mirror resumes it
    from the last revision it has (on whichever member the store uses by then) and reads
    everything again only if etcd no longer has that history; retries back off from
    ``retry_s`` to ``max_retry_s``.
    """

    def __init__(
        self,
        store: Store,
        prefix: str,
        on_change: Callable[[Change | None], None] | None = None,
        retry_s: float = 0.25,
        lag_s: float = 0.0,
        max_retry_s: float = 4.0,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.items: dict[str, Kv] = {}
        self.revision = 0
        self.synced = asyncio.Event()
        self.error: str | None = None
        self._on_change = on_change
        self._retry_s = retry_s
        self._lag_s = lag_s  # a test's fault: apply each watched change this much later
        self._max_retry_s = max_retry_s
        self._local: dict[str, int] = {}
        self._loaded = False
        self._restart: asyncio.Event | None = None
        self._advanced: asyncio.Event | None = None

    async def run(self) -> None:
        retry = self._retry_s
        self._restart = asyncio.Event()
        while True:
            try:
                if not self._loaded:
                    await self._load()
                retry = self._retry_s
                await self._follow(self._restart)
            except StoreError as err:
                if isinstance(err, Compacted):
                    self._loaded = False
                if self.error != str(err):
                    log.warning("watch lost; retrying", prefix=self.prefix, error=str(err))
                self.error = str(err)
                self.synced.clear()
                if self._on_change:
                    self._on_change(None)
                await asyncio.sleep(retry)
                retry = min(retry * 2, self._max_retry_s)

    async def _load(self) -> None:
        kvs, revision = await self.store.get_prefix(self.prefix)
        self.items = {kv.key: kv for kv in kvs}
        self._local.clear()
        self.revision = revision
        self._loaded = True
        self._opened()

    def _opened(self) -> None:
        self.error = None
        self.synced.set()
        if self._on_change:
            self._on_change(None)

    async def _follow(self, restart: asyncio.Event) -> None:
        """Apply watched changes until the watch breaks or :meth:`restart` is called."""
        restart.clear()

        async def watch() -> None:
            opened = self._opened if not self.synced.is_set() else None
            async for change in self.store.watch_prefix(self.prefix, self.revision + 1, opened):
                if self._lag_s:
                    await asyncio.sleep(self._lag_s)
                self._apply(change)

        task = asyncio.get_running_loop().create_task(watch())
        kicked = asyncio.get_running_loop().create_task(restart.wait())
        try:
            await asyncio.wait({task, kicked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kicked.cancel()
            task.cancel()
            # Bounded: a watch stuck in the gRPC library must not hold up a shutdown.
            await bounded(task, 1.0)
        if task.done() and not task.cancelled():
            err = task.exception()
            if isinstance(err, StoreError):
                raise err  # the broken watch's own error
        raise StoreError(self.error or "watch restarted")

    def restart(self, reason: str) -> None:
        """Drop the watch and resume it (the store may have moved to another member)."""
        self.error = reason
        self.synced.clear()
        if self._restart is not None:
            self._restart.set()

    async def reached(self, revision: int) -> None:
        """Return once the copy holds every change up to ``revision``."""
        while self.revision < revision:
            if self._advanced is None:
                self._advanced = asyncio.Event()
            await self._advanced.wait()

    def apply_local(self, key: str, kv: Kv | None, revision: int) -> None:
        """Record our own write at ``revision`` before its watch event comes back.

        A writer must see its own writes at once (a leader that resigned must not read
        its old key back from a lagging watch); events at or before ``revision`` for
        that key are then old news and skipped.
        """
        current = self.items.get(key)
        if current is not None and current.mod_revision > revision:
            return
        if kv is None:
            self.items.pop(key, None)
        else:
            self.items[key] = kv
        self._local[key] = max(revision, self._local.get(key, 0))
        if self._on_change:
            self._on_change(None)

    def _apply(self, change: Change) -> None:
        if change.kv.mod_revision > self.revision:
            self.revision = change.kv.mod_revision
            if self._advanced is not None:
                self._advanced.set()
                self._advanced = None
        if change.kv.mod_revision <= self._local.get(change.kv.key, 0):
            return
        if change.deleted:
            self.items.pop(change.kv.key, None)
        else:
            self.items[change.kv.key] = change.kv
        if self._on_change:
            self._on_change(change)
