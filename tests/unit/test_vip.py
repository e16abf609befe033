"""The virtual IP in the site file: validated and never shared."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hapair.shared.topology import TopologyError, parse_site


def _site(vip: dict[str, Any] | None) -> dict[str, Any]:
    nodes = [{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2"}]
    pair: dict[str, Any] = {"name": "p", "nodes": nodes}
    if vip is not None:
        pair["vip"] = vip
    return {"site": "s", "workshops": [{"name": "w", "pairs": [pair]}]}


def test_valid_vip_is_normalised_and_optional() -> None:
    pair = parse_site(_site({"address": " 10.0.0.100/24", "interface": "eth0"}), "s").pair("p")
    assert pair is not None and pair.vip is not None
    assert (pair.vip.address, pair.vip.ip, pair.vip.interface) == (
        "10.0.0.100/24",
        "10.0.0.100",
        "eth0",
    )
    bare = parse_site(_site(None), "s").pair("p")
    assert bare is not None and bare.vip is None


@pytest.mark.parametrize(
    ("vip", "problem"),
    [
        ({"address": "10.0.0.100", "interface": "eth0"}, "vip.address: '10.0.0.100' has no prefix"),
        ({"address": "10.0.0.255/24", "interface": "eth0"}, "vip.address: '10.0.0.255/24' is the"),
        ({"address": "fd00::5/64", "interface": "eth0"}, "vip.address: 'fd00::5/64': only IPv4"),
        ({"address": "eth0/24", "interface": "eth0"}, "vip.address: 'eth0/24' is not an IP"),
        ({"address": "10.0.0.100/24", "interface": "eth0:1"}, "vip.interface: 'eth0:1' is not"),
        ({"address": "10.0.0.100/24", "interface": "a" * 16}, "vip.interface: 'aaaa"),
        ({"address": "10.0.0.100/24"}, "vip.interface: Field required"),
        ({"address": "10.0.0.2/24", "interface": "eth0"}, "is the address of nodes[1] (b)"),
    ],
)
def test_invalid_vip_is_refused_naming_the_field(vip: dict[str, Any], problem: str) -> None:
    with pytest.raises(TopologyError) as err:
        parse_site(_site(vip), "site.yaml")
    text = "\n".join(err.value.problems)
    assert "workshops[0].pairs[0]" in text and problem in text, text


def test_two_pairs_cannot_share_a_vip() -> None:
    site = _site({"address": "10.0.0.100/24", "interface": "eth0"})
    other = json.loads(json.dumps(site["workshops"][0]["pairs"][0]))
    other["name"] = "q"
    other["nodes"] = [{"name": "c", "address": "10.0.0.3"}, {"name": "d", "address": "10.0.0.4"}]
    site["workshops"][0]["pairs"].append(other)
    with pytest.raises(TopologyError, match=r"duplicate virtual address '10\.0\.0\.100'"):
        parse_site(site, "s")
