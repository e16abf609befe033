"""End to end: a real client process keeps sending requests to a pair's service, through
the HTTP adapter, while the active node crashes, its critical service is killed and an
operator switches the pair over. Real etcd, real agents, a real registry process.

The client is this file run as a script (``python test_client_e2e.py --registry ...``):
it writes one JSON line per request (when sent, when answered, which node and epoch
answered, or the error). The test watches etcd for every endpoint publication, then
checks that each request answered after a publication was answered by the newly
published node and epoch, that no request failed, and that the client never restarted.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

if __name__ != "__main__":
    import pytest

    from hapair.shared import keys
    from hapair.shared.records import Switchover
    from hapair.shared.store import Store
    from tests.support.client_lab import RegistryProcess
    from tests.support.cluster import Cluster, recording_service, until
    from tests.support.harness import PYTHON, ROOT, Etcd, free_port
    from tests.support.site_records import publications

    pytestmark = pytest.mark.e2e


# ---- the client process -------------------------------------------------------------


async def client(registry: str, service: str, out: Path) -> None:
    from hapair.shared.client import Backoff, HttpAdapter, Resolver
    from hapair.shared.client.errors import describe_error

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    backoff = Backoff(initial_s=0.02, max_s=0.5)
    async with (
        Resolver(registry) as resolver,
        HttpAdapter(resolver, service, deadline_s=15.0, backoff=backoff) as http,
    ):
        with out.open("a", buffering=1) as log:
            log.write(json.dumps({"pid": os.getpid()}) + "\n")
            while not stop.is_set():
                sent = time.monotonic()
                record: dict[str, Any] = {"sent": sent}
                try:
                    async with http.get("/") as resp:
                        body = await resp.json()
                    record.update(status=resp.status, node=body["node"], epoch=int(body["epoch"]))
                except Exception as err:
                    record["error"] = describe_error(err)
                record["done"] = time.monotonic()
                log.write(json.dumps(record) + "\n")
                await asyncio.sleep(0.002)


# ---- the test -----------------------------------------------------------------------


class ClientLog:
    """The client's JSON lines, read incrementally (the file grows by ~500 lines a
    second; parsing it whole at every poll would stall this event loop)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.pids: list[int] = []
        self.requests: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return self.requests
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            record = json.loads(line)
            if "pid" in record:
                self.pids.append(record["pid"])
            else:
                self.requests.append(record)
        return self.requests

    async def served_by(self, node: str, after: float, count: int = 5) -> bool:
        """``count`` requests sent after ``after`` were answered by ``node``."""
        n = sum(1 for r in reversed(self.read()) if r["sent"] > after and r.get("node") == node)
        return n >= count


async def served_after_publication(
    log: ClientLog, published: list[tuple[float, int, str]], node: str, epoch: int
) -> bool:
    """Requests sent after the watch saw ``epoch`` published were answered by ``node``
    (what the final check counts; the status may say active before the endpoint is out)."""
    at = next((t for t, e, _ in published if e == epoch), None)
    return at is not None and await log.served_by(node, at)


async def healthy_standby(c: Cluster, node: str) -> bool:
    st = await c.status(node)
    return st is not None and st.role == "standby" and st.healthy


