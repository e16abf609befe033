"""Taking over: campaigning for the leader key, and taking up the term won (or found
ours on our live lease). The counterpart of ``step_down.py``.

A campaign is checked against the promises this node gave the peers in the very step
that sends it (a promise may have come since the decision), and the won key and member
set are applied to the local copy at once, so the next round sees its own term. The
term's services start only once its database is primary.

A pair that beats (``term_beat.py``) writes its term's first beat with the campaign, and
a standby whose active's beats stopped first ends that term (``beat_election.py``), in
the same step, under the same promise check, then campaigns as the handover's target.
"""

from __future__ import annotations

from collections.abc import Callable

from hapair.shared import drift, keys
from hapair.shared.clock import Clock
from hapair.shared.lease import Session
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.records import Leader, Members
from hapair.shared.store import Kv, StoreError
from hapair.shared.topology import Pair
from hapair.workshop_agent.beating import Beating
from hapair.workshop_agent.database_care import DatabaseCare
from hapair.workshop_agent.decide import NEW_TERM_BEAT, takeover_cause
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.holding import Holding
from hapair.workshop_agent.members import MemberSets
from hapair.workshop_agent.observe import PairState
from hapair.workshop_agent.recovery_steps import RecoverySteps
from hapair.workshop_agent.supervisor import Supervisor
from hapair.workshop_agent.term_beat import BeatTiming, TakeoverGuard


