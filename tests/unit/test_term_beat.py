"""The term beat's rules (term_beat.py): the active's fence point from its acknowledged
beats, a standby's takeover time from the beats it saw and its promises, and the safety
claim over random schedules of sends, etcd delays, losses and stalls, watch delays,
freezes, crashes and holds, with clocks drifting within the bound the argument allows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from hapair.shared import keys
from hapair.shared.topology import Failover, TermBeat, TopologyError, parse_site
from hapair.workshop_agent.beat_election import beat_record, beat_timing
from hapair.workshop_agent.hold import Ledger, Promises
from hapair.workshop_agent.peer_wire import Hold, HoldReply
from hapair.workshop_agent.term_beat import (
    NONE,
    BeatTiming,
    BeatView,
    Heartbeat,
    beat_fence_point,
    takeover_due,
    term_fence_point,
    watchdog_deadline,
)

TIMING = BeatTiming(interval=0.05, fence_after=0.15, margin=0.15)
INF = float("inf")


# ---- the rules, case by case ---------------------------------------------------------


def test_the_fence_point_counts_from_the_send_of_the_last_acknowledged_beat() -> None:
    beats = Heartbeat(epoch=7, timing=TIMING, started=10.0)
    assert beats.fence_point == 10.0 + 0.15, "the campaign wrote the term's first beat"
    beats.answered(10.05, applied=True)
    beats.answered(10.10, applied=True)
    assert beats.fence_point == 10.10 + 0.15
    beats.answered(10.05, applied=True)
    assert beats.fence_point == 10.10 + 0.15, "an older answer never moves it back"


def test_a_refused_beat_ends_the_term_at_once() -> None:
    beats = Heartbeat(epoch=7, timing=TIMING, started=10.0)
    beats.answered(10.05, applied=False)
    assert beats.fence_point == NONE
    beats.answered(10.10, applied=True)
    assert beats.fence_point == NONE, "a term refused once is over for good"


def test_holds_are_asked_for_once_a_beat_is_missing() -> None:
    beats = Heartbeat(epoch=7, timing=TIMING, started=10.0)
    assert not beats.hold_due(10.09)
    assert beats.hold_due(10.10)


def test_the_term_fence_point_is_the_earlier_guard_unless_the_peers_hold() -> None:
    assert term_fence_point(lease_point=11.5, beat_point=10.15, hold_point=NONE) == 10.15
    assert term_fence_point(lease_point=10.1, beat_point=10.15, hold_point=NONE) == 10.1
    assert term_fence_point(lease_point=11.5, beat_point=10.15, hold_point=11.0) == 11.0
    assert watchdog_deadline(11.5, 10.15, NONE, TIMING, fence_margin=0.5) == 10.15 + 0.075
    assert watchdog_deadline(11.5, 10.15, 11.0, TIMING, fence_margin=0.5) == 11.0 + 0.25


def test_a_standby_waits_fence_and_margin_from_the_delivery_of_the_newest_beat() -> None:
    view = BeatView()
    assert takeover_due(view.seen, epoch=7) == INF, "no beat seen: only the lease decides"
    view.delivered(7, TIMING, now=20.0)
    assert takeover_due(view.seen, epoch=7) == pytest.approx(20.3)
    view.delivered(9, TIMING, now=20.2)
    view.delivered(9, TIMING, now=20.4)
    assert takeover_due(view.seen, epoch=7) == pytest.approx(20.5), "first delivery counts"
    view.delivered(8, TIMING, now=20.6)
    assert view.seen is not None and view.seen.revision == 9, "never an older beat"
    assert takeover_due(view.seen, epoch=7, promised_until=22.0) == 22.0
    longer = BeatTiming(0.05, 0.3, 0.2)
    assert takeover_due(view.seen, epoch=7, own=longer) == pytest.approx(20.7)
    view.deleted()
    assert takeover_due(view.seen, epoch=7) == INF


def test_a_beat_of_an_earlier_term_gives_no_takeover() -> None:
    view = BeatView()
    view.delivered(6, TIMING, now=20.0)
    assert takeover_due(view.seen, epoch=7) == INF, "the new active does not beat"
    assert takeover_due(view.seen, epoch=None) == INF, "no term at all: a campaign's case"


def test_the_margin_bounds_the_drift() -> None:
    assert TIMING.max_drift() == pytest.approx(0.15 / 3.6)
    assert TIMING.takeover_after == pytest.approx(0.3)
    assert TIMING.watchdog_after == pytest.approx(0.225)


# ---- the safety claim over random schedules ------------------------------------------

FenceRule = Callable[[float | None, BeatTiming], float]


@dataclass(frozen=True)
class Schedule:
    """One run, in real seconds. The active A beats every interval on its own clock from
    its campaign (beat 0, sent at 0, which wrote the term's first beat), asks P to hold
    once a beat is late, and P watches the beat key and takes over when the rules let it.
    Per beat: its delay to etcd (or lost), its answer's delay (or lost), its delivery
    delay to P's watch; per hold: the peer path's delay, the hold or the reply lost."""

    timing: BeatTiming
    ttl: float  # the lease's TTL, which is also the length of a promise
    fence_margin: float  # the lease's
    rate_a: float  # how fast each node's clock runs against real time
    rate_p: float
    kill: float  # from the watchdog's deadline to its SIGKILL landing
    beats: int
    crash: float  # A's server dies, its services with it
    freeze: float  # A's agent stops (its watchdog runs on)
    stalls: tuple[tuple[float, float], ...]  # etcd applies and delivers nothing in [start, end)
    apply_delay: tuple[float, ...]
    lost: tuple[bool, ...]
    ack_delay: tuple[float, ...]
    ack_lost: tuple[bool, ...]
    watch_delay: tuple[float, ...]
    peer_delay: tuple[float, ...]
    hold_lost: tuple[bool, ...]
    reply_lost: tuple[bool, ...]
    txn_delay: float  # P's takeover, from its send to etcd applying it

    def stalled(self, t: float) -> float:
        """When etcd gets to something due at ``t``: after every stall it falls in,
        in the order it was due."""
        for start, end in self.stalls:
            if start <= t < end:
                t = end + (t - start) * 1e-6
        return t


@dataclass(frozen=True)
class Outcome:
    stop_a: float  # when A's services were gone for sure
    takeover: float  # when P sent the takeover that won (inf: none did)

    @property
    def overlap(self) -> bool:
        return self.stop_a > self.takeover


def run(s: Schedule, rule: FenceRule = beat_fence_point) -> Outcome:
    t, epoch = s.timing, 1
    end_a = min(s.crash, s.freeze)  # A's agent sends and hears nothing from then on
    sends = [i * t.interval / s.rate_a for i in range(s.beats)]
    sends = [x for x in sends if x < end_a] or [0.0]
    # etcd applies each beat that reaches it after any stall, in that order: the order
    # of their mod revisions. P's watch delivers them in that order too.
    applied = sorted(
        (s.stalled(x + s.apply_delay[i]), i) for i, x in enumerate(sends) if i == 0 or not s.lost[i]
    )
    revision = {i: epoch + n for n, (_, i) in enumerate(applied)}
    applied_at = {revision[i]: a for a, i in applied}
    deliveries, last = [], 0.0
    for a, i in applied:
        last = max(last, s.stalled(a + s.watch_delay[i]))
        deliveries.append((last, 0, revision[i]))

    def answers(takeover_applied: float) -> list[tuple[float, float, bool]]:
        """(arrival, send, applied) of each answer A gets: refused once P's takeover
        was applied before the beat."""
        out = []
        for a, i in applied:
            if i == 0 or not s.ack_lost[i]:
                out.append((s.stalled(a + s.ack_delay[i]), sends[i], a < takeover_applied))
        return sorted(out)

    # A's holds, due by the answers it had when it sent each beat. Until P takes over
    # every world agrees on them: a refusal arrives only after, and P promises nothing
    # from then on.
    holds: list[tuple[float, int]] = []
    beats = Heartbeat(epoch, t, started=0.0)
    heard = answers(INF)
    for seq, x in enumerate(sends):
        while heard and heard[0][0] <= x:
            _, sent, ok = heard.pop(0)
            beats.answered(sent * s.rate_a, ok)
        if seq > 0 and beats.hold_due(x * s.rate_a):
            holds.append((x, seq))

    # P, in time order: a delivery, or a hold arriving. Before each, it takes over if the
    # rules let it before that event.
    arrivals = [(h + s.peer_delay[q] / 2, 1, q) for h, q in holds if not s.hold_lost[q]]
    events = sorted(deliveries + arrivals)
    view, promises = BeatView(), Promises()
    promised_until, busy_until = NONE, NONE
    given: dict[int, float] = {}  # hold seq: the promise's length
    tried: set[int] = set()
    takeover, takeover_applied = INF, INF
    for n in range(len(events) + 1):
        nxt = events[n][0] if n < len(events) else INF
        seen = view.seen
        due = takeover_due(seen, epoch, promised_until)
        if seen is not None and seen.revision not in tried and due / s.rate_p < nxt:
            tried.add(seen.revision)
            sent = due / s.rate_p
            applied_txn = s.stalled(sent + s.txn_delay)
            newest = max(r for r, a in applied_at.items() if a < applied_txn)
            busy_until = applied_txn
            if newest == seen.revision:
                takeover, takeover_applied = sent, applied_txn
                break
        if n == len(events):
            break
        when, kind, what = events[n]
        if kind == 0:
            view.delivered(what, t, when * s.rate_p)
            continue
        answer = promises.answer(
            Hold("a", what, epoch, s.ttl),
            when * s.rate_p,
            ttl=s.ttl,
            busy="a takeover in flight" if when <= busy_until else None,
            newest_epoch=epoch,
            seen_revision=seen.revision if seen else epoch,
        )
        if answer.promised:
            promised_until = max(promised_until, when * s.rate_p + answer.ttl)
            if not s.reply_lost[what]:
                given[what] = answer.ttl

    # A: the watchdog fires when A's clock reaches the deadline its agent last gave it;
    # the agent hears answers and promises until it freezes or its server dies.
    ledger = Ledger()
    for h, q in holds:
        ledger.sent(epoch, q, h * s.rate_a, s.ttl)
    beats = Heartbeat(epoch, t, started=0.0)
    news = [(a, 0, x, ok) for a, x, ok in answers(takeover_applied)]
    news += [(h + s.peer_delay[q], 1, float(q), True) for h, q in holds if q in given]

    def deadline() -> float:
        hold_point = ledger.deadline(["p"], s.ttl - s.fence_margin)
        return watchdog_deadline(INF, rule(beats.acked_send, t), hold_point, t, s.fence_margin)

    stop = s.crash
    for when, kind, x, ok in [*sorted(news), (INF, 2, 0.0, True)]:
        fire = deadline() / s.rate_a + s.kill
        if fire <= when or when >= end_a:
            stop = min(stop, fire)
            break
        if kind == 0:
            beats.answered(x * s.rate_a, ok)
            if not ok:  # the term is over in etcd: the agent fences at once
                stop = min(stop, when + s.kill)
                break
        else:
            ledger.answer(HoldReply("p", "a", int(x), epoch, True, ttl=given[int(x)]))
    return Outcome(stop_a=max(stop, 0.0), takeover=takeover)


def delays(n: int, long: float) -> st.SearchStrategy[tuple[float, ...]]:
    one = st.one_of(st.floats(0.0, 0.02), st.floats(0.0, long))
    return st.lists(one, min_size=n, max_size=n).map(tuple)


def flags(n: int) -> st.SearchStrategy[tuple[bool, ...]]:
    return st.lists(st.booleans(), min_size=n, max_size=n).map(tuple)


@st.composite
def schedules(draw: st.DrawFn, peer_path: bool = False, stall: bool = False) -> Schedule:
    """Any schedule the assumptions allow; ``stall``: one etcd stall of 0.3-0.6 s of an
    active that lives on, with its peer path up (a false failover's case)."""
    if stall:
        timing = TIMING
    else:
        interval = draw(st.floats(0.02, 0.1))
        timing = BeatTiming(
            interval, interval * draw(st.floats(3.0, 6.0)), draw(st.floats(0.05, 0.3))
        )
    ttl = draw(st.floats(1.0, 3.0))
    margin = draw(st.floats(0.1, ttl / 2))
    drift = draw(st.floats(0.0, min(timing.max_drift(), margin / (12 * ttl))))
    if stall:
        start = draw(st.floats(0.0, 1.0))
        stalls: tuple[tuple[float, float], ...] = ((start, start + draw(st.floats(0.3, 0.6))),)
        # A beats until well after the stall and its promises are over, then freezes.
        n = int((stalls[0][1] + ttl + 0.5) / timing.interval)
        crash, freeze = INF, n * timing.interval
        small = 0.02
    else:
        n = draw(st.integers(1, 40))
        windows = draw(st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 0.8)), max_size=3))
        stalls = tuple(sorted((a, a + length) for a, length in windows))
        crash = draw(st.one_of(st.just(INF), st.floats(0.0, 2.5)))
        freeze = draw(st.one_of(st.just(INF), st.floats(0.0, 2.5)))
        small = 0.6
    no_loss = st.just((False,) * n)
    return Schedule(
        timing=timing,
        ttl=ttl,
        fence_margin=margin,
        rate_a=draw(st.floats(1 - drift, 1 + drift)),
        rate_p=draw(st.floats(1 - drift, 1 + drift)),
        kill=draw(st.floats(0.0, min(timing.margin, margin) / 4)),
        beats=n,
        crash=crash,
        freeze=freeze,
        stalls=stalls,
        apply_delay=draw(delays(n, small)),
        lost=draw(no_loss if stall else flags(n)),
        ack_delay=draw(delays(n, small)),
        ack_lost=draw(no_loss if stall else flags(n)),
        watch_delay=draw(delays(n, small)),
        peer_delay=draw(delays(n, 0.02 if stall or peer_path else 0.5)),
        hold_lost=draw(no_loss if stall or peer_path else flags(n)),
        reply_lost=draw(no_loss if stall or peer_path else flags(n)),
        txn_delay=draw(st.floats(0.0, small)),
    )


