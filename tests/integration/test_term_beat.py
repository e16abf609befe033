"""The term beat in running agents: a crashed or frozen active is taken over by its
stopped beats long before its lease could run out, and an etcd stall moves nothing.
With the peer path up, the standby's promises stand in for the beats and nothing is
written to etcd; cut, the beats go there again, and an active that can reach neither is
fenced before its standby takes over.

The pairs here run on a 5 s lease: with keepalives every 1.25 s it cannot run out before
3.75 s after the active's last one, so a takeover sooner than that is the beat's. The
rules and their argument: ``workshop_agent/term_beat.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hapair.shared import keys
from hapair.shared.records import Members, Switchover, decode
from tests.integration.test_etcd_loss import with_peer_path
from tests.integration.test_failover import pair, service_pid
from tests.support.cluster import Cluster, checked_cluster, descendants, pid_alive, until
from tests.support.etcd_relay import RelayThread
from tests.support.harness import free_port
from tests.support.tls_etcd import ADMIN, TestPki, TlsEtcd

pytestmark = pytest.mark.e2e

LEASE_S = 5.0
BEFORE_EXPIRY_S = 3.75  # the lease cannot run out sooner after the active's last keepalive
# Twice the default interval and near three times its fence and margin: the rules are the
# same at any scale, and the defaults' 150 ms fence fences a primary whose agent waits
# that long for a CPU, as a test machine running two suites at once makes it now and
# then (docs/concepts.md: what a loaded site should use).
BEAT = {"interval_ms": 100, "fence_ms": 400, "margin_ms": 400}
INTERVAL_S = BEAT["interval_ms"] / 1000


@pytest.fixture
def own_etcd(test_pki: TestPki) -> Iterator[TlsEtcd]:
    """An etcd of its own: the stall test stops it."""
    etcd = TlsEtcd(test_pki.dir, ADMIN)
    try:
        yield etcd.start()
    finally:
        os.kill(etcd.proc.pid, signal.SIGCONT)
        etcd.cleanup()


@pytest.fixture
async def beat_cluster(own_etcd: TlsEtcd, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with checked_cluster(own_etcd, tmp_path) as c:
        yield c


async def beating_pair(
    c: Cluster, net: int, *a_extra: str, lab: bool = False, **failover: Any
) -> int:
    """``lab``: the peer path in the lab mode (no peer key)."""
    spec = pair(
        "p", ["a", "b"], net, free_port(), c.record, lease_ttl_s=LEASE_S, term_beat=BEAT, **failover
    )
    with_peer_path(spec, net)
    if lab:
        spec["network"]["peer_key_file"] = None
    await c.apply(c.site([spec]))
    c.peer_port = spec["network"]["peer_port"]  # type: ignore[attr-defined]
    c.spec = spec  # type: ignore[attr-defined]
    # Started together: a run on a pair with a peer path waits a lease TTL after its
    # start (for promises an earlier run may have given, hold.py) before it campaigns or
    # takes over, and the main server wins.
    c.start("a", *a_extra)
    c.start("b")
    _, epoch = await c.active("p", node="a", timeout=LEASE_S + 10)
    await c.standby("b")
    # The standby has seen a beat of this term once its view shows one newer than the
    # campaign's: it measures from there.
    first = await c.store.get(keys.beat("p"))
    assert first is not None and first.mod_revision >= epoch, "the campaign wrote a beat"
    # A beat late under load (the term's first ones come while its service starts) has
    # a ask b to hold, and b's promise then rightly keeps it from taking over until a
    # releases it: the faults below are meant for a b that is free.
    await until(lambda: asyncio.sleep(0, released_last(c, or_never_held=True)), 20, "b free")
    return epoch


def released_last(c: Cluster, or_never_held: bool = False) -> bool:
    """Whether a's last word on holds is that it released its peers (a beat late again
    under load would have it ask them again, and they would promise anew); with
    ``or_never_held``, also when it never asked them."""
    said = [
        line
        for line in c.log("a").splitlines()
        if "asking the peers to hold" in line or "peers released" in line
    ]
    if not said:
        return or_never_held
    return "peers released" in said[-1]


NFT_TABLE = "hapair_test_peer_cut"


@contextlib.contextmanager
def peer_path_cut(c: Cluster) -> Iterator[None]:
    """Every datagram of the pair's peer path dropped (both nodes use its port), etcd
    and the clients untouched; healed on the way out."""
    port = c.peer_port  # type: ignore[attr-defined]
    rules = "\n".join(
        [
            f"table inet {NFT_TABLE} {{",
            "  chain in {",
            "    type filter hook input priority -10; policy accept;",
            f"    udp dport {port} drop",
            "  }",
            "}",
        ]
    )
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, timeout=10)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], check=False, timeout=10)


async def beats_quiet(c: Cluster, for_s: float = 20 * INTERVAL_S, timeout: float = 15.0) -> int:
    """Return the beat key's mod revision once etcd applied no beat for ``for_s`` (20
    intervals): the standby's promises stand in for them."""
    deadline = time.monotonic() + timeout
    kv = await c.store.get(keys.beat("p"))
    assert kv is not None
    last, since = kv.mod_revision, time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        kv = await c.store.get(keys.beat("p"))
        assert kv is not None, "the beat key is gone"
        if kv.mod_revision != last:
            last, since = kv.mod_revision, time.monotonic()
        elif time.monotonic() - since >= for_s:
            return last
    raise AssertionError(f"beats still written to etcd after {timeout}s (last {last})")


