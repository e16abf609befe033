"""What an event stream asks for (``GET /v1/events?kinds=...&services=...``), and the
streams a message goes to.

A client of one service needs that service's endpoint answers and nothing else of the
site. Sent everything, a thousand such clients would cost the registry a write to
every stream for each message of any pair's move (roles, nodes, endpoints, the audit
trail), and its CPU during that fan-out is what slows failovers on a loaded site.
``stale`` is no kind to ask for: it is about the stream itself, and every stream
gets it.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BeforeValidator, WithJsonSchema

from hapair.shared.topology import ENDPOINT_NAME_PATTERN

KINDS = ("topology", "role", "node", "endpoint", "event")
STALE = "stale"
MAX_SERVICES = 100
"""Services one stream may name: what a client can make the registry hold is bounded."""
SNAPSHOTS = 256
"""Distinct filters whose starting state is kept encoded for the current state."""

_KIND = "(" + "|".join(KINDS) + ")"
KINDS_PATTERN = f"^{_KIND}(,{_KIND})*$"
_NAME = ENDPOINT_NAME_PATTERN.removeprefix("^").removesuffix("$")
SERVICES_PATTERN = f"^{_NAME}(,{_NAME}){{0,{MAX_SERVICES - 1}}}$"
"""What the OpenAPI document says of ``services``; :func:`parse_services` takes the same."""
_SERVICE = re.compile(_NAME)


def _items(value: object) -> list[str]:
    if not isinstance(value, str):
        raise ValueError("expected a comma-separated list")
    items = value.split(",")
    if "" in items:
        raise ValueError("an empty item (a comma too many?)")
    return items


def parse_kinds(value: object) -> frozenset[str]:
    """``endpoint,role`` -> the kinds; a ValueError names what is wrong."""
    items = _items(value)
    for item in items:
        if item not in KINDS:
            always = " (stale events are sent to every stream)" if item == STALE else ""
            raise ValueError(f"unknown kind {item!r}: the kinds are {', '.join(KINDS)}{always}")
    return frozenset(items)


def parse_services(value: object) -> frozenset[str]:
    """``mes-api,scada`` -> the names; a ValueError names what is wrong."""
    items = _items(value)
    if len(items) > MAX_SERVICES:
        raise ValueError(f"{len(items)} names, at most {MAX_SERVICES}")
    for item in items:
        if _SERVICE.fullmatch(item) is None:
            raise ValueError(f"{item!r} is not a service name")
    return frozenset(items)


def _optional_text(pattern: str) -> dict[str, Any]:
    """As the OpenAPI document says of the other optional parameters."""
    return {"anyOf": [{"type": "string", "pattern": pattern}, {"type": "null"}]}


# Query parameters: comma-separated text, parsed into sets.
Kinds = Annotated[
    frozenset[str] | None,
    BeforeValidator(parse_kinds),
    WithJsonSchema(_optional_text(KINDS_PATTERN)),
]
Services = Annotated[
    frozenset[str] | None,
    BeforeValidator(parse_services),
    WithJsonSchema(_optional_text(SERVICES_PATTERN)),
]


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """What one stream takes: messages of ``kinds``, and of endpoint answers those of
    ``services`` only (None: every service's). Equal filters are one key for the
    starting state encoded once."""

    kinds: frozenset[str] = frozenset(KINDS)
    services: frozenset[str] | None = None

    def takes(self, kind: str, service: str | None = None) -> bool:
        if kind == STALE:
            return True
        if kind not in self.kinds:
            return False
        return kind != "endpoint" or self.services is None or service in self.services

    def routes(self) -> Iterator[Hashable]:
        """The keys it is found under in :class:`Streams`: a kind, or for endpoint
        answers of named services (``endpoint``, service)."""
        for kind in self.kinds:
            if kind == "endpoint" and self.services is not None:
                yield from ((kind, service) for service in self.services)
            else:
                yield kind


S = TypeVar("S", bound=Hashable)


class Streams(Generic[S]):
    """The open streams, found by what they take: a message goes through those that
    take it, and no other. An unfiltered stream costs what every stream cost before
    filters (one set walked for each message); a filtered one is only met by the
    messages it takes, so a thousand clients of one service each are not a thousand
    checks for every change of another pair."""

    def __init__(self) -> None:
        self._unfiltered: set[S] = set()
        self._routes: dict[Hashable, set[S]] = {}
        self._filters: dict[S, StreamFilter] = {}

    def add(self, stream: S, stream_filter: StreamFilter | None) -> None:
        if stream_filter is None:
            self._unfiltered.add(stream)
            return
        self._filters[stream] = stream_filter
        for route in stream_filter.routes():
            self._routes.setdefault(route, set()).add(stream)

    def discard(self, stream: S) -> None:
        self._unfiltered.discard(stream)
        stream_filter = self._filters.pop(stream, None)
        if stream_filter is None:
            return
        for route in stream_filter.routes():
            streams = self._routes.get(route)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._routes[route]  # names asked once are not kept for good

    def taking(self, kind: str, service: str | None = None) -> list[S]:
        """The streams that take a message of ``kind`` (of ``service``, an endpoint)."""
        if kind == STALE:
            return list(self)
        found = list(self._unfiltered)
        found += self._routes.get(kind, ())
        if service is not None:
            # Not also under ``endpoint``: a filter names its services, or takes all.
            found += self._routes.get((kind, service), ())
        return found

    def __len__(self) -> int:
        return len(self._unfiltered) + len(self._filters)

    def __iter__(self) -> Iterator[S]:
        yield from self._unfiltered
        yield from self._filters
