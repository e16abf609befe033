"""Package drift: a node that lacks a version the site names is chosen last, and shown.

The pure choice (``decide``), the observer reading peers' statuses (garbage included),
the operator's switchover check and views, and what a node keeps on disk."""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from hapair.registry.console.status import render as render_status
from hapair.registry.console.top.control import handle
from hapair.registry.console.top.state import Connection, Selection
from hapair.registry.console.top.view import render as render_top
from hapair.shared import admin, drift, keys, records
from hapair.shared.log import EventLog
from hapair.shared.records import NodeStatus, PackageStatus, ServiceStatus
from hapair.shared.store import Kv
from hapair.shared.topology import Service
from hapair.shared.view import SiteView
from hapair.workshop_agent.decide import Campaign, Decision, Handover, RejectSwitchover, decide
from hapair.workshop_agent.observation import (
    LeaderView,
    Lost,
    Observation,
    PeerView,
    SwitchoverView,
)
from hapair.workshop_agent.observe import PairObserver
from hapair.workshop_agent.package_archive import MARKER, Held, to_remove
from hapair.workshop_agent.packages import SHARED, Packages
from hapair.workshop_agent.run_as import ServiceUsers
from tests.unit.test_decide import PAIR as DECIDE_PAIR
from tests.unit.test_decide import obs as decide_obs

SHA = "ab" * 32
V2 = f"2.0-{SHA[:12]}"
V1 = f"1.0-{'cd' * 6}"
# The decision's tests' pair of three, with a service from a package and one without.
PAIR = DECIDE_PAIR.model_copy(
    update={
        "services": [
            Service.model_validate(
                {
                    "name": "app",
                    "command": ["{package.dir}/bin/app"],
                    "package": {"version": "2.0", "url": "file:///m/app.tgz", "sha256": SHA},
                }
            ),
            Service(name="plain", command=["sleep", "9"]),
        ]
    }
)
TTL = PAIR.failover.lease_ttl_s
DELAY = PAIR.failover.campaign_delay_s
MINE = LeaderView("a", 5, 7)
HOLDS = PeerView("standby", True)
DRIFTED = PeerView("standby", True, lacks=("app",))


def obs(me: str = "a", **kw: Any) -> Observation:
    """As the decision's own tests build one, for the pair above."""
    return replace(decide_obs(me, pair=PAIR, seen_leader=True), **kw)


def handover_to(d: Decision) -> str | None:
    found = [a for a in d.actions if isinstance(a, Handover)]
    return found[0].to if found else None


def campaigns(d: Decision) -> bool:
    return any(isinstance(a, Campaign) for a in d.actions)


# ---- the pure choice --------------------------------------------------------------


def test_after_a_crash_the_node_holding_the_version_campaigns_first() -> None:
    """a is gone; b (preferred) lacks app 2.0, c holds it: c campaigns at once, b waits
    for c's turn and a whole lease more, then steps in only if nobody took over."""
    c = obs("c", peers={"b": DRIFTED})
    assert campaigns(decide(c))
    b = obs("b", peers={"c": HOLDS}, lacks=("app",))
    waiting = decide(b)
    assert not campaigns(waiting)
    assert "lacks the package version the site names of app: c may take over first" in (
        waiting.reason
    )
    assert not campaigns(decide(replace(b, now=100.0 + DELAY + TTL - 0.01)))
    late = decide(replace(b, now=100.0 + DELAY + TTL))
    assert campaigns(late) and "campaigning without the version of app" in late.reason


def test_at_a_cold_start_a_node_holding_the_version_still_gives_the_main_time_to_start() -> None:
    """A main server lacking the declared version as it starts is most often installing
    it (every node is at a pair's first start): a secondary that holds it still gives it
    the cold start's two lease TTLs, so the main wins when both start together. A main
    that stays drifted may so win a cold start, after its own wait for b."""
    cold = {"seen_leader": False, "started_at": 100.0}
    b = obs("b", peers={"a": DRIFTED}, **cold)
    assert decide(b).reason == "no active node; giving the main server time to start"
    assert campaigns(decide(replace(b, now=100.0 + 2 * TTL)))
    a = obs("a", peers={"b": HOLDS}, lacks=("app",), **cold)
    assert campaigns(decide(replace(a, now=100.0 + DELAY + TTL)))


