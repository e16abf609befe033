"""The registry's rules that need no etcd: the long-poll cap, health without etcd."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from hapair.registry.app import create_app
from hapair.registry.routes import PollQuery


async def get(c: TestClient[Any, Any], path: str) -> tuple[int, Any]:
    async with c.get(path) as resp:
        return resp.status, await resp.json()


def test_wait_s_is_capped() -> None:
    from hapair.registry.routes import MAX_WAIT_S

    assert min(PollQuery.model_validate({"wait_s": "100000"}).wait_s, MAX_WAIT_S) == 300


async def test_healthz_says_why_when_etcd_is_unreachable() -> None:
    app = create_app("http://127.0.0.1:1", etcd_timeout_s=0.3)
    async with TestClient(TestServer(app)) as c:
        status, body = await get(c, "/healthz")
        assert status == 503 and body["error"]
        status, site = await get(c, "/v1/site")
        assert status == 200 and site["warning"].startswith("registry is not in touch with etcd")
