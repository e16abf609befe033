"""The term beat in the agent: the active's beats, and a standby's view of them.

The rules and why they never give two actives are ``term_beat.py``'s, the transactions
``beat_election.py``'s; this module carries them: a loop that beats every interval while
this node holds a term that beats (each beat sent on time, whatever the answers of the
earlier ones, so that an etcd stall delays answers, not sends), and a copy of the pair's
beat key kept by a watch of its own, outside the pairs' keys (``keys.beats_of``).

The copy is kept only while this node does not beat a term itself: its own beats are
news to nobody, and delivering them cost the active about a third of what beating costs
it. Once its term ends (or stops beating) it reads the key afresh and follows it again,
and until that copy is current it takes no term over by beat.

Every interval the active also asks its peers, over the peer path, for a promise not to
take its term over for one takeover time (``fence_after + margin``), and sends the beat to
etcd only when their promises do not stand in for it (:func:`term_beat.beat_needed`):
with the peer path up, a beating term writes nothing to etcd after its first beat. A
promise or an acknowledged beat moves the fence point (``fencing.py``) without waking the
decision loop: only the fence timer and the watchdog need each one. A beat refused ends the term
at once. A standby's view wakes the loop only when a beat of a newer term arrives (from
then on the decision's own ``due`` instant follows the beats).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from hapair.shared import keys
from hapair.shared.clock import Clock
from hapair.shared.lease import Session
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.slowest import Slowest, late_wake
from hapair.shared.store import Change, Store, StoreError, bounded
from hapair.shared.topology import Pair, TermBeat
from hapair.shared.txn import Op
from hapair.workshop_agent.beat_election import TermBeats, beat_record, beat_timing
from hapair.workshop_agent.hold import Ledger
from hapair.workshop_agent.peer_wire import HoldReply
from hapair.workshop_agent.pg import hooks
from hapair.workshop_agent.term_beat import (
    NONE,
    BeatTiming,
    BeatView,
    Heartbeat,
    TakeoverGuard,
    answered,
    beat_needed,
    guard_point,
    takeover_due,
)


def timing_of(spec: TermBeat | None) -> BeatTiming | None:
    """A site file's ``failover.term_beat`` as the rules' timings (None: no beats)."""
    if spec is None:
        return None
    return BeatTiming(spec.interval_ms / 1000, spec.fence_ms / 1000, spec.margin_ms / 1000)


def late_instant(point: float, timing: BeatTiming) -> float:
    """When a guard whose fence point is ``point`` is late: two intervals after the send
    that set it (one beat, or one promised hold, missing)."""
    return point - timing.fence_after + timing.hold_after


class Beating:
    """One node's beats and view of its pair's beats.

    ``timing`` gives the pair's beat timings now (None: the pair does not beat);
    ``term`` the term this node holds; ``epoch`` the newest term its view of the pair
    shows; ``moved`` re-arms the fence timer and the watchdog on a new fence point;
    ``refused`` fences (the term is over in etcd); ``wake`` wakes the decision loop;
    ``late`` wakes the hold loop (a beat late enough to ask the peers to hold); ``peers``
    names the nodes whose promises the term's guard needs (those that may take it over
    by beat, ``candidates.beat_peers``); ``asked`` those whose promises must all stand
    in for a beat before it stays out of etcd (every node a hold needs, ``peers`` by
    default); ``ask`` sends them a hold of a given length for a term, returning its
    (seq, sent at), None without a peer path; ``asking`` says whether the hold loop asks
    them to hold for the lease meanwhile (then the beats go to etcd whatever the
    promises)."""

    def __init__(
        self,
        store: Store,
        pair: str,
        me: str,
        session: Session,
        clock: Clock,
        log: EventLog,
        *,
        timing: Callable[[], BeatTiming | None],
        term: Callable[[], int | None],
        epoch: Callable[[], int | None],
        moved: Callable[[], None],
        refused: Callable[[], None],
        wake: Callable[[], None],
        late: Callable[[], None] = lambda: None,
        peers: Callable[[], Iterable[str]] = frozenset,
        asked: Callable[[], Iterable[str]] | None = None,
        ask: Callable[[int, float], tuple[int, float] | None] = lambda epoch, ttl: None,
        asking: Callable[[], bool] = lambda: False,
    ) -> None:
        self.beats = TermBeats(store, pair, me)
        self.session = session
        self.clock = clock
        self.log = log
        self.me = me
        self._timing = timing
        self._term = term
        self._epoch = epoch
        self._moved = moved
        self._refused = refused
        self._wake = wake
        self._late = late
        self._peers = peers
        self._asked = asked or peers
        self._ask = ask
        self._asking = asking
        self._late_at: float | None = None
        self.heartbeat: Heartbeat | None = None  # the beats of the term this node holds
        self.promised = Ledger()  # the peers' promises that stand in for its beats
        self._refusals: dict[str, str] = {}  # for logging changes only
        # The check for the promises due on the hold just sent: (timer, term's beats,
        # hold sent at, nodes asked).
        self._awaited: tuple[asyncio.TimerHandle, Heartbeat, float, frozenset[str]] | None = None
        self.view = BeatView()
        self.mirror = self._new_mirror()
        self._begun = asyncio.Event()  # this node beats a term: nothing to follow
        self._others = asyncio.Event()  # it does not: follow the pair's beats
        self._others.set()
        self._watching = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self._decoded: tuple[bytes, BeatTiming | None] = (b"", None)
        self.beats_sent = 0  # since the agent started, for the metrics
        self.beats_refused = 0
        self.beats_promised = 0  # beats the peers' promises stood in for
        self.slowest = Slowest()  # from each beat's send to etcd's answer, lately
        self.lag = Slowest()  # how late the beat loop woke up, lately

    # -- the active -------------------------------------------------------------------
    def pair_timing(self) -> BeatTiming | None:
        """The pair's beat timings now (None: it does not beat); a campaign reads them
        once, for the beat it writes and the term it begins alike."""
        return self._timing()

    def first_beat(self, lease: int, timing: BeatTiming | None) -> list[Op]:
        """The writes a campaign adds so that its term beats from its first revision."""
        return [] if timing is None else [self.beats.first_beat(lease, timing)]

    def begin(self, epoch: int, started: float | None, timing: BeatTiming | None) -> None:
        """This node holds ``epoch`` from now on; ``started``: the send of the write
        that gave it the term with a beat in it (its campaign, or the first beat of a
        term taken up), carrying ``timing`` (None: the term does not beat). The term
        beats with these timings until it ends, whatever the pair's are meanwhile: its
        standbys measure it by the ones its beats carry.

        The fence timer and the watchdog follow at once (the term must be this node's
        already): until its next beat is acknowledged, the watchdog would otherwise keep
        the deadline it had as a standby, the lease's, and an agent frozen meanwhile
        would leave its services running past the standby's takeover."""
        if timing is None or started is None:
            self.heartbeat = None
            self._beats_mine(False)
        else:
            self.heartbeat = Heartbeat(epoch, timing, started)
            self._beats_mine(True)
        self._moved()

    def _beats_mine(self, mine: bool) -> None:
        if mine:
            self._others.clear()
            self._begun.set()
        else:
            self._begun.clear()
            self._others.set()

    async def term_timing(self, epoch: int) -> BeatTiming | None:
        """The timings a term of this node's lease taken up again beats with: those of
        its beats if it beats already (fixed for the term: a standby that saw one may
        take the term over once they stop, beats turned off since or not), else the
        pair's now. Differing from the pair's, the term is renewed instead when it can
        be (``take_over.py``). Raises StoreError if etcd does not say."""
        hb = self.heartbeat
        if hb is not None and hb.epoch == epoch:
            return hb.timing
        if self._watching:  # only then can this run have written beats
            kv = await self.beats.store.get(self.beats.key)
            if kv is not None and kv.mod_revision >= epoch:
                timing = self._decode(kv.value)
                if timing is not None:
                    return timing
        return self._timing()

    async def beat_once(self, epoch: int, timing: BeatTiming) -> float | None:
        """One beat for ``epoch`` outside the loop (a term taken up rather than won):
        its send time if etcd applied it, else None."""
        lease = self.session.lease
        if lease is None or hooks.held("beat"):
            return None
        sent = self.clock()
        with contextlib.suppress(StoreError):
            if await self.beats.beat(epoch, lease, beat_record(self.me, timing)):
                return sent
        return None

    def fence_point(self, term: int | None) -> float:
        """The beat's fence point for ``term`` (``inf``: the term does not beat): its last
        acknowledged beat's, or its peers' promises' if later; ``-inf`` once a beat was
        refused (the term is over in etcd, whatever they promised)."""
        hb = self.heartbeat
        if hb is None or term is None or hb.epoch != term:
            return float("inf")
        if hb.refused:
            return NONE
        return guard_point(hb.fence_point, self._promised_point(hb))

    def _promised_point(self, hb: Heartbeat, peers: Iterable[str] | None = None) -> float:
        """``fence_after`` from the oldest of the latest holds every one of ``peers``
        (those the guard needs by default) promised on."""
        if self.promised.epoch != hb.epoch:
            return NONE
        peers = self._peers() if peers is None else peers
        return self.promised.deadline(peers, hb.timing.fence_after)

    def covers(self, nodes: Iterable[str]) -> bool:
        """Would the guard of the term this node beats stand, on time, with the promises
        of ``nodes`` needed too? A member set that adds a node lets it take the term
        over by beat: the active writes it only once the beats in etcd, or that node's
        promises, keep the term (no beat late, ``Heartbeat.hold_due``)."""
        hb = self.heartbeat
        if hb is None or hb.refused or hb.epoch != self._term():
            return True
        peers = set(self._peers())
        new = set(nodes) - peers - {self.me}
        if not new:
            return True
        point = guard_point(hb.fence_point, self._promised_point(hb, peers | new))
        return self.clock() < late_instant(point, hb.timing)

    def promise(self, reply: HoldReply) -> bool:
        """A peer's answer to a hold: True when it answers one asked for the beats (the
        hold loop takes the others)."""
        if not self.promised.asked(reply.seq):
            return False
        if self.promised.answer(reply):
            self._moved()
            if self._awaited is not None:
                timer, hb, asked_at, asked = self._awaited
                if answered(asked_at, self._promised_point(hb, asked), hb.timing):
                    timer.cancel()
                    self._awaited = None
        said = self.promised.refusals.get(reply.sender)
        if said != self._refusals.get(reply.sender):
            if said is not None:
                self.log.warning(
                    "peer refused to promise for the term beat: beating in etcd",
                    peer=reply.sender,
                    reason=said,
                )
            self._refusals = dict(self.promised.refusals)
        return True

    def released(self) -> None:
        """The peers are released from their promises for the lease (``holding.py``):
        those in place of beats run their course, except an older agent's, which
        ended with the release, and no longer count."""
        self.promised.released()

    def timing(self, term: int | None) -> BeatTiming | None:
        """The beat's timings for ``term`` (None: the term does not beat)."""
        hb = self.heartbeat
        return hb.timing if hb is not None and hb.epoch == term else None

    def hold_instant(self, term: int | None) -> float:
        """When the peers must be asked to hold for ``term``'s beats (``inf``: never):
        two intervals after the send of its last acknowledged beat, or of the last hold
        its peers promised on if later: both the promises and the beats that stand in
        for them late (a single late promise has the beat go a fifth of an interval
        later, which etcd answers in milliseconds). A hold for the lease then keeps the
        pair through an etcd stall with a starved or lossy peer path, one promise for a
        whole TTL. The promises count while the peers are asked too: a release leaves
        them standing (``hold.py``), so the term's guard need not wait for etcd to take
        the beats within two intervals, which an etcd far away or slowed by a busy
        server may never do."""
        hb = self.heartbeat
        if hb is None or hb.epoch != term or hb.acked_send is None:
            return float("inf")
        return late_instant(self.fence_point(term), hb.timing)

    async def run(self) -> None:
        """Beat every interval while this node holds a term that beats."""
        while True:
            hb = self.heartbeat
            lease = self.session.lease
            if hb is None or hb.refused or self._term() != hb.epoch or lease is None:
                # Until the next term begins (a term never outlives its lease).
                self._beats_mine(False)
                await self._begun.wait()
                continue
            sent = self.clock()
            # Beats are sent at steps of one interval from a send, never earlier, so the
            # instant to ask for holds (whole intervals after an acknowledged send) is
            # one of these steps.
            late_at = self.hold_instant(hb.epoch)
            if sent >= late_at and self._late_at != late_at:
                self._late_at = late_at  # once per late beat: the hold loop paces holds
                self._late()
            asked_peers = frozenset(self._asked())
            promised = self._promised_point(hb, asked_peers)
            needed = self._asking() or beat_needed(sent, promised, hb.timing)
            asked = self._ask(hb.epoch, hb.timing.takeover_after)
            if asked is not None:
                self.promised.sent(hb.epoch, *asked, hb.timing.takeover_after)
            if needed:
                self._send(hb, lease, sent)
            elif asked is not None:
                self.beats_promised += 1
                self._await_promise(hb, lease, asked[1], asked_peers)
            await late_wake(sent + hb.timing.interval, self.clock, self.lag)

    def _send(self, hb: Heartbeat, lease: int, sent: float) -> None:
        # In flight at most as many as fit in a fence: more would answer nothing new.
        # A test's fault only (``HAPAIR_TEST_BEAT_GATE``): every beat lost on its way.
        fits = len(self._in_flight) <= hb.timing.takeover_after / hb.timing.interval
        if fits and not hooks.held("beat"):
            task = asyncio.get_running_loop().create_task(self._beat(hb, lease, sent))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    def _await_promise(
        self, hb: Heartbeat, lease: int, asked_at: float, asked: frozenset[str]
    ) -> None:
        """The beat stays out of etcd on the promises for the hold just sent, which the
        peers give within milliseconds. One still missing ``answer_within`` later sends
        the beat then rather than at the next interval: a peer gone quiet (its server
        dead, its agent restarting, the peer path cut) leaves etcd nearly two intervals
        to answer the beat before the last promises' point, as beats sent every
        interval did, not one. The promises cancel the check as they come, so a healthy
        pair's active wakes once an interval."""

        def check() -> None:
            self._awaited = None
            current = self.heartbeat is hb and self._term() == hb.epoch and not hb.refused
            promised = self._promised_point(hb, asked)
            if (
                current
                and self.session.lease == lease
                and not answered(asked_at, promised, hb.timing)
            ):
                self.beats_promised -= 1
                self._send(hb, lease, self.clock())

        if self._awaited is not None:
            self._awaited[0].cancel()
        timer = asyncio.get_running_loop().call_later(hb.timing.answer_within, check)
        self._awaited = (timer, hb, asked_at, asked)

    async def _beat(self, hb: Heartbeat, lease: int, sent: float) -> None:
        self.beats_sent += 1
        try:
            applied = await self.beats.beat(hb.epoch, lease, beat_record(self.me, hb.timing))
        except StoreError:
            return  # unanswered: it counts for nothing, the next one may
        now = self.clock()
        self.slowest.note(now, now - sent)
        hb.answered(sent, applied)
        if self.heartbeat is not hb or self._term() != hb.epoch:
            return
        if applied:
            self._moved()
        else:
            self.beats_refused += 1
            self.log.warning("term beat refused: the term is over in etcd", epoch=hb.epoch)
            self._refused()

    def watch(self, spawn: Callable[..., object], pair: Pair) -> None:
        """Follow the pair's beats once ``pair`` (the pair as this node now runs it)
        beats: its nodes' etcd roles grant them its beat key, and no other pair's."""
        if not self._watching and timing_of(pair.failover.term_beat) is not None:
            self._watching = True
            spawn(self._follow(), "term-beats")

    async def _follow(self) -> None:
        """Keep the copy of the beat key while this node does not beat a term."""
        loop = asyncio.get_running_loop()
        while True:
            await self._others.wait()
            mirror = self.mirror = self._new_mirror()
            task = loop.create_task(mirror.run(), name="term-beats-mirror")
            mine = loop.create_task(self._begun.wait())
            try:
                await asyncio.wait({task, mine}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended = task.done()  # by itself: a mirror runs until cancelled
                mine.cancel()
                task.cancel()
                mirror.synced.clear()  # no longer current: no takeover measured from it
                await bounded(task, 1.0)
            if ended:
                task.result()  # its fault, raised for the task's runner to log

    def _new_mirror(self) -> Mirror:
        def seen(change: Change | None) -> None:
            if self.mirror is mirror:  # a copy given up has nothing more to say
                self._seen(change)

        mirror = Mirror(self.beats.store, keys.beats_of(self.beats.pair), seen)
        return mirror

    # -- a standby --------------------------------------------------------------------
    def _seen(self, change: Change | None) -> None:
        now = self.clock()
        kv = self.mirror.items.get(self.beats.key)
        if kv is None:
            self.view.deleted()
            return
        if change is not None and change.kv.key != self.beats.key:
            return
        timing = self._decode(kv.value)
        if timing is None:
            return  # no beat record: the lease alone decides
        before = self.view.seen
        self.view.delivered(kv.mod_revision, timing, now)
        epoch, seen = self._epoch(), self.view.seen
        first = before is None or epoch is None or before.revision < epoch
        if epoch is not None and seen is not None and seen.revision >= epoch and first:
            self._wake()  # the first beat of this term: the decision's due moves

    def _decode(self, value: bytes) -> BeatTiming | None:
        # A term's beats all carry one value: decode it once.
        if value != self._decoded[0]:
            self._decoded = (value, beat_timing(self.beats.key, value))
        return self._decoded[1]

    def due(self, epoch: int | None, promised_until: float) -> float:
        """When this node may take ``epoch`` over by its beats (``inf``: not by beats,
        or not yet: the view is not current, or saw no beat of that term)."""
        if not self.mirror.synced.is_set():
            return float("inf")
        return takeover_due(self.view.seen, epoch, promised_until, self._timing())

    def guard(
        self, epoch: int, members_revision: int, sync_revision: int, paused_revision: int
    ) -> TakeoverGuard | None:
        seen = self.view.seen
        if seen is None:
            return None
        return TakeoverGuard(epoch, seen.revision, members_revision, sync_revision, paused_revision)