@pytest.mark.long
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules())
def test_never_two_actives(s: Schedule) -> None:
    outcome = run(s)
    assert not outcome.overlap, outcome


@settings(max_examples=200, deadline=None)
@given(schedules(stall=True))
def test_an_etcd_stall_with_the_peer_path_moves_nothing(s: Schedule) -> None:
    outcome = run(s)
    # The active beats until it freezes, well after the stall: only then may it stop,
    # and only then may the standby take over.
    assert outcome.takeover > s.freeze, outcome
    assert outcome.stop_a > s.freeze, "the active kept its services on its peers' promises"


def test_a_crash_is_taken_over_after_fence_and_margin() -> None:
    n = 40
    s = Schedule(
        timing=TIMING,
        ttl=2.0,
        fence_margin=0.5,
        rate_a=1.0,
        rate_p=1.0,
        kill=0.0,
        beats=n,
        crash=1.0,
        freeze=INF,
        stalls=(),
        apply_delay=(0.002,) * n,
        lost=(False,) * n,
        ack_delay=(0.002,) * n,
        ack_lost=(False,) * n,
        watch_delay=(0.002,) * n,
        peer_delay=(0.001,) * n,
        hold_lost=(False,) * n,
        reply_lost=(False,) * n,
        txn_delay=0.002,
    )
    outcome = run(s)
    # The last beat before the crash was sent at 0.95 and delivered at 0.954.
    assert outcome.takeover == pytest.approx(0.954 + 0.3)
    assert outcome.stop_a == 1.0 and not outcome.overlap


