"""HTTP routes: thin handlers over the cache (reads) and hapair.shared.admin (writes),
and :data:`ROUTES`, the one table the router and the OpenAPI document come from."""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from hapair.registry import answers as a
from hapair.registry.appkeys import BACKGROUND, CACHE, SERVED, STORE
from hapair.registry.auth import JSON, json_body, operator
from hapair.registry.cache import encode
from hapair.registry.errors import log, validate
from hapair.registry.openapi import EVENT_STREAM, Handler, Header, Reply, Route, document
from hapair.registry.stream import StreamQuery, busy, events, reader_slot
from hapair.shared import admin
from hapair.shared import rollout as rollouts
from hapair.shared.report import SiteReport
from hapair.shared.topology import Name

MAX_WAIT_S = 60.0
"""The longest a long-poll waits: a client asks again after it (its socket and handler
are held meanwhile)."""
STALE_HEADER = "X-Hapair-Stale"
"""On lookups answered while the registry is out of touch with etcd: why. The answer
is the last state seen; a client with other registries should ask them instead."""

B = TypeVar("B", bound=BaseModel)


class PollQuery(BaseModel):
    """Either parameter makes the lookup a long-poll."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    after_epoch: int = Field(
        0, ge=0, description="answer as soon as the answer's epoch is above this one"
    )
    wait_s: float = Field(
        30.0,
        ge=0,
        allow_inf_nan=False,
        description=f"or after this many seconds (at most {MAX_WAIT_S:g}) with the answer then",
    )

    @property
    def capped_wait_s(self) -> float:
        return min(self.wait_s, MAX_WAIT_S)


class EmptyBody(BaseModel):
    """No field: an empty body, or {}."""

    model_config = ConfigDict(extra="forbid")


class ReasonBody(EmptyBody):
    reason: str = Field("", max_length=500, description="why: the flag and the event say it")


class SwitchoverBody(ReasonBody):
    to: Name | None = Field(None, description="the node to hand over to (default: the best)")


class AckBody(EmptyBody):
    epoch: int | None = Field(None, ge=1, description="the epoch the acknowledgement is for")


class RolloutBody(EmptyBody):
    dry_run: bool = Field(False, description="answer the plan; change nothing")
    timeout_s: float = Field(
        rollouts.DEFAULT_TIMEOUT_S,
        gt=0,
        le=86400,
        allow_inf_nan=False,
        description="give up (and roll back) after this many seconds",
    )


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=encode(data), status=status, content_type=JSON)


def _answer(answer: a.Answer, status: int = 200) -> web.Response:
    return _json(answer.json_data(), status)


# ---- reads ------------------------------------------------------------------------


async def lookup(request: web.Request) -> web.Response:
    cache = request.app[CACHE]
    service = request.match_info["service"]
    if request.query_string:
        poll = _poll_query(request)
        with reader_slot(request, "polls") as full:
            if full is not None:
                return busy(full)
            answer = await cache.wait_for_epoch(service, poll.after_epoch, poll.capped_wait_s)
    else:
        answer = cache.answer(service)
    headers = None if cache.synced else {STALE_HEADER: cache.problem}
    request.app[SERVED].lookups[answer.status] += 1
    return web.Response(body=answer.body, status=answer.status, content_type=JSON, headers=headers)


POLL_QUERIES = 1024
"""Distinct long-poll queries remembered parsed."""
_polls: dict[str, PollQuery] = {}


def _poll_query(request: web.Request) -> PollQuery:
    """A long-poll's query, parsed once per distinct query string: a thousand clients
    following one service ask the same few, again after each change."""
    poll = _polls.get(request.query_string)
    if poll is None:
        poll = validate(PollQuery, dict(request.query), "query parameter")
        if len(_polls) >= POLL_QUERIES:
            _polls.clear()  # any client may ask new ones: the memory stays bounded
        _polls[request.query_string] = poll
    return poll


async def site(request: web.Request) -> web.Response:
    cache = request.app[CACHE]
    doc = cache.site()
    if not cache.synced:
        doc["warning"] = (
            f"registry is not in touch with etcd ({cache.problem})"
            f"; showing the state as of revision {cache.view.revision}"
        )
    return _json(doc)


async def healthz(request: web.Request) -> web.Response:
    cache = request.app[CACHE]
    if not cache.synced:
        return _answer(a.ErrorBody(error=cache.problem), 503)
    return _answer(a.Health(status="ok", revision=cache.view.revision))


@functools.cache
def _document() -> bytes:
    return encode(document(ROUTES))


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_document(), content_type=JSON)


# ---- admin ------------------------------------------------------------------------


async def _body(request: web.Request, model: type[B]) -> B:
    return validate(model, await json_body(request), "body")


async def switchover(request: web.Request) -> web.Response:
    by = operator(request)
    body = await _body(request, SwitchoverBody)
    pair = request.match_info["pair"]
    req = await admin.request_switchover(request.app[STORE], pair, body.to, by, body.reason)
    return _answer(a.SwitchoverRequested(pair=pair, request=req.id, to=req.to, by=by), 202)


async def rollout(request: web.Request) -> web.Response:
    by = operator(request)
    body = await _body(request, RolloutBody)
    pair, store = request.match_info["pair"], request.app[STORE]
    plan = await rollouts.prepare(store, pair)
    started = None
    if not body.dry_run and not plan.up_to_date:
        started = await rollouts.begin(store, plan, by)

        def progress(line: str) -> None:
            log.info("rollout", pair=pair, step=line)

        request.app[BACKGROUND].start(
            started.run(progress, body.timeout_s), f"rollout-{pair}-{started.id}"
        )
    return _answer(
        a.RolloutAccepted(
            pair=pair,
            rollout=started.id if started else None,
            active=plan.active,
            target=plan.target,
            steps=plan.steps(),
            by=by,
        ),
        202,
    )


async def pause(request: web.Request) -> web.Response:
    by = operator(request)
    body = await _body(request, ReasonBody)
    flag = await admin.pause(request.app[STORE], request.match_info["pair"], by, body.reason)
    return _answer(a.PairPaused(pair=request.match_info["pair"], paused=flag))


async def ack(request: web.Request) -> web.Response:
    by = operator(request)
    body = await _body(request, AckBody)
    done = await admin.ack(request.app[STORE], request.match_info["pair"], body.epoch, by)
    return _answer(a.RecoveryAcknowledged(pair=request.match_info["pair"], recovery=done))


async def resume(request: web.Request) -> web.Response:
    by = operator(request)
    await _body(request, EmptyBody)
    was = await admin.resume(request.app[STORE], request.match_info["pair"], by)
    return _answer(a.PairResumed(pair=request.match_info["pair"], was_paused=was))


async def drain(request: web.Request) -> web.Response:
    by = operator(request)
    body = await _body(request, ReasonBody)
    result = await admin.drain(request.app[STORE], request.match_info["node"], by, body.reason)
    return _answer(
        a.NodeDrained(
            node=request.match_info["node"],
            pair=result.pair,
            drained=result.drained,
            switchover_request=result.switchover.id if result.switchover else None,
        )
    )


async def undrain(request: web.Request) -> web.Response:
    by = operator(request)
    await _body(request, EmptyBody)
    was = await admin.undrain(request.app[STORE], request.match_info["node"], by)
    return _answer(a.NodeUndrained(node=request.match_info["node"], was_drained=was))


# ---- the table --------------------------------------------------------------------

STALE = Header(
    STALE_HEADER,
    "the registry is out of touch with etcd: why (the answer is the last state seen; "
    "ask another registry)",
    {"type": "string"},
)
RETRY_AFTER = Header(
    "Retry-After",
    "when refused for want of room for another waiting reader: seconds to wait",
    {"type": "integer", "minimum": 0},
)
UNKNOWN = Reply("no such service in the site, or it declares no endpoint", headers=(STALE,))
NO_ENDPOINT = Reply(
    "known, but no valid endpoint now (no active node, or not yet published); or, "
    "with Retry-After, too many long-polls held",
    a.NoEndpoint,
    headers=(STALE, RETRY_AFTER),
)
READS = ("reads",)


def admin_route(
    path: str,
    handler: Handler,
    body: type[BaseModel],
    summary: str,
    done: Reply,
    status: int = 200,
) -> Route:
    """A POST that needs a credential, with its body and what it answers once done."""
    return Route(
        "POST", path, handler, summary, {status: done}, body=body, admin=True, tags=("admin",)
    )


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/endpoints/{service}",
        lookup,
        "Where a service answers now; with a query, a long-poll",
        {
            200: Reply("its endpoint", a.EndpointFound, headers=(STALE,)),
            404: UNKNOWN,
            503: NO_ENDPOINT,
        },
        query=PollQuery,
        tags=READS,
    ),
    Route(
        "GET",
        "/v1/events",
        events,
        "Server-sent events: the current state, then every change (or what is asked for)",
        {
            200: Reply(
                "a stream of events, each as the schema says, and comment lines on idle",
                a.StreamEvent,
                media=EVENT_STREAM,
            ),
            503: Reply(
                "out of touch with etcd; or, with Retry-After, too many streams held",
                headers=(RETRY_AFTER,),
            ),
        },
        query=StreamQuery,
        description="`kinds` and `services` ask for less than everything, in the state the "
        "stream starts with and after: `?kinds=endpoint&services=mes-api` is what a client "
        "of mes-api needs. `stale` events reach every stream, whatever it asked for. A "
        "registry older than these parameters refuses them (400).",
        tags=READS,
    ),
    Route(
        "GET",
        "/v1/site",
        site,
        "The whole site's state",
        {200: Reply("it", SiteReport)},
        tags=READS,
    ),
    Route(
        "GET",
        "/healthz",
        healthz,
        "Whether the registry is in step with etcd",
        {200: Reply("in step", a.Health), 503: Reply("not, or not sure to be: why")},
        tags=READS,
    ),
    Route(
        "GET",
        "/v1/openapi.json",
        openapi,
        "This document",
        {200: Reply("the registry's OpenAPI document", a.ApiDocument)},
        tags=READS,
    ),
    admin_route(
        "/v1/pairs/{pair}/switchover",
        switchover,
        SwitchoverBody,
        "Ask for a planned switchover (the active carries it out)",
        Reply("stored", a.SwitchoverRequested),
        status=202,
    ),
    admin_route(
        "/v1/pairs/{pair}/rollout",
        rollout,
        RolloutBody,
        "Roll a pair out onto the package versions the site names: its steps and outcome "
        "follow as events (rollout_step, rollout_done, rollout_rolled_back, rollout_failed)",
        Reply("started (or, for a dry run, planned)", a.RolloutAccepted),
        status=202,
    ),
    admin_route(
        "/v1/pairs/{pair}/pause",
        pause,
        ReasonBody,
        "Pause automatic failover",
        Reply("paused", a.PairPaused),
    ),
    admin_route(
        "/v1/pairs/{pair}/resume",
        resume,
        EmptyBody,
        "Resume automatic failover",
        Reply("resumed; the pause it ended", a.PairResumed),
    ),
    admin_route(
        "/v1/pairs/{pair}/ack",
        ack,
        AckBody,
        "Acknowledge a recovery: the held services start",
        Reply("acknowledged", a.RecoveryAcknowledged),
    ),
    admin_route(
        "/v1/nodes/{node}/drain",
        drain,
        ReasonBody,
        "Make a node ineligible (and move its pair off it when it is active)",
        Reply("drained", a.NodeDrained),
    ),
    admin_route(
        "/v1/nodes/{node}/undrain",
        undrain,
        EmptyBody,
        "Make a drained node eligible again",
        Reply("undrained; the drain it ended", a.NodeUndrained),
    ),
)
