"""A TCP relay between one agent and etcd, to break or slow that one link on purpose.

``cut()`` drops every connection and refuses new ones, as a broken link would;
``heal()`` relays again. ``hold_after(marker, seconds)`` arms a delay: as soon as the
agent sends a request whose bytes contain ``marker`` (an etcd key, which gRPC sends
uncompressed), every byte etcd sends back on any connection is held until ``seconds``
after that request passed, then delivered in order. etcd has applied the request by
then; the agent saw its own call time out, and its watches lag. ``cut_at(marker)``
cuts the link as soon as a request carrying ``marker`` reaches the relay, before etcd
gets it: the agent sent that request, and etcd never applies it. ``slow(seconds)``
delivers every byte etcd sends ``seconds`` after it came, in order, as a slow link or a
loaded etcd would: a TLS handshake, two of etcd's flights, then takes twice that.
``delay(one_way_s, jitter_s, seed)`` makes the link a long one, both ways: every chunk
read on either side is delivered ``one_way_s`` plus a uniform jitter in
``±jitter_s`` after it came, never before the chunk read before it on the same
connection and direction (TCP keeps its order; ``Lag`` is that rule).

Over TLS the relay passes the bytes as they are (the agent's handshake is with etcd),
unless given ``tls``: then it ends the agent's TLS with a certificate of the site's CA
for its own address and opens its own to etcd, showing that certificate, so that it
sees the gRPC frames in clear and the markers work as in the lab mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from hapair.shared.pki import Kind, TlsFiles
from tests.support.harness import Etcd, free_port

# gRPC runs over HTTP/2, which a TLS endpoint agrees to by ALPN.
ALPN = ["h2"]


@dataclass
class Lag:
    """A long link's delay, both ways: a chunk that came at ``arrival`` is due at
    ``arrival + one_way_s + uniform(-jitter_s, jitter_s)``, but never before the chunk
    before it on the same connection and direction (``previous``): a byte stream keeps
    its order whatever the jitter drew. With ``one_way_s`` 0, no delay at all."""

    one_way_s: float = 0.0
    jitter_s: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        assert 0.0 <= self.jitter_s <= self.one_way_s, "jitter cannot deliver before arrival"

    def due(self, previous: float, arrival: float) -> float:
        if self.one_way_s == 0.0:
            return max(previous, arrival)
        drawn = self.rng.uniform(-self.jitter_s, self.jitter_s)
        return max(previous, arrival + self.one_way_s + drawn)


class EtcdRelay:
    def __init__(self, upstream: str, tls: TlsFiles | None = None) -> None:
        """A relay to ``upstream``; ``tls``: the relay's own certificate (the ``etcd``
        kind serves and is a client too, issued for 127.0.0.1), to read the frames."""
        self.scheme, _, address = upstream.rpartition("://")
        host, port = address.rsplit(":", 1)
        self.upstream = (host, int(port))
        self._serve: ssl.SSLContext | None = None
        self._dial: ssl.SSLContext | None = None
        if tls is not None:
            assert self.scheme == "https", "a relay ends TLS only in front of etcd over TLS"
            # The agent shows its certificate as etcd asks; the relay shows its own to etcd.
            self._serve = tls.server_context(require_client_cert=True)
            self._dial = tls.client_context()
            for context in (self._serve, self._dial):
                context.set_alpn_protocols(ALPN)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self._marker = b""
        self._hold_s = 0.0
        self._held_until = 0.0
        self.triggered = asyncio.Event()
        self._cut_marker = b""
        self.cut_done = asyncio.Event()
        self._latency = 0.0
        self.lag = Lag()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    async def heal(self) -> None:
        self.server = await asyncio.start_server(
            self._relay, "127.0.0.1", self.port, ssl=self._serve
        )

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()

    def hold_after(self, marker: bytes, seconds: float) -> None:
        """Hold etcd's answers for ``seconds`` once a request carrying ``marker`` passed."""
        self._readable()
        self._marker, self._hold_s = marker, seconds
        self.triggered.clear()

    def slow(self, seconds: float) -> None:
        """Deliver etcd's bytes ``seconds`` late from now on (0: at once again)."""
        self._latency = seconds

    def delay(self, one_way_s: float, jitter_s: float = 0.0, seed: int | None = None) -> None:
        """From now on, delay every chunk either way by ``one_way_s`` ± ``jitter_s``
        (``seed``: the jitter's draws, for a run that can be repeated; 0: no delay)."""
        self.lag = Lag(one_way_s, jitter_s, random.Random(seed))

    def cut_at(self, marker: bytes) -> None:
        """Cut the link at the first request carrying ``marker``, which etcd never gets."""
        self._readable()
        self._cut_marker = marker
        self.cut_done.clear()

    def _readable(self) -> None:
        """A marker is found in the bytes gRPC sends: never in a TLS stream it passes on."""
        if self.scheme != "http" and self._serve is None:
            raise AssertionError("the relay cannot see etcd keys in TLS it does not end")

    def _saw(self, window: bytes) -> None:
        if self._marker and self._marker in window:
            self._held_until = asyncio.get_running_loop().time() + self._hold_s
            self._marker = b""
            self.triggered.set()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                *self.upstream,
                ssl=self._dial,
                server_hostname=self.upstream[0] if self._dial else None,
            )
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}
        loop = asyncio.get_running_loop()

        # The bytes read on each side, each with when it came; b"" once that side closed.
        asked: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        came: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def requests() -> None:
            tail = b""  # a marker may straddle two reads
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    # Markers act as the request reaches the relay, before any delay.
                    if self._cut_marker and self._cut_marker in tail + data:
                        self._cut_marker = b""
                        await self.cut()
                        self.cut_done.set()
                        break
                    self._saw(tail + data)
                    tail = data[-max(len(self._marker), len(self._cut_marker)) :]
                    asked.put_nowait((loop.time(), data))
            asked.put_nowait((loop.time(), b""))

        async def answers() -> None:
            with contextlib.suppress(OSError):
                while data := await up_reader.read(65536):
                    came.put_nowait((loop.time(), data))
            came.put_nowait((loop.time(), b""))

        async def forward(
            chunks: asyncio.Queue[tuple[float, bytes]],
            to: asyncio.StreamWriter,
            extra: Callable[[float], float],
        ) -> None:
            due = 0.0
            with contextlib.suppress(OSError):
                while (item := await chunks.get())[1]:
                    # Read first, then wait: the bytes keep their order on the connection.
                    at, data = item
                    due = max(self.lag.due(due, at), extra(at))
                    await asyncio.sleep(max(0.0, due - loop.time()))
                    to.write(data)
                    await to.drain()
            to.transport.abort()

        def answer_due(at: float) -> float:
            return max(at + self._latency, self._held_until)

        await asyncio.gather(
            requests(),
            answers(),
            forward(asked, up_writer, lambda at: at),
            forward(came, writer, answer_due),
        )
        self.writers -= {writer, up_writer}


