"""``hapair-agent --node NAME --etcd URL[,URL...]``: the agent on every server."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pydantic import ValidationError

from hapair.shared import etcd_tls
from hapair.shared.log import EventLog, setup
from hapair.shared.topology import format_errors
from hapair.workshop_agent.agent import Agent, AgentError
from hapair.workshop_agent.settings import AgentSettings


def parse_args(argv: list[str] | None) -> dict[str, str]:
    p = argparse.ArgumentParser(
        prog="hapair-agent",
        description="Run the hapair agent of one server: pair election, self-fencing and "
        "service supervision. Flags override HAPAIR_NODE, HAPAIR_ETCD, HAPAIR_ETCD_CA, "
        "HAPAIR_ETCD_CERT, HAPAIR_ETCD_KEY, HAPAIR_STATE_DIR and HAPAIR_LOG_LEVEL.",
    )
    p.add_argument("--node", help="this server's node name, as in the site file")
    p.add_argument("--etcd", help="etcd URLs, comma-separated (https://HOST:PORT,...)")
    etcd_tls.add_options(p)
    p.add_argument("--state-dir", help="where the node lock and service logs live")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    args = vars(p.parse_args(argv))
    return {k: v for k, v in args.items() if v is not None}


def main(argv: list[str] | None = None) -> None:
    overrides = parse_args(argv)
    try:
        settings = AgentSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as err:
        for problem in format_errors(err):
            print(f"hapair-agent: setting {problem}", file=sys.stderr)
        if "node" not in overrides:
            print("hapair-agent: give --node NAME or set HAPAIR_NODE", file=sys.stderr)
        sys.exit(2)
    setup(settings.log_level)
    etcd_tls.warn_if_plain(
        settings.etcd_tls is not None, EventLog("hapair.agent", node=settings.node), settings.etcd
    )
    try:
        asyncio.run(Agent(settings).run())
    except AgentError as err:
        print(f"hapair-agent: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
