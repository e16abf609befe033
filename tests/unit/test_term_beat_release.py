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

import heapq
import itertools

from hypothesis import HealthCheck, given, settings

from hapair.workshop_agent.hold import Ledger, Promises
from hapair.workshop_agent.peer_wire import Hold, HoldReply
from hapair.workshop_agent.term_beat import (
    NONE,
    BeatView,
    Heartbeat,
    beat_fence_point,
    beat_needed,
    guard_point,
    takeover_due,
    watchdog_deadline,
)
from tests.unit.test_term_beat import (
    ACK,
    APPLY,
    DELIVER,
    HOLD,
    INF,
    PEERS,
    REPLY,
    TICK,
    TIMING,
    TXN,
    Event,
    Outcome,
    Schedule,
    promised_point,
    schedules,
)

RELEASE = 7


class OlderPromises(Promises):
    """A standby of the version before: a release ended its short promises too."""

    def release(self, node: str, epoch: int) -> None:
        super().release(node, epoch)
        given = self._short.get(node)
        if given is not None and given.epoch <= epoch:
            del self._short[node]


def run(
    s: Schedule,
    stats: dict[str, int] | None = None,
    older_standby: bool = False,
    forget: bool = True,
) -> Outcome:
    """``older_standby``: P of the version before; ``forget``: A forgets, at the
    release, the short promises of a standby that does not keep them (the rule under
    test; False shows what it prevents)."""
    t, epoch = s.timing, 1
    end_a = min(s.crash, s.freeze)
    queue: list[Event] = []
    made = itertools.count()

    def at(when, kind, k=0, ok=True, r=None):
        heapq.heappush(queue, Event(when, kind, next(made), k, ok, r))

    beats = Heartbeat(epoch, t, started=0.0)
    short, long = Ledger(), Ledger()
    asking, calm_since = False, None
    written = [0]
    beat_sent = {0: 0.0}
    hold_sent: dict[int, float] = {}
    stop = None
    datagram = itertools.count(1)  # A's peer-path numbering
    number: dict[int, int] = {}  # hold or release id: its datagram number
    last_taken = 0  # P: the newest datagram number it took from A

    def guard():
        return guard_point(beat_fence_point(beats.acked_send, t), promised_point(short, t))

    def deadline():
        hold_point = long.deadline(PEERS, s.ttl - s.fence_margin)
        return watchdog_deadline(INF, guard(), hold_point, t, s.fence_margin)

    newest, revisions, delivered = 0, itertools.count(epoch), 0.0
    won = False
    view = BeatView()
    promises = OlderPromises() if older_standby else Promises()
    tried: set[int] = set()
    in_flight = None
    takeover = INF
    releases = itertools.count(10**6)

    def send(kind_id: int, when: float, lost: bool, delay: float) -> None:
        number[kind_id] = next(datagram)
        if not lost and when < s.peer_cut:
            at(when + delay / 2, RELEASE if kind_id >= 10**6 else HOLD, kind_id)

    def tick(k, now):
        nonlocal asking, calm_since
        now_a = now * s.rate_a
        point = promised_point(short, t)
        beat = False
        release_now = False
        if k > 0:
            late = guard()  # the change: the promises count while asking too
            # A keepalive late (etcd stalled): the lease's own rule asks too.
            ka_late = any(a + 0.05 <= now < b + 0.05 for a, b in s.stalls)
            if ka_late or now_a >= late - t.fence_after + t.hold_after:
                asking, calm_since = True, None
                long.sent(epoch, 2 * k + 1, now_a, s.ttl)
                hold_sent[2 * k + 1] = now
                send(2 * k + 1, now, s.long_lost[k], s.long_delay[k])
            elif asking:
                calm_since = now_a if calm_since is None else calm_since
                if now_a >= calm_since + s.ttl / 2:
                    asking, calm_since = False, None
                    long.clear()  # the watchdog has the point without it first
                    if forget:
                        short.released()
                    if stats is not None:
                        stats["released"] = stats.get("released", 0) + 1
                    release_now = True
            beat = asking or beat_needed(now_a, point, t)
        if beat:
            written.append(k)
            beat_sent[k] = now_a
            if not s.lost[k]:
                at(s.stalled(now + s.apply_delay[k]), APPLY, k)
        short.sent(epoch, 2 * k, now_a, t.takeover_after)
        hold_sent[2 * k] = now
        send(2 * k, now, s.hold_lost[k], s.peer_delay[k])
        if release_now:  # after the tick's hold: the hold loop runs apart from the beats
            send(next(releases), now + 1e-4, s.long_lost[k], s.long_delay[k])
            if stats is not None:
                stats["release_sent"] = stats.get("release_sent", 0) + 1
        if k + 1 < s.beats:
            at((k + 1) * t.interval / s.rate_a, TICK, k + 1)

    at(s.stalled(s.apply_delay[0]), APPLY, 0)
    at(0.0, TICK, 0)
    now = 0.0
    while True:
        when = queue[0].when if queue else INF
        if stop is None:
            fire = deadline() / s.rate_a + s.kill
            if fire <= when or when >= end_a:
                # A refusal may move the point into the past: A fences then, at ``now``.
                stop = min(s.crash, fire if fire >= now else now + s.kill)
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
                if stats is not None:
                    stats["release_taken"] = stats.get("release_taken", 0) + 1
        elif ev.kind == HOLD:
            if number[ev.k] <= last_taken:
                continue  # PeerAuth: below the last taken from that run
            last_taken = number[ev.k]
            k, is_long = divmod(ev.k, 2)
            answer = promises.answer(
                Hold("a", ev.k, epoch, s.ttl if is_long else t.takeover_after, beat=not is_long),
                now * s.rate_p,
                ttl=s.ttl,
                busy=None if in_flight is None and not won else "a takeover in flight",
                newest_epoch=epoch,
                seen_revision=seen.revision if seen else epoch,
            )
            lost = s.long_reply_lost[k] if is_long else s.reply_lost[k]
            if not lost and now < s.peer_cut:
                trip = s.long_delay[k] if is_long else s.peer_delay[k]
                kept = answer.promised and not is_long and not older_standby
                reply = HoldReply("p", "a", ev.k, epoch, *answer, kept=kept)
                at(hold_sent[ev.k] + trip, REPLY, r=reply)
        elif stop is not None:
            continue
        elif ev.kind == ACK:
            beats.answered(beat_sent[ev.k], ev.ok)
            if not ev.ok:
                stop = min(s.crash, now + s.kill)
        elif ev.kind == REPLY:
            (long if ev.reply.seq % 2 else short).answer(ev.reply)
        else:
            tick(ev.k, now)
    return Outcome(stop_a=max(stop, 0.0), takeover=takeover, written=tuple(written))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(schedules())