async def relayed_quiet_pair(c: Cluster, link: RelayThread, net: int) -> tuple[int, int]:
    """A beating pair whose active reaches etcd through ``link``, once b's promises
    stand in for the beats: the term's epoch, a's service."""
    epoch = await beating_pair(c, net, "--etcd", link.url)
    svc = await service_pid(c, "a")
    await beats_quiet(c)
    return epoch, svc


async def beats_again(c: Cluster) -> None:
    """Return once etcd applied a beat newer than the one it holds now."""
    seen = await c.store.get(keys.beat("p"))
    assert seen is not None
    await until(lambda: newer_beat(c, seen.mod_revision), 5, "the active beating")


async def newer_beat(c: Cluster, than: int) -> bool:
    kv = await c.store.get(keys.beat("p"))
    return kv is not None and kv.mod_revision > than


async def test_a_crashed_active_is_taken_over_by_its_stopped_beats(cluster: Cluster) -> None:
    epoch = await beating_pair(cluster, 241)
    crashed_at = time.monotonic()
    for pid in cluster.crash("a"):
        assert not pid_alive(pid)
    node, new_epoch = await cluster.active("p", not_epoch=epoch, timeout=BEFORE_EXPIRY_S)
    assert node == "b" and new_epoch > epoch
    assert time.monotonic() - crashed_at < BEFORE_EXPIRY_S, "taken over by the lease, not the beat"
    assert "ended a term whose beats stopped" in cluster.log("b")
    endpoint = await until(lambda: cluster.endpoint("p-svc"), 5, "endpoint of b")
    assert endpoint.epoch == new_epoch
    (election,) = [e for e in await cluster.events("election") if e["epoch"] == new_epoch]
    assert "term beats stopped" in election["reason"], election


async def test_a_former_active_takes_over_by_beat_after_a_switchover(cluster: Cluster) -> None:
    """An active does not follow its own beats; once its term is over it follows its
    pair's again, and takes the next active's term over when those beats stop."""
    epoch = await beating_pair(cluster, 245)
    await cluster.store.put(keys.switchover("p"), Switchover(by="test").encode())
    _, b_epoch = await cluster.active("p", not_epoch=epoch, node="b")
    await cluster.standby("a")
    await beats_quiet(cluster)  # b beats on a's promises: a follows b's term
    crashed_at = time.monotonic()
    cluster.crash("b")
    node, new_epoch = await cluster.active("p", not_epoch=b_epoch, timeout=BEFORE_EXPIRY_S)
    assert node == "a" and new_epoch > b_epoch
    assert time.monotonic() - crashed_at < BEFORE_EXPIRY_S, "taken over by the lease, not the beat"
    (election,) = [e for e in await cluster.events("election") if e["epoch"] == new_epoch]
    assert "term beats stopped" in election["reason"], election


