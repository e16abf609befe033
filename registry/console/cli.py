"""``hapair``: the operator's command line.

Every command says what it changed. When it cannot, it prints one line saying why
and exits non-zero: 1 when the request was refused, rejected or timed out, 2 for a
wrong command line or an invalid site file (nothing is written), 3 when etcd or the
registry cannot be reached.
"""

from __future__ import annotations

import sys

# A Ctrl-C while these load (a second or more on a busy machine) ends the command quietly
# with 130, as one while it runs does, not with the traceback of an import.
try:
    import argparse
    import asyncio
    import json
    import logging
    import os
    import ssl
    from collections.abc import Callable, Coroutine
    from typing import Any

    import yaml
    from rich.console import Console
    from rich.live import Live

    from hapair.registry.console import etcd_auth_cmd, package_cmd, pki_cmd, rollout_cmd
    from hapair.registry.console.command import (
        OK,
        REFUSED,
        UNREACHABLE,
        USAGE,
        Failed,
        connected,
        operator,
        say,
        when,
    )
    from hapair.registry.console.pair_cmd import (
        ack,
        drain,
        pause,
        resume,
        switchover,
        takeover,
        undrain,
    )
    from hapair.registry.console.sources import EtcdSource, RegistrySource, Source, SourceError
    from hapair.registry.console.status import render
    from hapair.shared import admin, etcd_tls
    from hapair.shared.admin import AdminError
    from hapair.shared.client import command as client_command
    from hapair.shared.entry import add_version
    from hapair.shared.store import PermissionDenied, StoreError
    from hapair.shared.topology import Site, TopologyError, load, site_schema
except KeyboardInterrupt:
    sys.exit(130)

DEFAULT_WAIT_S = 15.0


def _load(path: str) -> Site:
    try:
        return load(path)
    except TopologyError as err:
        raise Failed(
            USAGE, f"{err.source}: invalid topology, nothing was changed", err.problems
        ) from None


def _summary(site: Site) -> str:
    pairs = list(site.pairs())
    nodes = sum(len(p.nodes) for p in pairs)
    services = sum(len(p.services) for p in pairs)
    return (
        f"site {site.site}: {len(site.workshops)} workshop(s), {len(pairs)} pair(s), "
        f"{nodes} node(s), {services} service(s)"
    )


# ---- topology ---------------------------------------------------------------------


async def topology_validate(args: argparse.Namespace) -> int:
    site = _load(args.file)
    say(f"{args.file}: valid: {_summary(site)}")
    _say_cautions(site)
    return OK


def _say_cautions(site: Site) -> None:
    for caution in site.cautions():
        say(f"  caution: {caution}")


def _changes(old: Site | None, new: Site) -> str:
    if old is None:
        return "first topology of this site"
    before = {p.name: p for p in old.pairs()}
    after = {p.name: p for p in new.pairs()}
    parts = [
        f"{label}: {', '.join(sorted(names))}"
        for label, names in (
            ("pairs added", after.keys() - before.keys()),
            ("pairs removed", before.keys() - after.keys()),
            ("pairs changed", {n for n in after.keys() & before.keys() if after[n] != before[n]}),
        )
        if names
    ]
    return "; ".join(parts) or "no change to any pair"


async def topology_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(json.dumps(site_schema(), indent=2) + "\n")
    return OK


async def topology_apply(args: argparse.Namespace) -> int:
    site = _load(args.file)
    async with connected(args) as store:
        try:
            _, previous = await admin.read_topology(store)
        except AdminError:
            previous = None
        await admin.apply_topology(store, site, operator(store))
        say(f"applied {args.file} to etcd at {store.describe}: {_summary(site)}")
        say(f"  {_changes(previous, site)}")
        _say_cautions(site)
    return OK


async def topology_show(args: argparse.Namespace) -> int:
    async with connected(args) as store:
        doc, site = await admin.read_topology(store)
    say(f"# applied by {doc.applied_by} at {when(doc.applied_at)}")
    data = site.model_dump(mode="json", exclude_defaults=not args.full)
    sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    return OK


# ---- status -----------------------------------------------------------------------


async def status(args: argparse.Namespace) -> int:
    console = Console()
    if args.registry:
        source = RegistrySource(args.registry, ssl=_registry_ssl(args))
        return await _show(source, console, args.watch)
    async with connected(args) as store:
        return await _show(EtcdSource(store), console, args.watch)


async def _show(source: Source, console: Console, watch: bool) -> int:
    if not watch:
        console.print(render(await source.report()))
        return OK
    if console.is_terminal:
        with Live(console=console, auto_refresh=False) as live:
            async for report in source.follow():
                live.update(render(report), refresh=True)
    else:
        last = None
        async for report in source.follow():
            if report != last:
                console.print(render(report))
                console.rule()
            last = report
    return OK


