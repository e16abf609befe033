"""A PostgreSQL connection (psycopg 3, async) that follows its database to the valid
server."""

from __future__ import annotations

import math
import random
from typing import Any

import psycopg
from psycopg import pq

from hapair.shared.client.backoff import Backoff
from hapair.shared.client.errors import EndpointChanged
from hapair.shared.client.models import Endpoint
from hapair.shared.client.reconnect import Reconnecting
from hapair.shared.client.resolver import Resolver

KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}
"""A server that vanished without closing the socket is noticed within ~11 s."""


class PgAdapter(Reconnecting[psycopg.AsyncConnection[Any]]):
    """An :class:`psycopg.AsyncConnection` to wherever the database endpoint is now.

    ``conninfo`` and ``connect_kwargs`` are passed to ``AsyncConnection.connect`` (user,
    dbname, password, ...); host and port come from the endpoint. ``await
    pg.run(work)`` runs ``work(conn)`` and runs it again on a new connection when the
    connection is lost (or the endpoint moves) meanwhile, so ``work`` must be a whole
    transaction that is safe to repeat: a transaction whose COMMIT answer was lost has
    committed, and runs again. ``await pg.run_once(work)`` runs it at most once and
    raises :class:`OutcomeUnknown` when the connection is lost during it.

    When a newer endpoint is published an idle connection is closed at once; one
    running a query is left to finish or fail (the old server is fenced) and replaced
    before its next use.
    """

    def __init__(
        self,
        resolver: Resolver,
        service: str,
        *,
        conninfo: str = "",
        deadline_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        backoff: Backoff | None = None,
        close_on_change: bool = True,
        rng: random.Random | None = None,
        **connect_kwargs: Any,
    ) -> None:
        super().__init__(
            resolver,
            service,
            deadline_s=deadline_s,
            connect_timeout_s=connect_timeout_s,
            backoff=backoff,
            close_on_change=close_on_change,
            rng=rng,
        )
        self.conninfo = conninfo
        self.connect_kwargs: dict[str, Any] = {**KEEPALIVES, **connect_kwargs}

    async def _open(self, endpoint: Endpoint, timeout: float) -> psycopg.AsyncConnection[Any]:
        # libpq's own connect_timeout is whole seconds, at least 2: the race around
        # this call enforces ``timeout`` itself.
        return await psycopg.AsyncConnection.connect(
            self.conninfo,
            **{
                **self.connect_kwargs,
                "host": endpoint.host,
                "port": endpoint.port,
                "connect_timeout": max(2, math.ceil(timeout)),
            },
        )

    async def _close(self, conn: psycopg.AsyncConnection[Any], why: Exception) -> None:
        await conn.close()

    async def _changed(self, conn: psycopg.AsyncConnection[Any], why: EndpointChanged) -> None:
        if conn.info.transaction_status != pq.TransactionStatus.ACTIVE:
            await self._drop(why, conn)

    def _usable(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        return not conn.closed and not conn.broken

    def _connect_failed(self, err: BaseException) -> bool:
        return isinstance(err, psycopg.OperationalError | OSError | TimeoutError)

    def _connection_lost(self, err: BaseException, conn: psycopg.AsyncConnection[Any]) -> bool:
        if isinstance(err, EndpointChanged):
            return True
        return isinstance(err, psycopg.OperationalError) and (conn.closed or conn.broken)