async def test_a_frozen_active_agent_is_fenced_by_its_watchdog_and_taken_over(
    cluster: Cluster,
) -> None:
    """The agent frozen at any step (here: between two beats) beats no more: its watchdog
    kills the service half a margin after the beat's fence point, before the standby's
    takeover is due; resumed, the agent finds its term over and starts nothing."""
    epoch = await beating_pair(cluster, 242)
    svc = await service_pid(cluster, "a")
    cluster.signal("a", signal.SIGSTOP)
    try:
        node, new_epoch = await cluster.active("p", not_epoch=epoch, timeout=BEFORE_EXPIRY_S)
        assert node == "b"
        assert not pid_alive(svc), "the frozen active's service outlived its term"
    finally:
        cluster.signal("a", signal.SIGCONT)
    await cluster.standby("a")
    assert "ended a term whose beats stopped" in cluster.log("b")
    leader = await cluster.store.get(keys.leader("p"))
    assert leader is not None and leader.create_revision == new_epoch


async def test_etcd_stalls_move_nothing_while_the_peer_holds(beat_cluster: Cluster) -> None:
    """etcd stopped for longer than the beat's fence point and takeover time (0.4 and
    0.8 s), shorter than the lease's: the standby's promises stand in for the beats, so
    the active keeps its term and services, and the standby, bound by them, never takes
    over by beat."""
    c = beat_cluster
    epoch = await beating_pair(c, 243)
    svc = await service_pid(c, "a")
    etcd = c.etcd.proc.pid  # type: ignore[attr-defined]
    for length in (1.0, 1.2, 0.9, 1.2, 1.0):
        os.kill(etcd, signal.SIGSTOP)
        try:
            await asyncio.sleep(length)
        finally:
            os.kill(etcd, signal.SIGCONT)
        await until(lambda: c.store.get(keys.leader("p")), 5, "etcd back")
        # A keepalive interval between two stalls, so that etcd takes one: a lease
        # etcd lets run out is not what this test is about.
        await asyncio.sleep(LEASE_S / 4)
    leader = await c.store.get(keys.leader("p"))
    assert leader is not None and leader.create_revision == epoch, "the pair moved"
    assert pid_alive(svc) and svc in descendants(c.agents["a"].pid), "the active's service"
    assert "fenced" not in c.log("a")
    assert "ended a term" not in c.log("b")


async def test_a_crash_right_after_an_etcd_stall_is_taken_over_by_beat(
    beat_cluster: Cluster,
) -> None:
    """Through the stall the standby promised not to take over, for a lease TTL from the
    last hold; once the active's beats are acknowledged again it releases that promise,
    so its crash right after is taken over by beat, not when the promise runs out."""
    c = beat_cluster
    epoch = await beating_pair(c, 244)
    etcd = c.etcd.proc.pid  # type: ignore[attr-defined]
    os.kill(etcd, signal.SIGSTOP)
    try:
        await until(lambda: asyncio.sleep(0, "holding the pair" in c.log("a")), 5, "a hold")
        await asyncio.sleep(0.3)  # holds go on for a while: the last one is what binds
    finally:
        os.kill(etcd, signal.SIGCONT)
    await beats_again(c)
    # Released once etcd has been on time for half a lease TTL (2.5 s) on end: under a
    # load that delays a beat now and then, that can take a few such spells.
    await until(lambda: asyncio.sleep(0, released_last(c)), 20, "the peers released")
    crashed_at = time.monotonic()
    c.crash("a")
    node, new_epoch = await c.active("p", not_epoch=epoch, timeout=BEFORE_EXPIRY_S)
    assert node == "b" and new_epoch > epoch
    # Bound by its promise, b could not have taken over before a lease TTL after the
    # last hold, well past this; nor by the lease (BEFORE_EXPIRY_S).
    assert time.monotonic() - crashed_at < BEFORE_EXPIRY_S
    assert "ended a term whose beats stopped" in c.log("b")


