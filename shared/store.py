"""The etcd wrapper: every call has a deadline and one error type.

aetcd calls have no deadline by default (a hung etcd blocks them forever) and raise
several exception classes; here every call is bounded and every backend failure comes
out as :class:`StoreError`, so callers take the safe path in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

# grpc must not try to survive fork(): the agent forks services and a watchdog.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import aetcd

log = logging.getLogger("hapair.store")
T = TypeVar("T")


class StoreError(Exception):
    """etcd could not be reached or refused the request."""


@dataclass(frozen=True, slots=True)
class Kv:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def from_aetcd(cls, kv: Any) -> Kv:
        return cls(
            key=kv.key.decode(),
            value=bytes(kv.value),
            create_revision=int(kv.create_revision),
            mod_revision=int(kv.mod_revision),
            lease=int(kv.lease),
        )


@dataclass(frozen=True, slots=True)
class Change:
    """One watched change: ``kv.value == b''`` and ``deleted`` for a delete."""

    kv: Kv
    deleted: bool


def parse_endpoints(urls: str | Sequence[str]) -> list[tuple[str, int]]:
    """``http://127.0.0.1:2379,127.0.0.2:2379`` -> ``[(host, port), ...]``."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    result = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        parsed = urlsplit(item if "//" in item else f"http://{item}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"bad etcd endpoint {item!r}: expected http://HOST:PORT")
        try:
            port = parsed.port or 2379
        except ValueError:
            raise ValueError(f"bad etcd endpoint {item!r}: port is not a number") from None
        result.append((parsed.hostname, port))
    if not result:
        raise ValueError("no etcd endpoint given")
    return result


# gRPC waits up to 120 s between reconnection attempts by default, growing from 1 s: an
# agent would see etcd seconds after it came back. Its lease fences it within 1.5 s, so
# the channel retries every 100 to 250 ms instead.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 250,
}


def _client(endpoints: list[tuple[str, int]], timeout: float) -> aetcd.Client:
    if len(endpoints) == 1:
        host, port = endpoints[0]
        return aetcd.Client(host, port, timeout=timeout, options=CHANNEL_OPTIONS)
    # aetcd joins host and port into one gRPC target; gRPC's ipv4: scheme takes a list of
    # addresses and fails over between them by itself.
    # The scheme takes addresses only, so host names are resolved here, once.
    resolved = [(socket.gethostbyname(h), p) for h, p in endpoints]
    *first, (last_host, last_port) = resolved
    host = "ipv4:" + ",".join(f"{h}:{p}" for h, p in first) + "," + last_host
    return aetcd.Client(host, last_port, timeout=timeout, options=CHANNEL_OPTIONS)


