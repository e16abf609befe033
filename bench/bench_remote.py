"""A remote workshop: a pair 50 ms from etcd, its peer path local.

Each agent reaches etcd through a relay of its own (``tests/support/etcd_relay.py``, a
process apart) that delays every byte either way by 50 ms ± 10 ms of jitter, keeping
TCP's order: a round trip to etcd takes about 100 ms. The two nodes reach each other
directly (the pair's ``network:`` section, its peer path). The workshop's clients are
local to it, and so is the registry they ask: it reads etcd through a relay of its own
too, so an endpoint's change reaches them one long link after etcd has it.

For each lease TTL (2 s and 1 s, fence margin 0.5 s; etcd with the raft timing of
``deploy/etcd/etcd.conf.yml``, which grants both):
  round trip   a read of etcd through a relay, as the agents have it
  crash, critical, switchover   from the fault to the service answering on the other
               node (bench_failover's measure), and a client's outage in each
               (bench_client's client, through the local registry)
  idle         holds asked while etcd is well: with every keepalive answered in about
               100 ms, a hold is a false alarm (target 0)
  stalls       200 etcd stalls (SIGSTOP) of 0.3-0.6 s (bench_etcd_stalls' loop): changes
               of term (target 0), fences, restarts of the service, holds asked

etcd runs over TLS with client certificates (the relays pass it through), unless ``--lab``.
``--term-beat [INTERVAL/FENCE/MARGIN]``: the pair beats its term (in ms; default
``bench_failover``'s 50/150/150), its standby's promises over the local peer path
standing in for the beats.
Usage: python -m bench.bench_remote [--runs 5] [--stalls 200] [--lease-ttl 2 1]
       [--delay-ms 50] [--jitter-ms 10] [--seed N] [--idle-s 30]
       [--term-beat [50/150/150]] [--lab] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench.bench_client import ClientLog, registry_env, registry_ready, start_client
from bench.bench_client import start_registry as start_registry_process
from bench.bench_etcd_stalls import print_stalls, stall_etcd
from bench.bench_failover import ADDRESS, TERM_BEAT, measure, pair_spec
from hapair.shared.store import Store
from tests.support.cluster import Cluster, until
from tests.support.harness import PYTHON, ROOT, Etcd, free_port, plant_raft_timing, stop_pid
from tests.support.tls_etcd import LAB_HELP, etcd_mode, own_etcd

FENCE_MARGIN_S = 0.5
HOLDS = 'event="etcd does not confirm the lease: asking the peers to hold"'
KINDS = ("switchover", "critical", "crash")


def start_relay(
    upstream: str, one_way_s: float, jitter_s: float, seed: int
) -> tuple[subprocess.Popen[bytes], str]:
    """A relay process to ``upstream`` on a free port: its URL (same scheme)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            *(PYTHON, "-m", "tests.support.etcd_relay", upstream, str(port)),
            *("--delay", str(one_way_s), "--jitter", str(jitter_s), "--seed", str(seed)),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    scheme = upstream.partition("://")[0]
    return proc, f"{scheme}://127.0.0.1:{port}"


def listening(url: str) -> bool:
    host, port = url.rpartition("/")[2].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class RemoteCluster(Cluster):
    """A cluster whose agents each reach etcd by their own URL (their relay), restarts
    included."""

    relays: dict[str, str] = field(default_factory=dict)

    def start(self, node: str, *extra: str) -> subprocess.Popen[bytes]:
        return super().start(node, "--etcd", self.relays[node], *extra)


def holds_asked(c: Cluster) -> int:
    """Holds asked so far, both agents (a hold is asked once per spell of late keepalives)."""
    return sum(c.log(node).count(HOLDS) for node in ADDRESS)


async def round_trips(url: str, etcd: Etcd, reads: int = 20) -> list[float]:
    """Reads of one key through ``url``: what a keepalive's round trip is made of."""
    store = Store(url, timeout=2.0, tls=etcd.tls)
    out = []
    try:
        await store.get("/hapair/v1/round-trip")  # the connection, then the reads
        for _ in range(reads):
            t0 = time.monotonic()
            await store.get("/hapair/v1/round-trip")
            out.append(time.monotonic() - t0)
            await asyncio.sleep(0.05)
    finally:
        await store.close()
    return out


def row(name: str, values: list[float], unit: str = "s") -> str:
    scale = 1000.0 if unit == "ms" else 1.0
    v = [x * scale for x in values]
    return (
        f"{name:<30} {len(v):>4} {statistics.median(v):>8.3f} {min(v):>8.3f} {max(v):>8.3f} {unit}"
    )


