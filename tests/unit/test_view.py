"""SiteView: parsing the keys under /hapair/v1 into one snapshot, and the lookup rules."""

from __future__ import annotations

import json

from hapair.shared import keys, records
from hapair.shared.store import Kv
from hapair.shared.view import SiteView
from tests.support.site_records import site

_rev = iter(range(100, 10_000))


def kv(key: str, value: bytes | records.Record, create: int | None = None, lease: int = 0) -> Kv:
    raw = value.encode() if isinstance(value, records.Record) else value
    mod = next(_rev)
    return Kv(key, raw, create or mod, mod, lease)


def topo() -> Kv:
    return kv(keys.TOPOLOGY, records.TopologyDoc(site=site().model_dump(mode="json")))


def status(node: str, pair: str = "asm", healthy: bool = True, role: str = "standby") -> Kv:
    return kv(
        keys.node_status(node),
        records.NodeStatus(
            node=node,
            pair=pair,
            address="127.0.0.1",
            role=role,  # type: ignore[arg-type]
            healthy=healthy,
            services=[
                records.ServiceStatus(
                    name="mes-api", placement="active", state="running", restarts=2
                )
            ],
        ),
    )


def leader(pair: str, node: str, epoch: int) -> Kv:
    return kv(keys.leader(pair), records.Leader(node=node, since=1000.0), create=epoch, lease=7)


def endpoint(service: str, node: str, epoch: int, pair: str = "asm") -> Kv:
    return kv(
        keys.endpoint(service),
        records.EndpointRecord(
            service=service,
            pair=pair,
            node=node,
            host="127.0.0.11",
            port=8080,
            protocol="http",
            epoch=epoch,
        ),
    )


def test_lookup_answers_the_active_endpoint_with_its_epoch() -> None:
    published = endpoint("mes-api", "asm-a", 42)
    view = SiteView.from_kvs(
        [topo(), leader("asm", "asm-a", 42), published, status("asm-a", role="active")]
    )
    answer = view.lookup("mes-api")
    assert answer.status == 200
    assert answer.body == {
        "service": "mes-api",
        "pair": "asm",
        "node": "asm-a",
        "host": "127.0.0.11",
        "port": 8080,
        "protocol": "http",
        "epoch": 42,
        "revision": published.mod_revision,  # orders the endpoints of one epoch
    }
    assert answer.epoch == 42
    assert view.leaders["asm"].epoch == 42
    assert view.problems == ()


def test_lookup_unknown_and_undeclared_services_are_404() -> None:
    view = SiteView.from_kvs([topo()])
    assert view.lookup("nope").status == 404
    assert "unknown service 'nope'" in view.lookup("nope").body["error"]
    assert view.lookup("worker").status == 404
    assert "declares no endpoint" in view.lookup("worker").body["error"]


def test_lookup_says_why_no_endpoint_is_available() -> None:
    nobody_up = SiteView.from_kvs([topo()]).lookup("mes-api")
    assert nobody_up.status == 503
    assert nobody_up.body["error"] == (
        "pair asm has no active node (no agent is up on asm-a, asm-b, asm-c)"
    )

    standby_up = SiteView.from_kvs([topo(), status("asm-b")]).lookup("mes-api")
    assert standby_up.body["error"] == "pair asm has no active node"

    paused = SiteView.from_kvs([topo(), kv(keys.paused("asm"), records.Paused(by="op"))])
    assert "paused" in paused.lookup("mes-api").body["error"]

    unpublished = SiteView.from_kvs(
        [topo(), leader("asm", "asm-b", 50), endpoint("mes-api", "asm-a", 42)]
    )
    answer = unpublished.lookup("mes-api")
    assert answer.status == 503
    assert answer.body["error"] == (
        "endpoint not yet published: asm-b is active in pair asm at epoch 50"
    )


def test_garbage_is_reported_by_key_and_field_and_treated_as_absent() -> None:
    bad_status = json.dumps({"node": "asm-b", "pair": "asm", "address": "x", "role": "boss"})
    view = SiteView.from_kvs(
        [
            topo(),
            kv(keys.leader("asm"), b"\xff not json"),
            kv(keys.node_status("asm-b"), bad_status.encode()),
            kv(
                keys.endpoint("scada"),
                records.EndpointRecord(
                    service="other",
                    pair="pnt",
                    node="pnt-a",
                    host="h",
                    port=1,
                    protocol="tcp",
                    epoch=9,
                ),
            ),
            kv(keys.drained("asm-c"), b'{"at": 5}'),
        ]
    )
    assert view.leaders == {} and view.statuses == {} and view.endpoints == {}
    assert view.drained == {}
    problems = {(p.key, p.problem.split(":")[0]) for p in view.problems}
    assert any(k == keys.leader("asm") and p.startswith("not JSON") for k, p in problems)
    assert (keys.node_status("asm-b"), "role") in problems
    assert (keys.endpoint("scada"), "service") in problems
    assert (keys.drained("asm-c"), "by") in problems
    assert view.lookup("mes-api").status == 503  # the garbage leader is not believed


