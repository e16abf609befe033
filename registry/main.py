"""``hapair-registry``: serve endpoint lookups, the site state and admin requests."""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys
from typing import NoReturn

from pydantic import ValidationError

from hapair.registry.app import create_app, runner
from hapair.registry.appkeys import CACHE, READERS, SERVED, RegistryConfig
from hapair.registry.auth import CLOSED
from hapair.registry.metrics import RegistryCollector
from hapair.registry.settings import RegistrySettings
from hapair.registry.tls import server_context
from hapair.shared import etcd_tls, event_loop, metrics
from hapair.shared import log as logs
from hapair.shared.entry import add_version
from hapair.shared.pki import PkiError
from hapair.shared.topology import format_errors

log = logs.EventLog("hapair.registry")


def _args(argv: list[str] | None) -> tuple[dict[str, object], argparse.Namespace]:
    p = argparse.ArgumentParser(prog="hapair-registry", description=__doc__)
    add_version(p)
    p.add_argument("--etcd", help="etcd endpoints URL[,URL...] (env HAPAIR_ETCD)")
    etcd_tls.add_options(p)
    p.add_argument("--listen", help="HOST:PORT (env HAPAIR_LISTEN, default 0.0.0.0:8700)")
    p.add_argument("--log-level", help="debug, info, warning or error (env HAPAIR_LOG_LEVEL)")
    p.add_argument(
        "--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (env HAPAIR_TLS_CERT)"
    )
    p.add_argument("--tls-key", metavar="FILE", help="its key, 0600 (env HAPAIR_TLS_KEY)")
    p.add_argument(
        "--client-ca",
        metavar="FILE",
        help="accept operators' client certificates signed by this CA on the admin routes, "
        "the CN naming the operator (env HAPAIR_CLIENT_CA)",
    )
    p.add_argument(
        "--admin-tokens-file",
        metavar="FILE",
        help="NAME:SHA256 lines: the admin bearer tokens accepted and whose they are "
        "(env HAPAIR_ADMIN_TOKENS_FILE)",
    )
    p.add_argument(
        "--header-timeout",
        dest="header_timeout_s",
        metavar="S",
        help="seconds a connection has to send a request's headers, and an idle one stays "
        "open (env HAPAIR_HEADER_TIMEOUT_S, default 10)",
    )
    p.add_argument(
        "--stale-streams",
        dest="stale_streams_s",
        metavar="S",
        help="seconds the registry, out of touch with etcd, keeps its event streams open "
        "(told at once that its view is not current) before it ends them "
        "(env HAPAIR_STALE_STREAMS_S, default 5)",
    )
    p.add_argument(
        "--max-per-client",
        metavar="N",
        help="event streams and long-polls waiting at once from one client address "
        "(env HAPAIR_MAX_PER_CLIENT, default 50)",
    )
    p.add_argument(
        "--open-admin",
        action="store_true",
        default=None,
        help="admin routes open to anyone who can reach the registry, for labs "
        "(env HAPAIR_OPEN_ADMIN=1)",
    )
    metrics.add_options(p)
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and not k.startswith("metrics_")}
    return given, args


def _config(settings: RegistrySettings) -> RegistryConfig:
    return RegistryConfig(
        admin_tokens=settings.admin_tokens_by_digest(),
        client_certs=settings.client_ca is not None,
        open_admin=settings.open_admin,
        events_keep_days=settings.events_keep_days,
        header_timeout_s=settings.header_timeout_s,
        max_per_client=settings.max_per_client,
        stale_streams_s=settings.stale_streams_s,
    )


def _warn(settings: RegistrySettings, config: RegistryConfig) -> None:
    if config.open_admin:
        log.warning(
            "admin routes are open to anyone who can reach the registry (--open-admin, a lab "
            "mode); use --admin-tokens-file or --client-ca to require a credential"
        )
    elif not (config.admin_tokens or config.client_certs):
        log.info(CLOSED)
    if settings.tls_cert is None:
        log.warning(
            "registry in lab mode: lookups and admin requests travel in clear; "
            "use --tls-cert and --tls-key for HTTPS"
        )


async def serve(
    settings: RegistrySettings,
    config: RegistryConfig,
    tls: ssl.SSLContext | None,
    scraping: metrics.MetricsOptions | None = None,
) -> None:
    app = create_app(settings.etcd, config, tls=settings.etcd_tls)
    _warn(settings, config)
    etcd_tls.warn_if_plain(settings.etcd_tls is not None, log, settings.etcd)
    run = runner(app)
    await run.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # The listening socket is opened here rather than by aiohttp's TCPSite, which cannot
    # bound the TLS handshake: a connection that never ends its handshake is closed
    # after the header timeout, as one that never ends its headers is.
    assert run.server is not None  # set up above
    server: asyncio.Server | None = None
    scraped: asyncio.Server | None = None
    try:
        server = await loop.create_server(
            run.server,
            settings.host,
            settings.port,
            ssl=tls,
            backlog=1024,
            reuse_address=True,
            ssl_handshake_timeout=config.header_timeout_s if tls else None,
        )
        log.info(
            "listening",
            listen=settings.listen,
            scheme="https" if tls else "http",
            etcd=settings.etcd,
            admins=len(config.admin_tokens),
            client_certs=config.client_certs,
        )
        if scraping is not None:
            collector = RegistryCollector(app[CACHE], app[READERS], app[SERVED])
            scraped = await metrics.serve(scraping, metrics.registry(collector), log)
        await stop.wait()
        log.info("stopping")
    finally:
        if scraped is not None:
            scraped.close()
        if server is not None:
            server.close()
        await run.cleanup()


def _fail(problems: list[str]) -> NoReturn:
    print("hapair-registry: " + "; ".join(problems), file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    given, args = _args(argv)
    try:
        settings = RegistrySettings(**given)  # type: ignore[arg-type]
    except ValidationError as err:
        _fail(
            [
                p.replace(
                    "etcd: Field required", "etcd: give --etcd URL or set HAPAIR_ETCD"
                ).removeprefix("(top level): ")
                for p in format_errors(err)
            ]
        )
    try:
        config = _config(settings)
        tls = (
            server_context(settings.tls_cert, settings.tls_key, settings.client_ca)
            if settings.tls_cert is not None and settings.tls_key is not None
            else None
        )
        scraping = metrics.from_args(args)
    except (ValueError, PkiError) as err:
        _fail([str(err)])
    logs.setup(settings.log_level)
    try:
        event_loop.run(serve(settings, config, tls, scraping))
    except OSError as err:
        sys.exit(f"hapair-registry: cannot listen on {settings.listen}: {err.strerror or err}")


if __name__ == "__main__":
    main()