async def test_client_follows_crash_critical_exit_and_switchover(
    etcd: Etcd, store: Store, tmp_path: Path
) -> None:
    c = Cluster(etcd, tmp_path)
    port = free_port()
    service = recording_service("e2e-svc", port, c.record, critical=True)
    nodes = [{"name": "a", "address": "127.0.61.1"}, {"name": "b", "address": "127.0.61.2"}]
    await c.apply(c.site([{"name": "p", "nodes": nodes, "services": [service]}]))
    out = tmp_path / "client.jsonl"
    log = ClientLog(out)
    registry = RegistryProcess(etcd)
    proc: asyncio.subprocess.Process | None = None
    try:
        c.start("a")
        c.start("b")
        await registry.start()
        _, epoch = await c.active("p", node="a", timeout=15)
        first_epoch = epoch
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            __name__,
            "--registry",
            registry.url,
            "--service",
            "e2e-svc",
            "--out",
            str(out),
            cwd=ROOT,
            stderr=(tmp_path / "client.log").open("wb"),
        )
        async with publications(c.store, "e2e-svc") as published:
            await until(lambda: log.served_by("a", 0), 10, "the client served by a")
            await until(lambda: healthy_standby(c, "b"), 10, "b a healthy standby")

            # 1. The active server crashes (agent, watchdog and service at once).
            c.crash("a")
            _, epoch = await c.active("p", not_epoch=epoch, node="b")
            await until(
                lambda: served_after_publication(log, published, "b", epoch), 10, "served by b"
            )
            c.start("a")
            await until(lambda: healthy_standby(c, "a"), 10, "a back as a healthy standby")

            # 2. The critical service on the active dies.
            st = await c.status("b")
            assert st is not None and st.services[0].pid is not None
            os.kill(st.services[0].pid, signal.SIGKILL)
            _, epoch = await c.active("p", not_epoch=epoch, node="a")
            await until(
                lambda: served_after_publication(log, published, "a", epoch), 10, "served by a"
            )
            await until(lambda: healthy_standby(c, "b"), 10, "b a healthy standby again")

            # 3. An operator switches the pair over.
            await c.store.put(keys.switchover("p"), Switchover(to="b", by="test").encode())
            _, epoch = await c.active("p", not_epoch=epoch, node="b")
            await until(
                lambda: served_after_publication(log, published, "b", epoch), 10, "served by b"
            )
        assert proc.returncode is None, "the client must never need restarting"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            await proc.wait()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await registry.stop()
        await c.stop_all()
    c.assert_no_overlap()

    requests, pids = log.read(), log.pids
    assert len(pids) == 1 and proc.returncode == 0, (tmp_path / "client.log").read_text()
    errors = [r for r in requests if "error" in r]
    assert not errors, errors[:5]
    runs = c.intervals()
    moves = [(at, e, node) for at, e, node in published if e > first_epoch]
    assert [node for _, _, node in moves] == ["b", "a", "b"]
    terms = {(node, e) for _, e, node in published}
    for at, new_epoch, node in moves:
        # Every request sent after a publication was answered at that epoch or a later
        # one, by the node that published it...
        after = [r for r in requests if r["sent"] > at]
        wrong = [r for r in after if r["epoch"] < new_epoch or (r["node"], r["epoch"]) not in terms]
        assert not wrong, f"sent after epoch {new_epoch} was published ({at}): {wrong[:3]}"
        assert sum(1 for r in after if (r["node"], r["epoch"]) == (node, new_epoch)) >= 5
        # ... and no run of the service of an older term was still up to answer
        # anything then (a request in flight across the publication may be read by the
        # client a little later, but it was answered before): the services' own record.
        for run in runs:
            if int(run["epoch"]) < new_epoch and run["start"] < at:
                assert run["end"] <= at, f"{run} still ran when epoch {new_epoch} was published"
    gaps = outages(requests)
    print("client outages (s):", [round(g, 3) for g in gaps])
    # Liveness deadlines, generous for a loaded machine: the figures are bench_client's.
    assert len(gaps) == 3 and gaps[0] < 10.0 and max(gaps[1:]) < 5.0


def outages(requests: list[dict[str, Any]]) -> list[float]:
    """Each time the answering node changed: from the last answer of the old node to
    the first answer of the new one."""
    gaps = []
    for before, after in itertools.pairwise(requests):
        if before.get("node") != after.get("node"):
            gaps.append(after["done"] - before["done"])
    return gaps


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the client process of the e2e test")
    parser.add_argument("--registry", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    asyncio.run(client(args.registry, args.service, args.out))
