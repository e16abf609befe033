"""The etcd cost of the term beat with its promises: PAIRS pairs, each an active that
every 50 ms asks its standby for a promise over the peer path and writes its guarded beat
(``workshop_agent/beat_election.py``) to etcd only when a promise is missing, against one
real etcd.

Each pair's active is the agent's own ``Beating`` (``workshop_agent/beating.py``, the
rules of ``term_beat.py``) on the bench's lease: every interval it sends its standby a
sealed hold (``peer_wire.py``, a random key per pair) on the agent's own peer path socket
(``peer_path.py``, real UDP, each node on a loopback address of its own); the standby
answers with ``Promises.answer`` (a promise of ``fence_after + margin``), the active takes
the replies in (``Beating.promise``) and beats in etcd only when they do not stand in for
the beat, or when the promise on the hold it just sent has not come a fifth of an
interval later. It sends each beat on time whatever the answers of the earlier ones (at
most a takeover time's worth in flight). Once its beats and promises are both late
(``Beating.hold_instant``), the agent asks its peers to hold for the lease and beats in
etcd meanwhile: the bench plays that part of ``holding.py`` alone (every beat to etcd
until the beats or the promises have been on time for half the default lease TTL, then
a release that ends the promises for the lease only), without the holds for the lease,
which change no beat.

First, crash takeovers: an active campaigns and beats with its promises, stops at once
(its lease lives on), and its standby takes the pair over as the agent does: once no
promise binds it (its promise ends ``fence_after + margin`` after the last hold it
received) and the last beat its watch delivered is that old, with a transaction guarded
on that beat (the campaign's, or the few the active wrote before its first promise);
then it campaigns. Printed: the time from the crash to the new epoch, how long before
the standby's takeover the crashed active's watchdog deadline had passed (as its
acknowledged beats and its peer's promises set it: below 0 would be an overlap), how
many takeovers waited for a promise rather than for a beat, and how many beats each
active wrote to etcd after its campaign.

Then, per run: the beats sent to etcd and applied per second (against the 20 per pair of
a beat every interval: ``intervals_per_s``), and of those sent, the ones sent while their
active would ask its peers to hold for the lease; each beat's round trip (median, p99,
and the share later than one interval), the beats not sent because too many were in
flight; the times an active would have asked its peers to hold for the lease, the times
its guard passed (``Beating.fence_point``: it would have fenced) and the times a standby
was free to take a live active's pair over (both should be 0); the holds and promises
per second on the peer path (datagrams: holds and replies), a hold's round trip to its
promise, the datagrams dropped; etcd's CPU (in all and per beat), the CPU of the client
processes and how long they waited for a CPU, the revisions and the growth of etcd's
database per second, and the watch deliveries per second. ``--procs`` processes play the
pairs, each pair's active and standby on an etcd connection and a socket of their own,
as two servers would be. No whole agent runs: this is the load of the store and the peer
path alone, as the agents would put it there.

The runs: ``--pairs`` with the peer path up (with every promise on time, etcd sees each
term's first beats and nothing more); then the most pairs with the peer path down for
``--cut-fraction`` of them (their holds dropped before they are sent: those pairs beat
in etcd every interval); ``--no-promises`` plays the design without promises instead
(every beat to etcd, no peer path; no cut run). The last run (the ceiling) plays the
most pairs with every active beating in etcd again as soon as its last beat is answered:
what this etcd applies at most while the clients share its machine (a lower bound of
what it serves alone).

The clients of every pair share etcd's machine here, where each agent would have a
server of its own: a client process starved of CPU (``clients_wait_for_cpu_pct``)
answers and takes in promises late, and by the rules above its pairs then beat in etcd.
Read the etcd figures of a run together with that one.

etcd runs over TLS with client certificates, and the peer path with a key per pair,
unless ``--lab``. Usage:
  python -m bench.bench_term_beat [--takeovers 20] [--pairs 10 50 100] [--seconds 20]
      [--procs 2] [--interval-ms 50] [--cut-fraction 0.25] [--no-promises]
      [--no-ceiling] [--lab]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from bench.procstat import proc_cpu_seconds, run_delay
from hapair.shared import keys
from hapair.shared.clock import boottime
from hapair.shared.lease import Session
from hapair.shared.log import EventLog
from hapair.shared.network import Network
from hapair.shared.pki import PEER_KEY_BYTES, TlsFiles
from hapair.shared.store import Store, StoreError
from hapair.shared.topology import Failover
from hapair.workshop_agent.beat_election import TermBeats, beat_record, beat_timing
from hapair.workshop_agent.beating import Beating
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.hold import Answer, Promises
from hapair.workshop_agent.peer_path import PeerPath
from hapair.workshop_agent.peer_wire import Hold, HoldReply, PeerAuth, Release
from hapair.workshop_agent.term_beat import NONE, BeatTiming, BeatView, TakeoverGuard, takeover_due
from tests.support.harness import Etcd
from tests.support.tls_etcd import LAB_HELP, etcd_mode, own_etcd

WARM_UP_S = 3.0  # every pair campaigned and promised before the window opens
LEASE_S = 60  # the bench's etcd leases: none expires during a run
AGENT_TTL_S = Failover().lease_ttl_s  # the default lease of an agent: a promise is never longer
SETTLE_S = AGENT_TTL_S / 2  # etcd on time that long before the peers are released (holding.py)
QUIET_LOG = "hapair.bench.term_beat"  # the played agents' log: to nowhere
PEER_NET = "127.81"  # the peer paths' loopback addresses: 127.81.x.y


def timing(interval_ms: int) -> BeatTiming:
    """The beat's timings at ``interval_ms``, the fence and the margin three of them (the
    defaults: 50, 150 and 150 ms)."""
    return BeatTiming(interval_ms / 1000, 3 * interval_ms / 1000, 3 * interval_ms / 1000)


TIMING = timing(50)


def peer_address(pair: int, node: int) -> str:
    """Node ``node`` (0: the active, 1: the standby) of pair number ``pair``: a loopback
    address of its own (Linux routes all of 127/8 to lo), as the agent's peer path binds
    one port on its node's address and takes a peer's datagrams only from that port."""
    return f"{PEER_NET}.{pair // 120}.{2 * (pair % 120) + 1 + node}"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def _status(etcd: Etcd) -> dict[str, Any]:
    out = subprocess.run(
        ["etcdctl", f"--endpoints={etcd.url}", *etcd.ctl_tls(), "endpoint", "status", "-w", "json"],
        capture_output=True,
        env={**os.environ, "ETCDCTL_API": "3"},
        timeout=10,
        check=True,
    )
    status: dict[str, Any] = json.loads(out.stdout)[0]["Status"]
    return status


def revision_and_size(etcd: Etcd) -> tuple[int, int]:
    """etcd's revision and database size, from one status call."""
    status = _status(etcd)
    return int(status["header"]["revision"]), int(status["dbSize"])


