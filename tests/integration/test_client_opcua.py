"""The OPC UA adapter follows an endpoint record that moves between two real asyncua
servers (real etcd, a real registry): subscriptions go on from the new server, reads
and writes go there, a write is never sent twice, and errors say what is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Server, ua

from hapair.shared import keys, records, topology
from hapair.shared.client import (
    Backoff,
    ClientSecurity,
    DataChange,
    DeadlineExceeded,
    OpcUaAdapter,
    OutcomeUnknown,
    Resolver,
    tag,
)
from hapair.shared.client.opcua import NodeNotFound
from hapair.shared.store import Store
from tests.integration.test_comm_security import PASSWORDS, as_alice, make_site
from tests.support.client_lab import registry_in_process, until
from tests.support.harness import Etcd, free_port
from tests.support.plc_sim import CommUnderTest, ModbusPlc, running_comm
from tests.support.site_records import SITE_YAML, FakeAgent

FAST_BACKOFF = Backoff(initial_s=0.02, max_s=0.2)
HOSTS = {"asm-a": "127.0.0.11", "asm-b": "127.0.0.12"}
SPEED = tag("press-1.speed")
LIVENESS_S = 10.0  # a deadline that only a hung test reaches, not a figure


@dataclass
class Site:
    resolver: Resolver
    a: FakeAgent
    b: FakeAgent

    async def move(self, port: int, back: bool = False) -> int:
        """The active's agent crashes (asm-a, or asm-b when ``back``), the other node
        takes over and publishes ``comm`` at ``port``."""
        old, new = (self.b, self.a) if back else (self.a, self.b)
        await old.crash()
        await new.up()
        epoch = await new.become_active()
        await new.publish("comm", port, "opcua")
        return epoch


async def apply_site_with_comm(store: Store) -> None:
    """The test site, its pair asm running a comm server on both nodes."""
    data = yaml.safe_load(SITE_YAML)
    comm = {
        "name": "comm",
        "command": ["hapair-comm", "--listen", "{node.address}:4840"],
        "placement": "all",
        "endpoint": {"port": 4840, "protocol": "opcua"},
    }
    data["workshops"][0]["pairs"][0]["services"].append(comm)
    site = topology.parse_site(data, "test site")
    doc = records.TopologyDoc(site=site.model_dump(mode="json"))
    await store.put(keys.TOPOLOGY, doc.encode())


@contextlib.asynccontextmanager
async def site(etcd: Etcd, store: Store, port: int) -> AsyncIterator[Site]:
    """``comm`` published by asm-a at ``port``; asm-b a standby."""
    await apply_site_with_comm(store)
    a = await FakeAgent(store, "asm-a", "asm").up()
    b = await FakeAgent(store, "asm-b", "asm").up()
    await a.become_active()
    await a.publish("comm", port, "opcua")
    async with (
        registry_in_process(etcd) as url,
        Resolver(url, request_timeout_s=0.5, stream_idle_s=2.0) as resolver,
    ):
        yield Site(resolver, a, b)


@dataclass
class UaNode:
    """A plain asyncua server on a node's address with the tag ``press-1.speed``."""

    server: Any
    speed: Any
    port: int
    ns: int

    async def set(self, value: int) -> None:
        await self.speed.write_value(ua.Variant(value, ua.VariantType.Int16))

    async def value(self) -> int:
        got: int = await self.speed.read_value()
        return got


async def ua_node(host: str, port: int, value: int, other_namespaces: int = 0) -> UaNode:
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://{host}:{port}/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    for i in range(other_namespaces):  # so that the comm namespace gets another index
        await server.register_namespace(f"urn:other:{i}")
    ns = await server.register_namespace("urn:hapair:comm")
    speed = await server.nodes.objects.add_variable(
        ua.NodeId("press-1.speed", ns), "speed", ua.Variant(value, ua.VariantType.Int16)
    )
    await speed.set_writable()
    await server.start()
    return UaNode(server, speed, port, ns)


