"""A TCP connection (asyncio streams) that follows its service to the valid server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hapair.shared.client.errors import EndpointChanged
from hapair.shared.client.models import Endpoint
from hapair.shared.client.reconnect import Reconnecting


@dataclass(frozen=True, slots=True)
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    endpoint: Endpoint


class TcpAdapter(Reconnecting[Connection]):
    """``(reader, writer)`` to wherever the service is now.

    ``await tcp.connection()`` gives the open connection or a new one;
    ``await tcp.run(exchange)`` runs ``exchange(connection)`` and runs it again on a new
    connection if this one is lost or the service moves meanwhile. When a newer
    endpoint is published the old connection is aborted, and a read pending on it
    raises :class:`EndpointChanged` (a lost connection raises the usual ``OSError`` or
    ``IncompleteReadError``).

    ```python
    async with Resolver("http://registry:8700") as resolver, \\
            TcpAdapter(resolver, "plc-gateway", deadline_s=10) as tcp:
        reply = await tcp.run(lambda c: ask(c.reader, c.writer, b"STATUS\\n"))
    ```
    """

    limit = 2**16

    async def _open(self, endpoint: Endpoint, timeout: float) -> Connection:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                endpoint.host, endpoint.port, limit=self.limit
            )
        return Connection(reader, writer, endpoint)

    async def _close(self, conn: Connection, why: Exception) -> None:
        if isinstance(why, EndpointChanged):
            conn.reader.set_exception(why)
        conn.writer.transport.abort()

    def _usable(self, conn: Connection) -> bool:
        return not conn.writer.is_closing() and not conn.reader.at_eof()

    def _connect_failed(self, err: BaseException) -> bool:
        return isinstance(err, OSError | TimeoutError)

    def _connection_lost(self, err: BaseException, conn: Connection) -> bool:
        return isinstance(err, OSError | EOFError | EndpointChanged)
