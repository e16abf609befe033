"""Two comm servers of one pair against a real etcd: the role follows the pair's leader
key (written here as an agent writes it, bound to a lease), ServiceLevel falls on the
old node before it rises on the new one, only the serving node writes, and each node
reports which PLCs it reaches."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from asyncua import ua

from hapair.comm_server.role import CommReport, PairRole
from hapair.shared import keys
from hapair.shared.clock import boottime
from hapair.shared.log import EventLog
from hapair.shared.records import Leader, ResourceReport, TopologyDoc, decode
from hapair.shared.store import Change, Kv, Store
from hapair.shared.topology import parse_site
from hapair.shared.txn import Compare, Op
from tests.support.cluster import until
from tests.support.harness import Etcd, etcd_client, free_port
from tests.support.plc_sim import CommUnderTest, ModbusPlc, running_comm
from tests.support.tls_etcd import ADMIN, TestPki, TlsEtcd

S = ua.StatusCodes
HOSTS = {"a": ["127.0.33.1", "127.0.33.2"], "b": ["127.0.33.3", "127.0.33.4"]}


def config(node: str, port: int, **opts: Any) -> str:
    return json.dumps(
        {
            "plcs": [
                {
                    "name": "press-1",
                    "paths": [{"host": h, "port": port} for h in HOSTS[node]],
                    "poll_interval_s": 0.2,
                    "timeout_s": 0.1,
                    "probe_interval_s": 0.2,
                    "critical": True,
                    "switch_after_s": 2.5,
                    **opts,
                    "tags": [
                        {"name": "speed", "address": "HR0", "type": "int16", "writable": True}
                    ],
                }
            ]
        }
    )


@contextlib.asynccontextmanager
async def comm_node(
    etcd: Etcd | str,
    node: str,
    port: int,
    store: Store | None = None,
    clock: Callable[[], float] = boottime,
    roles: list[PairRole] | None = None,
    **opts: Any,
) -> AsyncIterator[CommUnderTest]:
    """``store``: the role's connection to etcd (a fresh one by default); ``roles``
    receives the role made."""
    url, tls = etcd_client(etcd)
    store = store or Store(url, timeout=2.0, tls=tls)

    def role(parts: Any, on_change: Any) -> PairRole:
        log = EventLog("hapair.comm", node=node, pair="p")
        made = PairRole(store, "p", node, "comm", parts, on_change, log, refresh_s=0.5, clock=clock)
        if roles is not None:
            roles.append(made)
        return made

    try:
        async with running_comm(config(node, port, **opts), role, host=HOSTS[node][0]) as comm:
            yield comm
    finally:
        await store.close()


async def elect(store: Store, node: str) -> tuple[int, int]:
    """Take the pair's leader key for ``node`` as an agent does; (lease, epoch)."""
    lease = await store.grant(30)
    key = keys.leader("p")
    result = await store.txn(
        [Compare.absent(key)], [Op.put(key, Leader(node=node).encode(), lease=lease)]
    )
    assert result.succeeded, "the leader key was taken"
    return lease, result.revision


async def level(comm: CommUnderTest, low: int, high: int) -> bool:
    return low <= await comm.service_level() <= high


async def report(store: Store, node: str) -> CommReport | None:
    kv = await store.get(keys.report(node, "comm"))
    if kv is None:
        return None
    decode(ResourceReport, kv.value, kv.key)  # what the agent reads
    return decode(CommReport, kv.value, kv.key)


