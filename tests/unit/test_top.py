"""``hapair top``: the screen for recorded site states, the keys, and against real registries.

The screen is rendered to text with rich's recording console at 80x24 and checked for
what an operator must see; one acknowledgement goes from the keys through a real
registry into etcd; the dashboard follows registries that go away; and the command
itself runs in a pseudo-terminal.
"""

from __future__ import annotations

import io
import sys
from collections.abc import AsyncGenerator
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from hapair.registry.console.status import ago
from hapair.registry.console.top.control import handle, parse_keys
from hapair.registry.console.top.feed import Request, outcome, split_urls
from hapair.registry.console.top.state import NOTICE_S, Connection, Notice, Selection, pairs_of
from hapair.registry.console.top.view import clock, render
from hapair.shared.plcs import PathHealth
from hapair.shared.report import (
    ContextReport,
    DatabaseReport,
    EventReport,
    NodeReport,
    Note,
    PairReport,
    PlcReport,
    RecoveryReport,
    ServiceReport,
    SiteReport,
    WorkshopReport,
)

NOW = 1_700_000_000.0
LIVE = Connection(url="http://reg-1:8700", live=True, since=NOW - 60, read_at=NOW - 0.5)
HAPAIR = str(Path(sys.executable).parent / "hapair")

# ---- a recorded site of 20 pairs ----------------------------------------------------------


def node(
    name: str,
    role: str = "standby",
    *,
    up: bool = True,
    healthy: bool = True,
    problems: tuple[str, ...] = (),
    services: tuple[tuple[str, str, int], ...] = (),
) -> NodeReport:
    return NodeReport(
        name=name,
        address="10.0.0.1",
        up=up,
        role=role if up else "down",
        healthy=healthy if up else None,
        problems=list(problems),
        services=[ServiceReport(name=n, state=s, restarts=r) for n, s, r in services],
    )


def pair(i: int) -> PairReport:
    name = f"p{i:02d}"
    return PairReport(
        name=name,
        active=f"{name}-a",
        epoch=1000 + i,
        since=NOW - 125,
        nodes=[
            node(f"{name}-a", "active", services=(("mes", "running", 0), ("batch", "running", 2))),
            node(f"{name}-b"),
        ],
    )


def site20() -> SiteReport:
    """Four workshops of five pairs; p03 awaits an operator, p05 is paused, p07 has no
    active (one node down, the other unhealthy), p09 has three nodes (one unhealthy, one
    healthy with a problem)."""
    pairs = [pair(i) for i in range(20)]
    pairs[3] = pairs[3].model_copy(
        update={
            "active": "p03-b",
            "nodes": [
                node("p03-a"),
                node("p03-b", "active", services=(("mes", "running", 0), ("batch", "held", 0))),
            ],
            "recovery": RecoveryReport(
                epoch=1003,
                cause="lease of p03-a expired",
                from_node="p03-a",
                to_node="p03-b",
                held=["batch"],
                state="awaiting",
                at=NOW - 42,
            ),
        }
    )
    pairs[5] = pairs[5].model_copy(
        update={"paused": Note(by="op@host", at=NOW - 300, reason="firmware update")}
    )
    pairs[7] = pairs[7].model_copy(
        update={
            "active": None,
            "epoch": None,
            "since": None,
            "nodes": [
                node("p07-a", up=False),
                node("p07-b", healthy=False, problems=("disk full",)),
            ],
        }
    )
    pairs[9] = pairs[9].model_copy(
        update={
            "nodes": [
                *pairs[9].nodes[:1],
                node("p09-b", healthy=False, problems=("disk full",)),
                node("p09-c", problems=("peer b not visible",)),
            ]
        }
    )
    events = [
        EventReport(
            kind="election",
            at=NOW - 600 + i,
            pair=f"p{i:02d}",
            node=f"p{i:02d}-a",
            epoch=1000 + i,
            reason=f"cause {i}",
        )
        for i in range(20)
    ]
    return SiteReport(
        site="plant-1",
        revision=4242,
        workshops=[WorkshopReport(name=f"ws{w}", pairs=pairs[w * 5 : w * 5 + 5]) for w in range(4)],
        events=events,
    )


def screen(
    report: SiteReport | None,
    conn: Connection = LIVE,
    sel: Selection | None = None,
    now: float = NOW,
    width: int = 80,
    height: int = 24,
) -> list[str]:
    console = Console(record=True, width=width, height=height, file=io.StringIO())
    console.print(render(report, conn, now, sel or Selection()))
    return console.export_text().splitlines()


