"""False failovers under etcd stalls: the pair must ride out short coordinator hiccups.

Real etcd and two real agents (pair defaults: lease TTL 2 s, fence margin 0.5 s). The
etcd process is stopped (SIGSTOP) for a random 0.5-1.0 s and resumed (SIGCONT), with a
random 1.0-1.5 s of normal service between stalls, N times (200 by default). Counted
from etcd and from the service's own record: epoch changes (new leader keys), fences,
and runs of the active service (1 means it never stopped). Target: 0 epoch changes.

By default the pair has a ``network:`` section, so the active may hold on its peer's
promise over the peer path when a stall outlasts its fence point; ``--lease-only``
measures the lease alone (a stall just under 1 s that starts late in a keepalive
interval then reaches the 1.5 s fence point and restarts the services, same epoch).

etcd runs over TLS with client certificates and the peer path has its key, unless
``--lab`` asks for the lab mode.

``--lease-ttl 1`` runs the pair on a 1 s lease (fence point 0.5 s), on an etcd with the
raft timing of ``deploy/etcd/etcd.conf.yml``; ``--stall-s 0.3 0.6`` sets the stalls' range.
``--term-beat`` has the active beat its term (``failover.term_beat`` at 50/150/150 ms):
every stall then outlasts the beat's fence point and takeover time, and only the peers'
promises keep the pair where it is.

Usage: python -m bench.bench_etcd_stalls [--stalls 200] [--seed N] [--lease-only] [--lab]
       [--lease-ttl 2] [--stall-s 0.5 1.0] [--term-beat]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_failover import TERM_BEAT
from tests.support.cluster import Cluster, recording_service, until
from tests.support.harness import free_port, plant_raft_timing
from tests.support.tls_etcd import LAB_HELP, etcd_mode, own_etcd

ROOT = Path(__file__).resolve().parent.parent

ADDRESS = {"a": "127.0.81.1", "b": "127.0.81.2"}


async def main(
    stalls: int,
    seed: int,
    peer_path: bool,
    lab: bool = False,
    lease_ttl: float = 2.0,
    stall_s: tuple[float, float] = (0.5, 1.0),
    term_beat: bool = False,
) -> int:
    rng = random.Random(seed)
    mode = "lease and peer path" if peer_path else "lease only"
    if term_beat:
        mode += f", term beat {TERM_BEAT}"
    print(
        f"seed {seed}, {stalls} stalls of {stall_s[0]:g}-{stall_s[1]:g} s, {mode}, "
        f"lease {lease_ttl:g} s",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="hapair-bench-stalls-"))
    etcd = own_etcd(tmp / "pki", lab, plant_raft_timing() if lease_ttl < 2.0 else ())
    print(f"etcd: {etcd_mode(lab)}", flush=True)
    assert etcd.proc is not None
    c = Cluster(etcd, tmp)
    svc = recording_service("stall-svc", free_port(), c.record, critical=True)
    nodes = [{"name": n, "address": a} for n, a in ADDRESS.items()]
    pair: dict[str, object] = {
        "name": "p",
        "nodes": nodes,
        "services": [svc],
        "failover": {"lease_ttl_s": lease_ttl, **({"term_beat": TERM_BEAT} if term_beat else {})},
    }
    if peer_path:
        port = free_port(ADDRESS["a"])
        pair["network"] = {"peer_port": port, "probe_interval_s": 0.2, "isolation_after_s": 1.0}
    await c.apply(c.site([pair]))
    epochs: list[tuple[str, int]] = []
    lengths: list[float] = []
    try:
        c.start("a")
        first = await c.active("p", node="a", timeout=20)
        c.start("b")
        await c.standby("b", timeout=20)
        epochs.append(first)
        await stall_etcd(c, etcd.proc.pid, rng, stalls, stall_s, epochs, lengths)
        fences = await c.events("fence")
        elections = await c.events("election")
    finally:
        os.kill(etcd.proc.pid, signal.SIGCONT)
        await c.stop_all()
        etcd.cleanup()
    runs = [r for r in c.intervals() if r["service"] == "stall-svc"]
    c.assert_no_overlap()
    shutil.rmtree(tmp, ignore_errors=True)
    print()
    print_stalls(lengths, epochs, len(elections), len(fences), len(runs))
    return 0


async def stall_etcd(
    c: Cluster,
    etcd_pid: int,
    rng: random.Random,
    stalls: int,
    stall_s: tuple[float, float],
    epochs: list[tuple[str, int]],
    lengths: list[float],
) -> None:
    """``stalls`` times: etcd stopped (SIGSTOP) for a random length in ``stall_s``, then
    resumed and left alone 1.0-1.5 s; each stall's length goes to ``lengths``, and pair
    p's term, when another than the last of ``epochs``, to ``epochs``."""
    for i in range(stalls):
        length = rng.uniform(*stall_s)
        os.kill(etcd_pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            await asyncio.sleep(length)
        finally:
            os.kill(etcd_pid, signal.SIGCONT)
        lengths.append(time.monotonic() - stopped)
        await asyncio.sleep(rng.uniform(1.0, 1.5))
        lead = await until(lambda: c.leader("p"), 10, "a leader after the stall")
        if lead != epochs[-1]:
            print(f"  stall {i + 1}: epoch change {epochs[-1]} -> {lead}", flush=True)
            epochs.append(lead)
        if (i + 1) % 50 == 0:
            print(f"  {i + 1} stalls, {len(epochs) - 1} epoch changes so far", flush=True)


def print_stalls(
    lengths: list[float], epochs: list[tuple[str, int]], elections: int, fences: int, runs: int
) -> None:
    """What the stalls did: their lengths, changes of term, elections, fences and runs of
    the active service."""
    print(f"stalls                 {len(lengths)} (median {statistics.median(lengths):.3f} s, "
          f"min {min(lengths):.3f} s, max {max(lengths):.3f} s)")  # fmt: skip
    print(f"epoch changes          {len(epochs) - 1}   (target 0)")
    print(f"elections              {elections} (1 is the first election)")
    print(f"fences                 {fences}")
    print(f"runs of the service    {runs} (1: it never stopped)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stalls", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--lease-only", action="store_true", help="no network: section")
    parser.add_argument("--lab", action="store_true", help=LAB_HELP)
    parser.add_argument("--lease-ttl", type=float, default=2.0, help="lease_ttl_s (default 2)")
    parser.add_argument(
        "--stall-s", type=float, nargs=2, default=(0.5, 1.0), metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--term-beat", action="store_true", help="the pair beats its term (50/150/150 ms)"
    )
    args = parser.parse_args()
    if args.term_beat and args.lease_only:
        parser.error("--term-beat needs the peer path: drop --lease-only")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    stall_s = (args.stall_s[0], args.stall_s[1])
    sys.exit(
        asyncio.run(
            main(
                args.stalls,
                seed,
                not args.lease_only,
                args.lab,
                args.lease_ttl,
                stall_s,
                args.term_beat,
            )
        )
    )
