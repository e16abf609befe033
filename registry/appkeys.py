"""Typed application state of the registry's aiohttp app."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from hapair.registry.cache import SiteCache
from hapair.shared.store import Store


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    heartbeat_s: float = 15.0
    """Comment lines on idle event streams keep proxies and clients from timing out."""
    admin_token_hashes: frozenset[str] = field(default_factory=frozenset)
    """SHA-256 hex digests of the bearer tokens the admin routes accept; none = open."""
    events_keep_days: float = 90.0
    """Events older than this are deleted (every registry does it; deleting is idempotent)."""
    max_streams: int = 2000
    """Event streams open at once; a new one beyond is refused (503, Retry-After)."""
    max_polls: int = 2000
    """Long-polls waiting at once; a new one beyond is refused (503, Retry-After)."""
    write_timeout_s: float = 5.0
    """An event stream whose reader takes longer than this to take a message is cut off."""


@dataclass(slots=True)
class Readers:
    """What holds a handler and a socket until news comes: open streams, waiting polls."""

    streams: int = 0
    polls: int = 0


CACHE = web.AppKey("cache", SiteCache)
STORE = web.AppKey("store", Store)
CONFIG = web.AppKey("config", RegistryConfig)
READERS = web.AppKey("readers", Readers)