async def test_promises_stand_in_for_the_beats_and_a_cut_peer_path_brings_them_back(
    cluster: Cluster,
) -> None:
    """With the peer path up, the active writes no beat to etcd: its standby's promises
    stand in for them. The peer path cut, the beats go to etcd within a few intervals
    and the pair stays put; healed, they stop again."""
    c = cluster
    epoch = await beating_pair(c, 246)
    svc = await service_pid(c, "a")
    quiet = await beats_quiet(c)
    with peer_path_cut(c):
        await until(lambda: newer_beat(c, quiet), 5, "beats in etcd again")
        cut_at = time.monotonic()
        # Beating in etcd, every interval: each beat newer than the last seen.
        for _ in range(5):
            kv = await c.store.get(keys.beat("p"))
            assert kv is not None
            await until(lambda rev=kv.mod_revision: newer_beat(c, rev), 2, "the next beat")
        await asyncio.sleep(max(0.0, cut_at + 40 * INTERVAL_S - time.monotonic()))
    leader = await c.store.get(keys.leader("p"))
    assert leader is not None and leader.create_revision == epoch, "the pair moved"
    assert pid_alive(svc) and svc in descendants(c.agents["a"].pid), "the active's service"
    assert "fenced" not in c.log("a")
    assert "ended a term" not in c.log("b")
    await beats_quiet(c)


async def test_in_the_lab_mode_no_promise_stands_in_for_the_beats(cluster: Cluster) -> None:
    """Without a peer key anyone on the network may answer a hold as the standby: a
    forged promise would keep the beats out of etcd while the real standby, cut off from
    the holds, waits for them. The term beats in etcd every interval."""
    c = cluster
    await beating_pair(c, 233, lab=True)
    assert "peer path in the LAB MODE" in c.log("a")
    for _ in range(30):  # more intervals in a row than the 20 of beats_quiet
        kv = await c.store.get(keys.beat("p"))
        assert kv is not None
        await until(lambda rev=kv.mod_revision: newer_beat(c, rev), 2, "the next beat")


async def test_an_active_cut_from_its_peer_and_etcd_at_once_is_fenced_before_the_takeover(
    link: RelayThread, cluster: Cluster
) -> None:
    """The worst instant for promises that stand in for beats: the active loses its peer
    path and etcd together, so it can neither beat nor learn that its term ended. The
    standby's last promise runs out and it takes the term over on the old beat; the
    active, left with that promise's point, has stopped its service before."""
    c = cluster
    epoch, svc = await relayed_quiet_pair(c, link, 247)
    with peer_path_cut(c):
        await link.cut()
        cut_at = time.monotonic()
        node, new_epoch = await c.active("p", not_epoch=epoch, timeout=BEFORE_EXPIRY_S)
        assert node == "b" and new_epoch > epoch
        assert time.monotonic() - cut_at < BEFORE_EXPIRY_S, "taken over by the lease"
        assert not pid_alive(svc), "the cut-off active's service outlived its term"
        c.assert_no_overlap()  # a's run ended before b's began
    assert "ended a term whose beats stopped" in c.log("b")
    assert "term beat not confirmed before the fence point" in c.log("a")


async def test_a_node_added_to_a_pair_whose_peer_stands_in_for_the_beats_moves_nothing(
    cluster: Cluster,
) -> None:
    """The active writes no beat while b's promises stand in for them. A node added to
    the pair has promised nothing yet: the active beats in etcd again before it counts
    on that node (and before it acknowledges it as a member, from which on it may take
    the term over by beat), not fence because its last beat in etcd is long past; once
    that node promises too, the beats stay out of etcd again."""
    c = cluster
    epoch = await beating_pair(c, 248)
    svc = await service_pid(c, "a")
    await beats_quiet(c)
    spec = c.spec  # type: ignore[attr-defined]
    grown = pair("p", ["a", "b", "c"], 248, 0, c.record)
    await c.apply(c.site([{**spec, "nodes": grown["nodes"]}]))
    await until(lambda: asyncio.sleep(0, "topology changed" in c.log("a")), 10, "a took it in")

    async def c_acknowledged() -> bool:
        kv = await c.store.get(keys.members("p"))
        return kv is not None and "c" in decode(Members, kv.value, kv.key).nodes

    await until(c_acknowledged, 10, "c acknowledged as a member")
    c.start("c")
    await c.standby("c", timeout=20)
    await beats_quiet(c)  # b's and c's promises stand in for the beats
    leader = await c.store.get(keys.leader("p"))
    assert leader is not None and leader.create_revision == epoch, "the pair moved"
    assert "fenced" not in c.log("a")
    assert pid_alive(svc) and svc in descendants(c.agents["a"].pid), "the active's service"


