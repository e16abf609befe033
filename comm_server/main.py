"""``hapair-comm``: the communication server, run by the agent as a service of a pair.

    hapair-comm --config plcs.yaml --listen {node.address}:4840

The agent gives it ``HAPAIR_NODE``, ``HAPAIR_PAIR``, ``HAPAIR_ETCD`` and
``HAPAIR_SERVICE``; it learns its role and epoch from etcd by itself. ``--standalone``
runs it without etcd, always as the active (one server, no pair).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import sys
from typing import Any

from comm_server.app import CommServer, Listen
from comm_server.config import ConfigError, load
from comm_server.role import PairRole, StaticRole
from shared import log as logs
from shared.log import EventLog
from shared.store import Store


def _listen(text: str) -> Listen:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return Listen(host.strip("[]"), int(port))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="hapair-comm",
        description="Redundant PLC communications (Modbus TCP, OPC UA) served over OPC UA.",
    )
    p.add_argument("--config", required=True, help="the PLC list (YAML with plcs:)")
    p.add_argument(
        "--listen",
        type=_listen,
        default=env("HAPAIR_COMM_LISTEN", "0.0.0.0:4840"),
        help="HOST:PORT of the OPC UA server (default 0.0.0.0:4840, or $HAPAIR_COMM_LISTEN)",
    )
    p.add_argument("--etcd", default=env("HAPAIR_ETCD"), help="etcd URL(s) (default $HAPAIR_ETCD)")
    p.add_argument("--node", default=env("HAPAIR_NODE"), help="this node (default $HAPAIR_NODE)")
    p.add_argument("--pair", default=env("HAPAIR_PAIR"), help="its pair (default $HAPAIR_PAIR)")
    p.add_argument(
        "--service",
        default=env("HAPAIR_SERVICE") or "comm",
        help="the service name reports are filed under (default $HAPAIR_SERVICE, else comm)",
    )
    p.add_argument(
        "--redundancy",
        choices=["hot", "warm", "cold", "none"],
        default="hot",
        help="RedundancySupport to announce (default hot: every node of the pair polls)",
    )
    p.add_argument(
        "--standalone", action="store_true", help="no etcd, no pair: always serve as the active"
    )
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--log-level", default=env("HAPAIR_LOG_LEVEL", "info"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.check:
        tags = sum(len(p.tags) for p in config.plcs)
        print(f"{args.config}: valid, {len(config.plcs)} PLCs, {tags} tags")
        return 0
    if not args.standalone:
        missing = [f"--{n}" for n in ("etcd", "node", "pair") if not getattr(args, n)]
        if missing:
            print(
                f"hapair-comm: {', '.join(missing)} missing (or HAPAIR_ETCD, HAPAIR_NODE, "
                "HAPAIR_PAIR in the environment); use --standalone to run without a pair",
                file=sys.stderr,
            )
            return 2
    logs.setup(args.log_level)
    try:
        import uvloop

        uvloop.run(_run(args, config))
    except ImportError:
        asyncio.run(_run(args, config))
    return 0


async def _run(args: argparse.Namespace, config: Any) -> None:
    log = EventLog("hapair.comm", node=args.node, pair=args.pair)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(
        lambda _, ctx: log.warning(
            "event loop", message=ctx.get("message"), error=repr(ctx.get("exception"))
        )
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    who = f"{args.pair}:{args.node}" if not args.standalone else socket.gethostname()
    server = CommServer(
        config,
        args.listen,
        log,
        app_uri=f"urn:hapair:comm:{who}",
        name=f"hapair comm server {who}",
        redundancy=args.redundancy,
    )
    store = None if args.standalone else Store(args.etcd, timeout=1.0)

    def role(parts: Any, on_change: Any) -> StaticRole | PairRole:
        if store is None:
            return StaticRole()
        return PairRole(store, args.pair, args.node, args.service, parts, on_change, log)

    await server.start(role)
    # The address space is a few million long-lived objects; a full collection walking
    # them stalls the loop for tens of milliseconds, a whole poll's budget. Set them
    # aside from the collector once: they live as long as the process.
    gc.collect()
    gc.freeze()
    ended = asyncio.create_task(server.wait())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([ended, waiter], return_when=asyncio.FIRST_COMPLETED)
    crashed = ended in done  # a task of the server ended: a bug, made visible below
    log.info("stopping", reason="a task failed" if crashed else "signal")
    for task in (ended, waiter):
        task.cancel()
    await server.stop()
    if store is not None:
        await store.close()
    if crashed:
        ended.result()


if __name__ == "__main__":
    sys.exit(main())
