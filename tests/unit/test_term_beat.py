"""The term beat's rules (term_beat.py): the active's fence point from its acknowledged
beats and its peers' promises, a standby's takeover time from the beats it saw and its
promises, and the safety claim over random schedules of sends, etcd delays, losses and
stalls, watch delays, freezes, crashes, peer path delays, losses and cuts, promises for
the beats and holds for the lease, with clocks drifting within the bound the argument
allows; and what the promises save: with the peer path up the active writes no beat to
etcd after its campaign's, and with the path cut (etcd quick) it beats in etcd again in time."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

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
    beat_needed,
    guard_point,
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
PromiseRule = Callable[[Ledger, BeatTiming], float]
PEERS = ("p",)


def promised_point(ledger: Ledger, timing: BeatTiming) -> float:
    """The active's promised point, as ``Beating`` takes it: ``fence_after`` from the send
    of the oldest of its peers' latest promised holds."""
    return ledger.deadline(PEERS, timing.fence_after)


@dataclass(frozen=True)
class Schedule:
    """One run, in real seconds. The active A ticks every interval on its own clock from
    its campaign (tick 0, sent at 0, which wrote the term's first beat; the loop's first
    beat, which follows the campaign's answer, is that one in the model). At every tick
    it asks P to hold for one takeover time (a *short* hold), and writes the tick's beat
    to etcd only when P's promises it heard of by then do not stand in for it, or while
    it asks P to hold for the lease (a *long* hold, asked at each tick at which its guard
    is late; once it asked, it goes on beating in etcd: the model never releases P). P
    watches the beat key, answers every hold, and takes over when the rules let it.

    Per tick: its beat's delay to etcd (or lost), its answer's delay (or lost), its
    delivery delay to P's watch; the round trip of its short hold on the peer path (the
    hold arrives half-way), the hold or the reply lost; the same for its long hold. The
    peer path carries nothing sent from ``peer_cut`` on."""

    timing: BeatTiming
    ttl: float  # the lease's TTL, which is also the length of a long hold's promise
    fence_margin: float  # the lease's
    rate_a: float  # how fast each node's clock runs against real time
    rate_p: float
    kill: float  # from the watchdog's deadline to its SIGKILL landing
    beats: int  # A ticks this many times at most (its beat loop stops then)
    crash: float  # A's server dies, its services with it
    freeze: float  # A's agent stops (its watchdog runs on)
    stalls: tuple[tuple[float, float], ...]  # etcd applies and delivers nothing in [start, end)
    apply_delay: tuple[float, ...]
    lost: tuple[bool, ...]
    ack_delay: tuple[float, ...]
    ack_lost: tuple[bool, ...]
    watch_delay: tuple[float, ...]
    peer_delay: tuple[float, ...]  # a short hold's round trip
    hold_lost: tuple[bool, ...]
    reply_lost: tuple[bool, ...]
    long_delay: tuple[float, ...]  # a long hold's round trip
    long_lost: tuple[bool, ...]
    long_reply_lost: tuple[bool, ...]
    peer_cut: float  # the peer path is down from then on (inf: never)
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
    written: tuple[int, ...]  # the ticks whose beat A sent to etcd (0: the campaign's)

    @property
    def overlap(self) -> bool:
        return self.stop_a > self.takeover


# What happens, in the order of its instant; at one instant, in this order. A takeover
# applied at the instant a beat is applied comes first (the beat is refused).
TXN, APPLY, DELIVER, HOLD, ACK, REPLY, TICK, RELEASE = range(8)


class Event(NamedTuple):
    when: float
    kind: int
    n: int  # the order of making, for a total order: no field below is ever compared
    k: int = 0  # the tick (APPLY, ACK, TICK), the revision (DELIVER), the hold (HOLD)
    ok: bool = True  # ACK: applied, rather than refused
    reply: HoldReply | None = None  # REPLY


class OlderPromises(Promises):
    """A standby of the version before: a release ended its short promises too."""

    def release(self, node: str, epoch: int) -> None:
        super().release(node, epoch)
        given = self._short.get(node)
        if given is not None and given.epoch <= epoch:
            del self._short[node]


RELEASES = 10**6  # the ids of releases start here, above every hold's


