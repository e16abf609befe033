"""``GET /v1/events``: server-sent events of endpoint, role, node, topology and events.

A stream starts with the current state (topology, every pair's role, every endpoint
answer), so a client that subscribes first needs no separate lookup, then carries each
change as it is seen. A client that reconnects, here or to another registry, thus
resumes from the current state. ``?kinds=endpoint&services=mes-api`` asks for less:
those kinds of messages, and the endpoint answers of those services, in the state it
starts with and after (see ``stream_filter.py``). Idle streams get a comment line every
``heartbeat_s`` (``?heartbeat_s=S`` asks for another period, so a client can tell a
silent registry from a dead one sooner).

A registry out of touch with etcd could only stream old news: it refuses new streams
with ``503``, tells the open ones at once (a ``stale`` event, and another once it is
current again) and ends them if that lasts (see ``SiteCache``), so that their clients
follow another registry; a short stall sends no client back to reconnect.

Readers that wait (streams, long-polls) each hold a handler and a socket: beyond
``max_streams`` (``max_polls``) on the registry, or ``max_per_client`` of both from one
client address, a new one is refused at once with ``503`` and ``Retry-After`` (plain
lookups never are), and a stream whose reader does not take a message within
``write_timeout_s`` (its buffers full: it stopped reading) is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Iterator
from typing import Literal

from aiohttp import HttpVersion11, web
from pydantic import BaseModel, ConfigDict, Field

from hapair.registry.appkeys import CACHE, CONFIG, READERS
from hapair.registry.errors import error, validate
from hapair.registry.stream_filter import KINDS, MAX_SERVICES, Kinds, Services, StreamFilter
from hapair.shared.log import EventLog

RETRY_AFTER_S = 2
"""What a refused reader is told to wait before it asks again (here or elsewhere)."""

log = EventLog("hapair.registry")

HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class StreamQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heartbeat_s: float | None = Field(
        None,
        ge=0.5,
        le=300,
        allow_inf_nan=False,
        description="seconds between comment lines on an idle stream (default the registry's)",
    )
    kinds: Kinds = Field(
        None,
        description=f"the kinds of messages to send, comma-separated, of {', '.join(KINDS)} "
        "(default all; stale events are sent to every stream)",
    )
    services: Services = Field(
        None,
        description=f"the services whose endpoint answers to send, comma-separated, at most "
        f"{MAX_SERVICES} (default every service's); other kinds are not restricted",
    )

    def stream_filter(self) -> StreamFilter | None:
        """What the stream takes; None: everything, as a stream that asks nothing."""
        asked = StreamFilter(self.kinds or StreamFilter().kinds, self.services)
        return None if asked == StreamFilter() else asked


@contextlib.contextmanager
def reader_slot(request: web.Request, kind: Literal["streams", "polls"]) -> Iterator[str | None]:
    """Hold one of the app's places for a waiting reader of ``kind`` while inside.
    Yields None when placed, else what is full (the answer's ``error``, nothing held):
    the registry's places for ``kind``, or those of the client's address."""
    readers, config = request.app[READERS], request.app[CONFIG]
    cap = config.max_streams if kind == "streams" else config.max_polls
    client = request.remote or ""
    what = "event streams" if kind == "streams" else "long-polls"
    if getattr(readers, kind) >= cap:
        yield f"too many {what} open on this registry ({cap}); ask another or try again later"
        return
    if readers.by_client[client] >= config.max_per_client:
        yield (
            f"too many event streams and long-polls open from {client} on this registry "
            f"({config.max_per_client}); close some or try again later"
        )
        return
    setattr(readers, kind, getattr(readers, kind) + 1)
    readers.by_client[client] += 1
    try:
        yield None
    finally:
        setattr(readers, kind, getattr(readers, kind) - 1)
        readers.by_client[client] -= 1
        if not readers.by_client[client]:
            del readers.by_client[client]  # a client gone leaves nothing behind


def busy(message: str) -> web.Response:
    response = error(503, message)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


async def events(request: web.Request) -> web.StreamResponse:
    cache, config = request.app[CACHE], request.app[CONFIG]
    query = validate(StreamQuery, dict(request.query), "query parameter")
    heartbeat_s = query.heartbeat_s or config.heartbeat_s
    wanted = query.stream_filter()
    if not cache.synced:
        return error(
            503, f"registry is not in touch with etcd ({cache.mirror.error or 'starting'})"
        )
    with reader_slot(request, "streams") as full:
        if full is not None:
            return busy(full)
        response = web.StreamResponse(headers=HEADERS)
        if request.version >= HttpVersion11:
            # Said here, not left to aiohttp, so that ``response.chunked`` tells how the
            # body is framed (news bypasses the response object, see ``_stream``).
            response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            await _stream(request, response, wanted, heartbeat_s, config.write_timeout_s)
        except ConnectionResetError:
            pass  # the client went away; its subscription is gone with it
        except TimeoutError:
            # Its buffers are full: it stopped reading. Drop what is queued for it and
            # the connection; it starts again from the current state if it comes back.
            log.warning("event stream cut off: its reader does not read", peer=request.remote)
            _reset(request.transport)
        return response


def _reset(transport: asyncio.Transport | None) -> None:
    """Close with a reset: a plain close would leave the unsent bytes in the kernel,
    and the socket with them, for as long as the peer keeps its window shut."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _stream(
    request: web.Request,
    response: web.StreamResponse,
    wanted: StreamFilter | None,
    heartbeat_s: float,
    write_s: float,
) -> None:
    transport = request.transport

    async def write(data: bytes) -> None:
        if (
            transport is not None
            and not transport.get_write_buffer_size()
            and len(data) <= transport.get_write_buffer_limits()[1]
        ):
            # Nothing waits to be sent: this write cannot wait for the reader (the
            # common case, spared the cost of a timeout for each subscriber).
            await response.write(data)
            return
        async with asyncio.timeout(write_s):
            await response.write(data)

    def send(message: bytes, framed: bytes) -> bool:
        """Straight to the socket, when that cannot wait: as aiohttp would frame it."""
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return False
        try:
            transport.write(framed if response.chunked else message)
        except (OSError, RuntimeError):
            # Never raised into the loop over every stream: this one's task finds out.
            return False
        return True

    # The headers go out with this first write, through aiohttp; after it, the body is
    # the stream's alone (no compression), so news may bypass the response object.
    await write(b"retry: 1000\n\n")
    direct = send if request.method == "GET" and not response.compression else None
    with request.app[CACHE].subscribe(wanted) as sub:
        while True:
            if sub.queue.empty():
                sub.send = direct
            try:
                async with asyncio.timeout(heartbeat_s):
                    message = await sub.queue.get()
            except TimeoutError:
                message = b": heartbeat\n\n"
            # Nothing overtakes what this task writes: news waits in the queue meanwhile.
            sub.send = None
            if message is None:
                return
            await write(message)
