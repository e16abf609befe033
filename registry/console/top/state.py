"""What ``hapair top`` knows and shows: the connection, the operator's selection, and
questions about a pair that both the screen and the keys ask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hapair.shared.report import (
    DatabaseReport,
    EventReport,
    NodeReport,
    PairReport,
    RecoveryReport,
    SiteReport,
)

NOTICE_S = 30.0
"""How long the outcome of a request stays on screen."""
SILENT_S = 3.5
"""A live registry is read every second (``SiteFeed.tick_s``); a report older than this
is no longer shown as current, even before the feed has given up on that registry."""


@dataclass(frozen=True, slots=True)
class Connection:
    """What the dashboard knows of its link to the registries (wall-clock times)."""

    url: str | None = None
    """The registry in use, or the one last tried."""
    live: bool = False
    """True while the report shown is the registry's current state."""
    since: float | None = None
    """When it became live, or when it was lost; None until the first attempt ends."""
    error: str = ""
    """Why it is not live."""
    read_at: float | None = None
    """When the report shown was read from a live registry."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """A request waiting for the operator's y/N."""

    action: Literal["ack", "switchover"]
    pair: str
    what: str
    """The question without its ``? [y/N]``: what will be done, to what."""
    epoch: int | None = None
    """For an ack: the epoch of the recovery the operator was shown."""
    to: str | None = None
    """For a switchover: the target node."""
    targets: tuple[str, ...] = ()
    """For a switchover: the nodes ``t`` cycles through."""


@dataclass(frozen=True, slots=True)
class Notice:
    """The outcome of the last request, shown for :data:`NOTICE_S`."""

    text: str
    ok: bool
    at: float


@dataclass(frozen=True, slots=True)
class Selection:
    """The operator's side of the screen: which pair, what is asked, what came back."""

    pair: str | None = None
    prompt: Prompt | None = None
    notice: Notice | None = None
    sending: str | None = None
    """A request under way, described."""


def as_shown(conn: Connection, now: float) -> Connection:
    """``conn``, unless it claims to be live but has not been read for :data:`SILENT_S`
    (a registry that hangs): then it is shown as lost since its last read."""
    if conn.live and conn.read_at is not None and now - conn.read_at > SILENT_S:
        return Connection(
            url=conn.url,
            live=False,
            since=conn.read_at,
            error=f"no answer from {conn.url}",
            read_at=conn.read_at,
        )
    return conn


def awaiting(pair: PairReport) -> RecoveryReport | None:
    """The pair's recovery if it awaits an operator for the pair's current epoch."""
    rec = pair.recovery
    if rec is not None and rec.state == "awaiting" and rec.epoch == pair.epoch:
        return rec
    return None


def pairs_of(report: SiteReport) -> list[tuple[str, PairReport]]:
    """(workshop, pair) in the site's order: the order of the list on screen."""
    return [(w.name, p) for w in report.workshops for p in w.pairs]


def selected_pair(report: SiteReport, name: str | None) -> tuple[str, PairReport] | None:
    """The selected pair, or the first one when none is selected (or it is gone)."""
    entries = pairs_of(report)
    for ws, pair in entries:
        if pair.name == name:
            return ws, pair
    return entries[0] if entries else None


def ready_standbys(pair: PairReport) -> list[NodeReport]:
    """Nodes that could take the pair over now, in priority order, those that hold every
    declared package version first (as the agents choose)."""
    ready = [
        n
        for n in pair.nodes
        if n.name != pair.active
        and n.up
        and n.healthy
        and n.role == "standby"
        and n.drained is None
    ]
    return sorted(ready, key=lambda n: bool(n.drift))


def drifted(pair: PairReport) -> list[str]:
    """The nodes of ``pair`` that are up and lack a declared package version."""
    return [n.name for n in pair.nodes if n.up and n.drift]


@dataclass(frozen=True, slots=True)
class PairDatabase:
    """A pair's PostgreSQL as its nodes report it."""

    primary: str | None
    """The node whose server is primary (None: none says so)."""
    sync: tuple[str, ...]
    """The standbys the primary's commits wait for now."""
    nodes: tuple[tuple[str, DatabaseReport], ...]
    """Every node that reports a database, in the pair's order."""

    @property
    def no_sync(self) -> bool:
        """A primary with standbys but none synchronous: a commit may be on the primary
        only (degraded to asynchronous, or the standby just went away)."""
        return self.primary is not None and not self.sync and len(self.nodes) > 1


def pair_database(pair: PairReport) -> PairDatabase | None:
    """The pair's database state, or None for a pair without one."""
    nodes = tuple((n.name, n.database) for n in pair.nodes if n.up and n.database is not None)
    if not nodes:
        return None
    primaries = [(name, db) for name, db in nodes if db.role == "primary"]
    # Two primaries (an old one not yet fenced) : the active's is the one that counts.
    name, db = next(
        ((n, d) for n, d in primaries if n == pair.active),
        primaries[0] if primaries else (None, None),
    )
    return PairDatabase(name, tuple(db.synchronous) if db is not None else (), nodes)


ROLLOUT_ENDS = frozenset({"rollout_done", "rollout_rolled_back", "rollout_failed"})


@dataclass(frozen=True, slots=True)
class RolloutView:
    """A rollout under way, as its last event tells it."""

    pair: str
    rollout: str
    what: str
    """Its step now (or that it started)."""
    at: float
    """When that step began."""
    step: int | None = None
    of: int | None = None


def rollouts(report: SiteReport) -> list[RolloutView]:
    """The rollouts under way: those whose last event among the recent ones is not
    their end, in the order they began."""
    last: dict[str, EventReport] = {}
    for e in report.events:
        rollout = e.details.get("rollout")
        if e.kind.startswith("rollout_") and e.pair and isinstance(rollout, str):
            last.pop(rollout, None)  # re-inserted: the order is the latest's
            last[rollout] = e
    out = []
    for rollout, e in last.items():
        if e.kind in ROLLOUT_ENDS or e.pair is None:
            continue
        step, of = e.details.get("step"), e.details.get("of")
        out.append(
            RolloutView(
                pair=e.pair,
                rollout=rollout,
                what=e.reason if e.kind == "rollout_step" else "started",
                at=e.at,
                step=step if isinstance(step, int) else None,
                of=of if isinstance(of, int) else None,
            )
        )
    return out
