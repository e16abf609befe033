"""The agent's view of the network: its probes, their alarms, and the "network" resource.

Peers not visible are alarms only (the lease is the truth). Isolation (no probe target
answered for ``isolation_after_s``) is reported as the critical resource ``network``,
so the forced-switch rule moves an isolated active to a standby that still reaches the
targets, and nobody moves when no node reaches them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from hapair.shared.log import EventLog
from hapair.shared.network import Network
from hapair.shared.pki import PkiError, load_peer_key
from hapair.shared.records import Resource
from hapair.shared.topology import Node, Pair
from hapair.workshop_agent.hold import Answer
from hapair.workshop_agent.peer_path import DROPS_REPORTED_EVERY_S
from hapair.workshop_agent.peer_wire import LAB_KEY, Hold, HoldReply, PeerAuth, Release
from hapair.workshop_agent.probe_results import NetworkSummary, ProbeError
from hapair.workshop_agent.probes import NetworkProbes

RESOURCE = "network"


@dataclass(frozen=True, slots=True)
class NetworkState:
    """What changes rarely: compared tick to tick to publish and record only changes."""

    not_visible: frozenset[str] = frozenset()
    asymmetric: frozenset[str] = frozenset()
    targets_lost: frozenset[str] = frozenset()
    network_ok: bool = True
    reaches_targets: bool = True
    error: str | None = None

    def problems(self) -> list[str]:
        out = [f"peer {p} not visible" for p in sorted(self.not_visible)]
        out += [f"asymmetric: {p} does not see this node" for p in sorted(self.asymmetric)]
        out += [f"probe target {t} lost" for t in sorted(self.targets_lost)]
        if not self.network_ok:
            out.append("network isolated: no probe target answers")
        if self.error:
            out.append(f"network probes not running: {self.error}")
        return out

    def resource(self, active: bool, isolation_after_s: float) -> Resource:
        # A fault that cuts every node sees each one flip at a slightly different time; the
        # grace gives the standbys the isolation delay too, so they have said they lost the
        # targets before the active would move to them. A standby is trusted to reach the
        # targets only once one really answered; an active that just started is not called
        # isolated before its own isolation delay is up.
        ok = self.network_ok and (active or self.reaches_targets)
        return Resource(ok=ok, critical=True, grace_s=isolation_after_s)


def _state(summary: NetworkSummary, has_targets: bool) -> NetworkState:
    return NetworkState(
        not_visible=frozenset(summary.peers_not_visible),
        asymmetric=frozenset(summary.asymmetric),
        targets_lost=frozenset(summary.targets_lost),
        network_ok=summary.network_ok,
        reaches_targets=bool(summary.targets_reached) or not has_targets,
    )


class NetWatch:
    def __init__(self, log: EventLog, on_change: Callable[[], None]) -> None:
        self.log = log
        self.on_change = on_change
        self.probes: NetworkProbes | None = None
        self._key: tuple[object, ...] | None = None
        self._has_targets = False
        self.state: NetworkState | None = None  # None: the pair has no network section
        # This run's nonce and count, and what it took from each peer, kept across peer
        # paths: a datagram captured before a topology change cannot be replayed after.
        self.auth = PeerAuth(None)
        # The holds of workshop_agent/hold.py ride on the peer path.
        self.on_hold: Callable[[Hold, float], Answer] | None = None
        self.on_hold_reply: Callable[[HoldReply, float], None] | None = None
        self.on_release: Callable[[Release], None] | None = None

    async def update(self, pair: Pair, node: Node) -> None:
        """(Re)start the probes when the pair's network section or its nodes changed."""
        peers = {n.name: n.address for n in pair.nodes if n.name != node.name}
        key = (pair.network, node.address, tuple(sorted(peers.items())))
        if key == self._key:
            return
        self._key = key
        await self.close()
        # A transport closes its socket on the loop's next turn: the new peer path binds
        # the same port.
        await asyncio.sleep(0)
        if pair.network is None:
            self.state = None
            return
        try:
            self.auth.key = self._peer_key(pair.network)
            probes = NetworkProbes(node.name, node.address, peers, pair.network, self.auth)
            await probes.start()
        except ProbeError as err:
            self.log.error("network probes cannot start", error=str(err))
            self.state = NetworkState(error=str(err))
            return
        assert probes.peer_path is not None
        probes.peer_path.on_hold = self.on_hold
        probes.peer_path.on_hold_reply = self.on_hold_reply
        probes.peer_path.on_release = self.on_release
        probes.peer_path.on_dropped = self._dropped
        self.probes = probes
        self._has_targets = bool(pair.network.probe_targets)
        self.state = NetworkState()

    def _peer_key(self, network: Network) -> bytes | None:
        """The pair's peer key from its file, or None in the lab mode (said loudly)."""
        if network.peer_key_file is None:
            self.log.warning(
                "peer path in the LAB MODE, NOT AUTHENTICATED: the pair's network section "
                "names no peer_key_file, so anyone on the network can send holds, "
                "releases and answers as a node of this pair (stop a failover or a "
                "switchover, or free a standby while the active still holds: two "
                "actives); write a key with hapair pki peer-key DIR PAIR, copy it to "
                "every node of the pair (mode 0600) and name it in "
                "network.peer_key_file",
                peer_port=network.peer_port,
            )
            return None
        try:
            return load_peer_key(network.peer_key_file)
        except (PkiError, OSError) as err:
            # Without its key the node cannot speak for itself on the peer path: no peer
            # path at all, so no promise is given or counted (the lease alone decides).
            raise ProbeError(f"peer key refused: {err}") from err

    def _dropped(self, source: str, address: str, counts: dict[str, int]) -> None:
        self.log.warning(
            "peer path: datagrams dropped",
            source=source,
            address=address,
            dropped=", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())),
            reported_every_s=DROPS_REPORTED_EVERY_S,
        )

    def send_hold(self, epoch: int, ttl: float, beat: bool = False) -> tuple[int, float] | None:
        """Ask the peers to hold (``beat``: in place of a beat of the term); (seq, sent
        at), or None without a peer path."""
        path = self.probes.peer_path if self.probes is not None else None
        if path is None or (beat and path.auth.key == LAB_KEY):
            # In the lab mode anyone may answer as a peer: a forged promise would keep
            # the beats out of etcd while the real standby, cut off from the holds,
            # waits for them. The term beats in etcd instead (term_beat.py).
            return None
        return path.send_hold(epoch, ttl, beat)

    def send_release(self, epoch: int) -> None:
        if self.probes is not None and self.probes.peer_path is not None:
            self.probes.peer_path.send_release(epoch)

    def due_in(self) -> float | None:
        """Seconds until the probes' verdict changes by silence alone (None: never)."""
        return None if self.probes is None else self.probes.verdict_due_in()

    def tick(self) -> bool:
        """Read the probes; True when the state changed (logged; the caller records it)."""
        if self.probes is None:
            return False
        new = _state(self.probes.summary(), self._has_targets)
        if new == self.state:
            return False
        self.log.warning("network", problems="; ".join(new.problems()) or "all clear")
        self.state = new
        self.on_change()
        return True

    async def close(self) -> None:
        if self.probes is not None:
            with contextlib.suppress(Exception):
                await self.probes.close()
            self.probes = None