@pytest.fixture
async def ua_nodes() -> AsyncIterator[tuple[UaNode, UaNode]]:
    a = await ua_node(HOSTS["asm-a"], free_port(HOSTS["asm-a"]), 1)
    b = await ua_node(HOSTS["asm-b"], free_port(HOSTS["asm-b"]), 7, other_namespaces=1)
    try:
        yield a, b
    finally:
        for node in (a, b):
            with contextlib.suppress(Exception):
                await node.server.stop()


@dataclass
class Changes:
    seen: list[DataChange] = field(default_factory=list)

    def add(self, change: DataChange) -> None:
        self.seen.append(change)

    async def got(self, node: str, value: int, after: int = 0) -> bool:
        return any((c.endpoint.node, c.value) == (node, value) for c in self.seen[after:])


async def test_subscriptions_reads_and_writes_follow_the_endpoint(
    etcd: Etcd, store: Store, ua_nodes: tuple[UaNode, UaNode]
) -> None:
    node_a, node_b = ua_nodes
    assert node_a.ns != node_b.ns  # the tag is found by namespace URI on each
    changes = Changes()
    async with (
        site(etcd, store, node_a.port) as s,
        OpcUaAdapter(s.resolver, "comm", deadline_s=3, backoff=FAST_BACKOFF) as opc,
    ):
        sub = await opc.subscribe(SPEED, changes.add, period_ms=20)
        await until(lambda: changes.got("asm-a", 1), "the current value from asm-a")
        await node_a.set(2)
        await until(lambda: changes.got("asm-a", 2), "a change on asm-a")
        assert await opc.read_value(SPEED) == 2
        await opc.write(SPEED, 3, ua.VariantType.Int16)
        assert await node_a.value() == 3
        await until(lambda: changes.got("asm-a", 3), "the written value notified")

        moved_at = len(changes.seen)
        epoch = await s.move(node_b.port)
        # The subscription is made again on asm-b: its current value, then its changes.
        await until(lambda: changes.got("asm-b", 7, moved_at), "the current value from asm-b")
        await node_a.set(99)  # the old server is still up: nothing of it comes through
        await node_b.set(8)
        await until(lambda: changes.got("asm-b", 8, moved_at), "a change on asm-b")
        after = changes.seen[moved_at:]
        assert {c.endpoint.node for c in after} == {"asm-b"}, after
        assert all(c.node == SPEED and c.data.StatusCode.is_good() for c in after)
        assert after[-1].endpoint.epoch == epoch
        assert await opc.read_value(SPEED) == 8
        await opc.write(SPEED, 9, ua.VariantType.Int16)
        assert (await node_b.value(), await node_a.value()) == (9, 99)
        assert opc.endpoint is not None and opc.endpoint.node == "asm-b"
        assert opc.subscription_error is None

        await opc.unsubscribe(sub)
        count = len(changes.seen)
        await node_b.set(10)
        assert await opc.read_value(SPEED) == 10
        await node_b.set(11)  # a later change: an unsubscribed callback sees neither
        assert await opc.read_value(SPEED) == 11
        assert len(changes.seen) == count


async def test_subscriptions_wait_through_a_dead_server_with_a_clear_error(
    etcd: Etcd, store: Store, ua_nodes: tuple[UaNode, UaNode]
) -> None:
    node_a, node_b = ua_nodes
    changes = Changes()
    async with (
        site(etcd, store, node_a.port) as s,
        OpcUaAdapter(
            s.resolver, "comm", deadline_s=0.5, watchdog_s=0.2, backoff=FAST_BACKOFF
        ) as opc,
    ):
        await opc.subscribe([SPEED], changes.add, period_ms=20)
        await until(lambda: changes.got("asm-a", 1), "the current value from asm-a")
        await node_a.server.stop()  # the active dies; its endpoint is still published

        async def said() -> str | None:
            return opc.subscription_error

        error = await until(said, "the adapter to say why nothing is delivered")
        assert error.startswith("comm: not reached within 0.5 s: last tried asm-a at 127.0.0.11:")
        assert "ConnectionRefusedError" in error
        moved_at = len(changes.seen)
        await s.move(node_b.port)
        await until(lambda: changes.got("asm-b", 7, moved_at), "the value from asm-b")
        await until(lambda: asyncio.sleep(0, opc.subscription_error is None), "the error gone")


