"""A step-down whose etcd transaction times out, though etcd applied it.

The old active has stopped its services and sent the transaction that gives its key
away; etcd applies it, but the answer (and every watch event after it) reaches the
agent only after the call has timed out. The other node takes over at once over its
own link. The old active must not take its services up again on its lagging view:
its term is over whatever etcd answers later.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hapair.shared import keys
from hapair.shared.records import Switchover
from tests.integration.test_etcd_loss import service_pids
from tests.integration.test_failover import pair
from tests.support.cluster import Cluster, holds, until
from tests.support.etcd_relay import EtcdRelay, reading_relay
from tests.support.harness import free_port

pytestmark = pytest.mark.e2e

# Long enough that the old active's lease stays confirmed for seconds after its last
# answered keepalive: a wrong restart is then not hidden by its own fence.
LEASE_TTL_S = 8.0
HOLD_S = 2.5  # etcd's answers held this long: far past the agent's 0.5 s call timeout


@pytest.fixture
async def relay(cluster: Cluster) -> AsyncIterator[tuple[EtcdRelay, int]]:
    """a reaches etcd through the relay, b directly; a active (at the epoch given with
    the relay), b a healthy standby. The relay finds the leader and handover keys in the
    gRPC frames a sends: over TLS it ends a's TLS and opens its own to etcd."""
    r = reading_relay(cluster.etcd)
    await r.heal()
    spec = pair("p", ["a", "b"], 60, free_port(), cluster.record, lease_ttl_s=LEASE_TTL_S)
    await cluster.apply(cluster.site([spec]))
    cluster.start("a", "--etcd", r.url)
    _, epoch = await cluster.active("p", node="a", timeout=20)
    cluster.start("b")
    await cluster.standby("b", timeout=20)
    assert service_pids(cluster, "a")
    try:
        yield r, epoch
    finally:
        await r.cut()


async def b_took_over_and_a_stays_down(cluster: Cluster, relay: EtcdRelay, epoch: int) -> None:
    await until(lambda: _set(relay), 10, "a sent its step-down")
    node, new_epoch = await cluster.active("p", not_epoch=epoch, timeout=10)
    assert node == "b"

    async def a_stays_down() -> bool:
        return not service_pids(cluster, "a")

    # Through the held answers, the agent's timeout and well after the answers arrive.
    await holds(a_stays_down, HOLD_S + 2.0, "a restarted its services while b ran")
    assert "etcd did not answer the step-down" in cluster.log("a")
    assert await cluster.leader("p") == ("b", new_epoch)


async def test_resignation_whose_answer_times_out_never_restarts_the_old_active(
    cluster: Cluster, relay: tuple[EtcdRelay, int]
) -> None:
    # Once a is active and its endpoint published, only its resignation names the
    # leader key (a guarded delete of it).
    relay[0].hold_after(keys.b(keys.leader("p")), HOLD_S)
    (pid,) = service_pids(cluster, "a")
    cluster.kill_service(pid)  # a critical service: a resigns
    await b_took_over_and_a_stays_down(cluster, *relay)


async def test_switchover_whose_answer_times_out_never_restarts_the_old_active(
    cluster: Cluster, relay: tuple[EtcdRelay, int]
) -> None:
    # Once a is active, only its handover transaction names the handover key.
    relay[0].hold_after(keys.b(keys.handover("p")), HOLD_S)
    await cluster.store.put(keys.switchover("p"), Switchover(to="b").encode())
    await b_took_over_and_a_stays_down(cluster, *relay)
    events = await until(lambda: cluster.events("switchover"), 5, "switchover event")
    assert events[0]["node"] == "a"
    assert not await cluster.events("switchover_rejected")


async def _set(relay: EtcdRelay) -> bool:
    return relay.triggered.is_set()
