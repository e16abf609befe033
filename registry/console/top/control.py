"""Keys for ``hapair top``: what a key does is decided purely, then carried out.

:func:`parse_keys` turns terminal input into key names; :func:`handle` turns one key
into a new :class:`~registry.console.top.view.Selection` and, at most, one effect: quit, or an
admin :class:`~registry.console.top.feed.Request` the operator has just confirmed with ``y``.
Nothing is sent without that confirmation, and an acknowledgement names the epoch of
the recovery the operator was shown, so the registry refuses it if the pair has failed
over again since. :class:`Top` holds the state and sends the requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from hapair.registry.console.top.feed import Request, SiteFeed
from hapair.registry.console.top.state import (
    Connection,
    Notice,
    Prompt,
    Selection,
    as_shown,
    awaiting,
    pairs_of,
    ready_standbys,
    selected_pair,
)
from hapair.registry.console.top.view import Dashboard, render
from hapair.shared.report import PairReport, SiteReport

Effect = Request | Literal["quit"] | None

SEQUENCES = {
    b"\x1b[A": "up",
    b"\x1bOA": "up",
    b"\x1b[B": "down",
    b"\x1bOB": "down",
    b"\x1b[5~": "pgup",
    b"\x1b[6~": "pgdn",
    b"\x1b[H": "home",
    b"\x1bOH": "home",
    b"\x1b[1~": "home",
    b"\x1b[F": "end",
    b"\x1bOF": "end",
    b"\x1b[4~": "end",
}
SINGLE = {"\t": "tab", "\r": "enter", "\n": "enter", "\x1b": "esc", " ": "pgdn"}
MOVES = {"up": -1, "k": -1, "down": 1, "j": 1}


def parse_keys(data: bytes) -> list[str]:
    """Key names in terminal input: ``up``, ``pgdn``, ``esc``... or the character."""
    keys: list[str] = []
    i = 0
    while i < len(data):
        seq = next((s for s in SEQUENCES if data.startswith(s, i)), None)
        if seq is not None:
            keys.append(SEQUENCES[seq])
            i += len(seq)
        elif data[i : i + 2] in (b"\x1b[", b"\x1bO"):
            # An escape sequence this screen has no use for: skip it whole.
            j = i + 2
            while j < len(data) and not 0x40 <= data[j] <= 0x7E:
                j += 1
            i = j + 1
        else:
            char = chr(data[i])
            keys.append(SINGLE.get(char, char))
            i += 1
    return keys


def handle(
    sel: Selection,
    key: str,
    report: SiteReport | None,
    conn: Connection,
    now: float,
    page: int = 8,
) -> tuple[Selection, Effect]:
    """What ``key`` does: the next selection, and quit or a confirmed request."""
    if sel.prompt is not None:
        return _answer(sel, sel.prompt, key, report, now)
    if key == "q":
        return sel, "quit"
    current = selected_pair(report, sel.pair) if report is not None else None
    if report is None or current is None:
        return sel, None
    names = [p.name for _, p in pairs_of(report)]
    index = names.index(current[1].name)
    step = {**MOVES, "pgup": -page, "pgdn": page, "home": -len(names), "end": len(names)}
    if key in step:
        index = min(len(names) - 1, max(0, index + step[key]))
        return replace(sel, pair=names[index]), None
    if key not in ("a", "s"):
        return sel, None
    pair = current[1]
    if not as_shown(conn, now).live:
        return _tell(sel, "not connected to a registry: nothing sent", False, now), None
    if sel.sending is not None:
        return _tell(sel, f"wait: {sel.sending} is under way", False, now), None
    if key == "a":
        return _ack_prompt(sel, pair, now), None
    return _switchover_prompt(sel, pair, None, now), None


def _tell(sel: Selection, text: str, ok: bool, now: float) -> Selection:
    return replace(sel, prompt=None, notice=Notice(text, ok, now))


def _ack_prompt(sel: Selection, pair: PairReport, now: float) -> Selection:
    rec = awaiting(pair)
    if rec is None:
        return _tell(sel, f"pair {pair.name} has no recovery awaiting an operator", False, now)
    held = ", ".join(rec.held) or "no service"
    what = (
        f"Acknowledge the recovery of {pair.name} at epoch {rec.epoch}: "
        f"start {held} on {rec.to_node}"
    )
    return replace(sel, pair=pair.name, prompt=Prompt("ack", pair.name, what, epoch=rec.epoch))


def _switchover_prompt(sel: Selection, pair: PairReport, to: str | None, now: float) -> Selection:
    if pair.active is None:
        return _tell(sel, f"pair {pair.name} has no active node to switch over", False, now)
    ready = [n.name for n in ready_standbys(pair)]
    others = [n.name for n in pair.nodes if n.name != pair.active and n.name not in ready]
    targets = (*ready, *others)
    if not targets:
        return _tell(sel, f"pair {pair.name} has no other node", False, now)
    to = to if to in targets else targets[0]
    what = f"Switch {pair.name} over from {pair.active} to {to}"
    if to not in ready:
        what += f" ({to} is not a ready standby)"
    lacks = next((n.drift for n in pair.nodes if n.name == to), [])
    if lacks:
        what += f" ({to} lacks the declared package version of {', '.join(lacks)})"
    prompt = Prompt("switchover", pair.name, what, to=to, targets=targets)
    return replace(sel, pair=pair.name, prompt=prompt)


def _answer(
    sel: Selection, prompt: Prompt, key: str, report: SiteReport | None, now: float
) -> tuple[Selection, Effect]:
    if key in ("y", "Y"):
        body: dict[str, object] = (
            {"epoch": prompt.epoch} if prompt.action == "ack" else {"to": prompt.to}
        )
        sending = f"{prompt.action} of {prompt.pair}"
        return replace(sel, prompt=None, sending=sending), Request(prompt.action, prompt.pair, body)
    if prompt.action == "switchover" and key in ("t", "tab") and len(prompt.targets) > 1:
        found = selected_pair(report, prompt.pair) if report is not None else None
        if found is not None and found[1].name == prompt.pair:
            targets = prompt.targets
            after = targets[(targets.index(prompt.to or "") + 1) % len(targets)]
            return _switchover_prompt(sel, found[1], after, now), None
    return _tell(sel, f"{prompt.action} of {prompt.pair} cancelled: nothing sent", True, now), None


class Top:
    """One dashboard's state: the feed's last word and the operator's selection.

    ``changed`` is set whenever the screen should be drawn again."""

    def __init__(self, feed: SiteFeed, clock: Callable[[], float] = time.time) -> None:
        self.feed = feed
        self.clock = clock
        self.report: SiteReport | None = None
        self.connection = Connection(url=feed.url)
        self.selection = Selection()
        self.page = 8
        """Pairs that PgUp/PgDn move by; the terminal sets it from its height."""
        self.changed = asyncio.Event()

    def frame(self) -> Dashboard:
        return render(self.report, self.connection, self.clock(), self.selection)

    def update(self, report: SiteReport | None, conn: Connection) -> None:
        # A live registry is read again every tick; only news is worth a frame.
        if report == self.report and conn == replace(self.connection, read_at=conn.read_at):
            self.connection = conn
            return
        self.report, self.connection = report, conn
        self.changed.set()

    async def follow(self) -> None:
        """Keep the state current from the feed; runs until cancelled."""
        async for report, conn in self.feed.follow():
            self.update(report, conn)

    def press(self, key: str) -> Effect:
        """Handle one key; a returned request is for :meth:`send`."""
        self.selection, effect = handle(
            self.selection, key, self.report, self.connection, self.clock(), self.page
        )
        self.changed.set()
        return effect

    async def send(self, request: Request) -> bool:
        """Send a confirmed request; its outcome becomes the notice on screen."""
        ok, text = await self.feed.send(request)
        notice = Notice(text, ok, self.clock())
        self.selection = replace(self.selection, sending=None, notice=notice)
        self.changed.set()
        return ok
