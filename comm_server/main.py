"""``hapair-comm``: the communication server, run by the agent as a service of a pair.

    hapair-comm --listen {node.address}:4840                     # plcs: of the pair
    hapair-comm --config plcs.yaml --listen {node.address}:4840  # or a file

The agent gives it ``HAPAIR_NODE``, ``HAPAIR_PAIR``, ``HAPAIR_ETCD`` and
``HAPAIR_SERVICE``; it learns its role and epoch from etcd by itself, and without
``--config`` its PLC list from the ``plcs:`` section of its pair in the topology,
which it follows (a changed list restarts the OPC UA server with it). ``--standalone``
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
from collections.abc import Awaitable
from typing import Any, TypeVar

from hapair.comm_server.access import AccessError, hash_password, server_security
from hapair.comm_server.app import CommServer, Listen
from hapair.comm_server.config import CommConfig, ConfigError, load
from hapair.comm_server.metrics import CommCollector, Shown
from hapair.comm_server.role import PairRole, StaticRole
from hapair.comm_server.source import PlcListError, TopologyPlcs, plcs_of
from hapair.shared import etcd_tls, event_loop, keys, metrics
from hapair.shared import log as logs
from hapair.shared.entry import add_version
from hapair.shared.log import EventLog
from hapair.shared.network import listen_address
from hapair.shared.store import Store, StoreError, parse_endpoints
from hapair.shared.waits import cancelled

T = TypeVar("T")


def _listen(text: str) -> Listen:
    try:
        return Listen(*listen_address(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="hapair-comm",
        description="Redundant PLC communications (Modbus TCP, OPC UA) served over OPC UA.",
    )
    add_version(p)
    p.add_argument(
        "--config",
        help="the PLC list (YAML with plcs:); default: the plcs: of the pair in the topology",
    )
    p.add_argument(
        "--listen",
        type=_listen,
        default=env("HAPAIR_COMM_LISTEN", "0.0.0.0:4840"),
        help="HOST:PORT of the OPC UA server (default 0.0.0.0:4840, or $HAPAIR_COMM_LISTEN)",
    )
    p.add_argument("--etcd", default=env("HAPAIR_ETCD"), help="etcd URL(s) (default $HAPAIR_ETCD)")
    etcd_tls.add_options(p)
    metrics.add_options(p)
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
    opcua = p.add_argument_group(
        "OPC UA security (on unless the pair's opcua: says security: none)"
    )
    for flag, what in (
        (
            "cert",
            "the server's certificate (hapair pki issue DIR comm NAME); its URI is the "
            "server's application URI",
        ),
        ("key", "its private key (RSA, mode 600)"),
        ("ca", "the site CA: client certificates it issued are trusted, their CN a user"),
        ("users", "the users file (role and password hash of each user; mode 600)"),
    ):
        opcua.add_argument(
            f"--opcua-{flag}",
            metavar="FILE",
            default=env(f"HAPAIR_OPCUA_{flag.upper()}"),
            help=f"{what} (default $HAPAIR_OPCUA_{flag.upper()})",
        )
    opcua.add_argument(
        "--hash-password",
        action="store_true",
        help="print the hash of a password read from standard input, for the users file",
    )
    p.add_argument("--check", action="store_true", help="validate the PLC list and exit")
    p.add_argument("--log-level", default=env("HAPAIR_LOG_LEVEL", "info"))
    return p.parse_args(argv)


def _usage_error(args: argparse.Namespace) -> str | None:
    """What is missing from the command line, or None."""
    if args.standalone and not args.config:
        return "--standalone needs --config FILE: without etcd there is no topology to read"
    if args.standalone or (args.check and args.config):
        return None
    # The topology needs etcd and the pair; running in a pair needs the node as well.
    needed = ("etcd", "pair") if args.check else ("etcd", "node", "pair")
    missing = [f"--{n}" for n in needed if not getattr(args, n)]
    if missing:
        env = ", ".join(f"HAPAIR_{n.upper()}" for n in needed)
        given = f"{', '.join(missing)} missing (or {env} in the environment)"
        if args.check:
            return f"{given}: needed to read the PLC list from the topology, or use --config FILE"
        return f"{given}; use --standalone with --config FILE to run without a pair"
    try:
        parse_endpoints(args.etcd)
    except ValueError as err:
        return f"--etcd: {err}"
    try:
        etcd_tls.prepare(args.etcd, etcd_tls.from_args(args))
    except etcd_tls.EtcdTlsError as err:
        return str(err)
    return None


def _summary(config: CommConfig) -> str:
    tags = sum(len(p.tags) for p in config.plcs)
    return f"valid, {len(config.plcs)} PLCs, {tags} tags"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hash_password:
        password = sys.stdin.readline().rstrip("\n")
        if not password:
            print("hapair-comm: no password on standard input", file=sys.stderr)
            return 2
        print(hash_password(password))
        return 0
    problem = _usage_error(args)
    if problem is not None:
        print(f"hapair-comm: {problem}", file=sys.stderr)
        return 2
    try:
        args.metrics = metrics.from_args(args)
    except metrics.MetricsError as err:
        print(f"hapair-comm: {err}", file=sys.stderr)
        return 2
    config: CommConfig | None = None
    if args.config:
        try:
            config = load(args.config)
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 2
    if args.check:
        if config is None:
            return asyncio.run(_check_topology(args))
        print(f"{args.config}: {_summary(config)}")
        return 0
    logs.setup(args.log_level)
    return event_loop.run(_run(args, config))


async def _check_topology(args: argparse.Namespace) -> int:
    store = Store(args.etcd, timeout=2.0, tls=etcd_tls.from_args(args))
    where = f"pair {args.pair} in the topology at {store.describe}"
    try:
        kv = await store.get(keys.TOPOLOGY)
        config = plcs_of(kv.value if kv is not None else None, args.pair)
    except (StoreError, PlcListError) as err:
        print(f"hapair-comm: {where}: {err}", file=sys.stderr)
        return 2
    finally:
        await store.close()
    print(f"{where}: {_summary(config)}")
    return 0


async def _run(args: argparse.Namespace, config: CommConfig | None) -> int:
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
    store = None
    if not args.standalone:
        store = Store(args.etcd, timeout=1.0, tls=etcd_tls.from_args(args))
        etcd_tls.warn_if_plain(store.secure, log, args.etcd)
    source = None if config is not None or store is None else TopologyPlcs(store, args.pair, log)
    shown = Shown()
    scraped = None
    try:
        if args.metrics is not None:
            who = (args.pair or "", args.node or socket.gethostname())
            reg = metrics.registry(CommCollector(shown, *who))
            scraped = await metrics.serve(args.metrics, reg, log)
        if source is not None:
            source.start()
            try:
                config = await _unless(stop, source.first())
            except PlcListError as err:
                log.error("no PLC list", problem=str(err))
                print(f"hapair-comm: {err}", file=sys.stderr)
                return 2
        while config is not None:
            try:
                config = await _serve(args, config, store, source, stop, log, shown)
            except AccessError as err:
                log.error("opcua security refused", problem=str(err))
                print(f"hapair-comm: {err}", file=sys.stderr)
                return 2
            if config is not None:
                log.info("restarting with the PLC list of the topology", plcs=len(config.plcs))
        return 0
    finally:
        if scraped is not None:
            scraped.close()
        if source is not None:
            await source.close()
        if store is not None:
            await store.close()


async def _serve(
    args: argparse.Namespace,
    config: CommConfig,
    store: Store | None,
    source: TopologyPlcs | None,
    stop: asyncio.Event,
    log: EventLog,
    shown: Shown,
) -> CommConfig | None:
    """Serve ``config`` until a signal (None), or a new PLC list in the topology (it)."""
    who = f"{args.pair}:{args.node}" if not args.standalone else socket.gethostname()
    security = server_security(
        config.opcua, args.opcua_cert, args.opcua_key, args.opcua_ca, args.opcua_users
    )
    server = CommServer(
        config,
        args.listen,
        log,
        app_uri=f"urn:hapair:comm:{who}",
        name=f"hapair comm server {who}",
        redundancy=args.redundancy,
        security=security,
    )

    def role(parts: Any, on_change: Any) -> StaticRole | PairRole:
        if store is None:
            return StaticRole()
        return PairRole(store, args.pair, args.node, args.service, parts, on_change, log)

    await server.start(role)
    shown.server = server
    # The address space is a few million long-lived objects; a full collection walking
    # them stalls the loop for tens of milliseconds, a whole poll's budget. Set them
    # aside from the collector while this server runs.
    gc.collect()
    gc.freeze()
    ended = asyncio.create_task(server.wait())
    changed: asyncio.Future[CommConfig] = (
        asyncio.ensure_future(source.changed(config))
        if source is not None
        else asyncio.get_running_loop().create_future()
    )
    stopping = asyncio.create_task(stop.wait())
    tasks = (ended, changed, stopping)
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    crashed = ended.done()  # a task of the server ended: a bug, made visible below
    renewed = changed.done() and not crashed and not stopping.done()
    log.info(
        "stopping", reason="a task failed" if crashed else "new PLC list" if renewed else "signal"
    )
    for task in tasks:
        task.cancel()
    gc.unfreeze()  # the old address space must be collectable once stopped
    shown.server = None
    await server.stop()
    if crashed:
        ended.result()
    return changed.result() if renewed else None


async def _unless(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None once ``stop`` is set first."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            await cancelled(task)
    return task.result() if not task.cancelled() else None


if __name__ == "__main__":
    sys.exit(main())
