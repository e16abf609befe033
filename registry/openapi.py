"""The registry's routes as one table, and its OpenAPI document generated from it.

The router is built from the same table (:func:`add_routes`), and every query, body and
answer in the document is the JSON schema of the pydantic model the route validates or
answers with: a route added, a parameter or a field changed, and the document follows.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from hapair.registry.answers import BadRequestBody, ErrorBody

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PATH_PARAMETERS = {
    "service": "a service's name (or a pair's database, PAIR.db)",
    "pair": "a pair's name",
    "node": "a node's name",
}


@dataclass(frozen=True)
class Header:
    name: str
    description: str
    schema: Mapping[str, Any]


@dataclass(frozen=True)
class Reply:
    """One answer a route may give: its body's model (JSON) and headers it may carry."""

    description: str
    model: type[BaseModel] = ErrorBody
    media: str = JSON
    headers: tuple[Header, ...] = ()


@dataclass(frozen=True)
class Route:
    """One route: what the router serves and what the document says of it."""

    method: str
    path: str
    handler: Handler
    summary: str
    replies: Mapping[int, Reply]
    query: type[BaseModel] | None = None
    """Its query parameters, each a field (validated with this model)."""
    body: type[BaseModel] | None = None
    """Its JSON body (validated with this model); an admin route always has one."""
    admin: bool = False
    """It needs a credential and changes the site."""
    description: str = ""
    tags: tuple[str, ...] = field(default=())

    def all_replies(self) -> dict[int, Reply]:
        """Its own replies, and those every route of its kind may give."""
        replies: dict[int, Reply] = {}
        if self.query is not None or self.body is not None:
            replies[400] = Reply("a parameter or body field is wrong (each named)", BadRequestBody)
        if self.admin:
            replies |= ADMIN_REFUSALS
        return replies | dict(self.replies)


ADMIN_REFUSALS = {
    401: Reply("no credential, or a token this registry does not accept"),
    403: Reply(
        "admin routes closed on this registry (no tokens, no client CA, no --open-admin), "
        "or a component's certificate rather than an operator's"
    ),
    409: Reply("refused (unknown pair or node, paused pair, drained target, ...): nothing changed"),
    415: Reply("not sent as application/json (even without a body)"),
    503: Reply("etcd cannot be reached: nothing changed"),
}

SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "a named admin token (--admin-tokens-file); its name is the operator",
    },
    "operatorCertificate": {
        "type": "mutualTLS",
        "description": "an operator's client certificate from the site CA (--client-ca); "
        "its CN is the operator",
    },
}


def add_routes(app: web.Application, routes: Iterable[Route]) -> None:
    for route in routes:
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)  # and HEAD, as aiohttp does
        else:
            app.router.add_route(route.method, route.path, route.handler)


def version() -> str:
    try:
        return importlib.metadata.version("hapair")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def document(routes: Iterable[Route]) -> dict[str, Any]:
    """The OpenAPI document of ``routes``."""
    routes = list(routes)
    used: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for route in routes:
        if route.body is not None:
            used.append((route.body, "validation"))
        used += [(reply.model, "serialization") for reply in route.all_replies().values()]
    refs, defs = models_json_schema(
        list(dict.fromkeys(used)), ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "hapair registry",
            "version": version(),
            "description": "Where each service of the site answers now, the site's state, "
            "and the operators' requests. Every answer but an event stream is JSON; "
            "every error has an `error` saying why.",
        },
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {}), "securitySchemes": SECURITY_SCHEMES},
    }


# Keyed by (model, mode) as pydantic returns them.
Refs = Mapping[tuple[Any, JsonSchemaMode], Mapping[str, Any]]


def _operation(route: Route, refs: Refs) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.handler.__name__,
        "summary": route.summary,
        "parameters": _path_parameters(route.path) + _query_parameters(route.query),
        "responses": {
            str(status): _response(reply, refs[(reply.model, "serialization")])
            for status, reply in sorted(route.all_replies().items())
        },
        # Reads need no credential; admin routes take either.
        "security": [{"bearer": []}, {"operatorCertificate": []}] if route.admin else [],
    }
    if route.description:
        operation["description"] = route.description
    if route.tags:
        operation["tags"] = list(route.tags)
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "description": "sent as application/json; an empty body is taken as {}",
            "content": {JSON: {"schema": refs[(route.body, "validation")]}},
        }
    return operation


def _path_parameters(path: str) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": PATH_PARAMETERS[name],
            "schema": {"type": "string", "minLength": 1},
        }
        for name in re.findall(r"\{(\w+)\}", path)
    ]


def _query_parameters(model: type[BaseModel] | None) -> list[dict[str, Any]]:
    if model is None:
        return []
    properties = model.model_json_schema()["properties"]
    parameters = []
    for name, info in model.model_fields.items():
        schema = {k: v for k, v in properties[name].items() if k not in ("title", "description")}
        parameter = {"name": name, "in": "query", "required": info.is_required(), "schema": schema}
        if info.description:
            parameter["description"] = info.description
        parameters.append(parameter)
    return parameters


def _response(reply: Reply, schema: Mapping[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": reply.description,
        "content": {reply.media: {"schema": schema}},
    }
    if reply.headers:
        response["headers"] = {
            h.name: {"description": h.description, "schema": dict(h.schema)} for h in reply.headers
        }
    return response
