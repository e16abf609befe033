"""The registry over a real etcd: lookups, long-polls, event streams, site, admin routes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, ClientSession, TCPConnector
from aiohttp.test_utils import TestClient, TestServer

from hapair.registry.app import create_app
from hapair.registry.appkeys import READERS, RegistryConfig
from hapair.shared import keys, records
from hapair.shared.store import Store
from tests.support import site_records
from tests.support.client_lab import RegistryProcess
from tests.support.harness import free_port
from tests.support.site_records import FakeAgent, apply_site
from tests.unit.test_registry import get

DEADLINE_S = 5.0
START_S = 20.0
"""How long a registry process may take to start and read etcd (a loaded machine)."""


async def until(
    probe: Callable[[], Awaitable[Any]], what: str, deadline_s: float = DEADLINE_S
) -> Any:
    """Await ``probe`` until it returns something truthy; fail naming ``what``."""
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                result = await probe()
                if result:
                    return result
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {deadline_s} s waiting for {what}") from None


@pytest.fixture
async def client(store: Store, etcd: Any) -> AsyncIterator[TestClient[Any, Any]]:
    # Admin routes open: these tests are about what they do, not who may use them.
    config = RegistryConfig(heartbeat_s=0.2, open_admin=True)
    app = create_app(etcd.url, config, tls=etcd.tls)
    async with TestClient(TestServer(app)) as c:
        await until(lambda: _ok(c, "/healthz"), "the registry to sync with etcd")
        yield c


async def _ok(c: TestClient[Any, Any], path: str) -> bool:
    async with c.get(path) as resp:
        return resp.status == 200


async def status_becomes(
    c: TestClient[Any, Any], path: str, status: int, check: Callable[[Any], bool] = lambda _: True
) -> Any:
    async def probe() -> Any:
        code, body = await get(c, path)
        return body if code == status and check(body) else None

    return await until(probe, f"{path} to answer {status}")


async def active_pair(store: Store) -> tuple[FakeAgent, FakeAgent]:
    await apply_site(store)
    a = await FakeAgent(store, "asm-a", "asm").up()
    b = await FakeAgent(store, "asm-b", "asm").up()
    await a.become_active()
    await a.publish("mes-api", 8080)
    return a, b


async def test_lookup_200_503_404(client: TestClient[Any, Any], store: Store) -> None:
    await apply_site(store)
    body = await status_becomes(client, "/v1/endpoints/mes-api", 503)
    topology = await store.get(keys.TOPOLOGY)
    assert topology is not None
    assert body == {
        "error": "pair asm has no active node (no agent is up on asm-a, asm-b, asm-c)",
        "revision": topology.mod_revision,  # as of which there is no endpoint
    }
    assert (await get(client, "/v1/endpoints/nope"))[0] == 404
    assert (await get(client, "/v1/endpoints/worker"))[0] == 404

    a = await FakeAgent(store, "asm-a", "asm").up()
    epoch = await a.become_active()
    body = await status_becomes(
        client, "/v1/endpoints/mes-api", 503, lambda b: "not yet published" in b["error"]
    )
    assert body["error"] == (
        f"endpoint not yet published: asm-a is active in pair asm at epoch {epoch}"
    )
    await a.publish("mes-api", 8080)
    published = await store.get(keys.endpoint("mes-api"))
    assert published is not None
    body = await status_becomes(client, "/v1/endpoints/mes-api", 200)
    assert body == {
        "service": "mes-api",
        "pair": "asm",
        "node": "asm-a",
        "host": "127.0.0.11",
        "port": 8080,
        "protocol": "http",
        "epoch": epoch,
        "revision": published.mod_revision,  # the same on every registry
    }

    await store.put(keys.paused("asm"), records.Paused(by="op").encode())
    await a.crash()
    body = await status_becomes(client, "/v1/endpoints/mes-api", 503)
    assert "paused" in body["error"]
    # No endpoint as of the revision that removed it, at the earliest.
    assert body["revision"] > published.mod_revision


async def test_long_poll_wakes_when_a_newer_epoch_is_published(
    client: TestClient[Any, Any], store: Store
) -> None:
    a, b = await active_pair(store)
    first = await status_becomes(client, "/v1/endpoints/mes-api", 200)

    async def poll() -> tuple[int, Any, float]:
        started = time.monotonic()
        async with client.get(f"/v1/endpoints/mes-api?after_epoch={first['epoch']}&wait_s=30") as r:
            return r.status, await r.json(), time.monotonic() - started

    waiting = asyncio.create_task(poll())
    await asyncio.sleep(0.1)  # let the poll reach the registry before the change
    assert not waiting.done()
    await a.crash()
    new_epoch = await b.become_active()
    await b.publish("mes-api", 8080)
    async with asyncio.timeout(DEADLINE_S):
        status, body, took = await waiting
    assert status == 200 and body["node"] == "asm-b" and body["epoch"] == new_epoch > first["epoch"]
    assert took < DEADLINE_S


async def test_long_poll_answers_at_once_or_at_wait_s(
    client: TestClient[Any, Any], store: Store
) -> None:
    await active_pair(store)
    body = await status_becomes(client, "/v1/endpoints/mes-api", 200)
    started = time.monotonic()
    assert (await get(client, "/v1/endpoints/mes-api?after_epoch=0&wait_s=1000"))[0] == 200
    assert (await get(client, f"/v1/endpoints/mes-api?after_epoch={body['epoch']}&wait_s=0.3")) == (
        200,
        body,
    )
    # It waited (timers may fire a hair early), and not much longer.
    assert 0.25 <= time.monotonic() - started < 3.0
    assert (await get(client, "/v1/endpoints/nope?after_epoch=5&wait_s=30"))[0] == 404


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("after_epoch=abc", "after_epoch"),
        ("after_epoch=-1", "after_epoch"),
        ("wait_s=-2", "wait_s"),
        ("wait_s=nan", "wait_s"),
        ("after=5", "after"),
    ],
)
async def test_long_poll_params_are_validated(
    client: TestClient[Any, Any], store: Store, query: str, name: str
) -> None:
    status, body = await get(client, f"/v1/endpoints/mes-api?{query}")
    assert status == 400
    assert body["error"].startswith(f"invalid query parameter: {name}:")


async def read_events(
    resp: ClientResponse, until_event: Callable[[str, Any], bool]
) -> list[tuple[str, Any]]:
    """SSE messages up to and including the first one ``until_event`` accepts."""
    seen: list[tuple[str, Any]] = []
    kind = ""
    async with asyncio.timeout(DEADLINE_S):
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                seen.append((kind, json.loads(line.removeprefix("data: "))))
                if until_event(*seen[-1]):
                    return seen
            elif line.startswith(": heartbeat"):
                seen.append(("heartbeat", None))
                if until_event("heartbeat", None):
                    return seen
    raise AssertionError("stream ended")


async def test_event_stream_starts_with_the_state_and_carries_changes(
    client: TestClient[Any, Any], store: Store
) -> None:
    a, b = await active_pair(store)
    first = await status_becomes(client, "/v1/endpoints/mes-api", 200)
    async with client.get("/v1/events") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        snapshot = await read_events(resp, lambda k, d: k == "endpoint" and d["service"] == "scada")
        kinds = {k for k, _ in snapshot}
        assert {"topology", "role", "endpoint"} <= kinds
        assert ("endpoint", {**first, "status": 200}) in snapshot

        await a.crash()
        epoch = await b.become_active()
        await b.publish("mes-api", 8080)
        changes = await read_events(resp, lambda k, d: k == "endpoint" and d["status"] == 200)
        assert changes[-1][1]["epoch"] == epoch and changes[-1][1]["node"] == "asm-b"
        # Between the two, no endpoint: said as of a revision after the first one's.
        down = [d for k, d in changes if k == "endpoint" and d["service"] == "mes-api"][:-1]
        assert down and all(d["status"] == 503 for d in down)
        assert all(first["revision"] < d["revision"] <= changes[-1][1]["revision"] for d in down)
        roles = [d for k, d in changes if k == "role" and d["pair"] == "asm"]
        assert roles[-1]["active"] == "asm-b" and roles[-1]["epoch"] == epoch
        assert any(k == "node" and d["node"] == "asm-a" and not d["up"] for k, d in changes)

        await store.put(
            keys.event(time.time_ns(), "asm-b"),
            records.Event(kind="elected", pair="asm", node="asm-b").encode(),
        )
        got = await read_events(resp, lambda k, d: k == "event")
        assert got[-1][1]["kind"] == "elected"
        assert (await read_events(resp, lambda k, d: k == "heartbeat"))[-1] == ("heartbeat", None)


async def test_garbage_is_ignored_and_reported_in_site(
    client: TestClient[Any, Any], store: Store
) -> None:
    await active_pair(store)
    await store.put(keys.node_status("asm-c"), b'{"node": "asm-c"}')
    await store.put(keys.endpoint("scada"), b"\x00garbage")
    bad = {keys.node_status("asm-c"), keys.endpoint("scada")}
    # One bad record may carry several problems: wait for both keys, not for a count.
    site = await status_becomes(
        client, "/v1/site", 200, lambda s: bad <= {p["key"] for p in s["problems"]}
    )
    problems = {(p["key"], p["problem"].split(":")[0]) for p in site["problems"]}
    assert (keys.node_status("asm-c"), "pair") in problems
    assert any(k == keys.endpoint("scada") for k, _ in problems)
    asm = site["workshops"][0]["pairs"][0]
    assert asm["active"] == "asm-a"
    assert {n["name"]: n["up"] for n in asm["nodes"]} == {
        "asm-a": True,
        "asm-b": True,
        "asm-c": False,
    }
    assert (await get(client, "/v1/endpoints/scada"))[0] == 503
    assert (await get(client, "/v1/endpoints/mes-api"))[0] == 200


async def test_a_topology_this_version_cannot_read_never_makes_a_404(
    client: TestClient[Any, Any], store: Store
) -> None:
    """A newer site file applied during an upgrade: this registry cannot tell which
    services are declared, so a service between two endpoint records is 503 (a client
    treats 404 as final), on lookups and on the event stream."""
    a, b = await active_pair(store)
    await status_becomes(client, "/v1/endpoints/mes-api", 200)
    newer = site_records.site().model_dump(mode="json") | {"added_later": {"x": 1}}
    await store.put(keys.TOPOLOGY, records.TopologyDoc(site=newer).encode())
    await status_becomes(client, "/v1/site", 200, lambda s: s["problems"])
    async with client.get("/v1/events") as resp:
        await read_events(resp, lambda k, d: k == "endpoint" and d["service"] == "mes-api")
        await a.crash()
        body = await status_becomes(client, "/v1/endpoints/mes-api", 503)
        assert "topology" in body["error"]
        change = await read_events(resp, lambda k, d: k == "endpoint" and d["status"] != 200)
        assert change[-1][1]["status"] == 503
    assert (await get(client, "/v1/endpoints/nope"))[0] == 503
    epoch = await b.become_active()
    await b.publish("mes-api", 8080)
    await status_becomes(client, "/v1/endpoints/mes-api", 200, lambda d: d["epoch"] == epoch)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": 5}, "to"),
        ({"to": "bad name!"}, "to"),
        ({"too": "asm-b"}, "too"),
        ({"reason": "x" * 501}, "reason"),
        ([1, 2], "(top level)"),
    ],
)
async def test_bad_switchover_bodies_are_400_naming_the_field(
    client: TestClient[Any, Any], store: Store, body: Any, field: str
) -> None:
    async with client.post("/v1/pairs/asm/switchover", json=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"].startswith(f"invalid body: {field}:")
    async with client.post(
        "/v1/pairs/asm/switchover", data=b"{nope", headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400 and "not JSON" in (await resp.json())["error"]
    assert await store.get(keys.switchover("asm")) is None


async def test_admin_routes(client: TestClient[Any, Any], store: Store) -> None:
    await active_pair(store)
    async with client.post("/v1/pairs/asm/switchover", json={"to": "asm-c"}) as resp:
        assert resp.status == 409
        assert (await resp.json())["error"] == (
            "cannot switch pair asm over to asm-c: asm-c is down (no agent status)"
        )
    async with client.post("/v1/pairs/asm/switchover", json={"to": "asm-b"}) as resp:
        assert resp.status == 202
        request = (await resp.json())["request"]
    kv = await store.get(keys.switchover("asm"))
    assert kv is not None and records.decode(records.Switchover, kv.value, kv.key).id == request
    await store.delete(keys.switchover("asm"))

    async with client.post("/v1/pairs/asm/pause", json={"reason": "window"}) as resp:
        assert resp.status == 200 and (await resp.json())["paused"]["reason"] == "window"
    async with client.post("/v1/pairs/asm/switchover", json={}) as resp:
        assert resp.status == 409 and "resume it first" in (await resp.json())["error"]
    async with client.post("/v1/pairs/asm/resume", json={}) as resp:
        assert resp.status == 200
    async with client.post("/v1/nodes/asm-b/drain", json={"reason": "disk"}) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["switchover_request"] is None
    async with client.post("/v1/nodes/asm-b/undrain", json={}) as resp:
        assert resp.status == 200
    async with client.post("/v1/nodes/asm-b/undrain", json={}) as resp:
        assert resp.status == 409 and (await resp.json())["error"] == "node asm-b is not drained"


async def test_a_named_tokens_pause_names_it(etcd: Any, store: Store) -> None:
    """A token's name is the operator the flag and the event show; a missing or
    unknown token changes nothing."""
    await active_pair(store)
    tokens = {hashlib.sha256(b"s3cret").hexdigest(): "alice"}
    app = create_app(etcd.url, RegistryConfig(admin_tokens=tokens), tls=etcd.tls)
    async with TestClient(TestServer(app)) as c:
        async with c.post("/v1/pairs/asm/pause", json={}) as resp:
            assert resp.status == 401
        nope = {"Authorization": "Bearer nope"}
        async with c.post("/v1/pairs/asm/pause", json={}, headers=nope) as resp:
            assert resp.status == 401
        assert await store.get(keys.paused("asm")) is None
        alice = {"Authorization": "Bearer s3cret"}
        async with c.post("/v1/pairs/asm/pause", json={"reason": "x"}, headers=alice) as resp:
            assert resp.status == 200 and (await resp.json())["paused"]["by"] == "alice"
    kv = await store.get(keys.paused("asm"))
    assert kv is not None and records.decode(records.Paused, kv.value, kv.key).by == "alice"
    kvs, _ = await store.get_prefix(keys.EVENTS_PREFIX)
    paused = [records.decode(records.Event, kv.value, kv.key) for kv in kvs]
    assert [e.details["by"] for e in paused if e.kind == "paused"] == ["alice"]


async def test_hapair_registry_serves_until_sigterm(etcd: Any, store: Store) -> None:
    await active_pair(store)
    port = free_port()
    env = {**os.environ, **etcd.client_env(), "HAPAIR_LISTEN": f"127.0.0.1:{port}"}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "hapair-registry"),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with ClientSession(f"http://127.0.0.1:{port}") as session:

            async def answer() -> Any:
                with contextlib.suppress(OSError):
                    async with session.get("/v1/endpoints/mes-api") as resp:
                        return await resp.json() if resp.status == 200 else None

            # A process's start: slow on a loaded machine, and not what is tested.
            body = await until(answer, "hapair-registry to answer a lookup", START_S)
            assert body["node"] == "asm-a"
            # Given no credential to take, its admin routes are closed.
            async with session.post("/v1/pairs/asm/pause", json={}) as resp:
                assert resp.status == 403 and "--open-admin" in (await resp.json())["error"]
            assert await store.get(keys.paused("asm")) is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(DEADLINE_S):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()  # never leave it behind, even when the test fails
            await proc.wait()
            raise
    assert proc.returncode == 0, err.decode()
    assert b"event=listening" in err and b"Traceback" not in err
    assert b"admin routes are closed on this registry" in err
    assert b"registry in lab mode: lookups and admin requests travel in clear" in err


async def test_hapair_registry_refuses_bad_settings() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAPAIR_")}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "hapair-registry"),
        "--listen",
        "nowhere",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE_S):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert err.decode().strip() == (
        "hapair-registry: etcd: give --etcd URL or set HAPAIR_ETCD; "
        "listen: expected HOST:PORT, got 'nowhere': no port"
    )


# ---- readers that do not read -----------------------------------------------------


def _tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (1: established), read without reading data."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


async def test_an_event_stream_reader_that_does_not_read_is_cut_off(
    client: TestClient[Any, Any], store: Store
) -> None:
    """A follower that stops reading (its buffers full, the registry's write blocked)
    is cut off: it must not keep the registry's handler, socket and buffers forever."""
    await active_pair(store)
    port = client.server.port
    assert port is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /v1/events HTTP/1.1\r\nHost: registry\r\n\r\n")
    try:
        # Changes the stream carries, big enough to fill every buffer on the way.
        problems = ["x" * 1000] * 60
        for i in range(200):
            status = records.NodeStatus(
                node="asm-b",
                pair="asm",
                address="127.0.0.12",
                role="standby",
                healthy=False,
                problems=[f"{i}", *problems],
            )
            await store.put(keys.node_status("asm-b"), status.encode())

        async def cut() -> bool:
            return _tcp_state(sock) != 1  # reset (or closed) by the registry

        await until(cut, "the registry to cut the stream off", deadline_s=30.0)
    finally:
        sock.close()


async def test_streams_and_long_polls_are_capped(etcd: Any, store: Store) -> None:
    """Beyond the configured number of open streams (long-polls), a new one is refused
    at once with 503 and Retry-After: a client goes to another registry."""
    await active_pair(store)
    app = create_app(
        etcd.url, RegistryConfig(heartbeat_s=0.2, max_streams=2, max_polls=2), tls=etcd.tls
    )
    async with TestClient(TestServer(app)) as c:
        body = await status_becomes(c, "/v1/endpoints/mes-api", 200)
        poll = f"/v1/endpoints/mes-api?after_epoch={body['epoch']}&wait_s=30"
        async with c.get("/v1/events") as s1, c.get("/v1/events") as s2:
            assert s1.status == s2.status == 200
            async with c.get("/v1/events") as refused:
                assert refused.status == 503 and refused.headers["Retry-After"]
                assert "too many event streams" in (await refused.json())["error"]
            polls = [asyncio.create_task(get(c, poll)) for _ in range(2)]
            await until(lambda: asyncio.sleep(0, app[READERS].polls == 2), "both polls waiting")
            async with c.get(poll) as refused:
                assert refused.status == 503 and refused.headers["Retry-After"]
                assert "too many long-polls" in (await refused.json())["error"]
            # A plain lookup answers at once: it holds nothing.
            assert (await get(c, "/v1/endpoints/mes-api"))[0] == 200
            for task in polls:
                task.cancel()

        # Closed streams free their places.
        async def stream_again() -> bool:
            async with c.get("/v1/events") as again:
                return again.status == 200

        await until(stream_again, "a stream accepted again")


async def test_one_client_address_holds_few_waiting_readers_and_lookups_go_on(
    etcd: Any, store: Store
) -> None:
    """A client address that holds its share of streams and long-polls is refused a
    new one (503, Retry-After) while other addresses still get theirs, and lookups from
    it still answer."""
    await active_pair(store)
    config = RegistryConfig(heartbeat_s=0.2, max_per_client=2, max_streams=100, max_polls=100)
    app = create_app(etcd.url, config, tls=etcd.tls)
    async with (
        TestClient(TestServer(app, host="127.0.0.1")) as c,
        ClientSession(connector=TCPConnector(local_addr=("127.0.0.2", 0))) as other,
    ):
        body = await status_becomes(c, "/v1/endpoints/mes-api", 200)
        poll = f"/v1/endpoints/mes-api?after_epoch={body['epoch']}&wait_s=30"
        async with c.get("/v1/events") as s1, c.get("/v1/events") as s2:
            assert s1.status == s2.status == 200
            for path, what in (("/v1/events", "stream"), (poll, "long-poll")):
                async with c.get(path) as refused:
                    assert refused.status == 503 and refused.headers["Retry-After"], what
                    error = (await refused.json())["error"]
                    assert "open from 127.0.0.1" in error, error
            assert (await get(c, "/v1/endpoints/mes-api"))[0] == 200
            async with other.get(f"{c.make_url('/v1/events')}") as s3:
                assert s3.status == 200
                assert app[READERS].by_client == {"127.0.0.1": 2, "127.0.0.2": 1}
        # Closed streams free their client's places, and leave no trace of it.
        await until(lambda: asyncio.sleep(0, not app[READERS].by_client), "every place given back")


def _partial_request(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /v1/site HTTP/1.1\r\nHost: registry\r\n")
    sock.setblocking(False)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed or reset ``sock`` (non-blocking)."""
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


async def test_connections_that_never_finish_their_headers_are_closed(
    etcd: Any, store: Store
) -> None:
    """Connections that open and trickle header lines without ever ending them are
    closed after the header timeout, however many; lookups answer meanwhile."""
    await active_pair(store)
    port = free_port()
    env = {
        **os.environ,
        **etcd.client_env(),
        "HAPAIR_LISTEN": f"127.0.0.1:{port}",
        "HAPAIR_HEADER_TIMEOUT_S": "1",
    }
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "hapair-registry"),
        env=env,
        stderr=asyncio.subprocess.DEVNULL,
    )
    socks: list[socket.socket] = []
    try:
        async with ClientSession(f"http://127.0.0.1:{port}") as session:

            async def lookup() -> bool:
                with contextlib.suppress(OSError):
                    async with session.get("/v1/endpoints/mes-api") as resp:
                        return resp.status == 200
                return False

            await until(lookup, "hapair-registry to answer a lookup", START_S)
            socks = [_partial_request(port) for _ in range(50)]

            async def all_closed() -> bool:
                for i, sock in enumerate(socks):
                    if not closed_by_peer(sock):
                        # Still trickling: a header line that never ends the headers.
                        with contextlib.suppress(OSError):
                            sock.send(f"X-Slow-{i}: 1\r\n".encode())
                assert await lookup(), "a lookup failed while the connections were held"
                await asyncio.sleep(0.2)
                return all(closed_by_peer(s) or s.fileno() == -1 for s in socks)

            await until(all_closed, "the registry to close every unfinished request", 15)
    finally:
        for sock in socks:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(DEADLINE_S):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_a_reader_that_leaves_gives_its_place_back_at_once(etcd: Any, store: Store) -> None:
    """A client that closes its event stream or its long-poll gives its place back as
    it leaves, not when the registry next writes to it (the stream's heartbeat, up to
    300 s away when the client asked for that; the poll's wait_s, up to 60 s): with a
    share of one per address, the client opens another at once."""
    await active_pair(store)
    registry = await RegistryProcess(etcd, args=("--max-per-client", "1")).start()
    try:
        async with ClientSession() as s, s.get(f"{registry.url}/v1/endpoints/mes-api") as resp:
            epoch = (await resp.json())["epoch"]
        stream = f"{registry.url}/v1/events?heartbeat_s=300"
        poll = f"{registry.url}/v1/endpoints/mes-api?after_epoch={epoch}&wait_s=60"
        # A long-poll that answers at once: 503 when the address's place is taken.
        probe = f"{registry.url}/v1/endpoints/mes-api?after_epoch={epoch}&wait_s=0"

        async def status(url: str) -> int:
            async with ClientSession() as other, other.get(url) as resp:
                return resp.status

        for leaving in (stream, poll):
            async with ClientSession() as reader:
                request = asyncio.create_task(reader.get(leaving))

                async def held(url: str = leaving) -> bool:
                    nonlocal request
                    if request.done():
                        response = request.result()
                        if response.status == 200 and url == stream:
                            return True  # its stream is open
                        # Refused while a probe held the place for an instant: again.
                        response.close()
                        request = asyncio.create_task(reader.get(url))
                        return False
                    return await status(probe) == 503 and not request.done()

                await until(held, "the reader's place taken", START_S)
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    (await request).close()
            # The reader has left: its connection is closed.

            async def free() -> bool:
                return await status(stream) == 200

            await until(free, "a stream accepted after the reader left", 10.0)
    finally:
        await registry.stop()