async def one_lease(ttl: float, args: argparse.Namespace, seed: int) -> list[str]:
    """Everything measured for ``ttl``; the summary's lines."""
    print(f"\n== lease {ttl:g} s, fence margin {FENCE_MARGIN_S:g} s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="hapair-bench-remote-"))
    etcd = own_etcd(tmp / "pki", args.lab, plant_raft_timing())
    assert etcd.proc is not None
    one_way, jitter = args.delay_ms / 1000, args.jitter_ms / 1000
    relays: dict[str, tuple[subprocess.Popen[bytes], str]] = {
        who: start_relay(etcd.url, one_way, jitter, seed + i)
        for i, who in enumerate(("a", "b", "registry"))
    }
    c = RemoteCluster(etcd, tmp, relays={n: url for n, (_, url) in relays.items()})
    port = free_port()
    network = {
        "peer_port": free_port(ADDRESS["a"]),
        "probe_interval_s": 0.2,
        "isolation_after_s": 1.0,
    }
    failover: dict[str, object] = {"lease_ttl_s": ttl, "fence_margin_s": FENCE_MARGIN_S}
    if args.term_beat:
        failover["term_beat"] = args.term_beat
    await c.apply(c.site([pair_spec(port, c.record, failover=failover, network=network)]))
    registry: subprocess.Popen[bytes] | None = None
    client: subprocess.Popen[bytes] | None = None
    lines: list[str] = []
    try:
        for _, url in relays.values():
            await until(partial(asyncio.to_thread, listening, url), 10, f"relay {url}")
        trips = await round_trips(relays["a"][1], etcd)
        registry, reg_url = start_registry_process(
            relays["registry"][1], tmp / "registry.log", registry_env(etcd)
        )
        c.start("a")  # a first: the measure starts from a active
        await c.active("p", node="a", timeout=30)
        c.start("b")
        await registry_ready(reg_url)
        out = tmp / "client.jsonl"
        client = start_client(reg_url, "bench-svc", out)
        log = ClientLog(out)
        await log.wait_served("a", 0)
        outages: dict[str, list[float]] = {k: [] for k in KINDS}

        async def client_outage(kind: str, old: str, new: str, t0: float) -> None:
            await log.wait_served(new, t0, 1)
            outages[kind].append(log.outage(old, new, t0))
            print(f"  {'':<10} client outage {outages[kind][-1]:.3f} s", flush=True)

        # A started agent of a pair with a peer path takes nothing over for a lease TTL
        # (promises its earlier run may have given): under a beat, that would be timed.
        results = await measure(c, port, args.runs, KINDS, client_outage, restarted_s=ttl)
        failed = [r for r in log.read() if "error" in r]
        stop_pid(client)
        client = None

        # Quiet: keepalives every TTL/4, each answered in a round trip.
        active, _ = await c.active("p")
        await c.standby("b" if active == "a" else "a", timeout=20)
        idle_from = holds_asked(c)
        await asyncio.sleep(args.idle_s)
        idle_holds = holds_asked(c) - idle_from

        epochs = [await until(lambda: c.leader("p"), 10, "a leader")]
        fences, elections = len(await c.events("fence")), len(await c.events("election"))
        stalls_from, holds_from = time.monotonic(), holds_asked(c)
        lengths: list[float] = []
        await stall_etcd(
            c, etcd.proc.pid, random.Random(seed), args.stalls, (0.3, 0.6), epochs, lengths
        )
        stall_holds = holds_asked(c) - holds_from
        fences = len(await c.events("fence")) - fences
        elections = len(await c.events("election")) - elections
    finally:
        if client is not None:
            stop_pid(client)
        await c.stop_all()
        if registry is not None:
            stop_pid(registry)
        for proc, _ in relays.values():
            stop_pid(proc)
        etcd.cleanup()
    try:
        c.assert_no_overlap()
        restarts = sum(r["begin"] > stalls_from for r in c.intervals())
    finally:
        if args.keep:
            print(f"the run's logs and records: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    head = f"lease {ttl:g} s, fence margin {FENCE_MARGIN_S:g} s"
    lines += [f"{head}: no overlap; client: {len(failed)} requests failed, never restarted"]
    lines.append(f"{'':<30} {'runs':>4} {'median':>8} {'min':>8} {'max':>8}")
    lines.append(row("round trip to etcd", trips, "ms"))
    for kind in KINDS:
        lines.append(row(kind, results[kind]))
        lines.append(row(f"{kind}: client outage", outages[kind]))
    lines.append(f"holds asked, {args.idle_s:g} s with etcd well: {idle_holds} (target 0)")
    print(f"\n{head}: {args.stalls} stalls of 0.3-0.6 s, seed {seed}")
    print_stalls(lengths, epochs, elections, fences, 1 + restarts)
    lines.append(f"stalls: {len(lengths)}, epoch changes {len(epochs) - 1} (target 0), "
                 f"elections {elections}, fences {fences}, service restarts {restarts}, "
                 f"holds asked {stall_holds}")  # fmt: skip
    return lines


async def main(args: argparse.Namespace, seed: int) -> int:
    print(f"etcd: {etcd_mode(args.lab)}, with the raft timing of deploy/etcd/etcd.conf.yml")
    print(
        f"each agent and the registry {args.delay_ms:g} ms ± {args.jitter_ms:g} ms from etcd "
        f"each way (a relay process each); peer path, registry and client local; seed {seed}",
        flush=True,
    )
    if args.term_beat:
        print(f"term beat: {args.term_beat}, the standby's promises over the peer path")
    for ttl in args.lease_ttl:
        # Each lease's figures as soon as they are measured: a later one may fail.
        print("\n" + "\n".join(await one_lease(ttl, args, seed)), flush=True)
    return 0


def beat_timings(text: str) -> dict[str, int]:
    """``INTERVAL/FENCE/MARGIN`` in ms, as the site file's ``failover.term_beat``."""
    try:
        interval, fence, margin = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give INTERVAL/FENCE/MARGIN in ms") from None
    return {"interval_ms": interval, "fence_ms": fence, "margin_ms": margin}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stalls", type=int, default=200)
    parser.add_argument("--lease-ttl", type=float, nargs="+", default=[2.0, 1.0])
    parser.add_argument("--delay-ms", type=float, default=50.0, help="one way (default 50)")
    parser.add_argument("--jitter-ms", type=float, default=10.0, help="± (default 10)")
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--term-beat",
        nargs="?",
        const="{interval_ms}/{fence_ms}/{margin_ms}".format(**TERM_BEAT),
        type=beat_timings,
        help="the pair beats its term: INTERVAL/FENCE/MARGIN in ms (default 50/150/150)",
    )
    parser.add_argument("--lab", action="store_true", help=LAB_HELP)
    parser.add_argument("--keep", action="store_true", help="keep each run's logs")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    sys.exit(asyncio.run(main(args, seed)))
