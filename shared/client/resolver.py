"""Where a service is now, and where it moves: the client side of the registry.

A :class:`Resolver` is given one or more registry URLs; they all answer the same, from
the same etcd. :meth:`Resolver.resolve` asks one (the next one on failure).
:meth:`Resolver.watch` follows the registry's event stream (SSE), or long-polls a
registry that has no stream, and yields every newer endpoint the moment it is
published; when the registry it follows goes away it goes on through the next URL and,
since a stream starts with the current state, resumes from the last epoch it saw. The
stream asks for the endpoint answers of the services followed alone (``interest.py``);
one more followed, it is opened again, asking for that one too.

Whatever the registries send, three rules hold:

- knowledge never goes back: answers are ordered by epoch, then by the etcd revision
  that published the endpoint (a ``503`` says as of which revision there is none); an
  answer older than one already taken is ignored with a warning, and the registry that
  gave it is left for another (it lags behind etcd, or a stale cache is in between).
  So is the registry followed when another one tells news it has not told within
  ``request_timeout_s``, and one that marks its answers stale;
- garbage (not JSON, the wrong shape, an unexpected status such as 500) is ignored
  with a warning and the next registry is tried; it never reaches the caller;
- while no registry answers, the last endpoint is kept and handed out marked
  ``stale``.

How an answer is read and judged is ``answers.py``'s; the order in which the registries
are asked, ``registries.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import aiohttp

from hapair.shared.client.answers import (
    Behind,
    Entry,
    Garbage,
    RegistryDown,
    accept,
    describe_problem,
    error_reason,
    poll_after,
    read_body,
)
from hapair.shared.client.backoff import Backoff
from hapair.shared.client.errors import RegistryUnavailable, ServiceUnavailable, UnknownService
from hapair.shared.client.interest import StreamAsk
from hapair.shared.client.models import STALE_HEADER, Endpoint, StreamedAnswer
from hapair.shared.client.registries import Registries, registry_ssl
from hapair.shared.client.sse import SseError, SseParser
from hapair.shared.log import EventLog
from hapair.shared.waits import cancelled

Transport = Literal["auto", "sse", "poll"]
NETWORK_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)

log = EventLog("hapair.client")


class _NoStream(Exception):
    """A registry without an event stream: long-poll it instead."""


class _NoFilter(Exception):
    """A registry that refuses a stream's filter (older than filters): ask it for all."""


class _Widen(Exception):
    """A service the stream does not carry is followed: open one that asks for it too.
    Nothing failed."""


@dataclass(frozen=True, slots=True)
class ServiceState:
    """What the resolver knows of a service: the newest endpoint seen, the last
    registry answer's status (200, 503, 404; None before any) and reason, and whether
    no registry could confirm it lately."""

    endpoint: Endpoint | None
    status: int | None
    reason: str
    stale: bool


