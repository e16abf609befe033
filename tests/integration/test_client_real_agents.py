"""The client side against real agents: the TCP, PostgreSQL and OPC UA adapters, the
resolver and ``hapair-proxy`` ride through a crash of the active server as it really
happens.

Other client tests use a fake agent whose crash revokes its lease at once. A real
crash does not: for up to the lease TTL (about 2 s) etcd still holds the dead node's
endpoint, the registry answers it, and connections to it are refused. These tests
check that the window is really there, and that every client waits through it and
lands on the new active without an error.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua

from hapair.shared.client import (
    Backoff,
    DataChange,
    OpcUaAdapter,
    PgAdapter,
    Resolver,
    TcpAdapter,
    tag,
)
from hapair.shared.client.tcp import Connection
from hapair.shared.store import Store
from tests.integration.test_database_failover import db_cluster, ready, rows_on
from tests.integration.test_proxy import ProxyProcess
from tests.support.client_lab import RegistryProcess
from tests.support.cluster import THIS_TREE, Cluster, recording_service, until
from tests.support.harness import PYTHON, Etcd, free_port
from tests.support.pg_harness import PASSWORDS, needs_postgres
from tests.support.plc_sim import ModbusPlc

__all__ = ["db_cluster"]  # a fixture

pytestmark = pytest.mark.e2e

SERVICE = "real-svc"


async def _pair_up(c: Cluster, registry: RegistryProcess) -> int:
    """Agents a and b and a registry up: a active, b a healthy standby; a's epoch."""
    c.start("a")
    c.start("b")
    await registry.start()
    _, epoch = await c.active("p", node="a", timeout=15)
    await c.standby("b")
    return epoch


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
    """One HTTP/1.0 GET on a raw TCP connection: the test service's JSON body."""
    writer.write(b"GET / HTTP/1.0\r\nHost: svc\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(5):
        raw = await reader.read()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), raw[:200]
    answer: dict[str, Any] = json.loads(body)
    return answer


async def ask(conn: Connection) -> dict[str, Any]:
    return await http_get(conn.reader, conn.writer)


async def test_tcp_adapter_resolver_and_proxy_ride_through_a_real_crash(
    etcd: Etcd, store: Store, tmp_path: Path
) -> None:
    c = Cluster(etcd, tmp_path)
    port = free_port()
    service = recording_service(SERVICE, port, c.record, critical=True)
    nodes = [{"name": "a", "address": "127.0.63.1"}, {"name": "b", "address": "127.0.63.2"}]
    await c.apply(c.site([{"name": "p", "nodes": nodes, "services": [service]}]))
    registry = RegistryProcess(etcd)
    try:
        epoch = await _pair_up(c, registry)
        async with (
            Resolver(registry.url) as resolver,
            TcpAdapter(resolver, SERVICE, deadline_s=20.0) as tcp,
            ProxyProcess(registry.url, tmp_path / "proxy.log", service=SERVICE) as proxy,
        ):
            first = await tcp.run(ask)
            assert (first["node"], first["epoch"]) == ("a", str(epoch))
            assert (await http_get(*await proxy.connect()))["node"] == "a"

            c.crash("a")  # agent, watchdog and service at once; the lease lives on
            crashed = time.monotonic()
            # The window a fake agent never has: a's endpoint is still the answer.
            still = await resolver.resolve(SERVICE)
            assert (still.node, still.epoch) == ("a", epoch)

            via_tcp = asyncio.create_task(tcp.run(ask))
            via_proxy = asyncio.create_task(
                until(lambda: _through_proxy(proxy, "b"), 20, "the proxy reaching b")
            )
            moved = await asyncio.wait_for(via_tcp, 20)
            assert moved["node"] == "b" and int(moved["epoch"]) > epoch
            assert await via_proxy
            new = await resolver.resolve(SERVICE)
            assert (new.node, new.epoch) == ("b", int(moved["epoch"]))
            print(f"crash -> answered by b through the adapter: {time.monotonic() - crashed:.2f}s")
    finally:
        await registry.stop()
        await c.stop_all()
    c.assert_no_overlap()


async def _through_proxy(proxy: ProxyProcess, node: str) -> bool:
    """A new connection through the proxy is answered by ``node`` (refusals retried)."""
    try:
        answer = await http_get(*await proxy.connect())
    except (OSError, AssertionError, json.JSONDecodeError, TimeoutError):
        return False
    return answer["node"] == node


