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

from hapair.shared.clock import boottime
from tests.support.cluster import Cluster
from tests.support.harness import Etcd


@pytest.fixture
async def cluster(tmp_path: Path) -> Cluster:
    c = Cluster(Etcd(host="127.0.0.1", client_port=1, peer_port=2, data_dir="-"), tmp_path)
    await c.store.close()
    return c


def run(c: Cluster, pid: int, node: str, start: float, end: float | None, **extra: object) -> None:
    """The service's own record (monotonic clock), heartbeats every 20 ms."""
    head = {"start": start, "service": "s", "pair": "p", "node": node, "epoch": "1", "pid": pid}
    head |= extra
    last = end if end is not None else start + 0.1
    beats = [{"hb": start + 0.02 * i} for i in range(1, int((last - start) / 0.02))]
    tail = [{"end": end}] if end is not None else []
    lines = [json.dumps(x) for x in [head, *beats, *tail]]
    (c.record / f"{pid}.log").write_text("\n".join(lines) + "\n")


def logged(
    c: Cluster, node: str, event: str, pid: int | None, at_monotonic: float, who: str, **extra: str
) -> None:
    """A line of the node's agent log, its ``at`` on CLOCK_BOOTTIME as the agent logs it."""
    at = at_monotonic + (boottime() - time.monotonic())
    fields = {"node": node, "pid": pid, **extra, "at": repr(at)}
    text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    line = f'ts=x level=info logger=hapair.{who} event="{event}" {text}'
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


def test_a_grandchild_that_left_its_group_ends_when_its_cgroup_is_empty(cluster: Cluster) -> None:
    """The escaped grandchild records itself as a run of its own, with the cgroup it
    shares with its service; the watchdog logs when that cgroup is empty."""
    now = time.monotonic()
    cgroup = "/sys/fs/cgroup/hapair-a-7/s.3"
    run(cluster, 1, "a", now, None)
    logged(cluster, "a", "service started", 1, now - 0.01, "agent", cgroup=cgroup)
    logged(cluster, "a", "service gone", 1, now + 0.2, "watchdog")
    run(cluster, 5, "a", now + 0.02, None, escaped=True, cgroup="/hapair-a-7/s.3")
    run(cluster, 2, "b", now + 0.8, now + 1.5)
    logged(cluster, "b", "service started", 2, now + 0.75, "agent")
    cluster.assert_no_overlap()  # the grandchild's end only estimated from its beats
    assert next(r for r in cluster.intervals() if r["pid"] == 5)["estimated"]
    logged(cluster, "a", "cgroup emptied", None, now + 0.9, "watchdog", cgroup=cgroup)
    escaped = next(r for r in cluster.intervals() if r["pid"] == 5)
    assert not escaped["estimated"] and escaped["end"] == pytest.approx(now + 0.9, abs=1e-3)
    with pytest.raises(AssertionError, match="overlapped"):
        cluster.assert_no_overlap()