class TakeOvers:
    """``pair`` and ``state`` give the pair and the pair as last observed;
    ``last_leader`` the last active this node saw; ``begin_term(epoch, held)`` makes
    ``epoch`` the agent's term, with the services ``held`` for an operator;
    ``db_ready`` says whether the term's database lets its services start; ``event``
    records an event of the pair; ``changed`` wakes the loop and the publisher;
    ``lacks`` names the services whose declared package version this node lacks."""

    def __init__(
        self,
        session: Session,
        election: Election,
        pairs: Mirror,
        holding: Holding,
        recovery: RecoverySteps,
        supervisor: Supervisor,
        db_care: DatabaseCare | None,
        members: MemberSets,
        beating: Beating,
        clock: Clock,
        log: EventLog,
        me: str,
        *,
        pair: Callable[[], Pair | None],
        state: Callable[[], PairState | None],
        last_leader: Callable[[], str | None],
        begin_term: Callable[[int, frozenset[str]], None],
        db_ready: Callable[[], bool],
        event: Callable[..., None],
        changed: Callable[[], None],
        lacks: Callable[[], tuple[str, ...]] = tuple,
    ) -> None:
        self.session = session
        self.election = election
        self.pairs = pairs
        self.holding = holding
        self.recovery = recovery
        self.supervisor = supervisor
        self.db_care = db_care
        self.members = members
        self.beating = beating
        self.clock = clock
        self.log = log
        self.me = me
        self._pair = pair
        self._state = state
        self._last_leader = last_leader
        self._begin_term = begin_term
        self._db_ready = db_ready
        self._event = event
        self._changed = changed
        self._lacks = lacks

    async def campaign(
        self, stale: int | None, members_revision: int, beat: TakeoverGuard | None = None
    ) -> None:
        lease = self.session.lease
        if lease is None:
            return
        state = self._state()
        handover = state.handover if state else None
        target = handover is not None and handover.to == self.me
        # Checked again here, not only in the decision: a promise may have been given
        # since. While the campaign is in flight no promise is given (see holding.py).
        if self.holding.binding(self.clock(), handover, by_beat=beat is not None) is not None:
            return
        with self.holding.campaigning():
            pair = self._pair()
            assert pair is not None
            if beat is not None:
                if await self.beating.beats.take_over(beat) is None:
                    self.log.info("term beat takeover lost: the term moved on", epoch=beat.epoch)
                    return
                self.log.warning("ended a term whose beats stopped", ended=beat.epoch)
                target, stale = True, None
            members = [n.name for n in pair.nodes]
            timing = self.beating.pair_timing()
            first_beat = self.beating.first_beat(lease, timing)
            sent = self.clock()
            epoch = await self.election.campaign(
                lease, stale, target, members, members_revision, first_beat
            )
        if epoch is None:
            return
        pair = self._pair()
        assert pair is not None
        key = keys.leader(pair.name)
        self.pairs.apply_local(
            key, Kv(key, Leader(node=self.me).encode(), epoch, epoch, lease), epoch
        )
        key = keys.members(pair.name)
        value = Members(nodes=sorted(members)).encode()
        self.pairs.apply_local(key, Kv(key, value, epoch, epoch, 0), epoch)
        previous = self._last_leader()
        planned = beat is None and target and handover is not None and handover.planned
        if self.db_care is not None:
            self.db_care.catch_up_lsn = handover.lsn if target and handover is not None else None
        state = self._state()
        forced = state.forced if state is not None else None
        cause = takeover_cause(self.me, previous, handover, forced)
        if beat is not None:
            cause = f"failover from {previous} (its term beats stopped)"
        held = self.recovery.held_after_election(planned, previous)
        self.take_term(epoch, cause, held, sent, timing)
        self._event("election", cause, previous=previous, planned=planned)
        missing = self._lacks()
        if missing:
            # Chosen because no node holding every declared version could take over.
            reason = "took over without the declared package version: " + drift.versions(
                pair, missing
            )
            self.log.warning(reason, services=",".join(missing))
            self._event("drifted takeover", reason, services=list(missing))
        self.recovery.await_operator(epoch, cause, previous, self.me, held)

    async def adopt(self, epoch: int, cause: str, renewable: bool = False) -> None:
        """Take up a term found ours on our live lease; one that beats, only once a beat
        of it is applied (its fence point counts from that beat's send).

        A term whose beat timings are no longer the pair's is given up to this node
        instead, when it is ``renewable`` (``decide.Adopt``) and its database has
        stopped: the timings are the term's for good (its standbys wait by them), and a
        node that fences itself in a loop on timings too short for its distance to etcd
        would take them up for ever after the site file changed them. Not renewable, it
        takes the term up as it is (a new term would wait, the pair without an active)."""
        try:
            timing = await self.beating.term_timing(epoch)
        except StoreError:
            return  # taken up once etcd tells whether the term beats
        wanted = self.beating.pair_timing()
        pair = self._pair()
        if timing != wanted and renewable and pair is not None:
            if self.db_care is not None and not self.db_care.stopped():
                return  # its fence's demotion is still running: the next round
            self.log.info(
                "the pair's term beat changed: campaigning for a new term that beats by it",
                old_epoch=epoch,
                was=_timing_text(timing),
                now=_timing_text(wanted),
            )
            try:
                revision = await self.election.to_self(epoch, NEW_TERM_BEAT, planned=True)
            except StoreError:
                return  # looked at again on the next round
            if revision is not None:
                self.pairs.apply_local(keys.leader(pair.name), None, revision)
            return
        started = None
        if timing is not None:
            started = await self.beating.beat_once(epoch, timing)
            if started is None:
                return
        self.take_term(epoch, cause, started=started, timing=timing)

    def take_term(
        self,
        epoch: int,
        cause: str,
        held: frozenset[str] = frozenset(),
        started: float | None = None,
        timing: BeatTiming | None = None,
    ) -> None:
        """``started``: the send of the write that put this term's latest beat, which
        carried ``timing`` (None: the term does not beat)."""
        if not self.session.valid(self.clock()):
            return
        self._begin_term(epoch, held)
        self.beating.begin(epoch, started, timing)
        self.members.new_term(epoch)
        self.recovery.began(self.clock())
        self.log.bind(epoch=epoch)
        self.log.info("became active", cause=cause, held=",".join(sorted(held)) or None)
        if self._db_ready():
            self.supervisor.activate(epoch, held)
        elif self.db_care is not None:
            self.db_care.wake()  # services start once the database is primary
        self._changed()


def _timing_text(timing: BeatTiming | None) -> str:
    """``interval/fence/margin`` in ms, as the site file gives them; ``off``."""
    if timing is None:
        return "off"
    ms = (round(t * 1000) for t in (timing.interval, timing.fence_after, timing.margin))
    return "/".join(map(str, ms))