def test_with_every_standby_drifted_priority_decides_and_nobody_waits_longer() -> None:
    b = obs("b", peers={"c": DRIFTED}, lacks=("app",))
    assert campaigns(decide(b))
    c = obs("c", peers={"b": DRIFTED}, lacks=("app",))
    assert not campaigns(decide(c))  # b first, as without packages
    assert campaigns(decide(replace(c, now=100.0 + DELAY)))


def test_the_only_standby_drifted_takes_over_at_once() -> None:
    assert campaigns(decide(obs("b", lacks=("app",))))


def test_a_peer_without_a_status_or_not_eligible_is_never_waited_for() -> None:
    unhealthy = PeerView("standby", False)
    b = obs("b", peers={"c": unhealthy}, lacks=("app",))
    assert campaigns(decide(b))
    assert campaigns(decide(obs("b", drained=frozenset({"c"}), peers={"c": HOLDS}, lacks=("app",))))


def test_an_untargeted_switchover_goes_to_a_node_holding_the_version() -> None:
    o = obs(
        term=5,
        leader=MINE,
        services_up=True,
        peers={"b": DRIFTED, "c": HOLDS},
        switchover=SwitchoverView("r1", None),
    )
    assert handover_to(decide(o)) == "c"


def test_a_planned_move_to_a_drifted_node_is_refused_while_a_node_holds_the_version() -> None:
    active = obs(term=5, leader=MINE, services_up=True, peers={"b": DRIFTED})
    untargeted = decide(replace(active, switchover=SwitchoverView("r1", None)))
    assert [type(a) for a in untargeted.actions] == [RejectSwitchover]
    assert "b does not hold the package version the site names (app 2.0); a holds every one" in (
        untargeted.reason
    )
    targeted = decide(
        replace(active, peers={"b": DRIFTED, "c": HOLDS}, switchover=SwitchoverView("r2", "b"))
    )
    assert [type(a) for a in targeted.actions] == [RejectSwitchover]
    assert targeted.reason.endswith("(app 2.0); a, c hold every one")
    # Drained: it stays rather than hand over to b.
    assert handover_to(decide(replace(active, drained=frozenset({"a"})))) is None
    # Failback to a drifted main, likewise.
    back = obs(
        "b",
        term=5,
        leader=LeaderView("b", 5, 7),
        services_up=True,
        peers={"a": PeerView("standby", True, healthy_since=0.0, lacks=("app",))},
        pair=PAIR.model_copy(
            update={"failover": PAIR.failover.model_copy(update={"failback": "auto"})}
        ),
    )
    assert handover_to(decide(back)) is None
    assert (
        handover_to(decide(replace(back, peers={"a": replace(back.peers["a"], lacks=())}))) == "a"
    )


def test_a_drifted_active_may_hand_over_to_a_drifted_node() -> None:
    o = obs(
        term=5,
        leader=MINE,
        services_up=True,
        lacks=("app",),
        peers={"b": DRIFTED},
        switchover=SwitchoverView("r1", "b"),
    )
    assert handover_to(decide(o)) == "b"


def test_only_a_refusal_for_the_targets_packages_asks_etcd_what_it_holds() -> None:
    """The active confirms a refusal that names its target against etcd before dropping
    the request. Seen down by a view that lags, the target is confirmed by being up,
    whatever it holds: the current view decides, and where every node lacks the version
    the move goes ahead. Refused for lacking one, it is confirmed by holding them all."""
    active = obs(term=5, leader=MINE, services_up=True, lacks=("app",), peers={"b": DRIFTED})
    down = decide(replace(active, switchover=SwitchoverView("r1", "c")))
    assert down.actions == (RejectSwitchover("r1", "c is down (no agent status)", "c"),)
    caught_up = replace(active, peers={"b": DRIFTED, "c": DRIFTED})
    assert handover_to(decide(replace(caught_up, switchover=SwitchoverView("r1", "c")))) == "c"
    holding = decide(replace(caught_up, lacks=(), switchover=SwitchoverView("r1", "c")))
    [refusal] = holding.actions
    assert isinstance(refusal, RejectSwitchover)
    assert (refusal.target, refusal.lacks) == ("c", True)


