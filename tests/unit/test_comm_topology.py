"""The PLC list as a ``plcs:`` section of a pair: validated with the site file (every
mistake named by its whole field path), and read by ``hapair-comm`` from the topology
in a real etcd when it is given no ``--config``, followed when it changes."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import ua

from hapair.comm_server.config import loads as load_plcs
from hapair.comm_server.source import PlcListError, plcs_of
from hapair.shared import records, topology
from hapair.shared.plcs import PLC_NAME_PATTERN, OpcUaPlc, node_id_problem
from hapair.shared.plcs import ModbusPlc as ModbusPlcConfig
from tests.support.harness import free_port
from tests.unit.test_comm_config import EXAMPLE

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


# ---- hapair-comm from the topology in etcd ---------------------------------------------
