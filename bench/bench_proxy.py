"""``hapair-proxy``'s cost: added latency and throughput against a direct connection.

A server process (echo, or sink for bulk data) sits on a fake node's address; its
endpoint is published in a real etcd and served by a real registry; ``hapair-proxy``
forwards to it. From the bench process (blocking sockets, nothing else running in it):

  latency     round trips of 64 bytes on one connection (median and p99)
  throughput  256 MB sent to the sink on one connection
  connect     a new connection, one round trip, close (the proxy resolves and
              connects upstream for each one)

each direct and through the proxy, several runs alternated. On 2 cores the proxy, the
server and the client share the machine, which is the worst case for the proxy. etcd
runs over TLS with client certificates, as on a plant; it carries only the endpoint here.
Usage: python -m bench.bench_proxy [--runs 5] [--round-trips 5000] [--megabytes 256]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from hapair.shared import pki
from hapair.shared.store import Store
from tests.support.client_lab import REGISTRY
from tests.support.cluster import until
from tests.support.harness import PYTHON, free_port, port_open, stop_pid
from tests.support.site_records import FakeAgent, apply_site
from tests.support.tls_etcd import own_etcd

ROOT = Path(__file__).resolve().parent.parent

SERVICE = "mes-api"
CHUNK = 256 * 1024


# ---- the server process: E = echo, S = sink (answers the byte count at EOF) ------------


async def serve(host: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = await reader.readexactly(1)
        if mode == b"E":
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        else:
            total = 0
            while data := await reader.read(CHUNK):
                total += len(data)
            writer.write(total.to_bytes(8, "big"))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


# ---- the measurements (blocking sockets) --------------------------------------------------


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def latency(host: str, port: int, round_trips: int) -> list[float]:
    payload = b"x" * 64
    with connect(port, host) as s:
        s.sendall(b"E")
        times = []
        for _ in range(round_trips):
            t0 = time.perf_counter()
            s.sendall(payload)
            recv_exactly(s, 64)
            times.append(time.perf_counter() - t0)
    return times


def throughput(host: str, port: int, megabytes: int) -> float:
    block = b"\0" * CHUNK
    total = megabytes * 1024 * 1024
    with connect(port, host) as s:
        t0 = time.perf_counter()
        s.sendall(b"S")
        sent = 0
        while sent < total:
            s.sendall(block)
            sent += len(block)
        s.shutdown(socket.SHUT_WR)
        assert int.from_bytes(recv_exactly(s, 8), "big") == total
        took = time.perf_counter() - t0
    return total / took / 1e6


def connects(host: str, port: int, count: int) -> list[float]:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        with connect(port, host) as s:
            s.sendall(b"Eping")
            recv_exactly(s, 4)
        times.append(time.perf_counter() - t0)
    return times


def p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99) - 1]


async def main(runs: int, round_trips: int, megabytes: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hapair-bench-proxy-"))
    etcd = own_etcd(tmp / "pki")
    store = Store(etcd.url, timeout=2.0, tls=etcd.tls)
    host, port = "127.0.0.11", free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*argv: str, log: str) -> subprocess.Popen[bytes]:
        out = (tmp / log).open("wb")
        proc = subprocess.Popen([*argv], cwd=ROOT, stdout=out, stderr=out)
        out.close()
        procs.append(proc)
        return proc

    try:
        await apply_site(store)
        agent = await FakeAgent(store, "asm-a", "asm").up()
        await agent.become_active()
        await agent.publish(SERVICE, port, "tcp")
        spawn(PYTHON, "-m", "bench.bench_proxy", "--serve", host, str(port), log="server.log")
        registry_port, proxy_port = free_port(), free_port()
        registry = f"http://127.0.0.1:{registry_port}"
        spawn(
            *(PYTHON, "-m", "hapair.registry.main"),
            *etcd.client_args(REGISTRY, pki.Kind.REGISTRY),
            *("--listen", f"127.0.0.1:{registry_port}", "--log-level", "warning"),
            log="registry.log",
        )
        spawn(
            str(Path(PYTHON).parent / "hapair-proxy"),
            *("--service", SERVICE, "--listen", f"127.0.0.1:{proxy_port}"),
            *("--registry", registry, "--log-level", "warning"),
            log="proxy.log",
        )
        for p in (port, registry_port, proxy_port):
            h = host if p == port else "127.0.0.1"

            async def up(h: str = h, p: int = p) -> bool:
                return await asyncio.to_thread(port_open, h, p)

            await until(up, 15, f"{h}:{p} listening")
        await asyncio.sleep(1.0)  # the proxy has the endpoint from the registry

        paths = {"direct": (host, port), "proxy": ("127.0.0.1", proxy_port)}
        lat: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
        thr: dict[str, list[float]] = {k: [] for k in paths}
        con: dict[str, list[float]] = {k: [] for k in paths}
        for h, p in paths.values():  # warm up both paths
            await asyncio.to_thread(latency, h, p, 500)
            await asyncio.to_thread(connects, h, p, 50)
        for run in range(runs):
            for name, (h, p) in paths.items():
                times = await asyncio.to_thread(latency, h, p, round_trips)
                lat[name].append((statistics.median(times), p99(times)))
                thr[name].append(await asyncio.to_thread(throughput, h, p, megabytes))
                con[name].append(statistics.median(await asyncio.to_thread(connects, h, p, 500)))
            print(
                f"  run {run + 1}: round trip direct {lat['direct'][-1][0] * 1e6:.0f} us, "
                f"proxy {lat['proxy'][-1][0] * 1e6:.0f} us; "
                f"throughput direct {thr['direct'][-1]:.0f} MB/s, "
                f"proxy {thr['proxy'][-1]:.0f} MB/s; "
                f"connect+rtt direct {con['direct'][-1] * 1e6:.0f} us, "
                f"proxy {con['proxy'][-1] * 1e6:.0f} us",
                flush=True,
            )

        def med(values: list[float]) -> float:
            return statistics.median(values)

        rtt_d, rtt_p = med([m for m, _ in lat["direct"]]), med([m for m, _ in lat["proxy"]])
        p99_d, p99_p = med([q for _, q in lat["direct"]]), med([q for _, q in lat["proxy"]])
        print(f"\nmedians over {runs} runs    {'direct':>10} {'proxy':>10} {'added':>10}")
        print(
            f"round trip, 64 B (us)   {rtt_d * 1e6:>10.0f} {rtt_p * 1e6:>10.0f} "
            f"{(rtt_p - rtt_d) * 1e6:>10.0f}"
        )
        print(
            f"round trip p99 (us)     {p99_d * 1e6:>10.0f} {p99_p * 1e6:>10.0f} "
            f"{(p99_p - p99_d) * 1e6:>10.0f}"
        )
        t_d, t_p = med(thr["direct"]), med(thr["proxy"])
        print(f"throughput (MB/s)       {t_d:>10.0f} {t_p:>10.0f} {100 * t_p / t_d:>9.0f}%")
        c_d, c_p = med(con["direct"]), med(con["proxy"])
        print(
            f"connect + 1 rtt (us)    {c_d * 1e6:>10.0f} {c_p * 1e6:>10.0f} "
            f"{(c_p - c_d) * 1e6:>10.0f}"
        )
    finally:
        for proc in reversed(procs):
            stop_pid(proc)
        await store.close()
        etcd.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)  # its logs, and now the keys of its PKI


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--serve", nargs=2, metavar=("HOST", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        try:
            import uvloop

            uvloop.run(serve(args.serve[0], int(args.serve[1])))
        except ImportError:
            asyncio.run(serve(args.serve[0], int(args.serve[1])))
    else:
        asyncio.run(main(args.runs, args.round_trips, args.megabytes))
