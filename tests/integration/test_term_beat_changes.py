"""The term beat across a change of the pair's settings while a term runs: a term that
beats keeps beating until it ends, whatever the site file says meanwhile (its standbys
measure it by the timings its beats carry), and a standby follows the beats of a term
begun after they were turned on.

The pairs here run on a 5 s lease: with
keepalives every 1.25 s it cannot run out before 3.75 s after the active's last one, so a
takeover sooner than that is the beat's. The rules: ``workshop_agent/term_beat.py``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from hapair.shared import keys
from hapair.shared.records import Switchover
from tests.integration.test_etcd_loss import with_peer_path
from tests.integration.test_failover import pair, service_pid
from tests.support.cluster import Cluster, holds, pid_alive, until
from tests.support.harness import free_port

pytestmark = pytest.mark.e2e

LEASE_S = 5.0
BEFORE_EXPIRY_S = 3.75  # the lease cannot run out sooner after the active's last keepalive
# Slow enough that a freeze of the agent can pass its beat's fence point (0.6 s after the
# send of its last acknowledged beat) well before its watchdog's deadline (1.1 s) and the
# standby's takeover (1.6 s after the delivery of the last beat).
SLOW_BEAT = {"interval_ms": 100, "fence_ms": 600, "margin_ms": 1000}
FREEZE_S = 0.8
TAKEOVER_S = 1.6
BEAT = {"interval_ms": 50, "fence_ms": 150, "margin_ms": 150}


def spec(c: Cluster, net: int, beat: dict[str, int] | None) -> dict[str, Any]:
    extra: dict[str, Any] = {} if beat is None else {"term_beat": beat}
    spec = pair("p", ["a", "b"], net, free_port(), c.record, lease_ttl_s=LEASE_S, **extra)
    return with_peer_path(spec, net)


async def started_pair(c: Cluster, spec: dict[str, Any]) -> int:
    """a active, b standby: the term's epoch."""
    await c.apply(c.site([spec]))
    # Started together: a run on a pair with a peer path waits a lease TTL after its
    # start (for promises an earlier run may have given, hold.py), and the main server
    # wins.
    c.start("a")
    c.start("b")
    _, epoch = await c.active("p", node="a", timeout=LEASE_S + 10)
    await c.standby("b", timeout=30)
    return epoch


async def changed(c: Cluster, spec: dict[str, Any], beat: dict[str, int] | None) -> None:
    """Apply the pair with ``beat``, and wait until both agents run with it."""
    before = {n: c.log(n).count("topology changed") for n in ("a", "b")}
    if beat is None:
        spec["failover"].pop("term_beat")
    else:
        spec["failover"]["term_beat"] = beat
    await c.apply(c.site([spec]))
    for n in ("a", "b"):
        await until(
            lambda n=n: asyncio.sleep(0, c.log(n).count("topology changed") > before[n]),
            10,
            f"{n} running with the changed pair",
        )


async def beat_applied_after(c: Cluster, revision: int) -> int:
    async def newer() -> int | None:
        kv = await c.store.get(keys.beat("p"))
        return kv.mod_revision if kv is not None and kv.mod_revision > revision else None

    return await until(newer, 5, "a beat applied")


async def test_a_term_whose_beats_were_turned_off_is_renewed_without_them_or_beats_still(
    cluster: Cluster,
) -> None:
    """Beats are turned off while a's term beats; then a's agent freezes past its beat's
    fence point (short of its watchdog's deadline): resumed, it fences. Its key is still
    its own on its live lease: it gives that term up to itself and begins one without
    beats, or, when it could not win a new term at once, takes the old one up and
    beats it still. b saw that term's beats and measures it by them: it must never end
    a healthy term by them, and a keeps the pair either way."""
    c = cluster
    pair_spec = spec(c, 246, SLOW_BEAT)
    epoch = await started_pair(c, pair_spec)
    await beat_applied_after(c, epoch)
    await changed(c, pair_spec, None)
    fenced = await service_pid(c, "a")
    c.signal("a", signal.SIGSTOP)
    try:
        await asyncio.sleep(FREEZE_S)
    finally:
        c.signal("a", signal.SIGCONT)
    await until(lambda: asyncio.sleep(0, "fenced" in c.log("a")), 10, "a fenced by its beat")

    async def restarted() -> int | None:
        pid = await service_pid(c, "a")
        return pid if pid != fenced else None

    svc = await until(restarted, 10, "a's service started again")
    leader = await c.leader("p")
    assert leader is not None and leader[0] == "a" and leader[1] >= epoch, leader
    if leader[1] > epoch:
        assert "the pair's term beat changed: campaigning for a new term" in c.log("a")
        assert "took up its own leader key" not in c.log("a")
    else:
        assert "took up its own leader key" in c.log("a")

    async def a_holds_the_term() -> bool:
        return await c.leader("p") == leader and pid_alive(svc)

    # Long enough for a promise b gave a when its beat was late to run out, and b's
    # takeover to be due after that.
    await holds(a_holds_the_term, LEASE_S + TAKEOVER_S + 1, "b took over a healthy active")
    assert "ended a term whose beats stopped" not in c.log("b")
    c.assert_no_overlap()


async def test_a_standby_follows_the_beats_of_a_term_begun_after_they_were_turned_on(
    cluster: Cluster,
) -> None:
    """The pair runs without beats; they are turned on, and a switchover begins a term
    that beats. b did not restart: once that term's active crashes, a standby following
    its beats takes over long before the lease could run out."""
    c = cluster
    pair_spec = spec(c, 247, None)
    epoch = await started_pair(c, pair_spec)
    await changed(c, pair_spec, BEAT)
    await c.store.put(keys.switchover("p"), Switchover(by="test").encode())
    node, beating = await c.active("p", not_epoch=epoch, timeout=30)
    assert node == "b"
    await c.standby("a", timeout=30)
    await beat_applied_after(c, beating)
    crashed_at = time.monotonic()
    for pid in c.crash("b"):
        assert not pid_alive(pid)
    node, _ = await c.active("p", not_epoch=beating, timeout=2 * LEASE_S)
    assert node == "a"
    assert time.monotonic() - crashed_at < BEFORE_EXPIRY_S, "taken over by the lease, not the beat"
    assert "ended a term whose beats stopped" in c.log("a")