@dataclass
class Window:
    """What a worker counts between two wall-clock instants."""

    start: float
    end: float
    trips: list[float] = field(default_factory=list)  # beats etcd applied: round trips
    sent: int = 0  # beats sent to etcd
    sent_asking: int = 0  # of which while the active would ask its peers to hold for the lease
    unanswered: int = 0  # beats etcd did not answer within the store's timeout
    not_sent: int = 0  # beats needed but not sent: too many in flight
    asked_for_lease: int = 0  # times an active would have asked its peers to hold for the lease
    fences: int = 0  # times an active's guard passed: it would have fenced
    free: int = 0  # times a standby was free to take over a live active's pair
    holds: int = 0  # holds sent on the peer path
    holds_cut: int = 0  # holds dropped before they were sent (the peer path down)
    replies: int = 0  # standbys' answers sent
    promises: int = 0  # answers that extended a peer's promise, taken in by the actives
    hold_trips: list[float] = field(default_factory=list)  # hold sent to its promise taken in
    delivered: int = 0  # watch deliveries of the beat keys

    def open(self) -> bool:
        return self.start <= time.time() < self.end


@dataclass
class Lease:
    """What ``Beating`` reads of the agent's ``Session``: the lease its beats are bound to."""

    lease: int | None = None


def quiet_log(node: str) -> EventLog:
    """A played agent's log: to nowhere (the figures say what happened)."""
    logger = logging.getLogger(QUIET_LOG)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
    return EventLog(QUIET_LOG, node=node)