def test_an_unplanned_move_prefers_a_holder_and_else_takes_a_drifted_node() -> None:
    lost = {"plc-1": Lost(since=0.0, grace_s=1.0)}
    reaching = {
        "b": PeerView("standby", True, reaches=frozenset({"plc-1"}), lacks=("app",)),
        "c": PeerView("standby", True, reaches=frozenset({"plc-1"})),
    }
    o = obs(term=5, leader=MINE, services_up=True, lost=lost, peers=reaching)
    assert handover_to(decide(o)) == "c"
    assert handover_to(decide(replace(o, peers={"b": reaching["b"]}))) == "b"


# ---- what the observer reads --------------------------------------------------------


def status_kv(node: str, value: dict[str, Any] | bytes) -> Kv:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return Kv(keys.node_status(node), raw, 10, 11, 0)


def status_of(node: str, packages: list[dict[str, Any]] | None) -> dict[str, Any]:
    found: dict[str, Any] = {"node": node, "pair": "p", "address": "x", "role": "standby"}
    if packages is not None:
        found["packages"] = packages
    return found


@pytest.mark.parametrize(
    ("packages", "lacks"),
    [
        ([{"service": "app", "version": "2.0", "state": "installed", "installed": [V2, V1]}], ()),
        ([{"service": "app", "version": "2.0", "state": "failed", "installed": [V1]}], ("app",)),
        (None, ("app",)),  # an agent that publishes no packages holds none
        ([], ("app",)),
        (
            [{"service": "other", "version": "2.0", "state": "installed", "installed": [V2]}],
            ("app",),
        ),
        # Claims "installed" for another build of 2.0 (another sha256): not the one named.
        (
            [{"service": "app", "version": "2.0", "state": "installed", "installed": ["2.0-0"]}],
            ("app",),
        ),
    ],
)
def test_a_peer_holds_only_what_its_status_lists(
    packages: list[dict[str, Any]] | None, lacks: tuple[str, ...]
) -> None:
    observer = PairObserver("a", EventLog("test"))
    nodes = {keys.node_status("b"): status_kv("b", status_of("b", packages))}
    assert observer.observe(PAIR, {}, nodes, 100.0).peers["b"].lacks == lacks


@pytest.mark.parametrize(
    "packages",
    [
        "garbage",
        [{"service": "app"}],
        [{"service": "app", "version": "2.0", "state": "gone"}],
        [{"service": "app", "version": "2.0", "state": "installed", "installed": [1]}],
    ],
)
def test_a_garbage_packages_field_is_no_status_at_all(packages: Any) -> None:
    observer = PairObserver("c", EventLog("test"))
    raw = status_of("b", None) | {"packages": packages}
    nodes = {keys.node_status("b"): status_kv("b", raw)}
    state = observer.observe(PAIR, {}, nodes, 100.0)
    assert "b" not in state.peers
    # So c, which holds the version, does not wait for b; b is simply absent.
    assert campaigns(decide(obs("c", peers=state.peers)))


# ---- the alarm's words ----------------------------------------------------------------


def test_the_alarm_names_each_missing_version_and_why() -> None:
    failed = PackageStatus(
        service="app", version="2.0", state="failed", installed=[V1], detail="sha256 mismatch"
    )
    assert drift.problems(PAIR, [failed]) == [
        "package drift: app 2.0 not installed here (failed: sha256 mismatch)"
    ]
    assert drift.problems(PAIR, []) == ["package drift: app 2.0 not installed here (not reported)"]
    held = PackageStatus(service="app", version="2.0", state="installed", installed=[V2])
    assert drift.problems(PAIR, [held]) == []


# ---- the operator's side ----------------------------------------------------------------


