"""What the network probes have shown, and its verdict: alarms and isolation (pure).

A :class:`ProbeResult` is kept per peer (``peer_path.py``) and per probe target
(``probe_targets.py``); :func:`summarize` turns them and the clock into the node's
:class:`NetworkSummary`, with no I/O, so the verdict is tested without sockets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from hapair.shared.network import Network


class ProbeError(Exception):
    """Probing cannot start (the node's address does not resolve, the port is taken)."""


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


def next_verdict_change(
    network: Network,
    peers: Mapping[str, ProbeResult],
    targets: Mapping[str, ProbeResult],
    now: float,
) -> float | None:
    """The first instant after ``now`` at which :func:`summarize` would say otherwise
    with no new answer: a peer or target falling silent for the visibility window, the
    last target for the isolation time (None: no such instant)."""
    window, isolation = network.visible_within_s, network.isolation_after_s
    instants = [
        (r.last_ok if r.last_ok is not None else r.since) + limit
        for results, limits in ((peers, (window,)), (targets, (window, isolation)))
        for r in results.values()
        for limit in limits
    ]
    later = [t for t in instants if t > now]
    return min(later, default=None)
