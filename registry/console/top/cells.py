"""Small pieces of ``hapair top``'s screen shared by its parts: cells cut or padded to
a width, rules, the clock, the PLCs' line and flags."""

from __future__ import annotations

from datetime import datetime

from rich.text import Text

from hapair.registry.console.status import PLC_STYLES, path_name
from hapair.shared.report import PairReport, PlcReport

ALARM = "bold white on red"
AWAIT = "bold black on yellow"


def clock(stamp: float) -> str:
    return datetime.fromtimestamp(stamp).strftime("%H:%M:%S")


def fit(text: Text | str, width: int, right: bool = False) -> Text:
    """``text`` cut (with an ellipsis) or padded to exactly ``width`` cells."""
    out = Text(text) if isinstance(text, str) else text.copy()
    out.truncate(max(0, width), overflow="ellipsis")
    pad = width - out.cell_len
    if pad > 0:
        if right:
            out.pad_left(pad)
        else:
            out.pad_right(pad)
    return out


def spread(left: Text, right: Text | str, width: int) -> Text:
    """``left`` and ``right`` on one line, ``right`` flush with the right edge."""
    right = Text(right) if isinstance(right, str) else right
    return Text.assemble(fit(left, width - right.cell_len - 1), " ", right)


def flat(cell: Text, sep: str = " · ") -> Text:
    """A multi-line cell of ``hapair status`` on one line."""
    return Text(sep, style="dim").join(line for line in cell.split("\n") if line.plain)


def rule(head: Text, width: int) -> Text:
    line = Text("─ ", style="dim") + head + Text(" ")
    line.append("─" * max(0, width - line.cell_len), style="dim")
    line.truncate(width)
    return line


def plcs_seen(pair: PairReport) -> tuple[str | None, list[PlcReport]]:
    """The PLCs as the active node sees them (else the first node reporting any),
    and that node; PLCs no comm server reports are listed too."""
    nodes = [p.node for p in pair.plcs if p.node is not None]
    node = pair.active if pair.active in nodes else next(iter(nodes), None)
    return node, [p for p in pair.plcs if p.node == node or p.node is None]


# The worst first: on one line cut at the screen's edge, trouble stays in view.
PLC_ORDER = {"down": 0, "unreported": 1, "degraded": 2, "starting": 3}


def plc_flags(pair: PairReport) -> list[tuple[str, str]]:
    _, plcs = plcs_seen(pair)
    states = {p.state for p in plcs}
    if "down" in states:
        critical = any(p.critical for p in plcs if p.state == "down")
        return [("PLC DOWN", "bold red" if critical else "yellow")]
    if "unreported" in states:
        return [("PLC no report", "yellow")]
    if "degraded" in states:
        return [("PLC path", "yellow")]
    return []


def plc_line(pair: PairReport) -> Text:
    """Every PLC on one line, the worst first: ``PLCs on a: press-1* degraded,
    backup · oven-1 ok`` (``*`` critical); the line is cut at the screen's edge."""
    node, plcs = plcs_seen(pair)
    text = Text(f"PLCs on {node}: " if node else "PLCs: ", style="dim")
    for i, plc in enumerate(sorted(plcs, key=lambda p: PLC_ORDER.get(p.state, 9))):
        if i:
            text.append(" · ", style="dim")
        text.append(plc.name + ("*" if plc.critical else ""), style="bold" if plc.critical else "")
        state = "no report" if plc.state == "unreported" else plc.state
        text.append(f" {state}", style=PLC_STYLES.get(plc.state, ""))
        if plc.path and plc.state != "down":
            text.append(f", {path_name(plc.path)}", style="yellow")
    return text
