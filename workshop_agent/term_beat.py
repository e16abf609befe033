"""The term beat: a guard of the term finer than the lease, and why it never gives two actives.

etcd grants leases in whole seconds and checks their expiry every 500 ms, so the lease
alone cannot hand a crashed active's pair over in much less than a second. On top of the
lease (which stays as it is) the active *beats*: every ``interval`` it writes its pair's
beat key in a transaction that succeeds only while the leader key still has its epoch.
The campaign that wins a term writes the term's first beat with the leader key; the beat
record carries the term's timings, fixed for the term.

The rules, each a pure function or a small class below:

- The active's beat fence point is ``fence_after`` (D) after the *send* of the last beat
  etcd acknowledged as applied (:class:`Heartbeat`); a beat refused ends the term at
  once. Its fence point is the earlier of the lease's and the beat's, pushed later only
  by the peers' promises (:func:`term_fence_point`); its watchdog's deadline is the beat's
  fence point plus half the ``margin`` (M) (:func:`watchdog_deadline`).
- A standby records, for the newest beat its watch delivered, its mod revision, when it
  was delivered (on the standby's clock) and the timings it carries (:class:`BeatView`).
  It may take over once it has seen a beat of the current term (mod revision at least
  the epoch), no newer one for D + M since its delivery, and no promise binds it
  (:func:`takeover_due`), with a transaction guarded on that beat's mod revision and the
  leader key's epoch (:class:`TakeoverGuard`), which deletes the leader key and writes a
  handover to itself; it then campaigns as the handover's target.
- Every interval the active also asks each peer, over the peer path, for a short
  promise: not to take its term over (nor campaign) for ``fence_after + margin`` (D + M)
  on the peer's clock. Counted like a hold's (``hold.py``: the oldest of the peers'
  latest promised holds, from its send), these promises give a *promised point* D after
  that send; the beat's guard is the later of it and the last acknowledged beat's
  (:func:`guard_point`). The active sends the interval's beat to etcd only when the
  promises do not stand in for it (:func:`beat_needed`: no promise on the hold of the
  last interval and a half) or while it asks its peers to hold for the lease. With the
  peer path up, a term writes its first beat and nothing more. A peer path in the lab
  mode asks for no such promise (anyone could answer for a peer): the term beats in
  etcd every interval.
- Two intervals after the send of its last acknowledged beat, or of the last hold every
  peer promised on if later (the promises late, and the beats that stand in for them
  too), the active asks its peers to hold for the lease (``Beating.hold_instant``), as
  a late keepalive makes it do (``hold.py``). While it asks, it beats in etcd whatever
  the promises, and the promises count for that instant as when it does not ask
  (:func:`guard_point`). The release that
  ends the holds, sent once the keepalives and the term's guard have been on time for
  a while, ends the peers' promises for the lease only: a short promise runs its
  course (``Promises.release``), so the guard goes on counting it and never falls back
  at the release to a last beat in etcd that may be nearly a fence old.

Why this never gives two actives. Assumptions: each node measures time on its own
``CLOCK_BOOTTIME``, whose rate is within a drift d of real time, with
``12·d·(D + M) ≤ M``; the watchdog's SIGKILL lands within ``M/4`` of its deadline; a
message is never received before it was sent; etcd is linearizable (a transaction is
applied at one revision, between its send and its answer, and revisions order them all).
A duration L on a clock whose rate is in [1-d, 1+d] takes a real time in
[L/(1+d), L/(1-d)].

Let the standby P's takeover transaction be applied at revision T, guarded on the beat
b it saw at mod revision m, which its watch delivered at real time R; P sends it at
real time τ ≥ R + (D + M)/(1+d).

1. If it succeeds, no beat was applied between b and T (the mod revision is still m), so
   b is the last beat applied before T; every beat applied after T is refused, for T
   deleted the leader key and any later one has another ``create_revision``.
2. So every beat x that the active A saw acknowledged as applied was applied no later
   than b: its send time s_x ≤ apply(x) ≤ apply(b) ≤ R. This holds whatever the order
   in which etcd applied A's beats (A may have several in flight, or retry one whose
   answer it lost), which is why the fence point counts from a *send* and the standby
   from a *delivery*.
3. A's watchdog fires at the latest at s + (D + M/2)/(1-d), s the send of the newest
   acknowledged beat it was told of (A's own fence comes M/2 earlier), and its kill has
   landed M/4 later. With d ≤ 1/2, 1/(1-d) ≤ 1 + 2d, so A has stopped by
   R + (D + M/2)(1 + 2d) + M/4, and P sends no earlier than R + (D + M)(1 - d). The
   first is below the second when d·(12·D + 8·M) ≤ M, which ``12·d·(D + M) ≤ M`` gives.
4. Promises: P refuses to take over by beat while any promise binds it (and to
   campaign while one for the lease does), and refuses to promise while its takeover
   is in flight (or once it won), so every promise P gave A ended before τ. A promise
   for the beats need not bind a campaign: it lifts only A's beat guard, which the
   lease caps (:func:`term_fence_point`), and a campaign needs the leader key gone: A's
   lease ended (A stopped by its lease's fence point, by the lease's argument) or A
   stepped down with its services stopped. A's point beyond its beat's is a promise's:
   a short one's (P bound until r + G on its clock, r ≥ t the hold's arrival, G ≤ D + M
   granted; A fences at t + (G - M), its watchdog M/2 later, both on A's clock, the
   kill M/4 after: the argument of ``hold.py`` with M in place of the lease's margin, which needs
   ``8·d·(D + M) ≤ M``, given above; it is 3 with the hold's send for the beat's and its
   receipt for R) or a hold's for the lease (``hold.py``, with the lease's margin and
   its own drift assumption ``4·d·TTL < fence_margin``). Either way A has stopped
   before any promise P gave on it ran out. A node that did not promise is free, and
   the beat rule above covers it: the short promises stand in only while every node
   that may take the term over by beat promised: every node of a member set etcd may
   hold for the term, for a node A has not acknowledged takes no term over by beat
   (forced or not, ``decide.py``), and A writes a set that adds a node only once the
   term stands without that node's promise (``members.py``). Nothing here depends on
   when A wrote its beats: the promises that stood in for them bound P for as long as
   A counted them, and every beat A counted bounds it by 1-3.
5. Two standbys racing: both transactions compare the same leader key's epoch; the first
   applied deletes it, and the other fails.

The epoch stays unique and increasing: the takeover itself creates no leader key; the
campaign that follows creates one, whose ``create_revision`` is above every revision
before it, like any campaign's.

What a standby needs of the beat it measures from: only that it was applied before it
was delivered (a watch never delivers a change before it happened) and that the
transaction compares exactly its mod revision. A standby whose watch lags measures from
a later delivery, which only delays it; one that missed a newer beat loses its
transaction. A term whose active does not beat (beats off for that term, or an agent
that predates them) has no beat at or after its epoch, so no standby takes it over by
beat: only its lease decides, as before.

The database: only the recorded synchronous standby takes over (the campaign's rules),
and the takeover also compares the synchronous standby record's mod revision with the one
its decision read, so a primary that unrecorded its standby before it stopped is never
taken over by that standby on a view that missed the change.

Why beats sent only when a promise is missing keep a live active. The active waits
for the promise on each hold it sends ``answer_within`` (a fifth of an interval); missing, the
beat goes then, and at every interval after until the promises come back
(:func:`beat_needed`, :func:`answered`). etcd then has ``D - 1.2·interval`` to apply it
before the point of the last promise runs out, and far longer before P may take over:
P waits M more, and its takeover, guarded on the beat it saw, fails once a later one
was applied.

This module is pure: the clock, etcd and the peer path are the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass

NONE = -float("inf")


@dataclass(frozen=True, slots=True)
class BeatTiming:
    """A term's beat timings, in seconds: the beat's ``interval``, the active's
    ``fence_after`` (D, from the send of its last acknowledged beat) and the ``margin``
    (M) a standby waits beyond D."""

    interval: float
    fence_after: float
    margin: float

    @property
    def takeover_after(self) -> float:
        """How long a standby waits, from the delivery of a beat, for a newer one."""
        return self.fence_after + self.margin

    @property
    def watchdog_after(self) -> float:
        """From the send of the last acknowledged beat to the watchdog's deadline."""
        return self.fence_after + self.margin / 2

    @property
    def answer_within(self) -> float:
        """How long, from a hold sent with a beat the peers' promises stand in for, the
        active waits for every promise on it before it sends that beat to etcd after
        all: a fifth of an interval (the peer path answers in milliseconds)."""
        return self.interval / 5

    @property
    def hold_after(self) -> float:
        """From the send of the last acknowledged beat to asking the peers to hold: one
        beat missing, while two more still fit before the fence point."""
        return 2 * self.interval

    def max_drift(self) -> float:
        """The largest clock rate drift the safety argument allows with these timings."""
        return self.margin / (12 * self.takeover_after)