def test_the_property_fails_with_the_fence_point_one_margin_late() -> None:
    def late(acked_send: float | None, timing: BeatTiming) -> float:
        return beat_fence_point(acked_send, timing) + timing.margin

    found = find(
        schedules(),
        lambda s: run(s, late).overlap,
        settings=settings(max_examples=5000, deadline=None, database=None),
    )
    assert run(found).overlap is False, "the rule as written holds on that very schedule"


# ---- the site file's option and the beat record ----------------------------------------


def beat_site(term_beat: object, network: bool = True, **failover: object) -> dict[str, object]:
    pair: dict[str, object] = {
        "name": "asm",
        "nodes": [
            {"name": "asm-a", "address": "127.0.0.11"},
            {"name": "asm-b", "address": "127.0.0.12"},
        ],
        "failover": {"term_beat": term_beat, **failover},
    }
    if network:
        pair["network"] = {}
    return {"site": "s", "workshops": [{"name": "w", "pairs": [pair]}]}


def test_the_beat_is_off_unless_the_site_sets_it() -> None:
    assert Failover().term_beat is None
    site = parse_site(beat_site({}), "site.yaml")
    beat = site.workshops[0].pairs[0].failover.term_beat
    assert beat == TermBeat(interval_ms=50, fence_ms=150, margin_ms=150)


