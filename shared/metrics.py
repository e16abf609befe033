"""Prometheus metrics of a daemon, on a port of its own.

Off unless ``--metrics-listen HOST:PORT`` (``$HAPAIR_METRICS_LISTEN``) is given. The
port serves HTTPS with the daemon's certificate and requires a client certificate of
the site CA (Prometheus's, ``hapair pki issue DIR prometheus NAME``); ``--metrics-plain``
serves plain HTTP to anyone instead, a lab mode that warns when it starts.

Each scrape is answered on the daemon's event loop: the collectors read its state as
it is at that moment, with no lock and no thread. The server is a minimal one on
purpose: ``GET /metrics`` only, one request per connection, a request head bounded in
size and time, a few connections at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hapair.shared.log import EventLog
from hapair.shared.network import listen_address
from hapair.shared.pki import PkiError, TlsFiles

if TYPE_CHECKING:
    from prometheus_client.registry import Collector, CollectorRegistry

HEAD_LIMIT = 8192
"""Bytes a request head may have."""
HEAD_TIMEOUT_S = 5.0
"""Time a client has to send its request head, and to take the answer."""
CONNECTIONS = 8
"""Scrapes served at once; more wait for a place."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsError(ValueError):
    """The metrics options do not hold together (named in the message)."""


@dataclass(frozen=True)
class MetricsOptions:
    host: str
    port: int
    tls: TlsFiles | None
    """None: plain HTTP (--metrics-plain)."""


def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Prometheus metrics (off unless --metrics-listen is given)")
    env = os.environ.get
    group.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=env("HAPAIR_METRICS_LISTEN"),
        help="serve /metrics there (default $HAPAIR_METRICS_LISTEN; off when unset)",
    )
    for flag, what in (
        ("cert", "this daemon's certificate for it (hapair pki issue DIR metrics NAME --ip ...)"),
        ("key", "its private key (mode 600)"),
        ("ca", "the site CA: scrapers must show a client certificate it issued"),
    ):
        group.add_argument(
            f"--metrics-{flag}",
            metavar="FILE",
            default=env(f"HAPAIR_METRICS_{flag.upper()}"),
            help=f"{what} (default $HAPAIR_METRICS_{flag.upper()})",
        )
    group.add_argument(
        "--metrics-plain",
        action="store_true",
        default=env("HAPAIR_METRICS_PLAIN", "") not in ("", "0"),
        help="lab mode: plain HTTP, no client certificate asked (warns at start)",
    )


def from_args(args: argparse.Namespace) -> MetricsOptions | None:
    """The options given, checked (files read now), or None when metrics are off."""
    if not args.metrics_listen:
        return None
    try:
        host, port = listen_address(str(args.metrics_listen))
    except ValueError as err:
        raise MetricsError(f"--metrics-listen: {err}") from None
    files = {f: getattr(args, f"metrics_{f}") for f in ("cert", "key", "ca")}
    if args.metrics_plain:
        given = [f"--metrics-{f}" for f, v in files.items() if v]
        if given:
            raise MetricsError(f"--metrics-plain serves no TLS: drop {', '.join(given)}")
        return MetricsOptions(host, port, None)
    missing = [f"--metrics-{f}" for f, v in files.items() if not v]
    if missing:
        raise MetricsError(
            f"--metrics-listen needs {', '.join(missing)} (HTTPS with client certificates), "
            "or --metrics-plain for the lab mode"
        )
    tls = TlsFiles(Path(files["ca"]), Path(files["cert"]), Path(files["key"]))
    try:
        tls.server_context()
    except PkiError as err:
        raise MetricsError(f"metrics: {err}") from None
    return MetricsOptions(host, port, tls)


def registry(*collectors: Collector) -> CollectorRegistry:
    """A registry with ``collectors`` (and no process or platform collector: the
    daemon's own figures only). prometheus_client is loaded here, only when metrics
    are on."""
    from prometheus_client.registry import CollectorRegistry

    reg = CollectorRegistry(auto_describe=True)
    for c in collectors:
        reg.register(c)
    return reg


async def serve(options: MetricsOptions, reg: CollectorRegistry, log: EventLog) -> asyncio.Server:
    """Start serving ``reg`` as ``options`` say; the caller closes the server."""
    from prometheus_client import generate_latest

    context = options.tls.server_context() if options.tls is not None else None
    places = asyncio.Semaphore(CONNECTIONS)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with places:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                    status, body = _route(head, lambda: generate_latest(reg))
                    writer.write(_response(status, body))
                    await writer.drain()
            except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass  # a client that does not finish, or leaves: nothing to answer
            finally:
                writer.close()
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await writer.wait_closed()

    server = await asyncio.start_server(
        answer,
        options.host,
        options.port,
        ssl=context,
        limit=HEAD_LIMIT,
        ssl_handshake_timeout=HEAD_TIMEOUT_S if context is not None else None,
    )
    if options.tls is None:
        log.warning(
            "metrics served in the lab mode (--metrics-plain): plain HTTP, anyone who "
            "reaches the port reads them",
            listen=f"{options.host}:{options.port}",
        )
    else:
        log.info("metrics served over HTTPS", listen=f"{options.host}:{options.port}")
    return server


def _route(head: bytes, render: Any) -> tuple[str, bytes]:
    request = head.split(b"\r\n", 1)[0].split()
    if len(request) != 3 or not request[2].startswith(b"HTTP/1."):
        return "400 Bad Request", b"a request line: GET /metrics HTTP/1.1\n"
    method, target = request[0], request[1].split(b"?", 1)[0]
    if target != b"/metrics":
        return "404 Not Found", b"only /metrics is served here\n"
    if method != b"GET":
        return "405 Method Not Allowed", b"only GET\n"
    body: bytes = render()
    return "200 OK", body


def _response(status: str, body: bytes) -> bytes:
    kind = CONTENT_TYPE if status.startswith("200") else "text/plain; charset=utf-8"
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Any:
    """A gauge family to fill at collect time."""
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, labels=list(labels))


def histogram(name: str, doc: str, labels: Iterable[str] = ()) -> Any:
    """A histogram family to fill at collect time (from a :class:`Histogram`)."""
    from prometheus_client.core import HistogramMetricFamily

    return HistogramMetricFamily(name, doc, labels=list(labels))


def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Any:
    """A counter family to fill at collect time (``name`` without ``_total``)."""
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, doc, labels=list(labels))
