"""Client-side switching: how fast a client follows a failover, and SSE fan-out.

  publish   time from the new endpoint's publication in etcd to the client's first
            successful request on the new node. Both servers keep answering, so this is
            the client's own reaction (registry watch, event stream, reconnection).
            Target: median <= 100 ms.
  outage    end-to-end client outage with real agents and the default lease: from the
            client's last answer from the old node to its first from the new one, for
            a crash of the active server, an exit of its critical service and a planned
            switchover. Targets (medians): <= 2.3 s, <= 0.25 s, <= 0.25 s. The time from
            publication to the first answer on the new node is shown too.
  fanout    1,000 event-stream subscribers on one registry, each asking for mes-api's
            endpoint answers as the client library does: time from an endpoint's
            publication until the last subscriber has it. Target: <= 200 ms.

Every client is a process of its own (tests/integration/test_client_e2e.py's client: the HTTP
adapter, one request every ~2 ms); the registry is a real ``hapair-registry``. etcd runs
over TLS with client certificates (the registry's and each agent's own) unless ``--lab``
asks for the lab mode.
Usage: python -m bench.bench_client [--runs 7] [--only publish,outage,fanout] [--lab]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.hundred_clients import stream_request
from hapair.shared import keys, pki
from hapair.shared.records import Switchover
from hapair.shared.store import Store
from tests.support.client_lab import REGISTRY
from tests.support.cluster import Cluster, recording_service, until
from tests.support.harness import PYTHON, Etcd, free_port, stop_pid
from tests.support.site_records import FakeAgent, apply_site, publications
from tests.support.tls_etcd import LAB_HELP, etcd_mode, own_etcd

ROOT = Path(__file__).resolve().parent.parent

CLIENT = ["-m", "tests.integration.test_client_e2e"]  # the client process of that test
TARGETS = {
    "publish": 0.100,
    "crash": 2.3,
    "critical": 0.25,
    "switchover": 0.25,
    "fanout": 0.200,
}


def line(name: str, values: list[float], target: float | None, unit: str = "s") -> str:
    scale = 1000.0 if unit == "ms" else 1.0
    v = [x * scale for x in values]
    med = statistics.median(v)
    verdict = "" if target is None else ("ok" if med <= target * scale else "MISSED")
    t = "" if target is None else f"<= {target * scale:g} {unit}"
    return (
        f"{name:<26} {len(v):>4} {med:>9.3f} {min(v):>9.3f} {max(v):>9.3f} {unit:<3} {t:>12} "
        f"{verdict}"
    )


def header() -> str:
    return f"{'':<26} {'runs':>4} {'median':>9} {'min':>9} {'max':>9}     {'target':>12}"


# ---- the processes ----------------------------------------------------------------------


def start_registry(
    etcd_url: str, log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A registry on a free port; ``env`` adds its etcd credentials where etcd wants them."""
    port = free_port()
    out = log.open("wb")
    proc = subprocess.Popen(
        [
            *(PYTHON, "-m", "hapair.registry.main", "--etcd", etcd_url),
            *("--listen", f"127.0.0.1:{port}", "--log-level", "warning"),
        ],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=out,
    )
    out.close()
    return proc, f"http://127.0.0.1:{port}"


def registry_env(etcd: Etcd) -> dict[str, str]:
    """The registry's etcd credentials: over TLS, its own certificate."""
    return etcd.client_env(REGISTRY, pki.Kind.REGISTRY)


async def registry_ready(url: str) -> None:
    import aiohttp

    async def ok() -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/healthz") as r:
            return r.status == 200

    await until(ok, 15, f"registry {url}")


