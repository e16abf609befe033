"""Riding out an etcd loss: the active keeps its services only where no peer can take over.

When the active's keepalives stop being acknowledged (etcd stalled, lost its quorum, or
cut off from this node), the lease alone would fence it within ``fence_after_s``. The
active then asks every other node of its pair, over the peer path (agent to agent, UDP,
not through etcd), to *hold*: not to campaign while they hear it. A node that answers
with a promise refuses to campaign until it has heard no hold from that active for the
lease TTL. The active keeps its services until ``fence_after_s`` after the *send* of the
oldest of the latest holds every peer has promised on; missing a single peer's promise,
it fences at the lease's own fence point as usual.

Why this never gives two actives. Assumptions: every agent measures time on its own
monotonic clock, whose rate differs from real time by less than a drift d, with
``8·d·TTL < fence_margin_s`` (a quartz clock has d ≈ 1e-4; 0.5 s of margin on a 2 s TTL
leaves room for d = 0.03), and a SIGKILLed service dies within fence_margin_s/4, the
same assumptions the lease's own fence point rests on; a datagram is never received
before it was sent. Let the active A send hold *k* at
real time t_k and a peer P receive it at r_k ≥ t_k.

- P promises at r_k not to campaign before it has heard nothing from A for G on its
  own clock, where G is the shorter of A's TTL and P's own (a datagram never makes P
  wait longer than its own lease would), so not before real time r_k + G·(1-d) ≥
  t_k + G·(1-d); its reply says G. A campaign P already had in flight when the hold
  arrived makes P refuse the promise instead.
- A counts P's promise for hold *k* only when the reply names *k*, and as ending
  TTL - G earlier than one for its whole TTL. Its fence timer stops its services at
  t_k + (G - fence_margin_s)·(1+d), and its watchdog, should the agent freeze, half a
  margin later, at t_k + (G - fence_margin_s/2)·(1+d) at the latest, the services dead
  fence_margin_s/4 after that: before t_k + G·(1-d), since 8·d·G < fence_margin_s,
  so before P may campaign.
- Every other node must have promised: a node that did not (down, cut off, or never
  asked) is free to campaign once etcd lets it, and the lease rule covers that case.
- A promise is given only for A's current term (an epoch at least the newest term P
  has seen in etcd, and at most one above the newest revision P has read there: an
  epoch is the revision that created the leader key, so anything above is no term etcd
  gave) and only by a node that holds no term and runs no active service, so a stale
  active is refused and fences at its lease's fence point.

Only A can ask: the peer path authenticates every datagram with the pair's key and
drops replays (``peer_wire.py``), so nobody else can make P promise, release P, or
promise A anything.
- If etcd reports A's lease lost (not merely unreachable), A fences at once: it may
  then campaign like anyone else, and so may P once its promise has run out.

A handover record that A itself wrote for that term ends P's promises at once; a
release A sends over the peer path ends its promise for the lease, and leaves one given
in place of a beat (``term_beat.py``, a takeover time long at most) to run its course,
for A may still count that one. A writes the record only once its services have
stopped; it sends a release then too, or once etcd has confirmed its lease (and its
term beat, or the promises in its place) on time again for half a TTL (a store back
from a stall answers late for a while) and its fence point counts no hold for the lease
any more: the fence timer and the watchdog's deadline are moved back to the point
without those promises before the release leaves (the watchdog takes a deadline in as
promptly as it kills: within a quarter of the margin), so from then on the rules without
holds keep A apart from P. A peer of an older version ended its short promises too at
a release, and its replies do not say they are kept (``HoldReply.kept``): A forgets
its short promises, and the answers to holds sent before, at the release. A release
never overtakes a later hold: the peer path drops a datagram numbered below the last it
took from that run of A.

A promise lives in memory only. P's agent restarted forgets it, so a new run does not
campaign (outside a handover to it) until the lease TTL after it took its node's lock,
which the run that promised held until it died: after every promise that run gave.

This module is the pure bookkeeping of both sides; the agent carries the datagrams.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from hapair.workshop_agent.peer_wire import Hold, HoldReply

KEEP_SENT = 64  # the holds whose promise may still arrive (a few TTLs' worth)


class Ledger:
    """The active's side: the holds it sent in its current term, and who promised."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        self._sent: dict[int, tuple[float, float]] = {}  # seq: (sent at, TTL asked)
        self._confirmed: dict[str, float] = {}
        self._kept: dict[str, bool] = {}  # does the peer's promise outlive a release?
        self.refusals: dict[str, str] = {}

    def sent(self, epoch: int, seq: int, at: float, ttl: float) -> None:
        if epoch != self.epoch:
            self.clear()
            self.epoch = epoch
        self._sent[seq] = (at, ttl)
        if len(self._sent) > KEEP_SENT:
            del self._sent[min(self._sent, key=self._sent.__getitem__)]

    def asked(self, seq: int) -> bool:
        """Is ``seq`` one of the holds this ledger sent (and still keeps)?"""
        return seq in self._sent

    def answer(self, reply: HoldReply) -> bool:
        """Take in a peer's answer; True when it extends that peer's promise."""
        hold = self._sent.get(reply.seq)
        if reply.epoch != self.epoch or hold is None:
            return False  # not one of the holds of this term
        if not reply.promised or reply.ttl <= 0:
            self.refusals[reply.sender] = reply.reason
            self._confirmed.pop(reply.sender, None)
            return False
        self.refusals.pop(reply.sender, None)
        self._kept[reply.sender] = reply.kept
        # A promise shorter than asked counts as one for the whole TTL sent that much
        # earlier: the fence point moves with what the peer granted, never further.
        at, asked = hold
        at -= max(0.0, asked - reply.ttl)
        if at <= self._confirmed.get(reply.sender, -float("inf")):
            return False
        self._confirmed[reply.sender] = at
        return True

    def deadline(self, peers: Iterable[str], fence_after: float) -> float:
        """Until when the promises let this node keep its services (``-inf``: they do not).

        Every peer must have promised; the oldest of their latest promised holds counts."""
        sends = [self._confirmed.get(p) for p in peers]
        if not sends or any(s is None for s in sends):
            return -float("inf")
        return min(s for s in sends if s is not None) + fence_after

    def released(self) -> None:
        """The peers were released: forget the promises of those whose last one ended
        with the release (an agent of an older version), and, if any did, the holds sent
        so far, whose answers may still come but bind such a peer no more."""
        ended = [peer for peer, kept in self._kept.items() if not kept]
        for peer in ended:
            self._confirmed.pop(peer, None)
        if ended:
            self._sent.clear()

    def clear(self) -> None:
        self.epoch = None
        self._sent.clear()
        self._confirmed.clear()
        self._kept.clear()
        self.refusals.clear()


