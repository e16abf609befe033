"""``hapair rollout PAIR``: move every copy of a pair's services onto the package
versions the site names, with one planned switchover (``shared/rollout.py`` carries it
out; the registry's ``POST /v1/pairs/{pair}/rollout`` runs the same)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from hapair.registry.console.command import OK, REFUSED, Failed, connected, operator, say
from hapair.registry.console.confirm import confirmed
from hapair.shared import rollout


async def run(args: argparse.Namespace) -> int:
    async with connected(args) as store:
        plan = await rollout.prepare(store, args.pair)
        say(
            f"rollout of pair {args.pair}: {plan.active} is active (epoch {plan.epoch}), "
            f"{plan.target} takes over"
        )
        for number, line in enumerate(plan.steps(), 1):
            say(f"  {number}. {line}")
        if plan.up_to_date:
            say(f"pair {args.pair}: every copy already runs the declared versions")
            return OK
        if args.dry_run:
            say("dry run: nothing was changed")
            return OK
        if not args.yes:
            await confirmed(
                args.pair, f"roll pair {args.pair} out", "roll out", "rollout cancelled"
            )
        started = await rollout.begin(store, plan, operator(store))
        say(f"rollout {started.id} started")
        outcome = await started.run(say, args.timeout)
    if not outcome.ok:
        raise Failed(REFUSED, outcome.message)
    say(outcome.message)
    return OK


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    etcd: Callable[[argparse.ArgumentParser], None],
    seconds: Callable[[str], float],
) -> None:
    p = sub.add_parser(
        "rollout",
        help="move a pair's services onto the package versions the site names, "
        "with one planned switchover",
    )
    p.add_argument("pair")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=rollout.DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"give up (and roll back) after S seconds (default {rollout.DEFAULT_TIMEOUT_S:g})",
    )
    etcd(p)
    p.set_defaults(func=run)