def test_invalid_topology_is_a_problem_and_published_endpoints_still_answer() -> None:
    broken = records.TopologyDoc(site={"site": "plant-1", "workshops": [{"name": "-bad"}]})
    view = SiteView.from_kvs(
        [kv(keys.TOPOLOGY, broken), leader("asm", "asm-a", 42), endpoint("mes-api", "asm-a", 42)]
    )
    assert view.site is None
    assert any(p.problem.startswith("site.workshops[0].name:") for p in view.problems)
    assert view.lookup("mes-api").status == 200


def test_unchanged_keys_are_not_parsed_again() -> None:
    status_kv, topo_kv = status("asm-a"), topo()
    first = SiteView.from_kvs([topo_kv, status_kv])
    second = SiteView.from_kvs([topo_kv, status_kv, status("asm-b")], previous=first)
    assert second.statuses["asm-a"] is first.statuses["asm-a"]
    assert second.site is first.site
    assert set(second.statuses) == {"asm-a", "asm-b"}


def test_only_the_newest_events_are_kept_oldest_first() -> None:
    events = [
        kv(keys.event(1_000 + i, "asm-a"), records.Event(kind="elected", reason=str(i)))
        for i in range(10)
    ]
    view = SiteView.from_kvs(reversed(events), recent_events=3)
    assert [e.reason for e in view.events.values()] == ["7", "8", "9"]


def test_eligible_standbys_follow_priority_and_skip_drained_down_unhealthy() -> None:
    view = SiteView.from_kvs(
        [
            topo(),
            leader("asm", "asm-a", 42),
            status("asm-a", role="active"),
            status("asm-b", healthy=False),
            status("asm-c"),
        ]
    )
    pair = view.pair("asm")
    assert pair is not None
    assert [n.name for n in view.eligible_standbys(pair)] == ["asm-c"]
    assert view.cannot_take_over(pair, "asm-a") == "asm-a is already active"
    assert view.cannot_take_over(pair, "asm-b") == "asm-b is not healthy"
    drained = SiteView.from_kvs([topo(), kv(keys.drained("asm-c"), records.Drained(by="op"))])
    assert drained.cannot_take_over(pair, "asm-c") == "asm-c is drained"
    assert drained.cannot_take_over(pair, "asm-b") == "asm-b is down (no agent status)"


def test_to_json_describes_every_pair_node_and_endpoint() -> None:
    view = SiteView.from_kvs(
        [
            topo(),
            leader("asm", "asm-a", 42),
            endpoint("mes-api", "asm-a", 42),
            status("asm-a", role="active"),
            status("asm-b"),
            kv(keys.drained("asm-c"), records.Drained(by="op", reason="disk swap")),
            kv(keys.paused("pnt"), records.Paused(by="op", reason="maintenance")),
            kv(keys.event(5, "asm-a"), records.Event(kind="elected", pair="asm", node="asm-a")),
        ],
        revision=77,
    )
    doc = view.to_json()
    json.dumps(doc)  # plain JSON all the way down
    assert doc["site"] == "plant-1" and doc["revision"] == 77
    assembly, paint = doc["workshops"]
    asm = assembly["pairs"][0]
    assert (asm["active"], asm["epoch"], asm["since"], asm["paused"]) == ("asm-a", 42, 1000.0, None)
    nodes = {n["name"]: n for n in asm["nodes"]}
    assert nodes["asm-a"]["role"] == "active" and nodes["asm-a"]["up"] is True
    assert nodes["asm-a"]["services"][0] == {
        "name": "mes-api",
        "state": "running",
        "restarts": 2,
        "placement": "active",
        "detail": None,
    }
    assert nodes["asm-c"]["up"] is False and nodes["asm-c"]["role"] == "down"
    assert nodes["asm-c"]["drained"]["reason"] == "disk swap"
    assert asm["endpoints"] == [
        {
            "service": "mes-api",
            "status": 200,
            "node": "asm-a",
            "host": "127.0.0.11",
            "port": 8080,
            "protocol": "http",
            "epoch": 42,
            "error": None,
        }
    ]
    pnt = paint["pairs"][0]
    assert pnt["paused"]["reason"] == "maintenance" and pnt["active"] is None
    assert pnt["endpoints"][0]["status"] == 503
    assert [e["kind"] for e in doc["events"]] == ["elected"]
    assert doc["problems"] == []
