"""The etcd cost of the term beat: PAIRS pairs, each an active beating every 50 ms with
its guarded transaction (``workshop_agent/beat_election.py``) and a standby watching its
pair's beat key, against one real etcd.

First, crash takeovers: an active beats, stops at once (its lease lives on), and its
standby takes the pair over by the rules (``term_beat.py``) and campaigns: the time from
the crash to the new epoch, and how long before the standby's takeover the crashed
active's watchdog deadline had passed (as its acknowledged beats set it).

Then, per run: the beats etcd applied per second (against the 20 per pair asked), each
beat's round trip (median, p99, and the share later than one interval: those a loaded
etcd would turn into holds), etcd's CPU (in all and per beat), the CPU of the client
processes and how long they waited for a CPU, the revisions and the growth of etcd's
database per second, and the watch deliveries per second. ``--procs`` processes play the
pairs, each pair's active and standby on a connection of its own, as two servers would
be. No agent runs: this is the store's load alone, as the agents would put it on etcd.

The last run (the ceiling) plays the most pairs with every active beating again as soon
as its last beat is answered: what this etcd applies at most while the clients share
its machine (a lower bound of what it serves alone).

etcd runs over TLS with client certificates unless ``--lab``. Usage:
  python -m bench.bench_term_beat [--takeovers 20] [--pairs 10 50 100] [--seconds 20]
      [--procs 2] [--interval-ms 50] [--no-ceiling] [--lab]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procstat import proc_cpu_seconds, run_delay
from hapair.shared import keys
from hapair.shared.clock import boottime
from hapair.shared.pki import TlsFiles
from hapair.shared.store import Store
from hapair.workshop_agent.beat_election import TermBeats, beat_record, beat_timing
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.term_beat import (
    BeatTiming,
    BeatView,
    Heartbeat,
    TakeoverGuard,
    takeover_due,
)
from tests.support.harness import Etcd
from tests.support.tls_etcd import LAB_HELP, etcd_mode, own_etcd

WARM_UP_S = 3.0  # every pair campaigned and beating before the window opens


def timing(interval_ms: int) -> BeatTiming:
    """The beat's timings at ``interval_ms``, the fence and the margin three of them (the
    defaults: 50, 150 and 150 ms)."""
    return BeatTiming(interval_ms / 1000, 3 * interval_ms / 1000, 3 * interval_ms / 1000)


TIMING = timing(50)


def _status(etcd: Etcd) -> dict[str, Any]:
    out = subprocess.run(
        ["etcdctl", f"--endpoints={etcd.url}", *etcd.ctl_tls(), "endpoint", "status", "-w", "json"],
        capture_output=True,
        env={**os.environ, "ETCDCTL_API": "3"},
        timeout=10,
        check=True,
    )
    status: dict[str, Any] = json.loads(out.stdout)[0]["Status"]
    return status


def revision_and_size(etcd: Etcd) -> tuple[int, int]:
    """etcd's revision and database size, from one status call."""
    status = _status(etcd)
    return int(status["header"]["revision"]), int(status["dbSize"])


@dataclass
class Window:
    """What a worker counts between two wall-clock instants."""

    start: float
    end: float
    trips: list[float] = field(default_factory=list)
    delivered: int = 0

    def open(self) -> bool:
        return self.start <= time.time() < self.end


async def active(store: Store, pair: str, stop: asyncio.Event, w: Window, closed: bool) -> None:
    """One pair's active: its campaign with the first beat, then a beat every interval
    from the send of the previous one (as the agent sends them), or, ``closed``, the
    next one as soon as the last is answered (to find what etcd serves at most)."""
    lease = await store.grant(60)
    beats = TermBeats(store, pair, f"{pair}-a")
    epoch = await Election(store, pair, f"{pair}-a").campaign(
        lease, members=[f"{pair}-a", f"{pair}-b"], also=[beats.first_beat(lease, TIMING)]
    )
    assert epoch is not None
    value = beat_record(f"{pair}-a", TIMING)
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        sent = loop.time()
        assert await beats.beat(epoch, lease, value)
        if w.open():
            w.trips.append(loop.time() - sent)
        if not closed:
            await asyncio.sleep(max(0.0, sent + TIMING.interval - loop.time()))


async def standby(store: Store, pair: str, w: Window) -> None:
    async for _ in store.watch_prefix(keys.beats_of(pair), 0):
        if w.open():
            w.delivered += 1