class CountedBeats(TermBeats):
    """The active's beat writes, which ``Beating`` sends through ``beat``: counted and
    timed in the window."""

    def __init__(
        self, store: Store, pair: str, me: str, w: Window, asking: Callable[[], bool]
    ) -> None:
        super().__init__(store, pair, me)
        self.w = w
        self._asking = asking
        self.in_flight = 0
        self.idle = asyncio.Event()  # no beat in flight
        self.idle.set()

    async def beat(self, epoch: int, lease: int, value: bytes) -> bool:
        counted = self.w.open()
        if counted:
            self.w.sent += 1
            self.w.sent_asking += self._asking()
        self.in_flight += 1
        self.idle.clear()
        sent = boottime()
        try:
            applied = await super().beat(epoch, lease, value)
        except StoreError:
            if counted:
                self.w.unanswered += 1
            raise
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()
        if self.w.open():
            self.w.trips.append(boottime() - sent)
        return applied


class Active:
    """One pair's active: the agent's ``Beating`` on the bench's lease, asking its peer
    (``ask``: its (seq, sent at), None without promises) every interval and beating in
    etcd only when their promises do not stand in for it."""

    def __init__(self, store: Store, pair: str, me: str, peer: str, w: Window) -> None:
        self.election = Election(store, pair, me)
        self.me, self.peer, self.w = me, peer, w
        self.session = Lease()
        self.epoch: int | None = None  # the term it won
        self.term: int | None = None  # the term it holds: None once stopped
        self.ask: Callable[[int, float], tuple[int, float] | None] = lambda epoch, ttl: None
        self.release: Callable[[int], None] = lambda epoch: None
        self.asking = False  # the agent would ask its peers to hold for the lease
        self._calm_since: float | None = None
        self.beating = Beating(
            store,
            pair,
            me,
            cast(Session, self.session),
            boottime,
            quiet_log(me),
            timing=lambda: TIMING,
            term=lambda: self.term,
            epoch=lambda: self.epoch,
            moved=self._moved,
            refused=lambda: None,  # counted by Beating: the bench's terms never end
            wake=lambda: None,
            late=self._late,
            peers=lambda: (peer,),
            ask=self._ask,
            asking=lambda: self.asking,
        )
        # Beating sends every beat through its ``beats``: these count them.
        self.beats = self.beating.beats = CountedBeats(store, pair, me, w, lambda: self.asking)
        self.runner: asyncio.Task[None] | None = None
        self.intervals = 0  # Beating's intervals: it asks for a hold in each
        self.missed = 0  # beats it needed but did not send: too many in flight
        self.moves = 0  # the times its fence point moved
        self._guard = float("inf")  # its fence point as last moved
        self._lapsed_at: float | None = None
        self._fence_timer: asyncio.TimerHandle | None = None
        self._holds_sent: dict[int, float] = {}  # seq: sent at, for the hold's round trip

    async def campaign(self, lease: int) -> int:
        """Win the pair with the term's first beat, and begin beating it (``take_over.py``)."""
        self.session.lease = lease
        timing = self.beating.pair_timing()
        started = boottime()
        epoch = await self.election.campaign(
            lease,
            members=[self.me, self.peer],
            also=self.beating.first_beat(lease, timing),
        )
        assert epoch is not None
        self.epoch = self.term = epoch
        self.beating.begin(epoch, started, timing)
        return epoch

    def run(self) -> None:
        self.runner = asyncio.get_running_loop().create_task(self.beating.run())

    def halt(self) -> None:
        """Nothing more leaves this node: no hold nor beat (the check for a promise due
        sends none once the term is not its own)."""
        self.term = None
        if self.runner is not None:
            self.runner.cancel()
        if self._fence_timer is not None:
            self._fence_timer.cancel()

    async def stop(self) -> None:
        """Halt, and wait for the beats in flight to be answered."""
        self.halt()
        if self.runner is not None:
            await asyncio.gather(self.runner, return_exceptions=True)
        await self.beats.idle.wait()

    def watchdog_deadline(self) -> float:
        return self.beating.fence_point(self.epoch) + TIMING.margin / 2

    def _ask(self, epoch: int, ttl: float) -> tuple[int, float] | None:
        """``Beating``'s ask, once an interval, before it decides the interval's beat."""
        loop = asyncio.get_running_loop()
        loop.call_soon(self._tally, self.intervals, self.beating.beats_promised)
        self.intervals += 1
        asked = self.ask(epoch, ttl)
        if asked is not None:
            self._holds_sent[asked[0]] = asked[1]
            self._holds_sent.pop(asked[0] - 64, None)
        return asked

    def _tally(self, intervals: int, promised: int) -> None:
        """The beats missed in the ``intervals`` before this one: those ``Beating``
        counted neither as sent nor as promised. Run just after this interval's decision,
        when every beat of the ones before has started (``beats_sent`` counts a beat as
        it starts) and this one's not yet; ``promised`` was read before the decision."""
        missed = intervals - self.beating.beats_sent - promised
        if self.w.open():
            self.w.not_sent += missed - self.missed
        self.missed = missed

    def replied(self, reply: HoldReply, now: float) -> None:
        """The peer path's ``on_hold_reply``: ``Beating.promise``."""
        moves = self.moves
        if self.beating.promise(reply) and self.moves > moves and self.w.open():
            self.w.promises += 1
            sent = self._holds_sent.get(reply.seq)
            if sent is not None:
                self.w.hold_trips.append(now - sent)

    # -- the fence timer, counting the guard passed ---------------------------------------
    def _moved(self) -> None:
        """The fence point moved (a beat acknowledged, a promise taken in): the one before
        counts if it passed meanwhile; the timer follows the new one, as the agent's
        fencing does."""
        self.moves += 1
        if boottime() >= self._guard:
            self._lapsed(self._guard)
        self._guard = self.beating.fence_point(self.epoch)
        self._arm()
        if self.asking:
            asyncio.get_running_loop().call_soon(self._holding_round)  # ``confirmed``

    def _arm(self) -> None:
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        if self._guard != float("inf") and self.term is not None:
            delay = max(0.0, self._guard - boottime())
            self._fence_timer = asyncio.get_running_loop().call_later(delay, self._due)

    def _due(self) -> None:
        self._fence_timer = None
        if boottime() < self._guard:
            self._arm()  # a timer may fire a hair early
        else:
            self._lapsed(self._guard)

    def _lapsed(self, guard: float) -> None:
        """The guard passed: the agent would have fenced."""
        if self._lapsed_at != guard:
            self._lapsed_at = guard
            if self.w.open():
                self.w.fences += 1

    # -- holding.py's rule, reduced to what decides the beats ----------------------------
    # A late beat or promise (Beating's ``late``) has the agent ask its peers to hold for
    # the lease; while it asks, every beat goes to etcd. Once the beats or the promises
    # have been on time for SETTLE_S it releases the peers, which ends their promises
    # for the lease only. The holds for the lease themselves are not sent here: they
    # change no beat.
    def _late(self) -> None:
        if self.w.open():
            self.w.asked_for_lease += 1
        self.asking, self._calm_since = True, None

    def _holding_round(self) -> None:
        """A round of ``Holding.run`` while asking, as a beat or promise taken in wakes it."""
        term = self.term
        if not self.asking or term is None:
            return
        now = boottime()
        if now >= self.beating.hold_instant(term):
            self._calm_since = None
        elif self._calm_since is None:
            self._calm_since = now
        elif now >= self._calm_since + SETTLE_S:
            self.asking, self._calm_since = False, None
            self.release(term)


