"""The etcd wrapper: every call has a deadline and one error type.

aetcd calls have no deadline by default (a hung etcd blocks them forever) and raise
several exception classes; here every call is bounded and every backend failure comes
out as :class:`StoreError`, so callers take the safe path in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

# grpc must not try to survive fork(): the agent forks services and a watchdog.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import aetcd
from aetcd import exceptions

from hapair.shared import etcd_tls
from hapair.shared.log import EventLog
from hapair.shared.member_client import MemberClient, StreamCounts
from hapair.shared.pki import TlsFiles
from hapair.shared.txn import Compare, Op, TxnResult, txn_request

log = EventLog("hapair.store")
T = TypeVar("T")


class StoreError(Exception):
    """etcd could not be reached or refused the request."""


class Timeout(StoreError):
    """No answer within the call's time: the request may or may not have been applied."""


class Unavailable(StoreError):
    """No connection to a member that can serve (refused, lost, or without a leader)."""


class LeaseNotFound(StoreError):
    """etcd does not know the lease (expired or revoked)."""


class PermissionDenied(StoreError):
    """etcd's auth refused the request to the user this client is (its certificate's CN;
    a CN that names no user gets the same answer)."""


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


PAGE_KEYS = 1000
"""Keys per range response when a prefix is read: one answer stays far below any limit."""

# Errors that say "this member cannot serve now", as opposed to a refused request.
_MEMBER_TROUBLE = ("no leader", "leader changed", "timed out", "too many requests", "stopped")


def _member_trouble(err: BaseException) -> bool:
    if isinstance(err, (TimeoutError, ConnectionError, OSError)):
        return True
    if isinstance(err, (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError)):
        return True
    if isinstance(err, exceptions.WatchTimeoutError):
        return True
    text = str(err).lower()
    return any(t in text for t in _MEMBER_TROUBLE)


def _typed(err: aetcd.ClientError, text: str) -> StoreError:
    """The store's error for one of aetcd's (etcd names some only in its message)."""
    lowered = text.lower()
    if isinstance(err, exceptions.RevisionCompactedError) or "compacted" in lowered:
        return Compacted(text)
    if "lease not found" in lowered:
        return LeaseNotFound(text)
    if "permission denied" in lowered:
        return PermissionDenied(text)
    if isinstance(err, (exceptions.ConnectionTimeoutError, exceptions.WatchTimeoutError)):
        return Timeout(text)
    if _member_trouble(err):
        return Unavailable(text)
    return StoreError(text)


def _not_connected(err: BaseException) -> bool:
    """gRPC's words for a call that found no connection: nothing was sent."""
    return isinstance(err, exceptions.ConnectionFailedError) and "failed to connect" in str(err)


class Compacted(StoreError):
    """The revision asked for is gone from etcd's history: read everything again."""


