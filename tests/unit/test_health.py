"""Health probes against real servers and real commands on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import pwd
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

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


async def test_http_200_is_healthy(server: Server) -> None:
    assert await probe(Health(http=server.url("/ok")), VALUES, AGENTS_OWN, ENV) is None


async def test_http_redirect_is_healthy(server: Server) -> None:
    # A redirect proves the server answers; it is not followed.
    assert await probe(Health(http=server.url("/redirect")), VALUES, AGENTS_OWN, ENV) is None


async def test_http_500_names_url_and_status(server: Server) -> None:
    message = await probe(Health(http=server.url("/fail")), VALUES, AGENTS_OWN, ENV)
    assert message == f"http http://127.0.0.1:{server.port}/fail: status 500"


async def test_http_404_is_unhealthy(server: Server) -> None:
    message = await probe(Health(http=server.url("/missing")), VALUES, AGENTS_OWN, ENV)
    assert message == f"http http://127.0.0.1:{server.port}/missing: status 404"


async def test_http_without_answer_times_out(server: Server) -> None:
    started = time.monotonic()
    message = await probe(Health(http=server.url("/hang"), timeout_s=0.3), VALUES, AGENTS_OWN, ENV)
    elapsed = time.monotonic() - started
    assert message == "no answer within 0.3s"
    assert 0.25 <= elapsed < 3.0


async def test_http_refused_names_the_url() -> None:
    port = free_port()  # nothing listens there
    message = await probe(Health(http=f"http://127.0.0.1:{port}/"), VALUES, AGENTS_OWN, ENV)
    assert message is not None
    assert message.startswith(f"http http://127.0.0.1:{port}/: ")


async def test_tcp_open_port_is_healthy(server: Server) -> None:
    health = Health(tcp=f"{{node.address}}:{server.port}")
    assert await probe(health, VALUES, AGENTS_OWN, ENV) is None


async def test_tcp_closed_port_names_the_target() -> None:
    port = free_port()
    message = await probe(Health(tcp=f"{{node.address}}:{port}"), VALUES, AGENTS_OWN, ENV)
    assert message is not None
    assert message.startswith(f"tcp 127.0.0.1:{port}: ")


@pytest.mark.may_skip
async def test_tcp_ipv6_literal_in_brackets() -> None:
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    try:
        listener = await asyncio.start_server(accept, "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    async with listener:
        port = listener.sockets[0].getsockname()[1]
        assert await probe(Health(tcp=f"[::1]:{port}"), VALUES, AGENTS_OWN, ENV) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may run a check as another user")
async def test_a_command_runs_as_the_services_user_with_its_environment() -> None:
    nobody = pwd.getpwnam("nobody")
    run_as = RunAs(nobody.pw_uid, nobody.pw_gid, (nobody.pw_gid,), "nobody", "/")
    check = f'test "$(id -u):$(id -g):$(id -G)" = {nobody.pw_uid}:{nobody.pw_gid}:{nobody.pw_gid}'
    env = {**ENV, "ONLY": "this"}
    health = Health(command=["sh", "-c", check + ' -a "$ONLY" = this -a -z "$HOME"'])
    assert await probe(health, VALUES, run_as, env) is None
    assert await probe(health, VALUES, AGENTS_OWN, env) is not None


async def test_command_true_is_healthy() -> None:
    assert await probe(Health(command=["true"]), VALUES, AGENTS_OWN, ENV) is None


async def test_command_false_names_command_and_code() -> None:
    assert (
        await probe(Health(command=["false"]), VALUES, AGENTS_OWN, ENV)
        == "command false exited with 1"
    )


async def test_command_exit_code_is_reported() -> None:
    message = await probe(Health(command=["sh", "-c", "exit 3"]), VALUES, AGENTS_OWN, ENV)
    assert message == "command sh exited with 3"


async def test_missing_command_names_it() -> None:
    message = await probe(Health(command=["/nonexistent/hapair-check"]), VALUES, AGENTS_OWN, ENV)
    assert message == "command /nonexistent/hapair-check: No such file or directory"


async def test_command_placeholders_are_expanded() -> None:
    check = 'test "$0 $1 $2 $3" = "asm-a 127.0.0.1 asm 7"'
    health = Health(
        command=["sh", "-c", check, "{node.name}", "{node.address}", "{pair.name}", "{epoch}"]
    )
    assert await probe(health, VALUES, AGENTS_OWN, ENV) is None


async def test_slow_command_times_out_and_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    health = Health(command=["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"], timeout_s=0.3)
    started = time.monotonic()
    message = await probe(health, VALUES, AGENTS_OWN, ENV)
    assert message == "no answer within 0.3s"
    assert time.monotonic() - started < 1.5
    # probe() killed and reaped it: the pid no longer exists (not even as a zombie).
    assert not _process_exists(int(pid_file.read_text()))


async def test_process_only_health_is_always_healthy() -> None:
    assert await probe(Health(), VALUES, AGENTS_OWN, ENV) is None


async def _raw_server(answer: bytes) -> tuple[asyncio.Server, int, list[bytes]]:
    """A server that records the request head it got and answers ``answer`` raw."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    return listener, listener.sockets[0].getsockname()[1], heads


async def test_http_asks_for_the_path_and_query_of_the_host_named() -> None:
    listener, port, heads = await _raw_server(b"HTTP/1.0 204 No Content\r\n\r\n")
    async with listener:
        health = Health(http=f"http://{{node.address}}:{port}/ready?deep=1")
        assert await probe(health, VALUES, AGENTS_OWN, ENV) is None
    request, *headers = heads[0].decode().split("\r\n")
    assert request == "GET /ready?deep=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{port}" in headers


async def test_http_garbage_is_not_an_answer() -> None:
    listener, port, _ = await _raw_server(b"SSH-2.0-OpenSSH_9.2\r\n")
    async with listener:
        message = await probe(Health(http=f"http://127.0.0.1:{port}/"), VALUES, AGENTS_OWN, ENV)
    assert (
        message
        == f"http http://127.0.0.1:{port}/: not an HTTP answer (b'SSH-2.0-OpenSSH_9.2\\r\\n')"
    )


async def test_https_to_a_certificate_nobody_trusts_is_unhealthy(tmp_path: Path) -> None:
    from hapair.shared import pki

    pki.init(tmp_path / "ca", "health")
    issued = pki.issue(tmp_path / "ca", "registry", "svc", ips=["127.0.0.1"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(issued.cert, issued.key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    async with listener:
        port = listener.sockets[0].getsockname()[1]
        message = await probe(Health(http=f"https://127.0.0.1:{port}/"), VALUES, AGENTS_OWN, ENV)
    assert message is not None
    assert message.startswith(f"http https://127.0.0.1:{port}/: ")
    assert "certificate verify failed" in message