async def test_a_server_that_never_answers_gives_a_deadline_error(etcd: Etcd, store: Store) -> None:
    async with (
        site(etcd, store, free_port(HOSTS["asm-a"])) as s,
        OpcUaAdapter(s.resolver, "comm", deadline_s=1.0, backoff=Backoff(0.05, 0.2)) as opc,
    ):
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            await opc.read_value(SPEED)
        assert 0.95 <= time.monotonic() - started < 3.0
        message = str(caught.value)
        assert message.startswith("comm: not reached within 1 s: last tried asm-a at 127.0.0.11:")
        assert "ConnectionRefusedError" in message
        with pytest.raises(ValueError, match=r"'Oven\.Temp' is not an OPC UA node id such as"):
            await opc.read_value("Oven.Temp")
        with pytest.raises(ValueError, match=r"by URI \(nsu=\) or by index \(ns=\), not both"):
            await opc.subscribe("nsu=urn:x;ns=2;s=a", lambda c: None)


async def test_unknown_nodes_are_named(
    etcd: Etcd, store: Store, ua_nodes: tuple[UaNode, UaNode]
) -> None:
    node_a, _ = ua_nodes
    async with (
        site(etcd, store, node_a.port) as s,
        OpcUaAdapter(s.resolver, "comm", deadline_s=2) as opc,
    ):
        # the first use of the adapter: its connection is made for this subscription
        with pytest.raises(NodeNotFound, match=r"press-1\.nope: BadNodeIdUnknown"):
            await opc.subscribe([SPEED, tag("press-1.nope")], lambda c: None)
        assert opc.subscriptions == []
        with pytest.raises(NodeNotFound, match="has no namespace urn:nowhere"):
            await opc.read_value("nsu=urn:nowhere;s=x")
        with pytest.raises(NodeNotFound, match="has no namespace urn:nowhere"):
            await opc.subscribe("nsu=urn:nowhere;s=x", lambda c: None)


# ---- writes against real comm servers -------------------------------------------------


class Switch:
    """A comm server's role that the test sets; counts how often writes asked it."""

    def __init__(self, serving: bool) -> None:
        self._serving = serving
        self.asked = 0
        self.epoch: int | None = 1
        self.state = "active" if serving else "standby"

    @property
    def serving(self) -> bool:
        self.asked += 1
        return self._serving

    def set(self, serving: bool) -> None:
        self._serving = serving
        self.state = "active" if serving else "standby"

    async def run(self) -> None:
        await asyncio.Event().wait()

    def poke(self) -> None:
        pass

    async def close(self) -> None:
        pass


def comm_config(host: str, port: int) -> str:
    plc = {
        "name": "press-1",
        "paths": [{"host": host, "port": port}],
        # A held write is not answered for this long: time enough to move the service.
        "poll_interval_s": 5.0,
        "timeout_s": 5.0,
        "tags": [{"name": "speed", "address": "HR0", "type": "int16", "writable": True}],
    }
    return json.dumps({"plcs": [plc]})


@pytest.fixture
async def plc() -> AsyncIterator[ModbusPlc]:
    sim = await ModbusPlc(["127.0.36.1", "127.0.36.2"], free_port("127.0.36.1")).start()
    try:
        yield sim
    finally:
        sim.hold = None
        await sim.stop()


@contextlib.asynccontextmanager
async def comm_pair(
    etcd: Etcd, store: Store, plc: ModbusPlc, role_a: Switch, role_b: Switch, deadline_s: float = 5
) -> AsyncIterator[tuple[CommUnderTest, CommUnderTest, Site, OpcUaAdapter]]:
    """Real comm servers on asm-a and asm-b in the roles the test sets, in front of
    ``plc``; ``comm`` published by asm-a; an adapter following it."""
    async with (
        running_comm(comm_config("127.0.36.1", plc.port), lambda *_: role_a, HOSTS["asm-a"]) as a,
        running_comm(comm_config("127.0.36.2", plc.port), lambda *_: role_b, HOSTS["asm-b"]) as b,
        site(etcd, store, a.port) as s,
        OpcUaAdapter(s.resolver, "comm", deadline_s=deadline_s, backoff=FAST_BACKOFF) as opc,
    ):
        yield a, b, s, opc


