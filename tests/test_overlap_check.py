"""The overlap check reads each run's bounds from the agent's side where it can.

The service records its own start once its interpreter runs and its own end only on
SIGTERM; the agent logs the fork (before the service can run) and the run's end (leader
reaped, cgroup empty), the watchdog logs when a leader it killed has exited. Synthetic
records and log lines here: the check's logic alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cluster import Cluster
from harness import Etcd

from workshop_agent.clock import boottime


@pytest.fixture
async def cluster(tmp_path: Path) -> Cluster:
    c = Cluster(Etcd(host="127.0.0.1", client_port=1, peer_port=2, data_dir="-"), tmp_path)
    await c.store.close()
    return c


def run(c: Cluster, pid: int, node: str, start: float, end: float | None) -> None:
    """The service's own record (monotonic clock), heartbeats every 20 ms."""
    head = {"start": start, "service": "s", "pair": "p", "node": node, "epoch": "1", "pid": pid}
    last = end if end is not None else start + 0.1
    beats = [{"hb": start + 0.02 * i} for i in range(1, int((last - start) / 0.02))]
    tail = [{"end": end}] if end is not None else []
    lines = [json.dumps(x) for x in [head, *beats, *tail]]
    (c.record / f"{pid}.log").write_text("\n".join(lines) + "\n")


def logged(c: Cluster, node: str, event: str, pid: int, at_monotonic: float, who: str) -> None:
    """A line of the node's agent log, its ``at`` on CLOCK_BOOTTIME as the agent logs it."""
    at = at_monotonic + (boottime() - time.monotonic())
    line = f'ts=x level=info logger=hapair.{who} event="{event}" node={node} pid={pid} at={at!r}'
    with (c.tmp / f"agent-{node}.log").open("a") as f:
        f.write(line + "\n")


def test_a_run_begins_at_its_fork_not_when_its_interpreter_wrote(cluster: Cluster) -> None:
    now = time.monotonic()
    run(cluster, 1, "a", now, now + 1.0)
    run(cluster, 2, "b", now + 1.2, now + 2.0)
    cluster.assert_no_overlap()
    logged(cluster, "b", "service started", 2, now + 0.9, "agent")  # forked before a ended
    with pytest.raises(AssertionError, match="overlapped"):
        cluster.assert_no_overlap()


def test_a_killed_run_ends_when_its_watchdog_saw_it_exit(cluster: Cluster) -> None:
    now = time.monotonic()
    run(cluster, 1, "a", now, None)  # killed: no end of its own, last beat near now + 0.1
    run(cluster, 2, "b", now + 0.3, now + 1.0)
    logged(cluster, "b", "service started", 2, now + 0.25, "agent")
    cluster.assert_no_overlap()  # by its heartbeats alone it seemed over at now + 0.13
    logged(cluster, "a", "service gone", 1, now + 0.5, "watchdog")
    with pytest.raises(AssertionError, match="overlapped"):
        cluster.assert_no_overlap()
    assert not next(r for r in cluster.intervals() if r["pid"] == 1)["estimated"]


def test_runs_on_one_node_are_checked_too(cluster: Cluster) -> None:
    now = time.monotonic()
    run(cluster, 1, "a", now, None)
    logged(cluster, "a", "service ended", 1, now + 0.5, "agent")
    run(cluster, 2, "a", now + 0.6, now + 1.0)
    logged(cluster, "a", "service started", 2, now + 0.55, "agent")
    cluster.assert_no_overlap()
    logged(cluster, "a", "service started", 2, now + 0.45, "agent")  # before 1 was reaped
    with pytest.raises(AssertionError, match="overlapped"):
        cluster.assert_no_overlap()
