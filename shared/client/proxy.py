"""``hapair-proxy``: a TCP forwarder for clients that cannot be changed.

Run it next to a client that knows one fixed address (an old HMI, a vendor MES client)
and point the client at it::

    hapair-proxy --service mes-api --listen 127.0.0.1:8080 --registry http://reg1:8700,http://reg2:8700

Each new connection goes to the service's valid server of the moment. When a newer
endpoint is published, the connections still open to the old one are closed at once
(the client sees its connection drop and reconnects, through the proxy, to the new
server), so no client stays attached to a server that was fenced. A connection made
while the service has no valid server waits for one up to ``--deadline`` seconds and
is then closed.

Bytes are forwarded by two asyncio protocols per connection, with flow control in both
directions (a slow reader slows the writer down, nothing piles up in the proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import cast

from hapair.shared import event_loop
from hapair.shared import log as logs
from hapair.shared.client.backoff import Backoff
from hapair.shared.client.command import add_registry_ca
from hapair.shared.client.errors import ClientError
from hapair.shared.client.models import Endpoint
from hapair.shared.client.reconnect import follow_moves, reach
from hapair.shared.client.registries import parse_registries, registry_ssl
from hapair.shared.client.resolver import Resolver
from hapair.shared.entry import add_version
from hapair.shared.network import listen_address
from hapair.shared.waits import cancelled

log = logs.EventLog("hapair.proxy")


class _Side(asyncio.Protocol):
    """One socket of a forwarded connection; what it reads goes to its peer."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.early: list[bytes] = []  # read before the two sides were paired

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (uvloop's are not asyncio.Transport subclasses).
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            # uvloop starts reading after connection_made, whatever it paused there.
            self.early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None:
            return True  # forwarded once the two sides are paired
        if peer is None or peer.transport is None or peer.eof:
            self.link.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True  # the other direction may still carry data

    # Flow control: when our socket's send buffer fills, stop reading the peer.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close()


class _ClientSide(_Side):
    """The client's socket: read nothing from it until its server is connected."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        self.link.task = asyncio.get_running_loop().create_task(self.link.proxy._connect(self.link))


class _Link:
    """A client connection and, once made, its connection to the service."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.client = _ClientSide(self)
        self.server: _Side | None = None
        self.endpoint: Endpoint | None = None
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    def close(self, abort: bool = False) -> None:
        """Close both sockets (``abort``: at once, dropping what is not sent yet)."""
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.server):
            if side is not None and side.transport is not None:
                if abort:
                    side.transport.abort()
                else:
                    side.transport.close()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.proxy._forget(self)


