"""The site file: parsing, documented defaults, and one path-named line per problem."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hapair.shared import topology
from hapair.shared.topology import (
    NAME_PATTERN,
    Failover,
    Health,
    Restart,
    Site,
    TopologyError,
    expand,
    placeholder_values,
)

SITE_YAML = """\
site: plant-1
workshops:
  - name: assembly
    pairs:
      - name: asm
        nodes:                       # priority order: the first is the main server
          - {name: asm-a, address: 127.0.0.11}
          - {name: asm-b, address: 127.0.0.12}
        failover: {lease_ttl_s: 2.0, fence_margin_s: 0.5, failback: manual}
        services:
          - name: mes-api
            command: [python3, -m, http.server, "8080", --bind, "{node.address}"]
            placement: active        # or: all
            critical: true           # its failure moves the pair at once
            restart: {max_restarts: 3, window_s: 60}
            health: {http: "http://{node.address}:8080/", interval_s: 0.5, timeout_s: 1}
            endpoint: {port: 8080, protocol: http}
"""

Data = dict[str, Any]
PAIR = "workshops[0].pairs[0]"
SERVICE = f"{PAIR}.services[0]"


def site_data() -> Data:
    data = yaml.safe_load(SITE_YAML)
    assert isinstance(data, dict)
    return data


def pair_of(d: Data) -> Data:
    pair: Data = d["workshops"][0]["pairs"][0]
    return pair


def service_of(d: Data) -> Data:
    service: Data = pair_of(d)["services"][0]
    return service


def problems_of(data: object) -> list[str]:
    with pytest.raises(TopologyError) as info:
        topology.parse_site(data, "site.yaml")
    return info.value.problems


def second_workshop(pair: Data) -> Data:
    return {"name": "paint", "pairs": [pair]}


def other_pair(name: str = "pnt", node_a: str = "pnt-a", service: str = "painter") -> Data:
    return {
        "name": name,
        "nodes": [
            {"name": node_a, "address": "127.0.0.21"},
            {"name": "pnt-b", "address": "127.0.0.22"},
        ],
        "services": [{"name": service, "command": ["sleep", "60"]}],
    }


# --- a valid site and its defaults -----------------------------------------------------------


def test_the_site_of_the_issue_parses() -> None:
    site = topology.loads(SITE_YAML)
    assert site.site == "plant-1"
    [workshop] = site.workshops
    assert workshop.name == "assembly"
    [pair] = workshop.pairs
    assert pair.name == "asm"
    assert [(n.name, n.address) for n in pair.nodes] == [
        ("asm-a", "127.0.0.11"),
        ("asm-b", "127.0.0.12"),
    ]
    assert pair.failover == Failover(lease_ttl_s=2.0, fence_margin_s=0.5, failback="manual")
    [service] = pair.services
    assert service.command == ["python3", "-m", "http.server", "8080", "--bind", "{node.address}"]
    assert service.placement == "active"
    assert service.critical is True
    assert service.restart == Restart(max_restarts=3, window_s=60.0)
    assert service.health is not None
    assert service.health.kind == "http"
    assert service.health.http == "http://{node.address}:8080/"
    assert (service.health.interval_s, service.health.timeout_s) == (0.5, 1.0)
    assert service.endpoint is not None
    assert (service.endpoint.port, service.endpoint.protocol) == (8080, "http")


def test_site_lookups() -> None:
    site = topology.loads(SITE_YAML)
    pair = site.pair("asm")
    assert pair is not None
    assert site.pair("nope") is None
    assert site.workshop_of("asm") == "assembly"
    assert site.workshop_of("nope") is None
    assert site.pair_of_node("asm-b") is pair
    assert site.pair_of_node("nope") is None
    found = site.pair_of_service("mes-api")
    assert found is not None
    assert found[0] is pair
    assert found[1].name == "mes-api"
    assert site.pair_of_service("nope") is None
    assert [pair.rank(n.name) for n in pair.nodes] == [0, 1]
    assert pair.node("asm-a") is pair.nodes[0]
    assert pair.node("nope") is None


def test_defaults_are_as_documented() -> None:
    site = topology.loads(
        """
        site: s
        workshops:
          - name: w
            pairs:
              - name: p
                nodes: [{name: a, address: 10.0.0.1}, {name: b, address: 10.0.0.2}]
                services:
                  - {name: svc, command: [run]}
                  - {name: probed, command: [run], health: {}, endpoint: {port: 502}}
        """
    )
    pair = site.workshops[0].pairs[0]
    assert all(n.no_failover is False for n in pair.nodes)
    f = pair.failover
    assert (f.lease_ttl_s, f.fence_margin_s, f.failback) == (2.0, 0.5, "manual")
    assert (f.failback_after_s, f.campaign_delay_s) == (60.0, 0.2)
    assert f.keepalive_interval_s == 0.5
    assert f.fence_after_s == 1.5
    svc, probed = pair.services
    assert svc.env == {}
    assert svc.cwd is None
    assert svc.placement == "active"
    assert svc.critical is False
    assert svc.restart == Restart(max_restarts=3, window_s=60.0, backoff_s=0.2)
    assert svc.health is None
    assert svc.endpoint is None
    assert svc.stop_grace_s == 5.0
    health = probed.health
    assert health is not None
    assert health.kind == "process"
    assert (health.interval_s, health.timeout_s, health.failures, health.start_period_s) == (
        1.0,
        1.0,
        3,
        30.0,
    )
    assert probed.endpoint is not None
    assert (probed.endpoint.protocol, probed.endpoint.host) == ("tcp", None)
    # Workshops may list no pairs yet.
    assert topology.loads("site: s\nworkshops: [{name: w}]").workshops[0].pairs == []


def test_models_are_frozen() -> None:
    site = topology.loads(SITE_YAML)
    with pytest.raises(ValidationError):
        site.site = "other"  # type: ignore[misc]


def test_a_pair_may_have_more_than_two_nodes_in_priority_order() -> None:
    d = site_data()
    pair_of(d)["nodes"].append({"name": "asm-c", "address": "127.0.0.13"})
    pair = topology.parse_site(d, "x").workshops[0].pairs[0]
    assert [pair.rank(n) for n in ("asm-a", "asm-b", "asm-c")] == [0, 1, 2]


@pytest.mark.parametrize(
    ("address", "stored"),
    [
        ("127.0.0.99", "127.0.0.99"),
        ("::1", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),  # IP addresses are stored in their canonical form
        ("fe80::1", "fe80::1"),
        ("host-b.plant.local", "host-b.plant.local"),
        ("asm-b", "asm-b"),
    ],
)
def test_ip_addresses_and_host_names_are_accepted(address: str, stored: str) -> None:
    d = site_data()
    pair_of(d)["nodes"][1]["address"] = address
    assert topology.parse_site(d, "x").workshops[0].pairs[0].nodes[1].address == stored


def test_fence_margin_of_exactly_half_the_ttl_is_allowed() -> None:
    assert Failover(lease_ttl_s=2.0, fence_margin_s=1.0).fence_after_s == 1.0


def test_epoch_is_allowed_in_an_active_service() -> None:
    d = site_data()
    service_of(d)["env"] = {"EPOCH": "{epoch}", "PAIR": "{pair.name}", "NODE": "{node.name}"}
    assert topology.parse_site(d, "x").workshops[0].pairs[0].services[0].env["EPOCH"] == "{epoch}"


def test_endpoints_with_their_own_host_may_share_a_port() -> None:
    d = site_data()
    pair_of(d)["services"].append(
        {"name": "other", "command": ["x"], "endpoint": {"port": 8080, "host": "10.1.1.1"}}
    )
    assert len(topology.parse_site(d, "x").workshops[0].pairs[0].services) == 2


# --- one path-named line per problem ---------------------------------------------------------

Edit = Callable[[Data], None]


def _set(path: Callable[[Data], Data], **values: Any) -> Edit:
    return lambda d: path(d).update(values)


def _node1(d: Data) -> Data:
    node: Data = pair_of(d)["nodes"][1]
    return node


def _failover(d: Data) -> Data:
    failover: Data = pair_of(d)["failover"]
    return failover


def _health(d: Data) -> Data:
    health: Data = service_of(d)["health"]
    return health


def _append(path: Callable[[Data], list[Any]], item: Any) -> Edit:
    return lambda d: path(d).append(item)


def _pop(path: Callable[[Data], Data], key: str) -> Edit:
    return lambda d: path(d).pop(key)


ERRORS: list[tuple[str, Edit, str]] = [
    # unknown fields (typos) at every level
    ("typo-top", _set(lambda d: d, sites="x"), "sites: Extra inputs are not permitted"),
    (
        "typo-workshop",
        _set(lambda d: d["workshops"][0], pair=[]),
        "workshops[0].pair: Extra inputs are not permitted",
    ),
    (
        "typo-pair",
        _set(pair_of, service=[]),
        f"{PAIR}.service: Extra inputs are not permitted",
    ),
    (
        "typo-node",
        _set(_node1, adress="127.0.0.12"),
        f"{PAIR}.nodes[1].adress: Extra inputs are not permitted",
    ),
    (
        "typo-failover",
        _set(_failover, lease_ttl=3),
        f"{PAIR}.failover.lease_ttl: Extra inputs are not permitted",
    ),
    (
        "typo-service",
        _set(service_of, critcal=True),
        f"{SERVICE}.critcal: Extra inputs are not permitted",
    ),
    (
        "typo-restart",
        _set(lambda d: service_of(d)["restart"], max_restart=3),
        f"{SERVICE}.restart.max_restart: Extra inputs are not permitted",
    ),
    (
        "typo-health",
        _set(_health, interval=1),
        f"{SERVICE}.health.interval: Extra inputs are not permitted",
    ),
    (
        "typo-endpoint",
        _set(lambda d: service_of(d)["endpoint"], proto="http"),
        f"{SERVICE}.endpoint.proto: Extra inputs are not permitted",
    ),
    # missing required fields
    ("missing-site", _pop(lambda d: d, "site"), "site: Field required"),
    ("missing-workshops", _pop(lambda d: d, "workshops"), "workshops: Field required"),
    ("missing-node-name", _pop(_node1, "name"), f"{PAIR}.nodes[1].name: Field required"),
    (
        "missing-node-address",
        _pop(_node1, "address"),
        f"{PAIR}.nodes[1].address: Field required",
    ),
    ("missing-command", _pop(service_of, "command"), f"{SERVICE}.command: Field required"),
    (
        "missing-endpoint-port",
        _pop(lambda d: service_of(d)["endpoint"], "port"),
        f"{SERVICE}.endpoint.port: Field required",
    ),
    # bad values
    (
        "bad-address",
        _set(_node1, address="not an address"),
        f"{PAIR}.nodes[1].address: 'not an address' is neither an IP address nor a host name",
    ),
    (
        "bad-address-underscore",
        _set(_node1, address="asm_b.local"),
        f"{PAIR}.nodes[1].address: 'asm_b.local' is neither an IP address nor a host name",
    ),
    (
        "bad-address-octet",
        _set(_node1, address="127.0.0.300"),
        f"{PAIR}.nodes[1].address: '127.0.0.300' is neither an IP address nor a host name",
    ),
    (
        "health-tcp-port-out-of-range",
        lambda d: service_of(d).update(health={"tcp": "127.0.0.1:99999"}),
        f"{SERVICE}.health: tcp must be HOST:PORT with a port from 1 to 65535",
    ),
    (
        "duplicate-address-across-workshops",
        _append(
            lambda d: d["workshops"],
            second_workshop(
                {
                    **other_pair(),
                    "nodes": [
                        {"name": "pnt-a", "address": "127.0.0.11"},
                        {"name": "pnt-b", "address": "127.0.0.22"},
                    ],
                }
            ),
        ),
        "(top level): duplicate node address '127.0.0.11' at workshops[0].pairs[0].nodes[0]"
        ".address, workshops[1].pairs[0].nodes[0].address",
    ),
    ("bad-name", _set(lambda d: d, site="plant 1"), "site: String should match pattern"),
    (
        "one-node",
        lambda d: pair_of(d)["nodes"].pop(),
        f"{PAIR}.nodes: List should have at least 2 items after validation, not 1",
    ),
    (
        "ttl-below-1",
        _set(_failover, lease_ttl_s=0.99),
        f"{PAIR}.failover.lease_ttl_s: Input should be greater than or equal to 1",
    ),
    (
        "fence-margin-over-half",
        _set(_failover, fence_margin_s=1.01),
        f"{PAIR}.failover: fence_margin_s (1.01) must be at most half of lease_ttl_s (2.0)",
    ),
    (
        "failback-unknown",
        _set(_failover, failback="sometimes"),
        f"{PAIR}.failover.failback: Input should be 'manual' or 'auto'",
    ),
    (
        "placement-unknown",
        _set(service_of, placement="both"),
        f"{SERVICE}.placement: Input should be 'active' or 'all'",
    ),
    (
        "empty-command",
        _set(service_of, command=[]),
        f"{SERVICE}.command: List should have at least 1 item",
    ),
    (
        "endpoint-port-range",
        _set(lambda d: service_of(d)["endpoint"], port=70000),
        f"{SERVICE}.endpoint.port: Input should be less than or equal to 65535",
    ),
    # health checks
    (
        "health-two-kinds",
        _set(_health, tcp="{node.address}:8080"),
        f"{SERVICE}.health: give one of tcp, http or command, not tcp and http",
    ),
    (
        "health-tcp-no-port",
        lambda d: service_of(d).update(health={"tcp": "{node.address}"}),
        f"{SERVICE}.health: tcp must be HOST:PORT with a port from 1 to 65535, "
        "got '{node.address}'",
    ),
    (
        "health-tcp-bad-port",
        lambda d: service_of(d).update(health={"tcp": "127.0.0.1:http"}),
        f"{SERVICE}.health: tcp must be HOST:PORT with a port from 1 to 65535, "
        "got '127.0.0.1:http'",
    ),
    (
        "health-http-not-a-url",
        _set(_health, http="{node.address}:8080/"),
        f"{SERVICE}.health: http must be an http:// or https:// URL, got '{{node.address}}:8080/'",
    ),
    (
        "health-http-wrong-scheme",
        _set(_health, http="ftp://{node.address}/"),
        f"{SERVICE}.health: http must be an http:// or https:// URL, got 'ftp://{{node.address}}/'",
    ),
    (
        "health-empty-command",
        lambda d: service_of(d).update(health={"command": []}),
        f"{SERVICE}.health: command must not be empty",
    ),
    (
        "health-timeout-zero",
        _set(_health, timeout_s=0),
        f"{SERVICE}.health.timeout_s: Input should be greater than 0",
    ),
    # placeholders
    (
        "placeholder-typo-in-command",
        _append(lambda d: service_of(d)["command"], "--name={node.nam}"),
        f"{SERVICE}: unknown placeholder {{node.nam}} in '--name={{node.nam}}'; known: "
        "{epoch}, {node.address}, {node.name}, {pair.name}",
    ),
    (
        "placeholder-typo-in-env",
        _set(service_of, env={"WHERE": "{pair}"}),
        f"{SERVICE}: unknown placeholder {{pair}} in '{{pair}}'",
    ),
    (
        "placeholder-typo-in-health",
        _set(_health, http="http://{node.adress}:8080/"),
        f"{SERVICE}: unknown placeholder {{node.adress}} in 'http://{{node.adress}}:8080/'",
    ),
    (
        "placeholder-typo-in-cwd",
        _set(service_of, cwd="/srv/{node}"),
        f"{SERVICE}: unknown placeholder {{node}} in '/srv/{{node}}'",
    ),
    (
        "epoch-in-placement-all",
        _set(service_of, placement="all", env={"EPOCH": "{epoch}"}),
        f"{SERVICE}: {{epoch}} in '{{epoch}}' is not available for placement: all",
    ),
    # duplicates within a pair
    (
        "duplicate-node-in-pair",
        _append(lambda d: pair_of(d)["nodes"], {"name": "asm-a", "address": "127.0.0.13"}),
        f"{PAIR}: duplicate node name 'asm-a' at nodes[0].name, nodes[2].name",
    ),
    (
        "duplicate-address-in-pair",
        _set(_node1, address="127.0.0.11"),
        f"{PAIR}: duplicate node address '127.0.0.11' at nodes[0].address, nodes[1].address",
    ),
    (
        "duplicate-service-in-pair",
        _append(lambda d: pair_of(d)["services"], {"name": "mes-api", "command": ["x"]}),
        f"{PAIR}: duplicate service name 'mes-api' at services[0].name, services[1].name",
    ),
    (
        "duplicate-endpoint-port",
        _append(
            lambda d: pair_of(d)["services"],
            {"name": "other", "command": ["x"], "endpoint": {"port": 8080}},
        ),
        f"{PAIR}: duplicate endpoint port '8080'"
        f" at services[0].endpoint.port, services[1].endpoint.port",
    ),
    # duplicates site-wide, across workshops
    (
        "duplicate-workshop",
        _append(lambda d: d["workshops"], {"name": "assembly"}),
        "(top level): duplicate workshop name 'assembly' at workshops[0].name, workshops[1].name",
    ),
    (
        "duplicate-pair-across-workshops",
        _append(lambda d: d["workshops"], second_workshop(other_pair(name="asm"))),
        "(top level): duplicate pair name 'asm'"
        " at workshops[0].pairs[0].name, workshops[1].pairs[0].name",
    ),
    (
        "duplicate-node-across-workshops",
        _append(lambda d: d["workshops"], second_workshop(other_pair(node_a="asm-a"))),
        "(top level): duplicate node name 'asm-a'"
        " at workshops[0].pairs[0].nodes[0].name, workshops[1].pairs[0].nodes[0].name",
    ),
    (
        "duplicate-service-across-workshops",
        _append(lambda d: d["workshops"], second_workshop(other_pair(service="mes-api"))),
        "(top level): duplicate service name 'mes-api'"
        " at workshops[0].pairs[0].services[0].name, workshops[1].pairs[0].services[0].name",
    ),
    (
        "no-workshops",
        _set(lambda d: d, workshops=[]),
        "workshops: List should have at least 1 item after validation, not 0",
    ),
]


@pytest.mark.parametrize(
    ("edit", "expected"), [(e, x) for _, e, x in ERRORS], ids=[i for i, _, _ in ERRORS]
)
def test_each_error_is_one_line_starting_with_its_path(edit: Edit, expected: str) -> None:
    d = site_data()
    edit(d)
    problems = problems_of(d)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_the_valid_site_passes_the_error_tables_base() -> None:
    # The table edits a valid site: each case fails for its own reason only.
    assert isinstance(topology.parse_site(site_data(), "x"), Site)


def test_all_problems_are_listed_and_the_message_names_the_source() -> None:
    d = site_data()
    _node1(d)["address"] = "not an address"
    _failover(d)["lease_ttl_s"] = 0.5
    service_of(d)["critcal"] = True
    d["workshops"].append({"name": "paint", "pairs": [{"name": "p", "nodes": []}]})
    with pytest.raises(TopologyError) as info:
        topology.parse_site(d, "plant.yaml")
    err = info.value
    assert err.source == "plant.yaml"
    paths = sorted(p.split(": ", 1)[0] for p in err.problems)
    assert paths == [
        f"{PAIR}.failover.lease_ttl_s",
        f"{PAIR}.nodes[1].address",
        f"{SERVICE}.critcal",
        "workshops[1].pairs[0].nodes",
    ]
    text = str(err)
    assert text.startswith("plant.yaml: invalid topology\n")
    assert all(f"\n  {p}" in text for p in err.problems)


def test_a_placeholder_error_names_every_unknown_placeholder() -> None:
    d = site_data()
    service_of(d)["command"] = ["run", "{node.nam}-{pair.nme}"]
    [problem] = problems_of(d)
    assert problem.startswith(f"{SERVICE}: unknown placeholder {{node.nam}}, {{pair.nme}} in ")


# --- YAML text, documents and files ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("site: plant-1\nworkshops: [\n", "line 3 column 1: YAML syntax error: "),
        ("site: plant-1\n  workshops: []\n", "line 2 column 12: YAML syntax error: "),
        ("site: [plant-1\n", "line 2 column 1: YAML syntax error: "),
        ("site: 'unclosed\n", "line 2 column 1: YAML syntax error: "),
    ],
)
def test_yaml_syntax_errors_name_line_and_column(text: str, expected: str) -> None:
    with pytest.raises(TopologyError) as info:
        topology.loads(text, "site.yaml")
    [problem] = info.value.problems
    assert problem.startswith(expected), problem
    assert info.value.source == "site.yaml"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just text", "42"])
def test_a_document_that_is_not_a_mapping_is_refused(text: str) -> None:
    with pytest.raises(TopologyError) as info:
        topology.loads(text)
    assert info.value.problems == ["(top level): expected a mapping with site and workshops"]


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(SITE_YAML)
    assert topology.load(path) == topology.loads(SITE_YAML)


def test_load_reports_the_path_of_an_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(SITE_YAML.replace("127.0.0.12", "not an address"))
    with pytest.raises(TopologyError) as info:
        topology.load(str(path))
    assert info.value.source == str(path)
    assert info.value.problems[0].startswith(f"{PAIR}.nodes[1].address: ")


def test_load_of_a_missing_file_says_it_cannot_read_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(TopologyError) as info:
        topology.load(path)
    assert info.value.source == str(path)
    assert info.value.problems == ["cannot read file: No such file or directory"]


def test_load_of_a_directory_says_it_cannot_read_it(tmp_path: Path) -> None:
    with pytest.raises(TopologyError) as info:
        topology.load(tmp_path)
    assert info.value.problems == ["cannot read file: Is a directory"]


def test_load_of_a_file_that_is_not_utf8_is_a_topology_error(tmp_path: Path) -> None:
    # BUG: Path.read_text raises UnicodeDecodeError, which load() does not catch.
    path = tmp_path / "site.yaml"
    path.write_bytes(SITE_YAML.replace("plant-1", "usine-\xe9").encode("latin-1"))
    with pytest.raises(TopologyError) as info:
        topology.load(path)
    assert info.value.problems[0].startswith("cannot read file: ")


def test_an_impossible_date_is_a_topology_error() -> None:
    # BUG: PyYAML builds timestamps with datetime.date and lets its ValueError through.
    with pytest.raises(TopologyError) as info:
        topology.loads("site: 2024-02-30\nworkshops: []\n")
    assert info.value.problems


# --- hypothesis --------------------------------------------------------------------------------

names = st.from_regex(NAME_PATTERN, fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(site=names, workshop=names, pair=names, node_a=names, node_b=names, service=names)
def test_names_matching_the_pattern_round_trip(
    site: str, workshop: str, pair: str, node_a: str, node_b: str, service: str
) -> None:
    if node_a == node_b:
        node_b = node_a[:-1] + ("x" if node_a[-1] != "x" else "y")
    data = {
        "site": site,
        "workshops": [
            {
                "name": workshop,
                "pairs": [
                    {
                        "name": pair,
                        "nodes": [
                            {"name": node_a, "address": "10.0.0.1"},
                            {"name": node_b, "address": "10.0.0.2"},
                        ],
                        "services": [{"name": service, "command": ["run", "{node.name}"]}],
                    }
                ],
            }
        ],
    }
    parsed = topology.loads(yaml.safe_dump(data))
    assert parsed.model_dump(exclude_defaults=True) == data
    # And what the site stores in etcd parses back to the same site.
    assert topology.parse_site(parsed.model_dump(mode="json"), "etcd") == parsed


@settings(max_examples=60, deadline=None)
@given(name=st.text(max_size=70).filter(lambda s: re.fullmatch(NAME_PATTERN, s) is None))
def test_names_not_matching_the_pattern_are_refused(name: str) -> None:
    d = site_data()
    pair_of(d)["name"] = name
    assert problems_of(d) == [f"{PAIR}.name: String should match pattern '{NAME_PATTERN}'"]


YAML_TOKENS = [
    "site:",
    "workshops:",
    "name:",
    "pairs:",
    "nodes:",
    "address:",
    "services:",
    "command:",
    "health:",
    "failover:",
    "lease_ttl_s:",
    "plant-1",
    "asm-a",
    "127.0.0.11",
    "{node.name}",
    "8080",
    "0.5",
    "true",
    "null",
    "~",
    "- ",
    " ",
    "  ",
    "\n",
    "\t",
    ":",
    ",",
    "[",
    "]",
    "{",
    "}",
    "'",
    '"',
    "&a ",
    "*a",
    "!!str ",
    "!!binary ",
    "!!python/name:os.system ",
    "? ",
    "|",
    ">",
    "#",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "\x00",
    "\ufeff",
]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map("".join),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.sampled_from(["site", "workshops", "name", "x"]), inner)
            ),
            max_leaves=20,
        ).map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    )
)
def test_any_text_either_parses_or_raises_topology_error(text: str) -> None:
    try:
        site = topology.loads(text)
    except TopologyError as err:
        assert err.problems
        assert all(isinstance(p, str) and p for p in err.problems)
    else:
        assert isinstance(site, Site)


# --- placeholders ------------------------------------------------------------------------------


def test_placeholder_values_without_and_with_an_epoch() -> None:
    site = topology.loads(SITE_YAML)
    pair = site.workshops[0].pairs[0]
    node = pair.nodes[1]
    assert placeholder_values(pair, node, None) == {
        "node.name": "asm-b",
        "node.address": "127.0.0.12",
        "pair.name": "asm",
    }
    assert placeholder_values(pair, node, 42) == {
        "node.name": "asm-b",
        "node.address": "127.0.0.12",
        "pair.name": "asm",
        "epoch": "42",
    }
    assert placeholder_values(pair, node, 0)["epoch"] == "0"


def test_expand_fills_a_service_command_and_health_check() -> None:
    site = topology.loads(SITE_YAML)
    pair = site.workshops[0].pairs[0]
    values = placeholder_values(pair, pair.nodes[0], 7)
    service = pair.services[0]
    assert [expand(a, values) for a in service.command] == [
        "python3",
        "-m",
        "http.server",
        "8080",
        "--bind",
        "127.0.0.11",
    ]
    assert service.health is not None and service.health.http is not None
    assert expand(service.health.http, values) == "http://127.0.0.11:8080/"
    assert expand("{pair.name}/{node.name}@{epoch}", values) == "asm/asm-a@7"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("", ""),
        ("{node.name}{node.name}", "a1a1"),
        ("{epoch}", "{epoch}"),  # no epoch given: left as written
        ("{unknown}", "{unknown}"),
        ("{ node.name }", "{ node.name }"),
        ("{{node.name}}", "{a1}"),
        ('{"json": 1}', '{"json": 1}'),
    ],
)
def test_expand_leaves_what_it_does_not_know(text: str, expected: str) -> None:
    assert expand(text, {"node.name": "a1"}) == expected


def test_expand_does_not_expand_twice() -> None:
    assert expand("{node.name}", {"node.name": "{epoch}", "epoch": "3"}) == "{epoch}"


@given(st.text().filter(lambda s: "{" not in s))
def test_expand_without_braces_is_the_identity(text: str) -> None:
    assert expand(text, {"node.name": "x", "epoch": "1"}) == text


@given(st.text(alphabet=st.characters(exclude_characters="{}")), st.integers(min_value=0))
def test_expanded_values_appear_verbatim(prefix: str, epoch: int) -> None:
    assert expand(prefix + "{epoch}", {"epoch": str(epoch)}) == prefix + str(epoch)


def test_health_texts_list_the_fields_that_placeholders_may_use() -> None:
    assert list(Health(tcp="{node.address}:1").texts()) == ["{node.address}:1"]
    assert list(Health(command=["check", "{pair.name}"]).texts()) == ["check", "{pair.name}"]
    assert list(Health().texts()) == []
    assert Health(command=["x"]).kind == "command"
    assert Health(tcp="h:1").kind == "tcp"


def test_topology_error_is_a_value_error() -> None:
    err = TopologyError("s", ["a: b"])
    assert isinstance(err, ValueError)
    assert err.problems == ["a: b"]
    assert str(err) == "s: invalid topology\n  a: b"


def test_a_short_lease_without_a_peer_path_is_valid_but_cautioned() -> None:
    d = site_data()
    _failover(d)["lease_ttl_s"] = 1
    site = topology.parse_site(d, "x")
    [caution] = site.cautions()
    assert caution.startswith("pair asm: lease_ttl_s 1 without a network: section")
    assert "0.5 s late" in caution
    pair_of(d)["network"] = {"peer_port": 7400}
    assert topology.parse_site(d, "x").cautions() == []
    _failover(d)["lease_ttl_s"] = 2
    del pair_of(d)["network"]
    assert topology.parse_site(d, "x").cautions() == []