class Standby:
    """One pair's standby: its view of the beat key (a watch of its own, from what it
    read), the promises it gives (``Holding.on_hold``) and when it may take over."""

    def __init__(self, store: Store, pair: str, me: str, w: Window) -> None:
        self.store, self.pair, self.me, self.w = store, pair, me, w
        self.beats = TermBeats(store, pair, me)
        self.promises = Promises()
        self.view = BeatView()
        self.epoch: int | None = None  # the term it saw in etcd (the leader key's)
        self.revision = 0  # the newest revision it read of the pair's keys
        self.busy: str | None = None
        self.promised_until = NONE  # the end of the last promise it gave
        self.ready = asyncio.Event()
        self._free_at: float | None = None

    def due(self, now: float) -> float:
        """When it may take the term over (``Beating.due`` with the binding promise)."""
        binding = self.promises.binding(now)
        until = NONE if binding is None else binding.until
        return takeover_due(self.view.seen, self.epoch, until, TIMING)

    def _check(self, now: float) -> None:
        """Count the instants it was free to take a live active's pair over."""
        due = self.due(now)
        if now >= due and self._free_at != due:
            self._free_at = due
            if self.w.open():
                self.w.free += 1

    def on_hold(self, hold: Hold, now: float) -> Answer:
        self._check(now)
        if self.w.open():
            self.w.replies += 1
        answer = self.promises.answer(
            hold,
            now,
            ttl=AGENT_TTL_S,
            busy=self.busy,
            newest_epoch=self.epoch,
            seen_revision=self.revision,
        )
        if answer.promised:
            self.promised_until = max(self.promised_until, now + answer.ttl)
        return answer

    def on_release(self, release: Release) -> None:
        self.promises.release(release.sender, release.epoch)

    def _deliver(self, revision: int, key: str, value: bytes | None) -> None:
        now = boottime()
        if self.ready.is_set():
            self._check(now)
        self.revision = max(self.revision, revision)
        found = None if value is None else beat_timing(key, value)
        if found is None:
            self.view.deleted()
        else:
            self.view.delivered(revision, found, now)

    async def follow(self) -> None:
        """The term from the leader key, then the beat key read and watched from there."""
        leader = await self.store.get(keys.leader(self.pair))
        assert leader is not None
        self.epoch = leader.create_revision
        kvs, revision = await self.store.get_prefix(keys.beats_of(self.pair))
        self.revision = max(revision, leader.mod_revision)
        for kv in kvs:
            self._deliver(kv.mod_revision, kv.key, kv.value)
        self.ready.set()
        async for change in self.store.watch_prefix(keys.beats_of(self.pair), revision + 1):
            if self.w.open():
                self.w.delivered += 1
            kv = change.kv
            self._deliver(kv.mod_revision, kv.key, None if change.deleted else kv.value)


