"""hapair against Patroni, side by side, on this machine and in the same run.

Patroni (from PyPI, into a throw-away venv, see ``patroni_support.py``) runs two nodes on
127.0.0.1 and 127.0.0.2 against a real etcd, ``synchronous_mode`` on, at the smallest
timings its validator accepts (ttl 20, loop_wait 1, retry_timeout 3). Under the same
steady synchronous write load as ``bench_db_failover.py`` (``tests/pg_harness.Writer``:
numbered rows through the libpq multi-host string, ``target_session_attrs=read-write``):

  crash       Patroni and its PostgreSQL (postmaster and backends) frozen, then SIGKILL
              -> first commit acknowledged by the new primary
  switchover  ``POST /switchover`` to Patroni's REST API
              -> first commit acknowledged by the new primary

and the acknowledged commits missing on the new primary. Then ``bench_db_failover.py``
runs for hapair (as a subprocess) and one table compares the medians: hapair / Patroni.
Targets (issue 4): hapair crash <= 2.5 s, switchover <= 0.3 s, each at most 1/8 of
Patroni's; no acknowledged commit lost by hapair.

hapair runs secure (etcd over TLS with client certificates, as ``bench_db_failover.py``
does by default; ``--lab`` passes its lab mode on). Patroni's etcd stays plain http, as
in Patroni's sample configurations: whatever TLS costs falls on hapair's side of the
comparison only.

Usage: python -m bench.bench_patroni [--runs 5] [--skip-hapair] [--lab]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench.patroni_support import (
    ADDRESS,
    PATRONI_VERSION,
    TIMINGS,
    PatroniCluster,
    PatroniError,
    alive,
    install_patroni,
)
from tests.support.cluster import descendants, until
from tests.support.harness import Etcd
from tests.support.pg_harness import Writer, postgres_available
from tests.support.tls_etcd import LAB_HELP

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

EVENTS = ("crash", "switchover")
TARGET_S = {"crash": 2.5, "switchover": 0.3}
TARGET_RATIO = 1 / 8


@dataclass
class Figures:
    """One manager's results: seconds per run for each event, and commits lost."""

    times: dict[str, list[float]] = field(default_factory=lambda: {e: [] for e in EVENTS})
    lost: int = 0
    acked: int = 0

    def median(self, event: str) -> float | None:
        values = self.times[event]
        return statistics.median(values) if values else None


async def _acked(writer: Writer, n: int) -> bool:
    return len(writer.acked) >= n


# -- Patroni ------------------------------------------------------------------------------
async def bench_patroni(runs: int, version: str) -> Figures:
    root = Path(tempfile.mkdtemp(prefix="hapair-benchpatroni-"))
    os.chmod(root, 0o755)  # the postgres user runs the venv and owns the node dirs below
    figures = Figures()
    etcd: Etcd | None = None
    cluster: PatroniCluster | None = None
    try:
        print(f"installing patroni {version} from PyPI into {root} ...", flush=True)
        started = time.monotonic()
        bin_dir = await asyncio.to_thread(install_patroni, root, version)
        print(f"  installed in {time.monotonic() - started:.1f} s", flush=True)
        etcd = await asyncio.to_thread(Etcd().start)
        cluster = PatroniCluster(root, bin_dir, etcd)
        try:
            await _run_patroni(cluster, runs, figures)
        except BaseException:
            print(cluster.log_tail(), file=sys.stderr)
            raise
    finally:
        if cluster is not None:
            await asyncio.to_thread(cluster.stop_all)
        if etcd is not None:
            await asyncio.to_thread(etcd.cleanup)
        if os.environ.get("HAPAIR_KEEP_TEST_DIRS"):
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return figures


async def _run_patroni(c: PatroniCluster, runs: int, figures: Figures) -> None:
    c.start("a")
    await c.wait_leader("a", 120)
    c.start("b")
    await c.wait_synced("a", "b", 180)
    config = await c.dynamic_config()
    applied = {k: config.get(k) for k in TIMINGS}
    print(
        f"Patroni cluster up: timings {applied}, synchronous_mode {config.get('synchronous_mode')}",
        flush=True,
    )
    if applied != TIMINGS:
        raise PatroniError(f"Patroni runs with {applied}, not {TIMINGS}")
    await c.create_app_database("a")
    active, first_id = "a", 1
    for kind in ("switchover", "crash"):
        for _ in range(runs):
            standby = "b" if active == "a" else "a"
            killed: list[int] = []
            writer = Writer(c.conninfo(), first_id).start()
            try:
                await until(partial(_acked, writer, 200), 30, "steady writes")
                t0 = time.monotonic()
                if kind == "crash":
                    killed = c.crash(active)
                    t1 = await writer.acked_after(t0, ADDRESS[standby], timeout=90)
                else:
                    request = asyncio.create_task(c.switchover(active, standby))
                    t1 = await writer.acked_after(t0, ADDRESS[standby], timeout=60)
                    await asyncio.wait_for(request, 60)
                await c.wait_leader(standby, 60)
            finally:
                await writer.stop()
            first_id = writer.next_id
            figures.times[kind].append(t1 - t0)
            present = await c.ids_on(standby)
            lost = len(set(writer.acked) - present)
            figures.lost += lost
            figures.acked += len(writer.acked)
            print(
                f"  patroni {kind:<10} {active} -> {standby}: {t1 - t0:.3f} s, "
                f"{len(writer.acked)} acknowledged, {lost} lost",
                flush=True,
            )
            if kind == "crash":
                await c.wait_gone(killed, 10)  # a zombie postmaster would block its restart
                c.start(active)
            await c.wait_synced(standby, active, 180)
            active = standby


