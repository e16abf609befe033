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

Over TLS the relay passes the bytes as they are (the agent's handshake is with etcd),
unless given ``tls``: then it ends the agent's TLS with a certificate of the site's CA
for its own address and opens its own to etcd, showing that certificate, so that it
sees the gRPC frames in clear and the markers work as in the lab mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from hapair.shared.pki import Kind, TlsFiles
from tests.support.harness import Etcd, free_port

# gRPC runs over HTTP/2, which a TLS endpoint agrees to by ALPN.
ALPN = ["h2"]


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

        async def requests() -> None:
            tail = b""  # a marker may straddle two reads
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    if self._cut_marker and self._cut_marker in tail + data:
                        self._cut_marker = b""
                        await self.cut()
                        self.cut_done.set()
                        return
                    self._saw(tail + data)
                    tail = data[-max(len(self._marker), len(self._cut_marker)) :]
                    up_writer.write(data)
                    await up_writer.drain()
            up_writer.transport.abort()

        # etcd's bytes, each with when it came; b"" once etcd closed the connection.
        came: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def answers() -> None:
            with contextlib.suppress(OSError):
                while data := await up_reader.read(65536):
                    came.put_nowait((loop.time(), data))
            came.put_nowait((loop.time(), b""))

        async def deliver() -> None:
            with contextlib.suppress(OSError):
                while (item := await came.get())[1]:
                    # Read first, then wait: the bytes keep their order on the connection.
                    at, data = item
                    due = max(at + self._latency, self._held_until)
                    await asyncio.sleep(max(0.0, due - loop.time()))
                    writer.write(data)
                    await writer.drain()
            writer.transport.abort()

        await asyncio.gather(requests(), answers(), deliver())
        self.writers -= {writer, up_writer}


RELAY = "etcd-relay"  # the relay's certificate, over TLS


def reading_relay(etcd: Etcd) -> EtcdRelay:
    """A relay to ``etcd`` that sees the gRPC frames, for ``hold_after`` and ``cut_at``:
    over TLS it ends the agent's TLS and opens its own with its certificate."""
    tls = None if etcd.pki is None else etcd.pki.files(RELAY, Kind.ETCD)
    return EtcdRelay(etcd.url, tls)
