"""The terminal side of ``hapair top``: keys in (cbreak mode), full-screen frames out.

One frame is drawn when something changed (a report, the connection, a key, the
terminal's size) and once a second, on the second, so that ages and the clock move;
nothing else runs while the site is quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import time
import tty
from collections.abc import Coroutine, Iterator
from ssl import SSLContext
from typing import Any

from rich.console import Console
from rich.live import Live

from hapair.registry.console.top.control import Top, parse_keys
from hapair.registry.console.top.feed import SiteFeed
from hapair.shared.waits import cancelled

SEND_GRACE_S = 5.0


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """Keys one at a time and not echoed; Ctrl-C still interrupts. Restored on exit."""
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _tick(top: Top) -> None:
    while True:
        await asyncio.sleep(1.0 - time.time() % 1.0)
        top.changed.set()


async def run(
    urls: list[str],
    *,
    token: str | None = None,
    ssl: SSLContext | None = None,
    console: Console | None = None,
    tick_s: float = 1.0,
) -> int:
    """Show the dashboard until the operator quits (q, Ctrl-C) or the input ends."""
    console = console or Console()
    top = Top(SiteFeed(urls, token=token, ssl=ssl, tick_s=tick_s))
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    quitting = False
    sends: set[asyncio.Task[bool]] = set()

    def quit_() -> None:
        nonlocal quitting
        quitting = True
        top.changed.set()

    def spawn(coro: Coroutine[Any, Any, bool]) -> None:
        task = loop.create_task(coro)
        sends.add(task)
        task.add_done_callback(sends.discard)

    def on_input() -> None:
        try:
            data = os.read(fd, 1024)
        except OSError:
            data = b""
        if not data:
            quit_()
            return
        for key in parse_keys(data):
            effect = top.press(key)
            if effect == "quit":
                quit_()
            elif effect is not None:
                spawn(top.send(effect))

    background: list[asyncio.Task[None]] = []
    with cbreak(fd):
        try:
            background += [loop.create_task(top.follow()), loop.create_task(_tick(top))]
            # The feed never ends by itself: if it does, it failed; quit and say why.
            background[0].add_done_callback(lambda _: quit_())
            loop.add_reader(fd, on_input)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, quit_)
            loop.add_signal_handler(signal.SIGWINCH, top.changed.set)
            with Live(
                console=console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live:
                while not quitting:
                    await top.changed.wait()
                    top.changed.clear()
                    top.page = max(1, console.size.height // 2 - 4)
                    live.update(top.frame(), refresh=True)
        finally:
            loop.remove_reader(fd)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH):
                loop.remove_signal_handler(sig)
            if sends:  # a confirmed request still under way is let finish
                await asyncio.wait(set(sends), timeout=SEND_GRACE_S)
            await cancelled(*background, *sends)
    return 0
