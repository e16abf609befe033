"""What the registry answers, as models: the admin routes build their answers with
them, and the OpenAPI document describes every answer by them.

Lookup answers are built (and encoded once) by the site view, not here: the models
below describe them, and the tests hold the two together.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hapair.shared import records


class Answer(BaseModel):
    """An answer the registry sends: exactly these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def json_data(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---- errors -----------------------------------------------------------------------


class ErrorBody(Answer):
    """Every error: why, in a sentence."""

    error: str


class BadRequestBody(ErrorBody):
    """A parameter or a body field that is wrong, each named in ``problems``."""

    problems: list[str] = Field(description="one line per field: 'to: ...'")


class NoEndpoint(ErrorBody):
    """A lookup's ``503``: no valid endpoint now, as of an etcd revision (absent when
    the registry has not read etcd yet, or is refusing a long-poll beyond its share)."""

    revision: int = Field(0, ge=0, description="the etcd revision as of which there is none")


# ---- reads ------------------------------------------------------------------------


class EndpointFound(Answer):
    """Where a service answers now."""

    service: str
    pair: str
    node: str
    host: str
    port: int = Field(ge=1, le=65535)
    protocol: str
    epoch: int = Field(ge=1, description="the active's term (its leader key's create revision)")
    revision: int = Field(
        ge=0, description="the etcd revision that published it: orders endpoints of one epoch"
    )


class Health(Answer):
    status: Literal["ok"]
    revision: int = Field(ge=0, description="the etcd revision the registry has seen")


class StreamEvent(Answer):
    """One server-sent event. ``data`` is a JSON object: for ``endpoint`` a lookup
    answer with its ``service`` and ``status``; ``role`` ``{pair, active, epoch, since,
    paused}``; ``node`` ``{node, pair, up, role, healthy, problems, drained}``;
    ``topology`` ``{site, applied_by, applied_at}``; ``event`` an audit-trail entry;
    ``stale`` ``{stale: true, error, revision}`` when the registry loses touch with etcd
    (what it streams may be the past; the stream ends if that lasts) and ``{stale:
    false, revision}`` once it is current again."""

    event: Literal["topology", "role", "node", "endpoint", "event", "stale"]
    data: str = Field(json_schema_extra={"contentMediaType": "application/json"})
    id: str = Field(pattern=r"^[0-9]+$", description="the etcd revision of the change")


# ---- admin ------------------------------------------------------------------------


class SwitchoverRequested(Answer):
    pair: str
    request: str = Field(description="the request's id: the active carries it out")
    to: str | None
    by: str = Field(description="the operator")


class RolloutAccepted(Answer):
    pair: str
    rollout: str | None = Field(
        description="the rollout's id, its events name it; None for a dry run"
    )
    active: str
    target: str = Field(description="the standby the pair switches over to")
    steps: list[str] = Field(description="the plan, one line per step")
    by: str = Field(description="the operator")


class PairPaused(Answer):
    pair: str
    paused: records.Paused


class PairResumed(Answer):
    pair: str
    was_paused: records.Paused


class RecoveryAcknowledged(Answer):
    pair: str
    recovery: records.Recovery


class NodeDrained(Answer):
    node: str
    pair: str | None
    drained: records.Drained
    switchover_request: str | None = Field(
        description="the switchover the drain asked for, when the node was active"
    )


class NodeUndrained(Answer):
    node: str
    was_drained: records.Drained


class ApiDocument(BaseModel):
    """This document: OpenAPI 3.1."""

    model_config = ConfigDict(extra="allow", frozen=True)

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
