"""``hapair status``: the site report as rich tables, once or kept current.

Every value shown comes from etcd or a registry, so it goes into :class:`Text`
objects, never into markup: a reason typed by an operator cannot restyle the screen.
"""

from __future__ import annotations

import time
from datetime import datetime

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from hapair.shared.report import (
    ContextReport,
    EventReport,
    NodeReport,
    PackageReport,
    PairReport,
    PlcReport,
    SiteReport,
)

ROLE_STYLES = {
    "active": "bold green",
    "standby": "cyan",
    "starting": "yellow",
    "stopping": "yellow",
    "fenced": "bold red",
    "idle": "dim",
    "down": "bold red",
}
STATE_STYLES = {
    "running": "green",
    "starting": "yellow",
    "restarting": "yellow",
    "unhealthy": "bold red",
    "failed": "bold red",
    "stopped": "dim",
}
RECENT_EVENTS = 8


def ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _pair_cell(pair: PairReport, now: float) -> Text:
    text = Text(pair.name, style="bold")
    if pair.paused is not None:
        text.append("\n PAUSED ", style="bold white on red")
        text.append(f"\nby {pair.paused.by} {ago(now - pair.paused.at)} ago", style="red")
        if pair.paused.reason:
            text.append(f"\n{pair.paused.reason}", style="red")
    rec = pair.recovery
    if rec is not None and rec.state == "awaiting" and rec.epoch == pair.epoch:
        text.append("\n AWAITING OPERATOR ", style="bold black on yellow")
        text.append(f"\n{rec.cause} {ago(now - rec.at)} ago", style="yellow")
        text.append(f"\nheld: {', '.join(rec.held)}", style="yellow")
        for service, ctx in sorted((rec.contexts or {}).items()):
            text.append("\n")
            text.append_text(context_text(service, ctx, "\n  "))
        text.append(f"\nhapair ack {pair.name} --epoch {rec.epoch}", style="yellow")
    if pair.switchover is not None:
        target = pair.switchover.to or "best standby"
        text.append(f"\nswitchover to {target} pending", style="yellow")
    return text


