"""Whether the agent that published a node status still runs on this machine.

A node status carries its agent's boot id and PID. On the machine of that boot, the
PID names the agent only while that process lives and its command line names the node
(a PID may be reused by any other process once the agent is gone).
"""

from __future__ import annotations

from pathlib import Path

from shared.records import NodeStatus, local_boot_id


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


def alive(pid: int) -> bool:
    """Running (a zombie is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


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


def runs_here(status: NodeStatus) -> bool | None:
    """True: the status's agent runs on this machine; False: it is gone; None: it is on
    another machine or boot, or the status has no boot id, so this machine cannot tell."""
    here = local_boot_id()
    if status.boot_id is None or here is None or status.boot_id != here:
        return None
    return alive(status.pid) and agent_node(status.pid) == status.node
