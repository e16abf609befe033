"""The watchdog: a separate small process that kills active-only services when the
agent stops extending its deadline (agent frozen or hung) or dies (its pipe closes).

The agent cannot fence itself while it is frozen, so this process holds the deadline
(the fence point plus half the margin) and acts on it alone. Protocol, one line each
on stdin: ``deadline <CLOCK_BOOTTIME seconds>``, ``add <pgid> <start>``, ``del <pgid>``,
``cgroup add <path>``, ``cgroup del <path>``, ``cgroup tree <path>``,
``pg add <data dir>``, ``pg del <data dir>`` (percent-encoded),
``vip add <address/prefix> <interface>``, ``vip del <address/prefix> <interface>``.
At the deadline it removes the registered virtual addresses first (clients must stop
reaching this node before anything else), then kills every registered cgroup and process
group. On end of file it does the same, kills and removes the agent's whole cgroup tree
(``cgroup tree``) and exits: neither services nor the virtual address outlive their
agent. Anything registered while the deadline has passed is killed at once: it was
started by an agent that had not yet seen its term end.

Deadlines are on ``CLOCK_BOOTTIME``, which goes on counting while the machine is
suspended, and the wait is cut into short slices (the kernel's own timeouts are on the
monotonic clock, which stops): a watchdog resumed after a suspend acts at once.

A group is registered with its leader's start time (``/proc/<pid>/stat``, field 22),
which the watchdog checks as it opens a pidfd on the leader: from then on the pidfd
says whether that very process still holds its PID, so a PID the kernel has given to
another process since is never killed. A primary's data directory is registered too,
from before its promotion until it has stopped: at the deadline the watchdog kills
whichever postmaster serves it then (named by its ``postmaster.pid``, a postgres working
in that directory), so a server the agent restarted in place is killed even before the
agent has registered its new PID, and so is one the agent froze while promoting it. (The
agent registers a leader right after the fork, while it is its unreaped child; only a
leader that died, was reaped and whose PID came round again within one clock tick before
this process read the line could be mistaken for the new holder.) The service's program
runs only once its registration is in this process's pipe (the exec guard waits for the
agent's release): the pipe keeps the order, and this process reads it whatever the agent
does next, so an agent frozen right after a fork leaves no service unknown here.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import quote, unquote

from hapair.shared.clock import Clock, boottime
from hapair.workshop_agent import cgroups

# How long one wait lasts at most: the bound on acting late after a suspend.
SLICE_S = 0.1


def _log(message: str, **fields: object) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    extra = "".join(f" {k}={v}" for k, v in fields.items())
    print(
        f'ts={stamp} level=warning logger=hapair.watchdog event="{message}"{extra}',
        file=sys.stderr,
        flush=True,
    )


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (None: no such process).

    A PID and its start time name one process for the whole life of the machine."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 of the whole line


def serving_postmaster(data_dir: Path) -> int | None:
    """The postmaster serving ``data_dir`` now: the PID its ``postmaster.pid`` names, if
    that is a postgres working in that directory (else the file is stale).

    Not ``hapair.workshop_agent.pg``'s own check: that package loads pydantic, seconds on a
    busy machine, and this process must start at once."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        stat = Path(f"/proc/{pid}/stat").read_text()
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except (OSError, ValueError):
        return None
    name = stat[stat.find("(") + 1 : stat.rfind(")")]
    running = name in ("postgres", "postmaster") and cwd == data_dir.resolve()
    return pid if running else None


