"""Many registry clients in one process, each a raw asyncio connection, following one
service: half long-poll ``GET /v1/endpoints/SERVICE?after_epoch=E``, half hold
``GET /v1/events?kinds=endpoint&services=SERVICE`` open (asking, as the client library
does, for the endpoint answers of the service followed alone), spread over the
registries given.

``python -m bench.hundred_clients --registries URL,URL --service S --clients 1000 --out F``
prints ``ready`` once every client knows the service's endpoint, then appends to ``F``
one JSON line per new epoch of the service: when each client was told (monotonic clock,
the same for every process of the machine) and which client it was, written once all of
them were, or after ``--give-up-s`` with those that were. Client ``i`` long-polls when
``i`` is even, streams when odd (``--kind poll`` or ``stream``: all of them do that),
and asks registry ``(i // 2) % len(registries)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from pathlib import Path

# A registry holds at most 50 streams and polls per client address: 40 to an address.
PER_ADDRESS = 40


class Told:
    """Per epoch of the service, when each client learnt it."""

    def __init__(self, clients: int, out: Path, give_up_s: float) -> None:
        self.clients, self.out, self.give_up_s = clients, out, give_up_s
        self.times: dict[int, list[tuple[float, int]]] = {}
        self.current: dict[int, int] = {}  # client -> the epoch it knows
        self.first_known = asyncio.Event()

    def tell(self, client: int, epoch: int) -> None:
        if epoch <= self.current.get(client, 0):
            return
        first = client not in self.current
        self.current[client] = epoch
        if first:
            if len(self.current) == self.clients:
                self.first_known.set()
            return
        arrivals = self.times.setdefault(epoch, [])
        arrivals.append((time.monotonic(), client))
        if len(arrivals) == 1:
            asyncio.get_running_loop().call_later(self.give_up_s, self.write, epoch)
        if len(arrivals) == self.clients:
            self.write(epoch)

    def write(self, epoch: int) -> None:
        arrivals = self.times.pop(epoch, None)
        if arrivals is None:
            return  # written already
        with self.out.open("a") as f:
            f.write(json.dumps({"epoch": epoch, "told": arrivals}) + "\n")


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return await reader.readexactly(length)


async def long_poll(i: int, host: str, port: int, service: str, told: Told) -> None:
    local = (f"127.0.2.{i // PER_ADDRESS + 1}", 0)
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=local)
            epoch = 0
            while True:
                writer.write(
                    f"GET /v1/endpoints/{service}?after_epoch={epoch}&wait_s=20 HTTP/1.1\r\n"
                    f"Host: bench\r\n\r\n".encode()
                )
                asked = time.monotonic()
                body = json.loads(await _read_response(reader))
                news = int(body.get("epoch") or 0) > epoch
                epoch = max(epoch, int(body.get("epoch") or 0))
                if news:
                    told.tell(i, epoch)
                elif time.monotonic() - asked < 1.0:
                    await asyncio.sleep(0.5)  # back at once with no news: do not spin
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await asyncio.sleep(0.5)


def stream_request(service: str) -> bytes:
    """An event stream's request, asking for what the client library asks for when it
    follows ``service`` alone."""
    path = f"/v1/events?kinds=endpoint&services={service}"
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


async def stream(i: int, host: str, port: int, service: str, told: Told) -> None:
    local = (f"127.0.2.{i // PER_ADDRESS + 1}", 0)
    wanted = f'"service": "{service}"'
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=local)
            writer.write(stream_request(service))
            await reader.readuntil(b"\r\n\r\n")
            while True:
                block = (await reader.readuntil(b"\n\n")).decode(errors="replace")
                if "event: endpoint" not in block or wanted not in block:
                    continue
                data = next(x for x in block.splitlines() if x.startswith("data: "))
                found = json.loads(data[6:])
                for record in found if isinstance(found, list) else [found]:
                    if record.get("service") == service and record.get("epoch"):
                        told.tell(i, int(record["epoch"]))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            await asyncio.sleep(0.5)


async def main(args: argparse.Namespace) -> None:
    registries = [u.removeprefix("http://").rsplit(":", 1) for u in args.registries.split(",")]
    told = Told(args.clients, Path(args.out), args.give_up_s)
    tasks = []
    for i in range(args.clients):
        host, port = registries[(i // 2) % len(registries)]
        kind = {"both": long_poll if i % 2 == 0 else stream, "poll": long_poll}.get(
            args.kind, stream
        )
        tasks.append(asyncio.create_task(kind(i, host, int(port), args.service, told)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # not a thousand handshakes at once
    await told.first_known.wait()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registries", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--out", required=True)
    parser.add_argument("--give-up-s", type=float, default=10.0)
    parser.add_argument(
        "--kind", choices=["both", "poll", "stream"], default="both", help="of every client"
    )
    asyncio.run(main(parser.parse_args()))
