"""An OPC UA session (asyncua) that follows its service, the comm server of a pair, to
the valid server, and keeps its subscriptions across the move.

The comm servers of both nodes serve the same address space; only the active one's
data and writes count. The registry publishes the active's endpoint (protocol
``opcua``); when a newer one is published, the session to the old server is closed and
one is opened to the new server, on which every subscription is created again: the
callbacks go on receiving data changes, the first one being each node's value on the
new server.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import math
import random
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncua.ua as _ua
from asyncua.client.client import Client as _Client
from asyncua.client.ua_client import UaClientState as _State

from hapair.shared.client.backoff import Backoff
from hapair.shared.client.errors import ClientError, EndpointChanged, OutcomeUnknown
from hapair.shared.client.models import Endpoint
from hapair.shared.client.reconnect import Reconnecting
from hapair.shared.client.resolver import Resolver
from hapair.shared.log import EventLog
from hapair.shared.opcua_security import ClientSecurity as ClientSecurity
from hapair.shared.plcs import node_id_problem
from hapair.shared.waits import cancelled

# asyncua's names are typed, but most count as not re-exported under mypy --strict.
ua: Any = _ua
Client: Any = _Client
CONNECTED: Any = _State.CONNECTED

COMM_NAMESPACE = "urn:hapair:comm"
"""The comm server's namespace: its tags are ``s={plc}.{tag}`` there."""

_EXPANDED = re.compile(r"nsu=([^;]+);(.+)", re.DOTALL)

log = EventLog("hapair.client")


class NodeNotFound(ClientError):
    """A node the caller named does not resolve on the server (unknown namespace or
    node id)."""


@dataclass(frozen=True, slots=True)
class DataChange:
    """One notification: ``node`` as given to :meth:`OpcUaAdapter.subscribe`, its
    ``value``, the whole ``data`` (a ``ua.DataValue``: status and timestamps) and the
    ``endpoint`` of the server it came from."""

    node: str
    value: Any
    data: Any
    endpoint: Endpoint


Callback = Callable[[DataChange], Awaitable[None] | None]


@dataclass(eq=False)
class Subscription:
    """A subscription of the adapter, alive across moves until unsubscribed."""

    id: int
    nodes: tuple[str, ...]
    callback: Callable[[DataChange], Any]
    period_ms: float
    active: bool = True

    async def deliver(self, change: DataChange) -> None:
        if not self.active:
            return
        try:
            result = self.callback(change)
            if inspect.isawaitable(result):
                await result
        except Exception as err:  # the caller's bug must not stop the other callbacks
            log.exception("subscription callback failed", err, node=change.node)


def tag(key: str) -> str:
    """The node of a comm server's tag, ``press-1.speed``, whatever namespace index
    each server gives ``urn:hapair:comm``."""
    return f"nsu={COMM_NAMESPACE};s={key}"


def check_node(node: str) -> None:
    """ValueError naming what is wrong with a node given by a caller."""
    expanded = _EXPANDED.fullmatch(node)
    rest = expanded.group(2) if expanded else node
    if expanded and rest.startswith("ns="):
        raise ValueError(f"{node!r}: give the namespace by URI (nsu=) or by index (ns=), not both")
    problem = node_id_problem(rest)
    if problem is not None:
        raise ValueError(f"{problem} (or by namespace URI: nsu=URI;s=...)")