class Leader:
    """A registered group's leader, pinned by a pidfd (None: it was gone already)."""

    def __init__(self, pid: int, start: int) -> None:
        self.pid = pid
        self.pidfd: int | None = None
        with contextlib.suppress(OSError):
            fd = os.pidfd_open(pid)
            # The start time read after the open proves the pidfd is the registered one.
            if start_time(pid) == start:
                self.pidfd = fd
            else:
                os.close(fd)

    def holds_its_pid(self) -> bool:
        """True until the leader has been reaped (a zombie still holds its PID)."""
        if self.pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True  # not allowed to signal it, but it exists
        return True

    def kill_group(self) -> bool:
        """Kill the group; False if its id now belongs to somebody else.

        A leader that has died and been reaped (its children may still run in its group)
        leaves its PID unused as long as the group has members: the kernel gives no
        process a PID that is still some group's id. A process with that PID is then
        someone else's, and so is its group."""
        leader = self.holds_its_pid()
        if not leader and start_time(self.pid) is not None:
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if leader and self.pidfd is not None:  # and the leader, had it left its group
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        return True

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


@dataclass
class Registered:
    groups: dict[int, Leader] = field(default_factory=dict)
    cgroups: set[str] = field(default_factory=set)
    vips: set[tuple[str, str]] = field(default_factory=set)
    trees: set[str] = field(default_factory=set)  # removed when the agent is gone
    data_dirs: set[str] = field(default_factory=set)  # of a primary: kill its postmaster

    def __bool__(self) -> bool:
        return bool(self.groups or self.cgroups or self.vips or self.data_dirs)

    def add(self, pgid: int, start: int) -> None:
        self.remove(pgid)
        self.groups[pgid] = Leader(pgid, start)

    def remove(self, pgid: int) -> None:
        old = self.groups.pop(pgid, None)
        if old is not None:
            old.close()


def _kill_all(reg: Registered, why: str, clock: Clock) -> None:
    for path in sorted(reg.cgroups):
        cgroups.kill(Path(path))
    leaders = list(reg.groups.values())
    for data_dir in sorted(reg.data_dirs):
        pid = serving_postmaster(Path(data_dir))
        start = None if pid is None else start_time(pid)
        if pid is not None and start is not None and pid not in reg.groups:
            leaders.append(Leader(pid, start))  # a postmaster not registered (yet)
    killed = [leader for leader in leaders if leader.kill_group()]
    if reg.groups or reg.cgroups or killed:
        _log(f"killed {len(reg.cgroups)} service cgroup(s) and {len(killed)} group(s): {why}")
    _log_gone(killed, sorted(reg.cgroups), clock)
    for leader in leaders:
        leader.close()
    reg.groups.clear()
    reg.cgroups.clear()
    # A data directory stays registered until the agent says it is no longer primary:
    # whatever postmaster serves it while the deadline has passed is killed.


GONE_WAIT_S = 1.0


def _log_gone(leaders: list[Leader], paths: list[str], clock: Clock) -> None:
    """Log when each killed leader has exited (its pidfd turns readable) and each killed
    cgroup is empty, bounded: the record of when a service really ended while its agent
    could not see it."""
    sel = selectors.DefaultSelector()
    for leader in leaders:
        if leader.pidfd is not None:
            sel.register(leader.pidfd, selectors.EVENT_READ, leader)
    waiting = set(paths)
    deadline = clock() + GONE_WAIT_S
    while (sel.get_map() or waiting) and (left := deadline - clock()) > 0:
        # The kernel tells no one when a cgroup empties but through cgroup.events: poll.
        for key, _ in sel.select(min(left, 0.01) if waiting else left):
            sel.unregister(key.fileobj)
            _log("service gone", pid=key.data.pid, at=repr(clock()))
        for path in sorted(p for p in waiting if not cgroups.populated(Path(p))):
            waiting.discard(path)
            _log("cgroup emptied", cgroup=path, at=repr(clock()))
    sel.close()


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


