"""``GET /v1/events``: server-sent events of endpoint, role, node, topology and events.

A stream starts with the current state (topology, every pair's role, every endpoint
answer), so a client that subscribes first needs no separate lookup, then carries each
change as it is seen. Idle streams get a comment line every ``heartbeat_s``.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from registry.appkeys import CACHE, CONFIG

HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def events(request: web.Request) -> web.StreamResponse:
    cache, heartbeat_s = request.app[CACHE], request.app[CONFIG].heartbeat_s
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