def run(
    s: Schedule,
    rule: FenceRule = beat_fence_point,
    promised: PromiseRule = promised_point,
    *,
    stats: dict[str, int] | None = None,
    keepalives: bool = False,
    older_standby: bool = False,
    forget: bool = True,
) -> Outcome:
    """Play ``s`` out in real time. ``rule`` and ``promised`` give A's beat point and its
    promised point (production's by default; the falsification tests move them).
    ``stats`` counts releases; ``keepalives``: a keepalive is late 50 ms into a stall,
    and A asks for holds for the lease then too; ``older_standby``: P of the version
    before, whose release
    ended its short promises too; ``forget``: A forgets, at the release, the short
    promises of a peer that does not keep them (False shows what that prevents)."""
    t, epoch = s.timing, 1
    end_a = min(s.crash, s.freeze)  # A's agent sends and hears nothing from then on
    queue: list[Event] = []
    made = itertools.count()

    def at(when: float, kind: int, k: int = 0, ok: bool = True, r: HoldReply | None = None) -> None:
        heapq.heappush(queue, Event(when, kind, next(made), k, ok, r))

    def count(what: str) -> None:
        if stats is not None:
            stats[what] = stats.get(what, 0) + 1

    # A: its beats, the promises of its short holds and of its long ones. Hold 2k is
    # tick k's short hold, 2k + 1 its long one.
    beats = Heartbeat(epoch, t, started=0.0)
    short, long = Ledger(), Ledger()
    asking, calm_since = False, None
    written = [0]
    beat_sent = {0: 0.0}  # tick: the send of its beat, on A's clock
    hold_sent: dict[int, float] = {}  # hold: its send, in real time
    stop: float | None = None  # when A's services are gone for sure, once known
    # The peer path numbers A's datagrams; P drops one below the last it took.
    datagram = itertools.count(1)
    number: dict[int, int] = {}  # hold or release: its datagram's number
    last_taken = 0
    releases = itertools.count(RELEASES)

    def guard() -> float:
        return guard_point(rule(beats.acked_send, t), promised(short, t))

    def deadline() -> float:
        hold_point = long.deadline(PEERS, s.ttl - s.fence_margin)
        return watchdog_deadline(INF, guard(), hold_point, t, s.fence_margin)

    # etcd: each beat that reaches it after any stall, in the order it does, gets the
    # next revision; P's watch delivers them in that order too. Once P's takeover is
    # applied, every beat is refused.
    newest, revisions, delivered = 0, itertools.count(epoch), 0.0
    won = False
    # P: the newest beat its watch delivered, the promises it gave, its takeovers.
    view = BeatView()
    promises = OlderPromises() if older_standby else Promises()
    tried: set[int] = set()  # the beat revisions P tried a takeover on, once each
    in_flight: tuple[float, int] | None = None  # (sent, revision guarded on)
    takeover = INF

    def send(n: int, when: float, lost: bool, delay: float) -> None:
        number[n] = next(datagram)
        if not lost and when < s.peer_cut:
            at(when + delay / 2, RELEASE if n >= RELEASES else HOLD, n)

    def tick(k: int, now: float) -> None:
        nonlocal asking, calm_since
        now_a = now * s.rate_a
        point = promised(short, t)
        beat = release = False
        if k > 0:  # the campaign's beat stands for the loop's first
            # Beating.hold_instant: two intervals after the guard's send; or a keepalive
            # late (etcd stalled), as the lease's own rule asks.
            late = now_a >= guard() - t.fence_after + t.hold_after
            stalled = keepalives and any(a + 0.05 <= now < b + 0.05 for a, b in s.stalls)
            if late or stalled:
                asking, calm_since = True, None
                long.sent(epoch, 2 * k + 1, now_a, s.ttl)
                hold_sent[2 * k + 1] = now
                send(2 * k + 1, now, s.long_lost[k], s.long_delay[k])
            elif asking:
                calm_since = now_a if calm_since is None else calm_since
                if now_a >= calm_since + s.ttl / 2:  # Holding.run: released
                    asking, calm_since, release = False, None, True
                    long.clear()  # the watchdog has the point without it first
                    if forget:
                        short.released()
                    count("released")
            beat = asking or beat_needed(now_a, point, t)
        if beat:
            written.append(k)
            beat_sent[k] = now_a
            if not s.lost[k]:
                at(s.stalled(now + s.apply_delay[k]), APPLY, k)
        short.sent(epoch, 2 * k, now_a, t.takeover_after)
        hold_sent[2 * k] = now
        send(2 * k, now, s.hold_lost[k], s.peer_delay[k])
        if release:  # after the tick's hold: the hold loop runs apart from the beats
            send(next(releases), now + 1e-4, s.long_lost[k], s.long_delay[k])
        if k + 1 < s.beats:
            at((k + 1) * t.interval / s.rate_a, TICK, k + 1)

    at(s.stalled(s.apply_delay[0]), APPLY, 0)  # the campaign's beat
    at(0.0, TICK, 0)
    now = 0.0
    while True:
        when = queue[0].when if queue else INF
        # A's watchdog fires when A's clock reaches the deadline its agent last gave it.
        if stop is None:
            fire = deadline() / s.rate_a + s.kill
            if fire <= when or when >= end_a:
                # A refusal may move the deadline into the past: A stops from now on,
                # not at that past instant, which would hide an overlap.
                stop = min(s.crash, fire if fire >= now else now + s.kill)
        # P takes over as soon as the rules let it, one takeover at a time.
        seen = view.seen
        if not won and in_flight is None and seen is not None and seen.revision not in tried:
            binding = promises.binding(now * s.rate_p)
            due = takeover_due(seen, epoch, NONE if binding is None else binding.until)
            if due / s.rate_p < when:
                sent = max(now, due / s.rate_p)
                tried.add(seen.revision)
                in_flight = (sent, seen.revision)
                at(s.stalled(sent + s.txn_delay), TXN)
                continue
        if not queue:
            break
        ev = heapq.heappop(queue)
        now = ev.when
        if ev.kind == TXN:
            assert in_flight is not None
            if newest == in_flight[1]:
                won, takeover = True, in_flight[0]
            in_flight = None
        elif ev.kind == APPLY:
            back = s.stalled(now + s.ack_delay[ev.k])
            if not won:
                newest = next(revisions)
                delivered = max(delivered, s.stalled(now + s.watch_delay[ev.k]))
                at(delivered, DELIVER, newest)
            if ev.k == 0 or not s.ack_lost[ev.k]:
                at(back, ACK, ev.k, ok=not won)
        elif ev.kind == DELIVER:
            view.delivered(ev.k, t, now * s.rate_p)
        elif ev.kind == RELEASE:
            if number[ev.k] > last_taken:
                last_taken = number[ev.k]
                promises.release("a", epoch)
                count("release_taken")
        elif ev.kind == HOLD:
            if number[ev.k] <= last_taken:
                continue  # PeerAuth: below the last taken from that run
            last_taken = number[ev.k]
            k, is_long = divmod(ev.k, 2)
            hold = Hold("a", ev.k, epoch, s.ttl if is_long else t.takeover_after, not is_long)
            answer = promises.answer(
                hold,
                now * s.rate_p,
                ttl=s.ttl,
                busy=None if in_flight is None and not won else "a takeover in flight",
                newest_epoch=epoch,
                seen_revision=seen.revision if seen else epoch,
            )
            lost = s.long_reply_lost[k] if is_long else s.reply_lost[k]
            if not lost and now < s.peer_cut:
                trip = s.long_delay[k] if is_long else s.peer_delay[k]
                reply = HoldReply.answering(hold, "p", *answer)
                if older_standby:
                    reply = replace(reply, kept=False)
                at(hold_sent[ev.k] + trip, REPLY, r=reply)
        elif stop is not None:
            continue  # A's services are gone, or its agent hears nothing any more
        elif ev.kind == ACK:
            beats.answered(beat_sent[ev.k], ev.ok)
            if not ev.ok:  # the term is over in etcd: the agent fences at once
                stop = min(s.crash, now + s.kill)
        elif ev.kind == REPLY:
            assert ev.reply is not None
            (long if ev.reply.seq % 2 else short).answer(ev.reply)
        else:
            tick(ev.k, now)
    assert stop is not None
    return Outcome(stop_a=max(stop, 0.0), takeover=takeover, written=tuple(written))