def _stop_everything(reg: Registered, why: str, clock: Clock) -> None:
    procs = _drop_vips(reg.vips)
    _kill_all(reg, why, clock)
    for proc in procs:
        try:
            proc.wait(VIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(stream: IO[bytes], clock: Clock = boottime) -> None:
    """Read commands until end of file; kill on deadline and on exit."""
    deadline = float("inf")
    reg = Registered()
    buffer = b""
    fd = stream.fileno()
    os.set_blocking(fd, False)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    while True:
        left = deadline - clock()
        # Past the deadline there is nothing to wait for but commands.
        timeout = None if left == float("inf") or left <= 0 else min(left, SLICE_S)
        if sel.select(timeout):
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                _stop_everything(reg, "agent gone", clock)
                for tree in reg.trees:
                    cgroups.CgroupTree(Path(tree)).close()
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                words = line.decode(errors="replace").split()
                try:
                    deadline = _apply(words, reg, deadline)
                except ValueError:
                    _log(f"ignored bad command {' '.join(words)!r}")
        if reg and clock() >= deadline:
            _stop_everything(reg, "agent did not confirm its lease before the fence point", clock)


def _apply(words: list[str], reg: Registered, deadline: float) -> float:
    match words:
        case ["deadline", value]:
            at = float(value)
            if math.isnan(at):
                raise ValueError(value)
            return at
        case ["add", pgid, start]:
            reg.add(int(pgid), int(start))
        case ["del", pgid]:
            reg.remove(int(pgid))
        case ["cgroup", "add", path]:
            reg.cgroups.add(path)
        case ["cgroup", "del", path]:
            reg.cgroups.discard(path)
        case ["cgroup", "tree", path]:
            reg.trees.add(path)
        case ["pg", "add", path]:
            reg.data_dirs.add(unquote(path))
        case ["pg", "del", path]:
            reg.data_dirs.discard(unquote(path))
        case ["vip", "add", address, interface]:
            reg.vips.add((address, interface))
        case ["vip", "del", address, interface]:
            reg.vips.discard((address, interface))
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
        self._groups: dict[int, int] = {}
        self._cgroups: set[str] = set()
        self._trees: set[str] = set()
        self._data_dirs: set[str] = set()
        self._vips: set[tuple[str, str]] = set()
        self._deadline = float("inf")

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hapair.workshop_agent.watchdog"],
            stdin=subprocess.PIPE,
            pass_fds=self._keep_fds,
            start_new_session=True,
        )
        for pgid, start in self._groups.items():
            self._send(f"add {pgid} {start}")
        for path in self._cgroups:
            self._send(f"cgroup add {path}")
        for path in self._trees:
            self._send(f"cgroup tree {path}")
        for path in self._data_dirs:
            self._send(f"pg add {quote(path)}")
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
        """``at`` on ``CLOCK_BOOTTIME`` (``hapair.shared.clock.boottime``)."""
        self._deadline = at
        self._send(f"deadline {at!r}")

    def add(self, pgid: int) -> bool:
        """Register the group led by ``pgid``, now (right after the fork), while that PID
        is surely the leader's; False if it has already gone."""
        start = start_time(pgid)
        if start is None:
            return False
        if self._groups.get(pgid) == start:
            return True
        self._groups[pgid] = start
        self._send(f"add {pgid} {start}")
        return True

    def remove(self, pgid: int) -> None:
        self._groups.pop(pgid, None)
        self._send(f"del {pgid}")

    def add_cgroup(self, path: Path) -> None:
        self._cgroups.add(str(path))
        self._send(f"cgroup add {path}")

    def add_tree(self, path: Path) -> None:
        """Kill and remove this cgroup tree once the agent is gone (not at a deadline)."""
        self._trees.add(str(path))
        self._send(f"cgroup tree {path}")

    def add_data_dir(self, path: Path) -> None:
        """A primary's data directory: the watchdog kills the postmaster serving it."""
        if str(path) not in self._data_dirs:
            self._data_dirs.add(str(path))
            self._send(f"pg add {quote(str(path))}")

    def remove_data_dir(self, path: Path) -> None:
        if str(path) in self._data_dirs:
            self._data_dirs.discard(str(path))
            self._send(f"pg del {quote(str(path))}")

    def remove_cgroup(self, path: Path) -> None:
        self._cgroups.discard(str(path))
        self._send(f"cgroup del {path}")

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