@dataclass(eq=False)
class OpcUaConnection:
    """One asyncua session to one server, with the adapter's subscriptions on it."""

    client: Any
    endpoint: Endpoint
    namespaces: list[str] = field(default_factory=list)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    subscriptions: dict[int, Any] = field(default_factory=dict)
    """The asyncua subscription of each of ours here (None: none of its nodes is)."""

    def node_id(self, node: str) -> Any:
        expanded = _EXPANDED.fullmatch(node)
        if expanded is None:
            return ua.NodeId.from_string(node)
        uri, rest = expanded.groups()
        try:
            index = self.namespaces.index(uri)
        except ValueError:
            raise NodeNotFound(
                f"{node}: {self.endpoint.describe()} has no namespace {uri}"
            ) from None
        return ua.NodeId.from_string(f"ns={index};{rest}")

    def node(self, node: str) -> Any:
        return self.client.get_node(self.node_id(node))

    async def add(self, sub: Subscription, first: bool) -> None:
        """Create ``sub`` here unless it already is; ``first``: the caller is waiting,
        so a node the server does not have is an error (else a warning: a new server
        may lack a node the old one had, the others go on)."""
        if sub.id in self.subscriptions:
            return
        names: dict[Any, str] = {}
        failed = []
        for name in sub.nodes:
            try:
                names.setdefault(self.node_id(name), name)
            except NodeNotFound as err:
                failed.append(str(err))
        created = None
        if names and not (failed and first):
            created = await self.client.create_subscription(
                sub.period_ms, _Forward(self, sub, names)
            )
            try:
                nodes = [self.client.get_node(n) for n in names]
                results = await created.subscribe_data_change(nodes, queuesize=0)
            except BaseException:
                with contextlib.suppress(Exception):
                    await created.delete()
                raise
            failed += [
                f"{name}: {ua.StatusCode(r.value).name}"
                for name, r in zip(names.values(), results, strict=True)
                if isinstance(r, ua.StatusCode)
            ]
        where = self.endpoint.describe()
        if failed and first:
            if created is not None:
                with contextlib.suppress(Exception):
                    await created.delete()
            raise NodeNotFound(f"cannot subscribe at {where}: " + "; ".join(failed))
        if failed:
            log.warning(
                "nodes not subscribed on the new server", at=where, failed="; ".join(failed)
            )
        self.subscriptions[sub.id] = created

    async def remove(self, sub: Subscription) -> None:
        created = self.subscriptions.pop(sub.id, None)
        if created is not None:
            await created.delete()

    def usable(self) -> bool:
        return not self.closed and not self.lost.is_set() and self.client.state is CONNECTED


class _Forward:
    """asyncua's handler for one subscription on one connection: notifications go to
    the adapter's subscription, unless the connection was given up meanwhile (a late
    one from the old server must not follow the new server's)."""

    def __init__(self, conn: OpcUaConnection, sub: Subscription, names: dict[Any, str]) -> None:
        self.conn = conn
        self.sub = sub
        self.names = names

    async def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        name = self.names.get(node.nodeid)
        if self.conn.closed or name is None:
            return
        await self.sub.deliver(DataChange(name, val, data.monitored_item.Value, self.conn.endpoint))

    def status_change_notification(self, status: Any) -> None:
        # The server dropped the subscription (timeout, shutdown): start afresh.
        if not status.Status.is_good():
            self.conn.lost.set()


