"""Assisted recovery: which services wait for an operator, and when they may start.

Pure functions; the agent writes the ``/pairs/{pair}/recovery`` record and starts the
services they name.
"""

from __future__ import annotations

from shared.records import Recovery
from shared.topology import Pair


def held_services(pair: Pair, hold: bool) -> frozenset[str]:
    """The services marked ``hold_until_ack`` when this term must hold them."""
    if not hold:
        return frozenset()
    return frozenset(s.name for s in pair.services if s.hold_until_ack)


def release_due(
    pair: Pair, held: frozenset[str], record: Recovery | None, term: int, waited_s: float
) -> frozenset[str]:
    """Held services that may start now: all of them once the recovery of *this* term is
    acknowledged (an acknowledgement of an older term releases nothing), else those
    whose ``auto_ack_after_s`` has run out."""
    if record is not None and record.epoch == term and record.state == "acknowledged":
        return held
    return frozenset(
        s.name
        for s in pair.services
        if s.name in held and s.auto_ack_after_s is not None and waited_s >= s.auto_ack_after_s
    )