async def test_writes_across_a_failover_are_never_doubled(
    etcd: Etcd, store: Store, plc: ModbusPlc
) -> None:
    role_a, role_b = Switch(True), Switch(False)
    async with comm_pair(etcd, store, plc, role_a, role_b) as (a, b, s, opc):
        await opc.write(SPEED, 1, ua.VariantType.Int16)
        assert [w.values for w in plc.writes] == [[1]]

        # The PLC takes the next write and does not answer: the service moves meanwhile.
        # Whether the PLC applied it is unknown to the client: it is not sent again.
        plc.hold = asyncio.Event()
        pending = asyncio.create_task(opc.write(SPEED, 2, ua.VariantType.Int16))
        await until(lambda: asyncio.sleep(0, len(plc.writes) == 2), "the write at the PLC")
        role_a.set(False)
        role_b.set(True)
        await s.move(b.port)
        # The adapter gives the write up at its request timeout (2 s from the send); the
        # test's deadline is for liveness alone, well past that.
        with pytest.raises(OutcomeUnknown, match="may or may not have been applied"):
            async with asyncio.timeout(LIVENESS_S):
                await pending
        plc.hold.set()
        plc.hold = None

        # asm-b's comm server steps down before the registry says where the service
        # went: it refuses the write, which was not sent to the PLC; the write goes to
        # the new active once it is published, once.
        role_b.set(False)
        asked = role_b.asked
        write = asyncio.create_task(opc.write(SPEED, 3, ua.VariantType.Int16))
        await until(lambda: asyncio.sleep(0, role_b.asked > asked), "asm-b asked to write")
        assert not write.done()
        role_a.set(True)
        await s.move(a.port, back=True)
        async with asyncio.timeout(LIVENESS_S):  # the adapter's own deadline is 5 s
            await write
        assert [w.values for w in plc.writes] == [[1], [2], [3]]


def refusals(caplog: pytest.LogCaptureFixture) -> int:
    """Writes the comm servers refused because they do not serve (they log each one)."""
    return sum(
        r.name == "hapair.comm" and r.getMessage() == "write refused" for r in caplog.records
    )


async def test_a_write_refused_by_a_new_active_not_yet_serving_goes_through_once_it_serves(
    etcd: Etcd, store: Store, plc: ModbusPlc, caplog: pytest.LogCaptureFixture
) -> None:
    """Right after a failover the registry names the new active before its comm server
    has claimed the role: it refuses writes (BadInvalidState) without sending them. The
    adapter writes again there within its deadline, and the PLC gets the write once."""
    caplog.set_level(logging.INFO, "hapair.comm")
    role_b = Switch(False)
    async with comm_pair(etcd, store, plc, Switch(False), role_b) as (_, b, s, opc):
        await s.move(b.port)

        async def b_named() -> bool:
            endpoint = await s.resolver.newer("comm", None, 0)
            return endpoint is not None and endpoint.node == "asm-b"

        await until(b_named, "asm-b's comm server published")
        write = asyncio.create_task(opc.write(SPEED, 5, ua.VariantType.Int16))
        await until(lambda: asyncio.sleep(0, refusals(caplog) >= 2), "the write refused twice")
        assert not write.done(), "the write gave up on a refusal before its deadline"
        assert plc.writes == []
        role_b.set(True)
        async with asyncio.timeout(3):
            await write
        assert [w.values for w in plc.writes] == [[5]]