def delays(n: int, long: float) -> st.SearchStrategy[tuple[float, ...]]:
    one = st.one_of(st.floats(0.0, min(0.02, long)), st.floats(0.0, long))
    return st.lists(one, min_size=n, max_size=n).map(tuple)


def flags(n: int) -> st.SearchStrategy[tuple[bool, ...]]:
    return st.lists(st.booleans(), min_size=n, max_size=n).map(tuple)


@st.composite
def schedules(
    draw: st.DrawFn, peer_path: bool = False, stall: bool = False, cut: bool = False
) -> Schedule:
    """Any schedule the assumptions allow. ``peer_path``: the peer path up throughout,
    nothing lost on it and every round trip within 10 ms (below the shortest interval);
    ``stall``: one etcd stall of 0.3-0.6 s of an active that lives on, with its peer path
    up (a false failover's case); ``cut``: etcd well (no stall, nothing lost, every delay
    within 20 ms), the peer path up until a random instant and down from then on, and an
    active that lives on until every promise it had ran out."""
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
    rate_a = draw(st.floats(1 - drift, 1 + drift))
    peer_cut = INF
    if stall:
        start = draw(st.floats(0.0, 1.0))
        stalls: tuple[tuple[float, float], ...] = ((start, start + draw(st.floats(0.3, 0.6))),)
        # A beats until well after the stall and its promises are over, then freezes.
        n = int((stalls[0][1] + ttl + 0.5) / timing.interval)
        crash, freeze = INF, n * timing.interval
        small = 0.02
    elif cut:
        peer_cut = draw(st.floats(0.0, 1.5))
        stalls = ()
        # A beats until every promise it had is over, then freezes.
        crash, freeze = INF, peer_cut + ttl + 0.5
        n = int(freeze * rate_a / timing.interval) + 2
        small = 0.02
    else:
        n = draw(st.integers(1, 40))
        windows = draw(st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 0.8)), max_size=3))
        stalls = tuple(sorted((a, a + length) for a, length in windows))
        crash = draw(st.one_of(st.just(INF), st.floats(0.0, 2.5)))
        freeze = draw(st.one_of(st.just(INF), st.floats(0.0, 2.5)))
        if not peer_path:
            peer_cut = draw(st.one_of(st.just(INF), st.floats(0.0, 2.5)))
        small = 0.6
    no_loss = st.just((False,) * n)
    well = stall or cut  # etcd loses nothing
    up = stall or cut or peer_path  # the peer path loses nothing (until any cut)
    peer = 0.01 if peer_path else 0.02 if stall or cut else 0.5
    return Schedule(
        timing=timing,
        ttl=ttl,
        fence_margin=margin,
        rate_a=rate_a,
        rate_p=draw(st.floats(1 - drift, 1 + drift)),
        kill=draw(st.floats(0.0, min(timing.margin, margin) / 4)),
        beats=n,
        crash=crash,
        freeze=freeze,
        stalls=stalls,
        apply_delay=draw(delays(n, small)),
        lost=draw(no_loss if well else flags(n)),
        ack_delay=draw(delays(n, small)),
        ack_lost=draw(no_loss if well else flags(n)),
        watch_delay=draw(delays(n, small)),
        peer_delay=draw(delays(n, peer)),
        hold_lost=draw(no_loss if up else flags(n)),
        reply_lost=draw(no_loss if up else flags(n)),
        long_delay=draw(delays(n, peer)),
        long_lost=draw(no_loss if up else flags(n)),
        long_reply_lost=draw(no_loss if up else flags(n)),
        peer_cut=peer_cut,
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


@settings(max_examples=200, deadline=None)
@given(schedules(peer_path=True))
def test_with_the_peer_path_up_the_active_writes_no_beat_after_its_campaign(s: Schedule) -> None:
    """The cost claim: every promise back before the next tick, the promises stand in
    for every beat, whatever etcd does meanwhile (stalls, delays, losses)."""
    outcome = run(s)
    assert outcome.written == (0,), outcome
    assert not outcome.overlap, outcome


@settings(max_examples=200, deadline=None)
@given(schedules(cut=True))
def test_with_the_peer_path_cut_the_active_beats_in_etcd_in_time(s: Schedule) -> None:
    """The peer path cut at any instant while etcd is well: the active misses a promise
    and beats in etcd before the standby's promise runs out, so the standby never takes
    over while the active lives, nor does its watchdog stop it. Only for small etcd
    delays (20 ms each way, the watch's included): a beat one promise late has about an
    interval plus half the margin to be acknowledged, and one whose round trip takes
    longer (the model allows 0.6 s elsewhere) rightly loses the term."""
    outcome = run(s)
    assert outcome.takeover > s.freeze, outcome
    assert outcome.stop_a > s.freeze, outcome
    assert any(k * s.timing.interval / s.rate_a >= s.peer_cut for k in outcome.written)


def steady(n: int = 40, **changes: Any) -> Schedule:
    """``n`` ticks of a well pair: etcd answers in 2 ms, the peer path in 1 ms, nothing
    lost, nothing stalled, no crash; ``changes`` replace any of it."""
    s = Schedule(
        timing=TIMING,
        ttl=2.0,
        fence_margin=0.5,
        rate_a=1.0,
        rate_p=1.0,
        kill=0.0,
        beats=n,
        crash=INF,
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
        long_delay=(0.001,) * n,
        long_lost=(False,) * n,
        long_reply_lost=(False,) * n,
        peer_cut=INF,
        txn_delay=0.002,
    )
    return replace(s, **changes)


def test_a_crash_is_taken_over_after_fence_and_margin() -> None:
    s = steady(crash=1.0)
    outcome = run(s)
    # Every promise is back within a millisecond, so etcd has only the campaign's beat
    # (delivered at 0.004): P waits for the end of its promise on the last hold it got,
    # sent at 0.95 (the last tick before the crash) and arriving half a round trip
    # later, at 0.9505; a promise lasts one takeover time, 0.3.
    assert outcome.written == (0,)
    assert outcome.takeover == pytest.approx(0.9505 + 0.3)
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


def test_the_property_fails_with_the_promised_point_one_margin_late() -> None:
    def late(ledger: Ledger, timing: BeatTiming) -> float:
        # The promise's whole length (fence_after + margin), not fence_after.
        return ledger.deadline(PEERS, timing.takeover_after)

    found = find(
        schedules(),
        lambda s: run(s, promised=late).overlap,
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
