"""A short run of the chaos suite (tests/chaos, ``make chaos``) in every test run.

Six faults of six kinds against the pair with PostgreSQL (a writer counts every
acknowledged commit), its nodes and a three-member etcd, each in their own network
namespace: a crash and a freeze of the active, the active silently cut from etcd for
longer than its lease, the etcd leader killed, the active's postmaster killed, and a
switchover asked for while the active is frozen. The run is a process of its own
because it moves itself into the lab's network; if it has to be killed, its namespaces
and directory are removed here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.chaos.checker import Outcome, Report, check_overlaps
from tests.chaos.run import cannot_run, remove_leftovers
from tests.chaos.schedule import Fault
from tests.support import netns
from tests.support.cluster import Cluster
from tests.support.harness import PYTHON, ROOT, Etcd

CANNOT_RUN = cannot_run()
# One fault of each kind below, all on the active of the database pair (or the etcd
# leader): its freeze and its silent cut from etcd last longer than the fence point
# (1.5 s) and the lease (2 s), and the switchover is asked for while the active is frozen.
SEED = 128
SMOKE_KINDS = "crash,freeze,partition_etcd,etcd_member,switchover,pg_crash"
TIMEOUT_S = 240.0


@pytest.mark.e2e
@pytest.mark.skipif(CANNOT_RUN is not None, reason=f"chaos suite cannot run: {CANNOT_RUN}")
@pytest.mark.long
def test_chaos_smoke(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    argv = [
        PYTHON, "-m", "tests.chaos", "--seed", str(SEED), "--faults", "6", "--kinds", SMOKE_KINDS,
        "--db", "on", "--json", str(report),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the run cleans up after itself on SIGTERM
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"the chaos smoke took over {TIMEOUT_S}s:\n{out}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = remove_leftovers(proc.pid)
    assert not left, f"the run left {left}"
    assert proc.returncode == 0, out
    figures = json.loads(report.read_text())
    assert figures["faults"] == 6, out
    assert sorted(figures["by_kind"]) == sorted(SMOKE_KINDS.split(",")), out
    assert figures["overlaps"] == 0 and figures["violations"] == [], out
    assert figures["acked"] and figures["lost"] == 0, out  # commits were made, none lost
    assert not any(name.startswith(f"{netns.PREFIX}{proc.pid}x") for name in _namespaces())


def _namespaces() -> list[str]:
    return [line.split(" ", 1)[0] for line in netns.sh("ip", "netns", "list").stdout.splitlines()]


# ---- the parts, without a lab ---------------------------------------------------------


def _run(record: Path, pid: int, node: str, start: float, end: float | None) -> None:
    head = {"start": start, "service": "p-svc", "pair": "p", "node": node, "epoch": "1", "pid": pid}
    beats = [{"hb": start + 0.02 * i} for i in range(1, int(((end or start + 1) - start) / 0.02))]
    tail = [{"end": end}] if end is not None else []
    lines = [json.dumps(x) for x in [head, *beats, *tail]]
    (record / f"{pid}.log").write_text("\n".join(lines) + "\n")


def _outcome(index: int, injected: float, recovered: float) -> Outcome:
    fault = Fault(index=index, kind="freeze", pair="p", target="active", hold_s=1.0)
    return Outcome(fault, "a", "", injected, injected + 1.0, 4.5, ("p",), recovered)


async def test_overlap_is_found_and_blamed_on_the_fault_in_place(tmp_path: Path) -> None:
    cluster = Cluster(Etcd(host="127.0.0.1", client_port=1, peer_port=2, data_dir="-"), tmp_path)
    try:
        _run(cluster.record, 101, "a", 100.0, 110.0)
        _run(cluster.record, 102, "b", 111.0, 120.0)  # 1 s without a run: an outage
        report = Report(seed=1, outcomes=[_outcome(0, 109.0, 111.5), _outcome(1, 115.0, 119.5)])
        check_overlaps(cluster, report)
        assert report.overlap is None and report.runs == 2
        assert [o.outage_s for o in report.outcomes] == [pytest.approx(1.0), 0.0]

        _run(cluster.record, 103, "a", 118.0, None)  # killed while b still ran
        check_overlaps(cluster, report)
        assert report.overlap is not None and "overlapped" in report.overlap
        assert report.overlap_faults == [1]
        assert any("two nodes active at once" in v for v in report.violations())
    finally:
        await cluster.store.close()
