"""An active frozen at the very start of a term that beats: its watchdog must already
hold the beat's deadline, not the one it had as a standby (the lease's, seconds later).

The active's beats after its campaign's are held back by a test hook (every beat lost on
its way), and it stops itself (another hook) right after it let its service's program
run: nothing but its watchdog can stop that program, and the standby takes the term over
once its beats stopped, long before the lease could run out. The rules:
``workshop_agent/term_beat.py``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from hapair.shared import keys
from tests.integration.test_etcd_loss import with_peer_path
from tests.integration.test_failover import pair
from tests.integration.test_fence_services import forked_pids, runs_program, stopped
from tests.support.cluster import SVC, Cluster, until
from tests.support.harness import free_port

pytestmark = pytest.mark.e2e

LEASE_S = 5.0
BEFORE_EXPIRY_S = 3.75  # the lease cannot run out sooner after the active's last keepalive
# The active fences 1 s after the send of its campaign (its only beat), its watchdog half
# a margin later (1.5 s); the standby takes over 2 s after that beat's delivery. Asking
# the peer to hold comes 0.6 s after the campaign: the service has started well before.
BEAT = {"interval_ms": 300, "fence_ms": 1000, "margin_ms": 1000}


async def test_an_active_frozen_before_its_first_beat_is_stopped_by_its_watchdog(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    c = cluster
    spec = pair("p", ["a", "b"], 248, free_port(), c.record, lease_ttl_s=LEASE_S, term_beat=BEAT)
    await c.apply(c.site([with_peer_path(spec, 248)]))
    gate = tmp_path / "no-beats"
    gate.touch()
    monkeypatch.setenv("HAPAIR_TEST_BEAT_GATE", str(gate))
    monkeypatch.setenv("HAPAIR_TEST_STOP_AFTER_START", "p-svc")
    a = c.start("a")
    monkeypatch.delenv("HAPAIR_TEST_BEAT_GATE")
    monkeypatch.delenv("HAPAIR_TEST_STOP_AFTER_START")
    c.start("b")  # together: the main server wins (a run with a peer path waits a TTL)
    try:
        await until(lambda: asyncio.sleep(0, stopped(a.pid)), LEASE_S + 20, "a stopped")
        frozen_at = time.monotonic()
        leader = await c.store.get(keys.leader("p"))
        assert leader is not None
        epoch = leader.create_revision
        [forked] = forked_pids(c, "a", "p-svc")
        await until(
            lambda: asyncio.sleep(0, any(r["node"] == "a" for r in c.intervals())),
            5,
            "a's service program running (its own record)",
        )
        node, _ = await c.active("p", not_epoch=epoch, timeout=2 * LEASE_S)
        assert node == "b"
        assert time.monotonic() - frozen_at < BEFORE_EXPIRY_S, "taken over by the lease"
        assert "ended a term whose beats stopped" in c.log("b")
        assert not runs_program(forked, SVC), "the frozen active's service outlived its term"
    finally:
        c.signal("a", signal.SIGCONT)
    c.assert_no_overlap()