def _values(values: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def context_text(service: str, ctx: ContextReport, sep: str = "; ") -> Text:
    """Where a held service's process would resume, from its committed context."""
    if ctx.error is not None:
        return Text(f"{service}: process context unreadable: {ctx.error}", style="bold red")
    if ctx.step is None:
        return Text(f"{service}: no process context (never committed a step)", style="yellow")
    text = Text(f"{service} resumes at step {ctx.step}", style="bold yellow")
    if ctx.state:
        text.append(f" ({_values(ctx.state)})", style="yellow")
    if ctx.last_step is not None:
        when = (
            f" at {datetime.fromtimestamp(ctx.committed_at).strftime('%H:%M:%S')}"
            if ctx.committed_at is not None
            else ""
        )
        text.append(f"{sep}last: step {ctx.last_step}, epoch {ctx.epoch}{when}", style="yellow")
        if ctx.last_result:
            text.append(f"{sep}result: {_values(ctx.last_result)}", style="yellow")
    return text


def _active_cell(pair: PairReport, now: float) -> Text:
    if pair.active is None:
        return Text("NONE", style="bold white on red")
    text = Text(pair.active, style="bold green")
    text.append(f"\nepoch {pair.epoch}")
    if pair.since is not None:
        text.append(f"\nfor {ago(now - pair.since)}", style="dim")
    return text


def _role_cell(node: NodeReport) -> Text:
    text = Text(node.role, style=ROLE_STYLES.get(node.role, ""))
    if node.drained is not None:
        text.append("\nDRAINED", style="bold yellow")
    return text


def _health_cell(node: NodeReport) -> Text:
    if not node.up:
        return Text("-", style="dim")
    if node.healthy:
        text = Text("healthy", style="green")
        # Healthy, yet something to fix (a peer path down, a node fencing itself in a loop).
        for problem in node.problems:
            text.append(f"\n{problem}", style="yellow")
    else:
        text = Text("UNHEALTHY" + "".join(f"\n{p}" for p in node.problems), style="bold red")
    if node.drift:
        # Not a health problem: the node may run what it holds, but is chosen last.
        text.append(f"\npackage drift: {', '.join(node.drift)}", style="bold yellow")
    return text


def short_version(dir_name: str) -> str:
    """``2.4.1`` of a version's directory ``2.4.1-9f2c0a1b3c4d``."""
    return dir_name.rsplit("-", 1)[0]


def package_line(p: PackageReport) -> Text:
    """``app 2.0 installed, holds 2.0 1.0, runs 1.0``; a version not installed in red
    (failed, with why) or yellow (on its way)."""
    text = Text(f"{p.service} {p.declared} ")
    style = {"installed": "green", "installing": "yellow"}.get(p.state, "bold red")
    text.append(p.state + (f": {p.detail}" if p.detail else ""), style=style)
    held = " ".join(short_version(h) for h in p.held) or "nothing"
    text.append(f", holds {held}", style="" if p.held else "bold red")
    if p.running is not None:
        declared = p.state == "installed" and short_version(p.running) == p.declared
        text.append(f", runs {short_version(p.running)}", style="" if declared else "yellow")
    return text


def _packages_cell(node: NodeReport) -> Text:
    return Text("\n").join(package_line(p) for p in node.packages)


def _services_cell(node: NodeReport) -> Text:
    text = Text()
    for i, s in enumerate(node.services):
        text.append("\n" if i else "")
        text.append(f"{s.name} ")
        text.append(s.state, style=STATE_STYLES.get(s.state, ""))
        if s.restarts:
            text.append(f" ({s.restarts} restart{'s' if s.restarts != 1 else ''})", style="yellow")
    db = node.database
    if db is not None:
        text.append("\n" if node.services else "")
        text.append(f"postgresql {db.role}", style="green" if db.role == "primary" else "")
        if db.timeline is not None:
            text.append(f" tl {db.timeline}")
        if db.role == "primary" and db.synchronous:
            text.append(f" sync: {', '.join(db.synchronous)}")
        elif db.role == "standby":
            lag = f" lag {db.lag_bytes} B" if db.lag_bytes is not None else ""
            text.append(
                lag + ("" if db.streaming else " NOT STREAMING"),
                style="" if db.streaming else "bold red",
            )
    return text


def _endpoints_cell(pair: PairReport) -> Text:
    text = Text()
    for i, e in enumerate(pair.endpoints):
        text.append("\n" if i else "")
        if e.status == 200:
            text.append(f"{e.service} {e.protocol}://{e.host}:{e.port}", style="green")
        else:
            text.append(f"{e.service}: {e.error}", style="red")
    return text


def _workshop_table(name: str, pairs: list[PairReport], now: float) -> Table:
    table = Table(title=f"workshop {name}", title_justify="left", show_lines=True, expand=False)
    # Per node, each service's package (declared, held, running): where any has one.
    packages = any(n.packages for p in pairs for n in p.nodes)
    columns = ("pair", "active", "node", "role", "health", "services", "packages", "endpoints")
    for column in columns:
        if column != "packages" or packages:
            table.add_column(column)
    for pair in pairs:
        for i, node in enumerate(pair.nodes):
            first = i == 0
            table.add_row(
                _pair_cell(pair, now) if first else Text(""),
                _active_cell(pair, now) if first else Text(""),
                Text(node.name, style="bold" if node.name == pair.active else ""),
                _role_cell(node),
                _health_cell(node),
                _services_cell(node),
                *([_packages_cell(node)] if packages else []),
                _endpoints_cell(pair) if first else Text(""),
            )
    return table


PLC_STYLES = {
    "ok": "green",
    "degraded": "yellow",
    "starting": "yellow",
    "down": "bold red",
    "unreported": "yellow",
}


def path_name(index: int) -> str:
    return "primary" if index == 0 else "backup"


def _plc_paths(plc: PlcReport) -> Text:
    """``primary 10.30.1.61:502 up 0.41 ms, backup 10.31.1.61:502 DOWN``."""
    text = Text()
    for i, path in enumerate(plc.paths):
        text.append(", " if i else "")
        text.append(f"{path_name(i)} {path.endpoint} ")
        if path.up is None:
            text.append("not tried", style="dim")
        elif not path.up:
            text.append("DOWN", style="bold red")
        else:
            text.append("up", style="green")
            if path.latency_ms is not None:
                text.append(f" {path.latency_ms:.2f} ms")
    return text


def _plc_problem(plc: PlcReport) -> Text:
    if plc.node is None:
        return Text("no comm server reports it", style="yellow")
    text = Text(plc.problem or "", style="red")
    unusable = {q: n for q, n in plc.tags.items() if q != "good" and n}
    if unusable:
        text.append("; " if plc.problem else "")
        text.append(
            ", ".join(f"{n} tag{'s' * (n != 1)} {q}" for q, n in unusable.items()), style="yellow"
        )
    return text


def _plcs_table(name: str, pairs: list[PairReport]) -> Table | None:
    """One row per PLC and reporting node, under its pair: None if no pair has PLCs."""
    if not any(p.plcs for p in pairs):
        return None
    table = Table(title=f"PLCs of workshop {name}", title_justify="left", expand=False)
    for column in ("pair", "plc", "node", "state", "in use", "paths", "problem"):
        table.add_column(column)
    for pair in pairs:
        for i, plc in enumerate(pair.plcs):
            label = Text(plc.name)
            if plc.critical:
                label.append(" critical", style="bold")
            table.add_row(
                Text(pair.name, style="bold") if i == 0 else Text(""),
                label,
                Text(plc.node or "-", style="bold" if plc.node == pair.active else ""),
                Text(plc.state, style=PLC_STYLES.get(plc.state, "")),
                Text(path_name(plc.path) if plc.paths else "-"),
                _plc_paths(plc),
                _plc_problem(plc),
            )
    return table


def _event_line(event: EventReport) -> Text:
    stamp = datetime.fromtimestamp(event.at).strftime("%H:%M:%S")
    text = Text(f"{stamp} ", style="dim")
    text.append(event.kind, style="bold")
    for label, value in (("pair", event.pair), ("node", event.node), ("epoch", event.epoch)):
        if value is not None:
            text.append(f" {label}={value}")
    if event.reason:
        text.append(f" {event.reason}", style="italic")
    return text


def render(report: SiteReport, now: float | None = None) -> RenderableType:
    now = time.time() if now is None else now
    parts: list[RenderableType] = []
    header = Text(f"site {report.site or '?'}", style="bold")
    header.append(f"  revision {report.revision}", style="dim")
    if report.topology is not None:
        header.append(
            f"  topology applied by {report.topology.applied_by} "
            f"{ago(now - report.topology.applied_at)} ago",
            style="dim",
        )
    parts.append(header)
    if report.warning:
        parts.append(Text(f"WARNING: {report.warning}", style="bold red"))
    awaiting = [
        p.name
        for w in report.workshops
        for p in w.pairs
        if p.recovery is not None and p.recovery.state == "awaiting" and p.recovery.epoch == p.epoch
    ]
    if awaiting:
        parts.append(
            Text(f" AWAITING OPERATOR: {', '.join(awaiting)} ", style="bold black on yellow")
        )
    paused = [p.name for w in report.workshops for p in w.pairs if p.paused is not None]
    if paused:
        parts.append(
            Text(f" PAUSED: {', '.join(paused)}: no automatic failover ", style="bold white on red")
        )
    if report.site is None:
        parts.append(
            Text(
                "no valid topology in etcd: apply one with `hapair topology apply FILE`",
                style="bold red",
            )
        )
    for w in report.workshops:
        parts.append(_workshop_table(w.name, w.pairs, now))
        plcs = _plcs_table(w.name, w.pairs)
        if plcs is not None:
            parts.append(plcs)
    if report.problems:
        problems = Text("invalid values in etcd (ignored):", style="bold red")
        for p in report.problems:
            problems.append(f"\n  {p.key}: {p.problem}", style="red")
        parts.append(problems)
    if report.events:
        events = Text("recent events:", style="bold")
        for event in report.events[-RECENT_EVENTS:]:
            events.append("\n  ")
            events.append_text(_event_line(event))
        parts.append(events)
    return Group(*parts)