@pytest.mark.parametrize(
    ("term_beat", "network", "failover", "problem"),
    [
        ({"interval_ms": 100}, True, {}, "fence_ms (150) must be at least three beats"),
        ({"fence_ms": 1000, "margin_ms": 500}, True, {}, "must be below the lease's fence point"),
        (
            {"fence_ms": 600, "margin_ms": 400},
            True,
            {"fence_margin_s": 1.0},
            "takes a pair over 1 s after the last beat (fence_ms + margin_ms), which must be "
            "below the lease's fence point (1 s, lease_ttl_s - fence_margin_s)",
        ),
        ({}, False, {}, "failover.term_beat needs the pair's network section"),
        ({"interval_ms": 5}, True, {}, "interval_ms"),
        ({"margin_ms": 10}, True, {}, "margin_ms"),
    ],
)
def test_beat_timings_that_cannot_be_safe_or_useful_are_refused(
    term_beat: dict[str, int], network: bool, failover: dict[str, float], problem: str
) -> None:
    with pytest.raises(TopologyError) as info:
        parse_site(beat_site(term_beat, network, **failover), "site.yaml")
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_the_beat_record_carries_the_terms_timings() -> None:
    value = beat_record("asm-a", TIMING)
    assert beat_timing(keys.beat("asm"), value) == TIMING
    assert beat_timing(keys.beat("asm"), b"garbage") is None, "no beat: the lease decides"


def test_no_mirror_of_the_layout_receives_the_beats() -> None:
    assert not keys.beat("asm").startswith(keys.PREFIX + "/")
    assert not keys.PREFIX + "/" <= keys.beat("asm") < keys.PREFIX + "0"