def line_with(lines: list[str], *parts: str) -> str:
    found = [line for line in lines if all(p in line for p in parts)]
    assert found, f"no line with {parts} in:\n" + "\n".join(lines)
    return found[0]


# ---- the screen ---------------------------------------------------------------------------


def test_the_site_fits_80x24_with_alarms_first() -> None:
    lines = screen(site20())
    assert len(lines) == 24
    assert max(len(line) for line in lines) <= 80
    assert "plant-1" in lines[0] and "LIVE" in lines[0] and clock(NOW) in lines[0]
    assert "AWAITING OPERATOR: p03" in lines[1]
    assert "PAUSED: p05" in lines[1] and "NO ACTIVE: p07" in lines[1]
    assert line_with(lines, "PAIR", "ACTIVE", "EPOCH", "FOR", "STATE")
    row = line_with(lines, "> p00")  # the selected pair is marked
    assert row.split() == [">", "p00", "p00-a", "1000", "2m05s", "p00-b:stby", "2/2", "ok"]
    assert line_with(lines, "p03", "p03-b", "1003", "AWAITING OPERATOR")
    assert line_with(lines, "workshop ws0")
    assert "pairs 1-" in lines[-1] and "/20" in lines[-1] and "a: ack" in lines[-1]


def test_pages_keep_the_selected_pair_on_screen_and_cover_the_site() -> None:
    report = site20()
    seen: set[str] = set()
    for _, p in pairs_of(report):
        lines = screen(report, sel=Selection(pair=p.name))
        assert len(lines) == 24
        assert line_with(lines, f"> {p.name} ")
        assert line_with(lines, f"─ {p.name}  workshop")  # its detail
        seen |= {w for line in lines for w in line.split() if w.startswith("p") and len(w) == 3}
    assert {p.name for _, p in pairs_of(report)} <= seen


def test_selected_pair_awaiting_operator_in_detail() -> None:
    lines = screen(site20(), sel=Selection(pair="p03"))
    words = " ".join(" ".join(lines).split())
    assert (
        "AWAITING OPERATOR lease of p03-a expired, 42s ago: p03-a -> p03-b; held: batch; "
        "press a to acknowledge epoch 1003"
    ) in words
    assert line_with(lines, "p03-b", "active", "healthy", "mes running", "batch held")
    assert line_with(lines, "p03-a", "standby", "healthy")


def test_nodes_health_roles_services_and_restart_counts() -> None:
    lines = screen(site20(), sel=Selection(pair="p07"))
    assert line_with(lines, "p07", "NONE", "p07-a:DOWN", "NO ACTIVE")
    assert line_with(lines, "p07-a", "down")
    assert line_with(lines, "p07-b", "standby", "UNHEALTHY", "disk full")
    lines = screen(site20(), sel=Selection(pair="p01"))
    assert line_with(lines, "p01-a", "active", "healthy", "batch running (2 restarts)")
    lines = screen(site20(), sel=Selection(pair="p09"))
    assert line_with(lines, "> p09", "p09-b:stby! p09-c:stby ")  # ! = unhealthy
    assert line_with(lines, "p09-b", "standby", "UNHEALTHY · disk full")
    # Healthy, with something to fix all the same.
    assert line_with(lines, "p09-c", "standby", "healthy · peer b not visible")


def test_paused_pair_in_detail() -> None:
    lines = screen(site20(), sel=Selection(pair="p05"))
    assert line_with(lines, "p05", "PAUSED")
    assert line_with(
        lines, "PAUSED", "by op@host 5m00s ago: firmware update; no automatic failover"
    )


def test_recent_events_newest_first_with_their_causes() -> None:
    lines = screen(site20())
    head = lines.index(line_with(lines, "recent events, newest first"))
    newest = lines[head + 1]
    assert newest.startswith(clock(NOW - 600 + 19))
    assert "election pair=p19 node=p19-a epoch=1019 cause 19" in newest
    assert "cause 18" in lines[head + 2]


def test_a_lost_registry_shows_since_when_and_nothing_as_current() -> None:
    lost = Connection(
        url="http://reg-2:8700",
        live=False,
        since=NOW - 35,
        error="cannot reach the registry at http://reg-2:8700",
        read_at=NOW - 36,
    )
    lines = screen(site20(), lost)
    assert "LIVE" not in "\n".join(lines)
    assert f"DISCONNECTED  since {clock(NOW - 35)} (35s ago)" in lines[0]
    assert lines[1].startswith(f"NOT CURRENT (read {clock(NOW - 36)}, 36s ago): cannot reach")
    # Ages are those of when the state was read, not grown as if it were still true.
    assert line_with(lines, "p00", "p00-a", "1000", ago(125 - 36))


