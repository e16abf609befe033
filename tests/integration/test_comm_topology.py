"""``hapair-comm`` reading its pair's PLC list from the topology in a real etcd."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Client

from hapair.shared import keys, records, topology
from hapair.shared.store import Store
from tests.support.cluster import until
from tests.support.harness import PYTHON, ROOT, Etcd, comm_process, free_port
from tests.support.plc_sim import ModbusPlc
from tests.unit.test_comm_topology import HAPAIR, NODE, PLC_HOSTS, PLC_PORT, example_plcs, site


async def test_hapair_topology_validate_names_the_broken_plc_field(tmp_path: Path) -> None:
    plcs = example_plcs()
    plcs[1]["tags"].extend(
        [
            {"name": "a", "node": "i=1", "type": "int16"},
            {"name": "b", "node": "oops", "type": "int16"},
        ]
    )
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(site(plcs)))
    run = await asyncio.to_thread(
        subprocess.run,
        [HAPAIR, "topology", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("HAPAIR_")},
    )
    assert run.returncode == 2, run.stdout
    assert (
        "  workshops[0].pairs[1].plcs[1].tags[2].node: 'oops' is not an OPC UA node id such "
        "as ns=2;s=Oven.Temp"
    ) in run.stderr.splitlines()


def plc_list(*tags: tuple[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "name": "press-1",
            "paths": [{"host": h, "port": PLC_PORT} for h in PLC_HOSTS],
            "poll_interval_s": 0.2,
            "timeout_s": 0.1,
            "tags": [{"name": n, "address": a, "type": "int16"} for n, a in tags],
        }
    ]


async def apply(store: Store, data: dict[str, Any]) -> None:
    """Apply ``data`` with line-1's OPC UA server open, as in a lab."""
    data["workshops"][0]["pairs"][1]["opcua"] = {"security": "none"}
    parsed = topology.parse_site(data, "test site")
    await store.put(
        keys.TOPOLOGY, records.TopologyDoc(site=parsed.model_dump(mode="json")).encode()
    )


@pytest.fixture
async def plc() -> AsyncIterator[ModbusPlc]:
    sim = await ModbusPlc(PLC_HOSTS, PLC_PORT).start()
    try:
        yield sim
    finally:
        await sim.stop()


def comm(
    etcd: Etcd, tmp_path: Path, port: int, *extra: str
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    env = {**etcd.client_env(), "HAPAIR_PAIR": "line-1", "HAPAIR_NODE": "l1-a"}
    return comm_process(tmp_path / "comm.log", ["--listen", f"{NODE}:{port}", *extra], env)


async def tag_value(url: str, key: str) -> Any:
    async with Client(url, timeout=2) as client:
        ns = await client.get_namespace_index("urn:hapair:comm")
        dv = await client.get_node(f"ns={ns};s={key}").read_data_value(raise_on_bad_status=False)
        return dv.Value.Value if dv.StatusCode.is_good() else None


async def test_hapair_comm_serves_the_plcs_of_its_pair_from_etcd(
    etcd: Etcd, store: Store, plc: ModbusPlc, tmp_path: Path
) -> None:
    await plc.set("HR", 0, [1234, 55])
    await apply(store, site(plc_list(("speed", "HR0"))))
    port = free_port(NODE)
    url = f"opc.tcp://{NODE}:{port}/"
    with comm(etcd, tmp_path, port) as proc:
        await until(lambda: tag_value(url, "press-1.speed"), 20, "press-1.speed served")
        assert await tag_value(url, "press-1.speed") == 1234
        # A new PLC list in the topology is served without the agent restarting it.
        await apply(store, site(plc_list(("speed", "HR0"), ("count", "HR1"))))

        async def count() -> bool:
            return await tag_value(url, "press-1.count") == 55

        await until(count, 20, "press-1.count served after the topology changed")
        assert proc.poll() is None
        # A topology that leaves the pair without PLCs is refused: the list in use stays.
        await apply(store, site(None))
        await until(
            lambda: asyncio.sleep(0, "no PLC list in the topology" in log_of(tmp_path)),
            10,
            "the refusal logged",
        )
        assert await tag_value(url, "press-1.count") == 55
    assert "restarting with the PLC list of the topology" in log_of(tmp_path)


def log_of(tmp_path: Path) -> str:
    return (tmp_path / "comm.log").read_text(errors="replace")


async def test_hapair_comm_refuses_to_start_without_a_plc_list(
    etcd: Etcd, store: Store, tmp_path: Path
) -> None:
    await apply(store, site(None))
    with comm(etcd, tmp_path, free_port(NODE)) as proc:
        code = await asyncio.to_thread(proc.wait, 30)
    assert code == 2
    assert (
        "hapair-comm: pair 'line-1' has no plcs: section in the topology: add the PLC list "
        "to the pair in the site file and apply it, or give it with --config FILE"
    ) in log_of(tmp_path)


async def test_check_reads_the_topology_and_standalone_needs_a_file(
    etcd: Etcd, store: Store
) -> None:
    await apply(store, site(plc_list(("speed", "HR0"), ("count", "HR1"))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAPAIR_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "hapair.comm_server.main", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
            env={**env, "PYTHONPATH": str(ROOT)},
        )

    ok = await asyncio.to_thread(run, "--check", *etcd.client_args(), "--pair", "line-1")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith(
        "pair line-1 in the topology at " + etcd.url.split("://")[1] + ": valid, 1 PLCs, 2 tags"
    )
    ko = await asyncio.to_thread(run, "--check", *etcd.client_args(), "--pair", "other")
    assert ko.returncode == 2 and "pair 'other' has no plcs: section" in ko.stderr
    alone = await asyncio.to_thread(run, "--standalone")
    assert alone.returncode == 2
    assert "--standalone needs --config FILE" in alone.stderr
    bare = await asyncio.to_thread(run, "--check")
    assert bare.returncode == 2
    assert "--etcd, --pair missing (or HAPAIR_ETCD, HAPAIR_PAIR in the environment)" in bare.stderr