# ---- top --------------------------------------------------------------------------


async def top(args: argparse.Namespace) -> int:
    from hapair.registry.console.top.feed import split_urls
    from hapair.registry.console.top.terminal import run

    urls = split_urls(args.registry or "")
    if not urls:
        raise Failed(USAGE, "no registry given: use --registry URL[,URL...] or set HAPAIR_REGISTRY")
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise Failed(USAGE, "hapair top needs a terminal; for a log, use hapair status --watch")
    token = os.environ.get("HAPAIR_ADMIN_TOKEN") or None
    return await run(urls, token=token, ssl=_registry_ssl(args))


def _registry_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    try:
        return client_command.ssl_of(args)
    except client_command.CommandError as err:
        raise Failed(err.code, str(err)) from None


# ---- resolve ----------------------------------------------------------------------


async def resolve(args: argparse.Namespace) -> int:
    try:
        return await client_command.resolve(args)
    except client_command.CommandError as err:
        raise Failed(err.code, str(err)) from None


# ---- drill ------------------------------------------------------------------------


async def drill(args: argparse.Namespace) -> int:
    from hapair.registry.console import drill as drills

    async with connected(args) as store:
        try:
            ok = await drills.command(args, store, say, operator(store))
        except drills.DrillError as err:
            raise Failed(USAGE if err.usage else REFUSED, str(err)) from None
    return OK if ok else REFUSED


# ---- etcd-auth --------------------------------------------------------------------


async def etcd_auth(args: argparse.Namespace) -> int:
    async with connected(args) as store:
        try:
            lines = await etcd_auth_cmd.run(args, store)
        except etcd_auth_cmd.UsageError as err:
            raise Failed(USAGE, str(err)) from None
    for line in lines:
        say(line)
    return OK


# ---- the command line -------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value


def _etcd(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--etcd",
        default=os.environ.get("HAPAIR_ETCD"),
        help="etcd endpoints URL[,URL...] (default: $HAPAIR_ETCD)",
    )
    etcd_tls.add_options(p)


