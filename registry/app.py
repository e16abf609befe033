"""The registry's aiohttp application: state, routes and the watch task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from hapair.registry.appkeys import (
    BACKGROUND,
    CACHE,
    CONFIG,
    READERS,
    SERVED,
    STORE,
    Background,
    Readers,
    RegistryConfig,
    Served,
)
from hapair.registry.cache import SiteCache
from hapair.registry.errors import domain_errors, log
from hapair.registry.openapi import add_routes
from hapair.registry.routes import ROUTES
from hapair.shared.admin import prune_events
from hapair.shared.pki import TlsFiles
from hapair.shared.store import Store, StoreError, bounded


def create_app(
    etcd: str,
    config: RegistryConfig | None = None,
    etcd_timeout_s: float = 1.0,
    tls: TlsFiles | None = None,
) -> web.Application:
    """The app for etcd at ``etcd`` (``URL[,URL...]``); nothing connects until startup."""
    store = Store(etcd, timeout=etcd_timeout_s, tls=tls)
    app = web.Application(middlewares=[domain_errors])
    app[STORE] = store
    app[CONFIG] = config = config or RegistryConfig()
    app[CACHE] = SiteCache(store, stale_streams_s=config.stale_streams_s)
    app[READERS] = Readers()
    app[SERVED] = Served()
    app[BACKGROUND] = Background()
    add_routes(app, ROUTES)
    app.cleanup_ctx.append(_watch)
    app.cleanup_ctx.append(_retention)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_end_streams)
    return app


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request its HTTP parser refused (and answered 400) as an error with
    a traceback, which reads as the registry's bug; it is the client's: one warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        refused = record.exc_info[1] if record.exc_info else None
        if not isinstance(refused, HttpProcessingError):
            return True
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
        log.warning("malformed request refused", peer=peer, error=" ".join(refused.message.split()))
        return False


def runner(app: web.Application) -> web.AppRunner:
    """The runner ``hapair-registry`` serves ``app`` with."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequests) for f in server_log.filters):
        server_log.addFilter(_MalformedRequests())
    return web.AppRunner(
        app,
        # Access logs cost more than a lookup itself; failures are logged where they happen.
        access_log=None,
        handle_signals=False,
        shutdown_timeout=2.0,
        # aiohttp closes a connection whose request has not arrived whole this long after
        # it opened or after its previous answer: a client that opens connections and
        # never finishes its headers holds none for long.
        keepalive_timeout=app[CONFIG].header_timeout_s,
        # A client that leaves ends its handler: an event stream or a long-poll gives
        # its place back then, not when the registry next writes to it (a heartbeat up
        # to 300 s away, a poll's wait_s). An admin request cut off this way may have
        # been carried out or not, as its client, gone, already cannot know.
        handler_cancellation=True,
    )


async def _watch(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[CACHE].run(), name="etcd-mirror")
    yield
    task.cancel()
    # A gRPC call to an unreachable etcd may not notice the cancel: shutdown must not wait.
    await bounded(task, 2.0)
    await app[STORE].close()


async def _retention(app: web.Application) -> AsyncIterator[None]:
    """Keep the audit trail to its configured age, checked once an hour."""

    async def prune() -> None:
        while True:
            with contextlib.suppress(StoreError):
                await prune_events(app[STORE], app[CONFIG].events_keep_days * 86400)
            await asyncio.sleep(3600)

    task = asyncio.create_task(prune(), name="event-retention")
    yield
    task.cancel()
    await bounded(task, 1.0)


async def _background(app: web.Application) -> AsyncIterator[None]:
    """Work still running at shutdown (a rollout) is cancelled: its etcd key lapses with
    its lease, and the pair stays as the steps done so far left it."""
    yield
    tasks = set(app[BACKGROUND].tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        await bounded(task, 2.0)


async def _end_streams(app: web.Application) -> None:
    # Event streams never end by themselves; without this, shutdown waits for them.
    app[CACHE].close_streams()
