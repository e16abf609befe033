"""The client library: find where a service is now and follow it when it moves.

- :class:`Resolver` asks the registries (one or several URLs) and follows their event
  stream; it never goes back to an older epoch and keeps the last endpoint, marked
  stale, while no registry answers.
- Reconnecting adapters built on it: :class:`TcpAdapter` (asyncio streams),
  :class:`HttpAdapter` (aiohttp) and :class:`PgAdapter` (psycopg 3, async). Each one
  moves its connection to the new endpoint by itself, retries with bounded exponential
  back-off and jitter, and raises :class:`DeadlineExceeded` instead of hanging.
- ``hapair-proxy`` (:mod:`shared.client.proxy`) for clients that cannot be changed.
"""

from shared.client.backoff import Backoff
from shared.client.errors import (
    ClientError,
    DeadlineExceeded,
    EndpointChanged,
    RegistryUnavailable,
    ServiceUnavailable,
    UnknownService,
)
from shared.client.http import HttpAdapter
from shared.client.models import Endpoint
from shared.client.pg import PgAdapter
from shared.client.resolver import Resolver, ServiceState
from shared.client.tcp import Connection, TcpAdapter

__all__ = [
    "Backoff",
    "ClientError",
    "Connection",
    "DeadlineExceeded",
    "Endpoint",
    "EndpointChanged",
    "HttpAdapter",
    "PgAdapter",
    "RegistryUnavailable",
    "Resolver",
    "ServiceState",
    "ServiceUnavailable",
    "TcpAdapter",
    "UnknownService",
]
