"""The term beat's transactions (workshop_agent/beat_election.py) against a real etcd: a
beat applies only while the leader key has its term's epoch; a takeover wins only on the
last beat applied and an unchanged member set and synchronous standby record, ends the
term for the old active, and a campaign after it makes a new, higher epoch; of two
standbys on the same beat one wins."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from hapair.shared import keys
from hapair.shared.records import HandoverRecord, SyncState, decode
from hapair.shared.store import Store, StoreError
from hapair.shared.txn import Op
from hapair.workshop_agent.beat_election import TAKEOVER_REQUEST, TermBeats, beat_record
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.term_beat import BeatTiming, TakeoverGuard

PAIR = "asm"
NODES = ["asm-a", "asm-b", "asm-c"]
TIMING = BeatTiming(interval=0.05, fence_after=0.15, margin=0.15)


@pytest.fixture
async def beats(store: Store) -> AsyncIterator[Store]:
    """The store, with no beat key left by an earlier test (they live outside the
    prefix the ``store`` fixture clears)."""
    end = keys.prefix_end(keys.BEATS_PREFIX)
    await store.delete_range(keys.BEATS_PREFIX, end)
    yield store
    await store.delete_range(keys.BEATS_PREFIX, end)


async def elected(store: Store, node: str) -> tuple[int, int, TermBeats]:
    """``node`` wins a campaign that writes its term's first beat: (epoch, lease, beats)."""
    lease = await store.grant(30)
    beats = TermBeats(store, PAIR, node)
    epoch = await Election(store, PAIR, node).campaign(
        lease, members=NODES, also=[beats.first_beat(lease, TIMING)]
    )
    assert epoch is not None
    return epoch, lease, beats


async def mod_revision(store: Store, key: str) -> int:
    kv = await store.get(key)
    return kv.mod_revision if kv is not None else 0


async def test_the_campaign_writes_the_terms_first_beat(beats: Store) -> None:
    epoch, lease, _ = await elected(beats, "asm-a")
    kv = await beats.get(keys.beat(PAIR))
    assert kv is not None
    assert kv.mod_revision == epoch, "a standby counts it as a beat of this term"
    assert kv.lease == lease, "it goes with the active's lease"
    assert kv.value == beat_record("asm-a", TIMING)


async def test_a_beat_applies_only_while_the_leader_key_has_its_epoch(beats: Store) -> None:
    epoch, lease, a = await elected(beats, "asm-a")
    value = beat_record("asm-a", TIMING)
    assert await a.beat(epoch, lease, value)
    assert await a.beat(epoch, lease, value)
    last = await mod_revision(beats, keys.beat(PAIR))
    assert last > epoch + 1, "every beat is a new revision, the value unchanged"
    assert await Election(beats, PAIR, "asm-a").resign(epoch) is not None
    assert not await a.beat(epoch, lease, value), "the term is over in etcd"
    assert await mod_revision(beats, keys.beat(PAIR)) == last, "a refused beat writes nothing"


async def test_a_takeover_on_the_last_beat_ends_the_term_and_a_higher_epoch_follows(
    beats: Store,
) -> None:
    epoch, lease, a = await elected(beats, "asm-a")
    assert await a.beat(epoch, lease, beat_record("asm-a", TIMING))
    seen = await mod_revision(beats, keys.beat(PAIR))
    members = await mod_revision(beats, keys.members(PAIR))
    b = TermBeats(beats, PAIR, "asm-b")

    took = await b.take_over(TakeoverGuard(epoch, seen, members, 0))

    assert took is not None
    assert await beats.get(keys.leader(PAIR)) is None
    kv = await beats.get(keys.handover(PAIR))
    assert kv is not None
    handover = decode(HandoverRecord, kv.value, kv.key)
    assert (handover.from_node, handover.to, handover.epoch) == ("asm-b", "asm-b", epoch)
    assert handover.request == TAKEOVER_REQUEST and not handover.planned
    assert not await a.beat(epoch, lease, beat_record("asm-a", TIMING)), "A's term is over"
    assert not await Election(beats, PAIR, "asm-c").campaign(
        await beats.grant(30), members=NODES, members_revision=members
    ), "the handover keeps every other node out"

    lease_b = await beats.grant(30)
    new_epoch = await Election(beats, PAIR, "asm-b").campaign(
        lease_b,
        target=True,
        members=NODES,
        members_revision=members,
        also=[b.first_beat(lease_b, TIMING)],
    )
    assert new_epoch is not None and new_epoch > took > epoch
    leader = await beats.get(keys.leader(PAIR))
    assert leader is not None and leader.create_revision == new_epoch and leader.lease == lease_b
    beat = await beats.get(keys.beat(PAIR))
    assert beat is not None and beat.mod_revision == new_epoch and beat.lease == lease_b
    assert await beats.get(keys.handover(PAIR)) is None
    assert not await a.beat(epoch, lease, beat_record("asm-a", TIMING))
    assert await b.beat(new_epoch, lease_b, beat_record("asm-b", TIMING))


