"""``GET /v1/events``: server-sent events of endpoint, role, node, topology and events.

A stream starts with the current state (topology, every pair's role, every endpoint
answer), so a client that subscribes first needs no separate lookup, then carries each
change as it is seen. A client that reconnects, here or to another registry, thus
resumes from the current state. Idle streams get a comment line every ``heartbeat_s``
(``?heartbeat_s=S`` asks for another period, so a client can tell a silent registry
from a dead one sooner).

A registry out of touch with etcd could only stream old news: it refuses new streams
with ``503`` and ends the open ones (see ``SiteCache``), so that clients follow another
registry.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from registry.appkeys import CACHE, CONFIG
from registry.errors import error, validate

HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class StreamQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heartbeat_s: float | None = Field(None, ge=0.5, le=300, allow_inf_nan=False)


async def events(request: web.Request) -> web.StreamResponse:
    cache = request.app[CACHE]
    query = validate(StreamQuery, dict(request.query), "query parameter")
    heartbeat_s = query.heartbeat_s or request.app[CONFIG].heartbeat_s
    if not cache.synced:
        return error(
            503, f"registry is not in touch with etcd ({cache.mirror.error or 'starting'})"
        )
    response = web.StreamResponse(headers=HEADERS)
    await response.prepare(request)
    try:
        await response.write(b"retry: 1000\n\n")
        with cache.subscribe() as sub:
            while True:
                try:
                    async with asyncio.timeout(heartbeat_s):
                        message = await sub.queue.get()
                except TimeoutError:
                    await response.write(b": heartbeat\n\n")
                    continue
                if message is None:
                    break
                await response.write(message)
    except ConnectionResetError:
        pass  # the client went away; its subscription is gone with the block above
    return response