class Store:
    """A connection to etcd with bounded calls. ``timeout`` bounds every unary call.

    Given several members, the store talks to one at a time, chosen at random at start
    so that clients spread over the members. When that member fails a call in a way
    that says it cannot serve (no answer in time, no leader, connection lost), the store
    moves to the next member and closes the old connection, which also ends the watches
    on it: their owners resume on the new member. A member cut off from its quorum still
    accepts connections, so only these answers, never the connection state, can show it.
    """

    def __init__(
        self, urls: str | Sequence[str], timeout: float = 1.0, tls: TlsFiles | None = None
    ) -> None:
        self.endpoints = parse_endpoints(urls)
        # Read and checked now: a missing or unsafe file is a start-up error, not a
        # connection that keeps failing.
        prepared = etcd_tls.prepare(urls, tls)
        self._credentials = None if prepared is None else prepared.credentials
        self.secure = prepared is not None
        # The etcd user this client is (its certificate's CN), None in the lab mode.
        self.identity = None if prepared is None else prepared.identity
        self.timeout = timeout
        self._index = random.randrange(len(self.endpoints))
        self.streams = StreamCounts()
        """Streams opened, on every member this store has used."""
        self.client = self._open(self._index)
        self._trouble: str | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def _open(self, index: int) -> MemberClient:
        host, port = self.endpoints[index]
        return MemberClient(host, port, self.timeout, self._credentials, self.streams)

    @property
    def describe(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    @property
    def member(self) -> str:
        """The member in use now."""
        return str(self.client.name)

    def failover(self, reason: str, client: aetcd.Client | None = None) -> None:
        """Leave the member in use (only if it is still ``client``, when given) for the
        next one; alone, go on with it on the same connection. Ends every watch on the
        old one."""
        old = self.client
        if client is not None and client is not old:
            return  # another call already moved on
        before = self.member
        self._index = (self._index + 1) % len(self.endpoints)
        alone = len(self.endpoints) == 1
        self.client = old.successor() if alone else self._open(self._index)
        # One warning per spell of trouble: with etcd down, every call moves on.
        if self._trouble is None:
            log.warning(
                "etcd member failing; moving on", member=before, to=self.member, error=reason
            )
        else:
            log.debug("etcd member failing; moving on", member=before, to=self.member, error=reason)
        self._trouble = reason
        task = asyncio.get_running_loop().create_task(self._close(old))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _failed(self, client: aetcd.Client, err: BaseException, text: str) -> None:
        # Alone, a member has no replacement: reconnecting on every failed call would only
        # cut the other calls in flight.
        if len(self.endpoints) > 1 and _member_trouble(err):
            self.failover(text, client)

    def _answered(self, client: aetcd.Client) -> None:
        if self._trouble is not None and client is self.client:
            log.info("etcd member answers", member=self.member)
            self._trouble = None

    async def call(self, fn: Callable[[], Awaitable[T]], limit: float | None = None) -> T:
        """``fn()`` within ``limit`` (default ``timeout``) seconds. A member that cannot be
        connected to never saw the request, so the next one is tried in the same time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (limit or self.timeout)
        tries = len(self.endpoints)
        while True:
            tries -= 1
            client = self.client  # ``fn`` reads self.client when called, which is right now
            try:
                result = await _uncancelled(fn(), max(0.0, deadline - loop.time()))
            except TimeoutError as err:
                text = f"etcd at {client.name} did not answer in time"
                self._failed(client, err, text)
                raise Timeout(text) from None
            except aetcd.ClientError as err:
                text = f"etcd at {client.name}: {_first_line(err)}"
                self._failed(client, err, text)
                if tries > 0 and _not_connected(err) and loop.time() < deadline:
                    continue
                raise _typed(err, text) from None
            except (ConnectionError, OSError) as err:
                text = f"etcd at {client.name}: {err}"
                self._failed(client, err, text)
                raise Unavailable(text) from None
            self._answered(client)
            return result

    @staticmethod
    async def _close(client: aetcd.Client) -> None:
        await bounded(client.close(), 1.0)

    async def close(self) -> None:
        await self._close(self.client)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=1.0)

    async def get(self, key: str) -> Kv | None:
        got = await self.call(lambda: self.client.get(key.encode()))
        return (
            None
            if got is None
            else Kv(key, bytes(got.value), got.create_revision, got.mod_revision, got.lease)
        )

    async def get_prefix(self, prefix: str, keys_only: bool = False) -> tuple[list[Kv], int]:
        """Every key under ``prefix`` and the store revision they were read at (with
        ``keys_only``, every value empty)."""
        return await self.get_range(prefix, _prefix_end(prefix).decode(), keys_only)

    async def get_range(
        self, start: str, end: str, keys_only: bool = False
    ) -> tuple[list[Kv], int]:
        """Every key in ``[start, end)`` and the store revision they were read at.

        Read in pages, all at the revision of the first, so that no answer grows with
        the data (gRPC refuses answers above its receive limit) and the whole is still
        one consistent snapshot."""
        kvs: list[Kv] = []
        key, stop, revision = start.encode(), end.encode(), 0
        while True:
            page = await self.call(
                lambda: self.client.range_page(key, stop, revision, PAGE_KEYS, keys_only)  # noqa: B023
            )
            revision = revision or int(page.header.revision)
            kvs.extend(Kv.from_aetcd(kv) for kv in page.kvs)
            if not page.more or not page.kvs:
                return kvs, revision
            key = bytes(page.kvs[-1].key) + b"\0"

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        with self._lease_gone_if_refused([lease]):
            result = await self.call(lambda: self.client.put(key.encode(), value, lease=lease))
        return int(result.header.revision)

    async def delete(self, key: str) -> bool:
        """Delete ``key``; whether it was there (aetcd answers None when it was not)."""
        result = await self.call(lambda: self.client.delete(key.encode()))
        return result is not None and bool(result.deleted)

    async def delete_range(self, start: str, end: str) -> int:
        """Delete every key in ``[start, end)``; how many there were."""
        result = await self.call(lambda: self.client.delete_range(start.encode(), end.encode()))
        return int(result.deleted)

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """Apply ``success`` if every compare holds, ``failure`` otherwise, atomically."""
        message = txn_request(compare, success, failure)
        with self._lease_gone_if_refused([op.lease for op in (*success, *failure)]):
            reply = await self.call(lambda: self.client.txn(message))
        return TxnResult(bool(reply.succeeded), int(reply.header.revision))

    @contextlib.contextmanager
    def _lease_gone_if_refused(self, leases: Sequence[int | None]) -> Iterator[None]:
        """A write refused because its lease is gone ends that lease's keepalive stream,
        which its holder, taking a new lease, would otherwise leave open for good. (With
        several leases in the write, each one's: a live lease's next keepalive only
        opens a new stream.)"""
        try:
            yield
        except LeaseNotFound:
            for lease in leases:
                if lease:
                    self.client.lease_gone(lease)
            raise

    async def auth(self, method: str, request: object) -> Any:
        """etcd's answer to one Auth service call (users, roles, enabling auth)."""
        return await self.call(lambda: self.client.auth(method, request))

    # -- leases ---------------------------------------------------------------------
    async def grant(self, ttl: float) -> int:
        return (await self.grant_lease(ttl))[0]

    async def grant_lease(self, ttl: float) -> tuple[int, int]:
        """A new lease of at least ``ttl`` seconds: its id and the TTL etcd granted.

        etcd grants whole seconds, and never less than its raft timing allows (1.5
        election timeouts, rounded up: 2 s with its defaults), so the TTL granted may be
        longer than the one asked."""
        lease = await self.call(lambda: self.client.lease(max(1, math.ceil(ttl))))
        return int(lease.id), int(lease.ttl)

    async def keepalive(self, lease_id: int) -> int:
        """Send one keepalive; the TTL etcd granted back, 0 once the lease is gone.

        Sent on the lease's keepalive stream with the member in use, opened again when
        it broke. An answer that does not come within ``timeout`` is a :class:`Timeout`,
        the keepalive unconfirmed, and its stream is dropped, so that it is never taken
        for the answer to a later keepalive."""
        reply = await self.call(lambda: self.client.refresh_lease(lease_id))
        return int(reply.TTL)

    async def revoke(self, lease_id: int) -> None:
        # Revoked or not, its holder sends it no keepalive any more: its stream ends.
        try:
            with contextlib.suppress(LeaseNotFound):  # gone already
                await self.call(lambda: self.client.revoke_lease(lease_id))
        finally:
            self.client.lease_gone(lease_id)

    # -- watching -------------------------------------------------------------------
    async def watch_prefix(
        self, prefix: str, start_revision: int, opened: Callable[[], None] | None = None
    ) -> AsyncIterator[Change]:
        """Changes under ``prefix`` from ``start_revision``; raises StoreError when the
        stream breaks (etcd down, the store moved to another member) and
        :class:`Compacted` when ``start_revision`` is gone: the caller resumes or reloads.
        ``opened`` is called once etcd has accepted the watch."""
        used: list[MemberClient] = []

        async def open_watch() -> Any:
            used.append(self.client)  # a retry after a failed connection uses the next member
            return await self.client.watch(
                prefix.encode(), range_end=_prefix_end(prefix), start_revision=start_revision
            )

        try:
            watch = await self.call(open_watch)
        except Compacted:
            raise  # a refusal, confirmed in time
        except StoreError as err:
            # aetcd would hand etcd's late confirmation of this watch to the next one asked
            # for on the same watch stream, which would then follow the wrong keys: that
            # stream is done with, even for a member that is alone (which keeps its
            # connection).
            if used:
                self.failover(str(err), used[-1])
            raise
        client = used[-1]
        if opened is not None:
            opened()
        try:
            async for ev in watch:
                yield Change(Kv.from_aetcd(ev.kv), ev.kind == aetcd.EventKind.DELETE)
        except aetcd.ClientError as err:
            text = f"etcd watch at {client.name}: {_first_line(err)}"
            self._failed(client, err, text)
            raise _typed(err, text) from None
        finally:
            await bounded(watch.cancel(), 0.5)
        raise StoreError(f"etcd watch at {client.name} ended")


async def _uncancelled(work: Awaitable[T], seconds: float) -> T:
    """``work`` within ``seconds``, telling the caller's cancellation from the call's.

    gRPC may answer a call cancelled with its caller by an error of its own: the caller
    must get its cancellation, not take that error for etcd's answer and go on (a mirror
    would retry for ever and never stop). The other way round, closing a channel (the
    store moving to another member) cancels the calls still on it: the caller, not
    cancelled itself, must get an error it handles, not a cancellation that would end
    its task for good (the publisher of an agent died that way, silently)."""
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    try:
        result = await asyncio.wait_for(work, seconds)
    except asyncio.CancelledError:
        if task is not None and task.cancelling():
            raise
        raise ConnectionError("call cancelled under it: its connection was closed") from None
    except Exception:
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None
        raise
    if task is not None and task.cancelling() > before:
        # Python 3.11's wait_for returns the answer when the caller is cancelled as the
        # call completes, swallowing the cancellation: a loop around this call would
        # never end. The caller gets it back.
        raise asyncio.CancelledError
    return result


async def bounded(work: Awaitable[Any], seconds: float) -> None:
    """Wait for ``work`` at most ``seconds``, then leave it cancelled, whatever it does.

    ``asyncio.wait_for`` waits for a timed-out task to finish cancelling, which a task
    that swallows its cancellation (gRPC and aetcd have such code) never does."""
    task = asyncio.ensure_future(work)
    # Its outcome is not wanted: retrieved here, so that nothing is logged for it.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    await asyncio.wait({task}, timeout=seconds)
    task.cancel()


def _prefix_end(prefix: str) -> bytes:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