class Answer(NamedTuple):
    """A standby's answer to a hold: the promise's length on its clock, or why not."""

    promised: bool
    reason: str
    ttl: float


@dataclass(frozen=True, slots=True)
class Promise:
    node: str
    epoch: int
    until: float
    for_lease: bool = True  # False: asked in place of a term's beats (``Hold.beat``)


class Promises:
    """A standby's side: the promises it gave, and whether it may campaign."""

    def __init__(self) -> None:
        # One promise for the lease and one in place of beats per node, apart: a release
        # ends the first only, and neither may shorten the other.
        self._given: dict[str, Promise] = {}
        self._short: dict[str, Promise] = {}

    def answer(
        self,
        hold: Hold,
        now: float,
        *,
        ttl: float,
        busy: str | None,
        newest_epoch: int | None,
        seen_revision: int,
    ) -> Answer:
        """Promise ``hold.sender`` not to campaign for the TTL, or say why not.

        ``busy`` names why this node may not promise (it is active, starts services, or
        has a campaign in flight); ``newest_epoch`` is the newest term it saw in etcd,
        ``seen_revision`` the newest revision it read of the pairs' keys there."""
        if busy is not None:
            return Answer(False, busy, 0.0)
        if newest_epoch is not None and hold.epoch < newest_epoch:
            why = f"epoch {hold.epoch} is stale: epoch {newest_epoch} was elected since"
            return Answer(False, why, 0.0)
        # An epoch is the revision that created its leader key: a term elected before
        # this node last read etcd is at most the newest it has seen there. One further
        # is the only term that may be newer; anything above is no term etcd gave.
        newest = max(newest_epoch or 0, seen_revision)
        if hold.epoch > newest + 1:
            why = (
                f"epoch {hold.epoch} is ahead of etcd as this node saw it "
                f"(newest term {newest_epoch}, revision {seen_revision})"
            )
            return Answer(False, why, 0.0)
        # Never longer than this node's own TTL, whatever the hold asks: the reply says
        # how long, and the sender counts only that.
        granted = min(ttl, hold.ttl)
        until = now + granted
        kept = self._short if hold.beat else self._given
        given = kept.get(hold.sender)
        if given is None or until > given.until or hold.epoch > given.epoch:
            kept[hold.sender] = Promise(hold.sender, hold.epoch, until, not hold.beat)
        return Answer(True, "", granted)

    def binds(self, node: str, epoch: int, now: float) -> bool:
        """Does a promise to ``node`` for ``epoch`` (or a later term) bind now?"""
        return any(
            given is not None and given.epoch >= epoch and now < given.until
            for given in (self._given.get(node), self._short.get(node))
        )

    def release(self, node: str, epoch: int) -> None:
        """``node`` no longer needs the promise for the lease it had for ``epoch`` (its
        services stopped, or etcd confirms its lease on time again). One given in place
        of a beat runs its course, a takeover time at most: the active may count it
        still, and its fence point then rests on it rather than on its last beat alone."""
        given = self._given.get(node)
        if given is not None and given.epoch <= epoch:
            del self._given[node]

    def binding(
        self, now: float, released: Iterable[tuple[str, int]] = (), for_lease: bool = False
    ) -> Promise | None:
        """The promise that binds this node now, if any: every one forbids a takeover
        by beat; with ``for_lease``, only one given on a hold for the lease, the kind
        that also forbids campaigning and that the status names.

        ``released``: (node, epoch) of live handover records, each written by that node
        after it stopped the services of that term."""
        done = set(released)
        for kept in (self._given, self._short):
            for node, promise in list(kept.items()):
                if now >= promise.until or (node, promise.epoch) in done:
                    del kept[node]
        given = [*self._given.values(), *([] if for_lease else self._short.values())]
        return max(given, key=lambda p: p.until, default=None)