class RelayThread:
    """An ``EtcdRelay`` on an event loop and a thread of its own, at real-time priority
    when the kernel allows it (``SCHED_RR`` applies to the calling thread alone): a link
    whose timing is the test's, not the test process's. In the test's own loop, a relay
    waits whenever that loop does (a crash being reaped, a log read) and whenever a
    loaded machine gives the test process no CPU, which a link timed to a tenth of a
    second feels. ``cut``, ``delay`` and ``slow`` as the relay's; ``close`` ends it."""

    PRIORITY = 5  # below the agents' (10): the link never takes their CPU

    def __init__(self, upstream: str) -> None:
        self.relay = EtcdRelay(upstream)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="etcd-relay", daemon=True)

    @property
    def url(self) -> str:
        return self.relay.url

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # not permitted: an ordinary thread still works
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(self.PRIORITY))
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        self._loop.close()

    async def _on_loop(self, work: Coroutine[Any, Any, None]) -> None:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    async def start(self) -> None:
        self._thread.start()
        await self._on_loop(self.relay.heal())

    async def cut(self) -> None:
        await self._on_loop(self.relay.cut())

    def delay(self, one_way_s: float, jitter_s: float = 0.0, seed: int | None = None) -> None:
        self._loop.call_soon_threadsafe(self.relay.delay, one_way_s, jitter_s, seed)

    def slow(self, seconds: float) -> None:
        self._loop.call_soon_threadsafe(self.relay.slow, seconds)

    async def close(self) -> None:
        if not self._thread.is_alive():
            return
        await self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 10)


RELAY = "etcd-relay"  # the relay's certificate, over TLS


def reading_relay(etcd: Etcd) -> EtcdRelay:
    """A relay to ``etcd`` that sees the gRPC frames, for ``hold_after`` and ``cut_at``:
    over TLS it ends the agent's TLS and opens its own with its certificate."""
    tls = None if etcd.pki is None else etcd.pki.files(RELAY, Kind.ETCD)
    return EtcdRelay(etcd.url, tls)


async def _serve(
    upstream: str, port: int, one_way_s: float, jitter_s: float, seed: int | None
) -> None:
    relay = EtcdRelay(upstream)
    relay.port = port
    relay.delay(one_way_s, jitter_s, seed)
    await relay.heal()
    print(f"relaying {relay.url} -> {upstream}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    """A long link in a process of its own, so that its timing does not share an event
    loop with what measures through it: ``python -m tests.support.etcd_relay UPSTREAM
    PORT --delay ONE_WAY_S --jitter JITTER_S --seed N`` (TLS passed through as it is)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("upstream")
    parser.add_argument("port", type=int)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--jitter", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.upstream, args.port, args.delay, args.jitter, args.seed))


if __name__ == "__main__":
    main()
