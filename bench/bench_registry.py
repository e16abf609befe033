"""Registry lookups per second and p99 latency, load from a second process (wrk).

One registry process against a real etcd holding a published endpoint; wrk (one
thread, 50 connections) asks GET /v1/endpoints/{service} for 8 s, several times.
Target on this 2-core machine: >= 15,000 lookups/s with p99 <= 5 ms (medians).
With ``--https`` a second registry serves HTTPS (a ``hapair pki`` certificate) and the
two are measured in turn, run by run, over kept-alive connections. etcd runs over TLS
with client certificates, the registry showing its own, as on a plant.

Beside each run: the registry's CPU time per lookup, which does not depend on what else
the machine does, and how long it waited for a CPU while it had work (per second of the
run). wrk and the registry share the 2 cores: a run where the registry waited shows a
lower rate and a higher p99 that are the machine's, not the registry's.
Usage: python -m bench.bench_registry [--runs 5] [--seconds 8] [--connections 50] [--https]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

from bench.procstat import proc_cpu_seconds, run_delay
from hapair.shared import keys, pki
from hapair.shared.records import EndpointRecord, Leader
from tests.support.client_lab import REGISTRY
from tests.support.cluster import Cluster, until
from tests.support.harness import Etcd, free_port, stop_pid
from tests.support.tls_etcd import own_etcd

ROOT = Path(__file__).resolve().parent.parent

SERVICE = "mes-api"


def parse_wrk(text: str) -> tuple[float, float]:
    """(requests per second, p99 in ms) from wrk --latency output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    p99 = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return rps, p99


async def seed(c: Cluster) -> None:
    await c.apply(
        c.site(
            [
                {
                    "name": "asm",
                    "nodes": [
                        {"name": "asm-a", "address": "127.0.0.11"},
                        {"name": "asm-b", "address": "127.0.0.12"},
                    ],
                    "services": [
                        {
                            "name": SERVICE,
                            "command": ["true"],
                            "endpoint": {"port": 8080, "protocol": "http"},
                        }
                    ],
                }
            ]
        )
    )
    lease = await c.store.grant(600)
    epoch = await c.store.put(keys.leader("asm"), Leader(node="asm-a").encode(), lease=lease)
    await c.store.put(
        keys.endpoint(SERVICE),
        EndpointRecord(
            service=SERVICE,
            pair="asm",
            node="asm-a",
            host="127.0.0.11",
            port=8080,
            protocol="http",
            epoch=epoch,
        ).encode(),
        lease=lease,
    )


def start_registry(etcd: Etcd, port: int, log: Path, *tls: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hapair.registry.main",
            *etcd.client_args(REGISTRY, pki.Kind.REGISTRY),
            "--listen",
            f"127.0.0.1:{port}",
            *tls,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def https_files(tmp: Path) -> tuple[list[str], ssl.SSLContext]:
    """The registry's options for HTTPS with a certificate from ``hapair pki``, and a
    client context trusting its CA."""
    directory = tmp / "pki"
    pki.init(directory, "bench")
    issued = pki.issue(directory, "registry", "reg-bench", ips=["127.0.0.1"])
    context = ssl.create_default_context(cafile=str(directory / pki.CA_CERT))
    return ["--tls-cert", str(issued.cert), "--tls-key", str(issued.key)], context


class Run(NamedTuple):
    rps: float
    p99_ms: float
    cpu_us: float
    """The registry's CPU time per lookup."""
    waited_ms: float
    """The registry's wait for a CPU while runnable, per second of the run."""


def summary(name: str, results: list[Run]) -> None:
    rps_all = [r.rps for r in results]
    p99_all = [r.p99_ms for r in results]
    print(
        f"{name:5}  lookups/s median {statistics.median(rps_all):,.0f} "
        f"(min {min(rps_all):,.0f}, max {max(rps_all):,.0f}; target >= 15,000)   "
        f"p99 ms median {statistics.median(p99_all):.2f} "
        f"(min {min(p99_all):.2f}, max {max(p99_all):.2f}; target <= 5)   "
        f"CPU/lookup median {statistics.median(r.cpu_us for r in results):.1f} us   "
        f"waited for a CPU median {statistics.median(r.waited_ms for r in results):.0f} ms/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--https",
        action="store_true",
        help="also a registry over HTTPS, measured in turn with the HTTP one",
    )
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("wrk is missing: apt-get install wrk (make bench installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="hapair-bench-"))
    etcd = own_etcd(tmp / "etcd-pki")
    c = Cluster(etcd, tmp)
    registries: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[Run]] = {}
    pids: dict[str, int] = {}
    try:
        asyncio.run(seed(c))
        urls: dict[str, tuple[str, ssl.SSLContext | None]] = {}
        port = free_port()
        registries.append(start_registry(etcd, port, tmp / "registry.log"))
        urls["http"] = (f"http://127.0.0.1:{port}/v1/endpoints/{SERVICE}", None)
        pids["http"] = registries[-1].pid
        if args.https:
            tls, trust = https_files(tmp)
            port = free_port()
            registries.append(start_registry(etcd, port, tmp / "registry-https.log", *tls))
            urls["https"] = (f"https://127.0.0.1:{port}/v1/endpoints/{SERVICE}", trust)
            pids["https"] = registries[-1].pid

        for url, context in urls.values():

            async def answers(url: str = url, context: ssl.SSLContext | None = context) -> bool:
                def get() -> bool:
                    with urllib.request.urlopen(url, timeout=1, context=context) as r:
                        return bool(r.status == 200)

                return await asyncio.to_thread(get)

            asyncio.run(until(answers, 15, f"the registry answering {url}"))
            subprocess.run([wrk, "-t1", "-c10", "-d2s", url], capture_output=True, check=True)
        # In turn, run by run: a load that comes and goes on the machine falls on both.
        for i in range(args.runs):
            for name, (url, _) in urls.items():
                cpu0, waited0 = proc_cpu_seconds(pids[name]), run_delay(pids[name])
                out = subprocess.run(
                    [wrk, "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "--latency", url],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                rps, p99 = parse_wrk(out)
                run = Run(
                    rps,
                    p99,
                    (proc_cpu_seconds(pids[name]) - cpu0) / (rps * args.seconds) * 1e6,
                    (run_delay(pids[name]) - waited0) * 1000 / args.seconds,
                )
                results.setdefault(name, []).append(run)
                print(
                    f"  run {i + 1} {name:5}: {rps:,.0f} lookups/s, p99 {p99:.2f} ms, "
                    f"{run.cpu_us:.1f} us CPU/lookup, waited for a CPU {run.waited_ms:.0f} ms/s",
                    flush=True,
                )
    finally:
        for registry in registries:
            stop_pid(registry)
        asyncio.run(c.stop_all())
        etcd.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    for name, measured in results.items():
        summary(name, measured)


if __name__ == "__main__":
    main()