async def test_a_standby_lost_while_etcd_answers_within_two_beats_moves_nothing(
    link: RelayThread, cluster: Cluster
) -> None:
    """etcd answers the active in a little over 120 ms, well within the 300 ms (fence
    point less one interval) that beats sent every interval tolerate. The standby's
    promises stand in for the beats; then the standby's server dies. The active must
    carry on, beating in etcd again: losing a standby never stops the active's
    services."""
    c = cluster
    epoch, svc = await relayed_quiet_pair(c, link, 249)
    link.delay(0.06)  # 120 ms round trips from now on
    await asyncio.sleep(1.0)  # the keepalives and the watches settle on the slow link
    crashed_at = time.time()
    await c.crashed("b")
    await asyncio.sleep(1.0)
    leader = await c.store.get(keys.leader("p"))
    assert leader is not None and leader.create_revision == epoch, "the pair moved"
    # A loaded machine may delay one of a's beats past its fence point whenever: only
    # the standby's loss is under test here.
    assert not logged_since(c.log("a"), "event=fenced", crashed_at, 1.0), c.log("a")
    assert pid_alive(svc) and svc in descendants(c.agents["a"].pid), "the active's service"


def logged_since(log: str, what: str, since: float, within: float) -> list[str]:
    """The lines of ``log`` with ``what`` logged from ``since`` (a wall clock time) on,
    for ``within`` seconds."""
    out = []
    for line in log.splitlines():
        if what in line and line.startswith("ts="):
            stamp = line.split()[0].removeprefix("ts=")
            at = datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp()
            if since <= at < since + within:
                out.append(line)
    return out


async def test_a_hold_is_released_while_etcd_answers_the_active_later_than_two_beats(
    link: RelayThread, cluster: Cluster
) -> None:
    """etcd answers the active in 250 ms: within its 400 ms fence point, but after two
    intervals, so every beat in etcd comes late by the rule that asks the peers to hold
    (a remote workshop, or an etcd slowed by a busy server). An etcd stall has the
    active ask its standby to hold for the lease; the standby's promises on every
    interval keep the term on time whatever etcd's pace, so once etcd confirms the lease
    on time again the active releases the hold, keeps its service, and a crash after it
    is taken over by beat, not a lease TTL after the last hold."""
    c = cluster
    epoch, svc = await relayed_quiet_pair(c, link, 253)
    link.delay(0.125)
    link.slow(2.5)  # the keepalives late: a asks b to hold for the lease
    await until(lambda: asyncio.sleep(0, "asking the peers" in c.log("a")), 10, "a hold")
    link.slow(0)
    await until(lambda: asyncio.sleep(0, released_last(c)), 15, "the peers released")
    leader = await c.store.get(keys.leader("p"))
    assert leader is not None and leader.create_revision == epoch, "the pair moved"
    assert "fenced" not in c.log("a")
    assert pid_alive(svc) and svc in descendants(c.agents["a"].pid), "the active's service"
    crashed_at = time.monotonic()
    c.crash("a")
    node, new_epoch = await c.active("p", not_epoch=epoch, timeout=BEFORE_EXPIRY_S)
    assert node == "b" and new_epoch > epoch
    assert time.monotonic() - crashed_at < BEFORE_EXPIRY_S, "held until the promise ran out"
    assert "ended a term whose beats stopped" in c.log("b")
