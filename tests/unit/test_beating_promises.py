"""The active's beats while its peers' promises stand in for them (``beating.py``), on
real time with a fake etcd and a fake peer path: when they go quiet, a beat reaches etcd
early enough that an etcd answering within the fence point less one interval and a
little keeps the term, as beats sent every interval did."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hapair.shared.clock import boottime
from hapair.shared.log import EventLog
from hapair.workshop_agent.beating import Beating
from hapair.workshop_agent.peer_wire import HoldReply
from hapair.workshop_agent.term_beat import BeatTiming

TERM = 7
TIMING = BeatTiming(interval=0.05, fence_after=0.15, margin=0.15)


@dataclass
class FakeSession:
    lease: int | None = 1


@dataclass
class World:
    """The peers that answer holds, and every beat sent to etcd (its send time)."""

    answering: set[str] = field(default_factory=lambda: {"b"})
    beats: list[float] = field(default_factory=list)
    beaten: asyncio.Event = field(default_factory=asyncio.Event)
    seq: int = 0

    async def beat_after(self, t: float) -> float:
        """The send of the first beat to etcd at or after ``t``."""

        async def first() -> float:
            while not self.beats or self.beats[-1] < t:
                self.beaten.clear()
                await self.beaten.wait()
            return next(x for x in self.beats if x >= t)

        return await asyncio.wait_for(first(), 1.0)


async def quiet(world: World, b: Beating, seconds: float) -> None:
    """The promises stood in for the beats over ``seconds``: for most of them at least
    (a loaded machine may run a tick late, and its beat then goes to etcd)."""
    beats, promised = len(world.beats), b.beats_promised
    await asyncio.sleep(seconds)
    beats, promised = len(world.beats) - beats, b.beats_promised - promised
    assert promised > 0 and beats <= promised / 2, (beats, promised)


def beating(world: World, peers: set[str] | None = None, asked: set[str] | None = None) -> Beating:
    peers = {"b"} if peers is None else peers
    loop = asyncio.get_running_loop()
    b: Beating

    def ask(epoch: int, ttl: float) -> tuple[int, float]:
        world.seq += 1
        seq, now = world.seq, boottime()
        for peer in world.answering:
            reply = HoldReply(peer, "a", seq, epoch, True, ttl=ttl)
            loop.call_soon(b.promise, reply)  # before the active looks for it
        return seq, now

    b = Beating(
        None,  # type: ignore[arg-type]  # etcd: the beat itself is faked below
        "p",
        "a",
        FakeSession(),  # type: ignore[arg-type]
        boottime,
        EventLog("test"),
        timing=lambda: TIMING,
        term=lambda: TERM,
        epoch=lambda: TERM,
        moved=lambda: None,
        refused=lambda: None,
        wake=lambda: None,
        peers=lambda: peers,
        asked=None if asked is None else (lambda: asked),
        ask=ask,
    )

    async def beat(epoch: int, lease: int, value: bytes) -> bool:
        world.beats.append(boottime())
        world.beaten.set()
        await asyncio.sleep(0.001)
        return True

    b.beats.beat = beat  # type: ignore[method-assign]
    return b


async def test_a_standby_gone_quiet_has_the_beat_in_etcd_two_intervals_early() -> None:
    world = World()
    b = beating(world)
    b.begin(TERM, boottime(), TIMING)
    task = asyncio.create_task(b.run())
    try:
        await asyncio.sleep(0.5)
        await quiet(world, b, 0.3)
        guard = b.fence_point(TERM)
        world.answering.clear()  # the standby's server dies
        beat = await world.beat_after(boottime())
        # etcd has from this beat's send to the end of the promises' guard to answer it:
        # nearly the two intervals that a beat sent every interval had (less the wait
        # for the answers, and a loaded machine's lateness), not one.
        left = guard - beat
        assert left >= TIMING.fence_after - TIMING.interval - 3 * TIMING.answer_within, left
    finally:
        task.cancel()


async def test_a_node_added_to_the_topology_is_counted_on_only_once_etcd_has_a_beat() -> None:
    """c joins the topology: it is asked to hold, and until it promises the beats go to
    etcd, but the term's guard does not count on it before a member set lists it (it
    may not take the term over by beat before). That set is written only once the
    guard stands without c's promise: the beats in etcd keep the term."""
    world = World()
    members, topology = {"b"}, {"b"}
    b = beating(world, peers=members, asked=topology)
    b.begin(TERM, boottime(), TIMING)
    task = asyncio.create_task(b.run())
    try:
        await asyncio.sleep(0.5)
        await quiet(world, b, 0.3)  # b's promises stand in for the beats
        assert b.covers({"a", "b"}), "nobody new"
        guard = b.fence_point(TERM)
        topology.add("c")  # c's agent does not answer yet
        now = boottime()
        # Not lowered by c, which it does not count on (a loaded machine may have left
        # b's last promise a little older than usual: the point is not the test).
        assert b.fence_point(TERM) == guard, "c counts for nothing yet"
        # A loaded machine may run a tick late, and its beat then goes to etcd: only a
        # last beat in etcd older than the instant a hold is due cannot keep the term.
        if not world.beats or boottime() - world.beats[-1] >= TIMING.hold_after:
            assert not b.covers({"a", "b", "c"}), "the last beat in etcd is long past"
        await world.beat_after(now)
        await asyncio.sleep(0.01)
        assert b.covers({"a", "b", "c"}), "the beats in etcd keep the term without c"
        members.add("c")  # the set that lists c is written
        await asyncio.sleep(0.3)
        assert b.fence_point(TERM) > boottime(), "beating in etcd for c"
        world.answering.add("c")
        await asyncio.sleep(0.2)
        await quiet(world, b, 0.3)  # b's and c's promises stand in for the beats
    finally:
        task.cancel()
