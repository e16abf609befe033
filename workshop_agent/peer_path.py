"""The peer path: one UDP socket on (node address, ``peer_port``) between the agents of
a pair.

It answers the peers' pings and sends this node's own. Each ping carries the sender's
name and a sequence number; the reply echoes both and says whether the responder itself
sees the sender, so a node learns "I see X, but X does not see me" without etcd. The
same socket carries the hold requests of an active that cannot reach etcd, and the
peers' answers (see ``hold.py``); the messages are in ``peer_wire.py``.

Every datagram is sealed with the pair's key and this run's nonce and number; whatever
does not open (a bad MAC, a replay, an older run of a peer, a node not of the pair) is
dropped, counted, and reported at most once per source every ``DROPS_REPORTED_EVERY_S``:
a forger gets no answer, not even to a ping.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from hapair.shared.clock import Clock
from hapair.shared.network import Network
from hapair.workshop_agent.hold import Answer
from hapair.workshop_agent.peer_wire import (
    Dropped,
    Hold,
    HoldReply,
    Message,
    PeerAuth,
    Ping,
    Pong,
    Release,
)
from hapair.workshop_agent.probe_results import ProbeError, ProbeResult

DROPS_REPORTED_EVERY_S = 10.0
UNKNOWN = "unknown"  # every source that is not a peer's address, reported as one


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
        auth: PeerAuth,
        clock: Clock = time.monotonic,
    ) -> None:
        """``peers`` maps each other node's name to its IP address (None: unknown);
        ``auth`` seals and opens the datagrams (the agent's, with the pair's key)."""
        self.me = me
        self.network = network
        self.clock = clock
        now = clock()
        self._peers = {n: _Peer(a, ProbeResult(now)) for n, a in peers.items() if n != me}
        self.auth = auth
        auth.peers = frozenset(self._peers)
        self._seq = int.from_bytes(os.urandom(2), "big")  # a restart does not reuse numbers
        self._transport: asyncio.DatagramTransport | None = None
        self.dropped: Counter[str] = Counter()  # every datagram dropped, by reason
        self._unreported: dict[str, Counter[str]] = {}
        self._reported_at: dict[str, float] = {}
        # Set by the agent: answer a peer's hold, take in an answer to our own, report
        # the datagrams dropped (source: "peer" or UNKNOWN, "address:port", counts).
        self.on_hold: Callable[[Hold, float], Answer] | None = None
        self.on_hold_reply: Callable[[HoldReply, float], None] | None = None
        self.on_release: Callable[[Release], None] | None = None
        self.on_dropped: Callable[[str, str, dict[str, int]], None] | None = None

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

    def send_hold(self, epoch: int, ttl: float, beat: bool = False) -> tuple[int, float]:
        """Ask every peer not to campaign while it hears us (``beat``: in place of a
        beat of the term); (seq, sent at)."""
        return self._to_peers(lambda seq: Hold(self.me, seq, epoch, ttl, beat))

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
        msg = self.auth.open(data)
        if isinstance(msg, Dropped):
            self._drop(msg.reason, addr)
            return
        # Only a peer's own socket speaks for it (a ping is answered where it came from).
        if not isinstance(msg, Ping) and not self._from_peer(msg.sender, addr):
            self._drop("wrong address", addr)
            return
        match msg:
            case Ping():
                now = self.clock()
                self._send(
                    Pong(self.me, msg.sender, msg.seq, self.sees(msg.sender, now)),
                    addr[0],
                    addr[1],
                )
            case Pong():
                self._answered(msg)
            case Hold() if self.on_hold is not None:
                answer = self.on_hold(msg, self.clock())
                reply = HoldReply.answering(
                    msg, self.me, answer.promised, answer.reason, answer.ttl
                )
                self._send(reply, addr[0], addr[1])
            case Release() if self.on_release is not None:
                self.on_release(msg)
            case HoldReply() if self.on_hold_reply is not None and msg.to == self.me:
                self.on_hold_reply(msg, self.clock())

    def _from_peer(self, name: str, addr: tuple[str | Any, int]) -> bool:
        peer = self._peers.get(name)
        return peer is not None and (addr[0], addr[1]) == (peer.address, self.network.peer_port)

    def _drop(self, reason: str, addr: tuple[str | Any, int]) -> None:
        """Count a dropped datagram; report it unless its source was reported lately."""
        self.dropped[reason] += 1
        # Only a peer's address names a source: datagrams from any other address (a
        # forger may use many) are reported together, so the log stays bounded too.
        who = next((n for n, p in self._peers.items() if p.address == addr[0]), UNKNOWN)
        unreported = self._unreported.setdefault(who, Counter())
        unreported[reason] += 1
        now = self.clock()
        if self.on_dropped is None:
            return
        if now < self._reported_at.get(who, -float("inf")) + DROPS_REPORTED_EVERY_S:
            return
        self._reported_at[who] = now
        self.on_dropped(who, f"{addr[0]}:{addr[1]}", dict(unreported))
        unreported.clear()

    def _answered(self, msg: Pong) -> None:
        peer = self._peers.get(msg.sender)
        # Only the ping still waiting: a late pong must never make a peer look visible.
        if peer is None or msg.to != self.me or peer.pending is None:
            return
        seq, sent = peer.pending
        now = self.clock()
        if msg.seq != seq or now - sent > self.network.timeout_s:
            return
        peer.pending = None
        peer.result = replace(peer.result.answered(now, now - sent), sees_me=msg.sees)

    def _send(self, msg: Message, address: str, port: int | None = None) -> None:
        if self._transport is not None:
            self._transport.sendto(self.auth.seal(msg), (address, port or self.network.peer_port))