def test_never_two_actives_with_releases(s: Schedule) -> None:
    assert not run(s).overlap


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(schedules(stall=True))
def test_stall_with_releases(s: Schedule) -> None:
    o = run(s)
    assert not o.overlap
    assert o.takeover > s.freeze and o.stop_a > s.freeze, o


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(schedules(stall=True))
def test_stall_with_slow_etcd_answers(s: Schedule) -> None:
    import dataclasses

    s = dataclasses.replace(
        s, ack_delay=(0.12,) * s.beats, apply_delay=(0.06,) * s.beats, watch_delay=(0.0,) * s.beats
    )
    o = run(s)
    assert not o.overlap
    assert o.takeover > s.freeze and o.stop_a > s.freeze, o


def older_standby_schedule() -> Schedule:
    """etcd stalls from 0.2 to 0.5 s and applies no beat after the fourth while the
    keepalives flow: the active asks for holds, counts its peer's promises, and releases
    it at about 1.05 s; its peer's beat view is then long past."""
    n = 40
    return Schedule(
        timing=TIMING,
        ttl=1.0,
        fence_margin=0.5,
        rate_a=1.0,
        rate_p=1.0,
        kill=0.0,
        beats=n,
        crash=INF,
        freeze=1.8,
        stalls=((0.2, 0.5),),
        apply_delay=(0.002,) * n,
        lost=tuple(k >= 4 for k in range(n)),
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


def test_a_standby_of_the_version_before_is_counted_on_only_until_the_release() -> None:
    """A rolling update: the active keeps counting short promises past a release, which
    a standby of the version before ends at the release. That standby's replies do not
    say they are kept, so the active forgets its promises then (and the answers to holds
    sent before): without that, the standby, free until the next short hold reaches it,
    takes over while the active still counts the promise it dropped."""
    s = older_standby_schedule()
    stats: dict[str, int] = {}
    assert not run(s, stats).overlap, "this version's standby keeps the short promise"
    assert stats["release_taken"] >= 1, stats  # the model does release
    assert not run(s, older_standby=True).overlap
    unforgotten = run(s, older_standby=True, forget=False)
    assert unforgotten.overlap and unforgotten.takeover < unforgotten.stop_a, unforgotten