@needs_postgres
async def test_pg_adapter_rides_through_a_real_crash_and_loses_no_commit(
    db_cluster: tuple[Cluster, int],
) -> None:
    c, port = db_cluster
    _, epoch = await ready(c, port)
    registry = RegistryProcess(c.etcd)
    acked: list[int] = []
    try:
        await registry.start()
        async with (
            Resolver(registry.url) as resolver,
            PgAdapter(
                resolver, "p.db", user="mes", dbname="mes", password=PASSWORDS["mes"],
                deadline_s=30.0,
            ) as pg,
        ):  # fmt: skip

            async def insert(n: int) -> str:
                async def work(conn: Any) -> str:
                    async with conn.transaction():
                        await conn.execute("INSERT INTO ticks (id) VALUES (%s)", (n,))
                        cur = await conn.execute("SELECT inet_server_addr()::text")
                        row = await cur.fetchone()
                    return str(row[0])

                return await pg.run(work)

            for n in range(1, 21):
                await insert(n)
                acked.append(n)
            c.crash("a")  # agent, watchdog, postmaster and all; a's lease lives on
            still = await resolver.resolve("p.db")
            assert (still.node, still.epoch) == ("a", epoch)  # the window is there
            served_by = ""
            for n in range(21, 41):  # through the window: no error reaches the caller
                served_by = await insert(n)
                acked.append(n)
            assert served_by.startswith("127.0.0.2"), served_by
            new = await resolver.resolve("p.db")
            assert new.node == "b" and new.epoch > epoch
        assert set(acked) <= await rows_on(port, "127.0.0.2")
    finally:
        await registry.stop()


async def test_opcua_adapter_follows_real_comm_servers_through_a_real_crash(
    etcd: Etcd, store: Store, tmp_path: Path
) -> None:
    """Real agents run ``hapair-comm`` on both nodes (warm standby on b) against a real
    Modbus PLC: after a's crash the subscription comes back from b and a write reaches
    the PLC through b, without an error reaching the caller."""
    hosts = {"a": "127.0.64.1", "b": "127.0.64.2"}
    plc_port, opc_port = free_port("127.0.64.11"), free_port(hosts["a"])
    plc = await ModbusPlc(["127.0.64.11"], plc_port).start()
    await plc.set("HR", 0, [1234])
    (tmp_path / "comm.json").write_text(
        json.dumps(
            {
                "plcs": [
                    {
                        "name": "press-1",
                        "paths": [{"host": "127.0.64.11", "port": plc_port}],
                        "poll_interval_s": 0.2,
                        "timeout_s": 0.2,
                        "tags": [
                            {"name": "speed", "address": "HR0", "type": "int16", "writable": True}
                        ],
                    }
                ],
                "opcua": {"security": "none"},
            }
        )
    )
    comm = {
        "name": "comm",
        "command": [
            PYTHON, "-m", "hapair.comm_server.main", "--config", str(tmp_path / "comm.json"),
            "--listen", f"{{node.address}}:{opc_port}",
        ],
        "env": THIS_TREE,
        "placement": "all",
        "endpoint": {"port": opc_port, "protocol": "opcua"},
    }  # fmt: skip
    c = Cluster(etcd, tmp_path)
    comm["env"] = {**THIS_TREE, **c.service_env("comm", list(hosts))}
    nodes = [{"name": n, "address": a} for n, a in hosts.items()]
    await c.apply(c.site([{"name": "p", "nodes": nodes, "services": [comm]}]))
    registry = RegistryProcess(etcd)
    seen: list[DataChange] = []
    speed = tag("press-1.speed")
    try:
        epoch = await _pair_up(c, registry)
        async with (
            Resolver(registry.url) as resolver,
            OpcUaAdapter(
                resolver, "comm", deadline_s=20.0, backoff=Backoff(initial_s=0.05, max_s=0.5)
            ) as opc,
        ):
            await opc.subscribe(speed, seen.append, period_ms=50)
            await until(lambda: _seen(seen, "a", 1234), 15, "1234 from a")
            c.crash("a")
            await plc.set("HR", 0, [4321])
            await until(lambda: _seen(seen, "b", 4321), 30, "4321 from b after the crash")
            # b's comm server served reads as a warm standby already; writes once it has
            # claimed the role (ServiceLevel 255), as a redundancy-aware client checks.
            b_url = f"opc.tcp://{hosts['b']}:{opc_port}/"
            await until(lambda: _level(b_url, 255), 15, "b's comm server serving")
            await opc.write(speed, 77, ua.VariantType.Int16)
            assert (await plc.get("HR", 0, 1))[0] == 77
            assert opc.endpoint is not None and opc.endpoint.node == "b"
            assert opc.endpoint.epoch > epoch
            assert opc.subscription_error is None
    finally:
        await registry.stop()
        await c.stop_all()
        await plc.stop()


async def _seen(changes: list[DataChange], node: str, value: int) -> bool:
    return any(
        ch.endpoint.node == node and ch.value == value and ch.data.StatusCode.is_good()
        for ch in changes
    )


async def _level(url: str, want: int) -> bool:
    try:
        async with Client(url, timeout=2) as client:
            level: int = await client.get_node("ns=0;i=2267").read_value()
            return level == want
    except (OSError, TimeoutError, ua.UaError):
        return False
