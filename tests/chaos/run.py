"""``python -m tests.chaos`` (``make chaos``): a seeded run of random faults against real agents.

The schedule is printed first and depends only on the seed, the fault count and the
kinds this machine can run (printed too), so ``--seed S --faults N --only I`` replays
fault ``I`` of a failing run on its own. Every fault is applied once the site has
settled, held, healed, and its recovery measured; at the end the services' own records
are checked for two nodes active at once and the database for lost commits. Exit code:
0 when nothing was violated, 1 otherwise, 2 when the suite cannot run here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from tests.chaos.checker import (
    Outcome,
    Report,
    check_commits,
    check_overlaps,
    figures,
    wait_recovered,
    wait_settled,
)
from tests.chaos.faults import bound_s, make, touched_pairs
from tests.chaos.schedule import KINDS, Fault, enabled_kinds, make_schedule, parse_only
from tests.chaos.testbed import DB_PAIR, OBSERVER, PAIRS, Testbed, hosts
from tests.support import netns
from tests.support.harness import ETCD, ROOT
from tests.support.pg_harness import postgres_available
from tests.support.tls_etcd import LAB_HELP

RUN_PREFIX = "hapair-chaos-"
SETTLE_S = 30.0
SETTLE_DB_S = 90.0  # a rejoining database may need a rewind or a fresh base backup
RECOVERY_CAP_S = 60.0  # past its bound, how long a late recovery is still measured


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=7, help="the schedule's seed (default 7)")
    p.add_argument("--faults", type=int, default=200, help="faults in the schedule")
    p.add_argument("--only", default="", help="run only these faults of it: 3,7-9")
    p.add_argument("--kinds", default="", help=f"comma-separated subset of: {', '.join(KINDS)}")
    p.add_argument(
        "--db",
        choices=["auto", "on", "off"],
        default="auto",
        help="add the PostgreSQL pair q (auto: when PostgreSQL can run here)",
    )
    p.add_argument("--lab", action="store_true", help=LAB_HELP)
    p.add_argument(
        "--term-beat",
        action="store_true",
        help="the pairs beat their term (failover.term_beat at 50/150/150 ms)",
    )
    p.add_argument("--json", type=Path, help="also write the figures there as JSON")
    p.add_argument("--keep", action="store_true", help="keep the run's directory (logs)")
    args = p.parse_args(argv)
    if args.faults < 1:
        p.error("--faults must be at least 1")
    return args


def cannot_run() -> str | None:
    why = netns.unavailable()
    if why is not None:
        return f"network namespaces: {why}"
    if not os.path.exists(ETCD) or shutil.which("etcdctl") is None:
        return "etcd and etcdctl are needed (Debian etcd-server, etcd-client: make sysdeps)"
    return None


def remove_leftovers(pid: int, keep_dir: bool = False) -> list[str]:
    """What a killed run of process ``pid`` left: its namespaces, then its directory."""
    removed = netns.remove_labs_of(pid)
    if not keep_dir:
        for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{RUN_PREFIX}{pid}-*")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def start_reaper() -> subprocess.Popen[bytes]:
    """The process that cleans up if this one is killed outright (see reaper.py)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.chaos.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )


def _remove_stale_runs() -> None:
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{RUN_PREFIX}*-*")):
        match = re.search(rf"{RUN_PREFIX}(\d+)-", path)
        if match is None or int(match[1]) == os.getpid():
            continue
        # Old enough too: the PID may belong to another PID namespace sharing /tmp.
        with contextlib.suppress(OSError):
            if netns.process_gone(int(match[1])) and time.time() - os.stat(path).st_mtime > 300:
                shutil.rmtree(path, ignore_errors=True)


