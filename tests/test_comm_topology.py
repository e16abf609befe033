"""The PLC list as a ``plcs:`` section of a pair: validated with the site file (every
mistake named by its whole field path), and read by ``hapair-comm`` from the topology
in a real etcd when it is given no ``--config``, followed when it changes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Client, ua

from comm_server.config import loads as load_plcs
from comm_server.source import PlcListError, plcs_of
from shared import keys, records, topology
from shared.plcs import PLC_NAME_PATTERN, OpcUaPlc, node_id_problem
from shared.plcs import ModbusPlc as ModbusPlcConfig
from shared.store import Store
from tests.support.cluster import until
from tests.support.harness import PYTHON, ROOT, Etcd, free_port, stop_pid
from tests.support.plc_sim import ModbusPlc
from tests.test_comm_config import EXAMPLE

HAPAIR = str(Path(sys.executable).parent / "hapair")
NODE = "127.0.37.1"
PLC_HOSTS = ["127.0.37.11", "127.0.37.12"]
PLC_PORT = free_port(PLC_HOSTS[0])


def site(plcs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A site whose second pair, line-1, has ``plcs`` (no ``plcs:`` at all for None)."""
    other = {
        "name": "other",
        "nodes": [
            {"name": "o-a", "address": "127.0.37.5"},
            {"name": "o-b", "address": "127.0.37.6"},
        ],
    }
    pair: dict[str, Any] = {
        "name": "line-1",
        "nodes": [{"name": "l1-a", "address": NODE}, {"name": "l1-b", "address": "127.0.37.2"}],
    }
    if plcs is not None:
        pair["plcs"] = plcs
    return {"site": "plant", "workshops": [{"name": "w", "pairs": [other, pair]}]}


def example_plcs() -> list[dict[str, Any]]:
    plcs: list[dict[str, Any]] = yaml.safe_load(EXAMPLE)["plcs"]
    return plcs


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(topology.TopologyError) as err:
        topology.parse_site(data, "site.yaml")
    return err.value.problems


# ---- validation ---------------------------------------------------------------------


def test_a_pair_takes_the_plc_list_of_the_issue() -> None:
    parsed = topology.parse_site(site(example_plcs()), "site.yaml")
    pair = parsed.pair("line-1")
    assert pair is not None
    press, oven = pair.plcs
    assert isinstance(press, ModbusPlcConfig) and isinstance(oven, OpcUaPlc)
    assert [t.address for t in press.tags] == ["HR100", "IR10", "C5", "DI7"]
    # The same section in a file for --config means the same list.
    assert load_plcs(EXAMPLE).plcs == pair.plcs
    # What `hapair topology apply` stores reads back as the same pair.
    stored = records.TopologyDoc(site=parsed.model_dump(mode="json")).encode()
    again = plcs_of(stored, "line-1")
    assert again.plcs == pair.plcs
    other = parsed.pair("other")
    assert other is not None and other.plcs == []


def test_every_mistake_in_a_pairs_plcs_is_named_by_its_whole_path() -> None:
    plcs = example_plcs()
    plcs[0]["tags"][2]["address"] = "C5x"
    plcs[1]["tags"][0]["node"] = "ns=2;i=Oven"
    plcs[1]["paths"].append({"url": "opc.tcp://a:1"})
    plcs.append({"name": "s7", "protocol": "s7"})
    plcs.append({"name": "p.1", "paths": [{"host": "h"}], "tags": []})
    at = "workshops[0].pairs[1].plcs"
    assert problems(site(plcs)) == [
        f"{at}[0].tags[2].address: 'C5x' is not a Modbus address: C (coil), DI (discrete "
        "input), IR (input register) or HR (holding register) and a zero-based number from 0 "
        "to 65535, e.g. HR100",
        f"{at}[1].paths: List should have at most 2 items after validation, not 3",
        f"{at}[1].tags[0].node: 'ns=2;i=Oven': a numeric id (i=) is a number from 0 to 4294967295",
        f"{at}[2]: protocol must be modbus or opcua",
        f"{at}[3].name: String should match pattern '{PLC_NAME_PATTERN}'",
        f"{at}[3].tags: List should have at least 1 item after validation, not 0",
    ]


