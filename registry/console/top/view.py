"""The screen of ``hapair top`` as a pure function: no I/O, no clock, no await.

:func:`render` takes the site report last read, the connection state, the time and
the operator's selection, and returns a renderable that lays itself out for the
console it is printed on, from 80x24 up: a title line (LIVE, or DISCONNECTED since
when), the alarms of the whole site, one line per pair grouped by workshop (paged so
that the selected pair is on screen), the selected pair in detail (recovery with where
each held service would resume, pause, a database without synchronous standby, nodes
with role, health, database role and lag, and services with their restart counts,
endpoints, its PLCs on one line), the recent events with their causes, and a footer
with the keys or the question asked.

A report that is not current (the registry went away, or lost etcd) is drawn dim,
under a banner that says since when and how old it is, with its ages frozen at the
time it was read: nothing stale is shown as current. As in ``hapair status``, whose
cells are reused here, values from the registry go into Text, never into markup.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from hapair.registry.console.status import (
    ROLE_STYLES,
    STATE_STYLES,
    _event_line,
    ago,
)
from hapair.registry.console.top.cells import (
    ALARM,
    AWAIT,
    clock,
    fit,
    plc_flags,
    rule,
    spread,
)
from hapair.registry.console.top.detail import pair_detail
from hapair.registry.console.top.state import (
    NOTICE_S,
    Connection,
    Selection,
    as_shown,
    awaiting,
    drifted,
    pair_database,
    pairs_of,
    ready_standbys,
    rollouts,
    selected_pair,
)
from hapair.shared.report import PairReport, SiteReport

ROLE_SHORT = {
    "active": "act",
    "standby": "stby",
    "starting": "start",
    "stopping": "stop",
    "fenced": "FENCED",
    "idle": "idle",
    "down": "DOWN",
}
KEYS_HELP = "arrows: select  PgUp/PgDn  a: ack  s: switchover  q: quit"

# Widths of the pair list's fixed columns; STATE is as wide as the widest on screen, and
# OTHER NODES takes what is left.
W_MARK, W_PAIR, W_ACTIVE, W_EPOCH, W_FOR, W_SVC = 2, 8, 9, 8, 6, 5
W_FIXED = W_MARK + W_PAIR + W_ACTIVE + W_EPOCH + W_FOR + W_SVC + 6  # 6 separating spaces


def render(
    report: SiteReport | None, connection: Connection, now: float, selection: Selection
) -> Dashboard:
    """The whole screen; it is laid out when printed, for the console's size."""
    return Dashboard(report, as_shown(connection, now), now, selection)


# ---- the pair list --------------------------------------------------------------------


def _active(pair: PairReport) -> Text:
    if pair.active is None:
        return Text("NONE", style=ALARM)
    text = Text(pair.active, style="bold green")
    node = next((n for n in pair.nodes if n.name == pair.active), None)
    if node is None or not node.up:
        text.append("?", style="bold red")
    elif not node.healthy:
        text.append("!", style="bold red")
    return text


def _others(pair: PairReport) -> Text:
    text = Text()
    for node in pair.nodes:
        if node.name == pair.active:
            continue
        if text:
            text.append(" ")
        short = ROLE_SHORT.get(node.role, node.role)
        text.append(f"{node.name}:{short}", style=ROLE_STYLES.get(node.role, ""))
        if node.up and not node.healthy:
            text.append("!", style="bold red")
        if node.drained is not None:
            text.append("(drained)", style="yellow")
    return text


def _services_summary(pair: PairReport) -> Text:
    states = [s.state for n in pair.nodes for s in n.services]
    if not states:
        return Text("-", style="dim")
    running = states.count("running")
    bad = any(STATE_STYLES.get(s) == "bold red" for s in states)
    style = "bold red" if bad else "green" if running == len(states) else "yellow"
    return Text(f"{running}/{len(states)}", style=style)


def _flags(pair: PairReport) -> Text:
    flags: list[tuple[str, str]] = []
    if awaiting(pair) is not None:
        flags.append(("AWAITING OPERATOR", AWAIT))
    if pair.paused is not None:
        flags.append(("PAUSED", ALARM))
    if pair.active is None:
        flags.append(("NO ACTIVE", ALARM))
    elif not ready_standbys(pair):
        flags.append(("no standby", "bold yellow"))
    if pair.switchover is not None:
        flags.append(("switchover", "yellow"))
    db = pair_database(pair)
    if db is not None and db.no_sync:
        flags.append(("db async", "bold yellow"))
    if drifted(pair):
        flags.append(("drift", "bold yellow"))
    flags.extend(plc_flags(pair))
    if not flags:
        return Text("ok", style="green")
    return Text(" ").join(Text(label, style=style) for label, style in flags)


