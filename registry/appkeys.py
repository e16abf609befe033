"""Typed application state of the registry's aiohttp app."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from registry.cache import SiteCache
from shared.store import Store


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    heartbeat_s: float = 15.0
    """Comment lines on idle event streams keep proxies and clients from timing out."""
    admin_token_hashes: frozenset[str] = field(default_factory=frozenset)
    """SHA-256 hex digests of the bearer tokens the admin routes accept; none = open."""
    events_keep_days: float = 90.0
    """Events older than this are deleted (every registry does it; deleting is idempotent)."""


CACHE = web.AppKey("cache", SiteCache)
STORE = web.AppKey("store", Store)
CONFIG = web.AppKey("config", RegistryConfig)
