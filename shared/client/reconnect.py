"""Reaching a service that may move: the retry loop and connection holder of every
adapter.

:func:`reach` tries the current endpoint; when that fails it waits for a newer
endpoint *or* a back-off delay, whichever comes first (a move is never delayed by the
back-off), and gives up with :class:`DeadlineExceeded` once the caller's deadline has
passed. An attempt that is still running when a newer endpoint is published is
abandoned at once for the new one.

:class:`Reconnecting` holds one connection, bound to the endpoint it was opened to.
When a newer endpoint is published it closes that connection (so a caller blocked on
it sees an error at once, not a silent hang on a fenced server) and the next use opens
one to the new endpoint.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import math
import random
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Generic, Self, TypeVar

from hapair.shared.client.backoff import Backoff
from hapair.shared.client.errors import (
    DeadlineExceeded,
    EndpointChanged,
    OutcomeUnknown,
    RegistryUnavailable,
    ServiceUnavailable,
    UnknownService,
    describe_error,
)
from hapair.shared.client.models import Endpoint
from hapair.shared.client.resolver import Resolver
from hapair.shared.log import EventLog
from hapair.shared.waits import cancelled

T = TypeVar("T")
C = TypeVar("C")

log = EventLog("hapair.client")


async def race_change(
    resolver: Resolver,
    endpoint: Endpoint,
    work: Awaitable[T],
    timeout: float | None,
    discard: Callable[[T], Awaitable[None]] | None = None,
) -> T:
    """``work``'s result, unless a newer endpoint than ``endpoint`` is published first
    (:class:`EndpointChanged`) or ``timeout`` passes (:class:`TimeoutError`). A result
    that comes after all (a connection made as it was abandoned) goes to ``discard``."""
    task = asyncio.ensure_future(work)
    change = asyncio.ensure_future(
        resolver.newer(endpoint.service, endpoint, math.inf if timeout is None else timeout)
    )
    try:
        await asyncio.wait({task, change}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        await _abandon(task, discard)
        raise
    finally:
        await cancelled(change)
    if task.done():
        return task.result()
    await _abandon(task, discard)
    newer = resolver.current(endpoint.service)
    if newer is not None and newer.newer_than(endpoint):
        raise EndpointChanged(endpoint, newer)
    raise TimeoutError(f"no answer within {timeout:g} s")


async def _abandon(task: asyncio.Future[T], discard: Callable[[T], Awaitable[None]] | None) -> None:
    task.cancel()
    await asyncio.wait({task})  # raises only if we are cancelled ourselves
    if task.cancelled() or task.exception() is not None or discard is None:
        return
    with contextlib.suppress(Exception):
        await discard(task.result())


async def reach(
    resolver: Resolver,
    service: str,
    attempt: Callable[[Endpoint], Awaitable[T]],
    *,
    deadline_s: float,
    attempt_timeout_s: float | None,
    retryable: Callable[[BaseException], bool],
    backoff: Backoff,
    rng: random.Random | None = None,
    discard: Callable[[T], Awaitable[None]] | None = None,
    repeat_on_change: bool = True,
    deadline_at: float | None = None,
) -> tuple[T, Endpoint]:
    """Run ``attempt`` against the service's current endpoint until it succeeds; the
    result and the endpoint it succeeded on. Errors ``retryable`` rejects propagate;
    after ``deadline_s`` seconds, :class:`DeadlineExceeded` names the last endpoint
    tried, its error and what the registry says (``deadline_at``, on the loop's clock,
    when the caller's deadline started earlier). An attempt still running when a newer
    endpoint is published is abandoned; with ``repeat_on_change`` it is made again on
    the new endpoint at once, without it :class:`EndpointChanged` propagates."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s if deadline_at is None else deadline_at
    delays = backoff.delays(rng)
    tried: Endpoint | None = None
    error: BaseException | None = None
    while True:
        left = deadline - loop.time()
        if left <= 0:
            reason = resolver.state(service).reason
            raise DeadlineExceeded(service, deadline_s, tried, error, reason) from error
        endpoint = resolver.current(service)
        if endpoint is None:
            endpoint = await _first_endpoint(resolver, service, left, next(delays))
            if endpoint is None:
                continue
        limit = left if attempt_timeout_s is None else min(attempt_timeout_s, left)
        try:
            return await race_change(
                resolver, endpoint, attempt(endpoint), limit, discard
            ), endpoint
        except EndpointChanged as moved:
            if not repeat_on_change:
                raise
            log.info("moving to the new endpoint", service=service, to=moved.new.describe())
            continue
        except Exception as err:
            newer = resolver.current(service)
            if newer is not None and newer.newer_than(endpoint):
                # It failed as the service moved (the old server went away, or its
                # pool was closed): that is the move, not a fault of the new one.
                if not repeat_on_change:
                    raise EndpointChanged(endpoint, newer) from err
                continue
            if not retryable(err):
                raise
            if tried != endpoint or type(err) is not type(error):
                log.info(
                    "cannot reach the endpoint; retrying",
                    service=service,
                    endpoint=endpoint.describe(),
                    error=describe_error(err),
                )
            tried, error = endpoint, err
        resolver.poke(service)  # the stream may be behind, or dead without a word
        wait = min(next(delays), deadline - loop.time())
        await resolver.newer(service, endpoint, wait)


async def follow_moves(
    resolver: Resolver,
    service: str,
    react: Callable[[Endpoint], Awaitable[None]],
    backoff: Backoff,
    rng: random.Random | None = None,
) -> None:
    """``react`` to each newer endpoint of ``service``, for as long as the caller wants
    (cancel it to stop). A watch that fails, for any reason, is started again after a
    back-off delay (sooner when a newer endpoint is known meanwhile): a service the
    registry does not know yet (404) may be declared later, and a watcher that died
    would leave connections on a server that was fenced. A new watch starts with the
    current endpoint, so ``react`` sees every move made meanwhile."""
    delays = backoff.delays(rng)
    while True:
        try:
            async with contextlib.aclosing(resolver.watch(service)) as endpoints:
                async for endpoint in endpoints:
                    delays = backoff.delays(rng)
                    await react(endpoint)
            problem = "the watch ended"
        except UnknownService as err:
            problem = f"unknown service ({err.reason})"
        except Exception as err:
            problem = describe_error(err)
            log.warning("following the endpoint failed; again", service=service, error=problem)
        await resolver.newer(service, resolver.current(service), next(delays))
        log.debug("following the endpoint again", service=service, after=problem)


async def _first_endpoint(
    resolver: Resolver, service: str, left: float, delay: float
) -> Endpoint | None:
    """Ask a registry; if it has nothing yet, wait a little for the stream to say."""
    try:
        async with asyncio.timeout(left):
            return await resolver.resolve(service)
    except (ServiceUnavailable, RegistryUnavailable, TimeoutError):
        return await resolver.newer(service, None, min(delay, left))


class Following(abc.ABC):
    """An adapter's life: follow one service's endpoint with a watcher task while open.

    Subclasses set ``resolver``, ``service`` and call ``_init_following()``; they write
    ``_moved`` (react to a move), ``_backoff`` and ``_release`` (drop their
    connections)."""

    resolver: Resolver
    service: str

    def _init_following(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Follow the service's endpoint (done by the first use otherwise)."""
        if self._watcher is None:
            await self._stack.enter_async_context(self.resolver.following(self.service))
            self._watcher = asyncio.create_task(
                follow_moves(self.resolver, self.service, self._moved, self._backoff()),
                name=f"follow-{self.service}",
            )

    async def close(self) -> None:
        if self._watcher is not None:
            await cancelled(self._watcher)
            self._watcher = None
        await self._release()
        await self._stack.aclose()

    @abc.abstractmethod
    async def _moved(self, endpoint: Endpoint) -> None:
        """React to the service's endpoint, newer than the one before, while open."""

    @abc.abstractmethod
    def _backoff(self) -> Backoff:
        """Paces restarts of the watch."""

    @abc.abstractmethod
    async def _release(self) -> None:
        """Drop every connection: the adapter is closing."""


class Reconnecting(Following, Generic[C]):
    """One connection to a service, moved to the new endpoint whenever one is published.

    ``deadline_s`` bounds :meth:`connection` and :meth:`run` (no caller ever hangs on
    a service that is gone); ``connect_timeout_s`` bounds one connection attempt;
    ``backoff`` paces retries of one endpoint. With ``close_on_change`` (the default),
    the connection is closed as soon as a newer endpoint is published.
    """

    def __init__(
        self,
        resolver: Resolver,
        service: str,
        *,
        deadline_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        backoff: Backoff | None = None,
        close_on_change: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.resolver = resolver
        self.service = service
        self.deadline_s = deadline_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff = backoff or Backoff()
        self.close_on_change = close_on_change
        self.rng = rng or random.Random()
        self.endpoint: Endpoint | None = None
        """The endpoint of the open connection."""
        self._conn: C | None = None
        self._lock = asyncio.Lock()
        self._init_following()

    # ---- what a subclass provides -----------------------------------------------------

    @abc.abstractmethod
    async def _open(self, endpoint: Endpoint, timeout: float) -> C: ...

    @abc.abstractmethod
    async def _close(self, conn: C, why: Exception) -> None:
        """Close ``conn`` (at once: the endpoint it went to is no longer valid)."""

    @abc.abstractmethod
    def _usable(self, conn: C) -> bool: ...

    @abc.abstractmethod
    def _connect_failed(self, err: BaseException) -> bool:
        """Whether a failed connection attempt is worth another one."""

    @abc.abstractmethod
    def _connection_lost(self, err: BaseException, conn: C) -> bool:
        """Whether ``err`` from an operation means the connection is lost (retry)."""

    # ---- life -----------------------------------------------------------------------

    async def _release(self) -> None:
        await self._drop(ConnectionAbortedError("adapter closed"))

    # ---- use ------------------------------------------------------------------------

    async def connection(self) -> C:
        """The open connection, or a new one to the current endpoint."""
        loop = asyncio.get_running_loop()
        return await self._connection(loop.time() + self.deadline_s)

    async def run(self, operation: Callable[[C], Awaitable[T]]) -> T:
        """``await operation(connection)`` at least once: when the connection is lost
        (or the service moves) during it, run it again on a new connection, until
        ``deadline_s``. ``operation`` must therefore be safe to repeat: one whose answer
        was lost may have been applied (a lost COMMIT); see :meth:`run_once`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        while True:
            conn = await self._connection(deadline)
            try:
                return await operation(conn)
            except Exception as err:
                if not self._connection_lost(err, conn):
                    raise
                endpoint = self.endpoint
                await self._drop(err, conn)
                if loop.time() >= deadline:
                    raise DeadlineExceeded(
                        self.service, self.deadline_s, endpoint, err, self._reason()
                    ) from err
                log.info(
                    "connection lost; running again on a new one",
                    service=self.service,
                    error=describe_error(err),
                )

    async def run_once(self, operation: Callable[[C], Awaitable[T]], what: str = "") -> T:
        """``await operation(connection)`` at most once. Reaching the service is
        retried as by :meth:`connection` (nothing is sent before); when the connection
        is lost (or the service moves) during the operation, it raises
        :class:`OutcomeUnknown` (``what`` names the operation in its message): it may
        or may not have been applied, and is not run again."""
        loop = asyncio.get_running_loop()
        conn = await self._connection(loop.time() + self.deadline_s)
        endpoint = self.endpoint
        assert endpoint is not None
        try:
            return await operation(conn)
        except Exception as err:
            if not self._connection_lost(err, conn):
                raise
            await self._drop(err, conn)
            raise OutcomeUnknown(self.service, what or "an operation", endpoint, err) from err

    # ---- inside ---------------------------------------------------------------------

    async def _connection(self, deadline: float) -> C:
        await self.start()
        async with self._lock:
            conn = self._conn
            if conn is not None:
                current = self.resolver.current(self.service)
                if self._usable(conn) and not (current and current.newer_than(self.endpoint)):
                    return conn
                await self._drop(ConnectionResetError("connection lost or moved"), conn)
            new, endpoint = await reach(
                self.resolver,
                self.service,
                lambda ep: self._open(ep, self.connect_timeout_s),
                deadline_s=self.deadline_s,
                deadline_at=deadline,
                attempt_timeout_s=self.connect_timeout_s,
                retryable=self._connect_failed,
                backoff=self.backoff,
                rng=self.rng,
                discard=lambda c: self._close(c, ConnectionAbortedError("too late")),
            )
            self._conn, self.endpoint = new, endpoint
            log.info("connected", service=self.service, endpoint=endpoint.describe())
            return new

    async def _drop(self, why: Exception, conn: C | None = None) -> None:
        if self._conn is None or (conn is not None and conn is not self._conn):
            return
        old, self._conn = self._conn, None
        with contextlib.suppress(Exception):
            await self._close(old, why)

    def _backoff(self) -> Backoff:
        return self.backoff

    async def _moved(self, endpoint: Endpoint) -> None:
        """Close the connection the moment a newer endpoint is published."""
        conn = self._conn
        if conn is not None and self.close_on_change and endpoint.newer_than(self.endpoint):
            log.info(
                "endpoint changed; closing the connection to the old one",
                service=self.service,
                old=self.endpoint.describe() if self.endpoint else None,
                new=endpoint.describe(),
            )
            await self._changed(conn, EndpointChanged(self.endpoint, endpoint))

    async def _changed(self, conn: C, why: EndpointChanged) -> None:
        """The endpoint moved under ``conn``: close it (subclasses may be gentler)."""
        await self._drop(why, conn)

    def _reason(self) -> str:
        return self.resolver.state(self.service).reason