class OpcUaAdapter(Reconnecting[OpcUaConnection]):
    """An asyncua session to wherever the service is now, with subscriptions that
    survive a move.

    ```python
    async with Resolver(registries) as resolver, OpcUaAdapter(resolver, "comm") as opc:
        speed = await opc.read_value(tag("press-1.speed"))
        await opc.write(tag("press-1.speed"), 12.5)
        await opc.subscribe([tag("press-1.speed")], on_change, period_ms=100)
    ```

    Nodes are strings: ``ns=2;s=Oven.Temp``, ``i=2267``, or ``nsu=URI;s=...`` (resolved
    on each server: the two servers of a pair may number their namespaces apart);
    :func:`tag` gives the latter for a comm server's tag. Reads are made again on a new
    connection when the connection is lost or the service moves meanwhile, until
    ``deadline_s``. A write is sent once: a lost connection before its answer raises
    :class:`OutcomeUnknown`; a server that answers ``BadInvalidState`` (a comm server
    that is not, not yet or no longer, the active) has not written, so the write is sent
    again, with back-off, to the new active once it is published, else to the same
    server (a new active refuses until it has claimed the role), until ``deadline_s``;
    then the refusal is raised. Subscriptions are kept by a
    background task that reconnects, with bounded back-off, whenever the connection
    is lost or a newer endpoint is published, and creates them again on the new
    server; ``subscription_error`` says why they are not delivered, while they are
    not.

    A comm server with its security on (the default) takes sessions over a signed
    channel only: give ``security`` (this client's certificate and key, the CA that
    issued the servers' certificates, the policy and mode) and a ``user`` with its
    ``password``, or a certificate whose CN is a user of the server's users file.
    """

    def __init__(
        self,
        resolver: Resolver,
        service: str,
        *,
        path: str = "/",
        deadline_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        request_timeout_s: float = 2.0,
        watchdog_s: float = 0.5,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        security: ClientSecurity | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        if security is not None:
            security.check()  # a wrong file is the caller's mistake: said now, once
        self.security = security
        self.user = user
        self.password = password
        super().__init__(
            resolver,
            service,
            deadline_s=deadline_s,
            connect_timeout_s=connect_timeout_s,
            backoff=backoff,
            rng=rng,
        )
        self.path = path if path.startswith("/") else "/" + path
        self.request_timeout_s = request_timeout_s
        self.watchdog_s = watchdog_s
        self.subscription_error: str | None = None
        """Why subscriptions are not being delivered now, or None."""
        self._subs: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._keeper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # ---- use ------------------------------------------------------------------------

    async def read(self, node: str) -> Any:
        """The node's ``ua.DataValue``, bad status included (check ``StatusCode``)."""
        check_node(node)
        return await self.run(lambda c: c.node(node).read_data_value(raise_on_bad_status=False))

    async def read_value(self, node: str) -> Any:
        """The node's value; asyncua's ``UaStatusCodeError`` for a bad status."""
        check_node(node)
        return await self.run(lambda c: c.node(node).read_value())

    async def write(self, node: str, value: Any, variant_type: Any = None) -> None:
        """Write once (``variant_type``: a ``ua.VariantType``; else asyncua infers it)."""
        check_node(node)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        delays: Iterator[float] | None = None
        while True:
            conn = await self._connection(deadline)
            # Nothing awaits between the check of the connection and the send: a
            # failure from here on may come after the server applied the write.
            try:
                await conn.node(node).write_value(value, variant_type)
                return
            except ua.UaStatusCodeError as err:
                if err.code != ua.StatusCodes.BadInvalidState:
                    raise
                # Not the active, not yet or no longer: nothing was written. Write again
                # after a back-off, to the new active once it is published, else to the
                # same server: a new active's comm server refuses writes until it has
                # claimed the role, a moment after its endpoint is out.
                delays = delays or self.backoff.delays(self.rng)
                left = deadline - loop.time()
                if left <= 0:
                    raise
                newer = await self.resolver.newer(
                    self.service, conn.endpoint, min(next(delays), left)
                )
                if newer is None and loop.time() >= deadline:
                    raise
            except (OSError, TimeoutError, EndpointChanged) as err:
                await self._drop(err, conn)
                raise OutcomeUnknown(self.service, f"write of {node}", conn.endpoint, err) from err

    async def subscribe(
        self, nodes: str | Sequence[str], callback: Callback, *, period_ms: float = 100.0
    ) -> Subscription:
        """Call ``callback(DataChange)`` for every change of ``nodes``, on whichever
        server is valid, until :meth:`unsubscribe`. The first call for each node
        brings its current value, again after each move."""
        names = (nodes,) if isinstance(nodes, str) else tuple(nodes)
        if not names:
            raise ValueError("subscribe needs at least one node")
        for name in names:
            check_node(name)
        if period_ms <= 0:
            raise ValueError(f"period_ms must be positive, not {period_ms}")
        sub = Subscription(next(self._ids), names, callback, period_ms)
        # Made once before it is kept, so that a node the server lacks is the caller's
        # error; then kept (every new connection makes it) and made on the connection
        # of the moment, should the service have moved meanwhile.
        await self.run(lambda c: c.add(sub, first=True))
        self._subs[sub.id] = sub
        try:
            await self.run(lambda c: c.add(sub, first=False))
        except BaseException:
            sub.active = False
            del self._subs[sub.id]
            raise
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep(), name=f"keep-{self.service}")
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        sub.active = False
        self._subs.pop(sub.id, None)
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.request_timeout_s):
                    await conn.remove(sub)

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subs.values())

    # ---- Reconnecting ---------------------------------------------------------------

    async def _open(self, endpoint: Endpoint, timeout: float) -> OpcUaConnection:
        client = Client(
            f"opc.tcp://{endpoint.address}{self.path}",
            timeout=self.request_timeout_s,
            watchdog_intervall=self.watchdog_s,
        )
        if self.user is not None:
            client.set_user(self.user)
            client.set_password(self.password or "")
        conn = OpcUaConnection(client, endpoint)

        async def lost(err: Exception) -> None:
            conn.lost.set()

        client.connection_lost_callback = lost
        try:
            if self.security is not None:  # asks the server for its certificate first
                await self.security.apply(client)
            await client.connect()
            conn.namespaces = list(await client.get_namespace_array())
            for sub in list(self._subs.values()):
                await conn.add(sub, first=False)
        except BaseException:
            self._retire(conn)
            raise
        return conn

    async def _close(self, conn: OpcUaConnection, why: Exception) -> None:
        self._retire(conn)

    def _usable(self, conn: OpcUaConnection) -> bool:
        return conn.usable()

    def _connect_failed(self, err: BaseException) -> bool:
        return isinstance(err, OSError | TimeoutError | ua.UaError)

    def _connection_lost(self, err: BaseException, conn: OpcUaConnection) -> bool:
        return isinstance(err, OSError | TimeoutError | EndpointChanged) or not conn.usable()

    async def _release(self) -> None:
        if self._keeper is not None:
            await cancelled(self._keeper)
            self._keeper = None
        await super()._release()
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task

    # ---- inside ---------------------------------------------------------------------

    def _retire(self, conn: OpcUaConnection) -> None:
        """Give ``conn`` up at once (no notification from it is delivered any more) and
        close its session in the background: an old server that is still up should
        not keep it, and nobody should wait for one that is not."""
        if conn.closed:
            return
        conn.closed = True
        conn.lost.set()
        task = asyncio.create_task(self._disconnect(conn), name=f"close-{conn.endpoint.node}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _disconnect(self, conn: OpcUaConnection) -> None:
        try:
            async with asyncio.timeout(self.request_timeout_s):
                await conn.client.disconnect()
        except (Exception, TimeoutError):
            with contextlib.suppress(Exception):
                conn.client.disconnect_socket()

    async def _keep(self) -> None:
        """While there are subscriptions: a connection that has them, always."""
        delays: Iterator[float] | None = None
        while self._subs:
            try:
                conn = await self.connection()
            except (ClientError, ValueError) as err:
                if self.subscription_error != str(err):
                    log.warning(
                        "subscriptions not delivered; retrying",
                        service=self.service,
                        error=str(err),
                    )
                self.subscription_error = str(err)
                delays = delays or self.backoff.delays(self.rng)
                await asyncio.sleep(next(delays))
                continue
            if self.subscription_error is not None:
                log.info("subscriptions delivered again", endpoint=conn.endpoint.describe())
            delays, self.subscription_error = None, None
            # A move is waited for here too, not only by the watcher: subscriptions
            # must follow it even while the watcher is being started again.
            lost = asyncio.ensure_future(conn.lost.wait())
            moved = asyncio.ensure_future(
                self.resolver.newer(self.service, conn.endpoint, math.inf)
            )
            try:
                await asyncio.wait({lost, moved}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (lost, moved):
                    task.cancel()
                await asyncio.wait({lost, moved})
            newer = moved.result() if moved.done() and not moved.cancelled() else None
            if newer is not None:
                await self._drop(EndpointChanged(conn.endpoint, newer), conn)
