"""A rollout's plan, its refusals and how its steps stand: pure functions of the site's
state (``shared/rollout_plan.py``), the agent's judgement of a restart request
(``workshop_agent/rollout.py``) and the rule that a new package version alone never
restarts a running copy (``workshop_agent/supervisor.py``)."""

from __future__ import annotations

import itertools
from typing import Any

from hapair.shared import keys, records
from hapair.shared.rollout_plan import (
    make_plan,
    not_installed,
    refusal,
    running_versions,
    services_up,
)
from hapair.shared.store import Kv
from hapair.shared.topology import Pair, parse_site
from hapair.shared.view import SiteView
from hapair.workshop_agent.rollout import refusal as restart_refusal
from hapair.workshop_agent.supervisor import restarts_for

NOW = 1_700_000_000.0
SHA1, SHA2 = "a" * 64, "b" * 64
V1, V2 = f"1.0-{SHA1[:12]}", f"2.0-{SHA2[:12]}"
_rev = itertools.count(100)


def package(version: str, sha: str) -> dict[str, Any]:
    return {"version": version, "url": f"file:///srv/app-{version}.tar.gz", "sha256": sha}


def site(version: str = "2.0", sha: str = SHA2, database: bool = False) -> dict[str, Any]:
    pkg = package(version, sha)
    services = [
        {"name": "web", "command": ["{package.dir}/bin/web"], "package": pkg},
        {"name": "warm", "placement": "all", "command": ["{package.dir}/bin/warm"], "package": pkg},
        {"name": "plain", "placement": "all", "command": ["/bin/sleep", "600"]},
    ]
    nodes = [{"name": "a", "address": "127.0.0.1"}, {"name": "b", "address": "127.0.0.2"}]
    pair: dict[str, Any] = {"name": "p", "nodes": nodes, "services": services}
    if database:
        pair["database"] = {
            "security": "none",
            "data_dir": "/var/lib/hapair/pg",
            "auth": {
                "superuser_password_file": "/etc/hapair/su",
                "replication_password_file": "/etc/hapair/repl",
            },
        }
    return {"site": "t", "workshops": [{"name": "w", "pairs": [pair]}]}


def kv(key: str, value: records.Record, create: int | None = None) -> Kv:
    mod = next(_rev)
    return Kv(key, value.encode(), create or mod, mod, 0)


def status(
    node: str,
    role: str,
    runs: dict[str, str | None],
    holds: tuple[str, ...] = (V1, V2),
    healthy: bool = True,
    state: str = "running",
) -> Kv:
    services = [
        records.ServiceStatus(
            name=name,
            placement="active" if name == "web" else "all",
            state=state if name != "plain" else "running",  # type: ignore[arg-type]
            package=version,
        )
        for name, version in runs.items()
    ]
    packages = [
        records.PackageStatus(
            service=s,
            version="2.0",
            state="installed" if V2 in holds else "installing",
            installed=list(holds),
        )
        for s in ("web", "warm")
    ]
    return kv(
        keys.node_status(node),
        records.NodeStatus(
            node=node,
            pair="p",
            address="127.0.0.1",
            role=role,  # type: ignore[arg-type]
            healthy=healthy,
            services=services,
            packages=packages,
        ),
    )


def view(*extra: Kv, doc: dict[str, Any] | None = None, leader: str = "a") -> SiteView:
    parsed = parse_site(doc or site(), "test")
    kvs = [
        kv(keys.TOPOLOGY, records.TopologyDoc(site=parsed.model_dump(mode="json"))),
        kv(keys.leader("p"), records.Leader(node=leader, since=NOW), create=42),
        *extra,
    ]
    return SiteView.from_kvs(kvs)


def the_pair(v: SiteView) -> Pair:
    found = v.pair("p")
    assert found is not None
    return found


A_RUNS_V1 = {"web": V1, "warm": V1, "plain": None}
B_RUNS_V1 = {"warm": V1, "plain": None}


