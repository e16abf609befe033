"""The term beat's etcd transactions (its rules and their argument: ``term_beat.py``).

Three writes, each one transaction:

- :meth:`TermBeats.first_beat`: the beat the winning campaign writes with the leader key
  (``Election.campaign(..., also=...)``), so that a term that beats does so from its
  first revision, and its campaign's send time counts as its first acknowledged beat.
- :meth:`TermBeats.beat`: the active's beat, applied only while the leader key still has
  its epoch; refused, the term is over in etcd.
- :meth:`TermBeats.take_over`: a standby's takeover of a term whose beats stopped,
  applied only if the leader key still has that epoch, the beat key the mod revision of
  the beat the standby measured from (no later beat was applied), and the member set,
  the synchronous standby record and the pause the revisions its decision read. It
  deletes the leader key and writes a handover to the taker itself, so that no other
  node campaigns before it; the taker then campaigns as that handover's target
  (``Election.campaign(..., target=True)``), which creates the new term's leader key on
  its own lease. etcd refuses a transaction that deletes and puts one key, and a put on
  the existing key would keep its ``create_revision``, the epoch: hence two steps. The
  handover names the taker as ``from_node``, never the old active: a handover of the
  old active's term ends the promises given to it (``hold.py``), which only the old
  active may do.

The beat key is bound to the active's lease, so it goes with the lease; after a takeover
the old active's beat stays until the new active's first beat rebinds the key, and a
standby ignores it meanwhile (its mod revision is below the new epoch).
"""

from __future__ import annotations

import contextlib

from hapair.shared import keys
from hapair.shared.records import HandoverRecord, RecordError, TermBeatRecord, decode_shared
from hapair.shared.store import Store
from hapair.shared.txn import Compare, Op
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.term_beat import BeatTiming, TakeoverGuard

TAKEOVER_REQUEST = "beat"
"""The ``request`` of a takeover's handover record: the decision names the cause by it."""


def beat_record(node: str, timing: BeatTiming) -> bytes:
    """The value of every beat of a term (it never changes within one)."""
    return TermBeatRecord(
        node=node,
        interval_ms=round(timing.interval * 1000),
        fence_ms=round(timing.fence_after * 1000),
        margin_ms=round(timing.margin * 1000),
    ).encode()


def beat_timing(key: str, value: bytes) -> BeatTiming | None:
    """The timings a beat carries; None for a value that is no beat record (a standby
    then never takes over by that beat: only the lease decides)."""
    with contextlib.suppress(RecordError):
        record = decode_shared(TermBeatRecord, value, key)
        return BeatTiming(
            record.interval_ms / 1000, record.fence_ms / 1000, record.margin_ms / 1000
        )
    return None


class TermBeats:
    """One node's beat writes for one pair."""

    def __init__(self, store: Store, pair: str, node: str) -> None:
        self.store = store
        self.pair = pair
        self.node = node
        self.key = keys.beat(pair)
        self.leader_key = keys.leader(pair)
        self.election = Election(store, pair, node)

    def first_beat(self, lease: int, timing: BeatTiming) -> Op:
        """The write a campaign adds for its term's first beat."""
        return Op.put(self.key, beat_record(self.node, timing), lease=lease)

    async def beat(self, epoch: int, lease: int, value: bytes) -> bool:
        """Beat for the term ``epoch``: whether etcd applied it (False: the leader key no
        longer has that epoch, the term is over)."""
        return await self.election.put_guarded(epoch, self.key, value, lease)

    async def take_over(self, guard: TakeoverGuard) -> int | None:
        """End the term ``guard.epoch``, whose beats stopped, for this node to campaign;
        the revision of the takeover, or None if anything it compares changed."""
        record = HandoverRecord(
            from_node=self.node,
            to=self.node,
            epoch=guard.epoch,
            request=TAKEOVER_REQUEST,
            planned=False,
        )
        result = await self.store.txn(
            [
                Compare.created(self.leader_key, guard.epoch),
                Compare.modified(self.key, guard.beat_revision),
                Compare.modified(keys.members(self.pair), guard.members_revision),
                Compare.modified(keys.sync_standby(self.pair), guard.sync_revision),
                Compare.modified(keys.paused(self.pair), guard.paused_revision),
            ],
            [Op.delete(self.leader_key), Op.put(keys.handover(self.pair), record.encode())],
        )
        return result.revision if result.succeeded else None
