"""The registry's OpenAPI document: a valid OpenAPI 3.1 document of exactly the routes
the app serves, whose answer schemas are those of what the registry sends."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel
from schemathesis.core.result import Err, Ok

from hapair.registry import answers
from hapair.registry.app import create_app
from hapair.registry.cache import Answer
from hapair.registry.openapi import document
from hapair.registry.routes import ROUTES
from hapair.registry.stream_filter import KINDS_PATTERN, SERVICES_PATTERN
from hapair.shared.view import SiteView
from tests.unit.test_view import endpoint, leader, status, topo

NO_ETCD = "http://127.0.0.1:1"


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document(ROUTES)
    assert doc["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    operations = list(schema.get_all_operations())
    assert not [op for op in operations if isinstance(op, Err)]
    labels = {op.ok().label for op in operations if isinstance(op, Ok)}
    assert labels == {f"{r.method} {r.path}" for r in ROUTES}


def test_the_document_has_every_route_the_app_serves_and_no_other() -> None:
    app = create_app(NO_ETCD)
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    doc = document(ROUTES)
    documented = {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}
    assert served == documented


def test_admin_routes_say_how_they_are_refused_and_need_a_credential() -> None:
    doc = document(ROUTES)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["operatorCertificate"]["type"] == "mutualTLS"
    for route in ROUTES:
        operation = doc["paths"][route.path][route.method.lower()]
        if route.admin:
            assert operation["security"] == [{"bearer": []}, {"operatorCertificate": []}]
            assert {"200", "202"} & set(operation["responses"])
            assert {"400", "401", "403", "409", "415", "503"} <= set(operation["responses"])
            assert operation["requestBody"]["content"]["application/json"]["schema"]
        else:
            assert operation["security"] == []
    lookup = doc["paths"]["/v1/endpoints/{service}"]["get"]
    assert "Retry-After" in lookup["responses"]["503"]["headers"]
    assert {p["name"] for p in lookup["parameters"]} == {"service", "after_epoch", "wait_s"}
    events = doc["paths"]["/v1/events"]["get"]["responses"]
    assert "Retry-After" in events["503"]["headers"]
    assert "text/event-stream" in events["200"]["content"]
    assert "400" in events
    stream = {p["name"]: p for p in doc["paths"]["/v1/events"]["get"]["parameters"]}
    assert set(stream) == {"heartbeat_s", "kinds", "services"}
    for name, pattern in (("kinds", KINDS_PATTERN), ("services", SERVICES_PATTERN)):
        assert stream[name]["schema"]["anyOf"][0] == {"type": "string", "pattern": pattern}
    assert not stream["kinds"]["required"] and "stale" in stream["kinds"]["description"]


async def test_the_registry_serves_its_document() -> None:
    app = create_app(NO_ETCD, etcd_timeout_s=0.3)
    async with TestClient(TestServer(app)) as c, c.get("/v1/openapi.json") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        assert await resp.json() == document(ROUTES)


def _valid(model: type[BaseModel], body: Any) -> None:
    model.model_validate(body)  # raises, naming the field, when they differ


@pytest.mark.parametrize(
    "kvs, service, status_code, model",
    [
        (
            lambda: [topo(), leader("asm", "asm-a", 42), endpoint("mes-api", "asm-a", 42)],
            "mes-api",
            200,
            answers.EndpointFound,
        ),
        (lambda: [topo(), status("asm-a")], "mes-api", 503, answers.NoEndpoint),
        (lambda: [topo(), leader("asm", "asm-a", 42)], "mes-api", 503, answers.NoEndpoint),
        (lambda: [topo()], "nope", 404, answers.ErrorBody),
        (lambda: [topo()], "worker", 404, answers.ErrorBody),
    ],
)
def test_lookup_answers_are_what_the_document_says(
    kvs: Any, service: str, status_code: int, model: type[BaseModel]
) -> None:
    """The lookup answers are built by the site view, not by the answer models: the
    two are held together here."""
    answer = Answer.of(SiteView.from_kvs(kvs(), 120).lookup(service), 120)
    assert answer.status == status_code
    _valid(model, answer.data)
