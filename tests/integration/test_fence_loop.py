"""A real agent fencing itself in a loop says so, with the setting that fits its distance
to etcd; that setting ends the loop."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from tests.integration.test_etcd_loss import with_peer_path
from tests.integration.test_failover import pair
from tests.support.cluster import Cluster, until
from tests.support.etcd_relay import RelayThread
from tests.support.harness import free_port

pytestmark = pytest.mark.e2e

LOOPING = "fencing itself in a loop"
ADVICE = re.compile(
    r"etcd answered in up to (\d+) ms, of 100 ms \(the fence of 150 ms less an interval\): "
    r"set failover\.term_beat to interval_ms (\d+), fence_ms (\d+), margin_ms (\d+), "
    r"or a longer fence"
)


async def test_an_active_too_far_from_etcd_for_its_beat_is_told_the_beat_that_fits(
    link: RelayThread, cluster: Cluster
) -> None:
    """The default beat (50/150/150) over a 120 ms round trip to etcd: a beat answered
    later than the next beat's send plus the fence less an interval fences the lone
    active, which takes its own key up again, and again. The agent says it is in a loop
    once, names the beat whose fence holds its slowest round trips with room to spare,
    and its status carries it; applied, that beat ends the loop."""
    c = cluster
    # A 5 s lease, as the term beat tests use: a loaded machine stalling the link for a
    # second and a half (the 2 s lease's fence) fenced the new term by its lease in a
    # CI run, which is not what this test is about.
    spec = pair("p", ["a", "b"], 254, free_port(), c.record, term_beat={}, lease_ttl_s=5)
    # Neither the loop nor the new term is a failover: nothing waits for an operator.
    spec["services"][0]["hold_until_ack"] = True
    with_peer_path(spec, 254)
    await c.apply(c.site([spec]))
    link.delay(0.06)
    c.start("a", "--etcd", link.url)  # b stays down: no promise stands in for a beat

    async def said() -> str | None:
        lines = [line for line in c.log("a").splitlines() if LOOPING in line]
        return lines[0] if lines else None

    line = await until(said, 30, "a saying it fences itself in a loop")
    assert sum(LOOPING in line for line in c.log("a").splitlines()) == 1, "said once"
    found = ADVICE.search(line)
    assert found is not None, line
    round_trip, interval, fence, margin = map(int, found.groups())
    assert round_trip >= 120, "the relay's round trip is the least etcd can answer in"
    # Its budget (the fence less an interval, three quarters of it) holds two such answers.
    assert fence * 3 >= 8 * round_trip and fence % 50 == 0 and margin == fence
    assert interval * 4 >= fence and 3 * interval <= fence, "the beat a fence needs"

    async def in_status() -> bool:
        status = await c.status("a")
        return status is not None and any(LOOPING in p for p in status.problems)

    await until(in_status, 10, "the loop among a's problems")

    looping = await c.leader("p")
    assert looping is not None and looping[0] == "a"
    spec["failover"]["term_beat"] = {
        "interval_ms": interval,
        "fence_ms": fence,
        "margin_ms": margin,
    }
    await c.apply(c.site([spec]))
    # A term beats by the timings it began with, for good: a gives its term up to itself
    # at its next fence, and its new term beats by the site's.
    _, epoch = await c.active("p", node="a", not_epoch=looping[1], timeout=20)
    assert "the pair's term beat changed: campaigning for a new term" in c.log("a")
    fences = c.log("a").count("event=fenced")
    calm_from = time.monotonic()
    while time.monotonic() - calm_from < 5.0:  # a fence came every few hundred ms before
        await asyncio.sleep(0.25)
        assert c.log("a").count("event=fenced") == fences, c.log("a")[-3000:]
    assert await c.leader("p") == ("a", epoch), "the new term stands"
