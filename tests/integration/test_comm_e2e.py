"""End to end: real agents run ``hapair-comm`` on both nodes of a pair (placement: all)
against a real etcd and a real Modbus PLC; the PLC's paths are cut under them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client

from tests.support.cluster import THIS_TREE, Cluster, until
from tests.support.harness import PYTHON, Etcd, free_port
from tests.support.plc_sim import ModbusPlc

pytestmark = pytest.mark.e2e

NODES = {"a": "127.0.34.1", "b": "127.0.34.2"}
PLC_PATHS = {"a": ["127.0.34.11", "127.0.34.12"], "b": ["127.0.34.21", "127.0.34.22"]}


@pytest.fixture
async def cluster(etcd: Etcd, store: object, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(etcd, tmp_path)
    try:
        yield c
    finally:
        await c.stop_all()


async def service_level(url: str) -> int | None:
    try:
        async with Client(url, timeout=2) as client:
            level: int = await client.get_node("ns=0;i=2267").read_value()
            return level
    except Exception:
        return None


async def read_tag(url: str, key: str) -> Any:
    async with Client(url, timeout=2) as client:
        ns = await client.get_namespace_index("urn:hapair:comm")
        return await client.get_node(f"ns={ns};s={key}").read_data_value(raise_on_bad_status=False)


async def test_pair_moves_when_the_active_loses_every_path_to_a_critical_plc(
    cluster: Cluster, tmp_path: Path
) -> None:
    port, opc_port = free_port("127.0.34.11"), free_port("127.0.34.1")
    plc = await ModbusPlc(PLC_PATHS["a"] + PLC_PATHS["b"], port).start()
    await plc.set("HR", 0, [1234])
    for node, hosts in PLC_PATHS.items():
        # each node reaches the PLC over its own two network paths
        (tmp_path / f"comm-{node}.json").write_text(
            json.dumps(
                {
                    "plcs": [
                        {
                            "name": "press-1",
                            "paths": [{"host": h, "port": port} for h in hosts],
                            "poll_interval_s": 0.2,
                            "timeout_s": 0.1,
                            "critical": True,
                            "switch_after_s": 0.5,
                            "tags": [{"name": "speed", "address": "HR0", "type": "int16"}],
                        }
                    ],
                    "opcua": {"security": "none"},
                }
            )
        )
    comm = {
        "name": "comm",
        "command": [
            PYTHON,
            "-m",
            "hapair.comm_server.main",
            "--config",
            str(tmp_path / "comm-{node.name}.json"),
            "--listen",
            f"{{node.address}}:{opc_port}",
        ],
        "env": {**THIS_TREE, **cluster.service_env("comm", list(NODES))},
        "placement": "all",
        "endpoint": {"port": opc_port, "protocol": "opcua"},
    }
    pair = {
        "name": "p",
        "nodes": [{"name": n, "address": a} for n, a in NODES.items()],
        "services": [comm],
    }
    url = {n: f"opc.tcp://{a}:{opc_port}/" for n, a in NODES.items()}
    try:
        await cluster.apply(cluster.site([pair]))
        cluster.start("a")
        cluster.start("b")
        _, epoch = await cluster.active("p", node="a", timeout=15)

        async def levels(want_a: int, want_b: int) -> bool:
            got = (await service_level(url["a"]), await service_level(url["b"]))
            return got == (want_a, want_b)

        await until(lambda: levels(255, 50), 15, "a serving, b a warm standby")
        # an independent OPC UA client reads the tag from the active
        dv = await read_tag(url["a"], "press-1.speed")
        assert dv.StatusCode.is_good() and dv.Value.Value == 1234

        # every path from a to the PLC cut, b still reaches it: the pair moves to b
        cut = time.monotonic()
        await plc.stop_path(0)
        await plc.stop_path(1)
        node, _ = await cluster.active("p", not_epoch=epoch, timeout=10)
        assert node == "b"
        moved = time.monotonic() - cut
        assert moved >= 0.5  # the grace time first
        moves = await cluster.events("switchover")
        assert moves[-1]["reason"] == "plc:press-1 lost on the active"
        await until(lambda: levels(0, 255), 5, "b serving, a without data")
        dv = await read_tag(url["b"], "press-1.speed")
        assert dv.StatusCode.is_good() and dv.Value.Value == 1234

        # now b loses it too: nobody reaches it, so nobody moves, and the alarm shows
        await plc.stop_path(2)
        await plc.stop_path(3)

        async def alarm() -> bool:
            st = await cluster.status("b")
            return st is not None and "critical resource plc:press-1 lost" in st.problems

        await until(alarm, 5, "the alarm in b's status")
        leader = await cluster.leader("p")
        deadline = time.monotonic() + 1.5  # three grace times
        while time.monotonic() < deadline:
            assert await cluster.leader("p") == leader
            await asyncio.sleep(0.1)
        assert leader is not None and leader[0] == "b"
    finally:
        await plc.stop()