def both_on_v1() -> SiteView:
    return view(status("a", "active", A_RUNS_V1), status("b", "standby", B_RUNS_V1))


def test_the_plan_restarts_the_standby_switches_over_then_restarts_the_old_active() -> None:
    v = both_on_v1()
    assert refusal(v, the_pair(v), None, NOW) is None
    plan = make_plan(v, the_pair(v), None)
    assert (plan.active, plan.target, plan.standbys, plan.epoch) == ("a", "b", ("b",), 42)
    assert plan.declared == {"web": V2, "warm": V2}
    assert plan.shared == ("warm",)  # a service without a package is not touched
    assert plan.restart_on("b") == ("warm",) and plan.restart_on("a") == ("warm",)
    assert plan.back_to("a", ("web", "warm")) == {"web": V1, "warm": V1}
    assert not plan.up_to_date
    assert plan.steps() == [
        f"wait until every node of pair p holds warm {V2}, web {V2}",
        "restart warm on standby b and see them up",
        "switch pair p over from a to b, and see its services up on the declared versions",
        "restart warm on a, then a standby",
    ]


def test_a_pair_on_the_declared_versions_everywhere_is_up_to_date() -> None:
    v = view(
        status("a", "active", {"web": V2, "warm": V2}),
        status("b", "standby", {"warm": V2}),
    )
    plan = make_plan(v, the_pair(v), None)
    assert plan.up_to_date and plan.restart_on("a") == () and plan.restart_on("b") == ()


def test_paused_awaiting_pending_or_without_a_standby_is_refused_with_the_reason() -> None:
    a, b = status("a", "active", A_RUNS_V1), status("b", "standby", B_RUNS_V1)
    paused = view(a, b, kv(keys.paused("p"), records.Paused(by="op")))
    assert refusal(paused, the_pair(paused), None, NOW) == "pair p is paused; resume it first"
    rec = records.Recovery(epoch=42, cause="lease expired", to_node="a", held=["web"])
    awaiting = view(a, b, kv(keys.recovery("p"), rec))
    why = refusal(awaiting, the_pair(awaiting), None, NOW)
    assert why is not None and "awaits an operator's acknowledgement" in why
    # Acknowledged, or for an earlier term: no longer in the way.
    acked = view(a, b, kv(keys.recovery("p"), rec.model_copy(update={"state": "acknowledged"})))
    assert refusal(acked, the_pair(acked), None, NOW) is None
    pending = view(a, b, kv(keys.switchover("p"), records.Switchover(at=NOW - 1)))
    why = refusal(pending, the_pair(pending), None, NOW)
    assert why is not None and "switchover of pair p is pending" in why
    sick = view(a, status("b", "standby", B_RUNS_V1, healthy=False))
    why = refusal(sick, the_pair(sick), None, NOW)
    assert why is not None and why.startswith("pair p has no eligible standby")
    assert "b is not healthy" in why
    drained = view(a, b, kv(keys.drained("b"), records.Drained(by="op")))
    why = refusal(drained, the_pair(drained), None, NOW)
    assert why is not None and "b is drained" in why
    down = view(a)
    why = refusal(down, the_pair(down), None, NOW)
    assert why is not None and "b is down" in why
    no_leader = SiteView.from_kvs(
        [kv(keys.TOPOLOGY, records.TopologyDoc(site=parse_site(site(), "t").model_dump()))]
    )
    assert refusal(no_leader, the_pair(no_leader), None, NOW) == "pair p has no active node"


def test_a_database_pair_switches_to_its_synchronous_standby_only() -> None:
    doc = site(database=True)
    v = view(status("a", "active", A_RUNS_V1), status("b", "standby", B_RUNS_V1), doc=doc)
    sync = records.SyncState(primary="a", sync=["b"], epoch=42)
    assert refusal(v, the_pair(v), sync, NOW) is None
    assert make_plan(v, the_pair(v), sync).target == "b"
    degraded = records.SyncState(primary="a", sync=[], degraded=True, epoch=42)
    why = refusal(v, the_pair(v), degraded, NOW)
    assert why is not None and "b is not the pair's synchronous database standby" in why


