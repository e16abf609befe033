"""The term beat's random-schedule model (``test_term_beat.py``) with holds for the
lease and their release: short holds in place of beats and holds for the lease kept
apart by ``Promises``, the late rule counting the promises while the peers are asked
(``Beating.hold_instant``), and a release once the guard has been on time for half a
TTL (``Holding.run``: the ledger of holds for the lease cleared, ``Ledger.released``,
then the release over the peer path, lossy and reordered, a datagram below the last
taken dropped as ``PeerAuth`` does). A release ends the standby's promise for the lease
only; a standby of an older version ended its short promises too, and says so by not
marking its replies ``kept``."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings

from tests.unit.test_term_beat import Schedule, run, schedules, steady


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(schedules(stall=True))
def test_stalls_with_etcd_answering_after_two_intervals_move_nothing(s: Schedule) -> None:
    """etcd answers every beat after 2.4 intervals: each is late by the hold rule, but
    the promises keep the guard, so the peers asked to hold are released, and nothing
    moves before the active freezes."""
    s = dataclasses.replace(
        s, ack_delay=(0.12,) * s.beats, apply_delay=(0.06,) * s.beats, watch_delay=(0.0,) * s.beats
    )
    o = run(s, keepalives=True)
    assert not o.overlap
    assert o.takeover > s.freeze and o.stop_a > s.freeze, o


def older_standby_schedule() -> Schedule:
    """etcd stalls from 0.2 to 0.5 s and applies no beat after the fourth while the
    keepalives flow: the active asks for holds, counts its peer's promises, and releases
    it at about 1.05 s; its peer's beat view is then long past."""
    return steady(
        ttl=1.0,
        freeze=1.8,
        stalls=((0.2, 0.5),),
        lost=tuple(k >= 4 for k in range(40)),
    )


def test_a_standby_of_the_version_before_is_counted_on_only_until_the_release() -> None:
    """A rolling update: the active keeps counting short promises past a release, which
    a standby of the version before ends at the release. That standby's replies do not
    say they are kept, so the active forgets its promises then (and the answers to holds
    sent before): without that, the standby, free until the next short hold reaches it,
    takes over while the active still counts the promise it dropped."""
    s = older_standby_schedule()
    stats: dict[str, int] = {}
    assert not run(s, stats=stats, keepalives=True).overlap, (
        "this version's standby keeps the short promise"
    )
    assert stats["release_taken"] >= 1, stats  # the model does release
    assert not run(s, keepalives=True, older_standby=True).overlap
    unforgotten = run(s, keepalives=True, older_standby=True, forget=False)
    assert unforgotten.overlap and unforgotten.takeover < unforgotten.stop_a, unforgotten