def nodes_width(width: int, pairs: list[PairReport]) -> int:
    """What the fixed columns and the widest STATE among ``pairs`` leave to OTHER NODES."""
    w_state = max([len("STATE"), *(_flags(p).cell_len for p in pairs)])
    return min(48, max(8, width - W_FIXED - w_state - 1))


def _pair_row(pair: PairReport, as_of: float, w_nodes: int, selected: bool) -> Text:
    since = ago(as_of - pair.since) if pair.since is not None else "-"
    row = Text.assemble(
        fit(">" if selected else "", W_MARK),
        fit(Text(pair.name, style="bold"), W_PAIR),
        " ",
        fit(_active(pair), W_ACTIVE),
        " ",
        fit(str(pair.epoch) if pair.epoch is not None else "-", W_EPOCH, right=True),
        " ",
        fit(since, W_FOR, right=True),
        " ",
        fit(_others(pair), w_nodes),
        " ",
        fit(_services_summary(pair), W_SVC),
        " ",
        _flags(pair),
    )
    if selected:
        row.stylize("reverse")
    return row


def _header_row(w_nodes: int) -> Text:
    return Text.assemble(
        fit("", W_MARK),
        fit("PAIR", W_PAIR),
        " ",
        fit("ACTIVE", W_ACTIVE),
        " ",
        fit("EPOCH", W_EPOCH, right=True),
        " ",
        fit("FOR", W_FOR, right=True),
        " ",
        fit("OTHER NODES", w_nodes),
        " ",
        fit("SVC", W_SVC),
        " ",
        "STATE",
        style="bold",
    )


@dataclass(frozen=True, slots=True)
class _Row:
    workshop: str
    pair: PairReport | None
    """None: the workshop's heading."""
    continued: bool = False


def paginate(entries: list[tuple[str, PairReport]], per_page: int) -> list[list[_Row]]:
    """Pages of at most ``per_page`` rows; every page starts with its workshop's name."""
    per_page = max(2, per_page)
    pages: list[list[_Row]] = []
    page: list[_Row] = []
    current: str | None = None
    for ws, pair in entries:
        new_workshop = ws != current
        need = 2 if new_workshop or not page else 1
        if page and len(page) + need > per_page:
            pages.append(page)
            page = []
        if not page or new_workshop:
            page.append(_Row(ws, None, continued=not new_workshop))
        page.append(_Row(ws, pair))
        current = ws
    if page:
        pages.append(page)
    return pages


def _row_line(row: _Row, as_of: float, w_nodes: int, selected: str | None) -> Text:
    if row.pair is None:
        name = f"{row.workshop} (continued)" if row.continued else row.workshop
        return Text(f"workshop {name}", style="bold magenta")
    return _pair_row(row.pair, as_of, w_nodes, row.pair.name == selected)


# ---- title, alarms, events, footer ----------------------------------------------------


def _title(report: SiteReport | None, conn: Connection, now: float, width: int) -> list[Text]:
    """Always two lines, so that the rest of the screen does not move: the title, then
    the site's alarms, or why what is shown is not current."""
    left = Text(" hapair top ", style="bold reverse")
    if report is not None and report.site:
        left.append(f" {report.site}", style="bold")
    if conn.live:
        left.append("  LIVE", style="bold green")
        left.append(f" {conn.url}", style="dim")
        revision = f"rev {report.revision}  " if report is not None else ""
        second = _alarms(report) if report is not None else Text("")
        return [spread(left, f"{revision}{clock(now)}", width), second]
    if conn.since is None:
        left.append(f"  connecting to {conn.url or 'a registry'}...", style="yellow")
        return [spread(left, clock(now), width), Text("")]
    left.append("  ")
    left.append(" DISCONNECTED ", style=ALARM)
    left.append(f" since {clock(conn.since)} ({ago(now - conn.since)} ago)", style="bold red")
    second = Text()
    if report is not None and conn.read_at is not None:
        second.append(
            f"NOT CURRENT (read {clock(conn.read_at)}, {ago(now - conn.read_at)} ago): ",
            style="bold red",
        )
    second.append(conn.error or "no registry answers", style="red")
    return [spread(left, clock(now), width), second]


def _alarms(report: SiteReport) -> Text:
    if report.site is None:
        return Text(
            "no valid topology in etcd: apply one with `hapair topology apply FILE`",
            style="bold red",
        )
    entries = pairs_of(report)
    groups = (
        ("AWAITING OPERATOR", AWAIT, [p.name for _, p in entries if awaiting(p) is not None]),
        ("PAUSED", ALARM, [p.name for _, p in entries if p.paused is not None]),
        ("NO ACTIVE", ALARM, [p.name for _, p in entries if p.active is None]),
        ("PACKAGE DRIFT", AWAIT, [p.name for _, p in entries if drifted(p)]),
    )
    text = Text()
    for label, style, names in groups:
        if names:
            text.append(f" {label}: {', '.join(names)} ", style=style)
            text.append(" ")
    if report.problems:
        text.append(f"{len(report.problems)} invalid value(s) in etcd, ignored", style="red")
    return text