async def test_a_write_refused_until_the_deadline_says_so(
    etcd: Etcd, store: Store, plc: ModbusPlc, caplog: pytest.LogCaptureFixture
) -> None:
    """No comm server takes the role before the write's deadline: the refusal reaches
    the caller, after asking again, and nothing was written."""
    caplog.set_level(logging.INFO, "hapair.comm")
    async with comm_pair(etcd, store, plc, Switch(False), Switch(False), 1.0) as (*_, opc):
        with pytest.raises(ua.UaStatusCodeError) as refused:
            async with asyncio.timeout(10):
                await opc.write(SPEED, 6, ua.VariantType.Int16)
        assert refused.value.code == ua.StatusCodes.BadInvalidState
        assert refusals(caplog) > 1, "the refusal was not asked again within the deadline"
        assert plc.writes == []


async def test_subscriptions_follow_a_move_of_a_service_unknown_at_start(
    etcd: Etcd, store: Store, ua_nodes: tuple[UaNode, UaNode]
) -> None:
    """The adapter starts following before the site declares ``comm`` (404); its
    subscriptions still move to the new server when the service moves."""
    node_a, node_b = ua_nodes
    changes = Changes()
    async with (
        registry_in_process(etcd) as url,
        Resolver(url, request_timeout_s=0.5, stream_idle_s=2.0) as resolver,
        OpcUaAdapter(resolver, "comm", deadline_s=3, backoff=FAST_BACKOFF) as opc,
    ):
        await opc.start()
        await until(lambda: asyncio.sleep(0, resolver.state("comm").status == 404), "404 for comm")
        await apply_site_with_comm(store)
        a = await FakeAgent(store, "asm-a", "asm").up()
        b = await FakeAgent(store, "asm-b", "asm").up()
        await a.become_active()
        await a.publish("comm", node_a.port, "opcua")
        s = Site(resolver, a, b)
        await until(lambda: asyncio.sleep(0, resolver.current("comm")), "comm published")
        await opc.subscribe(SPEED, changes.add, period_ms=20)
        await until(lambda: changes.got("asm-a", 1), "the current value from asm-a")

        moved_at = len(changes.seen)
        await s.move(node_b.port)
        await until(lambda: changes.got("asm-b", 7, moved_at), "the current value from asm-b")


async def test_the_adapter_writes_as_a_user_over_sign_and_encrypt(
    etcd: Etcd, store: Store, plc: ModbusPlc, tmp_path: Path
) -> None:
    """A comm server with its security on: the adapter, given its certificate, the
    site CA and alice's password, reads and writes through it and subscribes; without
    them it gets no session, and the PLC sees nothing from it; a server whose
    certificate the CA did not issue is not trusted."""
    pki_site = make_site(tmp_path)
    own = ClientSecurity(
        pki_site.file("alice-app", "crt"),
        pki_site.file("alice-app", "key"),
        pki_site.file("ca", "crt"),
    )
    config = comm_config("127.0.36.1", plc.port)
    async with (
        running_comm(
            config,
            lambda *_: Switch(True),
            HOSTS["asm-a"],
            security=pki_site.security(),
            client_setup=as_alice(pki_site),
        ) as comm,
        site(etcd, store, comm.port) as s,
    ):
        async with OpcUaAdapter(
            s.resolver,
            "comm",
            deadline_s=3,
            backoff=FAST_BACKOFF,
            security=own,
            user="alice",
            password=PASSWORDS["alice"],
        ) as opc:
            await opc.write(SPEED, 11, ua.VariantType.Int16)
            assert [w.values for w in plc.writes] == [[11]]
            changes: list[DataChange] = []
            await opc.subscribe([SPEED], changes.append, period_ms=100)
            await until(lambda: asyncio.sleep(0, any(c.value == 11 for c in changes)), "11 seen")
        # No certificate and no user: no session, so no write. Another CA: the comm
        # server's certificate is not trusted, so no session either.
        stranger = ClientSecurity(own.certificate, own.key, pki_site.other / "ca.crt")
        for how in ({}, {"security": stranger, "user": "alice", "password": PASSWORDS["alice"]}):
            async with OpcUaAdapter(
                s.resolver, "comm", deadline_s=1, backoff=FAST_BACKOFF, **how
            ) as refused:
                with pytest.raises(DeadlineExceeded):
                    await refused.write(SPEED, 12, ua.VariantType.Int16)
        assert [w.values for w in plc.writes] == [[11]]
