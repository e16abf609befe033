"""The checker: every fault recovered within its bound, no two nodes ever active at once
(from the services' own records, with :meth:`cluster.Cluster.assert_no_overlap`), no
acknowledged commit lost, and the figures of a run.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from tests.chaos.schedule import Fault
from tests.chaos.testbed import Testbed
from tests.support.cluster import Cluster, until

POLL_S = 0.05
COMMIT_CHECK_S = 30.0


@dataclass
class Outcome:
    """One fault as it happened. Times are on the machine's monotonic clock."""

    fault: Fault
    hit: str
    note: str
    injected_at: float
    healed_at: float
    bound_s: float
    pairs: tuple[str, ...] = ()
    recovered_at: float | None = None
    outage_s: float | None = None  # from the records: time no run of a touched pair served
    missed: bool = False  # the fault found nothing to hit: it proves nothing

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.healed_at

    @property
    def late(self) -> bool:
        return self.recovery_s is None or self.recovery_s > self.bound_s

    def line(self) -> str:
        took = "never" if self.recovery_s is None else f"{self.recovery_s:.2f}s"
        verdict = "LATE" if self.late else "ok"
        note = f"; {self.note}" if self.note else ""
        return (
            f"{self.fault}: hit {self.hit}{note} -> recovered {took} "
            f"(bound {self.bound_s:.1f}s) {verdict}"
        )


@dataclass
class Report:
    seed: int
    outcomes: list[Outcome] = field(default_factory=list)
    runs: int = 0
    overlap: str | None = None
    overlap_faults: list[int] = field(default_factory=list)
    acked: int | None = None
    lost: list[int] = field(default_factory=list)
    lost_faults: list[int] = field(default_factory=list)
    aborted: str | None = None
    commit_check: str | None = None  # why the commits could not be checked
    unsettled: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        out = [f"late recovery: {o.line()}" for o in self.outcomes if o.late]
        out += [f"found nothing to hit: {o.line()}" for o in self.outcomes if o.missed]
        out += self.unsettled
        if self.overlap is not None:
            out.append(f"two nodes active at once (faults {self.overlap_faults}): {self.overlap}")
        if self.lost:
            out.append(
                f"{len(self.lost)} acknowledged commits lost (faults {self.lost_faults}): "
                f"ids {self.lost[:10]}"
            )
        if self.commit_check is not None:
            out.append(f"acknowledged commits not checked: {self.commit_check}")
        if self.aborted is not None:
            out.append(f"run aborted: {self.aborted}")
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "faults": len(self.outcomes),
            "by_kind": dict(Counter(o.fault.kind for o in self.outcomes)),
            "recovery": {k: v for k, v in _recovery_by_kind(self.outcomes).items()},
            "runs": self.runs,
            "overlaps": 0 if self.overlap is None else 1,
            "acked": self.acked,
            "lost": len(self.lost),
            "violations": self.violations(),
            "skipped": self.skipped,
        }


async def wait_recovered(
    bed: Testbed, pairs: Sequence[str], since: float, cap: float
) -> float | None:
    """When every pair in ``pairs`` is served again after ``since``; None past ``cap``."""
    deadline = since + cap
    while time.monotonic() < deadline:
        served = [await bed.serving(p, since) for p in pairs]
        if all(served):
            return time.monotonic()
        await asyncio.sleep(POLL_S)
    return None


async def wait_settled(bed: Testbed, timeout: float) -> str | None:
    """None once the site is back to normal; else why not, after ``timeout``."""
    deadline = time.monotonic() + timeout
    why: str | None = "not checked"
    while time.monotonic() < deadline:
        why = await bed.unsettled()
        if why is None:
            return None
        await asyncio.sleep(0.2)
    return why


def check_overlaps(cluster: Cluster, report: Report) -> None:
    """Run the end-to-end tests' own overlap check over every run of the chaos run; if
    it fails, name the faults in place while the two runs it reports overlapped."""
    runs = cluster.intervals()
    report.runs = len(runs)
    measure_outages(runs, report)
    try:
        cluster.assert_no_overlap()
    except AssertionError as err:
        report.overlap = str(err)
        pids = {int(p) for p in re.findall(r"'pid': (\d+)", str(err))}
        both = [r for r in runs if r["pid"] in pids]
        if both:
            start = max(r["start"] for r in both)
            end = min(r["end"] for r in both)
            report.overlap_faults = faults_during(report.outcomes, start, end)