async def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Play ``spec["pairs"]``: each pair's active and standby with a connection of its
    own, as two servers would have; count what falls in the window."""
    tls = TlsFiles(**{k: Path(v) for k, v in spec["tls"].items()}) if spec["tls"] else None
    w = Window(spec["start"], spec["end"])
    names: list[str] = spec["pairs"]
    stores = [Store(spec["url"], timeout=5.0, tls=tls) for _ in range(2 * len(names))]
    stop = asyncio.Event()
    watchers = [asyncio.create_task(standby(stores[2 * i + 1], n, w)) for i, n in enumerate(names)]
    actives = [
        asyncio.create_task(active(stores[2 * i], n, stop, w, spec["closed"]))
        for i, n in enumerate(names)
    ]
    await asyncio.sleep(max(0.0, w.start - time.time()))
    cpu0, wait0 = time.process_time(), run_delay()
    await asyncio.sleep(max(0.0, w.end - time.time()))
    cpu1, wait1 = time.process_time(), run_delay()
    stop.set()
    await asyncio.gather(*actives)
    for t in watchers:
        t.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    await asyncio.gather(*(s.close() for s in stores))
    return {"trips": w.trips, "delivered": w.delivered, "cpu": cpu1 - cpu0, "wait": wait1 - wait0}


def run(
    etcd: Etcd, pairs: int, seconds: float, procs: int, closed: bool, interval_ms: int
) -> dict[str, Any]:
    """``pairs`` pairs played by ``procs`` worker processes against ``etcd``, measured
    over ``seconds`` once every pair beats."""
    names = [f"p{i:03d}" for i in range(pairs)]
    tls = etcd.tls
    files = None if tls is None else {k: str(v) for k, v in vars(tls).items() if v is not None}
    start = time.time() + WARM_UP_S + pairs * 0.02
    end = start + seconds
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.bench_term_beat", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(procs)
    ]
    for n, proc in enumerate(workers):
        spec = {"url": etcd.url, "tls": files, "pairs": names[n::procs], "start": start}
        assert proc.stdin is not None
        proc.stdin.write(
            json.dumps({**spec, "end": end, "closed": closed, "interval_ms": interval_ms})
        )
        proc.stdin.close()
    assert etcd.proc is not None
    time.sleep(max(0.0, start - time.time()))
    (rev0, size0), etcd0 = revision_and_size(etcd), proc_cpu_seconds(etcd.proc.pid)
    time.sleep(max(0.0, end - time.time()))
    etcd1, (rev1, size1) = proc_cpu_seconds(etcd.proc.pid), revision_and_size(etcd)
    results = []
    for proc in workers:
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.wait(timeout=60 + pairs)
        if proc.returncode != 0:
            raise RuntimeError(f"a worker failed (exit {proc.returncode})")
        results.append(json.loads(out))
    trips = sorted(t for r in results for t in r["trips"])
    cpu, wait = sum(r["cpu"] for r in results), sum(r["wait"] for r in results)
    beats = len(trips) / seconds
    return {
        "pairs": pairs,
        "mode": "closed" if closed else "paced",
        "client_processes": procs,
        "beats_per_s": beats,
        "asked_per_s": None if closed else pairs / TIMING.interval,
        "round_trip_median_ms": 1000 * statistics.median(trips),
        "round_trip_p99_ms": 1000 * trips[int(0.99 * (len(trips) - 1))],
        "late_pct": 100 * sum(t > TIMING.interval for t in trips) / len(trips),
        "etcd_cpu_pct": 100 * (etcd1 - etcd0) / seconds,
        "etcd_cpu_us_per_beat": 1e6 * (etcd1 - etcd0) / len(trips),
        "clients_cpu_pct": 100 * cpu / seconds,
        "clients_wait_for_cpu_pct": 100 * wait / seconds,
        "revisions_per_s": (rev1 - rev0) / seconds,
        "db_growth_kib_per_s": (size1 - size0) / 1024 / seconds,
        "deliveries_per_s": sum(r["delivered"] for r in results) / seconds,
        "load_avg_1m": os.getloadavg()[0],
    }


async def takeover_once(store: Store, n: int, rng: random.Random) -> tuple[float, float]:
    """An active beats, then stops at once (its server crashed; its lease lives on); its
    standby takes the pair over by the rules and campaigns. (Crash to the standby's new
    epoch, seconds; the time from the crashed active's watchdog deadline, as its own
    acknowledged beats set it, to the standby's takeover send: below 0 would be an
    overlap.)"""
    pair, a, b = f"t{n:03d}", f"t{n:03d}-a", f"t{n:03d}-b"
    beats_a, beats_b = TermBeats(store, pair, a), TermBeats(store, pair, b)
    lease_a, lease_b = await store.grant(30), await store.grant(30)
    started = boottime()
    epoch = await Election(store, pair, a).campaign(
        lease_a, members=[a, b], also=[beats_a.first_beat(lease_a, TIMING)]
    )
    assert epoch is not None
    heart, view = Heartbeat(epoch, TIMING, started), BeatView()

    async def watch() -> None:
        async for change in store.watch_prefix(keys.beats_of(pair), epoch):
            timing = beat_timing(change.kv.key, change.kv.value)
            if change.deleted or timing is None:
                view.deleted()
            else:
                view.delivered(change.kv.mod_revision, timing, boottime())

    async def beat() -> None:
        value = beat_record(a, TIMING)
        while True:
            sent = boottime()
            heart.answered(sent, await beats_a.beat(epoch, lease_a, value))
            await asyncio.sleep(max(0.0, sent + TIMING.interval - boottime()))

    watcher = asyncio.create_task(watch())
    beater = asyncio.create_task(beat())
    await asyncio.sleep(rng.uniform(1.0, 1.5))
    beater.cancel()  # a beat in flight may still be applied, unanswered: as in a crash
    crash = boottime()
    watchdog_at = heart.fence_point + TIMING.margin / 2
    members = await store.get(keys.members(pair))
    assert members is not None
    while True:
        due = takeover_due(view.seen, epoch)
        if due > boottime():
            await asyncio.sleep(min(0.005, due - boottime()))
            continue
        assert view.seen is not None
        sent = boottime()
        guard = TakeoverGuard(epoch, view.seen.revision, members.mod_revision)
        if await beats_b.take_over(guard) is not None:
            break
    new_epoch = await Election(store, pair, b).campaign(
        lease_b,
        target=True,
        members=[a, b],
        members_revision=members.mod_revision,
        also=[beats_b.first_beat(lease_b, TIMING)],
    )
    assert new_epoch is not None and new_epoch > epoch
    done = boottime()
    watcher.cancel()
    await asyncio.gather(beater, watcher, return_exceptions=True)
    await store.revoke(lease_a)
    await store.revoke(lease_b)
    return done - crash, sent - watchdog_at


async def takeovers(etcd: Etcd, runs: int) -> dict[str, float]:
    store = Store(etcd.url, timeout=5.0, tls=etcd.tls)
    rng = random.Random(runs)
    results = [await takeover_once(store, n, rng) for n in range(runs)]
    await store.close()
    took, room = sorted(r[0] for r in results), sorted(r[1] for r in results)
    return {
        "runs": runs,
        "crash_to_new_epoch_median_ms": 1000 * statistics.median(took),
        "crash_to_new_epoch_min_ms": 1000 * took[0],
        "crash_to_new_epoch_max_ms": 1000 * took[-1],
        "watchdog_before_takeover_min_ms": 1000 * room[0],
        "load_avg_1m": os.getloadavg()[0],
    }


def rounded(result: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}


def main() -> None:
    global TIMING
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--takeovers", type=int, default=20, help="crash takeovers to time")
    parser.add_argument(
        "--procs", type=int, default=2, help="client processes playing the pairs' servers"
    )
    parser.add_argument(
        "--interval-ms", type=int, default=50, help="the beat's interval (fence and margin: 3x)"
    )
    parser.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip the last run: the most pairs, each beating again as soon as answered",
    )
    parser.add_argument("--lab", action="store_true", help=LAB_HELP)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(sys.stdin.read())
        TIMING = timing(spec["interval_ms"])
        print(json.dumps(asyncio.run(worker(spec))))
        return
    TIMING = timing(args.interval_ms)
    print(f"etcd: {etcd_mode(args.lab)}; {os.cpu_count()} cores; beat every {args.interval_ms} ms")
    if args.takeovers:
        with tempfile.TemporaryDirectory(prefix="hapair-beat-") as tmp:
            etcd = own_etcd(Path(tmp), args.lab)
            try:
                result = asyncio.run(takeovers(etcd, args.takeovers))
            finally:
                etcd.cleanup()
        print(json.dumps(rounded(result)))
    runs = [(pairs, False) for pairs in args.pairs]
    if args.ceiling and args.pairs:
        runs.append((max(args.pairs), True))
    for pairs, closed in runs:
        with tempfile.TemporaryDirectory(prefix="hapair-beat-") as tmp:
            etcd = own_etcd(Path(tmp), args.lab)
            try:
                result = run(etcd, pairs, args.seconds, args.procs, closed, args.interval_ms)
            finally:
                etcd.cleanup()
        print(
            json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()})
        )


if __name__ == "__main__":
    main()
