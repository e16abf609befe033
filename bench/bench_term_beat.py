"""The etcd cost of the term beat: PAIRS pairs, each an active beating every 50 ms with
its guarded transaction (``workshop_agent/beat_election.py``) and a standby watching its
pair's beat key, against one real etcd.

First, crash takeovers: an active beats, stops at once (its lease lives on), and its
standby takes the pair over by the rules (``term_beat.py``) and campaigns: the time from
the crash to the new epoch, and how long before the standby's takeover the crashed
active's watchdog deadline had passed (as its acknowledged beats set it).

Then, per run: the beats etcd applied per second (against the 20 per pair asked), each beat's
round trip (median, p99, and the share later than one interval: those a loaded etcd
would turn into holds), the CPU of etcd and of the client process (which plays every
pair's active and standby), the revisions and the growth of etcd's database per
second, and the watch deliveries per second. No agent runs: this is the store's load
alone, as the agents would put it on etcd.

etcd runs over TLS with client certificates unless ``--lab``. Usage:
  python -m bench.bench_term_beat [--takeovers 20] [--pairs 10 100] [--seconds 20] [--lab]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.procstat import proc_cpu_seconds, run_delay
from hapair.shared import keys
from hapair.shared.clock import boottime
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

TIMING = BeatTiming(interval=0.05, fence_after=0.15, margin=0.15)


def db_size(etcd: Etcd) -> int:
    out = subprocess.run(
        ["etcdctl", f"--endpoints={etcd.url}", *etcd.ctl_tls(), "endpoint", "status", "-w", "json"],
        capture_output=True,
        env={**os.environ, "ETCDCTL_API": "3"},
        timeout=10,
        check=True,
    )
    return int(json.loads(out.stdout)[0]["Status"]["dbSize"])


async def active(store: Store, pair: str, stop: asyncio.Event, trips: list[float]) -> int:
    """One pair's active: its campaign with the first beat, then a beat every interval
    from the send of the previous one (as the lease's keepalives go)."""
    lease = await store.grant(30)
    beats = TermBeats(store, pair, f"{pair}-a")
    epoch = await Election(store, pair, f"{pair}-a").campaign(
        lease, members=[f"{pair}-a", f"{pair}-b"], also=[beats.first_beat(lease, TIMING)]
    )
    assert epoch is not None
    value = beat_record(f"{pair}-a", TIMING)
    loop = asyncio.get_running_loop()
    done = 0
    while not stop.is_set():
        sent = loop.time()
        assert await beats.beat(epoch, lease, value)
        trips.append(loop.time() - sent)
        done += 1
        await asyncio.sleep(max(0.0, sent + TIMING.interval - loop.time()))
    return done


async def standby(store: Store, pair: str, stop: asyncio.Event, seen: list[int]) -> None:
    async for _ in store.watch_prefix(keys.beats_of(pair), 0):
        seen[0] += 1
        if stop.is_set():
            return


async def run(etcd: Etcd, pairs: int, seconds: float) -> dict[str, float]:
    store = Store(etcd.url, timeout=5.0, tls=etcd.tls)
    names = [f"p{i:03d}" for i in range(pairs)]
    stop = asyncio.Event()
    trips: list[float] = []
    seen = [0]
    watchers = [asyncio.create_task(standby(store, n, stop, seen)) for n in names]
    await asyncio.sleep(1.0)
    actives = [asyncio.create_task(active(store, n, stop, trips)) for n in names]
    await asyncio.sleep(2.0)  # every pair beating
    assert etcd.proc is not None
    trips.clear()
    seen[0] = 0
    rev0 = (await store.txn([], [])).revision
    size0, etcd0, me0, wait0 = (
        db_size(etcd),
        proc_cpu_seconds(etcd.proc.pid),
        time.process_time(),
        run_delay(),
    )
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - t0
    etcd1, me1, wait1 = proc_cpu_seconds(etcd.proc.pid), time.process_time(), run_delay()
    rev1, size1 = (await store.txn([], [])).revision, db_size(etcd)
    beats, delivered = len(trips), seen[0]
    stop.set()
    await asyncio.gather(*actives)
    for w in watchers:
        w.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    await store.close()
    ordered = sorted(trips)
    return {
        "pairs": pairs,
        "beats_per_s": beats / elapsed,
        "asked_per_s": pairs / TIMING.interval,
        "round_trip_median_ms": 1000 * statistics.median(ordered),
        "round_trip_p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
        "late_pct": 100 * sum(t > TIMING.interval for t in ordered) / len(ordered),
        "etcd_cpu_pct": 100 * (etcd1 - etcd0) / elapsed,
        "client_cpu_pct": 100 * (me1 - me0) / elapsed,
        "client_cpu_per_pair_pct": 100 * (me1 - me0) / elapsed / pairs,
        "client_wait_for_cpu_pct": 100 * (wait1 - wait0) / elapsed,
        "revisions_per_s": (rev1 - rev0) / elapsed,
        "db_growth_kib_per_s": (size1 - size0) / 1024 / elapsed,
        "deliveries_per_s": delivered / elapsed,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--takeovers", type=int, default=20, help="crash takeovers to time")
    parser.add_argument("--lab", action="store_true", help=LAB_HELP)
    args = parser.parse_args()
    print(f"etcd: {etcd_mode(args.lab)}; {os.cpu_count()} cores")
    if args.takeovers:
        with tempfile.TemporaryDirectory(prefix="hapair-beat-") as tmp:
            etcd = own_etcd(Path(tmp), args.lab)
            try:
                result = asyncio.run(takeovers(etcd, args.takeovers))
            finally:
                etcd.cleanup()
        print(json.dumps({k: round(v, 2) for k, v in result.items()}))
    for pairs in args.pairs:
        with tempfile.TemporaryDirectory(prefix="hapair-beat-") as tmp:
            etcd = own_etcd(Path(tmp), args.lab)
            try:
                result = asyncio.run(run(etcd, pairs, args.seconds))
            finally:
                etcd.cleanup()
        print(json.dumps({k: round(v, 2) for k, v in result.items()}))


if __name__ == "__main__":
    main()