def start_client(registry: str, service: str, out: Path) -> subprocess.Popen[bytes]:
    log = out.with_suffix(".log").open("wb")
    proc = subprocess.Popen(
        [PYTHON, *CLIENT, "--registry", registry, "--service", service, "--out", str(out)],
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    log.close()
    return proc


class ClientLog:
    """The client's JSON lines, read incrementally so that polling stays cheap."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.records: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.offset += len(complete)
            self.records += [r for r in map(json.loads, complete.splitlines()) if "done" in r]
        return self.records

    async def served_by(self, node: str, after: float, count: int = 3) -> bool:
        n = 0
        for r in reversed(self.read()):
            if r["done"] <= after:
                break
            n += r.get("node") == node
        return n >= count

    async def wait_served(self, node: str, after: float, count: int = 3) -> None:
        await until(partial(self.served_by, node, after, count), 10, f"client served by {node}")

    def first_answer(self, node: str, after: float) -> dict[str, Any]:
        return next(r for r in self.read() if r.get("node") == node and r["done"] > after)

    def outage(self, old: str, new: str, around: float) -> float:
        """From the last answer of ``old`` before the move to the first of ``new``."""
        records = self.read()
        first = next(
            i for i, r in enumerate(records) if r.get("node") == new and r["done"] > around
        )
        last = max(i for i, r in enumerate(records[:first]) if r.get("node") == old)
        return float(records[first]["done"] - records[last]["done"])


# ---- publish: the client's own reaction ---------------------------------------------------


async def bench_publish(runs: int, tmp: Path, lab: bool) -> list[float]:
    etcd = own_etcd(tmp / "pki-publish", lab)
    store = Store(etcd.url, timeout=2.0, tls=etcd.tls)
    registry, url = start_registry(etcd.url, tmp / "registry-publish.log", registry_env(etcd))
    epochs = {"asm-a": 0, "asm-b": 0}
    runners: list[web.AppRunner] = []
    client: subprocess.Popen[bytes] | None = None
    port = free_port()
    try:
        for node, host in (("asm-a", "127.0.0.11"), ("asm-b", "127.0.0.12")):

            async def hello(request: web.Request, node: str = node) -> web.Response:
                return web.json_response({"node": node, "epoch": epochs[node]})

            app = web.Application()
            app.router.add_get("/", hello)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            runners.append(runner)
        await apply_site(store)
        agents = {n: await FakeAgent(store, n, "asm").up() for n in epochs}
        epochs["asm-a"] = await agents["asm-a"].become_active()
        await agents["asm-a"].publish("mes-api", port)
        await registry_ready(url)
        out = tmp / "client-publish.jsonl"
        client = start_client(url, "mes-api", out)
        log = ClientLog(out)
        await log.wait_served("asm-a", 0)
        active, results = "asm-a", []
        for _ in range(runs):
            standby = "asm-b" if active == "asm-a" else "asm-a"
            await agents[active].crash()
            await agents[active].up()
            epoch = await agents[standby].become_active()
            epochs[standby] = epoch
            t0 = time.monotonic()  # just before the put: etcd commits after this
            await agents[standby].publish("mes-api", port)
            await log.wait_served(standby, t0, 1)
            took = log.first_answer(standby, t0)["done"] - t0
            results.append(took)
            print(f"  publish  {active} -> {standby}: {took * 1000:.1f} ms", flush=True)
            active = standby
            await asyncio.sleep(0.2)
        return results
    finally:
        if client is not None:
            stop_pid(client)
        for runner in runners:
            await runner.cleanup()
        stop_pid(registry)
        await store.close()
        etcd.cleanup()


# ---- outage: real agents ------------------------------------------------------------------


async def bench_outage(runs: int, tmp: Path, lab: bool) -> dict[str, list[float]]:
    etcd = own_etcd(tmp / "pki-outage", lab)
    c = Cluster(etcd, tmp)
    port = free_port()
    svc = recording_service("bench-svc", port, c.record, critical=True)
    address = {"a": "127.0.81.1", "b": "127.0.81.2"}
    await c.apply(
        c.site(
            [
                {
                    "name": "p",
                    "nodes": [{"name": n, "address": a} for n, a in address.items()],
                    "services": [svc],
                }
            ]
        )
    )
    registry, url = start_registry(etcd.url, tmp / "registry-outage.log", registry_env(etcd))
    client: subprocess.Popen[bytes] | None = None
    results: dict[str, list[float]] = {}
    out = tmp / "client-outage.jsonl"

    async def ready_standby(node: str) -> bool:
        st = await c.status(node)
        return st is not None and st.role == "standby" and st.healthy

    try:
        c.start("a")
        c.start("b")
        active, epoch = await c.active("p", node="a", timeout=20)
        await registry_ready(url)
        client = start_client(url, "bench-svc", out)
        log = ClientLog(out)
        await log.wait_served("a", 0)
        async with publications(c.store, "bench-svc") as published:
            for kind in ("switchover", "critical", "crash"):
                for _ in range(runs):
                    standby = "b" if active == "a" else "a"
                    await until(partial(ready_standby, standby), 15, f"{standby} ready")
                    await log.wait_served(active, time.monotonic())
                    t0 = time.monotonic()
                    if kind == "crash":
                        c.crash(active)
                    elif kind == "critical":
                        st = await c.status(active)
                        assert st is not None and st.services[0].pid is not None
                        os.kill(st.services[0].pid, signal.SIGKILL)
                    else:
                        await c.store.put(keys.switchover("p"), Switchover(to=standby).encode())
                    _, epoch = await c.active("p", not_epoch=epoch, node=standby, timeout=15)
                    await log.wait_served(standby, t0, 1)
                    gap = log.outage(active, standby, t0)
                    pub = next(t for t, e, _ in published if e == epoch)
                    react = log.first_answer(standby, t0)["done"] - pub
                    results.setdefault(kind, []).append(gap)
                    results.setdefault(f"{kind}: publication->answer", []).append(react)
                    print(
                        f"  {kind:<10} {active} -> {standby}: outage {gap:.3f} s, "
                        f"publication -> first answer {react * 1000:.1f} ms",
                        flush=True,
                    )
                    if kind == "crash":
                        c.start(active)
                    active = standby
        errors = [r for r in log.read() if "error" in r]
        print(f"  client: {len(log.read())} requests, {len(errors)} failed, never restarted")
        return results
    finally:
        if client is not None:
            stop_pid(client)
        await c.stop_all()
        stop_pid(registry)
        etcd.cleanup()


# ---- fanout: 1,000 event streams -----------------------------------------------------------


class Subscriber(asyncio.Protocol):
    def __init__(self, arrivals: list[float], marker: list[bytes]) -> None:
        self.arrivals, self.marker, self.tail = arrivals, marker, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(stream_request("mes-api"))

    def data_received(self, data: bytes) -> None:
        text = self.tail + data
        if self.marker[0] and self.marker[0] in text:
            self.arrivals.append(time.monotonic())
            self.tail = b""
        else:
            self.tail = text[-200:]


async def bench_fanout(runs: int, tmp: Path, lab: bool, subscribers: int = 1000) -> list[float]:
    etcd = own_etcd(tmp / "pki-fanout", lab)
    store = Store(etcd.url, timeout=2.0, tls=etcd.tls)
    registry, url = start_registry(etcd.url, tmp / "registry-fanout.log", registry_env(etcd))
    transports: list[asyncio.BaseTransport] = []
    try:
        await apply_site(store)
        agent = await FakeAgent(store, "asm-a", "asm").up()
        await agent.become_active()
        await agent.publish("mes-api", 8080)
        await registry_ready(url)
        loop = asyncio.get_running_loop()
        arrivals: list[float] = []
        marker = [b""]
        port = int(url.rsplit(":", 1)[1])
        for i in range(subscribers):
            # Subscribers are clients: 40 to an address, within the registry's share
            # of streams per client address.
            connected, _ = await loop.create_connection(
                lambda: Subscriber(arrivals, marker),
                "127.0.0.1",
                port,
                local_addr=(f"127.0.1.{i // 40 + 1}", 0),
            )
            transports.append(connected)
        await asyncio.sleep(1.0)  # every snapshot sent
        results = []
        for run in range(runs):
            arrivals.clear()
            new_port = 9000 + run
            marker[0] = f'"port": {new_port}'.encode()
            t0 = time.monotonic()
            await agent.publish("mes-api", new_port)
            await until(
                lambda: asyncio.sleep(0, len(arrivals) >= subscribers), 10, "every subscriber"
            )
            last = max(arrivals) - t0
            median = statistics.median(arrivals) - t0
            results.append(last)
            print(
                f"  fanout   {subscribers} subscribers: first {(min(arrivals) - t0) * 1000:.1f} ms,"
                f" median {median * 1000:.1f} ms, last {last * 1000:.1f} ms",
                flush=True,
            )
            await asyncio.sleep(0.3)
        return results
    finally:
        for transport in transports:
            transport.close()
        stop_pid(registry)
        await store.close()
        etcd.cleanup()


async def main(runs: int, only: set[str], lab: bool = False) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="hapair-bench-client-"))
    print(f"etcd: {etcd_mode(lab)}", flush=True)
    rows: list[str] = []
    if "publish" in only:
        published = await bench_publish(max(runs, 15), tmp, lab)
        rows.append(line("publish -> new node", published, 0.1, "ms"))
    if "outage" in only:
        outages = await bench_outage(runs, tmp, lab)
        for kind in ("crash", "critical", "switchover"):
            rows.append(line(f"outage: {kind}", outages[kind], TARGETS[kind]))
        for kind in ("crash", "critical", "switchover"):
            name = f"{kind}: publication->answer"
            rows.append(line(f"  {kind}: pub -> answer", outages[name], None, "ms"))
    if "fanout" in only:
        rows.append(line("fanout to 1,000: last", await bench_fanout(runs, tmp, lab), 0.2, "ms"))
    print()
    print(header())
    print("\n".join(rows))
    print(f"\nlogs in {tmp}")
    return 1 if any(r.endswith("MISSED") for r in rows) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--only", default="publish,outage,fanout")
    parser.add_argument("--lab", action="store_true", help=LAB_HELP)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.runs, set(args.only.split(",")), args.lab)))
