"""An idle agent's footprint: CPU and memory of the active's and the standby's agent.

Real etcd and a pair of two real agents with the pair defaults (lease TTL 2 s), one
supervised service with an HTTP health check at the default interval (1 s), nothing
happening. Once the standby is healthy and the pair has
settled, the CPU time of each agent process (all its threads, from /proc/PID/stat) is
read over several quiet windows, as a share of one core; the resident memory (VmRSS)
of each agent and of its watchdog is read at the end of each window. Targets: <= 1 %
of a core and <= 60 MiB for an agent, active or standby; <= 15 MiB for a watchdog.

etcd runs over TLS with client certificates, each agent showing its own, unless
``--lab`` asks for the lab mode. ``--term-beat`` measures a pair whose active beats its
term (``failover.term_beat`` at 50/150/150 ms, with the peer path it needs): what the
finer guard costs each agent (the targets are those of the defaults). Usage:
  python -m bench.bench_footprint [--windows 5] [--seconds 20] [--settle 10] [--lab]
                                  [--term-beat]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_failover import TERM_BEAT, checked_and_removed, ready_standby
from bench.bench_failover import pair_spec as failover_pair
from bench.procstat import proc_cpu_seconds, rss_mb
from tests.support.cluster import Cluster, until
from tests.support.harness import free_port
from tests.support.tls_etcd import LAB_HELP, etcd_mode, own_etcd

TARGETS = {"cpu_pct": 1.0, "agent_mib": 60.0, "watchdog_mib": 15.0}


def pair_spec(port: int, record: Path, term_beat: bool = False) -> dict[str, object]:
    """bench_failover's pair, its service checked over HTTP at the default interval;
    with ``term_beat``, beating its term over its peer path."""
    extra: dict[str, object] = {}
    if term_beat:
        extra = {
            "failover": {"term_beat": TERM_BEAT},
            "network": {"peer_port": free_port("127.0.80.1")},
        }
    spec = failover_pair(port, record, **extra)
    services: list[dict[str, Any]] = spec["services"]  # type: ignore[assignment]
    services[0]["health"] = {"http": services[0]["health"]["http"]}
    return spec


def watchdog_pid(agent: int) -> int:
    """The agent's watchdog: its child running ``hapair.workshop_agent.watchdog``."""
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        if b"workshop_agent.watchdog" in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    raise RuntimeError(f"agent {agent} has no watchdog")


async def measure(
    c: Cluster, windows: int, seconds: float, settle: float
) -> dict[str, list[float]]:
    async def active_a() -> bool:
        st = await c.status("a")
        return st is not None and st.role == "active"

    await until(active_a, 20, "a active")
    await ready_standby(c, "b")
    await asyncio.sleep(settle)
    roles = {"a": "active", "b": "standby"}
    pids = {node: c.agents[node].pid for node in roles}
    dogs = {node: watchdog_pid(pid) for node, pid in pids.items()}
    figures: dict[str, list[float]] = {}
    for i in range(windows):
        cpu0 = {node: proc_cpu_seconds(pid) for node, pid in pids.items()}
        start = time.monotonic()
        await asyncio.sleep(seconds)
        took = time.monotonic() - start
        line = []
        for node, role in roles.items():
            pct = (proc_cpu_seconds(pids[node]) - cpu0[node]) / took * 100
            agent, dog = rss_mb(pids[node]), rss_mb(dogs[node])
            figures.setdefault(f"{role} agent CPU %", []).append(pct)
            figures.setdefault(f"{role} agent RSS MiB", []).append(agent)
            figures.setdefault(f"{role} watchdog RSS MiB", []).append(dog)
            line.append(f"{role} {pct:.2f} % CPU, {agent:.1f} MiB (watchdog {dog:.1f} MiB)")
        print(f"  window {i + 1}: " + "; ".join(line), flush=True)
    return figures


def target(name: str) -> str:
    if "CPU" in name:
        return f"<= {TARGETS['cpu_pct']:g} %"
    return f"<= {TARGETS['watchdog_mib' if 'watchdog' in name else 'agent_mib']:g} MiB"


async def main(
    windows: int, seconds: float, settle: float, lab: bool, term_beat: bool = False
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hapair-bench-"))
    etcd = own_etcd(tmp / "pki", lab)
    print(f"etcd: {etcd_mode(lab)}", flush=True)
    if term_beat:
        print(f"term beat: {TERM_BEAT} with the peer path", flush=True)
    c = Cluster(etcd, tmp)
    port = free_port()
    await c.apply(c.site([pair_spec(port, c.record, term_beat)]))
    try:
        c.start("a")
        c.start("b")
        figures = await measure(c, windows, seconds, settle)
    finally:
        await c.stop_all()
        etcd.cleanup()
    checked_and_removed(c, tmp)
    print(f"\n{'idle, ' + str(windows) + ' windows of ' + str(seconds) + ' s':<28} "
          f"{'median':>7} {'min':>7} {'max':>7}  target")  # fmt: skip
    for name, values in figures.items():
        print(
            f"{name:<28} {statistics.median(values):7.2f} {min(values):7.2f} "
            f"{max(values):7.2f}  {target(name)}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--lab", action="store_true", help=LAB_HELP)
    parser.add_argument(
        "--term-beat", action="store_true", help="the pair beats its term (50/150/150 ms)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.windows, args.seconds, args.settle, args.lab, args.term_beat))