def test_a_silent_registry_is_not_shown_as_current() -> None:
    silent = Connection(url="http://reg-1:8700", live=True, since=NOW - 60, read_at=NOW - 5)
    lines = screen(site20(), silent)
    assert "DISCONNECTED" in lines[0] and "LIVE" not in lines[0]
    assert lines[1].endswith("): no answer from http://reg-1:8700")


def test_before_any_registry_answers() -> None:
    lines = screen(None, Connection(url="http://reg-1:8700"))
    assert "connecting to http://reg-1:8700" in lines[0]
    assert line_with(lines, "waiting for the site state")
    lost = Connection(url="http://reg-1:8700", since=NOW - 3, error="cannot reach it")
    lines = screen(None, lost)
    assert "DISCONNECTED" in lines[0] and lines[1] == "cannot reach it"


def test_prompt_and_notice_in_the_footer() -> None:
    report = site20()
    sel, _ = handle(Selection(pair="p03"), "a", report, LIVE, NOW)
    lines = screen(report, sel=sel)
    assert lines[-1].strip() == (
        "Acknowledge the recovery of p03 at epoch 1003: start batch on p03-b? [y/N]"
    )
    assert sel.prompt is not None
    long = replace(sel.prompt, what=sel.prompt.what.replace("batch", "batch-with-a-long-name " * 4))
    footer = screen(report, sel=replace(sel, prompt=long))[-1]
    assert footer.startswith(" Acknowledge the recovery of p03 at epoch 1003: start batch")
    assert footer.rstrip().endswith("…? [y/N]") and len(footer) <= 80
    done = Selection(pair="p03", notice=Notice("recovery of p03 acknowledged", True, NOW - 1))
    assert screen(report, sel=done)[-2] == "recovery of p03 acknowledged"
    assert "recovery of p03" not in "\n".join(screen(report, sel=done, now=NOW + NOTICE_S))


def test_a_bigger_terminal_shows_every_pair_at_once() -> None:
    lines = screen(site20(), width=120, height=44)
    assert len(lines) == 44
    assert "pairs 1-20/20" in lines[-1]


# ---- the database and the process context of a held service ------------------------------

RESUME = ContextReport(
    process="batch",
    database="mes",
    step=5,
    state={"batch": 2},
    last_step=4,
    last_result={"setpoint": 40.0, "measured": 39.8},
    epoch=1002,
    steps_committed=12,
    committed_at=NOW - 50,
)


def with_databases(report: SiteReport, async_pair: str = "p11") -> SiteReport:
    """Every pair with PostgreSQL: primary on the active, streaming standbys, the first
    one synchronous; ``async_pair``'s primary has no synchronous standby; p03's held
    batch published where it would resume."""

    def db(p: PairReport, n: NodeReport) -> DatabaseReport | None:
        if not n.up:
            return None
        if n.name == p.active:
            standbys = [m.name for m in p.nodes if m.name != p.active and m.up]
            return DatabaseReport(
                role="primary", timeline=3, synchronous=[] if p.name == async_pair else standbys[:1]
            )
        return DatabaseReport(
            role="standby", timeline=3, lag_bytes=2400, lag_s=0.25, streaming=True
        )

    def one(p: PairReport) -> PairReport:
        update: dict[str, object] = {
            "nodes": [n.model_copy(update={"database": db(p, n)}) for n in p.nodes]
        }
        if p.recovery is not None:
            update["recovery"] = p.recovery.model_copy(update={"contexts": {"batch": RESUME}})
        return p.model_copy(update=update)

    return report.model_copy(
        update={
            "workshops": [
                w.model_copy(update={"pairs": [one(p) for p in w.pairs]}) for w in report.workshops
            ]
        }
    )


def test_awaiting_operator_shows_where_the_held_service_resumes() -> None:
    lines = screen(with_databases(site20()), sel=Selection(pair="p03"))
    assert len(lines) == 24 and max(len(line) for line in lines) <= 80
    head = lines.index(line_with(lines, "AWAITING OPERATOR", "lease of p03-a expired"))
    words = " ".join(" ".join(lines[head : head + 2]).split())
    assert "p03-a -> p03-b; held: batch; press a to acknowledge epoch 1003" in words
    resume = line_with(lines, "batch resumes at step 5")
    assert resume.startswith("  batch resumes at step 5 (batch=2) · last: step 4, epoch 1002 at")
    assert clock(NOW - 50) in resume and len(resume) <= 80  # one line, cut if need be
    # The nodes follow the recovery, with their databases.
    assert lines.index(line_with(lines, "p03-b", "active", "db primary")) > head