class Levels:
    """ServiceLevel as a subscriber sees it: (server timestamp, value) per change."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, int]] = []

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.seen.append((data.monitored_item.Value.SourceTimestamp.timestamp(), val))

    def first(self, test: Any) -> float | None:
        return next((t for t, v in self.seen if test(v)), None)


def site(nodes: list[str]) -> dict[str, Any]:
    """A site with pair p of ``nodes``, and another pair q whose nodes serve their own
    comm server (a report of its own, under the same service name)."""
    return {
        "site": "plant",
        "workshops": [
            {
                "name": "w",
                "pairs": [
                    {
                        "name": "p",
                        "nodes": [
                            {"name": n, "address": f"127.0.33.{20 + i}"}
                            for i, n in enumerate(nodes)
                        ],
                    },
                    {
                        "name": "q",
                        "nodes": [
                            {"name": "q1", "address": "127.0.33.30"},
                            {"name": "q2", "address": "127.0.33.31"},
                        ],
                    },
                ],
            }
        ],
    }


async def apply_site(store: Store, nodes: list[str]) -> None:
    parsed = parse_site(site(nodes), "site")
    await store.put(keys.TOPOLOGY, TopologyDoc(site=parsed.model_dump(mode="json")).encode())


@pytest.fixture(autouse=True)
async def topology(store: Store) -> None:
    """The comm servers learn the pair's nodes from the topology, as in a real pair."""
    await apply_site(store, ["a", "b"])


@pytest.fixture
async def plc() -> AsyncIterator[ModbusPlc]:
    sim = await ModbusPlc(HOSTS["a"] + HOSTS["b"], free_port(HOSTS["a"][0])).start()
    try:
        yield sim
    finally:
        await sim.stop()


async def test_role_moves_with_the_leader_key_and_old_drops_before_new_rises(
    etcd: Any, store: Store, plc: ModbusPlc
) -> None:
    async with (
        comm_node(etcd, "a", plc.port) as a,
        comm_node(etcd, "b", plc.port) as b,
    ):
        # nobody is active: both read the PLC, both standby
        await until(lambda: level(a, 50, 50), 5, "a at standby level with data")
        await until(lambda: level(b, 50, 50), 5, "b at standby level with data")
        assert (await a.write("press-1.speed", 1, ua.VariantType.Int16)).value == S.BadInvalidState
        lease_a, epoch_a = await elect(store, "a")
        await until(lambda: level(a, 255, 255), 3, "a serving")
        assert (await a.read("_comm.role")).Value.Value == "active"
        assert (await a.read("_comm.epoch")).Value.Value == str(epoch_a)
        assert await b.service_level() == 50
        # writes: the active sends once; the standby refuses clearly and sends nothing
        assert (await a.write("press-1.speed", 11, ua.VariantType.Int16)).is_good()
        refused = await b.write("press-1.speed", 12, ua.VariantType.Int16)
        assert refused.value == S.BadInvalidState
        assert [(w.address, w.values) for w in plc.writes] == [(0, [11])]
        rep = await report(store, "a")
        assert rep is not None and rep.serving and rep.epoch == epoch_a and rep.role == "active"
        assert rep.resources["plc:press-1"].ok and rep.resources["plc:press-1"].critical
        assert rep.resources["plc:press-1"].grace_s == 2.5
        assert rep.plcs["press-1"].state == "ok" and rep.plcs["press-1"].critical
        # failover: a's term ends (its lease goes, as when its agent dies), b's begins
        levels_a, levels_b = Levels(), Levels()
        for comm, seen in ((a, levels_a), (b, levels_b)):
            sub = await comm.client.create_subscription(10, seen)
            await sub.subscribe_data_change(comm.client.get_node("ns=0;i=2267"))
        await until(lambda: _seen(levels_a, levels_b), 2, "the first notifications")
        await store.revoke(lease_a)
        _, epoch_b = await elect(store, "b")
        assert epoch_b > epoch_a
        await until(lambda: level(b, 255, 255), 3, "b serving")
        await until(lambda: level(a, 50, 50), 3, "a back to standby")

        async def both_seen() -> tuple[float, float] | None:
            dropped = levels_a.first(lambda v: v < 200)
            rose = levels_b.first(lambda v: v >= 200)
            return None if dropped is None or rose is None else (dropped, rose)

        dropped, rose = await until(both_seen, 2, "both changes notified")
        assert dropped < rose, f"a dropped at {dropped}, b rose at {rose}"
        # an independent client reads the same tag from the new active, and writes there
        await until(lambda: _reads(b, 11), 2, "b reads what a wrote")
        assert (await b.write("press-1.speed", 13, ua.VariantType.Int16)).is_good()
        assert (await a.write("press-1.speed", 14, ua.VariantType.Int16)).value == S.BadInvalidState
        assert [w.values for w in plc.writes] == [[11], [13]]
        rep_a = await report(store, "a")
        assert rep_a is not None and not rep_a.serving and rep_a.role == "standby"