def _rollout_lines(report: SiteReport, now: float) -> list[Text]:
    """One line per rollout under way: its pair, its step and for how long."""
    lines = []
    for r in rollouts(report):
        line = Text(f" ROLLOUT {r.pair} ", style=AWAIT)
        count = f"step {r.step}/{r.of}: " if r.step is not None and r.of else ""
        line.append(f" {count}{r.what} (for {ago(max(0.0, now - r.at))})", style="bold yellow")
        lines.append(line)
    return lines


def _event_lines(report: SiteReport, width: int, room: int) -> list[Text]:
    if room < 2 or not report.events:
        return []
    lines = [rule(Text("recent events, newest first", style="bold"), width)]
    lines.extend(_event_line(e) for e in reversed(report.events[-(room - 1) :]))
    return lines


def _footer(sel: Selection, width: int, pages: str) -> Text:
    if sel.prompt is not None:
        # However long the question, its end stays on screen: it says which key does it.
        hint = Text()
        if sel.prompt.action == "switchover" and len(sel.prompt.targets) > 1:
            hint.append("  t: another target", style="bold")
        what, room = sel.prompt.what, width - hint.cell_len - len(" ? [y/N] ")
        if cell_len(what) > room:
            what = set_cell_size(what, room - 1) + "…"
        return Text(f" {what}? [y/N] ", style=AWAIT) + hint
    if sel.sending is not None:
        return Text(f"sending: {sel.sending}...", style="bold yellow")
    return spread(Text(KEYS_HELP, style="dim"), Text(pages, style="dim"), width)


def _notice(console: Console, sel: Selection, now: float, width: int) -> list[Text]:
    """The outcome of the last request, on at most two lines, while it is recent."""
    n = sel.notice
    if n is None or now - n.at > NOTICE_S:
        return []
    text = Text(n.text, style="green" if n.ok else "bold red")
    return list(text.wrap(console, width))[:2]


# ---- the screen -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dashboard:
    """The screen for one state; lays itself out for the console's width and height.

    From the top: two title lines, the pair list, the selected pair, the recent events,
    the outcome of the last request, the footer. The list and the selected pair get
    room that depends on the height only, so pages do not shift as the state changes;
    the events take what is left."""

    report: SiteReport | None
    connection: Connection
    now: float
    selection: Selection

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        height = options.height or options.size.height
        for line in self.lines(console, options, width, height):
            line.truncate(width, overflow="ellipsis")
            line.no_wrap = True
            line.end = "\n"
            yield line

    def lines(
        self, console: Console, options: ConsoleOptions, width: int, height: int
    ) -> list[Text]:
        sel = self.selection
        top = _title(self.report, self.connection, self.now, width)
        if self.report is not None:
            top += _rollout_lines(self.report, self.now)
        notice = _notice(console, sel, self.now, width)
        room = max(0, height - len(top) - 1)
        body, pages = self._body(console, options, width, room, len(notice))
        body = body[: room - len(notice)]
        body += [Text("")] * (room - len(notice) - len(body))
        return [*top, *body, *notice, _footer(sel, width, pages)][:height]

    def _body(
        self, console: Console, options: ConsoleOptions, width: int, room: int, taken: int
    ) -> tuple[list[Text], str]:
        """The list, the selected pair and the events in ``room`` lines, less ``taken``
        at the bottom; and where the page is in the list."""
        report, conn = self.report, self.connection
        if report is None:
            return [Text("waiting for the site state from a registry...", style="yellow")], ""
        entries = pairs_of(report)
        if not entries:
            return [Text("no pairs in the site", style="dim")], ""
        # Ages of a report that is not current are frozen when it was read.
        as_of = self.now if conn.live or conn.read_at is None else conn.read_at
        ws, pair = selected_pair(report, self.selection.pair) or entries[0]
        n_detail = min(10, max(4, room // 3))
        n_table = max(3, room - n_detail - 3)
        pages = paginate(entries, n_table - 1)
        number = next(i for i, p in enumerate(pages) if any(r.pair is pair for r in p))
        w_nodes = nodes_width(width, [r.pair for r in pages[number] if r.pair is not None])
        table = [_header_row(w_nodes)]
        table += [_row_line(r, as_of, w_nodes, pair.name) for r in pages[number]]
        detail = pair_detail(console, options, ws, pair, as_of, width)[:n_detail]
        events = _event_lines(report, width, room - taken - len(table) - len(detail))
        body = table + detail + events
        if not conn.live:
            for line in body:
                line.stylize("dim")
        shown = [r.pair.name for r in pages[number] if r.pair is not None]
        first = 1 + sum(1 for p in pages[:number] for r in p if r.pair is not None)
        return body, f"pairs {first}-{first + len(shown) - 1}/{len(entries)}"