def test_a_context_that_is_missing_or_unreadable_says_so() -> None:
    report = with_databases(site20())
    missing = ContextReport(process="batch")
    broken = ContextReport(process="batch", error="database mes: connection refused")
    for ctx, text in (
        (missing, "batch: no process context (never committed a step)"),
        (broken, "batch: process context unreadable: database mes: connection refused"),
    ):
        pairs = [
            p.model_copy(
                update={"recovery": p.recovery.model_copy(update={"contexts": {"batch": ctx}})}
            )
            if p.recovery is not None
            else p
            for _, p in pairs_of(report)
        ]
        changed = report.model_copy(
            update={
                "workshops": [
                    w.model_copy(update={"pairs": pairs[i * 5 : i * 5 + 5]})
                    for i, w in enumerate(report.workshops)
                ]
            }
        )
        assert line_with(screen(changed, sel=Selection(pair="p03")), text)


def test_the_ack_question_leaves_the_context_on_screen() -> None:
    report = with_databases(site20())
    sel, _ = handle(Selection(pair="p03"), "a", report, LIVE, NOW)
    lines = screen(report, sel=sel)
    assert lines[-1].strip() == (
        "Acknowledge the recovery of p03 at epoch 1003: start batch on p03-b? [y/N]"
    )
    assert line_with(lines, "batch resumes at step 5 (batch=2)")


def test_database_role_lag_and_sync_standby_of_each_node() -> None:
    lines = screen(with_databases(site20()), sel=Selection(pair="p09"))
    assert len(lines) == 24 and max(len(line) for line in lines) <= 80
    assert line_with(lines, "p09-a ", "active", "db primary ", "mes running")
    assert "ASYNC" not in line_with(lines, "p09-a ", "db primary")
    assert line_with(lines, "p09-b ", "standby", "db sync lag 2.3 kB 0.2s")  # commits wait for it
    assert line_with(lines, "p09-c ", "standby", "db standby lag 2.3 kB 0.2s")
    assert "db async" not in line_with(lines, "> p09")


def test_a_primary_without_synchronous_standby_is_flagged() -> None:
    lines = screen(with_databases(site20()), sel=Selection(pair="p11"))
    assert len(lines) == 24 and max(len(line) for line in lines) <= 80
    assert line_with(lines, "> p11", "db async")
    assert line_with(lines, "database: no synchronous standby: a commit may be on p11-a only")
    assert line_with(lines, "p11-a ", "db primary ASYNC")
    assert line_with(lines, "p11-b ", "db standby lag 2.3 kB 0.2s")
    # Seen from another pair, it is still in the list.
    assert line_with(screen(with_databases(site20()), sel=Selection(pair="p12")), "p11", "db async")


def test_a_standby_that_does_not_stream_or_a_stopped_database() -> None:
    report = with_databases(site20())
    pair = next(p for _, p in pairs_of(report) if p.name == "p00")
    b = pair.nodes[1]
    assert b.database is not None
    broken = pair.model_copy(
        update={
            "nodes": [
                pair.nodes[0],
                b.model_copy(
                    update={"database": b.database.model_copy(update={"streaming": False})}
                ),
            ]
        }
    )
    changed = report.model_copy(
        update={
            "workshops": [
                report.workshops[0].model_copy(
                    update={"pairs": [broken, *report.workshops[0].pairs[1:]]}
                ),
                *report.workshops[1:],
            ]
        }
    )
    lines = screen(changed, sel=Selection(pair="p00"))
    assert line_with(lines, "p00-b ", "db sync NOT STREAMING")
    stopped = broken.model_copy(
        update={
            "nodes": [
                broken.nodes[0],
                b.model_copy(update={"database": DatabaseReport(role="stopped")}),
            ]
        }
    )
    changed = changed.model_copy(
        update={
            "workshops": [
                changed.workshops[0].model_copy(
                    update={"pairs": [stopped, *changed.workshops[0].pairs[1:]]}
                ),
                *changed.workshops[1:],
            ]
        }
    )
    assert line_with(screen(changed, sel=Selection(pair="p00")), "p00-b ", "db stopped")