class Link:
    """A pair's peer path: the agent's socket on each node, sealed with the pair's key."""

    def __init__(self, number: int, a: str, b: str, port: int, key: bytes | None) -> None:
        network = Network(peer_port=port)
        self.addresses = peer_address(number, 0), peer_address(number, 1)
        self.a = PeerPath(a, {b: self.addresses[1]}, network, PeerAuth(key), boottime)
        self.b = PeerPath(b, {a: self.addresses[0]}, network, PeerAuth(key), boottime)

    async def open(self, active: Active, standby: Standby, cut: bool) -> None:
        """Hook both ends to the pair; ``cut``: every hold dropped before it is sent."""
        self.a.on_hold_reply = active.replied
        self.b.on_hold = standby.on_hold
        self.b.on_release = standby.on_release
        await self.a.open(self.addresses[0])
        await self.b.open(self.addresses[1])
        seq = 0
        w = active.w

        def lost(epoch: int, ttl: float) -> tuple[int, float]:
            nonlocal seq
            seq += 1
            if w.open():
                w.holds_cut += 1
            return seq, boottime()

        def sent(epoch: int, ttl: float) -> tuple[int, float]:
            if w.open():
                w.holds += 1
            return self.a.send_hold(epoch, ttl)

        active.ask = lost if cut else sent
        if not cut:
            active.release = self.a.send_release

    def dropped(self) -> int:
        return sum(self.a.dropped.values()) + sum(self.b.dropped.values())

    def close(self) -> None:
        self.a.close()
        self.b.close()


async def flat_out(active: Active, stop: asyncio.Event, lease: int) -> None:
    """The ceiling: every beat in etcd, the next one as soon as the last is answered."""
    epoch = active.epoch
    assert epoch is not None
    value = beat_record(active.me, TIMING)
    while not stop.is_set():
        assert await active.beats.beat(epoch, lease, value)


