"""aetcd's client for one etcd member, as the store needs it.

What aetcd lacks and the store relies on: TLS channels, watches and lease keepalives that
require a leader (a member cut off from its quorum answers with an error instead of
silence), channel options that reconnect within the fence margin, and the raw
transaction, auth and paged range calls. Imported through ``store.py``, which sets
gRPC's environment before gRPC loads.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aetcd
import grpc
from aetcd import exceptions, rpc, watcher

from hapair.shared import etcd_tls

# gRPC waits up to 120 s between reconnection attempts by default, growing from 1 s: an
# agent would see etcd seconds after it came back. Its lease fences it within 1.5 s, so
# the channel retries every 100 to 250 ms instead.
#
# Despite its name, ``min_reconnect_backoff_ms`` is no back-off: it is the least time gRPC
# gives one connection attempt (TCP, the TLS handshake, etcd's first HTTP/2 SETTINGS)
# before it drops it and starts over; an attempt gets the longer of it and the back-off.
# Left at 100 ms, each attempt had 100-250 ms. A TLS handshake needs two of etcd's
# flights before the connection is up where plain gRPC needs one: when etcd answered
# slowly (just restarted on a loaded machine, a slow link) every attempt was dropped and
# the next started from nothing, so agents over TLS reached a restarted etcd seconds
# after the lab mode did, past their leases. An attempt that makes progress now gets
# CONNECT_TIMEOUT_MS; one that makes none (a frozen member, a lost SYN, which the kernel
# resends after 1 s anyway) is still dropped and tried again within it. A call still
# waits no longer than its own deadline; the attempt goes on past it, and the next call
# finds the connection made.
#
# HTTP/2 keepalive finds a connection whose far end went silent (a frozen member, a cut
# cable) under a quiet watch, which would otherwise wait forever: a ping unanswered
# within 2 s closes the connection and ends its calls (recent gRPC cores time pings out
# by ``ping_timeout_ms``, older ones by ``keepalive_timeout_ms``: both are set). etcd
# refuses pings more often than its --grpc-keepalive-min-time (5 s by default), and
# pings on a connection without calls unless --grpc-keepalive-permit-without-stream is
# set: either way it closes the connection (too_many_pings), and gRPC then doubles its
# ping period. So pings go every 5 s and only while calls are open (a watch always is);
# an idle connection has nothing to lose, and each call has its own deadline.
# ``max_pings_without_data`` = 0 keeps pinging a watch on which nothing changes.
MAX_MESSAGE = 64 * 1024 * 1024
CONNECT_TIMEOUT_MS = 2000
CHANNEL_OPTIONS: dict[str, int] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 250,
    "grpc.min_reconnect_backoff_ms": CONNECT_TIMEOUT_MS,
    "grpc.keepalive_time_ms": 5000,
    "grpc.keepalive_timeout_ms": 2000,
    "grpc.http2.ping_timeout_ms": 2000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
    # Above gRPC's 4 MiB default: one answer may carry many keys (reads are paged anyway).
    "grpc.max_receive_message_length": MAX_MESSAGE,
}

# What etcd's Go client sends with WithRequireLeader: a member without a leader (cut off
# from its quorum) answers such a stream with an error instead of leaving it silent.
REQUIRE_LEADER = (("hasleader", "true"),)


@dataclass
class StreamCounts:
    """Streams opened, over every client of one store (a store replaces its client when
    it moves to another member)."""

    keepalive_opened: int = 0


class MemberClient(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """aetcd's client for one member, whose watches and lease keepalives require a leader."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        tls: etcd_tls.Credentials | None = None,
        streams: StreamCounts | None = None,
    ) -> None:
        super().__init__(host, port, timeout=timeout, options=CHANNEL_OPTIONS)
        self.name = f"{host}:{port}"
        self._tls = tls
        self.streams = StreamCounts() if streams is None else streams
        # One keepalive stream per lease, and the lock that keeps one request in flight
        # on it at a time.
        self._keepalives: dict[int, Any] = {}
        self._keepalive_locks: dict[int, asyncio.Lock] = {}

    closed = False
    _handed_on = False  # its connection is its successor's now

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self.closed:
            # The store has moved on: a late call must not open this member again, on a
            # connection nobody would close.
            raise exceptions.ConnectionFailedError(f"connection to {self.name} closed")
        if self._tls is None:
            await super().connect()
            self._attach(self.channel)
        else:
            self._attach(etcd_tls.secure_channel(self.name, self._tls, CHANNEL_OPTIONS))

    def _attach(self, channel: Any) -> None:
        """The base class's stubs on ``channel`` (it opens only plain ones; no password
        token: over TLS the client certificate is the identity) and a watch stream of
        this client's own. The base class builds its watcher without metadata; this one,
        in place before anything could use it (no await in between), carries it."""
        self.channel = channel
        self.kvstub = rpc.KVStub(channel)
        self.clusterstub = rpc.ClusterStub(channel)
        self.leasestub = rpc.LeaseStub(channel)
        self.maintenancestub = rpc.MaintenanceStub(channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(channel), timeout=self._timeout, metadata=REQUIRE_LEADER
        )
        self._connected.set()

    def successor(self) -> MemberClient:
        """A client of the same member that takes this one's connection over, with a watch
        stream of its own. A new connection to the member would gain nothing, and one
        still being made (a TLS handshake etcd answers late) would start over; what this
        client's watches leave behind (etcd's late confirmation of a watch given up,
        which aetcd hands to the next watch asked for on the stream) stays on this
        client's stream, which :meth:`close` ends."""
        new = MemberClient(self._host, self._port, self._timeout, self._tls, self.streams)
        if self._connected.is_set():
            new._attach(self.channel)
            self._handed_on = True
        return new

    async def close(self) -> None:
        self.closed = True
        self._end_keepalives()  # a successor opens its own, on the channel it takes over
        if self._handed_on:
            await self._watcher.shutdown()  # the connection goes on, its successor's
            return
        await super().close()

    async def refresh_lease(self, lease_id: int) -> Any:
        """etcd's answer to one keepalive of ``lease_id`` (``TTL`` 0: the lease is gone),
        sent on the lease's stream, opened on first use and again after it broke.

        Each keepalive used to open a stream of its own, which cost an idle agent more
        than all else it does. On one stream the answers come in the order of the
        requests: etcd's server reads one request, renews, sends its answer and only
        then reads the next (``leaseKeepAlive`` in etcd's
        ``server/etcdserver/api/v3rpc/lease.go``, ``Recv`` → ``LeaseRenew`` → ``Send``
        in one loop per stream). With one request in flight at a time (the lock), the
        answer read is the one to the request just written. A call given up before its
        answer came (the store's deadline cancels it here, or the stream fails) drops
        the stream: that answer may still come, and must never be read as the answer to
        a later request, whose send time would then move the fence point on a renewal
        that answer does not confirm."""
        await self.connect()
        lock = self._keepalive_locks.setdefault(lease_id, asyncio.Lock())
        async with lock:
            stream = self._keepalives.get(lease_id)
            if stream is None or stream.done():
                stream = self.leasestub.LeaseKeepAlive(metadata=REQUIRE_LEADER)
                self._keepalives[lease_id] = stream
                self.streams.keepalive_opened += 1
            try:
                await stream.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                reply = await stream.read()
            except BaseException as err:
                self._drop_keepalive(lease_id)
                if isinstance(err, rpc.AioRpcError):
                    exceptions._handle_exception(err)
                raise
            if reply is grpc.aio.EOF:
                # etcd ends a stream without an error only when the client stops
                # sending, which this one never does: nothing says the lease is gone.
                self._drop_keepalive(lease_id)
                raise exceptions.ConnectionFailedError(f"{self.name} ended the keepalive stream")
            if lease_id != reply.ID:  # etcd answers with the request's ID: never seen
                self._drop_keepalive(lease_id)
                raise exceptions.ConnectionFailedError(
                    f"{self.name} answered a keepalive of {lease_id:x} for {reply.ID:x}"
                )
            if reply.TTL <= 0:
                self.lease_gone(lease_id)  # nothing more to send on its stream
            return reply

    def lease_gone(self, lease_id: int) -> None:
        """``lease_id`` is revoked or expired: end its keepalive stream and forget it."""
        self._drop_keepalive(lease_id)
        # A keepalive still waiting for the lock keeps it; one sent later gets a new
        # lock, and with it a stream of its own. Either way each hears "gone".
        self._keepalive_locks.pop(lease_id, None)

    def _drop_keepalive(self, lease_id: int) -> None:
        """End ``lease_id``'s keepalive stream, if it has one; the next keepalive opens
        a new one."""
        stream = self._keepalives.pop(lease_id, None)
        if stream is not None:
            stream.cancel()

    def _end_keepalives(self) -> None:
        for lease_id in list(self._keepalives):
            self._drop_keepalive(lease_id)

    async def txn(self, request: object) -> Any:
        """etcd's answer to a ``TxnRequest`` (aetcd's own call drops its header, and with
        it the revision the transaction wrote at)."""
        await self.connect()
        try:
            return await self.kvstub.Txn(request, timeout=self._timeout, metadata=self.metadata)
        except rpc.AioRpcError as err:
            exceptions._handle_exception(err)

    async def auth(self, method: str, request: object) -> Any:
        """One call of etcd's Auth service (``UserAdd``, ``RoleGrantPermission``...)."""
        await self.connect()
        try:
            return await getattr(rpc.AuthStub(self.channel), method)(
                request, timeout=self._timeout, metadata=self.metadata
            )
        except rpc.AioRpcError as err:
            exceptions._handle_exception(err)

    async def range_page(
        self, start: bytes, end: bytes, revision: int, limit: int, keys_only: bool = False
    ) -> Any:
        """One page of ``[start, end)`` at ``revision`` (0: now); aetcd's own range
        calls take neither a revision nor a limit."""
        await self.connect()
        request = rpc.RangeRequest(
            key=start, range_end=end, revision=revision, limit=limit, keys_only=keys_only
        )
        try:
            return await self.kvstub.Range(request, timeout=self._timeout, metadata=self.metadata)
        except rpc.AioRpcError as err:
            exceptions._handle_exception(err)