class Store:
    """A connection to etcd with bounded calls. ``timeout`` bounds every unary call."""

    def __init__(self, urls: str | Sequence[str], timeout: float = 1.0) -> None:
        self.endpoints = parse_endpoints(urls)
        self.timeout = timeout
        self.client = _client(self.endpoints, timeout)
        self.tx = self.client.transactions

    @property
    def describe(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    async def call(self, fn: Callable[[], Awaitable[T]], limit: float | None = None) -> T:
        try:
            return await asyncio.wait_for(fn(), limit or self.timeout)
        except TimeoutError:
            raise StoreError(f"etcd at {self.describe} did not answer in time") from None
        except aetcd.ClientError as err:
            raise StoreError(f"etcd at {self.describe}: {_first_line(err)}") from None
        except (ConnectionError, OSError) as err:
            raise StoreError(f"etcd at {self.describe}: {err}") from None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.close(), 1.0)

    async def get(self, key: str) -> Kv | None:
        got = await self.call(lambda: self.client.get(key.encode()))
        return (
            None
            if got is None
            else Kv(key, bytes(got.value), got.create_revision, got.mod_revision, got.lease)
        )

    async def get_prefix(self, prefix: str) -> tuple[list[Kv], int]:
        """Every key under ``prefix`` and the store revision they were read at."""
        got = await self.call(lambda: self.client.get_prefix(prefix.encode()))
        return [Kv.from_aetcd(kv) for kv in got.kvs], int(got.header.revision)

    async def get_range(self, start: str, end: str) -> tuple[list[Kv], int]:
        """Every key in ``[start, end)`` and the store revision they were read at."""
        got = await self.call(lambda: self.client.get_range(start.encode(), end.encode()))
        return [Kv.from_aetcd(kv) for kv in got.kvs], int(got.header.revision)

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        result = await self.call(lambda: self.client.put(key.encode(), value, lease=lease))
        return int(result.header.revision)

    async def delete(self, key: str) -> bool:
        result = await self.call(lambda: self.client.delete(key.encode()))
        return bool(result.deleted)

    async def txn(
        self, compare: list[Any], success: list[Any], failure: list[Any] | None = None
    ) -> tuple[bool, list[Any]]:
        ok, resp = await self.call(lambda: self.client.transaction(compare, success, failure or []))
        return bool(ok), list(resp)

    # -- leases ---------------------------------------------------------------------
    async def grant(self, ttl: float) -> int:
        lease = await self.call(lambda: self.client.lease(max(2, int(-(-ttl // 1)))))
        return int(lease.id)

    async def keepalive(self, lease_id: int) -> int:
        """Send one keepalive; the TTL etcd granted back, 0 once the lease is gone."""
        reply = await self.call(lambda: self.client.refresh_lease(lease_id))
        return 0 if reply is None else int(reply.TTL)

    async def revoke(self, lease_id: int) -> None:
        try:
            await self.call(lambda: self.client.revoke_lease(lease_id))
        except StoreError as err:
            if "lease not found" not in str(err):
                raise

    # -- watching -------------------------------------------------------------------
    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[Change]:
        """Changes under ``prefix`` from ``start_revision``; raises StoreError when the
        stream breaks (etcd down, compaction): the caller reloads and watches again."""
        try:
            watch = await asyncio.wait_for(
                self.client.watch(
                    prefix.encode(), range_end=_prefix_end(prefix), start_revision=start_revision
                ),
                self.timeout,
            )
        except TimeoutError:
            raise StoreError(f"etcd at {self.describe} did not open a watch in time") from None
        except aetcd.ClientError as err:
            raise StoreError(f"etcd at {self.describe}: {_first_line(err)}") from None
        try:
            async for ev in watch:
                yield Change(Kv.from_aetcd(ev.kv), ev.kind == aetcd.EventKind.DELETE)
        except aetcd.ClientError as err:
            raise StoreError(f"etcd watch at {self.describe}: {_first_line(err)}") from None
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), 0.5)
        raise StoreError(f"etcd watch at {self.describe} ended")


def _prefix_end(prefix: str) -> bytes:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class Mirror:
    """An in-memory copy of everything under a prefix, kept current by a watch.

    ``on_change`` is called (synchronously, on the event loop) for every change after
    the initial load and once with ``None`` after each (re)load, so callers can rebuild
    derived state. While etcd is away the copy keeps its last content and ``synced``
    is False; it reloads and resumes by itself.
    """

    def __init__(
        self,
        store: Store,
        prefix: str,
        on_change: Callable[[Change | None], None] | None = None,
        retry_s: float = 0.25,
        lag_s: float = 0.0,
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
        self._local: dict[str, int] = {}

    async def run(self) -> None:
        while True:
            try:
                kvs, revision = await self.store.get_prefix(self.prefix)
                self.items = {kv.key: kv for kv in kvs}
                self._local.clear()
                self.revision = revision
                self.error = None
                self.synced.set()
                if self._on_change:
                    self._on_change(None)
                async for change in self.store.watch_prefix(self.prefix, revision + 1):
                    if self._lag_s:
                        await asyncio.sleep(self._lag_s)
                    self._apply(change)
            except StoreError as err:
                if self.error != str(err):
                    log.warning("watch of %s lost: %s; retrying", self.prefix, err)
                self.error = str(err)
                self.synced.clear()
                if self._on_change:
                    self._on_change(None)
                await asyncio.sleep(self._retry_s)

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
        self.revision = max(self.revision, change.kv.mod_revision)
        if change.kv.mod_revision <= self._local.get(change.kv.key, 0):
            return
        if change.deleted:
            self.items.pop(change.kv.key, None)
        else:
            self.items[change.kv.key] = change.kv
        if self._on_change:
            self._on_change(change)
