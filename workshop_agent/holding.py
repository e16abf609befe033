"""The agent's side of holds (``hold.py``): asking the peers while etcd does not confirm
the lease, taking in their promises, and giving its own.

The bookkeeping is ``hold.py``'s, the datagrams the peer path's (``netwatch.py``); this
module carries them between the two, and moves the fence point when a promise does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from hapair.shared.clock import PAST_DUE_S, Clock
from hapair.shared.lease import Session
from hapair.shared.log import EventLog
from hapair.shared.waits import wait_event
from hapair.workshop_agent.fencing import Fencing
from hapair.workshop_agent.hold import Answer, Ledger, Promise, Promises
from hapair.workshop_agent.netwatch import NetWatch
from hapair.workshop_agent.observation import HandoverView
from hapair.workshop_agent.peer_wire import Hold, HoldReply, Release

# When the peers are asked to hold: this many keepalive intervals after the send of the
# last acknowledged one (etcd answers a keepalive in milliseconds when it is well).
LATE_AFTER = 1.5


def keepalive_late(now: float, acked_send: float | None, interval: float) -> bool:
    """Whether the peers must be asked to hold: the keepalive after ``acked_send`` is
    half an interval overdue."""
    return acked_send is not None and now > acked_send + LATE_AFTER * interval


def next_check(now: float, acked_send: float | None, interval: float) -> float:
    """How long the hold loop waits: half an interval (the pace of holds while etcd is
    late), but never past the instant a keepalive becomes late. With a 1 s lease
    (keepalives every 0.25 s, fence point 0.5 s after the last acknowledged send) only
    0.125 s separate that instant from the fence point: a hold sent at the next tick
    instead could come too late for any promise to count."""
    pause = interval / 2
    if acked_send is not None and not keepalive_late(now, acked_send, interval):
        pause = min(pause, acked_send + LATE_AFTER * interval - now + PAST_DUE_S)
    return max(0.0, pause)


class Holding:
    """``term`` gives the term this node holds now; ``active`` whether it acts as active
    (a term, or an active-only service still up); ``stopped`` whether it is out of the
    active role with every service and the database stopped; ``newest_epoch`` the newest
    term seen in etcd; ``seen_revision`` the newest revision read of the pairs' keys;
    ``lease_ttl`` the pair's lease TTL; ``beat_late_at`` when the term's beats (and the
    promises that stand in for them) are late enough to ask the peers to hold
    (``inf``: it does not beat); ``beat_reply`` takes
    the answers to the holds the beats asked (True: it was one, ``beating.py``);
    ``released`` tells them the peers are released; ``wake`` wakes the loop."""

    def __init__(
        self,
        session: Session,
        ledger: Ledger,
        fencing: Fencing,
        netwatch: NetWatch,
        clock: Clock,
        log: EventLog,
        *,
        term: Callable[[], int | None],
        active: Callable[[], bool],
        stopped: Callable[[], bool],
        newest_epoch: Callable[[], int | None],
        seen_revision: Callable[[], int],
        lease_ttl: Callable[[], float],
        wake: Callable[[], None],
        dirty: Callable[[], None],
        beat_late_at: Callable[[int | None], float] = lambda term: float("inf"),
        beat_reply: Callable[[HoldReply], bool] = lambda reply: False,
        released: Callable[[], None] = lambda: None,
    ) -> None:
        self.session = session
        self.ledger = ledger  # as the active: the peers' promises during an etcd loss
        self.promises = Promises()  # as a standby: those this node gave
        self.fencing = fencing
        self.netwatch = netwatch
        self.clock = clock
        self.log = log
        self._term = term
        self._active = active
        self._stopped = stopped
        self._newest_epoch = newest_epoch
        self._seen_revision = seen_revision
        self._lease_ttl = lease_ttl
        self._wake = wake
        self._dirty = dirty
        self._beat_late_at = beat_late_at
        self._beat_reply = beat_reply
        self._released = released
        self._campaigning = False
        self._asking = False  # the peers are being asked to hold
        self._news = asyncio.Event()  # a beat late, or one acknowledged while asking
        self._holding = False  # for logging changes only
        self._held_by: str | None = None  # for logging changes only
        self.promised_to: str | None = None  # the node this one promised not to campaign against
        self.held_until = float("inf")  # when that promise runs out (inf: none binds)

    @contextlib.contextmanager
    def campaigning(self) -> Iterator[None]:
        """While a campaign is in flight, this node promises nothing."""
        self._campaigning = True
        try:
            yield
        finally:
            self._campaigning = False

    async def run(self) -> None:
        """As the active, while etcd does not confirm the lease, ask the peers to hold."""
        session = self.session
        asking = False
        asked_for: int | None = None  # the term the peers were asked to hold for
        calm_since: float | None = None  # etcd on time again since, while still asking
        while True:
            now = self.clock()
            late = keepalive_late(now, session.acked_send, session.interval)
            if asked_for is not None and self._stopped():
                # Out of the active role with every service stopped: the peers need not
                # wait out their promises before they may take over.
                self.netwatch.send_release(asked_for)
                self.log.info("peers released from their promises", epoch=asked_for)
                asked_for = None
            term = self._term()
            late = late or now >= self._beat_late_at(term)
            if late and term is not None and session.lease is not None:
                asked_for = term
                sent = self.netwatch.send_hold(term, session.ttl)
                if sent is not None:
                    self.ledger.sent(term, *sent, session.ttl)
                if not asking:
                    self.log.warning(
                        "etcd does not confirm the lease: asking the peers to hold",
                        peer_path=sent is not None,
                    )
                asking, calm_since = True, None
            elif asking and term is not None and now < (calm_since or now) + self._settle():
                # etcd answers again, but a store just back from a stall answers late
                # for a while: the promises keep the pair until it has been on time for
                # a while, else a late answer now would fence this node, and the peers,
                # released, could take over.
                calm_since = calm_since or now
            elif asking:
                asking, calm_since = False, None
                # A release ends the peers' promises for the lease; those in place of
                # beats run their course, and the term's guard goes on counting them
                # (not an older agent's, which ended too).
                self.ledger.clear()
                self._released()
                self._holding = False
                self.log.info(
                    "etcd confirms the lease again: no longer asking the peers"
                    if self._term() is not None
                    else "no longer active: no longer asking the peers to hold"
                )
                # The fence point counts no promise for the lease any more; the timer
                # and the watchdog have it before the release below leaves.
                self.fencing.lease_changed()
                if term is not None and term == asked_for:
                    # The peers need not wait out their promises for the lease to take
                    # over by the usual rules, which no longer count on them here.
                    self.netwatch.send_release(term)
                    self.log.info("peers released from their promises", epoch=term)
                    asked_for = None
            pause = next_check(self.clock(), session.acked_send, session.interval)
            if calm_since is not None:
                pause = min(pause, max(0.0, calm_since + self._settle() - self.clock()))
            self._asking = asking
            self._news.clear()
            await wait_event(self._news, pause)

    def _settle(self) -> float:
        """How long etcd must have been on time before the peers are released: half the
        lease TTL (an etcd stall's aftermath, well within the promises' TTL)."""
        return self._lease_ttl() / 2

    @property
    def asking(self) -> bool:
        """Are the peers asked to hold for the lease (not only for the beats)?"""
        return self._asking

    def confirmed(self) -> None:
        """etcd acknowledged a beat: while the peers are asked to hold, look at once
        whether they still need to (a beat's time, not half a keepalive interval)."""
        if self._asking:
            self._news.set()

    def beat_late(self) -> None:
        """A beat is late enough to ask the peers to hold (``beating.py`` sees it at the
        beat it sends at that instant): ask now."""
        self._news.set()

    def on_hold_reply(self, reply: HoldReply, now: float) -> None:
        if self._beat_reply(reply):
            return
        if self.ledger.answer(reply):
            point = self.fencing.point()
            holding = point > self.session.fence_deadline
            if holding and not self._holding:
                self.log.warning(
                    "holding the pair on the peers' promises while etcd is unreachable",
                    until_s=round(point - now, 3),
                )
            self._holding = holding
            self.fencing.lease_changed()
        elif not reply.promised:
            self.log.warning("peer refused to hold", peer=reply.sender, reason=reply.reason)

    def on_hold(self, hold: Hold, now: float) -> Answer:
        busy = None
        if self._active():
            busy = "this node is active"
        elif self._campaigning:
            busy = "this node is campaigning"
        bound = self.promises.binds(hold.sender, hold.epoch, now)
        answer = self.promises.answer(
            hold,
            now,
            ttl=self._lease_ttl(),
            busy=busy,
            newest_epoch=self._newest_epoch(),
            seen_revision=self._seen_revision(),
        )
        if answer.promised and (not bound or not hold.beat):
            # A promise renewed for the beats only moves the instant this node may take
            # over later: the loop, woken then, finds the new one (they come every
            # interval; waking for each would cost a round each). One for the lease is
            # news: the status names the holder.
            self._wake()
        return answer

    def on_release(self, release: Release) -> None:
        self.promises.release(release.sender, release.epoch)
        self._wake()

    def binding(
        self, now: float, handover: HandoverView | None, by_beat: bool = True
    ) -> Promise | None:
        """The promise that forbids taking the pair over now, if any (a live handover
        record of the node promised to ends that promise). A campaign (``by_beat``
        False) is bound only by a promise for the lease: one for the beats lifts the
        active's beat guard, never its fence point past its lease's, so once the leader
        key is gone (its lease ended, or the active stepped down with its services
        stopped) it keeps nothing running that a campaign could overlap."""
        released = [(handover.from_node, handover.epoch)] if handover is not None else []
        return self.promises.binding(now, released, for_lease=not by_beat)

    def held_by(self, now: float, handover: HandoverView | None) -> str | None:
        """The peer that holds the pair on this node's promise for its lease, as the
        decision and the status name it (``None``: none does). Whatever promise binds,
        one for beats included, ``held_until`` says until when."""
        binding = self.binding(now, handover)
        self.held_until = float("inf") if binding is None else binding.until
        promise = self.binding(now, handover, by_beat=False)
        held_by = None if promise is None else f"{promise.node} (epoch {promise.epoch})"
        if held_by != self._held_by:
            if held_by is not None:
                self.log.warning("not campaigning: a peer holds the pair", holder=held_by)
            self._held_by = held_by
            self.promised_to = None if promise is None else promise.node
            self._dirty()  # the status names the holder: nodes it does not know wait
        return held_by
