"""What a protocol driver offers the poller: read every tag over one path, probe a path,
write one tag. One error type per outcome, so the poller decides in one place.

Every connection to a PLC gives up bytes the PLC has not acknowledged after
:data:`UNACKED_LIMIT_S` (``TCP_USER_TIMEOUT``): a write allowed just before the fence
point could otherwise be retransmitted by the kernel, once a lost path comes back, long
after the other node has become the active. The role allows a write until ``ttl -
margin`` after its last acknowledged keepalive was sent, etcd drops the lease at ``ttl``
at the earliest: half the margin for the retransmissions, the other half for the last
one's way to the PLC and the step from the check to the socket.
"""

from __future__ import annotations

import asyncio
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable

from hapair.comm_server.codec import Value
from hapair.comm_server.role import FENCE_MARGIN_S
from hapair.comm_server.tags import TagTable

UNACKED_LIMIT_S = FENCE_MARGIN_S / 2


def bound_unacked(transport: asyncio.BaseTransport | None) -> None:
    """Make the kernel reset ``transport``'s connection rather than retransmit bytes
    unacknowledged for :data:`UNACKED_LIMIT_S`; OSError if it cannot (no TCP socket)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        raise OSError("the PLC connection has no socket to bound")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(UNACKED_LIMIT_S * 1000))


class PathError(Exception):
    """Nothing usable came over this path (no connection, no reply, undecodable reply).

    From :meth:`Driver.write` it also means the request was *not* sent, so another path
    may be tried."""


class WriteError(Exception):
    """The write failed, or its outcome is unknown; it must not be repeated."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


class Driver(ABC):
    """One PLC over one protocol, with a connection per path kept open between polls."""

    endpoints: list[str]
    requests: int = 0  # requests sent, for the benchmarks and tests

    @abstractmethod
    async def read(self, path: int, table: TagTable, when: float) -> None:
        """Read every tag over ``path`` into ``table`` (values stamped ``when``).

        A reply that makes sense for some tags and not for others marks those bad with a
        reason; :class:`PathError` when the path gave nothing usable."""

    @abstractmethod
    async def probe(self, path: int) -> None:
        """One small request over ``path``; :class:`PathError` if it does not answer."""

    @abstractmethod
    async def write(
        self, path: int, index: int, value: Value, may_send: Callable[[], bool]
    ) -> None:
        """Write tag ``index`` once over ``path``. ``may_send`` is asked right before the
        request goes out (the node may have lost the active role meanwhile).

        :class:`PathError`: not sent, another path may be tried. :class:`WriteError`:
        refused, failed, or sent without an answer; never to be repeated."""

    @abstractmethod
    async def close(self) -> None: ...
