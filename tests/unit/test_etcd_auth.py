"""The etcd roles ``hapair etcd-auth apply`` computes from a site: each agent writes its
own node's and its own pair's keys only, an operator its commands, only an admin the
topology."""

from __future__ import annotations

from typing import Any

import pytest

from hapair.registry.console.etcd_auth_cmd import ROOT, Perm, Plan, plan, service_user
from hapair.shared import keys
from hapair.shared.topology import Site, parse_site

W, R = Perm.WRITE, Perm.READ


def pair(name: str, *services: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "nodes": [
            {"name": f"{name}-a", "address": f"127.0.{len(name)}.1"},
            {"name": f"{name}-b", "address": f"127.0.{len(name)}.2"},
        ],
        "services": list(services),
    }


SITE: Site = parse_site(
    {
        "site": "plant",
        "workshops": [
            {
                "name": "w1",
                "pairs": [
                    pair(
                        "asm",
                        {
                            "name": "mes-api",
                            "command": ["true"],
                            "endpoint": {"port": 8080, "protocol": "http"},
                        },
                    ),
                    pair("pkgg", {"name": "comm", "command": ["true"]}),
                ],
            }
        ],
    },
    "test",
)


@pytest.fixture
def p() -> Plan:
    return plan(SITE, operators=["alice", "carol"], registries=["reg-1", "reg-2"], admins=["bob"])


def test_an_agent_writes_its_own_node_and_its_own_pair_only(p: Plan) -> None:
    assert p.users["asm-a"] == ("hapair-agent-asm-a",)
    for key in (
        keys.node_status("asm-a"),
        keys.report("asm-a", "hapair-agent"),
        keys.leader("asm"),
        keys.members("asm"),
        keys.sync_standby("asm"),
        keys.recovery("asm"),
        keys.handover("asm"),
        keys.switchover("asm"),  # it consumes the request
        keys.endpoint("mes-api"),
        keys.event(1, "asm-a"),
    ):
        assert p.allows("asm-a", key, W), key
    for key in (
        keys.node_status("asm-b"),
        keys.leader("pkgg"),
        keys.members("pkgg"),
        keys.paused("asm"),  # the operator's
        keys.drained("asm-a"),  # the operator's
        keys.TOPOLOGY,
        keys.endpoint("other"),
        keys.report("asm-a", "mes-api"),  # the service's own
        keys.event(1, "asm-b"),  # another node's events
        keys.event(1, "alice"),  # an operator's
        f"{keys.EVENTS_PREFIX}{1:020d}-asm-a",  # the earlier layout: no writer's own
    ):
        assert not p.allows("asm-a", key, W), key
    # It reads what it watches: the topology, every pair's and node's keys.
    for key in (keys.TOPOLOGY, keys.leader("pkgg"), keys.node_status("pkgg-b")):
        assert p.allows("asm-a", key, R), key
    # An agent's role is never its pair's other node's.
    assert not p.allows("asm-b", keys.node_status("asm-a"), W)


def test_a_service_writes_its_own_report_and_reads_its_pair_leader(p: Plan) -> None:
    user = service_user("comm", "pkgg-a")
    assert user == "comm@pkgg-a"
    assert p.allows(user, keys.report("pkgg-a", "comm"), W)
    assert p.allows(user, keys.report("pkgg-b", "comm"), R)
    assert p.allows(user, keys.leader("pkgg"), R)
    assert p.allows(user, keys.TOPOLOGY, R)
    for key in (keys.report("pkgg-b", "comm"), keys.leader("pkgg"), keys.node_status("pkgg-a")):
        assert not p.allows(user, key, W), key
    assert not p.allows(user, keys.leader("asm"), R)


def test_an_operator_writes_commands_pause_drain_and_ack_never_the_topology(p: Plan) -> None:
    for key in (
        keys.switchover("asm"),
        keys.takeover("pkgg"),
        keys.paused("asm"),
        keys.recovery("pkgg"),
        keys.drained("asm-b"),
        keys.event(1, "alice"),
        keys.rollout("asm"),  # the rollout under way
        keys.restart("asm", "asm-a"),  # its restart request to a node of the pair
    ):
        assert p.allows("alice", key, W), key
    for key in (
        keys.TOPOLOGY,
        keys.leader("asm"),
        keys.handover("asm"),
        keys.node_status("asm-a"),
        keys.endpoint("mes-api"),
        keys.event(1, "asm-a"),  # a node's events
        keys.event(1, "carol"),  # another operator's
        keys.restart("asm", "pkgg-a"),  # a node of another pair
    ):
        assert not p.allows("alice", key, W), key
    assert p.allows("alice", keys.node_status("asm-a"), R)


def test_only_admins_apply_the_topology(p: Plan) -> None:
    assert p.users[ROOT] == (ROOT,) and p.users["bob"] == (ROOT,)
    writers = {user for user in p.users if p.allows(user, keys.TOPOLOGY, W)}
    assert writers == {ROOT, "bob"}


def test_a_registry_reads_everything_and_writes_its_heartbeats_and_admin_routes(p: Plan) -> None:
    assert p.allows("reg-1", keys.registry_heartbeat("reg-1", "x1"), W)
    assert not p.allows("reg-1", keys.registry_heartbeat("reg-2", "x1"), W)
    assert p.allows("reg-1", keys.paused("asm"), W)  # its admin routes
    assert p.allows("reg-1", keys.event(1, "x"), W)  # retention deletes old events
    assert not p.allows("reg-1", keys.TOPOLOGY, W)
    assert not p.allows("reg-1", keys.leader("asm"), W)
    assert p.allows("reg-1", keys.leader("asm"), R)


def test_the_plan_is_a_function_of_its_input_and_says_where_it_is_broad(p: Plan) -> None:
    assert plan(SITE, ["alice", "carol"], ["reg-1", "reg-2"], ["bob"]) == p
    assert any("registries" in note and "any event" in note for note in p.notes)
    # A name used for two kinds of rights is refused, not merged.
    with pytest.raises(ValueError, match="named twice"):
        plan(SITE, operators=["asm-a"])
    # A node gone from the site has no role left.
    smaller = {"site": "plant", "workshops": [{"name": "w1", "pairs": [pair("asm")]}]}
    assert "pkgg-a" not in plan(parse_site(smaller, "test")).users
