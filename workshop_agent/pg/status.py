"""Value types of the PostgreSQL layer: LSNs, timelines, what a node reports."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator, PlainSerializer

from hapair.shared.model import StrictModel

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> int:
    """``16/B374D848`` -> an integer byte position in the WAL."""
    match = _LSN.match(text.strip())
    if match is None:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _lsn_in(value: object) -> object:
    return parse_lsn(value) if isinstance(value, str) else value


# An LSN is an int in Python and ``X/Y`` text in JSON (as PostgreSQL prints it).
Lsn = Annotated[
    int, BeforeValidator(_lsn_in), PlainSerializer(format_lsn, return_type=str, when_used="json")
]
PgRole = Literal["primary", "standby", "starting", "stopped", "unreachable"]
PgSyncState = Literal["sync", "quorum", "potential", "async"]


@dataclass(frozen=True)
class TimelineSwitch:
    """One line of a timeline history file: ``parent`` ended at ``switchpoint``."""

    parent: int
    switchpoint: int


def parse_history(text: str) -> list[TimelineSwitch]:
    """A ``0000000N.history`` file: ``parent<TAB>switchpoint<TAB>reason`` lines."""
    switches = []
    for line in text.splitlines():
        parts = line.strip().split("\t")
        if len(parts) >= 2 and parts[0].isdigit():
            switches.append(TimelineSwitch(int(parts[0]), parse_lsn(parts[1])))
    return switches


@dataclass(frozen=True)
class LocalPosition:
    """Where a node's WAL ends, for the rewind decision.

    For a standby, ``lsn`` is the furthest WAL it received or replayed; for a former
    primary shut down cleanly, its last (shutdown) checkpoint and ``checkpoint_end``
    the end of that record.
    """

    timeline: int
    lsn: int
    in_recovery: bool
    checkpoint_end: int | None = None


def needs_rewind(
    local: LocalPosition, primary_timeline: int, history: list[TimelineSwitch]
) -> bool:
    """Whether ``local`` has WAL the primary's history does not contain.

    A standby may follow if it has not gone past the point where the primary left its
    timeline; a former primary only if that point is exactly the end of its shutdown
    checkpoint (a clean switchover: the promoted node replayed everything it wrote).
    """
    if local.timeline > primary_timeline:
        return True
    if local.timeline == primary_timeline:
        return False
    for switch in history:
        if switch.parent == local.timeline:
            if local.in_recovery:
                return local.lsn > switch.switchpoint
            return local.lsn >= switch.switchpoint or local.checkpoint_end != switch.switchpoint
        if switch.parent > local.timeline:
            return True
    return True


class Replica(StrictModel):
    """A standby as its primary sees it (``pg_stat_replication``)."""

    name: str
    address: str | None
    state: str
    sent_lsn: Lsn | None
    flush_lsn: Lsn | None
    replay_lsn: Lsn | None
    lag_bytes: int | None
    lag_s: float | None
    sync_state: PgSyncState


class PgStatus(StrictModel):
    """What a node's database reports for ``hapair status`` and the decision loop."""

    role: PgRole
    pid: int | None = None
    timeline: int | None = None
    lsn: Lsn | None = None
    receive_lsn: Lsn | None = None
    replay_lsn: Lsn | None = None
    lag_bytes: int | None = None
    lag_s: float | None = None
    streaming: bool = False
    upstream: str | None = None
    synchronous_standby_names: str | None = None
    replicas: tuple[Replica, ...] = ()
    detail: str | None = None

    def sync_standbys(self) -> list[str]:
        """Standbys whose flush a commit on this primary waits for right now."""
        return [r.name for r in self.replicas if r.sync_state in ("sync", "quorum")]