def view_of(lacking: dict[str, bool], active: str = "a") -> SiteView:
    doc = records.TopologyDoc(
        site={"site": "s", "workshops": [{"name": "w", "pairs": [PAIR.model_dump(mode="json")]}]}
    )
    kvs = [
        Kv(keys.TOPOLOGY, doc.encode(), 1, 1, 0),
        Kv(keys.leader("p"), records.Leader(node=active).encode(), 5, 5, 7),
    ]
    for i, (node, lacks) in enumerate(lacking.items()):
        status = NodeStatus(
            node=node,
            pair="p",
            address="x",
            role="active" if node == active else "standby",
            packages=[
                PackageStatus(
                    service="app",
                    version="2.0",
                    state="failed" if lacks else "installed",
                    installed=[V1] if lacks else [V2, V1],
                    detail="file missing" if lacks else None,
                )
            ],
            services=[
                ServiceStatus(name="app", placement="active", state="running", pid=9, package=V1)
            ]
            if node == active
            else [],
        )
        kvs.append(Kv(keys.node_status(node), status.encode(), 10 + i, 10 + i, 0))
    return SiteView.from_kvs(kvs, revision=99)


def test_a_switchover_to_a_drifted_node_is_refused_before_anything_is_written() -> None:
    view = view_of({"a": False, "b": True, "c": False})
    pair = view.pair("p")
    assert pair is not None
    with pytest.raises(admin.AdminError, match="b does not hold the package version"):
        admin._switchover_guards(view, pair, "b")
    admin._switchover_guards(view, pair, "c")
    admin._switchover_guards(view, pair, None)  # c: the agent picks it first
    only_b = view_of({"a": False, "b": True})
    with pytest.raises(admin.AdminError, match="no standby that holds every package version"):
        admin._switchover_guards(only_b, pair, None)
    # All drifted: none is worse than another.
    admin._switchover_guards(view_of({"a": True, "b": True}), pair, "b")


def test_status_shows_per_node_declared_held_and_running_versions() -> None:
    report = view_of({"a": False, "b": True}).report()
    nodes = report.workshops[0].pairs[0].nodes
    assert [n.drift for n in nodes] == [[], ["app"], []]
    assert nodes[0].packages[0].running == V1 and nodes[1].packages[0].state == "failed"
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(render_status(report, now=1000.0))
    text = console.export_text()
    assert "app 2.0 installed, holds 2.0 1.0, runs 1.0" in text
    assert "app 2.0 failed: file missing, holds 1.0" in text
    assert "package drift: app" in text


def test_top_flags_the_drifted_pair_in_its_alarms_and_detail() -> None:
    report = view_of({"a": False, "b": True}).report()
    console = Console(record=True, width=80, height=24, file=io.StringIO())
    live = Connection(url="http://r", live=True, since=900.0, read_at=999.5)
    console.print(render_top(report, live, 1000.0, Selection()))
    lines = console.export_text().splitlines()
    assert "PACKAGE DRIFT: p" in lines[1]
    assert any(line.startswith("> p ") and "drift" in line for line in lines)
    assert any("b " in line and "package drift: app" in line for line in lines)


# ---- what a node keeps on disk ----------------------------------------------------------


def test_a_version_a_process_runs_from_is_kept_whatever_its_age() -> None:
    held = [Held("1", 10.0), Held("2", 20.0), Held("3", 30.0)]
    assert to_remove(held, "3") == ["1"]
    assert to_remove(held, "3", busy={"1"}) == []


def packages_in(tmp_path: Path, statuses: list[ServiceStatus]) -> Packages:
    return Packages(
        tmp_path,
        ServiceUsers(allow_root=True),
        EventLog("test"),
        place=lambda: (PAIR, PAIR.nodes[0]),
        event=lambda *a, **k: None,
        changed=lambda: None,
        in_use=lambda: statuses,
    )


def version(root: Path, service: str, name: str, at: float) -> None:
    top = root / "packages" / service / name
    top.mkdir(parents=True)
    (top / MARKER).write_text("{}")
    os.utime(top / MARKER, (at, at))


