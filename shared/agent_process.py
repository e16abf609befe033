"""Whether the agent that published a node status still runs on this machine.

A node status carries its agent's boot id, PID namespace, PID and start time. The PID
names the agent only on the machine of that boot, in that PID namespace (containers of
one machine share the boot id, not their PIDs), and only while that process lives: a
PID may be reused by any other process once the agent is gone.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from hapair.shared.records import NodeStatus, local_boot_id


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in pairs}


def _stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/{pid}/stat`` after the command name (the state first)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Running (a zombie is dead)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def start_ticks(pid: int | str = "self") -> int | None:
    """When the process started, in clock ticks after boot (field 22 of its stat)."""
    fields = _stat(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


@functools.cache
def own_start_ticks() -> int | None:
    """:func:`start_ticks` of this process, read once: it never changes, and the agent
    publishes it with every status."""
    return start_ticks("self")


@functools.cache
def local_pid_ns() -> int | None:
    """The inode of this process's PID namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def agent_node(pid: int) -> str | None:
    """The node an hapair agent process runs for, or None if ``pid`` is no agent."""
    argv = _cmdline(pid)
    if not any("workshop_agent" in a or a.endswith("hapair-agent") for a in argv):
        return None
    for i, arg in enumerate(argv):
        if arg == "--node" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--node="):
            return arg.split("=", 1)[1]
    return _environ(pid).get("HAPAIR_NODE")


@dataclass(frozen=True, slots=True)
class Here:
    """This machine as a status's PID must be read: its boot and PID namespace."""

    boot_id: str | None
    pid_ns: int | None


@dataclass(frozen=True, slots=True)
class Seen:
    """A live process of this PID namespace: when it started, the node if it is an agent."""

    start: int | None
    node: str | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """True: the status's agent runs here; False: it is gone; None: this machine cannot
    tell. ``why`` says which, for the log."""

    runs: bool | None
    why: str


def judge(status: NodeStatus, here: Here, seen: Seen | None) -> Verdict:
    """Pure: what ``here`` can say of ``status``'s agent, given what it sees of the
    status's PID in its own PID namespace (``seen``, None when no such live process).

    Gone only with proof: the same boot and PID namespace, and the PID dead or reused."""
    if status.boot_id is None or here.boot_id is None or status.boot_id != here.boot_id:
        return Verdict(None, f"it ran on another machine or boot (boot id {status.boot_id})")
    if status.pid_ns is not None and status.pid_ns != here.pid_ns:
        return Verdict(None, f"it ran in another PID namespace ({status.pid_ns}) of this machine")
    if seen is not None and seen.node == status.node:
        reused = None not in (seen.start, status.pid_start) and seen.start != status.pid_start
        if not reused:
            return Verdict(True, f"its agent (pid {status.pid}) still runs")
    if status.pid_ns is None:
        # An older status: its PID may be an agent's in another container of this machine.
        return Verdict(None, "its status does not say in which PID namespace it ran")
    return Verdict(False, f"its agent (pid {status.pid}) is gone")


def look(pid: int) -> Seen | None:
    """What this machine sees of ``pid`` in its own PID namespace (None: no live process)."""
    if not alive(pid):
        return None
    return Seen(start_ticks(pid), agent_node(pid))


def runs_here(status: NodeStatus) -> Verdict:
    """Whether the status's agent runs on this machine (see ``judge``)."""
    return judge(status, Here(local_boot_id(), local_pid_ns()), look(status.pid))