async def test_a_takeover_on_a_beat_no_longer_the_last_changes_nothing(beats: Store) -> None:
    epoch, lease, a = await elected(beats, "asm-a")
    seen = await mod_revision(beats, keys.beat(PAIR))
    members = await mod_revision(beats, keys.members(PAIR))
    assert await a.beat(epoch, lease, beat_record("asm-a", TIMING))  # after P's look

    assert (
        await TermBeats(beats, PAIR, "asm-b").take_over(TakeoverGuard(epoch, seen, members)) is None
    )

    leader = await beats.get(keys.leader(PAIR))
    assert leader is not None and leader.create_revision == epoch
    assert await beats.get(keys.handover(PAIR)) is None
    assert await a.beat(epoch, lease, beat_record("asm-a", TIMING)), "A's term goes on"


@pytest.mark.parametrize("changed", ["members", "sync record", "paused"])
async def test_a_takeover_fails_when_what_its_decision_read_changed(
    beats: Store, changed: str
) -> None:
    epoch, _, _ = await elected(beats, "asm-a")
    election = Election(beats, PAIR, "asm-a")
    sync = SyncState(primary="asm-a", sync=["asm-b"], epoch=epoch).encode()
    assert await election.put_guarded(epoch, keys.sync_standby(PAIR), sync, None)
    seen = await mod_revision(beats, keys.beat(PAIR))
    members = await mod_revision(beats, keys.members(PAIR))
    recorded = await mod_revision(beats, keys.sync_standby(PAIR))
    if changed == "members":
        assert await election.write_members(epoch, ["asm-a", "asm-c"]) is not None
    elif changed == "paused":
        await beats.put(keys.paused(PAIR), b"{}")  # an operator's: no failover now
    else:
        # The primary gave its standby up (to go asynchronous) before it stopped.
        degraded = SyncState(primary="asm-a", sync=[], degraded=True, epoch=epoch).encode()
        assert await election.put_guarded(epoch, keys.sync_standby(PAIR), degraded, None)

    guard = TakeoverGuard(epoch, seen, members, recorded)
    assert await TermBeats(beats, PAIR, "asm-b").take_over(guard) is None
    leader = await beats.get(keys.leader(PAIR))
    assert leader is not None and leader.create_revision == epoch


async def test_of_two_standbys_on_the_same_beat_one_wins(beats: Store) -> None:
    epoch, _, _ = await elected(beats, "asm-a")
    guard = TakeoverGuard(
        epoch,
        await mod_revision(beats, keys.beat(PAIR)),
        await mod_revision(beats, keys.members(PAIR)),
    )
    results = await asyncio.gather(
        TermBeats(beats, PAIR, "asm-b").take_over(guard),
        TermBeats(beats, PAIR, "asm-c").take_over(guard),
    )
    assert sum(r is not None for r in results) == 1, results


async def test_etcd_refuses_to_delete_and_create_one_key_in_one_transaction(
    beats: Store,
) -> None:
    """Why a takeover and the campaign after it are two transactions."""
    key = keys.leader(PAIR)
    await beats.put(key, b"old")
    with pytest.raises(StoreError, match="duplicate key"):
        await beats.txn([], [Op.delete(key), Op.put(key, b"new")])
    kv = await beats.get(key)
    assert kv is not None and kv.value == b"old"
