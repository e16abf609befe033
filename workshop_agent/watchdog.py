"""The watchdog: a separate small process that kills active-only services when the
agent stops extending its deadline (agent frozen or hung) or dies (its pipe closes).

The agent cannot fence itself while it is frozen, so this process holds the deadline
(the fence point plus half the margin) and acts on it alone. Protocol, one line each
on stdin: ``deadline <monotonic seconds>``, ``add <pgid>``, ``del <pgid>``, ``vip add
<address/prefix> <interface>``, ``vip del <address/prefix> <interface>``. At the deadline
it removes the registered virtual addresses first (clients must stop reaching this node
before anything else), then kills every registered group. On end of file it does the
same and exits: neither services nor the virtual address outlive their agent.

It inherits the agent's node lock, so a restarted agent cannot take the node's pair
back before this process has finished killing the previous run's services.
"""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import IO


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(
        f'ts={stamp} level=warning logger=hapair.watchdog event="{message}"',
        file=sys.stderr,
        flush=True,
    )


def _kill_all(groups: set[int], why: str) -> None:
    for pgid in sorted(groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    if groups:
        _log(f"killed {len(groups)} service group(s): {why}")
    groups.clear()


VIP_TIMEOUT_S = 1.0


def _drop_vips(vips: set[tuple[str, str]]) -> list[subprocess.Popen[bytes]]:
    """Start removing every virtual address; the caller waits (bounded) afterwards."""
    procs = []
    for address, interface in sorted(vips):
        with contextlib.suppress(OSError):
            procs.append(
                subprocess.Popen(
                    ["ip", "-4", "addr", "del", address, "dev", interface],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    if vips:
        _log(f"removing virtual address(es) {', '.join(a for a, _ in sorted(vips))}")
    vips.clear()
    return procs


def _stop_everything(groups: set[int], vips: set[tuple[str, str]], why: str) -> None:
    procs = _drop_vips(vips)
    _kill_all(groups, why)
    for proc in procs:
        try:
            proc.wait(VIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(stream: IO[bytes]) -> None:
    """Read commands until end of file; kill on deadline and on exit."""
    deadline = float("inf")
    groups: set[int] = set()
    vips: set[tuple[str, str]] = set()
    buffer = b""
    fd = stream.fileno()
    os.set_blocking(fd, False)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    while True:
        timeout = None if deadline == float("inf") else max(0.0, deadline - time.monotonic())
        if sel.select(timeout):
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                _stop_everything(groups, vips, "agent gone")
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                words = line.decode(errors="replace").split()
                try:
                    deadline = _apply(words, groups, vips, deadline)
                except ValueError:
                    _log(f"ignored bad command {' '.join(words)!r}")
        if time.monotonic() >= deadline:
            _stop_everything(groups, vips, "agent did not confirm its lease before the fence point")
            deadline = float("inf")


def _apply(
    words: list[str], groups: set[int], vips: set[tuple[str, str]], deadline: float
) -> float:
    match words:
        case ["deadline", value]:
            at = float(value)
            if math.isnan(at):
                raise ValueError(value)
            return at
        case ["add", pgid]:
            groups.add(int(pgid))
        case ["del", pgid]:
            groups.discard(int(pgid))
        case ["vip", "add", address, interface]:
            vips.add((address, interface))
        case ["vip", "del", address, interface]:
            vips.discard((address, interface))
        case _:
            _log(f"ignored bad command {' '.join(words)!r}")
    return deadline


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group; the watchdog must outlive
    # the agent's own shutdown, which ends by closing the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(sys.stdin.buffer)


class WatchdogLink:
    """The agent's end: starts the watchdog and feeds it (non-blocking, tiny writes)."""

    def __init__(self, keep_fds: tuple[int, ...] = ()) -> None:
        self._keep_fds = keep_fds
        self._proc: subprocess.Popen[bytes] | None = None
        self._groups: set[int] = set()
        self._vips: set[tuple[str, str]] = set()
        self._deadline = float("inf")

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "workshop_agent.watchdog"],
            stdin=subprocess.PIPE,
            pass_fds=self._keep_fds,
            start_new_session=True,
        )
        for pgid in self._groups:
            self._send(f"add {pgid}")
        for address, interface in self._vips:
            self._send(f"vip add {address} {interface}")
        self._send(f"deadline {self._deadline!r}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                _log("watchdog exited; starting a new one")
            self.start()
            return
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._proc = None
            self.start()

    def deadline(self, at: float) -> None:
        self._deadline = at
        self._send(f"deadline {at!r}")

    def add(self, pgid: int) -> None:
        self._groups.add(pgid)
        self._send(f"add {pgid}")

    def remove(self, pgid: int) -> None:
        self._groups.discard(pgid)
        self._send(f"del {pgid}")

    def add_vip(self, address: str, interface: str) -> None:
        """Removed by the watchdog at the deadline, before it kills the services."""
        self._vips.add((address, interface))
        self._send(f"vip add {address} {interface}")

    def remove_vip(self, address: str, interface: str) -> None:
        self._vips.discard((address, interface))
        self._send(f"vip del {address} {interface}")

    def close(self) -> None:
        """Close the pipe: the watchdog kills what is still registered and exits."""
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(2)


if __name__ == "__main__":
    main()
