"""Health probes against real servers and real commands on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import pwd
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from hapair.shared.topology import Health
from hapair.workshop_agent.health import probe
from hapair.workshop_agent.run_as import DEFAULT_PATH, RunAs
from tests.support.harness import free_port

VALUES = {"node.name": "asm-a", "node.address": "127.0.0.1", "pair.name": "asm", "epoch": "7"}
# A command runs as the service does: here as this test's own user, no switch.
AGENTS_OWN = RunAs(os.geteuid(), os.getegid(), None, "test", "/")
ENV = {"PATH": DEFAULT_PATH}
RELEASE = web.AppKey("release", asyncio.Event)


@dataclass
class Server:
    port: int
    release: asyncio.Event

    def url(self, path: str) -> str:
        # Written with a placeholder, as in a site file.
        return f"http://{{node.address}}:{self.port}{path}"


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _fail(request: web.Request) -> web.Response:
    return web.Response(status=500, text="broken")


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/elsewhere")


async def _hang(request: web.Request) -> web.Response:
    await request.app[RELEASE].wait()  # never answers until the test is over
    return web.Response(text="late")


def _process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    release = asyncio.Event()
    app = web.Application()
    app[RELEASE] = release
    app.router.add_get("/ok", _ok)
    app.router.add_get("/fail", _fail)
    app.router.add_get("/redirect", _redirect)
    app.router.add_get("/hang", _hang)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Server(port, release)
    finally:
        release.set()
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_http_200_is_healthy(server: Server, session: aiohttp.ClientSession) -> None:
    assert await probe(Health(http=server.url("/ok")), VALUES, session, AGENTS_OWN, ENV) is None


async def test_http_redirect_is_healthy(server: Server, session: aiohttp.ClientSession) -> None:
    # A redirect proves the server answers; it is not followed.
    assert (
        await probe(Health(http=server.url("/redirect")), VALUES, session, AGENTS_OWN, ENV) is None
    )


async def test_http_500_names_url_and_status(
    server: Server, session: aiohttp.ClientSession
) -> None:
    message = await probe(Health(http=server.url("/fail")), VALUES, session, AGENTS_OWN, ENV)
    assert message == f"http http://127.0.0.1:{server.port}/fail: status 500"


async def test_http_404_is_unhealthy(server: Server, session: aiohttp.ClientSession) -> None:
    message = await probe(Health(http=server.url("/missing")), VALUES, session, AGENTS_OWN, ENV)
    assert message == f"http http://127.0.0.1:{server.port}/missing: status 404"


async def test_http_without_answer_times_out(
    server: Server, session: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    message = await probe(
        Health(http=server.url("/hang"), timeout_s=0.3), VALUES, session, AGENTS_OWN, ENV
    )
    elapsed = time.monotonic() - started
    assert message == "no answer within 0.3s"
    assert 0.25 <= elapsed < 3.0


async def test_http_refused_names_the_url(session: aiohttp.ClientSession) -> None:
    port = free_port()  # nothing listens there
    message = await probe(
        Health(http=f"http://127.0.0.1:{port}/"), VALUES, session, AGENTS_OWN, ENV
    )
    assert message is not None
    assert message.startswith(f"http http://127.0.0.1:{port}/: ")


async def test_tcp_open_port_is_healthy(server: Server, session: aiohttp.ClientSession) -> None:
    health = Health(tcp=f"{{node.address}}:{server.port}")
    assert await probe(health, VALUES, session, AGENTS_OWN, ENV) is None


async def test_tcp_closed_port_names_the_target(session: aiohttp.ClientSession) -> None:
    port = free_port()
    message = await probe(Health(tcp=f"{{node.address}}:{port}"), VALUES, session, AGENTS_OWN, ENV)
    assert message is not None
    assert message.startswith(f"tcp 127.0.0.1:{port}: ")


@pytest.mark.may_skip
async def test_tcp_ipv6_literal_in_brackets(session: aiohttp.ClientSession) -> None:
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    try:
        listener = await asyncio.start_server(accept, "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    async with listener:
        port = listener.sockets[0].getsockname()[1]
        assert await probe(Health(tcp=f"[::1]:{port}"), VALUES, session, AGENTS_OWN, ENV) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may run a check as another user")
async def test_a_command_runs_as_the_services_user_with_its_environment(
    session: aiohttp.ClientSession,
) -> None:
    nobody = pwd.getpwnam("nobody")
    run_as = RunAs(nobody.pw_uid, nobody.pw_gid, (nobody.pw_gid,), "nobody", "/")
    check = f'test "$(id -u):$(id -g):$(id -G)" = {nobody.pw_uid}:{nobody.pw_gid}:{nobody.pw_gid}'
    env = {**ENV, "ONLY": "this"}
    health = Health(command=["sh", "-c", check + ' -a "$ONLY" = this -a -z "$HOME"'])
    assert await probe(health, VALUES, session, run_as, env) is None
    assert await probe(health, VALUES, session, AGENTS_OWN, env) is not None


async def test_command_true_is_healthy(session: aiohttp.ClientSession) -> None:
    assert await probe(Health(command=["true"]), VALUES, session, AGENTS_OWN, ENV) is None


async def test_command_false_names_command_and_code(session: aiohttp.ClientSession) -> None:
    assert (
        await probe(Health(command=["false"]), VALUES, session, AGENTS_OWN, ENV)
        == "command false exited with 1"
    )


async def test_command_exit_code_is_reported(session: aiohttp.ClientSession) -> None:
    message = await probe(Health(command=["sh", "-c", "exit 3"]), VALUES, session, AGENTS_OWN, ENV)
    assert message == "command sh exited with 3"


async def test_missing_command_names_it(session: aiohttp.ClientSession) -> None:
    message = await probe(
        Health(command=["/nonexistent/hapair-check"]), VALUES, session, AGENTS_OWN, ENV
    )
    assert message == "command /nonexistent/hapair-check: No such file or directory"


async def test_command_placeholders_are_expanded(session: aiohttp.ClientSession) -> None:
    check = 'test "$0 $1 $2 $3" = "asm-a 127.0.0.1 asm 7"'
    health = Health(
        command=["sh", "-c", check, "{node.name}", "{node.address}", "{pair.name}", "{epoch}"]
    )
    assert await probe(health, VALUES, session, AGENTS_OWN, ENV) is None


async def test_slow_command_times_out_and_is_killed(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    health = Health(command=["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"], timeout_s=0.3)
    started = time.monotonic()
    message = await probe(health, VALUES, session, AGENTS_OWN, ENV)
    assert message == "no answer within 0.3s"
    assert time.monotonic() - started < 1.5
    # probe() killed and reaped it: the pid no longer exists (not even as a zombie).
    assert not _process_exists(int(pid_file.read_text()))


async def test_process_only_health_is_always_healthy(session: aiohttp.ClientSession) -> None:
    assert await probe(Health(), VALUES, session, AGENTS_OWN, ENV) is None