async def play_pair(
    stores: tuple[Store, Store],
    number: int,
    spec: dict[str, Any],
    w: Window,
    stop: asyncio.Event,
    links: list[Link],
) -> None:
    """One pair: its active campaigns with the first beat, its standby reads the term and
    follows the beat key, and (with promises) the two speak over their peer path."""
    pair = f"p{number:03d}"
    a, b = f"{pair}-a", f"{pair}-b"
    active, standby = Active(stores[0], pair, a, b, w), Standby(stores[1], pair, b, w)
    if spec["mode"] == "promises":
        key = None if spec["lab"] else os.urandom(PEER_KEY_BYTES)
        link = Link(number, a, b, spec["peer_port"], key)
        links.append(link)
        await link.open(active, standby, number in spec["cut"])
    lease = await stores[0].grant(LEASE_S)
    await active.campaign(lease)
    follower = asyncio.create_task(standby.follow())
    try:
        if spec["mode"] == "closed":
            await flat_out(active, stop, lease)
        else:
            active.run()
            await stop.wait()
        await active.stop()
        assert not active.beating.beats_refused, "a beat refused: the bench's terms never end"
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


async def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Play ``spec["pairs"]``: each pair's active and standby with a connection and a
    socket of their own, as two servers would have; count what falls in the window."""
    tls = TlsFiles(**{k: Path(v) for k, v in spec["tls"].items()}) if spec["tls"] else None
    w = Window(spec["start"], spec["end"])
    numbers: list[int] = spec["pairs"]
    stores = [Store(spec["url"], timeout=5.0, tls=tls) for _ in range(2 * len(numbers))]
    stop = asyncio.Event()
    links: list[Link] = []
    pairs = [
        asyncio.create_task(play_pair((stores[2 * i], stores[2 * i + 1]), n, spec, w, stop, links))
        for i, n in enumerate(numbers)
    ]
    await asyncio.sleep(max(0.0, w.start - time.time()))
    cpu0, wait0 = time.process_time(), run_delay()
    await asyncio.sleep(max(0.0, w.end - time.time()))
    cpu1, wait1 = time.process_time(), run_delay()
    stop.set()
    await asyncio.gather(*pairs)
    dropped = sum(link.dropped() for link in links)
    for link in links:
        link.close()
    await asyncio.gather(*(s.close() for s in stores))
    counts = {k: v for k, v in vars(w).items() if k not in ("start", "end")}
    return {**counts, "dropped": dropped, "cpu": cpu1 - cpu0, "wait": wait1 - wait0}


def cut_pairs(pairs: int, fraction: float) -> list[int]:
    """The pairs whose peer path is down: ``fraction`` of them, spread over all."""
    return [i for i in range(pairs) if int((i + 1) * fraction) > int(i * fraction)]


def _ms(values: list[float], q: float) -> float | None:
    return 1000 * values[int(q * (len(values) - 1))] if values else None


def run(
    etcd: Etcd,
    pairs: int,
    seconds: float,
    procs: int,
    mode: str,
    interval_ms: int,
    cut_fraction: float = 0.0,
    lab: bool = False,
) -> dict[str, Any]:
    """``pairs`` pairs played by ``procs`` worker processes against ``etcd``, measured
    over ``seconds`` once every pair beats. ``mode``: "promises" (the peer path, down for
    ``cut_fraction`` of the pairs), "every beat" (no promises: every beat to etcd) or
    "closed" (the ceiling)."""
    tls = etcd.tls
    files = None if tls is None else {k: str(v) for k, v in vars(tls).items() if v is not None}
    start = time.time() + WARM_UP_S + pairs * 0.02
    end = start + seconds
    cut = cut_pairs(pairs, cut_fraction) if mode == "promises" else []
    common = {
        "url": etcd.url,
        "tls": files,
        "start": start,
        "end": end,
        "mode": mode,
        "interval_ms": interval_ms,
        "cut": cut,
        "lab": lab,
        "peer_port": free_udp_port(),
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.bench_term_beat", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(procs)
    ]
    for n, proc in enumerate(workers):
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({**common, "pairs": list(range(pairs))[n::procs]}))
        proc.stdin.close()
    assert etcd.proc is not None
    time.sleep(max(0.0, start - time.time()))
    (rev0, size0), etcd0 = revision_and_size(etcd), proc_cpu_seconds(etcd.proc.pid)
    time.sleep(max(0.0, end - time.time()))
    etcd1, (rev1, size1) = proc_cpu_seconds(etcd.proc.pid), revision_and_size(etcd)
    results = []
    for proc in workers:
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.wait(timeout=60 + pairs)
        if proc.returncode != 0:
            raise RuntimeError(f"a worker failed (exit {proc.returncode})")
        results.append(json.loads(out))

    def total(name: str) -> int:
        return sum(int(r[name]) for r in results)

    trips = sorted(t for r in results for t in r["trips"])
    hold_trips = sorted(t for r in results for t in r["hold_trips"])
    cpu, wait = sum(r["cpu"] for r in results), sum(r["wait"] for r in results)
    etcd_cpu = etcd1 - etcd0
    return {
        "pairs": pairs,
        "mode": mode,
        "cut_pairs": len(cut),
        "client_processes": procs,
        "intervals_per_s": None if mode == "closed" else pairs / TIMING.interval,
        "beats_sent_per_s": total("sent") / seconds,
        "beats_per_s": len(trips) / seconds,
        "beats_sent_while_asking_per_s": total("sent_asking") / seconds,
        "round_trip_median_ms": 1000 * statistics.median(trips) if trips else None,
        "round_trip_p99_ms": _ms(trips, 0.99),
        "late_pct": 100 * sum(t > TIMING.interval for t in trips) / len(trips) if trips else None,
        "beats_unanswered": total("unanswered"),
        "beats_not_sent_in_flight": total("not_sent"),
        "asked_for_lease_holds": total("asked_for_lease"),
        "active_fenced": total("fences"),
        "standby_free_to_take_over": total("free"),
        "holds_per_s": total("holds") / seconds,
        "holds_cut_per_s": total("holds_cut") / seconds,
        "promises_per_s": total("promises") / seconds,
        "datagrams_per_s": (total("holds") + total("replies")) / seconds,
        "hold_to_promise_median_ms": _ms(hold_trips, 0.5),
        "hold_to_promise_p99_ms": _ms(hold_trips, 0.99),
        "datagrams_dropped": total("dropped"),
        "etcd_cpu_pct": 100 * etcd_cpu / seconds,
        "etcd_cpu_us_per_beat": 1e6 * etcd_cpu / len(trips) if trips else None,
        "clients_cpu_pct": 100 * cpu / seconds,
        "clients_wait_for_cpu_pct": 100 * wait / seconds,
        "revisions_per_s": (rev1 - rev0) / seconds,
        "db_growth_kib_per_s": (size1 - size0) / 1024 / seconds,
        "deliveries_per_s": total("delivered") / seconds,
        "load_avg_1m": os.getloadavg()[0],
    }


@dataclass
class Takeover:
    took: float  # crash to the standby's new epoch
    room: float  # the crashed active's watchdog deadline to the standby's takeover send
    on_promise: bool  # the standby waited for its promise to end, not for a beat
    written: int  # beats the active wrote to etcd after its campaign


async def takeover_once(
    store: Store, n: int, rng: random.Random, port: int, key: bytes | None
) -> Takeover:
    """An active campaigns and beats with its promises, then stops at once (its server
    crashed; its lease lives on); its standby takes the pair over once no promise binds
    it and its last beat is old enough, guarded on that beat, and campaigns."""
    pair, a, b = f"t{n:03d}", f"t{n:03d}-a", f"t{n:03d}-b"
    w = Window(0.0, 0.0)
    active, standby = Active(store, pair, a, b, w), Standby(store, pair, b, w)
    link = Link(n, a, b, port, key)
    await link.open(active, standby, cut=False)
    lease_a, lease_b = await store.grant(30), await store.grant(30)
    epoch = await active.campaign(lease_a)
    follower = asyncio.create_task(standby.follow())
    await standby.ready.wait()
    active.run()
    await asyncio.sleep(rng.uniform(1.0, 1.5))
    # The server dies: no more holds nor beats, and no answer reaches it. A beat in
    # flight may still be applied, unanswered: as in a crash.
    active.halt()
    link.a.close()
    crash = boottime()
    watchdog_at = active.watchdog_deadline()
    await active.stop()
    members = await store.get(keys.members(pair))
    assert members is not None
    while True:
        now = boottime()
        due = standby.due(now)
        if due > now:
            await asyncio.sleep(min(0.005, due - now))
            continue
        assert standby.view.seen is not None
        on_promise = standby.promised_until > standby.view.seen.received + TIMING.takeover_after
        standby.busy = "this node is campaigning"  # no promise while in flight
        sent = boottime()
        guard = TakeoverGuard(epoch, standby.view.seen.revision, members.mod_revision)
        if await standby.beats.take_over(guard) is not None:
            break
        standby.busy = None
    new_epoch = await Election(store, pair, b).campaign(
        lease_b,
        target=True,
        members=[a, b],
        members_revision=members.mod_revision,
        also=[standby.beats.first_beat(lease_b, TIMING)],
    )
    assert new_epoch is not None and new_epoch > epoch
    done = boottime()
    follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    link.close()
    await store.revoke(lease_a)
    await store.revoke(lease_b)
    return Takeover(done - crash, sent - watchdog_at, on_promise, active.beating.beats_sent)


async def takeovers(etcd: Etcd, runs: int, lab: bool) -> dict[str, Any]:
    store = Store(etcd.url, timeout=5.0, tls=etcd.tls)
    rng = random.Random(runs)
    port = free_udp_port()
    key = None if lab else os.urandom(PEER_KEY_BYTES)
    results = [await takeover_once(store, n, rng, port, key) for n in range(runs)]
    await store.close()
    took, room = sorted(r.took for r in results), sorted(r.room for r in results)
    written = sorted(r.written for r in results)
    return {
        "runs": runs,
        "crash_to_new_epoch_median_ms": 1000 * statistics.median(took),
        "crash_to_new_epoch_min_ms": 1000 * took[0],
        "crash_to_new_epoch_max_ms": 1000 * took[-1],
        "watchdog_before_takeover_min_ms": 1000 * room[0],
        "waited_for_the_promise": sum(r.on_promise for r in results),
        "beats_after_campaign_median": statistics.median(written),
        "beats_after_campaign_max": written[-1],
        "load_avg_1m": os.getloadavg()[0],
    }


def rounded(result: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}


def main() -> None:
    global TIMING
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--takeovers", type=int, default=20, help="crash takeovers to time")
    parser.add_argument(
        "--procs", type=int, default=2, help="client processes playing the pairs' servers"
    )
    parser.add_argument(
        "--interval-ms", type=int, default=50, help="the beat's interval (fence and margin: 3x)"
    )
    parser.add_argument(
        "--cut-fraction",
        type=float,
        default=0.25,
        help="a run of the most pairs with the peer path down for this share of them "
        "(0: no such run)",
    )
    parser.add_argument(
        "--no-promises",
        dest="promises",
        action="store_false",
        help="the pairs' runs without promises: every beat to etcd, no peer path",
    )
    parser.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip the last run: the most pairs, each beating again as soon as answered",
    )
    parser.add_argument("--lab", action="store_true", help=LAB_HELP)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(sys.stdin.read())
        TIMING = timing(spec["interval_ms"])
        print(json.dumps(asyncio.run(worker(spec))))
        return
    if not 0 <= args.cut_fraction <= 1:
        parser.error("--cut-fraction: a share from 0 to 1")
    TIMING = timing(args.interval_ms)
    design = "promises on the peer path" if args.promises else "no promises: every beat to etcd"
    print(
        f"etcd: {etcd_mode(args.lab)}; {os.cpu_count()} cores; beat every "
        f"{args.interval_ms} ms; {design}",
        flush=True,
    )
    if args.takeovers:
        with tempfile.TemporaryDirectory(prefix="hapair-beat-") as tmp:
            etcd = own_etcd(Path(tmp), args.lab)
            try:
                result = asyncio.run(takeovers(etcd, args.takeovers, args.lab))
            finally:
                etcd.cleanup()
        print(json.dumps(rounded(result)), flush=True)
    mode = "promises" if args.promises else "every beat"
    runs = [(pairs, mode, 0.0) for pairs in args.pairs]
    if args.promises and args.cut_fraction and args.pairs:
        runs.append((max(args.pairs), mode, args.cut_fraction))
    if args.ceiling and args.pairs:
        runs.append((max(args.pairs), "closed", 0.0))
    for pairs, mode, cut in runs:
        with tempfile.TemporaryDirectory(prefix="hapair-beat-") as tmp:
            etcd = own_etcd(Path(tmp), args.lab)
            try:
                result = run(
                    etcd, pairs, args.seconds, args.procs, mode, args.interval_ms, cut, args.lab
                )
            finally:
                etcd.cleanup()
        print(json.dumps(rounded(result)), flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