def test_step_one_waits_for_every_node_to_hold_the_declared_versions() -> None:
    v = view(status("a", "active", A_RUNS_V1), status("b", "standby", B_RUNS_V1, holds=(V1,)))
    plan = make_plan(v, the_pair(v), None)
    assert not_installed(v, plan, ("a", "b")) == [
        f"b: warm {V2} installing",
        f"b: web {V2} installing",
    ]
    assert not_installed(both_on_v1(), plan, ("a", "b")) == []


def test_services_up_means_running_on_the_asked_version_and_names_a_failure() -> None:
    on_v2 = records.decode(records.NodeStatus, status("b", "standby", {"warm": V2}).value, "k")
    assert services_up(on_v2, {"warm": V2}, ("warm",)) == (True, None)
    assert services_up(on_v2, {"warm": V1}, ("warm",)) == (False, None)
    failing = records.decode(
        records.NodeStatus, status("b", "standby", {"warm": V2}, state="restarting").value, "k"
    )
    up, why = services_up(failing, {"warm": V2}, ("warm",))
    assert not up and why == "warm restarting"
    assert services_up(None, {}, ("warm",)) == (False, "its agent is down")
    assert running_versions(on_v2) == {"warm": V2}


def restart_request(**kw: Any) -> records.RestartRequest:
    fields: dict[str, Any] = {
        "rollout": "r1",
        "node": "b",
        "epoch": 42,
        "versions": {"warm": V2},
        "restart": ["warm"],
    }
    return records.RestartRequest(**(fields | kw))


def test_a_node_takes_up_a_restart_request_of_its_term_for_versions_it_holds() -> None:
    holds = {("warm", V1), ("warm", V2)}

    def installed(service: str, version: str) -> bool:
        return (service, version) in holds

    assert restart_refusal(restart_request(), "b", 42, None, installed) is None
    why = restart_refusal(restart_request(), "b", 43, None, installed)
    assert why == "stale: judged at epoch 42, the pair is at epoch 43"
    why = restart_refusal(restart_request(), "b", None, None, installed)
    assert why == "stale: judged at epoch 42, the pair is at no active node"
    why = restart_refusal(restart_request(), "b", 42, 42, installed)
    assert why is not None and "b is the active node" in why
    # The active may be pinned (for its next start), never restarted.
    assert restart_refusal(restart_request(restart=[]), "b", 42, 42, installed) is None
    why = restart_refusal(restart_request(versions={"warm": "3.0-cccc"}), "b", 42, None, installed)
    assert why == "not installed on b: warm 3.0-cccc"
    assert restart_refusal(restart_request(), "a", 42, None, installed) is not None


def test_only_a_change_beyond_the_package_restarts_a_running_copy() -> None:
    old = next(parse_site(site("1.0", SHA1), "t").pairs()).services
    new = next(parse_site(site("2.0", SHA2), "t").pairs()).services
    web_old, web_new = old[0], new[0]
    assert web_old != web_new
    assert not restarts_for(web_old, web_new)
    installs = web_new.model_copy(
        update={"package": web_new.package.model_copy(update={"install": None})}  # type: ignore[union-attr]
    )
    assert not restarts_for(web_old, installs)
    assert restarts_for(web_old, web_old.model_copy(update={"command": ["/bin/true"]}))
    assert restarts_for(web_old, None)


def test_a_rollback_pins_what_ran_before_or_what_the_active_ran_if_held() -> None:
    plan = make_plan(both_on_v1(), the_pair(both_on_v1()), None)
    both = {"web": frozenset({V1, V2}), "warm": frozenset({V1, V2})}
    # b never ran web: it is pinned to the active's, so a takeover there runs it too.
    assert plan.pins_back("b", both) == {"web": V1, "warm": V1}
    assert plan.pins_back("b", {"warm": frozenset({V1})}) == {"warm": V1}