def measure_outages(runs: list[dict[str, Any]], report: Report) -> None:
    """For each fault, how long from its injection to its recovery the service of a pair
    it touched had no run at all, by the runs' own start and end records."""
    for o in report.outcomes:
        if o.recovered_at is None:
            continue
        worst = 0.0
        for pair in o.pairs:
            mine = sorted((r["start"], r["end"]) for r in runs if r["pair"] == pair)
            worst = max(worst, _uncovered(mine, o.injected_at, o.recovered_at))
        o.outage_s = worst


def _uncovered(spans: list[tuple[float, float]], start: float, end: float) -> float:
    gap, at = 0.0, start
    for s, e in spans:
        if e <= at:
            continue
        if s >= end:
            break
        gap += max(0.0, s - at)
        at = max(at, e)
    return gap + max(0.0, end - at)


def faults_during(outcomes: Iterable[Outcome], start: float, end: float) -> list[int]:
    """The faults from whose injection to whose recovery [start, end] intersects."""
    hit = []
    for o in outcomes:
        over = o.recovered_at if o.recovered_at is not None else float("inf")
        if o.injected_at <= end and start <= over:
            hit.append(o.fault.index)
    return hit


async def check_commits(bed: Testbed, report: Report) -> None:
    """Every acknowledged commit must be on the primary at the end."""
    writer = bed.writer
    if writer is None:
        return
    await writer.stop()
    report.acked = len(writer.acked)

    async def read() -> set[int]:
        async with await psycopg.AsyncConnection.connect(bed.conninfo(), autocommit=True) as c:
            cur = await c.execute("SELECT id FROM ticks")
            return {int(r[0]) for r in await cur.fetchall()}

    try:
        present = await until(read, COMMIT_CHECK_S, "a primary to read the rows from")
    except AssertionError as err:
        report.commit_check = str(err)
        return
    report.lost = sorted(set(writer.acked) - present)
    if report.lost:
        acked_at = dict(zip(writer.acked, (t for t, _ in writer.acked_at), strict=True))
        times = [acked_at[i] for i in report.lost]
        report.lost_faults = faults_during(report.outcomes, min(times), max(times))


def _recovery_by_kind(outcomes: Sequence[Outcome]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({o.fault.kind for o in outcomes}):
        mine = [o for o in outcomes if o.fault.kind == kind]
        times = [o.recovery_s for o in mine if o.recovery_s is not None]
        outages = [o.outage_s for o in mine if o.outage_s is not None]
        out[kind] = {
            "n": len(mine),
            "median_s": _median(times),
            "worst_s": _worst(times),
            "bound_s": max(o.bound_s for o in mine),
            "late": sum(o.late for o in mine),
            "outage_median_s": _median(outages),
            "outage_worst_s": _worst(outages),
        }
    return out


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _worst(values: list[float]) -> float | None:
    return round(max(values), 2) if values else None


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def figures(report: Report) -> list[str]:
    outcomes = report.outcomes
    kinds = Counter(o.fault.kind for o in outcomes)
    lines = [
        f"chaos figures, seed {report.seed}: {len(outcomes)} faults",
        "faults by type: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
    ]
    lines += [f"not run here: {s}" for s in report.skipped]
    lines.append(
        f"  {'(seconds)':<16} {'n':>4}  {'recovery after heal':^23}  {'late':>4}"
        f"  {'service outage':^15}"
    )
    lines.append(
        f"  {'':<16} {'':>4}  {'median':>7} {'worst':>7} {'bound':>7}  {'':>4}"
        f"  {'median':>7} {'worst':>7}"
    )
    for kind, r in _recovery_by_kind(outcomes).items():
        lines.append(
            f"  {kind:<16} {r['n']:>4}  {_num(r['median_s']):>7} {_num(r['worst_s']):>7}"
            f" {r['bound_s']:>7.1f}  {r['late']:>4}"
            f"  {_num(r['outage_median_s']):>7} {_num(r['outage_worst_s']):>7}"
        )
    overlaps = 0 if report.overlap is None else "at least 1"
    lines.append(f"overlaps (two nodes active at once): {overlaps} in {report.runs} service runs")
    if report.acked is not None:
        lines.append(f"commits: {report.acked} acknowledged, {len(report.lost)} lost")
    asked = [o.note for o in outcomes if o.fault.kind == "switchover"]
    if asked:
        said = Counter(n.split(" (")[0].split(":")[0].removeprefix("switchover ") for n in asked)
        lines.append(
            f"switchovers asked for mid-fault: {len(asked)} ("
            + ", ".join(f"{k} {n}" for k, n in sorted(said.items()))
            + ")"
        )
    bad = report.violations()
    lines.append("violations: " + ("none" if not bad else str(len(bad))))
    lines += [f"  {v}" for v in bad]
    return lines