def _terminate(_sig: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt


def say(line: str = "") -> None:
    print(line, flush=True)


async def apply(bed: Testbed, fault: Fault) -> Outcome:
    """Inject, hold, heal; then wait for every touched pair to be served again."""
    action = make(fault, bed)
    injected_at = time.monotonic()
    hit = await action.inject()
    try:
        note = await action.hold()
    finally:
        await action.heal()
    healed_at = time.monotonic()
    bound = bound_s(fault, bed)
    pairs = tuple(touched_pairs(fault, bed))
    outcome = Outcome(fault, hit, note, injected_at, healed_at, bound, pairs)
    outcome.missed = action.missed
    cap = bound + RECOVERY_CAP_S
    outcome.recovered_at = await wait_recovered(bed, pairs, healed_at, cap)
    if outcome.recovered_at is None:
        why = "; ".join(filter(None, [await bed.pair_unsettled(p) for p in pairs]))
        outcome.note = "; ".join(filter(None, [outcome.note, f"after {cap:.0f}s: {why}"]))
    return outcome


async def repair(bed: Testbed, pairs: Sequence[str]) -> None:
    """Restart every node of ``pairs`` (their agents lose what they remembered) and any
    etcd member not running, so that the run can go on after a recovery that did not
    happen; the violation stays counted."""
    for name in bed.members.names:
        bed.members.start_member(name)
    for pair in pairs:
        for node in bed.pairs[pair]:
            await asyncio.to_thread(bed.crash, node)
        for node in bed.pairs[pair]:
            bed.cluster.start(node)


async def dump_tasks(bed: Testbed, pairs: Sequence[str]) -> None:
    """Before a repair wipes the evidence: every agent of ``pairs`` logs where each of
    its tasks waits (SIGUSR2), for the kept run's logs."""
    for pair in pairs:
        for node in bed.pairs[pair]:
            with contextlib.suppress(KeyError, ProcessLookupError):
                bed.cluster.signal(node, signal.SIGUSR2)
    await asyncio.sleep(1.0)  # the dump is written by the agents' own loops


async def settle_or_repair(bed: Testbed, report: Report, before: str) -> bool:
    """Wait for the site to settle; if it does not, count it, repair, wait again.
    False when even a repaired site does not settle."""
    timeout = SETTLE_DB_S if bed.database else SETTLE_S
    why = await wait_settled(bed, timeout)
    if why is None:
        return True
    report.unsettled.append(f"not settled {timeout:.0f}s {before}: {why}")
    say(f"  not settled {timeout:.0f}s {before}: {why}; restarting what is not")
    unsettled = [p for p in bed.pairs if await bed.pair_unsettled(p) is not None]
    await dump_tasks(bed, unsettled)
    await repair(bed, unsettled)
    why = await wait_settled(bed, timeout)
    if why is not None:
        report.aborted = f"not settled even after restarting what was not, {before}: {why}"
    return why is None


async def conduct(bed: Testbed, faults: Sequence[Fault], report: Report) -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        started = time.monotonic()
        await bed.start()
        say(f"site up in {time.monotonic() - started:.1f}s")
        for fault in faults:
            if not await settle_or_repair(bed, report, f"before {fault}"):
                break
            await asyncio.sleep(fault.pause_s)
            outcome = await apply(bed, fault)
            report.outcomes.append(outcome)
            say(outcome.line())
            if outcome.recovered_at is None:
                say(f"  restarting the nodes of {', '.join(outcome.pairs)} to go on")
                await repair(bed, outcome.pairs)
        else:
            await settle_or_repair(bed, report, "after the last fault")
        await check_commits(bed, report)
    finally:
        await bed.close()
        # After every agent stopped, so that the last runs are complete too; and even
        # after an abort, since an overlap is what matters most.
        check_overlaps(bed.cluster, report)


def _schedule(
    args: argparse.Namespace, lab: netns.Lab, database: bool, report: Report
) -> list[Fault]:
    netem = lab.netem_available()
    if not netem:
        report.skipped.append(
            "delay: tc netem is not in this kernel and nothing else here can hold packets "
            "(loss is emulated with a random BPF filter at the switch instead)"
        )
    kinds = enabled_kinds(netem=netem, database=database)
    if args.kinds:
        wanted = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        for kind in wanted:
            if kind in KINDS and kind not in kinds:
                report.skipped.append(f"{kind}: asked for but cannot run here")
        kinds = tuple(k for k in wanted if k not in KINDS or k in kinds)
    pairs = {p: p == DB_PAIR for p in PAIRS if database or p != DB_PAIR}
    schedule = make_schedule(args.seed, args.faults, kinds, pairs)
    say(f"kinds: {', '.join(kinds)}")
    say("schedule (from the seed alone):")
    for fault in schedule:
        say(f"  {fault}")
    chosen = parse_only(args.only, args.faults) if args.only else range(args.faults)
    return [schedule[i] for i in chosen]


def replay(args: argparse.Namespace, report: Report) -> str:
    """The command that runs the faults of this run up to its last violation. A fault
    may need the ones before it, so all are kept; drop some from ONLY to reduce it."""
    hit = {o.fault.index for o in report.outcomes if o.late}
    hit |= set(report.overlap_faults) | set(report.lost_faults)
    ran = [o.fault.index for o in report.outcomes]
    upto = [i for i in ran if i <= max(hit)] if hit else ran
    command = f"make chaos SEED={args.seed} FAULTS={args.faults}"
    if args.kinds:
        command += f" CHAOS_ARGS='--kinds {args.kinds} --db {args.db}'"
    elif args.db != "auto":
        command += f" CHAOS_ARGS='--db {args.db}'"
    if upto and upto != list(range(args.faults)):
        command += f" ONLY={_ranges(upto)}"
    return command


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    out: list[str] = []
    for i in indices:
        if out and "-" not in out[-1] and int(out[-1]) == i - 1:
            out[-1] = f"{out[-1]}-{i}"
        elif out and "-" in out[-1] and int(out[-1].split("-")[1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    why = cannot_run()
    if why is not None:
        say(f"chaos: cannot run here: {why}")
        return 2
    database = args.db != "off"
    if database:
        no_pg = postgres_available()
        if no_pg is not None:
            if args.db == "on":
                say(f"chaos: --db on, but PostgreSQL cannot run here: {no_pg}")
                return 2
            database = False
            say(f"note: no database pair: {no_pg}")

    _remove_stale_runs()
    signal.signal(signal.SIGTERM, _terminate)
    reaper = start_reaper()
    try:
        return _run(args, database)
    finally:
        assert reaper.stdin is not None
        with contextlib.suppress(OSError):
            reaper.stdin.write(b"keep\n" if args.keep else b"")
            reaper.stdin.close()
        # It exits once this process has; not waited for.


def _run(args: argparse.Namespace, database: bool) -> int:
    began = time.monotonic()
    report = Report(args.seed)
    root = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-"))
    say(f"chaos: seed {args.seed}, {args.faults} faults, run directory {root}")
    try:
        with netns.Lab(hosts(database)) as lab:
            sites = ", ".join(
                f"pair {p} ({', '.join(n)}){' with PostgreSQL' if p == DB_PAIR else ''}"
                for p, n in PAIRS.items()
                if database or p != DB_PAIR
            )
            mode = "the lab mode" if args.lab else "TLS, client certificates, peer keys"
            beat = "; the pairs beat their term" if args.term_beat else ""
            say(f"site: {sites}; etcd e1, e2, e3 ({mode}){beat}")
            say(f"lab {lab.tag}, each host its own namespace")
            faults = _schedule(args, lab, database, report)
            for note in report.skipped:
                say(f"note: {note}")
            lab.enter(lab[OBSERVER])
            bed = Testbed(lab, root, database, secure=not args.lab, term_beat=args.term_beat)
            try:
                asyncio.run(conduct(bed, faults, report))
            except (KeyboardInterrupt, asyncio.CancelledError):
                report.aborted = "interrupted"
            except Exception as err:
                # A fault in the suite itself: the figures so far still say what ran.
                traceback.print_exc()
                report.aborted = f"the chaos suite failed: {err!r}"
            finally:
                signal.signal(signal.SIGTERM, _terminate)
    except KeyboardInterrupt:
        report.aborted = "interrupted"
    finally:
        if args.keep:
            say(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    for line in figures(report):
        say(line)
    say(f"run time: {time.monotonic() - began:.0f}s")
    bad = report.violations()
    if bad:
        say(f"replay: {replay(args, report)}")
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
