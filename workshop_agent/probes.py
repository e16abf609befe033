"""Network probes of the agent: the peer path, the probe targets, and their verdict.

- :class:`PeerPath` is one UDP socket on (node address, ``peer_port``) that answers the
  peers' pings and sends this node's own. Each ping carries the sender's name and a
  sequence number; the reply echoes both and says whether the responder itself sees
  the sender, so a node learns "I see X, but X does not see me" without etcd. The same
  socket carries the hold requests of an active that cannot reach etcd, and the peers'
  answers (see ``workshop_agent/hold.py``); the messages are in ``peer_wire.py``.
- :class:`TargetProber` probes the pair's ``probe_targets``: ``host:port`` with a TCP
  connect, ``host`` with an ICMP echo (raw socket: the agent runs as root). Both leave
  from the node's own address, so the route tested is the one its services use.
- :class:`NetworkProbes` runs both on one timer; :func:`summarize` turns their results
  and the clock into alarms and the isolation verdict, with no I/O.

All times are on the local monotonic clock; no other server's clock is ever read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from hapair.shared.clock import boottime
from hapair.shared.network import MAX_TIMEOUT_S, Network, Target
from hapair.workshop_agent.peer_wire import (
    Hold,
    HoldReply,
    Message,
    Ping,
    Pong,
    Release,
    decode,
    encode,
)

log = logging.getLogger("hapair.probes")

Clock = Callable[[], float]


class ProbeError(Exception):
    """Probing cannot start (the node's address does not resolve, the port is taken)."""


# ---- results and their verdict (pure) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What probing one peer or target has shown so far."""

    since: float  # probing started: a peer or target never reached counts from here
    ok: bool = False  # the last probe was answered
    rtt_ms: float | None = None  # of the last answered probe
    last_ok: float | None = None  # monotonic time of the last answer
    misses: int = 0  # consecutive unanswered probes
    detail: str = ""  # why the last probe failed
    sees_me: bool | None = None  # peers only: the peer's last word on us (None: unknown)

    def silent_for(self, now: float) -> float:
        return now - (self.last_ok if self.last_ok is not None else self.since)

    def answered_within(self, now: float, window: float) -> bool:
        return self.last_ok is not None and now - self.last_ok < window

    def answered(self, now: float, rtt_s: float) -> ProbeResult:
        return replace(
            self, ok=True, rtt_ms=round(rtt_s * 1000, 3), last_ok=now, misses=0, detail=""
        )

    def missed(self, detail: str) -> ProbeResult:
        return replace(self, ok=False, misses=self.misses + 1, detail=detail)


@dataclass(frozen=True, slots=True)
class NetworkSummary:
    network_ok: bool  # not isolated: some target answered within isolation_after_s
    alarms: tuple[str, ...] = ()
    peers_visible: frozenset[str] = frozenset()
    peers_not_visible: frozenset[str] = frozenset()
    asymmetric: frozenset[str] = frozenset()  # peers we see that do not see us
    targets_reached: frozenset[str] = frozenset()  # answered within isolation_after_s
    targets_lost: frozenset[str] = frozenset()


def summarize(
    network: Network,
    peers: Mapping[str, ProbeResult],
    targets: Mapping[str, ProbeResult],
    now: float,
) -> NetworkSummary:
    """Alarms and the isolation verdict from probe results at ``now``; no I/O.

    Something never reached is judged from when probing started, so a node that has just
    started is neither alarmed about nor called isolated before it had time to try."""
    window = network.visible_within_s
    alarms: list[str] = []
    visible = {n for n, r in peers.items() if r.answered_within(now, window)}
    hidden = {n for n, r in peers.items() if n not in visible and r.silent_for(now) >= window}
    asymmetric = {n for n in visible if peers[n].sees_me is False}
    for name in sorted(peers):
        if name in hidden:
            alarms.append(f"peer {name} not visible for {peers[name].silent_for(now):.1f}s")
        elif name in asymmetric:
            alarms.append(f"asymmetric: {name} does not see this node")
    lost = {t for t, r in targets.items() if r.silent_for(now) >= window}
    alarms.extend(f"probe target {t} lost" for t in sorted(lost))
    isolation = network.isolation_after_s
    reached = {t for t, r in targets.items() if r.answered_within(now, isolation)}
    quiet = min((r.silent_for(now) for r in targets.values()), default=0.0)
    network_ok = not targets or quiet < isolation
    if not network_ok:
        alarms.append(f"network isolated: no probe target answered for {quiet:.1f}s")
    return NetworkSummary(
        network_ok=network_ok,
        alarms=tuple(alarms),
        peers_visible=frozenset(visible),
        peers_not_visible=frozenset(hidden),
        asymmetric=frozenset(asymmetric),
        targets_reached=frozenset(reached),
        targets_lost=frozenset(lost),
    )


# ---- the peer path: UDP ping/pong between agents (messages: peer_wire.py) -------------


@dataclass(slots=True)
class _Peer:
    address: str | None  # None: its name did not resolve when probing started
    result: ProbeResult
    pending: tuple[int, float] | None = None  # (seq, sent at) of the unanswered ping


class PeerPath(asyncio.DatagramProtocol):
    """Responder and prober of the peer path on one socket (node address, peer_port)."""

    def __init__(
        self,
        me: str,
        peers: Mapping[str, str | None],
        network: Network,
        clock: Clock = time.monotonic,
    ) -> None:
        """``peers`` maps each other node's name to its IP address (None: unknown)."""
        self.me = me
        self.network = network
        self.clock = clock
        now = clock()
        self._peers = {n: _Peer(a, ProbeResult(now)) for n, a in peers.items() if n != me}
        self._seq = int.from_bytes(os.urandom(2), "big")  # a restart does not reuse numbers
        self._transport: asyncio.DatagramTransport | None = None
        # Set by the agent: answer a peer's hold, take in an answer to our own.
        self.on_hold: Callable[[Hold, float], tuple[bool, str]] | None = None
        self.on_hold_reply: Callable[[HoldReply, float], None] | None = None
        self.on_release: Callable[[Release], None] | None = None

    async def open(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: self, local_addr=(address, self.network.peer_port)
            )
        except OSError as err:
            raise ProbeError(f"peer path on {address}:{self.network.peer_port}: {err}") from err

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def error_received(self, exc: Exception) -> None:
        # A peer that cannot be reached shows up as missing replies; nothing to do here.
        pass

    def probe(self) -> None:
        """One round: count the pings left unanswered, send a new one to each peer."""
        now = self.clock()
        for peer in self._peers.values():
            if peer.address is None:
                peer.result = peer.result.missed("its address did not resolve")
                continue
            if peer.pending is not None:
                peer.result = peer.result.missed("no reply")
            self._seq = (self._seq + 1) % 2**32
            peer.pending = (self._seq, now)
            self._send(Ping(self.me, self._seq), peer.address)

    def send_hold(self, epoch: int, ttl: float) -> tuple[int, float]:
        """Ask every peer not to campaign while it hears us; (seq, sent at)."""
        return self._to_peers(lambda seq: Hold(self.me, seq, epoch, ttl))

    def send_release(self, epoch: int) -> None:
        """Tell every peer that the promises for ``epoch`` are no longer needed."""
        self._to_peers(lambda seq: Release(self.me, seq, epoch))

    def _to_peers(self, make: Callable[[int], Message]) -> tuple[int, float]:
        self._seq = (self._seq + 1) % 2**32
        now = self.clock()
        for peer in self._peers.values():
            if peer.address is not None:
                self._send(make(self._seq), peer.address)
        return self._seq, now

    def sees(self, name: str, now: float) -> bool | None:
        """Does this node see ``name``? None while it has not had time to tell."""
        peer = self._peers.get(name)
        if peer is None:
            return False
        result = peer.result
        if result.answered_within(now, self.network.visible_within_s):
            return True
        return None if result.silent_for(now) < self.network.visible_within_s else False

    def results(self) -> dict[str, ProbeResult]:
        return {name: p.result for name, p in self._peers.items()}

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        msg = decode(data)
        match msg:
            case Ping():
                now = self.clock()
                self._send(
                    Pong(self.me, msg.sender, msg.seq, self.sees(msg.sender, now)),
                    addr[0],
                    addr[1],
                )
            case Pong():
                self._answered(msg, addr)
            case Hold() if self.on_hold is not None and self._from_peer(msg.sender, addr):
                promised, reason = self.on_hold(msg, self.clock())
                reply = HoldReply(self.me, msg.sender, msg.seq, msg.epoch, promised, reason)
                self._send(reply, addr[0], addr[1])
            case Release() if self.on_release is not None and self._from_peer(msg.sender, addr):
                self.on_release(msg)
            case HoldReply() if (
                self.on_hold_reply is not None
                and msg.to == self.me
                and self._from_peer(msg.sender, addr)
            ):
                self.on_hold_reply(msg, self.clock())

    def _from_peer(self, name: str, addr: tuple[str | Any, int]) -> bool:
        """Only a peer's own socket speaks for it: a forged or stray datagram from any
        other address must never make a peer look visible, or promise anything."""
        peer = self._peers.get(name)
        return peer is not None and (addr[0], addr[1]) == (peer.address, self.network.peer_port)

    def _answered(self, msg: Pong, addr: tuple[str | Any, int]) -> None:
        peer = self._peers.get(msg.sender)
        # Only the ping still waiting: a late pong must never make a peer look visible.
        if peer is None or msg.to != self.me or peer.pending is None:
            return
        if not self._from_peer(msg.sender, addr):
            return
        seq, sent = peer.pending
        now = self.clock()
        if msg.seq != seq or now - sent > self.network.timeout_s:
            return
        peer.pending = None
        peer.result = replace(peer.result.answered(now, now - sent), sees_me=msg.sees)

    def _send(self, msg: Message, address: str, port: int | None = None) -> None:
        if self._transport is not None:
            self._transport.sendto(encode(msg), (address, port or self.network.peer_port))


# ---- probe targets: TCP connect and ICMP echo ------------------------------------------


async def tcp_probe(host: str, port: int, source: str | None, timeout: float) -> None:
    """Connect to host:port from ``source``; raise OSError or TimeoutError on failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        if source is not None and (":" in source) == (family == socket.AF_INET6):
            sock.bind((source, 0))
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int(word) for word in struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class Pinger:
    """ICMP echo over one raw IPv4 socket bound to the node's address.

    A raw socket sees every ICMP packet sent to that address, so replies are matched by
    identifier, sequence number and source address."""

    def __init__(self, source: str | None) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self._sock.setblocking(False)
        if source is not None and ":" not in source:
            self._sock.bind((source, 0))
        # Random per socket: several agents (or tests) in one host must not take each
        # other's replies.
        self._ident = int.from_bytes(os.urandom(2), "big")
        self._seq = 0
        self._waiting: dict[int, tuple[str, asyncio.Future[None]]] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    async def ping(self, host: str, timeout: float) -> None:
        """One echo; raise OSError or TimeoutError when it is not answered."""
        self._seq = (self._seq + 1) % 2**16
        seq = self._seq
        header = struct.pack("!BBHHH", 8, 0, 0, self._ident, seq)
        payload = b"hapair-probe"
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), self._ident, seq)
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiting[seq] = (host, future)
        try:
            self._sock.sendto(packet + payload, (host, 0))
            async with asyncio.timeout(timeout):
                await future
        finally:
            self._waiting.pop(seq, None)

    def _readable(self) -> None:
        while True:
            try:
                data, _ = self._sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an ICMP error queued on the socket: the waiting ping times out
            self._reply(data)

    def _reply(self, data: bytes) -> None:
        if len(data) < 20 or data[0] >> 4 != 4:
            return
        ihl = (data[0] & 0x0F) * 4
        if len(data) < ihl + 8:
            return
        kind, code, _, ident, seq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
        waiting = self._waiting.get(seq)
        source = socket.inet_ntoa(data[12:16])
        if kind != 0 or code != 0 or ident != self._ident or waiting is None:
            return
        host, future = waiting
        if source == host and not future.done():
            future.set_result(None)


def _why(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "no answer in time"
    if isinstance(err, OSError):
        # asyncio puts "Connect call failed (...)" in strerror; the errno says more.
        return os.strerror(err.errno) if err.errno else str(err)
    return repr(err)


class TargetProber:
    """The pair's probe targets, probed all at once each round from ``source``."""

    def __init__(
        self,
        source: str | None,
        targets: Iterable[Target],
        timeout: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self.source = source
        self.timeout = timeout
        self.clock = clock
        now = clock()
        self._results = {t: ProbeResult(now) for t in targets}
        self._pinger: Pinger | None = None

    def open(self) -> None:
        if any(t.port is None for t in self._results):
            try:
                self._pinger = Pinger(self.source)
            except OSError as err:
                raise ProbeError(f"ICMP socket on {self.source}: {err}") from err

    def close(self) -> None:
        if self._pinger is not None:
            self._pinger.close()
            self._pinger = None

    async def probe(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for target in self._results:
                tg.create_task(self._one(target))

    def results(self) -> dict[str, ProbeResult]:
        return {str(t): result for t, result in self._results.items()}

    async def _one(self, target: Target) -> None:
        start = self.clock()
        try:
            if target.port is not None:
                await tcp_probe(target.host, target.port, self.source, self.timeout)
            elif self._pinger is not None:
                await self._pinger.ping(target.host, self.timeout)
        except (OSError, TimeoutError) as err:
            self._results[target] = self._results[target].missed(_why(err))
            return
        now = self.clock()
        self._results[target] = self._results[target].answered(now, now - start)


# ---- both, on one timer ------------------------------------------------------------------


class NetworkProbes:
    """The network probing of one node: ``start()``, read ``summary()``, ``close()``.

    ``peers`` maps the other nodes of the pair to their addresses. To apply a new
    topology, close this one and start a new one."""

    def __init__(
        self,
        me: str,
        address: str,
        peers: Mapping[str, str],
        network: Network,
        clock: Clock = boottime,  # hold promises count against the agent's fence point
    ) -> None:
        self.me = me
        self.address = address
        self.network = network
        self.clock = clock
        self._peer_addresses = dict(peers)
        self.peer_path: PeerPath | None = None
        self.targets: TargetProber | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind the peer path and the ICMP socket, then probe every interval."""
        source = await _resolve(self.address)
        peers = {n: await _resolve_or_none(a) for n, a in self._peer_addresses.items()}
        self.peer_path = PeerPath(self.me, peers, self.network, self.clock)
        await self.peer_path.open(source)
        self.targets = TargetProber(
            source, self.network.targets(), self.network.timeout_s, self.clock
        )
        try:
            self.targets.open()
        except ProbeError:
            self.peer_path.close()
            raise
        self._task = asyncio.create_task(self._run(), name=f"probes-{self.me}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.peer_path is not None:
            self.peer_path.close()
        if self.targets is not None:
            self.targets.close()

    async def __aenter__(self) -> NetworkProbes:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def peers(self) -> dict[str, ProbeResult]:
        return self.peer_path.results() if self.peer_path is not None else {}

    def target_results(self) -> dict[str, ProbeResult]:
        return self.targets.results() if self.targets is not None else {}

    def summary(self) -> NetworkSummary:
        return summarize(self.network, self.peers(), self.target_results(), self.clock())

    async def _run(self) -> None:
        interval = self.network.probe_interval_s
        next_round = self.clock()
        while True:
            try:
                await self._round()
            except Exception:  # a bug in a round must not end probing for good
                log.exception("network probe round failed")
            # Rounds keep to a fixed grid; one that overran starts the next at once.
            next_round = max(next_round + interval, self.clock())
            await asyncio.sleep(next_round - self.clock())

    async def _round(self) -> None:
        assert self.peer_path is not None and self.targets is not None
        self.peer_path.probe()
        await self.targets.probe()


async def _resolve(host: str) -> str:
    """Once, at start: a name server outage later must not stop probing."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))  # normalized, as the kernel writes it
    try:
        async with asyncio.timeout(MAX_TIMEOUT_S * 5):
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (OSError, TimeoutError) as err:
        raise ProbeError(f"cannot resolve {host}: {_why(err)}") from err
    return str(infos[0][4][0])


async def _resolve_or_none(host: str) -> str | None:
    # A peer that does not resolve is reported not visible; it does not stop the rest.
    try:
        return await _resolve(host)
    except ProbeError as err:
        log.warning("peer address does not resolve: %s", err)
        return None