async def _reads(comm: CommUnderTest, value: int) -> bool:
    dv = await comm.read("press-1.speed")
    return bool(dv.StatusCode.is_good() and dv.Value.Value == value)


async def _seen(*levels: Levels) -> bool:
    return all(x.seen for x in levels)


async def test_a_new_active_rises_only_once_the_old_one_stopped_serving(
    etcd: Any, store: Store, plc: ModbusPlc
) -> None:
    """A comm server on node a still claims to serve (its node lost the key, it has
    not seen it yet): b, the new leader, waits for it."""
    old = await store.grant(30)
    claim = CommReport(service="comm", node="a", role="active", serving=True, epoch=1)
    await store.put(keys.report("a", "comm"), claim.encode(), lease=old)
    async with comm_node(etcd, "b", plc.port) as b:
        await until(lambda: level(b, 50, 50), 5, "b at standby level with data")
        await elect(store, "b")
        await until(lambda: _role(b, "waiting"), 3, "b waiting for a")
        assert await b.service_level() == 50
        assert (await b.write("press-1.speed", 1, ua.VariantType.Int16)).value == S.BadInvalidState
        released = claim.model_copy(update={"serving": False, "role": "standby", "epoch": None})
        await store.put(keys.report("a", "comm"), released.encode(), lease=old)
        await until(lambda: level(b, 255, 255), 3, "b serving once a released")


async def _role(comm: CommUnderTest, state: str) -> bool:
    return bool((await comm.read("_comm.role")).Value.Value == state)


async def test_reports_say_which_node_reaches_a_critical_plc(
    etcd: Any, store: Store, plc: ModbusPlc
) -> None:
    async with (
        comm_node(etcd, "a", plc.port) as a,
        comm_node(etcd, "b", plc.port),
    ):
        await elect(store, "a")
        await until(lambda: level(a, 255, 255), 5, "a serving")

        async def reach(node: str, ok: bool) -> bool:
            rep = await report(store, node)
            return rep is not None and rep.resources["plc:press-1"].ok is ok

        await until(lambda: reach("b", True), 3, "b reaches press-1")
        # every path from a to the PLC cut: a says so, b still reaches it
        await plc.stop_path(0)
        await plc.stop_path(1)
        await until(lambda: reach("a", False), 3, "a reports press-1 lost")
        assert await reach("b", True)
        rep = await report(store, "a")
        assert rep is not None and rep.plcs["press-1"].state == "down"
        assert [p.up for p in rep.plcs["press-1"].paths] == [False, False]
        assert await a.service_level() == 0  # active, but no data at all
        # and b's paths too: nobody reaches it
        await plc.stop_path(2)
        await plc.stop_path(3)
        await until(lambda: reach("b", False), 3, "b reports press-1 lost")