def test_a_removed_service_loses_its_versions_once_its_process_is_gone(tmp_path: Path) -> None:
    for service in ("app", "gone", "stopping"):
        version(tmp_path, service, V1, 10.0)
    version(tmp_path, "app", V2, 20.0)
    version(tmp_path, "app", "0.9-000000000000", 5.0)
    package = PAIR.services[0].package
    assert package is not None
    # "stopping" is gone from the site but its process is not stopped yet; app's process
    # runs 0.9, the oldest.
    busy = [
        ServiceStatus(name="stopping", placement="active", state="running", pid=4),
        ServiceStatus(
            name="app", placement="active", state="running", pid=5, package="0.9-000000000000"
        ),
    ]
    packages = packages_in(tmp_path, busy)
    assert packages.busy("app") == {"0.9-000000000000"}
    assert packages.busy("stopping") is None  # runs a version not known: keep them all
    plan = {"app": (package, packages.busy("app")), "stopping": (None, None)}
    assert packages._sweep(plan, frozenset()) is True  # something kept for a process
    root = tmp_path / "packages"
    assert sorted(p.name for p in root.iterdir()) == ["app", "stopping"]
    assert sorted(p.name for p in (root / "app").iterdir()) == sorted([V1, V2, "0.9-000000000000"])
    # Its process stopped: the plan no longer names it, and it goes.
    plan = {"app": (package, {V2})}
    assert packages._sweep(plan, frozenset()) is False
    assert sorted(p.name for p in root.iterdir()) == ["app"]
    assert sorted(p.name for p in (root / "app").iterdir()) == [V1, V2]


def test_the_sweep_keeps_the_peers_archives_of_the_services_it_keeps(tmp_path: Path) -> None:
    """The directory of the archives kept for the peers is no service: only a removed
    service's archives go with it."""
    version(tmp_path, "app", V2, 20.0)
    version(tmp_path, "gone", V1, 10.0)
    root = tmp_path / "packages"
    for service in ("app", "gone"):
        (root / SHARED / service).mkdir(parents=True)
        (root / SHARED / service / "archive").write_bytes(b"kept")
    package = PAIR.services[0].package
    assert package is not None
    packages = packages_in(tmp_path, [])
    assert packages._sweep({"app": (package, set())}, frozenset()) is False
    assert sorted(p.name for p in root.iterdir()) == [SHARED, "app"]
    assert [p.name for p in (root / SHARED).iterdir()] == ["app"]


def test_this_node_lacks_what_is_not_marked_installed(tmp_path: Path) -> None:
    packages = packages_in(tmp_path, [])

    def looked_again() -> tuple[str, ...]:
        packages._drift_step(PAIR)  # as every round of the packages' loop does
        return packages.lacking(PAIR)

    assert packages.lacking(PAIR) == ("app",)
    version(tmp_path, "app", V1, 10.0)
    assert looked_again() == ("app",)
    (tmp_path / "packages" / "app" / V2).mkdir()  # unpacked, never marked
    assert looked_again() == ("app",)
    (tmp_path / "packages" / "app" / V2 / MARKER).write_text("{}")
    assert packages.lacking(PAIR) == ("app",)  # until the disk is looked at again
    assert looked_again() == ()


def test_top_offers_a_standby_holding_the_version_first_and_names_what_one_lacks() -> None:
    report = view_of({"a": False, "b": True, "c": False}).report()
    live = Connection(url="http://r", live=True, since=900.0, read_at=999.5)
    sel, _ = handle(Selection(pair="p"), "s", report, live, 1000.0)
    assert sel.prompt is not None and sel.prompt.targets == ("c", "b")
    assert sel.prompt.what == "Switch p over from a to c"
    other, _ = handle(sel, "t", report, live, 1000.0)
    assert other.prompt is not None
    assert (
        other.prompt.what
        == "Switch p over from a to b (b lacks the declared package version of app)"
    )


def test_the_drift_alarm_files_an_event_as_it_starts_and_as_it_ends(tmp_path: Path) -> None:
    filed: list[tuple[str, str]] = []
    packages = Packages(
        tmp_path,
        ServiceUsers(allow_root=True),
        EventLog("test"),
        place=lambda: (PAIR, PAIR.nodes[0]),
        event=lambda kind, reason="", **details: filed.append((kind, reason)),
        changed=lambda: None,
    )
    packages._drift_step(PAIR)
    packages._drift_step(PAIR)  # still drifted: nothing more
    assert filed == [("package drift", "app 2.0 not installed on this node")]
    version(tmp_path, "app", V2, 20.0)
    packages._drift_step(PAIR)
    assert filed[1:] == [("package drift cleared", "holds every package version the site names")]


