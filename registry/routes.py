"""HTTP routes: thin handlers over the cache (reads) and hapair.shared.admin (writes)."""

from __future__ import annotations

from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from hapair.registry.appkeys import CACHE, STORE
from hapair.registry.auth import JSON, json_body, operator
from hapair.registry.cache import encode
from hapair.registry.errors import validate
from hapair.registry.stream import busy, reader_slot
from hapair.shared import admin
from hapair.shared.topology import Name

MAX_WAIT_S = 60.0
"""The longest a long-poll waits: a client asks again after it (its socket and handler
are held meanwhile)."""
STALE_HEADER = "X-Hapair-Stale"
"""On lookups answered while the registry is out of touch with etcd: why. The answer
is the last state seen; a client with other registries should ask them instead."""

routes = web.RouteTableDef()
B = TypeVar("B", bound=BaseModel)


class PollQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after_epoch: int = Field(0, ge=0)
    wait_s: float = Field(30.0, ge=0, allow_inf_nan=False)

    @property
    def capped_wait_s(self) -> float:
        return min(self.wait_s, MAX_WAIT_S)


class EmptyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReasonBody(EmptyBody):
    reason: str = Field("", max_length=500)


class SwitchoverBody(ReasonBody):
    to: Name | None = None


class AckBody(EmptyBody):
    epoch: int | None = Field(None, ge=1, description="the epoch the acknowledgement is for")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=encode(data), status=status, content_type=JSON)


# ---- reads ------------------------------------------------------------------------


@routes.get("/v1/endpoints/{service}")
async def lookup(request: web.Request) -> web.Response:
    cache = request.app[CACHE]
    service = request.match_info["service"]
    if request.query_string:
        poll = validate(PollQuery, dict(request.query), "query parameter")
        with reader_slot(request, "polls") as full:
            if full is not None:
                return busy(full)
            answer = await cache.wait_for_epoch(service, poll.after_epoch, poll.capped_wait_s)
    else:
        answer = cache.answer(service)
    headers = None if cache.synced else {STALE_HEADER: cache.problem}
    return web.Response(body=answer.body, status=answer.status, content_type=JSON, headers=headers)


@routes.get("/v1/site")
async def site(request: web.Request) -> web.Response:
    cache = request.app[CACHE]
    doc = cache.site()
    if not cache.synced:
        doc["warning"] = (
            f"registry is not in touch with etcd ({cache.problem})"
            f"; showing the state as of revision {cache.view.revision}"
        )
    return _json(doc)


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    cache = request.app[CACHE]
    if not cache.synced:
        return _json({"error": cache.problem}, 503)
    return _json({"status": "ok", "revision": cache.view.revision})


# ---- admin ------------------------------------------------------------------------


async def _body(request: web.Request, model: type[B]) -> B:
    return validate(model, await json_body(request), "body")


@routes.post("/v1/pairs/{pair}/switchover")
async def switchover(request: web.Request) -> web.Response:
    by = operator(request)
    body = await _body(request, SwitchoverBody)
    pair = request.match_info["pair"]
    req = await admin.request_switchover(request.app[STORE], pair, body.to, by, body.reason)
    return _json({"pair": pair, "request": req.id, "to": req.to, "by": by}, 202)


@routes.post("/v1/pairs/{pair}/pause")
async def pause(request: web.Request) -> web.Response:
    by = operator(request)
    body = await _body(request, ReasonBody)
    flag = await admin.pause(request.app[STORE], request.match_info["pair"], by, body.reason)
    return _json({"pair": request.match_info["pair"], "paused": flag.model_dump(mode="json")})


@routes.post("/v1/pairs/{pair}/ack")
async def ack(request: web.Request) -> web.Response:
    by = operator(request)
    body = await _body(request, AckBody)
    done = await admin.ack(request.app[STORE], request.match_info["pair"], body.epoch, by)
    return _json({"pair": request.match_info["pair"], "recovery": done.model_dump(mode="json")})


@routes.post("/v1/pairs/{pair}/resume")
async def resume(request: web.Request) -> web.Response:
    by = operator(request)
    await _body(request, EmptyBody)
    was = await admin.resume(request.app[STORE], request.match_info["pair"], by)
    return _json({"pair": request.match_info["pair"], "was_paused": was.model_dump(mode="json")})


@routes.post("/v1/nodes/{node}/drain")
async def drain(request: web.Request) -> web.Response:
    by = operator(request)
    body = await _body(request, ReasonBody)
    result = await admin.drain(request.app[STORE], request.match_info["node"], by, body.reason)
    request_id = result.switchover.id if result.switchover else None
    return _json(
        {
            "node": request.match_info["node"],
            "pair": result.pair,
            "drained": result.drained.model_dump(mode="json"),
            "switchover_request": request_id,
        }
    )


@routes.post("/v1/nodes/{node}/undrain")
async def undrain(request: web.Request) -> web.Response:
    by = operator(request)
    await _body(request, EmptyBody)
    was = await admin.undrain(request.app[STORE], request.match_info["node"], by)
    return _json({"node": request.match_info["node"], "was_drained": was.model_dump(mode="json")})
