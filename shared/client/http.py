"""HTTP requests (aiohttp) that go to wherever the service is now."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Mapping
from types import SimpleNamespace
from typing import Any

import aiohttp

from hapair.shared.client.backoff import Backoff
from hapair.shared.client.errors import EndpointChanged
from hapair.shared.client.models import Endpoint
from hapair.shared.client.reconnect import Following, reach
from hapair.shared.client.resolver import Resolver
from hapair.shared.log import EventLog

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

log = EventLog("hapair.client")


class HttpAdapter(Following):
    """An aiohttp client whose requests go to the service's valid server.

    ```python
    async with Resolver(registries) as resolver, HttpAdapter(resolver, "mes-api") as http:
        async with http.get("/orders/17") as resp:
            order = await resp.json()
    ```

    A request whose connection cannot be made is made again, on a newer endpoint as
    soon as one is published, else after a back-off delay, until ``deadline_s``; then
    :class:`DeadlineExceeded`. A request lost after it was sent is repeated only for
    idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) or with
    ``retry=True``; otherwise the error (or :class:`EndpointChanged`) reaches the
    caller. Each endpoint gets its own connection pool; when a newer endpoint is
    published the old pool is closed, so no request waits on a server that was
    fenced. The scheme is ``scheme`` if given, else the endpoint's protocol when it is
    ``http`` or ``https``, else ``http``.
    """

    def __init__(
        self,
        resolver: Resolver,
        service: str,
        *,
        scheme: str | None = None,
        deadline_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        session_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.resolver = resolver
        self.service = service
        self.scheme = scheme
        self.deadline_s = deadline_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff = backoff or Backoff()
        self.rng = rng or random.Random()
        self.session_kwargs = dict(session_kwargs or {})
        self.endpoint: Endpoint | None = None
        """Where the last answer came from."""
        self._session: aiohttp.ClientSession | None = None
        self._session_endpoint: Endpoint | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._init_following()

    async def _release(self) -> None:
        self._retire()
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task

    @contextlib.asynccontextmanager
    async def request(
        self, method: str, path: str, *, retry: bool | None = None, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """``async with http.request("GET", "/path") as resp``; ``path`` starts with /.
        Other keyword arguments go to ``aiohttp.ClientSession.request``."""
        await self.start()
        repeat = retry if retry is not None else method.upper() in IDEMPOTENT
        last = _Attempt()
        traced = "trace_request_ctx" in kwargs

        def retryable(err: BaseException) -> bool:
            if isinstance(err, aiohttp.ClientConnectorError):
                return True  # the connection was never made: nothing was sent
            lost = aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | TimeoutError
            return repeat and isinstance(err, lost)

        async def attempt(endpoint: Endpoint) -> aiohttp.ClientResponse:
            nonlocal last
            session = self._session_for(endpoint)
            url = endpoint.url(self.scheme or _scheme(endpoint.protocol)) + path
            last = _Attempt()
            if traced:
                last.connected = True  # the caller's own tracing: assume it was sent
            else:
                kwargs["trace_request_ctx"] = last
            resp = await session.request(method, url, **kwargs)
            if repeat:
                # A server that dies between its headers and its body must cost a retry on
                # the valid server, not an error for the caller: read the body here.
                try:
                    await resp.read()
                except BaseException:
                    resp.release()
                    raise
            return resp

        async def discard(resp: aiohttp.ClientResponse) -> None:
            resp.close()

        deadline = asyncio.get_running_loop().time() + self.deadline_s
        while True:
            try:
                resp, self.endpoint = await reach(
                    self.resolver,
                    self.service,
                    attempt,
                    deadline_s=self.deadline_s,
                    deadline_at=deadline,
                    attempt_timeout_s=None,
                    retryable=retryable,
                    backoff=self.backoff,
                    rng=self.rng,
                    discard=discard,
                    repeat_on_change=repeat,
                )
                break
            except EndpointChanged as moved:
                if last.connected:
                    raise
                # Abandoned before it had a connection: nothing was sent, so the new
                # endpoint gets it, whatever the method.
                log.info(
                    "moving to the new endpoint", service=self.service, to=moved.new.describe()
                )
        try:
            yield resp
        finally:
            resp.release()

    def get(self, path: str, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.request("DELETE", path, **kwargs)

    # ---- one pool per endpoint --------------------------------------------------------

    def _session_for(self, endpoint: Endpoint) -> aiohttp.ClientSession:
        if self._session is None or self._session_endpoint != endpoint:
            self._retire()
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
            traces = [*self.session_kwargs.get("trace_configs", ()), _CONNECTED]
            self._session = aiohttp.ClientSession(
                **{"timeout": timeout, **self.session_kwargs, "trace_configs": traces}
            )
            self._session_endpoint = endpoint
        return self._session

    def _retire(self) -> None:
        """Close the pool of the old endpoint: its requests in flight fail at once."""
        if self._session is not None:
            task = asyncio.create_task(self._session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._session, self._session_endpoint = None, None

    def _backoff(self) -> Backoff:
        return self.backoff

    async def _moved(self, endpoint: Endpoint) -> None:
        if self._session_endpoint is not None and endpoint.newer_than(self._session_endpoint):
            log.info(
                "endpoint changed; closing the connections to the old one",
                service=self.service,
                old=self._session_endpoint.describe(),
                new=endpoint.describe(),
            )
            self._retire()


class _Attempt:
    """One attempt of a request: whether it got a connection (from then on, bytes of
    it may have reached the server)."""

    __slots__ = ("connected",)

    def __init__(self) -> None:
        self.connected = False


async def _got_connection(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: object
) -> None:
    attempt = context.trace_request_ctx
    if isinstance(attempt, _Attempt):
        attempt.connected = True


_CONNECTED = aiohttp.TraceConfig()
_CONNECTED.on_connection_create_end.append(_got_connection)
_CONNECTED.on_connection_reuseconn.append(_got_connection)


def _scheme(protocol: str) -> str:
    return protocol if protocol in ("http", "https") else "http"