@pytest.mark.parametrize(
    "hidden",
    [
        {"db_eligible": False},  # not a recorded synchronous standby
        {"members": frozenset({"a", "b"})},  # its view: not acknowledged as a member
        {"holdoff_until": 200.0},  # its status still says healthy in b's view
        {"forgotten_promises_until": 200.0},
        {"held_by": "a"},  # a promise to an active cut off from etcd, b not asked
        {"synced": False},
    ],
)
def test_a_holder_that_cannot_campaign_for_a_reason_b_cannot_see_delays_b_a_lease_only(
    hidden: dict[str, Any],
) -> None:
    """a is gone; c holds app 2.0 and looks eligible to b, but does not campaign for a
    reason of its own. b, lacking app 2.0, steps in once c had its turn and a lease more:
    the pair is left without an active for that long, not for good."""
    c = obs("c", peers={"b": DRIFTED}, **hidden)
    for now in (100.0, 100.0 + DELAY + TTL):
        assert not campaigns(decide(replace(c, now=now)))
    b = obs("b", peers={"c": HOLDS}, lacks=("app",))
    assert not campaigns(decide(replace(b, now=100.0 + DELAY + TTL - 0.01)))
    assert campaigns(decide(replace(b, now=100.0 + DELAY + TTL)))


@given(
    me=st.sampled_from(["a", "b", "c"]),
    with_packages=st.booleans(),
    peers=st.dictionaries(
        st.sampled_from(["a", "b", "c"]),
        st.tuples(st.booleans(), st.sampled_from(["standby", "active", "starting"])),
    ),
    drained=st.frozensets(st.sampled_from(["a", "b", "c"])),
    members=st.one_of(st.none(), st.frozensets(st.sampled_from(["a", "b", "c"]))),
    waited=st.floats(0.0, 3 * DELAY + TTL),
)
def test_when_every_node_holds_its_versions_or_none_are_named_priority_alone_decides(
    me: str,
    with_packages: bool,
    peers: dict[str, tuple[bool, str]],
    drained: frozenset[str],
    members: frozenset[str] | None,
    waited: float,
) -> None:
    """As before packages: a node campaigns once each eligible member before it in
    priority had its campaign delay, and no later."""
    pair = PAIR if with_packages else DECIDE_PAIR
    views = {n: PeerView(role, healthy) for n, (healthy, role) in peers.items() if n != me}
    members = None if members is None else members | {me}
    o = obs(me, pair=pair, peers=views, drained=drained - {me}, members=members)
    before = pair.nodes[: pair.rank(me)]
    ahead = sum(
        1
        for n in before
        if n.name in views
        and views[n.name].healthy
        and views[n.name].role == "standby"
        and n.name not in drained
        and (members is None or n.name in members)
    )
    d = decide(replace(o, now=100.0 + waited))
    assert campaigns(d) == (waited >= ahead * DELAY), d.reason


@given(
    me=st.sampled_from(["a", "b", "c"]),
    me_lacks=st.booleans(),
    peers=st.dictionaries(
        st.sampled_from(["a", "b", "c"]),
        st.tuples(st.booleans(), st.booleans(), st.sampled_from(["standby", "active"])),
    ),
)
def test_a_free_eligible_node_campaigns_in_the_end_whatever_the_others_hold(
    me: str, me_lacks: bool, peers: dict[str, tuple[bool, bool, str]]
) -> None:
    """Liveness: drift only orders the candidates. Once every node ahead of this one had
    its turn and a lease more, it campaigns, holding the version or not."""
    views = {
        name: PeerView(role, healthy, lacks=("app",) if lacks else ())
        for name, (healthy, lacks, role) in peers.items()
        if name != me
    }
    late = 100.0 + len(PAIR.nodes) * DELAY + TTL
    o = obs(me, peers=views, lacks=("app",) if me_lacks else (), now=late)
    assert campaigns(decide(o))
