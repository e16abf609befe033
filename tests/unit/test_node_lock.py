"""The node lock and the agent-process checks it relies on, without an agent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hapair.shared.agent_process import (
    Here,
    Seen,
    judge,
    local_pid_ns,
    look,
    runs_here,
    start_ticks,
)
from hapair.shared.records import NodeStatus, local_boot_id
from hapair.workshop_agent.node_lock import NodeLocked, lock_node, unlock

HERE = Here(boot_id="boot-1", pid_ns=4026531836)


AGENT_A = NodeStatus(
    node="a", pair="p", address="127.0.0.1", role="active", pid=42, boot_id="boot-1"
)


RUN = AGENT_A.model_copy(update={"pid_ns": HERE.pid_ns, "pid_start": 1000})


def test_the_lock_names_its_holder_and_a_removed_file_is_never_held(tmp_path: Path) -> None:
    fd = lock_node(tmp_path, "n-a", "a", wait=0.0)
    with pytest.raises(NodeLocked, match=rf"node a \(pid {os.getpid()}, lock "):
        lock_node(tmp_path, "n-a", "a", wait=0.0)
    path = tmp_path / "n-a.lock"
    unlock(fd, path)
    assert not path.exists(), "the holder removes the file it leaves"
    again = lock_node(tmp_path, "n-a", "a", wait=0.0)
    assert path.exists() and os.fstat(again).st_ino == os.stat(path).st_ino
    unlock(again, path)


@pytest.mark.parametrize(
    ("status", "seen", "runs"),
    [
        # Another boot, or no boot id: this machine cannot tell.
        (RUN.model_copy(update={"boot_id": "boot-0"}), None, None),
        (RUN.model_copy(update={"boot_id": None}), None, None),
        # Our boot, another PID namespace (another container): its PID means nothing here,
        # whatever lives under that number in ours.
        (RUN.model_copy(update={"pid_ns": 1}), None, None),
        (RUN.model_copy(update={"pid_ns": 1}), Seen(1000, "a"), None),
        # An older status that does not name its PID namespace: gone is not shown...
        (AGENT_A, None, None),
        (AGENT_A, Seen(5, "b"), None),
        # ... but an agent of the node alive under its PID is one.
        (AGENT_A, Seen(5, "a"), True),
        # Our boot and PID namespace: alive, gone, reused by another process or agent.
        (RUN, Seen(1000, "a"), True),
        (RUN.model_copy(update={"pid_start": None}), Seen(1000, "a"), True),
        (RUN, None, False),
        (RUN, Seen(1000, None), False),
        (RUN, Seen(2000, "a"), False),
    ],
)
def test_a_previous_run_is_gone_only_in_this_boot_and_pid_namespace(
    status: NodeStatus, seen: Seen | None, runs: bool | None
) -> None:
    assert judge(status, HERE, seen).runs is runs


def test_a_status_naming_this_process_is_read_from_proc() -> None:
    """What an agent publishes of itself, read back from /proc by ``runs_here``."""
    me = RUN.model_copy(
        update={
            "boot_id": local_boot_id(),
            "pid": os.getpid(),
            "pid_ns": local_pid_ns(),
            "pid_start": start_ticks(),
            "node": "a",
        }
    )
    assert judge(me, Here(local_boot_id(), local_pid_ns()), Seen(start_ticks(), "a")).runs
    assert look(os.getpid()) == Seen(start_ticks(), None), "pytest is no agent"
    # As this machine reads it: our boot and PID namespace, the PID held by no agent.
    assert runs_here(me).runs is False