def test_plc_names_are_unique_within_a_pair_only() -> None:
    plcs = example_plcs()
    plcs[1]["name"] = "press-1"
    assert problems(site(plcs)) == [
        "workshops[0].pairs[1]: duplicate PLC name 'press-1' at plcs[0].name, plcs[1].name"
    ]
    both = site(example_plcs())
    both["workshops"][0]["pairs"][0]["plcs"] = example_plcs()
    topology.parse_site(both, "site.yaml")  # the same PLC names in two pairs


def test_plc_names_follow_the_site_rule() -> None:
    assert PLC_NAME_PATTERN == topology.NAME_PATTERN


@pytest.mark.parametrize(
    "node",
    [
        "ns=2;s=Oven.Temp",
        "i=2267",
        "ns=65535;i=4294967295",
        "s=a;b=c",
        "b=abc",
        "b=0x0aff",
        "ns=3;g=72962B91-FA75-4AE6-8D28-B404DC7DAF63",
    ],
)
def test_node_ids_accepted_are_those_asyncua_reads(node: str) -> None:
    assert node_id_problem(node) is None
    ua.NodeId.from_string(node)


@pytest.mark.parametrize(
    ("node", "why"),
    [
        ("Oven.Temp", "is not an OPC UA node id such as ns=2;s=Oven.Temp"),
        ("ns=70000;i=1", "namespace index 70000 is above 65535"),
        ("i=4294967296", "a numeric id (i=) is a number from 0 to 4294967295"),
        ("g=not-a-guid", "a GUID id (g=) looks like"),
        ("b=0xZZ", "a byte string id given as 0x... must be hexadecimal"),
        ("ns=2;s=", "is not an OPC UA node id"),
    ],
)
def test_node_ids_refused_say_why(node: str, why: str) -> None:
    problem = node_id_problem(node)
    assert problem is not None and why in problem


def test_the_topology_says_why_it_gives_no_plc_list() -> None:
    doc = records.TopologyDoc(site=site(None)).encode()
    with pytest.raises(PlcListError, match="pair 'line-1' has no plcs: section in the topology"):
        plcs_of(doc, "line-1")
    with pytest.raises(PlcListError, match="pair 'nope' is not in the topology"):
        plcs_of(doc, "nope")
    with pytest.raises(PlcListError, match="no topology in etcd"):
        plcs_of(None, "line-1")
    bad = records.TopologyDoc(site={"site": "plant", "workshops": []}).encode()
    with pytest.raises(PlcListError, match=re.escape("workshops: List should have at least 1")):
        plcs_of(bad, "line-1")


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


# ---- hapair-comm from the topology in etcd ---------------------------------------------


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


@contextlib.contextmanager
def comm(etcd: Etcd, tmp_path: Path, port: int, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    log = (tmp_path / "comm.log").open("ab")
    proc = subprocess.Popen(
        [PYTHON, "-m", "comm_server.main", "--listen", f"{NODE}:{port}", *extra],
        cwd=ROOT,
        stdout=log,
        stderr=log,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("HAPAIR_")},
            "PYTHONPATH": str(ROOT),
            "HAPAIR_ETCD": etcd.url,
            "HAPAIR_PAIR": "line-1",
            "HAPAIR_NODE": "l1-a",
        },
    )
    log.close()
    try:
        yield proc
    finally:
        stop_pid(proc)


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
            [PYTHON, "-m", "comm_server.main", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
            env={**env, "PYTHONPATH": str(ROOT)},
        )

    ok = await asyncio.to_thread(run, "--check", "--etcd", etcd.url, "--pair", "line-1")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith(
        "pair line-1 in the topology at "
        + etcd.url.removeprefix("http://")
        + ": valid, 1 PLCs, 2 tags"
    )
    ko = await asyncio.to_thread(run, "--check", "--etcd", etcd.url, "--pair", "other")
    assert ko.returncode == 2 and "pair 'other' has no plcs: section" in ko.stderr
    alone = await asyncio.to_thread(run, "--standalone")
    assert alone.returncode == 2
    assert "--standalone needs --config FILE" in alone.stderr
    bare = await asyncio.to_thread(run, "--check")
    assert bare.returncode == 2
    assert "--etcd, --pair missing (or HAPAIR_ETCD, HAPAIR_PAIR in the environment)" in bare.stderr
