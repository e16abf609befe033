"""One agent per node on a machine, whatever state directory each was given.

Two locks: ``{state_dir}/{node}.lock``, which the agent's watchdog inherits (a new run
waits while a previous run's watchdog still kills its services), and a lock in a fixed
directory of the machine named after the etcd cluster and the node, so that a second
agent with another state directory (a hand start next to the systemd unit) is refused
too. Beyond the machine's locks, the node's live status in etcd names its agent's boot,
PID namespace, PID and start time (``hapair.shared.agent_process``): the agent checks it at
start and before taking back a leader key of this node.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from hapair.workshop_agent.settings import default_state_dir

WAIT_S = 5.0  # a previous run's watchdog may still be killing its services


class NodeLocked(Exception):
    """Another agent holds this node's lock."""


def lock_node(directory: Path, name: str, node: str, wait: float = WAIT_S) -> int:
    """Hold ``{directory}/{name}.lock``; the file names the holder's PID."""
    # The state directory: the agent's user and group only (the umask may narrow it).
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    path = directory / f"{name}.lock"
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "unknown"
            os.close(fd)
            if time.monotonic() > deadline:
                raise NodeLocked(
                    f"another hapair-agent runs for node {node} (pid {holder}, lock {path})"
                ) from None
            time.sleep(0.05)
            continue
        # A holder that left removed the file: locked, the file must still be the path's.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def machine_lock(cluster_id: int, node: str) -> tuple[int, Path]:
    """The lock of ``node`` of one etcd cluster on this machine, and its path.

    Named after the network namespace too: hosts simulated in namespaces of one machine
    (a test lab) are machines of their own, each with its own agent for a node."""
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = 0
    name = f"node-{cluster_id:016x}-{netns}-{node}"
    # No wait: only the agent holds it (not its watchdog), and it holds it until it exits.
    fd = lock_node(default_state_dir(), name, node, wait=0.0)
    return fd, default_state_dir() / f"{name}.lock"


def unlock(fd: int, path: Path | None = None) -> None:
    """Release a lock; with ``path``, remove its file first (while still holding it)."""
    if path is not None:
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
    os.close(fd)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