class Resolver:
    """Resolves and follows services through one or more registries.

    ``request_timeout_s`` bounds each lookup; ``poll_wait_s`` is how long a long-poll
    waits for news; a stream silent for ``stream_idle_s`` (the registry sends comments
    more often than that) counts as lost. ``transport`` forces the event stream
    (``"sse"``) or long-polls (``"poll"``); ``"auto"`` streams where it can.
    ``https://`` registries are checked against ``registry_ca`` (a CA file) when given,
    else against the system's CAs.
    Use it as ``async with Resolver(urls) as resolver:``, or call :meth:`close`.
    """

    def __init__(
        self,
        registries: str | Sequence[str],
        *,
        request_timeout_s: float = 1.0,
        poll_wait_s: float = 25.0,
        stream_idle_s: float = 10.0,
        transport: Transport = "auto",
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        session: aiohttp.ClientSession | None = None,
        registry_ca: str | Path | None = None,
    ) -> None:
        self.registries = Registries(registries)
        self._ssl = registry_ssl(registry_ca)
        self.request_timeout_s = request_timeout_s
        self.poll_wait_s = poll_wait_s
        self.stream_idle_s = stream_idle_s
        self.transport: Transport = transport
        self.backoff = backoff or Backoff(initial_s=0.05, max_s=2.0)
        self.rng = rng or random.Random()
        self._session = session
        self._own_session = session is None
        self._entries: dict[str, Entry] = {}
        self._interest: Counter[str] = Counter()
        self._interest_changed = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None
        self._pokes: dict[str, asyncio.Task[None]] = {}
        self._no_stream: set[str] = set()
        self._unfiltered: set[str] = set()  # registries that take no stream filter
        self._followed: str | None = None  # the registry whose stream is read now
        self._told: StreamAsk | None = None  # which services the followed one tells of
        self._leave = asyncio.Event()  # set: the followed registry is behind another
        self._confirming: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def urls(self) -> list[str]:
        """The registry URLs it was given."""
        return self.registries.urls

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        tasks = [
            t for t in (self._follower, self._confirming, *self._pokes.values()) if t is not None
        ]
        self._follower = None
        self._pokes.clear()
        await _cancel(tasks)
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    # ---- what is known now ----------------------------------------------------------

    def state(self, service: str) -> ServiceState:
        entry = self._entry(service)
        endpoint = entry.endpoint.marked(entry.stale) if entry.endpoint else None
        return ServiceState(endpoint, entry.status, entry.reason, entry.stale)

    def current(self, service: str) -> Endpoint | None:
        """The newest endpoint seen (``stale`` if no registry confirmed it lately)."""
        return self.state(service).endpoint

    # ---- asking ---------------------------------------------------------------------

    async def resolve(
        self, service: str, *, wait_s: float = 0.0, avoid: str | None = None
    ) -> Endpoint:
        """The service's endpoint, from the first registry that answers well.

        With ``wait_s``, a service that has no endpoint now (failing over) is waited for
        that long (a long-poll). Raises :class:`UnknownService` (404),
        :class:`ServiceUnavailable` (503, also after ``wait_s``), or
        :class:`RegistryUnavailable` when no registry answers and no endpoint was ever
        seen; when one was, it is returned marked ``stale``. The registry ``avoid`` is
        asked last.
        """
        entry = self._entry(service)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        problems: list[str] = []
        for url in self.registries.order(avoid):
            try:
                await self._ask(url, service, None, 0.0)
                while entry.status == 503 and (left := deadline - loop.time()) > 0:
                    await self._ask(url, service, poll_after(entry), left)
            except (Garbage, RegistryDown, Behind, *NETWORK_ERRORS) as err:
                problems.append(f"{url}: {self.registries.failed(url, err)}")
                continue
            self.registries.answered(url)
            if entry.status == 404:
                raise UnknownService(service, entry.reason)
            if entry.status == 503 or entry.endpoint is None:
                raise ServiceUnavailable(service, entry.reason, entry.endpoint)
            return entry.endpoint
        if entry.endpoint is None:
            raise RegistryUnavailable(service, problems)
        self._mark_stale([service])
        return entry.endpoint.marked(True)

    def poke(self, service: str) -> None:
        """Ask a registry now, in the background (a connection to the current endpoint
        failed: the stream may be behind, or dead without saying so): another one
        than the registry followed, which would only repeat what it streams."""
        if self._closed or service in self._pokes:
            return

        async def ask() -> None:
            try:
                await self.resolve(service, avoid=self._followed)
            except (UnknownService, ServiceUnavailable, RegistryUnavailable):
                pass  # recorded in the entry; whoever waits looks there
            finally:
                self._pokes.pop(service, None)

        self._pokes[service] = asyncio.create_task(ask(), name=f"resolve-{service}")

    # ---- following ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def following(self, service: str) -> AsyncIterator[None]:
        """Keep ``service`` current from the registries' stream while inside."""
        self._interest[service] += 1
        self._interest_changed.set()
        if self._follower is None or self._follower.done():
            self._follower = asyncio.create_task(self._follow(), name="registry-follower")
        try:
            yield
        finally:
            self._interest[service] -= 1
            if self._interest[service] <= 0:
                del self._interest[service]
                self._interest_changed.set()
            if not self._interest and self._follower is not None:
                follower, self._follower = self._follower, None
                await _cancel([follower])

    async def watch(self, service: str) -> AsyncGenerator[Endpoint, None]:
        """Each newer endpoint of ``service``, the moment a registry publishes it.

        Starts with the current one (once there is one). An unknown service raises
        :class:`UnknownService` at once; otherwise it waits, whatever the registries do.
        Close it with ``contextlib.aclosing`` to stop following at once.
        """
        async with self.following(service):
            with contextlib.suppress(ServiceUnavailable, RegistryUnavailable):
                await self.resolve(service)
            entry = self._entry(service)
            last: Endpoint | None = None
            while True:
                changed = entry.changed
                if entry.endpoint is not None and entry.endpoint.newer_than(last):
                    last = entry.endpoint
                    yield last.marked(entry.stale)
                    continue
                await changed.wait()

    async def newer(self, service: str, than: Endpoint | None, timeout: float) -> Endpoint | None:
        """The service's endpoint as soon as it is newer than ``than``, or None after
        ``timeout`` seconds. Answers from memory: follow the service for news."""
        entry = self._entry(service)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None if math.isinf(timeout) else max(timeout, 0.0)):
                while entry.endpoint is None or not entry.endpoint.newer_than(than):
                    await entry.changed.wait()
        if entry.endpoint is not None and entry.endpoint.newer_than(than):
            return entry.endpoint.marked(entry.stale)
        return None

    # ---- the follower ---------------------------------------------------------------

    async def _follow(self) -> None:
        """Follow the registries while anyone is interested: one stream (or one
        long-poll per service) at a time, the next registry when it fails, a back-off
        once every registry failed in a row."""
        loop = asyncio.get_running_loop()
        delays = self.backoff.delays(self.rng)
        failures = 0
        while True:
            url = self.registries.urls[self.registries.first]
            self.registries.serving_since = None
            try:
                if self.transport == "poll" or url in self._no_stream:
                    await self._unless_behind(url, self._poll(url))
                else:
                    await self._unless_behind(url, self._stream(url))
                problem: BaseException = RegistryDown("the event stream ended")
            except _NoStream as err:
                log.info("registry has no event stream; long-polling it", registry=url, why=err)
                self._no_stream.add(url)
                continue
            except _NoFilter as err:
                log.info(
                    "registry takes no stream filter (an older version); following it unfiltered",
                    registry=url,
                    why=err,
                )
                self._unfiltered.add(url)
                continue
            except _Widen:
                continue
            except (Garbage, RegistryDown, Behind, SseError, *NETWORK_ERRORS) as err:
                problem = err
            finally:
                self._followed, self._told = None, None
            # Restarted, it may be of a newer version: it is asked for a filter again.
            self._unfiltered.discard(url)
            served = self.registries.serving_since
            if served is not None and loop.time() - served >= 1.0:
                # It served well for a while before going: try the others at once.
                failures, delays = 0, self.backoff.delays(self.rng)
            self.registries.failed(url, problem)
            failures += 1
            if failures >= len(self.registries.urls):
                failures = 0
                self._mark_stale(list(self._entries))
                await asyncio.sleep(next(delays))

    async def _unless_behind(self, url: str, following: Coroutine[Any, Any, None]) -> None:
        """Follow ``url`` until that fails, or until it is found to be behind another
        registry (:class:`Behind`)."""
        self._leave.clear()
        self._followed = url
        task = asyncio.ensure_future(following)
        leave = asyncio.ensure_future(self._leave.wait())
        try:
            await asyncio.wait({task, leave}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel([leave] if task.done() else [task, leave])
        if not task.done() or task.cancelled():
            raise Behind("it has not told news another registry told")
        task.result()

    async def _stream(self, url: str) -> None:
        if url in self._unfiltered:
            ask = StreamAsk.everything()
        else:
            ask = StreamAsk.endpoints_of(self._interest)
        self._told = ask
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.request_timeout_s, sock_read=self.stream_idle_s
        )
        params = {"heartbeat_s": f"{max(self.stream_idle_s / 3, 0.5):g}", **ask.params()}
        async with self._http().get(
            f"{url}/v1/events",
            params=params,
            timeout=timeout,
            headers={"Accept": "text/event-stream"},
        ) as resp:
            no_stream = resp.status in (404, 405, 501) or (
                resp.status == 200 and resp.content_type != "text/event-stream"
            )
            if no_stream and self.transport == "auto":
                raise _NoStream(f"HTTP {resp.status} {resp.content_type} on /v1/events")
            if resp.status == 503:
                raise RegistryDown(await error_reason(resp))
            if resp.status == 400 and ask.filtered:
                # An older registry's query model forbids any parameter it does not know.
                raise _NoFilter(await error_reason(resp))
            if resp.status != 200 or no_stream:
                raise Garbage(f"HTTP {resp.status} {resp.content_type} on /v1/events")
            self.registries.serving(url)
            await self._read_stream(url, resp, ask)

    async def _read_stream(self, url: str, resp: aiohttp.ClientResponse, ask: StreamAsk) -> None:
        """Take the stream's events until it ends or fails, or until a service it does
        not carry is followed (:class:`_Widen`)."""
        reading = asyncio.create_task(self._events(url, resp))
        changed: asyncio.Task[Any] | None = None
        try:
            while not reading.done():
                self._interest_changed.clear()
                if ask.lacks(self._interest):
                    raise _Widen()
                changed = asyncio.create_task(self._interest_changed.wait())
                await asyncio.wait({reading, changed}, return_when=asyncio.FIRST_COMPLETED)
            reading.result()
        finally:
            await _cancel([t for t in (reading, changed) if t is not None])

    async def _events(self, url: str, resp: aiohttp.ClientResponse) -> None:
        parser = SseParser()
        async for chunk in resp.content.iter_any():
            for event in parser.feed(chunk):
                if event.event == "endpoint":
                    self._streamed(url, event.data)
                elif event.event == "stale":
                    self._registry_stale(url, event.data)

    def _streamed(self, url: str, data: str) -> None:
        try:
            payload = json.loads(data)
            head = StreamedAnswer.model_validate(payload)
            self._accept(head.service, head.status, payload, url)
        except (ValueError, Garbage) as err:  # JSONDecodeError, ValidationError
            log.warning(
                "ignoring an event from a registry", registry=url, problem=describe_problem(err)
            )

    def _registry_stale(self, url: str, data: str) -> None:
        """The registry followed lost touch with etcd (``stale: true``: what it streams
        may be the past; it ends the stream if that lasts), or is current again: the
        endpoints known are marked stale meanwhile, as the registry says."""
        try:
            stale = json.loads(data)["stale"] is True
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring an event from a registry", registry=url, problem="bad stale")
            return
        if stale:
            log.warning("the registry followed is out of touch with etcd", registry=url)
        for entry in self._entries.values():
            if entry.endpoint is not None and entry.stale != stale:
                entry.stale = stale
                entry.notify()

    async def _poll(self, url: str) -> None:
        """Long-poll every followed service at ``url`` until one poll fails; start
        again when the set of followed services changes."""
        while True:
            self._interest_changed.clear()
            self._told = StreamAsk(frozenset(self._interest))  # its polls tell of these
            tasks: list[asyncio.Task[Any]] = [
                asyncio.create_task(self._poll_one(url, s)) for s in list(self._interest)
            ]
            tasks.append(asyncio.create_task(self._interest_changed.wait()))
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await _cancel(tasks)
            for task in done:
                err = None if task.cancelled() else task.exception()
                if err is not None:
                    raise err

    async def _poll_one(self, url: str, service: str) -> None:
        loop = asyncio.get_running_loop()
        entry = self._entry(service)
        delays = self.backoff.delays(self.rng)
        while True:
            started, before = loop.time(), entry.changed
            await self._ask(url, service, poll_after(entry), self.poll_wait_s)
            self.registries.serving(url)
            if entry.status == 404:
                await asyncio.sleep(min(self.poll_wait_s, 5.0))  # answered at once: pace it
            elif not before.is_set() and loop.time() - started < self.poll_wait_s / 2:
                # Back early with no news: not what a long-poll does. Do not spin on it.
                await asyncio.sleep(next(delays))

    # ---- one request, and what to make of its answer ---------------------------------

    async def _ask(self, url: str, service: str, after: int | None, wait_s: float) -> None:
        """One lookup (a long-poll when ``after`` is given); the answer is accepted
        into the service's entry or raises."""
        params = {} if after is None else {"after_epoch": str(after), "wait_s": f"{wait_s:.3f}"}
        timeout = aiohttp.ClientTimeout(total=wait_s + self.request_timeout_s)
        path = f"{url}/v1/endpoints/{quote(service, safe='')}"
        async with self._http().get(path, params=params, timeout=timeout) as resp:
            if resp.headers.get(STALE_HEADER):
                raise RegistryDown(f"registry lost etcd: {resp.headers[STALE_HEADER]}")
            if resp.status == 503 and "Retry-After" in resp.headers:
                # Busy (too many readers): it says nothing of the service.
                raise RegistryDown(await error_reason(resp))
            body = await read_body(resp)
            status = resp.status
        try:
            payload = json.loads(body)
        except ValueError:
            raise Garbage(f"HTTP {status} with a body that is not JSON") from None
        self._accept(service, status, payload, url)

    def _accept(self, service: str, status: int, payload: Any, url: str) -> None:
        """Take ``url``'s answer for ``service`` into its entry (see ``answers.accept``),
        and note whether the registry followed has said it too."""
        entry = self._entry(service)
        news = accept(entry, service, status, payload)
        self._confirm(url, service, entry, news)

    def _confirm(self, url: str, service: str, entry: Entry, news: bool) -> None:
        """Track whether the registry followed has said what is known: news told by
        another one must come through the stream too, soon, or the registry followed
        is behind (its watch of etcd stalled, while it still sends heartbeats). Only
        of a service its stream carries: of another, it says nothing."""
        if url == self._followed:
            entry.unconfirmed = False
        elif news and self._followed is not None and self._carried(service):
            entry.unconfirmed = True
            if self._confirming is None or self._confirming.done():
                self._confirming = asyncio.create_task(self._check_confirmed(url))

    async def _check_confirmed(self, better: str) -> None:
        followed = self._followed
        await asyncio.sleep(self.request_timeout_s)
        if followed is None or followed != self._followed:
            return
        behind = sorted(s for s, e in self._entries.items() if e.unconfirmed and self._carried(s))
        if behind:
            log.warning(
                "the registry followed is behind another; leaving it",
                registry=followed,
                ahead=better,
                services=",".join(behind),
            )
            self.registries.first = self.registries.urls.index(better)
            self._leave.set()

    def _carried(self, service: str) -> bool:
        """Whether the registry followed tells news of ``service``."""
        return self._told is not None and self._told.carries(service)

    def _mark_stale(self, services: list[str]) -> None:
        for service in services:
            entry = self._entries[service]
            if entry.endpoint is not None and not entry.stale:
                entry.stale = True
                log.warning(
                    "no registry answers; keeping the last endpoint, marked stale",
                    service=service,
                    at=entry.endpoint.address,
                    epoch=entry.endpoint.epoch,
                )
                entry.notify()

    def _entry(self, service: str) -> Entry:
        entry = self._entries.get(service)
        if entry is None:
            entry = self._entries[service] = Entry()
        return entry

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ssl=self._ssl or True)
            )
            self._own_session = True
        return self._session


async def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until they have ended."""
    await cancelled(*tasks)
