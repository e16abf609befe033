"""Typed application state of the registry's aiohttp app."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from hapair.registry.cache import SiteCache
from hapair.shared.store import Store


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    heartbeat_s: float = 15.0
    """Comment lines on idle event streams keep proxies and clients from timing out."""
    admin_tokens: Mapping[str, str] = field(default_factory=dict)
    """The bearer tokens the admin routes accept: {SHA-256 hex digest: operator name}."""
    client_certs: bool = False
    """Operators' client certificates (verified by the TLS handshake) are accepted."""
    open_admin: bool = False
    """With neither tokens nor certificates, the admin routes are open to anyone (labs);
    without this, closed."""
    events_keep_days: float = 90.0
    """Events older than this are deleted (every registry does it; deleting is idempotent)."""
    max_streams: int = 2000
    """Event streams open at once; a new one beyond is refused (503, Retry-After)."""
    max_polls: int = 2000
    """Long-polls waiting at once; a new one beyond is refused (503, Retry-After)."""
    max_per_client: int = 50
    """Streams and long-polls waiting at once from one client address, together."""
    stale_streams_s: float = 5.0
    """Out of touch with etcd this long, the registry ends its event streams (they were
    told at once that its view is not current)."""
    write_timeout_s: float = 5.0
    """An event stream whose reader takes longer than this to take a message is cut off."""
    header_timeout_s: float = 10.0
    """A connection must send a request's headers within this time of opening, or of
    its previous answer; an idle connection is closed after it."""


@dataclass(slots=True)
class Readers:
    """What holds a handler and a socket until news comes: open streams, waiting polls."""

    streams: int = 0
    polls: int = 0
    by_client: Counter[str] = field(default_factory=Counter)
    """Streams and long-polls held per client address."""


@dataclass(slots=True)
class Served:
    """What the registry answered, counted for its metrics."""

    lookups: Counter[int] = field(default_factory=Counter)
    """Endpoint lookups by the HTTP status of their answer."""


@dataclass(slots=True)
class Background:
    """Work a request started that outlives it (a rollout): cancelled at shutdown."""

    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def start(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


CACHE = web.AppKey("cache", SiteCache)
STORE = web.AppKey("store", Store)
CONFIG = web.AppKey("config", RegistryConfig)
READERS = web.AppKey("readers", Readers)
SERVED = web.AppKey("served", Served)
BACKGROUND = web.AppKey("background", Background)