def _wait(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        type=_seconds,
        default=DEFAULT_WAIT_S,
        metavar="S",
        help=f"seconds to wait for the outcome, 0 to not wait (default {DEFAULT_WAIT_S:g})",
    )


Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="hapair", description="Operate a hapair site.")
    add_version(root)
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    topo = sub.add_parser("topology", help="validate, apply or show the site file")
    tsub = topo.add_subparsers(dest="topology_command", required=True, metavar="ACTION")
    p = tsub.add_parser("validate", help="check a site file; changes nothing")
    p.add_argument("file")
    p.set_defaults(func=topology_validate)
    p = tsub.add_parser("apply", help="validate a site file and store it in etcd")
    p.add_argument("file")
    _etcd(p)
    p.set_defaults(func=topology_apply)
    p = tsub.add_parser(
        "schema", help="print the site file's JSON Schema, for editors; changes nothing"
    )
    p.set_defaults(func=topology_schema)
    p = tsub.add_parser("show", help="print the topology stored in etcd")
    p.add_argument("--full", action="store_true", help="include every default value")
    _etcd(p)
    p.set_defaults(func=topology_show)

    p = sub.add_parser("status", help="pairs, active nodes, health and services")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--etcd",
        default=os.environ.get("HAPAIR_ETCD"),
        help="read etcd directly (default: $HAPAIR_ETCD)",
    )
    source.add_argument(
        "--registry",
        default=None,
        help="read a registry, http://HOST:PORT (default: $HAPAIR_REGISTRY when no etcd is given)",
    )
    etcd_tls.add_options(p)
    client_command.add_registry_ca(p)
    p.add_argument("--watch", action="store_true", help="keep the view current until Ctrl-C")
    p.set_defaults(func=status)

    p = sub.add_parser("resolve", help="print where a service is now (and as it moves: --watch)")
    client_command.add_arguments(p)
    p.set_defaults(func=resolve)

    p = sub.add_parser("top", help="live site dashboard; acknowledge recoveries, switch over")
    p.add_argument(
        "--registry",
        default=os.environ.get("HAPAIR_REGISTRY"),
        help="registries URL[,URL...], the next used when one goes away "
        "(default: $HAPAIR_REGISTRY)",
    )
    client_command.add_registry_ca(p)
    client_command.add_registry_cert(p)
    p.set_defaults(func=top)

    p = sub.add_parser("switchover", help="move a pair to another node, planned")
    p.add_argument("pair")
    p.add_argument("--to", metavar="NODE", help="the node to move to (default: first ready)")
    p.add_argument("--reason", default="", help="why, for the event log")
    _etcd(p)
    _wait(p)
    p.set_defaults(func=switchover)

    p = sub.add_parser("pause", help="turn automatic failover off for a pair")
    p.add_argument("pair")
    p.add_argument("--reason", default="", help="why, shown in status")
    _etcd(p)
    p.set_defaults(func=pause)

    p = sub.add_parser("ack", help="acknowledge a recovery: start the held services")
    p.add_argument("pair")
    p.add_argument("--epoch", type=int, help="the epoch acknowledged (refused if not current)")
    _etcd(p)
    p.set_defaults(func=ack)

    p = sub.add_parser(
        "takeover",
        help="force a node to take a pair with no active node, accepting possible data loss",
    )
    p.add_argument("pair")
    p.add_argument("node")
    p.add_argument("--reason", default="", help="why, for the event log")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _etcd(p)
    _wait(p)
    p.set_defaults(func=takeover)

    p = sub.add_parser("resume", help="turn automatic failover back on for a pair")
    p.add_argument("pair")
    _etcd(p)
    p.set_defaults(func=resume)

    p = sub.add_parser("drain", help="make a node ineligible; moves its pair away if active")
    p.add_argument("node")
    p.add_argument("--reason", default="", help="why, shown in status")
    _etcd(p)
    _wait(p)
    p.set_defaults(func=drain)

    p = sub.add_parser("undrain", help="make a drained node eligible again")
    p.add_argument("node")
    _etcd(p)
    p.set_defaults(func=undrain)

    p = sub.add_parser(
        "drill",
        help="inflict one fault on a pair (test sites) and measure outage, takeover, data loss",
    )
    p.add_argument("pair")
    p.add_argument(
        "--fault",
        required=True,
        choices=["crash", "freeze", "service", "partition", "switchover"],
        help="all but switchover must run on the active node itself",
    )
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--service", help="the service to kill (service) and to watch")
    p.add_argument(
        "--duration",
        type=_seconds,
        metavar="S",
        help="how long a freeze or partition lasts (default: 3 lease TTLs, at least 5 s)",
    )
    p.add_argument(
        "--timeout", type=_seconds, default=30.0, metavar="S", help="wait for recovery (30)"
    )
    p.add_argument(
        "--registry",
        default=os.environ.get("HAPAIR_REGISTRY"),
        help="registries URL[,URL...] to measure through (default: $HAPAIR_REGISTRY)",
    )
    client_command.add_registry_ca(p)
    _etcd(p)
    p.set_defaults(func=drill)

    rollout_cmd.add_parser(sub, _etcd, _seconds)
    pki_cmd.add_parser(sub)
    package_cmd.add_parser(sub)
    etcd_auth_cmd.add_parser(sub, etcd_auth, _etcd)
    return root


def _run(command: Command, args: argparse.Namespace) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(command(args))
    result: int = uvloop.run(command(args))
    return result


def main(argv: list[str] | None = None) -> None:
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # before the command ran (Ctrl-C while parsing its options)
        code = 130
    sys.exit(code)


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    # Library warnings (a lost watch, retried) would interleave with the output; the
    # command reports failures itself.
    logging.getLogger("hapair").addHandler(logging.NullHandler())
    logging.getLogger("hapair").propagate = False
    if args.command == "status" and not args.etcd and not args.registry:
        args.registry = os.environ.get("HAPAIR_REGISTRY")
    try:
        code = _run(args.func, args)
    except Failed as err:
        print(f"hapair: {err}", file=sys.stderr)
        for line in err.details:
            print(f"  {line}", file=sys.stderr)
        code = err.code
    except AdminError as err:
        print(f"hapair: {err}", file=sys.stderr)
        code = REFUSED
    except PermissionDenied as err:
        print(
            f"hapair: {err}: etcd's auth refused this certificate's user "
            "(the roles are set by hapair etcd-auth apply)",
            file=sys.stderr,
        )
        code = REFUSED
    except (StoreError, SourceError) as err:
        print(f"hapair: {err}", file=sys.stderr)
        code = UNREACHABLE
    except KeyboardInterrupt:
        code = OK if getattr(args, "watch", False) else 130
    except Exception as err:
        if os.environ.get("HAPAIR_DEBUG"):
            raise
        print(
            f"hapair: internal error: {type(err).__name__}: {err} (set HAPAIR_DEBUG=1 for details)",
            file=sys.stderr,
        )
        code = REFUSED
    return code