# -- hapair (bench_db_failover.py) --------------------------------------------------------
RUN_LINE = re.compile(r"^\s+(crash|switchover)\s+\S+ -> \S+: ([\d.]+) s, (\d+) acknowledged")
LOST_LINE = re.compile(r"^acknowledged commits lost: (\d+) of (\d+)")


async def bench_hapair(runs: int, lab: bool = False) -> Figures:
    """Run ``bench_db_failover.py`` as a subprocess (its own event loop, its own cleanup),
    echo its output and read its per-run lines and its lost-commit line."""
    figures = Figures()
    lost_seen = False
    budget = 300 + runs * len(EVENTS) * 150  # bounded even if something hangs
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.bench_db_failover",
        "--runs",
        str(runs),
        *(["--lab"] if lab else []),
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + budget
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"bench_db_failover.py still running after {budget} s")
            raw = await asyncio.wait_for(proc.stdout.readline(), remaining)
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip("\n")
            print(f"  hapair| {line}", flush=True)
            if m := RUN_LINE.match(line):
                figures.times[m[1]].append(float(m[2]))
                figures.acked += int(m[3])
            elif m := LOST_LINE.match(line):
                figures.lost, lost_seen = int(m[1]), True
        code = await asyncio.wait_for(proc.wait(), max(1.0, deadline - time.monotonic()))
    except BaseException:
        await _interrupt(proc)
        raise
    if code != 0 or not lost_seen:
        raise RuntimeError(f"bench_db_failover.py failed (exit {code})")
    return figures


async def _interrupt(proc: asyncio.subprocess.Process) -> None:
    """SIGINT first, so its ``finally`` stops its agents and databases; then SIGKILL it and
    whatever it had started that is still there."""
    if proc.returncode is not None:
        return
    children = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(proc.wait(), 60)
        return
    except TimeoutError:
        pass
    children += descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 10)
    for pid in children:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- report -------------------------------------------------------------------------------
def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def report(patroni: Figures, hapair: Figures | None) -> bool:
    """Print the side-by-side table; True if every target is met."""
    ok = True
    print(
        f"\n{'event':<12} {'runs':>4} {'hapair median':>14} {'Patroni median':>15} "
        f"{'hapair/Patroni':>15}  targets"
    )
    for event in EVENTS:
        p = patroni.median(event)
        h = hapair.median(event) if hapair else None
        ratio = h / p if h is not None and p else None
        runs = f"{len(hapair.times[event]) if hapair else 0}/{len(patroni.times[event])}"
        verdicts = []
        if hapair is not None:
            met_s = h is not None and h <= TARGET_S[event]
            met_r = ratio is not None and ratio <= TARGET_RATIO
            ok = ok and met_s and met_r
            verdicts = [
                f"<= {TARGET_S[event]} s {'met' if met_s else 'MISSED'}",
                f"ratio <= 1/8 {'met' if met_r else 'MISSED'}",
            ]
        print(
            f"{event:<12} {runs:>4} {_s(h):>14} {_s(p):>15} "
            f"{'-' if ratio is None else f'{ratio:.3f}':>15}  {', '.join(verdicts)}"
        )
    h_lost = f"{hapair.lost} of {hapair.acked}" if hapair else "-"
    verdict = ""
    if hapair is not None:
        ok = ok and hapair.lost == 0
        verdict = f"hapair 0 {'met' if hapair.lost == 0 else 'MISSED'}"
    print(
        f"{'commits lost':<12} {'':>4} {h_lost:>14} {f'{patroni.lost} of {patroni.acked}':>15} "
        f"{'':>15}  {verdict}"
    )
    print("  runs: hapair/Patroni; ratio of the medians")
    for name, figures in (("hapair", hapair), ("Patroni", patroni)):
        if figures is None:
            continue
        spans = ", ".join(f"{e} {min(v):.3f}-{max(v):.3f} s" for e, v in figures.times.items() if v)
        print(f"  {name} min-max: {spans}")
    return ok


async def main(runs: int, version: str, skip_hapair: bool, lab: bool = False) -> int:
    # SIGTERM or SIGINT cancel the run, so that every ``finally`` stops what it started.
    # A handler (not SIG_IGN, as in a background job) also lets the hapair subprocess
    # take SIGINT as KeyboardInterrupt and clean up after itself.
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    why = postgres_available()
    if why is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    print(
        f"== Patroni {version}: ttl {TIMINGS['ttl']}, loop_wait {TIMINGS['loop_wait']}, "
        f"retry_timeout {TIMINGS['retry_timeout']}, synchronous_mode on, {runs} runs each ==",
        flush=True,
    )
    patroni = await bench_patroni(runs, version)
    if skip_hapair:
        report(patroni, None)
        return 0
    lab_option = " --lab" if lab else ""
    print(
        f"\n== hapair: python -m bench.bench_db_failover --runs {runs}{lab_option} ==", flush=True
    )
    try:
        hapair = await bench_hapair(runs, lab)
    except Exception as err:
        print(f"hapair benchmark failed: {err}", file=sys.stderr)
        report(patroni, None)
        return 1
    met = report(patroni, hapair)
    print(f"\nall targets {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="runs of each event (default 5)")
    parser.add_argument("--patroni-version", default=PATRONI_VERSION)
    parser.add_argument("--skip-hapair", action="store_true", help="measure Patroni only")
    parser.add_argument("--lab", action="store_true", help=f"hapair in {LAB_HELP}")
    args = parser.parse_args()
    try:
        sys.exit(asyncio.run(main(args.runs, args.patroni_version, args.skip_hapair, args.lab)))
    except asyncio.CancelledError:
        print("interrupted: every process stopped, temp dirs removed", file=sys.stderr)
        sys.exit(130)
