"""What a protocol driver offers the poller: read every tag over one path, probe a path,
write one tag. One error type per outcome, so the poller decides in one place."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from comm_server.codec import Value
from comm_server.tags import TagTable


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
