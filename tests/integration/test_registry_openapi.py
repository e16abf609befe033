"""schemathesis against a real ``hapair-registry`` process over a real etcd, from the
OpenAPI document the registry serves: every route, with cases made from the document
(its examples, the boundaries of every parameter and body field, invalid values, other
methods and content types, then random ones), and every answer checked against it: no
5xx, the status, the content type, the headers and the body as documented.

The site in etcd has a pair whose active published its endpoint (lookups answer 200
as well as 404), and a stand-in agent keeps its lease for the run. Names of the site's
services, pairs and nodes are offered for half the generated path parameters, so admin
requests meet real pairs and nodes, not only unknown ones.

The run is bounded: a fixed seed, deterministic generation, a few examples per route,
event streams read for a few events (the snapshot a stream starts with), long-polls
sent with a short wait (``tests/support/openapi_hooks.py``). The requests made and
their answers are kept as a HAR file, which the tests read for what they assert
beyond conformance.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hapair.registry.routes import ROUTES
from hapair.shared import keys
from hapair.shared.store import Store
from tests.integration.test_client_resolver import active_pair
from tests.support.client_lab import BIN, RegistryProcess
from tests.support.harness import ROOT, Etcd
from tests.support.site_records import FakeAgent

TOKEN = "openapi-fuzz-token"
SEED = 20261206
EXAMPLES = 12
CONFIG = f"""\
seed = {SEED}
workers = 1
request-timeout = 10
max-stream-events = 3
continue-on-failure = true

[generation]
max-examples = {EXAMPLES}
deterministic = true
database = "none"

[dictionaries.services]
values = ["mes-api", "worker", "asm.db"]
[dictionaries.pairs]
values = ["asm", "pnt"]
[dictionaries.nodes]
values = ["asm-a", "asm-b", "pnt-a"]

[parameters]
"path.service" = {{ dictionary = "services", probability = 0.5 }}
"path.pair" = {{ dictionary = "pairs", probability = 0.5 }}
"path.node" = {{ dictionary = "nodes", probability = 0.5 }}
"""
ADMIN_PATHS = ("/v1/pairs/", "/v1/nodes/")


@contextlib.asynccontextmanager
async def registry(etcd: Etcd, tmp_path: Path, *args: str) -> AsyncIterator[str]:
    """A registry process of ``etcd`` with ``args``; its URL. Its log must show no
    traceback."""
    log = tmp_path / "registry.log"
    process = await RegistryProcess(etcd, args=args, log=log).start()
    try:
        yield process.url
    finally:
        await process.stop()
        assert "Traceback" not in log.read_text(), log.read_text()


@contextlib.asynccontextmanager
async def kept_alive(agents: tuple[FakeAgent, ...]) -> AsyncIterator[None]:
    """The agents' leases kept for as long as the run lasts, as agents keep theirs."""

    async def keep() -> None:
        while True:
            for agent in agents:
                await agent.store.keepalive(agent.lease)
            await asyncio.sleep(2)

    task = asyncio.create_task(keep())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def schemathesis(url: str, tmp_path: Path, *config: str) -> list[dict[str, Any]]:
    """Run schemathesis on the registry at ``url``; fails the test with its report unless
    every check passed. The HAR entries of the run: each request and its answer."""
    config_file = tmp_path / "schemathesis.toml"
    config_file.write_text("\n".join([CONFIG, *config]))
    har = tmp_path / "run.har"
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.support.openapi_hooks",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "schemathesis"),
        *("--config-file", str(config_file), "--no-color"),
        "run",
        f"{url}/v1/openapi.json",
        # It leaves out the route it read the document from unless a filter names it:
        # every route, that one too.
        *("--include-path-regex", "^/"),
        *("--report", "har", "--report-har-path", str(har)),
        cwd=tmp_path,  # nothing of the run is written into the repository
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 240)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    report = out.decode(errors="replace")
    print(report)  # shown with the test's output when it fails
    assert proc.returncode == 0, report
    entries: list[dict[str, Any]] = json.loads(har.read_text())["log"]["entries"]
    return entries


def statuses(entries: list[dict[str, Any]]) -> dict[str, Counter[int]]:
    """The statuses each route answered (``GET /v1/site``), from the requests made with
    its own method (not the other methods tried on its path)."""
    patterns = {
        f"{r.method} {r.path}": re.compile(re.sub(r"\{\w+\}", "[^/]+", r.path)) for r in ROUTES
    }
    found: dict[str, Counter[int]] = {label: Counter() for label in patterns}
    for entry in entries:
        request = entry["request"]
        path = urllib.parse.urlsplit(request["url"]).path
        for label, pattern in patterns.items():
            if label.startswith(request["method"] + " ") and pattern.fullmatch(path):
                found[label][entry["response"]["status"]] += 1
    return found


def admin_labels() -> list[str]:
    return [f"{r.method} {r.path}" for r in ROUTES if r.admin]


async def nothing_changed(store: Store) -> None:
    """No flag, request or drain in etcd: no admin request was carried out."""
    for key in (
        *(keys.paused(p) for p in ("asm", "pnt")),
        *(keys.switchover(p) for p in ("asm", "pnt")),
        *(keys.drained(n) for n in ("asm-a", "asm-b", "asm-c", "pnt-a", "pnt-b")),
    ):
        assert await store.get(key) is None, key


async def test_every_route_answers_as_documented_with_the_admin_routes_closed(
    etcd: Etcd, store: Store, tmp_path: Path
) -> None:
    agents = await active_pair(store)
    async with kept_alive(agents), registry(etcd, tmp_path) as url:
        entries = await schemathesis(url, tmp_path)
    found = statuses(entries)
    assert all(found.values()), f"routes never called: {[k for k, v in found.items() if not v]}"
    lookups = found["GET /v1/endpoints/{service}"]
    assert lookups[200] and lookups[404] and lookups[400], lookups
    # Whatever was sent, with whatever Authorization header, refused as closed.
    for label in admin_labels():
        assert set(found[label]) == {403}, (label, found[label])
    await nothing_changed(store)


async def test_every_route_answers_as_documented_to_an_operator_with_a_token(
    etcd: Etcd, store: Store, tmp_path: Path
) -> None:
    agents = await active_pair(store)
    tokens = tmp_path / "admin-tokens"
    tokens.write_text(f"fuzz:{hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
    auth = f'[auth.openapi.bearer]\nbearer = "{TOKEN}"\n'
    async with (
        kept_alive(agents),
        registry(etcd, tmp_path, "--admin-tokens-file", str(tokens)) as url,
    ):
        entries = await schemathesis(url, tmp_path, auth)
    found = statuses(entries)
    assert all(found.values()), f"routes never called: {[k for k, v in found.items() if not v]}"
    # The token was taken (requests on the site's own pairs and nodes carried out, others
    # refused as the site's state has it), and requests without it, or with another,
    # refused.
    admin = sum((found[label] for label in admin_labels()), Counter[int]())
    assert admin[200] and admin[409] and admin[401], admin
    assert not admin[403], admin