def test_twenty_pairs_with_databases_fit_80x24_on_every_page() -> None:
    report = with_databases(site20())
    for _, p in pairs_of(report):
        lines = screen(report, sel=Selection(pair=p.name))
        assert len(lines) == 24 and max(len(line) for line in lines) <= 80
        assert line_with(lines, f"> {p.name} ")
        if p.active is not None:
            assert line_with(lines, f"{p.active} ", "db primary")
    assert line_with(lines, "p19", "p19-a")


# ---- PLCs -----------------------------------------------------------------------------------


def plc(
    name: str, node: str, state: str = "ok", path: int = 0, critical: bool = False
) -> PlcReport:
    up = {"ok": [True, True], "degraded": [path == 1, path == 0], "down": [False, False]}
    return PlcReport(
        name=name,
        node=node,
        service="comm",
        state=state,
        path=path,
        critical=critical,
        paths=[
            PathHealth(endpoint=f"10.30.1.{i}:502", up=u, latency_ms=0.4 if u else None)
            for i, u in enumerate(up[state])
        ],
    )


def with_plcs(report: SiteReport, name: str, plcs: list[PlcReport]) -> SiteReport:
    workshops = [
        w.model_copy(
            update={
                "pairs": [
                    p.model_copy(update={"plcs": plcs}) if p.name == name else p for p in w.pairs
                ]
            }
        )
        for w in report.workshops
    ]
    return report.model_copy(update={"workshops": workshops})


def test_the_plcs_of_the_selected_pair_on_one_line_within_80_columns() -> None:
    plcs = [
        plc("press-1", "p02-a", "degraded", path=1, critical=True),
        plc("press-1", "p02-b"),  # the standby's view is not the one shown
        plc("oven-1", "p02-a"),
        *(plc(f"conveyor-{i}", "p02-a") for i in range(8)),
        PlcReport(name="mixer", state="unreported"),
    ]
    lines = screen(with_plcs(site20(), "p02", plcs), sel=Selection(pair="p02"))
    assert len(lines) == 24 and max(len(line) for line in lines) <= 80
    line = line_with(lines, "PLCs on p02-a:")
    # the worst first: mixer is in the topology, but no comm server reports it
    assert line == (
        "PLCs on p02-a: mixer no report · press-1* degraded, backup · oven-1 ok · convey…"
    )  # cut at the edge, never wrapped
    assert line_with(lines, "> p02").split()[-3:] == ["PLC", "no", "report"]


def test_plc_trouble_on_the_active_flags_the_pair() -> None:
    report = with_plcs(site20(), "p01", [plc("press-1", "p01-a", "degraded", path=1)])
    report = with_plcs(report, "p04", [plc("press-1", "p04-a", "down", critical=True)])
    report = with_plcs(report, "p02", [plc("press-1", "p02-a"), plc("press-1", "p02-b", "down")])
    lines = screen(report)
    assert line_with(lines, "p01", "p01-a").split()[-2:] == ["PLC", "path"]
    assert line_with(lines, "p04", "p04-a").split()[-2:] == ["PLC", "DOWN"]
    assert line_with(lines, "p02", "p02-a").split()[-1] == "ok"  # down on the standby only
    detail = screen(report, sel=Selection(pair="p04"))
    assert line_with(detail, "PLCs on p04-a: press-1* down")


# ---- keys -----------------------------------------------------------------------------------


def test_parse_keys() -> None:
    assert parse_keys(b"jk\x1b[A\x1b[B\x1bOB\x1b[5~\x1b[6~q") == [
        "j",
        "k",
        "up",
        "down",
        "down",
        "pgup",
        "pgdn",
        "q",
    ]
    assert parse_keys(b"\x1b") == ["esc"]
    assert parse_keys(b"\x1b[1;5Ca\t") == ["a", "tab"]  # unknown sequence skipped whole


def test_moving_the_selection() -> None:
    report = site20()

    def after(keys: str, start: str | None = None) -> str | None:
        sel = Selection(pair=start)
        for key in keys.split():
            sel, effect = handle(sel, key, report, LIVE, NOW, page=8)
            assert effect is None
        return sel.pair

    assert after("down") == "p01"
    assert after("j j k") == "p01"
    assert after("up") == "p00"
    assert after("pgdn pgdn") == "p16"
    assert after("end") == "p19"
    assert after("down", "p19") == "p19"
    assert after("home", "p12") == "p00"


