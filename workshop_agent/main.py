"""``hapair-agent --node NAME --etcd URL[,URL...]``: the agent on every server."""

from __future__ import annotations

import argparse
import asyncio
import sys

# isort: off
from hapair.workshop_agent import no_plugins  # noqa: F401  (before any model is built)

# isort: on
from pydantic import ValidationError

from hapair.shared import etcd_tls, metrics
from hapair.shared.entry import add_version
from hapair.shared.log import EventLog, setup
from hapair.shared.topology import format_errors
from hapair.workshop_agent import priority
from hapair.workshop_agent.agent import Agent, AgentError
from hapair.workshop_agent.settings import AgentSettings


def parse_args(argv: list[str] | None) -> dict[str, str]:
    """The settings given on the command line (the rest come from the environment)."""
    return _settings_given(_parser().parse_args(argv))


def _settings_given(args: argparse.Namespace) -> dict[str, str]:
    return {k: v for k, v in vars(args).items() if v is not None and not k.startswith("metrics_")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hapair-agent",
        description="Run the hapair agent of one server: pair election, self-fencing and "
        "service supervision. Flags override HAPAIR_NODE, HAPAIR_ETCD, HAPAIR_ETCD_CA, "
        "HAPAIR_ETCD_CERT, HAPAIR_ETCD_KEY, HAPAIR_STATE_DIR, HAPAIR_LOG_LEVEL, "
        "HAPAIR_SERVICE_USER, HAPAIR_SERVICE_GROUP, HAPAIR_ALLOW_ROOT_SERVICES, "
        "HAPAIR_REALTIME_PRIORITY and HAPAIR_PACKAGE_CA.",
    )
    add_version(p)
    p.add_argument("--node", help="this server's node name, as in the site file")
    p.add_argument("--etcd", help="etcd URLs, comma-separated (https://HOST:PORT,...)")
    etcd_tls.add_options(p)
    p.add_argument("--state-dir", help="where the node lock and service logs live")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--service-user", help="user a service runs as when it names none")
    p.add_argument("--service-group", help="its group, when it names none")
    p.add_argument(
        "--allow-root-services",
        action="store_const",
        const="1",
        help="let services run as root on this server (refused otherwise)",
    )
    p.add_argument(
        "--realtime-priority",
        help=f"SCHED_RR priority of the agent, its watchdog one above (default "
        f"{priority.DEFAULT}; 0: ordinary scheduling, which a busy server may delay "
        "past the fence point)",
    )
    p.add_argument(
        "--package-ca",
        help="CA of the https:// servers packages come from (default: the etcd CA)",
    )
    metrics.add_options(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    overrides = _settings_given(args)
    try:
        scraping = metrics.from_args(args)
    except metrics.MetricsError as err:
        print(f"hapair-agent: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        settings = AgentSettings(**overrides)
    except ValidationError as err:
        for problem in format_errors(err):
            print(f"hapair-agent: setting {problem}", file=sys.stderr)
        if "node" not in overrides:
            print("hapair-agent: give --node NAME or set HAPAIR_NODE", file=sys.stderr)
        sys.exit(2)
    setup(settings.log_level)
    log = EventLog("hapair.agent", node=settings.node)
    etcd_tls.warn_if_plain(settings.etcd_tls is not None, log, settings.etcd)
    if settings.allow_root_services:
        log.warning(
            "services may run as root on this node (--allow-root-services): whoever can "
            "write the site file can run commands as root here"
        )
    realtime(settings.realtime_priority, log)
    try:
        asyncio.run(Agent(settings, scraping).run())
    except AgentError as err:
        print(f"hapair-agent: {err}", file=sys.stderr)
        sys.exit(1)


def realtime(level: int, log: EventLog) -> None:
    """Put this thread, the event loop's, under real-time scheduling (``priority.py``)."""
    if level == 0:
        log.warning(
            "real-time scheduling off (--realtime-priority 0): a busy server may keep "
            "this agent from its fence timing, and fence its services for nothing"
        )
        return
    refused = priority.take(level)
    if refused is None:
        log.info("real-time scheduling", policy="SCHED_RR", priority=level)
    else:
        log.warning(
            "real-time scheduling refused: the agent runs as an ordinary process, which "
            "a busy server may keep from its fence timing",
            reason=refused,
            priority=level,
        )


if __name__ == "__main__":
    main()
