"""``make demo`` without a terminal: the whole demo site, its story on the batch pair,
then Ctrl-C.

The demo runs as a user would run it (real etcd, registry, agents, PostgreSQL, the
batch process), every service from a package the demo builds. Its story crashes the
batch pair's main node in the middle of a batch and acknowledges the recovery after a
second. The test reads the batch's table itself while the demo still runs, then stops
the demo with SIGINT and checks that every process it started is gone, with its
temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
import pytest
import yaml

from tests.support.cluster import until
from tests.support.harness import PYTHON, ROOT, default_sigint
from tests.support.pg_harness import needs_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.long, needs_postgres]
DEMO = ROOT / "deploy" / "demo.py"


def _start_time(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


def tree(root: int) -> dict[int, int]:
    """Every live descendant of ``root``, with its start time (a reused PID differs)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        for child in (c for c, p in parent.items() if p == pid and c not in found):
            start = _start_time(child)
            if start is not None:
                found[child] = start
                todo.append(child)
    return found


def tour_command(env_file: Path, command: str) -> subprocess.CompletedProcess[str]:
    """A command of the tour in a shell that sourced the demo's env file, with none of
    this process's HAPAIR_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAPAIR_")}
    return subprocess.run(
        ["bash", "-c", f"source {env_file} && {command}"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "200"},
        timeout=60,
        check=False,
    )


def database_of(site: dict[str, Any], pair: str) -> tuple[int, str]:
    """The port and the ``mes`` password of the pair's database, as the demo made them."""
    found = next(p for w in site["workshops"] for p in w["pairs"] if p["name"] == pair)
    db = found["database"]
    spec = next(d for d in db["databases"] if d["name"] == "mes")
    return int(db["port"]), Path(spec["password_file"]).read_text().strip()


async def test_the_demo_story_and_ctrl_c(tmp_path: Path) -> None:
    out_file = tmp_path / "demo.out"
    args = ["--registry-port", "0", "--run-dir", str(tmp_path / "run"), "--ack-after", "1"]
    with out_file.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            str(DEMO),
            *args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            preexec_fn=default_sigint,
        )
    started: dict[int, int] = {}

    def output() -> str:
        return out_file.read_text(errors="replace")

    async def said(text: str) -> str | None:
        started.update(tree(proc.pid))
        if proc.returncode is not None:
            raise AssertionError(f"the demo ended ({proc.returncode}):\n{output()}")
        return output() if text in output() else None

    tmp: Path | None = None
    try:
        await until(lambda: said("none was skipped"), 150, "the story's check", step=0.2)
        text = output()
        assert "FAILED" not in text, text
        assert "every step of batch 1 ran exactly once, none was skipped: OK" in text, text
        tmp = Path((tmp_path / "run" / "tmpdir").read_text().strip())
        site = yaml.safe_load((tmp / "site.yaml").read_text())
        port, password = database_of(site, "cell")

        # Every service comes from an archive the demo built, named with its sha256, and
        # both nodes of each pair installed it.
        services = {
            s["name"]: (p["nodes"], s["package"])
            for w in site["workshops"]
            for p in w["pairs"]
            for s in p["services"]
        }
        assert set(services) == {"mes-api", "line-hmi", "batch"}
        for service, (nodes, package) in services.items():
            archive = Path(unquote(urlsplit(package["url"]).path))
            assert package["url"].startswith("file://") and archive.parent == tmp / "packages"
            data = await asyncio.to_thread(archive.read_bytes)
            assert hashlib.sha256(data).hexdigest() == package["sha256"]
            for node in nodes:
                assert f"{node['name']}: package {service} 1.0 installed" in text, text

        # What the story told, in order.
        crashed = re.search(r"crashing cell-a in the middle of batch 1 \(steps 1-(\d+) ", text)
        held = re.search(r"cell: AWAITING OPERATOR at epoch (\d+) \(failover from cell-a\)", text)
        resume = re.search(r"cell: batch would resume at step (\d+) \(batch=1\)", text)
        assert crashed and held and resume, text
        new_epoch, first_new = int(held.group(1)), int(resume.group(1))
        assert first_new == int(crashed.group(1)) + 1
        order = [
            text.index(crashed.group(0)),
            text.index(held.group(0)),
            text.index(resume.group(0)),
            text.index(f"running: hapair ack cell --epoch {new_epoch}"),
            text.index(f"cell: recovery at epoch {new_epoch} acknowledged by demo"),
            text.index(f"step {first_new}/8 of batch 1 committed on cell-b (epoch {new_epoch})"),
            text.index("none was skipped: OK"),
        ]
        assert order == sorted(order), text

        # The batch's own table, read by the test on the new primary: each step once,
        # the ones before the crash by the old term on cell-a, the rest by the new one.
        with psycopg.connect(
            host="127.0.0.2", port=port, dbname="mes", user="mes", password=password,
            connect_timeout=5,
        ) as conn:  # fmt: skip
            rows = conn.execute(
                "SELECT step, epoch, node FROM batch_step"
                " WHERE process = 'batch' AND batch = 1 ORDER BY id"
            ).fetchall()
        assert [s for s, _, _ in rows] == list(range(1, 9))
        old = {(e, n) for s, e, n in rows if s < first_new}
        new = {(e, n) for s, e, n in rows if s >= first_new}
        assert len(old) == 1 and next(iter(old))[1] == "cell-a"
        assert new == {(new_epoch, "cell-b")} and next(iter(old))[0] < new_epoch

        # Secure by default: `source demo-run/env` drives the demo as its operator, and
        # etcd refuses a client without a certificate.
        env_file = tmp_path / "run" / "env"
        assert "export HAPAIR_ETCD=https://" in env_file.read_text()
        tour = await asyncio.to_thread(tour_command, env_file, "hapair status")
        assert tour.returncode == 0, tour.stderr
        assert "site plant-demo" in tour.stdout and "workshop assembly" in tour.stdout
        anonymous = await asyncio.to_thread(
            tour_command, env_file, "unset HAPAIR_ETCD_CERT HAPAIR_ETCD_KEY; hapair status"
        )
        assert anonymous.returncode == 3, anonymous
        assert "permission denied" not in anonymous.stderr, anonymous.stderr

        started.update(tree(proc.pid))
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            started.update(tree(proc.pid))
            proc.kill()
            await proc.wait()
        # Counted before anything is cleaned up here; then, whatever the outcome (a demo
        # killed above stops nothing it started), nothing of it is left on the machine.
        left = {pid: start for pid, start in started.items() if _start_time(pid) == start}
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert code == 0, output()
    assert "stopped; logs kept in" in output()
    assert tmp is not None and not tmp.exists()
    assert len(started) > 20  # agents, etcd, the registry, services, PostgreSQL...
    assert not left, f"left running: {left}"