async def test_without_etcd_it_serves_data_as_a_standby_and_refuses_writes(
    plc: ModbusPlc,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with comm_node(dead, "a", plc.port) as a:
        await until(lambda: level(a, 50, 50), 5, "a at standby level with data")
        assert (await a.read("_comm.role")).Value.Value == "unknown"
        assert (await a.write("press-1.speed", 1, ua.VariantType.Int16)).value == S.BadInvalidState
        assert plc.writes == []


async def test_an_active_cut_off_from_etcd_stops_serving_before_its_lease_can_lapse(
    plc: ModbusPlc, test_pki: TestPki
) -> None:
    """etcd hangs (SIGSTOP): the comm server cannot know whether its node is still the
    active, so it stops serving ttl - margin (1.5 s) after its last acknowledged
    keepalive, before etcd could let another node's comm server rise."""
    private = TlsEtcd(test_pki.dir, ADMIN).start()  # an etcd of its own, to be stopped
    store = Store(private.url, timeout=2.0, tls=private.tls)
    try:
        await apply_site(store, ["a", "b"])
        async with comm_node(private, "a", plc.port) as a:
            await elect(store, "a")
            await until(lambda: level(a, 255, 255), 5, "a serving")
            assert private.proc is not None
            os.kill(private.proc.pid, signal.SIGSTOP)
            frozen = time.monotonic()
            try:
                await until(lambda: level(a, 10, 199), 3, "a no longer serving")
                assert time.monotonic() - frozen <= 1.5 + 0.3
                refused = await a.write("press-1.speed", 1, ua.VariantType.Int16)
                assert refused.value == S.BadInvalidState
                await asyncio.sleep(1.0)
            finally:
                os.kill(private.proc.pid, signal.SIGCONT)
            await until(lambda: level(a, 255, 255), 8, "a serving again once etcd is back")
            assert plc.writes == []
    finally:
        await store.close()
        private.cleanup()


async def test_a_suspend_past_the_fence_point_ends_the_role_at_once(
    etcd: Any, store: Store, plc: ModbusPlc
) -> None:
    """The role's fence counts a suspend: here its clock jumps 10 s in one step, as
    CLOCK_BOOTTIME does across a suspend while the event loop's own clock does not."""
    jump = [0.0]
    roles: list[PairRole] = []
    async with comm_node(etcd, "a", plc.port, clock=lambda: boottime() + jump[0], roles=roles) as a:
        await elect(store, "a")
        await until(lambda: level(a, 255, 255), 3, "a serving")
        [role] = roles
        assert role.serving
        jump[0] = 10.0
        # Nothing awaited in between: no keepalive can have been acknowledged since.
        assert not role.serving, "a write would still leave after the suspend"


@pytest.mark.long
async def test_a_write_queued_behind_a_poll_is_not_sent_once_the_role_is_lost(
    etcd: Any, store: Store, plc: ModbusPlc
) -> None:
    """The PLC holds its answer to a poll read; a client's write, accepted while the
    node serves, waits for the connection behind that read; the node's term ends
    meanwhile. When the read is answered, the write must not go out, and the client
    must not be told Good."""
    one_path = {"paths": [{"host": HOSTS["a"][0], "port": plc.port}]}
    # The read is held until the test lets it go: its timeout only has to outlast the
    # steps below, generously.
    slow = {"poll_interval_s": 4.0, "timeout_s": 4.0, **one_path}
    async with comm_node(etcd, "a", plc.port, **slow) as a:
        lease, _ = await elect(store, "a")
        await until(lambda: level(a, 255, 255), 8, "a serving")
        plc.hold_reads = asyncio.Event()
        plc.reads_held.clear()
        try:
            await asyncio.wait_for(plc.reads_held.wait(), 10)  # a poll read in flight
            connection = a.server.pollers[0].driver.clients[0].ctx  # type: ignore[attr-defined]
            writing = asyncio.create_task(a.write("press-1.speed", 5, ua.VariantType.Int16))

            async def queued() -> bool:  # pymodbus: one request at a time per connection
                return bool(connection._lock.locked() and connection._lock._waiters)

            await until(queued, 2, "the write waiting behind the poll read")
            await store.revoke(lease)  # the term ends (the agent lost the leader key)

            async def lost() -> bool:
                return not a.server.serving

            await until(lost, 2, "a no longer serving")
            assert not writing.done()
        finally:
            plc.hold_reads.set()
            plc.hold_reads = None
        answer = await asyncio.wait_for(writing, 5)
        assert not answer.is_good(), "the client was told Good"
        assert answer.value == S.BadInvalidState
        assert plc.writes == [], "the write reached the PLC after the role was lost"
        # the connection the write was stopped on polls on
        polled = plc.requests[0]

        async def polls_on() -> bool:
            return plc.requests[0] >= polled + 1 and a.server.pollers[0].reachable is True

        await until(polls_on, 15, "the next poll over the same connection")
        assert a.server.pollers[0].driver.clients[0].connected  # type: ignore[attr-defined]


class HeldReports(Store):
    """The role's etcd connection, with the nodes' reports held back as a slow etcd
    member or a lagging watch would: their first read waits for ``load``, and their
    watched changes for ``watch``. Every other key flows as usual."""

    def __init__(self, etcd: Etcd) -> None:
        super().__init__(etcd.url, timeout=2.0, tls=etcd.tls)
        self.load, self.loaded, self.watch = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def get_prefix(self, prefix: str) -> tuple[list[Kv], int]:
        if prefix != keys.NODES_PREFIX:
            return await super().get_prefix(prefix)
        await self.load.wait()
        got = await super().get_prefix(prefix)
        self.loaded.set()
        return got

    async def watch_prefix(
        self, prefix: str, start_revision: int, opened: Callable[[], None] | None = None
    ) -> AsyncIterator[Change]:
        async for change in super().watch_prefix(prefix, start_revision, opened):
            if prefix == keys.NODES_PREFIX:
                await self.watch.wait()
            yield change


async def _reason(role: PairRole, why: str) -> bool:
    return role.reason == why


async def serving_claim(store: Store, node: str) -> int:
    """What a comm server of ``node`` that still serves has in etcd; its lease."""
    lease = await store.grant(30)
    claim = CommReport(service="comm", node=node, role="active", serving=True, epoch=1)
    await store.put(keys.report(node, "comm"), claim.encode(), lease=lease)
    return lease


async def test_the_new_active_reads_every_report_before_it_claims(
    etcd: Any, store: Store, plc: ModbusPlc
) -> None:
    """a's comm server still serves; b becomes the leader while its read of the nodes'
    reports is held back: b must not claim on the leader key alone."""
    await serving_claim(store, "a")
    held = HeldReports(etcd)
    held.watch.set()
    async with comm_node(etcd, "b", plc.port, store=held) as b:
        await elect(store, "b")
        role = b.server.role
        assert isinstance(role, PairRole)

        async def decided() -> bool:
            return role.state == "active" or "reports" in role.reason

        await until(decided, 5, "b either serving or waiting for the reports")
        assert not b.server.serving, "b claimed without reading a's report"
        held.load.set()
        await until(lambda: _reason(role, "a still serving"), 3, "b waiting for a")
        assert not b.server.serving


async def test_the_claim_is_refused_while_a_report_it_has_not_seen_exists(
    etcd: Any, store: Store, plc: ModbusPlc
) -> None:
    """b has read the reports (a had none), then a's comm server reports serving
    while b's watch lags: b's claim must still be refused, for the report b believes
    absent is there. A serving report of the same service in another pair never
    holds b up."""
    await serving_claim(store, "q1")
    held = HeldReports(etcd)
    held.load.set()
    async with comm_node(etcd, "b", plc.port, store=held) as b:
        await asyncio.wait_for(held.loaded.wait(), 5)
        lease_a = await serving_claim(store, "a")  # b does not see it: its watch is held
        await elect(store, "b")
        role = b.server.role
        assert isinstance(role, PairRole)

        async def decided() -> bool:
            return role.state == "active" or role.reason == "claim refused by etcd"

        await until(decided, 5, "b either serving or refused")
        assert not b.server.serving, "b claimed while a's report said serving"
        held.watch.set()
        await until(lambda: _reason(role, "a still serving"), 3, "b waiting for a")
        assert not b.server.serving
        await store.revoke(lease_a)  # a's comm server gone: b rises, q1 is no peer of b
        await until(lambda: level(b, 255, 255), 5, "b serving once a's report is gone")
