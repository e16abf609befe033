"""The selected pair in ``hapair top``, in detail: recovery and where each held service
would resume, pause, a database without synchronous standby, a pending switchover, the
nodes with role, health, database role and lag, and services, endpoints, PLCs."""

from __future__ import annotations

from rich.console import Console, ConsoleOptions
from rich.table import Table
from rich.text import Text

from hapair.registry.console.status import (
    _endpoints_cell,
    _health_cell,
    _role_cell,
    _services_cell,
    ago,
    context_text,
)
from hapair.registry.console.top.cells import ALARM, AWAIT, flat, plc_line, rule
from hapair.registry.console.top.state import PairDatabase, pair_database
from hapair.shared.report import DatabaseReport, NodeReport, PairReport


def _recovery_lines(pair: PairReport, as_of: float) -> list[Text]:
    rec = pair.recovery
    if rec is None or rec.epoch != pair.epoch:
        return []
    if rec.state != "awaiting":
        when = f", {ago(as_of - rec.acked_at)} ago" if rec.acked_at is not None else ""
        return [
            Text(
                f"recovery at epoch {rec.epoch} acknowledged by {rec.acked_by or '?'}{when}",
                style="dim",
            )
        ]
    text = Text(" AWAITING OPERATOR ", style=AWAIT)
    text.append(
        f" {rec.cause}, {ago(as_of - rec.at)} ago: {rec.from_node or '?'} -> {rec.to_node};"
        f" held: {', '.join(rec.held) or 'nothing'}; press a to acknowledge epoch {rec.epoch}",
        style="yellow",
    )
    lines = [text]
    for service, ctx in sorted((rec.contexts or {}).items()):
        # One line each, cut if need be: the step to resume from comes first.
        line = Text("  ") + context_text(service, ctx, " · ")
        line.no_wrap, line.overflow = True, "ellipsis"
        lines.append(line)
    return lines


def _pair_notes(pair: PairReport, as_of: float) -> list[Text]:
    notes = _recovery_lines(pair, as_of)
    if pair.paused is not None:
        text = Text(" PAUSED ", style=ALARM)
        text.append(f" by {pair.paused.by} {ago(as_of - pair.paused.at)} ago", style="red")
        if pair.paused.reason:
            text.append(f": {pair.paused.reason}", style="red")
        text.append("; no automatic failover", style="red")
        notes.append(text)
    db = pair_database(pair)
    if db is not None and db.no_sync:
        notes.append(
            Text(
                f"database: no synchronous standby: a commit may be on {db.primary} only",
                style="bold yellow",
            )
        )
    if pair.switchover is not None:
        req = pair.switchover
        notes.append(
            Text(
                f"switchover to {req.to or 'the first ready standby'} requested by {req.by} "
                f"{ago(as_of - req.at)} ago",
                style="yellow",
            )
        )
    return notes


def size(n: int) -> str:
    """Bytes, short: ``0 B``, ``12 kB``, ``3.4 MB``."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 10 else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _database_cell(name: str, db: DatabaseReport | None, pair_db: PairDatabase | None) -> Text:
    """A node's PostgreSQL on one short line: role, and for a standby whether commits
    wait for it (``sync``) and how far behind it is."""
    if db is None or pair_db is None:
        return Text("")
    if db.role == "primary":
        text = Text("db primary", style="green")
        if name == pair_db.primary and pair_db.no_sync:
            text.append(" ASYNC", style="bold yellow")
        return text
    if db.role != "standby":
        return Text(f"db {db.role}", style="yellow" if db.role == "starting" else "bold red")
    sync = name in pair_db.sync
    text = Text("db sync" if sync else "db standby", style="cyan")
    if not db.streaming:
        return text.append(" NOT STREAMING", style="bold red")
    if db.lag_bytes is not None:
        text.append(f" lag {size(db.lag_bytes)}")
    if db.lag_s is not None:
        text.append(f" {db.lag_s:.1f}s")
    return text


def _services_only(node: NodeReport) -> Text:
    # The database has a column of its own here.
    return _services_cell(node.model_copy(update={"database": None}))


def _nodes_grid(pair: PairReport) -> Table:
    pair_db = pair_database(pair)
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(max_width=30)
    if pair_db is not None:
        grid.add_column(no_wrap=True)
    grid.add_column(ratio=1)
    for node in pair.nodes:
        db = [_database_cell(node.name, node.database, pair_db)] if pair_db is not None else []
        grid.add_row(
            Text(node.name, style="bold" if node.name == pair.active else ""),
            flat(_role_cell(node)),
            flat(_health_cell(node)),
            *db,
            flat(_services_only(node)),
        )
    return grid


def pair_detail(
    console: Console,
    options: ConsoleOptions,
    workshop: str,
    pair: PairReport,
    as_of: float,
    width: int,
) -> list[Text]:
    head = Text(pair.name, style="bold")
    head.append(f"  workshop {workshop}", style="dim")
    if pair.active is None:
        head.append("  no active node", style="bold red")
    else:
        head.append(f"  active {pair.active} epoch {pair.epoch}")
        if pair.since is not None:
            head.append(f" for {ago(as_of - pair.since)}")
    lines = [rule(head, width)]
    for note in _pair_notes(pair, as_of):
        lines.extend(note.wrap(console, width))
    rendered = console.render_lines(_nodes_grid(pair), options.update(width=width, height=None))
    lines.extend(Text.assemble(*((s.text, s.style or "") for s in line)) for line in rendered)
    if pair.endpoints:
        lines.append(Text("endpoints: ", style="dim") + flat(_endpoints_cell(pair)))
    if pair.plcs:
        lines.append(plc_line(pair))
    return lines
