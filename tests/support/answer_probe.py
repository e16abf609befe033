"""Which node answers HTTP on an address, seen from a client host, to the millisecond.

Run inside a lab host (``python -m tests.support.answer_probe HOST PORT NODE LIMIT``), it
starts a new connection to ``HOST:PORT`` every 10 ms, each with its own deadline, and
reads the ``node`` of the test service's JSON answer (``tests/support/svc.py``). A
connection sent to a crashed server's MAC is lost, not refused; starting a fresh one every
10 ms, rather than retrying one after its timeout, keeps the resolution at 10 ms whatever
the deadline.

It prints ``seen NODE`` at its first answer (whoever gave it), then ``answered T`` with
the time ``NODE`` first answered, on the machine-wide monotonic clock (the same in every
network namespace), and exits 0; or ``none`` after ``LIMIT`` seconds, and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

STEP_S = 0.01
ATTEMPT_S = 1.0


async def _who(host: str, port: int) -> str | None:
    """The node that answered one request, or None (no answer within the deadline)."""
    try:
        async with asyncio.timeout(ATTEMPT_S):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"GET / HTTP/1.0\r\n\r\n")
                raw = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    _, _, body = raw.partition(b"\r\n\r\n")
    with contextlib.suppress(ValueError, AttributeError):
        node = json.loads(body).get("node")
        return node if isinstance(node, str) else None
    return None


async def probe(host: str, port: int, want: str, limit: float) -> float | None:
    """When ``want`` first answered on ``host:port``; None if not within ``limit``."""
    seen = asyncio.Event()
    answered: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    pending: set[asyncio.Task[None]] = set()

    async def attempt() -> None:
        node = await _who(host, port)
        if node is None:
            return
        if not seen.is_set():
            seen.set()
            print(f"seen {node}", flush=True)
        if node == want and not answered.done():
            answered.set_result(time.monotonic())

    deadline = time.monotonic() + limit
    try:
        while not answered.done() and time.monotonic() < deadline:
            task = asyncio.create_task(attempt())
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.wait([answered], timeout=STEP_S)
        return answered.result() if answered.done() else None
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m tests.support.answer_probe HOST PORT NODE LIMIT", file=sys.stderr)
        return 2
    host, port, want, limit = argv[0], int(argv[1]), argv[2], float(argv[3])
    when = asyncio.run(probe(host, port, want, limit))
    print("none" if when is None else f"answered {when!r}", flush=True)
    return 0 if when is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