class Proxy:
    """Forwards connections on ``listen`` to wherever ``service`` is now."""

    def __init__(
        self,
        resolver: Resolver,
        service: str,
        *,
        deadline_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.resolver = resolver
        self.service = service
        self.deadline_s = deadline_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff = backoff or Backoff()
        self.links: set[_Link] = set()
        self.server: asyncio.Server | None = None
        self._stack = contextlib.AsyncExitStack()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        await self._stack.enter_async_context(self.resolver.following(self.service))
        self._watcher = asyncio.create_task(
            follow_moves(self.resolver, self.service, self._moved, self.backoff),
            name="proxy-follow",
        )
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._accept, host, port, backlog=1024, reuse_address=True
        )

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for link in list(self.links):
            link.close(abort=True)
        if self._watcher is not None:
            await cancelled(self._watcher)
        if self.server is not None:
            await self.server.wait_closed()
        await self._stack.aclose()

    # ---- connections ----------------------------------------------------------------

    def _accept(self) -> _Side:
        link = _Link(self)
        self.links.add(link)
        return link.client

    async def _connect(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()

        async def attempt(endpoint: Endpoint) -> _Side:
            server = _Side(link)
            await loop.create_connection(lambda: server, endpoint.host, endpoint.port)
            return server

        async def discard(server: _Side) -> None:
            if server.transport is not None:
                server.transport.abort()

        try:
            server, endpoint = await reach(
                self.resolver,
                self.service,
                attempt,
                deadline_s=self.deadline_s,
                attempt_timeout_s=self.connect_timeout_s,
                retryable=lambda err: isinstance(err, OSError | TimeoutError),
                backoff=self.backoff,
                discard=discard,
            )
        except ClientError as err:
            log.warning("closing a client connection", service=self.service, why=str(err))
            link.close()
            return
        if link.closed:  # the client left meanwhile
            await discard(server)
            return
        current = self.resolver.current(self.service)
        if current is not None and current.newer_than(endpoint):
            await discard(server)  # moved just now: the client will come back
            link.close()
            return
        link.server, link.endpoint = server, endpoint
        # Either side may have spoken first (a server's banner, as in SMTP or FTP, is
        # sent the moment the connection is made): pass on what each one said.
        _pair(link.client, server)

    def _forget(self, link: _Link) -> None:
        self.links.discard(link)

    async def _moved(self, endpoint: Endpoint) -> None:
        """On each newer endpoint, close the connections still open to older ones."""
        old = [
            link
            for link in self.links
            if link.endpoint is not None and endpoint.newer_than(link.endpoint)
        ]
        for link in old:
            link.close(abort=True)
        log.info(
            "endpoint",
            service=self.service,
            node=endpoint.node,
            at=endpoint.address,
            epoch=endpoint.epoch,
            closed=len(old),
        )


def _pair(client: _Side, server: _Side) -> None:
    """Forward between ``client`` and ``server`` from now on: first what each one read
    before they were paired, then its half-close; then let them read again."""
    sides = ((client, server), (server, client))
    for side, peer in sides:
        assert side.transport is not None and peer.transport is not None
        side.peer = peer
        for data in side.early:
            peer.transport.write(data)
        side.early.clear()
    if client.eof and server.eof:
        client.link.close()
        return
    for side, peer in sides:
        assert side.transport is not None and peer.transport is not None
        if not side.eof:
            side.transport.resume_reading()
        elif peer.transport.can_write_eof():
            peer.transport.write_eof()


# ---- the command ----------------------------------------------------------------------


def _listen(value: str) -> tuple[str, int]:
    try:
        return listen_address(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600 seconds")
    return seconds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hapair-proxy",
        description="Forward TCP connections to the valid server of a hapair service.",
    )
    add_version(p)
    p.add_argument("--service", required=True, help="the service's name in the site file")
    p.add_argument("--listen", required=True, type=_listen, help="HOST:PORT to accept on")
    p.add_argument(
        "--registry",
        default=os.environ.get("HAPAIR_REGISTRY"),
        help="registries URL[,URL...] (default: $HAPAIR_REGISTRY)",
    )
    add_registry_ca(p)
    p.add_argument(
        "--deadline",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="how long a new connection waits for a valid server before it is closed (10)",
    )
    p.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="bound of one connection attempt to the server (2)",
    )
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=("debug", "info", "warning", "error"),
        default=os.environ.get("HAPAIR_LOG_LEVEL", "info").lower(),
        help="debug, info, warning or error (default: $HAPAIR_LOG_LEVEL, else info)",
    )
    return p


async def serve(args: argparse.Namespace, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Resolver(args.registry, registry_ca=args.registry_ca) as resolver:
        proxy = Proxy(
            resolver,
            args.service,
            deadline_s=args.deadline,
            connect_timeout_s=args.connect_timeout,
        )
        try:
            await proxy.start(host, port)
            log.info(
                "listening",
                service=args.service,
                listen=f"{host}:{proxy.port}",
                registry=",".join(resolver.urls),
            )
            await stop.wait()
            log.info("stopping", connections=len(proxy.links))
        finally:
            await proxy.close()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not args.registry:
        sys.exit(
            "hapair-proxy: no registry given: use --registry URL[,URL...] or set HAPAIR_REGISTRY"
        )
    try:
        parse_registries(args.registry)
        registry_ssl(args.registry_ca)
    except ValueError as err:
        print(f"hapair-proxy: {err}", file=sys.stderr)
        sys.exit(2)
    logs.setup(args.log_level)
    host, port = args.listen
    try:
        event_loop.run(serve(args, host, port))
    except OSError as err:
        sys.exit(f"hapair-proxy: cannot listen on {host}:{port}: {err.strerror or err}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
