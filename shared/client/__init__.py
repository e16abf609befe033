"""The client library: find where a service is now and follow it when it moves.

- :class:`Resolver` asks the registries (one or several URLs) and follows their event
  stream; it never goes back to an older answer (ordered by epoch, then by the etcd
  revision that published the endpoint), leaves a registry that lags for another, and
  keeps the last endpoint, marked stale, while no registry answers.
- Reconnecting adapters built on it: :class:`TcpAdapter` (asyncio streams),
  :class:`HttpAdapter` (aiohttp), :class:`PgAdapter` (psycopg 3, async) and
  :class:`OpcUaAdapter` (asyncua, keeping its subscriptions across a move). Each one
  moves its connection to the new endpoint by itself, retries with bounded exponential
  back-off and jitter, and raises :class:`DeadlineExceeded` instead of hanging.
- ``hapair-proxy`` (:mod:`hapair.shared.client.proxy`) for clients that cannot be changed.
"""

from typing import TYPE_CHECKING

from hapair.shared.client.backoff import Backoff
from hapair.shared.client.errors import (
    ClientError,
    DeadlineExceeded,
    EndpointChanged,
    OutcomeUnknown,
    RegistryUnavailable,
    ServiceUnavailable,
    UnknownService,
)
from hapair.shared.client.http import HttpAdapter
from hapair.shared.client.models import Endpoint
from hapair.shared.client.resolver import Resolver, ServiceState
from hapair.shared.client.tcp import Connection, TcpAdapter

if TYPE_CHECKING:
    from hapair.shared.client.opcua import (
        ClientSecurity,
        DataChange,
        OpcUaAdapter,
        Subscription,
        tag,
    )
    from hapair.shared.client.pg import PgAdapter

# Loaded on first use: asyncua would add about 0.2 s to every import of this package,
# the operator CLI's among them, and a client without the `pg` or `opcua` extra has
# neither psycopg nor asyncua.
_LAZY = {
    "PgAdapter": "pg",
    **dict.fromkeys(
        ("ClientSecurity", "DataChange", "OpcUaAdapter", "Subscription", "tag"), "opcua"
    ),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Backoff",
    "ClientError",
    "ClientSecurity",
    "Connection",
    "DataChange",
    "DeadlineExceeded",
    "Endpoint",
    "EndpointChanged",
    "HttpAdapter",
    "OpcUaAdapter",
    "OutcomeUnknown",
    "PgAdapter",
    "RegistryUnavailable",
    "Resolver",
    "ServiceState",
    "ServiceUnavailable",
    "Subscription",
    "TcpAdapter",
    "UnknownService",
    "tag",
]