# ---- the active ------------------------------------------------------------------------


class Heartbeat:
    """The active's beats in one term: until when they let it act.

    ``started``: the send time of the campaign that won the term, which wrote its first
    beat; every later beat counts once etcd acknowledged it as applied."""

    def __init__(self, epoch: int, timing: BeatTiming, started: float) -> None:
        self.epoch = epoch
        self.timing = timing
        self.acked_send: float | None = started
        self.refused = False

    def answered(self, sent: float, applied: bool) -> None:
        """etcd's answer to a beat sent at ``sent``: ``applied``, or refused because the
        leader key no longer has this term's epoch (the term is over in etcd)."""
        if not applied:
            self.refused, self.acked_send = True, None
        elif not self.refused and (self.acked_send is None or sent > self.acked_send):
            self.acked_send = sent

    @property
    def fence_point(self) -> float:
        """When the active must have stopped acting by its beats (``-inf``: now)."""
        return beat_fence_point(self.acked_send, self.timing)

    def hold_due(self, now: float) -> bool:
        """Is a beat late enough that the peers must be asked to hold?"""
        return self.acked_send is not None and now >= self.acked_send + self.timing.hold_after


def beat_needed(now: float, promised_point: float, timing: BeatTiming) -> bool:
    """Must the beat sent at ``now`` go to etcd at once? Not while the peers' promises
    may stand in for it: every peer promised on a hold sent less than one and a half
    intervals ago (``promised_point`` is ``fence_after`` from the send of the oldest of
    their latest promised holds, ``-inf`` without one). Else the active waits
    ``answer_within`` for their promises on the hold it sends with the beat
    (:func:`answered`), and beats in etcd if one is missing then: one interval and that
    wait after the last hold they all promised on, which leaves etcd ``fence_after``
    less those to answer it (two intervals less a fifth with the fewest beats a fence
    allows), where a beat sent every interval left it ``fence_after`` less one."""
    return promised_point < now + timing.fence_after - 1.5 * timing.interval


