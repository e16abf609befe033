"""``hapair-registry``: serve endpoint lookups, the site state and admin requests."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web
from pydantic import ValidationError

from hapair.registry.app import create_app
from hapair.registry.appkeys import RegistryConfig
from hapair.registry.settings import RegistrySettings
from hapair.shared import etcd_tls, event_loop
from hapair.shared import log as logs
from hapair.shared.topology import format_errors

log = logs.EventLog("hapair.registry")


def _args(argv: list[str] | None) -> dict[str, str]:
    p = argparse.ArgumentParser(prog="hapair-registry", description=__doc__)
    p.add_argument("--etcd", help="etcd endpoints URL[,URL...] (env HAPAIR_ETCD)")
    etcd_tls.add_options(p)
    p.add_argument("--listen", help="HOST:PORT (env HAPAIR_LISTEN, default 0.0.0.0:8700)")
    p.add_argument("--log-level", help="debug, info, warning or error (env HAPAIR_LOG_LEVEL)")
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}


async def serve(settings: RegistrySettings) -> None:
    if not settings.token_hashes:
        log.warning(
            "admin routes are open to anyone who can reach the registry; "
            "set HAPAIR_ADMIN_TOKENS to require a bearer token"
        )
    app = create_app(
        settings.etcd,
        RegistryConfig(
            admin_token_hashes=settings.token_hashes, events_keep_days=settings.events_keep_days
        ),
        tls=settings.etcd_tls,
    )
    etcd_tls.warn_if_plain(settings.etcd_tls is not None, log, settings.etcd)
    # Access logs cost more than a lookup itself; failures are logged where they happen.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, settings.host, settings.port, backlog=1024).start()
        log.info("listening", listen=settings.listen, etcd=settings.etcd)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    given = _args(argv)
    try:
        settings = RegistrySettings(**given)  # type: ignore[arg-type]
    except ValidationError as err:
        problems = [
            p.replace("etcd: Field required", "etcd: give --etcd URL or set HAPAIR_ETCD")
            for p in format_errors(err)
        ]
        print("hapair-registry: " + "; ".join(problems), file=sys.stderr)
        sys.exit(2)
    logs.setup(settings.log_level)
    try:
        event_loop.run(serve(settings))
    except OSError as err:
        sys.exit(f"hapair-registry: cannot listen on {settings.listen}: {err.strerror or err}")


if __name__ == "__main__":
    main()