def test_ack_asks_first_and_names_the_epoch_shown() -> None:
    report = site20()
    sel, effect = handle(Selection(pair="p01"), "a", report, LIVE, NOW)
    assert effect is None and sel.prompt is None
    assert sel.notice is not None and "p01 has no recovery awaiting an operator" in sel.notice.text
    sel, effect = handle(Selection(pair="p03"), "a", report, LIVE, NOW)
    assert effect is None and sel.prompt is not None and sel.prompt.epoch == 1003
    no, effect = handle(sel, "n", report, LIVE, NOW)
    assert effect is None and no.prompt is None
    assert no.notice is not None and "cancelled: nothing sent" in no.notice.text
    yes, effect = handle(sel, "y", report, LIVE, NOW)
    assert effect == Request("ack", "p03", {"epoch": 1003})
    assert yes.prompt is None and yes.sending == "ack of p03"
    quit_, effect = handle(sel, "q", report, LIVE, NOW)
    assert effect is None and quit_.prompt is None  # q answers "no", it does not quit
    assert handle(Selection(), "q", report, LIVE, NOW)[1] == "quit"


def test_switchover_asks_first_and_offers_the_ready_standby_first() -> None:
    report = site20()
    sel, _ = handle(Selection(pair="p09"), "s", report, LIVE, NOW)
    assert sel.prompt is not None
    assert sel.prompt.what == "Switch p09 over from p09-a to p09-c"  # p09-b is unhealthy
    assert sel.prompt.targets == ("p09-c", "p09-b")
    other, _ = handle(sel, "t", report, LIVE, NOW)
    assert other.prompt is not None and other.prompt.to == "p09-b"
    assert "(p09-b is not a ready standby)" in other.prompt.what
    assert handle(other, "y", report, LIVE, NOW)[1] == Request("switchover", "p09", {"to": "p09-b"})
    sel, effect = handle(Selection(pair="p07"), "s", report, LIVE, NOW)
    assert effect is None and sel.notice is not None
    assert "no active node" in sel.notice.text


def test_nothing_is_sent_while_not_connected() -> None:
    lost = Connection(url="http://reg-1:8700", since=NOW - 3, read_at=NOW - 4)
    for key in ("a", "s"):
        sel, effect = handle(Selection(pair="p03"), key, site20(), lost, NOW)
        assert effect is None and sel.prompt is None
        assert sel.notice is not None and "not connected" in sel.notice.text


def test_outcome_sentences() -> None:
    ack = Request("ack", "asm", {"epoch": 7})
    body = b'{"pair":"asm","recovery":{"epoch":7,"held":["batch"],"to_node":"asm-b"}}'
    assert outcome(ack, 200, body) == (
        True,
        "recovery of asm at epoch 7 acknowledged: batch starting on asm-b",
    )
    refused = b'{"error":"pair asm awaits an acknowledgement for epoch 9, not 7: refused"}'
    ok, text = outcome(ack, 409, refused)
    assert not ok and text == (
        "ack of asm refused (HTTP 409): pair asm awaits an acknowledgement for epoch 9, "
        "not 7: refused"
    )
    assert outcome(ack, 502, b"<html>")[1] == "ack of asm refused (HTTP 502): <html>"
    assert split_urls(" http://a:1/, ,http://b:2") == ["http://a:1", "http://b:2"]


# ---- against real registries --------------------------------------------------------------


Follow = AsyncGenerator[tuple[SiteReport | None, Connection], None]


# ---- the command --------------------------------------------------------------------------


def test_a_rollout_under_way_has_a_line_of_its_own_until_it_ends() -> None:
    def rollout_event(kind: str, at: float, reason: str = "", **details: object) -> EventReport:
        return EventReport(
            kind=kind, at=at, pair="p02", reason=reason, details={"rollout": "r1", **details}
        )

    started = rollout_event("rollout_started", NOW - 40, "rollout of pair p02 by op", of=4)
    step = rollout_event("rollout_step", NOW - 12, "restart mes on standby p02-b", step=2, of=4)
    site = site20()
    running = site.model_copy(update={"events": [*site.events, started, step]})
    line = line_with(screen(running), "ROLLOUT p02")
    assert "step 2/4: restart mes on standby p02-b (for 12s)" in line
    done = rollout_event("rollout_done", NOW - 1, "pair p02 runs the declared versions")
    ended = site.model_copy(update={"events": [*site.events, started, step, done]})
    assert not any("ROLLOUT" in line for line in screen(ended))