def answered(hold_sent: float, promised_point: float, timing: BeatTiming) -> bool:
    """Has every peer promised on the hold sent at ``hold_sent`` (or a later one)?"""
    return promised_point >= hold_sent + timing.fence_after


def guard_point(beat_point: float, promised_point: float) -> float:
    """The term's guard beyond the lease: its last acknowledged beat's point, or its
    peers' promises' point if later (either keeps every standby from taking over)."""
    return max(beat_point, promised_point)


def beat_fence_point(acked_send: float | None, timing: BeatTiming) -> float:
    """``fence_after`` from the send of the last beat acknowledged as applied."""
    return NONE if acked_send is None else acked_send + timing.fence_after


def term_fence_point(lease_point: float, beat_point: float, hold_point: float) -> float:
    """The active's fence point: the earlier of its lease's and its beat's, later only
    while every peer promised not to take over (``hold_point``, ``hold.py``)."""
    return max(min(lease_point, beat_point), hold_point)


def watchdog_deadline(
    lease_point: float,
    beat_point: float,
    hold_point: float,
    timing: BeatTiming,
    fence_margin: float,
) -> float:
    """The watchdog's deadline: each fence point plus half of its own margin (the beat's
    for the beat, the lease's for the lease and the hold), combined as the fence point
    combines them."""
    return max(
        min(lease_point + fence_margin / 2, beat_point + timing.margin / 2),
        hold_point + fence_margin / 2,
    )


# ---- a standby -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeenBeat:
    """The newest beat a standby's watch delivered: its mod revision, when it arrived on
    the standby's clock, and the timings of the term that wrote it."""

    revision: int
    received: float
    timing: BeatTiming


class BeatView:
    """A standby's view of its pair's beat key."""

    def __init__(self) -> None:
        self.seen: SeenBeat | None = None

    def delivered(self, revision: int, timing: BeatTiming, now: float) -> None:
        """The watch delivered the beat key at mod ``revision``, at ``now``. A revision
        seen before (a watch resumed) keeps its first delivery."""
        if self.seen is None or revision > self.seen.revision:
            self.seen = SeenBeat(revision, now, timing)

    def deleted(self) -> None:
        """The key is gone (the active's lease ended): no beat to measure from."""
        self.seen = None


def takeover_due(
    seen: SeenBeat | None,
    epoch: int | None,
    promised_until: float = NONE,
    own: BeatTiming | None = None,
) -> float:
    """When this standby may take the term ``epoch`` over by its beat (``inf``: never).

    Only a beat of that term counts (mod revision at least the epoch: the campaign wrote
    the first); it waits the term's own timings, or this node's if longer, from the beat's
    delivery, and never while a promise not to take over binds it (``promised_until``)."""
    if epoch is None or seen is None or seen.revision < epoch:
        return float("inf")
    wait = seen.timing.takeover_after
    if own is not None:
        wait = max(wait, own.takeover_after)
    return max(seen.received + wait, promised_until)


@dataclass(frozen=True, slots=True)
class TakeoverGuard:
    """What a takeover by beat compares: the term's epoch (the leader key's
    ``create_revision``), the mod revision of the beat it measured from, and those of the
    member set, the synchronous standby record and the pause its decision read (0:
    absent). A campaign needs no such compares: it decides on the view of the pair's
    keys that showed the leader key gone, a watch that delivers in revision order. The
    beat comes from a watch of its own, so the view the takeover decided on may be older
    than the beat it measured from."""

    epoch: int
    beat_revision: int
    members_revision: int = 0
    sync_revision: int = 0
    paused_revision: int = 0
