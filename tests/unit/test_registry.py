"""The registry's rules that need no etcd: the long-poll cap, health without etcd, who
may use the admin routes and what a request to them must look like."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from hapair.registry.app import create_app, runner
from hapair.registry.appkeys import RegistryConfig
from hapair.registry.routes import PollQuery
from hapair.registry.settings import RegistrySettings

# Nothing answers here: a request that reaches the store fails with 503, so any other
# status shows the request was refused before it could change anything.
NO_ETCD = "http://127.0.0.1:1"


async def get(c: TestClient[Any, Any], path: str) -> tuple[int, Any]:
    async with c.get(path) as resp:
        return resp.status, await resp.json()


def test_wait_s_is_capped_at_60_s() -> None:
    assert PollQuery.model_validate({"wait_s": "100000"}).capped_wait_s == 60
    assert PollQuery.model_validate({"wait_s": "12"}).capped_wait_s == 12


async def test_healthz_says_why_when_etcd_is_unreachable() -> None:
    app = create_app(NO_ETCD, etcd_timeout_s=0.3)
    async with TestClient(TestServer(app)) as c:
        status, body = await get(c, "/healthz")
        assert status == 503 and body["error"]
        status, site = await get(c, "/v1/site")
        assert status == 200 and site["warning"].startswith("registry is not in touch with etcd")


async def test_admin_post_without_credentials_is_refused_by_default() -> None:
    """With no token, no client certificate and no --open-admin, the admin routes are
    closed, and the answer says how to open them."""
    app = create_app(NO_ETCD, etcd_timeout_s=0.3)
    async with TestClient(TestServer(app)) as c:
        for path in ("/v1/pairs/asm/pause", "/v1/nodes/asm-a/drain", "/v1/pairs/asm/switchover"):
            async with c.post(path, json={}) as resp:
                assert resp.status == 403, path
                error = (await resp.json())["error"]
                assert "--admin-tokens-file" in error and "--open-admin" in error


@pytest.mark.parametrize(
    "headers, body",
    [
        # What a cross-site page can send without asking first: a form, plain text
        # (a text/plain form can carry a JSON-looking body), or a POST with no type.
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"reason=x"),
        ({"Content-Type": "multipart/form-data; boundary=b"}, b"--b--\r\n"),
        ({"Content-Type": "text/plain"}, b'{"reason": "x"}'),
        ({}, b""),
    ],
)
async def test_a_post_that_is_not_json_is_refused_415(headers: dict[str, str], body: bytes) -> None:
    app = create_app(NO_ETCD, RegistryConfig(open_admin=True), etcd_timeout_s=0.3)
    async with TestClient(TestServer(app)) as c:
        skip = () if headers else ("Content-Type",)
        async with c.post(
            "/v1/pairs/asm/pause", data=body, headers=headers, skip_auto_headers=skip
        ) as resp:
            assert resp.status == 415
            assert "application/json" in (await resp.json())["error"]


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"[" * 100_000, "nested too deeply"),
        (b'{"reason": ' * 50_000, "nested too deeply"),
        (b"\xff\xfe{}", "not JSON"),
        (b'{"reason": "x"', "not JSON"),
        (b'{"epoch": ' + b"9" * 5000 + b"}", "not JSON"),
    ],
)
async def test_a_malformed_or_deeply_nested_body_is_400_with_the_reason(
    body: bytes, reason: str
) -> None:
    app = create_app(NO_ETCD, RegistryConfig(open_admin=True), etcd_timeout_s=0.3)
    async with TestClient(TestServer(app)) as c:
        for path in ("/v1/pairs/asm/ack", "/v1/pairs/asm/pause"):
            async with c.post(
                path, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                assert resp.status == 400, path
                assert reason in (await resp.json())["error"]


async def test_an_unknown_path_or_method_is_answered_in_json_too() -> None:
    """Every answer is JSON with an ``error``, the router's own refusals as well; a
    405 still says which methods the path takes."""
    app = create_app(NO_ETCD, etcd_timeout_s=0.3)
    async with TestClient(TestServer(app)) as c:
        for method, path, status in [
            ("GET", "/v1/nope", 404),
            ("GET", "/v1/endpoints/", 404),
            ("PUT", "/v1/site", 405),
            ("DELETE", "/v1/pairs/asm/pause", 405),
        ]:
            async with c.request(method, path) as resp:
                assert (resp.status, resp.content_type) == (status, "application/json"), path
                assert path in (await resp.json())["error"]
                if status == 405:
                    assert resp.headers["Allow"]


async def test_a_malformed_http_request_is_one_warning_line_not_an_error_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client's request that aiohttp's parser refuses (a NUL in a header, as a fuzzer
    or a scanner sends) is answered 400 and logged as what it is: one warning naming
    the client and why. An error with a traceback would read as the registry's bug."""
    run = runner(create_app(NO_ETCD, etcd_timeout_s=0.3))
    await run.setup()
    site = web.TCPSite(run, "127.0.0.1", 0)
    await site.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", run.addresses[0][1])
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: r\r\nX-Probe: \x00\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        await run.cleanup()
    assert answer.split(b" ", 2)[1] == b"400"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    [warned] = [r for r in caplog.records if r.getMessage() == "malformed request refused"]
    assert warned.levelno == logging.WARNING
    assert warned.fields["peer"] == "127.0.0.1" and "header" in warned.fields["error"]


# ---- settings ----------------------------------------------------------------------

ALICE = hashlib.sha256(b"alice-token").hexdigest()
BOB = hashlib.sha256(b"bob-token").hexdigest()


def test_admin_tokens_are_named(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# who may use the admin routes\nalice:{ALICE}\n\nbob:{BOB}  # on call\n")
    settings = RegistrySettings(etcd="http://e:2379", admin_tokens_file=tokens)
    assert settings.admin_tokens_by_digest() == {ALICE: "alice", BOB: "bob"}
    # The environment's list takes names too; a bare digest is named after itself.
    settings = RegistrySettings(etcd="http://e:2379", admin_tokens=f"carol:{ALICE},{BOB}")
    assert settings.admin_tokens_by_digest() == {ALICE: "carol", BOB: f"token {BOB[:8]}"}


@pytest.mark.parametrize(
    "line, problem",
    [
        ("alice", "NAME:SHA256"),
        (f"al ice:{ALICE}", "name"),
        ("alice:abc", "SHA256"),
        (f"alice:{ALICE}\nalice:{BOB}", "twice"),
    ],
)
def test_a_bad_token_file_is_refused_naming_the_line(
    tmp_path: Path, line: str, problem: str
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(line + "\n")
    with pytest.raises(ValueError, match=problem) as err:
        RegistrySettings(etcd="http://e:2379", admin_tokens_file=tokens).admin_tokens_by_digest()
    assert f"{tokens}:" in str(err.value)


@pytest.mark.parametrize(
    "given, problem",
    [
        ({"tls_cert": "r.crt"}, "--tls-key"),
        ({"tls_key": "r.key"}, "--tls-cert"),
        ({"client_ca": "ca.crt"}, "--tls-cert"),
    ],
)
def test_tls_files_come_together(given: dict[str, str], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        RegistrySettings(etcd="http://e:2379", **given)  # type: ignore[arg-type]
