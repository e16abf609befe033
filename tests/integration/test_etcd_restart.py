"""etcd restarted under a running pair: the active keeps its pair, over TLS as in the lab mode.

etcd keeps its leases across a restart (their TTLs start again once it leads), so an
active that reaches etcd again before its lease runs out keeps the pair under the same
epoch; meanwhile it holds on its standby's promise (the pair has a peer path), so its
services never stop. A loaded etcd that has just restarted answers late; the agents here
reach etcd through a relay that delivers etcd's bytes late from the restart on. A TLS
handshake needs two of etcd's flights where the lab mode needs one: gRPC once gave up
every connection attempt after 100-250 ms, so over TLS the agents never reached etcd
again and the active lost its lease.

The test runs its own etcd: the session's must not be restarted under other tests.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from hapair.shared import keys
from tests.integration.test_etcd_loss import service_pids, with_peer_path
from tests.integration.test_failover import pair
from tests.support.cluster import Cluster, holds, until
from tests.support.etcd_relay import EtcdRelay
from tests.support.harness import Etcd, free_port
from tests.support.tls_etcd import ADMIN, TestPki, TlsEtcd

pytestmark = pytest.mark.e2e

NET = 57
SLOW_S = 0.15  # etcd's bytes this late: a TLS handshake takes ~0.3 s, a plain one ~0.15 s
BACK_WITHIN_S = 20.0  # generous: the agents reach etcd within a second of its restart
# Longer than etcd gives a lease it restored (its TTL plus an election timeout, 3 s):
# a lease the active failed to renew in time would be gone by then.
KEPT_S = 5.0
STAMP = re.compile(r"^ts=(\S+) .*(?:event|msg)=\"etcd reachable again\"", re.MULTILINE)


@pytest.fixture(params=["tls", "lab"])
def etcd(request: pytest.FixtureRequest, test_pki: TestPki) -> Iterator[Etcd]:
    """An etcd of this test's own, which the ``store`` and ``cluster`` fixtures then use:
    over TLS with client certificates, or in the lab mode."""
    server = TlsEtcd(test_pki.dir, ADMIN) if request.param == "tls" else Etcd()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def reached_again(log: str, after: int) -> float | None:
    """When (wall clock) the agent's lease was first confirmed in ``log[after:]`` after
    failing, None before."""
    found = STAMP.search(log, after)
    return None if found is None else datetime.fromisoformat(found.group(1)).timestamp()


async def test_etcd_restarted_the_active_keeps_its_pair(etcd: Etcd, cluster: Cluster) -> None:
    c = cluster
    relay = EtcdRelay(etcd.url)
    await relay.heal()
    spec = with_peer_path(pair("p", ["a", "b"], NET, free_port(), c.record), NET)
    await c.apply(c.site([spec]))
    c.start("a", "--etcd", relay.url)
    _, epoch = await c.active("p", node="a", timeout=20)
    c.start("b", "--etcd", relay.url)
    await c.standby("b", timeout=20)
    pids = service_pids(c, "a")
    before = await c.store.get(keys.leader("p"))
    assert before is not None and pids
    logged = {n: len(c.log(n)) for n in ("a", "b")}

    etcd.stop()  # SIGTERM: etcd writes its state and exits
    relay.slow(SLOW_S)
    started = time.monotonic()
    etcd.start(wait=False)  # the same data directory and port
    await asyncio.to_thread(etcd.wait_ready)  # etcd's own restart, told apart
    ready, ready_wall = time.monotonic(), time.time()

    async def a_reached_etcd() -> float | None:
        return reached_again(c.log("a"), logged["a"])

    reached = await until(a_reached_etcd, BACK_WITHIN_S, "a's lease confirmed after the restart")
    print(
        f"etcd ready {ready - started:.2f} s after its start; "
        f"a's lease confirmed {reached - ready_wall:.2f} s after that"
    )

    assert await c.leader("p") == ("a", epoch)  # (read again once the test's own store can)

    async def pair_kept() -> bool:
        now = await c.store.get(keys.leader("p"))
        return (
            now is not None
            and (now.create_revision, now.lease) == (before.create_revision, before.lease)
            and service_pids(c, "a") == pids
            and not service_pids(c, "b")
        )

    await holds(pair_kept, KEPT_S, "the pair moved, or a's lease or services were lost")
    since = c.log("a")[logged["a"] :]
    assert "event=fenced " not in since and 'event="lease lost"' not in since
    await c.standby("b", timeout=BACK_WITHIN_S)
